package replication

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/tether-io/tether/internal/testutil"
	"github.com/tether-io/tether/proto/tetherpb"
)

func TestForward(t *testing.T) {
	renames := []renameOp{{from: "a", to: "e"}, {from: "e/b", to: "f"}, {from: "x", to: "e/c"}}
	cases := []struct {
		n       int // renames applied
		rel     string
		want    string
		present bool
	}{
		{0, "a/b", "a/b", true},
		{1, "a/b", "e/b", true},
		{2, "a/b", "f", true},
		{2, "a/b/deep", "f/deep", true},
		{3, "a/c", "", false}, // x was renamed onto e/c, where a/c was
		{3, "x/y", "e/c/y", true},
		{3, "ab", "ab", true}, // a prefix of the name is not a parent
		{3, "e", "", false},   // the first rename replaced whatever was at e
	}
	for _, c := range cases {
		got, ok := forward(renames[:c.n], c.rel)
		if got != c.want || ok != c.present {
			t.Errorf("forward(%d renames, %q) = %q, %v; want %q, %v", c.n, c.rel, got, ok, c.want, c.present)
		}
	}
}

func TestSequence(t *testing.T) {
	cases := []struct {
		name    string
		in      []renameOp
		froms   []string
		dropped []string
	}{
		{"independent", []renameOp{{src: "a", to: "b"}, {src: "c", to: "d"}}, []string{"a", "c"}, nil},
		{"below a directory moved before", []renameOp{{src: "a", to: "e"}, {src: "a/b", to: "f"}, {src: "a/b/c", to: "g"}},
			[]string{"a", "e/b", "f/c"}, nil},
		{"a directory moved after what left it", []renameOp{{src: "a/b", to: "f"}, {src: "a", to: "e"}}, []string{"a/b", "a"}, nil},
		{"replaced by an earlier rename", []renameOp{{src: "a", to: "e"}, {src: "x", to: "e/b"}, {src: "a/b", to: "f"}},
			[]string{"a", "x"}, []string{"a/b"}},
	}
	for _, c := range cases {
		kept, dropped := sequence(slices.Clone(c.in))
		var froms, drops []string
		for _, r := range kept {
			froms = append(froms, r.from)
		}
		for _, r := range dropped {
			drops = append(drops, r.src)
		}
		if !slices.Equal(froms, c.froms) || !slices.Equal(drops, c.dropped) {
			t.Errorf("%s: froms %q dropped %q; want %q and %q", c.name, froms, drops, c.froms, c.dropped)
		}
	}
}

// TestRenameFoundInALaterRound takes a cut in two rounds: the first finds
// directory a renamed to e, the second (a rescan having marked a/b gone and
// f new) finds the file that was a/b at f. The second rename must name its
// source where the first one put it (e/b), or the replica refuses the batch
// ("builds on a path an earlier op of the batch replaced"); the replica's
// check accepts it and the index ends with the tree's paths.
func TestRenameFoundInALaterRound(t *testing.T) {
	dir, state := t.TempDir(), t.TempDir()
	must(t, os.MkdirAll(filepath.Join(dir, "a"), 0o755))
	for _, f := range []string{"a/b", "a/c"} {
		must(t, os.WriteFile(filepath.Join(dir, f), []byte(f), 0o644))
	}
	replica := t.TempDir()
	must(t, os.MkdirAll(filepath.Join(replica, "a"), 0o755))
	for _, f := range []string{"a/b", "a/c"} {
		must(t, os.WriteFile(filepath.Join(replica, f), []byte(f), 0o644))
	}
	root, err := os.OpenRoot(dir)
	must(t, err)
	defer root.Close()
	idx, err := openIndex(state)
	must(t, err)
	defer idx.close()
	warn := newOnceLogger(testutil.Logger(t))
	cut := func(p *plan, reset bool) {
		t.Helper()
		sp, err := newSpool(filepath.Join(state, "spool"))
		must(t, err)
		defer sp.close()
		must(t, sp.read(root, p, warn))
		u, err := sp.indexUpdate(p, reset)
		must(t, err)
		must(t, idx.apply(u))
	}
	full, err := fullPlan(root)
	must(t, err)
	cut(full, true)

	must(t, os.Rename(filepath.Join(dir, "a"), filepath.Join(dir, "e")))
	p, err := dirtyPlan(root, map[string]bool{".": false, "a": false, "e": true}, idx)
	must(t, err)
	must(t, os.Rename(filepath.Join(dir, "e/b"), filepath.Join(dir, "f")))
	must(t, p.update(root, map[string]bool{".": false, "a/b": false, "e": false, "e/b": false, "f": false}))

	var got []string
	var ops []applyOp
	for _, r := range p.renames {
		got = append(got, r.from+">"+r.to)
		ops = append(ops, applyOp{kind: tetherpb.FileOp_KIND_RENAME, path: r.from, to: r.to})
	}
	if want := []string{"a>e", "e/b>f"}; !slices.Equal(got, want) {
		t.Fatalf("renames = %q, want %q", got, want)
	}
	if err := verifyBases(replica, ops, nil, false, nil); err != nil {
		t.Fatalf("the replica refuses the renames: %v", err)
	}
	cut(p, false)
	var paths []string
	must(t, idx.under(rootPath, func(rel string, _ *indexEntry) { paths = append(paths, rel) }))
	if want := []string{"e", "e/c", "f"}; !slices.Equal(paths, want) {
		t.Fatalf("index holds %q, want %q", paths, want)
	}
}

// cutBench is a tree with its block index, for tests that take cuts by
// driving plans directly (the tree as the primary's cuts read it).
type cutBench struct {
	t     *testing.T
	dir   string
	state string
	root  *os.Root
	idx   *index
	warn  *onceLogger
}

// newCutBench makes d/x/i and takes the full cut of it.
func newCutBench(t *testing.T) *cutBench {
	t.Helper()
	b := &cutBench{t: t, dir: t.TempDir(), state: t.TempDir(), warn: newOnceLogger(testutil.Logger(t))}
	must(t, os.MkdirAll(filepath.Join(b.dir, "d/x"), 0o755))
	must(t, os.WriteFile(filepath.Join(b.dir, "d/x/i"), []byte("i"), 0o644))
	var err error
	b.root, err = os.OpenRoot(b.dir)
	must(t, err)
	t.Cleanup(func() { b.root.Close() })
	b.idx, err = openIndex(b.state)
	must(t, err)
	t.Cleanup(b.idx.close)
	full, err := fullPlan(b.root)
	must(t, err)
	b.cut(full, true)
	return b
}

// cut reads plan p and applies it to the index, as takeCut does.
func (b *cutBench) cut(p *plan, reset bool) {
	b.t.Helper()
	sp, err := newSpool(filepath.Join(b.state, "spool"))
	must(b.t, err)
	defer sp.close()
	must(b.t, sp.read(b.root, p, b.warn))
	u, err := sp.indexUpdate(p, reset)
	must(b.t, err)
	must(b.t, b.idx.apply(u))
}

// indexed returns the paths the index holds.
func (b *cutBench) indexed() []string {
	b.t.Helper()
	var paths []string
	must(b.t, b.idx.under(rootPath, func(rel string, _ *indexEntry) { paths = append(paths, rel) }))
	return paths
}

// movedBelowItsNewName is `mv d e; mkdir d; mv e d/e` step by step.
func (b *cutBench) movedBelowItsNewName(step int) {
	b.t.Helper()
	switch step {
	case 0:
		must(b.t, os.Rename(filepath.Join(b.dir, "d"), filepath.Join(b.dir, "e")))
	case 1:
		must(b.t, os.Mkdir(filepath.Join(b.dir, "d"), 0o755))
	case 2:
		must(b.t, os.Rename(filepath.Join(b.dir, "e"), filepath.Join(b.dir, "d/e")))
	}
}

// TestReplacedDirectoryStaysReplaced takes the cut of `mv d e; mkdir d;
// mv e d/e` in two rounds, split where the watcher's events split it when
// TestRenameScenarios failed: the first round takes d (created: its
// subtree) and e, and reads the new d whole, which plans d's DELETE; the
// second takes d again without its subtree (moving e into it changed its
// mtime), d/e (moved in) and e (moved away). The second round must keep
// d's DELETE: without it the replica, and the index, kept the old d/x and
// d/x/i beside d/e/x/i, and no event was left to repair it.
func TestReplacedDirectoryStaysReplaced(t *testing.T) {
	b := newCutBench(t)
	b.movedBelowItsNewName(0)
	b.movedBelowItsNewName(1)
	p, err := dirtyPlan(b.root, map[string]bool{".": false, "d": true, "e": true}, b.idx)
	must(t, err)
	b.movedBelowItsNewName(2)
	must(t, p.update(b.root, map[string]bool{".": false, "d": false, "d/e": true, "e": false}))

	if _, ok := p.deletes["d"]; !ok {
		t.Errorf("the cut does not delete the old d (deletes %v, renames %v)", p.deletes, p.renames)
	}
	b.cut(p, false)
	if got, want := b.indexed(), []string{"d", "d/e", "d/e/x", "d/e/x/i"}; !slices.Equal(got, want) {
		t.Fatalf("index holds %q, want %q", got, want)
	}
}

// TestMovedBelowItsNewNameEverySplit feeds the watcher's dirty paths for
// `mv d e; mkdir d; mv e d/e` to the cuts in every way they can arrive:
// the watcher handles MOVED_TO e while e is there (the subtree of e) or
// after it moved on, and CREATE d before the last rename (d is watched in
// time to report MOVED_TO d/e) or after; the events are taken in every
// split into rounds and cuts (a cut ends only where no event was left
// behind), each round reading the tree in any state at least as new as its
// events. Every way ends with the index (what the replicas hold) equal to
// the tree.
func TestMovedBelowItsNewNameEverySplit(t *testing.T) {
	type event struct {
		dirty map[string]bool
		state int // the steps done when the watcher handles it
	}
	const steps = 3
	want := []string{"d", "d/e", "d/e/x", "d/e/x/i"}
	type split struct {
		ends   []int  // each round takes the events up to its end
		states []int  // the steps done when each round reads the tree
		newCut []bool // the round starts a new cut
	}
	// splits calls fn with every split of events.
	splits := func(events []event, fn func(split)) {
		n := len(events)
		for mask := range 1 << (n - 1) {
			var ends []int
			for i := range n - 1 {
				if mask&(1<<i) != 0 {
					ends = append(ends, i+1)
				}
			}
			ends = append(ends, n)
			var walk func(s split)
			walk = func(s split) {
				r := len(s.states)
				if r == len(ends) {
					if s.states[r-1] == steps {
						fn(s)
					}
					return
				}
				least := 0
				if r > 0 {
					least = s.states[r-1]
				}
				for _, e := range events[:ends[r]] {
					least = max(least, e.state)
				}
				for st := least; st <= steps; st++ {
					for _, cut := range []bool{false, true} {
						if cut && (r == 0 || slices.ContainsFunc(events[ends[r-1]:], func(e event) bool { return e.state <= s.states[r-1] })) {
							continue // the previous round's barrier saw an event it had not taken
						}
						walk(split{ends: ends, states: append(slices.Clone(s.states), st), newCut: append(slices.Clone(s.newCut), cut)})
					}
				}
			}
			walk(split{ends: ends})
		}
	}
	tried := 0
	for movedTo := 1; movedTo <= steps; movedTo++ {
		for created := max(movedTo, 2); created <= steps; created++ {
			events := []event{
				{map[string]bool{".": false, "d": false}, 1},                 // MOVED_FROM d
				{map[string]bool{".": false, "e": movedTo < steps}, movedTo}, // MOVED_TO e
				{map[string]bool{".": false, "d": true}, created},            // CREATE d
				{map[string]bool{".": false, "e": false}, steps},             // MOVED_FROM e
			}
			if created < steps {
				events = append(events, event{map[string]bool{"d": false, "d/e": true}, steps}) // MOVED_TO d/e
			}
			splits(events, func(s split) {
				tried++
				name := fmt.Sprintf("MOVED_TO_e_after_%d/CREATE_d_after_%d/rounds_to_%v/reading_after_%v/new_cut_%v",
					movedTo, created, s.ends, s.states, s.newCut)
				t.Run(name, func(t *testing.T) {
					b := newCutBench(t)
					var p *plan
					done, from := 0, 0
					for r, end := range s.ends {
						for ; done < s.states[r]; done++ {
							b.movedBelowItsNewName(done)
						}
						dirty := map[string]bool{}
						for _, e := range events[from:end] {
							for rel, sub := range e.dirty {
								dirty[rel] = dirty[rel] || sub
							}
						}
						from = end
						if s.newCut[r] {
							b.cut(p, false)
							p = nil
						}
						var err error
						if p == nil {
							p, err = dirtyPlan(b.root, dirty, b.idx)
						} else {
							err = p.update(b.root, dirty)
						}
						must(t, err)
					}
					b.cut(p, false)
					if got := b.indexed(); !slices.Equal(got, want) {
						t.Errorf("index holds %q, want %q", got, want)
					}
				})
			})
		}
	}
	t.Logf("%d splits", tried)
}

// TestWatchFollowsReplacedDirectories renames a directory over an empty one
// and makes a new directory where a moved one was, then writes inside
// both: the writes reach the replica by their events alone (no rescan
// runs), so each directory that took another's place is watched as the
// inode it is now.
func TestWatchFollowsReplacedDirectories(t *testing.T) {
	c := newTestCluster(t)
	c.startReplica("r1")
	for _, d := range []string{"src", "dst", "moved"} {
		must(t, os.MkdirAll(c.path(d), 0o755))
	}
	c.write("src/f", "f")
	c.write("moved/g", "g")
	c.startPrimary(1, "r1")
	c.waitSynced("r1")

	must(t, syscall.Rename(c.path("src"), c.path("dst"))) // over the empty dst (os.Rename refuses)
	must(t, os.Rename(c.path("moved"), c.path("away")))
	must(t, os.Mkdir(c.path("moved"), 0o755))
	c.waitSynced("r1")
	for round := range 3 {
		c.write(fmt.Sprintf("dst/new%d", round), "written into the directory renamed over another")
		c.write(fmt.Sprintf("moved/new%d", round), "written into the directory made where one was moved from")
		c.write(fmt.Sprintf("away/new%d", round), "written into the moved directory")
		c.waitSynced("r1")
	}
}

// TestIndexDifferences: a rescan marks what differs from the index (the
// tree as the last cut carried it), not only what changed since the
// previous scan, so a change whose event was lost is still found.
func TestIndexDifferences(t *testing.T) {
	idx, err := openIndex(t.TempDir())
	must(t, err)
	defer idx.close()
	const sec = int64(1e9)
	put := map[string]*indexEntry{
		"same":   {kind: kindFile, ino: 1, size: 5, mtime: 10 * sec, ctime: 10 * sec, readNano: 20 * sec},
		"racy":   {kind: kindFile, ino: 2, size: 5, mtime: 10 * sec, ctime: 10 * sec, readNano: 10*sec + 1},
		"dir":    {kind: kindDir, ino: 3, size: 4096, mtime: 10 * sec, ctime: 10 * sec},
		"gone":   {kind: kindFile, ino: 4, size: 5, mtime: 10 * sec, ctime: 10 * sec, readNano: 20 * sec},
		"retype": {kind: kindFile, ino: 5, size: 5, mtime: 10 * sec, ctime: 10 * sec, readNano: 20 * sec},
	}
	must(t, idx.apply(&indexUpdate{puts: put}))
	snap := map[string]statKey{
		"same":   {mode: syscall.S_IFREG | 0o644, ino: 1, size: 5, mtime: 10 * sec, ctim: 10 * sec},
		"racy":   {mode: syscall.S_IFREG | 0o644, ino: 2, size: 5, mtime: 10 * sec, ctim: 10 * sec},
		"dir":    {mode: syscall.S_IFDIR | 0o755, ino: 3, size: 4096, mtime: 11 * sec, ctim: 11 * sec},
		"retype": {mode: syscall.S_IFLNK | 0o777, ino: 5, size: 5, mtime: 10 * sec, ctim: 10 * sec},
		"new":    {mode: syscall.S_IFREG | 0o644, ino: 6, size: 1},
		"dev":    {mode: syscall.S_IFCHR | 0o600, ino: 7},
	}
	var marked []string
	must(t, idx.differences(snap, func(rel string) { marked = append(marked, rel) }))
	slices.Sort(marked)
	if want := []string{"dir", "gone", "new", "racy", "retype"}; !slices.Equal(marked, want) {
		t.Fatalf("marked %q, want %q", marked, want)
	}
}

// TestIndexFileReplacesDirectory: a file put where the index holds a
// directory takes the directory's entries away with it (a cut can carry
// the file without a DELETE of the directory: placing it removes the
// directory on the replica).
func TestIndexFileReplacesDirectory(t *testing.T) {
	idx, err := openIndex(t.TempDir())
	must(t, err)
	defer idx.close()
	must(t, idx.apply(&indexUpdate{puts: map[string]*indexEntry{
		"d": {kind: kindDir}, "d/x": {kind: kindDir}, "d/x/i": {kind: kindFile}, "d2": {kind: kindFile}, "e": {kind: kindDir}, "e/f": {kind: kindFile},
	}}))
	must(t, idx.apply(&indexUpdate{puts: map[string]*indexEntry{"d": {kind: kindFile, size: 1}, "e": {kind: kindDir, size: 2}}}))
	for rel, want := range map[string]bool{"d": true, "d/x": false, "d/x/i": false, "d2": true, "e": true, "e/f": true} {
		e, err := idx.get(rel)
		must(t, err)
		if (e != nil) != want {
			t.Errorf("index entry %q present = %v, want %v", rel, e != nil, want)
		}
	}
}

// TestRescanComparesWithIndex makes the index forget a file the tree and
// the previous scan both hold (as a lost event would leave it): the next
// rescan marks it, a cut reads it again, and the index holds it again.
func TestRescanComparesWithIndex(t *testing.T) {
	c := newTestCluster(t)
	c.startReplica("r1")
	c.write("f", "contents")
	p := c.startPrimaryWith(func(cfg *PrimaryConfig) { cfg.RescanInterval = 200 * time.Millisecond }, 1, "r1")
	c.waitSynced("r1")
	cuts := p.cuts.Load()
	must(t, p.idx.apply(&indexUpdate{deletes: []string{"f"}}))
	testutil.Eventually(t, 10*time.Second, "a rescan reads f again", func() bool {
		e, err := p.idx.get("f")
		return err == nil && e != nil && p.cuts.Load() > cuts
	})
	c.waitSynced("r1")
}

// TestIndexHoldsTheDirectoriesAReplicaMakes puts entries (and renames to
// a target) whose parents the update does not carry: a replica makes those
// directories, so the index holds them too, as placeholders a rescan
// always marks (to send or delete them); a real entry replaces one.
func TestIndexHoldsTheDirectoriesAReplicaMakes(t *testing.T) {
	idx, err := openIndex(t.TempDir())
	must(t, err)
	defer idx.close()
	must(t, idx.apply(&indexUpdate{puts: map[string]*indexEntry{"s": {kind: kindFile, readNano: statOnly}}}))
	must(t, idx.apply(&indexUpdate{
		puts:    map[string]*indexEntry{"a/b/f": {kind: kindFile, ino: 7, readNano: statOnly}, "a/c": {kind: kindDir, ino: 8}},
		renames: []renameOp{{src: "s", from: "s", to: "m/n/s"}},
	}))
	for _, rel := range []string{"a", "a/b", "m", "m/n"} {
		e, err := idx.get(rel)
		must(t, err)
		if e == nil || e.kind != kindDir {
			t.Fatalf("index entry %q = %+v, want a directory", rel, e)
		}
	}
	snap := map[string]statKey{}
	for rel, ino := range map[string]uint64{"a": 1, "a/b": 2, "a/b/f": 7, "a/c": 8, "m": 3, "m/n": 4, "m/n/s": 0} {
		e, err := idx.get(rel)
		must(t, err)
		if e == nil {
			t.Fatalf("index has no entry %q", rel)
		}
		mode := uint32(syscall.S_IFDIR)
		if e.kind == kindFile {
			mode = syscall.S_IFREG
		}
		if ino == 0 {
			ino = e.ino
		}
		snap[rel] = statKey{mode: mode, ino: ino, size: e.size, mtime: e.mtime, ctim: e.ctime}
	}
	marked := func() []string {
		var got []string
		must(t, idx.differences(snap, func(rel string) { got = append(got, rel) }))
		slices.Sort(got)
		return slices.Compact(got)
	}
	if got, want := marked(), []string{"a", "a/b", "m", "m/n"}; !slices.Equal(got, want) {
		t.Fatalf("a rescan marks %q, want the placeholders %q", got, want)
	}
	must(t, idx.apply(&indexUpdate{puts: map[string]*indexEntry{"a": {kind: kindDir, ino: 1}}}))
	if got, want := marked(), []string{"a/b", "m", "m/n"}; !slices.Equal(got, want) {
		t.Fatalf("after a real entry for a, a rescan marks %q, want %q", got, want)
	}
}
