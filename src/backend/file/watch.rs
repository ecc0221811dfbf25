//! Change notices for the file backend's kept files, so an unchanged file is
//! served with no syscall per object: `statx` of every object on every
//! Mount was a tenth of the daemon's CPU under load.
//!
//! One inotify instance watches each directory objects are read beneath
//! (names created, replaced, renamed, deleted) and each kept file itself
//! (writes and attribute or link-count changes through any path, a hard
//! link elsewhere included). Every event gets the next number; a kept
//! file remembers the number current when it was read and is served only
//! while no event about its name is newer. The queue is drained before
//! the answer is trusted, at most once per Mount: a drain that began after
//! the Mount arrived has seen every change made before it, so a file
//! changed before the driver asked is served new.
//!
//! Only file systems whose every change passes through this kernel are
//! watched (ext4, XFS, btrfs, tmpfs); on others (NFS, FUSE, overlay
//! layers changed underneath) and whenever a watch cannot be had the
//! backend checks each kept file with `statx` as before. A lost event
//! (queue overflow), a watched directory going away or the table of
//! changed names filling up makes every kept file suspect at once.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

use crate::key::Key;

/// Watches held at most: inotify watches are counted per user against a
/// node-wide limit (8,192 on older kernels) that kubelet and others share.
const MAX_WATCHES: usize = 1024;
/// Names remembered as changed; beyond this every kept file is suspect.
const MAX_DIRTY: usize = 4096;
/// Reads of the queue per drain (4 KiB each).
const MAX_READS: usize = 64;

/// What a watch descriptor watches.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Watched {
    /// A directory objects are read beneath, for this scope.
    Dir { scope: Option<String> },
    /// A kept file, under its kept-name key.
    File { key: Key },
}

#[derive(Default)]
struct State {
    /// Events processed so far; each got the next number.
    seq: u64,
    /// Files read before this event number are all suspect.
    floor: u64,
    /// The number of the last event about each name.
    dirty: HashMap<Key, u64>,
    watches: HashMap<WatchDescriptor, Watched>,
}

/// The key a kept name is known under.
pub(super) type KeyOf = fn(Option<&str>, &str) -> Key;

pub(super) struct Watch {
    inotify: Inotify,
    /// Held for a drain (the read and the bookkeeping); checks take only
    /// `state`, briefly, never across a syscall.
    draining: Mutex<()>,
    state: Mutex<State>,
    /// 1 + when the last completed drain began, in ns after `base`
    /// (0: never).
    drained: AtomicU64,
    base: Instant,
    key_of: KeyOf,
}

/// How a kept file is watched: its directory's watch and its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct KeptWatches {
    pub dir: WatchDescriptor,
    pub file: WatchDescriptor,
}

const DIR_EVENTS: AddWatchFlags = AddWatchFlags::IN_MODIFY
    .union(AddWatchFlags::IN_ATTRIB)
    .union(AddWatchFlags::IN_CLOSE_WRITE)
    .union(AddWatchFlags::IN_CREATE)
    .union(AddWatchFlags::IN_DELETE)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_DELETE_SELF)
    .union(AddWatchFlags::IN_MOVE_SELF)
    .union(AddWatchFlags::IN_ONLYDIR);
const FILE_EVENTS: AddWatchFlags = AddWatchFlags::IN_MODIFY
    .union(AddWatchFlags::IN_ATTRIB)
    .union(AddWatchFlags::IN_CLOSE_WRITE)
    .union(AddWatchFlags::IN_DELETE_SELF)
    .union(AddWatchFlags::IN_MOVE_SELF);
/// A directory's own fate: every kept file below it is suspect.
const GONE: AddWatchFlags = AddWatchFlags::IN_DELETE_SELF
    .union(AddWatchFlags::IN_MOVE_SELF)
    .union(AddWatchFlags::IN_UNMOUNT)
    .union(AddWatchFlags::IN_IGNORED);

/// Whether every change to files on `f`'s file system is made by this
/// kernel (and so is seen by inotify).
pub(super) fn local_file_system(f: &std::fs::File) -> bool {
    use nix::sys::statfs::{
        fstatfs, BTRFS_SUPER_MAGIC, EXT4_SUPER_MAGIC, TMPFS_MAGIC, XFS_SUPER_MAGIC,
    };
    fstatfs(f).is_ok_and(|s| {
        let t = s.filesystem_type();
        [
            EXT4_SUPER_MAGIC,
            XFS_SUPER_MAGIC,
            BTRFS_SUPER_MAGIC,
            TMPFS_MAGIC,
        ]
        .contains(&t)
    })
}

impl Watch {
    /// `None` where inotify is not to be had (then `statx` it is).
    pub fn new(key_of: KeyOf) -> Option<Self> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).ok()?;
        Some(Self {
            inotify,
            draining: Mutex::new(()),
            state: Mutex::new(State::default()),
            drained: AtomicU64::new(0),
            base: Instant::now(),
            key_of,
        })
    }

    /// Watches the inode behind `f` (an open descriptor: the very
    /// directory or file that was checked, not whatever a path names now).
    fn add(
        &self,
        f: &std::fs::File,
        events: AddWatchFlags,
        what: Watched,
    ) -> Option<WatchDescriptor> {
        if !local_file_system(f) {
            return None;
        }
        let mut state = self.state.lock().ok()?;
        if state.watches.len() >= MAX_WATCHES {
            // Descriptors of files no longer kept pile up here; start
            // again (every kept file is then checked with statx until read
            // anew).
            let files: Vec<WatchDescriptor> = state
                .watches
                .iter()
                .filter(|(_, w)| matches!(w, Watched::File { .. }))
                .map(|(wd, _)| *wd)
                .collect();
            if !files.is_empty() {
                for wd in files {
                    let _ = self.inotify.rm_watch(wd);
                    state.watches.remove(&wd);
                }
                state.seq += 1;
                state.floor = state.seq;
            }
            if state.watches.len() >= MAX_WATCHES {
                return None;
            }
        }
        let path = format!("/proc/self/fd/{}", f.as_raw_fd());
        let wd = self.inotify.add_watch(path.as_str(), events).ok()?;
        // The same inode gives the same descriptor: the latest use wins.
        state.watches.insert(wd, what);
        Some(wd)
    }

    /// Watches a directory objects of `scope` are read beneath.
    pub fn dir(&self, dir: &std::fs::File, scope: Option<&str>) -> Option<WatchDescriptor> {
        self.add(
            dir,
            DIR_EVENTS,
            Watched::Dir {
                scope: scope.map(str::to_string),
            },
        )
    }

    /// Watches a file about to be kept under `key`.
    pub fn file(&self, file: &std::fs::File, key: Key) -> Option<WatchDescriptor> {
        self.add(file, FILE_EVENTS, Watched::File { key })
    }

    /// The event number everything read from now on is current as of,
    /// having drained the queue unless a drain began after `since`.
    pub fn mark(&self, since: Instant) -> u64 {
        self.drain(since);
        // Poisoned: a number no file is current as of.
        self.state.lock().map_or(0, |state| state.seq)
    }

    /// Whether the file kept under `key` at event number `read` is still
    /// as read: both its watches stand and no event about it came since.
    pub fn unchanged(&self, key: &Key, read: u64, watched: KeptWatches, since: Instant) -> bool {
        self.drain(since);
        let Ok(state) = self.state.lock() else {
            return false;
        };
        read >= state.floor
            && state.dirty.get(key).is_none_or(|&n| n <= read)
            && matches!(state.watches.get(&watched.dir), Some(Watched::Dir { .. }))
            && state.watches.get(&watched.file) == Some(&Watched::File { key: *key })
    }

    /// Takes every queued event, unless a drain that began after `since`
    /// has completed (it took every event of a change made before then).
    fn drain(&self, since: Instant) {
        let since = self.nanos(since);
        if self.drained.load(Ordering::Acquire) > since {
            return;
        }
        let Ok(_draining) = self.draining.lock() else {
            return;
        };
        if self.drained.load(Ordering::Acquire) > since {
            return;
        }
        let began = self.nanos(Instant::now());
        let mut events = Vec::new();
        let mut lost = false;
        for reads in 0.. {
            // Files changed faster than they can be followed (or an
            // error, events gone with it): every kept file is suspect,
            // which is also right for the events left unread.
            if reads == MAX_READS {
                lost = true;
                break;
            }
            // Usually nothing is queued: asking costs one syscall, where
            // a read first zeroes a 4 KiB buffer (64 cache lines per Mount).
            match queued_bytes(&self.inotify) {
                Ok(0) => break,
                Ok(_) => {}
                Err(_) => {
                    lost = true;
                    break;
                }
            }
            match self.inotify.read_events() {
                Ok(more) if !more.is_empty() => events.extend(more),
                Err(nix::errno::Errno::EAGAIN) | Ok(_) => break,
                Err(_) => {
                    lost = true;
                    break;
                }
            }
        }
        if !events.is_empty() || lost {
            let Ok(mut state) = self.state.lock() else {
                return;
            };
            self.apply(&mut state, events);
            if lost {
                state.seq += 1;
                state.floor = state.seq;
            }
        }
        self.drained.store(began + 1, Ordering::Release);
    }

    fn nanos(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX - 1)
    }

    fn apply(&self, state: &mut State, events: Vec<nix::sys::inotify::InotifyEvent>) {
        for e in events {
            state.seq += 1;
            let n = state.seq;
            if e.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                state.floor = n;
                continue;
            }
            let dirty = match state.watches.get(&e.wd) {
                None => None,
                Some(Watched::File { key }) => Some(*key),
                Some(Watched::Dir { scope }) => {
                    if e.mask.intersects(GONE) {
                        state.floor = n;
                        None
                    } else {
                        // A name that is not UTF-8 is never kept.
                        e.name
                            .as_deref()
                            .and_then(|n| n.to_str())
                            .map(|name| (self.key_of)(scope.as_deref(), name))
                    }
                }
            };
            if e.mask.contains(AddWatchFlags::IN_IGNORED) {
                state.watches.remove(&e.wd);
            }
            if let Some(key) = dirty {
                if state.dirty.len() >= MAX_DIRTY && !state.dirty.contains_key(&key) {
                    state.dirty.clear();
                    state.floor = n;
                }
                state.dirty.insert(key, n);
            }
        }
    }
}

/// Bytes of events waiting in the inotify queue.
fn queued_bytes(inotify: &Inotify) -> nix::Result<usize> {
    use std::os::fd::AsFd;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD on an inotify descriptor writes one int to `n`,
    // which lives across the call.
    let rc = unsafe {
        libc::ioctl(
            inotify.as_fd().as_raw_fd(),
            libc::FIONREAD,
            &mut n as *mut libc::c_int,
        )
    };
    if rc < 0 {
        return Err(nix::errno::Errno::last());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyBuilder;

    fn key_of(scope: Option<&str>, name: &str) -> Key {
        KeyBuilder::new("t").opt(scope).field(name).finish()
    }

    /// `dir/name` (holding "1") kept under `scope`, both watched; `None`
    /// where inotify or a watched file system is not to be had.
    fn kept(dir: &std::path::Path, scope: Option<&str>) -> Option<(Watch, Key, KeptWatches)> {
        let w = Watch::new(key_of)?;
        let dir_wd = w.dir(&std::fs::File::open(dir).unwrap(), scope)?;
        std::fs::write(dir.join("a"), "1").unwrap();
        let key = key_of(scope, "a");
        let f = std::fs::File::open(dir.join("a")).unwrap();
        let file_wd = w.file(&f, key).unwrap();
        let both = KeptWatches {
            dir: dir_wd,
            file: file_wd,
        };
        Some((w, key, both))
    }

    /// Every kind of change is an event about the name, in the order made;
    /// a file read after an event is current again.
    #[test]
    fn changes_are_numbered_per_name() {
        let dir = tempfile::tempdir().unwrap();
        let Some((w, key, both)) = kept(dir.path(), None) else {
            // Not a watched file system here.
            return;
        };
        let path = dir.path().join("a");
        let read = w.mark(Instant::now());
        assert!(w.unchanged(&key, read, both, Instant::now()));
        let changes: [&dyn Fn(); 4] = [
            &|| std::fs::write(&path, "2").unwrap(),
            &|| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap()
            },
            &|| std::fs::hard_link(&path, dir.path().join("elsewhere")).unwrap(),
            &|| {
                std::fs::write(dir.path().join("b"), "3").unwrap();
                std::fs::rename(dir.path().join("b"), &path).unwrap();
            },
        ];
        let mut read = read;
        for (i, change) in changes.iter().enumerate() {
            change();
            assert!(!w.unchanged(&key, read, both, Instant::now()), "change {i}");
            read = w.mark(Instant::now());
        }
        // A drain that began after `since` is not repeated: an event after
        // it is seen by the next Mount, not by this one.
        let since = Instant::now();
        let read = w.mark(since);
        std::fs::write(dir.path().join("a"), "4").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(w.mark(since), read);
        assert!(w.mark(Instant::now()) > read);
    }

    /// A flood of changes to other names (more than one drain reads, more
    /// than the kernel queues) is bounded work and leaves kept files
    /// suspect, never trusted.
    #[test]
    fn a_flood_of_events_is_bounded_and_makes_everything_suspect() {
        let dir = tempfile::tempdir().unwrap();
        let Some((w, key, both)) = kept(dir.path(), None) else {
            return;
        };
        let read = w.mark(Instant::now());
        // Alternating names: the kernel merges only identical neighbours.
        let mut noise = [
            std::fs::File::create(dir.path().join("n1")).unwrap(),
            std::fs::File::create(dir.path().join("n2")).unwrap(),
        ];
        for i in 0..20_000 {
            std::io::Write::write_all(&mut noise[i % 2], b"x").unwrap();
        }
        let t = Instant::now();
        assert!(!w.unchanged(&key, read, both, Instant::now()));
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
        // Once the queue is read out (a few bounded drains), a file read
        // again is current.
        let current = (0..10).any(|_| {
            let read = w.mark(Instant::now());
            w.unchanged(&key, read, both, Instant::now())
        });
        assert!(current);
    }

    /// A watched directory going away makes every kept file suspect.
    #[test]
    fn a_directory_gone_makes_everything_suspect() {
        let top = tempfile::tempdir().unwrap();
        let sub = top.path().join("s");
        std::fs::create_dir(&sub).unwrap();
        let Some((w, key, both)) = kept(&sub, Some("s")) else {
            return;
        };
        let read = w.mark(Instant::now());
        std::fs::rename(&sub, top.path().join("moved")).unwrap();
        assert!(!w.unchanged(&key, read, both, Instant::now()));
    }
}
