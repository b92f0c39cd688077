package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/tether-io/tether/cluster"
	"github.com/tether-io/tether/proto/tetherpb"
)

// peerConns caches one gRPC client connection per peer RPC address.
type peerConns struct {
	creds  credentials.TransportCredentials // mutual TLS, or insecure
	dial   func(ctx context.Context, network, addr string) (net.Conn, error)
	mu     sync.Mutex
	conns  map[string]*grpc.ClientConn
	closed bool
}

func newPeerConns(creds credentials.TransportCredentials, dial func(ctx context.Context, network, addr string) (net.Conn, error)) *peerConns {
	return &peerConns{creds: creds, dial: dial, conns: map[string]*grpc.ClientConn{}}
}

func (p *peerConns) get(addr string) (*grpc.ClientConn, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil, errors.New("agent is stopping")
	}
	if c, ok := p.conns[addr]; ok {
		return c, nil
	}
	opts := []grpc.DialOption{grpc.WithTransportCredentials(p.creds)}
	if p.dial != nil {
		opts = append(opts, grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return p.dial(ctx, "tcp", addr)
		}))
	}
	c, err := grpc.NewClient(addr, opts...)
	if err != nil {
		return nil, fmt.Errorf("connecting to peer %s: %w", addr, err)
	}
	p.conns[addr] = c
	return c, nil
}

func (p *peerConns) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	for addr, c := range p.conns {
		c.Close()
		delete(p.conns, addr)
	}
}

// rpcAddrOf finds a member's RPC address in the gossip view.
func (a *Agent) rpcAddrOf(node string) (string, error) {
	for _, m := range a.cluster.Members() {
		if m.Name == node {
			if m.RPCAddr == "" {
				return "", fmt.Errorf("node %s has not announced its RPC address", node)
			}
			return m.RPCAddr, nil
		}
	}
	return "", fmt.Errorf("node %s is not a known member", node)
}

// connTo returns the cached connection to node's RPC address.
func (a *Agent) connTo(node string) (*grpc.ClientConn, error) {
	addr, err := a.rpcAddrOf(node)
	if err != nil {
		return nil, err
	}
	return a.peers.get(addr)
}

func (a *Agent) dialReplication(_ context.Context, node string) (tetherpb.ReplicationClient, error) {
	c, err := a.connTo(node)
	if err != nil {
		return nil, err
	}
	return tetherpb.NewReplicationClient(c), nil
}

func (a *Agent) dialPeer(node string) (tetherpb.PeerClient, error) {
	c, err := a.connTo(node)
	if err != nil {
		return nil, err
	}
	return tetherpb.NewPeerClient(c), nil
}

// forward sends an encoded catalog command to the leader.
func (a *Agent) forward(ctx context.Context, leaderRPCAddr string, cmd []byte) (uint64, error) {
	c, err := a.peers.get(leaderRPCAddr)
	if err != nil {
		return 0, err
	}
	resp, err := tetherpb.NewPeerClient(c).Apply(ctx, &tetherpb.ApplyRequest{Command: cmd})
	if err != nil {
		switch code := status.Code(err); {
		case code == codes.FailedPrecondition:
			return 0, fmt.Errorf("%w (asked %s)", cluster.ErrNotLeader, leaderRPCAddr)
		case ctx.Err() == nil && (code == codes.Unavailable || code == codes.DeadlineExceeded || code == codes.Canceled):
			// The leader may have committed the command before the call
			// broke: the caller repeats it and checks.
			return 0, fmt.Errorf("%w: forwarding to the leader at %s: %w", cluster.ErrIndeterminate, leaderRPCAddr, err)
		}
		return 0, fmt.Errorf("forwarding to the leader at %s: %w", leaderRPCAddr, err)
	}
	if resp.Error != "" {
		return resp.Index, cluster.ParseError(resp.Error)
	}
	return resp.Index, nil
}

// forwardLease asks the leader to grant node a primary lease.
func (a *Agent) forwardLease(ctx context.Context, leaderRPCAddr, node string) (uint64, error) {
	c, err := a.peers.get(leaderRPCAddr)
	if err != nil {
		return 0, err
	}
	resp, err := tetherpb.NewPeerClient(c).RenewLease(ctx, &tetherpb.RenewLeaseRequest{Node: node})
	switch {
	case err == nil:
		return resp.Index, nil
	case status.Code(err) == codes.FailedPrecondition:
		return 0, fmt.Errorf("%w (asked %s): %s", cluster.ErrNotLeader, leaderRPCAddr, status.Convert(err).Message())
	default:
		return 0, fmt.Errorf("asking the leader at %s for a lease: %w", leaderRPCAddr, err)
	}
}

// peerServer answers other agents.
type peerServer struct {
	tetherpb.UnimplementedPeerServer
	a *Agent
}

func (s *peerServer) Apply(ctx context.Context, req *tetherpb.ApplyRequest) (*tetherpb.ApplyResponse, error) {
	idx, err := s.a.cluster.ApplyEncoded(ctx, req.Command)
	if errors.Is(err, cluster.ErrNotLeader) {
		return nil, status.Error(codes.FailedPrecondition, err.Error())
	}
	if err != nil {
		return &tetherpb.ApplyResponse{Index: idx, Error: err.Error()}, nil
	}
	return &tetherpb.ApplyResponse{Index: idx}, nil
}

func (s *peerServer) RenewLease(ctx context.Context, req *tetherpb.RenewLeaseRequest) (*tetherpb.RenewLeaseResponse, error) {
	if req.Node == "" {
		return nil, status.Error(codes.InvalidArgument, "a lease request must name its node")
	}
	index, err := s.a.cluster.GrantLease(ctx, req.Node)
	if err != nil {
		if errors.Is(err, cluster.ErrNotLeader) {
			return nil, status.Error(codes.FailedPrecondition, err.Error())
		}
		return nil, status.Error(codes.Unavailable, err.Error())
	}
	return &tetherpb.RenewLeaseResponse{Index: index}, nil
}

func (s *peerServer) PrimaryStatus(_ context.Context, req *tetherpb.PrimaryStatusRequest) (*tetherpb.PrimaryStatusResponse, error) {
	st, ok := s.a.primaryStatus(req.Volume)
	if !ok {
		return nil, status.Errorf(codes.NotFound, "node %s is not serving volume %q as primary", s.a.cfg.NodeName, req.Volume)
	}
	return &tetherpb.PrimaryStatusResponse{Epoch: st.Epoch, Seq: st.Seq, Replicas: replicaStatusPB(st),
		DockerMounts: uint32(s.a.mountsHere(req.Volume)), Cuts: st.Cuts, FileConsistentOnlyCuts: st.FileConsistentOnlyCuts, WatchLimit: st.WatchLimit, CutError: st.CutError}, nil
}
