//! A container root file system from a plain directory: busybox-static and its applet links,
//! enough for `ctr run --rootfs` without an image or a registry.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

pub fn busybox(dir: &Path) -> anyhow::Result<PathBuf> {
    let root = dir.join("rootfs");
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "data"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .map_err(|e| anyhow::anyhow!("copying /bin/busybox (package busybox-static): {e}"))?;
    for applet in [
        "sh", "echo", "cat", "sleep", "ls", "grep", "true", "false", "id", "touch", "mount",
    ] {
        let link = root.join("bin").join(applet);
        if !link.exists() {
            symlink("busybox", &link)?;
        }
    }
    Ok(root)
}
