package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/tether-io/tether/cluster"
	"github.com/tether-io/tether/replication"
	"github.com/tether-io/tether/volumedriver"
)

// Docker volume driver defaults.
const (
	// DriverSocketAuto asks ResolveDriverSocket to pick the default.
	DriverSocketAuto = "auto"
	// DockerPluginDir is where dockerd looks for legacy plugin sockets.
	DockerPluginDir = "/run/docker/plugins"
	// DefaultDriverSocket makes the driver's name "tether".
	DefaultDriverSocket = DockerPluginDir + "/tether.sock"
	// driverStateFile keeps the driver's mount table in the data dir.
	driverStateFile = "driver.json"
	// driverOpTimeout bounds a catalog change made for Docker; dockerd
	// waits 1 to 2 minutes.
	driverOpTimeout = 30 * time.Second
)

// ResolveDriverSocket turns the --driver-socket flag into a path: "auto"
// means DefaultDriverSocket when this process runs as root and dockerd's
// plugin directory exists (a Docker host), otherwise no driver; why says
// which, for the log.
func ResolveDriverSocket(flag string, euid int, pluginDirExists bool) (path, why string) {
	if flag != DriverSocketAuto {
		if flag == "" {
			return "", "the Docker volume driver is off (--driver-socket \"\")"
		}
		return flag, "the Docker volume driver serves --driver-socket"
	}
	switch {
	case euid != 0:
		return "", "the Docker volume driver is off: not running as root (dockerd's plugin socket directory needs root); set --driver-socket to serve one"
	case !pluginDirExists:
		return "", "the Docker volume driver is off: " + DockerPluginDir + " does not exist (no Docker here?); set --driver-socket to serve one"
	}
	return DefaultDriverSocket, "the Docker volume driver serves its default socket"
}

// driverNameRE accepts a plugin reference: NAME[:TAG], NAME possibly with
// a registry path.
var driverNameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._/-]{0,127}(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?$`)

func (c *Config) validateDriver() error {
	if c.DriverSocket != "" {
		if !filepath.IsAbs(c.DriverSocket) || !strings.HasSuffix(c.DriverSocket, ".sock") {
			return fmt.Errorf("--driver-socket %q: want an absolute path ending in .sock (the file name is the driver's name)", c.DriverSocket)
		}
	}
	if c.DriverName != "" && !driverNameRE.MatchString(c.DriverName) {
		return fmt.Errorf("--driver-name %q: want a Docker plugin name such as tether or tether:latest", c.DriverName)
	}
	if c.VolumeRetention < 0 {
		return fmt.Errorf("--volume-retention %s: must not be negative", c.VolumeRetention)
	}
	return nil
}

// DriverName is the Docker volume driver name this agent serves ("" when
// it serves none): Config.DriverName, else the socket's file name without
// .sock. Docker reports it with each mount, which is how the fencer, the
// freezer and the container keeper find this driver's containers.
func (a *Agent) DriverName() string {
	switch {
	case a.cfg.DriverSocket == "":
		return ""
	case a.cfg.DriverName != "":
		return a.cfg.DriverName
	}
	return strings.TrimSuffix(filepath.Base(a.cfg.DriverSocket), ".sock")
}

func (a *Agent) startDriver() error {
	if a.cfg.DriverSocket == "" {
		return nil
	}
	f, err := NewFencer(FencerConfig{Driver: a.DriverName(), Host: a.cfg.DockerHost, Logger: a.log.With("component", "fencer")})
	if err != nil {
		return fmt.Errorf("container fencer: %w", err)
	}
	a.fencer = f
	d, err := volumedriver.New(volumedriver.Config{
		Backend:   &driverBackend{a: a},
		StatePath: filepath.Join(a.cfg.DataDir, driverStateFile),
		Logger:    a.log.With("component", "volumedriver"),
		InUse:     f.InUse,
	})
	if err != nil {
		return fmt.Errorf("docker volume driver: %w", err)
	}
	if err := d.Start(a.cfg.DriverSocket); err != nil {
		return fmt.Errorf("docker volume driver: %w", err)
	}
	a.driver = d
	a.keeper = newContainerKeeper(a, f.cli)
	a.wg.Add(2)
	go func() { defer a.wg.Done(); a.forgetStaleMounts(a.ctx) }()
	go func() { defer a.wg.Done(); a.keeper.run(a.ctx) }()
	return nil
}

// engineRetry paces the wait for the Docker Engine's API at start.
const engineRetry = 2 * time.Second

// forgetStaleMounts, once the Docker Engine answers, drops the mounts this
// host still counts for volumes that no container uses: those of
// containers that stopped while the agent was down (a crash, a host
// reboot), for which Docker sent no Unmount. It never runs before the
// Engine serves its API: dockerd calls the driver while it starts.
func (a *Agent) forgetStaleMounts(ctx context.Context) {
	if len(a.driver.MountedVolumes()) == 0 {
		return
	}
	for {
		pctx, cancel := context.WithTimeout(ctx, engineRetry)
		err := a.fencer.Ping(pctx)
		cancel()
		if err == nil {
			break
		}
		a.log.Debug("waiting for the Docker Engine to check the volumes' mounts", "err", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(engineRetry):
		}
	}
	for _, v := range a.driver.MountedVolumes() {
		cctx, cancel := context.WithTimeout(ctx, driverOpTimeout)
		_, err := a.driver.ForgetStaleMounts(cctx, v, a.fencer.InUse)
		cancel()
		if err != nil {
			a.log.Warn("could not check the volume's mounts with the Docker Engine", "volume", v, "err", err)
		}
	}
}

// fenceContainers stops, in the background, this host's containers that
// use volume (its lease lapsed: another host may be promoted). a.mu may be
// held; the reconcile loop that calls it keeps a.wg above zero.
func (a *Agent) fenceContainers(volume string) {
	if a.fencer == nil {
		return
	}
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		ctx, cancel := context.WithTimeout(a.ctx, 2*time.Minute)
		defer cancel()
		stopped, err := a.fencer.StopContainersUsing(ctx, volume)
		if err != nil {
			a.log.Error("FENCING: could not stop every container using the volume", "volume", volume, "stopped", stopped, "err", err)
			return
		}
		a.log.Warn("FENCING: stopped the containers using the volume", "volume", volume, "stopped", stopped)
	}()
}

func (a *Agent) stopDriver() {
	if a.driver != nil {
		a.driver.Close()
	}
	if a.fencer != nil {
		a.fencer.Close()
	}
}

// driverBackend is the agent's side of the Docker volume driver. Get and
// List read only this node's catalog and replication state: no network,
// no Docker API (dockerd calls them while it starts, before it serves its
// API).
type driverBackend struct {
	a *Agent
}

var _ volumedriver.Backend = (*driverBackend)(nil)

func (b *driverBackend) WaitReady(ctx context.Context) error {
	return b.a.cluster.WaitCatalogCurrent(ctx)
}

func (b *driverBackend) Create(ctx context.Context, name string, opts volumedriver.CreateOptions) error {
	ctx, cancel := context.WithTimeout(ctx, driverOpTimeout)
	defer cancel()
	_, err := b.a.cluster.CreateVolumeSpec(ctx, cluster.VolumeSpec{Name: name, Replicas: opts.Replicas, MaxLag: opts.MaxLag, Placement: opts.Placement, Freeze: opts.Freeze})
	switch {
	case err == nil:
		return nil
	case errors.Is(err, cluster.ErrVolumeExists):
		// Docker asks Get before Create; a create racing another one for
		// the same name finds it made: the volume exists, as asked.
		return nil
	case errors.Is(err, cluster.ErrNotEnoughNodes):
		return fmt.Errorf("%w (ask for fewer copies with -o replicas=N)", err)
	}
	return err
}

func (b *driverBackend) Remove(ctx context.Context, name string) error {
	ctx, cancel := context.WithTimeout(ctx, driverOpTimeout)
	defer cancel()
	if err := b.a.checkUnmounted(ctx, name); err != nil {
		return err
	}
	v, err := b.a.cluster.SoftDeleteVolume(ctx, name)
	if errors.Is(err, cluster.ErrNoVolume) {
		return nil // already gone: let Docker forget it too
	}
	if err != nil {
		return err
	}
	b.a.log.Info("volume deleted; it is kept for the retention period",
		"volume", name, "purge_after", v.DeletedAt().Add(b.a.cluster.Retention()), "undo", "tether volume undelete "+name)
	return nil
}

func (b *driverBackend) Get(name string) (volumedriver.Volume, bool) {
	v, ok := b.a.cluster.Volume(name)
	if !ok || v.Deleted() {
		return volumedriver.Volume{}, false
	}
	return b.a.driverVolume(v), true
}

func (b *driverBackend) List() []volumedriver.Volume {
	var out []volumedriver.Volume
	for _, v := range b.a.cluster.Volumes() {
		if !v.Deleted() {
			out = append(out, b.a.driverVolume(v))
		}
	}
	return out
}

func (b *driverBackend) Mount(ctx context.Context, name string) (string, error) {
	a := b.a
	v, ok := a.cluster.Volume(name)
	if !ok || v.Deleted() {
		return "", fmt.Errorf("no such volume: %s", name)
	}
	moveHere, err := decideMount(v, a.cfg.NodeName, a.memberHealth())
	if err != nil {
		return "", err
	}
	if moveHere {
		if v, err = a.moveForMount(ctx, v); err != nil {
			return "", err
		}
	}
	if err := a.waitLease(ctx, v.Name); err != nil {
		return "", err
	}
	p, err := a.prepareVolume(v)
	if err != nil {
		return "", err
	}
	if a.keeper != nil {
		a.keeper.hint(name) // record the container if it asks for failover
	}
	return p.Data, nil
}

// moveForMount moves v to this host so that a container here can mount
// it (planned move: no loss; refused by the primary while it has the
// volume mounted).
func (a *Agent) moveForMount(ctx context.Context, v cluster.Volume) (cluster.Volume, error) {
	a.log.Info("moving volume here for a Docker mount", "volume", v.Name, "from", v.Primary)
	if _, err := a.Move(ctx, v.Name, a.cfg.NodeName, DefaultMoveWait); err != nil {
		return v, fmt.Errorf("volume %s is served by host %s; moving it here for this mount failed: %w", v.Name, v.Primary, err)
	}
	nv, ok := a.cluster.Volume(v.Name)
	if !ok || nv.Primary != a.cfg.NodeName {
		return v, fmt.Errorf("volume %s: moved, but this host's catalog does not show it as the primary yet; try again", v.Name)
	}
	return nv, nil
}

// leaseWait bounds how long a mount waits for this host's primary lease
// (just after the agent started, or during a Raft election).
const leaseWait = 10 * time.Second

// waitLease waits until this host holds its primary lease: a primary
// without one may already have been replaced, so it takes no new mounts.
func (a *Agent) waitLease(ctx context.Context, volume string) error {
	ctx, cancel := context.WithTimeout(ctx, leaseWait)
	defer cancel()
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for !a.lease.valid() {
		select {
		case <-ctx.Done():
			return fmt.Errorf("volume %s: this host is its primary but holds no lease (no Raft quorum confirmed it within %s); it takes no new mounts until a quorum is reachable again", volume, leaseWait)
		case <-t.C:
		}
	}
	return nil
}

// decideMount says how node may mount v now: here (it is the primary),
// after moving the volume here (it holds a replica and the primary is
// alive: the volume follows its container; the primary refuses if it has
// the volume mounted), or not at all, with the reason.
func decideMount(v cluster.Volume, node string, health map[string]string) (moveHere bool, err error) {
	switch {
	case v.Primary == node:
		return false, nil
	case v.Primary == "":
		return false, fmt.Errorf("volume %s has no primary host", v.Name)
	}
	switch health[v.Primary] {
	case cluster.HealthDead, cluster.HealthLeft:
		for _, r := range v.ReplicaNodes {
			if health[r] == cluster.HealthAlive {
				return false, fmt.Errorf("volume %s: its primary host %s is down and no replica has been promoted yet; tether fails it over by itself, try again in a few seconds (then mount it on the new primary)", v.Name, v.Primary)
			}
		}
		return false, fmt.Errorf("volume %s: its primary host %s is down and no replica of it is alive to take over (replicas: %s)", v.Name, v.Primary, strings.Join(v.ReplicaNodes, ", "))
	case cluster.HealthAlive:
	default:
		return false, fmt.Errorf("volume %s is served by host %s, which is not answering right now; try again, or mount it there", v.Name, v.Primary)
	}
	if !slices.Contains(v.ReplicaNodes, node) {
		return false, fmt.Errorf("volume %s is served by host %s and this host holds no copy of it (replicas: %s); mount it on one of those", v.Name, v.Primary, strings.Join(v.ReplicaNodes, ", "))
	}
	return true, nil
}

// memberHealth maps member names to their gossip health.
func (a *Agent) memberHealth() map[string]string {
	h := map[string]string{}
	for _, m := range a.cluster.Members() {
		h[m.Name] = m.Health
	}
	return h
}

// replicaLag is a replica's line in docker volume inspect's lag.
func replicaLag(r replication.ReplicaState) string {
	switch {
	case r.Err != "":
		return "error: " + r.Err
	case !r.Connected:
		return "disconnected"
	}
	s := r.Lag.Round(time.Millisecond).String()
	if fs := replication.FullSyncText(r.FullSyncDone, r.FullSyncTotal); fs != "" {
		s += " (full sync " + fs + ")"
	}
	return s
}

// driverVolume is what Docker sees of v: the data directory as Mountpoint
// on the primary, and tether's state in Status (docker volume inspect).
func (a *Agent) driverVolume(v cluster.Volume) volumedriver.Volume {
	out := volumedriver.Volume{Name: v.Name, CreatedAt: v.CreatedAt, Status: driverStatus(v)}
	if v.Primary == a.cfg.NodeName {
		out.Mountpoint = a.VolumePaths(v.Name).Data
		if st, ok := a.primaryStatus(v.Name); ok {
			lag := map[string]string{}
			for _, r := range st.Replicas {
				lag[r.Node] = replicaLag(r)
			}
			out.Status["lag"] = lag
			if st.CutError != "" {
				out.Status["cutFailing"] = st.CutError
			}
		} else {
			out.Status["lag"] = "replication is starting on this host"
		}
	} else {
		out.Status["lag"] = "known on the primary " + v.Primary + " (tether volume inspect " + v.Name + ")"
	}
	if a.driver != nil {
		out.Status["mountsHere"] = a.driver.MountCount(v.Name)
	}
	return out
}

// driverStatus is the catalog part of a volume's Docker Status.
func driverStatus(v cluster.Volume) map[string]any {
	return map[string]any{
		"primary":  v.Primary,
		"replicas": strings.Join(v.ReplicaNodes, ","),
		"copies":   v.Replicas,
		"epoch":    v.Epoch,
		"state":    v.State,
	}
}

// pluginDirExists reports whether dockerd's plugin directory is here.
func pluginDirExists() bool {
	fi, err := os.Stat(DockerPluginDir)
	return err == nil && fi.IsDir()
}

// DefaultDriverSocketFor resolves --driver-socket for this process.
func DefaultDriverSocketFor(flag string) (path, why string) {
	return ResolveDriverSocket(flag, os.Geteuid(), pluginDirExists())
}

// ErrVolumeInUse refuses to hand a volume to another host while containers
// here have it mounted: a volume has one writer.
var ErrVolumeInUse = errors.New("agent: the volume is mounted on its primary host")

// refuseIfMounted fails when Docker containers on this host mount volume.
func (a *Agent) refuseIfMounted(volume string) error {
	if n := a.mountsHere(volume); n > 0 {
		return a.inUseError(volume, n)
	}
	return nil
}

// whileUnmounted runs fn (a move's commit) only if no container on this
// host mounts volume, and keeps new mounts of it waiting meanwhile.
func (a *Agent) whileUnmounted(volume string, fn func() error) error {
	if a.driver == nil {
		return fn()
	}
	return a.driver.Exclusive(volume, func(mounts int) error {
		if mounts > 0 {
			return a.inUseError(volume, mounts)
		}
		return fn()
	})
}

func (a *Agent) inUseError(volume string, n int) error {
	return fmt.Errorf("%w: volume %s is mounted %d time(s) on host %s and has a single writer; stop the containers using it there first", ErrVolumeInUse, volume, n, a.cfg.NodeName)
}
