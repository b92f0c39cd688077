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
	"strings"
	"syscall"
	"time"

	"github.com/fsnotify/fsnotify"
)

// watcher turns fsnotify events on a volume's data directory into dirty
// paths, watching every directory (including ones created later), and
// rescans the tree periodically and after an event overflow to catch what
// inotify missed.
type watcher struct {
	dataDir    string
	barrierDir string // outside the volume: where cut barriers create sentinels
	root       *os.Root
	fsw        *fsnotify.Watcher
	log        *slog.Logger
	rescan     time.Duration
	ch         *changes

	dirs map[string]struct{} // watched directories
	snap map[string]statKey  // the tree as the last scan saw it
}

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
	fsw, err := fsnotify.NewWatcher()
	if err != nil {
		if errors.Is(err, syscall.EMFILE) {
			return nil, fmt.Errorf("create inotify instance: %w (too many inotify instances: raise the limit, e.g. sysctl -w fs.inotify.max_user_instances=1024)", err)
		}
		return nil, fmt.Errorf("create inotify instance: %w", err)
	}
	return &watcher{dataDir: dataDir, barrierDir: barrierDir, root: root, fsw: fsw, log: log, rescan: rescan,
		ch: ch, dirs: map[string]struct{}{}}, nil
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
	if err := w.fsw.Add(w.barrierDir); err != nil {
		return fmt.Errorf("watch the barrier directory: %w", err)
	}
	snap, err := w.scan()
	if err != nil {
		return err
	}
	w.snap = snap
	return nil
}

func (w *watcher) close() {
	_ = w.fsw.Close()
}

// run handles events until ctx ends.
func (w *watcher) run(ctx context.Context) {
	rescanT := time.NewTimer(jitter(w.rescan))
	defer rescanT.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-w.fsw.Events:
			if !ok {
				return
			}
			w.handle(ev)
		case err, ok := <-w.fsw.Errors:
			if !ok {
				return
			}
			// Events were lost, possibly for changes a rescan cannot tell
			// from its last scan: resend the whole tree.
			if errors.Is(err, fsnotify.ErrEventOverflow) {
				w.log.Warn("inotify event queue overflowed; resending the whole volume", "err", err)
			} else {
				w.log.Error("inotify error; resending the whole volume", "err", err)
			}
			w.rescanNow()
			w.ch.requireFull()
		case <-rescanT.C:
			w.rescanNow()
			rescanT.Reset(jitter(w.rescan))
		}
	}
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
func (w *watcher) handle(ev fsnotify.Event) {
	if dir, name := filepath.Split(ev.Name); filepath.Clean(dir) == w.barrierDir {
		if ev.Has(fsnotify.Create) {
			w.ch.barrierSeen(name)
		}
		return
	}
	rel, ok := w.rel(ev.Name)
	if !ok {
		return
	}
	now := time.Now()
	if ev.Has(fsnotify.Rename) || ev.Has(fsnotify.Remove) {
		// A moved directory keeps its inotify watches, which would report
		// events under its old name: drop them; the new name is watched anew
		// when its Create arrives.
		w.unwatch(rel)
	}
	subtree := false
	if ev.Has(fsnotify.Create) && rel != rootPath {
		if fi, err := w.root.Lstat(rel); err == nil && fi.IsDir() {
			subtree = true
			if err := w.watchTree(rel); err != nil {
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
	if _, ok := w.dirs[rel]; ok {
		return nil
	}
	if err := w.fsw.Add(filepath.Join(w.dataDir, rel)); err != nil {
		if errors.Is(err, syscall.ENOSPC) {
			return watchLimitError(len(w.dirs), err)
		}
		return fmt.Errorf("watch directory %q: %w", rel, err)
	}
	w.dirs[rel] = struct{}{}
	return nil
}

// watchLimitError explains how to raise the inotify watch limit.
func watchLimitError(n int, err error) error {
	limit := "unknown"
	if b, rerr := os.ReadFile("/proc/sys/fs/inotify/max_user_watches"); rerr == nil {
		limit = strings.TrimSpace(string(b))
	}
	return fmt.Errorf("inotify watch limit reached after %d directories (fs.inotify.max_user_watches=%s): "+
		"raise it, e.g. `sysctl -w fs.inotify.max_user_watches=1048576` and persist it in /etc/sysctl.d/: %w", n, limit, err)
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
			_ = w.fsw.Remove(filepath.Join(w.dataDir, d)) // may be gone already
			delete(w.dirs, d)
		}
	}
}

// isGone reports an error saying a path vanished (or changed type) under us.
func isGone(err error) bool {
	return errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ENOTDIR)
}

// scan walks the tree, watching directories that are not yet, and returns
// its state.
func (w *watcher) scan() (map[string]statKey, error) {
	snap := map[string]statKey{}
	fi, err := w.root.Lstat(rootPath)
	if err != nil {
		return nil, fmt.Errorf("scan volume: %w", err)
	}
	snap[rootPath] = keyOf(fi)
	if err := w.scanDir(rootPath, snap); err != nil {
		return nil, err
	}
	for d := range w.dirs {
		if _, ok := snap[d]; !ok {
			w.unwatch(d)
		}
	}
	return snap, nil
}

func (w *watcher) scanDir(dir string, snap map[string]statKey) error {
	if err := w.watch(dir); err != nil {
		if isGone(err) {
			return nil
		}
		return err
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
			if err := w.scanDir(rel, snap); err != nil {
				return err
			}
		}
	}
	return nil
}

// rescanNow compares the tree with the last scan and marks what differs.
func (w *watcher) rescanNow() {
	snap, err := w.scan()
	if err != nil {
		w.log.Error("rescan of the volume failed", "err", err)
		return
	}
	now := time.Now()
	for rel, k := range snap {
		if old, ok := w.snap[rel]; !ok || old != k {
			w.ch.add(rel, false, now)
			if rel != rootPath {
				w.ch.add(parentOf(rel), false, now)
			}
		}
	}
	for rel := range w.snap {
		if _, ok := snap[rel]; !ok {
			w.ch.add(rel, false, now)
			w.ch.add(parentOf(rel), false, now)
		}
	}
	w.snap = snap
}
