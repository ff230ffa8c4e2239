//! CephFS with the kernel client. The device uses the kernel's new syntax
//! `<client>@<fsid>.<fs>=<path>` with `mon_addr=` when the fsid is known, the legacy
//! `<mon>,<mon>:<path>` with `name=` and `mds_namespace=` otherwise. The key goes in `secret=`, which the
//! kernel never shows in /proc/mounts; the option string holding it is wiped after the call.
//!
//! Telling a rejected key from an unknown file system: Linux (measured on 6.12, every
//! messenger mode, both device syntaxes) fails both mounts with `EHOSTUNREACH`. The monitor
//! client does see the difference (`__ceph_open_session` returns the monitors' `-EACCES` for
//! a key they reject; the MDS client fails with `-ENOENT` for a file system name the FSMap
//! lacks), but `ceph_get_tree` (fs/ceph/super.c) replaces any error with `-EHOSTUNREACH`
//! when it holds no usable MDS map, which is always so before the first map arrives. Only
//! the kernel log keeps the cause: `libceph: auth protocol 'cephx' mauth authentication
//! failed: -13` (msgr1) or `... msgr authentication failed: -13` (msgr2) when the monitors
//! rejected the key, `libceph: mon0 <addr> session established` when they accepted it. So
//! the handler opens a `/dev/kmsg` cursor at the end of `plan`, just before the mount, and
//! on `EHOSTUNREACH` reads what was logged since (non-blocking, bounded). It concludes
//! only from a complete window with one kind of line in it: a rejection and no session
//! (`PermissionDenied`), or a session and no rejection (`NotFound`, the file system). A
//! window holding both (another CephFS mount, or a mounted volume re-authenticating, at the
//! same moment), or neither, or an unreadable log leaves the ambiguous `NotFound` that
//! names all causes.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cnfs_protocols::spec::{Source, VolumeSpec};

use super::{fs_options, same_path, vfs_flags, Context, MountHandler, MountPlan};
use crate::error::AgentError;
use crate::kmod;
use crate::kmsg;
use crate::mountinfo::MountEntry;

pub struct CephFs;

#[async_trait]
impl MountHandler for CephFs {
    fn name(&self) -> &'static str {
        "cephfs"
    }

    fn kernel_types(&self) -> &'static [&'static str] {
        &["ceph"]
    }

    fn recognises(&self, spec: &VolumeSpec, e: &MountEntry) -> bool {
        let Source::CephFs(c) = &spec.source else {
            return false;
        };
        if e.fs_type != "ceph" {
            return false;
        }
        // New syntax: `<client>@<fsid>.<fs>=<path>` (the fsid is a UUID: no dots).
        if let Some((client, rest)) = e.source.split_once('@') {
            let Some((fsid, rest)) = rest.split_once('.') else {
                return false;
            };
            let Some((fs, path)) = rest.split_once('=') else {
                return false;
            };
            return client == c.client
                && c.fsid.as_deref() == Some(fsid)
                && fs == c.fs_name
                && same_path(path, &c.path);
        }
        // Legacy: `<mon>[,<mon>]:<path>` with `name=` and `mds_namespace=` in the options.
        let Some(i) = e.source.find(":/") else {
            return false;
        };
        let (mons, path) = (&e.source[..i], &e.source[i + 1..]);
        let mut have: Vec<std::net::SocketAddr> = match mons.split(',').map(|m| m.parse()).collect()
        {
            Ok(v) => v,
            Err(_) => return false,
        };
        let mut want = c.monitors.clone();
        have.sort();
        want.sort();
        c.fsid.is_none()
            && have == want
            && same_path(path, &c.path)
            && e.option("name") == Some(c.client.as_str())
            && e.option("mds_namespace") == Some(c.fs_name.as_str())
    }

    fn mount_error(&self, what: &str, errno: nix::errno::Errno) -> Option<AgentError> {
        use nix::errno::Errno;
        let attempt = take_attempt(what);
        match errno {
            // A rejected key or a file system no MDS serves: the kernel log says which.
            Errno::EHOSTUNREACH => Some(unreachable(what, attempt)),
            // The kernel could not use the key (not a cephx key) or an option.
            Errno::EINVAL => Some(AgentError::Invalid(cnfs_protocols::spec::SpecError {
                field: "volume.cephfs".into(),
                reason: format!("mounting {what}: the kernel rejected the key or an option (the guest's dmesg says which)"),
            })),
            _ => None,
        }
    }

    async fn plan(&self, spec: &VolumeSpec, ctx: &Context<'_>) -> Result<MountPlan, AgentError> {
        let Source::CephFs(c) = &spec.source else {
            return Err(AgentError::Internal(
                "cephfs handler given a non-CephFS spec".into(),
            ));
        };
        if c.secret.expose().is_empty() {
            return Err(AgentError::Invalid(cnfs_protocols::spec::SpecError {
                field: "volume.cephfs.secret".into(),
                reason: "is required".into(),
            }));
        }
        let dir = ctx.modules_dir.to_path_buf();
        // msgr2 secure mode encrypts with AES-GCM; the kernel asks for it by crypto alias,
        // which a guest without modprobe aliases cannot resolve: load it up front.
        let secure = spec
            .options
            .get("ms_mode")
            .is_some_and(|m| m.contains("secure"));
        tokio::task::spawn_blocking(move || -> Result<(), kmod::KmodError> {
            kmod::ensure(&dir, "ceph")?;
            if secure {
                kmod::ensure(&dir, "gcm")?;
                kmod::ensure(&dir, "ghash_generic")?;
            }
            Ok(())
        })
        .await
        .map_err(|e| AgentError::Internal(format!("module loading task: {e}")))?
        .map_err(|e| AgentError::FailedPrecondition(e.to_string()))?;

        let mons: Vec<String> = c.monitors.iter().map(|m| m.to_string()).collect();
        let mut opts = Vec::new();
        let source = match &c.fsid {
            Some(fsid) => {
                opts.push(format!("mon_addr={}", mons.join("/")));
                format!("{}@{fsid}.{}={}", c.client, c.fs_name, c.path)
            }
            None => {
                opts.push(format!("name={}", c.client));
                // `fs=` is mount.ceph's spelling; the kernel takes `mds_namespace=`.
                opts.push(format!("mds_namespace={}", c.fs_name));
                format!("{}:{}", mons.join(","), c.path)
            }
        };
        opts.extend(fs_options(spec));
        opts.push(format!("secret={}", c.secret.expose()));
        // Last, so that the window holds the mount alone (not the module loading).
        remember_attempt(Attempt {
            volume: spec.name.clone(),
            client: c.client.clone(),
            fs_name: c.fs_name.clone(),
            log: kmsg::Cursor::at_end(Path::new(kmsg::DEV_KMSG)).ok(),
            expires: Instant::now() + ctx.budget + ATTEMPT_SLACK,
        });
        Ok(MountPlan {
            source,
            fs_type: "ceph".into(),
            flags: vfs_flags(spec),
            data: opts.join(","),
        })
    }
}

/// A mount between `plan` and `mount_error`: what the error message needs, and the kernel
/// log from just before the mount(2).
struct Attempt {
    volume: String,
    client: String,
    fs_name: String,
    log: Option<kmsg::Cursor>,
    /// The mount's deadline and a little: a mount that succeeded or timed out never reaches
    /// `mount_error`, and its entry (an open /dev/kmsg) is dropped once this passes.
    expires: Instant,
}

const ATTEMPT_SLACK: Duration = Duration::from_secs(5);
/// Bound on the entries kept (each holds a file descriptor).
const MAX_ATTEMPTS: usize = 64;
/// Bound on the kernel log records read to explain one failed mount (~30 are typical).
const LOG_RECORDS_MAX: usize = 512;

/// Attempts by volume name. The agent serialises requests for one volume, so a name has at
/// most one mount in flight; a newer attempt replaces an older one's entry.
static ATTEMPTS: Mutex<Vec<Attempt>> = Mutex::new(Vec::new());

fn attempts() -> MutexGuard<'static, Vec<Attempt>> {
    ATTEMPTS.lock().unwrap_or_else(|e| e.into_inner())
}

fn remember_attempt(a: Attempt) {
    let now = Instant::now();
    let mut all = attempts();
    all.retain(|o| o.expires > now && o.volume != a.volume);
    if all.len() >= MAX_ATTEMPTS {
        all.remove(0);
    }
    all.push(a);
}

/// The attempt `mount_error` was called for: `what` is `volume <name> (<source>)` and a
/// volume name holds only `[a-z0-9-]`, so the prefix identifies it.
fn take_attempt(what: &str) -> Option<Attempt> {
    let now = Instant::now();
    let mut all = attempts();
    all.retain(|o| o.expires > now);
    let i = all
        .iter()
        .position(|a| what.starts_with(&format!("volume {} (", a.volume)))?;
    Some(all.remove(i))
}

/// What the kernel logged during the mount.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// The monitors rejected the key (the kernel's line).
    KeyRejected(String),
    /// A monitor session was established: the key is good, the file system is not served.
    SessionEstablished,
    /// Nothing conclusive, and why not.
    Unknown(&'static str),
}

fn classify(w: &kmsg::Window) -> Verdict {
    if !w.complete {
        return Verdict::Unknown("records were lost before the agent read them");
    }
    let rejected = w.messages.iter().find(|m| {
        m.starts_with("libceph: auth protocol ") && m.contains(" authentication failed: ")
    });
    let sessions = w
        .messages
        .iter()
        .filter(|m| m.starts_with("libceph: mon") && m.contains(" session established"))
        .count();
    match (rejected, sessions) {
        (Some(line), 0) => Verdict::KeyRejected(line.clone()),
        (None, n) if n > 0 => Verdict::SessionEstablished,
        (None, _) => Verdict::Unknown("it shows neither a monitor session nor a rejected key"),
        (Some(_), _) => Verdict::Unknown(
            "it shows a rejected key and a monitor session: other CephFS activity at the same moment",
        ),
    }
}

fn unreachable(what: &str, attempt: Option<Attempt>) -> AgentError {
    let Some(mut a) = attempt else {
        return ambiguous(what, "no record of this attempt");
    };
    let Some(log) = a.log.as_mut() else {
        return ambiguous(what, "it was not readable");
    };
    match classify(&log.read_new(LOG_RECORDS_MAX)) {
        Verdict::KeyRejected(line) => AgentError::PermissionDenied(format!(
            "mounting {what}: the Ceph monitors rejected the key of client.{client}: it is \
             wrong or was revoked, or client.{client} does not exist (guest kernel: \"{line}\")",
            client = a.client
        )),
        Verdict::SessionEstablished => AgentError::NotFound(format!(
            "mounting {what}: the monitors accepted the key of client.{}, but no MDS serves \
             file system \"{}\": there is no file system of that name (that this client may \
             see), or none of its MDS daemons is active",
            a.client, a.fs_name
        )),
        Verdict::Unknown(why) => ambiguous(what, why),
    }
}

/// `why`: why the guest kernel log did not tell the causes apart.
fn ambiguous(what: &str, why: &str) -> AgentError {
    AgentError::NotFound(format!(
        "mounting {what}: the cluster did not serve this client: an unknown file system \
         name, its MDS down, or a key the monitors rejected (Linux reports all three as \
         EHOSTUNREACH, and the guest kernel log did not tell which: {why}; check fs_name, \
         client and key)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(lines: &[&str]) -> kmsg::Window {
        kmsg::Window {
            messages: lines.iter().map(|l| l.to_string()).collect(),
            complete: true,
        }
    }

    fn ceph_spec(client: &str, path: &str, fsid: &str) -> VolumeSpec {
        let w = cnfs_protocols::agent::VolumeSpec {
            name: "c".into(),
            source: Some(cnfs_protocols::agent::volume_spec::Source::Cephfs(
                cnfs_protocols::agent::CephFsSource {
                    monitors: vec!["10.0.0.1:6789".into(), "10.0.0.2:3300".into()],
                    fs_name: "cephfs".into(),
                    path: path.into(),
                    client: client.into(),
                    secret: "AQBZmhVnAAAAABAAnSPfp0VLPtO2ZUbWjaTYbA==".into(),
                    fsid: fsid.into(),
                    ..Default::default()
                },
            )),
            ..Default::default()
        };
        VolumeSpec::from_wire(&w).expect("valid")
    }

    fn ceph_entry(source: &str, options: &str) -> MountEntry {
        MountEntry {
            id: 40,
            dev: "0:52".into(),
            mount_point: "/run/cnfs/volumes/c".into(),
            fs_type: "ceph".into(),
            source: source.into(),
            options: options.into(),
        }
    }

    #[test]
    fn adoption_compares_parsed_ceph_fields_not_substrings() {
        const FSID: &str = "cd4760a4-e4d0-41bd-a77e-8c6cc50fcd5f";
        let legacy = ceph_spec("1", "/", "");
        let opts = "rw,name=1,secret=<hidden>,acl,mds_namespace=cephfs";
        let e = ceph_entry("10.0.0.2:3300,10.0.0.1:6789:/", opts);
        assert!(
            CephFs.recognises(&legacy, &e),
            "the legacy syntax never matched before"
        );
        // Client `1` is a substring of monitor 10.0.0.1; `/` a suffix of every path.
        let other_client = ceph_entry(
            "10.0.0.1:6789,10.0.0.2:3300:/sub",
            "name=admin,mds_namespace=cephfs",
        );
        assert!(!CephFs.recognises(&legacy, &other_client));
        let other_path = ceph_entry("10.0.0.1:6789,10.0.0.2:3300:/sub", opts);
        assert!(!CephFs.recognises(&legacy, &other_path));
        let other_fs = ceph_entry("10.0.0.1:6789,10.0.0.2:3300:/", "name=1,mds_namespace=fs2");
        assert!(!CephFs.recognises(&legacy, &other_fs));
        let other_mons = ceph_entry("10.0.0.9:6789:/", opts);
        assert!(!CephFs.recognises(&legacy, &other_mons));

        let new = ceph_spec("team", "/volumes/a", FSID);
        let e = ceph_entry(&format!("team@{FSID}.cephfs=/volumes/a"), "rw,name=team");
        assert!(CephFs.recognises(&new, &e));
        for src in [
            format!("tea@{FSID}.cephfs=/volumes/a"),
            format!("team@{FSID}.cephfs=/volumes"),
            format!("team@{FSID}.cephfs2=/volumes/a"),
            "team@00000000-e4d0-41bd-a77e-8c6cc50fcd5f.cephfs=/volumes/a".to_string(),
        ] {
            assert!(!CephFs.recognises(&new, &ceph_entry(&src, "")), "{src}");
        }
        assert!(!CephFs.recognises(&legacy, &e));
    }

    // Guest kernel lines as Linux 6.12 logged them in the e2e test bed.
    const MSGR1_REJECTED: &str = "libceph: auth protocol 'cephx' mauth authentication failed: -13";
    const MSGR2_REJECTED: &str = "libceph: auth protocol 'cephx' msgr authentication failed: -13";
    const NO_MDS: &str = "ceph: No mds server is up or the cluster is laggy";
    const SESSION: &str = "libceph: mon0 (1)10.1.2.1:6789 session established";
    const CLIENT: &str = "libceph: client4142 fsid cd4760a4-e4d0-41bd-a77e-8c6cc50fcd5f";

    #[test]
    fn a_rejected_key_is_told_from_an_unknown_file_system() {
        for rejected in [MSGR1_REJECTED, MSGR2_REJECTED] {
            assert_eq!(
                classify(&window(&[rejected, NO_MDS])),
                Verdict::KeyRejected(rejected.into())
            );
        }
        assert_eq!(
            classify(&window(&[SESSION, CLIENT, NO_MDS])),
            Verdict::SessionEstablished
        );
    }

    #[test]
    fn mixed_incomplete_or_empty_windows_are_inconclusive() {
        // Another mount (or a volume re-authenticating) at the same moment.
        let unknown = |w: &kmsg::Window| matches!(classify(w), Verdict::Unknown(_));
        assert!(unknown(&window(&[MSGR1_REJECTED, SESSION, CLIENT, NO_MDS])));
        assert!(unknown(&window(&[NO_MDS])));
        let mut w = window(&[MSGR1_REJECTED, NO_MDS]);
        w.complete = false;
        assert!(unknown(&w));
    }

    fn attempt(volume: &str, expires: Instant) -> Attempt {
        Attempt {
            volume: volume.into(),
            client: "app".into(),
            fs_name: "cephfs".into(),
            log: None,
            expires,
        }
    }

    #[test]
    fn attempts_are_found_by_exact_volume_name_and_expire() {
        let later = Instant::now() + Duration::from_secs(60);
        remember_attempt(attempt("t-vol", later));
        remember_attempt(attempt("t-vol-b", later));
        remember_attempt(attempt("t-old", Instant::now()));
        let a = take_attempt("volume t-vol (app@x.cephfs=/)").expect("t-vol");
        assert_eq!(a.volume, "t-vol");
        assert!(take_attempt("volume t-vol (app@x.cephfs=/)").is_none());
        assert!(take_attempt("volume t-old (10.0.0.1:6789:/)").is_none());
        assert_eq!(
            take_attempt("volume t-vol-b (10.0.0.1:6789:/)").map(|a| a.volume),
            Some("t-vol-b".to_string())
        );
    }

    #[test]
    fn messages_name_the_cause() {
        let what = "volume v (app@fsid.cephfs=/sub)";
        let e = unreachable(what, None);
        assert!(matches!(e, AgentError::NotFound(_)), "{e:?}");
        assert!(e.to_string().contains("key the monitors rejected"), "{e}");
        let e = unreachable(
            what,
            Some(attempt("v", Instant::now() + Duration::from_secs(60))),
        );
        assert!(e.to_string().contains("it was not readable"), "{e}");
    }
}
