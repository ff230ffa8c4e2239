//! Test-only stand-in for kata-agent as PID 1 of an agent-as-init Kata initrd (upstream
//! kata-agent cannot be built into this project's tests). It reproduces, from Kata's sources
//! (src/agent/src/main.rs, mount.rs, signal.rs; rustjail/src/mount.rs), the behaviours CNFS
//! meets in a real guest:
//! - as PID 1: the early mounts in kata-agent's order and options (proc, sysfs, devtmpfs,
//!   /dev/shm, devpts, a tmpfs on /run), each skipped when /proc/mounts already has that
//!   destination with the same type (`baremount`'s rule), a failure fatal except for /dev;
//!   `/dev/ptmx` replaced by a link to `/dev/pts/ptmx` (fatal if missing); cgroup v2 on
//!   /sys/fs/cgroup when the command line has `cgroup_no_v1=all` or
//!   `systemd.unified_cgroup_hierarchy=1`, else cgroup v1, where a kernel without the v1
//!   memory and cpuset controllers (Debian 6.12) ends with the VM powered off, as observed
//!   with kata-agent 4.1.0; a child subreaper that reaps every child and logs
//!   "child exited unexpectedly" for processes it did not start; no modules loaded (the
//!   runtime's list arrives later over vsock); a listener on vsock port 1024 (kata-agent's).
//!   Exiting as PID 1 is what kata-agent never does: it powers the VM off instead.
//! - `container`: a container's mount namespace set up the way rustjail does it: a new mount
//!   namespace, `/` made `MS_REC|MS_SLAVE` (the default `rootfsPropagation`), the rootfs
//!   bound onto itself, each bind mount's source canonicalized in that namespace, bound with
//!   `MS_BIND|MS_REC`, remounted for `ro`/`nosuid`/`nodev`, its propagation option applied,
//!   then `MS_MOVE` of the rootfs onto `/` and `chroot` (an initrd has no pivot_root).
//!
//! - as a systemd service (systemd images: `kata-agent.service`, no arguments): the same minus
//!   the early mounts and cgroups, which systemd has done.
//!
//! Test-only additions, not kata-agent's: the network comes from the kernel command line
//! (`cnfs.ip=`; the runtime would send it over ttrpc) and `/usr/bin/cnfs-test-exec` is started
//! so the host can look inside the guest.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::mount::{mount, MsFlags};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{chdir, chroot, execvp, Pid};

fn log(msg: &str) {
    eprintln!("{{\"msg\":\"{msg}\",\"level\":\"INFO\",\"name\":\"kata-agent\",\"source\":\"agent\",\"subsystem\":\"standin\",\"pid\":\"{}\"}}", std::process::id());
}

fn fatal(msg: &str) -> ! {
    log(&format!("FATAL: {msg}"));
    // kata-agent as PID 1 syncs and powers off rather than exiting.
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    std::process::exit(1)
}

/// kata-agent's `baremount` skip rule: the first /proc/mounts entry for `target`.
fn mounted_as(target: &str) -> Option<String> {
    let text = std::fs::read_to_string("/proc/mounts").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, mp, ty) = (f.next()?, f.next()?, f.next()?);
        (mp == target).then(|| ty.to_string())
    })
}

fn general_mount() {
    let nosuid = MsFlags::MS_NOSUID;
    let mounts: [(&str, &str, &str, MsFlags); 6] = [
        (
            "proc",
            "proc",
            "/proc",
            nosuid | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        ),
        (
            "sysfs",
            "sysfs",
            "/sys",
            nosuid | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        ),
        ("devtmpfs", "dev", "/dev", nosuid),
        ("tmpfs", "tmpfs", "/dev/shm", nosuid | MsFlags::MS_NODEV),
        ("devpts", "devpts", "/dev/pts", nosuid | MsFlags::MS_NOEXEC),
        ("tmpfs", "tmpfs", "/run", nosuid | MsFlags::MS_NODEV),
    ];
    for (ty, src, target, flags) in mounts {
        if mounted_as(target).as_deref() == Some(ty) {
            log(&format!("{target} already mounted"));
            continue;
        }
        let _ = std::fs::create_dir_all(target);
        if let Err(e) = mount(Some(src), target, Some(ty), flags, None::<&str>) {
            if target != "/dev" {
                fatal(&format!("mounting {target}: {e}"));
            }
        }
    }
    if std::fs::remove_file("/dev/ptmx").is_err()
        || std::os::unix::fs::symlink("/dev/pts/ptmx", "/dev/ptmx").is_err()
    {
        fatal("replacing /dev/ptmx");
    }
}

fn cmdline() -> String {
    std::fs::read_to_string("/proc/cmdline").unwrap_or_default()
}

fn arg(name: &str) -> Option<String> {
    cmdline().split_whitespace().find_map(|a| {
        a.strip_prefix(name)
            .and_then(|r| r.strip_prefix('='))
            .map(str::to_string)
    })
}

fn cgroups() {
    let v2 = arg("cgroup_no_v1").as_deref() == Some("all")
        || arg("systemd.unified_cgroup_hierarchy").as_deref() == Some("1");
    let _ = std::fs::create_dir_all("/sys/fs/cgroup");
    if v2 {
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        if let Err(e) = mount(
            Some("cgroup2"),
            "/sys/fs/cgroup",
            Some("cgroup2"),
            flags,
            Some("nsdelegate"),
        ) {
            fatal(&format!("mounting cgroup2: {e}"));
        }
        log("cgroup v2 mounted");
        return;
    }
    let table = std::fs::read_to_string("/proc/cgroups").unwrap_or_default();
    let enabled = |c: &str| {
        table.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.first() == Some(&c) && f.get(3) == Some(&"1")
        })
    };
    if !(enabled("memory") && enabled("cpuset")) {
        log("cgroup v1 without the memory and cpuset controllers: powering off");
        std::thread::sleep(Duration::from_secs(2));
        fatal("no usable cgroup v1 hierarchy (set cgroup_no_v1=all)");
    }
}

fn network() {
    let sh = |c: &str| {
        let _ = std::process::Command::new("/bin/busybox")
            .args(["sh", "-c", c])
            .status();
    };
    sh("ip link set lo up");
    if let Some(ip) = arg("cnfs.ip") {
        sh(&format!("ip addr add {ip} dev eth0 && ip link set eth0 up"));
    }
    let mut hosts = String::from("127.0.0.1 localhost\n");
    for h in arg("cnfs.hosts")
        .unwrap_or_default()
        .split(',')
        .filter(|h| !h.is_empty())
    {
        if let Some((name, ip)) = h.split_once('/') {
            hosts.push_str(&format!("{ip} {name}\n"));
        }
    }
    let _ = std::fs::write("/etc/hosts", hosts);
}

fn as_pid1() -> ! {
    general_mount();
    cgroups();
    let _ = nix::unistd::setsid();
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "localhost".into());
    let _ = nix::unistd::sethostname(host.trim());
    serve()
}

/// The part shared with the systemd image (`kata-agent.service`, not PID 1): subreaper,
/// network, the exec helper, port 1024, reaping.
fn serve() -> ! {
    let _ = nix::sys::prctl::set_child_subreaper(true);
    network();
    let mut ours = Vec::new();
    if let Ok(c) = std::process::Command::new("/usr/bin/cnfs-test-exec").spawn() {
        ours.push(Pid::from_raw(c.id() as i32));
    }
    // kata-agent's ttrpc port: bound and held (connections are accepted and dropped).
    std::thread::spawn(|| {
        use nix::sys::socket::{
            accept, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
        };
        use std::os::fd::AsRawFd;
        let listening = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )
        .and_then(|fd| {
            bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, 1024))?;
            listen(&fd, Backlog::new(16)?)?;
            Ok(fd)
        });
        let Ok(fd) = listening else {
            log("vsock port 1024 not available");
            return;
        };
        log("listening on vsock port 1024");
        loop {
            if let Ok(c) = accept(fd.as_raw_fd()) {
                let _ = nix::unistd::close(c);
            }
        }
    });
    log("kata-agent stand-in ready");
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::__WALL)) {
            Ok(WaitStatus::Exited(pid, _)) | Ok(WaitStatus::Signaled(pid, _, _)) => {
                if !ours.contains(&pid) {
                    log(&format!("child exited unexpectedly (pid {pid})"));
                }
            }
            Ok(_) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

struct Bind {
    source: String,
    dest: String,
    options: Vec<String>,
}

/// `SRC:DEST:opt,opt` (options as in an OCI mount: bind/rbind, ro, nosuid, nodev, and a
/// propagation: rslave, rprivate, ...).
fn parse_bind(s: &str) -> Option<Bind> {
    let mut p = s.splitn(3, ':');
    Some(Bind {
        source: p.next()?.to_string(),
        dest: p.next()?.to_string(),
        options: p
            .next()
            .unwrap_or("rbind")
            .split(',')
            .map(str::to_string)
            .collect(),
    })
}

/// rustjail's `init_rootfs` for an initrd guest, then exec.
fn container(rootfs: &Path, binds: &[Bind], cmd: &[String]) -> Result<(), String> {
    fn e(what: &'static str) -> impl Fn(nix::errno::Errno) -> String {
        move |err| format!("{what}: {err}")
    }
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(e("unshare"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(e("making / rslave"))?;
    let rootfs = std::fs::canonicalize(rootfs).map_err(|err| format!("rootfs: {err}"))?;
    mount(
        Some(&rootfs),
        &rootfs,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(e("binding the rootfs"))?;
    for b in binds {
        let mut flags = MsFlags::empty();
        let mut pg = MsFlags::empty();
        for o in &b.options {
            match o.as_str() {
                "bind" => flags |= MsFlags::MS_BIND,
                "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
                "ro" => flags |= MsFlags::MS_RDONLY,
                "nosuid" => flags |= MsFlags::MS_NOSUID,
                "nodev" => flags |= MsFlags::MS_NODEV,
                "rslave" => pg |= MsFlags::MS_SLAVE | MsFlags::MS_REC,
                "slave" => pg |= MsFlags::MS_SLAVE,
                "rprivate" => pg |= MsFlags::MS_PRIVATE | MsFlags::MS_REC,
                "private" => pg |= MsFlags::MS_PRIVATE,
                "rshared" => pg |= MsFlags::MS_SHARED | MsFlags::MS_REC,
                _ => {}
            }
        }
        // The source is canonicalized in this namespace (`fs::canonicalize` in mount_from).
        let src = std::fs::canonicalize(&b.source)
            .map_err(|err| format!("canonicalize {}: {err}", b.source))?;
        let dest: PathBuf = rootfs.join(b.dest.trim_start_matches('/'));
        std::fs::create_dir_all(&dest)
            .map_err(|err| format!("creating {}: {err}", dest.display()))?;
        mount(Some(&src), &dest, Some("bind"), flags, None::<&str>).map_err(e("bind mount"))?;
        let extra = flags - (MsFlags::MS_BIND | MsFlags::MS_REC);
        if !extra.is_empty() {
            mount(
                Some(&dest),
                &dest,
                None::<&str>,
                flags | MsFlags::MS_REMOUNT,
                None::<&str>,
            )
            .map_err(e("remount"))?;
        }
        if !pg.is_empty() {
            mount(None::<&str>, &dest, None::<&str>, pg, None::<&str>).map_err(e("propagation"))?;
        }
    }
    // ms_move_root: the rootfs onto / and chroot (an initramfs root cannot be pivoted).
    chdir(&rootfs).map_err(e("chdir"))?;
    mount(
        Some(&rootfs),
        "/",
        None::<&str>,
        MsFlags::MS_MOVE,
        None::<&str>,
    )
    .map_err(e("MS_MOVE"))?;
    chroot(".").map_err(e("chroot"))?;
    chdir("/").map_err(e("chdir /"))?;
    let argv: Vec<CString> = cmd
        .iter()
        .map(|a| CString::new(a.as_str()).map_err(|_| "NUL in command".to_string()))
        .collect::<Result<_, _>>()?;
    let prog = argv.first().ok_or("no command")?;
    execvp(prog, &argv).map_err(e("exec"))?;
    Ok(())
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if std::process::id() == 1 {
        as_pid1();
    }
    // As systemd images run it: `kata-agent.service`, `ExecStart=/usr/bin/kata-agent`.
    if argv.len() == 1 {
        log("kata-agent stand-in started by systemd");
        serve();
    }
    // kata-agent-standin container --rootfs DIR [--bind SRC:DEST:opts]... -- CMD...
    if argv.get(1).map(String::as_str) == Some("container") {
        let mut rootfs = None;
        let mut binds = Vec::new();
        let mut i = 2;
        while i < argv.len() && argv[i] != "--" {
            match (argv[i].as_str(), argv.get(i + 1)) {
                ("--rootfs", Some(v)) => rootfs = Some(PathBuf::from(v)),
                ("--bind", Some(v)) => match parse_bind(v) {
                    Some(b) => binds.push(b),
                    None => {
                        eprintln!("bad --bind {v}");
                        std::process::exit(2);
                    }
                },
                (a, _) => {
                    eprintln!("unknown argument {a}");
                    std::process::exit(2);
                }
            }
            i += 2;
        }
        let cmd: Vec<String> = argv.iter().skip(i + 1).cloned().collect();
        let Some(rootfs) = rootfs else {
            eprintln!("--rootfs is required");
            std::process::exit(2);
        };
        if let Err(e) = container(&rootfs, &binds, &cmd) {
            eprintln!("container: {e}");
            std::process::exit(1);
        }
    }
    eprintln!("usage: kata-agent-standin (as PID 1) | container --rootfs DIR [--bind SRC:DEST:opts]... -- CMD...");
    std::process::exit(2);
}
