package e2e

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tether-io/tether/internal/testutil"
	"github.com/tether-io/tether/proto/tetherpb"
)

// e2eDriverName2 is the second driver name, served by the host that takes
// over in TestRecreateContainerAfterFailover: every agent of the topology
// shares the one outer engine, so each needs its own name. Like
// e2eDriverName it is fixed (dockerd never forgets a driver it activated)
// and guarded by the same lock.
const e2eDriverName2 = "tether-probe-2"

// driverAs makes host name serve driver, with its plugin directory
// pluginDir (see driverOn).
func driverAs(name, pluginDir, driver string) hostOption {
	return func(h *host) ([]string, []string) {
		if h.name != name {
			return nil, nil
		}
		h.inDir = h.dataDir
		return []string{"-v", pluginDir + ":" + pluginDir, "-v", "/var/run/docker.sock:/var/run/docker.sock"},
			[]string{"--driver-socket", filepath.Join(pluginDir, driver+".sock")}
	}
}

// labelOn gives the named hosts a node label.
func labelOn(label string, names ...string) hostOption {
	return func(h *host) ([]string, []string) {
		for _, n := range names {
			if h.name == n {
				return nil, []string{"--label", label}
			}
		}
		return nil, nil
	}
}

// forgetVolume makes the shared engine drop its record of vol under the
// dead driver at sock: dockerd asks the driver before it removes even with
// -f, and a dead socket makes it refuse (after 15 s of retries). A stub
// that answers Activate, Get and Remove as an empty driver stands in for
// the dead host's engine, which in a real cluster is simply gone.
func forgetVolume(t *testing.T, sock, vol string) {
	t.Helper()
	os.Remove(sock)
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/Plugin.Activate":
			fmt.Fprint(w, `{"Implements": ["VolumeDriver"]}`)
		case "/VolumeDriver.Get":
			fmt.Fprintf(w, `{"Volume": {"Name": %q, "Mountpoint": "/nonexistent"}}`, vol)
		case "/VolumeDriver.Capabilities":
			fmt.Fprint(w, `{"Capabilities": {"Scope": "global"}}`)
		default:
			fmt.Fprint(w, `{}`)
		}
	})}
	go srv.Serve(ln)
	defer func() { srv.Close(); os.Remove(sock) }()
	mustDocker(t, "volume", "rm", "-f", vol)
}

// TestRecreateContainerAfterFailover: a standalone container with the
// label tether.failover=true uses a volume of h1's driver; h1 records it in
// the catalog. h1 dies; h2, promoted, creates the container again through
// its own driver and starts it on the data it holds. A second labelled
// container whose image h2 lacks is reported in h2's status instead.
//
// One engine serves every "host" here, so what a dead host would take
// with it has to be removed by hand after the kill: the old containers
// (stopped before, as a dead host's are gone) and dockerd's record of the
// volume under h1's driver (forgetVolume), without which the engine
// refuses the same volume name from another driver.
func TestRecreateContainerAfterFailover(t *testing.T) {
	requireE2E(t)
	dir1 := pluginDirFor(t)
	dir2 := filepath.Join("/run/docker/plugins", e2eDriverName2)
	if err := os.MkdirAll(dir2, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir2) })
	tp := startTopo(t, 3, driverAs("h1", dir1, e2eDriverName), driverAs("h2", dir2, e2eDriverName2), labelOn("pair=yes", "h1", "h2"))
	image := buildImage(t)
	h1, h2 := tp.host("h1"), tp.host("h2")
	vol, app, app2 := tp.prefix+"-v", tp.prefix+"-app", tp.prefix+"-app2"
	gone := "tether-e2e-gone:" + strings.TrimPrefix(tp.prefix, "tether-e2e-")
	t.Cleanup(func() {
		docker(t, "rm", "-f", app, app2)
		docker(t, "rmi", gone)
		docker(t, "volume", "rm", "-f", vol)
	})
	for _, s := range []string{filepath.Join(dir1, e2eDriverName+".sock"), filepath.Join(dir2, e2eDriverName2+".sock")} {
		testutil.EventuallyErr(t, 20*time.Second, func() error { _, err := os.Stat(s); return err })
	}
	mustDocker(t, "volume", "create", "-d", e2eDriverName, "-o", "replicas=2", "-o", "placement=pair=yes", vol)
	mustDocker(t, "tag", image, gone)
	run := func(name, img string) {
		mustDocker(t, "run", "-d", "--name", name, "--label", "tether.failover=true", "--restart", "unless-stopped",
			"-e", "WHO="+name, "--entrypoint", "/bin/busybox", "-v", vol+":/data", img,
			"sh", "-c", `echo "$WHO" >> /data/starts; while true; do sleep 1; done`)
	}
	run(app, image)
	run(app2, gone)
	testutil.EventuallyErr(t, 60*time.Second, func() error {
		b, err := os.ReadFile(filepath.Join(h2.volumeDir(vol), "starts"))
		if n := strings.Count(string(b), "\n"); err != nil || n != 2 {
			return fmt.Errorf("starts on h2: %q %v", b, err)
		}
		vi, err := tp.inspect(h2, vol)
		if err != nil {
			return err
		}
		if cs := vi.Volume.Containers; len(cs) != 2 || cs[0].Name != app || cs[0].Node != "h1" || cs[1].Name != app2 || cs[1].Image != gone {
			return fmt.Errorf("containers recorded in h2's catalog: %v", cs)
		}
		return nil
	})

	// Host death: the containers stop with it, then its agent.
	mustDocker(t, "stop", "-t", "1", app, app2)
	mustDocker(t, "kill", h1.container)
	killed := time.Now()
	mustDocker(t, "rm", app, app2)
	mustDocker(t, "rmi", gone)
	forgetVolume(t, filepath.Join(dir1, e2eDriverName+".sock"), vol)
	t.Logf("shared-engine cleanup took %s", time.Since(killed).Round(time.Millisecond))

	testutil.EventuallyErr(t, 90*time.Second, func() error {
		out, err := docker(t, "inspect", "--format", `{{.State.Running}} {{index .Config.Labels "tether.recreated-from"}} {{range .Mounts}}{{.Driver}}{{end}}`, app)
		if want := "true h1 " + e2eDriverName2; err != nil || out != want {
			return fmt.Errorf("re-created container: %q %v, want %q", out, err, want)
		}
		return nil
	})
	t.Logf("container re-created and running %s after the kill", time.Since(killed).Round(time.Millisecond))
	testutil.EventuallyErr(t, 30*time.Second, func() error {
		b, err := os.ReadFile(filepath.Join(h2.volumeDir(vol), "starts"))
		if want := app + "\n" + app2 + "\n" + app + "\n"; err != nil || string(b) != want {
			return fmt.Errorf("starts on h2: %q %v, want %q (the first two replicated from h1)", b, err, want)
		}
		return nil
	})
	testutil.EventuallyErr(t, 30*time.Second, func() error {
		var st tetherpb.StatusResponse
		if err := tp.ctl(h2, &st, "status"); err != nil {
			return err
		}
		if len(st.ContainerProblems) != 1 || st.ContainerProblems[0].Container != app2 || !strings.Contains(st.ContainerProblems[0].Problem, "image "+gone+" is not on this host") {
			return fmt.Errorf("h2 status container problems: %v", st.ContainerProblems)
		}
		return nil
	})
	if _, err := docker(t, "inspect", app2); err == nil {
		t.Fatalf("%s was created although its image is missing", app2)
	}
	// The record moved to h2 with the container; app2's stays h1's.
	testutil.EventuallyErr(t, 30*time.Second, func() error {
		vi, err := tp.inspect(h2, vol)
		if err != nil {
			return err
		}
		if cs := vi.Volume.Containers; len(cs) != 2 || cs[0].Node != "h2" || cs[1].Node != "h1" {
			return fmt.Errorf("containers recorded after the failover: %v", cs)
		}
		return nil
	})
}
