package e2e

import (
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/tether-io/tether/internal/gossipkey"
	"github.com/tether-io/tether/internal/tlsutil"
)

// security is the test cluster's CA and gossip key: every host runs with
// mutual TLS and encrypted gossip, as a production cluster must.
type security struct {
	t     *testing.T
	caDir string
	key   string
}

func newSecurity(t *testing.T) *security {
	t.Helper()
	dir := t.TempDir()
	if _, err := tlsutil.CreateCA(dir, time.Now()); err != nil {
		t.Fatal(err)
	}
	key, err := gossipkey.New()
	if err != nil {
		t.Fatal(err)
	}
	return &security{t: t, caDir: dir, key: key}
}

// agentArgs issues h's certificate into its bind-mounted data dir (as
// /var/lib/tether/tls/ inside the container) and returns the agent flags.
func (s *security) agentArgs(h *host) []string {
	s.t.Helper()
	req := tlsutil.CertRequest{Node: h.name, IPs: []net.IP{net.ParseIP(h.ip)}}
	f, err := tlsutil.CreateCert(s.caDir, req, filepath.Join(h.dataDir, "tls"), time.Now())
	if err != nil {
		s.t.Fatal(err)
	}
	in := func(p string) string { return filepath.Join(h.inDir, "tls", filepath.Base(p)) }
	return []string{"--tls-ca", in(f.CA), "--tls-cert", in(f.Cert), "--tls-key", in(f.Key), "--gossip-key", s.key}
}
