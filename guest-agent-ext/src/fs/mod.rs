//! One mount handler per file system behind one trait, registered in one table: adding a file
//! system is one new file and one line in `Registry::default`.

mod cephfs;
mod nfs;

use std::time::Duration;

use async_trait::async_trait;
use cnfs_protocols::spec::{VolumeSpec, VFS_FLAGS};
use nix::mount::MsFlags;

use crate::error::AgentError;
use crate::mountinfo::MountEntry;

/// What the agent needs to call mount(2) for a volume. `data` may carry a secret: it is
/// never logged and is dropped as soon as the mount call returns.
pub struct MountPlan {
    pub source: String,
    pub fs_type: String,
    pub flags: MsFlags,
    pub data: String,
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
    /// Turns a validated spec into a mount call, loading modules and resolving names.
    async fn plan(&self, spec: &VolumeSpec, ctx: &Context<'_>) -> Result<MountPlan, AgentError>;

    /// A failed mount(2) in this file system's terms, where an errno means something
    /// particular to it; `None` leaves it to the general mapping.
    fn mount_error(&self, _what: &str, _errno: nix::errno::Errno) -> Option<AgentError> {
        None
    }
}

pub struct Registry {
    handlers: Vec<Box<dyn MountHandler>>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            handlers: vec![Box::new(nfs::Nfs), Box::new(cephfs::CephFs)],
        }
    }
}

impl Registry {
    pub fn get(&self, fs: &str) -> Option<&dyn MountHandler> {
        self.handlers
            .iter()
            .find(|h| h.name() == fs)
            .map(|h| h.as_ref())
    }

    pub fn names(&self) -> Vec<String> {
        self.handlers.iter().map(|h| h.name().to_string()).collect()
    }
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
