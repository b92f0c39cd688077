package cluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/raft"
)

// RaftMagic is the first byte a Raft connection sends on the shared RPC
// port. gRPC connections start with the HTTP/2 preface ("PRI * ...").
const RaftMagic byte = 0x54

// peekTimeout bounds how long a new connection may take to send its first byte.
const peekTimeout = 5 * time.Second

// Mux splits one TCP listener between Raft and gRPC by the first byte of
// each connection. Each new connection is classified in its own goroutine,
// so a slow client never holds up Accept.
type Mux struct {
	ln     net.Listener
	logger *slog.Logger
	grpc   *subListener
	raft   *raftLayer

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex
	pending map[net.Conn]struct{} // connections still being classified
	closed  bool
}

// NewMux wraps ln; call Start to begin accepting.
func NewMux(ln net.Listener, logger *slog.Logger) *Mux {
	if logger == nil {
		logger = slog.Default()
	}
	ctx, cancel := context.WithCancel(context.Background())
	m := &Mux{
		ln:      ln,
		logger:  logger.With("component", "mux"),
		ctx:     ctx,
		cancel:  cancel,
		pending: map[net.Conn]struct{}{},
	}
	m.grpc = newSubListener(ln.Addr(), ctx.Done())
	m.raft = &raftLayer{subListener: newSubListener(ln.Addr(), ctx.Done())}
	return m
}

// Start begins accepting connections.
func (m *Mux) Start() {
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		m.acceptLoop()
	}()
}

// GRPCListener is the listener to hand to grpc.Server.Serve.
func (m *Mux) GRPCListener() net.Listener { return m.grpc }

// RaftLayer is the stream layer for Raft's NetworkTransport.
func (m *Mux) RaftLayer() raft.StreamLayer { return m.raft }

// SetRaftDialer makes outgoing Raft connections go through dial (tests
// inject network faults this way). Call it before handing RaftLayer to Raft.
func (m *Mux) SetRaftDialer(dial func(ctx context.Context, network, addr string) (net.Conn, error)) {
	m.raft.dial = dial
}

// SetRaftAdvertise sets the address the Raft layer reports as its own
// (host:port peers dial). Call it before handing RaftLayer to Raft.
func (m *Mux) SetRaftAdvertise(addr string) error {
	tcp, err := net.ResolveTCPAddr("tcp", addr)
	if err != nil {
		return fmt.Errorf("cluster: raft advertise address %q: %w", addr, err)
	}
	m.raft.advertise = tcp
	return nil
}

// Close stops accepting, closes the listener and connections still being
// classified, and waits for its goroutines.
func (m *Mux) Close() error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	for c := range m.pending {
		_ = c.Close()
	}
	m.mu.Unlock()
	m.cancel()
	err := m.ln.Close()
	m.wg.Wait()
	if err != nil && !errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("cluster: closing rpc listener: %w", err)
	}
	return nil
}

func (m *Mux) acceptLoop() {
	for {
		conn, err := m.ln.Accept()
		if err != nil {
			if m.ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			m.logger.Warn("accepting rpc connection failed", "error", err)
			select {
			case <-m.ctx.Done():
				return
			case <-time.After(50 * time.Millisecond):
			}
			continue
		}
		if !m.track(conn) {
			_ = conn.Close()
			return
		}
		m.wg.Add(1)
		go func() {
			defer m.wg.Done()
			m.route(conn)
		}()
	}
}

// track records conn as pending; false when the mux is closed.
func (m *Mux) track(conn net.Conn) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return false
	}
	m.pending[conn] = struct{}{}
	return true
}

func (m *Mux) untrack(conn net.Conn) {
	m.mu.Lock()
	delete(m.pending, conn)
	m.mu.Unlock()
}

// route reads the first byte of conn and hands it to Raft (after the TLS
// handshake when Raft is secured, see muxtls.go) or gRPC.
func (m *Mux) route(conn net.Conn) {
	first := make([]byte, 1)
	_ = conn.SetDeadline(time.Now().Add(peekTimeout))
	_, err := io.ReadFull(conn, first)
	if err != nil {
		_ = conn.SetDeadline(time.Time{})
		m.untrack(conn)
		if m.ctx.Err() == nil {
			m.logger.Debug("rpc connection sent nothing", "remote", conn.RemoteAddr().String(), "error", err)
		}
		_ = conn.Close()
		return
	}
	if first[0] == RaftMagic {
		secured, err := m.raft.secureAccepted(conn)
		_ = conn.SetDeadline(time.Time{})
		m.untrack(conn)
		if err != nil {
			if m.ctx.Err() == nil {
				m.logger.Warn("refused a raft connection", "remote", conn.RemoteAddr().String(), "error", err)
			}
			_ = conn.Close()
			return
		}
		m.raft.deliver(secured)
		return
	}
	_ = conn.SetDeadline(time.Time{})
	m.untrack(conn)
	m.grpc.deliver(&peekedConn{Conn: conn, first: first})
}

// peekedConn replays the byte the mux read before the rest of the stream.
type peekedConn struct {
	net.Conn
	first []byte
}

func (c *peekedConn) Read(p []byte) (int, error) {
	if len(c.first) > 0 && len(p) > 0 {
		n := copy(p, c.first)
		c.first = c.first[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}

// subListener is a net.Listener fed by the mux.
type subListener struct {
	addr    net.Addr
	conns   chan net.Conn
	muxDone <-chan struct{}

	once   sync.Once
	closed chan struct{}
}

func newSubListener(addr net.Addr, muxDone <-chan struct{}) *subListener {
	return &subListener{addr: addr, conns: make(chan net.Conn), muxDone: muxDone, closed: make(chan struct{})}
}

// deliver hands conn to Accept, or closes it when nobody will accept it.
func (l *subListener) deliver(conn net.Conn) {
	select {
	case l.conns <- conn:
	case <-l.closed:
		_ = conn.Close()
	case <-l.muxDone:
		_ = conn.Close()
	}
}

// Accept implements net.Listener.
func (l *subListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.closed:
		return nil, net.ErrClosed
	case <-l.muxDone:
		return nil, net.ErrClosed
	}
}

// Close implements net.Listener; it stops this side only, not the mux.
func (l *subListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return nil
}

// Addr implements net.Listener.
func (l *subListener) Addr() net.Addr { return l.addr }

// raftLayer is the raft.StreamLayer side of the mux.
type raftLayer struct {
	*subListener
	advertise net.Addr // what Addr reports, when set
	// dial replaces net.Dialer for outgoing Raft connections (fault
	// injection in tests); set before Raft starts.
	dial func(ctx context.Context, network, addr string) (net.Conn, error)
	tls  raftTLS // zero: plaintext Raft
}

// Addr is the address Raft tells its peers (NetworkTransport uses it as
// this node's address in every request), so it must be the advertised one,
// not a wildcard bind address such as [::]:7661.
func (l *raftLayer) Addr() net.Addr {
	if l.advertise != nil {
		return l.advertise
	}
	return l.subListener.Addr()
}

// Dial connects to another node's RPC port and announces Raft.
func (l *raftLayer) Dial(address raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	dial := l.dial
	if dial == nil {
		d := net.Dialer{Timeout: timeout}
		dial = d.DialContext
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	conn, err := dial(ctx, "tcp", string(address))
	cancel()
	if err != nil {
		return nil, fmt.Errorf("cluster: dialing raft at %s: %w", address, err)
	}
	if timeout > 0 {
		_ = conn.SetWriteDeadline(time.Now().Add(timeout))
	}
	if _, err := conn.Write([]byte{RaftMagic}); err != nil {
		_ = conn.Close()
		return nil, fmt.Errorf("cluster: announcing raft to %s: %w", address, err)
	}
	_ = conn.SetWriteDeadline(time.Time{})
	return l.secureDialed(conn, address, timeout)
}
