//! Getting a guest mount into a container: one bind mount per volume added to the bundle's
//! `config.json` before the container is created. The source is a path Kata passes through
//! to the guest unchanged (sources under /proc are "system mounts" to both Kata runtimes);
//! kata-agent canonicalizes bind sources in the guest, so
//! `/proc/1/root/run/cnfs/volumes/<name>` becomes the agent's mount point. Kept behind
//! [`passthrough_source`] so that another hand-off can replace it.

use std::path::Path;

use cnfs_protocols::spec::{Source, VOLUME_ROOT};
use oci_spec::runtime::{Mount, MountBuilder, Spec};

use crate::annotations::PodVolume;

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("bundle {path}: {reason}")]
    Bundle { path: String, reason: String },
    #[error("volume {volume}: container path {path} is already a mount of the pod")]
    Conflict { volume: String, path: String },
}

/// The bind source for `volume` that reaches the guest untouched.
pub fn passthrough_source(volume: &str) -> String {
    format!("/proc/1/root{VOLUME_ROOT}/{volume}")
}

/// The bind source of a FUSE volume's socket directory, the same way.
pub fn fuse_socket_source(volume: &str) -> String {
    format!(
        "/proc/1/root{}",
        cnfs_protocols::spec::fuse::socket_dir_in_guest(volume).display()
    )
}

/// The mounts a container (by CRI container name) gets. Type `bind`: kata-agent's rustjail
/// canonicalizes the source of a bind mount (type `bind`, or no type with a `bind`/`rbind`
/// option; type `none` with `rbind` would not be) in the container's new mount namespace,
/// where `/proc/1/root` reads as `/`. So the source resolves in a copy of the guest's root
/// mount namespace, which cnfs-agent and kata-agent share: it reaches the volume there and
/// nothing in any other namespace. A FUSE volume's sidecar gets the directory of the
/// volume's fd-passing socket instead of the volume (and no other container gets it).
pub fn container_mounts(volumes: &[PodVolume], container: Option<&str>) -> Vec<Mount> {
    let sockets = volumes.iter().filter_map(|v| match &v.spec.source {
        Source::Fuse(f) if container == Some(f.sidecar.as_str()) => MountBuilder::default()
            .destination(f.socket_dir())
            .typ("bind")
            .source(fuse_socket_source(v.name()))
            // Read-only: the sidecar connects to the socket (that works on a read-only
            // mount) but can neither remove it nor put anything beside it.
            .options(
                ["bind", "nosuid", "nodev", "noexec", "ro"]
                    .map(String::from)
                    .to_vec(),
            )
            .build()
            .ok(),
        _ => None,
    });
    let volumes = volumes
        .iter()
        .filter(|v| v.applies_to(container))
        .filter_map(|v| {
            let mut options = vec!["bind".to_string(), "nosuid".into(), "nodev".into()];
            if v.spec.read_only {
                options.push("ro".into());
            }
            MountBuilder::default()
                .destination(&v.path)
                .typ("bind")
                .source(passthrough_source(v.name()))
                .options(options)
                .build()
                .ok()
        });
    volumes.chain(sockets).collect()
}

/// The bind sources of `<bundle>/config.json` (CSI hand-offs are found among them).
pub fn bind_sources(bundle: &Path) -> Result<Vec<String>, HandoffError> {
    let path = bundle.join("config.json");
    let spec = Spec::load(&path).map_err(|e| HandoffError::Bundle {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    Ok(spec
        .mounts()
        .iter()
        .flatten()
        .filter(|m| m.typ().as_deref().is_none_or(|t| t == "bind"))
        .filter_map(|m| m.source().as_ref()?.to_str().map(str::to_string))
        .filter(|s| s.starts_with('/'))
        .collect())
}

/// A CSI volume's bind mount, re-pointed at the guest's mount of it.
pub struct Redirect {
    /// The CSI target path the container runtime was given.
    pub source: String,
    /// The agent volume that holds the mount in the guest.
    pub volume: String,
    pub read_only: bool,
    /// The container is the FUSE volume's sidecar: its mount of the volume becomes the
    /// directory of the volume's fd-passing socket (read-only, like the annotation hand-off).
    pub socket: bool,
}

/// Re-points every bind mount whose source is a redirect's to the guest's mount
/// ([`passthrough_source`]), keeping its destination; atomically. Returns how many changed.
pub fn redirect(bundle: &Path, redirects: &[Redirect]) -> Result<usize, HandoffError> {
    let path = bundle.join("config.json");
    let bad = |reason: String| HandoffError::Bundle {
        path: path.display().to_string(),
        reason,
    };
    let mut spec = Spec::load(&path).map_err(|e| bad(e.to_string()))?;
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    let mut n = 0;
    for m in mounts.iter_mut() {
        let Some(r) = m
            .source()
            .as_ref()
            .and_then(|s| s.to_str())
            .and_then(|s| redirects.iter().find(|r| r.source == s))
        else {
            continue;
        };
        // Type `bind` (see `container_mounts`); the runtime's own options stay (rbind,
        // propagation), hardened, read-only when published so.
        let mut options: Vec<String> = m.options().clone().unwrap_or_default();
        options.retain(|o| o != "rw" || !r.read_only);
        for o in ["nosuid", "nodev"]
            .into_iter()
            .chain(r.socket.then_some("noexec"))
            .chain(r.read_only.then_some("ro"))
        {
            if !options.iter().any(|e| e == o) {
                options.push(o.to_string());
            }
        }
        let source = if r.socket {
            fuse_socket_source(&r.volume)
        } else {
            passthrough_source(&r.volume)
        };
        m.set_source(Some(source.into()));
        m.set_typ(Some("bind".into()));
        m.set_options(Some(options));
        n += 1;
    }
    spec.set_mounts(Some(mounts));
    save(bundle, &path, &spec).map_err(bad)?;
    Ok(n)
}

fn save(bundle: &Path, path: &Path, spec: &Spec) -> Result<(), String> {
    let tmp = bundle.join(".config.json.cnfs");
    spec.save(&tmp).map_err(|e| e.to_string())?;
    if let Ok(meta) = std::fs::metadata(path) {
        let _ = std::fs::set_permissions(&tmp, meta.permissions());
    }
    std::fs::rename(&tmp, path).map_err(|e| e.to_string())
}

/// Adds `mounts` to `<bundle>/config.json`, atomically. Returns how many were added; a
/// destination the spec already mounts is a conflict (the pod's own volume wins nothing
/// silently).
pub fn inject(bundle: &Path, mounts: Vec<Mount>) -> Result<usize, HandoffError> {
    let path = bundle.join("config.json");
    let bad = |reason: String| HandoffError::Bundle {
        path: path.display().to_string(),
        reason,
    };
    if mounts.is_empty() {
        return Ok(0);
    }
    let mut spec = Spec::load(&path).map_err(|e| bad(e.to_string()))?;
    let mut all = spec.mounts().clone().unwrap_or_default();
    for m in &mounts {
        if all.iter().any(|e| e.destination() == m.destination()) {
            return Err(HandoffError::Conflict {
                volume: m
                    .source()
                    .as_ref()
                    .and_then(|s| s.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                path: m.destination().display().to_string(),
            });
        }
    }
    let n = mounts.len();
    all.extend(mounts);
    spec.set_mounts(Some(all));
    save(bundle, &path, &spec).map_err(bad)?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotations;
    use std::collections::HashMap;

    fn volumes() -> Vec<PodVolume> {
        let a: HashMap<String, String> = [
            ("cnfs.io/volume.data", "nfs://10.0.0.5/exports/data?ro"),
            ("cnfs.io/mount.data", "/data"),
            ("cnfs.io/volume.logs", "nfs://10.0.0.5/logs"),
            ("cnfs.io/mount.logs", "/logs"),
            ("cnfs.io/containers.logs", "worker"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        annotations::parse(&a).expect("valid")
    }

    #[test]
    fn mounts_use_the_passthrough_source_and_respect_container_lists() {
        let m = container_mounts(&volumes(), Some("app"));
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].destination(), Path::new("/data"));
        assert_eq!(m[0].typ().as_deref(), Some("bind"));
        assert_eq!(
            m[0].source().as_deref(),
            Some(Path::new("/proc/1/root/run/cnfs/volumes/data"))
        );
        assert!(m[0]
            .options()
            .as_ref()
            .is_some_and(|o| o.contains(&"ro".to_string())));
        assert_eq!(container_mounts(&volumes(), Some("worker")).len(), 2);
    }

    #[test]
    fn inject_adds_mounts_to_config_json_and_refuses_conflicts() {
        let dir = std::env::temp_dir().join(format!("cnfs-bundle-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        Spec::default().save(dir.join("config.json")).expect("spec");
        let before = Spec::load(dir.join("config.json"))
            .expect("load")
            .mounts()
            .clone()
            .unwrap_or_default()
            .len();
        let n = inject(&dir, container_mounts(&volumes(), Some("worker"))).expect("inject");
        assert_eq!(n, 2);
        let after = Spec::load(dir.join("config.json")).expect("load");
        let mounts = after.mounts().clone().unwrap_or_default();
        assert_eq!(mounts.len(), before + 2);
        assert!(mounts.iter().any(|m| m.destination() == Path::new("/logs")));
        let e = inject(&dir, container_mounts(&volumes(), Some("app"))).expect_err("conflict");
        assert!(e.to_string().contains("/data"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_fuse_sidecar_gets_the_socket_directory_only_and_apps_get_the_volume() {
        let a: HashMap<String, String> = [
            (
                "cnfs.io/volume.web",
                "fuse://?sidecar=sshfs&uid=1000&allow_other",
            ),
            ("cnfs.io/mount.web", "/srv/web"),
            ("cnfs.io/volume.data", "nfs://10.0.0.5/exports/data"),
            ("cnfs.io/mount.data", "/data"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let v = annotations::parse(&a).expect("valid");
        let shown = |m: &[Mount]| -> Vec<(String, String)> {
            m.iter()
                .map(|m| {
                    let src = m.source().as_ref().map(|s| s.display().to_string());
                    (
                        m.destination().display().to_string(),
                        src.unwrap_or_default(),
                    )
                })
                .collect()
        };
        // The sidecar: the other volume (it lists no containers), and the socket's
        // directory from meta-fuse's default path instead of the FUSE volume.
        let sidecar = container_mounts(&v, Some("sshfs"));
        assert_eq!(
            shown(&sidecar),
            [
                ("/data".into(), "/proc/1/root/run/cnfs/volumes/data".into()),
                (
                    "/fuse-fd-passing".into(),
                    "/proc/1/root/run/cnfs/fuse/web".into()
                ),
            ]
        );
        assert_eq!(
            sidecar[1].options().as_deref(),
            Some(&["bind", "nosuid", "nodev", "noexec", "ro"].map(String::from)[..])
        );
        // Any other container: the volumes, never a socket.
        for c in [Some("app"), Some("fuse-fd-passing"), None] {
            let m = container_mounts(&v, c);
            assert_eq!(
                shown(&m),
                [
                    ("/data".into(), "/proc/1/root/run/cnfs/volumes/data".into()),
                    (
                        "/srv/web".into(),
                        "/proc/1/root/run/cnfs/volumes/web".into()
                    ),
                ],
                "{c:?}"
            );
        }
    }

    /// The Kata agent-policy entries shipped in configs/kata/policy/cnfs-mounts.json must be
    /// exactly what the wrapper sends (rules.rego compares options as ordered arrays).
    #[test]
    fn the_shipped_agent_policy_entries_match_the_mounts_the_wrapper_sends() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/kata/policy/cnfs-mounts.json");
        let policy: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        let options = |key: &str| -> Vec<String> {
            serde_json::from_value(policy[key]["options"].clone()).expect(key)
        };
        let matches = |key: &str, source: &str| {
            let re = policy[key]["source"].as_str().expect("source");
            let re = re.trim_start_matches('^').trim_end_matches('$');
            // The entries use only `NAME` and `[0-9a-f]{20}` as placeholders.
            let re = re
                .replace("NAME", "data")
                .replace("[0-9a-f]{20}", "0123456789abcdef0123");
            assert_eq!(re, source, "{key}");
            assert_eq!(policy[key]["type_"], "bind", "{key}");
        };
        // Annotation volumes, read-write and read-only.
        let rw: HashMap<String, String> = [
            ("cnfs.io/volume.data", "nfs://10.0.0.5/exports/data"),
            ("cnfs.io/mount.data", "/data"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let m = container_mounts(&annotations::parse(&rw).expect("valid"), Some("app"));
        assert_eq!(
            m[0].options().clone().unwrap_or_default(),
            options("annotation_volume")
        );
        matches(
            "annotation_volume",
            &m[0].source().as_deref().expect("src").display().to_string(),
        );
        let ro = container_mounts(&volumes(), Some("app"));
        assert_eq!(
            ro[0].options().clone().unwrap_or_default(),
            options("annotation_volume_read_only")
        );
        // A FUSE volume's sidecar: the socket's directory.
        let fuse: HashMap<String, String> = [
            ("cnfs.io/volume.data", "fuse://?sidecar=sshfs"),
            ("cnfs.io/mount.data", "/data"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let m = container_mounts(&annotations::parse(&fuse).expect("valid"), Some("sshfs"));
        assert_eq!(
            m[0].options().clone().unwrap_or_default(),
            options("fuse_socket")
        );
        matches(
            "fuse_socket",
            &m[0].source().as_deref().expect("src").display().to_string(),
        );
        // CSI volumes: containerd's CRI options for a PVC, re-pointed by `redirect`.
        for (read_only, socket, key) in [
            (false, false, "csi_volume"),
            (true, false, "csi_volume_read_only"),
            (true, true, "csi_fuse_socket"),
        ] {
            let dir =
                std::env::temp_dir().join(format!("cnfs-policy-{}-{key}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("dir");
            let target = "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/pv/mount";
            let mut spec = Spec::default();
            spec.set_mounts(Some(vec![MountBuilder::default()
                .destination("/data")
                .typ("bind")
                .source(target)
                .options(vec!["rbind".into(), "rprivate".into(), "rw".into()])
                .build()
                .expect("mount")]));
            spec.save(dir.join("config.json")).expect("spec");
            let r = Redirect {
                source: target.into(),
                volume: "csi-0123456789abcdef0123".into(),
                read_only,
                socket,
            };
            redirect(&dir, &[r]).expect("redirect");
            let mounts = Spec::load(dir.join("config.json"))
                .expect("load")
                .mounts()
                .clone()
                .unwrap_or_default();
            assert_eq!(
                mounts[0].options().clone().unwrap_or_default(),
                options(key)
            );
            let src = mounts[0]
                .source()
                .as_deref()
                .expect("src")
                .display()
                .to_string();
            matches(key, &src);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    #[test]
    fn redirect_repoints_only_the_csi_target_and_hardens_it() {
        let dir = std::env::temp_dir().join(format!("cnfs-redirect-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let target = "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/pv/mount";
        let csi = MountBuilder::default()
            .destination("/data")
            .typ("bind")
            .source(target)
            .options(vec!["rbind".into(), "rprivate".into(), "rw".into()])
            .build()
            .expect("mount");
        let other = MountBuilder::default()
            .destination("/etc/hosts")
            .typ("bind")
            .source("/var/lib/kubelet/pods/u/etc-hosts")
            .build()
            .expect("mount");
        let mut spec = Spec::default();
        spec.set_mounts(Some(vec![csi, other]));
        spec.save(dir.join("config.json")).expect("spec");
        let sources = bind_sources(&dir).expect("sources");
        assert!(sources.contains(&target.to_string()));
        let r = Redirect {
            source: target.into(),
            volume: "csi-0123".into(),
            read_only: true,
            socket: false,
        };
        assert_eq!(redirect(&dir, &[r]).expect("redirect"), 1);
        let mounts = Spec::load(dir.join("config.json"))
            .expect("load")
            .mounts()
            .clone()
            .unwrap_or_default();
        let data = mounts
            .iter()
            .find(|m| m.destination() == Path::new("/data"))
            .expect("data");
        assert_eq!(
            data.source().as_deref(),
            Some(Path::new("/proc/1/root/run/cnfs/volumes/csi-0123"))
        );
        let opts = data.options().clone().unwrap_or_default();
        for o in ["rbind", "ro", "nosuid", "nodev"] {
            assert!(opts.contains(&o.to_string()), "{opts:?}");
        }
        assert!(!opts.contains(&"rw".to_string()), "{opts:?}");
        assert!(
            mounts
                .iter()
                .any(|m| m.source().as_deref()
                    == Some(Path::new("/var/lib/kubelet/pods/u/etc-hosts")))
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
