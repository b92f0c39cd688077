package agent

import (
	"testing"

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
