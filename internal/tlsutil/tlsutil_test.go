package tlsutil

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func parseCert(t *testing.T, p []byte) *x509.Certificate {
	t.Helper()
	b, _ := pem.Decode(p)
	if b == nil {
		t.Fatal("no PEM block")
	}
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestNewCAAndCert(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	ca, err := NewCA(now)
	if err != nil {
		t.Fatal(err)
	}
	caCert := parseCert(t, ca.Cert)
	if !caCert.IsCA || caCert.NotAfter.Sub(now) != CAValidity {
		t.Fatalf("CA: IsCA %v, validity %s", caCert.IsCA, caCert.NotAfter.Sub(now))
	}
	if pub, ok := caCert.PublicKey.(*ecdsa.PublicKey); !ok || pub.Curve != elliptic.P256() {
		t.Fatalf("CA key is %T, want ECDSA P-256", caCert.PublicKey)
	}
	pair, err := NewCert(ca, CertRequest{Node: "h1", IPs: []net.IP{net.ParseIP("10.0.0.1")}, DNS: []string{"h1.example.com", "h1"}}, now)
	if err != nil {
		t.Fatal(err)
	}
	c := parseCert(t, pair.Cert)
	if c.Subject.CommonName != "h1" || !slices.Equal(c.DNSNames, []string{"h1", "h1.example.com"}) ||
		len(c.IPAddresses) != 1 || !c.IPAddresses[0].Equal(net.ParseIP("10.0.0.1")) {
		t.Fatalf("SANs: CN %q DNS %v IP %v", c.Subject.CommonName, c.DNSNames, c.IPAddresses)
	}
	if !slices.Equal(c.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}) {
		t.Fatalf("ext key usage %v, want server and client auth", c.ExtKeyUsage)
	}
	roots := x509.NewCertPool()
	roots.AddCert(caCert)
	for _, u := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		if _, err := c.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{u}, CurrentTime: now}); err != nil {
			t.Fatalf("node certificate does not verify for %v: %v", u, err)
		}
	}
	if _, err := tls.X509KeyPair(pair.Cert, pair.Key); err != nil {
		t.Fatalf("cert and key do not match: %v", err)
	}
}

func TestNewCertRefusesBadInput(t *testing.T) {
	ca, err := NewCA(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	node, err := NewCert(ca, CertRequest{Node: "n"}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	for name, tc := range map[string]struct {
		ca  PEMPair
		req CertRequest
		err string
	}{
		"no node":        {ca, CertRequest{}, "node name is required"},
		"bad node":       {ca, CertRequest{Node: "a b"}, "cannot go into a certificate"},
		"bad dns":        {ca, CertRequest{Node: "a", DNS: []string{"-x-"}}, "not a DNS name"},
		"not a CA":       {node, CertRequest{Node: "a"}, "not a CA"},
		"key mismatched": {PEMPair{Cert: ca.Cert, Key: node.Key}, CertRequest{Node: "a"}, "reading the CA"},
	} {
		t.Run(name, func(t *testing.T) {
			if _, err := NewCert(tc.ca, tc.req, time.Now()); err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Fatalf("got %v, want an error containing %q", err, tc.err)
			}
		})
	}
}

func TestCreateRefusesToOverwrite(t *testing.T) {
	dir := t.TempDir()
	if _, err := CreateCA(dir, time.Now()); err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(filepath.Join(dir, CACertFile))
	if _, err := CreateCA(dir, time.Now()); err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Fatalf("second CreateCA: %v", err)
	}
	after, _ := os.ReadFile(filepath.Join(dir, CACertFile))
	if string(before) != string(after) {
		t.Fatal("the CA was overwritten")
	}
	if fi, _ := os.Stat(filepath.Join(dir, CAKeyFile)); fi.Mode().Perm() != 0o600 {
		t.Fatalf("CA key mode %v, want 0600", fi.Mode().Perm())
	}
	out := filepath.Join(dir, "n1")
	f, err := CreateCert(dir, CertRequest{Node: "n1"}, out, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(f.Key); fi.Mode().Perm() != 0o600 {
		t.Fatalf("node key mode %v, want 0600", fi.Mode().Perm())
	}
	if _, err := CreateCert(dir, CertRequest{Node: "n1"}, out, time.Now()); err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Fatalf("second CreateCert: %v", err)
	}
	if _, err := CreateCert(t.TempDir(), CertRequest{Node: "n1"}, out, time.Now()); err == nil || !strings.Contains(err.Error(), "tether tls ca create") {
		t.Fatalf("CreateCert without a CA: %v", err)
	}
}

func TestFilesValidate(t *testing.T) {
	for _, tc := range []struct {
		f   Files
		err string
	}{
		{Files{}, ""},
		{Files{CA: "a", Cert: "b", Key: "c"}, ""},
		{Files{CA: "a"}, "missing --tls-cert, --tls-key"},
		{Files{Cert: "b", Key: "c"}, "missing --tls-ca"},
	} {
		err := tc.f.Validate()
		if (tc.err == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tc.err)) {
			t.Errorf("%+v: got %v, want %q", tc.f, err, tc.err)
		}
	}
}

// nodeFiles makes a CA in dir and a certificate for node.
func nodeFiles(t *testing.T, dir, node string) Files {
	t.Helper()
	if _, err := CreateCA(dir, time.Now()); err != nil {
		t.Fatal(err)
	}
	f, err := CreateCert(dir, CertRequest{Node: node}, filepath.Join(dir, node), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func TestNewStoreRefusesCertOfAnotherCA(t *testing.T) {
	a := nodeFiles(t, t.TempDir(), "a")
	b := nodeFiles(t, t.TempDir(), "b")
	_, err := NewStore(Files{CA: a.CA, Cert: b.Cert, Key: b.Key}, slog.Default())
	if err == nil || !strings.Contains(err.Error(), "does not fit --tls-ca") {
		t.Fatalf("got %v", err)
	}
	_, err = NewStore(Files{CA: a.CA, Cert: a.Cert, Key: b.Key}, slog.Default())
	if err == nil || !strings.Contains(err.Error(), "loading --tls-cert") {
		t.Fatalf("mismatched key: got %v", err)
	}
}

// Replacing the files is picked up at the next handshake; a broken
// replacement keeps the previous material.
func TestStoreReloads(t *testing.T) {
	dir := t.TempDir()
	f := nodeFiles(t, dir, "n1")
	s, err := NewStore(f, slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	first := s.Leaf().SerialNumber

	// Rotate to a new CA and certificate, in place.
	next := nodeFiles(t, t.TempDir(), "n1")
	later := time.Now().Add(time.Minute)
	for src, dst := range map[string]string{next.CA: f.CA, next.Cert: f.Cert, next.Key: f.Key} {
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(dst, b, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(dst, later, later); err != nil {
			t.Fatal(err)
		}
	}
	rotated := s.Leaf().SerialNumber
	if rotated.Cmp(first) == 0 {
		t.Fatal("the certificate was not reloaded")
	}
	// The new CA is what peers are verified against now: a peer of the
	// old CA is refused, one of the new CA accepted.
	verify := s.ClientConfig().VerifyConnection
	oldPeer, err := CreateCert(dir, CertRequest{Node: "x"}, filepath.Join(dir, "x"), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if err := verify(peerState(t, oldPeer.Cert, oldPeer.Key)); err == nil {
		t.Fatal("a peer of the old CA was accepted after the reload")
	}
	if err := verify(peerState(t, next.Cert, next.Key)); err != nil {
		t.Fatalf("a peer of the new CA was refused after the reload: %v", err)
	}

	// A broken key file: keep serving the rotated certificate.
	even := later.Add(time.Minute)
	if err := os.WriteFile(f.Key, []byte("garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(f.Key, even, even); err != nil {
		t.Fatal(err)
	}
	if s.Leaf().SerialNumber.Cmp(rotated) != 0 {
		t.Fatal("a broken reload replaced the certificate")
	}
}

func peerState(t *testing.T, certFile, keyFile string) tls.ConnectionState {
	t.Helper()
	c, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	x, err := x509.ParseCertificate(c.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	return tls.ConnectionState{PeerCertificates: []*x509.Certificate{x}}
}
