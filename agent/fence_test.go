package agent

import (
	"testing"

	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/api/types/mount"
)

func TestUsesVolume(t *testing.T) {
	mk := func(ms ...container.MountPoint) container.Summary { return container.Summary{Mounts: ms} }
	vol := func(name, driver, dest string) container.MountPoint {
		return container.MountPoint{Type: mount.TypeVolume, Name: name, Driver: driver, Destination: dest}
	}
	for _, tc := range []struct {
		name string
		c    container.Summary
		want bool
	}{
		{"ours", mk(vol("pg", "tether", "/data")), true},
		{"second mount", mk(vol("x", "tether", "/x"), vol("pg", "tether", "/data")), true},
		{"shadow of another driver", mk(vol("pg", "local", "/data")), false},
		{"destination named like the volume", mk(vol("other", "tether", "pg")), false},
		{"bind mount", mk(container.MountPoint{Type: mount.TypeBind, Name: "pg", Source: "/srv/pg"}), false},
		{"no mounts", mk(), false},
	} {
		if got := usesVolume(tc.c, "pg", "tether"); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
}
