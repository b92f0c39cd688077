package replication

import (
	"crypto/rand"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/tether-io/tether/internal/testutil"
)

// TestEndToEnd replicates a sequence of changes to two replicas through a
// real gRPC server and the real inotify watcher, comparing the trees after
// each step.
func TestEndToEnd(t *testing.T) {
	c := newTestCluster(t)
	// Content present before the primary starts, and junk on a replica that
	// the first (full) batch must remove.
	c.write("before.txt", "old content")
	must(t, os.MkdirAll(c.path("sub/inner"), 0o755))
	c.write("sub/inner/x", "x")
	junk := c.replicaPaths("r1")
	must(t, os.MkdirAll(junk.Data+"/junkdir", 0o755))
	must(t, os.WriteFile(junk.Data+"/junkdir/j", []byte("junk"), 0o644))
	must(t, os.WriteFile(junk.Data+"/before.txt", []byte("stale"), 0o600))

	c.startReplica("r1")
	c.startReplica("r2")
	p := c.startPrimary(1, "r1", "r2")
	c.waitSynced("r1", "r2")

	big := make([]byte, 3*chunkSize+12345)
	_, _ = rand.Read(big)
	steps := []struct {
		name string
		do   func()
	}{
		{"create files", func() {
			c.write("a.txt", "hello")
			c.write("sub/b.txt", "bee")
		}},
		{"append and overwrite", func() {
			f, err := os.OpenFile(c.path("a.txt"), os.O_APPEND|os.O_WRONLY, 0)
			must(t, err)
			_, err = f.WriteString(" world")
			must(t, err)
			must(t, f.Close())
			c.write("sub/b.txt", "b")
		}},
		{"empty file and large file", func() {
			c.write("empty", "")
			must(t, os.WriteFile(c.path("big.bin"), big, 0o640))
		}},
		{"mkdir -p deep with a file", func() {
			must(t, os.MkdirAll(c.path("deep/a/b/c/d"), 0o750))
			c.write("deep/a/b/c/d/leaf", "leaf")
			c.write("deep/a/mid", "mid")
		}},
		{"delete a file and a tree", func() {
			must(t, os.Remove(c.path("sub/b.txt")))
			must(t, os.RemoveAll(c.path("sub/inner")))
		}},
		{"rename a file", func() {
			must(t, os.Rename(c.path("a.txt"), c.path("sub/renamed.txt")))
		}},
		{"rename a directory with nested files", func() {
			must(t, os.Rename(c.path("deep"), c.path("moved")))
		}},
		{"write inside the renamed directory", func() {
			// The watches must follow the new names.
			c.write("moved/a/b/c/d/leaf", "changed after the move")
			c.write("moved/a/b/new", "new in a moved subdirectory")
			must(t, os.Mkdir(c.path("moved/a/b/c/d/e"), 0o700))
			c.write("moved/a/b/c/d/e/f", "f")
		}},
		{"rename a directory over an emptied one", func() {
			must(t, os.MkdirAll(c.path("target/old"), 0o755))
			c.write("target/old/o", "o")
			must(t, os.RemoveAll(c.path("target")))
			must(t, os.Rename(c.path("moved/a"), c.path("target")))
		}},
		{"symlinks", func() {
			must(t, os.Symlink("sub/renamed.txt", c.path("rel-link")))
			must(t, os.Symlink("/etc/passwd", c.path("abs-link")))
			must(t, os.Symlink("no/such/thing", c.path("dangling")))
			must(t, os.Symlink("target", c.path("dir-link")))
			must(t, os.Symlink("../../outside", c.path("sub/up-link")))
		}},
		{"replace a symlink by a file and a directory by a symlink", func() {
			must(t, os.Remove(c.path("rel-link")))
			c.write("rel-link", "now a file")
			must(t, os.RemoveAll(c.path("moved")))
			must(t, os.Symlink("target", c.path("moved")))
		}},
		{"replace a file by a directory and a directory by a file", func() {
			must(t, os.Remove(c.path("empty")))
			must(t, os.Mkdir(c.path("empty"), 0o755))
			c.write("empty/inside", "i")
			must(t, os.RemoveAll(c.path("target")))
			c.write("target", "was a directory")
		}},
		{"mode bits", func() {
			c.write("suid", "#!/bin/sh\n")
			must(t, os.Chmod(c.path("suid"), 0o755|os.ModeSetuid))
			c.write("sgid", "g")
			must(t, os.Chmod(c.path("sgid"), 0o750|os.ModeSetgid))
			c.write("private", "p")
			must(t, os.Chmod(c.path("private"), 0o600))
			must(t, os.Mkdir(c.path("tmp"), 0o755))
			must(t, os.Chmod(c.path("tmp"), 0o777|os.ModeSticky))
			must(t, os.Mkdir(c.path("shared"), 0o755))
			must(t, os.Chmod(c.path("shared"), 0o775|os.ModeSetgid))
			must(t, os.Chmod(c.path("before.txt"), 0o400))
			must(t, os.Chmod(c.primaryData, 0o711))
		}},
		{"mtimes", func() {
			old := time.Date(2001, 2, 3, 4, 5, 6, 789, time.UTC)
			must(t, os.Chtimes(c.path("sub/renamed.txt"), old, old))
			must(t, os.Chtimes(c.path("tmp"), old, old))
		}},
		{"non-UTF-8 names", func() {
			must(t, os.Mkdir(c.path("d\xff\xfe"), 0o755))
			c.write("d\xff\xfe/caf\xe9", "latin-1")
			c.write("\x80raw", "r")
		}},
		{"names with spaces and newlines", func() {
			must(t, os.Mkdir(c.path("with space"), 0o755))
			c.write("with space/line\nbreak", "n")
			c.write(" leading and trailing ", "s")
		}},
		{"a sparse file over 4 GiB", func() {
			writeSparse(t, c.path("huge"), 5<<30+3, 1<<20, 4<<30+12345)
		}},
		{"a write beyond 4 GiB", func() {
			writeAt(t, c.path("huge"), 4<<30+(1<<20), []byte("past the 32-bit offsets"))
		}},
		{"rename with a non-UTF-8 name and delete the rest", func() {
			must(t, os.Rename(c.path("d\xff\xfe"), c.path("e\xff")))
			must(t, os.Remove(c.path("\x80raw")))
		}},
	}
	for _, s := range steps {
		t.Logf("step: %s", s.name)
		s.do()
		c.waitSynced("r1", "r2")
	}

	testutil.Eventually(t, 5*time.Second, "both replicas caught up in Status", func() bool {
		st := p.Status()
		if st.Epoch != 1 || st.Seq == 0 || len(st.Replicas) != 2 {
			return false
		}
		for _, r := range st.Replicas {
			if !r.Connected || r.Lag != 0 || r.AckedSeq == 0 || r.AckedCut.IsZero() || r.Err != "" {
				return false
			}
		}
		return true
	})
	c.mu.Lock()
	ack := c.acks["r1"]
	c.mu.Unlock()
	if ack.Epoch != 1 || ack.Seq == 0 {
		t.Fatalf("OnAck for r1 = %+v, want epoch 1 and a seq", ack)
	}
	epoch, seq, cut, err := c.replica("r1").srv.Position(testVolume)
	must(t, err)
	if epoch != 1 || seq == 0 || cut.IsZero() {
		t.Fatalf("Position = %d %d %v, want epoch 1 and a seq and cut", epoch, seq, cut)
	}
	// The replica never keeps temporary files.
	m, err := Manifest(c.replicaPaths("r2").Data)
	must(t, err)
	for p := range m {
		if strings.Contains(p, tempPrefix) {
			t.Errorf("temporary file left on the replica: %q", p)
		}
	}
}

// TestReplicaRestart stops a replica, changes the volume, and checks that
// the restarted replica catches up.
func TestReplicaRestart(t *testing.T) {
	c := newTestCluster(t)
	c.write("one", "1")
	c.startReplica("r1")
	p := c.startPrimary(1, "r1")
	c.waitSynced("r1")

	c.stopReplica("r1")
	testutil.Eventually(t, 5*time.Second, "the primary notices the replica is gone", func() bool {
		st := p.Status()
		return len(st.Replicas) == 1 && !st.Replicas[0].Connected && st.Replicas[0].Err != ""
	})
	c.write("two", "2")
	must(t, os.Remove(c.path("one")))
	must(t, os.MkdirAll(c.path("dir/sub"), 0o755))
	c.write("dir/sub/three", "3")
	testutil.Eventually(t, 5*time.Second, "the lag grows while the replica is down", func() bool {
		return p.Status().Replicas[0].Lag > 0
	})

	c.startReplica("r1")
	c.waitSynced("r1")
	testutil.Eventually(t, 5*time.Second, "the replica is caught up in Status", func() bool {
		r := p.Status().Replicas[0]
		return r.Connected && r.Lag == 0 && r.Err == ""
	})
	// It resumed after its durable cut: only the initial sync was full.
	if n := p.fullCuts.Load(); n != 1 {
		t.Fatalf("%d full cuts, want only the initial one (the restarted replica should resume)", n)
	}

	// What the watcher does after lost events: the whole tree is resent,
	// and what the replica has beyond it is removed.
	must(t, os.WriteFile(c.replicaPaths("r1").Data+"/stray", []byte("s"), 0o644))
	p.ch.requireFull()
	c.waitSynced("r1")
}

// TestSetReplicas adds a replica to a running primary and removes one.
func TestSetReplicas(t *testing.T) {
	c := newTestCluster(t)
	c.write("f", "content")
	c.startReplica("r1")
	c.startReplica("r2")
	p := c.startPrimary(1, "r1")
	c.waitSynced("r1")

	p.SetReplicas([]string{"r2"})
	c.waitSynced("r2")
	st := p.Status()
	if len(st.Replicas) != 1 || st.Replicas[0].Node != "r2" {
		t.Fatalf("Status().Replicas = %+v, want only r2", st.Replicas)
	}
}

// TestPrimaryRestartSameEpoch restarts the primary in the same epoch: its
// batch numbers continue after the replica's, and its first (full) batch
// removes what the replica has that the primary does not.
func TestPrimaryRestartSameEpoch(t *testing.T) {
	c := newTestCluster(t)
	c.write("a", "a")
	c.startReplica("r1")
	p := c.startPrimary(1, "r1")
	c.waitSynced("r1")
	c.write("b", "b")
	c.waitSynced("r1")
	p.Stop()
	_, seq, _, err := c.replica("r1").srv.Position(testVolume)
	must(t, err)

	must(t, os.WriteFile(c.replicaPaths("r1").Data+"/stray", []byte("s"), 0o644))
	c.write("c", "c")
	p2 := c.startPrimary(1, "r1")
	c.waitSynced("r1")
	testutil.Eventually(t, 5*time.Second, "the restarted primary's batches follow the replica's", func() bool {
		r := p2.Status().Replicas[0]
		return r.Err == "" && r.AckedSeq > seq
	})
}
