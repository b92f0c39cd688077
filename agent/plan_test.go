package agent

import (
	"reflect"
	"testing"
	"time"

	"github.com/tether-io/tether/cluster"
)

func TestPlanFor(t *testing.T) {
	vols := []cluster.Volume{
		{Name: "a", Primary: "n1", ReplicaNodes: []string{"n2", "n3"}, Epoch: 1},
		{Name: "b", Primary: "n2", ReplicaNodes: []string{"n1"}, Epoch: 4},
		{Name: "c", Primary: "n3", ReplicaNodes: []string{"n2"}, Epoch: 2},
		{Name: "d", Primary: "", ReplicaNodes: []string{"n1"}, Epoch: 2},
	}
	cases := []struct {
		node        string
		wantPrimary []string
		wantReplica []string
	}{
		{"n1", []string{"a"}, []string{"b", "d"}},
		{"n2", []string{"b"}, []string{"a", "c"}},
		{"n4", nil, nil},
	}
	for _, c := range cases {
		p := planFor(c.node, vols)
		var prim []string
		prim = append(prim, sortedKeys(p.primary)...)
		if !reflect.DeepEqual(prim, c.wantPrimary) || !reflect.DeepEqual(p.replica, c.wantReplica) {
			t.Errorf("planFor(%s) = primary %v replica %v; want %v %v", c.node, prim, p.replica, c.wantPrimary, c.wantReplica)
		}
	}
}

func TestConfigValidate(t *testing.T) {
	bad := []Config{
		{},
		{NodeName: "has space"},
		{NodeName: "n1", GossipAddr: "nope"},
		{NodeName: "n1", RPCAddr: "127.0.0.1:99999"},
		{NodeName: "n1", HTTPAddr: "host.example:1"},
		{NodeName: "n1", AdvertiseIP: "not-an-ip"},
		{NodeName: "n1", BootstrapExpect: -1},
		{NodeName: "n1", Join: []string{""}},
		{NodeName: "n1", Timing: cluster.Timing{LeaseDuration: 100 * time.Millisecond}},
		{NodeName: "n1", Timing: cluster.Timing{FailoverGrace: -time.Second}},
		{NodeName: "n1", Labels: map[string]string{"bad key": "x"}},
	}
	for _, c := range bad {
		if err := c.Validate(); err == nil {
			t.Errorf("Validate(%+v) accepted a bad config", c)
		}
	}
	good := Config{NodeName: "n1"}
	if err := good.Validate(); err != nil {
		t.Fatal(err)
	}
	if good.GossipAddr != DefaultGossipAddr || good.RPCAddr != DefaultRPCAddr || good.DataDir != DefaultDataDir {
		t.Fatalf("defaults not filled: %+v", good)
	}
}
