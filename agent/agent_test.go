package agent

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/tether-io/tether/cluster"
	"github.com/tether-io/tether/internal/testutil"
	"github.com/tether-io/tether/proto/tetherpb"
	"github.com/tether-io/tether/replication"
)

// testCluster is three real agents in this process on loopback: real
// memberlist, Raft over TCP, gRPC and inotify.
type testCluster struct {
	t      *testing.T
	agents []*Agent
	ctl    map[string]tetherpb.ControlClient
}

// startTestCluster starts the three agents; opts adjust each one's Config.
func startTestCluster(t *testing.T, opts ...func(*Config)) *testCluster {
	t.Helper()
	return startTestClusterLabeled(t, cluster.Timing{}, nil, opts...)
}

func startTestClusterWith(t *testing.T, timing cluster.Timing) *testCluster {
	t.Helper()
	return startTestClusterLabeled(t, timing, nil)
}

// startTestClusterLabeled gives node n{i+1} the labels labels[i].
// opts adjust each node's Config.
func startTestClusterLabeled(t *testing.T, timing cluster.Timing, labels []map[string]string, opts ...func(*Config)) *testCluster {
	t.Helper()
	log := testutil.Logger(t)
	return startCluster(t, func(i int, join []string) Config {
		cfg := Config{
			NodeName:        fmt.Sprintf("n%d", i+1),
			DataDir:         t.TempDir(),
			GossipAddr:      "127.0.0.1:0",
			RPCAddr:         "127.0.0.1:0",
			HTTPAddr:        "127.0.0.1:0",
			Join:            join,
			BootstrapExpect: 3,
			Logger:          log,
			Timing:          timing,
			Labels:          labelsOf(labels, i),
		}
		for _, o := range opts {
			o(&cfg)
		}
		return cfg
	})
}

// startCluster starts three agents with the configs cfg makes (given the
// node's index and the gossip addresses to join), each with a control
// client, and waits until all know the Raft leader. Everything stops with
// the test.
func startCluster(t *testing.T, cfg func(i int, join []string) Config) *testCluster {
	t.Helper()
	tc := &testCluster{t: t, ctl: map[string]tetherpb.ControlClient{}}
	var join []string
	for i := 0; i < 3; i++ {
		a, err := New(cfg(i, join))
		if err != nil {
			t.Fatal(err)
		}
		if err := a.Start(context.Background()); err != nil {
			t.Fatalf("starting %s: %v", a.NodeName(), err)
		}
		t.Cleanup(a.Kill)
		if join == nil {
			join = []string{a.GossipAddr()}
		}
		conn, err := grpc.NewClient("unix://"+a.SocketPath(), grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		tc.ctl[a.NodeName()] = tetherpb.NewControlClient(conn)
		tc.agents = append(tc.agents, a)
	}
	testutil.Eventually(t, 30*time.Second, "every agent knows the Raft leader", func() bool {
		for _, a := range tc.agents {
			if l, _ := a.Cluster().Leader(); l == "" {
				return false
			}
		}
		return true
	})
	return tc
}

func (tc *testCluster) agent(name string) *Agent {
	for _, a := range tc.agents {
		if a.NodeName() == name {
			return a
		}
	}
	tc.t.Fatalf("no agent %s", name)
	return nil
}

func (tc *testCluster) leader() *Agent {
	l, _ := tc.agents[0].Cluster().Leader()
	return tc.agent(l)
}

func (tc *testCluster) follower() *Agent {
	l, _ := tc.agents[0].Cluster().Leader()
	for _, a := range tc.agents {
		if a.NodeName() != l {
			return a
		}
	}
	return nil
}

func (tc *testCluster) inspect(via, volume string) (*tetherpb.VolumeInspectResponse, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return tc.ctl[via].VolumeInspect(ctx, &tetherpb.VolumeInspectRequest{Name: volume})
}

func writeTree(t *testing.T, root, tag string) {
	t.Helper()
	files := map[string]string{
		tag + "/a.txt":              "alpha " + tag,
		tag + "/nested/deep/b.txt":  strings.Repeat("bravo ", 10000),
		tag + "/empty":              "",
		tag + "/nested/mode600.txt": "secret",
	}
	for p, data := range files {
		full := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(filepath.Join(root, tag, "nested/mode600.txt"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(root, tag, "a.txt"), filepath.Join(root, tag, "renamed.txt")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("renamed.txt", filepath.Join(root, tag, "link")); err != nil {
		t.Fatal(err)
	}
}

func TestFailoverOfFollowerPrimary(t *testing.T) {
	tc := startTestCluster(t)
	runFailover(t, tc, tc.follower())
}

func TestFailoverOfLeaderPrimary(t *testing.T) {
	tc := startTestCluster(t)
	runFailover(t, tc, tc.leader())
}

// runFailover is the demo's scenario: replicate, kill the primary, promote,
// replicate again; trees compared byte for byte at every step.
func runFailover(t *testing.T, tc *testCluster, primary *Agent) {
	ctx := context.Background()
	resp, err := tc.ctl[primary.NodeName()].VolumeCreate(ctx, &tetherpb.VolumeCreateRequest{Name: "vol1", Replicas: 3})
	if err != nil {
		t.Fatalf("volume create: %v", err)
	}
	v := resp.Volume
	if v.Primary != primary.NodeName() || len(v.ReplicaNodes) != 2 || v.Epoch != 1 {
		t.Fatalf("created %+v; want primary %s with 2 replicas at epoch 1", v, primary.NodeName())
	}
	src := primary.VolumePaths("vol1").Data
	testutil.Eventually(t, 10*time.Second, "the primary serves the volume", func() bool {
		_, ok := primary.primaryStatus("vol1")
		return ok
	})
	writeTree(t, src, "before")
	for _, r := range v.ReplicaNodes {
		dst := tc.agent(r).VolumePaths("vol1").Data
		testutil.EventuallyErr(t, 15*time.Second, func() error { return replication.SameTree(src, dst) })
	}
	before, err := replication.Manifest(src)
	if err != nil {
		t.Fatal(err)
	}
	// The lag and acknowledgements are visible through the control API.
	testutil.EventuallyErr(t, 10*time.Second, func() error {
		vi, err := tc.inspect(v.ReplicaNodes[0], "vol1")
		if err != nil {
			return err
		}
		if vi.Status.Error != "" || len(vi.Status.Replicas) != 2 {
			return fmt.Errorf("status %+v", vi.Status)
		}
		for _, rs := range vi.Status.Replicas {
			if !rs.Connected || rs.AckedSeq == 0 || rs.LagMs != 0 || rs.LagBytes != 0 || rs.PendingCuts != 0 {
				return fmt.Errorf("replica %s not caught up: %+v", rs.Node, rs)
			}
		}
		return nil
	})

	primary.Kill()
	survivor := v.ReplicaNodes[0]
	var nv *tetherpb.Volume
	testutil.EventuallyErr(t, 30*time.Second, func() error {
		vi, err := tc.inspect(survivor, "vol1")
		if err != nil {
			return err
		}
		if vi.Volume.Epoch < 2 || vi.Volume.Primary == primary.NodeName() {
			return fmt.Errorf("not failed over yet: primary %s epoch %d", vi.Volume.Primary, vi.Volume.Epoch)
		}
		nv = vi.Volume
		return nil
	})
	if nv.Epoch != 2 || !contains(v.ReplicaNodes, nv.Primary) {
		t.Fatalf("after failover: %+v; want a former replica as primary at epoch 2", nv)
	}
	newPrimary := tc.agent(nv.Primary)
	got, err := replication.Manifest(newPrimary.VolumePaths("vol1").Data)
	if err != nil {
		t.Fatal(err)
	}
	if d := replication.DiffManifests(before, got); len(d) > 0 {
		t.Fatalf("the promoted copy lost data: %v", d)
	}

	// The new primary replicates to the remaining replica.
	other := v.ReplicaNodes[1]
	if other == nv.Primary {
		other = v.ReplicaNodes[0]
	}
	src2 := newPrimary.VolumePaths("vol1").Data
	testutil.Eventually(t, 10*time.Second, "the new primary serves the volume", func() bool {
		_, ok := newPrimary.primaryStatus("vol1")
		return ok
	})
	writeTree(t, src2, "after")
	testutil.EventuallyErr(t, 15*time.Second, func() error {
		return replication.SameTree(src2, tc.agent(other).VolumePaths("vol1").Data)
	})

	// A stream in the old epoch is refused by both survivors, and writes nothing.
	for _, name := range []string{nv.Primary, other} {
		assertStaleRefused(t, tc.agent(name), "vol1", 1)
	}
	testutil.EventuallyErr(t, 5*time.Second, func() error {
		return replication.SameTree(src2, tc.agent(other).VolumePaths("vol1").Data)
	})
}

// assertStaleRefused opens a replication stream in epoch to a and checks
// that it is refused, and that the operations sent write nothing.
func assertStaleRefused(t *testing.T, a *Agent, volume string, epoch uint64) {
	t.Helper()
	conn, err := grpc.NewClient(a.RPCAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := tetherpb.NewReplicationClient(conn).Stream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	_ = st.Send(&tetherpb.StreamRequest{Kind: &tetherpb.StreamRequest_Hello{Hello: &tetherpb.Hello{Volume: volume, Epoch: epoch, PrimaryNode: "impostor"}}})
	_ = st.Send(&tetherpb.StreamRequest{Kind: &tetherpb.StreamRequest_Op{Op: &tetherpb.FileOp{Kind: tetherpb.FileOp_KIND_FILE, Path: []byte("stale.txt"), Data: []byte("old epoch"), Mode: 0o644}}})
	_ = st.Send(&tetherpb.StreamRequest{Kind: &tetherpb.StreamRequest_Commit{Commit: &tetherpb.Commit{Seq: 99, CutUnixNano: time.Now().UnixNano()}}})
	_, err = st.Recv()
	if status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("%s accepted a stream in stale epoch %d: %v", a.NodeName(), epoch, err)
	}
	if _, err := os.Lstat(filepath.Join(a.VolumePaths(volume).Data, "stale.txt")); err == nil {
		t.Fatalf("%s wrote a file sent in stale epoch %d", a.NodeName(), epoch)
	}
}

// TestPrimaryFencesItselfWithoutQuorum: a primary that can no longer reach
// a quorum stops serving its volume once its lease runs out, and says so.
func TestPrimaryFencesItselfWithoutQuorum(t *testing.T) {
	tc := startTestCluster(t)
	primary := tc.follower()
	ctx := context.Background()
	if _, err := tc.ctl[primary.NodeName()].VolumeCreate(ctx, &tetherpb.VolumeCreateRequest{Name: "vol1", Replicas: 2}); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 10*time.Second, "the primary serves the volume", func() bool {
		_, ok := primary.primaryStatus("vol1")
		return ok
	})
	for _, a := range tc.agents {
		if a != primary {
			a.Kill()
		}
	}
	lost := time.Now()
	var st *tetherpb.StatusResponse
	testutil.EventuallyErr(t, 15*time.Second, func() error {
		var err error
		if st, err = tc.ctl[primary.NodeName()].Status(ctx, &tetherpb.StatusRequest{}); err != nil {
			return err
		}
		if st.LeaseHeld || len(st.Fenced) != 1 {
			return fmt.Errorf("not fenced yet: lease held %v, fenced %v", st.LeaseHeld, st.Fenced)
		}
		return nil
	})
	if took := time.Since(lost); took < primary.Cluster().LeaseDuration()-time.Second {
		t.Errorf("fenced after %s, well before the %s lease could lapse", took, primary.Cluster().LeaseDuration())
	}
	if st.Fenced[0].Name != "vol1" || st.Fenced[0].Epoch != 1 {
		t.Fatalf("fenced %+v; want vol1 at epoch 1", st.Fenced[0])
	}
	if _, ok := primary.primaryStatus("vol1"); ok {
		t.Fatal("the fenced primary still runs replication")
	}
}

func labelsOf(labels []map[string]string, i int) map[string]string {
	if i < len(labels) {
		return labels[i]
	}
	return nil
}
