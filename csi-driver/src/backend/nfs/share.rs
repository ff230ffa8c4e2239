//! An NFS share as the provisioner uses it: its checks, and the three operations on a
//! volume directory (create, probe, delete), each bounded as a whole by one deadline.

use std::net::IpAddr;
use std::time::Duration;

use nfs3_client::nfs3_types::nfs3::ftype3;

use crate::backend::{BackendError, OnDelete};

use super::session::Session;

/// Mode of a directory made by [`NfsShare::create_dir`]: world-writable, because the pods that
/// use a volume run with arbitrary uids and the controller cannot know them.
pub const DEFAULT_DIR_MODE: u32 = 0o777;

/// The longest file name NFS servers accept in practice (`NAME_MAX` on Linux).
pub(super) const NAME_MAX: usize = 255;

/// MOUNT protocol limit on an export path (`MNTPATHLEN`).
pub(super) const EXPORT_MAX: usize = 1024;

/// An NFS export on which volumes are directories directly below the export root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NfsShare {
    /// IP address (v4, v6, optionally in brackets) or host name of the server.
    pub server: String,
    /// NFS port; `None` asks the server's portmapper. (The MOUNT port always comes from the
    /// portmapper, so port 111 must be reachable either way.)
    pub port: Option<u16>,
    /// Absolute export path, as `showmount -e` lists it (or the NFSv4 pseudo path on servers
    /// that map MOUNT requests to it, like ganesha with `Mount_Path_Pseudo`).
    pub export: String,
}

impl NfsShare {
    /// Creates `<export>/<name>` with mode 0777 ([`DEFAULT_DIR_MODE`]) so pods with any uid can
    /// write to it. Idempotent: an existing directory is `Ok` (left as it is); an existing
    /// non-directory is [`BackendError::Invalid`].
    pub async fn create_dir(&self, name: &str, timeout: Duration) -> Result<(), BackendError> {
        self.create_dir_with_mode(name, DEFAULT_DIR_MODE, timeout)
            .await
    }

    /// [`create_dir`](Self::create_dir) with an explicit permission `mode` (at most 0o7777).
    /// The mode is set exactly, whatever umask the server applies; an existing directory keeps
    /// its mode.
    pub async fn create_dir_with_mode(
        &self,
        name: &str,
        mode: u32,
        timeout: Duration,
    ) -> Result<(), BackendError> {
        validate_name(name)?;
        validate_mode(mode)?;
        self.validate()?;
        self.bounded(timeout, async {
            let mut s = Session::open(self).await?;
            let r = s.create_dir(name, mode).await;
            s.close().await;
            r
        })
        .await
    }

    /// Whether `<export>/<name>` exists as a directory (a symlink to one does not count).
    pub async fn dir_exists(&self, name: &str, timeout: Duration) -> Result<bool, BackendError> {
        validate_name(name)?;
        self.validate()?;
        self.bounded(timeout, async {
            let mut s = Session::open(self).await?;
            let root = s.root.clone();
            let r = s
                .lookup(&root, name.as_bytes(), name)
                .await
                .map(|found| matches!(found, Some((_, a)) if a.type_ == ftype3::NF3DIR));
            s.close().await;
            r
        })
        .await
    }

    /// Records that the luks2 container in volume directory `<export>/<name>` is to be `size`
    /// bytes from the volume's next mount on: an empty directory
    /// `cnfs-volume.size.<size>` (mode 0755) beside the container, which the guest reads
    /// at each mount, taking the largest well-formed marker (by name, as here). Returns the
    /// size recorded afterwards: `size`, or a larger marker or container length found already
    /// (then nothing is written: a repeat or a smaller size never shrinks anything); `None`
    /// when the directory does not exist. Once the new marker exists the smaller ones are
    /// removed, best effort, so the guest has one name to read.
    pub async fn record_container_size(
        &self,
        name: &str,
        size: u64,
        timeout: Duration,
    ) -> Result<Option<u64>, BackendError> {
        validate_name(name)?;
        self.validate()?;
        self.bounded(timeout, async {
            let mut s = Session::open(self).await?;
            let r = s.record_size(name, size).await;
            s.close().await;
            r
        })
        .await
    }

    /// Applies `on_delete` to `<export>/<name>`:
    /// - `Retain`: nothing (not even a connection).
    /// - `Delete`: removes the directory and everything below it; symlinks are removed, never
    ///   followed, and the walk refuses to cross into another file system.
    /// - `Archive`: renames it to `archived-<name>` in the export root, or to
    ///   `archived-<name>-<unix seconds>` when that exists already.
    ///
    /// Idempotent: a missing directory is `Ok`. A non-directory under `name` is
    /// [`BackendError::Invalid`] (it was not made by this backend, so it is left alone).
    pub async fn delete_dir(
        &self,
        name: &str,
        on_delete: OnDelete,
        timeout: Duration,
    ) -> Result<(), BackendError> {
        validate_name(name)?;
        self.validate()?;
        if on_delete == OnDelete::Retain {
            return Ok(());
        }
        self.bounded(timeout, async {
            let mut s = Session::open(self).await?;
            let r = match on_delete {
                OnDelete::Retain => Ok(()),
                OnDelete::Delete => s.delete_tree(name).await,
                OnDelete::Archive => s.archive(name).await,
            };
            s.close().await;
            r
        })
        .await
    }

    /// Checks the share's own fields, so a bad StorageClass parameter is reported as such
    /// rather than as a network failure.
    pub fn validate(&self) -> Result<(), BackendError> {
        if self.server.trim().is_empty() {
            return Err(BackendError::Invalid("server: must not be empty".into()));
        }
        if self.port == Some(0) {
            return Err(BackendError::Invalid("port: must not be 0".into()));
        }
        if !self.export.starts_with('/') {
            return Err(BackendError::Invalid(format!(
                "export: must be an absolute path, got {}",
                crate::bounds::echo(&self.export)
            )));
        }
        if self.export.len() > EXPORT_MAX {
            return Err(BackendError::Invalid(format!(
                "export: longer than {EXPORT_MAX} bytes"
            )));
        }
        if self.export.contains('\0') {
            return Err(BackendError::Invalid(
                "export: must not contain a NUL byte".into(),
            ));
        }
        Ok(())
    }

    /// Runs `op` under one deadline; running out of it means the server did not answer.
    pub(super) async fn bounded<T>(
        &self,
        timeout: Duration,
        op: impl std::future::Future<Output = Result<T, BackendError>>,
    ) -> Result<T, BackendError> {
        match tokio::time::timeout(timeout, op).await {
            Ok(r) => r,
            Err(_) => Err(BackendError::Unavailable(format!(
                "NFS server {} did not answer within {} s",
                self.server,
                fmt_secs(timeout)
            ))),
        }
    }

    /// The server's addresses, in resolver order (an IP literal is used as it is).
    pub(super) async fn addresses(&self) -> Result<Vec<IpAddr>, BackendError> {
        let host = self.server.trim();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        let found = tokio::net::lookup_host((host, 0u16)).await.map_err(|e| {
            BackendError::Unavailable(format!("cannot resolve NFS server {host:?}: {e}"))
        })?;
        let mut ips: Vec<IpAddr> = Vec::new();
        for a in found {
            if !ips.contains(&a.ip()) {
                ips.push(a.ip());
            }
        }
        if ips.is_empty() {
            return Err(BackendError::Unavailable(format!(
                "NFS server name {host:?} resolves to no address"
            )));
        }
        Ok(ips)
    }
}

/// Checks a volume name: one conservative path component, so it can never address anything
/// outside the export root.
pub fn validate_name(name: &str) -> Result<(), BackendError> {
    let bad = |why: &str| Err(BackendError::Invalid(format!("name: {why}")));
    if name.is_empty() {
        return bad("must not be empty");
    }
    if name.len() > NAME_MAX {
        return bad(&format!(
            "must be at most {NAME_MAX} bytes, is {}",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return bad(&format!("{name:?} is not a directory name"));
    }
    if name.contains('/') {
        return bad(&format!(
            "{name:?} must be a single path component (no '/')"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return bad(&format!(
            "{name:?} contains {c:?}; allowed are A-Z a-z 0-9 . _ -"
        ));
    }
    Ok(())
}

pub(super) fn validate_mode(mode: u32) -> Result<(), BackendError> {
    if mode > 0o7777 {
        return Err(BackendError::Invalid(format!(
            "mode: {mode:o} is not a permission mode (at most 7777 octal)"
        )));
    }
    Ok(())
}

/// `3` for whole seconds, `1.5` otherwise.
pub(super) fn fmt_secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        d.as_secs().to_string()
    } else {
        format!("{:.1}", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid(r: Result<(), BackendError>) -> String {
        match r {
            Err(BackendError::Invalid(m)) => m,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn names_are_single_conservative_components() {
        for ok in ["pvc-1234", "a", "A.b_c-9", &"x".repeat(255), "..a", "a.."] {
            assert!(validate_name(ok).is_ok(), "{ok:?} should be accepted");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "/a",
            "a/",
            "a b",
            "ä",
            "a\0b",
            "a\\b",
            "a:b",
            "*",
            &"x".repeat(256),
        ] {
            let m = invalid(validate_name(bad));
            assert!(m.starts_with("name: "), "{bad:?}: {m}");
        }
        assert!(invalid(validate_name("")).contains("empty"));
        assert!(invalid(validate_name("a/b")).contains('/'));
        assert!(invalid(validate_name(&"x".repeat(256))).contains("255"));
    }

    #[test]
    fn shares_are_checked_before_any_network_use() {
        let good = NfsShare {
            server: "10.0.0.1".into(),
            port: None,
            export: "/export".into(),
        };
        assert!(good.validate().is_ok());
        let with = |f: &dyn Fn(&mut NfsShare)| {
            let mut s = good.clone();
            f(&mut s);
            invalid(s.validate())
        };
        assert!(with(&|s| s.server = " ".into()).starts_with("server:"));
        assert!(with(&|s| s.port = Some(0)).starts_with("port:"));
        assert!(with(&|s| s.export = "export".into()).starts_with("export:"));
        assert!(with(&|s| s.export = format!("/{}", "e".repeat(1024))).starts_with("export:"));
    }

    #[test]
    fn modes_are_permission_bits_only() {
        assert!(validate_mode(0o777).is_ok());
        assert!(validate_mode(0o7777).is_ok());
        assert!(invalid(validate_mode(0o10000)).starts_with("mode:"));
    }

    #[test]
    fn seconds_are_printed_plainly() {
        assert_eq!(fmt_secs(Duration::from_secs(3)), "3");
        assert_eq!(fmt_secs(Duration::from_millis(1500)), "1.5");
    }

    #[test]
    fn operations_are_send_so_a_multi_threaded_runtime_can_spawn_them() {
        fn assert_send<T: Send>(_: &T) {}
        let share = NfsShare {
            server: "10.0.0.1".into(),
            port: None,
            export: "/export".into(),
        };
        let t = Duration::from_secs(1);
        assert_send(&share.create_dir("a", t));
        assert_send(&share.dir_exists("a", t));
        assert_send(&share.delete_dir("a", OnDelete::Delete, t));
    }

    #[tokio::test]
    async fn bad_input_is_rejected_before_any_network_use() {
        // Loopback only, and a 1 ms budget: validation alone must produce these answers.
        let share = NfsShare {
            server: "127.0.0.1".into(),
            port: None,
            export: "/export".into(),
        };
        let t = Duration::from_millis(1);
        let m = invalid(share.create_dir("../x", t).await);
        assert!(m.starts_with("name:"), "{m}");
        assert!(matches!(
            share.dir_exists("", t).await,
            Err(BackendError::Invalid(_))
        ));
        assert!(matches!(
            share.delete_dir("a/b", OnDelete::Retain, t).await,
            Err(BackendError::Invalid(_))
        ));
        // Retain touches nothing, so it succeeds without a reachable server.
        assert!(share.delete_dir("a", OnDelete::Retain, t).await.is_ok());
    }
}
