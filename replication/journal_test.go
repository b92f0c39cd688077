package replication

import (
	"bytes"
	"crypto/sha256"
	"encoding/gob"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

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

// crashRun checks a batch committed over cut first (committed whole
// before it) by stopping its commit at every step, as a crash would.
type crashRun struct {
	first  []*tetherpb.FileOp
	seq    uint64 // the position the batch commits
	commit func(j journal) error
}

// clean commits the batch without a crash: it returns the replica's tree
// before and after, the steps of the commit, and the replica's paths.
func (r crashRun) clean(t *testing.T) (oldCut, newCut map[string]Entry, steps []string, paths Paths) {
	t.Helper()
	paths = replicaDirs(t)
	j := journal{paths: paths, warn: newOnceLogger(testutil.Logger(t))}
	must(t, commitOps(t, j, 1, true, r.first))
	oldCut, err := Manifest(paths.Data)
	must(t, err)
	j.fail = func(step string) error { steps = append(steps, step); return nil }
	must(t, r.commit(j))
	newCut, err = Manifest(paths.Data)
	must(t, err)
	if len(DiffManifests(oldCut, newCut)) == 0 {
		t.Fatal("bad test setup: the batch changes nothing")
	}
	return oldCut, newCut, steps, paths
}

// crashAt commits the batch over cut first and crashes at step; after
// recovery the replica must hold the old cut or the new one, with the
// matching position, no temporary file, and take the next batch.
func (r crashRun) crashAt(t *testing.T, step string, oldCut, newCut map[string]Entry) {
	t.Helper()
	paths := replicaDirs(t)
	j := journal{paths: paths, warn: newOnceLogger(testutil.Logger(t))}
	must(t, commitOps(t, j, 1, true, r.first))
	j.fail = crashAt(step)
	if err := r.commit(j); !errors.Is(err, errCrash) {
		t.Fatalf("step %s: commit returned %v, want the injected crash", step, err)
	}
	// Restart: the journal is finished or dropped.
	j.fail = nil
	if _, err := j.recover(testutil.Logger(t)); err != nil {
		t.Fatalf("step %s: recover: %v", step, err)
	}
	got, err := Manifest(paths.Data)
	must(t, err)
	pos, err := durablePosition(paths.State)
	must(t, err)
	switch {
	case len(DiffManifests(got, oldCut)) == 0 && pos.Seq == 1:
	case len(DiffManifests(got, newCut)) == 0 && pos.Seq == r.seq:
	default:
		t.Fatalf("crash at %s: replica at seq %d is neither cut:\nvs old: %q\nvs new: %q",
			step, pos.Seq, DiffManifests(got, oldCut), DiffManifests(got, newCut))
	}
	for p := range got {
		if strings.Contains(p, tempPrefix) {
			t.Fatalf("step %s: temporary file %q left", step, p)
		}
	}
	must(t, commitOps(t, j, r.seq+1, false, []*tetherpb.FileOp{fileOp("after", "x")}))
}

// TestJournalCrashAtEveryStep stops the commit of a batch at every step (as
// a crash would), restarts, and checks that the replica holds either the
// previous cut or the new one, with the matching position, and no
// temporary files.
func TestJournalCrashAtEveryStep(t *testing.T) {
	first, second := cutOps()
	for _, full := range []bool{false, true} {
		t.Run(fmt.Sprintf("full %v", full), func(t *testing.T) {
			ops2 := second
			if full {
				ops2 = append(append([]*tetherpb.FileOp{}, first[:2]...), second[2:]...)
			}
			run := crashRun{first: first, seq: 2, commit: func(j journal) error { return commitOps(t, j, 2, full, ops2) }}
			oldCut, newCut, steps, _ := run.clean(t)
			if len(steps) < len(ops2)+4 {
				t.Fatalf("bad test setup: steps %q", steps)
			}
			for _, step := range steps {
				run.crashAt(t, step, oldCut, newCut)
			}
			t.Logf("%d crash points checked", len(steps))
		})
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
		if viaFence {
			// Serving the volume retires the journal: its batch is in the
			// position file, and no restart replays it.
			state := c.replicaPaths("r1").State
			if _, ok, err := lastCommit(state); err != nil || ok {
				t.Fatalf("a committed batch is still in the journal after Fence (%v)", err)
			}
			if pos, err := readPosition(state); err != nil || pos.Seq != 1 {
				t.Fatalf("position file after Fence = %v, %v; want seq 1", pos, err)
			}
		}
	}
}

// TestCommitRecord round-trips commit records and checks that anything but
// a whole record (zeros, a torn write, a flipped bit, another slot's
// generation) reads as no record.
func TestCommitRecord(t *testing.T) {
	rec := commitRecord{gen: 7, pos: position{Epoch: 3, Seq: 41, Cut: time.Unix(0, 1700000000123456789)}, full: true}
	rec.sum[0], rec.sum[31] = 0xab, 0x01
	enc := rec.encode()
	if len(enc) != commitSize {
		t.Fatalf("record is %d bytes, want %d", len(enc), commitSize)
	}
	got, ok := decodeCommitRecord(enc)
	if !ok || got.gen != rec.gen || got.pos != rec.pos || got.full != rec.full || got.sum != rec.sum {
		t.Fatalf("decoded %+v (%v), want %+v", got, ok, rec)
	}
	line := bytes.IndexByte(enc, '\n')
	flipped := bytes.Clone(enc)
	flipped[len(commitMagic)+1] ^= 1
	other := rec
	other.gen = 8
	cases := map[string][]byte{
		"zeros":        make([]byte, commitSize),
		"torn":         append(bytes.Clone(enc[:line/2]), make([]byte, commitSize-line/2)...),
		"no newline":   bytes.Clone(enc[:line]),
		"flipped bit":  flipped,
		"garbage":      []byte("tether-commit-1 x y z\n"),
		"other magic":  bytes.Replace(enc, []byte(commitMagic), []byte("tether-commit-9"), 1),
		"empty":        nil,
		"only the crc": []byte(" 00000000\n"),
	}
	for name, b := range cases {
		if r, ok := decodeCommitRecord(b); ok {
			t.Errorf("%s: decoded as %+v", name, r)
		}
	}
	// A record is valid only in its own slot.
	dir := t.TempDir()
	must(t, os.WriteFile(filepath.Join(dir, commitPrefix+"0"), enc, 0o600)) // gen 7 belongs in slot 1
	must(t, os.WriteFile(filepath.Join(dir, commitPrefix+"1"), other.encode(), 0o600))
	if recs, err := readCommits(dir); err != nil || len(recs) != 0 {
		t.Fatalf("records in the wrong slots read as %+v, %v", recs, err)
	}
}

// TestTornCommitRecordKeepsPreviousCut: a crash while the commit record of
// a batch is written (it is torn) leaves the previous batch the last
// committed one: the replica recovers to the previous cut.
func TestTornCommitRecordKeepsPreviousCut(t *testing.T) {
	first, second := cutOps()
	paths := replicaDirs(t)
	j := journal{paths: paths, warn: newOnceLogger(testutil.Logger(t))}
	must(t, commitOps(t, j, 1, true, first))
	oldCut, err := Manifest(paths.Data)
	must(t, err)
	j.fail = crashAt("journaled")
	if err := commitOps(t, j, 2, false, second); !errors.Is(err, errCrash) {
		t.Fatalf("commit returned %v, want the injected crash", err)
	}
	// The record of generation 2 reached the disk half written.
	whole := commitRecord{gen: 2, pos: position{Epoch: 1, Seq: 2}}.encode()
	torn := append(whole[:20:20], make([]byte, commitSize-20)...)
	must(t, os.WriteFile(filepath.Join(paths.State, commitPrefix+slotOf(2)), torn, 0o600))
	j.fail = nil
	if _, err := j.recover(testutil.Logger(t)); err != nil {
		t.Fatal(err)
	}
	got, err := Manifest(paths.Data)
	must(t, err)
	if d := DiffManifests(got, oldCut); len(d) > 0 {
		t.Fatalf("replica is not at the previous cut: %q", d)
	}
	if pos, err := durablePosition(paths.State); err != nil || pos.Seq != 1 {
		t.Fatalf("position = %v, %v; want seq 1", pos, err)
	}
	must(t, commitOps(t, j, 2, false, second))
	if pos, err := durablePosition(paths.State); err != nil || pos.Seq != 2 {
		t.Fatalf("position after the batch is sent again = %v, %v; want seq 2", pos, err)
	}
}

// TestRetiredJournalIsNeverReplayed: once a replica serves the volume
// (Fence retires its journal), nothing a later restart does replays the
// last replicated batch over what the node wrote as primary.
func TestRetiredJournalIsNeverReplayed(t *testing.T) {
	first, _ := cutOps()
	paths := replicaDirs(t)
	var st journalState
	j := journal{paths: paths, warn: newOnceLogger(testutil.Logger(t)), state: &st}
	must(t, commitOps(t, j, 1, true, first))
	must(t, j.retire(testutil.Logger(t)))
	for _, f := range []string{commitPrefix + "0", commitPrefix + "1", journalPrefix + "0", journalPrefix + "1"} {
		if _, err := os.Stat(filepath.Join(paths.State, f)); !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("%s is still there after retire (%v)", f, err)
		}
	}
	// As primary, the node rewrites and removes files the batch wrote.
	must(t, os.WriteFile(filepath.Join(paths.Data, "d/a"), []byte("written as primary"), 0o644))
	must(t, os.RemoveAll(filepath.Join(paths.Data, "gone")))
	before, err := Manifest(paths.Data)
	must(t, err)
	// A restart: a new process knows nothing of the journal.
	fresh := journal{paths: paths, warn: newOnceLogger(testutil.Logger(t))}
	if replayed, err := fresh.recover(testutil.Logger(t)); err != nil || replayed {
		t.Fatalf("recover after retire: replayed %v, %v", replayed, err)
	}
	after, err := Manifest(paths.Data)
	must(t, err)
	if d := DiffManifests(before, after); len(d) > 0 {
		t.Fatalf("a restart changed what the node wrote as primary: %q", d)
	}
	if pos, err := durablePosition(paths.State); err != nil || pos.Seq != 1 {
		t.Fatalf("position after retire = %v, %v; want seq 1", pos, err)
	}
	// A crash between the position file and the removal of the records
	// leaves records that the position file already holds: not replayed.
	must(t, writeCommit(paths.State, commitRecord{gen: 5, pos: position{Epoch: 1, Seq: 1}}))
	if _, ok, err := lastCommit(paths.State); err != nil || ok {
		t.Fatalf("a record the position file holds counts as committed (%v)", err)
	}
}

// TestStagedFilesOutliveTheirBatchUntilTheNextCommits: the staged data a
// batch keeps after its application (a delta's blocks) stays until the
// next batch is committed (a replay may need it), and goes then.
func TestStagedFilesOutliveTheirBatchUntilTheNextCommits(t *testing.T) {
	src, ops1, ops2 := oneBlockDelta(t)
	paths := replicaDirs(t)
	var st journalState
	j := journal{paths: paths, warn: newOnceLogger(testutil.Logger(t)), state: &st}
	must(t, commitOps(t, j, 1, true, append([]*tetherpb.FileOp{mkdirOp(".", 0o755, 1)}, ops1...)))
	must(t, commitOps(t, j, 2, false, ops2))
	stage := func() []string {
		entries, err := os.ReadDir(j.stage())
		must(t, err)
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		return names
	}
	if s := stage(); len(s) != 1 {
		t.Fatalf("after the delta batch the stage holds %q, want its staged data", s)
	}
	// A restart replays the delta batch from its staged data.
	fresh := journal{paths: paths, warn: newOnceLogger(testutil.Logger(t))}
	if replayed, err := fresh.recover(testutil.Logger(t)); err != nil || !replayed {
		t.Fatalf("recover: replayed %v, %v", replayed, err)
	}
	must(t, commitOps(t, j, 3, false, []*tetherpb.FileOp{fileOp("g", "new")}))
	if s := stage(); len(s) != 0 {
		t.Fatalf("after the next batch committed the stage still holds %q", s)
	}
	want, err := os.ReadFile(filepath.Join(src, "f"))
	must(t, err)
	got, err := os.ReadFile(filepath.Join(paths.Data, "f"))
	must(t, err)
	if !bytes.Equal(got, want) {
		t.Fatal("the patched file differs from the primary's")
	}
}

// TestLegacyJournalFinished: a journal an earlier version committed (one
// journal file, a "seq sha256" record renamed into place) is finished
// once, its position recorded, and its files removed.
func TestLegacyJournalFinished(t *testing.T) {
	first, _ := cutOps()
	paths := replicaDirs(t)
	b := newBatch(filepath.Join(paths.State, stageDir))
	for _, op := range first {
		must(t, b.add(op))
	}
	rec := journalRecord{Epoch: 1, Seq: 9, CutNano: 77, Full: true}
	for _, op := range b.ops {
		rec.Ops = append(rec.Ops, toJournal(op))
	}
	var buf bytes.Buffer
	must(t, gob.NewEncoder(&buf).Encode(rec))
	must(t, os.WriteFile(filepath.Join(paths.State, legacyJournalFile), buf.Bytes(), 0o600))
	sum := sha256.Sum256(buf.Bytes())
	must(t, os.WriteFile(filepath.Join(paths.State, legacyCommitFile), []byte(fmt.Sprintf("9 %x\n", sum)), 0o600))
	must(t, os.WriteFile(filepath.Join(paths.State, progressFile), []byte("0\n"), 0o600))

	j := journal{paths: paths, warn: newOnceLogger(testutil.Logger(t))}
	if done, err := j.recover(testutil.Logger(t)); err != nil || !done {
		t.Fatalf("recover: finished %v, %v", done, err)
	}
	if got, err := os.ReadFile(filepath.Join(paths.Data, "d/a")); err != nil || string(got) != "a1" {
		t.Fatalf("d/a = %q, %v", got, err)
	}
	if pos, err := durablePosition(paths.State); err != nil || pos.Epoch != 1 || pos.Seq != 9 {
		t.Fatalf("position = %v, %v; want epoch 1 seq 9", pos, err)
	}
	for _, f := range []string{legacyJournalFile, legacyCommitFile, progressFile} {
		if _, err := os.Stat(filepath.Join(paths.State, f)); !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("%s left after recovery (%v)", f, err)
		}
	}
	// The next batch goes through the new journal.
	must(t, commitOps(t, j, 10, false, []*tetherpb.FileOp{fileOp("after", "x")}))
	if pos, err := durablePosition(paths.State); err != nil || pos.Seq != 10 {
		t.Fatalf("position = %v, %v; want seq 10", pos, err)
	}
}

// TestSpaceForInPlaceWrites: a batch whose in-place writes (deltas; every
// file when the stage is on another file system) do not fit in the free
// space is refused with ENOSPC before its commit.
func TestSpaceForInPlaceWrites(t *testing.T) {
	ops := []applyOp{
		{kind: tetherpb.FileOp_KIND_FILE, extents: []extent{{0, 100}, {200, 50}}},
		{kind: tetherpb.FileOp_KIND_FILE, extents: []extent{{0, 4096}}, delta: &deltaOp{blockSize: 4096, blocks: []uint64{0}}},
		{kind: tetherpb.FileOp_KIND_MKDIR},
	}
	if got := inPlaceBytes(ops, true); got != 4096 {
		t.Fatalf("in place, stage on the volume's file system: %d bytes, want 4096 (the delta)", got)
	}
	if got := inPlaceBytes(ops, false); got != 4096+150 {
		t.Fatalf("in place, stage elsewhere: %d bytes, want %d (copies too)", got, 4096+150)
	}
	if err := enoughSpace(4096, 4096+spaceSlack); err != nil {
		t.Fatalf("room enough: %v", err)
	}
	if err := enoughSpace(4096, 4095+spaceSlack); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("no room: %v, want ENOSPC", err)
	}
	if err := checkSpace(t.TempDir(), 1<<62); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("checkSpace of an impossible batch: %v, want ENOSPC", err)
	}
	if err := checkSpace(t.TempDir(), 0); err != nil {
		t.Fatalf("checkSpace with nothing written in place: %v", err)
	}
}
