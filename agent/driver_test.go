package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tether-io/tether/cluster"
	"github.com/tether-io/tether/internal/testutil"
	"github.com/tether-io/tether/proto/tetherpb"
	"github.com/tether-io/tether/replication"
)

// dockerClient speaks to an agent's volume driver as dockerd does.
type dockerClient struct {
	t  *testing.T
	hc *http.Client
}

func newDockerClient(t *testing.T, sock string) *dockerClient {
	return &dockerClient{t: t, hc: &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		}}}}
}

// call posts body to /method and returns the decoded JSON answer.
func (c *dockerClient) call(method string, body any) map[string]any {
	c.t.Helper()
	b, _ := json.Marshal(body)
	resp, err := c.hc.Post("http://plugin.moby.localhost/"+method, "", bytes.NewReader(b))
	if err != nil {
		c.t.Fatal(err)
	}
	defer resp.Body.Close()
	var out map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		c.t.Fatalf("%s: %v", method, err)
	}
	return out
}

func errText(m map[string]any) string {
	s, _ := m["Err"].(string)
	return s
}

// driverSocketInDataDir serves each agent's driver in its data dir. These
// tests play dockerd themselves, so the agent's Docker Engine is one that
// does not answer: the real one, knowing no container of theirs, would
// rightly call their mounts stale.
func driverSocketInDataDir(c *Config) {
	c.DriverSocket = filepath.Join(c.DataDir, "plugins", "tether-"+c.NodeName+".sock")
	c.DockerHost = "unix://" + filepath.Join(c.DataDir, "no-docker-engine.sock")
}

// TestDriverOnCluster drives three real agents through their Docker volume
// drivers: create with options, status on every node, mount only on the
// primary, data reaching the replicas, refcounted remove, soft delete and
// undelete.
func TestDriverOnCluster(t *testing.T) {
	tc := startTestCluster(t, driverSocketInDataDir)
	dc := map[string]*dockerClient{}
	for _, a := range tc.agents {
		dc[a.NodeName()] = newDockerClient(t, a.cfg.DriverSocket)
		if a.DriverName() != "tether-"+a.NodeName() {
			t.Fatalf("driver name %q", a.DriverName())
		}
	}
	if e := errText(dc["n1"].call("VolumeDriver.Create", map[string]any{"Name": "pg", "Opts": map[string]string{"replicas": "4"}})); !strings.Contains(e, "fewer copies") {
		t.Fatalf("4 copies on 3 nodes: %q", e)
	}
	if e := errText(dc["n1"].call("VolumeDriver.Create", map[string]any{"Name": "pg", "Opts": map[string]string{"replicas": "3"}})); e != "" {
		t.Fatal(e)
	}
	testutil.EventuallyErr(t, 10*time.Second, func() error {
		g := dc["n2"].call("VolumeDriver.Get", map[string]any{"Name": "pg"})
		vol, _ := g["Volume"].(map[string]any)
		st, _ := vol["Status"].(map[string]any)
		if vol == nil || st["primary"] != "n1" || st["epoch"] != float64(1) || vol["Mountpoint"] != nil {
			return fmt.Errorf("get on a replica: %v", g)
		}
		if _, err := time.Parse(time.RFC3339, vol["CreatedAt"].(string)); err != nil {
			return err
		}
		return nil
	})
	id := strings.Repeat("e", 64)
	m := dc["n1"].call("VolumeDriver.Mount", map[string]any{"Name": "pg", "ID": id})
	mp, _ := m["Mountpoint"].(string)
	if errText(m) != "" || mp != tc.agent("n1").VolumePaths("pg").Data {
		t.Fatalf("mount on the primary: %v", m)
	}
	if err := os.WriteFile(filepath.Join(mp, "x"), []byte("hi\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, r := range []string{"n2", "n3"} {
		testutil.EventuallyErr(t, 20*time.Second, func() error {
			b, err := os.ReadFile(filepath.Join(tc.agent(r).VolumePaths("pg").Data, "x"))
			if err != nil || string(b) != "hi\n" {
				return fmt.Errorf("x on %s: %q %v", r, b, err)
			}
			return nil
		})
	}
	testutil.EventuallyErr(t, 10*time.Second, func() error {
		g := dc["n1"].call("VolumeDriver.Get", map[string]any{"Name": "pg"})
		st := g["Volume"].(map[string]any)["Status"].(map[string]any)
		if lag, ok := st["lag"].(map[string]any); !ok || len(lag) != 2 || st["mountsHere"] != float64(1) {
			return fmt.Errorf("status on the primary: %v", st)
		}
		return nil
	})

	// Remove while mounted is refused, by the driver and by the CLI.
	if e := errText(dc["n1"].call("VolumeDriver.Remove", map[string]any{"Name": "pg"})); !strings.Contains(e, "still mounted") {
		t.Fatalf("remove while mounted: %q", e)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := tc.ctl["n1"].VolumeRemove(ctx, &tetherpb.VolumeRemoveRequest{Name: "pg"}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("tether volume rm while mounted: %v", err)
	}
	dc["n1"].call("VolumeDriver.Unmount", map[string]any{"Name": "pg", "ID": id})
	if e := errText(dc["n1"].call("VolumeDriver.Remove", map[string]any{"Name": "pg"})); e != "" {
		t.Fatal(e)
	}
	for _, a := range tc.agents {
		testutil.EventuallyErr(t, 10*time.Second, func() error {
			g := dc[a.NodeName()].call("VolumeDriver.Get", map[string]any{"Name": "pg"})
			if g["Volume"] != nil || errText(g) != "" {
				return fmt.Errorf("get of a deleted volume on %s: %v", a.NodeName(), g)
			}
			if l := dc[a.NodeName()].call("VolumeDriver.List", map[string]any{}); len(l["Volumes"].([]any)) != 0 {
				return fmt.Errorf("list on %s: %v", a.NodeName(), l)
			}
			return nil
		})
	}
	if e := errText(dc["n2"].call("VolumeDriver.Create", map[string]any{"Name": "pg"})); !strings.Contains(e, "tether volume undelete pg") {
		t.Fatalf("create over a deleted volume: %q", e)
	}
	vi, err := tc.inspect("n2", "pg")
	if err != nil || vi.Volume.State != cluster.StateDeleted || vi.Volume.PurgeAfterUnixNano <= vi.Volume.DeletedUnixNano {
		t.Fatalf("inspect of a deleted volume: %v %v", vi, err)
	}
	if _, err := tc.ctl["n3"].VolumeUndelete(ctx, &tetherpb.VolumeUndeleteRequest{Name: "pg"}); err != nil {
		t.Fatal(err)
	}
	for _, a := range tc.agents {
		testutil.EventuallyErr(t, 10*time.Second, func() error {
			if g := dc[a.NodeName()].call("VolumeDriver.Get", map[string]any{"Name": "pg"}); g["Volume"] == nil {
				return fmt.Errorf("undeleted volume not back on %s: %v", a.NodeName(), g)
			}
			return nil
		})
	}
	b, err := os.ReadFile(filepath.Join(mp, "x"))
	if err != nil || string(b) != "hi\n" {
		t.Fatalf("data after undelete: %q %v", b, err)
	}

	// The volume follows its container: a mount on a replica moves it
	// there, unless a container on the primary has it mounted.
	if e := errText(dc["n1"].call("VolumeDriver.Mount", map[string]any{"Name": "pg", "ID": id})); e != "" {
		t.Fatal(e)
	}
	id2 := strings.Repeat("d", 64)
	if e := errText(dc["n2"].call("VolumeDriver.Mount", map[string]any{"Name": "pg", "ID": id2})); !strings.Contains(e, "mounted 1 time(s) on host n1 and has a single writer") {
		t.Fatalf("mount on a replica while the primary has it mounted: %q", e)
	}
	dc["n1"].call("VolumeDriver.Unmount", map[string]any{"Name": "pg", "ID": id})
	m = dc["n2"].call("VolumeDriver.Mount", map[string]any{"Name": "pg", "ID": id2})
	if errText(m) != "" || m["Mountpoint"] != tc.agent("n2").VolumePaths("pg").Data {
		t.Fatalf("mount on a replica once the primary released it: %v", m)
	}
	if b, err := os.ReadFile(filepath.Join(m["Mountpoint"].(string), "x")); err != nil || string(b) != "hi\n" {
		t.Fatalf("data after the move: %q %v", b, err)
	}
	if v, _ := tc.agent("n2").Cluster().Volume("pg"); v.Primary != "n2" || v.Epoch != 2 {
		t.Fatalf("after the move: primary %s epoch %d", v.Primary, v.Epoch)
	}
	if e := errText(dc["n1"].call("VolumeDriver.Mount", map[string]any{"Name": "pg", "ID": id})); !strings.Contains(e, "on host n2 and has a single writer") {
		t.Fatalf("mount back on n1 while n2 has it mounted: %q", e)
	}
	if e := errText(dc["n1"].call("VolumeDriver.Remove", map[string]any{"Name": "pg"})); !strings.Contains(e, "mounted 1 time(s) on its primary host n2") {
		t.Fatalf("remove on n1 while the primary n2 has it mounted: %q", e)
	}
	testutil.Eventually(t, 10*time.Second, "n3 sees the move", func() bool {
		v, _ := tc.agent("n3").Cluster().Volume("pg")
		return v.Primary == "n2"
	})
	ctx2, cancel2 := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel2()
	if _, err := tc.ctl["n3"].VolumeRemove(ctx2, &tetherpb.VolumeRemoveRequest{Name: "pg"}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("tether volume rm on n3 while n2 has it mounted: %v", err)
	}
}

func TestDecideMount(t *testing.T) {
	v := cluster.Volume{Name: "pg", Primary: "a", ReplicaNodes: []string{"b", "c"}, Epoch: 2}
	alive := map[string]string{"a": "alive", "b": "alive", "c": "alive", "z": "alive"}
	for _, tc := range []struct {
		name   string
		node   string
		v      cluster.Volume
		health map[string]string
		move   bool
		want   string
	}{
		{"primary", "a", v, alive, false, ""},
		{"replica: the volume follows", "b", v, alive, true, ""},
		{"stranger", "z", v, alive, false, "volume pg is served by host a and this host holds no copy of it (replicas: b, c)"},
		{"primary suspect", "b", v, map[string]string{"a": "suspect", "b": "alive"}, false, "not answering right now"},
		{"primary unknown", "b", v, map[string]string{"b": "alive"}, false, "not answering right now"},
		{"primary dead", "b", v, map[string]string{"a": "dead", "b": "alive"}, false, "no replica has been promoted yet"},
		{"all dead", "z", v, map[string]string{"a": "dead", "b": "dead", "c": "left"}, false, "no replica of it is alive"},
		{"no primary", "a", cluster.Volume{Name: "pg"}, alive, false, "has no primary"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			move, err := decideMount(tc.v, tc.node, tc.health)
			if tc.want == "" {
				if err != nil || move != tc.move {
					t.Fatalf("move %v err %v, want move %v", move, err, tc.move)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want %q", err, tc.want)
			}
		})
	}
}

func TestResolveDriverSocket(t *testing.T) {
	for _, tc := range []struct {
		flag      string
		euid      int
		dir       bool
		want, why string
	}{
		{"auto", 0, true, DefaultDriverSocket, "default"},
		{"auto", 1000, true, "", "not running as root"},
		{"auto", 0, false, "", "does not exist"},
		{"", 0, true, "", "off"},
		{"/tmp/x.sock", 1000, false, "/tmp/x.sock", "serves"},
	} {
		got, why := ResolveDriverSocket(tc.flag, tc.euid, tc.dir)
		if got != tc.want || !strings.Contains(why, tc.why) {
			t.Errorf("%q euid %d dir %v: %q %q", tc.flag, tc.euid, tc.dir, got, why)
		}
	}
	for _, bad := range []string{"rel.sock", "/run/docker/plugins/tether"} {
		c := Config{NodeName: "n", DriverSocket: bad}
		if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "--driver-socket") {
			t.Errorf("driver socket %q: %v", bad, err)
		}
	}
	c := Config{NodeName: "n", VolumeRetention: -time.Second}
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "--volume-retention") {
		t.Errorf("negative retention: %v", err)
	}
}

// TestDriverAfterRestart restarts a one-node cluster's agent on the same
// data dir: the driver answers Get for the volume (from the replayed
// catalog, never "no such volume", which would make a booting dockerd
// forget it) and still counts the mount made before the restart.
func TestDriverAfterRestart(t *testing.T) {
	dir := t.TempDir()
	cfg := Config{NodeName: "solo", DataDir: dir, GossipAddr: "127.0.0.1:0", RPCAddr: "127.0.0.1:0",
		BootstrapExpect: 1, Logger: testutil.Logger(t)}
	driverSocketInDataDir(&cfg)
	start := func() *Agent {
		a, err := New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		if err := a.Start(context.Background()); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(a.Kill)
		return a
	}
	a := start()
	testutil.Eventually(t, 20*time.Second, "the single node leads", a.Cluster().IsLeader)
	dc := newDockerClient(t, cfg.DriverSocket)
	if e := errText(dc.call("VolumeDriver.Create", map[string]any{"Name": "pg", "Opts": map[string]string{"replicas": "1"}})); e != "" {
		t.Fatal(e)
	}
	id := strings.Repeat("f", 64)
	if e := errText(dc.call("VolumeDriver.Mount", map[string]any{"Name": "pg", "ID": id})); e != "" {
		t.Fatal(e)
	}
	a.Kill()

	a = start()
	dc = newDockerClient(t, cfg.DriverSocket)
	g := dc.call("VolumeDriver.Get", map[string]any{"Name": "pg"}) // right away, as a booting dockerd would
	vol, _ := g["Volume"].(map[string]any)
	if vol == nil || errText(g) != "" {
		t.Fatalf("get right after the restart: %v", g)
	}
	if n := a.mountsHere("pg"); n != 1 {
		t.Fatalf("mount count after the restart: %d", n)
	}
	if e := errText(dc.call("VolumeDriver.Unmount", map[string]any{"Name": "pg", "ID": id})); e != "" || a.mountsHere("pg") != 0 {
		t.Fatalf("unmount after the restart: %q %d", e, a.mountsHere("pg"))
	}
}

// TestRecreateAfterPurge: a volume purged and created again under the same
// name starts empty on its primary and replicates to nodes that held the
// old one, even where the old copy had seen a newer epoch than the new
// volume's 1 (a replica would refuse the new primary's streams).
func TestRecreateAfterPurge(t *testing.T) {
	tc := startTestCluster(t, driverSocketInDataDir)
	dc := newDockerClient(t, tc.agent("n1").cfg.DriverSocket)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	fileOn := func(node, name string) string {
		b, _ := os.ReadFile(filepath.Join(tc.agent(node).VolumePaths("pg").Data, name))
		return string(b)
	}
	if e := errText(dc.call("VolumeDriver.Create", map[string]any{"Name": "pg"})); e != "" {
		t.Fatal(e)
	}
	id := strings.Repeat("a", 64)
	m := dc.call("VolumeDriver.Mount", map[string]any{"Name": "pg", "ID": id})
	if err := os.WriteFile(filepath.Join(m["Mountpoint"].(string), "old"), []byte("old"), 0o644); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 20*time.Second, "old reaches n2 and n3", func() bool { return fileOn("n2", "old") == "old" && fileOn("n3", "old") == "old" })
	dc.call("VolumeDriver.Unmount", map[string]any{"Name": "pg", "ID": id})
	if e := errText(dc.call("VolumeDriver.Remove", map[string]any{"Name": "pg"})); e != "" {
		t.Fatal(e)
	}
	if _, err := tc.ctl["n1"].VolumePurge(ctx, &tetherpb.VolumePurgeRequest{Name: "pg"}); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 10*time.Second, "purge reaches every node", func() bool {
		for _, a := range tc.agents {
			if _, ok := a.Cluster().Volume("pg"); ok {
				return false
			}
		}
		return true
	})
	// As if n2's old copy had been through failovers up to epoch 5.
	if err := os.WriteFile(filepath.Join(tc.agent("n2").VolumePaths("pg").State, "epoch"), []byte("5\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if e := errText(dc.call("VolumeDriver.Create", map[string]any{"Name": "pg"})); e != "" {
		t.Fatal(e)
	}
	m = dc.call("VolumeDriver.Mount", map[string]any{"Name": "pg", "ID": id})
	if fileOn("n1", "old") != "" {
		t.Fatal("the new volume holds the purged volume's file")
	}
	if err := os.WriteFile(filepath.Join(m["Mountpoint"].(string), "new"), []byte("new"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, r := range []string{"n2", "n3"} {
		testutil.EventuallyErr(t, 20*time.Second, func() error {
			if fileOn(r, "new") != "new" || fileOn(r, "old") != "" {
				return fmt.Errorf("%s holds new=%q old=%q", r, fileOn(r, "new"), fileOn(r, "old"))
			}
			return nil
		})
	}
}

func TestDriverName(t *testing.T) {
	for _, tc := range []struct{ socket, name, want string }{
		{"", "tether:latest", ""},
		{"/run/docker/plugins/tether.sock", "", "tether"},
		{"/run/docker/plugins/tether.sock", "tether:latest", "tether:latest"},
	} {
		a := &Agent{cfg: Config{DriverSocket: tc.socket, DriverName: tc.name}}
		if got := a.DriverName(); got != tc.want {
			t.Errorf("socket %q name %q: DriverName %q, want %q", tc.socket, tc.name, got, tc.want)
		}
	}
	for name, ok := range map[string]bool{"tether": true, "tether:latest": true, "reg.example/x/tether:1.2": true, "Tether": false, "a b": false, "x:": false} {
		c := Config{NodeName: "n", DriverSocket: "/run/docker/plugins/tether.sock", DriverName: name}
		if err := c.Validate(); (err == nil) != ok || (err != nil && !strings.Contains(err.Error(), "--driver-name")) {
			t.Errorf("driver name %q: %v", name, err)
		}
	}
}

func TestReplicaLag(t *testing.T) {
	for _, c := range []struct {
		r    replication.ReplicaState
		want string
	}{
		{replication.ReplicaState{Connected: true, Lag: 1234567 * time.Microsecond}, "1.235s"},
		{replication.ReplicaState{Connected: true, Lag: 2 * time.Second, FullSyncDone: 1 << 30, FullSyncTotal: 4 << 30}, "2s (full sync 25% of 4.0 GiB)"},
		{replication.ReplicaState{Connected: false, Lag: time.Second}, "disconnected"},
		{replication.ReplicaState{Connected: true, Err: "no space left on device"}, "error: no space left on device"},
	} {
		if got := replicaLag(c.r); got != c.want {
			t.Errorf("replicaLag(%+v) = %q, want %q", c.r, got, c.want)
		}
	}
}
