package replication

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/klauspost/compress/zstd"

	"github.com/tether-io/tether/proto/tetherpb"
)

// Directories in a primary's Paths.State.
const (
	barrierDir = "barrier" // cut barriers' sentinels, watched with the volume
	spoolDir   = "spool"   // cuts' file contents (unlinked temporary files)
)

// Retention of cut batches on a primary.
const (
	maxAhead = 4 // cuts taken ahead of the slowest connected replica
	// Defaults of PrimaryConfig.RetainBytes and RetainAge.
	defaultRetainBytes = 1 << 30
	defaultRetainAge   = 10 * time.Minute
	defaultRetainCuts  = 4096
)

// PrimaryConfig configures the primary side of one volume.
type PrimaryConfig struct {
	Volume string
	Node   string // this node's name (goes into Hello)
	Epoch  uint64
	// Paths locates the volume; the primary reads Paths.Data and keeps its
	// cut barriers and spool in Paths.State.
	Paths Paths
	// Replicas are the nodes to stream to.
	Replicas []string
	// Dial connects to a node; it may fail (node down): senders retry with
	// backoff.
	Dial func(ctx context.Context, node string) (tetherpb.ReplicationClient, error)
	// OnAck is called from the sender goroutine after each durable ack; it
	// must not block long.
	OnAck  func(node string, ack Ack)
	Logger *slog.Logger
	// Debounce is how long changes gather before a cut; default 1ms.
	Debounce time.Duration
	// RetainBytes bounds the bytes of the cuts kept only for replicas that
	// are disconnected (so that they resume where they stopped); past it
	// the oldest are dropped and those replicas get the whole tree when
	// they return. Default 1 GiB.
	RetainBytes int64
	// RetainAge is how long cuts are kept for a disconnected replica;
	// default 10 minutes.
	RetainAge time.Duration
	// RetainCuts bounds how many cuts are kept, as RetainBytes does their
	// size (each holds an open spool file); default 4096.
	RetainCuts int
	// RescanInterval is the period (jittered) of the full rescan that
	// catches what inotify missed; default 30s.
	RescanInterval time.Duration
	// MaxRounds is how many read rounds a cut may take before it falls back
	// to the Freezer; default 4.
	MaxRounds int
	// Freezer, if set, pauses the volume's writers for the last round of a
	// cut that did not converge; nil means no freezing (such a cut ships
	// file-consistent only).
	Freezer Freezer
	// MaxFreeze bounds how long writers stay frozen; default 1s (pausing a
	// container and reading what a database changed take a few hundred
	// milliseconds each here).
	MaxFreeze time.Duration
	// Limiter, if set, bounds the bytes per second sent to the replicas
	// (shared by every Primary of the node); nil means no limit.
	Limiter Limiter
}

// Ack is a replica's durable position.
type Ack struct {
	Epoch, Seq uint64
	Cut        time.Time
}

// PrimaryStatus is the live replication state of a volume on its primary.
type PrimaryStatus struct {
	Epoch, Seq uint64
	Replicas   []ReplicaState
	// Cuts counts the cuts taken; FileConsistentOnlyCuts those of them that
	// are not crash-consistent (the volume never went quiet).
	Cuts, FileConsistentOnlyCuts uint64
	// StreamsContinued counts the full cuts whose streamed files changed
	// while sent and that were continued over the cuts taken meanwhile;
	// StreamsBroken those that could not be (the replica then got a new
	// full cut, read into the spool).
	StreamsContinued, StreamsBroken uint64
	// WatchLimit, when not empty, says that directories go unwatched for
	// the inotify watch limit (and how to raise it): their changes are
	// found by a rescan every few seconds instead.
	WatchLimit string
	// CutError, when not empty, says why the last cut could not be taken
	// (it is retried with the whole tree every second); empty once a cut
	// succeeds.
	CutError string
}

// FullSyncText shows the progress of a whole tree being sent to a replica,
// e.g. "37% of 4.0 GiB"; "" when none is (total 0).
func FullSyncText(done, total int64) string {
	if total <= 0 {
		return ""
	}
	return fmt.Sprintf("%d%% of %s", min(100, max(0, done*100/total)), humanize.IBytes(uint64(total)))
}

// ReplicaState is the replication state of one replica.
type ReplicaState struct {
	Node      string
	Connected bool
	AckedSeq  uint64
	AckedCut  time.Time
	// Lag is now minus the oldest change not yet durable on the replica;
	// 0 when it is caught up.
	Lag time.Duration
	// LagBytes is the encoded size of the cuts taken and not yet durable on
	// the replica, and PendingCuts their number (the first of them is in
	// flight while the replica is connected). A replica that needs the
	// whole tree counts the full cut once it is taken; changes not yet in
	// a cut count in Lag only.
	LagBytes    int64
	PendingCuts int
	// FullSyncDone and FullSyncTotal tell, while the replica is sent the
	// whole tree, how much of it is sent (encoded bytes; streamed files
	// count their size). FullSyncTotal is 0 otherwise.
	FullSyncDone, FullSyncTotal int64
	Err                         string
}

// Primary watches a volume, takes consistent cuts of its changes, and
// streams each cut to every replica.
type Primary struct {
	cfg        PrimaryConfig
	log        *slog.Logger
	warn       *onceLogger
	ch         *changes
	barrierDir string

	mu       sync.Mutex
	replicas []string
	senders  map[string]*sender
	started  bool
	stopped  bool
	ctx      context.Context
	cancel   context.CancelFunc
	root     *os.Root
	w        *watcher
	idx      *index        // the block index of the last cut
	enc      *zstd.Encoder // compresses file chunks in cuts
	chunks   *chunkPool    // buffers of streamed chunks, lent to the senders' codec
	wg       sync.WaitGroup

	// watchLimits returns the inotify watch limit and the watches in use
	// (inotifyWatches; tests replace it).
	watchLimits func() (limit, used int)
	// wrapAdd, if set, wraps the watcher's inotify watch Add (tests inject
	// watch-limit errors with it).
	wrapAdd func(add func(string) error) func(string) error

	seq          atomic.Uint64 // last batch number handed out
	barrierN     atomic.Uint64
	cuts         atomic.Uint64
	fullCuts     atomic.Uint64
	cuttingFull  atomic.Bool // a full cut is being read
	fileOnlyCuts atomic.Uint64
	cutErr       atomic.Pointer[string] // why the last cut failed; nil after a success

	// cutMu is held while a cut is taken (planned against the index, read,
	// its changes put into the index) and while a sender puts the entries
	// of files it streamed into the index.
	cutMu sync.Mutex
	// noStream makes the next full cut spool its large files: a stream of
	// them broke because the volume changed meanwhile.
	noStream      atomic.Bool
	brokenStreams atomic.Uint64 // batches whose streamed files changed while sent, not continued
	// continuedStreams counts batches whose streamed files changed while
	// sent, continued with the cuts that carry those changes.
	continuedStreams atomic.Uint64
	streamMin        int64 // smallest file a full cut streams (tests lower it)
	// onStreamChunk, if set, runs after a sender sent a message of a
	// streamed file of batch seq (tests change the volume or stop the
	// replica there).
	onStreamChunk func(seq uint64)
	// excludedRuns holds the files the last cut left out because every
	// reading of them was torn, with how many cuts in a row did (cutMu).
	excludedRuns map[string]int
	// onSpoolChunk, if set, runs after each chunk of a file a cut reads
	// into its spool, but its last (tests only).
	onSpoolChunk func(rel string, off uint64)
	// afterRound, if set, runs after each round of a cut read its paths,
	// before the barrier that checks it (tests only: full tells a full cut).
	afterRound func(full bool)

	bmu      sync.Mutex
	batches  []*cutBatch   // retained cuts, consecutive seqs, oldest first
	firstSeq uint64        // first cut of this Primary (0 before it)
	latest   uint64        // last cut published
	changed  chan struct{} // closed when a cut is published or an ack arrives
	// cutting is the oldest change taken by the cut being read (zero when
	// none): taken from the pending changes, not yet in a batch, it still
	// counts in every replica's lag.
	cutting time.Time
}

// NewPrimary checks cfg and returns a Primary; it starts nothing.
func NewPrimary(cfg PrimaryConfig) (*Primary, error) {
	switch {
	case cfg.Volume == "":
		return nil, errors.New("replication primary: volume name is empty")
	case cfg.Paths.Data == "":
		return nil, fmt.Errorf("replication primary for volume %s: data directory is empty", cfg.Volume)
	case cfg.Paths.State == "":
		return nil, fmt.Errorf("replication primary for volume %s: state directory is empty", cfg.Volume)
	case cfg.Dial == nil:
		return nil, fmt.Errorf("replication primary for volume %s: no Dial function", cfg.Volume)
	}
	if cfg.Debounce <= 0 {
		cfg.Debounce = time.Millisecond
	}
	if cfg.RetainBytes <= 0 {
		cfg.RetainBytes = defaultRetainBytes
	}
	if cfg.RetainAge <= 0 {
		cfg.RetainAge = defaultRetainAge
	}
	if cfg.RetainCuts <= 0 {
		cfg.RetainCuts = defaultRetainCuts
	}
	if cfg.RescanInterval <= 0 {
		cfg.RescanInterval = 30 * time.Second
	}
	if cfg.MaxRounds <= 0 {
		cfg.MaxRounds = 4
	}
	if cfg.MaxFreeze <= 0 {
		cfg.MaxFreeze = time.Second
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	log = log.With("component", "replication-primary", "volume", cfg.Volume, "epoch", cfg.Epoch)
	p := &Primary{cfg: cfg, log: log, warn: newOnceLogger(log), ch: newChanges(), chunks: newChunkPool(), excludedRuns: map[string]int{},
		barrierDir: filepath.Join(filepath.Clean(cfg.Paths.State), barrierDir),
		replicas:   slices.Clone(cfg.Replicas), senders: map[string]*sender{}, changed: make(chan struct{}),
		watchLimits: inotifyWatches, streamMin: defaultStreamMin}
	// Batch numbers of a primary restarted in the same epoch must not reuse
	// those of its previous life (a replica could take a batch it never had
	// for one it applied): they start from the clock, in microseconds.
	p.seq.Store(uint64(time.Now().UnixMicro()))
	return p, nil
}

// Start watches the volume (failing clearly when the inotify watch limit is
// too low), starts the cutter and a sender per replica.
func (p *Primary) Start(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.started || p.stopped {
		return fmt.Errorf("replication primary for volume %s: already started or stopped", p.cfg.Volume)
	}
	root, err := os.OpenRoot(p.cfg.Paths.Data)
	if err != nil {
		return fmt.Errorf("replication primary for volume %s: open data directory: %w", p.cfg.Volume, err)
	}
	if err := p.checkWatches(root); err != nil {
		_ = root.Close()
		return fmt.Errorf("replication primary for volume %s: %w", p.cfg.Volume, err)
	}
	w, err := newWatcher(filepath.Clean(p.cfg.Paths.Data), p.barrierDir, root, p.log, p.cfg.RescanInterval, p.ch)
	if err == nil {
		if p.wrapAdd != nil {
			w.add = p.wrapAdd(w.add)
		}
		err = w.setup()
		if err != nil {
			w.close()
		}
	}
	var idx *index
	if err == nil {
		if idx, err = openIndex(p.cfg.Paths.State); err != nil {
			w.close()
		}
	}
	if err != nil {
		_ = root.Close()
		return fmt.Errorf("replication primary for volume %s: %w", p.cfg.Volume, err)
	}
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1))
	if err != nil {
		idx.close()
		w.close()
		_ = root.Close()
		return fmt.Errorf("replication primary for volume %s: create zstd encoder: %w", p.cfg.Volume, err)
	}
	w.idx = idx
	p.root, p.w, p.idx, p.enc, p.started = root, w, idx, enc, true
	p.ctx, p.cancel = context.WithCancel(ctx)
	p.ch.requireFull() // the first cut carries the whole tree
	p.wg.Add(2)
	go func() {
		defer p.wg.Done()
		w.run(p.ctx)
	}()
	go func() {
		defer p.wg.Done()
		p.cutLoop(p.ctx)
	}()
	for _, n := range p.replicas {
		p.startSender(n)
	}
	p.log.Info("replicating volume", "replicas", p.replicas)
	return nil
}

// checkWatches fails when the volume's directories need more inotify
// watches than the limit leaves.
func (p *Primary) checkWatches(root *os.Root) error {
	dirs, err := countDirs(root, rootPath)
	if err != nil {
		return err
	}
	limit, used := p.watchLimits()
	return checkWatchLimit(dirs, limit, used)
}

// startSender runs a sender for node; p.mu is held.
func (p *Primary) startSender(node string) {
	ctx, cancel := context.WithCancel(p.ctx)
	s := newSender(p, node, cancel)
	p.senders[node] = s
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		s.run(ctx)
	}()
}

// SetReplicas adds and removes per-replica senders.
func (p *Primary) SetReplicas(nodes []string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.replicas = slices.Clone(nodes)
	if !p.started || p.stopped {
		return
	}
	for n, s := range p.senders {
		if !slices.Contains(nodes, n) {
			s.cancel()
			delete(p.senders, n)
		}
	}
	for _, n := range nodes {
		if _, ok := p.senders[n]; !ok {
			p.startSender(n)
		}
	}
	p.notify()
}

// Status reports the replication state of every replica.
func (p *Primary) Status() PrimaryStatus {
	p.mu.Lock()
	w := p.w
	senders := make([]*sender, 0, len(p.senders))
	for _, s := range p.senders {
		senders = append(senders, s)
	}
	p.mu.Unlock()
	p.bmu.Lock()
	st := PrimaryStatus{Epoch: p.cfg.Epoch, Seq: p.latest, Cuts: p.cuts.Load(), FileConsistentOnlyCuts: p.fileOnlyCuts.Load(),
		StreamsContinued: p.continuedStreams.Load(), StreamsBroken: p.brokenStreams.Load()}
	p.bmu.Unlock()
	if w != nil {
		st.WatchLimit = w.watchLimitErr()
	}
	if e := p.cutErr.Load(); e != nil {
		st.CutError = *e
	}
	now := time.Now()
	for _, s := range senders {
		st.Replicas = append(st.Replicas, s.state(now))
	}
	slices.SortFunc(st.Replicas, func(a, b ReplicaState) int {
		switch {
		case a.Node < b.Node:
			return -1
		case a.Node > b.Node:
			return 1
		}
		return 0
	})
	return st
}

// Stop stops the watcher, the cutter and the senders and waits for them.
func (p *Primary) Stop() {
	p.mu.Lock()
	if p.stopped {
		p.mu.Unlock()
		return
	}
	p.stopped = true
	started := p.started
	if started {
		p.cancel()
	}
	p.mu.Unlock()
	if !started {
		return
	}
	p.wg.Wait()
	p.w.close()
	p.idx.close()
	_ = p.enc.Close()
	_ = p.root.Close()
	p.bmu.Lock()
	for _, b := range p.batches {
		b.sp.close()
	}
	p.batches = nil
	p.bmu.Unlock()
}

// nextSeq hands out the next batch number of this epoch.
func (p *Primary) nextSeq() uint64 {
	return p.seq.Add(1)
}

// observeSeq makes later batch numbers follow seq, a position a replica
// reported for this epoch.
func (p *Primary) observeSeq(seq uint64) {
	for {
		cur := p.seq.Load()
		if cur >= seq || p.seq.CompareAndSwap(cur, seq) {
			return
		}
	}
}

// notify wakes everything waiting for a new cut or an ack; p.bmu may or may
// not be held by the caller's caller, never by the caller.
func (p *Primary) notify() {
	p.bmu.Lock()
	p.notifyLocked()
	p.bmu.Unlock()
}

func (p *Primary) notifyLocked() {
	close(p.changed)
	p.changed = make(chan struct{})
}

// publish makes a cut available to the senders.
func (p *Primary) publish(b *cutBatch) {
	p.bmu.Lock()
	defer p.bmu.Unlock()
	if n := len(p.batches); n > 0 && p.batches[n-1].seq+1 != b.seq {
		// A seq jumped (a replica reported a higher one): older cuts cannot
		// be followed by this one.
		p.dropLocked(n)
	}
	if p.firstSeq == 0 {
		p.firstSeq = b.seq
	}
	p.batches = append(p.batches, b)
	p.latest = b.seq
	p.cutting = time.Time{}
	p.notifyLocked()
}

// dropLocked releases the n oldest retained cuts.
func (p *Primary) dropLocked(n int) {
	for _, b := range p.batches[:n] {
		b.sp.close()
	}
	p.batches = slices.Delete(p.batches, 0, n)
}

// errCutGone says a replica needs a cut that is no longer retained.
var errCutGone = errors.New("the next cut for this replica is no longer retained")

// batchFor returns the cut a sender needs: number next, or (next == 0)
// the first full cut after fullAfter. With none yet, it returns a channel
// closed when that may change.
func (p *Primary) batchFor(next, fullAfter uint64) (*cutBatch, <-chan struct{}, error) {
	p.bmu.Lock()
	defer p.bmu.Unlock()
	if next == 0 {
		for _, b := range p.batches {
			if b.full && b.seq > fullAfter && !b.broken.Load() {
				return b, nil, nil
			}
		}
		return nil, p.changed, nil
	}
	if next > p.latest {
		return nil, p.changed, nil
	}
	if len(p.batches) == 0 || next < p.batches[0].seq {
		return nil, nil, errCutGone
	}
	if b := p.batches[next-p.batches[0].seq]; !b.broken.Load() {
		return b, nil, nil
	}
	return nil, nil, errCutGone // its streamed files changed: a new full cut follows
}

// resumeFrom decides where a replica reporting (epoch, seq) continues: the
// cut after seq when this Primary made seq and still holds what follows,
// else 0 (it needs a full cut).
func (p *Primary) resumeFrom(epoch, seq uint64) uint64 {
	p.bmu.Lock()
	defer p.bmu.Unlock()
	base := p.latest
	if len(p.batches) > 0 {
		base = p.batches[0].seq - 1
	}
	if resumable(epoch, seq, p.cfg.Epoch, p.firstSeq, base, p.latest) {
		return seq + 1
	}
	return 0
}

// resumable reports whether a replica at (epoch, seq) can continue with the
// cut after seq: seq is a cut this Primary made (at or after its first,
// which was full), not older than the oldest retained base, and not newer
// than the last published.
func resumable(epoch, seq, ourEpoch, firstSeq, base, latest uint64) bool {
	return epoch == ourEpoch && firstSeq != 0 && seq >= firstSeq && seq >= base && seq <= latest
}

// acked trims the cuts no replica needs any more (all of them when there
// is no replica: a new one starts with a full cut), within the retention
// budget (see retention), and wakes the cutter.
func (p *Primary) acked() {
	now := time.Now()
	p.mu.Lock()
	holds := make([]replicaHold, 0, len(p.senders))
	for _, s := range p.senders {
		holds = append(holds, s.hold(now, p.cfg.RetainAge))
	}
	p.mu.Unlock()
	p.bmu.Lock()
	defer p.bmu.Unlock()
	kept := make([]retainedCut, len(p.batches))
	for i, b := range p.batches {
		kept[i] = retainedCut{seq: b.seq, bytes: b.spooled, full: b.full}
	}
	n, released := retention(kept, holds, retainLimits{bytes: p.cfg.RetainBytes, cuts: p.cfg.RetainCuts})
	if n > 0 {
		p.dropLocked(n)
	}
	for _, node := range released {
		p.log.Warn("dropping the cuts kept for a disconnected replica (it was away longer than the retention age, or they exceed the retention bytes or count); it will get the whole tree when it returns",
			"replica", node, "retain_age", p.cfg.RetainAge, "retain_bytes", p.cfg.RetainBytes, "retain_cuts", p.cfg.RetainCuts)
	}
	p.notifyLocked()
}

// retainedCut is what retention needs to know of a kept cut.
type retainedCut struct {
	seq   uint64
	bytes int64 // what it holds in its spool (streamed files are not there)
	full  bool
}

// replicaHold is what one replica asks the primary to keep: the cuts from
// need on, or (full) from the first full cut after need on. An active
// replica (connected) holds them unconditionally (it is at most maxAhead
// behind); a held one (disconnected less than RetainAge ago) within the
// byte budget; an expired one holds nothing.
type replicaHold struct {
	node   string
	need   uint64
	full   bool
	active bool
	held   bool
}

// from returns the first seq of the kept cuts h needs (0: none yet).
func (h replicaHold) from(kept []retainedCut) uint64 {
	if !h.full {
		return h.need
	}
	for _, c := range kept {
		if c.full && c.seq > h.need {
			return c.seq
		}
	}
	return 0
}

// retainLimits bound the cuts kept for disconnected replicas.
type retainLimits struct {
	bytes int64
	cuts  int
}

// retention returns how many of the oldest kept cuts (consecutive seqs,
// oldest first) to drop: those no active or held replica needs, then, while
// the kept cuts exceed the limits, those only held replicas need. It names
// the replicas that could resume before and no longer can.
func retention(kept []retainedCut, holds []replicaHold, lim retainLimits) (drop int, released []string) {
	keepActive, keepAll := uint64(0), uint64(0)
	for _, h := range holds {
		need := h.from(kept)
		if need == 0 {
			continue
		}
		if h.active && (keepActive == 0 || need < keepActive) {
			keepActive = need
		}
		if (h.active || h.held) && (keepAll == 0 || need < keepAll) {
			keepAll = need
		}
	}
	var total int64
	for _, c := range kept {
		total += c.bytes
	}
	for drop < len(kept) {
		c := kept[drop]
		needed := keepAll != 0 && c.seq >= keepAll
		within := total <= lim.bytes && len(kept)-drop <= lim.cuts
		if needed && (within || (keepActive != 0 && c.seq >= keepActive)) {
			break
		}
		total -= c.bytes
		drop++
	}
	if drop == 0 {
		return 0, nil
	}
	first, next := kept[0].seq, kept[drop-1].seq+1
	for _, h := range holds {
		if need := h.from(kept); !h.active && need != 0 && need >= first && need < next {
			released = append(released, h.node)
		}
	}
	slices.Sort(released)
	return drop, released
}

// waitRoom waits until no connected replica is more than maxAhead cuts
// behind, so that a slow replica makes cuts bigger instead of more.
func (p *Primary) waitRoom(ctx context.Context) bool {
	for {
		p.bmu.Lock()
		ch, latest := p.changed, p.latest
		p.bmu.Unlock()
		p.mu.Lock()
		behind := uint64(0)
		for _, s := range p.senders {
			if n, ok := s.connectedNext(); ok && n <= latest {
				behind = max(behind, latest+1-n)
			}
		}
		p.mu.Unlock()
		if behind <= maxAhead {
			return true
		}
		select {
		case <-ctx.Done():
			return false
		case <-ch:
		}
	}
}

// fullSyncing reports whether a connected replica is being sent (or waits
// for) the whole tree.
func (p *Primary) fullSyncing() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, s := range p.senders {
		s.mu.Lock()
		full := s.connected && s.next == 0
		s.mu.Unlock()
		if full {
			return true
		}
	}
	return false
}

// retainedCuts returns how many cuts are kept.
func (p *Primary) retainedCuts() int {
	p.bmu.Lock()
	defer p.bmu.Unlock()
	return len(p.batches)
}

// latestSeq returns the last cut published.
func (p *Primary) latestSeq() uint64 {
	p.bmu.Lock()
	defer p.bmu.Unlock()
	return p.latest
}

// cuttingSince records that the cut being read carries a change made at
// since; publish clears it. A cut that fails keeps it until the whole-tree
// cut that replaces it is published.
func (p *Primary) cuttingSince(since time.Time) {
	p.bmu.Lock()
	defer p.bmu.Unlock()
	p.cutting = oldest(p.cutting, since)
}

// backlog describes the retained cuts a replica still needs, from cut
// next on, or (next == 0) from the first full cut after fullAfter on: the
// oldest change they carry (or the cut being read carries), their encoded
// size (a full cut counts as its delta view when the replica follows), and
// how many there are.
func (p *Primary) backlog(next, fullAfter uint64) (since time.Time, bytes int64, cuts int) {
	p.bmu.Lock()
	defer p.bmu.Unlock()
	from := next
	if next == 0 {
		from = math.MaxUint64
		for _, b := range p.batches {
			if b.full && b.seq > fullAfter {
				from = b.seq
				break
			}
		}
	}
	since = p.cutting // the cut being read counts too (not yet in bytes or cuts)
	for _, b := range p.batches {
		if b.seq < from {
			continue
		}
		since = oldest(since, b.since)
		cuts++
		if b.full && next != 0 && b.delta != nil {
			bytes += b.deltaBytes
		} else {
			bytes += b.bytes
		}
	}
	return since, bytes, cuts
}
