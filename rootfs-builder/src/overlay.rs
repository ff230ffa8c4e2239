//! `initrd-overlay`: a cpio to append to a Kata initrd whose `/init` is kata-agent (osbuilder's
//! `AGENT_INIT=yes` layout: kata-agent at `/sbin/init`, `/init -> /sbin/init`). The kernel
//! unpacks concatenated archives in order, so these entries replace the earlier ones: `/init`
//! (the link) becomes the agent, which reads `/etc/cnfs/init.conf`, loads the boot modules,
//! starts and supervises itself in a child and execs the `then=` program (default
//! `/sbin/init`) so kata-agent still ends up as PID 1.
//!
//! With `--kernel-tree` (a distribution kernel such as Debian's, whose drivers are modules)
//! the archive also carries the module closure of `--boot-module`s (loaded by init before
//! kata-agent starts: virtio-net and the vsock transport, which kata-agent needs before the
//! runtime can send it anything) and `--module`s (loaded by cnfs-agent on demand: NFS, CephFS).
//!
//! The kernel looks for an uncompressed cpio only at 4-byte aligned offsets: appended to a
//! compressed initrd whose length is not a multiple of 4, a plain overlay is rejected
//! ("invalid magic") and silently not applied. Use `--gzip` there, or pad the base first
//! (`truncate -s %4 BASE`).

use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::archive::{gzip, read_input, write_output, Tree};
use crate::modules;
use crate::DEFAULT_AGENT_PORT;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The cnfs-agent binary (installed as /usr/bin/cnfs-agent and as /init).
    #[arg(long, value_name = "PATH")]
    pub agent: PathBuf,
    /// vsock port the agent serves the host on.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_AGENT_PORT)]
    pub port: u32,
    /// The program the agent execs as PID 1 once its service is started (osbuilder's
    /// agent-as-init images have kata-agent there; if it is missing, the other standard init
    /// locations are tried).
    #[arg(long, value_name = "PATH", default_value = "/sbin/init")]
    pub then: String,
    /// Extracted distribution kernel package on which `depmod -b DIR REL` has been run: its
    /// modules go into the archive.
    #[arg(long, value_name = "DIR", requires = "kernel_release")]
    pub kernel_tree: Option<PathBuf>,
    /// Kernel release (the directory name under lib/modules).
    #[arg(long, value_name = "REL", requires = "kernel_tree")]
    pub kernel_release: Option<String>,
    /// Kernel module loaded by init before the real init starts (repeatable, in order).
    #[arg(long, value_name = "NAME", requires = "kernel_tree")]
    pub boot_module: Vec<String>,
    /// Kernel module only included, for cnfs-agent to load on demand (repeatable).
    #[arg(long, value_name = "NAME", requires = "kernel_tree")]
    pub module: Vec<String>,
    /// Where to write the archive.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Gzip the archive. Needed to append to a compressed initrd whose size is not a
    /// multiple of 4: the kernel looks for a plain cpio only at 4-byte aligned offsets.
    #[arg(long)]
    pub gzip: bool,
}

pub fn build_tree(args: &Args) -> Result<Tree> {
    // One `key=value` per line: a newline or blank in the path would break the file's format.
    if !args.then.starts_with('/') || args.then.chars().any(char::is_whitespace) {
        bail!(
            "--then {:?} must be an absolute path without blanks",
            args.then
        );
    }
    let agent = read_input(&args.agent, "--agent")?;
    let mut t = Tree::new();
    t.file("usr/bin/cnfs-agent", 0o755, agent.clone())?;
    t.file("init", 0o755, agent)?;
    // The kernel's NFSv4 owner upcall (id_resolver) runs /sbin/request-key: cnfs-agent
    // answers it (see guest-agent-ext/src/idmap.rs).
    t.symlink("sbin/request-key", "/usr/bin/cnfs-agent")?;
    let mut conf = format!("then={}\nargs=--vsock-port {}\n", args.then, args.port);
    if let (Some(tree), Some(rel)) = (&args.kernel_tree, &args.kernel_release) {
        let names: Vec<String> = args
            .boot_module
            .iter()
            .chain(&args.module)
            .cloned()
            .collect();
        modules::add_to_tree(&mut t, tree, rel, &names)?;
        if !args.boot_module.is_empty() {
            conf.push_str(&format!("modules={}\n", args.boot_module.join(" ")));
        }
    }
    t.file("etc/cnfs/init.conf", 0o644, conf.into_bytes())?;
    Ok(t)
}

/// Directories every Kata guest root has, as directories or (merged /usr, as in osbuilder's
/// Ubuntu roots) as links: the overlay never carries an entry for them, which would replace
/// such a link.
pub const BASE_DIRS: &[&str] = &[
    "bin", "sbin", "lib", "lib64", "etc", "usr", "usr/bin", "usr/sbin", "usr/lib",
];

pub fn build(args: &Args) -> Result<Vec<u8>> {
    let newc = build_tree(args)?.to_newc_over(BASE_DIRS)?;
    if args.gzip {
        gzip(&newc)
    } else {
        Ok(newc)
    }
}

pub fn run(args: &Args) -> Result<()> {
    write_output(&args.out, &build(args)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{gunzip, read_newc, TempDir};

    fn args(dir: &TempDir) -> Args {
        let agent = dir.path().join("agent");
        std::fs::write(&agent, b"agent binary").expect("agent");
        Args {
            agent,
            port: DEFAULT_AGENT_PORT,
            then: "/sbin/init".into(),
            out: dir.path().join("overlay.cpio"),
            gzip: false,
            kernel_tree: None,
            kernel_release: None,
            boot_module: vec![],
            module: vec![],
        }
    }

    #[test]
    fn overlay_entries_and_modes() {
        let dir = TempDir::new("overlay");
        let a = args(&dir);
        run(&a).expect("build");
        let entries = read_newc(&std::fs::read(&a.out).expect("out"));
        let got: Vec<(&str, u32)> = entries.iter().map(|e| (e.name.as_str(), e.mode)).collect();
        // No entry for a directory the base has (as a directory or a merged-/usr link).
        assert_eq!(
            got,
            [
                ("etc/cnfs", 0o040_755),
                ("etc/cnfs/init.conf", 0o100_644),
                ("init", 0o100_755),
                ("sbin/request-key", 0o120_777),
                ("usr/bin/cnfs-agent", 0o100_755),
            ]
        );
        assert_eq!(entries[3].data, b"/usr/bin/cnfs-agent");
        assert_eq!(
            entries[1].data, b"then=/sbin/init\nargs=--vsock-port 17230\n",
            "the default is where osbuilder's agent-as-init images have kata-agent"
        );
        assert_eq!(entries[2].data, b"agent binary");
        assert_eq!(entries[4].data, b"agent binary");
        assert!(entries
            .iter()
            .all(|e| e.uid == 0 && e.gid == 0 && e.mtime == 0));
    }

    #[test]
    fn gzip_variant_holds_the_same_archive() {
        let dir = TempDir::new("overlay-gz");
        let mut a = args(&dir);
        a.port = 999;
        a.then = "/sbin/other".into();
        let plain = build(&a).expect("plain");
        a.gzip = true;
        let gz = build(&a).expect("gzip");
        assert_eq!(gunzip(&gz), plain);
        assert_eq!(gz, build(&a).expect("again"), "reproducible");
        let entries = read_newc(&plain);
        assert_eq!(
            entries[1].data,
            b"then=/sbin/other\nargs=--vsock-port 999\n"
        );
    }

    #[test]
    fn with_a_kernel_tree_the_module_closure_and_boot_modules_are_carried() {
        let dir = TempDir::new("overlay-mods");
        let rel = "6.12.0-test-amd64";
        let mods = dir.path().join("kernel/lib/modules").join(rel);
        std::fs::create_dir_all(mods.join("kernel/n")).expect("mkdir");
        std::fs::write(mods.join("kernel/n/vsock.ko"), b"vsock").expect("w");
        std::fs::write(mods.join("kernel/n/vsock-virtio.ko"), b"transport").expect("w");
        std::fs::write(mods.join("kernel/n/nfsv4.ko"), b"nfs").expect("w");
        std::fs::write(mods.join("kernel/n/unused.ko"), b"unused").expect("w");
        std::fs::write(
            mods.join("modules.dep"),
            "kernel/n/vsock-virtio.ko: kernel/n/vsock.ko\nkernel/n/vsock.ko:\n\
             kernel/n/nfsv4.ko:\nkernel/n/unused.ko:\n",
        )
        .expect("dep");
        let mut a = args(&dir);
        a.kernel_tree = Some(dir.path().join("kernel"));
        a.kernel_release = Some(rel.into());
        a.boot_module = vec!["vsock_virtio".into()];
        a.module = vec!["nfsv4".into()];
        let entries = read_newc(&build(&a).expect("build"));
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        for want in [
            "lib/modules/6.12.0-test-amd64/kernel/n/vsock-virtio.ko",
            "lib/modules/6.12.0-test-amd64/kernel/n/vsock.ko",
            "lib/modules/6.12.0-test-amd64/kernel/n/nfsv4.ko",
            "lib/modules/6.12.0-test-amd64/modules.dep",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        assert!(!names.iter().any(|n| n.contains("unused")), "{names:?}");
        assert!(
            !names.contains(&"lib"),
            "a lib entry would replace lib -> usr/lib"
        );
        let conf = entries
            .iter()
            .find(|e| e.name == "etc/cnfs/init.conf")
            .expect("conf");
        assert_eq!(
            String::from_utf8_lossy(&conf.data),
            "then=/sbin/init\nargs=--vsock-port 17230\nmodules=vsock_virtio\n"
        );
        a.boot_module = vec!["nosuch".into()];
        let e = build(&a).expect_err("unknown module");
        assert!(format!("{e:#}").contains("nosuch"), "{e:#}");
    }

    #[test]
    fn bad_then_and_missing_agent_are_refused() {
        let dir = TempDir::new("overlay-bad");
        let mut a = args(&dir);
        a.then = "kata-agent".into();
        assert!(build(&a).is_err());
        a.then = "/usr/bin/kata agent".into();
        assert!(build(&a).is_err());
        a.then = "/usr/bin/kata-agent".into();
        a.agent = dir.path().join("missing-agent");
        let e = build(&a).expect_err("missing agent");
        assert!(format!("{e:#}").contains("missing-agent"), "{e:#}");
    }
}
