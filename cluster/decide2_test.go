package cluster

import (
	"context"
	"errors"
	"reflect"
	"testing"
	"time"
)

func TestBehindAndBlocked(t *testing.T) {
	v := Volume{Name: "v", Primary: "p", ReplicaNodes: []string{"a", "b", "c"}, Epoch: 2, MaxLag: 10 * time.Second, CreatedAt: t0,
		Progress: map[string]Progress{
			"p": {Epoch: 2, Seq: 50, Cut: t0.Add(60 * time.Second)},
			"a": {Epoch: 2, Seq: 50, Cut: t0.Add(60 * time.Second)},
			"b": {Epoch: 2, Seq: 40, Cut: t0.Add(45 * time.Second)},
		}}
	for _, tc := range []struct {
		node    string
		behind  time.Duration
		blocked bool
	}{
		{"a", 0, false},
		{"b", 15 * time.Second, true},
		{"c", 60 * time.Second, true}, // no batch recorded: as empty as at creation
	} {
		behind, blocked := FailoverBlocked(v, tc.node)
		if behind != tc.behind || blocked != tc.blocked {
			t.Errorf("%s: behind %s blocked %v; want %s %v", tc.node, behind, blocked, tc.behind, tc.blocked)
		}
	}
	// A fresh volume whose replica's first acknowledgement was not recorded
	// yet when the primary died: behind by what was written since creation.
	fresh := Volume{Name: "f", Primary: "p", ReplicaNodes: []string{"r"}, Epoch: 1, MaxLag: time.Minute, CreatedAt: t0,
		Progress: map[string]Progress{"p": {Epoch: 1, Seq: 3, Cut: t0.Add(2 * time.Second)}}}
	if behind, blocked := FailoverBlocked(fresh, "r"); blocked || behind != 2*time.Second {
		t.Errorf("fresh volume: behind %s blocked %v; want 2s, not blocked", behind, blocked)
	}
	v.MaxLag = 0
	if _, blocked := FailoverBlocked(v, "c"); blocked {
		t.Error("max lag 0 must mean no bound")
	}
	// No head reported: nothing to measure against.
	delete(v.Progress, "p")
	if b := Behind(v, "b"); b != 0 {
		t.Errorf("without a head, behind = %s", b)
	}
}

func TestFailoversRespectMaxLag(t *testing.T) {
	vols := []Volume{{Name: "v", Primary: "p", ReplicaNodes: []string{"b"}, Epoch: 1, MaxLag: time.Second,
		Progress: map[string]Progress{"p": {Epoch: 1, Seq: 9, Cut: t0.Add(time.Minute)}, "b": {Epoch: 1, Seq: 2, Cut: t0}}}}
	health := map[string]string{"p": HealthDead, "b": HealthAlive}
	if got := Failovers(vols, health, nil, nil, nil, t0, 0); got != nil {
		t.Fatalf("promoted a copy a minute behind with max lag 1s: %+v", got)
	}
	if s := VolumeState(vols[0], health); s != StateNeedsOperator {
		t.Fatalf("state %q, want %q", s, StateNeedsOperator)
	}
}

func TestManualPromotion(t *testing.T) {
	v := Volume{Name: "v", Primary: "p", ReplicaNodes: []string{"a", "b"}, Epoch: 3, MaxLag: time.Second,
		Progress: map[string]Progress{"p": {Epoch: 3, Seq: 9, Cut: t0.Add(time.Minute)}, "a": {Epoch: 3, Seq: 9, Cut: t0.Add(time.Minute)}, "b": {Epoch: 3, Seq: 1, Cut: t0}}}
	dead := map[string]string{"p": HealthDead, "a": HealthAlive, "b": HealthAlive, "x": HealthAlive}
	for _, tc := range []struct {
		name   string
		to     string
		health map[string]string
		force  bool
		err    error
	}{
		{"caught-up replica", "a", dead, false, nil},
		{"lagging replica refused", "b", dead, false, ErrTooFarBehind},
		{"lagging replica forced", "b", dead, true, nil},
		{"not a replica", "x", dead, true, ErrInvalidCommand},
		{"already primary", "p", dead, true, ErrInvalidCommand},
		{"primary alive", "a", map[string]string{"p": HealthAlive, "a": HealthAlive}, true, ErrPrimaryAlive},
		{"target dead", "a", map[string]string{"p": HealthDead, "a": HealthDead}, true, ErrNotEnoughNodes},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cmd, _, err := ManualPromotion(v, tc.to, tc.health, tc.force)
			if !errors.Is(err, tc.err) {
				t.Fatalf("err = %v, want %v", err, tc.err)
			}
			if err != nil {
				return
			}
			if cmd.Primary != tc.to || cmd.Epoch != 4 || cmd.ExpectEpoch != 3 || cmd.ReplicaNodes[len(cmd.ReplicaNodes)-1] != "p" {
				t.Fatalf("cmd = %+v", cmd)
			}
		})
	}
}

func TestRepairs(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 10, 0, 0, time.UTC)
	vols := []Volume{
		{Name: "a", Replicas: 3, Primary: "n1", ReplicaNodes: []string{"n2", "n3"}, Epoch: 1},
		{Name: "b", Replicas: 2, Primary: "n3", ReplicaNodes: []string{"n1"}, Epoch: 5}, // primary dead: failover's job, not ours
		{Name: "c", Replicas: 2, Primary: "n1", ReplicaNodes: []string{"n4"}, Epoch: 2},
	}
	health := map[string]string{"n1": HealthAlive, "n2": HealthAlive, "n3": HealthDead, "n4": HealthDead, "n5": HealthAlive, "n6": HealthAlive}
	since := map[string]time.Time{"n3": now.Add(-5 * time.Minute), "n4": now.Add(-10 * time.Second)}
	load := map[string]int{"n5": 3, "n6": 1}
	got := Repairs(vols, health, since, now, time.Minute, load, nil)
	want := []SetReplicas{{Name: "a", ReplicaNodes: []string{"n2", "n6"}, ExpectEpoch: 1}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %+v, want %+v", got, want)
	}
	// No spare node: the dead replica stays.
	delete(health, "n5")
	delete(health, "n6")
	if got := Repairs(vols, health, since, now, time.Minute, map[string]int{}, nil); got != nil {
		t.Fatalf("replaced without a spare: %+v", got)
	}
}

func TestFSMSetReplicas(t *testing.T) {
	tf := newTestFSM(t)
	tf.mustApply(vol("v", "a", "b", "c"))
	tf.mustApply(UpdateProgress{Name: "v", Node: "c", Epoch: 1, Seq: 4})
	if err := tf.apply(SetReplicas{Name: "v", ReplicaNodes: []string{"b", "d"}, ExpectEpoch: 2}); !errors.Is(err, ErrEpochMismatch) {
		t.Fatalf("stale epoch accepted: %v", err)
	}
	if err := tf.apply(SetReplicas{Name: "v", ReplicaNodes: []string{"b", "a"}, ExpectEpoch: 1}); !errors.Is(err, ErrInvalidCommand) {
		t.Fatalf("primary as replica accepted: %v", err)
	}
	tf.mustApply(SetReplicas{Name: "v", ReplicaNodes: []string{"b", "d"}, ExpectEpoch: 1})
	v, _ := tf.f.get("v")
	if !reflect.DeepEqual(v.ReplicaNodes, []string{"b", "d"}) {
		t.Fatalf("replicas %v", v.ReplicaNodes)
	}
	if _, ok := v.Progress["c"]; ok {
		t.Fatal("a removed replica kept its progress")
	}
}

func TestDeadServers(t *testing.T) {
	now := time.Date(2026, 1, 1, 1, 0, 0, 0, time.UTC)
	long, short := now.Add(-time.Hour), now.Add(-time.Second)
	v := func(ids ...string) []RaftServer {
		var out []RaftServer
		for _, id := range ids {
			out = append(out, RaftServer{ID: id, Voter: true})
		}
		return out
	}
	for _, tc := range []struct {
		name    string
		servers []RaftServer
		health  map[string]string
		since   map[string]time.Time
		want    []string
	}{
		{"one dead of three goes", v("a", "b", "c"),
			map[string]string{"a": HealthAlive, "b": HealthAlive, "c": HealthDead}, map[string]time.Time{"c": long}, []string{"c"}},
		{"not before the grace", v("a", "b", "c"),
			map[string]string{"a": HealthAlive, "b": HealthAlive, "c": HealthDead}, map[string]time.Time{"c": short}, nil},
		{"two dead of five: both go, three alive stay a quorum of three", v("a", "b", "c", "d", "e"),
			map[string]string{"a": HealthAlive, "b": HealthAlive, "c": HealthAlive, "d": HealthDead, "e": HealthDead},
			map[string]time.Time{"d": long, "e": long}, []string{"d", "e"}},
		{"two dead of three: no quorum left, remove none", v("a", "b", "c"),
			map[string]string{"a": HealthAlive, "b": HealthDead, "c": HealthDead}, map[string]time.Time{"b": long, "c": long}, nil},
		{"never self", v("a", "b", "c"),
			map[string]string{"a": HealthDead, "b": HealthAlive, "c": HealthAlive}, map[string]time.Time{"a": long}, nil},
		{"dead nonvoter goes first", append(v("a", "b", "c"), RaftServer{ID: "n"}),
			map[string]string{"a": HealthAlive, "b": HealthAlive, "c": HealthAlive, "n": HealthDead}, map[string]time.Time{"n": long}, []string{"n"}},
		{"unknown health is not dead", v("a", "b", "c"),
			map[string]string{"a": HealthAlive, "b": HealthAlive}, map[string]time.Time{"c": long}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := DeadServers(tc.servers, "a", tc.health, tc.since, now, time.Minute)
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("got %v, want %v", got, tc.want)
			}
		})
	}
}

func TestLabels(t *testing.T) {
	if !Eligible(map[string]string{"zone": "a", "x": "1"}, map[string]string{"zone": "a"}) || Eligible(nil, map[string]string{"zone": "a"}) || !Eligible(nil, nil) {
		t.Fatal("Eligible")
	}
	for _, bad := range []map[string]string{{"": "a"}, {"k": ""}, {"k k": "v"}, {"k": "v/../"}, {"a": "1", "b": "1", "c": "1", "d": "1", "e": "1", "f": "1", "g": "1", "h": "1", "i": "1"}} {
		if err := ValidateLabels(bad); !errors.Is(err, ErrInvalidLabels) {
			t.Errorf("ValidateLabels(%v) = %v", bad, err)
		}
	}
	tf := newTestFSM(t)
	c := vol("v", "a")
	c.Volume.Placement = map[string]string{"zone": "a/b"}
	if err := tf.apply(c); !errors.Is(err, ErrInvalidLabels) {
		t.Fatalf("FSM accepted bad placement: %v", err)
	}
	// A spare must satisfy the placement.
	now := time.Date(2026, 1, 1, 0, 10, 0, 0, time.UTC)
	vols := []Volume{{Name: "a", Replicas: 2, Primary: "n1", ReplicaNodes: []string{"n2"}, Epoch: 1, Placement: map[string]string{"zone": "a"}}}
	health := map[string]string{"n1": HealthAlive, "n2": HealthDead, "n3": HealthAlive, "n4": HealthAlive}
	labels := map[string]map[string]string{"n3": {"zone": "b"}, "n4": {"zone": "a"}}
	got := Repairs(vols, health, map[string]time.Time{"n2": now.Add(-time.Hour)}, now, time.Minute, map[string]int{"n4": 9}, labels)
	if len(got) != 1 || !reflect.DeepEqual(got[0].ReplicaNodes, []string{"n4"}) {
		t.Fatalf("replacement ignoring placement: %+v", got)
	}
}

func TestRepairsCountAndPlacement(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 10, 0, 0, time.UTC)
	alive := map[string]string{"p": HealthAlive, "a": HealthAlive, "b": HealthAlive, "c": HealthAlive, "d": HealthAlive}
	zoneA := map[string]map[string]string{"p": {"z": "a"}, "a": {"z": "a"}, "b": {"z": "b"}, "c": {"z": "a"}, "d": {"z": "a"}}
	caught := func(nodes ...string) map[string]Progress {
		m := map[string]Progress{}
		for _, n := range nodes {
			m[n] = Progress{Epoch: 1, Seq: 3}
		}
		return m
	}
	for _, tc := range []struct {
		name string
		v    Volume
		want []string // nil: no change
	}{
		{"scale up adds spares", Volume{Replicas: 4, Primary: "p", ReplicaNodes: []string{"a"}}, []string{"a", "b", "c"}},
		{"scale down drops the furthest behind", Volume{Replicas: 2, Primary: "p", ReplicaNodes: []string{"a", "b", "c"}, Progress: map[string]Progress{"a": {Epoch: 1, Seq: 2}, "b": {Epoch: 1, Seq: 9}, "c": {Epoch: 1, Seq: 5}}}, []string{"b"}},
		{"violator gets a spare beside it first", Volume{Replicas: 3, Primary: "p", ReplicaNodes: []string{"a", "b"}, Placement: map[string]string{"z": "a"}, Progress: caught("a", "b")}, []string{"a", "b", "c"}},
		{"violator kept while the spare catches up", Volume{Replicas: 3, Primary: "p", ReplicaNodes: []string{"a", "b", "c"}, Placement: map[string]string{"z": "a"}, Progress: caught("a", "b")}, nil},
		{"violator dropped once the spare caught up", Volume{Replicas: 3, Primary: "p", ReplicaNodes: []string{"a", "b", "c"}, Placement: map[string]string{"z": "a"}, Progress: caught("a", "b", "c")}, []string{"a", "c"}},
		{"steady state", Volume{Replicas: 3, Primary: "p", ReplicaNodes: []string{"a", "c"}, Placement: map[string]string{"z": "a"}, Progress: caught("a", "c")}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.v.Name, tc.v.Epoch = "v", 1
			got := Repairs([]Volume{tc.v}, alive, nil, now, time.Minute, map[string]int{"d": 5}, zoneA)
			if tc.want == nil {
				if got != nil {
					t.Fatalf("changed: %+v", got)
				}
				return
			}
			if len(got) != 1 || !reflect.DeepEqual(got[0].ReplicaNodes, tc.want) {
				t.Fatalf("got %+v, want replicas %v", got, tc.want)
			}
		})
	}
}

func TestFSMUpdateVolume(t *testing.T) {
	tf := newTestFSM(t)
	tf.mustApply(vol("v", "a", "b"))
	n, lag, pl := 3, time.Minute, map[string]string{"z": "a"}
	tf.mustApply(UpdateVolume{Name: "v", Replicas: &n, MaxLag: &lag, Placement: &pl})
	v, _ := tf.f.get("v")
	if v.Replicas != 3 || v.MaxLag != time.Minute || v.Placement["z"] != "a" || len(v.ReplicaNodes) != 1 {
		t.Fatalf("after update: %+v", v)
	}
	bad := 9
	if err := tf.apply(UpdateVolume{Name: "v", Replicas: &bad}); !errors.Is(err, ErrInvalidReplicas) {
		t.Fatalf("replicas 9: %v", err)
	}
	empty := map[string]string{}
	tf.mustApply(UpdateVolume{Name: "v", Placement: &empty})
	if v, _ := tf.f.get("v"); v.Placement != nil || v.Replicas != 3 {
		t.Fatalf("clearing placement: %+v", v)
	}
}

// TestLandedAfterIndeterminate: after a commit of unknown outcome, a
// refused repeat counts as success exactly when the catalog shows the
// first attempt's result.
func TestLandedAfterIndeterminate(t *testing.T) {
	tf := newTestFSM(t)
	c := &Cluster{fsm: tf.f}
	create := vol("v", "a", "b")
	tf.mustApply(create)
	ctx := context.Background()
	if !c.landed(ctx, create) {
		t.Fatal("our own create not recognised")
	}
	other := create
	other.Volume.CreatedAt = create.Volume.CreatedAt.Add(time.Second)
	if c.landed(ctx, other) {
		t.Fatal("someone else's volume of the same name taken for ours")
	}
	sp := SetPrimary{Name: "v", Primary: "b", ReplicaNodes: []string{"a"}, Epoch: 2, ExpectEpoch: 1}
	if c.landed(ctx, sp) {
		t.Fatal("a promotion that did not happen counted as landed")
	}
	tf.mustApply(sp)
	if !c.landed(ctx, sp) {
		t.Fatal("a promotion that happened not recognised")
	}
}
