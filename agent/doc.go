// Package agent is the tether agent: it wires the cluster (membership and
// the Raft catalog), replication (watching, streaming and applying volume
// changes) and the local control API together, and owns the lifetime of
// every goroutine they run. The agent's reconcile loop turns the catalog's
// word ("this node is primary of volume V in epoch E") into running
// replication. With a Docker volume driver it also stops the containers of
// a volume it loses (fence.go) and records, then re-creates after a
// failover, standalone containers labelled tether.failover=true
// (containers.go, decided by decideRecreate in recreate.go).
package agent
