package replication

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// inotify is one inotify instance whose watches are kept by watch
// descriptor. fsnotify keys them by path, which a moved directory breaks:
// a directory renamed over another, or a new directory made where a moved
// one was, leaves it with a watch under the wrong name or drops the new
// one (and, when a stale descriptor is looked up, it panics). Here an
// event is named after the descriptor that reported it; a descriptor that
// was removed reports nothing more, and adding a path again moves its
// name to whatever inode the path holds now.
type inotify struct {
	f      *os.File
	fd     int
	events chan fsEvent
	errs   chan error
	done   chan struct{}
	wg     sync.WaitGroup

	mu     sync.Mutex
	byWd   map[int32]string
	byPath map[string]int32
}

// fsOp is what an event says happened to its path.
type fsOp uint8

const (
	opCreate fsOp = 1 << iota // created, or moved here
	opRemove                  // deleted
	opRename                  // moved away
	opWrite                   // contents written
	opChmod                   // metadata changed
)

// fsEvent is one change below a watched directory.
type fsEvent struct {
	name string // the absolute path
	op   fsOp
}

func (e fsEvent) has(op fsOp) bool { return e.op&op != 0 }

// errEventOverflow says the kernel's event queue overflowed: events were
// lost.
var errEventOverflow = errors.New("inotify event queue overflowed")

// watchMask is what each watched directory reports: every change of an
// entry, never following a symlink and only on a directory. (Not
// IN_CLOSE_WRITE: it would follow every write that IN_MODIFY reported, and
// make a cut read in the meantime take another round.)
const watchMask = unix.IN_CREATE | unix.IN_DELETE | unix.IN_MODIFY | unix.IN_ATTRIB |
	unix.IN_MOVED_FROM | unix.IN_MOVED_TO | unix.IN_ONLYDIR | unix.IN_DONT_FOLLOW | unix.IN_EXCL_UNLINK

func newInotify() (*inotify, error) {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return nil, err
	}
	n := &inotify{f: os.NewFile(uintptr(fd), "inotify"), fd: fd, events: make(chan fsEvent), errs: make(chan error),
		done: make(chan struct{}), byWd: map[int32]string{}, byPath: map[string]int32{}}
	n.wg.Add(1)
	go func() {
		defer n.wg.Done()
		n.read()
	}()
	return n, nil
}

// add watches directory path (again: on the inode it holds now).
//
// The lock is held across the system call: the reader must not meet an
// event of the new watch before byWd names it (it would drop it as one of
// a removed watch).
func (n *inotify) add(path string) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	wd, err := unix.InotifyAddWatch(n.fd, path, watchMask)
	if err != nil {
		return &os.PathError{Op: "inotify_add_watch", Path: path, Err: err}
	}
	w := int32(wd)
	if old, ok := n.byWd[w]; ok && old != path {
		delete(n.byPath, old) // the inode moved here
	}
	if prev, ok := n.byPath[path]; ok && prev != w {
		// The path held another inode (moved away or replaced): its watch
		// would report under this name.
		delete(n.byWd, prev)
		_, _ = unix.InotifyRmWatch(n.fd, uint32(prev))
	}
	n.byWd[w], n.byPath[path] = path, w
	return nil
}

// remove drops the watch of path, if it has one.
func (n *inotify) remove(path string) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	wd, ok := n.byPath[path]
	if !ok {
		return nil
	}
	delete(n.byPath, path)
	delete(n.byWd, wd)
	if _, err := unix.InotifyRmWatch(n.fd, uint32(wd)); err != nil && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("remove the inotify watch of %s: %w", path, err) // EINVAL: the kernel dropped it already
	}
	return nil
}

// close stops the instance; its channels see no more values.
func (n *inotify) close() {
	select {
	case <-n.done:
		return
	default:
	}
	close(n.done)
	_ = n.f.Close() // ends a blocked read
	n.wg.Wait()
}

// read turns the kernel's events into fsEvents until closed.
func (n *inotify) read() {
	var buf [64 << 10]byte
	for {
		k, err := n.f.Read(buf[:])
		if err != nil {
			if errors.Is(err, os.ErrClosed) {
				return
			}
			if errors.Is(err, syscall.EINTR) {
				continue
			}
			if !n.fail(fmt.Errorf("read inotify events: %w", err)) {
				return
			}
			continue
		}
		for off := 0; off+unix.SizeofInotifyEvent <= k; {
			wd := int32(binary.NativeEndian.Uint32(buf[off:]))
			mask := binary.NativeEndian.Uint32(buf[off+4:])
			nameLen := int(binary.NativeEndian.Uint32(buf[off+12:]))
			name := buf[off+unix.SizeofInotifyEvent : min(k, off+unix.SizeofInotifyEvent+nameLen)]
			off += unix.SizeofInotifyEvent + nameLen
			if i := indexByte0(name); i >= 0 {
				name = name[:i]
			}
			if mask&unix.IN_Q_OVERFLOW != 0 {
				if !n.fail(errEventOverflow) {
					return
				}
				continue
			}
			ev, ok := n.event(wd, mask, string(name))
			if !ok {
				continue
			}
			select {
			case n.events <- ev:
			case <-n.done:
				return
			}
		}
	}
}

func indexByte0(b []byte) int {
	for i, c := range b {
		if c == 0 {
			return i
		}
	}
	return -1
}

// event names one kernel event; ok is false for one not to report.
func (n *inotify) event(wd int32, mask uint32, name string) (fsEvent, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	dir, ok := n.byWd[wd]
	if !ok {
		return fsEvent{}, false // a watch removed since: its events name nothing
	}
	if mask&unix.IN_IGNORED != 0 {
		// The kernel dropped the watch (its directory is gone).
		delete(n.byWd, wd)
		if n.byPath[dir] == wd {
			delete(n.byPath, dir)
		}
		return fsEvent{}, false
	}
	ev := fsEvent{name: dir}
	if name != "" {
		ev.name = dir + "/" + name
	}
	switch {
	case mask&(unix.IN_CREATE|unix.IN_MOVED_TO) != 0:
		ev.op = opCreate
	case mask&unix.IN_DELETE != 0:
		ev.op = opRemove
	case mask&unix.IN_MOVED_FROM != 0:
		ev.op = opRename
	case mask&unix.IN_MODIFY != 0:
		ev.op = opWrite
	case mask&unix.IN_ATTRIB != 0:
		ev.op = opChmod
	default:
		return fsEvent{}, false
	}
	return ev, true
}

// fail reports an error; false when closed meanwhile.
func (n *inotify) fail(err error) bool {
	select {
	case n.errs <- err:
		return true
	case <-n.done:
		return false
	}
}
