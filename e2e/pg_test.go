package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tether-io/tether/internal/testutil"
	"github.com/tether-io/tether/proto/tetherpb"
)

// PostgreSQL from Debian's packages, in an image made from a debootstrap
// rootfs (no registry here), run under pgbench on a tether volume; the
// primary's host is killed under load and PostgreSQL must recover by itself
// on the promoted copy.

// pgImageTag names the image; it is built once per engine.
const pgImageTag = "tether-e2e-pg:bookworm-15"

const pgBin = "/usr/lib/postgresql/15/bin"

// pgImage returns the PostgreSQL image, building it first if the engine
// does not have it: debootstrap of Debian bookworm (minbase) with
// postgresql-15, trimmed of docs and locales, then docker import.
func pgImage(t *testing.T) string {
	t.Helper()
	if _, err := docker(t, "image", "inspect", pgImageTag); err == nil {
		return pgImageTag
	}
	if os.Geteuid() != 0 {
		t.Fatal("building the PostgreSQL image needs root (debootstrap); run make e2e as root")
	}
	if _, err := exec.LookPath("debootstrap"); err != nil {
		t.Fatal("debootstrap not found: apt-get install debootstrap (.ci/run installs it)")
	}
	mirror := os.Getenv("TETHER_E2E_DEBIAN_MIRROR")
	if mirror == "" {
		mirror = "http://deb.debian.org/debian"
	}
	root := filepath.Join(t.TempDir(), "rootfs")
	start := time.Now()
	boot := exec.Command("debootstrap", "--variant=minbase", "--include=postgresql-15", "bookworm", root, mirror)
	if out, err := boot.CombinedOutput(); err != nil {
		t.Fatalf("debootstrap of the PostgreSQL rootfs from %s: %v\n%s", mirror, err, lastLines(string(out), 20))
	}
	for _, junk := range []string{"usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/info", "usr/share/i18n", "var/cache/apt", "var/lib/apt/lists"} {
		if err := os.RemoveAll(filepath.Join(root, junk)); err != nil {
			t.Fatal(err)
		}
	}
	imp := exec.Command("sh", "-c", fmt.Sprintf("tar -C %s -c . | docker import - %s", root, pgImageTag))
	if out, err := imp.CombinedOutput(); err != nil {
		t.Fatalf("importing the PostgreSQL rootfs: %v\n%s", err, out)
	}
	t.Logf("built %s from Debian's packages in %s", pgImageTag, time.Since(start).Round(time.Second))
	return pgImageTag
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// pgStart starts the server on /data/pg (socket in /tmp, no TCP); on
// failure it prints the server's log.
const pgStart = `su postgres -c "` + pgBin + `/pg_ctl -D /data/pg -w -t 120 -o '-k /tmp -c listen_addresses=' -l /tmp/pg.log start" >/dev/null || { cat /tmp/pg.log >&2; exit 1; }
export PGHOST=/tmp PGUSER=postgres PGDATABASE=postgres
`

// pgInit makes the cluster, the acks table and pgbench's tables.
const pgInit = `set -e
mkdir /data/pg && chown postgres:postgres /data/pg && chmod 700 /data/pg
su postgres -c "` + pgBin + `/initdb -D /data/pg -A trust" >/dev/null
` + pgStart + `
` + pgBin + `/psql -qAt -c "create table acks (n bigint primary key)"
` + pgBin + `/pgbench -q -i -s 5 2>&1 | tail -1
su postgres -c "` + pgBin + `/pg_ctl -D /data/pg -w -m fast stop" >/dev/null
`

// pgLoad runs pgbench (2 clients, no end) and, beside it, numbered
// inserts into acks, one transaction each, printing "ack N UNIXNANO" once
// the commit returned (synchronous_commit is on: durable on this host).
const pgLoad = pgStart + `
` + pgBin + `/pgbench -c 2 -T 3600 >/tmp/pgbench.log 2>&1 &
i=0
while true; do
  i=$((i+1))
  if ` + pgBin + `/psql -qAt -c "insert into acks values ($i)"; then echo "ack $i $(date +%s%N)"; else echo "fail $i"; fi
done
`

// pgVerify starts the server on a copy (crash recovery, by itself) and
// checks it: the acks rows, pgbench's invariant (every transaction adds
// its delta to one account, teller and branch and logs it in history, so
// the four sums are equal in any consistent state), and pg_amcheck over
// every table and index.
const pgVerify = pgStart + `
cat /tmp/pg.log
echo "acks $(` + pgBin + `/psql -qAt -F ' ' -c "select count(*), coalesce(min(n),0), coalesce(max(n),0) from acks")"
echo "gaps $(` + pgBin + `/psql -qAt -c "select string_agg(g::text, ',') from generate_series((select min(n) from acks), (select max(n) from acks)) g where g not in (select n from acks)")"
echo "sums $(` + pgBin + `/psql -qAt -F ' ' -c "select (select coalesce(sum(abalance),0) from pgbench_accounts), (select coalesce(sum(tbalance),0) from pgbench_tellers), (select coalesce(sum(bbalance),0) from pgbench_branches), (select coalesce(sum(delta),0) from pgbench_history), (select count(*) from pgbench_history)")"
if ` + pgBin + `/pg_amcheck --install-missing --heapallindexed postgres >/tmp/amcheck.log 2>&1; then echo "amcheck ok"; else echo "amcheck failed: $(tr '\n' ' ' </tmp/amcheck.log)"; fi
su postgres -c "` + pgBin + `/pg_ctl -D /data/pg -w -m fast stop" >/dev/null
`

// pgResult is what pgVerify printed.
type pgResult struct {
	recovered bool // the server said it is ready to accept connections
	log       string
	rows      int64
	min, max  int64
	gaps      []int64 // numbers missing between min and max
	sums      [4]int64
	history   int64
	amcheck   string
}

func (r *pgResult) has(n int64) bool {
	if r.rows == 0 || n < r.min || n > r.max {
		return false
	}
	return !slices.Contains(r.gaps, n)
}

func parsePGVerify(out string) (*pgResult, error) {
	r := &pgResult{log: out}
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		switch {
		case strings.Contains(line, "database system is ready to accept connections"):
			r.recovered = true
		case len(f) == 4 && f[0] == "acks":
			var err error
			for i, p := range []*int64{&r.rows, &r.min, &r.max} {
				if *p, err = strconv.ParseInt(f[i+1], 10, 64); err != nil {
					return nil, fmt.Errorf("acks line %q: %w", line, err)
				}
			}
		case len(f) >= 1 && f[0] == "gaps":
			if len(f) == 2 {
				for _, s := range strings.Split(f[1], ",") {
					n, err := strconv.ParseInt(s, 10, 64)
					if err != nil {
						return nil, fmt.Errorf("gaps line %q: %w", line, err)
					}
					r.gaps = append(r.gaps, n)
				}
			}
		case len(f) == 6 && f[0] == "sums":
			for i := range 4 {
				n, err := strconv.ParseInt(f[i+1], 10, 64)
				if err != nil {
					return nil, fmt.Errorf("sums line %q: %w", line, err)
				}
				r.sums[i] = n
			}
			n, err := strconv.ParseInt(f[5], 10, 64)
			if err != nil {
				return nil, fmt.Errorf("sums line %q: %w", line, err)
			}
			r.history = n
		case len(f) >= 2 && f[0] == "amcheck":
			r.amcheck = strings.TrimPrefix(line, "amcheck ")
		}
	}
	if r.amcheck == "" {
		return nil, fmt.Errorf("the verification printed no amcheck verdict:\n%s", lastLines(out, 30))
	}
	return r, nil
}

// TestPostgresFailover runs PostgreSQL under pgbench (and numbered
// inserts) on h1's copy of a 3-copy volume, kills h1's host (agent and
// database together) under load, and starts PostgreSQL on the promoted
// copy: it must recover by itself, pass pg_amcheck, keep pgbench's
// balances consistent, and hold every insert acknowledged earlier than the
// lag the primary reported before the kill.
func TestPostgresFailover(t *testing.T) {
	requireE2E(t)
	img := pgImage(t)
	// As a user runs a database on tether: through the volume driver
	// (h1's), with the freeze option, so that a cut that PostgreSQL's
	// writes never leave quiet pauses the container for a moment.
	pluginDir := pluginDirFor(t)
	// The engine's name for the volume is tether's, "vol" (the harness's
	// monitor watches it): a run that was aborted may have left it, and
	// containers using it, behind.
	removeDockerVolume(t, "vol")
	tp := startTopo(t, 3, driverOn("h1", pluginDir))
	primary := tp.host("h1")
	work := fmt.Sprintf("%s-pg-%s", tp.prefix, primary.name)
	// Registered after the topology's cleanup, so it runs first: bring the
	// killed host's agent back, so that dockerd's driver answers while the
	// container and the volume are removed.
	t.Cleanup(func() {
		docker(t, "start", primary.container)
		testutil.EventuallyErr(t, 30*time.Second, func() error {
			_, err := os.Stat(filepath.Join(pluginDir, e2eDriverName+".sock"))
			return err
		})
		removeDockerVolume(t, "vol")
	})
	testutil.EventuallyErr(t, 20*time.Second, func() error {
		_, err := os.Stat(filepath.Join(pluginDir, e2eDriverName+".sock"))
		return err
	})
	mustDocker(t, "volume", "create", "-d", e2eDriverName, "-o", "replicas=3", "-o", "freeze=true", "vol")
	v, err := tp.catalogOn(primary)
	if err != nil {
		t.Fatal(err)
	}
	if v.Primary != primary.name || !v.Freeze {
		t.Fatalf("docker volume create made %+v; want primary %s with freeze", v, primary.name)
	}
	runPG := func(h *host, script string) (string, error) {
		return docker(t, "run", "--rm", "--network", "none", "-v", h.volumeDir("vol")+":/data", img, "bash", "-c", script)
	}
	if out, err := docker(t, "run", "--rm", "--network", "none", "-v", "vol:/data", img, "bash", "-c", pgInit); err != nil {
		t.Fatalf("initdb and pgbench -i on %s: %v\n%s", primary.name, err, out)
	}
	mustDocker(t, "run", "-d", "--name", work, "--network", "none", "-v", "vol:/data", img, "bash", "-c", pgLoad)
	tp.underLoad(t, primary, work, 200, 90*time.Second)
	var st tetherpb.StatusResponse
	if err := tp.ctl(primary, &st, "status"); err == nil {
		for _, ps := range st.PrimaryOf {
			if ps.Name == "vol" {
				t.Logf("under pgbench: %d cuts, %d of them file-consistent only", ps.Cuts, ps.FileConsistentOnlyCuts)
				if ps.FileConsistentOnlyCuts > 0 {
					// The freeze hook could not make every cut consistent (a
					// pause refused, or the cut's read outlasting MaxFreeze);
					// the product counts and logs them, and so does the report.
					tp.rec.finding(t, "under pgbench with the freeze option, %d of %d cuts shipped file-consistent only", ps.FileConsistentOnlyCuts, ps.Cuts)
				}
			}
		}
	}
	lagAsked := time.Now()
	// `docker kill` returns only once the database container has exited,
	// and its exit waits for dockerd's Unmount to the dead driver (about 15
	// s of retries): the kill runs beside the measurement.
	killDone := make(chan error, 1)
	fi, killed := tp.inject("kill", primary, "primary", primary, func() {
		go func() {
			_, err := docker(t, "kill", work, primary.container)
			killDone <- err
		}()
		testutil.EventuallyErr(t, 10*time.Second, func() error {
			if out, _ := docker(t, "inspect", "--format", "{{.State.Running}}", primary.container); out != "false" {
				return fmt.Errorf("%s still runs", primary.container)
			}
			return nil
		})
	})
	var lag map[string]int64
	tp.rec.update(func(r *report) { lag = r.Faults[fi].LagMs })
	nv, fo := tp.measureFailover(t, "kill", killed, v, tp.host(v.ReplicaNodes[0]))
	np := tp.host(nv.Primary)
	if err := <-killDone; err != nil {
		t.Fatal(err)
	}

	out, err := runPG(np, pgVerify)
	fo.ContainerReadyMs = time.Since(killed).Milliseconds()
	tp.rec.failover(fo)
	if err != nil {
		t.Fatalf("PostgreSQL does not start on the new primary %s's copy: %v\n%s", np.name, err, lastLines(out, 30))
	}
	res, err := parsePGVerify(out)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("PostgreSQL on %s after the kill:\n%s", np.name, lastLines(out, 12))
	if !strings.Contains(res.log, "not properly shut down") && !strings.Contains(res.log, "was interrupted") {
		t.Errorf("PostgreSQL's log on %s shows no crash recovery, yet its copy was taken from a running server:\n%s", np.name, res.log)
	} else if !res.recovered {
		t.Errorf("PostgreSQL on %s did not finish crash recovery:\n%s", np.name, res.log)
	}
	if res.amcheck != "ok" {
		tp.rec.violation("pg_amcheck on the promoted copy: %s", res.amcheck)
	}
	if s := res.sums; s[0] != s[1] || s[1] != s[2] || s[2] != s[3] {
		tp.rec.violation("pgbench's balances disagree on the promoted copy (accounts, tellers, branches, history): %v", s)
	}
	if len(res.gaps) > 0 {
		tp.rec.violation("the acks table on the promoted copy has gaps starting at %v: a later commit survived an earlier one", res.gaps)
	}
	tp.rec.finding(t, "PostgreSQL 15 recovered by itself on %s's copy: %d pgbench transactions in history, %d numbered inserts (%d..%d)", np.name, res.history, res.rows, res.min, res.max)

	lagMs, ok := lag[np.name]
	if !ok {
		t.Fatalf("the primary reported no lag for %s before the kill: %v", np.name, lag)
	}
	acks, failed := workloadLog(t, work)
	ops, lastAcked, lostBeyond := countLosses(acks, failed, res.has, lagMs, lagAsked, killed)
	tp.rec.update(func(r *report) { r.Operations = ops })
	t.Logf("inserts: %d acknowledged (last %d), %d failed; the copy holds %d..%d; lag of %s before the kill %d ms; acked and lost: %d within the lag, %d beyond",
		len(acks), lastAcked, failed, res.min, res.max, np.name, lagMs, ops.AckedLostWithinLag, ops.AckedLostBeyondLag)
	if len(lostBeyond) > 0 {
		tp.rec.violation("%d inserts acknowledged more than the reported lag (%d ms) before the kill are missing on %s: %v",
			len(lostBeyond), lagMs, np.name, lostBeyond[:min(len(lostBeyond), 20)])
	}
	if res.max > lastAcked+1 {
		tp.rec.violation("the copy holds inserts up to %d but only %d were started", res.max, lastAcked+1)
	}
	// The database runs on the new primary (it was cleanly stopped by the
	// verification) and the surviving replica converges to it.
	if out, err := runPG(np, pgStart+pgBin+"/pgbench -t 50 -c 1 >/dev/null && "+pgBin+"/psql -qAt -c 'select count(*) from pgbench_history'; su postgres -c '"+pgBin+"/pg_ctl -D /data/pg -w -m fast stop' >/dev/null"); err != nil {
		t.Fatalf("pgbench on the new primary %s: %v\n%s", np.name, err, out)
	}
	tp.quiescent(t, hostsExcept(tp, primary.name))

	// The killed host comes back. Docker sent its driver no Unmount for the
	// killed database (the driver was dead): once its Engine answers, the
	// agent forgets that stale mount, so the volume can be removed with
	// `docker volume rm` as usual, not blocked for ever.
	mustDocker(t, "start", primary.container)
	tp.servesAsReplica(t, primary)
	mustDocker(t, "rm", "-f", work)
	testutil.EventuallyErr(t, 30*time.Second, func() error {
		_, err := docker(t, "volume", "rm", "vol")
		return err
	})
}

// removeDockerVolume removes the engine's volume name and every container
// that uses it.
func removeDockerVolume(t *testing.T, name string) {
	t.Helper()
	if ids, _ := docker(t, "ps", "-aq", "--filter", "volume="+name); ids != "" {
		docker(t, append([]string{"rm", "-f"}, strings.Fields(ids)...)...)
	}
	if _, err := docker(t, "volume", "inspect", name); err == nil {
		if _, err := docker(t, "volume", "rm", "-f", name); err != nil {
			t.Logf("removing the engine's volume %s: %v", name, err)
		}
	}
}
