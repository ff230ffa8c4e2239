//! What the wrapper does around the calls it intercepts, for one sandbox:
//! - sandbox `Create`: before forwarding, parse the pod's annotations, check the policy and
//!   resolve secrets (a refusal creates nothing); after the delegate created the VM, find the
//!   guest and `Mount` every volume, undoing them all if one fails.
//! - app container `Create`: before forwarding, add the volume bind mounts to config.json;
//!   and for every bind mount whose source is a CSI target with a `cnfs-csi` hand-off record,
//!   mount that volume in the guest and re-point the bind mount at the guest's mount.
//! - sandbox `Delete`: `Unmount` every volume, bounded; the delete goes on regardless.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use cnfs_protocols::agent;
use cnfs_protocols::agent_ttrpc::AgentClient;
use cnfs_protocols::spec::VolumeSpec;
use cnfs_protocols::transport::AgentAddress;
use futures::StreamExt;
use slog::{info, warn, Logger};
use tokio::sync::Mutex;

use cnfs_host::kata::{self, MonitorPaths};
use cnfs_host::policy::Policy;
use cnfs_protocols::handoff::{GuestUse, HandoffDir};

use crate::annotations::{
    self, PodVolume, CRI_CONTAINER_NAME, CRI_CONTAINER_TYPE, CRI_SANDBOX_ID, CRI_SANDBOX_NAMESPACE,
};
use crate::handoff;
use crate::secrets::SecretStore;
use crate::shim::config::ShimConfig;
use crate::shim::proxy::Hooks;
use crate::shim::relay::Relay;

/// How many volume mounts of one pod are in flight at once.
const MOUNT_PARALLEL: usize = 4;

/// A refusal to show containerd (it becomes the pod's event): code and message.
#[derive(Debug)]
pub struct Refusal {
    pub code: ttrpc::Code,
    pub message: String,
}

impl Refusal {
    fn new(code: ttrpc::Code, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: format!("cnfs: {}", message.into()),
        }
    }
}

/// What to do when the delegate answers an intercepted request.
pub enum After {
    /// Mount these volumes in the sandbox's guest (specs carry resolved secrets, in memory).
    MountVolumes {
        sandbox_id: String,
        volumes: Vec<(PodVolume, agent::VolumeSpec)>,
        /// How long reading the annotations, the policy and the secrets took.
        validated: Duration,
    },
}

struct Mounted {
    sandbox_id: String,
    volumes: Vec<PodVolume>,
    agent: Option<AgentAddress>,
    /// Agent volume names of CSI volumes mounted for app containers.
    csi: Vec<String>,
    /// The stats relay for the CSI node plugin, once a CSI volume is mounted.
    relay: Option<Relay>,
}

pub struct Sandbox {
    cfg: ShimConfig,
    policy: Policy,
    secrets: SecretStore,
    log: Logger,
    state: Mutex<Option<Mounted>>,
}

enum Kind {
    Sandbox,
    App,
    /// No CRI annotations (e.g. `ctr run`): passed through untouched.
    Plain,
}

fn read_annotations(bundle: &Path) -> Result<HashMap<String, String>, Refusal> {
    let spec = oci_spec::runtime::Spec::load(bundle.join("config.json")).map_err(|e| {
        Refusal::new(
            ttrpc::Code::INVALID_ARGUMENT,
            format!("reading the bundle's config.json: {e}"),
        )
    })?;
    Ok(spec.annotations().clone().unwrap_or_default())
}

impl Sandbox {
    pub fn new(cfg: ShimConfig, log: Logger) -> anyhow::Result<Self> {
        let policy = match &cfg.policy {
            Some(p) => Policy::load(p)?,
            None => Policy::default(),
        };
        Ok(Sandbox {
            secrets: SecretStore::new(cfg.secrets_dir.clone()),
            cfg,
            policy,
            log,
            state: Mutex::new(None),
        })
    }

    /// Before forwarding a task `Create`.
    pub async fn before_create(&self, id: &str, bundle: &Path) -> Result<Option<After>, Refusal> {
        let ann = read_annotations(bundle)?;
        let has_cnfs = ann.keys().any(|k| k.starts_with(annotations::PREFIX));
        let kind = match ann.get(CRI_CONTAINER_TYPE).map(String::as_str) {
            Some("sandbox") => Kind::Sandbox,
            Some("container") => Kind::App,
            _ => Kind::Plain,
        };
        match kind {
            Kind::Plain if has_cnfs => Err(Refusal::new(
                ttrpc::Code::FAILED_PRECONDITION,
                "cnfs.io/ annotations need a Kubernetes pod (CRI sandbox); this container has none",
            )),
            Kind::Plain => Ok(None),
            Kind::Sandbox if !has_cnfs => Ok(None),
            Kind::Sandbox => self.prepare_sandbox(id, &ann).map(Some),
            Kind::App => {
                self.hand_off(bundle, &ann).await?;
                Ok(None)
            }
        }
    }

    fn prepare_sandbox(&self, id: &str, ann: &HashMap<String, String>) -> Result<After, Refusal> {
        let start = Instant::now();
        let volumes = annotations::parse(ann)
            .map_err(|e| Refusal::new(ttrpc::Code::INVALID_ARGUMENT, e.to_string()))?;
        let namespace = ann.get(CRI_SANDBOX_NAMESPACE).cloned().unwrap_or_default();
        if namespace.is_empty() {
            return Err(Refusal::new(
                ttrpc::Code::FAILED_PRECONDITION,
                format!("the sandbox has no {CRI_SANDBOX_NAMESPACE} annotation; the policy needs the namespace"),
            ));
        }
        let mut out = Vec::new();
        for v in volumes {
            self.policy.check(&namespace, &v.spec).map_err(|e| {
                Refusal::new(
                    ttrpc::Code::PERMISSION_DENIED,
                    format!("annotation \"cnfs.io/volume.{}\": {e}", v.name()),
                )
            })?;
            let mut wire = v.spec.to_wire(false);
            let kind = v.spec.source.kind();
            let refuse = |code, e: &dyn std::fmt::Display| {
                Refusal::new(
                    code,
                    format!("annotation \"cnfs.io/volume.{}\": {e}", v.name()),
                )
            };
            let mut resolved = false;
            if let (true, Some(name)) = (kind.needs_secret(), &v.secret_ref) {
                let secret = self
                    .secrets
                    .resolve(&namespace, name)
                    .map_err(|e| refuse(ttrpc::Code::FAILED_PRECONDITION, &e))?;
                // The file system reads its own secret format; errors name lines, not values.
                let creds = kind.credentials_from_file(secret.expose()).map_err(|e| {
                    refuse(
                        ttrpc::Code::FAILED_PRECONDITION,
                        &format!("secret {name}: {e}"),
                    )
                })?;
                kind.apply_credentials(&format!("secret {name}"), &mut wire, &creds)
                    .map_err(|e| refuse(ttrpc::Code::FAILED_PRECONDITION, &e))?;
                resolved = true;
            }
            // An encrypted volume's key: the secret file's bytes, exactly.
            if let (Some(name), Some(encryption)) =
                (&v.encryption_key_ref, wire.encryption.as_mut())
            {
                let key = self.secrets.resolve_bytes(&namespace, name).map_err(|e| {
                    refuse(
                        ttrpc::Code::FAILED_PRECONDITION,
                        &format!("encryption_key={name}: {e}"),
                    )
                })?;
                encryption.key = key.expose().to_vec();
                resolved = true;
            }
            if resolved {
                // The agent re-validates; check the resolved values here too, without
                // echoing them.
                VolumeSpec::from_wire(&wire)
                    .map_err(|e| refuse(ttrpc::Code::INVALID_ARGUMENT, &e))?;
            }
            out.push((v, wire));
        }
        Ok(After::MountVolumes {
            sandbox_id: id.to_string(),
            volumes: out,
            validated: start.elapsed(),
        })
    }

    /// After the delegate answered OK to the sandbox `Create`: mount everything or nothing.
    pub async fn after_ok(&self, after: After) -> Result<(), Refusal> {
        let After::MountVolumes {
            sandbox_id,
            volumes,
            validated,
        } = after;
        let start = Instant::now();
        let paths = MonitorPaths::with_roots(self.cfg.kata_monitor_roots.clone());
        let ms = |d: Duration| d.as_millis() as u64;
        let unreachable = |e: kata::KataError| {
            Refusal::new(
                ttrpc::Code::UNAVAILABLE,
                format!("cannot reach the sandbox's guest: {e}"),
            )
        };
        let addr = kata::find_agent(
            &sandbox_id,
            &paths,
            self.cfg.agent_port,
            self.cfg.connect_timeout(),
        )
        .await
        .map_err(unreachable)?;
        let discovered = start.elapsed();
        let client = kata::connect_agent(&addr, self.cfg.connect_timeout())
            .await
            .map_err(unreachable)?;
        let connected = start.elapsed();
        // The agent mounts different volumes in parallel: a pod with many volumes waits for
        // the slowest, not the sum (at most MOUNT_PARALLEL calls in flight).
        type Mounting<'a> = std::pin::Pin<
            Box<dyn std::future::Future<Output = (usize, Result<(), ttrpc::Error>)> + Send + 'a>,
        >;
        let calls: Vec<Mounting<'_>> = volumes
            .iter()
            .enumerate()
            .map(|(i, (_, wire))| {
                let (client, sandbox_id) = (&client, &sandbox_id);
                Box::pin(async move { (i, self.mount(client, sandbox_id, wire).await.map(|_| ())) })
                    as Mounting<'_>
            })
            .collect();
        let mut results: Vec<(usize, Result<(), ttrpc::Error>)> = futures::stream::iter(calls)
            .buffer_unordered(MOUNT_PARALLEL)
            .collect()
            .await;
        results.sort_by_key(|(i, _)| *i);
        let done: Vec<String> = results
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(i, _)| volumes[*i].0.name().to_string())
            .collect();
        // All or nothing; the first failure in the pod's order is the one reported.
        if let Some((i, Err(e))) = results.iter().find(|(_, r)| r.is_err()) {
            let (code, msg) = status_of(e);
            self.unmount_all(&client, &done).await;
            return Err(Refusal::new(
                code,
                format!(
                    "annotation \"cnfs.io/volume.{}\": mounting in the guest failed: {msg}",
                    volumes[*i].0.name()
                ),
            ));
        }
        info!(self.log, "volumes mounted in the guest"; "sandbox" => &sandbox_id,
            "volumes" => done.join(","), "duration_ms" => ms(start.elapsed()),
            "validate_us" => validated.as_micros() as u64,
            "discovery_ms" => ms(discovered), "connect_ms" => ms(connected - discovered),
            "mounts_ms" => ms(start.elapsed() - connected));
        *self.state.lock().await = Some(Mounted {
            sandbox_id,
            volumes: volumes.into_iter().map(|(v, _)| v).collect(),
            agent: Some(addr),
            csi: Vec::new(),
            relay: None,
        });
        Ok(())
    }

    /// App container: add the bind mounts of the volumes it should see.
    async fn hand_off(&self, bundle: &Path, ann: &HashMap<String, String>) -> Result<(), Refusal> {
        self.hand_off_csi(bundle, ann).await?;
        let state = self.state.lock().await;
        let volumes = match state.as_ref() {
            Some(m) => m.volumes.clone(),
            // The wrapper did not see the sandbox start (restarted): pod annotations are on
            // every container too, and the guest still holds the mounts.
            None => annotations::parse(ann)
                .map_err(|e| Refusal::new(ttrpc::Code::INVALID_ARGUMENT, e.to_string()))?,
        };
        let name = ann.get(CRI_CONTAINER_NAME).map(String::as_str);
        let mounts = handoff::container_mounts(&volumes, name);
        handoff::inject(bundle, mounts)
            .map_err(|e| Refusal::new(ttrpc::Code::FAILED_PRECONDITION, e.to_string()))?;
        Ok(())
    }

    /// App container: its CSI volumes (bind sources with a hand-off record) are mounted in the
    /// guest, all or none, and their bind mounts re-pointed there.
    async fn hand_off_csi(
        &self,
        bundle: &Path,
        ann: &HashMap<String, String>,
    ) -> Result<(), Refusal> {
        let precondition = |m: String| Refusal::new(ttrpc::Code::FAILED_PRECONDITION, m);
        let dir = HandoffDir::new(&self.cfg.csi_handoff_dir);
        let sources = handoff::bind_sources(bundle).map_err(|e| precondition(e.to_string()))?;
        let mut records = Vec::new();
        for src in sources {
            match dir.read_record(&src) {
                Ok(Some(r)) => records.push(r),
                Ok(None) => {}
                Err(e) => return Err(precondition(format!("CSI hand-off for {src}: {e}"))),
            }
        }
        if records.is_empty() {
            return Ok(());
        }
        let sandbox_id = ann
            .get(CRI_SANDBOX_ID)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                precondition(format!("the container has no {CRI_SANDBOX_ID} annotation"))
            })?
            .clone();
        // It names files (the stats relay): the shared rules, and never "." or "..".
        if let Err(e) = cnfs_protocols::spec::validate_sandbox_id(CRI_SANDBOX_ID, &sandbox_id) {
            return Err(precondition(e.to_string()));
        }
        if sandbox_id == "." || sandbox_id == ".." {
            return Err(precondition(format!(
                "{CRI_SANDBOX_ID} must not be . or .."
            )));
        }
        let namespace = ann.get(CRI_SANDBOX_NAMESPACE).cloned().unwrap_or_default();
        let container = ann.get(CRI_CONTAINER_NAME).map(String::as_str);
        let mut wanted = Vec::new();
        for r in &records {
            let what = format!("CSI volume {:?}", r.volume_id);
            if !r.pod_namespace.is_empty() && r.pod_namespace != namespace {
                return Err(Refusal::new(
                    ttrpc::Code::PERMISSION_DENIED,
                    format!(
                        "{what} was published for namespace {:?}, not this pod's {namespace:?}",
                        r.pod_namespace
                    ),
                ));
            }
            let secret = if r.has_secret {
                dir.read_secret(&r.target_path).map_err(|e| {
                    precondition(format!("{what}: reading its node-publish secret: {e}"))
                })?
            } else {
                None
            };
            let (spec, wire) = r
                .volume_spec(secret.as_ref())
                .map_err(|e| Refusal::new(ttrpc::Code::INVALID_ARGUMENT, format!("{what}: {e}")))?;
            // An inline volume's source is the pod author's: the admin's policy decides, as for
            // annotations. PersistentVolumes and StorageClasses are admin objects.
            if r.ephemeral {
                self.policy.check(&namespace, &spec).map_err(|e| {
                    Refusal::new(ttrpc::Code::PERMISSION_DENIED, format!("{what}: {e}"))
                })?;
            }
            // A FUSE volume's sidecar mounts the volume where it wants the socket.
            let socket = matches!(&spec.source,
                cnfs_protocols::spec::Source::Fuse(f) if container == Some(f.sidecar.as_str()));
            wanted.push((r, wire, socket));
        }

        let mut state = self.state.lock().await;
        let known = state
            .as_ref()
            .filter(|m| m.sandbox_id == sandbox_id)
            .and_then(|m| m.agent.clone());
        let unreachable = |e: kata::KataError| {
            Refusal::new(
                ttrpc::Code::UNAVAILABLE,
                format!("CSI volumes: cannot reach the sandbox's guest: {e}"),
            )
        };
        let addr = match known {
            Some(a) => a,
            None => {
                let paths = MonitorPaths::with_roots(self.cfg.kata_monitor_roots.clone());
                kata::find_agent(
                    &sandbox_id,
                    &paths,
                    self.cfg.agent_port,
                    self.cfg.connect_timeout(),
                )
                .await
                .map_err(unreachable)?
            }
        };
        let client = kata::connect_agent(&addr, self.cfg.connect_timeout())
            .await
            .map_err(unreachable)?;
        let mut done: Vec<String> = Vec::new();
        let mut redirects = Vec::new();
        for (r, wire, socket) in &wanted {
            match self.mount(&client, &sandbox_id, wire).await {
                Ok(resp) => {
                    if !resp.already_mounted {
                        done.push(wire.name.clone());
                    }
                }
                Err(e) => {
                    let (code, msg) = status_of(&e);
                    self.unmount_all(&client, &done).await;
                    return Err(Refusal::new(
                        code,
                        format!(
                            "CSI volume {:?}: mounting in the guest failed: {msg}",
                            r.volume_id
                        ),
                    ));
                }
            }
            let guest = GuestUse {
                sandbox_id: sandbox_id.clone(),
                volume: wire.name.clone(),
            };
            if let Err(e) = dir.write_guest(&r.target_path, &guest) {
                warn!(self.log, "could not record the guest of a CSI volume (stats will say so)";
                    "volume_id" => &r.volume_id, "error" => e.to_string());
            }
            redirects.push(handoff::Redirect {
                source: r.target_path.clone(),
                volume: wire.name.clone(),
                // The sidecar's socket directory is always read-only (see handoff).
                read_only: wire.read_only || *socket,
                socket: *socket,
            });
        }
        if let Err(e) = handoff::redirect(bundle, &redirects) {
            self.unmount_all(&client, &done).await;
            return Err(precondition(e.to_string()));
        }
        info!(self.log, "CSI volumes mounted in the guest"; "sandbox" => &sandbox_id,
            "volumes" => redirects.iter().map(|r| r.volume.as_str()).collect::<Vec<_>>().join(","));
        let m = state.get_or_insert_with(|| Mounted {
            sandbox_id: sandbox_id.clone(),
            // The wrapper may not have seen the sandbox start: annotation volumes come back
            // from the container's own copy of the pod annotations.
            volumes: annotations::parse(ann).unwrap_or_default(),
            agent: None,
            csi: Vec::new(),
            relay: None,
        });
        if m.relay.is_none() {
            let path = dir.relay_path(&sandbox_id);
            match Relay::start(&path, addr.clone(), self.cfg.connect_timeout()).await {
                Ok(r) => m.relay = Some(r),
                Err(e) => warn!(self.log, "no stats relay for the CSI node plugin";
                    "path" => path.display().to_string(), "error" => e.to_string()),
            }
        }
        m.agent.get_or_insert(addr);
        for r in redirects {
            if !m.csi.contains(&r.volume) {
                m.csi.push(r.volume);
            }
        }
        Ok(())
    }

    /// Before forwarding the sandbox's `Delete`: unmount, bounded; never blocks the delete.
    pub async fn before_delete(&self, id: &str) {
        let mut state = self.state.lock().await;
        let Some(m) = state.as_ref().filter(|m| m.sandbox_id == id) else {
            return;
        };
        let names: Vec<String> = m
            .volumes
            .iter()
            .map(|v| v.name().to_string())
            .chain(m.csi.iter().cloned())
            .collect();
        if let Some(addr) = m.agent.clone() {
            let bound = self.cfg.unmount_timeout() + Duration::from_secs(2);
            let work = async {
                let client = kata::connect_agent(&addr, Duration::from_secs(3))
                    .await
                    .ok()?;
                self.unmount_all(&client, &names).await;
                Some(())
            };
            if tokio::time::timeout(bound, work)
                .await
                .ok()
                .flatten()
                .is_none()
            {
                warn!(self.log, "could not unmount the sandbox's volumes; the VM's end cleans up";
                    "sandbox" => id);
            }
        }
        if let Some(relay) = state.as_mut().and_then(|m| m.relay.take()) {
            relay.stop().await;
        }
        *state = None;
    }

    /// One `Mount` in the guest, bounded by the configured mount timeout.
    async fn mount(
        &self,
        client: &AgentClient,
        sandbox_id: &str,
        wire: &agent::VolumeSpec,
    ) -> Result<agent::MountResponse, ttrpc::Error> {
        let req = agent::MountRequest {
            volume: protobuf::MessageField::some(wire.clone()),
            sandbox_id: sandbox_id.to_string(),
            timeout_ms: self.cfg.mount_timeout().as_millis() as u32,
            ..Default::default()
        };
        let ctx = ttrpc::context::with_timeout(
            (self.cfg.mount_timeout() + Duration::from_secs(5)).as_nanos() as i64,
        );
        client.mount(ctx, &req).await
    }

    async fn unmount_all(&self, client: &AgentClient, names: &[String]) {
        for name in names.iter().rev() {
            // The sandbox is going away: never blocked by a container still holding a copy.
            let req = agent::UnmountRequest {
                name: name.clone(),
                timeout_ms: self.cfg.unmount_timeout().as_millis() as u32,
                force: true,
                ..Default::default()
            };
            let ctx = ttrpc::context::with_timeout(
                (self.cfg.unmount_timeout() + Duration::from_secs(2)).as_nanos() as i64,
            );
            match client.unmount(ctx, &req).await {
                Ok(r) => {
                    info!(self.log, "volume unmounted"; "volume" => name, "method" => r.method)
                }
                Err(e) => {
                    warn!(self.log, "unmount failed"; "volume" => name, "error" => status_of(&e).1)
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl Hooks for Sandbox {
    async fn before_create(&self, id: &str, bundle: &Path) -> Result<Option<After>, Refusal> {
        Sandbox::before_create(self, id, bundle).await
    }

    async fn after_ok(&self, after: After) -> Result<(), Refusal> {
        Sandbox::after_ok(self, after).await
    }

    async fn before_delete(&self, id: &str) {
        Sandbox::before_delete(self, id).await
    }
}

/// The agent's status, kept as it is (the guest is untrusted: its message is shown bounded).
fn status_of(e: &ttrpc::Error) -> (ttrpc::Code, String) {
    match e {
        ttrpc::Error::RpcStatus(s) => (s.code(), s.message().chars().take(512).collect()),
        other => (
            ttrpc::Code::UNAVAILABLE,
            other.to_string().chars().take(512).collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnfs_protocols::handoff::{Record, RECORD_VERSION};
    use oci_spec::runtime::{MountBuilder, Spec};

    struct Case {
        dir: std::path::PathBuf,
        sandbox: Sandbox,
        target: String,
    }

    /// A bundle for an app container of namespace `ns` whose bind mount comes from a CSI
    /// target with a hand-off record; no guest is reachable.
    fn case(tag: &str, ns: &str, record: impl FnOnce(&mut Record)) -> Case {
        let dir = std::env::temp_dir().join(format!("cnfs-sb-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("bundle")).expect("dir");
        let target = dir.join("pods/u/volumes/kubernetes.io~csi/pv/mount");
        let target = target.display().to_string();
        let mut r = Record {
            version: RECORD_VERSION,
            volume_id: "vol".into(),
            target_path: target.clone(),
            source: "nfs://10.0.0.5/exports/x".into(),
            read_only: false,
            pod_namespace: "team-a".into(),
            pod_name: "p".into(),
            pod_uid: "u".into(),
            ephemeral: false,
            has_secret: false,
            mount_flags: vec![],
        };
        record(&mut r);
        HandoffDir::new(dir.join("handoff"))
            .write_record(&r)
            .expect("record");
        let mut spec = Spec::default();
        let m = MountBuilder::default()
            .destination("/data")
            .typ("bind")
            .source(&target)
            .options(vec!["rbind".to_string()])
            .build()
            .expect("mount");
        spec.set_mounts(Some(vec![m]));
        spec.set_annotations(Some(
            [
                (CRI_CONTAINER_TYPE, "container"),
                (CRI_SANDBOX_ID, "sb1"),
                (CRI_SANDBOX_NAMESPACE, ns),
                (CRI_CONTAINER_NAME, "app"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ));
        spec.save(dir.join("bundle/config.json")).expect("spec");
        let cfg = ShimConfig {
            csi_handoff_dir: dir.join("handoff"),
            kata_monitor_roots: vec![dir.join("no-kata")],
            guest_connect_timeout_seconds: 1,
            ..ShimConfig::default()
        };
        let log = Logger::root(slog::Discard, slog::o!());
        Case {
            sandbox: Sandbox::new(cfg, log).expect("sandbox"),
            dir,
            target,
        }
    }

    async fn refusal(c: &Case) -> Refusal {
        match c.sandbox.before_create("app1", &c.dir.join("bundle")).await {
            Err(r) => r,
            Ok(_) => panic!("the container must be refused"),
        }
    }

    #[tokio::test]
    async fn an_inline_csi_volume_needs_the_admins_policy() {
        // No policy file: everything a pod author names is denied.
        let c = case("inline", "team-a", |r| r.ephemeral = true);
        let r = refusal(&c).await;
        assert_eq!(r.code, ttrpc::Code::PERMISSION_DENIED, "{r:?}");
        assert!(r.message.contains("CSI volume \"vol\""), "{r:?}");
        let _ = std::fs::remove_dir_all(&c.dir);
    }

    #[tokio::test]
    async fn a_persistent_volume_skips_the_policy_and_needs_its_guest() {
        // PVs are admin objects: no policy check, so the next step (the guest) is what fails,
        // and the container's bind mount is left as the runtime gave it.
        let c = case("pv", "team-a", |_| {});
        let r = refusal(&c).await;
        assert_eq!(r.code, ttrpc::Code::UNAVAILABLE, "{r:?}");
        let spec = Spec::load(c.dir.join("bundle/config.json")).expect("spec");
        let src = spec.mounts().clone().unwrap_or_default()[0]
            .source()
            .clone();
        assert_eq!(src.as_deref(), Some(std::path::Path::new(&c.target)));
        let _ = std::fs::remove_dir_all(&c.dir);
    }

    #[tokio::test]
    async fn a_record_of_another_namespace_is_refused() {
        let c = case("ns", "team-b", |_| {});
        let r = refusal(&c).await;
        assert_eq!(r.code, ttrpc::Code::PERMISSION_DENIED, "{r:?}");
        assert!(r.message.contains("team-a"), "{r:?}");
        let _ = std::fs::remove_dir_all(&c.dir);
    }

    /// A sandbox whose policy allows encrypted NFS volumes of team-a, with the key secret
    /// `sec-key` holding `key` (none: no such file).
    fn encrypted_pod(tag: &str, key: Option<&[u8]>) -> (std::path::PathBuf, Sandbox) {
        encrypted_pod_allowing(tag, key, "[\"encryption\", \"size\"]")
    }

    /// As [`encrypted_pod`], with the policy entry's `options` list.
    fn encrypted_pod_allowing(
        tag: &str,
        key: Option<&[u8]>,
        options: &str,
    ) -> (std::path::PathBuf, Sandbox) {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("cnfs-sb-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let secrets = dir.join("secrets");
        std::fs::create_dir_all(secrets.join("team-a")).expect("dir");
        for d in [&secrets, &secrets.join("team-a")] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        }
        if let Some(key) = key {
            let f = secrets.join("team-a/sec-key");
            std::fs::write(&f, key).expect("key");
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
        let policy = dir.join("policy.toml");
        std::fs::write(
            &policy,
            format!(
                "[[allow]]\nnamespaces = [\"team-a\"]\nfilesystems = [\"nfs\"]\n\
                 servers = [\"10.0.0.0/8\"]\nexport_prefixes = [\"/exports\"]\n\
                 options = {options}\n"
            ),
        )
        .expect("policy");
        let cfg = ShimConfig {
            policy: Some(policy),
            secrets_dir: secrets,
            ..ShimConfig::default()
        };
        let log = Logger::root(slog::Discard, slog::o!());
        (dir, Sandbox::new(cfg, log).expect("sandbox"))
    }

    fn encrypted_annotations() -> HashMap<String, String> {
        annotations_for(
            "nfs://10.0.0.5/exports/sec?encryption=luks2&size=1Gi&encryption_key=sec-key",
        )
    }

    fn annotations_for(url: &str) -> HashMap<String, String> {
        [
            (CRI_SANDBOX_NAMESPACE, "team-a"),
            ("cnfs.io/volume.sec", url),
            ("cnfs.io/mount.sec", "/sec"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    #[test]
    fn an_encrypted_volume_gets_the_key_secrets_exact_bytes() {
        let key = b"\x00binary key\r\n";
        let (dir, sandbox) = encrypted_pod("luks-key", Some(key));
        let after = sandbox
            .prepare_sandbox("sb1", &encrypted_annotations())
            .expect("prepared");
        let After::MountVolumes { volumes, .. } = after;
        let e = volumes[0].1.encryption.as_ref().expect("encrypted");
        assert_eq!(e.key, key, "the file's bytes, untrimmed");
        assert_eq!(e.size_bytes, 1 << 30);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_or_bad_key_secret_is_refused_naming_annotation_and_option_not_content() {
        let (dir, sandbox) = encrypted_pod("luks-nokey", None);
        let r = match sandbox.prepare_sandbox("sb1", &encrypted_annotations()) {
            Err(r) => r,
            Ok(_) => panic!("no key secret: must be refused"),
        };
        assert_eq!(r.code, ttrpc::Code::FAILED_PRECONDITION, "{r:?}");
        assert!(
            r.message.starts_with(
                "cnfs: annotation \"cnfs.io/volume.sec\": encryption_key=sec-key: secret \
                 \"sec-key\" for namespace team-a does not exist"
            ),
            "{r:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
        // Too long a key: refused by the spec's rule, without its content.
        let (dir, sandbox) = encrypted_pod("luks-longkey", Some(&[b'S'; 1025]));
        let r = match sandbox.prepare_sandbox("sb1", &encrypted_annotations()) {
            Err(r) => r,
            Ok(_) => panic!("a 1025-byte key: must be refused"),
        };
        assert_eq!(r.code, ttrpc::Code::INVALID_ARGUMENT, "{r:?}");
        assert!(r.message.contains("volume.encryption.key"), "{r:?}");
        assert!(!r.message.contains("SSSS"), "{r:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    const GOCRYPTFS_URL: &str =
        "nfs://10.0.0.5/exports/sec?vers=3&encryption=gocryptfs&encryption_key=sec-key";

    #[test]
    fn a_gocryptfs_volume_gets_the_key_secrets_exact_bytes_under_a_policy_without_size() {
        let key = b" k3y\r with \xff bytes";
        let (dir, sandbox) = encrypted_pod_allowing("gocryptfs-key", Some(key), "[\"encryption\"]");
        let after = sandbox
            .prepare_sandbox("sb1", &annotations_for(GOCRYPTFS_URL))
            .expect("prepared");
        let After::MountVolumes { volumes, .. } = after;
        let e = volumes[0].1.encryption.as_ref().expect("encrypted");
        assert_eq!(e.mode, "gocryptfs");
        assert_eq!(e.key, key, "the file's bytes, untrimmed");
        assert_eq!(e.size_bytes, 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_gocryptfs_key_secret_ending_in_a_newline_is_refused_naming_the_field_not_the_key() {
        let (dir, sandbox) = encrypted_pod_allowing(
            "gocryptfs-nl",
            Some(b"SecretKeyBytes\n"),
            "[\"encryption\"]",
        );
        let r = match sandbox.prepare_sandbox("sb1", &annotations_for(GOCRYPTFS_URL)) {
            Err(r) => r,
            Ok(_) => panic!("a key with a newline: must be refused"),
        };
        assert_eq!(r.code, ttrpc::Code::INVALID_ARGUMENT, "{r:?}");
        assert!(
            r.message.contains(
                "volume.encryption.key: gocryptfs reads its password as one line: the key must \
                 not contain a newline or NUL byte"
            ),
            "{r:?}"
        );
        assert!(!r.message.contains("SecretKey"), "{r:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
