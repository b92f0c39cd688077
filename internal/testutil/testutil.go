// Package testutil holds helpers shared by tether's tests: waiting on
// conditions with deadlines and routing logs into the test output.
package testutil

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"
)

// Eventually polls cond every 20 ms until it returns true, and fails the
// test with msg when it has not within timeout.
func Eventually(t testing.TB, timeout time.Duration, msg string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		if cond() {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("condition not met within %s: %s", timeout, msg)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// EventuallyErr is Eventually for conditions that explain themselves: it
// fails with the last error cond returned.
func EventuallyErr(t testing.TB, timeout time.Duration, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("condition not met within %s: %v", timeout, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Logger returns a logger that writes into the test's log, so that the
// output of a failing test shows what the components said.
func Logger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(NewLogWriter(t), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// LogWriter writes each line into t.Log until the test ends; later writes
// (from goroutines still stopping) are dropped instead of panicking.
type LogWriter struct {
	t    testing.TB
	mu   sync.Mutex
	buf  bytes.Buffer
	done bool
}

// NewLogWriter returns a LogWriter for t; call it from the test goroutine.
func NewLogWriter(t testing.TB) *LogWriter {
	w := &LogWriter{t: t}
	t.Cleanup(func() {
		w.mu.Lock()
		w.done = true
		w.mu.Unlock()
	})
	return w
}

var _ io.Writer = (*LogWriter)(nil)

func (w *LogWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.done {
		return len(p), nil
	}
	w.buf.Write(p)
	for {
		line, err := w.buf.ReadString('\n')
		if err != nil {
			w.buf.WriteString(line)
			break
		}
		w.t.Log(line[:len(line)-1])
	}
	return len(p), nil
}

// Every runs fn at a steady pace, every period, until fn returns false or
// ctx ends: a workload's rhythm, not a wait for a condition.
func Every(ctx context.Context, period time.Duration, fn func(i int) bool) {
	t := time.NewTicker(period)
	defer t.Stop()
	for i := 0; ; i++ {
		if !fn(i) {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
