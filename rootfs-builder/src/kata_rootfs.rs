//! `kata-rootfs`: installs the agent into a Kata guest rootfs directory whose init is systemd,
//! as a unit pulled in by `kata-containers.target` (the target Kata's guest boots into).

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

use crate::archive::read_input;
use crate::{modules, tools, DEFAULT_AGENT_PORT};

const UNIT_DIR: &str = "usr/lib/systemd/system";
const UNIT_NAME: &str = "cnfs-agent.service";
const WANTS_DIR: &str = "etc/systemd/system/kata-containers.target.wants";
const MODULES_LOAD: &str = "etc/modules-load.d/cnfs.conf";
const DEFAULT_MODULES: &str = "nfs,nfsv3,nfsv4,ceph";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The guest rootfs directory (must already hold `usr` and `etc`).
    #[arg(long, value_name = "DIR")]
    pub rootfs: PathBuf,
    /// The cnfs-agent binary (installed as /usr/bin/cnfs-agent).
    #[arg(long, value_name = "PATH")]
    pub agent: PathBuf,
    /// vsock port the agent serves the host on.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_AGENT_PORT)]
    pub port: u32,
    /// Modules for systemd-modules-load, comma separated ("" writes no drop-in).
    #[arg(long, value_name = "NAME,...", default_value = DEFAULT_MODULES)]
    pub modules_load: String,
    /// Extracted distribution kernel package on which `depmod -b DIR REL` has been run: the
    /// closure of `--modules-load` and `--module` goes into the rootfs's /lib/modules.
    #[arg(long, value_name = "DIR", requires = "kernel_release")]
    pub kernel_tree: Option<PathBuf>,
    /// Kernel release (the directory name under lib/modules).
    #[arg(long, value_name = "REL", requires = "kernel_tree")]
    pub kernel_release: Option<String>,
    /// A module only installed, for cnfs-agent to load on demand (repeatable).
    #[arg(long, value_name = "NAME", requires = "kernel_tree")]
    pub module: Vec<String>,
    #[command(flatten)]
    pub tools: tools::Flags,
}

/// The systemd unit. No mount namespace isolation may be added to it.
pub fn unit(port: u32) -> String {
    format!(
        "\
# Installed by cnfs-rootfs-builder.
[Unit]
Description=CNFS guest agent (kernel mounts of network file systems)
DefaultDependencies=no
After=systemd-modules-load.service
# Restart=always must not give up after a burst of failures.
StartLimitIntervalSec=0

[Service]
ExecStart=/usr/bin/cnfs-agent --vsock-port {port}
Restart=always
RestartSec=1
# Stop and restart signal the agent only: its helpers (LUKS2 lock holders) must outlive it.
KillMode=process
# Do not set PrivateMounts=, ProtectSystem=, ProtectHome=, PrivateTmp=, ReadOnlyPaths= or
# any other option that gives the service its own mount namespace: the agent's mounts must
# land in the guest's root mount namespace, which kata-agent shares with the containers.

[Install]
WantedBy=kata-containers.target
"
    )
}

fn module_list(arg: &str) -> Result<Vec<&str>> {
    let names: Vec<&str> = arg
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .collect();
    for n in &names {
        modules::check_name(n).context("--modules-load")?;
    }
    Ok(names)
}

pub fn run(args: &Args) -> Result<()> {
    let root = &args.rootfs;
    if !root.is_dir() {
        bail!("rootfs directory {} does not exist", root.display());
    }
    for d in ["usr", "etc"] {
        if !root.join(d).is_dir() {
            bail!(
                "{} does not look like a rootfs: it has no {d} directory",
                root.display()
            );
        }
    }
    let modules = module_list(&args.modules_load)?;
    let agent = read_input(&args.agent, "--agent")?;
    // Resolved and read before anything is written: a missing tool leaves the rootfs as it was.
    let tool_sets = args.tools.sets();
    let tool_files = tools::load(&tool_sets)?;

    install_file(root, "usr/bin", "cnfs-agent", &agent, 0o755)?;
    install_file(root, UNIT_DIR, UNIT_NAME, unit(args.port).as_bytes(), 0o644)?;
    install_symlink(
        root,
        WANTS_DIR,
        UNIT_NAME,
        &format!("/{UNIT_DIR}/{UNIT_NAME}"),
    )?;

    let (dir, name) = MODULES_LOAD.rsplit_once('/').context("modules-load path")?;
    if modules.is_empty() {
        // Asked for no drop-in: remove the one an earlier run wrote, so the tree matches.
        let path = root.join(MODULES_LOAD);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", path.display()));
            }
            _ => {}
        }
    } else {
        let text: String = modules.iter().map(|m| format!("{m}\n")).collect();
        install_file(root, dir, name, text.as_bytes(), 0o644)?;
    }
    for l in &tool_files {
        let path = l.file.archive_path()?;
        let (dir, name) = path.rsplit_once('/').context("tool path")?;
        install_file(root, dir, name, &l.data, l.file.mode)?;
    }
    if let (Some(tree), Some(rel)) = (&args.kernel_tree, &args.kernel_release) {
        let mut t = crate::archive::Tree::new();
        let mut names: Vec<String> = modules
            .iter()
            .map(|m| m.to_string())
            .chain(args.module.iter().cloned())
            .collect();
        names.extend(tools::modules(&tool_sets));
        modules::add_to_tree(&mut t, tree, rel, &names)?;
        for (path, data) in t.files() {
            let (dir, name) = path.rsplit_once('/').context("module path")?;
            install_file(root, dir, name, data, 0o644)?;
        }
    }
    Ok(())
}

/// Creates `root/rel` (0755 for new directories), refusing symlinks that lead out of the
/// rootfs: an absolute link in a guest tree points into the host when followed here.
fn ensure_dir(root: &Path, rel: &str) -> Result<PathBuf> {
    let real_root = root
        .canonicalize()
        .with_context(|| format!("resolving {}", root.display()))?;
    let mut cur = root.to_path_buf();
    for comp in rel.split('/') {
        cur.push(comp);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                let real = cur
                    .canonicalize()
                    .with_context(|| format!("resolving symlink {}", cur.display()))?;
                if !real.starts_with(&real_root) {
                    bail!(
                        "{} is a symlink to {}, outside the rootfs",
                        cur.display(),
                        real.display()
                    );
                }
                if !real.is_dir() {
                    bail!("{} is not a directory", cur.display());
                }
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => bail!("{} exists and is not a directory", cur.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::create_dir(&cur).with_context(|| format!("creating {}", cur.display()))?;
                fs::set_permissions(&cur, fs::Permissions::from_mode(0o755))
                    .with_context(|| format!("setting the mode of {}", cur.display()))?;
            }
            Err(e) => return Err(e).with_context(|| format!("inspecting {}", cur.display())),
        }
    }
    Ok(cur)
}

/// Writes `root/dir/name` through a temporary file and a rename, so an existing symlink there
/// is replaced rather than followed; an identical file is left alone.
fn install_file(root: &Path, dir: &str, name: &str, data: &[u8], mode: u32) -> Result<()> {
    let dir = ensure_dir(root, dir)?;
    let path = dir.join(name);
    if let Ok(m) = fs::symlink_metadata(&path) {
        if m.is_file()
            && m.permissions().mode() & 0o7777 == mode
            && fs::read(&path).is_ok_and(|old| old == data)
        {
            return Ok(());
        }
    }
    let tmp = dir.join(format!(".{name}.cnfs-tmp"));
    fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", tmp.display()))?;
    fs::rename(&tmp, &path).with_context(|| format!("installing {}", path.display()))
}

fn install_symlink(root: &Path, dir: &str, name: &str, target: &str) -> Result<()> {
    let path = ensure_dir(root, dir)?.join(name);
    match fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_symlink() => {
            let old = fs::read_link(&path)
                .with_context(|| format!("reading symlink {}", path.display()))?;
            if old == Path::new(target) {
                return Ok(());
            }
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        Ok(m) if m.is_dir() => bail!("{} is a directory", path.display()),
        Ok(_) => fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", path.display())),
    }
    symlink(target, &path).with_context(|| format!("creating symlink {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    fn rootfs(dir: &TempDir) -> Args {
        let root = dir.path().join("rootfs");
        fs::create_dir_all(root.join("usr")).expect("usr");
        fs::create_dir_all(root.join("etc")).expect("etc");
        let agent = dir.path().join("agent");
        fs::write(&agent, b"agent binary").expect("agent");
        Args {
            rootfs: root,
            agent,
            port: 4242,
            modules_load: DEFAULT_MODULES.into(),
            kernel_tree: None,
            kernel_release: None,
            module: vec![],
            tools: tools::Flags::default(),
        }
    }

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).expect("stat").permissions().mode() & 0o7777
    }

    /// Every path under `dir` with its kind, mode, and content or link target.
    fn snapshot(dir: &Path) -> Vec<(PathBuf, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in fs::read_dir(&d).expect("readdir") {
                let p = e.expect("entry").path();
                let m = fs::symlink_metadata(&p).expect("stat");
                let data = if m.file_type().is_symlink() {
                    fs::read_link(&p)
                        .expect("link")
                        .into_os_string()
                        .into_encoded_bytes()
                } else if m.is_dir() {
                    todo.push(p.clone());
                    Vec::new()
                } else {
                    fs::read(&p).expect("read")
                };
                out.push((p, m.permissions().mode(), data));
            }
        }
        out.sort();
        out
    }

    #[test]
    fn installs_agent_unit_symlink_and_modules() {
        let dir = TempDir::new("kata");
        let args = rootfs(&dir);
        run(&args).expect("install");
        let r = &args.rootfs;

        let agent = r.join("usr/bin/cnfs-agent");
        assert_eq!(fs::read(&agent).expect("agent"), b"agent binary");
        assert_eq!(mode(&agent), 0o755);

        let unit_path = r.join("usr/lib/systemd/system/cnfs-agent.service");
        let text = fs::read_to_string(&unit_path).expect("unit");
        assert_eq!(mode(&unit_path), 0o644);
        assert!(text.contains("WantedBy=kata-containers.target\n"));
        assert!(text.contains("ExecStart=/usr/bin/cnfs-agent --vsock-port 4242\n"));
        assert!(text.contains("After=systemd-modules-load.service\n"));
        assert!(text.contains("Restart=always\n"));
        // Helpers the agent leaves behind survive its restart (LUKS2 lock holders).
        assert!(text.contains("\nKillMode=process\n"), "{text}");
        assert!(!text
            .lines()
            .any(|l| l.starts_with("PrivateMounts=") || l.starts_with("ProtectSystem=")));

        let link = r.join("etc/systemd/system/kata-containers.target.wants/cnfs-agent.service");
        assert_eq!(
            fs::read_link(&link).expect("symlink"),
            Path::new("/usr/lib/systemd/system/cnfs-agent.service")
        );
        assert_eq!(
            fs::read_to_string(r.join("etc/modules-load.d/cnfs.conf")).expect("modules"),
            "nfs\nnfsv3\nnfsv4\nceph\n"
        );
        assert_eq!(mode(&r.join("etc/modules-load.d")), 0o755);
    }

    const REL: &str = "6.12.0-test-amd64";

    /// A merged-/usr rootfs with its own libc and loader, which must stay as they are, and a
    /// kernel tree with the LUKS2 modules and the `extra` modules.dep lines.
    fn rootfs_with_its_own_lib(dir: &TempDir, extra: &[&str]) -> Args {
        let mut args = rootfs(dir);
        let r = args.rootfs.clone();
        fs::create_dir_all(r.join("usr/lib/x86_64-linux-gnu")).expect("lib");
        fs::write(r.join("usr/lib/x86_64-linux-gnu/libc.so.6"), b"image libc").expect("libc");
        fs::create_dir_all(r.join("usr/lib64")).expect("lib64");
        fs::write(r.join("usr/lib64/ld-linux-x86-64.so.2"), b"image ld").expect("ld");
        symlink("usr/lib", r.join("lib")).expect("merged /usr");
        args.kernel_tree = Some(tools::testing::kernel_tree(
            &dir.path().join("kernel"),
            REL,
            extra,
        ));
        args.kernel_release = Some(REL.into());
        args.modules_load = String::new();
        args
    }

    /// Everything of `before` is unchanged in `after`, and every new path is the agent, its
    /// unit, the tools prefix or a module.
    fn only_cnfs_paths_were_added(
        r: &Path,
        before: &[(PathBuf, u32, Vec<u8>)],
        after: &[(PathBuf, u32, Vec<u8>)],
    ) {
        for entry in before {
            assert!(after.contains(entry), "{} changed", entry.0.display());
        }
        let stray: Vec<&PathBuf> = after
            .iter()
            .map(|(path, _, _)| path)
            .filter(|path| !before.iter().any(|(b, _, _)| b == *path))
            .filter(|path| {
                let rel = path.strip_prefix(r).expect("under root");
                !(rel.starts_with("usr/lib/cnfs")
                    || rel.starts_with("usr/lib/modules")
                    || rel.starts_with("usr/lib/systemd")
                    || rel.starts_with("usr/bin")
                    || rel.starts_with("etc/systemd"))
            })
            .collect();
        assert_eq!(stray, Vec::<&PathBuf>::new());
    }

    #[test]
    fn luks2_tools_install_under_the_prefix_and_leave_the_rootfs_lib_alone() {
        let dir = TempDir::new("kata-luks2");
        let mut args = rootfs_with_its_own_lib(&dir, &[]);
        let r = args.rootfs.clone();
        let rel = REL;
        let before = snapshot(&r);
        args.tools.luks2_tools = true;
        run(&args).expect("install");

        let p = r.join("usr/lib/cnfs/tools");
        let host = |f: &str| fs::read(f).unwrap_or_else(|e| panic!("reading {f}: {e}"));
        assert_eq!(
            fs::read(p.join("bin/cryptsetup")).expect("cryptsetup"),
            host("/usr/sbin/cryptsetup")
        );
        assert_eq!(mode(&p.join("bin/cryptsetup")), 0o755);
        assert_eq!(
            fs::read(p.join("bin/mke2fs")).expect("mke2fs"),
            host("/usr/sbin/mke2fs")
        );
        assert_eq!(mode(&p.join("lib/ld-linux-x86-64.so.2")), 0o755);
        assert!(p.join("lib/libcryptsetup.so.12").is_file());
        assert_eq!(
            fs::read(p.join("lib/libc.so.6")).expect("libc"),
            host("/lib/x86_64-linux-gnu/libc.so.6")
        );
        // Everything that was there is unchanged (the lib link too).
        only_cnfs_paths_were_added(&r, &before, &snapshot(&r));
        let m = r.join("lib/modules").join(rel);
        for f in tools::testing::MODULE_FILES {
            assert!(m.join(f).is_file(), "{f}");
        }
        assert!(!m.join("kernel/drivers/md/dm-zero.ko").exists());
    }

    #[test]
    fn gocryptfs_tools_install_beside_the_luks2_tools_and_leave_the_rootfs_lib_alone() {
        let dir = TempDir::new("kata-gocryptfs");
        let mut args = rootfs_with_its_own_lib(&dir, &[tools::testing::FUSE_MODULE]);
        let r = args.rootfs.clone();
        let before = snapshot(&r);
        args.tools.luks2_tools = true;
        args.tools.gocryptfs_tools = true;
        run(&args).expect("install");

        let p = r.join("usr/lib/cnfs/tools");
        let host = |f: &str| fs::read(f).unwrap_or_else(|e| panic!("reading {f}: {e}"));
        assert_eq!(
            fs::read(p.join("bin/gocryptfs")).expect("gocryptfs"),
            host("/usr/bin/gocryptfs")
        );
        assert_eq!(mode(&p.join("bin/gocryptfs")), 0o755);
        assert!(p.join("bin/cryptsetup").is_file());
        assert_eq!(
            fs::read(p.join("lib/libcrypto.so.3")).expect("libcrypto"),
            host("/lib/x86_64-linux-gnu/libcrypto.so.3")
        );
        assert_eq!(
            fs::read(p.join("lib/libc.so.6")).expect("libc"),
            host("/lib/x86_64-linux-gnu/libc.so.6")
        );
        only_cnfs_paths_were_added(&r, &before, &snapshot(&r));
        // FUSE is a module in this kernel: installed for the agent to load.
        let m = r.join("lib/modules").join(REL);
        assert!(m.join("kernel/fs/fuse/fuse.ko").is_file());
        let dep = fs::read_to_string(m.join("modules.dep")).expect("modules.dep");
        assert!(dep.contains("kernel/fs/fuse/fuse.ko:\n"), "{dep}");
        // A second run finds everything in place.
        let first = snapshot(&r);
        run(&args).expect("again");
        assert_eq!(first, snapshot(&r));
    }

    #[test]
    fn second_run_gives_the_same_tree() {
        let dir = TempDir::new("kata-idem");
        let args = rootfs(&dir);
        run(&args).expect("first");
        let first = snapshot(&args.rootfs);
        run(&args).expect("second");
        assert_eq!(first, snapshot(&args.rootfs));
    }

    #[test]
    fn stale_files_are_replaced() {
        let dir = TempDir::new("kata-stale");
        let args = rootfs(&dir);
        let wants = args.rootfs.join(WANTS_DIR);
        fs::create_dir_all(&wants).expect("wants");
        symlink("/elsewhere", wants.join(UNIT_NAME)).expect("old link");
        fs::create_dir_all(args.rootfs.join("usr/bin")).expect("bin");
        // a symlink at the agent's place is replaced, not written through
        let outside = dir.path().join("outside");
        fs::write(&outside, b"keep").expect("outside");
        symlink(&outside, args.rootfs.join("usr/bin/cnfs-agent")).expect("agent link");
        run(&args).expect("install");
        assert_eq!(fs::read(&outside).expect("outside"), b"keep");
        assert_eq!(
            fs::read_link(wants.join(UNIT_NAME)).expect("link"),
            Path::new("/usr/lib/systemd/system/cnfs-agent.service")
        );
        assert_eq!(mode(&args.rootfs.join("usr/bin/cnfs-agent")), 0o755);
    }

    #[test]
    fn empty_modules_load_writes_no_drop_in() {
        let dir = TempDir::new("kata-nomods");
        let mut args = rootfs(&dir);
        run(&args).expect("with modules");
        args.modules_load = String::new();
        run(&args).expect("without modules");
        assert!(!args.rootfs.join(MODULES_LOAD).exists());
        args.modules_load = "nfs,bad name".into();
        assert!(run(&args).is_err());
    }

    #[test]
    fn missing_or_foreign_dirs_are_refused() {
        let dir = TempDir::new("kata-missing");
        let mut args = rootfs(&dir);
        args.rootfs = dir.path().join("nope");
        let e = run(&args).expect_err("missing dir");
        assert!(format!("{e:#}").contains("does not exist"), "{e:#}");

        args.rootfs = dir.path().join("plain");
        fs::create_dir_all(args.rootfs.join("usr")).expect("usr only");
        let e = run(&args).expect_err("no etc");
        assert!(format!("{e:#}").contains("no etc directory"), "{e:#}");
    }

    #[test]
    fn symlinks_out_of_the_rootfs_are_refused() {
        let dir = TempDir::new("kata-escape");
        let args = rootfs(&dir);
        let host = dir.path().join("host-lib");
        fs::create_dir_all(&host).expect("host dir");
        fs::create_dir_all(args.rootfs.join("usr")).expect("usr");
        symlink(&host, args.rootfs.join("usr/lib")).expect("escape link");
        let e = run(&args).expect_err("escape");
        assert!(format!("{e:#}").contains("outside the rootfs"), "{e:#}");
        assert!(fs::read_dir(&host).expect("host").next().is_none());
    }
}
