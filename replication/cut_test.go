package replication

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tether-io/tether/internal/testutil"
)

// writeAtomic replaces a file's contents by a rename, as a database's
// atomic file update does.
func writeAtomic(dir, name string, n int) error {
	tmp := filepath.Join(dir, "."+name+".tmp")
	if err := os.WriteFile(tmp, []byte(strconv.Itoa(n)), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(dir, name))
}

// lockstep is a writer that keeps a.txt and b.txt in lockstep: it writes N
// to a.txt, then N to b.txt, for N = 1, 2, ... At every instant the volume
// has b ≤ a ≤ b+1, so every crash-consistent copy has it too; a copy that
// read b.txt after a later write than a.txt's (b > a) or missed more than
// one step of a.txt (a > b+1) is not one a crash could produce.
type lockstep struct {
	dir string
	mu  sync.Mutex // held around each single write; the freezer takes it
	n   atomic.Int64
}

func (l *lockstep) run(ctx context.Context) error {
	for n := 1; ctx.Err() == nil; n++ {
		for _, name := range []string{"a.txt", "b.txt"} {
			l.mu.Lock()
			err := writeAtomic(l.dir, name, n)
			l.mu.Unlock()
			if err != nil {
				return err
			}
		}
		l.n.Store(int64(n))
	}
	return nil
}

// Freeze pauses the writer between two writes.
func (l *lockstep) Freeze(context.Context) (func(), error) {
	l.mu.Lock()
	return l.mu.Unlock, nil
}

// checkLockstep reads a.txt and b.txt in a replica's data directory and
// checks b ≤ a ≤ b+1.
func checkLockstep(data string) (a, b int, err error) {
	read := func(name string) (int, error) {
		s, err := os.ReadFile(filepath.Join(data, name))
		if err != nil {
			return 0, err
		}
		return strconv.Atoi(string(s))
	}
	if a, err = read("a.txt"); err != nil {
		return 0, 0, err
	}
	if b, err = read("b.txt"); err != nil {
		return 0, 0, err
	}
	if b > a || a > b+1 {
		return a, b, fmt.Errorf("replica holds a.txt=%d b.txt=%d: not a state the primary ever had", a, b)
	}
	return a, b, nil
}

// batchAudit checks every batch a replica makes durable, after it is
// applied and before its ack, and keeps what failed.
type batchAudit struct {
	mu         sync.Mutex
	violations []string
	checked    atomic.Int64
}

// auditBatches runs check on replica r after every batch it applies.
func auditBatches(r *replicaNode, check func() error) *batchAudit {
	a := &batchAudit{}
	r.srv.setFailpoint(func(step string) error {
		if step == "applied" {
			if err := check(); err != nil {
				a.mu.Lock()
				a.violations = append(a.violations, fmt.Sprintf("batch %d: %v", a.checked.Load()+1, err))
				a.mu.Unlock()
			}
			a.checked.Add(1)
		}
		return nil
	})
	return a
}

// await waits until n batches were checked.
func (a *batchAudit) await(t *testing.T, n int64) {
	t.Helper()
	testutil.Eventually(t, 30*time.Second, fmt.Sprintf("%d batches applied while the writer runs", n), func() bool {
		return a.checked.Load() >= n
	})
}

// verify fails the test if a batch failed its check.
func (a *batchAudit) verify(t *testing.T) {
	t.Helper()
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.violations) > 0 {
		t.Fatalf("%d of %d batches failed their check, first: %s", len(a.violations), a.checked.Load(), a.violations[0])
	}
}

// TestCutsAreCrashConsistent runs the lockstep writer against a primary
// and checks the invariant on the replica after every batch it makes
// durable, for cuts that converge by re-reading and (with a short round
// limit) through the freeze hook.
func TestCutsAreCrashConsistent(t *testing.T) {
	for _, rounds := range []int{8, 1} {
		t.Run(fmt.Sprintf("max rounds %d", rounds), func(t *testing.T) {
			c := newTestCluster(t)
			w := &lockstep{dir: c.primaryData}
			must(t, writeAtomic(w.dir, "a.txt", 0))
			must(t, writeAtomic(w.dir, "b.txt", 0))
			r := c.startReplica("r1")
			audit := auditBatches(r, func() error {
				_, _, err := checkLockstep(c.replicaPaths("r1").Data)
				return err
			})
			p := c.startPrimaryWith(func(cfg *PrimaryConfig) {
				cfg.Debounce = time.Millisecond
				cfg.MaxRounds = rounds
				cfg.Freezer = w
			}, 1, "r1")
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- w.run(ctx) }()
			audit.await(t, 30)
			cancel()
			must(t, <-done)
			c.waitSynced("r1")
			audit.verify(t)
			st := p.Status()
			if st.FileConsistentOnlyCuts != 0 {
				t.Fatalf("%d cuts shipped file-consistent only despite the freeze hook", st.FileConsistentOnlyCuts)
			}
			t.Logf("%d cuts checked, writer reached %d, %d cuts taken", audit.checked.Load(), w.n.Load(), st.Cuts)
		})
	}
}

// TestCutWithoutFreezerIsMarked runs the lockstep writer without a freeze
// hook and a round limit of 1: cuts that do not converge are counted as
// file-consistent only, and the replica still converges once writes stop.
func TestCutWithoutFreezerIsMarked(t *testing.T) {
	c := newTestCluster(t)
	w := &lockstep{dir: c.primaryData}
	must(t, writeAtomic(w.dir, "a.txt", 0))
	must(t, writeAtomic(w.dir, "b.txt", 0))
	c.startReplica("r1")
	p := c.startPrimaryWith(func(cfg *PrimaryConfig) {
		cfg.Debounce = time.Millisecond
		cfg.MaxRounds = 1
	}, 1, "r1")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.run(ctx) }()
	testutil.Eventually(t, 20*time.Second, "a file-consistent-only cut", func() bool {
		return p.Status().FileConsistentOnlyCuts > 0
	})
	cancel()
	must(t, <-done)
	c.waitSynced("r1")
	if _, _, err := checkLockstep(c.replicaPaths("r1").Data); err != nil {
		t.Fatal(err)
	}
}

// TestOneReadPerCut checks that a cut is read once and sent to every
// replica: two replicas acknowledge the same batch numbers.
func TestOneReadPerCut(t *testing.T) {
	c := newTestCluster(t)
	c.startReplica("r1")
	c.startReplica("r2")
	p := c.startPrimary(1, "r1", "r2")
	c.waitSynced("r1", "r2")
	for i := range 5 {
		c.write("f", strconv.Itoa(i))
		c.waitSynced("r1", "r2")
	}
	testutil.Eventually(t, 5*time.Second, "both replicas at the last cut", func() bool {
		st := p.Status()
		return len(st.Replicas) == 2 && st.Replicas[0].AckedSeq == st.Seq && st.Replicas[1].AckedSeq == st.Seq
	})
	if st := p.Status(); st.Cuts > 7 {
		t.Fatalf("%d cuts for 5 changes and the initial sync: cuts are taken per replica", st.Cuts)
	}
}

// TestNewReplicaGetsFullOthersDelta adds a replica to a running primary:
// the full cut it needs is read once, and the replica already in sync gets
// only the changes of that cut (its delta view), not the whole tree.
func TestNewReplicaGetsFullOthersDelta(t *testing.T) {
	c := newTestCluster(t)
	must(t, os.MkdirAll(c.path("d/sub"), 0o755))
	c.write("d/sub/f", "f")
	c.write("g", "g")
	c.startReplica("r1")
	c.startReplica("r2")
	p := c.startPrimary(1, "r1")
	c.waitSynced("r1")
	// Changes that the full cut for r2 also carries to r1 as a delta:
	// a new file, a removed one, a directory removed and one renamed.
	c.write("new", "n")
	must(t, os.Remove(c.path("g")))
	must(t, os.Rename(c.path("d"), c.path("e")))
	p.SetReplicas([]string{"r1", "r2"})
	c.waitSynced("r1", "r2")
	c.write("after", "a")
	c.waitSynced("r1", "r2")
	fullSent := map[string]int{}
	p.mu.Lock()
	for n, s := range p.senders {
		s.mu.Lock()
		fullSent[n] = s.fullSent
		s.mu.Unlock()
	}
	p.mu.Unlock()
	if fullSent["r1"] != 1 || fullSent["r2"] != 1 {
		t.Fatalf("full batches sent = %v, want one each (r1 only its initial sync)", fullSent)
	}
}

func TestDeltaOf(t *testing.T) {
	dir := t.TempDir()
	must(t, os.MkdirAll(filepath.Join(dir, "new/sub"), 0o755))
	must(t, os.WriteFile(filepath.Join(dir, "new/sub/f"), nil, 0o644))
	must(t, os.WriteFile(filepath.Join(dir, "changed"), []byte("c"), 0o644))
	must(t, os.WriteFile(filepath.Join(dir, "quiet"), []byte("q"), 0o644))
	must(t, os.WriteFile(filepath.Join(dir, "l1"), []byte("l"), 0o644))
	must(t, os.Link(filepath.Join(dir, "l1"), filepath.Join(dir, "l2")))
	must(t, os.WriteFile(filepath.Join(dir, "vanished"), []byte("v"), 0o644))
	root, err := os.OpenRoot(dir)
	must(t, err)
	defer root.Close()
	full, err := fullPlan(root)
	must(t, err)
	// vanished was planned, then gone before the cut read it: the index
	// forgets it with the full cut, so a replica that follows deletes it.
	carried := func(rel string) bool { return rel != "vanished" }
	d := deltaOf(full, map[string]bool{".": false, "new": true, "changed": false, "gone": false, "l1": false, "vanished": false}, carried)
	if got, want := keys(d.deletes), []string{"gone", "new", "vanished"}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("deletes = %q, want %q", got, want)
	}
	if got, want := keys(d.dirs), []string{".", "new", "new/sub"}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("dirs = %q, want %q", got, want)
	}
	if got, want := keys(d.others), []string{"changed", "l1", "l2", "new/sub/f"}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("others = %q, want %q", got, want)
	}
}
