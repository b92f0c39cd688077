package replication

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/tether-io/tether/proto/tetherpb"
)

// chunkSize is the most file data one FileOp carries.
const chunkSize = 1 << 20

// plan is what a batch will carry, read from the primary's tree.
type plan struct {
	deletes []string
	dirs    map[string]fs.FileInfo // MKDIR: new directories and changed metadata
	others  map[string]fs.FileInfo // regular files and symlinks
}

func newPlan() *plan {
	return &plan{dirs: map[string]fs.FileInfo{}, others: map[string]fs.FileInfo{}}
}

// fullPlan reads the whole tree.
func fullPlan(root *os.Root) (*plan, error) {
	p := newPlan()
	fi, err := root.Lstat(rootPath)
	if err != nil {
		return nil, fmt.Errorf("read volume root: %w", err)
	}
	p.dirs[rootPath] = fi
	if err := p.collect(root, rootPath); err != nil {
		return nil, err
	}
	return p, nil
}

// dirtyPlan reads the current state of the dirty paths: a path that no
// longer exists (or no longer lies under real directories) becomes a
// DELETE; a directory to be sent with its subtree is replaced whole.
func dirtyPlan(root *os.Root, dirty map[string]bool) (*plan, error) {
	p := newPlan()
	for rel, subtree := range dirty {
		fi, ok, err := lstatReal(root, rel)
		if err != nil {
			return nil, err
		}
		switch {
		case !ok || !replicated(fi):
			if rel != rootPath {
				p.deletes = append(p.deletes, rel)
			}
		case fi.IsDir():
			p.dirs[rel] = fi
			if subtree && rel != rootPath {
				p.deletes = append(p.deletes, rel)
				if err := p.collect(root, rel); err != nil {
					return nil, err
				}
			}
		default:
			p.others[rel] = fi
		}
	}
	if err := p.addParents(root); err != nil {
		return nil, err
	}
	p.dropConflicts()
	return p, nil
}

// replicated reports whether an entry's type is carried: directories,
// regular files and symlinks (not devices, fifos or sockets).
func replicated(fi fs.FileInfo) bool {
	t := fi.Mode().Type()
	return t == 0 || t == fs.ModeDir || t == fs.ModeSymlink
}

// lstatReal returns the entry at rel if every ancestor is a real directory.
func lstatReal(root *os.Root, rel string) (fs.FileInfo, bool, error) {
	for _, a := range ancestorsOf(rel) {
		fi, err := root.Lstat(a)
		if isGone(err) || (err == nil && !fi.IsDir()) {
			return nil, false, nil
		}
		if err != nil {
			return nil, false, fmt.Errorf("read %q: %w", a, err)
		}
	}
	fi, err := root.Lstat(rel)
	if isGone(err) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("read %q: %w", rel, err)
	}
	return fi, true, nil
}

// collect adds everything below dir.
func (p *plan) collect(root *os.Root, dir string) error {
	entries, err := readDirRoot(root, dir)
	if isGone(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read directory %q: %w", dir, err)
	}
	for _, e := range entries {
		rel := joinRel(dir, e.Name())
		fi, err := e.Info()
		if isGone(err) {
			continue
		}
		if err != nil {
			return fmt.Errorf("read %q: %w", rel, err)
		}
		switch {
		case !replicated(fi):
		case fi.IsDir():
			p.dirs[rel] = fi
			if err := p.collect(root, rel); err != nil {
				return err
			}
		default:
			p.others[rel] = fi
		}
	}
	return nil
}

// addParents adds the parent directory of every entry, so that the
// replica sets its mtime (which changed with the entry) after the batch.
func (p *plan) addParents(root *os.Root) error {
	var rels []string
	for _, m := range []map[string]fs.FileInfo{p.dirs, p.others} {
		for rel := range m {
			rels = append(rels, rel)
		}
	}
	rels = append(rels, p.deletes...)
	for _, rel := range rels {
		if rel == rootPath {
			continue
		}
		d := parentOf(rel)
		if _, ok := p.dirs[d]; ok {
			continue
		}
		fi, ok, err := lstatReal(root, d)
		if err != nil {
			return err
		}
		if ok && fi.IsDir() {
			p.dirs[d] = fi
		}
	}
	return nil
}

// dropConflicts removes entries lying below a file or symlink of the plan
// (possible when the tree changed while it was read); the next batch carries
// their final state.
func (p *plan) dropConflicts() {
	below := func(rel string) bool {
		for _, a := range ancestorsOf(rel) {
			if _, ok := p.others[a]; ok {
				return true
			}
		}
		return false
	}
	for _, m := range []map[string]fs.FileInfo{p.dirs, p.others} {
		for rel := range m {
			if below(rel) {
				delete(m, rel)
			}
		}
	}
}

// sendFunc sends one message of a stream.
type sendFunc func(*tetherpb.StreamRequest) error

// send streams the plan's ops: deletes, then directories shallow to deep,
// then files and symlinks.
func (p *plan) send(root *os.Root, send sendFunc) error {
	slices.Sort(p.deletes)
	for _, rel := range slices.Compact(p.deletes) {
		if err := sendOp(send, &tetherpb.FileOp{Kind: tetherpb.FileOp_KIND_DELETE, Path: []byte(rel)}); err != nil {
			return err
		}
	}
	for _, rel := range sortedDirs(p.dirs) {
		fi := p.dirs[rel]
		op := &tetherpb.FileOp{Kind: tetherpb.FileOp_KIND_MKDIR, Path: []byte(rel),
			Mode: toWireMode(fi.Mode()), MtimeUnixNano: fi.ModTime().UnixNano()}
		if err := sendOp(send, op); err != nil {
			return err
		}
	}
	others := make([]string, 0, len(p.others))
	for rel := range p.others {
		others = append(others, rel)
	}
	slices.Sort(others)
	for _, rel := range others {
		fi := p.others[rel]
		var err error
		if fi.Mode().Type() == fs.ModeSymlink {
			err = sendSymlink(root, send, rel, fi)
		} else {
			err = sendFile(root, send, rel, fi)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// sortedDirs orders directories shallow to deep.
func sortedDirs(dirs map[string]fs.FileInfo) []string {
	out := make([]string, 0, len(dirs))
	for rel := range dirs {
		out = append(out, rel)
	}
	slices.SortFunc(out, func(a, b string) int {
		if d := depthOf(a) - depthOf(b); d != 0 {
			return d
		}
		return strings.Compare(a, b)
	})
	return out
}

func sendOp(send sendFunc, op *tetherpb.FileOp) error {
	return send(&tetherpb.StreamRequest{Kind: &tetherpb.StreamRequest_Op{Op: op}})
}

func sendSymlink(root *os.Root, send sendFunc, rel string, fi fs.FileInfo) error {
	target, err := root.Readlink(rel)
	if isGone(err) || errors.Is(err, syscall.EINVAL) {
		return nil // changed since planned; its event brings it again
	}
	if err != nil {
		return fmt.Errorf("read symlink %q: %w", rel, err)
	}
	return sendOp(send, &tetherpb.FileOp{Kind: tetherpb.FileOp_KIND_SYMLINK, Path: []byte(rel),
		LinkTarget: []byte(target), MtimeUnixNano: fi.ModTime().UnixNano()})
}

// sendFile streams a regular file in chunks. The file is opened and checked
// to be the one planned (not a symlink swapped in since); its mode and mtime
// come from the open file.
func sendFile(root *os.Root, send sendFunc, rel string, planned fs.FileInfo) error {
	f, err := root.OpenFile(rel, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if isGone(err) || errors.Is(err, syscall.ELOOP) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("open %q: %w", rel, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("stat %q: %w", rel, err)
	}
	if !fi.Mode().IsRegular() || !os.SameFile(fi, planned) {
		return nil // replaced since planned; its event brings it again
	}
	mode, mtime := toWireMode(fi.Mode()), fi.ModTime().UnixNano()
	var off uint64
	for {
		buf := make([]byte, chunkSize)
		n, err := io.ReadFull(f, buf)
		last := errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)
		if err != nil && !last {
			return fmt.Errorf("read %q: %w", rel, err)
		}
		op := &tetherpb.FileOp{Kind: tetherpb.FileOp_KIND_FILE, Path: []byte(rel), Data: buf[:n],
			Offset: off, More: !last, Mode: mode, MtimeUnixNano: mtime}
		if err := sendOp(send, op); err != nil {
			return err
		}
		if last {
			return nil
		}
		off += uint64(n)
	}
}

// sendBatch streams a plan and its Commit.
func sendBatch(root *os.Root, send sendFunc, p *plan, seq uint64, cut time.Time, full bool) error {
	if err := p.send(root, send); err != nil {
		return err
	}
	return send(&tetherpb.StreamRequest{Kind: &tetherpb.StreamRequest_Commit{Commit: &tetherpb.Commit{
		Seq: seq, CutUnixNano: cut.UnixNano(), Full: full}}})
}
