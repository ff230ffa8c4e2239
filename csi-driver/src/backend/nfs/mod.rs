//! The NFS controller backend: creates, probes and removes a volume's directory on an NFS
//! share with a user-space NFSv3 client (portmapper → MOUNT → NFSv3, all over TCP), so the
//! controller needs no host mount and no capability.
//!
//! What the server must allow, because of how this client talks to it:
//! - **Source ports.** Connections come from a reserved port (665-1023) when the process may
//!   bind one (root, or an unprivileged pod with `net.ipv4.ip_unprivileged_port_start=0`),
//!   else from an ephemeral port, which the export must then accept: kernel nfsd needs
//!   `insecure`; nfs-ganesha accepts them unless `PrivilegedPort = true` (default `false`).
//! - **Root access to the share root.** Calls carry `AUTH_SYS` uid 0 / gid 0. Either the
//!   export must not squash root (`no_root_squash`, ganesha `Squash = No_Root_Squash`), or the
//!   share root must be writable by the user root is squashed to (e.g. mode 0777 or owned by
//!   `nobody`).
//! - **NFSv3 with MOUNT over TCP**, registered with the server's portmapper (port 111). The
//!   MOUNT port always comes from the portmapper; the NFS port may be given explicitly.
//!
//! Every operation opens its own connections, unmounts (MOUNT `UMNT`) and closes them at the
//! end, and is bounded as a whole by the caller's timeout, connection set-up included: a
//! black-holed server yields [`BackendError::Unavailable`], never a hang.
//!
//! Its parts: `share.rs` (the share and its operations), `session.rs` (one mounted export),
//! `tree.rs` (deleting and archiving a directory tree), `sizes.rs` (a luks2 volume's recorded
//! sizes), `rpc.rs` (connections and credentials), `errors.rs` (failures, classified); the
//! provisioner is here.

mod errors;
mod rpc;
mod session;
mod share;
mod sizes;
mod tree;

pub use share::{validate_name, NfsShare, DEFAULT_DIR_MODE};

use cnfs_protocols::spec::FsKind;

use crate::backend::{BackendError, Context, CreateRequest, Created, OnDelete, Plan, Provisioner};

/// StorageClass parameters of an NFS class, `fs` included.
pub const PARAMETERS: &[&str] = &["fs", "server", "share", "vers", "onDelete"];

/// One NFS volume: directory `dir` in the export root of `share`, and what DeleteVolume does
/// with it. Its id fields: `<onDelete>#<server>#<export>#<dir>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NfsVolume {
    pub on_delete: OnDelete,
    pub share: NfsShare,
    pub dir: String,
}

impl NfsVolume {
    /// `<onDelete>#<server>#<export>#<dir>`.
    pub fn id_fields(&self) -> String {
        format!(
            "{}#{}#{}#{}",
            self.on_delete.as_str(),
            self.share.server,
            self.share.export,
            self.dir
        )
    }

    /// The inverse of [`NfsVolume::id_fields`]; `None` for anything this backend never made.
    pub fn from_id_fields(fields: &str) -> Option<Self> {
        let parts: Vec<&str> = fields.split('#').collect();
        let [on_delete, server, export, dir] = parts.as_slice() else {
            return None;
        };
        Some(NfsVolume {
            on_delete: OnDelete::parse(on_delete)?,
            share: NfsShare {
                server: server.to_string(),
                port: None,
                export: export.to_string(),
            },
            dir: dir.to_string(),
        })
    }

    /// Volume `name` of an NFS StorageClass (`server`, `share`, optional `vers` and
    /// `onDelete`), and the `source` the node side mounts, checked as it will check it.
    pub fn plan(
        name: &str,
        p: &std::collections::HashMap<String, String>,
    ) -> Result<(Self, String), BackendError> {
        let invalid = |field: &str, why: String| BackendError::Invalid(format!("{field}: {why}"));
        let get = |k: &str| p.get(k).cloned().unwrap_or_default();
        let on_delete = match p.get("onDelete") {
            None => OnDelete::default(),
            Some(v) => OnDelete::parse(v).ok_or_else(|| {
                invalid(
                    "parameters.onDelete",
                    format!(
                        "{} is not retain, delete or archive",
                        crate::bounds::echo(v)
                    ),
                )
            })?,
        };
        let share = NfsShare {
            server: get("server"),
            port: None,
            export: get("share"),
        };
        if share.server.is_empty() {
            return Err(invalid("parameters.server", "is required".into()));
        }
        if share.export.is_empty() {
            return Err(invalid("parameters.share", "is required".into()));
        }
        if share.server.contains('#') || share.export.contains('#') {
            return Err(invalid(
                "parameters",
                "server and share must not contain '#'".into(),
            ));
        }
        share
            .validate()
            .map_err(|e| invalid("parameters", e.to_string()))?;
        let host = if share.server.contains(':') {
            format!("[{}]", share.server)
        } else {
            share.server.clone()
        };
        let export = share.export.trim_end_matches('/');
        let mut source = format!("nfs://{host}{export}/{name}");
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
                    format!(
                        "{} is not a valid CNFS volume",
                        crate::bounds::echo(&source)
                    ),
                )
            })?;
        Ok((
            NfsVolume {
                on_delete,
                share,
                dir: name.to_string(),
            },
            source,
        ))
    }
}

/// NFS volumes: a directory each, directly below an admin-named export; no quota.
pub struct Nfs;

#[tonic::async_trait]
impl Provisioner for Nfs {
    fn name(&self) -> &'static str {
        FsKind::Nfs.name()
    }

    fn parameters(&self) -> &'static [&'static str] {
        PARAMETERS
    }

    fn plan(&self, _: &Context<'_>, req: &CreateRequest<'_>) -> Result<Plan, BackendError> {
        let (v, source) = NfsVolume::plan(req.name, req.parameters)?;
        Ok(Plan {
            id_fields: v.id_fields(),
            id_from: "server and share",
            source: Some(source),
        })
    }

    async fn create(
        &self,
        ctx: &Context<'_>,
        req: &CreateRequest<'_>,
    ) -> Result<Created, BackendError> {
        let (v, source) = NfsVolume::plan(req.name, req.parameters)?;
        v.share.create_dir(&v.dir, ctx.timeout).await?;
        Ok(Created {
            capacity_bytes: 0,
            source,
        })
    }

    fn owns(&self, fields: &str) -> bool {
        NfsVolume::from_id_fields(fields).is_some()
    }

    async fn delete(
        &self,
        ctx: &Context<'_>,
        fields: &str,
        _: &std::collections::HashMap<String, String>,
    ) -> Result<(), BackendError> {
        let Some(v) = NfsVolume::from_id_fields(fields) else {
            return Ok(());
        };
        v.share.delete_dir(&v.dir, v.on_delete, ctx.timeout).await
    }

    async fn exists(
        &self,
        ctx: &Context<'_>,
        fields: &str,
        _: &std::collections::HashMap<String, String>,
    ) -> Result<bool, BackendError> {
        match NfsVolume::from_id_fields(fields) {
            Some(v) => v.share.dir_exists(&v.dir, ctx.timeout).await,
            None => Ok(false),
        }
    }

    async fn expand(
        &self,
        _: &Context<'_>,
        _: &str,
        _: &std::collections::HashMap<String, String>,
        _: u64,
    ) -> Result<Option<u64>, BackendError> {
        Err(BackendError::FailedPrecondition(
            "nfs volumes have no quota to grow (use a StorageClass without allowVolumeExpansion)"
                .into(),
        ))
    }

    /// The new size is an empty directory `cnfs-volume.size.<bytes>` beside the container,
    /// which the guest reads at its next mount (see [`NfsShare::record_container_size`]).
    async fn expand_luks2(
        &self,
        ctx: &Context<'_>,
        fields: &str,
        _: &std::collections::HashMap<String, String>,
        size: u64,
    ) -> Result<Option<u64>, BackendError> {
        match NfsVolume::from_id_fields(fields) {
            Some(v) => {
                v.share
                    .record_container_size(&v.dir, size, ctx.timeout)
                    .await
            }
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_ids_round_trip_and_foreign_ids_are_none() {
        let v = NfsVolume {
            on_delete: OnDelete::Archive,
            share: NfsShare {
                server: "fd00::5".into(),
                port: None,
                export: "/exports/k8s".into(),
            },
            dir: "pvc-1".into(),
        };
        assert_eq!(v.id_fields(), "archive#fd00::5#/exports/k8s#pvc-1");
        assert_eq!(NfsVolume::from_id_fields(&v.id_fields()), Some(v));
        for foreign in ["", "bogus#h#/e#d", "delete#h#/e", "delete#h#/e#d#x"] {
            assert_eq!(NfsVolume::from_id_fields(foreign), None, "{foreign}");
        }
    }
}
