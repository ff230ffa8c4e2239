//! The SMB controller backend: creates, probes and removes a volume's directory on an SMB
//! share with Samba's `smbclient` CLI, one short-lived process per step. That is all user
//! space: no mount and no privilege, only the CLI (Debian's `smbclient`) and an account on
//! the share.
//!
//! Why `smbclient` and not a library: no maintained pure-Rust SMB2/3 client with signing and
//! encryption exists (`smb` and `pavao` are young or bind libsmbclient), and libsmbclient
//! would put Samba's C code into the controller's own process; the CLI keeps it in a child
//! that a deadline can kill, as the CephFS backend does with `ceph`.
//!
//! Every process is hermetic and bounded: its own client config in a private temporary
//! directory (so it reads nothing from `/etc/samba` and writes no cache to `/run/samba` or
//! `/var/cache/samba`), name resolution by DNS/hosts only (no NetBIOS broadcast), port 445
//! only, Kerberos off, an empty environment but `PATH`, `--client-protection=encrypt` (SMB3
//! encryption, whatever `vers` the guests mount with), smbclient's own `--timeout` a little
//! under a hard deadline after which it is killed, and at most [`OUTPUT_MAX`] bytes of output
//! kept.
//!
//! **The password** never appears on a command line, in the environment, on disk or in an
//! error: it reaches `smbclient` in an authentication file that is a memfd the child inherits
//! (`--authentication-file /dev/fd/<n>`, see [`SecretFd`]), and every excerpt of its output
//! is scrubbed of it.
//!
//! Observed with smbclient and smbd 4.17.12 (Debian 12), and relied on here:
//! - `mkdir` reports failures on stdout and still exits 0; `-c` exits with the status of its
//!   *last* command. So every step ends with a command whose status says what it needs
//!   (`cd <dir>`: 0 when a directory is there), and failures are read from the
//!   `NT_STATUS_...` text.
//! - With `recurse` on, `mkdir a/b/c` creates missing parents and an existing directory is no
//!   error.
//! - `cd x` prints `cd \x\: NT_STATUS_OBJECT_NAME_NOT_FOUND` (missing) or
//!   `NT_STATUS_NOT_A_DIRECTORY` (a file) and exits 1.
//! - Wrong password, unknown user: `session setup failed: NT_STATUS_LOGON_FAILURE`; unknown
//!   share: `tree connect failed: NT_STATUS_BAD_NETWORK_NAME`; nothing listening:
//!   `do_connect: Connection to <ip> failed (Error NT_STATUS_CONNECTION_REFUSED)`; no host:
//!   `NT_STATUS_HOST_UNREACHABLE`; an unresolvable name: `NT_STATUS_UNSUCCESSFUL` from
//!   `do_connect`; a server without SMB3 encryption: `Encryption required and server doesn't
//!   support SMB3 encryption - failing connect`.
//! - The authentication file drops leading white space from a password; `PASSWD_FD` keeps it
//!   but reads at most 127 bytes (and complains on stderr when it reads the descriptor a
//!   second time, harmlessly). So a password starting with white space goes by `PASSWD_FD`.
//! - **`deltree` follows what the server presents as a directory**, and Samba presents a
//!   symlink to a directory as one (`follow symlinks = yes`, the default): a server-side
//!   symlink inside a volume to another directory of the share gets that directory's content
//!   deleted. Clients cannot create such links over SMB2/3 without POSIX extensions (which
//!   CNFS's option allowlist does not offer), so only someone with shell access to the server
//!   can; set `follow symlinks = no` on shares for CNFS volumes to rule it out (then such a
//!   link is invisible to clients and the delete fails with `NT_STATUS_DIRECTORY_NOT_EMPTY`
//!   instead). See `configs/csi/README.md`.
//!
//! Its parts: `client.rs` (share, account, the directory operations), `sizes.rs` (a luks2
//! volume's recorded sizes), `run.rs` (running `smbclient`), `status.rs` (reading what it
//! printed); the provisioner is here.

mod client;
mod run;
mod sizes;
mod status;

pub use client::{check_path, SmbClient, SmbCredentials, SmbShare};
pub use run::PROGRAM;

use std::collections::HashMap;

use cnfs_protocols::spec::{FsKind, VolumeSpec};

use crate::backend::{BackendError, Context, CreateRequest, Created, OnDelete, Plan, Provisioner};

/// StorageClass parameters of an SMB class, `fs` included.
pub const PARAMETERS: &[&str] = &["fs", "server", "share", "subDir", "vers", "onDelete"];

/// One SMB volume: the directory `dir` (a path inside the share) and what DeleteVolume does
/// with it. Everything `DeleteVolume` needs is in its id:
/// `<onDelete>#<server>#<share>#<dir>` (after the controller's `smb#`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmbVolume {
    pub share: SmbShare,
    pub dir: String,
    pub on_delete: OnDelete,
}

/// A StorageClass's SMB volume: where it goes, and the `source` the node side mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedVolume {
    pub volume: SmbVolume,
    /// `smb://server/share/<dir>[?vers=...]`, checked as the node side will check it.
    pub source: String,
}

impl SmbVolume {
    /// Volume `name` (already a safe backend name) of a StorageClass with SMB parameters
    /// `p` (`server`, `share`, optional `subDir`, `vers`, `onDelete`); errors name the
    /// parameter.
    pub fn plan(name: &str, p: &HashMap<String, String>) -> Result<PlannedVolume, BackendError> {
        let get = |k: &str| p.get(k).map(String::as_str).unwrap_or_default();
        let required = |k: &str| {
            if get(k).is_empty() {
                Err(BackendError::Invalid(format!(
                    "parameters.{k}: is required"
                )))
            } else {
                Ok(get(k).to_string())
            }
        };
        let share = SmbShare {
            server: required("server")?,
            share: required("share")?,
        };
        share
            .validate()
            .map_err(|e| BackendError::Invalid(format!("parameters.{e}")))?;
        let on_delete = match p.get("onDelete").map(String::as_str) {
            None => OnDelete::default(),
            Some("retain") => OnDelete::Retain,
            Some("delete") => OnDelete::Delete,
            Some(v) => {
                return Err(BackendError::Invalid(format!(
                    "parameters.onDelete: {} is not retain or delete",
                    crate::bounds::echo(v)
                )))
            }
        };
        let sub = get("subDir").trim_matches('/');
        let dir = if sub.is_empty() {
            name.to_string()
        } else {
            check_path("parameters.subDir", sub)?;
            format!("{sub}/{name}")
        };
        check_path("name", &dir)?;
        let mut source = format!("smb://{}/{}/{dir}", share.server, share.share);
        if let Some(v) = p.get("vers").filter(|v| !v.is_empty()) {
            // A dialect number only: anything else would add to the URL's query.
            if !v.chars().all(|c| c.is_ascii_digit() || c == '.') {
                return Err(BackendError::Invalid(format!(
                    "parameters.vers: {} is not an SMB version such as 3.1.1",
                    crate::bounds::echo(v)
                )));
            }
            source.push_str(&format!("?vers={v}"));
        }
        // The node side will hold the source to the same rules: check it now, not at mount.
        let checked = cnfs_protocols::volume_url::parse("check", &source).and_then(|u| {
            VolumeSpec::from_wire_unresolved(&u.wire)
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        if let Err(why) = checked {
            return Err(BackendError::Invalid(format!(
                "parameters: {} is not a valid CNFS volume: {why}",
                crate::bounds::echo(&source)
            )));
        }
        Ok(PlannedVolume {
            volume: SmbVolume {
                share,
                dir,
                on_delete,
            },
            source,
        })
    }

    /// `<onDelete>#<server>#<share>#<dir>`.
    pub fn id_fields(&self) -> String {
        format!(
            "{}#{}#{}#{}",
            self.on_delete.as_str(),
            self.share.server,
            self.share.share,
            self.dir
        )
    }

    /// The inverse of [`SmbVolume::id_fields`]; `None` for anything this backend never made.
    pub fn from_id_fields(fields: &str) -> Option<Self> {
        let parts: Vec<&str> = fields.split('#').collect();
        let [on_delete, server, share, dir] = parts.as_slice() else {
            return None;
        };
        let on_delete = match *on_delete {
            "retain" => OnDelete::Retain,
            "delete" => OnDelete::Delete,
            _ => return None,
        };
        let v = SmbVolume {
            share: SmbShare {
                server: server.to_string(),
                share: share.to_string(),
            },
            dir: dir.to_string(),
            on_delete,
        };
        (v.share.validate().is_ok() && check_path("dir", &v.dir).is_ok()).then_some(v)
    }
}

/// SMB volumes: a directory each on an admin-named share (optionally below `subDir`), made
/// with the provisioner secret's account; no quota.
pub struct Smb;

impl Smb {
    fn client<'a>(
        ctx: &Context<'_>,
        share: &'a SmbShare,
        creds: &'a SmbCredentials,
    ) -> Result<SmbClient<'a>, BackendError> {
        Ok(SmbClient::new(share, creds)?.with_timeout(ctx.timeout))
    }
}

#[tonic::async_trait]
impl Provisioner for Smb {
    fn name(&self) -> &'static str {
        FsKind::Smb.name()
    }

    fn parameters(&self) -> &'static [&'static str] {
        PARAMETERS
    }

    fn plan(&self, _: &Context<'_>, req: &CreateRequest<'_>) -> Result<Plan, BackendError> {
        let planned = SmbVolume::plan(req.name, req.parameters)?;
        Ok(Plan {
            id_fields: planned.volume.id_fields(),
            id_from: "server, share and subDir",
            source: Some(planned.source),
        })
    }

    async fn create(
        &self,
        ctx: &Context<'_>,
        req: &CreateRequest<'_>,
    ) -> Result<Created, BackendError> {
        let planned = SmbVolume::plan(req.name, req.parameters)?;
        let creds = SmbCredentials::from_secrets("secrets", req.secrets)?;
        let v = &planned.volume;
        Self::client(ctx, &v.share, &creds)?
            .create_dir(&v.dir)
            .await?;
        Ok(Created {
            capacity_bytes: 0,
            source: planned.source,
        })
    }

    fn owns(&self, fields: &str) -> bool {
        SmbVolume::from_id_fields(fields).is_some()
    }

    async fn delete(
        &self,
        ctx: &Context<'_>,
        fields: &str,
        secrets: &HashMap<String, String>,
    ) -> Result<(), BackendError> {
        let Some(v) = SmbVolume::from_id_fields(fields) else {
            return Ok(());
        };
        // A retained volume needs no connection, so no secret either.
        if v.on_delete == OnDelete::Retain {
            return Ok(());
        }
        let creds = SmbCredentials::from_secrets("secrets", secrets)?;
        Self::client(ctx, &v.share, &creds)?
            .delete_dir(&v.dir, v.on_delete)
            .await
    }

    async fn exists(
        &self,
        ctx: &Context<'_>,
        fields: &str,
        secrets: &HashMap<String, String>,
    ) -> Result<bool, BackendError> {
        let Some(v) = SmbVolume::from_id_fields(fields) else {
            return Ok(false);
        };
        let creds = SmbCredentials::from_secrets("secrets", secrets)?;
        Self::client(ctx, &v.share, &creds)?
            .dir_exists(&v.dir)
            .await
    }

    async fn expand(
        &self,
        _: &Context<'_>,
        _: &str,
        _: &HashMap<String, String>,
        _: u64,
    ) -> Result<Option<u64>, BackendError> {
        Err(BackendError::FailedPrecondition(
            "smb volumes have no quota to grow (use a StorageClass without allowVolumeExpansion)"
                .into(),
        ))
    }

    /// The new size is an empty directory `cnfs-volume.size.<bytes>` beside the container,
    /// which the guest reads at its next mount (see [`SmbClient::record_container_size`]),
    /// made with the controller-expand secret's account.
    async fn expand_luks2(
        &self,
        ctx: &Context<'_>,
        fields: &str,
        secrets: &HashMap<String, String>,
        size: u64,
    ) -> Result<Option<u64>, BackendError> {
        let Some(v) = SmbVolume::from_id_fields(fields) else {
            return Ok(None);
        };
        if secrets.is_empty() {
            return Err(BackendError::Invalid(
                "secrets: growing an SMB volume writes its new size on the share, which takes \
                 the SMB account (username, password): name its secret in the StorageClass's \
                 csi.storage.k8s.io/controller-expand-secret-name and \
                 csi.storage.k8s.io/controller-expand-secret-namespace"
                    .into(),
            ));
        }
        let creds = SmbCredentials::from_secrets("secrets", secrets)?;
        Self::client(ctx, &v.share, &creds)?
            .record_container_size(&v.dir, size)
            .await
    }
}

/// What the SMB backend's test modules share: a secret map, valid credentials, a share.
#[cfg(test)]
pub(super) mod fixtures {
    use std::collections::HashMap;

    use super::{SmbClient, SmbCredentials, SmbShare};

    pub const PASSWORD: &str = "correct horse;battery=staple";

    pub fn secrets(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    pub fn creds() -> SmbCredentials {
        SmbCredentials::from_secrets(
            "secrets",
            &secrets(&[("username", "alice"), ("password", PASSWORD)]),
        )
        .expect("valid")
    }

    pub fn share() -> SmbShare {
        SmbShare {
            server: "127.0.0.1".into(),
            share: "data".into(),
        }
    }

    /// A stand-in for `smbclient`: `sh -c SCRIPT fake-smbclient <our arguments>`.
    pub fn fake<'a>(s: &'a SmbShare, c: &'a SmbCredentials, script: &str) -> SmbClient<'a> {
        SmbClient::new(s, c).expect("valid").with_command(&[
            "/bin/sh",
            "-c",
            script,
            "fake-smbclient",
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{secrets, share};
    use super::*;

    fn invalid<T: std::fmt::Debug>(r: Result<T, BackendError>) -> String {
        match r {
            Err(BackendError::Invalid(m)) => m,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn storage_class_parameters_plan_a_directory_and_a_checked_source() {
        let p = |pairs: &[(&str, &str)]| secrets(pairs);
        let base = [("fs", "smb"), ("server", "10.0.0.9"), ("share", "data")];
        let v = SmbVolume::plan("pvc-1", &p(&base)).expect("plan");
        assert_eq!(v.volume.dir, "pvc-1");
        assert_eq!(v.volume.on_delete, OnDelete::Delete);
        assert_eq!(v.source, "smb://10.0.0.9/data/pvc-1");
        let mut more = base.to_vec();
        more.extend([
            ("subDir", "/k8s/vols/"),
            ("vers", "3.0"),
            ("onDelete", "retain"),
        ]);
        let v = SmbVolume::plan("pvc-2", &p(&more)).expect("plan");
        assert_eq!(v.volume.dir, "k8s/vols/pvc-2");
        assert_eq!(v.volume.on_delete, OnDelete::Retain);
        assert_eq!(v.source, "smb://10.0.0.9/data/k8s/vols/pvc-2?vers=3.0");
        for (extra, field) in [
            (("server", ""), "parameters.server:"),
            (("share", ""), "parameters.share:"),
            (("share", "a#b"), "parameters.share:"),
            (("server", "h#x"), "parameters.server:"),
            (("subDir", "a/../b"), "parameters.subDir:"),
            (("onDelete", "archive"), "parameters.onDelete:"),
            (("vers", "1.0"), "parameters:"),
        ] {
            let mut q = base.to_vec();
            q.retain(|(k, _)| *k != extra.0);
            q.push(extra);
            let m = invalid(SmbVolume::plan("pvc-3", &p(&q)));
            assert!(m.starts_with(field), "{extra:?}: {m}");
        }
    }

    #[test]
    fn a_storage_class_vers_carries_a_version_and_no_other_option() {
        // `vers` goes into the source URL: it must not smuggle in options or a secret
        // reference that the parameter list does not offer.
        let base = [("fs", "smb"), ("server", "10.0.0.9"), ("share", "data")];
        for vers in [
            "3.0&noseal",
            "3.1.1&uid=0&noperm",
            "3.0&secret=other",
            "3.0?x",
        ] {
            let mut q = base.to_vec();
            q.push(("vers", vers));
            let m = invalid(SmbVolume::plan("pvc-4", &secrets(&q)));
            assert!(m.starts_with("parameters.vers:"), "{vers}: {m}");
        }
        for vers in ["2.1", "3.0", "3.02", "3.1.1"] {
            let mut q = base.to_vec();
            q.push(("vers", vers));
            let v = SmbVolume::plan("pvc-4", &secrets(&q)).expect(vers);
            assert_eq!(v.source, format!("smb://10.0.0.9/data/pvc-4?vers={vers}"));
        }
    }

    #[test]
    fn ids_round_trip_and_foreign_ids_are_none() {
        let v = SmbVolume {
            share: share(),
            dir: "k8s/pvc-1".into(),
            on_delete: OnDelete::Retain,
        };
        assert_eq!(v.id_fields(), "retain#127.0.0.1#data#k8s/pvc-1");
        assert_eq!(SmbVolume::from_id_fields(&v.id_fields()), Some(v));
        for foreign in [
            "",
            "delete#h#s",
            "archive#h#s#d",
            "delete#h#s#../d",
            "delete#h#s#d#e",
            "delete#h x#s#d",
        ] {
            assert_eq!(SmbVolume::from_id_fields(foreign), None, "{foreign}");
        }
    }
}
