package cluster

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/hashicorp/raft"
)

// raftTLS secures Raft connections on the shared RPC port: the dialer sends
// the RaftMagic byte in the clear (so the mux can still split by first
// byte), then both sides run a mutual TLS handshake before any Raft bytes.
type raftTLS struct {
	server *tls.Config // for accepted connections; must require client certs
	client *tls.Config // for dialed connections; presents our certificate
}

// UseTLS secures the Raft side of the mux with server (accepting) and
// client (dialing) configs; both are required. Call it before Start. gRPC
// connections pass through the mux untouched: secure them with gRPC
// transport credentials on the same listener (the mux routes a TLS
// ClientHello to gRPC, since it does not start with RaftMagic).
func (m *Mux) UseTLS(server, client *tls.Config) error {
	if server == nil || client == nil {
		return errors.New("cluster: raft TLS needs both a server and a client config")
	}
	if server.ClientAuth != tls.RequireAndVerifyClientCert && server.GetConfigForClient == nil {
		return errors.New("cluster: raft TLS server config must require and verify client certificates")
	}
	m.raft.tls = raftTLS{server: server, client: client}
	return nil
}

// secureAccepted runs the server handshake on an accepted Raft connection
// (whose magic byte was read); the caller set a deadline on conn.
func (l *raftLayer) secureAccepted(conn net.Conn) (net.Conn, error) {
	if l.tls.server == nil {
		return conn, nil
	}
	tc := tls.Server(conn, l.tls.server)
	if err := tc.Handshake(); err != nil {
		return nil, fmt.Errorf("TLS handshake failed (a peer without a certificate from this cluster's CA, or without TLS?): %w", err)
	}
	return tc, nil
}

// secureDialed runs the client handshake on a dialed Raft connection after
// the magic byte was sent.
func (l *raftLayer) secureDialed(conn net.Conn, address raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	if l.tls.client == nil {
		return conn, nil
	}
	if timeout <= 0 {
		timeout = peekTimeout
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	tc := tls.Client(conn, l.tls.client)
	if err := tc.HandshakeContext(ctx); err != nil {
		_ = conn.Close()
		return nil, fmt.Errorf("cluster: TLS handshake with raft peer %s failed: %w", address, err)
	}
	return tc, nil
}
