package demo

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/tether-io/tether/internal/gossipkey"
	"github.com/tether-io/tether/internal/tlsutil"
)

// setupSecurity makes a throwaway CA, one certificate per node and a gossip
// keyring in the demo directory (reusing those a previous run with the same
// --dir left), so that the demo cluster runs as a real one must: mutual TLS
// on RPC and encrypted gossip.
func (r *run) setupSecurity() error {
	pki := filepath.Join(r.dir, "pki")
	if _, err := os.Stat(filepath.Join(pki, tlsutil.CACertFile)); errors.Is(err, os.ErrNotExist) {
		if _, err := tlsutil.CreateCA(pki, time.Now()); err != nil {
			return fmt.Errorf("creating the demo CA: %w", err)
		}
	}
	for _, n := range r.nodes {
		out := filepath.Join(pki, n.name)
		n.tls = tlsutil.Files{CA: filepath.Join(out, tlsutil.CACertFile), Cert: filepath.Join(out, n.name+".pem"), Key: filepath.Join(out, n.name+"-key.pem")}
		if _, err := os.Stat(n.tls.Cert); err == nil {
			continue
		}
		req := tlsutil.CertRequest{Node: n.name, IPs: []net.IP{net.IPv4(127, 0, 0, 1)}}
		if _, err := tlsutil.CreateCert(pki, req, out, time.Now()); err != nil {
			return fmt.Errorf("creating the certificate of %s: %w", n.name, err)
		}
	}
	r.keyring = filepath.Join(pki, "gossip.keyring")
	if _, err := os.Stat(r.keyring); errors.Is(err, os.ErrNotExist) {
		k, err := gossipkey.New()
		if err != nil {
			return err
		}
		if err := os.WriteFile(r.keyring, []byte(k+"\n"), 0o600); err != nil {
			return fmt.Errorf("writing the gossip keyring: %w", err)
		}
	}
	r.say("  secured: a throwaway CA and node certificates (mutual TLS on RPC and Raft) and a gossip key, in %s\n", pki)
	return nil
}

// securityArgs are n's agent flags for setupSecurity's files.
func (r *run) securityArgs(n *node) []string {
	return []string{"--tls-ca", n.tls.CA, "--tls-cert", n.tls.Cert, "--tls-key", n.tls.Key, "--gossip-keyring", r.keyring}
}
