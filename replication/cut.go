package replication

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"
)

// Freezer pauses every writer of a volume (for instance its containers,
// through the cgroup freezer) so that the primary can take a consistent cut
// of a volume that never goes quiet. Freeze returns once the writers are
// paused (the Freezer bounds its own pausing; ctx only cancels it) and, if
// it fails, leaves none paused; thaw resumes them and must be called
// exactly once.
type Freezer interface {
	Freeze(ctx context.Context) (thaw func(), err error)
}

// barrierTimeout bounds the wait for a barrier's own event.
const barrierTimeout = 10 * time.Second

// cutLoop takes cuts while the primary runs: after changes arrive it waits
// for the debounce, for room (no connected replica too far behind), then
// takes one cut and publishes it to every sender.
func (p *Primary) cutLoop(ctx context.Context) {
	var last time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-p.ch.wake:
		}
		if ok, _ := p.ch.pending(); !ok {
			continue
		}
		if !sleepCtx(ctx, p.cfg.Debounce) || !p.waitRoom(ctx) {
			return
		}
		if d := paceDelay(p.fullSyncing(), p.retainedCuts(), last, time.Now()); d > 0 && !sleepCtx(ctx, d) {
			return
		}
		last = time.Now()
		b, err := p.takeCut(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			// The changes taken are lost to this cut: send the whole tree.
			err = cutError(err, filepath.Join(p.cfg.Paths.State, spoolDir))
			msg := err.Error()
			p.cutErr.Store(&msg)
			p.log.Error("taking a cut of the volume failed; retrying with the whole tree", "err", err)
			p.cuttingFull.Store(false)
			p.ch.requireFull()
			if !sleepCtx(ctx, retryMax) {
				return
			}
			continue
		}
		p.cutErr.Store(nil)
		p.publish(b)
		p.cuttingFull.Store(false)
		p.acked() // trims what no replica needs
	}
}

// Pacing: while a connected replica is sent the whole tree, every cut taken
// meanwhile is kept for it (a batch whose streamed files changed is
// continued over them), so a long full sync of a busy volume would pile up
// a cut every few milliseconds. Past pacedAfter kept cuts, cuts are taken
// at most every pacedInterval until it is done: replicas that follow see
// up to that much more lag meanwhile, in bigger cuts.
const (
	pacedAfter    = 256
	pacedInterval = time.Second
)

// paceDelay is how long the cutter waits before its next cut, the last
// taken at last (a pure function of the sender's and retention's state).
func paceDelay(fullSyncing bool, kept int, last, now time.Time) time.Duration {
	if !fullSyncing || kept <= pacedAfter || last.IsZero() {
		return 0
	}
	return max(0, last.Add(pacedInterval).Sub(now))
}

// cutError words a failed cut for the operator: running out of space in
// the spool says what the spool needs.
func cutError(err error, spool string) error {
	if errors.Is(err, syscall.ENOSPC) {
		return fmt.Errorf("%w: a cut is read into %s before it is sent; a full cut needs as much free space there as the volume's files under 16 MiB hold (the whole volume when a full cut's stream could not be continued): free space on that file system", err, spool)
	}
	return err
}

// sleepCtx waits d or until ctx ends; it reports whether ctx is still live.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// takeCut reads the pending changes into a spool until the reading is
// consistent (see DESIGN.md, "Consistent cuts"): after each round a barrier
// tells whether any event of the volume arrived since the round took its
// changes; if one did, the paths of the new events are read again. After
// MaxRounds, the Freezer (if any) pauses the writers for one last round;
// failing that, the batch is marked file-consistent only.
func (p *Primary) takeCut(ctx context.Context) (*cutBatch, error) {
	p.cutMu.Lock()
	defer p.cutMu.Unlock()
	sp, err := newSpool(filepath.Join(p.cfg.Paths.State, spoolDir))
	if err != nil {
		return nil, err
	}
	sp.enc = p.enc
	sp.streamMin = p.streamMin
	sp.onChunk = p.onSpoolChunk
	c := &cutRound{p: p, sp: sp}
	b, err := c.run(ctx)
	if err == nil {
		// The next cut's deltas build on this one.
		var u *indexUpdate
		if u, err = sp.indexUpdate(c.pl, c.full); err == nil {
			err = p.idx.apply(u)
		}
	}
	if err != nil {
		sp.close()
		return nil, err
	}
	if c.full && !sp.stream {
		p.noStream.Store(false) // this full cut was spooled; the next may stream
	}
	return b, nil
}

// cutRound is the state of one cut being taken.
type cutRound struct {
	p     *Primary
	sp    *spool
	pl    *plan
	full  bool
	lost  bool            // events were lost: no delta view of a full cut
	dirty map[string]bool // every dirty path taken by this cut
	since time.Time
	gen   uint64 // event count when the last changes were taken
}

// take takes the pending changes into the plan.
func (c *cutRound) take() error {
	t := c.p.ch.take()
	c.gen = t.gen
	c.since = oldest(c.since, t.dirty.since)
	c.p.cuttingSince(c.since)
	c.lost = c.lost || t.lost
	if c.dirty == nil {
		c.dirty = map[string]bool{}
	}
	for rel, sub := range t.dirty.paths {
		c.dirty[rel] = c.dirty[rel] || sub
	}
	var err error
	switch {
	case t.full:
		c.full = true
		c.p.cuttingFull.Store(true)
		c.pl, err = fullPlan(c.p.root)
	case c.pl == nil:
		c.pl, err = dirtyPlan(c.p.root, t.dirty.paths, c.p.idx)
	default:
		err = c.pl.update(c.p.root, t.dirty.paths)
	}
	// A full cut streams its large files unless a stream of one just broke
	// (the volume keeps changing: read them into the spool instead).
	if c.sp != nil {
		c.sp.stream = c.full && !c.p.noStream.Load()
	}
	return err
}

func (c *cutRound) run(ctx context.Context) (*cutBatch, error) {
	p := c.p
	if err := c.take(); err != nil {
		return nil, err
	}
	consistent := false
	var at time.Time
	for round := 1; ; round++ {
		if err := c.sp.read(p.root, c.pl, p.warn); err != nil {
			return nil, err
		}
		if p.afterRound != nil {
			p.afterRound(c.full)
		}
		gen, t, err := p.barrier(ctx)
		if err != nil {
			return nil, err
		}
		if gen == c.gen && len(c.sp.torn) == 0 {
			consistent, at = true, t
			break
		}
		if round >= p.cfg.MaxRounds {
			break
		}
		if err := c.take(); err != nil {
			return nil, err
		}
		if _, err := c.rereadTorn(0); err != nil {
			return nil, err
		}
	}
	if !consistent {
		var err error
		consistent, at, err = c.frozen(ctx)
		if err != nil {
			return nil, err
		}
	}
	// A file-consistent cut still holds every file whole where it can: the
	// small files that came up short or changed while read are read again;
	// what stays torn is left out of an incremental cut (the replica keeps
	// its previous version, the next cut reads it again) for at most
	// maxExclusions cuts in a row, then ships as read, as in a full cut.
	for try := 0; !consistent && try < tornRetries; try++ {
		if picked, err := c.rereadTorn(tornRetryMax); err != nil || !picked {
			if err != nil {
				return nil, err
			}
			break
		}
		if err := c.sp.read(p.root, c.pl, p.warn); err != nil {
			return nil, err
		}
	}
	excluded := 0
	if len(c.sp.torn) > 0 && !c.full {
		excluded = c.sp.exclude(p.ch, p.excludedRuns)
	} else {
		clear(p.excludedRuns)
	}
	if n := len(c.sp.torn); n > 0 {
		p.log.Warn("files kept changing while the cut read them: this file-consistent batch holds them as last read, not whole; the next cut sends them again (a freeze hook makes such cuts consistent)",
			"files", n)
	}
	// A full cut streams its large files even when it did not converge: its
	// senders' barrier after the stream always finds events then (those the
	// cut left), so the batch is continued up to a cut taken after the
	// stream, and is as consistent as that cut (DESIGN.md, "Streamed files").
	if !consistent {
		at = time.Now()
		p.fileOnlyCuts.Add(1)
		hint := "configure a freeze hook (volume option freeze) for volumes that never go quiet"
		if p.cfg.Freezer != nil {
			hint = "the freeze hook could not make it consistent (see the warning above)"
		}
		p.log.Warn("the volume kept changing while a cut was read: this batch is file-consistent only (each file intact, not one instant); "+hint,
			"rounds", p.cfg.MaxRounds)
	}
	for _, rel := range c.pl.skipped {
		p.warn.warn("skip:"+rel, "not replicating a device or socket", "path", rel)
	}
	p.cuts.Add(1)
	b := &cutBatch{seq: p.nextSeq(), full: c.full, cut: at, fileOnly: !consistent, since: c.since,
		sp: c.sp, items: c.sp.items(c.pl), gen: c.gen, excluded: excluded}
	b.bytes, b.spooled = itemBytes(b.items), spooledBytes(b.items)
	if c.full {
		p.fullCuts.Add(1)
		if offersDelta(c.lost, consistent) {
			// Replicas that follow get only what changed since the last cut.
			b.delta = c.sp.items(deltaOf(c.pl, c.dirty, c.sp.carried))
			b.deltaBytes = itemBytes(b.delta)
		}
	}
	return b, nil
}

// Torn readings in a cut that did not converge: files up to tornRetryMax
// are read again up to tornRetries times (a large file written all the
// time would be torn again, at a high cost), and a file is left out of at
// most maxExclusions incremental cuts in a row (so that a file that never
// reads whole still reaches the replicas).
const (
	tornRetries   = 3
	tornRetryMax  = 16 << 20
	maxExclusions = 2
)

// rereadTorn plans again the files whose last reading was torn, those of
// at most limit bytes when limit > 0; it reports whether it picked any.
func (c *cutRound) rereadTorn(limit int64) (bool, error) {
	pick := map[string]bool{}
	for rel := range c.sp.torn {
		if fi, ok := c.pl.others[rel]; !ok || limit <= 0 || fi.Size() <= limit {
			pick[rel] = false
		}
	}
	if len(pick) == 0 {
		return false, nil
	}
	if err := c.pl.update(c.p.root, pick); err != nil {
		return false, err
	}
	for rel := range pick {
		if _, again := c.pl.fresh[rel]; !again {
			delete(c.sp.torn, rel) // gone (or no longer a file): not read again, its reading not carried
		}
	}
	return true, nil
}

// offersDelta reports whether a full cut gives the replicas at the previous
// cut only what changed since (its delta view). Not when events were lost
// (the dirty paths are incomplete), nor when the cut is file-consistent
// only: it left events for the next cut, and the entries they name may
// differ from what the full cut read, which the index (rewritten by the
// full cut) then records; such replicas take the full cut whole.
func offersDelta(lost, consistent bool) bool { return !lost && consistent }

// deltaOf is the part of a full plan that a replica at the previous cut
// needs: the dirty paths (with the subtrees of those sent whole), DELETEs
// for dirty paths the tree no longer has, and every name of a hard-linked
// file among them, with their directories (whose mtimes they change). An
// entry the full cut planned but does not carry (carried is false: gone
// or replaced before it was read) is deleted too: the index forgets it
// with the full cut, so the replica must not keep its old version.
func deltaOf(full *plan, dirty map[string]bool, carried func(rel string) bool) *plan {
	d := newPlan()
	for rel, sub := range dirty {
		if fi, ok := full.dirs[rel]; ok {
			d.dirs[rel] = fi
			if sub && rel != rootPath {
				d.del(rel)
				for _, m := range []struct{ from, to map[string]fs.FileInfo }{{full.dirs, d.dirs}, {full.others, d.others}} {
					for r, fi := range m.from {
						if isUnder(r, rel) {
							m.to[r] = fi
						}
					}
				}
			}
			continue
		}
		if fi, ok := full.others[rel]; ok {
			d.others[rel] = fi
			continue
		}
		if rel != rootPath {
			d.del(rel)
		}
	}
	linked := map[inodeKey]bool{}
	for _, fi := range d.others {
		if k, n := inodeOf(fi); fi.Mode().IsRegular() && n > 1 {
			linked[k] = true
		}
	}
	for r, fi := range full.others {
		if k, _ := inodeOf(fi); fi.Mode().IsRegular() && linked[k] {
			d.others[r] = fi
		}
	}
	for _, m := range []map[string]fs.FileInfo{d.dirs, d.others} {
		for rel := range m {
			if rel != rootPath && !carried(rel) {
				delete(m, rel)
				d.del(rel)
			}
		}
	}
	for _, m := range []map[string]fs.FileInfo{d.others, d.dirs} {
		for rel := range m {
			if rel == rootPath {
				continue
			}
			if fi, ok := full.dirs[parentOf(rel)]; ok {
				d.dirs[parentOf(rel)] = fi
			}
		}
	}
	return d
}

// frozen runs one more round with the volume's writers paused. MaxFreeze
// bounds how long they stay paused: a watchdog thaws them then, even in the
// middle of the round. That costs no safety, since the round's second
// barrier still decides whether the read was consistent (writes resumed
// early show up as events). It reports false when there is no Freezer or it
// failed.
func (c *cutRound) frozen(ctx context.Context) (bool, time.Time, error) {
	p := c.p
	if p.cfg.Freezer == nil {
		return false, time.Time{}, nil
	}
	start := time.Now()
	thaw, err := p.cfg.Freezer.Freeze(ctx)
	if err != nil {
		p.log.Warn("freezing the volume's writers failed", "err", err)
		return false, time.Time{}, nil
	}
	frozenAt := time.Now()
	var once sync.Once
	release := func() { once.Do(thaw) }
	watchdog := time.AfterFunc(p.cfg.MaxFreeze, release)
	ok, at, err := c.frozenRound(ctx)
	cutShort := !watchdog.Stop()
	release()
	p.log.Debug("froze the volume's writers for a cut", "pausing", frozenAt.Sub(start), "frozen", time.Since(frozenAt), "thawed_by_bound", cutShort, "consistent", ok)
	if cutShort && !ok {
		p.log.Warn("the writers were thawed at the freeze bound before the cut was read, and wrote meanwhile", "max_freeze", p.cfg.MaxFreeze)
	}
	if ctx.Err() != nil {
		return false, time.Time{}, ctx.Err()
	}
	if err != nil {
		return false, time.Time{}, err
	}
	return ok, at, nil
}

// frozenRound drains the events of writes done before the freeze, takes
// them, reads them and checks with a second barrier.
func (c *cutRound) frozenRound(ctx context.Context) (bool, time.Time, error) {
	if _, _, err := c.p.barrier(ctx); err != nil {
		return false, time.Time{}, err
	}
	if err := c.take(); err != nil {
		return false, time.Time{}, err
	}
	if _, err := c.rereadTorn(0); err != nil {
		return false, time.Time{}, err
	}
	if err := c.sp.read(c.p.root, c.pl, c.p.warn); err != nil {
		return false, time.Time{}, err
	}
	gen, at, err := c.p.barrier(ctx)
	if err != nil {
		return false, time.Time{}, err
	}
	return gen == c.gen && len(c.sp.torn) == 0, at, nil
}

// barrier creates a fresh sentinel in the barrier directory (watched by the
// volume's inotify instance) and waits for its create event. It returns the
// volume's event count at that event and when the sentinel was created:
// every write that completed before then has had its event counted.
func (p *Primary) barrier(ctx context.Context) (uint64, time.Time, error) {
	name := "b-" + strconv.FormatUint(p.barrierN.Add(1), 10)
	ch := p.ch.expect(name)
	path := filepath.Join(p.barrierDir, name)
	at := time.Now()
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		p.ch.forget(name)
		return 0, at, fmt.Errorf("create cut barrier: %w", err)
	}
	_ = f.Close()
	defer os.Remove(path)
	t := time.NewTimer(barrierTimeout)
	defer t.Stop()
	select {
	case gen := <-ch:
		return gen, at, nil
	case <-ctx.Done():
		p.ch.forget(name)
		return 0, at, ctx.Err()
	case <-t.C:
		p.ch.forget(name)
		return 0, at, fmt.Errorf("the event of cut barrier %s did not arrive within %s", path, barrierTimeout)
	}
}
