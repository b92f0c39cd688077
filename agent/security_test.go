package agent

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/tether-io/tether/internal/testutil"
	"github.com/tether-io/tether/internal/tlsutil"
	"github.com/tether-io/tether/proto/tetherpb"
	"github.com/tether-io/tether/replication"
)

// Three agents with mutual TLS and encrypted gossip form a cluster, forward
// catalog writes and replicate a volume; peers without a cluster
// certificate are refused on the RPC port.
func TestSecureCluster(t *testing.T) {
	pki := testutil.NewPKI(t)
	key := [][]byte{bytes.Repeat([]byte{7}, 32)}
	tc := startCluster(t, func(i int, join []string) Config {
		name := fmt.Sprintf("n%d", i+1)
		return Config{
			NodeName: name, DataDir: t.TempDir(), GossipAddr: "127.0.0.1:0", RPCAddr: "127.0.0.1:0",
			Join: join, BootstrapExpect: 3, Logger: testutil.Logger(t),
			GossipKeys: key, TLS: pki.Node(name),
		}
	})

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := tc.ctl["n1"].Status(ctx, &tetherpb.StatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if sec := st.GetSecurity(); !sec.GetTls() || !sec.GetGossipEncrypted() || sec.GetJoinError() != "" {
		t.Fatalf("status security %v, want TLS and gossip encryption on", sec)
	}

	// Created through a follower: forwarded to the leader over mutual TLS.
	follower := tc.follower()
	resp, err := tc.ctl[follower.NodeName()].VolumeCreate(ctx, &tetherpb.VolumeCreateRequest{Name: "secure", Replicas: 3})
	if err != nil {
		t.Fatalf("volume create through a follower: %v", err)
	}
	primary := tc.agent(resp.Volume.Primary)
	testutil.Eventually(t, 10*time.Second, "the primary serves the volume", func() bool {
		_, ok := primary.primaryStatus("secure")
		return ok
	})
	src := primary.VolumePaths("secure").Data
	writeTree(t, src, "tls")
	for _, r := range resp.Volume.ReplicaNodes {
		dst := tc.agent(r).VolumePaths("secure").Data
		testutil.EventuallyErr(t, 15*time.Second, func() error { return replication.SameTree(src, dst) })
	}

	// The RPC port: a cluster member gets an answer, others are refused.
	call := func(creds credentials.TransportCredentials) error {
		conn, err := grpc.NewClient(primary.RPCAddr(), grpc.WithTransportCredentials(creds))
		if err != nil {
			return err
		}
		defer conn.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err = tetherpb.NewPeerClient(conn).PrimaryStatus(ctx, &tetherpb.PrimaryStatusRequest{Volume: "secure"})
		return err
	}
	if err := call(credentials.NewTLS(pki.Store("member").ClientConfig())); err != nil {
		t.Fatalf("a cluster member's call: %v", err)
	}
	for name, creds := range map[string]credentials.TransportCredentials{
		"plaintext":                   insecure.NewCredentials(),
		"certificate from another CA": credentials.NewTLS(testutil.NewPKI(t).Store("intruder").ClientConfig()),
	} {
		if err := call(creds); err == nil {
			t.Errorf("%s: PrimaryStatus answered", name)
		}
	}

	// An agent with the wrong gossip key stays out and says why.
	wrong, err := New(Config{
		NodeName: "n4", DataDir: t.TempDir(), GossipAddr: "127.0.0.1:0", RPCAddr: "127.0.0.1:0",
		Join: []string{tc.agents[0].GossipAddr()}, Logger: testutil.Logger(t),
		GossipKeys: [][]byte{bytes.Repeat([]byte{8}, 32)}, TLS: pki.Node("n4"),
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := wrong.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(wrong.Kill)
	testutil.Eventually(t, 10*time.Second, "the wrong key is named in the status", func() bool {
		return strings.Contains(wrong.securityPB().GetJoinError(), "gossip key mismatch?")
	})
	if n := len(tc.agents[0].Cluster().Members()); n != 3 {
		t.Fatalf("the cluster has %d members, want 3", n)
	}
}

func TestRequireSecure(t *testing.T) {
	tlsFiles := tlsutil.Files{CA: "ca.pem", Cert: "n.pem", Key: "n-key.pem"}
	key := [][]byte{make([]byte, 32)}
	for _, tc := range []struct {
		name     string
		cfg      Config
		insecure bool
		err      string
	}{
		{"secure", Config{TLS: tlsFiles, GossipKeys: key}, false, ""},
		{"nothing", Config{}, false, "no --tls-ca/--tls-cert/--tls-key; gossip is not encrypted"},
		{"no gossip key", Config{TLS: tlsFiles}, false, "gossip is not encrypted"},
		{"no TLS", Config{GossipKeys: key}, false, "RPC (gRPC and Raft) is not encrypted"},
		{"opted out", Config{}, true, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := RequireSecure(&tc.cfg, tc.insecure)
			if (tc.err == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tc.err)) {
				t.Fatalf("got %v, want %q", err, tc.err)
			}
			if err != nil && !strings.Contains(err.Error(), "--insecure-dev") {
				t.Fatalf("%v does not name the opt-out", err)
			}
		})
	}
}

func TestValidateSecurity(t *testing.T) {
	base := Config{NodeName: "n1", DataDir: t.TempDir()}
	for name, tc := range map[string]struct {
		mod func(*Config)
		err string
	}{
		"short gossip key": {func(c *Config) { c.GossipKeys = [][]byte{make([]byte, 10)} }, "gossip key 1 is 10 bytes"},
		"TLS without key":  {func(c *Config) { c.TLS = tlsutil.Files{CA: "a", Cert: "b"} }, "missing --tls-key"},
	} {
		t.Run(name, func(t *testing.T) {
			c := base
			tc.mod(&c)
			if _, err := New(c); err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Fatalf("got %v, want %q", err, tc.err)
			}
		})
	}
	// Unreadable TLS files fail Start with a clear error and leave nothing open.
	c := base
	c.GossipAddr, c.RPCAddr = "127.0.0.1:0", "127.0.0.1:0"
	c.TLS = tlsutil.Files{CA: "/nonexistent/ca.pem", Cert: "/nonexistent/n.pem", Key: "/nonexistent/k.pem"}
	a, err := New(c)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Start(context.Background()); err == nil || !strings.Contains(err.Error(), "loading TLS certificates") {
		t.Fatalf("Start with missing TLS files: %v", err)
	}
}
