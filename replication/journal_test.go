package replication

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tether-io/tether/internal/testutil"
	"github.com/tether-io/tether/proto/tetherpb"
)

var errCrash = errors.New("injected crash")

// crashAt is a failpoint that crashes (errCrash) at step.
func crashAt(step string) failpoint {
	return func(s string) error {
		if s == step {
			return errCrash
		}
		return nil
	}
}

func mkdirOp(p string, mode uint32, mtime int64) *tetherpb.FileOp {
	return &tetherpb.FileOp{Kind: tetherpb.FileOp_KIND_MKDIR, Path: []byte(p), Mode: mode, MtimeUnixNano: mtime}
}

// cutOps are two consecutive cuts of a volume, as a primary sends them.
func cutOps() (first, second []*tetherpb.FileOp) {
	sparse := &tetherpb.FileOp{Kind: tetherpb.FileOp_KIND_FILE, Path: []byte("d/sparse"), Data: []byte("tail"),
		Offset: 1 << 20, Size: 2 << 20, Mode: 0o600, MtimeUnixNano: 5}
	first = []*tetherpb.FileOp{
		mkdirOp(".", 0o755, 1), mkdirOp("d", 0o755, 2), mkdirOp("gone", 0o700, 3),
		fileOp("d/a", "a1"), fileOp("d/b", "b1"), fileOp("gone/x", "x"), fileOp("keep", "k"),
		symlinkOp("link", "d/a"),
	}
	second = []*tetherpb.FileOp{
		{Kind: tetherpb.FileOp_KIND_DELETE, Path: []byte("gone")},
		{Kind: tetherpb.FileOp_KIND_RENAME, Path: []byte("keep"), NewPath: []byte("d/kept")},
		mkdirOp(".", 0o711, 10), mkdirOp("d", 0o750, 11), mkdirOp("new", 0o700, 12), mkdirOp("new/deep", 0o755, 13),
		fileOp("d/a", "a2"), fileOp("d/b", "b2 longer"), sparse,
		{Kind: tetherpb.FileOp_KIND_HARDLINK, Path: []byte("new/a-link"), HardlinkTo: []byte("d/a")},
		fileOp("new/deep/f", "f"), symlinkOp("link", "d/b"),
		{Kind: tetherpb.FileOp_KIND_FIFO, Path: []byte("new/fifo"), Mode: 0o640, MtimeUnixNano: 14},
	}
	return first, second
}

// replicaDirs makes the directories of a replica volume.
func replicaDirs(t *testing.T) Paths {
	base := t.TempDir()
	p := Paths{Data: filepath.Join(base, "data"), State: filepath.Join(base, "state")}
	must(t, os.MkdirAll(p.Data, 0o755))
	must(t, resetDir(filepath.Join(p.State, stageDir)))
	return p
}

// commitOps stages ops as a batch and commits it through the journal.
func commitOps(t *testing.T, j journal, seq uint64, full bool, ops []*tetherpb.FileOp) error {
	t.Helper()
	b := newBatch(j.stage())
	defer b.discard()
	for _, op := range ops {
		must(t, b.add(op))
	}
	must(t, b.complete())
	return j.commit(b, position{Epoch: 1, Seq: seq}, full)
}

// TestJournalCrashAtEveryStep stops the commit of a batch at every step (as
// a crash would), restarts, and checks that the replica holds either the
// previous cut or the new one, with the matching position, and no
// temporary files.
func TestJournalCrashAtEveryStep(t *testing.T) {
	first, second := cutOps()
	for _, full := range []bool{false, true} {
		ops2 := second
		if full {
			ops2 = append(append([]*tetherpb.FileOp{}, first[:2]...), second[2:]...)
		}
		// A clean run gives the two cuts and the list of steps.
		var steps []string
		clean := replicaDirs(t)
		j := journal{paths: clean, warn: newOnceLogger(testutil.Logger(t))}
		must(t, commitOps(t, j, 1, true, first))
		oldCut, err := Manifest(clean.Data)
		must(t, err)
		j.fail = func(step string) error { steps = append(steps, step); return nil }
		must(t, commitOps(t, j, 2, full, ops2))
		newCut, err := Manifest(clean.Data)
		must(t, err)
		if len(DiffManifests(oldCut, newCut)) == 0 || len(steps) < len(ops2)+4 {
			t.Fatalf("bad test setup: cuts equal or steps %q", steps)
		}
		for _, step := range steps {
			paths := replicaDirs(t)
			j := journal{paths: paths, warn: newOnceLogger(testutil.Logger(t))}
			must(t, commitOps(t, j, 1, true, first))
			j.fail = crashAt(step)
			if err := commitOps(t, j, 2, full, ops2); !errors.Is(err, errCrash) {
				t.Fatalf("full=%v step %s: commit returned %v, want the injected crash", full, step, err)
			}
			// Restart: the journal is finished or dropped.
			j.fail = nil
			if _, err := j.recover(testutil.Logger(t)); err != nil {
				t.Fatalf("full=%v step %s: recover: %v", full, step, err)
			}
			got, err := Manifest(paths.Data)
			must(t, err)
			pos, err := readPosition(paths.State)
			must(t, err)
			switch {
			case len(DiffManifests(got, oldCut)) == 0 && pos.Seq == 1:
			case len(DiffManifests(got, newCut)) == 0 && pos.Seq == 2:
			default:
				t.Fatalf("full=%v crash at %s: replica at seq %d is neither cut:\nvs old: %q\nvs new: %q",
					full, step, pos.Seq, DiffManifests(got, oldCut), DiffManifests(got, newCut))
			}
			for p := range got {
				if strings.Contains(p, tempPrefix) {
					t.Fatalf("full=%v step %s: temporary file %q left", full, step, p)
				}
			}
			// The next batch applies normally.
			must(t, commitOps(t, j, 3, false, []*tetherpb.FileOp{fileOp("after", "x")}))
		}
		t.Logf("full=%v: %d crash points checked", full, len(steps))
	}
}

// TestServerFinishesJournal crashes a replica's commit through a real
// stream and checks that the next stream, and Fence, finish the batch.
func TestServerFinishesJournal(t *testing.T) {
	first, second := cutOps()
	for _, viaFence := range []bool{false, true} {
		c := newTestCluster(t)
		r := c.startReplica("r1")
		r.srv.setFailpoint(func(s string) error {
			if s == "op 3" {
				return errCrash
			}
			return nil
		})
		rs, err := openRaw(t, c, "r1", 1)
		must(t, err)
		if _, err := rs.batch(1, first...); status.Code(err) != codes.Internal {
			t.Fatalf("crashed batch answered %v, want Internal", err)
		}
		r.srv.setFailpoint(nil)
		c.stopReplica("r1")
		r = c.startReplica("r1")
		if viaFence {
			must(t, r.srv.Fence(testVolume, 2))
		} else {
			rs, err = openRaw(t, c, "r1", 1)
			must(t, err)
			if rs.first.GetSeq() != 1 {
				t.Fatalf("position after recovery = %v, want seq 1", rs.first)
			}
			if _, err := rs.batch(2, second...); err != nil {
				t.Fatal(err)
			}
		}
		if _, seq, _, err := r.srv.Position(testVolume); err != nil || seq == 0 {
			t.Fatalf("position = %d, %v", seq, err)
		}
		if _, err := os.Stat(filepath.Join(c.replicaPaths("r1").State, commitFile)); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("commit record still there: %v", err)
		}
	}
}
