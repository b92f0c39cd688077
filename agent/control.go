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
			Health: m.Health, RaftRole: m.RaftRole, Version: m.Version, Labels: m.Labels,
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
		RaftState: state, RaftLastIndex: last, DataDir: a.cfg.DataDir, RaftTerm: a.cluster.RaftTerm(),
		Security: a.securityPB(),
	}
	p := planFor(a.cfg.NodeName, a.cluster.Volumes())
	for _, name := range sortedKeys(p.primary) {
		resp.PrimaryOf = append(resp.PrimaryOf, a.localVolumeStatus(name))
	}
	resp.ReplicaOf = p.replica
	resp.LeaseHeld = a.lease.valid()
	resp.LeaseAgeMs = a.lease.age().Milliseconds()
	for _, name := range append(sortedKeys(p.primary), p.replica...) {
		recs, err := a.repl.QuarantinedPaths(name, a.VolumePaths(name))
		if err != nil {
			a.log.Warn("listing quarantine", "volume", name, "err", err)
		}
		for _, q := range recs {
			resp.Quarantined = append(resp.Quarantined, &tetherpb.Quarantine{Volume: q.Volume, Epoch: q.Epoch, TimeUnixNano: q.Time.UnixNano(), Dir: q.Dir, Files: int64(q.Files)})
		}
	}
	a.mu.Lock()
	for _, name := range sortedKeys(a.fenced) {
		f := a.fenced[name]
		resp.Fenced = append(resp.Fenced, &tetherpb.FencedVolume{Name: name, Epoch: f.epoch, SinceUnixNano: f.since.UnixNano(), Reason: f.reason})
	}
	a.mu.Unlock()
	if a.keeper != nil {
		problems, _, _ := a.keeper.status()
		for _, name := range sortedKeys(problems) {
			resp.ContainerProblems = append(resp.ContainerProblems, &tetherpb.ContainerProblem{Container: name, Problem: problems[name]})
		}
	}
	return resp, nil
}

func (s *controlServer) VolumeCreate(ctx context.Context, req *tetherpb.VolumeCreateRequest) (*tetherpb.VolumeCreateResponse, error) {
	if req.Replicas == 0 {
		return nil, status.Error(codes.InvalidArgument, "replicas must be at least 1")
	}
	maxLag := cluster.DefaultMaxLag
	switch {
	case req.MaxLagMs < -1:
		return nil, status.Errorf(codes.InvalidArgument, "max lag %dms is invalid: give a duration, or 0 for no limit", req.MaxLagMs)
	case req.MaxLagMs == -1:
		maxLag = 0
	case req.MaxLagMs > 0:
		maxLag = time.Duration(req.MaxLagMs) * time.Millisecond
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	v, err := s.a.cluster.CreateVolumeSpec(ctx, cluster.VolumeSpec{Name: req.Name, Replicas: int(req.Replicas), MaxLag: maxLag, Placement: req.Placement, Freeze: req.Freeze})
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

func (s *controlServer) VolumePromote(ctx context.Context, req *tetherpb.VolumePromoteRequest) (*tetherpb.VolumePromoteResponse, error) {
	if req.Name == "" || req.To == "" {
		return nil, status.Error(codes.InvalidArgument, "promote needs a volume name and --to NODE")
	}
	v, behind, err := s.a.Promote(ctx, req.Name, req.To, req.Force)
	if err != nil {
		return nil, status.Error(errCode(err), err.Error())
	}
	return &tetherpb.VolumePromoteResponse{Volume: s.a.volumePB(v), BehindMs: behind.Milliseconds()}, nil
}

func (s *controlServer) VolumeMove(ctx context.Context, req *tetherpb.VolumeMoveRequest) (*tetherpb.VolumeMoveResponse, error) {
	if req.Name == "" || req.To == "" {
		return nil, status.Error(codes.InvalidArgument, "move needs a volume name and --to NODE")
	}
	if req.WaitMs < 0 {
		return nil, status.Error(codes.InvalidArgument, "--wait must not be negative")
	}
	t0 := time.Now()
	v, err := s.a.Move(ctx, req.Name, req.To, time.Duration(req.WaitMs)*time.Millisecond)
	if err != nil {
		return nil, status.Error(errCode(err), err.Error())
	}
	return &tetherpb.VolumeMoveResponse{Volume: s.a.volumePB(v), TookMs: time.Since(t0).Milliseconds()}, nil
}

func (s *controlServer) VolumeUpdate(ctx context.Context, req *tetherpb.VolumeUpdateRequest) (*tetherpb.VolumeUpdateResponse, error) {
	cmd := cluster.UpdateVolume{Name: req.Name}
	if req.Replicas != nil {
		n := int(*req.Replicas)
		cmd.Replicas = &n
	}
	if req.MaxLagMs != nil {
		lag := time.Duration(*req.MaxLagMs) * time.Millisecond
		switch {
		case *req.MaxLagMs == -1:
			lag = 0
		case *req.MaxLagMs < 0:
			return nil, status.Errorf(codes.InvalidArgument, "max lag %dms is invalid", *req.MaxLagMs)
		}
		cmd.MaxLag = &lag
	}
	if req.SetPlacement {
		pl := req.Placement
		if pl == nil {
			pl = map[string]string{}
		}
		cmd.Placement = &pl
	}
	cmd.Freeze = req.Freeze
	if cmd.Replicas == nil && cmd.MaxLag == nil && cmd.Placement == nil && cmd.Freeze == nil {
		return nil, status.Error(codes.InvalidArgument, "nothing to update: give --replicas, --max-lag, --placement, --clear-placement or --freeze")
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	v, err := s.a.cluster.UpdateVolume(ctx, cmd)
	if err != nil {
		return nil, status.Error(errCode(err), err.Error())
	}
	return &tetherpb.VolumeUpdateResponse{Volume: s.a.volumePB(v)}, nil
}

// liveStatus asks the volume's primary for its replication state.
func (a *Agent) liveStatus(ctx context.Context, v cluster.Volume) *tetherpb.VolumeStatus {
	if v.Primary == a.cfg.NodeName {
		return a.localVolumeStatus(v.Name)
	}
	if v.Primary == "" {
		return &tetherpb.VolumeStatus{Name: v.Name, Epoch: v.Epoch, Error: "the volume has no primary"}
	}
	if h := a.memberHealth()[v.Primary]; h == cluster.HealthDead || h == cluster.HealthLeft {
		// Asking would only wait for the timeout.
		return &tetherpb.VolumeStatus{Name: v.Name, Epoch: v.Epoch, Error: "primary " + v.Primary + " is " + h + " (gossip); the leader fails the volume over once its lease has lapsed"}
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
	return &tetherpb.VolumeStatus{Name: v.Name, Epoch: resp.Epoch, Seq: resp.Seq, Replicas: resp.Replicas, Cuts: resp.Cuts, FileConsistentOnlyCuts: resp.FileConsistentOnlyCuts, WatchLimit: resp.WatchLimit, CutError: resp.CutError}
}

func (a *Agent) localVolumeStatus(name string) *tetherpb.VolumeStatus {
	st, ok := a.primaryStatus(name)
	if !ok {
		return &tetherpb.VolumeStatus{Name: name, Error: "replication is not running yet on this node"}
	}
	return &tetherpb.VolumeStatus{Name: name, Epoch: st.Epoch, Seq: st.Seq, Replicas: replicaStatusPB(st), Cuts: st.Cuts, FileConsistentOnlyCuts: st.FileConsistentOnlyCuts, WatchLimit: st.WatchLimit, CutError: st.CutError}
}

func replicaStatusPB(st replication.PrimaryStatus) []*tetherpb.ReplicaStatus {
	var out []*tetherpb.ReplicaStatus
	for _, r := range st.Replicas {
		rs := &tetherpb.ReplicaStatus{
			Node: r.Node, Connected: r.Connected, AckedSeq: r.AckedSeq,
			LagMs: r.Lag.Milliseconds(), Error: r.Err,
			LagBytes: r.LagBytes, PendingCuts: uint32(r.PendingCuts),
			FullSyncDoneBytes: r.FullSyncDone, FullSyncTotalBytes: r.FullSyncTotal,
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
		MaxLagMs:        v.MaxLag.Milliseconds(),
		Placement:       v.Placement,
		Freeze:          v.Freeze,
	}
	if v.State == cluster.StateNeedsOperator {
		pb.Blocked = "the primary is down and every live copy is further behind than the max lag: bring the primary back, or accept the loss with tether volume promote " + v.Name + " --to NODE --force"
	}
	a.deletionPB(pb, v)
	if v.Primary == a.cfg.NodeName || contains(v.ReplicaNodes, a.cfg.NodeName) {
		pb.Path = a.VolumePaths(v.Name).Data
	}
	for _, c := range v.Containers {
		pb.Containers = append(pb.Containers, &tetherpb.RecordedContainer{Name: c.Name, Node: c.Node, Image: c.Image})
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
	case errors.Is(err, cluster.ErrInvalidCommand), errors.Is(err, cluster.ErrInvalidName), errors.Is(err, cluster.ErrInvalidReplicas):
		return codes.InvalidArgument
	case errors.Is(err, context.DeadlineExceeded):
		return codes.DeadlineExceeded
	default:
		return codes.FailedPrecondition
	}
}
