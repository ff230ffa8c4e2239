//! An SFTP server for the test bed, inside the test's network namespace: what a guest's
//! `sshfs -o directport=PORT <host_ip>:<dir> ...` mounts. `directport` makes sshfs speak SFTP
//! straight over TCP, without ssh, so the server is OpenSSH's `sftp-server` (Debian's
//! `openssh-sftp-server`) with its stdin and stdout on each accepted connection.
//!
//! The listener is bound to `ns.host_ip:port` from a thread that entered the namespace
//! (`setns(CLONE_NEWNET)` changes the calling thread only, and a socket stays in the namespace
//! it was made in), so nothing outside the namespace can connect. Each connection gets its own
//! `sftp-server -d <dir> -e -l INFO` in its own process group; its log (session and transfer
//! lines) goes to one file.
//!
//! Test-only: there is no authentication, and `-d` only sets the starting directory (it is no
//! chroot), so a client can reach any path the test process can. That is what makes it fit
//! only for a private namespace that only the test's guest is in.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use nix::sched::{setns, CloneFlags};
use nix::sys::signal::Signal;

use crate::netns::NetNs;
use crate::process::Guarded;

/// Where Debian's `openssh-sftp-server` installs the server.
pub const SFTP_SERVER: &str = "/usr/lib/openssh/sftp-server";
/// How often the listener thread looks for a connection or the stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(20);

pub struct Sftp {
    /// Where the guest connects: `ns.host_ip` and the port.
    pub addr: SocketAddr,
    /// The served directory (sftp-server's starting directory).
    pub dir: PathBuf,
    /// Every session's log (sftp-server's stderr) and one line per accepted connection.
    pub log: PathBuf,
    stop: Arc<AtomicBool>,
    sessions: Arc<Mutex<Vec<Guarded>>>,
    connections: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Sftp {
    /// Serves `dir` on `ns.host_ip:port`, logging to `sftp-server-<port>.log` beside `dir`
    /// (in its parent directory; so serve a directory inside the test's temp dir).
    pub fn start(ns: &NetNs, dir: &Path, port: u16) -> anyhow::Result<Self> {
        let log = dir
            .parent()
            .unwrap_or(dir)
            .join(format!("sftp-server-{port}.log"));
        Self::start_with_log(ns, dir, port, &log)
    }

    /// [`Sftp::start`] with the log at `log`.
    pub fn start_with_log(ns: &NetNs, dir: &Path, port: u16, log: &Path) -> anyhow::Result<Self> {
        check_server(Path::new(SFTP_SERVER))?;
        if !dir.is_dir() {
            anyhow::bail!("sftp: served directory {}: not a directory", dir.display());
        }
        let ip: IpAddr = ns
            .host_ip
            .parse()
            .with_context(|| format!("sftp: namespace address {:?}", ns.host_ip))?;
        let addr = SocketAddr::new(ip, port);
        // Created now, so a test can read it before the first connection.
        append(log, &format!("sftp: serving {} on {addr}", dir.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let sessions = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (ready_tx, ready_rx) = mpsc::channel();
        let server = Server {
            dir: dir.to_path_buf(),
            log: log.to_path_buf(),
            stop: stop.clone(),
            sessions: sessions.clone(),
            connections: connections.clone(),
        };
        let netns = format!("/var/run/netns/{}", ns.name);
        let thread = std::thread::Builder::new()
            .name(format!("sftp-{port}"))
            .spawn(move || match listen_in(&netns, addr) {
                Ok(listener) => {
                    let _ = ready_tx.send(Ok(()));
                    server.serve(listener);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .context("sftp: starting the listener thread")?;
        let mut sftp = Sftp {
            addr,
            dir: dir.to_path_buf(),
            log: log.to_path_buf(),
            stop,
            sessions,
            connections,
            thread: Some(thread),
        };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(sftp),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                sftp.thread.take().map(|t| t.join());
                anyhow::bail!("sftp: the listener thread ended before listening")
            }
        }
    }

    /// Kills every running `sftp-server` (SIGKILL), so each client's connection drops as if
    /// the server had died; the listener keeps accepting new connections. Returns how many
    /// were still running.
    pub fn kill_sessions(&self) -> usize {
        let mut sessions = lock(&self.sessions);
        let mut killed = 0;
        for mut s in sessions.drain(..) {
            if s.alive() {
                killed += 1;
            }
            s.stop(Signal::SIGKILL, Duration::from_secs(5));
        }
        killed
    }

    /// Connections accepted so far (a client that reconnects counts again).
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// `sftp-server` processes still running.
    pub fn live_sessions(&self) -> usize {
        let mut sessions = lock(&self.sessions);
        sessions
            .iter_mut()
            .filter_map(|s| s.alive().then_some(()))
            .count()
    }
}

impl Drop for Sftp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.kill_sessions();
    }
}

/// What the listener thread owns.
struct Server {
    dir: PathBuf,
    log: PathBuf,
    stop: Arc<AtomicBool>,
    sessions: Arc<Mutex<Vec<Guarded>>>,
    connections: Arc<AtomicUsize>,
}

impl Server {
    fn serve(self, listener: TcpListener) {
        while !self.stop.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((conn, peer)) => {
                    self.connections.fetch_add(1, Ordering::SeqCst);
                    let _ = append(&self.log, &format!("sftp: connection from {peer}"));
                    if let Err(e) = self.session(conn) {
                        let _ = append(&self.log, &format!("sftp: session for {peer}: {e:#}"));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(ACCEPT_POLL)
                }
                Err(e) => {
                    let _ = append(&self.log, &format!("sftp: accept: {e}"));
                    std::thread::sleep(ACCEPT_POLL);
                }
            }
        }
    }

    /// One `sftp-server` speaking on `conn`.
    fn session(&self, conn: TcpStream) -> anyhow::Result<()> {
        conn.set_nonblocking(false)?;
        let out = conn.try_clone()?;
        let stderr = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let mut cmd = Command::new(SFTP_SERVER);
        cmd.arg("-d")
            .arg(&self.dir)
            .args(["-e", "-l", "INFO"])
            .stdin(Stdio::from(OwnedFd::from(conn)))
            .stdout(Stdio::from(OwnedFd::from(out)))
            .stderr(stderr);
        // The list is locked before the spawn: a client that got its first answer from the
        // new server then always sees the session in `live_sessions` (CI once saw 0).
        let mut sessions = lock(&self.sessions);
        // The command (and with it this process's copies of the socket) is dropped here, so
        // the connection closes when the server exits.
        let server = Guarded::spawn("sftp-server", cmd)?;
        sessions.retain_mut(|s| s.alive());
        sessions.push(server);
        Ok(())
    }
}

/// A TCP listener on `addr` inside the network namespace at `netns`. Changes the calling
/// thread's network namespace for good: call it only on a thread of its own.
fn listen_in(netns: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let ns = File::open(netns).with_context(|| format!("sftp: opening {netns}"))?;
    setns(&ns, CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("sftp: entering the network namespace {netns}"))?;
    let listener =
        TcpListener::bind(addr).with_context(|| format!("sftp: listening on {addr} in {netns}"))?;
    // Polled, so that drop can stop the thread (nothing outside the namespace can connect
    // to wake a blocking accept).
    listener.set_nonblocking(true)?;
    Ok(listener)
}

fn check_server(path: &Path) -> anyhow::Result<()> {
    if !path.is_file() {
        anyhow::bail!(
            "sftp: {} not found: install the Debian package openssh-sftp-server",
            path.display()
        );
    }
    Ok(())
}

fn append(log: &Path, line: &str) -> anyhow::Result<()> {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("sftp: opening the log {}", log.display()))?;
    writeln!(f, "{line}").with_context(|| format!("sftp: writing the log {}", log.display()))
}

/// The session list, also after a thread panicked holding it (the list stays consistent:
/// every change is one push, retain or drain).
fn lock(m: &Mutex<Vec<Guarded>>) -> MutexGuard<'_, Vec<Guarded>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_sftp_server_names_the_debian_package() {
        let err = check_server(Path::new("/nonexistent/sftp-server")).expect_err("missing");
        let text = err.to_string();
        assert!(text.contains("/nonexistent/sftp-server"), "{text}");
        assert!(text.contains("openssh-sftp-server"), "{text}");
    }
}
