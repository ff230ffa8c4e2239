//! The installer image (`cargo xtask images`: cnfs-deploy with its payload) run the way the
//! DaemonSet runs it (configs/deploy/installer.yaml: the node's root bind-mounted at /host),
//! here under the test bed's private containerd with runc, against temporary node roots laid
//! out as kata-deploy leaves a node (its runtimes/qemu/ configuration, the symlink to it,
//! its initrd and shim). Then a second private containerd is started with the config.toml
//! the installer wrote and must load CRI with the kata-cnfs runtime in it.
//!
//! What runs for real: the image, containerd 1.6 importing and running it, the installer
//! binary, the static shim it installs, containerd 1.6 reading the result. What does not:
//! containerd 2.x (not packaged here; its drop-in is checked against the documented schema,
//! and deploy/tests/install.rs covers the 2.x file handling), `systemctl restart containerd`
//! in the host's mount namespace (the test's restart command touches a marker instead), and
//! the node label (no API server here; deploy/tests/install.rs checks the request).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{anyhow, ensure, Context};
use cnfs_testbed::containerd::{Containerd, MINIMAL};
use cnfs_testbed::{images, TempDir};

const IMAGE: &str = "registry.example.com/cnfs/cnfs-deploy";
const CRI_V2: &str = "io.containerd.grpc.v1.cri";

/// An admin's containerd 1.6 config.toml: its own CRI settings and runc; CRI required, so a
/// CRI config containerd refuses stops it instead of being skipped.
fn site_v2() -> String {
    format!(
        "version = 2\nrequired_plugins = [\"{CRI_V2}\"]\n\n\
         [plugins.\"{CRI_V2}\"]\n  sandbox_image = \"registry.example.test/pause:3.9\"\n\
         [plugins.\"{CRI_V2}\".containerd.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n"
    )
}

const SITE_V3: &str = "version = 3\nimports = [\"/etc/containerd/conf.d/*.toml\"]\n\n[plugins.'io.containerd.cri.v1.runtime']\n  enable_selinux = false\n";

/// A node root as kata-deploy leaves it, with `config` as containerd's config.toml.
fn node(dir: &Path, config: &str) -> anyhow::Result<()> {
    let put = |rel: &str, data: &[u8], mode: u32| -> anyhow::Result<()> {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().ok_or_else(|| anyhow!("no parent"))?)?;
        std::fs::write(&p, data)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    let defaults = "opt/kata/share/defaults/kata-containers";
    put(
        &format!("{defaults}/runtimes/qemu/configuration-qemu.toml"),
        b"[hypervisor.qemu]\npath = \"/opt/kata/bin/qemu-system-x86_64\"\nkernel = \"/opt/kata/share/kata-containers/vmlinux.container\"\nimage = \"/opt/kata/share/kata-containers/kata-containers.img\"\nkernel_params = \"\"\n[agent.kata]\n[runtime]\n",
        0o644,
    )?;
    std::os::unix::fs::symlink(
        "runtimes/qemu/configuration-qemu.toml",
        dir.join(format!("{defaults}/configuration-qemu.toml")),
    )?;
    put(
        "opt/kata/share/kata-containers/kata-containers-initrd.img",
        b"kata initrd bytes",
        0o644,
    )?;
    put("opt/kata/bin/containerd-shim-kata-v2", b"#!kata", 0o755)?;
    put("etc/containerd/config.toml", config.as_bytes(), 0o644)?;
    // The test's "restart containerd": a static busybox the container can run.
    put("bin/busybox", &std::fs::read("/bin/busybox")?, 0o755)?;
    Ok(())
}

/// Every path under `dir`: kind, mode, bytes (hashed) or link target.
fn snapshot(dir: &Path) -> BTreeMap<String, String> {
    fn walk(base: &Path, d: &Path, out: &mut BTreeMap<String, String>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let p = e.path();
            let rel = p
                .strip_prefix(base)
                .map(|r| r.display().to_string())
                .unwrap_or_default();
            let Ok(m) = p.symlink_metadata() else {
                continue;
            };
            let mode = m.permissions().mode() & 0o7777;
            if m.file_type().is_symlink() {
                out.insert(rel, format!("link {:?}", std::fs::read_link(&p).ok()));
            } else if m.is_dir() {
                out.insert(rel, format!("dir {mode:o}"));
                walk(base, &p, out);
            } else {
                let data = std::fs::read(&p).unwrap_or_default();
                out.insert(rel, format!("file {mode:o} {}", cnfs_deploy_hash(&data)));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out.remove("restarted");
    out
}

fn cnfs_deploy_hash(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Runs the installer image once with the node root at /host, as the DaemonSet does.
fn run(ctd: &Containerd, root: &Path, id: &str, cmd: &str) -> anyhow::Result<String> {
    let image = format!("{IMAGE}:{}", env!("CARGO_PKG_VERSION"));
    let mount = format!(
        "type=bind,src={},dst=/host,options=rbind:rw",
        root.display()
    );
    ctd.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "native",
        "--mount",
        &mount,
        &image,
        id,
        "/usr/bin/cnfs-deploy",
        cmd,
        "--restart-here",
        "--restart-command",
        "/host/bin/busybox touch /host/restarted",
    ])
}

fn restarted(root: &Path) -> bool {
    let p = root.join("restarted");
    let was = p.exists();
    let _ = std::fs::remove_file(p);
    was
}

fn runner() -> anyhow::Result<Containerd> {
    let ctd = Containerd::start(MINIMAL)?;
    let names = images::import(&ctd, &images::archive("cnfs-deploy")?)?;
    ensure!(
        names.iter().any(|n| n.starts_with(IMAGE)),
        "the archive holds {names:?}"
    );
    Ok(ctd)
}

#[test]
fn the_installer_image_sets_up_a_containerd_16_node_that_containerd_then_loads(
) -> anyhow::Result<()> {
    let ctd = runner()?;
    let dir = TempDir::new("deploy-v2")?;
    let root = dir.path().join("root");
    node(&root, &site_v2())?;
    let before = snapshot(&root);

    let out = run(&ctd, &root, "cnfs-deploy-1", "install")?;
    ensure!(out.contains("installed:"), "{out}");
    ensure!(
        restarted(&root),
        "containerd was not restarted after the first install: {out}"
    );
    // The installed shim is the real static binary and runs on the node.
    let shim = root.join("opt/cnfs/bin/containerd-shim-cnfs-v2");
    let v = cnfs_testbed::process::run(std::process::Command::new(&shim).arg("-v"))?;
    ensure!(v.contains("containerd-shim-cnfs-v2"), "{v}");
    let kata: toml::Table = std::fs::read_to_string(
        root.join("opt/cnfs/share/defaults/kata-containers/configuration-cnfs.toml"),
    )?
    .parse()?;
    let q = &kata["hypervisor"]["qemu"];
    ensure!(q["kernel"].as_str() == Some("/opt/cnfs/share/kata/vmlinux-cnfs.container"));
    ensure!(
        q["path"].as_str() == Some("/opt/kata/bin/qemu-system-x86_64"),
        "Kata's settings kept"
    );
    let initrd = std::fs::read(root.join("opt/cnfs/share/kata/kata-cnfs-initrd.img"))?;
    ensure!(
        initrd.starts_with(b"kata initrd bytes") && initrd.len() > 1024,
        "Kata's initrd + the overlay"
    );
    let kernel = std::fs::read(root.join("opt/cnfs/share/kata/vmlinux-cnfs.container"))?;
    ensure!(
        kernel.starts_with(b"\x7fELF"),
        "the guest kernel is the ELF Kata boots"
    );

    // Twice: nothing changes, containerd is not restarted.
    let installed = snapshot(&root);
    let out = run(&ctd, &root, "cnfs-deploy-2", "install")?;
    ensure!(out.contains("0 file(s) changed"), "{out}");
    ensure!(
        !restarted(&root),
        "restarted although nothing changed: {out}"
    );
    ensure!(
        snapshot(&root) == installed,
        "the second install changed files"
    );

    // containerd 1.6 started with what the installer wrote: CRI loads with the runtime.
    let config = std::fs::read_to_string(root.join("etc/containerd/config.toml"))?;
    let c = Containerd::start(&config).context("containerd with the installed config")?;
    let plugins = c.ctr(&["plugins", "ls"])?;
    let cri = plugins
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("cri"))
        .ok_or_else(|| anyhow!("no cri plugin: {plugins}"))?;
    ensure!(cri.split_whitespace().any(|w| w == "ok"), "{cri}");
    let dump: toml::Table = cnfs_testbed::process::run(
        std::process::Command::new("containerd")
            .arg("--config")
            .arg(c.config_path())
            .args(["config", "dump"]),
    )?
    .parse()?;
    let rt = &dump["plugins"][CRI_V2]["containerd"]["runtimes"]["kata-cnfs"];
    ensure!(
        rt["runtime_type"].as_str() == Some("io.containerd.cnfs.v2"),
        "{rt}"
    );
    ensure!(
        rt["runtime_path"].as_str() == Some("/opt/cnfs/bin/containerd-shim-cnfs-v2"),
        "{rt}"
    );
    ensure!(
        rt["options"]["ConfigPath"].as_str()
            == Some("/opt/cnfs/share/defaults/kata-containers/configuration-cnfs.toml"),
        "{rt}"
    );
    ensure!(
        dump["plugins"][CRI_V2]["containerd"]["runtimes"]
            .get("runc")
            .is_some(),
        "the site's runc runtime was kept"
    );
    drop(c);

    let out = run(&ctd, &root, "cnfs-deploy-3", "uninstall")?;
    ensure!(
        restarted(&root),
        "containerd was not restarted after uninstall: {out}"
    );
    ensure!(
        snapshot(&root) == before,
        "uninstall did not restore the node: {out}"
    );
    Ok(())
}

#[test]
fn the_installer_image_sets_up_a_containerd_2x_node_with_a_conf_d_drop_in() -> anyhow::Result<()> {
    let ctd = runner()?;
    let dir = TempDir::new("deploy-v3")?;
    let root = dir.path().join("root");
    node(&root, SITE_V3)?;
    let before = snapshot(&root);
    let out = run(&ctd, &root, "cnfs-deploy-v3", "install")?;
    ensure!(restarted(&root), "{out}");
    ensure!(
        std::fs::read_to_string(root.join("etc/containerd/config.toml"))? == SITE_V3,
        "containerd >= 2.2 imports conf.d: config.toml must stay as it was"
    );
    let drop_in: toml::Table =
        std::fs::read_to_string(root.join("etc/containerd/conf.d/cnfs.toml"))?.parse()?;
    ensure!(drop_in["version"].as_integer() == Some(3));
    let rt =
        &drop_in["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]["kata-cnfs"];
    ensure!(
        rt["runtime_path"].as_str() == Some("/opt/cnfs/bin/containerd-shim-cnfs-v2"),
        "{rt}"
    );
    ensure!(rt["sandboxer"].as_str() == Some("podsandbox"), "{rt}");
    run(&ctd, &root, "cnfs-deploy-v3u", "uninstall")?;
    ensure!(
        snapshot(&root) == before,
        "uninstall did not restore the node"
    );
    Ok(())
}

#[test]
fn a_node_without_kata_is_refused_and_left_untouched() -> anyhow::Result<()> {
    let ctd = runner()?;
    let dir = TempDir::new("deploy-nokata")?;
    let root = dir.path().join("root");
    node(&root, &site_v2())?;
    std::fs::remove_dir_all(root.join("opt/kata"))?;
    let before = snapshot(&root);
    let e = run(&ctd, &root, "cnfs-deploy-nokata", "install").expect_err("no Kata");
    let msg = format!("{e:#}");
    ensure!(msg.contains("is not on this node"), "{msg}");
    ensure!(
        snapshot(&root) == before,
        "files were written on a refused node"
    );
    Ok(())
}
