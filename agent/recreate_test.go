package agent

import (
	"reflect"
	"testing"

	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/api/types/mount"
	"github.com/moby/moby/api/types/network"

	"github.com/tether-io/tether/cluster"
)

func recSpec(name, node, volume, image string) cluster.ContainerSpec {
	return cluster.ContainerSpec{Name: name, Node: node, Driver: "tether", Image: image,
		Labels: map[string]string{cluster.FailoverLabel: "true"},
		Mounts: []cluster.ContainerMount{{Type: "volume", Source: volume, Target: "/data", Driver: "tether"}}}
}

func TestDecideRecreate(t *testing.T) {
	db := cluster.Volume{Name: "db", Primary: "b", ReplicaNodes: []string{"a"}, Epoch: 2,
		Containers: []cluster.ContainerSpec{recSpec("app", "a", "db", "app:1")}}
	withSpecs := func(v cluster.Volume, specs ...cluster.ContainerSpec) cluster.Volume {
		v.Containers = specs
		return v
	}
	base := func() recreateInputs {
		return recreateInputs{
			node:    "b",
			volumes: []cluster.Volume{db},
			serving: map[string]bool{"db": true},
			health:  map[string]string{"a": cluster.HealthDead, "b": cluster.HealthAlive, "c": cluster.HealthAlive},
			images:  map[string]bool{"app:1": true},
			names:   map[string]bool{},
		}
	}
	type want struct{ create, missing, running, taken []string } // "name" or "spec->name"
	cases := map[string]struct {
		in   func(recreateInputs) recreateInputs
		want want
	}{
		"failover: re-create under its own name": {
			in:   func(in recreateInputs) recreateInputs { return in },
			want: want{create: []string{"app->app"}},
		},
		"old host alive (planned move): leave it to the user": {
			in: func(in recreateInputs) recreateInputs {
				in.health["a"] = cluster.HealthAlive
				return in
			},
		},
		"old host suspect: not yet": {
			in: func(in recreateInputs) recreateInputs {
				in.health["a"] = cluster.HealthSuspect
				return in
			},
		},
		"old host left the cluster": {
			in: func(in recreateInputs) recreateInputs {
				in.health["a"] = cluster.HealthLeft
				return in
			},
			want: want{create: []string{"app->app"}},
		},
		"old host forgotten by membership": {
			in: func(in recreateInputs) recreateInputs {
				delete(in.health, "a")
				return in
			},
			want: want{create: []string{"app->app"}},
		},
		"not serving yet (no lease, replication not started)": {
			in: func(in recreateInputs) recreateInputs {
				in.serving = map[string]bool{"db": false}
				return in
			},
		},
		"catalog names another primary": {
			in: func(in recreateInputs) recreateInputs {
				v := db
				v.Primary = "c"
				in.volumes = []cluster.Volume{v}
				return in
			},
		},
		"deleted volume": {
			in: func(in recreateInputs) recreateInputs {
				v := db
				v.DeletedUnixNano = 1
				in.volumes = []cluster.Volume{v}
				return in
			},
		},
		"recorded on this host: nothing to do": {
			in: func(in recreateInputs) recreateInputs {
				in.volumes = []cluster.Volume{withSpecs(db, recSpec("app", "b", "db", "app:1"))}
				return in
			},
		},
		"image missing: said, not created": {
			in: func(in recreateInputs) recreateInputs {
				in.images = map[string]bool{}
				return in
			},
			want: want{missing: []string{"app"}},
		},
		"a copy with the label runs here: no second writer": {
			in: func(in recreateInputs) recreateInputs {
				in.running = []engineContainer{{name: "app"}}
				in.names = map[string]bool{"app": true}
				return in
			},
			want: want{running: []string{"app"}},
		},
		"this host's earlier copy runs: no second one": {
			in: func(in recreateInputs) recreateInputs {
				in.running = []engineContainer{{name: "app-b"}}
				in.names = map[string]bool{"app": true, "app-b": true}
				return in
			},
			want: want{running: []string{"app"}},
		},
		"another labelled container (a sidecar) does not block": {
			in: func(in recreateInputs) recreateInputs {
				in.running = []engineContainer{{name: "sidecar"}}
				in.names = map[string]bool{"sidecar": true}
				return in
			},
			want: want{create: []string{"app->app"}},
		},
		"name taken by a stopped container: suffixed with this node": {
			in: func(in recreateInputs) recreateInputs {
				in.names = map[string]bool{"app": true}
				return in
			},
			want: want{create: []string{"app->app-b"}},
		},
		"both names taken": {
			in: func(in recreateInputs) recreateInputs {
				in.names = map[string]bool{"app": true, "app-b": true}
				return in
			},
			want: want{taken: []string{"app"}},
		},
		"a container of two volumes is created once": {
			in: func(in recreateInputs) recreateInputs {
				two := recSpec("app", "a", "db", "app:1")
				two.Mounts = append(two.Mounts, cluster.ContainerMount{Type: "volume", Source: "logs", Target: "/logs", Driver: "tether"})
				logs := cluster.Volume{Name: "logs", Primary: "b", Epoch: 2, Containers: []cluster.ContainerSpec{two}}
				in.volumes = []cluster.Volume{withSpecs(db, two), logs}
				in.serving["logs"] = true
				return in
			},
			want: want{create: []string{"app->app"}},
		},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			p := decideRecreate(tc.in(base()))
			got := want{}
			for _, a := range p.create {
				got.create = append(got.create, a.spec.Name+"->"+a.name)
			}
			for _, a := range p.missingImage {
				got.missing = append(got.missing, a.spec.Name)
				if a.why == "" {
					t.Error("missing image without a reason")
				}
			}
			for _, a := range p.alreadyRunning {
				got.running = append(got.running, a.spec.Name)
			}
			for _, a := range p.nameTaken {
				got.taken = append(got.taken, a.spec.Name)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("plan = %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestCreateOptionsRewritesDriver(t *testing.T) {
	s := recSpec("app", "a", "db", "app:1")
	s.Driver = "tether-a"
	s.Mounts[0].Driver = "tether-a"
	s.Mounts = append(s.Mounts, cluster.ContainerMount{Type: "volume", Source: "cache", Target: "/cache", Driver: "local"},
		cluster.ContainerMount{Type: "bind", Source: "/etc/app", Target: "/etc/app", ReadOnly: true})
	s.Ports = []cluster.PortBinding{{ContainerPort: "80/tcp", HostIP: "127.0.0.1", HostPort: "8080"}}
	s.Restart = "always"
	o := createOptions(s, "app-b", "tether-b")
	if o.Name != "app-b" || o.Config.Image != "app:1" || o.Config.Labels[RecreatedFromLabel] != "a" || o.Config.Labels[cluster.FailoverLabel] != "true" {
		t.Fatalf("config: %+v", o.Config)
	}
	if s.Labels[RecreatedFromLabel] != "" {
		t.Fatal("createOptions changed the record's labels")
	}
	drivers := map[string]string{}
	for _, m := range o.HostConfig.Mounts {
		if m.VolumeOptions != nil {
			drivers[m.Source] = m.VolumeOptions.DriverConfig.Name
		} else if m.Source != "/etc/app" || !m.ReadOnly {
			t.Fatalf("bind mount: %+v", m)
		}
	}
	if drivers["db"] != "tether-b" || drivers["cache"] != "local" {
		t.Fatalf("volume drivers: %v", drivers)
	}
	if len(o.HostConfig.PortBindings) != 1 || len(o.Config.ExposedPorts) != 1 || o.HostConfig.RestartPolicy.Name != "always" {
		t.Fatalf("ports %v exposed %v restart %v", o.HostConfig.PortBindings, o.Config.ExposedPorts, o.HostConfig.RestartPolicy)
	}
	for p, b := range o.HostConfig.PortBindings {
		if p.String() != "80/tcp" || b[0].HostIP.String() != "127.0.0.1" || b[0].HostPort != "8080" {
			t.Fatalf("binding %v %v", p, b)
		}
	}
}

// TestSpecFromInspectRoundTrip: what the engine says of a container
// becomes a record that validates, and the record creates the same
// container through the new host's driver.
func TestSpecFromInspectRoundTrip(t *testing.T) {
	port, err := network.ParsePort("80/tcp")
	if err != nil {
		t.Fatal(err)
	}
	ins := container.InspectResponse{
		Name: "/app",
		Config: &container.Config{Image: "app:1", Cmd: []string{"serve"}, Entrypoint: []string{"/bin/app"},
			Env: []string{"A=1"}, WorkingDir: "/srv", User: "1000", Labels: map[string]string{cluster.FailoverLabel: "true"}},
		HostConfig: &container.HostConfig{
			PortBindings:  network.PortMap{port: {{HostPort: "8080"}}},
			RestartPolicy: container.RestartPolicy{Name: "on-failure", MaximumRetryCount: 3},
			NetworkMode:   "bridge",
			Tmpfs:         map[string]string{"/run": ""},
		},
		Mounts: []container.MountPoint{
			{Type: mount.TypeVolume, Name: "db", Destination: "/data", Driver: "tether-a", RW: true},
			{Type: mount.TypeBind, Source: "/etc/app", Destination: "/etc/app", RW: false},
		},
	}
	s := specFromInspect(ins, "a", "tether-a")
	if err := cluster.ValidateContainerSpec(s); err != nil {
		t.Fatal(err)
	}
	want := cluster.ContainerSpec{Name: "app", Node: "a", Driver: "tether-a", Image: "app:1", Cmd: []string{"serve"},
		Entrypoint: []string{"/bin/app"}, Env: []string{"A=1"}, WorkingDir: "/srv", User: "1000",
		Labels: map[string]string{cluster.FailoverLabel: "true"},
		Mounts: []cluster.ContainerMount{
			{Type: "volume", Source: "db", Target: "/data", Driver: "tether-a"},
			{Type: "bind", Source: "/etc/app", Target: "/etc/app", ReadOnly: true},
			{Type: "tmpfs", Target: "/run"},
		},
		Ports:   []cluster.PortBinding{{ContainerPort: "80/tcp", HostPort: "8080"}},
		Restart: "on-failure", RestartMaxRetries: 3, NetworkMode: "bridge"}
	if !s.Equal(want) {
		t.Fatalf("spec\n%+v\nwant\n%+v", s, want)
	}
	o := createOptions(s, "app", "tether-b")
	if o.Config.WorkingDir != "/srv" || o.Config.User != "1000" || !reflect.DeepEqual(o.Config.Entrypoint, []string{"/bin/app"}) ||
		o.HostConfig.RestartPolicy.MaximumRetryCount != 3 || o.HostConfig.NetworkMode != "bridge" || len(o.HostConfig.Mounts) != 3 ||
		o.HostConfig.Mounts[0].VolumeOptions.DriverConfig.Name != "tether-b" {
		t.Fatalf("create options: %+v %+v", o.Config, o.HostConfig)
	}
}
