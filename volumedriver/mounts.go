package volumedriver

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"sort"
	"sync"
)

// mountsFormat identifies the mounts file; bump the version on any change
// of its shape.
const (
	mountsFormat  = "tether-driver-mounts"
	mountsVersion = 1
)

// mountTable counts Docker's mounts per volume and mount ID, and writes
// every change to a file (temp file, fsync, rename, fsync of the directory)
// before the change is acknowledged to Docker, so that counts survive an
// agent restart. Docker re-sends Mount and Unmount with the same ID for
// `docker cp` and may send an Unmount after a failed Mount: counts are per
// ID, and an Unmount of an unknown ID is a no-op.
type mountTable struct {
	path string

	mu     sync.Mutex
	mounts map[string]map[string]int // volume -> mount ID -> count
}

type mountsFile struct {
	Format  string                    `json:"format"`
	Version int                       `json:"version"`
	Mounts  map[string]map[string]int `json:"mounts"`
}

// loadMountTable reads path; a missing file is an empty table.
func loadMountTable(path string) (*mountTable, error) {
	t := &mountTable{path: path, mounts: map[string]map[string]int{}}
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return t, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading the driver's mount table: %w", err)
	}
	var f mountsFile
	if err := json.Unmarshal(b, &f); err != nil {
		return nil, fmt.Errorf("the driver's mount table %s is damaged (%w); move it away to start with no mounts recorded", path, err)
	}
	if f.Format != mountsFormat || f.Version < 1 || f.Version > mountsVersion {
		return nil, fmt.Errorf("the driver's mount table %s is %q version %d; this agent reads %q up to version %d", path, f.Format, f.Version, mountsFormat, mountsVersion)
	}
	for vol, ids := range f.Mounts {
		for id, n := range ids {
			if n > 0 {
				if t.mounts[vol] == nil {
					t.mounts[vol] = map[string]int{}
				}
				t.mounts[vol][id] = n
			}
		}
	}
	return t, nil
}

// add counts one more mount of volume by id and persists it. On a write
// error nothing changes.
func (t *mountTable) add(volume, id string) (total int, err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	next := t.cloneLocked()
	if next[volume] == nil {
		next[volume] = map[string]int{}
	}
	next[volume][id]++
	if err := t.writeLocked(next); err != nil {
		return 0, err
	}
	t.mounts = next
	return sum(next[volume]), nil
}

// remove counts one mount of volume by id less and persists it; an unknown
// id changes nothing.
func (t *mountTable) remove(volume, id string) (total int, err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.mounts[volume][id] == 0 {
		return sum(t.mounts[volume]), nil
	}
	next := t.cloneLocked()
	next[volume][id]--
	if next[volume][id] == 0 {
		delete(next[volume], id)
	}
	if len(next[volume]) == 0 {
		delete(next, volume)
	}
	if err := t.writeLocked(next); err != nil {
		return 0, err
	}
	t.mounts = next
	return sum(next[volume]), nil
}

// forget drops every mount of volume and persists it; it returns how many
// there were. On a write error nothing changes.
func (t *mountTable) forget(volume string) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := sum(t.mounts[volume])
	if n == 0 {
		return 0, nil
	}
	next := t.cloneLocked()
	delete(next, volume)
	if err := t.writeLocked(next); err != nil {
		return 0, err
	}
	t.mounts = next
	return n, nil
}

// count is how many mounts of volume are active on this host.
func (t *mountTable) count(volume string) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return sum(t.mounts[volume])
}

// volumes lists the volumes with at least one active mount, sorted.
func (t *mountTable) volumes() []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]string, 0, len(t.mounts))
	for v := range t.mounts {
		out = append(out, v)
	}
	sort.Strings(out)
	return out
}

func (t *mountTable) cloneLocked() map[string]map[string]int {
	out := make(map[string]map[string]int, len(t.mounts))
	for v, ids := range t.mounts {
		out[v] = maps.Clone(ids)
	}
	return out
}

// writeLocked replaces the file atomically and durably.
func (t *mountTable) writeLocked(m map[string]map[string]int) error {
	b, err := json.MarshalIndent(mountsFile{Format: mountsFormat, Version: mountsVersion, Mounts: m}, "", "  ")
	if err != nil {
		return fmt.Errorf("encoding the driver's mount table: %w", err)
	}
	dir := filepath.Dir(t.path)
	tmp, err := os.CreateTemp(dir, filepath.Base(t.path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("writing the driver's mount table: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return fmt.Errorf("writing the driver's mount table: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("syncing the driver's mount table: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("writing the driver's mount table: %w", err)
	}
	if err := os.Rename(tmp.Name(), t.path); err != nil {
		return fmt.Errorf("replacing the driver's mount table: %w", err)
	}
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("syncing the driver's directory: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("syncing the driver's directory: %w", err)
	}
	return nil
}

func sum(ids map[string]int) int {
	n := 0
	for _, c := range ids {
		n += c
	}
	return n
}
