package main

import (
	"fmt"
	"log/slog"
	"math"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/tether-io/tether/agent"
)

func newAgentCmd(g *globals) *cobra.Command {
	cfg := agent.Config{}
	var logLevel, logFormat, replRate, resumeBytes string
	var drv *driverFlags
	var sec securityFlags
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Run the tether agent on this host",
		Long: `Run the tether agent: join the cluster, serve the volumes this host holds and
replicate them. Run one on every Docker host.

Example, on each of three hosts (keys and certificates: see tether keygen and tether tls):
  tether agent --node-name h1 --join 10.0.0.12 --join 10.0.0.13 --bootstrap-expect 3 \
    --gossip-key "$KEY" --tls-ca ca.pem --tls-cert h1.pem --tls-key h1-key.pem

Without --tls-* and a gossip key the agent refuses to start unless --insecure-dev is given.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			logger, err := newLogger(logLevel, logFormat)
			if err != nil {
				return err
			}
			if err := sec.apply(&cfg); err != nil {
				return err
			}
			if cfg.ReplicationRate, err = parseByteRate(replRate); err != nil {
				return fmt.Errorf("--replication-rate: %w", err)
			}
			if cfg.ResumeBytes, err = parseBytes(resumeBytes); err != nil {
				return fmt.Errorf("--resume-bytes: %w", err)
			}
			cfg.DataDir = g.dataDir
			cfg.Logger = logger
			drv.apply(&cfg, logger)
			if cfg.NodeName == "" {
				h, err := os.Hostname()
				if err != nil {
					return fmt.Errorf("no --node-name and no hostname: %w", err)
				}
				cfg.NodeName = h
			}
			a, err := agent.New(cfg)
			if err != nil {
				return err
			}
			if err := a.Start(cmd.Context()); err != nil {
				return err
			}
			<-cmd.Context().Done()
			logger.Info("signal received, leaving the cluster")
			a.Shutdown()
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.NodeName, "node-name", "", "this node's unique name (default: the hostname)")
	f.StringVar(&cfg.GossipAddr, "gossip-addr", agent.DefaultGossipAddr, "gossip (memberlist) bind address, TCP and UDP")
	f.StringVar(&cfg.RPCAddr, "rpc-addr", agent.DefaultRPCAddr, "RPC bind address (gRPC and Raft)")
	f.StringVar(&cfg.HTTPAddr, "http-addr", agent.DefaultHTTPAddr, "HTTP address for /healthz and /v1/status (empty: off)")
	f.StringVar(&cfg.AdvertiseIP, "advertise", "", "IP address other agents reach this one at (default: the bind address, or the default route's)")
	f.StringSliceVar(&cfg.Join, "join", nil, "gossip address HOST[:PORT] of another agent (repeatable)")
	f.IntVar(&cfg.BootstrapExpect, "bootstrap-expect", 0, "form the Raft cluster once this many agents have joined (the first agents; 0 = join an existing cluster)")
	sec.register(cmd)
	f.DurationVar(&cfg.Timing.FailoverGrace, "failover-grace", 0, "wait this long after a primary is declared dead before failing over (hysteresis on slow networks)")
	f.DurationVar(&cfg.Timing.LeaseDuration, "lease", 3*time.Second, "primary lease: an isolated primary stops serving after this long; must outlast a Raft election")
	f.DurationVar(&cfg.Timing.ReplaceGrace, "replace-after", 2*time.Minute, "replace a replica dead for this long with a spare node")
	f.DurationVar(&cfg.Timing.DeadServerGrace, "dead-server-after", 5*time.Minute, "remove a server dead for this long from Raft (when quorum allows)")
	f.StringToStringVar(&cfg.Labels, "label", nil, "a label of this node for placement constraints, KEY=VALUE (repeatable)")
	f.StringVar(&replRate, "replication-rate", "0", "limit the bytes per second this node sends to replicas, all volumes together, e.g. 50MiB or 100MB (0: no limit)")
	f.DurationVar(&cfg.ResumeWindow, "resume-window", 10*time.Minute, "keep the changes a disconnected replica misses this long, so that it resumes instead of resyncing the whole volume")
	f.StringVar(&resumeBytes, "resume-bytes", "1GiB", "keep at most this much of the changes disconnected replicas miss, per volume (past it they resync the whole volume)")
	f.DurationVar(&cfg.RescanInterval, "rescan-interval", 30*time.Second, "rescan each volume this node is primary of this often (catches writes through mmap and anything inotify missed)")
	f.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	f.StringVar(&logFormat, "log-format", "text", "text or json")
	drv = addDriverFlags(f)
	return cmd
}

func newLogger(level, format string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(strings.ToUpper(level))); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
	default:
		return nil, fmt.Errorf("--log-format %q: want text or json", format)
	}
}

// byteUnits are the suffixes parseByteRate knows, longest first.
var byteUnits = []struct {
	suffix string
	mult   int64
}{
	{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30},
	{"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"B", 1},
}

// parseByteRate parses a byte count per second such as 50MiB, 100MB, 1.5GB
// or 1048576 (an optional "/s" is allowed); 0 means no limit.
func parseByteRate(s string) (int64, error) {
	n, err := parseBytes(strings.TrimSuffix(strings.TrimSpace(s), "/s"))
	if err != nil {
		return 0, fmt.Errorf("%q is not a byte rate: give e.g. 50MiB, 100MB or 0 for no limit", s)
	}
	return n, nil
}

// parseBytes parses a size such as 512MiB, 2GB or 1048576.
func parseBytes(s string) (int64, error) {
	num := strings.TrimSpace(s)
	mult := int64(1)
	for _, u := range byteUnits {
		if rest, ok := strings.CutSuffix(num, u.suffix); ok {
			num, mult = strings.TrimSpace(rest), u.mult
			break
		}
	}
	v, err := strconv.ParseFloat(num, 64)
	if err != nil || v < 0 || math.IsInf(v, 0) || math.IsNaN(v) || v*float64(mult) > math.MaxInt64/2 {
		return 0, fmt.Errorf("%q is not a size: give e.g. 512MiB or 2GiB", s)
	}
	return int64(v * float64(mult)), nil
}
