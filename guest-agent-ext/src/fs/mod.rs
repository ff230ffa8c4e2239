//! One mount handler per file system behind one trait, registered in one table: adding a file
//! system is one new file and one line in `Registry::new`.

mod cephfs;
pub mod fuse;
pub mod gocryptfs;
pub mod luks2;
mod nfs;
mod smb;

use std::time::Duration;

use async_trait::async_trait;
use cnfs_protocols::spec::{EncryptionMode, VolumeSpec, VFS_FLAGS};
use nix::errno::Errno;
use nix::mount::MsFlags;

use crate::error::AgentError;
use crate::mountinfo::MountEntry;

/// What the agent needs to call mount(2) for a volume, and the attempt that owns what only
/// this mount knows. `data` may carry a secret: it is never logged and is dropped as soon as
/// the mount call returns.
pub struct MountPlan {
    pub source: String,
    pub fs_type: String,
    pub flags: MsFlags,
    pub data: String,
    pub attempt: Box<dyn Attempt + Send>,
}

impl std::fmt::Debug for MountPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MountPlan")
            .field("source", &self.source)
            .field("fs_type", &self.fs_type)
            .field("flags", &self.flags)
            .finish_non_exhaustive()
    }
}

/// One mount attempt, from its plan to its outcome: the state a handler needs to read its
/// own failure (CephFS: a kernel log cursor opened just before the call) and to undo what it
/// set up before the mount call (a loop device, a dm-crypt mapping). The agent drops it when
/// the mount ends, whatever the outcome, so nothing of it outlives the request. What `plan`
/// set up before it failed, or before the deadline cut it off, is `plan`'s own to undo.
pub trait Attempt {
    /// A failed mount(2) in this file system's terms, where an errno means something
    /// particular to it; `None` leaves it to the general mapping. `what` names the volume
    /// and source for the message. Called at most once, before `undo`.
    fn failed(&mut self, _what: &str, _errno: Errno) -> Option<AgentError> {
        None
    }

    /// Undoes what the plan set up for this mount, after the mount failed or timed out (the
    /// agent has already detached a mount that completed at the deadline). Best effort: the
    /// request's error stands either way.
    fn undo(&mut self) {}

    /// The mount succeeded: work that is part of the Mount before it answers (luks2: growing
    /// the file system into a grown container). Best effort and bounded by the Mount's
    /// deadline: its outcome is logged, never the Mount's error.
    fn after_mount(&mut self) -> Option<AfterMount> {
        None
    }

    /// A descriptor the mount call reads (FUSE's `fd=`): left open in the child that makes
    /// the call, which otherwise closes every descriptor of the agent.
    fn keep_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }

    /// The mount succeeded: what must keep running while the volume is mounted (a FUSE
    /// volume's socket that hands the descriptor to its daemon), if anything. `locks` are the
    /// volume table's: the attachment takes its volume's before it changes the mount.
    fn into_attachment(
        self: Box<Self>,
        _log: &slog::Logger,
        _locks: &VolumeLocks,
    ) -> Option<Box<dyn Attachment>> {
        None
    }
}

/// See [`Attempt::after_mount`].
pub type AfterMount = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The volume table's per-volume locks, shared with attachments.
pub type VolumeLocks = std::sync::Arc<cnfs_protocols::keyed_lock::KeyedLocks<String>>;

/// What a mounted volume keeps running besides the kernel's mount, owned by the volume
/// table from a successful Mount (or from a restart's re-learning) to its Unmount.
#[async_trait]
pub trait Attachment: Send + Sync {
    /// Whether whoever serves the volume has been reached: Stats asks before it probes.
    fn readiness(&self) -> Readiness;
    /// A probe got an answer: the server answered at least once.
    fn answered(&self);
    /// The probe failed with `errno`: what that means for this volume, if something
    /// particular (FUSE: ENOTCONN is a daemon that is gone).
    fn explain(&self, _errno: Errno) -> Option<String> {
        None
    }
    /// Stops it at once (its task ends at its next await), without cleaning up.
    fn halt(&self);
    /// Stops it and removes what it created; bounded.
    async fn stop(&self);
}

/// Where a served volume stands before any probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// Nobody serves it yet: accesses (and a probe) would wait; the detail says for what.
    Waiting(String),
    /// Handed to its server; `answered` once a probe got through.
    Served { answered: bool },
}

/// An attempt with nothing of its own to explain or undo.
pub struct Plain;

impl Attempt for Plain {}

/// Facts about this guest a handler may need.
pub struct Context<'a> {
    pub modules_dir: &'a std::path::Path,
    /// The NFSv4 client identity for this sandbox (unique per sandbox).
    pub client_id: &'a str,
    /// Time left for preparation (name resolution, module loading).
    pub budget: Duration,
}

#[async_trait]
pub trait MountHandler: Send + Sync {
    /// The spec's file system name this handler serves (`VolumeSpec::fs_name`).
    fn name(&self) -> &'static str;
    /// Kernel file system types a mount of this handler shows in mountinfo.
    fn kernel_types(&self) -> &'static [&'static str];
    /// True when `entry` (the kernel's view of a mount) is a mount of `spec`, compared field
    /// by field: how a mount found without a record is recognised and adopted.
    fn recognises(&self, spec: &VolumeSpec, entry: &MountEntry) -> bool;
    /// Turns a validated spec into a mount call, loading modules and resolving names; the
    /// plan's attempt carries what the outcome needs.
    async fn plan(&self, spec: &VolumeSpec, ctx: &Context<'_>) -> Result<MountPlan, AgentError>;

    /// A warning about the owner of a mounted volume's root (`uid`, `gid` as statfs's probe
    /// saw them), where this file system can show one the guest failed to map.
    fn root_owner_warning(&self, _uid: u64, _gid: u64) -> Option<String> {
        None
    }

    /// After an agent restart, a mounted volume's attachment started again (see
    /// [`Attempt::into_attachment`]); `None` when its file system has none.
    fn reattach(
        &self,
        _spec: &VolumeSpec,
        _log: &slog::Logger,
        _locks: &VolumeLocks,
    ) -> Result<Option<Box<dyn Attachment>>, AgentError> {
        Ok(None)
    }

    /// After an agent restart: removes what this file system left for volumes that are no
    /// longer mounted (`mounted` names those that are).
    fn clean_leftovers(&self, _mounted: &[String]) {}
}

pub struct Registry {
    handlers: Vec<Box<dyn MountHandler>>,
    /// Encrypted volumes: layers over the NFS, CephFS (and SMB) handlers, chosen by the
    /// spec's `encryption`, not by its file system. Both build on luks2's stack (backing
    /// share, teardown, key checks).
    luks2: std::sync::Arc<luks2::Luks2>,
    gocryptfs: gocryptfs::Gocryptfs,
}

impl Registry {
    pub fn new(tools: crate::tools::ToolClient, volumes: VolumeLocks, log: slog::Logger) -> Self {
        let luks2 = std::sync::Arc::new(luks2::Luks2::new(tools.clone(), volumes, log));
        Registry {
            handlers: vec![
                Box::new(nfs::Nfs),
                Box::new(cephfs::CephFs),
                Box::new(smb::Smb),
                Box::new(fuse::Fuse),
            ],
            luks2: luks2.clone(),
            gocryptfs: gocryptfs::Gocryptfs::new(luks2, tools),
        }
    }

    pub fn get(&self, fs: &str) -> Option<&dyn MountHandler> {
        self.handlers
            .iter()
            .find(|h| h.name() == fs)
            .map(|h| h.as_ref())
    }

    /// The handler that mounts `spec`: the encryption layer when it asks for one.
    pub fn for_spec(&self, spec: &VolumeSpec) -> Option<&dyn MountHandler> {
        match spec.encryption.as_ref().map(|e| e.mode) {
            Some(EncryptionMode::Luks2) => Some(self.luks2.as_ref()),
            Some(EncryptionMode::Gocryptfs) => Some(&self.gocryptfs),
            None => self.get(spec.fs_name()),
        }
    }

    pub fn luks2(&self) -> &luks2::Luks2 {
        &self.luks2
    }

    /// The encryption modes this guest serves (`Ping.encryption_modes`).
    pub fn encryption_modes(&self) -> Vec<String> {
        let mut modes = self.luks2.modes();
        modes.extend(self.gocryptfs.modes());
        modes
    }

    /// The handler whose mounts show `kernel_type` in mountinfo (for a volume adopted
    /// without a spec).
    pub fn for_kernel_type(&self, kernel_type: &str) -> Option<&dyn MountHandler> {
        self.handlers
            .iter()
            .map(|h| h.as_ref())
            .chain([
                self.luks2.as_ref() as &dyn MountHandler,
                &self.gocryptfs as &dyn MountHandler,
            ])
            .find(|h| h.kernel_types().contains(&kernel_type))
    }

    pub fn all(&self) -> impl Iterator<Item = &dyn MountHandler> {
        self.handlers.iter().map(|h| h.as_ref())
    }

    pub fn names(&self) -> Vec<String> {
        self.handlers.iter().map(|h| h.name().to_string()).collect()
    }
}

/// Resolves a server inside the guest, bounded; an address passes through. `what` names it
/// in errors ("NFS server").
pub async fn resolve(
    server: &cnfs_protocols::spec::Server,
    what: &str,
    budget: Duration,
) -> Result<std::net::IpAddr, AgentError> {
    use cnfs_protocols::spec::Server;
    let host = match server {
        Server::Ip(ip) => return Ok(*ip),
        Server::Host(h) => h.clone(),
    };
    // The port only shapes the lookup; nothing connects.
    let lookup = tokio::net::lookup_host((host.clone(), 0));
    let addrs: Vec<std::net::SocketAddr> = tokio::time::timeout(budget, lookup)
        .await
        .map_err(|_| AgentError::Deadline(format!("resolving {what} {host:?}: no answer in time")))?
        .map_err(|e| AgentError::Unavailable(format!("resolving {what} {host:?}: {e}")))?
        .collect();
    // Prefer IPv4 when both exist, as mount.nfs does by default.
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .map(|a| a.ip())
        .ok_or_else(|| AgentError::NotFound(format!("{what} {host:?} has no address")))
}

/// Two absolute paths name the same directory (a trailing `/` aside).
pub fn same_path(a: &str, b: &str) -> bool {
    let trim = |p: &str| -> String {
        match p.trim_end_matches('/') {
            "" => "/".to_string(),
            t => t.to_string(),
        }
    };
    trim(a) == trim(b)
}

/// Generic VFS flags from the spec: always nosuid and nodev (a network share must not bring
/// set-id binaries or device nodes into a container), plus what the caller asked for.
pub fn vfs_flags(spec: &VolumeSpec) -> MsFlags {
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if spec.read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    for (opt, flag) in [
        ("noexec", MsFlags::MS_NOEXEC),
        ("noatime", MsFlags::MS_NOATIME),
        ("nodiratime", MsFlags::MS_NODIRATIME),
        ("relatime", MsFlags::MS_RELATIME),
    ] {
        if spec.options.contains_key(opt) {
            flags |= flag;
        }
    }
    flags
}

/// The spec's file-system options as `k=v`/`k` items, without the VFS flags.
pub fn fs_options(spec: &VolumeSpec) -> impl Iterator<Item = String> + '_ {
    spec.options
        .iter()
        .filter(|(k, _)| !VFS_FLAGS.contains(&k.as_str()))
        .map(|(k, v)| {
            if v.is_empty() {
                k.clone()
            } else {
                format!("{k}={v}")
            }
        })
}
