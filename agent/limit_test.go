package agent

import (
	"testing"
	"time"

	"github.com/tether-io/tether/cluster"
	"github.com/tether-io/tether/replication"

	"golang.org/x/time/rate"
)

func TestReplicationLimiter(t *testing.T) {
	if l := replicationLimiter(0); l != nil {
		t.Fatalf("rate 0 gave limiter %v, want none", l)
	}
	l, ok := replicationLimiter(50 << 20).(*rate.Limiter)
	if !ok || l.Limit() != 50<<20 || l.Burst() != 5<<20 {
		t.Fatalf("50 MiB/s gave %#v, want a rate.Limiter of 50 MiB/s with a 5 MiB burst", l)
	}
	if l := replicationLimiter(1000).(*rate.Limiter); l.Burst() != 64<<10 {
		t.Fatalf("a tiny rate has burst %d, want 64 KiB (a message waits in pieces of it)", l.Burst())
	}
	cfg := Config{NodeName: "n1", DataDir: t.TempDir(), ReplicationRate: 1 << 20}
	if err := cfg.Validate(); err != nil {
		t.Fatalf("a valid config with a replication rate: %v", err)
	}
	cfg.ReplicationRate = -1
	if err := cfg.Validate(); err == nil {
		t.Fatal("a negative replication rate was accepted")
	}
}

// TestResumeAndRescanSettings: the agent's resume and rescan settings are
// validated and reach the replication of every volume it serves.
func TestResumeAndRescanSettings(t *testing.T) {
	for name, mut := range map[string]func(*Config){
		"negative resume window": func(c *Config) { c.ResumeWindow = -time.Second },
		"negative resume bytes":  func(c *Config) { c.ResumeBytes = -1 },
		"rescan under a second":  func(c *Config) { c.RescanInterval = 100 * time.Millisecond },
	} {
		cfg := Config{NodeName: "n1", DataDir: t.TempDir()}
		mut(&cfg)
		if err := cfg.Validate(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	cfg := Config{NodeName: "n1", DataDir: t.TempDir(), ResumeWindow: time.Hour, ResumeBytes: 5 << 30, RescanInterval: time.Minute}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	a := &Agent{cfg: cfg}
	pc := a.primaryConfig(cluster.Volume{Name: "v", Epoch: 2}, replication.Paths{}, nil)
	if pc.RetainAge != time.Hour || pc.RetainBytes != 5<<30 || pc.RescanInterval != time.Minute || pc.Epoch != 2 {
		t.Fatalf("primary config: retain %s / %d bytes, rescan %s, epoch %d", pc.RetainAge, pc.RetainBytes, pc.RescanInterval, pc.Epoch)
	}
}
