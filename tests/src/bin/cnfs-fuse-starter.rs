//! Test-only stand-in for meta-fuse-csi-plugin's `fuse-starter`, the program a FUSE sidecar
//! runs to get its `/dev/fuse` descriptor from the server that mounted it. Never installed
//! in production images: it exists so the end-to-end suite can run an unmodified FUSE daemon
//! (e.g. sshfs) against cnfs-agent's fd-passing socket inside a test guest.
//!
//! `cnfs-fuse-starter --fd-passing-socket-path PATH [--connect-timeout SECS] -- PROGRAM ARGS...`
//!
//! What it reproduces of the real one (read from meta-fuse-csi-plugin's `cmd/fuse_starter`,
//! `pkg/fuse_starter` and `pkg/util/fdchannel.go`): the same flag and `--` split; it connects
//! to the unix stream socket at PATH, receives one message (at most 500 bytes of JSON
//! `{"volumeName": ...}`, unknown fields ignored, `SCM_RIGHTS` with the descriptor) and runs
//! PROGRAM ARGS with that descriptor as fd 3 (Go's `ExtraFiles[0]`), so the user writes
//! `/dev/fd/3` as the mount point in ARGS, as with the real one.
//!
//! Where it differs, on purpose:
//! - it retries the connection every 100 ms while the socket is missing or refuses
//!   connections, up to `--connect-timeout` (default 30 s); the real one dials once, which
//!   works in Kubernetes only because the CSI driver creates the socket before the sidecar
//!   starts. The same bound applies to waiting for the message after connecting;
//! - any failure (no descriptor, more than one, bad JSON, a missing or empty `volumeName`,
//!   more than 500 bytes, the peer closing first, a timeout, PROGRAM not found) exits 2 with
//!   a message naming the problem; the real one logs and exits 0;
//! - it execs PROGRAM in its own place instead of running it as a child and forwarding
//!   SIGTERM, so there is no starter process left to signal or reap;
//! - it does not unlink PATH after receiving (the real one does; the server owns it here).

use std::convert::Infallible;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::Parser;
use cnfs_testbed::fd_passing;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};

/// Where the daemon finds the descriptor (`/dev/fd/3`).
const DAEMON_FD: RawFd = 3;

#[derive(Parser, Debug)]
#[command(
    name = "cnfs-fuse-starter",
    about = "Test-only stand-in for meta-fuse-csi-plugin's fuse-starter"
)]
struct Args {
    /// The server's unix stream socket that passes the /dev/fuse descriptor.
    #[arg(long, value_name = "PATH")]
    fd_passing_socket_path: PathBuf,
    /// Bound on connecting, and then on waiting for the message.
    #[arg(long, value_name = "SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..))]
    connect_timeout: u64,
    /// The FUSE daemon and its arguments (use /dev/fd/3 as its mount point).
    #[arg(last = true, required = true, value_name = "PROGRAM ARGS")]
    command: Vec<std::ffi::OsString>,
}

fn main() {
    start(&Args::parse())
}

/// Execs the daemon, or exits 2 naming what went wrong.
fn start(args: &Args) -> ! {
    let err = match run(args) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    eprintln!("fuse-starter: {err:#}");
    std::process::exit(2)
}

fn run(args: &Args) -> anyhow::Result<Infallible> {
    let path = &args.fd_passing_socket_path;
    let timeout = Duration::from_secs(args.connect_timeout);
    let stream = fd_passing::connect(path, timeout)?;
    stream
        .set_read_timeout(Some(timeout))
        .context("setting the receive timeout")?;
    let (name, fd) =
        fd_passing::receive_fd(&stream).with_context(|| format!("socket {}", path.display()))?;
    // Closed before fd 3 is taken, so that its number is free and no owner closes 3 later.
    drop(stream);
    eprintln!("fuse-starter: received fd for volume {name}");
    place_at_daemon_fd(fd).context("placing the /dev/fuse descriptor at fd 3")?;
    let (program, rest) = args
        .command
        .split_first()
        .ok_or_else(|| anyhow!("no PROGRAM after `--`"))?;
    let err = std::process::Command::new(program).args(rest).exec();
    Err(anyhow!("starting {program:?}: {err}"))
}

/// Makes `fd` the process's fd 3, open across exec. Whatever fd 3 was is replaced: the
/// process execs right after, and exits if that fails.
fn place_at_daemon_fd(fd: OwnedFd) -> nix::Result<()> {
    if fd.as_raw_fd() == DAEMON_FD {
        // Ownership moves to the daemon: keep 3 open when `fd` goes out of scope.
        let _ = fd.into_raw_fd();
    } else {
        // `fd` (received close-on-exec) is closed on return; 3 stays.
        nix::unistd::dup2(fd.as_raw_fd(), DAEMON_FD)?;
    }
    // dup2 clears FD_CLOEXEC on the copy, but not when the fd already was 3.
    fcntl(DAEMON_FD, FcntlArg::F_SETFD(FdFlag::empty()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The starter as a process: each test re-executes this test binary, whose ignored
    //! `starter_process` test runs [`start`] with the arguments in [`CHILD_ARGS`], and plays
    //! the server with the library's reference side.

    use super::*;
    use std::io::Read;
    use std::os::fd::AsFd;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::process::{Child, Command, ExitStatus, Stdio};
    use std::time::Instant;

    use cnfs_testbed::TempDir;
    use nix::fcntl::OFlag;

    const CHILD_ARGS: &str = "CNFS_FUSE_STARTER_TEST_ARGS";

    #[test]
    #[ignore = "the starter process the other tests run (they re-execute this binary)"]
    fn starter_process() {
        let Ok(raw) = std::env::var(CHILD_ARGS) else {
            return;
        };
        let list: Vec<String> = serde_json::from_str(&raw).expect("child arguments");
        let argv = std::iter::once("cnfs-fuse-starter".to_string()).chain(list);
        let args = Args::try_parse_from(argv).unwrap_or_else(|e| e.exit());
        start(&args)
    }

    fn spawn_starter(args: &[&str]) -> Child {
        Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "tests::starter_process",
                "--ignored",
                "--nocapture",
            ])
            .env(CHILD_ARGS, serde_json::to_string(args).expect("json"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning the starter")
    }

    struct Exited {
        status: ExitStatus,
        stdout: String,
        stderr: String,
    }

    /// Waits (bounded) for the starter, killing it if it hangs.
    fn wait(mut child: Child) -> Exited {
        let until = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = child.try_wait().expect("try_wait") {
                break s;
            }
            if Instant::now() > until {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the starter hung");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stdout = String::new();
        let mut stderr = String::new();
        let _ = child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut stdout);
        let _ = child
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut stderr);
        Exited {
            status,
            stdout,
            stderr,
        }
    }

    fn accept(listener: &UnixListener) -> UnixStream {
        listener.set_nonblocking(true).expect("nonblocking");
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            match listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).expect("blocking");
                    return s;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < until, "the starter never connected");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    }

    /// A pipe: (non-blocking read end, write end), both close-on-exec.
    fn pipe() -> (std::fs::File, std::fs::File) {
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).expect("pipe2");
        (r.into(), w.into())
    }

    fn read_all(mut r: std::fs::File) -> String {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    }

    #[test]
    fn starter_execs_the_program_with_the_received_fd_as_dev_fd_3() {
        let dir = TempDir::new("starter-ok").expect("tmp");
        let sock = dir.path().join("fd.sock");
        let listener = UnixListener::bind(&sock).expect("bind");
        let child = spawn_starter(&[
            "--fd-passing-socket-path",
            sock.to_str().expect("utf-8"),
            "--",
            "sh",
            "-c",
            r#"echo "pid $$" > /dev/fd/3"#,
        ]);
        let pid = child.id();
        let (r, w) = pipe();
        let conn = accept(&listener);
        fd_passing::send_fd(&conn, "vol-a", w.as_fd()).expect("send");
        drop((w, conn));
        let out = wait(child);
        assert!(out.status.success(), "{:?}: {}", out.status, out.stderr);
        assert!(
            out.stderr
                .contains("fuse-starter: received fd for volume vol-a\n"),
            "{}",
            out.stderr
        );
        // Written through /dev/fd/3 by the program, which is the starter's own process.
        assert_eq!(read_all(r), format!("pid {pid}\n"));
    }

    #[test]
    fn starter_retries_until_the_server_listens() {
        let dir = TempDir::new("starter-late").expect("tmp");
        let sock = dir.path().join("fd.sock");
        let child = spawn_starter(&[
            "--fd-passing-socket-path",
            sock.to_str().expect("utf-8"),
            "--connect-timeout",
            "20",
            "--",
            "sh",
            "-c",
            "echo late > /dev/fd/3",
        ]);
        std::thread::sleep(Duration::from_millis(600));
        let listener = UnixListener::bind(&sock).expect("bind");
        let (r, w) = pipe();
        let conn = accept(&listener);
        fd_passing::send_fd(&conn, "vol-late", w.as_fd()).expect("send");
        drop((w, conn));
        let out = wait(child);
        assert!(out.status.success(), "{:?}: {}", out.status, out.stderr);
        assert_eq!(read_all(r), "late\n");
    }

    #[test]
    fn starter_exits_2_when_the_server_closes_without_a_descriptor() {
        let dir = TempDir::new("starter-closed").expect("tmp");
        let sock = dir.path().join("fd.sock");
        let listener = UnixListener::bind(&sock).expect("bind");
        let child = spawn_starter(&[
            "--fd-passing-socket-path",
            sock.to_str().expect("utf-8"),
            "--",
            "echo",
            "program-ran",
        ]);
        drop(accept(&listener));
        let out = wait(child);
        assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
        assert!(
            out.stderr.contains("closed the connection without sending"),
            "{}",
            out.stderr
        );
        assert!(
            out.stderr.contains(sock.to_str().expect("utf-8")),
            "{}",
            out.stderr
        );
        assert!(!out.stdout.contains("program-ran"), "{}", out.stdout);
    }

    #[test]
    fn starter_exits_2_when_sent_two_descriptors() {
        let dir = TempDir::new("starter-two").expect("tmp");
        let sock = dir.path().join("fd.sock");
        let listener = UnixListener::bind(&sock).expect("bind");
        let child = spawn_starter(&[
            "--fd-passing-socket-path",
            sock.to_str().expect("utf-8"),
            "--",
            "echo",
            "program-ran",
        ]);
        let (_r, w) = pipe();
        let conn = accept(&listener);
        fd_passing::send_message(&conn, br#"{"volumeName":"v"}"#, &[w.as_fd(), w.as_fd()])
            .expect("send");
        let out = wait(child);
        assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
        assert!(
            out.stderr
                .contains("2 file descriptors attached, exactly one expected"),
            "{}",
            out.stderr
        );
        assert!(!out.stdout.contains("program-ran"), "{}", out.stdout);
    }

    #[test]
    fn starter_exits_2_naming_the_socket_when_nobody_listens() {
        let dir = TempDir::new("starter-none").expect("tmp");
        let sock = dir.path().join("fd.sock");
        let t = Instant::now();
        let child = spawn_starter(&[
            "--fd-passing-socket-path",
            sock.to_str().expect("utf-8"),
            "--connect-timeout",
            "1",
            "--",
            "true",
        ]);
        let out = wait(child);
        assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
        assert!(t.elapsed() >= Duration::from_secs(1), "{:?}", t.elapsed());
        assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
        assert!(
            out.stderr.contains("no listener within 1s"),
            "{}",
            out.stderr
        );
        assert!(
            out.stderr.contains(sock.to_str().expect("utf-8")),
            "{}",
            out.stderr
        );
    }

    #[test]
    fn starter_exits_2_naming_a_program_that_cannot_start() {
        let dir = TempDir::new("starter-noprog").expect("tmp");
        let sock = dir.path().join("fd.sock");
        let listener = UnixListener::bind(&sock).expect("bind");
        let child = spawn_starter(&[
            "--fd-passing-socket-path",
            sock.to_str().expect("utf-8"),
            "--",
            "/nonexistent/fuse-daemon",
            "/dev/fd/3",
        ]);
        let (_r, w) = pipe();
        let conn = accept(&listener);
        fd_passing::send_fd(&conn, "v", w.as_fd()).expect("send");
        let out = wait(child);
        assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
        assert!(
            out.stderr.contains("starting \"/nonexistent/fuse-daemon\""),
            "{}",
            out.stderr
        );
    }

    #[test]
    fn arguments_need_a_program_after_double_dash_and_a_positive_timeout() {
        let err =
            Args::try_parse_from(["s", "--fd-passing-socket-path", "/p"]).expect_err("no program");
        assert_eq!(
            err.kind(),
            clap::error::ErrorKind::MissingRequiredArgument,
            "{err}"
        );
        let err = Args::try_parse_from([
            "s",
            "--fd-passing-socket-path",
            "/p",
            "--connect-timeout",
            "0",
            "--",
            "d",
        ])
        .expect_err("zero timeout");
        assert!(err.to_string().contains("--connect-timeout"), "{err}");
        let args = Args::try_parse_from([
            "s",
            "--fd-passing-socket-path",
            "/p",
            "--",
            "sshfs",
            "--",
            "/dev/fd/3",
        ])
        .expect("valid");
        assert_eq!(args.connect_timeout, 30);
        assert_eq!(args.command, ["sshfs", "--", "/dev/fd/3"]);
    }
}
