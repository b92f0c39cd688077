package demo

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/tether-io/tether/agent"
	"github.com/tether-io/tether/internal/tlsutil"
	"github.com/tether-io/tether/proto/tetherpb"
	"github.com/tether-io/tether/replication"
)

// Options configure a demo run.
type Options struct {
	// Exe is the tether binary to start agents from.
	Exe string
	// Dir is where the agents' data dirs go; empty means a new temporary
	// directory, removed at the end unless Keep.
	Dir string
	// Keep leaves the surviving agents running when the demo ends.
	Keep bool
	Out  io.Writer
	// Timeout bounds each waiting step.
	Timeout time.Duration
}

const volumeName = "demo"

// node is one agent process of the demo.
type node struct {
	name    string
	dataDir string
	gossip  string
	rpc     string
	http    string
	cmd     *exec.Cmd
	exited  chan struct{}
	conn    *grpc.ClientConn
	ctl     tetherpb.ControlClient
	tls     tlsutil.Files
}

type run struct {
	opt   Options
	dir   string
	nodes []*node
	start time.Time
	// keyring is the gossip keyring file (secure.go).
	keyring string
}

// Run runs the demo and returns an error when any step fails.
func Run(ctx context.Context, opt Options) (err error) {
	if opt.Out == nil {
		opt.Out = os.Stdout
	}
	if opt.Timeout == 0 {
		opt.Timeout = 60 * time.Second
	}
	r := &run{opt: opt, start: time.Now()}
	if r.dir = opt.Dir; r.dir == "" {
		if r.dir, err = os.MkdirTemp("", "tether-demo-"); err != nil {
			return fmt.Errorf("creating the demo directory: %w", err)
		}
	}
	defer func() { r.cleanup(err) }()
	steps := []func(context.Context) error{r.startAgents, r.createVolume, r.replicate, r.failover, r.afterFailover}
	for _, step := range steps {
		if err := step(ctx); err != nil {
			return err
		}
	}
	r.say("\nDone in %s: the volume survived the loss of its primary and kept replicating.\n", time.Since(r.start).Round(time.Millisecond))
	return nil
}

func (r *run) say(format string, args ...any) {
	fmt.Fprintf(r.opt.Out, format, args...)
}

func (r *run) startAgents(ctx context.Context) error {
	r.say("tether demo: three agents on this machine, in %s\n\n", r.dir)
	for i := 1; i <= 3; i++ {
		n := &node{name: fmt.Sprintf("node%d", i), dataDir: filepath.Join(r.dir, fmt.Sprintf("node%d", i))}
		var err error
		if n.gossip, err = freeAddr(true); err != nil {
			return err
		}
		if n.rpc, err = freeAddr(false); err != nil {
			return err
		}
		if n.http, err = freeAddr(false); err != nil {
			return err
		}
		r.nodes = append(r.nodes, n)
	}
	if err := r.setupSecurity(); err != nil {
		return err
	}
	var joins []string
	for _, n := range r.nodes {
		joins = append(joins, n.gossip)
	}
	for _, n := range r.nodes {
		if err := r.startAgent(n, joins); err != nil {
			return err
		}
		r.say("  started %s (pid %d): gossip %s, rpc %s, log %s\n", n.name, n.cmd.Process.Pid, n.gossip, n.rpc, filepath.Join(n.dataDir, "agent.log"))
	}
	t0 := time.Now()
	err := r.wait(ctx, "the three agents to form a cluster and elect a Raft leader", func(ctx context.Context) error {
		for _, n := range r.nodes {
			st, err := n.ctl.Status(ctx, &tetherpb.StatusRequest{})
			if err != nil {
				return err
			}
			if st.Leader == "" {
				return fmt.Errorf("%s knows no leader yet", n.name)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	st, _ := r.nodes[0].ctl.Status(ctx, &tetherpb.StatusRequest{})
	r.say("  cluster formed in %s; Raft leader: %s\n\n", time.Since(t0).Round(time.Millisecond), st.GetLeader())
	return nil
}

func (r *run) startAgent(n *node, joins []string) error {
	if err := os.MkdirAll(n.dataDir, 0o700); err != nil {
		return fmt.Errorf("creating %s: %w", n.dataDir, err)
	}
	logf, err := os.Create(filepath.Join(n.dataDir, "agent.log"))
	if err != nil {
		return fmt.Errorf("creating the agent log: %w", err)
	}
	args := []string{"agent", "--node-name", n.name, "--data-dir", n.dataDir,
		"--gossip-addr", n.gossip, "--rpc-addr", n.rpc, "--http-addr", n.http,
		"--bootstrap-expect", "3", "--log-level", "debug",
		"--driver-socket", ""} // three agents on one host: no Docker volume driver (they would share its socket)
	args = append(args, r.securityArgs(n)...)
	for _, j := range joins {
		if j != n.gossip {
			args = append(args, "--join", j)
		}
	}
	n.cmd = exec.Command(r.opt.Exe, args...)
	n.cmd.Stdout, n.cmd.Stderr = logf, logf
	if !r.opt.Keep {
		// The agents die with the demo, even if it is killed.
		n.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	}
	if err := n.cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("starting %s: %w", n.name, err)
	}
	n.exited = make(chan struct{})
	go func() { n.cmd.Wait(); logf.Close(); close(n.exited) }()
	n.conn, err = grpc.NewClient("unix://"+agent.SocketPath(n.dataDir), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fmt.Errorf("control client for %s: %w", n.name, err)
	}
	n.ctl = tetherpb.NewControlClient(n.conn)
	return nil
}

func (r *run) createVolume(ctx context.Context) error {
	r.say("Creating volume %q with 3 copies on %s:\n", volumeName, r.nodes[0].name)
	var v *tetherpb.Volume
	err := r.wait(ctx, "the volume to be created", func(ctx context.Context) error {
		resp, err := r.nodes[0].ctl.VolumeCreate(ctx, &tetherpb.VolumeCreateRequest{Name: volumeName, Replicas: 3})
		if err != nil {
			return err
		}
		v = resp.Volume
		return nil
	})
	if err != nil {
		return err
	}
	r.say("  primary %s, replicas %s, epoch %d\n  the primary's volume directory: %s\n\n", v.Primary, strings.Join(v.ReplicaNodes, ", "), v.Epoch, v.Path)
	return nil
}

func (r *run) byName(name string) *node {
	for _, n := range r.nodes {
		if n.name == name {
			return n
		}
	}
	return nil
}

func (n *node) volumeDir() string {
	return filepath.Join(n.dataDir, "volumes", volumeName, "data")
}

func (r *run) volume(ctx context.Context, via *node) (*tetherpb.VolumeInspectResponse, error) {
	return via.ctl.VolumeInspect(ctx, &tetherpb.VolumeInspectRequest{Name: volumeName})
}

func (r *run) replicate(ctx context.Context) error {
	vi, err := r.volume(ctx, r.nodes[0])
	if err != nil {
		return err
	}
	primary := r.byName(vi.Volume.Primary)
	r.say("Writing files into the primary's volume directory (as a container would):\n")
	files, err := writeFiles(primary.volumeDir(), "before-failover")
	if err != nil {
		return err
	}
	for _, f := range files {
		r.say("  wrote %s\n", f)
	}
	return r.waitReplicas(ctx, primary, vi.Volume.ReplicaNodes)
}

// waitReplicas waits until every live replica's tree equals the primary's,
// byte for byte, and prints how long each took.
func (r *run) waitReplicas(ctx context.Context, primary *node, replicas []string) error {
	t0 := time.Now()
	for _, name := range replicas {
		rep := r.byName(name)
		if rep == nil || rep.dead() {
			continue
		}
		err := r.wait(ctx, "the files to reach "+name, func(context.Context) error {
			return replication.SameTree(primary.volumeDir(), rep.volumeDir())
		})
		if err != nil {
			return err
		}
		r.say("  %s holds an identical copy after %s\n", name, time.Since(t0).Round(time.Millisecond))
	}
	// The primary learns of durability from the replicas' acks; wait for
	// them, then show what tether itself reports.
	var vi *tetherpb.VolumeInspectResponse
	err := r.wait(ctx, "the replicas' acknowledgements", func(ctx context.Context) error {
		var err error
		if vi, err = r.volume(ctx, primary); err != nil {
			return err
		}
		if vi.Status == nil || vi.Status.Error != "" {
			return fmt.Errorf("no live status: %v", vi.Status.GetError())
		}
		for _, rs := range vi.Status.Replicas {
			if n := r.byName(rs.Node); n != nil && !n.dead() && (!rs.Connected || rs.LagMs != 0) {
				return fmt.Errorf("%s has not acknowledged everything yet", rs.Node)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	for _, rs := range vi.Status.Replicas {
		state := fmt.Sprintf("batch %d durable, lag %dms", rs.AckedSeq, rs.LagMs)
		if n := r.byName(rs.Node); n != nil && n.dead() {
			state = "not connected (its agent is dead); it resynchronises when it returns"
		}
		r.say("  tether reports %s: %s\n", rs.Node, state)
	}
	r.say("\n")
	return nil
}

func (r *run) failover(ctx context.Context) error {
	vi, err := r.volume(ctx, r.nodes[0])
	if err != nil {
		return err
	}
	old := r.byName(vi.Volume.Primary)
	st, _ := old.ctl.Status(ctx, &tetherpb.StatusRequest{})
	wasLeader := st.GetLeader() == old.name
	role := "a follower"
	if wasLeader {
		role = "also the Raft leader, so a new leader is elected first"
	}
	r.say("Killing the primary %s with SIGKILL (it is %s).\n", old.name, role)
	killed := time.Now()
	if err := old.cmd.Process.Kill(); err != nil {
		return fmt.Errorf("killing %s: %w", old.name, err)
	}
	<-old.exited
	var survivor *node
	for _, n := range r.nodes {
		if n != old {
			survivor = n
			break
		}
	}
	var nv *tetherpb.Volume
	err = r.wait(ctx, "a replica to be promoted", func(ctx context.Context) error {
		resp, err := r.volume(ctx, survivor)
		if err != nil {
			return err
		}
		if resp.Volume.Epoch <= vi.Volume.Epoch || resp.Volume.Primary == old.name || resp.Volume.Primary == "" {
			return fmt.Errorf("volume still at epoch %d with primary %q", resp.Volume.Epoch, resp.Volume.Primary)
		}
		nv = resp.Volume
		return nil
	})
	if err != nil {
		return err
	}
	took := time.Since(killed)
	st, _ = survivor.ctl.Status(ctx, &tetherpb.StatusRequest{})
	r.say("  %s promoted to primary in %s: epoch %d -> %d (Raft leader now %s)\n", nv.Primary, took.Round(time.Millisecond), vi.Volume.Epoch, nv.Epoch, st.GetLeader())
	newPrimary := r.byName(nv.Primary)
	if err := replication.SameTree(old.volumeDir(), newPrimary.volumeDir()); err != nil {
		return fmt.Errorf("the new primary's copy differs from what the old primary held: %w", err)
	}
	r.say("  %s's copy equals what %s held when it died: nothing was lost\n\n", nv.Primary, old.name)
	return nil
}

func (r *run) afterFailover(ctx context.Context) error {
	var live *node
	for _, n := range r.nodes {
		if !n.dead() {
			live = n
			break
		}
	}
	vi, err := r.volume(ctx, live)
	if err != nil {
		return err
	}
	primary := r.byName(vi.Volume.Primary)
	r.say("Writing more files on the new primary %s:\n", primary.name)
	files, err := writeFiles(primary.volumeDir(), "after-failover")
	if err != nil {
		return err
	}
	for _, f := range files {
		r.say("  wrote %s\n", f)
	}
	return r.waitReplicas(ctx, primary, vi.Volume.ReplicaNodes)
}

func (n *node) dead() bool {
	select {
	case <-n.exited:
		return true
	default:
		return false
	}
}

// wait retries cond until it succeeds or the step's deadline passes.
func (r *run) wait(ctx context.Context, what string, cond func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, r.opt.Timeout)
	defer cancel()
	var last error
	for {
		cctx, ccancel := context.WithTimeout(ctx, 2*time.Second)
		last = cond(cctx)
		ccancel()
		if last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("gave up waiting for %s after %s: %w", what, r.opt.Timeout, last)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func (r *run) cleanup(runErr error) {
	for _, n := range r.nodes {
		if n.conn != nil {
			n.conn.Close()
		}
	}
	if r.opt.Keep && runErr == nil {
		r.say("\nThe surviving agents keep running (--keep). Try:\n")
		for _, n := range r.nodes {
			if !n.dead() {
				r.say("  tether --data-dir %s volume inspect %s\n", n.dataDir, volumeName)
			}
		}
		r.say("Stop them with: kill")
		for _, n := range r.nodes {
			if !n.dead() {
				r.say(" %d", n.cmd.Process.Pid)
			}
		}
		r.say("\n")
		return
	}
	for _, n := range r.nodes {
		if n.cmd != nil && n.cmd.Process != nil && !n.dead() {
			_ = n.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-n.exited:
			case <-time.After(10 * time.Second):
				_ = n.cmd.Process.Kill()
				<-n.exited
			}
		}
	}
	if runErr != nil {
		r.say("\nThe demo failed; the agents' logs are kept in %s\n", r.dir)
		return
	}
	if r.opt.Dir == "" {
		os.RemoveAll(r.dir)
	}
}

// writeFiles writes a small tree the way an application would: nested
// directories, a restricted file, a larger binary file, and a rename.
func writeFiles(root, tag string) ([]string, error) {
	blob := make([]byte, 256<<10)
	if _, err := rand.Read(blob); err != nil {
		return nil, err
	}
	files := []struct {
		path string
		data []byte
		mode os.FileMode
	}{
		{tag + "/hello.txt", []byte("hello from tether, " + tag + "\n"), 0o644},
		{tag + "/app/config.json", []byte(`{"replicas": 3}` + "\n"), 0o600},
		{tag + "/app/data/blob.bin", blob, 0o644},
	}
	var out []string
	for _, f := range files {
		p := filepath.Join(root, f.path)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return nil, err
		}
		tmp := p + ".tmp"
		if err := os.WriteFile(tmp, f.data, f.mode); err != nil {
			return nil, err
		}
		if err := os.Rename(tmp, p); err != nil {
			return nil, err
		}
		out = append(out, fmt.Sprintf("%s (%d bytes, mode %04o, written to a temp file and renamed)", f.path, len(f.data), f.mode))
	}
	return out, nil
}

// freeAddr finds a free loopback port (free for UDP too when udp is set, as
// memberlist uses both).
func freeAddr(udp bool) (string, error) {
	for i := 0; i < 20; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return "", fmt.Errorf("finding a free port: %w", err)
		}
		addr := l.Addr().String()
		l.Close()
		if !udp {
			return addr, nil
		}
		u, err := net.ListenPacket("udp", addr)
		if err != nil {
			continue
		}
		u.Close()
		return addr, nil
	}
	return "", errors.New("finding a free port: none found in 20 tries")
}
