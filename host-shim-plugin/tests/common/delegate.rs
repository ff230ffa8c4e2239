//! A stand-in delegate shim that speaks raw ttrpc frames and keeps the rules a Go ttrpc server
//! (Kata's and runc's shims) enforces: request stream ids are odd and each one is above the
//! last ("StreamID cannot be re-used and must increment"). It answers task `Connect` with a pid
//! the test chooses, `Huge` with a reply over the frame bound, and anything else with OK and
//! the request's payload echoed, and records every frame it receives. Included by path from
//! the proxy suites (not through `common/mod.rs`, which other suites share). A request flagged
//! "remote open" (the client streams data after it) is answered when the data frame that
//! closes the client's side arrives, as a client-streaming ttrpc call is.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cnfs_host_shim::shim::frames::{
    Frame, Incoming, FLAG_REMOTE_CLOSED, MAX_PAYLOAD, TYPE_DATA, TYPE_REQUEST, TYPE_RESPONSE,
};
use containerd_shim_protos::api::ConnectResponse;
use protobuf::Message;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;

pub const TASK: &str = "containerd.task.v2.Task";
/// ttrpc's flag on a request whose client will send data frames after it.
pub const FLAG_REMOTE_OPEN: u8 = 2;

/// One frame as the delegate received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub stream_id: u32,
    pub kind: u8,
    /// The request's method, or empty for a data frame.
    pub method: String,
    /// The request's payload, or the data frame's.
    pub payload: Vec<u8>,
    /// Whether the delegate refused it for its stream id.
    pub refused_id: bool,
}

pub struct FakeDelegate {
    pub path: PathBuf,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub seen_changed: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeDelegate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeDelegate {
    /// Listens on `path`; `Connect` answers `shim_pid`.
    pub fn start(path: &Path, shim_pid: u32) -> FakeDelegate {
        let listener = UnixListener::bind(path).expect("bind the fake delegate");
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let seen_changed = Arc::new(Notify::new());
        let (s, n) = (seen.clone(), seen_changed.clone());
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(serve(conn, shim_pid, s.clone(), n.clone()));
            }
        });
        FakeDelegate {
            path: path.to_path_buf(),
            seen,
            seen_changed,
            task,
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }

    /// Waits (up to 20 s) until `pred` holds for what the delegate has seen.
    pub async fn wait_for(&self, what: &str, pred: impl Fn(&[Seen]) -> bool) -> Vec<Seen> {
        let until = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let notified = self.seen_changed.notified();
            let seen = self.seen();
            if pred(&seen) {
                return seen;
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                panic!("the delegate never saw {what}; it saw {seen:?}");
            }
        }
    }

    /// The methods of the requests seen, in order (Connect probes left out).
    pub fn methods(&self) -> Vec<String> {
        self.seen()
            .into_iter()
            .filter(|s| s.kind == TYPE_REQUEST && s.method != "Connect")
            .map(|s| s.method)
            .collect()
    }
}

async fn serve(conn: UnixStream, shim_pid: u32, seen: Arc<Mutex<Vec<Seen>>>, changed: Arc<Notify>) {
    let (mut rd, mut wr) = conn.into_split();
    let mut last = 0u32;
    // Streaming requests waiting for their client to close its side.
    let mut open: std::collections::HashMap<u32, ttrpc::proto::Request> = Default::default();
    while let Ok(Some(Incoming::Frame(f))) = Frame::read(&mut rd).await {
        let mut record = Seen {
            stream_id: f.stream_id,
            kind: f.kind,
            method: String::new(),
            payload: f.payload.clone(),
            refused_id: false,
        };
        let reply = if f.kind == TYPE_REQUEST {
            let req = ttrpc::proto::Request::parse_from_bytes(&f.payload).unwrap_or_default();
            record.method = req.method.clone();
            record.payload = req.payload.clone();
            if f.stream_id % 2 != 1 || f.stream_id <= last {
                record.refused_id = true;
                Some(Frame::error_response(
                    f.stream_id,
                    ttrpc::Code::INVALID_ARGUMENT,
                    "StreamID cannot be re-used and must increment",
                ))
            } else if f.flags & FLAG_REMOTE_OPEN != 0 {
                last = f.stream_id;
                open.insert(f.stream_id, req);
                None
            } else {
                last = f.stream_id;
                Some(answer(f.stream_id, &req, shim_pid))
            }
        } else if f.kind == TYPE_DATA && f.flags & FLAG_REMOTE_CLOSED != 0 {
            open.remove(&f.stream_id)
                .map(|req| answer(f.stream_id, &req, shim_pid))
        } else {
            None
        };
        seen.lock().expect("seen").push(record);
        changed.notify_waiters();
        if let Some(reply) = reply {
            if reply.payload.len() > MAX_PAYLOAD {
                // Written by hand: larger than the codec's callers would ever send.
                let mut head = (reply.payload.len() as u32).to_be_bytes().to_vec();
                head.extend_from_slice(&reply.stream_id.to_be_bytes());
                head.extend_from_slice(&[TYPE_RESPONSE, 0]);
                if wr.write_all(&head).await.is_err() || wr.write_all(&reply.payload).await.is_err()
                {
                    return;
                }
            } else if reply.write(&mut wr).await.is_err() {
                return;
            }
        }
    }
}

fn answer(stream_id: u32, req: &ttrpc::proto::Request, shim_pid: u32) -> Frame {
    let payload = match (req.service.as_str(), req.method.as_str()) {
        (TASK, "Connect") => ConnectResponse {
            shim_pid,
            ..Default::default()
        }
        .write_to_bytes()
        .expect("encode"),
        (_, "Huge") => vec![7u8; MAX_PAYLOAD + 1],
        _ => req.payload.clone(),
    };
    let mut resp = ttrpc::proto::Response::new();
    resp.payload = payload;
    Frame {
        stream_id,
        kind: TYPE_RESPONSE,
        flags: 0,
        payload: resp.write_to_bytes().expect("encode"),
    }
}

/// containerd's side: one connection to the wrapper.
pub struct Client {
    pub rd: tokio::net::unix::OwnedReadHalf,
    pub wr: tokio::net::unix::OwnedWriteHalf,
}

impl Client {
    pub async fn connect(path: &Path) -> Client {
        let (rd, wr) = UnixStream::connect(path)
            .await
            .expect("connect to the wrapper")
            .into_split();
        Client { rd, wr }
    }

    /// Sends a request; `payload` is the method's message, already encoded.
    pub async fn call(&mut self, stream_id: u32, service: &str, method: &str, payload: &[u8]) {
        self.call_flagged(stream_id, 0, service, method, payload)
            .await
    }

    /// A request with header flags (`FLAG_REMOTE_OPEN`: data frames follow).
    pub async fn call_flagged(
        &mut self,
        stream_id: u32,
        flags: u8,
        service: &str,
        method: &str,
        payload: &[u8],
    ) {
        let mut req = ttrpc::proto::Request::new();
        req.service = service.into();
        req.method = method.into();
        req.payload = payload.to_vec();
        let frame = Frame {
            stream_id,
            kind: TYPE_REQUEST,
            flags,
            payload: req.write_to_bytes().expect("encode"),
        };
        frame.write(&mut self.wr).await.expect("send");
    }

    /// A data frame; `close` ends the client's side of the stream.
    pub async fn data(&mut self, stream_id: u32, payload: &[u8], close: bool) {
        let frame = Frame {
            stream_id,
            kind: TYPE_DATA,
            flags: if close { FLAG_REMOTE_CLOSED } else { 0 },
            payload: payload.to_vec(),
        };
        frame.write(&mut self.wr).await.expect("send");
    }

    /// The next reply, within `bound`; `None` if none came in time.
    pub async fn reply_within(&mut self, bound: Duration) -> Option<Reply> {
        let read = tokio::time::timeout(bound, Frame::read(&mut self.rd))
            .await
            .ok()?;
        match read {
            Ok(Some(Incoming::Frame(f))) => Some(Reply::of(&f)),
            other => panic!("the wrapper's connection failed: {other:?}"),
        }
    }

    /// The next reply (20 s at most).
    pub async fn reply(&mut self) -> Reply {
        self.reply_within(Duration::from_secs(20))
            .await
            .expect("a reply within 20 s")
    }
}

/// A response as containerd reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub stream_id: u32,
    pub code: ttrpc::Code,
    pub message: String,
    pub payload: Vec<u8>,
}

impl Reply {
    fn of(f: &Frame) -> Reply {
        assert_eq!(f.kind, TYPE_RESPONSE, "a response frame: {f:?}");
        let r = ttrpc::proto::Response::parse_from_bytes(&f.payload).expect("a ttrpc response");
        let (code, message) = r
            .status
            .as_ref()
            .map(|s| (s.code(), s.message.clone()))
            .unwrap_or((ttrpc::Code::OK, String::new()));
        Reply {
            stream_id: f.stream_id,
            code,
            message,
            payload: r.payload,
        }
    }
}
