package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/api/types/mount"
	"github.com/moby/moby/client"
)

// DefaultFenceStopTimeout is how long a fenced container gets to stop
// after SIGTERM before the engine kills it.
const DefaultFenceStopTimeout = 10 * time.Second

// FencerConfig configures a Fencer. The Docker Engine is found from the
// environment (DOCKER_HOST, default unix:///var/run/docker.sock).
type FencerConfig struct {
	// Driver is the volume driver whose volumes are fenced (this agent's
	// DriverName()); containers using a same-named volume of another
	// driver are left alone.
	Driver      string
	StopTimeout time.Duration
	Logger      *slog.Logger
	// Host is the Engine's API address; empty: $DOCKER_HOST, else the
	// default socket.
	Host string
}

// Fencer stops this host's containers that use a volume this host no
// longer owns (lease lost, newer epoch seen), so that they cannot keep
// writing to a copy that is no longer the primary's. Never call it on the
// path that answers dockerd (it uses the Docker API).
type Fencer struct {
	cli     *client.Client
	driver  string
	timeout time.Duration
	log     *slog.Logger
}

// NewFencer builds a Fencer; it does not contact Docker yet.
func NewFencer(cfg FencerConfig) (*Fencer, error) {
	if cfg.Driver == "" {
		return nil, errors.New("fencer: a volume driver name is required")
	}
	if cfg.StopTimeout <= 0 {
		cfg.StopTimeout = DefaultFenceStopTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	opts := []client.Opt{client.FromEnv}
	if cfg.Host != "" {
		opts = append(opts, client.WithHost(cfg.Host))
	}
	cli, err := client.New(opts...)
	if err != nil {
		return nil, fmt.Errorf("fencer: docker client: %w", err)
	}
	return &Fencer{cli: cli, driver: cfg.Driver, timeout: cfg.StopTimeout, log: cfg.Logger}, nil
}

// Ping checks that the Docker Engine serves its API.
func (f *Fencer) Ping(ctx context.Context) error {
	if _, err := f.cli.Ping(ctx, client.PingOptions{}); err != nil {
		return fmt.Errorf("the Docker Engine does not answer: %w", err)
	}
	return nil
}

// Close releases the Docker client.
func (f *Fencer) Close() error { return f.cli.Close() }

// StopContainersUsing stops every running container on this host that
// mounts volume of the fencer's driver: SIGTERM, then SIGKILL from the
// engine after the stop timeout, and a direct kill if the stop call itself
// fails. It returns the names of the containers it stopped; the error
// joins every container it could not stop.
func (f *Fencer) StopContainersUsing(ctx context.Context, volume string) (stopped []string, err error) {
	res, err := f.cli.ContainerList(ctx, client.ContainerListOptions{Filters: make(client.Filters).Add("volume", volume)})
	if err != nil {
		return nil, fmt.Errorf("fencing volume %s: listing its containers: %w", volume, err)
	}
	var errs []error
	for _, c := range res.Items {
		if !usesVolume(c, volume, f.driver) {
			continue
		}
		name := containerName(c)
		if err := f.stop(ctx, c.ID); err != nil {
			errs = append(errs, fmt.Errorf("container %s: %w", name, err))
			continue
		}
		f.log.Warn("fenced: stopped a container using a volume this host no longer owns", "volume", volume, "container", name)
		stopped = append(stopped, name)
	}
	if len(errs) > 0 {
		return stopped, fmt.Errorf("fencing volume %s: %w", volume, errors.Join(errs...))
	}
	return stopped, nil
}

func (f *Fencer) stop(ctx context.Context, id string) error {
	secs := int(f.timeout.Round(time.Second) / time.Second)
	stopCtx, cancel := context.WithTimeout(ctx, f.timeout+30*time.Second)
	defer cancel()
	_, err := f.cli.ContainerStop(stopCtx, id, client.ContainerStopOptions{Timeout: &secs})
	if err == nil {
		return nil
	}
	if _, kerr := f.cli.ContainerKill(ctx, id, client.ContainerKillOptions{Signal: "SIGKILL"}); kerr != nil {
		return fmt.Errorf("stop: %w; kill: %w", err, kerr)
	}
	return nil
}

// InUse reports whether a container of this host that may hold a mount of
// volume through the fencer's driver exists: created (Docker mounts while
// it starts), running, paused or restarting. Exited and dead containers
// hold none.
func (f *Fencer) InUse(ctx context.Context, volume string) (bool, error) {
	filters := make(client.Filters).Add("volume", volume).Add("status", "created", "running", "paused", "restarting")
	res, err := f.cli.ContainerList(ctx, client.ContainerListOptions{All: true, Filters: filters})
	if err != nil {
		return false, fmt.Errorf("listing the containers of volume %s: %w", volume, err)
	}
	for _, c := range res.Items {
		if usesVolume(c, volume, f.driver) {
			return true, nil
		}
	}
	return false, nil
}

// usesVolume reports whether c mounts volume of driver. Docker's volume
// filter also matches a mount's destination path, hence the check.
func usesVolume(c container.Summary, volume, driver string) bool {
	for _, m := range c.Mounts {
		if m.Type == mount.TypeVolume && m.Name == volume && m.Driver == driver {
			return true
		}
	}
	return false
}

func containerName(c container.Summary) string {
	if len(c.Names) > 0 {
		return strings.TrimPrefix(c.Names[0], "/")
	}
	return c.ID[:min(12, len(c.ID))]
}
