package cluster

import (
	"errors"
	"reflect"
	"testing"
	"time"
)

func TestPlace(t *testing.T) {
	for _, tc := range []struct {
		name        string
		local       string
		alive       []string
		load        map[string]int
		n           int
		wantPrimary string
		wantReplica []string
		wantErr     error
	}{
		{"local preferred", "b", []string{"a", "b", "c"}, nil, 3, "b", []string{"a", "c"}, nil},
		{"single copy", "c", []string{"a", "b", "c"}, nil, 1, "c", nil, nil},
		{"least loaded replicas", "a", []string{"a", "b", "c", "d"}, map[string]int{"b": 5, "c": 1, "d": 0}, 3, "a", []string{"d", "c"}, nil},
		{"local not alive: least loaded primary", "z", []string{"a", "b", "c"}, map[string]int{"a": 2, "b": 1, "c": 1}, 2, "b", []string{"c"}, nil},
		{"local loaded still primary", "a", []string{"a", "b"}, map[string]int{"a": 9}, 2, "a", []string{"b"}, nil},
		{"duplicates ignored", "a", []string{"a", "a", "b"}, nil, 2, "a", []string{"b"}, nil},
		{"too few alive", "a", []string{"a", "b"}, nil, 3, "", nil, ErrNotEnoughNodes},
		{"duplicates do not count", "a", []string{"a", "a", "a"}, nil, 2, "", nil, ErrNotEnoughNodes},
		{"zero replicas", "a", []string{"a"}, nil, 0, "", nil, ErrInvalidReplicas},
		{"too many replicas", "a", []string{"a", "b", "c", "d", "e", "f", "g", "h"}, nil, 8, "", nil, ErrInvalidReplicas},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, r, err := Place(tc.local, tc.alive, tc.load, tc.n)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("error = %v, want %v", err, tc.wantErr)
			}
			if p != tc.wantPrimary || !reflect.DeepEqual(r, tc.wantReplica) {
				t.Fatalf("Place = %q %q, want %q %q", p, r, tc.wantPrimary, tc.wantReplica)
			}
		})
	}
}

func TestChooseFailover(t *testing.T) {
	prog := func(pairs ...any) map[string]Progress {
		m := map[string]Progress{}
		for i := 0; i < len(pairs); i += 3 {
			m[pairs[i].(string)] = Progress{Epoch: uint64(pairs[i+1].(int)), Seq: uint64(pairs[i+2].(int))}
		}
		return m
	}
	base := Volume{Name: "db", Replicas: 3, Primary: "a", ReplicaNodes: []string{"b", "c"}, Epoch: 4}
	with := func(p map[string]Progress) Volume { v := base.clone(); v.Progress = p; return v }
	alive := map[string]string{"a": HealthDead, "b": HealthAlive, "c": HealthAlive}
	for _, tc := range []struct {
		name   string
		v      Volume
		health map[string]string
		want   string // new primary, "" for none
	}{
		{"primary alive", base, map[string]string{"a": HealthAlive, "b": HealthAlive, "c": HealthAlive}, ""},
		{"primary suspect", base, map[string]string{"a": HealthSuspect, "b": HealthAlive, "c": HealthAlive}, ""},
		{"primary unknown", base, map[string]string{"b": HealthAlive, "c": HealthAlive}, ""},
		{"tie goes to smaller name", base, alive, "b"},
		{"higher seq wins", with(prog("b", 4, 3, "c", 4, 9)), alive, "c"},
		{"higher epoch beats seq", with(prog("b", 4, 1, "c", 3, 99)), alive, "b"},
		{"equal progress smaller name", with(prog("b", 4, 2, "c", 4, 2)), alive, "b"},
		{"only alive replicas", with(prog("b", 4, 9)), map[string]string{"a": HealthLeft, "b": HealthDead, "c": HealthAlive}, "c"},
		{"suspect replica skipped", base, map[string]string{"a": HealthDead, "b": HealthSuspect, "c": HealthAlive}, "c"},
		{"no live replica", base, map[string]string{"a": HealthDead, "b": HealthDead, "c": HealthLeft}, ""},
		{"single copy volume", Volume{Name: "x", Replicas: 1, Primary: "a", Epoch: 1}, alive, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cmd, ok := ChooseFailover(tc.v, tc.health)
			if tc.want == "" {
				if ok {
					t.Fatalf("unexpected failover %+v", cmd)
				}
				return
			}
			if !ok || cmd.Primary != tc.want {
				t.Fatalf("ChooseFailover = %+v %v, want primary %q", cmd, ok, tc.want)
			}
			if cmd.Epoch != tc.v.Epoch+1 || cmd.ExpectEpoch != tc.v.Epoch || cmd.Name != tc.v.Name {
				t.Fatalf("epochs/name wrong: %+v", cmd)
			}
			var wantReplicas []string
			for _, r := range tc.v.ReplicaNodes {
				if r != tc.want {
					wantReplicas = append(wantReplicas, r)
				}
			}
			wantReplicas = append(wantReplicas, tc.v.Primary)
			if !reflect.DeepEqual(cmd.ReplicaNodes, wantReplicas) {
				t.Fatalf("replicas = %q, want %q (old primary last)", cmd.ReplicaNodes, wantReplicas)
			}
		})
	}
}

func TestFailoversGrace(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 10, 0, time.UTC)
	vols := []Volume{
		{Name: "a", Primary: "n1", ReplicaNodes: []string{"n2"}, Epoch: 1},
		{Name: "b", Primary: "n2", ReplicaNodes: []string{"n1"}, Epoch: 1},
		{Name: "c", Primary: "n3", ReplicaNodes: []string{"n2"}, Epoch: 7},
	}
	health := map[string]string{"n1": HealthDead, "n2": HealthAlive, "n3": HealthLeft}
	since := map[string]time.Time{"n1": now.Add(-10 * time.Second), "n3": now.Add(-time.Second)}
	names := func(cmds []SetPrimary) []string {
		var out []string
		for _, c := range cmds {
			out = append(out, c.Name)
		}
		return out
	}
	if got := names(Failovers(vols, health, since, nil, nil, now, 0)); !reflect.DeepEqual(got, []string{"a", "c"}) {
		t.Fatalf("no grace: %q", got)
	}
	if got := names(Failovers(vols, health, since, nil, nil, now, 5*time.Second)); !reflect.DeepEqual(got, []string{"a"}) {
		t.Fatalf("5s grace: %q", got)
	}
	if got := names(Failovers(vols, health, since, nil, nil, now, time.Minute)); got != nil {
		t.Fatalf("1m grace: %q", got)
	}
	// A primary that may still hold its lease keeps its volumes, however
	// dead it looks: it may be serving writes on the far side of a partition.
	leases := map[string]time.Time{"n1": now.Add(time.Millisecond), "n3": now}
	if got := names(Failovers(vols, health, since, leases, nil, now, 0)); !reflect.DeepEqual(got, []string{"c"}) {
		t.Fatalf("n1's lease still running: %q", got)
	}
}

// TestFailoversOnlyToReachable: a replica gossip still thinks alive but
// the leader has not heard from lately (cut off with the primary) is not
// promoted; another copy is, and with none the leader waits.
func TestFailoversOnlyToReachable(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 10, 0, time.UTC)
	v := Volume{Name: "a", Primary: "n1", ReplicaNodes: []string{"n2", "n3"}, Epoch: 1,
		Progress: map[string]Progress{"n2": {Seq: 9}, "n3": {Seq: 5}}}
	health := map[string]string{"n1": HealthDead, "n2": HealthAlive, "n3": HealthAlive}
	for _, tc := range []struct {
		name      string
		reachable map[string]bool
		want      string
	}{
		{"not known (nil): gossip decides", nil, "n2"},
		{"both reachable: the most up to date", map[string]bool{"n2": true, "n3": true}, "n2"},
		{"the best copy unreachable: the other", map[string]bool{"n3": true}, "n3"},
		{"none reachable: wait", map[string]bool{}, ""},
	} {
		got := Failovers([]Volume{v}, health, nil, nil, tc.reachable, now, 0)
		switch {
		case tc.want == "" && len(got) != 0:
			t.Errorf("%s: promoted %s, want none", tc.name, got[0].Primary)
		case tc.want != "" && (len(got) != 1 || got[0].Primary != tc.want):
			t.Errorf("%s: got %+v, want %s", tc.name, got, tc.want)
		}
	}
	if health["n2"] != HealthAlive {
		t.Fatal("Failovers changed the caller's health map")
	}
}

func TestLeaseTableExpiries(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	lt := newLeaseTable()
	lt.startTerm(t0)
	lt.grant("a", t0.Add(2*time.Second))
	got := lt.expiries([]string{"a", "b"}, 4*time.Second)
	if !got["a"].Equal(t0.Add(6*time.Second)) || !got["b"].Equal(t0.Add(4*time.Second)) {
		t.Fatalf("expiries = %v", got)
	}
	// A new term forgets grants but not the caution: every node may hold a
	// lease from the previous leader until the new term is one lease old.
	lt.startTerm(t0.Add(10 * time.Second))
	got = lt.expiries([]string{"a"}, 4*time.Second)
	if !got["a"].Equal(t0.Add(14 * time.Second)) {
		t.Fatalf("after a new term: %v", got)
	}
}

func TestVolumeState(t *testing.T) {
	v := Volume{Primary: "a", ReplicaNodes: []string{"b", "c"}}
	for _, tc := range []struct {
		health map[string]string
		want   string
	}{
		{map[string]string{"a": HealthAlive, "b": HealthAlive, "c": HealthAlive}, StateHealthy},
		{map[string]string{"a": HealthAlive, "b": HealthAlive, "c": HealthDead}, StateDegraded},
		{map[string]string{"a": HealthAlive, "b": HealthAlive}, StateDegraded},
		{map[string]string{"a": HealthSuspect, "b": HealthAlive, "c": HealthAlive}, StateDegraded},
		{map[string]string{"a": HealthDead, "b": HealthAlive, "c": HealthAlive}, StateNoPrimary},
		{map[string]string{"a": HealthLeft, "b": HealthAlive, "c": HealthAlive}, StateNoPrimary},
	} {
		if got := VolumeState(v, tc.health); got != tc.want {
			t.Errorf("VolumeState(%v) = %s, want %s", tc.health, got, tc.want)
		}
	}
}

func TestValidateName(t *testing.T) {
	long := "a"
	for len(long) < 128 {
		long += "b"
	}
	for name, ok := range map[string]bool{
		"db": true, "A.b_c-9": true, "9": true, long: true, long + "c": false,
		"": false, "-x": false, ".x": false, "_x": false, "a/b": false, "a b": false, "ä": false,
	} {
		if err := ValidateName(name); (err == nil) != ok {
			t.Errorf("ValidateName(%q) = %v, want ok=%v", name, err, ok)
		}
	}
}

func TestPurges(t *testing.T) {
	now := time.Date(2026, 12, 7, 12, 0, 0, 0, time.UTC)
	del := func(name string, ago time.Duration) Volume {
		return Volume{Name: name, DeletedUnixNano: now.Add(-ago).UnixNano()}
	}
	vols := []Volume{
		{Name: "live"},
		del("fresh", time.Hour),
		del("exact", 24*time.Hour),
		del("old", 48*time.Hour),
	}
	got := Purges(vols, now, 24*time.Hour)
	want := []DeleteVolume{
		{Name: "exact", ExpectDeletedUnixNano: vols[2].DeletedUnixNano},
		{Name: "old", ExpectDeletedUnixNano: vols[3].DeletedUnixNano},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("Purges = %+v, want %+v", got, want)
	}
	if got := VolumeState(vols[1], map[string]string{}); got != StateDeleted {
		t.Fatalf("state of a deleted volume = %q", got)
	}
}

func TestLeaseTableHeardFrom(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	lt := newLeaseTable()
	lt.startTerm(t0)
	lt.grant("n1", t0)
	lt.grant("n2", t0.Add(2*time.Second))
	got := lt.heardFrom(1500*time.Millisecond, t0.Add(3*time.Second))
	if !reflect.DeepEqual(got, map[string]bool{"n2": true}) {
		t.Fatalf("heard from %v, want only n2", got)
	}
	lt.startTerm(t0.Add(4 * time.Second))
	if got := lt.heardFrom(time.Hour, t0.Add(4*time.Second)); len(got) != 0 {
		t.Fatalf("a new term heard from %v", got)
	}
}
