package replication

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/tether-io/tether/proto/tetherpb"
)

// chunkSize is the most file data one FileOp carries.
const chunkSize = 1 << 20

// plan is what a batch will carry, read from the primary's tree.
type plan struct {
	deletes map[string]struct{}
	dirs    map[string]fs.FileInfo // MKDIR: new directories and changed metadata
	others  map[string]fs.FileInfo // regular files, symlinks and fifos
	skipped []string               // devices and sockets, which are not replicated
	// fresh holds the entries added or re-planned since the last read: only
	// they are (re-)read into the cut's spool.
	fresh map[string]struct{}
	// idx, on an incremental cut, is the index of the previous cut: files
	// go as deltas against it and renames are told from deletes.
	idx         *index
	renames     []renameOp      // sent first, in this order
	touched     map[string]bool // every dirty path the plan took
	reconciling map[string]bool // renamed directories whose subtree is to be compared with the index
}

func newPlan() *plan {
	return &plan{deletes: map[string]struct{}{}, dirs: map[string]fs.FileInfo{}, others: map[string]fs.FileInfo{},
		fresh: map[string]struct{}{}, touched: map[string]bool{}, reconciling: map[string]bool{}}
}

// put plans entry rel of kind m (p.dirs or p.others) for reading.
func (p *plan) put(m map[string]fs.FileInfo, rel string, fi fs.FileInfo) {
	m[rel] = fi
	p.fresh[rel] = struct{}{}
}

// del plans a DELETE of rel.
func (p *plan) del(rel string) {
	p.deletes[rel] = struct{}{}
}

// forget drops what the plan says about rel, and about everything below it
// when all is set.
func (p *plan) forget(rel string, all bool) {
	delete(p.deletes, rel)
	delete(p.dirs, rel)
	delete(p.others, rel)
	if !all {
		return
	}
	for _, m := range []map[string]fs.FileInfo{p.dirs, p.others} {
		for r := range m {
			if isUnder(r, rel) {
				delete(m, r)
			}
		}
	}
	for r := range p.deletes {
		if isUnder(r, rel) {
			delete(p.deletes, r)
		}
	}
}

// fullPlan reads the whole tree.
func fullPlan(root *os.Root) (*plan, error) {
	p := newPlan()
	fi, err := root.Lstat(rootPath)
	if err != nil {
		return nil, fmt.Errorf("read volume root: %w", err)
	}
	p.put(p.dirs, rootPath, fi)
	if err := p.collect(root, rootPath); err != nil {
		return nil, err
	}
	return p, nil
}

// dirtyPlan reads the current state of the dirty paths: a path that no
// longer exists (or no longer lies under real directories) becomes a
// DELETE; a directory to be sent with its subtree is replaced whole. With
// the index of the previous cut (idx, may be nil), renames become RENAMEs
// and files deltas.
func dirtyPlan(root *os.Root, dirty map[string]bool, idx *index) (*plan, error) {
	p := newPlan()
	p.idx = idx
	return p, p.update(root, dirty)
}

// update re-plans the dirty paths (marking them fresh), as a later round of
// a cut does for the paths that changed while the previous round was read.
//
// A directory an earlier round replaced (its DELETE planned: it was sent
// with its subtree, or it was gone) stays replaced when a later round
// re-plans it alone: what the replicas hold below it is still the previous
// cut's, and only the DELETE removes it. What that round read below it
// stays planned, and what changed there since is dirty in its own right.
// (mv d e; mkdir d; mv e d/e: the first round sends the new d whole, the
// second re-plans d for the mtime that moving e into it changed; dropping
// the DELETE left the old d's entries on the replica beside d/e.)
func (p *plan) update(root *os.Root, dirty map[string]bool) error {
	for rel, subtree := range dirty {
		p.touched[rel] = true
		fi, ok, err := lstatReal(root, rel)
		if err != nil {
			return err
		}
		_, replaced := p.deletes[rel]
		p.forget(rel, !ok || !fi.IsDir() || subtree)
		switch {
		case !ok || !replicated(fi):
			if rel != rootPath {
				p.del(rel)
			}
			if ok {
				p.skipped = append(p.skipped, rel)
			}
		case fi.IsDir():
			p.put(p.dirs, rel, fi)
			switch {
			case subtree && rel != rootPath:
				p.del(rel)
				if err := p.collect(root, rel); err != nil {
					return err
				}
			case replaced:
				p.del(rel)
			}
		default:
			p.put(p.others, rel, fi)
		}
	}
	if err := p.detectRenames(root); err != nil {
		return err
	}
	// The other names of a hard-linked file first: their directories'
	// mtimes change with them too.
	if err := p.completeLinks(root); err != nil {
		return err
	}
	if err := p.addParents(root); err != nil {
		return err
	}
	p.dropConflicts()
	return nil
}

// replicated reports whether an entry's type is carried: directories,
// regular files, symlinks and fifos (not devices or sockets).
func replicated(fi fs.FileInfo) bool {
	t := fi.Mode().Type()
	return t == 0 || t == fs.ModeDir || t == fs.ModeSymlink || t == fs.ModeNamedPipe
}

// completeLinks adds the other names of every hard-linked file of the plan,
// so that the replica links them all to the one new inode (a write to one
// name changes the contents seen through the others, but inotify reports
// only the name written). It walks the tree only when a name is missing.
func (p *plan) completeLinks(root *os.Root) error {
	want := map[inodeKey]uint64{}
	have := map[inodeKey]uint64{}
	for _, fi := range p.others {
		if !fi.Mode().IsRegular() {
			continue
		}
		if k, n := inodeOf(fi); n > 1 {
			want[k], have[k] = n, have[k]+1
		}
	}
	missing := false
	for k, n := range want {
		missing = missing || have[k] < n
	}
	if !missing {
		return nil
	}
	return walkTree(root, rootPath, func(rel string, fi fs.FileInfo) {
		if !fi.Mode().IsRegular() {
			return
		}
		if k, _ := inodeOf(fi); want[k] > 0 {
			if _, ok := p.others[rel]; !ok {
				p.put(p.others, rel, fi)
			}
		}
	})
}

// walkTree calls fn for every entry below dir.
func walkTree(root *os.Root, dir string, fn func(rel string, fi fs.FileInfo)) error {
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
		fn(rel, fi)
		if fi.IsDir() {
			if err := walkTree(root, rel, fn); err != nil {
				return err
			}
		}
	}
	return nil
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
	return walkTree(root, dir, func(rel string, fi fs.FileInfo) {
		switch {
		case !replicated(fi):
			p.skipped = append(p.skipped, rel)
		case fi.IsDir():
			p.put(p.dirs, rel, fi)
		default:
			p.put(p.others, rel, fi)
		}
	})
}

// addParents adds the parent directory of every entry, so that the
// replica sets its mtime (which changed with the entry) after the batch;
// and, when that parent is new to the replicas (not in the index, or
// below a path the batch replaces), its own parent, and so on up: every
// directory the replica makes for the batch is one the batch describes,
// and the index records. (A parent planned alone, its creation's event
// not yet taken, was made by the replica with its ancestors, which the
// index did not hold: a rescan, which compares the tree with the index,
// never removed them when they went.)
func (p *plan) addParents(root *os.Root) error {
	var rels []string
	for _, m := range []map[string]fs.FileInfo{p.dirs, p.others} {
		for rel := range m {
			rels = append(rels, rel)
		}
	}
	for rel := range p.deletes {
		rels = append(rels, rel)
	}
	for _, rel := range rels {
		for d := rel; d != rootPath; {
			d = parentOf(d)
			if _, ok := p.dirs[d]; ok {
				break
			}
			fi, ok, err := lstatReal(root, d)
			if err != nil {
				return err
			}
			if !ok || !fi.IsDir() {
				break
			}
			p.put(p.dirs, d, fi)
			held, err := p.held(d)
			if err != nil {
				return err
			}
			if held {
				break
			}
		}
	}
	return nil
}

// held reports whether the replicas hold directory rel as the previous
// cut left it (not replaced by this batch).
func (p *plan) held(rel string) (bool, error) {
	if p.idx == nil || p.replacedBelow(rel) {
		return false, nil
	}
	o, ok := p.origin(rel)
	if !ok {
		return false, nil
	}
	e, err := p.idx.get(o)
	return e != nil && e.kind == kindDir, err
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

// sendFunc sends one message of a stream. It is done with the message
// when it returns: the caller may reuse the message's buffers then (gRPC's
// Send encodes the message before it returns; a sendFunc that keeps a
// message must copy it).
type sendFunc func(*tetherpb.StreamRequest) error

// sendDir sends a directory's metadata.
func sendDir(root *os.Root, send sendFunc, rel string, fi fs.FileInfo, warn *onceLogger) error {
	uid, gid := ownerOf(fi)
	op := &tetherpb.FileOp{Kind: tetherpb.FileOp_KIND_MKDIR, Path: []byte(rel),
		Mode: toWireMode(fi.Mode()), MtimeUnixNano: fi.ModTime().UnixNano(), Uid: uid, Gid: gid}
	d, err := root.OpenFile(rel, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_DIRECTORY, 0)
	if isGone(err) || errors.Is(err, syscall.ELOOP) {
		return nil // changed since planned; its event brings it again
	}
	if err != nil {
		return fmt.Errorf("open directory %q: %w", rel, err)
	}
	op.Xattrs, err = xattrsOrWarn(d, rel, warn)
	_ = d.Close()
	if err != nil {
		return err
	}
	return sendOp(send, op)
}

// xattrsOrWarn reads the extended attributes of an open file; where the
// file system has none, it warns (once) and returns none.
func xattrsOrWarn(f *os.File, rel string, warn *onceLogger) ([]*tetherpb.Xattr, error) {
	xs, err := readXattrs(int(f.Fd()))
	if errors.Is(err, errXattrUnsupported) {
		warn.warn("xattr", "the volume's file system has no extended attributes; none are replicated")
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("%q: %w", rel, err)
	}
	return xs, nil
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
	uid, gid := ownerOf(fi)
	return sendOp(send, &tetherpb.FileOp{Kind: tetherpb.FileOp_KIND_SYMLINK, Path: []byte(rel),
		LinkTarget: []byte(target), MtimeUnixNano: fi.ModTime().UnixNano(), Uid: uid, Gid: gid})
}

// fileOpts says how a file is read into a cut: base is the index entry of
// the version the replicas hold (nil: send it whole), enc compresses
// chunks (nil: never).
type fileOpts struct {
	base *indexEntry
	enc  *zstd.Encoder
	pool *chunkPool // lends the chunks to the stream's codec (nil: none)
	// file, if set, is the file already open (by the cut that planned it):
	// read through it, whatever its name has become since.
	file *os.File
}

// openPlanned opens file rel for reading, never through a symlink; nil
// without an error when it is gone (or a symlink now).
func openPlanned(root *os.Root, rel string) (*os.File, error) {
	f, err := root.OpenFile(rel, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if isGone(err) || errors.Is(err, syscall.ELOOP) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("open %q: %w", rel, err)
	}
	return f, nil
}

// fileSent is what sendFile read: the file's inode and link count, its
// index entry (nil when the file shrank while read), whether it was sent
// (false when it was replaced or removed since it was planned: its event
// brings it again), and whether it changed while read (its ctime, mtime or
// size moved between the stat before the read and the one after: what was
// read may hold parts of several writes).
type fileSent struct {
	key     inodeKey
	nlink   uint64
	entry   *indexEntry
	sent    bool
	changed bool
}

// torn reports whether the reading is no state the file had as a whole.
func (r fileSent) torn() bool { return r.sent && (r.entry == nil || r.changed) }

// sendFile streams a regular file: the data extents of its blocks that
// differ from the base (all of them without one) in chunks, then a last op
// with its size, metadata and, for a delta, the blocks replaced. The file
// is opened and checked to be the one planned (not a symlink swapped in
// since); its metadata comes from the open file, and it is read once,
// hashing every block for the index.
func sendFile(root *os.Root, send sendFunc, rel string, planned fs.FileInfo, warn *onceLogger, o fileOpts) (res fileSent, err error) {
	f := o.file
	if f == nil {
		if f, err = openPlanned(root, rel); f == nil {
			return res, err
		}
		defer f.Close()
	}
	readAt := time.Now()
	fi, err := f.Stat()
	if err != nil {
		return res, fmt.Errorf("stat %q: %w", rel, err)
	}
	if !fi.Mode().IsRegular() || !os.SameFile(fi, planned) {
		return res, nil
	}
	res.key, res.nlink = inodeOf(fi)
	xs, err := xattrsOrWarn(f, rel, warn)
	if err != nil {
		return res, err
	}
	size := fi.Size()
	exts, err := dataExtents(f, size)
	if err != nil {
		return res, fmt.Errorf("read %q: %w", rel, err)
	}
	entry := indexEntryOf(fi, readAt)
	base := deltaBase(o.base, entry)
	ch := newChunker(send, rel, o.enc, o.pool)
	r, err := readBlocks(f, size, exts, base, ch)
	ch.release()
	if err != nil {
		return res, fmt.Errorf("read %q: %w", rel, err)
	}
	after, err := f.Stat()
	if err != nil {
		return res, fmt.Errorf("stat %q: %w", rel, err)
	}
	res.changed = !sameStat(indexEntryOf(after, readAt), entry)
	uid, gid := ownerOf(fi)
	op := &tetherpb.FileOp{Kind: tetherpb.FileOp_KIND_FILE, Path: []byte(rel), Offset: uint64(ch.end),
		Size: uint64(size), Mode: toWireMode(fi.Mode()), MtimeUnixNano: fi.ModTime().UnixNano(), Uid: uid, Gid: gid, Xattrs: xs}
	if base != nil {
		op.Delta = &tetherpb.Delta{BaseSize: uint64(base.size), BaseMtimeUnixNano: base.mtime, BaseDigest: digestOf(base.hashes),
			BlockSize: blockSize, Blocks: r.changed}
	}
	entry.hashes, entry.exts = r.hashes, exts
	if r.short {
		entry = nil
	} else {
		op.Digest, op.DigestBlockSize = digestOf(r.hashes), blockSize
	}
	res.entry = entry
	err = sendOp(send, op)
	res.sent = err == nil
	return res, err
}

// sameStat reports whether two stats of one file show no change between
// them: same size, mtime and ctime (a write moves them; with the
// multigrain timestamps of recent kernels even within one clock tick once
// the first stat was taken).
func sameStat(a, b *indexEntry) bool {
	return a.size == b.size && a.mtime == b.mtime && a.ctime == b.ctime
}
