//! Runs one blocking system call (mount, umount2, statfs) in a forked child process with a
//! deadline. A hung NFS or Ceph server can leave a call asleep in the kernel for minutes;
//! in a child, the caller stops waiting at the deadline and SIGKILL ends the call (the
//! network file systems wait killably), so no thread of the agent is ever stuck and no late
//! success can appear after the caller was told "timed out".
//!
//! The child keeps only what the call needs: every descriptor but its answer pipe is closed
//! (a hung child must not hold the agent's listening sockets or its callers' connections,
//! or a restarted agent could not bind its port and callers would see no EOF), every signal
//! is back to its default disposition and unblocked, and it dies with the agent
//! (`PR_SET_PDEATHSIG`), so an agent that is killed or stopped leaves no mount behind that
//! could complete after it is gone.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::resource::{getrlimit, Resource};
use nix::sys::signal::{kill, sigprocmask, SigSet, SigmaskHow, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::{fork, pipe, ForkResult, Pid};
use tokio::io::AsyncReadExt;

/// What a call may hand back: a few integers (statfs figures), nothing that allocates.
pub type Payload = [u64; 6];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done(Payload),
    Failed(Errno),
    TimedOut,
}

const MSG_LEN: usize = 1 + 4 + 8 * 6;

/// Runs `op` in a child and waits at most `timeout` for its answer.
///
/// `op` runs after `fork()` in a multi-threaded process, so it must only make system calls:
/// no allocation, no locks, no logging. Prepare every `CString` before calling.
pub async fn run<F>(timeout: Duration, op: F) -> Outcome
where
    F: FnOnce() -> Result<Payload, Errno>,
{
    run_keeping(timeout, None, op).await
}

/// [`run`], with descriptor `keep` left open in the child: a FUSE mount names the
/// `/dev/fuse` descriptor it is served through (`fd=`), which must be open when mount(2)
/// runs.
pub async fn run_keeping<F>(timeout: Duration, keep: Option<RawFd>, op: F) -> Outcome
where
    F: FnOnce() -> Result<Payload, Errno>,
{
    let (outcome, alive) = run_tracked(timeout, keep, op).await;
    if let Some(alive) = alive {
        tokio::spawn(alive);
    }
    outcome
}

/// Resolves once a child that outlived its call has exited and been reaped.
pub type StillAlive = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// [`run_keeping`], also handing back the child when it did not exit within a short grace
/// after SIGKILL. Most waits end at SIGKILL, but not all: a FUSE request its daemon has read
/// waits for the answer uninterruptibly, so a hung daemon keeps the child. A caller that
/// probes repeatedly keeps this and forks no second child while it is pending.
pub async fn run_tracked<F>(
    timeout: Duration,
    keep: Option<RawFd>,
    op: F,
) -> (Outcome, Option<StillAlive>)
where
    F: FnOnce() -> Result<Payload, Errno>,
{
    let (rx, tx) = match pipe() {
        Ok(p) => p,
        Err(e) => return (Outcome::Failed(e), None),
    };
    let parent = nix::unistd::getpid();
    // SAFETY: the child only runs `child_hygiene`, `op` (system calls only, per the contract
    // above), write(2) and _exit(2), all async-signal-safe.
    let child = match unsafe { fork() } {
        Err(e) => return (Outcome::Failed(e), None),
        Ok(ForkResult::Child) => {
            drop(rx);
            child_hygiene(tx.as_raw_fd(), keep, parent);
            let mut msg = [0u8; MSG_LEN];
            match op() {
                Ok(p) => {
                    for (i, v) in p.iter().enumerate() {
                        msg[5 + i * 8..13 + i * 8].copy_from_slice(&v.to_le_bytes());
                    }
                }
                Err(e) => {
                    msg[0] = 1;
                    msg[1..5].copy_from_slice(&(e as i32).to_le_bytes());
                }
            }
            // A short or failed write reads as "died without answering" in the parent.
            let _ = nix::unistd::write(&tx, &msg);
            exit_child(0)
        }
        Ok(ForkResult::Parent { child }) => child,
    };
    drop(tx);
    // If this future is dropped before the answer (its caller went away), the guard kills
    // and reaps the child: no call outlives the bound it was started with.
    let mut guard = ChildGuard(Some(child));
    let outcome = match tokio::time::timeout(timeout, read_answer(rx)).await {
        Ok(Some(msg)) => decode(&msg),
        // The child died without answering (killed from outside).
        Ok(None) => Outcome::Failed(Errno::EINTR),
        Err(_) => {
            let _ = kill(child, Signal::SIGKILL);
            Outcome::TimedOut
        }
    };
    guard.0 = None;
    let mut exited = reaped(child);
    match tokio::time::timeout(REAP_GRACE, &mut exited).await {
        Ok(()) => (outcome, None),
        Err(_) => (outcome, Some(exited)),
    }
}

/// How long a caller waits for a killed child to exit before handing it back.
const REAP_GRACE: Duration = Duration::from_secs(2);

/// Kills and reaps a child whose waiter was dropped.
struct ChildGuard(Option<Pid>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(child) = self.0.take() {
            let _ = kill(child, Signal::SIGKILL);
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(reaped(child));
                }
                // waitpid may block until the kernel lets the killed call go; not here.
                Err(_) => {
                    let _ = std::thread::Builder::new()
                        .name("reap".into())
                        .spawn(move || waitpid(child, None));
                }
            }
        }
    }
}

/// In the child, before the call: keep only the answer pipe `tx`, `keep` (and 0-2), restore
/// default signal dispositions and an empty mask, and die with the agent. Only
/// async-signal-safe system calls, nothing allocated.
fn child_hygiene(tx: RawFd, keep: Option<RawFd>, parent: Pid) {
    close_all_but(tx, keep);
    // nix's Signal covers only the standard signals; the loop also resets the real-time ones.
    // SAFETY: a plain struct of integers and a function pointer slot, for which all-zero is
    // valid: SIG_DFL, no flags, an empty mask, no restorer.
    let act: libc::sigaction = unsafe { std::mem::zeroed() };
    for sig in 1..libc::SIGRTMAX() {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            // SAFETY: installs the default disposition (no handler of ours runs); `act` lives
            // on the stack for the call; a null old-action pointer is allowed.
            unsafe { libc::sigaction(sig, &act, std::ptr::null_mut()) };
        }
    }
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    // The agent may have died between fork and prctl: then nobody would ever kill us.
    if nix::unistd::getppid() != parent {
        exit_child(1);
    }
}

/// Ends the forked child at once: _exit(2), not `std::process::exit`, which would run the
/// parent's atexit handlers and flush its stdio buffers (locks and allocation) in the child.
fn exit_child(status: libc::c_int) -> ! {
    // SAFETY: _exit(2) takes an integer, touches no memory of ours and never returns.
    unsafe { libc::_exit(status) }
}

/// Closes every descriptor from 3 up except `tx` and `also` (close_range(2); a loop on
/// kernels before 5.9). Only for the freshly forked child: it closes descriptors that objects
/// in the copy of the agent's memory still think they own.
fn close_all_but(tx: RawFd, also: Option<RawFd>) {
    let as_u = |fd: RawFd| libc::c_uint::try_from(fd).unwrap_or(libc::c_uint::MAX);
    // Sorted on the stack: nothing is allocated in the child.
    let mut keep = [as_u(tx), also.map_or(as_u(tx), as_u)];
    keep.sort_unstable();
    let mut ok = true;
    let mut next: libc::c_uint = 3;
    for k in keep {
        if k >= next {
            if k > next {
                ok &= close_range(next, k - 1);
            }
            next = k.saturating_add(1);
        }
    }
    ok &= close_range(next, libc::c_uint::MAX);
    if ok {
        return;
    }
    let max = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, _)) => soft.min(65_536) as RawFd,
        Err(_) => 4096,
    };
    for fd in 3..max {
        if !keep.contains(&as_u(fd)) {
            let _ = nix::unistd::close(fd);
        }
    }
}

/// close_range(2) of `first..=last`; false where the kernel does not have it.
fn close_range(first: libc::c_uint, last: libc::c_uint) -> bool {
    let flags: libc::c_uint = 0;
    // SAFETY: close_range(2) takes three integers and touches no memory; which descriptors it
    // may close is `close_all_but`'s concern. (nix 0.29 has no close_range.)
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first, last, flags) };
    rc == 0
}

async fn read_answer(rx: OwnedFd) -> Option<[u8; MSG_LEN]> {
    let mut pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(rx).ok()?;
    let mut msg = [0u8; MSG_LEN];
    pipe.read_exact(&mut msg).await.ok()?;
    Some(msg)
}

fn decode(msg: &[u8; MSG_LEN]) -> Outcome {
    if msg[0] == 1 {
        let mut e = [0u8; 4];
        e.copy_from_slice(&msg[1..5]);
        return Outcome::Failed(Errno::from_raw(i32::from_le_bytes(e)));
    }
    let mut p = [0u64; 6];
    for (i, v) in p.iter_mut().enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(&msg[5 + i * 8..13 + i * 8]);
        *v = u64::from_le_bytes(b);
    }
    Outcome::Done(p)
}

/// Resolves once `child` has exited and its status is collected. A child killed while
/// asleep in the kernel exits as soon as the kernel lets it, which may be never (a hung FUSE
/// daemon): waiting costs a registered pidfd, not a thread, however many there are. Without
/// pidfds (Linux < 5.3) a blocking thread waits instead.
fn reaped(child: Pid) -> StillAlive {
    Box::pin(async move {
        let pidfd = u32::try_from(child.as_raw())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
            .and_then(cnfs_protocols::pidfd::open)
            .and_then(cnfs_protocols::pidfd::readable_when_exited);
        match pidfd {
            Ok(fd) => {
                let _ = fd.readable().await;
                // It has exited: this returns at once.
                let _ = waitpid(child, None);
            }
            Err(_) => {
                let _ = tokio::task::spawn_blocking(move || waitpid(child, None)).await;
            }
        }
    })
}

/// Lists directory `dir` for a killable child: writes each name `matches` accepts, followed
/// by a NUL, to `out` (at most `most` names) and returns how many. Raw getdents64 into a
/// buffer on the stack: nothing is allocated, so it is safe after fork(2) in a threaded
/// process.
pub fn list_dir(
    dir: &std::ffi::CStr,
    mut matches: impl FnMut(&std::ffi::CStr) -> bool,
    most: usize,
    out: RawFd,
) -> Result<u64, Errno> {
    // SAFETY: a NUL-terminated path that outlives the call.
    let fd = unsafe {
        libc::open(
            dir.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(Errno::last());
    }
    let result = list_open_dir(fd, &mut matches, most, out);
    // SAFETY: closes the descriptor opened above; nothing uses it afterwards.
    unsafe { libc::close(fd) };
    result
}

fn list_open_dir(
    fd: RawFd,
    matches: &mut impl FnMut(&std::ffi::CStr) -> bool,
    most: usize,
    out: RawFd,
) -> Result<u64, Errno> {
    /// `struct linux_dirent64`: d_ino (8), d_off (8), d_reclen (2), d_type (1), d_name.
    const NAME_AT: usize = 19;
    #[repr(C, align(8))]
    struct Buf([u8; 8192]);
    let mut buf = Buf([0; 8192]);
    let mut listed = 0u64;
    loop {
        // SAFETY: getdents64 writes at most `len` bytes into the buffer on the stack.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.0.as_mut_ptr(), buf.0.len()) };
        let Ok(n) = usize::try_from(n) else {
            return Err(Errno::last());
        };
        if n == 0 {
            return Ok(listed);
        }
        let mut at = 0;
        while at + NAME_AT < n {
            let reclen = usize::from(u16::from_ne_bytes([buf.0[at + 16], buf.0[at + 17]]));
            if reclen <= NAME_AT || at + reclen > n {
                return Err(Errno::EIO);
            }
            let record = &buf.0[at + NAME_AT..at + reclen];
            at += reclen;
            let Ok(name) = std::ffi::CStr::from_bytes_until_nul(record) else {
                continue;
            };
            if !matches(name) {
                continue;
            }
            if listed as usize >= most {
                return Ok(listed);
            }
            let bytes = name.to_bytes_with_nul();
            // SAFETY: writes the name's bytes from the buffer above to a descriptor the
            // caller keeps open.
            let w = unsafe { libc::write(out, bytes.as_ptr().cast(), bytes.len()) };
            if usize::try_from(w).ok() != Some(bytes.len()) {
                return Err(Errno::EIO);
            }
            listed += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[tokio::test]
    async fn returns_payload_and_errno() {
        assert_eq!(
            run(Duration::from_secs(5), || Ok([1, 2, 3, 4, 5, u64::MAX])).await,
            Outcome::Done([1, 2, 3, 4, 5, u64::MAX])
        );
        assert_eq!(
            run(Duration::from_secs(5), || Err(Errno::EACCES)).await,
            Outcome::Failed(Errno::EACCES)
        );
    }

    #[tokio::test]
    async fn the_child_holds_no_descriptor_of_the_agent_and_default_signal_dispositions() {
        // A listening socket of the "agent": a hung child holding it would keep the port.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let fd = listener.as_raw_fd();
        // SAFETY: setting SIGUSR2 to ignored in this test process; nothing else uses it.
        unsafe { libc::signal(libc::SIGUSR2, libc::SIG_IGN) };
        let outcome = run(Duration::from_secs(5), move || {
            let open = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_ok();
            // nix has no query-only sigaction.
            // SAFETY: all-zero is a valid libc::sigaction (plain integers and a pointer slot).
            let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
            // SAFETY: a query (null new action) into a struct on the stack.
            unsafe { libc::sigaction(libc::SIGUSR2, std::ptr::null(), &mut old) };
            Ok([u64::from(open), old.sa_sigaction as u64, 0, 0, 0, 0])
        })
        .await;
        assert_eq!(
            outcome,
            Outcome::Done([0, libc::SIG_DFL as u64, 0, 0, 0, 0]),
            "the child kept fd {fd} open or SIGUSR2 ignored"
        );
        drop(listener);
    }

    #[tokio::test]
    async fn a_kept_descriptor_stays_open_in_the_child_and_only_that_one() {
        let a = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let kept = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let c = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let fds = [a.as_raw_fd(), kept.as_raw_fd(), c.as_raw_fd()];
        let outcome = run_keeping(Duration::from_secs(5), Some(fds[1]), move || {
            let open = |fd| u64::from(nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_ok());
            Ok([open(fds[0]), open(fds[1]), open(fds[2]), 0, 0, 0])
        })
        .await;
        assert_eq!(outcome, Outcome::Done([0, 1, 0, 0, 0, 0]), "fds {fds:?}");
    }

    #[tokio::test]
    async fn a_child_whose_waiter_is_dropped_is_killed_and_reaped() {
        let pidfile = std::env::temp_dir().join(format!("cnfs-killable-{}", std::process::id()));
        let _ = std::fs::remove_file(&pidfile);
        let path = pidfile.clone();
        // The caller gives up after 200 ms on a call bounded at 60 s.
        let waited = tokio::time::timeout(
            Duration::from_millis(200),
            run(Duration::from_secs(60), move || {
                // open/write/close from a stack buffer (a short path needs no allocation).
                let pid = nix::unistd::getpid().as_raw().to_le_bytes();
                let _ = std::fs::write(&path, pid);
                nix::unistd::pause();
                Ok([0; 6])
            }),
        )
        .await;
        assert!(waited.is_err(), "the call cannot have finished");
        let bytes = std::fs::read(&pidfile).expect("the child wrote its pid");
        let _ = std::fs::remove_file(&pidfile);
        let pid = i32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"));
        let until = Instant::now() + Duration::from_secs(5);
        while std::path::Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < until {
            // Asynchronously: the runtime reaps it (a pidfd, no thread of its own).
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "child {pid} outlived its dropped waiter"
        );
    }

    #[tokio::test]
    async fn a_call_that_never_returns_is_killed_at_the_deadline() {
        let start = Instant::now();
        let outcome = run(Duration::from_millis(300), || {
            nix::unistd::pause();
            Ok([0; 6])
        })
        .await;
        assert_eq!(outcome, Outcome::TimedOut);
        assert!(start.elapsed() < Duration::from_secs(3));
    }
}
