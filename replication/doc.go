// Package replication owns moving a volume's data from its primary to its
// replicas.
//
// On the primary, a Primary watches the volume's data directory recursively
// with inotify (watches kept by descriptor, so renamed directories keep
// their names right) and collects the paths that changed; periodic rescans
// mark what differs from the block index. A cutter turns them
// into cuts: it reads the changed paths into a spool, then creates a fresh
// sentinel file in a barrier directory watched by the same inotify instance
// and waits for its event; the cut is consistent when no event of the
// volume arrived in between, else the paths of the new events are read
// again (a few rounds, then a Freezer pauses the writers, or the batch is
// marked file-consistent only). Each cut is read once and kept while a
// replica needs it (a disconnected one's within RetainAge, RetainBytes and
// RetainCuts);
// one sender per replica streams the cuts over the gRPC Replication.Stream
// (or a full cut when the replica's position is unknown), each followed by
// a Commit, optionally under a bandwidth Limiter shared by the node. At
// Start, a volume whose directories exceed the inotify watch limit is
// refused with the fix; a watch refused later makes the watcher rescan
// every few seconds.
//
// On the replica, a Server stages the batch's file contents outside the data
// directory; at its Commit it writes a redo journal (the batch's
// operations, referring to the staged contents) and a commit record, applies
// the batch in place (through an os.Root, never writing through a symlink;
// staged files are renamed into place),
// makes it durable with syncfs, records its position, clears the journal and
// acknowledges it. After a crash, the next stream (or Fence, before the node
// serves the volume) re-applies a committed journal and drops an
// uncommitted one, so the replica is always at one complete cut.
//
// Epochs fence old primaries: a replica remembers the newest epoch it has seen
// for a volume (raised by a newer primary's Hello or by Fence) and refuses
// streams of an older one. Fence also records that this node serves the
// volume; when a stream of a newer epoch arrives later, what the node has
// that the new primary's first batch would overwrite or delete is moved into
// a quarantine directory first (Quarantined lists them).
//
// A batch carries each changed file's data extents (holes stay holes),
// numeric owner and group, mode, extended attributes and mtime to the
// nanosecond; the further names of a hard-linked file travel as HARDLINK
// ops naming the first, and fifos are recreated. Devices and sockets are
// skipped with a warning. Chunks are zstd-compressed when that pays. A
// primary that starts (or a replica whose position it does not know) sends
// the whole tree.
//
// The primary keeps a block index of the volume (bbolt in its state
// directory: per path the stat and, for files, the BLAKE3 hash of each
// 64 KiB block as last sent), filled while the cut reads the files. An
// incremental cut sends a single-linked file as the blocks that changed
// since the previous cut, naming its base (size, mtime, digest of the block
// hashes); the replica checks the base before journaling the batch and
// refuses it otherwise (the primary then sends the whole tree), and patches
// the file in place inside the journal. A rename the index can prove (the
// old path is gone, the new one holds its inode) travels as one RENAME,
// also for a directory: of its subtree only what changed is sent. Before
// sending a full cut to a replica, the sender asks its BlockSums (the
// block hashes of the files it holds) and sends each such file as a delta
// against the replica's copy.
//
// Manifest and DiffManifests compare two trees entry by entry; tests and
// demos use them to check that a replica equals its primary.
package replication
