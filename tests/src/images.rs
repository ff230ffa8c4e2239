//! The OCI image archives `cargo xtask images` builds into `target/images/` (issue 11), and
//! their import into a test bed's private containerd.

use std::path::{Path, PathBuf};

use crate::containerd::Containerd;

/// Where `cargo xtask images` writes: `target/images/` of this workspace (xtask writes there
/// whatever `CARGO_TARGET_DIR` says).
pub fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("images")
}

/// The archive of image `name` (`cnfs-csi`, ...) at this workspace's version. Fails with the
/// fix when it has not been built.
pub fn archive(name: &str) -> anyhow::Result<PathBuf> {
    let path = dir().join(format!("{name}-{}.oci.tar", env!("CARGO_PKG_VERSION")));
    if !path.is_file() {
        anyhow::bail!(
            "{} is missing: run `cargo xtask images` to build the image archives \
             (`cargo xtask test` builds them before the tests)",
            path.display()
        );
    }
    Ok(path)
}

/// `ctr images import` of `archive` with the native snapshotter (it needs no overlayfs or
/// other kernel support), unpacked; returns the image names the archive held.
pub fn import(ctd: &Containerd, archive: &Path) -> anyhow::Result<Vec<String>> {
    let path = archive
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("{}: not UTF-8", archive.display()))?;
    let out = ctd.ctr(&["images", "import", "--snapshotter", "native", path])?;
    // One line per image: "unpacking <name> (sha256:...)...done".
    let names: Vec<String> = out
        .lines()
        .filter_map(|l| l.strip_prefix("unpacking ")?.split_whitespace().next())
        .map(str::to_string)
        .collect();
    anyhow::ensure!(
        !names.is_empty(),
        "ctr imported no image from {}: {out}",
        archive.display()
    );
    Ok(names)
}
