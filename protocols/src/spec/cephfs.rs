//! CephFS: the source's fields (monitors, file system, path, cephx client and key), its
//! options, its URL form, its credentials and what the policy matches.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use super::FieldValue::{Many, One};
use super::{err, printable, validate_path, Credentials, Kind, Secret, SpecError};
use crate::agent;

pub const NAME: &str = "cephfs";
/// Kernel file system types a mount of it shows (`/proc/mounts`) or a caller may name.
pub(super) const KERNEL_TYPES: &[&str] = &["ceph"];

/// `mon,mon:/path` and the fields a listing shows (never the key).
pub(super) fn summary(c: &agent::CephFsSource) -> (String, super::SummaryFields) {
    let shown = format!("{}:{}", c.monitors.join(","), c.path);
    let fields = vec![
        ("monitors", Many(c.monitors.clone())),
        ("fs_name", One(c.fs_name.clone())),
        ("path", One(c.path.clone())),
        ("client", One(c.client.clone())),
        ("fsid", One(c.fsid.clone())),
    ];
    (shown, fields)
}

const MAX_MONITORS: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CephFsSource {
    pub monitors: Vec<SocketAddr>,
    pub fs_name: String,
    pub path: String,
    pub client: String,
    pub secret: Secret,
    pub fsid: Option<String>,
}

pub(super) const OPTIONS: &[(&str, Kind)] = &[
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

pub(super) const RESERVED: &[(&str, &str)] = &[
    ("secret", "pass the key in the cephfs.secret field"),
    ("secretfile", "pass the key in the cephfs.secret field"),
    ("key", "pass the key in the cephfs.secret field"),
    ("name", "pass the client name in the cephfs.client field"),
    ("mon_addr", "pass monitors in the cephfs.monitors field"),
    ("fsid", "pass the fsid in the cephfs.fsid field"),
];

pub(super) const CONFLICTS: &[(&str, &str)] = &[("dcache", "nodcache")];

/// The keys of a CephFS secret: a CSI node-publish secret's `userKey` (the cephx key) and
/// `userID` (the client, unless the source names it); an annotation's secret file holds the
/// key alone.
pub const SECRET_KEYS: &[&str] = &["userKey", "userID"];
pub const REQUIRED_SECRET_KEYS: &[&str] = &["userKey"];

pub(super) fn credentials_from_file(text: &str) -> Credentials {
    Credentials::from_pairs([("userKey", text.trim())])
}

pub(super) fn apply(c: &mut agent::CephFsSource, creds: &Credentials) -> Result<(), SpecError> {
    if let Some(id) = creds.get("userID") {
        if c.client.is_empty() {
            c.client = id.to_string();
        } else if c.client != id {
            return err("secrets.userID", "differs from the client= of the source");
        }
    }
    if let Some(key) = creds.get("userKey") {
        c.secret = key.to_string();
    }
    Ok(())
}

/// `cephfs://mon[,mon...]/path?fs=<name>&client=<id>[&fsid=<uuid>][&<option>...]`
pub(super) fn from_url(
    authority: &str,
    path: &str,
    options: &mut BTreeMap<String, String>,
) -> Result<agent::volume_spec::Source, String> {
    let mut take = |k: &str| options.remove(k).unwrap_or_default();
    Ok(agent::volume_spec::Source::Cephfs(agent::CephFsSource {
        monitors: authority.split(',').map(str::to_string).collect(),
        fs_name: take("fs"),
        path: path.to_string(),
        client: take("client"),
        fsid: take("fsid"),
        ..Default::default()
    }))
}

impl CephFsSource {
    pub(super) fn to_wire(&self, with_secret: bool) -> agent::CephFsSource {
        agent::CephFsSource {
            monitors: self.monitors.iter().map(|m| m.to_string()).collect(),
            fs_name: self.fs_name.clone(),
            path: self.path.clone(),
            client: self.client.clone(),
            secret: if with_secret {
                self.secret.expose().to_string()
            } else {
                String::new()
            },
            fsid: self.fsid.clone().unwrap_or_default(),
            ..Default::default()
        }
    }
}

pub(super) fn parse(
    c: &agent::CephFsSource,
    require_secret: bool,
) -> Result<CephFsSource, SpecError> {
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
