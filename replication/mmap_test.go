package replication

import (
	"bytes"
	"fmt"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestMmapWriterConverges: a writer that changes a file only through a
// shared mapping makes no inotify event. The periodic rescan finds the
// change (the kernel updates the mtime when a clean page is first written
// through a mapping) and the replica converges, round after round.
func TestMmapWriterConverges(t *testing.T) {
	c := newTestCluster(t)
	data := bytes.Repeat([]byte{'a'}, 1<<20)
	must(t, os.WriteFile(c.path("mapped"), data, 0o644))
	c.startReplica("r1")
	p := c.startPrimaryWith(func(cfg *PrimaryConfig) { cfg.RescanInterval = 200 * time.Millisecond }, 1, "r1")
	c.waitSynced("r1")
	f, err := os.OpenFile(c.path("mapped"), os.O_RDWR, 0)
	must(t, err)
	m, err := unix.Mmap(int(f.Fd()), 0, len(data), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	must(t, f.Close()) // from here on, no system call names the file
	must(t, err)
	defer func() { must(t, unix.Munmap(m)) }()
	p.mu.Lock()
	w := p.w
	p.mu.Unlock()
	for round, off := range []int{0, 300 << 10, 1<<20 - 16} {
		rescans := w.rescans.Load()
		copy(m[off:], fmt.Sprintf("round %d mmap", round))
		must(t, unix.Msync(m, unix.MS_SYNC)) // clean again: the next write faults and updates the mtime
		c.waitSynced("r1")
		if w.rescans.Load() == rescans {
			t.Fatalf("round %d: the replica converged before any rescan: the test no longer shows a writer inotify cannot see", round)
		}
	}
}
