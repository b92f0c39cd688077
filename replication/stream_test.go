package replication

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tether-io/tether/internal/testutil"
)

// streamSmall makes every file of 64 KiB or more a streamed one.
const streamSmall = 64 << 10

// TestStreamedFileRewrittenWhileSent rewrites a large file in place after
// the first chunk of its stream was sent: the rest of the stream reads the
// new contents, so what the replica staged is torn. The barrier after the
// stream sees the write; the batch must never be acknowledged as the cut it
// was taken as. A replica that takes continued batches gets it continued
// with the cut that carries the rewrite (committed as that cut, no new full
// cut); one of an earlier version gets a new full cut, spooled. Either way
// it ends with the new contents whole.
func TestStreamedFileRewrittenWhileSent(t *testing.T) {
	for _, continues := range []bool{true, false} {
		t.Run(fmt.Sprintf("replica continues %v", continues), func(t *testing.T) {
			c := newTestCluster(t)
			const size = 3 << 20
			must(t, os.WriteFile(c.path("big"), bytes.Repeat([]byte{'a'}, size), 0o644))
			c.write("small.txt", "x")
			c.startReplica("r1").srv.offerContinue(continues)
			var once sync.Once
			var brokenSeq atomic.Uint64
			c.prep = func(p *Primary) {
				p.streamMin = streamSmall
				p.onStreamChunk = func(seq uint64) {
					once.Do(func() {
						brokenSeq.Store(seq)
						f, err := os.OpenFile(c.path("big"), os.O_WRONLY, 0)
						if err == nil {
							_, err = f.WriteAt(bytes.Repeat([]byte{'b'}, size), 0)
							if cerr := f.Close(); err == nil {
								err = cerr
							}
						}
						if err != nil {
							t.Errorf("rewrite the file being streamed: %v", err)
						}
					})
				}
			}
			var mu sync.Mutex
			var acked []uint64
			p := c.startPrimaryWith(func(cfg *PrimaryConfig) {
				cfg.OnAck = func(_ string, a Ack) {
					mu.Lock()
					acked = append(acked, a.Seq)
					mu.Unlock()
				}
			}, 1, "r1")
			c.waitSynced("r1")
			got, err := os.ReadFile(filepath.Join(c.replicaPaths("r1").Data, "big"))
			must(t, err)
			if !bytes.Equal(got, bytes.Repeat([]byte{'b'}, size)) {
				t.Fatal("the replica's copy is not the rewritten file")
			}
			if brokenSeq.Load() == 0 {
				t.Fatal("the large file was not streamed")
			}
			wantBroken, wantContinued, wantFull := uint64(1), uint64(0), uint64(2)
			if continues {
				wantBroken, wantContinued, wantFull = 0, 1, 1
			}
			if st := p.Status(); st.StreamsBroken != wantBroken || st.StreamsContinued != wantContinued {
				t.Fatalf("broken streams: %d, continued: %d; want %d and %d", st.StreamsBroken, st.StreamsContinued, wantBroken, wantContinued)
			}
			if n := p.fullCuts.Load(); n != wantFull {
				t.Fatalf("full cuts taken: %d, want %d", n, wantFull)
			}
			mu.Lock()
			defer mu.Unlock()
			if slices.Contains(acked, brokenSeq.Load()) {
				t.Fatalf("the replica acknowledged batch %d, whose streamed file changed while sent", brokenSeq.Load())
			}
			if st := p.Status(); st.FileConsistentOnlyCuts != 0 {
				t.Fatalf("file-consistent-only cuts: %d", st.FileConsistentOnlyCuts)
			}
		})
	}
}

// TestStreamedFullCutFansOutAndIndexes streams a large file to two
// replicas, then changes 4 KiB of it: the change travels as a delta, so
// the index holds the hashes of what was streamed.
func TestStreamedFullCutFansOutAndIndexes(t *testing.T) {
	c := newTestCluster(t)
	data := make([]byte, 3<<20)
	_, _ = rand.Read(data)
	must(t, os.WriteFile(c.path("big"), data, 0o644))
	c.write("small.txt", "x")
	c.startReplica("r1")
	c.startReplica("r2")
	var chunks atomic.Int64
	c.prep = func(p *Primary) {
		p.streamMin = streamSmall
		p.onStreamChunk = func(uint64) { chunks.Add(1) }
	}
	p := c.startPrimary(1, "r1", "r2")
	c.waitSynced("r1", "r2")
	if chunks.Load() == 0 {
		t.Fatal("the large file was not streamed")
	}
	if n := p.brokenStreams.Load(); n != 0 {
		t.Fatalf("broken streams: %d", n)
	}
	c.wire.Store(0)
	f, err := os.OpenFile(c.path("big"), os.O_WRONLY, 0)
	must(t, err)
	_, err = f.WriteAt(bytes.Repeat([]byte{'z'}, 4096), 1<<20+100)
	must(t, err)
	must(t, f.Close())
	c.waitSynced("r1", "r2")
	if w := c.wire.Load(); w > 512<<10 {
		t.Fatalf("a 4 KiB change of a streamed file cost %d bytes on the wire: not sent as a delta", w)
	}
}

// TestReplicaStoppedWhileStreamingKeepsPreviousCut stops a replica in the
// middle of a streamed full cut: its volume stays at the previous cut (no
// commit), and once restarted it takes the new one.
func TestReplicaStoppedWhileStreamingKeepsPreviousCut(t *testing.T) {
	c := newTestCluster(t)
	c.write("a.txt", "v1")
	c.startReplica("r1")
	p1 := c.startPrimary(1, "r1")
	c.waitSynced("r1")
	p1.Stop()
	before, err := Manifest(c.replicaPaths("r1").Data)
	must(t, err)
	posBefore, err := durablePosition(c.replicaPaths("r1").State)
	must(t, err)

	data := make([]byte, 3<<20)
	_, _ = rand.Read(data)
	must(t, os.WriteFile(c.path("big"), data, 0o644))
	c.write("a.txt", "v2")
	var once sync.Once
	stopped := make(chan struct{})
	c.prep = func(p *Primary) {
		p.streamMin = streamSmall
		p.onStreamChunk = func(uint64) {
			once.Do(func() {
				c.stopReplica("r1")
				close(stopped)
			})
		}
	}
	c.startPrimary(2, "r1")
	testutil.Eventually(t, 15*time.Second, "the replica stopped mid-stream", func() bool {
		select {
		case <-stopped:
			return true
		default:
			return false
		}
	})
	after, err := Manifest(c.replicaPaths("r1").Data)
	must(t, err)
	if d := DiffManifests(before, after); len(d) > 0 {
		t.Fatalf("a replica stopped mid-stream is not at its previous cut: %v", d)
	}
	if pos, err := durablePosition(c.replicaPaths("r1").State); err != nil || pos != posBefore {
		t.Fatalf("a batch was committed mid-stream: position %v (%v), was %v", pos, err, posBefore)
	}
	c.startReplica("r1")
	c.waitSynced("r1")
}

// TestRescansDuringStreamLeaveItAlone holds a streamed full cut after its
// first chunk while rescans run: they take the streamed file as carried
// (its stat-only index entry) instead of marking it (which would break the
// stream and send the file again); once the stream ends the entry gets the
// hashes streamed, and a later change goes as a delta.
func TestRescansDuringStreamLeaveItAlone(t *testing.T) {
	c := newTestCluster(t)
	data := make([]byte, 3<<20)
	_, _ = rand.Read(data)
	must(t, os.WriteFile(c.path("big"), data, 0o644))
	c.startReplica("r1")
	held, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	c.prep = func(p *Primary) {
		p.streamMin = streamSmall
		p.onStreamChunk = func(uint64) {
			once.Do(func() {
				close(held)
				<-release
			})
		}
	}
	c.wire.Store(0)
	p := c.startPrimaryWith(func(cfg *PrimaryConfig) { cfg.RescanInterval = 50 * time.Millisecond }, 1, "r1")
	select {
	case <-held:
	case <-time.After(10 * time.Second):
		t.Fatal("the large file was not streamed")
	}
	rescans := p.w.rescans.Load()
	testutil.Eventually(t, 10*time.Second, "rescans while the stream is held", func() bool {
		return p.w.rescans.Load() > rescans+2
	})
	close(release)
	c.waitSynced("r1")
	if n := p.brokenStreams.Load(); n != 0 {
		t.Fatalf("%d broken streams: a rescan took the streamed file as changed", n)
	}
	if n := c.wire.Load(); n > 4<<20 {
		t.Fatalf("%d bytes sent for a 3 MiB volume: the streamed file was sent again", n)
	}
	e, err := p.idx.get("big")
	must(t, err)
	if e == nil || int64(len(e.hashes)) != blockCount(e.size, blockSize)*hashLen {
		t.Fatalf("index entry of the streamed file: %+v, want its block hashes", e)
	}
	c.wire.Store(0)
	writeAt(t, c.path("big"), 1<<20, []byte("a small change"))
	c.waitSynced("r1")
	if n := c.wire.Load(); n > 512<<10 {
		t.Fatalf("a small change of the streamed file sent %d bytes: not a delta", n)
	}
}

// TestFullSyncProgress holds a full sync after a first streamed file:
// the replica's state shows how much of the tree is sent, of how much,
// and shows nothing once the replica holds the cut.
func TestFullSyncProgress(t *testing.T) {
	c := newTestCluster(t)
	for _, name := range []string{"a", "b", "c", "d"} {
		must(t, os.WriteFile(c.path(name), randomBytes(256<<10), 0o644))
	}
	c.write("small", "x")
	held, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	c.prep = func(p *Primary) {
		p.streamMin = streamSmall
		p.onStreamChunk = func(uint64) {
			// Hold the stream once a first streamed file is counted.
			if r := p.Status().Replicas; len(r) == 1 && r[0].FullSyncDone >= 256<<10 {
				once.Do(func() {
					close(held)
					<-release
				})
			}
		}
	}
	c.startReplica("r1")
	p := c.startPrimary(1, "r1")
	select {
	case <-held:
	case <-time.After(15 * time.Second):
		t.Fatalf("the full sync never showed a first streamed file sent: %+v", p.Status().Replicas)
	}
	st := p.Status().Replicas[0]
	close(release)
	if st.FullSyncTotal < 4*256<<10 || st.FullSyncDone < 256<<10 || st.FullSyncDone >= st.FullSyncTotal {
		t.Fatalf("mid-way through the full sync: done %d of %d, want at least one 256 KiB file of more than 1 MiB", st.FullSyncDone, st.FullSyncTotal)
	}
	c.waitSynced("r1")
	testutil.Eventually(t, 10*time.Second, "no full sync shown once the replica holds the cut", func() bool {
		st := p.Status().Replicas[0]
		return st.FullSyncTotal == 0 && st.FullSyncDone == 0
	})
}

// busyWriter keeps a volume busy the way a database does: for N = 1, 2, ...
// it rewrites the large file big with bytes N (mod 251), then
// writes N to a.txt, then to b.txt (by rename). Every state the volume
// passes through, and so every crash-consistent copy, has b ≤ a ≤ b+1 and
// big holding only bytes a or a+1 when a = b (its write may be in flight),
// only bytes a when a = b+1.
type busyWriter struct {
	lockstep
	size     int
	truncate bool          // rewrite big by truncating it first (os.WriteFile), not in place
	pause    time.Duration // between two rounds of writes (load pacing: 0 for none)
}

func (w *busyWriter) run(ctx context.Context) error {
	buf := make([]byte, w.size)
	for n := 1; ctx.Err() == nil; n++ {
		for i := range buf {
			buf[i] = byte(n % 251)
		}
		w.mu.Lock()
		var err error
		if w.truncate {
			err = os.WriteFile(filepath.Join(w.dir, "big"), buf, 0o644)
		} else {
			err = rewrite(filepath.Join(w.dir, "big"), buf)
		}
		w.mu.Unlock()
		if err != nil {
			return err
		}
		for _, name := range []string{"a.txt", "b.txt"} {
			w.mu.Lock()
			err := writeAtomic(w.dir, name, n)
			w.mu.Unlock()
			if err != nil {
				return err
			}
		}
		w.n.Store(int64(n))
		if w.pause > 0 {
			select {
			case <-ctx.Done():
			case <-time.After(w.pause):
			}
		}
	}
	return nil
}

// rewrite writes data over the start of the file at path, in place.
func rewrite(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, err = f.WriteAt(data, 0)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// check checks the writer's invariant on a copy of the volume.
func (w *busyWriter) check(data string) error {
	a, b, err := checkLockstep(data)
	if err != nil {
		return err
	}
	big, err := os.ReadFile(filepath.Join(data, "big"))
	if err != nil {
		return err
	}
	ok := func(v byte) bool { return int(v) == a%251 || a == b && int(v) == (a+1)%251 }
	for i, v := range big {
		if !ok(v) {
			return fmt.Errorf("replica holds a.txt=%d b.txt=%d and byte %d of big is %d: not a state the primary ever had", a, b, i, v)
		}
	}
	return nil
}

// TestBusyVolumeBatchesAreStatesItHad replicates a volume that never stops
// changing, from its first full sync on: its large file is rewritten all the
// time, in place or truncated first, and every batch the replica makes
// durable must be a state the volume had. When the full sync streams the
// large file, the stream sees it change and is continued with the cuts
// that carry the changes (no new full cut, unless a truncation made a
// streamed reading come up short). A truncation's event can reach the
// watcher after a barrier taken once the file was visibly shorter, so a
// reading that came up short is never taken as consistent
// (truncating/spooled failed before).
func TestBusyVolumeBatchesAreStatesItHad(t *testing.T) {
	for _, truncate := range []bool{false, true} {
		for _, stream := range []bool{true, false} {
			name := fmt.Sprintf("truncate %v, stream %v", truncate, stream)
			t.Run(name, func(t *testing.T) { testBusyVolume(t, truncate, stream) })
		}
	}
}

func testBusyVolume(t *testing.T, truncate, stream bool) {
	c := newTestCluster(t)
	w := &busyWriter{lockstep: lockstep{dir: c.primaryData}, size: 2 << 20, truncate: truncate}
	must(t, os.WriteFile(c.path("big"), make([]byte, w.size), 0o644))
	must(t, writeAtomic(w.dir, "a.txt", 0))
	must(t, writeAtomic(w.dir, "b.txt", 0))
	for i := range 20 {
		c.write(fmt.Sprintf("small-%02d", i), strconv.Itoa(i))
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.run(ctx) }()
	defer func() {
		cancel()
		<-done
	}()
	testutil.Eventually(t, 10*time.Second, "the writer is running", func() bool { return w.n.Load() >= 3 })

	r := c.startReplica("r1")
	audit := auditBatches(r, func() error { return w.check(c.replicaPaths("r1").Data) })
	if stream {
		c.prep = func(p *Primary) { p.streamMin = streamSmall }
	}
	p := c.startPrimaryWith(func(cfg *PrimaryConfig) {
		cfg.Debounce = time.Millisecond
		cfg.Freezer = w
	}, 1, "r1")
	audit.await(t, 20)
	cancel()
	must(t, <-done)
	done <- nil
	c.waitSynced("r1")
	audit.verify(t)
	continued, broken, full := p.continuedStreams.Load(), p.brokenStreams.Load(), p.fullCuts.Load()
	switch {
	case stream && !truncate && (continued == 0 || broken != 0 || full != 1):
		t.Fatalf("continued streams: %d, broken: %d, full cuts: %d; want at least 1, 0 and 1 (the writer changes the file during every stream of it)", continued, broken, full)
	case !stream && (continued != 0 || broken != 0):
		t.Fatalf("continued streams: %d, broken: %d, but nothing was streamed", continued, broken)
	}
	if st := p.Status(); st.FileConsistentOnlyCuts != 0 {
		t.Fatalf("%d cuts shipped file-consistent only despite the freeze hook", st.FileConsistentOnlyCuts)
	}
	t.Logf("%d batches checked, %d continued, %d broken; writer reached %d", audit.checked.Load(), continued, broken, w.n.Load())
}

// TestStreamedFileRenamedOrRemovedWhileSent renames one large file and
// removes another while the full sync streams the first (as PostgreSQL
// recycles and removes WAL segments): the cut holds its large files open,
// so both are still read as they were at the cut, and the batch is
// continued with the cut that carries the rename and the removal; no new
// full cut.
func TestStreamedFileRenamedOrRemovedWhileSent(t *testing.T) {
	c := newTestCluster(t)
	for _, name := range []string{"a", "b", "c"} {
		must(t, os.WriteFile(c.path(name), randomBytes(1<<20), 0o644))
	}
	c.startReplica("r1")
	var once sync.Once
	c.prep = func(p *Primary) {
		p.streamMin = streamSmall
		p.onStreamChunk = func(uint64) {
			once.Do(func() {
				if err := os.Rename(c.path("b"), c.path("b-recycled")); err != nil {
					t.Errorf("rename a file being streamed: %v", err)
				}
				if err := os.Remove(c.path("c")); err != nil {
					t.Errorf("remove a file being streamed: %v", err)
				}
			})
		}
	}
	p := c.startPrimary(1, "r1")
	c.waitSynced("r1")
	if n, m, full := p.brokenStreams.Load(), p.continuedStreams.Load(), p.fullCuts.Load(); n != 0 || m != 1 || full != 1 {
		t.Fatalf("broken streams: %d, continued: %d, full cuts: %d; want 0, 1 and 1", n, m, full)
	}
}

// TestFullSyncWithoutFreezerStreams makes the first full sync of a volume
// whose full cut does not converge (a file changes after every round of it,
// one round per cut, no freeze hook): its large file is streamed all the
// same (not read into the spool), and the batch continued over the cuts
// taken meanwhile, up to a consistent one.
func TestFullSyncWithoutFreezerStreams(t *testing.T) {
	c := newTestCluster(t)
	must(t, os.WriteFile(c.path("big"), randomBytes(2<<20), 0o644))
	c.write("noise", "0")
	c.startReplica("r1")
	var n atomic.Int64
	c.prep = func(p *Primary) {
		p.streamMin = streamSmall
		p.afterRound = func(full bool) {
			if full {
				if err := os.WriteFile(c.path("noise"), []byte(strconv.FormatInt(n.Add(1), 10)), 0o644); err != nil {
					t.Errorf("write during the full cut: %v", err)
				}
			}
		}
	}
	p := c.startPrimaryWith(func(cfg *PrimaryConfig) { cfg.MaxRounds = 1 }, 1, "r1")
	c.waitSynced("r1")
	if m, b, full, fileOnly := p.continuedStreams.Load(), p.brokenStreams.Load(), p.fullCuts.Load(), p.Status().FileConsistentOnlyCuts; m != 1 || b != 0 || full != 1 || fileOnly != 1 {
		t.Fatalf("continued streams: %d, broken: %d, full cuts: %d, file-consistent cuts: %d; want 1, 0, 1 and 1", m, b, full, fileOnly)
	}
}

// TestFileConsistentCutsHoldFilesWhole rewrites a 3 MiB file while a cut
// reads it, after its first chunk (so the reading holds the old first MiB
// and the new rest), in cuts of one round without a freeze hook (so they
// are file-consistent only): every batch must still hold the file whole.
// Torn once, the file is read again; torn at every reading of a cut, it is
// left out of that cut (the replica keeps its previous version) and the
// next cut sends it.
func TestFileConsistentCutsHoldFilesWhole(t *testing.T) {
	for _, tears := range []int{1, 1 + tornRetries} {
		t.Run(fmt.Sprintf("torn %d times", tears), func(t *testing.T) {
			c := newTestCluster(t)
			const size = 3 << 20
			version := func(v byte) []byte { return bytes.Repeat([]byte{v}, size) }
			must(t, os.WriteFile(c.path("big"), version(1), 0o644))
			r := c.startReplica("r1")
			var left atomic.Int64
			var next atomic.Int32
			next.Store(3)
			c.prep = func(p *Primary) {
				p.onSpoolChunk = func(rel string, off uint64) {
					if rel == "big" && off == 0 && left.Add(-1) >= 0 {
						must(t, rewrite(c.path("big"), version(byte(next.Add(1)))))
					}
				}
			}
			p := c.startPrimaryWith(func(cfg *PrimaryConfig) { cfg.MaxRounds = 1 }, 1, "r1")
			c.waitSynced("r1")
			audit := auditBatches(r, func() error {
				big, err := os.ReadFile(filepath.Join(c.replicaPaths("r1").Data, "big"))
				if err != nil {
					return err
				}
				if lo, hi := slices.Min(big), slices.Max(big); lo != hi {
					return fmt.Errorf("big holds bytes %d to %d: torn", lo, hi)
				}
				return nil
			})
			left.Store(int64(tears))
			must(t, rewrite(c.path("big"), version(2)))
			c.waitSynced("r1")
			audit.verify(t)
			if left.Load() > 0 {
				t.Fatalf("the file was read %d times fewer than the test tears it", left.Load())
			}
			if p.Status().FileConsistentOnlyCuts == 0 {
				t.Fatal("no cut was file-consistent only")
			}
		})
	}
}

// TestStreamedFullCutKeptForAReplicaNotYetConnected takes the first full
// cut, with a large streamed file, before the replica is reachable: the
// cut's retention counts what it holds in its spool, not the streamed
// file, so it stays within a retention budget smaller than that file and
// the replica gets it when it connects (no second full cut).
func TestStreamedFullCutKeptForAReplicaNotYetConnected(t *testing.T) {
	c := newTestCluster(t)
	must(t, os.WriteFile(c.path("big"), randomBytes(3<<20), 0o644))
	c.write("small", "s")
	c.prep = func(p *Primary) { p.streamMin = streamSmall }
	p := c.startPrimaryWith(func(cfg *PrimaryConfig) { cfg.RetainBytes = 1 << 20 }, 1, "r1")
	testutil.Eventually(t, 10*time.Second, "the first full cut is published", func() bool { return p.latestSeq() != 0 })
	c.startReplica("r1")
	c.waitSynced("r1")
	if n := p.fullCuts.Load(); n != 1 {
		t.Fatalf("full cuts taken: %d, want 1 (the first was dropped before the replica connected)", n)
	}
}
