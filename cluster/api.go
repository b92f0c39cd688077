package cluster

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/raft"
)

// defaultApplyTimeout bounds a Raft apply when ctx has no deadline.
const defaultApplyTimeout = 10 * time.Second

// forwardRetryDelay is how long Apply waits before asking again for a leader.
const forwardRetryDelay = 100 * time.Millisecond

// Raft roles reported in Member.RaftRole.
const (
	RoleLeader   = "leader"
	RoleVoter    = "voter"
	RoleNonvoter = "nonvoter"
	RoleNone     = "none"
)

// IsLeader reports whether this node is the Raft leader.
func (c *Cluster) IsLeader() bool {
	return c.ready.Load() && c.raft.State() == raft.Leader
}

// Leader returns the leader's name and RPC address, or "" when none is known.
func (c *Cluster) Leader() (name, rpcAddr string) {
	if !c.ready.Load() {
		return "", ""
	}
	addr, id := c.raft.LeaderWithID()
	return string(id), string(addr)
}

// RaftState returns this node's Raft state (follower, candidate, leader,
// shutdown) and the index of its last log entry.
func (c *Cluster) RaftState() (state string, lastIndex uint64) {
	if !c.ready.Load() {
		return "none", 0
	}
	return strings.ToLower(c.raft.State().String()), c.raft.LastIndex()
}

// RaftTerm is this node's current Raft term (0 before Raft runs).
func (c *Cluster) RaftTerm() uint64 {
	if !c.ready.Load() {
		return 0
	}
	term, _ := strconv.ParseUint(c.raft.Stats()["term"], 10, 64)
	return term
}

// Members lists every node this one knows of, dead and left included,
// sorted by name.
func (c *Cluster) Members() []Member {
	members := c.members.list()
	roles := map[string]string{}
	if c.ready.Load() {
		if f := c.raft.GetConfiguration(); f.Error() == nil {
			for _, s := range f.Configuration().Servers {
				roles[string(s.ID)] = RoleVoter
				if s.Suffrage != raft.Voter {
					roles[string(s.ID)] = RoleNonvoter
				}
			}
		}
	}
	leader, _ := c.Leader()
	for i := range members {
		role, ok := roles[members[i].Name]
		switch {
		case !ok:
			role = RoleNone
		case members[i].Name == leader:
			role = RoleLeader
		}
		members[i].RaftRole = role
	}
	return members
}

// Volumes returns this node's copy of the catalog, sorted by name, with
// State computed from membership.
func (c *Cluster) Volumes() []Volume {
	vols := c.fsm.list()
	health, _ := c.members.health()
	for i := range vols {
		vols[i].State = VolumeState(vols[i], health)
	}
	return vols
}

// Volume returns one volume from this node's copy of the catalog.
func (c *Cluster) Volume(name string) (Volume, bool) {
	v, ok := c.fsm.get(name)
	if !ok {
		return Volume{}, false
	}
	health, _ := c.members.health()
	v.State = VolumeState(v, health)
	return v, true
}

// Apply runs cmd through Raft: directly on the leader, otherwise through
// Config.Forward. While no leader is known (or the one asked is no longer
// leader) it retries until ctx ends. A refusal by the catalog is returned
// as the error, with the index it was refused at.
func (c *Cluster) Apply(ctx context.Context, cmd Command) (uint64, error) {
	b, err := Encode(cmd)
	if err != nil {
		return 0, err
	}
	if !c.ready.Load() {
		return 0, fmt.Errorf("%w: not started", ErrShutdown)
	}
	// uncertain is set once an attempt may have been committed without our
	// knowing (leadership lost mid-commit, the leader unreachable mid-call).
	// Every catalog command is safe to send again: each either checks a
	// precondition or only moves state forward, so Apply repeats it, and a
	// refusal of the repeat that shows the first attempt landed is success.
	uncertain := false
	for {
		idx, retry, err := c.applyOnce(ctx, b)
		switch {
		case err == nil:
			// Read your writes: a caller that reads the catalog of this
			// node next must see its own change.
			return idx, c.waitApplied(ctx, idx)
		case errors.Is(err, ErrIndeterminate):
			uncertain, retry = true, true
		case uncertain && !retry && c.landed(ctx, cmd):
			return idx, nil
		}
		if !retry {
			return idx, err
		}
		select {
		case <-ctx.Done():
			if uncertain {
				return 0, fmt.Errorf("%w (gave up retrying: %w; last: %w)", ErrIndeterminate, ctx.Err(), err)
			}
			return 0, fmt.Errorf("cluster: applying catalog change: %w (gave up: %w)", err, ctx.Err())
		case <-c.ctx.Done():
			return 0, ErrShutdown
		case <-time.After(forwardRetryDelay):
		}
	}
}

// landed reports whether cmd, whose repeat was refused, took effect the
// first time: the catalog here shows its result (waiting briefly for this
// node to catch up).
func (c *Cluster) landed(ctx context.Context, cmd Command) bool {
	check := func() bool {
		switch cmd := cmd.(type) {
		case CreateVolume:
			v, ok := c.fsm.get(cmd.Volume.Name)
			return ok && v.CreatedAt.Equal(cmd.Volume.CreatedAt) && v.Primary == cmd.Volume.Primary
		case SetPrimary:
			v, ok := c.fsm.get(cmd.Name)
			return ok && v.Epoch == cmd.Epoch && v.Primary == cmd.Primary
		case DeleteVolume:
			_, ok := c.fsm.get(cmd.Name)
			return !ok
		case Undelete: // (a repeated SetDeleted is accepted: it keeps the first time)
			v, ok := c.fsm.get(cmd.Name)
			return ok && !v.Deleted()
		}
		return false
	}
	deadline := time.After(2 * time.Second)
	for !check() {
		select {
		case <-ctx.Done():
			return false
		case <-deadline:
			return false
		case <-time.After(10 * time.Millisecond):
		}
	}
	return true
}

// waitApplied waits until this node's catalog has applied index idx.
func (c *Cluster) waitApplied(ctx context.Context, idx uint64) error {
	t := time.NewTicker(5 * time.Millisecond)
	defer t.Stop()
	for c.fsm.appliedIndex() < idx {
		select {
		case <-ctx.Done():
			return fmt.Errorf("cluster: change committed at index %d but not yet applied on this node: %w", idx, ctx.Err())
		case <-c.ctx.Done():
			return ErrShutdown
		case <-t.C:
		}
	}
	return nil
}

// applyOnce tries once; retry is set when no leader took the command.
func (c *Cluster) applyOnce(ctx context.Context, b []byte) (idx uint64, retry bool, err error) {
	if c.IsLeader() {
		idx, err = c.raftApply(ctx, b)
		return idx, errors.Is(err, ErrNotLeader), err
	}
	name, addr := c.Leader()
	if addr == "" || name == c.cfg.NodeName {
		return 0, true, ErrNoLeader
	}
	if c.cfg.Forward == nil {
		return 0, false, fmt.Errorf("%w: %s leads and this node has no way to forward", ErrNotLeader, name)
	}
	idx, err = c.cfg.Forward(ctx, addr, b)
	return idx, errors.Is(err, ErrNotLeader) || errors.Is(err, ErrNoLeader), err
}

// ApplyEncoded is the leader's side of Forward: it applies an encoded
// command, or returns ErrNotLeader on any other node.
func (c *Cluster) ApplyEncoded(ctx context.Context, b []byte) (uint64, error) {
	if !c.IsLeader() {
		return 0, ErrNotLeader
	}
	if _, err := Decode(b); err != nil {
		return 0, err
	}
	return c.raftApply(ctx, b)
}

// applyLocal applies cmd on this node, which must be the leader.
func (c *Cluster) applyLocal(cmd Command) (uint64, error) {
	b, err := Encode(cmd)
	if err != nil {
		return 0, err
	}
	return c.raftApply(context.Background(), b)
}

// raftApply appends b to the Raft log and waits for the FSM's answer.
func (c *Cluster) raftApply(ctx context.Context, b []byte) (uint64, error) {
	timeout := defaultApplyTimeout
	if d, ok := ctx.Deadline(); ok {
		timeout = max(time.Until(d), time.Millisecond)
	}
	f := c.raft.Apply(b, timeout)
	if err := f.Error(); err != nil {
		if errors.Is(err, raft.ErrNotLeader) || errors.Is(err, raft.ErrLeadershipTransferInProgress) {
			return 0, fmt.Errorf("%w: %w", ErrNotLeader, err)
		}
		if errors.Is(err, raft.ErrRaftShutdown) {
			return 0, ErrShutdown
		}
		if errors.Is(err, raft.ErrLeadershipLost) {
			return 0, fmt.Errorf("%w: %w", ErrIndeterminate, err)
		}
		return 0, fmt.Errorf("cluster: committing catalog change: %w", err)
	}
	if err, ok := f.Response().(error); ok && err != nil {
		return f.Index(), err
	}
	return f.Index(), nil
}

// CreateVolume places a new volume among the alive members (this node
// preferred as primary) and adds it to the catalog in epoch 1.
func (c *Cluster) CreateVolume(ctx context.Context, name string, replicas int) (Volume, error) {
	return c.CreateVolumeSpec(ctx, VolumeSpec{Name: name, Replicas: replicas, MaxLag: DefaultMaxLag})
}

// VolumeSpec is what a user asks for when creating a volume.
type VolumeSpec struct {
	Name     string
	Replicas int
	// MaxLag bounds automatic failover (see Volume.MaxLag); 0 = no bound.
	MaxLag time.Duration
	// Placement lists labels every node holding a copy must carry.
	Placement map[string]string
	// Freeze: see Volume.Freeze.
	Freeze bool
}

// CreateVolumeSpec creates a volume as spec asks, placing it among the
// alive members with this node preferred as primary.
func (c *Cluster) CreateVolumeSpec(ctx context.Context, spec VolumeSpec) (Volume, error) {
	name, replicas := spec.Name, spec.Replicas
	if spec.MaxLag < 0 {
		return Volume{}, fmt.Errorf("%w: max lag %s is negative", ErrInvalidCommand, spec.MaxLag)
	}
	if err := ValidateName(name); err != nil {
		return Volume{}, err
	}
	if err := ValidateReplicas(replicas); err != nil {
		return Volume{}, err
	}
	if old, ok := c.fsm.get(name); ok {
		if old.Deleted() {
			return Volume{}, c.deletedError(old)
		}
		return Volume{}, fmt.Errorf("%w: %q", ErrVolumeExists, name)
	}
	if err := ValidateLabels(spec.Placement); err != nil {
		return Volume{}, fmt.Errorf("placement: %w", err)
	}
	alive, _ := c.members.alive()
	labels := c.members.labels()
	var eligible []string
	for _, n := range alive {
		if Eligible(labels[n], spec.Placement) {
			eligible = append(eligible, n)
		}
	}
	primary, others, err := Place(c.cfg.NodeName, eligible, c.load(), replicas)
	if err != nil && len(spec.Placement) > 0 {
		err = fmt.Errorf("%w (%d of %d alive nodes carry the labels %v)", err, len(eligible), len(alive), spec.Placement)
	}
	if err != nil {
		return Volume{}, fmt.Errorf("cluster: placing volume %q: %w", name, err)
	}
	v := Volume{
		Name:         name,
		Replicas:     replicas,
		Primary:      primary,
		ReplicaNodes: others,
		Epoch:        1,
		CreatedAt:    time.Now().UTC(),
		MaxLag:       spec.MaxLag,
		Placement:    spec.Placement,
		Freeze:       spec.Freeze,
	}
	if _, err := c.Apply(ctx, CreateVolume{Volume: v}); err != nil {
		return Volume{}, err
	}
	v.Progress = map[string]Progress{}
	health, _ := c.members.health()
	v.State = VolumeState(v, health)
	return v, nil
}

// load counts the volumes each node holds a copy of.
func (c *Cluster) load() map[string]int {
	load := map[string]int{}
	for _, v := range c.fsm.list() {
		load[v.Primary]++
		for _, r := range v.ReplicaNodes {
			load[r]++
		}
	}
	return load
}

// ReportProgress records that node holds batch (epoch, seq), cut at cut,
// of volume durably.
func (c *Cluster) ReportProgress(ctx context.Context, volume, node string, epoch, seq uint64, cut time.Time) error {
	var cutNano int64
	if !cut.IsZero() {
		cutNano = cut.UnixNano()
	}
	_, err := c.Apply(ctx, UpdateProgress{Name: volume, Node: node, Epoch: epoch, Seq: seq, CutUnixNano: cutNano})
	return err
}

// UpdateVolume changes a volume's options (nil: unchanged); the leader
// then adds, replaces or trims replicas to match.
func (c *Cluster) UpdateVolume(ctx context.Context, cmd UpdateVolume) (Volume, error) {
	if _, ok := c.fsm.get(cmd.Name); !ok {
		return Volume{}, fmt.Errorf("%w: %q", ErrNoVolume, cmd.Name)
	}
	if cmd.Replicas != nil {
		if err := ValidateReplicas(*cmd.Replicas); err != nil {
			return Volume{}, err
		}
	}
	if cmd.Placement != nil {
		if err := ValidateLabels(*cmd.Placement); err != nil {
			return Volume{}, fmt.Errorf("placement: %w", err)
		}
	}
	if _, err := c.Apply(ctx, cmd); err != nil {
		return Volume{}, err
	}
	v, _ := c.Volume(cmd.Name)
	return v, nil
}

// Promote is an operator's failover, run on the leader: it makes to the
// primary of volume name in the next epoch, in place of a dead primary
// whose lease has surely lapsed. force accepts a copy further behind than
// the volume's max lag. It returns the new record and how far behind the
// promoted copy was.
func (c *Cluster) Promote(ctx context.Context, name, to string, force bool) (Volume, time.Duration, error) {
	if !c.IsLeader() {
		return Volume{}, 0, ErrNotLeader
	}
	v, ok := c.fsm.get(name)
	if !ok {
		return Volume{}, 0, fmt.Errorf("%w: %q", ErrNoVolume, name)
	}
	health, _ := c.members.health()
	cmd, behind, err := ManualPromotion(v, to, health, force)
	if err != nil {
		return Volume{}, behind, err
	}
	until := c.leases.expiries([]string{v.Primary}, c.timing.LeaseDuration+c.timing.LeaseMargin)[v.Primary]
	if wait := time.Until(until); wait > 0 {
		return Volume{}, behind, fmt.Errorf("%w: %s may serve %q for %s more; retry then", ErrLeaseHeld, v.Primary, name, wait.Round(100*time.Millisecond))
	}
	if _, err := c.Apply(ctx, cmd); err != nil {
		return Volume{}, behind, err
	}
	nv, _ := c.Volume(name)
	c.logger.Warn("volume promoted by an operator", "volume", name, "new_primary", to, "epoch", cmd.Epoch, "behind", fmtBehind(behind), "forced", force)
	return nv, behind, nil
}

// WaitEpoch waits until this node's catalog holds volume name at epoch or
// later (read your writes after a change made through another node).
func (c *Cluster) WaitEpoch(ctx context.Context, name string, epoch uint64) error {
	t := time.NewTicker(5 * time.Millisecond)
	defer t.Stop()
	for {
		if v, ok := c.fsm.get(name); ok && v.Epoch >= epoch {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("cluster: waiting for %q to reach epoch %d here: %w", name, epoch, ctx.Err())
		case <-c.ctx.Done():
			return ErrShutdown
		case <-t.C:
		}
	}
}
