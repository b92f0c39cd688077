package agent

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/tether-io/tether/cluster"
	"github.com/tether-io/tether/replication"
)

// progressInterval is how often replica acknowledgements are written to the
// catalog. The failover choice reads them, so a shorter interval gives it a
// fresher view at the price of more Raft writes.
const progressInterval = 500 * time.Millisecond

// progressReporter collects the newest durable ack per (volume, replica)
// and writes them to the catalog in the background, so that a replication
// sender never waits on Raft.
type progressReporter struct {
	c   *cluster.Cluster
	log *slog.Logger

	// heads reports, per volume this node is primary of, its newest batch
	// (the head a replica's progress is measured against).
	heads func() map[string]replication.Ack
	self  string

	mu       sync.Mutex
	pending  map[progressKey]replication.Ack
	lastHead map[string]replication.Ack // only the run goroutine touches it
}

type progressKey struct{ volume, node string }

func newProgressReporter(c *cluster.Cluster, log *slog.Logger, self string, heads func() map[string]replication.Ack) *progressReporter {
	return &progressReporter{c: c, log: log, self: self, heads: heads,
		pending: map[progressKey]replication.Ack{}, lastHead: map[string]replication.Ack{}}
}

func (r *progressReporter) record(volume, node string, ack replication.Ack) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.pending[progressKey{volume, node}] = ack
}

func (r *progressReporter) run(ctx context.Context) {
	t := time.NewTicker(progressInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			r.recordHeads()
			r.flush(ctx)
		}
	}
}

// recordHeads queues the primary's own progress when it cut a new batch.
// Its cut time is when this reporter saw the batch, so it may lag the real
// cut by up to progressInterval; failover's max-lag check tolerates that.
func (r *progressReporter) recordHeads() {
	for vol, head := range r.heads() {
		last := r.lastHead[vol]
		if head.Epoch != last.Epoch || head.Seq > last.Seq {
			r.lastHead[vol] = head
			r.record(vol, r.self, head)
		}
	}
}

func (r *progressReporter) flush(ctx context.Context) {
	r.mu.Lock()
	batch := r.pending
	r.pending = map[progressKey]replication.Ack{}
	r.mu.Unlock()
	for k, ack := range batch {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		err := r.c.ReportProgress(cctx, k.volume, k.node, ack.Epoch, ack.Seq, ack.Cut)
		cancel()
		if err != nil && ctx.Err() == nil {
			r.log.Debug("recording replica progress", "volume", k.volume, "replica", k.node, "err", err)
			r.mu.Lock()
			if _, newer := r.pending[k]; !newer {
				r.pending[k] = ack
			}
			r.mu.Unlock()
		}
	}
}
