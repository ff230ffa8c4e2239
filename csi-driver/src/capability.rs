//! Volume capabilities CNFS can honour: file-system access (never block) in any access mode,
//! since NFS and CephFS are shared file systems; a luks2 volume (one ext4 in a LUKS2
//! container, opened by one guest) in single-node modes only. A gocryptfs volume is shared
//! like a plain one (every guest runs its own gocryptfs over the same encrypted tree).

use cnfs_protocols::spec::{EncryptionMode, FsKind};
use tonic::Status;

use crate::bounds;
use crate::csi::volume_capability::access_mode::Mode;
use crate::csi::volume_capability::AccessType;
use crate::csi::VolumeCapability;

/// What a supported capability asks of the volume.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// The access mode only reads.
    pub read_only: bool,
    /// `mount_flags` (e.g. from a PV's `mountOptions`): `key` or `key=value`, validated later
    /// by the same option allowlist as the volume URL.
    pub mount_flags: Vec<String>,
}

/// `InvalidArgument` naming the field.
pub fn invalid(field: &str, reason: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {reason}"))
}

/// `InvalidArgument` when a required field is empty.
pub fn required(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(invalid(field, "is required"));
    }
    Ok(())
}

/// Checks one capability; `field` names it in errors.
pub fn check(field: &str, cap: Option<&VolumeCapability>) -> Result<Access, Status> {
    let cap = cap.ok_or_else(|| invalid(field, "is required"))?;
    let mount = match &cap.access_type {
        Some(AccessType::Mount(m)) => m,
        Some(AccessType::Block(_)) => {
            return Err(invalid(
                field,
                "block access is not supported: CNFS volumes are shared file systems",
            ))
        }
        None => return Err(invalid(field, "access_type (mount) is required")),
    };
    // The file system comes from the volume's source; a capability may name it as CNFS
    // does or by one of its kernel types.
    if !mount.fs_type.is_empty() && FsKind::by_name_or_kernel_type(&mount.fs_type).is_none() {
        let known: Vec<&str> = FsKind::ALL.iter().map(|k| k.name()).collect();
        return Err(invalid(
            &format!("{field}.mount.fs_type"),
            format!(
                "{} is not a CNFS file system ({})",
                bounds::echo(&mount.fs_type),
                known.join(", ")
            ),
        ));
    }
    bounds::flags(&format!("{field}.mount.mount_flags"), &mount.mount_flags)?;
    if !mount.volume_mount_group.is_empty() {
        return Err(invalid(
            &format!("{field}.mount.volume_mount_group"),
            "is not supported (CNFS does not change ownership on shared file systems)",
        ));
    }
    let mode = cap
        .access_mode
        .as_ref()
        .ok_or_else(|| invalid(&format!("{field}.access_mode"), "is required"))?;
    let read_only = match Mode::try_from(mode.mode) {
        Ok(Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly) => true,
        Ok(Mode::Unknown) | Err(_) => {
            return Err(invalid(
                &format!("{field}.access_mode.mode"),
                format!("{} is not a known access mode", mode.mode),
            ))
        }
        Ok(_) => false,
    };
    Ok(Access {
        read_only,
        mount_flags: mount.mount_flags.clone(),
    })
}

/// Refuses, for a single-guest encrypted volume (luks2), the access modes that would open it
/// on several nodes: its ext4 lives in one guest's kernel, and a second writer (or a reader
/// of a file system another kernel is changing) would see it corrupt. The server-side lock
/// would refuse the second guest at mount time anyway; this says why before anything is
/// made. A shared mode (gocryptfs) takes every access mode.
pub fn refuse_shared(
    field: &str,
    cap: &VolumeCapability,
    mode: EncryptionMode,
) -> Result<(), Status> {
    let Some(m) = cap.access_mode.as_ref().filter(|_| mode.single_guest()) else {
        return Ok(());
    };
    match Mode::try_from(m.mode) {
        Ok(
            shared @ (Mode::MultiNodeReaderOnly
            | Mode::MultiNodeSingleWriter
            | Mode::MultiNodeMultiWriter),
        ) => Err(invalid(
            &format!("{field}.access_mode.mode"),
            format!(
                "{} is refused for encryption={} volumes: the volume is one ext4 file system \
                 in a LUKS2 container that one guest opens at a time; use a single-node mode \
                 (ReadWriteOnce, ReadWriteOncePod or a single-node ReadOnlyMany)",
                shared.as_str_name(),
                mode.as_str()
            ),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csi::volume_capability::{AccessMode, BlockVolume, MountVolume};

    fn cap(access: AccessType, mode: Mode) -> VolumeCapability {
        VolumeCapability {
            access_type: Some(access),
            access_mode: Some(AccessMode { mode: mode as i32 }),
        }
    }

    #[test]
    fn file_system_access_in_every_mode_and_reader_modes_are_read_only() {
        let m = AccessType::Mount(MountVolume::default());
        assert!(
            !check("c", Some(&cap(m.clone(), Mode::MultiNodeMultiWriter)))
                .unwrap()
                .read_only
        );
        assert!(
            check("c", Some(&cap(m, Mode::MultiNodeReaderOnly)))
                .unwrap()
                .read_only
        );
    }

    #[test]
    fn block_unknown_modes_and_missing_parts_are_refused_by_field() {
        let block = cap(AccessType::Block(BlockVolume {}), Mode::SingleNodeWriter);
        let e = check("volume_capability", Some(&block)).unwrap_err();
        assert!(e.message().contains("block"), "{e:?}");
        let unknown = cap(AccessType::Mount(MountVolume::default()), Mode::Unknown);
        let e = check("volume_capability", Some(&unknown)).unwrap_err();
        assert!(
            e.message()
                .starts_with("volume_capability.access_mode.mode"),
            "{e:?}"
        );
        let e = check("volume_capability", None).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let xfs = cap(
            AccessType::Mount(MountVolume {
                fs_type: "xfs".into(),
                ..Default::default()
            }),
            Mode::SingleNodeWriter,
        );
        let e = check("volume_capability", Some(&xfs)).unwrap_err();
        assert!(e.message().contains("fs_type"), "{e:?}");
    }

    #[test]
    fn encrypted_volumes_refuse_every_multi_node_mode_by_name_and_take_single_node_ones() {
        let m = || AccessType::Mount(MountVolume::default());
        for shared in [
            Mode::MultiNodeReaderOnly,
            Mode::MultiNodeSingleWriter,
            Mode::MultiNodeMultiWriter,
        ] {
            let e = refuse_shared(
                "volume_capability",
                &cap(m(), shared),
                EncryptionMode::Luks2,
            )
            .unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(
                e.message().starts_with(&format!(
                    "volume_capability.access_mode.mode: {} is refused for encryption=luks2",
                    shared.as_str_name()
                )) && e.message().contains("one guest opens at a time"),
                "{e:?}"
            );
        }
        for single in [
            Mode::SingleNodeWriter,
            Mode::SingleNodeReaderOnly,
            Mode::SingleNodeSingleWriter,
            Mode::SingleNodeMultiWriter,
        ] {
            refuse_shared("c", &cap(m(), single), EncryptionMode::Luks2)
                .unwrap_or_else(|e| panic!("{single:?}: {e:?}"));
        }
        // A single-node reader is read-only, as for any volume.
        assert!(
            check("c", Some(&cap(m(), Mode::SingleNodeReaderOnly)))
                .unwrap()
                .read_only
        );
    }

    #[test]
    fn gocryptfs_volumes_take_every_access_mode_as_plain_ones_do() {
        let m = || AccessType::Mount(MountVolume::default());
        for mode in [
            Mode::MultiNodeReaderOnly,
            Mode::MultiNodeSingleWriter,
            Mode::MultiNodeMultiWriter,
            Mode::SingleNodeWriter,
            Mode::SingleNodeReaderOnly,
            Mode::SingleNodeSingleWriter,
            Mode::SingleNodeMultiWriter,
        ] {
            refuse_shared("c", &cap(m(), mode), EncryptionMode::Gocryptfs)
                .unwrap_or_else(|e| panic!("{mode:?}: {e:?}"));
        }
        // Block access stays refused by the general check, whatever the mode.
        let block = cap(
            AccessType::Block(BlockVolume {}),
            Mode::MultiNodeMultiWriter,
        );
        assert!(check("c", Some(&block))
            .unwrap_err()
            .message()
            .contains("block"));
    }

    #[test]
    fn a_huge_fs_type_or_flag_is_refused_and_echoed_only_in_bounded_form() {
        let huge = cap(
            AccessType::Mount(MountVolume {
                fs_type: "x".repeat(4 << 20),
                ..Default::default()
            }),
            Mode::SingleNodeWriter,
        );
        let e = check("volume_capability", Some(&huge)).unwrap_err();
        assert!(
            e.message().starts_with("volume_capability.mount.fs_type")
                && e.message().contains("(4194304 bytes)")
                && e.message().len() < 300,
            "{}",
            &e.message()[..300.min(e.message().len())]
        );
        let flags = cap(
            AccessType::Mount(MountVolume {
                mount_flags: vec!["ro".into(), format!("nconnect={}", "4".repeat(200))],
                ..Default::default()
            }),
            Mode::SingleNodeWriter,
        );
        let e = check("volume_capability", Some(&flags)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.message()
                .starts_with("volume_capability.mount.mount_flags[1]: is 209 bytes"),
            "{e:?}"
        );
    }
}
