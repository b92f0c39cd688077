package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/tether-io/tether/internal/testutil"
	"github.com/tether-io/tether/proto/tetherpb"
	"github.com/tether-io/tether/replication"
)

const workload = `
mkdir -p /var/lib/tether/volumes/vol/data/%[1]s/sub/deeper
for i in 1 2 3 4 5; do echo "row $i of %[1]s" > /var/lib/tether/volumes/vol/data/%[1]s/sub/deeper/f$i; done
dd if=/dev/urandom of=/var/lib/tether/volumes/vol/data/%[1]s/blob bs=64k count=16 2>/dev/null
echo config > /var/lib/tether/volumes/vol/data/%[1]s/conf.tmp
mv /var/lib/tether/volumes/vol/data/%[1]s/conf.tmp /var/lib/tether/volumes/vol/data/%[1]s/conf
chmod 600 /var/lib/tether/volumes/vol/data/%[1]s/conf
ln -s conf /var/lib/tether/volumes/vol/data/%[1]s/conf.link
rm /var/lib/tether/volumes/vol/data/%[1]s/sub/deeper/f5
`

// createAndFill creates volume "vol" on h1 and waits until both replicas
// hold what a workload wrote on the primary.
func createAndFill(t *testing.T, tp *topo) *tetherpb.Volume {
	t.Helper()
	return createAndFillOn(t, tp, tp.host("h1"))
}

// createAndFillOn is createAndFill with primary as the creating node.
func createAndFillOn(t *testing.T, tp *topo, primary *host) *tetherpb.Volume {
	t.Helper()
	var v tetherpb.Volume
	if err := tp.ctl(primary, &v, "volume", "create", "vol", "--replicas", "3"); err != nil {
		t.Fatal(err)
	}
	if v.Primary != primary.name || len(v.ReplicaNodes) != 2 || v.Epoch != 1 {
		t.Fatalf("created %+v; want primary %s, two replicas, epoch 1", &v, primary.name)
	}
	testutil.Eventually(t, 20*time.Second, "the primary's volume directory exists", func() bool {
		_, err := os.Stat(primary.volumeDir("vol"))
		return err == nil
	})
	tp.sh(primary, fmt.Sprintf(workload, "before"))
	for _, r := range v.ReplicaNodes {
		testutil.EventuallyErr(t, 30*time.Second, func() error {
			return replication.SameTree(primary.volumeDir("vol"), tp.host(r).volumeDir("vol"))
		})
	}
	tp.progressRecorded(t, primary)
	return &v
}

// progressRecorded waits until the catalog holds, for every replica, a
// batch the replica made durable, so that the failover measured starts
// from a catalog that knows how far each copy got.
func (tp *topo) progressRecorded(t *testing.T, primary *host) {
	t.Helper()
	testutil.EventuallyErr(t, 30*time.Second, func() error {
		v, err := tp.catalogOn(primary)
		if err != nil {
			return err
		}
		seq := map[string]uint64{}
		for _, p := range v.Progress {
			seq[p.Node] = p.Seq
		}
		for _, r := range v.ReplicaNodes {
			if seq[r] == 0 {
				return fmt.Errorf("the catalog records no batch of %s yet (progress %v)", r, v.Progress)
			}
		}
		return nil
	})
}

// TestKillPrimaryHost kills the container of the volume's primary (host
// death): a replica is promoted in epoch 2 holding everything the primary
// had replicated, and replicates to the survivor.
func TestKillPrimaryHost(t *testing.T) {
	requireE2E(t)
	tp := startTopo(t, 3)
	v := createAndFill(t, tp)
	before, err := replication.Manifest(tp.host("h1").volumeDir("vol"))
	if err != nil {
		t.Fatal(err)
	}
	_, killed := tp.inject("kill", tp.host("h1"), "primary", tp.host("h1"), func() {
		mustDocker(t, "kill", tp.host("h1").container)
	})
	nv, fo := tp.measureFailover(t, "kill", killed, v, tp.host(v.ReplicaNodes[0]))
	tp.rec.failover(fo)
	if nv.Epoch != v.Epoch+1 {
		t.Fatalf("after the failover the epoch is %d; want %d", nv.Epoch, v.Epoch+1)
	}
	np := tp.host(nv.Primary)
	got, err := replication.Manifest(np.volumeDir("vol"))
	if err != nil {
		t.Fatal(err)
	}
	if d := replication.DiffManifests(before, got); len(d) > 0 {
		t.Fatalf("the promoted copy differs from the dead primary's: %v", d)
	}
	tp.sh(np, fmt.Sprintf(workload, "after"))
	survivor := v.ReplicaNodes[0]
	if survivor == nv.Primary {
		survivor = v.ReplicaNodes[1]
	}
	testutil.EventuallyErr(t, 30*time.Second, func() error {
		return replication.SameTree(np.volumeDir("vol"), tp.host(survivor).volumeDir("vol"))
	})
}

// TestIsolatedPrimary disconnects the primary's host from the network: the
// majority promotes a replica; what the isolated old primary writes in its
// old epoch never reaches the new primary; when the network heals, the old
// primary steps down and resynchronises as a replica.
func TestIsolatedPrimary(t *testing.T) {
	requireE2E(t)
	tp := startTopo(t, 3)
	v := createAndFill(t, tp)
	old := tp.host("h1")
	fi, cut := tp.inject("disconnect", old, "primary", old, func() { tp.disconnect(old) })
	nv, fo := tp.measureFailover(t, "disconnect", cut, v, tp.host(v.ReplicaNodes[0]))
	tp.rec.failover(fo)
	np := tp.host(nv.Primary)

	// Cut off from the quorum, the old primary's lease lapsed: it fenced
	// itself (no leader could have promoted h2 before that).
	testutil.EventuallyErr(t, 20*time.Second, func() error {
		var st tetherpb.StatusResponse
		if err := tp.ctl(old, &st, "status"); err != nil {
			return err
		}
		if st.LeaseHeld || len(st.Fenced) != 1 || st.Fenced[0].Name != "vol" {
			return fmt.Errorf("isolated h1 is not fenced: lease %v, fenced %v", st.LeaseHeld, st.Fenced)
		}
		return nil
	})
	// What a workload still writes there belongs to the old epoch.
	tp.sh(old, "echo stale > /var/lib/tether/volumes/vol/data/stale-epoch-write")
	tp.sh(np, fmt.Sprintf(workload, "after"))

	tp.reconnect(old)
	tp.rec.healed(fi)
	// Healed: h1 follows the catalog, stops serving as primary and becomes a
	// replica of the new primary, whose tree it converges to.
	testutil.EventuallyErr(t, 90*time.Second, func() error {
		return replication.SameTree(np.volumeDir("vol"), old.volumeDir("vol"))
	})
	if _, err := os.Lstat(filepath.Join(np.volumeDir("vol"), "stale-epoch-write")); err == nil {
		t.Fatal("a write of the old epoch reached the new primary")
	}
	for _, h := range tp.hosts {
		testutil.EventuallyErr(t, 30*time.Second, func() error {
			vi, err := tp.inspect(h, "vol")
			if err != nil {
				return err
			}
			if vi.Volume.Primary != nv.Primary || vi.Volume.Epoch != nv.Epoch {
				return fmt.Errorf("%s sees primary %s epoch %d; want %s epoch %d", h.name, vi.Volume.Primary, vi.Volume.Epoch, nv.Primary, nv.Epoch)
			}
			return nil
		})
	}
}
