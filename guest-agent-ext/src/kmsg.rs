//! The kernel log records written after a point in time, read from `/dev/kmsg`: for the
//! rare failure the kernel explains only in its log (CephFS: a key the monitors reject and
//! a file system no MDS serves both end in `EHOSTUNREACH`, see `fs/cephfs.rs`).
//!
//! A [`Cursor`] is opened just before the system call it should explain, positioned after
//! the newest record, so it never sees what was logged before. Reading is non-blocking and
//! bounded (a record count), and says whether it saw everything: records the ring buffer
//! overwrote before they were read, or more records than the bound, make the window
//! incomplete, and a caller must not draw conclusions from an incomplete window.
//!
//! Permissions: with `kernel.dmesg_restrict = 1` (Debian's and most distributions' default)
//! reading needs CAP_SYSLOG, which the agent keeps for this (see `privileges.rs`). Without
//! it, opening fails and callers carry on without the explanation.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The kernel's bound on one `/dev/kmsg` record (`CONSOLE_EXT_LOG_MAX`): a read with a
/// smaller buffer fails with EINVAL.
const RECORD_MAX: usize = 8192;

pub const DEV_KMSG: &str = "/dev/kmsg";

pub struct Cursor {
    file: File,
}

/// What was logged since the cursor was opened.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Window {
    /// The records' message texts, oldest first (the kernel escapes unprintable bytes).
    pub messages: Vec<String>,
    /// False when records were lost (overwritten before they were read), the bound was
    /// reached before the end, or reading failed.
    pub complete: bool,
}

impl Cursor {
    /// Opens `path` (normally [`DEV_KMSG`]) positioned after the newest record.
    pub fn at_end(path: &Path) -> std::io::Result<Cursor> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        file.seek(SeekFrom::End(0))?;
        Ok(Cursor { file })
    }

    /// The records logged since the cursor was opened (or last read), at most `max`.
    /// Never blocks.
    pub fn read_new(&mut self, max: usize) -> Window {
        let mut buf = vec![0u8; RECORD_MAX];
        let mut w = Window::default();
        let mut lost = false;
        let mut records = 0;
        while records < max {
            match self.file.read(&mut buf) {
                // End of a regular file (tests); /dev/kmsg says EAGAIN instead.
                Ok(0) => {
                    w.complete = !lost;
                    return w;
                }
                Ok(n) => {
                    let got = parse(&buf[..n]);
                    records += got.len().max(1);
                    w.messages.extend(got);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    w.complete = !lost;
                    return w;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // The reader fell behind and the next record was overwritten; reading goes
                // on with the oldest record still there.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => lost = true,
                Err(_) => return w,
            }
        }
        w
    }
}

/// Messages from `/dev/kmsg` text: each record is `<prio>,<seq>,<usec>,<flags>[,...];<text>`
/// followed by optional continuation lines (` KEY=VALUE`, dictionary data), which are skipped.
/// One read(2) of `/dev/kmsg` returns one record; several records (a file) parse too.
pub fn parse(data: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(data)
        .lines()
        .filter(|l| !l.starts_with(' '))
        .filter_map(|l| {
            let (header, text) = l.split_once(';')?;
            // prio, seq and usec: three numbers (found by a property test: one was enough).
            let fields: Vec<&str> = header.split(',').take(3).collect();
            let numeric = fields.len() == 3
                && fields
                    .iter()
                    .all(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()));
            numeric.then(|| text.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn parses_records_and_skips_dictionary_lines() {
        let data = b"3,812,11495657,-;libceph: auth protocol 'cephx' mauth authentication failed: -13\n\
                     6,813,11497312,-,caller=T42;ceph: No mds server is up or the cluster is laggy\n \
                     SUBSYSTEM=ceph\n not a record\ngarbage;line\n";
        assert_eq!(
            parse(data),
            vec![
                "libceph: auth protocol 'cephx' mauth authentication failed: -13".to_string(),
                "ceph: No mds server is up or the cluster is laggy".to_string(),
            ]
        );
        // A message may itself contain ';'.
        assert_eq!(parse(b"6,1,2,-;a;b\n"), vec!["a;b".to_string()]);
    }

    #[test]
    fn a_cursor_sees_only_what_came_after_it_and_is_bounded() {
        let dir = std::env::temp_dir().join(format!("cnfs-kmsg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("kmsg");
        std::fs::write(&path, b"6,1,1,-;before\n").expect("write");
        let mut c = Cursor::at_end(&path).expect("open");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("append");
        f.write_all(b"6,2,2,-;after one\n6,3,3,-;after two\n")
            .expect("append");
        let w = c.read_new(16);
        assert_eq!(
            w,
            Window {
                messages: vec!["after one".into(), "after two".into()],
                complete: true
            }
        );
        assert_eq!(
            c.read_new(16),
            Window {
                messages: vec![],
                complete: true
            }
        );
        // A bound reached before the end leaves the window incomplete.
        f.write_all(b"6,4,4,-;later\n").expect("append");
        assert!(!c.read_new(0).complete);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_log_is_an_error_not_a_panic() {
        assert!(Cursor::at_end(Path::new("/nonexistent/kmsg")).is_err());
    }
}
