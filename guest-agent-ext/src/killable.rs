//! Runs one blocking system call (mount, umount2, statfs) in a forked child process with a
//! deadline. A hung NFS or Ceph server can leave a call asleep in the kernel for minutes;
//! in a child, the caller stops waiting at the deadline and SIGKILL ends the call (the
//! network file systems wait killably), so no thread of the agent is ever stuck and no late
//! success can appear after the caller was told "timed out".

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::{fork, pipe, ForkResult, Pid};
use tokio::io::AsyncReadExt;

/// What a call may hand back: a few integers (statfs figures), nothing that allocates.
pub type Payload = [u64; 6];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done(Payload),
    Failed(Errno),
    TimedOut,
}

const MSG_LEN: usize = 1 + 4 + 8 * 6;

/// Runs `op` in a child and waits at most `timeout` for its answer.
///
/// `op` runs after `fork()` in a multi-threaded process, so it must only make system calls:
/// no allocation, no locks, no logging. Prepare every `CString` before calling.
pub async fn run<F>(timeout: Duration, op: F) -> Outcome
where
    F: FnOnce() -> Result<Payload, Errno>,
{
    let (rx, tx) = match pipe() {
        Ok(p) => p,
        Err(e) => return Outcome::Failed(e),
    };
    // SAFETY: the child only calls `op` (system calls only, per the contract above),
    // write(2) and _exit(2), all async-signal-safe.
    let child = match unsafe { fork() } {
        Err(e) => return Outcome::Failed(e),
        Ok(ForkResult::Child) => {
            drop(rx);
            let mut msg = [0u8; MSG_LEN];
            match op() {
                Ok(p) => {
                    for (i, v) in p.iter().enumerate() {
                        msg[5 + i * 8..13 + i * 8].copy_from_slice(&v.to_le_bytes());
                    }
                }
                Err(e) => {
                    msg[0] = 1;
                    msg[1..5].copy_from_slice(&(e as i32).to_le_bytes());
                }
            }
            // SAFETY: plain write(2) of a stack buffer and _exit(2).
            unsafe {
                libc::write(tx.as_raw_fd(), msg.as_ptr().cast(), MSG_LEN);
                libc::_exit(0)
            }
        }
        Ok(ForkResult::Parent { child }) => child,
    };
    drop(tx);
    let outcome = match tokio::time::timeout(timeout, read_answer(rx)).await {
        Ok(Some(msg)) => decode(&msg),
        // The child died without answering (killed from outside).
        Ok(None) => Outcome::Failed(Errno::EINTR),
        Err(_) => {
            let _ = kill(child, Signal::SIGKILL);
            Outcome::TimedOut
        }
    };
    reap(child).await;
    outcome
}

async fn read_answer(rx: OwnedFd) -> Option<[u8; MSG_LEN]> {
    let mut pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(rx).ok()?;
    let mut msg = [0u8; MSG_LEN];
    pipe.read_exact(&mut msg).await.ok()?;
    Some(msg)
}

fn decode(msg: &[u8; MSG_LEN]) -> Outcome {
    if msg[0] == 1 {
        let mut e = [0u8; 4];
        e.copy_from_slice(&msg[1..5]);
        return Outcome::Failed(Errno::from_raw(i32::from_le_bytes(e)));
    }
    let mut p = [0u64; 6];
    for (i, v) in p.iter_mut().enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(&msg[5 + i * 8..13 + i * 8]);
        *v = u64::from_le_bytes(b);
    }
    Outcome::Done(p)
}

/// Collects the child's exit status off the async workers. A child killed while asleep in
/// the kernel exits as soon as the kernel lets it; waiting for that is bounded here and the
/// rest is left to the blocking task.
async fn reap(child: Pid) {
    let waiter = tokio::task::spawn_blocking(move || waitpid(child, None));
    let _ = tokio::time::timeout(Duration::from_secs(2), waiter).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[tokio::test]
    async fn returns_payload_and_errno() {
        assert_eq!(
            run(Duration::from_secs(5), || Ok([1, 2, 3, 4, 5, u64::MAX])).await,
            Outcome::Done([1, 2, 3, 4, 5, u64::MAX])
        );
        assert_eq!(
            run(Duration::from_secs(5), || Err(Errno::EACCES)).await,
            Outcome::Failed(Errno::EACCES)
        );
    }

    #[tokio::test]
    async fn a_call_that_never_returns_is_killed_at_the_deadline() {
        let start = Instant::now();
        let outcome = run(Duration::from_millis(300), || {
            // SAFETY: pause(2) is a plain system call.
            unsafe { libc::pause() };
            Ok([0; 6])
        })
        .await;
        assert_eq!(outcome, Outcome::TimedOut);
        assert!(start.elapsed() < Duration::from_secs(3));
    }
}
