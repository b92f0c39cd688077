package agent

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/tether-io/tether/cluster"
	"github.com/tether-io/tether/replication"
)

// incarnationFile, in a volume's directory, records which volume of that
// name the directory belongs to: the catalog's creation time in Unix
// nanoseconds. A volume can be purged and a new one created with the same
// name; the old copy's data and replication state (its epoch above all,
// which would make the replica refuse the new volume's epoch 1) must not
// leak into it, including on a node that was down during the purge.
const incarnationFile = "incarnation"

// prepareVolume creates v's directories on this node and returns them,
// first removing what an earlier volume of the same name left there.
func (a *Agent) prepareVolume(v cluster.Volume) (replication.Paths, error) {
	a.prepMu.Lock()
	defer a.prepMu.Unlock()
	p := a.VolumePaths(v.Name)
	base := filepath.Dir(p.Data)
	marker := filepath.Join(base, incarnationFile)
	want := strconv.FormatInt(v.CreatedAt.UnixNano(), 10)
	got, err := os.ReadFile(marker)
	switch {
	case err == nil && strings.TrimSpace(string(got)) == want:
		return p, ensureVolumeDirs(p)
	case err == nil:
		a.log.Warn("removing the copy left by an earlier volume of the same name", "volume", v.Name,
			"dir", base, "earlier_created_unix_nano", strings.TrimSpace(string(got)), "created_unix_nano", want)
		if err := os.RemoveAll(base); err != nil {
			return p, fmt.Errorf("removing the leftover copy of an earlier volume %s: %w", v.Name, err)
		}
	case !errors.Is(err, os.ErrNotExist):
		return p, fmt.Errorf("reading %s: %w", marker, err)
	}
	// No marker: a new copy, or one made before markers existed, which
	// can only be this volume's.
	if err := ensureVolumeDirs(p); err != nil {
		return p, err
	}
	if err := writeDurable(marker, want+"\n"); err != nil {
		return p, fmt.Errorf("recording the volume's incarnation: %w", err)
	}
	return p, nil
}

// writeDurable replaces path with content: temp file, fsync, rename, fsync
// of the directory.
func writeDurable(path, content string) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.WriteString(content); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
