package replication

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"io"
	"os"
	"runtime"
	"slices"
	"sync"
	"testing"
	"unsafe"

	"github.com/klauspost/compress/zstd"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"lukechampine.com/blake3"

	"github.com/tether-io/tether/proto/tetherpb"
)

// codecMessages are messages of every shape the stream carries: chunks
// empty, small and large, compressed or not, with every other field set.
func codecMessages() map[string]proto.Message {
	full := func(data []byte, z bool) *tetherpb.StreamRequest {
		return &tetherpb.StreamRequest{Kind: &tetherpb.StreamRequest_Op{Op: &tetherpb.FileOp{
			Kind: tetherpb.FileOp_KIND_FILE, Path: []byte("dir/f"), Data: data, Offset: 8 << 20, More: true,
			Mode: 0o644, MtimeUnixNano: 1234567890, Uid: 1000, Gid: 1000, Size: 1 << 30, Zstd: z,
			Xattrs: []*tetherpb.Xattr{{Name: []byte("user.a"), Value: []byte("v")}},
			Delta:  &tetherpb.Delta{BaseSize: 7, BaseDigest: bytes.Repeat([]byte{1}, 32), BlockSize: blockSize, Blocks: []uint64{1, 5}},
			Digest: bytes.Repeat([]byte{2}, 32), DigestBlockSize: blockSize,
		}}}
	}
	enc, _ := zstd.NewWriter(nil)
	defer enc.Close()
	zdata := enc.EncodeAll(bytes.Repeat([]byte("tether "), 200<<10), nil)
	return map[string]proto.Message{
		"empty op":           &tetherpb.StreamRequest{Kind: &tetherpb.StreamRequest_Op{Op: &tetherpb.FileOp{}}},
		"no data":            full(nil, false),
		"small data":         full(randomBytes(100), false),
		"just below bigData": full(randomBytes(bigData-1), false),
		"bigData":            full(randomBytes(bigData), false),
		"chunk":              full(randomBytes(chunkSize), false),
		"largest chunk":      full(randomBytes(maxChunkData), false),
		"compressed chunk":   full(zdata, true),
		"odd-sized chunk":    full(randomBytes(chunkSize+12345), false),
		"hello":              &tetherpb.StreamRequest{Kind: &tetherpb.StreamRequest_Hello{Hello: &tetherpb.Hello{Volume: "v", Epoch: 3}}},
		"commit":             &tetherpb.StreamRequest{Kind: &tetherpb.StreamRequest_Commit{Commit: &tetherpb.Commit{Seq: 9, Full: true}}},
		"ack":                &tetherpb.StreamAck{Epoch: 2, Seq: 5},
	}
}

// frames splits b into buffers of n bytes, as HTTP/2 frames hand a
// message to the codec.
func frames(b []byte, n int) mem.BufferSlice {
	var s mem.BufferSlice
	for len(b) > 0 {
		k := min(n, len(b))
		s = append(s, mem.SliceBuffer(b[:k]))
		b = b[k:]
	}
	return s
}

// TestCodecRoundTrip: what the codec writes is protobuf (the default codec
// reads it back equal) and it reads back what it and the default codec
// write, whatever the framing; large data arrives aligned for O_DIRECT.
func TestCodecRoundTrip(t *testing.T) {
	c := wireCodec{}
	for name, m := range codecMessages() {
		t.Run(name, func(t *testing.T) {
			out, err := c.Marshal(m)
			if err != nil {
				t.Fatal(err)
			}
			wire := out.Materialize()
			out.Free()
			std, err := proto.Marshal(m)
			if err != nil {
				t.Fatal(err)
			}
			if len(wire) != len(std) {
				t.Fatalf("encoded size %d, protobuf's %d", len(wire), len(std))
			}
			back := m.ProtoReflect().New().Interface()
			if err := proto.Unmarshal(wire, back); err != nil {
				t.Fatalf("protobuf cannot read the codec's encoding: %v", err)
			}
			if !proto.Equal(back, m) {
				t.Fatal("protobuf reads the codec's encoding as another message")
			}
			for _, enc := range [][]byte{wire, std} {
				for _, n := range []int{1, 7, 16 << 10, len(enc) + 1} {
					got := m.ProtoReflect().New().Interface()
					if err := c.Unmarshal(frames(enc, n), got); err != nil {
						t.Fatalf("frames of %d: %v", n, err)
					}
					if !proto.Equal(got, m) {
						t.Fatalf("frames of %d: decoded another message", n)
					}
					if r, ok := got.(*tetherpb.StreamRequest); ok && len(r.GetOp().GetData()) >= bigData && !isAligned(r.GetOp().GetData()) {
						t.Fatalf("frames of %d: large data not aligned for O_DIRECT", n)
					}
				}
			}
		})
	}
}

// TestCodecOtherShapes: a large StreamRequest the fast path does not take
// (fields repeated, which protobuf merges; a data field twice) decodes as
// protobuf decodes it, and a truncated one fails.
func TestCodecOtherShapes(t *testing.T) {
	c := wireCodec{}
	a := &tetherpb.StreamRequest{Kind: &tetherpb.StreamRequest_Op{Op: &tetherpb.FileOp{Path: []byte("a"), Data: randomBytes(bigData), Offset: 1}}}
	b := &tetherpb.StreamRequest{Kind: &tetherpb.StreamRequest_Op{Op: &tetherpb.FileOp{Path: []byte("b"), Data: randomBytes(bigData + 1), More: true}}}
	ab, _ := proto.Marshal(a)
	bb, _ := proto.Marshal(b)
	twoOps := append(append([]byte{}, ab...), bb...)
	// One op with its data field twice: the last one wins.
	op := protowire.AppendTag(nil, fieldFileOpData, protowire.BytesType)
	op = protowire.AppendBytes(op, randomBytes(bigData))
	op = protowire.AppendTag(op, fieldFileOpData, protowire.BytesType)
	op = protowire.AppendBytes(op, randomBytes(bigData+3))
	twoData := protowire.AppendTag(nil, fieldStreamRequestOp, protowire.BytesType)
	twoData = protowire.AppendBytes(twoData, op)
	for name, enc := range map[string][]byte{"two ops": twoOps, "two data fields": twoData} {
		want := &tetherpb.StreamRequest{}
		if err := proto.Unmarshal(enc, want); err != nil {
			t.Fatal(err)
		}
		got := &tetherpb.StreamRequest{}
		if err := c.Unmarshal(frames(enc, 1000), got); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if !proto.Equal(got, want) {
			t.Fatalf("%s: decoded otherwise than protobuf", name)
		}
	}
	for _, cut := range []int{1, len(ab) / 2, len(ab) - 1} {
		if err := c.Unmarshal(frames(ab[:cut], 1000), &tetherpb.StreamRequest{}); err == nil && cut >= bigData {
			t.Fatalf("a message truncated to %d of %d bytes decoded", cut, len(ab))
		}
	}
}

// TestCodecTakesLentBuffers: a chunk lent by the chunker goes to gRPC
// without a copy and back to the pool when gRPC frees it; data not lent
// (or taken back) is copied.
func TestCodecTakesLentBuffers(t *testing.T) {
	p := newChunkPool()
	c := wireCodec{loans: p}
	bp := p.Get(chunkSize)
	copy(*bp, randomBytes(chunkSize))
	m := &tetherpb.StreamRequest{Kind: &tetherpb.StreamRequest_Op{Op: &tetherpb.FileOp{Data: *bp}}}

	p.lend(bp)
	out, err := c.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	if len(out) != 2 || unsafe.SliceData(out[1].ReadOnlyData()) != unsafe.SliceData(*bp) {
		t.Fatal("the lent buffer was not sent as it is")
	}
	if p.reclaim(bp) {
		t.Fatal("reclaim says the codec did not take the buffer it took")
	}
	if !bytes.Equal(out.Materialize()[len(out[0].ReadOnlyData()):], m.GetOp().GetData()) {
		t.Fatal("wrong data")
	}
	out.Free()
	if got := p.Get(chunkSize); got != bp {
		t.Fatal("the buffer gRPC freed did not go back to the pool")
	}

	p.lend(bp)
	if !p.reclaim(bp) {
		t.Fatal("reclaim of a buffer the codec did not take")
	}
	out, err = c.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	if unsafe.SliceData(out[1].ReadOnlyData()) == unsafe.SliceData(*bp) {
		t.Fatal("a buffer taken back was sent without a copy")
	}
	out.Free()
}

// TestChunkerWithLendingCodec sends a file through a chunker whose chunks
// the codec takes, keeping every encoded message unsent until the end (as
// gRPC may, after Send returns): the chunker must never write into a
// buffer it lent, so every message still holds its own data.
func TestChunkerWithLendingCodec(t *testing.T) {
	p := newChunkPool()
	c := wireCodec{loans: p}
	data := randomBytes(5*chunkSize + 777)
	var held []mem.BufferSlice
	send := func(m *tetherpb.StreamRequest) error {
		out, err := c.Marshal(m)
		held = append(held, out)
		return err
	}
	ch := newChunker(send, "f", nil, p)
	for off := 0; off < len(data); off += blockSize {
		if err := ch.add(int64(off), data[off:min(off+blockSize, len(data))]); err != nil {
			t.Fatal(err)
		}
	}
	if err := ch.flush(); err != nil {
		t.Fatal(err)
	}
	ch.release()
	var got []byte
	for _, out := range held {
		m := &tetherpb.StreamRequest{}
		if err := c.Unmarshal(out, m); err != nil {
			t.Fatal(err)
		}
		if int(m.GetOp().GetOffset()) != len(got) {
			t.Fatalf("chunk at %d, expected %d", m.GetOp().GetOffset(), len(got))
		}
		got = append(got, m.GetOp().GetData()...)
		out.Free()
	}
	if !bytes.Equal(got, data) {
		t.Fatal("the chunks do not hold the file's data")
	}
}

// TestStreamedSyncWithDefaultServerCodec: a replica whose gRPC server uses
// the default codec (an agent without ServerOptions) receives a streamed
// file from a primary using the replication codec.
func TestStreamedSyncWithDefaultServerCodec(t *testing.T) {
	c := newTestCluster(t)
	c.plainServer = true
	must(t, os.WriteFile(c.path("big"), randomBytes(3<<20+5), 0o644))
	c.write("small.txt", "x")
	c.startReplica("r1")
	c.prep = func(p *Primary) { p.streamMin = streamSmall }
	c.startPrimary(1, "r1")
	c.waitSynced("r1")
}

// TestRecvPool: buffers given back are handed out again (aligned, as
// large as asked); small or foreign buffers are not kept.
func TestRecvPool(t *testing.T) {
	p := &recvPool{}
	b := p.get(chunkSize)
	if len(b) != chunkSize || !isAligned(b) {
		t.Fatalf("get: %d bytes, aligned %v", len(b), isAligned(b))
	}
	p.put(b)
	if c := p.get(chunkSize - 5); unsafe.SliceData(c) != unsafe.SliceData(b) || len(c) != chunkSize-5 {
		t.Fatal("a buffer given back was not reused")
	}
	if c := p.get(2 * chunkSize); unsafe.SliceData(c) == unsafe.SliceData(b) || len(c) != 2*chunkSize || !isAligned(c) {
		t.Fatal("a larger request got a wrong buffer")
	}
	p.put(make([]byte, 100))
	p.put(alignedBuf(chunkSize)[1:])
	if len(p.free) != 0 {
		t.Fatalf("kept %d small or unaligned buffers", len(p.free))
	}
	for range 2 * recvPoolKeep {
		p.put(alignedBuf(chunkSize))
	}
	if len(p.free) != recvPoolKeep {
		t.Fatalf("kept %d buffers, at most %d", len(p.free), recvPoolKeep)
	}
}

// TestReceiverGivesBackDataAfterUse: the receiver gives a message's data
// back to the pool only when the handler asks for the next message (the
// handler stages a chunk between the two), and only once.
func TestReceiverGivesBackDataAfterUse(t *testing.T) {
	p := &recvPool{}
	r := &receiver{ctx: context.Background(), msgs: make(chan *tetherpb.StreamRequest, 3), errc: make(chan error, 1), pool: p}
	chunk := func() *tetherpb.StreamRequest {
		return &tetherpb.StreamRequest{Kind: &tetherpb.StreamRequest_Op{Op: &tetherpb.FileOp{Data: p.get(chunkSize)}}}
	}
	m1, m2 := chunk(), chunk()
	r.msgs <- m1
	r.msgs <- m2
	r.msgs <- &tetherpb.StreamRequest{Kind: &tetherpb.StreamRequest_Commit{Commit: &tetherpb.Commit{}}}
	if got, err := r.next(); err != nil || got != m1 {
		t.Fatal(got, err)
	}
	if len(p.free) != 0 {
		t.Fatal("the data of the message being handled was given back")
	}
	if got, err := r.next(); err != nil || got != m2 {
		t.Fatal(got, err)
	}
	if len(p.free) != 1 || unsafe.SliceData(p.free[0]) != unsafe.SliceData(m1.GetOp().GetData()) {
		t.Fatal("the data of the previous message was not given back")
	}
	if _, err := r.next(); err != nil {
		t.Fatal(err)
	}
	if len(p.free) != 2 {
		t.Fatalf("%d buffers given back, want 2", len(p.free))
	}
	r.errc <- io.EOF
	if _, err := r.next(); err != io.EOF || len(p.free) != 2 {
		t.Fatalf("after a commit: %v, %d buffers given back", err, len(p.free))
	}
}

// TestBlockHashIsBLAKE3: block hashes are BLAKE3-256 (the official test
// vectors, input byte i = i mod 251): indexes and replicas' block sums
// written by earlier versions stay comparable.
func TestBlockHashIsBLAKE3(t *testing.T) {
	for n, want := range map[int]string{
		0:         "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262",
		1:         "2d3adedff11b61f14c886e35afa036736dcd87a74d27b5c1510225d0f592e213",
		1023:      "10108970eeda3eb932baac1428c7a2163b0e924c9a9e25b35bba72b28f70bd11",
		1024:      "42214739f095a406f3fc83deb889744ac00df831c10daa55189b5d121c855af7",
		1025:      "d00278ae47eb27b34faecf67b4fe263f82d5412916c1ffd97c8cb7fb814b8444",
		blockSize: "68d647e619a930e7b1082f74f334b0c65a315725569bdc123f0ee11881717bfe",
	} {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(i % 251)
		}
		if got := blake3.Sum256(b); hex.EncodeToString(got[:]) != want {
			t.Errorf("BLAKE3 of %d bytes: %x, want %s", n, got, want)
		}
	}
}

// TestReadBlocksSendsWhatChanged reads a file of data blocks, a hole, a
// block half hole and a short last block: whole (every data byte sent, no
// hole), then as a delta against the first reading after two blocks
// changed (only those sent), each time through a chunker lending its
// buffers to a codec whose encoded messages are kept until the end.
func TestReadBlocksSendsWhatChanged(t *testing.T) {
	path := t.TempDir() + "/f"
	f, err := os.Create(path)
	must(t, err)
	defer f.Close()
	size := int64(6*blockSize + 1000)
	write := func(off int64, n int) {
		t.Helper()
		_, err := f.WriteAt(randomBytes(n), off)
		must(t, err)
	}
	write(0, 3*blockSize)              // blocks 0-2
	write(4*blockSize, blockSize/2)    // block 4: half data, half hole; block 3: hole
	write(5*blockSize, blockSize+1000) // block 5 and the short block 6
	must(t, f.Truncate(size))

	read := func(base *indexEntry) (blockRead, map[int64][]byte) {
		t.Helper()
		p := newChunkPool()
		c := wireCodec{loans: p}
		var held []mem.BufferSlice
		send := func(m *tetherpb.StreamRequest) error {
			out, err := c.Marshal(m)
			held = append(held, out)
			return err
		}
		exts, err := dataExtents(f, size)
		must(t, err)
		ch := newChunker(send, "f", nil, p)
		r, err := readBlocks(f, size, exts, base, ch)
		must(t, err)
		ch.release()
		sent := map[int64][]byte{}
		for _, out := range held {
			m := &tetherpb.StreamRequest{}
			must(t, c.Unmarshal(out, m))
			out.Free()
			sent[int64(m.GetOp().GetOffset())] = m.GetOp().GetData()
		}
		for i := int64(0); i*blockSize < size; i++ {
			blk := make([]byte, min(blockSize, size-i*blockSize))
			_, err := f.ReadAt(blk, i*blockSize)
			must(t, err)
			if h := blake3.Sum256(blk); !bytes.Equal(r.hashes[i*hashLen:(i+1)*hashLen], h[:]) {
				t.Fatalf("hash of block %d is not its contents'", i)
			}
		}
		for off, data := range sent {
			want := make([]byte, len(data))
			_, err := f.ReadAt(want, off)
			must(t, err)
			if !bytes.Equal(data, want) {
				t.Fatalf("chunk at %d does not hold the file's bytes", off)
			}
		}
		return r, sent
	}
	total := func(sent map[int64][]byte) (n int) {
		for _, d := range sent {
			n += len(d)
		}
		return n
	}

	r, sent := read(nil)
	if want := 3*blockSize + blockSize/2 + blockSize + 1000; total(sent) != want {
		t.Fatalf("sent %d bytes of a whole reading, want the %d data bytes", total(sent), want)
	}
	if len(r.changed) != 7 {
		t.Fatalf("changed %v, want every block", r.changed)
	}
	exts, err := dataExtents(f, size)
	must(t, err)
	base := &indexEntry{kind: kindFile, size: size, hashes: r.hashes, exts: exts}

	write(blockSize+10, 100)
	write(5*blockSize, 1)
	r, sent = read(base)
	if !slices.Equal(r.changed, []uint64{1, 5}) || total(sent) != 2*blockSize {
		t.Fatalf("delta: changed %v, %d bytes sent; want blocks [1 5], %d bytes", r.changed, total(sent), 2*blockSize)
	}
}

// TestReadBlocksSmallFileAllocates: reading a 4 KiB file allocates about
// its size, not a 64 KiB scratch block (the block hash makes a buffer it
// reads escape to the heap, so one allocated per file cost 64 KiB for
// every small file of a sync).
func TestReadBlocksSmallFileAllocates(t *testing.T) {
	path := t.TempDir() + "/small"
	must(t, os.WriteFile(path, randomBytes(4096), 0o644))
	f, err := os.Open(path)
	must(t, err)
	defer f.Close()
	exts, err := dataExtents(f, 4096)
	must(t, err)
	send := func(*tetherpb.StreamRequest) error { return nil }
	const runs = 50
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for range runs {
		ch := newChunker(send, "small", nil, nil)
		if _, err := readBlocks(f, 4096, exts, nil, ch); err != nil {
			t.Fatal(err)
		}
	}
	runtime.ReadMemStats(&after)
	if per := (after.TotalAlloc - before.TotalAlloc) / runs; per > 32<<10 {
		t.Fatalf("reading a 4 KiB file allocated %d bytes", per)
	}
}

// TestCodecMarshalLeavesMessageAlone: marshalling a chunk does not change
// the message (one may be sent on several streams at once: run with
// -race), and keeps its unknown fields.
func TestCodecMarshalLeavesMessageAlone(t *testing.T) {
	c := wireCodec{}
	op := &tetherpb.FileOp{Kind: tetherpb.FileOp_KIND_FILE, Path: []byte("f"), Data: randomBytes(chunkSize), More: true}
	unknown := protowire.AppendTag(nil, 99, protowire.VarintType)
	op.ProtoReflect().SetUnknown(protowire.AppendVarint(unknown, 7))
	m := &tetherpb.StreamRequest{Kind: &tetherpb.StreamRequest_Op{Op: op}}
	data := op.GetData()
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out, err := c.Marshal(m)
			if err != nil {
				errs <- err
				return
			}
			got := &tetherpb.StreamRequest{}
			if err := proto.Unmarshal(out.Materialize(), got); err != nil {
				errs <- err
				return
			}
			if !proto.Equal(got, m) {
				errs <- errors.New("the encoding decodes as another message")
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if unsafe.SliceData(op.GetData()) != unsafe.SliceData(data) || len(op.GetData()) != chunkSize {
		t.Fatal("marshalling changed the message's data")
	}
}
