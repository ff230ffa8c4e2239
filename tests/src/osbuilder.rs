//! Guest artefacts assembled the way Kata's osbuilder and the README's recipe make them, for
//! the Kata-layout suites.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::artifacts::Parts;
use crate::process::run;

/// `( cd ROOT && find . | cpio -H newc -o | gzip -LEVEL ) > OUT`, as initrd_builder.sh does
/// (it uses `-9`; a large root may take a faster level: the format is the same).
pub fn initrd(root: &Path, out: &Path, gzip_level: u8) -> anyhow::Result<()> {
    let script = format!(
        "cd {} && find . | cpio --quiet -H newc -o | gzip -{gzip_level} > {}",
        root.display(),
        out.display()
    );
    run(Command::new("sh").args(["-c", &script]))?;
    Ok(())
}

/// `cnfs-rootfs-builder kata-kernel`: the ELF Kata's configurations name, and the builder's
/// report.
pub fn kata_kernel(parts: &Parts, dir: &Path) -> anyhow::Result<(PathBuf, String)> {
    let out = run(Command::new(parts.bin("cnfs-rootfs-builder"))
        .arg("kata-kernel")
        .arg("--vmlinuz")
        .arg(&parts.vmlinuz)
        .arg("--out-dir")
        .arg(dir))?;
    Ok((dir.join("vmlinux-cnfs.container"), out))
}
