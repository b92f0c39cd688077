package cluster

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"
)

func TestHCLogAdapter(t *testing.T) {
	var buf bytes.Buffer
	l := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	h := newHCLog(l, "raft").Named("net").With("peer", "n2")
	h.Debug("dropped below the Info floor")
	h.Info("entering leader state", "term", 3)
	h.Log(hclog.NoLevel, "no level is info")
	out := buf.String()
	if strings.Contains(out, "dropped") {
		t.Fatalf("debug logged at the default floor: %s", out)
	}
	for _, want := range []string{`level=INFO msg="entering leader state" component=raft.net peer=n2 term=3`, `level=INFO msg="no level is info"`} {
		if !strings.Contains(out, want) {
			t.Fatalf("missing %q in:\n%s", want, out)
		}
	}
	h.SetLevel(hclog.Debug)
	if !h.IsDebug() || h.IsTrace() {
		t.Fatal("level checks wrong after SetLevel(Debug)")
	}
	h.Debug("now shown")
	if !strings.Contains(buf.String(), `level=DEBUG msg="now shown"`) {
		t.Fatalf("debug not logged after SetLevel: %s", buf.String())
	}
}

func TestLevelWriter(t *testing.T) {
	var buf bytes.Buffer
	l := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	w := &levelWriter{l: l}
	_, _ = w.Write([]byte("[DEBUG] memberlist: probe chatter\n[WARN] memberlist: Refuting a suspect message\nplain line\n[ERR] memberlist: broken\n"))
	out := buf.String()
	if strings.Contains(out, "probe chatter") {
		t.Fatalf("memberlist debug must stay below Debug: %s", out)
	}
	for _, want := range []string{`level=WARN msg="memberlist: Refuting a suspect message"`, `level=INFO msg="plain line"`, `level=ERROR msg="memberlist: broken"`} {
		if !strings.Contains(out, want) {
			t.Fatalf("missing %q in:\n%s", want, out)
		}
	}
}
