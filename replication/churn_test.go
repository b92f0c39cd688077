package replication

import (
	"io/fs"
	"math/rand/v2"
	"os"
	"strconv"
	"testing"
)

// TestChurn makes many random changes without waiting between them (so
// events, debouncing and batches overlap) and checks that the replicas end
// up equal to the primary.
func TestChurn(t *testing.T) {
	c := newTestCluster(t)
	c.startReplica("r1")
	c.startReplica("r2")
	c.startReplica("r3")
	p := c.startPrimary(1, "r1", "r2")
	c.waitSynced("r1", "r2")

	rng := rand.New(rand.NewPCG(1, 2))
	var names []string
	for _, a := range []string{"a", "b", "c", "d", "e"} {
		names = append(names, a)
		for _, b := range []string{"x", "y"} {
			names = append(names, a+"/"+b)
			for _, c := range []string{"p", "\xffq"} {
				names = append(names, a+"/"+b+"/"+c)
			}
		}
	}
	pick := func() string { return c.path(names[rng.IntN(len(names))]) }
	// Errors (ENOENT, ENOTDIR, ENOTEMPTY...) are part of random churn.
	ignore := func(error) {}
	for round := range 3 {
		if round == 1 {
			// A replica joins during churn: the full cut it needs is a delta
			// for the others.
			p.SetReplicas([]string{"r1", "r2", "r3"})
		}
		churn(c, rng, names, ignore, pick)
		c.waitSynced("r1", "r2")
		if round >= 1 {
			c.waitSynced("r3")
		}
		m, err := Manifest(c.primaryData)
		must(t, err)
		t.Logf("round %d: %d entries in sync", round, len(m))
	}
}

func churn(c *testCluster, rng *rand.Rand, names []string, ignore func(error), pick func() string) {
	for i := range 400 {
		p := pick()
		switch rng.IntN(9) {
		case 0, 1:
			ignore(os.WriteFile(p, []byte(strconv.Itoa(i)), 0o644))
		case 2:
			ignore(os.MkdirAll(p, 0o755))
		case 3:
			ignore(os.RemoveAll(p))
		case 4:
			ignore(os.Rename(p, pick()))
		case 5:
			ignore(os.Symlink(names[rng.IntN(len(names))], p))
		case 6:
			ignore(os.Chmod(p, fs.FileMode(rng.IntN(0o777))|0o700))
		case 7:
			f, err := os.OpenFile(p, os.O_APPEND|os.O_WRONLY, 0)
			if err == nil {
				_, _ = f.WriteString("more")
				_ = f.Close()
			}
		case 8:
			ignore(os.MkdirAll(pick(), 0o750))
			ignore(os.WriteFile(p, nil, 0o600))
		}
	}
}
