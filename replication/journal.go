package replication

import (
	"bytes"
	"crypto/sha256"
	"encoding/gob"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/crc32"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tether-io/tether/proto/tetherpb"
)

// Files of the redo journal in Paths.State. Two slots alternate, by the
// parity of a batch's generation (see DESIGN.md, "Applying on the
// replica"): journal.N holds a batch's operations, commit.N its commit
// record; the valid record of the highest generation names the last
// committed batch, which is the replica's durable position.
const (
	journalPrefix = "journal." // + slot: the batch's operations, referring to staged files
	commitPrefix  = "commit."  // + slot: commit record (commitRecord), one sector, rewritten in place
	progressFile  = "progress" // "next gen": ops of batch gen before next are durable (written around renames)
)

// Files an earlier version kept, recovered once and removed.
const (
	legacyJournalFile = "journal" // the batch's operations
	legacyCommitFile  = "commit"  // "seq sha256(journal)", renamed into place
	legacyCommitTemp  = "commit.tmp"
)

// commitSize is the size of a commit record file: one sector, written in
// place (no allocation, so fdatasync has no metadata to journal).
const commitSize = 512

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
	Gen        uint64 // the batch's generation; 0 in an earlier version's journal
	Epoch, Seq uint64
	CutNano    int64
	Full       bool
	Ops        []journalOp
	// Segments holds the index of the first op of each cut the batch was
	// continued with (none: one cut; see batch.cont).
	Segments []int
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
	// state is what this process knows of the journal (nil: nothing, so
	// recover replays the last committed batch).
	state *journalState
}

// journalState is what a process knows of a volume's journal beyond what
// its files say.
type journalState struct {
	applied uint64 // generation of the last batch this process applied whole
	synced  bool   // and whether that application was made durable since
}

func (j journal) stage() string { return filepath.Join(j.paths.State, stageDir) }

// commitRecord is the content of a commit slot: the batch's generation,
// position and full flag, and the checksum of its journal.
type commitRecord struct {
	gen  uint64
	pos  position
	full bool
	sum  [sha256.Size]byte
}

const commitMagic = "tether-commit-1"

// slotOf is the slot (0 or 1) of a generation.
func slotOf(gen uint64) string { return strconv.FormatUint(gen%2, 10) }

// encode gives the sector a record is written as: one line with its own
// CRC, padded with zeros. A torn write fails the CRC.
func (r commitRecord) encode() []byte {
	line := fmt.Sprintf("%s %d %d %d %d %t %x", commitMagic, r.gen, r.pos.Epoch, r.pos.Seq, cutNano(r.pos.Cut), r.full, r.sum)
	line = fmt.Sprintf("%s %08x\n", line, crc32.ChecksumIEEE([]byte(line)))
	buf := make([]byte, commitSize)
	copy(buf, line)
	return buf
}

// decodeCommitRecord parses a commit slot; ok is false for anything but a
// whole record (zeros, a torn write, garbage).
func decodeCommitRecord(b []byte) (r commitRecord, ok bool) {
	end := bytes.IndexByte(b, '\n')
	if end < 0 {
		return r, false
	}
	line := string(b[:end])
	cut := strings.LastIndexByte(line, ' ')
	if cut < 0 || line[cut+1:] != fmt.Sprintf("%08x", crc32.ChecksumIEEE([]byte(line[:cut]))) {
		return r, false
	}
	f := strings.Fields(line[:cut])
	if len(f) != 7 || f[0] != commitMagic {
		return r, false
	}
	var nums [4]uint64
	for i := range nums {
		n, err := strconv.ParseUint(f[1+i], 10, 64)
		if err != nil {
			return r, false
		}
		nums[i] = n
	}
	full, err := strconv.ParseBool(f[5])
	sum, herr := hex.DecodeString(f[6])
	if err != nil || herr != nil || len(sum) != sha256.Size {
		return r, false
	}
	r = commitRecord{gen: nums[0], pos: position{Epoch: nums[1], Seq: nums[2], Cut: cutTime(int64(nums[3]))}, full: full}
	copy(r.sum[:], sum)
	return r, true
}

// newer reports whether a follows b in the order batches are accepted.
func (a position) newer(b position) bool {
	return a.Epoch > b.Epoch || (a.Epoch == b.Epoch && a.Seq > b.Seq)
}

// readCommits returns the valid records of both slots.
func readCommits(dir string) ([]commitRecord, error) {
	var out []commitRecord
	for _, slot := range []string{"0", "1"} {
		b, err := os.ReadFile(filepath.Join(dir, commitPrefix+slot))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("read journal commit record: %w", err)
		}
		if r, ok := decodeCommitRecord(b); ok && slotOf(r.gen) == slot {
			out = append(out, r)
		}
	}
	return out, nil
}

// lastCommit returns the record of the last committed batch: the valid
// record of the highest generation, unless the position file (written
// when a journal is retired) already holds its batch.
func lastCommit(dir string) (rec commitRecord, ok bool, err error) {
	recs, err := readCommits(dir)
	if err != nil {
		return rec, false, err
	}
	for _, r := range recs {
		if !ok || r.gen > rec.gen {
			rec, ok = r, true
		}
	}
	if !ok {
		return rec, false, nil
	}
	retired, err := readPosition(dir)
	if err != nil {
		return rec, false, err
	}
	return rec, rec.pos.newer(retired), nil
}

// durablePosition is the last batch durable on a replica: the last
// committed one, or the one the position file records.
func durablePosition(dir string) (position, error) {
	rec, ok, err := lastCommit(dir)
	if err != nil || ok {
		return rec.pos, err
	}
	return readPosition(dir)
}

// writeCommit writes rec into its slot, in place, and makes it durable.
func writeCommit(dir string, rec commitRecord) error {
	name := filepath.Join(dir, commitPrefix+slotOf(rec.gen))
	f, err := os.OpenFile(name, os.O_WRONLY, 0)
	created := false
	if errors.Is(err, fs.ErrNotExist) {
		f, err = os.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		created = true
	}
	if err != nil {
		return fmt.Errorf("write journal commit record: %w", err)
	}
	_, err = f.WriteAt(rec.encode(), 0)
	if err == nil {
		err = unix.Fdatasync(int(f.Fd()))
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil && created {
		err = syncDir(dir)
	}
	if err != nil {
		return fmt.Errorf("write journal commit record: %w", err)
	}
	return nil
}

// commit makes a received batch durable in the journal and applies it in
// place. The batch is committed once its record is in its slot: a crash
// before leaves the volume at the previous cut (recover replays that
// batch, harmlessly), a crash after lets recover finish the new one. Its
// application is made durable by the next batch's syncfs, before that
// batch's record replaces this one as the last committed.
func (j journal) commit(b *batch, pos position, full bool) error {
	if err := j.fail.at("staged"); err != nil {
		return err
	}
	if err := verifyBases(j.paths.Data, b.ops, b.segments, full, j.bases); err != nil {
		return err
	}
	same, err := sameFS(j.paths.Data, j.paths.State)
	if err != nil {
		return err
	}
	if err := checkSpace(j.paths.Data, inPlaceBytes(b.ops, same)); err != nil {
		return err
	}
	recs, err := readCommits(j.paths.State)
	if err != nil {
		return err
	}
	gen := uint64(1)
	for _, r := range recs {
		gen = max(gen, r.gen+1)
	}
	rec := journalRecord{Gen: gen, Epoch: pos.Epoch, Seq: pos.Seq, CutNano: cutNano(pos.Cut), Full: full, Segments: b.segments}
	for _, op := range b.ops {
		rec.Ops = append(rec.Ops, toJournal(op))
	}
	var buf bytes.Buffer
	if err := gob.NewEncoder(&buf).Encode(rec); err != nil {
		return fmt.Errorf("encode journal: %w", err)
	}
	if err := os.WriteFile(filepath.Join(j.paths.State, journalPrefix+slotOf(gen)), buf.Bytes(), 0o600); err != nil {
		return fmt.Errorf("write journal: %w", err)
	}
	b.journaled = true // the staged files now belong to the journal
	// One syncfs makes the staged contents and the journal durable (the
	// stage is inside the state directory), and with them the previous
	// batch's application when the volume's data is on the same file
	// system (else a syncfs of its own): the previous batch never needs
	// replaying once this one's record is written.
	if !same {
		if err := syncFS(j.paths.Data); err != nil {
			return fmt.Errorf("make the previous batch's application durable: %w", err)
		}
	}
	if err := syncFS(j.paths.State); err != nil {
		return fmt.Errorf("make staged contents and journal durable: %w", err)
	}
	if err := j.fail.at("journaled"); err != nil {
		return err
	}
	if err := writeCommit(j.paths.State, commitRecord{gen: gen, pos: pos, full: full, sum: sha256.Sum256(buf.Bytes())}); err != nil {
		return err
	}
	if err := j.fail.at("committed"); err != nil {
		return err
	}
	// The staged files earlier batches left (a delta's data, a copy across
	// file systems) are no longer needed: their application is durable.
	if err := dropStaged(j.stage(), b.token); err != nil {
		return err
	}
	if j.state != nil {
		j.state.applied = 0
	}
	if err := j.apply(rec, false); err != nil {
		return err
	}
	if j.state != nil {
		*j.state = journalState{applied: gen}
	}
	return nil
}

// apply applies a committed journal (again, after a crash, when replay is
// set), from where its progress record says a replay starts.
func (j journal) apply(rec journalRecord, replay bool) error {
	ops := make([]applyOp, 0, len(rec.Ops))
	for _, o := range rec.Ops {
		op, err := fromJournal(o, j.stage())
		if err != nil {
			return fmt.Errorf("journal of batch %d: %w", rec.Seq, err)
		}
		ops = append(ops, op)
	}
	var from progress
	if replay {
		var err error
		if from, err = readProgress(j.paths.State, rec.Gen); err != nil {
			return err
		}
	}
	root, err := os.OpenRoot(j.paths.Data)
	if err != nil {
		return fmt.Errorf("open volume data directory: %w", err)
	}
	defer root.Close()
	mark := func(at progress) error { return j.markProgress(rec.Gen, at) }
	if err := applyOps(root, ops, rec.Segments, rec.Full, from, replay, j.warn, mark, j.fail, j.written); err != nil {
		return fmt.Errorf("apply batch %d: %w", rec.Seq, err)
	}
	return j.fail.at("applied")
}

// markProgress durably records that the ops of batch gen before at are
// durable (at.next, in segment at.seg).
func (j journal) markProgress(gen uint64, at progress) error {
	return writeFileDurable(j.paths.State, progressFile, fmt.Sprintf("%d %d %d\n", at.next, gen, at.seg))
}

// readProgress returns where a replay of batch gen starts (the first op
// when no progress of that batch is recorded).
func readProgress(dir string, gen uint64) (progress, error) {
	b, err := os.ReadFile(filepath.Join(dir, progressFile))
	if errors.Is(err, fs.ErrNotExist) {
		return progress{}, nil
	}
	if err != nil {
		return progress{}, fmt.Errorf("read journal progress: %w", err)
	}
	f := strings.Fields(string(b))
	if len(f) == 1 && gen == 0 {
		f = append(f, "0") // an earlier version's record
	}
	if len(f) == 2 {
		f = append(f, "0") // before batches had segments
	}
	if len(f) != 3 || f[1] != strconv.FormatUint(gen, 10) {
		return progress{}, nil // another batch's
	}
	next, err := strconv.Atoi(f[0])
	seg, serr := strconv.Atoi(f[2])
	if err != nil || serr != nil || next < 0 || seg < 0 {
		return progress{}, fmt.Errorf("journal progress record %q is corrupt", b)
	}
	return progress{next: next, seg: seg}, nil
}

// dropStaged removes from the stage what batches other than the one
// named token left.
func dropStaged(dir, token string) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("clear staging directory: %w", err)
	}
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), token+"-") {
			if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
				return fmt.Errorf("clear staging directory: %w", err)
			}
		}
	}
	return nil
}

// recover brings the volume to its last committed batch after a restart:
// it replays that batch (its application may not all have reached the
// disk; applying is idempotent) and makes it durable. When this process
// applied it itself, only the sync is left. It reports whether it
// replayed a batch.
func (j journal) recover(log *slog.Logger) (bool, error) {
	if done, err := j.recoverLegacy(log); err != nil || done {
		return done, err
	}
	last, ok, err := lastCommit(j.paths.State)
	if err != nil {
		return false, err
	}
	if !ok {
		for _, f := range []string{journalPrefix + "0", journalPrefix + "1", progressFile, applyingFile} {
			_ = os.Remove(filepath.Join(j.paths.State, f))
		}
		return false, nil
	}
	if j.state != nil && j.state.applied == last.gen {
		if !j.state.synced {
			if err := syncFS(j.paths.Data); err != nil {
				return false, fmt.Errorf("make the last batch's application durable: %w", err)
			}
			j.state.synced = true
		}
		return false, nil
	}
	rec, err := j.load(last)
	if err != nil {
		return false, err
	}
	log.Info("replaying the last committed batch: its application may not all have reached the disk before a restart", "seq", rec.Seq)
	if err := j.replay(rec); err != nil {
		return false, err
	}
	if j.state != nil {
		*j.state = journalState{applied: last.gen, synced: true}
	}
	return true, nil
}

// replay applies rec again over a partial or complete application and
// makes the result durable.
func (j journal) replay(rec journalRecord) error {
	root, err := os.OpenRoot(j.paths.Data)
	if err != nil {
		return fmt.Errorf("open volume data directory: %w", err)
	}
	err = removeTemps(root, rootPath)
	_ = root.Close()
	if err != nil {
		return fmt.Errorf("remove temporary files of an interrupted batch: %w", err)
	}
	if err := j.apply(rec, true); err != nil {
		return err
	}
	if err := syncFS(j.paths.Data); err != nil {
		return fmt.Errorf("make the replayed batch durable: %w", err)
	}
	return nil
}

// retire is called before this node serves the volume as its primary: the
// last committed batch is finished and durable, its position goes to the
// position file, and the journal is removed, so that no later restart
// replays a replicated batch over what this node writes.
func (j journal) retire(log *slog.Logger) error {
	if _, err := j.recover(log); err != nil {
		return err
	}
	last, ok, err := lastCommit(j.paths.State)
	if err != nil {
		return err
	}
	if ok {
		if err := writeFileDurable(j.paths.State, positionFile, positionLine(last.pos)); err != nil {
			return err
		}
	}
	for _, f := range []string{commitPrefix + "0", commitPrefix + "1", journalPrefix + "0", journalPrefix + "1", progressFile} {
		if err := os.Remove(filepath.Join(j.paths.State, f)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("retire the replica's journal: %w", err)
		}
	}
	if j.state != nil {
		*j.state = journalState{}
	}
	return syncDir(j.paths.State)
}

// load reads the journal a commit record names and checks it against the
// record.
func (j journal) load(last commitRecord) (rec journalRecord, err error) {
	data, err := os.ReadFile(filepath.Join(j.paths.State, journalPrefix+slotOf(last.gen)))
	if err != nil {
		return rec, fmt.Errorf("read committed journal: %w", err)
	}
	if sha256.Sum256(data) != last.sum {
		return rec, fmt.Errorf("the committed journal in %s does not match its commit record: the replica's disk is corrupt; remove the volume's copy on this node to resync it", j.paths.State)
	}
	if err := gob.NewDecoder(bytes.NewReader(data)).Decode(&rec); err != nil {
		return rec, fmt.Errorf("decode committed journal: %w", err)
	}
	if rec.Gen != last.gen {
		return rec, fmt.Errorf("the committed journal in %s is of batch generation %d, its commit record of %d: the replica's disk is corrupt; remove the volume's copy on this node to resync it", j.paths.State, rec.Gen, last.gen)
	}
	return rec, nil
}

// recoverLegacy finishes a journal an earlier version committed (one
// journal file, committed by renaming its record into place), records its
// position and removes it.
func (j journal) recoverLegacy(log *slog.Logger) (bool, error) {
	state := j.paths.State
	c, err := os.ReadFile(filepath.Join(state, legacyCommitFile))
	if errors.Is(err, fs.ErrNotExist) {
		for _, f := range []string{legacyJournalFile, legacyCommitTemp} {
			_ = os.Remove(filepath.Join(state, f))
		}
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("read journal commit record: %w", err)
	}
	fields := strings.Fields(string(c))
	data, err := os.ReadFile(filepath.Join(state, legacyJournalFile))
	if err != nil {
		return false, fmt.Errorf("read committed journal: %w", err)
	}
	sum := sha256.Sum256(data)
	if len(fields) != 2 || fields[1] != hex.EncodeToString(sum[:]) {
		return false, fmt.Errorf("the committed journal in %s does not match its commit record: the replica's disk is corrupt; remove the volume's copy on this node to resync it", state)
	}
	var rec journalRecord
	if err := gob.NewDecoder(bytes.NewReader(data)).Decode(&rec); err != nil {
		return false, fmt.Errorf("decode committed journal: %w", err)
	}
	rec.Gen = 0
	log.Warn("finishing a batch that an earlier version committed to its journal but did not completely apply", "seq", rec.Seq)
	if err := j.replay(rec); err != nil {
		return false, err
	}
	pos := position{Epoch: rec.Epoch, Seq: rec.Seq, Cut: cutTime(rec.CutNano)}
	if err := writeFileDurable(state, positionFile, positionLine(pos)); err != nil {
		return false, err
	}
	for _, f := range []string{legacyCommitFile, legacyJournalFile, progressFile} {
		if err := os.Remove(filepath.Join(state, f)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return false, fmt.Errorf("clear journal: %w", err)
		}
	}
	return true, syncDir(state)
}

// inPlaceBytes is what applying ops writes into the volume beyond moving
// staged files into place: the data of deltas (patched in place) and, when
// the stage is on another file system (same false), of every file (copied
// next to its target).
func inPlaceBytes(ops []applyOp, same bool) int64 {
	var n int64
	for _, op := range ops {
		if op.kind != tetherpb.FileOp_KIND_FILE || (op.delta == nil && same) {
			continue
		}
		for _, e := range op.extents {
			n += e.n
		}
	}
	return n
}

// spaceSlack is free space a batch leaves on the volume beyond its data
// (file system metadata).
const spaceSlack = 1 << 20

// checkSpace refuses a batch whose in-place writes need more than the
// volume's free space: refused before its commit, it leaves the replica at
// its previous cut, where running out of space while applying it would
// leave files half written until there is room to finish.
func checkSpace(dataDir string, need int64) error {
	if need == 0 {
		return nil
	}
	var st unix.Statfs_t
	if err := unix.Statfs(dataDir, &st); err != nil {
		return fmt.Errorf("free space of the volume: %w", err)
	}
	return enoughSpace(need, int64(st.Bavail)*st.Bsize)
}

// enoughSpace says whether a batch writing need bytes in place fits in
// avail free bytes.
func enoughSpace(need, avail int64) error {
	if need+spaceSlack > avail {
		return fmt.Errorf("%w: applying the batch writes %d bytes into the replica's volume and %d bytes are free there; the replica stays at its previous cut until there is room",
			syscall.ENOSPC, need, avail)
	}
	return nil
}

// sameFS reports whether two directories are on one file system.
func sameFS(a, b string) (bool, error) {
	var sa, sb unix.Stat_t
	if err := unix.Stat(a, &sa); err != nil {
		return false, fmt.Errorf("stat %s: %w", a, err)
	}
	if err := unix.Stat(b, &sb); err != nil {
		return false, fmt.Errorf("stat %s: %w", b, err)
	}
	return sa.Dev == sb.Dev, nil
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
