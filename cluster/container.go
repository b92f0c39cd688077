package cluster

import (
	"encoding/json"
	"fmt"
	"regexp"
	"slices"
	"sort"
	"strings"
)

// FailoverLabel is the Docker label that opts a standalone container into
// re-creation after a failover: `docker run --label tether.failover=true`.
const FailoverLabel = "tether.failover"

// Bounds of a ContainerSpec, so that a record stays a small catalog entry.
const (
	// MaxContainersPerVolume bounds the records of one volume.
	MaxContainersPerVolume = 16
	// MaxContainerSpecBytes bounds one record's JSON encoding.
	MaxContainerSpecBytes = 16 << 10
)

// ContainerSpec is what the catalog keeps of a standalone container that
// uses a volume and carries FailoverLabel: enough to create it again on
// the host that becomes the volume's primary when its own host dies.
type ContainerSpec struct {
	Name string `json:"name"`
	// Node is the host it was recorded on; Driver is the volume driver
	// name it mounted the volume through there (mounts of that driver are
	// re-created through the new host's driver).
	Node       string            `json:"node"`
	Driver     string            `json:"driver"`
	Image      string            `json:"image"`
	Cmd        []string          `json:"cmd,omitempty"`
	Entrypoint []string          `json:"entrypoint,omitempty"`
	Env        []string          `json:"env,omitempty"`
	WorkingDir string            `json:"working_dir,omitempty"`
	User       string            `json:"user,omitempty"`
	Labels     map[string]string `json:"labels,omitempty"`
	Mounts     []ContainerMount  `json:"mounts,omitempty"`
	Ports      []PortBinding     `json:"ports,omitempty"`
	// Restart is the restart policy name (no, always, on-failure,
	// unless-stopped), RestartMaxRetries its on-failure count.
	Restart           string `json:"restart,omitempty"`
	RestartMaxRetries int    `json:"restart_max_retries,omitempty"`
	NetworkMode       string `json:"network_mode,omitempty"`
}

// ContainerMount is one mount of a ContainerSpec: Type is volume (Source
// is the volume name), bind (Source is a host path) or tmpfs.
type ContainerMount struct {
	Type     string `json:"type"`
	Source   string `json:"source,omitempty"`
	Target   string `json:"target"`
	ReadOnly bool   `json:"read_only,omitempty"`
	Driver   string `json:"driver,omitempty"`
}

// PortBinding publishes ContainerPort ("80/tcp") on HostIP:HostPort.
type PortBinding struct {
	ContainerPort string `json:"container_port"`
	HostIP        string `json:"host_ip,omitempty"`
	HostPort      string `json:"host_port,omitempty"`
}

// SetContainer records (or replaces, by name) a container of a volume.
// Repeating it changes nothing.
type SetContainer struct {
	Volume string        `json:"volume"`
	Spec   ContainerSpec `json:"spec"`
}

// RemoveContainer drops a volume's record of a container, only if it was
// recorded on Node (a host back from the dead must not drop the record
// its successor wrote). Removing an absent record changes nothing.
type RemoveContainer struct {
	Volume string `json:"volume"`
	Name   string `json:"name"`
	Node   string `json:"node"`
}

// Type implements Command.
func (SetContainer) Type() CommandType { return TypeSetContainer }

// Type implements Command.
func (RemoveContainer) Type() CommandType { return TypeRemoveContainer }

// ignoreUnknown: a node that does not know container records can skip
// them; they only drive re-creation, never ownership.
func (SetContainer) ignoreUnknown() bool    { return true }
func (RemoveContainer) ignoreUnknown() bool { return true }

// containerNameRE is Docker's rule for container names.
var containerNameRE = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$`)

var restartPolicies = []string{"", "no", "always", "on-failure", "unless-stopped"}

// ValidateContainerSpec checks a record before it enters the catalog.
func ValidateContainerSpec(s ContainerSpec) error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: container record %q: %s", ErrInvalidCommand, s.Name, fmt.Sprintf(format, args...))
	}
	switch {
	case !containerNameRE.MatchString(s.Name):
		return bad("invalid container name")
	case s.Node == "" || s.Driver == "":
		return bad("no node or driver")
	case strings.TrimSpace(s.Image) == "":
		return bad("no image")
	case !slices.Contains(restartPolicies, s.Restart):
		return bad("unknown restart policy %q", s.Restart)
	case s.RestartMaxRetries < 0:
		return bad("negative restart count")
	}
	for _, m := range s.Mounts {
		if !slices.Contains([]string{"volume", "bind", "tmpfs"}, m.Type) || !strings.HasPrefix(m.Target, "/") {
			return bad("mount %q of type %q (want volume, bind or tmpfs at an absolute path)", m.Target, m.Type)
		}
	}
	b, err := json.Marshal(s)
	if err != nil {
		return bad("%v", err)
	}
	if len(b) > MaxContainerSpecBytes {
		return bad("%d bytes, at most %d", len(b), MaxContainerSpecBytes)
	}
	return nil
}

// UsesVolume reports whether s mounts the volume named volume.
func (s ContainerSpec) UsesVolume(volume string) bool {
	for _, m := range s.Mounts {
		if m.Type == "volume" && m.Source == volume {
			return true
		}
	}
	return false
}

// Equal reports whether s and o record the same container.
func (s ContainerSpec) Equal(o ContainerSpec) bool {
	a, _ := json.Marshal(s)
	b, _ := json.Marshal(o)
	return string(a) == string(b)
}

// clone returns a deep copy of s.
func (s ContainerSpec) clone() ContainerSpec {
	b, _ := json.Marshal(s)
	var out ContainerSpec
	_ = json.Unmarshal(b, &out)
	return out
}

// setContainer applies SetContainer; f.mu is held.
func (f *fsm) setContainer(c SetContainer) error {
	v, ok := f.volumes[c.Volume]
	if !ok {
		return fmt.Errorf("%w: %q", ErrNoVolume, c.Volume)
	}
	if err := ValidateContainerSpec(c.Spec); err != nil {
		return err
	}
	if !c.Spec.UsesVolume(c.Volume) {
		return fmt.Errorf("%w: container record %q does not mount volume %q", ErrInvalidCommand, c.Spec.Name, c.Volume)
	}
	i := slices.IndexFunc(v.Containers, func(s ContainerSpec) bool { return s.Name == c.Spec.Name })
	if i >= 0 {
		v.Containers[i] = c.Spec.clone()
		return nil
	}
	if len(v.Containers) >= MaxContainersPerVolume {
		return fmt.Errorf("%w: volume %q already records %d containers, at most %d", ErrInvalidCommand, c.Volume, len(v.Containers), MaxContainersPerVolume)
	}
	v.Containers = append(v.Containers, c.Spec.clone())
	sort.Slice(v.Containers, func(i, j int) bool { return v.Containers[i].Name < v.Containers[j].Name })
	return nil
}

// removeContainer applies RemoveContainer; f.mu is held.
func (f *fsm) removeContainer(c RemoveContainer) error {
	v, ok := f.volumes[c.Volume]
	if !ok {
		return fmt.Errorf("%w: %q", ErrNoVolume, c.Volume)
	}
	v.Containers = slices.DeleteFunc(v.Containers, func(s ContainerSpec) bool { return s.Name == c.Name && s.Node == c.Node })
	if len(v.Containers) == 0 {
		v.Containers = nil
	}
	return nil
}
