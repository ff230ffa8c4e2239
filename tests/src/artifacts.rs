//! Where the guest kernel and test initrd are: built by `cargo xtask guest` (which
//! `cargo xtask test` runs first) into `target/cnfs-guest/`, or named by `CNFS_GUEST_DIR`.

use std::path::PathBuf;

pub struct Artifacts {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl Artifacts {
    pub fn dir() -> PathBuf {
        std::env::var_os("CNFS_GUEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("..")
                    .join("target")
                    .join("cnfs-guest")
            })
    }

    pub fn locate() -> anyhow::Result<Self> {
        let dir = Self::dir();
        let a = Artifacts {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd-test.img"),
        };
        for p in [&a.kernel, &a.initrd] {
            if !p.exists() {
                anyhow::bail!(
                    "{} is missing: run `cargo xtask guest` (or `cargo xtask test`) to build the test guest",
                    p.display()
                );
            }
        }
        Ok(a)
    }
}
