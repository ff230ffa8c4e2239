//! The ttrpc edge, kept thin: decode, validate once, call the volume table, map the error to
//! its status code, and log one line per request (id, method, volume, duration, outcome).
//!
//! Each request's work runs in its own task, bounded by the agent's own deadlines, not the
//! caller's: ttrpc drops a handler when the caller's deadline passes, and work dropped
//! half-way (a forked mount whose kill, reap and undo steps never run) would leave the guest
//! in a state the agent does not know. The handler only waits for the task; a caller that
//! gave up changes nothing but who reads the answer, and the log line says so.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cnfs_protocols::agent;
use cnfs_protocols::agent_ttrpc;
use cnfs_protocols::spec::{self, printable, VolumeSpec};
use protobuf::Message;
use slog::{info, warn, Logger};
use tokio::sync::Semaphore;
use ttrpc::r#async::TtrpcContext;

use crate::error::AgentError;
use crate::gate::{self, BodyCheck, Screen};
use crate::volumes::Volumes;

/// Requests that fork a child (Mount, Unmount, Stats) at once, agent-wide; more are refused
/// with RESOURCE_EXHAUSTED. Ping and List are not counted: the host can always ask.
pub const MAX_WORK_IN_FLIGHT: usize = 64;

pub struct Service {
    pub volumes: Arc<Volumes>,
    pub log: Logger,
    pub started: Instant,
    pub capabilities: Vec<String>,
    next_id: AtomicU64,
    work: Arc<Semaphore>,
}

/// Marks the caller as gone when the handler is dropped before the work ended.
struct Waiting(Arc<AtomicBool>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl Service {
    pub fn new(volumes: Arc<Volumes>, log: Logger, capabilities: Vec<String>) -> Self {
        Service {
            volumes,
            log,
            started: Instant::now(),
            capabilities,
            next_id: AtomicU64::new(1),
            work: Arc::new(Semaphore::new(MAX_WORK_IN_FLIGHT)),
        }
    }

    /// Runs one request in its own task and logs its outcome there, also when the caller
    /// left first. `volume` is caller text: it is logged bounded. Errors carry no secrets:
    /// specs are formatted through their redacting types only.
    async fn handle<T, F>(
        &self,
        method: &'static str,
        volume: &str,
        forks: bool,
        work: F,
    ) -> ttrpc::Result<T>
    where
        F: std::future::Future<Output = Result<T, AgentError>> + Send + 'static,
        T: Send + 'static,
    {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let volume = printable(volume);
        let permit = match forks {
            false => None,
            true => match self.work.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    let e = AgentError::Busy(format!(
                        "{MAX_WORK_IN_FLIGHT} mount, unmount and stats requests are in flight; retry later"
                    ));
                    warn!(self.log, "request refused"; "request_id" => id, "method" => method,
                        "volume" => &volume, "code" => format!("{:?}", e.code()));
                    return Err(e.into());
                }
            },
        };
        let waiting = Arc::new(AtomicBool::new(true));
        let (log, still) = (self.log.clone(), waiting.clone());
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let result = work.await;
            drop(permit);
            let ms = start.elapsed().as_millis() as u64;
            let caller_gone = !still.load(Ordering::SeqCst);
            match &result {
                Ok(_) => info!(log, "request done";
                    "request_id" => id, "method" => method, "volume" => &volume,
                    "duration_ms" => ms, "caller_gone" => caller_gone),
                Err(e) => warn!(log, "request failed";
                    "request_id" => id, "method" => method, "volume" => &volume,
                    "duration_ms" => ms, "caller_gone" => caller_gone,
                    "code" => format!("{:?}", e.code()), "error" => e.to_string()),
            }
            result
        });
        let _waiting = Waiting(waiting);
        match task.await {
            Ok(result) => result.map_err(Into::into),
            Err(e) => Err(AgentError::Internal(format!("request task ended: {e}")).into()),
        }
    }
}

/// How long a Stats caller waits for the probe: its own deadline (less a margin to answer in)
/// if shorter than the probe's bound. The probe itself always runs to its own bound.
fn caller_wait(ctx: &TtrpcContext, bound: Duration) -> Duration {
    match u64::try_from(ctx.timeout_nano) {
        Ok(n) if n > 0 => {
            let d = Duration::from_nanos(n);
            bound.min(d.saturating_sub(d / 10))
        }
        _ => bound,
    }
}

#[async_trait]
impl agent_ttrpc::Agent for Service {
    async fn ping(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::PingRequest,
    ) -> ttrpc::Result<agent::PingResponse> {
        let (volumes, caps, started) = (
            self.volumes.clone(),
            self.capabilities.clone(),
            self.started,
        );
        self.handle("Ping", "", false, async move {
            Ok(agent::PingResponse {
                version: env!("CARGO_PKG_VERSION").to_string(),
                sandbox_id: volumes.sandbox_id(),
                filesystems: volumes.filesystems(),
                capabilities: caps,
                uptime_ms: started.elapsed().as_millis() as u64,
                volumes: volumes.count() as u32,
                encryption_modes: volumes.encryption_modes(),
                ..Default::default()
            })
        })
        .await
    }

    async fn mount(
        &self,
        _ctx: &TtrpcContext,
        req: agent::MountRequest,
    ) -> ttrpc::Result<agent::MountResponse> {
        let name = req
            .volume
            .as_ref()
            .map(|v| v.name.clone())
            .unwrap_or_default();
        let volumes = self.volumes.clone();
        self.handle("Mount", &name, true, async move {
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
            let timeout = volumes.mount_timeout(req.timeout_ms, spec.encryption.is_some());
            let start = Instant::now();
            let done = volumes.mount(spec, sandbox, timeout).await?;
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
        _ctx: &TtrpcContext,
        req: agent::UnmountRequest,
    ) -> ttrpc::Result<agent::UnmountResponse> {
        let volumes = self.volumes.clone();
        let name = req.name.clone();
        self.handle("Unmount", &name, true, async move {
            spec::validate_name("name", &req.name)?;
            let timeout = volumes.unmount_timeout(req.timeout_ms);
            let start = Instant::now();
            let done = volumes.unmount(&req.name, timeout, req.force).await?;
            Ok(agent::UnmountResponse {
                method: done.method.to_string(),
                duration_ms: start.elapsed().as_millis() as u64,
                attempts: done.attempts,
                held_by: done.held_by,
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
        let volumes = self.volumes.clone();
        self.handle("List", "", false, async move {
            Ok(agent::ListResponse {
                volumes: volumes.list(),
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
        let volumes = self.volumes.clone();
        let bound = volumes.probe_timeout(req.timeout_ms);
        let wait = caller_wait(ctx, bound);
        let name = req.name.clone();
        self.handle("Stats", &name, true, async move {
            spec::validate_name("name", &req.name)?;
            let s = volumes.stats(&req.name, bound, wait).await?;
            Ok(agent::StatsResponse {
                total_bytes: s.total_bytes,
                free_bytes: s.free_bytes,
                available_bytes: s.available_bytes,
                total_inodes: s.total_inodes,
                free_inodes: s.free_inodes,
                health: s.health.into(),
                health_detail: s.detail,
                probe_ms: s.probe.as_millis() as u64,
                warnings: s.warnings,
                ..Default::default()
            })
        })
        .await
    }
}

fn check<M: Message>(body: &[u8]) -> Result<(), String> {
    M::parse_from_bytes(body)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// What the gate lets through: the agent's service and one body check per method.
pub fn screen() -> Screen {
    let methods: [(&str, BodyCheck); 5] = [
        ("Ping", check::<agent::PingRequest>),
        ("Mount", check::<agent::MountRequest>),
        ("Unmount", check::<agent::UnmountRequest>),
        ("List", check::<agent::ListRequest>),
        ("Stats", check::<agent::StatsRequest>),
    ];
    Screen {
        service: AGENT_SERVICE.to_string(),
        methods: methods
            .into_iter()
            .map(|(m, c)| (m.to_string(), c))
            .collect(),
    }
}

/// The ttrpc service name of `agent.proto`.
pub const AGENT_SERVICE: &str = "cnfs.v1.Agent";

/// The services to register: the agent's, plus the gate's hidden refusal method.
pub fn services(service: Arc<Service>) -> HashMap<String, ttrpc::r#async::Service> {
    let mut services = agent_ttrpc::create_agent(service);
    if let Some(s) = services.get_mut(AGENT_SERVICE) {
        s.methods
            .insert(gate::REFUSE_METHOD.to_string(), Box::new(gate::Refuse));
    }
    services
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_screen_knows_exactly_the_generated_methods() {
        let log = Logger::root(slog::Discard, slog::o!());
        let volumes = Arc::new(Volumes::new(
            crate::volumes::Config {
                modules_dir: "/nonexistent".into(),
                state_dir: "/nonexistent".into(),
                sandbox_id: None,
                default_mount_timeout: Duration::from_secs(1),
                max_timeout: Duration::from_secs(1),
                default_unmount_timeout: Duration::from_secs(1),
                default_probe_timeout: Duration::from_secs(1),
                tools: crate::tools::ToolClient::disabled("unit tests run no tool runner"),
            },
            log.clone(),
        ));
        let services = agent_ttrpc::create_agent(Arc::new(Service::new(volumes, log, vec![])));
        let generated = services
            .get(AGENT_SERVICE)
            .expect("the agent's service name");
        let mut have: Vec<&String> = generated.methods.keys().collect();
        have.sort();
        let s = screen();
        let mut screened: Vec<&String> = s.methods.keys().collect();
        screened.sort();
        assert_eq!(have, screened);
        assert_eq!(services.len(), 1);
    }
}
