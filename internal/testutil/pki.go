package testutil

import (
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/tether-io/tether/internal/tlsutil"
)

// PKI is a throwaway cluster CA in a test's temp dir.
type PKI struct {
	t   testing.TB
	Dir string
}

// NewPKI creates a CA for the test.
func NewPKI(t testing.TB) *PKI {
	t.Helper()
	dir := t.TempDir()
	if _, err := tlsutil.CreateCA(dir, time.Now()); err != nil {
		t.Fatal(err)
	}
	return &PKI{t: t, Dir: dir}
}

// Node issues a certificate for node (SANs: the node name and 127.0.0.1)
// and returns the files an agent takes.
func (p *PKI) Node(node string) tlsutil.Files {
	p.t.Helper()
	out := filepath.Join(p.Dir, "nodes", node)
	f, err := tlsutil.CreateCert(p.Dir, tlsutil.CertRequest{Node: node, IPs: []net.IP{net.IPv4(127, 0, 0, 1)}}, out, time.Now())
	if err != nil {
		p.t.Fatal(err)
	}
	return f
}

// Store issues a certificate for node and loads it.
func (p *PKI) Store(node string) *tlsutil.Store {
	p.t.Helper()
	s, err := tlsutil.NewStore(p.Node(node), Logger(p.t))
	if err != nil {
		p.t.Fatal(err)
	}
	return s
}
