//! Running `ceph`: one bounded, hermetic process per command, the key in a memfd, and what it
//! printed on failure, scrubbed of the key, bounded and classified.

use std::process::Stdio;

use crate::backend::secret_fd::SecretFd;
use crate::backend::show_secs;
use crate::backend::BackendError;

use super::subvolumes::Subvolumes;

/// Longest stderr excerpt carried in an error.
pub(super) const EXCERPT_MAX: usize = 400;

impl<'a> Subvolumes<'a> {
    /// Runs `ceph <args>` as this client and returns its stdout, or the classified failure.
    pub(super) async fn run(&self, args: &[&str]) -> Result<String, Failure> {
        let unavailable = |detail: String| Failure {
            kind: Kind::Unavailable,
            text: format!(
                "the Ceph cluster at {} did not answer within {}{detail}",
                self.monitors(),
                show_secs(self.timeout)
            ),
        };
        let key = SecretFd::new("cephx-key", self.creds.key.as_bytes()).map_err(|e| Failure {
            kind: Kind::Failed,
            text: format!("cannot hand the key to ceph: {e}"),
        })?;
        // Ceph's own limits end a little before the hard deadline, so that in the usual case
        // ceph says what it was waiting for.
        let soft = self.timeout.as_secs().saturating_sub(1).max(1).to_string();
        let (program, leading) = self.command.split_first().ok_or_else(|| Failure {
            kind: Kind::Failed,
            text: "no ceph command configured".to_string(),
        })?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(leading)
            .args(["--conf", "/dev/null", "--keyring", "/dev/null", "-m"])
            .arg(self.monitors())
            .arg("--name")
            .arg(format!("client.{}", self.creds.id))
            .arg("--keyfile")
            .arg(key.path())
            .args(["--connect-timeout", &soft])
            .args(["--client_mount_timeout", &soft])
            .args(["--rados_mon_op_timeout", &soft])
            .args(args)
            .env_remove("CEPH_ARGS")
            .env_remove("CEPH_CONF")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        key.inherit_into(&mut cmd);
        let child = cmd.spawn().map_err(|e| Failure {
            kind: Kind::Failed,
            // The cnfs-csi image carries no Ceph CLI: say what is missing and where the fix is.
            text: format!(
                "cannot run {program} ({e}): the CephFS backend needs Ceph's `ceph` CLI \
                 (Debian's ceph-common), which the cnfs-csi image does not carry; run the \
                 controller from an image that has it (configs/csi/README.md, \"CephFS\")"
            ),
        })?;
        // The child has its own copy of the key file; ours goes now.
        drop(key);
        let out = match tokio::time::timeout(self.timeout, child.wait_with_output()).await {
            // Dropping the unfinished future drops the child: kill_on_drop SIGKILLs it.
            Err(_) => return Err(unavailable(String::new())),
            Ok(Err(e)) => {
                return Err(Failure {
                    kind: Kind::Failed,
                    text: format!("waiting for ceph: {e}"),
                })
            }
            Ok(Ok(out)) => out,
        };
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let text = excerpt(&stderr, &self.creds.key);
        let kind = classify(out.status.code(), &text);
        if kind == Kind::Unavailable {
            return Err(unavailable(format!(" ({text})")));
        }
        Err(Failure { kind, text })
    }

    /// Tests only: run another command (program and leading arguments) instead of `ceph`.
    #[cfg(test)]
    pub(super) fn with_command(mut self, command: &[&str]) -> Self {
        self.command = command.iter().map(|s| s.to_string()).collect();
        self
    }
}

/// How a failed `ceph` command is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    NotFound,
    PermissionDenied,
    Invalid,
    Unavailable,
    Failed,
}

/// A failed `ceph` command: its kind and the scrubbed, bounded excerpt of what it said (or,
/// for failures around the command, a description).
pub(super) struct Failure {
    pub(super) kind: Kind,
    pub(super) text: String,
}

impl Failure {
    /// `Error ENOENT: subvolume group 'g' does not exist`.
    pub(super) fn group_missing(&self) -> bool {
        self.kind == Kind::NotFound && self.text.contains("subvolume group")
    }

    /// `... subvolume 'x' does not exist` or a missing group, but not a missing file system
    /// (`FS 'f' not found`).
    pub(super) fn subvolume_or_group_missing(&self) -> bool {
        self.kind == Kind::NotFound && self.text.contains("does not exist")
    }

    /// The error for the caller: what was being done, then what went wrong.
    pub(super) fn into_error(self, what: &str) -> BackendError {
        let text = format!("{what}: {}", self.text);
        match self.kind {
            Kind::NotFound => BackendError::NotFound(text),
            Kind::PermissionDenied => BackendError::PermissionDenied(text),
            Kind::Invalid => BackendError::Invalid(text),
            Kind::Unavailable => BackendError::Unavailable(text),
            Kind::Failed => BackendError::Failed(text),
        }
    }
}

/// Sorts a failure by what `ceph` printed (already scrubbed) and its exit status. The text
/// comes first because the CLI exits 1 for many different things (a connect timeout, a bad
/// key); the status (the errno: 2, 13, 22, 110, ...) decides otherwise.
pub(super) fn classify(code: Option<i32>, text: &str) -> Kind {
    let lower = text.to_ascii_lowercase();
    let has = |s: &str| lower.contains(s);
    // Could not talk to the cluster at all: by the errno in `[errno N] ... (error connecting
    // to the cluster)`.
    if has("error connecting to the cluster") {
        return if has("[errno 13]") || has("[errno 1]") {
            Kind::PermissionDenied
        } else if has("[errno 22]") {
            Kind::Invalid
        } else {
            Kind::Unavailable
        };
    }
    if has("timed out") || has("etimedout") || has("eagain") || matches!(code, Some(110 | 11)) {
        Kind::Unavailable
    } else if has("enoent") || has("does not exist") || has("not found") || code == Some(2) {
        Kind::NotFound
    } else if has("eacces")
        || has("eperm")
        || has("access denied")
        || has("permission denied")
        || has("operation not permitted")
        || code == Some(13)
    {
        Kind::PermissionDenied
    } else if has("einval") || has("invalid command") || code == Some(22) {
        Kind::Invalid
    } else {
        Kind::Failed
    }
}

/// A bounded, key-free excerpt of `ceph`'s stderr: the key (and any log line about decoding
/// one) removed first, then the error lines (`Error E...:`, `[errno N] ...`,
/// `Invalid command`) ahead of log lines, without their time stamps, joined with "; " and cut
/// to [`EXCERPT_MAX`] characters.
pub(super) fn excerpt(stderr: &str, key: &str) -> String {
    let mut scrubbed = stderr.to_string();
    let unpadded = key.trim_end_matches('=');
    for k in [key, unpadded] {
        if !k.is_empty() {
            scrubbed = scrubbed.replace(k, "<key redacted>");
        }
    }
    let lines: Vec<String> = scrubbed
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| {
            if l.contains("decode key") {
                "auth: failed to decode the key".to_string()
            } else {
                without_log_prefix(l).to_string()
            }
        })
        .collect();
    let is_error = |l: &String| {
        l.starts_with("Error ")
            || l.starts_with("[errno")
            || l.starts_with("Invalid command")
            || l.starts_with("timed out")
    };
    let mut ordered: Vec<&String> = lines.iter().filter(|l| is_error(l)).collect();
    ordered.extend(lines.iter().filter(|l| !is_error(l)));
    ordered.dedup();
    let joined = ordered
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join("; ");
    if joined.chars().count() <= EXCERPT_MAX {
        return if joined.is_empty() {
            "(no message)".to_string()
        } else {
            joined
        };
    }
    let mut cut: String = joined.chars().take(EXCERPT_MAX - 1).collect();
    cut.push('…');
    cut
}

/// `2026-11-25T11:48:22.735+0000 7fd0937fe6c0 -1 monclient: ...` → `monclient: ...`.
pub(super) fn without_log_prefix(line: &str) -> &str {
    let mut parts = line.splitn(4, ' ');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(ts), Some(thread), Some(level), Some(rest))
            if ts.len() >= 20
                && ts.as_bytes().get(10) == Some(&b'T')
                && thread.chars().all(|c| c.is_ascii_hexdigit())
                && level.parse::<i32>().is_ok() =>
        {
            rest
        }
        _ => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cephfs::{CephCluster, CephCredentials};
    use std::time::Duration;
    use std::time::Instant;

    /// The shape of a real cephx key (not one of any cluster).
    const KEY: &str = "AQC5ygZr0XC1MRAAw+DVI46MO/nuqITDNz+buQ==";

    fn cluster() -> CephCluster {
        CephCluster {
            monitors: vec!["127.0.0.1:3300".into()],
            fsid: None,
        }
    }

    #[test]
    fn failures_are_classified_as_ceph_16_reports_them() {
        use Kind::*;
        for (code, text, kind) in [
            (2, "Error ENOENT: subvolume 'nope' does not exist", NotFound),
            (2, "Error ENOENT: subvolume group 'nogroup' does not exist", NotFound),
            (2, "Error ENOENT: FS 'nofs' not found", NotFound),
            (13, "Error EACCES: access denied: does your client key have mgr caps? See http://docs.ceph.com/en/latest/mgr/administrator/#client-authentication", PermissionDenied),
            (13, "[errno 13] RADOS permission denied (error connecting to the cluster); monclient(hunting): handle_auth_bad_method server allowed_methods [2] but i only support [2,1]", PermissionDenied),
            (1, "Error EPERM: not allowed", PermissionDenied),
            (22, "Error EINVAL: Invalid subvolume size", Invalid),
            (22, "Invalid command: invalid chars   in bad name; Error EINVAL: invalid command", Invalid),
            (1, "[errno 22] RADOS invalid argument (error connecting to the cluster); auth: failed to decode the key", Invalid),
            (1, "timed out", Unavailable),
            (1, "[errno 110] RADOS timed out (error connecting to the cluster); monclient(hunting): authenticate timed out after 4", Unavailable),
            (110, "Error ETIMEDOUT: Connection timed out. Please check the client's permission and connection.", Unavailable),
            (11, "Error EAGAIN: the volumes module is busy", Unavailable),
            (39, "Error ENOTEMPTY: subvolume 'x' has snapshots", Failed),
            (1, "something else", Failed),
        ] {
            assert_eq!(classify(Some(code), text), kind, "{code} {text}");
        }
        assert_eq!(classify(None, ""), Failed);
        let missing = |text: &str| Failure {
            kind: classify(Some(2), text),
            text: text.into(),
        };
        assert!(missing("Error ENOENT: subvolume group 'g' does not exist").group_missing());
        assert!(!missing("Error ENOENT: subvolume 'x' does not exist").group_missing());
        assert!(missing("Error ENOENT: subvolume 'x' does not exist").subvolume_or_group_missing());
        assert!(!missing("Error ENOENT: FS 'nofs' not found").subvolume_or_group_missing());
    }

    #[test]
    fn stderr_excerpts_lose_the_key_and_stay_short() {
        // What ceph 16.2 prints for a key it cannot decode (it quotes the key).
        let stderr = format!(
            "2026-11-25T11:51:45.460+0000 7f2d1779d6c0 -1 auth: failed to decode key '{KEY}'\n\n\
             2026-11-25T11:51:45.464+0000 7f2d1779d6c0 -1 monclient: keyring not found\n\n\
             [errno 22] RADOS invalid argument (error connecting to the cluster)\n\
             echoed again: {KEY} and without padding {}\n",
            KEY.trim_end_matches('=')
        );
        let e = excerpt(&stderr, KEY);
        assert!(
            !e.contains(KEY) && !e.contains(KEY.trim_end_matches('=')),
            "{e}"
        );
        assert!(
            e.starts_with("[errno 22] RADOS invalid argument (error connecting to the cluster); auth: failed to decode the key; monclient: keyring not found"),
            "{e}"
        );
        assert!(e.contains("<key redacted>"), "{e}");
        // Bounded, also when the key sits right at the cut.
        let long = format!("Error EIO: {}{KEY}{}", "x".repeat(380), "y".repeat(600));
        let e = excerpt(&long, KEY);
        assert!(e.chars().count() <= EXCERPT_MAX, "{}", e.len());
        assert!(!e.contains(&KEY[..10]), "{e}");
        assert_eq!(excerpt("", KEY), "(no message)");
        assert_eq!(
            without_log_prefix(
                "2026-11-25T11:48:22.735+0000 7fd0937fe6c0 -1 monclient(hunting): x"
            ),
            "monclient(hunting): x"
        );
        assert_eq!(
            without_log_prefix("Error ENOENT: a b c"),
            "Error ENOENT: a b c"
        );
    }

    /// A stand-in for `ceph`: `sh -c SCRIPT fake-ceph <our arguments>`.
    fn fake<'a>(c: &'a CephCluster, creds: &'a CephCredentials, script: &str) -> Subvolumes<'a> {
        Subvolumes::new(c, creds, "cephfs", "csi")
            .expect("valid")
            .with_command(&["/bin/sh", "-c", script, "fake-ceph"])
    }

    #[tokio::test]
    async fn the_key_reaches_ceph_only_as_an_inherited_memfd_and_is_scrubbed_from_errors() {
        // The fake finds --keyfile, checks it is a memfd under /dev/fd, reads it, looks for
        // the key in its own command line and environment, then echoes the key to stderr as
        // ceph does for a key it cannot decode.
        let script = r#"
            while [ $# -gt 0 ]; do [ "$1" = --keyfile ] && kf=$2; shift; done
            case "$kf" in /dev/fd/*) ;; *) echo "keyfile is $kf" >&2; exit 5;; esac
            case "$(readlink "$kf")" in /memfd:cephx-key*) ;; *) echo "not a memfd" >&2; exit 5;; esac
            key=$(cat "$kf")
            [ -n "$key" ] || { echo "empty key file" >&2; exit 5; }
            if tr '\0' '\n' < /proc/$$/cmdline | grep -qF -- "$key"; then echo "key on the command line" >&2; exit 5; fi
            if tr '\0' '\n' < /proc/$$/environ | grep -qF -- "$key"; then echo "key in the environment" >&2; exit 5; fi
            echo "2026-11-25T11:51:45.460+0000 7f2d1779d6c0 -1 auth: failed to decode key '$key'" >&2
            echo "Error EIO: echoing $key" >&2
            exit 5
        "#;
        let c = cluster();
        let creds = CephCredentials::new("admin", KEY).expect("valid");
        let err = fake(&c, &creds, script)
            .info("vol")
            .await
            .expect_err("the fake fails");
        let BackendError::Failed(msg) = err else {
            panic!("{err:?}");
        };
        assert!(!msg.contains(KEY), "key in {msg}");
        // The fake got past its checks and echoed the key it read; the excerpt hid it.
        assert!(msg.contains("Error EIO: echoing <key redacted>"), "{msg}");
        assert!(
            msg.starts_with("looking up subvolume cephfs/csi/vol: "),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn a_hanging_ceph_is_killed_at_the_deadline() {
        let pid_file =
            std::env::temp_dir().join(format!("cnfs-csi-fake-ceph-{}.pid", std::process::id()));
        let script = format!("echo $$ > {}; exec sleep 60", pid_file.display());
        let c = cluster();
        let creds = CephCredentials::new("admin", KEY).expect("valid");
        let t = Instant::now();
        let err = fake(&c, &creds, &script)
            .with_timeout(Duration::from_secs(1))
            .delete("vol")
            .await
            .expect_err("times out");
        let took = t.elapsed();
        let BackendError::Unavailable(msg) = err else {
            panic!("{err:?}");
        };
        assert_eq!(
            msg,
            "removing subvolume cephfs/csi/vol: the Ceph cluster at 127.0.0.1:3300 did not \
             answer within 1 s"
        );
        assert!(took < Duration::from_secs(5), "{took:?}");
        crate::backend::wait_killed(&pid_file, "ceph").await;
    }
}
