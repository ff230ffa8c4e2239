//! Storage backends the controller provisions on, entirely in user space: no host mount and
//! no privilege (an NFSv3 client library for NFS shares, Ceph's own management commands for
//! CephFS subvolumes, Samba's `smbclient` for SMB shares). Every call is bounded by a
//! deadline.
//!
//! Each file system is one module with one [`Provisioner`], registered in [`PROVISIONERS`]:
//! its StorageClass parameters, its secrets, its volume ids and what create, delete, probe
//! and expand mean for it are its own. The controller asks the registry by the `fs`
//! parameter or by the first field of a volume id, and keeps only what all file systems share.

pub mod cephfs;
pub mod nfs;
mod secret_fd;
pub mod smb;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// How long one backend operation may take before it is abandoned.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Every file system the controller provisions, by the name StorageClasses give as `fs` and
/// volume ids carry as their first field. A new file system is a module and a line here.
pub static PROVISIONERS: &[&dyn Provisioner] = &[&nfs::Nfs, &cephfs::CephFs, &smb::Smb];

/// The provisioner of file system `name`.
pub fn provisioner(name: &str) -> Option<&'static dyn Provisioner> {
    PROVISIONERS.iter().copied().find(|p| p.name() == name)
}

/// The names of all file systems, for messages: `nfs, cephfs, smb`.
pub fn names() -> String {
    PROVISIONERS
        .iter()
        .map(|p| p.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The provisioner that made volume `id` (`<fs>#<fields>`) and the id's fields after
/// `<fs>#`; `None` for an id no provisioner made.
pub fn provisioner_of(id: &str) -> Option<(&'static dyn Provisioner, &str)> {
    let (fs, fields) = id.split_once('#')?;
    let p = provisioner(fs)?;
    p.owns(fields).then_some((p, fields))
}

/// `/etc/cnfs/csi.toml`: what backends need beyond StorageClass parameters (today the Ceph
/// clusters StorageClasses may name by `clusterID`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    #[serde(default)]
    pub clusters: BTreeMap<String, cephfs::ClusterConfig>,
}

impl ControllerConfig {
    /// A missing file is an empty config (NFS and SMB need none).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text)
                .map_err(|e| anyhow::anyhow!("controller config {}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(anyhow::anyhow!("controller config {}: {e}", path.display())),
        }
    }
}

/// What every operation gets besides its request: the controller's config and the bound on
/// each backend call.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub config: &'a ControllerConfig,
    pub timeout: Duration,
}

/// A validated CSI capacity range, in bytes; 0 means unset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capacity {
    pub required: u64,
    pub limit: u64,
}

impl Capacity {
    /// The size to ask a backend for: `required`, else `limit`; `None` when neither is set.
    pub fn size(self) -> Option<u64> {
        let size = if self.required > 0 {
            self.required
        } else {
            self.limit
        };
        (size > 0).then_some(size)
    }

    /// Whether an existing quota (`None`: none) satisfies the range.
    pub fn fits(self, quota: Option<u64>) -> bool {
        match quota {
            None => self.required == 0 && self.limit == 0,
            Some(q) => q >= self.required && (self.limit == 0 || q <= self.limit),
        }
    }
}

/// A CreateVolume, as a provisioner sees it.
#[derive(Debug, Clone, Copy)]
pub struct CreateRequest<'a> {
    /// The volume's backend name: a safe single path component (`pvc-<uuid>`, or a hash).
    pub name: &'a str,
    /// The StorageClass parameters (only those of [`Provisioner::parameters`], plus the CO's
    /// `csi.storage.k8s.io/` ones).
    pub parameters: &'a HashMap<String, String>,
    pub secrets: &'a HashMap<String, String>,
    pub capacity: Capacity,
}

/// What [`Provisioner::plan`] decided before anything is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The volume id after `<fs>#`.
    pub id_fields: String,
    /// The parameters that make the id long, named when it would be too long.
    pub id_from: &'static str,
    /// The volume URL the node side will mount, when it is known before anything is made
    /// (NFS, SMB; not CephFS, whose URL names the cluster's fsid): checked before creating.
    pub source: Option<String>,
}

/// A volume made (or found).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    /// Its quota in bytes; 0 when it has none (capacity unknown).
    pub capacity_bytes: u64,
    /// The volume URL the node side mounts (volume context `source`).
    pub source: String,
}

/// One file system's side of the Controller service. Errors name the parameter, secret key
/// or object concerned, never a secret's value.
#[tonic::async_trait]
pub trait Provisioner: Send + Sync {
    /// The `fs` parameter and the first field of its volume ids.
    fn name(&self) -> &'static str;

    /// The StorageClass parameters it reads, `fs` included; any other key (but the CO's
    /// `csi.storage.k8s.io/` ones) is refused by the controller.
    fn parameters(&self) -> &'static [&'static str];

    /// Checks the request's parameters and names the volume; nothing is made or contacted.
    fn plan(&self, ctx: &Context<'_>, req: &CreateRequest<'_>) -> Result<Plan, BackendError>;

    /// Makes the volume [`Provisioner::plan`] named, or finds it made: idempotent.
    async fn create(
        &self,
        ctx: &Context<'_>,
        req: &CreateRequest<'_>,
    ) -> Result<Created, BackendError>;

    /// Whether `fields` (a volume id after `<fs>#`) is one this provisioner makes.
    fn owns(&self, fields: &str) -> bool;

    /// Deletes (or, as the volume's policy says, keeps) volume `fields`; a volume that is
    /// gone already is `Ok`.
    async fn delete(
        &self,
        ctx: &Context<'_>,
        fields: &str,
        secrets: &HashMap<String, String>,
    ) -> Result<(), BackendError>;

    /// Whether volume `fields` exists.
    async fn exists(
        &self,
        ctx: &Context<'_>,
        fields: &str,
        secrets: &HashMap<String, String>,
    ) -> Result<bool, BackendError>;

    /// Grows volume `fields` to at least `size` bytes and returns its capacity; `None` when
    /// the volume does not exist. File systems without quotas answer
    /// [`BackendError::FailedPrecondition`].
    async fn expand(
        &self,
        ctx: &Context<'_>,
        fields: &str,
        secrets: &HashMap<String, String>,
        size: u64,
    ) -> Result<Option<u64>, BackendError>;

    /// Grows luks2 volume `fields` to a container of `size` bytes from its next mount on: the
    /// size is recorded where the guest that mounts the volume reads it (the guest grows the
    /// file, the mapping and ext4). Returns the size recorded afterwards: `size`, or a larger
    /// one recorded before (never shrinks; a repeated call records nothing new); `None` when
    /// the volume does not exist. The default: this file system has no such record yet
    /// ([`BackendError::FailedPrecondition`] saying so), and nothing is contacted.
    async fn expand_luks2(
        &self,
        _ctx: &Context<'_>,
        _fields: &str,
        _secrets: &HashMap<String, String>,
        _size: u64,
    ) -> Result<Option<u64>, BackendError> {
        Err(BackendError::FailedPrecondition(format!(
            "encrypted (luks2) volumes of fs {} cannot grow: ControllerExpandVolume grows luks2 \
             volumes of fs {} only; make a larger volume and copy the data",
            self.name(),
            crate::encryption::GROWN_ON.join(", ")
        )))
    }
}

/// What happens to a volume's directory (NFS, SMB) when its volume is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnDelete {
    /// Keep the directory and its data.
    Retain,
    /// Remove the directory and everything in it.
    #[default]
    Delete,
    /// Rename it to `archived-<name>` beside where it was.
    Archive,
}

impl OnDelete {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "retain" => Some(OnDelete::Retain),
            "delete" => Some(OnDelete::Delete),
            "archive" => Some(OnDelete::Archive),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OnDelete::Retain => "retain",
            OnDelete::Delete => "delete",
            OnDelete::Archive => "archive",
        }
    }
}

/// A backend failure, classified for the CSI status code it becomes. Messages never carry a
/// key.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The share, file system, group or volume does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request cannot work (bad name, not a directory, size the backend refuses).
    #[error("{0}")]
    Invalid(String),
    /// The backend refused the credentials or the operation.
    #[error("{0}")]
    PermissionDenied(String),
    /// The backend did not answer in time or could not be reached: worth retrying.
    #[error("{0}")]
    Unavailable(String),
    /// Exists with different properties than requested (e.g. another size).
    #[error("{0}")]
    AlreadyExists(String),
    /// The request cannot work in the system's current state (no quota to grow, a cluster
    /// missing from the controller's config).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Anything else the backend reported.
    #[error("{0}")]
    Failed(String),
}

/// A deadline as errors show it: `1 s`, `2.5 s`.
pub(crate) fn show_secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// Tests of a CLI backend: waits until the fake program whose pid is in `pid_file` has been
/// killed (gone, or a zombie until tokio reaps it), at most 5 s.
#[cfg(test)]
pub(crate) async fn wait_killed(pid_file: &Path, what: &str) {
    use std::time::Instant;
    let pid = std::fs::read_to_string(pid_file).expect("the fake ran");
    let _ = std::fs::remove_file(pid_file);
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().next());
        if matches!(state, None | Some("Z")) {
            return;
        }
        assert!(
            Instant::now() < until,
            "fake {what} {} still running: {stat}",
            pid.trim()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_existing_quota_fits_a_range_it_satisfies() {
        let r = |required, limit| Capacity { required, limit };
        assert!(r(8, 0).fits(Some(16)));
        assert!(r(8, 8).fits(Some(8)));
        assert!(!r(8, 0).fits(Some(4)));
        assert!(!r(8, 10).fits(Some(16)));
        assert!(r(0, 0).fits(None) && !r(8, 0).fits(None));
    }

    #[test]
    fn the_registry_knows_each_file_system_once_by_name_and_by_id() {
        assert_eq!(names(), "nfs, cephfs, smb");
        for p in PROVISIONERS {
            assert!(std::ptr::eq(provisioner(p.name()).expect("registered"), *p));
            assert!(
                p.parameters().contains(&"fs"),
                "{} does not list fs",
                p.name()
            );
        }
        for (id, fs) in [
            ("nfs#archive#fd00::5#/exports/k8s#pvc-1", "nfs"),
            ("cephfs#prod#cephfs#csi#pvc-2", "cephfs"),
            ("smb#delete#files.example.com#data#k8s/pvc-3", "smb"),
        ] {
            let (p, fields) = provisioner_of(id).expect(id);
            assert_eq!((p.name(), fields), (fs, &id[fs.len() + 1..]));
        }
        for foreign in [
            "",
            "reallyfakevolumeid",
            "nfs#bogus#h#/e#d",
            "cephfs#a#b",
            "smb#archive#h#s#d",
            "smb#delete#h#s#../d",
            "xfs#a#b#c#d",
        ] {
            assert!(provisioner_of(foreign).is_none(), "{foreign}");
        }
    }
}
