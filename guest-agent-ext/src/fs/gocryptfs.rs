//! Encrypted shared volumes (`encryption=gocryptfs`): file-level encryption that several
//! guests may use at once (ReadWriteMany), where luks2's block container allows one writer.
//! The share is mounted at `/run/cnfs/backing/<name>` as for luks2; the encrypted tree is its
//! `cnfs-volume.gocryptfs/` (standard gocryptfs 2 format: a stock `gocryptfs` opens it for
//! recovery). The agent mounts FUSE at `/run/cnfs/gocryptfs/<name>` itself and the tool runner
//! starts a gocryptfs daemon on that mount's descriptor (`/dev/fd/N`, so the daemon mounts
//! nothing), key on its stdin; the volume is a bind of that mount. File data passes through
//! the daemon: a user-space process in the data path, which is the price of sharing.
//!
//! Rules:
//! - only an absent tree is ever initialised, and never in place: `gocryptfs -init` runs in
//!   a temp directory no other guest knows, which is then renamed to the fixed name; the
//!   rename fails when another guest published first (a non-empty directory is never
//!   replaced), and theirs is used. An existing directory without `gocryptfs.conf` is refused.
//! - the daemon outlives agent restarts (its own session, no parent-death signal); the
//!   unmount of its FUSE mount ends it. What a failed or abandoned Mount set up is taken
//!   down under the stack lock, as for luks2.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cnfs_protocols::spec::{Encryption, EncryptionMode, Source, VolumeSpec};
use nix::errno::Errno;
use nix::mount::MsFlags;
use slog::{info, warn, Logger};
use tokio::time::Instant;

use super::luks2::{
    backing_dir, cstring, encryption, first_line, path_call, random_u64, Built, Layer, Luks2,
    Stack, StackAttempt,
};
use super::{vfs_flags, Context, MountHandler, MountPlan};
use crate::error::AgentError;
use crate::killable::{self, Outcome};
use crate::kmod;
use crate::mountinfo::MountEntry;
use crate::tools::command::{GOCRYPTFS_DIR, GOCRYPTFS_TEMP_PREFIX};
use crate::tools::{Command, Exit, Tool, ToolClient};

/// Where the daemons' FUSE mounts are (0700; the volumes are binds of them).
pub const PLAIN_ROOT: &str = "/run/cnfs/gocryptfs";
/// The FUSE mount's type in mountinfo.
const FS_TYPE: &str = "fuse.gocryptfs";
/// gocryptfs's exit codes (its man page, EXIT CODES).
const EXIT_WRONG_KEY: i32 = 12;
/// LoadConf (8), Other (11: what v2.3 exits with when gocryptfs.conf does not parse),
/// OpenConf (23), DeprecatedFS (27): the configuration is what it refused.
const EXIT_CONF: [i32; 4] = [8, 11, 23, 27];
/// How long a daemon whose mount stopped answering is waited for to report its exit.
const EXIT_WAIT: Duration = Duration::from_secs(3);

pub fn plain_dir(name: &str) -> PathBuf {
    Path::new(PLAIN_ROOT).join(name)
}

/// The FUSE mount's source in mountinfo: names the volume.
fn source_name(name: &str) -> String {
    format!("cnfs-gocryptfs:{name}")
}

pub struct Gocryptfs {
    layer: Arc<Luks2>,
    tools: ToolClient,
}

impl Gocryptfs {
    pub fn new(layer: Arc<Luks2>, tools: ToolClient) -> Self {
        Gocryptfs { layer, tools }
    }

    /// The modes this guest can serve (empty without the runner or gocryptfs).
    pub fn modes(&self) -> Vec<String> {
        match self.tools.missing_for(&[Tool::Gocryptfs]) {
            None => vec![EncryptionMode::Gocryptfs.as_str().to_string()],
            Some(_) => Vec::new(),
        }
    }
}

#[async_trait]
impl MountHandler for Gocryptfs {
    fn name(&self) -> &'static str {
        "gocryptfs"
    }

    fn kernel_types(&self) -> &'static [&'static str] {
        &[FS_TYPE]
    }

    fn recognises(&self, spec: &VolumeSpec, e: &MountEntry) -> bool {
        spec.encryption
            .as_ref()
            .is_some_and(|x| x.mode == EncryptionMode::Gocryptfs)
            && e.fs_type == FS_TYPE
            && e.source == source_name(&spec.name)
    }

    async fn plan(&self, spec: &VolumeSpec, ctx: &Context<'_>) -> Result<MountPlan, AgentError> {
        let name = &spec.name;
        let enc = encryption(spec)?;
        if let Some(why) = self.tools.missing_for(&[Tool::Gocryptfs]) {
            return Err(AgentError::FailedPrecondition(format!(
                "volume {name}: encryption=gocryptfs needs gocryptfs in the guest: {why}"
            )));
        }
        if !matches!(
            spec.source,
            Source::Nfs(_) | Source::CephFs(_) | Source::Smb(_)
        ) {
            return Err(AgentError::FailedPrecondition(format!(
                "volume {name}: encryption=gocryptfs is served on NFS, CephFS and SMB shares only"
            )));
        }
        let deadline = Instant::now() + ctx.budget;
        let dir = ctx.modules_dir.to_path_buf();
        tokio::task::spawn_blocking(move || kmod::ensure(&dir, "fuse"))
            .await
            .map_err(|e| AgentError::Internal(format!("module loading task: {e}")))?
            .map_err(|e| AgentError::FailedPrecondition(e.to_string()))?;

        let built = self
            .layer
            .build_detached(Layer::Gocryptfs, spec, enc, ctx, deadline)
            .await?;
        // A bind keeps the FUSE mount's flags (nosuid, nodev, ro and what the spec asked).
        Ok(MountPlan {
            source: plain_dir(name).to_string_lossy().into_owned(),
            fs_type: "none".into(),
            flags: MsFlags::MS_BIND,
            data: String::new(),
            attempt: Box::new(StackAttempt { built: Some(built) }),
        })
    }
}

/// Encrypted tree (initialised first if absent), FUSE mount and its daemon, which must have
/// answered before this returns, on the mounted backing share. Called with the stack lock
/// held; on error the caller takes down what is there.
pub(super) async fn build(
    stack: &Stack,
    spec: &VolumeSpec,
    enc: &Encryption,
    deadline: Instant,
    log: &Logger,
) -> Result<Built, AgentError> {
    let name = &stack.name;
    let left = || deadline.saturating_duration_since(Instant::now());
    let dir = backing_dir(name);
    let shown = format!("volume {name}: {GOCRYPTFS_DIR} on the share");
    if !tree_ready(&dir, spec.read_only, left(), &shown).await? {
        // scrypt takes 64 MiB, as argon2 does: the same two slots for the guest.
        let _slot = stack.kdf_slot(left()).await?;
        init_new(stack, &dir, enc, deadline, log).await?;
        if !tree_ready(&dir, spec.read_only, left(), &shown).await? {
            return Err(AgentError::Internal(format!(
                "{shown}: gone again right after it was published"
            )));
        }
    }
    check_conf(&dir, left(), &shown).await?;

    let plain = plain_dir(name);
    super::luks2::create_private_dir(Path::new(PLAIN_ROOT))?;
    super::luks2::create_private_dir(&plain)?;
    let fuse = super::fuse::open_device()?;
    // rootmode: a directory (S_IFDIR, octal); the kernel checks permissions by mode bits
    // (default_permissions), and every user of the guest reaches it (allow_other).
    let data = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,default_permissions,allow_other",
        fuse.as_raw_fd()
    );
    let what = format!("volume {name}'s gocryptfs mount");
    let outcome = crate::volumes::mount_in_child(
        &what,
        &plain,
        &source_name(name),
        FS_TYPE,
        vfs_flags(spec),
        data,
        Some(fuse.as_raw_fd()),
        deadline,
    )
    .await?;
    match outcome {
        Outcome::Done(_) => {}
        Outcome::Failed(e) => return Err(AgentError::from_mount_errno(&what, e)),
        Outcome::TimedOut => {
            return Err(AgentError::Deadline(format!("mounting {what}: no answer")))
        }
    }
    let started = Instant::now();
    // Held until the daemon answers: its scrypt runs before that.
    let slot = stack.kdf_slot(left()).await?;
    let daemon = stack
        .tools
        .start_daemon(
            Command::GocryptfsServe {
                name: name.clone(),
                read_only: spec.read_only,
            },
            Some(enc.key.expose()),
            &fuse,
            left(),
        )
        .await?;
    // The daemon holds the only descriptor now: if it dies, accesses fail (ENOTCONN)
    // instead of waiting for a server that will never come.
    drop(fuse);
    // The first statfs waits for the daemon's answer to the kernel's FUSE_INIT, which it
    // sends only once the key has opened the tree.
    let probe = cstring(&plain)?;
    let answered = killable::run(left(), || crate::volumes::statfs(&probe)).await;
    drop(slot);
    match answered {
        Outcome::Done(_) => {
            info!(log, "gocryptfs serves the volume"; "volume" => name.as_str(),
                "pid" => daemon.pid, "start_ms" => started.elapsed().as_millis() as u64);
            if !spec.read_only {
                remove_abandoned(&dir, left(), log).await;
            }
            Ok(Built::without_device(stack.clone()))
        }
        Outcome::TimedOut => Err(AgentError::Deadline(format!(
            "{shown}: gocryptfs did not start serving within the mount's deadline"
        ))),
        Outcome::Failed(errno) => Err(match daemon.exited(EXIT_WAIT).await {
            // gocryptfs cannot tell a wrong password from a damaged EncryptedKey.
            Some(Exit::Code(EXIT_WRONG_KEY)) => AgentError::PermissionDenied(format!(
                "{shown}: the key does not open it (gocryptfs: password incorrect, or the \
                 key in its gocryptfs.conf is damaged); nothing was changed"
            )),
            Some(Exit::Code(code)) if EXIT_CONF.contains(&code) => {
                AgentError::FailedPrecondition(format!(
                    "{shown}: gocryptfs could not load the tree (exit {code}: its \
                     gocryptfs.conf is unreadable or of a format it refuses); restore it from \
                     a backup; CNFS never initialises an existing tree"
                ))
            }
            Some(exit) => AgentError::Internal(format!(
                "{shown}: gocryptfs ended ({exit:?}) before serving the volume"
            )),
            None => AgentError::Internal(format!(
                "{shown}: the mount answers {} although gocryptfs still runs (pid {})",
                errno.desc(),
                daemon.pid
            )),
        }),
    }
}

/// Whether the tree exists and has its configuration (`false`: absent, may be initialised).
/// Anything else at the fixed name is refused: nothing existing is ever initialised.
async fn tree_ready(
    dir: &Path,
    read_only: bool,
    budget: Duration,
    shown: &str,
) -> Result<bool, AgentError> {
    let tree = cstring(&dir.join(GOCRYPTFS_DIR))?;
    let conf = cstring(&dir.join(GOCRYPTFS_DIR).join("gocryptfs.conf"))?;
    // Payload: [what the tree is, whether conf is a regular file].
    let outcome = killable::run(budget, || {
        let tree = match nix::sys::stat::lstat(tree.as_c_str()) {
            Ok(st) => st,
            Err(Errno::ENOENT) => return Ok([0, 0, 0, 0, 0, 0]),
            Err(e) => return Err(e),
        };
        if tree.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return Ok([2, 0, 0, 0, 0, 0]);
        }
        let conf = match nix::sys::stat::lstat(conf.as_c_str()) {
            Ok(st) => u64::from(st.st_mode & libc::S_IFMT == libc::S_IFREG),
            Err(Errno::ENOENT) => 0,
            Err(e) => return Err(e),
        };
        Ok([1, conf, 0, 0, 0, 0])
    })
    .await;
    match outcome {
        Outcome::Done([0, ..]) if read_only => Err(AgentError::FailedPrecondition(format!(
            "{shown} does not exist, and a read-only volume cannot create it: mount it \
             read-write once first"
        ))),
        Outcome::Done([0, ..]) => Ok(false),
        Outcome::Done([1, 1, ..]) => Ok(true),
        Outcome::Done([1, ..]) => Err(AgentError::FailedPrecondition(format!(
            "{shown} exists but holds no gocryptfs.conf: CNFS never initialises an existing \
             directory (move it away, or restore its gocryptfs.conf)"
        ))),
        Outcome::Done(_) => Err(AgentError::FailedPrecondition(format!(
            "{shown} exists and is not a directory; CNFS never replaces it"
        ))),
        Outcome::Failed(e) => Err(match e {
            Errno::EACCES | Errno::EPERM => AgentError::PermissionDenied(format!(
                "{shown}: {} (the server refuses the guest's root: check the export's squash \
                 rules)",
                e.desc()
            )),
            _ => AgentError::Internal(format!("{shown}: {}", e.desc())),
        }),
        Outcome::TimedOut => Err(AgentError::Deadline(format!(
            "{shown}: the server did not answer"
        ))),
    }
}

/// The tree's `gocryptfs.conf` reads as a gocryptfs 2 configuration (JSON with `Version` 2
/// and an `EncryptedKey`): a damaged one is named here, before gocryptfs would only exit
/// with its catch-all code.
async fn check_conf(dir: &Path, budget: Duration, shown: &str) -> Result<(), AgentError> {
    let conf = dir.join(GOCRYPTFS_DIR).join("gocryptfs.conf");
    // A configuration is a few hundred bytes; more is read as damage, not loaded whole.
    const MAX_CONF: u64 = 64 << 10;
    let read = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
        use std::io::Read as _;
        let mut bytes = Vec::new();
        std::fs::File::open(conf)?
            .take(MAX_CONF + 1)
            .read_to_end(&mut bytes)?;
        Ok(bytes)
    });
    let bytes = tokio::time::timeout(budget, read)
        .await
        .map_err(|_| AgentError::Deadline(format!("{shown}: the server did not answer")))?
        .map_err(|e| AgentError::Internal(format!("reading gocryptfs.conf: {e}")))?
        .map_err(|e| AgentError::Internal(format!("{shown}: reading gocryptfs.conf: {e}")))?;
    let parsed: Option<serde_json::Value> = serde_json::from_slice(&bytes).ok();
    let valid = bytes.len() as u64 <= MAX_CONF
        && parsed.as_ref().is_some_and(|v| {
            v.get("Version").and_then(|x| x.as_u64()) == Some(2)
                && v.get("EncryptedKey").is_some_and(|k| k.is_string())
        });
    if valid {
        Ok(())
    } else {
        Err(AgentError::FailedPrecondition(format!(
            "{shown}: its gocryptfs.conf is not a gocryptfs 2 configuration (damaged?); \
             restore it from a backup; CNFS never initialises an existing tree"
        )))
    }
}

/// A new tree: `gocryptfs -init` in a fresh temp directory, its root given to the volume's
/// owner, then renamed to the fixed name (another guest's published tree is never replaced:
/// a rename onto a non-empty directory fails, and theirs is used). The temp goes on every
/// path.
async fn init_new(
    stack: &Stack,
    dir: &Path,
    enc: &Encryption,
    deadline: Instant,
    log: &Logger,
) -> Result<(), AgentError> {
    let left = || deadline.saturating_duration_since(Instant::now());
    let suffix = format!("{:016x}", random_u64()?);
    let temp = dir.join(format!("{GOCRYPTFS_TEMP_PREFIX}{suffix}"));
    let final_dir = dir.join(GOCRYPTFS_DIR);
    let t = cstring(&temp)?;
    path_call("creating the new tree's temp directory", left(), || {
        nix::unistd::mkdir(
            t.as_c_str(),
            nix::sys::stat::Mode::from_bits_truncate(0o700),
        )
    })
    .await?;
    let started = Instant::now();
    let result = async {
        let out = stack
            .tools
            .call(
                Command::GocryptfsInit {
                    name: stack.name.clone(),
                    temp: suffix.clone(),
                },
                Some(enc.key.expose()),
                left(),
            )
            .await?;
        match out.exit {
            Exit::Code(0) => {}
            Exit::TimedOut => {
                return Err(AgentError::Deadline(
                    "gocryptfs -init: took longer than the mount's deadline".into(),
                ))
            }
            other => {
                return Err(AgentError::Internal(format!(
                    "gocryptfs -init: {other:?}: {}",
                    first_line(&out.stderr)
                )))
            }
        }
        let (uid, gid) = (enc.uid, enc.gid);
        // The mode first: once the directory is the owner's, root may not change it.
        path_call("giving the new tree to its owner", left(), || {
            nix::sys::stat::fchmodat(
                None,
                t.as_c_str(),
                nix::sys::stat::Mode::from_bits_truncate(0o755),
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            )?;
            nix::unistd::chown(
                t.as_c_str(),
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(gid)),
            )
        })
        .await?;
        let f = cstring(&final_dir)?;
        match killable::run(left(), || {
            nix::fcntl::renameat(None, t.as_c_str(), None, f.as_c_str()).map(|()| [0; 6])
        })
        .await
        {
            Outcome::Done(_) => {
                info!(log, "new encrypted tree initialised"; "volume" => stack.name.as_str(),
                    "init_ms" => started.elapsed().as_millis() as u64);
                Ok(Temp::Gone)
            }
            // Another client published first (ENOTEMPTY/EEXIST), or removed our temp as
            // abandoned after publishing (ENOENT): theirs is used.
            Outcome::Failed(Errno::ENOTEMPTY | Errno::EEXIST | Errno::ENOENT) => {
                info!(log, "another client published the encrypted tree first; using theirs";
                    "volume" => stack.name.as_str());
                Ok(Temp::Remove)
            }
            // Anything else (a server that refuses the loser differently, EACCES on some
            // SMB servers): if a complete tree is there now, it is used.
            Outcome::Failed(e) => {
                let shown = format!("volume {}: {GOCRYPTFS_DIR}", stack.name);
                match tree_ready(dir, false, left(), &shown).await {
                    Ok(true) => Ok(Temp::Remove),
                    _ => Err(AgentError::Internal(format!(
                        "publishing {GOCRYPTFS_DIR} (rename): {}",
                        e.desc()
                    ))),
                }
            }
            // The rename may still reach the server after this: the temp is left alone (a
            // later opener of the published tree removes it), so that no late rename can
            // publish a directory emptied under it.
            Outcome::TimedOut => Err(AgentError::Deadline(format!(
                "publishing {GOCRYPTFS_DIR}: the server did not answer"
            ))),
        }
    }
    .await;
    match &result {
        Ok(Temp::Gone) => {}
        Ok(Temp::Remove) | Err(AgentError::Internal(_)) => {
            remove_temp(&temp, left().max(Duration::from_millis(500)), log).await
        }
        Err(_) => {}
    }
    result.map(|_| ())
}

/// Whether `name` is a new tree's temp directory: `.cnfs-volume.gocryptfs.new-<16 hex>`.
fn is_temp_tree(name: &str) -> bool {
    name.strip_prefix(GOCRYPTFS_TEMP_PREFIX)
        .is_some_and(crate::tools::command::is_hex16)
}

/// What is left of a new tree's temp directory after the publish.
enum Temp {
    /// Renamed: it is the published tree.
    Gone,
    /// Another client's tree was published: ours goes.
    Remove,
}

/// Removes the temp directories of new trees in `dir` once the published one serves: an
/// initialiser whose agent died left them, and a live one finds the name taken anyway (its
/// rename fails, or finds its temp gone, and it uses the published tree). Bounded: what is
/// left stays for the next opener.
async fn remove_abandoned(dir: &Path, budget: Duration, log: &Logger) {
    let until = Instant::now() + budget.min(Duration::from_secs(2));
    for t in super::luks2::list_matching(dir, is_temp_tree, 64, until).await {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        remove_temp(&t, left, log).await;
        info!(log, "abandoned temp directory of a new encrypted tree removed";
            "dir" => t.display().to_string());
    }
}

/// Removes a temp tree (an empty directory, or one `gocryptfs -init` filled: its
/// `gocryptfs.conf`, `.conf.tmp` and `gocryptfs.diriv`); ENOENT is done already.
async fn remove_temp(temp: &Path, budget: Duration, log: &Logger) {
    // What `gocryptfs -init` writes (the .tmp if it was killed half way).
    let (Ok(conf), Ok(tmp), Ok(diriv), Ok(t)) = (
        cstring(&temp.join("gocryptfs.conf")),
        cstring(&temp.join("gocryptfs.conf.tmp")),
        cstring(&temp.join("gocryptfs.diriv")),
        cstring(temp),
    ) else {
        return;
    };
    let removed = path_call("removing the new tree's temp directory", budget, || {
        // Given to the volume's owner before the publish failed: back to root, whose it
        // must be for its entries to be removed (the agent has no CAP_DAC_OVERRIDE).
        match nix::unistd::chown(
            t.as_c_str(),
            Some(nix::unistd::Uid::from_raw(0)),
            Some(nix::unistd::Gid::from_raw(0)),
        ) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(e) => return Err(e),
        }
        for f in [&conf, &tmp, &diriv] {
            match nix::unistd::unlink(f.as_c_str()) {
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(e) => return Err(e),
            }
        }
        match nix::unistd::unlinkat(None, t.as_c_str(), nix::unistd::UnlinkatFlags::RemoveDir) {
            Err(Errno::ENOENT) => Ok(()),
            other => other,
        }
    })
    .await;
    if let Err(e) = removed {
        warn!(log, "temp directory of a new encrypted tree left on the share";
            "dir" => temp.display().to_string(), "error" => %e);
    }
}

/// Unmounts the daemon's FUSE mount if there is one (the daemon then ends: its descriptor
/// reads ENODEV) and removes its directory. Plain first; a mount still held (a container's
/// bind after a forced Unmount) is detached, and its daemon serves it until it is let go.
/// Returns the steps that did not finish plainly, and whether a daemon still runs.
pub(super) async fn unmount_plain(name: &str, deadline: Instant) -> (Vec<String>, bool) {
    let plain = plain_dir(name);
    let entries = crate::mountinfo::read().unwrap_or_default();
    if crate::mountinfo::find(&entries, &plain).is_none() {
        let _ = std::fs::remove_dir(&plain);
        return (Vec::new(), false);
    }
    let Ok(target) = cstring(&plain) else {
        return (vec!["gocryptfs mount: path has a NUL byte".into()], true);
    };
    let mut notes = Vec::new();
    let left = || deadline.saturating_duration_since(Instant::now());
    for (step, flag) in [
        ("umount", nix::mount::MntFlags::empty()),
        ("detach", nix::mount::MntFlags::MNT_DETACH),
    ] {
        let slice = (left() / 4).max(Duration::from_millis(500));
        match killable::run(slice, || {
            nix::mount::umount2(target.as_c_str(), flag).map(|()| [0; 6])
        })
        .await
        {
            Outcome::Done(_) | Outcome::Failed(Errno::EINVAL) => {
                if step != "umount" {
                    notes.push(format!("gocryptfs mount: {step}"));
                }
                break;
            }
            other => notes.push(format!("gocryptfs mount {step}: {other:?}")),
        }
    }
    let _ = std::fs::remove_dir(&plain);
    // Its daemon reads ENODEV and exits a moment later, closing its files on the share (whose
    // unmount is next). Not when containers still hold a copy of the mount: it serves them.
    let wait = (left() / 4).min(Duration::from_secs(2));
    let gone = daemons_gone(name, wait).await;
    if !gone {
        notes.push("gocryptfs daemon still running (its mount held elsewhere, or stuck)".into());
    }
    (notes, !gone)
}

/// Waits up to `within` until no gocryptfs serves `name`'s tree; found by its argv (the
/// tree's path), so also after an agent restart. False if one still does.
async fn daemons_gone(name: &str, within: Duration) -> bool {
    let tree = crate::tools::command::gocryptfs_dir(name);
    let until = Instant::now() + within;
    loop {
        let t = tree.clone();
        let scan = tokio::task::spawn_blocking(move || serving(&t));
        // A /proc read can wait on a process stuck in the kernel: bounded too.
        let left = until.saturating_duration_since(Instant::now());
        let busy = matches!(
            tokio::time::timeout(left.max(Duration::from_millis(100)), scan).await,
            Ok(Ok(true)) | Err(_)
        );
        if !busy {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether a process has `tree` among its arguments.
fn serving(tree: &str) -> bool {
    !super::luks2::pids_with_arg(None, tree).is_empty()
}
