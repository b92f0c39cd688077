package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"
)

// report is what one e2e test run measured; it is written as JSON and as
// a human summary under e2e/results/ and printed.
type report struct {
	Test     string    `json:"test"`
	Started  time.Time `json:"started"`
	Finished time.Time `json:"finished"`
	Hosts    int       `json:"hosts"`
	Passed   bool      `json:"passed"`
	Skipped  bool      `json:"skipped,omitempty"` // a probe that cannot pass yet (see findings)

	Faults       []fault        `json:"faults"`
	FaultsByType map[string]int `json:"faults_by_type"`
	// Operations of the workload: acknowledged, reported failed, and
	// started but neither (the process died during the transaction).
	Operations operations `json:"operations"`
	Failovers  []failover `json:"failovers"`
	// FalseFailovers counts epoch changes where the test expected none.
	FalseFailovers   int      `json:"false_failovers"`
	SafetyViolations []string `json:"safety_violations"`
	Invariants       checks   `json:"invariants"`
	Findings         []string `json:"findings,omitempty"`
}

type fault struct {
	Type   string    `json:"type"` // kill, pause, restart, disconnect
	Target string    `json:"target"`
	At     time.Time `json:"at"`
	// Role of the target when hit: primary, replica, leader, ...
	Role string `json:"role"`
	// LagMs is each replica's lag the primary reported just before.
	LagMs map[string]int64 `json:"lag_ms,omitempty"`
	// HealedAfterMs is how long the fault lasted (0: permanent).
	HealedAfterMs int64 `json:"healed_after_ms,omitempty"`
}

type operations struct {
	OK            int `json:"ok"`
	Failed        int `json:"failed"`
	Indeterminate int `json:"indeterminate"`
	// AckedLostWithinLag: acknowledged rows missing on the new primary
	// that were acknowledged less than the reported lag before the kill
	// (allowed); AckedLostBeyondLag must be 0.
	AckedLostWithinLag int `json:"acked_lost_within_lag"`
	AckedLostBeyondLag int `json:"acked_lost_beyond_lag"`
	// AckedLostBeforeKillMinusLag counts lost rows acknowledged before
	// (fault - lag) instead: information only, since the lag was measured
	// up to LagQueryToFaultMs before the fault and writes went on.
	AckedLostBeforeKillMinusLag int   `json:"acked_lost_before_fault_minus_lag"`
	LagQueryToFaultMs           int64 `json:"lag_query_to_fault_ms"`
	// LagCutoffMs: rows acknowledged before (lag query - lag) must survive.
	LagCutoffMs int64 `json:"lag_ms_at_fault"`
}

// failover splits the time from a fault to a serving new primary.
type failover struct {
	Fault      string `json:"fault"`
	OldPrimary string `json:"old_primary"`
	NewPrimary string `json:"new_primary"`
	Epoch      uint64 `json:"epoch"`
	// Each is measured from the fault, by polling (resolution ~PollMs).
	DetectionMs      int64 `json:"detection_ms"`       // a survivor's members list says dead
	RaftCommitMs     int64 `json:"raft_commit_ms"`     // the new epoch is visible in the catalog
	MountReadyMs     int64 `json:"mount_ready_ms"`     // the new primary serves (status primary_of)
	ContainerReadyMs int64 `json:"container_ready_ms"` // the workload verified its data there (0: no workload)
	PollMs           int64 `json:"poll_ms"`
}

type checks struct {
	Polls          int            `json:"polls"`
	EpochsSeen     map[string]any `json:"epochs_seen"` // per host, the last catalog epoch seen
	PrimaryByEpoch map[string]any `json:"primary_by_epoch"`
	TreeChecks     int            `json:"tree_checks"`
	LayoutChecks   int            `json:"layout_checks"`
}

// recorder collects a test's report, runs the invariant monitor while the
// test runs, and writes the report at cleanup.
type recorder struct {
	tp *topo
	mu sync.Mutex
	r  report
	m  *monitor
}

func newRecorder(tp *topo) *recorder {
	rec := &recorder{tp: tp, r: report{Test: tp.t.Name(), Started: time.Now().UTC(), Hosts: len(tp.hosts), FaultsByType: map[string]int{}, SafetyViolations: []string{}}}
	rec.m = startMonitor(tp, "vol", rec.violation)
	tp.t.Cleanup(rec.finish)
	return rec
}

func (rec *recorder) violation(format string, a ...any) {
	msg := fmt.Sprintf(format, a...)
	rec.mu.Lock()
	rec.r.SafetyViolations = append(rec.r.SafetyViolations, msg)
	rec.mu.Unlock()
}

func (rec *recorder) fault(f fault) int {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	rec.r.Faults = append(rec.r.Faults, f)
	rec.r.FaultsByType[f.Type]++
	return len(rec.r.Faults) - 1
}

func (rec *recorder) healed(i int) {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	rec.r.Faults[i].HealedAfterMs = time.Since(rec.r.Faults[i].At).Milliseconds()
}

func (rec *recorder) failover(f failover) {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	rec.r.Failovers = append(rec.r.Failovers, f)
}

func (rec *recorder) update(f func(r *report)) {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	f(&rec.r)
}

func (rec *recorder) finish() {
	t := rec.tp.t
	rec.m.stop()
	// Nothing outside a volume root, checked on every host's data dir.
	for _, h := range rec.tp.hosts {
		if err := checkLayout(h.dataDir); err != nil {
			rec.violation("%s: %v", h.name, err)
		}
		rec.update(func(r *report) { r.Invariants.LayoutChecks++ })
	}
	rec.mu.Lock()
	rec.r.Finished = time.Now().UTC()
	rec.r.Invariants.Polls, rec.r.Invariants.EpochsSeen, rec.r.Invariants.PrimaryByEpoch = rec.m.summary()
	for _, v := range rec.r.SafetyViolations {
		t.Errorf("safety violation: %s", v)
	}
	rec.r.Passed = !t.Failed()
	rec.r.Skipped = t.Skipped()
	r := rec.r
	rec.mu.Unlock()
	if err := writeReport(&r); err != nil {
		t.Errorf("writing the report: %v", err)
	}
}

func writeReport(r *report) error {
	dir := "results"
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	base := filepath.Join(dir, r.Started.Format("20060102T150405Z")+"-"+strings.ReplaceAll(r.Test, "/", "_"))
	js, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(base+".json", append(js, '\n'), 0o644); err != nil {
		return err
	}
	txt := r.summary()
	if err := os.WriteFile(base+".txt", []byte(txt), 0o644); err != nil {
		return err
	}
	fmt.Print(txt)
	return nil
}

// summary renders the report for a human; every line starts with "│ " so
// that make e2e can show it.
func (r *report) summary() string {
	var b strings.Builder
	p := func(format string, a ...any) { fmt.Fprintf(&b, "│ "+format+"\n", a...) }
	verdict := "PASS"
	switch {
	case !r.Passed:
		verdict = "FAIL"
	case r.Skipped:
		verdict = "SKIP"
	}
	p("%s %s: %d hosts, %s", verdict, r.Test, r.Hosts, r.Finished.Sub(r.Started).Round(100*time.Millisecond))
	var types []string
	for k, n := range r.FaultsByType {
		types = append(types, fmt.Sprintf("%s×%d", k, n))
	}
	sort.Strings(types)
	p("faults: %s", strings.Join(types, ", "))
	for _, f := range r.Faults {
		healed := "permanent"
		if f.HealedAfterMs > 0 {
			healed = fmt.Sprintf("healed after %d ms", f.HealedAfterMs)
		}
		p("  %s %s (%s), %s, replica lag before: %s", f.Type, f.Target, f.Role, healed, fmtLag(f.LagMs))
	}
	o := r.Operations
	if o.OK+o.Failed+o.Indeterminate > 0 {
		p("workload transactions: %d ok, %d failed, %d indeterminate; acked but lost: %d within the %d ms lag, %d beyond it (must be 0)",
			o.OK, o.Failed, o.Indeterminate, o.AckedLostWithinLag, o.LagCutoffMs, o.AckedLostBeyondLag)
		p("  (lag asked %d ms before the fault; counting from the fault instead, %d lost rows were acked before fault - lag)",
			o.LagQueryToFaultMs, o.AckedLostBeforeKillMinusLag)
	}
	for _, f := range r.Failovers {
		ready := "n/a (no workload)"
		if f.ContainerReadyMs > 0 {
			ready = fmt.Sprintf("%d ms", f.ContainerReadyMs)
		}
		p("failover after %s: %s -> %s epoch %d: detection %d ms, raft commit %d ms, mount-ready %d ms, container-ready %s (from the fault; poll ~%d ms)",
			f.Fault, f.OldPrimary, f.NewPrimary, f.Epoch, f.DetectionMs, f.RaftCommitMs, f.MountReadyMs, ready, f.PollMs)
	}
	p("false failovers: %d; safety violations: %d", r.FalseFailovers, len(r.SafetyViolations))
	for _, v := range r.SafetyViolations {
		p("  VIOLATION %s", v)
	}
	p("invariants: %d monitor polls, epochs per host %v, primary per epoch %v, %d tree checks, %d layout checks",
		r.Invariants.Polls, r.Invariants.EpochsSeen, r.Invariants.PrimaryByEpoch, r.Invariants.TreeChecks, r.Invariants.LayoutChecks)
	for _, f := range r.Findings {
		p("finding: %s", f)
	}
	return b.String()
}

func fmtLag(l map[string]int64) string {
	if len(l) == 0 {
		return "n/a"
	}
	var parts []string
	for k, v := range l {
		parts = append(parts, fmt.Sprintf("%s %d ms", k, v))
	}
	sort.Strings(parts)
	return strings.Join(parts, ", ")
}

// finding records something the run showed that is not a failure of the
// test (a limit of today's product, with its evidence).
func (rec *recorder) finding(t *testing.T, format string, a ...any) {
	msg := fmt.Sprintf(format, a...)
	t.Log("finding: " + msg)
	rec.update(func(r *report) { r.Findings = append(r.Findings, msg) })
}
