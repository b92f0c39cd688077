package cluster

import (
	"slices"
	"time"

	"github.com/hashicorp/raft"
)

// maxVoters is how many Raft voters the leader keeps; later members join
// as nonvoters.
const maxVoters = 5

// metaUpdateTimeout bounds waiting for a gossip meta update to go out.
const metaUpdateTimeout = 2 * time.Second

// raftOpTimeout bounds one Raft configuration change or barrier.
const raftOpTimeout = 10 * time.Second

// formLoop waits until this node is part of a Raft cluster, bootstrapping
// one when BootstrapExpect says so (see the package comment), then
// announces it in the gossip meta.
func (c *Cluster) formLoop() {
	for !c.raftFormed() {
		select {
		case <-c.ctx.Done():
			return
		case <-c.bootstrapCh:
		case <-time.After(time.Second):
		}
	}
	c.gossipMu.Lock()
	defer c.gossipMu.Unlock()
	if c.left {
		return
	}
	c.members.setRaftFormed()
	if err := c.ml.UpdateNode(metaUpdateTimeout); err != nil {
		c.logger.Warn("announcing raft membership over gossip failed", "error", err)
	}
}

// raftFormed reports whether this node has a Raft configuration, after
// bootstrapping one if it is time to.
func (c *Cluster) raftFormed() bool {
	cfg := c.raft.GetConfiguration()
	if err := cfg.Error(); err != nil {
		c.logger.Warn("reading raft configuration failed", "error", err)
		return false
	}
	if len(cfg.Configuration().Servers) > 0 {
		return true
	}
	if c.cfg.BootstrapExpect == 0 || c.members.othersInRaft() {
		return false // a leader adds us
	}
	names, rpc := c.members.alive()
	if len(names) < c.cfg.BootstrapExpect {
		return false
	}
	names = names[:c.cfg.BootstrapExpect]
	if !slices.Contains(names, c.cfg.NodeName) {
		return false // one of them bootstraps and its leader adds us
	}
	servers := make([]raft.Server, 0, len(names))
	for _, n := range names {
		servers = append(servers, raft.Server{Suffrage: raft.Voter, ID: raft.ServerID(n), Address: raft.ServerAddress(rpc[n])})
	}
	err := c.raft.BootstrapCluster(raft.Configuration{Servers: servers}).Error()
	if err != nil && err != raft.ErrCantBootstrap {
		c.logger.Error("bootstrapping raft failed", "servers", names, "error", err)
		return false
	}
	c.logger.Info("bootstrapped raft", "servers", names)
	return true
}

// monitorLeadership runs one leader loop per term in which this node leads.
func (c *Cluster) monitorLeadership() {
	var stop, done chan struct{}
	stopLeading := func() {
		if stop != nil {
			close(stop)
			<-done
			stop, done = nil, nil
		}
	}
	defer stopLeading()
	for {
		select {
		case <-c.ctx.Done():
			return
		case isLeader := <-c.raftNotify:
			switch {
			case isLeader && stop == nil:
				stop, done = make(chan struct{}), make(chan struct{})
				go func(stop, done chan struct{}) {
					defer close(done)
					c.leaderLoop(stop)
				}(stop, done)
			case !isLeader:
				stopLeading()
				c.logger.Info("lost raft leadership")
			}
			notify(c.changes)
		}
	}
}

// leaderLoop waits until this node's state is current (Barrier), then
// reconciles every ReconcileInterval and on every membership change.
func (c *Cluster) leaderLoop(stop chan struct{}) {
	for {
		err := c.raft.Barrier(raftOpTimeout).Error()
		if err == nil {
			break
		}
		c.logger.Warn("raft barrier as new leader failed; retrying", "error", err)
		select {
		case <-stop:
			return
		case <-time.After(time.Second):
		}
	}
	c.leases.startTerm(time.Now())
	c.logger.Info("leading the cluster")
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		next := c.reconcile(stop)
		timer.Reset(next)
		select {
		case <-stop:
			return
		case <-timer.C:
		case <-c.reconcileCh:
		}
	}
}

// reconcile brings Raft membership and volume primaries in line with
// gossip membership. It returns when to run again: ReconcileInterval, or
// sooner when a dead primary's lease runs out before that.
func (c *Cluster) reconcile(stop chan struct{}) time.Duration {
	c.reconcileRaft()
	health, downSince := c.members.health()
	vols := c.fsm.list()
	primaries := make([]string, 0, len(vols))
	for _, v := range vols {
		primaries = append(primaries, v.Primary)
	}
	leaseUntil := c.leases.expiries(primaries, c.timing.LeaseDuration+c.timing.LeaseMargin)
	now := time.Now()
	next := c.timing.ReconcileInterval
	for _, p := range primaries {
		if until := leaseUntil[p]; down(health[p]) && until.After(now) && until.Sub(now) < next {
			next = until.Sub(now) + time.Millisecond
		}
	}
	reachable := c.leases.heardFrom(max(3*c.timing.LeaseRenewInterval, c.timing.LeaseDuration/2), now)
	for _, cmd := range Failovers(vols, health, downSince, leaseUntil, reachable, now, c.timing.FailoverGrace) {
		select {
		case <-stop:
			return next
		default:
		}
		c.logger.Info("failing volume over", "volume", cmd.Name, "new_primary", cmd.Primary, "replicas", cmd.ReplicaNodes, "epoch", cmd.Epoch)
		if _, err := c.applyLocal(cmd); err != nil {
			c.logger.Warn("failing volume over was refused", "volume", cmd.Name, "error", err)
		}
	}
	for _, v := range vols {
		needs := VolumeState(v, health) == StateNeedsOperator
		if needs == c.needsOperator[v.Name] {
			continue
		}
		c.needsOperator[v.Name] = needs
		if needs {
			c.logger.Warn("volume needs an operator: its primary is down and every live copy is further behind than its max lag", "volume", v.Name, "primary", v.Primary, "max_lag", v.MaxLag)
		}
	}
	for _, cmd := range Repairs(c.fsm.list(), health, downSince, now, c.timing.ReplaceGrace, c.load(), c.members.labels()) {
		c.logger.Info("replacing a dead replica", "volume", cmd.Name, "replicas", cmd.ReplicaNodes)
		if _, err := c.applyLocal(cmd); err != nil {
			c.logger.Warn("replacing a dead replica was refused", "volume", cmd.Name, "error", err)
		}
	}
	c.purge(stop)
	return next
}

// purge removes the volumes whose retention after deletion has ended.
func (c *Cluster) purge(stop chan struct{}) {
	for _, cmd := range Purges(c.fsm.list(), time.Now(), c.retention()) {
		select {
		case <-stop:
			return
		default:
		}
		c.logger.Info("purging deleted volume: its retention ended", "volume", cmd.Name,
			"deleted_at", time.Unix(0, cmd.ExpectDeletedUnixNano).UTC())
		if _, err := c.applyLocal(cmd); err != nil {
			c.logger.Warn("purging deleted volume was refused", "volume", cmd.Name, "error", err)
		}
	}
}

// reconcileRaft adds alive members missing from the Raft configuration
// (voters up to maxVoters, then nonvoters), updates moved addresses and
// removes servers that left gracefully. Dead servers are not removed: they
// may come back, and removing them is not always safe for quorum.
func (c *Cluster) reconcileRaft() {
	f := c.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		c.logger.Warn("reading raft configuration failed", "error", err)
		return
	}
	health, downSince := c.members.health()
	var servers []RaftServer
	for _, s := range f.Configuration().Servers {
		servers = append(servers, RaftServer{ID: string(s.ID), Voter: s.Suffrage == raft.Voter})
	}
	remove := DeadServers(servers, c.cfg.NodeName, health, downSince, time.Now(), c.timing.DeadServerGrace)
	known := map[raft.ServerID]raft.Server{}
	voters := 0
	for _, s := range f.Configuration().Servers {
		if slices.Contains(remove, string(s.ID)) {
			if err := c.raft.RemoveServer(s.ID, 0, raftOpTimeout).Error(); err != nil {
				c.logger.Warn("removing dead server from raft failed", "member", s.ID, "error", err)
				return
			}
			c.logger.Warn("removed a server dead for longer than the grace from raft", "member", s.ID, "grace", c.timing.DeadServerGrace)
			continue
		}
		if health[string(s.ID)] == HealthLeft && string(s.ID) != c.cfg.NodeName {
			if err := c.raft.RemoveServer(s.ID, 0, raftOpTimeout).Error(); err != nil {
				c.logger.Warn("removing departed member from raft failed", "member", s.ID, "error", err)
				return
			}
			c.logger.Info("removed departed member from raft", "member", s.ID)
			continue
		}
		known[s.ID] = s
		if s.Suffrage == raft.Voter {
			voters++
		}
	}
	names, rpc := c.members.alive()
	for _, name := range names {
		id, addr := raft.ServerID(name), raft.ServerAddress(rpc[name])
		s, ok := known[id]
		var err error
		switch {
		case ok && s.Address == addr && (s.Suffrage == raft.Voter || voters >= maxVoters):
			continue
		case ok && s.Address == addr:
			err = c.raft.AddVoter(id, addr, 0, raftOpTimeout).Error() // promote a nonvoter
			if err == nil {
				voters++
			}
		case ok && s.Suffrage == raft.Voter:
			err = c.raft.AddVoter(id, addr, 0, raftOpTimeout).Error()
		case ok:
			err = c.raft.AddNonvoter(id, addr, 0, raftOpTimeout).Error()
		case voters < maxVoters:
			err = c.raft.AddVoter(id, addr, 0, raftOpTimeout).Error()
			if err == nil {
				voters++
			}
		default:
			err = c.raft.AddNonvoter(id, addr, 0, raftOpTimeout).Error()
		}
		if err != nil {
			c.logger.Warn("adding member to raft failed", "member", name, "addr", addr, "error", err)
			return
		}
		c.logger.Info("added member to raft", "member", name, "addr", addr)
	}
}
