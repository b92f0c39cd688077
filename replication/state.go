package replication

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Files in Paths.State.
const (
	epochFile    = "epoch"    // newest epoch seen for the volume
	positionFile = "position" // last durable batch: "epoch seq cut_unix_nano"
	stageDir     = "stage"    // file contents of the batch being received
	applyingFile = "applying" // left by older versions while applying; removed
)

// position is the last batch durable on a replica.
type position struct {
	Epoch, Seq uint64
	Cut        time.Time
}

func (p position) String() string {
	return fmt.Sprintf("epoch %d seq %d", p.Epoch, p.Seq)
}

// cutNano is the wire form of a cut time; the zero time is 0.
func cutNano(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

// cutTime is the inverse of cutNano.
func cutTime(n int64) time.Time {
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n)
}

// readEpoch returns the newest epoch recorded in dir, 0 when none is.
func readEpoch(dir string) (uint64, error) {
	fields, err := readFields(filepath.Join(dir, epochFile), 1)
	if err != nil || fields == nil {
		return 0, err
	}
	return fields[0], nil
}

// writeEpoch durably records epoch as the newest seen.
func writeEpoch(dir string, epoch uint64) error {
	return writeFileDurable(dir, epochFile, strconv.FormatUint(epoch, 10)+"\n")
}

// readPosition returns the last durable batch recorded in dir.
func readPosition(dir string) (position, error) {
	fields, err := readFields(filepath.Join(dir, positionFile), 3)
	if err != nil || fields == nil {
		return position{}, err
	}
	return position{Epoch: fields[0], Seq: fields[1], Cut: cutTime(int64(fields[2]))}, nil
}

// positionLine is the content of the position file.
func positionLine(pos position) string {
	return fmt.Sprintf("%d %d %d\n", pos.Epoch, pos.Seq, cutNano(pos.Cut))
}

// readFields reads a file of n unsigned decimal fields; a missing file gives
// nil fields and no error.
func readFields(path string, n int) ([]uint64, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read replication state: %w", err)
	}
	parts := strings.Fields(string(b))
	if len(parts) != n {
		return nil, fmt.Errorf("replication state file %s is corrupt: want %d fields, found %d", path, n, len(parts))
	}
	out := make([]uint64, n)
	for i, p := range parts {
		v, err := strconv.ParseUint(p, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("replication state file %s is corrupt: %w", path, err)
		}
		out[i] = v
	}
	return out, nil
}

// writeFileDurable replaces dir/name with content so that a crash leaves
// either the old or the new content: temp file, fsync, rename, fsync dir.
func writeFileDurable(dir, name, content string) error {
	if err := writeFileSynced(dir, name, content); err != nil {
		return err
	}
	return syncDir(dir)
}

// writeFileSynced replaces dir/name with content, synced, by a rename that
// is durable only once dir is synced.
func writeFileSynced(dir, name, content string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create replication state directory: %w", err)
	}
	f, err := os.CreateTemp(dir, name+".tmp-*")
	if err != nil {
		return fmt.Errorf("write replication state %s: %w", name, err)
	}
	tmp := f.Name()
	_, err = f.WriteString(content)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, filepath.Join(dir, name))
	}
	if err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("write replication state %s: %w", name, err)
	}
	return nil
}

// syncDir fsyncs a directory so that renames and creations in it survive a
// crash.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync directory: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync directory %s: %w", dir, err)
	}
	return nil
}
