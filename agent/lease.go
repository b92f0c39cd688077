package agent

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/tether-io/tether/cluster"
)

// leaseKeeper renews this node's primary lease with the leader and tells
// the reconcile loop when the lease is won or lost. A node may serve a
// volume as primary only while it holds the lease; one that cannot reach a
// quorum for longer than the lease fences itself (see cluster/lease.go for
// why the leader will not promote another node before then).
type leaseKeeper struct {
	c       *cluster.Cluster
	log     *slog.Logger
	changed chan struct{} // signalled (coalesced) when validity flips

	mu       sync.Mutex
	lastOK   time.Time // when the last successful renewal was *sent*
	validTil time.Time
	index    uint64 // the leader's catalog index at the last grant
	lastErr  error
}

func newLeaseKeeper(c *cluster.Cluster, log *slog.Logger) *leaseKeeper {
	return &leaseKeeper{c: c, log: log, changed: make(chan struct{}, 1)}
}

// valid reports whether the lease is held now.
func (k *leaseKeeper) valid() bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return time.Now().Before(k.validTil)
}

// caughtUp reports whether this node's catalog has applied what the leader
// had applied at the last grant. A node must not *start* serving a volume
// before that: back from a partition, its stale catalog may still name it
// primary of a volume that moved on. (A primary that kept its lease all
// along cannot have been moved: the leader waits the lease out first.)
func (k *leaseKeeper) caughtUp() bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.c.AppliedIndex() >= k.index
}

// age is how long ago the lease was last confirmed (0 if never).
func (k *leaseKeeper) age() time.Duration {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.lastOK.IsZero() {
		return 0
	}
	return time.Since(k.lastOK)
}

func (k *leaseKeeper) run(ctx context.Context) {
	interval := k.c.LeaseRenewInterval()
	tick := time.NewTicker(interval)
	defer tick.Stop()
	expiry := time.NewTimer(time.Hour)
	defer expiry.Stop()
	for {
		if k.renew(ctx, interval) {
			// Wake exactly when the new lease would lapse.
			k.mu.Lock()
			expiry.Reset(time.Until(k.validTil) + time.Millisecond)
			k.mu.Unlock()
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		case <-expiry.C:
			if !k.valid() {
				k.log.Warn("primary lease lapsed: no leader confirmed this node's ownership in time", "lease", k.c.LeaseDuration(), "last_error", k.lastError())
				signal(k.changed)
			}
		}
	}
}

// renew asks for the lease once and reports whether it was granted.
func (k *leaseKeeper) renew(ctx context.Context, interval time.Duration) bool {
	sent := time.Now()
	rctx, cancel := context.WithTimeout(ctx, 2*interval)
	index, err := k.c.RenewLease(rctx)
	cancel()
	k.mu.Lock()
	wasValid := time.Now().Before(k.validTil)
	if err == nil {
		k.lastOK = sent
		k.validTil = sent.Add(k.c.LeaseDuration())
		k.index = index
	}
	k.lastErr = err
	k.mu.Unlock()
	if err == nil && !wasValid {
		k.log.Info("primary lease held")
		signal(k.changed)
	}
	return err == nil
}

func (k *leaseKeeper) lastError() error {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.lastErr
}

// signal sends on ch without blocking; signals coalesce.
func signal(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}
