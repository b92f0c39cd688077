package e2e

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/tether-io/tether/internal/gossipkey"
	"github.com/tether-io/tether/internal/testutil"
	"github.com/tether-io/tether/internal/tlsutil"
	"github.com/tether-io/tether/proto/tetherpb"
	"google.golang.org/protobuf/encoding/protojson"
)

// e2ePluginName is the managed plugin the test builds. A managed plugin,
// unlike a legacy one, leaves nothing behind in dockerd once removed, so
// a fixed name is only about finding leftovers of an interrupted run.
const e2ePluginName = "tether-e2e-plugin:latest"

// TestManagedPlugin builds the managed plugin with `make plugin` (rootfs
// and config.json from deploy/plugin, docker plugin create, set, enable),
// with its default security flags pointing at a CA, certificate and gossip
// keyring in its /etc/tether mount; then a volume of the plugin's driver
// takes a container's write, which lands in the host's data directory.
func TestManagedPlugin(t *testing.T) {
	requireE2E(t)
	_, file, _, _ := runtime.Caller(0)
	repo := filepath.Dir(filepath.Dir(file))
	removePlugin := func() {
		docker(t, "plugin", "disable", "-f", e2ePluginName)
		docker(t, "plugin", "rm", "-f", e2ePluginName)
	}
	removePlugin() // a leftover of an interrupted run
	image := buildImage(t)
	data, etc := t.TempDir(), pluginEtc(t)
	vol := "tether-e2e-plugin-v"
	gossip, rpc := freePort(t), freePort(t)
	args := strings.Join([]string{"--node-name=p1", "--bootstrap-expect=1",
		"--gossip-addr=127.0.0.1:" + gossip, "--rpc-addr=127.0.0.1:" + rpc, "--http-addr=",
		"--gossip-keyring=/etc/tether/gossip.keyring", "--tls-ca=/etc/tether/ca.pem",
		"--tls-cert=/etc/tether/node.pem", "--tls-key=/etc/tether/node-key.pem"}, " ")
	ctr := "tether-e2e-plugin-app"
	t.Cleanup(func() {
		docker(t, "rm", "-f", ctr)
		docker(t, "volume", "rm", "-f", vol) // while the driver answers
		removePlugin()
	})
	mk := exec.Command("make", "-C", repo, "plugin", "PLUGIN="+e2ePluginName,
		"PLUGIN_SET=data.source="+data+" etc.source="+etc+` args="`+args+`"`)
	start := time.Now()
	if out, err := mk.CombinedOutput(); err != nil {
		t.Fatalf("make plugin: %v\n%s", err, out)
	}
	t.Logf("make plugin (build, create, set, enable) took %s", time.Since(start).Round(time.Millisecond))
	if out := mustDocker(t, "plugin", "inspect", "--format", "{{.Enabled}}", e2ePluginName); out != "true" {
		t.Fatalf("plugin enabled = %q", out)
	}

	mustDocker(t, "volume", "create", "-d", e2ePluginName, "-o", "replicas=1", vol)
	mustDocker(t, "run", "--rm", "--entrypoint", "/bin/busybox", "-v", vol+":/data", image, "sh", "-c", "echo hi > /data/x")
	b, err := os.ReadFile(filepath.Join(data, "volumes", vol, "data", "x"))
	if err != nil || string(b) != "hi\n" {
		t.Fatalf("the container's write in the host's data dir: %q %v", b, err)
	}
	if out := mustDocker(t, "volume", "inspect", "--format", "{{.Driver}} {{.Status.primary}}", vol); out != e2ePluginName+" p1" {
		t.Fatalf("docker volume inspect: %q", out)
	}
	// The agent's control socket is in the host's data dir.
	cli := filepath.Join(repo, "bin", "tether") // built by make plugin
	st, err := localStatus(cli, data)
	if err != nil {
		t.Fatal(err)
	}
	if st.Node != "p1" || !st.GetSecurity().GetTls() || !st.GetSecurity().GetGossipEncrypted() {
		t.Fatalf("plugin agent status: node %q security %v", st.Node, st.GetSecurity())
	}
	// Inside the plugin the agent reaches the Docker API and knows the
	// name Docker gives its driver (NAME:TAG): it records a labelled
	// container of its volume.
	mustDocker(t, "run", "-d", "--name", ctr, "--label", "tether.failover=true", "--entrypoint", "/bin/busybox", "-v", vol+":/data", image, "sleep", "600")
	testutil.EventuallyErr(t, 30*time.Second, func() error {
		out, err := exec.Command(cli, "--json", "--data-dir", data, "volume", "inspect", vol).Output()
		if err != nil {
			return fmt.Errorf("tether volume inspect: %w", err)
		}
		var vi tetherpb.VolumeInspectResponse
		if err := protojson.Unmarshal(out, &vi); err != nil {
			return err
		}
		if cs := vi.GetVolume().GetContainers(); len(cs) != 1 || cs[0].Name != ctr || cs[0].Node != "p1" {
			return fmt.Errorf("containers recorded by the plugin's agent: %v", cs)
		}
		return nil
	})
}

// pluginEtc makes the plugin's /etc/tether: a CA, the node's certificate
// and key under the names config.json's default flags expect, and a gossip
// keyring.
func pluginEtc(t *testing.T) string {
	t.Helper()
	caDir, dir := t.TempDir(), t.TempDir()
	if _, err := tlsutil.CreateCA(caDir, time.Now()); err != nil {
		t.Fatal(err)
	}
	f, err := tlsutil.CreateCert(caDir, tlsutil.CertRequest{Node: "p1", IPs: []net.IP{net.ParseIP("127.0.0.1")}}, t.TempDir(), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	key, err := gossipkey.New()
	if err != nil {
		t.Fatal(err)
	}
	for src, dst := range map[string]string{f.CA: "ca.pem", f.Cert: "node.pem", f.Key: "node-key.pem"} {
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, dst), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "gossip.keyring"), []byte(key+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return dir
}

// freePort returns a TCP port free on 127.0.0.1 right now.
func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	return port
}
