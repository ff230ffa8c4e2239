//! A real containerd for tests: private root, state and sockets in a temp dir, so that any
//! number of instances run beside each other and beside a containerd the machine may have.
//! Everything it started is stopped on drop, also when a test fails: tasks are
//! force-deleted through containerd (so shims stop their containers or VMs), shims still
//! serving its socket are killed with their process groups, then containerd's own group,
//! and mounts left under its dir are detached before the dir is removed.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use cnfs_testbed::containerd::{Containerd, MINIMAL};
//! let c = Containerd::start(MINIMAL)?;
//! let out = c.ctr(&["version"])?;
//! # Ok(()) }
//! ```

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

use crate::process::{run, Guarded};
use crate::TempDir;

/// Top-level keys for a quiet, self-contained containerd 1.6+: `version = 2` and plugins
/// off that would touch host paths outside the temp dir (`opt` installs into
/// /opt/containerd) or probe host storage the tests do not use. Prepend to your own tables.
pub const MINIMAL: &str = r#"version = 2
disabled_plugins = [
  "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]
"#;

const START_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Containerd {
    proc: Guarded,
    socket: PathBuf,
    config: PathBuf,
    log: PathBuf,
    dir: TempDir,
}

impl Containerd {
    /// Fails with the fix when `containerd` or `ctr` is not on PATH.
    pub fn require_installed() -> anyhow::Result<()> {
        for bin in ["containerd", "ctr"] {
            let ok = Command::new(bin)
                .arg("--version")
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if !ok {
                anyhow::bail!(
                    "`{bin}` is not installed or does not run: install Debian's containerd \
                     (`apt-get install containerd runc`); `cargo xtask test` installs it"
                );
            }
        }
        Ok(())
    }

    /// `containerd --version`, e.g. "containerd github.com/containerd/containerd 1.6.20~ds1 ...".
    pub fn version() -> anyhow::Result<String> {
        Ok(run(Command::new("containerd").arg("--version"))?
            .trim()
            .to_string())
    }

    /// The major version of the installed containerd (1 or 2).
    pub fn major_version() -> anyhow::Result<u32> {
        let v = Self::version()?;
        v.split_whitespace()
            .find_map(|w| {
                let w = w.strip_prefix('v').unwrap_or(w);
                let (major, rest) = w.split_once('.')?;
                rest.chars().next()?.is_ascii_digit().then_some(())?;
                major.parse().ok()
            })
            .ok_or_else(|| anyhow::anyhow!("no version number in {v:?}"))
    }

    /// The config file containerd gets for `content`: `root` and `state` (top-level keys)
    /// before it, the `[grpc]` and `[ttrpc]` socket tables after it, all inside `dir`.
    /// `content` must not set those itself; without a top-level `version` key it gets
    /// `version = 2`.
    pub fn compose(dir: &Path, content: &str) -> String {
        let d = dir.display();
        let has_version = content
            .lines()
            .take_while(|l| !l.trim_start().starts_with('['))
            .any(|l| {
                l.trim_start()
                    .strip_prefix("version")
                    .is_some_and(|r| r.trim_start().starts_with('='))
            });
        let version = if has_version { "" } else { "version = 2\n" };
        format!(
            "# written by cnfs-testbed: private paths of this instance\n\
             {version}root = \"{d}/root\"\nstate = \"{d}/state\"\n\n\
             {content}\n\n\
             # written by cnfs-testbed: private sockets of this instance\n\
             [grpc]\n  address = \"{d}/containerd.sock\"\n\
             [ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n"
        )
    }

    /// `containerd --config FILE config dump` for `content` (composed as for
    /// [`Containerd::start`]), without starting anything: the merged configuration as
    /// containerd sees it, or containerd's error.
    pub fn config_dump(content: &str) -> anyhow::Result<String> {
        Self::require_installed()?;
        let dir = TempDir::new("containerd-dump")?;
        let config = dir.path().join("config.toml");
        std::fs::write(&config, Self::compose(dir.path(), content))?;
        run(Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .args(["config", "dump"]))
    }

    /// Starts containerd with `content` (see [`Containerd::compose`]) and waits until its
    /// socket answers `ctr version`. Fails with the tail of containerd's log when it exits
    /// first (a bad config, a required plugin that did not load) or does not answer in time.
    pub fn start(content: &str) -> anyhow::Result<Self> {
        Self::require_installed()?;
        let dir = TempDir::new("containerd")?;
        let config = dir.path().join("config.toml");
        let log = dir.path().join("containerd.log");
        let socket = dir.path().join("containerd.sock");
        std::fs::write(&config, Self::compose(dir.path(), content))?;
        let out = File::create(&log)?;
        let mut cmd = Command::new("containerd");
        cmd.arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let proc = Guarded::spawn("containerd", cmd)?;
        let mut c = Containerd {
            proc,
            socket,
            config,
            log,
            dir,
        };
        c.wait_ready()?;
        Ok(c)
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let until = Instant::now() + START_TIMEOUT;
        loop {
            if !self.proc.alive() {
                anyhow::bail!("containerd exited during start-up:\n{}", self.log_tail(30));
            }
            let answered = Command::new("ctr")
                .arg("-a")
                .arg(&self.socket)
                .args(["--connect-timeout", "1s", "version"])
                .stdin(Stdio::null())
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if answered {
                return Ok(());
            }
            if Instant::now() > until {
                anyhow::bail!(
                    "containerd did not answer on {} within {START_TIMEOUT:?}:\n{}",
                    self.socket.display(),
                    self.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `ctr -a <socket> ARGS...`; global flags such as `-n <namespace>` go first in `args`.
    /// Returns stdout; an error carries ctr's stderr.
    pub fn ctr(&self, args: &[&str]) -> anyhow::Result<String> {
        run(Command::new("ctr")
            .arg("-a")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null()))
    }

    /// The gRPC socket (`ctr -a`); the ttrpc socket is this path with `.ttrpc` appended.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// This instance's temp dir (root/, state/, config, log, sockets).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The last `lines` lines of containerd's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Shims started for this instance: processes whose command line has
    /// `-address <this socket>` (shims run in their own process groups, so stopping
    /// containerd's group does not reach them).
    fn shim_pids(&self) -> Vec<i32> {
        let want = self.socket.as_os_str().as_encoded_bytes();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                    return false;
                };
                let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
                args.windows(2)
                    .any(|w| (w[0] == b"-address" || w[0] == b"--address") && w[1] == want)
            })
            .collect()
    }

    /// Lazily unmounts whatever is still mounted under this instance's dir (deepest first),
    /// so that removing the dir cannot reach into a container's rootfs.
    fn unmount_leftovers(&self) {
        let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
            return;
        };
        let base = self.dir.path().to_string_lossy().into_owned();
        let mut points: Vec<String> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(unescape_mountinfo)
            .filter(|p| p.starts_with(&format!("{base}/")))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = nix::mount::umount2(p.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
    }

    /// Best effort, bounded: force-deletes every task in every namespace, so that shims stop
    /// their containers (or VMs) the way containerd would.
    fn remove_tasks(&self) {
        let Ok(namespaces) = self.ctr(&["--timeout", "5s", "namespaces", "ls", "-q"]) else {
            return;
        };
        for ns in namespaces.split_whitespace() {
            let Ok(tasks) = self.ctr(&["--timeout", "5s", "-n", ns, "tasks", "ls", "-q"]) else {
                continue;
            };
            for task in tasks.split_whitespace() {
                let _ = self.ctr(&["--timeout", "10s", "-n", ns, "tasks", "rm", "-f", task]);
            }
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.proc.alive() {
            self.remove_tasks();
        }
        // Whatever is left (a shim that did not answer): killed with its process group.
        let shims = self.shim_pids();
        for &pid in &shims {
            let pid = Pid::from_raw(pid);
            let _ = killpg(pid, Signal::SIGKILL);
            let _ = kill(pid, Signal::SIGKILL);
        }
        wait_gone(&shims, Duration::from_secs(3));
        self.proc.stop(Signal::SIGTERM, Duration::from_secs(5));
        self.unmount_leftovers();
    }
}

/// Is `pid` a process that still runs (not gone, not a zombie)?
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .and_then(|r| r.trim_start().chars().next())
                != Some('Z')
        })
        .unwrap_or(false)
}

/// Waits up to `timeout` for every pid to stop running (a kill is asynchronous).
fn wait_gone(pids: &[i32], timeout: Duration) -> bool {
    let until = Instant::now() + timeout;
    loop {
        if !pids.iter().any(|p| running(*p)) {
            return true;
        }
        if Instant::now() > until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let s = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("0");
            out.push(u8::from_str_radix(s, 8).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compose_adds_version_only_when_missing() {
        let dir = Path::new("/tmp/x");
        assert!(Containerd::compose(dir, "[plugins.a]\n").contains("version = 2\n"));
        let own = Containerd::compose(dir, "version = 3\n[plugins.a]\n  version = 1\n");
        assert!(!own.contains("version = 2"), "{own}");
        // A `version` key inside a table is not the top-level one.
        assert!(Containerd::compose(dir, "[plugins.a]\nversion = 1\n").contains("version = 2\n"));
    }

    /// A container started through this containerd (runc, a busybox rootfs directory, no
    /// image) is gone after drop, with its shim, its mounts and the temp dir.
    #[test]
    fn drop_stops_containers_shims_and_removes_the_dir() -> anyhow::Result<()> {
        let rootfs = TempDir::new("containerd-rootfs")?;
        std::fs::create_dir_all(rootfs.path().join("bin"))?;
        std::fs::copy("/bin/busybox", rootfs.path().join("bin/busybox"))
            .map_err(|e| anyhow::anyhow!("/bin/busybox: {e} (apt-get install busybox-static)"))?;
        let c = Containerd::start(MINIMAL)?;
        let dir = c.dir().to_path_buf();
        let root = rootfs.path().to_str().unwrap();
        c.ctr(&[
            "run",
            "-d",
            "--rootfs",
            root,
            "sleeper",
            "/bin/busybox",
            "sleep",
            "300",
        ])?;
        let tasks = c.ctr(&["tasks", "ls"])?;
        let pid: i32 = tasks
            .lines()
            .find(|l| l.starts_with("sleeper"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no running task in:\n{tasks}"))?;
        let shims = c.shim_pids();
        assert!(
            !shims.is_empty(),
            "no shim found for {}",
            c.socket().display()
        );
        assert!(running(pid));
        drop(c);
        assert!(
            wait_gone(&[pid], Duration::from_secs(5)),
            "the container's process {pid} survived"
        );
        assert!(
            wait_gone(&shims, Duration::from_secs(5)),
            "shims {shims:?} survived"
        );
        assert!(!dir.exists(), "{} was not removed", dir.display());
        Ok(())
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape_mountinfo(r"/tmp/plain"), "/tmp/plain");
        assert_eq!(unescape_mountinfo(r"/tmp/end\04"), r"/tmp/end\04");
    }
}
