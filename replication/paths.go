package replication

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"strings"
)

// Paths locates one volume on a node's disk.
type Paths struct {
	// Data is the volume's data directory (what containers see), e.g.
	// <datadir>/volumes/NAME/data.
	Data string
	// State holds replication state for this volume, outside Data, e.g.
	// <datadir>/volumes/NAME/state (epoch file, staging, positions).
	State string
}

// rootPath is how a batch names the volume's root directory itself; only
// MKDIR may carry it (to set the root's mode and mtime).
const rootPath = "."

// tempPrefix starts the names of the temporary files a replica creates next
// to their targets before renaming them into place.
const tempPrefix = ".tether-tmp-"

// errBadPath is wrapped by every refusal of a peer-supplied path.
var errBadPath = errors.New("invalid path")

// checkPath validates a peer-supplied path and returns it as a string. A
// valid path is relative, slash-separated, without empty, "." or ".."
// components and without NUL bytes. allowRoot admits the single path "."
// (the volume root itself).
func checkPath(p []byte, allowRoot bool) (string, error) {
	if len(p) == 0 {
		return "", fmt.Errorf("%w: empty", errBadPath)
	}
	if string(p) == rootPath {
		if allowRoot {
			return rootPath, nil
		}
		return "", fmt.Errorf("%w: %q names the volume root", errBadPath, p)
	}
	if bytes.IndexByte(p, 0) >= 0 {
		return "", fmt.Errorf("%w: %q contains a NUL byte", errBadPath, p)
	}
	if p[0] == '/' {
		return "", fmt.Errorf("%w: %q is absolute", errBadPath, p)
	}
	for _, c := range bytes.Split(p, []byte{'/'}) {
		switch string(c) {
		case "":
			return "", fmt.Errorf("%w: %q has an empty component", errBadPath, p)
		case ".", "..":
			return "", fmt.Errorf("%w: %q has a %q component", errBadPath, p, c)
		}
	}
	return string(p), nil
}

// parentOf returns the directory holding rel ("." for top-level entries).
func parentOf(rel string) string {
	i := strings.LastIndexByte(rel, '/')
	if i < 0 {
		return rootPath
	}
	return rel[:i]
}

// baseOf returns the last component of rel.
func baseOf(rel string) string {
	return rel[strings.LastIndexByte(rel, '/')+1:]
}

// joinRel joins a directory and a name inside it.
func joinRel(dir, name string) string {
	if dir == rootPath || dir == "" {
		return name
	}
	return dir + "/" + name
}

// depthOf counts the components of rel; the root has depth 0.
func depthOf(rel string) int {
	if rel == rootPath {
		return 0
	}
	return strings.Count(rel, "/") + 1
}

// ancestorsOf returns the proper ancestors of rel, shallowest first, without
// the root.
func ancestorsOf(rel string) []string {
	if rel == rootPath {
		return nil
	}
	var out []string
	for i := 0; i < len(rel); i++ {
		if rel[i] == '/' {
			out = append(out, rel[:i])
		}
	}
	return out
}

// isUnder reports whether rel is p or lies below it.
func isUnder(rel, p string) bool {
	if p == rootPath {
		return true
	}
	return rel == p || strings.HasPrefix(rel, p+"/")
}

// Wire mode bits, as in chmod(2).
const (
	wireSetuid = 0o4000
	wireSetgid = 0o2000
	wireSticky = 0o1000
)

// toWireMode converts the permission and special bits of m to chmod bits.
func toWireMode(m fs.FileMode) uint32 {
	w := uint32(m.Perm())
	if m&fs.ModeSetuid != 0 {
		w |= wireSetuid
	}
	if m&fs.ModeSetgid != 0 {
		w |= wireSetgid
	}
	if m&fs.ModeSticky != 0 {
		w |= wireSticky
	}
	return w
}

// fromWireMode converts chmod bits to an fs.FileMode (other bits ignored).
func fromWireMode(w uint32) fs.FileMode {
	m := fs.FileMode(w & 0o777)
	if w&wireSetuid != 0 {
		m |= fs.ModeSetuid
	}
	if w&wireSetgid != 0 {
		m |= fs.ModeSetgid
	}
	if w&wireSticky != 0 {
		m |= fs.ModeSticky
	}
	return m
}
