package volumedriver

import (
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Create option keys (docker volume create -o KEY=VALUE).
const (
	OptReplicas  = "replicas"
	OptMaxLag    = "max-lag"
	OptPlacement = "placement"
	OptFreeze    = "freeze"
)

// DefaultMaxLag is the max lag of a volume created without -o max-lag.
const DefaultMaxLag = 5 * time.Minute

// DefaultReplicas is the copy count of a volume created without -o replicas.
const DefaultReplicas = 3

// MaxReplicas bounds the replicas option (it counts the primary).
const MaxReplicas = 7

// knownOptions lists the create options, for the error on an unknown one.
var knownOptions = []string{OptReplicas, OptMaxLag, OptPlacement, OptFreeze}

// CreateOptions are the validated options of a create request.
type CreateOptions struct {
	// Replicas counts every copy, the primary's included.
	Replicas int
	// MaxLag bounds automatic failover; 0 means no bound.
	MaxLag time.Duration
	// Placement lists labels every node holding a copy must carry.
	Placement map[string]string
	// Freeze lets the primary pause the volume's containers briefly when
	// they never go quiet enough for a point-in-time cut (databases).
	Freeze bool
}

// ParseCreateOptions checks Docker's create options and fills defaults.
// Unknown keys are refused with the list of known ones, so that a typo does
// not silently give a volume with the default settings.
func ParseCreateOptions(opts map[string]string) (CreateOptions, error) {
	out := CreateOptions{Replicas: DefaultReplicas, MaxLag: DefaultMaxLag}
	keys := make([]string, 0, len(opts))
	for k := range opts {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		v := opts[k]
		switch k {
		case OptReplicas:
			n, err := strconv.Atoi(strings.TrimSpace(v))
			if err != nil || n < 1 || n > MaxReplicas {
				return CreateOptions{}, fmt.Errorf("option replicas=%q: want a whole number from 1 to %d (copies, the primary included)", v, MaxReplicas)
			}
			out.Replicas = n
		case OptMaxLag:
			d, err := time.ParseDuration(strings.TrimSpace(v))
			if err != nil || d < 0 {
				return CreateOptions{}, fmt.Errorf("option max-lag=%q: want a duration such as 30s or 5m (0: no limit)", v)
			}
			out.MaxLag = d
		case OptFreeze:
			b, err := strconv.ParseBool(strings.TrimSpace(v))
			if err != nil {
				return CreateOptions{}, fmt.Errorf("option freeze=%q: want true or false", v)
			}
			out.Freeze = b
		case OptPlacement:
			pl, err := parsePlacement(v)
			if err != nil {
				return CreateOptions{}, err
			}
			out.Placement = pl
		default:
			return CreateOptions{}, fmt.Errorf("unknown option %q for a tether volume (known options: %s)", k, strings.Join(knownOptions, ", "))
		}
	}
	return out, nil
}

// parsePlacement reads "zone=a,disk=ssd" (node labels every copy's node
// must carry; the catalog checks their form).
func parsePlacement(v string) (map[string]string, error) {
	out := map[string]string{}
	for _, pair := range strings.Split(v, ",") {
		k, val, ok := strings.Cut(strings.TrimSpace(pair), "=")
		if !ok || k == "" || val == "" {
			return nil, fmt.Errorf("option placement=%q: want KEY=VALUE pairs separated by commas, e.g. placement=zone=a,disk=ssd", v)
		}
		out[k] = val
	}
	return out, nil
}

// nameRE is the volume names tether accepts (the catalog's rule, checked
// again there): a letter or digit, then up to 127 of [A-Za-z0-9_.-].
var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$`)

// ValidateName checks a volume name from Docker.
func ValidateName(name string) error {
	if name == "" {
		return fmt.Errorf("volume name is empty")
	}
	if !nameRE.MatchString(name) {
		return fmt.Errorf("invalid volume name %q: use a letter or digit, then up to 127 letters, digits, '_', '.' or '-'", name)
	}
	return nil
}

// mountIDRE is Docker's opaque mount ID: random hex (64 characters in every
// engine since 1.12); anything printable and short is accepted.
var mountIDRE = regexp.MustCompile(`^[A-Za-z0-9_.:-]{1,128}$`)

func validateMountID(id string) error {
	if id == "" {
		return fmt.Errorf("mount request without an ID: tether needs Docker 1.12 or newer, which sends one")
	}
	if !mountIDRE.MatchString(id) {
		return fmt.Errorf("invalid mount ID %q", id)
	}
	return nil
}
