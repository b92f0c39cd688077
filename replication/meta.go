package replication

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"slices"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/tether-io/tether/proto/tetherpb"
)

// maxFileSize bounds the size a peer may ask a replica to create (sparse
// or not): 1 PiB.
const maxFileSize = 1 << 50

// extent is a range of a file that holds data (not a hole).
type extent struct{ off, n int64 }

// ownerOf returns the numeric owner and group of fi.
func ownerOf(fi fs.FileInfo) (uid, gid uint32) {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Uid, st.Gid
	}
	return 0, 0
}

// inodeOf returns the device, inode and link count of fi.
func inodeOf(fi fs.FileInfo) (key inodeKey, nlink uint64) {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return inodeKey{dev: st.Dev, ino: st.Ino}, st.Nlink
	}
	return inodeKey{}, 1
}

// inodeKey identifies a file across its hard links.
type inodeKey struct{ dev, ino uint64 }

// errXattrUnsupported reports a file system without extended attributes.
var errXattrUnsupported = errors.New("extended attributes are not supported by this file system")

func isXattrUnsupported(err error) bool {
	return errors.Is(err, unix.ENOTSUP) || errors.Is(err, unix.EOPNOTSUPP)
}

// readXattrs returns the extended attributes of an open file, sorted by
// name.
func readXattrs(fd int) ([]*tetherpb.Xattr, error) {
	names, err := listXattrs(func(buf []byte) (int, error) { return unix.Flistxattr(fd, buf) })
	if err != nil {
		return nil, err
	}
	out := make([]*tetherpb.Xattr, 0, len(names))
	for _, n := range names {
		v, err := getXattr(func(buf []byte) (int, error) { return unix.Fgetxattr(fd, n, buf) })
		if errors.Is(err, unix.ENODATA) {
			continue // removed meanwhile
		}
		if err != nil {
			return nil, fmt.Errorf("read extended attribute %q: %w", n, err)
		}
		out = append(out, &tetherpb.Xattr{Name: []byte(n), Value: v})
	}
	return out, nil
}

// listXattrs calls a listxattr variant until its buffer is large enough.
func listXattrs(list func([]byte) (int, error)) ([]string, error) {
	buf, err := getXattr(list)
	if err != nil {
		if isXattrUnsupported(err) {
			return nil, errXattrUnsupported
		}
		return nil, fmt.Errorf("list extended attributes: %w", err)
	}
	var names []string
	for n := range bytes.SplitSeq(buf, []byte{0}) {
		if len(n) > 0 {
			names = append(names, string(n))
		}
	}
	slices.Sort(names)
	return names, nil
}

// getXattr calls a getxattr-like function with a buffer that fits.
func getXattr(get func([]byte) (int, error)) ([]byte, error) {
	for range 8 {
		n, err := get(nil)
		if err != nil {
			return nil, err
		}
		if n == 0 {
			return []byte{}, nil
		}
		buf := make([]byte, n)
		n, err = get(buf)
		if errors.Is(err, unix.ERANGE) {
			continue // grew meanwhile
		}
		if err != nil {
			return nil, err
		}
		return buf[:n], nil
	}
	return nil, unix.ERANGE
}

// setXattrs makes the extended attributes of an open file exactly want.
func setXattrs(fd int, want []xattr) error {
	have, err := listXattrs(func(buf []byte) (int, error) { return unix.Flistxattr(fd, buf) })
	if err != nil {
		if errors.Is(err, errXattrUnsupported) && len(want) == 0 {
			return nil
		}
		return err
	}
	for _, n := range have {
		if !slices.ContainsFunc(want, func(x xattr) bool { return x.name == n }) {
			if err := unix.Fremovexattr(fd, n); err != nil && !errors.Is(err, unix.ENODATA) {
				return fmt.Errorf("remove extended attribute %q: %w", n, err)
			}
		}
	}
	for _, x := range want {
		if err := unix.Fsetxattr(fd, x.name, x.value, 0); err != nil {
			if isXattrUnsupported(err) {
				return fmt.Errorf("set extended attribute %q: %w", x.name, errXattrUnsupported)
			}
			return fmt.Errorf("set extended attribute %q: %w", x.name, err)
		}
	}
	return nil
}

// xattr is one validated extended attribute of a batch.
type xattr struct {
	name  string
	value []byte
}

// xattrsOf validates the extended attributes of an op.
func xattrsOf(op *tetherpb.FileOp) ([]xattr, error) {
	out := make([]xattr, 0, len(op.GetXattrs()))
	for _, x := range op.GetXattrs() {
		n := x.GetName()
		if len(n) == 0 || len(n) > 255 || bytes.IndexByte(n, 0) >= 0 || bytes.IndexByte(n, '.') <= 0 {
			return nil, fmt.Errorf("%w: extended attribute name %q of %q is invalid", errBadBatch, n, op.GetPath())
		}
		if len(x.GetValue()) > 64<<10 {
			return nil, fmt.Errorf("%w: extended attribute %q of %q is larger than 64 KiB", errBadBatch, n, op.GetPath())
		}
		if slices.ContainsFunc(out, func(y xattr) bool { return y.name == string(n) }) {
			return nil, fmt.Errorf("%w: extended attribute %q of %q is given twice", errBadBatch, n, op.GetPath())
		}
		out = append(out, xattr{name: string(n), value: x.GetValue()})
	}
	return out, nil
}

// dataExtents lists the data extents of the first size bytes of f, using
// SEEK_DATA/SEEK_HOLE; a file system without them gives one extent.
func dataExtents(f *os.File, size int64) ([]extent, error) {
	if size == 0 {
		return nil, nil
	}
	fd := int(f.Fd())
	var out []extent
	for off := int64(0); off < size; {
		d, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // only a hole up to the end
		}
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP) {
			return []extent{{0, size}}, nil
		}
		if err != nil {
			return nil, fmt.Errorf("find data: %w", err)
		}
		if d >= size {
			break
		}
		h, err := unix.Seek(fd, d, unix.SEEK_HOLE)
		if err != nil {
			return nil, fmt.Errorf("find hole: %w", err)
		}
		h = min(h, size)
		out = append(out, extent{d, h - d})
		off = h
	}
	return out, nil
}

// copyRange copies n bytes at off from src to the same offset of dst.
func copyRange(dst, src *os.File, off, n int64) error {
	for n > 0 {
		in, out := off, off
		c, err := unix.CopyFileRange(int(src.Fd()), &in, int(dst.Fd()), &out, int(min(n, 1<<30)), 0)
		if err != nil || c == 0 {
			return copyRangeSlow(dst, src, off, n)
		}
		off += int64(c)
		n -= int64(c)
	}
	return nil
}

// copyRangeSlow is copyRange without copy_file_range.
func copyRangeSlow(dst, src *os.File, off, n int64) error {
	w := io.NewOffsetWriter(dst, off)
	got, err := io.Copy(w, io.NewSectionReader(src, off, n))
	if err == nil && got != n {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// onceLogger logs each kind of warning once, so that a volume full of files
// the replica cannot represent does not flood the log.
type onceLogger struct {
	log  *slog.Logger
	mu   sync.Mutex
	seen map[string]struct{}
}

func newOnceLogger(log *slog.Logger) *onceLogger {
	return &onceLogger{log: log, seen: map[string]struct{}{}}
}

// warn logs msg at WARN the first time key is seen.
func (o *onceLogger) warn(key, msg string, args ...any) {
	o.mu.Lock()
	_, seen := o.seen[key]
	o.seen[key] = struct{}{}
	o.mu.Unlock()
	if !seen {
		o.log.Warn(msg, args...)
	}
}
