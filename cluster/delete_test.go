package cluster

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/tether-io/tether/internal/testutil"
)

// TestSoftDeleteUndeletePurge runs the soft-delete life cycle through Raft
// on one node: delete keeps the volume (state deleted) and blocks reusing
// its name with advice, undelete brings it back, an explicit purge and the
// leader's purge after the retention remove it.
func TestSoftDeleteUndeletePurge(t *testing.T) {
	tn := &testNet{t: t, byRPC: map[string]*testNode{}}
	n := tn.start(nodeOpts{name: "n1", expect: 1, retention: 1500 * time.Millisecond})
	t.Cleanup(func() { tn.stop(n, false) })
	testutil.Eventually(t, 20*time.Second, "single node leads", n.c.IsLeader)
	if !n.c.CatalogCurrent() {
		t.Fatal("a fresh node's catalog should be current")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for _, name := range []string{"db", "tmp"} {
		if _, err := n.c.CreateVolume(ctx, name, 1); err != nil {
			t.Fatal(err)
		}
	}
	if err := n.c.PurgeVolume(ctx, "db"); !errors.Is(err, ErrNotDeleted) {
		t.Fatalf("purge of a live volume: %v", err)
	}
	v, err := n.c.SoftDeleteVolume(ctx, "db")
	if err != nil || !v.Deleted() || v.State != StateDeleted {
		t.Fatalf("soft delete: %+v %v", v, err)
	}
	_, err = n.c.CreateVolume(ctx, "db", 1)
	if !errors.Is(err, ErrVolumeDeleted) || !strings.Contains(err.Error(), "tether volume undelete db") {
		t.Fatalf("create over a deleted volume: %v", err)
	}
	if v, err = n.c.UndeleteVolume(ctx, "db"); err != nil || v.Deleted() {
		t.Fatalf("undelete: %+v %v", v, err)
	}
	if _, err := n.c.UndeleteVolume(ctx, "db"); !errors.Is(err, ErrNotDeleted) {
		t.Fatalf("second undelete: %v", err)
	}
	if _, err := n.c.SoftDeleteVolume(ctx, "tmp"); err != nil {
		t.Fatal(err)
	}
	if err := n.c.PurgeVolume(ctx, "tmp"); err != nil {
		t.Fatal(err)
	}
	if _, ok := n.c.Volume("tmp"); ok {
		t.Fatal("purged volume still in the catalog")
	}
	if _, err := n.c.SoftDeleteVolume(ctx, "db"); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 10*time.Second, "the leader purges db after its retention", func() bool {
		_, ok := n.c.Volume("db")
		return !ok
	})
}
