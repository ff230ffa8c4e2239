//! A luks2 volume's recorded sizes (ControllerExpandVolume): empty directories
//! `cnfs-volume.size.<bytes>` in the volume's directory, beside the container
//! `cnfs-volume.luks2`. Kubernetes never changes a volume's context, whose `size` is the size
//! the volume was created with, so the new size goes on the share, where the guest that
//! mounts the volume next reads it (the largest well-formed name wins, of any file type).

use nfs3_client::nfs3_types::nfs3::{
    diropargs3, filename3, ftype3, nfs_fh3, nfsstat3, sattr3, MKDIR3args, Nfs3Option, Nfs3Result,
};

use crate::backend::BackendError;
use crate::encryption::{self, Growth, SizeEntry};

use super::errors::nfs_error;
use super::session::Session;

/// A size marker's mode: it holds nothing; only its name counts.
pub(super) const MARKER_MODE: u32 = 0o755;

impl<'a> Session<'a> {
    /// Records `size` for the luks2 volume in directory `name` (see
    /// [`super::NfsShare::record_container_size`]): `None` when the directory does not exist.
    pub(super) async fn record_size(
        &mut self,
        name: &str,
        size: u64,
    ) -> Result<Option<u64>, BackendError> {
        let Some((dir, _)) = self.volume_dir(name).await? else {
            return Ok(None);
        };
        let mut markers = Vec::new();
        let mut container = None;
        for e in self.list_dir(&dir, name).await? {
            let Ok(entry) = std::str::from_utf8(&e.name) else {
                continue;
            };
            match encryption::size_entry(entry) {
                Some(SizeEntry::Marker(n)) => markers.push(n),
                Some(SizeEntry::Container) => {
                    let path = format!("{name}/{entry}");
                    let attrs = match e.attrs {
                        Some(a) => Some(a),
                        None => self.lookup(&dir, &e.name, &path).await?.map(|(_, a)| a),
                    };
                    // Only a regular file is a container (the guest opens nothing else).
                    container = attrs.filter(|a| a.type_ == ftype3::NF3REG).map(|a| a.size);
                }
                None => {}
            }
        }
        let (size, stale) = match encryption::growth(size, &markers, container) {
            Growth::Recorded(n) => return Ok(Some(n)),
            Growth::Record { size, stale } => (size, stale),
        };
        let marker = encryption::size_marker(size);
        self.make_marker(&dir, name, &marker).await?;
        // The new marker exists: the smaller ones say nothing more. Best effort: one left
        // behind is ignored by the guest (the largest wins), and RMDIR never removes a
        // non-empty directory or anything but a directory.
        for old in stale {
            let old = encryption::size_marker(old);
            let _ = self
                .rmdir(&dir, old.as_bytes(), &format!("{name}/{old}"))
                .await;
        }
        Ok(Some(size))
    }

    /// MKDIR of marker `marker` in volume directory `dir` (`name`); one that exists already
    /// (made meanwhile) is the same record: the guest reads names.
    async fn make_marker(
        &mut self,
        dir: &nfs_fh3,
        name: &str,
        marker: &str,
    ) -> Result<(), BackendError> {
        let args = MKDIR3args {
            where_: diropargs3 {
                dir: dir.clone(),
                name: filename3::from(marker.as_bytes()),
            },
            attributes: sattr3 {
                mode: Nfs3Option::Some(MARKER_MODE),
                ..Default::default()
            },
        };
        match self.nfs.mkdir(&args).await.map_err(|e| self.rpc(e))? {
            Nfs3Result::Ok(_) | Nfs3Result::Err((nfsstat3::NFS3ERR_EXIST, _)) => Ok(()),
            Nfs3Result::Err((stat, _)) => Err(nfs_error(
                stat,
                format!(
                    "NFS server {}: recording the new size as {}",
                    self.server(),
                    self.full(&format!("{name}/{marker}"))
                ),
            )),
        }
    }
}
