package agent

import (
	"context"
	"errors"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tether-io/tether/cluster"
	"github.com/tether-io/tether/proto/tetherpb"
)

// catalogOpTimeout bounds a catalog change asked for by the CLI.
const catalogOpTimeout = 10 * time.Second

func (s *controlServer) VolumeRemove(ctx context.Context, req *tetherpb.VolumeRemoveRequest) (*tetherpb.VolumeRemoveResponse, error) {
	if n := s.a.mountsHere(req.Name); n > 0 {
		return nil, status.Errorf(codes.FailedPrecondition, "volume %s is mounted %d time(s) on this host; stop the containers using it first", req.Name, n)
	}
	ctx, cancel := context.WithTimeout(ctx, catalogOpTimeout)
	defer cancel()
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
