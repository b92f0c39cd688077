package cluster

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/tether-io/tether/internal/testutil"
)

func TestNewValidates(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	mux := NewMux(ln, testutil.Logger(t))
	defer mux.Close()
	good := Config{NodeName: "n1", DataDir: t.TempDir(), RPCAdvertise: ln.Addr().String(), RaftLayer: mux.RaftLayer()}
	for name, mutate := range map[string]func(*Config){
		"no name":        func(c *Config) { c.NodeName = "" },
		"no data dir":    func(c *Config) { c.DataDir = "" },
		"no rpc":         func(c *Config) { c.RPCAdvertise = "" },
		"rpc no port":    func(c *Config) { c.RPCAdvertise = "10.0.0.1" },
		"no raft layer":  func(c *Config) { c.RaftLayer = nil },
		"negative quota": func(c *Config) { c.BootstrapExpect = -1 },
	} {
		cfg := good
		mutate(&cfg)
		if _, err := New(cfg); err == nil {
			t.Errorf("%s: New accepted %+v", name, cfg)
		}
	}
	if _, err := New(good); err != nil {
		t.Fatal(err)
	}
}

// A single node with BootstrapExpect 1 leads, applies and survives a
// restart on the same data directory.
func TestSingleNodeRestart(t *testing.T) {
	dir := t.TempDir()
	run := func(check func(c *Cluster)) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		mux := NewMux(ln, testutil.Logger(t))
		mux.Start()
		defer mux.Close()
		cfg := Config{NodeName: "solo", DataDir: dir, GossipBind: "127.0.0.1:0", RPCAdvertise: ln.Addr().String(),
			BootstrapExpect: 1, RaftLayer: mux.RaftLayer(), Logger: testutil.Logger(t)}
		unstarted, err := New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		if err := unstarted.Shutdown(false); err != nil {
			t.Fatal("shutdown before start:", err)
		}
		c, err := New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Start(context.Background()); err != nil {
			t.Fatal(err)
		}
		if err := c.Start(context.Background()); err == nil {
			t.Fatal("second Start succeeded")
		}
		defer func() {
			if err := c.Shutdown(true); err != nil {
				t.Error(err)
			}
			if err := c.Shutdown(true); err != nil {
				t.Error("second shutdown:", err)
			}
		}()
		testutil.Eventually(t, 10*time.Second, "single node leads", c.IsLeader)
		// Leading comes before the replay of the log on disk is applied.
		testutil.Eventually(t, 10*time.Second, "catalog replayed", c.CatalogCurrent)
		check(c)
	}
	run(func(c *Cluster) {
		ctx := context.Background()
		v, err := c.CreateVolume(ctx, "solo-vol", 1)
		if err != nil {
			t.Fatal(err)
		}
		if v.Primary != "solo" || v.ReplicaNodes != nil || v.State != StateHealthy {
			t.Fatalf("created %+v", v)
		}
		if _, err := c.CreateVolume(ctx, "two", 2); !errors.Is(err, ErrNotEnoughNodes) {
			t.Fatalf("create 2 copies on 1 node: %v", err)
		}
		if err := c.ReportProgress(ctx, "solo-vol", "solo", 1, 3, v.CreatedAt); err != nil {
			t.Fatal(err)
		}
		if err := c.ReportProgress(ctx, "nope", "solo", 1, 3, v.CreatedAt); !errors.Is(err, ErrNoVolume) {
			t.Fatalf("progress on missing volume: %v", err)
		}
		if _, err := c.ApplyEncoded(ctx, []byte{99, 1}); !errors.Is(err, ErrUnknownCommand) {
			t.Fatalf("ApplyEncoded garbage: %v", err)
		}
		if state, idx := c.RaftState(); state != "leader" || idx == 0 {
			t.Fatalf("RaftState = %s %d", state, idx)
		}
		if name, _ := c.Leader(); name != "solo" {
			t.Fatalf("Leader = %q", name)
		}
	})
	run(func(c *Cluster) {
		v, ok := c.Volume("solo-vol")
		if !ok || v.Progress["solo"].Seq != 3 {
			t.Fatalf("after restart: %+v %v", v, ok)
		}
		m := c.Members()
		if len(m) != 1 || m[0].Name != "solo" || m[0].RaftRole != RoleLeader || m[0].Health != HealthAlive {
			t.Fatalf("members after restart: %+v", m)
		}
	})
}
