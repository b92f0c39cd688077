package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/tether-io/tether/internal/testutil"
	"github.com/tether-io/tether/proto/tetherpb"
	"google.golang.org/protobuf/encoding/protojson"
)

// TestSwarmStack turns this engine into a one-node Swarm, deploys
// deploy/swarm/tether-stack.yml (the FROM-scratch product image, a global
// service on the host network) pointed at a temporary data dir and the
// e2e driver name, then a second stack whose service uses a volume of
// that driver and writes a file, which must land in the agent's data dir.
// The Swarm is always left again at the end: other tests share the engine.
func TestSwarmStack(t *testing.T) {
	requireE2E(t)
	_, file, _, _ := runtime.Caller(0)
	repo := filepath.Dir(filepath.Dir(file))
	pluginDir := pluginDirFor(t)
	bin := t.TempDir()
	build := exec.Command("go", "build", "-trimpath", "-o", filepath.Join(bin, "tether"), "./cmd/tether")
	build.Dir, build.Env = repo, append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building tether: %v\n%s", err, out)
	}
	product := "tether-e2e-swarm:test"
	mustDocker(t, "build", "-q", "-t", product, "-f", filepath.Join(repo, "deploy", "Dockerfile"), bin)
	image := buildImage(t)

	if _, err := docker(t, "swarm", "init", "--advertise-addr", "127.0.0.1"); err != nil {
		t.Fatalf("docker swarm init (is this engine already in a Swarm?): %v", err)
	}
	prefix := fmt.Sprintf("tether-e2e-%d", time.Now().UnixNano()%1e9)
	agentStack, appStack, vol := prefix+"-agent", prefix+"-app", prefix+"-v"
	t.Cleanup(func() {
		// The app first and its volume while the driver still answers,
		// then the agent, then the Swarm — even after a failure.
		docker(t, "stack", "rm", appStack)
		waitNoContainers(t, appStack)
		docker(t, "volume", "rm", "-f", vol)
		docker(t, "stack", "rm", agentStack)
		waitNoContainers(t, agentStack)
		if _, err := docker(t, "swarm", "leave", "--force"); err != nil {
			t.Errorf("leaving the Swarm: %v", err)
		}
		docker(t, "rmi", product)
	})

	data := t.TempDir()
	deploy := exec.Command("docker", "stack", "deploy", "--resolve-image", "never", "-c", filepath.Join(repo, "deploy", "swarm", "tether-stack.yml"), agentStack)
	deploy.Env = append(os.Environ(), "TETHER_IMAGE="+product, "TETHER_JOIN=127.0.0.1", "TETHER_EXPECT=1",
		"TETHER_DATA="+data, "TETHER_PLUGINS="+pluginDir, "TETHER_DRIVER="+e2eDriverName, "TETHER_ETC="+pluginEtc(t))
	if out, err := deploy.CombinedOutput(); err != nil {
		t.Fatalf("docker stack deploy of the agent: %v\n%s", err, out)
	}
	start := time.Now()
	testutil.EventuallyErr(t, 60*time.Second, func() error {
		if _, err := os.Stat(filepath.Join(pluginDir, e2eDriverName+".sock")); err != nil {
			return fmt.Errorf("the agent's driver socket: %w; the agent's last words: %s", err, lastLog(t, agentStack))
		}
		st, err := localStatus(filepath.Join(bin, "tether"), data)
		if err != nil {
			return err
		}
		if st.Leader == "" || !st.GetSecurity().GetTls() || !st.GetSecurity().GetGossipEncrypted() {
			return fmt.Errorf("agent not ready or not secured: leader %q security %v", st.Leader, st.GetSecurity())
		}
		return nil
	})
	t.Logf("agent of the global service serving after %s", time.Since(start).Round(time.Millisecond))

	stack := filepath.Join(t.TempDir(), "app.yml")
	yml := fmt.Sprintf(`version: "3.8"
services:
  app:
    image: %s
    entrypoint: ["/bin/busybox"]
    command: ["sh", "-c", "echo swarm > /data/x; sleep 3600"]
    volumes: [data:/data]
    deploy:
      restart_policy: {condition: none}
volumes:
  data:
    name: %s
    driver: %s
    driver_opts: {replicas: "1"}
`, image, vol, e2eDriverName)
	if err := os.WriteFile(stack, []byte(yml), 0o644); err != nil {
		t.Fatal(err)
	}
	mustDocker(t, "stack", "deploy", "--resolve-image", "never", "-c", stack, appStack)
	start = time.Now()
	testutil.EventuallyErr(t, 90*time.Second, func() error {
		b, err := os.ReadFile(filepath.Join(data, "volumes", vol, "data", "x"))
		if err != nil || string(b) != "swarm\n" {
			ps, _ := docker(t, "service", "ps", "--no-trunc", "--format", "{{.CurrentState}} {{.Error}}", appStack+"_app")
			return fmt.Errorf("the service's file in the agent's data dir: %q %v (tasks: %s)", b, err, ps)
		}
		return nil
	})
	t.Logf("service task wrote through the tether volume %s after its deploy", time.Since(start).Round(time.Millisecond))
	if out := mustDocker(t, "volume", "inspect", "--format", "{{.Driver}} {{.Status.primary}}", vol); !strings.HasPrefix(out, e2eDriverName+" ") {
		t.Fatalf("docker volume inspect: %q", out)
	}
}

// localStatus asks the agent whose data dir is dataDir for its status.
func localStatus(cli, dataDir string) (*tetherpb.StatusResponse, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, cli, "--json", "--timeout", "5s", "--data-dir", dataDir, "status").Output()
	if err != nil {
		return nil, fmt.Errorf("tether status: %w", err)
	}
	var st tetherpb.StatusResponse
	if err := protojson.Unmarshal(out, &st); err != nil {
		return nil, err
	}
	return &st, nil
}

// lastLog returns the end of the log of the newest container of stack.
func lastLog(t *testing.T, stack string) string {
	id, err := docker(t, "ps", "-alq", "--filter", "label=com.docker.stack.namespace="+stack)
	if err != nil || id == "" {
		return "(no container yet)"
	}
	out, _ := exec.Command("docker", "logs", "--tail", "3", id).CombinedOutput()
	return string(out)
}

// waitNoContainers waits (bounded) until no container of stack is left:
// Swarm removes a removed service's containers asynchronously.
func waitNoContainers(t *testing.T, stack string) {
	// Cleanup: what is left after the bound is removed by force, so this
	// polls (testutil.Every) instead of failing the test.
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	testutil.Every(ctx, 500*time.Millisecond, func(int) bool {
		out, err := docker(t, "ps", "-aq", "--filter", "label=com.docker.stack.namespace="+stack)
		return err != nil || out != ""
	})
	if out, _ := docker(t, "ps", "-aq", "--filter", "label=com.docker.stack.namespace="+stack); out != "" {
		docker(t, append([]string{"rm", "-f"}, strings.Fields(out)...)...)
	}
}
