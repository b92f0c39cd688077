package cluster

import (
	"errors"
	"fmt"
	"strings"
)

// Errors returned by the catalog and the cluster. Business refusals by the
// FSM wrap one of them, so errors.Is works on the leader; on a follower the
// agent can rebuild them from their text with ParseError.
var (
	ErrNotLeader       = errors.New("cluster: this node is not the raft leader")
	ErrNoLeader        = errors.New("cluster: no raft leader is known")
	ErrVolumeExists    = errors.New("cluster: volume already exists")
	ErrNoVolume        = errors.New("cluster: no such volume")
	ErrEpochMismatch   = errors.New("cluster: epoch does not match the catalog")
	ErrNotParticipant  = errors.New("cluster: node is neither primary nor replica of the volume")
	ErrInvalidName     = errors.New("cluster: invalid volume name")
	ErrInvalidReplicas = errors.New("cluster: invalid replica count")
	ErrInvalidCommand  = errors.New("cluster: invalid catalog command")
	ErrUnknownCommand  = errors.New("cluster: unknown catalog command")
	ErrNotEnoughNodes  = errors.New("cluster: not enough alive members")
	ErrShutdown        = errors.New("cluster: shut down")
	ErrPrimaryAlive    = errors.New("cluster: the primary is alive")
	ErrTooFarBehind    = errors.New("cluster: the copy is further behind than the volume's max lag")
	ErrLeaseHeld       = errors.New("cluster: the old primary may still hold its lease")
	ErrInvalidLabels   = errors.New("cluster: invalid labels")
	// ErrIndeterminate: leadership changed while the change was being
	// committed, so it may or may not have been; Apply resolves it by
	// retrying commands that are safe to repeat.
	ErrIndeterminate = errors.New("cluster: leadership changed during the commit; the change may or may not have been applied")
	ErrVolumeDeleted = errors.New("cluster: volume is deleted")
	ErrNotDeleted    = errors.New("cluster: volume is not deleted")
)

// businessErrors are the refusals that travel as text in a forwarded Apply.
var businessErrors = []error{
	ErrNotLeader, ErrNoLeader, ErrVolumeExists, ErrNoVolume, ErrEpochMismatch,
	ErrNotParticipant, ErrInvalidName, ErrInvalidReplicas, ErrInvalidCommand,
	ErrUnknownCommand, ErrNotEnoughNodes, ErrShutdown, ErrPrimaryAlive,
	ErrTooFarBehind, ErrLeaseHeld, ErrInvalidLabels, ErrIndeterminate,
	ErrVolumeDeleted, ErrNotDeleted,
}

// ParseError turns the text of an error produced by this package (for
// example one carried in a forwarded ApplyResponse) back into an error that
// wraps the matching sentinel. Empty text gives nil; unknown text gives a
// plain error with that text.
func ParseError(msg string) error {
	if msg == "" {
		return nil
	}
	for _, e := range businessErrors {
		if rest, ok := strings.CutPrefix(msg, e.Error()); ok {
			return fmt.Errorf("%w%s", e, rest)
		}
	}
	return errors.New(msg)
}
