//! Connections to the server: TCP from a reserved source port when allowed, the
//! portmapper's answer for MOUNT and NFS, and the `AUTH_SYS` credential every call carries.

use std::net::{IpAddr, SocketAddr};
use std::time::{SystemTime, UNIX_EPOCH};

use nfs3_client::nfs3_types::portmap::IPPROTO_TCP;
use nfs3_client::nfs3_types::rpc::{auth_unix, opaque_auth};
use nfs3_client::nfs3_types::xdr_codec::Opaque;
use nfs3_client::tokio::TokioIo;
use nfs3_client::{PortmapError, PortmapperClient};
use tokio::net::TcpStream;

use crate::backend::BackendError;

use super::errors::rpc_error;

pub(super) type Io = TokioIo<TcpStream>;

/// `AUTH_SYS` machine name sent with every call (servers only log it).
pub(super) const MACHINE_NAME: &[u8] = b"cnfs-csi";

/// A TCP connection to `addr`; failures are "unavailable". The source port is a reserved one
/// (< 1024) when this process may bind one, because Linux nfsd refuses other ports unless an
/// export says `insecure`; an unprivileged controller gets that right without any capability
/// from the pod sysctl `net.ipv4.ip_unprivileged_port_start=0`. Otherwise an ephemeral port.
pub(super) async fn connect(
    server: &str,
    service: &str,
    addr: SocketAddr,
) -> Result<Io, BackendError> {
    let stream = match connect_reserved(addr).await {
        Some(r) => r,
        None => TcpStream::connect(addr).await,
    };
    stream
        .map(|s| {
            let _ = s.set_nodelay(true);
            TokioIo::new(s)
        })
        .map_err(|e| {
            BackendError::Unavailable(format!(
                "NFS server {server}: cannot connect to {service} at {addr}: {e}"
            ))
        })
}

/// Connects from the highest free port in the range the kernel's own NFS client uses
/// (665-1023); `None` when this process may not bind such a port at all.
pub(super) async fn connect_reserved(addr: SocketAddr) -> Option<std::io::Result<TcpStream>> {
    use std::io::ErrorKind::{AddrInUse, AddrNotAvailable};
    for port in (665..=1023u16).rev() {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        };
        let Ok(socket) = socket else { return None };
        let _ = socket.set_reuseaddr(true);
        let local = match addr {
            SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), port),
            SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), port),
        };
        match socket.bind(local) {
            Ok(()) => {}
            Err(e) if e.kind() == AddrInUse => continue,
            // EACCES: no right to reserved ports; anything else: do not insist either.
            Err(_) => return None,
        }
        match socket.connect(addr).await {
            // This 4-tuple is still in TIME_WAIT from an earlier call: try the next port.
            Err(e) if matches!(e.kind(), AddrInUse | AddrNotAvailable) => continue,
            r => return Some(r),
        }
    }
    None
}

/// Asks the portmapper for a program's TCP port.
pub(super) async fn getport(
    pm: &mut PortmapperClient<Io>,
    server: &str,
    what: &str,
    prog: u32,
    vers: u32,
) -> Result<u16, BackendError> {
    pm.getport(prog, vers, IPPROTO_TCP)
        .await
        .map_err(|e| match e {
            PortmapError::ProgramUnavailable => BackendError::Unavailable(format!(
                "NFS server {server}: {what} over TCP is not registered with its portmapper \
                 (NFSv3 disabled, or the server not started yet)"
            )),
            PortmapError::InvalidPortValue(p) => BackendError::Failed(format!(
                "NFS server {server}: portmapper returned port {p} for {what}"
            )),
            PortmapError::Rpc(e) => rpc_error(e, server, "portmapper"),
        })
}

/// `AUTH_SYS` as uid 0 / gid 0: what creating a volume directory in the share root needs on
/// an export without root squashing.
pub(super) fn credential() -> opaque_auth<'static> {
    opaque_auth::auth_unix(&auth_unix {
        stamp: unix_seconds() as u32,
        machinename: Opaque::borrowed(MACHINE_NAME),
        uid: 0,
        gid: 0,
        gids: Vec::new(),
    })
}

pub(super) fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
