// Package faultnet is a network for in-process cluster tests that can be
// partitioned, slowed down and made lossy. Agents dial through it (RPC:
// gRPC and Raft) and send gossip through its memberlist transport wrapper;
// the sending side checks whether the link between the two nodes is up, so
// a symmetric partition needs no knowledge of who is on the receiving end.
// Established connections are cut as soon as their link goes down.
package faultnet

import (
	"context"
	"errors"
	"math/rand/v2"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
)

// ErrPartitioned is what a send over a cut link gets.
var ErrPartitioned = errors.New("faultnet: link is partitioned")

// Network decides which links are up. The zero value is not usable; use New.
type Network struct {
	mu      sync.Mutex
	nodes   map[string]string // address → node
	cut     map[[2]string]bool
	delay   time.Duration
	loss    float64
	rng     *rand.Rand
	conns   map[*conn]struct{}
	dropped int
}

// New returns a fully connected network whose random choices (loss) come
// from seed.
func New(seed uint64) *Network {
	return &Network{
		nodes: map[string]string{},
		cut:   map[[2]string]bool{},
		rng:   rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)),
		conns: map[*conn]struct{}{},
	}
}

// Register tells the network that node listens on addrs (host:port).
func (n *Network) Register(node string, addrs ...string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, a := range addrs {
		n.nodes[a] = node
	}
}

// Partition cuts every link between nodes of different groups; nodes in no
// group keep their links. It replaces earlier cuts.
func (n *Network) Partition(groups ...[]string) {
	n.mu.Lock()
	n.cut = map[[2]string]bool{}
	for i, g := range groups {
		for j, h := range groups {
			if i == j {
				continue
			}
			for _, a := range g {
				for _, b := range h {
					n.cut[[2]string{a, b}] = true
				}
			}
		}
	}
	n.mu.Unlock()
	n.cutConns()
}

// Isolate cuts node off from every other node.
func (n *Network) Isolate(node string, others []string) {
	var rest []string
	for _, o := range others {
		if o != node {
			rest = append(rest, o)
		}
	}
	n.Partition([]string{node}, rest)
}

// Heal restores every link, and clears delay and loss.
func (n *Network) Heal() {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.cut = map[[2]string]bool{}
	n.delay, n.loss = 0, 0
}

// Degrade adds delay to every send and drops gossip packets with
// probability loss (RPC streams are TCP: they see only the delay).
func (n *Network) Degrade(delay time.Duration, loss float64) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.delay, n.loss = delay, loss
}

// Dropped counts gossip packets dropped for loss or a cut link.
func (n *Network) Dropped() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.dropped
}

func (n *Network) up(from, to string) bool {
	return !n.cut[[2]string{from, to}]
}

// send decides the fate of one send from node from to address addr.
func (n *Network) send(from, addr string, packet bool) (delay time.Duration, ok bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	to, known := n.nodes[addr]
	if known && !n.up(from, to) {
		if packet {
			n.dropped++
		}
		return 0, false
	}
	if packet && n.loss > 0 && n.rng.Float64() < n.loss {
		n.dropped++
		return 0, false
	}
	return n.delay, true
}

// cutConns closes established connections whose link went down.
func (n *Network) cutConns() {
	n.mu.Lock()
	var dead []*conn
	for c := range n.conns {
		if to, known := n.nodes[c.addr]; known && !n.up(c.from, to) {
			dead = append(dead, c)
		}
	}
	n.mu.Unlock()
	for _, c := range dead {
		c.Close()
	}
}

// Dialer returns the dial function of node self.
func (n *Network) Dialer(self string) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		delay, ok := n.send(self, addr, false)
		if !ok {
			return nil, &net.OpError{Op: "dial", Net: network, Err: ErrPartitioned}
		}
		if err := sleep(ctx, delay); err != nil {
			return nil, err
		}
		var d net.Dialer
		c, err := d.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return n.track(self, addr, c), nil
	}
}

func (n *Network) track(from, addr string, c net.Conn) net.Conn {
	fc := &conn{Conn: c, net: n, from: from, addr: addr}
	n.mu.Lock()
	n.conns[fc] = struct{}{}
	n.mu.Unlock()
	return fc
}

func sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// conn is a dialed connection that dies when its link goes down.
type conn struct {
	net.Conn
	net       *Network
	from      string
	addr      string
	closeOnce sync.Once
}

func (c *conn) Write(b []byte) (int, error) {
	delay, ok := c.net.send(c.from, c.addr, false)
	if !ok {
		c.Close()
		return 0, &net.OpError{Op: "write", Net: "tcp", Err: ErrPartitioned}
	}
	if delay > 0 {
		time.Sleep(delay) // the delay a slow link adds, in the writer's own goroutine
	}
	return c.Conn.Write(b)
}

func (c *conn) Close() error {
	err := c.Conn.Close()
	c.closeOnce.Do(func() {
		c.net.mu.Lock()
		delete(c.net.conns, c)
		c.net.mu.Unlock()
	})
	return err
}

// Transport wraps memberlist's transport of node self.
func (n *Network) Transport(self string) func(memberlist.Transport) memberlist.Transport {
	return func(inner memberlist.Transport) memberlist.Transport {
		return &transport{Transport: inner, net: n, self: self}
	}
}

type transport struct {
	memberlist.Transport
	net  *Network
	self string
}

func (t *transport) WriteTo(b []byte, addr string) (time.Time, error) {
	delay, ok := t.net.send(t.self, addr, true)
	if !ok {
		return time.Now(), nil // lost on the way, as UDP would be
	}
	if delay > 0 {
		time.Sleep(delay)
	}
	return t.Transport.WriteTo(b, addr)
}

func (t *transport) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	delay, ok := t.net.send(t.self, addr, false)
	if !ok {
		return nil, &net.OpError{Op: "dial", Net: "tcp", Err: ErrPartitioned}
	}
	if delay > 0 {
		time.Sleep(delay)
	}
	c, err := t.Transport.DialTimeout(addr, timeout)
	if err != nil {
		return nil, err
	}
	return t.net.track(t.self, addr, c), nil
}
