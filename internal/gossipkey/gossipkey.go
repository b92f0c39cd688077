package gossipkey

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"strings"
)

// Size is the length of the keys New makes (AES-256).
const Size = 32

// New returns a fresh random key, base64 encoded.
func New() (string, error) {
	b := make([]byte, Size)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("reading random bytes: %w", err)
	}
	return base64.StdEncoding.EncodeToString(b), nil
}

// Parse decodes one base64 key and checks its length.
func Parse(s string) ([]byte, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return nil, errors.New("the gossip key is empty (make one with tether keygen)")
	}
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return nil, fmt.Errorf("the gossip key is not valid base64 (make one with tether keygen): %w", err)
	}
	switch len(b) {
	case 16, 24, 32:
		return b, nil
	}
	return nil, fmt.Errorf("the gossip key is %d bytes; want 32 (or 16 or 24): make one with tether keygen", len(b))
}

// ParseKeyring parses a keyring file's content; the first key is the
// primary one.
func ParseKeyring(content []byte) ([][]byte, error) {
	var keys [][]byte
	seen := map[string]bool{}
	sc := bufio.NewScanner(bytes.NewReader(content))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, err := Parse(line)
		if err != nil {
			return nil, fmt.Errorf("line %d: %w", n, err)
		}
		if seen[string(k)] {
			return nil, fmt.Errorf("line %d: the key is listed twice", n)
		}
		seen[string(k)] = true
		keys = append(keys, k)
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(keys) == 0 {
		return nil, errors.New("the keyring holds no key")
	}
	return keys, nil
}

// ReadKeyring reads and parses a keyring file.
func ReadKeyring(path string) ([][]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading the gossip keyring: %w", err)
	}
	keys, err := ParseKeyring(b)
	if err != nil {
		return nil, fmt.Errorf("gossip keyring %s: %w", path, err)
	}
	return keys, nil
}
