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
	full      bool
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

// take returns and clears the pending changes, with the event count.
func (c *changes) take() (d dirtySet, full bool, gen uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	d, full = c.dirty.take(), c.full
	if full {
		d.note(c.fullSince)
	}
	c.full, c.fullSince = false, time.Time{}
	return d, full, c.gen
}

// pending reports whether a cut has work, and the oldest change waiting.
func (c *changes) pending() (bool, time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	since := c.dirty.since
	if c.full {
		since = oldest(since, c.fullSince)
	}
	return c.full || !c.dirty.empty(), since
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
