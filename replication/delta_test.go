package replication

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/tether-io/tether/internal/testutil"
	"github.com/tether-io/tether/proto/tetherpb"
)

// countStream is a client interceptor adding the encoded size of every
// message sent on a stream to n: the bytes on the wire less gRPC's framing.
func countStream(n *atomic.Int64) grpc.StreamClientInterceptor {
	return func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
		s, err := streamer(ctx, desc, cc, method, opts...)
		if err != nil {
			return nil, err
		}
		return &countingStream{ClientStream: s, n: n}, nil
	}
}

// countUnary is a client interceptor adding the encoded size of every
// unary request and response to n.
func countUnary(n *atomic.Int64) grpc.UnaryClientInterceptor {
	return func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		err := invoker(ctx, method, req, reply, cc, opts...)
		for _, m := range []any{req, reply} {
			if pm, ok := m.(proto.Message); ok {
				n.Add(int64(proto.Size(pm)))
			}
		}
		return err
	}
}

type countingStream struct {
	grpc.ClientStream
	n *atomic.Int64
}

func (s *countingStream) SendMsg(m any) error {
	if pm, ok := m.(proto.Message); ok {
		s.n.Add(int64(proto.Size(pm)))
	}
	return s.ClientStream.SendMsg(m)
}

// randomBytes returns n random bytes.
func randomBytes(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}

// writeAt overwrites part of a file in place.
func writeAt(t *testing.T, path string, off int64, data []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	must(t, err)
	_, err = f.WriteAt(data, off)
	must(t, errors.Join(err, f.Close()))
}

// fullSentTo returns how many full batches the primary sent to node.
func fullSentTo(p *Primary, node string) int {
	p.mu.Lock()
	s := p.senders[node]
	p.mu.Unlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.fullSent
}

// TestDeltaSendsChangedBlocks changes 1 MiB at an unaligned offset of an
// 8 MiB file (then grows and shrinks it): only the changed blocks cross
// the wire (within 1.1 x the change), and the replica equals the primary,
// without another full batch.
func TestDeltaSendsChangedBlocks(t *testing.T) {
	c := newTestCluster(t)
	c.startReplica("r1")
	big := c.path("big")
	must(t, os.WriteFile(big, randomBytes(8<<20), 0o644))
	p := c.startPrimary(1, "r1")
	c.waitSynced("r1")

	c.wire.Store(0)
	writeAt(t, big, 3<<20+12345, randomBytes(1<<20))
	c.waitSynced("r1")
	if n := c.wire.Load(); n > (1<<20)*11/10 || n < 1<<20 {
		t.Fatalf("a 1 MiB change sent %d bytes, want between 1 MiB and 1.1 MiB", n)
	}
	c.wire.Store(0)
	f, err := os.OpenFile(big, os.O_WRONLY|os.O_APPEND, 0)
	must(t, err)
	_, err = f.Write(randomBytes(100 << 10))
	must(t, errors.Join(err, f.Close()))
	c.waitSynced("r1")
	if n := c.wire.Load(); n > 200<<10 {
		t.Fatalf("appending 100 KiB sent %d bytes", n)
	}
	must(t, os.Truncate(big, 5<<20+7))
	c.waitSynced("r1")
	if n := fullSentTo(p, "r1"); n != 1 {
		t.Fatalf("full batches sent = %d, want only the initial one", n)
	}
}

// TestDeltaRefusedOnDivergedReplica changes the replica's copy behind the
// primary's back (same size and mtime): the next delta is refused and the
// primary sends the whole tree instead, which repairs the replica.
func TestDeltaRefusedOnDivergedReplica(t *testing.T) {
	c := newTestCluster(t)
	c.startReplica("r1")
	must(t, os.WriteFile(c.path("f"), randomBytes(1<<20), 0o644))
	p := c.startPrimary(1, "r1")
	c.waitSynced("r1")

	rf := filepath.Join(c.replicaPaths("r1").Data, "f")
	fi, err := os.Stat(rf)
	must(t, err)
	writeAt(t, rf, 700<<10, []byte("diverged"))
	must(t, os.Chtimes(rf, fi.ModTime(), fi.ModTime()))
	writeAt(t, c.path("f"), 10, []byte("changed on the primary"))
	c.waitSynced("r1")
	if n := fullSentTo(p, "r1"); n != 2 {
		t.Fatalf("full batches sent = %d, want 2 (the initial one, then one after the refused delta)", n)
	}
}

// TestIndexAfterPrimaryRestart restarts the primary: its first cut is full
// and rebuilds the index, after which changes travel as deltas again.
func TestIndexAfterPrimaryRestart(t *testing.T) {
	c := newTestCluster(t)
	c.startReplica("r1")
	must(t, os.WriteFile(c.path("f"), randomBytes(4<<20), 0o644))
	p := c.startPrimary(1, "r1")
	c.waitSynced("r1")
	p.Stop()
	writeAt(t, c.path("f"), 1<<20, randomBytes(4096)) // while no primary runs
	c.startPrimary(1, "r1")
	c.waitSynced("r1")
	c.wire.Store(0)
	writeAt(t, c.path("f"), 2<<20, randomBytes(4096))
	c.waitSynced("r1")
	if n := c.wire.Load(); n > 2*blockSize {
		t.Fatalf("a 4 KiB change after a restart sent %d bytes, want one block", n)
	}
}

// TestRenameDirectoryTravelsAsRename renames a directory of 5,000 files (one
// of them changed as well) and a large file: a few KiB cross the wire and
// the replica equals the primary.
func TestRenameDirectoryTravelsAsRename(t *testing.T) {
	c := newTestCluster(t)
	c.startReplica("r1")
	must(t, os.MkdirAll(c.path("dir/sub"), 0o755))
	for i := range 5000 {
		c.write(filepath.Join("dir", "sub"[:3*(i%2)], fmt.Sprintf("f%05d", i)), strings.Repeat("data", 64))
	}
	must(t, os.WriteFile(c.path("large"), randomBytes(2<<20), 0o644))
	p := c.startPrimary(1, "r1")
	// The initial sync of 5,000 files can take long on a loaded machine
	// under the race detector.
	testutil.EventuallyErr(t, time.Minute, func() error { return c.diff("r1") })

	c.wire.Store(0)
	must(t, os.Rename(c.path("dir"), c.path("moved")))
	must(t, os.Rename(c.path("large"), c.path("moved/large")))
	c.waitSynced("r1")
	if n := c.wire.Load(); n > 16<<10 {
		t.Fatalf("renaming a directory of 5,000 files and a 2 MiB file sent %d bytes", n)
	}
	c.wire.Store(0)
	must(t, os.Rename(c.path("moved"), c.path("again")))
	c.write("again/sub/f00001", "changed")
	must(t, os.Remove(c.path("again/f00000")))
	c.waitSynced("r1")
	if n := c.wire.Load(); n > 16<<10 {
		t.Fatalf("renaming the directory again (one file changed, one removed) sent %d bytes", n)
	}
	if n := fullSentTo(p, "r1"); n != 1 {
		t.Fatalf("full batches sent = %d, want only the initial one", n)
	}
}

// TestCompressedChunks sends a compressible file: it crosses the wire
// compressed and arrives intact.
func TestCompressedChunks(t *testing.T) {
	c := newTestCluster(t)
	c.startReplica("r1")
	c.startPrimary(1, "r1")
	c.waitSynced("r1")
	c.wire.Store(0)
	must(t, os.WriteFile(c.path("text"), bytes.Repeat([]byte("tether replicates volumes; "), 100000), 0o644))
	c.waitSynced("r1")
	if n := c.wire.Load(); n > 100000 {
		t.Fatalf("a compressible 2.7 MB file sent %d bytes", n)
	}
}

// TestDecompressionBounded sends a chunk that decompresses to more than a
// chunk may hold: the batch refuses it.
func TestDecompressionBounded(t *testing.T) {
	enc, err := zstd.NewWriter(nil)
	must(t, err)
	bomb := enc.EncodeAll(make([]byte, maxChunkData+1), nil)
	must(t, enc.Close())
	paths := replicaDirs(t)
	b := newBatch(filepath.Join(paths.State, stageDir))
	defer b.discard()
	err = b.add(&tetherpb.FileOp{Kind: tetherpb.FileOp_KIND_FILE, Path: []byte("f"), Data: bomb, Zstd: true, More: true})
	if !errors.Is(err, errBadBatch) {
		t.Fatalf("a chunk decompressing to %d bytes: %v, want refused", maxChunkData+1, err)
	}
	err = b.add(&tetherpb.FileOp{Kind: tetherpb.FileOp_KIND_FILE, Path: []byte("g"), Data: []byte("not zstd"), Zstd: true})
	if !errors.Is(err, errBadBatch) {
		t.Fatalf("a chunk that is not zstd: %v, want refused", err)
	}
}

// deltaOps reads the file at rel of dir as a cut would, against base (nil:
// whole), and returns its ops and index entry.
func deltaOps(t *testing.T, dir, rel string, base *indexEntry) ([]*tetherpb.FileOp, *indexEntry) {
	t.Helper()
	root, err := os.OpenRoot(dir)
	must(t, err)
	defer root.Close()
	fi, err := root.Lstat(rel)
	must(t, err)
	var ops []*tetherpb.FileOp
	send := func(m *tetherpb.StreamRequest) error {
		ops = append(ops, proto.Clone(m.GetOp()).(*tetherpb.FileOp))
		return nil
	}
	res, err := sendFile(root, send, rel, fi, newOnceLogger(testutil.Logger(t)), fileOpts{base: base})
	e, sent := res.entry, res.sent
	must(t, err)
	if !sent || e == nil {
		t.Fatal("file not read")
	}
	return ops, e
}

// TestDeltaJournalCrashAtEveryStep applies a batch with a rename and a
// delta (patched in place), crashing at every step: after recovery the
// replica holds the old cut or the new one.
func TestDeltaJournalCrashAtEveryStep(t *testing.T) {
	src := t.TempDir()
	old := randomBytes(1 << 20)
	must(t, os.WriteFile(filepath.Join(src, "f"), old, 0o644))
	old1, e1 := deltaOps(t, src, "f", nil)
	// The second cut: f renamed to g, changed in two places and grown.
	must(t, os.Rename(filepath.Join(src, "f"), filepath.Join(src, "g")))
	writeAt(t, filepath.Join(src, "g"), 5, []byte("changed"))
	writeAt(t, filepath.Join(src, "g"), 900<<10, randomBytes(300<<10))
	new2, _ := deltaOps(t, src, "g", e1)
	if d := new2[len(new2)-1].GetDelta(); d == nil || len(d.GetBlocks()) != 6 {
		t.Fatalf("delta = %v, want 6 blocks (1 at the start, 5 at the end)", d)
	}
	first := append([]*tetherpb.FileOp{mkdirOp(".", 0o755, 1)}, old1...)
	second := append([]*tetherpb.FileOp{{Kind: tetherpb.FileOp_KIND_RENAME, Path: []byte("f"), NewPath: []byte("g")},
		mkdirOp(".", 0o755, 2)}, new2...)

	run := crashRun{first: first, seq: 2, commit: func(j journal) error { return commitOps(t, j, 2, false, second) }}
	oldCut, newCut, steps, clean := run.clean(t)
	got, err := os.ReadFile(filepath.Join(clean.Data, "g"))
	must(t, err)
	want, err := os.ReadFile(filepath.Join(src, "g"))
	must(t, err)
	if !bytes.Equal(got, want) {
		t.Fatal("the patched file differs from the primary's")
	}
	for _, step := range steps {
		run.crashAt(t, step, oldCut, newCut)
	}
	t.Logf("%d crash points checked", len(steps))
}

// oneBlockDelta writes a 300 KiB file f in a new source directory and
// returns the ops of its first cut (whole) and of a second one after a
// byte of its second block changed (a delta).
func oneBlockDelta(t *testing.T) (src string, first, second []*tetherpb.FileOp) {
	t.Helper()
	src = t.TempDir()
	must(t, os.WriteFile(filepath.Join(src, "f"), randomBytes(300<<10), 0o644))
	first, e1 := deltaOps(t, src, "f", nil)
	writeAt(t, filepath.Join(src, "f"), 70<<10, []byte("x"))
	second, _ = deltaOps(t, src, "f", e1)
	return src, first, second
}

// TestDeltaRefusals checks the replica's validation of deltas: a full batch
// may not carry one, blocks must be in order and cover the data, and the
// base must be there.
func TestDeltaRefusals(t *testing.T) {
	src, ops1, ops2 := oneBlockDelta(t)
	last := ops2[len(ops2)-1]
	if got := last.GetDelta().GetBlocks(); len(got) != 1 || got[0] != 1 {
		t.Fatalf("blocks = %v, want [1]", got)
	}
	paths := replicaDirs(t)
	j := journal{paths: paths, warn: newOnceLogger(testutil.Logger(t))}
	must(t, commitOps(t, j, 1, true, append([]*tetherpb.FileOp{mkdirOp(".", 0o755, 1)}, ops1...)))

	commit := func(full bool, ops ...*tetherpb.FileOp) error {
		b := newBatch(j.stage())
		defer b.discard()
		for _, op := range ops {
			if err := b.add(op); err != nil {
				return err
			}
		}
		return j.commit(b, position{Epoch: 1, Seq: 9}, full)
	}
	with := func(mod func(d *tetherpb.Delta)) []*tetherpb.FileOp {
		out := make([]*tetherpb.FileOp, len(ops2))
		for i, op := range ops2 {
			out[i] = proto.Clone(op).(*tetherpb.FileOp)
		}
		mod(out[len(out)-1].Delta)
		return out
	}
	cases := []struct {
		name string
		full bool
		ops  []*tetherpb.FileOp
		want error
	}{
		{"a rename in a full batch", true, append([]*tetherpb.FileOp{{Kind: tetherpb.FileOp_KIND_RENAME, Path: []byte("f"), NewPath: []byte("g")}}, ops2...), errBadBatch},
		{"data outside the blocks", false, with(func(d *tetherpb.Delta) { d.Blocks = []uint64{2} }), errBadBatch},
		{"blocks out of order", false, with(func(d *tetherpb.Delta) { d.Blocks = []uint64{1, 1} }), errBadBatch},
		{"tiny block size", false, with(func(d *tetherpb.Delta) { d.BlockSize = 1 }), errBadBatch},
		{"other base digest", false, with(func(d *tetherpb.Delta) { d.BaseDigest = make([]byte, hashLen) }), errBaseMismatch},
		{"other base size", false, with(func(d *tetherpb.Delta) { d.BaseSize++ }), errBaseMismatch},
		{"base deleted before", false, append([]*tetherpb.FileOp{{Kind: tetherpb.FileOp_KIND_DELETE, Path: []byte("f")}}, ops2...), errBadBatch},
	}
	before, err := Manifest(paths.Data)
	must(t, err)
	for _, tc := range cases {
		if err := commit(tc.full, tc.ops...); !errors.Is(err, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.want)
		}
		after, err := Manifest(paths.Data)
		must(t, err)
		if d := DiffManifests(before, after); len(d) > 0 {
			t.Fatalf("%s: the refused batch changed the replica: %q", tc.name, d)
		}
	}
	must(t, commit(false, ops2...))
	got, err := os.ReadFile(filepath.Join(paths.Data, "f"))
	must(t, err)
	want, err := os.ReadFile(filepath.Join(src, "f"))
	must(t, err)
	if !bytes.Equal(got, want) {
		t.Fatal("the patched file differs from the primary's")
	}
}

// TestRenameScenarios replays tricky renames (into a new directory, nested,
// swaps, over an empty directory, a directory moved below a new one of its
// old name, renames racing writes): after each the replica equals the
// primary, and no batch was refused (no second full batch).
func TestRenameScenarios(t *testing.T) {
	c := newTestCluster(t)
	c.startReplica("r1")
	big := randomBytes(1 << 20)
	must(t, os.WriteFile(c.path("a"), big, 0o644))
	for _, d := range []string{"dir1/sub/deep", "d/x", "dirA/k", "dirB", "x"} {
		must(t, os.MkdirAll(c.path(d), 0o755))
	}
	for _, f := range []string{"dir1/f", "dir1/sub/g", "dir1/sub/deep/h", "d/x/i", "dirA/k/l", "x/m", "f", "g"} {
		c.write(f, f+" contents")
	}
	p := c.startPrimary(1, "r1")
	c.waitSynced("r1")
	steps := []struct {
		name string
		do   func()
	}{
		{"into a new directory", func() {
			must(t, os.Mkdir(c.path("Y"), 0o755))
			must(t, os.Rename(c.path("a"), c.path("Y/a")))
		}},
		{"nested", func() {
			must(t, os.Rename(c.path("dir1"), c.path("dir2")))
			must(t, os.Rename(c.path("dir2/sub"), c.path("dir3")))
		}},
		{"swap", func() {
			must(t, os.Rename(c.path("f"), c.path("g.tmp")))
			must(t, os.Rename(c.path("g"), c.path("f")))
			must(t, os.Rename(c.path("g.tmp"), c.path("g")))
		}},
		{"over an empty directory", func() { must(t, syscall.Rename(c.path("dirA"), c.path("dirB"))) }},
		{"below a new directory of its old name", func() {
			must(t, os.Rename(c.path("d"), c.path("e")))
			must(t, os.Mkdir(c.path("d"), 0o755))
			must(t, os.Rename(c.path("e"), c.path("d/e")))
		}},
		{"then written", func() {
			must(t, os.Rename(c.path("x"), c.path("y")))
			c.write("y/new", "new")
			c.write("y/m", "changed")
			writeAt(t, c.path("Y/a"), 5, []byte("changed"))
			must(t, os.Rename(c.path("Y/a"), c.path("Y/b")))
		}},
		{"removed and recreated elsewhere", func() {
			must(t, os.Remove(c.path("Y/b")))
			must(t, os.WriteFile(c.path("Y/c"), big, 0o644))
		}},
	}
	for _, s := range steps {
		s.do()
		testutil.EventuallyErr(t, 15*time.Second, func() error {
			if err := c.diff("r1"); err != nil {
				return fmt.Errorf("%s: %w", s.name, err)
			}
			return nil
		})
	}
	if n := fullSentTo(p, "r1"); n != 1 {
		t.Fatalf("full batches sent = %d, want only the initial one", n)
	}
}

// TestFullResyncSendsMissingBlocks restarts the primary after changing a
// large file, adding one and removing another while it was down: the full
// cut it starts with asks the replica which blocks it holds and sends only
// the others (counting the BlockSums call), and the replica equals the
// primary.
func TestFullResyncSendsMissingBlocks(t *testing.T) {
	c := newTestCluster(t)
	c.startReplica("r1")
	must(t, os.WriteFile(c.path("big"), randomBytes(4<<20), 0o644))
	must(t, os.Mkdir(c.path("small"), 0o755))
	for i := range 100 {
		must(t, os.WriteFile(c.path(fmt.Sprintf("small/%03d", i)), randomBytes(1024), 0o644))
	}
	p := c.startPrimary(1, "r1")
	c.waitSynced("r1")
	p.Stop()
	writeAt(t, c.path("big"), 1<<20+100, randomBytes(64<<10))
	must(t, os.WriteFile(c.path("new"), randomBytes(10<<10), 0o644))
	must(t, os.Remove(c.path("small/007")))
	c.wire.Store(0)
	c.startPrimary(1, "r1")
	c.waitSynced("r1")
	if n := c.wire.Load(); n > 200<<10 {
		t.Fatalf("a full resync of a replica missing 74 KiB sent %d bytes", n)
	} else {
		t.Logf("a full resync of a replica missing 74 KiB sent %d bytes", n)
	}
}

// replicaHoldingF starts replica r1 whose copy holds a 100 KiB file f.
func replicaHoldingF(t *testing.T) (*testCluster, *replicaNode, string) {
	c := newTestCluster(t)
	r := c.startReplica("r1")
	data := c.replicaPaths("r1").Data
	must(t, os.MkdirAll(data, 0o755))
	must(t, os.WriteFile(filepath.Join(data, "f"), randomBytes(100<<10), 0o644))
	return c, r, data
}

// TestBlockSumsRefusals asks a replica for block sums without an active
// stream of that epoch, with a path leaving the volume and with a bad block
// size: each is refused; a symlink and a missing path get no sums.
func TestBlockSumsRefusals(t *testing.T) {
	c, r, data := replicaHoldingF(t)
	must(t, os.Symlink("f", filepath.Join(data, "l")))
	ask := func(epoch uint64, bs uint32, paths ...string) (*tetherpb.BlockSumsResponse, error) {
		req := &tetherpb.BlockSumsRequest{Volume: testVolume, Epoch: epoch, BlockSize: bs}
		for _, p := range paths {
			req.Paths = append(req.Paths, []byte(p))
		}
		return r.srv.BlockSums(context.Background(), req)
	}
	if _, err := ask(1, blockSize, "f"); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("without a stream: %v, want FailedPrecondition", err)
	}
	_, err := openRaw(t, c, "r1", 2)
	must(t, err)
	if _, err := ask(1, blockSize, "f"); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("an older epoch than the stream's: %v, want FailedPrecondition", err)
	}
	if _, err := ask(2, blockSize, "../f"); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("a path leaving the volume: %v, want InvalidArgument", err)
	}
	if _, err := ask(2, 3, "f"); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("block size 3: %v, want InvalidArgument", err)
	}
	resp, err := ask(2, blockSize, "f", "l", "missing", "l/x")
	must(t, err)
	if resp.GetAnswered() != 4 || len(resp.GetFiles()) != 1 || string(resp.GetFiles()[0].GetPath()) != "f" ||
		len(resp.GetFiles()[0].GetHashes()) != 2*hashLen {
		t.Fatalf("sums = %v, want those of f only (2 blocks)", resp)
	}
}

// naiveBasePath is the specification of baseResolver.path: the origin
// of p, when it is the path before the batch.
func naiveBasePath(ops []applyOp, i int, p string) (string, bool) {
	q, _, how := naiveOrigin(ops, i, p)
	if how != fromBefore {
		return "", false
	}
	return q, true
}

// naiveOrigin is the specification of baseResolver.origin: walk the batch
// back from op i to the op that last set p, the rename that moved it away,
// or the start.
func naiveOrigin(ops []applyOp, i int, p string) (string, int, originKind) {
	for j := i - 1; j >= 0; j-- {
		o := ops[j]
		switch o.kind {
		case tetherpb.FileOp_KIND_RENAME:
			if isUnder(p, o.to) {
				p = o.path + p[len(o.to):]
				continue
			}
			if isUnder(p, o.path) {
				return p, j, movedAway
			}
		case tetherpb.FileOp_KIND_MKDIR:
			if p == o.path {
				return p, j, setBy
			}
		default:
			if isUnder(p, o.path) {
				return p, j, setBy
			}
		}
	}
	return p, -1, fromBefore
}

// TestBaseResolver compares baseResolver.path and origin with the naive
// walks on random batches over a few paths.
func TestBaseResolver(t *testing.T) {
	paths := []string{"a", "b", "a/b", "a/c", "b/a", "a/b/c", "c", "b/a/c"}
	kinds := []tetherpb.FileOp_Kind{tetherpb.FileOp_KIND_RENAME, tetherpb.FileOp_KIND_RENAME, tetherpb.FileOp_KIND_DELETE,
		tetherpb.FileOp_KIND_MKDIR, tetherpb.FileOp_KIND_FILE, tetherpb.FileOp_KIND_SYMLINK}
	var seed [32]byte
	rng := mrand.New(mrand.NewChaCha8(seed))
	for range 3000 {
		ops := make([]applyOp, 1+rng.IntN(8))
		for i := range ops {
			ops[i] = applyOp{kind: kinds[rng.IntN(len(kinds))], path: paths[rng.IntN(len(paths))], to: paths[rng.IntN(len(paths))]}
		}
		r := newBaseResolver(ops)
		for i := range ops {
			for _, p := range paths {
				wp, wok := naiveBasePath(ops, i, p)
				gp, gok := r.path(i, p)
				if wp != gp || wok != gok {
					t.Fatalf("ops %+v, op %d, path %q: got %q %v, want %q %v", ops, i, p, gp, gok, wp, wok)
				}
				wq, wat, whow := naiveOrigin(ops, i, p)
				gq, gat, ghow := r.origin(i, p)
				if wq != gq || wat != gat || whow != ghow {
					t.Fatalf("ops %+v, op %d, path %q: origin %q %d %d, want %q %d %d", ops, i, p, gq, gat, ghow, wq, wat, whow)
				}
			}
		}
	}
}

// TestChurnNeverRefused makes random changes (renames of files, in-place
// writes to files spanning blocks, truncates, deletes) without
// waiting, for several seeds: the replica ends equal to the primary and
// never refused a batch (a refusal heals by a full resync, which would hide
// a wrong delta or rename; full cuts after an inotify overflow are fine).
func TestChurnNeverRefused(t *testing.T) {
	for seed := range uint64(3) {
		c := newTestCluster(t)
		c.startReplica("r1")
		// Frequent rescans, as a safety net that the test exercises too.
		p := c.startPrimaryWith(func(cfg *PrimaryConfig) { cfg.RescanInterval = 300 * time.Millisecond }, 1, "r1")
		c.waitSynced("r1")
		rng := mrand.New(mrand.NewPCG(seed, 7))
		for round := range 3 {
			churnTree(c, rng, false)
			// Caught up: no change pending, the last cut acknowledged.
			p.mu.Lock()
			s := p.senders["r1"]
			p.mu.Unlock()
			testutil.Eventually(t, 30*time.Second, "replica caught up", func() bool {
				pending, _ := p.ch.pending()
				s.mu.Lock()
				defer s.mu.Unlock()
				return !pending && !p.cuttingFull.Load() && s.acked.Seq == p.latestSeq() && s.next == s.acked.Seq+1
			})
			s.mu.Lock()
			n := s.refusals
			s.mu.Unlock()
			if n != 0 {
				t.Fatalf("seed %d round %d: the replica refused %d batches (%d cuts file-consistent only)", seed, round, n, p.fileOnlyCuts.Load())
			}
			testutil.EventuallyErr(t, 15*time.Second, func() error { return c.diff("r1") })
		}
	}
}

// churnTree makes 300 random changes below c's primary data: writes, in-place
// writes, truncates, mkdirs, deletes and renames (of files only unless
// dirs is set).
func churnTree(c *testCluster, rng *mrand.Rand, dirs bool) {
	names := []string{"a", "b", "c", "a/x", "a/y", "b/x", "b/y", "a/x/p", "a/x/q", "b/y/p", "c/q"}
	pick := func() string { return c.path(names[rng.IntN(len(names))]) }
	for i := range 300 {
		path := pick()
		switch rng.IntN(8) {
		case 0:
			_ = os.WriteFile(path, randomBytes(rng.IntN(300<<10)), 0o644)
		case 1:
			if f, err := os.OpenFile(path, os.O_WRONLY, 0); err == nil {
				_, _ = f.WriteAt(randomBytes(100), int64(rng.IntN(300<<10)))
				_ = f.Close()
			}
		case 2:
			_ = os.MkdirAll(path, 0o755)
		case 3:
			_ = os.RemoveAll(path)
		case 4, 5:
			if fi, err := os.Lstat(path); err == nil && (fi.Mode().IsRegular() || dirs) {
				_ = syscall.Rename(path, pick())
			}
		case 6:
			_ = os.Truncate(path, int64(rng.IntN(200<<10)))
		case 7:
			_ = os.WriteFile(path, []byte(strconv.Itoa(i)), 0o600)
		}
	}
}

// TestChurnWithDirectoryRenamesConverges is TestChurnNeverRefused with
// directories renamed too, and checks that the replica ends equal to the
// primary. It found a directory renamed over another one left unwatched
// (fsnotify keeps watches by path), a rename found in a later round of a
// cut naming its source where an earlier rename had moved it from, and a
// hole punched up to an end inside a page leaving that page allocated.
func TestChurnWithDirectoryRenamesConverges(t *testing.T) {
	for seed := range uint64(3) {
		c := newTestCluster(t)
		c.startReplica("r1")
		c.startPrimaryWith(func(cfg *PrimaryConfig) { cfg.RescanInterval = 300 * time.Millisecond }, 1, "r1")
		c.waitSynced("r1")
		rng := mrand.New(mrand.NewPCG(seed, 7))
		for round := range 3 {
			churnTree(c, rng, true)
			testutil.EventuallyErr(t, 15*time.Second, func() error {
				if err := SameTree(c.primaryData, c.replicaPaths("r1").Data); err != nil {
					return fmt.Errorf("seed %d round %d: %w", seed, round, err)
				}
				return nil
			})
		}
	}
}

// TestDeltaKeepsHoles turns zeros written as data into a hole (same
// contents): the delta carries the block anyway, and the replica's file
// has the primary's holes.
func TestDeltaKeepsHoles(t *testing.T) {
	c := newTestCluster(t)
	c.startReplica("r1")
	must(t, os.WriteFile(c.path("f"), randomBytes(256<<10), 0o644))
	c.startPrimary(1, "r1")
	c.waitSynced("r1")
	writeAt(t, c.path("f"), blockSize, make([]byte, blockSize)) // zeros, as data
	c.waitSynced("r1")
	f, err := os.OpenFile(c.path("f"), os.O_WRONLY, 0)
	must(t, err)
	err = unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, blockSize, blockSize)
	must(t, errors.Join(err, f.Close()))
	c.waitSynced("r1") // the manifests compare data extents
}

// TestFullResyncKeepsHoles fills a hole with zeros written as data while
// the primary is down: the full resync's deltas carry that block although
// its contents match, so the replica's data extents match the primary's.
func TestFullResyncKeepsHoles(t *testing.T) {
	c := newTestCluster(t)
	c.startReplica("r1")
	f, err := os.Create(c.path("f"))
	must(t, err)
	_, err = f.WriteAt(randomBytes(blockSize), 0)
	if err == nil {
		_, err = f.WriteAt(randomBytes(blockSize), 3*blockSize)
	}
	must(t, errors.Join(err, f.Close()))
	p := c.startPrimary(1, "r1")
	c.waitSynced("r1")
	p.Stop()
	writeAt(t, c.path("f"), blockSize, make([]byte, blockSize))
	c.startPrimary(1, "r1")
	c.waitSynced("r1")
}

// TestIndexUnreadableIsRecreated opens an index file that is not a bbolt
// database (a crash without fsync can leave one): it is recreated empty.
func TestIndexUnreadableIsRecreated(t *testing.T) {
	dir := t.TempDir()
	must(t, os.WriteFile(filepath.Join(dir, indexFile), bytes.Repeat([]byte("junk"), 4096), 0o600))
	x, err := openIndex(dir)
	must(t, err)
	defer x.close()
	must(t, x.apply(&indexUpdate{puts: map[string]*indexEntry{"f": {kind: kindFile, size: 1, hashes: make([]byte, hashLen)}}}))
	e, err := x.get("f")
	must(t, err)
	if e == nil || e.size != 1 || len(e.hashes) != hashLen {
		t.Fatalf("entry = %+v", e)
	}
}

// TestFenceDoesNotWaitForBlockSums fences a replica while it hashes its
// files for BlockSums (held at the first path): the fence completes at
// once, and the sums, asked for by the stream the fence cut off, are
// refused.
func TestFenceDoesNotWaitForBlockSums(t *testing.T) {
	c, r, _ := replicaHoldingF(t)
	_, err := openRaw(t, c, "r1", 2)
	must(t, err)
	hashing, release := make(chan struct{}), make(chan struct{})
	r.srv.sumsHook = func(string) {
		close(hashing)
		<-release
	}
	type result struct {
		resp *tetherpb.BlockSumsResponse
		err  error
	}
	got := make(chan result, 1)
	go func() {
		resp, err := r.srv.BlockSums(context.Background(), &tetherpb.BlockSumsRequest{Volume: testVolume, Epoch: 2,
			BlockSize: blockSize, Paths: [][]byte{[]byte("f")}})
		got <- result{resp, err}
	}()
	<-hashing
	fenced := make(chan error, 1)
	go func() { fenced <- r.srv.Fence(testVolume, 3) }()
	select {
	case err := <-fenced:
		must(t, err)
	case <-time.After(10 * time.Second):
		close(release)
		t.Fatal("Fence waits for BlockSums to finish hashing")
	}
	close(release)
	res := <-got
	if status.Code(res.err) != codes.FailedPrecondition {
		t.Fatalf("sums for a stream fenced meanwhile: %v, %v; want FailedPrecondition", res.resp, res.err)
	}
}
