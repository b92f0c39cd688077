package replication

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestQuarantineOfFormerPrimary makes a node primary at epoch 1 (it fences
// and writes), then streams epoch 2 to it: what the new primary's first
// batch would overwrite or delete is moved into quarantine at the same
// relative paths, what is identical stays, and it happens once.
func TestQuarantineOfFormerPrimary(t *testing.T) {
	c := newTestCluster(t)
	old := c.replicaPaths("x")
	must(t, os.MkdirAll(filepath.Join(old.Data, "only-old"), 0o755))
	x := c.startReplica("x")
	must(t, x.srv.Fence(testVolume, 1)) // x serves the volume in epoch 1
	mtime := time.Date(2024, 5, 6, 7, 8, 9, 10, time.UTC)
	for _, d := range []string{c.primaryData, old.Data} {
		must(t, os.WriteFile(filepath.Join(d, "same.txt"), []byte("same"), 0o644))
		must(t, os.Chtimes(filepath.Join(d, "same.txt"), mtime, mtime))
	}
	c.write("diverged.txt", "the new primary's version")
	must(t, os.WriteFile(filepath.Join(old.Data, "diverged.txt"), []byte("written by x as primary"), 0o644))
	must(t, os.WriteFile(filepath.Join(old.Data, "only-old", "x.txt"), []byte("only x has it"), 0o600))

	if recs, err := x.srv.Quarantined(testVolume); err != nil || len(recs) != 0 {
		t.Fatalf("quarantine before any newer epoch = %v, %v", recs, err)
	}
	c.startPrimary(2, "x")
	c.waitSynced("x")
	recs, err := x.srv.Quarantined(testVolume)
	must(t, err)
	if len(recs) != 1 || recs[0].Epoch != 1 || recs[0].Files != 2 || recs[0].Volume != testVolume {
		t.Fatalf("quarantine records = %+v, want one of epoch 1 with 2 files", recs)
	}
	dir := recs[0].Dir
	if filepath.Dir(dir) != filepath.Join(old.State, "quarantine", testVolume) || time.Since(recs[0].Time) > time.Minute {
		t.Fatalf("quarantine at %s (%v), want under the volume's state directory, now", dir, recs[0].Time)
	}
	for rel, want := range map[string]string{"diverged.txt": "written by x as primary", "only-old/x.txt": "only x has it"} {
		got, err := os.ReadFile(filepath.Join(dir, rel))
		if err != nil || string(got) != want {
			t.Fatalf("quarantined %s = %q, %v; want %q", rel, got, err, want)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "same.txt")); !os.IsNotExist(err) {
		t.Fatalf("an identical file was quarantined: %v", err)
	}

	// Later batches of the new epoch quarantine nothing more.
	c.write("later.txt", "l")
	c.waitSynced("x")
	recs, err = x.srv.Quarantined(testVolume)
	must(t, err)
	if len(recs) != 1 {
		t.Fatalf("quarantine records after more batches = %+v, want still one", recs)
	}
}

func TestQuarantineName(t *testing.T) {
	at := time.Date(2026, 12, 7, 11, 22, 33, 123456789, time.UTC)
	name := quarantineName(7, at)
	if name != "epoch-7-20261207T112233.123456789Z" {
		t.Fatalf("quarantineName = %q", name)
	}
	r, ok := parseQuarantineName(name)
	if !ok || r.Epoch != 7 || !r.Time.Equal(at) {
		t.Fatalf("parseQuarantineName(%q) = %+v, %v", name, r, ok)
	}
	for _, bad := range []string{"epoch-x-20261207T112233.123456789Z", "epoch-7", "other", "epoch-7-yesterday"} {
		if _, ok := parseQuarantineName(bad); ok {
			t.Errorf("parseQuarantineName(%q) accepted", bad)
		}
	}
}
