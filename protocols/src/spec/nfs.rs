//! NFS v3 / v4.x: the source's fields, its options, its URL form and what the policy matches.

use std::collections::BTreeMap;

use super::FieldValue::One;
use super::{err, parse_server, validate_path, Kind, Server, SpecError, Typed};
use crate::agent;

pub const NAME: &str = "nfs";
/// Kernel file system types a mount of it shows (`/proc/mounts`) or a caller may name.
pub(super) const KERNEL_TYPES: &[&str] = &["nfs", "nfs4"];

/// `server:/export` (`[v6]:/export`) and the fields a listing shows.
pub(super) fn summary(n: &agent::NfsSource) -> (String, super::SummaryFields) {
    let shown = if n.server.contains(':') {
        format!("[{}]:{}", n.server, n.export)
    } else {
        format!("{}:{}", n.server, n.export)
    };
    let fields = vec![
        ("server", One(n.server.clone())),
        ("export", One(n.export.clone())),
        ("version", One(n.version.clone())),
    ];
    (shown, fields)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NfsSource {
    pub server: Server,
    pub export: String,
    pub version: NfsVersion,
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

pub(super) const OPTIONS: &[(&str, Kind)] = &[
    // Folded into `version`.
    ("vers", Kind::Typed),
    ("nfsvers", Kind::Typed),
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

pub(super) const RESERVED: &[(&str, &str)] = &[
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
    (
        "lock",
        "NFSv3 locking needs statd in the guest; CNFS mounts NFSv3 with nolock",
    ),
];

pub(super) const CONFLICTS: &[(&str, &str)] = &[("hard", "soft"), ("ac", "noac"), ("cto", "nocto")];

/// Values refused with a reason of their own.
pub(super) fn refuse(key: &str, value: &str) -> Option<&'static str> {
    (key == "sec" && value.starts_with("krb5")).then_some(
        "Kerberos needs rpc.gssd and a keytab in the guest, which CNFS guests do not run: use sec=sys",
    )
}

pub(super) fn parse(
    n: &agent::NfsSource,
    typed: &Typed,
    options: &BTreeMap<String, String>,
) -> Result<NfsSource, SpecError> {
    // Both spellings may be given, but must agree (sorted: nfsvers before vers).
    let mut from_options: Option<(&str, NfsVersion)> = None;
    for (field, value) in typed.values() {
        let v = NfsVersion::parse(field, value)?;
        if let Some((first, other)) = from_options {
            if other != v {
                return err(field.clone(), format!("contradicts {first}"));
            }
        }
        from_options = Some((field, v));
    }
    let mut version = NfsVersion::parse("volume.nfs.version", &n.version)?;
    if let Some((field, v)) = from_options {
        if !n.version.is_empty() && v != version {
            return err(field, "contradicts volume.nfs.version");
        }
        version = v;
    }
    let server = parse_server("volume.nfs.server", &n.server)?;
    if let Server::Ip(ip) = &server {
        super::check_address_family(options, *ip)?;
    }
    Ok(NfsSource {
        server,
        export: validate_path("volume.nfs.export", &n.export)?,
        version,
    })
}

impl NfsSource {
    pub(super) fn to_wire(&self) -> agent::NfsSource {
        agent::NfsSource {
            server: self.server.to_string(),
            export: self.export.clone(),
            version: self.version.as_str().to_string(),
            ..Default::default()
        }
    }
}

/// `nfs://server[:port]/export?vers=4.1&<option>...`
pub(super) fn from_url(
    authority: &str,
    path: &str,
    options: &mut BTreeMap<String, String>,
) -> Result<agent::volume_spec::Source, String> {
    let server = crate::volume_url::server_and_port(authority, options)?;
    let version = options.remove("vers").or_else(|| options.remove("nfsvers"));
    Ok(agent::volume_spec::Source::Nfs(agent::NfsSource {
        server,
        export: path.to_string(),
        version: version.unwrap_or_default(),
        ..Default::default()
    }))
}
