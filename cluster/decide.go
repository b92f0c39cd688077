package cluster

import (
	"fmt"
	"sort"
	"time"
)

// Member health values.
const (
	HealthAlive   = "alive"
	HealthSuspect = "suspect"
	HealthDead    = "dead"
	HealthLeft    = "left"
)

// down reports whether a health value means the node is gone. A node whose
// health is unknown ("") is not treated as down: a freshly started leader
// may not have heard of every node yet.
func down(health string) bool {
	return health == HealthDead || health == HealthLeft
}

// Place chooses the nodes of a new volume of n copies among alive nodes:
// local is the primary when it is alive, otherwise the least loaded node;
// the replicas are the least loaded of the others. Ties go to the smaller
// name. load counts the volumes each node already holds.
func Place(local string, alive []string, load map[string]int, n int) (primary string, replicas []string, err error) {
	if err := ValidateReplicas(n); err != nil {
		return "", nil, err
	}
	nodes := dedupe(alive)
	if len(nodes) < n {
		return "", nil, fmt.Errorf("%w: %d alive, %d wanted", ErrNotEnoughNodes, len(nodes), n)
	}
	sort.SliceStable(nodes, func(i, j int) bool {
		if load[nodes[i]] != load[nodes[j]] {
			return load[nodes[i]] < load[nodes[j]]
		}
		return nodes[i] < nodes[j]
	})
	primary = nodes[0]
	for _, node := range nodes {
		if node == local {
			primary = local
		}
	}
	for _, node := range nodes {
		if len(replicas) == n-1 {
			break
		}
		if node != primary {
			replicas = append(replicas, node)
		}
	}
	return primary, replicas, nil
}

// dedupe returns the distinct non-empty names of in.
func dedupe(in []string) []string {
	seen := map[string]bool{}
	out := make([]string, 0, len(in))
	for _, s := range in {
		if s != "" && !seen[s] {
			seen[s] = true
			out = append(out, s)
		}
	}
	return out
}

// VolumeState tells how a volume stands given each node's health:
// no-primary when its primary is down, healthy when the primary and every
// replica are alive, degraded otherwise.
func VolumeState(v Volume, health map[string]string) string {
	if v.Deleted() {
		return StateDeleted
	}
	if down(health[v.Primary]) {
		return StateNoPrimary
	}
	if health[v.Primary] != HealthAlive {
		return StateDegraded
	}
	for _, r := range v.ReplicaNodes {
		if health[r] != HealthAlive {
			return StateDegraded
		}
	}
	return StateHealthy
}

// ChooseFailover decides whether v needs a new primary: when its primary
// is dead or left, the alive replica with the highest progress (epoch,
// then seq; ties to the smaller name) takes over in the next epoch, and
// the old primary becomes a replica so that it resyncs when it returns.
// ok is false when the primary is not down or no replica is alive.
func ChooseFailover(v Volume, health map[string]string) (cmd SetPrimary, ok bool) {
	if !down(health[v.Primary]) {
		return SetPrimary{}, false
	}
	best := ""
	for _, r := range v.ReplicaNodes {
		if health[r] != HealthAlive {
			continue
		}
		if best == "" || v.Progress[r].after(v.Progress[best]) ||
			(!v.Progress[best].after(v.Progress[r]) && r < best) {
			best = r
		}
	}
	if best == "" {
		return SetPrimary{}, false
	}
	replicas := make([]string, 0, len(v.ReplicaNodes))
	for _, r := range v.ReplicaNodes {
		if r != best {
			replicas = append(replicas, r)
		}
	}
	replicas = append(replicas, v.Primary)
	return SetPrimary{
		Name:         v.Name,
		Primary:      best,
		ReplicaNodes: replicas,
		Epoch:        v.Epoch + 1,
		ExpectEpoch:  v.Epoch,
	}, true
}

// Failovers lists the SetPrimary commands the leader should apply now:
// one per volume whose primary has been down for at least grace (downSince
// tells when each down node went down).
func Failovers(vols []Volume, health map[string]string, downSince map[string]time.Time, now time.Time, grace time.Duration) []SetPrimary {
	var out []SetPrimary
	for _, v := range vols {
		if since, ok := downSince[v.Primary]; grace > 0 && (!ok || now.Sub(since) < grace) {
			continue
		}
		if cmd, ok := ChooseFailover(v, health); ok {
			out = append(out, cmd)
		}
	}
	return out
}

// Purges lists the purges due at now: DeleteVolume for every volume
// deleted at least retention ago, bound to its deletion time.
func Purges(vols []Volume, now time.Time, retention time.Duration) []DeleteVolume {
	var out []DeleteVolume
	for _, v := range vols {
		if v.Deleted() && !now.Before(v.DeletedAt().Add(retention)) {
			out = append(out, DeleteVolume{Name: v.Name, ExpectDeletedUnixNano: v.DeletedUnixNano})
		}
	}
	return out
}
