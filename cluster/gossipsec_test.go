package cluster

import (
	"bytes"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/tether-io/tether/internal/testutil"
)

func key(b byte) []byte { return bytes.Repeat([]byte{b}, 32) }

// A node with the wrong gossip key cannot join an encrypted cluster and
// says why; one with the right key (as the second key of its keyring) can.
func TestGossipEncryptionRefusesWrongKey(t *testing.T) {
	good := [][]byte{key(1)}
	tn := &testNet{t: t, byRPC: map[string]*testNode{}}
	t.Cleanup(func() {
		for _, node := range tn.nodes {
			tn.stop(node, false)
		}
	})
	n1 := tn.start(nodeOpts{name: "n1", expect: 2, gossipKeys: good})
	tn.start(nodeOpts{name: "n2", expect: 2, join: n1.c.GossipAddr(), gossipKeys: good})
	testutil.Eventually(t, 20*time.Second, "two-node encrypted cluster with a leader", func() bool {
		return tn.leader() != nil && len(aliveNames(n1.c)) == 2
	})
	if !n1.c.GossipEncrypted() {
		t.Fatal("GossipEncrypted() = false with keys configured")
	}

	for _, tc := range []struct {
		name string
		keys [][]byte
	}{{"wrong key", [][]byte{key(2)}}, {"no key", nil}} {
		bad := tn.start(nodeOpts{name: "bad-" + strings.ReplaceAll(tc.name, " ", "-"), join: n1.c.GossipAddr(), gossipKeys: tc.keys})
		testutil.Eventually(t, 10*time.Second, tc.name+": join error naming the key", func() bool {
			return strings.Contains(bad.c.JoinError(), "gossip key mismatch?")
		})
		if got := aliveNames(n1.c); len(got) != 2 {
			t.Fatalf("%s: the cluster let it in: alive members %v", tc.name, got)
		}
		if got := aliveNames(bad.c); len(got) != 1 {
			t.Fatalf("%s: the bad node sees members %v", tc.name, got)
		}
		tn.stop(bad, false)
	}

	// The right key, as the primary of a keyring that also holds a new
	// key being rolled out, is accepted.
	ok := tn.start(nodeOpts{name: "n3", join: n1.c.GossipAddr(), gossipKeys: [][]byte{key(1), key(3)}})
	testutil.Eventually(t, 20*time.Second, "n3 joined", func() bool {
		return len(aliveNames(n1.c)) == 3 && len(aliveNames(ok.c)) == 3 && ok.c.JoinError() == ""
	})
}

func aliveNames(c *Cluster) []string {
	var out []string
	for _, m := range c.Members() {
		if m.Health == HealthAlive {
			out = append(out, m.Name)
		}
	}
	return out
}

func TestExplainJoinError(t *testing.T) {
	for _, tc := range []struct {
		name      string
		err       error
		encrypted bool
		want      string
	}{
		{"nil", nil, false, "no agent could be contacted"},
		{"refused", errors.New("Failed to join 127.0.0.1:1: dial tcp 127.0.0.1:1: connect: connection refused"), true, "no agent answered"},
		{"timeout", errors.New("dial tcp 10.0.0.1:7660: i/o timeout"), true, "no agent answered"},
		{"eof encrypted", errors.New("Failed to join 127.0.0.1:7660: EOF"), true, "gossip key mismatch? the other agent accepted the connection but the exchange failed; this agent encrypts"},
		{"eof plain", errors.New("Failed to join 127.0.0.1:7660: EOF"), false, "gossip key mismatch? the other agent accepted the connection but the exchange failed; this agent gossips unencrypted"},
		{"multierror flattened", errors.New("1 error occurred:\n\t* failed to join 127.0.0.1:7660: no installed keys could decrypt the message\n\n"), true, "same key: failed to join 127.0.0.1:7660: no installed keys could decrypt the message"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := explainJoinError(tc.err, tc.encrypted)
			if !strings.Contains(got.Error(), tc.want) {
				t.Fatalf("got %q, want it to contain %q", got, tc.want)
			}
			if tc.err != nil && !errors.Is(got, tc.err) {
				t.Fatalf("%v does not wrap %v", got, tc.err)
			}
		})
	}
}
