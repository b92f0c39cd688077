package replication

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tether-io/tether/internal/testutil"
)

func TestCheckWatchLimit(t *testing.T) {
	cases := map[string]struct {
		dirs, limit, used int
		ok                bool
	}{
		"fits":                        {dirs: 10, limit: 8192, used: 0, ok: true},
		"exactly fits with a barrier": {dirs: 99, limit: 100, used: 0, ok: true},
		"one too many":                {dirs: 100, limit: 100, used: 0},
		"watches in use count":        {dirs: 50, limit: 100, used: 60},
		"limit unknown":               {dirs: 1 << 30, limit: 0, ok: true},
	}
	for name, c := range cases {
		err := checkWatchLimit(c.dirs, c.limit, c.used)
		if (err == nil) != c.ok {
			t.Errorf("%s: checkWatchLimit(%d, %d, %d) = %v, want ok %v", name, c.dirs, c.limit, c.used, err, c.ok)
			continue
		}
		if err != nil {
			for _, want := range []string{fmt.Sprintf("%d directories", c.dirs), "sysctl -w fs.inotify.max_user_watches=", "/etc/sysctl.d/"} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("%s: %q does not say %q", name, err, want)
				}
			}
		}
	}
}

// TestStartFailsOverWatchLimit starts a primary on a tree of 5 directories
// with a watch limit (injected) that leaves room for 4: Start fails, says
// how to raise the limit, and watches nothing.
func TestStartFailsOverWatchLimit(t *testing.T) {
	c := newTestCluster(t)
	for _, d := range []string{"a/b", "c", "d"} {
		must(t, os.MkdirAll(c.path(d), 0o755))
	}
	cfg := PrimaryConfig{Volume: testVolume, Epoch: 1, Dial: c.dial, Logger: testutil.Logger(t),
		Paths: Paths{Data: c.primaryData, State: filepath.Join(t.TempDir(), "state")}}
	for _, limit := range []int{5, 6} {
		p, err := NewPrimary(cfg)
		must(t, err)
		p.watchLimits = func() (int, int) { return limit, 0 }
		err = p.Start(context.Background())
		if limit == 6 {
			must(t, err)
			p.Stop()
			continue
		}
		if err == nil || !strings.Contains(err.Error(), "sysctl -w fs.inotify.max_user_watches") || !strings.Contains(err.Error(), "5 directories") {
			t.Fatalf("Start with a watch limit of %d for 5 directories: %v", limit, err)
		}
		if p.w != nil {
			t.Fatal("a primary that failed to start has a watcher")
		}
	}
}

// TestWatchLimitFallsBackToRescans refuses inotify watches for directories
// created after the start (as a full watch limit would): the primary says
// so in its status and still replicates what changes in them, through
// rescans.
func TestWatchLimitFallsBackToRescans(t *testing.T) {
	c := newTestCluster(t)
	c.startReplica("r1")
	refuse := func(path string) bool { return strings.Contains(path, "unwatched") }
	p, err := NewPrimary(PrimaryConfig{Volume: testVolume, Epoch: 1, Dial: c.dial, Replicas: []string{"r1"},
		Logger: testutil.Logger(t), RescanInterval: time.Hour,
		Paths: Paths{Data: c.primaryData, State: filepath.Join(t.TempDir(), "state")}})
	must(t, err)
	p.wrapAdd = func(add func(string) error) func(string) error {
		return func(path string) error {
			if refuse(path) {
				return syscall.ENOSPC
			}
			return add(path)
		}
	}
	must(t, p.Start(context.Background()))
	t.Cleanup(p.Stop)
	c.waitSynced("r1")
	must(t, os.MkdirAll(c.path("unwatched"), 0o755))
	testutil.Eventually(t, 5*time.Second, "the status names the watch limit", func() bool {
		return strings.Contains(p.Status().WatchLimit, "max_user_watches")
	})
	c.write("unwatched/late", "found by a rescan")
	c.waitSynced("r1")
}
