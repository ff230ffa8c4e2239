//! Host side of the test-only exec helper (`cnfs-test-exec` in test guests): run a shell
//! command in the guest, get its exit code and output.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cnfs_protocols::transport::hvsock_handshake;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

pub const EXEC_PORT: u32 = 17231;
/// The test-only raw echo service in test guests (transport baseline for benchmarks).
pub const ECHO_PORT: u32 = 17232;

/// Shell that sets `$a` to the agent's pid: its forked children (mount, unmount, statfs)
/// carry the same name, and the agent is the one whose parent is not an agent; SMB luks2
/// lock holders (the agent's binary too, `pidof` finds them by it) outlive the agent that
/// started them, so they are told apart by their argv[0].
pub const AGENT_PID_SH: &str = "all=\" $(pidof cnfs-agent) \"; a=; for p in $all; do \
     pp=$(sed -n 's/^PPid:[[:space:]]*//p' /proc/$p/status); \
     case \"$all\" in *\" $pp \"*) ;; *) grep -qa 'cnfs-lock-holder' /proc/$p/cmdline || a=$p;; esac; \
     done";

#[derive(Debug, Deserialize)]
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

#[derive(Clone)]
pub struct GuestExec {
    pub hvsock: PathBuf,
}

impl GuestExec {
    pub fn new(hvsock: &Path) -> Self {
        GuestExec {
            hvsock: hvsock.to_path_buf(),
        }
    }

    /// Runs `cmd` with `/bin/sh -c` in the guest.
    pub async fn run(&self, cmd: &str, timeout: Duration) -> anyhow::Result<Output> {
        let work = async {
            let mut s = UnixStream::connect(&self.hvsock).await?;
            hvsock_handshake(&mut s, EXEC_PORT, "guest exec").await?;
            let req = serde_json::json!({"cmd": cmd, "timeout_ms": timeout.as_millis() as u64});
            s.write_all(format!("{req}\n").as_bytes()).await?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await?;
            let out: Output = serde_json::from_slice(&buf).map_err(|e| {
                anyhow::anyhow!("guest exec reply {:?}: {e}", String::from_utf8_lossy(&buf))
            })?;
            anyhow::Ok(out)
        };
        tokio::time::timeout(timeout + Duration::from_secs(5), work)
            .await
            .map_err(|_| anyhow::anyhow!("guest exec of {cmd:?}: no reply"))?
    }

    /// Waits until the helper answers (guests whose init starts it after the agent).
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        crate::process::wait_for(timeout, "the guest exec helper", || async {
            self.run("true", Duration::from_secs(10)).await.ok()
        })
        .await
        .map(|_| ())
    }

    /// Runs `cmd` and fails unless it exits 0; returns stdout.
    pub async fn ok(&self, cmd: &str) -> anyhow::Result<String> {
        let out = self.run(cmd, Duration::from_secs(60)).await?;
        if out.code != 0 {
            anyhow::bail!(
                "guest: {cmd:?} exited {}: {}{}",
                out.code,
                out.stdout,
                out.stderr
            );
        }
        Ok(out.stdout)
    }
}
