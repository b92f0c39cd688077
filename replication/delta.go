package replication

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"syscall"
	"unsafe"

	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"
	"lukechampine.com/blake3"

	"github.com/tether-io/tether/proto/tetherpb"
)

// hashLen is the length of a block hash (BLAKE3-256).
const hashLen = 32

// Block deltas and compression limits on the replica.
const (
	minBlockSize = 4 << 10
	maxBlockSize = 16 << 20
	// maxChunkData bounds one chunk's data once decompressed: a peer cannot
	// make the replica allocate more per op.
	maxChunkData = 4 << 20
	// minCompress is the smallest chunk worth compressing.
	minCompress = 4 << 10
)

// errBaseMismatch says the replica's copy is not the base a delta or a
// rename of the batch relies on: the primary must send the whole tree.
var errBaseMismatch = errors.New("the replica's copy differs from the previous cut this batch builds on")

// zeroBlockHash is the hash of a whole block of zeros (a hole).
var zeroBlockHash = blake3.Sum256(make([]byte, blockSize))

// digestOf is the digest of a list of block hashes, as a delta's base
// names it.
func digestOf(hashes []byte) []byte {
	d := blake3.Sum256(hashes)
	return d[:]
}

// chunker gathers the data of a file's changed blocks into FILE chunks of
// up to chunkSize bytes, compressing each one when that pays.
type chunker struct {
	send sendFunc
	rel  string
	enc  *zstd.Encoder
	buf  []byte
	off  int64 // offset of buf
	end  int64 // end of the data sent so far
	// pool, when set, lends buf (*bufp's array) to the stream's codec with
	// each chunk sent uncompressed (see chunkPool).
	pool *chunkPool
	bufp *[]byte
}

// newChunker returns a chunker of file rel; release it after its last
// flush.
func newChunker(send sendFunc, rel string, enc *zstd.Encoder, pool *chunkPool) *chunker {
	c := &chunker{send: send, rel: rel, enc: enc, pool: pool}
	if pool != nil {
		c.bufp = pool.Get(chunkSize)
		c.buf = (*c.bufp)[:0]
	}
	return c
}

// release returns the chunker's buffer to its pool.
func (c *chunker) release() {
	if c.bufp != nil {
		c.pool.Put(c.bufp)
		c.bufp, c.buf = nil, nil
	}
}

func (c *chunker) add(off int64, data []byte) error {
	if len(c.buf) > 0 && (c.off+int64(len(c.buf)) != off || len(c.buf)+len(data) > chunkSize) {
		if err := c.flush(); err != nil {
			return err
		}
	}
	if len(c.buf) == 0 {
		c.off = off
	}
	c.buf = append(c.buf, data...)
	return nil
}

// reserve returns room for the n bytes of the file at off after the data
// gathered, sending that data first if off does not follow it or the n
// bytes would not fit in the chunk. The caller reads the bytes into the
// room and keeps them with commit if they are to be sent.
func (c *chunker) reserve(off int64, n int) ([]byte, error) {
	if len(c.buf) > 0 && (c.off+int64(len(c.buf)) != off || len(c.buf)+n > chunkSize) {
		if err := c.flush(); err != nil {
			return nil, err
		}
	}
	c.buf = slices.Grow(c.buf, n)
	return c.buf[len(c.buf) : len(c.buf)+n], nil
}

// commit adds the n bytes at off read into the room reserve returned.
func (c *chunker) commit(off int64, n int) {
	if n == 0 {
		return
	}
	if len(c.buf) == 0 {
		c.off = off
	}
	c.buf = c.buf[:len(c.buf)+n]
}

// flush sends the gathered data as one chunk. Its buffer is reused for the
// next chunk once send returns: every sendFunc is done with a message then
// (gRPC's Send has encoded it, the spool has written it), unless the
// stream's codec took the buffer lent with it (gRPC then returns it to the
// pool once written, and the chunker takes another).
func (c *chunker) flush() error {
	if len(c.buf) == 0 {
		return nil
	}
	op := &tetherpb.FileOp{Kind: tetherpb.FileOp_KIND_FILE, Path: []byte(c.rel), Data: c.buf, Offset: uint64(c.off), More: true}
	if c.enc != nil && len(c.buf) >= minCompress && pays(c.enc, c.buf[:min(len(c.buf), compressSample)]) {
		// Kept only when it saves at least an eighth.
		if z := c.enc.EncodeAll(c.buf, nil); len(z) < len(c.buf)-len(c.buf)/8 {
			op.Data, op.Zstd = z, true
		}
	}
	c.end = c.off + int64(len(c.buf))
	lent := c.bufp != nil && !op.Zstd && unsafe.SliceData(c.buf) == unsafe.SliceData(*c.bufp)
	if lent {
		c.pool.lend(c.bufp)
	}
	err := sendOp(c.send, op)
	if lent && !c.pool.reclaim(c.bufp) {
		c.bufp = c.pool.Get(chunkSize)
		c.buf = (*c.bufp)[:0]
		return err
	}
	c.buf = c.buf[:0]
	return err
}

// compressSample is how much of a chunk is compressed first to tell
// whether compressing the chunk pays: incompressible data (media, already
// compressed or encrypted files) then costs 1/64 of the compression work.
const compressSample = 16 << 10

// pays reports whether compressing b saves at least an eighth.
func pays(enc *zstd.Encoder, b []byte) bool {
	return len(enc.EncodeAll(b, nil)) < len(b)-len(b)/8
}

// blockRead is what reading a file block by block found.
type blockRead struct {
	hashes  []byte   // hash of every block read
	changed []uint64 // blocks whose hash differs from the base's (all, without a base)
	short   bool     // the file shrank while read: hashes are incomplete
}

// clip returns the parts of extents exts (sorted) within [bs, be),
// advancing *ei past those that end before bs.
func clip(exts []extent, ei *int, bs, be int64) []extent {
	for *ei < len(exts) && exts[*ei].off+exts[*ei].n <= bs {
		*ei++
	}
	var out []extent
	for k := *ei; k < len(exts) && exts[k].off < be; k++ {
		if s, e := max(exts[k].off, bs), min(exts[k].off+exts[k].n, be); s < e {
			out = append(out, extent{s, e - s})
		}
	}
	return out
}

// readBlocks reads a file of size bytes (data extents exts) block by
// block, hashing every block (holes read as zeros, without reading them)
// and sending the data of the blocks that differ from base (every block
// when base is nil) through ch: in contents, or in where their holes are.
// The file is read once.
func readBlocks(f *os.File, size int64, exts []extent, base *indexEntry, ch *chunker) (blockRead, error) {
	var r blockRead
	var buf []byte // blocks with holes are read here: allocated at the first one (the hash makes it escape)
	ei, bi := 0, 0
	for i := int64(0); i*blockSize < size; i++ {
		bs, be := i*blockSize, min((i+1)*blockSize, size)
		ranges := clip(exts, &ei, bs, be)
		var baseRanges []extent
		if base != nil {
			baseRanges = clip(base.exts, &bi, bs, be)
		}
		var blk []byte
		var h [hashLen]byte
		// A block all data is read straight into the chunk being gathered
		// (and kept there if it is sent): no copy.
		direct := len(ranges) == 1 && ranges[0] == extent{bs, be - bs}
		switch {
		case direct:
			var err error
			if blk, err = ch.reserve(bs, int(be-bs)); err != nil {
				return r, err
			}
			n, err := f.ReadAt(blk, bs)
			if err != nil && !errors.Is(err, io.EOF) {
				return r, err
			}
			if int64(n) < be-bs { // the file shrank; its event brings it again
				clear(blk[n:])
				ranges, r.short = []extent{{bs, int64(n)}}, true
			}
			h = blake3.Sum256(blk)
		case len(ranges) == 0 && be-bs == blockSize:
			h = zeroBlockHash
		default:
			if buf == nil {
				buf = make([]byte, blockSize)
			}
			blk = buf[:be-bs]
			clear(blk)
			for j, rg := range ranges {
				n, err := f.ReadAt(blk[rg.off-bs:rg.off-bs+rg.n], rg.off)
				if err != nil && !errors.Is(err, io.EOF) {
					return r, err
				}
				if int64(n) < rg.n { // the file shrank; its event brings it again
					ranges, r.short = append(ranges[:j], extent{rg.off, int64(n)}), true
					break
				}
			}
			h = blake3.Sum256(blk)
		}
		r.hashes = append(r.hashes, h[:]...)
		if !r.short && base != nil && int64(len(base.hashes)) >= (i+1)*hashLen &&
			bytes.Equal(base.hashes[i*hashLen:(i+1)*hashLen], h[:]) && !layoutMoved(ranges, baseRanges) {
			continue
		}
		r.changed = append(r.changed, uint64(i))
		if direct {
			ch.commit(bs, int(ranges[0].n))
		}
		for _, rg := range ranges {
			if rg.n > 0 && !direct {
				if err := ch.add(rg.off, blk[rg.off-bs:rg.off-bs+rg.n]); err != nil {
					return r, err
				}
			}
		}
		if r.short {
			break
		}
	}
	return r, ch.flush()
}

// layoutMoved reports whether a block's data extents differ from the
// base's (a hole became zeros written as data, or the reverse).
func layoutMoved(cur, base []extent) bool {
	return !slices.Equal(cur, base)
}

// deltaBase returns the entry a file read now can be sent as a delta
// against: the index's entry of the path it had at the previous cut, when
// it is the same single-linked inode (patching it in place on the replica
// then changes nothing else).
func deltaBase(base, cur *indexEntry) *indexEntry {
	if base == nil || base.kind != kindFile || cur.kind != kindFile || base.ino != cur.ino || base.dev != cur.dev ||
		base.nlink != 1 || cur.nlink != 1 || int64(len(base.hashes)) != blockCount(base.size, blockSize)*hashLen {
		return nil
	}
	return base
}

func blockCount(size, bs int64) int64 { return (size + bs - 1) / bs }

// deltaOp is a validated delta of a FILE op on the replica.
type deltaOp struct {
	baseSize  int64
	baseMtime int64
	digest    []byte
	blockSize int64
	blocks    []uint64
}

// checkDelta validates a FILE op's delta against its size and the data
// extents received.
func checkDelta(p string, d *tetherpb.Delta, size int64, exts []extent) (*deltaOp, error) {
	bs := int64(d.GetBlockSize())
	if bs < minBlockSize || bs > maxBlockSize || d.GetBaseSize() > maxFileSize || len(d.GetBaseDigest()) != hashLen {
		return nil, fmt.Errorf("%w: delta of %q has block size %d, base size %d, digest of %d bytes", errBadBatch, p, bs, d.GetBaseSize(), len(d.GetBaseDigest()))
	}
	blocks := d.GetBlocks()
	n := blockCount(size, bs)
	for i, b := range blocks {
		if b >= uint64(n) || (i > 0 && b <= blocks[i-1]) {
			return nil, fmt.Errorf("%w: delta of %q lists block %d out of order or beyond its %d blocks", errBadBatch, p, b, n)
		}
	}
	for _, e := range exts {
		for blk := e.off / bs; blk*bs < e.off+e.n; blk++ {
			if _, ok := slices.BinarySearch(blocks, uint64(blk)); !ok {
				return nil, fmt.Errorf("%w: delta of %q carries data in block %d, which it does not replace", errBadBatch, p, blk)
			}
		}
	}
	return &deltaOp{baseSize: int64(d.GetBaseSize()), baseMtime: d.GetBaseMtimeUnixNano(), digest: d.GetBaseDigest(),
		blockSize: bs, blocks: blocks}, nil
}

// chunkData returns a chunk's data, decompressed when it is compressed:
// the frame must state its size, at most maxChunkData, and decode to it.
func (b *batch) chunkData(op *tetherpb.FileOp) ([]byte, error) {
	if !op.GetZstd() {
		return op.GetData(), nil
	}
	var h zstd.Header
	if err := h.Decode(op.GetData()); err != nil || !h.HasFCS || h.FrameContentSize > maxChunkData {
		return nil, fmt.Errorf("%w: compressed chunk of %q does not state a size of at most %d bytes", errBadBatch, op.GetPath(), maxChunkData)
	}
	if b.dec == nil {
		d, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(maxChunkData),
			zstd.WithDecodeAllCapLimit(true))
		if err != nil {
			return nil, fmt.Errorf("create zstd decoder: %w", err)
		}
		b.dec = d
	}
	out, err := b.dec.DecodeAll(op.GetData(), make([]byte, 0, h.FrameContentSize))
	if err == nil && uint64(len(out)) != h.FrameContentSize {
		err = fmt.Errorf("decoded %d bytes, not the %d it states", len(out), h.FrameContentSize)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: compressed chunk of %q: %v", errBadBatch, op.GetPath(), err)
	}
	return out, nil
}

// baseResolver tells, for an op of a batch, the path its base had before
// the batch, without walking the whole batch for every op.
type baseResolver struct {
	ops     []applyOp
	renames []int            // indices of the RENAME ops, ascending
	at      map[string][]int // indices of the other ops by path, ascending
}

func newBaseResolver(ops []applyOp) *baseResolver {
	r := &baseResolver{ops: ops, at: map[string][]int{}}
	for i, o := range ops {
		if o.kind == tetherpb.FileOp_KIND_RENAME {
			r.renames = append(r.renames, i)
		} else {
			r.at[o.path] = append(r.at[o.path], i)
		}
	}
	return r
}

// lastHit returns the index of the last op (not a rename) in (lo, hi) that
// replaces p or removes it: any op at p, or one at an ancestor of p that is
// not a MKDIR; -1 when there is none.
func (r *baseResolver) lastHit(p string, lo, hi int) int {
	last := -1
	hit := func(q string, mkdirKeeps bool) {
		idx := r.at[q]
		k, _ := slices.BinarySearch(idx, hi)
		for k--; k >= 0 && idx[k] > lo && idx[k] > last; k-- {
			if !mkdirKeeps || r.ops[idx[k]].kind != tetherpb.FileOp_KIND_MKDIR {
				last = idx[k]
				return
			}
		}
	}
	hit(p, false)
	for _, a := range ancestorsOf(p) {
		hit(a, true)
	}
	return last
}

// originKind says where what a path holds at an op comes from.
type originKind int

const (
	fromBefore originKind = iota // the path as it was before the batch
	setBy                        // the op at the origin's index set or removed it
	movedAway                    // the rename at the origin's index moved it away
)

// origin follows p (a path once ops[:i] are applied) back through the
// batch's renames to where what it holds comes from: the path it had before
// the batch, or the op of the batch that last set (or removed) it, or the
// rename that moved it away (at is that op's index, or -1).
func (r *baseResolver) origin(i int, p string) (q string, at int, how originKind) {
	hi := i
	k, _ := slices.BinarySearch(r.renames, i)
	for k--; k >= 0; k-- {
		j := r.renames[k]
		o := r.ops[j]
		inTo, inFrom := isUnder(p, o.to), isUnder(p, o.path)
		if !inTo && !inFrom {
			continue
		}
		if w := r.lastHit(p, j, hi); w >= 0 {
			return p, w, setBy // replaced after the rename
		}
		if !inTo {
			return p, j, movedAway
		}
		p, hi = o.path+p[len(o.to):], j
	}
	if w := r.lastHit(p, -1, hi); w >= 0 {
		return p, w, setBy
	}
	return p, -1, fromBefore
}

// path returns the path that p (a path once ops[:i] are applied) had
// before the batch, following the batch's renames back; ok is false when
// an op before i replaces or removes what p holds.
func (r *baseResolver) path(i int, p string) (string, bool) {
	q, _, how := r.origin(i, p)
	if how != fromBefore {
		return "", false
	}
	return q, true
}

// verifyBases checks, before a batch is journaled, that the replica holds
// what the batch builds on: the source of every rename, and the base of
// every delta (size, mtime and block digest). A mismatch refuses the batch
// (errBaseMismatch); the primary then sends the whole tree.
//
// A batch continued over later cuts (segs: the first op of each) builds
// each segment on what the earlier ones leave: an op of a later segment may
// build on a path an earlier segment wrote (checked against that op: a
// delta's base against the file it wrote, by size, mtime and digest), never
// on one its own segment replaced (that is a malformed cut). A full batch
// keeps only what its first segment names.
func verifyBases(data string, ops []applyOp, segs []int, full bool, cache *baseCache) error {
	var root *os.Root
	var res *baseResolver
	defer func() {
		if root != nil {
			_ = root.Close()
		}
	}()
	open := func() error {
		if root != nil {
			return nil
		}
		var err error
		root, err = os.OpenRoot(data)
		if err != nil {
			return fmt.Errorf("open volume data directory: %w", err)
		}
		return nil
	}
	seg := 0
	for i, op := range ops {
		for seg < len(segs) && i >= segs[seg] {
			seg++
		}
		isDelta := op.kind == tetherpb.FileOp_KIND_FILE && op.delta != nil
		if !isDelta && op.kind != tetherpb.FileOp_KIND_RENAME {
			continue
		}
		if full && !isDelta && seg == 0 {
			return fmt.Errorf("%w: a full batch carries a rename of %q", errBadBatch, op.path)
		}
		if res == nil {
			res = newBaseResolver(ops)
		}
		lo := 0
		if seg > 0 {
			lo = segs[seg-1]
		}
		p, at, how := res.origin(i, op.path)
		switch {
		case at >= lo:
			return fmt.Errorf("%w: %s of %q builds on a path an earlier op of its cut replaced", errBadBatch, op.kind, op.path)
		case how == movedAway:
			return fmt.Errorf("%w: %s of %q builds on %q, which an earlier cut of the batch moved away", errBaseMismatch, op.kind, op.path, p)
		case how == setBy:
			if err := checkBaseOp(ops[at], p, op, isDelta); err != nil {
				return err
			}
			continue
		case full && seg > 0:
			return fmt.Errorf("%w: %s of %q builds on %q, which the full batch does not keep", errBaseMismatch, op.kind, op.path, p)
		}
		if err := open(); err != nil {
			return err
		}
		if !isDelta {
			if ok, err := existsReal(root, p); err != nil || !ok {
				return errors.Join(err, fmt.Errorf("%w: rename source %q is missing", errBaseMismatch, p))
			}
			continue
		}
		if err := checkBase(root, p, op.delta, cache); err != nil {
			return err
		}
	}
	return nil
}

// checkBaseOp checks that w, the op of an earlier segment that last set or
// removed p, leaves what op (a later segment's rename from p, or delta of
// p) builds on.
func checkBaseOp(w applyOp, p string, op applyOp, isDelta bool) error {
	if w.path != p || w.kind == tetherpb.FileOp_KIND_DELETE {
		return fmt.Errorf("%w: %s of %q builds on %q, which an earlier cut of the batch removed", errBaseMismatch, op.kind, op.path, p)
	}
	if !isDelta {
		return nil
	}
	d := op.delta
	if w.kind != tetherpb.FileOp_KIND_FILE || w.digest == nil || w.size != d.baseSize || w.mtime.UnixNano() != d.baseMtime ||
		w.digest.blockSize != d.blockSize || !bytes.Equal(w.digest.sum, d.digest) {
		return fmt.Errorf("%w: the delta of %q does not build on what an earlier cut of the batch wrote there", errBaseMismatch, op.path)
	}
	return nil
}

// existsReal reports whether rel exists below real directories.
func existsReal(root *os.Root, rel string) (bool, error) {
	_, ok, err := lstatReal(root, rel)
	return ok, err
}

// checkBase checks that the file at p is a delta's base (its digest known
// from the cache, or read and hashed).
func checkBase(root *os.Root, p string, d *deltaOp, cache *baseCache) error {
	if ok, err := existsReal(root, p); err != nil || !ok {
		return errors.Join(err, fmt.Errorf("%w: the base of the delta of %q is missing", errBaseMismatch, p))
	}
	f, err := root.OpenFile(p, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if err != nil {
		return fmt.Errorf("%w: open the base of the delta of %q: %v", errBaseMismatch, p, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("stat the base of the delta of %q: %w", p, err)
	}
	e := indexEntryOf(fi, fi.ModTime())
	if e.kind != kindFile || e.nlink != 1 || e.size != d.baseSize || e.mtime != d.baseMtime {
		return fmt.Errorf("%w: %q is not the base of its delta (size %d, mtime %d; the delta expects a single-linked file of size %d, mtime %d)",
			errBaseMismatch, p, e.size, e.mtime, d.baseSize, d.baseMtime)
	}
	if cache.matches(p, fi, d.blockSize, d.digest) {
		return nil
	}
	hashes, err := hashFile(f, e.size, d.blockSize)
	if err != nil {
		return fmt.Errorf("read the base of the delta of %q: %w", p, err)
	}
	if !bytes.Equal(digestOf(hashes), d.digest) {
		return fmt.Errorf("%w: the contents of %q differ from the base of its delta", errBaseMismatch, p)
	}
	return nil
}

// hashFile returns the hash of every block of bs bytes of f (size bytes),
// reading only its data extents: a block that lies in a hole hashes as
// zeros without being read.
func hashFile(f *os.File, size, bs int64) ([]byte, error) {
	exts, err := dataExtents(f, size)
	if err != nil {
		return nil, err
	}
	out := make([]byte, 0, blockCount(size, bs)*hashLen)
	buf := make([]byte, bs)
	zero := blake3.Sum256(buf)
	ei := 0
	for off := int64(0); off < size; off += bs {
		end := min(off+bs, size)
		ranges := clip(exts, &ei, off, end)
		if len(ranges) == 0 && end-off == bs {
			out = append(out, zero[:]...)
			continue
		}
		blk := buf[:end-off]
		clear(blk)
		for _, rg := range ranges {
			if _, err := f.ReadAt(blk[rg.off-off:rg.off-off+rg.n], rg.off); err != nil {
				return nil, err
			}
		}
		h := blake3.Sum256(blk)
		out = append(out, h[:]...)
	}
	return out, nil
}

// patchFile applies a delta in place: the file is cut to its new size,
// every replaced block zeroed and given the data staged for it, then its
// owner, mode, xattrs and mtime are set. Applying it again over a partial
// application gives the same file, as the redo journal needs.
func (a *applier) patchFile(op applyOp) error {
	if ok, err := a.realDirs(op.path); err != nil || !ok {
		return errors.Join(err, fmt.Errorf("the base of the delta of %q is gone", op.path))
	}
	f, err := a.root.OpenFile(op.path, os.O_WRONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() {
		return errors.Join(err, fmt.Errorf("the base of the delta of %q is not a regular file", op.path))
	}
	src, err := os.Open(op.staged)
	if err != nil {
		return fmt.Errorf("open staged contents: %w", err)
	}
	defer src.Close()
	if err := f.Truncate(op.size); err != nil {
		return err
	}
	bs := op.delta.blockSize
	for _, b := range op.delta.blocks {
		if s := int64(b) * bs; s < op.size {
			// The last block is punched whole, past the end: a hole punched
			// only up to an end inside a page leaves that page allocated
			// (zeroed), where the primary may hold a hole.
			if err := zeroRange(f, s, min(bs, op.size-s), bs); err != nil {
				return err
			}
		}
	}
	for _, e := range op.extents {
		if err := copyRange(f, src, e.off, e.n); err != nil {
			return err
		}
	}
	if err := a.setMeta(f, op.path, op); err != nil {
		return err
	}
	return a.root.Chtimes(op.path, op.mtime, op.mtime)
}

// zeroRange makes [off, off+n) of f zeros, as a hole where it can: it
// punches [off, off+punch) (punch ≥ n may reach past the end of the file,
// whose size stays).
func zeroRange(f *os.File, off, n, punch int64) error {
	err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, max(n, punch))
	if err == nil {
		return nil
	}
	if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.ENOSYS) {
		return fmt.Errorf("zero a replaced block: %w", err)
	}
	_, err = f.WriteAt(make([]byte, n), off)
	return err
}
