package replication

import (
	"sync"
	"time"
)

// changes is what the watcher tells the cutter: the dirty paths since the
// last cut, a count of the volume's events (the cut's consistency check
// compares it before and after a barrier), whether the whole tree must be
// sent, and the barriers awaiting their sentinel's event.
type changes struct {
	mu        sync.Mutex
	dirty     dirtySet
	gen       uint64 // events (and rescan findings) seen for the volume
	full      bool   // events were lost: every replica needs the whole tree
	forRep    bool   // a replica needs the whole tree; the others can take a delta
	fullSince time.Time
	barriers  map[string]chan uint64
	wake      chan struct{}
}

func newChanges() *changes {
	return &changes{barriers: map[string]chan uint64{}, wake: make(chan struct{}, 1)}
}

func (c *changes) poke() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// add records a change of rel seen at t.
func (c *changes) add(rel string, subtree bool, t time.Time) {
	c.mu.Lock()
	c.dirty.add(rel, subtree, t)
	c.gen++
	c.mu.Unlock()
	c.poke()
}

// requireFull makes the next cut carry the whole tree.
func (c *changes) requireFull() {
	c.mu.Lock()
	if !c.full {
		c.full, c.fullSince = true, time.Now()
	}
	c.gen++
	c.mu.Unlock()
	c.poke()
}

// requireFullForReplica makes the next cut carry the whole tree for a
// replica whose position is unknown; replicas that follow can still be sent
// only what changed.
func (c *changes) requireFullForReplica() {
	c.mu.Lock()
	if !c.full && !c.forRep {
		c.fullSince = time.Now()
	}
	c.forRep = true
	c.mu.Unlock()
	c.poke()
}

// taken is what a cut takes from the watcher.
type taken struct {
	dirty dirtySet
	full  bool // the cut must carry the whole tree
	// lost is set when events were lost: even replicas that follow need the
	// whole tree (a delta from the dirty paths could miss changes).
	lost bool
	gen  uint64 // event count at the take
}

// take returns and clears the pending changes, with the event count.
func (c *changes) take() taken {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := taken{dirty: c.dirty.take(), full: c.full || c.forRep, lost: c.full, gen: c.gen}
	if t.full {
		t.dirty.note(c.fullSince)
	}
	c.full, c.forRep, c.fullSince = false, false, time.Time{}
	return t
}

// pending reports whether a cut has work, and the oldest change waiting.
func (c *changes) pending() (bool, time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	since := c.dirty.since
	if c.full || c.forRep {
		since = oldest(since, c.fullSince)
	}
	return c.full || c.forRep || !c.dirty.empty(), since
}

// expect registers a barrier sentinel name; its channel receives the event
// count when the watcher sees the sentinel created.
func (c *changes) expect(name string) chan uint64 {
	ch := make(chan uint64, 1)
	c.mu.Lock()
	c.barriers[name] = ch
	c.mu.Unlock()
	return ch
}

// forget drops a barrier that is no longer awaited.
func (c *changes) forget(name string) {
	c.mu.Lock()
	delete(c.barriers, name)
	c.mu.Unlock()
}

// barrierSeen is called by the watcher for a sentinel's create event.
func (c *changes) barrierSeen(name string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if ch, ok := c.barriers[name]; ok {
		delete(c.barriers, name)
		ch <- c.gen
	}
}
