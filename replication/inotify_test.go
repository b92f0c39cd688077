package replication

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// next returns the next event of n, failing after a deadline.
func nextEvent(t *testing.T, n *inotify) fsEvent {
	t.Helper()
	select {
	case ev := <-n.events:
		return ev
	case err := <-n.errs:
		t.Fatalf("inotify error: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("no inotify event")
	}
	return fsEvent{}
}

// TestInotifyNamesByDescriptor: events are named after the watch that
// reported them; a directory moved and added again under its new name
// reports under it, and a removed watch reports nothing more.
func TestInotifyNamesByDescriptor(t *testing.T) {
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	must(t, os.Mkdir(a, 0o755))
	n, err := newInotify()
	must(t, err)
	defer n.close()
	must(t, n.add(a))
	must(t, os.WriteFile(filepath.Join(a, "f"), nil, 0o644))
	if ev := nextEvent(t, n); ev.name != filepath.Join(a, "f") || !ev.has(opCreate) {
		t.Fatalf("event %+v, want the create of a/f", ev)
	}
	must(t, os.Rename(a, b))
	must(t, n.add(b)) // the same inode: its watch is renamed
	must(t, os.Remove(filepath.Join(b, "f")))
	if ev := nextEvent(t, n); ev.name != filepath.Join(b, "f") || !ev.has(opRemove) {
		t.Fatalf("event %+v, want the removal of b/f", ev)
	}
	must(t, n.remove(b))
	must(t, n.remove(b)) // twice: nothing to do
	must(t, os.WriteFile(filepath.Join(b, "g"), nil, 0o644))
	must(t, os.Mkdir(a, 0o755))
	must(t, n.add(a))
	must(t, os.WriteFile(filepath.Join(a, "h"), nil, 0o644))
	if ev := nextEvent(t, n); ev.name != filepath.Join(a, "h") {
		t.Fatalf("event %+v, want the create of a/h (b's watch was removed)", ev)
	}
	if err := n.add(filepath.Join(a, "h")); err == nil {
		t.Fatal("a watch of a regular file was accepted")
	}
}

// TestOverflowResendsWholeTree delivers an event-queue overflow, as the
// kernel reports one, while changes go unseen (their events are the ones
// lost): the primary rescans, takes a full cut, and the replica ends equal.
func TestOverflowResendsWholeTree(t *testing.T) {
	c := newTestCluster(t)
	c.startReplica("r1")
	c.write("before", "b")
	p := c.startPrimary(1, "r1")
	c.waitSynced("r1")
	full := p.fullCuts.Load()
	// Changes whose events are dropped: the watch is removed first.
	must(t, p.w.in.remove(c.primaryData))
	c.write("unseen", "its event was lost")
	must(t, os.Remove(c.path("before")))
	p.w.in.errs <- errEventOverflow
	c.waitSynced("r1")
	if p.fullCuts.Load() <= full {
		t.Fatal("an overflow did not make the next cut full")
	}
	c.write("after", "the root is watched again") // the overflow re-added every watch
	c.waitSynced("r1")
}
