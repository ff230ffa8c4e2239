//! Reaching the agent and reading its answers: the address (`--url` or the sandbox's Kata
//! shim), one bounded request, the errors either can end in, and the documented exit code
//! for each.

use std::time::Duration;

use anyhow::Context;
use cnfs_host::kata::{self, KataError, MonitorPaths};
use cnfs_protocols::spec::SpecError;
use cnfs_protocols::transport::AgentAddress;
use ttrpc::Code;

use crate::Cli;

pub(crate) const EXIT_OTHER: u8 = 1;
pub(crate) const EXIT_UNREACHABLE: u8 = 3;
pub(crate) const EXIT_INVALID: u8 = 4;
pub(crate) const EXIT_NOT_FOUND: u8 = 5;
pub(crate) const EXIT_EXISTS: u8 = 6;
pub(crate) const EXIT_DEADLINE: u8 = 7;
pub(crate) const EXIT_PERMISSION: u8 = 8;
pub(crate) const EXIT_UNAVAILABLE: u8 = 9;

/// Extra time the client waits past the deadline it gives the agent, so that the agent's own
/// `DEADLINE_EXCEEDED` (with its explanation) arrives rather than a bare client timeout.
const REPLY_GRACE: Duration = Duration::from_secs(2);

/// A problem with the command line found after parsing (exit code 4).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct InvalidArgument(pub(crate) String);

/// A non-OK answer from the agent.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", code_name(*.code))]
pub(crate) struct RpcError {
    code: Code,
    message: String,
}

/// The connection broke or the request timed out on our side.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    #[error("no answer within {0:?}")]
    Deadline(Duration),
    #[error("{0}")]
    Transport(String),
}

fn code_name(c: Code) -> String {
    format!("{c:?}")
}

/// The documented exit code for an error, from the first cause that decides it.
pub(crate) fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(k) = cause.downcast_ref::<KataError>() {
            return match k {
                KataError::BadSandboxId(_) => EXIT_INVALID,
                _ => EXIT_UNREACHABLE,
            };
        }
        if cause.downcast_ref::<InvalidArgument>().is_some()
            || cause.downcast_ref::<SpecError>().is_some()
        {
            return EXIT_INVALID;
        }
        if let Some(r) = cause.downcast_ref::<RpcError>() {
            return match r.code {
                Code::INVALID_ARGUMENT | Code::OUT_OF_RANGE => EXIT_INVALID,
                Code::NOT_FOUND => EXIT_NOT_FOUND,
                Code::ALREADY_EXISTS => EXIT_EXISTS,
                Code::DEADLINE_EXCEEDED => EXIT_DEADLINE,
                Code::PERMISSION_DENIED | Code::UNAUTHENTICATED => EXIT_PERMISSION,
                Code::UNAVAILABLE | Code::FAILED_PRECONDITION => EXIT_UNAVAILABLE,
                _ => EXIT_OTHER,
            };
        }
        if let Some(c) = cause.downcast_ref::<CallError>() {
            return match c {
                CallError::Deadline(_) => EXIT_DEADLINE,
                CallError::Transport(_) => EXIT_UNREACHABLE,
            };
        }
    }
    EXIT_OTHER
}

/// The agent's address from `--url` or through the sandbox's Kata shim.
pub(crate) async fn resolve(cli: &Cli, timeout: Duration) -> anyhow::Result<AgentAddress> {
    if let Some(url) = &cli.url {
        return AgentAddress::parse(url).map_err(|e| InvalidArgument(format!("--url: {e}")).into());
    }
    let sandbox = cli
        .sandbox
        .as_deref()
        .ok_or_else(|| InvalidArgument("one of --sandbox or --url is required".into()))?;
    let paths = match &cli.monitor_socket {
        Some(p) => MonitorPaths::socket(p),
        None => MonitorPaths::default(),
    };
    kata::find_agent(sandbox, &paths, cli.port, timeout)
        .await
        .with_context(|| format!("finding sandbox {sandbox}"))
}

/// Runs one request with `timeout` given to the agent and a little more for the answer.
pub(crate) async fn call<T, F, Fut>(timeout: Duration, f: F) -> anyhow::Result<T>
where
    F: FnOnce(ttrpc::context::Context) -> Fut,
    Fut: std::future::Future<Output = ttrpc::Result<T>>,
{
    let ctx = ttrpc::context::with_timeout(timeout.as_nanos() as i64);
    let wait = timeout + REPLY_GRACE;
    match tokio::time::timeout(wait, f(ctx)).await {
        Err(_) => Err(CallError::Deadline(wait).into()),
        Ok(Ok(r)) => Ok(r),
        Ok(Err(ttrpc::Error::RpcStatus(s))) => Err(RpcError {
            code: s.code(),
            message: s.message().to_string(),
        }
        .into()),
        Ok(Err(ttrpc::Error::Others(m))) if m.contains("deadline") || m.contains("timeout") => {
            Err(CallError::Deadline(timeout).into())
        }
        Ok(Err(e)) => Err(CallError::Transport(e.to_string()).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::anyhow;

    #[test]
    fn exit_codes_follow_the_agent_status() {
        for (code, want) in [
            (Code::INVALID_ARGUMENT, EXIT_INVALID),
            (Code::NOT_FOUND, EXIT_NOT_FOUND),
            (Code::ALREADY_EXISTS, EXIT_EXISTS),
            (Code::DEADLINE_EXCEEDED, EXIT_DEADLINE),
            (Code::PERMISSION_DENIED, EXIT_PERMISSION),
            (Code::UNAVAILABLE, EXIT_UNAVAILABLE),
            (Code::FAILED_PRECONDITION, EXIT_UNAVAILABLE),
            (Code::INTERNAL, EXIT_OTHER),
        ] {
            let e = anyhow::Error::from(RpcError {
                code,
                message: "m".into(),
            })
            .context("mount x");
            assert_eq!(exit_code(&e), want, "{code:?}");
        }
        let e = anyhow::Error::from(KataError::NoMonitorSocket {
            sandbox: "x".into(),
            tried: vec![],
            waited: Duration::ZERO,
        });
        assert_eq!(exit_code(&e), EXIT_UNREACHABLE);
        assert_eq!(
            exit_code(&anyhow::Error::from(CallError::Deadline(Duration::ZERO))),
            EXIT_DEADLINE
        );
        assert_eq!(exit_code(&anyhow!("other")), EXIT_OTHER);
    }
}
