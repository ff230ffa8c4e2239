//! The CephFS controller backend: creates, inspects, resizes and removes CephFS *subvolumes*
//! with Ceph's own management commands (`ceph fs subvolume ...`, served by the manager's
//! `volumes` module). That is all user space: no mount, no privilege, only the `ceph` CLI
//! from ceph-common and a client key with `mgr "allow rw"` (plus the mon caps to connect).
//!
//! Every call runs one short-lived `ceph` process that needs nothing from the host: the
//! monitors, client name and key come from the caller, `--conf /dev/null` and
//! `--keyring /dev/null` keep `/etc/ceph` out of it, and `CEPH_ARGS`/`CEPH_CONF` are removed
//! from its environment. Each process is bounded twice: by Ceph's own timeouts (connect,
//! monitor and manager commands) and by a hard deadline after which it is killed.
//!
//! **The key** never appears on a command line, in the environment, on disk or in an error:
//! see `KeyFile` for how it reaches `ceph`, and `excerpt` for how `ceph`'s own output is
//! scrubbed (it does echo a key it cannot decode).
//!
//! Observed with Ceph 16.2.15 (Debian 12), and relied on here:
//! - `fs subvolume create` on an existing subvolume succeeds and *applies the new size*, so
//!   [`Subvolumes::create`] looks first and refuses a different size itself.
//! - A missing subvolume or group: exit 2, `Error ENOENT: subvolume 'x' does not exist` /
//!   `subvolume group 'g' does not exist`; a missing file system: exit 2,
//!   `Error ENOENT: FS 'f' not found`.
//! - A key without mgr caps: exit 13, `Error EACCES: access denied: does your client key have
//!   mgr caps?`; a wrong key: exit 13, `[errno 13] RADOS permission denied (error connecting
//!   to the cluster)`; an undecodable key: exit 1, `[errno 22] RADOS invalid argument (error
//!   connecting to the cluster)`, after log lines that quote the key.
//! - No monitor answering: exit 1, `timed out` (`--connect-timeout`); a manager or MDS that
//!   does not answer: exit 110, `Error ETIMEDOUT: Connection timed out.`
//!   (`--rados_mon_op_timeout`, which also bounds manager commands).
//! - Sizes: `0` means "no quota"; above `i64::MAX` is `EINVAL` (exit 22); `info` reports
//!   `"bytes_quota": "infinite"` for no quota.
//! - `--fsid` is not checked by the client against the cluster it reaches, so a configured
//!   fsid is verified with `ceph fsid` before each operation.

use std::ffi::CString;
use std::fmt;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use serde_json::Value;

use super::{BackendError, DEFAULT_TIMEOUT};

/// Longest name (file system, group, subvolume, client id) accepted.
const NAME_MAX: usize = 100;
/// Longest stderr excerpt carried in an error.
const EXCERPT_MAX: usize = 400;
/// Largest quota Ceph accepts (it parses sizes as signed 64-bit).
const SIZE_MAX: u64 = i64::MAX as u64;
/// Mode of a new subvolume's directory: world-writable, because the pods that use a volume
/// run with arbitrary uids the controller cannot know.
const SUBVOLUME_MODE: &str = "0777";

/// Where a Ceph cluster's monitors are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CephCluster {
    /// `ip:port` (v2 on 3300 or v1 on 6789), `[ipv6]:port`, or a host name; an optional
    /// `v1:`/`v2:` prefix is passed on as it is.
    pub monitors: Vec<String>,
    /// The cluster's fsid; when set, every operation first checks that the monitors belong
    /// to this cluster.
    pub fsid: Option<String>,
}

/// A cephx identity: `client.<id>` and its base64 key. The key is private and never shown.
#[derive(Clone)]
pub struct CephCredentials {
    /// The client name without `client.`.
    pub id: String,
    key: String,
}

impl CephCredentials {
    /// Checks the id like any other name and the key's base64 shape (a cephx key is 40
    /// characters; anything from 16 to 256 is let through to Ceph). Surrounding whitespace,
    /// e.g. a trailing newline from a secret file, is dropped.
    pub fn new(id: impl Into<String>, key: impl Into<String>) -> Result<Self, BackendError> {
        let id = id.into();
        check_name("client id", &id)?;
        let key = key.into().trim().to_string();
        if let Err(why) = check_key_shape(&key) {
            return Err(BackendError::Invalid(format!(
                "the key of client.{id} is not a base64 cephx key: {why}"
            )));
        }
        Ok(CephCredentials { id, key })
    }
}

impl fmt::Debug for CephCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CephCredentials")
            .field("id", &self.id)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// A subvolume as Ceph reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubvolumeInfo {
    /// Absolute path inside the file system (what `getpath` prints), the path to mount.
    pub path: String,
    /// The quota in bytes; `None` = no quota.
    pub bytes_quota: Option<u64>,
}

/// The subvolumes of one group in one CephFS file system, as one client sees them.
#[derive(Debug)]
pub struct Subvolumes<'a> {
    cluster: &'a CephCluster,
    creds: &'a CephCredentials,
    fs: String,
    group: String,
    timeout: Duration,
    /// `["ceph"]`; tests put a fake in front: program and leading arguments.
    command: Vec<String>,
}

/// What an operation found out about a subvolume name.
enum Lookup {
    Found(SubvolumeInfo),
    NoSubvolume,
    NoGroup,
}

impl<'a> Subvolumes<'a> {
    /// Checks every name and address up front, so no invalid value ever reaches a command
    /// line. Each `ceph` command is bounded by [`DEFAULT_TIMEOUT`] (see
    /// [`Subvolumes::with_timeout`]).
    pub fn new(
        cluster: &'a CephCluster,
        creds: &'a CephCredentials,
        fs: &str,
        group: &str,
    ) -> Result<Self, BackendError> {
        check_cluster(cluster)?;
        check_name("file system name", fs)?;
        check_name("subvolume group", group)?;
        Ok(Subvolumes {
            cluster,
            creds,
            fs: fs.to_string(),
            group: group.to_string(),
            timeout: DEFAULT_TIMEOUT,
            command: vec!["ceph".to_string()],
        })
    }

    /// Bound on each `ceph` command (an operation runs one to four of them). At least 1 s.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.max(Duration::from_secs(1));
        self
    }

    /// Creates subvolume `name` with a quota of `size_bytes` (`None`: no quota) and mode
    /// 0777, creating the group first if it is missing. Idempotent: an existing subvolume
    /// with the same quota is returned as it is; with another quota it is left untouched and
    /// the answer is [`BackendError::AlreadyExists`]. (The check and the create are two
    /// commands: two calls for one name at once, with different sizes, could both pass it.
    /// The CSI spec asks the CO to keep one call per volume in flight.)
    pub async fn create(
        &self,
        name: &str,
        size_bytes: Option<u64>,
    ) -> Result<SubvolumeInfo, BackendError> {
        check_name("subvolume name", name)?;
        if let Some(size) = size_bytes {
            check_size(size)?;
        }
        self.check_fsid().await?;
        match self.lookup(name).await? {
            Lookup::Found(existing) if existing.bytes_quota == size_bytes => return Ok(existing),
            Lookup::Found(existing) => {
                return Err(BackendError::AlreadyExists(format!(
                    "subvolume {} already exists with quota {}, not {}",
                    self.subvolume(name),
                    show_quota(existing.bytes_quota),
                    show_quota(size_bytes)
                )))
            }
            Lookup::NoGroup => {
                let args = ["fs", "subvolumegroup", "create", &self.fs, &self.group];
                self.run(&args).await.map_err(|f| {
                    f.into_error(&format!("creating group {}/{}", self.fs, self.group))
                })?;
            }
            Lookup::NoSubvolume => {}
        }
        let size = size_bytes.map(|s| s.to_string());
        let mut args = vec![
            "fs",
            "subvolume",
            "create",
            &self.fs,
            name,
            "--group_name",
            &self.group,
            "--mode",
            SUBVOLUME_MODE,
        ];
        if let Some(size) = &size {
            args.extend(["--size", size]);
        }
        self.run(&args)
            .await
            .map_err(|f| f.into_error(&format!("creating subvolume {}", self.subvolume(name))))?;
        match self.lookup(name).await? {
            Lookup::Found(info) => Ok(info),
            _ => Err(BackendError::Failed(format!(
                "subvolume {} was created but is gone again",
                self.subvolume(name)
            ))),
        }
    }

    /// The subvolume's path and quota, or `None` when it (or its group) does not exist.
    pub async fn info(&self, name: &str) -> Result<Option<SubvolumeInfo>, BackendError> {
        check_name("subvolume name", name)?;
        self.check_fsid().await?;
        match self.lookup(name).await? {
            Lookup::Found(info) => Ok(Some(info)),
            Lookup::NoSubvolume | Lookup::NoGroup => Ok(None),
        }
    }

    /// Sets the quota to `new_size_bytes` and returns the quota Ceph reports afterwards.
    /// `--no_shrink`: Ceph refuses ([`BackendError::Invalid`]) a quota below what is already
    /// used. A missing subvolume is [`BackendError::NotFound`].
    pub async fn resize(&self, name: &str, new_size_bytes: u64) -> Result<u64, BackendError> {
        check_name("subvolume name", name)?;
        check_size(new_size_bytes)?;
        self.check_fsid().await?;
        let size = new_size_bytes.to_string();
        let args = [
            "fs",
            "subvolume",
            "resize",
            &self.fs,
            name,
            &size,
            "--group_name",
            &self.group,
            "--no_shrink",
            "--format",
            "json",
        ];
        let what = format!("resizing subvolume {}", self.subvolume(name));
        let out = self.run(&args).await.map_err(|f| f.into_error(&what))?;
        match parse_resize(&out) {
            Ok(Some(quota)) => Ok(quota),
            Ok(None) => Err(BackendError::Failed(format!(
                "{what}: ceph reports no quota after the resize"
            ))),
            Err(why) => Err(BackendError::Failed(format!("{what}: {why}"))),
        }
    }

    /// Removes the subvolume and its data. Idempotent: a missing subvolume or group is Ok (a
    /// missing file system is not: that is a configuration error).
    pub async fn delete(&self, name: &str) -> Result<(), BackendError> {
        check_name("subvolume name", name)?;
        self.check_fsid().await?;
        let args = [
            "fs",
            "subvolume",
            "rm",
            &self.fs,
            name,
            "--group_name",
            &self.group,
        ];
        match self.run(&args).await {
            Ok(_) => Ok(()),
            Err(f) if f.subvolume_or_group_missing() => Ok(()),
            Err(f) => Err(f.into_error(&format!("removing subvolume {}", self.subvolume(name)))),
        }
    }

    /// `fs subvolume info`, which also reports the path (the same `getpath` prints).
    async fn lookup(&self, name: &str) -> Result<Lookup, BackendError> {
        let args = [
            "fs",
            "subvolume",
            "info",
            &self.fs,
            name,
            "--group_name",
            &self.group,
            "--format",
            "json",
        ];
        let what = format!("looking up subvolume {}", self.subvolume(name));
        match self.run(&args).await {
            Ok(out) => parse_info(&out)
                .map(Lookup::Found)
                .map_err(|why| BackendError::Failed(format!("{what}: {why}"))),
            Err(f) if f.group_missing() => Ok(Lookup::NoGroup),
            Err(f) if f.subvolume_or_group_missing() => Ok(Lookup::NoSubvolume),
            Err(f) => Err(f.into_error(&what)),
        }
    }

    /// With a configured fsid: are the monitors really that cluster's? The client itself
    /// does not check (see the module notes), and provisioning on, or deleting from, the
    /// wrong cluster must not happen.
    async fn check_fsid(&self) -> Result<(), BackendError> {
        let Some(want) = &self.cluster.fsid else {
            return Ok(());
        };
        let out = self
            .run(&["fsid", "--format", "json"])
            .await
            .map_err(|f| f.into_error("asking the cluster for its fsid"))?;
        let got = serde_json::from_str::<Value>(&out)
            .ok()
            .and_then(|v| v["fsid"].as_str().map(str::to_string))
            .ok_or_else(|| BackendError::Failed("`ceph fsid` printed no fsid".to_string()))?;
        if !got.eq_ignore_ascii_case(want) {
            return Err(BackendError::Invalid(format!(
                "the Ceph cluster at {} has fsid {got}, not the configured {want}",
                self.monitors()
            )));
        }
        Ok(())
    }

    fn subvolume(&self, name: &str) -> String {
        format!("{}/{}/{}", self.fs, self.group, name)
    }

    fn monitors(&self) -> String {
        self.cluster.monitors.join(",")
    }

    /// Runs `ceph <args>` as this client and returns its stdout, or the classified failure.
    async fn run(&self, args: &[&str]) -> Result<String, Failure> {
        let unavailable = |detail: String| Failure {
            kind: Kind::Unavailable,
            text: format!(
                "the Ceph cluster at {} did not answer within {}{detail}",
                self.monitors(),
                show_secs(self.timeout)
            ),
        };
        let key = KeyFile::new(&self.creds.key).map_err(|e| Failure {
            kind: Kind::Failed,
            text: format!("cannot hand the key to ceph: {e}"),
        })?;
        // Ceph's own limits end a little before the hard deadline, so that in the usual case
        // ceph says what it was waiting for.
        let soft = self.timeout.as_secs().saturating_sub(1).max(1).to_string();
        let (program, leading) = self.command.split_first().ok_or_else(|| Failure {
            kind: Kind::Failed,
            text: "no ceph command configured".to_string(),
        })?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(leading)
            .args(["--conf", "/dev/null", "--keyring", "/dev/null", "-m"])
            .arg(self.monitors())
            .arg("--name")
            .arg(format!("client.{}", self.creds.id))
            .arg("--keyfile")
            .arg(key.path())
            .args(["--connect-timeout", &soft])
            .args(["--client_mount_timeout", &soft])
            .args(["--rados_mon_op_timeout", &soft])
            .args(args)
            .env_remove("CEPH_ARGS")
            .env_remove("CEPH_CONF")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        key.inherit_into(&mut cmd);
        let child = cmd.spawn().map_err(|e| Failure {
            kind: Kind::Failed,
            // The cnfs-csi image carries no Ceph CLI: say what is missing and where the fix is.
            text: format!(
                "cannot run {program} ({e}): the CephFS backend needs Ceph's `ceph` CLI \
                 (Debian's ceph-common), which the cnfs-csi image does not carry; run the \
                 controller from an image that has it (configs/csi/README.md, \"CephFS\")"
            ),
        })?;
        // The child has its own copy of the key file; ours goes now.
        drop(key);
        let out = match tokio::time::timeout(self.timeout, child.wait_with_output()).await {
            // Dropping the unfinished future drops the child: kill_on_drop SIGKILLs it.
            Err(_) => return Err(unavailable(String::new())),
            Ok(Err(e)) => {
                return Err(Failure {
                    kind: Kind::Failed,
                    text: format!("waiting for ceph: {e}"),
                })
            }
            Ok(Ok(out)) => out,
        };
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let text = excerpt(&stderr, &self.creds.key);
        let kind = classify(out.status.code(), &text);
        if kind == Kind::Unavailable {
            return Err(unavailable(format!(" ({text})")));
        }
        Err(Failure { kind, text })
    }

    /// Tests only: run another command (program and leading arguments) instead of `ceph`.
    #[cfg(test)]
    fn with_command(mut self, command: &[&str]) -> Self {
        self.command = command.iter().map(|s| s.to_string()).collect();
        self
    }
}

/// The key as a file that exists only in memory: a memfd (anonymous shared memory, linked
/// into no file system) holding the key, which the `ceph` child inherits and opens as
/// `/dev/fd/<n>` (`--keyfile`). Chosen over the alternatives because `--key` would show in
/// `/proc/<pid>/cmdline`, an environment variable in `/proc/<pid>/environ`, and a temporary
/// file would be on disk; a pipe on stdin would work too but can be read only once, while
/// opening `/dev/fd/<n>` of a memfd always starts at offset 0.
struct KeyFile {
    fd: OwnedFd,
}

impl KeyFile {
    fn new(key: &str) -> std::io::Result<Self> {
        let name = CString::new("cephx-key").map_err(std::io::Error::other)?;
        // Close-on-exec in this process, so no other child started meanwhile inherits it.
        let fd = memfd_create(&name, MemFdCreateFlag::MFD_CLOEXEC)?;
        // Never one of 0-2: the child's stdio is set up over those before `pre_exec` runs.
        let fd = if fd.as_raw_fd() < 3 {
            let raw = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3))?;
            // SAFETY: `fcntl` just returned this new descriptor, owned by nobody else.
            unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) }
        } else {
            fd
        };
        let mut file = std::fs::File::from(fd);
        file.write_all(key.as_bytes())?;
        Ok(KeyFile { fd: file.into() })
    }

    fn path(&self) -> String {
        format!("/dev/fd/{}", self.fd.as_raw_fd())
    }

    /// Clears close-on-exec on the memfd in the child only (after fork, before exec), so that
    /// `ceph` inherits it under the same number and nothing else does.
    fn inherit_into(&self, cmd: &mut tokio::process::Command) {
        let fd: RawFd = self.fd.as_raw_fd();
        // SAFETY: the closure runs in the forked child before exec, where only
        // async-signal-safe calls are allowed: it makes one `fcntl` call on a descriptor that
        // the child inherited open (the parent keeps the memfd alive until `spawn` returns),
        // allocates nothing and takes no lock.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

/// How a failed `ceph` command is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    NotFound,
    PermissionDenied,
    Invalid,
    Unavailable,
    Failed,
}

/// A failed `ceph` command: its kind and the scrubbed, bounded excerpt of what it said (or,
/// for failures around the command, a description).
struct Failure {
    kind: Kind,
    text: String,
}

impl Failure {
    /// `Error ENOENT: subvolume group 'g' does not exist`.
    fn group_missing(&self) -> bool {
        self.kind == Kind::NotFound && self.text.contains("subvolume group")
    }

    /// `... subvolume 'x' does not exist` or a missing group, but not a missing file system
    /// (`FS 'f' not found`).
    fn subvolume_or_group_missing(&self) -> bool {
        self.kind == Kind::NotFound && self.text.contains("does not exist")
    }

    /// The error for the caller: what was being done, then what went wrong.
    fn into_error(self, what: &str) -> BackendError {
        let text = format!("{what}: {}", self.text);
        match self.kind {
            Kind::NotFound => BackendError::NotFound(text),
            Kind::PermissionDenied => BackendError::PermissionDenied(text),
            Kind::Invalid => BackendError::Invalid(text),
            Kind::Unavailable => BackendError::Unavailable(text),
            Kind::Failed => BackendError::Failed(text),
        }
    }
}

/// Sorts a failure by what `ceph` printed (already scrubbed) and its exit status. The text
/// comes first because the CLI exits 1 for many different things (a connect timeout, a bad
/// key); the status (the errno: 2, 13, 22, 110, ...) decides otherwise.
fn classify(code: Option<i32>, text: &str) -> Kind {
    let lower = text.to_ascii_lowercase();
    let has = |s: &str| lower.contains(s);
    // Could not talk to the cluster at all: by the errno in `[errno N] ... (error connecting
    // to the cluster)`.
    if has("error connecting to the cluster") {
        return if has("[errno 13]") || has("[errno 1]") {
            Kind::PermissionDenied
        } else if has("[errno 22]") {
            Kind::Invalid
        } else {
            Kind::Unavailable
        };
    }
    if has("timed out") || has("etimedout") || has("eagain") || matches!(code, Some(110 | 11)) {
        Kind::Unavailable
    } else if has("enoent") || has("does not exist") || has("not found") || code == Some(2) {
        Kind::NotFound
    } else if has("eacces")
        || has("eperm")
        || has("access denied")
        || has("permission denied")
        || has("operation not permitted")
        || code == Some(13)
    {
        Kind::PermissionDenied
    } else if has("einval") || has("invalid command") || code == Some(22) {
        Kind::Invalid
    } else {
        Kind::Failed
    }
}

/// A bounded, key-free excerpt of `ceph`'s stderr: the key (and any log line about decoding
/// one) removed first, then the error lines (`Error E...:`, `[errno N] ...`,
/// `Invalid command`) ahead of log lines, without their time stamps, joined with "; " and cut
/// to [`EXCERPT_MAX`] characters.
fn excerpt(stderr: &str, key: &str) -> String {
    let mut scrubbed = stderr.to_string();
    let unpadded = key.trim_end_matches('=');
    for k in [key, unpadded] {
        if !k.is_empty() {
            scrubbed = scrubbed.replace(k, "<key redacted>");
        }
    }
    let lines: Vec<String> = scrubbed
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| {
            if l.contains("decode key") {
                "auth: failed to decode the key".to_string()
            } else {
                without_log_prefix(l).to_string()
            }
        })
        .collect();
    let is_error = |l: &String| {
        l.starts_with("Error ")
            || l.starts_with("[errno")
            || l.starts_with("Invalid command")
            || l.starts_with("timed out")
    };
    let mut ordered: Vec<&String> = lines.iter().filter(|l| is_error(l)).collect();
    ordered.extend(lines.iter().filter(|l| !is_error(l)));
    ordered.dedup();
    let joined = ordered
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join("; ");
    if joined.chars().count() <= EXCERPT_MAX {
        return if joined.is_empty() {
            "(no message)".to_string()
        } else {
            joined
        };
    }
    let mut cut: String = joined.chars().take(EXCERPT_MAX - 1).collect();
    cut.push('…');
    cut
}

/// `2026-11-25T11:48:22.735+0000 7fd0937fe6c0 -1 monclient: ...` → `monclient: ...`.
fn without_log_prefix(line: &str) -> &str {
    let mut parts = line.splitn(4, ' ');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(ts), Some(thread), Some(level), Some(rest))
            if ts.len() >= 20
                && ts.as_bytes().get(10) == Some(&b'T')
                && thread.chars().all(|c| c.is_ascii_hexdigit())
                && level.parse::<i32>().is_ok() =>
        {
            rest
        }
        _ => line,
    }
}

/// `fs subvolume info --format json`: `path` and `bytes_quota` (a number, or `"infinite"`).
fn parse_info(out: &str) -> Result<SubvolumeInfo, String> {
    let v: Value =
        serde_json::from_str(out).map_err(|e| format!("unreadable `subvolume info`: {e}"))?;
    let path = v["path"]
        .as_str()
        .filter(|p| p.starts_with('/'))
        .ok_or("`subvolume info` has no absolute path")?
        .to_string();
    let bytes_quota = quota(&v["bytes_quota"]).ok_or("`subvolume info` has no bytes_quota")?;
    Ok(SubvolumeInfo { path, bytes_quota })
}

/// `fs subvolume resize --format json`: a list of one-key objects, one of them
/// `{"bytes_quota": N}`.
fn parse_resize(out: &str) -> Result<Option<u64>, String> {
    let v: Value =
        serde_json::from_str(out).map_err(|e| format!("unreadable `subvolume resize`: {e}"))?;
    v.as_array()
        .and_then(|items| items.iter().find_map(|i| i.get("bytes_quota")))
        .and_then(quota)
        .ok_or_else(|| "`subvolume resize` printed no bytes_quota".to_string())
}

/// A quota value: `Some(None)` for no quota (`"infinite"`, or 0, which Ceph treats alike).
fn quota(v: &Value) -> Option<Option<u64>> {
    match v {
        Value::String(s) if s == "infinite" => Some(None),
        Value::Number(n) => n.as_u64().map(|q| (q > 0).then_some(q)),
        _ => None,
    }
}

/// Names go on the `ceph` command line, so only a plain set of characters, and never a
/// leading `-` (an option) or `.` (hidden, `..`).
fn check_name(field: &str, name: &str) -> Result<(), BackendError> {
    let why = if name.is_empty() {
        "is empty".to_string()
    } else if name.len() > NAME_MAX {
        format!("is longer than {NAME_MAX} bytes")
    } else if name.starts_with('-') || name.starts_with('.') {
        "starts with '-' or '.'".to_string()
    } else if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        format!("contains {c:?} (allowed: A-Z a-z 0-9 . _ -)")
    } else {
        return Ok(());
    };
    Err(BackendError::Invalid(format!(
        "{field} {} {why}",
        crate::bounds::echo(name)
    )))
}

/// Monitors go into `-m` (comma-joined) and the fsid is compared: check both.
fn check_cluster(cluster: &CephCluster) -> Result<(), BackendError> {
    if cluster.monitors.is_empty() {
        return Err(BackendError::Invalid("no Ceph monitors given".to_string()));
    }
    for m in &cluster.monitors {
        let ok = !m.is_empty()
            && m.len() <= 256
            && !m.starts_with('-')
            && m.chars().all(|c| {
                c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '[' | ']' | '-' | '_')
            });
        if !ok {
            return Err(BackendError::Invalid(format!(
                "monitor address {m:?} is not host:port (allowed: A-Z a-z 0-9 . : [ ] - _)"
            )));
        }
    }
    if let Some(fsid) = &cluster.fsid {
        if !is_uuid(fsid) {
            return Err(BackendError::Invalid(format!(
                "fsid {fsid:?} is not a UUID"
            )));
        }
    }
    Ok(())
}

fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Base64 shape only (alphabet, padding, length); whether Ceph can decode it is Ceph's call.
/// The reason never quotes the key.
fn check_key_shape(key: &str) -> Result<(), &'static str> {
    if key.len() < 16 || key.len() > 256 {
        return Err("wrong length");
    }
    if !key.len().is_multiple_of(4) {
        return Err("length is not a multiple of 4");
    }
    let body = key.trim_end_matches('=');
    if key.len() - body.len() > 2 {
        return Err("too much '=' padding");
    }
    if !body
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
    {
        return Err("characters outside the base64 alphabet");
    }
    Ok(())
}

fn check_size(size: u64) -> Result<(), BackendError> {
    if size == 0 || size > SIZE_MAX {
        return Err(BackendError::Invalid(format!(
            "size {size} is out of range: 1 to {SIZE_MAX} bytes (no size at all means no quota)"
        )));
    }
    Ok(())
}

fn show_quota(q: Option<u64>) -> String {
    q.map_or_else(|| "none".to_string(), |b| format!("{b} bytes"))
}

fn show_secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// The shape of a real cephx key (not one of any cluster).
    const KEY: &str = "AQC5ygZr0XC1MRAAw+DVI46MO/nuqITDNz+buQ==";

    fn cluster() -> CephCluster {
        CephCluster {
            monitors: vec!["127.0.0.1:3300".into()],
            fsid: None,
        }
    }

    #[test]
    fn names_are_checked_and_the_error_names_the_field() {
        for ok in ["a", "pvc-0f3e", "csi_vols", "A.b-c_9", &"x".repeat(100)] {
            assert!(check_name("subvolume name", ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("", "is empty"),
            (&"x".repeat(101), "longer than 100"),
            ("-rf", "starts with"),
            (".hidden", "starts with"),
            ("..", "starts with"),
            ("a b", "contains ' '"),
            ("a/b", "contains '/'"),
            ("a;b", "contains ';'"),
            ("é", "contains 'é'"),
            ("a\nb", "contains '\\n'"),
        ] {
            match check_name("subvolume group", bad) {
                Err(BackendError::Invalid(m)) => {
                    assert!(m.starts_with("subvolume group"), "{m}");
                    assert!(m.contains(why), "{bad:?}: {m}");
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        let creds = CephCredentials::new("admin", KEY).expect("valid");
        let c = cluster();
        for (fs, group, field) in [
            ("", "csi", "file system name"),
            ("cephfs", "-g", "subvolume group"),
        ] {
            match Subvolumes::new(&c, &creds, fs, group) {
                Err(BackendError::Invalid(m)) => assert!(m.starts_with(field), "{m}"),
                other => panic!("{other:?}"),
            }
        }
        match CephCredentials::new("client admin", KEY) {
            Err(BackendError::Invalid(m)) => assert!(m.starts_with("client id"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn keys_are_checked_for_shape_and_never_shown() {
        let creds = CephCredentials::new("admin", format!("{KEY}\n")).expect("valid key");
        assert_eq!(creds.key, KEY, "trailing newline kept");
        let shown = format!("{creds:?}");
        assert!(!shown.contains(KEY) && shown.contains("admin"), "{shown}");
        for bad in [
            "",
            "short==",
            "AQC5ygZr0XC1MRAAw+DVI46MO/nuqITDNz+buQ=",
            "AQC5ygZr0XC1MRAAw+DVI46MO/nuqITDNz+b===",
            "AQC5ygZr0XC1MRAAw-DVI46MO/nuqITDNz+buQ==",
            "AQC5ygZr0XC1MRAAw+DVI46MO/nuqITDNz+b=Q=",
            "AQC5ygZr0XC1MRAA w+DVI46MO/nuqITDNz+bQ==",
        ] {
            match CephCredentials::new("admin", bad) {
                Err(BackendError::Invalid(m)) => {
                    assert!(m.contains("client.admin"), "{m}");
                    assert!(bad.is_empty() || !m.contains(bad), "key in {m}");
                }
                other => panic!("{bad:?} accepted: {other:?}"),
            }
        }
    }

    #[test]
    fn cluster_addresses_fsid_and_sizes_are_checked() {
        let creds = CephCredentials::new("admin", KEY).expect("valid");
        let ok = CephCluster {
            monitors: vec![
                "10.0.0.1:3300".into(),
                "[fd00::1]:6789".into(),
                "v2:mon-a.example:3300".into(),
            ],
            fsid: Some("799f38ef-bbf1-4fd9-8b6b-5f66e8c272e8".into()),
        };
        assert!(Subvolumes::new(&ok, &creds, "cephfs", "csi").is_ok());
        for (monitors, fsid) in [
            (vec![], None),
            (vec!["".to_string()], None),
            (vec!["10.0.0.1:3300,10.0.0.2:3300".to_string()], None),
            (vec!["10.0.0.1 3300".to_string()], None),
            (vec!["--keyfile=/etc/shadow".to_string()], None),
            (
                vec!["10.0.0.1:3300".to_string()],
                Some("not-a-uuid".to_string()),
            ),
            (
                vec!["10.0.0.1:3300".to_string()],
                Some("799f38ef-bbf1-4fd9-8b6b-5f66e8c272e".to_string()),
            ),
        ] {
            let c = CephCluster { monitors, fsid };
            assert!(
                matches!(
                    Subvolumes::new(&c, &creds, "cephfs", "csi"),
                    Err(BackendError::Invalid(_))
                ),
                "{c:?} accepted"
            );
        }
        assert!(check_size(1).is_ok() && check_size(i64::MAX as u64).is_ok());
        assert!(matches!(check_size(0), Err(BackendError::Invalid(_))));
        assert!(matches!(
            check_size(i64::MAX as u64 + 1),
            Err(BackendError::Invalid(_))
        ));
    }

    #[test]
    fn info_and_resize_output_is_parsed() {
        // As printed by Ceph 16.2.15 (shortened).
        let info = r#"{"atime": "2026-11-25 11:47:58", "bytes_pcent": "0.00", "bytes_quota": 20971520,
            "bytes_used": 0, "data_pool": "cephfs_data", "mode": 16895,
            "path": "/volumes/csi/v1/280ec0a5-f319-4c2d-846e-3362333857bc", "state": "complete",
            "type": "subvolume", "uid": 0}"#;
        assert_eq!(
            parse_info(info),
            Ok(SubvolumeInfo {
                path: "/volumes/csi/v1/280ec0a5-f319-4c2d-846e-3362333857bc".into(),
                bytes_quota: Some(20971520),
            })
        );
        let infinite = r#"{"bytes_quota": "infinite", "path": "/volumes/csi/v2/abc"}"#;
        assert_eq!(parse_info(infinite).map(|i| i.bytes_quota), Ok(None));
        for bad in [
            "",
            "[]",
            r#"{"bytes_quota": 1}"#,
            r#"{"bytes_quota": 1, "path": "relative"}"#,
            r#"{"bytes_quota": -1, "path": "/p"}"#,
            r#"{"bytes_quota": "lots", "path": "/p"}"#,
            r#"{"path": "/p"}"#,
        ] {
            assert!(parse_info(bad).is_err(), "{bad}");
        }
        let resize = r#"[{"bytes_used": 0}, {"bytes_quota": 30000000}, {"bytes_pcent": "0.00"}]"#;
        assert_eq!(parse_resize(resize), Ok(Some(30000000)));
        assert_eq!(parse_resize(r#"[{"bytes_quota": 0}]"#), Ok(None));
        assert!(parse_resize(r#"[{"bytes_used": 0}]"#).is_err());
        assert!(parse_resize("{}").is_err());
    }

    #[test]
    fn failures_are_classified_as_ceph_16_reports_them() {
        use Kind::*;
        for (code, text, kind) in [
            (2, "Error ENOENT: subvolume 'nope' does not exist", NotFound),
            (2, "Error ENOENT: subvolume group 'nogroup' does not exist", NotFound),
            (2, "Error ENOENT: FS 'nofs' not found", NotFound),
            (13, "Error EACCES: access denied: does your client key have mgr caps? See http://docs.ceph.com/en/latest/mgr/administrator/#client-authentication", PermissionDenied),
            (13, "[errno 13] RADOS permission denied (error connecting to the cluster); monclient(hunting): handle_auth_bad_method server allowed_methods [2] but i only support [2,1]", PermissionDenied),
            (1, "Error EPERM: not allowed", PermissionDenied),
            (22, "Error EINVAL: Invalid subvolume size", Invalid),
            (22, "Invalid command: invalid chars   in bad name; Error EINVAL: invalid command", Invalid),
            (1, "[errno 22] RADOS invalid argument (error connecting to the cluster); auth: failed to decode the key", Invalid),
            (1, "timed out", Unavailable),
            (1, "[errno 110] RADOS timed out (error connecting to the cluster); monclient(hunting): authenticate timed out after 4", Unavailable),
            (110, "Error ETIMEDOUT: Connection timed out. Please check the client's permission and connection.", Unavailable),
            (11, "Error EAGAIN: the volumes module is busy", Unavailable),
            (39, "Error ENOTEMPTY: subvolume 'x' has snapshots", Failed),
            (1, "something else", Failed),
        ] {
            assert_eq!(classify(Some(code), text), kind, "{code} {text}");
        }
        assert_eq!(classify(None, ""), Failed);
        let missing = |text: &str| Failure {
            kind: classify(Some(2), text),
            text: text.into(),
        };
        assert!(missing("Error ENOENT: subvolume group 'g' does not exist").group_missing());
        assert!(!missing("Error ENOENT: subvolume 'x' does not exist").group_missing());
        assert!(missing("Error ENOENT: subvolume 'x' does not exist").subvolume_or_group_missing());
        assert!(!missing("Error ENOENT: FS 'nofs' not found").subvolume_or_group_missing());
    }

    #[test]
    fn stderr_excerpts_lose_the_key_and_stay_short() {
        // What ceph 16.2 prints for a key it cannot decode (it quotes the key).
        let stderr = format!(
            "2026-11-25T11:51:45.460+0000 7f2d1779d6c0 -1 auth: failed to decode key '{KEY}'\n\n\
             2026-11-25T11:51:45.464+0000 7f2d1779d6c0 -1 monclient: keyring not found\n\n\
             [errno 22] RADOS invalid argument (error connecting to the cluster)\n\
             echoed again: {KEY} and without padding {}\n",
            KEY.trim_end_matches('=')
        );
        let e = excerpt(&stderr, KEY);
        assert!(
            !e.contains(KEY) && !e.contains(KEY.trim_end_matches('=')),
            "{e}"
        );
        assert!(
            e.starts_with("[errno 22] RADOS invalid argument (error connecting to the cluster); auth: failed to decode the key; monclient: keyring not found"),
            "{e}"
        );
        assert!(e.contains("<key redacted>"), "{e}");
        // Bounded, also when the key sits right at the cut.
        let long = format!("Error EIO: {}{KEY}{}", "x".repeat(380), "y".repeat(600));
        let e = excerpt(&long, KEY);
        assert!(e.chars().count() <= EXCERPT_MAX, "{}", e.len());
        assert!(!e.contains(&KEY[..10]), "{e}");
        assert_eq!(excerpt("", KEY), "(no message)");
        assert_eq!(
            without_log_prefix(
                "2026-11-25T11:48:22.735+0000 7fd0937fe6c0 -1 monclient(hunting): x"
            ),
            "monclient(hunting): x"
        );
        assert_eq!(
            without_log_prefix("Error ENOENT: a b c"),
            "Error ENOENT: a b c"
        );
    }

    /// A stand-in for `ceph`: `sh -c SCRIPT fake-ceph <our arguments>`.
    fn fake<'a>(c: &'a CephCluster, creds: &'a CephCredentials, script: &str) -> Subvolumes<'a> {
        Subvolumes::new(c, creds, "cephfs", "csi")
            .expect("valid")
            .with_command(&["/bin/sh", "-c", script, "fake-ceph"])
    }

    #[tokio::test]
    async fn the_key_reaches_ceph_only_as_an_inherited_memfd_and_is_scrubbed_from_errors() {
        // The fake finds --keyfile, checks it is a memfd under /dev/fd, reads it, looks for
        // the key in its own command line and environment, then echoes the key to stderr as
        // ceph does for a key it cannot decode.
        let script = r#"
            while [ $# -gt 0 ]; do [ "$1" = --keyfile ] && kf=$2; shift; done
            case "$kf" in /dev/fd/*) ;; *) echo "keyfile is $kf" >&2; exit 5;; esac
            case "$(readlink "$kf")" in /memfd:cephx-key*) ;; *) echo "not a memfd" >&2; exit 5;; esac
            key=$(cat "$kf")
            [ -n "$key" ] || { echo "empty key file" >&2; exit 5; }
            if tr '\0' '\n' < /proc/$$/cmdline | grep -qF -- "$key"; then echo "key on the command line" >&2; exit 5; fi
            if tr '\0' '\n' < /proc/$$/environ | grep -qF -- "$key"; then echo "key in the environment" >&2; exit 5; fi
            echo "2026-11-25T11:51:45.460+0000 7f2d1779d6c0 -1 auth: failed to decode key '$key'" >&2
            echo "Error EIO: echoing $key" >&2
            exit 5
        "#;
        let c = cluster();
        let creds = CephCredentials::new("admin", KEY).expect("valid");
        let err = fake(&c, &creds, script)
            .info("vol")
            .await
            .expect_err("the fake fails");
        let BackendError::Failed(msg) = err else {
            panic!("{err:?}");
        };
        assert!(!msg.contains(KEY), "key in {msg}");
        // The fake got past its checks and echoed the key it read; the excerpt hid it.
        assert!(msg.contains("Error EIO: echoing <key redacted>"), "{msg}");
        assert!(
            msg.starts_with("looking up subvolume cephfs/csi/vol: "),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn a_hanging_ceph_is_killed_at_the_deadline() {
        let pid_file =
            std::env::temp_dir().join(format!("cnfs-csi-fake-ceph-{}.pid", std::process::id()));
        let script = format!("echo $$ > {}; exec sleep 60", pid_file.display());
        let c = cluster();
        let creds = CephCredentials::new("admin", KEY).expect("valid");
        let t = Instant::now();
        let err = fake(&c, &creds, &script)
            .with_timeout(Duration::from_secs(1))
            .delete("vol")
            .await
            .expect_err("times out");
        let took = t.elapsed();
        let BackendError::Unavailable(msg) = err else {
            panic!("{err:?}");
        };
        assert_eq!(
            msg,
            "removing subvolume cephfs/csi/vol: the Ceph cluster at 127.0.0.1:3300 did not \
             answer within 1 s"
        );
        assert!(took < Duration::from_secs(5), "{took:?}");
        let pid = std::fs::read_to_string(&pid_file).expect("the fake ran");
        let _ = std::fs::remove_file(&pid_file);
        // Killed: gone, or a zombie until tokio reaps it.
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            let stat =
                std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap_or_default();
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next());
            if matches!(state, None | Some("Z")) {
                break;
            }
            assert!(
                Instant::now() < until,
                "fake ceph {} still running: {stat}",
                pid.trim()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
