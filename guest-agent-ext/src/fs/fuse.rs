//! FUSE: the agent opens `/dev/fuse`, the kernel mounts `fuse` with that descriptor at the
//! volume's mount point, and the descriptor goes to a daemon in the pod's sidecar container
//! over a unix socket the sidecar alone sees (the shim binds the socket's directory into it).
//! The hand-over is meta-fuse-csi-plugin's: one message whose data is the JSON object
//! `{"volumeName":"<name>"}` and whose SCM_RIGHTS carry the descriptor; an unmodified daemon
//! (libfuse >= 3.3, jacobsa/fuse) then serves `/dev/fd/N`.
//!
//! The agent closes its own copy as soon as it is handed over: while any other process holds
//! one, a dead daemon leaves accesses waiting instead of failing with ENOTCONN. A sidecar
//! that connects again after its daemon died gets a fresh mount and descriptor (a descriptor
//! past its FUSE_INIT cannot serve a second daemon); containers that bound the old mount keep
//! seeing ENOTCONN until they restart. While a daemon still serves, a second connection is
//! closed without a descriptor. meta-fuse's fuse-starter removes the socket file once it has
//! the descriptor, so the agent puts its socket back whenever the path no longer names it.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cnfs_protocols::spec::fuse::{socket_dir_in_guest, SOCKET_ROOT};
use cnfs_protocols::spec::{FuseSource, Source, VolumeSpec};
use nix::errno::Errno;
use nix::mount::MsFlags;
use slog::{info, warn, Logger};
use tokio::io::Interest;
use tokio::net::{UnixListener, UnixStream};

use super::{
    vfs_flags, Attachment, Attempt, Context, MountHandler, MountPlan, Readiness, VolumeLocks,
};
use crate::error::AgentError;
use crate::killable::{self, Outcome};
use crate::mountinfo::{self, MountEntry};

pub struct Fuse;

const DEV_FUSE: &str = "/dev/fuse";
/// The misc device's fixed numbers (the kernel's MISC_MAJOR and FUSE_MINOR).
const FUSE_MAJOR: u64 = 10;
const FUSE_MINOR: u64 = 229;
/// How long handing the descriptor to a connected sidecar may take.
const SEND_BOUND: Duration = Duration::from_secs(5);
/// How long the liveness probe of a served mount may take when a sidecar connects again.
const PROBE_BOUND: Duration = Duration::from_secs(2);
/// Bound for detaching a dead mount and mounting a fresh one (neither waits for a server).
const REMOUNT_BOUND: Duration = Duration::from_secs(10);
/// How often the agent checks that its socket file is still there.
const SOCKET_CHECK: Duration = Duration::from_secs(1);
/// How long a connection waits for the volume's lock (an Unmount or Mount in progress).
const LOCK_BOUND: Duration = Duration::from_secs(10);
/// The pause after a connection that was refused or cost a fresh mount: a sidecar that
/// reconnects in a loop costs at most this often a probe (and a mount), and a log line.
const COSTLY_PAUSE: Duration = Duration::from_millis(500);

/// Creates `/dev/fuse` when the guest has no node for it (a static /dev; Kata's guests mount
/// devtmpfs, which has it whenever the kernel has FUSE). Run at start-up, before the agent
/// drops CAP_MKNOD with the rest. `Ok(true)` when it was created.
pub fn ensure_device_node() -> nix::Result<bool> {
    if Path::new(DEV_FUSE).exists() {
        return Ok(false);
    }
    nix::sys::stat::mknod(
        DEV_FUSE,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(FUSE_MAJOR, FUSE_MINOR),
    )?;
    Ok(true)
}

/// The mount's source in mountinfo: says which sidecar serves it.
fn source_name(f: &FuseSource) -> String {
    format!("cnfs-fuse:{}", f.sidecar)
}

fn fuse_source(spec: &VolumeSpec) -> Result<&FuseSource, AgentError> {
    match &spec.source {
        Source::Fuse(f) => Ok(f),
        _ => Err(AgentError::Internal(
            "fuse handler given a non-FUSE spec".into(),
        )),
    }
}

/// A fresh descriptor of the FUSE device (close-on-exec; kept across the mount child's
/// fork by `killable::run_keeping`).
pub(super) fn open_device() -> Result<OwnedFd, AgentError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(DEV_FUSE)
        .map(OwnedFd::from)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) => AgentError::FailedPrecondition(
                format!("{DEV_FUSE}: {e}: the guest kernel has no FUSE (CONFIG_FUSE_FS)"),
            ),
            _ => AgentError::Internal(format!("opening {DEV_FUSE}: {e}")),
        })
}

/// Everything of the mount call but the descriptor: the same for the first mount and every
/// fresh one.
#[derive(Clone)]
struct Recipe {
    name: String,
    mount_point: PathBuf,
    source: String,
    flags: MsFlags,
    /// Options after `fd=N,`.
    options: String,
    sidecar: String,
    /// The socket's path as the sidecar sees it (for messages).
    socket_shown: String,
    /// The socket in the guest.
    socket: PathBuf,
}

impl Recipe {
    fn new(spec: &VolumeSpec) -> Result<Self, AgentError> {
        let f = fuse_source(spec)?;
        let opt = |k: &str| spec.options.get(k).map(String::as_str);
        // rootmode: the root is a directory (S_IFDIR, octal, as the kernel reads it).
        let mut options = format!(
            "rootmode=40000,user_id={},group_id={},default_permissions",
            opt("uid").unwrap_or("0"),
            opt("gid").unwrap_or("0")
        );
        if opt("allow_other").is_some() {
            options.push_str(",allow_other");
        }
        if let Some(n) = opt("max_read") {
            options.push_str(&format!(",max_read={n}"));
        }
        Ok(Recipe {
            name: spec.name.clone(),
            mount_point: spec.mount_point(),
            source: source_name(f),
            flags: vfs_flags(spec),
            options,
            sidecar: f.sidecar.clone(),
            socket_shown: f.socket.clone(),
            socket: socket_dir_in_guest(&spec.name).join(f.socket_file()),
        })
    }

    fn data(&self, fd: &OwnedFd) -> String {
        format!("fd={},{}", fd.as_raw_fd(), self.options)
    }

    /// A listening socket at the volume's path, replacing a stale one; connectable by any
    /// user (the sidecar may run as one): only the sidecar's mount namespace reaches it.
    fn listen(&self) -> Result<std::os::unix::net::UnixListener, AgentError> {
        let fail = |what: &str, e: std::io::Error| {
            AgentError::Internal(format!(
                "volume {}: {what} {}: {e}",
                self.name,
                self.socket.display()
            ))
        };
        if let Some(dir) = self.socket.parent() {
            std::fs::create_dir_all(dir).map_err(|e| fail("creating the directory of", e))?;
        }
        match std::fs::remove_file(&self.socket) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(fail("removing the stale", e))
            }
            _ => {}
        }
        let l = std::os::unix::net::UnixListener::bind(&self.socket)
            .map_err(|e| fail("listening on", e))?;
        // chmod follows symlinks: only the agent writes here (the sidecar's bind of the
        // directory is read-only), and it is checked to be the socket just made.
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        let is_socket = std::fs::symlink_metadata(&self.socket)
            .map(|m| m.file_type().is_socket())
            .unwrap_or(false);
        if !is_socket {
            return Err(fail(
                "checking",
                std::io::Error::other("not the socket just made"),
            ));
        }
        std::fs::set_permissions(&self.socket, std::fs::Permissions::from_mode(0o666))
            .map_err(|e| fail("opening up", e))?;
        l.set_nonblocking(true)
            .map_err(|e| fail("making non-blocking", e))?;
        Ok(l)
    }

    fn remove_socket(&self) {
        let _ = std::fs::remove_file(&self.socket);
        if let Some(dir) = self.socket.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

#[async_trait]
impl MountHandler for Fuse {
    fn name(&self) -> &'static str {
        "fuse"
    }

    fn kernel_types(&self) -> &'static [&'static str] {
        cnfs_protocols::spec::FsKind::Fuse.kernel_types()
    }

    fn recognises(&self, spec: &VolumeSpec, e: &MountEntry) -> bool {
        let Source::Fuse(f) = &spec.source else {
            return false;
        };
        e.fs_type == "fuse" && e.source == source_name(f)
    }

    async fn plan(&self, spec: &VolumeSpec, ctx: &Context<'_>) -> Result<MountPlan, AgentError> {
        let recipe = Recipe::new(spec)?;
        let has_fuse = std::fs::read_to_string("/proc/filesystems")
            .map(|t| {
                t.lines()
                    .any(|l| l.split_whitespace().last() == Some("fuse"))
            })
            .unwrap_or(false);
        if !has_fuse {
            let dir = ctx.modules_dir.to_path_buf();
            tokio::task::spawn_blocking(move || crate::kmod::ensure(&dir, "fuse"))
                .await
                .map_err(|e| AgentError::Internal(e.to_string()))?
                .map_err(|e| AgentError::FailedPrecondition(e.to_string()))?;
        }
        let fd = open_device()?;
        // The socket exists before the mount, so a failure to make it mounts nothing.
        let listener = recipe.listen()?;
        Ok(MountPlan {
            source: recipe.source.clone(),
            fs_type: "fuse".into(),
            flags: recipe.flags,
            data: recipe.data(&fd),
            attempt: Box::new(FuseAttempt {
                recipe,
                fd: Some(fd),
                listener: Some(listener),
            }),
        })
    }

    fn reattach(
        &self,
        spec: &VolumeSpec,
        log: &Logger,
        locks: &VolumeLocks,
    ) -> Result<Option<Box<dyn Attachment>>, AgentError> {
        let recipe = Recipe::new(spec)?;
        let listener = recipe.listen()?;
        // The descriptor left with the previous agent: served by a daemon, or dead (then the
        // sidecar's next connection gets a fresh mount).
        Ok(Some(Server::start(recipe, None, listener, log, locks)?))
    }

    fn clean_leftovers(&self, mounted: &[String]) {
        let Ok(dir) = std::fs::read_dir(SOCKET_ROOT) else {
            return;
        };
        for d in dir.flatten() {
            if !mounted
                .iter()
                .any(|m| *m == d.file_name().to_string_lossy())
            {
                let _ = std::fs::remove_dir_all(d.path());
            }
        }
    }
}

struct FuseAttempt {
    recipe: Recipe,
    fd: Option<OwnedFd>,
    listener: Option<std::os::unix::net::UnixListener>,
}

impl Attempt for FuseAttempt {
    fn undo(&mut self) {
        self.fd = None;
        self.listener = None;
        self.recipe.remove_socket();
    }

    fn keep_fd(&self) -> Option<std::os::fd::RawFd> {
        self.fd.as_ref().map(AsRawFd::as_raw_fd)
    }

    fn into_attachment(
        mut self: Box<Self>,
        log: &Logger,
        locks: &VolumeLocks,
    ) -> Option<Box<dyn Attachment>> {
        let listener = self.listener.take()?;
        match Server::start(self.recipe.clone(), self.fd.take(), listener, log, locks) {
            Ok(s) => Some(s),
            Err(e) => {
                // Only outside a runtime; then the volume is served by nobody until the agent
                // restarts and re-attaches it.
                warn!(log, "could not start the FUSE socket"; "volume" => &self.recipe.name,
                    "error" => %e);
                None
            }
        }
    }
}

/// Hands a FUSE volume's descriptor to its sidecar: one task per volume, accepting on the
/// volume's socket.
struct Server {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
    recipe: Recipe,
}

struct Shared {
    /// The descriptor of the current mount until a sidecar took it.
    pending: tokio::sync::Mutex<Option<OwnedFd>>,
    /// Whether the current mount's descriptor is out (with a daemon, live or dead).
    served: AtomicBool,
    /// Whether a probe got through since it went out.
    answered: AtomicBool,
}

impl Server {
    /// `fd`: the descriptor of a mount just made; `None` after a restart, when it is with a
    /// daemon (taken to have answered before: a hung one then shows as unresponsive).
    fn start(
        recipe: Recipe,
        fd: Option<OwnedFd>,
        listener: std::os::unix::net::UnixListener,
        log: &Logger,
        locks: &VolumeLocks,
    ) -> Result<Box<dyn Attachment>, AgentError> {
        let listener = UnixListener::from_std(listener)
            .map_err(|e| AgentError::Internal(format!("volume {}: {e}", recipe.name)))?;
        let shared = Arc::new(Shared {
            served: AtomicBool::new(fd.is_none()),
            answered: AtomicBool::new(fd.is_none()),
            pending: tokio::sync::Mutex::new(fd),
        });
        let log = log.new(slog::o!("volume" => recipe.name.clone()));
        let task = tokio::spawn(serve(
            listener,
            shared.clone(),
            recipe.clone(),
            log,
            locks.clone(),
        ));
        Ok(Box::new(Server {
            shared,
            task,
            recipe,
        }))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[async_trait]
impl Attachment for Server {
    fn readiness(&self) -> Readiness {
        if self.shared.served.load(Ordering::SeqCst) {
            Readiness::Served {
                answered: self.shared.answered.load(Ordering::SeqCst),
            }
        } else {
            Readiness::Waiting(format!(
                "waiting for container {} to connect to {} and take the FUSE descriptor; \
                 accesses wait until its daemon answers",
                self.recipe.sidecar, self.recipe.socket_shown
            ))
        }
    }

    fn answered(&self) {
        self.shared.answered.store(true, Ordering::SeqCst);
    }

    fn explain(&self, errno: Errno) -> Option<String> {
        // ENOTCONN for a request made after the daemon died; ECONNABORTED for one that was in
        // flight when it did (the kernel ends those with it).
        matches!(errno, Errno::ENOTCONN | Errno::ECONNABORTED).then(|| {
            format!(
                "the FUSE daemon in container {} is gone; when the container restarts it gets \
                 a fresh mount (containers that bound this one see ENOTCONN until they restart)",
                self.recipe.sidecar
            )
        })
    }

    fn halt(&self) {
        self.task.abort();
    }

    async fn stop(&self) {
        self.task.abort();
        // A fresh mount in flight is cut off with its task (its child is killed).
        while !self.task.is_finished() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        *self.shared.pending.lock().await = None;
        self.recipe.remove_socket();
    }
}

/// The socket file's identity, to notice it was removed or replaced.
fn identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

async fn serve(
    mut listener: UnixListener,
    shared: Arc<Shared>,
    recipe: Recipe,
    log: Logger,
    locks: VolumeLocks,
) {
    let mut ours = identity(&recipe.socket);
    let mut check = tokio::time::interval(SOCKET_CHECK);
    // The child of a liveness probe that outlived its bound (a hung daemon): while it lives,
    // the daemon counts as alive and no second probe is forked.
    let mut stuck: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = check.tick() => {
                if identity(&recipe.socket) != ours {
                    match recipe.listen().map(UnixListener::from_std) {
                        Ok(Ok(l)) => {
                            listener = l;
                            ours = identity(&recipe.socket);
                            info!(log, "the FUSE socket file was removed; listening again");
                        }
                        Ok(Err(e)) => warn!(log, "listening again failed"; "error" => %e),
                        Err(e) => warn!(log, "listening again failed"; "error" => %e),
                    }
                }
                continue;
            }
        };
        let conn = match accepted {
            Ok((c, _)) => c,
            Err(e) => {
                warn!(log, "accepting on the FUSE socket failed"; "error" => %e);
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        // Mount, Unmount and this hand-over of one volume never overlap.
        let deadline = tokio::time::Instant::now() + LOCK_BOUND;
        let Ok(guard) = locks.lock_until(&recipe.name, deadline).await else {
            warn!(
                log,
                "the volume stayed busy; a sidecar's connection closed without a descriptor"
            );
            continue;
        };
        let mut pending = shared.pending.lock().await;
        let fd = match pending.take() {
            Some(fd) => fd,
            None => {
                let hung = stuck.as_ref().is_some_and(|h| !h.is_finished());
                let fresh = if hung {
                    Ok(None)
                } else {
                    fresh_mount_if_dead(&recipe, &log, &mut stuck).await
                };
                match fresh {
                    Ok(Some(fd)) => {
                        shared.served.store(false, Ordering::SeqCst);
                        fd
                    }
                    Ok(None) => {
                        warn!(
                            log,
                            "a sidecar connected while the volume's daemon still serves \
                            (or hangs); closed without a descriptor"
                        );
                        // The connection closes and the volume is free during the pause.
                        drop((pending, guard, conn));
                        tokio::time::sleep(COSTLY_PAUSE).await;
                        continue;
                    }
                    Err(e) => {
                        warn!(log, "could not mount the volume afresh for its sidecar"; "error" => %e);
                        drop((pending, guard, conn));
                        tokio::time::sleep(COSTLY_PAUSE).await;
                        continue;
                    }
                }
            }
        };
        match tokio::time::timeout(SEND_BOUND, send(&conn, &recipe.name, &fd)).await {
            Ok(Ok(())) => {
                // The agent's copy closes here: only the daemon holds the connection.
                drop(fd);
                shared.answered.store(false, Ordering::SeqCst);
                shared.served.store(true, Ordering::SeqCst);
                info!(log, "FUSE descriptor handed to the sidecar"; "sidecar" => &recipe.sidecar);
            }
            Ok(Err(e)) => {
                warn!(log, "handing the FUSE descriptor failed; kept for the next connection";
                    "error" => %e);
                *pending = Some(fd);
            }
            Err(_) => {
                warn!(
                    log,
                    "the sidecar did not take the FUSE descriptor in time; kept for the \
                    next connection"
                );
                *pending = Some(fd);
            }
        }
    }
}

/// One message: the JSON object with the volume's name (a DNS label: nothing to escape) and
/// the descriptor in SCM_RIGHTS.
async fn send(conn: &UnixStream, name: &str, fd: &OwnedFd) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let msg = format!("{{\"volumeName\":\"{name}\"}}");
    let fds = [fd.as_raw_fd()];
    loop {
        conn.writable().await?;
        let sent = conn.try_io(Interest::WRITABLE, || {
            let iov = [std::io::IoSlice::new(msg.as_bytes())];
            let cmsg = [ControlMessage::ScmRights(&fds)];
            sendmsg::<()>(conn.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None)
                .map_err(std::io::Error::from)
        });
        match sent {
            Ok(n) if n == msg.len() => return Ok(()),
            Ok(n) => {
                return Err(std::io::Error::other(format!(
                    "sent {n} of {} bytes",
                    msg.len()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// A sidecar connected again: if the current mount's daemon is gone (ENOTCONN, or nothing
/// is mounted), detach it and mount afresh, returning the new descriptor; `None` while a
/// daemon still serves (or is too slow to tell: then the probe's child, if it outlives the
/// bound, goes to `stuck`).
async fn fresh_mount_if_dead(
    recipe: &Recipe,
    log: &Logger,
    stuck: &mut Option<tokio::task::JoinHandle<()>>,
) -> Result<Option<OwnedFd>, AgentError> {
    let target = std::ffi::CString::new(recipe.mount_point.as_os_str().as_encoded_bytes())
        .map_err(|_| AgentError::Internal("mount point has a NUL byte".into()))?;
    let mounted =
        mountinfo::find(&mountinfo::read().unwrap_or_default(), &recipe.mount_point).is_some();
    if mounted {
        let (outcome, alive) =
            killable::run_tracked(PROBE_BOUND, None, || crate::volumes::statfs(&target)).await;
        if let Some(alive) = alive {
            *stuck = Some(tokio::spawn(alive));
        }
        match outcome {
            Outcome::Failed(Errno::ENOTCONN) => {}
            Outcome::Failed(e) => {
                return Err(AgentError::Internal(format!(
                    "the mount answers {}, not ENOTCONN: left as it is",
                    e.desc()
                )))
            }
            Outcome::Done(_) | Outcome::TimedOut => return Ok(None),
        }
        let detached = killable::run(REMOUNT_BOUND, || {
            nix::mount::umount2(target.as_c_str(), nix::mount::MntFlags::MNT_DETACH)
                .map(|()| [0; 6])
        })
        .await;
        if !matches!(detached, Outcome::Done(_) | Outcome::Failed(Errno::EINVAL)) {
            return Err(AgentError::Internal(format!(
                "detaching the dead mount: {detached:?}"
            )));
        }
    }
    let fd = open_device()?;
    let deadline = tokio::time::Instant::now() + REMOUNT_BOUND;
    let outcome = crate::volumes::mount_in_child(
        &format!("volume {}", recipe.name),
        &recipe.mount_point,
        &recipe.source,
        "fuse",
        recipe.flags,
        recipe.data(&fd),
        Some(fd.as_raw_fd()),
        deadline,
    )
    .await?;
    match outcome {
        Outcome::Done(_) => {
            info!(
                log,
                "the FUSE daemon was gone: mounted afresh for the sidecar"
            );
            Ok(Some(fd))
        }
        other => Err(AgentError::Internal(format!("mounting afresh: {other:?}"))),
    }
}
