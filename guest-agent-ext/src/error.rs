//! The agent's errors, each mapped to exactly one ttrpc status code at the RPC edge so that
//! a caller can act on the code and show the message to a person.

use cnfs_protocols::spec::SpecError;
use nix::errno::Errno;
use ttrpc::Code;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Invalid(#[from] SpecError),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Deadline(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Internal(String),
}

impl AgentError {
    pub fn code(&self) -> Code {
        match self {
            AgentError::Invalid(_) => Code::INVALID_ARGUMENT,
            AgentError::NotFound(_) => Code::NOT_FOUND,
            AgentError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            AgentError::Deadline(_) => Code::DEADLINE_EXCEEDED,
            AgentError::Unavailable(_) => Code::UNAVAILABLE,
            AgentError::PermissionDenied(_) => Code::PERMISSION_DENIED,
            AgentError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            AgentError::Busy(_) => Code::RESOURCE_EXHAUSTED,
            AgentError::Internal(_) => Code::INTERNAL,
        }
    }

    /// A failed mount(2), in words a person can act on. `what` names the volume and source.
    pub fn from_mount_errno(what: &str, e: Errno) -> Self {
        let m = |hint: &str| format!("mounting {what}: {} ({hint})", e.desc());
        match e {
            Errno::EACCES | Errno::EPERM => AgentError::PermissionDenied(m(
                "the server refused access; check its export rules or credentials",
            )),
            Errno::ENOENT => {
                AgentError::NotFound(m("the export or path does not exist on the server"))
            }
            Errno::ETIMEDOUT => AgentError::Deadline(m("the server did not answer")),
            Errno::ECONNREFUSED
            | Errno::EHOSTUNREACH
            | Errno::ENETUNREACH
            | Errno::ECONNRESET
            | Errno::EHOSTDOWN
            | Errno::EIO => {
                AgentError::Unavailable(m("the server is not reachable from the guest"))
            }
            Errno::ENODEV => {
                AgentError::FailedPrecondition(m("the guest kernel lacks this file system"))
            }
            Errno::EINVAL => AgentError::Invalid(SpecError {
                field: "volume.options".into(),
                reason: m("the guest kernel rejected the mount options"),
            }),
            Errno::EPROTONOSUPPORT => AgentError::FailedPrecondition(m(
                "the server or kernel does not support this protocol version",
            )),
            _ => AgentError::Internal(m("unexpected error")),
        }
    }
}

impl From<AgentError> for ttrpc::Error {
    fn from(e: AgentError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}
