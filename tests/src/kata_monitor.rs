//! A stand-in for the Kata shim's management server (`shim-monitor.sock`): the only part of
//! Kata the tests simulate. Everything behind the URL it gives (hybrid vsock, the guest, the
//! agent) is real.

use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

/// Stand-in for the Kata shim's management server. This is the only simulated part of Kata:
/// everything behind the URL it gives (hybrid vsock, the guest, the agent) is real. It answers
/// `GET /agent-url` the way Go's shim does (`fmt.Fprint(w, url)` through net/http: status 200,
/// `Content-Length`, `text/plain`, no trailing newline; `Connection: close` honoured) with
/// kata-agent's port (1024), which cnfsctl must replace with CNFS's.
pub fn serve(socket: &Path, hvsock: &Path) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = UnixListener::bind(socket)?;
    let url = format!("hvsock://{}:1024", hvsock.display());
    Ok(tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let url = url.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut b = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&b[..n]),
                    }
                }
                let reply = if req.starts_with(b"GET /agent-url HTTP/1.1\r\n") {
                    format!(
                        "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: {}\r\n\
                         Content-Type: text/plain; charset=utf-8\r\n\
                         Date: Thu, 01 Jan 2026 00:00:00 GMT\r\n\r\n{url}",
                        url.len()
                    )
                } else {
                    "HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 19\r\n\
                     Content-Type: text/plain; charset=utf-8\r\n\r\n404 page not found\n"
                        .to_string()
                };
                let _ = s.write_all(reply.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    }))
}
