package replication

import (
	"bytes"
	"crypto/sha256"
	"encoding/gob"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tether-io/tether/proto/tetherpb"
)

// Files of the redo journal in Paths.State.
const (
	journalFile  = "journal"  // the batch's operations, referring to staged files
	commitFile   = "commit"   // commit record: "seq sha256(journal)"
	progressFile = "progress" // ops before this index are durable (written around renames)
)

// commitTemp is the commit record before the rename that commits a batch.
const commitTemp = "commit.tmp"

// failpoint is called at each step of committing a batch; a non-nil error
// stops the commit there, as a crash would. Tests use it; nil in production.
type failpoint func(step string) error

func (f failpoint) at(step string) error {
	if f == nil {
		return nil
	}
	return f(step)
}

// journalRecord is what the journal file holds: a batch's position and its
// validated operations, with staged contents named relative to the stage
// directory. gob keeps non-UTF-8 names intact.
type journalRecord struct {
	Epoch, Seq uint64
	CutNano    int64
	Full       bool
	Ops        []journalOp
}

type journalOp struct {
	Kind             int32
	Path, To, Target string
	Mode             uint32
	MtimeNano        int64
	UID, GID         uint32
	XattrNames       []string
	XattrValues      [][]byte
	Staged           string
	Size             int64
	Extents          []int64 // offset, length pairs
	// A delta (DeltaBlockSize > 0) patches the file in place: the blocks
	// listed are replaced by the staged data.
	DeltaBlockSize int64
	DeltaBlocks    []uint64
}

func toJournal(op applyOp) journalOp {
	j := journalOp{Kind: int32(op.kind), Path: op.path, To: op.to, Target: op.target, Mode: toWireMode(op.mode),
		MtimeNano: op.mtime.UnixNano(), UID: op.uid, GID: op.gid, Staged: filepath.Base(op.staged), Size: op.size}
	if op.staged == "" {
		j.Staged = ""
	}
	for _, x := range op.xattrs {
		j.XattrNames = append(j.XattrNames, x.name)
		j.XattrValues = append(j.XattrValues, x.value)
	}
	for _, e := range op.extents {
		j.Extents = append(j.Extents, e.off, e.n)
	}
	if op.delta != nil {
		j.DeltaBlockSize, j.DeltaBlocks = op.delta.blockSize, op.delta.blocks
	}
	return j
}

func fromJournal(j journalOp, stage string) (applyOp, error) {
	op := applyOp{kind: tetherpb.FileOp_Kind(j.Kind), path: j.Path, to: j.To, target: j.Target, mode: fromWireMode(j.Mode),
		mtime: time.Unix(0, j.MtimeNano), uid: j.UID, gid: j.GID, size: j.Size}
	if len(j.XattrNames) != len(j.XattrValues) || len(j.Extents)%2 != 0 || strings.ContainsRune(j.Staged, '/') {
		return op, errors.New("malformed journal entry")
	}
	if j.Staged != "" {
		op.staged = filepath.Join(stage, j.Staged)
	}
	for i, n := range j.XattrNames {
		op.xattrs = append(op.xattrs, xattr{name: n, value: j.XattrValues[i]})
	}
	for i := 0; i < len(j.Extents); i += 2 {
		op.extents = append(op.extents, extent{j.Extents[i], j.Extents[i+1]})
	}
	if j.DeltaBlockSize > 0 {
		op.delta = &deltaOp{blockSize: j.DeltaBlockSize, blocks: j.DeltaBlocks}
	}
	return op, nil
}

// journal applies batches on one replica volume through a redo journal.
type journal struct {
	paths Paths
	warn  *onceLogger
	fail  failpoint
	bases *baseCache // may be nil
	// written, if set, receives the stat of every file a batch wrote, as
	// soon as it was in place (see applier.written).
	written map[string]*indexEntry
}

func (j journal) stage() string { return filepath.Join(j.paths.State, stageDir) }

// commit makes a received batch durable in the journal, applies it in
// place, makes that durable, records pos, and clears the journal. A crash
// (or error) at any step leaves the volume at the previous cut (journal not
// committed) or lets recover finish the new one (journal committed).
func (j journal) commit(b *batch, pos position, full bool) error {
	if err := j.fail.at("staged"); err != nil {
		return err
	}
	if err := verifyBases(j.paths.Data, b.ops, full, j.bases); err != nil {
		return err
	}
	rec := journalRecord{Epoch: pos.Epoch, Seq: pos.Seq, CutNano: cutNano(pos.Cut), Full: full}
	for _, op := range b.ops {
		rec.Ops = append(rec.Ops, toJournal(op))
	}
	var buf bytes.Buffer
	if err := gob.NewEncoder(&buf).Encode(rec); err != nil {
		return fmt.Errorf("encode journal: %w", err)
	}
	if err := os.WriteFile(filepath.Join(j.paths.State, journalFile), buf.Bytes(), 0o600); err != nil {
		return fmt.Errorf("write journal: %w", err)
	}
	b.journaled = true // the staged files now belong to the journal
	sum := sha256.Sum256(buf.Bytes())
	record := fmt.Sprintf("%d %s\n", pos.Seq, hex.EncodeToString(sum[:]))
	if err := os.WriteFile(filepath.Join(j.paths.State, commitTemp), []byte(record), 0o600); err != nil {
		return fmt.Errorf("write journal commit record: %w", err)
	}
	// One syncfs makes the staged contents, the journal and the commit
	// record durable (the stage is inside the state directory); then the
	// rename of the record commits the batch.
	if err := syncFS(j.paths.State); err != nil {
		return fmt.Errorf("make staged contents and journal durable: %w", err)
	}
	if err := j.fail.at("journaled"); err != nil {
		return err
	}
	if err := os.Rename(filepath.Join(j.paths.State, commitTemp), filepath.Join(j.paths.State, commitFile)); err != nil {
		return fmt.Errorf("write journal commit record: %w", err)
	}
	if err := syncDir(j.paths.State); err != nil {
		return fmt.Errorf("write journal commit record: %w", err)
	}
	if err := j.fail.at("committed"); err != nil {
		return err
	}
	return j.finish(rec, false)
}

// finish applies a committed journal (again, after a crash, when replay is
// set), records its position and clears it.
func (j journal) finish(rec journalRecord, replay bool) error {
	ops := make([]applyOp, 0, len(rec.Ops))
	for _, o := range rec.Ops {
		op, err := fromJournal(o, j.stage())
		if err != nil {
			return fmt.Errorf("journal of batch %d: %w", rec.Seq, err)
		}
		ops = append(ops, op)
	}
	start, err := readProgress(j.paths.State)
	if err != nil {
		return err
	}
	root, err := os.OpenRoot(j.paths.Data)
	if err != nil {
		return fmt.Errorf("open volume data directory: %w", err)
	}
	defer root.Close()
	if err := applyOps(root, ops, rec.Full, start, replay, j.warn, j.markProgress, j.fail, j.written); err != nil {
		return fmt.Errorf("apply batch %d: %w", rec.Seq, err)
	}
	if err := j.fail.at("applied"); err != nil {
		return err
	}
	// The position's rename becomes durable with the commit record's
	// removal (one directory fsync in clear). A crash before then leaves
	// the journal to replay (which writes the position again) or, if only
	// the removal reached the disk, the previous position: the primary then
	// sends this batch again, and applying it over itself is harmless.
	pos := position{Epoch: rec.Epoch, Seq: rec.Seq, Cut: cutTime(rec.CutNano)}
	if err := writeFileSynced(j.paths.State, positionFile, positionLine(pos)); err != nil {
		return err
	}
	if err := j.fail.at("positioned"); err != nil {
		return err
	}
	return j.clear()
}

// markProgress durably records that the ops before next are durable.
func (j journal) markProgress(next int) error {
	return writeFileDurable(j.paths.State, progressFile, strconv.Itoa(next)+"\n")
}

// clear marks the journal applied: the commit record goes first (durably,
// together with the new position's rename, so that a later batch's staged
// files can never be taken for this one's), then the journal and the staged
// files.
func (j journal) clear() error {
	if err := os.Remove(filepath.Join(j.paths.State, commitFile)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("clear journal: %w", err)
	}
	if err := syncDir(j.paths.State); err != nil {
		return err
	}
	for _, f := range []string{journalFile, progressFile} {
		if err := os.Remove(filepath.Join(j.paths.State, f)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("clear journal: %w", err)
		}
	}
	return emptyDir(j.stage())
}

// emptyDir removes what dir holds (usually nothing: a batch's staged files
// were placed by rename), keeping dir.
func emptyDir(dir string) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return os.MkdirAll(dir, 0o700)
	}
	if err != nil {
		return fmt.Errorf("clear staging directory: %w", err)
	}
	for _, e := range entries {
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			return fmt.Errorf("clear staging directory: %w", err)
		}
	}
	return nil
}

// recover finishes a committed journal (re-applying it: applying is
// idempotent) or drops an uncommitted one. It reports whether it finished
// a batch.
func (j journal) recover(log *slog.Logger) (bool, error) {
	rec, ok, err := j.load()
	if err != nil {
		return false, err
	}
	if !ok {
		for _, f := range []string{journalFile, progressFile, applyingFile, commitTemp} {
			_ = os.Remove(filepath.Join(j.paths.State, f))
		}
		return false, nil
	}
	log.Warn("finishing a batch that was committed to the journal but not completely applied", "seq", rec.Seq)
	root, err := os.OpenRoot(j.paths.Data)
	if err != nil {
		return false, fmt.Errorf("open volume data directory: %w", err)
	}
	err = removeTemps(root, rootPath)
	_ = root.Close()
	if err != nil {
		return false, fmt.Errorf("remove temporary files of an interrupted batch: %w", err)
	}
	return true, j.finish(rec, true)
}

// load reads a committed journal; ok is false when there is none.
func (j journal) load() (rec journalRecord, ok bool, err error) {
	c, err := os.ReadFile(filepath.Join(j.paths.State, commitFile))
	if errors.Is(err, fs.ErrNotExist) {
		return rec, false, nil
	}
	if err != nil {
		return rec, false, fmt.Errorf("read journal commit record: %w", err)
	}
	fields := strings.Fields(string(c))
	data, err := os.ReadFile(filepath.Join(j.paths.State, journalFile))
	if err != nil {
		return rec, false, fmt.Errorf("read committed journal: %w", err)
	}
	sum := sha256.Sum256(data)
	if len(fields) != 2 || fields[1] != hex.EncodeToString(sum[:]) {
		return rec, false, fmt.Errorf("the committed journal in %s does not match its commit record: the replica's disk is corrupt; remove the volume's copy on this node to resync it", j.paths.State)
	}
	if err := gob.NewDecoder(bytes.NewReader(data)).Decode(&rec); err != nil {
		return rec, false, fmt.Errorf("decode committed journal: %w", err)
	}
	return rec, true, nil
}

// readProgress returns the op index a replay starts at (0 when none).
func readProgress(dir string) (int, error) {
	fields, err := readFields(filepath.Join(dir, progressFile), 1)
	if err != nil || fields == nil {
		return 0, err
	}
	return int(fields[0]), nil
}

// syncFS flushes the whole file system holding dir (syncfs(2)): one call
// makes every staged file or applied change durable, instead of one fsync
// per file and directory.
func syncFS(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := unix.Syncfs(int(d.Fd())); err != nil {
		return fmt.Errorf("syncfs %s: %w", dir, err)
	}
	return nil
}
