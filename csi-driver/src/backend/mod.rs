//! Storage backends the controller provisions on, entirely in user space: no host mount and
//! no privilege (an NFSv3 client library for NFS shares, Ceph's own management commands for
//! CephFS subvolumes). Every call is bounded by a deadline.

pub mod cephfs;
pub mod nfs;

use std::time::Duration;

/// How long one backend operation may take before it is abandoned.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// What happens to an NFS volume's directory when its volume is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnDelete {
    /// Keep the directory and its data.
    Retain,
    /// Remove the directory and everything in it.
    #[default]
    Delete,
    /// Rename it to `archived-<name>` beside where it was.
    Archive,
}

impl OnDelete {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "retain" => Some(OnDelete::Retain),
            "delete" => Some(OnDelete::Delete),
            "archive" => Some(OnDelete::Archive),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OnDelete::Retain => "retain",
            OnDelete::Delete => "delete",
            OnDelete::Archive => "archive",
        }
    }
}

/// A backend failure, classified for the CSI status code it becomes. Messages never carry a
/// key.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The share, file system, group or volume does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request cannot work (bad name, not a directory, size the backend refuses).
    #[error("{0}")]
    Invalid(String),
    /// The backend refused the credentials or the operation.
    #[error("{0}")]
    PermissionDenied(String),
    /// The backend did not answer in time or could not be reached: worth retrying.
    #[error("{0}")]
    Unavailable(String),
    /// Exists with different properties than requested (e.g. another size).
    #[error("{0}")]
    AlreadyExists(String),
    /// Anything else the backend reported.
    #[error("{0}")]
    Failed(String),
}
