//! An in-memory file tree written out as a newc cpio archive, the format the kernel unpacks
//! into its initramfs. Everything that could vary between builds (order, times, owners,
//! inode numbers, gzip header) is fixed so the same inputs give the same bytes.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context as _, Result};
use flate2::{Compression, GzBuilder};

const S_IFREG: u32 = 0o100_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFCHR: u32 = 0o020_000;
const S_IFLNK: u32 = 0o120_000;

/// What a path in the archive is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
    CharDev { mode: u32, major: u32, minor: u32 },
    Symlink { target: String },
}

/// Paths (relative, `/`-separated, no `.` or `..`) and what they are. A `BTreeMap` keeps
/// them sorted, which also puts every directory before its children (a prefix sorts first).
#[derive(Debug, Default)]
pub struct Tree {
    nodes: BTreeMap<String, Node>,
}

fn check_path(path: &str) -> Result<()> {
    if path.is_empty()
        || path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        bail!("archive path {path:?} must be relative, without empty, `.` or `..` components");
    }
    Ok(())
}

impl Tree {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `path` as a directory (and its missing parents at 0755); an existing directory
    /// takes the new mode, so `tmp` can be made 1777 after a file implied it.
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<()> {
        check_path(path)?;
        self.parents(path)?;
        match self.nodes.get_mut(path) {
            Some(Node::Dir { mode: m }) => *m = mode,
            Some(_) => bail!("archive path {path:?} is already a non-directory"),
            None => {
                self.nodes.insert(path.to_string(), Node::Dir { mode });
            }
        }
        Ok(())
    }

    /// Adds a regular file; a path may be added only once, so two inputs cannot silently
    /// land on the same name.
    pub fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) -> Result<()> {
        self.insert(path, Node::File { mode, data })
    }

    pub fn char_dev(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> Result<()> {
        self.insert(path, Node::CharDev { mode, major, minor })
    }

    /// A symbolic link (cpio stores the target as the entry's data).
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        self.insert(
            path,
            Node::Symlink {
                target: target.to_string(),
            },
        )
    }

    /// The regular files, in path order.
    pub fn files(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.nodes.iter().filter_map(|(p, n)| match n {
            Node::File { data, .. } => Some((p.as_str(), data.as_slice())),
            _ => None,
        })
    }

    #[cfg(test)]
    pub fn get(&self, path: &str) -> Option<&Node> {
        self.nodes.get(path)
    }

    fn insert(&mut self, path: &str, node: Node) -> Result<()> {
        check_path(path)?;
        self.parents(path)?;
        if self.nodes.contains_key(path) {
            bail!("archive path {path:?} is added twice");
        }
        self.nodes.insert(path.to_string(), node);
        Ok(())
    }

    fn parents(&mut self, path: &str) -> Result<()> {
        let mut end = 0;
        while let Some(i) = path[end..].find('/') {
            let parent = &path[..end + i];
            match self.nodes.get(parent) {
                Some(Node::Dir { .. }) => {}
                Some(_) => bail!("archive path {parent:?} is needed as a directory for {path:?}"),
                None => {
                    self.nodes
                        .insert(parent.to_string(), Node::Dir { mode: 0o755 });
                }
            }
            end += i + 1;
        }
        Ok(())
    }

    /// The tree as an uncompressed newc archive with its trailer.
    pub fn to_newc(&self) -> Result<Vec<u8>> {
        self.to_newc_over(&[])
    }

    /// The archive to append over an existing root: directories in `base_dirs` are left out.
    /// The kernel replaces an entry whose type differs from the archive's (clean_path in
    /// init/initramfs.c), so a `lib` directory entry would delete a merged-/usr root's
    /// `lib -> usr/lib` link (and `sbin` its `/sbin/init`); files beneath them unpack through
    /// the link or the directory alike.
    pub fn to_newc_over(&self, base_dirs: &[&str]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let kept = self
            .nodes
            .iter()
            .filter(|(p, n)| !(matches!(n, Node::Dir { .. }) && base_dirs.contains(&p.as_str())));
        for (index, (path, node)) in kept.enumerate() {
            let ino = u32::try_from(index + 1).context("too many archive entries")?;
            let (mode, nlink, data, rdev): (u32, u32, &[u8], (u32, u32)) = match node {
                Node::Dir { mode } => (S_IFDIR | mode, 2, &[], (0, 0)),
                Node::File { mode, data } => (S_IFREG | mode, 1, data, (0, 0)),
                Node::CharDev { mode, major, minor } => (S_IFCHR | mode, 1, &[], (*major, *minor)),
                Node::Symlink { target } => (S_IFLNK | 0o777, 1, target.as_bytes(), (0, 0)),
            };
            let size = u32::try_from(data.len())
                .with_context(|| format!("{path}: {} bytes is too big for cpio", data.len()))?;
            let mut writer = cpio::newc::Builder::new(path)
                .ino(ino)
                .mode(mode)
                .uid(0)
                .gid(0)
                .nlink(nlink)
                .mtime(0)
                .rdev_major(rdev.0)
                .rdev_minor(rdev.1)
                .write(&mut out, size);
            writer
                .write_all(data)
                .with_context(|| format!("writing archive entry {path}"))?;
            writer
                .finish()
                .with_context(|| format!("finishing archive entry {path}"))?;
        }
        cpio::newc::trailer(&mut out).context("writing the cpio trailer")?;
        Ok(out)
    }
}

/// Gzip with a fixed level, mtime 0 and no file name, so the output is reproducible.
pub fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut enc = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::new(9));
    enc.write_all(data)
        .context("gzip compressing the archive")?;
    enc.finish().context("finishing the gzip stream")
}

/// Reads an input file given on the command line, naming it (and its role) on failure.
pub fn read_input(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {what} {}", path.display()))
}

/// Written beside `path` and renamed over it: a guest booting from the old image while a
/// new one is built reads one whole image or the other, never half of each.
pub fn write_output(path: &Path, data: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{gunzip, read_newc};

    #[test]
    fn parents_are_implied_and_sorted_first() {
        let mut t = Tree::new();
        t.file("usr/bin/x", 0o755, b"x".to_vec()).expect("file");
        t.dir("tmp", 0o1777).expect("dir");
        t.char_dev("dev/console", 0o600, 5, 1).expect("dev");
        let entries = read_newc(&t.to_newc().expect("newc"));
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            ["dev", "dev/console", "tmp", "usr", "usr/bin", "usr/bin/x"]
        );
        assert_eq!(entries[0].mode, 0o040_755);
        assert_eq!(entries[1].mode, 0o020_600);
        assert_eq!((entries[1].rdev_major, entries[1].rdev_minor), (5, 1));
        assert_eq!(entries[2].mode, 0o041_777);
        assert_eq!(entries[5].mode, 0o100_755);
        assert_eq!(entries[5].data, b"x");
        let inos: Vec<u32> = entries.iter().map(|e| e.ino).collect();
        assert_eq!(inos, [1, 2, 3, 4, 5, 6]);
        assert!(entries.iter().all(|e| e.mtime == 0));
    }

    #[test]
    fn dir_mode_can_be_changed_after_being_implied() {
        let mut t = Tree::new();
        t.file("tmp/a", 0o644, Vec::new()).expect("file");
        t.dir("tmp", 0o1777).expect("dir");
        assert_eq!(t.get("tmp"), Some(&Node::Dir { mode: 0o1777 }));
    }

    #[test]
    fn conflicts_and_bad_paths_are_refused() {
        let mut t = Tree::new();
        t.file("a", 0o644, Vec::new()).expect("file");
        assert!(t.file("a", 0o644, Vec::new()).is_err());
        assert!(t.file("a/b", 0o644, Vec::new()).is_err());
        assert!(t.dir("a", 0o755).is_err());
        for bad in ["", "/abs", "x//y", "x/../y", "./x", "x/"] {
            assert!(t.file(bad, 0o644, Vec::new()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn gzip_is_reproducible_and_round_trips() {
        let a = gzip(b"hello").expect("gzip");
        assert_eq!(a, gzip(b"hello").expect("gzip"));
        // mtime bytes 4..8 are zero and no FNAME flag (bit 3) is set
        assert_eq!(&a[4..8], &[0, 0, 0, 0]);
        assert_eq!(a[3] & 0x08, 0);
        assert_eq!(gunzip(&a), b"hello");
    }
}
