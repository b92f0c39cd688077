package agent

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tether-io/tether/cluster"
	"github.com/tether-io/tether/proto/tetherpb"
)

// Planned moves.
//
// A move hands a volume from its primary to one of its replicas with zero
// loss: the primary waits until the volume has been quiet for quietWindow
// and the target has made the newest batch durable, then commits the new
// owner in the next epoch. A write that lands in the instant between that
// check and the commit is not lost: the old primary, now a replica, sets
// it aside in its quarantine when the new primary's first batch arrives.

// quietWindow is how long a volume must see no change before a move.
const quietWindow = 500 * time.Millisecond

// DefaultMoveWait bounds how long a move waits for the volume to go quiet.
const DefaultMoveWait = 30 * time.Second

// ErrWritersActive means a move gave up because the volume kept changing.
var ErrWritersActive = errors.New("agent: the volume is still being written")

// Move makes node to the primary of volume name, without loss. It runs on
// the volume's current primary (forwarded there from any node).
func (a *Agent) Move(ctx context.Context, name, to string, wait time.Duration) (cluster.Volume, error) {
	if wait <= 0 {
		wait = DefaultMoveWait
	}
	v, ok := a.cluster.Volume(name)
	switch {
	case !ok:
		return cluster.Volume{}, fmt.Errorf("%w: %q", cluster.ErrNoVolume, name)
	case v.Primary == to:
		return v, nil
	case !slices.Contains(v.ReplicaNodes, to):
		return cluster.Volume{}, fmt.Errorf("%w: %s holds no copy of %q (replicas: %v); a move goes to a replica", cluster.ErrInvalidCommand, to, name, v.ReplicaNodes)
	case v.Primary != a.cfg.NodeName:
		return a.forwardMove(ctx, v.Primary, name, to, wait)
	}
	if err := a.refuseIfMounted(name); err != nil {
		return cluster.Volume{}, err
	}
	if err := a.waitQuiet(ctx, name, to, wait); err != nil {
		return cluster.Volume{}, err
	}
	replicas := []string{}
	for _, r := range v.ReplicaNodes {
		if r != to {
			replicas = append(replicas, r)
		}
	}
	replicas = append(replicas, v.Primary)
	cmd := cluster.SetPrimary{Name: name, Primary: to, ReplicaNodes: replicas, Epoch: v.Epoch + 1, ExpectEpoch: v.Epoch}
	err := a.whileUnmounted(name, func() error { // single writer: no Docker mount here may race the commit
		_, err := a.cluster.Apply(ctx, cmd)
		return err
	})
	if err != nil {
		return cluster.Volume{}, fmt.Errorf("committing the move of %q to %s: %w", name, to, err)
	}
	a.log.Info("volume moved", "volume", name, "from", a.cfg.NodeName, "to", to, "epoch", cmd.Epoch)
	nv, _ := a.cluster.Volume(name)
	return nv, nil
}

// waitQuiet waits until volume name's replication has been idle for
// quietWindow with replica to holding the newest batch.
func (a *Agent) waitQuiet(ctx context.Context, name, to string, wait time.Duration) error {
	deadline := time.Now().Add(wait)
	var quietSince time.Time
	var lastSeq uint64
	changes := 0
	why := ""
	for {
		st, ok := a.primaryStatus(name)
		if !ok {
			return fmt.Errorf("this node is not serving %q as primary right now (fenced or starting); see tether status", name)
		}
		caughtUp := false
		for _, r := range st.Replicas {
			if r.Node != to {
				continue
			}
			switch {
			case !r.Connected:
				why = fmt.Sprintf("replica %s is not connected (%s)", to, r.Err)
			case r.AckedSeq == 0 || r.Lag > 0:
				why = fmt.Sprintf("replica %s is %s behind", to, r.Lag.Round(time.Millisecond))
			default:
				caughtUp = true
			}
		}
		if st.Seq != lastSeq {
			if lastSeq != 0 {
				changes++
			}
			lastSeq = st.Seq
			quietSince = time.Time{}
		}
		switch {
		case !caughtUp:
			quietSince = time.Time{}
		case quietSince.IsZero():
			quietSince = time.Now()
		case time.Since(quietSince) >= quietWindow:
			return nil
		}
		if time.Now().After(deadline) {
			if changes > 0 {
				return fmt.Errorf("%w: %q changed %d times in the last %s; stop the containers using it, then move it (a move waits at most --wait for the volume to go quiet)", ErrWritersActive, name, changes, wait)
			}
			return fmt.Errorf("moving %q: gave up after %s: %s", name, wait, why)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("moving %q: %w", name, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func (a *Agent) forwardMove(ctx context.Context, primary, name, to string, wait time.Duration) (cluster.Volume, error) {
	pc, err := a.dialPeer(primary)
	if err != nil {
		return cluster.Volume{}, fmt.Errorf("reaching the primary %s of %q: %w", primary, name, err)
	}
	resp, err := pc.Move(ctx, &tetherpb.VolumeMoveRequest{Name: name, To: to, WaitMs: wait.Milliseconds()})
	if err != nil {
		return cluster.Volume{}, fmt.Errorf("primary %s: %s", primary, status.Convert(err).Message())
	}
	if err := a.cluster.WaitEpoch(ctx, name, resp.Volume.GetEpoch()); err != nil {
		return cluster.Volume{}, err
	}
	v, _ := a.cluster.Volume(name)
	return v, nil
}

// Promote is an operator's failover to node to, run on the leader.
func (a *Agent) Promote(ctx context.Context, name, to string, force bool) (cluster.Volume, time.Duration, error) {
	if a.cluster.IsLeader() {
		return a.cluster.Promote(ctx, name, to, force)
	}
	leader, _ := a.cluster.Leader()
	if leader == "" {
		return cluster.Volume{}, 0, cluster.ErrNoLeader
	}
	pc, err := a.dialPeer(leader)
	if err != nil {
		return cluster.Volume{}, 0, err
	}
	resp, err := pc.Promote(ctx, &tetherpb.VolumePromoteRequest{Name: name, To: to, Force: force})
	if err != nil {
		return cluster.Volume{}, 0, cluster.ParseError(status.Convert(err).Message())
	}
	if err := a.cluster.WaitEpoch(ctx, name, resp.Volume.GetEpoch()); err != nil {
		return cluster.Volume{}, 0, err
	}
	v, _ := a.cluster.Volume(name)
	return v, time.Duration(resp.BehindMs) * time.Millisecond, nil
}

func (s *peerServer) Promote(ctx context.Context, req *tetherpb.VolumePromoteRequest) (*tetherpb.VolumePromoteResponse, error) {
	if !s.a.cluster.IsLeader() {
		return nil, status.Error(codes.FailedPrecondition, cluster.ErrNotLeader.Error())
	}
	v, behind, err := s.a.cluster.Promote(ctx, req.Name, req.To, req.Force)
	if err != nil {
		return nil, status.Error(errCode(err), err.Error())
	}
	return &tetherpb.VolumePromoteResponse{Volume: s.a.volumePB(v), BehindMs: behind.Milliseconds()}, nil
}

func (s *peerServer) Move(ctx context.Context, req *tetherpb.VolumeMoveRequest) (*tetherpb.VolumeMoveResponse, error) {
	t0 := time.Now()
	v, err := s.a.Move(ctx, req.Name, req.To, time.Duration(req.WaitMs)*time.Millisecond)
	if err != nil {
		return nil, status.Error(errCode(err), err.Error())
	}
	return &tetherpb.VolumeMoveResponse{Volume: s.a.volumePB(v), TookMs: time.Since(t0).Milliseconds()}, nil
}
