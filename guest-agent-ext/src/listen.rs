//! The agent's two doors: vsock for the host, a unix socket for tools inside the guest.
//! Only the host may use the vsock door: every accepted connection's peer CID is checked
//! (the host is CID 2), so that a container in the guest (over a loopback vsock transport)
//! or another guest cannot ask the agent to mount. The unix socket is 0600 in a 0700
//! directory that containers do not see.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, Stream, StreamExt};
use slog::{warn, Logger};
use tokio_vsock::{VsockAddr, VsockListener, VMADDR_CID_ANY, VMADDR_CID_HOST};
use ttrpc::r#async::transport::{Listener, Socket};

use crate::gate::Gate;

pub fn vsock(
    port: u32,
    log: Logger,
) -> std::io::Result<impl Stream<Item = std::io::Result<Socket>>> {
    let listener = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, port))?;
    Ok(stream::unfold(
        (listener, log),
        |(listener, log)| async move {
            loop {
                match listener.accept().await {
                    Ok((s, peer)) if peer.cid() == VMADDR_CID_HOST => {
                        return Some((Ok(Socket::new(s)), (listener, log)));
                    }
                    Ok((_, peer)) => {
                        warn!(log, "refused vsock connection from a peer that is not the host";
                        "peer_cid" => peer.cid(), "peer_port" => peer.port());
                    }
                    Err(e) => return Some((Err(e), (listener, log))),
                }
            }
        },
    ))
}

pub fn unix(path: &Path) -> std::io::Result<impl Stream<Item = std::io::Result<Socket>>> {
    cnfs_protocols::transport::owner_only_unix_listener(path)
}

/// One ttrpc listener over both doors, every connection behind the gate. A failed accept
/// (out of descriptors, say) is retried after a pause that grows to 1 s, never in a spin.
pub fn merge(
    vsock: Option<impl Stream<Item = std::io::Result<Socket>> + Send + 'static>,
    unix: Option<impl Stream<Item = std::io::Result<Socket>> + Send + 'static>,
    gate: Arc<Gate>,
    log: Logger,
) -> Listener {
    let a = vsock
        .map(|s| s.boxed())
        .unwrap_or_else(|| stream::pending().boxed());
    let b = unix
        .map(|s| s.boxed())
        .unwrap_or_else(|| stream::pending().boxed());
    let doors = stream::select(a, b);
    let gated = stream::unfold(
        (doors, gate, log, Duration::ZERO),
        |(mut doors, gate, log, mut pause)| async move {
            loop {
                match doors.next().await? {
                    Ok(socket) => {
                        pause = Duration::ZERO;
                        // Refused (every connection busy): dropping it closes it.
                        if let Some(g) = gate.admit(socket) {
                            return Some((Ok(g), (doors, gate, log, pause)));
                        }
                    }
                    Err(e) => {
                        pause =
                            (pause * 2).clamp(Duration::from_millis(50), Duration::from_secs(1));
                        warn!(log, "accept failed; pausing"; "error" => %e,
                            "pause_ms" => pause.as_millis() as u64);
                        tokio::time::sleep(pause).await;
                    }
                }
            }
        },
    );
    Listener::new(gated)
}
