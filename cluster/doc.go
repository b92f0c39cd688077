// Package cluster is tether's control plane: it owns membership (memberlist
// gossip), the replicated catalog of volumes (a Raft FSM stored with
// raft-boltdb), and the leader's reconcile loop that adds new members to
// Raft and fails a volume over to its most advanced live replica when its
// primary dies.
//
// The catalog changes only through typed, versioned commands (command.go)
// applied by Raft; the FSM (fsm.go) is deterministic and takes every time
// value from the command. Besides ownership it keeps, per volume, the
// specs of standalone containers to re-create after a failover
// (container.go). Decisions (placement, failover choice, volume
// state) are pure functions in decide.go. Mux (mux.go) lets Raft share the
// agent's RPC listener with gRPC.
//
// Bootstrap (BootstrapExpect) is deliberately simple: once a node sees at
// least BootstrapExpect alive members and none of them says (in its gossip
// meta) that it already belongs to a Raft cluster, it takes the first
// BootstrapExpect alive names in sorted order and, if it is one of them,
// bootstraps Raft with exactly those servers. Every node computes the same
// set as long as the first nodes all use the same BootstrapExpect and no
// more than BootstrapExpect of them start before Raft has formed. Nodes
// that find a formed cluster wait for its leader to add them (voters up to
// five, then nonvoters). Servers that leave gracefully are removed from
// the Raft configuration; dead ones are not (they may come back).
package cluster
