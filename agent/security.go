package agent

import (
	"fmt"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/tether-io/tether/internal/tlsutil"
	"github.com/tether-io/tether/proto/tetherpb"
)

// Security settings (Config.GossipKeys, Config.TLS): see DESIGN.md,
// "Security". The agent runs with or without them; the CLI refuses to start
// one without both unless --insecure-dev is given (RequireSecure).

// validateSecurity checks the security part of the config.
func (c *Config) validateSecurity() error {
	if err := c.TLS.Validate(); err != nil {
		return err
	}
	for i, k := range c.GossipKeys {
		if n := len(k); n != 16 && n != 24 && n != 32 {
			return fmt.Errorf("gossip key %d is %d bytes; want 32 (or 16 or 24): make one with tether keygen", i+1, n)
		}
	}
	return nil
}

// Insecurities lists what of the secure setup cfg lacks, worded for an
// operator; empty when both TLS and gossip encryption are on.
func (c *Config) Insecurities() []string {
	var out []string
	if !c.TLS.Enabled() {
		out = append(out, "RPC (gRPC and Raft) is not encrypted or authenticated: no --tls-ca/--tls-cert/--tls-key")
	}
	if len(c.GossipKeys) == 0 {
		out = append(out, "gossip is not encrypted: no --gossip-key or --gossip-keyring")
	}
	return out
}

// RequireSecure refuses a config without TLS and gossip encryption, unless
// insecureDev (the --insecure-dev opt-out) is set.
func RequireSecure(c *Config, insecureDev bool) error {
	missing := c.Insecurities()
	if len(missing) == 0 || insecureDev {
		return nil
	}
	return fmt.Errorf("refusing to start without security: %s.\nMake a gossip key with \"tether keygen\" and certificates with \"tether tls ca create\" and \"tether tls cert create\" (see the README), or pass --insecure-dev to run in plaintext on a trusted network for development",
		strings.Join(missing, "; "))
}

// setupTLS loads the TLS files when configured; nil when TLS is off.
func (a *Agent) setupTLS() error {
	if !a.cfg.TLS.Enabled() {
		return nil
	}
	s, err := tlsutil.NewStore(a.cfg.TLS, a.log.With("component", "tls"))
	if err != nil {
		return fmt.Errorf("loading TLS certificates: %w", err)
	}
	a.tls = s
	return nil
}

// secureMux makes Raft on the shared RPC port mutual TLS.
func (a *Agent) secureMux() error {
	if a.tls == nil {
		return nil
	}
	return a.mux.UseTLS(a.tls.ServerConfig(), a.tls.ClientConfig())
}

// grpcServerOptions are the RPC server's options: mutual TLS when on.
func (a *Agent) grpcServerOptions() []grpc.ServerOption {
	opts := a.repl.ServerOptions()
	if a.tls == nil {
		return opts
	}
	return append(opts, grpc.Creds(credentials.NewTLS(a.tls.ServerConfig("h2"))))
}

// peerCredentials are what this agent dials other agents with.
func (a *Agent) peerCredentials() credentials.TransportCredentials {
	if a.tls == nil {
		return insecure.NewCredentials()
	}
	return credentials.NewTLS(a.tls.ClientConfig())
}

// warnInsecure logs, loudly, what of the secure setup is missing.
func (a *Agent) warnInsecure() {
	for _, m := range a.cfg.Insecurities() {
		a.log.Warn("insecure: " + m + "; anyone who can reach this host's ports can read and change the cluster (development only)")
	}
	if a.tls != nil {
		leaf := a.tls.Leaf()
		a.log.Info("RPC secured with mutual TLS", "cert", leaf.Subject.CommonName, "expires", leaf.NotAfter.Format("2006-01-02"))
	}
	if len(a.cfg.GossipKeys) > 0 {
		a.log.Info("gossip encrypted", "keys", len(a.cfg.GossipKeys))
	}
}

// SecurityStatus is what tether status shows about transport security.
type SecurityStatus struct {
	TLS             bool
	GossipEncrypted bool
	// JoinError is why joining the gossip cluster last failed ("" once
	// joined): a gossip key mismatch shows up here.
	JoinError string
}

// Security reports the agent's transport security.
func (a *Agent) Security() SecurityStatus {
	s := SecurityStatus{TLS: a.tls != nil, GossipEncrypted: len(a.cfg.GossipKeys) > 0}
	if a.cluster != nil {
		s.JoinError = a.cluster.JoinError()
	}
	return s
}

func (a *Agent) securityPB() *tetherpb.Security {
	s := a.Security()
	return &tetherpb.Security{Tls: s.TLS, GossipEncrypted: s.GossipEncrypted, JoinError: s.JoinError}
}
