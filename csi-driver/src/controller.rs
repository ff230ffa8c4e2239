//! The Controller service: provisions volumes on the backends in user space (no mount, no
//! privilege) and describes them to the node side by a volume URL in the volume context.
//!
//! What a volume is on each file system (an NFS or SMB directory, a CephFS subvolume), its
//! StorageClass parameters, secrets and volume id are the backend's (`backend/`, one
//! [`Provisioner`] per file system, one registry). This service keeps what all of them
//! share: request bounds and names, one lock per volume, capacity ranges, the CSI limit on
//! volume ids, and the CSI status codes.
//!
//! `DeleteVolume` gets nothing but the volume id (and secrets), so the id carries what it
//! needs: `<fs>#<fields>`, where `<fs>` picks the provisioner and the fields are its own.
//! An encrypted volume's id starts `<fs>+<mode>#` (`nfs+luks2#`, `nfs+gocryptfs#`; see
//! [`crate::encryption`]), so that `ControllerExpandVolume` knows from the id whether it grows
//! a container (luks2: the new size is recorded for the guest's next mount) or its class
//! decides, as for a plain volume (gocryptfs).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cnfs_protocols::keyed_lock::KeyedLocks;
use cnfs_protocols::spec::EncryptionMode;
use sha2::{Digest, Sha256};
use slog::{info, warn, Logger};
use tonic::{Request, Response, Status};

use crate::backend::{self, BackendError, Capacity, Context, CreateRequest, Plan, Provisioner};
use crate::bounds::{self, echo, MAX_STRING};
use crate::capability::{self, invalid, required};
use crate::csi::controller_server::Controller;
use crate::csi::controller_service_capability::{rpc, Rpc, Type as CapType};
use crate::csi::validate_volume_capabilities_response::Confirmed;
use crate::csi::*;
use crate::encryption;
use crate::server::logged;

pub use crate::backend::ControllerConfig;

const KUBERNETES_PREFIX: &str = "csi.storage.k8s.io/";

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

/// The id of a volume about to be made (`<head>#<fields>`, the head being the file system,
/// `+<mode>` when encrypted), refused before anything is made if it would break CSI's string
/// limit (the limits bind what a plugin sends as well); the error names the parameters that
/// make it long.
fn fitting_id(head: &str, plan: &Plan) -> Result<String, Status> {
    let encoded = format!("{head}#{}", plan.id_fields);
    if encoded.len() > MAX_STRING {
        return Err(invalid(
            "parameters",
            format!(
                "the volume id would be {} bytes, longer than the CSI limit of {MAX_STRING} \
                 bytes: shorten {}",
                encoded.len(),
                plan.id_from
            ),
        ));
    }
    Ok(encoded)
}

/// The guest holds an encrypted volume's source to the same rules (luks2 refuses NFSv3,
/// nolock...; gocryptfs only FUSE): refused now, before anything is made.
fn check_encrypted_source(source: &str) -> Result<(), Status> {
    cnfs_protocols::volume_url::parse("check", source)
        .and_then(|u| {
            cnfs_protocols::spec::VolumeSpec::from_wire_unresolved(&u.wire)
                .map_err(|e| e.to_string())
        })
        .map(|_| ())
        .map_err(|e| {
            invalid(
                "parameters",
                format!("an encrypted volume {} is refused: {e}", echo(source)),
            )
        })
}

pub struct ControllerService {
    cfg: ControllerConfig,
    timeout: Duration,
    log: Logger,
    /// One lock per volume name or id: operations on one volume never interleave.
    locks: KeyedLocks<String>,
}

fn status(e: BackendError) -> Status {
    match e {
        BackendError::NotFound(m) => Status::not_found(m),
        BackendError::Invalid(m) => Status::invalid_argument(m),
        BackendError::PermissionDenied(m) => Status::permission_denied(m),
        BackendError::Unavailable(m) => Status::unavailable(m),
        BackendError::AlreadyExists(m) => Status::already_exists(m),
        BackendError::FailedPrecondition(m) => Status::failed_precondition(m),
        BackendError::Failed(m) => Status::internal(m),
    }
}

/// A CSI capacity range, checked: not negative, `required_bytes` within `limit_bytes`.
fn capacity(range: Option<&CapacityRange>) -> Result<Capacity, Status> {
    let Some(r) = range else {
        return Ok(Capacity::default());
    };
    if r.required_bytes < 0 || r.limit_bytes < 0 {
        return Err(invalid("capacity_range", "must not be negative"));
    }
    if r.limit_bytes > 0 && r.required_bytes > r.limit_bytes {
        return Err(Status::out_of_range(
            "capacity_range: required_bytes is larger than limit_bytes",
        ));
    }
    Ok(Capacity {
        required: r.required_bytes as u64,
        limit: r.limit_bytes as u64,
    })
}

fn capability_of(t: rpc::Type) -> ControllerServiceCapability {
    ControllerServiceCapability {
        r#type: Some(CapType::Rpc(Rpc { r#type: t as i32 })),
    }
}

/// A volume id this driver made: its provisioner, the provisioner's own fields, and whether
/// the volume is encrypted.
struct MadeBy<'a> {
    provisioner: &'static dyn Provisioner,
    fields: &'a str,
    encryption: Option<EncryptionMode>,
}

/// The parts of volume `id` (`<fs>[+<mode>]#<fields>`); `None` for an id no provisioner made.
fn parse_id(id: &str) -> Option<MadeBy<'_>> {
    let (head, fields) = id.split_once('#')?;
    let (fs, encryption) = encryption::split_id_head(head)?;
    let provisioner = backend::provisioner(fs)?;
    provisioner.owns(fields).then_some(MadeBy {
        provisioner,
        fields,
        encryption,
    })
}

/// The provisioner that made volume `id`, with the id's own fields; `NotFound` otherwise.
fn made_by(id: &str) -> Result<MadeBy<'_>, Status> {
    parse_id(id).ok_or_else(|| Status::not_found(format!("volume {} does not exist", echo(id))))
}

impl ControllerService {
    pub fn new(cfg: ControllerConfig, timeout: Duration, log: Logger) -> Self {
        ControllerService {
            cfg,
            timeout,
            log,
            locks: KeyedLocks::new(),
        }
    }

    fn context(&self) -> Context<'_> {
        Context {
            config: &self.cfg,
            timeout: self.timeout,
        }
    }

    async fn create(&self, req: &CreateVolumeRequest) -> Result<Volume, Status> {
        check_name(&req.name)?;
        bounds::map("parameters", &req.parameters)?;
        bounds::map("secrets", &req.secrets)?;
        if req.volume_capabilities.is_empty() {
            return Err(invalid("volume_capabilities", "at least one is required"));
        }
        let encrypted = encryption::from_parameters(&req.parameters)?;
        for (i, c) in req.volume_capabilities.iter().enumerate() {
            let field = format!("volume_capabilities[{i}]");
            capability::check(&field, Some(c))?;
            if let Some(mode) = encrypted {
                capability::refuse_shared(&field, c, mode)?;
            }
        }
        if req.volume_content_source.is_some() {
            return Err(invalid(
                "volume_content_source",
                "cloning and snapshots are not supported",
            ));
        }
        let capacity = capacity(req.capacity_range.as_ref())?;
        let p = &req.parameters;
        let provisioner = match p.get("fs").map(String::as_str).unwrap_or_default() {
            "" => {
                return Err(invalid(
                    "parameters.fs",
                    format!("is required ({})", backend::names()),
                ))
            }
            fs => backend::provisioner(fs).ok_or_else(|| {
                invalid(
                    "parameters.fs",
                    format!("{} is not supported ({})", echo(fs), backend::names()),
                )
            })?,
        };
        let allowed = provisioner.parameters();
        if let Some(k) = p.keys().find(|k| {
            !allowed.contains(&k.as_str())
                && k.as_str() != encryption::PARAMETER
                && !k.starts_with(KUBERNETES_PREFIX)
        }) {
            return Err(invalid(
                "parameters",
                format!(
                    "unknown key {} for fs {} (known: {}, {})",
                    echo(k),
                    provisioner.name(),
                    allowed.join(", "),
                    encryption::PARAMETER
                ),
            ));
        }
        // luks2: the container's size, fixed now; a quota (CephFS) holds it with headroom.
        // gocryptfs has no size: its capacity is the class's, as for a plain volume.
        let size = match encrypted {
            Some(mode) if !encryption::PROVISIONED_ON.contains(&provisioner.name()) => {
                return Err(invalid(
                    "parameters.encryption",
                    format!(
                        "{mode} volumes are provisioned on fs {} only so far, not {}",
                        encryption::PROVISIONED_ON.join(", "),
                        provisioner.name()
                    ),
                ))
            }
            Some(mode) if mode.has_size() => Some(encryption::container_size(capacity)?),
            Some(_) | None => None,
        };
        // The provisioner sees its own parameters only.
        let own: HashMap<String, String>;
        let p = if encrypted.is_some() {
            own = p
                .iter()
                .filter(|(k, _)| k.as_str() != encryption::PARAMETER)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            &own
        } else {
            p
        };
        let name = backend_name(&req.name);
        let creq = CreateRequest {
            name: &name,
            parameters: p,
            secrets: &req.secrets,
            capacity: size.map_or(capacity, encryption::backend_capacity),
        };
        let ctx = self.context();
        let plan = provisioner.plan(&ctx, &creq).map_err(status)?;
        let volume_id = fitting_id(&encryption::id_head(provisioner.name(), encrypted), &plan)?;
        let with_encryption = |source: &str| match encrypted {
            Some(mode) if encryption::grows_with_quota(provisioner.name(), mode) => {
                encryption::add_grow_to_quota(&encryption::add_to_source(source, mode, size))
            }
            Some(mode) => encryption::add_to_source(source, mode, size),
            None => source.to_string(),
        };
        if let (Some(_), Some(planned)) = (encrypted, &plan.source) {
            check_encrypted_source(&with_encryption(planned))?;
        }
        let created = provisioner.create(&ctx, &creq).await.map_err(status)?;
        Ok(Volume {
            capacity_bytes: size.unwrap_or(created.capacity_bytes) as i64,
            volume_id,
            volume_context: HashMap::from([(
                crate::node::SOURCE.to_string(),
                with_encryption(&created.source),
            )]),
            ..Default::default()
        })
    }

    async fn delete(&self, req: &DeleteVolumeRequest) -> Result<(), Status> {
        bounds::required_string("volume_id", &req.volume_id)?;
        bounds::map("secrets", &req.secrets)?;
        // An id this driver never made names nothing to delete (CSI: success).
        let Some(v) = parse_id(&req.volume_id) else {
            warn!(self.log, "DeleteVolume of an id CNFS did not make; nothing to do";
                "volume_id" => &req.volume_id);
            return Ok(());
        };
        v.provisioner
            .delete(&self.context(), v.fields, &req.secrets)
            .await
            .map_err(status)
    }

    /// Whether the volume exists (`NotFound` otherwise).
    async fn exists(
        &self,
        volume_id: &str,
        secrets: &HashMap<String, String>,
    ) -> Result<(), Status> {
        let v = made_by(volume_id)?;
        if v.provisioner
            .exists(&self.context(), v.fields, secrets)
            .await
            .map_err(status)?
        {
            Ok(())
        } else {
            Err(Status::not_found(format!(
                "volume {} does not exist",
                echo(volume_id)
            )))
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
        // Encrypted as its id says, or as the context or parameters the CO passes say.
        let from_source = || {
            req.volume_context
                .get(crate::node::SOURCE)
                .and_then(|s| encryption::source_mode(s))
        };
        let encrypted = match made_by(&req.volume_id)?.encryption.or_else(from_source) {
            Some(m) => Some(m),
            None => encryption::from_parameters(&req.parameters)?,
        };
        for (i, c) in req.volume_capabilities.iter().enumerate() {
            let field = format!("volume_capabilities[{i}]");
            // CSI: a capability the volume cannot honour is answered unconfirmed, with why.
            let checked = capability::check(&field, Some(c)).and_then(|_| match encrypted {
                Some(mode) => capability::refuse_shared(&field, c, mode),
                None => Ok(()),
            });
            if let Err(e) = checked {
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
        let range = capacity(req.capacity_range.as_ref())?;
        let size = range
            .size()
            .ok_or_else(|| invalid("capacity_range", "is required"))?;
        let v = made_by(&req.volume_id)?;
        // A gocryptfs volume has no size of its own: its class decides, as for a plain one.
        if v.encryption.is_some_and(|m| m.has_size()) {
            return self.expand_container(req, &v, range).await;
        }
        let quota = v
            .provisioner
            .expand(&self.context(), v.fields, &req.secrets, size)
            .await
            .map_err(status)?
            .ok_or_else(|| {
                Status::not_found(format!("volume {} does not exist", echo(&req.volume_id)))
            })?;
        Ok(ControllerExpandVolumeResponse {
            capacity_bytes: quota as i64,
            node_expansion_required: false,
        })
    }

    /// A luks2 volume: its container's new size (sized as CreateVolume sizes one) recorded
    /// where the guest reads it; never smaller than what is recorded already.
    async fn expand_container(
        &self,
        req: &ControllerExpandVolumeRequest,
        v: &MadeBy<'_>,
        range: Capacity,
    ) -> Result<ControllerExpandVolumeResponse, Status> {
        let size = encryption::container_size(range)?;
        let recorded = v
            .provisioner
            .expand_luks2(&self.context(), v.fields, &req.secrets, size)
            .await
            .map_err(status)?
            .ok_or_else(|| {
                Status::not_found(format!("volume {} does not exist", echo(&req.volume_id)))
            })?;
        // Only when nothing was written: a new record is `size`, within the limit.
        if range.limit > 0 && recorded > range.limit {
            return Err(Status::out_of_range(format!(
                "capacity_range: the volume is {recorded} bytes already, above limit_bytes ({}); \
                 volumes never shrink",
                range.limit
            )));
        }
        // No node step: the guest grows the container, the mapping and ext4 when it mounts the
        // volume next (a pod started after this), and a guest holding it now keeps its size
        // until then. The node plugin has nothing to do, so the CO finishes the resize here.
        info!(self.log, "luks2 volume: size recorded; the guest grows it at its next mount";
            "volume" => echo(&req.volume_id), "size" => recorded);
        Ok(ControllerExpandVolumeResponse {
            // A container's length comes from the server: never wrapped into a negative.
            capacity_bytes: i64::try_from(recorded).unwrap_or(i64::MAX),
            node_expansion_required: false,
        })
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
                let _held = self.locks.lock(req.name.as_str()).await;
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
                let _held = self.locks.lock(req.volume_id.as_str()).await;
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
                let _held = self.locks.lock(req.volume_id.as_str()).await;
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
        let plan = |dir: usize| Plan {
            id_fields: format!("c#f#g#{}", "s".repeat(dir)),
            id_from: "clusterID",
            source: None,
        };
        // "cephfs#c#f#g#" is 13 bytes.
        assert_eq!(fitting_id("cephfs", &plan(115)).unwrap().len(), 128);
        let e = fitting_id("cephfs", &plan(116)).unwrap_err();
        assert!(
            e.message()
                .starts_with("parameters: the volume id would be 129 bytes")
                && e.message().contains("shorten clusterID"),
            "{e:?}"
        );
    }

    #[test]
    fn ids_of_every_file_system_reach_their_provisioner_and_foreign_ids_none() {
        for id in [
            "nfs#archive#fd00::5#/exports/k8s#pvc-1",
            "cephfs#prod#cephfs#csi#pvc-2",
            "smb#delete#files.example.com#data#k8s/pvc-3",
        ] {
            let v = made_by(id).expect(id);
            assert_eq!(format!("{}#{}", v.provisioner.name(), v.fields), id);
            assert_eq!(v.encryption, None);
        }
        for foreign in [
            "",
            "reallyfakevolumeid",
            "nfs#bogus#h#/e#d",
            "cephfs#a#b",
            "nfs+plain#delete#h#/e#d",
            "nfs+#delete#h#/e#d",
        ] {
            let e = made_by(foreign).err().expect(foreign);
            assert_eq!(e.code(), tonic::Code::NotFound, "{foreign}");
        }
    }

    #[test]
    fn an_encrypted_volumes_id_reaches_its_provisioner_and_says_luks2() {
        let v = made_by("nfs+luks2#delete#10.0.0.5#/exports/k8s#pvc-1").expect("ours");
        assert_eq!(v.provisioner.name(), "nfs");
        assert_eq!(v.fields, "delete#10.0.0.5#/exports/k8s#pvc-1");
        assert_eq!(v.encryption, Some(EncryptionMode::Luks2));
        // The marker counts towards CSI's 128 bytes.
        let plan = Plan {
            id_fields: format!("delete#h#/e#{}", "d".repeat(107)),
            id_from: "server and share",
            source: None,
        };
        assert_eq!(fitting_id("nfs", &plan).unwrap().len(), 123);
        let e = fitting_id(
            &encryption::id_head("nfs", Some(EncryptionMode::Luks2)),
            &plan,
        )
        .unwrap_err();
        assert!(
            e.message()
                .starts_with("parameters: the volume id would be 129 bytes"),
            "{e:?}"
        );
    }

    fn service() -> ControllerService {
        ControllerService::new(
            ControllerConfig::default(),
            Duration::from_secs(1),
            Logger::root(slog::Discard, slog::o!()),
        )
    }

    fn mount_cap(mode: i32) -> VolumeCapability {
        use crate::csi::volume_capability::{AccessMode, AccessType, MountVolume};
        VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume::default())),
            access_mode: Some(AccessMode { mode }),
        }
    }

    /// An encrypted NFS CreateVolume on a loopback server that must never be contacted:
    /// every refusal below comes before anything is made.
    fn encrypted(params: &[(&str, &str)], mode: i32, required: i64) -> CreateVolumeRequest {
        let mut parameters: HashMap<String, String> = [
            ("fs", "nfs"),
            ("server", "127.0.0.1"),
            ("share", "/exports/k8s"),
            ("vers", "4.1"),
            ("encryption", "luks2"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in params {
            parameters.insert(k.to_string(), v.to_string());
        }
        CreateVolumeRequest {
            name: "pvc-1".into(),
            capacity_range: Some(CapacityRange {
                required_bytes: required,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![mount_cap(mode)],
            parameters,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn encrypted_create_volume_refusals_name_the_parameter_mode_or_capacity() {
        use crate::csi::volume_capability::access_mode::Mode;
        const RWO: Mode = Mode::SingleNodeWriter;
        let c = service();
        for (req, code, start) in [
            (
                encrypted(&[("encryption", "plain")], RWO as i32, 1 << 30),
                tonic::Code::InvalidArgument,
                "parameters.encryption: \"plain\" is not supported (luks2 or gocryptfs)",
            ),
            (
                encrypted(&[], Mode::MultiNodeMultiWriter as i32, 1 << 30),
                tonic::Code::InvalidArgument,
                "volume_capabilities[0].access_mode.mode: MULTI_NODE_MULTI_WRITER is refused \
                 for encryption=luks2",
            ),
            (
                encrypted(&[], Mode::MultiNodeReaderOnly as i32, 1 << 30),
                tonic::Code::InvalidArgument,
                "volume_capabilities[0].access_mode.mode: MULTI_NODE_READER_ONLY is refused",
            ),
            (
                encrypted(&[], RWO as i32, (64 << 20) - 4096 - 1),
                tonic::Code::OutOfRange,
                "capacity_range: 67104768 bytes is below the 67108864 bytes (64 MiB)",
            ),
            (
                encrypted(&[], RWO as i32, 0),
                tonic::Code::InvalidArgument,
                "capacity_range.required_bytes: is required for encryption=luks2",
            ),
            (
                encrypted(&[("vers", "3")], RWO as i32, 1 << 30),
                tonic::Code::InvalidArgument,
                "parameters: an encrypted volume \"nfs://127.0.0.1/exports/k8s/pvc-1?vers=3\
                 &encryption=luks2&size=1073741824\" is refused: volume.nfs.version: luks2 \
                 needs server-side locks",
            ),
        ] {
            let e = c.create(&req).await.unwrap_err();
            assert_eq!(e.code(), code, "{e:?}");
            assert!(
                e.message().starts_with(start),
                "{:?}\n{start:?}",
                e.message()
            );
        }
    }

    #[test]
    fn a_gocryptfs_volumes_id_reaches_its_provisioner_and_says_gocryptfs() {
        let v = made_by("nfs+gocryptfs#delete#10.0.0.5#/exports/k8s#pvc-1").expect("ours");
        assert_eq!(v.provisioner.name(), "nfs");
        assert_eq!(v.fields, "delete#10.0.0.5#/exports/k8s#pvc-1");
        assert_eq!(v.encryption, Some(EncryptionMode::Gocryptfs));
        assert_eq!(
            encryption::id_head("nfs", Some(EncryptionMode::Gocryptfs)),
            "nfs+gocryptfs"
        );
    }

    #[tokio::test]
    async fn gocryptfs_create_volume_takes_multi_node_modes_and_no_size_from_the_capacity() {
        use crate::csi::volume_capability::access_mode::Mode;
        let c = service();
        // A share long enough that the id overflows CSI's 128 bytes (136 bytes with its
        // "nfs+gocryptfs" head): refused after the access mode and the sizing and before
        // anything is made, so an error about the id means the request got past both (luks2 would refuse ReadWriteMany, and a 1-byte
        // capacity, before that).
        let share = format!("/exports/{}", "d".repeat(90));
        for mode in [
            Mode::MultiNodeMultiWriter,
            Mode::MultiNodeReaderOnly,
            Mode::MultiNodeSingleWriter,
            Mode::SingleNodeWriter,
        ] {
            for required in [0, 1, 1 << 30] {
                let req = encrypted(
                    &[
                        ("encryption", "gocryptfs"),
                        ("share", &share),
                        ("vers", "3"),
                    ],
                    mode as i32,
                    required,
                );
                let e = c.create(&req).await.unwrap_err();
                assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
                assert!(
                    e.message()
                        .starts_with("parameters: the volume id would be 136 bytes"),
                    "{mode:?} {required}: {e:?}"
                );
            }
        }
        // The same request with luks2 stops at the access mode.
        let req = encrypted(
            &[("share", &share)],
            Mode::MultiNodeMultiWriter as i32,
            1 << 30,
        );
        let e = c.create(&req).await.unwrap_err();
        assert!(
            e.message()
                .starts_with("volume_capabilities[0].access_mode.mode: MULTI_NODE_MULTI_WRITER"),
            "{e:?}"
        );
    }

    /// An encrypted SMB CreateVolume on a loopback server that is never contacted: without
    /// the provisioner secret, the last check before smbclient runs is the account's.
    fn encrypted_smb(mode: &str, access: i32, required: i64) -> CreateVolumeRequest {
        encrypted(
            &[
                ("encryption", mode),
                ("fs", "smb"),
                ("share", "data"),
                ("subDir", "k8s"),
                ("vers", "3.1.1"),
            ],
            access,
            required,
        )
    }

    #[tokio::test]
    async fn smb_classes_take_both_encryption_modes_with_their_access_modes_and_sizes() {
        use crate::csi::volume_capability::access_mode::Mode;
        use tonic::Code::{InvalidArgument, OutOfRange};
        let c = service();
        // Past the file system, the mode's access and size rules and the source check (the
        // guest's rules for an encrypted SMB source): only the missing account stops them.
        const NO_ACCOUNT: &str = "secrets.username: is required";
        for (req, code, start) in [
            (
                encrypted_smb("luks2", Mode::SingleNodeWriter as i32, 1 << 30),
                InvalidArgument,
                NO_ACCOUNT,
            ),
            (
                encrypted_smb("luks2", Mode::SingleNodeMultiWriter as i32, 64 << 20),
                InvalidArgument,
                NO_ACCOUNT,
            ),
            (
                encrypted_smb("gocryptfs", Mode::MultiNodeMultiWriter as i32, 0),
                InvalidArgument,
                NO_ACCOUNT,
            ),
            (
                encrypted_smb("gocryptfs", Mode::MultiNodeReaderOnly as i32, 1),
                InvalidArgument,
                NO_ACCOUNT,
            ),
            // luks2 keeps its own rules on SMB: one node, a container of 64 MiB or more.
            (
                encrypted_smb("luks2", Mode::MultiNodeMultiWriter as i32, 1 << 30),
                InvalidArgument,
                "volume_capabilities[0].access_mode.mode: MULTI_NODE_MULTI_WRITER is refused \
                 for encryption=luks2",
            ),
            (
                encrypted_smb("luks2", Mode::SingleNodeWriter as i32, 32 << 20),
                OutOfRange,
                "capacity_range: 33554432 bytes is below the 67108864 bytes (64 MiB)",
            ),
            (
                encrypted_smb("luks2", Mode::SingleNodeWriter as i32, 0),
                InvalidArgument,
                "capacity_range.required_bytes: is required for encryption=luks2",
            ),
        ] {
            let e = c.create(&req).await.unwrap_err();
            assert_eq!(e.code(), code, "{e:?}");
            assert!(
                e.message().starts_with(start),
                "{:?}\n{start:?}",
                e.message()
            );
        }
    }

    #[test]
    fn encrypted_smb_volume_ids_reach_the_smb_provisioner_with_their_mode() {
        for (id, mode) in [
            (
                "smb+luks2#delete#files.example.com#data#k8s/pvc-3",
                EncryptionMode::Luks2,
            ),
            (
                "smb+gocryptfs#retain#10.0.0.9#data#pvc-4",
                EncryptionMode::Gocryptfs,
            ),
        ] {
            let v = made_by(id).unwrap_or_else(|e| panic!("{id}: {e:?}"));
            assert_eq!(v.provisioner.name(), "smb", "{id}");
            assert_eq!(v.encryption, Some(mode), "{id}");
            let head = encryption::id_head(v.provisioner.name(), v.encryption);
            assert_eq!(format!("{head}#{}", v.fields), id, "round trip");
        }
        // Fields the SMB provisioner never makes are no volume of it, encrypted or not.
        let e = made_by("smb+luks2#delete#files.example.com#data#../up")
            .err()
            .expect("foreign");
        assert_eq!(e.code(), tonic::Code::NotFound);
    }

    #[test]
    fn a_gocryptfs_source_is_held_to_its_own_rules_before_anything_is_made() {
        // NFSv3 and nolock: no lock to keep, so gocryptfs takes them; luks2 does not.
        for planned in [
            "nfs://127.0.0.1/exports/k8s/pvc-1?vers=3",
            "nfs://127.0.0.1/exports/k8s/pvc-1?vers=4.1&nolock",
        ] {
            check_encrypted_source(&encryption::add_to_source(
                planned,
                EncryptionMode::Gocryptfs,
                None,
            ))
            .unwrap_or_else(|e| panic!("{planned}: {e:?}"));
            let e = check_encrypted_source(&encryption::add_to_source(
                planned,
                EncryptionMode::Luks2,
                1 << 30,
            ))
            .unwrap_err();
            assert!(
                e.message().starts_with("parameters: an encrypted volume"),
                "{e:?}"
            );
        }
    }

    #[tokio::test]
    async fn expanding_a_gocryptfs_volume_is_what_its_class_answers_for_a_plain_one() {
        let expand = |id: &str| {
            let c = service();
            let req = ControllerExpandVolumeRequest {
                volume_id: id.into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: 2 << 30,
                    limit_bytes: 0,
                }),
                ..Default::default()
            };
            async move { c.expand(&req).await.unwrap_err() }
        };
        let plain = expand("nfs#delete#127.0.0.1#/exports/k8s#pvc-1").await;
        let e = expand("nfs+gocryptfs#delete#127.0.0.1#/exports/k8s#pvc-1").await;
        // NFS classes have no quota to grow, for a plain volume and a gocryptfs one alike (a
        // luks2 one would have its container's size recorded instead).
        assert_eq!((e.code(), e.message()), (plain.code(), plain.message()));
        assert!(
            e.message().starts_with("nfs volumes have no quota to grow"),
            "{e:?}"
        );
        assert!(!e.message().contains("encrypted"), "{e:?}");
    }

    fn expand_request(id: &str, required: i64, limit: i64) -> ControllerExpandVolumeRequest {
        ControllerExpandVolumeRequest {
            volume_id: id.into(),
            capacity_range: Some(CapacityRange {
                required_bytes: required,
                limit_bytes: limit,
            }),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn expanding_a_cephfs_luks2_volume_goes_to_its_cluster_to_raise_the_quota() {
        // The CephFS provisioner's own path (its quota), not a refusal: with no cluster
        // configured here it stops at the cluster lookup.
        let e = service()
            .expand(&expand_request(
                "cephfs+luks2#prod#cephfs#csi#pvc-2",
                2 << 30,
                0,
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        assert!(
            e.message()
                .starts_with("clusterID \"prod\" is not in the controller's config"),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn expanding_an_smb_luks2_volume_needs_the_account_and_sizes_as_create_does() {
        use tonic::Code::{InvalidArgument, NotFound, OutOfRange};
        // A server that is never contacted: each answer comes before smbclient would run.
        let id = "smb+luks2#delete#files.example.com#data#k8s/pvc-3";
        let secrets = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        for (req, code, start) in [
            (
                expand_request(id, 2 << 30, 0),
                InvalidArgument,
                "secrets: growing an SMB volume writes its new size on the share, which takes \
                 the SMB account (username, password): name its secret in the StorageClass's \
                 csi.storage.k8s.io/controller-expand-secret-name",
            ),
            (
                ControllerExpandVolumeRequest {
                    secrets: secrets(&[("username", "k8s")]),
                    ..expand_request(id, 2 << 30, 0)
                },
                InvalidArgument,
                "secrets.password: is required",
            ),
            (
                ControllerExpandVolumeRequest {
                    secrets: secrets(&[("username", "k8s"), ("password", "pw"), ("key", "x")]),
                    ..expand_request(id, 2 << 30, 0)
                },
                InvalidArgument,
                "secrets.key: ",
            ),
            (
                expand_request(id, 32 << 20, 0),
                OutOfRange,
                "capacity_range: 33554432 bytes is below the 67108864 bytes (64 MiB)",
            ),
            (
                expand_request("smb+luks2#delete#files.example.com#data#a//b", 2 << 30, 0),
                NotFound,
                "volume \"smb+luks2#delete#files.example.com#data#a//b\" does not exist",
            ),
        ] {
            let e = service().expand(&req).await.unwrap_err();
            assert_eq!(e.code(), code, "{e:?}");
            assert!(
                e.message().starts_with(start),
                "{:?}\n{start:?}",
                e.message()
            );
            assert!(!e.message().contains("pw"), "{e:?}");
        }
        // A gocryptfs volume of an SMB class has no size of its own: what a plain one answers.
        let plain = service()
            .expand(&expand_request(
                "smb#delete#files.example.com#data#k8s/pvc-3",
                2 << 30,
                0,
            ))
            .await
            .unwrap_err();
        let e = service()
            .expand(&expand_request(
                "smb+gocryptfs#delete#files.example.com#data#k8s/pvc-3",
                2 << 30,
                0,
            ))
            .await
            .unwrap_err();
        assert_eq!((e.code(), e.message()), (plain.code(), plain.message()));
        assert!(
            e.message().starts_with("smb volumes have no quota to grow"),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn expanding_an_nfs_luks2_volume_sizes_the_container_as_create_does_naming_the_field() {
        use tonic::Code::{InvalidArgument, OutOfRange};
        // A loopback server that must never be contacted: each answer comes before.
        let id = "nfs+luks2#delete#127.0.0.1#/exports/k8s#pvc-1";
        for ((required, limit), code, start) in [
            (
                ((64 << 20) - 4096 - 1, 0),
                OutOfRange,
                "capacity_range: 67104768 bytes is below the 67108864 bytes (64 MiB)",
            ),
            (
                ((64 << 40) + 1, 0),
                OutOfRange,
                "capacity_range: 70368744181760 bytes is above the 70368744177664 bytes (64 TiB)",
            ),
            (
                ((100 << 20) + 1, (100 << 20) + 10),
                OutOfRange,
                "capacity_range: required_bytes rounded up to whole 4 KiB sectors is 104861696 \
                 bytes, above limit_bytes (104857610)",
            ),
            (
                (-1, 0),
                InvalidArgument,
                "capacity_range: must not be negative",
            ),
            (
                (3 << 30, 2 << 30),
                OutOfRange,
                "capacity_range: required_bytes is larger than limit_bytes",
            ),
            ((0, 0), InvalidArgument, "capacity_range: is required"),
        ] {
            let e = service()
                .expand(&expand_request(id, required, limit))
                .await
                .unwrap_err();
            assert_eq!(e.code(), code, "{required} {limit}: {e:?}");
            assert!(
                e.message().starts_with(start),
                "{required} {limit}: {:?}\n{start:?}",
                e.message()
            );
        }
        let e = service()
            .expand(&ControllerExpandVolumeRequest {
                capacity_range: None,
                ..expand_request(id, 0, 0)
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), InvalidArgument);
        assert_eq!(e.message(), "capacity_range: is required");
    }

    #[tokio::test]
    async fn an_encrypted_cephfs_class_is_provisioned_no_longer_refused_for_its_fs() {
        use crate::csi::volume_capability::access_mode::Mode;
        let v = made_by("cephfs+luks2#prod#cephfs#csi#pvc-2").expect("ours");
        assert_eq!(v.provisioner.name(), "cephfs");
        assert_eq!(v.fields, "prod#cephfs#csi#pvc-2");
        assert_eq!(v.encryption, Some(EncryptionMode::Luks2));
        // It gets past the encryption checks to the CephFS provisioner, which looks the
        // cluster up in the controller's config (empty here) before contacting anything.
        let mut req = encrypted(
            &[
                ("fs", "cephfs"),
                ("clusterID", "prod"),
                ("fsName", "cephfs"),
            ],
            Mode::SingleNodeWriter as i32,
            1 << 30,
        );
        for k in ["server", "share", "vers"] {
            req.parameters.remove(k);
        }
        let e = service().create(&req).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        assert!(
            e.message()
                .starts_with("clusterID \"prod\" is not in the controller's config"),
            "{e:?}"
        );
        // The encryption rules still hold for it: a capacity below 64 MiB is refused first.
        req.capacity_range = Some(CapacityRange {
            required_bytes: 32 << 20,
            limit_bytes: 0,
        });
        let e = service().create(&req).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::OutOfRange, "{e:?}");
        assert!(e.message().contains("64 MiB"), "{e:?}");
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
    fn capacity_ranges() {
        let r = |req, lim| CapacityRange {
            required_bytes: req,
            limit_bytes: lim,
        };
        // The requested size: `required_bytes`, else `limit_bytes` (0 = unset).
        let requested_size = |r: Option<&CapacityRange>| capacity(r).map(Capacity::size);
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
