package replication

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/tether-io/tether/internal/testutil"
	"github.com/tether-io/tether/proto/tetherpb"
)

// inodeOfPath returns the inode number of path.
func inodeOfPath(t *testing.T, path string) uint64 {
	t.Helper()
	fi, err := os.Lstat(path)
	must(t, err)
	return fi.Sys().(*syscall.Stat_t).Ino
}

// TestFilesPlacedByRename checks that a replica moves staged contents into
// place (the file in the volume is the staged inode, not a copy), with the
// batch's metadata, and that a staged file already moved (a replay of an
// interrupted application) is taken as placed.
func TestFilesPlacedByRename(t *testing.T) {
	paths := replicaDirs(t)
	j := journal{paths: paths, warn: newOnceLogger(testutil.Logger(t))}
	b := newBatch(j.stage())
	defer b.discard()
	must(t, b.add(mkdirOp("d", 0o755, 2)))
	must(t, b.add(fileOp("d/a", "contents")))
	must(t, b.complete())
	staged := b.ops[1].staged
	ino := inodeOfPath(t, staged)
	must(t, j.commit(b, position{Epoch: 1, Seq: 1}, false))
	target := filepath.Join(paths.Data, "d", "a")
	if got := inodeOfPath(t, target); got != ino {
		t.Fatalf("d/a has inode %d, the staged file had %d: contents were copied, not renamed", got, ino)
	}
	if _, err := os.Stat(staged); !os.IsNotExist(err) {
		t.Fatalf("staged file still there after placing: %v", err)
	}
	op := b.ops[1]
	fi, err := os.Stat(target)
	must(t, err)
	if fi.Mode().Perm() != op.mode.Perm() || !fi.ModTime().Equal(op.mtime) {
		t.Fatalf("d/a has mode %v mtime %v, want %v %v", fi.Mode(), fi.ModTime(), op.mode, op.mtime)
	}
	// A replay of the batch finds the staged file gone: already placed. A
	// first application would take it for a lost file.
	root, err := os.OpenRoot(paths.Data)
	must(t, err)
	defer root.Close()
	if err := applyOps(root, b.ops, nil, false, progress{}, false, j.warn, func(progress) error { return nil }, nil, nil); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("applying a batch whose staged file is gone, not as a replay: %v, want a missing-contents error", err)
	}
	must(t, applyOps(root, b.ops, nil, false, progress{}, true, j.warn, func(progress) error { return nil }, nil, nil))
	if got, err := os.ReadFile(target); err != nil || string(got) != "contents" {
		t.Fatalf("after a replay d/a = %q, %v", got, err)
	}
}

// TestPlaceAcrossFileSystems puts the replica's state (and its stage) on
// another file system than its data (/dev/shm): files cannot be renamed
// into place and are copied instead.
func TestPlaceAcrossFileSystems(t *testing.T) {
	shm, err := os.MkdirTemp("/dev/shm", "tether-test-")
	if err != nil {
		t.Skipf("no /dev/shm: %v", err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(shm) })
	data := filepath.Join(t.TempDir(), "data")
	must(t, os.MkdirAll(data, 0o755))
	var a, b syscall.Statfs_t
	must(t, syscall.Statfs(shm, &a))
	must(t, syscall.Statfs(data, &b))
	if a.Type == b.Type && a.Fsid == b.Fsid {
		t.Skip("/dev/shm is on the same file system as the test's temporary directory")
	}
	paths := Paths{Data: data, State: shm}
	must(t, resetDir(filepath.Join(paths.State, stageDir)))
	j := journal{paths: paths, warn: newOnceLogger(testutil.Logger(t))}
	must(t, commitOps(t, j, 1, true, []*tetherpb.FileOp{mkdirOp(".", 0o755, 1), fileOp("f", "across")}))
	if got, err := os.ReadFile(filepath.Join(data, "f")); err != nil || string(got) != "across" {
		t.Fatalf("f = %q, %v", got, err)
	}
}
