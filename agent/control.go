package agent

import (
	"context"
	"errors"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tether-io/tether/cluster"
	"github.com/tether-io/tether/proto/tetherpb"
	"github.com/tether-io/tether/replication"
)

// controlServer answers the CLI on the local control socket.
type controlServer struct {
	tetherpb.UnimplementedControlServer
	a *Agent
}

func (s *controlServer) Members(context.Context, *tetherpb.MembersRequest) (*tetherpb.MembersResponse, error) {
	resp := &tetherpb.MembersResponse{}
	for _, m := range s.a.cluster.Members() {
		resp.Members = append(resp.Members, &tetherpb.Member{
			Name: m.Name, GossipAddr: m.GossipAddr, RpcAddr: m.RPCAddr,
			Health: m.Health, RaftRole: m.RaftRole, Version: m.Version,
		})
	}
	return resp, nil
}

func (s *controlServer) Status(context.Context, *tetherpb.StatusRequest) (*tetherpb.StatusResponse, error) {
	a := s.a
	state, last := a.cluster.RaftState()
	leader, _ := a.cluster.Leader()
	resp := &tetherpb.StatusResponse{
		Node: a.cfg.NodeName, Version: Version, Leader: leader,
		RaftState: state, RaftLastIndex: last, DataDir: a.cfg.DataDir,
	}
	p := planFor(a.cfg.NodeName, a.cluster.Volumes())
	for _, name := range sortedKeys(p.primary) {
		resp.PrimaryOf = append(resp.PrimaryOf, a.localVolumeStatus(name))
	}
	resp.ReplicaOf = p.replica
	return resp, nil
}

func (s *controlServer) VolumeCreate(ctx context.Context, req *tetherpb.VolumeCreateRequest) (*tetherpb.VolumeCreateResponse, error) {
	if req.Replicas == 0 {
		return nil, status.Error(codes.InvalidArgument, "replicas must be at least 1")
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	v, err := s.a.cluster.CreateVolume(ctx, req.Name, int(req.Replicas))
	if err != nil {
		return nil, status.Error(errCode(err), err.Error())
	}
	return &tetherpb.VolumeCreateResponse{Volume: s.a.volumePB(v)}, nil
}

func (s *controlServer) VolumeList(context.Context, *tetherpb.VolumeListRequest) (*tetherpb.VolumeListResponse, error) {
	resp := &tetherpb.VolumeListResponse{}
	for _, v := range s.a.cluster.Volumes() {
		resp.Volumes = append(resp.Volumes, s.a.volumePB(v))
	}
	return resp, nil
}

func (s *controlServer) VolumeInspect(ctx context.Context, req *tetherpb.VolumeInspectRequest) (*tetherpb.VolumeInspectResponse, error) {
	v, ok := s.a.cluster.Volume(req.Name)
	if !ok {
		return nil, status.Errorf(codes.NotFound, "no volume named %q", req.Name)
	}
	return &tetherpb.VolumeInspectResponse{Volume: s.a.volumePB(v), Status: s.a.liveStatus(ctx, v)}, nil
}

// liveStatus asks the volume's primary for its replication state.
func (a *Agent) liveStatus(ctx context.Context, v cluster.Volume) *tetherpb.VolumeStatus {
	if v.Primary == a.cfg.NodeName {
		return a.localVolumeStatus(v.Name)
	}
	if v.Primary == "" {
		return &tetherpb.VolumeStatus{Name: v.Name, Epoch: v.Epoch, Error: "the volume has no primary"}
	}
	pc, err := a.dialPeer(v.Primary)
	if err != nil {
		return &tetherpb.VolumeStatus{Name: v.Name, Epoch: v.Epoch, Error: err.Error()}
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	resp, err := pc.PrimaryStatus(ctx, &tetherpb.PrimaryStatusRequest{Volume: v.Name})
	if err != nil {
		return &tetherpb.VolumeStatus{Name: v.Name, Epoch: v.Epoch, Error: "primary " + v.Primary + " did not answer: " + status.Convert(err).Message()}
	}
	return &tetherpb.VolumeStatus{Name: v.Name, Epoch: resp.Epoch, Seq: resp.Seq, Replicas: resp.Replicas}
}

func (a *Agent) localVolumeStatus(name string) *tetherpb.VolumeStatus {
	st, ok := a.primaryStatus(name)
	if !ok {
		return &tetherpb.VolumeStatus{Name: name, Error: "replication is not running yet on this node"}
	}
	return &tetherpb.VolumeStatus{Name: name, Epoch: st.Epoch, Seq: st.Seq, Replicas: replicaStatusPB(st)}
}

func replicaStatusPB(st replication.PrimaryStatus) []*tetherpb.ReplicaStatus {
	var out []*tetherpb.ReplicaStatus
	for _, r := range st.Replicas {
		rs := &tetherpb.ReplicaStatus{
			Node: r.Node, Connected: r.Connected, AckedSeq: r.AckedSeq,
			LagMs: r.Lag.Milliseconds(), Error: r.Err,
		}
		if !r.AckedCut.IsZero() {
			rs.AckedCutUnixNano = r.AckedCut.UnixNano()
		}
		out = append(out, rs)
	}
	return out
}

func (a *Agent) volumePB(v cluster.Volume) *tetherpb.Volume {
	pb := &tetherpb.Volume{
		Name: v.Name, Replicas: uint32(v.Replicas), Primary: v.Primary,
		ReplicaNodes: v.ReplicaNodes, Epoch: v.Epoch, State: v.State,
		CreatedUnixNano: v.CreatedAt.UnixNano(),
	}
	a.deletionPB(pb, v)
	if v.Primary == a.cfg.NodeName || contains(v.ReplicaNodes, a.cfg.NodeName) {
		pb.Path = a.VolumePaths(v.Name).Data
	}
	for _, node := range sortedKeys(v.Progress) {
		pr := v.Progress[node]
		pb.Progress = append(pb.Progress, &tetherpb.ReplicaProgress{
			Node: node, Epoch: pr.Epoch, Seq: pr.Seq, CutUnixNano: pr.Cut.UnixNano(),
		})
	}
	return pb
}

// errCode maps catalog errors to gRPC codes the CLI can word.
func errCode(err error) codes.Code {
	switch {
	case errors.Is(err, cluster.ErrVolumeExists):
		return codes.AlreadyExists
	case errors.Is(err, cluster.ErrNoVolume):
		return codes.NotFound
	case errors.Is(err, context.DeadlineExceeded):
		return codes.DeadlineExceeded
	default:
		return codes.FailedPrecondition
	}
}
