//! The node's file system as the installer sees it: the host's `/` bind-mounted at a
//! directory (`/host` in the DaemonSet), every path named by its host path. Writes are atomic
//! (temporary file in the same directory, fsync, rename, fsync of the directory), so a file
//! is either its old bytes or its new bytes, whenever the installer is killed.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

pub struct Host {
    root: PathBuf,
}

/// At most this many symbolic links are followed for one path (Linux allows 40).
const MAX_LINKS: usize = 16;

impl Host {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Host { root: root.into() }
    }

    /// Where the host path `p` (absolute) is in the installer's view.
    pub fn path(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }

    /// The file's bytes, or `None` when it does not exist.
    pub fn read(&self, p: &str) -> anyhow::Result<Option<Vec<u8>>> {
        match std::fs::read(self.path(p)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {p}")),
        }
    }

    pub fn exists(&self, p: &str) -> bool {
        self.path(p).symlink_metadata().is_ok()
    }

    /// The permission bits of an existing file.
    pub fn mode(&self, p: &str) -> Option<u32> {
        std::fs::metadata(self.path(p))
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

    /// Creates the host directory `p` and its missing parents; returns the ones it created,
    /// outermost first.
    pub fn create_dirs(&self, p: &str, mode: u32) -> anyhow::Result<Vec<String>> {
        let mut created = Vec::new();
        let mut acc = String::new();
        for c in split(p) {
            acc.push('/');
            acc.push_str(&c);
            let full = self.path(&acc);
            if full.symlink_metadata().is_err() {
                std::fs::create_dir(&full).with_context(|| format!("creating {acc}"))?;
                std::fs::set_permissions(&full, std::fs::Permissions::from_mode(mode))
                    .with_context(|| format!("setting the mode of {acc}"))?;
                created.push(acc.clone());
            }
        }
        Ok(created)
    }

    /// Replaces (or creates) the host file `p` atomically with `data` and `mode`.
    pub fn write(&self, p: &str, data: &[u8], mode: u32) -> anyhow::Result<()> {
        write_atomic(&self.path(p), data, mode).with_context(|| format!("writing {p}"))
    }

    /// Removes the host file `p` if it exists.
    pub fn remove(&self, p: &str) -> anyhow::Result<()> {
        match std::fs::remove_file(self.path(p)) {
            Ok(()) => sync_dir(&self.path(p)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {p}")),
        }
    }

    /// Removes the host directory `p` if it is empty; says whether it did.
    pub fn remove_dir_if_empty(&self, p: &str) -> bool {
        std::fs::remove_dir(self.path(p)).is_ok()
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

pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("{} has no parent directory", path.display()))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".cnfs-deploy.")
        .tempfile_in(dir)?;
    tmp.write_all(data)?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))?;
    tmp.as_file().sync_all()?;
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
