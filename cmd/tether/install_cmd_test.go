package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestInstallWritesUnitAndDefaults(t *testing.T) {
	root := t.TempDir()
	out, err := runCLI(t, "install", "--root", root, "--args", "--node-name h1 --bootstrap-expect 3")
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	unit, err := os.ReadFile(filepath.Join(root, "etc/systemd/system/tether.service"))
	if err != nil || !strings.Contains(string(unit), "Before=docker.service") || !strings.Contains(string(unit), "ExecStart=/usr/local/bin/tether agent") {
		t.Fatalf("unit: %v\n%s", err, unit)
	}
	def, err := os.ReadFile(filepath.Join(root, "etc/default/tether"))
	if err != nil || !strings.Contains(string(def), `TETHER_ARGS="--node-name h1 --bootstrap-expect 3"`) {
		t.Fatalf("defaults: %v\n%s", err, def)
	}
	// Run again: the unit is not overwritten without --force; the defaults are kept.
	if _, err := runCLI(t, "install", "--root", root); err == nil || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("second install without --force: %v", err)
	}
	out, err = runCLI(t, "install", "--root", root, "--force", "--args", "--node-name other")
	if err != nil || !strings.Contains(out, "kept") {
		t.Fatalf("install --force: %v\n%s", err, out)
	}
	if def2, _ := os.ReadFile(filepath.Join(root, "etc/default/tether")); string(def2) != string(def) {
		t.Fatalf("--force replaced the host's flags:\n%s", def2)
	}
}
