package cluster

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/hashicorp/raft"
)

// fsm is the catalog: a raft.FSM over a map of volumes. Apply is
// deterministic (every time value comes from the command) and returns
// business refusals as its response instead of failing.
type fsm struct {
	logger   *slog.Logger
	onChange func()

	mu        sync.RWMutex
	volumes   map[string]*Volume
	lastIndex uint64 // index of the last command applied, to skip replays
}

var _ raft.FSM = (*fsm)(nil)

func newFSM(logger *slog.Logger, onChange func()) *fsm {
	if onChange == nil {
		onChange = func() {}
	}
	return &fsm{logger: logger, onChange: onChange, volumes: map[string]*Volume{}}
}

// appliedIndex is the Raft index of the last entry applied.
func (f *fsm) appliedIndex() uint64 {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.lastIndex
}

// Apply implements raft.FSM. The response is nil or an error refusing the
// command. An entry it cannot decode stops the node (panic) unless it
// carries IgnoreUnknownFlag: skipping it would let this node's catalog
// diverge from the others'.
func (f *fsm) Apply(l *raft.Log) any {
	if l.Type != raft.LogCommand {
		return nil
	}
	cmd, err := Decode(l.Data)
	if err != nil {
		if errors.Is(err, ErrUnknownCommand) && len(l.Data) > 0 && l.Data[0]&IgnoreUnknownFlag != 0 {
			f.logger.Warn("skipping catalog command this node does not know", "index", l.Index, "error", err)
			f.mu.Lock()
			f.lastIndex = max(f.lastIndex, l.Index) // applied, as a no-op: waits on it end
			f.mu.Unlock()
			return nil
		}
		panic(fmt.Sprintf("cluster: raft log entry %d cannot be applied: %v", l.Index, err))
	}
	f.mu.Lock()
	if l.Index != 0 && l.Index <= f.lastIndex {
		f.mu.Unlock()
		return nil
	}
	f.lastIndex = l.Index
	err = f.apply(cmd)
	f.mu.Unlock()
	if err == nil {
		f.onChange()
		return nil
	}
	return err
}

// apply runs one command; f.mu is held.
func (f *fsm) apply(cmd Command) error {
	switch c := cmd.(type) {
	case CreateVolume:
		return f.createVolume(c.Volume)
	case DeleteVolume:
		v, ok := f.volumes[c.Name]
		if !ok {
			return fmt.Errorf("%w: %q", ErrNoVolume, c.Name)
		}
		if c.ExpectDeletedUnixNano != 0 && v.DeletedUnixNano != c.ExpectDeletedUnixNano {
			return fmt.Errorf("%w: %q is no longer the deletion this purge was for", ErrNotDeleted, c.Name)
		}
		delete(f.volumes, c.Name)
		return nil
	case SetDeleted:
		v, ok := f.volumes[c.Name]
		if !ok {
			return fmt.Errorf("%w: %q", ErrNoVolume, c.Name)
		}
		if c.DeletedUnixNano <= 0 {
			return fmt.Errorf("%w: deletion time of %q is %d", ErrInvalidCommand, c.Name, c.DeletedUnixNano)
		}
		if v.DeletedUnixNano == 0 {
			v.DeletedUnixNano = c.DeletedUnixNano
		}
		return nil
	case Undelete:
		v, ok := f.volumes[c.Name]
		if !ok {
			return fmt.Errorf("%w: %q", ErrNoVolume, c.Name)
		}
		if v.DeletedUnixNano == 0 {
			return fmt.Errorf("%w: %q", ErrNotDeleted, c.Name)
		}
		v.DeletedUnixNano = 0
		return nil
	case SetPrimary:
		return f.setPrimary(c)
	case UpdateProgress:
		return f.updateProgress(c)
	case SetReplicas:
		return f.setReplicas(c)
	case UpdateVolume:
		return f.updateVolume(c)
	case SetContainer:
		return f.setContainer(c)
	case RemoveContainer:
		return f.removeContainer(c)
	}
	return fmt.Errorf("%w: %T", ErrUnknownCommand, cmd)
}

func (f *fsm) createVolume(v Volume) error {
	if err := ValidateName(v.Name); err != nil {
		return err
	}
	if err := ValidateReplicas(v.Replicas); err != nil {
		return err
	}
	if err := validateNodes(v.Primary, v.ReplicaNodes); err != nil {
		return err
	}
	if len(v.ReplicaNodes) != v.Replicas-1 {
		return fmt.Errorf("%w: volume %q wants %d replicas but names %d nodes besides the primary", ErrInvalidCommand, v.Name, v.Replicas, len(v.ReplicaNodes))
	}
	if v.Epoch == 0 {
		return fmt.Errorf("%w: volume %q has epoch 0", ErrInvalidCommand, v.Name)
	}
	if err := ValidateLabels(v.Placement); err != nil {
		return err
	}
	if v.MaxLag < 0 {
		return fmt.Errorf("%w: volume %q has a negative max lag", ErrInvalidCommand, v.Name)
	}
	if _, ok := f.volumes[v.Name]; ok {
		return fmt.Errorf("%w: %q", ErrVolumeExists, v.Name)
	}
	v = v.clone()
	v.State = ""
	v.Progress = map[string]Progress{}
	f.volumes[v.Name] = &v
	return nil
}

func (f *fsm) setPrimary(c SetPrimary) error {
	v, ok := f.volumes[c.Name]
	if !ok {
		return fmt.Errorf("%w: %q", ErrNoVolume, c.Name)
	}
	if v.Epoch != c.ExpectEpoch || c.Epoch != c.ExpectEpoch+1 {
		return fmt.Errorf("%w: volume %q is at epoch %d; the change expected %d and asked for %d", ErrEpochMismatch, c.Name, v.Epoch, c.ExpectEpoch, c.Epoch)
	}
	if err := validateNodes(c.Primary, c.ReplicaNodes); err != nil {
		return err
	}
	v.Primary = c.Primary
	v.ReplicaNodes = slices.Clone(c.ReplicaNodes)
	v.Epoch = c.Epoch
	return nil
}

func (f *fsm) updateVolume(c UpdateVolume) error {
	v, ok := f.volumes[c.Name]
	if !ok {
		return fmt.Errorf("%w: %q", ErrNoVolume, c.Name)
	}
	if c.Replicas != nil {
		if err := ValidateReplicas(*c.Replicas); err != nil {
			return err
		}
	}
	if c.MaxLag != nil && *c.MaxLag < 0 {
		return fmt.Errorf("%w: volume %q: negative max lag", ErrInvalidCommand, c.Name)
	}
	if c.Placement != nil {
		if err := ValidateLabels(*c.Placement); err != nil {
			return err
		}
	}
	if c.Replicas != nil {
		v.Replicas = *c.Replicas
	}
	if c.MaxLag != nil {
		v.MaxLag = *c.MaxLag
	}
	if c.Freeze != nil {
		v.Freeze = *c.Freeze
	}
	if c.Placement != nil {
		v.Placement = maps.Clone(*c.Placement)
		if len(v.Placement) == 0 {
			v.Placement = nil
		}
	}
	return nil
}

func (f *fsm) setReplicas(c SetReplicas) error {
	v, ok := f.volumes[c.Name]
	if !ok {
		return fmt.Errorf("%w: %q", ErrNoVolume, c.Name)
	}
	if v.Epoch != c.ExpectEpoch {
		return fmt.Errorf("%w: volume %q is at epoch %d; the replica change expected %d", ErrEpochMismatch, c.Name, v.Epoch, c.ExpectEpoch)
	}
	if err := validateNodes(v.Primary, c.ReplicaNodes); err != nil {
		return err
	}
	if len(c.ReplicaNodes) > MaxReplicas-1 {
		return fmt.Errorf("%w: %d replicas for %q, at most %d", ErrInvalidCommand, len(c.ReplicaNodes), c.Name, MaxReplicas-1)
	}
	v.ReplicaNodes = slices.Clone(c.ReplicaNodes)
	for node := range v.Progress {
		if node != v.Primary && !slices.Contains(v.ReplicaNodes, node) {
			delete(v.Progress, node) // a node that left the set forgets its progress
		}
	}
	return nil
}

func (f *fsm) updateProgress(c UpdateProgress) error {
	v, ok := f.volumes[c.Name]
	if !ok {
		return fmt.Errorf("%w: %q", ErrNoVolume, c.Name)
	}
	if !v.participant(c.Node) {
		return fmt.Errorf("%w: %q of %q", ErrNotParticipant, c.Node, c.Name)
	}
	if c.Epoch > v.Epoch {
		return fmt.Errorf("%w: progress of %q on %q is in epoch %d, after the volume's %d", ErrEpochMismatch, c.Name, c.Node, c.Epoch, v.Epoch)
	}
	p := Progress{Epoch: c.Epoch, Seq: c.Seq}
	if c.CutUnixNano != 0 {
		p.Cut = time.Unix(0, c.CutUnixNano).UTC()
	}
	if p.after(v.Progress[c.Node]) {
		v.Progress[c.Node] = p
	}
	return nil
}

// list returns copies of all volumes sorted by name.
func (f *fsm) list() []Volume {
	f.mu.RLock()
	defer f.mu.RUnlock()
	out := make([]Volume, 0, len(f.volumes))
	for _, v := range f.volumes {
		out = append(out, v.clone())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// get returns a copy of one volume.
func (f *fsm) get(name string) (Volume, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	v, ok := f.volumes[name]
	if !ok {
		return Volume{}, false
	}
	return v.clone(), true
}

// snapshotHeader is the first line of a catalog snapshot; Records typed
// records (snapshotRecord, one JSON object per line) follow.
type snapshotHeader struct {
	Format  string `json:"format"`
	Version int    `json:"version"`
	Index   uint64 `json:"index"`
	Records int    `json:"records"`
}

// snapshotRecord is one line of a snapshot; Type says which field is set.
type snapshotRecord struct {
	Type   string  `json:"type"`
	Volume *Volume `json:"volume,omitempty"`
}

const (
	snapshotFormat  = "tether-catalog"
	snapshotVersion = 1
	recordVolume    = "volume"
)

type fsmSnapshot struct {
	header  snapshotHeader
	volumes []Volume
}

// Snapshot implements raft.FSM: it copies the state; Persist writes it.
func (f *fsm) Snapshot() (raft.FSMSnapshot, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	vols := make([]Volume, 0, len(f.volumes))
	for _, v := range f.volumes {
		vols = append(vols, v.clone())
	}
	sort.Slice(vols, func(i, j int) bool { return vols[i].Name < vols[j].Name })
	return &fsmSnapshot{
		header:  snapshotHeader{Format: snapshotFormat, Version: snapshotVersion, Index: f.lastIndex, Records: len(vols)},
		volumes: vols,
	}, nil
}

// Persist implements raft.FSMSnapshot.
func (s *fsmSnapshot) Persist(sink raft.SnapshotSink) error {
	if err := s.write(sink); err != nil {
		_ = sink.Cancel()
		return fmt.Errorf("cluster: writing catalog snapshot: %w", err)
	}
	return sink.Close()
}

func (s *fsmSnapshot) write(w io.Writer) error {
	bw := bufio.NewWriter(w)
	enc := json.NewEncoder(bw)
	if err := enc.Encode(s.header); err != nil {
		return err
	}
	for i := range s.volumes {
		if err := enc.Encode(snapshotRecord{Type: recordVolume, Volume: &s.volumes[i]}); err != nil {
			return err
		}
	}
	return bw.Flush()
}

// Release implements raft.FSMSnapshot.
func (s *fsmSnapshot) Release() {}

// Restore implements raft.FSM: it replaces the whole catalog.
func (f *fsm) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	dec := json.NewDecoder(bufio.NewReader(rc))
	var h snapshotHeader
	if err := dec.Decode(&h); err != nil {
		return fmt.Errorf("cluster: reading catalog snapshot header: %w", err)
	}
	if h.Format != snapshotFormat || h.Version < 1 || h.Version > snapshotVersion {
		return fmt.Errorf("cluster: catalog snapshot is %q version %d; this node reads %q up to version %d", h.Format, h.Version, snapshotFormat, snapshotVersion)
	}
	vols := make(map[string]*Volume, h.Records)
	for i := 0; i < h.Records; i++ {
		var rec snapshotRecord
		if err := dec.Decode(&rec); err != nil {
			return fmt.Errorf("cluster: reading record %d of %d from catalog snapshot: %w", i+1, h.Records, err)
		}
		if rec.Type != recordVolume || rec.Volume == nil {
			return fmt.Errorf("cluster: catalog snapshot record %d has unknown type %q", i+1, rec.Type)
		}
		v := rec.Volume
		if v.Progress == nil {
			v.Progress = map[string]Progress{}
		}
		vols[v.Name] = v
	}
	f.mu.Lock()
	f.volumes = vols
	f.lastIndex = h.Index
	f.mu.Unlock()
	f.onChange()
	return nil
}
