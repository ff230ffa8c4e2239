//! The ttrpc edge, kept thin: decode, validate once, call the volume table, map the error to
//! its status code, and log one line per request (id, method, volume, duration, outcome).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cnfs_protocols::agent;
use cnfs_protocols::agent_ttrpc;
use cnfs_protocols::spec::{self, VolumeSpec};
use slog::{info, warn, Logger};
use ttrpc::r#async::TtrpcContext;

use crate::error::AgentError;
use crate::volumes::Volumes;

pub struct Service {
    pub volumes: Arc<Volumes>,
    pub log: Logger,
    pub started: Instant,
    pub capabilities: Vec<String>,
    next_id: AtomicU64,
}

impl Service {
    pub fn new(volumes: Arc<Volumes>, log: Logger, capabilities: Vec<String>) -> Self {
        Service {
            volumes,
            log,
            started: Instant::now(),
            capabilities,
            next_id: AtomicU64::new(1),
        }
    }

    /// Runs one request and logs its outcome. Errors carry no secrets: specs are formatted
    /// through their redacting types only.
    async fn handle<T, F>(&self, method: &str, volume: &str, f: F) -> ttrpc::Result<T>
    where
        F: std::future::Future<Output = Result<T, AgentError>>,
    {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let start = Instant::now();
        let result = f.await;
        let ms = start.elapsed().as_millis() as u64;
        match &result {
            Ok(_) => info!(self.log, "request done";
                "request_id" => id, "method" => method, "volume" => volume, "duration_ms" => ms),
            Err(e) => warn!(self.log, "request failed";
                "request_id" => id, "method" => method, "volume" => volume, "duration_ms" => ms,
                "code" => format!("{:?}", e.code()), "error" => e.to_string()),
        }
        result.map_err(Into::into)
    }
}

/// The caller's ttrpc deadline, if it sent one, also bounds the work.
fn with_ctx_deadline(ctx: &TtrpcContext, d: Duration) -> Duration {
    match u64::try_from(ctx.timeout_nano) {
        Ok(n) if n > 0 => d.min(Duration::from_nanos(n)),
        _ => d,
    }
}

#[async_trait]
impl agent_ttrpc::Agent for Service {
    async fn ping(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::PingRequest,
    ) -> ttrpc::Result<agent::PingResponse> {
        self.handle("Ping", "", async {
            Ok(agent::PingResponse {
                version: env!("CARGO_PKG_VERSION").to_string(),
                sandbox_id: self.volumes.sandbox_id(),
                filesystems: self.volumes.filesystems(),
                capabilities: self.capabilities.clone(),
                uptime_ms: self.started.elapsed().as_millis() as u64,
                volumes: self.volumes.count() as u32,
                ..Default::default()
            })
        })
        .await
    }

    async fn mount(
        &self,
        ctx: &TtrpcContext,
        req: agent::MountRequest,
    ) -> ttrpc::Result<agent::MountResponse> {
        let name = req
            .volume
            .as_ref()
            .map(|v| v.name.clone())
            .unwrap_or_default();
        self.handle("Mount", &name, async {
            let wire = req.volume.as_ref().ok_or_else(|| spec::SpecError {
                field: "volume".into(),
                reason: "is required".into(),
            })?;
            let spec = VolumeSpec::from_wire(wire)?;
            let sandbox = match req.sandbox_id.as_str() {
                "" => None,
                id => {
                    spec::validate_sandbox_id("sandbox_id", id)?;
                    Some(id)
                }
            };
            let timeout = with_ctx_deadline(ctx, self.volumes.mount_timeout(req.timeout_ms));
            let start = Instant::now();
            let done = self.volumes.mount(spec, sandbox, timeout).await?;
            Ok(agent::MountResponse {
                mount_point: done.mount_point.display().to_string(),
                already_mounted: done.already_mounted,
                duration_ms: start.elapsed().as_millis() as u64,
                ..Default::default()
            })
        })
        .await
    }

    async fn unmount(
        &self,
        ctx: &TtrpcContext,
        req: agent::UnmountRequest,
    ) -> ttrpc::Result<agent::UnmountResponse> {
        self.handle("Unmount", &req.name, async {
            let timeout = with_ctx_deadline(ctx, self.volumes.unmount_timeout(req.timeout_ms));
            let start = Instant::now();
            let done = self.volumes.unmount(&req.name, timeout).await?;
            Ok(agent::UnmountResponse {
                method: done.method.to_string(),
                duration_ms: start.elapsed().as_millis() as u64,
                attempts: done.attempts,
                ..Default::default()
            })
        })
        .await
    }

    async fn list(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::ListRequest,
    ) -> ttrpc::Result<agent::ListResponse> {
        self.handle("List", "", async {
            Ok(agent::ListResponse {
                volumes: self.volumes.list(),
                ..Default::default()
            })
        })
        .await
    }

    async fn stats(
        &self,
        ctx: &TtrpcContext,
        req: agent::StatsRequest,
    ) -> ttrpc::Result<agent::StatsResponse> {
        self.handle("Stats", &req.name, async {
            let timeout = with_ctx_deadline(ctx, self.volumes.probe_timeout(req.timeout_ms));
            let s = self.volumes.stats(&req.name, timeout).await?;
            Ok(agent::StatsResponse {
                total_bytes: s.total_bytes,
                free_bytes: s.free_bytes,
                available_bytes: s.available_bytes,
                total_inodes: s.total_inodes,
                free_inodes: s.free_inodes,
                health: s.health.into(),
                health_detail: s.detail,
                probe_ms: s.probe.as_millis() as u64,
                ..Default::default()
            })
        })
        .await
    }
}
