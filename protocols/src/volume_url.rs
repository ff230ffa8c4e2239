//! The one volume URL grammar CNFS reads, wherever a volume is named by a person: pod
//! annotations (`cnfs.io/volume.<name>`) and CSI volume context (`source`).
//!
//! - `nfs://server[:port]/export?vers=4.1&<nfs option>...`
//! - `cephfs://mon[,mon...]/path?fs=<name>&client=<id>[&fsid=<uuid>][&secret=<ref>][&<option>...]`
//! - `smb://server[:port]/share[/path]?vers=3.1.1&secret=<ref>[&<option>...]`
//! - `fuse://?sidecar=<container>[&socket=<path in it>][&<option>...]`
//!
//! Any of them but `fuse://` may be encrypted: `encryption=luks2&size=<n>[Ki|Mi|Gi|Ti]
//! [&owner=<uid>:<gid>][&encryption_key=<ref>]`, or `encryption=gocryptfs[&owner=<uid>:<gid>]
//! [&encryption_key=<ref>]` (no size; see [`crate::spec::encryption`]).
//!
//! The scheme is the file system's name ([`FsKind`]); each file system's module reads its
//! own authority and path. `secret=` names a secret held elsewhere, for file systems that
//! need one; `encryption_key=` names the one holding an encrypted volume's key. The result
//! is an unvalidated wire spec: callers fill in what comes from elsewhere (credentials and
//! the encryption key from secrets) and then validate with [`crate::spec`].

use std::collections::BTreeMap;
use std::net::Ipv6Addr;

use crate::agent;
use crate::spec::{encryption, FsKind};

/// The longest volume URL read: a CSI `volume_context` map is at most 4 KiB in all (CSI spec,
/// "Size Limits"), and an annotation value at most 2 KiB.
pub const MAX_URL: usize = 4096;

/// At most this many bytes of caller text are shown back in an error or a log line (CSI's
/// general string limit, so any string CSI allows is shown whole).
pub const ECHO_MAX: usize = 128;

/// Caller text as shown in an error or a log line: quoted, control and other non-printable
/// characters escaped, cut after [`ECHO_MAX`] bytes with its full length said, so that a
/// huge or hostile value can neither flood a log nor forge a line in it.
pub fn echo(text: &str) -> String {
    let (shown, was_cut) = crate::spec::cut(text, ECHO_MAX);
    let shown = shown.escape_debug();
    if was_cut {
        format!("\"{shown}\"... ({} bytes)", text.len())
    } else {
        format!("\"{shown}\"")
    }
}

/// A parsed volume URL.
#[derive(Debug, Clone)]
pub struct VolumeUrl {
    /// The spec as written; not validated yet, key empty.
    pub wire: agent::VolumeSpec,
    /// `secret=`: the name of a secret held elsewhere (never a key itself).
    pub secret_ref: Option<String>,
    /// `encryption_key=`: the name of the secret held elsewhere whose bytes are the
    /// encryption key (`wire.encryption` is then set, its key still empty).
    pub encryption_key_ref: Option<String>,
}

impl VolumeUrl {
    /// The file system the URL names (every parsed URL has one).
    pub fn kind(&self) -> Option<FsKind> {
        FsKind::of_wire(&self.wire)
    }
}

/// Parses `url` as volume `name`. The error is a reason to show next to the field.
pub fn parse(name: &str, url: &str) -> Result<VolumeUrl, String> {
    if url.len() > MAX_URL {
        return Err(format!(
            "is {} bytes, longer than {MAX_URL} bytes",
            url.len()
        ));
    }
    let (scheme, rest) = url.split_once("://").ok_or(
        "must be a URL like nfs://server/export, cephfs://monitor/path, smb://server/share or \
         fuse://?sidecar=<container>",
    )?;
    if rest
        .chars()
        .any(|c| matches!(c, '#' | '@' | '%') || c.is_whitespace() || c.is_control())
    {
        return Err(
            "must not contain '#', '@', '%', white space or control characters (no user \
             info, fragment or percent-encoding)"
                .into(),
        );
    }
    let (authority_path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = match authority_path.find('/') {
        Some(i) => authority_path.split_at(i),
        None => (authority_path, ""),
    };
    let mut options = BTreeMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if options.insert(k.to_string(), v.to_string()).is_some() {
            return Err(format!("option {} is given twice", echo(k)));
        }
    }
    let Some(kind) = FsKind::by_name(scheme) else {
        let names: Vec<&str> = FsKind::ALL.iter().map(|k| k.name()).collect();
        return Err(format!(
            "scheme {} is not supported ({})",
            echo(scheme),
            names.join(", ")
        ));
    };
    let secret_ref = if kind.needs_secret() {
        options.remove("secret").filter(|s| !s.is_empty())
    } else {
        None
    };
    // Taken out before the file system reads its options: they are no mount options.
    let encryption_key_ref = options.remove(encryption::OPT_ENCRYPTION_KEY);
    let encryption = encryption::from_url_options(&mut options)?;
    if encryption.is_none() && encryption_key_ref.is_some() {
        return Err(format!(
            "volume.options.{}: is only for encrypted volumes (add encryption={})",
            encryption::OPT_ENCRYPTION_KEY,
            encryption::MODE_LIST
        ));
    }
    let mut wire = agent::VolumeSpec {
        name: name.to_string(),
        source: Some(kind.source_from_url(authority, path, &mut options)?),
        encryption: encryption.into(),
        ..Default::default()
    };
    wire.options = options.into_iter().collect();
    Ok(VolumeUrl {
        wire,
        secret_ref,
        encryption_key_ref: encryption_key_ref.filter(|s| !s.is_empty()),
    })
}

/// The server of `[v6]:port`, `host:port`, ...; a port in the URL becomes the `port` option
/// (NFS and SMB both take it so), refused when `port=` is given as well.
pub(crate) fn server_and_port(
    authority: &str,
    options: &mut BTreeMap<String, String>,
) -> Result<String, String> {
    let (server, port) = split_host_port(authority)?;
    if let Some(port) = port {
        if options.insert("port".into(), port).is_some() {
            return Err("give the port either in the URL or as port=, not both".into());
        }
    }
    Ok(server)
}

/// `[v6]:port`, `[v6]`, `host:port`, `host`.
fn split_host_port(authority: &str) -> Result<(String, Option<String>), String> {
    if authority.is_empty() {
        return Err("the URL has no server".into());
    }
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or("unclosed '[' in the server address")?;
        // Brackets hold an IPv6 address and nothing else (no host name, no zone).
        if host.parse::<Ipv6Addr>().is_err() {
            return Err("the server in '[...]' must be an IPv6 address".into());
        }
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.to_string()),
            None if after.is_empty() => None,
            None => return Err("unexpected text after the IPv6 address".into()),
        };
        return Ok((host.to_string(), port));
    }
    match authority.split_once(':') {
        Some((h, p)) => Ok((h.to_string(), Some(p.to_string()))),
        None => Ok((authority.to_string(), None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nfs_url_fills_server_export_version_and_options() {
        let u = parse("data", "nfs://[fd00::5]:2049/exports/a?vers=4.1&nconnect=4").unwrap();
        let n = u.wire.nfs();
        assert_eq!(
            (n.server.as_str(), n.export.as_str()),
            ("fd00::5", "/exports/a")
        );
        assert_eq!(n.version, "4.1");
        assert_eq!(u.wire.options.get("port").map(String::as_str), Some("2049"));
        assert_eq!(
            u.wire.options.get("nconnect").map(String::as_str),
            Some("4")
        );
        assert!(u.secret_ref.is_none());
    }

    #[test]
    fn cephfs_url_keeps_secret_as_a_reference() {
        let u = parse(
            "c",
            "cephfs://10.0.0.1:6789,10.0.0.2:6789/sub?fs=a&client=x&secret=s",
        )
        .unwrap();
        let c = u.wire.cephfs();
        assert_eq!(c.monitors, ["10.0.0.1:6789", "10.0.0.2:6789"]);
        assert_eq!((c.fs_name.as_str(), c.client.as_str()), ("a", "x"));
        assert!(c.secret.is_empty());
        assert_eq!(u.secret_ref.as_deref(), Some("s"));
    }

    #[test]
    fn encryption_options_leave_the_mount_options_for_the_encryption_field() {
        let u = parse(
            "sec",
            "nfs://10.0.0.5/exports/a?vers=4.1&encryption=luks2&size=10Gi&owner=1000:100\
             &encryption_key=team-key&nconnect=4",
        )
        .unwrap();
        let e = u.wire.encryption.as_ref().expect("encrypted");
        assert_eq!(
            (e.mode.as_str(), e.size_bytes, e.uid, e.gid),
            ("luks2", 10 << 30, 1000, 100)
        );
        assert!(
            e.key.is_empty(),
            "a URL names the key's secret, never carries a key"
        );
        assert_eq!(u.encryption_key_ref.as_deref(), Some("team-key"));
        assert_eq!(u.wire.options.keys().collect::<Vec<_>>(), ["nconnect"]);
        let spec = crate::spec::VolumeSpec::from_wire_unresolved(&u.wire).expect("valid");
        assert_eq!(spec.encryption.as_ref().map(|e| e.size), Some(10 << 30));
        // A plain URL has none of it.
        let u = parse("p", "nfs://10.0.0.5/exports/a").unwrap();
        assert!(u.wire.encryption.is_none() && u.encryption_key_ref.is_none());
    }

    #[test]
    fn a_gocryptfs_url_names_its_key_secret_takes_an_owner_and_refuses_a_size() {
        let u = parse(
            "shared",
            "nfs://10.0.0.5/exports/a?vers=3&encryption=gocryptfs&owner=1000:100\
             &encryption_key=team-key&nolock",
        )
        .unwrap();
        let e = u.wire.encryption.as_ref().expect("encrypted");
        assert_eq!(
            (e.mode.as_str(), e.size_bytes, e.uid, e.gid),
            ("gocryptfs", 0, 1000, 100)
        );
        assert!(e.key.is_empty());
        assert_eq!(u.encryption_key_ref.as_deref(), Some("team-key"));
        assert_eq!(u.wire.options.keys().collect::<Vec<_>>(), ["nolock"]);
        // NFSv3 and nolock are fine: gocryptfs takes no server-side lock.
        let spec = crate::spec::VolumeSpec::from_wire_unresolved(&u.wire).expect("valid");
        assert_eq!(spec.encryption.as_ref().map(|e| e.size), Some(0));
        for (url, want) in [
            (
                "nfs://h/x?encryption=gocryptfs&size=10Gi",
                "volume.options.size: is refused with encryption=gocryptfs: only luks2 volumes \
                 have a size (gocryptfs shares the file system's space)",
            ),
            (
                "nfs://h/x?encryption_key=k",
                "volume.options.encryption_key: is only for encrypted volumes (add \
                 encryption=luks2 or gocryptfs)",
            ),
        ] {
            assert_eq!(parse("v", url).unwrap_err(), want, "{url}");
        }
    }

    #[test]
    fn encryption_options_without_encryption_are_refused_naming_the_option() {
        for (url, words) in [
            (
                "nfs://h/x?size=10Gi",
                "volume.options.size: is only for encrypted volumes",
            ),
            (
                "nfs://h/x?owner=1:1",
                "volume.options.owner: is only for encrypted volumes",
            ),
            (
                "nfs://h/x?encryption_key=k",
                "volume.options.encryption_key: is only for encrypted volumes",
            ),
            (
                "nfs://h/x?encryption=luks2",
                "volume.options.size: is required with encryption=luks2",
            ),
            (
                "nfs://h/x?encryption=plain&size=1Gi",
                "volume.options.encryption: \"plain\" is not an encryption mode",
            ),
            (
                "nfs://h/x?encryption=luks2&size=1Gi&size=2Gi",
                "option \"size\" is given twice",
            ),
            (
                "nfs://h/x?encryption=luks2&size=32Mi",
                "volume.options.size: 33554432 bytes is outside 64Mi",
            ),
        ] {
            let e = parse("v", url).unwrap_err();
            assert!(e.starts_with(words), "{url}: {e}");
        }
    }

    #[test]
    fn malformed_urls_are_refused_with_a_reason() {
        for (url, why) in [
            ("10.0.0.1:/x", "must be a URL"),
            ("nfs://u@h/x", "must not contain"),
            ("nfs:///x", "no server"),
            ("nfs://h/x?vers=3&vers=4", "twice"),
            ("ftp://h/x", "not supported"),
            ("smb://h", "no share"),
            ("nfs://[fd00::1/x", "unclosed"),
            ("nfs://[nfs.example.com]/x", "IPv6"),
            ("nfs://[fe80::1%25eth0]/x", "must not contain"),
            ("nfs://h/x\r", "control"),
            ("nfs://h/x\u{0}", "control"),
            ("nfs://h/x\u{85}", "must not contain"),
            ("nfs://h/\u{2028}x", "must not contain"),
        ] {
            let e = parse("v", url).unwrap_err();
            assert!(e.contains(why), "{url:?}: {e}");
        }
    }

    #[test]
    fn huge_urls_are_refused_by_length_before_anything_is_read() {
        let huge = format!("nfs://h/{}", "e".repeat(4 << 20));
        let e = parse("v", &huge).unwrap_err();
        assert_eq!(
            e,
            format!("is {} bytes, longer than 4096 bytes", huge.len())
        );
        // One option name repeated a million times is refused the same way, without a map
        // of a million entries being built.
        let many = format!("nfs://h/x?{}", "a&".repeat(1 << 20));
        assert!(parse("v", &many).unwrap_err().contains("longer than 4096"));
        let at_limit = format!("nfs://h/{}", "e".repeat(MAX_URL - 8));
        assert_eq!(at_limit.len(), MAX_URL);
        assert!(parse("v", &at_limit).is_ok());
    }

    #[test]
    fn echoed_option_names_and_schemes_are_bounded() {
        let key = "k".repeat(2000);
        let e = parse("v", &format!("nfs://h/x?{key}&{key}")).unwrap_err();
        assert!(
            e.contains("given twice") && e.contains("(2000 bytes)"),
            "{e}"
        );
        assert!(e.len() < 300, "{}", e.len());
        let e = parse("v", &format!("{}\u{1b}[2J://h/x", "s".repeat(3000))).unwrap_err();
        assert!(e.contains("not supported") && e.len() < 300, "{e}");
        assert!(!e.contains('\u{1b}'), "{e:?}");
    }

    #[test]
    fn echo_quotes_escapes_and_cuts_with_the_full_length() {
        assert_eq!(echo("nfs"), "\"nfs\"");
        assert_eq!(echo("a\u{1b}b"), "\"a\\u{1b}b\"");
        let e = echo(&"é".repeat(ECHO_MAX));
        assert!(e.ends_with(&format!("... ({} bytes)", 2 * ECHO_MAX)), "{e}");
        assert_eq!(e.matches('é').count(), ECHO_MAX / 2);
    }
}
