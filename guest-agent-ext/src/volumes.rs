//! The volume table: mounts, unmounts, lists and probes volumes under `/run/cnfs/volumes`.
//! Operations on one volume are serialised by a per-name lock; different volumes proceed in
//! parallel. `List` and `Stats` never wait behind a slow mount. The kernel's mountinfo is
//! the truth; a small state file per volume (the spec without secrets) lets a restarted agent
//! answer `List` with the full spec. A mount under the volume root that no operation of this
//! agent is making and that it does not know (made by a previous agent's child that
//! finished late) is adopted when next seen, so every mount there is one the agent lists.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::future::Future;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use cnfs_protocols::agent;
use cnfs_protocols::keyed_lock::{KeyedGuard, KeyedLocks};
use cnfs_protocols::spec::{self, VolumeSpec, VOLUME_ROOT};
use futures::future::{FutureExt, Shared};
use nix::errno::Errno;
use nix::mount::{umount2, MntFlags};
use protobuf::Message;
use slog::{info, warn, Logger};

use crate::error::AgentError;
use crate::fs::{Attachment, Context, MountPlan, Readiness, Registry, VolumeLocks};
use crate::killable::{self, Outcome};
use crate::mountinfo;

pub struct Config {
    pub modules_dir: PathBuf,
    pub state_dir: PathBuf,
    pub sandbox_id: Option<String>,
    pub default_mount_timeout: Duration,
    pub max_timeout: Duration,
    pub default_unmount_timeout: Duration,
    pub default_probe_timeout: Duration,
    pub tools: crate::tools::ToolClient,
}

/// What the agent knows of a mounted volume: its spec with secrets blanked, or `None` when
/// it was found in mountinfo without a state file ("adopted").
#[derive(Clone)]
struct Known {
    spec: Option<agent::VolumeSpec>,
}

pub struct MountDone {
    pub mount_point: PathBuf,
    pub already_mounted: bool,
}

pub struct UnmountDone {
    pub method: &'static str,
    pub attempts: Vec<String>,
    /// With `force`: the containers still holding their copy.
    pub held_by: Vec<String>,
}

/// How many holders an error or a response names.
const MAX_HOLDERS: usize = 8;

pub struct Stats {
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub available_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
    pub health: agent::Health,
    pub detail: String,
    pub probe: Duration,
    pub warnings: Vec<String>,
}

type ProbeResult = Shared<Pin<Box<dyn Future<Output = Outcome> + Send>>>;

/// The one statfs probe of a volume in flight: callers join it instead of forking another.
struct Probe {
    id: u64,
    started: Instant,
    result: ProbeResult,
}

pub struct Volumes {
    cfg: Config,
    registry: Registry,
    log: Logger,
    client_id: OnceLock<String>,
    /// Entries exist only while an operation holds or waits for a volume's lock. Shared with
    /// attachments (a FUSE volume's fresh mount takes its volume's lock too).
    locks: VolumeLocks,
    known: RwLock<BTreeMap<String, Known>>,
    probes: Arc<Mutex<HashMap<String, Probe>>>,
    next_probe: std::sync::atomic::AtomicU64,
    /// What mounted volumes keep running (a FUSE volume's socket), by name.
    attachments: Mutex<HashMap<String, Arc<dyn Attachment>>>,
}

impl Volumes {
    pub fn new(cfg: Config, log: Logger) -> Self {
        let locks: VolumeLocks = Arc::new(KeyedLocks::new());
        Volumes {
            registry: Registry::new(cfg.tools.clone(), locks.clone(), log.clone()),
            cfg,
            log,
            client_id: OnceLock::new(),
            locks,
            known: RwLock::new(BTreeMap::new()),
            probes: Arc::new(Mutex::new(HashMap::new())),
            next_probe: std::sync::atomic::AtomicU64::new(0),
            attachments: Mutex::new(HashMap::new()),
        }
    }

    fn attachments(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<dyn Attachment>>> {
        self.attachments.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn attach(&self, name: &str, a: Option<Box<dyn Attachment>>) {
        if let Some(a) = a {
            self.attachments().insert(name.to_string(), Arc::from(a));
        }
    }

    /// Per-volume lock entries right now (for tests and the bench).
    pub fn lock_entries(&self) -> usize {
        self.locks.len()
    }

    pub fn filesystems(&self) -> Vec<String> {
        self.registry.names()
    }

    /// Encryption modes this guest can mount (none without the tool runner and its tools).
    pub fn encryption_modes(&self) -> Vec<String> {
        self.registry.encryption_modes()
    }

    pub fn sandbox_id(&self) -> String {
        self.cfg.sandbox_id.clone().unwrap_or_default()
    }

    pub fn count(&self) -> usize {
        self.read_known().len()
    }

    /// The request's timeout, or the default, capped by the agent's maximum.
    pub fn bound(&self, requested_ms: u32, default: Duration) -> Duration {
        let d = match requested_ms {
            0 => default,
            ms => Duration::from_millis(u64::from(ms)),
        };
        d.min(self.cfg.max_timeout)
    }

    /// The deadline of a Mount asking for `ms` (0: the default). An encrypted volume's
    /// default is four times the plain one: its first use runs two argon2 passes and mkfs
    /// (8-13 s measured in an emulated guest), its later uses one argon2 pass.
    pub fn mount_timeout(&self, ms: u32, encrypted: bool) -> Duration {
        let default = match encrypted {
            true => self.cfg.default_mount_timeout * 4,
            false => self.cfg.default_mount_timeout,
        };
        self.bound(ms, default)
    }

    pub fn unmount_timeout(&self, ms: u32) -> Duration {
        self.bound(ms, self.cfg.default_unmount_timeout)
    }

    pub fn probe_timeout(&self, ms: u32) -> Duration {
        self.bound(ms, self.cfg.default_probe_timeout)
    }

    fn read_known(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Known>> {
        self.known.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_known(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Known>> {
        self.known.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Serialises operations on one volume, waiting at most until `deadline`.
    async fn lock_volume(
        &self,
        name: &str,
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> Result<KeyedGuard<'_, String>, AgentError> {
        self.locks.lock_until(name, deadline).await.map_err(|_| {
            AgentError::Deadline(format!(
                "volume {name}: another operation on it did not finish within {timeout:?}"
            ))
        })
    }

    /// True while some operation holds or waits for the volume's lock.
    fn busy(&self, name: &str) -> bool {
        self.locks.is_busy(name)
    }

    /// Adopts mounts under the volume root that the agent does not know and no operation of
    /// its own is making: a previous agent's mount that completed after it was gone.
    fn reconcile(&self, entries: &[mountinfo::MountEntry]) {
        let root = Path::new(VOLUME_ROOT);
        let found: Vec<String> = entries
            .iter()
            .filter(|e| e.mount_point.parent() == Some(root))
            .filter_map(|e| e.mount_point.file_name()?.to_str().map(str::to_string))
            .filter(|n| spec::validate_name("name", n).is_ok())
            .filter(|n| !self.read_known().contains_key(n))
            .collect();
        for name in found {
            if self.busy(&name) {
                continue;
            }
            warn!(self.log, "found a volume mount the agent did not record; adopting it";
                "volume" => &name);
            self.write_known()
                .entry(name)
                .or_insert(Known { spec: None });
        }
    }

    fn state_file(&self, name: &str) -> PathBuf {
        self.cfg.state_dir.join(format!("{name}.pb"))
    }

    /// The NFSv4 client identity: fixed at the first mount, from the sandbox id the agent was
    /// started with, else the one in the first request, else a random one.
    fn client_id(&self, requested: Option<&str>) -> &str {
        self.client_id.get_or_init(|| {
            let base = self
                .cfg
                .sandbox_id
                .clone()
                .or_else(|| requested.map(str::to_string))
                .or_else(|| {
                    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
                        .ok()
                        .map(|u| u.trim().to_string())
                })
                .unwrap_or_else(|| format!("pid{}", std::process::id()));
            // The kernel keeps at most 64 bytes of nfs4_unique_id.
            format!("cnfs-{base}").chars().take(64).collect()
        })
    }

    /// Re-learns mounted volumes from mountinfo and the state files after a (re)start.
    /// Returns the names found.
    pub fn relearn(&self) -> std::io::Result<Vec<String>> {
        std::fs::create_dir_all(&self.cfg.state_dir)?;
        let entries = mountinfo::read()?;
        let root = Path::new(VOLUME_ROOT);
        let mut found = BTreeMap::new();
        for e in &entries {
            if e.mount_point.parent() != Some(root) {
                continue;
            }
            let Some(name) = e.mount_point.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if spec::validate_name("name", name).is_err() {
                continue;
            }
            let spec = std::fs::read(self.state_file(name))
                .ok()
                .and_then(|b| agent::VolumeSpec::parse_from_bytes(&b).ok())
                .filter(|s| s.name == name);
            found.insert(name.to_string(), Known { spec });
        }
        // State files of volumes that are no longer mounted are stale.
        if let Ok(dir) = std::fs::read_dir(&self.cfg.state_dir) {
            for f in dir.flatten() {
                let p = f.path();
                let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
                if !found.contains_key(stem) {
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
        // Directories of mounts that never completed (the agent was killed mid-mount): only
        // empty ones go, so nothing a mount could hide is touched.
        if let Ok(dir) = std::fs::read_dir(root) {
            for d in dir.flatten() {
                let name = d.file_name();
                if !found.contains_key(name.to_string_lossy().as_ref()) {
                    let _ = std::fs::remove_dir(d.path());
                }
            }
        }
        let names: Vec<String> = found.keys().cloned().collect();
        for handler in self.registry.all() {
            handler.clean_leftovers(&names);
        }
        // Encrypted volumes half built or half taken down by a killed agent: in the
        // background (a dead server must not delay start-up), each under its volume's lock.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            for name in crate::fs::luks2::Luks2::leftovers(&names) {
                // One a detached volume left is still written to: its lock is watched.
                self.registry.luks2().watch_detached(&name);
                let locks = self.locks.clone();
                let down = self.registry.luks2().teardown_unless_mounted(&name);
                rt.spawn(async move {
                    let _g = locks.lock(&name).await;
                    down.await;
                });
            }
        }
        for (name, known) in &found {
            let Some(spec) = known
                .spec
                .as_ref()
                .and_then(|w| VolumeSpec::from_wire_unresolved(w).ok())
            else {
                continue;
            };
            let Some(handler) = self.registry.for_spec(&spec) else {
                continue;
            };
            match handler.reattach(&spec, &self.log, &self.locks) {
                Ok(a) => self.attach(name, a),
                Err(e) => warn!(self.log, "could not serve the volume again after a restart";
                    "volume" => name, "error" => %e),
            }
        }
        *self.write_known() = found;
        Ok(names)
    }

    pub async fn mount(
        &self,
        spec: VolumeSpec,
        sandbox_id: Option<&str>,
        timeout: Duration,
    ) -> Result<MountDone, AgentError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let name = spec.name.clone();
        let _guard = self.lock_volume(&name, deadline, timeout).await?;
        let mount_point = spec.mount_point();
        let wanted = spec.to_wire(false);

        let entries = mountinfo::read().unwrap_or_default();
        let present = mountinfo::find(&entries, &mount_point).is_some();
        let existing = self.read_known().get(&name).cloned();
        match existing {
            Some(known) if present => {
                return match known.spec {
                    Some(have) if have == wanted => {
                        // The spec compares without its key: the key is compared apart.
                        if let Some(e) = &spec.encryption {
                            if !self.registry.luks2().key_matches(&name, e.key.expose()) {
                                return Err(AgentError::PermissionDenied(format!(
                                    "volume {name} is mounted with another key; unmount it first"
                                )));
                            }
                        }
                        // A volume cut off because its lock is gone serves nothing.
                        if let Some(why) = crate::fs::luks2::lock_lost(&name, &entries).await {
                            return Err(AgentError::FailedPrecondition(format!(
                                "volume {name} is mounted but {why}"
                            )));
                        }
                        self.ensure_attached(&spec)?;
                        Ok(MountDone {
                            mount_point,
                            already_mounted: true,
                        })
                    }
                    Some(_) => Err(AgentError::AlreadyExists(format!(
                        "volume {name} is already mounted with a different spec; unmount it first"
                    ))),
                    None => self.adopt_if_same(&spec, mount_point, &entries),
                };
            }
            // Known, but unmounted behind the agent's back: forget it and mount afresh.
            Some(_) => self.forget(&name),
            // Mounted, but not by this agent (a late mount of a previous one): the same
            // request claims it; another is a conflict.
            None if present => return self.adopt_if_same(&spec, mount_point, &entries),
            None => {}
        }

        let handler = self.registry.for_spec(&spec).ok_or_else(|| {
            AgentError::FailedPrecondition(format!(
                "volume {name}: {} volumes are not supported by this cnfs-agent yet",
                spec.fs_name()
            ))
        })?;
        let ctx = Context {
            modules_dir: &self.cfg.modules_dir,
            client_id: self.client_id(sandbox_id),
            budget: deadline.saturating_duration_since(tokio::time::Instant::now()),
        };
        let plan = tokio::time::timeout_at(deadline, handler.plan(&spec, &ctx))
            .await
            .map_err(|_| {
                AgentError::Deadline(format!(
                    "volume {name}: preparing the mount took longer than {timeout:?}"
                ))
            })??;

        let MountPlan {
            source,
            fs_type,
            flags,
            data,
            mut attempt,
        } = plan;
        let what = format!("volume {name} ({source})");
        let outcome = mount_in_child(
            &what,
            &mount_point,
            &source,
            &fs_type,
            flags,
            data,
            attempt.keep_fd(),
            deadline,
        )
        .await;
        let failed = match outcome {
            Ok(Outcome::Done(_)) => None,
            // The attempt reads its own failure first, while its state (a kernel log
            // window) is what the mount left.
            Ok(Outcome::Failed(e)) => Some(
                attempt
                    .failed(&what, e)
                    .unwrap_or_else(|| AgentError::from_mount_errno(&what, e)),
            ),
            Ok(Outcome::TimedOut) => {
                // The child was killed; if its mount completed at the last moment, undo it so
                // that "timed out" really means "nothing mounted".
                if mountinfo::find(&mountinfo::read().unwrap_or_default(), &mount_point).is_some() {
                    let _ = nix::mount::umount2(&mount_point, nix::mount::MntFlags::MNT_DETACH);
                }
                Some(AgentError::Deadline(format!(
                    "mounting {what}: the server did not answer within {timeout:?}"
                )))
            }
            Err(e) => Some(e),
        };
        if let Some(e) = failed {
            attempt.undo();
            let _ = std::fs::remove_dir(&mount_point);
            return Err(e);
        }
        if let Some(work) = attempt.after_mount() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let _ = tokio::time::timeout(left.max(Duration::from_secs(1)), work).await;
        }
        // Mounted: the attempt (a kernel log cursor) ends here, with nothing to undo; what
        // must keep running while the volume is mounted (a FUSE socket) stays.
        self.attach(&name, attempt.into_attachment(&self.log, &self.locks));
        if let Some(e) = &spec.encryption {
            self.registry.luks2().remember_key(&name, e.key.expose());
        }
        self.save_state(&name, &wanted);
        self.write_known()
            .insert(name, Known { spec: Some(wanted) });
        Ok(MountDone {
            mount_point,
            already_mounted: false,
        })
    }

    fn forget(&self, name: &str) {
        let _ = std::fs::remove_file(self.state_file(name));
        // Halted now, not when the last holder (a Stats call) lets go of it.
        if let Some(a) = self.attachments().remove(name) {
            a.halt();
        }
        self.write_known().remove(name);
    }

    /// A mounted volume whose file system keeps something running (a FUSE socket) and has
    /// nothing running now (it failed to start after a restart, or an Unmount failed after
    /// stopping it) gets it again.
    fn ensure_attached(&self, spec: &VolumeSpec) -> Result<(), AgentError> {
        if self.attachments().contains_key(&spec.name) {
            return Ok(());
        }
        if let Some(handler) = self.registry.for_spec(spec) {
            self.attach(&spec.name, handler.reattach(spec, &self.log, &self.locks)?);
        }
        Ok(())
    }

    /// A volume found in mountinfo without a state file: the same request is recognised by
    /// its handler from the kernel's parsed view of it and adopted; anything else is a
    /// conflict.
    fn adopt_if_same(
        &self,
        spec: &VolumeSpec,
        mount_point: PathBuf,
        entries: &[mountinfo::MountEntry],
    ) -> Result<MountDone, AgentError> {
        let matches = match (
            self.registry.for_spec(spec),
            mountinfo::find(entries, &mount_point),
        ) {
            (Some(handler), Some(e)) => handler.recognises(spec, e),
            _ => false,
        };
        if !matches {
            let shown = mountinfo::find(entries, &mount_point)
                .map(|e| format!(" ({} from {})", e.fs_type, spec::printable(&e.source)))
                .unwrap_or_default();
            return Err(AgentError::AlreadyExists(format!(
                "volume {} is already mounted from another source{shown}; unmount it first",
                spec.name
            )));
        }
        let wire = spec.to_wire(false);
        self.ensure_attached(spec)?;
        self.save_state(&spec.name, &wire);
        self.write_known()
            .insert(spec.name.clone(), Known { spec: Some(wire) });
        Ok(MountDone {
            mount_point,
            already_mounted: true,
        })
    }

    fn save_state(&self, name: &str, wire: &agent::VolumeSpec) {
        let path = self.state_file(name);
        let tmp = path.with_extension("tmp");
        let write = wire
            .write_to_bytes()
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = write {
            // The mount stands; after a restart it is adopted from mountinfo instead.
            warn!(self.log, "could not save volume state"; "volume" => name, "error" => %e);
        }
    }

    /// Unmounts, escalating: plain umount, then MNT_FORCE (aborts outstanding NFS requests),
    /// then MNT_DETACH (always detaches; the kernel cleans up when the last user leaves).
    ///
    /// A container's bind of the volume is its own mount in its own namespace: unmounting the
    /// agent's mount cannot take it away, and the container would keep reading and writing
    /// while the agent reported the volume gone. So, unless `force`, an Unmount while
    /// containers hold the volume is refused, naming them; with `force` it goes ahead and
    /// names them in the answer.
    pub async fn unmount(
        &self,
        name: &str,
        timeout: Duration,
        force: bool,
    ) -> Result<UnmountDone, AgentError> {
        spec::validate_name("name", name)?;
        let deadline = tokio::time::Instant::now() + timeout;
        let _guard = self.lock_volume(name, deadline, timeout).await?;
        let mount_point = spec::mount_point(name);
        let entries = mountinfo::read().unwrap_or_default();
        let dev = mountinfo::find(&entries, &mount_point).map(|e| e.dev.clone());
        let present = dev.is_some();
        let held_by: Vec<String> = match dev {
            Some(dev) => tokio::task::spawn_blocking(move || mountinfo::holders(&dev, MAX_HOLDERS))
                .await
                .unwrap_or_default()
                .iter()
                .map(ToString::to_string)
                .collect(),
            None => Vec::new(),
        };
        if !held_by.is_empty() && !force {
            return Err(AgentError::FailedPrecondition(format!(
                "volume {name} is still mounted in {} container mount(s): {}; stop them first, \
                 or unmount with force (they keep their copy until they end)",
                held_by.len(),
                held_by.join(", ")
            )));
        }
        let known = self.read_known().contains_key(name);
        if !present && !known {
            return Err(AgentError::NotFound(format!(
                "volume {name} is not mounted"
            )));
        }
        // What serves the volume stops before it goes: a FUSE socket hands out no
        // descriptor. (It mounts nothing afresh meanwhile: that takes this volume's lock.)
        let attachment = self.attachments().remove(name);
        if let Some(a) = attachment {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let _ = tokio::time::timeout(left, a.stop()).await;
        }
        let mut attempts = Vec::new();
        let mut method = "none";
        // An SMB volume whose lock is gone is cut off before anything is unmounted: every
        // kind of unmount flushes through its mapping into a container another guest may
        // have opened. One that cannot be yet stays, watched again (the watch cuts it off).
        if present {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self
                .registry
                .luks2()
                .fence_if_lock_lost(name, &entries, left * 60 / 100)
                .await
            {
                Ok(note) => attempts.extend(note),
                Err(why) => {
                    self.serve_again(name);
                    return Err(AgentError::Unavailable(format!(
                        "volume {name} is not unmounted: {why}"
                    )));
                }
            }
            let target = CString::new(mount_point.as_os_str().as_bytes())
                .map_err(|_| AgentError::Internal("mount point has a NUL byte".into()))?;
            // Shares of the time left: plain and force get 40% each, detach the rest.
            let steps: [(&str, MntFlags, u32); 3] = [
                ("umount", MntFlags::empty(), 40),
                ("force", MntFlags::MNT_FORCE, 40),
                ("detach", MntFlags::MNT_DETACH, 100),
            ];
            for (step, flag, share) in steps {
                if step == "force" {
                    // An encrypted volume's I/O goes to its backing share: if a dead server
                    // holds it up (a writer stuck there keeps ext4 busy, or the unmount's
                    // own flush hangs), that is what must give up first. `stuck` checks that
                    // the server does not answer before it gives anything up.
                    attempts.extend(self.registry.luks2().stuck(name).await);
                }
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let slice = (left * share / 100).max(Duration::from_millis(500));
                let target = target.as_c_str();
                // A &CStr path: nix passes its pointer, nothing is allocated in the child.
                let outcome = killable::run(slice, || umount2(target, flag).map(|()| [0; 6])).await;
                match outcome {
                    Outcome::Done(_) | Outcome::Failed(Errno::EINVAL) => {
                        method = step;
                        break;
                    }
                    Outcome::Failed(e) => attempts.push(format!("{step}: {}", e.desc())),
                    Outcome::TimedOut => {
                        attempts.push(format!("{step}: no answer within {slice:?}"))
                    }
                }
            }
            if method == "none" {
                // Still mounted: whatever served it serves it again.
                self.serve_again(name);
                return Err(AgentError::Internal(format!(
                    "volume {name} could not be unmounted: {}",
                    attempts.join("; ")
                )));
            }
        }
        let _ = std::fs::remove_dir(&mount_point);
        // An encrypted volume's dm-crypt mapping, loop device and share go next (found from
        // the kernel's state, so this also clears what a killed agent left).
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        attempts.extend(self.registry.luks2().teardown(name, left).await);
        if method == "detach" {
            // Its containers still write through the stack: its lock is still watched.
            self.registry.luks2().watch_detached(name);
        }
        self.registry.luks2().forget_key(name);
        let _ = std::fs::remove_file(self.state_file(name));
        self.write_known().remove(name);
        // A probe still stuck on the old mount (a hung FUSE daemon behind a detached mount)
        // must not answer for a volume mounted later under the same name; its task, when it
        // ends, removes only its own entry.
        self.probes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        info!(self.log, "volume unmounted"; "volume" => name, "method" => method,
            "still_held_by" => held_by.join(", "));
        Ok(UnmountDone {
            method,
            attempts,
            held_by,
        })
    }

    /// What served a volume that stays mounted serves it again (an Unmount stopped it).
    fn serve_again(&self, name: &str) {
        let spec = self
            .read_known()
            .get(name)
            .and_then(|k| k.spec.clone())
            .and_then(|w| VolumeSpec::from_wire_unresolved(&w).ok());
        if let Some(spec) = spec {
            if let Err(e) = self.ensure_attached(&spec) {
                warn!(self.log, "could not serve the volume again"; "volume" => name,
                    "error" => %e);
            }
        }
    }

    /// Every known volume with the kernel's view of it.
    pub fn list(&self) -> Vec<agent::VolumeStatus> {
        let entries = mountinfo::read().unwrap_or_default();
        self.reconcile(&entries);
        self.read_known()
            .iter()
            .map(|(name, k)| {
                let mount_point = spec::mount_point(name);
                let entry = mountinfo::find(&entries, &mount_point);
                let state = match (entry, &k.spec) {
                    (None, _) => "missing",
                    (Some(_), None) => "adopted",
                    (Some(_), Some(_)) => "mounted",
                };
                agent::VolumeStatus {
                    volume: protobuf::MessageField::some(k.spec.clone().unwrap_or_else(|| {
                        agent::VolumeSpec {
                            name: name.clone(),
                            ..Default::default()
                        }
                    })),
                    mount_point: mount_point.display().to_string(),
                    state: state.to_string(),
                    fs_type: entry.map(|e| e.fs_type.clone()).unwrap_or_default(),
                    device: entry.map(|e| e.source.clone()).unwrap_or_default(),
                    ..Default::default()
                }
            })
            .collect()
    }

    /// statfs of the volume, bounded: a dead server gives an `UNRESPONSIVE` verdict, not a
    /// hung call. One probe per volume runs at a time, to its own `bound`, whoever waits for
    /// it; a caller waits at most `wait` and then hears that the probe has not answered yet.
    pub async fn stats(
        &self,
        name: &str,
        bound: Duration,
        wait: Duration,
    ) -> Result<Stats, AgentError> {
        spec::validate_name("name", name)?;
        let entries = mountinfo::read().unwrap_or_default();
        self.reconcile(&entries);
        if !self.read_known().contains_key(name) {
            return Err(AgentError::NotFound(format!(
                "volume {name} is not mounted"
            )));
        }
        let mount_point = spec::mount_point(name);
        let mut st = Stats {
            total_bytes: 0,
            free_bytes: 0,
            available_bytes: 0,
            total_inodes: 0,
            free_inodes: 0,
            health: agent::Health::HEALTHY,
            detail: String::new(),
            probe: Duration::ZERO,
            warnings: Vec::new(),
        };
        let Some(entry) = mountinfo::find(&entries, &mount_point) else {
            st.health = agent::Health::NOT_MOUNTED;
            st.detail = format!(
                "nothing is mounted at {} (unmounted outside the agent); Mount it again or Unmount it",
                mount_point.display()
            );
            return Ok(st);
        };
        // By the kernel's type, so that an adopted volume (no spec) gets its handler too.
        let handler = self.registry.for_kernel_type(&entry.fs_type);
        let attachment = self.attachments().get(name).cloned();
        let readiness = attachment.as_ref().map(|a| a.readiness());
        if let Some(Readiness::Waiting(why)) = readiness {
            // A probe would only wait with every other access.
            st.health = agent::Health::NOT_READY;
            st.detail = why;
            return Ok(st);
        }
        let first_answer_pending = readiness == Some(Readiness::Served { answered: false });
        // An encrypted volume's ext4 answers statfs from memory: whether its server answers
        // is probed on the share under it.
        let backing = crate::fs::luks2::backing_dir(name);
        let health = mountinfo::find(&entries, &backing).map(|_| backing);
        let (result, started) = self.probe(name, &mount_point, health.as_deref(), bound)?;
        let outcome = tokio::time::timeout(wait, result).await;
        let probe = started.elapsed();
        st.probe = probe;
        if let (Ok(Outcome::Done(_)), Some(a)) = (&outcome, &attachment) {
            a.answered();
        }
        if first_answer_pending && !matches!(outcome, Ok(Outcome::Done(_) | Outcome::Failed(_))) {
            st.health = agent::Health::NOT_READY;
            st.detail = format!(
                "its server has not answered yet (no answer within {probe:?}); accesses wait until it does"
            );
            return Ok(st);
        }
        match outcome {
            Ok(Outcome::Done([total, free, avail, files, ffree, owner])) => {
                st.total_bytes = total;
                st.free_bytes = free;
                st.available_bytes = avail;
                st.total_inodes = files;
                st.free_inodes = ffree;
                st.detail = format!("statfs answered in {probe:?}");
                let (uid, gid) = (owner >> 32, owner & 0xffff_ffff);
                if let Some(w) = handler.and_then(|h| h.root_owner_warning(uid, gid)) {
                    st.warnings.push(w);
                }
                if let Some(why) = crate::fs::luks2::lock_lost(name, &entries).await {
                    st.health = agent::Health::ERROR;
                    st.detail = why;
                }
            }
            Ok(Outcome::Failed(e)) => {
                st.health = agent::Health::ERROR;
                st.detail = format!("statfs failed: {}", e.desc());
                if let Some(why) = attachment.as_ref().and_then(|a| a.explain(e)) {
                    st.detail = format!("{}: {why}", st.detail);
                }
                // A volume shut down because its lock is gone fails with EIO: say why.
                if let Some(why) = crate::fs::luks2::lock_lost(name, &entries).await {
                    st.detail = format!("{}: {why}", st.detail);
                }
            }
            Ok(Outcome::TimedOut) => {
                st.health = agent::Health::UNRESPONSIVE;
                st.detail =
                    format!("statfs did not answer within {bound:?}; the server may be down");
            }
            Err(_) => {
                st.health = agent::Health::UNRESPONSIVE;
                st.detail =
                    format!("statfs has not answered for {probe:?}; the server may be down");
            }
        }
        Ok(st)
    }

    /// The volume's probe in flight, or a new one: a statfs in a child, run in its own task
    /// to `bound` whatever its waiters do, and forgotten when its child is gone. A child that
    /// outlives SIGKILL (a FUSE request its hung daemon has read waits uninterruptibly) keeps
    /// the probe, answered "timed out", so that no second child piles up behind it.
    fn probe(
        &self,
        name: &str,
        mount_point: &Path,
        health: Option<&Path>,
        bound: Duration,
    ) -> Result<(ProbeResult, Instant), AgentError> {
        let mut probes = self.probes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = probes.get(name) {
            return Ok((p.result.clone(), p.started));
        }
        let target = CString::new(mount_point.as_os_str().as_bytes())
            .map_err(|_| AgentError::Internal("mount point has a NUL byte".into()))?;
        let health = health
            .map(|h| CString::new(h.as_os_str().as_bytes()))
            .transpose()
            .map_err(|_| AgentError::Internal("backing path has a NUL byte".into()))?;
        let id = self
            .next_probe
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (table, key) = (self.probes.clone(), name.to_string());
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (outcome, alive) = killable::run_tracked(bound, None, move || {
                if let Some(h) = &health {
                    statfs(h)?;
                }
                statfs(&target)
            })
            .await;
            let _ = tx.send(outcome);
            if let Some(alive) = alive {
                alive.await;
            }
            let mut t = table.lock().unwrap_or_else(|p| p.into_inner());
            if t.get(&key).is_some_and(|p| p.id == id) {
                t.remove(&key);
            }
        });
        let result: Pin<Box<dyn Future<Output = Outcome> + Send>> =
            Box::pin(rx.map(|r| r.unwrap_or(Outcome::Failed(Errno::EIO))));
        let result = result.shared();
        let started = Instant::now();
        probes.insert(
            name.to_string(),
            Probe {
                id,
                started,
                result: result.clone(),
            },
        );
        Ok((result, started))
    }

    /// Probes in flight right now (for tests).
    pub fn probes_in_flight(&self) -> usize {
        self.probes.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// mount(2) at `mount_point` in a killable child, to `deadline`, with descriptor `keep`
/// open in it. `data` (it may hold a key) is wiped once the call is over. An `Err` is a
/// failure before the call.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn mount_in_child(
    what: &str,
    mount_point: &Path,
    source: &str,
    fs_type: &str,
    flags: nix::mount::MsFlags,
    data: String,
    keep: Option<std::os::fd::RawFd>,
    deadline: tokio::time::Instant,
) -> Result<Outcome, AgentError> {
    let cstr = |s: &[u8]| {
        CString::new(s)
            .map_err(|_| AgentError::Internal(format!("{what}: NUL byte in mount arguments")))
    };
    let copied = cstr(data.as_bytes());
    wipe(data.into_bytes());
    let secret = Wiped(Some(copied?));
    let source = cstr(source.as_bytes())?;
    let target = cstr(mount_point.as_os_str().as_bytes())?;
    let fs_type = cstr(fs_type.as_bytes())?;
    std::fs::create_dir_all(mount_point)
        .map_err(|e| AgentError::Internal(format!("creating {}: {e}", mount_point.display())))?;
    let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
    // Every argument a &CStr: nix passes the pointers (the key is not copied anywhere) and
    // allocates nothing in the child.
    let outcome = killable::run_keeping(remaining, keep, || {
        nix::mount::mount(
            Some(source.as_c_str()),
            target.as_c_str(),
            Some(fs_type.as_c_str()),
            flags,
            secret.as_c_str(),
        )
        .map(|()| [0; 6])
    })
    .await;
    Ok(outcome)
}

/// A mount option string that may hold a key: cleared when dropped, on every path out of the
/// mount call, not whenever the allocator reuses it.
struct Wiped(Option<CString>);

impl Wiped {
    fn as_c_str(&self) -> Option<&std::ffi::CStr> {
        self.0.as_deref()
    }
}

impl Drop for Wiped {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            wipe(c.into_bytes_with_nul());
        }
    }
}

/// statfs(2) for a forked child: figures in the payload, nothing allocated. The last slot
/// holds the owner of the volume's root (`uid << 32 | gid`), to tell unmapped NFSv4 owners.
pub(crate) fn statfs(target: &CString) -> Result<killable::Payload, Errno> {
    let owner = match nix::sys::stat::stat(target.as_c_str()) {
        Ok(st) => (u64::from(st.st_uid) << 32) | u64::from(st.st_gid),
        Err(_) => 0,
    };
    // Kept on libc: nix's Statfs does not expose f_frsize, and statvfs(3) is a libc wrapper
    // that is not promised to be async-signal-safe in this forked child.
    // SAFETY: all-zero is a valid libc::statfs (integers only).
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path that outlives the call, and a struct on the stack that
    // statfs(2) fills in.
    match unsafe { libc::statfs(target.as_ptr(), &mut s) } {
        0 => {
            let frsize = if s.f_frsize > 0 {
                s.f_frsize
            } else {
                s.f_bsize
            } as u64;
            Ok([
                s.f_blocks * frsize,
                s.f_bfree * frsize,
                s.f_bavail * frsize,
                s.f_files,
                s.f_ffree,
                owner,
            ])
        }
        _ => Err(Errno::last()),
    }
}

/// Overwrites a buffer that held a secret before freeing it.
fn wipe(mut bytes: Vec<u8>) {
    for b in bytes.iter_mut() {
        // SAFETY: a valid, aligned, exclusive reference into the vector.
        unsafe { std::ptr::write_volatile(b, 0) };
    }
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volumes() -> Volumes {
        Volumes::new(
            Config {
                modules_dir: "/nonexistent".into(),
                state_dir: std::env::temp_dir().join("cnfs-volumes-unit-state"),
                sandbox_id: None,
                default_mount_timeout: Duration::from_secs(5),
                max_timeout: Duration::from_secs(5),
                default_unmount_timeout: Duration::from_secs(5),
                default_probe_timeout: Duration::from_secs(5),
                tools: crate::tools::ToolClient::disabled("unit tests run no tool runner"),
            },
            Logger::root(slog::Discard, slog::o!()),
        )
    }

    #[test]
    fn encrypted_volumes_get_four_times_the_default_deadline_within_the_cap() {
        let mut v = volumes();
        v.cfg.max_timeout = Duration::from_secs(300);
        assert_eq!(v.mount_timeout(0, false), Duration::from_secs(5));
        assert_eq!(v.mount_timeout(0, true), Duration::from_secs(20));
        assert_eq!(
            v.mount_timeout(7_000, true),
            Duration::from_secs(7),
            "asked for"
        );
        v.cfg.max_timeout = Duration::from_secs(10);
        assert_eq!(v.mount_timeout(0, true), Duration::from_secs(10), "capped");
    }

    #[tokio::test]
    async fn the_lock_table_forgets_names_once_their_operations_end() {
        let v = volumes();
        for i in 0..20_000 {
            let e = v
                .unmount(&format!("never-mounted-{i}"), Duration::from_secs(5), false)
                .await
                .err()
                .map(|e| e.code());
            assert_eq!(e, Some(ttrpc::Code::NOT_FOUND));
        }
        assert_eq!(v.lock_entries(), 0, "the lock table kept the names");
        // An entry lives exactly while an operation holds or waits for it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let held = v
            .lock_volume("busy", deadline, Duration::from_secs(5))
            .await
            .expect("free");
        assert!(v.busy("busy"));
        let short = tokio::time::Instant::now() + Duration::from_millis(50);
        let waited = v
            .lock_volume("busy", short, Duration::from_millis(50))
            .await;
        assert_eq!(
            waited.err().map(|e| e.code()),
            Some(ttrpc::Code::DEADLINE_EXCEEDED)
        );
        assert_eq!(v.lock_entries(), 1);
        drop(held);
        assert_eq!(v.lock_entries(), 0);
    }

    #[tokio::test]
    async fn concurrent_probes_of_one_volume_share_one_child() {
        let v = Arc::new(volumes());
        // A known volume whose "mount point" is a directory that exists on any machine.
        let dir = std::env::temp_dir();
        let mut joined = Vec::new();
        for _ in 0..8 {
            let (result, _) = v
                .probe("tmp", &dir, None, Duration::from_secs(5))
                .expect("probe");
            joined.push(result);
        }
        assert_eq!(v.probes_in_flight(), 1);
        for r in joined {
            assert!(matches!(r.await, Outcome::Done(_)));
        }
        // The probe forgets itself when it ends.
        let until = Instant::now() + Duration::from_secs(5);
        while v.probes_in_flight() > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(v.probes_in_flight(), 0);
    }
}
