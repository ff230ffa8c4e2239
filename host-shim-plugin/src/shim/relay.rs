//! The stats relay: one 0600 unix socket per sandbox in the CSI hand-off directory
//! (`relay/<sandbox id>.sock`) on which the wrapper answers the agent's `Stats` and `Ping`,
//! and nothing else, by asking the guest. The CSI node plugin reads volume stats through it, so it needs
//! neither Kata's sockets nor an AF_VSOCK socket (containerd's default seccomp profile
//! forbids those since 1.7, and a QEMU guest is reached over vsock).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cnfs_protocols::agent;
use cnfs_protocols::agent_ttrpc;
use cnfs_protocols::transport::{self, AgentAddress};
use ttrpc::r#async::transport::Listener;
use ttrpc::r#async::TtrpcContext;

use cnfs_host::kata;

/// A running relay; stopped (socket removed) by [`Relay::stop`].
pub struct Relay {
    server: ttrpc::r#async::Server,
    path: PathBuf,
}

struct StatsOnly {
    agent: AgentAddress,
    connect_timeout: Duration,
}

/// The longest unix socket path the kernel takes (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;

impl Relay {
    pub async fn start(
        path: &Path,
        agent: AgentAddress,
        connect_timeout: Duration,
    ) -> std::io::Result<Relay> {
        if path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} is too long for a unix socket", path.display()),
            ));
        }
        let incoming = transport::owner_only_unix_listener(path)?;
        let service = Arc::new(StatsOnly {
            agent,
            connect_timeout,
        });
        let mut server = ttrpc::r#async::Server::new()
            .add_listener(Listener::new(incoming))
            .register_service(agent_ttrpc::create_agent(service));
        server
            .start()
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Relay {
            server,
            path: path.to_path_buf(),
        })
    }

    pub async fn stop(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.server.shutdown()).await;
        let _ = std::fs::remove_file(&self.path);
    }
}

fn refused(method: &str) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(
        ttrpc::Code::PERMISSION_DENIED,
        format!("the stats relay serves Stats only, not {method}"),
    ))
}

impl StatsOnly {
    /// A client of the guest and the caller's deadline (bounded) to carry to it.
    async fn guest(
        &self,
        ctx: &TtrpcContext,
    ) -> ttrpc::Result<(agent_ttrpc::AgentClient, ttrpc::context::Context)> {
        let client = kata::connect_agent(&self.agent, self.connect_timeout)
            .await
            .map_err(|e| {
                ttrpc::Error::RpcStatus(ttrpc::get_status(
                    ttrpc::Code::UNAVAILABLE,
                    format!("cannot reach the guest: {e}"),
                ))
            })?;
        let budget = match u64::try_from(ctx.timeout_nano) {
            Ok(n) if n > 0 => Duration::from_nanos(n).min(Duration::from_secs(60)),
            _ => Duration::from_secs(10),
        };
        Ok((
            client,
            ttrpc::context::with_timeout(budget.as_nanos() as i64),
        ))
    }
}

#[async_trait]
impl agent_ttrpc::Agent for StatsOnly {
    async fn stats(
        &self,
        ctx: &TtrpcContext,
        req: agent::StatsRequest,
    ) -> ttrpc::Result<agent::StatsResponse> {
        let (client, ctx) = self.guest(ctx).await?;
        client.stats(ctx, &req).await
    }

    async fn ping(
        &self,
        ctx: &TtrpcContext,
        req: agent::PingRequest,
    ) -> ttrpc::Result<agent::PingResponse> {
        let (client, ctx) = self.guest(ctx).await?;
        client.ping(ctx, &req).await
    }

    async fn mount(
        &self,
        _: &TtrpcContext,
        _: agent::MountRequest,
    ) -> ttrpc::Result<agent::MountResponse> {
        Err(refused("Mount"))
    }

    async fn unmount(
        &self,
        _: &TtrpcContext,
        _: agent::UnmountRequest,
    ) -> ttrpc::Result<agent::UnmountResponse> {
        Err(refused("Unmount"))
    }

    async fn list(
        &self,
        _: &TtrpcContext,
        _: agent::ListRequest,
    ) -> ttrpc::Result<agent::ListResponse> {
        Err(refused("List"))
    }
}
