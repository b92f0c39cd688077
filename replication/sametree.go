package replication

import (
	"fmt"
	"strings"
)

// SameTree returns nil when the trees under want and got are equal entry
// for entry (as Manifest sees them), and an error listing the differences
// otherwise. Tests, the demo and the e2e suite use it to check replicas.
func SameTree(want, got string) error {
	a, err := Manifest(want)
	if err != nil {
		return err
	}
	b, err := Manifest(got)
	if err != nil {
		return err
	}
	if d := DiffManifests(a, b); len(d) > 0 {
		return fmt.Errorf("%s differs from %s: %s", got, want, strings.Join(d, "; "))
	}
	return nil
}
