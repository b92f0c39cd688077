package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tether-io/tether/agent"
	"github.com/tether-io/tether/internal/gossipkey"
	"github.com/tether-io/tether/internal/tlsutil"
)

func runCLI(t *testing.T, args ...string) (string, error) {
	t.Helper()
	root := newRootCmd()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(args)
	err := root.Execute()
	return out.String(), err
}

func TestKeygenAndTLSCommands(t *testing.T) {
	out, err := runCLI(t, "keygen")
	if err != nil {
		t.Fatal(err)
	}
	if k, err := gossipkey.Parse(out); err != nil || len(k) != 32 {
		t.Fatalf("keygen printed %q: %v", out, err)
	}

	dir := t.TempDir()
	pki := filepath.Join(dir, "pki")
	if _, err := runCLI(t, "tls", "ca", "create", "--dir", pki); err != nil {
		t.Fatal(err)
	}
	if _, err := runCLI(t, "tls", "ca", "create", "--dir", pki); err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Fatalf("second ca create: %v", err)
	}
	out, err = runCLI(t, "tls", "cert", "create", "--ca-dir", pki, "--node", "h1", "--ip", "10.0.0.11", "--dns", "h1.example", "--out", filepath.Join(dir, "h1"))
	if err != nil {
		t.Fatal(err)
	}
	files := tlsutil.Files{CA: filepath.Join(dir, "h1", "ca.pem"), Cert: filepath.Join(dir, "h1", "h1.pem"), Key: filepath.Join(dir, "h1", "h1-key.pem")}
	if !strings.Contains(out, "--tls-cert "+files.Cert) {
		t.Fatalf("cert create printed %q", out)
	}
	if _, err := tlsutil.NewStore(files, nil); err != nil {
		t.Fatalf("the issued files do not load: %v", err)
	}
	for _, args := range [][]string{
		{"--node", "h2", "--ip", "not-an-ip"},
		{"--ip", "10.0.0.1"},
		{"--node", "h2", "--ca-dir", filepath.Join(dir, "nope")},
	} {
		args = append([]string{"tls", "cert", "create", "--ca-dir", pki, "--out", filepath.Join(dir, "h2")}, args...)
		if _, err := runCLI(t, args...); err == nil {
			t.Errorf("%v: no error", args)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "h2", "h2.pem")); err == nil {
		t.Error("a refused cert create wrote a certificate")
	}
}

func TestSecurityFlags(t *testing.T) {
	key, _ := gossipkey.New()
	ring := filepath.Join(t.TempDir(), "keyring")
	if err := os.WriteFile(ring, []byte("# primary\n"+key+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tlsF := tlsutil.Files{CA: "ca.pem", Cert: "c.pem", Key: "k.pem"}
	for _, tc := range []struct {
		name string
		f    securityFlags
		err  string
		keys int
	}{
		{"key and TLS", securityFlags{gossipKey: key, tls: tlsF}, "", 1},
		{"keyring and TLS", securityFlags{gossipKeyring: ring, tls: tlsF}, "", 1},
		{"both key flags", securityFlags{gossipKey: key, gossipKeyring: ring, tls: tlsF}, "exclude each other", 0},
		{"bad key", securityFlags{gossipKey: "xx", tls: tlsF}, "--gossip-key", 0},
		{"missing keyring", securityFlags{gossipKeyring: ring + "x", tls: tlsF}, "--gossip-keyring", 0},
		{"partial TLS", securityFlags{gossipKey: key, tls: tlsutil.Files{CA: "ca.pem"}}, "together", 0},
		{"insecure refused", securityFlags{}, "--insecure-dev", 0},
		{"insecure opted in", securityFlags{insecureDev: true}, "", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var cfg agent.Config
			err := tc.f.apply(&cfg)
			if (tc.err == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tc.err)) {
				t.Fatalf("got %v, want %q", err, tc.err)
			}
			if err == nil && len(cfg.GossipKeys) != tc.keys {
				t.Fatalf("%d gossip keys, want %d", len(cfg.GossipKeys), tc.keys)
			}
		})
	}
}
