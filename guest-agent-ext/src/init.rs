//! `cnfs-agent` as `/init` of an agent-as-init Kata initrd (the overlay mode of
//! cnfs-rootfs-builder): kata-agent must keep PID 1, so this forks, `exec`s the original init
//! in the parent (PID 1) and, in the child, waits for that init to mount /proc and /run
//! before `exec`ing the real agent service. `/etc/cnfs/init.conf` says what to run:
//! `then=/usr/bin/kata-agent` and `args=--vsock-port 17230`.

use std::ffi::CString;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::unistd::{execv, fork, ForkResult};

pub const CONFIG: &str = "/etc/cnfs/init.conf";
const AGENT: &str = "/usr/bin/cnfs-agent";

/// True when this process was started as an init (`/init`, `init`).
pub fn invoked_as_init(argv0: &str) -> bool {
    Path::new(argv0).file_name().is_some_and(|n| n == "init")
}

pub struct InitConfig {
    pub then: String,
    pub args: Vec<String>,
}

pub fn parse_config(text: &str) -> Result<InitConfig, String> {
    let mut then = None;
    let mut args = Vec::new();
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        match line.split_once('=') {
            Some(("then", v)) => then = Some(v.trim().to_string()),
            Some(("args", v)) => args = v.split_whitespace().map(str::to_string).collect(),
            _ => return Err(format!("{CONFIG}: unknown line {line:?}")),
        }
    }
    let then = then.ok_or_else(|| format!("{CONFIG}: no then= line"))?;
    if !then.starts_with('/') {
        return Err(format!("{CONFIG}: then= must be an absolute path"));
    }
    Ok(InitConfig { then, args })
}

fn cstrings(items: impl IntoIterator<Item = String>) -> Result<Vec<CString>, String> {
    items
        .into_iter()
        .map(|s| CString::new(s).map_err(|_| "NUL byte in init arguments".to_string()))
        .collect()
}

/// Never returns on success: the parent becomes the original init.
pub fn run(argv: Vec<String>) -> Result<(), String> {
    let text = std::fs::read_to_string(CONFIG).map_err(|e| format!("{CONFIG}: {e}"))?;
    let cfg = parse_config(&text)?;
    let mut then_argv = vec![cfg.then.clone()];
    then_argv.extend(argv.into_iter().skip(1));
    let then_argv = cstrings(then_argv)?;
    let agent_argv = cstrings(std::iter::once(AGENT.to_string()).chain(cfg.args))?;
    // SAFETY: single-threaded at this point (called before any runtime starts).
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            wait_for_base_mounts(Duration::from_secs(120));
            let _ = execv(&agent_argv[0], &agent_argv);
            std::process::exit(127);
        }
        Ok(ForkResult::Parent { .. }) | Err(_) => {
            // Even if fork failed, the guest must still boot its real init.
            let e = execv(&then_argv[0], &then_argv);
            Err(format!("exec {}: {e:?}", cfg.then))
        }
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
    fn init_config_names_the_real_init_and_agent_args() {
        let c = parse_config("# overlay\nthen=/usr/bin/kata-agent\nargs=--vsock-port 17230\n")
            .expect("valid");
        assert_eq!(c.then, "/usr/bin/kata-agent");
        assert_eq!(c.args, vec!["--vsock-port", "17230"]);
        assert!(parse_config("args=x").is_err());
        assert!(parse_config("then=relative").is_err());
        assert!(parse_config("then=/x\nbogus=1").is_err());
        assert!(invoked_as_init("/init") && invoked_as_init("init"));
        assert!(!invoked_as_init("/usr/bin/cnfs-agent"));
    }
}
