package replication

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

// watcher turns inotify events on a volume's data directory into dirty
// paths, watching every directory (including ones created later), and
// rescans the tree periodically and after an event overflow to catch what
// inotify missed.
type watcher struct {
	dataDir    string
	barrierDir string // outside the volume: where cut barriers create sentinels
	root       *os.Root
	in         *inotify
	add        func(path string) error // in.add (tests wrap it)
	rm         func(path string) error // in.remove
	log        *slog.Logger
	rescan     time.Duration
	ch         *changes

	// idx, once set, is the index of the last cut: a rescan also marks
	// what differs from it, so that what an event missed (and the previous
	// scan saw already) still reaches the replicas.
	idx *index

	rescans atomic.Uint64 // rescans done (tests wait on it)

	dirs map[string]uint64  // watched directories, with the inode watched
	snap map[string]statKey // the tree as the last scan saw it

	// limited holds the error of the last watch refused for the inotify
	// watch limit (nil when every directory is watched); the watcher then
	// rescans every limitedRescan. Written by the watcher's goroutine, read
	// by Status.
	limited atomic.Pointer[error]
}

// limitedRescan is the rescan period while directories go unwatched for
// the inotify watch limit.
const limitedRescan = 2 * time.Second

// statKey is what a rescan compares to notice a change.
type statKey struct {
	mode        uint32
	ino         uint64
	size        int64
	mtime, ctim int64
}

func keyOf(fi fs.FileInfo) statKey {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return statKey{mode: uint32(fi.Mode()), size: fi.Size(), mtime: fi.ModTime().UnixNano()}
	}
	return statKey{mode: st.Mode, ino: st.Ino, size: st.Size,
		mtime: st.Mtim.Nano(), ctim: st.Ctim.Nano()}
}

func newWatcher(dataDir, barrierDir string, root *os.Root, log *slog.Logger, rescan time.Duration, ch *changes) (*watcher, error) {
	in, err := newInotify()
	if err != nil {
		if errors.Is(err, syscall.EMFILE) {
			return nil, fmt.Errorf("create inotify instance: %w (too many inotify instances: raise the limit, e.g. sysctl -w fs.inotify.max_user_instances=1024)", err)
		}
		return nil, fmt.Errorf("create inotify instance: %w", err)
	}
	return &watcher{dataDir: dataDir, barrierDir: barrierDir, root: root, in: in, add: in.add, rm: in.remove, log: log, rescan: rescan,
		ch: ch, dirs: map[string]uint64{}}, nil
}

// setup watches the whole tree and records its state; it fails when the
// inotify watch limit is too low.
func (w *watcher) setup() error {
	if err := resetDir(w.barrierDir); err != nil {
		return fmt.Errorf("prepare the barrier directory: %w", err)
	}
	// The same inotify instance watches the barrier directory: it delivers
	// events in order, so a sentinel's event comes after every event of a
	// write that completed before the sentinel was created.
	if err := w.in.add(w.barrierDir); err != nil {
		return fmt.Errorf("watch the barrier directory: %w", err)
	}
	snap, err := w.scan(true)
	if err != nil {
		return err
	}
	w.snap = snap
	return nil
}

func (w *watcher) close() {
	w.in.close()
}

// run handles events until ctx ends.
func (w *watcher) run(ctx context.Context) {
	rescanT := time.NewTimer(w.nextRescan())
	defer rescanT.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case ev := <-w.in.events:
			limited := w.limited.Load() != nil
			w.handle(ev)
			if !limited && w.limited.Load() != nil {
				rescanT.Reset(w.nextRescan())
			}
		case err := <-w.in.errs:
			w.failed(err)
		case <-rescanT.C:
			w.rescanNow()
			rescanT.Reset(w.nextRescan())
		}
	}
}

// failed handles an error of the inotify instance: events were lost,
// possibly for changes a rescan cannot tell from its last scan, so the
// whole tree is resent.
func (w *watcher) failed(err error) {
	if errors.Is(err, errEventOverflow) {
		w.log.Warn("inotify event queue overflowed; resending the whole volume", "err", err)
	} else {
		w.log.Error("inotify error; resending the whole volume", "err", err)
	}
	// Events were lost: a directory made where a removed one was can hold
	// its inode number again. Watch every directory anew (adding a watch
	// the inode already has changes nothing).
	clear(w.dirs)
	w.rescanNow()
	w.ch.requireFull()
}

// remove drops the inotify watch of path.
func (w *watcher) remove(path string) {
	if err := w.rm(path); err != nil {
		w.log.Warn("removing a watch failed", "err", err)
	}
}

// nextRescan returns the delay to the next rescan: shorter while
// directories go unwatched.
func (w *watcher) nextRescan() time.Duration {
	if w.limited.Load() != nil {
		return jitter(min(w.rescan, limitedRescan))
	}
	return jitter(w.rescan)
}

// jitter spreads d by ±10%.
func jitter(d time.Duration) time.Duration {
	return d - d/10 + rand.N(d/5+1)
}

// rel turns an event's path into a volume-relative one.
func (w *watcher) rel(name string) (string, bool) {
	if name == w.dataDir {
		return rootPath, true
	}
	r, ok := strings.CutPrefix(name, w.dataDir+string(filepath.Separator))
	return r, ok && r != ""
}

// handle records what one event changed.
func (w *watcher) handle(ev fsEvent) {
	if dir, name := filepath.Split(ev.name); filepath.Clean(dir) == w.barrierDir {
		if ev.has(opCreate) {
			w.ch.barrierSeen(name)
		}
		return
	}
	rel, ok := w.rel(ev.name)
	if !ok {
		return
	}
	now := time.Now()
	if ev.has(opRename | opRemove) {
		// A moved directory keeps its inotify watches, which would report
		// events under its old name: drop them; the new name is watched anew
		// when its Create arrives.
		w.unwatch(rel)
	}
	subtree := false
	if ev.has(opCreate) && rel != rootPath {
		if fi, err := w.root.Lstat(rel); err == nil && fi.IsDir() {
			subtree = true
			if err := w.watchTree(rel); errors.Is(err, syscall.ENOSPC) {
				w.limitedBy(err)
			} else if err != nil {
				w.log.Error("cannot watch a new directory; changes in it are caught by the periodic rescan only", "dir", rel, "err", err)
			}
		}
	}
	w.ch.add(rel, subtree, now)
	if rel != rootPath {
		w.ch.add(parentOf(rel), false, now) // its mtime changed
	}
}

// watch adds an inotify watch on directory rel.
func (w *watcher) watch(rel string) error {
	fi, err := w.root.Lstat(rel)
	if err != nil {
		return fmt.Errorf("watch directory %q: %w", rel, err)
	}
	// The inode counts: a directory moved away and another made (or moved)
	// in its place needs a watch of its own.
	ino := inoOf(fi)
	if have, ok := w.dirs[rel]; ok && have == ino {
		return nil
	}
	if err := w.add(filepath.Join(w.dataDir, rel)); err != nil {
		if errors.Is(err, syscall.ENOSPC) {
			return watchLimitError(len(w.dirs), err)
		}
		return fmt.Errorf("watch directory %q: %w", rel, err)
	}
	w.dirs[rel] = ino
	return nil
}

// watchLimitError explains how to raise the inotify watch limit.
func watchLimitError(n int, err error) error {
	limit, used := inotifyWatches()
	return fmt.Errorf("inotify watch limit reached after %d directories (fs.inotify.max_user_watches=%s, %d watches in use by this process): %s: %w",
		n, limitString(limit), used, raiseWatchLimit(max(limit, n+used)), err)
}

func limitString(limit int) string {
	if limit <= 0 {
		return "unknown"
	}
	return strconv.Itoa(limit)
}

// raiseWatchLimit words the fix for a watch limit that needs to exceed need.
func raiseWatchLimit(need int) string {
	n := max(1<<20, 2*need)
	return fmt.Sprintf("raise it with `sysctl -w fs.inotify.max_user_watches=%d` and make it persistent with `echo fs.inotify.max_user_watches=%d > /etc/sysctl.d/90-tether.conf`", n, n)
}

// checkWatchLimit says whether a tree of dirs directories (plus one watch
// for the cut barriers) fits in the inotify watch limit, of which used are
// taken; a limit of 0 or less is unknown and passes.
func checkWatchLimit(dirs, limit, used int) error {
	need := dirs + 1
	if limit <= 0 || need <= limit-used {
		return nil
	}
	return fmt.Errorf("the volume has %d directories to watch but the inotify watch limit (fs.inotify.max_user_watches=%d) leaves %d (%d in use by this process): %s",
		dirs, limit, max(limit-used, 0), used, raiseWatchLimit(limit+need))
}

// inotifyWatches returns fs.inotify.max_user_watches (0 if unreadable) and
// the inotify watches this process holds. Other processes of the same user
// share the limit too; they are not counted.
func inotifyWatches() (limit, used int) {
	if b, err := os.ReadFile("/proc/sys/fs/inotify/max_user_watches"); err == nil {
		limit, _ = strconv.Atoi(strings.TrimSpace(string(b)))
	}
	fds, _ := os.ReadDir("/proc/self/fdinfo")
	for _, fd := range fds {
		b, err := os.ReadFile("/proc/self/fdinfo/" + fd.Name())
		if err == nil {
			used += strings.Count(string(b), "inotify wd:")
		}
	}
	return limit, used
}

// countDirs counts the directories of the tree below root (root included).
func countDirs(root *os.Root, dir string) (int, error) {
	entries, err := readDirRoot(root, dir)
	if err != nil {
		if isGone(err) {
			return 0, nil
		}
		return 0, fmt.Errorf("count the volume's directories: %w", err)
	}
	n := 1
	for _, e := range entries {
		if e.IsDir() {
			k, err := countDirs(root, joinRel(dir, e.Name()))
			if err != nil {
				return 0, err
			}
			n += k
		}
	}
	return n, nil
}

// limitedBy records a watch refused for the watch limit (nil: none in the
// last scan) and logs the change.
func (w *watcher) limitedBy(err error) {
	was := w.limited.Load()
	switch {
	case err != nil && was == nil:
		w.log.Error("directories go unwatched: their changes are found by a rescan every "+limitedRescan.String(), "err", err)
		w.limited.Store(&err)
	case err != nil:
		w.limited.Store(&err)
	case was != nil:
		w.log.Info("every directory of the volume is watched again")
		w.limited.Store(nil)
	}
}

// watchLimitErr returns the watch-limit error directories go unwatched for
// ("" when none).
func (w *watcher) watchLimitErr() string {
	if e := w.limited.Load(); e != nil {
		return (*e).Error()
	}
	return ""
}

// watchTree watches rel and every directory below it.
func (w *watcher) watchTree(rel string) error {
	if err := w.watch(rel); err != nil {
		if isGone(err) {
			return nil
		}
		return err
	}
	entries, err := readDirRoot(w.root, rel)
	if err != nil {
		if isGone(err) {
			return nil
		}
		return err
	}
	for _, e := range entries {
		if e.IsDir() {
			if err := w.watchTree(joinRel(rel, e.Name())); err != nil {
				return err
			}
		}
	}
	return nil
}

// unwatch drops the watches of rel and every directory below it.
func (w *watcher) unwatch(rel string) {
	if rel == rootPath {
		return
	}
	for d := range w.dirs {
		if isUnder(d, rel) {
			w.remove(filepath.Join(w.dataDir, d))
			delete(w.dirs, d)
		}
	}
}

// isGone reports an error saying a path vanished (or changed type) under us.
func isGone(err error) bool {
	return errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ENOTDIR)
}

// scan walks the tree, watching directories that are not yet, and returns
// its state. A watch refused for the watch limit fails it when strict, else
// the directory goes unwatched (see limitedBy).
func (w *watcher) scan(strict bool) (map[string]statKey, error) {
	snap := map[string]statKey{}
	fi, err := w.root.Lstat(rootPath)
	if err != nil {
		return nil, fmt.Errorf("scan volume: %w", err)
	}
	snap[rootPath] = keyOf(fi)
	var limit error
	lp := &limit
	if strict {
		lp = nil
	}
	if err := w.scanDir(rootPath, snap, lp); err != nil {
		return nil, err
	}
	if !strict {
		w.limitedBy(limit)
	}
	for d := range w.dirs {
		if _, ok := snap[d]; !ok {
			w.unwatch(d)
		}
	}
	return snap, nil
}

func (w *watcher) scanDir(dir string, snap map[string]statKey, limit *error) error {
	if err := w.watch(dir); err != nil {
		switch {
		case isGone(err):
			return nil
		case errors.Is(err, syscall.ENOSPC) && limit != nil:
			*limit = err // rescans find what changes in it
		default:
			return err
		}
	}
	entries, err := readDirRoot(w.root, dir)
	if err != nil {
		if isGone(err) {
			return nil
		}
		return fmt.Errorf("scan volume directory %q: %w", dir, err)
	}
	for _, e := range entries {
		rel := joinRel(dir, e.Name())
		fi, err := e.Info()
		if err != nil {
			continue // vanished
		}
		snap[rel] = keyOf(fi)
		if fi.IsDir() {
			if err := w.scanDir(rel, snap, limit); err != nil {
				return err
			}
		}
	}
	return nil
}

// rescanNow compares the tree with the last scan and marks what differs.
func (w *watcher) rescanNow() {
	defer w.rescans.Add(1)
	snap, err := w.scan(false)
	if err != nil {
		w.log.Error("rescan of the volume failed", "err", err)
		return
	}
	now := time.Now()
	mark := func(rel string) {
		w.ch.add(rel, false, now)
		if rel != rootPath {
			w.ch.add(parentOf(rel), false, now)
		}
	}
	for rel, k := range snap {
		if old, ok := w.snap[rel]; !ok || old != k {
			mark(rel)
		}
	}
	for rel := range w.snap {
		if _, ok := snap[rel]; !ok {
			mark(rel)
		}
	}
	w.snap = snap
	if w.idx != nil {
		if err := w.idx.differences(snap, mark); err != nil {
			w.log.Error("rescan of the volume could not compare it with its block index", "err", err)
		}
	}
}
