package cluster

import (
	"encoding/json"
	"fmt"
	"time"
)

// CommandType numbers a catalog command on the wire. Numbers are
// append-only: never reuse or renumber one.
type CommandType uint8

// Command types.
const (
	TypeCreateVolume   CommandType = 1
	TypeDeleteVolume   CommandType = 2
	TypeSetPrimary     CommandType = 3
	TypeUpdateProgress CommandType = 4
	TypeSetReplicas    CommandType = 5
	TypeUpdateVolume   CommandType = 6
	TypeSetDeleted     CommandType = 7
	TypeUndelete       CommandType = 8
	// TypeSetContainer and TypeRemoveContainer carry IgnoreUnknownFlag.
	TypeSetContainer    CommandType = 9
	TypeRemoveContainer CommandType = 10
)

// IgnoreUnknownFlag is a bit of the type byte telling an FSM that does not
// know the command (a newer node wrote it) to skip it instead of stopping.
// Only commands whose loss cannot corrupt the catalog may carry it.
const IgnoreUnknownFlag byte = 0x80

// commandVersion is the body version this code writes and the newest it reads.
const commandVersion byte = 1

// Command is one change to the catalog. Its encoding is 1 byte type (plus
// IgnoreUnknownFlag), 1 byte version, then a JSON body.
type Command interface {
	Type() CommandType
}

// CreateVolume adds a volume. Only Name, Replicas, Primary, ReplicaNodes,
// Epoch and CreatedAt of Volume are used.
type CreateVolume struct {
	Volume Volume `json:"volume"`
}

// DeleteVolume removes a volume from the catalog for good (a purge). When
// ExpectDeletedUnixNano is set it is refused unless the volume is
// soft-deleted at exactly that time, so a purge decided before an undelete
// cannot remove the undeleted volume.
type DeleteVolume struct {
	Name                  string `json:"name"`
	ExpectDeletedUnixNano int64  `json:"expect_deleted_unix_nano,omitempty"`
}

// SetDeleted soft-deletes a volume at DeletedUnixNano: it stays in the
// catalog (and replicated) until the leader purges it after the retention
// period, and Undelete brings it back. Deleting a deleted volume keeps the
// first deletion time.
type SetDeleted struct {
	Name            string `json:"name"`
	DeletedUnixNano int64  `json:"deleted_unix_nano"`
}

// Undelete brings a soft-deleted volume back.
type Undelete struct {
	Name string `json:"name"`
}

// SetPrimary moves a volume to a new primary. It is refused unless the
// catalog's epoch equals ExpectEpoch and Epoch is ExpectEpoch+1.
type SetPrimary struct {
	Name         string   `json:"name"`
	Primary      string   `json:"primary"`
	ReplicaNodes []string `json:"replica_nodes"`
	Epoch        uint64   `json:"epoch"`
	ExpectEpoch  uint64   `json:"expect_epoch"`
}

// UpdateProgress records the last batch a node holds durably. It only moves
// a node's progress forward in (Epoch, Seq).
type UpdateProgress struct {
	Name        string `json:"name"`
	Node        string `json:"node"`
	Epoch       uint64 `json:"epoch"`
	Seq         uint64 `json:"seq"`
	CutUnixNano int64  `json:"cut_unix_nano"`
}

// SetReplicas replaces a volume's replica set (re-replication). It is
// refused unless the catalog's epoch equals ExpectEpoch, so it cannot race
// a failover.
type SetReplicas struct {
	Name         string   `json:"name"`
	ReplicaNodes []string `json:"replica_nodes"`
	ExpectEpoch  uint64   `json:"expect_epoch"`
}

// Type implements Command.
func (SetReplicas) Type() CommandType { return TypeSetReplicas }

// UpdateVolume changes a volume's options; nil fields stay as they are.
// The leader then adds, replaces or drops replicas to match.
type UpdateVolume struct {
	Name      string             `json:"name"`
	Replicas  *int               `json:"replicas,omitempty"`
	MaxLag    *time.Duration     `json:"max_lag,omitempty"`
	Placement *map[string]string `json:"placement,omitempty"`
	Freeze    *bool              `json:"freeze,omitempty"`
}

// Type implements Command.
func (UpdateVolume) Type() CommandType { return TypeUpdateVolume }

// Type implements Command.
func (CreateVolume) Type() CommandType { return TypeCreateVolume }

// Type implements Command.
func (DeleteVolume) Type() CommandType { return TypeDeleteVolume }

// Type implements Command.
func (SetPrimary) Type() CommandType { return TypeSetPrimary }

// Type implements Command.
func (UpdateProgress) Type() CommandType { return TypeUpdateProgress }

// Type implements Command.
func (SetDeleted) Type() CommandType { return TypeSetDeleted }

// Type implements Command.
func (Undelete) Type() CommandType { return TypeUndelete }

// ignorable is implemented by commands an FSM that does not know them may
// skip (they are encoded with IgnoreUnknownFlag).
type ignorable interface{ ignoreUnknown() bool }

// Encode writes cmd in its wire form.
func Encode(cmd Command) ([]byte, error) {
	if cmd == nil || newCommand(cmd.Type()) == nil {
		return nil, fmt.Errorf("%w: cannot encode %T", ErrUnknownCommand, cmd)
	}
	body, err := json.Marshal(cmd)
	if err != nil {
		return nil, fmt.Errorf("%w: encoding %T: %w", ErrInvalidCommand, cmd, err)
	}
	out := make([]byte, 0, 2+len(body))
	typ := byte(cmd.Type())
	if ig, ok := cmd.(ignorable); ok && ig.ignoreUnknown() {
		typ |= IgnoreUnknownFlag
	}
	out = append(out, typ, commandVersion)
	return append(out, body...), nil
}

// Decode reads a command written by Encode. A type or version this code
// does not know gives an error wrapping ErrUnknownCommand; a damaged body
// gives one wrapping ErrInvalidCommand. Decode returns value types
// (CreateVolume, not *CreateVolume).
func Decode(b []byte) (Command, error) {
	if len(b) < 2 {
		return nil, fmt.Errorf("%w: %d bytes is too short", ErrInvalidCommand, len(b))
	}
	typ := CommandType(b[0] &^ IgnoreUnknownFlag)
	ptr := newCommand(typ)
	if ptr == nil {
		return nil, fmt.Errorf("%w: type %d", ErrUnknownCommand, typ)
	}
	if b[1] == 0 || b[1] > commandVersion {
		return nil, fmt.Errorf("%w: type %d version %d (this node reads up to %d)", ErrUnknownCommand, typ, b[1], commandVersion)
	}
	if err := json.Unmarshal(b[2:], ptr); err != nil {
		return nil, fmt.Errorf("%w: type %d: %w", ErrInvalidCommand, typ, err)
	}
	switch c := ptr.(type) {
	case *CreateVolume:
		return *c, nil
	case *DeleteVolume:
		return *c, nil
	case *SetPrimary:
		return *c, nil
	case *UpdateProgress:
		return *c, nil
	case *SetReplicas:
		return *c, nil
	case *UpdateVolume:
		return *c, nil
	case *SetDeleted:
		return *c, nil
	case *Undelete:
		return *c, nil
	case *SetContainer:
		return *c, nil
	case *RemoveContainer:
		return *c, nil
	}
	return nil, fmt.Errorf("%w: type %d", ErrUnknownCommand, typ)
}

// newCommand returns a pointer to a zero command of typ, or nil.
func newCommand(typ CommandType) Command {
	switch typ {
	case TypeCreateVolume:
		return &CreateVolume{}
	case TypeDeleteVolume:
		return &DeleteVolume{}
	case TypeSetPrimary:
		return &SetPrimary{}
	case TypeUpdateProgress:
		return &UpdateProgress{}
	case TypeSetReplicas:
		return &SetReplicas{}
	case TypeUpdateVolume:
		return &UpdateVolume{}
	case TypeSetDeleted:
		return &SetDeleted{}
	case TypeUndelete:
		return &Undelete{}
	case TypeSetContainer:
		return &SetContainer{}
	case TypeRemoveContainer:
		return &RemoveContainer{}
	}
	return nil
}
