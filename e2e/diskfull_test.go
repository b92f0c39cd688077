package e2e

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tether-io/tether/internal/testutil"
	"github.com/tether-io/tether/proto/tetherpb"
	"github.com/tether-io/tether/replication"
)

// smallDisk gives a host a disk of size for its volumes: a tmpfs mounted
// (on this machine, as root) over its data dir's volumes/ before its
// container starts, so the volumes' data and the replica's staging area
// fill up while the host's Raft state, under the data dir, does not.
func smallDisk(t *testing.T, size string) hostOption {
	return func(h *host) ([]string, []string) {
		dir := filepath.Join(h.dataDir, "volumes")
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size+",mode=0700", "tmpfs", dir).CombinedOutput(); err != nil {
			t.Fatalf("mounting a %s tmpfs for %s's volumes: %v: %s", size, h.name, err, out)
		}
		// Lazily: the host's container may still hold it when this runs.
		t.Cleanup(func() { _ = exec.Command("umount", "-l", dir).Run() })
		return nil, nil
	}
}

// resizeDisk changes the size of a smallDisk host's volumes tmpfs, as an
// operator growing a full disk would.
func resizeDisk(t *testing.T, h *host, size string) {
	t.Helper()
	dir := filepath.Join(h.dataDir, "volumes")
	if out, err := exec.Command("mount", "-o", "remount,size="+size, dir).CombinedOutput(); err != nil {
		t.Fatalf("growing %s's disk to %s: %v: %s", h.name, size, err, out)
	}
}

// pattern is n bytes that depend on seed, so a torn or stale copy shows.
func pattern(seed string, n int) []byte {
	var buf bytes.Buffer
	block := sha256.Sum256([]byte(seed))
	for buf.Len() < n {
		buf.Write(block[:])
		block = sha256.Sum256(block[:])
	}
	return buf.Bytes()[:n]
}

// TestReplicaDiskFull fills a replica's disk: the primary keeps serving its
// writers, the other replica keeps up, the full replica's lag and error
// show on the primary, what the full replica holds stays a complete cut
// (every file written by rename is whole), and once the operator grows the
// disk the replica catches up by itself, leaving no staging behind.
func TestReplicaDiskFull(t *testing.T) {
	requireE2E(t)
	if os.Geteuid() != 0 {
		t.Fatal("TestReplicaDiskFull mounts a small tmpfs for a host's volumes: run make e2e as root")
	}
	tp := startTopo(t, 3, func(h *host) ([]string, []string) {
		if h.name != "h3" {
			return nil, nil
		}
		return smallDisk(t, "24m")(h)
	})
	primary, full, other := tp.host("h1"), tp.host("h3"), tp.host("h2")
	var v tetherpb.Volume
	if err := tp.ctl(primary, &v, "volume", "create", "vol", "--replicas", "3"); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 20*time.Second, "the primary's volume directory exists", func() bool {
		_, err := os.Stat(primary.volumeDir("vol"))
		return err == nil
	})
	// A first file every copy has.
	write := func(name string, size int) {
		t.Helper()
		// Written beside, then renamed: a reader sees the whole file or none.
		tmp := filepath.Join(primary.volumeDir("vol"), "."+name+".tmp")
		if err := os.WriteFile(tmp, pattern(name, size), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, filepath.Join(primary.volumeDir("vol"), name)); err != nil {
			t.Fatal(err)
		}
	}
	write("small-0", 1<<20)
	tp.quiescent(t, tp.hosts)

	// 40 MiB more than h3 can hold, in whole files.
	for i := 1; i <= 10; i++ {
		write(fmt.Sprintf("big-%d", i), 4<<20)
	}
	fi, _ := tp.inject("disk-full", full, "replica", primary, func() {})
	// The primary reports h3's trouble, and h2 keeps up.
	testutil.EventuallyErr(t, 60*time.Second, func() error {
		vi, err := tp.inspect(primary, "vol")
		if err != nil {
			return err
		}
		for _, r := range vi.Status.GetReplicas() {
			if r.Node == full.name {
				if !strings.Contains(r.Error, "no space left") {
					return fmt.Errorf("the primary reports %s as %+v; want its error to say the disk is full", full.name, r)
				}
				t.Logf("the primary reports %s: connected %v, acked seq %d, lag %d ms, error %q", full.name, r.Connected, r.AckedSeq, r.LagMs, r.Error)
				return nil
			}
		}
		return fmt.Errorf("the primary reports no state for %s", full.name)
	})
	testutil.EventuallyErr(t, 60*time.Second, func() error {
		return sameTree(primary, other)
	})
	// The writers on the primary are unaffected.
	write("after-full", 64<<10)
	// What h3 holds is a complete cut: each file it has is whole.
	checkWhole := func() {
		t.Helper()
		entries, err := os.ReadDir(full.volumeDir("vol"))
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range entries {
			if strings.HasPrefix(e.Name(), ".") {
				continue // a temp file: any state of it is a state the primary had
			}
			got, err := os.ReadFile(filepath.Join(full.volumeDir("vol"), e.Name()))
			if err != nil {
				t.Fatal(err)
			}
			size := 4 << 20
			switch {
			case e.Name() == "small-0":
				size = 1 << 20
			case e.Name() == "after-full":
				size = 64 << 10
			}
			if !bytes.Equal(got, pattern(e.Name(), size)) {
				tp.rec.violation("%s holds a torn %s (%d bytes) while its disk is full", full.name, e.Name(), len(got))
			}
		}
	}
	checkWhole()

	// The operator grows the disk; h3 catches up without a restart.
	resizeDisk(t, full, "128m")
	tp.rec.healed(fi)
	testutil.EventuallyErr(t, 90*time.Second, func() error {
		return sameTree(primary, full)
	})
	checkWhole()
	testutil.EventuallyErr(t, 30*time.Second, func() error {
		vi, err := tp.inspect(primary, "vol")
		if err != nil {
			return err
		}
		for _, r := range vi.Status.GetReplicas() {
			if r.Node == full.name && (r.Error != "" || !r.Connected) {
				return fmt.Errorf("the primary still reports %s as %+v", full.name, r)
			}
		}
		return nil
	})
	// Nothing of the failed batches is left behind on h3's disk.
	used := diskUsed(t, filepath.Join(full.dataDir, "volumes"))
	want := int64(41<<20 + 64<<10)
	if used > want+8<<20 {
		t.Errorf("h3's volumes use %d MiB for %d MiB of data: the failed batches' staging was not cleaned up", used>>20, want>>20)
	}
	if final := tp.quiescent(t, tp.hosts); final.Primary != primary.name || final.Epoch != v.Epoch {
		t.Errorf("a full replica disk changed the primary: %+v", final)
	}
}

// sameTree compares a replica's copy with the primary's.
func sameTree(primary, replica *host) error {
	return replication.SameTree(primary.volumeDir("vol"), replica.volumeDir("vol"))
}

// diskUsed is the bytes in use on the filesystem holding dir.
func diskUsed(t *testing.T, dir string) int64 {
	t.Helper()
	out, err := exec.Command("df", "-B1", "--output=used", dir).Output()
	if err != nil {
		t.Fatal(err)
	}
	var n int64
	lines := strings.Fields(string(out))
	if _, err := fmt.Sscan(lines[len(lines)-1], &n); err != nil {
		t.Fatalf("parsing df output %q: %v", out, err)
	}
	return n
}
