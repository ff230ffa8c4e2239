//! The mount request built from the command line and checked here, with the same rules the
//! agent applies, before anything reaches the guest: `--nfs SERVER:/EXPORT` or a `--source`
//! URL (with its `--secret-file`, and `--key-file` for an encrypted one), `-o` options, `--ro`.

use std::collections::HashMap;

use anyhow::Context;
use cnfs_protocols::agent;
use cnfs_protocols::spec::encryption::MAX_KEY;
use cnfs_protocols::spec::{EncryptionMode, VolumeSpec};

use crate::call::InvalidArgument;
use crate::MountArgs;

/// A --source volume: the annotations' grammar, with the credentials its file system needs
/// read from --secret-file (the file system reads its own format).
fn url_volume(m: &MountArgs, url: &str) -> anyhow::Result<agent::VolumeSpec> {
    let parsed = cnfs_protocols::volume_url::parse(&m.name, url)
        .map_err(|e| InvalidArgument(format!("--source: {e}")))?;
    if parsed.encryption_key_ref.is_some() {
        return Err(InvalidArgument(
            "--source: encryption_key= names a secret of the shim's secret directory; give \
             --key-file"
                .into(),
        )
        .into());
    }
    if parsed.secret_ref.is_some() {
        return Err(InvalidArgument(
            "--source: secret= names a secret of the shim's secret directory; give --secret-file"
                .into(),
        )
        .into());
    }
    let mut wire = parsed.wire;
    let kind = cnfs_protocols::spec::FsKind::of_wire(&wire)
        .ok_or_else(|| InvalidArgument("--source: names no file system".into()))?;
    match (&m.secret_file, kind.needs_secret()) {
        (None, true) => {
            return Err(InvalidArgument(format!(
                "--secret-file: {} volumes need credentials ({})",
                kind.name(),
                kind.required_secret_keys().join(", ")
            ))
            .into())
        }
        (Some(_), false) => {
            return Err(InvalidArgument(format!(
                "--secret-file: {} volumes take no secret",
                kind.name()
            ))
            .into())
        }
        (Some(path), true) => {
            let meta = std::fs::metadata(path)
                .with_context(|| format!("--secret-file {}", path.display()))?;
            if meta.len() > 64 * 1024 {
                return Err(InvalidArgument(format!(
                    "--secret-file {}: larger than 64 KiB",
                    path.display()
                ))
                .into());
            }
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--secret-file {}", path.display()))?;
            let creds = kind
                .credentials_from_file(&text)
                .map_err(|e| InvalidArgument(format!("--secret-file {}: {e}", path.display())))?;
            kind.apply_credentials("--secret-file", &mut wire, &creds)
                .map_err(|e| InvalidArgument(e.to_string()))?;
        }
        (None, false) => {}
    }
    encryption_key(m, &mut wire)?;
    Ok(wire)
}

/// An encrypted volume's key: --key-file's bytes, exactly (luks2 and gocryptfs alike).
/// Required when the URL says encryption=, refused otherwise; its content is never shown.
fn encryption_key(m: &MountArgs, wire: &mut agent::VolumeSpec) -> anyhow::Result<()> {
    let encryption = wire.encryption.as_mut();
    let (path, encryption) = match (&m.key_file, encryption) {
        (None, None) => return Ok(()),
        (Some(_), None) => {
            return Err(InvalidArgument(
                "--key-file: only for encrypted volumes (encryption=luks2 or gocryptfs in \
                 --source)"
                    .into(),
            )
            .into())
        }
        (None, Some(e)) => {
            return Err(InvalidArgument(format!(
                "--key-file: the --source volume is encrypted (encryption={}): give the key's file",
                e.mode
            ))
            .into())
        }
        (Some(path), Some(e)) => (path, e),
    };
    let meta = std::fs::metadata(path).with_context(|| format!("--key-file {}", path.display()))?;
    // Checked before reading, so that a wrong path (a disk image) is not read whole.
    if meta.len() > MAX_KEY as u64 {
        return Err(InvalidArgument(format!(
            "--key-file {}: larger than {MAX_KEY} bytes",
            path.display()
        ))
        .into());
    }
    let key = std::fs::read(path).with_context(|| format!("--key-file {}", path.display()))?;
    if key.is_empty() {
        return Err(InvalidArgument(format!("--key-file {}: is empty", path.display())).into());
    }
    // Named here with the file (the spec would name volume.encryption.key): a file written
    // with `echo` ends in a newline, which gocryptfs cannot take.
    if let Some(reason) = EncryptionMode::parse("mode", &encryption.mode)
        .ok()
        .and_then(|mode| mode.refuses_key(&key))
    {
        return Err(InvalidArgument(format!(
            "--key-file {}: {reason} (a trailing newline counts: write the file with printf, \
             not echo)",
            path.display()
        ))
        .into());
    }
    encryption.key = key;
    Ok(())
}

/// Builds and validates the wire request (the same rules the agent applies).
pub(crate) fn mount_request(
    m: &MountArgs,
    sandbox: Option<&str>,
) -> anyhow::Result<agent::MountRequest> {
    let mut options: HashMap<String, String> = HashMap::new();
    for arg in &m.options {
        for item in arg.split(',') {
            let (key, value) = item.split_once('=').unwrap_or((item, ""));
            if key.is_empty() {
                return Err(
                    InvalidArgument(format!("-o {:?}: expected KEY or KEY=VALUE", arg)).into(),
                );
            }
            if options.insert(key.to_string(), value.to_string()).is_some() {
                return Err(InvalidArgument(format!(
                    "volume.options.{}: given more than once",
                    key.escape_default()
                ))
                .into());
            }
        }
    }
    let mut volume = match (&m.source, &m.nfs) {
        (Some(url), _) => url_volume(m, url)?,
        (None, Some(nfs)) => {
            let (server, export) = split_nfs(nfs)?;
            let mut v = agent::VolumeSpec {
                name: m.name.clone(),
                ..Default::default()
            };
            v.set_nfs(agent::NfsSource {
                server,
                export,
                version: m.version.clone().unwrap_or_default(),
                ..Default::default()
            });
            v
        }
        (None, None) => return Err(InvalidArgument("give --nfs or --source".into()).into()),
    };
    volume.read_only |= m.ro;
    for (k, v) in options {
        if volume.options.insert(k.clone(), v).is_some() {
            return Err(InvalidArgument(format!(
                "volume.options.{}: given in the URL and with -o",
                k.escape_default()
            ))
            .into());
        }
    }
    VolumeSpec::from_wire(&volume).context("invalid volume")?;
    Ok(agent::MountRequest {
        volume: protobuf::MessageField::some(volume),
        sandbox_id: sandbox.unwrap_or_default().to_string(),
        // The agent's default, capped by the request's deadline.
        timeout_ms: 0,
        ..Default::default()
    })
}

/// `SERVER:/EXPORT` or `[IPV6]:/EXPORT`.
fn split_nfs(s: &str) -> anyhow::Result<(String, String)> {
    let bad = || {
        InvalidArgument(format!(
            "--nfs {:?}: expected SERVER:/EXPORT (IPv6: [ADDR]:/EXPORT)",
            s.escape_default().to_string()
        ))
    };
    let (server, export) = if let Some(rest) = s.strip_prefix('[') {
        let (addr, export) = rest.split_once("]:").ok_or_else(bad)?;
        (addr, export)
    } else {
        s.split_once(':').ok_or_else(bad)?
    };
    if server.is_empty() || export.is_empty() {
        return Err(bad().into());
    }
    Ok((server.to_string(), export.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::call::{exit_code, EXIT_INVALID};

    fn mount_args(nfs: &str, opts: &[&str]) -> MountArgs {
        MountArgs {
            name: "data".into(),
            nfs: Some(nfs.into()),
            source: None,
            secret_file: None,
            key_file: None,
            version: None,
            ro: false,
            options: opts.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn a_fuse_url_needs_no_secret_and_refuses_one() {
        let mut m = mount_args("unused:/x", &[]);
        m.nfs = None;
        m.source = Some("fuse://?sidecar=sshfs&uid=1000&allow_other".into());
        let r = mount_request(&m, None).expect("valid");
        // The socket left to the agent's default.
        let f = r.volume.fuse();
        assert_eq!((f.sidecar.as_str(), f.socket.as_str()), ("sshfs", ""));
        assert_eq!(
            r.volume.options.get("uid").map(String::as_str),
            Some("1000")
        );
        m.secret_file = Some("/nonexistent".into());
        let e = mount_request(&m, None).expect_err("a secret file");
        assert_eq!(exit_code(&e), EXIT_INVALID);
        assert_eq!(e.to_string(), "--secret-file: fuse volumes take no secret");
    }

    #[test]
    fn url_volumes_take_their_credentials_from_the_secret_file_only() {
        let dir = std::env::temp_dir().join(format!("cnfsctl-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("creds");
        std::fs::write(&file, "username=alice\npassword=s3cr,et\n").expect("write");
        let mut m = mount_args("unused:/x", &["uid=1000"]);
        m.nfs = None;
        m.source = Some("smb://10.0.0.9/data/team?vers=3.1.1".into());
        m.secret_file = Some(file.clone());
        let r = mount_request(&m, None).expect("valid");
        let smb = r.volume.smb();
        assert_eq!((smb.share.as_str(), smb.path.as_str()), ("data", "/team"));
        assert_eq!(smb.password, "s3cr,et");
        assert_eq!(
            r.volume.options.get("uid").map(String::as_str),
            Some("1000")
        );
        m.secret_file = None;
        let e = mount_request(&m, None).expect_err("no secret file");
        assert_eq!(exit_code(&e), EXIT_INVALID);
        assert!(
            e.to_string().contains("--secret-file") && e.to_string().contains("password"),
            "{e}"
        );
        m.source = Some("smb://10.0.0.9/data?secret=team-a".into());
        let e = mount_request(&m, None).expect_err("secret ref");
        assert!(e.to_string().contains("give --secret-file"), "{e}");
        std::fs::write(&file, "username=alice\ntoken=s3cr\n").expect("write");
        m.source = Some("smb://10.0.0.9/data".into());
        m.secret_file = Some(file);
        let e = mount_request(&m, None).expect_err("bad file");
        assert!(
            e.to_string().contains("line 2") && !e.to_string().contains("s3cr"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    const LUKS_URL: &str = "nfs://10.0.0.5/exports/sec?encryption=luks2&size=1Gi&owner=1000:100";

    fn key_file(dir: &std::path::Path, bytes: &[u8]) -> std::path::PathBuf {
        std::fs::create_dir_all(dir).expect("dir");
        let file = dir.join("key");
        std::fs::write(&file, bytes).expect("write");
        file
    }

    #[test]
    fn the_key_file_is_sent_as_its_exact_bytes() {
        let dir = std::env::temp_dir().join(format!("cnfsctl-key-{}", std::process::id()));
        // Binary, a NUL, trailing white space and newlines: all of it is the key.
        let bytes = b"\x00\xffk3y with space \r\n\n";
        let mut m = mount_args("unused:/x", &[]);
        m.nfs = None;
        m.source = Some(LUKS_URL.into());
        m.key_file = Some(key_file(&dir, bytes));
        let r = mount_request(&m, None).expect("valid");
        let e = r.volume.encryption.as_ref().expect("encrypted");
        assert_eq!(e.key, bytes);
        assert_eq!(
            (e.mode.as_str(), e.size_bytes, e.uid, e.gid),
            ("luks2", 1 << 30, 1000, 100)
        );
        assert!(r.volume.options.is_empty(), "{:?}", r.volume.options);
        // 1024 bytes is the most.
        m.key_file = Some(key_file(&dir, &[b'k'; MAX_KEY]));
        mount_request(&m, None).expect("1024 bytes");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_key_file_is_required_for_encrypted_volumes_only_and_never_echoed() {
        let dir = std::env::temp_dir().join(format!("cnfsctl-nokey-{}", std::process::id()));
        let mut m = mount_args("unused:/x", &[]);
        m.nfs = None;
        m.source = Some(LUKS_URL.into());
        let e = mount_request(&m, None).expect_err("no key file");
        assert_eq!(exit_code(&e), EXIT_INVALID);
        assert!(
            e.to_string()
                .starts_with("--key-file: the --source volume is encrypted"),
            "{e}"
        );
        m.source = Some("nfs://10.0.0.5/exports/plain".into());
        m.key_file = Some(key_file(&dir, b"SecretKeyBytes"));
        let e = mount_request(&m, None).expect_err("key file for a plain volume");
        assert_eq!(exit_code(&e), EXIT_INVALID);
        assert_eq!(
            e.to_string(),
            "--key-file: only for encrypted volumes (encryption=luks2 or gocryptfs in --source)"
        );
        m.source = Some(LUKS_URL.into());
        for (bytes, words) in [
            (&b""[..], "is empty"),
            (&[b'S'; MAX_KEY + 1][..], "larger than 1024 bytes"),
        ] {
            m.key_file = Some(key_file(&dir, bytes));
            let e = mount_request(&m, None).expect_err(words);
            assert_eq!(exit_code(&e), EXIT_INVALID);
            assert!(format!("{e:#}").contains(words), "{e:#}");
            assert!(!format!("{e:#}").contains("SSSS"), "{e:#}");
        }
        // A refusal after the key was read never shows it either.
        m.source = Some("nfs://10.0.0.5/exports/sec?vers=3&encryption=luks2&size=1Gi".into());
        m.key_file = Some(key_file(&dir, b"SecretKeyBytes"));
        let e = mount_request(&m, None).expect_err("NFSv3");
        assert_eq!(exit_code(&e), EXIT_INVALID);
        let shown = format!("{e:#} {e:?}");
        assert!(shown.contains("volume.nfs.version"), "{shown}");
        assert!(!shown.contains("SecretKey"), "{shown}");
        m.source = Some(format!("{LUKS_URL}&encryption_key=team"));
        let e = mount_request(&m, None).expect_err("secret reference");
        assert!(e.to_string().contains("give --key-file"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }

    const GOCRYPTFS_URL: &str = "nfs://10.0.0.5/exports/shared?vers=3&encryption=gocryptfs\
                                 &owner=1000:100";

    #[test]
    fn a_gocryptfs_key_file_is_sent_as_its_exact_bytes_without_a_size() {
        let dir = std::env::temp_dir().join(format!("cnfsctl-gkey-{}", std::process::id()));
        let bytes = b"\xffk3y with space \r";
        let mut m = mount_args("unused:/x", &[]);
        m.nfs = None;
        m.source = Some(GOCRYPTFS_URL.into());
        m.key_file = Some(key_file(&dir, bytes));
        let r = mount_request(&m, None).expect("valid");
        let e = r.volume.encryption.as_ref().expect("encrypted");
        assert_eq!(e.key, bytes);
        assert_eq!(
            (e.mode.as_str(), e.size_bytes, e.uid, e.gid),
            ("gocryptfs", 0, 1000, 100)
        );
        // Required as for luks2.
        m.key_file = None;
        let e = mount_request(&m, None).expect_err("no key file");
        assert_eq!(exit_code(&e), EXIT_INVALID);
        assert_eq!(
            e.to_string(),
            "--key-file: the --source volume is encrypted (encryption=gocryptfs): give the key's \
             file"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_gocryptfs_key_file_with_a_newline_or_nul_is_refused_naming_the_file_not_the_key() {
        let dir = std::env::temp_dir().join(format!("cnfsctl-gnl-{}", std::process::id()));
        let mut m = mount_args("unused:/x", &[]);
        m.nfs = None;
        m.source = Some(GOCRYPTFS_URL.into());
        for bytes in [&b"SecretKey\n"[..], b"Secret\nKey", b"Secret\0Key"] {
            let file = key_file(&dir, bytes);
            m.key_file = Some(file.clone());
            let e = mount_request(&m, None).expect_err("line break");
            assert_eq!(exit_code(&e), EXIT_INVALID);
            assert_eq!(
                e.to_string(),
                format!(
                    "--key-file {}: gocryptfs reads its password as one line: the key must not \
                     contain a newline or NUL byte (a trailing newline counts: write the file \
                     with printf, not echo)",
                    file.display()
                )
            );
            assert!(!format!("{e:#} {e:?}").contains("Secret"), "{e:#}");
        }
        // The same file is a luks2 key.
        m.source = Some(LUKS_URL.into());
        m.key_file = Some(key_file(&dir, b"SecretKey\n"));
        mount_request(&m, None).expect("luks2 takes it");
        // A size is refused with gocryptfs, naming the option.
        m.source = Some(format!("{GOCRYPTFS_URL}&size=1Gi"));
        m.key_file = Some(key_file(&dir, b"k"));
        let e = mount_request(&m, None).expect_err("size");
        assert_eq!(exit_code(&e), EXIT_INVALID);
        assert!(
            e.to_string()
                .starts_with("--source: volume.options.size: is refused with encryption=gocryptfs"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn nfs_argument_forms() {
        assert_eq!(
            split_nfs("10.0.0.1:/exports/a").expect("ok"),
            ("10.0.0.1".into(), "/exports/a".into())
        );
        assert_eq!(
            split_nfs("[fd00::1]:/x").expect("ok"),
            ("fd00::1".into(), "/x".into())
        );
        for bad in ["10.0.0.1", ":/x", "srv:", "[fd00::1]/x"] {
            let e = split_nfs(bad).expect_err(bad);
            assert_eq!(exit_code(&e), EXIT_INVALID, "{bad}");
        }
    }

    #[test]
    fn mount_request_is_validated_locally_with_the_field_named() {
        let r = mount_request(
            &mount_args("srv:/x", &["hard,rsize=65536", "ro"]),
            Some("sb"),
        )
        .expect("valid");
        let v = r.volume.as_ref().expect("volume");
        assert_eq!(v.options.get("rsize").map(String::as_str), Some("65536"));
        assert_eq!(r.sandbox_id, "sb");
        for (opts, field) in [
            (&["addr=1.2.3.4"][..], "volume.options.addr"),
            (&["rsize=1"][..], "volume.options.rsize"),
            (&["hard", "hard"][..], "volume.options.hard"),
            (&["=x"][..], "-o"),
        ] {
            let e = mount_request(&mount_args("srv:/x", opts), None).expect_err(field);
            assert!(format!("{e:#}").contains(field), "{e:#}");
            assert_eq!(exit_code(&e), EXIT_INVALID);
        }
        let e = mount_request(&mount_args("srv:relative", &[]), None).expect_err("export");
        assert!(format!("{e:#}").contains("volume.nfs.export"), "{e:#}");
    }
}
