package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// TestDeployFiles builds the product image from deploy/Dockerfile (FROM
// scratch, the static binary only) and runs it, and checks that the Swarm
// stack file is valid compose with the agent's flags filled in.
func TestDeployFiles(t *testing.T) {
	requireE2E(t)
	_, file, _, _ := runtime.Caller(0)
	repo := filepath.Dir(filepath.Dir(file))
	ctx := t.TempDir()
	build := exec.Command("go", "build", "-trimpath", "-o", filepath.Join(ctx, "tether"), "./cmd/tether")
	build.Dir = repo
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building tether: %v\n%s", err, out)
	}
	tag := "tether-e2e-deploy:test"
	mustDocker(t, "build", "-q", "-t", tag, "-f", filepath.Join(repo, "deploy", "Dockerfile"), ctx)
	t.Cleanup(func() { docker(t, "rmi", "-f", tag) })
	if out := mustDocker(t, "run", "--rm", tag, "--version"); !strings.HasPrefix(out, "tether version") {
		t.Fatalf("the image's binary answered %q", out)
	}
	compose, err := exec.LookPath("docker-compose")
	if err != nil {
		t.Skip("docker-compose not installed: the stack file is not checked")
	}
	cfg := exec.Command(compose, "-f", filepath.Join(repo, "deploy", "swarm", "tether-stack.yml"), "config")
	cfg.Env = append(os.Environ(), "TETHER_JOIN=10.0.0.11,10.0.0.12")
	out, err := cfg.CombinedOutput()
	if err != nil {
		t.Fatalf("the stack file is not valid: %v\n%s", err, out)
	}
	for _, want := range []string{"--join=10.0.0.11,10.0.0.12", "--driver-socket=/run/docker/plugins/tether.sock", "mode: global", "--data-dir=/var/lib/tether"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("stack config lacks %q:\n%s", want, out)
		}
	}
}
