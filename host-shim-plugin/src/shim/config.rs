//! The wrapper's configuration: `/etc/cnfs/shim.toml` (`/etc/cnfs/shim-<variant>.toml` for a
//! `containerd-shim-cnfs-<variant>-v2` link, see [`path_for`]), or the file named by
//! `CNFS_SHIM_CONFIG` in containerd's environment. The runtime options containerd hands a
//! shim (CRI's `ConfigPath`) belong to the delegate: Kata reads its own configuration file
//! from them, so the wrapper passes them on untouched. A missing file means defaults: Kata as the delegate and no
//! policy, so that every CNFS volume is denied until the admin writes one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub const DEFAULT_PATH: &str = "/etc/cnfs/shim.toml";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShimConfig {
    /// The real shim: a binary name on PATH or an absolute path.
    pub delegate: String,
    pub agent_port: u32,
    pub policy: Option<PathBuf>,
    pub secrets_dir: PathBuf,
    pub mount_timeout_seconds: u64,
    pub guest_connect_timeout_seconds: u64,
    pub unmount_timeout_seconds: u64,
    /// Kata management socket directories (`<root>/<sandbox id>/shim-monitor.sock`).
    pub kata_monitor_roots: Vec<PathBuf>,
    /// Where `cnfs-csi node` leaves its hand-off records (tmpfs, shared with the node plugin).
    pub csi_handoff_dir: PathBuf,
}

impl Default for ShimConfig {
    fn default() -> Self {
        ShimConfig {
            delegate: "containerd-shim-kata-v2".into(),
            agent_port: cnfs_protocols::transport::DEFAULT_AGENT_PORT,
            policy: None,
            secrets_dir: PathBuf::from("/etc/cnfs/secrets"),
            mount_timeout_seconds: 60,
            guest_connect_timeout_seconds: 30,
            unmount_timeout_seconds: 10,
            kata_monitor_roots: vec![PathBuf::from("/run/vc/sbs"), PathBuf::from("/run/kata")],
            csi_handoff_dir: PathBuf::from(cnfs_protocols::handoff::DEFAULT_ROOT),
        }
    }
}

/// Where the wrapper's config is: `CNFS_SHIM_CONFIG`, else by the binary's name. containerd
/// maps `runtime_type = "io.containerd.cnfs-<variant>.v2"` to a binary
/// `containerd-shim-cnfs-<variant>-v2`; installed as a link to this one, it reads
/// `/etc/cnfs/shim-<variant>.toml`, so each runtime class can have its own delegate and policy.
pub fn path_for(env: Option<std::ffi::OsString>, argv0: &str) -> PathBuf {
    if let Some(p) = env.filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let name = Path::new(argv0)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let variant = name
        .strip_prefix("containerd-shim-cnfs-")
        .and_then(|v| v.strip_suffix("-v2"))
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    match variant {
        Some(v) => PathBuf::from(format!("/etc/cnfs/shim-{v}.toml")),
        None => PathBuf::from(DEFAULT_PATH),
    }
}

impl ShimConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text)
                .map_err(|e| anyhow::anyhow!("shim config {}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(anyhow::anyhow!("shim config {}: {e}", path.display())),
        }
    }

    pub fn mount_timeout(&self) -> Duration {
        Duration::from_secs(self.mount_timeout_seconds)
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.guest_connect_timeout_seconds)
    }

    pub fn unmount_timeout(&self) -> Duration {
        Duration::from_secs(self.unmount_timeout_seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_runtime_class_variant_has_its_own_config() {
        assert_eq!(
            path_for(None, "/usr/local/bin/containerd-shim-cnfs-v2"),
            PathBuf::from(DEFAULT_PATH)
        );
        assert_eq!(
            path_for(None, "/usr/local/bin/containerd-shim-cnfs-clh-v2"),
            PathBuf::from("/etc/cnfs/shim-clh.toml")
        );
        assert_eq!(
            path_for(None, "containerd-shim-cnfs-../x-v2"),
            PathBuf::from(DEFAULT_PATH)
        );
        assert_eq!(
            path_for(Some("/tmp/c.toml".into()), "containerd-shim-cnfs-clh-v2"),
            PathBuf::from("/tmp/c.toml")
        );
    }

    #[test]
    fn config_files_are_strict() {
        let c: ShimConfig = toml::from_str("delegate = \"containerd-shim-runc-v2\"\n").expect("ok");
        assert_eq!(c.delegate, "containerd-shim-runc-v2");
        assert_eq!(c.agent_port, 17230);
        assert!(toml::from_str::<ShimConfig>("delegat = \"x\"\n").is_err());
    }
}
