package agent

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/api/types/mount"
	"github.com/moby/moby/api/types/network"
	"github.com/moby/moby/client"

	"github.com/tether-io/tether/cluster"
)

// containerPassInterval is how often the container keeper records and
// re-creates without a hint: hints (a mount) are events, the pass is the
// truth.
const containerPassInterval = 5 * time.Second

// RecreatedFromLabel marks a container tether created again after a
// failover; its value is the host the container ran on before.
const RecreatedFromLabel = "tether.recreated-from"

// containerKeeper records the standalone containers with the failover
// label that use this host's volumes, and creates them again on this host
// when it becomes a volume's primary because their host died. It uses the
// Docker API only from its own goroutine, never on the path that answers
// dockerd (which may not serve its API yet while it starts).
type containerKeeper struct {
	a   *Agent
	cli *client.Client
	// hints carries volume names just mounted (non-blocking sends; when
	// full, the periodic pass catches up).
	hints chan string

	mu sync.Mutex
	// problems are re-creations that could not happen, by container name,
	// shown in tether status until they succeed or the record goes.
	problems map[string]string
	// created and missingImage count re-creations done and refused for a
	// missing image (metrics).
	created, missingImage int
}

func newContainerKeeper(a *Agent, cli *client.Client) *containerKeeper {
	return &containerKeeper{a: a, cli: cli, hints: make(chan string, 64), problems: map[string]string{}}
}

// hint asks for a pass soon (a container just mounted volume).
func (k *containerKeeper) hint(volume string) {
	select {
	case k.hints <- volume:
	default:
	}
}

// run is the keeper's loop; it ends with ctx.
func (k *containerKeeper) run(ctx context.Context) {
	t := time.NewTicker(containerPassInterval)
	defer t.Stop()
	lastErr := ""
	for {
		select {
		case <-ctx.Done():
			return
		case <-k.hints:
			// A mount precedes the container's start by a moment; the
			// engine lists it as created already.
		case <-t.C:
		}
		err := k.pass(ctx)
		switch {
		case ctx.Err() != nil:
		case err != nil && err.Error() != lastErr:
			// Once per distinct error (Docker not up yet at boot, a
			// container that cannot be recorded), not every pass.
			k.a.log.Warn("containers with label "+cluster.FailoverLabel+": pass incomplete; retrying every "+containerPassInterval.String(), "err", err)
		case err == nil && lastErr != "":
			k.a.log.Info("containers with label " + cluster.FailoverLabel + ": pass complete again")
		}
		lastErr = ""
		if err != nil {
			lastErr = err.Error()
		}
	}
}

// pass records this host's labelled containers, then re-creates those of
// dead hosts for the volumes this host now serves.
func (k *containerKeeper) pass(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	all, err := k.cli.ContainerList(ctx, client.ContainerListOptions{All: true})
	if err != nil {
		return fmt.Errorf("listing containers: %w", err)
	}
	recErr := k.record(ctx, all.Items)
	return errors.Join(recErr, k.recreate(ctx, all.Items))
}

// record writes the spec of every labelled container on this engine that
// mounts a volume this host serves through its driver, and drops the
// records of this host's containers that no longer exist (docker rm).
func (k *containerKeeper) record(ctx context.Context, items []container.Summary) error {
	a, driver := k.a, k.a.DriverName()
	var errs []error
	for _, v := range a.cluster.Volumes() {
		if v.Primary != a.cfg.NodeName || v.Deleted() {
			continue
		}
		present := map[string]bool{}
		for _, c := range items {
			if c.Labels[cluster.FailoverLabel] != "true" || !usesVolume(c, v.Name, driver) {
				continue
			}
			name := containerName(c)
			present[name] = true
			if err := k.recordOne(ctx, v, c.ID); err != nil {
				errs = append(errs, fmt.Errorf("recording container %s of volume %s: %w", name, v.Name, err))
			}
		}
		for _, s := range v.Containers {
			if s.Node == a.cfg.NodeName && !present[s.Name] {
				if _, err := a.cluster.Apply(ctx, cluster.RemoveContainer{Volume: v.Name, Name: s.Name, Node: s.Node}); err != nil {
					errs = append(errs, fmt.Errorf("dropping the record of removed container %s: %w", s.Name, err))
					continue
				}
				a.log.Info("container removed: no longer re-created after a failover", "volume", v.Name, "container", s.Name)
			}
		}
	}
	return errors.Join(errs...)
}

func (k *containerKeeper) recordOne(ctx context.Context, v cluster.Volume, id string) error {
	ins, err := k.cli.ContainerInspect(ctx, id, client.ContainerInspectOptions{})
	if err != nil {
		return err
	}
	spec := specFromInspect(ins.Container, k.a.cfg.NodeName, k.a.DriverName())
	i := slices.IndexFunc(v.Containers, func(s cluster.ContainerSpec) bool { return s.Name == spec.Name })
	if i >= 0 && v.Containers[i].Equal(spec) {
		return nil
	}
	if err := cluster.ValidateContainerSpec(spec); err != nil {
		return err
	}
	if _, err := k.a.cluster.Apply(ctx, cluster.SetContainer{Volume: v.Name, Spec: spec}); err != nil {
		return err
	}
	k.a.log.Info("recorded container for re-creation after a failover", "volume", v.Name, "container", spec.Name, "image", spec.Image)
	return nil
}

// recreate runs decideRecreate and carries out its plan.
func (k *containerKeeper) recreate(ctx context.Context, items []container.Summary) error {
	a := k.a
	in := recreateInputs{
		node:    a.cfg.NodeName,
		volumes: a.cluster.Volumes(),
		serving: a.servingPrimaries(),
		health:  a.memberHealth(),
		images:  map[string]bool{},
		names:   map[string]bool{},
	}
	for _, c := range items {
		in.names[containerName(c)] = true
		if c.State == container.StateRunning && c.Labels[cluster.FailoverLabel] == "true" {
			in.running = append(in.running, engineContainer{name: containerName(c)})
		}
	}
	for _, v := range in.volumes {
		for _, s := range v.Containers {
			if _, done := in.images[s.Image]; !done && in.serving[v.Name] && s.Node != in.node {
				_, err := k.cli.ImageInspect(ctx, s.Image)
				in.images[s.Image] = err == nil
			}
		}
	}
	p := decideRecreate(in)
	k.mu.Lock()
	old := k.problems
	k.mu.Unlock()
	problems := map[string]string{}
	// Each problem is logged (and a missing image counted) once, when it
	// appears, not on every pass.
	report := func(act recreateAction, msg, why string) bool {
		problems[act.spec.Name] = why
		if old[act.spec.Name] == why {
			return false
		}
		a.log.Error("FAILOVER: "+msg, "volume", act.volume, "container", act.spec.Name, "image", act.spec.Image, "from", act.spec.Node, "reason", why)
		return true
	}
	missing := 0
	for _, act := range p.missingImage {
		if report(act, "cannot re-create a container here: its image is missing", act.why) {
			missing++
		}
	}
	for _, act := range p.nameTaken {
		report(act, "cannot re-create a container here", act.why)
	}
	for _, act := range p.alreadyRunning {
		a.log.Debug("not re-creating a container: a copy is running", "volume", act.volume, "container", act.spec.Name, "reason", act.why)
	}
	var errs []error
	for _, act := range p.create {
		if err := k.createOne(ctx, act); err != nil {
			report(act, "re-creating a container failed; retrying", err.Error())
			errs = append(errs, err)
		}
	}
	k.mu.Lock()
	k.missingImage += missing
	k.problems = problems
	k.mu.Unlock()
	return errors.Join(errs...)
}

// createOne creates and starts act's container through this host's driver
// and moves its record to this host.
func (k *containerKeeper) createOne(ctx context.Context, act recreateAction) error {
	a := k.a
	opts := createOptions(act.spec, act.name, a.DriverName())
	res, err := k.cli.ContainerCreate(ctx, opts)
	if err != nil {
		return fmt.Errorf("creating container %s: %w", act.name, err)
	}
	if _, err := k.cli.ContainerStart(ctx, res.ID, client.ContainerStartOptions{}); err != nil {
		// Leave nothing half made: the next pass tries again.
		if _, rerr := k.cli.ContainerRemove(ctx, res.ID, client.ContainerRemoveOptions{Force: true}); rerr != nil {
			err = fmt.Errorf("%w (and removing it: %w)", err, rerr)
		}
		return fmt.Errorf("starting container %s: %w", act.name, err)
	}
	k.mu.Lock()
	k.created++
	k.mu.Unlock()
	a.log.Warn("FAILOVER: re-created and started a container whose host died", "volume", act.volume, "container", act.name, "image", act.spec.Image, "from", act.spec.Node)
	if act.name != act.spec.Name {
		// The new container records itself under its own name on the next
		// pass; the old record must not be re-created a second time.
		if _, err := a.cluster.Apply(ctx, cluster.RemoveContainer{Volume: act.volume, Name: act.spec.Name, Node: act.spec.Node}); err != nil {
			return fmt.Errorf("dropping the old record of %s: %w", act.spec.Name, err)
		}
	}
	return k.recordOne(ctx, cluster.Volume{Name: act.volume}, res.ID)
}

// status returns the current re-creation problems and counters.
func (k *containerKeeper) status() (problems map[string]string, created, missingImage int) {
	k.mu.Lock()
	defer k.mu.Unlock()
	out := make(map[string]string, len(k.problems))
	for n, p := range k.problems {
		out[n] = p
	}
	return out, k.created, k.missingImage
}

// servingPrimaries lists the volumes this host serves as primary now.
func (a *Agent) servingPrimaries() map[string]bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make(map[string]bool, len(a.primaries))
	for name := range a.primaries {
		out[name] = a.lease.valid()
	}
	return out
}

// specFromInspect is the catalog record of a container.
func specFromInspect(c container.InspectResponse, node, driver string) cluster.ContainerSpec {
	s := cluster.ContainerSpec{Name: strings.TrimPrefix(c.Name, "/"), Node: node, Driver: driver}
	if cfg := c.Config; cfg != nil {
		s.Image, s.Cmd, s.Entrypoint, s.Env = cfg.Image, cfg.Cmd, cfg.Entrypoint, cfg.Env
		s.WorkingDir, s.User, s.Labels = cfg.WorkingDir, cfg.User, cfg.Labels
	}
	for _, m := range c.Mounts {
		switch m.Type {
		case mount.TypeVolume:
			s.Mounts = append(s.Mounts, cluster.ContainerMount{Type: "volume", Source: m.Name, Target: m.Destination, ReadOnly: !m.RW, Driver: m.Driver})
		case mount.TypeBind:
			s.Mounts = append(s.Mounts, cluster.ContainerMount{Type: "bind", Source: m.Source, Target: m.Destination, ReadOnly: !m.RW})
		}
	}
	if hc := c.HostConfig; hc != nil {
		for target := range hc.Tmpfs {
			s.Mounts = append(s.Mounts, cluster.ContainerMount{Type: "tmpfs", Target: target})
		}
		for port, binds := range hc.PortBindings {
			for _, b := range binds {
				pb := cluster.PortBinding{ContainerPort: port.String(), HostPort: b.HostPort}
				if b.HostIP.IsValid() {
					pb.HostIP = b.HostIP.String()
				}
				s.Ports = append(s.Ports, pb)
			}
		}
		s.Restart, s.RestartMaxRetries = string(hc.RestartPolicy.Name), hc.RestartPolicy.MaximumRetryCount
		s.NetworkMode = string(hc.NetworkMode)
	}
	slices.SortFunc(s.Mounts, func(x, y cluster.ContainerMount) int { return strings.Compare(x.Target, y.Target) })
	slices.SortFunc(s.Ports, func(x, y cluster.PortBinding) int {
		return strings.Compare(x.ContainerPort+"|"+x.HostIP+"|"+x.HostPort, y.ContainerPort+"|"+y.HostIP+"|"+y.HostPort)
	})
	return s
}

// createOptions turns a record into a container to create under name on
// this host: mounts of the recording host's driver use this host's driver
// (the same name in a normal install, where every host serves "tether").
func createOptions(s cluster.ContainerSpec, name, driver string) client.ContainerCreateOptions {
	labels := map[string]string{}
	for k, v := range s.Labels {
		labels[k] = v
	}
	labels[RecreatedFromLabel] = s.Node
	cfg := &container.Config{Image: s.Image, Cmd: s.Cmd, Entrypoint: s.Entrypoint, Env: s.Env,
		WorkingDir: s.WorkingDir, User: s.User, Labels: labels}
	hc := &container.HostConfig{
		RestartPolicy: container.RestartPolicy{Name: container.RestartPolicyMode(s.Restart), MaximumRetryCount: s.RestartMaxRetries},
		NetworkMode:   container.NetworkMode(s.NetworkMode),
	}
	for _, m := range s.Mounts {
		mm := mount.Mount{Type: mount.Type(m.Type), Source: m.Source, Target: m.Target, ReadOnly: m.ReadOnly}
		if m.Type == "volume" {
			d := m.Driver
			if d == s.Driver {
				d = driver
			}
			mm.VolumeOptions = &mount.VolumeOptions{DriverConfig: &mount.Driver{Name: d}}
		}
		hc.Mounts = append(hc.Mounts, mm)
	}
	for _, p := range s.Ports {
		port, err := network.ParsePort(p.ContainerPort)
		if err != nil {
			continue // recorded from the engine's own answer; cannot happen
		}
		if cfg.ExposedPorts == nil {
			cfg.ExposedPorts, hc.PortBindings = network.PortSet{}, network.PortMap{}
		}
		cfg.ExposedPorts[port] = struct{}{}
		b := network.PortBinding{HostPort: p.HostPort}
		if ip, err := netip.ParseAddr(p.HostIP); err == nil {
			b.HostIP = ip
		}
		hc.PortBindings[port] = append(hc.PortBindings[port], b)
	}
	return client.ContainerCreateOptions{Config: cfg, HostConfig: hc, Name: name}
}
