package replication

import (
	"fmt"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/tether-io/tether/internal/testutil"
)

func TestRetention(t *testing.T) {
	cuts := func(first uint64, bytes ...int64) []retainedCut {
		out := make([]retainedCut, len(bytes))
		for i, b := range bytes {
			out[i] = retainedCut{seq: first + uint64(i), bytes: b}
		}
		return out
	}
	fullAt := func(kept []retainedCut, seq uint64) []retainedCut {
		for i := range kept {
			kept[i].full = kept[i].seq == seq
		}
		return kept
	}
	cases := map[string]struct {
		kept     []retainedCut
		holds    []replicaHold
		budget   int64
		maxCuts  int
		drop     int
		released []string
	}{
		"no replica: drop everything": {
			kept: cuts(10, 1, 1, 1), budget: 100, drop: 3},
		"a caught-up replica needs nothing": {
			kept: cuts(10, 1, 1, 1), holds: []replicaHold{{node: "a", need: 13, active: true}}, budget: 100, drop: 3},
		"an active replica keeps what it needs": {
			kept: cuts(10, 1, 1, 1), holds: []replicaHold{{node: "a", need: 11, active: true}}, budget: 100, drop: 1},
		"an active replica keeps its cuts beyond the budget": {
			kept: cuts(10, 50, 50, 50), holds: []replicaHold{{node: "a", need: 10, active: true}}, budget: 10, drop: 0},
		"a disconnected replica keeps its cuts within the budget": {
			kept:   cuts(10, 1, 1, 1, 1),
			holds:  []replicaHold{{node: "a", need: 14, active: true}, {node: "b", need: 11, held: true}},
			budget: 100, drop: 1},
		"over the budget, a disconnected replica's cuts go, oldest first, not the active's": {
			kept:   cuts(10, 40, 40, 40, 40),
			holds:  []replicaHold{{node: "a", need: 13, active: true}, {node: "b", need: 10, held: true}},
			budget: 90, drop: 2, released: []string{"b"}},
		"over the count, a disconnected replica's cuts go too": {
			kept:   cuts(10, 1, 1, 1, 1, 1),
			holds:  []replicaHold{{node: "a", need: 14, active: true}, {node: "b", need: 10, held: true}},
			budget: 100, maxCuts: 3, drop: 2, released: []string{"b"}},
		"an expired replica holds nothing": {
			kept:   cuts(10, 1, 1, 1),
			holds:  []replicaHold{{node: "a", need: 12, active: true}, {node: "b", need: 10}},
			budget: 100, drop: 2, released: []string{"b"}},
		"a replica already behind the kept cuts is not released again": {
			kept: cuts(10, 1, 1), holds: []replicaHold{{node: "b", need: 5, held: true}}, budget: 100, drop: 0},
		"a replica waiting for a full cut holds nothing before it": {
			kept:   fullAt(cuts(10, 1, 1, 1, 1), 12),
			holds:  []replicaHold{{node: "a", need: 9, full: true, active: true}},
			budget: 100, drop: 2},
		"a replica waiting for a full cut not taken yet holds nothing": {
			kept:   fullAt(cuts(10, 1, 1, 1), 10),
			holds:  []replicaHold{{node: "a", need: 10, full: true, held: true}},
			budget: 100, drop: 3},
	}
	for name, c := range cases {
		if c.maxCuts == 0 {
			c.maxCuts = 1000
		}
		drop, released := retention(c.kept, c.holds, retainLimits{bytes: c.budget, cuts: c.maxCuts})
		if drop != c.drop || !slices.Equal(released, c.released) {
			t.Errorf("%s: retention = %d %v, want %d %v", name, drop, released, c.drop, c.released)
		}
	}
}

// TestReplicaResumesAfterManyCuts stops a replica while the primary takes
// many more cuts than the former fixed retention (64) kept: the replica
// resumes where it stopped, without a full resync.
func TestReplicaResumesAfterManyCuts(t *testing.T) {
	c := newTestCluster(t)
	c.write("f", "0")
	c.startReplica("r1")
	p := c.startPrimaryWith(func(cfg *PrimaryConfig) { cfg.Debounce = time.Millisecond }, 1, "r1")
	c.waitSynced("r1")
	c.stopReplica("r1")
	start := p.Status().Cuts
	for i := 1; p.Status().Cuts < start+80; i++ {
		c.write("f", strconv.Itoa(i))
		want := start + uint64(i)
		testutil.Eventually(t, 5*time.Second, fmt.Sprintf("cut %d", want), func() bool { return p.Status().Cuts >= want })
	}
	c.startReplica("r1")
	c.waitSynced("r1")
	if n := fullSentTo(p, "r1"); n != 1 {
		t.Fatalf("%d full batches sent, want only the initial one (the replica should resume after 80 cuts)", n)
	}
}

// TestRetentionBudgetForcesFullResync gives the primary a retention budget
// smaller than what a stopped replica needs: its cuts are dropped, and it
// gets the whole tree when it returns.
func TestRetentionBudgetForcesFullResync(t *testing.T) {
	c := newTestCluster(t)
	c.write("f", "0")
	c.startReplica("r1")
	p := c.startPrimaryWith(func(cfg *PrimaryConfig) {
		cfg.Debounce = time.Millisecond
		cfg.RetainBytes = 1
	}, 1, "r1")
	c.waitSynced("r1")
	c.stopReplica("r1")
	for i := 1; i <= 3; i++ {
		c.write("f", strconv.Itoa(i))
		want := uint64(i + 1)
		testutil.Eventually(t, 5*time.Second, "a cut", func() bool { return p.Status().Cuts >= want })
	}
	p.bmu.Lock()
	kept := len(p.batches)
	p.bmu.Unlock()
	if kept != 0 {
		t.Fatalf("%d cuts kept for a disconnected replica beyond a 1-byte budget", kept)
	}
	c.startReplica("r1")
	c.waitSynced("r1")
	if n := fullSentTo(p, "r1"); n != 2 {
		t.Fatalf("%d full batches sent, want 2 (the initial sync and the resync)", n)
	}
}

// fullSent returns how many full batches the primary sent to node.
// TestLagBytes checks the backlog a primary reports per replica: while the
// replica is down its lag bytes and pending cuts grow with each cut, and
// they return to 0 once it has caught up.
func TestLagBytes(t *testing.T) {
	c := newTestCluster(t)
	c.write("f", "0")
	c.startReplica("r1")
	p := c.startPrimaryWith(func(cfg *PrimaryConfig) { cfg.Debounce = time.Millisecond }, 1, "r1")
	c.waitSynced("r1")
	testutil.Eventually(t, 5*time.Second, "no backlog once synced", func() bool {
		r := p.Status().Replicas[0]
		return r.LagBytes == 0 && r.PendingCuts == 0 && r.Lag == 0
	})
	c.stopReplica("r1")
	testutil.Eventually(t, 5*time.Second, "the replica is seen disconnected", func() bool {
		return !p.Status().Replicas[0].Connected
	})
	var last ReplicaState
	for i := 1; i <= 3; i++ {
		c.write(fmt.Sprintf("g%d", i), string(make([]byte, 1000)))
		testutil.Eventually(t, 5*time.Second, fmt.Sprintf("backlog of %d cuts", i), func() bool {
			r := p.Status().Replicas[0]
			if r.PendingCuts != i {
				return false
			}
			if r.LagBytes < last.LagBytes+1000 {
				t.Fatalf("%d pending cuts weigh %d bytes, %d before the last 1000-byte file", i, r.LagBytes, last.LagBytes)
			}
			last = r
			return true
		})
	}
	c.startReplica("r1")
	c.waitSynced("r1")
	testutil.Eventually(t, 5*time.Second, "no backlog after catch-up", func() bool {
		r := p.Status().Replicas[0]
		return r.Connected && r.LagBytes == 0 && r.PendingCuts == 0 && r.Lag == 0
	})
}
