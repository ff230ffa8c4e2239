//! Every connection passes a gate before ttrpc sees its bytes. ttrpc allocates a request at
//! the length its header announces (up to 4 MiB) and accepts any number of connections and
//! requests, so a flood of large frames or idle connections could exhaust a small guest's
//! memory or descriptors. The gate reads whole frames itself, and:
//! - bounds a request frame (`Limits::max_frame`): a larger one is skipped without being
//!   buffered and answered `RESOURCE_EXHAUSTED`; the connection stays usable;
//! - bounds the connections (`Limits::max_connections`): at the cap, the least recently
//!   active connection with nothing in flight is closed to admit the new one, so idle
//!   connections can never lock the host out; if every connection is busy the new one is
//!   closed at once. Closed connections keep their descriptor until ttrpc lets go of them
//!   (up to its 5 s connection shutdown); twice the cap of them at most, so descriptors
//!   stay bounded whatever the rate of new connections;
//! - bounds the requests in flight per connection (`Limits::max_in_flight`);
//! - screens every request: an unknown service or method is `UNIMPLEMENTED` (as Go's ttrpc
//!   answers both), a body that is not the method's message is `INVALID_ARGUMENT`.
//!
//! Refusals are answered by ttrpc itself: the gate rewrites a refused request into a call of
//! the hidden method [`REFUSE_METHOD`] carrying the status, whose handler ([`Refuse`]) returns
//! it. Responses therefore come from ttrpc's one writer and never interleave with its frames.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use async_trait::async_trait;
use futures::task::AtomicWaker;
use protobuf::Message;
use slog::{warn, Logger};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use ttrpc::proto::{Request, Response, Status};
use ttrpc::r#async::{MethodHandler, TtrpcContext};
use ttrpc::Code;

const HEADER_LEN: usize = 10;
const TYPE_REQUEST: u8 = 1;
const TYPE_RESPONSE: u8 = 2;
/// The hidden method refused requests are rewritten to. Not a valid protobuf identifier, so
/// no generated client can name it; a caller that does gets `UNIMPLEMENTED`.
pub const REFUSE_METHOD: &str = "_refuse";

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_frame: usize,
    pub max_connections: usize,
    pub max_in_flight: usize,
}

impl Default for Limits {
    /// A request is a few hundred bytes; 64 KiB leaves room for any valid one. 64
    /// connections × 64 KiB bounds what callers can make the agent buffer at 4 MiB.
    fn default() -> Self {
        Limits {
            max_frame: 64 << 10,
            max_connections: 64,
            max_in_flight: 16,
        }
    }
}

/// Checks that a request body decodes as the method's message.
pub type BodyCheck = fn(&[u8]) -> Result<(), String>;

/// The service a gate lets through, and one body check per method.
pub struct Screen {
    pub service: String,
    pub methods: HashMap<String, BodyCheck>,
}

struct ConnState {
    /// Milliseconds since the gate's epoch of the last byte in or out.
    last_active: AtomicU64,
    /// Requests passed to ttrpc whose response has not been written yet.
    in_flight: AtomicUsize,
    closed: AtomicBool,
    waker: AtomicWaker,
}

impl ConnState {
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.waker.wake();
    }
}

struct Table {
    next: u64,
    /// Connections admitted and not closed.
    conns: HashMap<u64, Arc<ConnState>>,
    /// Connections whose socket is still held (admitted, closed or not).
    held: usize,
}

pub struct Gate {
    limits: Limits,
    screen: Arc<Screen>,
    table: Arc<Mutex<Table>>,
    epoch: Instant,
    log: Logger,
    /// Rate limit for refusal log lines (one a second at most).
    last_warn: AtomicU64,
    suppressed: AtomicU64,
}

impl Gate {
    pub fn new(limits: Limits, screen: Screen, log: Logger) -> Self {
        Gate {
            limits,
            screen: Arc::new(screen),
            table: Arc::new(Mutex::new(Table {
                next: 0,
                conns: HashMap::new(),
                held: 0,
            })),
            epoch: Instant::now(),
            log,
            last_warn: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Open connections right now.
    pub fn connections(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .conns
            .len()
    }

    /// Admits a new connection, closing the least recently active idle one at the cap.
    /// `None`: every connection is busy; the caller drops `io`, which closes it.
    pub fn admit<S>(&self, io: S) -> Option<Gated<S>> {
        let (id, state, evicted) = {
            let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
            let mut evicted = false;
            if t.held >= 2 * self.limits.max_connections {
                drop(t);
                self.warn_limited("refused a connection: too many connections are still closing");
                return None;
            }
            if t.conns.len() >= self.limits.max_connections {
                let victim = t
                    .conns
                    .iter()
                    .filter(|(_, c)| c.in_flight.load(Ordering::SeqCst) == 0)
                    .min_by_key(|(_, c)| c.last_active.load(Ordering::SeqCst))
                    .map(|(id, _)| *id);
                match victim {
                    Some(v) => {
                        if let Some(c) = t.conns.remove(&v) {
                            c.close();
                        }
                        evicted = true;
                    }
                    None => {
                        drop(t);
                        self.warn_limited(
                            "refused a connection: every open connection has a request in flight",
                        );
                        return None;
                    }
                }
            }
            t.next += 1;
            let id = t.next;
            let state = Arc::new(ConnState {
                last_active: AtomicU64::new(self.now_ms()),
                in_flight: AtomicUsize::new(0),
                closed: AtomicBool::new(false),
                waker: AtomicWaker::new(),
            });
            t.conns.insert(id, state.clone());
            t.held += 1;
            (id, state, evicted)
        };
        if evicted {
            self.warn_limited(
                "closed the least recently active idle connection: at the connection limit",
            );
        }
        Some(Gated {
            io,
            id,
            state,
            table: self.table.clone(),
            screen: self.screen.clone(),
            limits: self.limits,
            epoch: self.epoch,
            rd: ReadSide::default(),
            wr: Scanner::default(),
        })
    }

    fn warn_limited(&self, msg: &'static str) {
        let now = self.now_ms();
        let last = self.last_warn.load(Ordering::Relaxed);
        if now.saturating_sub(last) < 1000 && last != 0 {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.last_warn.store(now, Ordering::Relaxed);
        let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
        warn!(self.log, "{}", msg; "limit" => self.limits.max_connections,
            "similar_suppressed" => suppressed);
    }
}

/// Where the incoming byte stream is: inside a header, a kept body or a skipped body.
struct ReadSide {
    hdr: [u8; HEADER_LEN],
    hdr_len: usize,
    len: usize,
    stream: u32,
    kind: u8,
    flags: u8,
    body: Vec<u8>,
    discard: usize,
    /// Bytes ready for ttrpc (one whole frame at most).
    ready: Vec<u8>,
    ready_pos: usize,
    scratch: Box<[u8]>,
    scratch_pos: usize,
    scratch_len: usize,
}

impl Default for ReadSide {
    fn default() -> Self {
        ReadSide {
            hdr: [0; HEADER_LEN],
            hdr_len: 0,
            len: 0,
            stream: 0,
            kind: 0,
            flags: 0,
            body: Vec::new(),
            discard: 0,
            ready: Vec::new(),
            ready_pos: 0,
            scratch: vec![0; 8192].into_boxed_slice(),
            scratch_pos: 0,
            scratch_len: 0,
        }
    }
}

/// Counts whole frames in the outgoing byte stream (responses end requests in flight).
#[derive(Default)]
struct Scanner {
    hdr: [u8; HEADER_LEN],
    hdr_len: usize,
    remaining: usize,
}

impl Scanner {
    /// Feeds written bytes; returns how many response frames started in them.
    fn feed(&mut self, mut bytes: &[u8]) -> usize {
        let mut responses = 0;
        while !bytes.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(bytes.len());
                self.remaining -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (HEADER_LEN - self.hdr_len).min(bytes.len());
            self.hdr[self.hdr_len..self.hdr_len + n].copy_from_slice(&bytes[..n]);
            self.hdr_len += n;
            bytes = &bytes[n..];
            if self.hdr_len == HEADER_LEN {
                self.hdr_len = 0;
                self.remaining =
                    u32::from_be_bytes([self.hdr[0], self.hdr[1], self.hdr[2], self.hdr[3]])
                        as usize;
                if self.hdr[8] == TYPE_RESPONSE {
                    responses += 1;
                }
            }
        }
        responses
    }
}

/// A connection behind the gate.
pub struct Gated<S> {
    io: S,
    id: u64,
    state: Arc<ConnState>,
    table: Arc<Mutex<Table>>,
    screen: Arc<Screen>,
    limits: Limits,
    epoch: Instant,
    rd: ReadSide,
    wr: Scanner,
}

enum Verdict {
    Pass,
    Refuse(Code, String),
}

impl<S> Gated<S> {
    fn touch(&self) {
        self.state.last_active.store(
            self.epoch.elapsed().as_millis() as u64 + 1,
            Ordering::SeqCst,
        );
    }

    /// Consumes scratch bytes until they run out or one frame is ready.
    fn feed(&mut self) {
        while self.rd.scratch_pos < self.rd.scratch_len && self.rd.ready.is_empty() {
            let max_frame = self.limits.max_frame;
            let ReadSide {
                hdr,
                hdr_len,
                len,
                stream,
                kind,
                flags,
                body,
                discard,
                scratch,
                scratch_pos,
                scratch_len,
                ..
            } = &mut self.rd;
            let avail = &scratch[*scratch_pos..*scratch_len];
            let mut done = false;
            let mut skipped = false;
            if *hdr_len < HEADER_LEN {
                let n = (HEADER_LEN - *hdr_len).min(avail.len());
                hdr[*hdr_len..*hdr_len + n].copy_from_slice(&avail[..n]);
                *hdr_len += n;
                *scratch_pos += n;
                if *hdr_len == HEADER_LEN {
                    *len = u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as usize;
                    *stream = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
                    *kind = hdr[8];
                    *flags = hdr[9];
                    body.clear();
                    if *len > max_frame {
                        *discard = *len;
                    } else {
                        done = *len == 0;
                    }
                }
            } else if *discard > 0 {
                let n = (*discard).min(avail.len());
                *discard -= n;
                *scratch_pos += n;
                skipped = *discard == 0;
            } else {
                let n = (*len - body.len()).min(avail.len());
                body.extend_from_slice(&avail[..n]);
                *scratch_pos += n;
                done = body.len() == *len;
            }
            if done {
                self.complete();
            } else if skipped {
                self.oversized_done();
            }
        }
    }

    fn complete(&mut self) {
        let body = std::mem::take(&mut self.rd.body);
        let (kind, stream, flags) = (self.rd.kind, self.rd.stream, self.rd.flags);
        self.rd.hdr_len = 0;
        if kind != TYPE_REQUEST {
            self.emit(kind, stream, flags, &body);
            return;
        }
        match self.screen_request(&body) {
            Verdict::Pass => self.emit(kind, stream, flags, &body),
            Verdict::Refuse(code, msg) => self.emit_refusal(stream, code, &msg),
        }
        self.state.in_flight.fetch_add(1, Ordering::SeqCst);
        // The body's capacity is kept for the next frame (bounded by max_frame).
        self.rd.body = body;
        self.rd.body.clear();
    }

    fn oversized_done(&mut self) {
        self.rd.hdr_len = 0;
        if self.rd.kind == TYPE_REQUEST {
            let msg = format!(
                "request of {} bytes is over the agent's limit of {} bytes",
                self.rd.len, self.limits.max_frame
            );
            self.emit_refusal(self.rd.stream, Code::RESOURCE_EXHAUSTED, &msg);
            self.state.in_flight.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn screen_request(&self, body: &[u8]) -> Verdict {
        let req = match Request::parse_from_bytes(body) {
            Ok(r) => r,
            Err(e) => {
                return Verdict::Refuse(
                    Code::INVALID_ARGUMENT,
                    format!("request: not a ttrpc request: {e}"),
                )
            }
        };
        if req.service != self.screen.service {
            return Verdict::Refuse(
                Code::UNIMPLEMENTED,
                format!("service {}", cnfs_protocols::spec::printable(&req.service)),
            );
        }
        let Some(check) = self.screen.methods.get(&req.method) else {
            return Verdict::Refuse(
                Code::UNIMPLEMENTED,
                format!("method {}", cnfs_protocols::spec::printable(&req.method)),
            );
        };
        if let Err(e) = check(&req.payload) {
            return Verdict::Refuse(
                Code::INVALID_ARGUMENT,
                format!("request: not a valid {} request: {e}", req.method),
            );
        }
        if self.state.in_flight.load(Ordering::SeqCst) >= self.limits.max_in_flight {
            return Verdict::Refuse(
                Code::RESOURCE_EXHAUSTED,
                format!(
                    "this connection already has {} requests in flight; wait for their answers",
                    self.limits.max_in_flight
                ),
            );
        }
        Verdict::Pass
    }

    fn emit_refusal(&mut self, stream: u32, code: Code, msg: &str) {
        let mut status = Status::new();
        status.code = code.into();
        status.message = msg.to_string();
        let req = Request {
            service: self.screen.service.clone(),
            method: REFUSE_METHOD.to_string(),
            payload: status.write_to_bytes().unwrap_or_default(),
            ..Default::default()
        };
        let body = req.write_to_bytes().unwrap_or_default();
        self.emit(TYPE_REQUEST, stream, 0, &body);
    }

    fn emit(&mut self, kind: u8, stream: u32, flags: u8, body: &[u8]) {
        let r = &mut self.rd.ready;
        r.clear();
        r.extend_from_slice(&(body.len() as u32).to_be_bytes());
        r.extend_from_slice(&stream.to_be_bytes());
        r.push(kind);
        r.push(flags);
        r.extend_from_slice(body);
        self.rd.ready_pos = 0;
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Gated<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        loop {
            if me.rd.ready_pos < me.rd.ready.len() {
                let n = (me.rd.ready.len() - me.rd.ready_pos).min(buf.remaining());
                buf.put_slice(&me.rd.ready[me.rd.ready_pos..me.rd.ready_pos + n]);
                me.rd.ready_pos += n;
                if me.rd.ready_pos == me.rd.ready.len() {
                    me.rd.ready.clear();
                    me.rd.ready_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if me.state.closed.load(Ordering::SeqCst) {
                return Poll::Ready(Ok(()));
            }
            if me.rd.scratch_pos < me.rd.scratch_len {
                me.feed();
                continue;
            }
            me.state.waker.register(cx.waker());
            if me.state.closed.load(Ordering::SeqCst) {
                return Poll::Ready(Ok(()));
            }
            let mut rb = ReadBuf::new(&mut me.rd.scratch);
            match Pin::new(&mut me.io).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        return Poll::Ready(Ok(()));
                    }
                    me.rd.scratch_pos = 0;
                    me.rd.scratch_len = n;
                    me.touch();
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Gated<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if me.state.closed.load(Ordering::SeqCst) {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let r = Pin::new(&mut me.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            let answered = me.wr.feed(&buf[..n]);
            if answered > 0 {
                let _ = me
                    .state
                    .in_flight
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                        Some(v.saturating_sub(answered))
                    });
            }
            me.touch();
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl<S> Drop for Gated<S> {
    fn drop(&mut self) {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        t.conns.remove(&self.id);
        t.held = t.held.saturating_sub(1);
    }
}

/// The hidden method's handler: answers with the status the gate put in the payload.
pub struct Refuse;

#[async_trait]
impl MethodHandler for Refuse {
    async fn handler(&self, _ctx: TtrpcContext, req: Request) -> ttrpc::Result<Response> {
        let status = Status::parse_from_bytes(&req.payload).unwrap_or_else(|_| {
            ttrpc::get_status(Code::INTERNAL, "refused request without a status")
        });
        let mut resp = Response::new();
        resp.set_status(status);
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn screen() -> Screen {
        let mut methods: HashMap<String, BodyCheck> = HashMap::new();
        methods.insert("Ping".into(), |b| {
            Status::parse_from_bytes(b)
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        Screen {
            service: "t.S".into(),
            methods,
        }
    }

    fn log() -> Logger {
        Logger::root(slog::Discard, slog::o!())
    }

    fn frame(stream: u32, kind: u8, body: &[u8]) -> Vec<u8> {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(&[kind, 0]);
        f.extend_from_slice(body);
        f
    }

    fn request(service: &str, method: &str, payload: &[u8]) -> Vec<u8> {
        Request {
            service: service.into(),
            method: method.into(),
            payload: payload.to_vec(),
            ..Default::default()
        }
        .write_to_bytes()
        .expect("encode")
    }

    /// Pushes `input` through a gate and returns the frames ttrpc would see.
    async fn through(gate: &Gate, input: Vec<u8>) -> Vec<(u32, Request)> {
        let (mut client, server) = tokio::io::duplex(64 << 10);
        let mut gated = gate.admit(server).expect("admitted");
        let writer = tokio::spawn(async move {
            client.write_all(&input).await.expect("write");
        });
        let mut out = Vec::new();
        gated.read_to_end(&mut out).await.expect("read");
        writer.await.expect("writer");
        let mut frames = Vec::new();
        let mut rest = &out[..];
        while rest.len() >= HEADER_LEN {
            let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let stream = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]);
            let req =
                Request::parse_from_bytes(&rest[HEADER_LEN..HEADER_LEN + len]).expect("a request");
            frames.push((stream, req));
            rest = &rest[HEADER_LEN + len..];
        }
        assert!(rest.is_empty(), "partial frame passed through");
        frames
    }

    fn refusal(r: &Request) -> Option<(Code, String)> {
        (r.method == REFUSE_METHOD).then(|| {
            let s = Status::parse_from_bytes(&r.payload).expect("status");
            (s.code(), s.message)
        })
    }

    #[tokio::test]
    async fn valid_requests_pass_unchanged_and_bad_ones_become_refusals() {
        let gate = Gate::new(Limits::default(), screen(), log());
        let mut input = frame(1, TYPE_REQUEST, &request("t.S", "Ping", &[]));
        input.extend(frame(3, TYPE_REQUEST, &request("other.S", "Ping", &[])));
        input.extend(frame(5, TYPE_REQUEST, &request("t.S", "Nope", &[])));
        input.extend(frame(
            7,
            TYPE_REQUEST,
            &request("t.S", "Ping", &[0xff, 0xff]),
        ));
        input.extend(frame(9, TYPE_REQUEST, b"\xff\xff\xff"));
        input.extend(frame(11, TYPE_REQUEST, &request("t.S", REFUSE_METHOD, &[])));
        let out = through(&gate, input).await;
        assert_eq!(out.len(), 6);
        assert_eq!((out[0].0, out[0].1.method.as_str()), (1, "Ping"));
        assert!(refusal(&out[0].1).is_none());
        let r = |i: usize| refusal(&out[i].1).expect("refused");
        assert_eq!(out[1].0, 3);
        assert_eq!(r(1), (Code::UNIMPLEMENTED, "service other.S".into()));
        assert_eq!(r(2), (Code::UNIMPLEMENTED, "method Nope".into()));
        assert_eq!(r(3).0, Code::INVALID_ARGUMENT);
        assert!(r(3).1.contains("not a valid Ping request"), "{}", r(3).1);
        assert_eq!(r(4).0, Code::INVALID_ARGUMENT);
        assert_eq!(
            r(5).0,
            Code::UNIMPLEMENTED,
            "the hidden method is not callable"
        );
    }

    #[tokio::test]
    async fn an_oversized_frame_is_skipped_unbuffered_and_the_next_one_still_served() {
        let gate = Gate::new(Limits::default(), screen(), log());
        let big = vec![0u8; 1 << 20];
        let mut input = frame(1, TYPE_REQUEST, &big);
        input.extend(frame(3, TYPE_REQUEST, &request("t.S", "Ping", &[])));
        let out = through(&gate, input).await;
        assert_eq!(out.len(), 2);
        let (code, msg) = refusal(&out[0].1).expect("refused");
        assert_eq!(code, Code::RESOURCE_EXHAUSTED);
        assert!(
            msg.contains("1048576 bytes") && msg.contains("65536"),
            "{msg}"
        );
        assert_eq!((out[1].0, out[1].1.method.as_str()), (3, "Ping"));
    }

    #[tokio::test]
    async fn requests_over_the_in_flight_bound_are_refused_until_answered() {
        let limits = Limits {
            max_in_flight: 2,
            ..Limits::default()
        };
        let gate = Gate::new(limits, screen(), log());
        let mut input = Vec::new();
        for s in [1, 3, 5] {
            input.extend(frame(s, TYPE_REQUEST, &request("t.S", "Ping", &[])));
        }
        let out = through(&gate, input).await;
        assert!(refusal(&out[0].1).is_none() && refusal(&out[1].1).is_none());
        assert_eq!(
            refusal(&out[2].1).map(|r| r.0),
            Some(Code::RESOURCE_EXHAUSTED)
        );
    }

    #[tokio::test]
    async fn at_the_cap_the_oldest_idle_connection_is_closed_and_busy_ones_are_kept() {
        let limits = Limits {
            max_connections: 2,
            ..Limits::default()
        };
        let gate = Gate::new(limits, screen(), log());
        let (mut c1, s1) = tokio::io::duplex(4096);
        let (_c2, s2) = tokio::io::duplex(4096);
        let mut g1 = gate.admit(s1).expect("first");
        let g2 = gate.admit(s2).expect("second");
        // g1 has a request in flight: it must survive; g2 is idle: it goes.
        c1.write_all(&frame(1, TYPE_REQUEST, &request("t.S", "Ping", &[])))
            .await
            .expect("write");
        let mut hdr = [0u8; HEADER_LEN];
        g1.read_exact(&mut hdr).await.expect("request passed");
        let (_c3, s3) = tokio::io::duplex(4096);
        let _g3 = gate
            .admit(s3)
            .expect("third admitted by evicting the idle one");
        assert!(g2.state.closed.load(Ordering::SeqCst));
        assert!(!g1.state.closed.load(Ordering::SeqCst));
        assert_eq!(gate.connections(), 2);
        drop(g2);
        // Now g1 and g3 are both... g3 idle: a fourth evicts g3, not busy g1.
        let (_c4, s4) = tokio::io::duplex(4096);
        let _g4 = gate.admit(s4).expect("fourth");
        assert!(!g1.state.closed.load(Ordering::SeqCst));
        // With every connection busy, a new one is refused.
        let busy = Gate::new(
            Limits {
                max_connections: 1,
                ..Limits::default()
            },
            screen(),
            log(),
        );
        let (mut cb, sb) = tokio::io::duplex(4096);
        let mut gb = busy.admit(sb).expect("one");
        cb.write_all(&frame(1, TYPE_REQUEST, &request("t.S", "Ping", &[])))
            .await
            .expect("write");
        gb.read_exact(&mut hdr).await.expect("passed");
        let (_cx, sx) = tokio::io::duplex(4096);
        assert!(busy.admit(sx).is_none());
        // The answer ends the request: the connection is idle again and can be evicted.
        let resp = Response::new().write_to_bytes().expect("encode");
        gb.write_all(&frame(1, TYPE_RESPONSE, &resp))
            .await
            .expect("answer");
        let (_cy, sy) = tokio::io::duplex(4096);
        assert!(busy.admit(sy).is_some());
        assert!(gb.state.closed.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn connections_still_closing_count_against_a_hard_bound() {
        let limits = Limits {
            max_connections: 2,
            ..Limits::default()
        };
        let gate = Gate::new(limits, screen(), log());
        // Evicted but not yet let go of (as ttrpc holds a socket while it shuts down).
        let mut kept = Vec::new();
        for _ in 0..4 {
            let (c, s) = tokio::io::duplex(64);
            kept.push((c, gate.admit(s).expect("admitted")));
        }
        assert_eq!(gate.connections(), 2);
        let (_c, s) = tokio::io::duplex(64);
        assert!(
            gate.admit(s).is_none(),
            "a fifth socket while four are held"
        );
        kept.remove(0);
        let (_c, s) = tokio::io::duplex(64);
        assert!(gate.admit(s).is_some());
    }

    #[tokio::test]
    async fn a_closed_connection_reads_as_end_of_stream() {
        let gate = Gate::new(Limits::default(), screen(), log());
        let (_c, s) = tokio::io::duplex(4096);
        let mut g = gate.admit(s).expect("admitted");
        let state = g.state.clone();
        let reader = tokio::spawn(async move {
            let mut b = [0u8; 16];
            g.read(&mut b).await
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        state.close();
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), reader)
            .await
            .expect("woken")
            .expect("task")
            .expect("read");
        assert_eq!(n, 0);
    }

    #[test]
    fn the_scanner_counts_responses_across_split_writes() {
        let resp = Response::new().write_to_bytes().expect("encode");
        let mut bytes = frame(1, TYPE_RESPONSE, &resp);
        bytes.extend(frame(3, 3, b"data"));
        bytes.extend(frame(5, TYPE_RESPONSE, b"xyz"));
        let mut s = Scanner::default();
        let total: usize = bytes.chunks(3).map(|c| s.feed(c)).sum();
        assert_eq!(total, 2);
    }
}
