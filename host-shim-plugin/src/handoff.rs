//! Getting a guest mount into a container: one bind mount per volume added to the bundle's
//! `config.json` before the container is created. The source is a path Kata passes through
//! to the guest unchanged (sources under /proc are "system mounts" to both Kata runtimes);
//! kata-agent canonicalizes bind sources in the guest, so
//! `/proc/1/root/run/cnfs/volumes/<name>` becomes the agent's mount point. Kept behind
//! [`passthrough_source`] so that another hand-off can replace it.

use std::path::Path;

use cnfs_protocols::spec::VOLUME_ROOT;
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

/// The mounts a container (by CRI container name) gets. Type `bind` exactly: kata-agent's
/// rustjail canonicalizes the source only for that type.
pub fn container_mounts(volumes: &[PodVolume], container: Option<&str>) -> Vec<Mount> {
    volumes
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
        })
        .collect()
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
    let tmp = bundle.join(".config.json.cnfs");
    spec.save(&tmp).map_err(|e| bad(e.to_string()))?;
    if let Ok(meta) = std::fs::metadata(&path) {
        let _ = std::fs::set_permissions(&tmp, meta.permissions());
    }
    std::fs::rename(&tmp, &path).map_err(|e| bad(e.to_string()))?;
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
}
