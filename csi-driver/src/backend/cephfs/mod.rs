//! The CephFS controller backend: creates, inspects, resizes and removes CephFS *subvolumes*
//! with Ceph's own management commands (`ceph fs subvolume ...`, served by the manager's
//! `volumes` module). That is all user space: no mount, no privilege, only the `ceph` CLI
//! from ceph-common and a client key with `mgr "allow rw"` (plus the mon caps to connect).
//!
//! Every call runs one short-lived `ceph` process that needs nothing from the host: the
//! monitors, client name and key come from the caller, `--conf /dev/null` and
//! `--keyring /dev/null` keep `/etc/ceph` out of it, and `CEPH_ARGS`/`CEPH_CONF` are removed
//! from its environment. Each process is bounded twice: by Ceph's own timeouts (connect,
//! monitor and manager commands) and by a hard deadline after which it is killed.
//!
//! **The key** never appears on a command line, in the environment, on disk or in an error:
//! see `SecretFd` (an inherited memfd, `--keyfile /dev/fd/<n>`) for how it reaches `ceph`, and `excerpt` for how `ceph`'s own output is
//! scrubbed (it does echo a key it cannot decode).
//!
//! Observed with Ceph 16.2.15 (Debian 12), and relied on here:
//! - `fs subvolume create` on an existing subvolume succeeds and *applies the new size*, so
//!   [`Subvolumes::create`] looks first and refuses a different size itself.
//! - A missing subvolume or group: exit 2, `Error ENOENT: subvolume 'x' does not exist` /
//!   `subvolume group 'g' does not exist`; a missing file system: exit 2,
//!   `Error ENOENT: FS 'f' not found`.
//! - A key without mgr caps: exit 13, `Error EACCES: access denied: does your client key have
//!   mgr caps?`; a wrong key: exit 13, `[errno 13] RADOS permission denied (error connecting
//!   to the cluster)`; an undecodable key: exit 1, `[errno 22] RADOS invalid argument (error
//!   connecting to the cluster)`, after log lines that quote the key.
//! - No monitor answering: exit 1, `timed out` (`--connect-timeout`); a manager or MDS that
//!   does not answer: exit 110, `Error ETIMEDOUT: Connection timed out.`
//!   (`--rados_mon_op_timeout`, which also bounds manager commands).
//! - Sizes: `0` means "no quota"; above `i64::MAX` is `EINVAL` (exit 22); `info` reports
//!   `"bytes_quota": "infinite"` for no quota.
//! - `--fsid` is not checked by the client against the cluster it reaches, so a configured
//!   fsid is verified with `ceph fsid` before each operation.
//!
//! Its parts: `subvolumes.rs` (cluster, credentials, the subvolume operations), `cli.rs`
//! (running `ceph` and reading its failures), `output.rs` (its JSON), `checks.rs` (names,
//! addresses, keys, sizes); the provisioner is here.

mod checks;
mod cli;
mod output;
mod subvolumes;

pub use subvolumes::{CephCluster, CephCredentials, SubvolumeInfo, Subvolumes};

use cnfs_protocols::spec::FsKind;

use crate::backend::{BackendError, Context, CreateRequest, Created, Plan, Provisioner};

/// StorageClass parameters of a CephFS class, `fs` included.
pub const PARAMETERS: &[&str] = &["fs", "clusterID", "fsName", "subvolumeGroup"];

/// The subvolume group when a StorageClass names none.
const DEFAULT_GROUP: &str = "csi";

/// A cluster of the controller's config (`[clusters.<id>]` in `csi.toml`).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub monitors: Vec<String>,
    #[serde(default)]
    pub fsid: Option<String>,
}

/// One CephFS volume: a subvolume, found through the cluster's id in the controller's config
/// (so ids stay short and survive monitor changes). Its id fields:
/// `<cluster id>#<fs>#<group>#<subvolume>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubvolumeId {
    pub cluster: String,
    pub fs: String,
    pub group: String,
    pub subvolume: String,
}

impl SubvolumeId {
    /// `<cluster id>#<fs>#<group>#<subvolume>`.
    pub fn id_fields(&self) -> String {
        format!(
            "{}#{}#{}#{}",
            self.cluster, self.fs, self.group, self.subvolume
        )
    }

    /// The inverse of [`SubvolumeId::id_fields`]; `None` for anything this backend never
    /// made.
    pub fn from_id_fields(fields: &str) -> Option<Self> {
        let parts: Vec<&str> = fields.split('#').collect();
        let [cluster, fs, group, subvolume] = parts.as_slice() else {
            return None;
        };
        Some(SubvolumeId {
            cluster: cluster.to_string(),
            fs: fs.to_string(),
            group: group.to_string(),
            subvolume: subvolume.to_string(),
        })
    }

    /// Volume `name` of a CephFS StorageClass (`clusterID`, `fsName`, optional
    /// `subvolumeGroup`).
    pub fn plan(
        name: &str,
        p: &std::collections::HashMap<String, String>,
    ) -> Result<Self, BackendError> {
        let required = |k: &str| {
            p.get(k)
                .cloned()
                .ok_or_else(|| BackendError::Invalid(format!("parameters.{k}: is required")))
        };
        let cluster = required("clusterID")?;
        let fs = required("fsName")?;
        let group = p
            .get("subvolumeGroup")
            .cloned()
            .unwrap_or_else(|| DEFAULT_GROUP.to_string());
        if [&cluster, &fs, &group].iter().any(|s| s.contains('#')) {
            return Err(BackendError::Invalid(
                "parameters: names must not contain '#'".into(),
            ));
        }
        Ok(SubvolumeId {
            cluster,
            fs,
            group,
            subvolume: name.to_string(),
        })
    }
}

/// CephFS volumes: a subvolume each, whose quota is the requested capacity and grows online.
pub struct CephFs;

impl CephFs {
    fn cluster(ctx: &Context<'_>, id: &str) -> Result<CephCluster, BackendError> {
        let c = ctx.config.clusters.get(id).ok_or_else(|| {
            BackendError::FailedPrecondition(format!(
                "clusterID {} is not in the controller's config (clusters.<id> with monitors)",
                crate::bounds::echo(id)
            ))
        })?;
        Ok(CephCluster {
            monitors: c.monitors.clone(),
            fsid: c.fsid.clone(),
        })
    }

    /// Admin credentials from the provisioner / expand / delete secret.
    fn admin(
        secrets: &std::collections::HashMap<String, String>,
    ) -> Result<CephCredentials, BackendError> {
        let get = |k: &str| {
            secrets.get(k).ok_or_else(|| {
                BackendError::Invalid(format!("secrets.{k}: is required for cephfs volumes"))
            })
        };
        let (id, key) = (get("adminID")?, get("adminKey")?);
        CephCredentials::new(id.clone(), key.clone())
            .map_err(|e| BackendError::Invalid(format!("secrets: {e}")))
    }

    /// What an operation on an existing volume needs: its id, the cluster, the admin.
    fn open(
        ctx: &Context<'_>,
        fields: &str,
        secrets: &std::collections::HashMap<String, String>,
    ) -> Result<Option<(SubvolumeId, CephCluster, CephCredentials)>, BackendError> {
        let Some(id) = SubvolumeId::from_id_fields(fields) else {
            return Ok(None);
        };
        let cluster = Self::cluster(ctx, &id.cluster)?;
        let creds = Self::admin(secrets)?;
        Ok(Some((id, cluster, creds)))
    }
}

#[tonic::async_trait]
impl Provisioner for CephFs {
    fn name(&self) -> &'static str {
        FsKind::CephFs.name()
    }

    fn parameters(&self) -> &'static [&'static str] {
        PARAMETERS
    }

    fn plan(&self, _: &Context<'_>, req: &CreateRequest<'_>) -> Result<Plan, BackendError> {
        Ok(Plan {
            id_fields: SubvolumeId::plan(req.name, req.parameters)?.id_fields(),
            id_from: "clusterID, fsName and subvolumeGroup",
            source: None,
        })
    }

    async fn create(
        &self,
        ctx: &Context<'_>,
        req: &CreateRequest<'_>,
    ) -> Result<Created, BackendError> {
        let id = SubvolumeId::plan(req.name, req.parameters)?;
        let cluster = Self::cluster(ctx, &id.cluster)?;
        let creds = Self::admin(req.secrets)?;
        let sub = Subvolumes::new(&cluster, &creds, &id.fs, &id.group)?.with_timeout(ctx.timeout);
        // A retried CreateVolume after an expansion finds a bigger quota: still the volume
        // asked for if it fits the requested range.
        let info = match sub.info(&id.subvolume).await? {
            Some(existing) if req.capacity.fits(existing.bytes_quota) => existing,
            _ => sub.create(&id.subvolume, req.capacity.size()).await?,
        };
        let mut source = format!(
            "cephfs://{}{}?fs={}",
            cluster.monitors.join(","),
            info.path,
            id.fs
        );
        if let Some(fsid) = &cluster.fsid {
            source.push_str(&format!("&fsid={fsid}"));
        }
        Ok(Created {
            capacity_bytes: info.bytes_quota.unwrap_or(0),
            source,
        })
    }

    fn owns(&self, fields: &str) -> bool {
        SubvolumeId::from_id_fields(fields).is_some()
    }

    async fn delete(
        &self,
        ctx: &Context<'_>,
        fields: &str,
        secrets: &std::collections::HashMap<String, String>,
    ) -> Result<(), BackendError> {
        let Some((id, cluster, creds)) = Self::open(ctx, fields, secrets)? else {
            return Ok(());
        };
        Subvolumes::new(&cluster, &creds, &id.fs, &id.group)?
            .with_timeout(ctx.timeout)
            .delete(&id.subvolume)
            .await
    }

    async fn exists(
        &self,
        ctx: &Context<'_>,
        fields: &str,
        secrets: &std::collections::HashMap<String, String>,
    ) -> Result<bool, BackendError> {
        let Some((id, cluster, creds)) = Self::open(ctx, fields, secrets)? else {
            return Ok(false);
        };
        Ok(Subvolumes::new(&cluster, &creds, &id.fs, &id.group)?
            .with_timeout(ctx.timeout)
            .info(&id.subvolume)
            .await?
            .is_some())
    }

    async fn expand(
        &self,
        ctx: &Context<'_>,
        fields: &str,
        secrets: &std::collections::HashMap<String, String>,
        size: u64,
    ) -> Result<Option<u64>, BackendError> {
        self.raise_quota(ctx, fields, secrets, size, false).await
    }

    /// A CephFS luks2 volume's source says `grow=quota`: the guest sizes the container from
    /// the subvolume's quota at each mount, so raising the quota to the container plus its
    /// headroom records the new size (never lowered). Answers the size the quota now gives.
    async fn expand_luks2(
        &self,
        ctx: &Context<'_>,
        fields: &str,
        secrets: &std::collections::HashMap<String, String>,
        size: u64,
    ) -> Result<Option<u64>, BackendError> {
        let wanted = size.saturating_add(crate::encryption::QUOTA_HEADROOM);
        // The quota is how the size reaches the guest: a subvolume without one gets one
        // (else the expansion would answer success and the container would never grow).
        let Some(quota) = self.raise_quota(ctx, fields, secrets, wanted, true).await? else {
            return Ok(None);
        };
        Ok(Some(
            cnfs_protocols::spec::encryption::size_from_quota(quota).unwrap_or(size),
        ))
    }
}

impl CephFs {
    /// Raises the subvolume's quota to `size`, never lowering it; an unlimited subvolume
    /// keeps no quota unless `limit_unlimited` (CSI: a volume already as big as asked is a
    /// success). The quota it has afterwards (`size` for an unlimited one left so).
    async fn raise_quota(
        &self,
        ctx: &Context<'_>,
        fields: &str,
        secrets: &std::collections::HashMap<String, String>,
        size: u64,
        limit_unlimited: bool,
    ) -> Result<Option<u64>, BackendError> {
        let Some((id, cluster, creds)) = Self::open(ctx, fields, secrets)? else {
            return Ok(None);
        };
        let sub = Subvolumes::new(&cluster, &creds, &id.fs, &id.group)?.with_timeout(ctx.timeout);
        let Some(current) = sub.info(&id.subvolume).await? else {
            return Ok(None);
        };
        let quota = match current.bytes_quota {
            None if !limit_unlimited => size,
            Some(q) if q >= size => q,
            _ => sub.resize(&id.subvolume, size).await?,
        };
        Ok(Some(quota))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_ids_round_trip_and_foreign_ids_are_none() {
        let id = SubvolumeId {
            cluster: "prod".into(),
            fs: "cephfs".into(),
            group: "csi".into(),
            subvolume: "pvc-2".into(),
        };
        assert_eq!(id.id_fields(), "prod#cephfs#csi#pvc-2");
        assert_eq!(SubvolumeId::from_id_fields(&id.id_fields()), Some(id));
        for foreign in ["", "a#b", "a#b#c", "a#b#c#d#e"] {
            assert_eq!(SubvolumeId::from_id_fields(foreign), None, "{foreign}");
        }
    }
}
