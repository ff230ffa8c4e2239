//! `cnfs-agent` as `/init` of an agent-as-init Kata initrd (the overlay mode of
//! cnfs-rootfs-builder). kata-agent must keep PID 1, so this:
//! 1. loads the boot modules the guest needs before its real init runs (with Debian's kernel
//!    the vsock and virtio-net drivers are modules, and kata-agent as PID 1 loads nothing
//!    before it listens on vsock);
//! 2. forks a supervisor that waits for the real init to mount /proc and /run, then runs
//!    cnfs-agent and restarts it when it dies (with backoff; each restart logged), since
//!    nothing else in such a guest would;
//! 3. `exec`s the real init as PID 1: `then=` if given, else the first of the standard places
//!    (osbuilder's AGENT_INIT=yes images have kata-agent at `/sbin/init`, `/init` linking to
//!    it). If none can be started it says, in one console line, what was tried and why each
//!    failed, before PID 1 exits (and the kernel panics).
//!
//! `/etc/cnfs/init.conf`, one `key=value` per line: `then=/sbin/init` (optional), `args=` (the
//! agent's arguments), `modules=` (boot modules, in load order; optional).

use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{execv, fork, ForkResult};

pub const CONFIG: &str = "/etc/cnfs/init.conf";
const AGENT: &str = "/usr/bin/cnfs-agent";
/// Where a guest's real init may be, in the order tried when `then=` is not given or fails:
/// osbuilder's agent-as-init layout first, then a systemd image's.
pub const STANDARD_INITS: &[&str] = &[
    "/sbin/init",
    "/usr/bin/kata-agent",
    "/usr/sbin/init",
    "/lib/systemd/systemd",
    "/usr/lib/systemd/systemd",
];
/// Restart backoff for the agent: doubles from the first to the last, and starts over once
/// the agent has run for `STABLE`.
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const STABLE: Duration = Duration::from_secs(60);

/// True when this process was started as an init (`/init`, `init`).
pub fn invoked_as_init(argv0: &str) -> bool {
    Path::new(argv0).file_name().is_some_and(|n| n == "init")
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct InitConfig {
    pub then: Option<String>,
    pub args: Vec<String>,
    pub modules: Vec<String>,
}

pub fn parse_config(text: &str) -> Result<InitConfig, String> {
    let mut c = InitConfig::default();
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        match line.split_once('=') {
            Some(("then", v)) => {
                let v = v.trim();
                if !v.starts_with('/') {
                    return Err(format!("{CONFIG}: then= must be an absolute path"));
                }
                c.then = Some(v.to_string());
            }
            Some(("args", v)) => c.args = v.split_whitespace().map(str::to_string).collect(),
            Some(("modules", v)) => c.modules = v.split_whitespace().map(str::to_string).collect(),
            _ => return Err(format!("{CONFIG}: unknown line {line:?}")),
        }
    }
    Ok(c)
}

/// The programs to try as the real init, in order: `then=`, then the standard places,
/// without duplicates and without this program itself (`/init` may be a copy of us, and in
/// a systemd image `/sbin/init` a link to systemd).
pub fn candidates(then: Option<&str>, is_self: impl Fn(&str) -> bool) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for c in then.into_iter().chain(STANDARD_INITS.iter().copied()) {
        if !out.iter().any(|o| o == c) && !is_self(c) {
            out.push(c.to_string());
        }
    }
    out
}

fn console(msg: &str) {
    eprintln!("cnfs-init: {msg}");
}

fn cstrings(items: impl IntoIterator<Item = String>) -> Result<Vec<CString>, String> {
    items
        .into_iter()
        .map(|s| CString::new(s).map_err(|_| "NUL byte in init arguments".to_string()))
        .collect()
}

/// Never returns on success: this process becomes the real init.
pub fn run(argv: Vec<String>) -> Result<(), String> {
    // A broken or missing config must not stop the guest from booting: say so, go on.
    let cfg = match std::fs::read_to_string(CONFIG)
        .map_err(|e| format!("{CONFIG}: {e}"))
        .and_then(|t| parse_config(&t))
    {
        Ok(c) => c,
        Err(e) => {
            console(&format!(
                "{e}; starting the guest's init without cnfs-agent"
            ));
            exec_real_init(None, &argv);
        }
    };
    load_boot_modules(&cfg.modules);
    let agent_argv = cstrings(std::iter::once(AGENT.to_string()).chain(cfg.args.clone()))?;
    // SAFETY: single-threaded at this point (called before any runtime starts).
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            supervise(&agent_argv);
            std::process::exit(0);
        }
        Ok(ForkResult::Parent { .. }) => {}
        // The guest must boot its real init even without cnfs-agent.
        Err(e) => console(&format!(
            "fork: {e}; starting the guest's init without cnfs-agent"
        )),
    }
    exec_real_init(cfg.then.as_deref(), &argv)
}

/// Tries every candidate; returns only when none could be started, after one console line
/// that says what was tried and why each failed.
fn exec_real_init(then: Option<&str>, argv: &[String]) -> ! {
    let me = argv.first().and_then(|a| std::fs::metadata(a).ok());
    let is_self = |c: &str| match (&me, std::fs::metadata(c)) {
        (Some(m), Ok(c)) => m.dev() == c.dev() && m.ino() == c.ino(),
        _ => false,
    };
    let mut tried = Vec::new();
    for c in candidates(then, is_self) {
        let mut args = vec![c.clone()];
        args.extend(argv.iter().skip(1).cloned());
        match cstrings(args) {
            Ok(a) => {
                let e = execv(&a[0], &a).err();
                let why = e.map(|e| e.desc()).unwrap_or("?");
                console(&format!("exec {c}: {why}; trying the next place"));
                tried.push(format!("{c} ({why})"));
            }
            Err(e) => tried.push(format!("{c} ({e})")),
        }
    }
    console(&format!(
        "FATAL: could not start the guest's init; tried {}. Set then= in {CONFIG} to the \
         guest's real init (osbuilder's agent-as-init images: /sbin/init)",
        tried.join(", ")
    ));
    std::process::exit(127)
}

/// Loads the boot modules with /proc and /sys mounted (the loader checks /sys/module; the
/// real init finds them mounted with the same types and leaves them).
fn load_boot_modules(modules: &[String]) {
    if modules.is_empty() {
        return;
    }
    for (fs, target) in [("proc", "/proc"), ("sysfs", "/sys")] {
        let mounted = std::fs::read_to_string("/proc/self/mountinfo")
            .map(|t| {
                crate::mountinfo::parse(&t)
                    .iter()
                    .any(|e| e.mount_point == Path::new(target))
            })
            .unwrap_or(false);
        if !mounted {
            let _ = std::fs::create_dir_all(target);
            let flags = nix::mount::MsFlags::MS_NOSUID
                | nix::mount::MsFlags::MS_NODEV
                | nix::mount::MsFlags::MS_NOEXEC;
            if let Err(e) = nix::mount::mount(Some(fs), target, Some(fs), flags, None::<&str>) {
                console(&format!("mounting {target}: {e}"));
            }
        }
    }
    let dir = crate::kmod::default_dir();
    let start = Instant::now();
    let mut failed = Vec::new();
    for m in modules {
        if let Err(e) = crate::kmod::ensure(&dir, m) {
            failed.push(format!("{m}: {e}"));
        }
    }
    if failed.is_empty() {
        console(&format!(
            "loaded boot modules {} in {:?}",
            modules.join(" "),
            start.elapsed()
        ));
    } else {
        console(&format!("boot modules not loaded: {}", failed.join("; ")));
    }
}

/// Runs the agent and restarts it whenever it ends, with backoff, logging each restart in
/// kata-agent's JSON shape.
fn supervise(agent_argv: &[CString]) {
    wait_for_base_mounts(Duration::from_secs(120));
    let mut backoff = BACKOFF_FIRST;
    let mut restarts: u64 = 0;
    loop {
        let started = Instant::now();
        // SAFETY: the supervisor is single-threaded.
        let child = match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                let _ = execv(&agent_argv[0], agent_argv);
                std::process::exit(127);
            }
            Ok(ForkResult::Parent { child }) => Some(child),
            Err(_) => None,
        };
        let status = match child {
            Some(pid) => loop {
                match waitpid(pid, None) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    Ok(WaitStatus::StillAlive) => continue,
                    other => break other,
                }
            },
            None => Err(nix::errno::Errno::EAGAIN),
        };
        if started.elapsed() >= STABLE {
            backoff = BACKOFF_FIRST;
        }
        restarts += 1;
        let how = match status {
            Ok(WaitStatus::Exited(_, code)) => format!("exited with status {code}"),
            Ok(WaitStatus::Signaled(_, sig, _)) => format!("was killed by {sig}"),
            Ok(other) => format!("ended ({other:?})"),
            Err(e) => format!("could not be started ({e})"),
        };
        eprintln!(
            "{{\"msg\":\"cnfs-agent {how}; restarting\",\"level\":\"WARN\",\"name\":\"cnfs-agent\",\
             \"source\":\"agent\",\"subsystem\":\"supervisor\",\"pid\":\"{}\",\
             \"version\":\"{}\",\"restarts\":{restarts},\"backoff_ms\":{}}}",
            std::process::id(),
            env!("CARGO_PKG_VERSION"),
            backoff.as_millis()
        );
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// The agent needs /proc (mountinfo) and the /run tmpfs the real init mounts; starting
/// before /run is mounted would hide its socket and volumes under that tmpfs.
fn wait_for_base_mounts(limit: Duration) {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") {
            let entries = crate::mountinfo::parse(&text);
            if entries.iter().any(|e| e.mount_point == Path::new("/run")) {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_config_names_the_real_init_agent_args_and_boot_modules() {
        let c = parse_config(
            "# overlay\nthen=/sbin/init\nargs=--vsock-port 17230\nmodules=virtio_net vsock\n",
        )
        .expect("valid");
        assert_eq!(c.then.as_deref(), Some("/sbin/init"));
        assert_eq!(c.args, vec!["--vsock-port", "17230"]);
        assert_eq!(c.modules, vec!["virtio_net", "vsock"]);
        // then= may be left out: the standard places are tried.
        assert_eq!(parse_config("args=x").expect("valid").then, None);
        assert!(parse_config("then=relative").is_err());
        assert!(parse_config("then=/x\nbogus=1").is_err());
        assert!(invoked_as_init("/init") && invoked_as_init("init"));
        assert!(!invoked_as_init("/usr/bin/cnfs-agent"));
    }

    #[test]
    fn candidates_put_then_first_and_skip_this_program() {
        let c = candidates(Some("/usr/bin/kata-agent"), |p| p == "/sbin/init");
        assert_eq!(
            c,
            [
                "/usr/bin/kata-agent",
                "/usr/sbin/init",
                "/lib/systemd/systemd",
                "/usr/lib/systemd/systemd"
            ]
        );
        assert_eq!(candidates(None, |_| false)[0], "/sbin/init");
    }
}
