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
//! the mount's attempt opens a `/dev/kmsg` cursor at the end of `plan`, just before the
//! mount, and on `EHOSTUNREACH` reads what was logged since (non-blocking, bounded). It concludes
//! only from a complete window with one kind of line in it: a rejection and no session
//! (`PermissionDenied`), or a session and no rejection (`NotFound`, the file system). A
//! window holding both (another CephFS mount, or a mounted volume re-authenticating, at the
//! same moment), or neither, or an unreadable log leaves the ambiguous `NotFound` that
//! names all causes.

use std::path::Path;

use async_trait::async_trait;
use cnfs_protocols::spec::{Source, VolumeSpec};
use nix::errno::Errno;

use super::{fs_options, same_path, vfs_flags, Attempt, Context, MountHandler, MountPlan};
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
        cnfs_protocols::spec::FsKind::CephFs.kernel_types()
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
        Ok(MountPlan {
            source,
            fs_type: "ceph".into(),
            flags: vfs_flags(spec),
            data: opts.join(","),
            // Last, so that the log window holds the mount alone (not the module loading).
            attempt: Box::new(CephAttempt {
                client: c.client.clone(),
                fs_name: c.fs_name.clone(),
                log: kmsg::Cursor::at_end(Path::new(kmsg::DEV_KMSG)).ok(),
            }),
        })
    }
}

/// One CephFS mount: what its error message needs, and the kernel log from just before its
/// mount(2) (closed when the attempt is dropped, at the end of the request).
struct CephAttempt {
    client: String,
    fs_name: String,
    log: Option<kmsg::Cursor>,
}

impl Attempt for CephAttempt {
    fn failed(&mut self, what: &str, errno: Errno) -> Option<AgentError> {
        match errno {
            // A rejected key or a file system no MDS serves: the kernel log says which.
            Errno::EHOSTUNREACH => Some(self.unreachable(what)),
            // The kernel could not use the key (not a cephx key) or an option.
            Errno::EINVAL => Some(AgentError::Invalid(cnfs_protocols::spec::SpecError {
                field: "volume.cephfs".into(),
                reason: format!("mounting {what}: the kernel rejected the key or an option (the guest's dmesg says which)"),
            })),
            _ => None,
        }
    }
}

/// Bound on the kernel log records read to explain one failed mount (~30 are typical).
const LOG_RECORDS_MAX: usize = 512;

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

impl CephAttempt {
    fn unreachable(&mut self, what: &str) -> AgentError {
        let Some(log) = self.log.as_mut() else {
            return ambiguous(what, "it was not readable");
        };
        match classify(&log.read_new(LOG_RECORDS_MAX)) {
            Verdict::KeyRejected(line) => AgentError::PermissionDenied(format!(
                "mounting {what}: the Ceph monitors rejected the key of client.{client}: it is \
                 wrong or was revoked, or client.{client} does not exist (guest kernel: \"{line}\")",
                client = self.client
            )),
            Verdict::SessionEstablished => AgentError::NotFound(format!(
                "mounting {what}: the monitors accepted the key of client.{}, but no MDS serves \
                 file system \"{}\": there is no file system of that name (that this client may \
                 see), or none of its MDS daemons is active",
                self.client, self.fs_name
            )),
            Verdict::Unknown(why) => ambiguous(what, why),
        }
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

    fn attempt(log: Option<kmsg::Cursor>) -> CephAttempt {
        CephAttempt {
            client: "app".into(),
            fs_name: "cephfs".into(),
            log,
        }
    }

    #[test]
    fn messages_name_the_cause() {
        let what = "volume v (app@fsid.cephfs=/sub)";
        let e = attempt(None)
            .failed(what, Errno::EHOSTUNREACH)
            .expect("a CephFS reading");
        assert!(matches!(e, AgentError::NotFound(_)), "{e:?}");
        assert!(e.to_string().contains("key the monitors rejected"), "{e}");
        assert!(e.to_string().contains("it was not readable"), "{e}");
        assert!(e.to_string().starts_with("mounting volume v ("), "{e}");
    }

    #[test]
    fn an_attempt_reads_only_the_kernel_log_written_after_its_plan() {
        let dir = std::env::temp_dir().join(format!("cnfs-ceph-attempt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("kmsg");
        // Logged before the plan: another mount's session, which must not count.
        std::fs::write(&path, format!("6,1,1,-;{SESSION}\n")).expect("write");
        let mut rejected = attempt(Some(kmsg::Cursor::at_end(&path).expect("open")));
        let append = |line: &str| {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .expect("append");
            f.write_all(format!("3,9,9,-;{line}\n").as_bytes())
                .expect("append");
        };
        append(MSGR2_REJECTED);
        append(NO_MDS);
        let e = rejected
            .failed("volume v (app@fsid.cephfs=/)", Errno::EHOSTUNREACH)
            .expect("a CephFS reading");
        assert_eq!(e.code(), ttrpc::Code::PERMISSION_DENIED, "{e}");
        assert!(e.to_string().contains("key of client.app"), "{e}");
        assert!(e.to_string().contains(MSGR2_REJECTED), "{e}");

        let mut unknown_fs = attempt(Some(kmsg::Cursor::at_end(&path).expect("open")));
        append(SESSION);
        append(NO_MDS);
        let e = unknown_fs
            .failed("volume w (app@fsid.cephfs=/)", Errno::EHOSTUNREACH)
            .expect("a CephFS reading");
        assert_eq!(e.code(), ttrpc::Code::NOT_FOUND, "{e}");
        assert!(
            e.to_string()
                .contains("no MDS serves file system \"cephfs\""),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn only_ceph_specific_errnos_are_read_by_the_attempt() {
        let what = "volume v (10.0.0.1:6789:/)";
        match attempt(None).failed(what, Errno::EINVAL) {
            Some(AgentError::Invalid(e)) => {
                assert_eq!(e.field, "volume.cephfs");
                assert!(
                    e.reason.contains("rejected the key or an option"),
                    "{}",
                    e.reason
                );
            }
            other => panic!("EINVAL: {other:?}"),
        }
        for errno in [Errno::EACCES, Errno::ETIMEDOUT, Errno::ENODEV] {
            assert!(attempt(None).failed(what, errno).is_none(), "{errno}");
        }
    }
}
