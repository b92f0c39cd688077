package replication

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tether-io/tether/proto/tetherpb"
)

// Retry delays of a sender.
const (
	retryMin   = 50 * time.Millisecond
	retryMax   = time.Second
	retryStale = 2 * time.Second // after a refusal for a stale epoch
)

// sender streams batches to one replica.
type sender struct {
	p      *Primary
	node   string
	log    *slog.Logger
	cancel context.CancelFunc
	wake   chan struct{}

	mu        sync.Mutex
	pending   dirtySet  // changes not yet in a batch
	needFull  bool      // the replica's state is unknown: send the whole tree
	fullSince time.Time // when needFull was set
	inflight  *outBatch // sent, not yet acknowledged
	lostSeq   uint64    // seq of the last batch whose ack was lost
	acked     Ack
	connected bool
	err       string
}

// outBatch is a batch sent to a replica and not yet acknowledged.
type outBatch struct {
	seq   uint64
	full  bool
	cut   time.Time
	dirty dirtySet
	since time.Time // oldest change it carries
}

func newSender(p *Primary, node string, cancel context.CancelFunc) *sender {
	return &sender{p: p, node: node, log: p.log.With("replica", node), cancel: cancel,
		wake: make(chan struct{}, 1), needFull: true, fullSince: time.Now()}
}

// addDirty merges changes into the pending set and wakes the sender.
func (s *sender) addDirty(d dirtySet) {
	s.mu.Lock()
	s.pending.merge(d)
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// requireFull makes the next batch carry the whole tree.
func (s *sender) requireFull() {
	s.mu.Lock()
	if !s.needFull {
		s.needFull, s.fullSince = true, time.Now()
	}
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// state reports the sender's view of its replica.
func (s *sender) state(now time.Time) ReplicaState {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := ReplicaState{Node: s.node, Connected: s.connected, AckedSeq: s.acked.Seq, AckedCut: s.acked.Cut, Err: s.err}
	var full time.Time
	if s.needFull {
		full = s.fullSince
	}
	var inflight time.Time
	if s.inflight != nil {
		inflight = s.inflight.since
	}
	if o := oldest(s.pending.since, full, inflight); !o.IsZero() {
		st.Lag = now.Sub(o)
	}
	return st
}

// run connects and streams until ctx ends, retrying with backoff.
func (s *sender) run(ctx context.Context) {
	delay := retryMin
	for {
		progressed, err := s.session(ctx)
		s.disconnected(err, ctx.Err() != nil)
		if ctx.Err() != nil {
			return
		}
		if progressed {
			delay = retryMin
		}
		wait := delay
		if status.Code(err) == codes.FailedPrecondition {
			wait = retryStale
			s.log.Warn("replica refused this primary; retrying slowly", "err", err)
		} else {
			s.log.Info("replication stream to replica failed; retrying", "err", err, "in", wait)
			delay = min(2*delay, retryMax)
		}
		t := time.NewTimer(wait/2 + rand.N(wait/2+1))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// disconnected records the end of a session and puts the batch that was in
// flight back into the pending changes.
func (s *sender) disconnected(err error, stopping bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.connected = false
	if err != nil && !stopping {
		s.err = err.Error()
	}
	b := s.inflight
	if b == nil {
		return
	}
	s.inflight = nil
	s.lostSeq = b.seq
	if b.full {
		s.needFull = true
		s.fullSince = oldest(s.fullSince, b.since)
		return
	}
	b.dirty.since = b.since
	s.pending.merge(b.dirty)
}

// connected records the replica's position reported after Hello and decides
// whether it needs the whole tree.
func (s *sender) connectedAt(a *tetherpb.StreamAck) {
	epoch := s.p.cfg.Epoch
	if a.GetEpoch() == epoch {
		s.p.observeSeq(a.GetSeq())
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.connected, s.err = true, ""
	if !positionKnown(a.GetEpoch(), a.GetSeq(), epoch, s.acked.Seq, s.lostSeq) && !s.needFull {
		s.needFull, s.fullSince = true, oldest(s.pending.since, time.Now())
	}
	if a.GetEpoch() == epoch {
		s.acked = Ack{Epoch: epoch, Seq: a.GetSeq(), Cut: cutTime(a.GetCutUnixNano())}
	}
}

// positionKnown reports whether a replica's reported position (epoch, seq)
// is one this sender knows the replica's tree for: the last acknowledged
// batch of this epoch, or the batch whose ack was lost (its paths were put
// back into the pending changes). Otherwise the replica needs the whole tree.
func positionKnown(epoch, seq, ourEpoch, ackedSeq, lostSeq uint64) bool {
	return epoch == ourEpoch && seq != 0 && (seq == ackedSeq || seq == lostSeq)
}

// next takes the next batch to send, nil when there is nothing to send.
func (s *sender) next() *outBatch {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.needFull && s.pending.empty() {
		return nil
	}
	b := &outBatch{seq: s.p.nextSeq(), full: s.needFull, cut: time.Now()}
	d := s.pending.take()
	b.dirty = d
	b.since = d.since
	if s.needFull {
		b.since = oldest(b.since, s.fullSince)
		b.dirty = dirtySet{}
		s.needFull, s.fullSince = false, time.Time{}
	}
	s.inflight = b
	return b
}

// ackedBatch records a durable batch.
func (s *sender) ackedBatch(a *tetherpb.StreamAck) Ack {
	ack := Ack{Epoch: a.GetEpoch(), Seq: a.GetSeq(), Cut: cutTime(a.GetCutUnixNano())}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.acked = ack
	s.inflight = nil
	return ack
}

// session runs one stream: Hello, the replica's position, then batches.
// progressed reports whether the replica accepted the stream.
func (s *sender) session(ctx context.Context) (progressed bool, err error) {
	client, err := s.p.cfg.Dial(ctx, s.node)
	if err != nil {
		return false, fmt.Errorf("connect to replica %s: %w", s.node, err)
	}
	sctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() {
		cancel()
		wg.Wait()
	}()
	stream, err := s.open(sctx, client)
	if err != nil {
		return false, err
	}
	in := &ackReader{acks: make(chan *tetherpb.StreamAck), errc: make(chan error, 1)}
	wg.Add(1)
	go func() {
		defer wg.Done()
		in.run(sctx, stream)
	}()
	return true, s.stream(ctx, stream, in)
}

// open opens the stream, says Hello and records the replica's answer.
func (s *sender) open(ctx context.Context, client tetherpb.ReplicationClient) (tetherpb.Replication_StreamClient, error) {
	stream, err := client.Stream(ctx)
	if err != nil {
		return nil, fmt.Errorf("open replication stream to %s: %w", s.node, err)
	}
	hello := &tetherpb.Hello{Volume: s.p.cfg.Volume, Epoch: s.p.cfg.Epoch, PrimaryNode: s.p.cfg.Node}
	if err := stream.Send(&tetherpb.StreamRequest{Kind: &tetherpb.StreamRequest_Hello{Hello: hello}}); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("replication stream to %s: %w", s.node, err)
	}
	first, err := stream.Recv() // after io.EOF on Send, Recv tells why
	if err != nil {
		return nil, fmt.Errorf("replica %s refused the stream: %w", s.node, err)
	}
	s.connectedAt(first)
	s.log.Info("streaming to replica", "replica_epoch", first.GetEpoch(), "replica_seq", first.GetSeq())
	return stream, nil
}

// ackReader receives a stream's acks so that the sender can wait for them
// together with new work.
type ackReader struct {
	acks chan *tetherpb.StreamAck
	errc chan error
}

func (r *ackReader) run(ctx context.Context, stream tetherpb.Replication_StreamClient) {
	for {
		a, err := stream.Recv()
		if err != nil {
			r.errc <- err
			return
		}
		select {
		case r.acks <- a:
		case <-ctx.Done():
			return
		}
	}
}

// stream sends batches as work arrives, one at a time, each awaiting its
// ack.
func (s *sender) stream(ctx context.Context, stream tetherpb.Replication_StreamClient, in *ackReader) error {
	for {
		b := s.next()
		if b == nil {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-s.wake:
				continue
			case a := <-in.acks:
				return fmt.Errorf("replica %s sent an unexpected ack for seq %d", s.node, a.GetSeq())
			case err := <-in.errc:
				return fmt.Errorf("replica %s ended the stream: %w", s.node, err)
			}
		}
		if err := s.sendBatch(stream, b); err != nil {
			if !errors.Is(err, io.EOF) {
				return err
			}
			// The replica ended the stream; its status says why.
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case err := <-in.errc:
			return fmt.Errorf("replica %s failed batch %d: %w", s.node, b.seq, err)
		case a := <-in.acks:
			if a.GetEpoch() != s.p.cfg.Epoch || a.GetSeq() != b.seq {
				return fmt.Errorf("replica %s acknowledged epoch %d seq %d, expected epoch %d seq %d",
					s.node, a.GetEpoch(), a.GetSeq(), s.p.cfg.Epoch, b.seq)
			}
			ack := s.ackedBatch(a)
			if s.p.cfg.OnAck != nil {
				s.p.cfg.OnAck(s.node, ack)
			}
		}
	}
}

// sendBatch reads the batch's paths (or the whole tree) and streams them.
func (s *sender) sendBatch(stream tetherpb.Replication_StreamClient, b *outBatch) error {
	var p *plan
	var err error
	if b.full {
		p, err = fullPlan(s.p.root)
	} else {
		p, err = dirtyPlan(s.p.root, b.dirty.paths)
	}
	if err != nil {
		return fmt.Errorf("read batch %d from the volume: %w", b.seq, err)
	}
	for _, rel := range p.skipped {
		s.p.warn.warn("skip:"+rel, "not replicating a device or socket", "path", rel)
	}
	if err := sendBatch(s.p.root, stream.Send, p, b.seq, b.cut, b.full, s.p.warn); err != nil {
		return fmt.Errorf("send batch %d to %s: %w", b.seq, s.node, err)
	}
	s.log.Debug("batch sent", "seq", b.seq, "full", b.full, "deletes", len(p.deletes), "dirs", len(p.dirs), "files", len(p.others))
	return nil
}
