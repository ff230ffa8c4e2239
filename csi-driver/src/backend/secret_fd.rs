//! A secret as a file that exists only in memory, for the CLIs the backends run (`ceph`,
//! `smbclient`): a memfd (anonymous shared memory, linked into no file system) holding the
//! secret, which the child inherits under the same descriptor number and opens as
//! `/dev/fd/<n>` or reads directly. Chosen over the alternatives because an argument would
//! show in `/proc/<pid>/cmdline`, an environment variable in `/proc/<pid>/environ`, and a
//! temporary file would be on disk; opening `/dev/fd/<n>` of a memfd always starts at
//! offset 0, so the child may read it more than once.

use std::ffi::CString;
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

pub(crate) struct SecretFd {
    fd: OwnedFd,
}

impl SecretFd {
    /// A memfd named `name` (what `readlink /dev/fd/<n>` shows: `/memfd:<name>`) holding
    /// `contents`, positioned at offset 0 for a child that reads the descriptor itself.
    pub(crate) fn new(name: &str, contents: &[u8]) -> std::io::Result<Self> {
        let name = CString::new(name).map_err(std::io::Error::other)?;
        // Close-on-exec in this process, so no other child started meanwhile inherits it.
        let fd =
            nix::sys::memfd::memfd_create(&name, nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)?;
        // Never one of 0-2: the child's stdio is set up over those before `pre_exec` runs.
        let fd = if fd.as_raw_fd() < 3 {
            let raw = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3))?;
            // SAFETY: `fcntl` just returned this new descriptor, owned by nobody else.
            unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) }
        } else {
            fd
        };
        let mut file = std::fs::File::from(fd);
        file.write_all(contents)?;
        file.seek(SeekFrom::Start(0))?;
        Ok(SecretFd { fd: file.into() })
    }

    /// `/dev/fd/<n>`: the path the child opens.
    pub(crate) fn path(&self) -> String {
        format!("/dev/fd/{}", self.fd.as_raw_fd())
    }

    /// The descriptor number the child inherits.
    pub(crate) fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Clears close-on-exec on the memfd in the child only (after fork, before exec), so
    /// that the child inherits it under the same number and nothing else does. The parent
    /// must keep `self` alive until `spawn` has returned.
    pub(crate) fn inherit_into(&self, cmd: &mut tokio::process::Command) {
        let fd: RawFd = self.fd.as_raw_fd();
        let keep = move || {
            nix::fcntl::fcntl(
                fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
            )
            .map(|_| ())
            .map_err(std::io::Error::from)
        };
        // SAFETY: `keep` runs in the forked child before exec, where only async-signal-safe
        // calls are allowed: it makes one `fcntl` call on a descriptor that the child
        // inherited open (the parent keeps the memfd alive until `spawn` returns), and
        // allocates nothing and takes no lock (an `Errno` becomes an `io::Error` by value).
        unsafe { cmd.pre_exec(keep) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_child_reads_the_secret_by_path_and_by_descriptor_and_nothing_else_inherits_it() {
        let s = SecretFd::new("test-secret", b"s3cr3t").expect("memfd");
        let script = format!(
            "readlink {p}; cat {p}; echo; cat <&{n}",
            p = s.path(),
            n = s.raw()
        );
        // bash: dash takes no descriptor above 9 in a redirection.
        let mut cmd = tokio::process::Command::new("/bin/bash");
        cmd.args(["-c", &script]);
        s.inherit_into(&mut cmd);
        let out = cmd.output().await.expect("sh runs");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "/memfd:test-secret (deleted)\ns3cr3t\ns3cr3t",
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Without inherit_into the descriptor is closed in the child.
        let plain = tokio::process::Command::new("/bin/sh")
            .args(["-c", &format!("cat {}", s.path())])
            .output()
            .await
            .expect("sh runs");
        assert!(!plain.status.success() && plain.stdout.is_empty());
    }
}
