package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/tether-io/tether/cluster"
	"github.com/tether-io/tether/internal/tlsutil"
)

// Version is the agent's version, set at build time with -ldflags.
var Version = "dev"

// Default addresses (see DESIGN.md: ports).
const (
	DefaultGossipAddr = ":7660"
	DefaultRPCAddr    = ":7661"
	DefaultHTTPAddr   = "127.0.0.1:7662"
	DefaultDataDir    = "/var/lib/tether"
	// SocketName is the control socket's file name inside the data dir.
	SocketName = "tether.sock"
)

// Config is what an agent needs to run.
type Config struct {
	NodeName string
	DataDir  string
	// GossipAddr and RPCAddr are bind addresses (host:port; port 0 picks
	// one). HTTPAddr may be empty to serve no HTTP.
	GossipAddr string
	RPCAddr    string
	HTTPAddr   string
	// AdvertiseIP is the address other agents reach this one at; empty means
	// the bind host, or when that is unspecified, this host's first
	// non-loopback IPv4 address.
	AdvertiseIP     string
	Join            []string
	BootstrapExpect int
	Logger          *slog.Logger
	Timing          cluster.Timing
	// DriverSocket is the unix socket of the Docker volume driver; empty
	// serves none (see ResolveDriverSocket for the CLI's default).
	DriverSocket string
	// DockerHost is the Docker Engine's API address the agent fences,
	// freezes and checks mounts through; empty: $DOCKER_HOST, else the
	// default socket.
	DockerHost string
	// DriverName is the name Docker knows the driver by when it is not the
	// socket's file name (a managed plugin: NAME:TAG); empty: the socket's.
	DriverName string
	// VolumeRetention is how long a deleted volume is kept before it is
	// purged; 0 means cluster.DefaultRetention.
	VolumeRetention time.Duration
	// Labels describe this node for volumes' placement constraints.
	Labels map[string]string
	// Dial and WrapGossipTransport replace the network for outgoing RPC
	// (gRPC and Raft) connections and for gossip; tests use them to inject
	// partitions, delay and loss. nil: the real network.
	Dial                func(ctx context.Context, network, addr string) (net.Conn, error)
	WrapGossipTransport func(memberlist.Transport) memberlist.Transport
	// GossipKeys encrypt gossip, the first one being the primary; TLS
	// secures the RPC port (gRPC and Raft) with mutual TLS. Empty: off,
	// with a warning (see security.go).
	GossipKeys [][]byte
	TLS        tlsutil.Files
	// ReplicationRate bounds the bytes per second this node sends to
	// replicas, all volumes together; 0 means no limit.
	ReplicationRate int64
	// ResumeWindow and ResumeBytes bound the cuts a primary keeps for a
	// disconnected replica so that it resumes where it stopped (past them
	// it gets the whole tree when it returns); 0: 10 minutes, 1 GiB.
	ResumeWindow time.Duration
	ResumeBytes  int64
	// RescanInterval is the period of the full rescan of each volume this
	// node is primary of (it catches writes through mmap and whatever
	// inotify missed); 0: 30 s.
	RescanInterval time.Duration
}

var nodeNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$`)

// Validate checks the configuration and fills defaults.
func (c *Config) Validate() error {
	if c.NodeName == "" {
		return errors.New("a node name is required (--node-name)")
	}
	if !nodeNameRE.MatchString(c.NodeName) {
		return fmt.Errorf("node name %q is invalid: use letters, digits, '.', '_' or '-', at most 63 characters, starting with a letter or digit", c.NodeName)
	}
	if c.DataDir == "" {
		c.DataDir = DefaultDataDir
	}
	abs, err := filepath.Abs(c.DataDir)
	if err != nil {
		return fmt.Errorf("data dir %q: %w", c.DataDir, err)
	}
	c.DataDir = abs
	if c.GossipAddr == "" {
		c.GossipAddr = DefaultGossipAddr
	}
	if c.RPCAddr == "" {
		c.RPCAddr = DefaultRPCAddr
	}
	for flag, addr := range map[string]string{"--gossip-addr": c.GossipAddr, "--rpc-addr": c.RPCAddr} {
		if err := checkHostPort(addr); err != nil {
			return fmt.Errorf("%s %q: %w", flag, addr, err)
		}
	}
	if c.HTTPAddr != "" {
		if err := checkHostPort(c.HTTPAddr); err != nil {
			return fmt.Errorf("--http-addr %q: %w", c.HTTPAddr, err)
		}
	}
	if c.AdvertiseIP != "" && net.ParseIP(c.AdvertiseIP) == nil {
		return fmt.Errorf("--advertise %q is not an IP address", c.AdvertiseIP)
	}
	if c.ReplicationRate < 0 {
		return fmt.Errorf("--replication-rate %d: must be 0 (no limit) or more", c.ReplicationRate)
	}
	if c.ResumeWindow < 0 {
		return fmt.Errorf("--resume-window %s: must be 0 (the default, 10m) or more", c.ResumeWindow)
	}
	if c.ResumeBytes < 0 {
		return fmt.Errorf("--resume-bytes %d: must be 0 (the default, 1GiB) or more", c.ResumeBytes)
	}
	if c.RescanInterval != 0 && c.RescanInterval < time.Second {
		return fmt.Errorf("--rescan-interval %s: must be at least 1s (each rescan walks the whole volume), or 0 for the default 30s", c.RescanInterval)
	}
	if c.BootstrapExpect < 0 {
		return fmt.Errorf("--bootstrap-expect %d: must be 0 or more", c.BootstrapExpect)
	}
	for _, j := range c.Join {
		if j == "" {
			return errors.New("--join: empty address")
		}
	}
	if err := c.validateDriver(); err != nil {
		return err
	}
	if err := c.validateSecurity(); err != nil {
		return err
	}
	t := c.Timing
	for flag, d := range map[string]time.Duration{"--failover-grace": t.FailoverGrace, "--lease": t.LeaseDuration, "--replace-after": t.ReplaceGrace, "--dead-server-after": t.DeadServerGrace} {
		if d < 0 {
			return fmt.Errorf("%s %s: must not be negative", flag, d)
		}
	}
	if t.LeaseDuration > 0 && t.LeaseDuration < time.Second {
		return fmt.Errorf("--lease %s: at least 1s, or primaries fence themselves at every Raft election", t.LeaseDuration)
	}
	if err := cluster.ValidateLabels(c.Labels); err != nil {
		return fmt.Errorf("--label: %w", err)
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return nil
}

func checkHostPort(addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("want host:port: %w", err)
	}
	if host != "" && net.ParseIP(host) == nil && host != "localhost" {
		return fmt.Errorf("host %q is not an IP address", host)
	}
	p, err := strconv.Atoi(port)
	if err != nil || p < 0 || p > 65535 {
		return fmt.Errorf("port %q is not a number between 0 and 65535", port)
	}
	return nil
}

// SocketPath is the control socket of an agent whose data dir is dataDir.
func SocketPath(dataDir string) string {
	return filepath.Join(dataDir, SocketName)
}

// advertiseHost picks the IP to tell peers for a bind host.
func advertiseHost(bindHost, override string) (string, error) {
	if override != "" {
		return override, nil
	}
	if bindHost == "localhost" {
		return "127.0.0.1", nil
	}
	if ip := net.ParseIP(bindHost); ip != nil && !ip.IsUnspecified() {
		return bindHost, nil
	}
	if ip := defaultRouteIP(); ip != "" {
		return ip, nil
	}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return "", fmt.Errorf("listing interface addresses to pick one to advertise: %w", err)
	}
	for _, a := range addrs {
		ipn, ok := a.(*net.IPNet)
		if !ok || ipn.IP.IsLoopback() || ipn.IP.To4() == nil || ipn.IP.IsLinkLocalUnicast() {
			continue
		}
		return ipn.IP.String(), nil
	}
	return "", errors.New("no non-loopback IPv4 address to advertise: pass --advertise")
}

// defaultRouteIP is the IPv4 address of the interface that holds the default
// route (from /proc/net/route), so that a host with docker0 or other bridges
// advertises the address its peers can reach; "" when it cannot tell.
func defaultRouteIP() string {
	b, err := os.ReadFile("/proc/net/route")
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) < 2 || f[1] != "00000000" {
			continue
		}
		ifc, err := net.InterfaceByName(f[0])
		if err != nil {
			return ""
		}
		addrs, err := ifc.Addrs()
		if err != nil {
			return ""
		}
		for _, a := range addrs {
			if ipn, ok := a.(*net.IPNet); ok && ipn.IP.To4() != nil && !ipn.IP.IsLoopback() {
				return ipn.IP.String()
			}
		}
	}
	return ""
}
