//! Encrypted volumes, two modes:
//! - `encryption=luks2` (design: docs/design/encryption-luks2.md §6.1): the guest keeps one
//!   LUKS2 container file on the share and mounts the ext4 file system inside it; a fixed
//!   `size`, one guest at a time (a server-side lock keeps a second one out).
//! - `encryption=gocryptfs`: file-level encryption, an encrypted tree on the share that
//!   gocryptfs serves in the guest; no size (it shares the file system's space), several
//!   guests at once, the key read as one line of text.
//!
//! Here: the validated form, its URL options (`encryption`, `size`, `owner`), the key as
//! bytes that never show and are wiped on drop, and the mount options that would defeat
//! luks2's server-side lock (§5.1, "Refused up front").

use std::collections::BTreeMap;
use std::fmt;

use super::{err, printable, NfsVersion, Source, SpecError};
use crate::agent;

/// The smallest container: room for the LUKS2 header (16 MiB) and a useful ext4.
pub const MIN_SIZE: u64 = 64 << 20;
/// The largest container CNFS formats.
pub const MAX_SIZE: u64 = 64 << 40;
/// The longest key, in bytes (cryptsetup itself reads up to 8 MiB; a key is a random string).
pub const MAX_KEY: usize = 1024;

/// URL and annotation options this module takes out of the mount options.
pub const OPT_ENCRYPTION: &str = "encryption";
pub const OPT_SIZE: &str = "size";
pub const OPT_OWNER: &str = "owner";
/// `grow=quota`: a luks2 volume on CephFS also grows to its directory's quota (less
/// [`QUOTA_HEADROOM`]) at each mount.
pub const OPT_GROW: &str = "grow";
/// The one value [`OPT_GROW`] takes.
pub const GROW_TO_QUOTA: &str = "quota";
/// What a CephFS quota holds beyond a luks2 container sized from it: CephFS quotas count file
/// sizes and the container is one sparse file of exactly its size, so this covers nothing but
/// is cheap safety. The CSI driver sets a subvolume's quota to the container plus this, and a
/// guest sizes a `grow=quota` container at the quota less this: both sides must agree.
pub const QUOTA_HEADROOM: u64 = 64 << 20;

/// The container size a CephFS quota of `quota` bytes leaves (`grow=quota`): less
/// [`QUOTA_HEADROOM`], whole 4 KiB sectors, at most [`MAX_SIZE`]; `None` when that is below
/// [`MIN_SIZE`].
pub fn size_from_quota(quota: u64) -> Option<u64> {
    let size = quota.saturating_sub(QUOTA_HEADROOM) / 4096 * 4096;
    (size >= MIN_SIZE).then_some(size.min(MAX_SIZE))
}
/// Host only: the name of the host-side secret that holds the key (annotations).
pub const OPT_ENCRYPTION_KEY: &str = "encryption_key";

/// A luks2 volume's container: its fixed name in the volume's directory on the share, so
/// that nobody chooses which file is formatted.
pub const LUKS2_CONTAINER: &str = "cnfs-volume.luks2";

/// A luks2 volume grown through CSI: Kubernetes never changes a volume's context, so the
/// controller records the new container size on the share, beside the container, as an
/// empty directory `cnfs-volume.size.<bytes>`; the guest grows the volume to the largest of
/// its `size` and these at the next mount.
pub const SIZE_MARKER_PREFIX: &str = "cnfs-volume.size.";

/// The marker directory's name for a container of `bytes`.
pub fn size_marker(bytes: u64) -> String {
    format!("{SIZE_MARKER_PREFIX}{bytes}")
}

/// The size a marker's name records: decimal digits only, whole 4 KiB sectors, within
/// [`MIN_SIZE`]..=[`MAX_SIZE`]; `None` for any other name.
pub fn parse_size_marker(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(SIZE_MARKER_PREFIX)?;
    if digits.is_empty() || digits.len() > 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    (n.is_multiple_of(4096) && (MIN_SIZE..=MAX_SIZE).contains(&n)).then_some(n)
}

/// Every mode a guest may announce in `Ping.encryption_modes`.
pub const MODES: &[&str] = &["luks2", "gocryptfs"];

/// The modes as an error lists them: "luks2 or gocryptfs".
pub const MODE_LIST: &str = "luks2 or gocryptfs";

/// gocryptfs reads its password as one line of text from stdin: these bytes would end it.
const GOCRYPTFS_KEY_BREAKS: &[u8] = b"\n\0";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncryptionMode {
    /// A LUKS2 container file, opened with cryptsetup, ext4 inside.
    Luks2,
    /// An encrypted directory tree, served by gocryptfs in the guest.
    Gocryptfs,
}

impl EncryptionMode {
    pub const ALL: &'static [EncryptionMode] = &[EncryptionMode::Luks2, EncryptionMode::Gocryptfs];

    pub fn as_str(self) -> &'static str {
        match self {
            EncryptionMode::Luks2 => "luks2",
            EncryptionMode::Gocryptfs => "gocryptfs",
        }
    }

    pub fn parse(field: &str, text: &str) -> Result<Self, SpecError> {
        if text.is_empty() {
            return err(field, format!("is required ({MODE_LIST})"));
        }
        match Self::ALL.iter().find(|m| m.as_str() == text) {
            Some(m) => Ok(*m),
            None => err(
                field,
                format!(
                    "{:?} is not an encryption mode ({MODE_LIST})",
                    printable(text)
                ),
            ),
        }
    }

    /// The volume has a size of its own (luks2's container file); a gocryptfs tree shares
    /// the file system's space.
    pub fn has_size(self) -> bool {
        match self {
            EncryptionMode::Luks2 => true,
            EncryptionMode::Gocryptfs => false,
        }
    }

    /// Why this mode cannot take `key` (beyond its length, which every mode bounds alike), or
    /// `None`. The reason never shows the key.
    pub fn refuses_key(self, key: &[u8]) -> Option<&'static str> {
        match self {
            EncryptionMode::Luks2 => None,
            EncryptionMode::Gocryptfs => key
                .iter()
                .any(|b| GOCRYPTFS_KEY_BREAKS.contains(b))
                .then_some(
                    "gocryptfs reads its password as one line: the key must not contain a \
                     newline or NUL byte",
                ),
        }
    }

    /// Only one guest may open the volume at a time (luks2: one kernel's ext4). It holds a
    /// server-side lock, so options that keep locks in the guest are refused, and so are
    /// multi-node access modes. gocryptfs volumes are shared (`-sharedstorage`).
    pub fn single_guest(self) -> bool {
        match self {
            EncryptionMode::Luks2 => true,
            EncryptionMode::Gocryptfs => false,
        }
    }
}

impl fmt::Display for EncryptionMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A secret as bytes (an encryption key): shows as `<redacted>` in Debug and Display, and is
/// overwritten with zeros when dropped.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretBytes(Vec<u8>);

impl SecretBytes {
    pub fn new(bytes: Vec<u8>) -> Self {
        SecretBytes(bytes)
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

impl From<Vec<u8>> for SecretBytes {
    fn from(bytes: Vec<u8>) -> Self {
        SecretBytes(bytes)
    }
}

impl From<&[u8]> for SecretBytes {
    fn from(bytes: &[u8]) -> Self {
        SecretBytes(bytes.to_vec())
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Wiped when dropped (contents and spare capacity), so that a key does not linger in freed
/// memory.
impl Drop for SecretBytes {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

/// A validated `volume.encryption`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encryption {
    pub mode: EncryptionMode,
    /// Exact bytes, never trimmed. Empty only in the host's form before the secret is
    /// resolved, and in specs read back without secrets (state files, `List`).
    pub key: SecretBytes,
    /// Bytes of the container file (luks2); 0 for a mode without a size.
    pub size: u64,
    /// Owner of the new file system's root (the encrypted tree's root for gocryptfs).
    pub uid: u32,
    pub gid: u32,
    /// luks2 on CephFS: grow to the directory's quota too (`grow=quota`).
    pub grow_to_quota: bool,
}

impl Encryption {
    /// The wire form; `with_secret` false blanks the key, as the CephFS and SMB secrets are.
    pub(super) fn to_wire(&self, with_secret: bool) -> agent::Encryption {
        agent::Encryption {
            mode: self.mode.as_str().to_string(),
            key: if with_secret {
                self.key.expose().to_vec()
            } else {
                Vec::new()
            },
            size_bytes: self.size,
            uid: self.uid,
            gid: self.gid,
            grow_to_quota: self.grow_to_quota,
            ..Default::default()
        }
    }
}

/// Validates `volume.encryption`; an empty key passes only when `require_key` is false (the
/// host's form before it reads the secret).
pub(super) fn from_wire(e: &agent::Encryption, require_key: bool) -> Result<Encryption, SpecError> {
    let mode = EncryptionMode::parse("volume.encryption.mode", &e.mode)?;
    let field = "volume.encryption.key";
    if e.key.is_empty() && require_key {
        return err(field, format!("is required for {}", mode.as_str()));
    }
    // Never echo the key, not even its first bytes.
    if e.key.len() > MAX_KEY {
        return err(
            field,
            format!("must be at most {MAX_KEY} bytes (value not shown)"),
        );
    }
    if let Some(reason) = mode.refuses_key(&e.key) {
        return err(field, reason);
    }
    let size_field = "volume.encryption.size_bytes";
    if mode.has_size() {
        if !(MIN_SIZE..=MAX_SIZE).contains(&e.size_bytes) {
            return err(size_field, size_range(e.size_bytes));
        }
    } else if e.size_bytes != 0 {
        return err(
            size_field,
            format!(
                "must be 0 for {mode}: only luks2 volumes have a size ({mode} shares the file \
                 system's space)"
            ),
        );
    }
    for (field, id) in [
        ("volume.encryption.uid", e.uid),
        ("volume.encryption.gid", e.gid),
    ] {
        if id == u32::MAX {
            return err(field, "4294967295 is \"no id\" to the kernel");
        }
    }
    if e.grow_to_quota && !mode.has_size() {
        return err(
            "volume.encryption.grow_to_quota",
            format!("is for luks2 volumes only ({mode} has no size)"),
        );
    }
    Ok(Encryption {
        mode,
        key: SecretBytes::from(e.key.as_slice()),
        size: e.size_bytes,
        uid: e.uid,
        gid: e.gid,
        grow_to_quota: e.grow_to_quota,
    })
}

fn size_range(n: u64) -> String {
    format!("{n} bytes is outside 64Mi ({MIN_SIZE}) to 64Ti ({MAX_SIZE}) bytes",)
}

/// Sources no mode encrypts (FUSE), and for a single-guest mode (luks2) the mount options
/// and sources that would keep the lock on the container in the guest, where a second guest
/// cannot see it: refused before anything is mounted (design §5.1).
pub(super) fn refuse_unsafe(
    source: &Source,
    options: &BTreeMap<String, String>,
    mode: EncryptionMode,
) -> Result<(), SpecError> {
    const LOCKS: &str = "luks2 takes a server-side lock on its container so that no second \
                         guest opens it";
    if let Source::Fuse(_) = source {
        return err(
            "volume.encryption",
            "FUSE volumes cannot be encrypted by CNFS",
        );
    }
    // Shared modes take no lock: NFSv3, nolock, local_lock and nobrl are fine for them.
    if !mode.single_guest() {
        return Ok(());
    }
    match source {
        Source::Fuse(_) => {}
        Source::Nfs(n) if n.version == NfsVersion::V3 => {
            return err(
                "volume.nfs.version",
                "luks2 needs server-side locks; CNFS mounts NFSv3 with nolock (no statd in \
                 the guest); use vers=4.1",
            )
        }
        Source::Nfs(_) => {
            if options.contains_key("nolock") {
                return err(
                    "volume.options.nolock",
                    format!("{LOCKS}; nolock would keep locks in the guest"),
                );
            }
            if options.contains_key("local_lock") {
                return err(
                    "volume.options.local_lock",
                    format!("{LOCKS}; leave local_lock out, so that locks go to the server"),
                );
            }
        }
        Source::Smb(_) => {
            if options.contains_key("nobrl") {
                return err(
                    "volume.options.nobrl",
                    format!("{LOCKS}; with nobrl cifs would keep the lock local"),
                );
            }
        }
        Source::CephFs(_) => {}
    }
    Ok(())
}

/// `size=`: a whole number of bytes, or with a binary suffix (`Ki`, `Mi`, `Gi`, `Ti`); no
/// leading zero; 64Mi to 64Ti.
pub fn parse_size(field: &str, text: &str) -> Result<u64, SpecError> {
    const UNITS: &[(&str, u32)] = &[("Ki", 10), ("Mi", 20), ("Gi", 30), ("Ti", 40)];
    let (digits, shift) = UNITS
        .iter()
        .find_map(|(unit, shift)| text.strip_suffix(unit).map(|d| (d, *shift)))
        .unwrap_or((text, 0));
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return err(
            field,
            format!(
                "{:?} is not a size like 10Gi (bytes, or a whole number of Ki, Mi, Gi or Ti)",
                printable(text)
            ),
        );
    }
    if digits.len() > 1 && digits.starts_with('0') {
        return err(field, format!("{:?} has a leading zero", printable(text)));
    }
    let Some(n) = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
    else {
        return err(field, format!("{:?} is larger than 64Ti", printable(text)));
    };
    if !(MIN_SIZE..=MAX_SIZE).contains(&n) {
        return err(field, size_range(n));
    }
    Ok(n)
}

/// `size` as a person writes it: the largest unit that divides it exactly (`10Gi`).
pub fn format_size(n: u64) -> String {
    for (unit, shift) in [("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10)] {
        if n != 0 && n.trailing_zeros() >= shift {
            return format!("{}{unit}", n >> shift);
        }
    }
    n.to_string()
}

/// `owner=<uid>:<gid>`: decimal, no leading zero, neither 4294967295 ("no id").
pub fn parse_owner(field: &str, text: &str) -> Result<(u32, u32), SpecError> {
    let bad = || SpecError {
        field: field.to_string(),
        reason: format!(
            "{:?} is not <uid>:<gid> (decimal numbers, no leading zero, at most 4294967294)",
            printable(text)
        ),
    };
    let id = |part: &str| -> Result<u32, SpecError> {
        let digits_ok = !part.is_empty()
            && part.bytes().all(|b| b.is_ascii_digit())
            && (part.len() == 1 || !part.starts_with('0'));
        if !digits_ok {
            return Err(bad());
        }
        part.parse::<u32>()
            .ok()
            .filter(|n| *n != u32::MAX)
            .ok_or_else(bad)
    };
    let (uid, gid) = text.split_once(':').ok_or_else(bad)?;
    Ok((id(uid)?, id(gid)?))
}

/// Takes `encryption`, `size` and `owner` out of a volume URL's options into the wire form
/// (key empty: the caller fills it from the secret it names). `size` and `owner` without
/// `encryption`, and `size` with a mode that has none (gocryptfs), are refused by name.
pub(crate) fn from_url_options(
    options: &mut BTreeMap<String, String>,
) -> Result<Option<agent::Encryption>, String> {
    let field = |k: &str| format!("volume.options.{k}");
    let mode = options.remove(OPT_ENCRYPTION);
    let size = options.remove(OPT_SIZE);
    let owner = options.remove(OPT_OWNER);
    let grow = options.remove(OPT_GROW);
    let Some(mode) = mode else {
        if let Some(k) = [(OPT_SIZE, &size), (OPT_OWNER, &owner), (OPT_GROW, &grow)]
            .iter()
            .find_map(|(k, v)| v.as_ref().map(|_| *k))
        {
            // Only luks2 has a size (and grows); either mode takes an owner.
            let add = if k == OPT_OWNER { MODE_LIST } else { "luks2" };
            return Err(format!(
                "{}: is only for encrypted volumes (add encryption={add})",
                field(k)
            ));
        }
        return Ok(None);
    };
    let mode = EncryptionMode::parse(&field(OPT_ENCRYPTION), &mode).map_err(|e| e.to_string())?;
    let size_bytes = match (mode.has_size(), size) {
        (true, Some(size)) => parse_size(&field(OPT_SIZE), &size).map_err(|e| e.to_string())?,
        (true, None) => {
            return Err(format!(
                "{}: is required with encryption={mode} (the container's size, like 10Gi)",
                field(OPT_SIZE),
            ))
        }
        (false, Some(_)) => {
            return Err(format!(
                "{}: is refused with encryption={mode}: only luks2 volumes have a size ({mode} \
                 shares the file system's space)",
                field(OPT_SIZE),
            ))
        }
        (false, None) => 0,
    };
    let (uid, gid) = match owner {
        Some(o) => parse_owner(&field(OPT_OWNER), &o).map_err(|e| e.to_string())?,
        None => (0, 0),
    };
    let grow_to_quota = match grow.as_deref() {
        None => false,
        Some(GROW_TO_QUOTA) if mode.has_size() => true,
        Some(GROW_TO_QUOTA) => {
            return Err(format!(
                "{}: is refused with encryption={mode}: only luks2 volumes have a size to grow",
                field(OPT_GROW)
            ))
        }
        Some(v) => {
            return Err(format!(
                "{}: {} is not supported (the one value is {GROW_TO_QUOTA})",
                field(OPT_GROW),
                super::printable(v)
            ))
        }
    };
    Ok(Some(agent::Encryption {
        mode: mode.as_str().to_string(),
        size_bytes,
        uid,
        gid,
        grow_to_quota,
        ..Default::default()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::VolumeSpec;

    const KEY: &[u8] = b"k3y\n\0 with a trailing newline\n";

    #[test]
    fn grow_to_quota_is_for_luks2_on_cephfs_only_and_sizes_from_the_quota_less_headroom() {
        let parse = |url: &str| crate::volume_url::parse("v", url);
        let u = parse(
            "cephfs://10.0.0.5:6789/volumes/csi/pvc-1/uuid?fs=cephfs&client=u&secret=s\
             &encryption=luks2&size=1Gi&grow=quota&encryption_key=k",
        )
        .expect("valid");
        let e = u.wire.encryption.as_ref().expect("encrypted");
        assert!(e.grow_to_quota);
        let spec = VolumeSpec::from_wire_unresolved(&u.wire).expect("valid");
        assert!(spec.encryption.as_ref().is_some_and(|e| e.grow_to_quota));
        assert!(
            spec.to_wire(false).encryption.grow_to_quota,
            "kept on the wire"
        );
        for (url, want) in [
            (
                "nfs://h/x?encryption=luks2&size=1Gi&grow=quota",
                "volume.encryption.grow_to_quota: is for CephFS volumes only",
            ),
            (
                "cephfs://10.0.0.5:6789/x?fs=f&client=u&secret=s&encryption=gocryptfs&grow=quota",
                "volume.options.grow: is refused with encryption=gocryptfs",
            ),
            (
                "cephfs://10.0.0.5:6789/x?fs=f&client=u&secret=s&encryption=luks2&size=1Gi&grow=always",
                "volume.options.grow: always is not supported (the one value is quota)",
            ),
            (
                "cephfs://10.0.0.5:6789/x?fs=f&client=u&secret=s&grow=quota",
                "volume.options.grow: is only for encrypted volumes (add encryption=luks2)",
            ),
        ] {
            let e = parse(url)
                .map_err(|e| e.to_string())
                .and_then(|u| {
                    VolumeSpec::from_wire_unresolved(&u.wire)
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                })
                .expect_err(url);
            assert!(e.contains(want), "{url}: {e}");
        }
        // The quota less 64 MiB, in whole sectors, within the sizes CNFS formats.
        assert_eq!(size_from_quota((1 << 30) + QUOTA_HEADROOM), Some(1 << 30));
        assert_eq!(
            size_from_quota((1 << 30) + QUOTA_HEADROOM + 4095),
            Some(1 << 30)
        );
        assert_eq!(size_from_quota(MIN_SIZE + QUOTA_HEADROOM - 1), None);
        assert_eq!(size_from_quota(u64::MAX), Some(MAX_SIZE));
    }

    #[test]
    fn size_markers_round_trip_and_only_well_formed_sizes_count() {
        for n in [MIN_SIZE, 1 << 30, MAX_SIZE] {
            assert_eq!(parse_size_marker(&size_marker(n)), Some(n));
        }
        for bad in [
            "cnfs-volume.size.".to_string(),
            "cnfs-volume.size.+1073741824".to_string(),
            "cnfs-volume.size.1073741825".to_string(),
            format!("cnfs-volume.size.{}", MIN_SIZE - 4096),
            format!("cnfs-volume.size.{}", MAX_SIZE + 4096),
            "cnfs-volume.size.99999999999999999999999".to_string(),
            "cnfs-volume.size.1Gi".to_string(),
            "cnfs-volume.luks2".to_string(),
            format!("x{}", size_marker(1 << 30)),
        ] {
            assert_eq!(parse_size_marker(&bad), None, "{bad}");
        }
    }

    fn luks(key: &[u8]) -> agent::Encryption {
        agent::Encryption {
            mode: "luks2".into(),
            key: key.to_vec(),
            size_bytes: 1 << 30,
            uid: 1000,
            gid: 2000,
            ..Default::default()
        }
    }

    fn nfs(
        version: &str,
        opts: &[(&str, &str)],
        enc: Option<agent::Encryption>,
    ) -> agent::VolumeSpec {
        let mut w = agent::VolumeSpec {
            name: "secure".into(),
            ..Default::default()
        };
        w.set_nfs(agent::NfsSource {
            server: "10.0.0.5".into(),
            export: "/exports/a".into(),
            version: version.into(),
            ..Default::default()
        });
        for (k, v) in opts {
            w.options.insert(k.to_string(), v.to_string());
        }
        w.encryption = enc.into();
        w
    }

    fn cephfs(enc: agent::Encryption) -> agent::VolumeSpec {
        let mut w = agent::VolumeSpec {
            name: "c".into(),
            ..Default::default()
        };
        w.set_cephfs(agent::CephFsSource {
            monitors: vec!["10.0.0.1:6789".into()],
            fs_name: "cephfs".into(),
            client: "app".into(),
            secret: "AQBkey==".into(),
            ..Default::default()
        });
        w.encryption = Some(enc).into();
        w
    }

    fn smb(opts: &[(&str, &str)], enc: agent::Encryption) -> agent::VolumeSpec {
        let mut w = agent::VolumeSpec {
            name: "s".into(),
            ..Default::default()
        };
        w.set_smb(agent::SmbSource {
            server: "10.0.0.9".into(),
            share: "data".into(),
            username: "alice".into(),
            password: "pw".into(),
            ..Default::default()
        });
        for (k, v) in opts {
            w.options.insert(k.to_string(), v.to_string());
        }
        w.encryption = Some(enc).into();
        w
    }

    fn fuse(enc: agent::Encryption) -> agent::VolumeSpec {
        let mut w = agent::VolumeSpec {
            name: "f".into(),
            ..Default::default()
        };
        w.set_fuse(agent::FuseSource {
            sidecar: "sshfs".into(),
            ..Default::default()
        });
        w.encryption = Some(enc).into();
        w
    }

    #[test]
    fn a_luks2_spec_keeps_the_exact_key_bytes_and_round_trips() {
        let w = nfs("4.1", &[], Some(luks(KEY)));
        let s = VolumeSpec::from_wire(&w).expect("valid");
        let e = s.encryption.as_ref().expect("encrypted");
        assert_eq!(e.mode, EncryptionMode::Luks2);
        assert_eq!(e.key.expose(), KEY, "no trimming of any byte");
        assert_eq!((e.size, e.uid, e.gid), (1 << 30, 1000, 2000));
        assert_eq!(VolumeSpec::from_wire(&s.to_wire(true)).expect("valid"), s);
        // Not encrypted: no encryption on either side.
        let plain = VolumeSpec::from_wire(&nfs("4.1", &[], None)).expect("valid");
        assert!(plain.encryption.is_none());
        assert!(plain.to_wire(true).encryption.is_none());
    }

    #[test]
    fn to_wire_without_secrets_blanks_the_key_and_keeps_the_rest() {
        let s = VolumeSpec::from_wire(&nfs("4.2", &[], Some(luks(KEY)))).expect("valid");
        let blank = s.to_wire(false);
        let e = blank.encryption.as_ref().expect("encryption kept");
        assert!(e.key.is_empty());
        assert_eq!(
            (e.mode.as_str(), e.size_bytes, e.uid, e.gid),
            ("luks2", 1 << 30, 1000, 2000)
        );
        // What a state file holds reads back (without the key) as the same volume.
        let back = VolumeSpec::from_wire_unresolved(&blank).expect("unresolved form");
        assert_eq!(back.to_wire(false), blank);
        // The guest's form needs the key.
        let e = VolumeSpec::from_wire(&blank).expect_err("no key");
        assert_eq!(e.field, "volume.encryption.key");
        assert_eq!(
            e.to_string(),
            "volume.encryption.key: is required for luks2"
        );
    }

    #[test]
    fn the_key_never_shows_in_debug_display_or_errors() {
        let secret = b"Sup3rSecretKeyBytes";
        let s = VolumeSpec::from_wire(&nfs("4.1", &[], Some(luks(secret)))).expect("valid");
        let shown = format!("{s:?}");
        assert!(!shown.contains("Sup3rSecret"), "{shown}");
        assert!(!shown.contains("83, 117, 112"), "bytes as numbers: {shown}");
        assert!(shown.contains("key: <redacted>"), "{shown}");
        let key = &s.encryption.as_ref().expect("encrypted").key;
        assert_eq!(format!("{key}"), "<redacted>");
        let long = [b'S'; MAX_KEY + 1];
        let e = VolumeSpec::from_wire(&nfs("4.1", &[], Some(luks(&long)))).expect_err("long");
        assert_eq!(e.field, "volume.encryption.key");
        assert!(!e.to_string().contains("SSSS"), "{e}");
        // 1 and 1024 bytes are the bounds.
        for n in [1, MAX_KEY] {
            VolumeSpec::from_wire(&nfs("4.1", &[], Some(luks(&vec![7u8; n])))).expect("bound");
        }
    }

    #[test]
    fn bad_encryption_fields_are_refused_by_name() {
        let with = |f: fn(&mut agent::Encryption)| {
            let mut e = luks(KEY);
            f(&mut e);
            nfs("4.1", &[], Some(e))
        };
        let cases: Vec<(agent::VolumeSpec, &str, &str)> = vec![
            (
                with(|e| e.mode = "luks1".into()),
                "volume.encryption.mode",
                "not an encryption mode",
            ),
            (
                with(|e| e.mode.clear()),
                "volume.encryption.mode",
                "is required",
            ),
            (
                with(|e| e.key.clear()),
                "volume.encryption.key",
                "is required for luks2",
            ),
            (
                with(|e| e.size_bytes = 0),
                "volume.encryption.size_bytes",
                "outside 64Mi",
            ),
            (
                with(|e| e.size_bytes = MIN_SIZE - 1),
                "volume.encryption.size_bytes",
                "outside 64Mi",
            ),
            (
                with(|e| e.size_bytes = MAX_SIZE + 1),
                "volume.encryption.size_bytes",
                "outside 64Mi",
            ),
            (with(|e| e.uid = u32::MAX), "volume.encryption.uid", "no id"),
            (with(|e| e.gid = u32::MAX), "volume.encryption.gid", "no id"),
        ];
        for (w, field, words) in cases {
            let e = VolumeSpec::from_wire(&w).expect_err(field);
            assert_eq!(e.field, field, "{e}");
            assert!(e.reason.contains(words), "{e}");
        }
        for size in [MIN_SIZE, MAX_SIZE] {
            let w = with(|e| e.size_bytes = MIN_SIZE);
            let mut w2 = w.clone();
            w2.encryption.as_mut().expect("set").size_bytes = size;
            VolumeSpec::from_wire(&w2).expect("size at a bound");
        }
    }

    #[test]
    fn options_that_keep_locks_in_the_guest_are_refused_for_luks2_by_field() {
        let cases: Vec<(agent::VolumeSpec, &str, &str)> = vec![
            (
                nfs("3", &[], Some(luks(KEY))),
                "volume.nfs.version",
                "luks2 needs server-side locks; CNFS mounts NFSv3 with nolock",
            ),
            (
                nfs("", &[("vers", "3")], Some(luks(KEY))),
                "volume.nfs.version",
                "use vers=4.1",
            ),
            (
                nfs("4.1", &[("nolock", "")], Some(luks(KEY))),
                "volume.options.nolock",
                "nolock would keep locks in the guest",
            ),
            (
                nfs("4.2", &[("local_lock", "all")], Some(luks(KEY))),
                "volume.options.local_lock",
                "leave local_lock out",
            ),
            (
                nfs("4.2", &[("local_lock", "none")], Some(luks(KEY))),
                "volume.options.local_lock",
                "leave local_lock out",
            ),
            (
                smb(&[("nobrl", "")], luks(KEY)),
                "volume.options.nobrl",
                "cifs would keep the lock local",
            ),
            (
                fuse(luks(KEY)),
                "volume.encryption",
                "FUSE volumes cannot be encrypted by CNFS",
            ),
        ];
        for (w, field, words) in cases {
            let e = VolumeSpec::from_wire(&w).expect_err(field);
            assert_eq!(e.field, field, "{e}");
            assert!(e.reason.contains(words), "{e}");
            // The host's form refuses them as well.
            let e = VolumeSpec::from_wire_unresolved(&w).expect_err(field);
            assert_eq!(e.field, field, "{e}");
            // And the same volume without encryption is fine.
            let mut plain = w.clone();
            plain.encryption = None.into();
            VolumeSpec::from_wire(&plain).expect("valid without encryption");
        }
    }

    #[test]
    fn nfsv4_cephfs_and_smb_with_locks_on_the_server_may_be_encrypted() {
        for w in [
            nfs("", &[], Some(luks(KEY))),
            nfs("4.0", &[("hard", "")], Some(luks(KEY))),
            nfs("4.1", &[("nconnect", "4")], Some(luks(KEY))),
            nfs("4.2", &[], Some(luks(KEY))),
            cephfs(luks(KEY)),
            smb(&[], luks(KEY)),
        ] {
            let s = VolumeSpec::from_wire(&w).unwrap_or_else(|e| panic!("{e}"));
            assert!(s.encryption.is_some());
        }
    }

    fn gocryptfs(key: &[u8]) -> agent::Encryption {
        agent::Encryption {
            mode: "gocryptfs".into(),
            key: key.to_vec(),
            size_bytes: 0,
            uid: 1000,
            gid: 2000,
            ..Default::default()
        }
    }

    #[test]
    fn both_modes_parse_by_name_and_every_other_name_is_refused_listing_them() {
        assert_eq!(
            MODES,
            EncryptionMode::ALL
                .iter()
                .map(|m| m.as_str())
                .collect::<Vec<_>>()
        );
        assert_eq!(MODE_LIST, MODES.join(" or "));
        for m in EncryptionMode::ALL {
            assert_eq!(EncryptionMode::parse("f", m.as_str()), Ok(*m));
            assert_eq!(m.to_string(), m.as_str());
        }
        let e = EncryptionMode::parse("f", "").expect_err("empty");
        assert_eq!(e.to_string(), "f: is required (luks2 or gocryptfs)");
        for bad in ["GOCRYPTFS", "gocryptfs ", "gocrypt", "luks1", "fscrypt"] {
            let e = EncryptionMode::parse("f", bad).expect_err(bad);
            assert_eq!(e.field, "f");
            assert!(
                e.reason
                    .ends_with("is not an encryption mode (luks2 or gocryptfs)"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_gocryptfs_spec_has_no_size_keeps_its_owner_and_round_trips() {
        let key = b"k3y with spaces, \r and \xff bytes";
        let s = VolumeSpec::from_wire(&nfs("4.1", &[], Some(gocryptfs(key)))).expect("valid");
        let e = s.encryption.as_ref().expect("encrypted");
        assert_eq!(e.mode, EncryptionMode::Gocryptfs);
        assert_eq!(e.key.expose(), key, "no trimming of any byte");
        assert_eq!((e.size, e.uid, e.gid), (0, 1000, 2000));
        assert_eq!(VolumeSpec::from_wire(&s.to_wire(true)).expect("valid"), s);
        // Without secrets: the key blanked, mode and owner kept, and read back as the same
        // volume by the host's form; the guest's form needs the key.
        let blank = s.to_wire(false);
        let w = blank.encryption.as_ref().expect("encryption kept");
        assert!(w.key.is_empty());
        assert_eq!(
            (w.mode.as_str(), w.size_bytes, w.uid, w.gid),
            ("gocryptfs", 0, 1000, 2000)
        );
        let back = VolumeSpec::from_wire_unresolved(&blank).expect("unresolved form");
        assert_eq!(back.to_wire(false), blank);
        let e = VolumeSpec::from_wire(&blank).expect_err("no key");
        assert_eq!(
            e.to_string(),
            "volume.encryption.key: is required for gocryptfs"
        );
        // 1 and 1024 bytes are the bounds, as for luks2.
        for n in [1, MAX_KEY] {
            VolumeSpec::from_wire(&nfs("4.1", &[], Some(gocryptfs(&vec![b'k'; n]))))
                .expect("bound");
        }
        let e = VolumeSpec::from_wire(&nfs("4.1", &[], Some(gocryptfs(&[b'S'; MAX_KEY + 1]))))
            .expect_err("long");
        assert_eq!(e.field, "volume.encryption.key");
        assert!(!e.to_string().contains("SSSS"), "{e}");
    }

    #[test]
    fn gocryptfs_refuses_a_size_by_field_saying_only_luks2_volumes_have_one() {
        for size in [1, MIN_SIZE, 1 << 30, MAX_SIZE] {
            let mut e = gocryptfs(b"key");
            e.size_bytes = size;
            let err = VolumeSpec::from_wire(&nfs("4.1", &[], Some(e))).expect_err("sized");
            assert_eq!(err.field, "volume.encryption.size_bytes", "{err}");
            assert!(
                err.reason
                    .starts_with("must be 0 for gocryptfs: only luks2 volumes have a size"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_gocryptfs_key_with_a_newline_or_nul_anywhere_is_refused_without_showing_it() {
        for key in [
            &b"Secret\n"[..],
            b"\nSecret",
            b"Sec\nret",
            b"Sec\0ret",
            b"Secret\0",
            b"\0",
            b"\n",
            b"Secret\r\n",
        ] {
            for w in [
                nfs("4.1", &[], Some(gocryptfs(key))),
                cephfs(gocryptfs(key)),
                smb(&[], gocryptfs(key)),
            ] {
                let e = VolumeSpec::from_wire(&w).expect_err("line break in the key");
                assert_eq!(e.field, "volume.encryption.key", "{key:?}: {e}");
                assert_eq!(
                    e.reason,
                    "gocryptfs reads its password as one line: the key must not contain a \
                     newline or NUL byte"
                );
                let shown = format!("{e} {e:?}");
                assert!(!shown.contains("Sec"), "{shown}");
            }
            // luks2 takes the same bytes: cryptsetup reads the key file whole.
            VolumeSpec::from_wire(&nfs("4.1", &[], Some(luks(key)))).expect("luks2 key");
        }
    }

    #[test]
    fn gocryptfs_takes_lock_free_nfs_and_smb_options_but_no_fuse_source() {
        for w in [
            nfs("3", &[], Some(gocryptfs(b"key"))),
            nfs("", &[("vers", "3")], Some(gocryptfs(b"key"))),
            nfs("4.1", &[("nolock", "")], Some(gocryptfs(b"key"))),
            nfs("4.2", &[("local_lock", "all")], Some(gocryptfs(b"key"))),
            nfs("4.2", &[("local_lock", "none")], Some(gocryptfs(b"key"))),
            smb(&[("nobrl", "")], gocryptfs(b"key")),
            smb(&[], gocryptfs(b"key")),
            cephfs(gocryptfs(b"key")),
        ] {
            let s = VolumeSpec::from_wire(&w).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                s.encryption.as_ref().map(|e| e.mode),
                Some(EncryptionMode::Gocryptfs)
            );
            VolumeSpec::from_wire_unresolved(&w).unwrap_or_else(|e| panic!("{e}"));
        }
        let e = VolumeSpec::from_wire(&fuse(gocryptfs(b"key"))).expect_err("fuse");
        assert_eq!(e.field, "volume.encryption");
        assert_eq!(e.reason, "FUSE volumes cannot be encrypted by CNFS");
    }

    #[test]
    fn url_options_of_a_gocryptfs_volume_take_an_owner_and_no_size() {
        let opts = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let mut o = opts(&[
            ("encryption", "gocryptfs"),
            ("owner", "1000:2000"),
            ("nolock", ""),
        ]);
        let e = from_url_options(&mut o).expect("valid").expect("encrypted");
        assert_eq!(
            (e.mode.as_str(), e.size_bytes, e.uid, e.gid),
            ("gocryptfs", 0, 1000, 2000)
        );
        assert!(e.key.is_empty());
        assert_eq!(o.keys().collect::<Vec<_>>(), ["nolock"]);
        let mut o = opts(&[("encryption", "gocryptfs")]);
        let e = from_url_options(&mut o).expect("valid").expect("encrypted");
        assert_eq!((e.size_bytes, e.uid, e.gid), (0, 0, 0));
        for (pairs, want) in [
            (
                &[("encryption", "gocryptfs"), ("size", "10Gi")][..],
                "volume.options.size: is refused with encryption=gocryptfs: only luks2 volumes \
                 have a size (gocryptfs shares the file system's space)",
            ),
            (
                &[("encryption", "gocryptfs"), ("size", "")][..],
                "volume.options.size: is refused with encryption=gocryptfs: only luks2 volumes \
                 have a size (gocryptfs shares the file system's space)",
            ),
            (
                &[("encryption", "gocryptfs"), ("owner", "root")][..],
                "volume.options.owner: \"root\" is not <uid>:<gid> (decimal numbers, no \
                 leading zero, at most 4294967294)",
            ),
            (
                &[("owner", "1:1")][..],
                "volume.options.owner: is only for encrypted volumes (add encryption=luks2 or \
                 gocryptfs)",
            ),
            (
                &[("size", "1Gi")][..],
                "volume.options.size: is only for encrypted volumes (add encryption=luks2)",
            ),
            (
                &[("encryption", "gocrypt")][..],
                "volume.options.encryption: \"gocrypt\" is not an encryption mode (luks2 or \
                 gocryptfs)",
            ),
        ] {
            let e = from_url_options(&mut opts(pairs)).expect_err(want);
            assert_eq!(e, want);
        }
    }

    #[test]
    fn sizes_parse_with_binary_suffixes_within_range() {
        let f = "volume.options.size";
        for (text, want) in [
            ("64Mi", 64 << 20),
            ("67108864", 64 << 20),
            ("65536Ki", 64 << 20),
            ("10Gi", 10 << 30),
            ("1Ti", 1 << 40),
            ("64Ti", 64 << 40),
            ("70368744177664", 64 << 40),
        ] {
            assert_eq!(parse_size(f, text).expect(text), want, "{text}");
        }
        for (text, words) in [
            ("", "is not a size"),
            ("Gi", "is not a size"),
            ("10G", "is not a size"),
            ("10gi", "is not a size"),
            ("10 Gi", "is not a size"),
            ("-1Gi", "is not a size"),
            ("+1Gi", "is not a size"),
            ("1.5Gi", "is not a size"),
            ("0x10Gi", "is not a size"),
            ("10GiB", "is not a size"),
            ("010Gi", "leading zero"),
            ("00", "leading zero"),
            ("0", "outside 64Mi"),
            ("63Mi", "outside 64Mi"),
            ("67108863", "outside 64Mi"),
            ("65Ti", "outside 64Mi"),
            ("70368744177665", "outside 64Mi"),
            ("18446744073709551615", "outside 64Mi"),
            ("18446744073709551616", "larger than 64Ti"),
            ("16777216Ti", "larger than 64Ti"),
            ("99999999999999999999999999Ki", "larger than 64Ti"),
        ] {
            let e = parse_size(f, text).expect_err(text);
            assert_eq!(e.field, f);
            assert!(e.reason.contains(words), "{text:?}: {e}");
        }
    }

    #[test]
    fn owners_are_decimal_uid_gid_pairs_without_leading_zeros() {
        let f = "volume.options.owner";
        for (text, want) in [
            ("0:0", (0, 0)),
            ("1000:1000", (1000, 1000)),
            ("65534:0", (65534, 0)),
            ("4294967294:4294967294", (u32::MAX - 1, u32::MAX - 1)),
        ] {
            assert_eq!(parse_owner(f, text).expect(text), want);
        }
        for text in [
            "",
            ":",
            "1000",
            "1000:",
            ":1000",
            "01000:1000",
            "1000:00",
            "a:b",
            "1000:1000:1",
            "-1:0",
            "+1:0",
            " 1:1",
            "1:1 ",
            "4294967295:0",
            "0:4294967295",
            "4294967296:0",
            "1000.1000",
        ] {
            let e = parse_owner(f, text).expect_err(text);
            assert_eq!(e.field, f);
            assert!(e.reason.contains("is not <uid>:<gid>"), "{text:?}: {e}");
        }
    }

    #[test]
    fn url_options_become_the_encryption_and_leave_the_mount_options() {
        let mut o: BTreeMap<String, String> = [
            ("encryption", "luks2"),
            ("size", "10Gi"),
            ("owner", "1000:2000"),
            ("nconnect", "4"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let e = from_url_options(&mut o).expect("valid").expect("encrypted");
        assert_eq!(
            (e.mode.as_str(), e.size_bytes, e.uid, e.gid),
            ("luks2", 10 << 30, 1000, 2000)
        );
        assert!(e.key.is_empty(), "the key comes from the secret, later");
        assert_eq!(o.keys().collect::<Vec<_>>(), ["nconnect"]);
        // owner defaults to root.
        let mut o: BTreeMap<String, String> = [("encryption", "luks2"), ("size", "64Mi")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let e = from_url_options(&mut o).expect("valid").expect("encrypted");
        assert_eq!((e.uid, e.gid), (0, 0));
        // Nothing to take: nothing changes.
        let mut o = BTreeMap::from([("ro".to_string(), String::new())]);
        assert!(from_url_options(&mut o).expect("valid").is_none());
        assert_eq!(o.len(), 1);
    }

    #[test]
    fn url_encryption_options_are_refused_by_name() {
        for (pairs, words) in [
            (
                &[("size", "10Gi")][..],
                "volume.options.size: is only for encrypted volumes",
            ),
            (
                &[("owner", "1:1")][..],
                "volume.options.owner: is only for encrypted volumes",
            ),
            (
                &[("encryption", "luks2")][..],
                "volume.options.size: is required with encryption=luks2",
            ),
            (
                &[("encryption", "luks1"), ("size", "1Gi")][..],
                "volume.options.encryption: \"luks1\" is not an encryption mode",
            ),
            (
                &[("encryption", ""), ("size", "1Gi")][..],
                "volume.options.encryption: is required",
            ),
            (
                &[("encryption", "luks2"), ("size", "1G")][..],
                "volume.options.size: \"1G\" is not a size",
            ),
            (
                &[("encryption", "luks2"), ("size", "1Gi"), ("owner", "root")][..],
                "volume.options.owner: \"root\" is not <uid>:<gid>",
            ),
        ] {
            let mut o: BTreeMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let e = from_url_options(&mut o).expect_err(words);
            assert!(e.starts_with(words), "{e}");
        }
    }

    #[test]
    fn format_size_reads_back_as_the_same_size() {
        for n in [
            MIN_SIZE,
            10 << 30,
            3 << 40,
            MAX_SIZE,
            (64 << 20) + 1024,
            (64 << 20) + 1,
        ] {
            let text = format_size(n);
            assert_eq!(parse_size("s", &text).expect(&text), n, "{text}");
        }
        assert_eq!(format_size(10 << 30), "10Gi");
        assert_eq!(format_size((64 << 20) + 1), "67108865");
    }

    mod props {
        use super::super::*;
        use crate::spec::VolumeSpec;
        use proptest::prelude::*;

        fn config() -> ProptestConfig {
            ProptestConfig {
                cases: 2000,
                failure_persistence: None,
                ..ProptestConfig::default()
            }
        }

        /// Text shaped like a size often enough to reach every branch.
        fn size_like() -> impl Strategy<Value = String> {
            (
                "[0-9]{0,22}",
                prop_oneof![
                    Just(""),
                    Just("Ki"),
                    Just("Mi"),
                    Just("Gi"),
                    Just("Ti"),
                    Just("G"),
                    Just("i")
                ],
            )
                .prop_map(|(d, u)| format!("{d}{u}"))
        }

        proptest! {
            #![proptest_config(config())]

            #[test]
            fn any_size_that_parses_is_within_range_and_written_as_given(
                text in prop_oneof![size_like(), any::<String>()]
            ) {
                if let Ok(n) = parse_size("volume.options.size", &text) {
                    prop_assert!((MIN_SIZE..=MAX_SIZE).contains(&n), "{text}: {n}");
                    prop_assert!(!text.starts_with('0'), "{text}");
                    prop_assert_eq!(parse_size("s", &format_size(n)), Ok(n));
                }
            }

            #[test]
            fn every_size_in_range_reads_back_from_its_written_form(
                n in MIN_SIZE..=MAX_SIZE,
                shift in prop_oneof![Just(0u32), Just(10), Just(20), Just(30), Just(40)],
            ) {
                let n = (n >> shift << shift).max(MIN_SIZE);
                prop_assert_eq!(parse_size("s", &format_size(n)), Ok(n));
                prop_assert_eq!(parse_size("s", &n.to_string()), Ok(n));
            }

            #[test]
            fn any_owner_that_parses_is_written_exactly_so(
                text in prop_oneof!["[0-9]{0,11}:[0-9]{0,11}", any::<String>()]
            ) {
                if let Ok((uid, gid)) = parse_owner("volume.options.owner", &text) {
                    prop_assert_eq!(format!("{uid}:{gid}"), text);
                    prop_assert!(uid != u32::MAX && gid != u32::MAX);
                }
            }

            #[test]
            fn encrypted_volume_urls_parse_back_to_their_parts_and_validate(
                scheme in prop_oneof![
                    Just("nfs://10.0.0.5/exports/a?vers=4.2"),
                    Just("cephfs://10.0.0.1:6789/sub?fs=a&client=b&secret=ceph"),
                    Just("smb://10.0.0.9/data?secret=smb"),
                ],
                mode in prop_oneof![Just(EncryptionMode::Luks2), Just(EncryptionMode::Gocryptfs)],
                n in MIN_SIZE..=MAX_SIZE,
                owner in proptest::option::of((0u32..u32::MAX, 0u32..u32::MAX)),
                key_ref in proptest::option::of("[a-z][a-z0-9-]{0,20}"),
            ) {
                // A size only for the mode that has one.
                let n = if mode.has_size() { n } else { 0 };
                let mut url = format!("{scheme}&encryption={mode}");
                if mode.has_size() {
                    url.push_str(&format!("&size={}", format_size(n)));
                }
                if let Some((u, g)) = owner {
                    url.push_str(&format!("&owner={u}:{g}"));
                }
                if let Some(k) = &key_ref {
                    url.push_str(&format!("&encryption_key={k}"));
                }
                let parsed = crate::volume_url::parse("v", &url)
                    .map_err(|e| TestCaseError::fail(format!("{url}: {e}")))?;
                prop_assert_eq!(&parsed.encryption_key_ref, &key_ref);
                let e = parsed.wire.encryption.as_ref().expect("encryption");
                prop_assert_eq!(
                    (e.mode.as_str(), e.size_bytes, (e.uid, e.gid)),
                    (mode.as_str(), n, owner.unwrap_or((0, 0)))
                );
                prop_assert!(e.key.is_empty());
                for k in ["encryption", "size", "owner", "encryption_key"] {
                    prop_assert!(!parsed.wire.options.contains_key(k), "{k} left in options");
                }
                let spec = VolumeSpec::from_wire_unresolved(&parsed.wire)
                    .map_err(|e| TestCaseError::fail(format!("{url}: {e}")))?;
                prop_assert_eq!(spec.encryption.as_ref().map(|e| e.size), Some(n));
                // With the key filled in, the guest's form accepts it and blanks it again
                // (NFS: no other secret to fill in).
                if spec.source.kind().needs_secret() {
                    return Ok(());
                }
                let mut wire = spec.to_wire(false);
                wire.encryption.as_mut().expect("kept").key = b"key".to_vec();
                let full = VolumeSpec::from_wire(&wire)
                    .map_err(|e| TestCaseError::fail(format!("{url}: {e}")))?;
                prop_assert_eq!(full.to_wire(false), spec.to_wire(false));
            }
        }
    }
}
