package cluster

import (
	"context"
	"fmt"
	"time"
)

// CatalogCurrent reports whether this node's catalog has applied every
// Raft entry it had on disk when it started. A restarted node replays the
// entries after its last snapshot only once a leader confirms them; until
// then a volume missing from its catalog may well exist.
func (c *Cluster) CatalogCurrent() bool {
	return c.ready.Load() && c.raft.AppliedIndex() >= c.startIndex && c.fsm.appliedIndex() >= c.startCommand
}

// WaitCatalogCurrent waits until CatalogCurrent or ctx ends.
func (c *Cluster) WaitCatalogCurrent(ctx context.Context) error {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for !c.CatalogCurrent() {
		select {
		case <-ctx.Done():
			return fmt.Errorf("cluster: catalog has not caught up with the raft log on disk (no leader yet?): %w", ctx.Err())
		case <-c.ctx.Done():
			return ErrShutdown
		case <-t.C:
		}
	}
	return nil
}

// Retention is how long a deleted volume is kept before it is purged.
func (c *Cluster) Retention() time.Duration { return c.retention() }

// SoftDeleteVolume marks a volume deleted now. It stays in the catalog,
// keeps its copies and keeps replicating until the leader purges it after
// the retention period; UndeleteVolume brings it back. Deleting a volume
// that is already deleted keeps its first deletion time.
func (c *Cluster) SoftDeleteVolume(ctx context.Context, name string) (Volume, error) {
	if err := ValidateName(name); err != nil {
		return Volume{}, err
	}
	if _, err := c.Apply(ctx, SetDeleted{Name: name, DeletedUnixNano: time.Now().UnixNano()}); err != nil {
		return Volume{}, err
	}
	v, _ := c.Volume(name)
	return v, nil
}

// UndeleteVolume brings back a volume deleted less than the retention
// period ago.
func (c *Cluster) UndeleteVolume(ctx context.Context, name string) (Volume, error) {
	if err := ValidateName(name); err != nil {
		return Volume{}, err
	}
	if _, err := c.Apply(ctx, Undelete{Name: name}); err != nil {
		return Volume{}, err
	}
	v, _ := c.Volume(name)
	return v, nil
}

// PurgeVolume removes a deleted volume from the catalog now, instead of
// at the end of its retention. A volume that is not deleted is refused.
func (c *Cluster) PurgeVolume(ctx context.Context, name string) error {
	if err := ValidateName(name); err != nil {
		return err
	}
	v, ok := c.fsm.get(name)
	if !ok {
		return fmt.Errorf("%w: %q", ErrNoVolume, name)
	}
	if !v.Deleted() {
		return fmt.Errorf("%w: %q is in use; delete it first (docker volume rm)", ErrNotDeleted, name)
	}
	_, err := c.Apply(ctx, DeleteVolume{Name: name, ExpectDeletedUnixNano: v.DeletedUnixNano})
	return err
}

// deletedError explains why a deleted volume's name cannot be reused yet.
func (c *Cluster) deletedError(v Volume) error {
	return fmt.Errorf("%w: %q was removed at %s and is kept until %s; bring it back with \"tether volume undelete %s\", or discard it now with \"tether volume purge %s\" and create it again",
		ErrVolumeDeleted, v.Name, v.DeletedAt().Format(time.RFC3339), v.DeletedAt().Add(c.retention()).Format(time.RFC3339), v.Name, v.Name)
}
