package main

import (
	"bytes"
	"reflect"
	"strings"
	"testing"

	"github.com/tether-io/tether/proto/tetherpb"
)

func TestFindShadows(t *testing.T) {
	tv := []*tetherpb.Volume{{Name: "pg"}, {Name: "web"}, {Name: "gone", DeletedUnixNano: 5}}
	dv := []dockerVolume{
		{Name: "pg", Driver: "local", Mountpoint: "/var/lib/docker/volumes/pg/_data"},
		{Name: "web", Driver: "tether"},
		{Name: "gone", Driver: "local"},
		{Name: "other", Driver: "local"},
		{Name: "a-pg", Driver: "local"},
	}
	got := findShadows(tv, dv, "tether")
	want := []shadow{{Name: "pg", Driver: "local", Mountpoint: "/var/lib/docker/volumes/pg/_data", Containers: []string{}}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("findShadows = %+v, want %+v", got, want)
	}
	var out bytes.Buffer
	if err := printDoctor(&out, doctorReport{TetherVolumes: 2, Shadows: got}, "tether", false); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "SHADOW VOLUME pg") || !strings.Contains(out.String(), "--volume-driver tether") {
		t.Fatalf("report: %s", out.String())
	}
	if got := findShadows(tv, nil, "tether"); len(got) != 0 {
		t.Fatalf("no docker volumes: %+v", got)
	}
}
