package replication

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"lukechampine.com/blake3"

	"github.com/tether-io/tether/internal/testutil"
	"github.com/tether-io/tether/proto/tetherpb"
)

// TestBaseCacheTrustedOnlyWithItsStat: a cached digest stands in for
// reading the base (a stand-in digest no hashing would give is accepted),
// and only while the file's stat is the one recorded: once the file is
// written the base is hashed again and the mismatch found.
func TestBaseCacheTrustedOnlyWithItsStat(t *testing.T) {
	dir := t.TempDir()
	must(t, os.WriteFile(filepath.Join(dir, "f"), randomBytes(200<<10), 0o644))
	root, err := os.OpenRoot(dir)
	must(t, err)
	defer root.Close()
	fi, err := root.Lstat("f")
	must(t, err)
	stand := bytes.Repeat([]byte{7}, hashLen) // not the digest of f
	d := &deltaOp{baseSize: fi.Size(), baseMtime: fi.ModTime().UnixNano(), digest: stand, blockSize: blockSize}
	if err := checkBase(root, "f", d, nil); !errors.Is(err, errBaseMismatch) {
		t.Fatalf("without a cache: %v, want a base mismatch", err)
	}
	cache := newBaseCache()
	cache.record([]applyOp{{kind: tetherpb.FileOp_KIND_FILE, path: "f", digest: &fileDigest{blockSize: blockSize, sum: stand}}},
		map[string]*indexEntry{"f": indexEntryOf(fi, fi.ModTime())})
	if err := checkBase(root, "f", d, cache); err != nil {
		t.Fatalf("with the digest cached: %v, want it trusted", err)
	}
	other := *d
	other.blockSize = 2 * blockSize
	if cache.matches("f", fi, other.blockSize, stand) {
		t.Fatal("a digest over other blocks matched")
	}
	writeAt(t, filepath.Join(dir, "f"), 0, []byte("x"))
	must(t, os.Chtimes(filepath.Join(dir, "f"), fi.ModTime(), fi.ModTime())) // same size and mtime, new ctime
	if err := checkBase(root, "f", d, cache); !errors.Is(err, errBaseMismatch) {
		t.Fatalf("after a write: %v, want the base hashed and the mismatch found", err)
	}
	cache.record([]applyOp{{kind: tetherpb.FileOp_KIND_DELETE, path: "f"}}, nil)
	if len(cache.m) != 0 {
		t.Fatalf("a deleted path stays cached: %v", cache.m)
	}
}

// TestReplicaCachesDigests: after the initial sync and after a delta, the
// replica's cache holds the digest its copy really has.
func TestReplicaCachesDigests(t *testing.T) {
	c := newTestCluster(t)
	r := c.startReplica("r1")
	must(t, os.WriteFile(c.path("big"), randomBytes(3<<20), 0o644))
	c.startPrimary(1, "r1")
	c.waitSynced("r1")
	check := func(when string) {
		t.Helper()
		v := r.srv.volume(testVolume)
		v.mu.Lock()
		e, ok := v.bases.m["big"]
		v.mu.Unlock()
		f, err := os.Open(filepath.Join(c.replicaPaths("r1").Data, "big"))
		must(t, err)
		defer f.Close()
		fi, err := f.Stat()
		must(t, err)
		h, err := hashFile(f, fi.Size(), blockSize)
		must(t, err)
		if !ok || !bytes.Equal(e.digest.sum, digestOf(h)) || !r.srv.volume(testVolume).bases.matches("big", fi, blockSize, digestOf(h)) {
			t.Fatalf("%s: cache entry %+v (present %v) is not the copy's digest", when, e, ok)
		}
	}
	check("after the initial sync")
	writeAt(t, c.path("big"), 1<<20+5, randomBytes(100<<10))
	c.waitSynced("r1")
	check("after a delta")
}

// TestHashFileSkipsHoles: hashing only the data extents of a sparse file
// gives the hashes of reading it whole (holes as zeros), for whole and
// partial blocks.
func TestHashFileSkipsHoles(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sparse")
	size := int64(10*blockSize + 123)
	writeSparse(t, path, size, 0, 3*blockSize+100, 10*blockSize)
	f, err := os.Open(path)
	must(t, err)
	defer f.Close()
	got, err := hashFile(f, size, blockSize)
	must(t, err)
	all, err := os.ReadFile(path)
	must(t, err)
	var want []byte
	for off := int64(0); off < size; off += blockSize {
		h := blake3.Sum256(all[off:min(off+blockSize, size)])
		want = append(want, h[:]...)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("hashes of the data extents differ from those of the whole file")
	}
}

// TestBaseCacheStatFromPlacement writes into the replica's copy behind
// tether's back right after the batch placed it, before the batch is done
// (a failpoint at "applied"), restoring its size and mtime: the stat the
// cache keeps is the one taken at placement, so the write shows and the
// next delta is refused (a full resync repairs the copy) instead of being
// patched into a file that is not its base.
func TestBaseCacheStatFromPlacement(t *testing.T) {
	c := newTestCluster(t)
	r := c.startReplica("r1")
	must(t, os.WriteFile(c.path("f"), randomBytes(1<<20), 0o644))
	rf := filepath.Join(c.replicaPaths("r1").Data, "f")
	var once sync.Once
	r.srv.setFailpoint(func(step string) error {
		if step != "applied" {
			return nil
		}
		once.Do(func() {
			fi, err := os.Stat(rf)
			if err != nil {
				t.Errorf("stat the copy: %v", err)
				return
			}
			// Past the coarse clock's tick of tether's own write, so the
			// write's ctime differs on any kernel.
			testutil.Eventually(t, 5*time.Second, "the clock ticks past the placement", func() bool {
				probe := filepath.Join(t.TempDir(), "probe")
				if err := os.WriteFile(probe, nil, 0o600); err != nil {
					return false
				}
				pi, err := os.Stat(probe)
				return err == nil && statCtime(pi) > statCtime(fi)
			})
			writeAt(t, rf, 700<<10, []byte("diverged"))
			must(t, os.Chtimes(rf, fi.ModTime(), fi.ModTime()))
		})
		return nil
	})
	p := c.startPrimary(1, "r1")
	testutil.Eventually(t, 10*time.Second, "the initial sync applied", func() bool {
		_, seq, _, err := r.srv.Position(testVolume)
		return err == nil && seq != 0
	})
	writeAt(t, c.path("f"), 10, []byte("changed on the primary"))
	c.waitSynced("r1")
	if n := fullSentTo(p, "r1"); n != 2 {
		t.Fatalf("full batches sent = %d, want 2 (the initial one, then one after the refused delta)", n)
	}
}

func statCtime(fi os.FileInfo) int64 {
	return indexEntryOf(fi, fi.ModTime()).ctime
}
