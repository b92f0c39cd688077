package replication

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tether-io/tether/internal/testutil"
)

// replicaErr returns the Status error of one replica.
func replicaErr(p *Primary, node string) string {
	for _, r := range p.Status().Replicas {
		if r.Node == node {
			return r.Err
		}
	}
	return ""
}

// TestStaleEpochRefused fences one replica at epoch 2: a primary of epoch 1
// is refused there (while another replica still takes its data), and a
// primary of epoch 2 is accepted.
func TestStaleEpochRefused(t *testing.T) {
	c := newTestCluster(t)
	fenced := c.startReplica("fenced")
	c.startReplica("witness")
	must(t, fenced.srv.Fence(testVolume, 2))

	c.write("from-epoch-1", "old primary")
	old := c.startPrimary(1, "fenced", "witness")
	testutil.Eventually(t, 10*time.Second, "the fenced replica refuses epoch 1", func() bool {
		return strings.Contains(replicaErr(old, "fenced"), "stale epoch 1 < newest seen 2")
	})
	c.write("later", "written after the refusal")
	c.waitSynced("witness")
	m, err := Manifest(c.replicaPaths("fenced").Data)
	must(t, err)
	if len(m) != 1 { // only the root
		t.Fatalf("a stale primary's data reached the fenced replica: %v", m)
	}
	if e, s, _, err := fenced.srv.Position(testVolume); err != nil || e != 0 || s != 0 {
		t.Fatalf("fenced replica position = %d %d %v, want nothing applied", e, s, err)
	}
	old.Stop()

	p := c.startPrimary(2, "fenced")
	c.waitSynced("fenced")
	testutil.Eventually(t, 5*time.Second, "epoch 2 is accepted", func() bool {
		r := p.Status().Replicas[0]
		return r.Connected && r.Err == "" && r.AckedSeq > 0
	})
	if e, _, _, err := fenced.srv.Position(testVolume); err != nil || e != 2 {
		t.Fatalf("position epoch = %d (%v), want 2", e, err)
	}
}

// TestFenceCutsOffActiveStream raises the epoch while a primary of the older
// one streams: the stream is cut off and nothing more reaches the replica.
func TestFenceCutsOffActiveStream(t *testing.T) {
	c := newTestCluster(t)
	fenced := c.startReplica("fenced")
	c.startReplica("witness")
	c.write("before", "b")
	p := c.startPrimary(1, "fenced", "witness")
	c.waitSynced("fenced", "witness")

	must(t, fenced.srv.FencePaths(testVolume, c.replicaPaths("fenced"), 2))
	testutil.Eventually(t, 10*time.Second, "the stream of epoch 1 is cut off", func() bool {
		return strings.Contains(replicaErr(p, "fenced"), "stale epoch 1 < newest seen 2")
	})
	c.write("after", "a")
	c.waitSynced("witness")
	if _, err := os.Lstat(filepath.Join(c.replicaPaths("fenced").Data, "after")); !os.IsNotExist(err) {
		t.Fatalf("a change of the fenced epoch reached the replica (lstat: %v)", err)
	}
}
