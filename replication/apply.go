package replication

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
	"unsafe"

	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"

	"github.com/tether-io/tether/proto/tetherpb"
)

// errBadBatch is wrapped by every refusal of a malformed batch.
var errBadBatch = errors.New("invalid batch")

// applyOp is one validated operation of a batch received by a replica.
type applyOp struct {
	kind     tetherpb.FileOp_Kind
	path     string
	to       string // RENAME: new path; HARDLINK: the path it links to
	mode     fs.FileMode
	mtime    time.Time
	uid, gid uint32
	xattrs   []xattr
	target   string      // SYMLINK: link target, stored verbatim and never followed
	staged   string      // FILE: where its contents wait in the stage directory
	size     int64       // FILE: size
	extents  []extent    // FILE: data extents (the rest are holes)
	delta    *deltaOp    // FILE: patches the file in place instead of replacing it
	digest   *fileDigest // FILE (may be nil): the digest of the file written, for the base cache
}

// incoming is a file whose chunks are still arriving.
type incoming struct {
	path    string
	f       *os.File
	staged  string
	end     uint64 // end of the data received so far
	extents []extent
	flushed uint64 // writeback started for the data before this offset
	// direct, once the file is large, is a second handle of the staged file
	// opened with O_DIRECT: aligned data goes from buf to the disk without
	// passing through the page cache (nil: not yet, or noDirect).
	direct   *os.File
	noDirect bool
	buf      []byte // directAlign-aligned copy of a chunk for direct
}

// Direct writes of large staged files: a file whose data passed
// directAfter is written with O_DIRECT in directAlign units (the rest, and
// file systems that refuse O_DIRECT, through the page cache). Writing 1 GiB
// through the page cache costs more CPU than receiving it (the copy into
// the cache, and on this VM fresh pages from the host); the syncfs at the
// commit still makes the data durable (it flushes the device's cache).
const (
	directAfter = 8 << 20
	directAlign = 4096
)

// writeAt stages data at off.
func (in *incoming) writeAt(data []byte, off int64) error {
	if in.direct == nil && !in.noDirect && off >= directAfter && off%directAlign == 0 {
		f, err := os.OpenFile(in.staged, os.O_WRONLY|unix.O_DIRECT, 0)
		if err != nil {
			in.noDirect = true
		} else {
			in.direct = f
		}
	}
	if n := len(data) &^ (directAlign - 1); in.direct != nil && off%directAlign == 0 && n > 0 {
		buf := data[:n] // aligned already when the stream's codec received it
		if !isAligned(buf) {
			if cap(in.buf) < n+directAlign {
				in.buf = make([]byte, n+directAlign)
			}
			buf = in.buf
			if k := int(uintptr(unsafe.Pointer(unsafe.SliceData(buf))) & (directAlign - 1)); k != 0 {
				buf = buf[directAlign-k:]
			}
			buf = buf[:n]
			copy(buf, data)
		}
		_, err := in.direct.WriteAt(buf, off)
		switch {
		case err == nil:
			data, off = data[n:], off+int64(n)
		case errors.Is(err, unix.EINVAL):
			// The file system takes no direct writes of this kind after all.
			in.closeDirect()
			in.noDirect = true
		default:
			return err
		}
	}
	if len(data) == 0 {
		return nil
	}
	_, err := in.f.WriteAt(data, off)
	return err
}

// closeDirect closes the O_DIRECT handle, if any.
func (in *incoming) closeDirect() {
	if in.direct != nil {
		_ = in.direct.Close()
		in.direct = nil
	}
}

// writebackChunk is how much staged data of a file the replica lets
// accumulate before it starts writing it back (sync_file_range, which does
// not wait), so that the disk works while the batch arrives and the
// commit's syncfs finds little left to write.
const writebackChunk = 8 << 20

// startWriteback starts writing back the staged data of in received since
// the last call (all of it when final is set) once the file has passed
// writebackChunk: starting writeback of every small file of a batch alone
// made 20,000 small writes where syncfs merges them.
func (in *incoming) startWriteback(final bool) {
	if in.end <= in.flushed || (!final && in.end-in.flushed < writebackChunk) || in.end < writebackChunk {
		return // small files: the commit's syncfs writes them back together
	}
	// Only a hint: syncfs at the commit makes the data durable either way.
	_ = unix.SyncFileRange(int(in.f.Fd()), int64(in.flushed), int64(in.end-in.flushed), unix.SYNC_FILE_RANGE_WRITE)
	in.flushed = in.end
}

// batch collects the operations of one batch on a replica until its Commit
// arrives. File contents go to the stage directory, outside the volume.
type batch struct {
	stage  string
	ops    []applyOp
	nondir map[string]struct{} // paths this batch made files or symlinks
	files  map[string]struct{} // regular files this batch wrote and still holds
	// fileDirs holds the ancestors of every path ever in files (a superset
	// of those of files now).
	fileDirs map[string]struct{}
	open     *incoming
	nfiles   int
	// token names the staged files of this batch (token-1, token-2, ...):
	// a new one for every batch, so that a replay of the previous batch
	// can never take this one's staged files for its own.
	token string
	dec   *zstd.Decoder // decompresses chunks (made on first use)
	// journaled is set once a journal refers to the staged files: they are
	// the journal's to remove then.
	journaled bool
	// segments holds the index of the first op of each later cut the batch
	// was continued with, and contSeq the last of those cuts (0: none).
	segments []int
	contSeq  uint64
}

func newBatch(stage string) *batch {
	return &batch{stage: stage, nondir: map[string]struct{}{}, files: map[string]struct{}{}, fileDirs: map[string]struct{}{},
		token: rand.Text()}
}

// stagedName is the name of the batch's nth staged file.
func (b *batch) stagedName(n int) string {
	return filepath.Join(b.stage, b.token+"-"+strconv.Itoa(n))
}

// metaOf returns the owner, mode and mtime of an op.
func metaOf(k tetherpb.FileOp_Kind, p string, op *tetherpb.FileOp) applyOp {
	return applyOp{kind: k, path: p, mode: fromWireMode(op.GetMode()), mtime: time.Unix(0, op.GetMtimeUnixNano()),
		uid: op.GetUid(), gid: op.GetGid()}
}

// replaced forgets the files of the batch that an op at p replaces (p
// itself and, unless the op keeps a directory at p, everything below).
func (b *batch) replaced(p string, keepsDir bool) {
	delete(b.files, p)
	if _, ok := b.fileDirs[p]; keepsDir || !ok {
		return // no file of the batch below p: no scan (it would make a batch quadratic)
	}
	for f := range b.files {
		if isUnder(f, p) {
			delete(b.files, f)
		}
	}
}

// addFile records a regular file the batch wrote at p.
func (b *batch) addFile(p string) {
	b.files[p] = struct{}{}
	for _, a := range ancestorsOf(p) {
		b.fileDirs[a] = struct{}{}
	}
}

// add validates op and appends it to the batch.
func (b *batch) add(op *tetherpb.FileOp) error {
	if b.open != nil && op.GetKind() != tetherpb.FileOp_KIND_FILE {
		return fmt.Errorf("%w: file %q is incomplete when a %s op arrives", errBadBatch, b.open.path, op.GetKind())
	}
	switch op.GetKind() {
	case tetherpb.FileOp_KIND_FILE:
		return b.addFileChunk(op)
	case tetherpb.FileOp_KIND_MKDIR:
		p, err := b.checkNew(op.GetPath(), true)
		if err != nil {
			return err
		}
		xs, err := xattrsOf(op)
		if err != nil {
			return err
		}
		delete(b.nondir, p)
		b.replaced(p, true)
		a := metaOf(op.GetKind(), p, op)
		a.xattrs = xs
		b.ops = append(b.ops, a)
	case tetherpb.FileOp_KIND_FIFO:
		p, err := b.checkNew(op.GetPath(), false)
		if err != nil {
			return err
		}
		b.replaced(p, false)
		b.nondir[p] = struct{}{}
		b.ops = append(b.ops, metaOf(op.GetKind(), p, op))
	case tetherpb.FileOp_KIND_HARDLINK:
		p, err := b.checkNew(op.GetPath(), false)
		if err != nil {
			return err
		}
		to, err := checkPath(op.GetHardlinkTo(), false)
		if err != nil {
			return err
		}
		if _, ok := b.files[to]; !ok || to == p {
			return fmt.Errorf("%w: hard link %q names %q, which is not a file this batch wrote", errBadBatch, p, to)
		}
		b.replaced(p, false)
		b.nondir[p] = struct{}{}
		b.ops = append(b.ops, applyOp{kind: op.GetKind(), path: p, to: to})
	case tetherpb.FileOp_KIND_SYMLINK:
		p, err := b.checkNew(op.GetPath(), false)
		if err != nil {
			return err
		}
		t := op.GetLinkTarget()
		if len(t) == 0 || bytes.IndexByte(t, 0) >= 0 {
			return fmt.Errorf("%w: symlink %q has an empty target or one with a NUL byte", errBadBatch, p)
		}
		b.replaced(p, false)
		b.nondir[p] = struct{}{}
		a := metaOf(op.GetKind(), p, op)
		a.target, a.mode = string(t), 0
		b.ops = append(b.ops, a)
	case tetherpb.FileOp_KIND_DELETE:
		p, err := checkPath(op.GetPath(), false)
		if err != nil {
			return err
		}
		delete(b.nondir, p)
		b.replaced(p, false)
		b.ops = append(b.ops, applyOp{kind: op.GetKind(), path: p})
	case tetherpb.FileOp_KIND_RENAME:
		p, err := checkPath(op.GetPath(), false)
		if err != nil {
			return err
		}
		to, err := b.checkNew(op.GetNewPath(), false)
		if err != nil {
			return err
		}
		if _, ok := b.nondir[p]; ok {
			delete(b.nondir, p)
			b.nondir[to] = struct{}{}
		}
		b.replaced(p, false)
		b.replaced(to, false)
		b.ops = append(b.ops, applyOp{kind: op.GetKind(), path: p, to: to})
	default:
		return fmt.Errorf("%w: unknown op kind %d", errBadBatch, op.GetKind())
	}
	return nil
}

// checkNew validates the path of an op that creates something: besides being
// well formed, it must not lie below a path this batch made a file or
// symlink (that would ask the replica to write through a symlink).
func (b *batch) checkNew(raw []byte, allowRoot bool) (string, error) {
	p, err := checkPath(raw, allowRoot)
	if err != nil {
		return "", err
	}
	for _, a := range ancestorsOf(p) {
		if _, ok := b.nondir[a]; ok {
			return "", fmt.Errorf("%w: %q lies below %q, which this batch made a file or symlink", errBadBatch, p, a)
		}
	}
	return p, nil
}

func (b *batch) addFileChunk(op *tetherpb.FileOp) error {
	if b.open == nil {
		p, err := b.checkNew(op.GetPath(), false)
		if err != nil {
			return err
		}
		b.nfiles++
		staged := b.stagedName(b.nfiles)
		f, err := os.OpenFile(staged, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
		if err != nil {
			return fmt.Errorf("stage file contents: %w", err)
		}
		b.open = &incoming{path: p, f: f, staged: staged}
	} else if string(op.GetPath()) != b.open.path || op.GetOffset() < b.open.end {
		return fmt.Errorf("%w: chunk of %q at offset %d while %q is incomplete with data up to offset %d",
			errBadBatch, op.GetPath(), op.GetOffset(), b.open.path, b.open.end)
	}
	in := b.open
	data, err := b.chunkData(op)
	if err != nil {
		return err
	}
	off, n := op.GetOffset(), uint64(len(data))
	if off > maxFileSize || off+n > maxFileSize || op.GetSize() > maxFileSize {
		return fmt.Errorf("%w: file %q would be larger than %d bytes", errBadBatch, in.path, uint64(maxFileSize))
	}
	if n > 0 {
		if err := in.writeAt(data, int64(off)); err != nil {
			return fmt.Errorf("stage file contents: %w", err)
		}
		if k := len(in.extents); k > 0 && in.extents[k-1].off+in.extents[k-1].n == int64(off) {
			in.extents[k-1].n += int64(n)
		} else {
			in.extents = append(in.extents, extent{int64(off), int64(n)})
		}
		in.end = off + n
	}
	if op.GetMore() {
		in.startWriteback(false)
		return nil
	}
	in.startWriteback(true)
	b.open = nil
	size := max(op.GetSize(), in.end)
	err = in.f.Truncate(int64(size))
	in.closeDirect()
	if cerr := in.f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("stage file contents: %w", err)
	}
	xs, err := xattrsOf(op)
	if err != nil {
		return err
	}
	var d *deltaOp
	if op.GetDelta() != nil {
		if d, err = checkDelta(in.path, op.GetDelta(), int64(size), in.extents); err != nil {
			return err
		}
	}
	var dg *fileDigest
	if len(op.GetDigest()) > 0 || op.GetDigestBlockSize() > 0 {
		bs := op.GetDigestBlockSize()
		if len(op.GetDigest()) != hashLen || bs < minBlockSize || bs > maxBlockSize {
			return fmt.Errorf("%w: file %q has a digest of %d bytes for blocks of %d bytes", errBadBatch, in.path, len(op.GetDigest()), bs)
		}
		dg = &fileDigest{blockSize: int64(bs), sum: op.GetDigest()}
	}
	b.replaced(in.path, false)
	b.nondir[in.path] = struct{}{}
	b.addFile(in.path)
	a := metaOf(tetherpb.FileOp_KIND_FILE, in.path, op)
	a.staged, a.size, a.extents, a.xattrs, a.delta, a.digest = in.staged, int64(size), in.extents, xs, d, dg
	b.ops = append(b.ops, a)
	return nil
}

// cont continues the batch with the ops of cut seq, which apply after
// those received so far (see Continue in the protocol): a segment of its
// own, for the checks of its bases and for the replay of the journal.
func (b *batch) cont(seq uint64) error {
	if b.open != nil {
		return fmt.Errorf("%w: continued with cut %d while file %q is incomplete", errBadBatch, seq, b.open.path)
	}
	if seq == 0 || seq <= b.contSeq {
		return fmt.Errorf("%w: continued with cut %d after cut %d", errBadBatch, seq, b.contSeq)
	}
	if len(b.segments) >= maxSegments {
		return fmt.Errorf("%w: continued over more than %d cuts", errBadBatch, maxSegments)
	}
	b.segments = append(b.segments, len(b.ops))
	b.contSeq = seq
	return nil
}

// maxSegments bounds the cuts one batch is continued over: those a primary
// took while it streamed the batch (it paces its cuts to one a second past
// 256 kept during a full sync, so this is about 18 hours of streaming).
const maxSegments = 1 << 16

// complete returns an error when the batch cannot be committed yet.
func (b *batch) complete() error {
	if b.open != nil {
		return fmt.Errorf("%w: commit while file %q is incomplete", errBadBatch, b.open.path)
	}
	return nil
}

// discard drops the staged contents of the batch.
func (b *batch) discard() {
	if b.open != nil {
		b.open.closeDirect()
		_ = b.open.f.Close()
		b.open = nil
	}
	if !b.journaled {
		for i := 1; i <= b.nfiles; i++ {
			_ = os.Remove(b.stagedName(i))
		}
	}
	b.ops, b.nfiles, b.journaled, b.token = nil, 0, false, rand.Text()
	b.segments, b.contSeq = nil, 0
	clear(b.nondir)
	clear(b.files)
	clear(b.fileDirs)
}

// namedOf returns every path a full batch keeps, with their ancestors.
func namedOf(ops []applyOp) map[string]struct{} {
	keep := map[string]struct{}{}
	for _, op := range ops {
		p := op.path
		if op.kind == tetherpb.FileOp_KIND_DELETE {
			continue
		}
		if op.kind == tetherpb.FileOp_KIND_RENAME {
			p = op.to
		}
		keep[p] = struct{}{}
		for _, a := range ancestorsOf(p) {
			keep[a] = struct{}{}
		}
	}
	return keep
}

// applier applies a committed batch to a volume through an os.Root, so no
// path can leave the volume, and never writes through a symlink: every
// ancestor of a written path is checked (and replaced) to be a real
// directory.
type applier struct {
	root     *os.Root
	verified map[string]struct{} // directories known to be real in this batch
	dirMeta  map[string]applyOp  // directory modes and mtimes, set at the end
	warn     *onceLogger
	stage    *os.File // the stage directory, once a file was placed from it
	// replay is set when the batch may have been applied in part before
	// (recovery): a staged file that is gone was placed then.
	replay bool
	// written, if set, receives the stat of each file the batch wrote,
	// taken as soon as it is in place (for the base cache: a stat taken
	// later could include someone else's write).
	written map[string]*indexEntry
}

// noteWritten records the stat of the file just written at rel.
func (a *applier) noteWritten(rel string) {
	if fi, ok, err := lstatReal(a.root, rel); err == nil && ok && fi.Mode().IsRegular() {
		a.written[rel] = indexEntryOf(fi, fi.ModTime())
	}
}

// progress is where the application of a batch stands: the next op to
// apply, and the segment it belongs to (a batch continued over later cuts
// has one segment per cut; see batch.cont).
type progress struct {
	next, seg int
}

// applyOps applies a batch's ops, from p on, to the volume rooted at root.
// A full batch first removes everything its first segment does not name
// (when starting from the beginning). Every op but RENAME sets its path to
// a state given by its segment alone, so a segment can be applied again
// over a partial application of itself; a RENAME depends on what it finds,
// so the ops before it are made durable and mark records that a replay
// starts at the rename, and another mark after it that the replay starts
// after it. segs holds the index of the first op of every segment after
// the first: before a segment starts, the previous one (its directories'
// metadata included) is made durable and marked done, so that a replay
// never applies an earlier segment again over a later one's changes.
func applyOps(root *os.Root, ops []applyOp, segs []int, full bool, from progress, replay bool, warn *onceLogger, mark func(progress) error, fail failpoint, written map[string]*indexEntry) error {
	ends := append(slices.Clone(segs), len(ops))
	if from.seg < 0 || from.seg >= len(ends) || from.next < segStart(ends, from.seg) || from.next > ends[from.seg] {
		return fmt.Errorf("journal progress (op %d of segment %d) lies outside the batch's %d ops in %d segments", from.next, from.seg, len(ops), len(ends))
	}
	a := &applier{root: root, warn: warn, replay: replay, written: written}
	defer func() {
		if a.stage != nil {
			_ = a.stage.Close()
		}
	}()
	for k := from.seg; k < len(ends); k++ {
		lo, hi := segStart(ends, k), ends[k]
		start := lo
		if k == from.seg {
			start = from.next
		} else {
			// Segment k-1 is applied: durable before this one changes it.
			if err := a.sync(); err != nil {
				return err
			}
			if err := mark(progress{next: lo, seg: k}); err != nil {
				return err
			}
			if err := fail.at("segment " + strconv.Itoa(k)); err != nil {
				return err
			}
		}
		a.verified, a.dirMeta = map[string]struct{}{}, map[string]applyOp{}
		for _, op := range ops[lo:hi] {
			if op.kind == tetherpb.FileOp_KIND_MKDIR {
				a.dirMeta[op.path] = op
			}
		}
		if full && k == 0 && start == 0 {
			if err := a.prune(rootPath, namedOf(ops[:hi])); err != nil {
				return fmt.Errorf("remove what the primary no longer has: %w", err)
			}
		}
		segMark := func(next int) error { return mark(progress{next: next, seg: k}) }
		for i := start; i < hi; i++ {
			op := ops[i]
			if err := a.applyMarked(op, i, segMark, fail); err != nil {
				return fmt.Errorf("%s %q: %w", op.kind, op.path, err)
			}
			if err := fail.at("op " + strconv.Itoa(i)); err != nil {
				return err
			}
		}
		if err := a.finishDirs(); err != nil {
			return err
		}
	}
	// Not synced: the journal replays the batch until the next batch's
	// syncfs has made this application durable.
	return nil
}

// segStart returns the index of the first op of segment k, given the end
// of every segment.
func segStart(ends []int, k int) int {
	if k == 0 {
		return 0
	}
	return ends[k-1]
}

// applyMarked applies op number i, bracketing a RENAME with progress marks.
func (a *applier) applyMarked(op applyOp, i int, mark func(int) error, fail failpoint) error {
	if op.kind != tetherpb.FileOp_KIND_RENAME {
		return a.apply(op)
	}
	if err := a.sync(); err != nil {
		return err
	}
	if err := mark(i); err != nil {
		return err
	}
	if err := a.apply(op); err != nil {
		return err
	}
	if err := fail.at("renamed " + strconv.Itoa(i)); err != nil {
		return err
	}
	if err := a.sync(); err != nil {
		return err
	}
	return mark(i + 1)
}

// sync makes everything applied so far durable.
func (a *applier) sync() error {
	d, err := a.root.Open(rootPath)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := unix.Syncfs(int(d.Fd())); err != nil {
		return fmt.Errorf("make the applied batch durable (syncfs): %w", err)
	}
	return nil
}

func (a *applier) apply(op applyOp) error {
	switch op.kind {
	case tetherpb.FileOp_KIND_DELETE:
		return a.remove(op.path)
	case tetherpb.FileOp_KIND_MKDIR:
		return a.ensureDir(op.path)
	case tetherpb.FileOp_KIND_FILE:
		var err error
		if op.delta != nil {
			err = a.patchFile(op)
		} else {
			err = a.placeFile(op)
		}
		if err == nil && a.written != nil {
			a.noteWritten(op.path)
		}
		return err
	case tetherpb.FileOp_KIND_SYMLINK:
		return a.placeSymlink(op)
	case tetherpb.FileOp_KIND_RENAME:
		return a.rename(op.path, op.to)
	case tetherpb.FileOp_KIND_FIFO:
		return a.placeFIFO(op)
	case tetherpb.FileOp_KIND_HARDLINK:
		return a.placeHardlink(op)
	}
	return fmt.Errorf("%w: unknown op kind %d", errBadBatch, op.kind)
}

// prune removes, below dir, every entry not in keep.
func (a *applier) prune(dir string, keep map[string]struct{}) error {
	entries, err := readDirRoot(a.root, dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		rel := joinRel(dir, e.Name())
		if _, ok := keep[rel]; !ok {
			if err := a.root.RemoveAll(rel); err != nil {
				return err
			}
			continue
		}
		if e.IsDir() {
			if err := a.prune(rel, keep); err != nil {
				return err
			}
		}
	}
	return nil
}

// realDirs reports whether every proper ancestor of rel is a real directory
// (not a symlink); when one is not, rel cannot exist as the primary sees it.
func (a *applier) realDirs(rel string) (bool, error) {
	for _, d := range ancestorsOf(rel) {
		if _, ok := a.verified[d]; ok {
			continue
		}
		fi, err := a.root.Lstat(d)
		if errors.Is(err, fs.ErrNotExist) {
			return false, nil
		}
		if err != nil {
			return false, err
		}
		if !fi.IsDir() {
			return false, nil
		}
	}
	return true, nil
}

// remove deletes rel and everything below it, if it exists.
func (a *applier) remove(rel string) error {
	ok, err := a.realDirs(rel)
	if err != nil || !ok {
		return err
	}
	clear(a.verified)
	return a.root.RemoveAll(rel)
}

// ensureDir makes rel and its ancestors real directories, replacing
// anything else found in their place.
func (a *applier) ensureDir(rel string) error {
	if rel == rootPath {
		return nil
	}
	for _, d := range append(ancestorsOf(rel), rel) {
		if _, ok := a.verified[d]; ok {
			continue
		}
		fi, err := a.root.Lstat(d)
		switch {
		case errors.Is(err, fs.ErrNotExist):
		case err != nil:
			return err
		case fi.IsDir():
			a.verified[d] = struct{}{}
			continue
		default:
			if err := a.root.Remove(d); err != nil {
				return err
			}
		}
		if err := a.root.Mkdir(d, 0o700); err != nil {
			return err
		}
		a.verified[d] = struct{}{}
	}
	return nil
}

// tempName returns a fresh temporary name in dir.
func tempName(dir string) string {
	return joinRel(dir, tempPrefix+rand.Text())
}

// replaceWith renames tmp over rel, first removing a directory at rel.
func (a *applier) replaceWith(tmp, rel string) error {
	fi, err := a.root.Lstat(rel)
	if err == nil && fi.IsDir() {
		clear(a.verified)
		if err := a.root.RemoveAll(rel); err != nil {
			return err
		}
	}
	return a.root.Rename(tmp, rel)
}

// placeFile gives a staged file its owner, mode, extended attributes and
// mtime and renames it into place (renameat from the stage directory into
// the target's directory, opened through the root; the last component is
// replaced, never followed). A staged file that is gone was placed by an
// earlier, interrupted application of this batch. When the stage is on
// another file system, the contents are copied next to the target instead.
func (a *applier) placeFile(op applyOp) error {
	dir := parentOf(op.path)
	if err := a.ensureDir(dir); err != nil {
		return err
	}
	err := a.prepareStaged(op)
	if errors.Is(err, fs.ErrNotExist) {
		if a.replay {
			return nil // placed by the interrupted application
		}
		return fmt.Errorf("the staged contents of %q are missing: %w", op.path, err)
	}
	if err != nil {
		return err
	}
	err = a.renameStaged(op)
	if !errors.Is(err, unix.EXDEV) {
		return err
	}
	tmp := tempName(dir)
	if err := a.writeTemp(tmp, op); err != nil {
		_ = a.root.Remove(tmp)
		return err
	}
	if err := a.replaceWith(tmp, op.path); err != nil {
		_ = a.root.Remove(tmp)
		return err
	}
	return nil
}

// prepareStaged sets the metadata of a staged file (fs.ErrNotExist when it
// is gone).
func (a *applier) prepareStaged(op applyOp) error {
	f, err := os.OpenFile(op.staged, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	err = a.setMeta(f, op.path, op) // after writing: a write clears setuid/setgid
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	if err := os.Chtimes(op.staged, op.mtime, op.mtime); err != nil {
		return fmt.Errorf("set mtime of %q: %w", op.path, err)
	}
	return nil
}

// renameStaged moves a prepared staged file over op.path, first removing a
// directory found there.
func (a *applier) renameStaged(op applyOp) error {
	if fi, err := a.root.Lstat(op.path); err == nil && fi.IsDir() {
		clear(a.verified)
		if err := a.root.RemoveAll(op.path); err != nil {
			return err
		}
	}
	stage, err := a.stageDir(filepath.Dir(op.staged))
	if err != nil {
		return err
	}
	d, err := a.root.Open(parentOf(op.path))
	if err != nil {
		return err
	}
	defer d.Close()
	if err := unix.Renameat(int(stage.Fd()), filepath.Base(op.staged), int(d.Fd()), baseOf(op.path)); err != nil {
		return fmt.Errorf("move staged contents into place: %w", err)
	}
	return nil
}

// stageDir returns the open stage directory dir (kept for the batch).
func (a *applier) stageDir(dir string) (*os.File, error) {
	if a.stage != nil && a.stage.Name() == dir {
		return a.stage, nil
	}
	if a.stage != nil {
		_ = a.stage.Close()
	}
	f, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("open stage directory: %w", err)
	}
	a.stage = f
	return f, nil
}

func (a *applier) writeTemp(tmp string, op applyOp) error {
	src, err := os.Open(op.staged)
	if err != nil {
		return fmt.Errorf("open staged contents: %w", err)
	}
	defer src.Close()
	f, err := a.root.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	err = f.Truncate(op.size) // holes stay holes: only data extents are written
	for _, e := range op.extents {
		if err != nil {
			break
		}
		err = copyRange(f, src, e.off, e.n)
	}
	if err == nil {
		err = a.setMeta(f, tmp, op) // after writing: a write clears setuid/setgid
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	return a.root.Chtimes(tmp, op.mtime, op.mtime)
}

// setMeta sets the owner, mode and extended attributes of an open file or
// directory, in that order (chown clears setuid/setgid).
func (a *applier) setMeta(f *os.File, rel string, op applyOp) error {
	if err := f.Chown(int(op.uid), int(op.gid)); err != nil {
		if !errors.Is(err, unix.EPERM) {
			return fmt.Errorf("set owner of %q: %w", rel, err)
		}
		a.warn.warn("chown", "cannot set file owners on the replica (not running as root?); ownership is not replicated", "err", err)
	}
	if err := f.Chmod(op.mode); err != nil {
		return fmt.Errorf("set mode of %q: %w", rel, err)
	}
	if err := setXattrs(int(f.Fd()), op.xattrs); err != nil {
		if !errors.Is(err, errXattrUnsupported) && !errors.Is(err, unix.EPERM) {
			return fmt.Errorf("set extended attributes of %q: %w", rel, err)
		}
		a.warn.warn("xattr", "cannot set extended attributes on the replica; they are not replicated", "err", err)
	}
	return nil
}

// lchown sets the owner of rel itself (not following a symlink).
func (a *applier) lchown(rel string, uid, gid uint32) error {
	if err := a.root.Lchown(rel, int(uid), int(gid)); err != nil {
		if !errors.Is(err, unix.EPERM) {
			return fmt.Errorf("set owner of %q: %w", rel, err)
		}
		a.warn.warn("chown", "cannot set file owners on the replica (not running as root?); ownership is not replicated", "err", err)
	}
	return nil
}

// placeFIFO creates a named pipe under a temporary name and renames it into
// place.
func (a *applier) placeFIFO(op applyOp) error {
	dir := parentOf(op.path)
	if err := a.ensureDir(dir); err != nil {
		return err
	}
	tmp := tempName(dir)
	d, err := a.root.Open(dir)
	if err != nil {
		return err
	}
	err = unix.Mkfifoat(int(d.Fd()), baseOf(tmp), 0o600)
	_ = d.Close()
	if err != nil {
		return fmt.Errorf("create fifo %q: %w", op.path, err)
	}
	err = a.lchown(tmp, op.uid, op.gid)
	if err == nil {
		err = a.root.Chmod(tmp, op.mode)
	}
	if err == nil {
		err = a.lutimes(tmp, op.mtime)
	}
	if err == nil {
		err = a.replaceWith(tmp, op.path)
	}
	if err != nil {
		_ = a.root.Remove(tmp)
	}
	return err
}

// placeHardlink makes op.path another name of op.to (a file this batch
// wrote), through a temporary name.
func (a *applier) placeHardlink(op applyOp) error {
	dir := parentOf(op.path)
	if err := a.ensureDir(dir); err != nil {
		return err
	}
	if ok, err := a.realDirs(op.to); err != nil || !ok {
		return fmt.Errorf("hard link target %q is not below real directories: %w", op.to, err)
	}
	if cur, err := a.root.Lstat(op.path); err == nil {
		if to, err := a.root.Lstat(op.to); err == nil && os.SameFile(cur, to) {
			// Linked already (a replay): renaming another link of the same
			// file over it would do nothing and leave the temporary name.
			return nil
		}
	}
	tmp := tempName(dir)
	if err := a.root.Link(op.to, tmp); err != nil {
		return err
	}
	if err := a.replaceWith(tmp, op.path); err != nil {
		_ = a.root.Remove(tmp)
		return err
	}
	return nil
}

// placeSymlink creates the link under a temporary name and renames it into
// place; the target is stored as given and never resolved.
func (a *applier) placeSymlink(op applyOp) error {
	dir := parentOf(op.path)
	if err := a.ensureDir(dir); err != nil {
		return err
	}
	tmp := tempName(dir)
	if err := a.root.Symlink(op.target, tmp); err != nil {
		return err
	}
	err := a.lchown(tmp, op.uid, op.gid)
	if err == nil {
		err = a.lutimes(tmp, op.mtime)
	}
	if err == nil {
		err = a.replaceWith(tmp, op.path)
	}
	if err != nil {
		_ = a.root.Remove(tmp)
	}
	return err
}

// lutimes sets the mtime of rel itself, not following a symlink.
func (a *applier) lutimes(rel string, mtime time.Time) error {
	d, err := a.root.Open(parentOf(rel))
	if err != nil {
		return err
	}
	defer d.Close()
	ts := unix.NsecToTimespec(mtime.UnixNano())
	if err := unix.UtimesNanoAt(int(d.Fd()), baseOf(rel), []unix.Timespec{ts, ts}, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("set mtime of %q: %w", rel, err)
	}
	return nil
}

// rename moves from to to, replacing what is at to.
func (a *applier) rename(from, to string) error {
	ok, err := a.realDirs(from)
	if err != nil || !ok {
		return err
	}
	if _, err := a.root.Lstat(from); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err := a.ensureDir(parentOf(to)); err != nil {
		return err
	}
	if fi, err := a.root.Lstat(to); err == nil && fi.IsDir() {
		if err := a.root.RemoveAll(to); err != nil {
			return err
		}
	}
	clear(a.verified)
	return a.root.Rename(from, to)
}

// finishDirs sets directory modes and mtimes, deepest first, after their
// contents are in place.
func (a *applier) finishDirs() error {
	dirs := make([]string, 0, len(a.dirMeta))
	for d := range a.dirMeta {
		dirs = append(dirs, d)
	}
	slices.SortFunc(dirs, func(x, y string) int { return depthOf(y) - depthOf(x) })
	for _, d := range dirs {
		fi, err := a.root.Lstat(d)
		if err != nil || !fi.IsDir() {
			continue // removed or replaced later in the batch
		}
		op := a.dirMeta[d]
		f, err := a.root.Open(d)
		if err != nil {
			return fmt.Errorf("open directory %q: %w", d, err)
		}
		err = a.setMeta(f, d, op)
		_ = f.Close()
		if err != nil {
			return err
		}
		if err := a.root.Chtimes(d, op.mtime, op.mtime); err != nil {
			return fmt.Errorf("set mtime of directory %q: %w", d, err)
		}
	}
	return nil
}

// readDirRoot lists a directory inside root.
func readDirRoot(root *os.Root, dir string) ([]fs.DirEntry, error) {
	f, err := root.Open(dir)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return f.ReadDir(-1)
}

// removeTemps removes, below dir, the temporary files an interrupted batch
// left next to their targets. The rest of an interrupted batch is repaired
// by the primary sending its paths again (or the whole tree).
func removeTemps(root *os.Root, dir string) error {
	entries, err := readDirRoot(root, dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		rel := joinRel(dir, e.Name())
		switch {
		case strings.HasPrefix(e.Name(), tempPrefix):
			if err := root.RemoveAll(rel); err != nil {
				return err
			}
		case e.IsDir():
			if err := removeTemps(root, rel); err != nil {
				return err
			}
		}
	}
	return nil
}
