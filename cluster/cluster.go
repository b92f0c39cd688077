package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
)

// DefaultGossipPort is used for Join addresses given without a port.
const DefaultGossipPort = 7660

// Config configures a Cluster.
type Config struct {
	NodeName string
	// DataDir holds the Raft state, in DataDir/raft (raft-boltdb log and
	// stable store, file snapshots).
	DataDir string
	// GossipBind is the host:port memberlist binds; port 0 picks one.
	GossipBind string
	// GossipAdvertise is the host:port others reach our gossip at; by
	// default the bind address (a non-loopback IP when binding 0.0.0.0).
	GossipAdvertise string
	// RPCAdvertise is the host:port of our RPC listener (gRPC and Raft);
	// it goes into the memberlist node meta and is our Raft address.
	RPCAdvertise string
	// Join lists other agents' gossip addresses (host[:port], default port
	// 7660). Joining is retried in the background until one answers.
	Join []string
	// BootstrapExpect forms Raft once this many servers are alive (see the
	// package comment); 0 never bootstraps and waits to be added.
	BootstrapExpect int
	RaftLayer       raft.StreamLayer
	// Forward runs an encoded command on the leader at leaderRPCAddr (the
	// agent does it over gRPC Peer.Apply). It should return an error
	// wrapping ErrNotLeader when that node is no longer the leader (so
	// Apply retries), and the leader's refusal rebuilt with ParseError.
	Forward func(ctx context.Context, leaderRPCAddr string, cmd []byte) (index uint64, err error)
	// ForwardLease asks the leader at leaderRPCAddr to grant node a primary
	// lease (the agent does it over gRPC Peer.RenewLease), with the same
	// error conventions as Forward.
	ForwardLease func(ctx context.Context, leaderRPCAddr, node string) (index uint64, err error)
	Version      string
	Logger       *slog.Logger
	Timing       Timing
	// Labels describe this node for volumes' placement constraints; they
	// travel in the gossip meta (see ValidateLabels for the limits).
	Labels map[string]string
	// WrapGossipTransport, when set, wraps memberlist's network transport
	// (tests inject partitions, delay and loss this way).
	WrapGossipTransport func(memberlist.Transport) memberlist.Transport
	// GossipKeys encrypt gossip (see gossipsec.go); the first is the
	// primary key. None means plaintext gossip.
	GossipKeys [][]byte
	// VolumeRetention is how long a deleted volume is kept before the
	// leader purges it; 0 means DefaultRetention.
	VolumeRetention time.Duration
}

// retention is the configured volume retention.
func (c *Cluster) retention() time.Duration {
	if c.cfg.VolumeRetention <= 0 {
		return DefaultRetention
	}
	return c.cfg.VolumeRetention
}

// Timing holds the failure-detection and consensus timings; zero fields
// take the defaults.
type Timing struct {
	ProbeInterval     time.Duration // memberlist, default 500ms
	ProbeTimeout      time.Duration // memberlist, default 200ms
	SuspicionMult     int           // memberlist, default 3
	GossipInterval    time.Duration // memberlist, default 100ms
	RaftHeartbeat     time.Duration // default 1s
	RaftElection      time.Duration // default 1s
	RaftLeaderLease   time.Duration // default 500ms
	FailoverGrace     time.Duration // default 0: fail over as soon as the primary is dead
	ReconcileInterval time.Duration // default 1s
	// LeaseDuration is how long a primary may keep serving after the
	// leader last confirmed, with a quorum, that it is still the leader
	// (default 3s). It must outlast a Raft election, or healthy primaries
	// fence themselves whenever the leader changes.
	LeaseDuration time.Duration
	// LeaseMargin is added on the leader's side before it promotes away
	// from a primary, for clock-rate differences and scheduling (default 1s).
	LeaseMargin time.Duration
	// LeaseRenewInterval is how often a primary renews (default 500ms).
	LeaseRenewInterval time.Duration
	// ReplaceGrace is how long a replica may be dead before the leader
	// replaces it with a spare node, which is then filled (default 2m).
	ReplaceGrace time.Duration
	// DeadServerGrace is how long a Raft server may be dead before the
	// leader removes it from the configuration, when quorum allows
	// (default 5m). A removed node that returns is added back.
	DeadServerGrace time.Duration
}

func (t Timing) withDefaults() Timing {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&t.ProbeInterval, 500*time.Millisecond)
	def(&t.ProbeTimeout, 200*time.Millisecond)
	def(&t.GossipInterval, 100*time.Millisecond)
	def(&t.RaftHeartbeat, time.Second)
	def(&t.RaftElection, time.Second)
	def(&t.RaftLeaderLease, 500*time.Millisecond)
	def(&t.ReconcileInterval, time.Second)
	def(&t.LeaseDuration, 3*time.Second)
	def(&t.LeaseMargin, time.Second)
	def(&t.LeaseRenewInterval, 500*time.Millisecond)
	def(&t.ReplaceGrace, 2*time.Minute)
	def(&t.DeadServerGrace, 5*time.Minute)
	if t.SuspicionMult <= 0 {
		t.SuspicionMult = 3
	}
	if t.FailoverGrace < 0 {
		t.FailoverGrace = 0
	}
	return t
}

// Cluster is one node's view of and part in the control plane.
type Cluster struct {
	cfg    Config
	timing Timing
	logger *slog.Logger
	fsm    *fsm

	changes     chan struct{}
	bootstrapCh chan struct{}
	reconcileCh chan struct{}
	raftNotify  chan bool

	members *membership
	leases  *leaseTable
	// needsOperator remembers which volumes the leader loop has warned
	// about; only the leader loop goroutine touches it.
	needsOperator map[string]bool

	// gossipMu orders our own gossip announcements (meta updates, leave);
	// left is set once we have left, after which we announce nothing.
	gossipMu sync.Mutex
	left     bool

	// Set by Start, which then sets ready; read them only after ready.
	ready      atomic.Bool
	ml         *memberlist.Memberlist
	raft       *raft.Raft
	transport  *raft.NetworkTransport
	store      *raftboltdb.BoltStore
	gossipAddr string
	// startIndex is the last Raft index on disk when Start ran, and
	// startCommand the last catalog command at or before it (0: none in
	// the log): Raft counts an entry applied once it handed it to the FSM,
	// so the catalog is current only once the FSM itself reached it.
	startIndex   uint64
	startCommand uint64
	joinErr      atomic.Value // string: why the last join failed

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	lifeMu   sync.Mutex
	started  bool
	shutdown bool
}

// New checks cfg and builds a Cluster; Start runs it.
func New(cfg Config) (*Cluster, error) {
	switch {
	case cfg.NodeName == "":
		return nil, errors.New("cluster: node name is required")
	case cfg.DataDir == "":
		return nil, errors.New("cluster: data directory is required")
	case cfg.RPCAdvertise == "":
		return nil, errors.New("cluster: rpc advertise address is required")
	case cfg.RaftLayer == nil:
		return nil, errors.New("cluster: raft stream layer is required")
	case cfg.BootstrapExpect < 0:
		return nil, fmt.Errorf("cluster: bootstrap-expect %d is negative", cfg.BootstrapExpect)
	}
	if err := ValidateLabels(cfg.Labels); err != nil {
		return nil, fmt.Errorf("node labels: %w", err)
	}
	if b, _ := json.Marshal(nodeMeta{RPC: cfg.RPCAdvertise, Version: cfg.Version, Leaving: true, Raft: true, Labels: cfg.Labels}); len(b) > memberlist.MetaMaxSize {
		return nil, fmt.Errorf("%w: the node's gossip metadata would take %d bytes, more than memberlist's %d: use fewer or shorter labels", ErrInvalidLabels, len(b), memberlist.MetaMaxSize)
	}
	if _, _, err := net.SplitHostPort(cfg.RPCAdvertise); err != nil {
		return nil, fmt.Errorf("cluster: rpc advertise address %q: %w", cfg.RPCAdvertise, err)
	}
	if cfg.GossipBind == "" {
		cfg.GossipBind = fmt.Sprintf("0.0.0.0:%d", DefaultGossipPort)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	logger := cfg.Logger
	c := &Cluster{
		cfg:         cfg,
		timing:      cfg.Timing.withDefaults(),
		logger:      logger,
		changes:     make(chan struct{}, 1),
		bootstrapCh: make(chan struct{}, 1),
		reconcileCh: make(chan struct{}, 1),
		raftNotify:  make(chan bool, 16),
	}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	c.fsm = newFSM(logger.With("component", "fsm"), func() { notify(c.changes) })
	c.leases = newLeaseTable()
	c.needsOperator = map[string]bool{}
	c.members = newMembership(cfg.NodeName, func() {
		notify(c.changes)
		notify(c.bootstrapCh)
		notify(c.reconcileCh)
	})
	return c, nil
}

// notify signals ch without blocking; signals coalesce.
func notify(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// lastCommandIndex returns the index of the last catalog command in the
// Raft log at or before last (0 if the log holds none, or none among the
// last few thousand entries: the snapshot then holds the catalog).
func (c *Cluster) lastCommandIndex(last uint64) uint64 {
	first, err := c.store.FirstIndex()
	if err != nil || first == 0 {
		return 0
	}
	for i, n := last, 0; i >= first && n < 4096; i, n = i-1, n+1 {
		var l raft.Log
		if err := c.store.GetLog(i, &l); err != nil {
			return 0
		}
		if l.Type == raft.LogCommand {
			return i
		}
	}
	return 0
}

// Start creates the Raft node and the memberlist, and starts joining,
// bootstrapping and the leadership monitor in the background. They run
// until Shutdown (ctx only bounds the background join retries).
func (c *Cluster) Start(ctx context.Context) error {
	c.lifeMu.Lock()
	defer c.lifeMu.Unlock()
	if c.started || c.shutdown {
		return errors.New("cluster: Start called twice or after Shutdown")
	}
	hasState, err := c.setupRaft()
	if err != nil {
		return err
	}
	c.startIndex = c.raft.LastIndex()
	c.startCommand = c.lastCommandIndex(c.startIndex)
	if err := c.setupMemberlist(hasState); err != nil {
		c.stopRaft()
		return err
	}
	c.started = true
	c.ready.Store(true)
	c.goRun(c.monitorLeadership)
	if len(c.cfg.Join) > 0 {
		c.goRun(func() { c.joinLoop(ctx) })
	}
	if !hasState {
		c.goRun(c.formLoop)
	}
	c.logger.Info("cluster started", "gossip", c.gossipAddr, "rpc", c.cfg.RPCAdvertise, "existing_raft_state", hasState)
	return nil
}

func (c *Cluster) goRun(f func()) {
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		f()
	}()
}

// setupRaft opens the stores and starts the Raft node.
func (c *Cluster) setupRaft() (hasState bool, err error) {
	dir := filepath.Join(c.cfg.DataDir, "raft")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return false, fmt.Errorf("cluster: creating raft directory: %w", err)
	}
	hl := newHCLog(c.logger, "raft")
	store, err := raftboltdb.NewBoltStore(filepath.Join(dir, "raft.db"))
	if err != nil {
		return false, fmt.Errorf("cluster: opening raft store in %s: %w", dir, err)
	}
	snaps, err := raft.NewFileSnapshotStoreWithLogger(dir, 2, hl.Named("snapshot"))
	if err != nil {
		_ = store.Close()
		return false, fmt.Errorf("cluster: opening raft snapshots in %s: %w", dir, err)
	}
	hasState, err = raft.HasExistingState(store, store, snaps)
	if err != nil {
		_ = store.Close()
		return false, fmt.Errorf("cluster: reading raft state: %w", err)
	}
	logs, err := raft.NewLogCache(512, store)
	if err != nil {
		_ = store.Close()
		return false, fmt.Errorf("cluster: raft log cache: %w", err)
	}
	transport := raft.NewNetworkTransportWithConfig(&raft.NetworkTransportConfig{
		Stream:  c.cfg.RaftLayer,
		MaxPool: 3,
		Timeout: 10 * time.Second,
		Logger:  hl.Named("net"),
	})
	conf := raft.DefaultConfig()
	conf.LocalID = raft.ServerID(c.cfg.NodeName)
	conf.HeartbeatTimeout = c.timing.RaftHeartbeat
	conf.ElectionTimeout = c.timing.RaftElection
	conf.LeaderLeaseTimeout = c.timing.RaftLeaderLease
	conf.NotifyCh = c.raftNotify
	conf.Logger = hl
	r, err := raft.NewRaft(conf, c.fsm, logs, store, snaps, transport)
	if err != nil {
		_ = transport.Close()
		_ = store.Close()
		return false, fmt.Errorf("cluster: starting raft: %w", err)
	}
	c.raft, c.transport, c.store = r, transport, store
	return hasState, nil
}

// stopRaft shuts Raft down and closes its transport and store.
func (c *Cluster) stopRaft() {
	if err := c.raft.Shutdown().Error(); err != nil {
		c.logger.Warn("raft shutdown failed", "error", err)
	}
	_ = c.transport.Close()
	if err := c.store.Close(); err != nil {
		c.logger.Warn("closing raft store failed", "error", err)
	}
}

// Shutdown stops the node. With leave, it first tells the cluster it is
// leaving (members see it as left, not dead) and hands off Raft
// leadership; without, it just stops, as a crash would. It waits for all
// goroutines.
func (c *Cluster) Shutdown(leave bool) error {
	c.lifeMu.Lock()
	defer c.lifeMu.Unlock()
	if c.shutdown {
		return nil
	}
	c.shutdown = true
	if !c.started {
		c.cancel()
		return nil
	}
	if leave {
		c.leave()
	}
	c.cancel()
	c.stopRaft()
	c.wg.Wait()
	var errs []error
	if err := c.ml.Shutdown(); err != nil {
		errs = append(errs, fmt.Errorf("cluster: stopping memberlist: %w", err))
	}
	c.logger.Info("cluster stopped", "left", leave)
	return errors.Join(errs...)
}

// leave announces a graceful departure.
func (c *Cluster) leave() {
	const timeout = 3 * time.Second
	c.gossipMu.Lock()
	defer c.gossipMu.Unlock()
	c.left = true
	c.members.setLeaving()
	if err := c.ml.UpdateNode(timeout); err != nil {
		c.logger.Warn("announcing leave failed", "error", err)
	}
	if c.IsLeader() {
		if err := c.raft.LeadershipTransfer().Error(); err != nil {
			c.logger.Warn("handing off raft leadership failed", "error", err)
		}
	}
	if err := c.ml.Leave(timeout); err != nil {
		c.logger.Warn("leaving the gossip cluster failed", "error", err)
	}
}

// NodeName is this node's name (its Raft server ID).
func (c *Cluster) NodeName() string { return c.cfg.NodeName }

// GossipAddr is the host:port other members reach our gossip at.
func (c *Cluster) GossipAddr() string {
	if !c.ready.Load() {
		return ""
	}
	return c.gossipAddr
}

// Changes receives a signal (coalesced) after every catalog change and
// every membership change.
func (c *Cluster) Changes() <-chan struct{} { return c.changes }
