package main

import (
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/tether-io/tether/agent"
	"github.com/tether-io/tether/internal/gossipkey"
	"github.com/tether-io/tether/internal/tlsutil"
	"github.com/tether-io/tether/proto/tetherpb"
)

// securityFlags are the agent's transport security flags.
type securityFlags struct {
	gossipKey, gossipKeyring string
	tls                      tlsutil.Files
	insecureDev              bool
}

func (s *securityFlags) register(cmd *cobra.Command) {
	f := cmd.Flags()
	f.StringVar(&s.gossipKey, "gossip-key", "", "base64 key encrypting gossip, the same on every agent (make one with tether keygen)")
	f.StringVar(&s.gossipKeyring, "gossip-keyring", "", "file of gossip keys, one base64 key a line, the first one used to encrypt (for key rotation)")
	f.StringVar(&s.tls.CA, "tls-ca", "", "PEM file of the cluster CA (tether tls ca create)")
	f.StringVar(&s.tls.Cert, "tls-cert", "", "PEM file of this node's certificate (tether tls cert create)")
	f.StringVar(&s.tls.Key, "tls-key", "", "PEM file of this node's private key")
	f.BoolVar(&s.insecureDev, "insecure-dev", false, "allow running without TLS or gossip encryption (development on a trusted network only)")
}

// apply puts the keys and TLS files into cfg and refuses an insecure
// setup without --insecure-dev.
func (s *securityFlags) apply(cfg *agent.Config) error {
	switch {
	case s.gossipKey != "" && s.gossipKeyring != "":
		return fmt.Errorf("--gossip-key and --gossip-keyring exclude each other: use one")
	case s.gossipKey != "":
		k, err := gossipkey.Parse(s.gossipKey)
		if err != nil {
			return fmt.Errorf("--gossip-key: %w", err)
		}
		cfg.GossipKeys = [][]byte{k}
	case s.gossipKeyring != "":
		keys, err := gossipkey.ReadKeyring(s.gossipKeyring)
		if err != nil {
			return fmt.Errorf("--gossip-keyring: %w", err)
		}
		cfg.GossipKeys = keys
	}
	cfg.TLS = s.tls
	if err := s.tls.Validate(); err != nil {
		return err
	}
	return agent.RequireSecure(cfg, s.insecureDev)
}

func newKeygenCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "keygen",
		Short: "Print a new gossip encryption key",
		Long: `Print a new random 32-byte gossip encryption key, base64 encoded. Give the same key
to every agent with --gossip-key (or in a --gossip-keyring file).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			k, err := gossipkey.New()
			if err != nil {
				return err
			}
			_, err = fmt.Fprintln(stdout(cmd), k)
			return err
		},
	}
}

func newTLSCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "tls",
		Short: "Make the cluster CA and node certificates for mutual TLS",
	}
	ca := &cobra.Command{Use: "ca", Short: "Manage the cluster certificate authority"}
	ca.AddCommand(newTLSCACreateCmd())
	cert := &cobra.Command{Use: "cert", Short: "Manage node certificates"}
	cert.AddCommand(newTLSCertCreateCmd())
	cmd.AddCommand(ca, cert)
	return cmd
}

func newTLSCACreateCmd() *cobra.Command {
	var dir string
	cmd := &cobra.Command{
		Use:   "create",
		Short: "Create the cluster CA (ECDSA P-256, valid 5 years)",
		Long: `Create the cluster CA in --dir: ca.pem (the certificate every agent trusts) and
ca-key.pem (the signing key: keep it off the hosts, it can mint cluster members).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			path, err := tlsutil.CreateCA(dir, time.Now())
			if err != nil {
				return err
			}
			fmt.Fprintf(stdout(cmd), "created the cluster CA %s (key %s)\n", path, strings.TrimSuffix(path, tlsutil.CACertFile)+tlsutil.CAKeyFile)
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", ".", "directory to write ca.pem and ca-key.pem into")
	return cmd
}

func newTLSCertCreateCmd() *cobra.Command {
	var caDir, node, out string
	var ips, dns []string
	cmd := &cobra.Command{
		Use:   "create",
		Short: "Issue a node certificate (server and client auth) from the cluster CA",
		Long: `Issue a certificate for one agent, valid for both accepting and dialing RPC
connections, with the node name, --ip addresses and --dns names as SANs. Writes
OUT/ca.pem, OUT/NODE.pem and OUT/NODE-key.pem: copy them to the host and pass them
as --tls-ca, --tls-cert and --tls-key.`,
		Example: `  tether tls cert create --ca-dir pki --node h1 --ip 10.0.0.11 --out pki/h1`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			req := tlsutil.CertRequest{Node: node, DNS: dns}
			for _, s := range ips {
				ip := net.ParseIP(s)
				if ip == nil {
					return fmt.Errorf("--ip %q is not an IP address", s)
				}
				req.IPs = append(req.IPs, ip)
			}
			if out == "" {
				out = caDir
			}
			f, err := tlsutil.CreateCert(caDir, req, out, time.Now())
			if err != nil {
				return err
			}
			fmt.Fprintf(stdout(cmd), "created the certificate of %s:\n  --tls-ca %s --tls-cert %s --tls-key %s\n", node, f.CA, f.Cert, f.Key)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&caDir, "ca-dir", ".", "directory holding ca.pem and ca-key.pem")
	f.StringVar(&node, "node", "", "the agent's node name (required)")
	f.StringSliceVar(&ips, "ip", nil, "IP address SAN (repeatable)")
	f.StringSliceVar(&dns, "dns", nil, "DNS name SAN (repeatable)")
	f.StringVar(&out, "out", "", "directory to write the certificate into (default: --ca-dir)")
	return cmd
}

// securityLine is the Security line of tether status.
func securityLine(s *tetherpb.Security) string {
	onOff := func(b bool) string {
		if b {
			return "on"
		}
		return "off"
	}
	return fmt.Sprintf("TLS %s, gossip encryption %s", onOff(s.GetTls()), onOff(s.GetGossipEncrypted()))
}
