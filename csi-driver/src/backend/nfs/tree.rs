//! Removing a volume's directory tree (listing, then removing depth-first, never following
//! a symlink or crossing into another file system) and archiving it under a free name.

use nfs3_client::nfs3_types::nfs3::{
    cookieverf3, diropargs3, fattr3, filename3, ftype3, nfs_fh3, nfsstat3, Nfs3Option, Nfs3Result,
    READDIR3args, READDIRPLUS3args, REMOVE3args, RENAME3args, RMDIR3args,
};

use crate::backend::BackendError;

use super::errors::nfs_error;
use super::rpc::unix_seconds;
use super::session::Session;
use super::share::NAME_MAX;

/// Prefix of an archived volume's directory.
pub(super) const ARCHIVE_PREFIX: &str = "archived-";

/// Bytes asked for per READDIR(PLUS) reply: small enough to come back as one RPC record
/// (the client library rejects fragmented replies).
pub(super) const READDIR_BYTES: u32 = 32 * 1024;

/// Tries at a free `archived-<name>-<secs>[-<n>]` before giving up.
pub(super) const ARCHIVE_TRIES: u32 = 100;

/// A directory still to be emptied and removed by [`Session::delete_tree`].
#[derive(Clone)]
pub(super) struct PendingDir {
    pub(super) parent: nfs_fh3,
    pub(super) name: Vec<u8>,
    pub(super) fh: nfs_fh3,
    pub(super) fsid: u64,
    pub(super) path: String,
}

/// A directory entry with what is known about it from the listing.
pub(super) struct Entry {
    pub(super) name: Vec<u8>,
    pub(super) fh: Option<nfs_fh3>,
    pub(super) attrs: Option<fattr3>,
}

impl<'a> Session<'a> {
    /// Depth-first removal without recursion: a directory is listed, its non-directories are
    /// removed and its subdirectories stacked; once a listing shows no subdirectory left, the
    /// directory itself is removed. Each directory's full listing is read before anything in
    /// it is removed, so removals never disturb a READDIR cookie in use.
    pub(super) async fn delete_tree(&mut self, name: &str) -> Result<(), BackendError> {
        let Some((fh, attrs)) = self.volume_dir(name).await? else {
            return Ok(());
        };
        let mut stack = vec![PendingDir {
            parent: self.root.clone(),
            name: name.as_bytes().to_vec(),
            fh,
            fsid: attrs.fsid,
            path: name.to_string(),
        }];
        while let Some(dir) = stack.last().cloned() {
            let entries = self.list_dir(&dir.fh, &dir.path).await?;
            let mut subdirs = Vec::new();
            for e in entries {
                let path = format!("{}/{}", dir.path, String::from_utf8_lossy(&e.name));
                let (fh, attrs) = match (e.fh, e.attrs) {
                    (Some(fh), Some(a)) => (fh, a),
                    _ => match self.lookup(&dir.fh, &e.name, &path).await? {
                        Some(found) => found,
                        None => continue, // gone meanwhile
                    },
                };
                if attrs.type_ == ftype3::NF3DIR {
                    if attrs.fsid != dir.fsid {
                        return Err(BackendError::Failed(format!(
                            "NFS server {}: {} is on another file system; refusing to delete \
                             across it",
                            self.server(),
                            self.full(&path)
                        )));
                    }
                    subdirs.push(PendingDir {
                        parent: dir.fh.clone(),
                        name: e.name,
                        fh,
                        fsid: attrs.fsid,
                        path,
                    });
                } else {
                    self.remove(&dir.fh, &e.name, &path).await?;
                }
            }
            if subdirs.is_empty() {
                self.rmdir(&dir.parent, &dir.name, &dir.path).await?;
                stack.pop();
            } else {
                stack.extend(subdirs);
            }
        }
        Ok(())
    }

    /// Every entry of a directory except `.` and `..`: READDIRPLUS (names, handles and
    /// attributes in one go), or plain READDIR on servers without it.
    pub(super) async fn list_dir(
        &mut self,
        dir: &nfs_fh3,
        path: &str,
    ) -> Result<Vec<Entry>, BackendError> {
        let mut out = Vec::new();
        let mut cookie = 0;
        let mut verf = cookieverf3::default();
        let mut plus = true;
        loop {
            let (entries, next_verf, eof) = if plus {
                let args = READDIRPLUS3args {
                    dir: dir.clone(),
                    cookie,
                    cookieverf: verf,
                    dircount: READDIR_BYTES,
                    maxcount: READDIR_BYTES,
                };
                match self.nfs.readdirplus(&args).await.map_err(|e| self.rpc(e))? {
                    Nfs3Result::Ok(ok) => {
                        let entries: Vec<(Entry, u64)> = ok
                            .reply
                            .entries
                            .into_inner()
                            .into_iter()
                            .map(|e| {
                                let entry = Entry {
                                    name: e.name.0.to_vec(),
                                    fh: match e.name_handle {
                                        Nfs3Option::Some(fh) => Some(fh),
                                        Nfs3Option::None => None,
                                    },
                                    attrs: match e.name_attributes {
                                        Nfs3Option::Some(a) => Some(a),
                                        Nfs3Option::None => None,
                                    },
                                };
                                (entry, e.cookie)
                            })
                            .collect();
                        (entries, ok.cookieverf, ok.reply.eof)
                    }
                    Nfs3Result::Err((nfsstat3::NFS3ERR_NOTSUPP, _)) if cookie == 0 => {
                        plus = false;
                        continue;
                    }
                    Nfs3Result::Err((stat, _)) => {
                        return Err(self.listing_error(stat, path));
                    }
                }
            } else {
                let args = READDIR3args {
                    dir: dir.clone(),
                    cookie,
                    cookieverf: verf,
                    count: READDIR_BYTES,
                };
                match self.nfs.readdir(&args).await.map_err(|e| self.rpc(e))? {
                    Nfs3Result::Ok(ok) => {
                        let entries = ok
                            .reply
                            .entries
                            .into_inner()
                            .into_iter()
                            .map(|e| {
                                let entry = Entry {
                                    name: e.name.0.to_vec(),
                                    fh: None,
                                    attrs: None,
                                };
                                (entry, e.cookie)
                            })
                            .collect();
                        (entries, ok.cookieverf, ok.reply.eof)
                    }
                    Nfs3Result::Err((stat, _)) => {
                        return Err(self.listing_error(stat, path));
                    }
                }
            };
            let had_entries = !entries.is_empty();
            for (entry, c) in entries {
                cookie = c;
                if entry.name != b"." && entry.name != b".." {
                    out.push(entry);
                }
            }
            verf = next_verf;
            if eof {
                return Ok(out);
            }
            if !had_entries {
                return Err(BackendError::Failed(format!(
                    "NFS server {}: listing {} returned no entries but no end either",
                    self.server(),
                    self.full(path)
                )));
            }
        }
    }

    pub(super) fn listing_error(&self, stat: nfsstat3, path: &str) -> BackendError {
        nfs_error(
            stat,
            format!("NFS server {}: listing {}", self.server(), self.full(path)),
        )
    }

    /// REMOVE of a non-directory (a symlink itself, never its target); already gone is fine.
    pub(super) async fn remove(
        &mut self,
        dir: &nfs_fh3,
        name: &[u8],
        path: &str,
    ) -> Result<(), BackendError> {
        let args = REMOVE3args {
            object: diropargs3 {
                dir: dir.clone(),
                name: filename3::from(name),
            },
        };
        match self.nfs.remove(&args).await.map_err(|e| self.rpc(e))? {
            Nfs3Result::Ok(_) | Nfs3Result::Err((nfsstat3::NFS3ERR_NOENT, _)) => Ok(()),
            Nfs3Result::Err((stat, _)) => Err(nfs_error(
                stat,
                format!("NFS server {}: removing {}", self.server(), self.full(path)),
            )),
        }
    }

    pub(super) async fn rmdir(
        &mut self,
        dir: &nfs_fh3,
        name: &[u8],
        path: &str,
    ) -> Result<(), BackendError> {
        let args = RMDIR3args {
            object: diropargs3 {
                dir: dir.clone(),
                name: filename3::from(name),
            },
        };
        match self.nfs.rmdir(&args).await.map_err(|e| self.rpc(e))? {
            Nfs3Result::Ok(_) | Nfs3Result::Err((nfsstat3::NFS3ERR_NOENT, _)) => Ok(()),
            Nfs3Result::Err((stat, _)) => Err(nfs_error(
                stat,
                format!(
                    "NFS server {}: removing directory {}",
                    self.server(),
                    self.full(path)
                ),
            )),
        }
    }

    /// Renames the volume's directory to the first free archive name. A free name is checked
    /// with LOOKUP first because an NFSv3 RENAME silently replaces an empty directory.
    pub(super) async fn archive(&mut self, name: &str) -> Result<(), BackendError> {
        if self.volume_dir(name).await?.is_none() {
            return Ok(());
        }
        let root = self.root.clone();
        let secs = unix_seconds();
        let mut target = None;
        for attempt in 0..=ARCHIVE_TRIES {
            let candidate = archive_name(name, secs, attempt)?;
            if self
                .lookup(&root, candidate.as_bytes(), &candidate)
                .await?
                .is_none()
            {
                target = Some(candidate);
                break;
            }
        }
        let Some(target) = target else {
            return Err(BackendError::Failed(format!(
                "NFS server {}: no free archive name for {} after {ARCHIVE_TRIES} tries",
                self.server(),
                self.full(name)
            )));
        };
        let args = RENAME3args {
            from: diropargs3 {
                dir: root.clone(),
                name: filename3::from(name.as_bytes()),
            },
            to: diropargs3 {
                dir: root,
                name: filename3::from(target.as_bytes()),
            },
        };
        match self.nfs.rename(&args).await.map_err(|e| self.rpc(e))? {
            Nfs3Result::Ok(_) => Ok(()),
            // Archived (or deleted) by someone else meanwhile: the volume is gone either way.
            Nfs3Result::Err((nfsstat3::NFS3ERR_NOENT, _)) => Ok(()),
            Nfs3Result::Err((stat, _)) => Err(nfs_error(
                stat,
                format!(
                    "NFS server {}: renaming {} to {target}",
                    self.server(),
                    self.full(name)
                ),
            )),
        }
    }
}

/// `archived-<name>`, then `archived-<name>-<secs>`, then `archived-<name>-<secs>-<n>`.
pub(super) fn archive_name(name: &str, secs: u64, attempt: u32) -> Result<String, BackendError> {
    let candidate = match attempt {
        0 => format!("{ARCHIVE_PREFIX}{name}"),
        1 => format!("{ARCHIVE_PREFIX}{name}-{secs}"),
        n => format!("{ARCHIVE_PREFIX}{name}-{secs}-{n}"),
    };
    if candidate.len() > NAME_MAX {
        return Err(BackendError::Invalid(format!(
            "name: too long to archive as {candidate:?} (over {NAME_MAX} bytes)"
        )));
    }
    Ok(candidate)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid(r: Result<(), BackendError>) -> String {
        match r {
            Err(BackendError::Invalid(m)) => m,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn archive_names_fall_back_to_seconds_then_a_counter() {
        assert_eq!(archive_name("v", 42, 0).ok().as_deref(), Some("archived-v"));
        assert_eq!(
            archive_name("v", 42, 1).ok().as_deref(),
            Some("archived-v-42")
        );
        assert_eq!(
            archive_name("v", 42, 3).ok().as_deref(),
            Some("archived-v-42-3")
        );
        let long = "x".repeat(250);
        assert!(invalid(archive_name(&long, 42, 0).map(|_| ())).starts_with("name:"));
    }
}
