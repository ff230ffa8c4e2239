//! Encrypted volumes (`encryption=luks2`): a container file on the network share, a loop
//! device, dm-crypt and ext4, all in the guest kernel. The share is mounted at
//! `/run/cnfs/backing/<name>` (never bound into a container); the container is its
//! `cnfs-volume.luks2`; the dm-crypt mapping is `cnfs-<name>`; ext4 is the volume.
//!
//! Rules that keep data safe (docs/design/encryption-luks2.md §4, §5):
//! - only a name that does not exist is ever formatted, and never in place: a new container
//!   is formatted as a temporary file made with O_EXCL and published with link(2), which
//!   fails when another guest published first. An existing file that is not LUKS2 is
//!   refused, never formatted;
//! - one writer: an OFD lock on one byte past any data, taken on the very open file the loop
//!   device keeps, so it lasts exactly as long as the loop and the server frees it when the
//!   guest dies (NFSv4 lease). Taken before anything is read.
//! - whatever fails or is abandoned (the caller gone, the agent's deadline), the stack is
//!   taken down again from the kernel's own state, under a per-volume lock.

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cnfs_protocols::keyed_lock::KeyedLocks;
use cnfs_protocols::spec::encryption::{parse_size_marker, size_from_quota};
use cnfs_protocols::spec::{Encryption, Source, VolumeSpec};
use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use slog::{error, info, warn, Logger};
use tokio::time::Instant;

use super::{vfs_flags, Attempt, Context, MountHandler, MountPlan};
use crate::blockdev::{self, Sysfs};
use crate::error::AgentError;
use crate::killable::{self, Outcome};
use crate::kmod;
use crate::mountinfo::{self, MountEntry};
use crate::tools::command::{
    dm_name, is_temp_container, luks2_container, LOCK_HOLDER_ARGV0, TEMP_PREFIX,
};
use crate::tools::holder::lock_request;
use crate::tools::holder::Report;
use crate::tools::{Command, Exit, ToolClient, ToolOutcome};

/// Where backing shares are mounted (0700: only the agent reaches the container files).
pub use crate::tools::command::BACKING_ROOT;
/// The container's fixed name in the volume's directory: nobody chooses what is formatted.
pub const CONTAINER: &str = crate::tools::command::LUKS2_CONTAINER;
/// Bound for taking a stack down when nobody waits for it (an abandoned mount).
pub(super) const CLEANUP_BOUND: Duration = Duration::from_secs(15);

pub fn backing_dir(name: &str) -> PathBuf {
    Path::new(BACKING_ROOT).join(name)
}

/// What the first 4 KiB at offset 0 and the LUKS2 secondary-header offsets hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    Absent,
    NotRegular,
    Luks2,
    Luks1,
    NotLuks,
}

#[derive(Debug)]
pub enum Action {
    CreateAndFormat,
    Open,
    Refuse(AgentError),
}

/// Formatting is reachable only from `Absent`: whatever an existing file holds, it is
/// opened or refused.
pub fn decide(found: Found, read_only: bool, file: &str) -> Action {
    match found {
        Found::Absent if read_only => Action::Refuse(AgentError::NotFound(format!(
            "{file} does not exist: nothing to open read-only"
        ))),
        Found::Absent => Action::CreateAndFormat,
        Found::Luks2 => Action::Open,
        Found::Luks1 => Action::Refuse(AgentError::FailedPrecondition(format!(
            "{file} is a LUKS1 container; CNFS opens LUKS2 only"
        ))),
        Found::NotLuks | Found::NotRegular => {
            Action::Refuse(AgentError::FailedPrecondition(format!(
                "{file} exists and is not a LUKS2 container (no LUKS2 header at offset 0 or at \
                 any secondary offset); CNFS never formats an existing file: move it away or \
                 restore its header"
            )))
        }
    }
}

/// LUKS2 keeps a second header copy at one of these offsets (cryptsetup's `hdr2_offsets`).
const SECONDARY_OFFSETS: [i64; 9] = [
    0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000, 0x200000, 0x400000,
];

/// The kind of container from the bytes read at offset 0 (`primary`) and at the secondary
/// offsets. Either LUKS2 copy is enough: cryptsetup opens from the good one.
fn classify_magic(primary: &[u8; 8], secondaries: &[[u8; 8]]) -> Found {
    let version = |b: &[u8; 8]| u16::from_be_bytes([b[6], b[7]]);
    if primary[..6] == *b"LUKS\xba\xbe" {
        return match version(primary) {
            2 => Found::Luks2,
            1 => Found::Luks1,
            _ => Found::NotLuks,
        };
    }
    if secondaries
        .iter()
        .any(|s| s[..6] == *b"SKUL\xba\xbe" && version(s) == 2)
    {
        return Found::Luks2;
    }
    Found::NotLuks
}

/// The answer of the child that opens the container and binds it to a loop device.
#[derive(Debug, PartialEq, Eq)]
enum Opened {
    /// Bound to loop `n`; `found` is what the file held; `grown_from` the size of an existing
    /// container grown to the size asked for (0: not grown).
    Loop {
        n: u32,
        found: Found,
        grown_from: u64,
    },
    /// Not bound (absent, or not something to open).
    Not(Found),
    /// The single-writer lock is held by another client.
    InUse,
    Failed {
        step: &'static str,
        errno: Errno,
    },
}

const STEPS: [&str; 7] = ["open", "stat", "lock", "read", "grow", "loop", "link"];

/// Opens `path` (creating it exclusively if `create`), locks it, reads its headers and, if it
/// is LUKS2 or new, binds it to a loop device. In a killable child: a dead server can hang
/// any step.
async fn open_and_bind(
    path: &Path,
    create: bool,
    read_only: bool,
    size: u64,
    lock: bool,
    budget: Duration,
) -> Result<Opened, AgentError> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| AgentError::Internal("container path has a NUL byte".into()))?;
    let outcome = killable::run(budget, || {
        Ok(open_and_bind_child(&c, create, read_only, size, lock))
    })
    .await;
    let p = match outcome {
        Outcome::Done(p) => p,
        Outcome::Failed(e) => {
            return Err(AgentError::Internal(format!(
                "opening {}: {}",
                path.display(),
                e.desc()
            )))
        }
        Outcome::TimedOut => {
            return Err(AgentError::Deadline(format!(
                "opening {}: the server did not answer within {budget:?}",
                path.display()
            )))
        }
    };
    let found = match p[4] {
        0 => Found::Absent,
        1 => Found::NotRegular,
        2 => Found::Luks2,
        3 => Found::Luks1,
        _ => Found::NotLuks,
    };
    Ok(match p[0] {
        0 => Opened::Loop {
            n: p[3] as u32,
            found,
            grown_from: p[5],
        },
        1 => Opened::Not(found),
        2 => Opened::InUse,
        _ => Opened::Failed {
            step: STEPS.get(p[1] as usize).copied().unwrap_or("?"),
            errno: Errno::from_raw(p[2] as i32),
        },
    })
}

/// The child's half of [`open_and_bind`]: system calls only, nothing allocated. Payload:
/// `[result (0 bound, 1 not bound, 2 in use, 3 failed), step, errno, loop, found, grown from]`.
fn open_and_bind_child(
    path: &std::ffi::CStr,
    create: bool,
    read_only: bool,
    size: u64,
    lock: bool,
) -> killable::Payload {
    let fail = |step: u64, e: Errno| [3, step, e as u64, 0, 0, 0];
    let mut flags = libc::O_CLOEXEC | libc::O_NOFOLLOW;
    flags |= if read_only {
        libc::O_RDONLY
    } else {
        libc::O_RDWR
    };
    if create {
        flags |= libc::O_CREAT | libc::O_EXCL;
    }
    // SAFETY: a NUL-terminated path that outlives the call.
    let fd = unsafe { libc::open(path.as_ptr(), flags, 0o600 as libc::c_uint) };
    if fd < 0 {
        return match Errno::last() {
            Errno::ENOENT if !create => [1, 0, 0, 0, 0, 0],
            // O_NOFOLLOW on a symlink.
            Errno::ELOOP => [1, 0, 0, 0, 1, 0],
            e => fail(0, e),
        };
    }
    let answer = bind_open_file(fd, create, read_only, size, lock, fail);
    // SAFETY: closes the descriptor opened above; the loop, if bound, holds its own reference.
    unsafe { libc::close(fd) };
    answer
}

fn bind_open_file(
    fd: libc::c_int,
    create: bool,
    read_only: bool,
    size: u64,
    take_lock: bool,
    fail: impl Fn(u64, Errno) -> killable::Payload,
) -> killable::Payload {
    let current = match nix::sys::stat::fstat(fd) {
        Ok(st) if st.st_mode & libc::S_IFMT != libc::S_IFREG => return [1, 0, 0, 0, 1, 0],
        Ok(st) => st.st_size,
        Err(e) => return fail(1, e),
    };
    // The single-writer lock, on this open file description (OFD): it stays with the file
    // the loop device keeps, not with this short-lived process.
    let lock = lock_request(read_only);
    // (On SMB the volume's lock holder has it: see `hold`.)
    // SAFETY: F_OFD_SETLK reads one `struct flock` from a value on the stack.
    if take_lock && unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &lock as *const libc::flock) } < 0 {
        return match Errno::last() {
            Errno::EAGAIN | Errno::EACCES => [2, 2, 0, 0, 0, 0],
            e => fail(2, e),
        };
    }
    let found = if create {
        0
    } else {
        let mut primary = [0u8; 8];
        let mut secondaries = [[0u8; 8]; SECONDARY_OFFSETS.len()];
        // SAFETY: `fd` is open for the whole of this function (its caller closes it after).
        let file = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        if let Err(e) = nix::sys::uio::pread(file, &mut primary, 0) {
            return fail(3, e);
        }
        for (i, off) in SECONDARY_OFFSETS.iter().enumerate() {
            // A short file reads zeros there (nothing is read past its end): no magic.
            if let Err(e) = nix::sys::uio::pread(file, &mut secondaries[i], *off) {
                return fail(3, e);
            }
        }
        match classify_magic(&primary, &secondaries) {
            Found::Luks2 => 2,
            Found::Luks1 => return [1, 0, 0, 0, 3, 0],
            _ => return [1, 0, 0, 0, 4, 0],
        }
    };
    // cryptsetup's 4 KiB sectors need a size in whole sectors: rounded up.
    let Ok(len) = libc::off_t::try_from(size.div_ceil(4096).saturating_mul(4096)) else {
        return fail(4, Errno::EFBIG);
    };
    // A new container gets its size; an existing one grows to a larger size asked for (with
    // the lock held, before the loop reads its size), never shrinks. Sparse either way: only
    // what is written takes space on the server.
    let grow = create || (!read_only && len > current);
    if grow {
        // SAFETY: ftruncate(2) on a descriptor this child opened.
        if unsafe { libc::ftruncate(fd, len) } < 0 {
            return fail(4, Errno::last());
        }
    }
    let grown_from = if grow && !create {
        u64::try_from(current).unwrap_or(0)
    } else {
        0
    };
    match blockdev::attach(fd, read_only) {
        Ok(n) => [0, 0, 0, u64::from(n), found, grown_from],
        Err(e) => fail(5, e),
    }
}

/// One system call on a path (link, unlink) in a killable child.
pub(super) async fn path_call(
    what: &str,
    budget: Duration,
    op: impl FnOnce() -> Result<(), Errno>,
) -> Result<(), AgentError> {
    match killable::run(budget, || op().map(|()| [0; 6])).await {
        Outcome::Done(_) => Ok(()),
        Outcome::Failed(e @ (Errno::EACCES | Errno::EPERM)) => {
            Err(AgentError::PermissionDenied(format!(
                "{what}: {} (the server refuses the guest's root here: check the share's \
                 permissions and squash rules)",
                e.desc()
            )))
        }
        Outcome::Failed(e) => Err(AgentError::Internal(format!("{what}: {}", e.desc()))),
        Outcome::TimedOut => Err(AgentError::Deadline(format!(
            "{what}: the server did not answer within {budget:?}"
        ))),
    }
}

pub struct Luks2 {
    tools: ToolClient,
    /// Per-volume: one build or teardown of a name's stack at a time.
    stacks: Arc<KeyedLocks<String>>,
    /// The volume table's locks: a stack left by a failed or abandoned mount is taken down
    /// under its volume's lock, so never between a later Mount's build and its mount.
    volumes: super::VolumeLocks,
    /// Two key derivations (argon2 or scrypt, 64 MiB each) at a time at most: 16 at once
    /// would not fit a small guest's memory.
    kdf_slots: Arc<tokio::sync::Semaphore>,
    /// Names whose leftovers a background task takes down again (one task per name).
    retrying: Retrying,
    /// Keyed digests (SipHash, random keys of this process) of the keys of mounted volumes,
    /// in memory only: a repeated Mount with another key is refused, not "already mounted".
    keys: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    digest: std::collections::hash_map::RandomState,
    log: Logger,
}

impl Luks2 {
    pub fn new(tools: ToolClient, volumes: super::VolumeLocks, log: Logger) -> Self {
        Luks2 {
            tools,
            stacks: Arc::new(KeyedLocks::new()),
            volumes,
            kdf_slots: Arc::new(tokio::sync::Semaphore::new(2)),
            retrying: Retrying::default(),
            keys: std::sync::Mutex::new(std::collections::HashMap::new()),
            digest: std::collections::hash_map::RandomState::new(),
            log,
        }
    }

    /// The modes this guest can serve (empty without the runner or the tools).
    pub fn modes(&self) -> Vec<String> {
        match self.tools.missing() {
            None => vec!["luks2".to_string()],
            Some(_) => Vec::new(),
        }
    }

    /// Builds `layer`'s stack for `spec` in a task of its own holding the stack lock: if the
    /// caller is gone (its deadline), the task still finishes, and what it built is taken
    /// down at once, with the lock still held, so no later build of the name comes between
    /// (or by `Built`'s drop if the result is dropped unread). A failed build is taken down
    /// the same way.
    pub(super) async fn build_detached(
        &self,
        layer: Layer,
        spec: &VolumeSpec,
        enc: &Encryption,
        ctx: &Context<'_>,
        deadline: Instant,
    ) -> Result<Built, AgentError> {
        let name = spec.name.clone();
        let stack = self.stack(&name);
        let (spec, enc) = (spec.clone(), enc.clone());
        let client_id = ctx.client_id.to_string();
        let modules_dir = ctx.modules_dir.to_path_buf();
        let log = self.log.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let _g = stack.locks.lock(&stack.name).await;
            let ctx = Context {
                modules_dir: &modules_dir,
                client_id: &client_id,
                budget: deadline.saturating_duration_since(Instant::now()),
            };
            let built = async {
                // What an earlier attempt left (an agent killed midway) goes first.
                let leftovers = stack.down_locked(deadline).await;
                if !leftovers.is_empty() {
                    info!(log, "cleared what an earlier attempt left";
                        "volume" => stack.name.as_str(), "steps" => leftovers.join("; "));
                }
                mount_backing(&spec, &ctx, deadline).await?;
                match layer {
                    Layer::Luks2 => build(&stack, &spec, &enc, deadline, &log).await,
                    Layer::Gocryptfs => {
                        super::gocryptfs::build(&stack, &spec, &enc, deadline, &log).await
                    }
                }
            }
            .await;
            match built {
                Ok(b) => {
                    if let Err(Ok(b)) = tx.send(Ok(b)) {
                        b.keep();
                        stack.down_locked(Instant::now() + CLEANUP_BOUND).await;
                    }
                }
                Err(e) => {
                    stack.down_locked(Instant::now() + CLEANUP_BOUND).await;
                    let _ = tx.send(Err(e));
                }
            }
        });
        rx.await
            .map_err(|_| AgentError::Internal(format!("volume {name}: the build task ended")))?
    }

    pub(super) fn stack(&self, name: &str) -> Stack {
        Stack {
            name: name.to_string(),
            tools: self.tools.clone(),
            locks: self.stacks.clone(),
            volumes: self.volumes.clone(),
            kdf_slots: self.kdf_slots.clone(),
            retrying: self.retrying.clone(),
            log: self.log.clone(),
        }
    }

    fn key_digest(&self, key: &[u8]) -> u64 {
        use std::hash::BuildHasher;
        self.digest.hash_one(key)
    }

    /// Records the key a volume was mounted with (in memory only).
    pub fn remember_key(&self, name: &str, key: &[u8]) {
        let d = self.key_digest(key);
        self.keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), d);
    }

    pub fn forget_key(&self, name: &str) {
        self.keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }

    /// False when `name` is known to be mounted with another key (unknown after an agent
    /// restart: then any key passes, as the mount itself is unchanged).
    pub fn key_matches(&self, name: &str, key: &[u8]) -> bool {
        let d = self.key_digest(key);
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        !matches!(keys.get(name), Some(known) if *known != d)
    }

    /// The volume's ext4 did not unmount in time: its I/O may wait on a dead server. If the
    /// share does not answer a statfs within 2 s either, makes the
    /// backing share fail that I/O at once, so that ext4 (which records the errors) and the
    /// stack under it can let go: an NFS share is shut down through its superblock's sysfs
    /// `shutdown` (Linux 6.7+; every later request fails with EIO, which a forced unmount
    /// alone does not do), any other one is force-unmounted (CephFS then fails its requests).
    /// `None` when the volume has no backing share.
    pub async fn stuck(&self, name: &str) -> Option<String> {
        give_up_if_dead(name, &self.log).await
    }

    /// Before an SMB volume whose lock is gone is unmounted (its holder ended while the
    /// watch had not cut it off yet): cut off first, or the unmount writes the journal and
    /// superblock into a container another guest may have opened. The caller holds the
    /// volume's lock. What it did, for the answer's notes. A mapping that cannot be cut off
    /// within `budget` (its I/O waits on the server) has its share given up if the server
    /// does not answer (nothing more reaches the container then); `Err` if it answers
    /// (slowly): no unmount may go ahead, since every kind flushes through the old table.
    pub async fn fence_if_lock_lost(
        &self,
        name: &str,
        entries: &[MountEntry],
        budget: Duration,
    ) -> Result<Option<String>, String> {
        if lock_lost(name, entries).await.is_none() {
            return Ok(None);
        }
        let until = Instant::now() + budget;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match fence(name, &self.log, None, left.min(FENCE_ATTEMPT)).await {
                Fence::Done => {
                    return Ok(Some(
                        "lock lost: cut off from its container before the unmount".into(),
                    ))
                }
                Fence::NotThere => return Ok(None),
                Fence::NotYet if left > Duration::from_secs(1) => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Fence::NotYet => {
                    return match give_up_if_dead(name, &self.log).await {
                        Some(kept) if kept == SERVER_ANSWERS => Err(
                            "its single-writer lock is lost, and it could not be cut off \
                             from its container in time (its I/O waits on a slow server); \
                             it is cut off as soon as that I/O ends: try again"
                                .into(),
                        ),
                        gave_up => Ok(Some(format!(
                            "lock lost; cut-off not done in time, share given up: {}",
                            gave_up.unwrap_or_default()
                        ))),
                    };
                }
            }
        }
    }

    /// See [`watch_detached`].
    pub fn watch_detached(&self, name: &str) {
        watch_detached(name, &self.log, &self.volumes);
    }

    /// Names whose stack an earlier agent left half built or half taken down (a backing
    /// directory or a `cnfs-<name>` mapping, but no volume among `mounted`). A mapping counts
    /// too: a share detached lazily is no longer found by its path.
    pub fn leftovers(mounted: &[String]) -> Vec<String> {
        let dirs = std::fs::read_dir(BACKING_ROOT)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let mappings = Sysfs::default()
            .dm_names()
            .into_iter()
            .filter_map(|n| n.strip_prefix("cnfs-").map(str::to_string));
        let mut names: Vec<String> = dirs
            .into_iter()
            .chain(mappings)
            .filter(|n| cnfs_protocols::spec::validate_name("name", n).is_ok())
            .filter(|n| !mounted.contains(n))
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// [`Luks2::teardown`] as a task of its own (for leftovers found at start-up); it skips a
    /// stack whose volume is mounted by the time it runs.
    pub fn teardown_unless_mounted(
        &self,
        name: &str,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let stack = self.stack(name);
        async move {
            let volume = cnfs_protocols::spec::mount_point(&stack.name);
            if mountinfo::find(&mountinfo::read().unwrap_or_default(), &volume).is_some() {
                return;
            }
            let notes = stack.down(CLEANUP_BOUND).await;
            info!(stack.log, "cleared what an earlier agent left of an encrypted volume";
                "volume" => stack.name.as_str(), "steps" => notes.join("; "));
        }
    }

    /// Takes down what is left of `name`'s stack (dm-crypt, loop, backing share) after its
    /// volume was unmounted; bounded by `budget`. Returns the steps that did not finish
    /// plainly.
    pub async fn teardown(&self, name: &str, budget: Duration) -> Vec<String> {
        let stack = self.stack(name);
        let notes = stack.down(budget).await;
        if stack.remains().await {
            stack.retry_later();
        }
        notes
    }
}

/// How often, and how many times, a stack that a teardown could not finish is taken down
/// again (an hour in all).
const RETRY_EVERY: Duration = Duration::from_secs(15);
const RETRIES: u32 = 240;

/// The handle on one volume's stack; everything is found again from the kernel by name.
#[derive(Clone)]
pub(super) struct Stack {
    pub(super) name: String,
    pub(super) tools: ToolClient,
    pub(super) locks: Arc<KeyedLocks<String>>,
    volumes: super::VolumeLocks,
    kdf_slots: Arc<tokio::sync::Semaphore>,
    retrying: Retrying,
    log: Logger,
}

/// Names with a task taking their leftovers down (see [`Stack::retry_later`]).
#[derive(Clone, Default)]
struct Retrying(Arc<std::sync::Mutex<std::collections::HashMap<String, bool>>>);

impl Retrying {
    /// The name's claim, unless a task holds it already: that task is then asked to run its
    /// rounds once more (it may be in its last one, past what was just left behind).
    fn claim(&self, name: &str) -> Option<RetryClaim> {
        let mut names = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(again) = names.get_mut(name) {
            *again = true;
            return None;
        }
        names.insert(name.to_string(), false);
        Some(RetryClaim {
            names: self.clone(),
            name: name.to_string(),
            released: false,
        })
    }
}

/// Held by the one task that retries a name; the name is free again when it is dropped.
struct RetryClaim {
    names: Retrying,
    name: String,
    released: bool,
}

impl RetryClaim {
    /// Whether the task runs its rounds again (a claim was asked for meanwhile); if not, the
    /// name is free from here on (in one step: a claim asked for later starts a new task).
    fn again_or_release(&mut self) -> bool {
        let mut names = self.names.0.lock().unwrap_or_else(|p| p.into_inner());
        match names.get_mut(&self.name) {
            Some(again) if *again => {
                *again = false;
                true
            }
            _ => {
                names.remove(&self.name);
                self.released = true;
                false
            }
        }
    }
}

impl Drop for RetryClaim {
    fn drop(&mut self) {
        if !self.released {
            let mut names = self.names.0.lock().unwrap_or_else(|p| p.into_inner());
            names.remove(&self.name);
        }
    }
}

impl Stack {
    /// A cryptsetup call that runs argon2 (format, open), at most two at a time.
    async fn argon2_call(
        &self,
        cmd: Command,
        key: &[u8],
        budget: Duration,
    ) -> Result<ToolOutcome, AgentError> {
        let started = Instant::now();
        let _slot = self.kdf_slot(budget).await?;
        let left = budget.saturating_sub(started.elapsed());
        self.tools.call(cmd, Some(key), left).await
    }

    /// One of the guest's two key-derivation slots (argon2 or scrypt: 64 MiB each), waited
    /// for at most `budget`; held while a tool derives a key.
    pub(super) async fn kdf_slot(
        &self,
        budget: Duration,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, AgentError> {
        tokio::time::timeout(budget, self.kdf_slots.clone().acquire_owned())
            .await
            .map_err(|_| {
                AgentError::Deadline(format!(
                    "volume {}: waited {budget:?} for other volumes' key derivations",
                    self.name
                ))
            })?
            .map_err(|_| AgentError::Internal("key derivation semaphore closed".into()))
    }

    /// Whether a piece of the stack is still there: its dm-crypt mapping, its share, an SMB
    /// lock holder.
    async fn remains(&self) -> bool {
        let backing = backing_dir(&self.name);
        Sysfs::default().dm_by_name(&dm_name(&self.name)).is_some()
            || mountinfo::find(&mountinfo::read().unwrap_or_default(), &backing).is_some()
            // A scan that does not answer counts as a holder there.
            || holders_of(&self.name).await.is_none_or(|pids| !pids.is_empty())
    }

    /// After a teardown that left something behind (a volume busy at Unmount: its dm-crypt
    /// mapping could not even be marked for deferred removal while its I/O waited on a dead
    /// server), takes the stack down again every [`RETRY_EVERY`], until nothing is left or
    /// the volume is mounted again.
    fn retry_later(self) {
        // One task per name: a caller that repeats a failed Unmount starts no second one.
        let Some(mut claim) = self.retrying.claim(&self.name) else {
            return;
        };
        tokio::spawn(async move {
            self.retry_rounds().await;
            while claim.again_or_release() {
                self.retry_rounds().await;
            }
        });
    }

    async fn retry_rounds(&self) {
        for _ in 0..RETRIES {
            tokio::time::sleep(RETRY_EVERY).await;
            let volume = cnfs_protocols::spec::mount_point(&self.name);
            let mounted =
                mountinfo::find(&mountinfo::read().unwrap_or_default(), &volume).is_some();
            if mounted || !self.remains().await {
                return;
            }
            let notes = self.down_unless_mounted().await;
            if !self.remains().await {
                info!(self.log, "encrypted volume's stack taken down at last";
                    "volume" => &self.name, "steps" => notes.join("; "));
                return;
            }
        }
    }

    /// Takes the stack down under its volume's lock unless the volume is mounted by then:
    /// for a stack that a failed or abandoned Mount left (a later Mount of the name may
    /// have built and mounted its own meanwhile).
    async fn down_unless_mounted(&self) -> Vec<String> {
        let _v = self.volumes.lock(&self.name).await;
        let volume = cnfs_protocols::spec::mount_point(&self.name);
        if mountinfo::find(&mountinfo::read().unwrap_or_default(), &volume).is_some() {
            return Vec::new();
        }
        self.down(CLEANUP_BOUND).await
    }

    async fn down(&self, budget: Duration) -> Vec<String> {
        let deadline = Instant::now() + budget;
        let _g = self.locks.lock(&self.name).await;
        self.down_locked(deadline).await
    }

    /// dm-crypt closed (deferred if still held), loops cleared (the kernel defers that too),
    /// the backing share unmounted (plain, force, detach). The OFD lock goes with the loop's
    /// last reference to the file.
    pub(super) async fn down_locked(&self, deadline: Instant) -> Vec<String> {
        // A gocryptfs volume's FUSE mount first: its daemon keeps files of the share open.
        let (mut notes, daemon_left) = super::gocryptfs::unmount_plain(&self.name, deadline).await;
        notes.extend(self.down_dm_and_loops(deadline).await);
        // An SMB container's lock holder goes once no loop uses the container: never while
        // one still writes to it (a clear deferred by a holder of the device).
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_secs(2));
        let holder_left = match end_holders(&self.name, wait).await {
            Holders::Gone => false,
            Holders::InUse => {
                notes.push("lock holder kept: a loop device still uses the container".into());
                false
            }
            Holders::Stuck => {
                notes.push("lock holder still running (stuck on its server)".into());
                true
            }
        };
        if daemon_left || holder_left {
            // A daemon that did not end may be stuck on a dead server, which would keep the
            // share busy for good: a share that does not answer is given up (as `stuck` does
            // for luks2's ext4); one that answers is left to whoever still holds the mount.
            notes.extend(give_up_if_dead(&self.name, &self.log).await);
        }
        notes.extend(unmount_backing(&backing_dir(&self.name), deadline).await);
        if !notes.is_empty() {
            warn!(self.log, "encrypted volume taken down with difficulty";
                "volume" => &self.name, "steps" => notes.join("; "));
        }
        notes
    }

    /// dm-crypt and the loops under it (and any loop on a file of the share), not the share.
    async fn down_dm_and_loops(&self, deadline: Instant) -> Vec<String> {
        let mut notes = Vec::new();
        let left = || deadline.saturating_duration_since(Instant::now());
        let sysfs = Sysfs::default();
        let mut loops = Vec::new();
        if let Some(kname) = sysfs.dm_by_name(&dm_name(&self.name)) {
            loops.extend(sysfs.loop_slaves(&kname));
            let close = |deferred| Command::LuksClose {
                name: self.name.clone(),
                deferred,
            };
            // Within the deadline, the runner's kill grace included: the plain close gets half
            // of what is left (libdevmapper retries a busy removal for ~5 s), the deferred
            // one the rest less the grace.
            let half = (left() / 2).max(Duration::from_millis(500));
            let rest = || {
                left()
                    .saturating_sub(Duration::from_secs(2))
                    .max(Duration::from_millis(500))
            };
            let closed = self.tools.call(close(false), None, half).await;
            if !matches!(
                closed,
                Ok(ToolOutcome {
                    exit: Exit::Code(0),
                    ..
                })
            ) {
                let deferred = self.tools.call(close(true), None, rest()).await;
                notes.push(format!(
                    "dm: close failed ({}); deferred removal: {}",
                    describe(&closed),
                    describe(&deferred)
                ));
            }
        }
        loops.extend(sysfs.loops_under(&backing_dir(&self.name)));
        loops.sort_unstable();
        loops.dedup();
        for n in loops {
            let outcome = killable::run(left().max(Duration::from_millis(500)), || {
                blockdev::detach(n).map(|()| [0; 6])
            })
            .await;
            if outcome != Outcome::Done([0; 6]) {
                notes.push(format!("loop{n}: clear: {outcome:?}"));
                continue;
            }
            // A clear is deferred while someone still has the device open (udev's blkid
            // probe): the file, and its lock, go only then. Waited for, briefly, so that
            // this guest's next open does not meet its own lock.
            let until = Instant::now() + left().min(Duration::from_secs(3));
            while sysfs.loop_bound(n) && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if sysfs.loop_bound(n) {
                notes.push(format!("loop{n}: cleared when released"));
            }
        }
        notes
    }
}

/// Volume `name`'s lock (SMB only: see [`crate::tools::holder`]) taken by a holder the
/// runner starts; `None` when it is held (or no holder is needed), else what stands in the
/// way, as [`open_and_bind`] tells it.
async fn hold(
    stack: &Stack,
    spec: &VolumeSpec,
    budget: Duration,
) -> Result<Option<Opened>, AgentError> {
    if !matches!(spec.source, Source::Smb(_)) {
        return Ok(None);
    }
    let report = stack
        .tools
        .hold_lock(&stack.name, spec.read_only, budget)
        .await?;
    Ok(match report {
        Report::Held => None,
        Report::Open(Errno::ENOENT) => Some(Opened::Not(Found::Absent)),
        Report::Open(Errno::ELOOP) => Some(Opened::Not(Found::NotRegular)),
        Report::Open(errno) => Some(Opened::Failed {
            step: "open",
            errno,
        }),
        Report::Lock(Errno::EAGAIN | Errno::EACCES) => Some(Opened::InUse),
        Report::Lock(errno) => Some(Opened::Failed {
            step: "lock",
            errno,
        }),
    })
}

/// Why an SMB luks2 volume's single-writer lock is gone (its holder process was killed by
/// someone other than the agent, or ended on finding the lock lost after a reconnect:
/// [`crate::tools::holder::LOST`]): another guest could open the container now. `None` for
/// any other volume, or while the holder lives.
pub async fn lock_lost(name: &str, entries: &[MountEntry]) -> Option<String> {
    let backing = mountinfo::find(entries, &backing_dir(name))?;
    if !matches!(backing.fs_type.as_str(), "cifs" | "smb3") {
        return None;
    }
    // A gocryptfs volume on SMB has a share too, but no container and no lock.
    Sysfs::default().dm_by_name(&dm_name(name))?;
    // A scan that does not answer says nothing (the lock may well be there).
    holders_of(name).await?.is_empty().then(|| {
        "the container's single-writer lock is gone (its holder process, \
             cnfs-lock-holder, was killed, or found the lock taken by another client after the \
             connection to the server was remade): another guest could open the volume now; \
             unmount it and mount it again"
            .to_string()
    })
}

/// Kills volume `name`'s lock holders (found by their argv, so also after an agent restart)
/// and waits up to `within` for them to be gone; false if one is still there.
async fn end_holders(name: &str, within: Duration) -> Holders {
    let container = luks2_container(name);
    let until = Instant::now() + within;
    loop {
        let c = container.clone();
        // Scanned and killed off the runtime's threads (see `holders_of`).
        let scan = tokio::task::spawn_blocking(move || {
            let (pids, in_use): (Vec<i32>, Vec<i32>) = holder_pids(&c)
                .into_iter()
                .partition(|&pid| !holder_in_use(pid));
            if !in_use.is_empty() {
                return None;
            }
            let ours = std::fs::metadata("/proc/self/exe").ok();
            for &pid in &pids {
                kill_holder(pid, &c, ours.as_ref());
            }
            Some(pids.len())
        });
        let left = until.saturating_duration_since(Instant::now());
        let found = match tokio::time::timeout(left.max(Duration::from_millis(100)), scan).await {
            Ok(Ok(found)) => found,
            _ => return Holders::Stuck,
        };
        match found {
            // Never while a loop device still writes the container (a volume busy at
            // Unmount is detached; the holder ends itself once its loop has gone).
            None => return Holders::InUse,
            Some(0) => return Holders::Gone,
            Some(_) => {}
        }
        if Instant::now() >= until {
            return Holders::Stuck;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGKILL to holder `pid` of `container`, pinned by a pidfd and checked again once pinned:
/// a holder that ended on its own meanwhile (it does, about a second after its loop went)
/// leaves its pid free for another process, which is never the one killed.
fn kill_holder(pid: i32, container: &str, ours: Option<&std::fs::Metadata>) {
    let Ok(fd) = pin(pid) else {
        return;
    };
    if is_holder(pid, container, ours) {
        let _ = cnfs_protocols::pidfd::send_signal(&fd, libc::SIGKILL);
    }
}

/// A pidfd of process `pid` (from /proc: a pid_t).
fn pin(pid: i32) -> std::io::Result<std::os::fd::OwnedFd> {
    u32::try_from(pid)
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
        .and_then(cnfs_protocols::pidfd::open)
}

/// Volume `name`'s lock holders, scanned off the runtime's threads (reading a process's
/// arguments waits on its memory map, which a process stuck on a dead server may hold);
/// `None` when the scan does not answer within 1 s.
async fn holders_of(name: &str) -> Option<Vec<i32>> {
    let c = luks2_container(name);
    let scan = tokio::task::spawn_blocking(move || holder_pids(&c));
    tokio::time::timeout(Duration::from_secs(1), scan)
        .await
        .ok()?
        .ok()
}

/// The lock holders of `container` (see [`is_holder`]).
fn holder_pids(container: &str) -> Vec<i32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let ours = std::fs::metadata("/proc/self/exe").ok();
    procs
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<i32>().ok()?;
            is_holder(pid, container, ours.as_ref()).then_some(pid)
        })
        .collect()
}

/// Whether process `pid` holds `container`'s lock: named for the holder (`comm`, which the
/// kernel answers without the process's memory map: another process stuck on a dead server
/// does not stop the scan), with its argv (read only for those), running the agent's own
/// binary `ours` (any process can give itself a holder's argv: a container's would otherwise
/// stand in for a killed holder, or be killed itself).
fn is_holder(pid: i32, container: &str, ours: Option<&std::fs::Metadata>) -> bool {
    let dir = PathBuf::from(format!("/proc/{pid}"));
    let comm = crate::tools::holder::HOLDER_COMM.to_bytes();
    let Ok(named) = std::fs::read(dir.join("comm")) else {
        return false;
    };
    if named.strip_suffix(b"\n").unwrap_or(&named) != comm {
        return false;
    }
    let Ok(cmdline) = std::fs::read(dir.join("cmdline")) else {
        return false;
    };
    let mut args = cmdline.split(|&b| b == 0);
    let argv_matches = args.next() == Some(LOCK_HOLDER_ARGV0.as_bytes())
        && args.any(|a| a == container.as_bytes());
    let exe = std::fs::metadata(dir.join("exe")).ok();
    argv_matches
        && matches!((ours, exe), (Some(a), Some(b)) if a.dev() == b.dev() && a.ino() == b.ino())
}

/// What [`end_holders`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holders {
    /// None (left).
    Gone,
    /// One whose loop device still uses its file: kept.
    InUse,
    /// One that did not end, or a scan that did not answer, in time.
    Stuck,
}

/// Whether a bound loop device uses the file lock holder `pid` keeps open: compared by the
/// kernel's name of the file (the same from one reader, also once the share is detached),
/// read from /proc and sysfs, never from the server. A holder whose descriptors cannot be
/// read (gone meanwhile) is not in use; one without the container among them is.
fn holder_in_use(pid: i32) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    let files: Vec<PathBuf> = fds
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter(|p| p.to_string_lossy().contains(CONTAINER))
        .collect();
    let sysfs = Sysfs::default();
    files.is_empty() || files.iter().any(|f| sysfs.loop_uses(f))
}

/// The processes with `arg` among their arguments (`/proc/<pid>/cmdline`), and `argv0`
/// first if given: gocryptfs daemons by their tree, lock holders by their container.
pub(super) fn pids_with_arg(argv0: Option<&str>, arg: &str) -> Vec<i32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<i32>().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let mut args = cmdline.split(|&b| b == 0);
            let first = args.next()?;
            let named = argv0.is_none_or(|a| a.as_bytes() == first);
            (named && (first == arg.as_bytes() || args.any(|a| a == arg.as_bytes()))).then_some(pid)
        })
        .collect()
}

/// What [`give_up_if_dead`] says of a share it kept.
const SERVER_ANSWERS: &str = "backing: its server answers; not shut down";

/// See [`Luks2::stuck`]: the share is given up only when it does not answer a statfs in 2 s.
async fn give_up_if_dead(name: &str, log: &Logger) -> Option<String> {
    let backing = backing_dir(name);
    let entries = mountinfo::read().unwrap_or_default();
    let entry = mountinfo::find(&entries, &backing)?.clone();
    let knob = Path::new("/sys/fs/nfs").join(&entry.dev).join("shutdown");
    let budget = Duration::from_secs(2);
    // A slow server that still answers keeps its writes: only a share that does not
    // answer a statfs at all is given up.
    let probe = cstring(&backing).ok()?;
    let answered = killable::run(budget, || crate::volumes::statfs(&probe)).await;
    if matches!(answered, Outcome::Done(_)) {
        return Some(SERVER_ANSWERS.into());
    }
    if entry.fs_type.starts_with("nfs") && knob.exists() {
        let Ok(path) = cstring(&knob) else {
            return Some("backing: shutdown path has a NUL byte".into());
        };
        let outcome = killable::run(budget, || {
            let fd = nix::fcntl::open(
                path.as_c_str(),
                nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )?;
            // SAFETY: `fd` was just opened by this child and is closed right after.
            let file = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            let written = nix::unistd::write(file, b"1");
            let _ = nix::unistd::close(fd);
            written.map(|_| [0; 6])
        })
        .await;
        warn!(log, "share of an encrypted volume shut down: its server does not answer";
            "volume" => name, "outcome" => format!("{outcome:?}"));
        return Some(format!("backing: NFS client shut down ({outcome:?})"));
    }
    let Ok(target) = cstring(&backing) else {
        return Some("backing: path has a NUL byte".into());
    };
    let outcome = killable::run(budget, || {
        nix::mount::umount2(target.as_c_str(), MntFlags::MNT_FORCE).map(|()| [0; 6])
    })
    .await;
    Some(format!("backing: forced ({outcome:?})"))
}

fn describe(r: &Result<ToolOutcome, AgentError>) -> String {
    match r {
        Ok(o) => format!("{:?}: {}", o.exit, o.stderr.trim()),
        Err(e) => e.to_string(),
    }
}

/// Unmounts the backing share if mounted: plain (the loop's deferred rundown may need a
/// moment: EBUSY is retried), then force, then detach; removes its directory.
async fn unmount_backing(backing: &Path, deadline: Instant) -> Vec<String> {
    let mut notes = Vec::new();
    let mounted = || mountinfo::find(&mountinfo::read().unwrap_or_default(), backing).is_some();
    if !mounted() {
        let _ = std::fs::remove_dir(backing);
        return notes;
    }
    let Ok(target) = CString::new(backing.as_os_str().as_bytes()) else {
        return vec!["backing: path has a NUL byte".into()];
    };
    let target = target.as_c_str();
    let left = || deadline.saturating_duration_since(Instant::now());
    let mut done = false;
    let mut hung = false;
    // Plain, retried while busy for up to 40% of the time left (a loop's deferred rundown
    // lets go of the file a moment after LOOP_CLR_FD).
    let plain_until = Instant::now() + left() * 2 / 5;
    loop {
        let slice =
            (plain_until.saturating_duration_since(Instant::now())).max(Duration::from_millis(500));
        match killable::run(slice, || {
            nix::mount::umount2(target, MntFlags::empty()).map(|()| [0; 6])
        })
        .await
        {
            Outcome::Done(_) | Outcome::Failed(Errno::EINVAL) => {
                done = true;
                break;
            }
            Outcome::Failed(Errno::EBUSY) if Instant::now() < plain_until => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => {
                hung = other == Outcome::TimedOut;
                notes.push(format!("backing umount: {other:?}"));
                break;
            }
        }
    }
    // Still busy: something above still uses the share (a mapping whose removal was
    // deferred, an ext4 that containers still hold after a forced Unmount). Forcing it would
    // fail their I/O, so it is only detached: it goes when they let go. Only a share that
    // does not answer at all is forced first.
    let steps: &[(&str, MntFlags)] = if hung {
        &[
            ("force", MntFlags::MNT_FORCE),
            ("detach", MntFlags::MNT_DETACH),
        ]
    } else {
        &[("detach", MntFlags::MNT_DETACH)]
    };
    if !done {
        for (step, flag) in steps {
            let slice = (left() / 2).max(Duration::from_millis(500));
            match killable::run(slice, || {
                nix::mount::umount2(target, *flag).map(|()| [0; 6])
            })
            .await
            {
                Outcome::Done(_) | Outcome::Failed(Errno::EINVAL) => {
                    notes.push(format!("backing: {step}"));
                    break;
                }
                other => notes.push(format!("backing {step}: {other:?}")),
            }
        }
    }
    let _ = std::fs::remove_dir(backing);
    notes
}

/// A built stack nobody has mounted yet: taken down again when dropped (the mount failed,
/// or its caller went away), unless the mount took it over.
/// Which encryption layer a stack is built for.
#[derive(Debug, Clone, Copy)]
pub(super) enum Layer {
    Luks2,
    Gocryptfs,
}

pub(super) struct Built {
    stack: Option<Stack>,
    dm_kernel_name: String,
    /// The container grew: its ext4 is grown to fill it once mounted.
    grow_fs: bool,
    /// On an SMB share: a lock holder keeps the single-writer lock (watched while mounted).
    smb: bool,
}

impl Built {
    /// A stack built for a mount that has no device of its own (gocryptfs).
    pub(super) fn without_device(stack: Stack) -> Self {
        Built {
            stack: Some(stack),
            dm_kernel_name: String::new(),
            grow_fs: false,
            smb: false,
        }
    }

    pub(super) fn keep(mut self) {
        self.stack = None;
    }
}

impl Drop for Built {
    fn drop(&mut self) {
        if let Some(stack) = self.stack.take() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    stack.down_unless_mounted().await;
                });
            }
        }
    }
}

pub(super) struct StackAttempt {
    pub(super) built: Option<Built>,
}

impl Attempt for StackAttempt {
    fn undo(&mut self) {
        // Dropping it takes the stack down, in the background, under the volume's stack lock.
        self.built = None;
    }

    fn after_mount(&mut self) -> Option<super::AfterMount> {
        let b = self.built.as_ref().filter(|b| b.grow_fs)?;
        let name = b.stack.as_ref()?.name.clone();
        let log = b.stack.as_ref()?.log.clone();
        let device = format!("/dev/{}", b.dm_kernel_name);
        Some(Box::pin(grow_fs(name, device, log)))
    }

    fn into_attachment(
        mut self: Box<Self>,
        log: &Logger,
        locks: &super::VolumeLocks,
    ) -> Option<Box<dyn super::Attachment>> {
        let b = self.built.take()?;
        let watch = b
            .stack
            .as_ref()
            .filter(|_| b.smb && !b.dm_kernel_name.is_empty())
            .and_then(|s| LockWatch::start(s.name.clone(), log.clone(), locks.clone()));
        b.keep();
        watch
    }
}

/// While an SMB luks2 volume is mounted, it waits for the volume's lock holder to end. A
/// holder ends while its volume is mounted only when someone killed it or it found its lock
/// taken by another client after a reconnect ([`crate::tools::holder::LOST`]): either way
/// nothing keeps a second guest out any more, so the volume's ext4 is shut down without
/// writing anything more (every later access fails with EIO until it is unmounted; `Stats`
/// says why): the one thing this guest can still do against two writers. Unmount drops it
/// first (the holder it kills is no fault).
pub(super) struct LockWatch {
    task: tokio::task::JoinHandle<()>,
}

impl LockWatch {
    /// `None` outside an async runtime (nothing to watch with).
    pub(super) fn start(
        name: String,
        log: Logger,
        locks: super::VolumeLocks,
    ) -> Option<Box<dyn super::Attachment>> {
        let rt = tokio::runtime::Handle::try_current().ok()?;
        let task = rt.spawn(watch_holder(name, log, locks, None));
        Some(Box::new(LockWatch { task }))
    }
}

impl Drop for LockWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[async_trait]
impl super::Attachment for LockWatch {
    fn readiness(&self) -> super::Readiness {
        super::Readiness::Served { answered: true }
    }
    fn answered(&self) {}
    fn halt(&self) {
        self.task.abort();
    }
    async fn stop(&self) {
        self.task.abort();
    }
}

/// Cuts volume `name` off once its lock holder ends: a mounted volume's (`detached` None),
/// or, with `detached` the kernel name of its mapping, one that a detached volume left.
async fn watch_holder(
    name: String,
    log: Logger,
    locks: super::VolumeLocks,
    detached: Option<String>,
) {
    match holder_ended(&name, &log).await {
        Holder::Ended => {}
        // A mounted SMB volume without a holder has no lock either.
        Holder::None if detached.is_none() => {}
        Holder::None | Holder::Unwatched => return,
    }
    // Each attempt under the volume's lock (an Unmount in progress finishes, and drops this,
    // first), released between attempts so that an Unmount can come in; the pause is short,
    // since between attempts new writes reach the old table.
    loop {
        {
            let _g = locks.lock(&name).await;
            // A volume of the name mounted again has a watch of its own (a detached one's
            // mapping is gone by then: a holder ends by itself once its loop has).
            let mount_point = cnfs_protocols::spec::mount_point(&name);
            if detached.is_some()
                && mountinfo::find(&mountinfo::read().unwrap_or_default(), &mount_point).is_some()
            {
                return;
            }
            if fence(&name, &log, detached.as_deref(), FENCE_ATTEMPT).await != Fence::NotYet {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// How [`holder_ended`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holder {
    None,
    Ended,
    Unwatched,
}

/// Waits for volume `name`'s lock holder to end.
async fn holder_ended(name: &str, log: &Logger) -> Holder {
    // A scan that does not answer (a process stuck on a dead server) is tried again.
    let mut wait = Duration::from_secs(1);
    let pids = loop {
        if let Some(pids) = holders_of(name).await {
            break pids;
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(30));
    };
    let Some(&pid) = pids.first() else {
        return Holder::None;
    };
    match pin(pid).and_then(cnfs_protocols::pidfd::readable_when_exited) {
        Ok(fd) => {
            // The pid is still a holder of this volume's once the pidfd pins it (no reuse);
            // a scan that does not answer is asked again.
            let still = loop {
                if let Some(p) = holders_of(name).await {
                    break p.contains(&pid);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            };
            if still {
                let _ = fd.readable().await;
            }
            Holder::Ended
        }
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Holder::Ended,
        Err(e) => {
            error!(log, "lock holder not watched: a lost lock will not be fenced";
                "volume" => name, "error" => %e);
            Holder::Unwatched
        }
    }
}

/// How long one attempt to swap a mapping's table may wait for its I/O in flight.
const FENCE_ATTEMPT: Duration = Duration::from_secs(10);

/// What one attempt of [`fence`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fence {
    Done,
    /// No such mapping (any more), or not the one watched: nothing to cut off.
    NotThere,
    /// The table could not be swapped within the attempt: try again.
    NotYet,
}

/// Cuts volume `name` off from its container; the caller holds the volume's lock. Found by
/// its mapping's name (`only`: and by its kernel name, for a mapping a detached volume left),
/// so that a volume whose mount is already detached is cut off too. First the mapping: its
/// table becomes one `error` target, so that nothing more reaches the container, not even
/// what ext4 still writes as it shuts down (the journal's superblock) or unmounts (its own
/// superblock). Then ext4, if mounted, so that its users get EIO at once rather than errors
/// from below. While the table cannot be swapped (its I/O waits on a server that does not
/// answer), ext4 is left alone: shutting it down would write through the old table.
async fn fence(name: &str, log: &Logger, only: Option<&str>, attempt: Duration) -> Fence {
    let sysfs = Sysfs::default();
    let Some(kname) = sysfs.dm_by_name(&dm_name(name)) else {
        return Fence::NotThere;
    };
    if only.is_some_and(|k| k != kname) {
        return Fence::NotThere;
    }
    let (Some(sectors), Ok(dm)) = (sysfs.sectors(&kname), CString::new(dm_name(name))) else {
        return Fence::NotYet;
    };
    let table = killable::run(attempt, || {
        blockdev::fail_all_io(&dm, sectors).map(|()| [0; 6])
    })
    .await;
    if table != Outcome::Done([0; 6]) {
        error!(log, "single-writer lock lost, and the volume could not be cut off from its \
            container yet (its I/O waits on the server): trying again"; "volume" => name,
            "mapping" => format!("{table:?}"));
        return Fence::NotYet;
    }
    let mount_point = cnfs_protocols::spec::mount_point(name);
    let entries = mountinfo::read().unwrap_or_default();
    let ext4 = mountinfo::find(&entries, &mount_point).is_some_and(|e| e.fs_type == "ext4");
    let fs = match cstring(&mount_point) {
        Ok(mp) if ext4 => {
            let r = killable::run(Duration::from_secs(5), || {
                blockdev::shut_down(&mp).map(|()| [0; 6])
            })
            .await;
            format!("{r:?}")
        }
        _ => "not mounted here".to_string(),
    };
    error!(log, "single-writer lock lost: the volume is cut off from its container (every \
        access fails with EIO until it is unmounted)"; "volume" => name,
        "file_system" => fs);
    Fence::Done
}

/// A volume detached at Unmount while containers still held it keeps its stack (and its
/// lock) until the last of them lets go; its lock holder is watched like a mounted volume's
/// until then (not at all when it has none: not on SMB).
pub(super) fn watch_detached(name: &str, log: &Logger, locks: &super::VolumeLocks) {
    let Some(kname) = Sysfs::default().dm_by_name(&dm_name(name)) else {
        return;
    };
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(watch_holder(
            name.to_string(),
            log.clone(),
            locks.clone(),
            Some(kname),
        ));
    }
}

/// Grows the volume's mounted ext4 to fill its grown container, online (ext4's resize
/// ioctl). Best effort: a volume that could not grow is mounted at its old size, and says so
/// in the log; the next mount tries again.
async fn grow_fs(name: String, device: String, log: Logger) {
    let mount_point = cnfs_protocols::spec::mount_point(&name);
    let (Ok(dev), Ok(mp)) = (CString::new(device), cstring(&mount_point)) else {
        return;
    };
    // ext4's resize adds block groups in memory and journals them: no server round trip per
    // group, but bounded all the same.
    let outcome = killable::run(Duration::from_secs(30), || {
        blockdev::grow_ext4(&dev, &mp).map(|[b, f, t]| [b, f, t, 0, 0, 0])
    })
    .await;
    match outcome {
        Outcome::Done([bytes, _, blocks, ..]) => info!(log, "volume's file system grown";
            "volume" => name.as_str(), "device_bytes" => bytes, "blocks" => blocks),
        other => {
            warn!(log, "volume's file system not grown (it keeps its size until the next mount)";
            "volume" => name.as_str(), "outcome" => format!("{other:?}"))
        }
    }
}

pub(super) fn encryption(spec: &VolumeSpec) -> Result<&Encryption, AgentError> {
    spec.encryption
        .as_ref()
        .ok_or_else(|| AgentError::Internal("luks2 handler given a spec without encryption".into()))
}

#[async_trait]
impl MountHandler for Luks2 {
    fn name(&self) -> &'static str {
        "luks2"
    }

    fn kernel_types(&self) -> &'static [&'static str] {
        &["ext4"]
    }

    fn recognises(&self, spec: &VolumeSpec, e: &MountEntry) -> bool {
        spec.encryption.is_some()
            && e.fs_type == "ext4"
            && Sysfs::default().dm_by_name(&dm_name(&spec.name)).is_some()
    }

    async fn plan(&self, spec: &VolumeSpec, ctx: &Context<'_>) -> Result<MountPlan, AgentError> {
        let name = &spec.name;
        let enc = encryption(spec)?;
        if let Some(why) = self.tools.missing() {
            return Err(AgentError::FailedPrecondition(format!(
                "volume {name}: encryption=luks2 needs cryptsetup and mke2fs in the guest: {why}"
            )));
        }
        if !matches!(
            spec.source,
            Source::Nfs(_) | Source::CephFs(_) | Source::Smb(_)
        ) {
            return Err(AgentError::FailedPrecondition(format!(
                "volume {name}: encryption=luks2 is served on NFSv4, CephFS and SMB shares only"
            )));
        }
        let deadline = Instant::now() + ctx.budget;
        let dir = ctx.modules_dir.to_path_buf();
        tokio::task::spawn_blocking(move || -> Result<(), AgentError> {
            for m in ["loop", "dm_mod", "dm_crypt", "xts"] {
                kmod::ensure(&dir, m).map_err(|e| AgentError::FailedPrecondition(e.to_string()))?;
            }
            // Faster AES where the CPU has it; none is no error.
            let _ = kmod::ensure(&dir, "aesni_intel");
            Ok(())
        })
        .await
        .map_err(|e| AgentError::Internal(format!("module loading task: {e}")))??;

        let built = self
            .build_detached(Layer::Luks2, spec, enc, ctx, deadline)
            .await?;
        Ok(MountPlan {
            source: format!("/dev/{}", built.dm_kernel_name),
            fs_type: "ext4".into(),
            flags: vfs_flags(spec),
            data: "errors=remount-ro".into(),
            attempt: Box::new(StackAttempt { built: Some(built) }),
        })
    }

    /// After an agent restart: an SMB volume's lock holder is watched again.
    fn reattach(
        &self,
        spec: &VolumeSpec,
        log: &Logger,
        locks: &super::VolumeLocks,
    ) -> Result<Option<Box<dyn super::Attachment>>, AgentError> {
        Ok(matches!(spec.source, Source::Smb(_))
            .then(|| LockWatch::start(spec.name.clone(), log.clone(), locks.clone()))
            .flatten())
    }
}

/// Container (formatted first if new), loop, dm-crypt, on the mounted backing share.
/// Called with the stack lock held; on error the caller takes down what is there.
async fn build(
    stack: &Stack,
    spec: &VolumeSpec,
    enc: &Encryption,
    deadline: Instant,
    log: &Logger,
) -> Result<Built, AgentError> {
    let name = &stack.name;
    let left = || deadline.saturating_duration_since(Instant::now());
    let dir = backing_dir(name);
    let file = dir.join(CONTAINER);
    let shown = format!("volume {name}: {CONTAINER} on the share");
    let size = if spec.read_only {
        enc.size
    } else {
        let recorded = recorded_size(&dir, enc.size, left(), log).await;
        if enc.grow_to_quota {
            recorded.max(quota_size(&dir, left(), log).await)
        } else {
            recorded
        }
    };
    let smb = matches!(spec.source, Source::Smb(_));
    if smb && holders_of(name).await.is_none_or(|pids| !pids.is_empty()) {
        // Left by an earlier mount of this name whose loop device is still in use (a volume
        // busy at Unmount is detached, and its holder ends itself once the loop goes):
        // killing it would let a second loop write the same container.
        return Err(AgentError::FailedPrecondition(format!(
            "{shown}: the lock holder of an earlier mount of this volume still runs in this \
             guest (its loop device is still in use: a process keeps the old mount busy); \
             try again once it has let go"
        )));
    }
    let mut formatted = false;
    loop {
        let opened = match hold(stack, spec, left()).await? {
            Some(not_held) => not_held,
            None => open_and_bind(&file, false, spec.read_only, size, !smb, left()).await?,
        };
        match opened {
            Opened::Loop { n, grown_from, .. } => {
                if grown_from > 0 {
                    info!(log, "encrypted container grown to the size asked for";
                        "volume" => name.as_str(), "from" => grown_from, "to" => size);
                }
                let started = Instant::now();
                luks_open(stack, n, enc, spec.read_only, left(), &shown).await?;
                let dm = Sysfs::default().dm_by_name(&dm_name(name)).ok_or_else(|| {
                    AgentError::Internal(format!(
                        "volume {name}: dm-crypt mapping not found after opening"
                    ))
                })?;
                info!(log, "encrypted container opened"; "volume" => name.as_str(),
                    "loop" => n, "dio" => Sysfs::default().loop_dio(n).unwrap_or(false),
                    "dm" => &dm, "open_ms" => started.elapsed().as_millis() as u64);
                if !spec.read_only {
                    remove_abandoned(&dir, left(), log).await;
                }
                return Ok(Built {
                    stack: Some(stack.clone()),
                    dm_kernel_name: dm,
                    grow_fs: grown_from > 0,
                    smb,
                });
            }
            Opened::InUse => {
                return Err(AgentError::FailedPrecondition(format!(
                    "{shown} is in use by another client (server-side lock held); if that guest \
                     crashed, the server frees it after its lease (NFSv4: the server's lease \
                     time; CephFS: the MDS session timeout)"
                )))
            }
            Opened::Failed { step, errno } => {
                let m = format!("{shown}: {step}: {}", errno.desc());
                return Err(match errno {
                    Errno::EACCES | Errno::EPERM => AgentError::PermissionDenied(format!(
                        "{m} (the server refuses the guest's root: check the export's squash \
                         rules)"
                    )),
                    Errno::EISDIR | Errno::ENOLCK | Errno::EROFS | Errno::EFBIG => {
                        AgentError::FailedPrecondition(m)
                    }
                    _ => AgentError::Internal(m),
                });
            }
            Opened::Not(found) => match decide(found, spec.read_only, &shown) {
                Action::Refuse(e) => return Err(e),
                Action::Open => {
                    return Err(AgentError::Internal(format!(
                        "{shown}: opened but not bound"
                    )))
                }
                Action::CreateAndFormat if formatted => {
                    return Err(AgentError::Internal(format!(
                        "{shown}: gone again right after it was published"
                    )))
                }
                Action::CreateAndFormat => {
                    format_new(stack, &dir, enc, deadline, log).await?;
                    formatted = true;
                }
            },
        }
    }
}

/// Mounts the share that holds the container at `/run/cnfs/backing/<name>`, with the
/// inner file system's own handler.
async fn mount_backing(
    spec: &VolumeSpec,
    ctx: &Context<'_>,
    deadline: Instant,
) -> Result<(), AgentError> {
    let name = &spec.name;
    let inner: &dyn MountHandler = match spec.source {
        Source::Nfs(_) => &super::nfs::Nfs,
        Source::CephFs(_) => &super::cephfs::CephFs,
        Source::Smb(_) => &super::smb::Smb,
        _ => {
            return Err(AgentError::Internal(format!(
                "volume {name}: no backing handler for {}",
                spec.fs_name()
            )))
        }
    };
    let mut plan = inner.plan(spec, ctx).await?;
    // A superblock (CephFS: a client session) of its own, never shared with another mount of
    // the same export: a dead server's share can then be shut down or forced (see `stuck`)
    // without touching any other volume, and a second opener in this guest meets the
    // server's lock, not a local one.
    match spec.source {
        Source::Nfs(_) => plan.data.push_str(",nosharecache"),
        Source::CephFs(_) => plan.data.push_str(",noshare"),
        Source::Smb(_) => plan.data.push_str(",nosharesock"),
        _ => {}
    }
    let mut attempt = plan.attempt;
    let backing = backing_dir(name);
    create_private_dir(Path::new(BACKING_ROOT))?;
    // Holds only the container: nothing on it is executed or a device.
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if spec.read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    let what = format!("volume {name}'s share ({})", plan.source);
    let outcome = crate::volumes::mount_in_child(
        &what,
        &backing,
        &plan.source,
        &plan.fs_type,
        flags,
        plan.data,
        attempt.keep_fd(),
        deadline,
    )
    .await?;
    let failed = match outcome {
        Outcome::Done(_) => return Ok(()),
        Outcome::Failed(e) => attempt
            .failed(&what, e)
            .unwrap_or_else(|| AgentError::from_mount_errno(&what, e)),
        Outcome::TimedOut => AgentError::Deadline(format!(
            "mounting {what}: the server did not answer in time"
        )),
    };
    attempt.undo();
    Err(failed)
}

pub(super) fn create_private_dir(dir: &Path) -> Result<(), AgentError> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(dir)
    {
        Ok(()) => Ok(()),
        Err(e) => Err(AgentError::Internal(format!(
            "creating {}: {e}",
            dir.display()
        ))),
    }
}

async fn luks_open(
    stack: &Stack,
    n: u32,
    enc: &Encryption,
    read_only: bool,
    budget: Duration,
    shown: &str,
) -> Result<(), AgentError> {
    let out = stack
        .argon2_call(
            Command::LuksOpen {
                device: n,
                name: stack.name.clone(),
                read_only,
            },
            enc.key.expose(),
            budget,
        )
        .await?;
    match out.exit {
        Exit::Code(0) => Ok(()),
        Exit::Code(2) => Err(AgentError::PermissionDenied(format!(
            "{shown}: the key does not open it (no key slot accepts it); nothing was changed"
        ))),
        Exit::Code(1) => Err(AgentError::FailedPrecondition(format!(
            "{shown}: cryptsetup cannot open it (cryptsetup: {}); if its LUKS2 header is \
             damaged, restore it from a header backup (cryptsetup luksHeaderRestore); CNFS \
             never reformats it",
            first_line(&out.stderr)
        ))),
        Exit::Code(5) => Err(AgentError::FailedPrecondition(format!(
            "{shown}: a device-mapper device {} exists already and could not be removed",
            dm_name(&stack.name)
        ))),
        Exit::Code(3) => Err(AgentError::FailedPrecondition(format!(
            "{shown}: the guest has too little memory for the key slot's cost"
        ))),
        Exit::TimedOut => Err(AgentError::Deadline(format!(
            "{shown}: opening took longer than {budget:?}"
        ))),
        other => Err(AgentError::Internal(format!(
            "{shown}: cryptsetup open: {other:?}: {}",
            first_line(&out.stderr)
        ))),
    }
}

pub(super) fn first_line(s: &str) -> &str {
    s.lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
}

/// Requires a tool to have exited 0; anything else is an INTERNAL error naming the step.
fn succeeded(step: &str, out: ToolOutcome) -> Result<(), AgentError> {
    match out.exit {
        Exit::Code(0) => Ok(()),
        Exit::TimedOut => Err(AgentError::Deadline(format!("{step}: took too long"))),
        other => Err(AgentError::Internal(format!(
            "{step}: {other:?}: {}",
            first_line(&out.stderr)
        ))),
    }
}

/// A new container: formatted as a temporary file no other guest can know, then published
/// under the fixed name with link(2) (EEXIST: another guest was first; its container is
/// opened instead). The temporary name is removed on every path.
async fn format_new(
    stack: &Stack,
    dir: &Path,
    enc: &Encryption,
    deadline: Instant,
    log: &Logger,
) -> Result<(), AgentError> {
    let left = || deadline.saturating_duration_since(Instant::now());
    let temp = dir.join(format!("{TEMP_PREFIX}{:016x}", random_u64()?));
    let result = format_temp(stack, &temp, enc, deadline, log).await;
    // The temp stack goes whatever happened; then the name is published or dropped.
    let notes = stack
        .down_dm_and_loops(Instant::now() + CLEANUP_BOUND)
        .await;
    let published = match result {
        Ok(()) if notes.is_empty() => {
            let (t, f) = (cstring(&temp)?, cstring(&dir.join(CONTAINER))?);
            match killable::run(left(), || {
                nix::unistd::linkat(
                    None,
                    t.as_c_str(),
                    None,
                    f.as_c_str(),
                    nix::fcntl::AtFlags::empty(),
                )
                .map(|()| [0; 6])
            })
            .await
            {
                Outcome::Done(_) => Ok(()),
                // EEXIST: another client published first. ENOENT: our temp is gone, which
                // only an opener of a published container does (see `remove_abandoned`).
                Outcome::Failed(Errno::EEXIST | Errno::ENOENT) => {
                    info!(log, "another client published the container first; opening theirs";
                        "volume" => stack.name.as_str());
                    Ok(())
                }
                Outcome::Failed(e) => Err(AgentError::Internal(format!(
                    "publishing {CONTAINER} (link): {}",
                    e.desc()
                ))),
                Outcome::TimedOut => Err(AgentError::Deadline(format!(
                    "publishing {CONTAINER}: the server did not answer"
                ))),
            }
        }
        Ok(()) => Err(AgentError::Internal(format!(
            "formatting {CONTAINER}: could not release the new container: {}",
            notes.join("; ")
        ))),
        Err(e) => Err(e),
    };
    let t = cstring(&temp)?;
    let removed = path_call(
        "removing the temporary container",
        left().max(Duration::from_millis(500)),
        || nix::unistd::unlink(t.as_c_str()),
    )
    .await;
    if let Err(e) = removed {
        warn!(log, "temporary container left on the share"; "volume" => stack.name.as_str(),
            "file" => temp.display().to_string(), "error" => %e);
    }
    published
}

async fn format_temp(
    stack: &Stack,
    temp: &Path,
    enc: &Encryption,
    deadline: Instant,
    log: &Logger,
) -> Result<(), AgentError> {
    let left = || deadline.saturating_duration_since(Instant::now());
    let started = Instant::now();
    // A new temporary file is ours by O_EXCL alone: no lock (nor holder) needed.
    let n = match open_and_bind(temp, true, false, enc.size, false, left()).await? {
        Opened::Loop { n, .. } => n,
        Opened::Failed { step, errno } => {
            return Err(AgentError::Internal(format!(
                "creating {}: {step}: {}",
                temp.display(),
                errno.desc()
            )))
        }
        other => {
            return Err(AgentError::Internal(format!(
                "creating {}: {other:?}",
                temp.display()
            )))
        }
    };
    let key = enc.key.expose();
    let out = stack
        .argon2_call(
            Command::LuksFormat {
                device: n,
                label_name: stack.name.clone(),
            },
            key,
            left(),
        )
        .await?;
    succeeded("cryptsetup luksFormat", out)?;
    let formatted = started.elapsed();
    let open = stack
        .argon2_call(
            Command::LuksOpen {
                device: n,
                name: stack.name.clone(),
                read_only: false,
            },
            key,
            left(),
        )
        .await?;
    succeeded("cryptsetup open (new container)", open)?;
    let mkfs = stack
        .tools
        .call(
            Command::Mkfs {
                name: stack.name.clone(),
                uid: enc.uid,
                gid: enc.gid,
            },
            None,
            left(),
        )
        .await?;
    succeeded("mke2fs", mkfs)?;
    info!(log, "new encrypted container formatted"; "volume" => stack.name.as_str(),
        "size" => enc.size, "format_ms" => formatted.as_millis() as u64,
        "total_ms" => started.elapsed().as_millis() as u64);
    Ok(())
}

/// Removes the temporary containers in `dir` once the published one is open and locked by
/// us: a formatter whose agent died left them, and a live formatter will find the published
/// name taken anyway (its link fails, EEXIST, or ENOENT once its temp is gone, and it opens
/// the published one). Bounded; a share that stops answering leaves them for next time.
async fn remove_abandoned(dir: &Path, budget: Duration, log: &Logger) {
    // At most 2 s of the mount's time in all: what is left stays for the next opener.
    let until = Instant::now() + budget.min(Duration::from_secs(2));
    for t in list_matching(dir, is_temp_container, 64, until).await {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let Ok(c) = cstring(&t) else { continue };
        let gone = path_call("removing an abandoned temporary container", left, || {
            match nix::unistd::unlink(c.as_c_str()) {
                Err(Errno::ENOENT) => Ok(()),
                other => other,
            }
        })
        .await;
        info!(log, "abandoned temporary container removed"; "file" => t.display().to_string(),
            "outcome" => format!("{gone:?}"));
    }
}

/// The container's size for this mount: the larger of `size` (the volume's) and every size
/// recorded beside the container by a CSI expansion (`cnfs-volume.size.<bytes>`, see
/// [`parse_size_marker`]). Listed within 2 s of `budget`: a share that does not answer by
/// then gives `size`, and the open that follows meets the same server.
async fn recorded_size(dir: &Path, size: u64, budget: Duration, log: &Logger) -> u64 {
    let until = Instant::now() + budget.min(Duration::from_secs(2));
    let is_marker: fn(&str) -> bool = |n| parse_size_marker(n).is_some();
    let largest = list_matching(dir, is_marker, usize::MAX, until)
        .await
        .iter()
        .filter_map(|p| p.file_name()?.to_str().and_then(parse_size_marker))
        .max()
        .unwrap_or(0);
    if largest > size {
        info!(log, "a larger size is recorded on the share (CSI expansion)";
            "dir" => dir.display().to_string(), "size" => size, "recorded" => largest);
    }
    size.max(largest)
}

/// The container size `dir`'s CephFS quota leaves (`grow=quota`: the CSI driver raises the
/// quota of the subvolume to grow the volume): the quota less its headroom, see
/// [`size_from_quota`]; 0 without a quota, or when the share does not answer within 2 s of
/// `budget` (the open that follows meets the same server).
async fn quota_size(dir: &Path, budget: Duration, log: &Logger) -> u64 {
    let Ok(path) = cstring(dir) else {
        return 0;
    };
    let outcome = killable::run(budget.min(Duration::from_secs(2)), || {
        let mut buf = [0u8; 24];
        // SAFETY: a NUL-terminated path and name, and a buffer of the length passed.
        let n = unsafe {
            libc::getxattr(
                path.as_ptr(),
                c"ceph.quota.max_bytes".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        let n = usize::try_from(n).map_err(|_| Errno::last())?;
        let text = std::str::from_utf8(&buf[..n.min(buf.len())]).map_err(|_| Errno::EINVAL)?;
        let quota = text.trim().parse::<u64>().map_err(|_| Errno::EINVAL)?;
        Ok([quota, 0, 0, 0, 0, 0])
    })
    .await;
    let size = match outcome {
        Outcome::Done([quota, ..]) => size_from_quota(quota).unwrap_or(0),
        // No quota on the directory (or 0: none).
        Outcome::Failed(Errno::ENODATA) => 0,
        other => {
            warn!(log, "the directory's CephFS quota could not be read; its size stays";
                "dir" => dir.display().to_string(), "outcome" => format!("{other:?}"));
            0
        }
    };
    if size > 0 {
        info!(log, "container sized from the directory's CephFS quota (grow=quota)";
            "dir" => dir.display().to_string(), "size" => size);
    }
    size
}

/// Up to `most` entries of `dir` whose names `matches`, listed within `until` (an empty list
/// when the share does not answer by then). Listed by a killable child (a dead server must
/// not keep a thread of the agent asleep in getdents64 for good: a thread per Mount attempt
/// leaked so before), which writes the names, NUL-separated, into a pipe read here.
/// `matches` runs in that child: it must not allocate.
pub(super) async fn list_matching(
    dir: &Path,
    matches: fn(&str) -> bool,
    most: usize,
    until: Instant,
) -> Vec<PathBuf> {
    let Ok(path) = cstring(dir) else {
        return Vec::new();
    };
    // Non-blocking reads: the child wrote every name before its answer, so what is not in
    // the pipe by then never comes.
    let Ok((rx, tx)) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
    else {
        return Vec::new();
    };
    // What the pipe holds without a reader (names of at most 255 bytes and their NULs).
    let most = most.min(LISTED_MOST);
    let writer = tx.as_raw_fd();
    let outcome = killable::run_keeping(
        until.saturating_duration_since(Instant::now()),
        Some(writer),
        || {
            killable::list_dir(&path, |name| name.to_str().is_ok_and(matches), most, writer)
                .map(|n| [n, 0, 0, 0, 0, 0])
        },
    )
    .await;
    drop(tx);
    if !matches!(outcome, Outcome::Done(_)) {
        return Vec::new();
    }
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(n @ 1..) = nix::unistd::read(rx.as_raw_fd(), &mut chunk) {
        bytes.extend_from_slice(&chunk[..n]);
    }
    bytes
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .filter_map(|n| std::str::from_utf8(n).ok())
        .map(|n| dir.join(n))
        .collect()
}

/// At most this many names from one listing (see [`list_matching`]).
const LISTED_MOST: usize = 200;

pub(super) fn cstring(p: &Path) -> Result<CString, AgentError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| AgentError::Internal(format!("{}: NUL byte in path", p.display())))
}

pub(super) fn random_u64() -> Result<u64, AgentError> {
    let mut b = [0u8; 8];
    // SAFETY: getrandom(2) writes at most 8 bytes into the buffer on the stack.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 8 {
        return Err(AgentError::Internal("getrandom failed".into()));
    }
    Ok(u64::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn found_strategy() -> impl Strategy<Value = Found> {
        prop_oneof![
            Just(Found::Absent),
            Just(Found::NotRegular),
            Just(Found::Luks2),
            Just(Found::Luks1),
            Just(Found::NotLuks),
        ]
    }

    proptest! {
        #[test]
        fn only_an_absent_container_is_ever_formatted(found in found_strategy(), ro in any::<bool>()) {
            let formats = matches!(decide(found, ro, "f"), Action::CreateAndFormat);
            prop_assert_eq!(formats, found == Found::Absent && !ro);
        }

        #[test]
        fn arbitrary_bytes_without_a_luks2_magic_are_not_luks2(p in any::<[u8; 8]>(), s in any::<[u8; 8]>()) {
            prop_assume!(p[..6] != *b"LUKS\xba\xbe" && s[..6] != *b"SKUL\xba\xbe");
            prop_assert_eq!(classify_magic(&p, &[s]), Found::NotLuks);
        }
    }

    #[test]
    fn headers_are_classified_from_either_copy() {
        let luks2 = *b"LUKS\xba\xbe\x00\x02";
        let luks1 = *b"LUKS\xba\xbe\x00\x01";
        let second = *b"SKUL\xba\xbe\x00\x02";
        let zero = [0u8; 8];
        assert_eq!(classify_magic(&luks2, &[zero]), Found::Luks2);
        assert_eq!(classify_magic(&luks1, &[zero]), Found::Luks1);
        assert_eq!(classify_magic(&zero, &[zero, second]), Found::Luks2);
        assert_eq!(classify_magic(&zero, &[zero]), Found::NotLuks);
        assert_eq!(
            classify_magic(&zero, &[*b"SKUL\xba\xbe\x00\x01"]),
            Found::NotLuks,
            "a secondary copy only exists in LUKS2"
        );
    }

    #[test]
    fn refusals_name_the_file_and_say_nothing_is_formatted() {
        match decide(
            Found::NotLuks,
            false,
            "volume v: cnfs-volume.luks2 on the share",
        ) {
            Action::Refuse(AgentError::FailedPrecondition(m)) => {
                assert!(
                    m.contains("cnfs-volume.luks2") && m.contains("never formats"),
                    "{m}"
                )
            }
            other => panic!("{other:?}"),
        }
        match decide(Found::Absent, true, "f") {
            Action::Refuse(AgentError::NotFound(m)) => assert!(m.contains("read-only"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_new_file_is_created_exclusively_and_an_existing_plain_file_is_reported_not_bound() {
        // Runs without root: opening and reading work, the loop step is not reached.
        let dir = std::env::temp_dir().join(format!("cnfs-luks2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let f = dir.join(CONTAINER);
        std::fs::write(&f, vec![0x5au8; 8192]).expect("write");
        let got = open_and_bind(&f, false, false, 0, true, Duration::from_secs(5))
            .await
            .expect("answer");
        assert_eq!(got, Opened::Not(Found::NotLuks));
        let got = open_and_bind(&f, true, false, 1 << 20, true, Duration::from_secs(5))
            .await
            .expect("answer");
        assert!(
            matches!(
                got,
                Opened::Failed {
                    step: "open",
                    errno: Errno::EEXIST
                }
            ),
            "{got:?}"
        );
        assert_eq!(std::fs::read(&f).expect("read").len(), 8192, "untouched");
        let missing = dir.join("absent");
        let got = open_and_bind(&missing, false, false, 0, true, Duration::from_secs(5))
            .await
            .expect("answer");
        assert_eq!(got, Opened::Not(Found::Absent));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn one_retry_task_per_name_and_the_name_is_free_again_after_it() {
        let r = Retrying::default();
        let first = r.claim("v").expect("first claim");
        assert!(r.claim("v").is_none(), "a second task for the same name");
        let mut other = r.claim("w").expect("another name is its own");
        drop(first);
        assert!(r.claim("v").is_some(), "free again once the task ended");
        // A claim asked for while the task runs: its rounds run once more, then it ends.
        assert!(r.claim("w").is_none());
        assert!(other.again_or_release(), "asked again while running");
        assert!(!other.again_or_release(), "not asked again");
        assert!(r.claim("w").is_some(), "free again once released");
        drop(other);
    }

    #[tokio::test]
    async fn a_process_that_only_looks_like_a_holder_is_not_one() {
        use std::os::unix::process::CommandExt;
        let name = format!("spoof{}", std::process::id());
        let container = luks2_container(&name);
        // A shell with a holder's name and argv (argv0 and the container's path), as a
        // container's process could give itself.
        let script = format!(
            "printf {} > /proc/self/comm; sleep 30; true",
            crate::tools::holder::HOLDER_COMM.to_str().expect("ascii")
        );
        let mut fake = std::process::Command::new("sh")
            .arg0(LOCK_HOLDER_ARGV0)
            .args(["-c", &script, &container])
            .spawn()
            .expect("sh");
        let pid = i32::try_from(fake.id()).expect("pid");
        let until = Instant::now() + Duration::from_secs(5);
        let looks = || {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            comm.trim_end() == crate::tools::holder::HOLDER_COMM.to_str().expect("ascii")
                && pids_with_arg(Some(LOCK_HOLDER_ARGV0), &container).contains(&pid)
        };
        while !looks() {
            assert!(
                Instant::now() < until,
                "the fake's name and argv never showed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            holders_of(&name).await,
            Some(vec![]),
            "its binary is not the agent's"
        );
        let _ = fake.kill();
        let _ = fake.wait();
    }

    #[tokio::test]
    async fn a_listing_gives_the_matching_names_bounded_and_nothing_for_a_missing_dir() {
        let dir = std::env::temp_dir().join(format!("cnfs-luks2-list-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let mut want = Vec::new();
        // Enough entries for several getdents64 calls (8 KiB each), long names included.
        for i in 0..400 {
            let name = format!("cnfs-volume.size.1073741824{i:03}{}", "x".repeat(i % 200));
            std::fs::create_dir(dir.join(&name)).expect("mkdir marker");
            if i < 3 {
                want.push(dir.join(&name));
            }
        }
        std::fs::write(dir.join("other"), b"").expect("write");
        let until = Instant::now() + Duration::from_secs(10);
        let starts: fn(&str) -> bool = |n| n.starts_with("cnfs-volume.size.");
        let all = list_matching(&dir, starts, usize::MAX, until).await;
        assert_eq!(all.len(), LISTED_MOST, "bounded");
        assert!(all.iter().all(|p| p.starts_with(&dir)), "{all:?}");
        let only: fn(&str) -> bool = |n| {
            n.strip_prefix("cnfs-volume.size.1073741824")
                .is_some_and(|r| r.starts_with("00"))
        };
        let mut got = list_matching(&dir, only, usize::MAX, until).await;
        got.sort();
        assert_eq!(got.len(), 10, "000 to 009: {got:?}");
        assert!(want.iter().all(|w| got.contains(w)), "{want:?} in {got:?}");
        let other: fn(&str) -> bool = |n| n == "other";
        assert_eq!(
            list_matching(&dir, other, 5, until).await,
            vec![dir.join("other")]
        );
        assert!(list_matching(&dir.join("absent"), starts, 5, until)
            .await
            .is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_file_locked_by_another_open_file_is_in_use() {
        let dir = std::env::temp_dir().join(format!("cnfs-luks2-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let f = dir.join(CONTAINER);
        let mut hdr = vec![0u8; 8192];
        hdr[..8].copy_from_slice(b"LUKS\xba\xbe\x00\x02");
        std::fs::write(&f, hdr).expect("write");
        let holder = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&f)
            .expect("open");
        let lock = lock_request(false);
        use std::os::fd::AsRawFd;
        // SAFETY: F_OFD_SETLK reads a struct flock on the stack.
        let rc = unsafe { libc::fcntl(holder.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
        assert_eq!(rc, 0, "test lock");
        let got = open_and_bind(&f, false, false, 0, true, Duration::from_secs(5))
            .await
            .expect("answer");
        assert_eq!(got, Opened::InUse);
        drop(holder);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
