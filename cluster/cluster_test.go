package cluster

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/tether-io/tether/internal/testutil"
)

// testNode is one Cluster with its own RPC listener and Mux.
type testNode struct {
	name string
	c    *Cluster
	mux  *Mux
	down bool
	// stopRenew ends the node's lease renewals; renewed waits for them.
	stopRenew context.CancelFunc
	renewed   sync.WaitGroup
}

// renewLeases asks the leader for node's lease every renewal interval, as
// an agent does (the leader promotes only nodes it has heard from lately).
func (tn *testNet) renewLeases(ctx context.Context, node *testNode) {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if l := tn.leader(); l != nil {
			gctx, cancel := context.WithTimeout(ctx, time.Second)
			_, _ = l.c.GrantLease(gctx, node.name)
			cancel()
		}
	}
}

// testNet is a few Clusters in one process; Forward goes straight to the
// leader's ApplyEncoded, through the error text as over gRPC.
type testNet struct {
	t     *testing.T
	mu    sync.Mutex
	byRPC map[string]*testNode
	nodes []*testNode
}

func testTiming() Timing {
	return Timing{ReconcileInterval: 250 * time.Millisecond}
}

func startNet(t *testing.T, n int) *testNet {
	t.Helper()
	tn := &testNet{t: t, byRPC: map[string]*testNode{}}
	var seed string
	for i := 1; i <= n; i++ {
		node := tn.start(nodeOpts{name: fmt.Sprintf("n%d", i), expect: n, join: seed})
		if seed == "" {
			seed = node.c.GossipAddr()
		}
	}
	t.Cleanup(func() {
		for _, node := range tn.nodes {
			tn.stop(node, false)
		}
	})
	testutil.Eventually(t, 20*time.Second, "raft formed with every node", func() bool {
		leader := tn.leader()
		if leader == nil {
			return false
		}
		for _, m := range leader.c.Members() {
			if m.RaftRole == RoleNone {
				return false
			}
		}
		return len(leader.c.Members()) == n
	})
	return tn
}

// nodeOpts describes a node to start; empty dataDir and gossip pick fresh ones.
type nodeOpts struct {
	name, join, dataDir, gossip string
	expect                      int
	retention                   time.Duration
	gossipKeys                  [][]byte
}

func (tn *testNet) start(o nodeOpts) *testNode {
	t := tn.t
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if o.dataDir == "" {
		o.dataDir = t.TempDir()
	}
	if o.gossip == "" {
		o.gossip = "127.0.0.1:0"
	}
	logger := testutil.Logger(t).With("test_node", o.name)
	mux := NewMux(ln, logger)
	cfg := Config{
		NodeName:        o.name,
		DataDir:         o.dataDir,
		GossipBind:      o.gossip,
		RPCAdvertise:    ln.Addr().String(),
		BootstrapExpect: o.expect,
		RaftLayer:       mux.RaftLayer(),
		Forward:         tn.forward,
		Version:         "test",
		Logger:          logger,
		Timing:          testTiming(),
		VolumeRetention: o.retention,
		GossipKeys:      o.gossipKeys,
	}
	if o.join != "" {
		cfg.Join = []string{o.join}
	}
	c, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	mux.Start()
	if err := c.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	node := &testNode{name: o.name, c: c, mux: mux}
	ctx, cancel := context.WithCancel(context.Background())
	node.stopRenew = cancel
	node.renewed.Add(1)
	go func() { defer node.renewed.Done(); tn.renewLeases(ctx, node) }()
	tn.mu.Lock()
	tn.byRPC[cfg.RPCAdvertise] = node
	tn.nodes = append(tn.nodes, node)
	tn.mu.Unlock()
	return node
}

func (tn *testNet) forward(ctx context.Context, addr string, cmd []byte) (uint64, error) {
	tn.mu.Lock()
	node := tn.byRPC[addr]
	tn.mu.Unlock()
	if node == nil {
		return 0, fmt.Errorf("%w: %s unreachable", ErrNoLeader, addr)
	}
	idx, err := node.c.ApplyEncoded(ctx, cmd)
	if err != nil {
		return idx, ParseError(err.Error()) // as the agent does with ApplyResponse.error
	}
	return idx, nil
}

// stop shuts node down (crash-like unless leave) and closes its listener.
func (tn *testNet) stop(node *testNode, leave bool) {
	tn.mu.Lock()
	if node.down {
		tn.mu.Unlock()
		return
	}
	node.down = true
	delete(tn.byRPC, node.c.cfg.RPCAdvertise)
	tn.mu.Unlock()
	node.stopRenew()
	node.renewed.Wait()
	if err := node.c.Shutdown(leave); err != nil {
		tn.t.Errorf("shutdown %s: %v", node.name, err)
	}
	if err := node.mux.Close(); err != nil {
		tn.t.Errorf("closing mux of %s: %v", node.name, err)
	}
}

func (tn *testNet) up() []*testNode {
	tn.mu.Lock()
	defer tn.mu.Unlock()
	var out []*testNode
	for _, n := range tn.nodes {
		if !n.down {
			out = append(out, n)
		}
	}
	return out
}

func (tn *testNet) leader() *testNode {
	for _, n := range tn.up() {
		if n.c.IsLeader() {
			return n
		}
	}
	return nil
}

func (tn *testNet) node(name string) *testNode {
	for _, n := range tn.nodes {
		if n.name == name {
			return n
		}
	}
	tn.t.Fatalf("no node %s", name)
	return nil
}

func (tn *testNet) follower() *testNode {
	for _, n := range tn.up() {
		if !n.c.IsLeader() {
			return n
		}
	}
	tn.t.Fatal("no follower")
	return nil
}

// waitVolume waits until every live node sees the volume.
func (tn *testNet) waitVolume(name string) {
	testutil.Eventually(tn.t, 10*time.Second, "every node sees volume "+name, func() bool {
		for _, n := range tn.up() {
			if _, ok := n.c.Volume(name); !ok {
				return false
			}
		}
		return true
	})
}

// waitFailover waits until every live node sees volume name at epoch 2
// with a live primary, failing if any node's epoch ever goes backwards.
func (tn *testNet) waitFailover(name, oldPrimary string) Volume {
	t := tn.t
	seen := map[string]uint64{}
	var last Volume
	testutil.EventuallyErr(t, 15*time.Second, func() error {
		for _, n := range tn.up() {
			v, ok := n.c.Volume(name)
			if !ok {
				return fmt.Errorf("%s lost volume %s", n.name, name)
			}
			if v.Epoch < seen[n.name] {
				t.Fatalf("epoch went back on %s: %d after %d", n.name, v.Epoch, seen[n.name])
			}
			seen[n.name] = v.Epoch
			if v.Epoch != 2 || v.Primary == oldPrimary {
				return fmt.Errorf("%s sees %s at epoch %d primary %s", n.name, name, v.Epoch, v.Primary)
			}
			last = v
		}
		return nil
	})
	return last
}

func TestClusterFailover(t *testing.T) {
	t.Run("primary is a follower", func(t *testing.T) {
		tn := startNet(t, 3)
		creator := tn.follower()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		v, err := creator.c.CreateVolume(ctx, "db", 3)
		if err != nil {
			t.Fatal(err)
		}
		if v.Primary != creator.name || v.Epoch != 1 || len(v.ReplicaNodes) != 2 || slices.Contains(v.ReplicaNodes, creator.name) {
			t.Fatalf("created %+v; want primary %s, epoch 1, two other replicas", v, creator.name)
		}
		tn.waitVolume("db")
		if _, err := creator.c.CreateVolume(ctx, "db", 1); !errors.Is(err, ErrVolumeExists) {
			t.Fatalf("second create: %v, want ErrVolumeExists", err)
		}
		if _, err := tn.follower().c.CreateVolume(ctx, "big", 4); !errors.Is(err, ErrNotEnoughNodes) {
			t.Fatalf("create with 4 copies on 3 nodes: %v, want ErrNotEnoughNodes", err)
		}
		// The replica later in name order is ahead, so it must win.
		ahead := v.ReplicaNodes[0]
		if v.ReplicaNodes[1] > ahead {
			ahead = v.ReplicaNodes[1]
		}
		if err := tn.node(ahead).c.ReportProgress(ctx, "db", ahead, 1, 5, time.Now()); err != nil {
			t.Fatal(err)
		}
		testutil.Eventually(t, 10*time.Second, "progress replicated", func() bool {
			for _, n := range tn.up() {
				if got, _ := n.c.Volume("db"); got.Progress[ahead].Seq != 5 {
					return false
				}
			}
			return true
		})
		if got, _ := creator.c.Volume("db"); got.State != StateHealthy {
			t.Fatalf("state before failure = %s, want healthy", got.State)
		}

		tn.stop(creator, false)
		got := tn.waitFailover("db", creator.name)
		if got.Primary != ahead {
			t.Fatalf("new primary %s, want %s (highest progress)", got.Primary, ahead)
		}
		if !slices.Contains(got.ReplicaNodes, creator.name) || len(got.ReplicaNodes) != 2 {
			t.Fatalf("replicas %q should keep the old primary %s", got.ReplicaNodes, creator.name)
		}
		if got.State != StateDegraded {
			t.Fatalf("state after failover = %s, want degraded", got.State)
		}
		survivor := tn.up()[0]
		testutil.Eventually(t, 10*time.Second, "crashed node reported dead", func() bool {
			for _, m := range survivor.c.Members() {
				if m.Name == creator.name {
					return m.Health == HealthDead
				}
			}
			return false
		})

		// The crashed node comes back on the same data and gossip port (a
		// new RPC port): it rejoins Raft as a voter at its new address and
		// sees itself as a replica of the volume it used to lead.
		back := tn.start(nodeOpts{name: creator.name, expect: 3, join: survivor.c.GossipAddr(),
			dataDir: creator.c.cfg.DataDir, gossip: creator.c.GossipAddr()})
		testutil.EventuallyErr(t, 15*time.Second, func() error {
			leader := tn.leader()
			if leader == nil {
				return errors.New("no leader")
			}
			for _, m := range leader.c.Members() {
				if m.Name == back.name && (m.Health != HealthAlive || m.RaftRole != RoleVoter || m.RPCAddr != back.c.cfg.RPCAdvertise) {
					return fmt.Errorf("leader sees restarted node as %+v", m)
				}
			}
			v, ok := back.c.Volume("db")
			if !ok || v.Epoch != 2 || v.Primary != ahead || v.State != StateHealthy {
				return fmt.Errorf("restarted node sees %+v", v)
			}
			return nil
		})
	})

	t.Run("primary is the leader", func(t *testing.T) {
		tn := startNet(t, 3)
		leader := tn.leader()
		if leader == nil {
			t.Fatal("leader lost")
		}
		var others []string
		for _, n := range tn.up() {
			if n != leader {
				others = append(others, n.name)
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		cmd := CreateVolume{Volume: Volume{Name: "web", Replicas: 3, Primary: leader.name, ReplicaNodes: others, Epoch: 1, CreatedAt: time.Now().UTC()}}
		if _, err := tn.follower().c.Apply(ctx, cmd); err != nil {
			t.Fatal(err)
		}
		tn.waitVolume("web")
		if _, err := tn.follower().c.Apply(ctx, cmd); !errors.Is(err, ErrVolumeExists) {
			t.Fatalf("forwarded duplicate create: %v, want ErrVolumeExists", err)
		}
		changes := tn.follower().c.Changes()
		tn.stop(leader, false)
		got := tn.waitFailover("web", leader.name)
		if got.Primary != others[0] {
			t.Fatalf("new primary %s, want %s (equal progress: smaller name)", got.Primary, others[0])
		}
		select {
		case <-changes:
		default:
			t.Fatal("no change signalled")
		}
		newLeader := tn.leader()
		if newLeader == nil {
			t.Fatal("no leader after failover")
		}
		if name, _ := tn.follower().c.Leader(); name != newLeader.name {
			t.Fatalf("follower says leader is %q, want %q", name, newLeader.name)
		}
		// A node started later is added to Raft by the leader.
		late := tn.start(nodeOpts{name: "n4", expect: 3, join: newLeader.c.GossipAddr()})
		testutil.EventuallyErr(t, 15*time.Second, func() error {
			for _, m := range newLeader.c.Members() {
				if m.Name == late.name && (m.Health != HealthAlive || m.RaftRole != RoleVoter) {
					return fmt.Errorf("leader sees late node as %+v", m)
				}
			}
			if v, ok := late.c.Volume("web"); !ok || v.Epoch != 2 {
				return fmt.Errorf("late node sees %+v", v)
			}
			return nil
		})
		// A graceful leave is reported as left, not dead, and the leader
		// drops the node from Raft.
		tn.stop(late, true)
		testutil.EventuallyErr(t, 10*time.Second, func() error {
			for _, m := range newLeader.c.Members() {
				if m.Name == late.name && (m.Health != HealthLeft || m.RaftRole != RoleNone) {
					return fmt.Errorf("leader sees departed node as %+v", m)
				}
			}
			return nil
		})
	})
}
