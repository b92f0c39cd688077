package replication

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Entry describes one entry of a tree, for comparing two trees.
type Entry struct {
	Type     string      // "dir", "file", "symlink", "fifo" or "other"
	Mode     fs.FileMode // permission and setuid/setgid/sticky bits (0 for symlinks)
	Size     int64       // files only
	SHA256   string      // files only: hex digest of the data extents and their offsets (holes are zeros)
	Target   string      // symlinks only
	MTime    time.Time
	UID, GID uint32
	// Xattrs lists the extended attributes, "name=hex(value)" sorted and
	// joined by ";" (files and directories).
	Xattrs string
	// Nlink is the number of hard links (not for directories, whose count
	// follows from their subdirectories).
	Nlink uint64
	// Extents lists a file's data extents as "offset+length" joined by ",";
	// what lies between is a hole.
	Extents string
}

func (e Entry) String() string {
	own := fmt.Sprintf("%d:%d", e.UID, e.GID)
	if e.Xattrs != "" {
		own += " xattrs " + e.Xattrs
	}
	mt := e.MTime.Format(time.RFC3339Nano)
	switch e.Type {
	case "file":
		return fmt.Sprintf("file %v %s size %d sha256 %.12s nlink %d extents [%s] mtime %s", e.Mode, own, e.Size, e.SHA256, e.Nlink, e.Extents, mt)
	case "symlink":
		return fmt.Sprintf("symlink -> %q %s mtime %s", e.Target, own, mt)
	}
	return fmt.Sprintf("%s %v %s nlink %d mtime %s", e.Type, e.Mode, own, e.Nlink, mt)
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
	e.UID, e.GID = ownerOf(fi)
	if _, n := inodeOf(fi); !fi.IsDir() {
		e.Nlink = n
	}
	x, err := manifestXattrs(path)
	if err != nil {
		return e, err
	}
	e.Xattrs = x
	switch fi.Mode().Type() {
	case fs.ModeDir:
		e.Type = "dir"
	case fs.ModeNamedPipe:
		e.Type = "fifo"
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
		exts, err := dataExtents(f, fi.Size())
		if err != nil {
			return e, err
		}
		// The contents are hashed extent by extent, with their offsets:
		// holes (zeros, listed in Extents) are not read, so a sparse file
		// of gigabytes costs what its data does.
		h := sha256.New()
		for _, x := range exts {
			fmt.Fprintf(h, "%d+%d:", x.off, x.n)
			if _, err := io.Copy(h, io.NewSectionReader(f, x.off, x.n)); err != nil {
				return e, err
			}
		}
		e.SHA256 = hex.EncodeToString(h.Sum(nil))
		parts := make([]string, len(exts))
		for i, x := range exts {
			parts[i] = fmt.Sprintf("%d+%d", x.off, x.n)
		}
		e.Extents = strings.Join(parts, ",")
	default:
		e.Type = "other"
	}
	return e, nil
}

// manifestXattrs describes the extended attributes of path itself (not
// following a symlink); "" when it has none or the file system has none.
func manifestXattrs(path string) (string, error) {
	names, err := listXattrs(func(buf []byte) (int, error) { return unix.Llistxattr(path, buf) })
	if errors.Is(err, errXattrUnsupported) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("%s: %w", path, err)
	}
	parts := make([]string, 0, len(names))
	for _, n := range names {
		v, err := getXattr(func(buf []byte) (int, error) { return unix.Lgetxattr(path, n, buf) })
		if err != nil {
			return "", fmt.Errorf("%s: read extended attribute %q: %w", path, n, err)
		}
		parts = append(parts, n+"="+hex.EncodeToString(v))
	}
	return strings.Join(parts, ";"), nil
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
			ea.SHA256 != eb.SHA256 || ea.Target != eb.Target || ea.UID != eb.UID || ea.GID != eb.GID ||
			ea.Xattrs != eb.Xattrs || ea.Nlink != eb.Nlink || ea.Extents != eb.Extents:
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
