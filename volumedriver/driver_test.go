package volumedriver

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tether-io/tether/internal/testutil"
)

// memBackend is an in-memory Backend for the protocol tests.
type memBackend struct {
	mu       sync.Mutex
	vols     map[string]Volume
	opts     map[string]CreateOptions
	ready    chan struct{}
	mountErr error
	removed  []string
}

func newMemBackend() *memBackend {
	b := &memBackend{vols: map[string]Volume{}, opts: map[string]CreateOptions{}, ready: make(chan struct{})}
	close(b.ready)
	return b
}

func (b *memBackend) WaitReady(ctx context.Context) error {
	select {
	case <-b.ready:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (b *memBackend) Create(_ context.Context, name string, opts CreateOptions) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.vols[name]; ok {
		return fmt.Errorf("volume %s exists", name)
	}
	b.vols[name] = Volume{Name: name, Mountpoint: "/data/" + name, CreatedAt: time.Date(2026, 12, 7, 11, 0, 0, 0, time.UTC),
		Status: map[string]any{"primary": "h1", "epoch": 1}}
	b.opts[name] = opts
	return nil
}

func (b *memBackend) Remove(_ context.Context, name string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	delete(b.vols, name)
	b.removed = append(b.removed, name)
	return nil
}

func (b *memBackend) Get(name string) (Volume, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	v, ok := b.vols[name]
	return v, ok
}

func (b *memBackend) List() []Volume {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []Volume
	for _, v := range b.vols {
		out = append(out, v)
	}
	return out
}

func (b *memBackend) Mount(_ context.Context, name string) (string, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.mountErr != nil {
		return "", b.mountErr
	}
	v, ok := b.vols[name]
	if !ok {
		return "", fmt.Errorf("no such volume: %s", name)
	}
	return v.Mountpoint, nil
}

// plugin is a driver served by httptest over a unix socket, and a client
// that talks to it the way dockerd does (POST, no Content-Type).
type plugin struct {
	t     *testing.T
	d     *Driver
	srv   *httptest.Server
	hc    *http.Client
	state string
}

func startPlugin(t *testing.T, b Backend, state string) *plugin {
	t.Helper()
	return startPluginWith(t, Config{Backend: b, StatePath: state})
}

func startPluginWith(t *testing.T, cfg Config) *plugin {
	t.Helper()
	cfg.Logger, cfg.ReadyTimeout = testutil.Logger(t), 300*time.Millisecond
	state := cfg.StatePath
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "p.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(d.Handler())
	srv.Listener = ln
	srv.Start()
	t.Cleanup(srv.Close)
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}}, Timeout: 10 * time.Second}
	return &plugin{t: t, d: d, srv: srv, hc: hc, state: state}
}

// call posts body to /method and decodes the answer into out; it returns
// the HTTP status and the raw body.
func (p *plugin) call(method string, body string, out any) (int, string) {
	p.t.Helper()
	req, err := http.NewRequest(http.MethodPost, "http://plugin.moby.localhost/"+method, strings.NewReader(body))
	if err != nil {
		p.t.Fatal(err)
	}
	req.Header.Set("Accept", "application/vnd.docker.plugins.v1.2+json")
	resp, err := p.hc.Do(req)
	if err != nil {
		p.t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		p.t.Fatal(err)
	}
	if out != nil {
		if err := json.Unmarshal(raw, out); err != nil {
			p.t.Fatalf("%s: decoding %q: %v", method, raw, err)
		}
	}
	return resp.StatusCode, string(raw)
}

// errOf calls method and returns its Err field.
func (p *plugin) errOf(method, body string) string {
	p.t.Helper()
	var r errResponse
	p.call(method, body, &r)
	return r.Err
}

func TestActivateAndCapabilities(t *testing.T) {
	p := startPlugin(t, newMemBackend(), filepath.Join(t.TempDir(), "driver.json"))
	var act implementsResponse
	if code, raw := p.call("Plugin.Activate", "", &act); code != 200 || len(act.Implements) != 1 || act.Implements[0] != "VolumeDriver" {
		t.Fatalf("activate: %d %s", code, raw)
	}
	var caps capabilitiesResponse
	if code, raw := p.call("VolumeDriver.Capabilities", "{}", &caps); code != 200 || caps.Capabilities.Scope != "global" {
		t.Fatalf("capabilities: %d %s", code, raw)
	}
	if code, raw := p.call("VolumeDriver.Snapshot", "{}", nil); code != 404 || !strings.Contains(raw, `"Err"`) {
		t.Fatalf("unknown method: %d %s", code, raw)
	}
}

func TestCreate(t *testing.T) {
	b := newMemBackend()
	p := startPlugin(t, b, filepath.Join(t.TempDir(), "driver.json"))
	if e := p.errOf("VolumeDriver.Create", `{"Name":"pg","Opts":{"replicas":"2"}}`); e != "" {
		t.Fatalf("create: %s", e)
	}
	if e := p.errOf("VolumeDriver.Create", `{"Name":"dflt","Opts":null}`); e != "" {
		t.Fatalf("create without options: %s", e)
	}
	if b.opts["pg"].Replicas != 2 || b.opts["dflt"].Replicas != DefaultReplicas {
		t.Fatalf("options reached the backend as %+v", b.opts)
	}
	for _, tc := range []struct{ body, want string }{
		{`{"Name":"x1","Opts":{"replicas":"0"}}`, "replicas"},
		{`{"Name":"x2","Opts":{"replicas":"8"}}`, "1 to 7"},
		{`{"Name":"x3","Opts":{"replicas":"three"}}`, "whole number"},
		{`{"Name":"x4","Opts":{"replica":"2"}}`, `unknown option "replica" for a tether volume (known options: replicas, max-lag, placement, freeze)`},
		{`{"Name":"-bad","Opts":{}}`, "invalid volume name"},
		{`{"Name":"a/b"}`, "invalid volume name"},
		{`{"Opts":{}}`, "volume name is empty"},
		{`{"Name":`, "invalid request body"},
		{`{"Name":"pg"}`, "exists"},
	} {
		if e := p.errOf("VolumeDriver.Create", tc.body); !strings.Contains(e, tc.want) {
			t.Errorf("create %s: Err %q, want it to contain %q", tc.body, e, tc.want)
		}
	}
	if len(b.vols) != 2 {
		t.Fatalf("refused creates changed the backend: %v", b.vols)
	}
}

func TestGetListPath(t *testing.T) {
	b := newMemBackend()
	p := startPlugin(t, b, filepath.Join(t.TempDir(), "driver.json"))
	// Unknown before anything exists: no volume, no error, and an explicit
	// null (dockerd's "no such volume").
	if code, raw := p.call("VolumeDriver.Get", `{"Name":"pg"}`, nil); code != 200 || !strings.Contains(raw, `"Volume":null`) || !strings.Contains(raw, `"Err":""`) {
		t.Fatalf("get unknown: %d %s", code, raw)
	}
	var l listResponse
	if _, raw := p.call("VolumeDriver.List", "{}", &l); !strings.Contains(raw, `"Volumes":[]`) {
		t.Fatalf("empty list must be [] not null: %s", raw)
	}
	p.errOf("VolumeDriver.Create", `{"Name":"pg"}`)
	var g getResponse
	p.call("VolumeDriver.Get", `{"Name":"pg"}`, &g)
	if g.Err != "" || g.Volume == nil || g.Volume.Name != "pg" || g.Volume.Mountpoint != "/data/pg" || g.Volume.Status["primary"] != "h1" {
		t.Fatalf("get: %+v", g)
	}
	if _, err := time.Parse(time.RFC3339, g.Volume.CreatedAt); err != nil {
		t.Fatalf("CreatedAt %q is not RFC 3339: %v", g.Volume.CreatedAt, err)
	}
	p.call("VolumeDriver.List", "{}", &l)
	if len(l.Volumes) != 1 || l.Volumes[0].Name != "pg" || l.Volumes[0].CreatedAt == "" {
		t.Fatalf("list: %+v", l)
	}
	var pr mountResponse
	p.call("VolumeDriver.Path", `{"Name":"pg"}`, &pr)
	if pr.Err != "" || pr.Mountpoint != "/data/pg" {
		t.Fatalf("path: %+v", pr)
	}
	if e := p.errOf("VolumeDriver.Path", `{"Name":"nope"}`); !strings.Contains(e, "no such volume") {
		t.Fatalf("path of unknown volume: %q", e)
	}
	if e := p.errOf("VolumeDriver.Get", `{"Name":"../x"}`); !strings.Contains(e, "invalid volume name") {
		t.Fatalf("get with a bad name: %q", e)
	}
}

// TestGetWaitsForCatalog: after an agent restart the catalog may not have
// replayed yet; Get must wait instead of answering "no such volume" (which
// makes a booting dockerd forget the volume), and say so if it never gets
// ready.
func TestGetWaitsForCatalog(t *testing.T) {
	b := newMemBackend()
	b.ready = make(chan struct{})
	p := startPlugin(t, b, filepath.Join(t.TempDir(), "driver.json"))
	if e := p.errOf("VolumeDriver.Get", `{"Name":"pg"}`); !strings.Contains(e, "not ready") {
		t.Fatalf("get before the catalog is ready: %q", e)
	}
	done := make(chan getResponse, 1)
	go func() {
		var g getResponse
		p.call("VolumeDriver.Get", `{"Name":"pg"}`, &g)
		done <- g
	}()
	b.mu.Lock()
	b.vols["pg"] = Volume{Name: "pg", CreatedAt: time.Now()}
	b.mu.Unlock()
	close(b.ready)
	g := <-done
	if g.Err != "" || g.Volume == nil {
		t.Fatalf("get once ready: %+v", g)
	}
}

func TestMountRefcountingAndPersistence(t *testing.T) {
	b := newMemBackend()
	state := filepath.Join(t.TempDir(), "driver.json")
	p := startPlugin(t, b, state)
	p.errOf("VolumeDriver.Create", `{"Name":"pg"}`)
	id1, id2 := strings.Repeat("a", 64), strings.Repeat("b", 64)
	var m mountResponse
	for _, id := range []string{id1, id1, id2} { // docker cp re-mounts with the container's ID
		p.call("VolumeDriver.Mount", fmt.Sprintf(`{"Name":"pg","ID":%q}`, id), &m)
		if m.Err != "" || m.Mountpoint != "/data/pg" {
			t.Fatalf("mount: %+v", m)
		}
	}
	if n := p.d.MountCount("pg"); n != 3 {
		t.Fatalf("count %d, want 3", n)
	}
	if e := p.errOf("VolumeDriver.Unmount", fmt.Sprintf(`{"Name":"pg","ID":%q}`, strings.Repeat("c", 64))); e != "" {
		t.Fatalf("unmount of an unknown ID must succeed: %s", e)
	}
	if e := p.errOf("VolumeDriver.Unmount", `{"Name":"other","ID":""}`); e != "" {
		t.Fatalf("unmount of an unknown volume must succeed: %s", e)
	}
	if e := p.errOf("VolumeDriver.Remove", `{"Name":"pg"}`); !strings.Contains(e, "still mounted 3 time(s)") {
		t.Fatalf("remove while mounted: %q", e)
	}
	if e := p.errOf("VolumeDriver.Unmount", fmt.Sprintf(`{"Name":"pg","ID":%q}`, id1)); e != "" {
		t.Fatal(e)
	}

	// A restarted driver (same state file) knows the two remaining mounts.
	p2 := startPlugin(t, b, state)
	if n := p2.d.MountCount("pg"); n != 2 {
		t.Fatalf("after restart count %d, want 2", n)
	}
	for _, id := range []string{id1, id2, id2} {
		if e := p2.errOf("VolumeDriver.Unmount", fmt.Sprintf(`{"Name":"pg","ID":%q}`, id)); e != "" {
			t.Fatal(e)
		}
	}
	if n := p2.d.MountCount("pg"); n != 0 || len(p2.d.MountedVolumes()) != 0 {
		t.Fatalf("after unmounting everything: %d, %v", n, p2.d.MountedVolumes())
	}
	if e := p2.errOf("VolumeDriver.Remove", `{"Name":"pg"}`); e != "" {
		t.Fatalf("remove: %s", e)
	}
	if len(b.removed) != 1 {
		t.Fatalf("backend saw removes %v", b.removed)
	}
	raw, err := os.ReadFile(state)
	if err != nil || !bytes.Contains(raw, []byte(mountsFormat)) || bytes.Contains(raw, []byte(`"pg"`)) {
		t.Fatalf("state file %s: %v", raw, err)
	}
}

// TestStaleMounts: mounts of containers that stopped while the driver was
// down (no Unmount came) are forgotten when the Engine says no container
// uses the volume (at start, or when Docker asks to remove the volume),
// and kept when one does or the Engine cannot say.
func TestStaleMounts(t *testing.T) {
	b := newMemBackend()
	state := filepath.Join(t.TempDir(), "driver.json")
	var used bool
	var engineErr error
	asked := 0
	inUse := func(_ context.Context, volume string) (bool, error) {
		asked++
		if volume != "pg" {
			t.Errorf("asked about %q", volume)
		}
		return used, engineErr
	}
	p := startPluginWith(t, Config{Backend: b, StatePath: state, InUse: inUse})
	p.errOf("VolumeDriver.Create", `{"Name":"pg"}`)
	var m mountResponse
	for _, id := range []string{strings.Repeat("a", 64), strings.Repeat("b", 64)} {
		if p.call("VolumeDriver.Mount", fmt.Sprintf(`{"Name":"pg","ID":%q}`, id), &m); m.Err != "" {
			t.Fatal(m.Err)
		}
	}
	ctx := context.Background()
	used = true
	if n, err := p.d.ForgetStaleMounts(ctx, "pg", inUse); n != 0 || err != nil || p.d.MountCount("pg") != 2 {
		t.Fatalf("a volume in use: forgot %d (%v), count %d", n, err, p.d.MountCount("pg"))
	}
	if e := p.errOf("VolumeDriver.Remove", `{"Name":"pg"}`); !strings.Contains(e, "still mounted 2 time(s)") {
		t.Fatalf("remove of a volume in use: %q", e)
	}
	used, engineErr = false, errors.New("engine down")
	if n, err := p.d.ForgetStaleMounts(ctx, "pg", inUse); n != 0 || err == nil || p.d.MountCount("pg") != 2 {
		t.Fatalf("the Engine cannot say: forgot %d (%v), count %d", n, err, p.d.MountCount("pg"))
	}
	if e := p.errOf("VolumeDriver.Remove", `{"Name":"pg"}`); !strings.Contains(e, "still mounted 2 time(s)") {
		t.Fatalf("remove while the Engine cannot say: %q", e)
	}
	engineErr = nil
	if n, err := p.d.ForgetStaleMounts(ctx, "pg", inUse); n != 2 || err != nil || p.d.MountCount("pg") != 0 {
		t.Fatalf("stale mounts: forgot %d (%v), count %d", n, err, p.d.MountCount("pg"))
	}
	// Persisted: a restarted driver knows none.
	if p2 := startPlugin(t, b, state); p2.d.MountCount("pg") != 0 {
		t.Fatalf("after restart: %d mounts", p2.d.MountCount("pg"))
	}
	before := asked
	if n, err := p.d.ForgetStaleMounts(ctx, "pg", inUse); n != 0 || err != nil || asked != before {
		t.Fatalf("no mounts: forgot %d (%v), asked the Engine %d more times", n, err, asked-before)
	}

	// Remove checks by itself.
	if p.call("VolumeDriver.Mount", fmt.Sprintf(`{"Name":"pg","ID":%q}`, strings.Repeat("c", 64)), &m); m.Err != "" {
		t.Fatal(m.Err)
	}
	if e := p.errOf("VolumeDriver.Remove", `{"Name":"pg"}`); e != "" || len(b.removed) != 1 {
		t.Fatalf("remove of a volume with only stale mounts: %q, backend removed %v", e, b.removed)
	}
}

func TestMountRefusals(t *testing.T) {
	b := newMemBackend()
	p := startPlugin(t, b, filepath.Join(t.TempDir(), "driver.json"))
	p.errOf("VolumeDriver.Create", `{"Name":"pg"}`)
	id := strings.Repeat("a", 64)
	for _, tc := range []struct{ body, want string }{
		{`{"Name":"pg"}`, "without an ID"},
		{`{"Name":"pg","ID":"a b"}`, "invalid mount ID"},
		{fmt.Sprintf(`{"Name":"nope","ID":%q}`, id), "no such volume"},
		{fmt.Sprintf(`{"Name":"","ID":%q}`, id), "volume name is empty"},
	} {
		if e := p.errOf("VolumeDriver.Mount", tc.body); !strings.Contains(e, tc.want) {
			t.Errorf("mount %s: Err %q, want %q", tc.body, e, tc.want)
		}
	}
	b.mountErr = errors.New("volume pg is served by host h2")
	if e := p.errOf("VolumeDriver.Mount", fmt.Sprintf(`{"Name":"pg","ID":%q}`, id)); e != "volume pg is served by host h2" {
		t.Fatalf("backend refusal: %q", e)
	}
	if n := p.d.MountCount("pg"); n != 0 {
		t.Fatalf("refused mounts were counted: %d", n)
	}
}

func TestDamagedStateFile(t *testing.T) {
	state := filepath.Join(t.TempDir(), "driver.json")
	if err := os.WriteFile(state, []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := New(Config{Backend: newMemBackend(), StatePath: state}); err == nil || !strings.Contains(err.Error(), "damaged") {
		t.Fatalf("damaged state file: %v", err)
	}
}

// TestStartClose serves on a real socket path, refuses a second server on
// it, and removes the socket on Close.
func TestStartClose(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "plugins", "t.sock")
	d, err := New(Config{Backend: newMemBackend(), StatePath: filepath.Join(dir, "driver.json"), Logger: testutil.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Start(sock); err != nil {
		t.Fatal(err)
	}
	d2, _ := New(Config{Backend: newMemBackend(), StatePath: filepath.Join(dir, "driver2.json")})
	if err := d2.Start(sock); err == nil || !strings.Contains(err.Error(), "another process") {
		t.Fatalf("second driver on the same socket: %v", err)
	}
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}}}
	resp, err := hc.Post("http://plugin.moby.localhost/Plugin.Activate", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	d.Close()
	if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket left after Close: %v", err)
	}
}

func TestParseCreateOptions(t *testing.T) {
	for _, tc := range []struct {
		opts    map[string]string
		want    int
		wantErr string
	}{
		{nil, 3, ""},
		{map[string]string{}, 3, ""},
		{map[string]string{"replicas": "1"}, 1, ""},
		{map[string]string{"replicas": " 7 "}, 7, ""},
		{map[string]string{"replicas": "0"}, 0, "from 1 to 7"},
		{map[string]string{"replicas": "-1"}, 0, "from 1 to 7"},
		{map[string]string{"replicas": ""}, 0, "from 1 to 7"},
		{map[string]string{"replicas": "2", "size": "1G"}, 0, `unknown option "size"`},
		{map[string]string{"max-lag": "30s"}, 3, ""},
		{map[string]string{"max-lag": "soon"}, 0, "want a duration"},
		{map[string]string{"max-lag": "-1s"}, 0, "want a duration"},
		{map[string]string{"placement": "zone=a,disk=ssd"}, 3, ""},
		{map[string]string{"freeze": "true"}, 3, ""},
		{map[string]string{"freeze": "maybe"}, 0, "want true or false"},
		{map[string]string{"placement": "zone"}, 0, "KEY=VALUE"},
		{map[string]string{"placement": "zone=a,"}, 0, "KEY=VALUE"},
	} {
		got, err := ParseCreateOptions(tc.opts)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("%v: err %v, want %q", tc.opts, err, tc.wantErr)
			}
			continue
		}
		if err != nil || got.Replicas != tc.want {
			t.Errorf("%v: %+v %v, want %d", tc.opts, got, err, tc.want)
		}
	}
}
