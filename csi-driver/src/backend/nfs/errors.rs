//! NFSv3, MOUNT and RPC failures, classified for the CSI code they become, with a hint for
//! the operator where there is one.

use nfs3_client::nfs3_types::mount::mountstat3;
use nfs3_client::nfs3_types::nfs3::nfsstat3;
use nfs3_client::{MountError, RpcError};

use crate::backend::BackendError;

/// What to tell the operator when the server refuses an operation.
pub(super) fn access_hint(stat: nfsstat3) -> &'static str {
    match stat {
        nfsstat3::NFS3ERR_ACCES | nfsstat3::NFS3ERR_PERM => {
            " (if the export squashes root, the share root must be writable by the squashed user)"
        }
        nfsstat3::NFS3ERR_ROFS => " (the export is read-only)",
        _ => "",
    }
}

/// Classifies an NFSv3 status; `context` says which server and what was attempted.
pub(super) fn nfs_error(stat: nfsstat3, context: String) -> BackendError {
    let msg = format!("{context}: {stat}{}", access_hint(stat));
    match stat {
        nfsstat3::NFS3ERR_PERM | nfsstat3::NFS3ERR_ACCES | nfsstat3::NFS3ERR_ROFS => {
            BackendError::PermissionDenied(msg)
        }
        nfsstat3::NFS3ERR_NOENT => BackendError::NotFound(msg),
        nfsstat3::NFS3ERR_NOTDIR | nfsstat3::NFS3ERR_NAMETOOLONG | nfsstat3::NFS3ERR_INVAL => {
            BackendError::Invalid(msg)
        }
        // "Try again later" (JUKEBOX) and a root handle that went stale (server restarted with
        // other handles): a retry with a fresh mount can succeed.
        nfsstat3::NFS3ERR_JUKEBOX | nfsstat3::NFS3ERR_STALE => BackendError::Unavailable(msg),
        _ => BackendError::Failed(msg),
    }
}

/// Classifies a MOUNT failure for `export`.
pub(super) fn mount_error(e: MountError, server: &str, export: &str) -> BackendError {
    match e {
        MountError::Rpc(e) => rpc_error(e, server, "MOUNT"),
        MountError::Denied(stat) => {
            let msg = format!("NFS server {server} refused to mount export {export}: {stat}");
            match stat {
                mountstat3::MNT3ERR_NOENT | mountstat3::MNT3ERR_NOTDIR => {
                    BackendError::NotFound(msg)
                }
                mountstat3::MNT3ERR_PERM | mountstat3::MNT3ERR_ACCES => {
                    BackendError::PermissionDenied(msg)
                }
                mountstat3::MNT3ERR_INVAL | mountstat3::MNT3ERR_NAMETOOLONG => {
                    BackendError::Invalid(msg)
                }
                _ => BackendError::Failed(msg),
            }
        }
    }
}

/// Classifies an RPC-level failure talking to `service` on `server`.
pub(super) fn rpc_error(e: RpcError, server: &str, service: &str) -> BackendError {
    let msg = format!("NFS server {server}: {service}: {e}");
    match e {
        RpcError::Io(_) => BackendError::Unavailable(msg),
        RpcError::Auth(_) => BackendError::PermissionDenied(msg),
        RpcError::ProgUnavail | RpcError::ProgMismatch { .. } => BackendError::Failed(format!(
            "{msg} (the server does not offer NFSv3/MOUNTv3 here)"
        )),
        _ => BackendError::Failed(msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nfs_statuses_map_to_actionable_kinds() {
        let k = |s| nfs_error(s, "ctx".into());
        assert!(matches!(
            k(nfsstat3::NFS3ERR_ACCES),
            BackendError::PermissionDenied(_)
        ));
        assert!(matches!(
            k(nfsstat3::NFS3ERR_PERM),
            BackendError::PermissionDenied(_)
        ));
        assert!(matches!(
            k(nfsstat3::NFS3ERR_ROFS),
            BackendError::PermissionDenied(_)
        ));
        assert!(matches!(
            k(nfsstat3::NFS3ERR_NOENT),
            BackendError::NotFound(_)
        ));
        assert!(matches!(
            k(nfsstat3::NFS3ERR_NOTDIR),
            BackendError::Invalid(_)
        ));
        assert!(matches!(
            k(nfsstat3::NFS3ERR_JUKEBOX),
            BackendError::Unavailable(_)
        ));
        assert!(matches!(k(nfsstat3::NFS3ERR_IO), BackendError::Failed(_)));
        let m = k(nfsstat3::NFS3ERR_NOSPC).to_string();
        assert!(m.contains("ctx") && m.contains("NFS3ERR_NOSPC"), "{m}");
    }

    #[test]
    fn mount_and_rpc_failures_map_to_actionable_kinds() {
        let m = |s| mount_error(MountError::Denied(s), "srv", "/e");
        assert!(matches!(
            m(mountstat3::MNT3ERR_NOENT),
            BackendError::NotFound(_)
        ));
        assert!(matches!(
            m(mountstat3::MNT3ERR_ACCES),
            BackendError::PermissionDenied(_)
        ));
        assert!(matches!(
            m(mountstat3::MNT3ERR_PERM),
            BackendError::PermissionDenied(_)
        ));
        assert!(matches!(m(mountstat3::MNT3ERR_IO), BackendError::Failed(_)));
        let msg = m(mountstat3::MNT3ERR_NOENT).to_string();
        assert!(msg.contains("srv") && msg.contains("/e"), "{msg}");

        let io = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(matches!(
            rpc_error(RpcError::Io(io), "srv", "NFS"),
            BackendError::Unavailable(_)
        ));
        assert!(matches!(
            rpc_error(
                RpcError::Auth(nfs3_client::nfs3_types::rpc::auth_stat::AUTH_TOOWEAK),
                "srv",
                "NFS"
            ),
            BackendError::PermissionDenied(_)
        ));
        assert!(matches!(
            rpc_error(RpcError::ProgUnavail, "srv", "NFS"),
            BackendError::Failed(_)
        ));
    }
}
