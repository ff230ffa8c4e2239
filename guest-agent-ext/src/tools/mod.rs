//! Running cryptsetup and mke2fs although the agent's system call filter refuses execve
//! (design encryption-luks2.md §1.3, §1.4). A filter is inherited and can never be removed,
//! so `main()` starts the agent's own binary again as the *tool runner* before the filter,
//! the capability drop and the async runtime. The runner keeps CAP_SYS_ADMIN and CAP_MKNOD
//! only, installs a deny-list filter of its own, and runs typed commands ([`Command`]) for
//! the agent over a SEQPACKET socket: the agent never names a program, an option or a path.
//!
//! One request is one message: `u32` length of a JSON header, the header (command, deadline,
//! key length), then the key's bytes, with a fresh reply socket attached (SCM_RIGHTS). The
//! runner answers on that socket, and kills the tool when the agent closes it: dropping the
//! [`ToolClient::call`] future cancels the request.

pub mod command;
pub mod holder;
pub mod runner;

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cnfs_protocols::spec::SpecError;
use nix::errno::Errno;
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
    UnixAddr,
};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use zeroize::Zeroizing;

pub use command::{Command, Tool};

use crate::error::AgentError;

/// Where the guest image keeps the tools (`bin/`) and their loader and libraries (`lib/`).
pub const DEFAULT_TOOLS_DIR: &str = "/usr/lib/cnfs/tools";
/// argv[0] that makes the agent's binary the tool runner.
pub const RUNNER_ARGV0: &str = "cnfs-tool-runner";
/// Tools running at once; one more request is answered "busy" at once.
pub const MAX_CONCURRENT: usize = 16;
/// The largest key a request carries (volume keys are 1..=1024 bytes).
pub const MAX_KEY: usize = 8192;
/// The most of a tool's output that is kept (the rest is read and dropped).
pub const MAX_OUTPUT: usize = 4096;
/// The fix for missing tools, in every message that names one.
pub const HOW_TO_GET_TOOLS: &str = "build the image with cnfs-rootfs-builder ... --luks2-tools";

/// A request message: header and key, well within the socket's buffer.
const MAX_REQUEST: usize = 4 + 2048 + MAX_KEY;
/// A reply: the output made printable can grow (an escaped byte takes up to 4 characters).
const MAX_REPLY: usize = 8 * MAX_OUTPUT + 1024;
/// How much longer than the request's deadline the agent waits for the runner's answer.
const REPLY_GRACE: Duration = Duration::from_secs(5);

/// Whether this process was started as the tool runner.
pub fn invoked_as_runner(argv0: &str) -> bool {
    argv0 == RUNNER_ARGV0
}

/// How a tool ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Exit {
    Code(i32),
    Signal(i32),
    /// Killed at the request's deadline.
    TimedOut,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolOutcome {
    pub exit: Exit,
    /// What the tool wrote to stderr and stdout (one pipe), at most [`MAX_OUTPUT`] bytes of
    /// it, every copy of the key replaced by `<redacted>`, control characters escaped.
    pub stderr: String,
    pub duration: Duration,
}

impl ToolOutcome {
    pub fn success(&self) -> bool {
        self.exit == Exit::Code(0)
    }
}

/// The JSON header of a request.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct RequestHeader {
    pub command: Command,
    pub deadline_ms: u64,
    /// Bytes of key after the header; `None` for "no key" (stdin is /dev/null).
    pub key_len: Option<u32>,
}

/// The runner's answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub(crate) enum Reply {
    Done {
        exit: Exit,
        stderr: String,
        duration_ms: u64,
    },
    Busy {
        limit: usize,
    },
    Invalid {
        field: String,
        reason: String,
    },
    Refused {
        reason: String,
    },
    Failed {
        reason: String,
    },
    /// A daemon is running (its `Done` follows on the same socket when it exits, if the
    /// agent still listens).
    Started {
        pid: u32,
    },
}

/// The agent's handle on the tool runner. Cheap to clone; every clone talks to one runner.
#[derive(Clone)]
pub struct ToolClient {
    inner: Arc<Inner>,
}

enum Inner {
    Disabled(String),
    Up(Runner),
}

struct Runner {
    tools_dir: PathBuf,
    child: Mutex<Option<std::process::Child>>,
    /// The agent's end, until the first call registers it with the async runtime (which does
    /// not exist yet when the runner is started).
    unregistered: Mutex<Option<OwnedFd>>,
    socket: tokio::sync::OnceCell<AsyncFd<OwnedFd>>,
}

impl Drop for Runner {
    fn drop(&mut self) {
        // The socket closes right after this; the runner sees EOF and exits. Reap it aside.
        if let Some(mut child) = self.child.get_mut().ok().and_then(Option::take) {
            let _ = std::thread::Builder::new()
                .name("reap-runner".into())
                .spawn(move || child.wait());
        }
    }
}

impl ToolClient {
    /// A client without a runner: every call and [`ToolClient::missing`] give `reason`.
    pub fn disabled(reason: &str) -> Self {
        ToolClient {
            inner: Arc::new(Inner::Disabled(reason.to_string())),
        }
    }

    /// Starts the runner (this binary again, as `cnfs-tool-runner`). Call it from `main()`
    /// before the async runtime, the capability drop and the system call filter.
    pub fn spawn(tools_dir: &Path, no_seccomp: bool) -> std::io::Result<ToolClient> {
        Self::spawn_with(Path::new("/proc/self/exe"), tools_dir, no_seccomp, None)
    }

    /// [`ToolClient::spawn`] with the runner's program named (tests run the built agent) and,
    /// for tests only, a directory standing in for /sys where the runner reads loop devices'
    /// backing files. The agent never passes one.
    #[doc(hidden)]
    pub fn spawn_with(
        exe: &Path,
        tools_dir: &Path,
        no_seccomp: bool,
        test_sysfs_root: Option<&Path>,
    ) -> std::io::Result<ToolClient> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        let theirs_fd = theirs.as_raw_fd();
        let mut cmd = std::process::Command::new(exe);
        cmd.arg0(RUNNER_ARGV0)
            .arg("--socket-fd")
            .arg(theirs_fd.to_string())
            .arg("--parent-pid")
            .arg(std::process::id().to_string())
            .arg("--tools-dir")
            .arg(tools_dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit());
        if no_seccomp {
            cmd.arg("--no-seccomp");
        }
        if let Some(root) = test_sysfs_root {
            cmd.arg("--test-sysfs-root").arg(root);
        }
        let pre_exec = move || {
            // The runner dies with the thread that started it (the agent's main thread).
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
            // Its end of the socket, and only that one, survives exec.
            nix::fcntl::fcntl(
                theirs_fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
            )?;
            Ok(())
        };
        // SAFETY: the closure runs between fork and exec and only makes two system calls
        // (prctl, fcntl), both async-signal-safe; it allocates nothing and takes no lock.
        unsafe { cmd.pre_exec(pre_exec) };
        let child = cmd.spawn()?;
        drop(theirs);
        nix::fcntl::fcntl(
            ours.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
        Ok(ToolClient {
            inner: Arc::new(Inner::Up(Runner {
                tools_dir: tools_dir.to_path_buf(),
                child: Mutex::new(Some(child)),
                unregistered: Mutex::new(Some(ours)),
                socket: tokio::sync::OnceCell::new(),
            })),
        })
    }

    /// `None` when the runner is up and luks2's tools are there; else why not, naming the
    /// missing path and the fix.
    pub fn missing(&self) -> Option<String> {
        self.missing_for(&[Tool::Cryptsetup, Tool::Mke2fs])
    }

    /// `None` when the runner is up and `tools` are all there; else why not.
    pub fn missing_for(&self, tools: &[Tool]) -> Option<String> {
        let runner = match &*self.inner {
            Inner::Disabled(reason) => return Some(reason.clone()),
            Inner::Up(r) => r,
        };
        if let Some(status) = runner.exited() {
            return Some(format!(
                "the tool runner exited ({status}); restart the agent"
            ));
        }
        tools.iter().find_map(|tool| {
            let path = runner.tools_dir.join("bin").join(tool.name());
            let fix = match tool {
                Tool::Gocryptfs => "build the image with cnfs-rootfs-builder ... --gocryptfs-tools",
                _ => HOW_TO_GET_TOOLS,
            };
            (!path.exists()).then(|| format!("{}: not found; {fix}", path.display()))
        })
    }

    /// Runs `cmd` in the runner, the tool killed at `deadline`. `key` goes to the tool's
    /// stdin and nowhere else; the copy made for the message is wiped once sent. Dropping the
    /// returned future kills the tool.
    pub async fn call(
        &self,
        cmd: Command,
        key: Option<&[u8]>,
        deadline: Duration,
    ) -> Result<ToolOutcome, AgentError> {
        let op = cmd.op();
        let mine = self.send(cmd, key, deadline, None).await?;
        let reply = tokio::time::timeout(deadline.saturating_add(REPLY_GRACE), recv_reply(&mine))
            .await
            .map_err(|_| {
                AgentError::Deadline(format!(
                    "tool runner: no answer to {op} within {} ms after its deadline",
                    REPLY_GRACE.as_millis()
                ))
            })??;
        outcome(op, reply)
    }

    /// Starts the daemon of `cmd` taking `passed` (gocryptfs: the descriptor of a FUSE mount
    /// the agent made; the lock holder: the pipe it reports on), `key` on its stdin. The
    /// daemon outlives the returned handle, the runner and the agent; the handle only tells
    /// how it ended, while it is kept.
    pub async fn start_daemon(
        &self,
        cmd: Command,
        key: Option<&[u8]>,
        passed: &OwnedFd,
        deadline: Duration,
    ) -> Result<Daemon, AgentError> {
        let op = cmd.op();
        let mine = self.send(cmd, key, deadline, Some(passed)).await?;
        let reply = tokio::time::timeout(deadline.saturating_add(REPLY_GRACE), recv_reply(&mine))
            .await
            .map_err(|_| {
                AgentError::Deadline(format!("tool runner: no answer to {op} in time"))
            })??;
        match reply {
            Reply::Started { pid } => Ok(Daemon { pid, replies: mine }),
            other => Err(match outcome(op, other) {
                Ok(o) => AgentError::Internal(format!(
                    "tool runner: {op}: answered {:?} instead of starting it",
                    o.exit
                )),
                Err(e) => e,
            }),
        }
    }

    /// Starts volume `name`'s SMB lock holder and waits, until `deadline`, for its report:
    /// [`holder::Report::Held`] once it holds the container's lock (it then lives on, found
    /// by its argv), else why it could not (it has exited).
    pub async fn hold_lock(
        &self,
        name: &str,
        read_only: bool,
        deadline: Duration,
    ) -> Result<holder::Report, AgentError> {
        use tokio::io::AsyncReadExt as _;
        let internal = |e: &dyn std::fmt::Display| {
            AgentError::Internal(format!("volume {name}: the lock holder's pipe: {e}"))
        };
        let (rx, tx) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| internal(&e))?;
        let cmd = Command::HoldLock {
            name: name.to_string(),
            read_only,
        };
        let started = tokio::time::Instant::now();
        let daemon = self.start_daemon(cmd, None, &tx, deadline).await?;
        // Ours closed, the holder's copy is the only writer: EOF once it exits.
        drop(tx);
        let mut rx =
            tokio::net::unix::pipe::Receiver::from_owned_fd(rx).map_err(|e| internal(&e))?;
        let mut text = Vec::with_capacity(32);
        let left = deadline.saturating_sub(started.elapsed());
        let read = tokio::time::timeout(left, async {
            let mut buf = [0u8; 32];
            while text.len() < 32 && !text.ends_with(b"\n") {
                match rx.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => text.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        let report = std::str::from_utf8(&text)
            .ok()
            .and_then(holder::Report::parse);
        match (read, report) {
            (_, Some(r)) => Ok(r),
            (Err(_), None) => {
                // Stuck opening or locking on a server that does not answer: it goes.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(daemon.pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                Err(AgentError::Deadline(format!(
                    "volume {name}: the lock holder did not take the container's lock in time \
                     (the server did not answer)"
                )))
            }
            (Ok(()), None) => {
                let exit = daemon.exited(Duration::from_secs(2)).await;
                Err(AgentError::Internal(format!(
                    "volume {name}: the lock holder ended without a report ({exit:?})"
                )))
            }
        }
    }

    /// Sends one request; the returned socket carries its answer(s). Dropping it tells the
    /// runner the caller is gone.
    async fn send(
        &self,
        cmd: Command,
        key: Option<&[u8]>,
        deadline: Duration,
        fuse: Option<&OwnedFd>,
    ) -> Result<AsyncFd<OwnedFd>, AgentError> {
        let runner = match &*self.inner {
            Inner::Disabled(reason) => return Err(AgentError::FailedPrecondition(reason.clone())),
            Inner::Up(r) => r,
        };
        let op = cmd.op();
        let key_len = match key {
            Some(k) if k.len() > MAX_KEY => {
                return Err(AgentError::Invalid(SpecError {
                    field: format!("{op}.key"),
                    reason: format!("must be at most {MAX_KEY} bytes"),
                }))
            }
            // Fits: at most MAX_KEY.
            Some(k) => Some(k.len() as u32),
            None => None,
        };
        let header = serde_json::to_vec(&RequestHeader {
            command: cmd,
            deadline_ms: u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX),
            key_len,
        })
        .map_err(|e| AgentError::Internal(format!("encoding a {op} request: {e}")))?;
        let header_len = u32::try_from(header.len())
            .ok()
            .filter(|&n| n as usize + 4 + MAX_KEY <= MAX_REQUEST)
            .ok_or_else(|| {
                AgentError::Invalid(SpecError {
                    field: op.to_string(),
                    reason: "parameters too long".into(),
                })
            })?;
        let key = key.unwrap_or_default();
        // Sized once so that no reallocation leaves a copy of the key behind; wiped on drop.
        let mut msg = Zeroizing::new(Vec::with_capacity(4 + header.len() + key.len()));
        msg.extend_from_slice(&header_len.to_le_bytes());
        msg.extend_from_slice(&header);
        msg.extend_from_slice(key);

        let unavailable =
            |e: &dyn std::fmt::Display| AgentError::Unavailable(format!("tool runner: {e}"));
        let (mine, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )
        .map_err(|e| unavailable(&e))?;
        // Registered before sending: from here on, dropping this future closes our end and the
        // runner kills the tool.
        let mine = register(mine)?;
        let socket = runner.socket().await?;
        // The reply socket first, then the descriptor a daemon serves.
        let mut fds = vec![theirs.as_raw_fd()];
        fds.extend(fuse.map(|f| f.as_raw_fd()));
        loop {
            let mut ready = socket.writable().await.map_err(|e| unavailable(&e))?;
            let sent = ready.try_io(|fd| {
                sendmsg::<UnixAddr>(
                    fd.as_raw_fd(),
                    &[IoSlice::new(&msg)],
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match sent {
                Ok(Ok(_)) => break,
                Ok(Err(e)) => {
                    return Err(AgentError::Unavailable(format!(
                        "tool runner: sending a {op} request: {e} (the runner is gone; restart the agent)"
                    )))
                }
                Err(_would_block) => continue,
            }
        }
        drop(msg);
        drop(theirs);
        Ok(mine)
    }
}

/// A tool's answer as the caller's result.
fn outcome(op: &str, reply: Reply) -> Result<ToolOutcome, AgentError> {
    match reply {
        Reply::Done {
            exit,
            stderr,
            duration_ms,
        } => Ok(ToolOutcome {
            exit,
            stderr,
            duration: Duration::from_millis(duration_ms),
        }),
        Reply::Busy { limit } => Err(AgentError::Busy(format!(
            "tool runner: {limit} tools are running already; {op} refused, try again"
        ))),
        Reply::Invalid { field, reason } => Err(AgentError::Invalid(SpecError { field, reason })),
        Reply::Refused { reason } => Err(AgentError::FailedPrecondition(reason)),
        Reply::Failed { reason } => {
            Err(AgentError::Internal(format!("tool runner: {op}: {reason}")))
        }
        Reply::Started { pid } => Err(AgentError::Internal(format!(
            "tool runner: {op}: started a daemon (pid {pid}) for a command that runs to its end"
        ))),
    }
}

/// A daemon the runner started. Dropping it only stops listening for its exit.
pub struct Daemon {
    pub pid: u32,
    replies: AsyncFd<OwnedFd>,
}

impl Daemon {
    /// How the daemon ended, if it ends within `within`; `None` while it runs.
    pub async fn exited(&self, within: Duration) -> Option<Exit> {
        match tokio::time::timeout(within, recv_reply(&self.replies)).await {
            Ok(Ok(Reply::Done { exit, .. })) => Some(exit),
            // The runner went away (an agent restart) or said something else: unknown.
            Ok(_) | Err(_) => None,
        }
    }
}

impl Runner {
    /// The exit status, once the runner has exited.
    fn exited(&self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.lock().ok()?;
        child.as_mut()?.try_wait().ok().flatten()
    }

    async fn socket(&self) -> Result<&AsyncFd<OwnedFd>, AgentError> {
        self.socket
            .get_or_try_init(|| async {
                let fd = self
                    .unregistered
                    .lock()
                    .ok()
                    .and_then(|mut fd| fd.take())
                    .ok_or_else(|| {
                        AgentError::Unavailable("tool runner: its socket is lost".into())
                    })?;
                register(fd)
            })
            .await
    }
}

/// `fd` registered with the async runtime (call inside it).
fn register(fd: OwnedFd) -> Result<AsyncFd<OwnedFd>, AgentError> {
    // SAFETY: the OwnedFd moves into the AsyncFd, which owns it until dropped, so the
    // descriptor stays open and `as_raw_fd` returns the same number for the AsyncFd's life.
    unsafe { AsyncFd::register(fd) }
        .map_err(|e| AgentError::Unavailable(format!("tool runner: registering a socket: {e}")))
}

async fn recv_reply(sock: &AsyncFd<OwnedFd>) -> Result<Reply, AgentError> {
    let mut buf = vec![0u8; MAX_REPLY];
    loop {
        let mut ready = sock
            .readable()
            .await
            .map_err(|e| AgentError::Unavailable(format!("tool runner: {e}")))?;
        let got = ready.try_io(|fd| {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = recvmsg::<UnixAddr>(fd.as_raw_fd(), &mut iov, None, MsgFlags::empty())
                .map_err(std::io::Error::from)?;
            Ok((msg.bytes, msg.flags.contains(MsgFlags::MSG_TRUNC)))
        });
        match got {
            Err(_would_block) => continue,
            Ok(Err(e)) if e.raw_os_error() == Some(Errno::EINTR as i32) => continue,
            Ok(Err(e)) => return Err(AgentError::Unavailable(format!("tool runner: {e}"))),
            Ok(Ok((0, _))) => {
                return Err(AgentError::Unavailable(
                    "tool runner: it went away without answering (restart the agent)".into(),
                ))
            }
            Ok(Ok((_, true))) => {
                return Err(AgentError::Internal(
                    "tool runner: its answer was too long".into(),
                ))
            }
            Ok(Ok((n, false))) => {
                return serde_json::from_slice(&buf[..n]).map_err(|e| {
                    AgentError::Internal(format!("tool runner: unreadable answer: {e}"))
                })
            }
        }
    }
}
