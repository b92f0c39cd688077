package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tether-io/tether/internal/testutil"
	"github.com/tether-io/tether/proto/tetherpb"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

func requireE2E(t *testing.T) {
	t.Helper()
	if os.Getenv("TETHER_E2E") != "1" {
		t.Skip("set TETHER_E2E=1 (make e2e) to run the Docker end-to-end tests")
	}
}

// docker runs the docker CLI and returns its trimmed stdout.
func docker(t testing.TB, args ...string) (string, error) {
	t.Helper()
	return dockerCtx(context.Background(), args...)
}

func dockerCtx(ctx context.Context, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "docker", args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("docker %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return strings.TrimSpace(stdout.String()), nil
}

func mustDocker(t testing.TB, args ...string) string {
	t.Helper()
	out, err := docker(t, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// buildImage builds the static tether binary and an image FROM scratch
// holding it and busybox; the tag is a hash of both, so unchanged code
// reuses the image.
func buildImage(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	_, file, _, _ := runtime.Caller(0)
	repo := filepath.Dir(filepath.Dir(file))
	for bin, pkg := range map[string]string{"tether": "./cmd/tether", "sqlwork": "./e2e/cmd/sqlwork"} {
		build := exec.Command("go", "build", "-trimpath", "-o", filepath.Join(dir, bin), pkg)
		build.Dir = repo
		build.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := build.CombinedOutput(); err != nil {
			t.Fatalf("building %s: %v\n%s", bin, err, out)
		}
	}
	bb, err := exec.LookPath("busybox")
	if err != nil {
		t.Fatal("busybox not found: apt-get install busybox-static")
	}
	h := sha256.New()
	for _, src := range []string{filepath.Join(dir, "tether"), filepath.Join(dir, "sqlwork"), bb} {
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		h.Write(b)
		if err := os.WriteFile(filepath.Join(dir, filepath.Base(src)), b, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	tag := "tether-e2e:" + hex.EncodeToString(h.Sum(nil))[:12]
	if _, err := docker(t, "image", "inspect", tag); err == nil {
		return tag
	}
	df := "FROM scratch\nCOPY tether /bin/tether\nCOPY sqlwork /bin/sqlwork\nCOPY busybox /bin/busybox\nENTRYPOINT [\"/bin/tether\"]\n"
	if err := os.WriteFile(filepath.Join(dir, "Dockerfile"), []byte(df), 0o644); err != nil {
		t.Fatal(err)
	}
	mustDocker(t, "build", "-q", "-t", tag, dir)
	return tag
}

// host is one simulated tether host: a container with its data dir bind
// mounted from the test's temp dir, so the test reads its files directly.
type host struct {
	name      string
	container string
	dataDir   string
	// inDir is where the data dir is mounted inside the container:
	// /var/lib/tether, or dataDir itself for hosts that serve the Docker
	// volume driver (dockerd uses the Mountpoint as a host path).
	inDir string
	ip    string
	// gate is held shared by every docker exec into the container and
	// exclusively around docker pause and unpause: an exec whose runc init
	// joins the container's cgroup while it freezes is frozen with it, and
	// dockerd then never unpauses the container.
	gate sync.RWMutex
}

// pause freezes the containers of hosts (and others, e.g. their workloads)
// with one docker pause, with no exec into the hosts in flight.
func pause(t testing.TB, hosts []*host, others ...string) {
	t.Helper()
	args := []string{"pause"}
	for _, h := range hosts {
		h.gate.Lock()
		defer h.gate.Unlock()
		args = append(args, h.container)
	}
	mustDocker(t, append(args, others...)...)
}

// unpause thaws a host's container (see host.gate).
func unpause(t testing.TB, h *host) {
	t.Helper()
	h.gate.Lock()
	defer h.gate.Unlock()
	mustDocker(t, "unpause", h.container)
}

// hostOption adjusts a host before its container starts: it may set
// h.inDir and returns extra `docker run` and `tether agent` arguments.
type hostOption func(h *host) (runArgs, agentArgs []string)

type topo struct {
	t       *testing.T
	prefix  string
	network string
	image   string
	hosts   []*host
	extra   []string // workload containers, removed at cleanup
	rec     *recorder
}

// startTopo starts n hosts on a new network, joined into one cluster.
func startTopo(t *testing.T, n int, opts ...hostOption) *topo {
	t.Helper()
	image := buildImage(t)
	tp := &topo{t: t, image: image, prefix: fmt.Sprintf("tether-e2e-%d", time.Now().UnixNano()%1e9)}
	tp.network = tp.prefix + "-net"
	// Fixed addresses, so that a host disconnected and reconnected keeps
	// its IP as a real host would. Pick a free /24 (other networks may exist).
	var subnet string
	for try := 0; ; try++ {
		subnet = fmt.Sprintf("10.%d.%d", 100+rand.IntN(100), rand.IntN(250))
		_, err := docker(t, "network", "create", "--subnet", subnet+".0/24", tp.network)
		if err == nil {
			break
		}
		if try == 10 {
			t.Fatalf("creating the test network: %v", err)
		}
	}
	t.Cleanup(tp.cleanup)
	var names []string
	for i := 1; i <= n; i++ {
		names = append(names, fmt.Sprintf("h%d", i))
	}
	sec := newSecurity(t)
	for i, name := range names {
		h := &host{name: name, container: tp.prefix + "-" + name, dataDir: t.TempDir(), inDir: "/var/lib/tether", ip: fmt.Sprintf("%s.%d", subnet, 11+i)}
		var runArgs, agentArgs []string
		for _, o := range opts {
			r, a := o(h)
			runArgs, agentArgs = append(runArgs, r...), append(agentArgs, a...)
		}
		args := []string{"run", "-d", "--name", h.container, "--hostname", name, "--network", tp.network, "--ip", h.ip,
			"--network-alias", name, "-v", h.dataDir + ":" + h.inDir}
		args = append(append(args, runArgs...), image, "--data-dir", h.inDir,
			"agent", "--node-name", name, "--bootstrap-expect", fmt.Sprint(n), "--log-level", "debug")
		args = append(args, agentArgs...)
		args = append(args, sec.agentArgs(h)...)
		for _, other := range names {
			if other != name {
				args = append(args, "--join", other)
			}
		}
		mustDocker(t, args...)
		tp.hosts = append(tp.hosts, h)
	}
	testutil.EventuallyErr(t, 60*time.Second, func() error {
		for _, h := range tp.hosts {
			var st tetherpb.StatusResponse
			if err := tp.ctl(h, &st, "status"); err != nil {
				return err
			}
			if st.Leader == "" {
				return fmt.Errorf("%s knows no leader", h.name)
			}
			if sec := st.GetSecurity(); !sec.GetTls() || !sec.GetGossipEncrypted() {
				return fmt.Errorf("%s is not secured: %v", h.name, sec)
			}
		}
		return nil
	})
	// Registered after tp.cleanup, so it runs first: the invariant monitor
	// stops and the report is written while the containers still exist.
	tp.rec = newRecorder(tp)
	return tp
}

func (tp *topo) host(name string) *host {
	for _, h := range tp.hosts {
		if h.name == name {
			return h
		}
	}
	tp.t.Fatalf("no host %s", name)
	return nil
}

// ctl runs a tether CLI command inside h's container and decodes its JSON.
func (tp *topo) ctl(h *host, into proto.Message, args ...string) error {
	return ctlCtx(context.Background(), h, into, args...)
}

// ctlCtx is ctl for goroutines other than the test's (no testing.T).
func ctlCtx(ctx context.Context, h *host, into proto.Message, args ...string) error {
	timeout := "5s" // reads answer from the local catalog
	if len(args) > 1 && args[0] == "volume" && !slices.Contains([]string{"inspect", "ls"}, args[1]) {
		timeout = "20s" // catalog writes may wait for a leader right after the cluster forms
	}
	h.gate.RLock()
	out, err := dockerCtx(ctx, append([]string{"exec", h.container, "/bin/tether", "--json", "--timeout", timeout, "--data-dir", h.inDir}, args...)...)
	h.gate.RUnlock()
	if err != nil {
		return err
	}
	if err := protojson.Unmarshal([]byte(out), into); err != nil {
		return fmt.Errorf("decoding tether %s output %q: %w", strings.Join(args, " "), out, err)
	}
	return nil
}

// sh runs a shell command inside h's container, as a workload would.
func (tp *topo) sh(h *host, script string) {
	tp.t.Helper()
	h.gate.RLock()
	defer h.gate.RUnlock()
	mustDocker(tp.t, "exec", h.container, "/bin/busybox", "sh", "-c", script)
}

// volumeDir is where h holds volume's data, seen from the test.
func (h *host) volumeDir(volume string) string {
	return filepath.Join(h.dataDir, "volumes", volume, "data")
}

// inspect asks h for volume's catalog record and live status.
func (tp *topo) inspect(h *host, volume string) (*tetherpb.VolumeInspectResponse, error) {
	var vi tetherpb.VolumeInspectResponse
	if err := tp.ctl(h, &vi, "volume", "inspect", volume); err != nil {
		return nil, err
	}
	return &vi, nil
}

// disconnect cuts h off the test network; reconnect brings it back with its
// address.
func (tp *topo) disconnect(h *host) {
	mustDocker(tp.t, "network", "disconnect", tp.network, h.container)
}

func (tp *topo) reconnect(h *host) {
	mustDocker(tp.t, "network", "connect", "--ip", h.ip, "--alias", h.name, tp.network, h.container)
}

func (tp *topo) cleanup() {
	if tp.t.Failed() || os.Getenv("TETHER_E2E_KEEP_LOGS") == "1" {
		dir := filepath.Join("logs", tp.t.Name())
		_ = os.MkdirAll(dir, 0o755)
		for _, h := range tp.hosts {
			out, _ := exec.Command("docker", "logs", h.container).CombinedOutput()
			path := filepath.Join(dir, h.name+".log")
			_ = os.WriteFile(path, out, 0o644)
			lines := strings.Split(strings.TrimSpace(string(out)), "\n")
			var important []string
			for _, l := range lines {
				if strings.Contains(l, "level=WARN") || strings.Contains(l, "level=ERROR") || strings.Contains(l, "level=INFO") && !strings.Contains(l, "raft") {
					important = append(important, l)
				}
			}
			if len(important) > 40 {
				important = important[len(important)-40:]
			}
			tp.t.Logf("---- %s: last INFO/WARN/ERROR lines (whole log in e2e/%s) ----\n%s", h.name, path, strings.Join(important, "\n"))
		}
		for _, c := range tp.extra {
			out, _ := exec.Command("docker", "logs", c).CombinedOutput()
			_ = os.WriteFile(filepath.Join(dir, strings.TrimPrefix(c, tp.prefix+"-")+".log"), out, 0o644)
		}
	}
	for _, c := range tp.extra {
		docker(tp.t, "rm", "-f", "-v", c)
	}
	for _, h := range tp.hosts {
		docker(tp.t, "rm", "-f", "-v", h.container)
	}
	docker(tp.t, "network", "rm", tp.network)
}
