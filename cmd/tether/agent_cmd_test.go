package main

import "testing"

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
