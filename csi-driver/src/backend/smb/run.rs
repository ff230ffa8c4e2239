//! Running `smbclient`: one bounded, hermetic process per step (its own config and caches in
//! a private directory, an empty environment, SMB3 encryption), the account in a memfd.

use std::path::Path;
use std::process::Stdio;

use tokio::io::AsyncReadExt;

use crate::backend::secret_fd::SecretFd;
use crate::backend::show_secs;

use super::client::SmbClient;
use super::status::{classify, connect_failure, excerpt, nt_statuses, scrub, Failure, Kind};

/// The program run for every operation.
pub const PROGRAM: &str = "smbclient";

/// Output kept per stream; the rest is read and dropped.
pub(super) const OUTPUT_MAX: usize = 64 * 1024;

impl<'a> SmbClient<'a> {
    /// Runs `smbclient //server/share -c <commands>` as this account. A connection that
    /// fails (refused, unreachable, logon, share, encryption) is the `Err`; otherwise the
    /// exit code and the scrubbed output, for the caller to read.
    pub(super) async fn run(&self, commands: &str) -> Result<Ran, Failure> {
        let failed = |text: String| Failure {
            kind: Kind::Failed,
            text,
        };
        let (program, leading) = self
            .command
            .split_first()
            .ok_or_else(|| failed("no smbclient command configured".into()))?;
        // Its config, caches and working directory: private, and gone with this call.
        let dir = tempfile::Builder::new()
            .prefix("cnfs-smbclient-")
            .tempdir()
            .map_err(|e| {
                failed(format!(
                    "cannot make a private directory for smbclient: {e}"
                ))
            })?;
        let conf = dir.path().join("smb.conf");
        std::fs::write(&conf, client_config(dir.path()))
            .map_err(|e| failed(format!("cannot write smbclient's config: {e}")))?;
        let (auth_text, by_fd) = self.creds.auth_file();
        let hand_over =
            |e: std::io::Error| failed(format!("cannot hand the credentials to smbclient: {e}"));
        let auth = SecretFd::new("smb-auth", auth_text.as_bytes()).map_err(hand_over)?;
        let password_fd = if by_fd {
            Some(SecretFd::new("smb-password", self.creds.password.as_bytes()).map_err(hand_over)?)
        } else {
            None
        };
        // smbclient's own bound ends a little before the hard deadline, so that in the usual
        // case it says what it was waiting for.
        let soft = self.timeout.as_secs().saturating_sub(1).max(1).to_string();
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(leading)
            .arg(self.share.unc())
            .arg("--configfile")
            .arg(&conf)
            .arg("--authentication-file")
            .arg(auth.path())
            .arg("--client-protection=encrypt")
            .args(["--timeout", &soft])
            .args(["--command", commands])
            // Samba reads USER, PASSWD, PASSWD_FILE and more from the environment: only what
            // is set here counts.
            .env_clear()
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(path) = std::env::var_os("PATH") {
            cmd.env("PATH", path);
        }
        auth.inherit_into(&mut cmd);
        if let Some(p) = &password_fd {
            cmd.env("PASSWD_FD", p.raw().to_string());
            p.inherit_into(&mut cmd);
        }
        let mut child = cmd.spawn().map_err(|e| {
            // The cnfs-csi image carries no smbclient: say what is missing and where the fix is.
            failed(format!(
                "cannot run {program} ({e}): the SMB backend needs Samba's `smbclient` (Debian's \
                 smbclient package), which the cnfs-csi image does not carry; run the controller \
                 from an image that has it (configs/csi/README.md, \"SMB\")"
            ))
        })?;
        // The child has its own copies of the descriptors; ours go now.
        drop(auth);
        drop(password_fd);
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let finished = async move {
            let (out, err) = tokio::join!(read_bounded(stdout), read_bounded(stderr));
            // Owned here: dropping this unfinished future drops the child, and kill_on_drop
            // SIGKILLs it.
            let status = child.wait().await;
            (status, out, err)
        };
        let (status, out, err) = match tokio::time::timeout(self.timeout, finished).await {
            Ok(r) => r,
            Err(_) => {
                return Err(Failure {
                    kind: Kind::Unavailable,
                    text: format!(
                        "the SMB server {} did not answer within {}",
                        self.share.server,
                        show_secs(self.timeout)
                    ),
                })
            }
        };
        let status = status.map_err(|e| failed(format!("waiting for smbclient: {e}")))?;
        let text = scrub(
            &format!(
                "{}\n{}",
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&err)
            ),
            &self.creds.password,
        );
        if let Some(kind) = connect_failure(&text) {
            let mut text = excerpt(&text);
            if kind == Kind::Unavailable {
                text = format!(
                    "the SMB server {} cannot be reached: {text}",
                    self.share.server
                );
            }
            return Err(Failure { kind, text });
        }
        Ok(Ran {
            code: status.code(),
            text,
        })
    }

    /// Tests only: run another command (program and leading arguments) instead of
    /// `smbclient`.
    #[cfg(test)]
    pub(super) fn with_command(mut self, command: &[&str]) -> Self {
        self.command = command.iter().map(|s| s.to_string()).collect();
        self
    }
}

/// The client's own config: SMB 2.1 and later (3.x for encryption), hosts/DNS only, port 445
/// only, no Kerberos, and every directory Samba would write to inside `dir`.
pub(super) fn client_config(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "[global]\n\
         client min protocol = SMB2_10\n\
         client use kerberos = off\n\
         name resolve order = host\n\
         smb ports = 445\n\
         cache directory = {d}\n\
         lock directory = {d}\n\
         state directory = {d}\n\
         private dir = {d}\n\
         pid directory = {d}\n\
         ncalrpc dir = {d}\n"
    )
}

/// Reads a pipe to its end, keeping at most [`OUTPUT_MAX`] bytes.
pub(super) async fn read_bounded<R: tokio::io::AsyncRead + Unpin>(pipe: Option<R>) -> Vec<u8> {
    let Some(mut pipe) = pipe else {
        return Vec::new();
    };
    let mut kept = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                let room = OUTPUT_MAX.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

/// A finished run: exit code and scrubbed output.
pub(super) struct Ran {
    pub(super) code: Option<i32>,
    pub(super) text: String,
}

impl Ran {
    /// The failure its output reports: the first `NT_STATUS_...` decides the kind.
    pub(super) fn failure(&self) -> Failure {
        let kind = nt_statuses(&self.text)
            .first()
            .map_or(Kind::Failed, |s| classify(s));
        Failure {
            kind,
            text: excerpt(&self.text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::smb::fixtures::{creds, fake, secrets, share};
    use std::time::Duration;
    use std::time::Instant;

    use crate::backend::smb::SmbCredentials;
    use crate::backend::BackendError;

    #[tokio::test]
    async fn credentials_reach_smbclient_only_as_an_inherited_memfd_and_are_scrubbed_from_errors() {
        // The fake finds --authentication-file, checks it is a memfd under /dev/fd, reads the
        // password from it, looks for it in its own command line, environment and private
        // directory, checks the options that keep smbclient hermetic and encrypted, then
        // echoes the password as a failing server name might.
        let script = r#"
            for a in "$@"; do
              case "$prev" in --authentication-file) af=$a;; --configfile) conf=$a;; esac
              case "$a" in --client-protection=encrypt) enc=1;; esac
              prev=$a
            done
            case "$af" in /dev/fd/*) ;; *) echo "auth file is $af" >&2; exit 5;; esac
            case "$(readlink "$af")" in /memfd:smb-auth*) ;; *) echo "not a memfd" >&2; exit 5;; esac
            pw=$(sed -n 's/^password = //p' "$af")
            [ -n "$pw" ] || { echo "no password" >&2; exit 5; }
            [ "$enc" = 1 ] || { echo "not encrypted" >&2; exit 5; }
            grep -q '^name resolve order = host$' "$conf" || { echo "conf: $(cat "$conf")" >&2; exit 5; }
            grep -q "^cache directory = $PWD\$" "$conf" || { echo "cache outside $PWD" >&2; exit 5; }
            if tr '\0' '\n' < /proc/$$/cmdline | grep -qF -- "$pw"; then echo "password on the command line" >&2; exit 5; fi
            if tr '\0' '\n' < /proc/$$/environ | grep -qF -- "$pw"; then echo "password in the environment" >&2; exit 5; fi
            if grep -rqF -- "$pw" "$PWD"; then echo "password on disk" >&2; exit 5; fi
            [ -z "$USER$PASSWD$PASSWD_FD" ] || { echo "credentials environment leaked in" >&2; exit 5; }
            echo "tree connect failed: NT_STATUS_BAD_NETWORK_NAME for $pw"
            exit 1
        "#;
        let (s, c) = (share(), creds());
        let err = fake(&s, &c, script)
            .create_dir("k8s/pvc-1")
            .await
            .expect_err("the fake fails");
        let BackendError::NotFound(msg) = err else {
            panic!("{err:?}");
        };
        assert!(!msg.contains("horse"), "password in {msg}");
        assert_eq!(
            msg,
            "creating //127.0.0.1/data/k8s/pvc-1: tree connect failed: NT_STATUS_BAD_NETWORK_NAME \
             for <password redacted>"
        );
    }

    #[tokio::test]
    async fn a_password_with_leading_white_space_goes_by_passwd_fd() {
        let script = r#"
            for a in "$@"; do [ "$prev" = --authentication-file ] && af=$a; prev=$a; done
            if grep -q '^password' "$af"; then echo "password in the auth file"; exit 5; fi
            case "$(readlink /dev/fd/$PASSWD_FD)" in /memfd:smb-password*) ;; *) echo "no PASSWD_FD"; exit 5;; esac
            IFS= read -r pw <&$PASSWD_FD || true
            [ "$pw" = "  lead" ] || { echo "read [$pw]"; exit 5; }
            exit 0
        "#;
        let s = share();
        let c = SmbCredentials::from_secrets(
            "secrets",
            &secrets(&[("username", "bob"), ("password", "  lead")]),
        )
        .expect("valid");
        // bash: dash takes no descriptor above 9 in a redirection.
        SmbClient::new(&s, &c)
            .expect("valid")
            .with_command(&["/bin/bash", "-c", script, "fake-smbclient"])
            .create_dir("pvc-1")
            .await
            .expect("the fake read the password from PASSWD_FD");
    }

    #[tokio::test]
    async fn a_missing_smbclient_is_named_with_the_fix() {
        let (s, c) = (share(), creds());
        let err = SmbClient::new(&s, &c)
            .expect("valid")
            .with_command(&["/nonexistent/smbclient"])
            .dir_exists("pvc")
            .await
            .expect_err("no such program");
        let BackendError::Failed(m) = err else {
            panic!("{err:?}")
        };
        assert!(m.contains("cannot run /nonexistent/smbclient"), "{m}");
        assert!(
            m.contains("`smbclient`") && m.contains("configs/csi/README.md"),
            "{m}"
        );
    }

    #[tokio::test]
    async fn a_hanging_smbclient_is_killed_at_the_deadline() {
        let pid_file = std::env::temp_dir().join(format!(
            "cnfs-csi-fake-smbclient-{}.pid",
            std::process::id()
        ));
        let script = format!("echo $$ > {}; exec sleep 60", pid_file.display());
        let (s, c) = (share(), creds());
        let t = Instant::now();
        let err = fake(&s, &c, &script)
            .with_timeout(Duration::from_secs(1))
            .create_dir("pvc")
            .await
            .expect_err("times out");
        let took = t.elapsed();
        let BackendError::Unavailable(msg) = err else {
            panic!("{err:?}")
        };
        assert_eq!(
            msg,
            "creating //127.0.0.1/data/pvc: the SMB server 127.0.0.1 did not answer within 1 s"
        );
        assert!(took < Duration::from_secs(5), "{took:?}");
        crate::backend::wait_killed(&pid_file, "smbclient").await;
    }
}
