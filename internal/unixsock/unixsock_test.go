package unixsock

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestListenReclaimsStaleAndRefusesLive(t *testing.T) {
	path := filepath.Join(t.TempDir(), "x.sock")
	if err := os.WriteFile(path, nil, 0o600); err != nil { // a leftover nobody answers on
		t.Fatal(err)
	}
	ln, err := Listen(path, 0o600, "test socket", "stop it")
	if err != nil {
		t.Fatalf("stale file not reclaimed: %v", err)
	}
	defer ln.Close()
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode: %v %v", fi, err)
	}
	if _, err := Listen(path, 0o600, "test socket", "stop it"); err == nil || !strings.Contains(err.Error(), "another process serves the test socket") {
		t.Fatalf("a live socket was taken over: %v", err)
	}
}
