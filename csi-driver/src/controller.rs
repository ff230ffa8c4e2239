//! The Controller service: provisions volumes on the backends in user space (no mount, no
//! privilege) and describes them to the node side by a volume URL in the volume context.
//!
//! - NFS (`fs: nfs`): a directory per volume on an admin-named share; `onDelete` decides
//!   what `DeleteVolume` does with it (retain | delete | archive). No quota exists, so the
//!   capacity is reported as unknown (0) and expansion is refused.
//! - CephFS (`fs: cephfs`): a subvolume per volume whose quota is the requested capacity;
//!   `ControllerExpandVolume` raises the quota while the volume is in use.
//!
//! `DeleteVolume` gets nothing but the volume id (and secrets), so the id carries what it
//! needs: `nfs#<onDelete>#<server>#<share>#<dir>` or
//! `cephfs#<cluster id>#<fs>#<group>#<subvolume>`; monitors come from the controller's
//! config by cluster id, so ids stay short and survive monitor changes.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use slog::{warn, Logger};
use tokio::sync::Mutex;
use tonic::{Request, Response, Status};

use crate::backend::cephfs::{CephCluster, CephCredentials, Subvolumes};
use crate::backend::nfs::NfsShare;
use crate::backend::{BackendError, OnDelete};
use crate::bounds::{self, echo, MAX_STRING};
use crate::capability::{self, invalid, required};
use crate::csi::controller_server::Controller;
use crate::csi::controller_service_capability::{rpc, Rpc, Type as CapType};
use crate::csi::validate_volume_capabilities_response::Confirmed;
use crate::csi::*;
use crate::server::logged;

const KUBERNETES_PREFIX: &str = "csi.storage.k8s.io/";
const DEFAULT_GROUP: &str = "csi";

/// `/etc/cnfs/csi.toml`: the Ceph clusters StorageClasses may name by `clusterID`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    #[serde(default)]
    pub clusters: BTreeMap<String, ClusterConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub monitors: Vec<String>,
    #[serde(default)]
    pub fsid: Option<String>,
}

impl ControllerConfig {
    /// A missing file is an empty config (NFS needs none).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text)
                .map_err(|e| anyhow::anyhow!("controller config {}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(anyhow::anyhow!("controller config {}: {e}", path.display())),
        }
    }
}

/// A volume id, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum VolumeId {
    Nfs {
        on_delete: OnDelete,
        share: NfsShare,
        dir: String,
    },
    CephFs {
        cluster: String,
        fs: String,
        group: String,
        subvolume: String,
    },
}

impl VolumeId {
    fn encode(&self) -> String {
        match self {
            VolumeId::Nfs {
                on_delete,
                share,
                dir,
            } => format!(
                "nfs#{}#{}#{}#{dir}",
                on_delete.as_str(),
                share.server,
                share.export
            ),
            VolumeId::CephFs {
                cluster,
                fs,
                group,
                subvolume,
            } => format!("cephfs#{cluster}#{fs}#{group}#{subvolume}"),
        }
    }

    /// `None` for an id this driver never made.
    fn parse(id: &str) -> Option<Self> {
        let parts: Vec<&str> = id.split('#').collect();
        match parts.as_slice() {
            ["nfs", on_delete, server, export, dir] => Some(VolumeId::Nfs {
                on_delete: OnDelete::parse(on_delete)?,
                share: NfsShare {
                    server: server.to_string(),
                    port: None,
                    export: export.to_string(),
                },
                dir: dir.to_string(),
            }),
            ["cephfs", cluster, fs, group, subvolume] => Some(VolumeId::CephFs {
                cluster: cluster.to_string(),
                fs: fs.to_string(),
                group: group.to_string(),
                subvolume: subvolume.to_string(),
            }),
            _ => None,
        }
    }
}

/// The backend name of a CSI volume name: kept when it is already a safe name
/// (`pvc-<uuid>`), else a stable hash of it (idempotent either way).
fn backend_name(name: &str) -> String {
    let safe = name.len() <= 100
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if safe {
        return name.to_string();
    }
    let d = Sha256::digest(name.as_bytes());
    format!(
        "vol-{}",
        d.iter()
            .take(12)
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

/// CreateVolume's `name`: required, within CSI's string limit and free of the control
/// characters the spec bans (U+0000-U+0008, U+000B, U+000C, U+000E-U+001F, U+007F-U+009F).
fn check_name(name: &str) -> Result<(), Status> {
    required("name", name)?;
    if name.len() > MAX_STRING {
        return bounds::string("name", name);
    }
    let banned = |c: char| matches!(c, '\u{0}'..='\u{8}' | '\u{b}' | '\u{c}' | '\u{e}'..='\u{1f}' | '\u{7f}'..='\u{9f}');
    if name.chars().any(banned) {
        return Err(invalid(
            "name",
            "must not contain control characters other than white space",
        ));
    }
    Ok(())
}

/// The id of a volume about to be made, refused before anything is made if it would break
/// CSI's string limit (the limits bind what a plugin sends as well); `from` names the
/// parameters that make it long.
fn fitting_id(id: &VolumeId, from: &str) -> Result<String, Status> {
    let encoded = id.encode();
    if encoded.len() > MAX_STRING {
        return Err(invalid(
            "parameters",
            format!(
                "the volume id would be {} bytes, longer than the CSI limit of {MAX_STRING} \
                 bytes: shorten {from}",
                encoded.len()
            ),
        ));
    }
    Ok(encoded)
}

pub struct ControllerService {
    cfg: ControllerConfig,
    timeout: Duration,
    log: Logger,
    locks: StdMutex<HashMap<String, Arc<Mutex<()>>>>,
}

fn status(e: BackendError) -> Status {
    match e {
        BackendError::NotFound(m) => Status::not_found(m),
        BackendError::Invalid(m) => Status::invalid_argument(m),
        BackendError::PermissionDenied(m) => Status::permission_denied(m),
        BackendError::Unavailable(m) => Status::unavailable(m),
        BackendError::AlreadyExists(m) => Status::already_exists(m),
        BackendError::Failed(m) => Status::internal(m),
    }
}

/// The requested size: at least `required_bytes`, at most `limit_bytes` (0 = unset).
fn requested_size(range: Option<&CapacityRange>) -> Result<Option<u64>, Status> {
    let Some(r) = range else { return Ok(None) };
    if r.required_bytes < 0 || r.limit_bytes < 0 {
        return Err(invalid("capacity_range", "must not be negative"));
    }
    if r.limit_bytes > 0 && r.required_bytes > r.limit_bytes {
        return Err(Status::out_of_range(
            "capacity_range: required_bytes is larger than limit_bytes",
        ));
    }
    let size = if r.required_bytes > 0 {
        r.required_bytes
    } else {
        r.limit_bytes
    };
    Ok((size > 0).then_some(size as u64))
}

/// Whether an existing quota (`None`: none) satisfies the requested range.
fn fits(quota: Option<u64>, range: Option<&CapacityRange>) -> bool {
    let Some(r) = range else {
        return true;
    };
    let Some(q) = quota else {
        return r.required_bytes <= 0 && r.limit_bytes <= 0;
    };
    let q = q as i64;
    q >= r.required_bytes && (r.limit_bytes <= 0 || q <= r.limit_bytes)
}

fn capability_of(t: rpc::Type) -> ControllerServiceCapability {
    ControllerServiceCapability {
        r#type: Some(CapType::Rpc(Rpc { r#type: t as i32 })),
    }
}

impl ControllerService {
    pub fn new(cfg: ControllerConfig, timeout: Duration, log: Logger) -> Self {
        ControllerService {
            cfg,
            timeout,
            log,
            locks: StdMutex::new(HashMap::new()),
        }
    }

    fn lock_for(&self, key: &str) -> Arc<Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.retain(|_, l| Arc::strong_count(l) > 1);
        locks.entry(key.to_string()).or_default().clone()
    }

    fn cluster(&self, id: &str) -> Result<CephCluster, Status> {
        let c = self.cfg.clusters.get(id).ok_or_else(|| {
            Status::failed_precondition(format!(
                "clusterID {} is not in the controller's config (clusters.<id> with monitors)",
                echo(id)
            ))
        })?;
        Ok(CephCluster {
            monitors: c.monitors.clone(),
            fsid: c.fsid.clone(),
        })
    }

    /// Admin credentials from the provisioner / expand / delete secret.
    fn admin(secrets: &HashMap<String, String>) -> Result<CephCredentials, Status> {
        let id = secrets
            .get("adminID")
            .ok_or_else(|| invalid("secrets.adminID", "is required for cephfs volumes"))?;
        let key = secrets
            .get("adminKey")
            .ok_or_else(|| invalid("secrets.adminKey", "is required for cephfs volumes"))?;
        CephCredentials::new(id.clone(), key.clone()).map_err(|e| invalid("secrets", e))
    }

    async fn create(&self, req: &CreateVolumeRequest) -> Result<Volume, Status> {
        check_name(&req.name)?;
        bounds::map("parameters", &req.parameters)?;
        bounds::map("secrets", &req.secrets)?;
        if req.volume_capabilities.is_empty() {
            return Err(invalid("volume_capabilities", "at least one is required"));
        }
        for (i, c) in req.volume_capabilities.iter().enumerate() {
            capability::check(&format!("volume_capabilities[{i}]"), Some(c))?;
        }
        if req.volume_content_source.is_some() {
            return Err(invalid(
                "volume_content_source",
                "cloning and snapshots are not supported",
            ));
        }
        let size = requested_size(req.capacity_range.as_ref())?;
        let p = &req.parameters;
        let get = |k: &str| p.get(k).map(String::as_str).unwrap_or_default();
        let allowed: &[&str] = match get("fs") {
            "nfs" => &["fs", "server", "share", "vers", "onDelete"],
            "cephfs" => &["fs", "clusterID", "fsName", "subvolumeGroup"],
            "" => return Err(invalid("parameters.fs", "is required (nfs or cephfs)")),
            other => {
                return Err(invalid(
                    "parameters.fs",
                    format!("{} is not supported (nfs, cephfs)", echo(other)),
                ))
            }
        };
        if let Some(k) = p
            .keys()
            .find(|k| !allowed.contains(&k.as_str()) && !k.starts_with(KUBERNETES_PREFIX))
        {
            return Err(invalid(
                "parameters",
                format!(
                    "unknown key {} for fs {} (known: {})",
                    echo(k),
                    get("fs"),
                    allowed.join(", ")
                ),
            ));
        }
        let name = backend_name(&req.name);
        if get("fs") == "nfs" {
            self.create_nfs(&name, p).await
        } else {
            self.create_cephfs(&name, size, req.capacity_range.as_ref(), p, &req.secrets)
                .await
        }
    }

    async fn create_nfs(&self, dir: &str, p: &HashMap<String, String>) -> Result<Volume, Status> {
        let get = |k: &str| p.get(k).cloned().unwrap_or_default();
        let on_delete = match p.get("onDelete") {
            None => OnDelete::default(),
            Some(v) => OnDelete::parse(v).ok_or_else(|| {
                invalid(
                    "parameters.onDelete",
                    format!("{} is not retain, delete or archive", echo(v)),
                )
            })?,
        };
        let share = NfsShare {
            server: get("server"),
            port: None,
            export: get("share"),
        };
        required("parameters.server", &share.server)?;
        required("parameters.share", &share.export)?;
        if share.server.contains('#') || share.export.contains('#') {
            return Err(invalid(
                "parameters",
                "server and share must not contain '#'",
            ));
        }
        let volume_id = fitting_id(
            &VolumeId::Nfs {
                on_delete,
                share: share.clone(),
                dir: dir.to_string(),
            },
            "server and share",
        )?;
        share.validate().map_err(|e| invalid("parameters", e))?;
        let host = if share.server.contains(':') {
            format!("[{}]", share.server)
        } else {
            share.server.clone()
        };
        let export = share.export.trim_end_matches('/');
        let mut source = format!("nfs://{host}{export}/{dir}");
        if let Some(v) = p.get("vers") {
            source.push_str(&format!("?vers={v}"));
        }
        // The node side will hold the source to the same rules: check it now, not at mount.
        cnfs_protocols::volume_url::parse("check", &source)
            .ok()
            .and_then(|u| cnfs_protocols::spec::VolumeSpec::from_wire_unresolved(&u.wire).ok())
            .ok_or_else(|| {
                invalid(
                    "parameters",
                    format!("{} is not a valid CNFS volume", echo(&source)),
                )
            })?;
        share.create_dir(dir, self.timeout).await.map_err(status)?;
        Ok(Volume {
            capacity_bytes: 0,
            volume_id,
            volume_context: HashMap::from([("source".to_string(), source)]),
            ..Default::default()
        })
    }

    async fn create_cephfs(
        &self,
        name: &str,
        size: Option<u64>,
        range: Option<&CapacityRange>,
        p: &HashMap<String, String>,
        secrets: &HashMap<String, String>,
    ) -> Result<Volume, Status> {
        let cluster_id = p
            .get("clusterID")
            .ok_or_else(|| invalid("parameters.clusterID", "is required"))?;
        let fs = p
            .get("fsName")
            .ok_or_else(|| invalid("parameters.fsName", "is required"))?;
        let group = p
            .get("subvolumeGroup")
            .map(String::as_str)
            .unwrap_or(DEFAULT_GROUP);
        if [cluster_id.as_str(), fs, group]
            .iter()
            .any(|s| s.contains('#'))
        {
            return Err(invalid("parameters", "names must not contain '#'"));
        }
        let id = VolumeId::CephFs {
            cluster: cluster_id.clone(),
            fs: fs.to_string(),
            group: group.to_string(),
            subvolume: name.to_string(),
        };
        let volume_id = fitting_id(&id, "clusterID, fsName and subvolumeGroup")?;
        let cluster = self.cluster(cluster_id)?;
        let creds = Self::admin(secrets)?;
        let sub = Subvolumes::new(&cluster, &creds, fs, group)
            .map_err(status)?
            .with_timeout(self.timeout);
        // A retried CreateVolume after an expansion finds a bigger quota: still the volume
        // asked for if it fits the requested range.
        let info = match sub.info(name).await.map_err(status)? {
            Some(existing) if fits(existing.bytes_quota, range) => existing,
            _ => sub.create(name, size).await.map_err(status)?,
        };
        let mut source = format!(
            "cephfs://{}{}?fs={fs}",
            cluster.monitors.join(","),
            info.path
        );
        if let Some(fsid) = &cluster.fsid {
            source.push_str(&format!("&fsid={fsid}"));
        }
        Ok(Volume {
            capacity_bytes: info.bytes_quota.map(|b| b as i64).unwrap_or(0),
            volume_id,
            volume_context: HashMap::from([("source".to_string(), source)]),
            ..Default::default()
        })
    }

    async fn delete(&self, req: &DeleteVolumeRequest) -> Result<(), Status> {
        bounds::required_string("volume_id", &req.volume_id)?;
        bounds::map("secrets", &req.secrets)?;
        // An id this driver never made names nothing to delete (CSI: success).
        let Some(id) = VolumeId::parse(&req.volume_id) else {
            warn!(self.log, "DeleteVolume of an id CNFS did not make; nothing to do";
                "volume_id" => &req.volume_id);
            return Ok(());
        };
        match id {
            VolumeId::Nfs {
                on_delete,
                share,
                dir,
            } => share
                .delete_dir(&dir, on_delete, self.timeout)
                .await
                .map_err(status),
            VolumeId::CephFs {
                cluster,
                fs,
                group,
                subvolume,
            } => {
                let c = self.cluster(&cluster)?;
                let creds = Self::admin(&req.secrets)?;
                Subvolumes::new(&c, &creds, &fs, &group)
                    .map_err(status)?
                    .with_timeout(self.timeout)
                    .delete(&subvolume)
                    .await
                    .map_err(status)
            }
        }
    }

    /// Whether the volume exists (`NotFound` otherwise).
    async fn exists(
        &self,
        volume_id: &str,
        secrets: &HashMap<String, String>,
    ) -> Result<(), Status> {
        let missing = || Status::not_found(format!("volume {} does not exist", echo(volume_id)));
        let id = VolumeId::parse(volume_id).ok_or_else(missing)?;
        let found = match id {
            VolumeId::Nfs { share, dir, .. } => {
                share.dir_exists(&dir, self.timeout).await.map_err(status)?
            }
            VolumeId::CephFs {
                cluster,
                fs,
                group,
                subvolume,
            } => {
                let c = self.cluster(&cluster)?;
                let creds = Self::admin(secrets)?;
                Subvolumes::new(&c, &creds, &fs, &group)
                    .map_err(status)?
                    .with_timeout(self.timeout)
                    .info(&subvolume)
                    .await
                    .map_err(status)?
                    .is_some()
            }
        };
        if found {
            Ok(())
        } else {
            Err(missing())
        }
    }

    async fn validate(
        &self,
        req: &ValidateVolumeCapabilitiesRequest,
    ) -> Result<ValidateVolumeCapabilitiesResponse, Status> {
        bounds::required_string("volume_id", &req.volume_id)?;
        bounds::map("volume_context", &req.volume_context)?;
        bounds::map("parameters", &req.parameters)?;
        bounds::map("secrets", &req.secrets)?;
        if req.volume_capabilities.is_empty() {
            return Err(invalid("volume_capabilities", "at least one is required"));
        }
        self.exists(&req.volume_id, &req.secrets).await?;
        for (i, c) in req.volume_capabilities.iter().enumerate() {
            if let Err(e) = capability::check(&format!("volume_capabilities[{i}]"), Some(c)) {
                return Ok(ValidateVolumeCapabilitiesResponse {
                    confirmed: None,
                    message: e.message().to_string(),
                });
            }
        }
        Ok(ValidateVolumeCapabilitiesResponse {
            confirmed: Some(Confirmed {
                volume_context: req.volume_context.clone(),
                volume_capabilities: req.volume_capabilities.clone(),
                parameters: req.parameters.clone(),
            }),
            message: String::new(),
        })
    }

    async fn expand(
        &self,
        req: &ControllerExpandVolumeRequest,
    ) -> Result<ControllerExpandVolumeResponse, Status> {
        bounds::required_string("volume_id", &req.volume_id)?;
        bounds::map("secrets", &req.secrets)?;
        let size = requested_size(req.capacity_range.as_ref())?
            .ok_or_else(|| invalid("capacity_range", "is required"))?;
        let id = VolumeId::parse(&req.volume_id).ok_or_else(|| {
            Status::not_found(format!("volume {} does not exist", echo(&req.volume_id)))
        })?;
        match id {
            VolumeId::Nfs { .. } => Err(Status::failed_precondition(
                "nfs volumes have no quota to grow (use a StorageClass without allowVolumeExpansion)",
            )),
            VolumeId::CephFs {
                cluster,
                fs,
                group,
                subvolume,
            } => {
                let c = self.cluster(&cluster)?;
                let creds = Self::admin(&req.secrets)?;
                let sub = Subvolumes::new(&c, &creds, &fs, &group)
                    .map_err(status)?
                    .with_timeout(self.timeout);
                let current = sub.info(&subvolume).await.map_err(status)?.ok_or_else(|| {
                    Status::not_found(format!("volume {} does not exist", echo(&req.volume_id)))
                })?;
                // Never shrink, and never put a quota on a volume that has none (CSI: a
                // volume already as big as asked is a success).
                let quota = match current.bytes_quota {
                    // Unlimited is at least as big as asked.
                    None => size,
                    Some(q) if q >= size => q,
                    Some(_) => sub.resize(&subvolume, size).await.map_err(status)?,
                };
                Ok(ControllerExpandVolumeResponse {
                    capacity_bytes: quota as i64,
                    node_expansion_required: false,
                })
            }
        }
    }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        req: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let start = Instant::now();
        let req = req.into_inner();
        // Only a name within the limits is locked on.
        let r = match check_name(&req.name) {
            Ok(()) => {
                let lock = self.lock_for(&req.name);
                let _held = lock.lock().await;
                self.create(&req).await
            }
            Err(e) => Err(e),
        };
        let r = r.map(|v| CreateVolumeResponse { volume: Some(v) });
        logged(&self.log, "CreateVolume", &req.name, start, r)
    }

    async fn delete_volume(
        &self,
        req: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let start = Instant::now();
        let req = req.into_inner();
        let r = match bounds::required_string("volume_id", &req.volume_id) {
            Ok(()) => {
                let lock = self.lock_for(&req.volume_id);
                let _held = lock.lock().await;
                self.delete(&req).await
            }
            Err(e) => Err(e),
        };
        let r = r.map(|_| DeleteVolumeResponse {});
        logged(&self.log, "DeleteVolume", &req.volume_id, start, r)
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let start = Instant::now();
        let req = req.into_inner();
        let r = self.validate(&req).await;
        logged(
            &self.log,
            "ValidateVolumeCapabilities",
            &req.volume_id,
            start,
            r,
        )
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities: vec![
                capability_of(rpc::Type::CreateDeleteVolume),
                capability_of(rpc::Type::ExpandVolume),
            ],
        }))
    }

    async fn controller_expand_volume(
        &self,
        req: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let start = Instant::now();
        let req = req.into_inner();
        let r = match bounds::required_string("volume_id", &req.volume_id) {
            Ok(()) => {
                let lock = self.lock_for(&req.volume_id);
                let _held = lock.lock().await;
                self.expand(&req).await
            }
            Err(e) => Err(e),
        };
        logged(
            &self.log,
            "ControllerExpandVolume",
            &req.volume_id,
            start,
            r,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_ids_round_trip_and_foreign_ids_are_none() {
        let ids = [
            VolumeId::Nfs {
                on_delete: OnDelete::Archive,
                share: NfsShare {
                    server: "fd00::5".into(),
                    port: None,
                    export: "/exports/k8s".into(),
                },
                dir: "pvc-1".into(),
            },
            VolumeId::CephFs {
                cluster: "prod".into(),
                fs: "cephfs".into(),
                group: "csi".into(),
                subvolume: "pvc-2".into(),
            },
        ];
        for id in ids {
            assert_eq!(VolumeId::parse(&id.encode()), Some(id));
        }
        for foreign in ["", "reallyfakevolumeid", "nfs#bogus#h#/e#d", "cephfs#a#b"] {
            assert_eq!(VolumeId::parse(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn names_follow_the_csi_limit_and_banned_characters() {
        assert!(check_name(&"n".repeat(128)).is_ok());
        // The spec allows common white space in a name, and any other Unicode.
        assert!(check_name("my volume\tof\r\nlines ✓").is_ok());
        for bad in ["a\u{0}b", "\u{1b}[31m", "a\u{7f}", "a\u{85}", "a\u{b}"] {
            let e = check_name(bad).unwrap_err();
            assert!(
                e.message().starts_with("name: must not contain"),
                "{bad:?}: {e:?}"
            );
        }
        let e = check_name(&"n".repeat(129)).unwrap_err();
        assert!(e.message().starts_with("name: is 129 bytes"), "{e:?}");
    }

    #[test]
    fn a_volume_id_over_128_bytes_is_refused_before_anything_is_made() {
        let id = |dir: usize| VolumeId::CephFs {
            cluster: "c".into(),
            fs: "f".into(),
            group: "g".into(),
            subvolume: "s".repeat(dir),
        };
        // "cephfs#c#f#g#" is 13 bytes.
        assert_eq!(fitting_id(&id(115), "x").unwrap().len(), 128);
        let e = fitting_id(&id(116), "clusterID").unwrap_err();
        assert!(
            e.message()
                .starts_with("parameters: the volume id would be 129 bytes")
                && e.message().contains("shorten clusterID"),
            "{e:?}"
        );
    }

    #[test]
    fn backend_names_are_kept_when_safe_and_hashed_otherwise() {
        assert_eq!(backend_name("pvc-0a1b"), "pvc-0a1b");
        let h = backend_name("my volume/with odd chars");
        assert!(h.starts_with("vol-") && h.len() == 28, "{h}");
        assert_eq!(h, backend_name("my volume/with odd chars"));
        assert_ne!(h, backend_name("another"));
    }

    #[test]
    fn an_existing_quota_fits_a_range_it_satisfies() {
        let r = |req, lim| CapacityRange {
            required_bytes: req,
            limit_bytes: lim,
        };
        assert!(fits(Some(16), Some(&r(8, 0))));
        assert!(fits(Some(8), Some(&r(8, 8))));
        assert!(!fits(Some(4), Some(&r(8, 0))));
        assert!(!fits(Some(16), Some(&r(8, 10))));
        assert!(fits(None, None) && !fits(None, Some(&r(8, 0))));
    }

    #[test]
    fn capacity_ranges() {
        let r = |req, lim| CapacityRange {
            required_bytes: req,
            limit_bytes: lim,
        };
        assert_eq!(requested_size(None).unwrap(), None);
        assert_eq!(requested_size(Some(&r(10, 0))).unwrap(), Some(10));
        assert_eq!(requested_size(Some(&r(0, 20))).unwrap(), Some(20));
        assert_eq!(
            requested_size(Some(&r(30, 20))).unwrap_err().code(),
            tonic::Code::OutOfRange
        );
        assert_eq!(
            requested_size(Some(&r(-1, 0))).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
