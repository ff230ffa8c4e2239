//! The annotation API: what a pod author writes, parsed strictly (annotations are tenant
//! input). One volume per annotation under `cnfs.io/`:
//!
//! ```yaml
//! cnfs.io/volume.data: "nfs://10.0.0.5/exports/data?vers=4.1&nconnect=4"
//! cnfs.io/mount.data: "/data"
//! cnfs.io/containers.data: "app,worker"     # optional; default: every app container
//! ```
//!
//! CephFS (mounted by the agent once that lands): `cephfs://<mon>[,<mon>...]/<path>?fs=<name>&
//! client=<id>&secret=<host-side secret name>[&fsid=<uuid>][&<option>...]`. A secret is only
//! ever named here; its value is resolved on the host (see `secrets`).
//!
//! An encrypted volume (NFSv4, CephFS, SMB) adds `encryption=luks2&size=10Gi
//! [&owner=<uid>:<gid>]&encryption_key=<host-side secret name>`; a shared one (NFS of any
//! version, CephFS, SMB; several pods at once) `encryption=gocryptfs[&owner=<uid>:<gid>]
//! &encryption_key=<name>`, without a size. The secret file's raw bytes are the key, read
//! from the same directory and under the same rules as `secret=` (gocryptfs: one line, so
//! no newline or NUL byte in the file, a trailing newline included).

use std::collections::{BTreeMap, HashMap};

use cnfs_protocols::spec::{self, Source, VolumeSpec};
use cnfs_protocols::volume_url;

pub const PREFIX: &str = "cnfs.io/";
/// CRI annotations the shim reads (set by containerd's CRI plugin, not by pod authors).
pub const CRI_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
pub const CRI_SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
pub const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
pub const CRI_CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";

const MAX_VOLUMES: usize = 16;
const MAX_VALUE: usize = 2048;
/// Kubernetes' own limit on an annotation key (a 253-byte prefix, '/', a 63-byte name); a
/// longer key (possible outside Kubernetes, e.g. `ctr --annotation`) is refused unechoed.
const MAX_KEY: usize = 317;

/// A refused annotation: names the annotation key and says why (never a secret value).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("annotation {annotation:?}: {reason}")]
pub struct AnnotationError {
    pub annotation: String,
    pub reason: String,
}

fn err<T>(annotation: &str, reason: impl Into<String>) -> Result<T, AnnotationError> {
    Err(AnnotationError {
        annotation: annotation.to_string(),
        reason: reason.into(),
    })
}

/// One volume a pod asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct PodVolume {
    /// The validated spec; its credentials (CephFS key, SMB user and password) are still
    /// empty (see `secrets`).
    pub spec: VolumeSpec,
    /// Name of the host-side secret holding the credentials, if the file system needs one.
    pub secret_ref: Option<String>,
    /// `encryption_key=`: name of the host-side secret whose bytes are the encryption key;
    /// set exactly when the spec is encrypted (its key is still empty).
    pub encryption_key_ref: Option<String>,
    /// Where containers see it.
    pub path: String,
    /// Containers that get it; `None` means every app container.
    pub containers: Option<Vec<String>>,
}

impl PodVolume {
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Does the container called `container` (CRI container name) get this volume? A FUSE
    /// volume's sidecar never does: it serves the volume (and gets its socket instead).
    pub fn applies_to(&self, container: Option<&str>) -> bool {
        if let cnfs_protocols::spec::Source::Fuse(f) = &self.spec.source {
            if container == Some(f.sidecar.as_str()) {
                return false;
            }
        }
        match (&self.containers, container) {
            (None, _) => true,
            (Some(list), Some(c)) => list.iter().any(|n| n == c),
            (Some(_), None) => false,
        }
    }
}

/// Parses every `cnfs.io/` annotation; other annotations are ignored. Volumes come back
/// sorted by name.
pub fn parse(annotations: &HashMap<String, String>) -> Result<Vec<PodVolume>, AnnotationError> {
    let mut sources = BTreeMap::new();
    let mut paths = BTreeMap::new();
    let mut containers = BTreeMap::new();
    let mut ours: Vec<(&String, &String)> = annotations
        .iter()
        .filter(|(k, _)| k.starts_with(PREFIX))
        .collect();
    ours.sort();
    for (key, value) in ours {
        if key.len() > MAX_KEY {
            // Named by its first bytes only: the error becomes a pod event and a log line.
            let mut end = 64;
            while !key.is_char_boundary(end) {
                end -= 1;
            }
            return err(
                &format!("{}...", &key[..end]),
                format!("key is {} bytes, longer than {MAX_KEY} bytes", key.len()),
            );
        }
        if value.len() > MAX_VALUE {
            return err(key, format!("value is longer than {MAX_VALUE} bytes"));
        }
        let rest = &key[PREFIX.len()..];
        let (kind, name) = rest.split_once('.').unwrap_or((rest, ""));
        let table = match kind {
            "volume" => &mut sources,
            "mount" => &mut paths,
            "containers" => &mut containers,
            _ => {
                return err(
                    key,
                    "unknown CNFS annotation (use cnfs.io/volume.<name>, cnfs.io/mount.<name>, cnfs.io/containers.<name>)",
                )
            }
        };
        if let Err(e) = spec::validate_name("name", name) {
            return err(key, format!("volume name {}", e.reason));
        }
        table.insert(name.to_string(), (key.clone(), value.clone()));
    }
    if sources.len() > MAX_VOLUMES {
        return err(
            &format!("{PREFIX}volume.*"),
            format!("at most {MAX_VOLUMES} volumes per pod"),
        );
    }
    for (name, (key, _)) in paths.iter().chain(containers.iter()) {
        if !sources.contains_key(name) {
            return err(key, format!("there is no {PREFIX}volume.{name} annotation"));
        }
    }
    let mut out = Vec::new();
    let mut seen_paths: BTreeMap<String, String> = BTreeMap::new();
    for (name, (key, url)) in &sources {
        let (spec, secret_ref, encryption_key_ref) = parse_source(key, name, url)?;
        let Some((mkey, path)) = paths.get(name) else {
            return err(
                key,
                format!("needs a {PREFIX}mount.{name} annotation with the path in the containers"),
            );
        };
        let path = validate_mount_path(mkey, path)?;
        if let Some(other) = seen_paths.insert(path.clone(), name.clone()) {
            return err(
                mkey,
                format!("path {path} is already used by volume {other}"),
            );
        }
        let containers = match containers.get(name) {
            None => None,
            Some((ckey, list)) => {
                let list = parse_containers(ckey, list)?;
                if let Source::Fuse(f) = &spec.source {
                    if list.contains(&f.sidecar) {
                        return err(
                            ckey,
                            format!(
                                "lists {}, the sidecar that serves this FUSE volume: it gets \
                                 the volume's socket, never the volume",
                                f.sidecar
                            ),
                        );
                    }
                }
                Some(list)
            }
        };
        out.push(PodVolume {
            spec,
            secret_ref,
            encryption_key_ref,
            path,
            containers,
        });
    }
    check_sidecar_paths(&out)?;
    Ok(out)
}

/// A FUSE sidecar's socket directory is one more mount in that container: it may not land
/// on another volume's socket directory or path there (one would hide the other, and that
/// volume would never be served).
fn check_sidecar_paths(volumes: &[PodVolume]) -> Result<(), AnnotationError> {
    let mut taken: BTreeMap<(&str, &str), &str> = BTreeMap::new();
    for v in volumes {
        let Source::Fuse(f) = &v.spec.source else {
            continue;
        };
        let key = format!("{PREFIX}volume.{}", v.name());
        let dir = f.socket_dir();
        if let Some(other) = taken.insert((f.sidecar.as_str(), dir), v.name()) {
            return err(
                &key,
                format!(
                    "its socket directory {dir} in container {} is volume {other}'s too",
                    f.sidecar
                ),
            );
        }
        if let Some(other) = volumes
            .iter()
            .find(|o| o.path == dir && o.applies_to(Some(f.sidecar.as_str())))
        {
            return err(
                &key,
                format!(
                    "its socket directory {dir} is where container {} mounts volume {}",
                    f.sidecar,
                    other.name()
                ),
            );
        }
    }
    Ok(())
}

/// A volume URL (`nfs://`, `cephfs://`, `smb://`) into a validated spec, with the names of
/// its credentials' secret and of its encryption key's secret.
fn parse_source(
    key: &str,
    name: &str,
    url: &str,
) -> Result<(VolumeSpec, Option<String>, Option<String>), AnnotationError> {
    let reason = |reason: String| AnnotationError {
        annotation: key.to_string(),
        reason,
    };
    let parsed = volume_url::parse(name, url).map_err(reason)?;
    // The file system says whether it needs a secret; its URL then names one.
    if let Some(kind) = parsed.kind().filter(|k| k.needs_secret()) {
        if parsed.secret_ref.is_none() {
            return err(
                key,
                format!(
                    "{} volumes need secret=<name of a host-side secret>",
                    kind.name()
                ),
            );
        }
    }
    let spec = VolumeSpec::from_wire_unresolved(&parsed.wire).map_err(|e| reason(e.to_string()))?;
    if let (Some(e), None) = (&spec.encryption, &parsed.encryption_key_ref) {
        return err(
            key,
            format!(
                "volume.options.encryption_key: encryption={} needs encryption_key=<name of a \
                 host-side secret holding the key>",
                e.mode.as_str()
            ),
        );
    }
    Ok((spec, parsed.secret_ref, parsed.encryption_key_ref))
}

/// A container path: absolute, clean, conservative characters, and not a system path the
/// container runtime owns.
pub fn validate_mount_path(key: &str, path: &str) -> Result<String, AnnotationError> {
    // The same rules as a server path (absolute, clean, conservative characters), plus:
    // not the root and not a system path the container runtime owns.
    let trimmed = spec::validate_path("path", path).map_err(|e| AnnotationError {
        annotation: key.to_string(),
        reason: e.reason,
    })?;
    if trimmed == "/" {
        return err(key, "must be an absolute path other than /");
    }
    for system in ["/proc", "/sys", "/dev"] {
        if trimmed == system || trimmed.starts_with(&format!("{system}/")) {
            return err(key, format!("must not be under {system}"));
        }
    }
    Ok(trimmed)
}

fn parse_containers(key: &str, list: &str) -> Result<Vec<String>, AnnotationError> {
    let names: Vec<String> = list.split(',').map(str::trim).map(str::to_string).collect();
    for n in &names {
        if let Err(e) = spec::validate_name("container", n) {
            return err(key, format!("container name {}", e.reason));
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnfs_protocols::spec::{NfsVersion, Server};

    fn ann(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_nfs_volumes_with_paths_and_containers() {
        let a = ann(&[
            (
                "cnfs.io/volume.data",
                "nfs://10.0.0.5/exports/data?vers=4.2&ro&nconnect=4",
            ),
            ("cnfs.io/mount.data", "/data"),
            ("cnfs.io/volume.logs", "nfs://[fd00::5]:2049/logs"),
            ("cnfs.io/mount.logs", "/var/log/app/"),
            ("cnfs.io/containers.logs", "app, worker"),
            ("io.kubernetes.cri.sandbox-id", "abc"),
        ]);
        let v = parse(&a).expect("valid");
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].name(), "data");
        assert!(v[0].spec.read_only);
        assert_eq!(
            v[0].spec.options.get("nconnect").map(String::as_str),
            Some("4")
        );
        match &v[0].spec.source {
            Source::Nfs(n) => {
                assert_eq!(n.version, NfsVersion::V4_2);
                assert_eq!(n.export, "/exports/data");
            }
            other => panic!("nfs expected, got {other:?}"),
        }
        assert!(v[0].applies_to(Some("anything")) && v[0].applies_to(None));
        assert_eq!(v[1].path, "/var/log/app");
        assert_eq!(
            v[1].spec.options.get("port").map(String::as_str),
            Some("2049")
        );
        assert!(
            matches!(&v[1].spec.source, Source::Nfs(n) if n.server == Server::Ip("fd00::5".parse().expect("ip")))
        );
        assert!(v[1].applies_to(Some("worker")) && !v[1].applies_to(Some("sidecar")));
    }

    #[test]
    fn cephfs_names_a_secret_and_never_carries_one() {
        let a = ann(&[
            ("cnfs.io/volume.c", "cephfs://10.0.0.1:6789,10.0.0.2:3300/sub?fs=cephfs&client=app&secret=ceph-app&ms_mode=secure"),
            ("cnfs.io/mount.c", "/shared"),
        ]);
        let v = parse(&a).expect("valid");
        assert_eq!(v[0].secret_ref.as_deref(), Some("ceph-app"));
        match &v[0].spec.source {
            Source::CephFs(c) => {
                assert_eq!(c.monitors.len(), 2);
                assert!(c.secret.expose().is_empty());
            }
            other => panic!("cephfs expected, got {other:?}"),
        }
    }

    #[test]
    fn an_encrypted_volume_names_its_key_secret_and_never_carries_a_key() {
        let a = ann(&[
            (
                "cnfs.io/volume.sec",
                "nfs://10.0.0.5/exports/sec?vers=4.1&encryption=luks2&size=10Gi&owner=1000:100\
                 &encryption_key=sec-key&nconnect=4",
            ),
            ("cnfs.io/mount.sec", "/sec"),
        ]);
        let v = parse(&a).expect("valid");
        assert_eq!(v[0].encryption_key_ref.as_deref(), Some("sec-key"));
        assert!(v[0].secret_ref.is_none());
        let e = v[0].spec.encryption.as_ref().expect("encrypted");
        assert_eq!((e.size, e.uid, e.gid), (10 << 30, 1000, 100));
        assert!(e.key.is_empty());
        assert_eq!(
            v[0].spec.options.keys().collect::<Vec<_>>(),
            ["nconnect"],
            "encryption options are no mount options"
        );
        // A plain volume names no key.
        let a = ann(&[
            ("cnfs.io/volume.d", "nfs://10.0.0.5/exports/d"),
            ("cnfs.io/mount.d", "/d"),
        ]);
        assert!(parse(&a).expect("valid")[0].encryption_key_ref.is_none());
    }

    #[test]
    fn a_gocryptfs_volume_names_its_key_secret_and_has_no_size() {
        let a = ann(&[
            (
                "cnfs.io/volume.shared",
                "nfs://10.0.0.5/exports/shared?vers=3&encryption=gocryptfs&owner=1000:100\
                 &encryption_key=shared-key&nolock",
            ),
            ("cnfs.io/mount.shared", "/shared"),
        ]);
        let v = parse(&a).expect("valid");
        assert_eq!(v[0].encryption_key_ref.as_deref(), Some("shared-key"));
        let e = v[0].spec.encryption.as_ref().expect("encrypted");
        assert_eq!(e.mode, spec::EncryptionMode::Gocryptfs);
        assert_eq!((e.size, e.uid, e.gid), (0, 1000, 100));
        assert!(e.key.is_empty());
        assert_eq!(v[0].spec.options.keys().collect::<Vec<_>>(), ["nolock"]);
        for (url, want) in [
            (
                "nfs://10.0.0.5/x?encryption=gocryptfs",
                "volume.options.encryption_key: encryption=gocryptfs needs encryption_key=<name \
                 of a host-side secret holding the key>",
            ),
            (
                "nfs://10.0.0.5/x?encryption=gocryptfs&size=1Gi&encryption_key=k",
                "volume.options.size: is refused with encryption=gocryptfs: only luks2 volumes \
                 have a size (gocryptfs shares the file system's space)",
            ),
            (
                "fuse://?sidecar=sshfs&encryption=gocryptfs&encryption_key=k",
                "volume.encryption: FUSE volumes cannot be encrypted by CNFS",
            ),
        ] {
            let a = ann(&[("cnfs.io/volume.v", url), ("cnfs.io/mount.v", "/v")]);
            let e = parse(&a).expect_err(url);
            assert_eq!(e.annotation, "cnfs.io/volume.v", "{e}");
            assert_eq!(e.reason, want, "{url}");
        }
    }

    #[test]
    fn encrypted_volumes_refuse_what_would_keep_locks_in_the_guest() {
        for (url, words) in [
            (
                "nfs://10.0.0.5/x?encryption=luks2&size=1Gi",
                "volume.options.encryption_key: encryption=luks2 needs encryption_key=",
            ),
            (
                "nfs://10.0.0.5/x?vers=3&encryption=luks2&size=1Gi&encryption_key=k",
                "volume.nfs.version: luks2 needs server-side locks",
            ),
            (
                "nfs://10.0.0.5/x?nolock&encryption=luks2&size=1Gi&encryption_key=k",
                "volume.options.nolock: ",
            ),
            (
                "nfs://10.0.0.5/x?local_lock=flock&encryption=luks2&size=1Gi&encryption_key=k",
                "volume.options.local_lock: ",
            ),
            (
                "smb://10.0.0.9/data?secret=s&nobrl&encryption=luks2&size=1Gi&encryption_key=k",
                "volume.options.nobrl: ",
            ),
            (
                "fuse://?sidecar=sshfs&encryption=luks2&size=1Gi&encryption_key=k",
                "volume.encryption: FUSE volumes cannot be encrypted by CNFS",
            ),
            (
                "nfs://10.0.0.5/x?size=1Gi",
                "volume.options.size: is only for encrypted volumes",
            ),
            (
                "nfs://10.0.0.5/x?encryption_key=k",
                "volume.options.encryption_key: is only for encrypted volumes",
            ),
        ] {
            let a = ann(&[("cnfs.io/volume.v", url), ("cnfs.io/mount.v", "/v")]);
            let e = parse(&a).expect_err(url);
            assert_eq!(e.annotation, "cnfs.io/volume.v", "{e}");
            assert!(e.reason.starts_with(words), "{url}: {e}");
        }
    }

    #[test]
    fn hostile_annotations_are_refused_naming_the_annotation() {
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
        let cases: &[Case] = &[
            (
                &[("cnfs.io/volume.d", "nfs://10.0.0.1/x")],
                "cnfs.io/volume.d",
                "cnfs.io/mount.d",
            ),
            (
                &[
                    ("cnfs.io/volume.f", "fuse://10.0.0.1/x?sidecar=s"),
                    ("cnfs.io/mount.f", "/f"),
                ],
                "cnfs.io/volume.f",
                "a FUSE volume has no server or path",
            ),
            (
                &[("cnfs.io/volume.f", "fuse://"), ("cnfs.io/mount.f", "/f")],
                "cnfs.io/volume.f",
                "volume.fuse.sidecar: is required",
            ),
            (
                &[
                    ("cnfs.io/volume.f", "fuse://?sidecar=Fuse_1"),
                    ("cnfs.io/mount.f", "/f"),
                ],
                "cnfs.io/volume.f",
                "volume.fuse.sidecar: \"Fuse_1\" is not a DNS label",
            ),
            (
                &[
                    ("cnfs.io/volume.f", "fuse://?sidecar=s&socket=fuse.sock"),
                    ("cnfs.io/mount.f", "/f"),
                ],
                "cnfs.io/volume.f",
                "volume.fuse.socket: must be an absolute path",
            ),
            (
                &[
                    ("cnfs.io/volume.f", "fuse://?sidecar=s&socket=/fuse.sock"),
                    ("cnfs.io/mount.f", "/f"),
                ],
                "cnfs.io/volume.f",
                "volume.fuse.socket: must be a file in a directory of its own",
            ),
            (
                &[
                    (
                        "cnfs.io/volume.f",
                        "fuse://?sidecar=s&socket=/dev/shm/f.sock",
                    ),
                    ("cnfs.io/mount.f", "/f"),
                ],
                "cnfs.io/volume.f",
                "volume.fuse.socket: must not be under /dev",
            ),
            (
                &[
                    (
                        "cnfs.io/volume.f",
                        "fuse://?sidecar=s&socket=/x/a-socket-name-longer-than-28.sock",
                    ),
                    ("cnfs.io/mount.f", "/f"),
                ],
                "cnfs.io/volume.f",
                "must be 1 to 28 characters",
            ),
            (
                &[
                    (
                        "cnfs.io/volume.f",
                        "fuse://?sidecar=s&socket=/x/../y/f.sock",
                    ),
                    ("cnfs.io/mount.f", "/f"),
                ],
                "cnfs.io/volume.f",
                "volume.fuse.socket: must be a clean path",
            ),
            (
                &[
                    ("cnfs.io/volume.f", "fuse://?sidecar=s&fd=3"),
                    ("cnfs.io/mount.f", "/f"),
                ],
                "cnfs.io/volume.f",
                "volume.options.fd: set by the agent",
            ),
            (
                &[
                    ("cnfs.io/volume.f", "fuse://?sidecar=s&user_id=0"),
                    ("cnfs.io/mount.f", "/f"),
                ],
                "cnfs.io/volume.f",
                "volume.options.user_id: use uid",
            ),
            (
                &[
                    ("cnfs.io/volume.f", "fuse://?sidecar=s&allow_other=1"),
                    ("cnfs.io/mount.f", "/f"),
                ],
                "cnfs.io/volume.f",
                "volume.options.allow_other: is a flag",
            ),
            (
                &[
                    ("cnfs.io/volume.f", "fuse://?sidecar=s&uid=4294967295"),
                    ("cnfs.io/mount.f", "/f"),
                ],
                "cnfs.io/volume.f",
                "volume.options.uid: must be between 0 and 4294967294",
            ),
            (
                &[
                    ("cnfs.io/volume.f", "fuse://?sidecar=s&secret=x"),
                    ("cnfs.io/mount.f", "/f"),
                ],
                "cnfs.io/volume.f",
                "volume.options.secret: unknown or not allowed for fuse volumes",
            ),
            (
                &[
                    ("cnfs.io/volume.f", "fuse://?sidecar=sshfs"),
                    ("cnfs.io/mount.f", "/f"),
                    ("cnfs.io/volume.g", "fuse://?sidecar=sshfs"),
                    ("cnfs.io/mount.g", "/g"),
                ],
                "cnfs.io/volume.g",
                "its socket directory /fuse-fd-passing in container sshfs is volume f's too",
            ),
            (
                &[
                    (
                        "cnfs.io/volume.f",
                        "fuse://?sidecar=sshfs&socket=/data/f.sock",
                    ),
                    ("cnfs.io/mount.f", "/f"),
                    ("cnfs.io/volume.data", "nfs://10.0.0.1/x"),
                    ("cnfs.io/mount.data", "/data"),
                ],
                "cnfs.io/volume.f",
                "its socket directory /data is where container sshfs mounts volume data",
            ),
            (
                &[
                    ("cnfs.io/volume.f", "fuse://?sidecar=sshfs"),
                    ("cnfs.io/mount.f", "/f"),
                    ("cnfs.io/containers.f", "app,sshfs"),
                ],
                "cnfs.io/containers.f",
                "lists sshfs, the sidecar that serves this FUSE volume",
            ),
            (
                &[("cnfs.io/mount.d", "/d")],
                "cnfs.io/mount.d",
                "no cnfs.io/volume.d",
            ),
            (&[("cnfs.io/bogus.d", "x")], "cnfs.io/bogus.d", "unknown"),
            (
                &[("cnfs.io/volume.D", "nfs://a/x"), ("cnfs.io/mount.D", "/d")],
                "cnfs.io/mount.D",
                "DNS label",
            ),
            (
                &[("cnfs.io/volume.d", "ftp://a/x"), ("cnfs.io/mount.d", "/d")],
                "cnfs.io/volume.d",
                "scheme",
            ),
            (
                &[
                    ("cnfs.io/volume.d", "smb://10.0.0.9/data"),
                    ("cnfs.io/mount.d", "/d"),
                ],
                "cnfs.io/volume.d",
                "smb volumes need secret=",
            ),
            (
                &[
                    (
                        "cnfs.io/volume.d",
                        "smb://10.0.0.9/data?secret=s&username=eve",
                    ),
                    ("cnfs.io/mount.d", "/d"),
                ],
                "cnfs.io/volume.d",
                "volume.options.username: pass credentials in the volume's secret",
            ),
            (
                &[
                    ("cnfs.io/volume.d", "nfs://10.0.0.1,addr=1.2.3.4/x"),
                    ("cnfs.io/mount.d", "/d"),
                ],
                "cnfs.io/volume.d",
                "volume.nfs.server",
            ),
            (
                &[
                    ("cnfs.io/volume.d", "nfs://10.0.0.1/x?addr=1.2.3.4"),
                    ("cnfs.io/mount.d", "/d"),
                ],
                "cnfs.io/volume.d",
                "volume.options.addr",
            ),
            (
                &[
                    ("cnfs.io/volume.d", "nfs://user@10.0.0.1/x"),
                    ("cnfs.io/mount.d", "/d"),
                ],
                "cnfs.io/volume.d",
                "'@'",
            ),
            (
                &[
                    ("cnfs.io/volume.d", "nfs://10.0.0.1/x/../y"),
                    ("cnfs.io/mount.d", "/d"),
                ],
                "cnfs.io/volume.d",
                "volume.nfs.export",
            ),
            (
                &[
                    ("cnfs.io/volume.d", "nfs://10.0.0.1/x?ro&ro"),
                    ("cnfs.io/mount.d", "/d"),
                ],
                "cnfs.io/volume.d",
                "twice",
            ),
            (
                &[
                    ("cnfs.io/volume.d", "nfs://10.0.0.1/x"),
                    ("cnfs.io/mount.d", "relative"),
                ],
                "cnfs.io/mount.d",
                "absolute",
            ),
            (
                &[
                    ("cnfs.io/volume.d", "nfs://10.0.0.1/x"),
                    ("cnfs.io/mount.d", "/proc/self"),
                ],
                "cnfs.io/mount.d",
                "/proc",
            ),
            (
                &[
                    ("cnfs.io/volume.d", "nfs://10.0.0.1/x"),
                    ("cnfs.io/mount.d", "/a/../etc"),
                ],
                "cnfs.io/mount.d",
                "clean",
            ),
            (
                &[
                    ("cnfs.io/volume.d", "nfs://10.0.0.1/x"),
                    ("cnfs.io/mount.d", "/d"),
                    ("cnfs.io/containers.d", "App"),
                ],
                "cnfs.io/containers.d",
                "container name",
            ),
            (
                &[
                    ("cnfs.io/volume.c", "cephfs://10.0.0.1:6789/?fs=a&client=b"),
                    ("cnfs.io/mount.c", "/c"),
                ],
                "cnfs.io/volume.c",
                "secret=",
            ),
            (
                &[
                    ("cnfs.io/volume.a", "nfs://10.0.0.1/x"),
                    ("cnfs.io/mount.a", "/d"),
                    ("cnfs.io/volume.b", "nfs://10.0.0.1/y"),
                    ("cnfs.io/mount.b", "/d/"),
                ],
                "cnfs.io/mount.b",
                "already used",
            ),
        ];
        for (pairs, key, needle) in cases {
            let e = parse(&ann(pairs)).expect_err(needle);
            assert_eq!(e.annotation, *key, "{e}");
            assert!(
                e.to_string().contains(needle),
                "{e} should mention {needle}"
            );
        }
    }

    #[test]
    fn oversized_keys_and_values_are_refused_without_being_echoed_whole() {
        let huge = "x".repeat(4 << 20);
        let key = format!("cnfs.io/volume.{huge}");
        let e = parse(&ann(&[(key.as_str(), "nfs://10.0.0.1/x")])).expect_err("huge key");
        assert!(e.annotation.starts_with("cnfs.io/volume.xxx") && e.annotation.len() < 80);
        assert!(e.reason.contains(&format!("{} bytes", key.len())), "{e}");
        assert!(
            e.to_string().len() < 300,
            "{} byte error",
            e.to_string().len()
        );
        let e = parse(&ann(&[("cnfs.io/volume.d", huge.as_str())])).expect_err("huge value");
        assert_eq!(e.annotation, "cnfs.io/volume.d");
        assert!(
            e.to_string().len() < 300 && e.reason.contains("2048"),
            "{e}"
        );
        // A key at Kubernetes' limit is read (and refused for its name, not its size).
        let key = format!("cnfs.io/mount.{}", "a".repeat(MAX_KEY - 14));
        assert_eq!(key.len(), MAX_KEY);
        let e = parse(&ann(&[(key.as_str(), "/d")])).expect_err("name too long");
        assert_eq!(e.annotation, key);
        assert!(e.reason.contains("63"), "{e}");
    }
}
