package replication

import (
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tether-io/tether/internal/testutil"
)

// waitSyncedExcept waits until replica name equals the primary, leaving out
// the paths skip (entries the primary does not replicate).
func (c *testCluster) waitSyncedExcept(name string, skip ...string) {
	c.t.Helper()
	testutil.EventuallyErr(c.t, 15*time.Second, func() error {
		pm, err := Manifest(c.primaryData)
		if err != nil {
			return err
		}
		for _, s := range skip {
			delete(pm, s)
		}
		rm, err := Manifest(c.replicaPaths(name).Data)
		if err != nil {
			return err
		}
		if d := DiffManifests(pm, rm); len(d) > 0 {
			return fmt.Errorf("replica %s differs:\n  %s", name, strings.Join(d, "\n  "))
		}
		return nil
	})
}

// writeSparse writes data at the given offsets of a file of the given size,
// leaving holes elsewhere.
func writeSparse(t *testing.T, path string, size int64, offsets ...int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE, 0o640)
	must(t, err)
	must(t, f.Truncate(size))
	for _, off := range offsets {
		_, err := f.WriteAt([]byte(strings.Repeat(fmt.Sprint(off%10), 4096)), off)
		must(t, err)
	}
	must(t, f.Close())
}

// TestMetadataFidelity replicates what a database's data directory needs:
// numeric owners, extended attributes, hard links, sparse files, fifos and
// mtimes to the nanosecond; devices are skipped.
func TestMetadataFidelity(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to set file owners")
	}
	c := newTestCluster(t)
	ns := time.Date(2020, 1, 2, 3, 4, 5, 123456789, time.UTC)
	// A PostgreSQL-like data directory owned by uid 999, mode 0700.
	must(t, os.Mkdir(c.path("pg"), 0o700))
	c.write("pg/PG_VERSION", "16\n")
	must(t, os.Chmod(c.path("pg/PG_VERSION"), 0o600))
	must(t, os.Lchown(c.path("pg/PG_VERSION"), 999, 999))
	must(t, os.Lchown(c.path("pg"), 999, 998))
	must(t, os.Symlink("PG_VERSION", c.path("pg/link")))
	must(t, os.Lchown(c.path("pg/link"), 999, 999))
	if err := unix.Setxattr(c.path("pg/PG_VERSION"), "user.tether.test", []byte("v\x00\xff"), 0); err != nil {
		t.Skipf("no user xattrs on the test file system: %v", err)
	}
	must(t, unix.Setxattr(c.path("pg"), "user.dir", []byte("d"), 0))
	// Hard links, one in another directory.
	c.write("h1", "shared")
	must(t, os.Link(c.path("h1"), c.path("h2")))
	must(t, os.Link(c.path("h1"), c.path("pg/h3")))
	// A sparse file with a hole at the start, in the middle and at the end.
	writeSparse(t, c.path("sparse"), 8<<20, 1<<20, 5<<20)
	// A fifo and a device.
	must(t, unix.Mkfifo(c.path("fifo"), 0o640))
	must(t, os.Lchown(c.path("fifo"), 1000, 1001))
	must(t, unix.Mknod(c.path("dev"), unix.S_IFCHR|0o600, int(unix.Mkdev(1, 3))))
	for _, p := range []string{"fifo", "sparse", "h1", "pg/PG_VERSION"} {
		must(t, os.Chtimes(c.path(p), ns, ns))
	}
	must(t, unix.Lutimes(c.path("pg/link"), []unix.Timeval{unix.NsecToTimeval(ns.UnixNano()), unix.NsecToTimeval(ns.UnixNano())}))
	must(t, os.Chtimes(c.path("pg"), ns, ns))

	c.startReplica("r1")
	c.startPrimary(1, "r1")
	c.waitSyncedExcept("r1", "dev")
	m, err := Manifest(c.replicaPaths("r1").Data)
	must(t, err)
	if e := m["pg"]; e.UID != 999 || e.GID != 998 || e.Mode != 0o700 || !strings.Contains(e.Xattrs, "user.dir=") {
		t.Fatalf("pg on the replica = %v", e)
	}
	if e := m["h2"]; e.Nlink != 3 {
		t.Fatalf("h2 on the replica = %v, want 3 links", e)
	}
	if e := m["sparse"]; e.Extents != fmt.Sprintf("%d+4096,%d+4096", 1<<20, 5<<20) {
		t.Fatalf("sparse on the replica = %v, want two 4 KiB extents", e)
	}
	if _, ok := m["dev"]; ok {
		t.Fatal("a device was replicated")
	}
	var st unix.Stat_t
	must(t, unix.Stat(c.replicaPaths("r1").Data+"/sparse", &st))
	if st.Blocks*512 > 64<<10 {
		t.Fatalf("the sparse file takes %d bytes on the replica", st.Blocks*512)
	}

	// Changes: a write through one name of a hard link, a chown, an xattr
	// removed, data written into a hole.
	f, err := os.OpenFile(c.path("h2"), os.O_WRONLY|os.O_APPEND, 0)
	must(t, err)
	_, err = f.WriteString(" and appended through h2")
	must(t, err)
	must(t, f.Close())
	must(t, os.Lchown(c.path("pg/PG_VERSION"), 1001, 1002))
	must(t, unix.Removexattr(c.path("pg/PG_VERSION"), "user.tether.test"))
	writeSparse(t, c.path("sparse"), 8<<20, 3<<20)
	c.waitSyncedExcept("r1", "dev")
	m, err = Manifest(c.replicaPaths("r1").Data)
	must(t, err)
	if e := m["pg/h3"]; e.Nlink != 3 || e.Size != int64(len("shared and appended through h2")) {
		t.Fatalf("pg/h3 on the replica = %v", e)
	}
}
