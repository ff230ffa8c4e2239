//! meta-fuse-csi-plugin's fd-passing protocol, both sides, for the test bed: the server side
//! ([`send_fd`]) is only the reference peer of the receiving side's tests; the receiving side
//! ([`connect`], [`receive_fd`]) is what the test-only `cnfs-fuse-starter` runs.
//!
//! The protocol (meta-fuse-csi-plugin's `pkg/util/fdchannel.go` and `pkg/fuse_starter`): the
//! starter connects to a unix stream socket; the server sends exactly one message whose data is
//! the JSON object `{"volumeName":"<name>"}` (the starter reads at most 500 bytes and ignores
//! unknown fields) with an `SCM_RIGHTS` control message carrying one descriptor, the
//! `/dev/fuse` fd the server already mounted with `fd=N`.
//!
//! Stricter than the real starter, so a test catches a server that is merely lucky: more than
//! one descriptor, a message longer than 500 bytes (the real one would parse a truncated
//! prefix) and a missing or empty `volumeName` (the real one accepts `""`) are errors.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};

/// The most message data the starter reads (its receive buffer).
pub const MAX_MESSAGE: usize = 500;
/// Room for this many descriptors in the receive buffer: enough to count (and close) a few
/// extra ones rather than have the kernel truncate the control data.
const MAX_FDS: usize = 16;
/// How often [`connect`] retries while the socket is missing or refuses connections.
pub const CONNECT_RETRY: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum FdPassingError {
    #[error("socket {path}: no listener within {timeout:?} (last error: {last})")]
    ConnectTimeout {
        path: PathBuf,
        timeout: Duration,
        last: std::io::Error,
    },
    #[error("socket {path}: connecting: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the peer closed the connection without sending the message and its /dev/fuse fd")]
    ClosedWithoutMessage,
    #[error("no message within {0:?} of connecting")]
    ReceiveTimeout(Duration),
    #[error("receiving the message: {0}")]
    Receive(Errno),
    #[error("message: no file descriptor attached (SCM_RIGHTS with exactly one fd expected)")]
    NoFd,
    #[error("message: {0} file descriptors attached, exactly one expected")]
    TooManyFds(usize),
    #[error("message: more than {MAX_FDS} file descriptors attached (control data truncated)")]
    ControlTruncated,
    #[error("message: longer than {MAX_MESSAGE} bytes")]
    TooLong,
    #[error("message: not a JSON object with a string `volumeName`: {0}")]
    BadJson(String),
    #[error("message: `volumeName` is missing or empty")]
    MissingVolumeName,
    #[error("sending the message: {0}")]
    Send(Errno),
    #[error("sending the message: only {sent} of {len} bytes sent")]
    ShortSend { sent: usize, len: usize },
}

/// Connects to the unix stream socket at `path`, retrying every [`CONNECT_RETRY`] while it
/// does not exist yet or refuses connections (the server may not be listening yet), up to
/// `timeout`. Any other error fails at once.
pub fn connect(path: &Path, timeout: Duration) -> Result<UnixStream, FdPassingError> {
    let until = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                if Instant::now() >= until {
                    return Err(FdPassingError::ConnectTimeout {
                        path: path.to_path_buf(),
                        timeout,
                        last: e,
                    });
                }
                std::thread::sleep(CONNECT_RETRY);
            }
            Err(source) => {
                return Err(FdPassingError::Connect {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
}

/// Receives the one message: returns the volume name and the descriptor (close-on-exec, as
/// received with `MSG_CMSG_CLOEXEC`). Every descriptor received with a rejected message is
/// closed (but for more than 16, which the kernel truncates and nix will not walk; the
/// starter exits then anyway). Bounded by the stream's read timeout, if set.
pub fn receive_fd(stream: &UnixStream) -> Result<(String, OwnedFd), FdPassingError> {
    // One byte more than the limit tells "exactly 500" from "longer".
    let mut data = [0u8; MAX_MESSAGE + 1];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (len, fds, truncated) = loop {
        let mut iov = [IoSliceMut::new(&mut data)];
        match recvmsg::<UnixAddr>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
                let mut fds = Vec::new();
                // With MSG_CTRUNC nix refuses to walk the control data; that is an error below.
                if let Ok(cmsgs) = msg.cmsgs() {
                    for c in cmsgs {
                        if let ControlMessageOwned::ScmRights(raw) = c {
                            for fd in raw {
                                // SAFETY: the kernel has just installed `fd` in this process
                                // for this message; nothing else knows or owns it.
                                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                            }
                        }
                    }
                }
                break (msg.bytes, fds, truncated);
            }
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => {
                // Only with a read timeout set (the stream is blocking otherwise).
                let timeout = stream.read_timeout().ok().flatten().unwrap_or_default();
                return Err(FdPassingError::ReceiveTimeout(timeout));
            }
            Err(e) => return Err(FdPassingError::Receive(e)),
        }
    };
    if len == 0 && fds.is_empty() {
        return Err(FdPassingError::ClosedWithoutMessage);
    }
    if truncated {
        return Err(FdPassingError::ControlTruncated);
    }
    if len > MAX_MESSAGE {
        return Err(FdPassingError::TooLong);
    }
    // A map, not a struct: serde would also take a struct from a JSON array. Unknown fields
    // are ignored, as by the real starter.
    let config: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&data[..len]).map_err(|e| FdPassingError::BadJson(e.to_string()))?;
    let name = match config.get("volumeName") {
        Some(serde_json::Value::String(n)) if !n.is_empty() => n.clone(),
        None | Some(serde_json::Value::String(_)) => return Err(FdPassingError::MissingVolumeName),
        Some(other) => {
            return Err(FdPassingError::BadJson(format!(
                "`volumeName` is {other}, not a string"
            )))
        }
    };
    let mut fds = fds.into_iter();
    match (fds.next(), fds.len()) {
        (None, _) => Err(FdPassingError::NoFd),
        (Some(fd), 0) => Ok((name, fd)),
        (Some(_), extra) => Err(FdPassingError::TooManyFds(extra + 1)),
    }
}

/// The server side: sends `{"volumeName": name}` with `fd` attached, as the real server does.
pub fn send_fd(
    stream: &UnixStream,
    volume_name: &str,
    fd: BorrowedFd<'_>,
) -> Result<(), FdPassingError> {
    let data = serde_json::to_vec(&serde_json::json!({ "volumeName": volume_name }))
        .map_err(|e| FdPassingError::BadJson(e.to_string()))?;
    if data.len() > MAX_MESSAGE {
        return Err(FdPassingError::TooLong);
    }
    send_message(stream, &data, &[fd])
}

/// Sends one message of any data and any descriptors (none: no control message): what
/// [`send_fd`] builds on, and how tests send the messages a server must not.
pub fn send_message(
    stream: &UnixStream,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), FdPassingError> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
    let iov = [IoSlice::new(data)];
    let sent = loop {
        match sendmsg::<UnixAddr>(
            stream.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) => break n,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(FdPassingError::Send(e)),
        }
    };
    if sent != data.len() {
        return Err(FdPassingError::ShortSend {
            sent,
            len: data.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixListener;

    use nix::fcntl::OFlag;
    use nix::unistd::pipe2;
    use proptest::prelude::*;

    /// A pipe whose ends are close-on-exec and whose read end does not block.
    fn pipe() -> (std::fs::File, std::fs::File) {
        let (r, w) = pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).expect("pipe2");
        (r.into(), w.into())
    }

    fn pair() -> (UnixStream, UnixStream) {
        UnixStream::pair().expect("socketpair")
    }

    /// Reads what is in the (non-blocking) pipe now: `Ok(0)` once every write end is closed,
    /// `WouldBlock` while one is still open somewhere.
    fn read_now(r: &mut std::fs::File) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; 64];
        let n = r.read(&mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    fn assert_all_write_ends_closed(r: &mut std::fs::File) {
        let got = read_now(r);
        assert!(
            matches!(&got, Ok(v) if v.is_empty()),
            "a received descriptor was kept open: {got:?}"
        );
    }

    #[test]
    fn receive_returns_the_volume_name_and_a_working_descriptor() {
        let (server, starter) = pair();
        let (mut r, w) = pipe();
        send_fd(&server, "vol-a", w.as_fd()).expect("send");
        drop(w);
        let (name, fd) = receive_fd(&starter).expect("receive");
        assert_eq!(name, "vol-a");
        let mut through = std::fs::File::from(fd);
        through.write_all(b"via the passed fd").expect("write");
        assert_eq!(read_now(&mut r).expect("read"), b"via the passed fd");
        let flags =
            nix::fcntl::fcntl(through.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD).expect("F_GETFD");
        assert_ne!(
            flags & libc::FD_CLOEXEC,
            0,
            "received descriptors must not leak into programs the starter runs"
        );
    }

    #[test]
    fn receive_ignores_unknown_fields_and_accepts_exactly_500_bytes() {
        let head = r#"{"volumeName":"v","pad":""#;
        let tail = r#""}"#;
        let pad = "x".repeat(MAX_MESSAGE - head.len() - tail.len());
        let msg = format!("{head}{pad}{tail}");
        assert_eq!(msg.len(), MAX_MESSAGE);
        let (server, starter) = pair();
        let (_r, w) = pipe();
        send_message(&server, msg.as_bytes(), &[w.as_fd()]).expect("send");
        let (name, _fd) = receive_fd(&starter).expect("500 bytes is within the limit");
        assert_eq!(name, "v");
    }

    #[test]
    fn receive_rejects_a_message_longer_than_500_bytes_and_closes_its_fd() {
        let msg = format!(
            r#"{{"volumeName":"v","pad":"{}"}}"#,
            "x".repeat(MAX_MESSAGE)
        );
        let (server, starter) = pair();
        let (mut r, w) = pipe();
        send_message(&server, msg.as_bytes(), &[w.as_fd()]).expect("send");
        drop(w);
        let err = receive_fd(&starter).expect_err("too long");
        assert!(matches!(err, FdPassingError::TooLong), "{err:?}");
        assert!(err.to_string().contains("500 bytes"), "{err}");
        assert_all_write_ends_closed(&mut r);
    }

    #[test]
    fn receive_rejects_a_message_without_a_descriptor() {
        let (server, starter) = pair();
        send_message(&server, br#"{"volumeName":"v"}"#, &[]).expect("send");
        let err = receive_fd(&starter).expect_err("no fd");
        assert!(matches!(err, FdPassingError::NoFd), "{err:?}");
        assert!(err.to_string().contains("no file descriptor"), "{err}");
    }

    #[test]
    fn receive_rejects_two_descriptors_and_closes_both() {
        let (server, starter) = pair();
        let (mut r, w) = pipe();
        let w2 = w.try_clone().expect("dup");
        send_message(&server, br#"{"volumeName":"v"}"#, &[w.as_fd(), w2.as_fd()]).expect("send");
        drop((w, w2));
        let err = receive_fd(&starter).expect_err("two fds");
        assert!(matches!(err, FdPassingError::TooManyFds(2)), "{err:?}");
        assert!(err.to_string().contains("exactly one"), "{err}");
        assert_all_write_ends_closed(&mut r);
    }

    #[test]
    fn receive_rejects_bad_json_naming_the_field() {
        let rows: [&[u8]; 4] = [
            b"not json",
            br#"["vol"]"#,
            br#"{"volumeName":7}"#,
            br#"{"volumeName":"v""#,
        ];
        for data in rows {
            let (server, starter) = pair();
            let (_r, w) = pipe();
            send_message(&server, data, &[w.as_fd()]).expect("send");
            let err = receive_fd(&starter).expect_err("bad json");
            assert!(
                matches!(err, FdPassingError::BadJson(_)),
                "{data:?}: {err:?}"
            );
            assert!(err.to_string().contains("`volumeName`"), "{err}");
        }
    }

    #[test]
    fn receive_rejects_a_missing_or_empty_volume_name() {
        for data in [&br#"{}"#[..], br#"{"volumeName":""}"#, br#"{"name":"v"}"#] {
            let (server, starter) = pair();
            let (_r, w) = pipe();
            send_message(&server, data, &[w.as_fd()]).expect("send");
            let err = receive_fd(&starter).expect_err("no name");
            assert!(
                matches!(err, FdPassingError::MissingVolumeName),
                "{data:?}: {err:?}"
            );
        }
    }

    #[test]
    fn receive_reports_a_peer_that_closes_at_once() {
        let (server, starter) = pair();
        drop(server);
        let err = receive_fd(&starter).expect_err("closed");
        assert!(
            matches!(err, FdPassingError::ClosedWithoutMessage),
            "{err:?}"
        );
        assert!(err.to_string().contains("closed the connection"), "{err}");
    }

    #[test]
    fn receive_is_bounded_by_the_read_timeout() {
        let (_server, starter) = pair();
        starter
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let t = Instant::now();
        let err = receive_fd(&starter).expect_err("silent peer");
        assert!(
            matches!(err, FdPassingError::ReceiveTimeout(d) if d == Duration::from_millis(200)),
            "{err:?}"
        );
        assert!(t.elapsed() < Duration::from_secs(5));
        assert_eq!(err.to_string(), "no message within 200ms of connecting");
    }

    #[test]
    fn send_refuses_a_name_that_does_not_fit_in_500_bytes() {
        let (server, starter) = pair();
        let (_r, w) = pipe();
        let err = send_fd(&server, &"n".repeat(MAX_MESSAGE), w.as_fd()).expect_err("too long");
        assert!(matches!(err, FdPassingError::TooLong), "{err:?}");
        drop(server);
        // Nothing was sent.
        assert!(matches!(
            receive_fd(&starter),
            Err(FdPassingError::ClosedWithoutMessage)
        ));
    }

    #[test]
    fn connect_retries_until_the_socket_appears() {
        let dir = crate::TempDir::new("fdpass-late").expect("tmp");
        let path = dir.path().join("fd.sock");
        let bind_path = path.clone();
        let server = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(350));
            let l = UnixListener::bind(&bind_path).expect("bind");
            let (conn, _) = l.accept().expect("accept");
            let (_r, w) = pipe();
            send_fd(&conn, "late", w.as_fd()).expect("send");
        });
        let t = Instant::now();
        let stream = connect(&path, Duration::from_secs(10)).expect("connect");
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );
        let (name, _fd) = receive_fd(&stream).expect("receive");
        assert_eq!(name, "late");
        server.join().expect("server thread");
    }

    #[test]
    fn connect_retries_while_refused_then_times_out_naming_the_socket() {
        let dir = crate::TempDir::new("fdpass-refused").expect("tmp");
        let path = dir.path().join("fd.sock");
        // A socket file nobody listens on: connections are refused.
        drop(UnixListener::bind(&path).expect("bind"));
        let t = Instant::now();
        let err = connect(&path, Duration::from_millis(500)).expect_err("refused");
        assert!(
            t.elapsed() >= Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        assert!(
            matches!(&err, FdPassingError::ConnectTimeout { last, .. }
                if last.kind() == std::io::ErrorKind::ConnectionRefused),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("no listener"), "{text}");
    }

    #[test]
    fn connect_fails_at_once_when_the_socket_can_never_appear() {
        let dir = crate::TempDir::new("fdpass-notdir").expect("tmp");
        let file = dir.path().join("plain-file");
        std::fs::write(&file, b"").expect("write");
        // ENOTDIR: no server can ever create a socket below a regular file. (A regular file
        // itself gives ECONNREFUSED, which is retried like a socket nobody listens on yet.)
        let path = file.join("fd.sock");
        let t = Instant::now();
        let err = connect(&path, Duration::from_secs(10)).expect_err("not a socket");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert!(
            matches!(&err, FdPassingError::Connect { source, .. }
                if source.raw_os_error() == Some(libc::ENOTDIR)),
            "{err:?}"
        );
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }

    proptest! {
        #[test]
        fn any_volume_name_round_trips(name in "\\PC{1,60}") {
            let (server, starter) = pair();
            let (_r, w) = pipe();
            send_fd(&server, &name, w.as_fd()).expect("send");
            let (got, _fd) = receive_fd(&starter).expect("receive");
            prop_assert_eq!(got, name);
        }

        #[test]
        fn arbitrary_message_data_is_parsed_or_rejected_never_panics(
            data in proptest::collection::vec(any::<u8>(), 1..=MAX_MESSAGE)
        ) {
            let (server, starter) = pair();
            let (_r, w) = pipe();
            send_message(&server, &data, &[w.as_fd()]).expect("send");
            match receive_fd(&starter) {
                Ok((name, _)) => prop_assert!(!name.is_empty()),
                Err(e) => prop_assert!(
                    matches!(e, FdPassingError::BadJson(_) | FdPassingError::MissingVolumeName),
                    "{:?}", e
                ),
            }
        }
    }
}
