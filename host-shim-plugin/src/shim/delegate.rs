//! The delegate shim as the wrapper sees it: a socket to connect to and a process whose exit
//! ends the wrapper.
//!
//! - Connecting retries with backoff ([`CONNECT_BACKOFF_START`] doubling to
//!   [`CONNECT_BACKOFF_MAX`], for up to [`CONNECT_BOUND`]): one `EMFILE` or `EAGAIN` (a full
//!   backlog) is not the end of containerd's connection.
//! - The delegate is gone when its process exits: the wrapper asks its pid the way containerd
//!   does (task `Connect`, whose answer carries `shim_pid`) and waits on a pidfd. The socket's
//!   peer credentials would not do: Go shims create the listening socket in their `start`
//!   process and hand it to the server they fork, so `SO_PEERCRED` names a process that has
//!   already exited. A delegate that gives no pid (or a kernel without pidfds) is watched by
//!   probing its socket every [`PROBE_INTERVAL`]; it is gone after [`REFUSALS_TO_GONE`]
//!   refusals in a row (`ECONNREFUSED` or `ENOENT`, nobody listens); other errors say nothing
//!   about the delegate and count neither way.

use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_shim_protos::api::{ConnectRequest, ConnectResponse};
use protobuf::Message;
use slog::{info, warn, Logger};
use tokio::net::UnixStream;

use cnfs_protocols::pidfd::{open as pidfd_open, readable_when_exited};

use crate::shim::frames::{Frame, Incoming, TYPE_REQUEST};

pub const CONNECT_BACKOFF_START: Duration = Duration::from_millis(10);
pub const CONNECT_BACKOFF_MAX: Duration = Duration::from_millis(500);
/// How long one connection from containerd waits for the delegate to accept it.
pub const CONNECT_BOUND: Duration = Duration::from_secs(10);
/// How long the wrapper tries to learn the delegate's pid before falling back to probes.
pub const PID_QUERY_BOUND: Duration = Duration::from_secs(10);
/// One `Connect` call to the delegate never waits longer than this.
const PID_QUERY_ATTEMPT: Duration = Duration::from_secs(3);
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);
pub const REFUSALS_TO_GONE: u32 = 3;

const TASK_SERVICE: &str = "containerd.task.v2.Task";

pub struct Delegate {
    path: PathBuf,
    /// The id containerd started the wrapper with (the task `Connect` request names it).
    id: String,
}

/// Whether a failed connect means nobody listens on the socket (as opposed to this process or
/// the system running short of something).
pub fn is_refusal(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNREFUSED) | Some(libc::ENOENT)
    )
}

/// Counts consecutive refusals: the fallback verdict when there is no pidfd.
#[derive(Debug, Default)]
pub struct Refusals {
    in_a_row: u32,
}

impl Refusals {
    /// Records one probe; true once the delegate is gone.
    pub fn record(&mut self, probe: &std::io::Result<()>) -> bool {
        match probe {
            Ok(()) => self.in_a_row = 0,
            Err(e) if is_refusal(e) => self.in_a_row += 1,
            // EMFILE, EAGAIN, ENOMEM...: a fact about us, not about the delegate.
            Err(_) => {}
        }
        self.in_a_row >= REFUSALS_TO_GONE
    }
}

impl Delegate {
    pub fn new(path: PathBuf, id: String) -> Self {
        Delegate { path, id }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Connects to the delegate, retrying any failure with backoff for up to [`CONNECT_BOUND`].
    pub async fn connect(&self) -> std::io::Result<UnixStream> {
        let end = tokio::time::Instant::now() + CONNECT_BOUND;
        let mut backoff = CONNECT_BACKOFF_START;
        loop {
            match UnixStream::connect(&self.path).await {
                Ok(s) => return Ok(s),
                Err(e) if tokio::time::Instant::now() + backoff >= end => {
                    return Err(std::io::Error::new(
                        e.kind(),
                        format!(
                            "connecting to the delegate shim at {} for {:?}: {e}",
                            self.path.display(),
                            CONNECT_BOUND
                        ),
                    ))
                }
                Err(_) => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(CONNECT_BACKOFF_MAX);
                }
            }
        }
    }

    /// The delegate's pid from its answer to task `Connect` (0 when it gives none).
    pub async fn shim_pid(&self) -> std::io::Result<u32> {
        let ask = async {
            let mut s = UnixStream::connect(&self.path).await?;
            let mut req = ttrpc::proto::Request::new();
            req.service = TASK_SERVICE.into();
            req.method = "Connect".into();
            req.timeout_nano = PID_QUERY_ATTEMPT.as_nanos() as i64;
            req.payload = ConnectRequest {
                id: self.id.clone(),
                ..Default::default()
            }
            .write_to_bytes()
            .map_err(std::io::Error::other)?;
            let frame = Frame {
                stream_id: 1,
                kind: TYPE_REQUEST,
                flags: 0,
                payload: req.write_to_bytes().map_err(std::io::Error::other)?,
            };
            frame.write(&mut s).await?;
            loop {
                match Frame::read(&mut s).await? {
                    None => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                    Some(Incoming::Frame(f)) if f.stream_id == 1 && f.response_code().is_some() => {
                        let resp = ttrpc::proto::Response::parse_from_bytes(&f.payload)
                            .map_err(std::io::Error::other)?;
                        if let Some(status) = resp.status.as_ref() {
                            if status.code() != ttrpc::Code::OK {
                                return Err(std::io::Error::other(format!(
                                    "task Connect: {:?} {}",
                                    status.code(),
                                    status.message()
                                )));
                            }
                        }
                        let c = ConnectResponse::parse_from_bytes(&resp.payload)
                            .map_err(std::io::Error::other)?;
                        return Ok(c.shim_pid);
                    }
                    Some(_) => {}
                }
            }
        };
        tokio::time::timeout(PID_QUERY_ATTEMPT, ask)
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
    }

    /// Resolves once the delegate is gone (see the module's comment for how that is decided).
    pub async fn gone(&self, log: &Logger) {
        match self.learn_pid(log).await {
            Some(pid) => match pidfd_open(pid).and_then(readable_when_exited) {
                Ok(fd) => {
                    info!(log, "watching the delegate shim's process"; "pid" => pid);
                    match fd.readable().await {
                        Ok(_) => return,
                        Err(e) => {
                            warn!(log, "polling the delegate's pidfd failed; probing its socket instead"; "error" => e.to_string())
                        }
                    }
                }
                // It exited between answering and now.
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return,
                Err(e) => {
                    warn!(log, "no pidfd for the delegate; probing its socket instead"; "pid" => pid, "error" => e.to_string())
                }
            },
            None => info!(log, "the delegate shim gave no pid; probing its socket"),
        }
        let mut refusals = Refusals::default();
        loop {
            tokio::time::sleep(PROBE_INTERVAL).await;
            let probe = UnixStream::connect(&self.path).await.map(drop);
            if refusals.record(&probe) {
                return;
            }
        }
    }

    /// Asks the delegate's pid, retrying with backoff for up to [`PID_QUERY_BOUND`].
    async fn learn_pid(&self, log: &Logger) -> Option<u32> {
        let end = tokio::time::Instant::now() + PID_QUERY_BOUND;
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.shim_pid().await {
                Ok(0) => return None,
                Ok(pid) => return Some(pid),
                Err(e) if tokio::time::Instant::now() + backoff >= end => {
                    warn!(log, "could not ask the delegate shim its pid"; "error" => e.to_string());
                    return None;
                }
                Err(_) => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(errno: i32) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(errno))
    }

    #[test]
    fn only_repeated_refusals_mean_the_delegate_is_gone() {
        let mut r = Refusals::default();
        // Running out of descriptors or a full backlog, however often, says nothing.
        for e in [
            libc::EMFILE,
            libc::ENFILE,
            libc::EAGAIN,
            libc::ENOMEM,
            libc::EINTR,
        ] {
            for _ in 0..10 {
                assert!(!r.record(&os(e)), "errno {e} must not count");
            }
        }
        assert!(!r.record(&os(libc::ECONNREFUSED)));
        assert!(!r.record(&os(libc::ENOENT)));
        // A success in between starts the count again.
        assert!(!r.record(&Ok(())));
        assert!(!r.record(&os(libc::ECONNREFUSED)));
        assert!(!r.record(&os(libc::EMFILE)));
        assert!(!r.record(&os(libc::ECONNREFUSED)));
        assert!(r.record(&os(libc::ECONNREFUSED)));
    }

    #[tokio::test]
    async fn a_pidfd_turns_readable_when_its_process_exits() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let fd = pidfd_open(child.id())
            .and_then(readable_when_exited)
            .expect("pidfd");
        let early = tokio::time::timeout(Duration::from_millis(200), fd.readable()).await;
        assert!(early.is_err(), "readable while the process runs");
        child.kill().expect("kill");
        let _ = child.wait();
        tokio::time::timeout(Duration::from_secs(10), fd.readable())
            .await
            .expect("readable after exit")
            .map(drop)
            .expect("poll");
    }
}
