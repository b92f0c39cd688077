package agent

import (
	"context"
	"time"

	"github.com/tether-io/tether/cluster"
	"github.com/tether-io/tether/replication"
)

// reconcileInterval bounds how long a missed catalog notification can delay
// the agent's reaction: events are hints, this pass is the truth.
const reconcileInterval = time.Second

func (a *Agent) reconcileLoop(ctx context.Context) {
	t := time.NewTicker(reconcileInterval)
	defer t.Stop()
	for {
		a.reconcile(ctx)
		select {
		case <-ctx.Done():
			return
		case <-a.cluster.Changes():
		case <-a.lease.changed:
		case <-t.C:
		}
	}
}

// plan is what this node should be running, from the catalog.
type plan struct {
	primary map[string]cluster.Volume // volumes this node is primary of
	replica []string                  // volumes this node is a replica of
}

// planFor is a pure function of the catalog: which volumes node serves as
// primary and which it holds as a replica.
func planFor(node string, vols []cluster.Volume) plan {
	p := plan{primary: map[string]cluster.Volume{}}
	for _, v := range vols {
		switch {
		case v.Primary == node:
			p.primary[v.Name] = v
		case contains(v.ReplicaNodes, node):
			p.replica = append(p.replica, v.Name)
		}
	}
	return p
}

// reconcile makes the running replication match the catalog: it stops
// primaries this node no longer owns (or owns in a newer epoch), starts the
// ones it now owns, and updates replica sets. Idempotent.
func (a *Agent) reconcile(ctx context.Context) {
	if ctx.Err() != nil {
		return
	}
	p := planFor(a.cfg.NodeName, a.cluster.Volumes())
	leaseHeld := a.lease.valid()
	a.mu.Lock()
	defer a.mu.Unlock()
	for name, rp := range a.primaries {
		v, ok := p.primary[name]
		switch {
		case !ok || v.Epoch != rp.epoch:
			a.log.Info("stopping replication as primary", "volume", name, "epoch", rp.epoch)
		case !leaseHeld:
			a.fence(name, rp.epoch, "lease lapsed: no Raft quorum confirmed this node's ownership within "+a.cluster.LeaseDuration().String())
		default:
			continue
		}
		rp.p.Stop()
		delete(a.primaries, name)
	}
	for name, f := range a.fenced {
		if v, ok := p.primary[name]; !ok || v.Epoch != f.epoch {
			delete(a.fenced, name) // someone else owns it now; nothing left to fence
		}
	}
	if !leaseHeld || !a.lease.caughtUp() {
		return // start nothing as primary without a lease and a current catalog
	}
	for name, v := range p.primary {
		if rp, ok := a.primaries[name]; ok {
			rp.p.SetReplicas(v.ReplicaNodes)
			continue
		}
		if _, ok := a.fenced[name]; ok {
			a.log.Info("lease regained; serving volume as primary again", "volume", name, "epoch", v.Epoch)
			delete(a.fenced, name)
		}
		if err := a.startPrimary(ctx, v); err != nil {
			a.log.Error("cannot serve volume as primary", "volume", name, "epoch", v.Epoch, "err", err)
		}
	}
	for _, name := range p.replica {
		v, ok := a.cluster.Volume(name)
		if !ok {
			continue
		}
		if _, err := a.prepareVolume(v); err != nil {
			a.log.Error("cannot prepare replica", "volume", name, "err", err)
		}
	}
}

// startPrimary fences older epochs out of this node's copy first, so that
// once this node writes in epoch E no stream of an older primary can land
// here, then starts watching and streaming.
func (a *Agent) startPrimary(ctx context.Context, v cluster.Volume) error {
	paths, err := a.prepareVolume(v)
	if err != nil {
		return err
	}
	if err := a.repl.Fence(v.Name, v.Epoch); err != nil {
		return err
	}
	freezer, err := a.freezerFor(v.Name, v.Freeze)
	if err != nil {
		a.log.Warn("volume asks for freezing but cannot be frozen here; cuts that need it ship file-consistent only", "volume", v.Name, "err", err)
	}
	p, err := replication.NewPrimary(a.primaryConfig(v, paths, freezer))
	if err != nil {
		return err
	}
	if err := p.Start(ctx); err != nil {
		return err
	}
	a.primaries[v.Name] = &runningPrimary{epoch: v.Epoch, p: p}
	a.log.Info("serving volume as primary", "volume", v.Name, "epoch", v.Epoch, "replicas", v.ReplicaNodes)
	return nil
}

// primaryConfig is the replication configuration of volume v served as
// primary here.
func (a *Agent) primaryConfig(v cluster.Volume, paths replication.Paths, freezer replication.Freezer) replication.PrimaryConfig {
	return replication.PrimaryConfig{
		Volume:   v.Name,
		Node:     a.cfg.NodeName,
		Epoch:    v.Epoch,
		Paths:    paths,
		Replicas: v.ReplicaNodes,
		Dial:     a.dialReplication,
		OnAck: func(node string, ack replication.Ack) {
			a.prog.record(v.Name, node, ack)
		},
		Logger:         a.log,
		Freezer:        freezer,
		Limiter:        a.limiter,
		RetainAge:      a.cfg.ResumeWindow,
		RetainBytes:    a.cfg.ResumeBytes,
		RescanInterval: a.cfg.RescanInterval,
	}
}

// primaryStatus is the live replication state of a volume this node is
// primary of.
func (a *Agent) primaryStatus(name string) (replication.PrimaryStatus, bool) {
	a.mu.Lock()
	rp, ok := a.primaries[name]
	a.mu.Unlock()
	if !ok {
		return replication.PrimaryStatus{}, false
	}
	return rp.p.Status(), true
}

// fencedVolume records a volume this node stopped serving as primary.
type fencedVolume struct {
	epoch  uint64
	since  time.Time
	reason string
}

// fence records that this node stopped serving volume name in epoch; a.mu
// is held. The Docker integration stops the volume's containers here.
func (a *Agent) fence(name string, epoch uint64, reason string) {
	a.log.Warn("FENCING: stopped serving volume as primary", "volume", name, "epoch", epoch, "reason", reason)
	a.fenced[name] = fencedVolume{epoch: epoch, since: time.Now(), reason: reason}
	a.metrics.fencings.Inc()
	a.fenceContainers(name)
}

// primaryHeads reports the newest batch of each volume served here.
func (a *Agent) primaryHeads() map[string]replication.Ack {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make(map[string]replication.Ack, len(a.primaries))
	for name, rp := range a.primaries {
		st := rp.p.Status()
		out[name] = replication.Ack{Epoch: st.Epoch, Seq: st.Seq, Cut: time.Now()}
	}
	return out
}
