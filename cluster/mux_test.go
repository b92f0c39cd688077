package cluster

import (
	"context"
	"io"
	"net"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/tether-io/tether/internal/testutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

func TestMuxSplitsRaftAndGRPC(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m := NewMux(ln, testutil.Logger(t))
	m.Start()
	defer m.Close()
	addr := ln.Addr().String()

	// A client that connects and says nothing must not hold up others.
	silent, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()

	srv := grpc.NewServer()
	healthSrv := health.NewServer()
	healthpb.RegisterHealthServer(srv, healthSrv)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(m.GRPCListener()) }()
	defer func() {
		srv.Stop()
		if err := <-served; err != nil {
			t.Errorf("grpc Serve: %v", err)
		}
	}()

	// Raft: dial through the layer, accept on the other side, exchange bytes.
	layer := m.RaftLayer()
	if layer.Addr().String() != addr {
		t.Fatalf("raft layer addr %s, want %s", layer.Addr(), addr)
	}
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := layer.Accept()
		if err != nil {
			t.Errorf("raft accept: %v", err)
			close(accepted)
			return
		}
		accepted <- c
	}()
	out, err := layer.Dial(raft.ServerAddress(addr), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	if _, err := out.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	in := <-accepted
	if in == nil {
		t.FailNow()
	}
	defer in.Close()
	buf := make([]byte, 4)
	_ = in.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(in, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("raft side read %q, %v; want ping (magic byte stripped)", buf, err)
	}

	// gRPC through the same port.
	cc, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatalf("grpc health check through mux: %v", err)
	}
	if resp.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health status %v", resp.Status)
	}
}

func TestMuxCloseIsPrompt(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m := NewMux(ln, testutil.Logger(t))
	m.Start()
	silent, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	// Wait until the mux holds the silent connection, then close: Close
	// must not wait out the 5 s first-byte deadline.
	testutil.Eventually(t, 5*time.Second, "mux tracks the silent connection", func() bool {
		m.mu.Lock()
		defer m.mu.Unlock()
		return len(m.pending) == 1
	})
	start := time.Now()
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("Close took %s", d)
	}
	if _, err := m.GRPCListener().Accept(); err == nil {
		t.Fatal("grpc listener accepts after Close")
	}
	if _, err := m.RaftLayer().Accept(); err == nil {
		t.Fatal("raft layer accepts after Close")
	}
}
