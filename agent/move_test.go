package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tether-io/tether/cluster"
	"github.com/tether-io/tether/internal/testutil"
	"github.com/tether-io/tether/proto/tetherpb"
	"github.com/tether-io/tether/replication"
)

func createSynced(t *testing.T, tc *testCluster, primary *Agent, name string) *tetherpb.Volume {
	t.Helper()
	resp, err := tc.ctl[primary.NodeName()].VolumeCreate(context.Background(), &tetherpb.VolumeCreateRequest{Name: name, Replicas: 3})
	if err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 10*time.Second, "the primary serves the volume", func() bool {
		_, ok := primary.primaryStatus(name)
		return ok
	})
	src := primary.VolumePaths(name).Data
	writeTree(t, src, "before")
	for _, r := range resp.Volume.ReplicaNodes {
		testutil.EventuallyErr(t, 15*time.Second, func() error { return replication.SameTree(src, tc.agent(r).VolumePaths(name).Data) })
	}
	return resp.Volume
}

// TestPlannedMove: a quiet volume moves to a replica in the next epoch with
// every byte, and the old primary follows it as a replica.
func TestPlannedMove(t *testing.T) {
	tc := startTestCluster(t)
	from := tc.agents[0]
	v := createSynced(t, tc, from, "vol1")
	to := v.ReplicaNodes[0]
	before, err := replication.Manifest(from.VolumePaths("vol1").Data)
	if err != nil {
		t.Fatal(err)
	}
	// Asked through the third node: the request travels to the primary.
	via := v.ReplicaNodes[1]
	resp, err := tc.ctl[via].VolumeMove(context.Background(), &tetherpb.VolumeMoveRequest{Name: "vol1", To: to, WaitMs: 10000})
	if err != nil {
		t.Fatalf("move: %v", err)
	}
	if resp.Volume.Primary != to || resp.Volume.Epoch != 2 {
		t.Fatalf("after move: %+v", resp.Volume)
	}
	got, err := replication.Manifest(tc.agent(to).VolumePaths("vol1").Data)
	if err != nil {
		t.Fatal(err)
	}
	if d := replication.DiffManifests(before, got); len(d) > 0 {
		t.Fatalf("the move lost data: %v", d)
	}
	newPrimary := tc.agent(to)
	testutil.Eventually(t, 10*time.Second, "the new primary serves the volume", func() bool {
		_, ok := newPrimary.primaryStatus("vol1")
		return ok
	})
	writeTree(t, newPrimary.VolumePaths("vol1").Data, "after")
	testutil.EventuallyErr(t, 15*time.Second, func() error {
		return replication.SameTree(newPrimary.VolumePaths("vol1").Data, from.VolumePaths("vol1").Data)
	})
}

// TestMoveRefusedWhileWritten: a move explains that writers are active and
// changes nothing.
func TestMoveRefusedWhileWritten(t *testing.T) {
	tc := startTestCluster(t)
	from := tc.agents[0]
	v := createSynced(t, tc, from, "vol1")
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		testutil.Every(ctx, 20*time.Millisecond, func(i int) bool {
			_ = os.WriteFile(filepath.Join(from.VolumePaths("vol1").Data, "busy"), []byte(fmt.Sprint(i)), 0o644)
			return true
		})
	}()
	defer func() { cancel(); wg.Wait() }()
	_, err := from.Move(context.Background(), "vol1", v.ReplicaNodes[0], 2*time.Second)
	if !errors.Is(err, ErrWritersActive) || !strings.Contains(err.Error(), "stop the containers") {
		t.Fatalf("move of a busy volume: %v; want ErrWritersActive with advice", err)
	}
	now, _ := from.Cluster().Volume("vol1")
	if now.Primary != from.NodeName() || now.Epoch != 1 {
		t.Fatalf("a refused move changed the catalog: %+v", now)
	}
}

// TestOperatorPromote: with automatic failover held back, an operator
// promotes a replica of a dead primary, once its lease has lapsed.
func TestOperatorPromote(t *testing.T) {
	tc := startTestClusterWith(t, cluster.Timing{FailoverGrace: time.Hour})
	primary := tc.follower()
	v := createSynced(t, tc, primary, "vol1")
	to := v.ReplicaNodes[0]
	ctl := tc.ctl[v.ReplicaNodes[1]]
	ctx := context.Background()
	if _, err := ctl.VolumePromote(ctx, &tetherpb.VolumePromoteRequest{Name: "vol1", To: to}); err == nil || !strings.Contains(err.Error(), "alive") {
		t.Fatalf("promote with a live primary: %v; want a refusal", err)
	}
	// Progress reaches the catalog in the background (every 500 ms): wait
	// until it shows the target holding the primary's newest batch, so that
	// the promotion below gives up nothing.
	testutil.EventuallyErr(t, 10*time.Second, func() error {
		cv, _ := primary.Cluster().Volume("vol1")
		if cv.Progress[cv.Primary].Seq == 0 {
			return fmt.Errorf("the catalog has no head of %s yet", cv.Primary)
		}
		if b := cluster.Behind(cv, to); b != 0 {
			return fmt.Errorf("the catalog still has %s %s behind", to, b)
		}
		return nil
	})
	primary.Kill()
	var resp *tetherpb.VolumePromoteResponse
	testutil.EventuallyErr(t, 20*time.Second, func() error {
		var err error
		resp, err = ctl.VolumePromote(ctx, &tetherpb.VolumePromoteRequest{Name: "vol1", To: to})
		return err
	})
	if resp.Volume.Primary != to || resp.Volume.Epoch != 2 || resp.BehindMs != 0 {
		t.Fatalf("promoted: %+v behind %dms", resp.Volume, resp.BehindMs)
	}
	if _, err := ctl.VolumePromote(ctx, &tetherpb.VolumePromoteRequest{Name: "vol1", To: "nosuch"}); err == nil {
		t.Fatal("promote to a node without a copy was accepted")
	}
}

// TestDeadServerRemovedAndReplicaReplaced: a node dead past the graces
// leaves the Raft configuration (quorum allowing) and its copies move to a
// spare node, which is filled.
func TestDeadServerRemovedAndReplicaReplaced(t *testing.T) {
	tc := startTestClusterWith(t, cluster.Timing{DeadServerGrace: time.Second, ReplaceGrace: time.Second})
	// A fourth node, as a spare.
	spare, err := New(Config{NodeName: "n4", DataDir: t.TempDir(), GossipAddr: "127.0.0.1:0", RPCAddr: "127.0.0.1:0",
		Join: []string{tc.agents[0].GossipAddr()}, Logger: testutil.Logger(t),
		Timing: cluster.Timing{DeadServerGrace: time.Second, ReplaceGrace: time.Second}})
	if err != nil {
		t.Fatal(err)
	}
	if err := spare.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(spare.Kill)
	primary := tc.leader()
	resp, err := tc.ctl[primary.NodeName()].VolumeCreate(context.Background(), &tetherpb.VolumeCreateRequest{Name: "vol1", Replicas: 2})
	if err != nil {
		t.Fatal(err)
	}
	victim := tc.agent(resp.Volume.ReplicaNodes[0])
	writeTree(t, primary.VolumePaths("vol1").Data, "x")
	victim.Kill()
	testutil.EventuallyErr(t, 30*time.Second, func() error {
		for _, m := range primary.Cluster().Members() {
			if m.Name == victim.NodeName() && m.RaftRole != cluster.RoleNone {
				return fmt.Errorf("%s is still a raft %s", m.Name, m.RaftRole)
			}
		}
		v, _ := primary.Cluster().Volume("vol1")
		if len(v.ReplicaNodes) != 1 || v.ReplicaNodes[0] == victim.NodeName() {
			return fmt.Errorf("replicas still %v", v.ReplicaNodes)
		}
		return replication.SameTree(primary.VolumePaths("vol1").Data, tc.agentOrSpare(v.ReplicaNodes[0], spare).VolumePaths("vol1").Data)
	})
}

func (tc *testCluster) agentOrSpare(name string, spare *Agent) *Agent {
	if name == spare.NodeName() {
		return spare
	}
	return tc.agent(name)
}

// TestVolumeUpdateScales: raising the copy count adds and fills a replica;
// lowering it drops one.
func TestVolumeUpdateScales(t *testing.T) {
	tc := startTestCluster(t)
	primary := tc.agents[0]
	ctl := tc.ctl[primary.NodeName()]
	ctx := context.Background()
	if _, err := ctl.VolumeCreate(ctx, &tetherpb.VolumeCreateRequest{Name: "vol1", Replicas: 2}); err != nil {
		t.Fatal(err)
	}
	writeTree(t, primary.VolumePaths("vol1").Data, "x")
	three := uint32(3)
	if _, err := ctl.VolumeUpdate(ctx, &tetherpb.VolumeUpdateRequest{Name: "vol1", Replicas: &three}); err != nil {
		t.Fatal(err)
	}
	testutil.EventuallyErr(t, 20*time.Second, func() error {
		v, _ := primary.Cluster().Volume("vol1")
		if len(v.ReplicaNodes) != 2 {
			return fmt.Errorf("replicas %v", v.ReplicaNodes)
		}
		for _, r := range v.ReplicaNodes {
			if err := replication.SameTree(primary.VolumePaths("vol1").Data, tc.agent(r).VolumePaths("vol1").Data); err != nil {
				return err
			}
		}
		return nil
	})
	one := uint32(1)
	if _, err := ctl.VolumeUpdate(ctx, &tetherpb.VolumeUpdateRequest{Name: "vol1", Replicas: &one}); err != nil {
		t.Fatal(err)
	}
	testutil.EventuallyErr(t, 20*time.Second, func() error {
		if v, _ := primary.Cluster().Volume("vol1"); len(v.ReplicaNodes) != 0 {
			return fmt.Errorf("replicas %v", v.ReplicaNodes)
		}
		return nil
	})
	if _, err := ctl.VolumeUpdate(ctx, &tetherpb.VolumeUpdateRequest{Name: "vol1"}); err == nil {
		t.Fatal("an update with nothing to change was accepted")
	}
	bad := uint32(99)
	if _, err := ctl.VolumeUpdate(ctx, &tetherpb.VolumeUpdateRequest{Name: "vol1", Replicas: &bad}); err == nil {
		t.Fatal("replicas 99 accepted")
	}
}
