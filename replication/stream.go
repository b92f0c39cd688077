package replication

import (
	"context"
	"errors"
	"fmt"
	"io/fs"

	"github.com/tether-io/tether/proto/tetherpb"
)

// Streaming a full cut's large files (see DESIGN.md, "Consistent cuts",
// streamed files): the cut plans them but does not read them; each sender
// reads them from the volume while it sends them, hashing every block, so
// that reading, sending and the replica's writing overlap and the file
// never goes through the primary's spool. After the last item a barrier
// tells whether any event of the volume arrived since the cut's changes
// were taken. If none did, every file read during the stream still had its
// state of the cut, and the Commit follows. If one did, what the replica
// staged may be torn; the sender continues the batch with the cuts that
// carry those changes (sender.continueBatch) and commits it as the last of
// them. A replica that cannot take a continued batch (or a cut that is no
// longer kept) gets the old treatment: the batch is broken, the sender
// ends the stream before the Commit (the replica drops what it staged) and
// the replica gets a new full cut, read into the spool.

// errStreamChanged says the volume changed while a cut's large files were
// streamed from it: the batch cannot be committed as the cut it stands for.
var errStreamChanged = errors.New("the volume changed while the cut's large files were streamed from it; sending a new cut")

// streamChangedError says that the volume changed while a batch's lazy
// files were streamed: by the barrier after the stream its event count was
// gen. st is what was streamed, for the index once the batch is continued.
type streamChangedError struct {
	gen uint64
	st  *streamed
}

func (e *streamChangedError) Error() string { return errStreamChanged.Error() }
func (e *streamChangedError) Unwrap() error { return errStreamChanged }

// streamed is what a sender learned while streaming a batch's lazy files:
// their index entries (with the hashes of what it sent).
type streamed struct {
	entries map[string]*indexEntry
}

// sendFile reads lazy item it from the volume and sends it: whole, or as a
// delta against the replica's copy when sums (its block hashes) is known.
func (st *streamed) sendFile(p *Primary, b *cutBatch, send sendFunc, it item, sums *tetherpb.FileSums) error {
	if hook := p.onStreamChunk; hook != nil {
		next := send
		send = func(m *tetherpb.StreamRequest) error {
			err := next(m)
			hook(b.seq)
			return err
		}
	}
	res, err := sendFile(p.root, send, it.rel, it.lazy, p.warn,
		fileOpts{base: sumsBase(sums, it.lazy), enc: b.sp.enc, pool: p.chunks, file: b.sp.held[it.rel]})
	if err != nil {
		return err
	}
	// A file that changed while it was read needs nothing more: the
	// write's event reaches the barrier after the stream (or the write was
	// still in flight then, which a crash would capture as well).
	if !res.sent || res.entry == nil || res.nlink > 1 {
		// Replaced or removed (not held open), shrunk or linked since the
		// cut: not its state.
		b.broken.Store(true)
		return fmt.Errorf("stream %q: %w", it.rel, errStreamChanged)
	}
	if res.nlink == 1 {
		st.entries[it.rel] = res.entry
	} // else removed since the cut, read through the file held open: its event brings the removal
	return nil
}

// check takes a barrier after the lazy files were sent: the batch holds the
// cut only if the volume's event count is still the cut's (else a
// *streamChangedError). It then records the files streamed in the index.
func (st *streamed) check(ctx context.Context, p *Primary, b *cutBatch) error {
	gen, _, err := p.barrier(ctx)
	if err != nil {
		return err
	}
	if gen != b.gen {
		return &streamChangedError{gen: gen, st: st}
	}
	return st.index(p)
}

// index puts the entries of the files streamed into the index in place of
// the cut's stat-only ones, unless a later cut replaced those meanwhile
// (its reading is newer). After a continued batch, the entries a later
// cut did not replace are files that did not change while they were
// streamed: what was sent is their state.
func (st *streamed) index(p *Primary) error {
	p.cutMu.Lock()
	defer p.cutMu.Unlock()
	if err := p.idx.apply(&indexUpdate{fills: st.entries}); err != nil {
		return fmt.Errorf("record streamed files in the block index: %w", err)
	}
	return nil
}

// sumsBase is the index entry a lazy file planned as fi is sent as a delta
// against, from the replica's block hashes of its copy (nil: send it
// whole). deltaBase accepts it only for the same single-linked inode.
func sumsBase(sums *tetherpb.FileSums, fi fs.FileInfo) *indexEntry {
	if sums == nil {
		return nil
	}
	k, _ := inodeOf(fi)
	e := &indexEntry{kind: kindFile, ino: k.ino, dev: k.dev, nlink: 1, size: int64(sums.GetSize()),
		mtime: sums.GetMtimeUnixNano(), hashes: sums.GetHashes()}
	for k := 0; k+1 < len(sums.GetExtents()); k += 2 {
		e.exts = append(e.exts, extent{int64(sums.GetExtents()[k]), int64(sums.GetExtents()[k+1])})
	}
	return e
}
