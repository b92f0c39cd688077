package replication

import (
	"context"
	"fmt"

	"google.golang.org/protobuf/proto"

	"github.com/tether-io/tether/proto/tetherpb"
)

// Limiter bounds the bytes per second a node's replication streams send;
// *rate.Limiter (golang.org/x/time/rate) is one. One Limiter shared by every
// Primary of a node limits the node as a whole.
type Limiter interface {
	WaitN(ctx context.Context, n int) error
	Burst() int
}

// throttled returns send, waiting first for lim to allow each message's
// encoded size (in pieces of at most its burst); a nil lim is no limit.
func throttled(ctx context.Context, lim Limiter, send sendFunc) sendFunc {
	if lim == nil {
		return send
	}
	return func(m *tetherpb.StreamRequest) error {
		for n := proto.Size(m); n > 0; {
			k := min(n, max(lim.Burst(), 1))
			if err := lim.WaitN(ctx, k); err != nil {
				return fmt.Errorf("wait for the replication bandwidth limit: %w", err)
			}
			n -= k
		}
		return send(m)
	}
}
