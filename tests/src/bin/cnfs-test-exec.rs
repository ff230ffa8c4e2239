//! Test-only guest helper: lets the host run a shell command inside a test guest and read
//! its exit code and output. One JSON request line per connection:
//! `{"cmd": "...", "timeout_ms": N}` → `{"code": C, "stdout": "...", "stderr": "..."}`.
//! Like the agent, it answers the host (vsock CID 2) only. Never installed in production
//! images: the rootfs builder adds it to test initrds only when asked.

use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_vsock::{VsockAddr, VsockListener, VMADDR_CID_ANY, VMADDR_CID_HOST};

#[derive(Deserialize)]
struct Request {
    cmd: String,
    #[serde(default)]
    timeout_ms: u64,
}

#[derive(Serialize)]
struct Reply {
    code: i32,
    stdout: String,
    stderr: String,
}

const PORT: u32 = 17231;
/// A raw echo service beside it, the transport baseline for `cargo xtask bench`.
const ECHO_PORT: u32 = 17232;

async fn echo() -> std::io::Result<()> {
    let listener = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, ECHO_PORT))?;
    loop {
        let (stream, peer) = listener.accept().await?;
        if peer.cid() != VMADDR_CID_HOST {
            continue;
        }
        tokio::spawn(async move {
            let (mut rd, mut wr) = tokio::io::split(stream);
            let _ = tokio::io::copy(&mut rd, &mut wr).await;
        });
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let [_, mode, url] = args.as_slice() {
        if mode == "probe" {
            probe(url).await;
            return Ok(());
        }
    }
    tokio::spawn(echo());
    let listener = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, PORT))?;
    loop {
        let (stream, peer) = listener.accept().await?;
        if peer.cid() != VMADDR_CID_HOST {
            continue;
        }
        tokio::spawn(async move {
            let _ = serve(stream).await;
        });
    }
}

async fn serve(stream: tokio_vsock::VsockStream) -> std::io::Result<()> {
    let (rd, mut wr) = tokio::io::split(stream);
    let mut line = String::new();
    BufReader::new(rd).read_line(&mut line).await?;
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(req) => run(req).await,
        Err(e) => Reply {
            code: -1,
            stdout: String::new(),
            stderr: format!("bad request: {e}"),
        },
    };
    let mut out = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
    out.push(b'\n');
    wr.write_all(&out).await?;
    wr.shutdown().await
}

async fn run(req: Request) -> Reply {
    let timeout = Duration::from_millis(if req.timeout_ms == 0 {
        60_000
    } else {
        req.timeout_ms
    });
    let child = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(&req.cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) => {
            return Reply {
                code: -1,
                stdout: String::new(),
                stderr: format!("spawn: {e}"),
            }
        }
    };
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => Reply {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        },
        Ok(Err(e)) => Reply {
            code: -1,
            stdout: String::new(),
            stderr: format!("wait: {e}"),
        },
        Err(_) => Reply {
            code: -2,
            stdout: String::new(),
            stderr: format!("timed out after {timeout:?}"),
        },
    }
}

/// `cnfs-test-exec probe <agent url>`: tries a Ping from inside the guest and prints
/// `answered` or `refused: <why>` (used to show that only the host may use the vsock port).
async fn probe(url: &str) {
    use cnfs_protocols::transport::{connect, AgentAddress};
    let result = async {
        let addr = AgentAddress::parse(url).map_err(|e| e.to_string())?;
        let client = connect(&addr, Duration::from_secs(3))
            .await
            .map_err(|e| e.to_string())?;
        let ctx = ttrpc::context::with_timeout(Duration::from_secs(3).as_nanos() as i64);
        client
            .ping(ctx, &cnfs_protocols::agent::PingRequest::new())
            .await
            .map_err(|e| e.to_string())
    }
    .await;
    match result {
        Ok(_) => println!("answered"),
        Err(e) => println!("refused: {e}"),
    }
}
