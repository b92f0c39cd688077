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
	a.mu.Lock()
	defer a.mu.Unlock()
	for name, rp := range a.primaries {
		if v, ok := p.primary[name]; !ok || v.Epoch != rp.epoch {
			a.log.Info("stopping replication as primary", "volume", name, "epoch", rp.epoch)
			rp.p.Stop()
			delete(a.primaries, name)
		}
	}
	for name, v := range p.primary {
		if rp, ok := a.primaries[name]; ok {
			rp.p.SetReplicas(v.ReplicaNodes)
			continue
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
	p, err := replication.NewPrimary(replication.PrimaryConfig{
		Volume:   v.Name,
		Node:     a.cfg.NodeName,
		Epoch:    v.Epoch,
		Paths:    paths,
		Replicas: v.ReplicaNodes,
		Dial:     a.dialReplication,
		OnAck: func(node string, ack replication.Ack) {
			a.prog.record(v.Name, node, ack)
		},
		Logger: a.log,
	})
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
