package replication

import (
	"errors"
	"fmt"
	"io"
	"sync"
	"unsafe"

	"google.golang.org/grpc"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/tether-io/tether/proto/tetherpb"
)

// The replication stream's codec (DESIGN.md, "Transport"). The bytes on the
// wire are protobuf, as the default codec writes them, except that a
// FILE chunk's data comes last in its FileOp (any order is valid protobuf).
// What it saves are copies of a chunk's data:
//
//   - sending, the data goes to gRPC as a buffer of its own, without being
//     copied into the encoded message: the chunker lends its buffer (see
//     chunkPool) and gRPC returns it once written; data not lent is copied
//     once, as the default codec does;
//   - receiving, the data is copied once, from the HTTP/2 frames into a
//     buffer aligned for O_DIRECT, instead of into one contiguous message,
//     then into the decoded FileOp, then into an aligned buffer.
//
// Other messages, and peers using the default codec, are plain protobuf.

// Field numbers of the messages the codec takes apart (proto/tether.proto).
const (
	fieldStreamRequestOp = 2
	fieldFileOpData      = 5
)

// bigData is the smallest chunk data the codec moves without the generic
// protobuf path; smaller messages are not worth the bookkeeping.
const bigData = 32 << 10

// wireCodec is the replication stream's encoding.CodecV2 (see above).
// loans (may be nil) are the buffers a primary's chunker lends.
type wireCodec struct {
	loans *chunkPool
	recv  *recvPool
}

// Name is the default codec's: the content type stays application/grpc+proto,
// so either side may use the default codec instead.
func (wireCodec) Name() string { return "proto" }

// ServerOptions are the options of the gRPC server s is registered on
// (Register): the replication codec for every message (other services'
// messages are plain protobuf to it), receiving chunk data into s's
// buffers.
func (s *Server) ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{grpc.ForceServerCodecV2(wireCodec{recv: s.recv})}
}

// Marshal encodes v; a StreamRequest carrying a large FILE chunk is encoded
// as its header and the data, the data in a buffer of its own.
func (c wireCodec) Marshal(v any) (mem.BufferSlice, error) {
	m, ok := v.(proto.Message)
	if !ok {
		return nil, fmt.Errorf("replication codec: cannot marshal %T: not a protobuf message", v)
	}
	if r, ok := m.(*tetherpb.StreamRequest); ok && len(r.GetOp().GetData()) >= bigData {
		return c.marshalChunk(r.GetOp())
	}
	b, err := proto.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("replication codec: %w", err)
	}
	return mem.BufferSlice{mem.SliceBuffer(b)}, nil
}

// marshalChunk encodes StreamRequest{op: op} with op's data last, the data
// as a separate buffer: lent by the chunker (no copy), else a copy.
func (c wireCodec) marshalChunk(op *tetherpb.FileOp) (mem.BufferSlice, error) {
	data := op.GetData()
	// The op without its data, sharing the rest (op itself is left alone: a
	// message may be sent on several streams at once).
	rest := &tetherpb.FileOp{}
	dst := rest.ProtoReflect()
	op.ProtoReflect().Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		if fd.Number() != fieldFileOpData {
			dst.Set(fd, v)
		}
		return true
	})
	dst.SetUnknown(op.ProtoReflect().GetUnknown())
	hdr, err := proto.Marshal(rest)
	if err != nil {
		return nil, fmt.Errorf("replication codec: %w", err)
	}
	inner := len(hdr) + protowire.SizeTag(fieldFileOpData) + protowire.SizeBytes(len(data))
	out := make([]byte, 0, 2*binaryMaxVarint+len(hdr)+binaryMaxVarint)
	out = protowire.AppendTag(out, fieldStreamRequestOp, protowire.BytesType)
	out = protowire.AppendVarint(out, uint64(inner))
	out = append(out, hdr...)
	out = protowire.AppendTag(out, fieldFileOpData, protowire.BytesType)
	out = protowire.AppendVarint(out, uint64(len(data)))
	body, ok := c.loans.take(data)
	if !ok {
		body = mem.Copy(data, mem.DefaultBufferPool())
	}
	return mem.BufferSlice{mem.SliceBuffer(out), body}, nil
}

// binaryMaxVarint is the most bytes a tag or a varint takes.
const binaryMaxVarint = 10

// Unmarshal decodes data into v. A StreamRequest whose op carries large
// data gets it in a buffer of its own, aligned for direct I/O, copied once
// from the frames.
func (c wireCodec) Unmarshal(data mem.BufferSlice, v any) error {
	m, ok := v.(proto.Message)
	if !ok {
		return fmt.Errorf("replication codec: cannot unmarshal into %T: not a protobuf message", v)
	}
	if r, ok := m.(*tetherpb.StreamRequest); ok && data.Len() >= bigData {
		done, err := unmarshalChunk(data, r, c.recv)
		if done || err != nil {
			return err
		}
		proto.Reset(r)
	}
	buf := data.MaterializeToBuffer(mem.DefaultBufferPool())
	defer buf.Free()
	if err := proto.Unmarshal(buf.ReadOnlyData(), m); err != nil {
		return fmt.Errorf("replication codec: %w", err)
	}
	return nil
}

// errNotChunk says a message is not in the shape unmarshalChunk decodes.
var errNotChunk = errors.New("not a single op with one data field")

// unmarshalChunk decodes a StreamRequest made of one op field, copying the
// op's data field once into an aligned buffer and decoding the rest of the
// op with protobuf. done is false when the message has another shape (a
// repeated field, groups...): the caller then decodes it the generic way.
func unmarshalChunk(data mem.BufferSlice, r *tetherpb.StreamRequest, pool *recvPool) (done bool, err error) {
	rd := data.Reader()
	defer rd.Close()
	num, typ, err := readTag(rd)
	if err != nil {
		return false, nil
	}
	n, err := readVarint(rd)
	if num != fieldStreamRequestOp || typ != protowire.BytesType || err != nil || n != uint64(rd.Remaining()) {
		return false, nil
	}
	var hdr, body []byte
	for rd.Remaining() > 0 {
		num, typ, err := readTag(rd)
		if err != nil {
			return false, nil
		}
		if num == fieldFileOpData && typ == protowire.BytesType {
			n, err := readVarint(rd)
			if err != nil || n > uint64(rd.Remaining()) || body != nil {
				return false, nil
			}
			body = pool.get(int(n))
			if _, err := io.ReadFull(rd, body); err != nil {
				pool.put(body)
				return false, nil
			}
			continue
		}
		hdr = protowire.AppendTag(hdr, num, typ)
		if hdr, err = copyValue(rd, hdr, typ); err != nil {
			if errors.Is(err, errNotChunk) {
				return false, nil
			}
			return true, fmt.Errorf("replication codec: %w", err)
		}
	}
	op := &tetherpb.FileOp{}
	if err := proto.Unmarshal(hdr, op); err != nil {
		return true, fmt.Errorf("replication codec: %w", err)
	}
	op.Data = body
	r.Kind = &tetherpb.StreamRequest_Op{Op: op}
	return true, nil
}

// copyValue appends the value of a field of wire type typ read from rd.
func copyValue(rd *mem.Reader, out []byte, typ protowire.Type) ([]byte, error) {
	var n uint64
	switch typ {
	case protowire.VarintType:
		v, err := readVarint(rd)
		return protowire.AppendVarint(out, v), err
	case protowire.Fixed32Type:
		n = 4
	case protowire.Fixed64Type:
		n = 8
	case protowire.BytesType:
		var err error
		if n, err = readVarint(rd); err != nil {
			return out, err
		}
		out = protowire.AppendVarint(out, n)
	default:
		return out, errNotChunk
	}
	if n > uint64(rd.Remaining()) {
		return out, io.ErrUnexpectedEOF
	}
	k := len(out)
	out = append(out, make([]byte, n)...)
	_, err := io.ReadFull(rd, out[k:])
	return out, err
}

func readTag(rd *mem.Reader) (protowire.Number, protowire.Type, error) {
	v, err := readVarint(rd)
	if err != nil {
		return 0, 0, err
	}
	num, typ := protowire.DecodeTag(v)
	if !num.IsValid() {
		return 0, 0, errNotChunk
	}
	return num, typ, nil
}

func readVarint(rd *mem.Reader) (uint64, error) {
	var v uint64
	for shift := uint(0); shift < 64; shift += 7 {
		b, err := rd.ReadByte()
		if err != nil {
			return 0, io.ErrUnexpectedEOF
		}
		v |= uint64(b&0x7f) << shift
		if b < 0x80 {
			return v, nil
		}
	}
	return 0, errNotChunk
}

// alignedBuf returns n bytes starting at a directAlign boundary.
func alignedBuf(n int) []byte {
	b := make([]byte, n+directAlign)
	if k := int(uintptr(unsafe.Pointer(unsafe.SliceData(b))) & (directAlign - 1)); k != 0 {
		b = b[directAlign-k:]
	}
	return b[:n]
}

// isAligned reports whether b starts at a directAlign boundary.
func isAligned(b []byte) bool {
	return uintptr(unsafe.Pointer(unsafe.SliceData(b)))&(directAlign-1) == 0
}

// recvPool holds the aligned buffers a replica's codec receives chunk data
// into. The stream's receiver gives a message's data back when the handler
// asks for the next message, the batch having staged it (batch.add keeps
// no FileOp data). Whatever is not given back is garbage collected. A nil
// *recvPool allocates every buffer.
type recvPool struct {
	mu   sync.Mutex
	free [][]byte
}

// recvPoolKeep is the most free buffers a recvPool keeps.
const recvPoolKeep = 4

// get returns n bytes aligned for O_DIRECT; their contents are not
// cleared.
func (p *recvPool) get(n int) []byte {
	if n < bigData {
		return make([]byte, n)
	}
	if p != nil {
		p.mu.Lock()
		for k := len(p.free) - 1; k >= 0; k-- {
			if b := p.free[k]; cap(b) >= n {
				p.free = append(p.free[:k], p.free[k+1:]...)
				p.mu.Unlock()
				return b[:n]
			}
		}
		p.mu.Unlock()
	}
	return alignedBuf(max(n, chunkSize))[:n]
}

// put gives back a buffer get returned (its owner is done with it); other
// buffers are dropped.
func (p *recvPool) put(b []byte) {
	if p == nil || cap(b) < bigData || !isAligned(b) {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.free) < recvPoolKeep {
		p.free = append(p.free, b[:0])
	}
}

// chunkPool holds the buffers a primary's chunker fills with FILE chunks,
// and lends them to the stream's codec: a chunk whose buffer the codec
// took goes to gRPC without a copy, and gRPC returns the buffer here once
// it has written it; a chunk sent elsewhere (the spool, a filter that
// re-slices it) leaves the buffer with the chunker. A nil *chunkPool lends
// nothing.
type chunkPool struct {
	mu   sync.Mutex
	free []*[]byte
	lent map[*byte]*[]byte // buffers the codec may take, by their first byte
}

// chunkPoolKeep is the most free buffers a chunkPool keeps.
const chunkPoolKeep = 8

func newChunkPool() *chunkPool { return &chunkPool{lent: map[*byte]*[]byte{}} }

// Get returns a buffer of length n (mem.BufferPool); its contents are not
// cleared.
func (p *chunkPool) Get(n int) *[]byte {
	p.mu.Lock()
	for len(p.free) > 0 {
		b := p.free[len(p.free)-1]
		p.free = p.free[:len(p.free)-1]
		if cap(*b) >= n {
			p.mu.Unlock()
			*b = (*b)[:n]
			return b
		}
	}
	p.mu.Unlock()
	b := make([]byte, n, max(n, chunkSize))
	return &b
}

// Put returns a buffer (mem.BufferPool).
func (p *chunkPool) Put(b *[]byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.free) < chunkPoolKeep {
		p.free = append(p.free, b)
	}
}

// lend lets the codec take buffer b (from Get) while its data is sent.
func (p *chunkPool) lend(b *[]byte) {
	if p == nil || cap(*b) == 0 {
		return
	}
	p.mu.Lock()
	p.lent[unsafe.SliceData(*b)] = b
	p.mu.Unlock()
}

// reclaim ends the loan of b: true if the codec did not take it (the
// caller keeps it), false if it did (gRPC returns it to the pool).
func (p *chunkPool) reclaim(b *[]byte) bool {
	if p == nil {
		return true
	}
	k := unsafe.SliceData(*b)
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.lent[k]; ok {
		delete(p.lent, k)
		return true
	}
	return false
}

// take returns data as a buffer that gRPC gives back to the pool, if data
// starts a buffer lent to the codec.
func (p *chunkPool) take(data []byte) (mem.Buffer, bool) {
	if p == nil || len(data) == 0 {
		return nil, false
	}
	k := unsafe.SliceData(data)
	p.mu.Lock()
	b, ok := p.lent[k]
	delete(p.lent, k)
	p.mu.Unlock()
	if !ok {
		return nil, false
	}
	*b = (*b)[:len(data)]
	return mem.NewBuffer(b, p), true
}
