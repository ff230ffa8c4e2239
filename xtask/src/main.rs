//! `cargo xtask <task>`: the project's two README commands and their helpers.
//! - `demo`: sets up a fresh machine and shows a real VM's kernel mounting a real NFS export.
//! - `test`: everything CI runs (format, lint, unit and end-to-end tests).
//! - `guest`: builds the test guest (static agent, kernel, initrd); `bench`: prints figures.

mod bench;
mod demo;
mod images;
mod setup;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use setup::Kernel;

#[derive(Parser)]
#[command(about = "CNFS project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install packages, vhost-device-vsock and the guest kernel (skips what is there).
    Setup {
        #[arg(long, value_enum, default_value = "6.12")]
        kernel: Kernel,
    },
    /// Build the test guest: static cnfs-agent, kernel, initrd, into target/cnfs-guest/.
    Guest {
        #[arg(long, value_enum, default_value = "6.12")]
        kernel: Kernel,
    },
    /// End to end on a real VM: mount an NFS export with the guest kernel, move data both ways.
    Demo {
        #[arg(long, value_enum, default_value = "6.12")]
        kernel: Kernel,
        /// Also run the CephFS scenario (a real single-node Ceph cluster).
        #[arg(long)]
        cephfs: bool,
    },
    /// Everything CI runs: fmt, clippy, unit and end-to-end tests.
    Test {
        #[arg(long, value_enum, default_value = "6.12")]
        kernel: Kernel,
        /// Extra arguments for the test runner (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// OCI image archives (reproducible), into target/images/: cnfs-csi and the installer.
    Images {
        #[arg(long, value_enum, default_value = "6.12")]
        kernel: Kernel,
    },
    /// Print performance figures from one run on the test bed.
    Bench {
        #[arg(long, value_enum, default_value = "6.12")]
        kernel: Kernel,
        /// Only one part of the figures.
        #[arg(long, value_enum, default_value = "all")]
        part: bench::Part,
        /// Also measure NFS with these options (`key=value,flag,...`; repeatable).
        #[arg(long)]
        nfs_variant: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup { kernel } => {
            let mut apt = setup::Apt::new();
            setup::tools(&mut apt)?;
            setup::kernel(&mut apt, kernel)?;
            Ok(())
        }
        Task::Guest { kernel } => guest(kernel).map(|_| ()),
        Task::Demo { kernel, cephfs } => {
            guest(kernel)?;
            runtime()?.block_on(demo::run(cephfs))
        }
        Task::Test { kernel, args } => test(kernel, &args),
        Task::Images { kernel } => {
            let k = guest(kernel)?;
            images::build_all(&k)
        }
        Task::Bench {
            kernel,
            part,
            nfs_variant,
        } => {
            setup::bench_tools(&mut setup::Apt::new())?;
            guest(kernel)?;
            runtime()?.block_on(bench::run(part, &nfs_variant))
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting tokio")
}

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Runs a command, streaming its output; fails on a non-zero exit.
pub fn sh(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!(
            "{:?} {:?} failed: {status}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>()
        );
    }
    Ok(())
}

/// Flags of the static builds (guest binaries and images): glibc linked in, and the checkout
/// and cargo home paths mapped to fixed names, so that the same sources give the same bytes
/// (and the same image digests) wherever they are checked out.
pub fn static_rustflags() -> String {
    let cargo_home = std::env::var("CARGO_HOME").unwrap_or_else(|_| {
        format!(
            "{}/.cargo",
            std::env::var("HOME").unwrap_or_else(|_| "/root".into())
        )
    });
    format!(
        "-C target-feature=+crt-static --remap-path-prefix={}=/cnfs --remap-path-prefix={cargo_home}=/cargo",
        root().display()
    )
}

pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

/// The static guest binaries (no libc needed in the guest), the kernel and the test initrd.
fn guest(kernel: Kernel) -> anyhow::Result<setup::KernelTree> {
    let mut apt = setup::Apt::new();
    setup::tools(&mut apt)?;
    let k = setup::kernel(&mut apt, kernel)?;
    let triple = "x86_64-unknown-linux-gnu";
    sh(cargo()
        .args(["build", "--release", "--target", triple])
        .args(["-p", "cnfs-agent", "-p", "cnfs-testbed"])
        .args(["--bin", "cnfs-agent", "--bin", "cnfs-test-exec"])
        .args(["--bin", "kata-agent-standin", "--bin", "cnfs-fuse-starter"])
        .args(["--bin", "cnfs-io-bench"])
        .env("RUSTFLAGS", static_rustflags()))?;
    sh(cargo().args(["build", "--release", "-p", "cnfs-rootfs-builder"]))?;
    let bin = root().join("target").join(triple).join("release");
    let out = cnfs_testbed::Artifacts::dir();
    std::fs::create_dir_all(&out)?;
    std::fs::copy(&k.vmlinuz, out.join("vmlinuz")).context("copying the kernel")?;
    // What the Kata-layout tests assemble guests from, the way the README tells admins to.
    let parts = out.join("parts");
    std::fs::create_dir_all(&parts)?;
    for b in [
        "cnfs-agent",
        "cnfs-test-exec",
        "kata-agent-standin",
        "cnfs-fuse-starter",
    ] {
        std::fs::copy(bin.join(b), parts.join(b)).with_context(|| format!("copying {b}"))?;
    }
    std::fs::copy(
        root().join("target/release/cnfs-rootfs-builder"),
        parts.join("cnfs-rootfs-builder"),
    )
    .context("copying cnfs-rootfs-builder")?;
    std::fs::write(
        parts.join("kernel-tree"),
        format!("{}\n{}\n", k.tree.display(), k.release),
    )?;
    std::fs::write(
        parts.join("systemd-rootfs"),
        format!("{}\n", setup::systemd_rootfs()?.display()),
    )?;
    sh(
        Command::new(root().join("target/release/cnfs-rootfs-builder"))
            .arg("test-initrd")
            .arg("--kernel-tree")
            .arg(&k.tree)
            .args(["--kernel-release", &k.release])
            .arg("--agent")
            .arg(bin.join("cnfs-agent"))
            .args(["--busybox", "/bin/busybox"])
            .arg(format!(
                "--service=cnfs-test-exec={}",
                bin.join("cnfs-test-exec").display()
            ))
            .args([
                "--boot-module",
                "virtio_net",
                "--boot-module",
                "vmw_vsock_virtio_transport",
            ])
            .args(["--boot-module", "vsock_loopback"])
            .args(["--module", "nfsv3", "--module", "nfsv4", "--module", "ceph"])
            .args(["--module", "gcm", "--module", "ghash_generic"])
            // SMB: the client and the algorithms SMB3 signing and `seal` ask for.
            .args(["--module", "cifs", "--module", "cmac", "--module", "ccm"])
            // FUSE volumes: Debian's own sshfs, with the interpreter and libraries it loads,
            // and the stand-in for meta-fuse-csi-plugin's fuse-starter that hands it the fd.
            .args(["--binary", "/usr/bin/sshfs"])
            .arg(format!(
                "--program=cnfs-fuse-starter={}",
                bin.join("cnfs-fuse-starter").display()
            ))
            // LUKS2 volumes: Debian's cryptsetup and mke2fs under /usr/lib/cnfs/tools, and
            // the loop, dm-crypt, xts and aesni-intel modules.
            .arg("--luks2-tools")
            // gocryptfs volumes: Debian's gocryptfs in the same prefix (its libraries are
            // cryptsetup's), and fuse.ko where FUSE is a module (6.12 cloud has it built in).
            .arg("--gocryptfs-tools")
            // The bench's workload, the same code on every file system path.
            .arg(format!(
                "--program=cnfs-io-bench={}",
                bin.join("cnfs-io-bench").display()
            ))
            .arg("--out")
            .arg(out.join("initrd-test.img")),
    )?;
    eprintln!("xtask: test guest ready in {}", out.display());
    Ok(k)
}

fn test(kernel: Kernel, args: &[String]) -> anyhow::Result<()> {
    let k = guest(kernel)?;
    // The image tests run the real images (tests/tests/csi_image.rs, deploy.rs).
    images::build_all(&k)?;
    sh(cargo().args(["fmt", "--all", "--check"]))?;
    sh(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    let nextest = Command::new("cargo")
        .args(["nextest", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if nextest {
        sh(cargo()
            .args(["nextest", "run", "--workspace", "--no-fail-fast"])
            .args(args))
    } else {
        sh(cargo()
            .args(["test", "--workspace", "--no-fail-fast"])
            .args(args))
    }
}
