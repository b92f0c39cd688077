package replication

import (
	"context"
	"crypto/rand"
	"sync"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/tether-io/tether/proto/tetherpb"
)

// countingLimiter records every wait instead of waiting.
type countingLimiter struct {
	burst int
	mu    sync.Mutex
	waits []int
}

func (l *countingLimiter) WaitN(_ context.Context, n int) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.waits = append(l.waits, n)
	return nil
}

func (l *countingLimiter) Burst() int { return l.burst }

func (l *countingLimiter) total() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, w := range l.waits {
		n += w
	}
	return n
}

// TestThrottled checks that every message waits for its encoded size, in
// pieces no larger than the limiter's burst, before it is sent.
func TestThrottled(t *testing.T) {
	lim := &countingLimiter{burst: 1000}
	var sent []int
	send := throttled(context.Background(), lim, func(m *tetherpb.StreamRequest) error {
		if lim.total() < proto.Size(m)+sumOf(sent) {
			t.Fatal("a message was sent before the limiter allowed all of it")
		}
		sent = append(sent, proto.Size(m))
		return nil
	})
	for _, size := range []int{10, 2500, 999} {
		must(t, send(&tetherpb.StreamRequest{Kind: &tetherpb.StreamRequest_Op{Op: &tetherpb.FileOp{Data: make([]byte, size)}}}))
	}
	if lim.total() != sumOf(sent) {
		t.Fatalf("waited for %d bytes, sent %d", lim.total(), sumOf(sent))
	}
	for _, w := range lim.waits {
		if w > lim.burst || w <= 0 {
			t.Fatalf("waits %v: each must be within (0, burst %d]", lim.waits, lim.burst)
		}
	}
	if len(lim.waits) < 5 {
		t.Fatalf("waits %v: the 2,500-byte message should wait in three pieces", lim.waits)
	}
}

func sumOf(xs []int) int {
	n := 0
	for _, x := range xs {
		n += x
	}
	return n
}

// TestPrimaryUsesLimiter checks the wiring: what a Primary sends to its
// replica passes through PrimaryConfig.Limiter.
func TestPrimaryUsesLimiter(t *testing.T) {
	c := newTestCluster(t)
	data := make([]byte, 300_000)
	_, _ = rand.Read(data) // incompressible: the limiter counts bytes on the wire
	c.write("big", string(data))
	c.startReplica("r1")
	lim := &countingLimiter{burst: 64 << 10}
	c.startPrimaryWith(func(cfg *PrimaryConfig) { cfg.Limiter = lim }, 1, "r1")
	c.waitSynced("r1")
	if n := lim.total(); n < 300_000 {
		t.Fatalf("the limiter saw %d bytes for a 300,000-byte file", n)
	}
}
