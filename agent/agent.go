package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"

	"golang.org/x/time/rate"
	"google.golang.org/grpc"

	"github.com/tether-io/tether/cluster"
	"github.com/tether-io/tether/internal/tlsutil"
	"github.com/tether-io/tether/internal/unixsock"
	"github.com/tether-io/tether/proto/tetherpb"
	"github.com/tether-io/tether/replication"
	"github.com/tether-io/tether/volumedriver"
)

// Agent is one tether agent. New builds it, Start runs it, Shutdown (or
// Kill, which simulates a crash) stops it.
type Agent struct {
	cfg Config
	log *slog.Logger

	rpcLn   net.Listener
	mux     *cluster.Mux
	grpcSrv *grpc.Server
	ctlLn   net.Listener
	ctlSrv  *grpc.Server
	httpSrv *http.Server
	httpLn  net.Listener

	cluster *cluster.Cluster
	repl    *replication.Server
	peers   *peerConns
	tls     *tlsutil.Store // nil: plaintext RPC
	prog    *progressReporter
	driver  *volumedriver.Driver
	fencer  *Fencer
	keeper  *containerKeeper // nil without a Docker driver
	lease   *leaseKeeper
	metrics *metrics

	// mu guards primaries (the replication this node runs as primary, by
	// volume) and fenced (volumes this node stopped serving because its
	// lease lapsed). Only the reconcile loop starts and stops primaries.
	mu        sync.Mutex
	primaries map[string]*runningPrimary
	// limiter bounds the replication bytes sent by every primary of this
	// node (nil: no limit); rate.Limiter is safe for concurrent use.
	limiter replication.Limiter
	// prepMu serialises prepareVolume (incarnation.go).
	prepMu sync.Mutex
	fenced map[string]fencedVolume

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	stopOnce sync.Once
}

type runningPrimary struct {
	epoch uint64
	p     *replication.Primary
}

// New checks cfg and builds an agent; it opens nothing.
func New(cfg Config) (*Agent, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("agent config: %w", err)
	}
	return &Agent{
		cfg:       cfg,
		log:       cfg.Logger.With("node", cfg.NodeName),
		primaries: map[string]*runningPrimary{},
		fenced:    map[string]fencedVolume{},
		limiter:   replicationLimiter(cfg.ReplicationRate),
	}, nil
}

// replicationLimiter returns the limiter of a node's replication streams,
// nil for no limit. Its burst is a tenth of a second's worth (at least 64
// KiB), so the rate holds over short windows too.
func replicationLimiter(bytesPerSecond int64) replication.Limiter {
	if bytesPerSecond <= 0 {
		return nil
	}
	burst := max(bytesPerSecond/10, 64<<10)
	return rate.NewLimiter(rate.Limit(bytesPerSecond), int(min(burst, math.MaxInt32)))
}

// Start opens the listeners, joins the cluster and starts the reconcile
// loop. On error everything opened so far is closed again.
func (a *Agent) Start(ctx context.Context) (err error) {
	a.ctx, a.cancel = context.WithCancel(context.Background())
	defer func() {
		if err != nil {
			a.stop(false)
		}
	}()
	if err := os.MkdirAll(filepath.Join(a.cfg.DataDir, "volumes"), 0o700); err != nil {
		return fmt.Errorf("creating data dir: %w", err)
	}
	if err := a.setupTLS(); err != nil {
		return err
	}
	if err := a.startRPC(); err != nil {
		return err
	}
	rpcAdvertise, err := a.rpcAdvertise()
	if err != nil {
		return err
	}
	if err := a.mux.SetRaftAdvertise(rpcAdvertise); err != nil {
		return err
	}
	if a.cfg.Dial != nil {
		a.mux.SetRaftDialer(a.cfg.Dial)
	}
	a.peers = newPeerConns(a.peerCredentials(), a.cfg.Dial)
	a.cluster, err = cluster.New(cluster.Config{
		NodeName:            a.cfg.NodeName,
		DataDir:             a.cfg.DataDir,
		GossipBind:          a.cfg.GossipAddr,
		GossipAdvertise:     a.gossipAdvertise(),
		RPCAdvertise:        rpcAdvertise,
		Join:                a.cfg.Join,
		BootstrapExpect:     a.cfg.BootstrapExpect,
		RaftLayer:           a.mux.RaftLayer(),
		Forward:             a.forward,
		ForwardLease:        a.forwardLease,
		Version:             Version,
		Labels:              a.cfg.Labels,
		WrapGossipTransport: a.cfg.WrapGossipTransport,
		Logger:              a.log,
		Timing:              a.cfg.Timing,
		VolumeRetention:     a.cfg.VolumeRetention,
		GossipKeys:          a.cfg.GossipKeys,
	})
	if err != nil {
		return fmt.Errorf("setting up the cluster: %w", err)
	}
	if err := a.cluster.Start(a.ctx); err != nil {
		return fmt.Errorf("starting the cluster: %w", err)
	}
	a.prog = newProgressReporter(a.cluster, a.log, a.cfg.NodeName, a.primaryHeads)
	a.lease = newLeaseKeeper(a.cluster, a.log)
	a.metrics = newMetrics(a)
	a.wg.Add(3)
	go func() { defer a.wg.Done(); a.prog.run(a.ctx) }()
	go func() { defer a.wg.Done(); a.lease.run(a.ctx) }()
	go func() { defer a.wg.Done(); a.reconcileLoop(a.ctx) }()
	if err := a.startControl(); err != nil {
		return err
	}
	if err := a.startHTTP(); err != nil {
		return err
	}
	a.warnInsecure()
	if err := a.startDriver(); err != nil {
		return err
	}
	a.log.Info("agent started", "gossip", a.cluster.GossipAddr(), "rpc", rpcAdvertise,
		"control", SocketPath(a.cfg.DataDir), "http", a.HTTPAddr(), "version", Version)
	return nil
}

func (a *Agent) startRPC() error {
	ln, err := net.Listen("tcp", a.cfg.RPCAddr)
	if err != nil {
		return fmt.Errorf("listening for RPC on %s: %w", a.cfg.RPCAddr, err)
	}
	a.rpcLn = ln
	a.mux = cluster.NewMux(ln, a.log)
	if err := a.secureMux(); err != nil {
		return err
	}
	a.repl = replication.NewServer(replication.ServerConfig{
		Resolve: a.resolveVolume,
		Logger:  a.log,
	})
	a.grpcSrv = grpc.NewServer(a.grpcServerOptions()...)
	a.repl.Register(a.grpcSrv)
	tetherpb.RegisterPeerServer(a.grpcSrv, &peerServer{a: a})
	a.mux.Start()
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		if err := a.grpcSrv.Serve(a.mux.GRPCListener()); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			a.log.Debug("rpc server stopped", "err", err)
		}
	}()
	return nil
}

func (a *Agent) startControl() error {
	path := SocketPath(a.cfg.DataDir)
	ln, err := unixsock.Listen(path, 0o600, "control socket", "stop the other agent first or use another --data-dir")
	if err != nil {
		return err
	}
	a.ctlLn = ln
	a.ctlSrv = grpc.NewServer()
	tetherpb.RegisterControlServer(a.ctlSrv, &controlServer{a: a})
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		if err := a.ctlSrv.Serve(ln); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			a.log.Debug("control server stopped", "err", err)
		}
	}()
	return nil
}

func (a *Agent) rpcAdvertise() (string, error) {
	host, _, _ := net.SplitHostPort(a.cfg.RPCAddr)
	_, port, _ := net.SplitHostPort(a.rpcLn.Addr().String())
	ip, err := advertiseHost(host, a.cfg.AdvertiseIP)
	if err != nil {
		return "", err
	}
	return net.JoinHostPort(ip, port), nil
}

func (a *Agent) gossipAdvertise() string {
	if a.cfg.AdvertiseIP == "" {
		return ""
	}
	_, port, _ := net.SplitHostPort(a.cfg.GossipAddr)
	return net.JoinHostPort(a.cfg.AdvertiseIP, port)
}

// NodeName is this agent's node name.
func (a *Agent) NodeName() string { return a.cfg.NodeName }

// GossipAddr is the address other agents join at.
func (a *Agent) GossipAddr() string { return a.cluster.GossipAddr() }

// RPCAddr is the bound RPC listener address.
func (a *Agent) RPCAddr() string { return a.rpcLn.Addr().String() }

// SocketPath is the control socket.
func (a *Agent) SocketPath() string { return SocketPath(a.cfg.DataDir) }

// HTTPAddr is the bound HTTP address, "" when HTTP is off.
func (a *Agent) HTTPAddr() string {
	if a.httpLn == nil {
		return ""
	}
	return a.httpLn.Addr().String()
}

// Cluster exposes the cluster for tests and the demo.
func (a *Agent) Cluster() *cluster.Cluster { return a.cluster }

// VolumePaths is where volume name lives on this node.
func (a *Agent) VolumePaths(name string) replication.Paths {
	base := filepath.Join(a.cfg.DataDir, "volumes", name)
	return replication.Paths{Data: filepath.Join(base, "data"), State: filepath.Join(base, "state")}
}

// resolveVolume is the replication server's view of which volumes this node
// holds: those the catalog names it primary or replica of. (A primary's
// copy accepts only streams of a newer epoch than its own: the epoch it
// fenced at when it started serving.)
func (a *Agent) resolveVolume(name string) (replication.Paths, error) {
	v, ok := a.cluster.Volume(name)
	if !ok {
		return replication.Paths{}, fmt.Errorf("volume %q is not in this node's catalog", name)
	}
	if v.Primary != a.cfg.NodeName && !contains(v.ReplicaNodes, a.cfg.NodeName) {
		return replication.Paths{}, fmt.Errorf("node %s holds no copy of volume %q", a.cfg.NodeName, name)
	}
	p, err := a.prepareVolume(v)
	if err != nil {
		return replication.Paths{}, err
	}
	return p, nil
}

func ensureVolumeDirs(p replication.Paths) error {
	if err := os.MkdirAll(p.Data, 0o755); err != nil {
		return fmt.Errorf("creating volume directory: %w", err)
	}
	if err := os.MkdirAll(p.State, 0o700); err != nil {
		return fmt.Errorf("creating volume state directory: %w", err)
	}
	return nil
}

// Shutdown leaves the cluster gracefully and stops everything.
func (a *Agent) Shutdown() { a.stop(true) }

// Kill stops the agent without telling anyone, as a crash would: no leave
// message, listeners closed under the peers' feet.
func (a *Agent) Kill() { a.stop(false) }

func (a *Agent) stop(leave bool) {
	a.stopOnce.Do(func() {
		if a.cancel != nil {
			a.cancel()
		}
		if a.httpSrv != nil {
			a.httpSrv.Close()
		}
		if a.ctlSrv != nil {
			a.ctlSrv.Stop()
		}
		a.stopDriver()
		a.mu.Lock()
		for name, rp := range a.primaries {
			rp.p.Stop()
			delete(a.primaries, name)
		}
		a.mu.Unlock()
		if a.cluster != nil {
			if err := a.cluster.Shutdown(leave); err != nil {
				a.log.Warn("cluster shutdown", "err", err)
			}
		}
		if a.repl != nil {
			a.repl.Close()
		}
		if a.grpcSrv != nil {
			a.grpcSrv.Stop()
		}
		if a.mux != nil {
			a.mux.Close()
		}
		if a.peers != nil {
			a.peers.close()
		}
		a.wg.Wait()
		if a.ctlLn != nil {
			os.Remove(SocketPath(a.cfg.DataDir))
		}
		a.log.Info("agent stopped", "graceful", leave)
	})
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
