package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tether-io/tether/proto/tetherpb"
)

// monitorEvery is how often the monitor asks each host; every ask is a
// docker exec (~0.1 s of a core), so it stays modest on 2 cores.
const monitorEvery = time.Second

// monitor polls every host (one goroutine each, so a host that is slow to
// answer does not hold up the others) for `tether status` and `tether
// volume inspect` and checks, for the whole run:
//   - per host, the catalog epoch of the volume never decreases;
//   - all hosts name the same primary for one epoch (catalog);
//   - at most one host serves the volume as primary in one epoch (status
//     primary_of, running and not fenced).
//
// Hosts that do not answer (killed, paused) are skipped until they do.
type monitor struct {
	tp        *topo
	volume    string
	violation func(format string, a ...any)
	ctx       context.Context
	cancel    context.CancelFunc
	wg        sync.WaitGroup

	mu       sync.Mutex
	polls    int
	epoch    map[string]uint64            // host -> last catalog epoch seen
	primary  map[uint64]string            // epoch -> primary named by the catalog
	serving  map[uint64]map[string]string // epoch -> hosts serving as primary -> when first seen
	reported map[string]bool              // violations already reported (once each)
}

func startMonitor(tp *topo, volume string, violation func(string, ...any)) *monitor {
	ctx, cancel := context.WithCancel(context.Background())
	m := &monitor{tp: tp, volume: volume, violation: violation, ctx: ctx, cancel: cancel,
		epoch: map[string]uint64{}, primary: map[uint64]string{}, serving: map[uint64]map[string]string{}, reported: map[string]bool{}}
	for _, h := range tp.hosts {
		m.wg.Add(1)
		go func() {
			defer m.wg.Done()
			tick := time.NewTicker(monitorEvery)
			defer tick.Stop()
			for {
				m.poll(h)
				select {
				case <-ctx.Done():
					return
				case <-tick.C:
				}
			}
		}()
	}
	return m
}

func (m *monitor) stop() {
	m.cancel()
	m.wg.Wait()
}

// poll asks h once. Errors mean h cannot answer now (or the volume does
// not exist yet); they are not violations.
func (m *monitor) poll(h *host) {
	var st tetherpb.StatusResponse
	stErr := ctlCtx(m.ctx, h, &st, "status")
	var vi tetherpb.VolumeInspectResponse
	viErr := ctlCtx(m.ctx, h, &vi, "volume", "inspect", m.volume)
	if m.ctx.Err() != nil {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.polls++
	if viErr == nil && vi.Volume != nil {
		v := vi.Volume
		if last := m.epoch[h.name]; v.Epoch < last {
			m.report("epoch went back on %s: %d after %d", h.name, v.Epoch, last)
		}
		m.epoch[h.name] = max(m.epoch[h.name], v.Epoch)
		if p, ok := m.primary[v.Epoch]; ok && p != v.Primary {
			m.report("two primaries in epoch %d in the catalog: %s (seen earlier) and %s (seen by %s)", v.Epoch, p, v.Primary, h.name)
		} else if !ok {
			m.primary[v.Epoch] = v.Primary
		}
	}
	if stErr == nil {
		for _, ps := range st.PrimaryOf {
			if ps.Name != m.volume || ps.Error != "" || ps.Epoch == 0 || fencedAt(&st, ps.Name, ps.Epoch) {
				continue
			}
			hosts := m.serving[ps.Epoch]
			if hosts == nil {
				hosts = map[string]string{}
				m.serving[ps.Epoch] = hosts
			}
			if _, ok := hosts[h.name]; !ok {
				hosts[h.name] = time.Now().UTC().Format(time.StampMilli)
			}
			if len(hosts) > 1 {
				m.report("two hosts served %s as primary in epoch %d: %v", m.volume, ps.Epoch, hosts)
			}
		}
	}
}

func fencedAt(st *tetherpb.StatusResponse, volume string, epoch uint64) bool {
	for _, f := range st.Fenced {
		if f.Name == volume && f.Epoch >= epoch {
			return true
		}
	}
	return false
}

// report records a violation once; m.mu is held.
func (m *monitor) report(format string, a ...any) {
	msg := fmt.Sprintf(format, a...)
	if m.reported[msg] {
		return
	}
	m.reported[msg] = true
	m.violation("%s", msg)
}

// summary returns the number of polls, the last epoch per host and the
// primary per epoch, for the report.
func (m *monitor) summary() (int, map[string]any, map[string]any) {
	m.mu.Lock()
	defer m.mu.Unlock()
	epochs := map[string]any{}
	for h, e := range m.epoch {
		epochs[h] = e
	}
	prim := map[string]any{}
	for e, p := range m.primary {
		prim[fmt.Sprint(e)] = p
	}
	return m.polls, epochs, prim
}

// checkLayout checks that a host's data dir holds only tether's layout:
// nothing a replica applied (or a workload wrote) landed outside a volume's
// data directory.
func checkLayout(dataDir string) error {
	allowed := map[string][]string{
		".":       {"raft", "tls", "volumes", "tether.sock", "driver.json"},
		"volumes": nil, // any volume name, checked below
	}
	top, err := os.ReadDir(dataDir)
	if err != nil {
		return err
	}
	var bad []string
	for _, e := range top {
		if !slices.Contains(allowed["."], e.Name()) && !strings.HasPrefix(e.Name(), "driver.json.tmp-") {
			bad = append(bad, e.Name())
		}
	}
	vols, err := os.ReadDir(filepath.Join(dataDir, "volumes"))
	if err != nil && !os.IsNotExist(err) {
		return err
	}
	for _, v := range vols {
		if !v.IsDir() {
			bad = append(bad, filepath.Join("volumes", v.Name()))
			continue
		}
		inner, err := os.ReadDir(filepath.Join(dataDir, "volumes", v.Name()))
		if err != nil {
			return err
		}
		for _, e := range inner {
			switch name := e.Name(); {
			case name == "data", name == "state", name == "incarnation", strings.HasPrefix(name, "incarnation.tmp-"):
				// tether's own layout: the copy, its replication state, and
				// which incarnation of the volume the directory holds
			default:
				bad = append(bad, filepath.Join("volumes", v.Name(), e.Name()))
			}
		}
	}
	if len(bad) > 0 {
		sort.Strings(bad)
		return fmt.Errorf("unexpected entries in the data dir %s (outside any volume root): %v", dataDir, bad)
	}
	return nil
}

// TestCheckLayout runs without Docker: the layout check knows every file
// the agent itself writes in its data dir, and flags anything else.
func TestCheckLayout(t *testing.T) {
	dir := t.TempDir()
	for _, p := range []string{"raft/raft.db", "tls/ca.pem", "driver.json", "volumes/v/incarnation", "volumes/v/data/x", "volumes/v/state/epoch"} {
		if err := os.MkdirAll(filepath.Join(dir, filepath.Dir(p)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, p), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := checkLayout(dir); err != nil {
		t.Fatalf("tether's own layout flagged: %v", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "volumes", "v", "escaped"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := checkLayout(dir); err == nil || !strings.Contains(err.Error(), "volumes/v/escaped") {
		t.Fatalf("a stray file beside a volume root: %v", err)
	}
}
