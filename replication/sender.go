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

	"google.golang.org/grpc"
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

// sender streams the primary's cuts to one replica, in order, each once
// the previous one is acknowledged.
type sender struct {
	p      *Primary
	node   string
	log    *slog.Logger
	cancel context.CancelFunc

	mu        sync.Mutex
	next      uint64    // next cut to send; 0: the first full cut after fullAfter
	fullAfter uint64    // see next
	fullSince time.Time // when the replica was found to need a full cut
	acked     Ack
	connected bool
	lastSeen  time.Time // when it was last connected (or created)
	err       string
	fullSent  int  // full batches sent (tests)
	refused   bool // the replica refused a batch: it needs the whole tree, every file whole
	refusals  int  // batches the replica refused (tests)
	// continues is set when the replica takes batches continued over later
	// cuts (its first ack says so).
	continues bool
	continued bool // the batch being sent was continued (a refusal of it is no divergence)
	// syncDone and syncTotal: progress of the whole tree being sent (see
	// ReplicaState.FullSyncDone); syncTotal is 0 when none is.
	syncDone, syncTotal int64
}

func newSender(p *Primary, node string, cancel context.CancelFunc) *sender {
	// Until it connects, a sender needs no cut older than the next full one.
	now := time.Now()
	return &sender{p: p, node: node, log: p.log.With("replica", node), cancel: cancel, fullSince: now,
		lastSeen: now, fullAfter: p.latestSeq()}
}

// hold says which cuts this sender still needs and how firmly (see
// replicaHold).
func (s *sender) hold(now time.Time, age time.Duration) replicaHold {
	s.mu.Lock()
	defer s.mu.Unlock()
	h := replicaHold{node: s.node, need: s.next, active: s.connected, held: now.Sub(s.lastSeen) < age}
	if s.next == 0 {
		h.need, h.full = s.fullAfter, true
	}
	return h
}

// connectedNext returns the next cut of a connected sender.
func (s *sender) connectedNext() (uint64, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.next, s.connected && s.next != 0
}

// state reports the sender's view of its replica.
func (s *sender) state(now time.Time) ReplicaState {
	s.mu.Lock()
	st := ReplicaState{Node: s.node, Connected: s.connected, AckedSeq: s.acked.Seq, AckedCut: s.acked.Cut, Err: s.err,
		FullSyncDone: s.syncDone, FullSyncTotal: s.syncTotal}
	next, after, full := s.next, s.fullAfter, time.Time{}
	if next == 0 {
		full = s.fullSince
	}
	s.mu.Unlock()
	_, pending := s.p.ch.pending()
	since, bytes, cuts := s.p.backlog(next, after)
	st.LagBytes, st.PendingCuts = bytes, cuts
	if o := oldest(pending, full, since); !o.IsZero() {
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
		if c := status.Code(err); c == codes.DataLoss || c == codes.InvalidArgument {
			// DataLoss: its copy is not the cut the batch builds on.
			// InvalidArgument: it refused the batch. Either way the next
			// batch is the whole tree, every file whole (no deltas, no
			// renames: nothing that depends on what the replica holds).
			s.mu.Lock()
			continued := s.continued
			s.refusals++
			if continued {
				// A continued batch builds on what its streamed files
				// read, which another sender's index update can
				// contradict: no divergence, but the next full cut is
				// read into the spool, to be committed whole.
				s.p.noStream.Store(true)
			} else {
				s.refused = true
			}
			s.mu.Unlock()
			if continued {
				s.log.Warn("the replica refused a continued batch; sending it a new full cut", "err", err)
			} else {
				s.log.Warn("the replica refused a batch; sending it the whole tree", "err", err)
			}
		}
		if status.Code(err) == codes.FailedPrecondition {
			wait = retryStale
			s.log.Warn("replica refused this primary; retrying slowly", "err", err)
		} else {
			s.log.Info("replication stream to replica failed; retrying", "err", err, "in", wait)
			delay = min(2*delay, retryMax)
		}
		if !sleepCtx(ctx, wait/2+rand.N(wait/2+1)) {
			return
		}
	}
}

// disconnected records the end of a session.
func (s *sender) disconnected(err error, stopping bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.connected {
		s.lastSeen = time.Now()
	}
	s.connected = false
	s.syncDone, s.syncTotal = 0, 0
	if err != nil && !stopping {
		s.err = err.Error()
	}
}

// connectedAt records the replica's position reported after Hello and
// decides where it continues: after that position, or at a full cut.
func (s *sender) connectedAt(a *tetherpb.StreamAck) {
	epoch := s.p.cfg.Epoch
	if a.GetEpoch() == epoch {
		s.p.observeSeq(a.GetSeq())
	}
	next := s.p.resumeFrom(a.GetEpoch(), a.GetSeq())
	s.mu.Lock()
	s.connected, s.err, s.lastSeen = true, "", time.Now()
	s.continues = a.GetContinues()
	if a.GetEpoch() == epoch {
		s.acked = Ack{Epoch: epoch, Seq: a.GetSeq(), Cut: cutTime(a.GetCutUnixNano())}
	}
	if next == 0 || s.refused {
		next = 0
		s.needFullLocked()
	} else {
		s.next = next
	}
	s.mu.Unlock()
	if next == 0 {
		s.requestFull()
	}
}

// requestFull asks for a full cut unless one is being read (it will do:
// its number is above the fullAfter just set) or one the sender can take
// is already kept.
func (s *sender) requestFull() {
	if s.p.cuttingFull.Load() {
		return
	}
	s.mu.Lock()
	after := s.fullAfter
	s.mu.Unlock()
	if b, _, _ := s.p.batchFor(0, after); b == nil {
		s.p.ch.requireFullForReplica()
	}
}

// needFullLocked makes the sender wait for a full cut: the next one, or
// when it was already waiting for one, any full cut after the point it
// started waiting (a full cut suits a replica in any state).
func (s *sender) needFullLocked() {
	if s.next != 0 || s.fullSince.IsZero() {
		s.fullSince = time.Now()
		s.fullAfter = s.p.latestSeq()
	}
	s.next = 0
}

// syncProgress records how much of the whole tree is sent (total 0: none
// is being sent).
func (s *sender) syncProgress(done, total int64) {
	s.mu.Lock()
	s.syncDone, s.syncTotal = done, total
	s.mu.Unlock()
}

// ackedBatch records a durable cut.
func (s *sender) ackedBatch(a *tetherpb.StreamAck) Ack {
	ack := Ack{Epoch: a.GetEpoch(), Seq: a.GetSeq(), Cut: cutTime(a.GetCutUnixNano())}
	s.mu.Lock()
	s.acked, s.next, s.fullSince, s.refused = ack, ack.Seq+1, time.Time{}, false
	s.mu.Unlock()
	s.p.acked()
	return ack
}

// session runs one stream: Hello, the replica's position, then cuts.
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
	return true, s.stream(ctx, client, stream, in)
}

// open opens the stream, says Hello and records the replica's answer.
func (s *sender) open(ctx context.Context, client tetherpb.ReplicationClient) (tetherpb.Replication_StreamClient, error) {
	stream, err := client.Stream(ctx, grpc.ForceCodecV2(wireCodec{loans: s.p.chunks}))
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

// continueExtra bounds the cuts a continued batch takes past the stream
// while the last one left out files it could not read whole.
const continueExtra = 16

// continueBatch extends batch b, whose streamed files changed while they
// were read (the volume's event count was stale by the barrier after the
// stream), with the cuts that follow it, up to the first that carries every
// change counted by then: each cut's ops after a Continue, so that the
// replica commits the torn copy and what repairs it as one batch, in the
// state of the last cut (DESIGN.md, "Streamed files"). It returns that cut,
// or an error wrapping errStreamChanged when a cut it needs is no longer
// kept or is a full one (the replica then gets a new full cut).
func (s *sender) continueBatch(ctx context.Context, b *cutBatch, stale uint64, send sendFunc, in *ackReader) (*cutBatch, error) {
	last, extra := b, 0
	for last.gen < stale || last.excluded > 0 {
		if last.gen >= stale {
			// The last cut left out a file it could not read whole, which
			// may be one the stream read torn: the next cut reads it.
			if extra == continueExtra {
				s.log.Warn("the cuts that continue a streamed batch kept leaving out files that changed while read; committing it as is",
					"seq", b.seq, "continued_to", last.seq)
				break
			}
			extra++
		}
		seq := last.seq + 1
		next, changed, err := s.p.batchFor(seq, 0)
		if errors.Is(err, errCutGone) || next != nil && next.full {
			return nil, fmt.Errorf("continue batch %d with cut %d: %w", b.seq, seq, errStreamChanged)
		}
		if next == nil {
			select {
			case <-ctx.Done():
				return nil, ctx.Err()
			case <-changed:
			case a := <-in.acks:
				return nil, fmt.Errorf("replica %s sent an unexpected ack for seq %d", s.node, a.GetSeq())
			case err := <-in.errc:
				return nil, fmt.Errorf("replica %s ended the stream: %w", s.node, err)
			}
			continue
		}
		if err := send(&tetherpb.StreamRequest{Kind: &tetherpb.StreamRequest_Continue{Continue: &tetherpb.Continue{Seq: seq}}}); err != nil {
			return nil, err
		}
		if _, err := next.send(ctx, s.p, send, false, nil, nil); err != nil {
			return nil, err
		}
		last = next
	}
	return last, nil
}

// nextBatch waits for the cut this replica needs next; full reports that
// the replica needs the whole tree.
func (s *sender) nextBatch(ctx context.Context, in *ackReader) (b *cutBatch, full bool, err error) {
	for {
		s.mu.Lock()
		next, after := s.next, s.fullAfter
		s.mu.Unlock()
		b, changed, err := s.p.batchFor(next, after)
		if errors.Is(err, errCutGone) {
			s.log.Info("the replica is further behind than the cuts kept; sending it the whole tree")
			s.mu.Lock()
			s.needFullLocked()
			s.mu.Unlock()
			s.requestFull()
			continue
		}
		if b != nil {
			return b, next == 0, nil
		}
		select {
		case <-ctx.Done():
			return nil, false, ctx.Err()
		case <-changed:
		case a := <-in.acks:
			return nil, false, fmt.Errorf("replica %s sent an unexpected ack for seq %d", s.node, a.GetSeq())
		case err := <-in.errc:
			return nil, false, fmt.Errorf("replica %s ended the stream: %w", s.node, err)
		}
	}
}

// stream sends cuts as they are taken, one at a time, each awaiting its
// ack.
func (s *sender) stream(ctx context.Context, client tetherpb.ReplicationClient, stream tetherpb.Replication_StreamClient, in *ackReader) error {
	throttledSend := throttled(ctx, s.p.cfg.Limiter, stream.Send)
	for {
		s.syncProgress(0, 0)
		s.mu.Lock()
		s.continued = false
		s.mu.Unlock()
		b, full, err := s.nextBatch(ctx, in)
		if err != nil {
			return err
		}
		var progress func(int64)
		if b.full && (full || b.delta == nil) {
			s.mu.Lock()
			s.fullSent++
			s.mu.Unlock()
			total, done := itemBytes(b.items), int64(0)
			s.syncProgress(0, total)
			progress = func(n int64) {
				done += n
				s.syncProgress(done, total)
			}
		}
		s.mu.Lock()
		refused := s.refused
		s.mu.Unlock()
		send, filter := throttledSend, (*sumsFilter)(nil)
		var sums map[string]*tetherpb.FileSums
		if b.full && (full || b.delta == nil) && !refused {
			// The replica may hold files already: send what it lacks.
			if sums = s.blockSums(ctx, client, b); len(sums) > 0 {
				filter = &sumsFilter{next: send, sums: sums, sp: b.sp}
				send = filter.send
			}
		}
		full, err = b.send(ctx, s.p, send, full, sums, progress)
		if filter != nil {
			filter.close()
		}
		last := b
		if changed := (*streamChangedError)(nil); errors.As(err, &changed) {
			s.mu.Lock()
			continues := s.continues
			s.continued = continues
			s.mu.Unlock()
			err = errStreamChanged
			if continues {
				if last, err = s.continueBatch(ctx, b, changed.gen, throttledSend, in); err == nil {
					err = changed.st.index(s.p)
				}
			}
		}
		if errors.Is(err, errStreamChanged) {
			// Ending the stream drops what the replica staged; the batch
			// is broken, so the replica gets a new (spooled) full cut.
			b.broken.Store(true)
			s.p.noStream.Store(true)
			s.p.brokenStreams.Add(1)
			s.log.Info("the volume changed while a cut's large files were streamed; the replica gets a new cut", "seq", b.seq, "err", err)
			return fmt.Errorf("send batch %d to %s: %w", b.seq, s.node, err)
		}
		if err == nil {
			err = last.commit(throttledSend, full)
		}
		if err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("send batch %d to %s: %w", b.seq, s.node, err)
		} // on io.EOF the replica ended the stream; its status says why
		if last != b {
			s.p.continuedStreams.Add(1)
			s.log.Info("the volume changed while a cut's large files were streamed; the batch was continued with the cuts that carry those changes",
				"seq", b.seq, "continued_to", last.seq)
		}
		b = last
		s.log.Debug("batch sent", "seq", b.seq, "full", b.full, "items", len(b.items))
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
