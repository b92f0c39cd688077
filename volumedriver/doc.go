// Package volumedriver serves Docker's legacy (v1) volume plugin protocol
// on a unix socket: /Plugin.Activate and /VolumeDriver.Create, Remove,
// Mount, Unmount, Path, Get, List and Capabilities, with the exact JSON
// shapes dockerd sends and expects (see ../shared/docker-plugin-facts.md).
//
// It validates every request, keeps a mount reference count per (volume,
// Docker mount ID) persisted in a JSON file so that it survives a restart,
// and delegates the volumes themselves to a Backend that its user (the
// agent) implements. Get and List answer from the Backend's local state
// only and never fail for a volume the Backend owns: dockerd forgets a
// volume whose Get fails or comes back empty when it restores its volumes
// at boot, and serves no API until it has, so the driver must not depend on
// the Docker API to answer.
package volumedriver
