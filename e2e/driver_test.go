package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tether-io/tether/internal/testutil"
	"github.com/tether-io/tether/proto/tetherpb"
)

// e2eDriverName is the Docker volume driver name the driver test serves.
// dockerd caches every legacy plugin it has activated for the rest of its
// life and keeps calling it (each call to a vanished one retries for about
// 15 s), so every run reuses this one name — the one the first probe of this
// engine used — instead of adding a dead driver per run. See e2e/README.md.
const e2eDriverName = "tether-probe"

// lockDriverName serialises driver tests of concurrent `make e2e` runs on
// this engine, since they share the driver name.
func lockDriverName(t *testing.T) {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(os.TempDir(), "tether-e2e-driver.lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
}

// pluginDirFor takes the driver name for this test (see lockDriverName)
// and makes its plugin directory, removed at the end.
func pluginDirFor(t *testing.T) string {
	t.Helper()
	lockDriverName(t)
	dir := filepath.Join("/run/docker/plugins", e2eDriverName)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatalf("creating the plugin directory (needs root): %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// driverOn makes host name serve the driver: the plugin directory
// /run/docker/plugins/NAME/ bind-mounted (dockerd finds NAME/NAME.sock
// there) and the data dir mounted at its own host path, because dockerd
// bind-mounts the Mountpoint a legacy driver returns as a host path.
func driverOn(name, pluginDir string) hostOption {
	return func(h *host) ([]string, []string) {
		if h.name != name {
			return nil, nil
		}
		h.inDir = h.dataDir
		return []string{"-v", pluginDir + ":" + pluginDir, "-v", "/var/run/docker.sock:/var/run/docker.sock"},
			[]string{"--driver-socket", filepath.Join(pluginDir, e2eDriverName+".sock")}
	}
}

// TestDockerVolumeDriver runs the volume driver against the real engine:
// create with options (bad ones refused), a container writing through it,
// the data on the replicas, tether's status in docker volume inspect,
// refcounts across two containers, docker volume rm and tether volume
// undelete.
func TestDockerVolumeDriver(t *testing.T) {
	requireE2E(t)
	pluginDir := pluginDirFor(t)
	tp := startTopo(t, 3, driverOn("h1", pluginDir))
	image := buildImage(t)
	h1 := tp.host("h1")
	vol := tp.prefix + "-v"
	// Registered after the topology's cleanup, so it runs first, while
	// the driver still answers (removing a volume of a vanished driver
	// would hang on dockerd's retries).
	shadowed := tp.prefix + "-shadowed"
	t.Cleanup(func() {
		docker(t, "rm", "-f", tp.prefix+"-c1", tp.prefix+"-c2")
		docker(t, "volume", "rm", "-f", vol, shadowed)
	})
	testutil.EventuallyErr(t, 20*time.Second, func() error {
		_, err := os.Stat(filepath.Join(pluginDir, e2eDriverName+".sock"))
		return err
	})

	for opt, want := range map[string]string{
		"replicas=bogus": `option replicas="bogus": want a whole number from 1 to 7`,
		"size=1G":        `unknown option "size" for a tether volume (known options: replicas, max-lag, placement, freeze)`,
	} {
		_, err := docker(t, "volume", "create", "-d", e2eDriverName, "-o", opt, vol)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Fatalf("docker volume create -o %s: %v; want %q", opt, err, want)
		}
	}
	mustDocker(t, "volume", "create", "-d", e2eDriverName, "-o", "replicas=3", vol)
	bb := []string{"run", "--rm", "--entrypoint", "/bin/busybox", "-v", vol + ":/data", image}
	mustDocker(t, append(bb, "sh", "-c", "echo hi > /data/x")...)
	for _, r := range []string{"h1", "h2", "h3"} {
		testutil.EventuallyErr(t, 30*time.Second, func() error {
			b, err := os.ReadFile(filepath.Join(tp.host(r).volumeDir(vol), "x"))
			if err != nil || string(b) != "hi\n" {
				return fmt.Errorf("x on %s: %q %v", r, b, err)
			}
			return nil
		})
	}
	testutil.EventuallyErr(t, 10*time.Second, func() error { return checkInspect(t, vol) })

	// Two containers hold two mounts; tether refuses to delete the volume
	// while they do, and the count drops back to zero when they stop.
	for _, c := range []string{"-c1", "-c2"} {
		mustDocker(t, "run", "-d", "--name", tp.prefix+c, "--entrypoint", "/bin/busybox", "-v", vol+":/data", image, "sleep", "600")
	}
	if err := tp.ctl(h1, &tetherpb.Volume{}, "volume", "rm", vol); err == nil || !strings.Contains(err.Error(), "mounted 2 time(s)") {
		t.Fatalf("tether volume rm with two containers running: %v", err)
	}
	mustDocker(t, "rm", "-f", tp.prefix+"-c1", tp.prefix+"-c2")
	b, err := os.ReadFile(filepath.Join(h1.dataDir, "driver.json"))
	if err != nil || strings.Contains(string(b), vol) {
		t.Fatalf("mount table after the containers stopped: %s %v", b, err)
	}

	// docker volume rm is a soft delete; tether volume undelete brings the
	// volume and its data back.
	mustDocker(t, "volume", "rm", vol)
	if _, err := docker(t, "volume", "inspect", vol); err == nil || !strings.Contains(strings.ToLower(err.Error()), "no such volume") {
		t.Fatalf("docker volume inspect after rm: %v", err)
	}
	vi, err := tp.inspect(h1, vol)
	if err != nil || vi.Volume.State != "deleted" {
		t.Fatalf("tether volume inspect after docker volume rm: %v %v", vi, err)
	}
	if _, err := docker(t, "volume", "create", "-d", e2eDriverName, vol); err == nil || !strings.Contains(err.Error(), "tether volume undelete "+vol) {
		t.Fatalf("docker volume create over a deleted volume: %v", err)
	}
	if err := tp.ctl(h1, &tetherpb.Volume{}, "volume", "undelete", vol); err != nil {
		t.Fatal(err)
	}
	if out := mustDocker(t, append(bb, "cat", "/data/x")...); out != "hi" {
		t.Fatalf("after undelete /data/x = %q", out)
	}
	if out := mustDocker(t, "volume", "inspect", "--format", "{{.Driver}}", vol); out != e2eDriverName {
		t.Fatalf("undeleted volume's driver: %q", out)
	}
	checkDoctor(t, tp, h1, shadowed)
}

// checkDoctor makes a local Docker volume with the name of a tether volume
// (what dockerd does silently when the driver is unreachable) and expects
// tether doctor, run in h1 with the Docker socket, to report it.
func checkDoctor(t *testing.T, tp *topo, h1 *host, shadowed string) {
	doctor := []string{"exec", h1.container, "/bin/tether", "--data-dir", h1.inDir, "--json", "doctor", "--driver", e2eDriverName}
	out, err := docker(t, doctor...)
	if err != nil || !strings.Contains(out, `"shadows": []`) {
		t.Fatalf("tether doctor with no shadow: %s %v", out, err)
	}
	if err := tp.ctl(h1, &tetherpb.Volume{}, "volume", "create", shadowed, "--replicas", "1"); err != nil {
		t.Fatal(err)
	}
	mustDocker(t, "volume", "create", "-d", "local", shadowed)
	out, err = docker(t, doctor...)
	var rep struct {
		Shadows []struct{ Name, Driver string }
	}
	if jerr := json.Unmarshal([]byte(out), &rep); err == nil || jerr != nil || len(rep.Shadows) != 1 || rep.Shadows[0].Name != shadowed || rep.Shadows[0].Driver != "local" {
		t.Fatalf("tether doctor with a shadow volume: %s %v %v", out, err, jerr)
	}
}

// checkInspect checks that docker volume inspect shows tether's status.
func checkInspect(t *testing.T, vol string) error {
	out, err := docker(t, "volume", "inspect", vol)
	if err != nil {
		return err
	}
	var vs []struct {
		Driver, Mountpoint, Scope string
		Status                    map[string]any
	}
	if err := json.Unmarshal([]byte(out), &vs); err != nil || len(vs) != 1 {
		return fmt.Errorf("decoding docker volume inspect %q: %v", out, err)
	}
	v := vs[0]
	lag, _ := v.Status["lag"].(map[string]any)
	if v.Driver != e2eDriverName || v.Scope != "global" || v.Status["primary"] != "h1" || v.Status["epoch"] != float64(1) ||
		v.Status["copies"] != float64(3) || v.Status["state"] != "healthy" || len(lag) != 2 {
		return fmt.Errorf("docker volume inspect: %s", out)
	}
	t.Logf("docker volume inspect: Mountpoint %s Status %v", v.Mountpoint, v.Status)
	return nil
}

// TestDockerSelfFencing isolates the host serving a volume that a running
// container uses: once its primary lease lapses the agent fences the
// volume and stops the container through the Docker API, while the
// majority promotes a replica.
func TestDockerSelfFencing(t *testing.T) {
	requireE2E(t)
	pluginDir := pluginDirFor(t)
	tp := startTopo(t, 3, driverOn("h1", pluginDir))
	image := buildImage(t)
	h1 := tp.host("h1")
	vol, ctr := tp.prefix+"-v", tp.prefix+"-app"
	isolated := false
	t.Cleanup(func() {
		docker(t, "rm", "-f", ctr)
		if isolated {
			tp.reconnect(h1) // the driver needs a quorum to delete the volume
		}
		docker(t, "volume", "rm", "-f", vol)
	})
	testutil.EventuallyErr(t, 20*time.Second, func() error {
		_, err := os.Stat(filepath.Join(pluginDir, e2eDriverName+".sock"))
		return err
	})
	mustDocker(t, "volume", "create", "-d", e2eDriverName, "-o", "replicas=3", vol)
	mustDocker(t, "run", "-d", "--name", ctr, "--entrypoint", "/bin/busybox", "-v", vol+":/data", image,
		"sh", "-c", "while true; do date >> /data/log; sleep 0.2; done")
	testutil.EventuallyErr(t, 30*time.Second, func() error {
		if _, err := os.Stat(filepath.Join(tp.host("h2").volumeDir(vol), "log")); err != nil {
			return fmt.Errorf("the container's writes have not reached h2: %w", err)
		}
		return nil
	})
	tp.disconnect(h1)
	isolated = true
	cut := time.Now()
	testutil.EventuallyErr(t, 60*time.Second, func() error {
		out, err := docker(t, "inspect", "--format", "{{.State.Running}}", ctr)
		if err != nil || out != "false" {
			return fmt.Errorf("container still running after h1 was isolated: %q %v", out, err)
		}
		return nil
	})
	t.Logf("container stopped %s after its host was isolated", time.Since(cut).Round(time.Millisecond))
	testutil.EventuallyErr(t, 60*time.Second, func() error {
		vi, err := tp.inspect(tp.host("h2"), vol)
		if err != nil {
			return err
		}
		if vi.Volume.Primary == "h1" || vi.Volume.Epoch < 2 {
			return fmt.Errorf("not failed over yet: primary %s epoch %d", vi.Volume.Primary, vi.Volume.Epoch)
		}
		return nil
	})
}
