//! Reads `/proc/self/mountinfo`: the kernel's word on what is mounted where. The agent trusts
//! it over its own memory when it restarts and when it lists volumes.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The mount's id, unique across all mount namespaces.
    pub id: u64,
    /// `major:minor` of the file system: the same for every mount (bind) of one superblock.
    pub dev: String,
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
    pub options: String,
}

impl MountEntry {
    /// The value of `key=` in the super options (`None` if absent; `Some("")` for a flag).
    pub fn option(&self, key: &str) -> Option<&str> {
        self.options
            .split(',')
            .find_map(|o| match o.split_once('=') {
                Some((k, v)) if k == key => Some(v),
                None if o == key => Some(""),
                _ => None,
            })
    }
}

/// Parses mountinfo text (see proc(5)): fields 5 (mount point) and, after the ` - `
/// separator, type, source and super options. Octal escapes (`\040`) are decoded.
pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let mut fields = pre.split(' ');
            let id = fields.next()?.parse().ok()?;
            let dev = fields.nth(1)?.to_string();
            let mount_point = fields.nth(1)?;
            let mut post = post.split(' ');
            Some(MountEntry {
                id,
                dev,
                mount_point: PathBuf::from(unescape(mount_point)),
                fs_type: post.next()?.to_string(),
                source: unescape(post.next()?),
                options: post.next().unwrap_or_default().to_string(),
            })
        })
        .collect()
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = (b[i] == b'\\' && i + 3 < b.len())
            .then(|| &b[i + 1..i + 4])
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0')))
            .and_then(|v| u8::try_from(v).ok());
        // `\777` is not a byte: kept as written (the kernel never writes it; found by proptest).
        if let Some(v) = octal {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The current mounts of this process's mount namespace.
pub fn read() -> std::io::Result<Vec<MountEntry>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// A mount of the same file system in another mount namespace (a container's bind).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub command: String,
    pub mount_point: PathBuf,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} ({}) at {}",
            self.pid,
            self.command,
            self.mount_point.display()
        )
    }
}

/// Mounts of `dev` (a superblock's `major:minor`) in other processes' mount namespaces that
/// are not mounts of this namespace: the containers holding their own copy of a volume.
/// /proc/<pid>/mountinfo is readable for every process. At most `max`, one per mount.
pub fn holders(dev: &str, max: usize) -> Vec<Holder> {
    let own: std::collections::HashSet<u64> =
        read().unwrap_or_default().iter().map(|e| e.id).collect();
    let me = std::process::id();
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(entry.path().join("mountinfo")) else {
            continue;
        };
        for e in parse(&text) {
            if e.dev == dev && !own.contains(&e.id) && seen.insert(e.id) {
                let command = std::fs::read_to_string(entry.path().join("comm"))
                    .map(|c| c.trim().to_string())
                    .unwrap_or_default();
                out.push(Holder {
                    pid,
                    command,
                    mount_point: e.mount_point,
                });
                if out.len() >= max {
                    return out;
                }
            }
        }
    }
    out
}

/// The top-most mount at `path` (the last one listed wins, as the kernel stacks them).
pub fn find<'a>(entries: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    entries.iter().rev().find(|e| e.mount_point == path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 0:20 / / rw,relatime - rootfs rootfs rw
40 22 0:34 / /run/cnfs/volumes/data rw,nosuid,nodev,relatime shared:1 - nfs4 10.0.0.1:/exports rw,vers=4.1,addr=10.0.0.1
41 22 0:35 / /run/cnfs/volumes/with\\040space rw - nfs 10.0.0.1:/x rw
";

    #[test]
    fn parses_mount_point_type_and_source() {
        let e = parse(SAMPLE);
        assert_eq!(e.len(), 3);
        assert_eq!(e[1].mount_point, PathBuf::from("/run/cnfs/volumes/data"));
        assert_eq!(e[1].fs_type, "nfs4");
        assert_eq!(e[1].source, "10.0.0.1:/exports");
        assert!(e[1].options.contains("vers=4.1"));
        assert_eq!(
            e[2].mount_point,
            PathBuf::from("/run/cnfs/volumes/with space")
        );
        assert!(find(&e, Path::new("/run/cnfs/volumes/data")).is_some());
        assert!(find(&e, Path::new("/run/cnfs/volumes/none")).is_none());
        assert_eq!(e[1].option("vers"), Some("4.1"));
        assert_eq!((e[1].id, e[1].dev.as_str()), (40, "0:34"));
        assert_eq!(e[1].option("rw"), Some(""));
        assert_eq!(e[1].option("ver"), None);
        // Not an octal byte: kept as written, no overflow.
        assert_eq!(unescape("a\\777b\\040"), "a\\777b ");
    }
}
