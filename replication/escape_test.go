package replication

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tether-io/tether/proto/tetherpb"
)

// rawStream drives Replication.Stream by hand, as a hostile or buggy
// primary could.
type rawStream struct {
	t      *testing.T
	stream tetherpb.Replication_StreamClient
	cancel context.CancelFunc
	first  *tetherpb.StreamAck
}

// openRaw opens a stream to a replica node and sends Hello; the returned
// error is the replica's answer to it.
func openRaw(t *testing.T, c *testCluster, node string, epoch uint64) (*rawStream, error) {
	t.Helper()
	client, err := c.dial(context.Background(), node)
	must(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	stream, err := client.Stream(ctx)
	must(t, err)
	must(t, stream.Send(&tetherpb.StreamRequest{Kind: &tetherpb.StreamRequest_Hello{
		Hello: &tetherpb.Hello{Volume: testVolume, Epoch: epoch, PrimaryNode: "raw"}}}))
	first, err := stream.Recv()
	return &rawStream{t: t, stream: stream, cancel: cancel, first: first}, err
}

// batch sends ops and a Commit and returns the replica's answer.
func (r *rawStream) batch(seq uint64, ops ...*tetherpb.FileOp) (*tetherpb.StreamAck, error) {
	for _, op := range ops {
		if err := r.stream.Send(&tetherpb.StreamRequest{Kind: &tetherpb.StreamRequest_Op{Op: op}}); err != nil {
			break // the replica ended the stream; Recv tells why
		}
	}
	_ = r.stream.Send(&tetherpb.StreamRequest{Kind: &tetherpb.StreamRequest_Commit{Commit: &tetherpb.Commit{Seq: seq}}})
	return r.stream.Recv()
}

func fileOp(path, data string) *tetherpb.FileOp {
	return &tetherpb.FileOp{Kind: tetherpb.FileOp_KIND_FILE, Path: []byte(path), Data: []byte(data), Mode: 0o644}
}

func symlinkOp(path, target string) *tetherpb.FileOp {
	return &tetherpb.FileOp{Kind: tetherpb.FileOp_KIND_SYMLINK, Path: []byte(path), LinkTarget: []byte(target)}
}

// TestPathEscapeRefused sends paths that try to leave the volume: each batch
// is refused with InvalidArgument and nothing is written anywhere.
func TestPathEscapeRefused(t *testing.T) {
	c := newTestCluster(t)
	c.startReplica("r1")
	data := c.replicaPaths("r1").Data
	outside := t.TempDir()
	cases := []struct {
		name string
		ops  []*tetherpb.FileOp
	}{
		{"dot-dot", []*tetherpb.FileOp{fileOp("../x", "escape")}},
		{"absolute", []*tetherpb.FileOp{fileOp(filepath.Join(outside, "x"), "escape")}},
		{"dot-dot inside", []*tetherpb.FileOp{fileOp("a/../../x", "escape")}},
		{"delete dot-dot", []*tetherpb.FileOp{{Kind: tetherpb.FileOp_KIND_DELETE, Path: []byte("../" + filepath.Base(outside))}}},
		{"mkdir absolute", []*tetherpb.FileOp{{Kind: tetherpb.FileOp_KIND_MKDIR, Path: []byte(outside + "/d")}}},
		{"rename out", []*tetherpb.FileOp{fileOp("inside", "i"), {Kind: tetherpb.FileOp_KIND_RENAME, Path: []byte("inside"), NewPath: []byte("../x")}}},
		{"symlink then write through it", []*tetherpb.FileOp{symlinkOp("d", outside), fileOp("d/f", "escape")}},
		{"symlink then mkdir through it", []*tetherpb.FileOp{symlinkOp("d", outside), {Kind: tetherpb.FileOp_KIND_MKDIR, Path: []byte("d/sub")}}},
		{"relative symlink then write through it", []*tetherpb.FileOp{symlinkOp("d", "../../.."), fileOp("d/f", "escape")}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r, err := openRaw(t, c, "r1", 1)
			must(t, err)
			_, err = r.batch(1, tc.ops...)
			if status.Code(err) != codes.InvalidArgument {
				t.Fatalf("batch answered %v, want InvalidArgument", err)
			}
			assertOnly(t, outside)
			assertOnly(t, data)
			assertOnly(t, filepath.Dir(data), "data", "state")
			assertOnly(t, filepath.Dir(filepath.Dir(data)), "data", "replica-r1")
		})
	}
}

// TestSymlinkSwappedForDirectory checks that a symlink already on the replica
// where a later batch needs a directory is replaced, never written through.
func TestSymlinkSwappedForDirectory(t *testing.T) {
	c := newTestCluster(t)
	c.startReplica("r1")
	data := c.replicaPaths("r1").Data
	outside := t.TempDir()
	must(t, os.WriteFile(filepath.Join(outside, "keep"), []byte("k"), 0o644))

	r, err := openRaw(t, c, "r1", 1)
	must(t, err)
	if _, err := r.batch(1, symlinkOp("d", outside), symlinkOp("e", outside), symlinkOp("g", outside)); err != nil {
		t.Fatalf("a batch of symlinks was refused: %v", err)
	}
	_, err = r.batch(2,
		fileOp("d/f", "inside"),
		&tetherpb.FileOp{Kind: tetherpb.FileOp_KIND_MKDIR, Path: []byte("e/sub"), Mode: 0o755},
		&tetherpb.FileOp{Kind: tetherpb.FileOp_KIND_DELETE, Path: []byte("g/keep")},
	)
	if err != nil {
		t.Fatalf("batch 2 refused: %v", err)
	}
	if b, err := os.ReadFile(filepath.Join(data, "d", "f")); err != nil || string(b) != "inside" {
		t.Fatalf("d/f on the replica = %q, %v", b, err)
	}
	for _, d := range []string{"d", "e"} {
		if fi, err := os.Lstat(filepath.Join(data, d)); err != nil || !fi.IsDir() {
			t.Fatalf("%s should now be a real directory: %v %v", d, fi, err)
		}
	}
	entries, err := os.ReadDir(outside)
	must(t, err)
	if len(entries) != 1 || entries[0].Name() != "keep" {
		t.Fatalf("the directory outside the volume changed: %v", entries)
	}
}

// TestCutMidBatchAppliesNothing cuts a stream in the middle of a batch.
func TestCutMidBatchAppliesNothing(t *testing.T) {
	c := newTestCluster(t)
	c.startReplica("r1")
	r, err := openRaw(t, c, "r1", 1)
	must(t, err)
	if _, err := r.batch(1, fileOp("kept", "k")); err != nil {
		t.Fatal(err)
	}
	must(t, r.stream.Send(&tetherpb.StreamRequest{Kind: &tetherpb.StreamRequest_Op{Op: fileOp("lost", "l")}}))
	big := fileOp("partial", "first chunk")
	big.More = true
	must(t, r.stream.Send(&tetherpb.StreamRequest{Kind: &tetherpb.StreamRequest_Op{Op: big}}))
	r.cancel()

	// A new stream (which waits for the old one to end) sees position 1.
	r2, err := openRaw(t, c, "r1", 1)
	must(t, err)
	if r2.first.GetEpoch() != 1 || r2.first.GetSeq() != 1 {
		t.Fatalf("position after the cut = %v, want epoch 1 seq 1", r2.first)
	}
	m, err := Manifest(c.replicaPaths("r1").Data)
	must(t, err)
	if _, ok := m["lost"]; ok || len(m) != 2 {
		t.Fatalf("replica after a cut batch = %v, want only kept", m)
	}
	// The seq must increase within an epoch.
	if _, err := r2.batch(1, fileOp("again", "a")); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("a repeated seq answered %v, want InvalidArgument", err)
	}
}

// TestFenceDurable checks that a fence survives a restart of the replica.
func TestFenceDurable(t *testing.T) {
	c := newTestCluster(t)
	must(t, c.startReplica("r1").srv.Fence(testVolume, 3))
	c.stopReplica("r1")
	c.startReplica("r1")
	if _, err := openRaw(t, c, "r1", 2); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("epoch 2 after a fence at 3 answered %v, want FailedPrecondition", err)
	}
	r, err := openRaw(t, c, "r1", 3)
	must(t, err)
	if _, err := r.batch(1, fileOp("f", "x")); err != nil {
		t.Fatal(err)
	}
	// A fence never lowers the epoch.
	must(t, c.replica("r1").srv.Fence(testVolume, 1))
	if _, err := openRaw(t, c, "r1", 2); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("epoch 2 after fences at 3 and 1 answered %v, want FailedPrecondition", err)
	}
}

// TestUnknownVolume refuses a stream for a volume the node does not hold.
func TestUnknownVolume(t *testing.T) {
	c := newTestCluster(t)
	c.startReplica("r1")
	client, err := c.dial(context.Background(), "r1")
	must(t, err)
	stream, err := client.Stream(context.Background())
	must(t, err)
	must(t, stream.Send(&tetherpb.StreamRequest{Kind: &tetherpb.StreamRequest_Hello{
		Hello: &tetherpb.Hello{Volume: "other", Epoch: 1}}}))
	if _, err := stream.Recv(); status.Code(err) != codes.NotFound {
		t.Fatalf("unknown volume answered %v, want NotFound", err)
	}
}

// assertOnly fails when dir holds anything but names.
func assertOnly(t *testing.T, dir string, names ...string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	must(t, err)
	for _, e := range entries {
		if !slices.Contains(names, e.Name()) {
			t.Errorf("unexpected entry %q in %s", e.Name(), dir)
		}
	}
}

// TestRenameOps applies RENAME ops (which a primary may send) of files and
// directories, including over existing entries.
func TestRenameOps(t *testing.T) {
	c := newTestCluster(t)
	c.startReplica("r1")
	data := c.replicaPaths("r1").Data
	r, err := openRaw(t, c, "r1", 1)
	must(t, err)
	mkdir := func(p string) *tetherpb.FileOp {
		return &tetherpb.FileOp{Kind: tetherpb.FileOp_KIND_MKDIR, Path: []byte(p), Mode: 0o755}
	}
	rename := func(from, to string) *tetherpb.FileOp {
		return &tetherpb.FileOp{Kind: tetherpb.FileOp_KIND_RENAME, Path: []byte(from), NewPath: []byte(to)}
	}
	if _, err := r.batch(1, mkdir("d"), mkdir("d/e"), fileOp("d/e/f", "f"), fileOp("g", "g"), mkdir("full"), fileOp("full/x", "x")); err != nil {
		t.Fatal(err)
	}
	if _, err := r.batch(2, rename("d", "moved/deeper/d"), rename("g", "moved/g2"), rename("moved/g2", "full")); err != nil {
		t.Fatal(err)
	}
	m, err := Manifest(data)
	must(t, err)
	want := []string{".", "full", "moved", "moved/deeper", "moved/deeper/d", "moved/deeper/d/e", "moved/deeper/d/e/f"}
	if got := keys(m); !slices.Equal(got, want) {
		t.Fatalf("replica after renames = %q, want %q", got, want)
	}
	if m["full"].Type != "file" || m["full"].Size != 1 {
		t.Fatalf("full = %v, want the renamed file g", m["full"])
	}
	// A rename of something the replica does not have says it is not at
	// the cut the batch builds on: the batch is refused (DataLoss, so the
	// primary sends the whole tree) and changes nothing.
	_, err = r.batch(3, mkdir("new"), rename("missing", "nowhere"))
	if status.Code(err) != codes.DataLoss {
		t.Fatalf("batch renaming a missing path answered %v, want DataLoss", err)
	}
	m, err = Manifest(data)
	must(t, err)
	if got := keys(m); !slices.Equal(got, want) {
		t.Fatalf("replica after a refused batch = %q, want %q", got, want)
	}
}
