package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tether-io/tether/internal/testutil"
	"github.com/tether-io/tether/proto/tetherpb"
)

// A workload container mounts the primary's volume directory from the
// host (-v DATA_DIR/volumes/vol/data:/data): the directory tether's Docker
// volume driver hands the engine, bind-mounted directly while the driver
// is not there yet.

// startWorkload runs sqlwork against h's copy of the volume.
func (tp *topo) startWorkload(h *host, args ...string) string {
	tp.t.Helper()
	name := fmt.Sprintf("%s-work-%s-%d", tp.prefix, h.name, len(tp.extra))
	tp.extra = append(tp.extra, name)
	mustDocker(tp.t, append([]string{"run", "-d", "--name", name, "--network", "none", "--entrypoint", "/bin/sqlwork",
		"-v", h.volumeDir("vol") + ":/data", tp.image, "run"}, args...)...)
	return name
}

// runWorkload runs sqlwork to completion against h's copy and returns its
// stdout.
func (tp *topo) runWorkload(h *host, args ...string) (string, error) {
	return docker(tp.t, append([]string{"run", "--rm", "--network", "none", "--entrypoint", "/bin/sqlwork",
		"-v", h.volumeDir("vol") + ":/data", tp.image}, args...)...)
}

type ack struct {
	n  int64
	at time.Time
}

// workloadLog parses sqlwork's output: acknowledged transactions in order,
// failed ones, and the last number started (acked or not).
func workloadLog(t *testing.T, container string) (acks []ack, failed int) {
	t.Helper()
	out, err := docker(t, "logs", container)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) == 3 && f[0] == "ack":
			n, err1 := strconv.ParseInt(f[1], 10, 64)
			ns, err2 := strconv.ParseInt(f[2], 10, 64)
			if err1 == nil && err2 == nil {
				acks = append(acks, ack{n, time.Unix(0, ns)})
			}
		case len(f) >= 2 && f[0] == "fail":
			failed++
		}
	}
	return acks, failed
}

// underLoad waits until the workload in container work acknowledged n
// transactions and primary reports the lag of both replicas, and the
// catalog records their progress: a fault then hits a loaded, streaming
// volume.
func (tp *topo) underLoad(t *testing.T, primary *host, work string, n int, timeout time.Duration) {
	t.Helper()
	testutil.EventuallyErr(t, timeout, func() error {
		acks, _ := workloadLog(t, work)
		lag := tp.lagOf(primary)
		if len(acks) < n || len(lag) < 2 {
			return fmt.Errorf("%d transactions acknowledged, lag of %d replicas known", len(acks), len(lag))
		}
		return nil
	})
	tp.progressRecorded(t, primary)
}

// countLosses sorts the acknowledged transactions missing from a promoted
// copy (has says which it holds): lost within the lag the primary reported
// for that copy (asynchronous replication's promise), or beyond it (must
// not happen). Counted from lagAsked - lag: writes went on between the
// question and the fault. It returns the operations (one indeterminate:
// the transaction in flight at the fault), the last number acknowledged and
// the numbers lost beyond the lag.
func countLosses(acks []ack, failed int, has func(int64) bool, lagMs int64, lagAsked, fault time.Time) (ops operations, lastAcked int64, lostBeyond []int64) {
	lag := time.Duration(lagMs) * time.Millisecond
	cutoff := lagAsked.Add(-lag)
	ops = operations{OK: len(acks), Failed: failed, Indeterminate: 1, LagCutoffMs: lagMs, LagQueryToFaultMs: fault.Sub(lagAsked).Milliseconds()}
	for _, a := range acks {
		lastAcked = max(lastAcked, a.n)
		if has(a.n) {
			continue
		}
		if a.at.Before(fault.Add(-lag)) {
			ops.AckedLostBeforeKillMinusLag++
		}
		if a.at.Before(cutoff) {
			ops.AckedLostBeyondLag++
			lostBeyond = append(lostBeyond, a.n)
		} else {
			ops.AckedLostWithinLag++
		}
	}
	return ops, lastAcked, lostBeyond
}

type verifyResult struct {
	Integrity string     `json:"integrity"`
	Rows      int64      `json:"rows"`
	Min       int64      `json:"min"`
	Max       int64      `json:"max"`
	Gaps      [][2]int64 `json:"gaps"`
}

func (v *verifyResult) has(n int64) bool {
	if v.Rows == 0 || n < v.Min || n > v.Max {
		return false
	}
	for _, g := range v.Gaps {
		if n >= g[0] && n <= g[1] {
			return false
		}
	}
	return true
}

// TestSQLiteFailover runs a SQLite workload on the primary, kills the
// primary's host (agent and workload container) under load, and checks on
// the promoted copy: the database opens, passes PRAGMA integrity_check and
// holds every transaction acknowledged before (time of the lag query - the
// lag the primary reported for that replica).
func TestSQLiteFailover(t *testing.T) {
	requireE2E(t)
	sqliteFailover(t, "kill", "wal")
}

// TestSQLitePausedHost is TestSQLiteFailover with the primary's host
// frozen (docker pause of its agent and workload) instead of killed. When
// the host thaws, its agent must come back as a replica; its workload is
// killed while still frozen, standing in for the volume driver, which must
// not let a container resume writing on a fenced copy (today nothing stops
// it, and what it wrote would be overwritten by the resync).
func TestSQLitePausedHost(t *testing.T) {
	requireE2E(t)
	sqliteFailover(t, "pause", "wal")
}

// TestSQLiteRollbackJournalProbe is TestSQLiteFailover with SQLite's
// rollback journal, whose main file is rewritten in place at every commit:
// a copy is consistent only if the main file and the journal are taken at
// one moment, which file-by-file replication does not promise until
// consistent cuts land. A failure of the checks is recorded as a finding
// and the test skips; it runs only with TETHER_E2E_PROBE=1 (not in make
// e2e), since whether a kill hits the window is chance.
func TestSQLiteRollbackJournalProbe(t *testing.T) {
	requireE2E(t)
	if os.Getenv("TETHER_E2E_PROBE") != "1" {
		t.Skip("set TETHER_E2E_PROBE=1 to probe a rollback-journal database over file-by-file replication")
	}
	sqliteFailover(t, "kill", "delete")
}

// sqliteFailover runs the SQLite workload (journal: wal or delete) on h1,
// hits h1's host with fault (kill or pause), and checks the promoted copy.
// With the rollback journal (a probe) broken checks are findings.
func sqliteFailover(t *testing.T, faultType, journal string) {
	probe := journal != "wal"
	var broken []string
	// fail is a failed consistency check: an error, or for a probe a
	// finding.
	fail := func(format string, a ...any) {
		msg := fmt.Sprintf(format, a...)
		if probe {
			broken = append(broken, msg)
			return
		}
		t.Error(msg)
	}
	tp := startTopo(t, 3)
	var v tetherpb.Volume
	if err := tp.ctl(tp.host("h1"), &v, "volume", "create", "vol", "--replicas", "3"); err != nil {
		t.Fatal(err)
	}
	primary := tp.host("h1")
	testutil.Eventually(t, 20*time.Second, "the primary's volume directory exists", func() bool {
		_, err := os.Stat(primary.volumeDir("vol"))
		return err == nil
	})
	work := tp.startWorkload(primary, "--interval", "20ms", "--journal", journal)
	tp.underLoad(t, primary, work, 300, 60*time.Second)
	// The lag right before the kill, and the kill of the host: its agent
	// and its workload together.
	lagAsked := time.Now()
	fi, killed := tp.inject(faultType, primary, "primary", primary, func() {
		if faultType == "pause" {
			pause(t, []*host{primary}, work)
			return
		}
		mustDocker(t, faultType, work, primary.container)
	})
	var lag map[string]int64
	tp.rec.update(func(r *report) { lag = r.Faults[fi].LagMs })
	survivor := tp.host(v.ReplicaNodes[0])
	nv, fo := tp.measureFailover(t, faultType, killed, &v, survivor)
	np := tp.host(nv.Primary)

	// The workload starts on the new primary: verify first.
	out, err := tp.runWorkload(np, "verify")
	fo.ContainerReadyMs = time.Since(killed).Milliseconds()
	tp.rec.failover(fo)
	var res verifyResult
	if err != nil {
		fail("the database on the new primary %s does not open: %v", np.name, err)
	} else if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("decoding verify output %q: %v", out, err)
	}
	t.Logf("verify on %s: %+v", np.name, res)
	if err == nil && res.Integrity != "ok" {
		fail("PRAGMA integrity_check on the new primary's copy: %q", res.Integrity)
	}
	up := hostsExcept(tp, primary.name)
	if faultType == "pause" {
		tp.rec.finding(t, "nothing in tether stops a frozen host's containers from writing to its fenced copy when it thaws; the test kills the workload while frozen (the volume driver's job)")
		mustDocker(t, "kill", work)
		unpause(t, primary)
		tp.rec.healed(fi)
		tp.servesAsReplica(t, primary)
		up = tp.hosts
	}

	lagMs, ok := lag[np.name]
	if !ok {
		t.Fatalf("the primary reported no lag for %s before the kill: %v", np.name, lag)
	}
	acks, failed := workloadLog(t, work)
	ops, lastAcked, lostBeyond := countLosses(acks, failed, res.has, lagMs, lagAsked, killed)
	// The transaction in flight at the kill, if any, is indeterminate.
	if res.Max > lastAcked {
		ops.Indeterminate = int(res.Max - lastAcked)
	}
	tp.rec.update(func(r *report) { r.Operations = ops })
	t.Logf("workload: %d acknowledged (last %d), %d failed; copy holds rows %d..%d, gaps %v; lag of %s before the kill %d ms; acked and lost: %d within the lag, %d beyond",
		len(acks), lastAcked, failed, res.Min, res.Max, res.Gaps, np.name, lagMs, ops.AckedLostWithinLag, ops.AckedLostBeyondLag)
	if ops.AckedLostWithinLag > 0 {
		tp.rec.finding(t, "%d acknowledged transactions were lost, all acknowledged within the reported lag (%d ms) or after it was asked (%d ms before the %s): asynchronous replication's promise, kept",
			ops.AckedLostWithinLag, lagMs, ops.LagQueryToFaultMs, faultType)
	}
	if len(lostBeyond) > 0 {
		msg := fmt.Sprintf("%d transactions acknowledged more than the reported lag (%d ms) before the %s are missing on %s: %v",
			len(lostBeyond), lagMs, faultType, np.name, lostBeyond[:min(len(lostBeyond), 20)])
		if probe {
			fail("%s", msg)
		} else {
			tp.rec.violation("%s", msg)
		}
	}
	if len(broken) > 0 {
		tp.rec.finding(t, "journal %s over file-by-file replication, copy promoted after a %s: %s", journal, faultType, strings.Join(broken, "; "))
		t.Skipf("the %s journal's copy is not crash-consistent under file-by-file replication (%s); this cannot pass until consistent cuts land", journal, strings.Join(broken, "; "))
	}
	if res.Max > lastAcked+1 {
		tp.rec.violation("the copy holds rows up to %d but only %d were started", res.Max, lastAcked+1)
	}

	// The workload resumes on the new primary, stops cleanly, and the
	// surviving replica converges to it.
	if _, err := tp.runWorkload(np, "run", "--count", "50", "--interval", "0"); err != nil {
		t.Fatalf("the workload does not resume on %s: %v", np.name, err)
	}
	final := tp.quiescent(t, up)
	if final.Primary != np.name || final.Epoch != nv.Epoch {
		t.Errorf("at quiescence the catalog says %+v", final)
	}
}
