package cluster

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"
)

// Primary leases.
//
// A primary may serve a volume only while it holds a lease: the leader
// confirmed, with a quorum (raft VerifyLeader), no longer than
// LeaseDuration ago that it is still the leader, at the primary's request.
// The primary measures that duration from when it *sent* the request, the
// leader from when it *answered*, so the primary's lease always ends first.
// The leader promotes away from a primary only once LeaseDuration +
// LeaseMargin have passed since its last grant to it; a leader that has
// just been elected does not know the old leader's grants, so it also
// waits that long from the start of its own term. Only durations are
// compared, never clock readings of two machines.

// heardFrom returns the nodes the leader granted a lease within window
// before now: those it has reached lately (every node renews every
// LeaseRenewInterval).
func (t *leaseTable) heardFrom(window time.Duration, now time.Time) map[string]bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make(map[string]bool, len(t.grants))
	for n, g := range t.grants {
		if now.Sub(g) <= window {
			out[n] = true
		}
	}
	return out
}

// leaseTable is the leader's memory of the grants it made this term.
type leaseTable struct {
	mu          sync.Mutex
	grants      map[string]time.Time
	leaderSince time.Time
}

func newLeaseTable() *leaseTable { return &leaseTable{grants: map[string]time.Time{}} }

// startTerm forgets the grants of an earlier term.
func (t *leaseTable) startTerm(now time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.grants = map[string]time.Time{}
	t.leaderSince = now
}

func (t *leaseTable) grant(node string, now time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.grants[node] = now
}

// expiries returns, per node, the time before which that node may still
// hold a lease; nodes without a grant this term get the term's start plus
// the lease, as a grant of the previous leader may still run.
func (t *leaseTable) expiries(nodes []string, lease time.Duration) map[string]time.Time {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make(map[string]time.Time, len(nodes))
	for _, n := range nodes {
		last := t.leaderSince
		if g, ok := t.grants[n]; ok && g.After(last) {
			last = g
		}
		out[n] = last.Add(lease)
	}
	return out
}

// RenewLease asks the leader (this node or, forwarded, another) to grant
// this node a primary lease. On success the caller holds it for
// LeaseDuration from when it called, but may act on its catalog only once
// it has applied index (the leader's catalog at the grant): a node that was
// cut off must not serve a volume its stale catalog still gives it.
func (c *Cluster) RenewLease(ctx context.Context) (index uint64, err error) {
	if !c.ready.Load() {
		return 0, fmt.Errorf("%w: not started", ErrShutdown)
	}
	if c.IsLeader() {
		return c.GrantLease(ctx, c.cfg.NodeName)
	}
	name, addr := c.Leader()
	if addr == "" || name == c.cfg.NodeName {
		return 0, ErrNoLeader
	}
	if c.cfg.ForwardLease == nil {
		return 0, fmt.Errorf("%w: %s leads and this node has no way to ask it for a lease", ErrNotLeader, name)
	}
	return c.cfg.ForwardLease(ctx, addr, c.cfg.NodeName)
}

// AppliedIndex is the Raft index of the last catalog entry applied here.
func (c *Cluster) AppliedIndex() uint64 { return c.fsm.appliedIndex() }

// GrantLease is the leader's side of RenewLease: it confirms leadership
// with a quorum, records the grant and returns its applied catalog index.
func (c *Cluster) GrantLease(ctx context.Context, node string) (uint64, error) {
	if !c.ready.Load() {
		return 0, fmt.Errorf("%w: not started", ErrShutdown)
	}
	if !c.IsLeader() {
		return 0, ErrNotLeader
	}
	// VerifyLeader resolves within the Raft leader lease: either a quorum
	// answered or this node stepped down.
	index := c.fsm.appliedIndex()
	if err := c.raft.VerifyLeader().Error(); err != nil {
		return 0, fmt.Errorf("%w: could not confirm leadership with a quorum: %w", ErrNotLeader, err)
	}
	if err := ctx.Err(); err != nil {
		return 0, fmt.Errorf("cluster: confirming leadership for a lease: %w", err)
	}
	c.leases.grant(node, time.Now())
	return index, nil
}

// LeaseDuration is the configured primary lease.
func (c *Cluster) LeaseDuration() time.Duration { return c.timing.LeaseDuration }

// LeaseRenewInterval is how often primaries should renew.
func (c *Cluster) LeaseRenewInterval() time.Duration { return c.timing.LeaseRenewInterval }

// IsLeaseError reports whether err means "no leader could grant a lease
// now" rather than a broken request.
func IsLeaseError(err error) bool {
	return errors.Is(err, ErrNotLeader) || errors.Is(err, ErrNoLeader)
}
