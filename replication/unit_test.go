package replication

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tether-io/tether/internal/testutil"
)

func TestCheckPath(t *testing.T) {
	cases := []struct {
		path      string
		allowRoot bool
		ok        bool
	}{
		{"a", false, true},
		{"a/b/c", false, true},
		{"caf\xe9/\xff", false, true},
		{".hidden/..x/x..", false, true},
		{".", true, true},
		{".", false, false},
		{"", true, false},
		{"/etc/passwd", false, false},
		{"../x", false, false},
		{"a/../../x", false, false},
		{"a/..", false, false},
		{"./a", false, false},
		{"a/./b", false, false},
		{"a//b", false, false},
		{"a/", false, false},
		{"a\x00b", false, false},
	}
	for _, c := range cases {
		got, err := checkPath([]byte(c.path), c.allowRoot)
		if (err == nil) != c.ok {
			t.Errorf("checkPath(%q, %v) error = %v, want ok=%v", c.path, c.allowRoot, err, c.ok)
		}
		if err == nil && got != c.path {
			t.Errorf("checkPath(%q) = %q", c.path, got)
		}
	}
}

func TestPathHelpers(t *testing.T) {
	if got := ancestorsOf("a/b/c"); !slices.Equal(got, []string{"a", "a/b"}) {
		t.Errorf("ancestorsOf(a/b/c) = %q", got)
	}
	if got := ancestorsOf("a"); len(got) != 0 {
		t.Errorf("ancestorsOf(a) = %q", got)
	}
	for rel, want := range map[string]string{"a": ".", "a/b": "a", "a/b/c": "a/b"} {
		if got := parentOf(rel); got != want {
			t.Errorf("parentOf(%q) = %q, want %q", rel, got, want)
		}
	}
	for rel, want := range map[string]int{".": 0, "a": 1, "a/b/c": 3} {
		if got := depthOf(rel); got != want {
			t.Errorf("depthOf(%q) = %d, want %d", rel, got, want)
		}
	}
	if !isUnder("a/b", "a") || isUnder("ab", "a") || !isUnder("a", "a") || !isUnder("x", ".") {
		t.Error("isUnder is wrong")
	}
}

func TestWireMode(t *testing.T) {
	cases := []struct {
		mode fs.FileMode
		wire uint32
	}{
		{0o644, 0o644},
		{0o755 | fs.ModeSetuid, 0o4755},
		{0o2750&0o777 | fs.ModeSetgid, 0o2750},
		{0o777 | fs.ModeSticky, 0o1777},
		{0o7777&0o777 | fs.ModeSetuid | fs.ModeSetgid | fs.ModeSticky, 0o7777},
		{fs.ModeDir | 0o700, 0o700},
	}
	for _, c := range cases {
		if got := toWireMode(c.mode); got != c.wire {
			t.Errorf("toWireMode(%v) = %o, want %o", c.mode, got, c.wire)
		}
		if got := fromWireMode(c.wire); got != c.mode&^fs.ModeDir {
			t.Errorf("fromWireMode(%o) = %v, want %v", c.wire, got, c.mode&^fs.ModeDir)
		}
	}
}

func TestResumable(t *testing.T) {
	cases := []struct {
		name                        string
		epoch, seq, first, base, at uint64
		want                        bool
	}{
		{"at the last cut", 3, 110, 100, 105, 110, true},
		{"at the oldest retained base", 3, 105, 100, 105, 110, true},
		{"behind what is retained", 3, 104, 100, 105, 110, false},
		{"a cut of an earlier life of the primary", 3, 99, 100, 99, 110, false},
		{"beyond the last cut", 3, 111, 100, 105, 110, false},
		{"older epoch", 2, 110, 100, 105, 110, false},
		{"no cut taken yet", 3, 0, 0, 0, 0, false},
	}
	for _, c := range cases {
		if got := resumable(c.epoch, c.seq, 3, c.first, c.base, c.at); got != c.want {
			t.Errorf("%s: resumable = %v, want %v", c.name, got, c.want)
		}
	}
}

func TestDirtySet(t *testing.T) {
	t0 := time.Unix(100, 0)
	var d dirtySet
	d.add("a", false, t0.Add(time.Second))
	d.add("a", true, t0.Add(2*time.Second))
	d.add("b", false, t0)
	if !d.paths["a"] || d.paths["b"] || !d.since.Equal(t0) {
		t.Fatalf("dirty set = %+v", d)
	}
	e := d.take()
	if !d.empty() || !d.since.IsZero() || len(e.paths) != 2 || !e.since.Equal(t0) {
		t.Fatalf("after take: d=%+v e=%+v", d, e)
	}
	if got := oldest(time.Time{}, t0.Add(time.Second), t0); !got.Equal(t0) {
		t.Fatalf("oldest = %v", got)
	}
}

// TestDirtyPlan checks what a batch carries for a set of dirty paths.
func TestDirtyPlan(t *testing.T) {
	dir := t.TempDir()
	must(t, os.MkdirAll(filepath.Join(dir, "new/sub"), 0o755))
	must(t, os.WriteFile(filepath.Join(dir, "new/sub/f"), nil, 0o644))
	must(t, os.WriteFile(filepath.Join(dir, "file"), []byte("x"), 0o644))
	must(t, os.MkdirAll(filepath.Join(dir, "real/x"), 0o755))
	must(t, os.Symlink("real", filepath.Join(dir, "link")))
	must(t, syscall.Mkfifo(filepath.Join(dir, "fifo"), 0o644))
	root, err := os.OpenRoot(dir)
	must(t, err)
	defer root.Close()

	p, err := dirtyPlan(root, map[string]bool{
		"new": true, "file": false, "gone": false, "link/x": false, "link": false, "fifo": false, "file/under": false,
	}, nil)
	must(t, err)
	// Deletes below a path now planned as a file or symlink are redundant
	// (the replica replaces whatever is there) and may be dropped.
	for _, d := range keys(p.deletes) {
		if !slices.Contains([]string{"file/under", "gone", "link/x", "new"}, d) {
			t.Errorf("unexpected delete %q", d)
		}
	}
	if _, ok := p.deletes["gone"]; !ok {
		t.Error("gone is not deleted")
	}
	if _, ok := p.deletes["new"]; !ok {
		t.Error("new (sent with its subtree) is not deleted first")
	}
	if got, want := keys(p.dirs), []string{".", "new", "new/sub"}; !slices.Equal(got, want) {
		t.Errorf("dirs = %q, want %q", got, want)
	}
	if got, want := keys(p.others), []string{"fifo", "file", "link", "new/sub/f"}; !slices.Equal(got, want) {
		t.Errorf("others = %q, want %q", got, want)
	}
}

func keys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// TestRescanFindsMissedChanges makes changes the watcher does not read
// events for and checks that a rescan finds them.
func TestRescanFindsMissedChanges(t *testing.T) {
	dir := t.TempDir()
	must(t, os.WriteFile(filepath.Join(dir, "same"), []byte("s"), 0o644))
	must(t, os.WriteFile(filepath.Join(dir, "changed"), []byte("c"), 0o644))
	must(t, os.WriteFile(filepath.Join(dir, "removed"), []byte("r"), 0o644))
	must(t, os.Mkdir(filepath.Join(dir, "d"), 0o755))
	root, err := os.OpenRoot(dir)
	must(t, err)
	defer root.Close()
	ch := newChanges()
	w, err := newWatcher(dir, filepath.Join(t.TempDir(), "barrier"), root, testutil.Logger(t), time.Hour, ch)
	must(t, err)
	defer w.close()
	must(t, w.setup())

	must(t, os.WriteFile(filepath.Join(dir, "changed"), []byte("changed"), 0o644))
	must(t, os.Remove(filepath.Join(dir, "removed")))
	must(t, os.MkdirAll(filepath.Join(dir, "d/new/deeper"), 0o755))
	w.rescanNow()
	got := ch.take().dirty
	if want := []string{".", "changed", "d", "d/new", "d/new/deeper", "removed"}; !slices.Equal(keys(got.paths), want) {
		t.Fatalf("rescan marked %q, want %q", keys(got.paths), want)
	}
	if _, ok := w.dirs["d/new/deeper"]; !ok {
		t.Fatalf("rescan did not watch the new directories: %v", keys(w.dirs))
	}
}

func TestWatchLimitError(t *testing.T) {
	msg := watchLimitError(7, os.ErrExist).Error()
	for _, want := range []string{"fs.inotify.max_user_watches", "sysctl -w", "7 directories"} {
		if !strings.Contains(msg, want) {
			t.Errorf("watch limit error %q does not mention %q", msg, want)
		}
	}
}

// TestChanges checks the watcher-to-cutter state: the event count moves
// with every change, take clears the dirty set and the full flag, and a
// barrier receives the count at its event.
func TestChanges(t *testing.T) {
	c := newChanges()
	c.add("a", false, time.Unix(5, 0))
	c.add("b", true, time.Unix(3, 0))
	if ok, since := c.pending(); !ok || !since.Equal(time.Unix(3, 0)) {
		t.Fatalf("pending = %v %v", ok, since)
	}
	ch := c.expect("b-1")
	c.barrierSeen("b-2") // not awaited: ignored
	c.barrierSeen("b-1")
	if g := <-ch; g != 2 {
		t.Fatalf("barrier saw count %d, want 2", g)
	}
	tk := c.take()
	if tk.full || tk.gen != 2 || !tk.dirty.paths["b"] || tk.dirty.paths["a"] || len(tk.dirty.paths) != 2 {
		t.Fatalf("take = %+v", tk)
	}
	c.requireFull()
	if tk := c.take(); !tk.full || !tk.lost || tk.gen != 3 {
		t.Fatalf("take after requireFull = %+v", tk)
	}
	c.requireFullForReplica() // not a change of the volume: the count stays
	if ok, _ := c.pending(); !ok {
		t.Fatal("a full cut for a replica is not pending")
	}
	if tk := c.take(); !tk.full || tk.lost || tk.gen != 3 {
		t.Fatalf("take after requireFullForReplica = %+v", tk)
	}
	if ok, _ := c.pending(); ok {
		t.Fatal("pending after take")
	}
}

// TestLagCountsCutInProgress: changes taken by the cut being read are no
// longer pending and not yet in a batch; a replica's lag must still count
// them (a lag of 0 reported while a long cut is read would promise more
// than the replica holds), until the cut is published and acknowledged.
func TestLagCountsCutInProgress(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "a"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	p := &Primary{ch: newChanges(), root: root, log: slog.New(slog.DiscardHandler), changed: make(chan struct{})}
	s := newSender(p, "r1", func() {})
	s.connected, s.next = true, 1
	t0 := time.Now().Add(-time.Second)
	p.ch.add("a", false, t0)
	c := &cutRound{p: p}
	if err := c.take(); err != nil {
		t.Fatal(err)
	}
	if ok, _ := p.ch.pending(); ok {
		t.Fatal("changes still pending after the cut took them")
	}
	now := time.Now()
	if lag := s.state(now).Lag; lag < now.Sub(t0) {
		t.Fatalf("lag while the cut is read = %s, want at least %s", lag, now.Sub(t0))
	}
	p.publish(&cutBatch{seq: 1, since: t0})
	if lag := s.state(now).Lag; lag < now.Sub(t0) {
		t.Fatalf("lag once the cut is published, unacknowledged = %s, want at least %s", lag, now.Sub(t0))
	}
	s.next = 2 // the replica acknowledged cut 1
	if lag := s.state(now).Lag; lag != 0 {
		t.Fatalf("lag after the replica acknowledged the only cut = %s, want 0", lag)
	}
}

// TestCutErrorReported: a cut that cannot be taken (here the spool
// directory cannot be made) shows in the primary's status until a cut
// succeeds again, and the replica then converges.
func TestCutErrorReported(t *testing.T) {
	c := newTestCluster(t)
	c.write("a", "1")
	c.startReplica("r1")
	p := c.startPrimary(1, "r1")
	c.waitSynced("r1")
	spool := filepath.Join(p.cfg.Paths.State, spoolDir)
	must(t, os.RemoveAll(spool))
	must(t, os.WriteFile(spool, nil, 0o600)) // not a directory: the spool cannot be made
	c.write("a", "2")
	testutil.Eventually(t, 10*time.Second, "the failing cut in the status", func() bool {
		return strings.Contains(p.Status().CutError, "spool")
	})
	must(t, os.Remove(spool))
	testutil.Eventually(t, 10*time.Second, "the cut error cleared", func() bool {
		return p.Status().CutError == ""
	})
	c.waitSynced("r1")
}

// TestCutErrorWording: running out of space in the spool tells the
// operator where, and what a cut needs there.
func TestCutErrorWording(t *testing.T) {
	err := cutError(fmt.Errorf("write spool: %w", syscall.ENOSPC), "/var/lib/tether/volumes/v/state/spool")
	if !errors.Is(err, syscall.ENOSPC) || !strings.Contains(err.Error(), "/var/lib/tether/volumes/v/state/spool") ||
		!strings.Contains(err.Error(), "free space") {
		t.Fatalf("cutError = %v", err)
	}
	other := errors.New("read a: input/output error")
	if got := cutError(other, "/x"); got != other {
		t.Fatalf("cutError changed an unrelated error: %v", got)
	}
}

func TestFullSyncText(t *testing.T) {
	for _, c := range []struct {
		done, total int64
		want        string
	}{
		{0, 0, ""}, {5, 0, ""}, {0, 1 << 30, "0% of 1.0 GiB"}, {3 << 29, 4 << 30, "37% of 4.0 GiB"},
		{10, 5, "100% of 5 B"}, {-1, 100, "0% of 100 B"},
	} {
		if got := FullSyncText(c.done, c.total); got != c.want {
			t.Errorf("FullSyncText(%d, %d) = %q, want %q", c.done, c.total, got, c.want)
		}
	}
}
