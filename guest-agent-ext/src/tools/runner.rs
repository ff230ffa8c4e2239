//! The tool runner process: the agent's binary started again by `main()` (argv[0]
//! `cnfs-tool-runner`) before the agent's capability drop and system call filter, since a
//! filtered process can never exec. It keeps the capabilities its tools need and CAP_SETPCAP,
//! bounding set included, and narrows each tool's bounding set to that tool's own
//! ([`Tool::capabilities`]) before exec, so a tool run as root gets exactly those; and it
//! installs a deny-list filter of its own (an allowlist for glibc, OpenSSL, argon2's threads,
//! libdevmapper and Go's runtime would not be maintainable), which the tools inherit.
//!
//! It serves one request per SEQPACKET message, each on a thread of its own (at most
//! [`MAX_CONCURRENT`]), and dies with the agent (PR_SET_PDEATHSIG), its tools with it. The
//! exception is a daemon (gocryptfs), which serves a volume for as long as it is mounted and
//! so must outlive both: see [`run_daemon`].

use std::io::{IoSliceMut, Read as _, Write as _};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use caps::Capability;
use clap::Parser;
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::sys::socket::{recvmsg, send, ControlMessageOwned, MsgFlags, UnixAddr};
use nix::unistd::Pid;
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};
use slog::{error, info, warn, Logger};
use zeroize::{Zeroize as _, Zeroizing};

use super::command::{
    check_format_target, check_mkfs_target, Command, Refusal, Tool, LOCK_HOLDER_ARGV0,
    PASSED_FD_PLACEHOLDER,
};
use super::{Exit, Reply, RequestHeader, DEFAULT_TOOLS_DIR, MAX_CONCURRENT, MAX_KEY, MAX_OUTPUT};
use super::{MAX_REQUEST, RUNNER_ARGV0};

#[derive(Parser, Debug)]
#[command(name = RUNNER_ARGV0, about = "CNFS tool runner (started by cnfs-agent only)")]
struct Args {
    /// The runner's end of the agent's SEQPACKET socket (inherited).
    #[arg(long)]
    socket_fd: RawFd,
    /// The agent's pid: the runner stops at once if it is not its parent any more.
    #[arg(long)]
    parent_pid: i32,
    #[arg(long, default_value = DEFAULT_TOOLS_DIR)]
    tools_dir: PathBuf,
    /// Install no system call filter (the agent runs with --no-seccomp).
    #[arg(long)]
    no_seccomp: bool,
    /// Tests only, never passed by the agent: a directory standing in for /sys when checking
    /// a loop device's backing file before a format.
    #[arg(long, hide = true)]
    test_sysfs_root: Option<PathBuf>,
}

/// What every request thread needs.
struct Config {
    tools_dir: PathBuf,
    sysfs_root: PathBuf,
    runner_pid: Pid,
}

/// The calls the runner and its tools may not make (EPERM); everything else is allowed.
const DENIED: &[libc::c_long] = &[
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_chroot,
    libc::SYS_acct,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
];

/// The runner's filter: the [`DENIED`] calls EPERM, anything else allowed.
pub fn deny_program() -> Result<BpfProgram, seccompiler::Error> {
    let rules = DENIED
        .iter()
        .map(|&nr| (nr, Vec::<SeccompRule>::new()))
        .collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )?;
    Ok(filter.try_into()?)
}

/// The runner's `main`; returns the exit status.
pub fn run(argv: Vec<String>) -> i32 {
    let args = match Args::try_parse_from(argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{RUNNER_ARGV0}: {e}");
            return 2;
        }
    };
    let (log, _flush) = crate::logging::logger(slog::Level::Info);
    let log = log.new(slog::o!("part" => RUNNER_ARGV0));
    match start(&args, &log) {
        Ok(socket) => {
            let config = Config {
                tools_dir: args.tools_dir,
                sysfs_root: args.test_sysfs_root.unwrap_or_else(|| "/sys".into()),
                runner_pid: nix::unistd::getpid(),
            };
            serve(&socket, Arc::new(config), &log)
        }
        Err(e) => {
            error!(log, "tool runner not started"; "error" => e);
            1
        }
    }
}

/// Checks the parent, takes the socket, drops privileges and installs the filter.
fn start(args: &Args, log: &Logger) -> Result<OwnedFd, String> {
    // The agent may have died before the child set PR_SET_PDEATHSIG: then nobody kills us.
    if nix::unistd::getppid().as_raw() != args.parent_pid {
        return Err(format!(
            "the agent (pid {}) is not the parent any more",
            args.parent_pid
        ));
    }
    let fd = args.socket_fd;
    let open = fcntl(fd, FcntlArg::F_GETFD).is_ok();
    if fd <= 2 || !open {
        return Err(format!("--socket-fd {fd}: not an open descriptor above 2"));
    }
    // SAFETY: the agent made this descriptor for this process alone and passed its number;
    // it is open (checked above) and nothing else in this fresh process owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // The tools must not inherit it.
    fcntl(socket.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map_err(|e| format!("--socket-fd {fd}: {e}"))?;
    // This fresh process owns nothing but 0-2 and the socket; anything else open was leaked
    // by whoever started the agent and must not reach the tools.
    let fd = libc::c_uint::try_from(fd).map_err(|_| format!("--socket-fd {fd}: negative"))?;
    if !(close_range(3, fd - 1) && close_range(fd + 1, libc::c_uint::MAX)) {
        warn!(
            log,
            "tool runner: close_range failed; inherited descriptors stay open"
        );
    }
    let kept = crate::privileges::drop_all_but(&runner_capabilities())
        .map_err(|e| format!("dropping capabilities: {e}"))?;
    if args.no_seccomp {
        info!(log, "tool runner started without its system call filter (--no-seccomp)";
            "kept" => kept.join(","));
    } else {
        let prog = deny_program().map_err(|e| format!("building the system call filter: {e}"))?;
        seccompiler::apply_filter_all_threads(&prog)
            .map_err(|e| format!("installing the system call filter: {e}"))?;
        info!(log, "tool runner started"; "kept" => kept.join(","), "denied_calls" => DENIED.len());
    }
    Ok(socket)
}

/// What the runner keeps: every tool's capabilities, and CAP_SETPCAP to narrow each tool's
/// bounding set to its own before exec.
fn runner_capabilities() -> Vec<Capability> {
    let mut keep = vec![Capability::CAP_SETPCAP];
    for tool in Tool::ALL {
        for &c in tool.capabilities() {
            if !keep.contains(&c) {
                keep.push(c);
            }
        }
    }
    keep
}

/// The capabilities (by number) the runner holds and `tool` must not: dropped from the
/// tool's bounding set between fork and exec, so that the tool, running as root, gets exactly
/// its own.
fn dropped_for(tool: Tool) -> Vec<libc::c_ulong> {
    runner_capabilities()
        .into_iter()
        .filter(|c| !tool.capabilities().contains(c))
        .map(|c| libc::c_ulong::from(c.index()))
        .collect()
}

/// In a forked child before exec: drops `caps` from the bounding set.
fn drop_bounding(caps: &[libc::c_ulong]) -> std::io::Result<()> {
    for &cap in caps {
        // SAFETY: prctl(2) with integer arguments only; async-signal-safe, touches no memory.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// close_range(2) of `first..=last` (nothing when `first > last`); false on failure.
fn close_range(first: libc::c_uint, last: libc::c_uint) -> bool {
    if first > last {
        return true;
    }
    let flags: libc::c_uint = 0;
    // SAFETY: close_range(2) takes three integers and touches no memory; the range excludes
    // 0-2 and the socket, and nothing else in this fresh process owns a descriptor.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first, last, flags) };
    rc == 0
}

/// Receives requests until the agent closes its end.
fn serve(socket: &OwnedFd, config: Arc<Config>, log: &Logger) -> i32 {
    let active = Arc::new(AtomicUsize::new(0));
    let mut buf = Zeroizing::new(vec![0u8; MAX_REQUEST]);
    loop {
        let mut cmsg = nix::cmsg_space!([RawFd; 4]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let received = recvmsg::<UnixAddr>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            // Received descriptors must not reach the tools of other requests.
            MsgFlags::MSG_CMSG_CLOEXEC,
        );
        let msg = match received {
            Ok(m) => m,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                error!(log, "tool runner: receiving"; "error" => %e);
                return 1;
            }
        };
        let (len, truncated) = (
            msg.bytes.min(MAX_REQUEST),
            msg.flags.contains(MsgFlags::MSG_TRUNC),
        );
        let mut fds: Vec<OwnedFd> = Vec::new();
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    for fd in raw {
                        // SAFETY: the kernel installed this descriptor in this process just
                        // now, for this message; nothing else owns it.
                        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
            }
        }
        let mut fds = fds.into_iter();
        let (reply, passed) = (fds.next(), fds.next());
        let Some(reply) = reply else {
            if len == 0 {
                info!(log, "tool runner: the agent closed its socket; stopping");
                return 0;
            }
            warn!(
                log,
                "tool runner: a request without a reply socket, ignored"
            );
            continue;
        };
        // Any further descriptors are closed here.
        drop(fds);
        let parsed = parse(&buf[..len], truncated);
        // The key now lives in the request (wiped when it is dropped) and nowhere else.
        buf[..len].zeroize();
        let request = match parsed {
            Ok(r) => r,
            Err(e) => {
                send_reply(&reply, &e);
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONCURRENT {
            active.fetch_sub(1, Ordering::SeqCst);
            send_reply(
                &reply,
                &Reply::Busy {
                    limit: MAX_CONCURRENT,
                },
            );
            continue;
        }
        let slot = Slot(active.clone());
        let cfg = config.clone();
        let thread_log = log.clone();
        let (header, key) = request;
        let spawned = std::thread::Builder::new()
            .name("tool".into())
            .spawn(move || {
                let _slot = slot;
                if let Some(answer) = handle(&header, &key, passed, &reply, &cfg, &thread_log) {
                    send_reply(&reply, &answer);
                }
            });
        if let Err(e) = spawned {
            // The closure, with the reply socket, is gone: the agent sees EOF.
            error!(log, "tool runner: starting a request thread"; "error" => %e);
        }
    }
}

/// Frees a request's place when its thread ends, however it ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

type Request = (RequestHeader, Zeroizing<Vec<u8>>);

fn parse(msg: &[u8], truncated: bool) -> Result<Request, Reply> {
    let invalid = |reason: String| Reply::Invalid {
        field: "request".into(),
        reason,
    };
    if truncated {
        return Err(invalid(format!("is longer than {MAX_REQUEST} bytes")));
    }
    let (len, rest) = msg
        .split_first_chunk::<4>()
        .ok_or_else(|| invalid("is shorter than its length prefix".into()))?;
    let len = u32::from_le_bytes(*len) as usize;
    let (header, key) = (rest.get(..len), rest.get(len..));
    let (Some(header), Some(key)) = (header, key) else {
        return Err(invalid("header length beyond the message".into()));
    };
    let header: RequestHeader =
        serde_json::from_slice(header).map_err(|e| invalid(format!("unreadable header: {e}")))?;
    let want = header.key_len.map_or(0, |n| n as usize);
    if key.len() != want || want > MAX_KEY {
        return Err(invalid(format!(
            "carries {} key bytes, its header says {want} (at most {MAX_KEY})",
            key.len()
        )));
    }
    Ok((header, Zeroizing::new(key.to_vec())))
}

fn send_reply(reply: &OwnedFd, answer: &Reply) {
    if let Ok(bytes) = serde_json::to_vec(answer) {
        // A caller that went away gets nothing; that is fine.
        let _ = send(reply.as_raw_fd(), &bytes, MsgFlags::MSG_NOSIGNAL);
    }
}

/// Checks a request and runs its tool; `None` when the caller went away.
fn handle(
    header: &RequestHeader,
    key: &[u8],
    passed: Option<OwnedFd>,
    reply: &OwnedFd,
    cfg: &Config,
    log: &Logger,
) -> Option<Reply> {
    let cmd = &header.command;
    if let Err(e) = check(
        cmd,
        header.key_len.map(|n| n as usize),
        key,
        &cfg.sysfs_root,
    ) {
        return Some(refusal_reply(e));
    }
    let fd_field = cmd.passed_fd_field();
    match (cmd.is_daemon(), passed) {
        (true, None) => {
            return Some(Reply::Invalid {
                field: fd_field,
                reason: "is required: the daemon takes the descriptor sent with it".into(),
            })
        }
        (false, Some(_)) => {
            return Some(Reply::Invalid {
                field: fd_field,
                reason: "must not be sent: this command takes no descriptor".into(),
            })
        }
        (true, Some(fd)) => {
            let checked = match cmd {
                Command::HoldLock { .. } => check_pipe(&fd, &fd_field),
                _ => check_fuse_device(&fd, &fd_field),
            };
            if let Err(e) = checked {
                return Some(refusal_reply(e));
            }
            return match run_daemon(cmd, key, fd, reply, cfg, log) {
                // `Started` went out before anything could report its exit.
                Ok(()) => None,
                Err(e) => {
                    warn!(log, "tool runner: could not start the daemon"; "op" => cmd.op(), "error" => %e);
                    Some(Reply::Failed {
                        reason: format!("starting {}: {e}", cmd.tool().name()),
                    })
                }
            };
        }
        (false, None) => {}
    }
    let deadline = Duration::from_millis(header.deadline_ms);
    match run_tool(cmd, key, deadline, reply, cfg) {
        Ok(answer) => answer,
        Err(e) => {
            warn!(log, "tool runner: could not run the tool"; "op" => cmd.op(), "error" => %e);
            Some(Reply::Failed {
                reason: format!("starting {}: {e}", cmd.tool().name()),
            })
        }
    }
}

fn refusal_reply(e: Refusal) -> Reply {
    match e {
        Refusal::Invalid(e) => Reply::Invalid {
            field: e.field,
            reason: e.reason,
        },
        Refusal::Refused(reason) => Reply::Refused { reason },
    }
}

/// The descriptor a daemon is to serve must be an open `/dev/fuse` (10:229).
fn check_fuse_device(fd: &OwnedFd, field: &str) -> Result<(), Refusal> {
    let st = nix::sys::stat::fstat(fd.as_raw_fd())
        .map_err(|e| Refusal::Refused(format!("{field}: fstat: {}", e.desc())))?;
    let is_char = st.st_mode & libc::S_IFMT == libc::S_IFCHR;
    let (major, minor) = (libc::major(st.st_rdev), libc::minor(st.st_rdev));
    if is_char && (major, minor) == (10, 229) {
        Ok(())
    } else {
        Err(Refusal::Refused(format!(
            "{field}: is not /dev/fuse (device {major}:{minor}); refusing to serve it"
        )))
    }
}

/// The descriptor a lock holder reports on must be a pipe (the agent reads the other end).
fn check_pipe(fd: &OwnedFd, field: &str) -> Result<(), Refusal> {
    let st = nix::sys::stat::fstat(fd.as_raw_fd())
        .map_err(|e| Refusal::Refused(format!("{field}: fstat: {}", e.desc())))?;
    if st.st_mode & libc::S_IFMT == libc::S_IFIFO {
        Ok(())
    } else {
        Err(Refusal::Refused(format!(
            "{field}: is not a pipe; refusing to hand it to the lock holder"
        )))
    }
}

/// The request's parameters, its key and the device it may touch. A gocryptfs key with a
/// newline or NUL would be cut short silently (the agent refuses such keys first; this is
/// the runner's own guard).
fn check(
    cmd: &Command,
    key_len: Option<usize>,
    key: &[u8],
    sysfs_root: &Path,
) -> Result<(), Refusal> {
    cmd.validate(key_len).map_err(Refusal::Invalid)?;
    if cmd.tool() == Tool::Gocryptfs && key.iter().any(|b| *b == b'\n' || *b == 0) {
        return Err(Refusal::Invalid(cnfs_protocols::spec::SpecError {
            field: format!("{}.key", cmd.op()),
            reason: "gocryptfs reads it as one line: no newline or NUL byte".into(),
        }));
    }
    match cmd {
        Command::LuksFormat { device, .. } => check_format_target(sysfs_root, *device)?,
        Command::Mkfs { name, .. } => check_mkfs_target(sysfs_root, name)?,
        _ => {}
    }
    Ok(())
}

/// The process for `tool`: through the loader in `<dir>/lib` when there is one (the shipped
/// layout, design §1.5), else `<dir>/bin/<name>` exec'd directly, which lets tests use
/// shell-script fakes.
fn program(tools_dir: &Path, tool: Tool) -> std::process::Command {
    if tool == Tool::LockHolder {
        // The runner's own binary (the agent's), in its holder role.
        let mut c = std::process::Command::new("/proc/self/exe");
        c.arg0(LOCK_HOLDER_ARGV0);
        return c;
    }
    let lib = tools_dir.join("lib");
    let loader = lib.join("ld-linux-x86-64.so.2");
    let bin = tools_dir.join("bin").join(tool.name());
    if loader.exists() {
        let mut c = std::process::Command::new(loader);
        c.arg("--inhibit-cache")
            .arg("--library-path")
            .arg(lib)
            .arg("--argv0")
            .arg(tool.name())
            .arg(bin);
        c
    } else {
        let mut c = std::process::Command::new(bin);
        c.arg0(tool.name());
        c
    }
}

/// Runs the tool to its end, its deadline, or the caller's going away.
fn run_tool(
    cmd: &Command,
    key: &[u8],
    deadline: Duration,
    reply: &OwnedFd,
    cfg: &Config,
) -> std::io::Result<Option<Reply>> {
    let started = Instant::now();
    let until = started + deadline;
    let (out_rx, out_tx) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let mut child = {
        let mut c = program(&cfg.tools_dir, cmd.tool());
        c.args(cmd.args())
            .env_clear()
            .env("LC_ALL", "C")
            // libdevmapper makes /dev/mapper nodes itself, with or without udev in the guest.
            .env("DM_DISABLE_UDEV", "1")
            .env("PATH", "/nonexistent")
            .current_dir("/")
            // Its own group, so a kill also reaches anything it started.
            .process_group(0)
            .stdin(if cmd.takes_key() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            // One pipe for both: `--version` answers on stdout, errors come on stderr.
            .stdout(Stdio::from(out_tx.try_clone()?))
            .stderr(Stdio::from(out_tx));
        let runner = cfg.runner_pid;
        let dropped = dropped_for(cmd.tool());
        let pre_exec = move || {
            drop_bounding(&dropped)?;
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            // The runner may have died before prctl: then the kernel would never kill us.
            if nix::unistd::getppid() != runner {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        };
        // SAFETY: the closure runs between fork and exec and makes only prctl(2) and
        // getppid(2), both async-signal-safe; it reads a Vec made before the fork, allocates
        // nothing and takes no lock.
        unsafe { c.pre_exec(pre_exec) };
        // `c`, holding the pipe's write ends, is dropped at the end of this block, so the
        // read end sees EOF once the tool's copies close.
        c.spawn()?
    };
    let stdin = child.stdin.take();
    let mut tool = Running {
        child,
        stdin,
        key,
        written: 0,
        out: Some(std::fs::File::from(out_rx)),
        kept: Vec::with_capacity(MAX_OUTPUT + key.len()),
        total: 0,
    };
    if let Some(s) = &tool.stdin {
        fcntl(s.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
    }
    if let Some(o) = &tool.out {
        fcntl(o.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
    }
    let pidfd = cnfs_protocols::pidfd::open(tool.child.id()).ok();
    let ended = tool.wait(pidfd.as_ref(), reply, until);
    let exit = match ended {
        Ended::Exited => None,
        Ended::CallerGone => {
            tool.kill_and_reap();
            return Ok(None);
        }
        Ended::Deadline => {
            tool.kill();
            // A moment for the killed tool to be gone before the answer: the agent takes
            // the stack down next, and a cryptsetup still finishing a mapping behind its
            // back would leave one. (Stuck in the kernel, it is answered for anyway.)
            let _ = tool.wait(pidfd.as_ref(), reply, Instant::now() + KILL_GRACE);
            Some(Exit::TimedOut)
        }
    };
    tool.drain();
    let stderr = printable_output(&tool.kept, key, tool.total);
    if let Some(exit) = exit {
        // Answer first: a tool stuck in the kernel may take a while to go.
        send_reply(
            reply,
            &Reply::Done {
                exit,
                stderr,
                duration_ms: millis(started.elapsed()),
            },
        );
        let _ = tool.child.wait();
        return Ok(None);
    }
    let status = tool.child.wait()?;
    let exit = match (status.code(), status.signal()) {
        (Some(code), _) => Exit::Code(code),
        (None, Some(sig)) => Exit::Signal(sig),
        (None, None) => Exit::Code(-1),
    };
    Ok(Some(Reply::Done {
        exit,
        stderr,
        duration_ms: millis(started.elapsed()),
    }))
}

/// Starts a daemon taking `passed` (gocryptfs: the FUSE device it serves; the lock holder:
/// the pipe it reports on) and returns its pid. It gets the key, if any, on stdin (then
/// EOF), no output channel (/dev/null: a Go program dies of SIGPIPE when it writes to
/// a pipe nobody reads, and its messages may carry names of the volume's files), a session
/// of its own and no parent-death signal, so that it outlives the runner and the agent: only
/// the unmount of its FUSE mount (the holder: a kill by the agent) ends it. A thread waits for it and sends its exit on
/// `reply` while the agent still listens (how a wrong key is told from a mount that serves).
/// `Started` is sent here, before that thread exists.
fn run_daemon(
    cmd: &Command,
    key: &[u8],
    passed: OwnedFd,
    reply: &OwnedFd,
    cfg: &Config,
    log: &Logger,
) -> std::io::Result<()> {
    let started = Instant::now();
    let passed_raw = passed.as_raw_fd();
    let args: Vec<String> = cmd
        .args()
        .into_iter()
        .map(|a| {
            if a == PASSED_FD_PLACEHOLDER {
                format!("/dev/fd/{passed_raw}")
            } else {
                a
            }
        })
        .collect();
    let mut c = program(&cfg.tools_dir, cmd.tool());
    c.args(args)
        .env_clear()
        .env("LC_ALL", "C")
        .env("PATH", "/nonexistent")
        .current_dir("/")
        .stdin(if cmd.takes_key() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let dropped = dropped_for(cmd.tool());
    let pre_exec = move || {
        drop_bounding(&dropped)?;
        nix::unistd::setsid()?;
        // The one descriptor it takes survives exec, under the same number.
        fcntl(passed_raw, FcntlArg::F_SETFD(FdFlag::empty()))?;
        Ok(())
    };
    // SAFETY: the closure runs between fork and exec and makes only prctl(2), setsid(2) and
    // fcntl(2), all async-signal-safe; it reads a Vec made before the fork, allocates
    // nothing and takes no lock.
    unsafe { c.pre_exec(pre_exec) };
    let mut child = c.spawn()?;
    drop(passed);
    let pid = child.id();
    if let Some(mut stdin) = child.stdin.take() {
        // At most MAX_KEY bytes: within a pipe's buffer. A daemon that already exited
        // (EPIPE) is reported by its exit below.
        let _ = stdin.write_all(key);
    }
    // Answered now, before the waiter below can send the daemon's exit.
    send_reply(reply, &Reply::Started { pid });
    let reply = reply.try_clone()?;
    let (log, op) = (log.clone(), cmd.op());
    std::thread::Builder::new()
        .name("daemon-wait".into())
        .spawn(move || {
            let exit = match child.wait() {
                Ok(status) => match (status.code(), status.signal()) {
                    (Some(code), _) => Exit::Code(code),
                    (None, Some(sig)) => Exit::Signal(sig),
                    (None, None) => Exit::Code(-1),
                },
                Err(_) => Exit::Code(-1),
            };
            info!(log, "tool runner: daemon ended"; "op" => op, "pid" => pid,
                "exit" => format!("{exit:?}"));
            send_reply(
                &reply,
                &Reply::Done {
                    exit,
                    stderr: String::new(),
                    duration_ms: millis(started.elapsed()),
                },
            );
        })?;
    Ok(())
}

/// How long a tool killed at its deadline is waited for before the answer.
const KILL_GRACE: Duration = Duration::from_secs(2);

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

enum Ended {
    Exited,
    Deadline,
    CallerGone,
}

/// A started tool and its pipes.
struct Running<'k> {
    child: Child,
    stdin: Option<ChildStdin>,
    key: &'k [u8],
    written: usize,
    out: Option<std::fs::File>,
    /// Up to [`MAX_OUTPUT`] bytes, plus a key's length so that a key starting within the
    /// limit is redacted whole.
    kept: Vec<u8>,
    total: usize,
}

/// Without a pidfd (Linux < 5.3), how often the tool's exit is checked.
const EXIT_POLL: Duration = Duration::from_millis(50);

impl Running<'_> {
    /// Feeds stdin, collects output, and waits for the tool's exit (or why it must die).
    fn wait(&mut self, pidfd: Option<&OwnedFd>, reply: &OwnedFd, until: Instant) -> Ended {
        loop {
            if self.stdin.is_some() && self.written >= self.key.len() {
                // EOF: cryptsetup reads the key file to its end.
                self.stdin = None;
            }
            let now = Instant::now();
            if now >= until {
                return Ended::Deadline;
            }
            let mut wait = until - now;
            if pidfd.is_none() {
                wait = wait.min(EXIT_POLL);
            }
            let timeout = PollTimeout::try_from(wait.min(Duration::from_secs(1)))
                .unwrap_or(PollTimeout::ZERO);
            // Fixed slots: 0 the caller's reply socket (hang-up only), 1 the tool's exit,
            // 2 its output, 3 its stdin.
            let mut fds = Vec::with_capacity(4);
            fds.push(PollFd::new(reply.as_fd(), PollFlags::empty()));
            let mut slot = [None; 3];
            if let Some(p) = pidfd {
                slot[0] = Some(fds.len());
                fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
            }
            if let Some(o) = &self.out {
                slot[1] = Some(fds.len());
                fds.push(PollFd::new(o.as_fd(), PollFlags::POLLIN));
            }
            if let Some(s) = &self.stdin {
                slot[2] = Some(fds.len());
                fds.push(PollFd::new(s.as_fd(), PollFlags::POLLOUT));
            }
            match poll(&mut fds, timeout) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(_) => return Ended::CallerGone,
            }
            let ready = |i: Option<usize>| {
                i.and_then(|i| fds.get(i))
                    .and_then(|f| f.revents())
                    .is_some_and(|r| !r.is_empty())
            };
            let caller_gone = ready(Some(0));
            let (exited, out_ready, in_ready) = (ready(slot[0]), ready(slot[1]), ready(slot[2]));
            drop(fds);
            if caller_gone {
                return Ended::CallerGone;
            }
            if out_ready {
                self.read_some();
            }
            if in_ready {
                self.write_some();
            }
            if exited || (pidfd.is_none() && matches!(self.child.try_wait(), Ok(Some(_)))) {
                return Ended::Exited;
            }
        }
    }

    fn write_some(&mut self) {
        let Some(stdin) = &mut self.stdin else { return };
        match stdin.write(&self.key[self.written..]) {
            Ok(n) => self.written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // EPIPE: the tool closed its stdin or exited; the rest of the key is not needed.
            Err(_) => self.stdin = None,
        }
    }

    /// Reads what is there; false once the pipe is at EOF or empty for now.
    fn read_some(&mut self) -> bool {
        let Some(out) = &mut self.out else {
            return false;
        };
        let mut chunk = [0u8; 4096];
        match out.read(&mut chunk) {
            Ok(0) => {
                self.out = None;
                false
            }
            Ok(n) => {
                let room = (MAX_OUTPUT + self.key.len()).saturating_sub(self.kept.len());
                self.kept.extend_from_slice(&chunk[..n.min(room)]);
                self.total += n;
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(_) => {
                self.out = None;
                false
            }
        }
    }

    /// Reads what the tool left in the pipe (not waiting for anything it started that still
    /// holds the pipe open).
    fn drain(&mut self) {
        while self.read_some() {}
    }

    fn kill(&mut self) {
        self.stdin = None;
        // The group is the tool's pid (process_group(0)).
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = self.child.kill();
    }

    fn kill_and_reap(&mut self) {
        self.kill();
        let _ = self.child.wait();
    }
}

/// The tool's output for the reply: the first [`MAX_OUTPUT`] bytes with every copy of the key
/// replaced by `<redacted>`, then control characters (but newline and tab) escaped.
pub fn printable_output(kept: &[u8], key: &[u8], total: usize) -> String {
    const MARK: &[u8] = b"<redacted>";
    let mut bytes = Vec::with_capacity(kept.len());
    let mut i = 0;
    // A copy starting within the limit is replaced whole: `kept` holds a key's length more.
    while i < kept.len().min(MAX_OUTPUT) {
        if !key.is_empty() && kept[i..].starts_with(key) {
            bytes.extend_from_slice(MARK);
            i += key.len();
        } else {
            bytes.push(kept[i]);
            i += 1;
        }
    }
    let text = String::from_utf8_lossy(&bytes);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c == '\n' || c == '\t' || !c.is_control() {
            out.push(c);
        } else {
            out.extend(c.escape_default());
        }
    }
    if total > i {
        out.push_str(&format!("\n[{} more bytes of output not kept]", total - i));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::killable::{self, Outcome};

    #[test]
    fn every_copy_of_the_key_is_redacted_even_across_the_limit() {
        let key = b"s3cr3t";
        let all = b"a s3cr3t b s3cr3ts3cr3t\x1b[0m\n";
        let out = printable_output(all, key, all.len());
        assert_eq!(out, "a <redacted> b <redacted><redacted>\\u{1b}[0m\n");
        // A copy that starts just inside the limit, with the bytes kept past it.
        let mut long = vec![b'x'; MAX_OUTPUT - 2];
        long.extend_from_slice(key);
        let out = printable_output(&long, key, long.len() + 100);
        assert!(
            out.ends_with("xx<redacted>\n[100 more bytes of output not kept]"),
            "{out}"
        );
        assert!(!out.contains("s3"), "a piece of the key is left");
    }

    #[tokio::test]
    async fn the_runner_filter_refuses_mounts_and_namespaces_but_not_the_rest() {
        let prog = deny_program().expect("compiles");
        let outcome = killable::run(Duration::from_secs(5), move || {
            // In a forked child, so the test process keeps no filter.
            seccompiler::apply_filter(&prog).map_err(|_| Errno::EINVAL)?;
            let errno = |r: nix::Result<()>| r.err().map_or(0, |e| e as i32 as u64);
            let unshare = errno(nix::sched::unshare(nix::sched::CloneFlags::empty()));
            let umount = errno(nix::mount::umount2(
                c"/nonexistent-cnfs",
                nix::mount::MntFlags::empty(),
            ));
            let pid = nix::unistd::getpid().as_raw();
            Ok([unshare, umount, u64::from(pid > 0), 0, 0, 0])
        })
        .await;
        let Outcome::Done([unshare, umount, pid_ok, _, _, _]) = outcome else {
            panic!("child failed: {outcome:?}");
        };
        assert_eq!(unshare as i32, libc::EPERM, "unshare was not refused");
        // Without the filter this would be ENOENT.
        assert_eq!(umount as i32, libc::EPERM, "umount2 was not refused");
        assert_eq!(pid_ok, 1, "an allowed call failed");
    }
}
