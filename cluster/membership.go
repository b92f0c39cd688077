package cluster

import (
	"context"
	"encoding/json"
	"fmt"
	"log"
	"maps"
	"net"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
)

// Member is one node as this node sees it.
type Member struct {
	Name       string
	GossipAddr string
	RPCAddr    string
	Health     string // alive, suspect, dead or left
	RaftRole   string // leader, voter, nonvoter or none
	Version    string
	Labels     map[string]string
}

// nodeMeta is what each node gossips about itself (≤ 512 bytes).
type nodeMeta struct {
	RPC     string `json:"rpc"`
	Version string `json:"version,omitempty"`
	// Leaving is set just before a graceful leave, so that members record
	// the departure as left rather than dead.
	Leaving bool `json:"leaving,omitempty"`
	// Raft is set once the node is part of a formed Raft cluster; a node
	// that sees such a member never bootstraps a cluster of its own.
	Raft bool `json:"raft,omitempty"`
	// Labels describe the node for placement constraints (zone=a, ssd=1).
	Labels map[string]string `json:"labels,omitempty"`
}

// memberInfo is the last known state of one node; dead nodes stay here
// (memberlist forgets them).
type memberInfo struct {
	name, gossipAddr string
	meta             nodeMeta
	health           string
	since            time.Time // when health last changed
}

// membership records memberlist events. Its callbacks run under
// memberlist's locks, so they only update the map and signal.
type membership struct {
	self     string
	onChange func()

	mu      sync.Mutex
	local   nodeMeta
	members map[string]*memberInfo
}

var (
	_ memberlist.Delegate      = (*membership)(nil)
	_ memberlist.EventDelegate = (*membership)(nil)
)

func newMembership(self string, onChange func()) *membership {
	return &membership{self: self, onChange: onChange, members: map[string]*memberInfo{}}
}

func (m *membership) setLocal(meta nodeMeta) {
	m.mu.Lock()
	m.local = meta
	m.mu.Unlock()
}

func (m *membership) setLeaving() {
	m.mu.Lock()
	m.local.Leaving = true
	m.mu.Unlock()
}

func (m *membership) setRaftFormed() {
	m.mu.Lock()
	m.local.Raft = true
	m.mu.Unlock()
}

// othersInRaft reports whether any alive member but us says it is part
// of a formed Raft cluster.
func (m *membership) othersInRaft() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	for name, info := range m.members {
		if name != m.self && info.health == HealthAlive && info.meta.Raft {
			return true
		}
	}
	return false
}

// NodeMeta implements memberlist.Delegate.
func (m *membership) NodeMeta(limit int) []byte {
	m.mu.Lock()
	b, err := json.Marshal(m.local)
	m.mu.Unlock()
	if err != nil || len(b) > limit {
		return nil
	}
	return b
}

// NotifyMsg implements memberlist.Delegate; tether sends no user messages.
func (m *membership) NotifyMsg([]byte) {}

// GetBroadcasts implements memberlist.Delegate.
func (m *membership) GetBroadcasts(int, int) [][]byte { return nil }

// LocalState implements memberlist.Delegate.
func (m *membership) LocalState(bool) []byte { return nil }

// MergeRemoteState implements memberlist.Delegate.
func (m *membership) MergeRemoteState([]byte, bool) {}

// NotifyJoin implements memberlist.EventDelegate.
func (m *membership) NotifyJoin(n *memberlist.Node) { m.record(n, HealthAlive) }

// NotifyUpdate implements memberlist.EventDelegate.
func (m *membership) NotifyUpdate(n *memberlist.Node) { m.record(n, HealthAlive) }

// NotifyLeave implements memberlist.EventDelegate. It fires for dead and
// left nodes alike, and memberlist v0.5 does not fill Node.State, so a
// node counts as left only when it announced leaving in its meta.
func (m *membership) NotifyLeave(n *memberlist.Node) {
	m.record(n, HealthDead)
}

func (m *membership) record(n *memberlist.Node, health string) {
	var meta nodeMeta
	_ = json.Unmarshal(n.Meta, &meta) // a node without meta stays without rpc address
	if health == HealthDead && meta.Leaving {
		health = HealthLeft
	}
	m.mu.Lock()
	info, ok := m.members[n.Name]
	if !ok {
		info = &memberInfo{name: n.Name}
		m.members[n.Name] = info
	}
	info.gossipAddr = net.JoinHostPort(n.Addr.String(), strconv.Itoa(int(n.Port)))
	info.meta = meta
	if info.health != health {
		info.health = health
		info.since = time.Now()
	}
	m.mu.Unlock()
	m.onChange()
}

// list returns every known member (dead and left included), sorted by
// name, with RaftRole left empty.
func (m *membership) list() []Member {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]Member, 0, len(m.members))
	for _, info := range m.members {
		out = append(out, Member{
			Name:       info.name,
			GossipAddr: info.gossipAddr,
			RPCAddr:    info.meta.RPC,
			Health:     info.health,
			Version:    info.meta.Version,
			Labels:     maps.Clone(info.meta.Labels),
		})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// health returns each known node's health and, for down nodes, since when.
func (m *membership) health() (health map[string]string, downSince map[string]time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	health = make(map[string]string, len(m.members))
	downSince = map[string]time.Time{}
	for name, info := range m.members {
		health[name] = info.health
		if down(info.health) {
			downSince[name] = info.since
		}
	}
	return health, downSince
}

// labels returns each known node's labels.
func (m *membership) labels() map[string]map[string]string {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make(map[string]map[string]string, len(m.members))
	for name, info := range m.members {
		out[name] = info.meta.Labels
	}
	return out
}

// alive returns the sorted names of alive members and their rpc addresses
// (members without an rpc address are skipped).
func (m *membership) alive() (names []string, rpc map[string]string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	rpc = map[string]string{}
	for name, info := range m.members {
		if info.health == HealthAlive && info.meta.RPC != "" {
			names = append(names, name)
			rpc[name] = info.meta.RPC
		}
	}
	sort.Strings(names)
	return names, rpc
}

// setupMemberlist creates the memberlist with our timings; it does not join.
func (c *Cluster) setupMemberlist(raftFormed bool) error {
	bindHost, bindPort, err := splitHostPort(c.cfg.GossipBind)
	if err != nil {
		return fmt.Errorf("cluster: gossip bind address %q: %w", c.cfg.GossipBind, err)
	}
	conf := memberlist.DefaultLANConfig()
	conf.Name = c.cfg.NodeName
	conf.BindAddr = bindHost
	conf.BindPort = bindPort
	conf.ProbeInterval = c.timing.ProbeInterval
	conf.ProbeTimeout = c.timing.ProbeTimeout
	conf.SuspicionMult = c.timing.SuspicionMult
	conf.GossipInterval = c.timing.GossipInterval
	conf.Events = c.members
	conf.Delegate = c.members
	conf.Logger = log.New(&levelWriter{l: c.logger.With("component", "memberlist")}, "", 0)
	if err := applyGossipKeys(conf, c.cfg.GossipKeys); err != nil {
		return err
	}
	advertise := c.cfg.GossipAdvertise
	if advertise == "" && isUnspecified(bindHost) {
		ip, err := pickAdvertiseIP()
		if err != nil {
			return err
		}
		advertise = net.JoinHostPort(ip, strconv.Itoa(bindPort))
	}
	if advertise != "" {
		host, port, err := splitHostPort(advertise)
		if err != nil {
			return fmt.Errorf("cluster: gossip advertise address %q: %w", advertise, err)
		}
		conf.AdvertiseAddr, conf.AdvertisePort = host, port
	}
	c.members.setLocal(nodeMeta{RPC: c.cfg.RPCAdvertise, Version: c.cfg.Version, Raft: raftFormed, Labels: c.cfg.Labels})
	if c.cfg.WrapGossipTransport != nil {
		nt, err := memberlist.NewNetTransport(&memberlist.NetTransportConfig{BindAddrs: []string{bindHost}, BindPort: bindPort, Logger: conf.Logger})
		if err != nil {
			return fmt.Errorf("cluster: starting gossip on %s: %w", c.cfg.GossipBind, err)
		}
		if bindPort == 0 {
			conf.BindPort = nt.GetAutoBindPort()
		}
		conf.Transport = c.cfg.WrapGossipTransport(nt)
	}
	ml, err := memberlist.Create(conf)
	if err != nil {
		return fmt.Errorf("cluster: starting gossip on %s: %w", c.cfg.GossipBind, err)
	}
	local := ml.LocalNode()
	c.ml = ml
	c.gossipAddr = net.JoinHostPort(local.Addr.String(), strconv.Itoa(int(local.Port)))
	return nil
}

// joinLoop joins the given members, retrying until one answers, ctx ends
// or the cluster shuts down.
func (c *Cluster) joinLoop(ctx context.Context) {
	addrs := make([]string, 0, len(c.cfg.Join))
	for _, a := range c.cfg.Join {
		if _, _, err := net.SplitHostPort(a); err != nil {
			a = net.JoinHostPort(a, strconv.Itoa(DefaultGossipPort))
		}
		addrs = append(addrs, a)
	}
	wait := 500 * time.Millisecond
	for {
		n, err := c.ml.Join(addrs)
		if n > 0 {
			c.joinErr.Store("")
			c.logger.Info("joined gossip cluster", "contacted", n)
			return
		}
		err = explainJoinError(err, c.GossipEncrypted())
		c.joinErr.Store(err.Error())
		c.logger.Warn("joining gossip cluster failed; retrying", "join", addrs, "error", err, "retry_in", wait)
		select {
		case <-ctx.Done():
			return
		case <-c.ctx.Done():
			return
		case <-time.After(wait):
		}
		wait = min(2*wait, 5*time.Second)
	}
}

func splitHostPort(s string) (string, int, error) {
	host, portStr, err := net.SplitHostPort(s)
	if err != nil {
		return "", 0, err
	}
	port, err := strconv.Atoi(portStr)
	if err != nil || port < 0 || port > 65535 {
		return "", 0, fmt.Errorf("bad port %q", portStr)
	}
	return host, port, nil
}

func isUnspecified(host string) bool {
	ip := net.ParseIP(host)
	return host == "" || (ip != nil && ip.IsUnspecified())
}

// pickAdvertiseIP returns the first non-loopback IPv4 address of this
// host (or IPv6 when there is none).
func pickAdvertiseIP() (string, error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return "", fmt.Errorf("cluster: listing interface addresses to advertise: %w", err)
	}
	var v6 string
	for _, a := range addrs {
		ipnet, ok := a.(*net.IPNet)
		if !ok || ipnet.IP.IsLoopback() || ipnet.IP.IsLinkLocalUnicast() {
			continue
		}
		if ipnet.IP.To4() != nil {
			return ipnet.IP.String(), nil
		}
		if v6 == "" {
			v6 = ipnet.IP.String()
		}
	}
	if v6 != "" {
		return v6, nil
	}
	return "", fmt.Errorf("cluster: no non-loopback address to advertise gossip on; set the gossip advertise address")
}
