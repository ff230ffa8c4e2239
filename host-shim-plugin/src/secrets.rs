//! Host-side secrets, referenced by name in annotations and resolved from a root-only
//! directory the admin controls: `<secrets_dir>/<kubernetes namespace>/<secret name>`. The
//! value travels to the guest over vsock only; it never appears in errors, logs, annotations
//! or the bundle on disk.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use cnfs_protocols::spec::{validate_name, SecretBytes};

const MAX_SECRET: u64 = 4096;

/// A secret value; Debug and Display never show it.
pub struct SecretValue(String);

impl SecretValue {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret name {0:?} is not valid (lower-case letters, digits and '-')")]
    BadName(String),
    #[error("secret {name:?} for namespace {namespace} does not exist on this node")]
    Missing { namespace: String, name: String },
    #[error("{path}: {reason}")]
    Unsafe { path: String, reason: String },
    #[error("reading secret {name:?} for namespace {namespace}: {reason}")]
    Read {
        namespace: String,
        name: String,
        reason: String,
    },
}

pub struct SecretStore {
    dir: PathBuf,
}

impl SecretStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        SecretStore { dir: dir.into() }
    }

    /// Reads `<dir>/<namespace>/<name>` as text (credentials), without the line ends at its
    /// end. The rules are those of [`SecretStore::resolve_bytes`].
    pub fn resolve(&self, namespace: &str, name: &str) -> Result<SecretValue, SecretError> {
        let bytes = self.resolve_bytes(namespace, name)?;
        let text = std::str::from_utf8(bytes.expose()).map_err(|_| SecretError::Read {
            namespace: namespace.to_string(),
            name: name.to_string(),
            reason: "is not UTF-8 text".into(),
        })?;
        Ok(SecretValue(text.trim_end_matches(['\n', '\r']).to_string()))
    }

    /// Reads `<dir>/<namespace>/<name>` as raw bytes, exactly (an encryption key: a trailing
    /// newline is part of it, as `cryptsetup --key-file` reads it). The directory chain and
    /// the file must belong to root and be closed to group and others, or the secret is
    /// refused.
    pub fn resolve_bytes(&self, namespace: &str, name: &str) -> Result<SecretBytes, SecretError> {
        validate_name("secret", name).map_err(|_| SecretError::BadName(name.to_string()))?;
        validate_name("namespace", namespace)
            .map_err(|_| SecretError::BadName(namespace.to_string()))?;
        let ns_dir = self.dir.join(namespace);
        let file = ns_dir.join(name);
        let missing = || SecretError::Missing {
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        for p in [&self.dir, &ns_dir, &file] {
            let meta = std::fs::symlink_metadata(p).map_err(|_| missing())?;
            check_private(p, &meta)?;
        }
        let meta = std::fs::metadata(&file).map_err(|_| missing())?;
        if !meta.is_file() || meta.len() > MAX_SECRET {
            return Err(SecretError::Read {
                namespace: namespace.to_string(),
                name: name.to_string(),
                reason: format!("must be a regular file of at most {MAX_SECRET} bytes"),
            });
        }
        let bytes = std::fs::read(&file).map_err(|e| SecretError::Read {
            namespace: namespace.to_string(),
            name: name.to_string(),
            reason: e.kind().to_string(),
        })?;
        Ok(SecretBytes::new(bytes))
    }
}

fn check_private(path: &Path, meta: &std::fs::Metadata) -> Result<(), SecretError> {
    let unsafe_ = |reason: &str| SecretError::Unsafe {
        path: path.display().to_string(),
        reason: reason.to_string(),
    };
    if meta.file_type().is_symlink() {
        return Err(unsafe_("must not be a symbolic link"));
    }
    if meta.uid() != 0 {
        return Err(unsafe_("must be owned by root"));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(unsafe_(
            "must not be accessible by group or others (chmod go-rwx)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn store(tag: &str) -> (PathBuf, SecretStore) {
        let dir = std::env::temp_dir().join(format!("cnfs-secrets-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("team-a")).expect("dir");
        for d in [&dir, &dir.join("team-a")] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        }
        let f = dir.join("team-a").join("ceph-key");
        std::fs::write(&f, "AQBsecretvalue==\n").expect("write");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        (dir.clone(), SecretStore::new(dir))
    }

    #[test]
    fn resolves_private_secrets_and_never_shows_them() {
        let (dir, s) = store("text");
        let v = s.resolve("team-a", "ceph-key").expect("secret");
        assert_eq!(v.expose(), "AQBsecretvalue==");
        assert_eq!(format!("{v:?}"), "<redacted>");
        let e = s
            .resolve("team-a", "other")
            .expect_err("missing")
            .to_string();
        assert!(
            e.contains("\"other\"") && e.contains("does not exist"),
            "{e}"
        );
        assert!(matches!(
            s.resolve("team-a", "../x"),
            Err(SecretError::BadName(_))
        ));
        assert!(matches!(
            s.resolve("team-b", "ceph-key"),
            Err(SecretError::Missing { .. })
        ));
        // Group-readable: refused, and the error has no secret in it.
        let f = dir.join("team-a").join("ceph-key");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let e = s
            .resolve("team-a", "ceph-key")
            .expect_err("unsafe")
            .to_string();
        assert!(e.contains("group or others") && !e.contains("AQB"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_encryption_key_is_read_as_its_exact_bytes_under_the_same_rules() {
        let (dir, s) = store("bytes");
        let f = dir.join("team-a").join("luks-key");
        let bytes = b"\x00\xffnot text, with a newline\r\n\n";
        std::fs::write(&f, bytes).expect("write");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let k = s.resolve_bytes("team-a", "luks-key").expect("key");
        assert_eq!(k.expose(), bytes, "no trimming, no decoding");
        assert_eq!(format!("{k:?}"), "<redacted>");
        // As text (credentials) the same file is refused, without its content.
        let e = s
            .resolve("team-a", "luks-key")
            .expect_err("not UTF-8")
            .to_string();
        assert!(
            e.contains("is not UTF-8 text") && !e.contains("newline"),
            "{e}"
        );
        // The namespace is part of the lookup, and the file's mode is checked.
        assert!(matches!(
            s.resolve_bytes("team-b", "luks-key"),
            Err(SecretError::Missing { .. })
        ));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o604)).expect("chmod");
        let e = s
            .resolve_bytes("team-a", "luks-key")
            .expect_err("world-readable")
            .to_string();
        assert!(
            e.contains("group or others") && !e.contains("newline"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
