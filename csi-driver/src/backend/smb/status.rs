//! What `smbclient` printed: its `NT_STATUS_...` codes classified for the CSI code they
//! become, connection failures told apart from a command's, and bounded excerpts without the
//! password.

use crate::backend::BackendError;

/// Longest stderr/stdout excerpt carried in an error.
pub(super) const EXCERPT_MAX: usize = 400;

/// How a failed `smbclient` run is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    NotFound,
    PermissionDenied,
    Invalid,
    Unavailable,
    Failed,
}

/// A failed run: its kind and the scrubbed, bounded excerpt of what it said (or, for
/// failures around the command, a description).
pub(super) struct Failure {
    pub(super) kind: Kind,
    pub(super) text: String,
}

impl Failure {
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

/// Every `NT_STATUS_...` code in `text`, in order.
pub(super) fn nt_statuses(text: &str) -> Vec<&str> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("NT_STATUS_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        found.push(&tail[..end]);
        rest = &tail[end..];
    }
    found
}

/// Statuses that mean "not there".
pub(super) fn is_missing(status: &str) -> bool {
    matches!(
        status,
        "NT_STATUS_OBJECT_NAME_NOT_FOUND"
            | "NT_STATUS_OBJECT_PATH_NOT_FOUND"
            | "NT_STATUS_NO_SUCH_FILE"
            | "NT_STATUS_NOT_FOUND"
    )
}

/// The kind of an NT status, for the CSI code it becomes.
pub(super) fn classify(status: &str) -> Kind {
    match status {
        "NT_STATUS_LOGON_FAILURE"
        | "NT_STATUS_WRONG_PASSWORD"
        | "NT_STATUS_NO_SUCH_USER"
        | "NT_STATUS_ACCESS_DENIED"
        | "NT_STATUS_NETWORK_ACCESS_DENIED"
        | "NT_STATUS_ACCOUNT_DISABLED"
        | "NT_STATUS_ACCOUNT_LOCKED_OUT"
        | "NT_STATUS_ACCOUNT_EXPIRED"
        | "NT_STATUS_ACCOUNT_RESTRICTION"
        | "NT_STATUS_PASSWORD_EXPIRED"
        | "NT_STATUS_PASSWORD_MUST_CHANGE"
        | "NT_STATUS_LOGON_TYPE_NOT_GRANTED"
        | "NT_STATUS_INVALID_LOGON_HOURS"
        | "NT_STATUS_INVALID_WORKSTATION"
        | "NT_STATUS_MEDIA_WRITE_PROTECTED" => Kind::PermissionDenied,
        "NT_STATUS_BAD_NETWORK_NAME" | "NT_STATUS_BAD_NETWORK_PATH" => Kind::NotFound,
        s if is_missing(s) => Kind::NotFound,
        "NT_STATUS_CONNECTION_REFUSED"
        | "NT_STATUS_HOST_UNREACHABLE"
        | "NT_STATUS_NETWORK_UNREACHABLE"
        | "NT_STATUS_PORT_UNREACHABLE"
        | "NT_STATUS_IO_TIMEOUT"
        | "NT_STATUS_CONNECTION_RESET"
        | "NT_STATUS_CONNECTION_DISCONNECTED"
        | "NT_STATUS_CONNECTION_ABORTED"
        | "NT_STATUS_NETWORK_NAME_DELETED"
        | "NT_STATUS_REQUEST_NOT_ACCEPTED"
        | "NT_STATUS_INSUFF_SERVER_RESOURCES" => Kind::Unavailable,
        "NT_STATUS_NOT_A_DIRECTORY"
        | "NT_STATUS_OBJECT_NAME_INVALID"
        | "NT_STATUS_OBJECT_PATH_SYNTAX_BAD"
        | "NT_STATUS_NAME_TOO_LONG"
        | "NT_STATUS_OBJECT_NAME_COLLISION"
        | "NT_STATUS_INVALID_PARAMETER" => Kind::Invalid,
        _ => Kind::Failed,
    }
}

/// Whether the output says the connection itself failed (before any command ran), and how.
pub(super) fn connect_failure(text: &str) -> Option<Kind> {
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with("Encryption required") {
            // Permanent: the server offers no SMB3 encryption, and the controller insists.
            return Some(Kind::Failed);
        }
        let at_connect = line.starts_with("do_connect:")
            || line.starts_with("Connection to ")
            || line.starts_with("protocol negotiation failed")
            || line.starts_with("session setup failed")
            || line.starts_with("tree connect failed");
        if !at_connect {
            continue;
        }
        let status = nt_statuses(line).first().copied();
        return Some(match status {
            // do_connect's NT_STATUS_UNSUCCESSFUL: the name did not resolve.
            Some("NT_STATUS_UNSUCCESSFUL") if line.starts_with("do_connect:") => Kind::Unavailable,
            Some(s) => match classify(s) {
                Kind::Failed if line.starts_with("do_connect:") => Kind::Unavailable,
                k => k,
            },
            None if line.starts_with("do_connect:") || line.starts_with("Connection to ") => {
                Kind::Unavailable
            }
            None => Kind::Failed,
        });
    }
    None
}

/// `text` without the password (padded and bare), with no empty lines.
pub(super) fn scrub(text: &str, password: &str) -> String {
    let mut out = text.to_string();
    for p in [password, password.trim()] {
        if !p.is_empty() {
            out = out.replace(p, "<password redacted>");
        }
    }
    out
}

/// A bounded excerpt of scrubbed output: without noise (listing totals, `PASSWD_FD`'s
/// complaint about its second read, a password prompt), lines joined with "; ", cut to
/// [`EXCERPT_MAX`] characters.
pub(super) fn excerpt(scrubbed: &str) -> String {
    let lines: Vec<&str> = scrubbed
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty()
                && !l.starts_with("Error reading password from file descriptor")
                && !l.starts_with("Password for [")
                && !l.contains("blocks of size")
        })
        .collect();
    let joined = lines.join("; ");
    if joined.is_empty() {
        return "(no message)".to_string();
    }
    if joined.chars().count() <= EXCERPT_MAX {
        return joined;
    }
    let mut cut: String = joined.chars().take(EXCERPT_MAX - 1).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWORD: &str = "correct horse;battery=staple";

    #[test]
    fn failures_are_classified_as_smbclient_4_17_reports_them() {
        use Kind::*;
        for (text, kind) in [
            (
                "session setup failed: NT_STATUS_LOGON_FAILURE",
                PermissionDenied,
            ),
            (
                "session setup failed: NT_STATUS_ACCOUNT_DISABLED",
                PermissionDenied,
            ),
            ("tree connect failed: NT_STATUS_BAD_NETWORK_NAME", NotFound),
            (
                "tree connect failed: NT_STATUS_ACCESS_DENIED",
                PermissionDenied,
            ),
            (
                "do_connect: Connection to 10.0.0.9 failed (Error NT_STATUS_CONNECTION_REFUSED)",
                Unavailable,
            ),
            (
                "do_connect: Connection to 10.0.0.9 failed (Error NT_STATUS_HOST_UNREACHABLE)",
                Unavailable,
            ),
            (
                "do_connect: Connection to 10.0.0.9 failed (Error NT_STATUS_IO_TIMEOUT)",
                Unavailable,
            ),
            (
                "do_connect: Connection to nosuch.invalid failed (Error NT_STATUS_UNSUCCESSFUL)",
                Unavailable,
            ),
            (
                "protocol negotiation failed: NT_STATUS_INVALID_NETWORK_RESPONSE",
                Failed,
            ),
            (
                "Encryption required and server doesn't support SMB3 encryption - failing connect",
                Failed,
            ),
        ] {
            assert_eq!(
                connect_failure(&format!("\n{text}\n")),
                Some(kind),
                "{text}"
            );
        }
        assert_eq!(
            connect_failure("NT_STATUS_OBJECT_NAME_COLLISION making remote directory \\a"),
            None
        );
        assert_eq!(
            connect_failure("cd \\x\\: NT_STATUS_OBJECT_NAME_NOT_FOUND"),
            None
        );
        assert_eq!(
            nt_statuses("NT_STATUS_ACCESS_DENIED making remote directory \\k\ncd \\k\\p\\: NT_STATUS_OBJECT_PATH_NOT_FOUND"),
            ["NT_STATUS_ACCESS_DENIED", "NT_STATUS_OBJECT_PATH_NOT_FOUND"]
        );
        assert_eq!(classify("NT_STATUS_OBJECT_PATH_NOT_FOUND"), NotFound);
        assert_eq!(classify("NT_STATUS_NOT_A_DIRECTORY"), Invalid);
        assert_eq!(classify("NT_STATUS_DISK_FULL"), Failed);
    }

    #[test]
    fn excerpts_lose_the_password_and_noise_and_stay_short() {
        let text = scrub(
            &format!(
                "Password for [WORKGROUP\\alice]:\nsession setup failed: {PASSWORD} NT_STATUS_LOGON_FAILURE\n\n\
                 Error reading password from file descriptor 4: empty password\n\t\t5 blocks of size 1024. 3 blocks available\n"
            ),
            PASSWORD,
        );
        let e = excerpt(&text);
        assert_eq!(
            e,
            "session setup failed: <password redacted> NT_STATUS_LOGON_FAILURE"
        );
        let long = excerpt(&format!("{}\n{}", "x".repeat(300), "y".repeat(300)));
        assert_eq!(long.chars().count(), EXCERPT_MAX);
        assert!(long.ends_with('…'));
        assert_eq!(excerpt("\n \n"), "(no message)");
    }
}
