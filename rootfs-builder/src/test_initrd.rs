//! `test-initrd`: a small bootable guest (busybox, the agent, extra services and the kernel
//! modules they need) as a gzip'ed newc cpio, for testing the agent in a plain VM.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};

use crate::archive::{gzip, read_input, write_output, Tree};
use crate::elf_closure::{self, LoaderFile, SearchPath};
use crate::{modules, tools};

const INIT: &str = include_str!("test-init.sh");
const AGENT: &str = "cnfs-agent";

/// `--service NAME=PATH`: a program installed as `/usr/bin/NAME` and started by init.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub path: PathBuf,
}

/// Names become file names and words in init's `for` loop: keep them plain.
pub fn parse_service(s: &str) -> Result<Service, String> {
    let (name, path) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=PATH"))?;
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    if name.is_empty() || name.starts_with('.') || !name.chars().all(plain) {
        return Err(format!(
            "service name {name:?}: use letters, digits, `_`, `-` and `.` only"
        ));
    }
    if path.is_empty() {
        return Err(format!("service {name:?}: empty PATH"));
    }
    Ok(Service {
        name: name.to_string(),
        path: PathBuf::from(path),
    })
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Extracted Debian kernel package on which `depmod -b DIR REL` has been run.
    #[arg(long, value_name = "DIR")]
    pub kernel_tree: PathBuf,
    /// Kernel release (the directory name under lib/modules).
    #[arg(long, value_name = "REL")]
    pub kernel_release: String,
    /// The cnfs-agent binary (installed as /usr/bin/cnfs-agent, always started first).
    #[arg(long, value_name = "PATH")]
    pub agent: PathBuf,
    /// A statically linked busybox (installed as /bin/busybox).
    #[arg(long, value_name = "PATH")]
    pub busybox: PathBuf,
    /// Extra program started by init, installed as /usr/bin/NAME (repeatable, in order).
    #[arg(long, value_name = "NAME=PATH", value_parser = parse_service)]
    pub service: Vec<Service>,
    /// Extra program installed as /usr/bin/NAME and not started (repeatable).
    #[arg(long, value_name = "NAME=PATH", value_parser = parse_service)]
    pub program: Vec<Service>,
    /// A host program installed at its own path with the interpreter and shared libraries its
    /// dynamic loader needs, where the loader looks them up (repeatable).
    #[arg(long, value_name = "PATH")]
    pub binary: Vec<PathBuf>,
    /// Kernel module loaded by init at boot (repeatable, loaded in order).
    #[arg(long, value_name = "NAME")]
    pub boot_module: Vec<String>,
    /// Kernel module only included, for the agent to load on demand (repeatable).
    #[arg(long, value_name = "NAME")]
    pub module: Vec<String>,
    #[command(flatten)]
    pub tools: tools::Flags,
    /// Where to write the gzip'ed cpio.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

fn lines<'a>(items: impl IntoIterator<Item = &'a str>) -> Vec<u8> {
    items
        .into_iter()
        .flat_map(|s| [s, "\n"])
        .collect::<String>()
        .into_bytes()
}

/// The uncompressed archive.
pub fn build_tree(args: &Args) -> Result<Tree> {
    let rel = &args.kernel_release;
    let mut t = Tree::new();
    for d in [
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "etc",
        "etc/cnfs",
        "lib",
        "lib/modules",
        "proc",
        "sys",
        "dev",
        "run",
        "root",
    ] {
        t.dir(d, 0o755)?;
    }
    t.dir("tmp", 0o1777)?;
    // The kernel opens /dev/console for init before anything mounts devtmpfs.
    t.char_dev("dev/console", 0o600, 5, 1)?;
    t.file("init", 0o755, INIT.as_bytes().to_vec())?;
    t.file(
        "bin/busybox",
        0o755,
        read_input(&args.busybox, "--busybox")?,
    )?;
    t.file(
        &format!("usr/bin/{AGENT}"),
        0o755,
        read_input(&args.agent, "--agent")?,
    )?;
    // The NFSv4 owner upcall helper, as in the Kata overlay.
    t.symlink("sbin/request-key", &format!("/usr/bin/{AGENT}"))?;
    let installed = args.service.iter().map(|s| ("--service", s));
    for (flag, s) in installed.chain(args.program.iter().map(|p| ("--program", p))) {
        if s.name == AGENT {
            bail!("{flag} {AGENT}: the agent is always installed, from --agent");
        }
        let data = read_input(&s.path, &format!("{flag} {}", s.name))?;
        t.file(&format!("usr/bin/{}", s.name), 0o755, data)
            .with_context(|| format!("{flag} {}", s.name))?;
    }
    add_binaries(&mut t, &args.binary)?;
    let tool_sets = args.tools.sets();
    tools::add_to_tree(&mut t, &tool_sets)?;
    let services = std::iter::once(AGENT).chain(args.service.iter().map(|s| s.name.as_str()));
    t.file("etc/cnfs/services", 0o644, lines(services))?;
    t.file(
        "etc/cnfs/boot-modules",
        0o644,
        lines(args.boot_module.iter().map(String::as_str)),
    )?;

    let mut names: Vec<String> = args
        .boot_module
        .iter()
        .chain(&args.module)
        .cloned()
        .collect();
    names.extend(tools::modules(&tool_sets));
    modules::add_to_tree(&mut t, &args.kernel_tree, rel, &names)?;
    Ok(t)
}

/// `--binary` programs and their loader closures; a library several programs need goes in once.
fn add_binaries(t: &mut Tree, programs: &[PathBuf]) -> Result<()> {
    if programs.is_empty() {
        return Ok(());
    }
    let search = SearchPath::host()?;
    let mut files: BTreeMap<PathBuf, (LoaderFile, &PathBuf)> = BTreeMap::new();
    for program in programs {
        let closure = elf_closure::closure(program, &search)
            .with_context(|| format!("--binary {}", program.display()))?;
        for f in closure {
            match files.get(&f.guest_path) {
                Some((prev, by)) if prev.source != f.source || prev.role != f.role => bail!(
                    "--binary {} and --binary {} both need {} but from {} and {}",
                    by.display(),
                    program.display(),
                    f.guest_path.display(),
                    prev.source.display(),
                    f.source.display()
                ),
                Some(_) => {}
                None => {
                    files.insert(f.guest_path.clone(), (f, program));
                }
            }
        }
    }
    for (f, program) in files.values() {
        let what = format!("--binary {}", program.display());
        let data = read_input(&f.source, &what)?;
        t.file(f.archive_path()?, f.mode, data)
            .with_context(|| what.clone())?;
    }
    Ok(())
}

pub fn build(args: &Args) -> Result<Vec<u8>> {
    gzip(&build_tree(args)?.to_newc()?)
}

pub fn run(args: &Args) -> Result<()> {
    write_output(&args.out, &build(args)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{gunzip, read_newc, Entry, TempDir};

    const REL: &str = "6.12.0-test-amd64";
    const X_KO: &[u8] = b"\x7fELF x module, compressed in the tree";
    const Y_KO: &[u8] = b"\x7fELF y module";

    /// A kernel tree with x (xz, needs y), y (plain), z (unrelated) and a builtin ext4.
    fn fake_tree(dir: &TempDir) -> (PathBuf, Args) {
        let tree = dir.path().join("kernel");
        let mods = tree.join("lib/modules").join(REL);
        std::fs::create_dir_all(mods.join("kernel/a")).expect("mkdir");
        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut &X_KO[..], &mut xz).expect("xz");
        std::fs::write(mods.join("kernel/a/x.ko.xz"), xz).expect("x");
        std::fs::write(mods.join("kernel/a/y.ko"), Y_KO).expect("y");
        std::fs::write(mods.join("kernel/a/z-mod.ko"), b"z").expect("z");
        std::fs::write(
            mods.join("modules.dep"),
            "kernel/a/x.ko.xz: kernel/a/y.ko\nkernel/a/y.ko:\nkernel/a/z-mod.ko:\n",
        )
        .expect("dep");
        std::fs::write(mods.join("modules.builtin"), "kernel/fs/ext4/ext4.ko\n").expect("b");
        let agent = dir.path().join("agent");
        let busybox = dir.path().join("busybox");
        let helper = dir.path().join("helper");
        std::fs::write(&agent, b"agent binary").expect("agent");
        std::fs::write(&busybox, b"busybox binary").expect("busybox");
        std::fs::write(&helper, b"helper binary").expect("helper");
        let out = dir.path().join("initrd.gz");
        let args = Args {
            kernel_tree: tree.clone(),
            kernel_release: REL.to_string(),
            agent,
            busybox,
            service: vec![Service {
                name: "helper".into(),
                path: helper.clone(),
            }],
            program: vec![Service {
                name: "tool".into(),
                path: helper,
            }],
            binary: Vec::new(),
            boot_module: vec!["x".into(), "ext4".into()],
            module: Vec::new(),
            tools: tools::Flags::default(),
            out,
        };
        (tree, args)
    }

    fn entry<'a>(entries: &'a [Entry], name: &str) -> &'a Entry {
        entries
            .iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("{name} missing from the archive"))
    }

    #[test]
    fn initrd_holds_closure_init_and_services() {
        let dir = TempDir::new("initrd");
        let (_, args) = fake_tree(&dir);
        run(&args).expect("build");
        let bytes = std::fs::read(&args.out).expect("read out");
        let entries = read_newc(&gunzip(&bytes));
        let m = format!("lib/modules/{REL}");

        let x = entry(&entries, &format!("{m}/kernel/a/x.ko"));
        assert_eq!(x.data, X_KO, "x.ko is stored decompressed");
        assert_eq!(x.mode, 0o100_644);
        assert_eq!(entry(&entries, &format!("{m}/kernel/a/y.ko")).data, Y_KO);
        assert!(entries.iter().all(|e| !e.name.contains("z-mod")));
        assert!(entries.iter().all(|e| !e.name.ends_with(".xz")));
        assert_eq!(
            entry(&entries, &format!("{m}/modules.dep")).data,
            b"kernel/a/x.ko: kernel/a/y.ko\nkernel/a/y.ko:\n"
        );
        assert_eq!(
            entry(&entries, &format!("{m}/modules.builtin")).data,
            b"kernel/fs/ext4/ext4.ko\n"
        );

        let init = entry(&entries, "init");
        assert_eq!(init.data, INIT.as_bytes());
        assert_eq!(init.mode, 0o100_755);
        assert!(init.data.starts_with(b"#!/bin/busybox sh\n"));
        assert_eq!(entry(&entries, "bin/busybox").data, b"busybox binary");
        assert_eq!(entry(&entries, "bin/busybox").mode, 0o100_755);
        assert_eq!(entry(&entries, "usr/bin/cnfs-agent").data, b"agent binary");
        assert_eq!(entry(&entries, "usr/bin/cnfs-agent").mode, 0o100_755);
        assert_eq!(entry(&entries, "usr/bin/helper").data, b"helper binary");
        // A --program is installed like a service but init does not start it.
        assert_eq!(entry(&entries, "usr/bin/tool").data, b"helper binary");
        assert_eq!(entry(&entries, "usr/bin/tool").mode, 0o100_755);
        assert_eq!(
            entry(&entries, "etc/cnfs/services").data,
            b"cnfs-agent\nhelper\n"
        );
        assert_eq!(entry(&entries, "etc/cnfs/boot-modules").data, b"x\next4\n");

        let console = entry(&entries, "dev/console");
        assert_eq!(console.mode, 0o020_600);
        assert_eq!((console.rdev_major, console.rdev_minor), (5, 1));
        assert_eq!(entry(&entries, "tmp").mode, 0o041_777);
        for d in [
            "bin",
            "sbin",
            "usr/sbin",
            "proc",
            "sys",
            "run",
            "root",
            "lib/modules",
        ] {
            assert_eq!(entry(&entries, d).mode, 0o040_755, "{d}");
        }
        // parents come before children
        for (i, e) in entries.iter().enumerate() {
            if let Some((parent, _)) = e.name.rsplit_once('/') {
                let p = entries.iter().position(|p| p.name == parent);
                assert!(p.is_some_and(|p| p < i), "{} before its parent", e.name);
            }
        }
    }

    #[test]
    fn initrd_is_reproducible() {
        let dir = TempDir::new("initrd-repro");
        let (_, args) = fake_tree(&dir);
        let a = build(&args).expect("first");
        let b = build(&args).expect("second");
        assert_eq!(a, b);
        assert_eq!(&a[4..8], &[0, 0, 0, 0], "gzip mtime");
    }

    #[test]
    fn module_only_flag_includes_without_boot_loading() {
        let dir = TempDir::new("initrd-module");
        let (_, mut args) = fake_tree(&dir);
        args.boot_module.clear();
        args.module = vec!["z_mod".into()];
        let entries = read_newc(&gunzip(&build(&args).expect("build")));
        assert_eq!(entry(&entries, "etc/cnfs/boot-modules").data, b"");
        let m = format!("lib/modules/{REL}");
        assert_eq!(
            entry(&entries, &format!("{m}/kernel/a/z-mod.ko")).data,
            b"z"
        );
        assert!(entries.iter().all(|e| !e.name.ends_with("x.ko")));
    }

    #[test]
    fn unknown_module_is_named_in_the_error() {
        let dir = TempDir::new("initrd-unknown");
        let (_, mut args) = fake_tree(&dir);
        args.module = vec!["nosuchmod".into()];
        let e = build(&args).expect_err("unknown module");
        assert!(format!("{e:#}").contains("nosuchmod"), "{e:#}");
    }

    #[test]
    fn missing_inputs_and_bad_names_are_refused() {
        let dir = TempDir::new("initrd-bad");
        let (_, mut args) = fake_tree(&dir);
        args.service.push(Service {
            name: "cnfs-agent".into(),
            path: args.agent.clone(),
        });
        assert!(build(&args).is_err());
        args.service.clear();
        args.busybox = dir.path().join("no-busybox");
        let e = build(&args).expect_err("missing busybox");
        assert!(format!("{e:#}").contains("no-busybox"), "{e:#}");
        args.kernel_release = "../x".into();
        assert!(build(&args).is_err());
    }

    #[test]
    fn binary_closure_lands_at_loader_paths_with_modes() {
        let dir = TempDir::new("initrd-binary");
        let (_, mut args) = fake_tree(&dir);
        // Two programs sharing libc: it goes in once.
        args.binary = vec!["/bin/ls".into(), "/bin/cat".into()];
        let entries = read_newc(&gunzip(&build(&args).expect("build")));
        let host = |p: &str| std::fs::read(p).unwrap_or_else(|e| panic!("reading {p}: {e}"));
        let ls = entry(&entries, "bin/ls");
        assert_eq!(ls.mode, 0o100_755);
        assert_eq!(ls.data, host("/bin/ls"));
        assert_eq!(entry(&entries, "bin/cat").data, host("/bin/cat"));
        // At exactly PT_INTERP, a regular file with the real file's content.
        let interp = entry(&entries, "lib64/ld-linux-x86-64.so.2");
        assert_eq!(interp.mode, 0o100_755);
        assert_eq!(interp.data, host("/lib64/ld-linux-x86-64.so.2"));
        assert_eq!(entry(&entries, "lib64").mode, 0o040_755);
        let libc = entry(&entries, "lib/x86_64-linux-gnu/libc.so.6");
        assert_eq!(libc.data, host("/lib/x86_64-linux-gnu/libc.so.6"));
        let libc_mode = std::fs::metadata("/lib/x86_64-linux-gnu/libc.so.6")
            .expect("libc")
            .permissions();
        assert_eq!(
            libc.mode,
            0o100_000 | (std::os::unix::fs::PermissionsExt::mode(&libc_mode) & 0o777)
        );
        assert_eq!(
            entry(&entries, "lib/x86_64-linux-gnu/libselinux.so.1").mode & 0o170_000,
            0o100_000
        );
        // /lib stays the directory the modules are in.
        assert_eq!(entry(&entries, "lib").mode, 0o040_755);
        assert_eq!(entry(&entries, "lib/modules").mode, 0o040_755);
        entry(&entries, &format!("lib/modules/{REL}/modules.dep"));
        assert_eq!(entry(&entries, "bin/busybox").data, b"busybox binary");
    }

    #[test]
    fn luks2_tools_and_their_modules_go_into_the_test_initrd_beside_binary_closures() {
        let dir = TempDir::new("initrd-luks2");
        let (_, mut args) = fake_tree(&dir);
        args.kernel_tree = tools::testing::kernel_tree(
            &dir.path().join("luks2-kernel"),
            REL,
            &["kernel/a/x.ko: kernel/a/y.ko", "kernel/a/y.ko:"],
        );
        // sshfs-like: a --binary closure at the loader's paths, next to the prefix's own.
        args.binary = vec!["/bin/ls".into()];
        args.tools.luks2_tools = true;
        let entries = read_newc(&build_tree(&args).expect("build").to_newc().expect("newc"));
        let m = format!("lib/modules/{REL}");
        for f in tools::testing::MODULE_FILES {
            entry(&entries, &format!("{m}/{f}"));
        }
        assert!(entries.iter().all(|e| !e.name.contains("dm-zero")));
        let p = "usr/lib/cnfs/tools";
        for f in ["bin/cryptsetup", "bin/mke2fs", "lib/ld-linux-x86-64.so.2"] {
            assert_eq!(entry(&entries, &format!("{p}/{f}")).mode, 0o100_755, "{f}");
        }
        entry(&entries, &format!("{p}/lib/libcryptsetup.so.12"));
        // Two copies of libc, each where its own loader looks.
        let host_libc = std::fs::read("/lib/x86_64-linux-gnu/libc.so.6").expect("libc");
        assert_eq!(
            entry(&entries, &format!("{p}/lib/libc.so.6")).data,
            host_libc
        );
        assert_eq!(
            entry(&entries, "lib/x86_64-linux-gnu/libc.so.6").data,
            host_libc
        );
        // The boot modules and the loop-free ones are still there.
        assert_eq!(entry(&entries, "etc/cnfs/boot-modules").data, b"x\next4\n");
    }

    #[test]
    fn gocryptfs_tools_and_fuse_go_into_the_test_initrd_beside_the_luks2_tools() {
        let dir = TempDir::new("initrd-gocryptfs");
        let (_, mut args) = fake_tree(&dir);
        args.kernel_tree = tools::testing::kernel_tree(
            &dir.path().join("fuse-kernel"),
            REL,
            &[
                "kernel/a/x.ko: kernel/a/y.ko",
                "kernel/a/y.ko:",
                tools::testing::FUSE_MODULE,
            ],
        );
        args.tools.luks2_tools = true;
        args.tools.gocryptfs_tools = true;
        let entries = read_newc(&build_tree(&args).expect("build").to_newc().expect("newc"));
        let p = "usr/lib/cnfs/tools";
        let gocryptfs = entry(&entries, &format!("{p}/bin/gocryptfs"));
        assert_eq!(gocryptfs.mode, 0o100_755);
        assert_eq!(
            gocryptfs.data,
            std::fs::read("/usr/bin/gocryptfs").expect("host gocryptfs")
        );
        entry(&entries, &format!("{p}/bin/cryptsetup"));
        entry(&entries, &format!("{p}/lib/libcrypto.so.3"));
        // One prefix lib: each name once (the archive refuses a second entry anyway).
        let libs: Vec<&str> = entries
            .iter()
            .filter_map(|e| e.name.strip_prefix(&format!("{p}/lib/")))
            .collect();
        assert_eq!(
            libs.iter().filter(|l| **l == "libcrypto.so.3").count(),
            1,
            "{libs:?}"
        );
        // fuse is a module here, loaded by the agent on demand, not at boot.
        let m = format!("lib/modules/{REL}");
        entry(&entries, &format!("{m}/kernel/fs/fuse/fuse.ko"));
        for f in tools::testing::MODULE_FILES {
            entry(&entries, &format!("{m}/{f}"));
        }
        assert_eq!(entry(&entries, "etc/cnfs/boot-modules").data, b"x\next4\n");
        // Nothing at the loader's own paths without --binary.
        assert!(
            entries
                .iter()
                .all(|e| !e.name.starts_with("lib/x86_64-linux-gnu") && e.name != "lib64"),
            "the prefix's libraries stay under it"
        );
    }

    #[test]
    fn binary_clashing_with_an_initrd_file_is_refused() {
        let dir = TempDir::new("initrd-binary-clash");
        let (_, mut args) = fake_tree(&dir);
        args.binary = vec!["/bin/busybox".into()];
        let e = format!("{:#}", build(&args).expect_err("bin/busybox twice"));
        assert_eq!(
            e,
            "--binary /bin/busybox: archive path \"bin/busybox\" is added twice"
        );
    }

    #[test]
    fn service_flag_parsing() {
        assert_eq!(
            parse_service("nfsd-helper=/tmp/h"),
            Ok(Service {
                name: "nfsd-helper".into(),
                path: PathBuf::from("/tmp/h")
            })
        );
        for bad in [
            "noequals", "=/x", "a b=/x", "a/b=/x", "x=", "$(x)=/y", "..=/x",
        ] {
            assert!(parse_service(bad).is_err(), "{bad:?}");
        }
    }
}
