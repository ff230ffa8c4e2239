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

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cnfs_protocols::keyed_lock::KeyedLocks;
use sha2::{Digest, Sha256};
use slog::{warn, Logger};
use tonic::{Request, Response, Status};

use crate::backend::{self, BackendError, Capacity, Context, CreateRequest, Plan, Provisioner};
use crate::bounds::{self, echo, MAX_STRING};
use crate::capability::{self, invalid, required};
use crate::csi::controller_server::Controller;
use crate::csi::controller_service_capability::{rpc, Rpc, Type as CapType};
use crate::csi::validate_volume_capabilities_response::Confirmed;
use crate::csi::*;
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

/// The id of a volume about to be made (`<fs>#<fields>`), refused before anything is made if
/// it would break CSI's string limit (the limits bind what a plugin sends as well); the error
/// names the parameters that make it long.
fn fitting_id(fs: &str, plan: &Plan) -> Result<String, Status> {
    let encoded = format!("{fs}#{}", plan.id_fields);
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

/// The requested size: at least `required_bytes`, at most `limit_bytes` (0 = unset).
fn requested_size(range: Option<&CapacityRange>) -> Result<Option<u64>, Status> {
    Ok(capacity(range)?.size())
}

fn capability_of(t: rpc::Type) -> ControllerServiceCapability {
    ControllerServiceCapability {
        r#type: Some(CapType::Rpc(Rpc { r#type: t as i32 })),
    }
}

/// The provisioner that made volume `id`, with the id's own fields; `NotFound` otherwise.
fn made_by(id: &str) -> Result<(&'static dyn Provisioner, &str), Status> {
    backend::provisioner_of(id)
        .ok_or_else(|| Status::not_found(format!("volume {} does not exist", echo(id))))
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
        for (i, c) in req.volume_capabilities.iter().enumerate() {
            capability::check(&format!("volume_capabilities[{i}]"), Some(c))?;
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
        if let Some(k) = p
            .keys()
            .find(|k| !allowed.contains(&k.as_str()) && !k.starts_with(KUBERNETES_PREFIX))
        {
            return Err(invalid(
                "parameters",
                format!(
                    "unknown key {} for fs {} (known: {})",
                    echo(k),
                    provisioner.name(),
                    allowed.join(", ")
                ),
            ));
        }
        let name = backend_name(&req.name);
        let creq = CreateRequest {
            name: &name,
            parameters: p,
            secrets: &req.secrets,
            capacity,
        };
        let ctx = self.context();
        let plan = provisioner.plan(&ctx, &creq).map_err(status)?;
        let volume_id = fitting_id(provisioner.name(), &plan)?;
        let created = provisioner.create(&ctx, &creq).await.map_err(status)?;
        Ok(Volume {
            capacity_bytes: created.capacity_bytes as i64,
            volume_id,
            volume_context: HashMap::from([("source".to_string(), created.source)]),
            ..Default::default()
        })
    }

    async fn delete(&self, req: &DeleteVolumeRequest) -> Result<(), Status> {
        bounds::required_string("volume_id", &req.volume_id)?;
        bounds::map("secrets", &req.secrets)?;
        // An id this driver never made names nothing to delete (CSI: success).
        let Some((provisioner, fields)) = backend::provisioner_of(&req.volume_id) else {
            warn!(self.log, "DeleteVolume of an id CNFS did not make; nothing to do";
                "volume_id" => &req.volume_id);
            return Ok(());
        };
        provisioner
            .delete(&self.context(), fields, &req.secrets)
            .await
            .map_err(status)
    }

    /// Whether the volume exists (`NotFound` otherwise).
    async fn exists(
        &self,
        volume_id: &str,
        secrets: &HashMap<String, String>,
    ) -> Result<(), Status> {
        let (provisioner, fields) = made_by(volume_id)?;
        if provisioner
            .exists(&self.context(), fields, secrets)
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
        let (provisioner, fields) = made_by(&req.volume_id)?;
        let quota = provisioner
            .expand(&self.context(), fields, &req.secrets, size)
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
            let (p, fields) = made_by(id).expect(id);
            assert_eq!(format!("{}#{fields}", p.name()), id);
        }
        for foreign in ["", "reallyfakevolumeid", "nfs#bogus#h#/e#d", "cephfs#a#b"] {
            let e = made_by(foreign).err().expect(foreign);
            assert_eq!(e.code(), tonic::Code::NotFound, "{foreign}");
        }
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
