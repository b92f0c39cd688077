package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/tether-io/tether/proto/tetherpb"
)

func TestParseByteRate(t *testing.T) {
	cases := map[string]struct {
		in   string
		want int64
		bad  bool
	}{
		"zero is no limit": {in: "0", want: 0},
		"plain bytes":      {in: "1048576", want: 1 << 20},
		"MiB":              {in: "50MiB", want: 50 << 20},
		"MB per second":    {in: "100MB/s", want: 100_000_000},
		"fraction of GiB":  {in: "1.5GiB", want: 3 << 29},
		"KB with a space":  {in: "64 KB", want: 64_000},
		"B":                {in: "512B", want: 512},
		"negative":         {in: "-1MiB", bad: true},
		"garbage":          {in: "fast", bad: true},
		"unknown unit":     {in: "5TB", bad: true},
		"empty":            {in: "", bad: true},
		"overflow":         {in: "1e30GB", bad: true},
	}
	for name, c := range cases {
		got, err := parseByteRate(c.in)
		if c.bad {
			if err == nil {
				t.Errorf("%s: parseByteRate(%q) = %d, want an error", name, c.in, got)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("%s: parseByteRate(%q) = %d, %v, want %d", name, c.in, got, err, c.want)
		}
	}
}

func TestParseBytes(t *testing.T) {
	for in, want := range map[string]int64{"1GiB": 1 << 30, "512MiB": 512 << 20, "0": 0, "2 GB": 2e9} {
		if got, err := parseBytes(in); err != nil || got != want {
			t.Errorf("parseBytes(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"1GiB/s", "-1", "lots", ""} {
		if got, err := parseBytes(in); err == nil {
			t.Errorf("parseBytes(%q) = %d, want an error", in, got)
		}
	}
}

func TestPrintReplicaTable(t *testing.T) {
	var out bytes.Buffer
	st := &tetherpb.VolumeStatus{WatchLimit: "inotify watch limit reached", CutError: "write spool: no space left on device", Replicas: []*tetherpb.ReplicaStatus{{
		Node: "h2", Connected: true, AckedSeq: 7, AckedCutUnixNano: time.Date(2026, 12, 7, 10, 0, 0, 0, time.UTC).UnixNano(),
		LagMs: 1500, LagBytes: 123456, PendingCuts: 3, FullSyncDoneBytes: 3 << 29, FullSyncTotalBytes: 4 << 30,
	}, {Node: "h3"}}}
	if err := printReplicaTable(&out, st); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"LAST DURABLE CUT", "LAG BYTES", "PENDING CUTS", "2026-12-07T10:00:00Z", "1.5s", "123456", "WATCH LIMIT: inotify watch limit reached",
		"CUT FAILING: write spool: no space left on device", "37% of 4.0 GiB"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("replica table lacks %q:\n%s", want, out.String())
		}
	}
	if fields := strings.Fields(strings.Split(out.String(), "\n")[3]); len(fields) < 7 || fields[5] != "123456" || fields[6] != "3" {
		t.Errorf("replica row %q: want lag bytes 123456 and 3 pending cuts in columns 6 and 7", fields)
	}
	if fields := strings.Fields(strings.Split(out.String(), "\n")[4]); len(fields) < 8 || fields[7] != "-" {
		t.Errorf("row of a replica not being sent the whole tree %q: want - under FULL SYNC", fields)
	}
}
