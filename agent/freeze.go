package agent

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	cerrdefs "github.com/containerd/errdefs"
	"github.com/moby/moby/client"

	"github.com/tether-io/tether/replication"
)

// thawTimeout bounds unpausing: containers must not stay frozen because
// the Engine is slow to answer.
const thawTimeout = 10 * time.Second

// containerFreezer is the replication Freezer of a volume with the freeze
// option: when writers never go quiet enough for a point-in-time cut, the
// primary pauses (cgroup freezer, through the Engine) the containers that
// use the volume through this agent's driver while the cut's last round is
// read, then unpauses them.
type containerFreezer struct {
	f      *Fencer
	volume string
}

var _ replication.Freezer = containerFreezer{}

// pauseTimeout bounds the Engine's answer to the pause calls of one
// freeze; it is not the freeze's bound (MaxFreeze counts from when every
// writer is paused), since the cgroup freezer may take a while to stop a
// process in the middle of I/O.
const pauseTimeout = 5 * time.Second

// Freeze pauses the volume's running containers. If one cannot be paused,
// every container it tried to pause is unpaused (a pause call that timed
// out may still have taken effect in the Engine: a container must never stay
// frozen) and the error returned: the cut then ships marked file-consistent
// only.
func (z containerFreezer) Freeze(ctx context.Context) (func(), error) {
	ctx, cancel := context.WithTimeout(ctx, pauseTimeout)
	defer cancel()
	ids, err := z.f.runningUsing(ctx, z.volume)
	if err != nil {
		return nil, err
	}
	var tried []string
	thaw := func(failed string) {
		tctx, cancel := context.WithTimeout(context.Background(), thawTimeout)
		defer cancel()
		for _, id := range tried {
			_, err := z.f.cli.ContainerUnpause(tctx, id, client.ContainerUnpauseOptions{})
			// The one whose pause failed may never have been paused: the
			// Engine (20.10) answers 500 "Container ... is not paused".
			if err != nil && !(id == failed && (cerrdefs.IsConflict(err) || strings.Contains(err.Error(), "is not paused"))) {
				z.f.log.Error("could not unpause a container after a cut: unpause it by hand", "volume", z.volume, "container", id, "err", err)
			}
		}
	}
	for _, id := range ids {
		tried = append(tried, id)
		if err := z.pause(ctx, id); err != nil {
			thaw(id)
			return nil, fmt.Errorf("freezing volume %s: pausing container %s: %w", z.volume, id, err)
		}
	}
	return func() { thaw("") }, nil
}

// pauseAttempts is how often a pause the cgroup freezer could not complete
// is tried: with cgroup v1 the freezer gives up when a task stays in
// uninterruptible sleep (an fsync), and runc answers "unable to freeze";
// a moment later it usually succeeds.
const pauseAttempts = 3

func (z containerFreezer) pause(ctx context.Context, id string) error {
	for attempt := 1; ; attempt++ {
		_, err := z.f.cli.ContainerPause(ctx, id, client.ContainerPauseOptions{})
		if err == nil || attempt == pauseAttempts || !strings.Contains(err.Error(), "unable to freeze") {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// runningUsing lists the running (not paused) containers that mount volume
// through the fencer's driver.
func (f *Fencer) runningUsing(ctx context.Context, volume string) ([]string, error) {
	res, err := f.cli.ContainerList(ctx, client.ContainerListOptions{Filters: make(client.Filters).Add("volume", volume).Add("status", "running")})
	if err != nil {
		return nil, fmt.Errorf("listing the containers of volume %s: %w", volume, err)
	}
	var ids []string
	for _, c := range res.Items {
		if usesVolume(c, volume, f.driver) {
			ids = append(ids, c.ID)
		}
	}
	return ids, nil
}

// NewContainerFreezer returns the Freezer that pauses, through f's Docker
// client, the containers using volume of f's driver.
func NewContainerFreezer(f *Fencer, volume string) replication.Freezer {
	return containerFreezer{f: f, volume: volume}
}

// freezerFor returns the Freezer for a volume with the freeze option, nil
// when the option is off or this agent serves no Docker driver.
func (a *Agent) freezerFor(volume string, freeze bool) (replication.Freezer, error) {
	if !freeze {
		return nil, nil
	}
	if a.fencer == nil {
		return nil, errors.New("the freeze option needs the Docker volume driver (--driver-socket) on this host")
	}
	return NewContainerFreezer(a.fencer, volume), nil
}
