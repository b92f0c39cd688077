package replication

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/klauspost/compress/zstd"

	"github.com/tether-io/tether/internal/testutil"
	"github.com/tether-io/tether/proto/tetherpb"
	"google.golang.org/protobuf/proto"
)

// FuzzApplyBatch feeds arbitrary ops (as a peer could send them) to a
// replica's batch and, when the batch accepts them, applies it through the
// journal: nothing may panic and nothing may appear outside the volume.
func FuzzApplyBatch(f *testing.F) {
	seed := func(ops ...*tetherpb.FileOp) []byte {
		var out []byte
		for _, op := range ops {
			b, err := proto.Marshal(op)
			if err != nil {
				f.Fatal(err)
			}
			out = append(out, byte(len(b)>>8), byte(len(b)))
			out = append(out, b...)
		}
		return out
	}
	first, second := cutOps()
	f.Add(seed(first...))
	f.Add(seed(second...))
	// A batch continued over a second cut (an empty record is a Continue).
	f.Add(append(append(seed(append(first[:2:2], second[2:]...)...), 0, 0), seed(continuedOps()...)...))
	f.Add(seed(symlinkOp("d", ".."), fileOp("d/x", "escape")))
	f.Add(seed(&tetherpb.FileOp{Kind: tetherpb.FileOp_KIND_HARDLINK, Path: []byte("l"), HardlinkTo: []byte("../x")}))
	// A compressed chunk, and a delta patching a file the replica lacks.
	enc, err := zstd.NewWriter(nil)
	if err != nil {
		f.Fatal(err)
	}
	z := enc.EncodeAll(bytes.Repeat([]byte("zstd "), 1000), nil)
	f.Add(seed(&tetherpb.FileOp{Kind: tetherpb.FileOp_KIND_FILE, Path: []byte("z"), Data: z, Zstd: true, Size: 5000}))
	f.Add(seed(&tetherpb.FileOp{Kind: tetherpb.FileOp_KIND_FILE, Path: []byte("d"), Data: []byte("patch"), Offset: 1 << 16, More: true},
		&tetherpb.FileOp{Kind: tetherpb.FileOp_KIND_FILE, Path: []byte("d"), Size: 1<<16 + 5, Delta: &tetherpb.Delta{
			BaseSize: 1 << 16, BlockSize: 1 << 16, BaseDigest: make([]byte, hashLen), Blocks: []uint64{1}}}))
	f.Fuzz(func(t *testing.T, data []byte) {
		base := t.TempDir()
		paths := Paths{Data: filepath.Join(base, "v", "data"), State: filepath.Join(base, "v", "state")}
		must(t, os.MkdirAll(paths.Data, 0o755))
		must(t, resetDir(filepath.Join(paths.State, stageDir)))
		b := newBatch(filepath.Join(paths.State, stageDir))
		defer b.discard()
		seq := uint64(1)
		for len(data) >= 2 {
			n := int(data[0])<<8 | int(data[1])
			data = data[2:]
			if n > len(data) {
				return
			}
			if n == 0 {
				seq++
				if b.cont(seq) != nil {
					return
				}
				continue
			}
			op := &tetherpb.FileOp{}
			if proto.Unmarshal(data[:n], op) != nil {
				return
			}
			data = data[n:]
			if op.GetSize() > 1<<20 || op.GetOffset() > 1<<20 {
				return // keep the fuzzer's files small
			}
			if b.add(op) != nil {
				return
			}
		}
		if b.complete() != nil {
			return
		}
		j := journal{paths: paths, warn: newOnceLogger(testutil.Logger(t))}
		_ = j.commit(b, position{Epoch: 1, Seq: seq}, false)
		entries, err := os.ReadDir(base)
		must(t, err)
		if len(entries) != 1 || entries[0].Name() != "v" {
			t.Fatalf("something was written outside the volume: %v", entries)
		}
		entries, err = os.ReadDir(filepath.Join(base, "v"))
		must(t, err)
		if len(entries) != 2 {
			t.Fatalf("something was written next to the volume: %v", entries)
		}
	})
}
