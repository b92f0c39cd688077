package replication

import "time"

// dirtySet is a set of changed paths, relative to the volume root. A true
// value asks for the path's whole subtree to be sent again (a directory that
// appeared, for instance by a rename, may hold entries no event named).
type dirtySet struct {
	paths map[string]bool
	since time.Time // when the oldest change in the set was seen; zero when empty
}

// add marks rel as changed at t.
func (d *dirtySet) add(rel string, subtree bool, t time.Time) {
	if d.paths == nil {
		d.paths = map[string]bool{}
	}
	d.paths[rel] = d.paths[rel] || subtree
	d.note(t)
}

// note records a change at t without a path.
func (d *dirtySet) note(t time.Time) {
	if d.since.IsZero() || t.Before(d.since) {
		d.since = t
	}
}

// empty reports whether no path is dirty.
func (d *dirtySet) empty() bool { return len(d.paths) == 0 }

// take returns the set and leaves d empty.
func (d *dirtySet) take() dirtySet {
	out := *d
	*d = dirtySet{}
	return out
}

// oldest returns the earliest of the non-zero times ts, zero when all are.
func oldest(ts ...time.Time) time.Time {
	var o time.Time
	for _, t := range ts {
		if !t.IsZero() && (o.IsZero() || t.Before(o)) {
			o = t
		}
	}
	return o
}
