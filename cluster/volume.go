package cluster

import (
	"fmt"
	"maps"
	"regexp"
	"slices"
	"time"
)

// Volume states, computed from membership (never stored).
const (
	StateHealthy   = "healthy"
	StateDegraded  = "degraded"
	StateNoPrimary = "no-primary"
	// StateDeleted is a volume removed (docker volume rm) and kept until
	// its retention ends; it can be undeleted.
	StateDeleted = "deleted"
	// StateNeedsOperator: the primary is down and every live copy is
	// further behind than the volume's max lag; promote one with
	// `tether volume promote --force`, or bring the primary back.
	StateNeedsOperator = "needs-operator"
)

// DefaultMaxLag is the max lag of a volume created without one.
const DefaultMaxLag = 5 * time.Minute

// DefaultRetention is how long a deleted volume is kept before the leader
// purges it.
const DefaultRetention = 24 * time.Hour

// MaxReplicas bounds Volume.Replicas (which counts the primary).
const MaxReplicas = 7

// Volume is the catalog's record of a volume.
type Volume struct {
	Name string `json:"name"`
	// Replicas counts every copy, the primary's included.
	Replicas int    `json:"replicas"`
	Primary  string `json:"primary"`
	// ReplicaNodes are the nodes holding a copy, the primary excluded.
	ReplicaNodes []string  `json:"replica_nodes"`
	Epoch        uint64    `json:"epoch"`
	CreatedAt    time.Time `json:"created_at"`
	// State is healthy, degraded or no-primary; filled by Cluster from
	// membership, empty in the FSM.
	State string `json:"state,omitempty"`
	// Progress is the last durable batch per node, as reported. The
	// primary's own entry is its head: the newest batch it has cut.
	Progress map[string]Progress `json:"progress,omitempty"`
	// MaxLag bounds how far behind its primary's head a copy may be for
	// automatic failover to promote it; 0 means no bound.
	MaxLag time.Duration `json:"max_lag,omitempty"`
	// Placement lists labels every node holding a copy must carry.
	Placement map[string]string `json:"placement,omitempty"`
	// Freeze lets the primary pause the volume's containers for a moment
	// when writers never go quiet enough for a point-in-time cut.
	Freeze bool `json:"freeze,omitempty"`
	// DeletedUnixNano is when the volume was deleted (soft delete), 0 when
	// it is not.
	DeletedUnixNano int64 `json:"deleted_unix_nano,omitempty"`
	// Containers are the standalone containers using the volume that opted
	// into re-creation after a failover (FailoverLabel), sorted by name.
	Containers []ContainerSpec `json:"containers,omitempty"`
}

// Deleted reports whether v is soft-deleted.
func (v Volume) Deleted() bool { return v.DeletedUnixNano != 0 }

// DeletedAt is when v was deleted (zero when it is not).
func (v Volume) DeletedAt() time.Time {
	if v.DeletedUnixNano == 0 {
		return time.Time{}
	}
	return time.Unix(0, v.DeletedUnixNano).UTC()
}

// Progress is the last batch a node holds durably.
type Progress struct {
	Epoch uint64    `json:"epoch"`
	Seq   uint64    `json:"seq"`
	Cut   time.Time `json:"cut"`
}

// after reports whether p is strictly ahead of q in (Epoch, Seq).
func (p Progress) after(q Progress) bool {
	if p.Epoch != q.Epoch {
		return p.Epoch > q.Epoch
	}
	return p.Seq > q.Seq
}

// clone returns a deep copy of v.
func (v Volume) clone() Volume {
	v.ReplicaNodes = slices.Clone(v.ReplicaNodes)
	if v.Progress != nil {
		v.Progress = maps.Clone(v.Progress)
	}
	if v.Placement != nil {
		v.Placement = maps.Clone(v.Placement)
	}
	if v.Containers != nil {
		cs := make([]ContainerSpec, len(v.Containers))
		for i, c := range v.Containers {
			cs[i] = c.clone()
		}
		v.Containers = cs
	}
	return v
}

// participant reports whether node is the primary or a replica of v.
func (v Volume) participant(node string) bool {
	return v.Primary == node || slices.Contains(v.ReplicaNodes, node)
}

var volumeNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$`)

// ValidateName checks a volume name: a letter or digit, then up to 127
// letters, digits, '_', '.' or '-'.
func ValidateName(name string) error {
	if !volumeNameRE.MatchString(name) {
		return fmt.Errorf("%w: %q (want a letter or digit, then up to 127 of [A-Za-z0-9_.-])", ErrInvalidName, name)
	}
	return nil
}

// ValidateReplicas checks a replica count (primary included).
func ValidateReplicas(n int) error {
	if n < 1 || n > MaxReplicas {
		return fmt.Errorf("%w: %d (want 1 to %d, the primary included)", ErrInvalidReplicas, n, MaxReplicas)
	}
	return nil
}

// validateNodes checks that primary is set and the replica list has no
// duplicates, no empty names and not the primary.
func validateNodes(primary string, replicas []string) error {
	if primary == "" {
		return fmt.Errorf("%w: empty primary", ErrInvalidCommand)
	}
	seen := map[string]bool{primary: true}
	for _, r := range replicas {
		if r == "" || seen[r] {
			return fmt.Errorf("%w: replica list %q repeats a node, names the primary %q or has an empty name", ErrInvalidCommand, replicas, primary)
		}
		seen[r] = true
	}
	return nil
}

var labelRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$`)

// maxLabels bounds a node's labels so that its gossip meta stays under
// memberlist's 512 bytes.
const maxLabels = 8

// ValidateLabels checks node labels or a placement constraint: at most 8
// pairs, keys and values of 1 to 63 letters, digits, '_', '.' or '-'.
func ValidateLabels(labels map[string]string) error {
	if len(labels) > maxLabels {
		return fmt.Errorf("%w: %d labels, at most %d", ErrInvalidLabels, len(labels), maxLabels)
	}
	for k, v := range labels {
		if !labelRE.MatchString(k) || !labelRE.MatchString(v) {
			return fmt.Errorf("%w: %q=%q (want 1 to 63 of [A-Za-z0-9_.-], starting with a letter or digit)", ErrInvalidLabels, k, v)
		}
	}
	return nil
}

// Eligible reports whether a node with labels satisfies placement.
func Eligible(labels, placement map[string]string) bool {
	for k, want := range placement {
		if labels[k] != want {
			return false
		}
	}
	return true
}
