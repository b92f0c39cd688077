package tlsutil

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"time"
)

// Files are the PEM files of one node: the cluster CA, the node's
// certificate and its private key. All empty means TLS is off.
type Files struct {
	CA, Cert, Key string
}

// Enabled reports whether any file is set.
func (f Files) Enabled() bool { return f.CA != "" || f.Cert != "" || f.Key != "" }

// Validate checks that the three files are given together.
func (f Files) Validate() error {
	if !f.Enabled() {
		return nil
	}
	var missing []string
	for flag, v := range map[string]string{"--tls-ca": f.CA, "--tls-cert": f.Cert, "--tls-key": f.Key} {
		if v == "" {
			missing = append(missing, flag)
		}
	}
	if len(missing) > 0 {
		slices.Sort(missing)
		return fmt.Errorf("TLS needs --tls-ca, --tls-cert and --tls-key together; missing %s", strings.Join(missing, ", "))
	}
	return nil
}

// material is one consistent load of the files.
type material struct {
	cert *tls.Certificate
	pool *x509.CertPool
}

type stamp struct {
	mod  time.Time
	size int64
}

// Store holds a node's TLS material and reloads it when the files change.
type Store struct {
	files Files
	log   *slog.Logger

	mu     sync.Mutex
	cur    material
	stamps [3]stamp
}

// NewStore loads files; it fails when they are unreadable, do not match, or
// the certificate was not issued by the CA.
func NewStore(files Files, logger *slog.Logger) (*Store, error) {
	if err := files.Validate(); err != nil {
		return nil, err
	}
	if !files.Enabled() {
		return nil, errors.New("no TLS files given")
	}
	if logger == nil {
		logger = slog.Default()
	}
	s := &Store{files: files, log: logger}
	stamps, err := s.stat()
	if err != nil {
		return nil, err
	}
	m, err := load(files)
	if err != nil {
		return nil, err
	}
	s.cur, s.stamps = m, stamps
	return s, nil
}

func (s *Store) stat() ([3]stamp, error) {
	var out [3]stamp
	for i, p := range []string{s.files.CA, s.files.Cert, s.files.Key} {
		fi, err := os.Stat(p)
		if err != nil {
			return out, fmt.Errorf("TLS file: %w", err)
		}
		out[i] = stamp{mod: fi.ModTime(), size: fi.Size()}
	}
	return out, nil
}

// load reads and checks the three files.
func load(f Files) (material, error) {
	caPEM, err := os.ReadFile(f.CA)
	if err != nil {
		return material{}, fmt.Errorf("reading --tls-ca: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return material{}, fmt.Errorf("--tls-ca %s holds no PEM certificate", f.CA)
	}
	cert, err := tls.LoadX509KeyPair(f.Cert, f.Key)
	if err != nil {
		return material{}, fmt.Errorf("loading --tls-cert %s and --tls-key %s: %w", f.Cert, f.Key, err)
	}
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		return material{}, fmt.Errorf("parsing --tls-cert %s: %w", f.Cert, err)
	}
	cert.Leaf = leaf
	for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		if err := verifyChain(cert.Certificate, pool, usage); err != nil {
			return material{}, fmt.Errorf("--tls-cert %s does not fit --tls-ca %s (a node certificate from tether tls cert create is needed): %w", f.Cert, f.CA, err)
		}
	}
	return material{cert: &cert, pool: pool}, nil
}

// current returns the material, reloading it first when a file changed.
// A failed reload is logged and the previous material kept.
func (s *Store) current() material {
	s.mu.Lock()
	defer s.mu.Unlock()
	stamps, err := s.stat()
	if err != nil {
		s.log.Warn("TLS files unreadable; keeping the loaded certificates", "error", err)
		return s.cur
	}
	if stamps == s.stamps {
		return s.cur
	}
	m, err := load(s.files)
	if err != nil {
		s.log.Warn("TLS files changed but do not load; keeping the previous certificates", "error", err)
		return s.cur
	}
	s.cur, s.stamps = m, stamps
	s.log.Info("TLS certificates reloaded", "cert", s.files.Cert, "subject", m.cert.Leaf.Subject.CommonName,
		"expires", m.cert.Leaf.NotAfter.Format(time.RFC3339))
	return m
}

// Leaf is the node certificate in use.
func (s *Store) Leaf() *x509.Certificate { return s.current().cert.Leaf }

// ServerConfig is for the accepting side: it requires a client certificate
// issued by the CA (tls.RequireAndVerifyClientCert). nextProtos are the
// ALPN protocols to offer ("h2" for gRPC).
func (s *Store) ServerConfig(nextProtos ...string) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		NextProtos: nextProtos,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			m := s.current()
			return &tls.Config{
				MinVersion:   tls.VersionTLS12,
				NextProtos:   nextProtos,
				Certificates: []tls.Certificate{*m.cert},
				ClientAuth:   tls.RequireAndVerifyClientCert,
				ClientCAs:    m.pool,
			}, nil
		},
	}
}

// ClientConfig is for the dialing side: it presents this node's
// certificate and accepts a server whose certificate chains to the CA with
// server auth usage, whatever address was dialed (see the package comment).
func (s *Store) ClientConfig() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		// The chain is verified in VerifyConnection against the current
		// CA; only the host name check is skipped (see the package doc).
		InsecureSkipVerify: true, //nolint:gosec
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return s.current().cert, nil
		},
		VerifyConnection: func(cs tls.ConnectionState) error {
			var raw [][]byte
			for _, c := range cs.PeerCertificates {
				raw = append(raw, c.Raw)
			}
			return verifyChain(raw, s.current().pool, x509.ExtKeyUsageServerAuth)
		},
	}
}

// verifyChain checks that chain[0] is issued (through chain[1:]) by a CA in
// roots for usage.
func verifyChain(chain [][]byte, roots *x509.CertPool, usage x509.ExtKeyUsage) error {
	if len(chain) == 0 {
		return errors.New("the peer presented no certificate")
	}
	certs := make([]*x509.Certificate, 0, len(chain))
	for _, der := range chain {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return fmt.Errorf("parsing the peer certificate: %w", err)
		}
		certs = append(certs, c)
	}
	opts := x509.VerifyOptions{Roots: roots, Intermediates: x509.NewCertPool(), KeyUsages: []x509.ExtKeyUsage{usage}}
	for _, c := range certs[1:] {
		opts.Intermediates.AddCert(c)
	}
	if _, err := certs[0].Verify(opts); err != nil {
		return fmt.Errorf("certificate %q is not valid for this cluster: %w", certs[0].Subject.CommonName, err)
	}
	return nil
}
