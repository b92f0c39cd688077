package replication

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"slices"
	"syscall"

	"github.com/klauspost/compress/zstd"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tether-io/tether/proto/tetherpb"
)

// Limits of one BlockSums call.
const (
	maxSumsPaths = 4096
	// maxSumsBytes bounds the hashes of one response (well below gRPC's
	// 4 MiB message limit).
	maxSumsBytes = 2 << 20
)

// BlockSums answers, for the paths asked, the block hashes of the
// single-linked regular files this replica holds there. Only the primary of
// the volume's active stream may ask (same epoch); paths are confined to
// the volume like every path a peer sends.
func (s *Server) BlockSums(ctx context.Context, req *tetherpb.BlockSumsRequest) (*tetherpb.BlockSumsResponse, error) {
	if !s.enter() {
		return nil, status.Error(codes.Unavailable, errServerClosing.Error())
	}
	defer s.wg.Done()
	bs := int64(req.GetBlockSize())
	if bs < minBlockSize || bs > maxBlockSize || len(req.GetPaths()) > maxSumsPaths {
		return nil, status.Errorf(codes.InvalidArgument, "block sums: block size %d (want %d to %d), %d paths (at most %d)",
			bs, minBlockSize, maxBlockSize, len(req.GetPaths()), maxSumsPaths)
	}
	rels := make([]string, len(req.GetPaths()))
	for i, raw := range req.GetPaths() {
		p, err := checkPath(raw, false)
		if err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "block sums: %v", err)
		}
		rels[i] = p
	}
	paths, err := s.cfg.Resolve(req.GetVolume())
	if err != nil {
		return nil, status.Errorf(codes.NotFound, "volume %q: %v", req.GetVolume(), err)
	}
	v := s.volume(req.GetVolume())
	// The checks hold the volume's lock; the hashing does not (it can read
	// gigabytes, and a Fence must not wait for it): the stream asked for
	// must still be the active one when the answer is given.
	active := func() (*inbound, error) {
		v.mu.Lock()
		defer v.mu.Unlock()
		newest, err := readEpoch(paths.State)
		if err != nil {
			return nil, status.Error(codes.Internal, err.Error())
		}
		if v.active == nil || v.active.epoch != req.GetEpoch() || req.GetEpoch() < newest {
			return nil, status.Errorf(codes.FailedPrecondition, "block sums of volume %s: no replication stream of epoch %d is active",
				req.GetVolume(), req.GetEpoch())
		}
		return v.active, nil
	}
	act, err := active()
	if err != nil {
		return nil, err
	}
	resp := &tetherpb.BlockSumsResponse{}
	if was, err := readPrimaryEpoch(paths.State); err != nil || (was != 0 && was < req.GetEpoch()) {
		// A former primary: what it wrote goes to quarantine before the
		// first batch; nothing it holds is a base.
		resp.Answered = uint32(len(rels))
		return resp, nil
	}
	if err := s.hashFiles(ctx, paths, rels, bs, resp); err != nil {
		return nil, err
	}
	if now, err := active(); err != nil {
		return nil, err
	} else if now != act {
		return nil, status.Errorf(codes.FailedPrecondition,
			"block sums of volume %s: the stream of epoch %d was replaced while the replica hashed its files", req.GetVolume(), req.GetEpoch())
	}
	return resp, nil
}

// hashFiles adds to resp the block sums of the files at rels, as many as
// fit in one response.
func (s *Server) hashFiles(ctx context.Context, paths Paths, rels []string, bs int64, resp *tetherpb.BlockSumsResponse) error {
	root, err := os.OpenRoot(paths.Data)
	if err != nil {
		return status.Errorf(codes.Internal, "open volume data directory: %v", err)
	}
	defer root.Close()
	budget := maxSumsBytes
	for _, p := range rels {
		if ctx.Err() != nil {
			return status.FromContextError(ctx.Err()).Err()
		}
		if s.sumsHook != nil {
			s.sumsHook(p)
		}
		need := sumsSize(root, p, bs)
		if need > budget && resp.Answered > 0 {
			break // the next call answers it
		}
		if need > 0 && need <= budget { // larger files are sent whole
			sums, err := fileSums(root, p, bs)
			if err != nil {
				return status.Errorf(codes.Internal, "block sums of %q: %v", p, err)
			}
			if sums != nil {
				resp.Files = append(resp.Files, sums)
				budget -= len(sums.GetHashes()) + 16*len(sums.GetExtents())
			}
		}
		resp.Answered++
	}
	return nil
}

// sumsSize returns the size of the hashes of the regular file at p (0 when
// there is none).
func sumsSize(root *os.Root, p string, bs int64) int {
	fi, ok, err := lstatReal(root, p)
	if err != nil || !ok || !fi.Mode().IsRegular() {
		return 0
	}
	return int(min(blockCount(fi.Size(), bs)*hashLen, maxSumsBytes+1))
}

// fileSums hashes the single-linked regular file at p; nil when there is
// none there.
func fileSums(root *os.Root, p string, bs int64) (*tetherpb.FileSums, error) {
	if _, ok, err := lstatReal(root, p); err != nil || !ok {
		return nil, err
	}
	f, err := root.OpenFile(p, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, nil // not a file we can read as the primary's base
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	e := indexEntryOf(fi, fi.ModTime())
	if e.kind != kindFile || e.nlink != 1 || blockCount(e.size, bs)*hashLen > maxSumsBytes {
		return nil, nil
	}
	hashes, err := hashFile(f, e.size, bs)
	if err != nil {
		return nil, err
	}
	exts, err := dataExtents(f, e.size)
	if err != nil {
		return nil, err
	}
	sums := &tetherpb.FileSums{Path: []byte(p), Size: uint64(e.size), MtimeUnixNano: e.mtime, Hashes: hashes}
	for _, x := range exts {
		sums.Extents = append(sums.Extents, uint64(x.off), uint64(x.n))
	}
	return sums, nil
}

// blockSums asks the replica which blocks it holds of the files of a full
// cut (single-linked ones the cut read completely). It returns nil when
// the replica cannot tell (the cut is then sent whole).
func (s *sender) blockSums(ctx context.Context, client tetherpb.ReplicationClient, b *cutBatch) map[string]*tetherpb.FileSums {
	var ask [][]byte
	for rel := range b.sp.files {
		if e := b.sp.entries[rel]; e != nil && e.nlink == 1 {
			ask = append(ask, []byte(rel))
		}
	}
	for rel := range b.sp.lazy {
		ask = append(ask, []byte(rel))
	}
	slices.SortFunc(ask, bytes.Compare)
	out := map[string]*tetherpb.FileSums{}
	for len(ask) > 0 {
		req := &tetherpb.BlockSumsRequest{Volume: s.p.cfg.Volume, Epoch: s.p.cfg.Epoch, BlockSize: blockSize,
			Paths: ask[:min(len(ask), maxSumsPaths)]}
		resp, err := client.BlockSums(ctx, req)
		if err == nil && (resp.GetAnswered() == 0 || int(resp.GetAnswered()) > len(req.Paths)) {
			err = fmt.Errorf("answered %d of %d paths", resp.GetAnswered(), len(req.Paths))
		}
		if err != nil {
			s.log.Warn("the replica did not say which blocks it holds; sending it every file whole", "err", err)
			return nil
		}
		for _, f := range resp.GetFiles() {
			if len(f.GetHashes())%hashLen == 0 && int64(len(f.GetHashes())) == blockCount(int64(f.GetSize()), blockSize)*hashLen &&
				len(f.GetExtents())%2 == 0 {
				out[string(f.GetPath())] = f
			}
		}
		ask = ask[resp.GetAnswered():]
	}
	return out
}

// sumsFilter passes a full cut's ops on, sending each file the replica
// already holds (per its block sums) as a delta against its copy: only the
// blocks whose hashes differ, and a Delta naming the copy as the base.
type sumsFilter struct {
	next sendFunc
	sums map[string]*tetherpb.FileSums
	sp   *spool // the cut's spool: index entries and block hashes
	dec  *zstd.Decoder

	cur     string
	base    *tetherpb.FileSums
	changed []uint64 // blocks to send of the current file (nil base: send whole)
}

func (f *sumsFilter) close() {
	if f.dec != nil {
		f.dec.Close()
	}
}

func (f *sumsFilter) send(m *tetherpb.StreamRequest) error {
	op := m.GetOp()
	if op.GetKind() != tetherpb.FileOp_KIND_FILE {
		return f.next(m)
	}
	if rel := string(op.GetPath()); rel != f.cur {
		if err := f.start(rel); err != nil {
			return err
		}
	}
	if f.base == nil {
		return f.next(m)
	}
	if !op.GetMore() {
		f.cur = ""
		op.Delta = &tetherpb.Delta{BaseSize: f.base.GetSize(), BaseMtimeUnixNano: f.base.GetMtimeUnixNano(),
			BaseDigest: digestOf(f.base.GetHashes()), BlockSize: blockSize, Blocks: f.changed}
		return sendOp(f.next, op)
	}
	return f.chunk(op)
}

// start computes which blocks of file rel the replica lacks.
func (f *sumsFilter) start(rel string) error {
	f.cur, f.base, f.changed = rel, nil, nil
	base, e := f.sums[rel], f.sp.entries[rel]
	if base == nil || e == nil || e.nlink != 1 {
		return nil
	}
	hashes, err := f.sp.hashesOf(rel)
	if err != nil || hashes == nil {
		return err
	}
	have := base.GetHashes()
	var haveExts []extent
	for k := 0; k+1 < len(base.GetExtents()); k += 2 {
		haveExts = append(haveExts, extent{int64(base.GetExtents()[k]), int64(base.GetExtents()[k+1])})
	}
	ei, hi := 0, 0
	for i := int64(0); i*hashLen < int64(len(hashes)); i++ {
		h := hashes[i*hashLen : (i+1)*hashLen]
		bs, be := i*blockSize, min((i+1)*blockSize, e.size)
		if (i+1)*hashLen > int64(len(have)) || !bytes.Equal(have[i*hashLen:(i+1)*hashLen], h) ||
			layoutMoved(clip(e.exts, &ei, bs, be), clip(haveExts, &hi, bs, be)) {
			f.changed = append(f.changed, uint64(i))
		}
	}
	f.base = base
	return nil
}

// chunk sends the parts of a chunk that fall in changed blocks.
func (f *sumsFilter) chunk(op *tetherpb.FileOp) error {
	off := int64(op.GetOffset())
	data := op.GetData()
	if op.GetZstd() {
		if f.dec == nil {
			d, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1))
			if err != nil {
				return fmt.Errorf("create zstd decoder: %w", err)
			}
			f.dec = d
		}
		var err error
		if data, err = f.dec.DecodeAll(data, nil); err != nil {
			return fmt.Errorf("decode spooled chunk of %q: %w", f.cur, err)
		}
	}
	end := off + int64(len(data))
	all := true
	var parts []extent
	for blk := off / blockSize; blk*blockSize < end; blk++ {
		s, e := max(blk*blockSize, off), min((blk+1)*blockSize, end)
		if _, ok := slices.BinarySearch(f.changed, uint64(blk)); !ok {
			all = false
			continue
		}
		if k := len(parts); k > 0 && parts[k-1].off+parts[k-1].n == s {
			parts[k-1].n += e - s
		} else {
			parts = append(parts, extent{s, e - s})
		}
	}
	if all {
		return sendOp(f.next, op)
	}
	for _, p := range parts {
		if err := sendOp(f.next, &tetherpb.FileOp{Kind: tetherpb.FileOp_KIND_FILE, Path: op.GetPath(),
			Data: data[p.off-off : p.off-off+p.n], Offset: uint64(p.off), More: true}); err != nil {
			return err
		}
	}
	return nil
}
