//! A system call allowlist for the agent, installed on every thread after start-up (and
//! inherited by the children it forks for mounts). What the agent does is small: serve ttrpc
//! on sockets, read /proc and /sys, load modules, fork children that mount, unmount or statfs.
//! Anything else (exec, ptrace, namespaces, keyrings, BPF, ...) is refused with EPERM, so a
//! bug in the agent cannot be turned into those. Built with rust-vmm's `seccompiler` (pure
//! Rust, what Firecracker and Cloud Hypervisor use).

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

/// The calls the agent makes, grouped by what needs them.
const ALLOWED: &[(&str, &[libc::c_long])] = &[
    (
        "files and /proc, /sys",
        &[
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_readv,
            libc::SYS_writev,
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_open,
            libc::SYS_openat,
            libc::SYS_close,
            libc::SYS_close_range,
            libc::SYS_stat,
            libc::SYS_lstat,
            libc::SYS_fstat,
            libc::SYS_newfstatat,
            libc::SYS_statx,
            libc::SYS_lseek,
            libc::SYS_getdents64,
            libc::SYS_fcntl,
            libc::SYS_ioctl,
            libc::SYS_dup,
            libc::SYS_dup2,
            libc::SYS_dup3,
            libc::SYS_pipe2,
            libc::SYS_readlink,
            libc::SYS_readlinkat,
            libc::SYS_access,
            libc::SYS_faccessat,
            libc::SYS_faccessat2,
            libc::SYS_mkdir,
            libc::SYS_mkdirat,
            libc::SYS_rmdir,
            libc::SYS_unlink,
            libc::SYS_unlinkat,
            libc::SYS_rename,
            libc::SYS_renameat,
            libc::SYS_renameat2,
            libc::SYS_chmod,
            libc::SYS_fchmod,
            libc::SYS_fchmodat,
            libc::SYS_ftruncate,
            libc::SYS_fsync,
            libc::SYS_fdatasync,
            libc::SYS_umask,
            libc::SYS_getcwd,
            libc::SYS_uname,
        ],
    ),
    (
        "memory, threads, time, signals (the async runtime)",
        &[
            libc::SYS_mmap,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_mprotect,
            libc::SYS_madvise,
            libc::SYS_brk,
            libc::SYS_futex,
            libc::SYS_set_robust_list,
            libc::SYS_set_tid_address,
            libc::SYS_rseq,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_sched_yield,
            libc::SYS_sched_getaffinity,
            libc::SYS_getrandom,
            libc::SYS_clock_gettime,
            libc::SYS_clock_getres,
            libc::SYS_gettimeofday,
            libc::SYS_nanosleep,
            libc::SYS_clock_nanosleep,
            libc::SYS_epoll_create1,
            libc::SYS_epoll_ctl,
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_eventfd2,
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_rt_sigaction,
            libc::SYS_rt_sigprocmask,
            libc::SYS_rt_sigreturn,
            libc::SYS_sigaltstack,
            libc::SYS_exit,
            libc::SYS_exit_group,
            libc::SYS_getpid,
            libc::SYS_getppid,
            libc::SYS_gettid,
            libc::SYS_getuid,
            libc::SYS_geteuid,
            libc::SYS_getgid,
            libc::SYS_getegid,
            libc::SYS_prctl,
            libc::SYS_prlimit64,
            libc::SYS_getrlimit,
            libc::SYS_capget,
            libc::SYS_capset,
            libc::SYS_arch_prctl,
        ],
    ),
    (
        "sockets: ttrpc on vsock and unix, name resolution, the route to a server",
        &[
            libc::SYS_socket,
            libc::SYS_socketpair,
            libc::SYS_bind,
            libc::SYS_listen,
            libc::SYS_accept,
            libc::SYS_accept4,
            libc::SYS_connect,
            libc::SYS_getsockname,
            libc::SYS_getpeername,
            libc::SYS_setsockopt,
            libc::SYS_getsockopt,
            libc::SYS_shutdown,
            libc::SYS_sendto,
            libc::SYS_recvfrom,
            libc::SYS_sendmsg,
            libc::SYS_recvmsg,
            libc::SYS_sendmmsg,
            libc::SYS_recvmmsg,
        ],
    ),
    (
        "reading a CephFS directory's quota (a grow=quota luks2 volume's size)",
        &[libc::SYS_getxattr],
    ),
    (
        "publishing a formatted container under its final name (fails if the name exists)",
        &[libc::SYS_link, libc::SYS_linkat],
    ),
    (
        "giving a new encrypted tree to the volume's owner (gocryptfs)",
        &[
            libc::SYS_chown,
            libc::SYS_fchownat,
            libc::SYS_lchown,
            libc::SYS_fchown,
        ],
    ),
    (
        "the agent's work: mount children, modules",
        &[
            libc::SYS_fork,
            libc::SYS_pidfd_open,
            libc::SYS_wait4,
            libc::SYS_waitid,
            libc::SYS_kill,
            libc::SYS_tgkill,
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_statfs,
            libc::SYS_fstatfs,
            libc::SYS_finit_module,
            libc::SYS_init_module,
        ],
    ),
];

/// The compiled filter: every listed call allowed, anything else EPERM.
pub fn program() -> Result<BpfProgram, seccompiler::Error> {
    let rules: BTreeMap<i64, Vec<SeccompRule>> = ALLOWED
        .iter()
        .flat_map(|(_, calls)| calls.iter())
        .map(|&nr| (nr, Vec::new()))
        .collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?;
    Ok(filter.try_into()?)
}

/// Installs the filter on every thread of the process (and so on every child forked later).
pub fn install() -> Result<usize, seccompiler::Error> {
    let prog = program()?;
    seccompiler::apply_filter_all_threads(&prog)?;
    Ok(ALLOWED.iter().map(|(_, c)| c.len()).sum())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::killable::{self, Outcome};
    use std::time::Duration;

    #[tokio::test]
    async fn a_call_outside_the_list_is_refused_and_listed_ones_work() {
        let prog = program().expect("compiles");
        // Everything the child uses is made here: the child must not allocate.
        let dir = tempfile::tempdir().expect("temp dir");
        let temp = dir.path().join(".cnfs-volume.luks2.new-0123456789abcdef");
        let published = dir.path().join("cnfs-volume.luks2");
        std::fs::write(&temp, b"container").expect("temp file");
        let cstr = |p: &std::path::Path| {
            std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("no NUL")
        };
        let (from, to) = (cstr(&temp), cstr(&published));
        let shell = c"/bin/sh";
        let outcome = killable::run(Duration::from_secs(5), move || {
            // In a forked child, so the test process keeps no filter.
            seccompiler::apply_filter(&prog).map_err(|_| nix::errno::Errno::EINVAL)?;
            // The errno of each call, 0 when it succeeded.
            let errno = |r: nix::Result<()>| r.err().map_or(0, |e| e as i32 as u64);
            let traceme = errno(nix::sys::ptrace::traceme());
            // unshare with no flags is a no-op when allowed.
            let unshare = errno(nix::sched::unshare(nix::sched::CloneFlags::empty()));
            let pid = nix::unistd::getpid().as_raw();
            // Were it allowed, the child would become `sh -c 'exit 0'` and never answer.
            // Pointer arrays on the stack: nix's execve would allocate them.
            let argv = [
                shell.as_ptr(),
                c"-c".as_ptr(),
                c"exit 0".as_ptr(),
                std::ptr::null(),
            ];
            let envp = [std::ptr::null::<libc::c_char>()];
            // SAFETY: NUL-terminated strings that live for the whole program and
            // null-terminated pointer arrays on this stack frame; execve only reads them.
            let rc = unsafe { libc::execve(shell.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
            let execve = errno(nix::errno::Errno::result(rc).map(drop));
            let linkat = errno(nix::unistd::linkat(
                None,
                from.as_c_str(),
                None,
                to.as_c_str(),
                nix::fcntl::AtFlags::empty(),
            ));
            Ok([traceme, unshare, u64::from(pid > 0), execve, linkat, 0])
        })
        .await;
        let Outcome::Done([trace_errno, unshare_errno, pid_ok, execve_errno, linkat_errno, _]) =
            outcome
        else {
            panic!("child failed: {outcome:?}");
        };
        assert_eq!(trace_errno as i32, libc::EPERM, "ptrace was not refused");
        assert_eq!(unshare_errno as i32, libc::EPERM, "unshare was not refused");
        assert_eq!(execve_errno as i32, libc::EPERM, "execve was not refused");
        assert_eq!(pid_ok, 1, "an allowed call failed");
        assert_eq!(linkat_errno, 0, "linkat failed: errno {linkat_errno}");
        assert_eq!(
            std::fs::read(&published).expect("published under its final name"),
            b"container"
        );
    }
}
