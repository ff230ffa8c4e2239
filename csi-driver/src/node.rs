//! The Node service. It mounts nothing: `NodePublishVolume` validates the volume, leaves a
//! hand-off record (and the CephFS key, on tmpfs only) for the CNFS shim, and makes the target
//! path a read-only *file* that says what happened. Under the CNFS runtime class the shim
//! replaces that bind source with the guest's own mount; under any other runtime the
//! container finds a file where it expected a directory, so writes fail loudly instead of
//! landing in an empty host directory.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cnfs_host::kata::{self, MonitorPaths};
use cnfs_protocols::agent;
use cnfs_protocols::handoff::{HandoffDir, NodeSecret, Record, RECORD_VERSION};
use cnfs_protocols::keyed_lock::KeyedLocks;
use cnfs_protocols::transport::AgentAddress;
use slog::Logger;
use tonic::{Request, Response, Status};

use crate::bounds::{self, echo};
use crate::capability::{self, invalid};
use crate::csi::node_server::Node;
use crate::csi::node_service_capability::{rpc, Rpc, Type as CapType};
use crate::csi::volume_usage::Unit;
use crate::csi::*;
use crate::encryption;
use crate::server::logged;

/// Volume context keys the node plugin reads; kubelet adds the `csi.storage.k8s.io/` ones.
pub const SOURCE: &str = "source";
const POD_NAMESPACE: &str = "csi.storage.k8s.io/pod.namespace";
const POD_NAME: &str = "csi.storage.k8s.io/pod.name";
const POD_UID: &str = "csi.storage.k8s.io/pod.uid";
const EPHEMERAL: &str = "csi.storage.k8s.io/ephemeral";
const KUBERNETES_PREFIX: &str = "csi.storage.k8s.io/";
/// Set by external-provisioner on every PV it makes (its identity), so kubelet passes it on.
const PROVISIONER_IDENTITY: &str = "storage.kubernetes.io/csiProvisionerIdentity";

/// The first line of every target file: how the node plugin recognises its own.
pub const TARGET_MARKER: &str = "CNFS volume hand-off";

/// tmpfs's statfs magic: keys may only be written where they never reach a disk.
const TMPFS_MAGIC: i64 = 0x0102_1994;

pub struct NodeConfig {
    pub node_id: String,
    pub handoff_root: PathBuf,
    /// Where Kata's sandbox monitor sockets are (stats from a guest whose wrapper runs no
    /// stats relay).
    pub kata: MonitorPaths,
    pub agent_port: u32,
    pub stats_timeout: Duration,
}

pub struct NodeService {
    cfg: NodeConfig,
    handoff: HandoffDir,
    log: Logger,
    /// One lock per target path: publish and unpublish of one target never interleave.
    locks: KeyedLocks<String>,
}

impl NodeService {
    pub fn new(cfg: NodeConfig, log: Logger) -> Self {
        NodeService {
            handoff: HandoffDir::new(&cfg.handoff_root),
            cfg,
            log,
            locks: KeyedLocks::new(),
        }
    }

    fn publish(&self, p: Publish) -> Result<(), Status> {
        let Publish {
            target,
            record,
            secret,
        } = p;
        if let Some(existing) = self.handoff.read_record(&target).map_err(internal)? {
            if existing == record {
                // The same publish again (a retry, or kubelet after a restart): the target
                // keeps its inode; a rotated key replaces the old one.
                if let (true, Some(secret)) = (record.has_secret, &secret) {
                    self.handoff
                        .write_secret(&target, secret)
                        .map_err(internal)?;
                }
                return Ok(());
            }
            return Err(Status::already_exists(format!(
                "target_path: {} is already published for volume {} with another source, mode or capability",
                echo(&target),
                echo(&existing.volume_id)
            )));
        }
        if record.has_secret {
            self.check_tmpfs()?;
        }
        self.make_target(&target, &record)?;
        let aliases = aliases(&target);
        let written = (|| {
            for path in &aliases {
                if let Some(secret) = secret.as_ref().filter(|_| record.has_secret) {
                    self.handoff.write_secret(path, secret)?;
                }
                // The record goes last: the shim never sees a record whose secret is not
                // there yet.
                self.handoff.write_record(&Record {
                    target_path: path.clone(),
                    ..record.clone()
                })?;
            }
            Ok::<_, std::io::Error>(())
        })();
        if let Err(e) = written {
            // A failed publish leaves nothing behind: no key on tmpfs, no target.
            for path in &aliases {
                let _ = self.handoff.remove(path);
            }
            let _ = std::fs::remove_file(&target);
            return Err(internal(format!(
                "writing the hand-off for {}: {e}",
                echo(&target)
            )));
        }
        Ok(())
    }

    /// Makes `target` the explanatory file (replacing the empty directory a CO may have made).
    fn make_target(&self, target: &str, record: &Record) -> Result<(), Status> {
        let path = Path::new(target);
        let parent = path
            .parent()
            .ok_or_else(|| invalid("target_path", "has no parent directory"))?;
        if !parent.is_dir() {
            return Err(Status::failed_precondition(format!(
                "target_path: parent directory {} does not exist",
                echo(&parent.to_string_lossy())
            )));
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => std::fs::remove_dir(path).map_err(|e| {
                Status::failed_precondition(format!(
                    "target_path: {} is a directory that cannot be replaced ({e}); it must be empty",
                    echo(target)
                ))
            })?,
            Ok(m) if m.is_file() && is_our_target(path) => std::fs::remove_file(path).map_err(internal)?,
            Ok(_) => {
                return Err(Status::failed_precondition(format!(
                    "target_path: {} exists and is not a CNFS target",
                    echo(target)
                )))
            }
            Err(_) => {}
        }
        let text = format!(
            "{TARGET_MARKER}: volume {:?} ({}).\n\
             It is mounted only inside Kata guests started with the CNFS runtime class; this\n\
             container's runtime did not hand it to a guest, so there is no volume here.\n\
             Run the pod with the CNFS RuntimeClass (runtimeClassName).\n",
            record.volume_id, record.source
        );
        // A temp file of its own (O_EXCL, random name) per call: publishes into one parent
        // directory run concurrently. It is removed if anything fails before the rename.
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut tmp = tempfile::Builder::new()
                .prefix(".cnfs-target-")
                .permissions(std::fs::Permissions::from_mode(0o444))
                .tempfile_in(parent)?;
            tmp.write_all(text.as_bytes())?;
            tmp.persist(path).map(drop).map_err(|e| e.error)
        };
        write()
            .map_err(|e| Status::internal(format!("target_path: creating {}: {e}", echo(target))))
    }

    fn check_tmpfs(&self) -> Result<(), Status> {
        let root = self.handoff.root();
        std::fs::create_dir_all(root).map_err(internal)?;
        let st = nix::sys::statfs::statfs(root).map_err(|e| internal(e.to_string()))?;
        if st.filesystem_type().0 as i64 != TMPFS_MAGIC {
            return Err(Status::failed_precondition(format!(
                "the hand-off directory {} is not on tmpfs; refusing to write a key where it could reach a disk",
                root.display()
            )));
        }
        Ok(())
    }

    fn unpublish(&self, volume_id: &str, target: &str) -> Result<(), Status> {
        let target = target.to_string();
        if let Some(r) = self.handoff.read_record(&target).map_err(internal)? {
            if r.volume_id != volume_id {
                return Err(Status::not_found(format!(
                    "target_path: {} is published for another volume, not {}",
                    echo(&target),
                    echo(volume_id)
                )));
            }
        }
        for alias in aliases(&target) {
            self.handoff.remove(&alias).map_err(internal)?;
        }
        let path = Path::new(&target);
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.is_file() && is_our_target(path) => {
                std::fs::remove_file(path).map_err(internal)?
            }
            Ok(m) if m.is_dir() => {
                // An empty directory a CO made and never published into.
                let _ = std::fs::remove_dir(path);
            }
            _ => {}
        }
        Ok(())
    }

    async fn stats(
        &self,
        req: &NodeGetVolumeStatsRequest,
    ) -> Result<NodeGetVolumeStatsResponse, Status> {
        bounds::required_string("volume_id", &req.volume_id)?;
        let target = bounds::path("volume_path", &req.volume_path)?;
        let record = self
            .handoff
            .read_record(&target)
            .map_err(internal)?
            .filter(|r| r.volume_id == req.volume_id)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "volume {} is not published at {}",
                    echo(&req.volume_id),
                    echo(&target)
                ))
            })?;
        let abnormal = |message: String| NodeGetVolumeStatsResponse {
            usage: vec![],
            volume_condition: Some(VolumeCondition {
                abnormal: true,
                message,
            }),
        };
        // The shim records the guest under the path the runtime gave it (symlinks resolved).
        let mut guest = None;
        for alias in aliases(&target) {
            if let Some(g) = self.handoff.read_guest(&alias).map_err(internal)? {
                guest = Some(g);
                break;
            }
        }
        let Some(guest) = guest else {
            return Ok(abnormal(format!(
                "volume {} is published but no guest has mounted it: the pod must run with the CNFS runtime class",
                echo(&record.volume_id)
            )));
        };
        let t = self.cfg.stats_timeout;
        let work = async {
            let unreachable = |e: String| {
                format!(
                    "cannot reach the guest of sandbox {}: {e}",
                    guest.sandbox_id
                )
            };
            cnfs_protocols::spec::validate_sandbox_id("sandbox id", &guest.sandbox_id)
                .map_err(|e| unreachable(e.to_string()))?;
            // The shim's stats relay first: no guest socket and no AF_VSOCK needed here.
            // Kata's monitor socket is the fallback (a wrapper without a relay).
            let relay = self.handoff.relay_path(&guest.sandbox_id);
            let addr = if relay.exists() {
                AgentAddress::Unix { path: relay }
            } else {
                kata::find_agent(&guest.sandbox_id, &self.cfg.kata, self.cfg.agent_port, t)
                    .await
                    .map_err(|e| unreachable(e.to_string()))?
            };
            let client = kata::connect_agent(&addr, t)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let req = agent::StatsRequest {
                name: guest.volume.clone(),
                timeout_ms: t.as_millis() as u32,
                ..Default::default()
            };
            let ctx = ttrpc::context::with_timeout((t + Duration::from_secs(2)).as_nanos() as i64);
            client.stats(ctx, &req).await.map_err(|e| {
                format!(
                    "the guest's Stats failed: {}",
                    kata::printable(&e.to_string(), 400)
                )
            })
        };
        let stats = match tokio::time::timeout(t * 3 + Duration::from_secs(2), work).await {
            Ok(Ok(s)) => s,
            Ok(Err(msg)) => return Ok(abnormal(msg)),
            Err(_) => {
                return Ok(abnormal(format!(
                    "the guest did not answer within {} s",
                    (t * 3).as_secs()
                )))
            }
        };
        let healthy = stats.health.enum_value_or_default() == agent::Health::HEALTHY;
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        Ok(NodeGetVolumeStatsResponse {
            usage: {
                let mut usage = vec![VolumeUsage {
                    total: clamp(stats.total_bytes),
                    available: clamp(stats.available_bytes),
                    used: clamp(stats.total_bytes.saturating_sub(stats.free_bytes)),
                    unit: Unit::Bytes as i32,
                }];
                // CephFS reports free inodes as "unknown" (all ones): no inode figures then.
                if stats.free_inodes <= stats.total_inodes {
                    usage.push(VolumeUsage {
                        total: clamp(stats.total_inodes),
                        available: clamp(stats.free_inodes),
                        used: clamp(stats.total_inodes - stats.free_inodes),
                        unit: Unit::Inodes as i32,
                    });
                }
                usage
            },
            volume_condition: Some(VolumeCondition {
                abnormal: !healthy,
                message: if healthy {
                    format!("mounted in the guest of sandbox {}", guest.sandbox_id)
                } else {
                    kata::printable(&stats.health_detail, 400)
                },
            }),
        })
    }
}

/// A validated `NodePublishVolume`: what is written, and for which target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// The target path exactly as the CO gave it.
    pub target: String,
    /// The hand-off record (no secret in it).
    pub record: Record,
    /// The node-publish secret, when the volume needs one (CephFS, SMB, an encrypted volume's
    /// `encryptionKey`).
    pub secret: Option<NodeSecret>,
}

/// Validates a `NodePublishVolume` request without touching the file system: the CSI size
/// limits (see [`bounds`]), the capability, `volume_context` (the source URL, kubelet's pod
/// information) and secrets, and finally the volume itself with the same code the shim and
/// the agent run. Errors are `INVALID_ARGUMENT` naming the field; a key is never echoed.
pub fn validate_publish(req: &NodePublishVolumeRequest) -> Result<Publish, Status> {
    bounds::required_string("volume_id", &req.volume_id)?;
    let target = bounds::path("target_path", &req.target_path)?;
    let access = capability::check("volume_capability", req.volume_capability.as_ref())?;
    let ctx = &req.volume_context;
    bounds::map("volume_context", ctx)?;
    let known = |k: &str| {
        [
            SOURCE,
            PROVISIONER_IDENTITY,
            encryption::PARAMETER,
            encryption::SIZE_ATTRIBUTE,
        ]
        .contains(&k)
            || k.starts_with(KUBERNETES_PREFIX)
    };
    if let Some(k) = ctx.keys().find(|k| !known(k)) {
        return Err(invalid(
            "volume_context",
            format!(
                "unknown key {} (CNFS reads \"source\", \"encryption\", \"size\", \
                 csi.storage.k8s.io/* and {PROVISIONER_IDENTITY})",
                echo(k)
            ),
        ));
    }
    let source = ctx.get(SOURCE).ok_or_else(|| {
        invalid(
            "volume_context.source",
            "is required (a volume URL such as nfs://server/export?vers=4.1)",
        )
    })?;
    // An inline volume's `encryption`/`size` attributes become part of its URL, the form
    // the record keeps and the shim reads.
    let source = &encryption::source_with_attributes(source, ctx)?;
    let get = |k: &str| ctx.get(k).cloned().unwrap_or_default();
    let pod = |k: &str, ok: fn(&str) -> bool, what: &str| -> Result<String, Status> {
        let v = get(k);
        if v.is_empty() || ok(&v) {
            Ok(v)
        } else {
            Err(invalid(
                &format!("volume_context.{k}"),
                format!("must be {what}"),
            ))
        }
    };
    let pod_namespace = pod(
        POD_NAMESPACE,
        is_dns_label,
        "a Kubernetes namespace (a DNS label)",
    )?;
    let pod_name = pod(
        POD_NAME,
        is_dns_subdomain,
        "a Kubernetes pod name (a DNS subdomain)",
    )?;
    let pod_uid = pod(POD_UID, is_uid, "a Kubernetes UID (letters, digits, '-')")?;
    let ephemeral = match get(EPHEMERAL).as_str() {
        "true" => true,
        "false" | "" => false,
        _ => {
            return Err(invalid(
                &format!("volume_context.{EPHEMERAL}"),
                "must be \"true\" or \"false\"",
            ))
        }
    };
    let secret = node_secret(&req.secrets)?;
    let record = Record {
        version: RECORD_VERSION,
        volume_id: req.volume_id.clone(),
        target_path: target.clone(),
        source: source.clone(),
        read_only: req.readonly || access.read_only,
        pod_namespace,
        pod_name,
        pod_uid,
        ephemeral,
        has_secret: false,
        mount_flags: access.mount_flags,
    };
    // The same validation the shim and the agent run; the key is checked, never echoed.
    let (spec, _) = record
        .volume_spec(secret.as_ref())
        .map_err(|e| invalid(&e.field, e.reason))?;
    if let Some(e) = &spec.encryption {
        if let Some(cap) = &req.volume_capability {
            capability::refuse_shared("volume_capability", cap, e.mode)?;
        }
    }
    let record = Record {
        // The shim reads the secret file only when the record says there is one.
        has_secret: spec.source.kind().needs_secret() || spec.encryption.is_some(),
        ..record
    };
    Ok(Publish {
        target,
        record,
        secret,
    })
}

/// A Kubernetes namespace: an RFC 1123 DNS label (the rule volume names follow too).
fn is_dns_label(s: &str) -> bool {
    cnfs_protocols::spec::validate_name("", s).is_ok()
}

/// A Kubernetes object name such as a pod's: an RFC 1123 DNS subdomain.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(|l| !l.is_empty() && is_dns_label(l))
}

/// A Kubernetes UID (a UUID in practice).
fn is_uid(s: &str) -> bool {
    s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The target path as kubelet names it and, if different, with symlinks resolved: containerd
/// resolves them before the shim sees the bind source (e.g. a symlinked /var/lib/kubelet), so
/// the hand-off is recorded under both.
fn aliases(target: &str) -> Vec<String> {
    let path = Path::new(target);
    let resolved = std::fs::canonicalize(path).ok().or_else(|| {
        let parent = std::fs::canonicalize(path.parent()?).ok()?;
        Some(parent.join(path.file_name()?))
    });
    let mut out = vec![target.to_string()];
    if let Some(r) = resolved.and_then(|r| r.to_str().map(str::to_string)) {
        if r != target {
            out.push(r);
        }
    }
    out
}

fn is_our_target(path: &Path) -> bool {
    let mut head = [0u8; TARGET_MARKER.len()];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
        .is_ok()
        && head == TARGET_MARKER.as_bytes()
}

/// The node-publish secret, as given: which keys a file system reads is its own
/// (`FsKind::secret_keys`), checked with the source in `Record::volume_spec`.
fn node_secret(secrets: &HashMap<String, String>) -> Result<Option<NodeSecret>, Status> {
    bounds::map("secrets", secrets)?;
    Ok((!secrets.is_empty())
        .then(|| NodeSecret::from_pairs(secrets.iter().map(|(k, v)| (k.as_str(), v.as_str())))))
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

fn capability(t: rpc::Type) -> NodeServiceCapability {
    NodeServiceCapability {
        r#type: Some(CapType::Rpc(Rpc { r#type: t as i32 })),
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_publish_volume(
        &self,
        req: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let start = Instant::now();
        let req = req.into_inner();
        // Validated before anything else, so only bounded, well-formed paths are locked on.
        let r = match validate_publish(&req) {
            Ok(p) => {
                let _held = self.locks.lock(&p.target).await;
                self.publish(p)
            }
            Err(e) => Err(e),
        };
        let r = r.map(|_| NodePublishVolumeResponse {});
        logged(&self.log, "NodePublishVolume", &req.volume_id, start, r)
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let start = Instant::now();
        let req = req.into_inner();
        let checked = bounds::required_string("volume_id", &req.volume_id)
            .and_then(|_| bounds::path("target_path", &req.target_path));
        let r = match checked {
            Ok(target) => {
                let _held = self.locks.lock(&target).await;
                self.unpublish(&req.volume_id, &target)
            }
            Err(e) => Err(e),
        };
        let r = r.map(|_| NodeUnpublishVolumeResponse {});
        logged(&self.log, "NodeUnpublishVolume", &req.volume_id, start, r)
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let start = Instant::now();
        let req = req.into_inner();
        let r = self.stats(&req).await;
        logged(&self.log, "NodeGetVolumeStats", &req.volume_id, start, r)
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: vec![
                capability(rpc::Type::GetVolumeStats),
                capability(rpc::Type::VolumeCondition),
            ],
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.cfg.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: None,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csi::volume_capability::access_mode::Mode;
    use crate::csi::volume_capability::{AccessMode, AccessType, MountVolume};
    use tonic::Code;

    const ENCRYPTED: &str =
        "nfs://10.0.0.5/exports/k8s/pvc-1?vers=4.1&encryption=luks2&size=134217728";
    /// Raw bytes of a Kubernetes secret value, trailing newline included.
    const VOLUME_KEY: &str = "0123456789abcdef volume key\n";

    fn request(source: &str, mode: Mode, key: Option<&str>) -> NodePublishVolumeRequest {
        NodePublishVolumeRequest {
            volume_id: "nfs+luks2#delete#10.0.0.5#/exports/k8s#pvc-1".into(),
            target_path: "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/pv/mount".into(),
            volume_capability: Some(VolumeCapability {
                access_type: Some(AccessType::Mount(MountVolume::default())),
                access_mode: Some(AccessMode { mode: mode as i32 }),
            }),
            volume_context: HashMap::from([(SOURCE.to_string(), source.to_string())]),
            secrets: key
                .map(|k| HashMap::from([("encryptionKey".to_string(), k.to_string())]))
                .unwrap_or_default(),
            ..Default::default()
        }
    }

    #[test]
    fn an_encrypted_publish_keeps_the_key_beside_the_record_and_never_in_it() {
        let p = validate_publish(&request(
            ENCRYPTED,
            Mode::SingleNodeWriter,
            Some(VOLUME_KEY),
        ))
        .expect("valid");
        assert!(p.record.has_secret, "the shim must read the secret file");
        assert_eq!(p.record.source, ENCRYPTED);
        let secret = p.secret.as_ref().expect("secret kept");
        let (spec, wire) = p.record.volume_spec(Some(secret)).expect("the shim's view");
        let e = spec.encryption.as_ref().expect("encrypted");
        assert_eq!(e.key.expose(), VOLUME_KEY.as_bytes(), "exact bytes");
        assert_eq!(e.size, 128 << 20);
        assert_eq!(wire.encryption.key, VOLUME_KEY.as_bytes());
        let json = serde_json::to_string(&p.record).expect("json");
        assert!(!json.contains("volume key"), "{json}");
        assert!(!format!("{p:?}").contains("volume key"));
        // Read-only on a single node is fine.
        let p = validate_publish(&request(
            ENCRYPTED,
            Mode::SingleNodeReaderOnly,
            Some(VOLUME_KEY),
        ))
        .expect("valid");
        assert!(p.record.read_only);
    }

    #[test]
    fn an_encrypted_publish_without_encryption_key_is_refused_naming_it() {
        let e = validate_publish(&request(ENCRYPTED, Mode::SingleNodeWriter, None)).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(
            e.message()
                .starts_with("secrets.encryptionKey: is required"),
            "{e:?}"
        );
        // The wrong key name is refused by name; its value never shows.
        let mut req = request(ENCRYPTED, Mode::SingleNodeWriter, None);
        req.secrets = HashMap::from([("key".to_string(), VOLUME_KEY.to_string())]);
        let e = validate_publish(&req).unwrap_err();
        assert!(e.message().starts_with("secrets.encryptionKey"), "{e:?}");
        assert!(!e.message().contains("volume key"), "{e:?}");
    }

    #[test]
    fn an_encrypted_publish_refuses_multi_node_modes_by_name() {
        for mode in [
            Mode::MultiNodeMultiWriter,
            Mode::MultiNodeSingleWriter,
            Mode::MultiNodeReaderOnly,
        ] {
            let e = validate_publish(&request(ENCRYPTED, mode, Some(VOLUME_KEY))).unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument);
            assert!(
                e.message().starts_with(&format!(
                    "volume_capability.access_mode.mode: {} is refused for encryption=luks2",
                    mode.as_str_name()
                )),
                "{e:?}"
            );
        }
        // The same modes stay fine for a plain volume.
        validate_publish(&request(
            "nfs://10.0.0.5/exports/k8s/pvc-1",
            Mode::MultiNodeMultiWriter,
            None,
        ))
        .expect("plain volumes are shared");
    }

    #[test]
    fn an_encrypted_cephfs_volume_as_the_controller_makes_it_publishes_with_both_keys() {
        // The source CreateVolume gives an encrypted CephFS volume.
        const CEPHFS: &str = "cephfs://10.0.0.1:6789/volumes/csi/pvc-2/0a1b?fs=cephfs\
                              &encryption=luks2&size=1073741824";
        const CEPH_KEY: &str = "AQBgTnRmAAAAABAAkm5KbB5ZCVDp3V0q3RyMjA==";
        let mut req = request(CEPHFS, Mode::SingleNodeWriter, Some(VOLUME_KEY));
        req.volume_id = "cephfs+luks2#prod#cephfs#csi#pvc-2".into();
        req.secrets.extend([
            ("userID".to_string(), "k8s".to_string()),
            ("userKey".to_string(), CEPH_KEY.to_string()),
        ]);
        let p = validate_publish(&req).expect("valid");
        assert!(p.record.has_secret);
        let (spec, wire) = p.record.volume_spec(p.secret.as_ref()).expect("valid");
        assert_eq!(wire.cephfs().client, "k8s");
        assert_eq!(wire.cephfs().secret, CEPH_KEY);
        let e = spec.encryption.expect("encrypted");
        assert_eq!((e.size, e.key.expose()), (1 << 30, VOLUME_KEY.as_bytes()));
        // Without the encryption key it is refused by name, the CephFS key notwithstanding.
        req.secrets.remove("encryptionKey");
        let e = validate_publish(&req).unwrap_err();
        assert!(
            e.message()
                .starts_with("secrets.encryptionKey: is required"),
            "{e:?}"
        );
    }

    #[test]
    fn an_encrypted_smb_volume_as_the_controller_makes_it_publishes_with_account_and_key() {
        // The sources CreateVolume gives encrypted volumes of an SMB class.
        const SMB_PW: &str = "smb pw;with=odd#chars";
        for (id, source, mode, key, size) in [
            (
                "smb+luks2#delete#10.0.0.9#data#k8s/pvc-3",
                "smb://10.0.0.9/data/k8s/pvc-3?vers=3.1.1&encryption=luks2&size=1073741824",
                Mode::SingleNodeWriter,
                VOLUME_KEY,
                1 << 30,
            ),
            (
                "smb+gocryptfs#delete#10.0.0.9#data#k8s/pvc-4",
                "smb://10.0.0.9/data/k8s/pvc-4?vers=3.1.1&encryption=gocryptfs",
                Mode::MultiNodeMultiWriter,
                SHARED_KEY,
                0,
            ),
        ] {
            // One node-publish secret holds the account and the volume's key.
            let mut req = request(source, mode, Some(key));
            req.volume_id = id.into();
            req.secrets.extend([
                ("username".to_string(), "k8s-volumes".to_string()),
                ("password".to_string(), SMB_PW.to_string()),
            ]);
            let p = validate_publish(&req).unwrap_or_else(|e| panic!("{id}: {e:?}"));
            assert!(p.record.has_secret, "{id}");
            assert_eq!(p.record.source, source);
            let (spec, wire) = p.record.volume_spec(p.secret.as_ref()).expect("valid");
            let smb = wire.smb();
            let dir = format!("/{}", id.rsplit_once("#data#").expect("dir").1);
            assert_eq!(
                (smb.server.as_str(), smb.share.as_str(), smb.path.as_str()),
                ("10.0.0.9", "data", dir.as_str()),
                "{id}"
            );
            assert_eq!(
                (smb.username.as_str(), smb.password.as_str()),
                ("k8s-volumes", SMB_PW)
            );
            let e = spec.encryption.expect("encrypted");
            assert_eq!((e.size, e.key.expose()), (size, key.as_bytes()), "{id}");
            // Neither the password nor the key is in the record.
            let json = serde_json::to_string(&p.record).expect("json");
            assert!(
                !json.contains("odd#chars") && !json.contains(" key"),
                "{json}"
            );
            // The key alone is not enough: the account is the file system's, named.
            req.secrets.remove("password");
            let e = validate_publish(&req).unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument);
            assert!(e.message().starts_with("secrets.password"), "{e:?}");
        }
        // luks2 on SMB is single-node as anywhere, and refuses cifs's local locks.
        let luks2 = "smb://10.0.0.9/data/k8s/pvc-3?vers=3.1.1&encryption=luks2&size=1073741824";
        let mut req = request(luks2, Mode::MultiNodeMultiWriter, Some(VOLUME_KEY));
        req.secrets.extend([
            ("username".to_string(), "k8s-volumes".to_string()),
            ("password".to_string(), SMB_PW.to_string()),
        ]);
        let e = validate_publish(&req).unwrap_err();
        assert!(
            e.message().starts_with(
                "volume_capability.access_mode.mode: MULTI_NODE_MULTI_WRITER is refused for \
                 encryption=luks2"
            ),
            "{e:?}"
        );
        req.volume_capability = Some(VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume {
                mount_flags: vec!["nobrl".into()],
                ..Default::default()
            })),
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
        });
        let e = validate_publish(&req).unwrap_err();
        assert!(e.message().starts_with("volume.options.nobrl"), "{e:?}");
    }

    #[test]
    fn inline_encryption_and_size_attributes_make_the_volume_encrypted() {
        let mut req = request(
            "nfs://10.0.0.5/exports/inline?vers=4.1",
            Mode::SingleNodeWriter,
            Some(VOLUME_KEY),
        );
        req.volume_context.extend([
            ("encryption".to_string(), "luks2".to_string()),
            ("size".to_string(), "256Mi".to_string()),
            (EPHEMERAL.to_string(), "true".to_string()),
        ]);
        let p = validate_publish(&req).expect("valid");
        assert_eq!(
            p.record.source,
            "nfs://10.0.0.5/exports/inline?vers=4.1&encryption=luks2&size=268435456"
        );
        assert!(p.record.ephemeral && p.record.has_secret);
        let (spec, _) = p.record.volume_spec(p.secret.as_ref()).expect("valid");
        assert_eq!(spec.encryption.expect("encrypted").size, 256 << 20);
        // Another mode is refused naming the attribute.
        req.volume_context
            .insert("encryption".to_string(), "aes".to_string());
        let e = validate_publish(&req).unwrap_err();
        assert!(
            e.message().starts_with("volume_context.encryption: ")
                && e.message()
                    .contains("is not supported (luks2 or gocryptfs)"),
            "{e:?}"
        );
    }

    const SHARED: &str = "nfs://10.0.0.5/exports/k8s/pvc-2?vers=3&encryption=gocryptfs";
    /// One line: gocryptfs reads its password so.
    const SHARED_KEY: &str = "0123456789abcdef shared key";

    #[test]
    fn a_gocryptfs_publish_takes_every_access_mode_and_keeps_the_key_beside_the_record() {
        for mode in [
            Mode::MultiNodeMultiWriter,
            Mode::MultiNodeSingleWriter,
            Mode::MultiNodeReaderOnly,
            Mode::SingleNodeWriter,
            Mode::SingleNodeMultiWriter,
        ] {
            let mut req = request(SHARED, mode, Some(SHARED_KEY));
            req.volume_id = "nfs+gocryptfs#delete#10.0.0.5#/exports/k8s#pvc-2".into();
            let p = validate_publish(&req).unwrap_or_else(|e| panic!("{mode:?}: {e:?}"));
            assert!(p.record.has_secret, "the shim must read the secret file");
            assert_eq!(p.record.source, SHARED);
            assert_eq!(p.record.read_only, mode == Mode::MultiNodeReaderOnly);
            let (spec, wire) = p
                .record
                .volume_spec(p.secret.as_ref())
                .expect("the shim's view");
            let e = spec.encryption.as_ref().expect("encrypted");
            assert_eq!(e.mode, cnfs_protocols::spec::EncryptionMode::Gocryptfs);
            assert_eq!((e.key.expose(), e.size), (SHARED_KEY.as_bytes(), 0));
            assert_eq!(wire.encryption.key, SHARED_KEY.as_bytes());
            let json = serde_json::to_string(&p.record).expect("json");
            assert!(!json.contains("shared key"), "{json}");
        }
    }

    #[test]
    fn a_gocryptfs_publish_refuses_a_missing_key_or_one_with_a_newline_naming_the_secret() {
        let e = validate_publish(&request(SHARED, Mode::MultiNodeMultiWriter, None)).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(
            e.message()
                .starts_with("secrets.encryptionKey: is required"),
            "{e:?}"
        );
        // A key as `kubectl create secret --from-file` of an `echo`ed file stores it.
        for key in ["secret-value\n", "secret\nvalue", "secret\0value"] {
            let e = validate_publish(&request(SHARED, Mode::MultiNodeMultiWriter, Some(key)))
                .unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument);
            assert_eq!(
                e.message(),
                "secrets.encryptionKey: gocryptfs reads its password as one line: the key must \
                 not contain a newline or NUL byte"
            );
        }
    }

    #[test]
    fn inline_gocryptfs_attribute_makes_the_volume_encrypted_without_a_size() {
        let mut req = request(
            "nfs://10.0.0.5/exports/inline?vers=4.1",
            Mode::MultiNodeMultiWriter,
            Some(SHARED_KEY),
        );
        req.volume_context.extend([
            ("encryption".to_string(), "gocryptfs".to_string()),
            (EPHEMERAL.to_string(), "true".to_string()),
        ]);
        let p = validate_publish(&req).expect("valid");
        assert_eq!(
            p.record.source,
            "nfs://10.0.0.5/exports/inline?vers=4.1&encryption=gocryptfs"
        );
        assert!(p.record.ephemeral && p.record.has_secret);
        // A size is refused naming the attribute.
        req.volume_context
            .insert("size".to_string(), "1Gi".to_string());
        let e = validate_publish(&req).unwrap_err();
        assert_eq!(
            e.message(),
            "volume_context.size: is refused with encryption: gocryptfs: only luks2 volumes have \
             a size (gocryptfs shares the file system's space)"
        );
    }
}
