package replication

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tether-io/tether/proto/tetherpb"
)

// TestVerifyBasesAcrossSegments checks what a batch continued over later
// cuts may build on: in a later segment, what an earlier one wrote (a
// delta's base checked against the file written, by size, mtime and
// digest), never what its own segment replaced, nor what an earlier one
// removed or moved away; a full batch keeps only what its first segment
// names.
func TestVerifyBasesAcrossSegments(t *testing.T) {
	data := t.TempDir()
	must(t, os.WriteFile(filepath.Join(data, "old"), []byte("before the batch"), 0o644))
	dg := func(b byte) *fileDigest {
		return &fileDigest{blockSize: blockSize, sum: bytes.Repeat([]byte{b}, hashLen)}
	}
	file := func(p string, size int64, mtime int64, d *fileDigest) applyOp {
		return applyOp{kind: tetherpb.FileOp_KIND_FILE, path: p, size: size, mtime: time.Unix(0, mtime), digest: d}
	}
	delta := func(p string, size int64, mtime int64, d *fileDigest) applyOp {
		op := file(p, size, mtime+1, dg(9))
		op.delta = &deltaOp{baseSize: size, baseMtime: mtime, digest: d.sum, blockSize: d.blockSize}
		return op
	}
	rename := func(from, to string) applyOp { return applyOp{kind: tetherpb.FileOp_KIND_RENAME, path: from, to: to} }
	del := func(p string) applyOp { return applyOp{kind: tetherpb.FileOp_KIND_DELETE, path: p} }
	mkdir := func(p string) applyOp { return applyOp{kind: tetherpb.FileOp_KIND_MKDIR, path: p} }
	for _, tc := range []struct {
		name string
		ops  []applyOp
		segs []int
		full bool
		want error // nil, errBadBatch or errBaseMismatch
	}{
		{"delta on what an earlier cut wrote", []applyOp{file("f", 10, 5, dg(1)), delta("f", 10, 5, dg(1))}, []int{1}, false, nil},
		{"delta on it in a full batch", []applyOp{file("f", 10, 5, dg(1)), delta("f", 10, 5, dg(1))}, []int{1}, true, nil},
		{"delta on it, other digest", []applyOp{file("f", 10, 5, dg(1)), delta("f", 10, 5, dg(2))}, []int{1}, false, errBaseMismatch},
		{"delta on it, other size", []applyOp{file("f", 10, 5, dg(1)), delta("f", 11, 5, dg(1))}, []int{1}, false, errBaseMismatch},
		{"delta on it, other mtime", []applyOp{file("f", 10, 5, dg(1)), delta("f", 10, 6, dg(1))}, []int{1}, false, errBaseMismatch},
		{"delta on it, written without a digest", []applyOp{file("f", 10, 5, nil), delta("f", 10, 5, dg(1))}, []int{1}, false, errBaseMismatch},
		{"delta on what its own cut wrote", []applyOp{file("f", 10, 5, dg(1)), delta("f", 10, 5, dg(1))}, nil, false, errBadBatch},
		{"delta after a rename in a later cut", []applyOp{file("f", 10, 5, dg(1)), rename("f", "g"), delta("g", 10, 5, dg(1))}, []int{1, 2}, false, nil},
		{"delta after a rename in its own cut", []applyOp{file("f", 10, 5, dg(1)), rename("f", "g"), delta("g", 10, 5, dg(1))}, []int{1}, false, nil},
		{"delta after a directory rename", []applyOp{mkdir("d"), file("d/f", 10, 5, dg(1)), rename("d", "e"), delta("e/f", 10, 5, dg(1))}, []int{2}, false, nil},
		{"delta on what an earlier cut deleted", []applyOp{file("f", 10, 5, dg(1)), del("f"), delta("f", 10, 5, dg(1))}, []int{1, 2}, false, errBaseMismatch},
		{"delta below what an earlier cut deleted", []applyOp{mkdir("d"), file("d/f", 10, 5, dg(1)), del("d"), delta("d/f", 10, 5, dg(1))}, []int{2, 3}, false, errBaseMismatch},
		{"delta on what an earlier cut moved away", []applyOp{file("f", 10, 5, dg(1)), rename("f", "g"), delta("f", 10, 5, dg(1))}, []int{1, 2}, false, errBaseMismatch},
		{"delta on a directory an earlier cut made", []applyOp{mkdir("f"), delta("f", 10, 5, dg(1))}, []int{1}, false, errBaseMismatch},
		{"rename of what an earlier cut wrote", []applyOp{file("f", 10, 5, dg(1)), rename("f", "g")}, []int{1}, true, nil},
		{"rename of a directory an earlier cut made", []applyOp{mkdir("d"), rename("d", "e")}, []int{1}, true, nil},
		{"rename of what an earlier cut deleted", []applyOp{file("f", 10, 5, dg(1)), del("f"), rename("f", "g")}, []int{1, 2}, false, errBaseMismatch},
		{"rename in the first cut of a full batch", []applyOp{file("f", 10, 5, dg(1)), rename("f", "g")}, []int{2}, true, errBadBatch},
		{"rename from before the batch", []applyOp{file("f", 10, 5, dg(1)), rename("old", "g")}, []int{1}, false, nil},
		{"rename from before a full batch", []applyOp{file("f", 10, 5, dg(1)), rename("old", "g")}, []int{1}, true, errBaseMismatch},
		{"rename of a path missing before the batch", []applyOp{file("f", 10, 5, dg(1)), rename("nothing", "g")}, []int{1}, false, errBaseMismatch},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := verifyBases(data, tc.ops, tc.segs, tc.full, nil)
			switch {
			case tc.want == nil && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.want != nil && !errors.Is(err, tc.want):
				t.Fatalf("got %v, want %v", err, tc.want)
			}
		})
	}
}

// continuedOps is a cut that follows cutOps' second one: a directory the
// second made becomes a file (before any rename, so no rename's progress
// mark covers it), a directory it made is renamed, a file it wrote is
// deleted and another written again, a directory's metadata changes again.
func continuedOps() []*tetherpb.FileOp {
	return []*tetherpb.FileOp{
		fileOp("new/deep", "a file now"), // in place of the directory
		{Kind: tetherpb.FileOp_KIND_RENAME, Path: []byte("new"), NewPath: []byte("renamed-new")},
		{Kind: tetherpb.FileOp_KIND_DELETE, Path: []byte("d/b")},
		mkdirOp(".", 0o711, 21), mkdirOp("d", 0o700, 20), mkdirOp("renamed-new", 0o700, 22),
		fileOp("d/a", "a3, once more"),
		symlinkOp("link", "renamed-new/deep"),
	}
}

// commitContinued stages the cuts as one batch continued over each after
// the first, and commits it as the last (seq first+len(cuts)-1).
func commitContinued(t *testing.T, j journal, first uint64, full bool, cuts ...[]*tetherpb.FileOp) error {
	t.Helper()
	b := newBatch(j.stage())
	defer b.discard()
	for k, ops := range cuts {
		if k > 0 {
			must(t, b.cont(first+uint64(k)))
		}
		for _, op := range ops {
			must(t, b.add(op))
		}
	}
	must(t, b.complete())
	return j.commit(b, position{Epoch: 1, Seq: first + uint64(len(cuts)) - 1}, full)
}

// TestContinuedBatchCrashAtEveryStep commits a batch continued over a
// second cut (whose ops rename, delete and rewrite what the first wrote)
// and stops it at every step, as a crash would: after recovery the replica
// holds the previous cut or the last one of the batch, never the first
// cut alone nor a mix, and a replay never applies the first cut again over
// the second (which would bring back what the second moved or deleted).
func TestContinuedBatchCrashAtEveryStep(t *testing.T) {
	first, second := cutOps()
	third := continuedOps()
	for _, full := range []bool{false, true} {
		t.Run(fmt.Sprintf("full %v", full), func(t *testing.T) {
			ops2 := second
			if full {
				ops2 = append(append([]*tetherpb.FileOp{}, first[:2]...), second[2:]...)
			}
			run := crashRun{first: first, seq: 3, commit: func(j journal) error { return commitContinued(t, j, 2, full, ops2, third) }}
			oldCut, newCut, steps, _ := run.clean(t)
			if e, ok := newCut["renamed-new/deep"]; !ok || e.Type != "file" {
				t.Fatalf("bad test setup: the continued batch did not apply its second cut: %q", DiffManifests(oldCut, newCut))
			}
			if !slices.Contains(steps, "segment 1") {
				t.Fatalf("no step between the segments: %q", steps)
			}
			for _, step := range steps {
				run.crashAt(t, step, oldCut, newCut)
			}
			t.Logf("%d crash points checked", len(steps))
		})
	}
}

// TestContinueRefusedWhenMalformed sends a replica continued batches it
// must refuse, each on a real stream: a Continue inside a file, one that
// does not move forward, a Commit that names another cut than the last
// one continued to. Each is refused with InvalidArgument and the replica's
// volume and position stay as they were.
func TestContinueRefusedWhenMalformed(t *testing.T) {
	c := newTestCluster(t)
	c.startReplica("r1")
	cont := func(seq uint64) *tetherpb.StreamRequest {
		return &tetherpb.StreamRequest{Kind: &tetherpb.StreamRequest_Continue{Continue: &tetherpb.Continue{Seq: seq}}}
	}
	op := func(o *tetherpb.FileOp) *tetherpb.StreamRequest {
		return &tetherpb.StreamRequest{Kind: &tetherpb.StreamRequest_Op{Op: o}}
	}
	commit := func(seq uint64) *tetherpb.StreamRequest {
		return &tetherpb.StreamRequest{Kind: &tetherpb.StreamRequest_Commit{Commit: &tetherpb.Commit{Seq: seq, Full: true}}}
	}
	chunk := &tetherpb.FileOp{Kind: tetherpb.FileOp_KIND_FILE, Path: []byte("f"), Data: []byte("part"), More: true}
	for _, tc := range []struct {
		name string
		msgs []*tetherpb.StreamRequest
	}{
		{"inside a file", []*tetherpb.StreamRequest{op(mkdirOp(".", 0o755, 1)), op(chunk), cont(2)}},
		{"not moving forward", []*tetherpb.StreamRequest{op(mkdirOp(".", 0o755, 1)), cont(3), cont(3)}},
		{"to cut 0", []*tetherpb.StreamRequest{op(mkdirOp(".", 0o755, 1)), cont(0)}},
		{"committed as another cut", []*tetherpb.StreamRequest{op(mkdirOp(".", 0o755, 1)), cont(2), op(fileOp("g", "g")), commit(5)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rs, err := openRaw(t, c, "r1", 1)
			must(t, err)
			before, err := Manifest(c.replicaPaths("r1").Data)
			must(t, err)
			for _, m := range tc.msgs {
				if err := rs.stream.Send(m); err != nil {
					break // the replica ended the stream; Recv says why
				}
			}
			_, err = rs.stream.Recv()
			if status.Code(err) != codes.InvalidArgument {
				t.Fatalf("replica answered %v, want InvalidArgument", err)
			}
			after, err := Manifest(c.replicaPaths("r1").Data)
			must(t, err)
			if d := DiffManifests(before, after); len(d) > 0 {
				t.Fatalf("a refused batch changed the replica: %q", d)
			}
			pos, err := durablePosition(c.replicaPaths("r1").State)
			must(t, err)
			if pos.Seq != 0 {
				t.Fatalf("a refused batch moved the replica to seq %d", pos.Seq)
			}
		})
	}
}

// TestPaceDelay: cuts are spaced only while a replica is sent the whole
// tree and more than pacedAfter cuts are kept for it.
func TestPaceDelay(t *testing.T) {
	now := time.Unix(1000, 0)
	for _, tc := range []struct {
		name string
		full bool
		kept int
		last time.Time
		want time.Duration
	}{
		{"no full sync", false, 10000, now, 0},
		{"few cuts kept", true, pacedAfter, now, 0},
		{"many kept, just cut", true, pacedAfter + 1, now, pacedInterval},
		{"many kept, cut 300ms ago", true, pacedAfter + 1, now.Add(-300 * time.Millisecond), pacedInterval - 300*time.Millisecond},
		{"many kept, cut long ago", true, pacedAfter + 1, now.Add(-time.Hour), 0},
		{"no cut yet", true, pacedAfter + 1, time.Time{}, 0},
	} {
		if got := paceDelay(tc.full, tc.kept, tc.last, now); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
}
