//! A luks2 volume's recorded sizes on an SMB share (ControllerExpandVolume), as on NFS
//! (`backend/nfs/sizes.rs`): empty directories `cnfs-volume.size.<bytes>` in the volume's
//! directory, beside the container `cnfs-volume.luks2`, which the guest reads at its next
//! mount (the largest well-formed name wins, of any file type). What to write is
//! [`encryption::growth`]'s answer; here are the three `smbclient` runs that read the
//! directory, make the marker and remove the smaller ones.
//!
//! Observed with smbclient and smbd 4.17.12: `ls "<dir>/<mask>"` prints one line per entry,
//! `  <name padded to 30><attributes right-aligned in 7> <size>  <asctime date>` (e.g.
//! `  cnfs-volume.luks2                   N 3221225472  Mon Nov 30 19:42:51 2026`,
//! directories with `D`), then a blank line and the share's free blocks; no match is
//! `NT_STATUS_NO_SUCH_FILE listing ...` (exit 0). `rmdir` of a file is
//! `NT_STATUS_NOT_A_DIRECTORY`, of a non-empty directory `NT_STATUS_DIRECTORY_NOT_EMPTY`:
//! it removes nothing but an empty directory.

use crate::backend::BackendError;
use crate::encryption::{self, Growth, SizeEntry};

use super::client::{check_path, not_a_dir, SmbClient};
use super::status::{is_missing, nt_statuses};

/// Every name [`encryption::size_entry`] reads starts so: the listing asks for these only
/// (a handful of lines, far below the output bound, whatever else the directory holds).
const MASK: &str = "cnfs-volume.*";

/// One entry of an `ls` listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Listed {
    pub(super) name: String,
    pub(super) dir: bool,
    pub(super) size: u64,
}

impl SmbClient<'_> {
    /// Records that the luks2 container in volume directory `path` is to be `size` bytes
    /// from the volume's next mount on: an empty directory `cnfs-volume.size.<size>` beside
    /// the container (owned by this account, with the share's default permissions). Returns
    /// the size recorded afterwards: `size`, or a larger marker or container length found
    /// already (then nothing is written: a repeat or a smaller size never shrinks anything);
    /// `None` when the directory does not exist. Once the new marker exists the smaller ones
    /// are removed, best effort, so the guest has one name to read. Up to three `smbclient`
    /// runs, each bounded.
    pub async fn record_container_size(
        &self,
        path: &str,
        size: u64,
    ) -> Result<Option<u64>, BackendError> {
        check_path("path", path)?;
        let Some(listed) = self.list_sizes(path).await? else {
            return Ok(None);
        };
        let mut markers = Vec::new();
        let mut container = None;
        for e in &listed {
            match encryption::size_entry(&e.name) {
                Some(SizeEntry::Marker(n)) => markers.push(n),
                // Only a file is a container (the guest opens nothing else); Samba shows a
                // symlink as what it points to, as the guest's cifs mount sees it.
                Some(SizeEntry::Container) if !e.dir => container = Some(e.size),
                Some(SizeEntry::Container) | None => {}
            }
        }
        let (size, stale) = match encryption::growth(size, &markers, container) {
            Growth::Recorded(n) => return Ok(Some(n)),
            Growth::Record { size, stale } => (size, stale),
        };
        self.make_marker(path, &encryption::size_marker(size))
            .await?;
        // The new marker exists: the smaller ones say nothing more. Best effort: one left
        // behind is ignored by the guest (the largest wins), and `rmdir` never removes a
        // non-empty directory or anything but a directory.
        if !stale.is_empty() {
            let commands: Vec<String> = stale
                .iter()
                .map(|&n| format!("rmdir \"{path}/{}\"", encryption::size_marker(n)))
                .collect();
            let _ = self.run(&commands.join("; ")).await;
        }
        Ok(Some(size))
    }

    /// The container and markers in directory `path`; `None` when it does not exist.
    async fn list_sizes(&self, path: &str) -> Result<Option<Vec<Listed>>, BackendError> {
        let what = format!("reading the recorded sizes in {}", self.full(path));
        // `cd` comes last, so the exit code says whether the directory is there; the
        // listing before it is read only then.
        let ran = self
            .run(&format!("ls \"{path}/{MASK}\"; cd \"{path}\""))
            .await
            .map_err(|f| f.into_error(&what))?;
        let statuses = nt_statuses(&ran.text);
        if ran.code == Some(0) {
            // No name matching the mask is an empty listing; any other status (access
            // denied...) means the listing cannot be trusted: nothing is written then.
            if statuses.iter().all(|s| *s == "NT_STATUS_NO_SUCH_FILE") {
                return Ok(Some(parse_listing(&ran.text)));
            }
            return Err(ran.failure().into_error(&what));
        }
        match statuses.last() {
            Some(&"NT_STATUS_NOT_A_DIRECTORY") => Err(not_a_dir(&self.full(path))),
            Some(s) if is_missing(s) => Ok(None),
            _ => Err(ran.failure().into_error(&what)),
        }
    }

    /// `mkdir` of marker `marker` in directory `path`. One that exists already (made
    /// meanwhile) is the same record: the guest reads names.
    async fn make_marker(&self, path: &str, marker: &str) -> Result<(), BackendError> {
        let full = format!("{path}/{marker}");
        let what = format!("recording the new size as {}", self.full(&full));
        // `mkdir` reports failures and still exits 0: the `cd` after it tells.
        let ran = self
            .run(&format!("mkdir \"{full}\"; cd \"{full}\""))
            .await
            .map_err(|f| f.into_error(&what))?;
        // A file of that name (made meanwhile) records the same size for the guest.
        let there = ran.code == Some(0)
            || nt_statuses(&ran.text).last() == Some(&"NT_STATUS_NOT_A_DIRECTORY");
        if there {
            return Ok(());
        }
        Err(ran.failure().into_error(&what))
    }
}

/// The entries of an `ls` listing (see the module notes); lines that are not entries (the
/// free-blocks total, `NT_STATUS_...` reports) are skipped, as is an entry whose name the
/// columns leave in doubt.
pub(super) fn parse_listing(text: &str) -> Vec<Listed> {
    text.lines().filter_map(parse_entry).collect()
}

/// Attribute letters `smbclient` prints (`attrib_string`: volume, directory, archive,
/// hidden, system, normal, read-only, device, temporary, sparse, reparse point, compressed,
/// offline, not indexed, encrypted).
const ATTRIBUTES: &str = "VDAHSNRdtsrcone";

/// One entry line, read from the right: the date (five words), the size, the attributes
/// (absent when the server sets none), and the rest is the name.
fn parse_entry(line: &str) -> Option<Listed> {
    let mut rest = line.strip_prefix("  ")?.trim_end();
    let mut words = [""; 6];
    for w in &mut words {
        let (before, word) = rest.rsplit_once(' ')?;
        *w = word;
        rest = before.trim_end();
    }
    let [year, time, day, month, weekday, size] = words;
    let date_ok = year.len() == 4
        && year.bytes().all(|b| b.is_ascii_digit())
        && time.len() == 8
        && time.bytes().filter(|b| *b == b':').count() == 2
        && !day.is_empty()
        && day.bytes().all(|b| b.is_ascii_digit())
        && month.len() == 3
        && weekday.len() == 3;
    if !date_ok {
        return None;
    }
    let size: u64 = size.parse().ok()?;
    let is_attrs = |w: &str| !w.is_empty() && w.chars().all(|c| ATTRIBUTES.contains(c));
    let (name, attrs) = match rest.rsplit_once(' ') {
        Some((name, attrs)) if is_attrs(attrs) && !name.trim_end().is_empty() => {
            (name.trim_end(), attrs)
        }
        // No attributes: all of it is the name.
        _ => (rest, ""),
    };
    if name.is_empty() {
        return None;
    }
    Some(Listed {
        name: name.to_string(),
        dir: attrs.contains('D'),
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::smb::fixtures::{creds, fake, share};

    /// What smbclient 4.17.12 printed for a volume directory (`ls "<dir>/*"`).
    const LISTING: &str =
        "  .                                   D        0  Mon Nov 30 19:42:51 2026
  ..                                  D        0  Mon Nov 30 19:42:51 2026
  cnfs-volume.size.1073745920         D        0  Mon Nov 30 19:42:51 2026
  .hidden                             H        2  Mon Nov 30 19:42:51 2026
  name with  spaces                   N        1  Mon Nov 30 19:42:51 2026
  cnfs-volume.size.70368744177664      D        0  Mon Dec  2 09:02:01 2026
  cnfs-volume.luks2                   N 3221225472  Mon Nov 30 19:42:51 2026

\t\t264212084 blocks of size 1024. 16071908 blocks available
";

    fn entry(name: &str, dir: bool, size: u64) -> Listed {
        Listed {
            name: name.into(),
            dir,
            size,
        }
    }

    #[test]
    fn a_listing_gives_each_entrys_name_kind_and_size() {
        assert_eq!(
            parse_listing(LISTING),
            [
                entry(".", true, 0),
                entry("..", true, 0),
                entry("cnfs-volume.size.1073745920", true, 0),
                entry(".hidden", false, 2),
                entry("name with  spaces", false, 1),
                entry("cnfs-volume.size.70368744177664", true, 0),
                entry("cnfs-volume.luks2", false, 3 << 30),
            ]
        );
        // A server that sets no attribute: the name is still whole; what is not an entry is
        // skipped.
        assert_eq!(
            parse_listing(
                "  cnfs-volume.luks2                          134217728  Tue Jan  6 01:02:03 2026\n\
                 NT_STATUS_NO_SUCH_FILE listing \\k8s\\pvc\\cnfs-volume.*\n\
                 \x20 cnfs-volume.luks2   N many  Tue Jan  6 01:02:03 2026\n\
                 \x20 short line\n"
            ),
            [entry("cnfs-volume.luks2", false, 128 << 20)]
        );
    }

    /// A fake whose `ls` prints `listing` (exit 0) and that logs every `--command`.
    fn script(listing: &str, log: &std::path::Path) -> String {
        format!(
            r#"for a in "$@"; do [ "$prev" = --command ] && c=$a; prev=$a; done
            echo "$c" >> {log}
            case "$c" in ls*) printf '%s\n' '{listing}';; esac
            exit 0"#,
            log = log.display()
        )
    }

    fn commands(log: &std::path::Path) -> Vec<String> {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[tokio::test]
    async fn a_larger_size_makes_its_marker_then_removes_the_smaller_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("commands");
        let listing = "  cnfs-volume.size.1073745920         D        0  Mon Nov 30 19:42:51 2026\n  cnfs-volume.luks2                   N 1073741824  Mon Nov 30 19:42:51 2026";
        let (s, c) = (share(), creds());
        let got = fake(&s, &c, &script(listing, &log))
            .record_container_size("k8s/pvc-1", 2 << 30)
            .await
            .expect("recorded");
        assert_eq!(got, Some(2 << 30));
        assert_eq!(
            commands(&log),
            [
                "ls \"k8s/pvc-1/cnfs-volume.*\"; cd \"k8s/pvc-1\"",
                "mkdir \"k8s/pvc-1/cnfs-volume.size.2147483648\"; \
                 cd \"k8s/pvc-1/cnfs-volume.size.2147483648\"",
                "rmdir \"k8s/pvc-1/cnfs-volume.size.1073745920\"",
            ]
        );
        // A directory with no container and no marker yet (smbclient: no match, exit 0):
        // the marker, and nothing to remove.
        let log = dir.path().join("commands-empty");
        let empty = r"NT_STATUS_NO_SUCH_FILE listing \k8s\pvc-2\cnfs-volume.*";
        let got = fake(&s, &c, &script(empty, &log))
            .record_container_size("k8s/pvc-2", 1 << 30)
            .await
            .expect("recorded");
        assert_eq!(got, Some(1 << 30));
        assert_eq!(
            commands(&log),
            [
                "ls \"k8s/pvc-2/cnfs-volume.*\"; cd \"k8s/pvc-2\"",
                "mkdir \"k8s/pvc-2/cnfs-volume.size.1073741824\"; \
                 cd \"k8s/pvc-2/cnfs-volume.size.1073741824\"",
            ]
        );
    }

    #[tokio::test]
    async fn a_size_recorded_already_or_a_longer_container_writes_nothing() {
        let (s, c) = (share(), creds());
        for (listing, asked, answer) in [
            // The same size again.
            (
                "  cnfs-volume.size.2147483648         D        0  Mon Nov 30 19:42:51 2026",
                2 << 30,
                2 << 30,
            ),
            // Smaller than a marker: never shrinks.
            (
                "  cnfs-volume.size.2147483648         D        0  Mon Nov 30 19:42:51 2026",
                1 << 30,
                2 << 30,
            ),
            // The container the guest grew is longer than asked.
            (
                "  cnfs-volume.luks2                   N 3221225472  Mon Nov 30 19:42:51 2026",
                2 << 30,
                3 << 30,
            ),
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            let log = dir.path().join("commands");
            let got = fake(&s, &c, &script(listing, &log))
                .record_container_size("pvc-1", asked)
                .await
                .expect("answered");
            assert_eq!(got, Some(answer), "{listing}");
            assert_eq!(commands(&log).len(), 1, "only the listing: {listing}");
        }
        // A directory named as the container is no container.
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("commands");
        let listing =
            "  cnfs-volume.luks2                   D 3221225472  Mon Nov 30 19:42:51 2026";
        let got = fake(&s, &c, &script(listing, &log))
            .record_container_size("pvc-1", 1 << 30)
            .await
            .expect("recorded");
        assert_eq!(got, Some(1 << 30));
        assert_eq!(commands(&log).len(), 2, "{:?}", commands(&log));
    }

    #[tokio::test]
    async fn a_missing_directory_is_none_and_an_unreadable_one_writes_nothing() {
        let (s, c) = (share(), creds());
        let missing = r#"echo 'NT_STATUS_OBJECT_NAME_NOT_FOUND listing \pvc\cnfs-volume.*'; echo 'cd \pvc\: NT_STATUS_OBJECT_NAME_NOT_FOUND'; exit 1"#;
        assert_eq!(
            fake(&s, &c, missing)
                .record_container_size("pvc", 1 << 30)
                .await
                .expect("answered"),
            None
        );
        let file = r#"echo 'NT_STATUS_NOT_A_DIRECTORY listing \pvc\cnfs-volume.*'; echo 'cd \pvc\: NT_STATUS_NOT_A_DIRECTORY'; exit 1"#;
        match fake(&s, &c, file)
            .record_container_size("pvc", 1 << 30)
            .await
        {
            Err(BackendError::Invalid(m)) => assert!(
                m.starts_with("name: //127.0.0.1/data/pvc exists and is not a directory"),
                "{m}"
            ),
            other => panic!("{other:?}"),
        }
        // The directory is there but its listing is refused: no marker is guessed at.
        let denied = r#"case "$*" in *mkdir*) echo made >&2; exit 9;; esac
            echo 'NT_STATUS_ACCESS_DENIED listing \pvc\cnfs-volume.*'; exit 0"#;
        match fake(&s, &c, denied)
            .record_container_size("pvc", 1 << 30)
            .await
        {
            Err(BackendError::PermissionDenied(m)) => assert!(
                m.starts_with(
                    "reading the recorded sizes in //127.0.0.1/data/pvc: \
                     NT_STATUS_ACCESS_DENIED listing"
                ),
                "{m}"
            ),
            other => panic!("{other:?}"),
        }
        // A marker that cannot be made is the error; no smaller marker is removed then.
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("commands");
        let refused = format!(
            r#"for a in "$@"; do [ "$prev" = --command ] && c=$a; prev=$a; done
            echo "$c" >> {log}
            case "$c" in
              ls*) echo '  cnfs-volume.size.1073745920         D        0  Mon Nov 30 19:42:51 2026'; exit 0;;
              mkdir*) echo 'NT_STATUS_MEDIA_WRITE_PROTECTED making remote directory \pvc\x'; echo 'cd \pvc\x\: NT_STATUS_OBJECT_NAME_NOT_FOUND'; exit 1;;
            esac
            exit 0"#,
            log = log.display()
        );
        match fake(&s, &c, &refused)
            .record_container_size("pvc", 2 << 30)
            .await
        {
            Err(BackendError::PermissionDenied(m)) => assert!(
                m.starts_with(
                    "recording the new size as \
                     //127.0.0.1/data/pvc/cnfs-volume.size.2147483648: \
                     NT_STATUS_MEDIA_WRITE_PROTECTED"
                ),
                "{m}"
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(commands(&log).len(), 2, "{:?}", commands(&log));
        // Bad paths never reach smbclient.
        match fake(&s, &c, "exit 9")
            .record_container_size("../up", 1 << 30)
            .await
        {
            Err(BackendError::Invalid(m)) => assert!(m.starts_with("path: "), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}
