package cluster

import (
	"bytes"
	"errors"
	"io"
	"log/slog"
	"strings"
	"testing"

	"github.com/hashicorp/raft"
)

func appSpec(name, node, volume string) ContainerSpec {
	return ContainerSpec{
		Name: name, Node: node, Driver: "tether", Image: "busybox:latest",
		Cmd: []string{"sh", "-c", "sleep 1000"}, Env: []string{"A=1"},
		Labels:  map[string]string{FailoverLabel: "true"},
		Mounts:  []ContainerMount{{Type: "volume", Source: volume, Target: "/data", Driver: "tether"}},
		Ports:   []PortBinding{{ContainerPort: "80/tcp", HostPort: "8080"}},
		Restart: "always",
	}
}

func TestContainerRecords(t *testing.T) {
	tf := newTestFSM(t)
	tf.mustApply(vol("db", "a", "b"))
	tf.mustApply(SetContainer{Volume: "db", Spec: appSpec("web", "a", "db")})
	tf.mustApply(SetContainer{Volume: "db", Spec: appSpec("app", "a", "db")})
	// Repeating or replacing by name keeps one record per name.
	moved := appSpec("app", "b", "db")
	tf.mustApply(SetContainer{Volume: "db", Spec: moved})
	tf.mustApply(SetContainer{Volume: "db", Spec: moved})
	v, _ := tf.f.get("db")
	if len(v.Containers) != 2 || v.Containers[0].Name != "app" || v.Containers[0].Node != "b" || v.Containers[1].Name != "web" {
		t.Fatalf("records = %+v", v.Containers)
	}
	// The catalog's copy is not shared with the caller's.
	v.Containers[0].Env[0] = "changed"
	if w, _ := tf.f.get("db"); w.Containers[0].Env[0] != "A=1" {
		t.Fatal("get returned a shared spec")
	}
	// A removal by the old host leaves the new host's record alone.
	tf.mustApply(RemoveContainer{Volume: "db", Name: "app", Node: "a"})
	if v, _ := tf.f.get("db"); len(v.Containers) != 2 {
		t.Fatalf("removal by a stale node dropped a record: %+v", v.Containers)
	}
	tf.mustApply(RemoveContainer{Volume: "db", Name: "app", Node: "b"})
	tf.mustApply(RemoveContainer{Volume: "db", Name: "app", Node: "b"}) // absent: no-op
	if v, _ := tf.f.get("db"); len(v.Containers) != 1 || v.Containers[0].Name != "web" {
		t.Fatalf("after removal: %+v", v.Containers)
	}
	// Snapshots keep the records.
	got := snapshotRoundTrip(t, tf.f)
	if v, _ := got.get("db"); len(v.Containers) != 1 || !v.Containers[0].Equal(appSpec("web", "a", "db")) {
		t.Fatalf("restored records: %+v", v.Containers)
	}
}

func TestContainerRecordsRefused(t *testing.T) {
	big := appSpec("big", "a", "db")
	big.Env = []string{strings.Repeat("x", MaxContainerSpecBytes)}
	noVol := appSpec("other", "a", "elsewhere")
	cases := map[string]struct {
		cmd  Command
		want error
	}{
		"unknown volume":  {SetContainer{Volume: "nope", Spec: appSpec("app", "a", "nope")}, ErrNoVolume},
		"bad name":        {SetContainer{Volume: "db", Spec: appSpec("/app", "a", "db")}, ErrInvalidCommand},
		"no image":        {SetContainer{Volume: "db", Spec: func() ContainerSpec { s := appSpec("app", "a", "db"); s.Image = " "; return s }()}, ErrInvalidCommand},
		"bad restart":     {SetContainer{Volume: "db", Spec: func() ContainerSpec { s := appSpec("app", "a", "db"); s.Restart = "sometimes"; return s }()}, ErrInvalidCommand},
		"relative mount":  {SetContainer{Volume: "db", Spec: func() ContainerSpec { s := appSpec("app", "a", "db"); s.Mounts[0].Target = "data"; return s }()}, ErrInvalidCommand},
		"too big":         {SetContainer{Volume: "db", Spec: big}, ErrInvalidCommand},
		"other volume":    {SetContainer{Volume: "db", Spec: noVol}, ErrInvalidCommand},
		"remove from nil": {RemoveContainer{Volume: "nope", Name: "app", Node: "a"}, ErrNoVolume},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			tf := newTestFSM(t)
			tf.mustApply(vol("db", "a"))
			if err := tf.apply(tc.cmd); !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			if v, _ := tf.f.get("db"); len(v.Containers) != 0 {
				t.Fatalf("a refused command changed the catalog: %+v", v.Containers)
			}
		})
	}
	t.Run("limit", func(t *testing.T) {
		tf := newTestFSM(t)
		tf.mustApply(vol("db", "a"))
		for i := range MaxContainersPerVolume {
			tf.mustApply(SetContainer{Volume: "db", Spec: appSpec("c"+string(rune('a'+i)), "a", "db")})
		}
		if err := tf.apply(SetContainer{Volume: "db", Spec: appSpec("one-more", "a", "db")}); !errors.Is(err, ErrInvalidCommand) {
			t.Fatalf("record beyond the limit: %v", err)
		}
		// Replacing an existing record still works at the limit.
		tf.mustApply(SetContainer{Volume: "db", Spec: appSpec("ca", "b", "db")})
	})
}

func TestContainerCommandsAreIgnorable(t *testing.T) {
	for _, cmd := range []Command{SetContainer{Volume: "db", Spec: appSpec("app", "a", "db")}, RemoveContainer{Volume: "db", Name: "app", Node: "a"}} {
		b, err := Encode(cmd)
		if err != nil {
			t.Fatal(err)
		}
		if b[0]&IgnoreUnknownFlag == 0 {
			t.Fatalf("%T is encoded without IgnoreUnknownFlag", cmd)
		}
	}
	if b, _ := Encode(DeleteVolume{Name: "db"}); b[0]&IgnoreUnknownFlag != 0 {
		t.Fatal("DeleteVolume must not be ignorable")
	}
}

// snapshotRoundTrip snapshots f and restores it into a new fsm.
func snapshotRoundTrip(t *testing.T, f *fsm) *fsm {
	t.Helper()
	snap, err := f.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := snap.(*fsmSnapshot).write(&buf); err != nil {
		t.Fatal(err)
	}
	restored := newFSM(slog.New(slog.DiscardHandler), nil)
	if err := restored.Restore(io.NopCloser(&buf)); err != nil {
		t.Fatal(err)
	}
	return restored
}

// TestSkippedCommandCountsAsApplied: a command a node does not know but may
// ignore is applied as a no-op: the catalog's applied index passes it, so
// nothing that waits for it (a write's caller, CatalogCurrent after a
// restart) waits for ever.
func TestSkippedCommandCountsAsApplied(t *testing.T) {
	f := newFSM(slog.New(slog.DiscardHandler), nil)
	if got := f.Apply(&raft.Log{Index: 7, Type: raft.LogCommand, Data: []byte{99 | IgnoreUnknownFlag, 1, '{', '}'}}); got != nil {
		t.Fatalf("Apply of an ignorable unknown command = %v", got)
	}
	if i := f.appliedIndex(); i != 7 {
		t.Fatalf("applied index %d after the skipped command at 7", i)
	}
}
