package cluster

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

// testFSM applies encoded commands straight to an fsm at increasing indexes.
type testFSM struct {
	t     *testing.T
	f     *fsm
	index uint64
	log   []*raft.Log
}

func newTestFSM(t *testing.T) *testFSM {
	return &testFSM{t: t, f: newFSM(slog.New(slog.DiscardHandler), nil)}
}

func (tf *testFSM) apply(cmd Command) error {
	tf.t.Helper()
	b, err := Encode(cmd)
	if err != nil {
		tf.t.Fatal(err)
	}
	tf.index++
	l := &raft.Log{Index: tf.index, Term: 1, Type: raft.LogCommand, Data: b}
	tf.log = append(tf.log, l)
	resp := tf.f.Apply(l)
	if resp == nil {
		return nil
	}
	err, ok := resp.(error)
	if !ok {
		tf.t.Fatalf("Apply response %T is not an error", resp)
	}
	return err
}

func (tf *testFSM) mustApply(cmd Command) {
	tf.t.Helper()
	if err := tf.apply(cmd); err != nil {
		tf.t.Fatalf("applying %#v: %v", cmd, err)
	}
}

var t0 = time.Date(2026, 12, 7, 9, 0, 0, 0, time.UTC)

func vol(name, primary string, replicas ...string) CreateVolume {
	return CreateVolume{Volume: Volume{Name: name, Replicas: len(replicas) + 1, Primary: primary, ReplicaNodes: replicas, Epoch: 1, CreatedAt: t0}}
}

func TestFSMCommands(t *testing.T) {
	tf := newTestFSM(t)
	tf.mustApply(vol("db", "a", "b", "c"))
	v, ok := tf.f.get("db")
	if !ok || v.Primary != "a" || !reflect.DeepEqual(v.ReplicaNodes, []string{"b", "c"}) || v.Epoch != 1 || !v.CreatedAt.Equal(t0) || v.Replicas != 3 {
		t.Fatalf("after create: %+v", v)
	}

	cut := t0.Add(time.Minute)
	tf.mustApply(UpdateProgress{Name: "db", Node: "b", Epoch: 1, Seq: 5, CutUnixNano: cut.UnixNano()})
	tf.mustApply(UpdateProgress{Name: "db", Node: "b", Epoch: 1, Seq: 3, CutUnixNano: t0.UnixNano()}) // older: ignored
	v, _ = tf.f.get("db")
	if p := v.Progress["b"]; p.Epoch != 1 || p.Seq != 5 || !p.Cut.Equal(cut) {
		t.Fatalf("progress of b = %+v, want epoch 1 seq 5 cut %v", p, cut)
	}

	tf.mustApply(SetPrimary{Name: "db", Primary: "b", ReplicaNodes: []string{"c", "a"}, Epoch: 2, ExpectEpoch: 1})
	v, _ = tf.f.get("db")
	if v.Primary != "b" || v.Epoch != 2 || !reflect.DeepEqual(v.ReplicaNodes, []string{"c", "a"}) {
		t.Fatalf("after set primary: %+v", v)
	}
	tf.mustApply(UpdateProgress{Name: "db", Node: "b", Epoch: 2, Seq: 1})
	v, _ = tf.f.get("db")
	if p := v.Progress["b"]; p.Epoch != 2 || p.Seq != 1 || !p.Cut.IsZero() {
		t.Fatalf("new epoch progress = %+v", p)
	}

	tf.mustApply(DeleteVolume{Name: "db"})
	if _, ok := tf.f.get("db"); ok {
		t.Fatal("volume still there after delete")
	}
}

func TestFSMBusinessErrors(t *testing.T) {
	tf := newTestFSM(t)
	tf.mustApply(vol("db", "a", "b"))
	for _, tc := range []struct {
		name string
		cmd  Command
		want error
	}{
		{"create exists", vol("db", "x", "y"), ErrVolumeExists},
		{"create bad name", vol("-db", "a"), ErrInvalidName},
		{"create too many replicas", vol("big", "a", "b", "c", "d", "e", "f", "g", "h"), ErrInvalidReplicas},
		{"create primary repeated", vol("dup", "a", "a"), ErrInvalidCommand},
		{"create count mismatch", CreateVolume{Volume: Volume{Name: "m", Replicas: 3, Primary: "a", ReplicaNodes: []string{"b"}, Epoch: 1}}, ErrInvalidCommand},
		{"create epoch zero", CreateVolume{Volume: Volume{Name: "z", Replicas: 1, Primary: "a"}}, ErrInvalidCommand},
		{"delete missing", DeleteVolume{Name: "nope"}, ErrNoVolume},
		{"set primary missing", SetPrimary{Name: "nope", Primary: "b", Epoch: 2, ExpectEpoch: 1}, ErrNoVolume},
		{"set primary wrong expect", SetPrimary{Name: "db", Primary: "b", Epoch: 3, ExpectEpoch: 2}, ErrEpochMismatch},
		{"set primary skips epoch", SetPrimary{Name: "db", Primary: "b", Epoch: 3, ExpectEpoch: 1}, ErrEpochMismatch},
		{"set primary same epoch", SetPrimary{Name: "db", Primary: "b", Epoch: 1, ExpectEpoch: 1}, ErrEpochMismatch},
		{"set primary no primary", SetPrimary{Name: "db", Epoch: 2, ExpectEpoch: 1}, ErrInvalidCommand},
		{"progress missing volume", UpdateProgress{Name: "nope", Node: "a", Epoch: 1, Seq: 1}, ErrNoVolume},
		{"progress stranger", UpdateProgress{Name: "db", Node: "z", Epoch: 1, Seq: 1}, ErrNotParticipant},
		{"progress future epoch", UpdateProgress{Name: "db", Node: "b", Epoch: 2, Seq: 1}, ErrEpochMismatch},
		{"set deleted missing", SetDeleted{Name: "nope", DeletedUnixNano: 1}, ErrNoVolume},
		{"set deleted no time", SetDeleted{Name: "db"}, ErrInvalidCommand},
		{"undelete missing", Undelete{Name: "nope"}, ErrNoVolume},
		{"undelete live volume", Undelete{Name: "db"}, ErrNotDeleted},
		{"purge of a live volume", DeleteVolume{Name: "db", ExpectDeletedUnixNano: 5}, ErrNotDeleted},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := tf.f.list()
			if err := tf.apply(tc.cmd); !errors.Is(err, tc.want) {
				t.Fatalf("apply error = %v, want %v", err, tc.want)
			}
			if after := tf.f.list(); !reflect.DeepEqual(before, after) {
				t.Fatalf("refused command changed the catalog:\nbefore %+v\nafter  %+v", before, after)
			}
		})
	}
}

func TestFSMReplayIsHarmless(t *testing.T) {
	tf := newTestFSM(t)
	tf.mustApply(vol("a", "n1", "n2"))
	tf.mustApply(vol("b", "n2", "n3"))
	tf.mustApply(UpdateProgress{Name: "a", Node: "n2", Epoch: 1, Seq: 4})
	tf.mustApply(SetPrimary{Name: "a", Primary: "n2", ReplicaNodes: []string{"n1"}, Epoch: 2, ExpectEpoch: 1})
	tf.mustApply(vol("c", "n3"))
	tf.mustApply(DeleteVolume{Name: "c"})
	want := tf.f.list()

	// The same entries again (same indexes) are skipped.
	for _, l := range tf.log {
		if resp := tf.f.Apply(l); resp != nil {
			t.Fatalf("replaying index %d answered %v", l.Index, resp)
		}
	}
	if got := tf.f.list(); !reflect.DeepEqual(got, want) {
		t.Fatalf("replay changed the catalog:\n got %+v\nwant %+v", got, want)
	}

	// A fresh FSM fed the log twice over ends in the same state.
	fresh := newFSM(slog.New(slog.DiscardHandler), nil)
	for _, l := range append(tf.log, tf.log...) {
		fresh.Apply(l)
	}
	if got := fresh.list(); !reflect.DeepEqual(got, want) {
		t.Fatalf("fresh replay:\n got %+v\nwant %+v", got, want)
	}
}

func TestFSMUnknownCommands(t *testing.T) {
	f := newFSM(slog.New(slog.DiscardHandler), nil)
	skipped := []byte{99 | IgnoreUnknownFlag, 1, '{', '}'}
	if resp := f.Apply(&raft.Log{Index: 1, Type: raft.LogCommand, Data: skipped}); resp != nil {
		t.Fatalf("flagged unknown command answered %v", resp)
	}
	defer func() {
		if recover() == nil {
			t.Fatal("an unknown command without the ignore flag must stop the FSM")
		}
	}()
	f.Apply(&raft.Log{Index: 2, Type: raft.LogCommand, Data: []byte{99, 1, '{', '}'}})
}

func TestFSMNonCommandEntriesIgnored(t *testing.T) {
	f := newFSM(slog.New(slog.DiscardHandler), nil)
	if resp := f.Apply(&raft.Log{Index: 1, Type: raft.LogNoop}); resp != nil {
		t.Fatalf("noop answered %v", resp)
	}
}

func TestFSMChangeSignal(t *testing.T) {
	changes := 0
	f := newFSM(slog.New(slog.DiscardHandler), func() { changes++ })
	b, _ := Encode(vol("a", "n1"))
	f.Apply(&raft.Log{Index: 1, Type: raft.LogCommand, Data: b})
	f.Apply(&raft.Log{Index: 2, Type: raft.LogCommand, Data: b}) // refused: no change
	if changes != 1 {
		t.Fatalf("onChange called %d times, want 1", changes)
	}
}

func TestFSMSnapshotRestore(t *testing.T) {
	tf := newTestFSM(t)
	for i := range 1000 {
		name := fmt.Sprintf("vol-%04d", i)
		tf.mustApply(vol(name, "n1", "n2", "n3"))
		tf.mustApply(UpdateProgress{Name: name, Node: "n2", Epoch: 1, Seq: uint64(i), CutUnixNano: t0.Add(time.Duration(i) * time.Second).UnixNano()})
		if i%3 == 0 {
			tf.mustApply(SetPrimary{Name: name, Primary: "n2", ReplicaNodes: []string{"n3", "n1"}, Epoch: 2, ExpectEpoch: 1})
		}
	}
	want := tf.f.list()

	store := raft.NewInmemSnapshotStore()
	snap, err := tf.f.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	sink, err := store.Create(raft.SnapshotVersionMax, tf.index, 1, raft.Configuration{}, 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := snap.Persist(sink); err != nil {
		t.Fatal(err)
	}
	snap.Release()
	// Changes after the snapshot must not leak into it.
	tf.mustApply(DeleteVolume{Name: "vol-0000"})

	restored := newFSM(slog.New(slog.DiscardHandler), nil)
	restored.volumes["stale"] = &Volume{Name: "stale"}
	_, rc, err := store.Open(sink.ID())
	if err != nil {
		t.Fatal(err)
	}
	if err := restored.Restore(rc); err != nil {
		t.Fatal(err)
	}
	got := restored.list()
	if len(got) != 1000 || !reflect.DeepEqual(got, want) {
		t.Fatalf("restored %d volumes; differs from the snapshotted catalog", len(got))
	}
	// The restored FSM knows where it is in the log and skips replays.
	if resp := restored.Apply(tf.log[0]); resp != nil {
		t.Fatalf("replayed entry after restore answered %v", resp)
	}
}

func TestFSMRestoreRejectsGarbage(t *testing.T) {
	f := newFSM(slog.New(slog.DiscardHandler), nil)
	for _, in := range []string{"", "not json", `{"format":"other","version":1}`, `{"format":"tether-catalog","version":9}`,
		`{"format":"tether-catalog","version":1,"records":2}` + "\n" + `{"type":"volume","volume":{"name":"a"}}`,
		`{"format":"tether-catalog","version":1,"records":1}` + "\n" + `{"type":"martian"}`} {
		if err := f.Restore(io.NopCloser(strings.NewReader(in))); err == nil {
			t.Errorf("Restore(%q) succeeded", in)
		}
	}
}

// TestFSMSoftDelete: delete keeps the volume with its first deletion time,
// undelete clears it, and a purge bound to an old deletion is refused
// after an undelete (and a later delete).
func TestFSMSoftDelete(t *testing.T) {
	tf := newTestFSM(t)
	tf.mustApply(vol("db", "a", "b"))
	tf.mustApply(SetDeleted{Name: "db", DeletedUnixNano: 100})
	tf.mustApply(SetDeleted{Name: "db", DeletedUnixNano: 200})
	v, _ := tf.f.get("db")
	if !v.Deleted() || v.DeletedUnixNano != 100 {
		t.Fatalf("after two deletes: %+v", v)
	}
	tf.mustApply(Undelete{Name: "db"})
	tf.mustApply(SetDeleted{Name: "db", DeletedUnixNano: 300})
	if err := tf.apply(DeleteVolume{Name: "db", ExpectDeletedUnixNano: 100}); !errors.Is(err, ErrNotDeleted) {
		t.Fatalf("stale purge: %v", err)
	}
	if _, ok := tf.f.get("db"); !ok {
		t.Fatal("a stale purge removed the volume")
	}
	tf.mustApply(DeleteVolume{Name: "db", ExpectDeletedUnixNano: 300})
	if _, ok := tf.f.get("db"); ok {
		t.Fatal("purge did not remove the volume")
	}
}
