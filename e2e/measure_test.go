package e2e

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/tether-io/tether/internal/testutil"
	"github.com/tether-io/tether/proto/tetherpb"
	"github.com/tether-io/tether/replication"
)

// lagOf asks h (the volume's primary) for each replica's lag. It returns
// nil if h cannot say.
func (tp *topo) lagOf(h *host) map[string]int64 {
	vi, err := tp.inspect(h, "vol")
	if err != nil || vi.Status == nil || vi.Status.Error != "" {
		return nil
	}
	out := map[string]int64{}
	for _, r := range vi.Status.Replicas {
		out[r.Node] = r.LagMs
	}
	return out
}

// inject records a fault on target (the lag is asked of primary just
// before), then runs it; it returns the fault's index and start time.
func (tp *topo) inject(typ string, target *host, role string, primary *host, run func()) (int, time.Time) {
	tp.t.Helper()
	var lag map[string]int64
	if primary != nil {
		lag = tp.lagOf(primary)
	}
	at := time.Now()
	i := tp.rec.fault(fault{Type: typ, Target: target.name, Role: role, At: at.UTC(), LagMs: lag})
	run()
	tp.t.Logf("fault %d: %s %s (%s) at %s, lag before %s", i+1, typ, target.name, role, at.Format(time.StampMilli), fmtLag(lag))
	return i, at
}

// failoverPoll is how often measureFailover asks; each round costs up to
// three docker execs.
const failoverPoll = 200 * time.Millisecond

// measureFailover waits, by polling via, until another node than old's
// primary serves the volume in a newer epoch, and splits the time from at
// into detection (via's members list says the old primary is dead), Raft
// commit (the new epoch is in via's catalog) and mount-ready (the new
// primary's status lists the volume as served in that epoch).
func (tp *topo) measureFailover(t *testing.T, faultName string, at time.Time, old *tetherpb.Volume, via *host) (*tetherpb.Volume, failover) {
	t.Helper()
	f := failover{Fault: faultName, OldPrimary: old.Primary, PollMs: failoverPoll.Milliseconds()}
	var nv *tetherpb.Volume
	since := func() int64 { return time.Since(at).Milliseconds() }
	// A poll slower than a second skews the split: say so.
	timed := func(what string, h *host, call func() error) error {
		t0 := time.Now()
		err := call()
		if d := time.Since(t0); d > time.Second {
			t.Logf("measuring the failover: %s on %s took %s (err %v)", what, h.name, d.Round(time.Millisecond), err)
		}
		return err
	}
	testutil.EventuallyErr(t, 90*time.Second, func() error {
		if f.DetectionMs == 0 {
			var mr tetherpb.MembersResponse
			if err := timed("members", via, func() error { return tp.ctl(via, &mr, "members") }); err == nil {
				for _, m := range mr.Members {
					if m.Name == old.Primary && m.Health == "dead" {
						f.DetectionMs = since()
					}
				}
			}
		}
		if nv == nil {
			var vi *tetherpb.VolumeInspectResponse
			err := timed("volume inspect", via, func() (err error) { vi, err = tp.inspect(via, "vol"); return err })
			if err == nil && vi.Volume.Epoch > old.Epoch && vi.Volume.Primary != "" {
				nv = vi.Volume
				f.RaftCommitMs = since()
				f.NewPrimary, f.Epoch = nv.Primary, nv.Epoch
			}
		}
		if nv != nil && f.MountReadyMs == 0 {
			var st tetherpb.StatusResponse
			np := tp.host(nv.Primary)
			if err := timed("status", np, func() error { return tp.ctl(np, &st, "status") }); err == nil {
				for _, ps := range st.PrimaryOf {
					if ps.Name == "vol" && ps.Error == "" && ps.Epoch == nv.Epoch {
						f.MountReadyMs = since()
					}
				}
			}
		}
		if nv == nil || f.MountReadyMs == 0 {
			return fmt.Errorf("no new primary serving yet (detected %v, new epoch %v)", f.DetectionMs > 0, nv != nil)
		}
		return nil
	})
	if f.DetectionMs == 0 {
		// The members list answered "dead" between polls only together
		// with the new epoch: detection is no later than the commit.
		f.DetectionMs = f.RaftCommitMs
	}
	if nv.Primary == old.Primary || !slices.Contains(old.ReplicaNodes, nv.Primary) {
		t.Fatalf("after the failover the primary is %s; want one of the former replicas %v", nv.Primary, old.ReplicaNodes)
	}
	t.Logf("failover after %s: %s -> %s epoch %d: detection %d ms, raft commit %d ms, mount-ready %d ms",
		faultName, old.Primary, nv.Primary, nv.Epoch, f.DetectionMs, f.RaftCommitMs, f.MountReadyMs)
	return nv, f
}

// catalogOn returns the volume's record as h's catalog has it.
func (tp *topo) catalogOn(h *host) (*tetherpb.Volume, error) {
	vi, err := tp.inspect(h, "vol")
	if err != nil {
		return nil, err
	}
	return vi.Volume, nil
}

// agreed waits until every host in hs reports the same primary and epoch
// and returns that record.
func (tp *topo) agreed(t *testing.T, hs []*host, timeout time.Duration) *tetherpb.Volume {
	t.Helper()
	var v *tetherpb.Volume
	testutil.EventuallyErr(t, timeout, func() error {
		v = nil
		for _, h := range hs {
			got, err := tp.catalogOn(h)
			if err != nil {
				return err
			}
			if v != nil && (got.Primary != v.Primary || got.Epoch != v.Epoch) {
				return fmt.Errorf("%s sees primary %s epoch %d, %s sees %s epoch %d", hs[0].name, v.Primary, v.Epoch, h.name, got.Primary, got.Epoch)
			}
			v = got
		}
		return nil
	})
	return v
}

// quiescent checks, once the workload stopped, that the hosts in up agree
// on the volume's record and that every replica among them holds the
// primary's tree (content and metadata, replication.Manifest).
func (tp *topo) quiescent(t *testing.T, up []*host) *tetherpb.Volume {
	t.Helper()
	v := tp.agreed(t, up, 60*time.Second)
	primary := tp.host(v.Primary)
	for _, h := range up {
		if h.name == v.Primary || !slices.Contains(v.ReplicaNodes, h.name) {
			continue
		}
		testutil.EventuallyErr(t, 90*time.Second, func() error {
			return replication.SameTree(primary.volumeDir("vol"), h.volumeDir("vol"))
		})
		tp.rec.update(func(r *report) { r.Invariants.TreeChecks++ })
	}
	return v
}

// noFailover watches the catalog on the hosts in hs for d and counts any
// change of the volume's epoch or primary as a false failover.
func (tp *topo) noFailover(t *testing.T, hs []*host, want *tetherpb.Volume, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	tick := time.NewTicker(500 * time.Millisecond) // pacing of the polls, not a wait for a condition
	defer tick.Stop()
	for ; time.Now().Before(deadline); <-tick.C {
		for _, h := range hs {
			v, err := tp.catalogOn(h)
			if err != nil {
				continue
			}
			if v.Epoch != want.Epoch || v.Primary != want.Primary {
				tp.rec.update(func(r *report) { r.FalseFailovers++ })
				t.Fatalf("false failover: %s sees primary %s epoch %d; want %s epoch %d unchanged", h.name, v.Primary, v.Epoch, want.Primary, want.Epoch)
			}
		}
	}
}

func hostsExcept(tp *topo, names ...string) []*host {
	var out []*host
	for _, h := range tp.hosts {
		if !slices.Contains(names, h.name) {
			out = append(out, h)
		}
	}
	return out
}
