package replication

import (
	"io/fs"
	"os"
	"slices"
	"strings"
	"syscall"
	"time"
)

// renameOp is a rename a cut carries: src (a path of the previous cut,
// gone now) became to (new since), the same inode. The renames of a cut
// apply one after the other, so from is where src is once the renames
// before this one moved it (a file found below a directory an earlier
// rename moved; see sequence): the replica, and the index, apply each
// rename to the tree the previous ones left.
type renameOp struct {
	src, from, to string
	ino           uint64
	dir           bool
}

// forward returns where path rel of the tree before renames[:n] is once
// they are applied; ok is false when one of them replaced it (a rename
// onto rel or an ancestor of it).
func forward(renames []renameOp, rel string) (string, bool) {
	for _, r := range renames {
		switch {
		case isUnder(rel, r.from):
			rel = r.to + rel[len(r.from):]
		case isUnder(rel, r.to):
			return "", false
		}
	}
	return rel, true
}

// sequence sets each rename's from: its src moved by the renames before
// it. A rename whose src an earlier one replaced cannot be applied and is
// dropped (returned, for the caller to delete and re-send).
func sequence(renames []renameOp) (kept, dropped []renameOp) {
	kept = renames[:0:0]
	for _, r := range renames {
		from, ok := forward(kept, r.src)
		if !ok {
			dropped = append(dropped, r)
			continue
		}
		r.from = from
		kept = append(kept, r)
	}
	return kept, dropped
}

// planned returns the plan's entry at rel.
func (p *plan) planned(rel string) (fs.FileInfo, bool) {
	if fi, ok := p.dirs[rel]; ok {
		return fi, true
	}
	fi, ok := p.others[rel]
	return fi, ok
}

// origin returns the path rel had at the previous cut, following the
// cut's renames back; ok is false when nothing at rel comes from the
// previous cut through them (a rename moved away what was there: rel is
// new).
func (p *plan) origin(rel string) (string, bool) {
	for i := len(p.renames) - 1; i >= 0; i-- {
		r := p.renames[i]
		switch {
		case isUnder(rel, r.to):
			rel = r.from + rel[len(r.to):]
		case isUnder(rel, r.from):
			return "", false
		}
	}
	return rel, true
}

// replacedBelow reports whether the batch deletes rel or an ancestor of
// it (before sending it anew).
func (p *plan) replacedBelow(rel string) bool {
	if _, ok := p.deletes[rel]; ok {
		return true
	}
	for _, a := range ancestorsOf(rel) {
		if _, ok := p.deletes[a]; ok {
			return true
		}
	}
	return false
}

// baseFor returns the index entry of the version of rel the replicas hold
// (at its path of the previous cut), nil when there is none or the batch
// replaces it.
func (p *plan) baseFor(rel string) (*indexEntry, error) {
	if p.idx == nil || p.replacedBelow(rel) {
		return nil, nil
	}
	o, ok := p.origin(rel)
	if !ok {
		return nil, nil
	}
	return p.idx.get(o)
}

// inoOf returns the inode number of fi.
func inoOf(fi fs.FileInfo) uint64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Ino
	}
	return 0
}

// detectRenames turns a deleted path and a new one holding the same inode
// (as the index recorded it) into one RENAME: a file, or a directory with
// everything below it, of which only what changed since the previous cut
// is sent again. A source must be gone and a target new (not in the
// index); a rename found in a later round of the cut may take its source
// from below one found earlier, and names it where that one moved it (see
// renameOp); anything less clear travels as delete and re-send. Targets are looked for among
// the entries just planned, including those read with a new directory
// (an entry moved into it before its watch was set has no event).
func (p *plan) detectRenames(root *os.Root) error {
	if p.idx == nil {
		return nil
	}
	var stale []renameOp
	kept := p.renames[:0]
	for _, r := range p.renames {
		if fi, ok := p.planned(r.to); ok && inoOf(fi) == r.ino && fi.IsDir() == r.dir {
			kept = append(kept, r)
		} else {
			stale = append(stale, r) // the target changed again: back to delete + send
		}
	}
	p.renames = kept
	if err := p.resequence(root, stale); err != nil {
		return err
	}
	srcs, err := p.renameSources(root)
	if err != nil || len(srcs) == 0 {
		return err
	}
	done := map[string]bool{} // sources and targets of the cut's renames so far
	for _, r := range p.renames {
		done[r.src], done[r.to] = true, true
	}
	cands := make([]string, 0, len(p.fresh))
	for rel := range p.fresh {
		cands = append(cands, rel)
	}
	slices.SortFunc(cands, func(a, b string) int {
		if d := depthOf(a) - depthOf(b); d != 0 {
			return d
		}
		return strings.Compare(a, b)
	})
	for _, rel := range cands {
		fi, ok := p.planned(rel)
		if !ok || rel == rootPath || p.replacedBelow(parentOf(rel)) {
			continue // below a directory the batch deletes first
		}
		src, ok := srcs[inoOf(fi)]
		if !ok || done[rel] || done[src.path] || src.kind != indexEntryOf(fi, time.Unix(0, 0)).kind || isUnder(rel, src.path) || isUnder(src.path, rel) {
			continue
		}
		from, ok := forward(p.renames, src.path)
		if !ok || isUnder(rel, from) || isUnder(from, rel) {
			continue // an earlier rename of the cut replaced it, or it would move into itself
		}
		if fi.IsDir() {
			if _, whole := p.deletes[rel]; !whole {
				continue // its subtree was not read: no way to tell what changed in it
			}
		} else if _, ok := p.deletes[rel]; ok {
			continue
		} else if n := indexEntryOf(fi, time.Unix(0, 0)).nlink; n != 1 {
			continue
		}
		if e, err := p.idx.get(rel); err != nil {
			return err
		} else if e != nil {
			continue // not new: delete + send
		}
		delete(srcs, inoOf(fi))
		delete(p.deletes, src.path)
		p.renames = append(p.renames, renameOp{src: src.path, from: from, to: rel, ino: inoOf(fi), dir: fi.IsDir()})
		done[src.path], done[rel] = true, true
		if fi.IsDir() {
			p.reconciling[rel] = true
			delete(p.deletes, rel) // what lies below it may be a rename target too
		}
	}
	for _, r := range p.renames {
		if r.dir && p.reconciling[r.to] {
			delete(p.reconciling, r.to)
			if err := p.reconcile(r); err != nil {
				return err
			}
		}
	}
	return nil
}

// resequence drops the stale renames (their target changed again) and
// sets the froms of the rest anew; what a dropped rename would have moved
// travels as delete and re-send.
func (p *plan) resequence(root *os.Root, stale []renameOp) error {
	if len(stale) == 0 {
		return nil
	}
	kept, dropped := sequence(p.renames)
	p.renames = kept
	for _, r := range append(stale, dropped...) {
		if at, ok := forward(p.renames, r.src); ok {
			p.del(at)
		}
		if _, ok := p.dirs[r.to]; ok && r.dir {
			// Its subtree may have been narrowed to what changed (reconcile):
			// send it whole.
			p.del(r.to)
			if err := p.collect(root, r.to); err != nil {
				return err
			}
		}
	}
	return nil
}

type renameSource struct {
	path string
	kind byte
}

// renameSources returns, by inode, the deleted paths of the plan that the
// index knows as single-linked files or directories and that are gone
// (not under another deleted path). Inodes seen twice are left out.
func (p *plan) renameSources(root *os.Root) (map[uint64]renameSource, error) {
	srcs := map[uint64]renameSource{}
	dup := map[uint64]bool{}
	for d := range p.deletes {
		if d == rootPath || p.replacedBelow(parentOf(d)) {
			continue
		}
		e, err := p.idx.get(d)
		if err != nil {
			return nil, err
		}
		if e == nil || (e.kind != kindDir && (e.kind != kindFile || e.nlink != 1)) {
			continue
		}
		if _, ok, err := lstatReal(root, d); err != nil {
			return nil, err
		} else if ok {
			continue // still there (a directory sent anew)
		}
		if _, ok := srcs[e.ino]; ok {
			dup[e.ino] = true
		}
		srcs[e.ino] = renameSource{path: d, kind: e.kind}
	}
	for ino := range dup {
		delete(srcs, ino)
	}
	return srcs, nil
}

// reconcile narrows what a renamed directory's subtree sends: entries the
// index holds under the old name that are gone become DELETEs, files whose
// stat proves them unchanged since they were read are not sent (the
// RENAME moves them), the rest is sent (as deltas against the old name).
func (p *plan) reconcile(r renameOp) error {
	return p.idx.under(r.from, func(old string, e *indexEntry) {
		t := r.to + old[len(r.from):]
		if o, ok := p.origin(t); !ok || o != old {
			return // another rename of the cut put something else there
		}
		fi, ok := p.planned(t)
		if !ok {
			if !p.replacedBelow(parentOf(t)) {
				p.del(t)
			}
			return
		}
		if e.kind != kindFile || p.touched[old] || p.touched[t] || !e.unchanged(indexEntryOf(fi, time.Unix(0, 0))) {
			return
		}
		delete(p.others, t)
		delete(p.fresh, t)
	})
}
