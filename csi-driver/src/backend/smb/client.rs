//! A share, an account, and the three operations on a volume directory (create with its
//! parents, probe, delete), each one or two `smbclient` runs read by their `NT_STATUS_...`.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use cnfs_protocols::agent;
use cnfs_protocols::spec::{FsKind, SpecError, VolumeSpec};

use crate::backend::{BackendError, OnDelete, DEFAULT_TIMEOUT};

use super::run::PROGRAM;
use super::status::{is_missing, nt_statuses};

/// Longest path component (`NAME_MAX` on Linux servers; Windows allows 255 too).
pub(super) const NAME_MAX: usize = 255;

/// Longest directory path inside the share.
pub(super) const PATH_MAX: usize = 1024;

/// Longest share name (as the volume spec allows).
pub(super) const SHARE_MAX: usize = 80;

/// Longest password `PASSWD_FD` reads.
pub(super) const PASSWD_FD_MAX: usize = 127;

/// A share on an SMB server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmbShare {
    /// IPv4 address or DNS name (port 445).
    pub server: String,
    pub share: String,
}

impl SmbShare {
    /// Both go into `//server/share`: only characters that cannot change its meaning.
    pub fn validate(&self) -> Result<(), BackendError> {
        let s = &self.server;
        if s.is_empty() || s.len() > 253 {
            return Err(BackendError::Invalid(
                "server: must be 1 to 253 characters".into(),
            ));
        }
        if s.contains(':') {
            return Err(BackendError::Invalid(format!(
                "server: {} looks like an IPv6 address or has a port; the SMB backend takes an \
                 IPv4 address or a DNS name (port 445)",
                crate::bounds::echo(s)
            )));
        }
        if s.starts_with(['-', '.'])
            || !s
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        {
            return Err(BackendError::Invalid(format!(
                "server: {} is not an IPv4 address or DNS name",
                crate::bounds::echo(s)
            )));
        }
        let sh = &self.share;
        if sh.is_empty() || sh.len() > SHARE_MAX {
            return Err(BackendError::Invalid(format!(
                "share: must be 1 to {SHARE_MAX} characters"
            )));
        }
        if sh.starts_with('-')
            || !sh
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.$".contains(c))
        {
            return Err(BackendError::Invalid(format!(
                "share: {} has characters outside A-Z a-z 0-9 - _ . $",
                crate::bounds::echo(sh)
            )));
        }
        Ok(())
    }

    /// `//server/share`.
    pub fn unc(&self) -> String {
        format!("//{}/{}", self.server, self.share)
    }
}

/// An SMB account: user, password and optional domain. The password is private and never
/// shown.
#[derive(Clone)]
pub struct SmbCredentials {
    pub username: String,
    pub(super) password: String,
    pub domain: String,
}

impl fmt::Debug for SmbCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmbCredentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("domain", &self.domain)
            .finish()
    }
}

impl SmbCredentials {
    /// From a CSI secret (`field` names it, e.g. `secrets`): keys `username`, `password` and
    /// optionally `domain`; any other key is refused by name. The values are held to the
    /// rules the node side applies to the same secret (`protocols`' SMB spec), and no error
    /// shows a value.
    pub fn from_secrets(
        field: &str,
        secrets: &HashMap<String, String>,
    ) -> Result<Self, BackendError> {
        let invalid = |e: SpecError| BackendError::Invalid(e.to_string());
        let creds = FsKind::Smb
            .credentials_from_map(field, secrets.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .map_err(invalid)?;
        // The node side's checks, on a stand-in volume that carries only these credentials.
        let mut w = agent::VolumeSpec {
            name: "check".into(),
            ..Default::default()
        };
        w.set_smb(agent::SmbSource {
            server: "127.0.0.1".into(),
            share: "check".into(),
            ..Default::default()
        });
        FsKind::Smb
            .apply_credentials(field, &mut w, &creds)
            .map_err(invalid)?;
        if let Err(e) = VolumeSpec::from_wire(&w) {
            let key = e.field.strip_prefix("volume.smb.").unwrap_or(&e.field);
            return Err(BackendError::Invalid(format!(
                "{field}.{key}: {}",
                e.reason
            )));
        }
        let get = |k: &str| creds.get(k).unwrap_or_default().to_string();
        let password = get("password");
        if password.starts_with([' ', '\t']) && password.len() > PASSWD_FD_MAX {
            return Err(BackendError::Invalid(format!(
                "{field}.password: starts with white space and is longer than {PASSWD_FD_MAX} \
                 bytes, which smbclient cannot take (value not shown)"
            )));
        }
        Ok(SmbCredentials {
            username: get("username"),
            password,
            domain: get("domain"),
        })
    }

    /// The authentication file's text, and whether the password has to go by `PASSWD_FD`
    /// instead (the file would lose its leading white space).
    pub(super) fn auth_file(&self) -> (String, bool) {
        let mut text = format!("username = {}\n", self.username);
        let by_fd = self.password.starts_with([' ', '\t']);
        if !by_fd {
            text.push_str(&format!("password = {}\n", self.password));
        }
        if !self.domain.is_empty() {
            text.push_str(&format!("domain = {}\n", self.domain));
        }
        (text, by_fd)
    }
}

/// The directories of one share, as one account sees them.
#[derive(Debug)]
pub struct SmbClient<'a> {
    pub(super) share: &'a SmbShare,
    pub(super) creds: &'a SmbCredentials,
    pub(super) timeout: Duration,
    /// `["smbclient"]`; tests put a fake in front: program and leading arguments.
    pub(super) command: Vec<String>,
}

/// What `cd <dir>` found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Probe {
    Dir,
    Missing,
    NotDir,
}

impl<'a> SmbClient<'a> {
    /// Checks the share up front, so no invalid value ever reaches a command line. Each
    /// `smbclient` run is bounded by [`DEFAULT_TIMEOUT`] (see [`SmbClient::with_timeout`]).
    pub fn new(share: &'a SmbShare, creds: &'a SmbCredentials) -> Result<Self, BackendError> {
        share.validate()?;
        Ok(SmbClient {
            share,
            creds,
            timeout: DEFAULT_TIMEOUT,
            command: vec![PROGRAM.to_string()],
        })
    }

    /// Bound on each `smbclient` run (an operation runs one to three). At least 1 s.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.max(Duration::from_secs(1));
        self
    }

    /// Creates directory `path` (`a/b/name`, relative to the share root), and its missing
    /// parents. Idempotent: an existing directory is `Ok` (left as it is); an existing
    /// non-directory is [`BackendError::Invalid`]. The directory belongs to the account and
    /// gets the share's default permissions for new directories.
    pub async fn create_dir(&self, path: &str) -> Result<(), BackendError> {
        check_path("path", path)?;
        let what = format!("creating {}", self.full(path));
        let ran = self
            .run(&format!("recurse; mkdir \"{path}\"; cd \"{path}\""))
            .await
            .map_err(|f| f.into_error(&what))?;
        // `cd` comes last: its status is the exit code.
        if ran.code == Some(0) {
            return Ok(());
        }
        let statuses = nt_statuses(&ran.text);
        if statuses.last() == Some(&"NT_STATUS_NOT_A_DIRECTORY") {
            return Err(not_a_dir(&self.full(path)));
        }
        Err(ran.failure().into_error(&what))
    }

    /// Whether `path` exists as a directory.
    pub async fn dir_exists(&self, path: &str) -> Result<bool, BackendError> {
        check_path("path", path)?;
        Ok(self.probe(path).await? == Probe::Dir)
    }

    /// Applies `on_delete` to directory `path`:
    /// - `Retain`: nothing (not even a connection).
    /// - `Delete`: removes the directory and everything below it (`deltree`; see the module
    ///   notes on symlinks).
    /// - `Archive`: refused ([`BackendError::Invalid`]); SMB volumes are retained or deleted.
    ///
    /// Idempotent: a missing directory is `Ok`. A non-directory at `path` is
    /// [`BackendError::Invalid`] (it was not made by this backend, so it is left alone).
    pub async fn delete_dir(&self, path: &str, on_delete: OnDelete) -> Result<(), BackendError> {
        check_path("path", path)?;
        match on_delete {
            OnDelete::Retain => return Ok(()),
            OnDelete::Archive => {
                return Err(BackendError::Invalid(
                    "onDelete: archive is not supported for SMB volumes (retain or delete)".into(),
                ))
            }
            OnDelete::Delete => {}
        }
        match self.probe(path).await? {
            Probe::Missing => return Ok(()),
            Probe::NotDir => return Err(not_a_dir(&self.full(path))),
            Probe::Dir => {}
        }
        let what = format!("deleting {}", self.full(path));
        let ran = self
            .run(&format!("deltree \"{path}\""))
            .await
            .map_err(|f| f.into_error(&what))?;
        let statuses = nt_statuses(&ran.text);
        match statuses.first() {
            None if ran.code == Some(0) => Ok(()),
            // Deleted by someone else meanwhile: gone either way.
            Some(s) if is_missing(s) => Ok(()),
            _ => Err(ran.failure().into_error(&what)),
        }
    }

    /// `cd <path>`: a directory, nothing, or something else.
    pub(super) async fn probe(&self, path: &str) -> Result<Probe, BackendError> {
        let what = format!("looking up {}", self.full(path));
        let ran = self
            .run(&format!("cd \"{path}\""))
            .await
            .map_err(|f| f.into_error(&what))?;
        if ran.code == Some(0) {
            return Ok(Probe::Dir);
        }
        match nt_statuses(&ran.text).last() {
            Some(&"NT_STATUS_NOT_A_DIRECTORY") => Ok(Probe::NotDir),
            Some(s) if is_missing(s) => Ok(Probe::Missing),
            _ => Err(ran.failure().into_error(&what)),
        }
    }

    /// `//server/share/path` for messages.
    pub(super) fn full(&self, path: &str) -> String {
        format!("{}/{path}", self.share.unc())
    }
}

pub(super) fn not_a_dir(full: &str) -> BackendError {
    BackendError::Invalid(format!(
        "name: {full} exists and is not a directory; leaving it alone"
    ))
}

/// A directory path inside the share: `/`-separated components of A-Z a-z 0-9 . _ -, none
/// of them `.` or `..`, so it can never address anything outside the share nor bend a
/// smbclient command (no quotes, `;` or wildcards).
pub fn check_path(field: &str, path: &str) -> Result<(), BackendError> {
    let bad = |why: String| Err(BackendError::Invalid(format!("{field}: {why}")));
    if path.is_empty() {
        return bad("must not be empty".into());
    }
    if path.len() > PATH_MAX {
        return bad(format!("is longer than {PATH_MAX} bytes"));
    }
    for c in path.split('/') {
        if c.is_empty() {
            return bad(format!(
                "{} has an empty component (leading, trailing or double '/')",
                crate::bounds::echo(path)
            ));
        }
        if c == "." || c == ".." {
            return bad(format!(
                "{} has a {c:?} component",
                crate::bounds::echo(path)
            ));
        }
        if c.len() > NAME_MAX {
            return bad(format!("a component is longer than {NAME_MAX} bytes"));
        }
        if let Some(ch) = c
            .chars()
            .find(|ch| !(ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '-')))
        {
            return bad(format!(
                "{} contains {ch:?} (allowed: A-Z a-z 0-9 . _ - and '/' between components)",
                crate::bounds::echo(path)
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::smb::fixtures::{creds, fake, secrets, share, PASSWORD};

    fn invalid<T: fmt::Debug>(r: Result<T, BackendError>) -> String {
        match r {
            Err(BackendError::Invalid(m)) => m,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn secrets_are_read_by_key_checked_as_the_node_side_does_and_never_shown() {
        let c = creds();
        assert_eq!((c.username.as_str(), c.domain.as_str()), ("alice", ""));
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("horse") && shown.contains("alice"),
            "{shown}"
        );
        for (pairs, field, why) in [
            (
                vec![("username", "a"), ("password", "p"), ("userKey", "k")],
                "secrets.userKey",
                "username, password, domain",
            ),
            (vec![("username", "a")], "secrets.password", "is required"),
            (vec![("password", "p")], "secrets.username", "is required"),
            (
                vec![("username", "al,ice"), ("password", PASSWORD)],
                "secrets.username",
                "value not shown",
            ),
            (
                vec![("username", "a"), ("password", "bad\nline pw")],
                "secrets.password",
                "control",
            ),
            (
                vec![("username", "a"), ("password", "p"), ("domain", "CO RP")],
                "secrets.domain",
                "not allowed",
            ),
        ] {
            let m = invalid(SmbCredentials::from_secrets("secrets", &secrets(&pairs)));
            assert!(m.starts_with(&format!("{field}:")), "{m}");
            assert!(m.contains(why), "{m}");
            assert!(!m.contains("line pw") && !m.contains(PASSWORD), "{m}");
        }
        let long_lead = format!(" {}", "x".repeat(200));
        let m = invalid(SmbCredentials::from_secrets(
            "secrets",
            &secrets(&[("username", "a"), ("password", &long_lead)]),
        ));
        assert!(
            m.starts_with("secrets.password:") && !m.contains("xxx"),
            "{m}"
        );
    }

    #[test]
    fn the_auth_file_carries_the_password_unless_it_starts_with_white_space() {
        let (text, by_fd) = creds().auth_file();
        assert_eq!(text, format!("username = alice\npassword = {PASSWORD}\n"));
        assert!(!by_fd);
        let c = SmbCredentials::from_secrets(
            "secrets",
            &secrets(&[
                ("username", "bob"),
                ("password", " lead"),
                ("domain", "CORP"),
            ]),
        )
        .expect("valid");
        let (text, by_fd) = c.auth_file();
        assert_eq!(text, "username = bob\ndomain = CORP\n");
        assert!(by_fd);
    }

    #[test]
    fn shares_and_paths_are_checked_and_the_error_names_the_field() {
        assert!(share().validate().is_ok());
        for (server, share, field) in [
            ("", "data", "server:"),
            ("fd00::1", "data", "server:"),
            ("10.0.0.1:445", "data", "server:"),
            ("-oProxy", "data", "server:"),
            ("a/b", "data", "server:"),
            ("10.0.0.1", "", "share:"),
            ("10.0.0.1", "da ta", "share:"),
            ("10.0.0.1", "d/x", "share:"),
            ("10.0.0.1", "-d", "share:"),
            ("10.0.0.1", &"s".repeat(81), "share:"),
        ] {
            let s = SmbShare {
                server: server.into(),
                share: share.into(),
            };
            assert!(invalid(s.validate()).starts_with(field), "{s:?}");
        }
        for ok in ["pvc-1", "k8s/pvc-1", "a/b.c/d_e-9", "..a"] {
            assert!(check_path("p", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/a",
            "a/",
            "a//b",
            "..",
            "a/../b",
            "a b",
            "a;b",
            "a\"b",
            "a*",
            "ä",
            &"x".repeat(256),
        ] {
            assert!(invalid(check_path("p", bad)).starts_with("p: "), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn outcomes_are_read_from_the_output_not_only_the_exit_code() {
        let (s, c) = (share(), creds());
        // `mkdir` exits 0 on failure; the `cd` after it tells.
        let collision_on_file = r#"echo 'NT_STATUS_OBJECT_NAME_COLLISION making remote directory \pvc'; echo 'cd \pvc\: NT_STATUS_NOT_A_DIRECTORY'; exit 1"#;
        let m = invalid(fake(&s, &c, collision_on_file).create_dir("pvc").await);
        assert!(
            m.starts_with("name: //127.0.0.1/data/pvc exists and is not a directory"),
            "{m}"
        );
        let denied = r#"echo 'NT_STATUS_ACCESS_DENIED making remote directory \pvc'; echo 'cd \pvc\: NT_STATUS_OBJECT_NAME_NOT_FOUND'; exit 1"#;
        match fake(&s, &c, denied).create_dir("pvc").await {
            Err(BackendError::PermissionDenied(m)) => {
                assert!(m.contains("NT_STATUS_ACCESS_DENIED making"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        let exists =
            r#"echo 'NT_STATUS_OBJECT_NAME_COLLISION making remote directory \pvc'; exit 0"#;
        fake(&s, &c, exists)
            .create_dir("pvc")
            .await
            .expect("an existing directory is fine");
        let missing = r#"echo 'cd \pvc\: NT_STATUS_OBJECT_NAME_NOT_FOUND'; exit 1"#;
        assert!(!fake(&s, &c, missing)
            .dir_exists("pvc")
            .await
            .expect("probe"));
        fake(&s, &c, missing)
            .delete_dir("pvc", OnDelete::Delete)
            .await
            .expect("missing is deleted");
        let file = r#"echo 'cd \pvc\: NT_STATUS_NOT_A_DIRECTORY'; exit 1"#;
        assert!(!fake(&s, &c, file).dir_exists("pvc").await.expect("probe"));
        let m = invalid(fake(&s, &c, file).delete_dir("pvc", OnDelete::Delete).await);
        assert!(m.contains("leaving it alone"), "{m}");
        // deltree fails after the probe succeeded.
        let busy = r#"case "$*" in *deltree*) echo 'NT_STATUS_SHARING_VIOLATION deleting remote file \pvc\f'; exit 1;; esac; exit 0"#;
        match fake(&s, &c, busy).delete_dir("pvc", OnDelete::Delete).await {
            Err(BackendError::Failed(m)) => assert!(
                m.starts_with("deleting //127.0.0.1/data/pvc: NT_STATUS_SHARING_VIOLATION"),
                "{m}"
            ),
            other => panic!("{other:?}"),
        }
        // Retain connects to nothing; archive is not offered.
        let never = "echo ran >&2; exit 9";
        fake(&s, &c, never)
            .delete_dir("pvc", OnDelete::Retain)
            .await
            .expect("retain");
        assert!(invalid(
            fake(&s, &c, never)
                .delete_dir("pvc", OnDelete::Archive)
                .await
        )
        .starts_with("onDelete:"));
    }
}
