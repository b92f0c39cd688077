package replication

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"time"
)

// Entry describes one entry of a tree, for comparing two trees.
type Entry struct {
	Type   string      // "dir", "file", "symlink" or "other"
	Mode   fs.FileMode // permission and setuid/setgid/sticky bits (0 for symlinks)
	Size   int64       // files only
	SHA256 string      // files only: hex digest of the contents
	Target string      // symlinks only
	MTime  time.Time
}

func (e Entry) String() string {
	switch e.Type {
	case "file":
		return fmt.Sprintf("file %v size %d sha256 %.12s mtime %s", e.Mode, e.Size, e.SHA256, e.MTime.Format(time.RFC3339Nano))
	case "symlink":
		return fmt.Sprintf("symlink -> %q mtime %s", e.Target, e.MTime.Format(time.RFC3339Nano))
	}
	return fmt.Sprintf("%s %v mtime %s", e.Type, e.Mode, e.MTime.Format(time.RFC3339Nano))
}

// Manifest describes every entry below root (and root itself, as "."),
// keyed by slash-separated relative path, never following symlinks.
func Manifest(root string) (map[string]Entry, error) {
	out := map[string]Entry{}
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, path)
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		e, err := entryOf(path, fi)
		if err != nil {
			return err
		}
		out[filepath.ToSlash(rel)] = e
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("manifest of %s: %w", root, err)
	}
	return out, nil
}

func entryOf(path string, fi fs.FileInfo) (Entry, error) {
	e := Entry{Mode: fi.Mode() & (fs.ModePerm | fs.ModeSetuid | fs.ModeSetgid | fs.ModeSticky), MTime: fi.ModTime()}
	switch fi.Mode().Type() {
	case fs.ModeDir:
		e.Type = "dir"
	case fs.ModeSymlink:
		e.Type, e.Mode = "symlink", 0
		t, err := os.Readlink(path)
		if err != nil {
			return e, err
		}
		e.Target = t
	case 0:
		e.Type, e.Size = "file", fi.Size()
		f, err := os.Open(path)
		if err != nil {
			return e, err
		}
		defer f.Close()
		h := sha256.New()
		if _, err := io.Copy(h, f); err != nil {
			return e, err
		}
		e.SHA256 = hex.EncodeToString(h.Sum(nil))
	default:
		e.Type = "other"
	}
	return e, nil
}

// DiffManifests lists the differences between two manifests, one line per
// path, sorted; nil when they are equal.
func DiffManifests(a, b map[string]Entry) []string {
	var out []string
	for p, ea := range a {
		eb, ok := b[p]
		switch {
		case !ok:
			out = append(out, fmt.Sprintf("%q: only in first: %s", p, ea))
		case !ea.MTime.Equal(eb.MTime) || ea.Type != eb.Type || ea.Mode != eb.Mode || ea.Size != eb.Size ||
			ea.SHA256 != eb.SHA256 || ea.Target != eb.Target:
			out = append(out, fmt.Sprintf("%q: %s != %s", p, ea, eb))
		}
	}
	for p, eb := range b {
		if _, ok := a[p]; !ok {
			out = append(out, fmt.Sprintf("%q: only in second: %s", p, eb))
		}
	}
	slices.Sort(out)
	return out
}
