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
use crate::DEFAULT_AGENT_PORT;
use crate::{modules, tools};

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
    #[command(flatten)]
    pub tools: tools::Flags,
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
    let tool_sets = args.tools.sets();
    tools::add_to_tree(&mut t, &tool_sets)?;
    if let (Some(tree), Some(rel)) = (&args.kernel_tree, &args.kernel_release) {
        let mut names: Vec<String> = args
            .boot_module
            .iter()
            .chain(&args.module)
            .cloned()
            .collect();
        names.extend(tools::modules(&tool_sets));
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
    use std::collections::BTreeMap;

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
            tools: tools::Flags::default(),
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

    /// Entries of the overlay built from `a`, by name: (mode, data).
    fn entries_of(a: &Args) -> BTreeMap<String, (u32, Vec<u8>)> {
        read_newc(&build(a).expect("build"))
            .into_iter()
            .map(|e| (e.name, (e.mode, e.data)))
            .collect()
    }

    fn with_luks2_kernel(dir: &TempDir, a: &mut Args) {
        let rel = "6.12.0-test-amd64";
        a.kernel_tree = Some(tools::testing::kernel_tree(
            &dir.path().join("kernel"),
            rel,
            &[],
        ));
        a.kernel_release = Some(rel.into());
    }

    #[test]
    fn luks2_tools_land_under_the_private_prefix_with_their_loader() {
        let dir = TempDir::new("overlay-luks2");
        let mut a = args(&dir);
        with_luks2_kernel(&dir, &mut a);
        let without = entries_of(&a);
        a.tools.luks2_tools = true;
        let with = entries_of(&a);
        let host = |p: &str| std::fs::read(p).unwrap_or_else(|e| panic!("reading {p}: {e}"));
        let p = "usr/lib/cnfs/tools";
        for (name, mode, source) in [
            ("bin/cryptsetup", 0o100_755, "/usr/sbin/cryptsetup"),
            ("bin/mke2fs", 0o100_755, "/usr/sbin/mke2fs"),
            (
                "lib/ld-linux-x86-64.so.2",
                0o100_755,
                "/lib64/ld-linux-x86-64.so.2",
            ),
        ] {
            let (m, data) = &with[&format!("{p}/{name}")];
            assert_eq!(*m, mode, "{name}");
            assert!(*data == host(source), "{name} holds {source}");
        }
        for lib in [
            "libcryptsetup.so.12",
            "libext2fs.so.2",
            "libc.so.6",
            "libcrypto.so.3",
        ] {
            let (m, data) = &with[&format!("{p}/lib/{lib}")];
            assert_eq!(m & 0o170_000, 0o100_000, "{lib} is a regular file");
            assert!(!data.is_empty(), "{lib}");
        }
        // Everything the flag adds is under the prefix, or a module.
        let added: Vec<&String> = with.keys().filter(|n| !without.contains_key(*n)).collect();
        let stray: Vec<&&String> = added
            .iter()
            .filter(|n| !(n.starts_with(&format!("{p}/")) || n.starts_with("lib/modules/")))
            .filter(|n| !["usr/lib/cnfs", p].contains(&n.as_str()))
            .collect();
        assert_eq!(stray, Vec::<&&String>::new());
        // And nothing that was there changed, modules.dep aside (it lists the new modules).
        for (name, entry) in &without {
            if !name.ends_with("/modules.dep") {
                assert_eq!(with.get(name), Some(entry), "{name}");
            }
        }
    }

    #[test]
    fn the_overlay_with_luks2_tools_leaves_the_images_lib_untouched() {
        let dir = TempDir::new("overlay-luks2-lib");
        let mut a = args(&dir);
        a.tools.luks2_tools = true;
        let with = entries_of(&a);
        // No entry at the loader's own paths or for a base directory, which would replace
        // the image's libc or its `lib -> usr/lib` link.
        assert_eq!(touching_the_images_lib(&with), Vec::<&String>::new());
        assert!(with.contains_key("usr/lib/cnfs/tools/lib/libc.so.6"));
        // Without --kernel-tree (Kata's kernel has dm-crypt built in) no module is shipped.
        assert!(
            !with.keys().any(|n| n.contains("modules")),
            "{:?}",
            with.keys()
        );
    }

    #[test]
    fn luks2_tools_ship_the_dm_crypt_module_closure_with_a_kernel_tree() {
        let dir = TempDir::new("overlay-luks2-mods");
        let mut a = args(&dir);
        with_luks2_kernel(&dir, &mut a);
        a.tools.luks2_tools = true;
        let with = entries_of(&a);
        let m = "lib/modules/6.12.0-test-amd64";
        for f in tools::testing::MODULE_FILES {
            assert!(
                with.contains_key(&format!("{m}/{f}")),
                "{f}: {:?}",
                with.keys()
            );
        }
        assert!(!with.keys().any(|n| n.contains("dm-zero")));
        let dep = String::from_utf8_lossy(&with[&format!("{m}/modules.dep")].1).into_owned();
        assert!(
            dep.contains("kernel/drivers/md/dm-crypt.ko: kernel/drivers/md/dm-mod.ko\n"),
            "{dep}"
        );
        // Loaded on demand by the agent, not at boot.
        let conf = String::from_utf8_lossy(&with["etc/cnfs/init.conf"].1).into_owned();
        assert!(!conf.contains("modules="), "{conf}");
    }

    /// Entry names that would replace the image's loader, libc or a base directory link.
    fn touching_the_images_lib(with: &BTreeMap<String, (u32, Vec<u8>)>) -> Vec<&String> {
        with.keys()
            .filter(|n| {
                ["lib", "lib64", "usr/lib", "usr/lib64"].contains(&n.as_str())
                    || n.starts_with("lib/")
                    || n.starts_with("lib64/")
                    || n.starts_with("usr/lib/x86_64-linux-gnu")
            })
            .collect()
    }

    /// A kernel tree as Debian's 6.12 cloud kernel has FUSE: built in.
    fn with_gocryptfs_kernel(dir: &TempDir, a: &mut Args) {
        with_luks2_kernel(dir, a);
        tools::testing::with_fuse_built_in(
            a.kernel_tree.as_deref().expect("tree"),
            a.kernel_release.as_deref().expect("release"),
        );
    }

    #[test]
    fn gocryptfs_tools_add_only_their_program_beside_the_luks2_tools() {
        let dir = TempDir::new("overlay-gocryptfs");
        let mut a = args(&dir);
        with_gocryptfs_kernel(&dir, &mut a);
        let without = entries_of(&a);
        let p = "usr/lib/cnfs/tools";
        let added = |with: &BTreeMap<String, (u32, Vec<u8>)>| -> Vec<String> {
            with.keys()
                .filter(|n| !without.contains_key(*n))
                .cloned()
                .collect()
        };
        let host = |p: &str| std::fs::read(p).unwrap_or_else(|e| panic!("reading {p}: {e}"));

        // Alone: the program, the loader, libcrypto and libc under the prefix; FUSE is built
        // into this kernel, so no module.
        a.tools.gocryptfs_tools = true;
        let alone = entries_of(&a);
        assert_eq!(
            added(&alone),
            [
                "usr/lib/cnfs",
                p,
                &format!("{p}/bin"),
                &format!("{p}/bin/gocryptfs"),
                &format!("{p}/lib"),
                &format!("{p}/lib/ld-linux-x86-64.so.2"),
                &format!("{p}/lib/libc.so.6"),
                &format!("{p}/lib/libcrypto.so.3"),
            ]
        );
        let (m, data) = &alone[&format!("{p}/bin/gocryptfs")];
        assert_eq!(*m, 0o100_755);
        assert!(*data == host("/usr/bin/gocryptfs"), "bin/gocryptfs");
        let (m, data) = &alone[&format!("{p}/lib/ld-linux-x86-64.so.2")];
        assert_eq!(*m, 0o100_755, "the runner execs the loader");
        assert!(*data == host("/lib64/ld-linux-x86-64.so.2"));

        // With --luks2-tools: one prefix, and gocryptfs adds only its program to it.
        a.tools.luks2_tools = true;
        let both = entries_of(&a);
        a.tools.gocryptfs_tools = false;
        let luks2 = entries_of(&a);
        let extra: Vec<&String> = both.keys().filter(|n| !luks2.contains_key(*n)).collect();
        assert_eq!(extra, [&format!("{p}/bin/gocryptfs")]);
        for (name, entry) in &luks2 {
            assert_eq!(both.get(name), Some(entry), "{name}");
        }
        // modules.dep aside: it lists the LUKS2 modules in `both`.
        for (name, entry) in alone.iter().filter(|(n, _)| !n.ends_with("/modules.dep")) {
            assert_eq!(both.get(name), Some(entry), "{name}");
        }
    }

    #[test]
    fn the_overlay_with_gocryptfs_tools_leaves_the_images_lib_untouched() {
        let dir = TempDir::new("overlay-gocryptfs-lib");
        let mut a = args(&dir);
        for luks2 in [false, true] {
            a.tools.luks2_tools = luks2;
            a.tools.gocryptfs_tools = true;
            let with = entries_of(&a);
            assert_eq!(touching_the_images_lib(&with), Vec::<&String>::new());
            assert!(with.contains_key("usr/lib/cnfs/tools/bin/gocryptfs"));
            assert!(with.contains_key("usr/lib/cnfs/tools/lib/libcrypto.so.3"));
            assert!(!with.keys().any(|n| n.contains("modules")), "{luks2}");
        }
    }

    #[test]
    fn gocryptfs_tools_ship_fuse_only_where_the_kernel_has_it_as_a_module() {
        let dir = TempDir::new("overlay-gocryptfs-mods");
        let rel = "6.12.0-test-amd64";
        let m = format!("lib/modules/{rel}");
        let mut a = args(&dir);
        a.kernel_release = Some(rel.into());
        a.tools.gocryptfs_tools = true;

        // A module: fuse.ko and its modules.dep line, loaded on demand.
        a.kernel_tree = Some(tools::testing::kernel_tree(
            &dir.path().join("modular"),
            rel,
            &[tools::testing::FUSE_MODULE],
        ));
        let with = entries_of(&a);
        assert!(with.contains_key(&format!("{m}/kernel/fs/fuse/fuse.ko")));
        let dep = String::from_utf8_lossy(&with[&format!("{m}/modules.dep")].1).into_owned();
        assert_eq!(dep, "kernel/fs/fuse/fuse.ko:\n");
        let conf = String::from_utf8_lossy(&with["etc/cnfs/init.conf"].1).into_owned();
        assert!(!conf.contains("modules="), "{conf}");

        // Built in: nothing to copy, and no error.
        with_gocryptfs_kernel(&dir, &mut a);
        let with = entries_of(&a);
        assert!(
            !with.keys().any(|n| n.contains("fuse")),
            "{:?}",
            with.keys()
        );

        // Neither: the build stops naming the module.
        a.kernel_tree = Some(tools::testing::kernel_tree(
            &dir.path().join("no-fuse"),
            rel,
            &[],
        ));
        let e = format!("{:#}", build(&a).expect_err("no fuse"));
        assert!(e.contains("kernel module \"fuse\""), "{e}");
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
