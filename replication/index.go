package replication

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"syscall"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// indexFile is the primary's block index of a volume, in Paths.State.
const indexFile = "index.db"

// blockSize is the unit of block deltas. 64 KiB is the largest power of
// two for which a 1 MiB change anywhere in a file (touching at most 17
// blocks, 1.0625 MiB) stays within 1.1 x the changed bytes on the wire,
// while a 1 GiB file needs only 16,384 hashes (512 KiB) in the index.
const blockSize = 64 << 10

var entriesBucket = []byte("entries")

// Kinds of index entries.
const (
	kindFile    byte = 'f'
	kindDir     byte = 'd'
	kindSymlink byte = 'l'
	kindFIFO    byte = 'p'
)

// indexEntry is what the last cut that carried a path sent for it: the
// stat of the entry when it was read and, for a regular file, the BLAKE3
// hash of each of its blocks as sent (holes hash as zeros).
type indexEntry struct {
	kind            byte
	ino, dev, nlink uint64
	size            int64
	mtime, ctime    int64
	mode            uint32
	uid, gid        uint32
	readNano        int64    // when the entry was read (a change within the clock's tick may not show in its times)
	exts            []extent // regular files: data extents as sent (a block whose holes moved changed too)
	hashes          []byte   // regular files: blake3-256 of each block of blockSize bytes
}

// indexEntryOf describes fi (stat taken at read time).
func indexEntryOf(fi fs.FileInfo, readAt time.Time) *indexEntry {
	e := &indexEntry{size: fi.Size(), mtime: fi.ModTime().UnixNano(), mode: uint32(fi.Mode()), readNano: readAt.UnixNano()}
	switch fi.Mode().Type() {
	case 0:
		e.kind = kindFile
	case fs.ModeDir:
		e.kind = kindDir
	case fs.ModeSymlink:
		e.kind = kindSymlink
	default:
		e.kind = kindFIFO
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		e.ino, e.dev, e.nlink = st.Ino, st.Dev, uint64(st.Nlink)
		e.ctime, e.uid, e.gid = st.Ctim.Nano(), st.Uid, st.Gid
	}
	return e
}

// statOnly is the readNano of an entry that describes a file's stat but no
// reading of it: a file a full cut streams (its sender reads it after the
// cut, and the barrier after the stream vouches that it did not change
// since). Such an entry is never racy for a rescan and never proves the file
// unchanged; it has no hashes, so no delta builds on it.
const statOnly = math.MaxInt64

// statOnlyEntry is the stat-only entry of fi.
func statOnlyEntry(fi fs.FileInfo) *indexEntry {
	e := indexEntryOf(fi, time.Unix(0, 0))
	e.readNano = statOnly
	return e
}

// racyWindow is how close to its reading a change may be and not show in
// an entry's times (the kernel's coarse clock ticks up to 10 ms apart).
const racyWindow = 20 * time.Millisecond

// unchanged reports whether cur (the entry now) is provably what e was
// when read: same inode, type, size, times, mode and owner, and its last
// change well before the reading.
func (e *indexEntry) unchanged(cur *indexEntry) bool {
	return e.readNano != statOnly && e.kind == cur.kind && e.ino == cur.ino && e.dev == cur.dev && e.size == cur.size &&
		e.mtime == cur.mtime && e.ctime == cur.ctime && e.mode == cur.mode && e.uid == cur.uid && e.gid == cur.gid &&
		e.nlink == cur.nlink && e.ctime < e.readNano-int64(racyWindow)
}

func (e *indexEntry) encode() []byte {
	b := []byte{e.kind}
	for _, u := range []uint64{e.ino, e.dev, e.nlink, uint64(e.mode), uint64(e.uid), uint64(e.gid)} {
		b = binary.AppendUvarint(b, u)
	}
	for _, v := range []int64{e.size, e.mtime, e.ctime, e.readNano} {
		b = binary.AppendVarint(b, v)
	}
	b = binary.AppendUvarint(b, uint64(len(e.exts)))
	for _, x := range e.exts {
		b = binary.AppendUvarint(binary.AppendUvarint(b, uint64(x.off)), uint64(x.n))
	}
	return append(b, e.hashes...)
}

var errBadEntry = errors.New("corrupt index entry")

func decodeEntry(b []byte) (*indexEntry, error) {
	e, b, err := decodeStat(b)
	if err != nil {
		return nil, err
	}
	n, k := binary.Uvarint(b)
	if k <= 0 || n > uint64(len(b)) {
		return nil, errBadEntry
	}
	b = b[k:]
	for range n {
		var x [2]uint64
		for i := range x {
			u, k := binary.Uvarint(b)
			if k <= 0 {
				return nil, errBadEntry
			}
			x[i], b = u, b[k:]
		}
		e.exts = append(e.exts, extent{int64(x[0]), int64(x[1])})
	}
	if len(b)%hashLen != 0 {
		return nil, errBadEntry
	}
	e.hashes = bytes.Clone(b)
	return e, nil
}

// decodeStat decodes the stat part of an encoded entry (no extents or
// hashes) and returns the rest.
func decodeStat(b []byte) (*indexEntry, []byte, error) {
	if len(b) < 1 {
		return nil, nil, errBadEntry
	}
	e := &indexEntry{kind: b[0]}
	b = b[1:]
	var us [6]uint64
	for i := range us {
		u, n := binary.Uvarint(b)
		if n <= 0 {
			return nil, nil, errBadEntry
		}
		us[i], b = u, b[n:]
	}
	var vs [4]int64
	for i := range vs {
		v, n := binary.Varint(b)
		if n <= 0 {
			return nil, nil, errBadEntry
		}
		vs[i], b = v, b[n:]
	}
	e.ino, e.dev, e.nlink, e.mode, e.uid, e.gid = us[0], us[1], us[2], uint32(us[3]), uint32(us[4]), uint32(us[5])
	e.size, e.mtime, e.ctime, e.readNano = vs[0], vs[1], vs[2], vs[3]
	return e, b, nil
}

// index is a primary's per-volume block index (bbolt, keyed by path). It
// describes the volume as the last published cut carried it, so that the
// next cut can send each changed file as the blocks that differ, and tell
// renames from deletes. Every Primary starts with a full cut, which
// rebuilds it: a crash can cost the index, never a wrong delta.
type index struct {
	db *bolt.DB
}

// openIndex opens (or, when unreadable, recreates) the index in dir.
func openIndex(dir string) (*index, error) {
	path := filepath.Join(dir, indexFile)
	opts := &bolt.Options{Timeout: time.Second, NoSync: true, NoFreelistSync: true}
	db, err := bolt.Open(path, 0o600, opts)
	if err != nil && !errors.Is(err, berrors.ErrTimeout) {
		// Written without fsync (it is rebuilt by the first cut): after a
		// crash it may be unreadable; start afresh.
		if rerr := os.Remove(path); rerr == nil {
			db, err = bolt.Open(path, 0o600, opts)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("open the volume's block index %s: %w", path, err)
	}
	return &index{db: db}, nil
}

func (x *index) close() { _ = x.db.Close() }

// get returns the entry of rel, nil when there is none.
func (x *index) get(rel string) (*indexEntry, error) {
	var e *indexEntry
	err := x.db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(entriesBucket)
		if b == nil {
			return nil
		}
		v := b.Get([]byte(rel))
		if v == nil {
			return nil
		}
		var err error
		e, err = decodeEntry(v)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("read the block index for %q: %w", rel, err)
	}
	return e, nil
}

// under calls fn for every entry strictly below dir.
func (x *index) under(dir string, fn func(rel string, e *indexEntry)) error {
	return x.db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(entriesBucket)
		if b == nil {
			return nil
		}
		return scanUnder(b, dir, func(k, v []byte) error {
			e, err := decodeEntry(v)
			if err != nil {
				return err
			}
			fn(string(k), e)
			return nil
		})
	})
}

// differences calls mark for every path on which the index and a scan of
// the tree (snap) disagree: a path only one of them has, another inode,
// size, mtime or ctime, or a file whose entry was read so soon after its
// last change that a later change may not show in its times (it is read
// again once). Devices and sockets, which are not replicated, are not
// compared.
func (x *index) differences(snap map[string]statKey, mark func(rel string)) error {
	seen := make(map[string]bool, len(snap))
	err := x.db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(entriesBucket)
		if b == nil {
			return nil
		}
		return b.ForEach(func(k, v []byte) error {
			e, _, err := decodeStat(v)
			if err != nil {
				return fmt.Errorf("entry %q: %w", k, err)
			}
			rel := string(k)
			seen[rel] = true
			cur, ok := snap[rel]
			if !ok || cur.ino != e.ino || cur.size != e.size || cur.mtime != e.mtime || cur.ctim != e.ctime ||
				cur.mode&syscall.S_IFMT != kindBits[e.kind] ||
				(e.kind == kindFile && e.readNano != statOnly && e.ctime >= e.readNano-int64(racyWindow)) {
				mark(rel)
			}
			return nil
		})
	})
	if err != nil {
		return fmt.Errorf("read the block index: %w", err)
	}
	for rel, k := range snap {
		switch k.mode & syscall.S_IFMT {
		case syscall.S_IFCHR, syscall.S_IFBLK, syscall.S_IFSOCK:
			continue
		}
		if !seen[rel] {
			mark(rel)
		}
	}
	return nil
}

// kindBits are the stat(2) type bits of each kind of entry.
var kindBits = map[byte]uint32{kindFile: syscall.S_IFREG, kindDir: syscall.S_IFDIR, kindSymlink: syscall.S_IFLNK, kindFIFO: syscall.S_IFIFO}

// scanUnder calls fn for the keys strictly below dir ("." holds every key).
func scanUnder(b *bolt.Bucket, dir string, fn func(k, v []byte) error) error {
	prefix := []byte(dir + "/")
	c := b.Cursor()
	k, v := c.Seek(prefix)
	if dir == rootPath {
		prefix = nil
		k, v = c.First()
	}
	for ; k != nil && bytes.HasPrefix(k, prefix); k, v = c.Next() {
		if dir == rootPath && string(k) == rootPath {
			continue
		}
		if err := fn(k, v); err != nil {
			return err
		}
	}
	return nil
}

// indexUpdate is what a cut changes in the index, applied in the order the
// replica applies the batch: renames, deletes, then the entries read.
type indexUpdate struct {
	reset   bool // a full cut: the entries read are the whole index
	renames []renameOp
	deletes []string
	puts    map[string]*indexEntry // nil value: forget the path (its reading was incomplete)
	// fills complete stat-only entries (statOnly: a full cut's streamed
	// files) with what their streaming read; an entry that is no longer
	// the same stat-only one (a later cut read or removed the file) is left
	// alone.
	fills map[string]*indexEntry
}

// apply commits an update in one transaction.
func (x *index) apply(u *indexUpdate) error {
	err := x.db.Update(func(tx *bolt.Tx) error {
		if u.reset {
			if err := tx.DeleteBucket(entriesBucket); err != nil && !errors.Is(err, berrors.ErrBucketNotFound) {
				return err
			}
		}
		b, err := tx.CreateBucketIfNotExists(entriesBucket)
		if err != nil {
			return err
		}
		for _, r := range u.renames {
			if err := moveTree(b, r.from, r.to); err != nil {
				return err
			}
		}
		for _, d := range u.deletes {
			if err := deleteTree(b, d); err != nil {
				return err
			}
		}
		for rel, e := range u.puts {
			switch {
			case e == nil:
				err = b.Delete([]byte(rel))
			case e.kind != kindDir && rel != rootPath:
				// What a directory held here is gone with it (a cut may
				// carry a file where a directory was without its DELETE:
				// the replica's placing removes the directory).
				if err = deleteTree(b, rel); err == nil {
					err = b.Put([]byte(rel), e.encode())
				}
			default:
				err = b.Put([]byte(rel), e.encode())
			}
			if err != nil {
				return err
			}
		}
		// A replica makes the missing directories above every path it
		// writes (and above a rename's target): the index holds them, so a
		// rescan compares them with the tree. One made for an entry planned
		// without its new parent (see plan.addParents), or whose own
		// reading found it changed, is held as a placeholder that matches
		// no directory: the next rescan sends it, or deletes it.
		made := map[string]bool{}
		placeholder := (&indexEntry{kind: kindDir}).encode()
		holdAncestors := func(rel string) error {
			for _, a := range ancestorsOf(rel) {
				if made[a] {
					continue
				}
				made[a] = true
				if b.Get([]byte(a)) == nil {
					if err := b.Put([]byte(a), placeholder); err != nil {
						return err
					}
				}
			}
			return nil
		}
		for _, r := range u.renames {
			if err := holdAncestors(r.to); err != nil {
				return err
			}
		}
		for rel, e := range u.puts {
			if e == nil {
				continue
			}
			if err := holdAncestors(rel); err != nil {
				return err
			}
		}
		for rel, e := range u.fills {
			v := b.Get([]byte(rel))
			if v == nil {
				continue
			}
			old, err := decodeEntry(v)
			if err != nil || old.readNano != statOnly || old.ino != e.ino || old.size != e.size || old.mtime != e.mtime || old.ctime != e.ctime {
				continue
			}
			if err := b.Put([]byte(rel), e.encode()); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("update the volume's block index: %w", err)
	}
	return nil
}

// deleteTree removes rel and everything below it.
func deleteTree(b *bolt.Bucket, rel string) error {
	var keys [][]byte
	if err := scanUnder(b, rel, func(k, _ []byte) error {
		keys = append(keys, bytes.Clone(k))
		return nil
	}); err != nil {
		return err
	}
	keys = append(keys, []byte(rel))
	for _, k := range keys {
		if err := b.Delete(k); err != nil {
			return err
		}
	}
	return nil
}

// moveTree moves the entries of from and below to to, replacing what was
// at to.
func moveTree(b *bolt.Bucket, from, to string) error {
	type kv struct{ k, v []byte }
	var moved []kv
	if v := b.Get([]byte(from)); v != nil {
		moved = append(moved, kv{[]byte(to), bytes.Clone(v)})
	}
	if err := scanUnder(b, from, func(k, v []byte) error {
		moved = append(moved, kv{[]byte(to + string(k[len(from):])), bytes.Clone(v)})
		return nil
	}); err != nil {
		return err
	}
	if err := deleteTree(b, from); err != nil {
		return err
	}
	if err := deleteTree(b, to); err != nil {
		return err
	}
	for _, m := range moved {
		if err := b.Put(m.k, m.v); err != nil {
			return err
		}
	}
	return nil
}
