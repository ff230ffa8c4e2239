//! `--luks2-tools` and `--gocryptfs-tools`: programs of the build host (Debian) with their
//! loader closure under the private prefix `/usr/lib/cnfs/tools`, and the kernel modules of
//! the volumes they serve. LUKS2 (docs/design/encryption-luks2.md §1.1, §1.5, §2.1):
//! cryptsetup and mke2fs, and the loop/dm-crypt stack. gocryptfs: the gocryptfs daemon, and
//! FUSE.
//!
//! Why a prefix rather than the loader's own paths: `initrd-overlay` is appended with `cat`
//! and a later cpio entry replaces an earlier one, and `kata-rootfs` writes into the image's
//! root, so Debian's libc at `/lib/x86_64-linux-gnu/libc.so.6` would replace the image's own.
//! Under the prefix nothing of the image is touched. The agent's tool runner starts a tool as
//! `<prefix>/lib/ld-linux-x86-64.so.2 --inhibit-cache --library-path <prefix>/lib --argv0 NAME
//! <prefix>/bin/NAME ARGS`.
//!
//! Every set asked for shares `<prefix>/lib`: a library several tools need goes in once, and
//! two different files for one path are refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

use crate::archive::{read_input, Tree};
use crate::elf_closure::{self, LoaderFile, Role, SearchPath};

/// Where the tools go in the guest.
pub const PREFIX: &str = "/usr/lib/cnfs/tools";

/// The loader's file name in `<prefix>/lib`, the path the agent execs.
pub const LOADER: &str = "ld-linux-x86-64.so.2";

/// A host program to ship and the Debian package that has it.
#[derive(Debug, Clone, Copy)]
pub struct Tool<'a> {
    pub path: &'a str,
    pub package: &'a str,
}

/// What one flag adds: programs, and the modules their volumes need (with their
/// dependencies from modules.dep; a module built into the kernel is fine, nothing is copied).
#[derive(Debug, Clone, Copy)]
pub struct ToolSet<'a> {
    /// The flag, named in every error about the set.
    pub flag: &'a str,
    pub tools: &'a [Tool<'a>],
    pub modules: &'a [&'a str],
}

/// LUKS2 volumes (Debian 12: cryptsetup 2.6.1, e2fsprogs 1.47.0). Modules: the loop device,
/// device mapper and dm-crypt, the xts template and the AES-NI cipher (without it xts runs
/// over aes-generic). ext4 is built into Debian's kernels.
pub const LUKS2: ToolSet<'static> = ToolSet {
    flag: "--luks2-tools",
    tools: &[
        Tool {
            path: "/usr/sbin/cryptsetup",
            package: "cryptsetup-bin",
        },
        Tool {
            path: "/usr/sbin/mke2fs",
            package: "e2fsprogs",
        },
    ],
    modules: &["loop", "dm-mod", "dm-crypt", "xts", "aesni-intel"],
};

/// gocryptfs volumes (Debian 12: gocryptfs 2.3). FUSE is built into Debian's 6.12 cloud
/// kernel and Kata's (virtio-fs needs it); a kernel with it as a module gets fuse.ko.
pub const GOCRYPTFS: ToolSet<'static> = ToolSet {
    flag: "--gocryptfs-tools",
    tools: &[Tool {
        path: "/usr/bin/gocryptfs",
        package: "gocryptfs",
    }],
    modules: &["fuse"],
};

/// The tool flags every image mode takes.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Flags {
    /// This host's cryptsetup and mke2fs (Debian packages cryptsetup-bin and e2fsprogs)
    /// with their loader and libraries under /usr/lib/cnfs/tools (nothing of the image's own
    /// /lib is replaced), and with a kernel tree the modules of LUKS2 volumes (loop,
    /// dm-crypt, xts, aesni-intel and their dependencies; Kata's own kernel has them built in).
    #[arg(long)]
    pub luks2_tools: bool,
    /// This host's gocryptfs (Debian package gocryptfs) with its loader and libraries under
    /// /usr/lib/cnfs/tools (one copy of each library shared with --luks2-tools), and with a
    /// kernel tree the fuse module if the kernel does not have FUSE built in.
    #[arg(long)]
    pub gocryptfs_tools: bool,
}

impl Flags {
    /// The sets asked for.
    pub fn sets(&self) -> Vec<ToolSet<'static>> {
        [(self.luks2_tools, LUKS2), (self.gocryptfs_tools, GOCRYPTFS)]
            .into_iter()
            .filter_map(|(on, set)| on.then_some(set))
            .collect()
    }
}

/// The closures of every tool of `sets` under [`PREFIX`], in guest path order, each with the
/// flag that asked for it first.
pub fn files<'a>(sets: &[ToolSet<'a>], search: &SearchPath) -> Result<Vec<(LoaderFile, &'a str)>> {
    let loader = Path::new(PREFIX).join("lib").join(LOADER);
    // guest path -> (file, flag, tool): the tool that brought it in, for a clash's message.
    let mut files: BTreeMap<PathBuf, (LoaderFile, &'a str, &'a str)> = BTreeMap::new();
    for set in sets {
        let flag = set.flag;
        for tool in set.tools {
            let path = Path::new(tool.path);
            check_present(flag, tool)?;
            let closure = elf_closure::closure_into_prefix(path, search, Path::new(PREFIX))
                .with_context(|| format!("{flag}: {}", tool.path))?;
            if let Some(interp) = closure.iter().find(|f| f.role == Role::Interpreter) {
                if interp.guest_path != loader {
                    bail!(
                        "{flag}: {}: its interpreter {} would be {}, but the agent runs the \
                         tools through {}",
                        tool.path,
                        interp.source.display(),
                        interp.guest_path.display(),
                        loader.display()
                    );
                }
            }
            for f in closure {
                match files.get(&f.guest_path) {
                    Some((prev, by_flag, by)) if prev.source != f.source || prev.role != f.role => {
                        bail!(
                            "{by_flag} {by} and {flag} {} both need {} but from {} and {}",
                            tool.path,
                            f.guest_path.display(),
                            prev.source.display(),
                            f.source.display()
                        )
                    }
                    Some(_) => {}
                    None => {
                        files.insert(f.guest_path.clone(), (f, flag, tool.path));
                    }
                }
            }
        }
    }
    Ok(files.into_values().map(|(f, flag, _)| (f, flag)).collect())
}

/// A missing program is most likely an uninstalled package: say which.
fn check_present(flag: &str, tool: &Tool<'_>) -> Result<()> {
    match std::fs::metadata(tool.path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => bail!("{flag}: {} is not a regular file", tool.path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "{flag}: {} is missing: install the Debian package {} on the build host",
            tool.path,
            tool.package
        ),
        Err(e) => Err(e).with_context(|| format!("{flag}: {}", tool.path)),
    }
}

/// A file of the tools, read from the host.
pub struct Loaded<'a> {
    pub file: LoaderFile,
    /// The flag that asked for it (the first one, if several did).
    pub flag: &'a str,
    pub data: Vec<u8>,
}

/// The files of `sets` with their contents: everything is resolved and read before a caller
/// writes anything, so a missing tool leaves the image as it was.
pub fn load<'a>(sets: &[ToolSet<'a>]) -> Result<Vec<Loaded<'a>>> {
    if sets.is_empty() {
        return Ok(Vec::new());
    }
    files(sets, &SearchPath::host()?)?
        .into_iter()
        .map(|(file, flag)| {
            let data = read_input(&file.source, flag)?;
            Ok(Loaded { file, flag, data })
        })
        .collect()
}

/// Adds the host's tools of `sets` to an archive tree.
pub fn add_to_tree(t: &mut Tree, sets: &[ToolSet<'_>]) -> Result<()> {
    for Loaded { file, flag, data } in load(sets)? {
        t.file(file.archive_path()?, file.mode, data)
            .with_context(|| flag.to_string())?;
    }
    Ok(())
}

/// The module names `sets` need, to add to an image's module list.
pub fn modules(sets: &[ToolSet<'_>]) -> Vec<String> {
    sets.iter()
        .flat_map(|s| s.modules.iter().map(|m| m.to_string()))
        .collect()
}

#[cfg(test)]
pub mod testing {
    use std::path::{Path, PathBuf};

    /// The module files a fake kernel tree gives for [`super::LUKS2`]'s modules (with
    /// aesni-intel's dependencies, as Debian 6.12 has them), relative to the release directory.
    pub const MODULE_FILES: &[&str] = &[
        "kernel/drivers/block/loop.ko",
        "kernel/drivers/md/dm-mod.ko",
        "kernel/drivers/md/dm-crypt.ko",
        "kernel/crypto/xts.ko",
        "kernel/arch/x86/crypto/aesni-intel.ko",
        "kernel/lib/crypto/gf128mul.ko",
        "kernel/crypto/crypto_simd.ko",
        "kernel/crypto/cryptd.ko",
    ];

    /// The modules.dep line of a kernel with FUSE as a module, for `kernel_tree`'s `extra`.
    pub const FUSE_MODULE: &str = "kernel/fs/fuse/fuse.ko:";

    /// Writes `lib/modules/<rel>` under `tree` with the LUKS2 modules, an unrelated
    /// `dm-zero`, and (for the other modules a test asks for) the `extra` lines of modules.dep
    /// whose files it also creates.
    pub fn kernel_tree(tree: &Path, rel: &str, extra: &[&str]) -> PathBuf {
        let mods = tree.join("lib/modules").join(rel);
        let mut dep = String::from(
            "kernel/drivers/block/loop.ko:\n\
             kernel/drivers/md/dm-mod.ko:\n\
             kernel/drivers/md/dm-crypt.ko: kernel/drivers/md/dm-mod.ko\n\
             kernel/drivers/md/dm-zero.ko: kernel/drivers/md/dm-mod.ko\n\
             kernel/crypto/xts.ko:\n\
             kernel/arch/x86/crypto/aesni-intel.ko: kernel/lib/crypto/gf128mul.ko \
             kernel/crypto/crypto_simd.ko kernel/crypto/cryptd.ko\n\
             kernel/lib/crypto/gf128mul.ko:\n\
             kernel/crypto/crypto_simd.ko: kernel/crypto/cryptd.ko\n\
             kernel/crypto/cryptd.ko:\n",
        );
        let mut files: Vec<String> = MODULE_FILES.iter().map(|f| f.to_string()).collect();
        files.push("kernel/drivers/md/dm-zero.ko".into());
        for line in extra {
            dep.push_str(line);
            dep.push('\n');
            if let Some((file, _)) = line.split_once(':') {
                files.push(file.to_string());
            }
        }
        for f in files {
            let path = mods.join(&f);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(&path, format!("module {f}")).expect("module");
        }
        std::fs::write(mods.join("modules.dep"), dep).expect("modules.dep");
        std::fs::write(mods.join("modules.builtin"), "kernel/fs/ext4/ext4.ko\n").expect("b");
        tree.to_path_buf()
    }

    /// Adds FUSE to the tree's modules.builtin, as Debian's 6.12 cloud kernel has it.
    pub fn with_fuse_built_in(tree: &Path, rel: &str) {
        let path = tree.join("lib/modules").join(rel).join("modules.builtin");
        let mut text = std::fs::read_to_string(&path).expect("modules.builtin");
        text.push_str("kernel/fs/fuse/fuse.ko\n");
        std::fs::write(&path, text).expect("modules.builtin");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::os::unix::fs::PermissionsExt as _;
    use std::process::Command;

    use super::*;
    use crate::testutil::{read_newc, TempDir};

    fn guest_paths(sets: &[ToolSet<'_>]) -> Vec<String> {
        files(sets, &SearchPath::host().expect("search"))
            .expect("files")
            .iter()
            .map(|(f, _)| f.guest_path.display().to_string())
            .collect()
    }

    fn once_each(paths: &[String], libs: &[&str]) {
        let unique: BTreeSet<&String> = paths.iter().collect();
        assert_eq!(unique.len(), paths.len(), "{paths:?}");
        for shared in libs {
            let want = format!("{PREFIX}/lib/{shared}");
            assert_eq!(paths.iter().filter(|p| **p == want).count(), 1, "{paths:?}");
        }
        assert!(paths.iter().all(|p| p.starts_with(PREFIX)), "{paths:?}");
    }

    fn bins(paths: &[String]) -> Vec<&str> {
        paths
            .iter()
            .filter(|p| p.contains("/bin/"))
            .map(String::as_str)
            .collect()
    }

    #[test]
    fn both_luks2_tools_share_one_copy_of_their_common_libraries() {
        let paths = guest_paths(&[LUKS2]);
        // libc, libblkid and libuuid are needed by both programs: once each.
        once_each(&paths, &["libc.so.6", "libblkid.so.1", "libuuid.so.1"]);
        // Exactly the two programs under bin; the loader and libraries under lib.
        assert_eq!(
            bins(&paths),
            [
                format!("{PREFIX}/bin/cryptsetup"),
                format!("{PREFIX}/bin/mke2fs")
            ]
        );
        let files = files(&[LUKS2], &SearchPath::host().expect("search")).expect("files");
        let (loader, flag) = files
            .iter()
            .find(|(f, _)| f.guest_path == Path::new(PREFIX).join("lib").join(LOADER))
            .expect("loader");
        assert_eq!(loader.mode, 0o755, "the runner execs the loader");
        assert_eq!(*flag, "--luks2-tools");
    }

    #[test]
    fn gocryptfs_shares_libc_libcrypto_and_the_loader_with_the_luks2_tools() {
        let alone = guest_paths(&[GOCRYPTFS]);
        assert_eq!(bins(&alone), [format!("{PREFIX}/bin/gocryptfs")]);
        once_each(&alone, &["libc.so.6", "libcrypto.so.3", LOADER]);
        let luks2 = guest_paths(&[LUKS2]);
        let both = guest_paths(&[LUKS2, GOCRYPTFS]);
        once_each(&both, &["libc.so.6", "libcrypto.so.3", LOADER]);
        // The union, nothing more: gocryptfs's libraries are all among cryptsetup's.
        let union: BTreeSet<&String> = luks2.iter().chain(&alone).collect();
        assert_eq!(both.iter().collect::<BTreeSet<_>>(), union);
        assert_eq!(
            both.len(),
            luks2.len() + 1,
            "only bin/gocryptfs is new: {both:?}"
        );
        // The flag sets' order does not change the result.
        assert_eq!(guest_paths(&[GOCRYPTFS, LUKS2]), both);
    }

    #[test]
    fn a_missing_tool_stops_the_build_naming_its_debian_package() {
        let dir = TempDir::new("tools-missing");
        // Each set's first program, moved to where nothing is, with the package it names.
        for (real, package) in [(LUKS2, "cryptsetup-bin"), (GOCRYPTFS, "gocryptfs")] {
            let name = Path::new(real.tools[0].path).file_name().expect("name");
            let gone = dir.path().join(name);
            let gone = gone.to_str().expect("utf-8");
            let tools = [Tool {
                path: gone,
                ..real.tools[0]
            }];
            let set = ToolSet {
                tools: &tools,
                ..real
            };
            let mut t = Tree::new();
            let e = format!("{:#}", add_to_tree(&mut t, &[set]).expect_err(gone));
            assert_eq!(
                e,
                format!(
                    "{}: {gone} is missing: install the Debian package {package} on the \
                     build host",
                    real.flag
                )
            );
            assert!(t.files().next().is_none(), "nothing was added");
        }
    }

    #[test]
    fn two_different_files_for_one_prefix_path_are_refused_naming_both_flags() {
        // A second gocryptfs elsewhere would also be <prefix>/bin/gocryptfs.
        let dir = TempDir::new("tools-clash");
        let copy = dir.path().join("gocryptfs");
        std::fs::copy(GOCRYPTFS.tools[0].path, &copy).expect("copy gocryptfs");
        let copy = copy.to_str().expect("utf-8");
        let tools = [Tool {
            path: copy,
            package: "gocryptfs",
        }];
        let other = ToolSet {
            flag: "--other-tools",
            tools: &tools,
            modules: &[],
        };
        let e = files(&[GOCRYPTFS, other], &SearchPath::host().expect("search"))
            .expect_err("two gocryptfs");
        assert_eq!(
            format!("{e:#}"),
            format!(
                "--gocryptfs-tools /usr/bin/gocryptfs and --other-tools {copy} both need \
                 {PREFIX}/bin/gocryptfs but from /usr/bin/gocryptfs and {copy}"
            )
        );
    }

    /// The archive's files under the prefix, written out below `root` with their modes.
    fn extract_prefix(t: &Tree, root: &Path) {
        let prefix = PREFIX.trim_start_matches('/');
        for e in read_newc(&t.to_newc().expect("newc")) {
            let Some(rel) = e.name.strip_prefix(&format!("{prefix}/")) else {
                continue;
            };
            let path = root.join(rel);
            if e.mode & 0o170_000 == 0o040_000 {
                std::fs::create_dir_all(&path).expect("mkdir");
                continue;
            }
            assert_eq!(
                e.mode & 0o170_000,
                0o100_000,
                "{} is a regular file",
                e.name
            );
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(&path, &e.data).expect("write");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(e.mode & 0o777))
                .expect("chmod");
        }
    }

    /// Runs `<root>/bin/NAME ARG` as the agent's runner does, with LD_DEBUG=libs: (stdout,
    /// stderr).
    fn run_from_prefix(root: &Path, name: &str, arg: &str) -> (String, String) {
        let lib = root.join("lib");
        let out = Command::new(lib.join(LOADER))
            .arg("--inhibit-cache")
            .arg("--library-path")
            .arg(&lib)
            .args(["--argv0", name])
            .arg(root.join("bin").join(name))
            .arg(arg)
            .env_clear()
            .env("LC_ALL", "C")
            .env("LD_DEBUG", "libs")
            .output()
            .unwrap_or_else(|e| panic!("running {name}: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{name} {arg}: {stderr}");
        (stdout, stderr)
    }

    /// The libraries LD_DEBUG=libs shows coming from outside `<root>/lib`. On the host a
    /// library missing from the prefix would still be found in the system directories.
    fn loaded_outside(root: &Path, debug: &str) -> Vec<String> {
        let lib = root.join("lib");
        let mut bad: Vec<String> = debug
            .lines()
            .filter_map(|l| l.split_once("calling init: ").map(|(_, p)| p.trim()))
            .filter(|p| !Path::new(p).starts_with(&lib))
            .map(str::to_string)
            .collect();
        bad.extend(
            debug
                .lines()
                .filter(|l| l.contains("(system search path)"))
                .map(str::to_string),
        );
        bad
    }

    #[test]
    fn the_extracted_prefix_runs_cryptsetup_and_mke2fs_with_only_its_own_libraries() {
        let mut t = Tree::new();
        add_to_tree(&mut t, &[LUKS2]).expect("tools");
        let dir = TempDir::new("luks2-run");
        let root = dir.path().join("tools");
        extract_prefix(&t, &root);
        let (version, debug) = run_from_prefix(&root, "cryptsetup", "--version");
        assert!(version.starts_with("cryptsetup 2."), "{version}");
        assert!(debug.contains("calling init: "), "LD_DEBUG works: {debug}");
        assert_eq!(loaded_outside(&root, &debug), Vec::<String>::new());
        // mke2fs -V prints its version on stderr, in among the loader's debug lines.
        let (_, debug) = run_from_prefix(&root, "mke2fs", "-V");
        assert!(debug.lines().any(|l| l.starts_with("mke2fs 1.")), "{debug}");
        assert!(debug.contains("Using EXT2FS Library version 1."), "{debug}");
        assert_eq!(loaded_outside(&root, &debug), Vec::<String>::new());

        // The check catches an incomplete closure: without libpopt the host's is loaded.
        std::fs::remove_file(root.join("lib/libpopt.so.0")).expect("rm libpopt");
        let (_, debug) = run_from_prefix(&root, "cryptsetup", "--version");
        let bad = loaded_outside(&root, &debug);
        assert!(bad.iter().any(|l| l.ends_with("/libpopt.so.0")), "{bad:?}");
    }

    #[test]
    fn the_extracted_prefix_runs_gocryptfs_with_only_its_own_libraries() {
        let mut t = Tree::new();
        add_to_tree(&mut t, &[LUKS2, GOCRYPTFS]).expect("tools");
        let dir = TempDir::new("gocryptfs-run");
        let root = dir.path().join("tools");
        extract_prefix(&t, &root);
        let (version, debug) = run_from_prefix(&root, "gocryptfs", "-version");
        assert!(version.starts_with("gocryptfs 2."), "{version}");
        let inits: Vec<&str> = debug
            .lines()
            .filter_map(|l| l.split_once("calling init: ").map(|(_, p)| p.trim()))
            .collect();
        for lib in ["libcrypto.so.3", "libc.so.6"] {
            let want = root.join("lib").join(lib);
            assert!(
                inits.iter().any(|p| Path::new(p) == want),
                "{lib} from the prefix: {debug}"
            );
        }
        assert_eq!(loaded_outside(&root, &debug), Vec::<String>::new());
        // cryptsetup still runs beside it, from the same lib.
        let (version, debug) = run_from_prefix(&root, "cryptsetup", "--version");
        assert!(version.starts_with("cryptsetup 2."), "{version}");
        assert_eq!(loaded_outside(&root, &debug), Vec::<String>::new());

        // The check catches an incomplete closure: without libcrypto the host's is loaded.
        std::fs::remove_file(root.join("lib/libcrypto.so.3")).expect("rm libcrypto");
        let (_, debug) = run_from_prefix(&root, "gocryptfs", "-version");
        let bad = loaded_outside(&root, &debug);
        assert!(
            bad.iter().any(|l| l.ends_with("/libcrypto.so.3")),
            "{bad:?}"
        );
    }
}
