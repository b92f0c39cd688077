package replication

import (
	"context"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tether-io/tether/internal/testutil"
	"github.com/tether-io/tether/proto/tetherpb"
)

// cutModel drives the cut code by hand against a real tree and a real
// replica, with the watcher's events and the cut loop's rounds split at
// random: the events of each change reach the dirty set late or early, a
// round takes whatever has arrived and reads the tree as it is then, and a
// cut ends either consistent (every event taken) or file-consistent only
// (events left for the next cut, as after MaxRounds under load). Inode
// numbers are reused as ext4 reuses them: a removed file or directory may
// come back as a new one at another path (held aside, outside the volume).
type cutModel struct {
	t       *testing.T
	rng     *rand.Rand
	dir     string
	stash   string
	stashed []string // held-aside inodes, to come back as new entries
	root    *os.Root
	idx     *index
	warn    *onceLogger
	state   string
	replica string
	stream  *rawStream
	// r2 takes only the full cuts, as a replica that needs the whole tree
	// does, while the replica above takes their delta view.
	replica2 string
	stream2  *rawStream
	// r3 takes each full cut whole and continues that batch over the next
	// few cuts (as a sender whose streamed files changed does), committing
	// it as the last of them; then it follows like r1 until the next full
	// cut, and must hold what r1 holds at every commit.
	replica3 string
	stream3  *rawStream
	r3open   bool   // a continued batch is open on stream3
	r3left   int    // cuts it still continues over
	r3last   uint64 // the last cut sent into it
	// lastExact: the last cut was consistent (and no hard link made since
	// the last rescan): replicas at it hold the tree entry for entry.
	lastExact bool
	full      bool            // the cut being taken is full
	cutDirty  map[string]bool // every dirty path the cut took
	dirs      bool            // rename directories too

	queue     [][]modelMark // events not yet delivered
	unwatched map[string]bool
	quiet     bool // no change while a round reads (settling)
	// changed is set by a change since the last round read the tree.
	changed bool
	// linkedSince is set once a hard link was made: a change through one
	// name that is removed since has no event for the others, until the
	// next rescan (settle clears it).
	linkedSince bool
	dirty       map[string]bool
	pl          *plan
	sp          *spool
	seq         uint64
	trace       []string
	n           int
}

// modelMark is what an event marks: rel, and whether it was a creation
// (its subtree is read when rel is a directory on delivery, as the watcher
// does).
type modelMark struct {
	rel    string
	create bool
}

var modelNames = []string{"a", "b", "c", "a/x", "a/y", "b/x", "b/y", "a/x/p", "a/x/q", "b/y/p", "c/q"}

func newCutModel(t *testing.T, seed uint64, dirs bool) *cutModel {
	return newCutModelWith(t, seed, dirs, func(m *cutModel) {
		for range 12 {
			m.change()
		}
	})
}

// newCutModelWith makes the primary's first tree with setup and takes the
// full cut of it.
func newCutModelWith(t *testing.T, seed uint64, dirs bool, setup func(m *cutModel)) *cutModel {
	c := newTestCluster(t)
	c.startReplica("r1")
	c.startReplica("r2")
	c.startReplica("r3")
	m := &cutModel{t: t, rng: rand.New(rand.NewPCG(seed, 11)), dir: c.primaryData, stash: t.TempDir(), state: t.TempDir(),
		warn: newOnceLogger(testutil.Logger(t)), replica: c.replicaPaths("r1").Data, replica2: c.replicaPaths("r2").Data,
		replica3: c.replicaPaths("r3").Data, dirs: dirs, dirty: map[string]bool{}, unwatched: map[string]bool{}}
	var err error
	m.root, err = os.OpenRoot(m.dir)
	must(t, err)
	t.Cleanup(func() { m.root.Close() })
	m.idx, err = openIndex(m.state)
	must(t, err)
	t.Cleanup(m.idx.close)
	m.stream, err = openRaw(t, c, "r1", 1)
	must(t, err)
	m.stream2, err = openRaw(t, c, "r2", 1)
	must(t, err)
	m.stream3, err = openRaw(t, c, "r3", 1)
	must(t, err)
	setup(m)
	m.queue, m.unwatched = nil, map[string]bool{}
	full, err := fullPlan(m.root)
	must(t, err)
	m.startCut()
	must(t, m.sp.read(m.root, full, m.warn))
	m.pl, m.full = full, true
	m.endCut()
	return m
}

func (m *cutModel) path(rel string) string { return filepath.Join(m.dir, rel) }

func (m *cutModel) logf(format string, args ...any) {
	m.trace = append(m.trace, fmt.Sprintf(format, args...))
}

// event queues the marks of one inotify event about rel: rel itself and
// its directory (whose mtime changed).
//
// A directory has no watch until the event of its creation is delivered
// (the watcher adds it then, and reads the subtree): events in it before
// that are lost, as inotify loses them.
func (m *cutModel) event(rel string, create bool) {
	for d := parentOf(rel); ; d = parentOf(d) {
		if m.unwatched[d] {
			return
		}
		if d == rootPath {
			break
		}
	}
	m.queue = append(m.queue, []modelMark{{rel, create}, {parentOf(rel), false}})
	if fi, err := os.Lstat(m.path(rel)); create && err == nil && fi.IsDir() {
		m.unwatched[rel] = true
	}
}

func (m *cutModel) pick() string { return modelNames[m.rng.IntN(len(modelNames))] }

// change makes one random change to the tree and queues its events.
func (m *cutModel) change() {
	m.n++
	m.changed = true
	rel := m.pick()
	if !m.plain(rel) {
		return // the model changes nothing through a symlink
	}
	if m.rng.IntN(3) > 0 {
		m.parents(rel)
	}
	fi, err := os.Lstat(m.path(rel))
	exists := err == nil
	switch m.rng.IntN(10) {
	case 0, 1: // write a file, new or over the old one
		if exists && !fi.Mode().IsRegular() {
			return
		}
		data := []byte(strconv.Itoa(m.n) + strings.Repeat("z", m.rng.IntN(3)*40000))
		if !exists && len(m.stashed) > 0 && m.rng.IntN(2) == 0 {
			if ok := m.reuse(rel, false, data); ok {
				m.logf("create %s (reused inode)", rel)
				m.event(rel, true)
			}
			return
		}
		if os.WriteFile(m.path(rel), data, 0o644) == nil {
			m.logf("write %s", rel)
			m.event(rel, !exists)
		}
	case 2: // write in place
		if exists && fi.Mode().IsRegular() {
			f, err := os.OpenFile(m.path(rel), os.O_WRONLY, 0)
			must(m.t, err)
			_, err = f.WriteAt([]byte("in place "+strconv.Itoa(m.n)), int64(m.rng.IntN(50000)))
			must(m.t, err)
			must(m.t, f.Close())
			m.logf("write in place %s", rel)
			m.event(rel, false)
		}
	case 3: // mkdir
		if exists {
			return
		}
		if len(m.stashed) > 0 && m.rng.IntN(2) == 0 {
			if m.reuse(rel, true, nil) {
				m.logf("mkdir %s (reused inode)", rel)
				m.event(rel, true)
			}
			return
		}
		if os.Mkdir(m.path(rel), 0o755) == nil {
			m.logf("mkdir %s", rel)
			m.event(rel, true)
		}
	case 4: // rm -rf
		if exists {
			m.logf("rm -rf %s", rel)
			m.remove(rel)
		}
	case 5, 6: // rename
		to := m.pick()
		if !exists || (fi.IsDir() && !m.dirs) || !m.plain(to) {
			return
		}
		if os.Rename(m.path(rel), m.path(to)) == nil {
			m.logf("mv %s %s", rel, to)
			m.event(rel, false)
			m.event(to, true)
		}
	case 8: // symlink
		if !exists && os.Symlink(m.pick(), m.path(rel)) == nil {
			m.logf("ln -s %s", rel)
			m.event(rel, true)
		}
	case 9: // hard link (an event for the new name only: the old name's
		// link count changes without an event in its directory)
		to := m.pick()
		if exists && fi.Mode().IsRegular() && m.plain(to) && os.Link(m.path(rel), m.path(to)) == nil {
			m.logf("ln %s %s", rel, to)
			m.linkedSince = true
			m.event(to, true)
		}
	case 7: // chmod
		if exists && fi.Mode().Type() != fs.ModeSymlink {
			must(m.t, os.Chmod(m.path(rel), fs.FileMode(0o700|m.rng.IntN(0o100))))
			m.logf("chmod %s", rel)
			m.event(rel, false)
		}
	}
}

// plain reports whether no ancestor of rel is a symlink (or another
// non-directory), so that a change of rel happens at rel.
func (m *cutModel) plain(rel string) bool {
	for _, d := range ancestorsOf(rel) {
		if fi, err := os.Lstat(m.path(d)); err == nil && !fi.IsDir() {
			return false
		}
	}
	return true
}

// parents makes the missing directories above rel, as mkdir -p does.
func (m *cutModel) parents(rel string) {
	for _, d := range ancestorsOf(rel) {
		if d == rootPath {
			continue
		}
		if _, err := os.Lstat(m.path(d)); err == nil {
			continue
		}
		if len(m.stashed) > 0 && m.rng.IntN(2) == 0 && m.reuse(d, true, nil) {
			m.logf("mkdir %s (reused inode)", d)
		} else if os.Mkdir(m.path(d), 0o755) == nil {
			m.logf("mkdir %s", d)
		} else {
			return
		}
		m.event(d, true)
	}
}

// reuse brings a held-aside inode back at rel, as a new file holding data
// or a new (empty) directory; it reports whether one of that kind was
// there to take.
func (m *cutModel) reuse(rel string, dir bool, data []byte) bool {
	for i, s := range m.stashed {
		fi, err := os.Lstat(s)
		must(m.t, err)
		if fi.IsDir() != dir {
			continue
		}
		if !dir {
			must(m.t, os.WriteFile(s, data, 0o644))
		}
		if os.Rename(s, m.path(rel)) != nil {
			return false
		}
		m.stashed = slices.Delete(m.stashed, i, i+1)
		return true
	}
	return false
}

// remove is rm -rf rel: its entries go deepest first, each with its
// event; some are held aside instead of freed, to come back as new ones.
func (m *cutModel) remove(rel string) {
	fi, err := os.Lstat(m.path(rel))
	must(m.t, err)
	if fi.IsDir() {
		entries, err := os.ReadDir(m.path(rel))
		must(m.t, err)
		for _, e := range entries {
			m.remove(joinRel(rel, e.Name()))
		}
	}
	single := fi.IsDir() || (fi.Mode().IsRegular() && fi.Sys().(*syscall.Stat_t).Nlink == 1)
	if m.rng.IntN(2) == 0 && single {
		s := filepath.Join(m.stash, strconv.Itoa(m.n)+"-"+strconv.Itoa(len(m.stashed))+"-"+strconv.Itoa(m.rng.IntN(1e9)))
		must(m.t, os.Rename(m.path(rel), s))
		m.stashed = append(m.stashed, s)
	} else {
		must(m.t, os.Remove(m.path(rel)))
	}
	m.event(rel, false)
}

// deliver hands the first n queued events to the dirty set, as the
// watcher does: a created directory is dirty with its subtree.
func (m *cutModel) deliver(n int) {
	n = min(n, len(m.queue))
	for _, ev := range m.queue[:n] {
		for _, mk := range ev {
			sub := false
			if mk.create {
				delete(m.unwatched, mk.rel)
			}
			if mk.create && mk.rel != rootPath {
				if fi, err := os.Lstat(m.path(mk.rel)); err == nil && fi.IsDir() {
					sub = true
				}
			}
			m.dirty[mk.rel] = m.dirty[mk.rel] || sub
		}
	}
	m.queue = m.queue[n:]
}

func (m *cutModel) startCut() {
	sp, err := newSpool(filepath.Join(m.state, "spool"))
	must(m.t, err)
	m.sp = sp
	m.pl = nil
	m.full = false
	m.cutDirty = map[string]bool{}
}

// round takes the dirty set into the cut's plan and reads it, as a round
// of takeCut does.
func (m *cutModel) round() {
	if m.sp == nil {
		m.startCut()
	}
	dirty := m.dirty
	m.dirty = map[string]bool{}
	keys := make([]string, 0, len(dirty))
	for k, v := range dirty {
		keys = append(keys, k+map[bool]string{true: "/**"}[v])
	}
	slices.Sort(keys)
	m.logf("round takes %v", keys)
	for rel, sub := range dirty {
		m.cutDirty[rel] = m.cutDirty[rel] || sub
	}
	var err error
	switch {
	case m.pl == nil && !m.quiet && m.rng.IntN(8) == 0:
		// A replica needs the whole tree: a full cut, whose delta view the
		// replicas that follow take.
		m.logf("full cut for a replica")
		m.full = true
		m.pl, err = fullPlan(m.root)
	case m.pl == nil:
		m.pl, err = dirtyPlan(m.root, dirty, m.idx)
	default:
		err = m.pl.update(m.root, dirty)
	}
	must(m.t, err)
	// The tree keeps changing while the round reads what it planned.
	for !m.quiet && m.rng.IntN(4) == 0 {
		m.change()
	}
	must(m.t, m.sp.read(m.root, m.pl, m.warn))
	m.changed = false
}

// rescan marks what the tree and the index disagree on, as the periodic
// rescan does (its marks reach the dirty set at once).
func (m *cutModel) rescan() {
	snap := map[string]statKey{}
	fi, err := m.root.Lstat(rootPath)
	must(m.t, err)
	snap[rootPath] = keyOf(fi)
	must(m.t, walkTree(m.root, rootPath, func(rel string, fi fs.FileInfo) { snap[rel] = keyOf(fi) }))
	var marked []string
	must(m.t, m.idx.differences(snap, func(rel string) {
		marked = append(marked, rel)
		m.dirty[rel] = m.dirty[rel] || false
		if rel != rootPath {
			m.dirty[parentOf(rel)] = m.dirty[parentOf(rel)] || false
		}
	}))
	slices.Sort(marked)
	m.logf("rescan marks %v", marked)
}

// endCut sends the cut to the replica and applies it to the index; the
// replica must take it.
func (m *cutModel) endCut() {
	m.t.Helper()
	m.seq++
	full := m.full
	b := &cutBatch{seq: m.seq, full: full, sp: m.sp, items: m.sp.items(m.pl)}
	if full && m.seq > 1 && offersDelta(false, len(m.queue)+len(m.dirty) == 0) {
		b.delta = m.sp.items(deltaOf(m.pl, m.cutDirty, m.sp.carried))
	}
	var ops []string
	for _, r := range m.pl.renames {
		ops = append(ops, "RENAME "+r.from+" "+r.to)
	}
	for d := range m.pl.deletes {
		ops = append(ops, "DELETE "+d)
	}
	for d := range m.pl.dirs {
		ops = append(ops, "MKDIR "+d)
	}
	for d := range m.pl.others {
		ops = append(ops, "PUT "+d)
	}
	slices.Sort(ops)
	m.logf("cut %d (full %v, %d events left): %v", m.seq, full, len(m.queue)+len(m.dirty), ops)
	u, err := m.sp.indexUpdate(m.pl, full)
	must(m.t, err)
	must(m.t, m.idx.apply(u))
	// A consistent cut (every event taken, nothing changed since its last
	// round read the tree) is the tree: the replica equals it entry for
	// entry. (Not with hard links: a change through a name removed since
	// has no event for the others, until a rescan.)
	exact := len(m.queue)+len(m.dirty) == 0 && !m.changed
	if full && m.r3open {
		m.closeContinued() // a full cut ends a continuation, as a sender aborts it
	}
	m.sendCut(b, "r1", m.stream, m.replica, b.delta == nil)
	if exact && !m.linkedSince {
		if err := SameTree(m.dir, m.replica); err != nil {
			m.fail("cut %d is consistent, yet: %v", m.seq, err)
		}
	}
	if full {
		m.sendCut(b, "r2", m.stream2, m.replica2, true)
	}
	m.lastExact = exact && !m.linkedSince
	m.sendContinued(b)
	m.sp.close()
	m.sp, m.pl = nil, nil
}

// sendCut sends batch b to a replica (whole, or its delta view when the
// replica follows), which must take it; then the replica holds the paths
// the index holds (a path only the replica holds is never repaired by a
// rescan, which compares the tree with the index).
func (m *cutModel) sendCut(b *cutBatch, name string, stream *rawStream, data string, whole bool) {
	m.t.Helper()
	send := func(r *tetherpb.StreamRequest) error { return stream.stream.Send(r) }
	full, err := b.send(context.Background(), nil, send, whole, nil, nil)
	if err == nil {
		err = b.commit(send, full)
	}
	if err != nil {
		m.fail("send cut %d to %s: %v", b.seq, name, err)
	}
	ack, err := stream.stream.Recv()
	if err != nil {
		m.fail("%s refused cut %d: %v", name, b.seq, err)
	}
	if ack.GetSeq() != b.seq {
		m.fail("%s acknowledged %d, want %d", name, ack.GetSeq(), b.seq)
	}
	rep, err := Manifest(data)
	must(m.t, err)
	var held []string
	for rel := range rep {
		if rel != rootPath {
			held = append(held, rel)
		}
	}
	slices.Sort(held)
	if got := m.indexed(); !slices.Equal(held, got) {
		m.fail("after cut %d %s holds %q, the index %q", b.seq, name, held, got)
	}
}

// sendContinued gives cut b to r3: a full cut opens a batch (sent whole,
// not committed), a later cut continues it (Continue, then the cut's ops)
// until it is committed; with none open, r3 takes the cut as r1 does.
func (m *cutModel) sendContinued(b *cutBatch) {
	m.t.Helper()
	send := func(r *tetherpb.StreamRequest) error { return m.stream3.stream.Send(r) }
	switch {
	case b.full:
		if _, err := b.send(context.Background(), nil, send, true, nil, nil); err != nil {
			m.fail("send cut %d to r3: %v", b.seq, err)
		}
		m.r3open, m.r3left, m.r3last = true, m.rng.IntN(4), b.seq
		m.logf("r3 opens a batch with full cut %d, to continue over %d cuts", b.seq, m.r3left)
	case m.r3open:
		if err := send(&tetherpb.StreamRequest{Kind: &tetherpb.StreamRequest_Continue{Continue: &tetherpb.Continue{Seq: b.seq}}}); err != nil {
			m.fail("continue r3's batch with cut %d: %v", b.seq, err)
		}
		if _, err := b.send(context.Background(), nil, send, false, nil, nil); err != nil {
			m.fail("send cut %d to r3: %v", b.seq, err)
		}
		m.r3left--
		m.r3last = b.seq
	default:
		m.sendCut(b, "r3", m.stream3, m.replica3, b.delta == nil)
		return
	}
	if m.r3left <= 0 {
		m.closeContinued()
	}
}

// closeContinued commits r3's open batch as the last cut sent into it: r3
// must take it and then hold exactly what r1 holds (r1 took the same cuts
// one by one).
func (m *cutModel) closeContinued() {
	m.t.Helper()
	m.r3open = false
	if err := m.stream3.stream.Send(&tetherpb.StreamRequest{Kind: &tetherpb.StreamRequest_Commit{Commit: &tetherpb.Commit{
		Seq: m.r3last, Full: true}}}); err != nil {
		m.fail("commit r3's continued batch: %v", err)
	}
	ack, err := m.stream3.stream.Recv()
	if err != nil {
		m.fail("r3 refused the batch continued to cut %d: %v", m.r3last, err)
	}
	if ack.GetSeq() != m.r3last {
		m.fail("r3 acknowledged %d, want %d", ack.GetSeq(), m.r3last)
	}
	m.logf("r3 committed the batch continued to cut %d", m.r3last)
	want, err := Manifest(m.replica)
	must(m.t, err)
	got, err := Manifest(m.replica3)
	must(m.t, err)
	if !m.lastExact {
		// The mtime of a directory no planned entry names (events left
		// for the next cut) is when each replica changed it.
		for _, mf := range []map[string]Entry{want, got} {
			for rel, e := range mf {
				if e.Type == "dir" {
					e.MTime = time.Time{}
					mf[rel] = e
				}
			}
		}
	}
	if d := DiffManifests(want, got); len(d) > 0 {
		m.fail("after the batch continued to cut %d, r3 differs from r1: %q", m.r3last, d)
	}
}

// linked reports whether the tree holds a hard-linked file.
func (m *cutModel) linked() bool {
	found := false
	must(m.t, walkTree(m.root, rootPath, func(_ string, fi fs.FileInfo) {
		if fi.Mode().IsRegular() && fi.Sys().(*syscall.Stat_t).Nlink > 1 {
			found = true
		}
	}))
	return found
}

// indexed returns the paths the index holds, sorted, without the root.
func (m *cutModel) indexed() []string {
	var got []string
	must(m.t, m.idx.under(rootPath, func(rel string, _ *indexEntry) {
		if rel != rootPath {
			got = append(got, rel)
		}
	}))
	slices.Sort(got)
	return got
}

func (m *cutModel) fail(format string, args ...any) {
	m.t.Helper()
	m.t.Fatalf("%s\nafter:\n  %s", fmt.Sprintf(format, args...), strings.Join(m.trace, "\n  "))
}

// settle delivers every event and takes consistent cuts until none is
// left, then checks that the replica and the index hold the tree.
func (m *cutModel) settle() {
	m.t.Helper()
	m.quiet = true
	defer func() { m.quiet = false }()
	m.deliver(len(m.queue))
	if m.sp != nil || len(m.dirty) > 0 {
		m.round()
		m.endCut()
	}
	// What no event told (a hard-linked file changed through a name
	// removed since) the periodic rescan finds.
	m.rescan()
	if len(m.dirty) > 0 {
		m.round()
		m.endCut()
	}
	m.linkedSince = m.linked()
	if err := SameTree(m.dir, m.replica); err != nil {
		m.fail("%v", err)
	}
	var want []string
	must(m.t, walkTree(m.root, rootPath, func(rel string, _ fs.FileInfo) { want = append(want, rel) }))
	slices.Sort(want)
	if got := m.indexed(); !slices.Equal(want, got) {
		m.fail("the index holds %q, the tree %q", got, want)
	}
}

// run makes steps random moves: a change, a delivery of events, a round,
// or the end of a cut (file-consistent only when events are left).
func (m *cutModel) run(steps int) {
	for range steps {
		switch k := m.rng.IntN(20); {
		case k == 0:
			m.rescan()
		case k < 8:
			m.change()
		case k < 12:
			m.deliver(1 + m.rng.IntN(3))
		case k < 16:
			if len(m.dirty) > 0 || m.sp != nil {
				m.round()
			}
		default:
			if m.sp != nil && (len(m.queue)+len(m.dirty) == 0 || m.rng.IntN(3) == 0) {
				m.endCut()
			}
		}
	}
	m.settle()
}

// TestCutModel runs the cut code under random splits of events into
// rounds and cuts, with inode numbers reused; the replica must take every
// cut and end equal to the tree, and the index must agree.
func TestCutModel(t *testing.T) {
	seeds := 200
	if testing.Short() {
		seeds = 40
	}
	if n, err := strconv.Atoi(os.Getenv("TETHER_MODEL_SEEDS")); err == nil {
		seeds = n // a longer search: TETHER_MODEL_SEEDS=20000
	}
	for _, dirs := range []bool{false, true} {
		for seed := range uint64(seeds) {
			t.Run(fmt.Sprintf("dirs=%v/seed=%d", dirs, seed), func(t *testing.T) {
				m := newCutModel(t, seed, dirs)
				for range 4 {
					m.run(60)
				}
			})
		}
	}
}

// TestHardLinkCarriedByItsNewestReading reads both names of a hard-linked
// file in one round, then one of them again after a write through it: the
// batch must carry that newest reading for both names (it carried the
// first name's, stale, to both).
func TestHardLinkCarriedByItsNewestReading(t *testing.T) {
	m := newCutModelWith(t, 0, false, func(m *cutModel) {
		must(t, os.MkdirAll(m.path("c"), 0o755))
		must(t, os.MkdirAll(m.path("a"), 0o755))
		must(t, os.WriteFile(m.path("c/q"), []byte("first"), 0o644))
		must(t, os.Link(m.path("c/q"), m.path("a/q")))
	})
	must(t, os.Chmod(m.path("a/q"), 0o600))
	m.event("a/q", false)
	m.event("c/q", false)
	m.deliver(2)
	m.round()
	must(t, os.WriteFile(m.path("c/q"), []byte("second, longer"), 0o644))
	must(t, os.Chmod(m.path("c/q"), 0o640))
	m.event("c/q", false)
	m.deliver(1)
	m.round()
	m.endCut()
	if err := SameTree(m.dir, m.replica); err != nil {
		t.Fatal(err)
	}
}

// TestNewParentsTravelWithTheirEntry plans a file whose directory and that
// directory's parent are new, their own events not taken yet (a
// file-consistent cut): the batch describes both directories, so the
// replica holds them as the primary does (not as the bare directories it
// makes for a path, mode 0700), and the index holds them.
func TestNewParentsTravelWithTheirEntry(t *testing.T) {
	m := newCutModelWith(t, 0, false, func(*cutModel) {})
	must(t, os.MkdirAll(m.path("b/y"), 0o755))
	must(t, os.Chmod(m.path("b"), 0o751))
	must(t, os.WriteFile(m.path("b/y/p"), []byte("p"), 0o644))
	m.dirty["b/y/p"] = false
	m.round()
	m.endCut()
	for _, rel := range []string{"b", "b/y"} {
		want, err := os.Lstat(m.path(rel))
		must(t, err)
		got, err := os.Lstat(filepath.Join(m.replica, rel))
		must(t, err)
		if got.Mode() != want.Mode() {
			t.Errorf("the replica's %s has mode %v, want %v", rel, got.Mode(), want.Mode())
		}
		if e, err := m.idx.get(rel); err != nil || e == nil || e.ino != inoOf(want) {
			t.Errorf("the index holds %s as %+v (%v), want the primary's directory", rel, e, err)
		}
	}
}
