//! The volume spec: one validation both sides run, so that the host refuses early and the
//! guest re-checks the same invariants. Every error names the field and the reason; no error
//! ever carries a secret's value.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use crate::agent;

/// Where the agent mounts volumes; callers never choose a path.
pub const VOLUME_ROOT: &str = "/run/cnfs/volumes";

const MAX_OPTIONS: usize = 32;
const MAX_OPTION_VALUE: usize = 64;
const MAX_PATH: usize = 1024;
const MAX_MONITORS: usize = 16;

/// A refused field: `field` is the dotted wire name (`volume.nfs.server`, `volume.options.rsize`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SpecError {
    pub field: String,
    pub reason: String,
}

fn err<T>(field: impl Into<String>, reason: impl Into<String>) -> Result<T, SpecError> {
    Err(SpecError {
        field: field.into(),
        reason: reason.into(),
    })
}

/// A validated volume request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    pub name: String,
    pub source: Source,
    pub read_only: bool,
    /// File-system options that passed the allowlist, without the ones folded into typed
    /// fields (`vers`, `ro`).
    pub options: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Nfs(NfsSource),
    CephFs(CephFsSource),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NfsSource {
    pub server: Server,
    pub export: String,
    pub version: NfsVersion,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Server {
    Ip(IpAddr),
    Host(String),
}

impl fmt::Display for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Server::Ip(ip) => write!(f, "{ip}"),
            Server::Host(h) => f.write_str(h),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NfsVersion {
    V3,
    V4_0,
    V4_1,
    V4_2,
}

impl NfsVersion {
    /// The value of the kernel's `vers=` option.
    pub fn as_str(self) -> &'static str {
        match self {
            NfsVersion::V3 => "3",
            NfsVersion::V4_0 => "4.0",
            NfsVersion::V4_1 => "4.1",
            NfsVersion::V4_2 => "4.2",
        }
    }

    fn parse(field: &str, v: &str) -> Result<Self, SpecError> {
        match v {
            "3" => Ok(NfsVersion::V3),
            "4" | "4.0" => Ok(NfsVersion::V4_0),
            "" | "4.1" => Ok(NfsVersion::V4_1),
            "4.2" => Ok(NfsVersion::V4_2),
            _ => err(field, "must be one of 3, 4.0, 4.1, 4.2"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CephFsSource {
    pub monitors: Vec<SocketAddr>,
    pub fs_name: String,
    pub path: String,
    pub client: String,
    pub secret: Secret,
    pub fsid: Option<String>,
}

/// A secret value: shows as `<redacted>` in Debug and Display so that it cannot slip into a
/// log line or an error through formatting.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// How an option's value is checked.
#[derive(Clone, Copy)]
enum Kind {
    Flag,
    Uint(u64, u64),
    OneOf(&'static [&'static str]),
}

/// Generic VFS flags (become MS_* flags in the guest); allowed for every file system.
pub const VFS_FLAGS: &[&str] = &[
    "nosuid",
    "nodev",
    "noexec",
    "noatime",
    "nodiratime",
    "relatime",
];

const NFS_OPTIONS: &[(&str, Kind)] = &[
    ("proto", Kind::OneOf(&["tcp", "tcp6"])),
    ("port", Kind::Uint(1, 65535)),
    ("mountport", Kind::Uint(1, 65535)),
    ("mountproto", Kind::OneOf(&["tcp", "udp", "tcp6", "udp6"])),
    ("mountvers", Kind::OneOf(&["3"])),
    ("rsize", Kind::Uint(4096, 1_048_576)),
    ("wsize", Kind::Uint(4096, 1_048_576)),
    ("timeo", Kind::Uint(1, 6000)),
    ("retrans", Kind::Uint(0, 10)),
    ("hard", Kind::Flag),
    ("soft", Kind::Flag),
    ("softerr", Kind::Flag),
    ("nconnect", Kind::Uint(1, 16)),
    ("noac", Kind::Flag),
    ("ac", Kind::Flag),
    ("acregmin", Kind::Uint(0, 3600)),
    ("acregmax", Kind::Uint(0, 3600)),
    ("acdirmin", Kind::Uint(0, 3600)),
    ("acdirmax", Kind::Uint(0, 3600)),
    ("actimeo", Kind::Uint(0, 3600)),
    (
        "lookupcache",
        Kind::OneOf(&["all", "none", "pos", "positive"]),
    ),
    ("nolock", Kind::Flag),
    (
        "local_lock",
        Kind::OneOf(&["none", "all", "flock", "posix"]),
    ),
    ("sec", Kind::OneOf(&["sys"])),
    ("cto", Kind::Flag),
    ("nocto", Kind::Flag),
    ("sharecache", Kind::Flag),
    ("nosharecache", Kind::Flag),
    ("noresvport", Kind::Flag),
    ("resvport", Kind::Flag),
];

const CEPHFS_OPTIONS: &[(&str, Kind)] = &[
    (
        "ms_mode",
        Kind::OneOf(&["crc", "secure", "prefer-crc", "prefer-secure"]),
    ),
    ("recover_session", Kind::OneOf(&["no", "clean"])),
    ("rasize", Kind::Uint(0, 1 << 30)),
    ("rsize", Kind::Uint(4096, 64 << 20)),
    ("wsize", Kind::Uint(4096, 64 << 20)),
    ("noshare", Kind::Flag),
    ("mount_timeout", Kind::Uint(1, 300)),
    ("caps_max", Kind::Uint(0, 1 << 20)),
    ("dcache", Kind::Flag),
    ("nodcache", Kind::Flag),
    ("noasyncreaddir", Kind::Flag),
];

/// Options that must never come from a caller, with the reason given back.
const RESERVED: &[(&str, &str)] = &[
    ("addr", "set by the agent from the resolved server address"),
    (
        "clientaddr",
        "set by the agent from the route to the server",
    ),
    (
        "mounthost",
        "not allowed: the mount server is the volume's server",
    ),
    (
        "mountaddr",
        "not allowed: the mount server is the volume's server",
    ),
    ("secret", "pass the key in the cephfs.secret field"),
    ("secretfile", "pass the key in the cephfs.secret field"),
    ("key", "pass the key in the cephfs.secret field"),
    ("name", "pass the client name in the cephfs.client field"),
    ("mon_addr", "pass monitors in the cephfs.monitors field"),
    ("fsid", "pass the fsid in the cephfs.fsid field"),
    ("context", "SELinux contexts are not supported"),
    (
        "lock",
        "NFSv3 locking needs statd in the guest; CNFS mounts NFSv3 with nolock",
    ),
];

impl VolumeSpec {
    /// Validates a wire spec. With [`VolumeSpec::from_wire_unresolved`] the only
    /// constructors: a `VolumeSpec` is always valid.
    pub fn from_wire(w: &agent::VolumeSpec) -> Result<Self, SpecError> {
        Self::validate(w, true)
    }

    /// The host's form before secrets are resolved: the same checks, except that a CephFS key
    /// may still be absent (the pod names a host-side secret; the key is filled in just
    /// before the request leaves for the guest, which validates it with `from_wire`).
    pub fn from_wire_unresolved(w: &agent::VolumeSpec) -> Result<Self, SpecError> {
        Self::validate(w, false)
    }

    fn validate(w: &agent::VolumeSpec, require_secret: bool) -> Result<Self, SpecError> {
        validate_name("volume.name", &w.name)?;
        let mut read_only = w.read_only;
        let mut options = BTreeMap::new();
        if w.options.len() > MAX_OPTIONS {
            return err(
                "volume.options",
                format!("at most {MAX_OPTIONS} options are allowed"),
            );
        }
        let (table, fs_field): (&[(&str, Kind)], &str) = match &w.source {
            Some(agent::volume_spec::Source::Nfs(_)) => (NFS_OPTIONS, "nfs"),
            Some(agent::volume_spec::Source::Cephfs(_)) => (CEPHFS_OPTIONS, "cephfs"),
            None => return err("volume.source", "one of nfs or cephfs is required"),
        };
        let mut vers_option: Option<(String, String)> = None;
        // Sorted order, so that the first error reported is stable.
        let sorted: BTreeMap<&String, &String> = w.options.iter().collect();
        for (key, value) in sorted {
            let field = format!("volume.options.{}", printable(key));
            if key == "ro" || key == "rw" {
                if !value.is_empty() {
                    return err(field, "is a flag and takes no value");
                }
                if key == "rw" && w.read_only {
                    return err(field, "contradicts read_only=true");
                }
                read_only |= key == "ro";
                continue;
            }
            if fs_field == "nfs" && (key == "vers" || key == "nfsvers") {
                // Both spellings may be given, but must agree (sorted: nfsvers before vers).
                let v = NfsVersion::parse(&field, value)?;
                if let Some((first, other)) = &vers_option {
                    if NfsVersion::parse(first, other)? != v {
                        return err(field.clone(), format!("contradicts {first}"));
                    }
                }
                vers_option = Some((field, value.clone()));
                continue;
            }
            if fs_field == "nfs" && key == "sec" && value.starts_with("krb5") {
                return err(
                    field,
                    "Kerberos needs rpc.gssd and a keytab in the guest, which CNFS guests do not run: use sec=sys",
                );
            }
            if let Some((_, why)) = RESERVED.iter().find(|(k, _)| k == key) {
                return err(field, *why);
            }
            let kind = if VFS_FLAGS.contains(&key.as_str()) {
                Kind::Flag
            } else if let Some((_, kind)) = table.iter().find(|(k, _)| k == key) {
                *kind
            } else {
                return err(
                    field,
                    format!("unknown or not allowed for {fs_field} volumes"),
                );
            };
            check_value(&field, kind, value)?;
            options.insert(key.clone(), value.clone());
        }
        for (a, b) in [("hard", "soft"), ("ac", "noac"), ("cto", "nocto")] {
            if options.contains_key(a) && options.contains_key(b) {
                return err(
                    format!("volume.options.{b}"),
                    format!("contradicts option {a}"),
                );
            }
        }
        let source = match &w.source {
            Some(agent::volume_spec::Source::Nfs(n)) => {
                let mut version = NfsVersion::parse("volume.nfs.version", &n.version)?;
                if let Some((field, v)) = vers_option {
                    let from_option = NfsVersion::parse(&field, &v)?;
                    if !n.version.is_empty() && from_option != version {
                        return err(field, "contradicts volume.nfs.version");
                    }
                    version = from_option;
                }
                let server = parse_server("volume.nfs.server", &n.server)?;
                if let Server::Ip(ip) = &server {
                    check_address_family(&options, *ip)?;
                }
                Source::Nfs(NfsSource {
                    server,
                    export: validate_path("volume.nfs.export", &n.export)?,
                    version,
                })
            }
            Some(agent::volume_spec::Source::Cephfs(c)) => {
                Source::CephFs(parse_cephfs(c, require_secret)?)
            }
            None => return err("volume.source", "one of nfs or cephfs is required"),
        };
        Ok(VolumeSpec {
            name: w.name.clone(),
            source,
            read_only,
            options,
        })
    }

    /// The wire form; `with_secret` false blanks secrets (for `List` and logs).
    pub fn to_wire(&self, with_secret: bool) -> agent::VolumeSpec {
        let mut w = agent::VolumeSpec {
            name: self.name.clone(),
            read_only: self.read_only,
            options: self
                .options
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            ..Default::default()
        };
        match &self.source {
            Source::Nfs(n) => w.set_nfs(agent::NfsSource {
                server: n.server.to_string(),
                export: n.export.clone(),
                version: n.version.as_str().to_string(),
                ..Default::default()
            }),
            Source::CephFs(c) => w.set_cephfs(agent::CephFsSource {
                monitors: c.monitors.iter().map(|m| m.to_string()).collect(),
                fs_name: c.fs_name.clone(),
                path: c.path.clone(),
                client: c.client.clone(),
                secret: if with_secret {
                    c.secret.expose().to_string()
                } else {
                    String::new()
                },
                fsid: c.fsid.clone().unwrap_or_default(),
                ..Default::default()
            }),
        }
        w
    }

    /// The one place the guest mounts this volume.
    pub fn mount_point(&self) -> PathBuf {
        mount_point(&self.name)
    }

    /// Short name of the file system for logs and listings.
    pub fn fs_name(&self) -> &'static str {
        match self.source {
            Source::Nfs(_) => "nfs",
            Source::CephFs(_) => "cephfs",
        }
    }
}

/// `proto=` and `mountproto=` name an address family (`tcp` IPv4, `tcp6` IPv6) that must be
/// the server's: the kernel refuses a mismatch with a bare EINVAL. Run again in the guest
/// once a host name is resolved.
pub fn check_address_family(
    options: &BTreeMap<String, String>,
    server: IpAddr,
) -> Result<(), SpecError> {
    for key in ["proto", "mountproto"] {
        let Some(value) = options.get(key) else {
            continue;
        };
        let v6 = value.ends_with('6');
        if v6 != server.is_ipv6() {
            let family = if server.is_ipv6() { "IPv6" } else { "IPv4" };
            let want = match (key, server.is_ipv6()) {
                ("proto", true) => "tcp6",
                ("proto", false) => "tcp",
                (_, true) => "tcp6 or udp6",
                (_, false) => "tcp or udp",
            };
            return err(
                format!("volume.options.{key}"),
                format!("{value} does not match the server's {family} address {server}: use {want}, or leave it out"),
            );
        }
    }
    Ok(())
}

/// `/run/cnfs/volumes/<name>` for a name that passed [`validate_name`].
pub fn mount_point(name: &str) -> PathBuf {
    PathBuf::from(VOLUME_ROOT).join(name)
}

/// A volume name is a DNS label: it becomes a directory name and appears in annotations.
pub fn validate_name(field: &str, name: &str) -> Result<(), SpecError> {
    if name.is_empty() {
        return err(field, "is required");
    }
    if name.len() > 63 {
        return err(field, "must be at most 63 characters");
    }
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok_chars || name.starts_with('-') || name.ends_with('-') {
        return err(
            field,
            format!(
                "{:?} is not a DNS label (lower-case letters, digits, '-', not at either end)",
                printable(name)
            ),
        );
    }
    Ok(())
}

/// A sandbox id as containerd and Kata use them (64 hex characters in CRI, but any
/// reasonable identifier is accepted).
pub fn validate_sandbox_id(field: &str, id: &str) -> Result<(), SpecError> {
    if id.is_empty() || id.len() > 128 {
        return err(field, "must be 1 to 128 characters");
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return err(field, "may contain only letters, digits, '-', '_' and '.'");
    }
    Ok(())
}

fn check_value(field: &str, kind: Kind, value: &str) -> Result<(), SpecError> {
    if value.len() > MAX_OPTION_VALUE {
        return err(field, "value is too long");
    }
    match kind {
        Kind::Flag if value.is_empty() => Ok(()),
        Kind::Flag => err(field, "is a flag and takes no value"),
        Kind::Uint(min, max) => {
            let n: u64 = value
                .parse()
                .ok()
                .filter(|_| value.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| SpecError {
                    field: field.to_string(),
                    reason: format!("{:?} is not a whole number", printable(value)),
                })?;
            if n < min || n > max {
                return err(field, format!("must be between {min} and {max}"));
            }
            Ok(())
        }
        Kind::OneOf(allowed) if allowed.contains(&value) => Ok(()),
        Kind::OneOf(allowed) => err(field, format!("must be one of {}", allowed.join(", "))),
    }
}

fn parse_server(field: &str, server: &str) -> Result<Server, SpecError> {
    if server.is_empty() {
        return err(field, "is required");
    }
    let bare = server
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(server);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
        if ip.is_unspecified() || ip.is_multicast() || broadcast {
            return err(field, "must be a unicast address");
        }
        return Ok(Server::Ip(ip));
    }
    validate_hostname(field, server)?;
    Ok(Server::Host(server.to_ascii_lowercase()))
}

/// RFC 1123 host name. Its character set alone keeps `,` and `=` (option injection) out.
fn validate_hostname(field: &str, host: &str) -> Result<(), SpecError> {
    let bad = || SpecError {
        field: field.to_string(),
        reason: format!(
            "{:?} is neither an IP address nor a valid host name",
            printable(host)
        ),
    };
    if host.len() > 253 || host.ends_with('.') {
        return Err(bad());
    }
    for label in host.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(bad());
        }
    }
    // An all-numeric dotted name that did not parse as an address is a typo, not a host.
    if host
        .split('.')
        .all(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(bad());
    }
    Ok(())
}

/// An absolute, clean path (a server export, a CephFS path, a container path): no `.`/`..`
/// segments, no empty segments, and a conservative character set (no `,` `=` `:` or white
/// space that could bend the device string or the option string).
pub fn validate_path(field: &str, path: &str) -> Result<String, SpecError> {
    if path.is_empty() {
        return err(field, "is required");
    }
    if path.len() > MAX_PATH {
        return err(field, format!("must be at most {MAX_PATH} characters"));
    }
    if !path.starts_with('/') {
        return err(field, "must be an absolute path");
    }
    if let Some(c) = path
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "/._-~+@".contains(*c)))
    {
        return err(
            field,
            format!("character {c:?} is not allowed (letters, digits and / . _ - ~ + @)"),
        );
    }
    if path != "/" {
        let trimmed = path.strip_suffix('/').unwrap_or(path);
        if trimmed[1..]
            .split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..")
        {
            return err(field, "must be a clean path (no //, . or .. segments)");
        }
        return Ok(trimmed.to_string());
    }
    Ok(path.to_string())
}

fn parse_cephfs(c: &agent::CephFsSource, require_secret: bool) -> Result<CephFsSource, SpecError> {
    if c.monitors.is_empty() {
        return err("volume.cephfs.monitors", "at least one monitor is required");
    }
    if c.monitors.len() > MAX_MONITORS {
        return err(
            "volume.cephfs.monitors",
            format!("at most {MAX_MONITORS} monitors"),
        );
    }
    let monitors = c
        .monitors
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.parse::<SocketAddr>().map_err(|_| SpecError {
                field: format!("volume.cephfs.monitors[{i}]"),
                reason: format!("{:?} is not ip:port", printable(m)),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let ident = |field: &str, v: &str| -> Result<String, SpecError> {
        if v.is_empty() || v.len() > 64 {
            return err(field, "must be 1 to 64 characters");
        }
        if !v
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return err(field, "may contain only letters, digits, '-', '_' and '.'");
        }
        Ok(v.to_string())
    };
    let fs_name = ident("volume.cephfs.fs_name", &c.fs_name)?;
    let client = ident("volume.cephfs.client", &c.client)?;
    let path = if c.path.is_empty() {
        "/".to_string()
    } else {
        validate_path("volume.cephfs.path", &c.path)?
    };
    // Never echo the key back, not even in part.
    let key_ok = (c.secret.is_empty() && !require_secret)
        || !c.secret.is_empty()
            && c.secret.len() <= 128
            && c.secret
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
    if !key_ok {
        return err(
            "volume.cephfs.secret",
            "must be a base64 cephx key (value not shown)",
        );
    }
    let fsid = if c.fsid.is_empty() {
        None
    } else {
        let f = &c.fsid;
        let shape_ok = f.len() == 36
            && f.bytes().enumerate().all(|(i, b)| match i {
                8 | 13 | 18 | 23 => b == b'-',
                _ => b.is_ascii_hexdigit(),
            });
        if !shape_ok {
            return err("volume.cephfs.fsid", "must be a UUID");
        }
        Some(f.to_ascii_lowercase())
    };
    Ok(CephFsSource {
        monitors,
        fs_name,
        path,
        client,
        secret: Secret(c.secret.clone()),
        fsid,
    })
}

/// The first `max` bytes of `s` (cut back to a character boundary), and whether it was cut:
/// the one place caller or guest text is shortened before it is echoed.
pub fn cut(s: &str, max: usize) -> (&str, bool) {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    (&s[..end], end < s.len())
}

/// Untrusted text shown back in an error or a log line: control characters escaped, cut at
/// `max` bytes with the full size named, so that no echo is ever much larger than `max`
/// whatever was sent, and none can forge a log line.
pub fn printable_within(s: &str, max: usize) -> String {
    let (shown, was_cut) = cut(s, max);
    let mut out: String = shown.escape_debug().collect();
    if was_cut {
        out.push_str(&format!("... ({} bytes)", s.len()));
    }
    out
}

/// [`printable_within`] 80 bytes: for names and values in spec errors.
pub fn printable(s: &str) -> String {
    printable_within(s, 80)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nfs(server: &str, export: &str, version: &str) -> agent::VolumeSpec {
        let mut w = agent::VolumeSpec {
            name: "data".into(),
            ..Default::default()
        };
        w.set_nfs(agent::NfsSource {
            server: server.into(),
            export: export.into(),
            version: version.into(),
            ..Default::default()
        });
        w
    }

    fn with_opt(mut w: agent::VolumeSpec, k: &str, v: &str) -> agent::VolumeSpec {
        w.options.insert(k.into(), v.into());
        w
    }

    #[test]
    fn valid_nfs_spec_is_normalised() {
        let w = with_opt(nfs("10.1.2.3", "/exports/a/", ""), "ro", "");
        let w = with_opt(w, "vers", "4.2");
        let w = with_opt(w, "rsize", "65536");
        let s = VolumeSpec::from_wire(&w).expect("valid");
        assert!(s.read_only);
        assert_eq!(s.options.keys().collect::<Vec<_>>(), vec!["rsize"]);
        match &s.source {
            Source::Nfs(n) => {
                assert_eq!(n.export, "/exports/a");
                assert_eq!(n.version, NfsVersion::V4_2);
            }
            Source::CephFs(_) => panic!("nfs expected"),
        }
        assert_eq!(s.mount_point(), PathBuf::from("/run/cnfs/volumes/data"));
        // Round trip through the wire form gives the same spec.
        assert_eq!(VolumeSpec::from_wire(&s.to_wire(true)).expect("valid"), s);
    }

    #[test]
    fn hostile_inputs_name_their_field() {
        let cases: Vec<(agent::VolumeSpec, &str)> = vec![
            (nfs("10.0.0.1,addr=1.2.3.4", "/x", ""), "volume.nfs.server"),
            (nfs("srv=x", "/x", ""), "volume.nfs.server"),
            (nfs("0.0.0.0", "/x", ""), "volume.nfs.server"),
            (nfs("a..b", "/x", ""), "volume.nfs.server"),
            (nfs("1.2.3", "/x", ""), "volume.nfs.server"),
            (nfs("10.0.0.1", "relative", ""), "volume.nfs.export"),
            (nfs("10.0.0.1", "/a/../etc", ""), "volume.nfs.export"),
            (nfs("10.0.0.1", "/a,vers=3", ""), "volume.nfs.export"),
            (nfs("10.0.0.1", "/a b", ""), "volume.nfs.export"),
            (nfs("10.0.0.1", "//a", ""), "volume.nfs.export"),
            (nfs("10.0.0.1", "/x", "5"), "volume.nfs.version"),
            (
                with_opt(nfs("10.0.0.1", "/x", ""), "addr", "1.2.3.4"),
                "volume.options.addr",
            ),
            (
                with_opt(nfs("10.0.0.1", "/x", ""), "rsize", "1,wsize=2"),
                "volume.options.rsize",
            ),
            (
                with_opt(nfs("10.0.0.1", "/x", ""), "bogus", ""),
                "volume.options.bogus",
            ),
            (
                with_opt(nfs("10.0.0.1", "/x", ""), "hard", "1"),
                "volume.options.hard",
            ),
            (
                with_opt(nfs("10.0.0.1", "/x", "4.1"), "vers", "3"),
                "volume.options.vers",
            ),
            (
                with_opt(with_opt(nfs("10.0.0.1", "/x", ""), "hard", ""), "soft", ""),
                "volume.options.soft",
            ),
            // Issue 10 item 5: each of these used to pass validation.
            (
                with_opt(
                    with_opt(nfs("10.0.0.1", "/x", ""), "vers", "4.1"),
                    "nfsvers",
                    "3",
                ),
                "volume.options.vers",
            ),
            (
                with_opt(nfs("10.0.0.1", "/x", ""), "sec", "krb5p"),
                "volume.options.sec",
            ),
            (
                with_opt(nfs("10.0.0.1", "/x", ""), "proto", "tcp6"),
                "volume.options.proto",
            ),
            (
                with_opt(nfs("fd00::5", "/x", ""), "proto", "tcp"),
                "volume.options.proto",
            ),
            (
                with_opt(nfs("[fd00::5]", "/x", "3"), "mountproto", "udp"),
                "volume.options.mountproto",
            ),
            (nfs("255.255.255.255", "/x", ""), "volume.nfs.server"),
            (nfs("224.0.0.1", "/x", ""), "volume.nfs.server"),
        ];
        for (w, field) in cases {
            let e = VolumeSpec::from_wire(&w).expect_err(field);
            assert_eq!(e.field, field, "{e}");
        }
    }

    #[test]
    fn agreeing_version_spellings_and_matching_families_pass() {
        let w = with_opt(nfs("10.0.0.1", "/x", ""), "vers", "4.1");
        let w = with_opt(with_opt(w, "nfsvers", "4.1"), "proto", "tcp");
        assert!(VolumeSpec::from_wire(&w).is_ok());
        let w = with_opt(nfs("fd00::5", "/x", "3"), "proto", "tcp6");
        let w = with_opt(w, "mountproto", "udp6");
        assert!(VolumeSpec::from_wire(&w).is_ok());
        // A host name is checked in the guest once resolved.
        let w = with_opt(nfs("nfs.example.com", "/x", ""), "proto", "tcp6");
        assert!(VolumeSpec::from_wire(&w).is_ok());
    }

    #[test]
    fn echoed_caller_text_is_bounded() {
        let huge = "x".repeat(4 << 20);
        let shown = printable(&huge);
        assert!(shown.len() < 120, "{}", shown.len());
        assert!(shown.ends_with("... (4194304 bytes)"), "{shown}");
        let e = validate_name("volume.name", &format!("A{huge}")).expect_err("too long");
        assert!(e.to_string().len() < 200);
        assert_eq!(printable("a\nb"), "a\\nb");
    }

    #[test]
    fn names_must_be_dns_labels() {
        for bad in ["", "Data", "-a", "a-", "a_b", "a/b", "..", &"a".repeat(64)] {
            assert!(validate_name("volume.name", bad).is_err(), "{bad:?}");
        }
        for good in ["a", "data-1", &"a".repeat(63)] {
            assert!(validate_name("volume.name", good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn cephfs_secret_never_appears_in_errors_or_debug() {
        let mut w = agent::VolumeSpec {
            name: "c".into(),
            ..Default::default()
        };
        w.set_cephfs(agent::CephFsSource {
            monitors: vec!["10.0.0.1:6789".into()],
            fs_name: "cephfs".into(),
            client: "admin".into(),
            secret: "AQBsecret,key=evil".into(),
            ..Default::default()
        });
        let e = VolumeSpec::from_wire(&w).expect_err("bad key");
        assert_eq!(e.field, "volume.cephfs.secret");
        assert!(!e.to_string().contains("AQBsecret"));
        if let Some(agent::volume_spec::Source::Cephfs(c)) = &mut w.source {
            c.secret = "AQBsecretkey==".into();
        }
        let s = VolumeSpec::from_wire(&w).expect("valid");
        assert!(!format!("{s:?}").contains("AQBsecretkey"));
        assert!(s.to_wire(false).cephfs().secret.is_empty());
    }
}
