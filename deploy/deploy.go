// Package deploy holds tether's deployment files (systemd unit, image,
// Swarm stack) and embeds the ones the binary installs by itself.
package deploy

import _ "embed"

// SystemdUnit is deploy/systemd/tether.service, written by `tether install`.
//
//go:embed systemd/tether.service
var SystemdUnit string
