//! The node's file system as the installer sees it: the host's `/` bind-mounted at a
//! directory (`/host` in the DaemonSet), every path named by its host path and resolved the
//! way the host resolves it (an absolute link such as `config.toml -> /etc/k3s/...` means
//! the host's file, not the installer container's). Writes are atomic (temporary file in the
//! same directory, fsync, rename, fsync of the directory), so a file is either its old bytes
//! or its new bytes, whenever the installer is killed; a write through a symbolic link
//! replaces the link's target and keeps the link.

use std::cell::Cell;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// Temporary files of atomic writes start with this; one left by a killed run is removed by
/// the next run ([`Host::remove_temporaries`]).
pub const TEMP_PREFIX: &str = ".cnfs-deploy.";

/// Test hook: the process aborts (as kill -9 would stop it) after this many changes to the
/// node (directory created, file written or removed, containerd restarted), and also
/// between writing a temporary file and renaming it.
const ABORT_AFTER: &str = "CNFS_DEPLOY_ABORT_AFTER_WRITES";

pub struct Host {
    root: PathBuf,
    changes: Cell<usize>,
    abort_after: Option<usize>,
}

/// At most this many symbolic links are followed for one path (Linux allows 40).
const MAX_LINKS: usize = 16;

impl Host {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Host {
            root: root.into(),
            changes: Cell::new(0),
            abort_after: std::env::var(ABORT_AFTER).ok().and_then(|v| v.parse().ok()),
        }
    }

    /// Counts one change to the node (test hook: may stop the process here).
    pub fn changed(&self) {
        let n = self.changes.get() + 1;
        self.changes.set(n);
        if self.abort_after == Some(n) {
            std::process::abort();
        }
    }

    /// Where the host path `p` (absolute) is in the installer's view, links not resolved.
    pub fn path(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }

    /// The installer's view of `p` with every link in it resolved as the host would.
    fn real(&self, p: &str) -> anyhow::Result<PathBuf> {
        Ok(self.path(&self.resolve(p)?))
    }

    /// The installer's view of `p` with the links of its directory resolved, not a link
    /// in its last component (to look at or remove the link itself).
    fn real_parent(&self, p: &str) -> anyhow::Result<PathBuf> {
        let (dir, name) = p.rsplit_once('/').unwrap_or(("", p));
        Ok(self.path(&format!("{}/{name}", self.resolve(dir)?)))
    }

    /// An exclusive lock on the node's root directory, held until the value is dropped:
    /// two runs (install and uninstall, or a restarted pod and a manual run) take turns
    /// instead of interleaving their writes to the same files and ledger.
    pub fn lock(&self) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
        let dir = std::fs::File::open(&self.root)
            .with_context(|| format!("opening {}", self.root.display()))?;
        nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| anyhow::anyhow!("locking {}: {e}", self.root.display()))
    }

    /// The file's bytes, or `None` when it does not exist.
    pub fn read(&self, p: &str) -> anyhow::Result<Option<Vec<u8>>> {
        match std::fs::read(self.real(p)?) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {p}")),
        }
    }

    /// Whether anything (a file, a directory, a link, even a dangling one) is at `p`.
    pub fn exists(&self, p: &str) -> bool {
        self.real_parent(p)
            .is_ok_and(|full| full.symlink_metadata().is_ok())
    }

    /// Whether `p` is a directory (or a link to one).
    pub fn is_dir(&self, p: &str) -> bool {
        self.real(p).is_ok_and(|full| full.is_dir())
    }

    /// The permission bits of an existing file.
    pub fn mode(&self, p: &str) -> Option<u32> {
        std::fs::metadata(self.real(p).ok()?)
            .ok()
            .map(|m| m.permissions().mode() & 0o7777)
    }

    /// The host path `p` with every symbolic link resolved the way the host would resolve
    /// it: absolute targets are host paths, not the installer's.
    pub fn resolve(&self, p: &str) -> anyhow::Result<String> {
        let mut parts: Vec<String> = Vec::new();
        let mut pending: Vec<String> = split(p);
        pending.reverse();
        let mut links = 0;
        while let Some(c) = pending.pop() {
            match c.as_str() {
                "." => continue,
                ".." => {
                    parts.pop();
                    continue;
                }
                _ => {}
            }
            parts.push(c);
            let here = format!("/{}", parts.join("/"));
            let Ok(target) = std::fs::read_link(self.path(&here)) else {
                continue;
            };
            links += 1;
            if links > MAX_LINKS {
                bail!("{p}: more than {MAX_LINKS} symbolic links");
            }
            parts.pop();
            let target = target.to_string_lossy().into_owned();
            if target.starts_with('/') {
                parts.clear();
            }
            let mut more = split(&target);
            more.reverse();
            pending.extend(more);
        }
        Ok(format!("/{}", parts.join("/")))
    }

    /// The directories [`Host::create_dirs`] would create for `p` (resolved), outermost
    /// first: recorded before they are created, so a kill in between leaks none.
    pub fn missing_dirs(&self, p: &str) -> anyhow::Result<Vec<String>> {
        let mut missing = Vec::new();
        let mut acc = String::new();
        for c in split(&self.resolve(p)?) {
            acc.push('/');
            acc.push_str(&c);
            if self.path(&acc).symlink_metadata().is_err() {
                missing.push(acc.clone());
            }
        }
        Ok(missing)
    }

    /// Creates the host directory `p` and its missing parents; returns the ones it created,
    /// outermost first.
    pub fn create_dirs(&self, p: &str, mode: u32) -> anyhow::Result<Vec<String>> {
        let missing = self.missing_dirs(p)?;
        for d in &missing {
            let full = self.path(d);
            std::fs::create_dir(&full).with_context(|| format!("creating {d}"))?;
            std::fs::set_permissions(&full, std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("setting the mode of {d}"))?;
            self.changed();
        }
        Ok(missing)
    }

    /// Refuses, while planning, a place that cannot take the file `p`: something other than
    /// a file there (a directory, a device) or a directory it cannot write in (a read-only
    /// file system), so that the install stops before its first write instead of halfway.
    pub fn check_target(&self, p: &str) -> anyhow::Result<()> {
        let real = self.resolve(p)?;
        if let Ok(m) = std::fs::metadata(self.path(&real)) {
            if !m.is_file() {
                let what = if m.is_dir() {
                    "a directory"
                } else {
                    "not a regular file"
                };
                bail!("{p} is {what}: cnfs-deploy writes a file there; move it away and run again");
            }
        }
        // The directory the file goes in, or the nearest one that exists (it creates the rest).
        let mut dir = real.as_str();
        loop {
            dir = dir.rsplit_once('/').map_or("/", |(d, _)| d);
            if dir.is_empty() {
                dir = "/";
            }
            if dir == "/" {
                break;
            }
            if self.path(dir).exists() {
                if !self.path(dir).is_dir() {
                    bail!("{p}: {dir} is not a directory: move it away and run again");
                }
                break;
            }
        }
        nix::unistd::access(&self.path(dir), nix::unistd::AccessFlags::W_OK).map_err(|e| {
            anyhow::anyhow!(
                "{p}: cannot write in {dir} ({}); is it read-only?",
                e.desc()
            )
        })
    }

    /// Replaces (or creates) the host file `p` atomically with `data` and `mode`.
    pub fn write(&self, p: &str, data: &[u8], mode: u32) -> anyhow::Result<()> {
        write_atomic(&self.real(p)?, data, mode, || self.changed())
            .with_context(|| format!("writing {p}"))?;
        self.changed();
        Ok(())
    }

    /// Removes the host file (or link) `p` if it exists.
    pub fn remove(&self, p: &str) -> anyhow::Result<()> {
        let full = self.real_parent(p)?;
        match std::fs::remove_file(&full) {
            Ok(()) => {
                sync_dir(&full)?;
                self.changed();
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {p}")),
        }
    }

    /// Removes the host directory `p` and everything in it, if it exists.
    pub fn remove_tree(&self, p: &str) -> anyhow::Result<()> {
        match std::fs::remove_dir_all(self.real(p)?) {
            Ok(()) => {
                self.changed();
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {p}")),
        }
    }

    /// Removes the host directory `p` if it is empty; says whether it did.
    pub fn remove_dir_if_empty(&self, p: &str) -> bool {
        let removed = std::fs::remove_dir(self.path(p)).is_ok();
        if removed {
            self.changed();
        }
        removed
    }

    /// The names in the host directory `p`, or `None` when it is not a directory.
    pub fn list(&self, p: &str) -> Option<Vec<String>> {
        let rd = std::fs::read_dir(self.real(p).ok()?).ok()?;
        Some(
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
        )
    }

    /// Removes the temporary files a run killed in the middle of an atomic write left in
    /// the host directory `dir` (named [`TEMP_PREFIX`]..., so never anyone else's).
    pub fn remove_temporaries(&self, dir: &str) -> anyhow::Result<()> {
        for name in self.list(dir).unwrap_or_default() {
            if name.starts_with(TEMP_PREFIX) {
                self.remove(&format!("{}/{name}", dir.trim_end_matches('/')))?;
            }
        }
        Ok(())
    }
}

fn split(p: &str) -> Vec<String> {
    p.split('/')
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .collect()
}

fn sync_dir(file: &Path) -> anyhow::Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// `before_rename` runs once the temporary file holds `data` (the test hook's kill point).
pub fn write_atomic(
    path: &Path,
    data: &[u8],
    mode: u32,
    before_rename: impl FnOnce(),
) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("{} has no parent directory", path.display()))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .tempfile_in(dir)?;
    tmp.write_all(data)?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))?;
    tmp.as_file().sync_all()?;
    before_rename();
    tmp.persist(path).map_err(|e| e.error)?;
    sync_dir(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_links_resolve_inside_the_host_root_and_loops_are_refused() {
        let d = tempfile::tempdir().expect("tmp");
        let host = Host::new(d.path());
        host.create_dirs(
            "/opt/kata/share/defaults/kata-containers/runtimes/qemu",
            0o755,
        )
        .expect("dirs");
        let defaults = "/opt/kata/share/defaults/kata-containers";
        std::os::unix::fs::symlink(
            "runtimes/qemu/configuration-qemu.toml",
            host.path(&format!("{defaults}/configuration-qemu.toml")),
        )
        .expect("relative link");
        std::os::unix::fs::symlink(
            format!("{defaults}/configuration-qemu.toml"),
            host.path("/opt/abs.toml"),
        )
        .expect("absolute link");
        assert_eq!(
            host.resolve("/opt/abs.toml").expect("resolve"),
            format!("{defaults}/runtimes/qemu/configuration-qemu.toml")
        );
        std::os::unix::fs::symlink("/opt/loop-b", host.path("/opt/loop-a")).expect("a");
        std::os::unix::fs::symlink("/opt/loop-a", host.path("/opt/loop-b")).expect("b");
        let e = host.resolve("/opt/loop-a").expect_err("loop");
        assert!(e.to_string().contains("symbolic links"), "{e}");
    }

    #[test]
    fn an_atomic_write_keeps_the_mode_and_leaves_no_temporary_file() {
        let d = tempfile::tempdir().expect("tmp");
        let host = Host::new(d.path());
        host.create_dirs("/etc/cnfs", 0o755).expect("dirs");
        host.write("/etc/cnfs/a", b"one", 0o600).expect("write");
        host.write("/etc/cnfs/a", b"two", 0o640).expect("rewrite");
        assert_eq!(
            host.read("/etc/cnfs/a").expect("read"),
            Some(b"two".to_vec())
        );
        assert_eq!(host.mode("/etc/cnfs/a"), Some(0o640));
        let names: Vec<_> = std::fs::read_dir(host.path("/etc/cnfs"))
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a")]);
    }
}
