package cluster

import (
	"fmt"
	"slices"
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
		if cmd, ok := ChooseFailover(v, health); ok {
			if _, blocked := FailoverBlocked(v, cmd.Primary); blocked {
				return StateNeedsOperator
			}
		}
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
// tells when each down node went down) and whose lease has surely expired
// (leaseUntil tells until when each node may still hold one). If reachable
// is not nil, only the replicas it names may be promoted: gossip may not
// yet suspect a replica cut off together with the primary, and the leader
// must not hand the volume to a node it cannot reach (the volume would
// stay unserved until the partition heals); it waits until gossip or a
// reachable copy decides.
func Failovers(vols []Volume, health map[string]string, downSince, leaseUntil map[string]time.Time, reachable map[string]bool, now time.Time, grace time.Duration) []SetPrimary {
	if reachable != nil {
		h := make(map[string]string, len(health))
		for n, s := range health {
			if s == HealthAlive && !reachable[n] {
				s = HealthSuspect
			}
			h[n] = s
		}
		health = h
	}
	var out []SetPrimary
	for _, v := range vols {
		if since, ok := downSince[v.Primary]; grace > 0 && (!ok || now.Sub(since) < grace) {
			continue
		}
		if until, ok := leaseUntil[v.Primary]; ok && now.Before(until) {
			continue
		}
		cmd, ok := ChooseFailover(v, health)
		if !ok {
			continue
		}
		if _, blocked := FailoverBlocked(v, cmd.Primary); blocked {
			continue // an operator decides: tether volume promote --force
		}
		out = append(out, cmd)
	}
	return out
}

// Behind tells how far node's copy of v is behind the primary's head (the
// newest batch the primary reported cutting): the difference of their cut
// times, and 0 when the copy holds the head. A copy with no recorded batch
// counts as holding the volume as it was created (empty): it is behind by
// everything the head holds. Progress is reported in the background, so
// this errs on the side of "further behind".
func Behind(v Volume, node string) time.Duration {
	head, have := v.Progress[v.Primary], v.Progress[node]
	if !head.after(have) {
		return 0
	}
	since := have.Cut
	if have.Cut.IsZero() || have.Seq == 0 {
		since = v.CreatedAt
	}
	if head.Cut.Before(since) {
		return 0
	}
	return head.Cut.Sub(since)
}

// FailoverBlocked reports whether promoting candidate would give up more
// than v's max lag, and how far behind it is.
func FailoverBlocked(v Volume, candidate string) (behind time.Duration, blocked bool) {
	behind = Behind(v, candidate)
	return behind, v.MaxLag > 0 && behind > v.MaxLag
}

// ManualPromotion checks an operator's request to promote to in place of
// v's dead primary and builds the command. force accepts a copy further
// behind than the max lag. Lease expiry is the caller's check (it needs
// the leader's clock).
func ManualPromotion(v Volume, to string, health map[string]string, force bool) (SetPrimary, time.Duration, error) {
	switch {
	case to == v.Primary:
		return SetPrimary{}, 0, fmt.Errorf("%w: %s is already the primary of %q", ErrInvalidCommand, to, v.Name)
	case !slices.Contains(v.ReplicaNodes, to):
		return SetPrimary{}, 0, fmt.Errorf("%w: %s holds no copy of %q (replicas: %v)", ErrInvalidCommand, to, v.Name, v.ReplicaNodes)
	case !down(health[v.Primary]):
		return SetPrimary{}, 0, fmt.Errorf("%w: the primary %s of %q is %s; promote only replaces a dead primary (use tether volume move for a planned move)", ErrPrimaryAlive, v.Primary, v.Name, orUnknown(health[v.Primary]))
	case health[to] != HealthAlive:
		return SetPrimary{}, 0, fmt.Errorf("%w: %s is %s", ErrNotEnoughNodes, to, orUnknown(health[to]))
	}
	behind, blocked := FailoverBlocked(v, to)
	if blocked && !force {
		return SetPrimary{}, behind, fmt.Errorf("%w: %s's copy of %q is %s behind the primary's last batch, more than its max lag %s; add --force to accept losing that", ErrTooFarBehind, to, v.Name, fmtBehind(behind), v.MaxLag)
	}
	replicas := []string{}
	for _, r := range v.ReplicaNodes {
		if r != to {
			replicas = append(replicas, r)
		}
	}
	replicas = append(replicas, v.Primary)
	return SetPrimary{Name: v.Name, Primary: to, ReplicaNodes: replicas, Epoch: v.Epoch + 1, ExpectEpoch: v.Epoch}, behind, nil
}

func orUnknown(health string) string {
	if health == "" {
		return "unknown"
	}
	return health
}

func fmtBehind(d time.Duration) string {
	return d.Round(time.Millisecond).String()
}

// Repairs lists the replica-set changes the leader should apply now, at
// most one per volume whose primary is alive:
//   - a replica dead for at least grace is replaced by a spare node (the
//     least loaded alive node holding no copy and carrying the volume's
//     placement labels; ties to the smaller name);
//   - missing replicas (the volume asks for more copies) are added;
//   - a replica that violates the placement gets a spare added beside it,
//     and is dropped once every eligible replica has made a batch of the
//     current epoch durable (add, catch up, then trim: never fewer good
//     copies than before);
//   - extra replicas (the volume asks for fewer copies) are dropped: dead
//     ones first, then violators, then the furthest behind.
//
// A volume with no spare keeps its dead replica and stays degraded.
func Repairs(vols []Volume, health map[string]string, downSince map[string]time.Time, now time.Time, grace time.Duration, load map[string]int, labels map[string]map[string]string) []SetReplicas {
	var out []SetReplicas
	for _, v := range vols {
		if health[v.Primary] != HealthAlive {
			continue
		}
		next := repairReplicas(v, health, downSince, now, grace, load, labels)
		if !slices.Equal(next, v.ReplicaNodes) {
			out = append(out, SetReplicas{Name: v.Name, ReplicaNodes: next, ExpectEpoch: v.Epoch})
		}
	}
	return out
}

func repairReplicas(v Volume, health map[string]string, downSince map[string]time.Time, now time.Time, grace time.Duration, load map[string]int, labels map[string]map[string]string) []string {
	want := max(v.Replicas-1, 0)
	deadLong := func(r string) bool {
		since, ok := downSince[r]
		return down(health[r]) && ok && now.Sub(since) >= grace
	}
	violates := func(r string) bool { return !Eligible(labels[r], v.Placement) }
	addSpare := func(next []string) ([]string, bool) {
		spare := spareNode(v, next, health, load, labels)
		if spare == "" {
			return next, false
		}
		load[spare]++
		return append(next, spare), true
	}
	var next []string
	for _, r := range v.ReplicaNodes {
		if deadLong(r) {
			if n, ok := addSpare(next); ok {
				next = n
				continue
			}
		}
		next = append(next, r)
	}
	for len(next) < want {
		n, ok := addSpare(next)
		if !ok {
			break
		}
		next = n
	}
	good, violators := 0, 0
	for _, r := range next {
		if violates(r) {
			violators++
		} else {
			good++
		}
	}
	if violators > 0 && good < want && len(next) == want {
		next, _ = addSpare(next) // the violator goes once the spare caught up
	}
	return trimReplicas(v, next, want, health, violates)
}

// trimReplicas drops replicas beyond want: dead ones, then placement
// violators (only once every eligible replica holds a batch of the current
// epoch), then the furthest behind.
func trimReplicas(v Volume, next []string, want int, health map[string]string, violates func(string) bool) []string {
	if len(next) <= want {
		return next
	}
	caughtUp := func(r string) bool { p := v.Progress[r]; return p.Epoch == v.Epoch && p.Seq > 0 }
	allGoodCaughtUp := true
	for _, r := range next {
		if !violates(r) && !caughtUp(r) {
			allGoodCaughtUp = false
		}
	}
	violators := slices.ContainsFunc(next, violates)
	rank := func(r string) int {
		switch {
		case down(health[r]):
			return 0
		case violates(r):
			return 1
		default:
			return 2
		}
	}
	order := slices.Clone(next)
	sort.SliceStable(order, func(i, j int) bool {
		ri, rj := rank(order[i]), rank(order[j])
		if ri != rj {
			return ri < rj
		}
		return v.Progress[order[j]].after(v.Progress[order[i]]) // less progress goes first
	})
	drop := map[string]bool{}
	for _, r := range order[:len(next)-want] {
		if violators && !allGoodCaughtUp && !down(health[r]) {
			break // a placement change is under way: trim once the new copies hold the data
		}
		drop[r] = true
	}
	var out []string
	for _, r := range next {
		if !drop[r] {
			out = append(out, r)
		}
	}
	return out
}

// spareNode is the least loaded alive node that is neither v's primary nor
// one of its replicas (old or already chosen) and satisfies its placement.
func spareNode(v Volume, chosen []string, health map[string]string, load map[string]int, labels map[string]map[string]string) string {
	var nodes []string
	for n, h := range health {
		if h == HealthAlive && !v.participant(n) && !slices.Contains(chosen, n) && Eligible(labels[n], v.Placement) {
			nodes = append(nodes, n)
		}
	}
	sort.Slice(nodes, func(i, j int) bool {
		if load[nodes[i]] != load[nodes[j]] {
			return load[nodes[i]] < load[nodes[j]]
		}
		return nodes[i] < nodes[j]
	})
	if len(nodes) == 0 {
		return ""
	}
	return nodes[0]
}

// RaftServer is what DeadServers needs to know of a Raft server.
type RaftServer struct {
	ID    string
	Voter bool
}

// DeadServers picks the Raft servers the leader may remove now: those dead
// (not left: those go at once) for at least grace, never self, and never so
// many voters that the alive voters would stop being a quorum of the
// configuration that remains (raft-autopilot's rule). Nonvoters go first,
// then voters in name order.
func DeadServers(servers []RaftServer, self string, health map[string]string, downSince map[string]time.Time, now time.Time, grace time.Duration) []string {
	voters, aliveVoters := 0, 0
	var deadVoters, deadNonvoters []string
	for _, s := range servers {
		if s.Voter {
			voters++
			if health[s.ID] == HealthAlive {
				aliveVoters++
			}
		}
		since, ok := downSince[s.ID]
		if s.ID == self || health[s.ID] != HealthDead || !ok || now.Sub(since) < grace {
			continue
		}
		if s.Voter {
			deadVoters = append(deadVoters, s.ID)
		} else {
			deadNonvoters = append(deadNonvoters, s.ID)
		}
	}
	sort.Strings(deadVoters)
	sort.Strings(deadNonvoters)
	out := deadNonvoters
	for _, id := range deadVoters {
		if aliveVoters < (voters-1)/2+1 {
			break
		}
		voters--
		out = append(out, id)
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
