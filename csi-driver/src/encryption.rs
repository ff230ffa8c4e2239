//! Encrypted volumes through CSI (design: docs/design/encryption-luks2.md §6.1, §5.3): the
//! StorageClass parameter (`encryption: luks2` or `encryption: gocryptfs`), luks2's container
//! size from the capacity range, how the controller tells the node side (the volume URL's
//! `encryption=luks2&size=<bytes>` or `encryption=gocryptfs`), the volume id marker
//! (`<fs>+<mode>#`) that lets DeleteVolume and ControllerExpandVolume know a volume is
//! encrypted, and inline volumes' `encryption`/`size` attributes. The key itself is the
//! node-publish secret's `encryptionKey`, read where the hand-off turns into a spec
//! (`cnfs_protocols::handoff`).
//!
//! The mode answers what differs: luks2 has a size (the capacity; ControllerExpandVolume
//! records a larger one on the share, `cnfs-volume.size.<bytes>` beside the container, and the
//! guest grows the volume at its next mount) and one guest at a time (single-node access
//! modes only); gocryptfs has neither, so its capacity, expansion and access modes are those
//! of a plain volume of its class.

use std::collections::HashMap;

use cnfs_protocols::spec::encryption::{self, MAX_SIZE, MIN_SIZE, MODE_LIST};
use cnfs_protocols::spec::EncryptionMode;
use tonic::Status;

use crate::backend::Capacity;
use crate::bounds::echo;
use crate::capability::invalid;

pub use cnfs_protocols::handoff::ENCRYPTION_KEY_SECRET;
/// A luks2 volume's recorded sizes: the marker directory's name for a size, and the size a
/// name records (shared with the guest, which reads them at each mount).
pub use cnfs_protocols::spec::encryption::{parse_size_marker, size_marker};

/// The StorageClass parameter (and inline volume attribute) that asks for encryption.
pub const PARAMETER: &str = "encryption";
/// The inline volume attribute with the container's size (luks2 only).
pub const SIZE_ATTRIBUTE: &str = "size";
/// File systems whose StorageClasses may ask for encryption (either mode).
pub const PROVISIONED_ON: &[&str] = &["nfs", "cephfs", "smb"];
/// What a backend's quota holds beyond a luks2 container (design §6.1); a `grow=quota` guest
/// sizes the container at the quota less this, so it is shared with the guest.
pub use cnfs_protocols::spec::encryption::QUOTA_HEADROOM;
/// LUKS2 is opened with 4 KiB sectors: the container is a whole number of them.
pub const ALIGN: u64 = 4096;
/// A luks2 volume's container file in its directory on the share (the guest's name for it,
/// `cnfs_agent::fs::luks2::CONTAINER`): its length is the container's current size.
pub const CONTAINER: &str = cnfs_protocols::spec::encryption::LUKS2_CONTAINER;
/// File systems whose luks2 volumes ControllerExpandVolume grows: those where the controller
/// can leave the new size beside the container, where the guest reads it at its next mount.
pub const GROWN_ON: &[&str] = &["nfs", "smb", "cephfs"];

/// What a name in a luks2 volume's directory says about its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeEntry {
    /// A well-formed size marker (of any file type: the guest reads names only).
    Marker(u64),
    /// The container, whose length counts once it is a regular file.
    Container,
}

/// The [`SizeEntry`] a directory entry named `name` is; `None` for every other name
/// (temporaries, malformed markers, anything else), which says nothing about the size.
pub fn size_entry(name: &str) -> Option<SizeEntry> {
    if name == CONTAINER {
        return Some(SizeEntry::Container);
    }
    parse_size_marker(name).map(SizeEntry::Marker)
}

/// What ControllerExpandVolume does for a luks2 volume, from the sizes already recorded for
/// it (size markers, and the container's own length once the guest has made it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Growth {
    /// At least the size asked for is recorded already: nothing to write (a repeated call,
    /// or a smaller size: a volume never shrinks). The size is the largest recorded.
    Recorded(u64),
    /// Record this size; then the smaller markers (`stale`) may go.
    Record { size: u64, stale: Vec<u64> },
}

/// The [`Growth`] for a request of `size` bytes when `markers` are the sizes the volume's
/// markers record and `container` its container's length (`None` before its first mount).
pub fn growth(size: u64, markers: &[u64], container: Option<u64>) -> Growth {
    let largest = markers.iter().copied().chain(container).max().unwrap_or(0);
    if size <= largest {
        return Growth::Recorded(largest);
    }
    let mut stale: Vec<u64> = markers.iter().copied().filter(|&m| m < size).collect();
    stale.sort_unstable();
    stale.dedup();
    Growth::Record { size, stale }
}

/// `parameters.encryption`: `None` when absent, else the mode it names.
pub fn from_parameters(p: &HashMap<String, String>) -> Result<Option<EncryptionMode>, Status> {
    let Some(v) = p.get(PARAMETER) else {
        return Ok(None);
    };
    mode("parameters.encryption", v).map(Some)
}

/// An `encryption` value: `luks2` or `gocryptfs`, exactly.
pub fn mode(field: &str, v: &str) -> Result<EncryptionMode, Status> {
    EncryptionMode::ALL
        .iter()
        .copied()
        .find(|m| m.as_str() == v)
        .ok_or_else(|| invalid(field, format!("{} is not supported ({MODE_LIST})", echo(v))))
}

/// The container's size for a capacity range: `required_bytes` rounded up to 4 KiB (else
/// `limit_bytes` rounded down), 64 MiB to 64 TiB, within `limit_bytes`.
pub fn container_size(c: Capacity) -> Result<u64, Status> {
    let size = if c.required > 0 {
        c.required.div_ceil(ALIGN).saturating_mul(ALIGN)
    } else if c.limit > 0 {
        c.limit - c.limit % ALIGN
    } else {
        return Err(invalid(
            "capacity_range.required_bytes",
            "is required for encryption=luks2: it is the size of the volume's container file",
        ));
    };
    if size < MIN_SIZE {
        return Err(Status::out_of_range(format!(
            "capacity_range: {size} bytes is below the {MIN_SIZE} bytes (64 MiB) an encrypted \
             (luks2) volume needs at least (its LUKS2 header alone takes 16 MiB): request 64Mi \
             or more"
        )));
    }
    if size > MAX_SIZE {
        return Err(Status::out_of_range(format!(
            "capacity_range: {size} bytes is above the {MAX_SIZE} bytes (64 TiB) of the largest \
             encrypted (luks2) volume"
        )));
    }
    if c.limit > 0 && size > c.limit {
        return Err(Status::out_of_range(format!(
            "capacity_range: required_bytes rounded up to whole 4 KiB sectors is {size} bytes, \
             above limit_bytes ({})",
            c.limit
        )));
    }
    Ok(size)
}

/// The capacity a provisioner is asked for when the volume is a container of `size` bytes:
/// a quota (CephFS) of the container plus [`QUOTA_HEADROOM`], no limit (the CO's limit binds
/// the container, whose size is the capacity reported). NFS has no quota and ignores it.
pub fn backend_capacity(size: u64) -> Capacity {
    Capacity {
        required: size.saturating_add(QUOTA_HEADROOM),
        limit: 0,
    }
}

/// `source` with `encryption=<mode>` and, for a mode with a size (luks2), `&size=<bytes>`
/// added to its query.
pub fn add_to_source(source: &str, mode: EncryptionMode, size: impl Into<Option<u64>>) -> String {
    let sep = if source.contains('?') { '&' } else { '?' };
    let mut out = format!("{source}{sep}{}={mode}", encryption::OPT_ENCRYPTION);
    if let Some(size) = size.into() {
        out.push_str(&format!("&{}={size}", encryption::OPT_SIZE));
    }
    out
}

/// Whether a luks2 volume of file system `fs` is grown through its quota: CephFS classes give
/// each volume a subvolume whose quota is the container plus [`QUOTA_HEADROOM`], and their
/// sources say `grow=quota`, so that the guest sizes the container from the quota at each
/// mount and ControllerExpandVolume grows a volume by raising its quota.
pub fn grows_with_quota(fs: &str, mode: EncryptionMode) -> bool {
    fs == "cephfs" && mode.has_size()
}

/// `source` with `grow=quota` added to its query (see [`grows_with_quota`]).
pub fn add_grow_to_quota(source: &str) -> String {
    let sep = if source.contains('?') { '&' } else { '?' };
    format!(
        "{source}{sep}{}={}",
        encryption::OPT_GROW,
        encryption::GROW_TO_QUOTA
    )
}

/// The encryption mode a volume URL describes (`None` for a plain one, and for one that does
/// not parse: whoever reads it refuses it then).
pub fn source_mode(source: &str) -> Option<EncryptionMode> {
    let url = cnfs_protocols::volume_url::parse("check", source).ok()?;
    let e = url.wire.encryption.as_ref()?;
    EncryptionMode::parse("mode", &e.mode).ok()
}

/// Whether a volume URL describes an encrypted volume.
pub fn source_is_encrypted(source: &str) -> bool {
    source_mode(source).is_some()
}

/// The first field of an encrypted volume's id: `<fs>+<mode>`, so that DeleteVolume finds the
/// provisioner and ControllerExpandVolume knows, from the id alone, whether a container grows
/// (luks2) or the volume's class decides (gocryptfs).
pub fn id_head(fs: &str, mode: Option<EncryptionMode>) -> String {
    match mode {
        Some(m) => format!("{fs}+{}", m.as_str()),
        None => fs.to_string(),
    }
}

/// The inverse of [`id_head`]: the file system and the mode; `None` for a marker that is not
/// a mode.
pub fn split_id_head(head: &str) -> Option<(&str, Option<EncryptionMode>)> {
    match head.split_once('+') {
        None => Some((head, None)),
        Some((fs, marker)) => EncryptionMode::ALL
            .iter()
            .find(|m| m.as_str() == marker)
            .map(|m| (fs, Some(*m))),
    }
}

/// An inline (or static) volume's `encryption` and `size` attributes folded into its source
/// URL, the form the hand-off record keeps and the shim reads. `size` (luks2 only, required
/// there) is a byte count or a whole number of Ki, Mi, Gi or Ti, as in a volume URL; it is
/// written as bytes.
pub fn source_with_attributes(
    source: &str,
    ctx: &HashMap<String, String>,
) -> Result<String, Status> {
    let enc = ctx.get(PARAMETER);
    let size = ctx.get(SIZE_ATTRIBUTE);
    let field = |k: &str| format!("volume_context.{k}");
    let Some(enc) = enc else {
        return match size {
            None => Ok(source.to_string()),
            Some(_) => Err(invalid(
                &field(SIZE_ATTRIBUTE),
                "is only for encrypted volumes (add encryption: luks2)",
            )),
        };
    };
    let mode = mode(&field(PARAMETER), enc)?;
    let bytes = match (mode.has_size(), size) {
        (true, None) => {
            return Err(invalid(
                &field(SIZE_ATTRIBUTE),
                format!("is required with encryption: {mode} (the container's size, like 10Gi)"),
            ))
        }
        (false, Some(_)) => {
            return Err(invalid(
                &field(SIZE_ATTRIBUTE),
                format!(
                    "is refused with encryption: {mode}: only luks2 volumes have a size ({mode} \
                     shares the file system's space)"
                ),
            ))
        }
        (false, None) => None,
        (true, Some(s)) => {
            let bytes = encryption::parse_size(&field(SIZE_ATTRIBUTE), s)
                .map_err(|e| invalid(&e.field, e.reason))?;
            if bytes % ALIGN != 0 {
                return Err(invalid(
                    &field(SIZE_ATTRIBUTE),
                    format!("{bytes} bytes is not a whole number of 4 KiB sectors"),
                ));
            }
            Some(bytes)
        }
    };
    if source_is_encrypted(source) {
        return Err(invalid(
            &field(PARAMETER),
            "the source already says encryption=; give it in one place only",
        ));
    }
    Ok(add_to_source(source, mode, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn cap(required: u64, limit: u64) -> Capacity {
        Capacity { required, limit }
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn luks2_and_gocryptfs_are_the_encryption_parameters_and_others_are_refused_by_name() {
        let p = |v: &str| HashMap::from([(PARAMETER.to_string(), v.to_string())]);
        assert_eq!(from_parameters(&HashMap::new()).unwrap(), None);
        assert_eq!(
            from_parameters(&p("luks2")).unwrap(),
            Some(EncryptionMode::Luks2)
        );
        assert_eq!(
            from_parameters(&p("gocryptfs")).unwrap(),
            Some(EncryptionMode::Gocryptfs)
        );
        for bad in [
            "LUKS2",
            "luks",
            "",
            "luks2 ",
            "fscrypt",
            "GOCRYPTFS",
            "gocryptfs ",
            "gocrypt",
        ] {
            let e = from_parameters(&p(bad)).unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}");
            assert!(
                e.message().starts_with("parameters.encryption: ")
                    && e.message()
                        .ends_with("is not supported (luks2 or gocryptfs)"),
                "{bad:?}: {e:?}"
            );
        }
    }

    #[test]
    fn the_container_size_is_the_capacity_rounded_up_to_4_kib() {
        assert_eq!(container_size(cap(64 * MIB, 0)).unwrap(), 64 * MIB);
        assert_eq!(
            container_size(cap(100 * MIB + 1, 0)).unwrap(),
            100 * MIB + 4096
        );
        assert_eq!(
            container_size(cap(100 * MIB + 4095, 0)).unwrap(),
            100 * MIB + 4096
        );
        // Only a limit: rounded down, so that it stays within it.
        assert_eq!(
            container_size(cap(0, 100 * MIB + 5000)).unwrap(),
            100 * MIB + 4096
        );
        assert_eq!(container_size(cap(64 * MIB, 64 * MIB)).unwrap(), 64 * MIB);
    }

    #[test]
    fn a_capacity_below_64_mib_or_missing_or_past_its_limit_is_refused_with_why() {
        let e = container_size(cap(64 * MIB - 4096, 0)).unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange);
        assert!(
            e.message()
                .starts_with("capacity_range: 67104768 bytes is below")
                && e.message().contains("64 MiB"),
            "{e:?}"
        );
        let e = container_size(cap(0, 0)).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(
            e.message()
                .starts_with("capacity_range.required_bytes: is required for encryption=luks2"),
            "{e:?}"
        );
        let e = container_size(cap(100 * MIB + 1, 100 * MIB + 10)).unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange);
        assert!(e.message().contains("above limit_bytes"), "{e:?}");
        let e = container_size(cap(MAX_SIZE + 1, 0)).unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange);
        assert!(e.message().contains("64 TiB"), "{e:?}");
    }

    #[test]
    fn a_size_marker_is_named_by_the_container_size_in_decimal_bytes() {
        let size = container_size(cap((1 << 30) + 1, 0)).unwrap();
        assert_eq!(size_marker(size), "cnfs-volume.size.1073745920");
        assert_eq!(parse_size_marker("cnfs-volume.size.1073745920"), Some(size));
        assert_eq!(size_marker(MIN_SIZE), "cnfs-volume.size.67108864");
        assert_eq!(size_marker(MAX_SIZE), "cnfs-volume.size.70368744177664");
    }

    proptest::proptest! {
        /// Every size the controller would record is one the guest reads back.
        #[test]
        fn every_container_size_makes_a_marker_the_guest_reads_back(
            required in MIN_SIZE - ALIGN + 1..=MAX_SIZE,
        ) {
            let size = container_size(cap(required, 0)).expect("in range");
            proptest::prop_assert_eq!(parse_size_marker(&size_marker(size)), Some(size));
        }
    }

    #[test]
    fn a_repeated_or_smaller_expansion_records_nothing_and_answers_the_largest_size() {
        const G: u64 = 1 << 30;
        // The same size again: recorded already (CSI: a repeated call succeeds).
        assert_eq!(growth(2 * G, &[2 * G], None), Growth::Recorded(2 * G));
        // Smaller than a marker or than the container the guest grew: never shrinks.
        assert_eq!(growth(G, &[G, 2 * G], None), Growth::Recorded(2 * G));
        assert_eq!(growth(G, &[], Some(3 * G)), Growth::Recorded(3 * G));
        assert_eq!(growth(2 * G, &[G], Some(3 * G)), Growth::Recorded(3 * G));
    }

    #[test]
    fn a_larger_expansion_records_its_size_and_names_the_smaller_markers_stale() {
        const G: u64 = 1 << 30;
        assert_eq!(
            growth(2 * G, &[], None),
            Growth::Record {
                size: 2 * G,
                stale: vec![]
            }
        );
        assert_eq!(
            growth(4 * G, &[3 * G, G, 3 * G], Some(2 * G)),
            Growth::Record {
                size: 4 * G,
                stale: vec![G, 3 * G]
            }
        );
    }

    #[test]
    fn only_the_container_and_well_formed_markers_say_anything_about_the_size() {
        assert_eq!(size_entry("cnfs-volume.luks2"), Some(SizeEntry::Container));
        assert_eq!(
            size_entry("cnfs-volume.size.1073745920"),
            Some(SizeEntry::Marker(1073745920))
        );
        for other in [
            ".cnfs-volume.luks2.new-3f9a",
            "cnfs-volume.luks2.bak",
            "CNFS-VOLUME.LUKS2",
            "cnfs-volume.size.1073741825",
            "cnfs-volume.size.1Gi",
            "cnfs-volume.gocryptfs",
            ".",
            "",
        ] {
            assert_eq!(size_entry(other), None, "{other:?}");
        }
    }

    #[test]
    fn cephfs_luks2_sources_grow_with_their_quota_and_nothing_else_does() {
        assert!(grows_with_quota("cephfs", EncryptionMode::Luks2));
        for (fs, mode) in [
            ("cephfs", EncryptionMode::Gocryptfs),
            ("nfs", EncryptionMode::Luks2),
            ("smb", EncryptionMode::Luks2),
        ] {
            assert!(!grows_with_quota(fs, mode), "{fs} {mode:?}");
        }
        let source = add_grow_to_quota(&add_to_source(
            "cephfs://10.0.0.5:3300/volumes/csi/pvc-1/u?fs=cephfs",
            EncryptionMode::Luks2,
            1 << 30,
        ));
        assert_eq!(
            source,
            "cephfs://10.0.0.5:3300/volumes/csi/pvc-1/u?fs=cephfs&encryption=luks2&size=1073741824\
             &grow=quota"
        );
        // The guest's reading of it: grow_to_quota on the wire.
        let url = cnfs_protocols::volume_url::parse("v", &source).expect("parses");
        assert!(url
            .wire
            .encryption
            .as_ref()
            .is_some_and(|e| e.grow_to_quota));
    }

    #[test]
    fn luks2_and_gocryptfs_are_provisioned_on_smb_and_luks2_grows_there() {
        assert_eq!(PROVISIONED_ON, ["nfs", "cephfs", "smb"]);
        assert_eq!(GROWN_ON, ["nfs", "smb", "cephfs"]);
        assert_eq!(id_head("smb", Some(EncryptionMode::Luks2)), "smb+luks2");
        assert_eq!(
            split_id_head("smb+gocryptfs"),
            Some(("smb", Some(EncryptionMode::Gocryptfs)))
        );
    }

    #[test]
    fn the_source_carries_the_mode_and_the_size_in_bytes_and_parses_back() {
        let s = add_to_source(
            "nfs://10.0.0.5/exports/k8s/pvc-1",
            EncryptionMode::Luks2,
            1 << 30,
        );
        assert_eq!(
            s,
            "nfs://10.0.0.5/exports/k8s/pvc-1?encryption=luks2&size=1073741824"
        );
        let s = add_to_source(
            "nfs://10.0.0.5/e/pvc-1?vers=4.1",
            EncryptionMode::Luks2,
            1 << 30,
        );
        assert_eq!(
            s,
            "nfs://10.0.0.5/e/pvc-1?vers=4.1&encryption=luks2&size=1073741824"
        );
        let u = cnfs_protocols::volume_url::parse("v", &s).expect("parses");
        let e = u.wire.encryption.as_ref().expect("encrypted");
        assert_eq!((e.mode.as_str(), e.size_bytes), ("luks2", 1 << 30));
        assert!(source_is_encrypted(&s));
        assert_eq!(source_mode(&s), Some(EncryptionMode::Luks2));
        assert!(!source_is_encrypted("nfs://10.0.0.5/e/pvc-1?vers=4.1"));
        assert_eq!(source_mode("nfs://10.0.0.5/e/pvc-1?vers=4.1"), None);
    }

    #[test]
    fn a_gocryptfs_source_carries_the_mode_and_no_size_and_parses_back() {
        let s = add_to_source(
            "nfs://10.0.0.5/e/pvc-1?vers=3",
            EncryptionMode::Gocryptfs,
            None,
        );
        assert_eq!(s, "nfs://10.0.0.5/e/pvc-1?vers=3&encryption=gocryptfs");
        assert_eq!(
            add_to_source("nfs://10.0.0.5/e/pvc-1", EncryptionMode::Gocryptfs, None),
            "nfs://10.0.0.5/e/pvc-1?encryption=gocryptfs"
        );
        let u = cnfs_protocols::volume_url::parse("v", &s).expect("parses");
        let e = u.wire.encryption.as_ref().expect("encrypted");
        assert_eq!((e.mode.as_str(), e.size_bytes), ("gocryptfs", 0));
        assert_eq!(source_mode(&s), Some(EncryptionMode::Gocryptfs));
    }

    #[test]
    fn a_backend_quota_holds_the_container_plus_64_mib_with_no_limit() {
        assert_eq!(
            backend_capacity(1 << 30),
            cap((1 << 30) + 64 * MIB, 0),
            "quota = container + 64 MiB"
        );
        assert_eq!(backend_capacity(64 * MIB).size(), Some(128 * MIB));
        // A subvolume made for it fits the same request again (a retried CreateVolume).
        assert!(backend_capacity(64 * MIB).fits(Some(128 * MIB)));
        assert!(!backend_capacity(64 * MIB).fits(Some(64 * MIB)));
    }

    #[test]
    fn id_heads_mark_encrypted_volumes_and_unknown_marks_are_none() {
        assert_eq!(id_head("nfs", None), "nfs");
        assert_eq!(id_head("nfs", Some(EncryptionMode::Luks2)), "nfs+luks2");
        assert_eq!(
            split_id_head("nfs+luks2"),
            Some(("nfs", Some(EncryptionMode::Luks2)))
        );
        assert_eq!(
            id_head("nfs", Some(EncryptionMode::Gocryptfs)),
            "nfs+gocryptfs"
        );
        assert_eq!(
            split_id_head("nfs+gocryptfs"),
            Some(("nfs", Some(EncryptionMode::Gocryptfs)))
        );
        assert_eq!(split_id_head("nfs"), Some(("nfs", None)));
        assert_eq!(
            id_head("cephfs", Some(EncryptionMode::Luks2)),
            "cephfs+luks2"
        );
        assert_eq!(
            split_id_head("cephfs+luks2"),
            Some(("cephfs", Some(EncryptionMode::Luks2)))
        );
        assert_eq!(split_id_head("nfs+plain"), None);
        assert_eq!(split_id_head("nfs+GOCRYPTFS"), None);
        assert_eq!(split_id_head("nfs+"), None);
    }

    #[test]
    fn inline_attributes_fold_into_the_source_or_are_refused_by_name() {
        let src = "nfs://10.0.0.5/e/inline?vers=4.1";
        let ctx = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(source_with_attributes(src, &ctx(&[])).unwrap(), src);
        assert_eq!(
            source_with_attributes(src, &ctx(&[("encryption", "gocryptfs")])).unwrap(),
            format!("{src}&encryption=gocryptfs")
        );
        assert_eq!(
            source_with_attributes(src, &ctx(&[("encryption", "luks2"), ("size", "1Gi")])).unwrap(),
            format!("{src}&encryption=luks2&size=1073741824")
        );
        for (pairs, field, words) in [
            (
                &[("encryption", "luks2")][..],
                "volume_context.size",
                "is required with encryption",
            ),
            (
                &[("size", "1Gi")][..],
                "volume_context.size",
                "is only for encrypted volumes",
            ),
            (
                &[("encryption", "aes"), ("size", "1Gi")][..],
                "volume_context.encryption",
                "\"aes\" is not supported (luks2 or gocryptfs)",
            ),
            (
                &[("encryption", "gocryptfs"), ("size", "1Gi")][..],
                "volume_context.size",
                "is refused with encryption: gocryptfs: only luks2 volumes have a size \
                 (gocryptfs shares the file system's space)",
            ),
            (
                &[("encryption", "luks2"), ("size", "1G")][..],
                "volume_context.size",
                "is not a size like 10Gi",
            ),
            (
                &[("encryption", "luks2"), ("size", "32Mi")][..],
                "volume_context.size",
                "is outside 64Mi",
            ),
            (
                &[("encryption", "luks2"), ("size", "67108865")][..],
                "volume_context.size",
                "not a whole number of 4 KiB sectors",
            ),
        ] {
            let e = source_with_attributes(src, &ctx(pairs)).unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{pairs:?}");
            assert!(
                e.message().starts_with(&format!("{field}: ")) && e.message().contains(words),
                "{pairs:?}: {e:?}"
            );
        }
        for (source, pairs) in [
            (
                "nfs://h/e/x?encryption=luks2&size=1Gi",
                &[("encryption", "luks2"), ("size", "1Gi")][..],
            ),
            (
                "nfs://h/e/x?encryption=gocryptfs",
                &[("encryption", "gocryptfs")][..],
            ),
            (
                "nfs://h/e/x?encryption=luks2&size=1Gi",
                &[("encryption", "gocryptfs")][..],
            ),
        ] {
            let e = source_with_attributes(source, &ctx(pairs)).unwrap_err();
            assert!(
                e.message()
                    .starts_with("volume_context.encryption: the source already"),
                "{source}: {e:?}"
            );
        }
    }
}
