//! Finding a Kata sandbox's guest the way `kata-runtime exec` does, then reaching CNFS's agent
//! on its own port of the same guest.
//!
//! Facts from Kata's sources (kata-containers/kata-containers):
//! - Both runtimes serve an HTTP/1.1 management API on a unix socket named
//!   `shim-monitor.sock` in the sandbox's directory: the Go shim listens on
//!   `/run/vc/sbs/<id>/shim-monitor.sock` (`ServerSocketAddress`/`SocketPathGo` in
//!   `src/runtime/pkg/containerd-shim-v2/shim_management.go`), runtime-rs on
//!   `/run/kata/<id>/shim-monitor.sock` (`mgmt_socket_addr` and `SHIM_MGMT_SOCK_NAME` in
//!   `src/libs/shim-interface/src/lib.rs`, `KATA_PATH = "/run/kata"`). Go clients
//!   (`ClientSocketAddress`) try the Go path first, then the runtime-rs one; so does
//!   [`MonitorPaths::default`]. (runtime-rs also resolves a unique id *prefix*; CNFS asks for
//!   the full id.)
//! - `GET /agent-url` (`AgentUrl` in shim_management.go, `AGENT_URL` in
//!   `src/libs/shim-interface/src/shim_mgmt/mod.rs`): Go answers 200 with the URL as plain
//!   text and no trailing newline (`fmt.Fprint(w, url)`), or 500 with the error text;
//!   runtime-rs (`agent_url_handler` in `src/runtime-rs/crates/runtimes/src/shim_mgmt/handlers.rs`,
//!   hyper) answers 200 with the URL, or 200 with an *empty* body when the sandbox has no
//!   agent socket yet, and 404 `URL NOT FOUND` for other paths. Neither sends JSON. Go's
//!   `kata-runtime exec` (`src/runtime/cmd/kata-runtime/kata-exec.go`, `getConn`) requires
//!   status 200 and strips one trailing newline; we trim all surrounding white space.
//! - URL forms: `vsock://<cid>:<port>` and `hvsock://<uds path>:<port>`
//!   (`VSock.String`/`HybridVSock.String` in `src/runtime/virtcontainers/types/sandbox.go`;
//!   runtime-rs `KataAgent::agent_sock` formats `<socket_address>:<server_port>`, where the
//!   hypervisor gives `vsock://<cid>` or `hvsock://<path>`). The port is kata-agent's (1024);
//!   `kata-runtime exec` keeps the cid or socket path and swaps in the debug console's port,
//!   which is what [`find_agent`] does with CNFS's port. Before the VM is up, runtime-rs
//!   answers `:<port>` (an empty socket address): treated as "not ready yet" and retried.
//!
//! The answer is untrusted input: hyper's HTTP/1.1 client (over a tokio `UnixStream`) reads
//! at most [`MAX_RESPONSE`] bytes of head and as much of body, only `vsock://` and `hvsock://`
//! URLs are accepted, and every problem is a [`KataError`] naming the socket; it never panics.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cnfs_protocols::agent;
use cnfs_protocols::agent_ttrpc::AgentClient;
use cnfs_protocols::spec::{self, SpecError};
use cnfs_protocols::transport::{self, AgentAddress};
use futures::future::{self, Either};
use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper::body::{Body, Bytes};
use hyper::header::{CONNECTION, HOST, TRANSFER_ENCODING};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tokio::time::Instant;

/// Go runtime's sandbox directory root.
pub const GO_SANDBOX_ROOT: &str = "/run/vc/sbs";
/// runtime-rs's sandbox directory root.
pub const RS_SANDBOX_ROOT: &str = "/run/kata";
/// The management socket's name in a sandbox directory (both runtimes).
pub const MONITOR_SOCKET_NAME: &str = "shim-monitor.sock";
/// Kata's management endpoint for the agent URL.
pub const AGENT_URL_PATH: &str = "/agent-url";
/// The most the client reads of a management answer's head, and of its body.
pub const MAX_RESPONSE: usize = 64 * 1024;

const BACKOFF_START: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// One management request never waits longer than this, whatever the overall deadline.
const HTTP_ATTEMPT_MAX: Duration = Duration::from_secs(5);
/// One connect + Ping never waits longer than this.
const AGENT_ATTEMPT_MAX: Duration = Duration::from_secs(5);
/// Every attempt gets at least this long, even when the deadline has (nearly) passed.
const ATTEMPT_MIN: Duration = Duration::from_millis(200);

/// Why a sandbox's guest could not be found or reached. Each variant is a different situation
/// for a caller; all messages name the socket or address involved.
#[derive(Debug, thiserror::Error)]
pub enum KataError {
    /// The sandbox id is not a valid identifier (checked before any path is built).
    #[error("{0}")]
    BadSandboxId(SpecError),
    /// None of the candidate management sockets exists.
    #[error(
        "no Kata shim management socket for sandbox {sandbox} (looked for {}{}); is the sandbox running?",
        list_paths(.tried),
        waited_for(*.waited)
    )]
    NoMonitorSocket {
        sandbox: String,
        tried: Vec<PathBuf>,
        waited: Duration,
    },
    /// The management socket exists but connecting, writing or reading failed.
    #[error("Kata management socket {}: {error}", .socket.display())]
    Io {
        socket: PathBuf,
        error: std::io::Error,
    },
    /// The management socket answered something that is not a usable HTTP/1.x response.
    #[error("Kata management socket {}: bad HTTP response: {detail}", .socket.display())]
    Http { socket: PathBuf, detail: String },
    /// The management socket answered with a status other than 200.
    #[error("Kata management socket {}: GET /agent-url answered HTTP {status}{}", .socket.display(), body_suffix(.body))]
    HttpStatus {
        socket: PathBuf,
        status: u16,
        body: String,
    },
    /// The shim has no agent URL yet (runtime-rs answers an empty or port-only URL before the
    /// VM is started).
    #[error("Kata management socket {}: sandbox has no agent URL yet (answered {url:?})", .socket.display())]
    NotReady { socket: PathBuf, url: String },
    /// The agent URL could not be used.
    #[error("Kata management socket {}: agent URL {url:?}: {reason}", .socket.display())]
    BadUrl {
        socket: PathBuf,
        url: String,
        reason: String,
    },
    /// The management socket did not answer in time.
    #[error("Kata management socket {}: no complete answer within {after:?}", .socket.display())]
    Timeout { socket: PathBuf, after: Duration },
    /// The guest agent did not answer a connect + Ping within the deadline.
    #[error("agent at {addr} unreachable: tried for {tried:.1?}, last error: {last}")]
    AgentUnreachable {
        addr: String,
        tried: Duration,
        last: String,
    },
}

impl KataError {
    /// Whether waiting may help (the shim or the VM may still be starting).
    pub fn is_transient(&self) -> bool {
        match self {
            KataError::NoMonitorSocket { .. }
            | KataError::Io { .. }
            | KataError::NotReady { .. }
            | KataError::Timeout { .. }
            | KataError::AgentUnreachable { .. } => true,
            // Go answers 500 while the sandbox cannot give a URL; a 4xx will not change.
            KataError::HttpStatus { status, .. } => *status >= 500,
            KataError::BadSandboxId(_) | KataError::Http { .. } | KataError::BadUrl { .. } => false,
        }
    }
}

fn list_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn waited_for(d: Duration) -> String {
    if d.is_zero() {
        String::new()
    } else {
        format!(", waited {d:.1?}")
    }
}

fn body_suffix(body: &str) -> String {
    if body.is_empty() {
        String::new()
    } else {
        format!(": {body}")
    }
}

/// Untrusted (guest) text shown back in an error: control characters escaped, length bounded.
pub fn printable(s: &str, max: usize) -> String {
    cnfs_protocols::spec::printable_within(s, max)
}

/// Where to look for a sandbox's management socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitorPaths {
    /// Sandbox directory roots: `<root>/<sandbox id>/shim-monitor.sock`, tried in order.
    roots: Vec<PathBuf>,
    /// An explicit socket, used instead of the roots.
    socket: Option<PathBuf>,
}

impl Default for MonitorPaths {
    /// The Go runtime's layout, then runtime-rs's.
    fn default() -> Self {
        MonitorPaths {
            roots: vec![
                PathBuf::from(GO_SANDBOX_ROOT),
                PathBuf::from(RS_SANDBOX_ROOT),
            ],
            socket: None,
        }
    }
}

impl MonitorPaths {
    /// Look under these sandbox directory roots instead of Kata's.
    pub fn with_roots(roots: Vec<PathBuf>) -> Self {
        MonitorPaths {
            roots,
            socket: None,
        }
    }

    /// Use exactly this management socket (`cnfsctl --monitor-socket`, tests).
    pub fn socket(path: impl Into<PathBuf>) -> Self {
        MonitorPaths {
            roots: Vec::new(),
            socket: Some(path.into()),
        }
    }

    /// The candidate sockets for `sandbox_id`, in the order they are tried. The id is
    /// validated first, so it can never climb out of a root (`..`, `/`).
    pub fn candidates(&self, sandbox_id: &str) -> Result<Vec<PathBuf>, KataError> {
        check_sandbox_id(sandbox_id)?;
        if let Some(s) = &self.socket {
            return Ok(vec![s.clone()]);
        }
        Ok(self
            .roots
            .iter()
            .map(|r| r.join(sandbox_id).join(MONITOR_SOCKET_NAME))
            .collect())
    }
}

/// The shared sandbox id rules, plus: never `.` or `..` (they would name a root itself or its
/// parent).
fn check_sandbox_id(id: &str) -> Result<(), KataError> {
    spec::validate_sandbox_id("sandbox id", id).map_err(KataError::BadSandboxId)?;
    if id == "." || id == ".." {
        return Err(KataError::BadSandboxId(SpecError {
            field: "sandbox id".into(),
            reason: "must not be \".\" or \"..\"".into(),
        }));
    }
    Ok(())
}

/// Asks the management socket for the sandbox's agent URL (kata-agent's port, as Kata gives
/// it). Bounded by `timeout` (connect, request and answer).
pub async fn agent_url(socket: &Path, timeout: Duration) -> Result<AgentAddress, KataError> {
    let body = tokio::time::timeout(timeout, http_get(socket, AGENT_URL_PATH))
        .await
        .map_err(|_| KataError::Timeout {
            socket: socket.to_path_buf(),
            after: timeout,
        })??;
    parse_agent_url(socket, &body)
}

/// Finds the sandbox's guest through its Kata shim and returns the address of CNFS's agent
/// (the guest's `port`). Retries with exponential backoff until `deadline` while the shim or
/// the VM may still be starting; at least one attempt is always made.
pub async fn find_agent(
    sandbox_id: &str,
    paths: &MonitorPaths,
    port: u32,
    deadline: Duration,
) -> Result<AgentAddress, KataError> {
    let candidates = paths.candidates(sandbox_id)?;
    let start = Instant::now();
    let end = deadline_at(start, deadline);
    let mut backoff = BACKOFF_START;
    loop {
        let mut last: Option<KataError> = None;
        for socket in &candidates {
            // A missing socket is expected (only one runtime is in use; the shim may not have
            // created it yet): try the next one.
            if tokio::fs::symlink_metadata(socket).await.is_err() {
                continue;
            }
            let budget = end
                .saturating_duration_since(Instant::now())
                .clamp(ATTEMPT_MIN, HTTP_ATTEMPT_MAX);
            match agent_url(socket, budget).await {
                Ok(addr) => return Ok(addr.with_port(port)),
                Err(e) => {
                    // Keep the most telling error: a permanent one wins over a transient one.
                    if !matches!(&last, Some(l) if !l.is_transient()) {
                        last = Some(e);
                    }
                }
            }
        }
        let err = last.unwrap_or_else(|| KataError::NoMonitorSocket {
            sandbox: sandbox_id.to_string(),
            tried: candidates.clone(),
            waited: start.elapsed(),
        });
        let now = Instant::now();
        if !err.is_transient() || now >= end {
            return Err(err);
        }
        tokio::time::sleep(backoff.min(end - now)).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Connects to the agent at `addr` and checks it answers `Ping`, retrying with exponential
/// backoff until `deadline` (the guest may still be booting, the agent not yet listening).
pub async fn connect_agent(
    addr: &AgentAddress,
    deadline: Duration,
) -> Result<AgentClient, KataError> {
    connect_and_ping(addr, deadline).await.map(|(c, _)| c)
}

/// [`connect_agent`], also returning the agent's `Ping` answer.
pub async fn connect_and_ping(
    addr: &AgentAddress,
    deadline: Duration,
) -> Result<(AgentClient, agent::PingResponse), KataError> {
    let start = Instant::now();
    let end = deadline_at(start, deadline);
    let mut backoff = BACKOFF_START;
    loop {
        let budget = end
            .saturating_duration_since(Instant::now())
            .clamp(ATTEMPT_MIN, AGENT_ATTEMPT_MAX);
        let attempt = async {
            let client = transport::connect(addr, budget)
                .await
                .map_err(|e| e.to_string())?;
            let ctx = ttrpc::context::with_timeout(budget.as_nanos() as i64);
            let ping = client
                .ping(ctx, &agent::PingRequest::new())
                .await
                .map_err(|e| format!("Ping: {e}"))?;
            Ok::<_, String>((client, ping))
        };
        let last = match tokio::time::timeout(budget, attempt).await {
            Ok(Ok(done)) => return Ok(done),
            Ok(Err(e)) => e,
            Err(_) => format!("no answer to connect + Ping within {budget:?}"),
        };
        let now = Instant::now();
        if now >= end {
            return Err(KataError::AgentUnreachable {
                addr: addr.to_string(),
                tried: start.elapsed(),
                last,
            });
        }
        tokio::time::sleep(backoff.min(end - now)).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// `start + deadline`, saturating (a caller may pass `Duration::MAX` for "no deadline").
fn deadline_at(start: Instant, deadline: Duration) -> Instant {
    start
        .checked_add(deadline)
        .unwrap_or_else(|| start + Duration::from_secs(365 * 86_400))
}

/// What an answer cut short by the end of the connection is called, wherever hyper notices it.
const INCOMPLETE: &str = "connection closed before the answer was complete";

/// `GET <path>` over the unix socket with hyper's HTTP/1.1 client; returns the body of a 200
/// answer. The head and the body are each bounded by [`MAX_RESPONSE`].
async fn http_get(socket: &Path, path: &str) -> Result<Vec<u8>, KataError> {
    let http = |detail: String| KataError::Http {
        socket: socket.to_path_buf(),
        detail,
    };
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|error| KataError::Io {
            socket: socket.to_path_buf(),
            error,
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        // Header names as Go's clients write them (`Host:`); the servers do not care.
        .title_case_headers(true)
        .max_buf_size(MAX_RESPONSE)
        .max_header_size(MAX_RESPONSE)
        .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(|e| hyper_error(socket, &e))?;
    let request = Request::get(path)
        .header(HOST, "localhost")
        .header(CONNECTION, "close")
        .body(Empty::new())
        .map_err(|e| http(format!("cannot build the request for {path:?}: {e}")))?;
    let exchange = async move {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| hyper_error(socket, &e))?;
        let status = response.status();
        // hyper hands over a body whose last transfer coding is not `chunked` still coded
        // (read to the end of the connection); nothing here can decode it.
        for te in response.headers().get_all(TRANSFER_ENCODING) {
            let value = String::from_utf8_lossy(te.as_bytes());
            let last = value.rsplit(',').next().unwrap_or_default().trim();
            if !last.eq_ignore_ascii_case("chunked") {
                return Err(http(format!(
                    "unsupported Transfer-Encoding {:?}",
                    printable(&value, 40)
                )));
            }
        }
        let body = response.into_body();
        // A declared length over the bound is refused before reading any of it.
        let declared = body.size_hint().lower();
        if declared > MAX_RESPONSE as u64 {
            return Err(http(format!(
                "Content-Length {declared} is larger than {} KiB",
                MAX_RESPONSE / 1024
            )));
        }
        let body = Limited::new(body, MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| body_error(socket, e))?
            .to_bytes();
        if status != StatusCode::OK {
            return Err(KataError::HttpStatus {
                socket: socket.to_path_buf(),
                status: status.as_u16(),
                body: printable(String::from_utf8_lossy(&body).trim(), 200),
            });
        }
        Ok(body.to_vec())
    };
    // The connection does the reading and writing; it is polled alongside the exchange and
    // dropped with it, so the caller's timeout cancels both.
    let drive = async move {
        // Its failures also reach the exchange (the pending response or the body), which
        // reports them.
        let _ = conn.await;
    };
    let exchange = std::pin::pin!(exchange);
    let drive = std::pin::pin!(drive);
    match future::select(exchange, drive).await {
        Either::Left((result, _)) => result,
        // The connection is done and dropped: the exchange now has its answer or an error.
        Either::Right(((), exchange)) => exchange.await,
    }
}

/// Sorts hyper's errors into what a caller can act on: I/O failures (transient) apart from
/// answers that are not usable HTTP (permanent).
fn hyper_error(socket: &Path, e: &hyper::Error) -> KataError {
    let http = |detail: String| KataError::Http {
        socket: socket.to_path_buf(),
        detail,
    };
    if e.is_parse_status() {
        return http(format!("bad status code ({})", error_chain(e)));
    }
    if e.is_parse() {
        let detail = error_chain(e);
        // `is_parse_too_large` is server-only; the client's message for it is documented at
        // `max_header_size`.
        if detail == "message head is too large" {
            return http(format!(
                "answer head is larger than {} KiB or has too many header fields",
                MAX_RESPONSE / 1024
            ));
        }
        return http(format!("not a valid HTTP/1.x answer ({detail})"));
    }
    if e.is_incomplete_message() {
        return http(INCOMPLETE.into());
    }
    let io = std::error::Error::source(e).and_then(|c| c.downcast_ref::<std::io::Error>());
    match io.map(|io| (io, io.kind())) {
        Some((_, std::io::ErrorKind::UnexpectedEof)) => http(INCOMPLETE.into()),
        // hyper's body decoder reports bad framing (a malformed chunk size line) this way.
        Some((_, std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData)) => {
            http(error_chain(e))
        }
        Some((io, kind)) => KataError::Io {
            socket: socket.to_path_buf(),
            error: match io.raw_os_error() {
                Some(code) => std::io::Error::from_raw_os_error(code),
                None => std::io::Error::new(kind, error_chain(e)),
            },
        },
        None => http(error_chain(e)),
    }
}

/// The error of reading a body through [`Limited`]: the bound, or hyper's own.
fn body_error(socket: &Path, e: Box<dyn std::error::Error + Send + Sync>) -> KataError {
    if e.is::<LengthLimitError>() {
        return KataError::Http {
            socket: socket.to_path_buf(),
            detail: format!("answer is larger than {} KiB", MAX_RESPONSE / 1024),
        };
    }
    match e.downcast_ref::<hyper::Error>() {
        Some(h) => hyper_error(socket, h),
        None => KataError::Http {
            socket: socket.to_path_buf(),
            detail: error_chain(&*e),
        },
    }
}

/// An error and its causes, `: `-separated (hyper's own message leaves out the cause).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    printable(&text, 200)
}

fn parse_agent_url(socket: &Path, body: &[u8]) -> Result<AgentAddress, KataError> {
    let bad = |url: &str, reason: String| KataError::BadUrl {
        socket: socket.to_path_buf(),
        url: printable(url, 200),
        reason,
    };
    let text = std::str::from_utf8(body).map_err(|_| {
        bad(
            &String::from_utf8_lossy(body),
            "answer is not UTF-8 text".into(),
        )
    })?;
    let url = text.trim();
    // runtime-rs: empty when it has no agent socket, `:<port>` before the VM is up.
    if url.is_empty() || (url.starts_with(':') && url[1..].bytes().all(|b| b.is_ascii_digit())) {
        return Err(KataError::NotReady {
            socket: socket.to_path_buf(),
            url: printable(url, 200),
        });
    }
    if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(bad(
            url,
            "contains white space or control characters".into(),
        ));
    }
    if !(url.starts_with("vsock://") || url.starts_with("hvsock://")) {
        return Err(bad(
            url,
            "Kata agent URLs are vsock://<cid>:<port> or hvsock://<path>:<port>".into(),
        ));
    }
    AgentAddress::parse(url).map_err(|e| match e {
        transport::TransportError::BadAddress(_, why) => bad(url, why.to_string()),
        other => bad(url, other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixListener;

    /// A scratch directory, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new() -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "cnfs-kata-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).expect("scratch dir");
            Scratch(p)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A stand-in management server: answers every connection with `reply` (after `delay`),
    /// checking that the request is `GET /agent-url`.
    fn serve(path: &Path, reply: Vec<u8>, delay: Duration) -> tokio::task::JoinHandle<()> {
        let listener = UnixListener::bind(path).expect("bind");
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let reply = reply.clone();
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut b = [0u8; 512];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut b).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&b[..n]),
                        }
                    }
                    let req = String::from_utf8_lossy(&req).to_string();
                    assert!(req.starts_with("GET /agent-url HTTP/1.1\r\n"), "{req}");
                    assert!(req.contains("\r\nHost: localhost\r\n"), "{req}");
                    tokio::time::sleep(delay).await;
                    let _ = s.write_all(&reply).await;
                    let _ = s.shutdown().await;
                });
            }
        })
    }

    fn ok_reply(body: &str) -> Vec<u8> {
        // What Go's net/http sends for `fmt.Fprint(w, url)` to a `Connection: close` request.
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Date: Mon, 01 Jan 2026 00:00:00 GMT\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    const T: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn plain_body_as_go_sends_it() {
        let d = Scratch::new();
        let sock = d.0.join("m.sock");
        let _srv = serve(&sock, ok_reply("vsock://3:1024"), Duration::ZERO);
        let a = agent_url(&sock, T).await.expect("url");
        assert_eq!(a, AgentAddress::Vsock { cid: 3, port: 1024 });
    }

    #[tokio::test]
    async fn body_with_trailing_newline_and_no_length() {
        let d = Scratch::new();
        let sock = d.0.join("m.sock");
        // Delimited by the end of the connection, with a trailing newline.
        let reply = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhvsock:///run/vc/firecracker/abc/root/kata.hvsock:1024\n".to_vec();
        let _srv = serve(&sock, reply, Duration::ZERO);
        let a = agent_url(&sock, T).await.expect("url");
        assert_eq!(
            a,
            AgentAddress::Hvsock {
                path: "/run/vc/firecracker/abc/root/kata.hvsock".into(),
                port: 1024
            }
        );
        let sock2 = d.0.join("m2.sock");
        let _srv2 = serve(&sock2, ok_reply("vsock://7:1024\r\n"), Duration::ZERO);
        assert_eq!(
            agent_url(&sock2, T).await.expect("url"),
            AgentAddress::Vsock { cid: 7, port: 1024 }
        );
    }

    #[tokio::test]
    async fn chunked_body_with_extension_and_trailer() {
        let d = Scratch::new();
        let sock = d.0.join("m.sock");
        let reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                      9\r\nhvsock://\r\n19;ext=1\r\n/run/kata/sb/root/kata.hv\r\n\
                      9\r\nsock:1024\r\n0\r\nX-Trailer: y\r\n\r\n"
            .to_vec();
        let _srv = serve(&sock, reply, Duration::ZERO);
        let a = agent_url(&sock, T).await.expect("url");
        assert_eq!(
            a,
            AgentAddress::Hvsock {
                path: "/run/kata/sb/root/kata.hvsock".into(),
                port: 1024
            }
        );
    }

    #[tokio::test]
    async fn error_statuses_are_reported_with_their_body() {
        let d = Scratch::new();
        for (i, (reply, status)) in [
            (
                "HTTP/1.1 404 Not Found\r\nContent-Length: 13\r\n\r\nURL NOT FOUND",
                404,
            ),
            (
                "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 22\r\n\r\nsandbox not\nready\x1b[0m!",
                500,
            ),
        ]
        .into_iter()
        .enumerate()
        {
            let sock = d.0.join(format!("m{i}.sock"));
            let _srv = serve(&sock, reply.as_bytes().to_vec(), Duration::ZERO);
            let e = agent_url(&sock, T).await.expect_err("status");
            match &e {
                KataError::HttpStatus { status: s, .. } => assert_eq!(*s, status),
                other => panic!("{other:?}"),
            }
            let msg = e.to_string();
            assert!(msg.contains(&sock.display().to_string()), "{msg}");
            assert!(msg.contains(&format!("HTTP {status}")), "{msg}");
            // Control characters from the answer never reach the message raw.
            assert!(!msg.contains('\x1b') && !msg.contains('\n'), "{msg:?}");
            assert_eq!(e.is_transient(), status >= 500);
        }
    }

    #[tokio::test]
    async fn garbage_and_bad_urls_are_refused_with_a_reason() {
        let d = Scratch::new();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                b"SSH-2.0-OpenSSH_9.2\r\n".to_vec(),
                "not a valid HTTP/1.x answer",
            ),
            (
                b"\x00\x01\x02\x03garbage\r\n\r\n".to_vec(),
                "not a valid HTTP/1.x answer",
            ),
            (b"HTTP/1.1 2000 OK\r\n\r\n".to_vec(), "bad status code"),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\n".to_vec(),
                "invalid content-length",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd".to_vec(),
                "invalid content-length",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n".to_vec(),
                "unsupported Transfer-Encoding",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n"
                    .to_vec(),
                "chunk size",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nvsock".to_vec(),
                "before the answer was complete",
            ),
            (Vec::new(), "closed before the answer was complete"),
            (ok_reply("tcp://1.2.3.4:1024"), "vsock://<cid>:<port>"),
            (ok_reply("unix:///run/evil.sock"), "vsock://<cid>:<port>"),
            (ok_reply("vsock://x:1024"), "cid is not a number"),
            (ok_reply("hvsock://relative:1024"), "must be absolute"),
            (ok_reply("vsock://3:1024 extra"), "white space"),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n\xff\xfe\xfd\xfc".to_vec(),
                "not UTF-8",
            ),
        ];
        for (i, (reply, want)) in cases.into_iter().enumerate() {
            let sock = d.0.join(format!("g{i}.sock"));
            let _srv = serve(&sock, reply, Duration::ZERO);
            let e = agent_url(&sock, T).await.expect_err(want);
            let msg = e.to_string();
            assert!(msg.contains(want), "case {i}: {msg}");
            assert!(msg.contains(&sock.display().to_string()), "{msg}");
            assert!(!e.is_transient(), "case {i}: {e:?}");
        }
    }

    #[tokio::test]
    async fn runtime_rs_answers_before_the_vm_is_up_are_not_ready() {
        let d = Scratch::new();
        for (i, body) in ["", ":1024", "\n"].into_iter().enumerate() {
            let sock = d.0.join(format!("n{i}.sock"));
            let _srv = serve(&sock, ok_reply(body), Duration::ZERO);
            let e = agent_url(&sock, T).await.expect_err("not ready");
            assert!(matches!(e, KataError::NotReady { .. }), "{e:?}");
            assert!(e.is_transient());
        }
    }

    #[tokio::test]
    async fn oversized_answers_are_cut_off() {
        let d = Scratch::new();
        let sock = d.0.join("big.sock");
        let mut reply = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        reply.extend(vec![b'a'; MAX_RESPONSE + 10]);
        let _srv = serve(&sock, reply, Duration::ZERO);
        let e = agent_url(&sock, T).await.expect_err("too big");
        assert!(e.to_string().contains("larger than 64 KiB"), "{e}");
        // A declared length over the bound is refused before reading it.
        let sock2 = d.0.join("big2.sock");
        let _srv2 = serve(
            &sock2,
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\nvsock://3:1024".to_vec(),
            Duration::ZERO,
        );
        let e = agent_url(&sock2, T).await.expect_err("too big");
        assert!(e.to_string().contains("larger than 64 KiB"), "{e}");
        // Endless headers, too.
        let sock3 = d.0.join("big3.sock");
        let mut reply = b"HTTP/1.1 200 OK\r\n".to_vec();
        for _ in 0..5000 {
            reply.extend_from_slice(b"X-Pad: 0123456789\r\n");
        }
        let _srv3 = serve(&sock3, reply, Duration::ZERO);
        let e = agent_url(&sock3, T).await.expect_err("too big");
        assert!(e.to_string().contains("head is larger than 64 KiB"), "{e}");
    }

    #[tokio::test]
    async fn a_slow_server_times_out() {
        let d = Scratch::new();
        let sock = d.0.join("slow.sock");
        let _srv = serve(&sock, ok_reply("vsock://3:1024"), Duration::from_secs(30));
        let t0 = std::time::Instant::now();
        let e = agent_url(&sock, Duration::from_millis(300))
            .await
            .expect_err("slow");
        assert!(matches!(e, KataError::Timeout { .. }), "{e:?}");
        assert!(t0.elapsed() < Duration::from_secs(3));
        assert!(e.to_string().contains("slow.sock"), "{e}");
    }

    #[tokio::test]
    async fn an_answer_with_a_length_does_not_wait_for_the_connection_to_close() {
        let d = Scratch::new();
        let sock = d.0.join("keep.sock");
        let listener = UnixListener::bind(&sock).expect("bind");
        let _srv = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut b = [0u8; 512];
            let _ = s.read(&mut b).await;
            s.write_all(&ok_reply("vsock://3:1024"))
                .await
                .expect("write");
            // Keep the connection open.
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let a = agent_url(&sock, Duration::from_secs(2))
            .await
            .expect("answer without waiting for close");
        assert_eq!(a, AgentAddress::Vsock { cid: 3, port: 1024 });
    }

    #[tokio::test]
    async fn find_agent_retries_until_the_socket_appears_and_swaps_the_port() {
        let d = Scratch::new();
        let go = d.0.join("vc");
        let rs = d.0.join("kata");
        let paths = MonitorPaths::with_roots(vec![go.clone(), rs.clone()]);
        let sid = "0123abcd";
        let sock = rs.join(sid).join(MONITOR_SOCKET_NAME);
        let sock2 = sock.clone();
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(400)).await;
            std::fs::create_dir_all(sock2.parent().expect("parent")).expect("dir");
            // Serves until the test ends.
            let _ = serve(&sock2, ok_reply("vsock://42:1024"), Duration::ZERO).await;
        });
        let t0 = std::time::Instant::now();
        let a = find_agent(sid, &paths, 17230, Duration::from_secs(10))
            .await
            .expect("found");
        assert_eq!(
            a,
            AgentAddress::Vsock {
                cid: 42,
                port: 17230
            }
        );
        assert!(t0.elapsed() >= Duration::from_millis(400));
        late.abort();

        // Nothing there at all: the error lists both places and says how long it waited.
        let t0 = std::time::Instant::now();
        let e = find_agent("other", &paths, 17230, Duration::from_millis(300))
            .await
            .expect_err("absent");
        assert!(t0.elapsed() < Duration::from_secs(3));
        match &e {
            KataError::NoMonitorSocket { tried, .. } => assert_eq!(
                tried,
                &vec![
                    go.join("other").join(MONITOR_SOCKET_NAME),
                    rs.join("other").join(MONITOR_SOCKET_NAME)
                ]
            ),
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().contains("waited"), "{e}");
    }

    #[tokio::test]
    async fn find_agent_waits_out_not_ready_but_stops_at_a_permanent_error() {
        let d = Scratch::new();
        let sock = d.0.join("m.sock");
        // First answers "not ready" (runtime-rs before the VM is up), then the URL.
        let listener = UnixListener::bind(&sock).expect("bind");
        let _srv = tokio::spawn(async move {
            for body in [":1024", "", "hvsock:///run/kata/x/root/kata.hvsock:1024"] {
                let (mut s, _) = listener.accept().await.expect("accept");
                let mut b = [0u8; 512];
                let _ = s.read(&mut b).await;
                let _ = s.write_all(&ok_reply(body)).await;
            }
        });
        let a = find_agent(
            "x",
            &MonitorPaths::socket(&sock),
            17230,
            Duration::from_secs(10),
        )
        .await
        .expect("found");
        assert_eq!(
            a,
            AgentAddress::Hvsock {
                path: "/run/kata/x/root/kata.hvsock".into(),
                port: 17230
            }
        );

        let sock2 = d.0.join("404.sock");
        let _srv2 = serve(
            &sock2,
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
            Duration::ZERO,
        );
        let t0 = std::time::Instant::now();
        let e = find_agent(
            "x",
            &MonitorPaths::socket(&sock2),
            17230,
            Duration::from_secs(30),
        )
        .await
        .expect_err("404");
        assert!(
            matches!(e, KataError::HttpStatus { status: 404, .. }),
            "{e:?}"
        );
        assert!(t0.elapsed() < Duration::from_secs(5), "no retry on 404");
    }

    #[tokio::test]
    async fn a_stale_socket_is_retried_until_the_deadline() {
        let d = Scratch::new();
        let sock = d.0.join("stale.sock");
        // A socket file nobody listens on, as a crashed shim leaves behind.
        drop(std::os::unix::net::UnixListener::bind(&sock).expect("bind"));
        let t0 = std::time::Instant::now();
        let e = find_agent(
            "x",
            &MonitorPaths::socket(&sock),
            17230,
            Duration::from_millis(400),
        )
        .await
        .expect_err("stale");
        assert!(t0.elapsed() >= Duration::from_millis(400));
        assert!(matches!(e, KataError::Io { .. }), "{e:?}");
        assert!(e.is_transient());
        let msg = e.to_string();
        assert!(
            msg.contains("stale.sock") && msg.contains("refused"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn bad_sandbox_ids_never_become_paths() {
        let d = Scratch::new();
        let paths = MonitorPaths::with_roots(vec![d.0.clone()]);
        for bad in ["../x", "a/b", "", ".", "..", "a b", "x\0", &"a".repeat(129)] {
            let e = find_agent(bad, &paths, 17230, Duration::from_secs(5))
                .await
                .expect_err(bad);
            assert!(matches!(e, KataError::BadSandboxId(_)), "{bad:?}: {e:?}");
            assert!(!e.is_transient());
            assert!(MonitorPaths::default().candidates(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            MonitorPaths::default().candidates("abc").expect("ok"),
            vec![
                PathBuf::from("/run/vc/sbs/abc/shim-monitor.sock"),
                PathBuf::from("/run/kata/abc/shim-monitor.sock")
            ]
        );
        assert_eq!(
            MonitorPaths::socket("/tmp/m.sock")
                .candidates("abc")
                .expect("ok"),
            vec![PathBuf::from("/tmp/m.sock")]
        );
    }

    #[tokio::test]
    async fn connect_agent_reports_how_long_it_tried() {
        let d = Scratch::new();
        let addr = AgentAddress::Unix {
            path: d.0.join("no-agent.sock"),
        };
        let t0 = std::time::Instant::now();
        let e = connect_agent(&addr, Duration::from_millis(500))
            .await
            .err()
            .expect("unreachable");
        assert!(t0.elapsed() < Duration::from_secs(3));
        match &e {
            KataError::AgentUnreachable { tried, last, .. } => {
                assert!(*tried >= Duration::from_millis(500), "{tried:?}");
                assert!(last.contains("no-agent.sock"), "{last}");
            }
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().contains("tried for"), "{e}");
    }

    /// Like [`serve`], but writes the answer a few bytes at a time.
    fn serve_in_pieces(path: &Path, reply: Vec<u8>) -> tokio::task::JoinHandle<()> {
        let listener = UnixListener::bind(path).expect("bind");
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut b = [0u8; 512];
            let _ = s.read(&mut b).await;
            for piece in reply.chunks(3) {
                s.write_all(piece).await.expect("write");
                s.flush().await.expect("flush");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            // Keep the connection open: the framing alone must end the answer.
            tokio::time::sleep(Duration::from_secs(30)).await;
        })
    }

    #[tokio::test]
    async fn answers_arriving_in_small_pieces_are_read_whole() {
        let d = Scratch::new();
        let sock = d.0.join("len.sock");
        let _srv = serve_in_pieces(&sock, ok_reply("vsock://3:1024"));
        assert_eq!(
            agent_url(&sock, T).await.expect("url"),
            AgentAddress::Vsock { cid: 3, port: 1024 }
        );
        let sock2 = d.0.join("chunked.sock");
        let _srv2 = serve_in_pieces(
            &sock2,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
              8\r\nvsock://\r\n6\r\n9:1024\r\n0\r\n\r\n"
                .to_vec(),
        );
        assert_eq!(
            agent_url(&sock2, T).await.expect("url"),
            AgentAddress::Vsock { cid: 9, port: 1024 }
        );
    }
}
