package replication

import (
	"bytes"
	"io/fs"

	"github.com/tether-io/tether/proto/tetherpb"
)

// fileDigest is the digest of a file: BLAKE3 of the concatenated BLAKE3-256
// hashes of its blocks of blockSize bytes.
type fileDigest struct {
	blockSize int64
	sum       []byte
}

// maxCachedBases bounds the entries of one volume's base cache; past it the
// cache starts again empty (a miss only costs reading the file).
const maxCachedBases = 1 << 16

// baseCache remembers, on a replica, the digest of each file a batch wrote
// (as the primary sent it) with the stat of the copy once the batch was
// applied, so that checking the base of the next delta of that file need
// not read and hash it whole. An entry counts only while the copy's inode,
// size, mtime and ctime are those recorded: any write to the file since,
// by tether or anything else, changes its ctime. (A write in the same tick
// of the kernel's coarse clock as tether's own would not; nothing but
// tether writes a replica's copy, so this is not guarded against, as the
// primary's index guards against its applications.) Guarded by the
// volume's lock; it lives in memory only: after a restart bases are hashed
// again.
type baseCache struct {
	m map[string]cachedBase
}

type cachedBase struct {
	stat   indexEntry // ino, dev, nlink, size, mtime, ctime
	digest fileDigest
}

func newBaseCache() *baseCache { return &baseCache{m: map[string]cachedBase{}} }

// matches reports whether the file at rel, whose stat is fi, is known to
// have the digest sum over blocks of bs bytes.
func (c *baseCache) matches(rel string, fi fs.FileInfo, bs int64, sum []byte) bool {
	if c == nil {
		return false
	}
	e, ok := c.m[rel]
	if !ok || e.digest.blockSize != bs || !bytes.Equal(e.digest.sum, sum) {
		return false
	}
	cur := indexEntryOf(fi, fi.ModTime())
	return cur.kind == kindFile && cur.nlink == 1 && cur.ino == e.stat.ino && cur.dev == e.stat.dev &&
		cur.size == e.stat.size && cur.mtime == e.stat.mtime && cur.ctime == e.stat.ctime
}

// reset forgets every entry.
func (c *baseCache) reset() {
	if c != nil {
		clear(c.m)
	}
}

// record updates the cache after a batch of ops was applied: the files
// written with a digest are remembered with the stat they had as soon as
// they were in place (written; a stat taken after the whole batch could
// include someone else's write, which would then pass for the digest),
// what else the batch touched is forgotten.
func (c *baseCache) record(ops []applyOp, written map[string]*indexEntry) {
	if c == nil {
		return
	}
	if len(c.m) > maxCachedBases {
		clear(c.m)
	}
	for _, op := range ops {
		delete(c.m, op.path)
		if op.kind == tetherpb.FileOp_KIND_RENAME || op.kind == tetherpb.FileOp_KIND_HARDLINK {
			delete(c.m, op.to)
		}
		if op.kind != tetherpb.FileOp_KIND_FILE || op.digest == nil {
			continue
		}
		if st, ok := written[op.path]; ok && st.nlink == 1 {
			c.m[op.path] = cachedBase{stat: *st, digest: *op.digest}
		}
	}
}
