//! The agent's two doors: vsock for the host, a unix socket for tools inside the guest.
//! Only the host may use the vsock door: every accepted connection's peer CID is checked
//! (the host is CID 2), so that a container in the guest (over a loopback vsock transport)
//! or another guest cannot ask the agent to mount. The unix socket is 0600 in a 0700
//! directory that containers do not see.

use std::path::Path;

use futures::stream::{self, Stream, StreamExt};
use slog::{warn, Logger};
use tokio_vsock::{VsockAddr, VsockListener, VMADDR_CID_ANY, VMADDR_CID_HOST};
use ttrpc::r#async::transport::{Listener, Socket};

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

/// One ttrpc listener over both doors.
pub fn merge(
    vsock: Option<impl Stream<Item = std::io::Result<Socket>> + Send + 'static>,
    unix: Option<impl Stream<Item = std::io::Result<Socket>> + Send + 'static>,
) -> Listener {
    let a = vsock
        .map(|s| s.boxed())
        .unwrap_or_else(|| stream::pending().boxed());
    let b = unix
        .map(|s| s.boxed())
        .unwrap_or_else(|| stream::pending().boxed());
    Listener::new(stream::select(a, b))
}
