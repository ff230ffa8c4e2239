//! A raw ttrpc connection to the agent over hybrid vsock, for what a generated client cannot
//! send: unknown services and methods, bodies that are not the method's message, frames
//! larger than allowed, connections that only connect.

use std::path::Path;
use std::time::Duration;

use cnfs_protocols::transport::{hvsock_handshake, DEFAULT_AGENT_PORT};
use protobuf::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use ttrpc::proto::{Request, Response};

pub const AGENT_SERVICE: &str = "cnfs.v1.Agent";

pub struct RawConn {
    pub stream: UnixStream,
    next: u32,
}

impl RawConn {
    /// A connection to the agent's vsock port through the hybrid vsock socket.
    pub async fn connect(hvsock: &Path) -> anyhow::Result<Self> {
        let mut stream = UnixStream::connect(hvsock).await?;
        hvsock_handshake(&mut stream, DEFAULT_AGENT_PORT, "agent (raw)").await?;
        Ok(RawConn { stream, next: 1 })
    }

    /// Writes one frame as given (any length, any type).
    pub async fn send_frame(&mut self, stream: u32, kind: u8, body: &[u8]) -> anyhow::Result<()> {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(&[kind, 0]);
        f.extend_from_slice(body);
        self.stream.write_all(&f).await?;
        Ok(())
    }

    /// Sends a request; returns its stream id.
    pub async fn request(
        &mut self,
        service: &str,
        method: &str,
        payload: &[u8],
    ) -> anyhow::Result<u32> {
        let id = self.next;
        self.next += 2;
        let req = Request {
            service: service.into(),
            method: method.into(),
            payload: payload.to_vec(),
            ..Default::default()
        };
        self.send_frame(id, 1, &req.write_to_bytes()?).await?;
        Ok(id)
    }

    /// Reads the next response frame.
    pub async fn response(&mut self, timeout: Duration) -> anyhow::Result<(u32, Response)> {
        let read = async {
            let mut h = [0u8; 10];
            self.stream.read_exact(&mut h).await?;
            let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
            let id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
            anyhow::ensure!(len <= 16 << 20, "response frame of {len} bytes");
            let mut body = vec![0u8; len];
            self.stream.read_exact(&mut body).await?;
            anyhow::ensure!(h[8] == 2, "frame type {} is not a response", h[8]);
            anyhow::Ok((id, Response::parse_from_bytes(&body)?))
        };
        tokio::time::timeout(timeout, read)
            .await
            .map_err(|_| anyhow::anyhow!("no response within {timeout:?}"))?
    }

    /// A connection that announces a request frame of 4 MiB and sends only its first 64 KiB:
    /// what a ttrpc server that allocates at the announced length pays 4 MiB for.
    pub async fn half_sent_huge_frame(hvsock: &Path, stream: u32) -> anyhow::Result<Self> {
        let mut c = Self::connect(hvsock).await?;
        let mut f = (4u32 << 20).to_be_bytes().to_vec();
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(&[1, 0]);
        f.extend(std::iter::repeat_n(0u8, 64 << 10));
        // The agent may close it (over its limits): what was sent is what counts.
        let _ = c.stream.write_all(&f).await;
        Ok(c)
    }

    /// Sends one request and returns the status code and message of its answer.
    pub async fn call(
        &mut self,
        service: &str,
        method: &str,
        payload: &[u8],
    ) -> anyhow::Result<(ttrpc::Code, String)> {
        let id = self.request(service, method, payload).await?;
        let (got, resp) = self.response(Duration::from_secs(30)).await?;
        anyhow::ensure!(got == id, "answer for stream {got}, asked on {id}");
        let status = resp.status.into_option().unwrap_or_default();
        Ok((status.code(), status.message))
    }
}
