//! cnfs-rootfs-builder: puts cnfs-agent into guests — a bootable busybox test initrd, a Kata
//! rootfs directory booted by systemd, or an overlay cpio for an agent-as-init Kata initrd —
//! and turns a distribution kernel into the forms Kata's hypervisors boot.

mod archive;
mod elf_closure;
mod kata_kernel;
mod kata_rootfs;
mod modules;
mod overlay;
mod test_initrd;
mod tools;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The agent's default vsock port, the same as `cnfs_protocols::transport::DEFAULT_AGENT_PORT`
/// (not a dependency, to keep this build tool free of the ttrpc stack).
pub const DEFAULT_AGENT_PORT: u32 = 17230;

#[derive(Debug, Parser)]
#[command(version, about = "Puts cnfs-agent into guest images")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// A bootable busybox test guest as a gzip'ed newc cpio.
    TestInitrd(test_initrd::Args),
    /// Install the agent and its systemd unit into a Kata guest rootfs directory.
    KataRootfs(kata_rootfs::Args),
    /// A cpio to append to a Kata initrd whose /init is kata-agent.
    InitrdOverlay(overlay::Args),
    /// A distribution kernel in the forms Kata's hypervisors boot (ELF with PVH, bzImage).
    KataKernel(kata_kernel::Args),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::TestInitrd(a) => test_initrd::run(&a),
        Command::KataRootfs(a) => kata_rootfs::run(&a),
        Command::InitrdOverlay(a) => overlay::run(&a),
        Command::KataKernel(a) => kata_kernel::run(&a),
    };
    // One line with the whole context chain; a build tool's user needs no backtrace.
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cnfs-rootfs-builder: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser as _};

    use super::{Cli, Command};

    #[test]
    fn every_image_mode_takes_both_tool_flags() {
        let tools = |args: &[&str]| -> crate::tools::Flags {
            let line = ["cnfs-rootfs-builder"].iter().chain(args);
            match Cli::try_parse_from(line).expect("parses").command {
                Command::TestInitrd(a) => a.tools,
                Command::KataRootfs(a) => a.tools,
                Command::InitrdOverlay(a) => a.tools,
                Command::KataKernel(_) => panic!("no tools in kata-kernel"),
            }
        };
        let both = ["--luks2-tools", "--gocryptfs-tools"];
        for mode in [
            &[
                "test-initrd",
                "--kernel-tree=k",
                "--kernel-release=r",
                "--busybox=b",
                "--out=o",
            ][..],
            &["kata-rootfs", "--rootfs=r"],
            &["initrd-overlay", "--out=o"],
        ] {
            let base: Vec<&str> = mode.iter().copied().chain(["--agent=a"]).collect();
            let t = tools(&base);
            assert!(!t.luks2_tools && !t.gocryptfs_tools, "{mode:?}");
            let only: Vec<&str> = base.iter().copied().chain(["--gocryptfs-tools"]).collect();
            let t = tools(&only);
            assert!(!t.luks2_tools && t.gocryptfs_tools, "{mode:?}");
            let all: Vec<&str> = base.iter().copied().chain(both).collect();
            let t = tools(&all);
            assert!(t.luks2_tools && t.gocryptfs_tools, "{mode:?}");
        }
    }

    #[test]
    fn the_tool_flags_help_names_the_debian_packages() {
        let mut cli = Cli::command();
        for mode in ["test-initrd", "kata-rootfs", "initrd-overlay"] {
            let help = cli
                .find_subcommand_mut(mode)
                .expect(mode)
                .render_long_help()
                .to_string();
            assert!(help.contains("(Debian package gocryptfs)"), "{help}");
            assert!(
                help.contains("(Debian packages cryptsetup-bin and e2fsprogs)"),
                "{help}"
            );
        }
    }
}

#[cfg(test)]
mod testutil {
    use std::io::Read as _;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};

    static NEXT: AtomicUsize = AtomicUsize::new(0);

    /// A fresh directory under the system temp dir, removed when dropped.
    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new(tag: &str) -> Self {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!(
                "cnfs-rootfs-builder-{tag}-{}-{n}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).expect("creating temp dir");
            TempDir(p)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[derive(Debug)]
    pub struct Entry {
        pub name: String,
        pub ino: u32,
        pub mode: u32,
        pub uid: u32,
        pub gid: u32,
        pub mtime: u32,
        pub rdev_major: u32,
        pub rdev_minor: u32,
        pub data: Vec<u8>,
    }

    /// All entries of a newc archive, up to the trailer.
    pub fn read_newc(mut bytes: &[u8]) -> Vec<Entry> {
        let mut out = Vec::new();
        loop {
            let mut r = cpio::newc::Reader::new(bytes).expect("cpio header");
            let e = r.entry();
            if e.is_trailer() {
                return out;
            }
            let mut entry = Entry {
                name: e.name().to_string(),
                ino: e.ino(),
                mode: e.mode(),
                uid: e.uid(),
                gid: e.gid(),
                mtime: e.mtime(),
                rdev_major: e.rdev_major(),
                rdev_minor: e.rdev_minor(),
                data: Vec::new(),
            };
            r.read_to_end(&mut entry.data).expect("cpio data");
            out.push(entry);
            bytes = r.finish().expect("cpio entry end");
        }
    }

    pub fn gunzip(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(data)
            .read_to_end(&mut out)
            .expect("gunzip");
        out
    }
}
