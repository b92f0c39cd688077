package agent

import (
	"context"
	"errors"
	"fmt"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tether-io/tether/cluster"
	"github.com/tether-io/tether/proto/tetherpb"
)

// catalogOpTimeout bounds a catalog change asked for by the CLI.
const catalogOpTimeout = 10 * time.Second

func (s *controlServer) VolumeRemove(ctx context.Context, req *tetherpb.VolumeRemoveRequest) (*tetherpb.VolumeRemoveResponse, error) {
	ctx, cancel := context.WithTimeout(ctx, catalogOpTimeout)
	defer cancel()
	if err := s.a.checkUnmounted(ctx, req.Name); err != nil {
		return nil, status.Error(codes.FailedPrecondition, err.Error())
	}
	v, err := s.a.cluster.SoftDeleteVolume(ctx, req.Name)
	if err != nil {
		return nil, status.Error(deleteErrCode(err), err.Error())
	}
	return &tetherpb.VolumeRemoveResponse{Volume: s.a.volumePB(v)}, nil
}

func (s *controlServer) VolumeUndelete(ctx context.Context, req *tetherpb.VolumeUndeleteRequest) (*tetherpb.VolumeUndeleteResponse, error) {
	ctx, cancel := context.WithTimeout(ctx, catalogOpTimeout)
	defer cancel()
	v, err := s.a.cluster.UndeleteVolume(ctx, req.Name)
	if err != nil {
		return nil, status.Error(deleteErrCode(err), err.Error())
	}
	return &tetherpb.VolumeUndeleteResponse{Volume: s.a.volumePB(v)}, nil
}

func (s *controlServer) VolumePurge(ctx context.Context, req *tetherpb.VolumePurgeRequest) (*tetherpb.VolumePurgeResponse, error) {
	ctx, cancel := context.WithTimeout(ctx, catalogOpTimeout)
	defer cancel()
	if err := s.a.cluster.PurgeVolume(ctx, req.Name); err != nil {
		return nil, status.Error(deleteErrCode(err), err.Error())
	}
	return &tetherpb.VolumePurgeResponse{}, nil
}

func deleteErrCode(err error) codes.Code {
	switch {
	case errors.Is(err, cluster.ErrInvalidName):
		return codes.InvalidArgument
	case errors.Is(err, cluster.ErrNotDeleted), errors.Is(err, cluster.ErrVolumeDeleted):
		return codes.FailedPrecondition
	}
	return errCode(err)
}

// mountsHere is how many Docker mounts of volume this host's driver holds.
func (a *Agent) mountsHere(volume string) int {
	if a.driver == nil {
		return 0
	}
	return a.driver.MountCount(volume)
}

// deletionPB fills the deletion fields of a volume's record.
func (a *Agent) deletionPB(pb *tetherpb.Volume, v cluster.Volume) {
	if v.Deleted() {
		pb.DeletedUnixNano = v.DeletedUnixNano
		pb.PurgeAfterUnixNano = v.DeletedAt().Add(a.cluster.Retention()).UnixNano()
	}
}

// checkUnmounted refuses to delete a volume that containers have mounted,
// here or on its primary (the only other host that can mount it). When the
// primary cannot be asked (or this node's catalog still names a former
// primary, which no longer serves it), the delete goes ahead: it is
// reversible and the volume keeps being served until it is purged.
func (a *Agent) checkUnmounted(ctx context.Context, name string) error {
	if n := a.mountsHere(name); n > 0 {
		return fmt.Errorf("volume %s is mounted %d time(s) on this host; stop the containers using it first", name, n)
	}
	v, ok := a.cluster.Volume(name)
	if !ok || v.Primary == "" || v.Primary == a.cfg.NodeName {
		return nil
	}
	pc, err := a.dialPeer(v.Primary)
	if err != nil {
		a.log.Warn("deleting a volume without asking its primary whether it is mounted", "volume", name, "primary", v.Primary, "err", err)
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	st, err := pc.PrimaryStatus(ctx, &tetherpb.PrimaryStatusRequest{Volume: name})
	if err != nil {
		a.log.Warn("deleting a volume without knowing whether its primary has it mounted", "volume", name, "primary", v.Primary, "err", err)
		return nil
	}
	if st.DockerMounts > 0 {
		return fmt.Errorf("volume %s is mounted %d time(s) on its primary host %s; stop the containers using it there first", name, st.DockerMounts, v.Primary)
	}
	return nil
}
