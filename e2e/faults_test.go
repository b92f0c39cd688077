package e2e

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/tether-io/tether/internal/testutil"
	"github.com/tether-io/tether/proto/tetherpb"
	"github.com/tether-io/tether/replication"
)

// leaderOf returns the Raft leader as h knows it.
func (tp *topo) leaderOf(t *testing.T, h *host) string {
	t.Helper()
	var leader string
	testutil.EventuallyErr(t, 30*time.Second, func() error {
		var st tetherpb.StatusResponse
		if err := tp.ctl(h, &st, "status"); err != nil {
			return err
		}
		if st.Leader == "" {
			return fmt.Errorf("%s knows no leader", h.name)
		}
		leader = st.Leader
		return nil
	})
	return leader
}

// servesAsReplica waits until h no longer serves the volume as primary
// (or serves it fenced) and counts it among the replicas.
func (tp *topo) servesAsReplica(t *testing.T, h *host) {
	t.Helper()
	testutil.EventuallyErr(t, 60*time.Second, func() error {
		var st tetherpb.StatusResponse
		if err := tp.ctl(h, &st, "status"); err != nil {
			return err
		}
		for _, ps := range st.PrimaryOf {
			if ps.Name == "vol" && ps.Error == "" && !fencedAt(&st, "vol", ps.Epoch) {
				return fmt.Errorf("%s still serves vol as primary in epoch %d", h.name, ps.Epoch)
			}
		}
		if !slices.Contains(st.ReplicaOf, "vol") {
			return fmt.Errorf("%s is not a replica of vol yet (replica of %v)", h.name, st.ReplicaOf)
		}
		return nil
	})
}

// TestPausePrimary freezes the host that is both the volume's primary and
// the Raft leader (docker pause) past an election and thaws it: a replica
// is promoted, and the thawed node comes back as a replica (fenced first),
// never as a second primary of an epoch.
func TestPausePrimary(t *testing.T) {
	requireE2E(t)
	tp := startTopo(t, 3)
	old := tp.host(tp.leaderOf(t, tp.host("h1")))
	v := createAndFillOn(t, tp, old)
	fi, paused := tp.inject("pause", old, "primary, leader", old, func() {
		pause(t, []*host{old})
	})
	nv, fo := tp.measureFailover(t, "pause", paused, v, tp.host(v.ReplicaNodes[0]))
	tp.rec.failover(fo)
	// Past the election: the survivors have a leader of their own.
	survivors := hostsExcept(tp, old.name)
	if l := tp.leaderOf(t, survivors[0]); l == old.name {
		t.Fatalf("%s still names the paused %s as leader after the failover", survivors[0].name, l)
	}
	unpause(t, old)
	tp.rec.healed(fi)
	np := tp.host(nv.Primary)
	tp.servesAsReplica(t, old)
	tp.sh(np, fmt.Sprintf(workload, "after"))
	final := tp.quiescent(t, tp.hosts)
	if final.Primary != np.name || final.Epoch != nv.Epoch {
		t.Errorf("after the thaw the catalog says primary %s epoch %d; want %s epoch %d", final.Primary, final.Epoch, np.name, nv.Epoch)
	}
}

// TestRestartReplica restarts a replica's agent while the primary writes
// (docker stop, writes it misses, docker start; then a docker restart):
// no failover, and the replica resumes and converges each time.
func TestRestartReplica(t *testing.T) {
	requireE2E(t)
	tp := startTopo(t, 3)
	v := createAndFill(t, tp)
	primary := tp.host("h1")
	r := tp.host(v.ReplicaNodes[0])
	fi, _ := tp.inject("restart", r, "replica", primary, func() {
		mustDocker(t, "stop", "-t", "10", r.container)
	})
	tp.sh(primary, fmt.Sprintf(workload, "while-stopped"))
	mustDocker(t, "start", r.container)
	tp.resumed(t, r)
	tp.rec.healed(fi)
	tp.quiescent(t, tp.hosts)
	fi, _ = tp.inject("restart", r, "replica", primary, func() {
		mustDocker(t, "restart", "-t", "10", r.container)
	})
	tp.sh(primary, fmt.Sprintf(workload, "after-restart"))
	tp.resumed(t, r)
	tp.rec.healed(fi)
	final := tp.quiescent(t, tp.hosts)
	if final.Primary != primary.name || final.Epoch != v.Epoch {
		tp.rec.update(func(r *report) { r.FalseFailovers++ })
		t.Errorf("a replica restart moved the volume: primary %s epoch %d; want %s epoch %d", final.Primary, final.Epoch, primary.name, v.Epoch)
	}
}

// resumed waits until the restarted r knows a leader and counts itself a
// replica of the volume.
func (tp *topo) resumed(t *testing.T, r *host) {
	t.Helper()
	testutil.EventuallyErr(t, 60*time.Second, func() error {
		var st tetherpb.StatusResponse
		if err := tp.ctl(r, &st, "status"); err != nil {
			return err
		}
		if st.Leader == "" || !slices.Contains(st.ReplicaOf, "vol") {
			return fmt.Errorf("restarted %s: leader %q, replica of %v", r.name, st.Leader, st.ReplicaOf)
		}
		return nil
	})
}

// TestIsolatedLeader cuts the Raft leader, which is not the volume's
// primary, off the network: the majority elects another leader and the
// volume keeps its primary (no false failover); writes keep replicating to
// the connected replica; healed, the old leader converges as a replica.
func TestIsolatedLeader(t *testing.T) {
	requireE2E(t)
	tp := startTopo(t, 3)
	leader := tp.host(tp.leaderOf(t, tp.host("h1")))
	p := hostsExcept(tp, leader.name)[0]
	var v tetherpb.Volume
	if err := tp.ctl(p, &v, "volume", "create", "vol", "--replicas", "3"); err != nil {
		t.Fatal(err)
	}
	if v.Primary != p.name {
		t.Fatalf("created %+v; want primary %s", &v, p.name)
	}
	testutil.EventuallyErr(t, 30*time.Second, func() error {
		return replication.SameTree(p.volumeDir("vol"), leader.volumeDir("vol"))
	})
	fi, _ := tp.inject("disconnect", leader, "leader, replica", p, func() { tp.disconnect(leader) })
	majority := hostsExcept(tp, leader.name)
	testutil.EventuallyErr(t, 30*time.Second, func() error {
		l := tp.leaderOf(t, majority[0])
		if l == leader.name {
			return fmt.Errorf("%s still follows the isolated leader", majority[0].name)
		}
		return nil
	})
	tp.sh(p, fmt.Sprintf(workload, "during-isolation"))
	// Longer than detection + election + the new leader's lease wait,
	// after which a (false) failover would have happened.
	tp.noFailover(t, majority, &v, 12*time.Second)
	for _, h := range majority {
		if h != p {
			testutil.EventuallyErr(t, 30*time.Second, func() error { return replication.SameTree(p.volumeDir("vol"), h.volumeDir("vol")) })
		}
	}
	tp.reconnect(leader)
	tp.rec.healed(fi)
	final := tp.quiescent(t, tp.hosts)
	if final.Primary != p.name || final.Epoch != v.Epoch {
		tp.rec.update(func(r *report) { r.FalseFailovers++ })
		t.Errorf("isolating the leader moved the volume: primary %s epoch %d; want %s epoch %d", final.Primary, final.Epoch, p.name, v.Epoch)
	}
}

// TestSplitFiveHosts splits five hosts into a minority (the primary and a
// replica, each disconnected) and a majority holding the third copy: the
// majority promotes it, the minority commits nothing and its primary
// fences itself; healed, all five agree and every copy converges.
func TestSplitFiveHosts(t *testing.T) {
	requireE2E(t)
	tp := startTopo(t, 5)
	v := createAndFill(t, tp)
	old := tp.host(v.Primary)
	r1, r2 := tp.host(v.ReplicaNodes[0]), tp.host(v.ReplicaNodes[1])
	f1, split := tp.inject("disconnect", old, "primary", old, func() { tp.disconnect(old) })
	f2, _ := tp.inject("disconnect", r1, "replica", nil, func() { tp.disconnect(r1) })
	nv, fo := tp.measureFailover(t, "split 2|3", split, v, r2)
	tp.rec.failover(fo)
	if nv.Primary != r2.name {
		t.Fatalf("the majority promoted %s; want %s, the only copy it holds", nv.Primary, r2.name)
	}
	// The minority cannot commit: its primary fences itself and no node of
	// it sees a newer epoch than it had.
	testutil.EventuallyErr(t, 30*time.Second, func() error {
		var st tetherpb.StatusResponse
		if err := tp.ctl(old, &st, "status"); err != nil {
			return err
		}
		if st.LeaseHeld || !fencedAt(&st, "vol", v.Epoch) {
			return fmt.Errorf("isolated %s is not fenced: lease %v, fenced %v", old.name, st.LeaseHeld, st.Fenced)
		}
		return nil
	})
	for _, h := range []*host{old, r1} {
		if cv, err := tp.catalogOn(h); err == nil && cv.Epoch != v.Epoch {
			t.Errorf("minority host %s committed a catalog change: epoch %d", h.name, cv.Epoch)
		}
	}
	tp.sh(r2, fmt.Sprintf(workload, "after-split"))
	tp.reconnect(old)
	tp.rec.healed(f1)
	tp.reconnect(r1)
	tp.rec.healed(f2)
	final := tp.quiescent(t, tp.hosts)
	if final.Epoch < nv.Epoch {
		t.Errorf("after healing the catalog is at epoch %d, before the failover's %d", final.Epoch, nv.Epoch)
	}
}
