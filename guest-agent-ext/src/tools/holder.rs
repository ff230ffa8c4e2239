//! `cnfs-lock-holder`: keeps the single-writer lock of a luks2 container on an SMB share
//! (design encryption-luks2.md §5.2). cifs records the process that took a byte-range lock
//! and drops the lock at that process's first close of the file, or its exit, whatever kind
//! of lock it was; so the lock must be taken by a process that keeps the file open for as
//! long as the volume is mounted. The tool runner starts this (the agent's binary under
//! another argv[0]) as a daemon, in a session of its own, with no parent-death signal: it
//! outlives agent restarts, and the agent kills it once the loop device has let go of the
//! container. On NFSv4 and CephFS no holder is needed: the lock lives on the loop's own
//! open file (`fs::luks2`).
//!
//! argv: `cnfs-lock-holder <container> rw|ro /dev/fd/<report pipe>`. It writes `ok` to the
//! pipe once the lock is held, else `<step> <errno>` (step `open` or `lock`) and exits 1.

use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd};

use nix::errno::Errno;

use super::command::{BACKING_ROOT, LOCK_HOLDER_ARGV0, LUKS2_CONTAINER};

/// The holder's process name (`/proc/<pid>/comm`: the kernel keeps 15 bytes).
pub const HOLDER_COMM: &std::ffi::CStr = c"cnfs-lock-holde";

/// The byte the lock covers: the same as on NFS and CephFS, far past any data, so that it
/// never meets the loop's I/O (which goes through another open file of the same client).
pub const LOCK_BYTE: i64 = 1 << 62;

/// On SMB the holder also takes the next byte, the witness, in a lock of its own, after
/// [`LOCK_BYTE`]; every holder does the same, so whoever holds the witness holds the lock.
/// A check after a reconnect lets go of one byte at a time and takes it again: the byte kept
/// meanwhile keeps everyone else out, so a check never hands the lock over (with one byte,
/// a second guest's Mount in that round trip got in).
pub const WITNESS_BYTE: i64 = LOCK_BYTE + 1;

/// The single-writer lock on a container: a read lock for a read-only volume (several
/// readers), else a write lock, on [`LOCK_BYTE`] alone.
pub fn lock_request(read_only: bool) -> libc::flock {
    byte_lock(read_only, LOCK_BYTE)
}

fn byte_lock(read_only: bool, byte: i64) -> libc::flock {
    libc::flock {
        l_type: if read_only {
            libc::F_RDLCK
        } else {
            libc::F_WRLCK
        } as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte,
        l_len: 1,
        l_pid: 0,
    }
}

/// Whether this process was started as a lock holder.
pub fn invoked_as_holder(argv0: &str) -> bool {
    argv0 == LOCK_HOLDER_ARGV0
}

/// What the holder reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    Held,
    /// Opening the container failed with this errno.
    Open(Errno),
    /// Taking the lock failed with this errno (EAGAIN/EACCES: another client holds it).
    Lock(Errno),
}

impl Report {
    pub fn parse(text: &str) -> Option<Report> {
        let text = text.trim_end();
        if text == "ok" {
            return Some(Report::Held);
        }
        let (step, errno) = text.split_once(' ')?;
        let errno = Errno::from_raw(errno.parse().ok()?);
        match step {
            "open" => Some(Report::Open(errno)),
            "lock" => Some(Report::Lock(errno)),
            _ => None,
        }
    }
}

/// The holder's main. Returns only on failure (its exit code).
pub fn run(argv: &[String]) -> i32 {
    // Named for what it is (exec'd as /proc/self/exe, the kernel named it "exe"): the agent
    // finds holders by this name first, which the kernel answers without the process's
    // memory map (`luks2::holder_pids`).
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, HOLDER_COMM.as_ptr()) };
    let (Some(path), Some(mode), Some(report)) = (argv.get(1), argv.get(2), argv.get(3)) else {
        return 2;
    };
    let Some(report_fd) = report
        .strip_prefix("/dev/fd/")
        .and_then(|n| n.parse::<i32>().ok())
        .filter(|&n| n > 2)
    else {
        return 2;
    };
    // Only an open pipe is taken as the report channel: were the number free, the
    // container's open below would get it, and the report would be written into it.
    let is_pipe =
        nix::sys::stat::fstat(report_fd).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFIFO);
    if !is_pipe || !matches!(mode.as_str(), "rw" | "ro") {
        return 2;
    }
    // SAFETY: an open pipe (checked above) the runner passed under this number for this
    // process alone; nothing else here owns it.
    let report = unsafe { OwnedFd::from_raw_fd(report_fd) };
    let say = |text: &str| {
        let _ = nix::unistd::write(&report, text.as_bytes());
    };
    // Only a container on a backing share: the runner builds this path from a checked name.
    let ours = path
        .strip_prefix(BACKING_ROOT)
        .and_then(|p| p.strip_prefix('/'))
        .and_then(|p| p.strip_suffix(LUKS2_CONTAINER))
        .and_then(|name| name.strip_suffix('/'))
        .is_some_and(|name| !name.is_empty() && name != ".." && name != "." && !name.contains('/'));
    let Ok(c) = CString::new(path.as_bytes()) else {
        return 2;
    };
    if !ours {
        say(&format!("open {}\n", Errno::EINVAL as i32));
        return 1;
    }
    let read_only = mode == "ro";
    let flags = libc::O_CLOEXEC
        | libc::O_NOFOLLOW
        | if read_only {
            libc::O_RDONLY
        } else {
            libc::O_RDWR
        };
    // SAFETY: a NUL-terminated path that outlives the call.
    let fd = unsafe { libc::open(c.as_ptr(), flags) };
    if fd < 0 {
        say(&format!("open {}\n", Errno::last() as i32));
        return 1;
    }
    let locks = [lock_request(read_only), byte_lock(read_only, WITNESS_BYTE)];
    // Process-owned (POSIX) locks: this process never closes the file, so they last until
    // the process ends; two calls, so that cifs keeps (and the server gets) two locks, each
    // let go of on its own. A witness taken by someone else is the lock in use (exiting
    // lets go of the first byte).
    for lock in &locks {
        if let Err(e) = set_lock(fd, lock) {
            say(&format!("lock {}\n", e as i32));
            return 1;
        }
    }
    say("ok\n");
    drop(report);
    // Reads of the handle skip the page cache, so that each probe below reaches the server
    // (where the kernel refuses, a probe drops the cached page first).
    let direct = set_direct(fd);
    let mut keeper = Keeper {
        reconnects: cifs_reconnects(),
        ..Keeper::default()
    };
    // The agent kills the holder once the loop device lets go of the container. When the
    // agent cannot (a volume still busy at Unmount is detached and its loop goes only when
    // its last user does; an agent restart in between), the holder ends itself: it waits for
    // a loop on its file (the agent binds one right after this report), then for none.
    // Compared by the kernel's name of the file (sysfs and /proc only: a loop's status ioctl
    // would ask the file's server, which may be gone).
    let own = format!("/proc/self/fd/{fd}");
    let started = std::time::Instant::now();
    let mut seen = false;
    loop {
        std::thread::sleep(WATCH_EVERY);
        if let Some(code) = keep_lock(&mut keeper, fd, &locks, direct) {
            return code;
        }
        // A name that cannot be read counts as in use: the lock stays.
        let used = std::fs::read_link(&own).map_or(true, |file| {
            crate::blockdev::Sysfs::default().loop_uses(&file)
        });
        if used {
            seen = true;
        } else if seen || started.elapsed() > NEVER_BOUND {
            // Exit closes the file, and cifs lets the lock go with it.
            return 0;
        }
    }
}

/// Exit code of a holder that found its lock gone after a reconnect.
pub const LOST: i32 = 3;

/// How many times a check asks for the first byte held by someone else (200 ms apart)
/// before the lock counts as lost.
const FIRST_BYTE_ASKS: u32 = 5;

/// Failed checks in a row (each after a probe the server answered) that count as a lost lock.
const FAILED_CHECKS: u32 = 3;

/// Keeps the lock across lost connections. Samba keeps no byte-range lock of a connection
/// that ends, and cifs, once reconnected, reopens a handle and puts its locks back only when
/// the handle is next used: on an idle volume no one did, and a second guest opened the
/// volume (test `an_smb_luks2_volume_keeps_its_lock_when_the_connection_is_lost_and_remade`).
/// So every [`WATCH_EVERY`] the holder reads its handle (the read reopens and relocks it).
/// cifs does not report a failed relock: after a reconnect (of any share of the guest: cifs
/// counts them together) the holder checks its two bytes, the witness first, each by letting
/// it go and taking it again, never both at once. The witness held by another client
/// (EAGAIN/EACCES, twice in a row) is a lost lock: every holder takes it last; so is the
/// first byte held by another for a second (an older agent's holder takes it alone; a second
/// guest's Mount that the witness turns away lets go at once). Anything else (an unlock the
/// server refuses included) fails the check, and [`FAILED_CHECKS`] in a row count as lost
/// (an outage that begins between the read and the check is not a lost lock).
#[derive(Debug, Default)]
struct Keeper {
    /// cifs's reconnect count at the last check that held.
    reconnects: Option<u64>,
    /// A check under way: the bytes (0 the witness, 1 the first) checked so far.
    checking: Option<usize>,
    /// cifs's reconnect count when the check under way began.
    since: Option<u64>,
    /// The byte under check was let go, and taking it again failed: taken again at the next
    /// probe, without letting go again.
    released: bool,
    failures: u32,
}

/// What the check asks of one byte: 0 the witness, 1 the first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Unlock(usize),
    Lock(usize),
}

impl Keeper {
    /// One round after a probe: `read` is how the probe's read came back, `now` is cifs's
    /// reconnect count, `set` lets go of or takes one byte. `Some(LOST)` to end the holder.
    fn round(
        &mut self,
        read: Result<(), Errno>,
        now: Option<u64>,
        set: impl Fn(Step) -> Result<(), Errno>,
        pause: impl Fn(),
    ) -> Option<i32> {
        match read {
            Ok(()) => {}
            // The server answered that the file is gone or no longer ours (its handle could
            // not be reopened): no lock on it is held.
            Err(Errno::ENOENT | Errno::ESTALE | Errno::EACCES | Errno::EPERM | Errno::EBADF) => {
                return self.failed();
            }
            // The server does not answer (yet): the handle is reopened at a later probe.
            Err(_) => return None,
        }
        let from = match self.checking {
            Some(step) => step,
            None if now == self.reconnects => {
                // Read through a handle that holds: failures so far were passing ones.
                self.failures = 0;
                return None;
            }
            None => {
                self.since = now;
                0
            }
        };
        self.checking = Some(from);
        for byte in from..2 {
            // An unlock that fails leaves the lock in cifs's own records (where taking it
            // again would meet itself): it is let go of again at the next probe.
            if !self.released {
                if set(Step::Unlock(byte)).is_err() {
                    return self.failed();
                }
                self.released = true;
            }
            // A conflict on the witness is asked twice (cifs also answers EAGAIN for a
            // request cut off by another reconnect); on the first byte a few times over a
            // second: a second guest's Mount that the witness turned away lets go at once,
            // a holder of an older agent (the first byte alone) does not.
            let asks = if byte == 0 { 2 } else { FIRST_BYTE_ASKS };
            let mut taken = set(Step::Lock(byte));
            for _ in 1..asks {
                if !matches!(taken, Err(Errno::EAGAIN | Errno::EACCES)) {
                    break;
                }
                if byte == 1 {
                    pause();
                }
                taken = set(Step::Lock(byte));
            }
            match taken {
                Ok(()) => {
                    self.released = false;
                    self.checking = Some(byte + 1);
                }
                Err(Errno::EAGAIN | Errno::EACCES) => return Some(LOST),
                Err(_) => return self.failed(),
            }
        }
        // Checked against the count it began with: a reconnect during the check (it may
        // have gone on over several probes) is checked again, from the witness.
        *self = Keeper {
            reconnects: self.since,
            ..Keeper::default()
        };
        None
    }

    fn failed(&mut self) -> Option<i32> {
        self.failures += 1;
        (self.failures >= FAILED_CHECKS).then_some(LOST)
    }
}

/// [`Keeper::round`] on the holder's descriptor; `locks` are its two bytes, the first first.
fn keep_lock(
    keeper: &mut Keeper,
    fd: libc::c_int,
    locks: &[libc::flock; 2],
    direct: bool,
) -> Option<i32> {
    let read = probe(fd, direct);
    let set = |step: Step| {
        // The witness is locks[1].
        let l = match step {
            Step::Unlock(byte) => libc::flock {
                l_type: libc::F_UNLCK as libc::c_short,
                ..locks[1 - byte]
            },
            Step::Lock(byte) => locks[1 - byte],
        };
        set_lock(fd, &l)
    };
    keeper.round(read, cifs_reconnects(), set, || {
        std::thread::sleep(std::time::Duration::from_millis(200))
    })
}

/// F_SETLK of `lock` on `fd` (taking or letting go, by its type).
fn set_lock(fd: libc::c_int, lock: &libc::flock) -> Result<(), Errno> {
    // SAFETY: F_SETLK reads one `struct flock` from a reference that outlives the call.
    if unsafe { libc::fcntl(fd, libc::F_SETLK, lock as *const libc::flock) } < 0 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

/// One read of the container's first block through the holder's own handle: how it came
/// back.
fn probe(fd: libc::c_int, direct: bool) -> Result<(), Errno> {
    /// O_DIRECT wants a buffer aligned to the logical block size.
    #[repr(C, align(4096))]
    struct Block([u8; 4096]);
    let mut block = Block([0; 4096]);
    if !direct {
        // SAFETY: posix_fadvise(2) on a descriptor this process owns; only drops clean
        // cached pages of the first block.
        unsafe { libc::posix_fadvise(fd, 0, 4096, libc::POSIX_FADV_DONTNEED) };
    }
    // SAFETY: `fd` stays open for the process's life.
    let file = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    nix::sys::uio::pread(file, &mut block.0, 0).map(|_| ())
}

/// Turns on O_DIRECT for reads of this open file (the loop's own open of the same file may
/// share cifs's handle with it; the handle's flags stay as they were). Whether it took.
fn set_direct(fd: libc::c_int) -> bool {
    // SAFETY: F_GETFL on a descriptor this process owns.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: F_SETFL on the same descriptor, with its own flags and O_DIRECT.
    flags >= 0 && unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_DIRECT) } == 0
}

/// How many times cifs has remade sessions and tree connects in this guest
/// (`/proc/fs/cifs/Stats`: "<n> session <m> share reconnects"); `None` when unreadable,
/// which a later reading that can be read counts as a change.
fn cifs_reconnects() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/fs/cifs/Stats").ok()?;
    parse_reconnects(&text)
}

fn parse_reconnects(text: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [s, "session", m, "share", "reconnects"] => {
                Some(s.parse::<u64>().ok()? + m.parse::<u64>().ok()?)
            }
            _ => None,
        }
    })
}

/// How often a holder looks for the loop device on its file and reads its handle.
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// A holder whose file no loop device took within this (its agent died before binding one,
/// and no restarted agent cleaned up) ends itself.
const NEVER_BOUND: std::time::Duration = std::time::Duration::from_secs(600);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_are_read_back_and_anything_else_is_not_a_report() {
        assert_eq!(Report::parse("ok\n"), Some(Report::Held));
        assert_eq!(Report::parse("open 2\n"), Some(Report::Open(Errno::ENOENT)));
        assert_eq!(Report::parse("lock 11"), Some(Report::Lock(Errno::EAGAIN)));
        for bad in ["", "ok?", "open", "open x", "grab 11", "lock 11 12"] {
            assert_eq!(Report::parse(bad), None, "{bad:?}");
        }
    }

    /// The two bytes (0 the witness, 1 the first byte) as the holder's checks meet them:
    /// cifs's own records of its locks and the server's.
    #[derive(Default)]
    struct Server {
        /// cifs records the lock (it refuses this process the same lock again, locally).
        recorded: [bool; 2],
        /// The server has our lock.
        ours: [bool; 2],
        theirs: [bool; 2],
        /// Every request fails so (the connection is down).
        down: Option<Errno>,
        steps: Vec<Step>,
    }

    impl Server {
        fn holding() -> std::cell::RefCell<Server> {
            std::cell::RefCell::new(Server {
                recorded: [true, true],
                ours: [true, true],
                ..Server::default()
            })
        }
    }

    fn set(server: &std::cell::RefCell<Server>) -> impl Fn(Step) -> Result<(), Errno> + '_ {
        move |step| {
            let mut s = server.borrow_mut();
            s.steps.push(step);
            if let Some(e) = s.down {
                return Err(e);
            }
            let r = match step {
                // Nothing recorded: nothing to send.
                Step::Unlock(b) if !s.recorded[b] => Ok(()),
                Step::Unlock(b) if s.ours[b] => {
                    s.ours[b] = false;
                    s.recorded[b] = false;
                    // Never both let go of at once.
                    assert!(s.ours.iter().any(|&o| o), "both let go of: {:?}", s.steps);
                    Ok(())
                }
                // Refused by the server: cifs puts its record back.
                Step::Unlock(_) => Err(Errno::ENOLCK),
                Step::Lock(b) if s.recorded[b] => Err(Errno::EACCES),
                Step::Lock(b) if s.theirs[b] => Err(Errno::EAGAIN),
                Step::Lock(b) => {
                    s.ours[b] = true;
                    s.recorded[b] = true;
                    Ok(())
                }
            };
            r
        }
    }

    #[test]
    fn the_lock_is_checked_after_each_reconnect_one_byte_at_a_time_and_lost_only_to_another_holder()
    {
        use Step::{Lock, Unlock};
        let no_pause = || {};
        // No reconnect: nothing is asked.
        let server = Server::holding();
        let mut k = Keeper {
            reconnects: Some(1),
            ..Keeper::default()
        };
        assert_eq!(k.round(Ok(()), Some(1), set(&server), no_pause), None);
        // A probe the server did not answer checks nothing, whatever the count says.
        assert_eq!(
            k.round(Err(Errno::EHOSTDOWN), Some(2), set(&server), no_pause),
            None
        );
        assert!(server.borrow().steps.is_empty());
        // A reconnect: the witness, then the first byte, each let go of and taken again;
        // the new count is the one checked against.
        assert_eq!(k.round(Ok(()), Some(2), set(&server), no_pause), None);
        assert_eq!(
            server.borrow().steps,
            [Unlock(0), Lock(0), Unlock(1), Lock(1)]
        );
        assert_eq!(server.borrow().ours, [true, true]);
        assert_eq!(k.reconnects, Some(2));
        assert_eq!(k.round(Ok(()), Some(2), set(&server), no_pause), None);
        assert_eq!(
            server.borrow().steps.len(),
            4,
            "checked without a reconnect"
        );

        // A second guest's Mount holds the first byte for a moment (the witness, ours, turns
        // it away): asked again after a pause, taken, not lost.
        let server = Server::holding();
        server.borrow_mut().theirs[1] = true;
        let pauses = std::cell::Cell::new(0);
        let lets_go = || {
            pauses.set(pauses.get() + 1);
            if pauses.get() == 2 {
                server.borrow_mut().theirs[1] = false;
            }
        };
        let mut k = Keeper::default();
        assert_eq!(k.round(Ok(()), Some(3), set(&server), lets_go), None);
        assert_eq!(server.borrow().ours, [true, true]);
        assert_eq!((k.failures, k.checking, pauses.get()), (0, None, 2));
        // An older agent's holder keeps it (the first byte alone): lost after a second.
        let server = Server::holding();
        server.borrow_mut().theirs[1] = true;
        let pauses = std::cell::Cell::new(0);
        let mut k = Keeper::default();
        let count = || pauses.set(pauses.get() + 1);
        assert_eq!(k.round(Ok(()), Some(3), set(&server), count), Some(LOST));
        assert_eq!(pauses.get(), FIRST_BYTE_ASKS - 1);
        assert_eq!(server.borrow().ours, [true, false], "the witness is kept");

        // The server dropped our locks with the connection and cifs could not put them back
        // (another guest took both): the unlock is refused, cifs keeps its record; three
        // checks in a row, lost.
        let server = std::cell::RefCell::new(Server {
            recorded: [true, true],
            theirs: [true, true],
            ..Server::default()
        });
        let mut k = Keeper::default();
        for _ in 1..FAILED_CHECKS {
            assert_eq!(k.round(Ok(()), Some(4), set(&server), no_pause), None);
        }
        assert_eq!(k.round(Ok(()), Some(4), set(&server), no_pause), Some(LOST));
        assert_eq!(
            server.borrow().steps,
            [Unlock(0); 3],
            "never asked to lock itself"
        );
        // Another guest holds the witness of a lock cifs no longer records: lost at once.
        let server = std::cell::RefCell::new(Server {
            theirs: [true, true],
            ..Server::default()
        });
        let mut k = Keeper::default();
        assert_eq!(k.round(Ok(()), Some(4), set(&server), no_pause), Some(LOST));
        assert_eq!(server.borrow().steps, [Unlock(0), Lock(0), Lock(0)]);

        // One EAGAIN on the witness (a request cut off by another reconnect), then taken.
        let tries = std::cell::Cell::new(0);
        let once = |step| match step {
            Lock(0) if tries.replace(tries.get() + 1) == 0 => Err(Errno::EAGAIN),
            _ => Ok(()),
        };
        let mut k = Keeper::default();
        assert_eq!(k.round(Ok(()), Some(5), once, no_pause), None);
        assert_eq!(tries.get(), 2);

        // An outage that begins between the read and the check: failures in a row, lost.
        let server = Server::holding();
        let mut k = Keeper::default();
        server.borrow_mut().down = Some(Errno::EHOSTDOWN);
        for _ in 1..FAILED_CHECKS {
            assert_eq!(k.round(Ok(()), Some(6), set(&server), no_pause), None);
        }
        assert_eq!(k.round(Ok(()), Some(6), set(&server), no_pause), Some(LOST));
        // The first byte could not be taken again (outage): taken at the next probe without
        // letting go of anything more; a reconnect meanwhile is checked again, from the
        // witness.
        let server = Server::holding();
        let mut k = Keeper::default();
        let failing_first = |step| {
            if step == Lock(1) && server.borrow().steps.len() < 4 {
                server.borrow_mut().steps.push(step);
                return Err(Errno::EHOSTDOWN);
            }
            set(&server)(step)
        };
        assert_eq!(k.round(Ok(()), Some(7), failing_first, no_pause), None);
        assert_eq!((k.checking, k.released, k.failures), (Some(1), true, 1));
        assert_eq!(k.round(Ok(()), Some(8), failing_first, no_pause), None);
        assert_eq!(
            server.borrow().steps,
            [Unlock(0), Lock(0), Unlock(1), Lock(1), Lock(1)]
        );
        assert_eq!((k.failures, k.checking, k.reconnects), (0, None, Some(7)));
        assert_eq!(k.round(Ok(()), Some(8), failing_first, no_pause), None);
        assert_eq!(
            server.borrow().steps.len(),
            9,
            "checked again from the witness"
        );
        assert_eq!(k.reconnects, Some(8));

        // The server says the file is gone (its handle cannot be reopened): three in a
        // row, lost; a read through a holding handle in between starts the count again.
        let gone = || Err(Errno::ESTALE);
        let server = Server::holding();
        let mut k = Keeper {
            reconnects: Some(9),
            ..Keeper::default()
        };
        assert_eq!(k.round(gone(), Some(9), set(&server), no_pause), None);
        assert_eq!(k.round(gone(), Some(9), set(&server), no_pause), None);
        assert_eq!(k.round(Ok(()), Some(9), set(&server), no_pause), None);
        assert_eq!(k.failures, 0);
        assert_eq!(k.round(gone(), Some(9), set(&server), no_pause), None);
        assert_eq!(k.round(gone(), Some(9), set(&server), no_pause), None);
        assert_eq!(k.round(gone(), Some(9), set(&server), no_pause), Some(LOST));
    }

    #[test]
    fn reconnects_are_read_from_cifs_stats() {
        let stats = "Resources in use\nCIFS Session: 1\nOperations (MIDs): 0\n\n\
                     1 session 2 share reconnects\nTotal vfs operations: 479\n";
        assert_eq!(parse_reconnects(stats), Some(3));
        assert_eq!(parse_reconnects("0 session 0 share reconnects"), Some(0));
        assert_eq!(parse_reconnects("x session 0 share reconnects"), None);
        assert_eq!(parse_reconnects("Resources in use\n"), None);
    }
}
