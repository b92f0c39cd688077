package e2e

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/tether-io/tether/agent"
	"github.com/tether-io/tether/internal/testutil"
)

// twoContainers starts two containers, each on its own local volume, and
// returns the first volume and both containers' names; all go at the end.
func twoContainers(t *testing.T, kind string) (volA, ca, cb string) {
	t.Helper()
	image := buildImage(t)
	prefix := fmt.Sprintf("tether-e2e-%s-%d", kind, time.Now().UnixNano()%1e9)
	volA, volB := prefix+"-a", prefix+"-b"
	ca, cb = prefix+"-ca", prefix+"-cb"
	t.Cleanup(func() {
		docker(t, "rm", "-f", ca, cb)
		docker(t, "volume", "rm", "-f", volA, volB)
	})
	for c, v := range map[string]string{ca: volA, cb: volB} {
		// Created with an explicit driver first: `docker run -v NEW:/x`
		// would ask every legacy driver dockerd ever saw (see README.md).
		mustDocker(t, "volume", "create", "-d", "local", v)
		mustDocker(t, "run", "-d", "--name", c, "--entrypoint", "/bin/busybox", "-v", v+":/data", image, "sleep", "600")
	}
	return volA, ca, cb
}

// TestFenceStopsContainersUsingVolume runs the fencer against the real
// engine: of two containers it stops exactly the one that mounts the
// fenced volume of the fencer's driver (busybox sleep as PID 1 ignores
// SIGTERM, so the engine kills it after the stop timeout). The local
// driver stands in for tether's: the fencer only sees driver names.
func TestFenceStopsContainersUsingVolume(t *testing.T) {
	requireE2E(t)
	volA, ca, cb := twoContainers(t, "fence")
	f, err := agent.NewFencer(agent.FencerConfig{Driver: "local", StopTimeout: time.Second, Logger: testutil.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	stopped, err := f.StopContainersUsing(ctx, volA)
	if err != nil || !slices.Equal(stopped, []string{ca}) {
		t.Fatalf("StopContainersUsing(%s) = %v, %v; want [%s]", volA, stopped, err, ca)
	}
	if out := mustDocker(t, "inspect", "--format", "{{.State.Running}}", ca); out != "false" {
		t.Fatalf("%s still running: %s", ca, out)
	}
	if out := mustDocker(t, "inspect", "--format", "{{.State.Running}}", cb); out != "true" {
		t.Fatalf("%s (other volume) was stopped: %s", cb, out)
	}
	if stopped, err := f.StopContainersUsing(ctx, volA); err != nil || len(stopped) != 0 {
		t.Fatalf("second fence: %v %v", stopped, err)
	}
}

// TestFreezePausesContainersUsingVolume: the freeze hook pauses exactly the
// containers using the volume (cgroup freezer through the Engine) and thaw
// resumes them.
func TestFreezePausesContainersUsingVolume(t *testing.T) {
	requireE2E(t)
	volA, ca, cb := twoContainers(t, "freeze")
	f, err := agent.NewFencer(agent.FencerConfig{Driver: "local", Logger: testutil.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	thaw, err := agent.NewContainerFreezer(f, volA).Freeze(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if out := mustDocker(t, "inspect", "--format", "{{.State.Paused}}", ca); out != "true" {
		thaw()
		t.Fatalf("%s not paused by the freeze: %s", ca, out)
	}
	if out := mustDocker(t, "inspect", "--format", "{{.State.Paused}}", cb); out != "false" {
		thaw()
		t.Fatalf("%s (other volume) paused: %s", cb, out)
	}
	thaw()
	if out := mustDocker(t, "inspect", "--format", "{{.State.Paused}} {{.State.Running}}", ca); out != "false true" {
		t.Fatalf("%s after thaw: %s", ca, out)
	}
}

// TestFreezeCutShortLeavesNothingPaused: a freeze whose pause calls are cut
// short (its context ends while the Engine is still pausing) must leave no
// container paused, whatever point the Engine had reached: a pause that
// times out may still take effect, and a database frozen forever is the
// worst outcome of a freeze hook. Deadlines from 1 ms to 300 ms sweep the
// window of the pause call.
func TestFreezeCutShortLeavesNothingPaused(t *testing.T) {
	requireE2E(t)
	volA, ca, _ := twoContainers(t, "freezecut")
	f, err := agent.NewFencer(agent.FencerConfig{Driver: "local", Logger: testutil.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var failed, succeeded int
	for _, d := range []time.Duration{1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300} {
		ctx, cancel := context.WithTimeout(context.Background(), d*time.Millisecond)
		thaw, err := agent.NewContainerFreezer(f, volA).Freeze(ctx)
		cancel()
		if err == nil {
			succeeded++
			thaw()
		} else {
			failed++
		}
		// The Engine may finish a pause it was asked for after the call
		// returned; it must be undone by then.
		testutil.EventuallyErr(t, 10*time.Second, func() error {
			if out := mustDocker(t, "inspect", "--format", "{{.State.Paused}} {{.State.Running}}", ca); out != "false true" {
				return fmt.Errorf("after a freeze cut short at %s (err %v), %s is paused/running: %s", d*time.Millisecond, err, ca, out)
			}
			return nil
		})
	}
	t.Logf("%d freezes cut short, %d completed and thawed", failed, succeeded)
}
