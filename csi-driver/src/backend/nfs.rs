//! The NFS controller backend: creates, probes and removes a volume's directory on an NFS
//! share with a user-space NFSv3 client (portmapper → MOUNT → NFSv3, all over TCP), so the
//! controller needs no host mount and no capability.
//!
//! What the server must allow, because of how this client talks to it:
//! - **Source ports.** Connections come from a reserved port (665-1023) when the process may
//!   bind one (root, or an unprivileged pod with `net.ipv4.ip_unprivileged_port_start=0`),
//!   else from an ephemeral port, which the export must then accept: kernel nfsd needs
//!   `insecure`; nfs-ganesha accepts them unless `PrivilegedPort = true` (default `false`).
//! - **Root access to the share root.** Calls carry `AUTH_SYS` uid 0 / gid 0. Either the
//!   export must not squash root (`no_root_squash`, ganesha `Squash = No_Root_Squash`), or the
//!   share root must be writable by the user root is squashed to (e.g. mode 0777 or owned by
//!   `nobody`).
//! - **NFSv3 with MOUNT over TCP**, registered with the server's portmapper (port 111). The
//!   MOUNT port always comes from the portmapper; the NFS port may be given explicitly.
//!
//! Every operation opens its own connections, unmounts (MOUNT `UMNT`) and closes them at the
//! end, and is bounded as a whole by the caller's timeout, connection set-up included: a
//! black-holed server yields [`BackendError::Unavailable`], never a hang.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nfs3_client::nfs3_types::mount::{dirpath, mountstat3};
use nfs3_client::nfs3_types::nfs3::{
    cookieverf3, diropargs3, fattr3, filename3, ftype3, nfs_fh3, nfsstat3, sattr3, GETATTR3args,
    LOOKUP3args, MKDIR3args, Nfs3Option, Nfs3Result, READDIR3args, READDIRPLUS3args, REMOVE3args,
    RENAME3args, RMDIR3args, SETATTR3args,
};
use nfs3_client::nfs3_types::portmap::IPPROTO_TCP;
use nfs3_client::nfs3_types::rpc::{auth_flavor, auth_unix, opaque_auth};
use nfs3_client::nfs3_types::xdr_codec::Opaque;
use nfs3_client::tokio::TokioIo;
use nfs3_client::{MountClient, MountError, Nfs3Client, PortmapError, PortmapperClient, RpcError};
use tokio::net::TcpStream;

use super::{BackendError, OnDelete};

/// Mode of a directory made by [`NfsShare::create_dir`]: world-writable, because the pods that
/// use a volume run with arbitrary uids and the controller cannot know them.
pub const DEFAULT_DIR_MODE: u32 = 0o777;

/// The longest file name NFS servers accept in practice (`NAME_MAX` on Linux).
const NAME_MAX: usize = 255;
/// MOUNT protocol limit on an export path (`MNTPATHLEN`).
const EXPORT_MAX: usize = 1024;
/// Prefix of an archived volume's directory.
const ARCHIVE_PREFIX: &str = "archived-";
/// `AUTH_SYS` machine name sent with every call (servers only log it).
const MACHINE_NAME: &[u8] = b"cnfs-csi";
/// Upper bound for MOUNT `UMNT` at the end of an operation: the work is done by then, so a
/// slow or lost unmount must not eat the caller's remaining time.
const UMNT_GRACE: Duration = Duration::from_secs(2);
/// Bytes asked for per READDIR(PLUS) reply: small enough to come back as one RPC record
/// (the client library rejects fragmented replies).
const READDIR_BYTES: u32 = 32 * 1024;
/// Exports named in a "no such export" message, at most.
const MAX_EXPORTS_SHOWN: usize = 8;
/// Tries at a free `archived-<name>-<secs>[-<n>]` before giving up.
const ARCHIVE_TRIES: u32 = 100;

type Io = TokioIo<TcpStream>;

/// An NFS export on which volumes are directories directly below the export root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NfsShare {
    /// IP address (v4, v6, optionally in brackets) or host name of the server.
    pub server: String,
    /// NFS port; `None` asks the server's portmapper. (The MOUNT port always comes from the
    /// portmapper, so port 111 must be reachable either way.)
    pub port: Option<u16>,
    /// Absolute export path, as `showmount -e` lists it (or the NFSv4 pseudo path on servers
    /// that map MOUNT requests to it, like ganesha with `Mount_Path_Pseudo`).
    pub export: String,
}

impl NfsShare {
    /// Creates `<export>/<name>` with mode 0777 ([`DEFAULT_DIR_MODE`]) so pods with any uid can
    /// write to it. Idempotent: an existing directory is `Ok` (left as it is); an existing
    /// non-directory is [`BackendError::Invalid`].
    pub async fn create_dir(&self, name: &str, timeout: Duration) -> Result<(), BackendError> {
        self.create_dir_with_mode(name, DEFAULT_DIR_MODE, timeout)
            .await
    }

    /// [`create_dir`](Self::create_dir) with an explicit permission `mode` (at most 0o7777).
    /// The mode is set exactly, whatever umask the server applies; an existing directory keeps
    /// its mode.
    pub async fn create_dir_with_mode(
        &self,
        name: &str,
        mode: u32,
        timeout: Duration,
    ) -> Result<(), BackendError> {
        validate_name(name)?;
        validate_mode(mode)?;
        self.validate()?;
        self.bounded(timeout, async {
            let mut s = Session::open(self).await?;
            let r = s.create_dir(name, mode).await;
            s.close().await;
            r
        })
        .await
    }

    /// Whether `<export>/<name>` exists as a directory (a symlink to one does not count).
    pub async fn dir_exists(&self, name: &str, timeout: Duration) -> Result<bool, BackendError> {
        validate_name(name)?;
        self.validate()?;
        self.bounded(timeout, async {
            let mut s = Session::open(self).await?;
            let root = s.root.clone();
            let r = s
                .lookup(&root, name.as_bytes(), name)
                .await
                .map(|found| matches!(found, Some((_, a)) if a.type_ == ftype3::NF3DIR));
            s.close().await;
            r
        })
        .await
    }

    /// Applies `on_delete` to `<export>/<name>`:
    /// - `Retain`: nothing (not even a connection).
    /// - `Delete`: removes the directory and everything below it; symlinks are removed, never
    ///   followed, and the walk refuses to cross into another file system.
    /// - `Archive`: renames it to `archived-<name>` in the export root, or to
    ///   `archived-<name>-<unix seconds>` when that exists already.
    ///
    /// Idempotent: a missing directory is `Ok`. A non-directory under `name` is
    /// [`BackendError::Invalid`] (it was not made by this backend, so it is left alone).
    pub async fn delete_dir(
        &self,
        name: &str,
        on_delete: OnDelete,
        timeout: Duration,
    ) -> Result<(), BackendError> {
        validate_name(name)?;
        self.validate()?;
        if on_delete == OnDelete::Retain {
            return Ok(());
        }
        self.bounded(timeout, async {
            let mut s = Session::open(self).await?;
            let r = match on_delete {
                OnDelete::Retain => Ok(()),
                OnDelete::Delete => s.delete_tree(name).await,
                OnDelete::Archive => s.archive(name).await,
            };
            s.close().await;
            r
        })
        .await
    }

    /// Checks the share's own fields, so a bad StorageClass parameter is reported as such
    /// rather than as a network failure.
    pub fn validate(&self) -> Result<(), BackendError> {
        if self.server.trim().is_empty() {
            return Err(BackendError::Invalid("server: must not be empty".into()));
        }
        if self.port == Some(0) {
            return Err(BackendError::Invalid("port: must not be 0".into()));
        }
        if !self.export.starts_with('/') {
            return Err(BackendError::Invalid(format!(
                "export: must be an absolute path, got {}",
                crate::bounds::echo(&self.export)
            )));
        }
        if self.export.len() > EXPORT_MAX {
            return Err(BackendError::Invalid(format!(
                "export: longer than {EXPORT_MAX} bytes"
            )));
        }
        if self.export.contains('\0') {
            return Err(BackendError::Invalid(
                "export: must not contain a NUL byte".into(),
            ));
        }
        Ok(())
    }

    /// Runs `op` under one deadline; running out of it means the server did not answer.
    async fn bounded<T>(
        &self,
        timeout: Duration,
        op: impl std::future::Future<Output = Result<T, BackendError>>,
    ) -> Result<T, BackendError> {
        match tokio::time::timeout(timeout, op).await {
            Ok(r) => r,
            Err(_) => Err(BackendError::Unavailable(format!(
                "NFS server {} did not answer within {} s",
                self.server,
                fmt_secs(timeout)
            ))),
        }
    }

    /// The server's addresses, in resolver order (an IP literal is used as it is).
    async fn addresses(&self) -> Result<Vec<IpAddr>, BackendError> {
        let host = self.server.trim();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        let found = tokio::net::lookup_host((host, 0u16)).await.map_err(|e| {
            BackendError::Unavailable(format!("cannot resolve NFS server {host:?}: {e}"))
        })?;
        let mut ips: Vec<IpAddr> = Vec::new();
        for a in found {
            if !ips.contains(&a.ip()) {
                ips.push(a.ip());
            }
        }
        if ips.is_empty() {
            return Err(BackendError::Unavailable(format!(
                "NFS server name {host:?} resolves to no address"
            )));
        }
        Ok(ips)
    }
}

/// One mounted export: MOUNT and NFS connections plus the export's root handle.
struct Session<'a> {
    share: &'a NfsShare,
    mount: MountClient<Io>,
    nfs: Nfs3Client<Io>,
    root: nfs_fh3,
}

/// A directory still to be emptied and removed by [`Session::delete_tree`].
#[derive(Clone)]
struct PendingDir {
    parent: nfs_fh3,
    name: Vec<u8>,
    fh: nfs_fh3,
    fsid: u64,
    path: String,
}

/// A directory entry with what is known about it from the listing.
struct Entry {
    name: Vec<u8>,
    fh: Option<nfs_fh3>,
    attrs: Option<fattr3>,
}

impl<'a> Session<'a> {
    /// Portmapper (first address that accepts) → connections to MOUNT and NFS → MNT. MNT comes
    /// last, so a failure to reach the NFS port leaves no mount entry behind on the server.
    async fn open(share: &'a NfsShare) -> Result<Session<'a>, BackendError> {
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
    async fn close(mut self) {
        let path = dirpath(Opaque::borrowed(self.share.export.as_bytes()));
        let _ = tokio::time::timeout(UMNT_GRACE, self.mount.umnt(path)).await;
    }

    fn server(&self) -> &str {
        &self.share.server
    }

    /// `<export>/<rel>` for messages.
    fn full(&self, rel: &str) -> String {
        format!("{}/{}", self.share.export.trim_end_matches('/'), rel)
    }

    fn rpc(&self, e: RpcError) -> BackendError {
        rpc_error(e, self.server(), "NFS")
    }

    /// LOOKUP without following symlinks; `None` when the name does not exist.
    async fn lookup(
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

    async fn getattr(&mut self, fh: &nfs_fh3, path: &str) -> Result<fattr3, BackendError> {
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

    async fn create_dir(&mut self, name: &str, mode: u32) -> Result<(), BackendError> {
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
    async fn volume_dir(&mut self, name: &str) -> Result<Option<(nfs_fh3, fattr3)>, BackendError> {
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

    /// Depth-first removal without recursion: a directory is listed, its non-directories are
    /// removed and its subdirectories stacked; once a listing shows no subdirectory left, the
    /// directory itself is removed. Each directory's full listing is read before anything in
    /// it is removed, so removals never disturb a READDIR cookie in use.
    async fn delete_tree(&mut self, name: &str) -> Result<(), BackendError> {
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
    async fn list_dir(&mut self, dir: &nfs_fh3, path: &str) -> Result<Vec<Entry>, BackendError> {
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

    fn listing_error(&self, stat: nfsstat3, path: &str) -> BackendError {
        nfs_error(
            stat,
            format!("NFS server {}: listing {}", self.server(), self.full(path)),
        )
    }

    /// REMOVE of a non-directory (a symlink itself, never its target); already gone is fine.
    async fn remove(&mut self, dir: &nfs_fh3, name: &[u8], path: &str) -> Result<(), BackendError> {
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

    async fn rmdir(&mut self, dir: &nfs_fh3, name: &[u8], path: &str) -> Result<(), BackendError> {
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
    async fn archive(&mut self, name: &str) -> Result<(), BackendError> {
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

/// A TCP connection to `addr`; failures are "unavailable". The source port is a reserved one
/// (< 1024) when this process may bind one, because Linux nfsd refuses other ports unless an
/// export says `insecure`; an unprivileged controller gets that right without any capability
/// from the pod sysctl `net.ipv4.ip_unprivileged_port_start=0`. Otherwise an ephemeral port.
async fn connect(server: &str, service: &str, addr: SocketAddr) -> Result<Io, BackendError> {
    let stream = match connect_reserved(addr).await {
        Some(r) => r,
        None => TcpStream::connect(addr).await,
    };
    stream
        .map(|s| {
            let _ = s.set_nodelay(true);
            TokioIo::new(s)
        })
        .map_err(|e| {
            BackendError::Unavailable(format!(
                "NFS server {server}: cannot connect to {service} at {addr}: {e}"
            ))
        })
}

/// Connects from the highest free port in the range the kernel's own NFS client uses
/// (665-1023); `None` when this process may not bind such a port at all.
async fn connect_reserved(addr: SocketAddr) -> Option<std::io::Result<TcpStream>> {
    use std::io::ErrorKind::{AddrInUse, AddrNotAvailable};
    for port in (665..=1023u16).rev() {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        };
        let Ok(socket) = socket else { return None };
        let _ = socket.set_reuseaddr(true);
        let local = match addr {
            SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), port),
            SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), port),
        };
        match socket.bind(local) {
            Ok(()) => {}
            Err(e) if e.kind() == AddrInUse => continue,
            // EACCES: no right to reserved ports; anything else: do not insist either.
            Err(_) => return None,
        }
        match socket.connect(addr).await {
            // This 4-tuple is still in TIME_WAIT from an earlier call: try the next port.
            Err(e) if matches!(e.kind(), AddrInUse | AddrNotAvailable) => continue,
            r => return Some(r),
        }
    }
    None
}

/// Asks the portmapper for a program's TCP port.
async fn getport(
    pm: &mut PortmapperClient<Io>,
    server: &str,
    what: &str,
    prog: u32,
    vers: u32,
) -> Result<u16, BackendError> {
    pm.getport(prog, vers, IPPROTO_TCP)
        .await
        .map_err(|e| match e {
            PortmapError::ProgramUnavailable => BackendError::Unavailable(format!(
                "NFS server {server}: {what} over TCP is not registered with its portmapper \
                 (NFSv3 disabled, or the server not started yet)"
            )),
            PortmapError::InvalidPortValue(p) => BackendError::Failed(format!(
                "NFS server {server}: portmapper returned port {p} for {what}"
            )),
            PortmapError::Rpc(e) => rpc_error(e, server, "portmapper"),
        })
}

/// `AUTH_SYS` as uid 0 / gid 0: what creating a volume directory in the share root needs on
/// an export without root squashing.
fn credential() -> opaque_auth<'static> {
    opaque_auth::auth_unix(&auth_unix {
        stamp: unix_seconds() as u32,
        machinename: Opaque::borrowed(MACHINE_NAME),
        uid: 0,
        gid: 0,
        gids: Vec::new(),
    })
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Checks a volume name: one conservative path component, so it can never address anything
/// outside the export root.
pub fn validate_name(name: &str) -> Result<(), BackendError> {
    let bad = |why: &str| Err(BackendError::Invalid(format!("name: {why}")));
    if name.is_empty() {
        return bad("must not be empty");
    }
    if name.len() > NAME_MAX {
        return bad(&format!(
            "must be at most {NAME_MAX} bytes, is {}",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return bad(&format!("{name:?} is not a directory name"));
    }
    if name.contains('/') {
        return bad(&format!(
            "{name:?} must be a single path component (no '/')"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return bad(&format!(
            "{name:?} contains {c:?}; allowed are A-Z a-z 0-9 . _ -"
        ));
    }
    Ok(())
}

fn validate_mode(mode: u32) -> Result<(), BackendError> {
    if mode > 0o7777 {
        return Err(BackendError::Invalid(format!(
            "mode: {mode:o} is not a permission mode (at most 7777 octal)"
        )));
    }
    Ok(())
}

/// Whether `path` is one of the server's `exports` or below one (servers let clients mount
/// subdirectories of an export). Trailing slashes do not matter.
fn is_exported(path: &str, exports: &[String]) -> bool {
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

/// `archived-<name>`, then `archived-<name>-<secs>`, then `archived-<name>-<secs>-<n>`.
fn archive_name(name: &str, secs: u64, attempt: u32) -> Result<String, BackendError> {
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

fn exists_as_dir(attrs: &fattr3, path: &str) -> Result<(), BackendError> {
    if attrs.type_ == ftype3::NF3DIR {
        Ok(())
    } else {
        Err(BackendError::Invalid(format!(
            "name: {path} exists and is a {}, not a directory",
            kind(attrs.type_)
        )))
    }
}

fn kind(t: ftype3) -> &'static str {
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

/// What to tell the operator when the server refuses an operation.
fn access_hint(stat: nfsstat3) -> &'static str {
    match stat {
        nfsstat3::NFS3ERR_ACCES | nfsstat3::NFS3ERR_PERM => {
            " (if the export squashes root, the share root must be writable by the squashed user)"
        }
        nfsstat3::NFS3ERR_ROFS => " (the export is read-only)",
        _ => "",
    }
}

/// Classifies an NFSv3 status; `context` says which server and what was attempted.
fn nfs_error(stat: nfsstat3, context: String) -> BackendError {
    let msg = format!("{context}: {stat}{}", access_hint(stat));
    match stat {
        nfsstat3::NFS3ERR_PERM | nfsstat3::NFS3ERR_ACCES | nfsstat3::NFS3ERR_ROFS => {
            BackendError::PermissionDenied(msg)
        }
        nfsstat3::NFS3ERR_NOENT => BackendError::NotFound(msg),
        nfsstat3::NFS3ERR_NOTDIR | nfsstat3::NFS3ERR_NAMETOOLONG | nfsstat3::NFS3ERR_INVAL => {
            BackendError::Invalid(msg)
        }
        // "Try again later" (JUKEBOX) and a root handle that went stale (server restarted with
        // other handles): a retry with a fresh mount can succeed.
        nfsstat3::NFS3ERR_JUKEBOX | nfsstat3::NFS3ERR_STALE => BackendError::Unavailable(msg),
        _ => BackendError::Failed(msg),
    }
}

/// Classifies a MOUNT failure for `export`.
fn mount_error(e: MountError, server: &str, export: &str) -> BackendError {
    match e {
        MountError::Rpc(e) => rpc_error(e, server, "MOUNT"),
        MountError::Denied(stat) => {
            let msg = format!("NFS server {server} refused to mount export {export}: {stat}");
            match stat {
                mountstat3::MNT3ERR_NOENT | mountstat3::MNT3ERR_NOTDIR => {
                    BackendError::NotFound(msg)
                }
                mountstat3::MNT3ERR_PERM | mountstat3::MNT3ERR_ACCES => {
                    BackendError::PermissionDenied(msg)
                }
                mountstat3::MNT3ERR_INVAL | mountstat3::MNT3ERR_NAMETOOLONG => {
                    BackendError::Invalid(msg)
                }
                _ => BackendError::Failed(msg),
            }
        }
    }
}

/// Classifies an RPC-level failure talking to `service` on `server`.
fn rpc_error(e: RpcError, server: &str, service: &str) -> BackendError {
    let msg = format!("NFS server {server}: {service}: {e}");
    match e {
        RpcError::Io(_) => BackendError::Unavailable(msg),
        RpcError::Auth(_) => BackendError::PermissionDenied(msg),
        RpcError::ProgUnavail | RpcError::ProgMismatch { .. } => BackendError::Failed(format!(
            "{msg} (the server does not offer NFSv3/MOUNTv3 here)"
        )),
        _ => BackendError::Failed(msg),
    }
}

/// `3` for whole seconds, `1.5` otherwise.
fn fmt_secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        d.as_secs().to_string()
    } else {
        format!("{:.1}", d.as_secs_f64())
    }
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
    fn names_are_single_conservative_components() {
        for ok in ["pvc-1234", "a", "A.b_c-9", &"x".repeat(255), "..a", "a.."] {
            assert!(validate_name(ok).is_ok(), "{ok:?} should be accepted");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "/a",
            "a/",
            "a b",
            "ä",
            "a\0b",
            "a\\b",
            "a:b",
            "*",
            &"x".repeat(256),
        ] {
            let m = invalid(validate_name(bad));
            assert!(m.starts_with("name: "), "{bad:?}: {m}");
        }
        assert!(invalid(validate_name("")).contains("empty"));
        assert!(invalid(validate_name("a/b")).contains('/'));
        assert!(invalid(validate_name(&"x".repeat(256))).contains("255"));
    }

    #[test]
    fn shares_are_checked_before_any_network_use() {
        let good = NfsShare {
            server: "10.0.0.1".into(),
            port: None,
            export: "/export".into(),
        };
        assert!(good.validate().is_ok());
        let with = |f: &dyn Fn(&mut NfsShare)| {
            let mut s = good.clone();
            f(&mut s);
            invalid(s.validate())
        };
        assert!(with(&|s| s.server = " ".into()).starts_with("server:"));
        assert!(with(&|s| s.port = Some(0)).starts_with("port:"));
        assert!(with(&|s| s.export = "export".into()).starts_with("export:"));
        assert!(with(&|s| s.export = format!("/{}", "e".repeat(1024))).starts_with("export:"));
    }

    #[test]
    fn modes_are_permission_bits_only() {
        assert!(validate_mode(0o777).is_ok());
        assert!(validate_mode(0o7777).is_ok());
        assert!(invalid(validate_mode(0o10000)).starts_with("mode:"));
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

    #[test]
    fn nfs_statuses_map_to_actionable_kinds() {
        let k = |s| nfs_error(s, "ctx".into());
        assert!(matches!(
            k(nfsstat3::NFS3ERR_ACCES),
            BackendError::PermissionDenied(_)
        ));
        assert!(matches!(
            k(nfsstat3::NFS3ERR_PERM),
            BackendError::PermissionDenied(_)
        ));
        assert!(matches!(
            k(nfsstat3::NFS3ERR_ROFS),
            BackendError::PermissionDenied(_)
        ));
        assert!(matches!(
            k(nfsstat3::NFS3ERR_NOENT),
            BackendError::NotFound(_)
        ));
        assert!(matches!(
            k(nfsstat3::NFS3ERR_NOTDIR),
            BackendError::Invalid(_)
        ));
        assert!(matches!(
            k(nfsstat3::NFS3ERR_JUKEBOX),
            BackendError::Unavailable(_)
        ));
        assert!(matches!(k(nfsstat3::NFS3ERR_IO), BackendError::Failed(_)));
        let m = k(nfsstat3::NFS3ERR_NOSPC).to_string();
        assert!(m.contains("ctx") && m.contains("NFS3ERR_NOSPC"), "{m}");
    }

    #[test]
    fn mount_and_rpc_failures_map_to_actionable_kinds() {
        let m = |s| mount_error(MountError::Denied(s), "srv", "/e");
        assert!(matches!(
            m(mountstat3::MNT3ERR_NOENT),
            BackendError::NotFound(_)
        ));
        assert!(matches!(
            m(mountstat3::MNT3ERR_ACCES),
            BackendError::PermissionDenied(_)
        ));
        assert!(matches!(
            m(mountstat3::MNT3ERR_PERM),
            BackendError::PermissionDenied(_)
        ));
        assert!(matches!(m(mountstat3::MNT3ERR_IO), BackendError::Failed(_)));
        let msg = m(mountstat3::MNT3ERR_NOENT).to_string();
        assert!(msg.contains("srv") && msg.contains("/e"), "{msg}");

        let io = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(matches!(
            rpc_error(RpcError::Io(io), "srv", "NFS"),
            BackendError::Unavailable(_)
        ));
        assert!(matches!(
            rpc_error(
                RpcError::Auth(nfs3_client::nfs3_types::rpc::auth_stat::AUTH_TOOWEAK),
                "srv",
                "NFS"
            ),
            BackendError::PermissionDenied(_)
        ));
        assert!(matches!(
            rpc_error(RpcError::ProgUnavail, "srv", "NFS"),
            BackendError::Failed(_)
        ));
    }

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

    #[test]
    fn seconds_are_printed_plainly() {
        assert_eq!(fmt_secs(Duration::from_secs(3)), "3");
        assert_eq!(fmt_secs(Duration::from_millis(1500)), "1.5");
    }

    #[test]
    fn operations_are_send_so_a_multi_threaded_runtime_can_spawn_them() {
        fn assert_send<T: Send>(_: &T) {}
        let share = NfsShare {
            server: "10.0.0.1".into(),
            port: None,
            export: "/export".into(),
        };
        let t = Duration::from_secs(1);
        assert_send(&share.create_dir("a", t));
        assert_send(&share.dir_exists("a", t));
        assert_send(&share.delete_dir("a", OnDelete::Delete, t));
    }

    #[tokio::test]
    async fn bad_input_is_rejected_before_any_network_use() {
        // Loopback only, and a 1 ms budget: validation alone must produce these answers.
        let share = NfsShare {
            server: "127.0.0.1".into(),
            port: None,
            export: "/export".into(),
        };
        let t = Duration::from_millis(1);
        let m = invalid(share.create_dir("../x", t).await);
        assert!(m.starts_with("name:"), "{m}");
        assert!(matches!(
            share.dir_exists("", t).await,
            Err(BackendError::Invalid(_))
        ));
        assert!(matches!(
            share.delete_dir("a/b", OnDelete::Retain, t).await,
            Err(BackendError::Invalid(_))
        ));
        // Retain touches nothing, so it succeeds without a reachable server.
        assert!(share.delete_dir("a", OnDelete::Retain, t).await.is_ok());
    }
}
