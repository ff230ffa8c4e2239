//! The volume spec: one validation both sides run, so that the host refuses early and the
//! guest re-checks the same invariants. Every error names the field and the reason; no error
//! ever carries a secret's value.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use crate::agent;

/// Where the agent mounts volumes; callers never choose a path.
pub const VOLUME_ROOT: &str = "/run/cnfs/volumes";

const MAX_OPTIONS: usize = 32;
const MAX_OPTION_VALUE: usize = 64;
const MAX_PATH: usize = 1024;

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

mod cephfs;
pub mod encryption;
pub mod fuse;
mod nfs;
mod smb;

pub use cephfs::CephFsSource;
pub use encryption::{Encryption, EncryptionMode, SecretBytes};
pub use fuse::FuseSource;
pub use nfs::{NfsSource, NfsVersion};
pub use smb::{SmbSource, SmbVersion};

/// A validated volume request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    pub name: String,
    pub source: Source,
    pub read_only: bool,
    /// File-system options that passed the allowlist, without the ones folded into typed
    /// fields (`vers`, `ro`).
    pub options: BTreeMap<String, String>,
    /// Set: the volume is an encrypted container on the share (its options were refused
    /// where they would keep locks in the guest).
    pub encryption: Option<Encryption>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Nfs(NfsSource),
    CephFs(CephFsSource),
    Smb(SmbSource),
    Fuse(FuseSource),
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
    /// An octal mode (`0755`), at most this value.
    Octal(u32),
    OneOf(&'static [&'static str]),
    /// Folded into a field of the source by its module (e.g. `vers`).
    Typed,
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

/// The file systems CNFS knows. Everything file-system-specific that host-side code asks
/// (its name in specs, URLs and policies, its options, the secret it needs and how that
/// secret is read and applied) is answered here, by the file system's own module; callers
/// ask the kind instead of matching on sources. Adding a file system is a module, a
/// variant and the arms the compiler asks for in this file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    Nfs,
    CephFs,
    Smb,
    Fuse,
}

/// A source's fields as a listing shows them: name and value(s), never a secret.
pub type SummaryFields = Vec<(&'static str, FieldValue)>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldValue {
    One(String),
    /// A list (CephFS monitors).
    Many(Vec<String>),
}

/// A typed option folded into a source field: key -> (its field name, value).
type Typed = BTreeMap<String, (String, String)>;

/// Options every file system refuses.
const RESERVED: &[(&str, &str)] = &[
    ("context", "SELinux contexts are not supported"),
    (
        encryption::OPT_ENCRYPTION,
        "not a mount option: encryption goes in volume.encryption (the URL's encryption=luks2 or \
         encryption=gocryptfs)",
    ),
    (
        encryption::OPT_SIZE,
        "not a mount option: the size of an encrypted (luks2) volume goes in volume.encryption",
    ),
    (
        encryption::OPT_OWNER,
        "not a mount option: the owner of an encrypted volume goes in volume.encryption",
    ),
    (
        encryption::OPT_GROW,
        "not a mount option: grow=quota of an encrypted (luks2) volume goes in \
         volume.encryption",
    ),
    (
        encryption::OPT_ENCRYPTION_KEY,
        "not a mount option: names the host-side secret that holds an encrypted volume's key",
    ),
];

impl FsKind {
    pub const ALL: &'static [FsKind] = &[FsKind::Nfs, FsKind::CephFs, FsKind::Smb, FsKind::Fuse];

    /// The name in specs, policies (`filesystems`), listings, and the URL scheme.
    pub fn name(self) -> &'static str {
        match self {
            FsKind::Nfs => nfs::NAME,
            FsKind::CephFs => cephfs::NAME,
            FsKind::Smb => smb::NAME,
            FsKind::Fuse => fuse::NAME,
        }
    }

    pub fn by_name(name: &str) -> Option<FsKind> {
        Self::ALL.iter().copied().find(|k| k.name() == name)
    }

    /// Kernel file system types of its mounts (mountinfo, CSI `fs_type`).
    pub fn kernel_types(self) -> &'static [&'static str] {
        match self {
            FsKind::Nfs => nfs::KERNEL_TYPES,
            FsKind::CephFs => cephfs::KERNEL_TYPES,
            FsKind::Smb => smb::KERNEL_TYPES,
            FsKind::Fuse => fuse::KERNEL_TYPES,
        }
    }

    /// The kind a name or a kernel type names (`nfs4` is NFS, `cifs` is SMB).
    pub fn by_name_or_kernel_type(name: &str) -> Option<FsKind> {
        Self::ALL
            .iter()
            .copied()
            .find(|k| k.name() == name || k.kernel_types().contains(&name))
    }

    /// How a wire spec's source reads to a person: its kind, the device as one writes it
    /// (`server:/export`, `//server/share`) and its fields, never a secret.
    pub fn summary(w: &agent::VolumeSpec) -> Option<(FsKind, String, SummaryFields)> {
        let (kind, (shown, fields)) = match w.source.as_ref()? {
            agent::volume_spec::Source::Nfs(n) => (FsKind::Nfs, nfs::summary(n)),
            agent::volume_spec::Source::Cephfs(c) => (FsKind::CephFs, cephfs::summary(c)),
            agent::volume_spec::Source::Smb(s) => (FsKind::Smb, smb::summary(s)),
            agent::volume_spec::Source::Fuse(f) => (FsKind::Fuse, fuse::summary(f)),
        };
        Some((kind, shown, fields))
    }

    /// The kind of a wire spec's source.
    pub fn of_wire(w: &agent::VolumeSpec) -> Option<FsKind> {
        Some(match w.source.as_ref()? {
            agent::volume_spec::Source::Nfs(_) => FsKind::Nfs,
            agent::volume_spec::Source::Cephfs(_) => FsKind::CephFs,
            agent::volume_spec::Source::Smb(_) => FsKind::Smb,
            agent::volume_spec::Source::Fuse(_) => FsKind::Fuse,
        })
    }

    fn options(self) -> &'static [(&'static str, Kind)] {
        match self {
            FsKind::Nfs => nfs::OPTIONS,
            FsKind::CephFs => cephfs::OPTIONS,
            FsKind::Smb => smb::OPTIONS,
            FsKind::Fuse => fuse::OPTIONS,
        }
    }

    fn reserved(self) -> &'static [(&'static str, &'static str)] {
        match self {
            FsKind::Nfs => nfs::RESERVED,
            FsKind::CephFs => cephfs::RESERVED,
            FsKind::Smb => smb::RESERVED,
            FsKind::Fuse => fuse::RESERVED,
        }
    }

    fn conflicts(self) -> &'static [(&'static str, &'static str)] {
        match self {
            FsKind::Nfs => nfs::CONFLICTS,
            FsKind::CephFs => cephfs::CONFLICTS,
            FsKind::Smb => smb::CONFLICTS,
            FsKind::Fuse => &[],
        }
    }

    fn refuse(self, key: &str, value: &str) -> Option<&'static str> {
        match self {
            FsKind::Nfs => nfs::refuse(key, value),
            FsKind::CephFs | FsKind::Fuse => None,
            FsKind::Smb => smb::refuse(key, value),
        }
    }

    /// The keys of the secret this file system needs (a CSI node-publish secret's keys, or
    /// those of an annotation's secret file); empty when it needs none.
    pub fn secret_keys(self) -> &'static [&'static str] {
        match self {
            FsKind::Nfs | FsKind::Fuse => &[],
            FsKind::CephFs => cephfs::SECRET_KEYS,
            FsKind::Smb => smb::SECRET_KEYS,
        }
    }

    /// The keys a secret must have.
    pub fn required_secret_keys(self) -> &'static [&'static str] {
        match self {
            FsKind::Nfs | FsKind::Fuse => &[],
            FsKind::CephFs => cephfs::REQUIRED_SECRET_KEYS,
            FsKind::Smb => smb::REQUIRED_SECRET_KEYS,
        }
    }

    /// Whether volumes of this kind name servers the guest talks to (and a path on them);
    /// a FUSE volume's daemon picks its own.
    pub fn has_servers(self) -> bool {
        self != FsKind::Fuse
    }

    /// Whether a volume of this kind needs a secret from the host.
    pub fn needs_secret(self) -> bool {
        !self.required_secret_keys().is_empty()
    }

    /// An annotation secret file's content as credentials (CephFS: the key alone; SMB:
    /// `key=value` lines). The error never shows a value.
    pub fn credentials_from_file(self, text: &str) -> Result<Credentials, String> {
        match self {
            FsKind::Nfs | FsKind::Fuse => Err(format!("{} volumes take no secret", self.name())),
            FsKind::CephFs => Ok(cephfs::credentials_from_file(text)),
            FsKind::Smb => smb::credentials_from_file(text),
        }
    }

    /// A key/value secret (CSI node-publish secrets) as credentials: unknown keys are
    /// refused by name (`field` is where they came from); values are never shown.
    pub fn credentials_from_map<'a>(
        self,
        field: &str,
        map: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Credentials, SpecError> {
        let keys = self.secret_keys();
        let mut pairs = Vec::new();
        for (k, v) in map {
            if !keys.contains(&k) {
                let known = if keys.is_empty() {
                    format!("{} volumes take no secret", self.name())
                } else {
                    format!("{} volumes read {}", self.name(), keys.join(", "))
                };
                return err(
                    format!("{field}.{}", printable(k)),
                    format!("unknown key ({known})"),
                );
            }
            pairs.push((k, v));
        }
        Ok(Credentials::from_pairs(pairs))
    }

    /// Fills `creds` into a wire spec of this kind, after checking that nothing required
    /// is missing. `field` names where the secret came from, for the error.
    pub fn apply_credentials(
        self,
        field: &str,
        w: &mut agent::VolumeSpec,
        creds: &Credentials,
    ) -> Result<(), SpecError> {
        if let Some(missing) = self
            .required_secret_keys()
            .iter()
            .find(|k| creds.get(k).is_none_or(str::is_empty))
        {
            return err(
                format!("{field}.{missing}"),
                format!("is required for {} volumes", self.name()),
            );
        }
        match w.source.as_mut() {
            Some(agent::volume_spec::Source::Cephfs(c)) if self == FsKind::CephFs => {
                cephfs::apply(c, creds)
            }
            Some(agent::volume_spec::Source::Smb(s)) if self == FsKind::Smb => {
                smb::apply(s, creds);
                Ok(())
            }
            _ => err(field, format!("{} volumes take no secret", self.name())),
        }
    }

    /// The volume URL's source part (`<scheme>://<authority><path>?<options>`): options this
    /// kind folds into source fields are taken out of `options`.
    pub fn source_from_url(
        self,
        authority: &str,
        path: &str,
        options: &mut BTreeMap<String, String>,
    ) -> Result<agent::volume_spec::Source, String> {
        match self {
            FsKind::Nfs => nfs::from_url(authority, path, options),
            FsKind::CephFs => cephfs::from_url(authority, path, options),
            FsKind::Smb => smb::from_url(authority, path, options),
            FsKind::Fuse => fuse::from_url(authority, path, options),
        }
    }
}

/// Credentials resolved on the host: named values, shown as `<redacted>` by Debug.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials(BTreeMap<String, Secret>);

impl Credentials {
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Credentials(
            pairs
                .into_iter()
                .map(|(k, v)| (k.to_string(), Secret(v.to_string())))
                .collect(),
        )
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(Secret::expose)
    }

    /// Key and value pairs, for the one place that stores them (the CSI hand-off).
    pub fn expose_all(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.expose()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, "<redacted>")))
            .finish()
    }
}

impl Source {
    pub fn kind(&self) -> FsKind {
        match self {
            Source::Nfs(_) => FsKind::Nfs,
            Source::CephFs(_) => FsKind::CephFs,
            Source::Smb(_) => FsKind::Smb,
            Source::Fuse(_) => FsKind::Fuse,
        }
    }

    /// What a policy matches: the servers the guest will talk to, and the path on them
    /// (NFS export, CephFS path, SMB `/share/path`); none for FUSE (see
    /// [`FsKind::has_servers`]).
    pub fn policy_target(&self) -> (Vec<Server>, String) {
        match self {
            Source::Nfs(n) => (vec![n.server.clone()], n.export.clone()),
            Source::CephFs(c) => (
                c.monitors.iter().map(|m| Server::Ip(m.ip())).collect(),
                c.path.clone(),
            ),
            Source::Smb(s) => (vec![s.server.clone()], s.share_path()),
            Source::Fuse(_) => (Vec::new(), String::new()),
        }
    }
}

impl VolumeSpec {
    /// Validates a wire spec. With [`VolumeSpec::from_wire_unresolved`] the only
    /// constructors: a `VolumeSpec` is always valid.
    pub fn from_wire(w: &agent::VolumeSpec) -> Result<Self, SpecError> {
        Self::validate(w, true)
    }

    /// The host's form before secrets are resolved: the same checks, except that the
    /// secret's values (a CephFS key, SMB credentials, an encryption key) may still be
    /// absent (the pod names a host-side secret; they are filled in just before the request
    /// leaves for the guest, which validates them with `from_wire`).
    pub fn from_wire_unresolved(w: &agent::VolumeSpec) -> Result<Self, SpecError> {
        Self::validate(w, false)
    }

    fn validate(w: &agent::VolumeSpec, require_secret: bool) -> Result<Self, SpecError> {
        validate_name("volume.name", &w.name)?;
        let mut read_only = w.read_only;
        let mut options = BTreeMap::new();
        let mut typed = Typed::new();
        if w.options.len() > MAX_OPTIONS {
            return err(
                "volume.options",
                format!("at most {MAX_OPTIONS} options are allowed"),
            );
        }
        let Some(kind) = FsKind::of_wire(w) else {
            let names: Vec<&str> = FsKind::ALL.iter().map(|k| k.name()).collect();
            return err(
                "volume.source",
                format!("one of {} is required", names.join(", ")),
            );
        };
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
            if let Some(why) = kind.refuse(key, value) {
                return err(field, why);
            }
            if let Some((_, why)) = kind
                .reserved()
                .iter()
                .chain(RESERVED)
                .find(|(k, _)| k == key)
            {
                return err(field, *why);
            }
            let option_kind = if VFS_FLAGS.contains(&key.as_str()) {
                Kind::Flag
            } else if let Some((_, k)) = kind.options().iter().find(|(k, _)| k == key) {
                *k
            } else {
                return err(
                    field,
                    format!("unknown or not allowed for {} volumes", kind.name()),
                );
            };
            if let Kind::Typed = option_kind {
                typed.insert(key.clone(), (field, value.clone()));
                continue;
            }
            check_value(&field, option_kind, value)?;
            options.insert(key.clone(), value.clone());
        }
        for (a, b) in kind.conflicts() {
            if options.contains_key(*a) && options.contains_key(*b) {
                return err(
                    format!("volume.options.{b}"),
                    format!("contradicts option {a}"),
                );
            }
        }
        let source = match &w.source {
            Some(agent::volume_spec::Source::Nfs(n)) => {
                Source::Nfs(nfs::parse(n, &typed, &options)?)
            }
            Some(agent::volume_spec::Source::Cephfs(c)) => {
                Source::CephFs(cephfs::parse(c, require_secret)?)
            }
            Some(agent::volume_spec::Source::Smb(s)) => {
                Source::Smb(smb::parse(s, &typed, &options, require_secret)?)
            }
            Some(agent::volume_spec::Source::Fuse(f)) => Source::Fuse(fuse::parse(f, &options)?),
            None => return err("volume.source", "is required"),
        };
        let encryption = match w.encryption.as_ref() {
            Some(e) => {
                let mode = EncryptionMode::parse("volume.encryption.mode", &e.mode)?;
                encryption::refuse_unsafe(&source, &options, mode)?;
                if e.grow_to_quota && !matches!(source, Source::CephFs(_)) {
                    return err(
                        "volume.encryption.grow_to_quota",
                        "is for CephFS volumes only (it grows the container to the \
                         directory's CephFS quota)",
                    );
                }
                Some(encryption::from_wire(e, require_secret)?)
            }
            None => None,
        };
        Ok(VolumeSpec {
            name: w.name.clone(),
            source,
            read_only,
            options,
            encryption,
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
        w.source = Some(match &self.source {
            Source::Nfs(n) => agent::volume_spec::Source::Nfs(n.to_wire()),
            Source::CephFs(c) => agent::volume_spec::Source::Cephfs(c.to_wire(with_secret)),
            Source::Smb(s) => agent::volume_spec::Source::Smb(s.to_wire(with_secret)),
            Source::Fuse(f) => agent::volume_spec::Source::Fuse(f.to_wire()),
        });
        w.encryption = self
            .encryption
            .as_ref()
            .map(|e| e.to_wire(with_secret))
            .into();
        w
    }

    /// The one place the guest mounts this volume.
    pub fn mount_point(&self) -> PathBuf {
        mount_point(&self.name)
    }

    /// Short name of the file system for logs and listings.
    pub fn fs_name(&self) -> &'static str {
        self.source.kind().name()
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
            // The kernel reads numbers with base 0: a leading zero would make it octal.
            if value.len() > 1 && value.starts_with('0') {
                return err(
                    field,
                    format!(
                        "{:?} has a leading zero (the kernel would read it as octal)",
                        printable(value)
                    ),
                );
            }
            if n < min || n > max {
                return err(field, format!("must be between {min} and {max}"));
            }
            Ok(())
        }
        Kind::Octal(max) => {
            let n = u32::from_str_radix(value, 8)
                .ok()
                .filter(|_| (2..=6).contains(&value.len()) && value.starts_with('0'))
                .ok_or_else(|| SpecError {
                    field: field.to_string(),
                    reason: format!("{:?} is not an octal mode like 0755", printable(value)),
                })?;
            if n > max {
                return err(field, format!("must be at most {max:#o}"));
            }
            Ok(())
        }
        // Checked by the file system's module.
        Kind::Typed => Ok(()),
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
            other => panic!("nfs expected, got {other:?}"),
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
    fn encryption_options_given_as_mount_options_are_refused_with_where_they_go() {
        for (key, words) in [
            ("encryption", "encryption goes in volume.encryption"),
            ("size", "goes in volume.encryption"),
            ("owner", "goes in volume.encryption"),
            ("encryption_key", "names the host-side secret"),
        ] {
            let w = with_opt(nfs("10.0.0.1", "/x", ""), key, "v");
            let e = VolumeSpec::from_wire(&w).expect_err(key);
            assert_eq!(e.field, format!("volume.options.{key}"));
            assert!(e.reason.contains(words), "{e}");
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
