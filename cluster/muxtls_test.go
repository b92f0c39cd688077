package cluster

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/tether-io/tether/internal/testutil"
	"github.com/tether-io/tether/internal/tlsutil"
)

// securedMux is a TLS mux on a real loopback socket serving gRPC health
// and accepting Raft connections into accepted.
type securedMux struct {
	addr     string
	layer    raft.StreamLayer
	accepted chan net.Conn
}

func startSecuredMux(t *testing.T, store *tlsutil.Store) *securedMux {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m := NewMux(ln, testutil.Logger(t))
	if err := m.UseTLS(store.ServerConfig(), store.ClientConfig()); err != nil {
		t.Fatal(err)
	}
	m.Start()
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(store.ServerConfig("h2"))))
	healthpb.RegisterHealthServer(srv, health.NewServer())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(m.GRPCListener()) }()
	sm := &securedMux{addr: ln.Addr().String(), layer: m.RaftLayer(), accepted: make(chan net.Conn, 8)}
	acceptDone := make(chan struct{})
	go func() {
		defer close(acceptDone)
		for {
			c, err := sm.layer.Accept()
			if err != nil {
				return
			}
			sm.accepted <- c
		}
	}()
	t.Cleanup(func() {
		srv.Stop()
		<-served
		m.Close()
		<-acceptDone
		for len(sm.accepted) > 0 {
			(<-sm.accepted).Close()
		}
	})
	return sm
}

// clientLayer is a Raft stream layer of another node (its own mux) that
// only dials.
func clientLayer(t *testing.T, store *tlsutil.Store) raft.StreamLayer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m := NewMux(ln, testutil.Logger(t))
	if store != nil {
		if err := m.UseTLS(store.ServerConfig(), store.ClientConfig()); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() { m.Close() })
	return m.RaftLayer()
}

// raftExchange dials addr through layer, writes msg and reads it back on the
// accepting side; it returns the error of the first step that failed.
func (sm *securedMux) raftExchange(layer raft.StreamLayer, msg string) (string, error) {
	out, err := layer.Dial(raft.ServerAddress(sm.addr), 5*time.Second)
	if err != nil {
		return "", err
	}
	defer out.Close()
	if _, err := out.Write([]byte(msg)); err != nil {
		return "", err
	}
	// A refused client learns it on its next read (TLS 1.3 sends the
	// server's verdict on the client certificate after the handshake).
	refused := make(chan error, 1)
	go func() {
		_, err := out.Read(make([]byte, 1))
		refused <- err
	}()
	select {
	case in := <-sm.accepted:
		defer in.Close()
		buf := make([]byte, len(msg))
		_ = in.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err := io.ReadFull(in, buf)
		return string(buf), err
	case err := <-refused:
		return "", err
	case <-time.After(10 * time.Second):
		return "", errors.New("neither accepted nor refused")
	}
}

func TestMuxTLSRaft(t *testing.T) {
	pki := testutil.NewPKI(t)
	sm := startSecuredMux(t, pki.Store("server"))

	got, err := sm.raftExchange(clientLayer(t, pki.Store("peer")), "ping")
	if err != nil || got != "ping" {
		t.Fatalf("raft over TLS with a cluster certificate: got %q, %v", got, err)
	}

	other := testutil.NewPKI(t)
	for name, layer := range map[string]raft.StreamLayer{
		"certificate from another CA": clientLayer(t, other.Store("intruder")),
		"plaintext raft":              clientLayer(t, nil),
		"TLS without a certificate":   noCertLayer{},
	} {
		t.Run(name, func(t *testing.T) {
			if got, err := sm.raftExchange(layer, "evil raft request"); err == nil {
				t.Fatalf("raft connection accepted: server read %q", got)
			}
			// The mux keeps serving cluster members.
			if got, err := sm.raftExchange(clientLayer(t, pki.Store("peer-"+strings.ReplaceAll(name, " ", "-"))), "ping"); err != nil || got != "ping" {
				t.Fatalf("after the refusal, a member's raft connection: got %q, %v", got, err)
			}
		})
	}
}

// The dialing side refuses a server whose certificate is not from its CA.
func TestMuxTLSRaftDialerVerifiesServer(t *testing.T) {
	sm := startSecuredMux(t, testutil.NewPKI(t).Store("impostor"))
	_, err := clientLayer(t, testutil.NewPKI(t).Store("peer")).Dial(raft.ServerAddress(sm.addr), 5*time.Second)
	if err == nil || !strings.Contains(err.Error(), "TLS handshake") {
		t.Fatalf("dialing a server from another CA: %v, want a TLS handshake error", err)
	}
}

// noCertLayer dials Raft with TLS but presents no certificate.
type noCertLayer struct{ raft.StreamLayer }

func (noCertLayer) Dial(address raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	conn, err := net.DialTimeout("tcp", string(address), timeout)
	if err != nil {
		return nil, err
	}
	if _, err := conn.Write([]byte{RaftMagic}); err != nil {
		conn.Close()
		return nil, err
	}
	tc := tls.Client(conn, &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS12})
	if err := tc.Handshake(); err != nil {
		conn.Close()
		return nil, err
	}
	return tc, nil
}

func TestMuxTLSGRPC(t *testing.T) {
	pki := testutil.NewPKI(t)
	sm := startSecuredMux(t, pki.Store("server"))
	check := func(creds credentials.TransportCredentials) error {
		cc, err := grpc.NewClient("passthrough:///"+sm.addr, grpc.WithTransportCredentials(creds))
		if err != nil {
			return err
		}
		defer cc.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err = healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(false))
		return err
	}
	if err := check(credentials.NewTLS(pki.Store("peer").ClientConfig())); err != nil {
		t.Fatalf("gRPC with a cluster certificate: %v", err)
	}
	for name, creds := range map[string]credentials.TransportCredentials{
		"certificate from another CA": credentials.NewTLS(testutil.NewPKI(t).Store("intruder").ClientConfig()),
		"plaintext":                   insecure.NewCredentials(),
		"TLS without a certificate":   credentials.NewTLS(&tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS12}),
	} {
		if err := check(creds); err == nil {
			t.Errorf("gRPC %s: accepted", name)
		}
	}
	// And the client refuses a server from another CA.
	impostor := startSecuredMux(t, testutil.NewPKI(t).Store("impostor"))
	sm.addr = impostor.addr
	if err := check(credentials.NewTLS(pki.Store("peer2").ClientConfig())); err == nil {
		t.Error("gRPC client accepted a server from another CA")
	}
}
