//! The wrapper's data path: every connection from containerd gets its own connection to the
//! delegate shim, and frames flow both ways unchanged (any service, any method, streams and
//! all). Only task `Create` and `Delete` requests are decoded, to run the sandbox hooks; a
//! refusal is answered to containerd in place of the delegate's reply.
//!
//! containerd multiplexes every call for the pod over one connection, so a hook never runs on
//! the read loop: a `Create` or `Delete` is held in a task of its own and forwarded when its
//! hook is done, while frames of other streams keep flowing. Frames of a held stream queue
//! behind it, in order. Because a held request reaches the delegate after later ones, and
//! ttrpc servers refuse a request whose stream id is not above the last one they saw ("StreamID
//! cannot be re-used and must increment"), stream ids towards the delegate are renumbered in
//! the order requests are actually sent (kept as they are whenever that order is containerd's)
//! and mapped back on the way up.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex as SyncMutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim_protos::api::{CreateTaskRequest, DeleteRequest};
use protobuf::Message;
use slog::{debug, info, warn, Logger};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, Mutex};

use crate::shim::delegate::Delegate;
use crate::shim::frames::{
    Frame, Header, Incoming, FLAG_REMOTE_CLOSED, TYPE_DATA, TYPE_REQUEST, TYPE_RESPONSE,
};
use crate::shim::sandbox::{After, Refusal};

const TASK_SERVICE: &str = "containerd.task.v2.Task";
/// Pause after a failed accept (`EMFILE`, `ENFILE`): without it the loop spins on the error.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Create/Delete calls held for their hooks at once on one connection (containerd sends a
/// handful per pod); a Create over it is refused with `RESOURCE_EXHAUSTED`.
pub const MAX_HELD_CALLS: usize = 64;

/// What the wrapper does around the calls it intercepts (the sandbox hooks; tests plug in
/// their own).
#[async_trait]
pub trait Hooks: Send + Sync + 'static {
    /// Before forwarding a task `Create`: a refusal is answered in place of the delegate.
    async fn before_create(&self, id: &str, bundle: &Path) -> Result<Option<After>, Refusal>;
    /// After the delegate answered OK to a `Create` that asked for it.
    async fn after_ok(&self, after: After) -> Result<(), Refusal>;
    /// Before forwarding a task `Delete` (of a task, not of an exec); never refuses.
    async fn before_delete(&self, id: &str);
}

/// Serves containerd until the delegate shim is gone (it exits after `Shutdown`).
pub async fn serve(
    listener: UnixListener,
    delegate: Arc<Delegate>,
    hooks: Arc<dyn Hooks>,
    log: Logger,
) {
    let accept = async {
        loop {
            match listener.accept().await {
                Ok((client, _)) => {
                    let (delegate, hooks, log) = (delegate.clone(), hooks.clone(), log.clone());
                    tokio::spawn(async move {
                        if let Err(e) = connection(client, &delegate, hooks, log.clone()).await {
                            warn!(log, "connection ended"; "error" => e.to_string());
                        }
                    });
                }
                Err(e) => {
                    warn!(log, "accept failed"; "error" => e.to_string());
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    };
    tokio::select! {
        _ = delegate.gone(&log) => info!(log, "delegate shim is gone; exiting"),
        _ = accept => {}
    }
}

/// An intercepted request, decoded once.
enum Call {
    Create(CreateTaskRequest),
    Delete(DeleteRequest),
    /// Fail closed: what cannot be decoded cannot be checked.
    Refuse(Refusal),
}

/// One item from containerd, in the order read.
enum Up {
    Frame(Frame),
    /// Boxed: a decoded Create is large next to the other items.
    Call(Frame, Box<Call>),
    Oversized(Header),
}

impl Up {
    fn stream_id(&self) -> u32 {
        match self {
            Up::Frame(f) | Up::Call(f, _) => f.stream_id,
            Up::Oversized(h) => h.stream_id,
        }
    }

    /// Whether it runs a hook (and so is held off the read loop).
    fn holds(&self) -> bool {
        matches!(self, Up::Call(_, c) if matches!(**c, Call::Create(_) | Call::Delete(_)))
    }

    fn classify(incoming: Incoming) -> Up {
        let f = match incoming {
            Incoming::Oversized(h) => return Up::Oversized(h),
            Incoming::Frame(f) if f.kind == TYPE_REQUEST => f,
            Incoming::Frame(f) => return Up::Frame(f),
        };
        let req = match ttrpc::proto::Request::parse_from_bytes(&f.payload) {
            Ok(r) => r,
            Err(e) => {
                let refusal = refuse(
                    ttrpc::Code::INVALID_ARGUMENT,
                    format!("the ttrpc request on stream {} cannot be decoded ({e}); it is refused, not forwarded unchecked", f.stream_id),
                );
                return Up::Call(f, Box::new(Call::Refuse(refusal)));
            }
        };
        if req.service != TASK_SERVICE {
            return Up::Frame(f);
        }
        match req.method.as_str() {
            "Create" => match CreateTaskRequest::parse_from_bytes(&req.payload) {
                Ok(c) => Up::Call(f, Box::new(Call::Create(c))),
                Err(e) => {
                    let refusal = refuse(
                        ttrpc::Code::INVALID_ARGUMENT,
                        format!("the task Create request cannot be decoded ({e}), so the CNFS policy cannot be checked; it is refused"),
                    );
                    Up::Call(f, Box::new(Call::Refuse(refusal)))
                }
            },
            // A Delete always goes on: one that cannot be decoded only skips the unmounts,
            // which the VM's end does anyway.
            "Delete" => match DeleteRequest::parse_from_bytes(&req.payload) {
                Ok(d) => Up::Call(f, Box::new(Call::Delete(d))),
                Err(_) => Up::Frame(f),
            },
            _ => Up::Frame(f),
        }
    }
}

fn refuse(code: ttrpc::Code, message: String) -> Refusal {
    Refusal {
        code,
        message: format!("cnfs: {message}"),
    }
}

fn lock<T>(m: &SyncMutex<T>) -> MutexGuard<'_, T> {
    // The maps stay consistent between statements; a panic elsewhere must not wedge the proxy.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The delegate's side of one connection: ids are assigned and frames written in one order.
struct DelegateWriter {
    w: Option<OwnedWriteHalf>,
    last_id: u32,
}

/// containerd's stream ids and the delegate's, both ways.
#[derive(Default)]
struct Streams {
    to_delegate: HashMap<u32, u32>,
    to_client: HashMap<u32, u32>,
}

impl Streams {
    fn open(&mut self, client: u32, delegate: u32) {
        if let Some(old) = self.to_delegate.insert(client, delegate) {
            self.to_client.remove(&old);
        }
        self.to_client.insert(delegate, client);
    }

    /// containerd's id for a delegate frame; `finish` forgets the stream.
    fn client_id(&mut self, delegate: u32, finish: bool) -> Option<u32> {
        if !finish {
            return self.to_client.get(&delegate).copied();
        }
        let client = self.to_client.remove(&delegate)?;
        if self.to_delegate.get(&client) == Some(&delegate) {
            self.to_delegate.remove(&client);
        }
        Some(client)
    }
}

struct Conn {
    hooks: Arc<dyn Hooks>,
    log: Logger,
    to_client: Mutex<Option<OwnedWriteHalf>>,
    to_delegate: Mutex<DelegateWriter>,
    streams: SyncMutex<Streams>,
    /// Hook continuations by containerd's stream id.
    pending: SyncMutex<HashMap<u32, After>>,
    /// Streams held for a hook, with the queue of their later items.
    held: SyncMutex<HashMap<u32, mpsc::UnboundedSender<Up>>>,
    /// A held call that could not write ends the connection.
    failed: mpsc::UnboundedSender<std::io::Error>,
}

fn closed() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::BrokenPipe, "connection closed")
}

impl Conn {
    /// An item read from containerd: queued behind its held stream, held for a hook, or
    /// handled now.
    async fn up(self: &Arc<Self>, item: Up) -> std::io::Result<()> {
        let id = item.stream_id();
        let item = {
            let mut held = lock(&self.held);
            if let Some(queue) = held.get(&id) {
                // The holder removes its entry under this lock before it stops receiving.
                let _ = queue.send(item);
                None
            } else if item.holds() && held.len() < MAX_HELD_CALLS {
                let (tx, rx) = mpsc::unbounded_channel();
                held.insert(id, tx);
                tokio::spawn(self.clone().hold(id, item, rx));
                None
            } else if let Up::Call(f, call) = &item {
                match **call {
                    // Over the bound a Create is refused; a Delete (never refused) runs here,
                    // which slows this connection down until the held calls finish.
                    Call::Create(_) => {
                        let refusal = refuse(
                            ttrpc::Code::RESOURCE_EXHAUSTED,
                            format!("{MAX_HELD_CALLS} Create/Delete calls are already in progress on this connection"),
                        );
                        Some(Up::Call(f.clone(), Box::new(Call::Refuse(refusal))))
                    }
                    _ => Some(item),
                }
            } else {
                Some(item)
            }
        };
        match item {
            Some(item) => self.process(item).await,
            None => Ok(()),
        }
    }

    /// Runs a held stream: its call, then whatever queued behind it, in order.
    async fn hold(self: Arc<Self>, id: u32, first: Up, mut queue: mpsc::UnboundedReceiver<Up>) {
        let mut next = Some(first);
        while let Some(item) = next.take() {
            if let Err(e) = self.process(item).await {
                lock(&self.held).remove(&id);
                let _ = self.failed.send(e);
                return;
            }
            let mut held = lock(&self.held);
            match queue.try_recv() {
                Ok(item) => next = Some(item),
                Err(_) => {
                    held.remove(&id);
                }
            }
        }
    }

    async fn process(&self, item: Up) -> std::io::Result<()> {
        let (f, call) = match item {
            Up::Frame(f) => return self.forward(f).await,
            Up::Oversized(h) => {
                warn!(self.log, "refused an oversized message from containerd";
                    "stream" => h.stream_id, "bytes" => h.len);
                return self
                    .reply(Frame::oversized_response(h.stream_id, h.len))
                    .await;
            }
            Up::Call(f, call) => (f, call),
        };
        match *call {
            Call::Refuse(r) => {
                warn!(self.log, "request refused"; "stream" => f.stream_id, "reason" => &r.message);
                self.reply(Frame::error_response(f.stream_id, r.code, &r.message))
                    .await
            }
            Call::Delete(d) => {
                if d.exec_id.is_empty() {
                    self.hooks.before_delete(&d.id).await;
                }
                self.forward(f).await
            }
            Call::Create(c) => {
                match self.hooks.before_create(&c.id, Path::new(&c.bundle)).await {
                    Ok(None) => {}
                    Ok(Some(after)) => {
                        lock(&self.pending).insert(f.stream_id, after);
                    }
                    Err(refusal) => {
                        warn!(self.log, "Create refused"; "id" => &c.id, "reason" => &refusal.message);
                        return self
                            .reply(Frame::error_response(
                                f.stream_id,
                                refusal.code,
                                &refusal.message,
                            ))
                            .await;
                    }
                }
                self.forward(f).await
            }
        }
    }

    /// Sends a frame of containerd's to the delegate, renumbering its stream.
    async fn forward(&self, mut f: Frame) -> std::io::Result<()> {
        let mut d = self.to_delegate.lock().await;
        if f.kind == TYPE_REQUEST {
            // containerd's id when it is above the last one sent, else the next odd one.
            let id = if f.stream_id > d.last_id {
                f.stream_id
            } else {
                d.last_id
                    .checked_add(1)
                    .map(|n| n | 1)
                    .ok_or_else(|| std::io::Error::other("stream ids to the delegate ran out"))?
            };
            d.last_id = id;
            lock(&self.streams).open(f.stream_id, id);
            f.stream_id = id;
        } else {
            let mapped = lock(&self.streams).to_delegate.get(&f.stream_id).copied();
            match mapped {
                Some(id) => f.stream_id = id,
                None => {
                    drop(d);
                    // What a ttrpc server answers for data on a stream it does not know.
                    return self
                        .reply(Frame::error_response(
                            f.stream_id,
                            ttrpc::Code::INVALID_ARGUMENT,
                            "StreamID is no longer active",
                        ))
                        .await;
                }
            }
        }
        let w = d.w.as_mut().ok_or_else(closed)?;
        f.write(w).await
    }

    /// Sends a frame to containerd (whole frames: the writer is locked per frame).
    async fn reply(&self, f: Frame) -> std::io::Result<()> {
        let mut w = self.to_client.lock().await;
        f.write(w.as_mut().ok_or_else(closed)?).await
    }

    /// A frame from the delegate, on its way to containerd.
    async fn down(self: &Arc<Self>, incoming: Incoming) -> std::io::Result<()> {
        let (mut f, finishes) = match incoming {
            Incoming::Oversized(h) => {
                let id = lock(&self.streams)
                    .client_id(h.stream_id, true)
                    .unwrap_or(h.stream_id);
                lock(&self.pending).remove(&id);
                warn!(self.log, "refused an oversized message from the delegate";
                    "stream" => id, "bytes" => h.len);
                return self.reply(Frame::oversized_response(id, h.len)).await;
            }
            Incoming::Frame(f) => {
                let finishes = f.kind == TYPE_RESPONSE
                    || (f.kind == TYPE_DATA && f.flags & FLAG_REMOTE_CLOSED != 0);
                (f, finishes)
            }
        };
        match lock(&self.streams).client_id(f.stream_id, finishes) {
            Some(id) => f.stream_id = id,
            None => {
                debug!(self.log, "frame on a stream the proxy did not open"; "stream" => f.stream_id)
            }
        }
        let code = f.response_code();
        let after = match code {
            Some(_) => lock(&self.pending).remove(&f.stream_id),
            None => None,
        };
        match (after, code) {
            (Some(after), Some(ttrpc::Code::OK)) => {
                // Mount off this loop: other replies keep flowing meanwhile.
                let conn = self.clone();
                tokio::spawn(async move {
                    let reply = match conn.hooks.after_ok(after).await {
                        Ok(()) => f,
                        Err(refusal) => {
                            warn!(conn.log, "sandbox Create failed after the VM started"; "reason" => &refusal.message);
                            Frame::error_response(f.stream_id, refusal.code, &refusal.message)
                        }
                    };
                    let _ = conn.reply(reply).await;
                });
                Ok(())
            }
            _ => self.reply(f).await,
        }
    }
}

async fn connection(
    client: UnixStream,
    delegate: &Delegate,
    hooks: Arc<dyn Hooks>,
    log: Logger,
) -> std::io::Result<()> {
    let upstream = delegate.connect().await?;
    let (mut from_client, to_client) = client.into_split();
    let (mut from_delegate, to_delegate) = upstream.into_split();
    let (failed, mut failures) = mpsc::unbounded_channel();
    let conn = Arc::new(Conn {
        hooks,
        log,
        to_client: Mutex::new(Some(to_client)),
        to_delegate: Mutex::new(DelegateWriter {
            w: Some(to_delegate),
            last_id: 0,
        }),
        streams: SyncMutex::default(),
        pending: SyncMutex::default(),
        held: SyncMutex::default(),
        failed,
    });

    let upward = async {
        while let Some(incoming) = Frame::read(&mut from_client).await? {
            conn.up(Up::classify(incoming)).await?;
        }
        std::io::Result::Ok(())
    };
    let downward = async {
        while let Some(incoming) = Frame::read(&mut from_delegate).await? {
            conn.down(incoming).await?;
        }
        std::io::Result::Ok(())
    };

    // Either side closing (or a held call failing to write) ends the connection.
    let result = tokio::select! {
        r = upward => r,
        r = downward => r,
        Some(e) = failures.recv() => Err(e),
    };
    // Held calls still running find both writers gone: nothing reaches the delegate for a
    // containerd that is no longer listening.
    conn.to_delegate.lock().await.w = None;
    *conn.to_client.lock().await = None;
    result
}
