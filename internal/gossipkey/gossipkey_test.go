package gossipkey

import (
	"encoding/base64"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestNew(t *testing.T) {
	a, err := New()
	if err != nil {
		t.Fatal(err)
	}
	b, _ := New()
	k, err := Parse(a)
	if err != nil || len(k) != Size || a == b {
		t.Fatalf("New: %q (%d bytes, %v), second %q", a, len(k), err, b)
	}
}

func TestParse(t *testing.T) {
	b64 := func(n int) string { return base64.StdEncoding.EncodeToString(make([]byte, n)) }
	for _, tc := range []struct {
		in, err string
	}{
		{b64(32), ""}, {b64(16), ""}, {b64(24), ""}, {" " + b64(32) + "\n", ""},
		{"", "empty"}, {"not base64!", "not valid base64"}, {b64(31), "31 bytes"}, {b64(64), "64 bytes"},
	} {
		_, err := Parse(tc.in)
		if (tc.err == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tc.err)) {
			t.Errorf("Parse(%q): %v, want %q", tc.in, err, tc.err)
		}
	}
}

func TestParseKeyring(t *testing.T) {
	k1 := base64.StdEncoding.EncodeToString([]byte(strings.Repeat("a", 32)))
	k2 := base64.StdEncoding.EncodeToString([]byte(strings.Repeat("b", 32)))
	keys, err := ParseKeyring([]byte("# primary first\n" + k1 + "\n\n  " + k2 + "\n"))
	if err != nil || len(keys) != 2 || string(keys[0]) != strings.Repeat("a", 32) {
		t.Fatalf("got %d keys, %v", len(keys), err)
	}
	for content, want := range map[string]string{
		"":                      "holds no key",
		"# only a comment\n":    "holds no key",
		k1 + "\nbad\n":          "line 2",
		k1 + "\n" + k1 + "\n":   "listed twice",
		"\n\n" + k1[:10] + "\n": "line 3",
	} {
		if _, err := ParseKeyring([]byte(content)); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("ParseKeyring(%q): %v, want %q", content, err, want)
		}
	}
	path := filepath.Join(t.TempDir(), "keyring")
	if err := os.WriteFile(path, []byte(k2+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if keys, err := ReadKeyring(path); err != nil || len(keys) != 1 {
		t.Fatalf("ReadKeyring: %d keys, %v", len(keys), err)
	}
	if _, err := ReadKeyring(path + ".missing"); err == nil {
		t.Fatal("ReadKeyring of a missing file succeeded")
	}
}
