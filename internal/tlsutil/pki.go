package tlsutil

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"time"
)

// Validity periods of what this package issues.
const (
	CAValidity   = 5 * 365 * 24 * time.Hour
	CertValidity = 2 * 365 * 24 * time.Hour
)

// File names in a CA directory (tether tls ca create --dir D).
const (
	CACertFile = "ca.pem"
	CAKeyFile  = "ca-key.pem"
)

// PEMPair is a certificate and its private key, PEM encoded.
type PEMPair struct {
	Cert, Key []byte
}

// CertRequest describes a node certificate.
type CertRequest struct {
	// Node is the node name; it becomes the common name and a DNS SAN.
	Node string
	IPs  []net.IP
	DNS  []string
}

var dnsNameRE = regexp.MustCompile(`^[A-Za-z0-9*]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9])?$`)

// NewCA makes a self-signed ECDSA P-256 CA valid from now for CAValidity.
func NewCA(now time.Time) (PEMPair, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return PEMPair{}, fmt.Errorf("generating the CA key: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return PEMPair{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "tether cluster CA " + serial.Text(16)[:8], Organization: []string{"tether"}},
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(CAValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return PEMPair{}, fmt.Errorf("signing the CA certificate: %w", err)
	}
	return encodePair(der, key)
}

// NewCert issues a node certificate signed by ca, valid for both server
// and client authentication, with SANs req.IPs, req.DNS and req.Node.
func NewCert(ca PEMPair, req CertRequest, now time.Time) (PEMPair, error) {
	if err := req.validate(); err != nil {
		return PEMPair{}, err
	}
	caTLS, err := parsePair(ca)
	if err != nil {
		return PEMPair{}, fmt.Errorf("reading the CA: %w", err)
	}
	caCert, err := x509.ParseCertificate(caTLS.der)
	if err != nil {
		return PEMPair{}, fmt.Errorf("reading the CA certificate: %w", err)
	}
	if !caCert.IsCA {
		return PEMPair{}, errors.New("the CA certificate is not a CA (basic constraints)")
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return PEMPair{}, fmt.Errorf("generating the node key: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return PEMPair{}, err
	}
	notAfter := now.Add(CertValidity)
	if notAfter.After(caCert.NotAfter) {
		notAfter = caCert.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: req.Node, Organization: []string{"tether"}},
		NotBefore:    now.Add(-time.Minute),
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		DNSNames:     dedup(append([]string{req.Node}, req.DNS...)),
		IPAddresses:  req.IPs,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caTLS.key)
	if err != nil {
		return PEMPair{}, fmt.Errorf("signing the node certificate: %w", err)
	}
	return encodePair(der, key)
}

func (r CertRequest) validate() error {
	if r.Node == "" {
		return errors.New("a node name is required (--node)")
	}
	if !dnsNameRE.MatchString(r.Node) {
		return fmt.Errorf("node name %q cannot go into a certificate: use letters, digits, '.', '_' or '-'", r.Node)
	}
	for _, d := range r.DNS {
		if !dnsNameRE.MatchString(d) {
			return fmt.Errorf("--dns %q is not a DNS name", d)
		}
	}
	return nil
}

func dedup(in []string) []string {
	seen := map[string]bool{}
	var out []string
	for _, s := range in {
		if !seen[s] {
			seen[s] = true
			out = append(out, s)
		}
	}
	return out
}

func newSerial() (*big.Int, error) {
	s, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("generating a serial number: %w", err)
	}
	return s.Add(s, big.NewInt(1)), nil
}

func encodePair(der []byte, key *ecdsa.PrivateKey) (PEMPair, error) {
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return PEMPair{}, fmt.Errorf("encoding the private key: %w", err)
	}
	return PEMPair{
		Cert: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		Key:  pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}),
	}, nil
}

type parsedPair struct {
	der []byte
	key any
}

func parsePair(p PEMPair) (parsedPair, error) {
	c, err := tls.X509KeyPair(p.Cert, p.Key)
	if err != nil {
		return parsedPair{}, err
	}
	return parsedPair{der: c.Certificate[0], key: c.PrivateKey}, nil
}

// CreateCA writes a new CA into dir (ca.pem, ca-key.pem with mode 0600). It
// refuses to overwrite an existing CA.
func CreateCA(dir string, now time.Time) (certPath string, err error) {
	ca, err := NewCA(now)
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("creating %s: %w", dir, err)
	}
	certPath, keyPath := filepath.Join(dir, CACertFile), filepath.Join(dir, CAKeyFile)
	if err := writeNew(keyPath, ca.Key, 0o600); err != nil {
		return "", err
	}
	if err := writeNew(certPath, ca.Cert, 0o644); err != nil {
		return "", err
	}
	return certPath, nil
}

// LoadCA reads the CA that CreateCA wrote into dir.
func LoadCA(dir string) (PEMPair, error) {
	var p PEMPair
	var err error
	if p.Cert, err = os.ReadFile(filepath.Join(dir, CACertFile)); err != nil {
		return PEMPair{}, fmt.Errorf("reading the CA certificate (create one with tether tls ca create): %w", err)
	}
	if p.Key, err = os.ReadFile(filepath.Join(dir, CAKeyFile)); err != nil {
		return PEMPair{}, fmt.Errorf("reading the CA key: %w", err)
	}
	return p, nil
}

// CreateCert issues a certificate for req from the CA in caDir and writes
// outDir/ca.pem, outDir/NODE.pem and outDir/NODE-key.pem (0600): the three
// files an agent's --tls-ca, --tls-cert and --tls-key take. It refuses to
// overwrite a node's certificate or key.
func CreateCert(caDir string, req CertRequest, outDir string, now time.Time) (Files, error) {
	ca, err := LoadCA(caDir)
	if err != nil {
		return Files{}, err
	}
	pair, err := NewCert(ca, req, now)
	if err != nil {
		return Files{}, err
	}
	if err := os.MkdirAll(outDir, 0o700); err != nil {
		return Files{}, fmt.Errorf("creating %s: %w", outDir, err)
	}
	f := Files{
		CA:   filepath.Join(outDir, CACertFile),
		Cert: filepath.Join(outDir, req.Node+".pem"),
		Key:  filepath.Join(outDir, req.Node+"-key.pem"),
	}
	if err := writeNew(f.Key, pair.Key, 0o600); err != nil {
		return Files{}, err
	}
	if err := writeNew(f.Cert, pair.Cert, 0o644); err != nil {
		return Files{}, err
	}
	if filepath.Clean(outDir) != filepath.Clean(caDir) {
		if err := os.WriteFile(f.CA, ca.Cert, 0o644); err != nil {
			return Files{}, fmt.Errorf("writing %s: %w", f.CA, err)
		}
	}
	return f, nil
}

func writeNew(path string, data []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if errors.Is(err, os.ErrExist) {
		return fmt.Errorf("%s already exists: not overwriting it (remove it first to replace it)", path)
	}
	if err != nil {
		return fmt.Errorf("creating %s: %w", path, err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return nil
}
