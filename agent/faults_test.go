package agent

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/tether-io/tether/cluster"
	"github.com/tether-io/tether/internal/faultnet"
	"github.com/tether-io/tether/internal/testutil"
	"github.com/tether-io/tether/proto/tetherpb"
	"github.com/tether-io/tether/replication"
)

// faultCluster is n agents in this process whose RPC and gossip go through
// a faultnet.Network, watched by an invariant checker.
type faultCluster struct {
	*testCluster
	net   *faultnet.Network
	names []string
	check *checker
}

func startFaultCluster(t *testing.T, n int, seed uint64) *faultCluster {
	t.Helper()
	fn := faultnet.New(seed)
	fc := &faultCluster{testCluster: &testCluster{t: t, ctl: map[string]tetherpb.ControlClient{}}, net: fn}
	log := testutil.Logger(t)
	var join []string
	for i := 1; i <= n; i++ {
		name := fmt.Sprintf("n%d", i)
		a, err := New(Config{
			NodeName: name, DataDir: t.TempDir(), GossipAddr: "127.0.0.1:0", RPCAddr: "127.0.0.1:0",
			Join: join, BootstrapExpect: min(n, 3), Logger: log,
			Dial: fn.Dialer(name), WrapGossipTransport: fn.Transport(name),
		})
		if err != nil {
			t.Fatal(err)
		}
		if err := a.Start(context.Background()); err != nil {
			t.Fatalf("starting %s: %v", name, err)
		}
		t.Cleanup(a.Kill)
		fn.Register(name, a.GossipAddr(), a.RPCAddr())
		if join == nil {
			join = []string{a.GossipAddr()}
		}
		conn, err := grpc.NewClient("unix://"+a.SocketPath(), grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		fc.ctl[name] = tetherpb.NewControlClient(conn)
		fc.agents = append(fc.agents, a)
		fc.names = append(fc.names, name)
	}
	// Forming is not what these tests check: under the full suite's load
	// with -race on two cores, five nodes took longer than 30 s once.
	testutil.EventuallyErr(t, 60*time.Second, func() error {
		for _, a := range fc.agents {
			if l, _ := a.Cluster().Leader(); l == "" {
				return fmt.Errorf("%s knows no leader", a.NodeName())
			}
			alive := 0
			for _, m := range a.Cluster().Members() {
				if m.Health == cluster.HealthAlive && m.RaftRole != cluster.RoleNone {
					alive++
				}
			}
			if alive != n {
				return fmt.Errorf("%s sees %d of %d members alive in raft", a.NodeName(), alive, n)
			}
		}
		return nil
	})
	fc.check = startChecker(t, fc.agents)
	return fc
}

func (fc *faultCluster) create(t *testing.T, on, name string, replicas uint32) *tetherpb.Volume {
	t.Helper()
	resp, err := fc.ctl[on].VolumeCreate(context.Background(), &tetherpb.VolumeCreateRequest{Name: name, Replicas: replicas})
	if err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 10*time.Second, "the primary serves "+name, func() bool {
		_, ok := fc.agent(on).primaryStatus(name)
		return ok
	})
	return resp.Volume
}

// volumeAt waits until node's catalog shows volume at epoch or later.
func (fc *faultCluster) volumeAt(t *testing.T, node, volume string, epoch uint64, within time.Duration) cluster.Volume {
	t.Helper()
	var v cluster.Volume
	testutil.EventuallyErr(t, within, func() error {
		var ok bool
		v, ok = fc.agent(node).Cluster().Volume(volume)
		if !ok || v.Epoch < epoch {
			return fmt.Errorf("%s sees %s at epoch %d, want %d", node, volume, v.Epoch, epoch)
		}
		return nil
	})
	return v
}

// converged waits until every copy of volume equals its primary's.
func (fc *faultCluster) converged(t *testing.T, volume string, within time.Duration) {
	t.Helper()
	testutil.EventuallyErr(t, within, func() error {
		var v cluster.Volume
		for i, a := range fc.agents {
			w, _ := a.Cluster().Volume(volume)
			if i > 0 && (w.Epoch != v.Epoch || w.Primary != v.Primary) {
				return fmt.Errorf("catalogs disagree: %s sees %s@%d, %s sees %s@%d", fc.agents[0].NodeName(), v.Primary, v.Epoch, a.NodeName(), w.Primary, w.Epoch)
			}
			v = w
		}
		p := fc.agent(v.Primary)
		if _, ok := p.primaryStatus(volume); !ok {
			return fmt.Errorf("%s does not serve %s yet", v.Primary, volume)
		}
		for _, r := range v.ReplicaNodes {
			if err := replication.SameTree(p.VolumePaths(volume).Data, fc.agent(r).VolumePaths(volume).Data); err != nil {
				return err
			}
		}
		return nil
	})
}

// checker samples every agent and records violations of the safety
// contract: two agents serving one volume as primary at the same moment,
// two primaries in one epoch, an epoch going back, a promotion beyond the
// max lag.
type checker struct {
	t      *testing.T
	agents []*Agent
	stop   chan struct{}
	done   chan struct{}

	mu         sync.Mutex
	violations []string
	samples    int
	epochSeen  map[string]map[string]uint64 // node → volume → newest epoch seen
	ownerOf    map[string]string            // volume@epoch → primary
	last       map[string]cluster.Volume    // volume → newest record seen
}

func startChecker(t *testing.T, agents []*Agent) *checker {
	c := &checker{t: t, agents: agents, stop: make(chan struct{}), done: make(chan struct{}),
		epochSeen: map[string]map[string]uint64{}, ownerOf: map[string]string{}, last: map[string]cluster.Volume{}}
	go func() {
		defer close(c.done)
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-c.stop:
				return
			case <-tick.C:
				c.sample()
			}
		}
	}()
	t.Cleanup(func() {
		close(c.stop)
		<-c.done
		c.mu.Lock()
		defer c.mu.Unlock()
		for _, v := range c.violations {
			t.Errorf("SAFETY VIOLATION: %s", v)
		}
		t.Logf("invariant checker: %d samples, %d violations", c.samples, len(c.violations))
	})
	return c
}

func (c *checker) violate(format string, args ...any) {
	c.violations = append(c.violations, fmt.Sprintf(format, args...))
}

func (c *checker) sample() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.samples++
	serving := map[string][]string{}
	for _, a := range c.agents {
		node := a.NodeName()
		a.mu.Lock()
		for vol, rp := range a.primaries {
			serving[vol] = append(serving[vol], fmt.Sprintf("%s@%d", node, rp.epoch))
			key := fmt.Sprintf("%s@%d", vol, rp.epoch)
			if owner, ok := c.ownerOf[key]; ok && owner != node {
				c.violate("volume %s has two primaries in epoch %d: %s and %s", vol, rp.epoch, owner, node)
			}
			c.ownerOf[key] = node
		}
		a.mu.Unlock()
		if c.epochSeen[node] == nil {
			c.epochSeen[node] = map[string]uint64{}
		}
		for _, v := range a.Cluster().Volumes() {
			if prev := c.epochSeen[node][v.Name]; v.Epoch < prev {
				c.violate("%s's catalog moved %s back from epoch %d to %d", node, v.Name, prev, v.Epoch)
			}
			c.epochSeen[node][v.Name] = v.Epoch
			if last, ok := c.last[v.Name]; ok && v.Epoch == last.Epoch+1 {
				if behind, blocked := cluster.FailoverBlocked(last, v.Primary); blocked {
					c.violate("%s promoted to primary of %s %s behind, beyond its max lag %s", v.Primary, v.Name, behind, last.MaxLag)
				}
			}
			if last, ok := c.last[v.Name]; !ok || v.Epoch >= last.Epoch {
				c.last[v.Name] = v
			}
		}
	}
	for vol, who := range serving {
		if len(who) > 1 {
			c.violate("volume %s served as primary by %v at the same moment", vol, who)
		}
	}
}

// TestFaultIsolatedPrimaryWhileWriting: the primary is cut off while a
// workload writes to it. It fences itself, a replica is promoted (after
// the lease), what the old primary wrote meanwhile never reaches the new
// epoch, and after healing it follows the new primary.
func TestFaultIsolatedPrimaryWhileWriting(t *testing.T) {
	fc := startFaultCluster(t, 3, 1)
	old := fc.follower()
	v := fc.create(t, old.NodeName(), "vol1", 3)
	writeTree(t, old.VolumePaths("vol1").Data, "before")
	fc.converged(t, "vol1", 15*time.Second)

	fc.net.Isolate(old.NodeName(), fc.names)
	deadline := time.Now().Add(30 * time.Second)
	testutil.Every(context.Background(), 10*time.Millisecond, func(i int) bool { // the workload keeps writing on the isolated primary
		if err := os.WriteFile(filepath.Join(old.VolumePaths("vol1").Data, "late-"+strconv.Itoa(i)), []byte("old epoch"), 0o644); err != nil {
			t.Fatal(err)
		}
		if nv, _ := fc.agent(v.ReplicaNodes[0]).Cluster().Volume("vol1"); nv.Epoch >= 2 {
			return false
		}
		if time.Now().After(deadline) {
			t.Fatal("no failover within 30s of isolating the primary")
		}
		return true
	})
	st, err := fc.ctl[old.NodeName()].Status(context.Background(), &tetherpb.StatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if st.LeaseHeld || len(st.Fenced) != 1 {
		t.Fatalf("the isolated primary is not fenced after the failover: lease %v, fenced %v", st.LeaseHeld, st.Fenced)
	}
	nv := fc.volumeAt(t, v.ReplicaNodes[0], "vol1", 2, time.Second)
	fc.net.Heal()
	fc.converged(t, "vol1", 60*time.Second)
	// What the isolated primary wrote after its epoch ended is set aside on
	// it, and shown in its status: never merged, never deleted.
	st, err = fc.ctl[old.NodeName()].Status(context.Background(), &tetherpb.StatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Quarantined) != 1 || st.Quarantined[0].Volume != "vol1" || st.Quarantined[0].Epoch != 1 || st.Quarantined[0].Files == 0 {
		t.Fatalf("quarantine of the old primary: %v", st.Quarantined)
	}
	late, err := filepath.Glob(filepath.Join(st.Quarantined[0].Dir, "late-*"))
	if err != nil || len(late) == 0 {
		t.Fatalf("the late writes are not in the quarantine %s: %v %v", st.Quarantined[0].Dir, late, err)
	}
	entries, err := os.ReadDir(fc.agent(nv.Primary).VolumePaths("vol1").Data)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if len(e.Name()) > 5 && e.Name()[:5] == "late-" {
			t.Fatalf("a write of the old epoch (%s) reached the new primary", e.Name())
		}
	}
}

// TestFaultFiveNodeSplit: a 2|3 split of five nodes. The volume whose
// primary is in the minority fails over to the majority; the one whose
// primary is in the majority stays put; after healing both converge.
func TestFaultFiveNodeSplit(t *testing.T) {
	fc := startFaultCluster(t, 5, 2)
	minority := fc.create(t, "n1", "minor", 3)
	majority := fc.create(t, "n4", "major", 3)
	fc.converged(t, "minor", 15*time.Second)
	fc.converged(t, "major", 15*time.Second)
	var inMajority string
	for _, r := range minority.ReplicaNodes {
		if r != "n2" {
			inMajority = r
		}
	}
	if inMajority == "" {
		t.Skipf("placement put every copy of minor in the minority: %v", minority.ReplicaNodes)
	}
	fc.net.Partition([]string{"n1", "n2"}, []string{"n3", "n4", "n5"})
	nv := fc.volumeAt(t, "n3", "minor", 2, 30*time.Second)
	if nv.Primary == "n1" || nv.Primary == "n2" {
		t.Fatalf("promoted %s, which is in the minority", nv.Primary)
	}
	if mv, _ := fc.agent("n3").Cluster().Volume("major"); mv.Epoch != majority.Epoch || mv.Primary != "n4" {
		t.Fatalf("the majority's own volume moved: %+v", mv)
	}
	fc.net.Heal()
	fc.converged(t, "minor", 60*time.Second)
	fc.converged(t, "major", 30*time.Second)
}

// TestFaultDelayAndLossNoFalseFailover: 30 ms of delay on every send and 5%
// gossip loss for several seconds fail nothing over.
func TestFaultDelayAndLossNoFalseFailover(t *testing.T) {
	fc := startFaultCluster(t, 3, 3)
	fc.create(t, "n1", "vol1", 3)
	fc.converged(t, "vol1", 15*time.Second)
	fc.net.Degrade(30*time.Millisecond, 0.05)
	deadline := time.Now().Add(8 * time.Second)
	testutil.Every(context.Background(), 200*time.Millisecond, func(int) bool {
		writeTree(t, fc.agent("n1").VolumePaths("vol1").Data, "t"+strconv.FormatInt(time.Now().UnixNano(), 10))
		for _, a := range fc.agents {
			if v, _ := a.Cluster().Volume("vol1"); v.Epoch != 1 {
				t.Fatalf("false failover under delay and loss: %s sees %+v", a.NodeName(), v)
			}
		}
		return time.Now().Before(deadline)
	})
	t.Logf("gossip packets dropped: %d", fc.net.Dropped())
	fc.net.Heal()
	fc.converged(t, "vol1", 30*time.Second)
}

// TestChaosSeeded runs random partitions, isolations and degradations
// against a 5-node cluster with a workload, checking the safety invariants
// all along and convergence at the end. TETHER_CHAOS_SEED replays a run;
// TETHER_CHAOS_DURATION sets its length (default 2m).
func TestChaosSeeded(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("TETHER_CHAOS_SEED"); s != "" {
		var err error
		if seed, err = strconv.ParseUint(s, 10, 64); err != nil {
			t.Fatalf("TETHER_CHAOS_SEED: %v", err)
		}
	}
	duration := 2 * time.Minute
	if d := os.Getenv("TETHER_CHAOS_DURATION"); d != "" {
		var err error
		if duration, err = time.ParseDuration(d); err != nil {
			t.Fatalf("TETHER_CHAOS_DURATION: %v", err)
		}
	}
	t.Logf("chaos seed %d (replay with TETHER_CHAOS_SEED=%d), duration %s", seed, seed, duration)
	rng := rand.New(rand.NewPCG(seed, 1))
	fc := startFaultCluster(t, 5, seed)
	vols := []string{"a", "b", "c"}
	for i, name := range vols {
		fc.create(t, fc.names[i], name, 3)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // the workload runs where the volume is served, as a container would
		defer wg.Done()
		testutil.Every(ctx, 20*time.Millisecond, func(i int) bool {
			for _, name := range vols {
				for _, a := range fc.agents {
					if _, serving := a.primaryStatus(name); serving {
						_ = os.WriteFile(filepath.Join(a.VolumePaths(name).Data, fmt.Sprintf("w%d", i%50)), []byte(strconv.Itoa(i)), 0o644)
					}
				}
			}
			return true
		})
	}()
	end := time.Now().Add(duration)
	for round := 1; time.Now().Before(end); round++ {
		fault := ""
		switch rng.IntN(4) {
		case 0:
			n := fc.names[rng.IntN(len(fc.names))]
			fc.net.Isolate(n, fc.names)
			fault = "isolate " + n
		case 1:
			perm := rng.Perm(len(fc.names))
			var a, b []string
			for i, p := range perm {
				if i < 2 {
					a = append(a, fc.names[p])
				} else {
					b = append(b, fc.names[p])
				}
			}
			fc.net.Partition(a, b)
			fault = fmt.Sprintf("split %v | %v", a, b)
		case 2:
			fc.net.Degrade(time.Duration(5+rng.IntN(30))*time.Millisecond, 0.05*rng.Float64())
			fault = "degrade"
		default:
			fault = "none"
		}
		hold := time.Duration(2000+rng.IntN(4000)) * time.Millisecond
		t.Logf("round %d: %s for %s", round, fault, hold)
		<-time.After(hold) // the fault lasts this long: that is the experiment
		fc.net.Heal()
		<-time.After(time.Duration(1000+rng.IntN(3000)) * time.Millisecond) // and the calm after it
	}
	cancel()
	wg.Wait()
	fc.net.Heal()
	for _, name := range vols {
		fc.converged(t, name, 90*time.Second)
	}
}

// TestFaultLeaderLostMidCommit: a catalog write forwarded to the leader
// while the leader is cut off. Whatever the client is told must match what
// happened: success exactly when the volume exists once the cluster heals.
func TestFaultLeaderLostMidCommit(t *testing.T) {
	fc := startFaultCluster(t, 3, 4)
	leader, follower := fc.leader(), fc.follower()
	fc.net.Degrade(40*time.Millisecond, 0) // the leader's appends arrive late
	errc := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_, err := fc.ctl[follower.NodeName()].VolumeCreate(ctx, &tetherpb.VolumeCreateRequest{Name: "vol1", Replicas: 2})
		errc <- err
	}()
	<-time.After(45 * time.Millisecond) // cut the leader off while the write is in flight
	fc.net.Isolate(leader.NodeName(), fc.names)
	err := <-errc
	fc.net.Heal()
	var exists bool
	testutil.EventuallyErr(t, 30*time.Second, func() error {
		var seen []bool
		for _, a := range fc.agents {
			_, ok := a.Cluster().Volume("vol1")
			seen = append(seen, ok)
		}
		for _, s := range seen[1:] {
			if s != seen[0] {
				return fmt.Errorf("catalogs disagree on vol1: %v", seen)
			}
		}
		exists = seen[0]
		return nil
	})
	t.Logf("create answered %v; the volume exists: %v", err, exists)
	if (err == nil) != exists {
		t.Fatalf("the client was told %v but the volume exists=%v", err, exists)
	}
}
