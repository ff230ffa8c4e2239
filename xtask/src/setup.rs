//! Installs what the test bed needs on a fresh Debian 12 machine, skipping what is there:
//! Debian packages, `vhost-device-vsock` from crates.io, and a Debian cloud guest kernel
//! (fetched with `apt-get download`, unpacked, `depmod -b`'d).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use crate::{root, sh};

/// Debian packages the test bed runs: nfs-ganesha with its VFS backend and rpcbind, busybox
/// for the test guest and container root file systems, iproute2 for namespaces, kmod for
/// depmod, containerd and runc for the shim tests, Ceph (mon, mgr, osd, mds, CLI, libcephfs
/// bindings for host-side file access) for CephFS, strace to show the CSI node plugin never
/// calls mount(2), cpio to build initrds exactly as Kata's osbuilder does, mmdebstrap for a
/// systemd guest root built the way osbuilder builds its image roots, Samba (server and
/// smbclient) for SMB volumes, sshfs (copied with its libraries into the test guest) and
/// openssh-sftp-server (its server, run on the host) for FUSE volumes, cryptsetup-bin and
/// e2fsprogs (cryptsetup and mke2fs, copied with their libraries into the test guest's
/// /usr/lib/cnfs/tools) for LUKS2 volumes, gocryptfs (copied the same way) for gocryptfs
/// volumes. (QEMU comes from backports, below.)
const PACKAGES: &[&str] = &[
    "containerd",
    "runc",
    "ceph-mon",
    "ceph-mgr",
    "ceph-osd",
    "ceph-mds",
    "ceph-common",
    "python3-cephfs",
    "util-linux",
    "nfs-ganesha",
    "nfs-ganesha-vfs",
    "rpcbind",
    "busybox-static",
    "iproute2",
    "kmod",
    "strace",
    "cpio",
    "mmdebstrap",
    "samba",
    "smbclient",
    // FUSE volumes: the guest runs Debian's unmodified sshfs against the host's sftp-server.
    "sshfs",
    "openssh-sftp-server",
    // LUKS2 volumes: the guest runs Debian's cryptsetup and mke2fs (`--luks2-tools`).
    "cryptsetup-bin",
    "e2fsprogs",
    // gocryptfs volumes: the guest runs Debian's gocryptfs 2.3 (`--gocryptfs-tools`).
    "gocryptfs",
];

const BACKPORTS_SOURCES: &str = "/etc/apt/sources.list.d/cnfs-bookworm-backports.sources";

/// Which guest kernel: Debian's 6.12 from bookworm-backports (closest to Kata's guest kernel,
/// the default) or bookworm's own 6.1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kernel {
    #[value(name = "6.12")]
    Backports,
    #[value(name = "6.1")]
    Bookworm,
}

pub struct KernelTree {
    pub tree: PathBuf,
    pub release: String,
    pub vmlinuz: PathBuf,
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

pub struct Apt {
    updated: bool,
}

impl Apt {
    pub fn new() -> Self {
        Apt { updated: false }
    }

    fn update(&mut self) -> anyhow::Result<()> {
        if !self.updated {
            sh(Command::new("apt-get").args(["update", "-qq"]))?;
            self.updated = true;
        }
        Ok(())
    }

    pub fn install(&mut self, pkgs: &[&str]) -> anyhow::Result<()> {
        let missing: Vec<&str> = pkgs.iter().copied().filter(|p| !installed(p)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        eprintln!("xtask: installing {}", missing.join(" "));
        self.update()?;
        sh(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))
    }

    fn ensure_backports(&mut self) -> anyhow::Result<()> {
        let have = std::fs::read_dir("/etc/apt/sources.list.d")
            .map(|d| {
                d.flatten().any(|f| {
                    std::fs::read_to_string(f.path())
                        .map(|t| t.contains("bookworm-backports"))
                        .unwrap_or(false)
                })
            })
            .unwrap_or(false);
        if !have {
            // Same mirror as the main suite, as Debian documents for backports.
            std::fs::write(
                BACKPORTS_SOURCES,
                "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\n\
                 Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
            )
            .context("adding bookworm-backports to apt sources")?;
            self.updated = false;
        }
        Ok(())
    }

    /// The versioned image package behind `linux-image-cloud-amd64` in the chosen suite.
    fn kernel_package(&mut self, kernel: Kernel) -> anyhow::Result<String> {
        if kernel == Kernel::Backports {
            self.ensure_backports()?;
        }
        let show = |apt: &mut Apt| -> anyhow::Result<String> {
            apt.update()?;
            let out = Command::new("apt-cache")
                .args(["show", "linux-image-cloud-amd64"])
                .output()?;
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let text = show(self)?;
        let mut best: Option<(String, String)> = None;
        for stanza in text.split("\n\n") {
            let field = |name: &str| {
                stanza
                    .lines()
                    .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
            };
            let (Some(version), Some(depends)) = (field("Version:"), field("Depends:")) else {
                continue;
            };
            if (kernel == Kernel::Backports) != version.contains("bpo") {
                continue;
            }
            let pkg = depends
                .split([',', ' '])
                .find(|d| d.starts_with("linux-image-") && d.ends_with("-cloud-amd64"))
                .map(str::to_string);
            if let Some(pkg) = pkg {
                // apt-cache lists the candidate first.
                best.get_or_insert((version, pkg));
            }
        }
        best.map(|(_, p)| p)
            .context("no linux-image-cloud-amd64 in apt's lists for the chosen suite")
    }
}

/// QEMU's major version, if installed.
fn qemu_major() -> Option<u32> {
    let out = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let version = text.split("version ").nth(1)?;
    version.split('.').next()?.parse().ok()
}

/// Makes sure the tools are installed: packages, QEMU and vhost-device-vsock.
pub fn tools(apt: &mut Apt) -> anyhow::Result<()> {
    apt.install(PACKAGES)?;
    // bookworm's QEMU 7.2 corrupts Linux 6.12 guests under TCG when the host is busy
    // (double faults and GP faults in about half of parallel boots, measured); the
    // bookworm-backports QEMU (10.x) boots them cleanly.
    if qemu_major().is_none_or(|v| v < 10) {
        apt.ensure_backports()?;
        apt.update()?;
        eprintln!("xtask: installing qemu-system-x86 from bookworm-backports");
        sh(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(["-t", "bookworm-backports", "qemu-system-x86"])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    let vhost = cargo_home().join("bin").join("vhost-device-vsock");
    if !vhost.exists() {
        eprintln!("xtask: cargo install --locked vhost-device-vsock");
        sh(Command::new("cargo").args(["install", "--locked", "vhost-device-vsock"]))?;
    }
    Ok(())
}

/// What only `cargo xtask bench` runs: virtiofsd (Kata's virtio-fs daemon, the Rust one
/// Kata ships; built from crates.io, which needs libcap-ng's and libseccomp's headers), and
/// Debian's ceph-fuse, which the CephFS part copies with its libraries into a cpio of its own
/// guest (`images::ceph_fuse_cpio`; the test initrd and the suite do without it).
pub fn bench_tools(apt: &mut Apt) -> anyhow::Result<()> {
    apt.install(&["ceph-fuse"])?;
    let virtiofsd = cargo_home().join("bin").join("virtiofsd");
    if !virtiofsd.exists() {
        apt.install(&["libcap-ng-dev", "libseccomp-dev"])?;
        eprintln!("xtask: cargo install --locked virtiofsd");
        sh(Command::new("cargo").args(["install", "--locked", "virtiofsd"]))?;
    }
    Ok(())
}

pub fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

/// Downloads and unpacks the guest kernel once; later runs reuse the cache.
pub fn kernel(apt: &mut Apt, kernel: Kernel) -> anyhow::Result<KernelTree> {
    let cache = root().join("target").join("cnfs-cache");
    let tag = match kernel {
        Kernel::Backports => "6.12",
        Kernel::Bookworm => "6.1",
    };
    let tree = cache.join(format!("kernel-{tag}"));
    let done = tree.join(".cnfs-ready");
    if !done.exists() {
        let pkg = apt.kernel_package(kernel)?;
        eprintln!("xtask: fetching guest kernel {pkg}");
        let dl = cache.join("download");
        let _ = std::fs::remove_dir_all(&dl);
        std::fs::create_dir_all(&dl)?;
        // Root downloads into its own directory: no unprivileged sandbox user needed.
        sh(Command::new("apt-get")
            .args(["download", "-qq", "-o", "APT::Sandbox::User=root", &pkg])
            .current_dir(&dl))?;
        let deb = std::fs::read_dir(&dl)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .context("apt-get download left no .deb")?;
        let _ = std::fs::remove_dir_all(&tree);
        sh(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
        let _ = std::fs::remove_dir_all(&dl);
        let release = release_of(&tree)?;
        sh(Command::new("depmod").arg("-b").arg(&tree).arg(&release))?;
        std::fs::write(&done, &release)?;
    }
    let release = release_of(&tree)?;
    let vmlinuz = tree.join("boot").join(format!("vmlinuz-{release}"));
    if !vmlinuz.exists() {
        bail!("{} is missing from the kernel package", vmlinuz.display());
    }
    Ok(KernelTree {
        tree,
        release,
        vmlinuz,
    })
}

fn release_of(tree: &Path) -> anyhow::Result<String> {
    let dir = tree.join("lib").join("modules");
    let mut releases: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    releases.sort();
    releases
        .pop()
        .context("no kernel release under lib/modules")
}

/// A minimal Debian root with systemd (what osbuilder's image roots are: mmdebstrap, variant
/// minbase plus init), as a tarball, built once and cached.
pub fn systemd_rootfs() -> anyhow::Result<PathBuf> {
    let cache = root().join("target").join("cnfs-cache");
    let tar = cache.join("systemd-rootfs.tar");
    if tar.exists() {
        return Ok(tar);
    }
    std::fs::create_dir_all(&cache)?;
    // mmdebstrap picks the output format from the name unless told: `--format=tar`.
    let tmp = cache.join("systemd-rootfs.part.tar");
    eprintln!("xtask: building a systemd guest root with mmdebstrap (bookworm, minbase)");
    sh(Command::new("mmdebstrap")
        .args(["--variant=minbase", "--format=tar"])
        .args(["--include=systemd,systemd-sysv,kmod"])
        .args(["--dpkgopt=path-exclude=/usr/share/man/*"])
        .args(["--dpkgopt=path-exclude=/usr/share/doc/*"])
        .args(["--dpkgopt=path-exclude=/usr/share/locale/*"])
        .arg("bookworm")
        .arg(&tmp))?;
    std::fs::rename(&tmp, &tar)?;
    Ok(tar)
}
