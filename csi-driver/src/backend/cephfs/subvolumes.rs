//! A cluster, a client's credentials, and the subvolumes of one group as that client sees
//! them: create (idempotent, the size checked first), look up, resize, delete.

use std::fmt;
use std::time::Duration;

use serde_json::Value;

use crate::backend::{BackendError, DEFAULT_TIMEOUT};

use super::checks::{check_cluster, check_key_shape, check_name, check_size, show_quota};
use super::output::{parse_info, parse_resize};

/// Mode of a new subvolume's directory: world-writable, because the pods that use a volume
/// run with arbitrary uids the controller cannot know.
pub(super) const SUBVOLUME_MODE: &str = "0777";

/// Where a Ceph cluster's monitors are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CephCluster {
    /// `ip:port` (v2 on 3300 or v1 on 6789), `[ipv6]:port`, or a host name; an optional
    /// `v1:`/`v2:` prefix is passed on as it is.
    pub monitors: Vec<String>,
    /// The cluster's fsid; when set, every operation first checks that the monitors belong
    /// to this cluster.
    pub fsid: Option<String>,
}

/// A cephx identity: `client.<id>` and its base64 key. The key is private and never shown.
#[derive(Clone)]
pub struct CephCredentials {
    /// The client name without `client.`.
    pub id: String,
    pub(super) key: String,
}

impl CephCredentials {
    /// Checks the id like any other name and the key's base64 shape (a cephx key is 40
    /// characters; anything from 16 to 256 is let through to Ceph). Surrounding whitespace,
    /// e.g. a trailing newline from a secret file, is dropped.
    pub fn new(id: impl Into<String>, key: impl Into<String>) -> Result<Self, BackendError> {
        let id = id.into();
        check_name("client id", &id)?;
        let key = key.into().trim().to_string();
        if let Err(why) = check_key_shape(&key) {
            return Err(BackendError::Invalid(format!(
                "the key of client.{id} is not a base64 cephx key: {why}"
            )));
        }
        Ok(CephCredentials { id, key })
    }
}

impl fmt::Debug for CephCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CephCredentials")
            .field("id", &self.id)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// A subvolume as Ceph reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubvolumeInfo {
    /// Absolute path inside the file system (what `getpath` prints), the path to mount.
    pub path: String,
    /// The quota in bytes; `None` = no quota.
    pub bytes_quota: Option<u64>,
}

/// The subvolumes of one group in one CephFS file system, as one client sees them.
#[derive(Debug)]
pub struct Subvolumes<'a> {
    pub(super) cluster: &'a CephCluster,
    pub(super) creds: &'a CephCredentials,
    pub(super) fs: String,
    pub(super) group: String,
    pub(super) timeout: Duration,
    /// `["ceph"]`; tests put a fake in front: program and leading arguments.
    pub(super) command: Vec<String>,
}

/// What an operation found out about a subvolume name.
pub(super) enum Lookup {
    Found(SubvolumeInfo),
    NoSubvolume,
    NoGroup,
}

impl<'a> Subvolumes<'a> {
    /// Checks every name and address up front, so no invalid value ever reaches a command
    /// line. Each `ceph` command is bounded by [`DEFAULT_TIMEOUT`] (see
    /// [`Subvolumes::with_timeout`]).
    pub fn new(
        cluster: &'a CephCluster,
        creds: &'a CephCredentials,
        fs: &str,
        group: &str,
    ) -> Result<Self, BackendError> {
        check_cluster(cluster)?;
        check_name("file system name", fs)?;
        check_name("subvolume group", group)?;
        Ok(Subvolumes {
            cluster,
            creds,
            fs: fs.to_string(),
            group: group.to_string(),
            timeout: DEFAULT_TIMEOUT,
            command: vec!["ceph".to_string()],
        })
    }

    /// Bound on each `ceph` command (an operation runs one to four of them). At least 1 s.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.max(Duration::from_secs(1));
        self
    }

    /// Creates subvolume `name` with a quota of `size_bytes` (`None`: no quota) and mode
    /// 0777, creating the group first if it is missing. Idempotent: an existing subvolume
    /// with the same quota is returned as it is; with another quota it is left untouched and
    /// the answer is [`BackendError::AlreadyExists`]. (The check and the create are two
    /// commands: two calls for one name at once, with different sizes, could both pass it.
    /// The CSI spec asks the CO to keep one call per volume in flight.)
    pub async fn create(
        &self,
        name: &str,
        size_bytes: Option<u64>,
    ) -> Result<SubvolumeInfo, BackendError> {
        check_name("subvolume name", name)?;
        if let Some(size) = size_bytes {
            check_size(size)?;
        }
        self.check_fsid().await?;
        match self.lookup(name).await? {
            Lookup::Found(existing) if existing.bytes_quota == size_bytes => return Ok(existing),
            Lookup::Found(existing) => {
                return Err(BackendError::AlreadyExists(format!(
                    "subvolume {} already exists with quota {}, not {}",
                    self.subvolume(name),
                    show_quota(existing.bytes_quota),
                    show_quota(size_bytes)
                )))
            }
            Lookup::NoGroup => {
                let args = ["fs", "subvolumegroup", "create", &self.fs, &self.group];
                self.run(&args).await.map_err(|f| {
                    f.into_error(&format!("creating group {}/{}", self.fs, self.group))
                })?;
            }
            Lookup::NoSubvolume => {}
        }
        let size = size_bytes.map(|s| s.to_string());
        let mut args = vec![
            "fs",
            "subvolume",
            "create",
            &self.fs,
            name,
            "--group_name",
            &self.group,
            "--mode",
            SUBVOLUME_MODE,
        ];
        if let Some(size) = &size {
            args.extend(["--size", size]);
        }
        self.run(&args)
            .await
            .map_err(|f| f.into_error(&format!("creating subvolume {}", self.subvolume(name))))?;
        match self.lookup(name).await? {
            Lookup::Found(info) => Ok(info),
            _ => Err(BackendError::Failed(format!(
                "subvolume {} was created but is gone again",
                self.subvolume(name)
            ))),
        }
    }

    /// The subvolume's path and quota, or `None` when it (or its group) does not exist.
    pub async fn info(&self, name: &str) -> Result<Option<SubvolumeInfo>, BackendError> {
        check_name("subvolume name", name)?;
        self.check_fsid().await?;
        match self.lookup(name).await? {
            Lookup::Found(info) => Ok(Some(info)),
            Lookup::NoSubvolume | Lookup::NoGroup => Ok(None),
        }
    }

    /// Sets the quota to `new_size_bytes` and returns the quota Ceph reports afterwards.
    /// `--no_shrink`: Ceph refuses ([`BackendError::Invalid`]) a quota below what is already
    /// used. A missing subvolume is [`BackendError::NotFound`].
    pub async fn resize(&self, name: &str, new_size_bytes: u64) -> Result<u64, BackendError> {
        check_name("subvolume name", name)?;
        check_size(new_size_bytes)?;
        self.check_fsid().await?;
        let size = new_size_bytes.to_string();
        let args = [
            "fs",
            "subvolume",
            "resize",
            &self.fs,
            name,
            &size,
            "--group_name",
            &self.group,
            "--no_shrink",
            "--format",
            "json",
        ];
        let what = format!("resizing subvolume {}", self.subvolume(name));
        let out = self.run(&args).await.map_err(|f| f.into_error(&what))?;
        match parse_resize(&out) {
            Ok(Some(quota)) => Ok(quota),
            Ok(None) => Err(BackendError::Failed(format!(
                "{what}: ceph reports no quota after the resize"
            ))),
            Err(why) => Err(BackendError::Failed(format!("{what}: {why}"))),
        }
    }

    /// Removes the subvolume and its data. Idempotent: a missing subvolume or group is Ok (a
    /// missing file system is not: that is a configuration error).
    pub async fn delete(&self, name: &str) -> Result<(), BackendError> {
        check_name("subvolume name", name)?;
        self.check_fsid().await?;
        let args = [
            "fs",
            "subvolume",
            "rm",
            &self.fs,
            name,
            "--group_name",
            &self.group,
        ];
        match self.run(&args).await {
            Ok(_) => Ok(()),
            Err(f) if f.subvolume_or_group_missing() => Ok(()),
            Err(f) => Err(f.into_error(&format!("removing subvolume {}", self.subvolume(name)))),
        }
    }

    /// `fs subvolume info`, which also reports the path (the same `getpath` prints).
    pub(super) async fn lookup(&self, name: &str) -> Result<Lookup, BackendError> {
        let args = [
            "fs",
            "subvolume",
            "info",
            &self.fs,
            name,
            "--group_name",
            &self.group,
            "--format",
            "json",
        ];
        let what = format!("looking up subvolume {}", self.subvolume(name));
        match self.run(&args).await {
            Ok(out) => parse_info(&out)
                .map(Lookup::Found)
                .map_err(|why| BackendError::Failed(format!("{what}: {why}"))),
            Err(f) if f.group_missing() => Ok(Lookup::NoGroup),
            Err(f) if f.subvolume_or_group_missing() => Ok(Lookup::NoSubvolume),
            Err(f) => Err(f.into_error(&what)),
        }
    }

    /// With a configured fsid: are the monitors really that cluster's? The client itself
    /// does not check (see the module notes), and provisioning on, or deleting from, the
    /// wrong cluster must not happen.
    pub(super) async fn check_fsid(&self) -> Result<(), BackendError> {
        let Some(want) = &self.cluster.fsid else {
            return Ok(());
        };
        let out = self
            .run(&["fsid", "--format", "json"])
            .await
            .map_err(|f| f.into_error("asking the cluster for its fsid"))?;
        let got = serde_json::from_str::<Value>(&out)
            .ok()
            .and_then(|v| v["fsid"].as_str().map(str::to_string))
            .ok_or_else(|| BackendError::Failed("`ceph fsid` printed no fsid".to_string()))?;
        if !got.eq_ignore_ascii_case(want) {
            return Err(BackendError::Invalid(format!(
                "the Ceph cluster at {} has fsid {got}, not the configured {want}",
                self.monitors()
            )));
        }
        Ok(())
    }

    pub(super) fn subvolume(&self, name: &str) -> String {
        format!("{}/{}/{}", self.fs, self.group, name)
    }

    pub(super) fn monitors(&self) -> String {
        self.cluster.monitors.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of a real cephx key (not one of any cluster).
    const KEY: &str = "AQC5ygZr0XC1MRAAw+DVI46MO/nuqITDNz+buQ==";

    #[test]
    fn keys_are_checked_for_shape_and_never_shown() {
        let creds = CephCredentials::new("admin", format!("{KEY}\n")).expect("valid key");
        assert_eq!(creds.key, KEY, "trailing newline kept");
        let shown = format!("{creds:?}");
        assert!(!shown.contains(KEY) && shown.contains("admin"), "{shown}");
        for bad in [
            "",
            "short==",
            "AQC5ygZr0XC1MRAAw+DVI46MO/nuqITDNz+buQ=",
            "AQC5ygZr0XC1MRAAw+DVI46MO/nuqITDNz+b===",
            "AQC5ygZr0XC1MRAAw-DVI46MO/nuqITDNz+buQ==",
            "AQC5ygZr0XC1MRAAw+DVI46MO/nuqITDNz+b=Q=",
            "AQC5ygZr0XC1MRAA w+DVI46MO/nuqITDNz+bQ==",
        ] {
            match CephCredentials::new("admin", bad) {
                Err(BackendError::Invalid(m)) => {
                    assert!(m.contains("client.admin"), "{m}");
                    assert!(bad.is_empty() || !m.contains(bad), "key in {m}");
                }
                other => panic!("{bad:?} accepted: {other:?}"),
            }
        }
    }
}
