//! Host-side transport to the guest agent: the address forms Kata uses (`vsock://cid:port`,
//! `hvsock://<uds>:port`) plus `unix://path` for in-guest tools, and a connect that is
//! bounded by a deadline.

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::agent_ttrpc::AgentClient;

/// The agent's default vsock port. Kata's guest uses 1024-1027 and 10240.
pub const DEFAULT_AGENT_PORT: u32 = 17230;

/// Where an agent listens, as seen from the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAddress {
    /// Kernel vsock (QEMU with vhost-vsock).
    Vsock { cid: u32, port: u32 },
    /// Hybrid vsock: a unix socket on the host where the VMM accepts `CONNECT <port>\n`
    /// (Cloud Hypervisor, Firecracker, Dragonball, vhost-device-vsock).
    Hvsock { path: PathBuf, port: u32 },
    /// A plain unix socket (the agent's local socket inside the guest).
    Unix { path: PathBuf },
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("agent address {0:?}: {1}")]
    BadAddress(String, &'static str),
    #[error("connecting to {addr}: {source}")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to {addr}: hybrid vsock handshake refused: {reply:?}")]
    Handshake { addr: String, reply: String },
    #[error("connecting to {addr}: no answer within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
}

impl AgentAddress {
    /// Parses `vsock://<cid>:<port>`, `hvsock://<path>:<port>` or `unix://<path>`.
    /// `default_port` fills in a missing port for the vsock forms (Kata's agent URL names the
    /// kata-agent port; CNFS replaces it with its own).
    pub fn parse(url: &str) -> Result<Self, TransportError> {
        let bad = |why| TransportError::BadAddress(url.to_string(), why);
        if let Some(rest) = url.strip_prefix("vsock://") {
            let (cid, port) = rest
                .split_once(':')
                .ok_or_else(|| bad("expected cid:port"))?;
            return Ok(AgentAddress::Vsock {
                cid: cid.parse().map_err(|_| bad("cid is not a number"))?,
                port: port.parse().map_err(|_| bad("port is not a number"))?,
            });
        }
        if let Some(rest) = url.strip_prefix("hvsock://") {
            let (path, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| bad("expected path:port"))?;
            if !path.starts_with('/') {
                return Err(bad("socket path must be absolute"));
            }
            return Ok(AgentAddress::Hvsock {
                path: PathBuf::from(path),
                port: port.parse().map_err(|_| bad("port is not a number"))?,
            });
        }
        if let Some(path) = url.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(bad("socket path must be absolute"));
            }
            return Ok(AgentAddress::Unix {
                path: PathBuf::from(path),
            });
        }
        Err(bad("scheme must be vsock://, hvsock:// or unix://"))
    }

    /// The same guest, another port (Kata's URL names kata-agent's port).
    pub fn with_port(self, port: u32) -> Self {
        match self {
            AgentAddress::Vsock { cid, .. } => AgentAddress::Vsock { cid, port },
            AgentAddress::Hvsock { path, .. } => AgentAddress::Hvsock { path, port },
            unix => unix,
        }
    }
}

impl std::fmt::Display for AgentAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentAddress::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
            AgentAddress::Hvsock { path, port } => write!(f, "hvsock://{}:{port}", path.display()),
            AgentAddress::Unix { path } => write!(f, "unix://{}", path.display()),
        }
    }
}

/// Opens a byte stream to `addr`, bounded by `timeout` (handshake included).
pub async fn connect_stream(
    addr: &AgentAddress,
    timeout: Duration,
) -> Result<ttrpc::r#async::transport::Socket, TransportError> {
    let name = addr.to_string();
    let io = |source| TransportError::Io {
        addr: name.clone(),
        source,
    };
    let attempt = async {
        match addr {
            AgentAddress::Vsock { cid, port } => {
                let s = tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(*cid, *port))
                    .await
                    .map_err(io)?;
                Ok(ttrpc::r#async::transport::Socket::new(s))
            }
            AgentAddress::Unix { path } => {
                let s = UnixStream::connect(path).await.map_err(io)?;
                Ok(ttrpc::r#async::transport::Socket::new(s))
            }
            AgentAddress::Hvsock { path, port } => {
                let mut s = UnixStream::connect(path).await.map_err(io)?;
                hvsock_handshake(&mut s, *port, &name).await?;
                Ok(ttrpc::r#async::transport::Socket::new(s))
            }
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| TransportError::Timeout {
            addr: addr.to_string(),
            timeout,
        })?
}

/// Sends `CONNECT <port>\n` and waits for `OK <n>\n`. Reads byte by byte so that nothing of
/// the guest's stream is consumed; writes nothing else before the `OK` (the VMM drops bytes
/// sent early).
pub async fn hvsock_handshake(
    s: &mut UnixStream,
    port: u32,
    name: &str,
) -> Result<(), TransportError> {
    let io = |source| TransportError::Io {
        addr: name.to_string(),
        source,
    };
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(io)?;
    let mut line = Vec::with_capacity(16);
    loop {
        let b = s.read_u8().await.map_err(io)?;
        if b == b'\n' {
            break;
        }
        line.push(b);
        if line.len() > 64 {
            break;
        }
    }
    let reply = String::from_utf8_lossy(&line).to_string();
    if reply.starts_with("OK ") {
        Ok(())
    } else {
        Err(TransportError::Handshake {
            addr: name.to_string(),
            reply,
        })
    }
}

/// A ttrpc client for the agent at `addr`.
pub async fn connect(
    addr: &AgentAddress,
    timeout: Duration,
) -> Result<AgentClient, TransportError> {
    let socket = connect_stream(addr, timeout).await?;
    Ok(AgentClient::new(ttrpc::r#async::Client::new(socket)))
}

/// A ttrpc listener on a unix socket only its owner may use: the socket 0600 in a 0700
/// directory, a stale socket replaced. The agent's local door and the wrapper's stats relay.
pub fn owner_only_unix_listener(
    path: &std::path::Path,
) -> std::io::Result<impl futures::Stream<Item = std::io::Result<ttrpc::r#async::transport::Socket>>>
{
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(futures::stream::unfold(listener, |listener| async move {
        let next = listener
            .accept()
            .await
            .map(|(s, _)| ttrpc::r#async::transport::Socket::new(s));
        Some((next, listener))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kata_agent_url_forms() {
        assert_eq!(
            AgentAddress::parse("vsock://3:1024").expect("vsock"),
            AgentAddress::Vsock { cid: 3, port: 1024 }
        );
        assert_eq!(
            AgentAddress::parse("hvsock:///run/vc/firecracker/abc/root/kata.hvsock:1024")
                .expect("hvsock")
                .with_port(DEFAULT_AGENT_PORT),
            AgentAddress::Hvsock {
                path: PathBuf::from("/run/vc/firecracker/abc/root/kata.hvsock"),
                port: DEFAULT_AGENT_PORT
            }
        );
        for bad in [
            "tcp://1.2.3.4:5",
            "vsock://x:1",
            "hvsock://rel:1",
            "vsock://3",
            "unix://rel",
        ] {
            assert!(AgentAddress::parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn hvsock_handshake_waits_for_ok_and_reports_refusal() {
        let dir = std::env::temp_dir().join(format!("cnfs-hv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("hv.sock");
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let server = tokio::spawn(async move {
            for reply in ["OK 1073741824\n", "ERR no listener\n"] {
                let (mut s, _) = listener.accept().await.expect("accept");
                let mut buf = [0u8; 14];
                s.read_exact(&mut buf).await.expect("read");
                assert_eq!(&buf, b"CONNECT 17230\n");
                s.write_all(reply.as_bytes()).await.expect("write");
                s.write_all(b"payload").await.expect("write");
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest).await;
            }
        });
        let addr = AgentAddress::Hvsock {
            path: path.clone(),
            port: DEFAULT_AGENT_PORT,
        };
        let mut s = UnixStream::connect(&path).await.expect("connect");
        hvsock_handshake(&mut s, DEFAULT_AGENT_PORT, "t")
            .await
            .expect("ok");
        // The guest's first bytes are still there: nothing past the OK line was consumed.
        let mut p = [0u8; 7];
        s.read_exact(&mut p).await.expect("payload");
        assert_eq!(&p, b"payload");
        drop(s);
        let e = connect_stream(&addr, Duration::from_secs(5))
            .await
            .err()
            .expect("refused");
        assert!(e.to_string().contains("ERR no listener"), "{e}");
        server.await.expect("server");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
