package replication

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/tether-io/tether/proto/tetherpb"
)

// primaryEpochFile in Paths.State records the epoch this node last served
// the volume as primary in (written by Fence); a stream of a newer epoch
// then finds out what this node wrote that the new primary does not have.
const primaryEpochFile = "primary-epoch"

// quarantineTimeFormat names quarantine directories: epoch-E-<UTC time>.
const quarantineTimeFormat = "20060102T150405.000000000Z"

// QuarantineRecord describes files a former primary moved aside when it
// rejoined as a replica of a newer epoch: what it had that the new
// primary's first batch would have overwritten or deleted.
type QuarantineRecord struct {
	Volume string
	// Epoch is the epoch this node was primary in.
	Epoch uint64
	// Time is when the files were moved (UTC).
	Time time.Time
	// Dir holds the files, at their paths relative to the volume root.
	Dir string
	// Files counts the entries (files, symlinks, fifos) in Dir.
	Files int
}

// quarantineBase returns the directory holding a volume's quarantines.
func (s *Server) quarantineBase(volume string, paths Paths) string {
	base := s.cfg.QuarantineDir
	if base == "" {
		base = paths.State
	}
	return filepath.Join(base, "quarantine", volume)
}

// Quarantined lists what this node quarantined for volume, oldest first.
func (s *Server) Quarantined(volume string) ([]QuarantineRecord, error) {
	paths, err := s.cfg.Resolve(volume)
	if err != nil {
		return nil, fmt.Errorf("quarantine of volume %s: %w", volume, err)
	}
	return s.QuarantinedPaths(volume, paths)
}

// QuarantinedPaths is Quarantined for a volume whose directories the caller
// gives.
func (s *Server) QuarantinedPaths(volume string, paths Paths) ([]QuarantineRecord, error) {
	base := s.quarantineBase(volume, paths)
	entries, err := os.ReadDir(base)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("quarantine of volume %s: %w", volume, err)
	}
	var out []QuarantineRecord
	for _, e := range entries {
		r, ok := parseQuarantineName(e.Name())
		if !ok || !e.IsDir() {
			continue
		}
		r.Volume, r.Dir = volume, filepath.Join(base, e.Name())
		_ = filepath.WalkDir(r.Dir, func(_ string, d fs.DirEntry, err error) error {
			if err == nil && !d.IsDir() {
				r.Files++
			}
			return nil
		})
		out = append(out, r)
	}
	slices.SortFunc(out, func(a, b QuarantineRecord) int { return a.Time.Compare(b.Time) })
	return out, nil
}

// quarantineName names the quarantine of epoch taken at t.
func quarantineName(epoch uint64, t time.Time) string {
	return "epoch-" + strconv.FormatUint(epoch, 10) + "-" + t.UTC().Format(quarantineTimeFormat)
}

func parseQuarantineName(name string) (QuarantineRecord, bool) {
	rest, ok := strings.CutPrefix(name, "epoch-")
	if !ok {
		return QuarantineRecord{}, false
	}
	e, ts, ok := strings.Cut(rest, "-")
	if !ok {
		return QuarantineRecord{}, false
	}
	epoch, err := strconv.ParseUint(e, 10, 64)
	if err != nil {
		return QuarantineRecord{}, false
	}
	t, err := time.Parse(quarantineTimeFormat, ts)
	if err != nil {
		return QuarantineRecord{}, false
	}
	return QuarantineRecord{Epoch: epoch, Time: t}, true
}

// quarantineFor moves aside, before a batch of a newer epoch than the one
// this node was primary in is applied, every local entry the batch would
// overwrite with something different or delete. It then forgets that this
// node was primary, so that it happens once per failover.
func (c *inboundSession) quarantineFor(b *batch, full bool) error {
	was, err := readPrimaryEpoch(c.paths.State)
	if err != nil || was == 0 || was >= c.me.epoch {
		return err
	}
	root, err := os.OpenRoot(c.paths.Data)
	if err != nil {
		return fmt.Errorf("open volume data directory: %w", err)
	}
	var moved []string
	err = walkTree(root, rootPath, func(rel string, fi fs.FileInfo) {
		if !fi.IsDir() && !strings.HasPrefix(baseOf(rel), tempPrefix) && overwritten(rel, fi, b.ops, full) {
			moved = append(moved, rel)
		}
	})
	_ = root.Close()
	if err != nil {
		return fmt.Errorf("find what this node wrote as primary: %w", err)
	}
	if len(moved) > 0 {
		now := time.Now()
		dir := filepath.Join(c.s.quarantineBase(c.volume, c.paths), quarantineName(was, now))
		if err := moveAside(c.paths.Data, dir, moved); err != nil {
			return err
		}
		c.log.Warn("this node was primary of the volume in an older epoch: moved what the new primary's copy would overwrite or delete into quarantine (nothing merged, nothing deleted)",
			"primary_epoch", was, "files", len(moved), "quarantine", dir)
	}
	if err := os.Remove(filepath.Join(c.paths.State, primaryEpochFile)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("clear primary epoch record: %w", err)
	}
	return syncDir(c.paths.State)
}

// overwritten reports whether the batch would replace the local entry rel
// (fi) with something different, or delete it.
func overwritten(rel string, fi fs.FileInfo, ops []applyOp, full bool) bool {
	var last *applyOp
	touched := full
	for i := range ops {
		op := &ops[i]
		switch {
		case op.kind == tetherpb.FileOp_KIND_MKDIR:
			if op.path == rel {
				last, touched = op, true
			}
		case op.kind == tetherpb.FileOp_KIND_RENAME:
			if isUnder(rel, op.path) || isUnder(rel, op.to) {
				last, touched = nil, true
			}
		case isUnder(rel, op.path):
			last, touched = op, true
			if op.path != rel || op.kind == tetherpb.FileOp_KIND_DELETE {
				last = nil
			}
		}
	}
	if !touched {
		return false
	}
	return last == nil || !sameEntry(fi, *last, ops)
}

// sameEntry reports whether a local entry already is what op would write.
func sameEntry(fi fs.FileInfo, op applyOp, ops []applyOp) bool {
	uid, gid := ownerOf(fi)
	switch op.kind {
	case tetherpb.FileOp_KIND_FILE:
		return fi.Mode().IsRegular() && fi.Size() == op.size && fi.ModTime().Equal(op.mtime) &&
			toWireMode(fi.Mode()) == toWireMode(op.mode) && uid == op.uid && gid == op.gid
	case tetherpb.FileOp_KIND_HARDLINK:
		for _, o := range ops {
			if o.kind == tetherpb.FileOp_KIND_FILE && o.path == op.to {
				return sameEntry(fi, o, nil)
			}
		}
	case tetherpb.FileOp_KIND_FIFO:
		return fi.Mode().Type() == fs.ModeNamedPipe
	case tetherpb.FileOp_KIND_SYMLINK:
		return fi.Mode().Type() == fs.ModeSymlink && fi.ModTime().Equal(op.mtime)
	}
	return false
}

// moveAside renames the entries rels of data into dir at the same relative
// paths and makes that durable.
func moveAside(data, dir string, rels []string) error {
	for _, rel := range rels {
		dst := filepath.Join(dir, filepath.FromSlash(rel))
		if err := os.MkdirAll(filepath.Dir(dst), 0o700); err != nil {
			return fmt.Errorf("create quarantine directory: %w", err)
		}
		if err := os.Rename(filepath.Join(data, filepath.FromSlash(rel)), dst); err != nil {
			return fmt.Errorf("move %q into quarantine %s (it must be on the volume's file system): %w", rel, dir, err)
		}
	}
	if err := syncFS(dir); err != nil {
		return err
	}
	return syncFS(data)
}

// readPrimaryEpoch returns the epoch this node was last primary in (0 when
// none is recorded).
func readPrimaryEpoch(dir string) (uint64, error) {
	fields, err := readFields(filepath.Join(dir, primaryEpochFile), 1)
	if err != nil || fields == nil {
		return 0, err
	}
	return fields[0], nil
}
