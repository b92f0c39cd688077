package replication

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tether-io/tether/proto/tetherpb"
)

// ServerConfig configures the replica side.
type ServerConfig struct {
	// Resolve locates a volume this node holds a copy of; it fails when the
	// node does not hold the volume and creates directories as needed.
	Resolve func(volume string) (Paths, error)
	Logger  *slog.Logger
	// QuarantineDir, if set, holds the quarantines of every volume
	// (QuarantineDir/quarantine/VOLUME/epoch-E-TIME); by default each
	// volume's Paths.State does. It must be on the volumes' file system.
	QuarantineDir string
}

// Server is the replica side of replication: it receives the batches of
// volumes this node holds replicas of and applies them.
type Server struct {
	tetherpb.UnimplementedReplicationServer

	cfg  ServerConfig
	log  *slog.Logger
	warn *onceLogger

	ctx    context.Context
	cancel context.CancelFunc

	mu      sync.Mutex
	closed  bool
	volumes map[string]*replicaVolume
	wg      sync.WaitGroup
	recv    *recvPool // buffers the codec receives chunk data into (ServerOptions)

	fail failpoint // tests only (setFailpoint): stops a commit at a step, as a crash would
	// sumsHook, in tests only, is called before BlockSums hashes each path.
	sumsHook func(rel string)
	// noContinue, in tests only, makes the first ack of a stream not offer
	// continued batches, as a replica of an earlier version.
	noContinue bool
}

// offerContinue sets whether streams offer continued batches (tests only:
// false acts as a replica of an earlier version).
func (s *Server) offerContinue(on bool) {
	s.mu.Lock()
	s.noContinue = !on
	s.mu.Unlock()
}

// setFailpoint installs a failpoint (tests only).
func (s *Server) setFailpoint(f failpoint) {
	s.mu.Lock()
	s.fail = f
	s.mu.Unlock()
}

// replicaVolume serializes the streams, fences and batch applications of one
// volume on a replica.
type replicaVolume struct {
	mu     sync.Mutex
	active *inbound
	bases  *baseCache
	// journal is what this process knows of the volume's journal.
	journal journalState
}

// inbound is one primary's stream into a replica.
type inbound struct {
	epoch   uint64
	primary string
	cancel  context.CancelCauseFunc
	done    chan struct{}
}

// Causes for cutting a stream off.
var (
	errServerClosing = errors.New("replica is shutting down")
	errSuperseded    = errors.New("superseded by a newer stream for the same volume")
)

// fencedError cuts off a stream whose epoch a Fence made stale.
type fencedError struct{ epoch, newest uint64 }

func (e fencedError) Error() string {
	return fmt.Sprintf("stale epoch %d < newest seen %d", e.epoch, e.newest)
}

// NewServer returns a replica server; it starts nothing.
func NewServer(cfg ServerConfig) *Server {
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	ctx, cancel := context.WithCancel(context.Background())
	log = log.With("component", "replication-server")
	return &Server{cfg: cfg, log: log, warn: newOnceLogger(log), ctx: ctx, cancel: cancel,
		volumes: map[string]*replicaVolume{}, recv: &recvPool{}}
}

// Register adds the Replication service to g.
func (s *Server) Register(g *grpc.Server) {
	tetherpb.RegisterReplicationServer(g, s)
}

// Close ends active streams and waits for them.
func (s *Server) Close() {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	s.cancel()
	s.wg.Wait()
}

// volume returns the in-memory record of a volume.
func (s *Server) volume(name string) *replicaVolume {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, ok := s.volumes[name]
	if !ok {
		v = &replicaVolume{bases: newBaseCache()}
		s.volumes[name] = v
	}
	return v
}

// Fence raises the minimum epoch this replica accepts for volume (durably)
// and cuts off an active stream of an older epoch. It is called when this
// node becomes the volume's primary. It locates the volume with Resolve; see
// FencePaths when Resolve refuses volumes this node is primary of.
func (s *Server) Fence(volume string, epoch uint64) error {
	paths, err := s.cfg.Resolve(volume)
	if err != nil {
		return fmt.Errorf("fence volume %s: %w", volume, err)
	}
	return s.FencePaths(volume, paths, epoch)
}

// FencePaths is Fence for a volume whose directories the caller gives.
func (s *Server) FencePaths(volume string, paths Paths, epoch uint64) error {
	v := s.volume(volume)
	v.mu.Lock()
	defer v.mu.Unlock()
	newest, err := readEpoch(paths.State)
	if err != nil {
		return fmt.Errorf("fence volume %s: %w", volume, err)
	}
	// The last replicated batch is finished and durable, and the journal
	// retired, before this node may serve the volume.
	if err := s.journal(v, paths).retire(s.log.With("volume", volume)); err != nil {
		return fmt.Errorf("fence volume %s: finish the last replicated batch: %w", volume, err)
	}
	if epoch > newest {
		if err := writeEpoch(paths.State, epoch); err != nil {
			return fmt.Errorf("fence volume %s at epoch %d: %w", volume, epoch, err)
		}
		newest = epoch
	}
	// This node serves the volume in epoch: remember it, so that a stream
	// of a newer epoch first quarantines what this node wrote.
	if was, err := readPrimaryEpoch(paths.State); err != nil || was < epoch {
		if err := writeFileDurable(paths.State, primaryEpochFile, strconv.FormatUint(epoch, 10)+"\n"); err != nil {
			return fmt.Errorf("fence volume %s at epoch %d: %w", volume, epoch, err)
		}
	}
	if v.active != nil && v.active.epoch < newest {
		s.log.Info("cutting off stream of an older epoch", "volume", volume, "epoch", v.active.epoch,
			"primary", v.active.primary, "fence", newest)
		v.active.cancel(fencedError{epoch: v.active.epoch, newest: newest})
	}
	return nil
}

// Position returns the last batch durable on this replica for volume.
func (s *Server) Position(volume string) (epoch, seq uint64, cut time.Time, err error) {
	paths, err := s.cfg.Resolve(volume)
	if err != nil {
		return 0, 0, time.Time{}, fmt.Errorf("position of volume %s: %w", volume, err)
	}
	pos, err := durablePosition(paths.State)
	if err != nil {
		return 0, 0, time.Time{}, fmt.Errorf("position of volume %s: %w", volume, err)
	}
	return pos.Epoch, pos.Seq, pos.Cut, nil
}

// enter registers a running handler unless the server is closed.
func (s *Server) enter() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.wg.Add(1)
	return true
}

// Stream receives one primary's batches for one volume.
func (s *Server) Stream(stream tetherpb.Replication_StreamServer) error {
	if !s.enter() {
		return status.Error(codes.Unavailable, errServerClosing.Error())
	}
	defer s.wg.Done()
	ctx, cancel := context.WithCancelCause(stream.Context())
	defer cancel(nil)
	stop := context.AfterFunc(s.ctx, func() { cancel(errServerClosing) })
	defer stop()

	in := &receiver{ctx: ctx, msgs: make(chan *tetherpb.StreamRequest), errc: make(chan error, 1), pool: s.recv}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		in.run(stream)
	}()

	err := s.serve(ctx, cancel, stream, in)
	if errors.Is(err, io.EOF) {
		return nil // the primary closed its side
	}
	if err != nil && status.Code(err) != codes.Canceled {
		s.log.Warn("replication stream ended", "err", err)
	}
	return err
}

// receiver moves messages from a stream into a channel so that the handler
// can stop waiting when its context ends.
type receiver struct {
	ctx  context.Context
	msgs chan *tetherpb.StreamRequest
	errc chan error
	// pool takes back the data of the message next returned last once the
	// handler asks for the following one: the batch has staged it then.
	pool *recvPool
	held []byte
}

func (r *receiver) run(stream tetherpb.Replication_StreamServer) {
	for {
		m, err := stream.Recv()
		if err != nil {
			r.errc <- err
			return
		}
		select {
		case r.msgs <- m:
		case <-r.ctx.Done():
			return
		}
	}
}

// next returns the next message, or why there is none.
func (r *receiver) next() (*tetherpb.StreamRequest, error) {
	r.pool.put(r.held)
	r.held = nil
	select {
	case m := <-r.msgs:
		r.held = m.GetOp().GetData()
		return m, nil
	case err := <-r.errc:
		return nil, err
	case <-r.ctx.Done():
		return nil, causeStatus(context.Cause(r.ctx))
	}
}

// causeStatus turns the reason a stream was cut off into a gRPC status.
func causeStatus(cause error) error {
	var fe fencedError
	switch {
	case errors.As(cause, &fe):
		return status.Error(codes.FailedPrecondition, fe.Error())
	case errors.Is(cause, errServerClosing):
		return status.Error(codes.Unavailable, cause.Error())
	case errors.Is(cause, errSuperseded):
		return status.Error(codes.Aborted, cause.Error())
	}
	return status.FromContextError(cause).Err()
}

// serve runs the protocol of one stream: Hello, then batches.
func (s *Server) serve(ctx context.Context, cancel context.CancelCauseFunc, stream tetherpb.Replication_StreamServer, in *receiver) error {
	m, err := in.next()
	if err != nil {
		return err
	}
	hello := m.GetHello()
	if hello == nil {
		return status.Error(codes.InvalidArgument, "the first message of a replication stream must be a Hello")
	}
	paths, err := s.cfg.Resolve(hello.GetVolume())
	if err != nil {
		return status.Errorf(codes.NotFound, "volume %q: %v", hello.GetVolume(), err)
	}
	me := &inbound{epoch: hello.GetEpoch(), primary: hello.GetPrimaryNode(), cancel: cancel, done: make(chan struct{})}
	v := s.volume(hello.GetVolume())
	if err := s.admit(ctx, v, me, paths); err != nil {
		return err
	}
	defer s.leave(v, me)

	log := s.log.With("volume", hello.GetVolume(), "primary", me.primary, "epoch", me.epoch)
	if err := s.recoverJournal(v, paths, log); err != nil {
		return status.Error(codes.Internal, err.Error())
	}
	pos, err := durablePosition(paths.State)
	if err != nil {
		return status.Error(codes.Internal, err.Error())
	}
	stage := filepath.Join(paths.State, stageDir)
	if err := resetDir(stage); err != nil {
		return status.Errorf(codes.Internal, "prepare staging directory: %v", err)
	}
	first := ackOf(pos)
	s.mu.Lock()
	first.Continues = !s.noContinue
	s.mu.Unlock()
	if err := stream.Send(first); err != nil {
		return err
	}
	log.Info("replication stream accepted", "position", pos.String())
	sess := &inboundSession{s: s, v: v, me: me, volume: hello.GetVolume(), paths: paths, pos: pos, log: log}
	return sess.receive(stream, in, newBatch(stage))
}

// receive collects the ops of each batch and applies it at its Commit.
func (c *inboundSession) receive(stream tetherpb.Replication_StreamServer, in *receiver, b *batch) error {
	defer b.discard()
	for {
		m, err := in.next()
		if err != nil {
			return err
		}
		switch k := m.GetKind().(type) {
		case *tetherpb.StreamRequest_Op:
			if err := b.add(k.Op); err != nil {
				return batchStatus(err)
			}
		case *tetherpb.StreamRequest_Continue:
			if err := b.cont(k.Continue.GetSeq()); err != nil {
				return batchStatus(err)
			}
		case *tetherpb.StreamRequest_Commit:
			err := c.commit(b, k.Commit)
			b.discard()
			if err != nil {
				return err
			}
			if err := stream.Send(ackOf(c.pos)); err != nil {
				return err
			}
		default:
			return status.Error(codes.InvalidArgument, "a Hello may only open a replication stream")
		}
	}
}

// admit checks the epoch of a new stream, records a newer one durably, and
// makes the stream the volume's active one, cutting off (and waiting for)
// the previous one.
func (s *Server) admit(ctx context.Context, v *replicaVolume, me *inbound, paths Paths) error {
	v.mu.Lock()
	newest, err := readEpoch(paths.State)
	if err == nil && me.epoch > newest {
		err = writeEpoch(paths.State, me.epoch)
	}
	if err != nil {
		v.mu.Unlock()
		return status.Error(codes.Internal, err.Error())
	}
	if me.epoch < newest {
		v.mu.Unlock()
		return status.Error(codes.FailedPrecondition, fencedError{epoch: me.epoch, newest: newest}.Error())
	}
	prev := v.active
	v.active = me
	v.mu.Unlock()
	if prev == nil {
		return nil
	}
	prev.cancel(errSuperseded)
	select {
	case <-prev.done:
		return nil
	case <-ctx.Done():
		s.leave(v, me)
		return causeStatus(context.Cause(ctx))
	}
}

// leave unregisters a stream.
func (s *Server) leave(v *replicaVolume, me *inbound) {
	v.mu.Lock()
	if v.active == me {
		v.active = nil
	}
	v.mu.Unlock()
	close(me.done)
}

// inboundSession is the state of an admitted stream.
type inboundSession struct {
	s      *Server
	v      *replicaVolume
	me     *inbound
	volume string
	paths  Paths
	pos    position
	log    *slog.Logger
}

// commit applies a complete batch and records its position durably.
func (c *inboundSession) commit(b *batch, cm *tetherpb.Commit) error {
	if err := b.complete(); err != nil {
		return batchStatus(err)
	}
	if b.contSeq != 0 && cm.GetSeq() != b.contSeq {
		return status.Errorf(codes.InvalidArgument, "batch continued to cut %d commits as cut %d", b.contSeq, cm.GetSeq())
	}
	if c.pos.Epoch == c.me.epoch && cm.GetSeq() <= c.pos.Seq {
		return status.Errorf(codes.InvalidArgument, "batch seq %d does not follow the durable seq %d of epoch %d",
			cm.GetSeq(), c.pos.Seq, c.me.epoch)
	}
	c.v.mu.Lock()
	defer c.v.mu.Unlock()
	if c.v.active != c.me {
		return status.Error(codes.Aborted, errSuperseded.Error())
	}
	newest, err := readEpoch(c.paths.State)
	if err != nil {
		return status.Error(codes.Internal, err.Error())
	}
	if c.me.epoch < newest {
		return status.Error(codes.FailedPrecondition, fencedError{epoch: c.me.epoch, newest: newest}.Error())
	}
	start := time.Now()
	if err := c.quarantineFor(b, cm.GetFull()); err != nil {
		return status.Errorf(codes.Internal, "quarantine before the first batch of epoch %d: %v", c.me.epoch, err)
	}
	pos := position{Epoch: c.me.epoch, Seq: cm.GetSeq(), Cut: cutTime(cm.GetCutUnixNano())}
	j := c.s.journal(c.v, c.paths)
	j.bases, j.written = c.v.bases, map[string]*indexEntry{}
	if err := j.commit(b, pos, cm.GetFull()); err != nil {
		c.v.bases.reset() // part of it may be applied: trust nothing
		return batchStatus(fmt.Errorf("apply batch %d: %w", cm.GetSeq(), err))
	}
	if len(b.segments) > 0 {
		// A path may be written by several of its segments: trust no
		// digest recorded on the way.
		c.v.bases.reset()
	} else {
		c.v.bases.record(b.ops, j.written)
	}
	c.pos = pos
	c.log.Debug("batch applied", "seq", pos.Seq, "full", cm.GetFull(), "ops", len(b.ops), "took", time.Since(start))
	return nil
}

// journal returns the redo journal of a volume on this replica (v.mu held).
func (s *Server) journal(v *replicaVolume, paths Paths) journal {
	s.mu.Lock()
	defer s.mu.Unlock()
	return journal{paths: paths, warn: s.warn, fail: s.fail, state: &v.journal}
}

// recoverJournal finishes or drops the journal a crash left.
func (s *Server) recoverJournal(v *replicaVolume, paths Paths, log *slog.Logger) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	_, err := s.journal(v, paths).recover(log)
	return err
}

// batchStatus maps a batch error to a gRPC status: refusals of what the peer
// sent are InvalidArgument, a copy that is not the base the batch builds on
// DataLoss (the primary then sends the whole tree), local failures
// Internal.
func batchStatus(err error) error {
	if errors.Is(err, errBaseMismatch) {
		return status.Error(codes.DataLoss, err.Error())
	}
	if errors.Is(err, errBadPath) || errors.Is(err, errBadBatch) {
		return status.Error(codes.InvalidArgument, err.Error())
	}
	return status.Error(codes.Internal, err.Error())
}

func ackOf(pos position) *tetherpb.StreamAck {
	return &tetherpb.StreamAck{Epoch: pos.Epoch, Seq: pos.Seq, CutUnixNano: cutNano(pos.Cut), Continues: true}
}

// resetDir empties dir, creating it if needed.
func resetDir(dir string) error {
	if err := os.RemoveAll(dir); err != nil {
		return err
	}
	return os.MkdirAll(dir, 0o700)
}
