//! One mounted export: portmapper, MOUNT and NFS connections and the export's root handle;
//! looking names up and making a volume's directory.

use std::net::SocketAddr;
use std::time::Duration;

use nfs3_client::nfs3_types::mount::{dirpath, mountstat3};
use nfs3_client::nfs3_types::nfs3::{
    diropargs3, fattr3, filename3, ftype3, nfs_fh3, nfsstat3, sattr3, GETATTR3args, LOOKUP3args,
    MKDIR3args, Nfs3Option, Nfs3Result, SETATTR3args,
};
use nfs3_client::nfs3_types::rpc::{auth_flavor, opaque_auth};
use nfs3_client::nfs3_types::xdr_codec::Opaque;
use nfs3_client::{MountClient, MountError, Nfs3Client, PortmapperClient, RpcError};

use crate::backend::BackendError;

use super::errors::{mount_error, nfs_error, rpc_error};
use super::rpc::{connect, credential, getport, Io};
use super::share::NfsShare;

/// Upper bound for MOUNT `UMNT` at the end of an operation: the work is done by then, so a
/// slow or lost unmount must not eat the caller's remaining time.
pub(super) const UMNT_GRACE: Duration = Duration::from_secs(2);

/// Exports named in a "no such export" message, at most.
pub(super) const MAX_EXPORTS_SHOWN: usize = 8;

/// One mounted export: MOUNT and NFS connections plus the export's root handle.
pub(super) struct Session<'a> {
    pub(super) share: &'a NfsShare,
    pub(super) mount: MountClient<Io>,
    pub(super) nfs: Nfs3Client<Io>,
    pub(super) root: nfs_fh3,
}

impl<'a> Session<'a> {
    /// Portmapper (first address that accepts) → connections to MOUNT and NFS → MNT. MNT comes
    /// last, so a failure to reach the NFS port leaves no mount entry behind on the server.
    pub(super) async fn open(share: &'a NfsShare) -> Result<Session<'a>, BackendError> {
        let addrs = share.addresses().await?;
        let server = &share.server;
        let mut last_err = None;
        let mut found = None;
        for ip in addrs {
            let pm_addr = SocketAddr::new(ip, nfs3_client::nfs3_types::portmap::PMAP_PORT);
            match connect(server, "portmapper", pm_addr).await {
                Ok(io) => {
                    found = Some((ip, io));
                    break;
                }
                Err(e) => last_err = Some(e),
            }
        }
        let Some((ip, pm_io)) = found else {
            return Err(last_err.unwrap_or_else(|| {
                BackendError::Unavailable(format!("NFS server {server}: no address to try"))
            }));
        };
        let mut pm = PortmapperClient::new(pm_io);
        let mount_port = getport(
            &mut pm,
            server,
            "MOUNT v3",
            nfs3_client::nfs3_types::mount::PROGRAM,
            nfs3_client::nfs3_types::mount::VERSION,
        )
        .await?;
        let nfs_port = match share.port {
            Some(p) => p,
            None => {
                getport(
                    &mut pm,
                    server,
                    "NFS v3",
                    nfs3_client::nfs3_types::nfs3::PROGRAM,
                    nfs3_client::nfs3_types::nfs3::VERSION,
                )
                .await?
            }
        };
        drop(pm);

        let nfs_io = connect(server, "NFS", SocketAddr::new(ip, nfs_port)).await?;
        let mount_io = connect(server, "MOUNT", SocketAddr::new(ip, mount_port)).await?;
        let mut mount = MountClient::new_with_auth(mount_io, credential(), opaque_auth::default());
        let nfs = Nfs3Client::new_with_auth(nfs_io, credential(), opaque_auth::default());

        let path = dirpath(Opaque::borrowed(share.export.as_bytes()));
        let ok = match mount.mnt(path).await {
            Ok(ok) => ok,
            // Servers answer "access denied" also for paths they do not export at all
            // (ganesha, Linux mountd): their export list tells the two apart.
            Err(MountError::Denied(
                stat @ (mountstat3::MNT3ERR_ACCES | mountstat3::MNT3ERR_PERM),
            )) => {
                let listed = match mount.export().await {
                    Ok(list) => Some(
                        list.into_inner()
                            .into_iter()
                            .map(|n| String::from_utf8_lossy(&n.ex_dir.0).into_owned())
                            .collect::<Vec<_>>(),
                    ),
                    Err(_) => None,
                };
                return Err(match listed {
                    Some(list) if !is_exported(&share.export, &list) => {
                        let shown = list.len().min(MAX_EXPORTS_SHOWN);
                        let more = if list.len() > shown { ", …" } else { "" };
                        BackendError::NotFound(format!(
                            "NFS server {server} does not export {} ({stat}; it exports {}{more})",
                            share.export,
                            list[..shown].join(", ")
                        ))
                    }
                    _ => mount_error(MountError::Denied(stat), server, &share.export),
                });
            }
            Err(e) => return Err(mount_error(e, server, &share.export)),
        };
        let flavors = &ok.auth_flavors;
        if !flavors.is_empty() && !flavors.contains(&(auth_flavor::AUTH_UNIX as u32)) {
            let s = Session {
                share,
                mount,
                nfs,
                root: nfs_fh3::default(),
            };
            s.close().await;
            return Err(BackendError::PermissionDenied(format!(
                "NFS server {server}: export {} accepts only security flavors {flavors:?}, \
                 this client speaks AUTH_SYS (1) only",
                share.export
            )));
        }
        let root = nfs_fh3 {
            data: Opaque::owned(ok.fhandle.0.to_vec()),
        };
        Ok(Session {
            share,
            mount,
            nfs,
            root,
        })
    }

    /// MOUNT `UMNT` (best effort, briefly bounded), then both connections close on drop.
    pub(super) async fn close(mut self) {
        let path = dirpath(Opaque::borrowed(self.share.export.as_bytes()));
        let _ = tokio::time::timeout(UMNT_GRACE, self.mount.umnt(path)).await;
    }

    pub(super) fn server(&self) -> &str {
        &self.share.server
    }

    /// `<export>/<rel>` for messages.
    pub(super) fn full(&self, rel: &str) -> String {
        format!("{}/{}", self.share.export.trim_end_matches('/'), rel)
    }

    pub(super) fn rpc(&self, e: RpcError) -> BackendError {
        rpc_error(e, self.server(), "NFS")
    }

    /// LOOKUP without following symlinks; `None` when the name does not exist.
    pub(super) async fn lookup(
        &mut self,
        dir: &nfs_fh3,
        name: &[u8],
        path: &str,
    ) -> Result<Option<(nfs_fh3, fattr3)>, BackendError> {
        let args = LOOKUP3args {
            what: diropargs3 {
                dir: dir.clone(),
                name: filename3::from(name),
            },
        };
        let res = self.nfs.lookup(&args).await.map_err(|e| self.rpc(e))?;
        match res {
            Nfs3Result::Ok(ok) => {
                let attrs = match ok.obj_attributes {
                    Nfs3Option::Some(a) => a,
                    Nfs3Option::None => self.getattr(&ok.object, path).await?,
                };
                Ok(Some((ok.object, attrs)))
            }
            Nfs3Result::Err((nfsstat3::NFS3ERR_NOENT, _)) => Ok(None),
            Nfs3Result::Err((stat, _)) => Err(nfs_error(
                stat,
                format!(
                    "NFS server {}: looking up {}",
                    self.server(),
                    self.full(path)
                ),
            )),
        }
    }

    pub(super) async fn getattr(
        &mut self,
        fh: &nfs_fh3,
        path: &str,
    ) -> Result<fattr3, BackendError> {
        let args = GETATTR3args { object: fh.clone() };
        match self.nfs.getattr(&args).await.map_err(|e| self.rpc(e))? {
            Nfs3Result::Ok(ok) => Ok(ok.obj_attributes),
            Nfs3Result::Err((stat, _)) => Err(nfs_error(
                stat,
                format!(
                    "NFS server {}: reading attributes of {}",
                    self.server(),
                    self.full(path)
                ),
            )),
        }
    }

    pub(super) async fn create_dir(&mut self, name: &str, mode: u32) -> Result<(), BackendError> {
        let root = self.root.clone();
        if let Some((_, attrs)) = self.lookup(&root, name.as_bytes(), name).await? {
            return exists_as_dir(&attrs, &self.full(name));
        }
        let args = MKDIR3args {
            where_: diropargs3 {
                dir: root.clone(),
                name: filename3::from(name.as_bytes()),
            },
            attributes: sattr3 {
                mode: Nfs3Option::Some(mode),
                ..Default::default()
            },
        };
        let res = self.nfs.mkdir(&args).await.map_err(|e| self.rpc(e))?;
        let (fh, attrs) = match res {
            Nfs3Result::Ok(ok) => match (ok.obj, ok.obj_attributes) {
                (Nfs3Option::Some(fh), Nfs3Option::Some(a)) => (fh, a),
                _ => match self.lookup(&root, name.as_bytes(), name).await? {
                    Some(found) => found,
                    None => {
                        return Err(BackendError::Failed(format!(
                            "NFS server {}: {} vanished right after it was created",
                            self.server(),
                            self.full(name)
                        )))
                    }
                },
            },
            // Someone else created it between our LOOKUP and MKDIR: same outcome as above.
            Nfs3Result::Err((nfsstat3::NFS3ERR_EXIST, _)) => {
                return match self.lookup(&root, name.as_bytes(), name).await? {
                    Some((_, attrs)) => exists_as_dir(&attrs, &self.full(name)),
                    None => Err(BackendError::Failed(format!(
                        "NFS server {}: {} exists and does not",
                        self.server(),
                        self.full(name)
                    ))),
                };
            }
            Nfs3Result::Err((stat, _)) => {
                return Err(nfs_error(
                    stat,
                    format!("NFS server {}: creating {}", self.server(), self.full(name)),
                ))
            }
        };
        // Servers may apply a umask to MKDIR's mode; the volume needs exactly `mode`.
        if attrs.mode & 0o7777 != mode {
            let args = SETATTR3args {
                object: fh,
                new_attributes: sattr3 {
                    mode: Nfs3Option::Some(mode),
                    ..Default::default()
                },
                guard: Nfs3Option::None,
            };
            if let Nfs3Result::Err((stat, _)) =
                self.nfs.setattr(&args).await.map_err(|e| self.rpc(e))?
            {
                return Err(nfs_error(
                    stat,
                    format!(
                        "NFS server {}: setting mode {mode:o} on {}",
                        self.server(),
                        self.full(name)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Looks `name` up in the export root for a delete: `None` when missing, `Invalid` when
    /// it is not a directory.
    pub(super) async fn volume_dir(
        &mut self,
        name: &str,
    ) -> Result<Option<(nfs_fh3, fattr3)>, BackendError> {
        let root = self.root.clone();
        match self.lookup(&root, name.as_bytes(), name).await? {
            None => Ok(None),
            Some((fh, attrs)) if attrs.type_ == ftype3::NF3DIR => Ok(Some((fh, attrs))),
            Some((_, attrs)) => Err(BackendError::Invalid(format!(
                "name: {} is a {}, not a directory; leaving it alone",
                self.full(name),
                kind(attrs.type_)
            ))),
        }
    }
}

/// Whether `path` is one of the server's `exports` or below one (servers let clients mount
/// subdirectories of an export). Trailing slashes do not matter.
pub(super) fn is_exported(path: &str, exports: &[String]) -> bool {
    let norm = |p: &str| {
        let t = p.trim_end_matches('/');
        if t.is_empty() {
            "/".to_string()
        } else {
            t.to_string()
        }
    };
    let path = norm(path);
    exports.iter().map(|e| norm(e)).any(|e| {
        path == e
            || e == "/"
            || path
                .strip_prefix(&e)
                .is_some_and(|rest| rest.starts_with('/'))
    })
}

pub(super) fn exists_as_dir(attrs: &fattr3, path: &str) -> Result<(), BackendError> {
    if attrs.type_ == ftype3::NF3DIR {
        Ok(())
    } else {
        Err(BackendError::Invalid(format!(
            "name: {path} exists and is a {}, not a directory",
            kind(attrs.type_)
        )))
    }
}

pub(super) fn kind(t: ftype3) -> &'static str {
    match t {
        ftype3::NF3REG => "regular file",
        ftype3::NF3DIR => "directory",
        ftype3::NF3BLK => "block device",
        ftype3::NF3CHR => "character device",
        ftype3::NF3LNK => "symlink",
        ftype3::NF3SOCK => "socket",
        ftype3::NF3FIFO => "fifo",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exported_means_listed_or_below_a_listed_path() {
        let list = vec!["/export".to_string(), "/srv/nfs/".to_string()];
        assert!(is_exported("/export", &list));
        assert!(is_exported("/export/", &list));
        assert!(is_exported("/export/sub", &list));
        assert!(is_exported("/srv/nfs", &list));
        assert!(!is_exported("/exportx", &list));
        assert!(!is_exported("/no-such-export", &list));
        assert!(!is_exported("/srv", &list));
        assert!(!is_exported("/x", &[]));
        assert!(is_exported("/anything", &["/".to_string()]));
    }
}
