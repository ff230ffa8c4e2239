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

/// The parts the Kata-layout tests assemble guests from (copied by `cargo xtask guest`): the
/// static agent, test helpers, the kata-agent stand-in, the rootfs builder, and the extracted
/// Debian kernel tree with its release.
pub struct Parts {
    pub dir: PathBuf,
    pub kernel_tree: PathBuf,
    pub kernel_release: String,
    pub vmlinuz: PathBuf,
}

impl Parts {
    pub fn locate() -> anyhow::Result<Self> {
        let dir = Artifacts::dir().join("parts");
        let text = std::fs::read_to_string(dir.join("kernel-tree")).map_err(|e| {
            anyhow::anyhow!(
                "{}: {e}: run `cargo xtask guest` (or `cargo xtask test`) first",
                dir.join("kernel-tree").display()
            )
        })?;
        let mut lines = text.lines();
        let kernel_tree = PathBuf::from(lines.next().unwrap_or_default());
        let kernel_release = lines.next().unwrap_or_default().to_string();
        Ok(Parts {
            vmlinuz: Artifacts::dir().join("vmlinuz"),
            dir,
            kernel_tree,
            kernel_release,
        })
    }

    pub fn bin(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The cached tarball of a minimal Debian root with systemd (mmdebstrap).
    pub fn systemd_rootfs(&self) -> anyhow::Result<PathBuf> {
        let text = std::fs::read_to_string(self.dir.join("systemd-rootfs"))?;
        Ok(PathBuf::from(text.trim()))
    }
}

/// The `cnfs-csi` binary of this build, brought up to date first (this package's tests do not
/// build another package's binaries; a stale one would test old code).
pub fn csi_binary() -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> → target/<profile>/cnfs-csi
    let profile_dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("target/<profile>")
        .to_path_buf();
    BUILT.call_once(|| {
        let mut c = std::process::Command::new(env!("CARGO"));
        c.args(["build", "--quiet", "-p", "cnfs-csi", "--bin", "cnfs-csi"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            c.arg("--release");
        }
        let st = c.status().expect("cargo runs");
        assert!(st.success(), "building cnfs-csi");
    });
    profile_dir.join("cnfs-csi")
}
