package agent

import (
	"fmt"
	"regexp"
	"slices"

	"github.com/tether-io/tether/cluster"
)

// recreateInputs is what the re-creation decision looks at: the catalog,
// which volumes this host serves as primary, membership, and what this
// host's Docker Engine has.
type recreateInputs struct {
	node    string
	volumes []cluster.Volume
	// serving holds the volumes this host serves as primary right now
	// (replication running, lease held).
	serving map[string]bool
	health  map[string]string
	// images holds the image references present on this engine.
	images map[string]bool
	// running lists the running containers that carry the failover label.
	running []engineContainer
	// names holds the name of every container on this engine, any state.
	names map[string]bool
}

// engineContainer is a running container as the decision needs it.
type engineContainer struct {
	name string
}

// recreateAction is one recorded container and what to do with it.
type recreateAction struct {
	volume string
	spec   cluster.ContainerSpec
	// name is the name to create it under (its own when free).
	name string
	// why explains a skipped action (missing image, running elsewhere).
	why string
}

// recreatePlan is the decision: containers to create and start here, and
// those that cannot be (said loudly), or need not be.
type recreatePlan struct {
	create         []recreateAction
	missingImage   []recreateAction
	alreadyRunning []recreateAction
	nameTaken      []recreateAction
}

// decideRecreate says which recorded containers this host creates again:
// those of a volume it serves as primary, recorded on a host that is dead
// or gone (a failover; after a planned move the old host is alive and the
// user moves the container), whose image is here, and of which no copy
// with the failover label is running on this engine. A container recorded
// under several volumes is considered once.
func decideRecreate(in recreateInputs) recreatePlan {
	var p recreatePlan
	seen := map[string]bool{}
	for _, v := range in.volumes {
		if !in.serving[v.Name] || v.Primary != in.node || v.Deleted() {
			continue
		}
		for _, s := range v.Containers {
			if s.Node == in.node || seen[s.Name] {
				continue
			}
			if h := in.health[s.Node]; h != cluster.HealthDead && h != cluster.HealthLeft && h != "" {
				continue // its host is alive (or suspect): not a failover
			}
			seen[s.Name] = true
			act := recreateAction{volume: v.Name, spec: s}
			alt := s.Name + "-" + dockerNameSafe(in.node)
			if c, ok := runningCopy(in.running, s.Name, alt); ok {
				act.why = fmt.Sprintf("container %s with label %s=true is already running here", c, cluster.FailoverLabel)
				p.alreadyRunning = append(p.alreadyRunning, act)
				continue
			}
			if !in.images[s.Image] {
				act.why = fmt.Sprintf("image %s is not on this host: pull or load it, then the container is created on the next pass", s.Image)
				p.missingImage = append(p.missingImage, act)
				continue
			}
			act.name = s.Name
			if in.names[act.name] {
				act.name = alt
			}
			if in.names[act.name] {
				act.why = fmt.Sprintf("names %s and %s are both taken on this host: remove one", s.Name, act.name)
				p.nameTaken = append(p.nameTaken, act)
				continue
			}
			p.create = append(p.create, act)
		}
	}
	return p
}

// runningCopy returns a running labelled container under one of the names
// a copy of the recorded container has: a second copy would be a second
// writer.
func runningCopy(running []engineContainer, names ...string) (string, bool) {
	for _, c := range running {
		if slices.Contains(names, c.name) {
			return c.name, true
		}
	}
	return "", false
}

var dockerNameUnsafe = regexp.MustCompile(`[^a-zA-Z0-9_.-]`)

// dockerNameSafe turns a node name into a container name suffix.
func dockerNameSafe(s string) string {
	return dockerNameUnsafe.ReplaceAllString(s, "_")
}
