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
	c.logger.Info("leading the cluster")
	ticker := time.NewTicker(c.timing.ReconcileInterval)
	defer ticker.Stop()
	for {
		c.reconcile(stop)
		select {
		case <-stop:
			return
		case <-ticker.C:
		case <-c.reconcileCh:
		}
	}
}

// reconcile brings Raft membership and volume primaries in line with
// gossip membership.
func (c *Cluster) reconcile(stop chan struct{}) {
	c.reconcileRaft()
	health, downSince := c.members.health()
	for _, cmd := range Failovers(c.fsm.list(), health, downSince, time.Now(), c.timing.FailoverGrace) {
		select {
		case <-stop:
			return
		default:
		}
		c.logger.Info("failing volume over", "volume", cmd.Name, "new_primary", cmd.Primary, "replicas", cmd.ReplicaNodes, "epoch", cmd.Epoch)
		if _, err := c.applyLocal(cmd); err != nil {
			c.logger.Warn("failing volume over was refused", "volume", cmd.Name, "error", err)
		}
	}
	c.purge(stop)
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
	health, _ := c.members.health()
	known := map[raft.ServerID]raft.Server{}
	voters := 0
	for _, s := range f.Configuration().Servers {
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
		case ok && s.Address == addr:
			continue
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
