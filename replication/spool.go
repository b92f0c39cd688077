package replication

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"slices"
	"sync/atomic"
	"time"

	"github.com/klauspost/compress/zstd"
	"google.golang.org/protobuf/proto"

	"github.com/tether-io/tether/proto/tetherpb"
)

// spool holds what a cut read from the volume: small ops in memory, file
// contents (as encoded FILE ops) in an unlinked temporary file in the
// primary's state directory. A path read again in a later round of the cut
// replaces its earlier reading.
type spool struct {
	f     *os.File
	end   int64
	small map[string][]*tetherpb.FileOp // directories, symlinks, fifos
	files map[string]fileRead
	// entries are the index entries of what was read (nil: a file read
	// incompletely, which the index forgets). A file's block hashes are
	// kept in the spool file (hashAt), not in memory.
	entries map[string]*indexEntry
	hashAt  map[string]extent
	enc     *zstd.Encoder // compresses file chunks; nil: none
	// lazy holds the large files of a full cut that are not read into the
	// spool: each sender reads them while it streams them (see streamed).
	// stream says whether read may leave files lazy.
	lazy map[string]fs.FileInfo
	// held holds lazy files open, as the cut planned them (up to
	// maxHeldLazy): a sender reads them even when they were renamed or
	// removed since, which a later cut of a continued batch then carries.
	held      map[string]*os.File
	stream    bool
	streamMin int64  // the smallest file streamed
	reads     uint64 // files read so far (fileRead.seq)
	// torn holds the files whose last reading is no state the file had
	// as a whole: it came up short (a truncation, whose event can reach the
	// watcher after a barrier created once it was visible, so no barrier
	// vouches for such a reading), or the file changed while it was read
	// (its stat after the read differs). The cut reads them again.
	torn map[string]bool
	// onChunk, in tests only, runs after each chunk of a file read into
	// the spool that is not its last, with the chunk's offset
	// (Primary.onSpoolChunk).
	onChunk func(rel string, off uint64)
}

// defaultStreamMin is the smallest file a full cut streams from the volume
// instead of spooling it.
const defaultStreamMin = 16 << 20

// streamed reports whether read leaves regular file fi lazy: in a full cut,
// a large single-linked file.
func (s *spool) streamed(fi fs.FileInfo) bool {
	if !s.stream || !fi.Mode().IsRegular() || fi.Size() < s.streamMin {
		return false
	}
	_, n := inodeOf(fi)
	return n == 1
}

// fileRead locates a file's encoded ops in the spool file.
type fileRead struct {
	off, n int64
	key    inodeKey
	nlink  uint64
	seq    uint64 // order of the reading in the cut
}

func newSpool(dir string) (*spool, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create spool directory: %w", err)
	}
	f, err := os.CreateTemp(dir, "cut-*")
	if err != nil {
		return nil, fmt.Errorf("create spool: %w", err)
	}
	_ = os.Remove(f.Name()) // lives as long as the open file
	return &spool{f: f, small: map[string][]*tetherpb.FileOp{}, files: map[string]fileRead{},
		entries: map[string]*indexEntry{}, hashAt: map[string]extent{}, lazy: map[string]fs.FileInfo{},
		held: map[string]*os.File{}, torn: map[string]bool{}}, nil
}

func (s *spool) close() {
	_ = s.f.Close()
	for rel := range s.held {
		s.release(rel)
	}
}

// maxHeldLazy bounds the lazy files a cut holds open; the others are
// opened by name when sent (a stream breaks when one of those is gone).
const maxHeldLazy = 1024

// hold opens lazy file rel, planned as fi, and keeps it open for the
// senders. It reports false when rel is no longer fi (its event brings it
// again).
func (s *spool) hold(root *os.Root, rel string, fi fs.FileInfo) (bool, error) {
	if len(s.held) >= maxHeldLazy {
		return true, nil
	}
	f, err := openPlanned(root, rel)
	if f == nil {
		return false, err
	}
	if st, err := f.Stat(); err != nil || !os.SameFile(st, fi) {
		_ = f.Close()
		return false, err
	}
	s.held[rel] = f
	return true, nil
}

// release closes the lazy file held for rel, if any.
func (s *spool) release(rel string) {
	if f, ok := s.held[rel]; ok {
		_ = f.Close()
		delete(s.held, rel)
	}
}

// indexUpdate is what the cut of plan p changes in the index.
func (s *spool) indexUpdate(p *plan, reset bool) (*indexUpdate, error) {
	u := &indexUpdate{reset: reset, renames: p.renames, puts: map[string]*indexEntry{}}
	for rel := range p.deletes {
		u.deletes = append(u.deletes, rel)
	}
	carriers := s.carriers(p)
	for _, m := range []map[string]fs.FileInfo{p.dirs, p.others} {
		for rel := range m {
			src := rel
			if fr, ok := s.files[rel]; ok && fr.nlink > 1 {
				src = carriers[fr.key] // the names of one inode hold what it carries
			}
			e, ok := s.entries[src]
			if !ok {
				continue
			}
			if e != nil && e.kind == kindFile {
				h, err := s.hashesOf(src)
				if err != nil {
					return nil, err
				}
				c := *e
				c.hashes = h
				e = &c
			}
			u.puts[rel] = e
		}
	}
	// A lazy file's entry is its stat alone until its sender streams it
	// (see streamed.check): a rescan then takes it as carried, and a delta
	// cannot build on it (no hashes: the file goes whole).
	for rel, fi := range s.lazy {
		if _, ok := p.others[rel]; ok {
			u.puts[rel] = statOnlyEntry(fi)
		}
	}
	return u, nil
}

// hashesOf reads the block hashes of file rel from the spool file.
func (s *spool) hashesOf(rel string) ([]byte, error) {
	at, ok := s.hashAt[rel]
	if !ok {
		return nil, nil
	}
	h := make([]byte, at.n)
	if _, err := s.f.ReadAt(h, at.off); err != nil {
		return nil, fmt.Errorf("read spool: %w", err)
	}
	return h, nil
}

// write appends one op to the spool file, length-prefixed.
func (s *spool) write(m *tetherpb.StreamRequest) error {
	b, err := proto.Marshal(m.GetOp())
	if err != nil {
		return fmt.Errorf("encode spooled op: %w", err)
	}
	rec := binary.AppendUvarint(make([]byte, 0, len(b)+binary.MaxVarintLen64), uint64(len(b)))
	rec = append(rec, b...)
	if _, err := s.f.WriteAt(rec, s.end); err != nil {
		return fmt.Errorf("write spool: %w", err)
	}
	s.end += int64(len(rec))
	return nil
}

// read reads the plan's fresh entries into the spool.
func (s *spool) read(root *os.Root, p *plan, warn *onceLogger) error {
	for rel := range p.fresh {
		delete(s.small, rel)
		delete(s.files, rel)
		delete(s.entries, rel)
		delete(s.hashAt, rel)
		delete(s.lazy, rel)
		s.release(rel)
		delete(s.torn, rel)
		if fi, ok := p.dirs[rel]; ok {
			if err := sendDir(root, s.collect(rel), rel, fi, warn); err != nil {
				return err
			}
			if len(s.small[rel]) > 0 {
				s.entries[rel] = indexEntryOf(fi, time.Unix(0, 0))
			}
			continue
		}
		fi, ok := p.others[rel]
		if !ok {
			continue
		}
		var err error
		if fi.Mode().Type() != 0 {
			s.entries[rel] = indexEntryOf(fi, time.Unix(0, 0)) // for renames only: never taken as unchanged
		}
		switch fi.Mode().Type() {
		case fs.ModeSymlink:
			err = sendSymlink(root, s.collect(rel), rel, fi)
			if len(s.small[rel]) == 0 {
				delete(s.entries, rel) // gone since planned: not sent, not held
			}
		case fs.ModeNamedPipe:
			uid, gid := ownerOf(fi)
			s.small[rel] = []*tetherpb.FileOp{{Kind: tetherpb.FileOp_KIND_FIFO, Path: []byte(rel),
				Mode: toWireMode(fi.Mode()), MtimeUnixNano: fi.ModTime().UnixNano(), Uid: uid, Gid: gid}}
		case 0:
			if s.streamed(fi) {
				held, err := s.hold(root, rel, fi)
				if err != nil {
					return err
				}
				if held {
					s.lazy[rel] = fi
				}
				continue
			}
			fallthrough
		default:
			start := s.end
			var base *indexEntry
			if base, err = p.baseFor(rel); err != nil {
				return err
			}
			send := s.write
			if hook := s.onChunk; hook != nil {
				send = func(m *tetherpb.StreamRequest) error {
					err := s.write(m)
					if m.GetOp().GetMore() {
						hook(rel, m.GetOp().GetOffset())
					}
					return err
				}
			}
			res, ferr := sendFile(root, send, rel, fi, warn, fileOpts{base: base, enc: s.enc})
			if res.sent {
				s.reads++
				s.files[rel] = fileRead{off: start, n: s.end - start, key: res.key, nlink: res.nlink, seq: s.reads}
				s.entries[rel] = res.entry
				if res.entry != nil && ferr == nil {
					ferr = s.putHashes(rel, res.entry)
				}
				if res.torn() {
					s.torn[rel] = false
				}
			}
			err = ferr
		}
		if err != nil {
			return err
		}
	}
	clear(p.fresh)
	return nil
}

// exclude leaves out of the cut the files whose every reading was torn
// (single-linked ones: the names of a linked file travel together), unless
// runs (the files left out of the cuts before, and how many in a row)
// shows one was left out maxExclusions times already: the index keeps
// their previous entry, which the replicas hold, and they are marked dirty
// again for the next cut. runs is updated; it returns how many it left
// out.
func (s *spool) exclude(ch *changes, runs map[string]int) int {
	now := time.Now()
	left := map[string]int{}
	for rel := range s.torn {
		fr, ok := s.files[rel]
		if !ok || fr.nlink > 1 || runs[rel] >= maxExclusions {
			continue
		}
		delete(s.files, rel)
		delete(s.entries, rel)
		delete(s.hashAt, rel)
		delete(s.torn, rel)
		ch.add(rel, false, now)
		left[rel] = runs[rel] + 1
	}
	clear(runs)
	maps.Copy(runs, left)
	return len(left)
}

// carried reports whether the cut read rel (it goes in the batch).
func (s *spool) carried(rel string) bool {
	_, file := s.files[rel]
	_, lazy := s.lazy[rel]
	return file || lazy || len(s.small[rel]) > 0
}

// putHashes moves a file's block hashes from its entry to the spool file.
func (s *spool) putHashes(rel string, e *indexEntry) error {
	if _, err := s.f.WriteAt(e.hashes, s.end); err != nil {
		return fmt.Errorf("write spool: %w", err)
	}
	s.hashAt[rel] = extent{s.end, int64(len(e.hashes))}
	s.end += int64(len(e.hashes))
	e.hashes = nil
	return nil
}

// collect returns a sendFunc keeping the ops of rel in memory (only for
// ops that own their buffers: directories and symlinks).
func (s *spool) collect(rel string) sendFunc {
	return func(m *tetherpb.StreamRequest) error {
		s.small[rel] = append(s.small[rel], m.GetOp())
		return nil
	}
}

// item is one part of a batch: an op, a range of the spool file, or a
// file read from the volume while it is sent (lazy, as planned).
type item struct {
	op     *tetherpb.FileOp
	off, n int64
	rel    string      // lazy: the file's path
	lazy   fs.FileInfo // lazy: the file as planned
}

// items orders the batch: renames (in the order found), deletes, then directories shallow to deep, then
// files, symlinks and fifos. Of the names of a hard-linked file, the first
// carries the contents and the others become HARDLINK ops.
func (s *spool) items(p *plan) []item {
	out := []item{} // never nil: an empty delta view is still one
	for _, r := range p.renames {
		out = append(out, item{op: &tetherpb.FileOp{Kind: tetherpb.FileOp_KIND_RENAME, Path: []byte(r.from), NewPath: []byte(r.to)}})
	}
	dels := make([]string, 0, len(p.deletes))
	for rel := range p.deletes {
		dels = append(dels, rel)
	}
	slices.Sort(dels)
	for _, rel := range dels {
		out = append(out, item{op: &tetherpb.FileOp{Kind: tetherpb.FileOp_KIND_DELETE, Path: []byte(rel)}})
	}
	for _, rel := range sortedDirs(p.dirs) {
		for _, op := range s.small[rel] {
			out = append(out, item{op: op})
		}
	}
	others := make([]string, 0, len(p.others))
	for rel := range p.others {
		others = append(others, rel)
	}
	slices.Sort(others)
	carriers := s.carriers(p)
	var links []item
	for _, rel := range others {
		for _, op := range s.small[rel] {
			out = append(out, item{op: op})
		}
		if fi, ok := s.lazy[rel]; ok {
			out = append(out, item{rel: rel, lazy: fi})
			continue
		}
		fr, ok := s.files[rel]
		if !ok {
			continue
		}
		if fr.nlink > 1 {
			if to := carriers[fr.key]; to != rel {
				links = append(links, item{op: &tetherpb.FileOp{Kind: tetherpb.FileOp_KIND_HARDLINK, Path: []byte(rel), HardlinkTo: []byte(to)}})
				continue
			}
		}
		out = append(out, item{off: fr.off, n: fr.n})
	}
	return append(out, links...)
}

// carriers returns, for each hard-linked inode of the plan, the name whose
// reading the batch carries: the last read. The names share one inode, so
// the newest reading is what every name holds; one read in an earlier
// round (a write through another name since) would carry stale contents
// or metadata to all of them.
func (s *spool) carriers(p *plan) map[inodeKey]string {
	out := map[inodeKey]string{}
	seq := map[inodeKey]uint64{}
	for rel := range p.others {
		fr, ok := s.files[rel]
		if !ok || fr.nlink <= 1 {
			continue
		}
		if fr.seq > seq[fr.key] {
			out[fr.key], seq[fr.key] = rel, fr.seq
		}
	}
	return out
}

// cutBatch is one cut: read once, sent to every replica that needs it.
type cutBatch struct {
	seq      uint64
	full     bool
	cut      time.Time // the instant the batch stands for (its barrier)
	fileOnly bool      // not crash-consistent: see Commit.file_consistent_only
	since    time.Time // oldest change it carries
	sp       *spool
	items    []item
	// delta, for a full cut taken because a replica needed the whole tree,
	// is what the replicas at the previous cut need (nil: they take items).
	delta []item
	// bytes and deltaBytes are the encoded sizes of items and delta (a
	// streamed file counts its size); spooled is what the cut holds in
	// its spool file, which the retention budget bounds.
	bytes, deltaBytes, spooled int64
	// gen is the volume's event count the cut stands for: a sender that
	// streamed lazy files checks that it did not move (see streamed).
	gen uint64
	// excluded counts the files left out of the cut because every reading
	// of them was torn (see spool.exclude): a continued batch does not end
	// with such a cut.
	excluded int
	// broken is set when the volume changed while a sender streamed the
	// batch's lazy files: no replica can take it any more.
	broken atomic.Bool
}

// itemBytes returns the encoded size of a batch's items.
func itemBytes(items []item) int64 {
	var n int64
	for _, it := range items {
		n += it.bytes()
	}
	return n
}

// spooledBytes is the encoded size of the items held in the spool (not
// the streamed files, read from the volume when sent).
func spooledBytes(items []item) int64 {
	var n int64
	for _, it := range items {
		if it.lazy == nil {
			n += it.bytes()
		}
	}
	return n
}

// bytes is the encoded size of an item (a streamed file counts its size).
func (it item) bytes() int64 {
	switch {
	case it.op != nil:
		return int64(proto.Size(it.op))
	case it.lazy != nil:
		return it.lazy.Size()
	}
	return it.n
}

// send streams the batch: the whole tree, or (full false on a full cut
// with a delta view) only what changed since the previous cut; it reports
// whether the batch went out whole. Lazy files are read from the volume
// while they are sent (as deltas against the replica's copy where sums has
// its block hashes); a barrier then checks that the volume did not change
// since the cut, else send fails with a *streamChangedError (see
// stream.go). The Commit is the caller's (commit).
//
// progress, if not nil, is told the encoded size of each item once sent
// (see itemBytes).
func (b *cutBatch) send(ctx context.Context, p *Primary, send sendFunc, full bool, sums map[string]*tetherpb.FileSums, progress func(int64)) (bool, error) {
	items := b.items
	if b.full && !full && b.delta != nil {
		items = b.delta
	} else {
		full = b.full
	}
	var st *streamed
	for _, it := range items {
		switch {
		case it.op != nil:
			if err := sendOp(send, it.op); err != nil {
				return full, err
			}
		case it.lazy != nil:
			if st == nil {
				st = &streamed{entries: map[string]*indexEntry{}}
			}
			if err := st.sendFile(p, b, send, it, sums[it.rel]); err != nil {
				return full, err
			}
		default:
			if err := b.sendRange(send, it.off, it.n); err != nil {
				return full, err
			}
		}
		if progress != nil {
			progress(it.bytes())
		}
	}
	if st != nil {
		if err := st.check(ctx, p, b); err != nil {
			return full, err
		}
	}
	return full, nil
}

// commit ends a batch sent as cut b (the last cut it was continued to, see
// sender.continueBatch): the replica makes it durable as cut b.
func (b *cutBatch) commit(send sendFunc, full bool) error {
	return send(&tetherpb.StreamRequest{Kind: &tetherpb.StreamRequest_Commit{Commit: &tetherpb.Commit{
		Seq: b.seq, CutUnixNano: b.cut.UnixNano(), Full: full, FileConsistentOnly: b.fileOnly}}})
}

// sendRange sends the ops spooled in [off, off+n).
func (b *cutBatch) sendRange(send sendFunc, off, n int64) error {
	end := off + n
	for off < end {
		var hdr [binary.MaxVarintLen64]byte
		k, err := b.sp.f.ReadAt(hdr[:min(int64(len(hdr)), end-off)], off)
		if err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("read spool: %w", err)
		}
		size, used := binary.Uvarint(hdr[:k])
		if used <= 0 || off+int64(used)+int64(size) > end {
			return errors.New("read spool: corrupt record")
		}
		buf := make([]byte, size)
		if _, err := b.sp.f.ReadAt(buf, off+int64(used)); err != nil {
			return fmt.Errorf("read spool: %w", err)
		}
		op := &tetherpb.FileOp{}
		if err := proto.Unmarshal(buf, op); err != nil {
			return fmt.Errorf("decode spool: %w", err)
		}
		if err := sendOp(send, op); err != nil {
			return err
		}
		off += int64(used) + int64(size)
	}
	return nil
}
