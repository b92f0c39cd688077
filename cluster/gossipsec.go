package cluster

import (
	"errors"
	"fmt"
	"net"
	"strings"

	"github.com/hashicorp/memberlist"
)

// applyGossipKeys turns on memberlist encryption when keys are configured:
// the first key encrypts, all of them decrypt, and unencrypted gossip is
// refused both ways.
func applyGossipKeys(conf *memberlist.Config, keys [][]byte) error {
	if len(keys) == 0 {
		return nil
	}
	kr, err := memberlist.NewKeyring(keys, keys[0])
	if err != nil {
		return fmt.Errorf("cluster: gossip keyring: %w", err)
	}
	conf.Keyring = kr
	conf.GossipVerifyIncoming = true
	conf.GossipVerifyOutgoing = true
	return nil
}

// GossipEncrypted reports whether this node's gossip is encrypted.
func (c *Cluster) GossipEncrypted() bool { return len(c.cfg.GossipKeys) > 0 }

// JoinError is why joining the gossip cluster last failed, "" once a join
// succeeded (or none was attempted).
func (c *Cluster) JoinError() string {
	if v, ok := c.joinErr.Load().(string); ok {
		return v
	}
	return ""
}

// explainJoinError words a failed memberlist join for an operator.
// memberlist only says that the stream broke when the other side could not
// decrypt (or refused plaintext), so when a connection was made but the
// exchange failed, the likely cause is named: a gossip key mismatch.
func explainJoinError(err error, encrypted bool) error {
	if err == nil {
		return errors.New("no agent could be contacted")
	}
	msg := err.Error()
	var netErr net.Error
	unreachable := strings.Contains(msg, "connection refused") || strings.Contains(msg, "no route to host") ||
		strings.Contains(msg, "network is unreachable") || strings.Contains(msg, "no such host") ||
		(errors.As(err, &netErr) && netErr.Timeout()) || strings.Contains(msg, "i/o timeout")
	if unreachable {
		return &joinError{"no agent answered (is it running, and its gossip port open?): " + oneLine(msg), err}
	}
	mode := "this agent gossips unencrypted (no --gossip-key)"
	if encrypted {
		mode = "this agent encrypts gossip with its --gossip-key/--gossip-keyring"
	}
	return &joinError{fmt.Sprintf("gossip key mismatch? the other agent accepted the connection but the exchange failed; %s, and every agent needs the same key: %s", mode, oneLine(msg)), err}
}

// joinError is an explained join failure; it unwraps to memberlist's error.
type joinError struct {
	msg string
	err error
}

func (e *joinError) Error() string { return e.msg }
func (e *joinError) Unwrap() error { return e.err }

// oneLine flattens memberlist's multi-line multierror text
// ("1 error occurred:\n\t* failed to join ...").
func oneLine(s string) string {
	s = strings.TrimPrefix(s, "1 error occurred:")
	return strings.Join(strings.Fields(strings.ReplaceAll(s, "\t* ", "")), " ")
}
