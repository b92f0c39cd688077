package replication

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/tether-io/tether/internal/testutil"
	"github.com/tether-io/tether/proto/tetherpb"
)

const testVolume = "vol"

// replicaNode is a replica's Server on a real gRPC server.
type replicaNode struct {
	paths Paths
	srv   *Server
	gs    *grpc.Server
	addr  string
	done  chan struct{}
}

// testCluster is a primary's data directory and replica nodes in temp dirs.
type testCluster struct {
	t           *testing.T
	primaryData string

	mu       sync.Mutex
	replicas map[string]*replicaNode
	conns    map[string]*grpc.ClientConn
	acks     map[string]Ack
	wire     atomic.Int64 // bytes of the messages primaries sent (see countStream)
	// prep, if set, adjusts each Primary before it starts.
	prep func(*Primary)
	// plainServer starts replicas on gRPC servers without ServerOptions
	// (the default codec and flow control).
	plainServer bool
}

func newTestCluster(t *testing.T) *testCluster {
	c := &testCluster{t: t, primaryData: filepath.Join(t.TempDir(), "data"),
		replicas: map[string]*replicaNode{}, conns: map[string]*grpc.ClientConn{}, acks: map[string]Ack{}}
	if err := os.Mkdir(c.primaryData, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		for _, cc := range c.conns {
			_ = cc.Close()
		}
		for _, r := range c.replicas {
			r.stop()
		}
	})
	return c
}

// replicaPaths returns the directories of a replica node, stable across
// restarts.
func (c *testCluster) replicaPaths(name string) Paths {
	base := filepath.Join(filepath.Dir(c.primaryData), "replica-"+name)
	return Paths{Data: filepath.Join(base, "data"), State: filepath.Join(base, "state")}
}

// startReplica starts (or restarts) a replica node on a fresh port.
func (c *testCluster) startReplica(name string) *replicaNode {
	c.t.Helper()
	paths := c.replicaPaths(name)
	srv := NewServer(ServerConfig{
		Resolve: func(volume string) (Paths, error) {
			if volume != testVolume {
				return Paths{}, fmt.Errorf("node %s does not hold volume %q", name, volume)
			}
			if err := os.MkdirAll(paths.Data, 0o755); err != nil {
				return Paths{}, err
			}
			return paths, os.MkdirAll(paths.State, 0o700)
		},
		Logger: testutil.Logger(c.t).With("node", name),
	})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		c.t.Fatal(err)
	}
	opts := srv.ServerOptions()
	if c.plainServer {
		opts = nil
	}
	gs := grpc.NewServer(opts...)
	srv.Register(gs)
	r := &replicaNode{paths: paths, srv: srv, gs: gs, addr: lis.Addr().String(), done: make(chan struct{})}
	go func() {
		defer close(r.done)
		_ = gs.Serve(lis)
	}()
	c.mu.Lock()
	c.replicas[name] = r
	c.mu.Unlock()
	return r
}

func (r *replicaNode) stop() {
	r.srv.Close()
	r.gs.Stop()
	<-r.done
}

// stopReplica stops a replica node (its disk stays).
func (c *testCluster) stopReplica(name string) {
	c.mu.Lock()
	r := c.replicas[name]
	delete(c.replicas, name)
	c.mu.Unlock()
	r.stop()
}

func (c *testCluster) replica(name string) *replicaNode {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.replicas[name]
}

// dial is the PrimaryConfig.Dial of the tests.
func (c *testCluster) dial(_ context.Context, node string) (tetherpb.ReplicationClient, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	r, ok := c.replicas[node]
	if !ok {
		return nil, fmt.Errorf("node %s is down", node)
	}
	cc, ok := c.conns[r.addr]
	if !ok {
		var err error
		cc, err = grpc.NewClient(r.addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithStreamInterceptor(countStream(&c.wire)), grpc.WithUnaryInterceptor(countUnary(&c.wire)))
		if err != nil {
			return nil, err
		}
		c.conns[r.addr] = cc
	}
	return tetherpb.NewReplicationClient(cc), nil
}

// startPrimary starts a Primary of the test volume.
func (c *testCluster) startPrimary(epoch uint64, replicas ...string) *Primary {
	c.t.Helper()
	return c.startPrimaryWith(func(*PrimaryConfig) {}, epoch, replicas...)
}

// startPrimaryWith starts a Primary of the test volume with a config
// changed by tune.
func (c *testCluster) startPrimaryWith(tune func(*PrimaryConfig), epoch uint64, replicas ...string) *Primary {
	c.t.Helper()
	cfg := PrimaryConfig{
		Volume: testVolume, Node: "primary", Epoch: epoch,
		Paths:    Paths{Data: c.primaryData, State: filepath.Join(filepath.Dir(c.primaryData), "primary-state")},
		Replicas: replicas,
		Dial:     c.dial,
		OnAck: func(node string, ack Ack) {
			c.mu.Lock()
			c.acks[node] = ack
			c.mu.Unlock()
		},
		Logger:         testutil.Logger(c.t).With("node", "primary"),
		RescanInterval: time.Hour, // the tests prove the watcher alone
	}
	tune(&cfg)
	p, err := NewPrimary(cfg)
	if err != nil {
		c.t.Fatal(err)
	}
	if c.prep != nil {
		c.prep(p)
	}
	if err := p.Start(context.Background()); err != nil {
		c.t.Fatal(err)
	}
	c.t.Cleanup(p.Stop)
	return p
}

// diff compares the primary's tree with a replica's.
func (c *testCluster) diff(name string) error {
	pm, err := Manifest(c.primaryData)
	if err != nil {
		return err
	}
	rm, err := Manifest(c.replicaPaths(name).Data)
	if err != nil {
		return err
	}
	if d := DiffManifests(pm, rm); len(d) > 0 {
		if len(d) > 6 {
			d = append(d[:6], fmt.Sprintf("... %d more", len(d)-6))
		}
		return fmt.Errorf("replica %s differs from the primary:\n  %s", name, strings.Join(d, "\n  "))
	}
	return nil
}

// waitSynced waits until every named replica equals the primary.
func (c *testCluster) waitSynced(names ...string) {
	c.t.Helper()
	testutil.EventuallyErr(c.t, 15*time.Second, func() error {
		for _, n := range names {
			if err := c.diff(n); err != nil {
				return err
			}
		}
		return nil
	})
}

// path returns a path in the primary's data directory.
func (c *testCluster) path(rel string) string {
	return filepath.Join(c.primaryData, rel)
}

// must fails the test on err.
func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// write creates or replaces a file in the primary's data directory.
func (c *testCluster) write(rel, content string) {
	c.t.Helper()
	must(c.t, os.WriteFile(c.path(rel), []byte(content), 0o644))
}
