//! `--luks2-tools`: the build host's Debian `cryptsetup` and `mke2fs` with their loader
//! closure under the private prefix `/usr/lib/cnfs/tools` (design: docs/design/encryption-luks2.md
//! §1.1, §1.5), and the kernel modules a LUKS2 volume needs (§2.1).
//!
//! Why a prefix rather than the loader's own paths: `initrd-overlay` is appended with `cat`
//! and a later cpio entry replaces an earlier one, and `kata-rootfs` writes into the image's
//! root, so Debian's libc at `/lib/x86_64-linux-gnu/libc.so.6` would replace the image's own.
//! Under the prefix nothing of the image is touched. The agent's tool runner starts a tool as
//! `<prefix>/lib/ld-linux-x86-64.so.2 --inhibit-cache --library-path <prefix>/lib --argv0 NAME
//! <prefix>/bin/NAME ARGS`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

use crate::archive::{read_input, Tree};
use crate::elf_closure::{self, LoaderFile, Role, SearchPath};

/// Where the tools go in the guest.
pub const PREFIX: &str = "/usr/lib/cnfs/tools";

/// The loader's file name in `<prefix>/lib`, the path the agent execs.
pub const LOADER: &str = "ld-linux-x86-64.so.2";

/// Kernel modules of the LUKS2 stack (their dependencies come from modules.dep): the loop
/// device, device mapper and dm-crypt, the xts template and the AES-NI cipher (without it
/// xts runs over aes-generic). ext4 is built into Debian's kernels.
pub const MODULES: &[&str] = &["loop", "dm-mod", "dm-crypt", "xts", "aesni-intel"];

/// A host program to ship and the Debian package that has it.
#[derive(Debug, Clone, Copy)]
pub struct Tool<'a> {
    pub path: &'a Path,
    pub package: &'a str,
}

/// The build host's tools (Debian 12: cryptsetup 2.6.1, e2fsprogs 1.47.0).
pub fn host_tools() -> [Tool<'static>; 2] {
    [
        Tool {
            path: Path::new("/usr/sbin/cryptsetup"),
            package: "cryptsetup-bin",
        },
        Tool {
            path: Path::new("/usr/sbin/mke2fs"),
            package: "e2fsprogs",
        },
    ]
}

/// The tools' closures under [`PREFIX`], in guest path order; a library both need goes in
/// once, and two different files for one path are refused.
pub fn files(tools: &[Tool<'_>], search: &SearchPath) -> Result<Vec<LoaderFile>> {
    let mut files: BTreeMap<PathBuf, (LoaderFile, &Path)> = BTreeMap::new();
    for tool in tools {
        let path = tool.path;
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() => {}
            Ok(_) => bail!("--luks2-tools: {} is not a regular file", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "--luks2-tools: {} is missing: install the Debian package {} on the build host",
                path.display(),
                tool.package
            ),
            Err(e) => {
                return Err(e).with_context(|| format!("--luks2-tools: {}", path.display()));
            }
        }
        let closure = elf_closure::closure_into_prefix(path, search, Path::new(PREFIX))
            .with_context(|| format!("--luks2-tools: {}", path.display()))?;
        let loader = Path::new(PREFIX).join("lib").join(LOADER);
        if let Some(interp) = closure.iter().find(|f| f.role == Role::Interpreter) {
            if interp.guest_path != loader {
                bail!(
                    "--luks2-tools: {}: its interpreter {} would be {}, but the agent runs the \
                     tools through {}",
                    path.display(),
                    interp.source.display(),
                    interp.guest_path.display(),
                    loader.display()
                );
            }
        }
        for f in closure {
            match files.get(&f.guest_path) {
                Some((prev, by)) if prev.source != f.source || prev.role != f.role => bail!(
                    "--luks2-tools: {} and {} both need {} but from {} and {}",
                    by.display(),
                    path.display(),
                    f.guest_path.display(),
                    prev.source.display(),
                    f.source.display()
                ),
                Some(_) => {}
                None => {
                    files.insert(f.guest_path.clone(), (f, path));
                }
            }
        }
    }
    Ok(files.into_values().map(|(f, _)| f).collect())
}

/// Each file of `files` with its contents, read from the host.
pub fn read(files: &[LoaderFile]) -> Result<Vec<(&LoaderFile, Vec<u8>)>> {
    files
        .iter()
        .map(|f| Ok((f, read_input(&f.source, "--luks2-tools")?)))
        .collect()
}

/// Adds the host's tools to an archive tree.
pub fn add_to_tree(t: &mut Tree) -> Result<()> {
    add_tools_to_tree(t, &host_tools())
}

pub fn add_tools_to_tree(t: &mut Tree, tools: &[Tool<'_>]) -> Result<()> {
    let files = files(tools, &SearchPath::host()?)?;
    for (f, data) in read(&files)? {
        t.file(f.archive_path()?, f.mode, data)
            .context("--luks2-tools")?;
    }
    Ok(())
}

/// The module names to add to `names` when the tools are asked for.
pub fn modules() -> impl Iterator<Item = String> {
    MODULES.iter().map(|m| m.to_string())
}

#[cfg(test)]
pub mod testing {
    use std::path::{Path, PathBuf};

    /// The module files a fake kernel tree gives for [`super::MODULES`] (with aesni-intel's
    /// dependencies, as Debian 6.12 has them), relative to the release directory.
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
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::os::unix::fs::PermissionsExt as _;
    use std::process::Command;

    use super::*;
    use crate::testutil::{read_newc, TempDir};

    fn archive_of(t: &Tree) -> Vec<crate::testutil::Entry> {
        read_newc(&t.to_newc().expect("newc"))
    }

    #[test]
    fn both_tools_share_one_copy_of_their_common_libraries() {
        let files = files(&host_tools(), &SearchPath::host().expect("search")).expect("files");
        let paths: Vec<String> = files
            .iter()
            .map(|f| f.guest_path.display().to_string())
            .collect();
        let unique: BTreeSet<&String> = paths.iter().collect();
        assert_eq!(unique.len(), paths.len(), "{paths:?}");
        // libc, libblkid and libuuid are needed by both programs: once each.
        for shared in ["libc.so.6", "libblkid.so.1", "libuuid.so.1"] {
            let want = format!("{PREFIX}/lib/{shared}");
            assert_eq!(paths.iter().filter(|p| **p == want).count(), 1, "{paths:?}");
        }
        assert!(paths.iter().all(|p| p.starts_with(PREFIX)), "{paths:?}");
        // Exactly the two programs under bin; the loader and libraries under lib.
        let bins: Vec<&String> = paths.iter().filter(|p| p.contains("/bin/")).collect();
        assert_eq!(
            bins,
            [
                &format!("{PREFIX}/bin/cryptsetup"),
                &format!("{PREFIX}/bin/mke2fs")
            ]
        );
        let loader = files
            .iter()
            .find(|f| f.guest_path == Path::new(PREFIX).join("lib").join(LOADER))
            .expect("loader");
        assert_eq!(loader.mode, 0o755, "the runner execs the loader");
    }

    #[test]
    fn a_missing_tool_stops_the_build_naming_its_debian_package() {
        let dir = TempDir::new("luks2-missing");
        let gone = dir.path().join("cryptsetup");
        let tools = [Tool {
            path: &gone,
            package: "cryptsetup-bin",
        }];
        let mut t = Tree::new();
        let e = format!(
            "{:#}",
            add_tools_to_tree(&mut t, &tools).expect_err("no cryptsetup")
        );
        assert_eq!(
            e,
            format!(
                "--luks2-tools: {} is missing: install the Debian package cryptsetup-bin on \
                 the build host",
                gone.display()
            )
        );
        assert!(t.files().next().is_none(), "nothing was added");
    }

    #[test]
    fn the_extracted_prefix_runs_cryptsetup_and_mke2fs_with_only_its_own_libraries() {
        let mut t = Tree::new();
        add_to_tree(&mut t).expect("tools");
        let dir = TempDir::new("luks2-run");
        let root = dir.path().join("tools");
        let prefix = PREFIX.trim_start_matches('/');
        for e in archive_of(&t) {
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
        let lib = root.join("lib");
        // On the host a library missing from the prefix would still be found in the system
        // directories; LD_DEBUG=libs shows where each one came from.
        let run = |name: &str, arg: &str| -> (String, String) {
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
        };
        let loaded_outside = |debug: &str| -> Vec<String> {
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
        };
        let (version, debug) = run("cryptsetup", "--version");
        assert!(version.starts_with("cryptsetup 2."), "{version}");
        assert!(debug.contains("calling init: "), "LD_DEBUG works: {debug}");
        assert_eq!(loaded_outside(&debug), Vec::<String>::new());
        // mke2fs -V prints its version on stderr, in among the loader's debug lines.
        let (_, debug) = run("mke2fs", "-V");
        assert!(debug.lines().any(|l| l.starts_with("mke2fs 1.")), "{debug}");
        assert!(debug.contains("Using EXT2FS Library version 1."), "{debug}");
        assert_eq!(loaded_outside(&debug), Vec::<String>::new());

        // The check catches an incomplete closure: without libpopt the host's is loaded.
        std::fs::remove_file(lib.join("libpopt.so.0")).expect("rm libpopt");
        let (_, debug) = run("cryptsetup", "--version");
        let bad = loaded_outside(&debug);
        assert!(bad.iter().any(|l| l.ends_with("/libpopt.so.0")), "{bad:?}");
    }
}
