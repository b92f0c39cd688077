package replication

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tether-io/tether/proto/tetherpb"
)

// PrimaryConfig configures the primary side of one volume.
type PrimaryConfig struct {
	Volume string
	Node   string // this node's name (goes into Hello)
	Epoch  uint64
	// Paths locates the volume; the primary reads Paths.Data (Paths.State
	// is not used on the primary today).
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
	// Debounce is how long changes gather before a batch; default 20ms.
	Debounce time.Duration
	// RescanInterval is the period (jittered) of the full rescan that
	// catches what inotify missed; default 30s.
	RescanInterval time.Duration
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
	Err string
}

// Primary streams a volume's changes to its replicas.
type Primary struct {
	cfg  PrimaryConfig
	log  *slog.Logger
	warn *onceLogger

	mu       sync.Mutex
	replicas []string
	senders  map[string]*sender
	seq      atomic.Uint64 // last batch number handed out
	started  bool
	stopped  bool
	ctx      context.Context
	cancel   context.CancelFunc
	root     *os.Root
	w        *watcher
	wg       sync.WaitGroup
}

// NewPrimary checks cfg and returns a Primary; it starts nothing.
func NewPrimary(cfg PrimaryConfig) (*Primary, error) {
	switch {
	case cfg.Volume == "":
		return nil, errors.New("replication primary: volume name is empty")
	case cfg.Paths.Data == "":
		return nil, fmt.Errorf("replication primary for volume %s: data directory is empty", cfg.Volume)
	case cfg.Dial == nil:
		return nil, fmt.Errorf("replication primary for volume %s: no Dial function", cfg.Volume)
	}
	if cfg.Debounce <= 0 {
		cfg.Debounce = 20 * time.Millisecond
	}
	if cfg.RescanInterval <= 0 {
		cfg.RescanInterval = 30 * time.Second
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	log = log.With("component", "replication-primary", "volume", cfg.Volume, "epoch", cfg.Epoch)
	return &Primary{cfg: cfg, log: log, warn: newOnceLogger(log),
		replicas: slices.Clone(cfg.Replicas), senders: map[string]*sender{}}, nil
}

// Start watches the volume (failing clearly when the inotify watch limit is
// too low) and starts a sender per replica.
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
	w, err := newWatcher(filepath.Clean(p.cfg.Paths.Data), root, p.log, p.cfg.Debounce, p.cfg.RescanInterval, p.dispatch, p.dispatchFull)
	if err == nil {
		err = w.setup()
		if err != nil {
			w.close()
		}
	}
	if err != nil {
		_ = root.Close()
		return fmt.Errorf("replication primary for volume %s: %w", p.cfg.Volume, err)
	}
	p.root, p.w, p.started = root, w, true
	p.ctx, p.cancel = context.WithCancel(ctx)
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		w.run(p.ctx)
	}()
	for _, n := range p.replicas {
		p.startSender(n)
	}
	p.log.Info("replicating volume", "replicas", p.replicas)
	return nil
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
}

// Status reports the replication state of every replica.
func (p *Primary) Status() PrimaryStatus {
	p.mu.Lock()
	st := PrimaryStatus{Epoch: p.cfg.Epoch, Seq: p.seq.Load()}
	senders := make([]*sender, 0, len(p.senders))
	for _, s := range p.senders {
		senders = append(senders, s)
	}
	p.mu.Unlock()
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

// Stop stops the watcher and the senders and waits for them.
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
	_ = p.root.Close()
}

// dispatch hands dirty paths to every sender.
func (p *Primary) dispatch(d dirtySet) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, s := range p.senders {
		s.addDirty(d)
	}
}

// dispatchFull makes every sender send the whole tree next.
func (p *Primary) dispatchFull() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, s := range p.senders {
		s.requireFull()
	}
}

// nextSeq hands out the next batch number of this epoch.
func (p *Primary) nextSeq() uint64 {
	return p.seq.Add(1)
}

// observeSeq makes later batch numbers follow seq, a position a replica
// reported for this epoch (a primary restarted in the same epoch must not
// reuse numbers).
func (p *Primary) observeSeq(seq uint64) {
	for {
		cur := p.seq.Load()
		if cur >= seq || p.seq.CompareAndSwap(cur, seq) {
			return
		}
	}
}
