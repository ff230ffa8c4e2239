//! Kata's systemd images (osbuilder's default, `AGENT_INIT=no`), for real: a minimal Debian
//! root built with mmdebstrap as osbuilder builds its image roots, Kata's own units written
//! as osbuilder installs them (`kata-agent.service`, `kata-containers.target` pulled in by
//! `basic.target`, a `tmp.mount` when the distribution has none; contents from
//! src/agent/kata-agent.service.in and kata-containers.target), the kata-agent stand-in as
//! `/usr/bin/kata-agent`, then `cnfs-rootfs-builder kata-rootfs` exactly as the README says,
//! booted with the command line Kata's runtime gives an image
//! (`systemd.unit=kata-containers.target systemd.mask=systemd-networkd.*`).
//!
//! One difference from Kata: the root is unpacked as the initramfs (osbuilder's initrd
//! builder links `/init` to systemd for such roots) instead of a disk image, because Debian's
//! kernel has virtio-blk as a module and would need an initramfs to reach a root disk.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cnfs_protocols::agent;
use cnfs_testbed::artifacts::Parts;
use cnfs_testbed::ganesha::EXPORT;
use cnfs_testbed::netns::NetNs;
use cnfs_testbed::process::run;
use cnfs_testbed::vm::{ctx, Boot, Vm};
use cnfs_testbed::{mount_request, nfs_volume, Ganesha, TempDir};

const T: Duration = Duration::from_secs(60);
const KATA_IMAGE_PARAMS: &str = "cgroup_no_v1=all systemd.unified_cgroup_hierarchy=1 \
    systemd.unit=kata-containers.target systemd.mask=systemd-networkd.service \
    systemd.mask=systemd-networkd.socket";

const KATA_AGENT_SERVICE: &str = "\
[Unit]
Description=Kata Containers Agent
Wants=kata-containers.target

[Service]
StandardOutput=tty
Type=simple
ExecStart=/usr/bin/kata-agent
LimitNOFILE=1073741824
ExecStop=/bin/sync ; /usr/bin/systemctl --force poweroff
FailureAction=poweroff
OOMScoreAdjust=-997
";

const KATA_TARGET: &str = "\
[Unit]
Description=Kata Containers Agent Target
Requires=basic.target
Requires=tmp.mount
Wants=chronyd.service
Requires=kata-agent.service
Conflicts=rescue.service rescue.target
After=basic.target rescue.service rescue.target
AllowIsolate=yes
";

const TMP_MOUNT: &str = "\
[Unit]
Description=Temporary Directory (/tmp)
DefaultDependencies=no
Conflicts=umount.target
Before=local-fs.target umount.target

[Mount]
What=tmpfs
Where=/tmp
Type=tmpfs
Options=mode=1777,strictatime,nosuid,nodev
";

fn write(root: &Path, rel: &str, text: &str) -> anyhow::Result<()> {
    let p = root.join(rel);
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(p, text)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_systemd_image_starts_restarts_and_stops_cnfs_agent_with_kata_containers_target(
) -> anyhow::Result<()> {
    let parts = Parts::locate()?;
    let dir = TempDir::new("kata-systemd")?;
    let ns = NetNs::create()?;
    let nfs = Ganesha::start(&ns, dir.path())?;
    let root = dir.path().join("rootfs");
    std::fs::create_dir_all(&root)?;
    run(Command::new("tar")
        .arg("-xf")
        .arg(parts.systemd_rootfs()?)
        .arg("-C")
        .arg(&root))?;

    // What osbuilder adds for AGENT_INIT=no: the agent and Kata's units.
    std::fs::copy(
        parts.bin("kata-agent-standin"),
        root.join("usr/bin/kata-agent"),
    )?;
    write(
        &root,
        "usr/lib/systemd/system/kata-agent.service",
        KATA_AGENT_SERVICE,
    )?;
    write(
        &root,
        "usr/lib/systemd/system/kata-containers.target",
        KATA_TARGET,
    )?;
    write(&root, "etc/systemd/system/tmp.mount", TMP_MOUNT)?;
    std::fs::create_dir_all(root.join("etc/systemd/system/basic.target.wants"))?;
    symlink(
        "/usr/lib/systemd/system/kata-containers.target",
        root.join("etc/systemd/system/basic.target.wants/kata-containers.target"),
    )?;
    write(&root, "etc/hostname", "kata-guest\n")?;
    // Test-only: busybox for the stand-in's network setup, and the exec helper.
    std::fs::copy("/bin/busybox", root.join("usr/bin/busybox"))?;
    std::fs::copy(
        parts.bin("cnfs-test-exec"),
        root.join("usr/bin/cnfs-test-exec"),
    )?;

    // The README's recipe for systemd images, with Debian's kernel modules.
    run(Command::new(parts.bin("cnfs-rootfs-builder"))
        .arg("kata-rootfs")
        .arg("--rootfs")
        .arg(&root)
        .arg("--agent")
        .arg(parts.bin("cnfs-agent"))
        .args([
            "--modules-load",
            "virtio_net,vmw_vsock_virtio_transport,nfsv4",
        ])
        .arg("--kernel-tree")
        .arg(&parts.kernel_tree)
        .args(["--kernel-release", &parts.kernel_release])
        .args(["--module", "nfsv3"]))?;
    // systemd-modules-load uses libkmod, which reads depmod's binary indexes.
    run(Command::new("depmod")
        .arg("-b")
        .arg(&root)
        .arg(&parts.kernel_release))?;
    // initrd_builder.sh for AGENT_INIT=no: /init -> /lib/systemd/systemd.
    symlink("/lib/systemd/systemd", root.join("init"))?;
    let initrd = dir.path().join("kata-systemd.img");
    // A 150 MB root: gzip -1 rather than osbuilder's -9 (same format, a tenth of the time).
    cnfs_testbed::osbuilder::initrd(&root, &initrd, 1)?;
    let (vmlinux, _) = cnfs_testbed::osbuilder::kata_kernel(&parts, dir.path())?;
    let boot = Boot {
        kernel: vmlinux,
        initrd,
        append: Boot::test_append(&ns, KATA_IMAGE_PARAMS),
        memory: "1G".into(),
        qemu_extra: Vec::new(),
    };
    let vm = Vm::boot_with(&boot, &ns, dir.path()).await?;
    let g = &vm.exec;
    g.wait_ready(T).await?;

    // systemd is PID 1 and started both agents through kata-containers.target.
    assert_eq!(
        g.ok("readlink /proc/1/exe").await?,
        "/usr/lib/systemd/systemd\n"
    );
    let active = g
        .ok("systemctl is-active kata-containers.target kata-agent.service cnfs-agent.service")
        .await?;
    assert_eq!(active, "active\nactive\nactive\n");
    let wanted = g
        .ok("systemctl show -p WantedBy --value cnfs-agent.service")
        .await?;
    assert!(wanted.contains("kata-containers.target"), "{wanted}");
    let timing = g
        .ok("systemd-analyze blame --no-pager | grep -E 'cnfs-agent|kata-agent|systemd-modules-load' ; \
             systemctl show -p ActiveEnterTimestampMonotonic --value kata-containers.target cnfs-agent.service")
        .await
        .unwrap_or_default();
    eprintln!("systemd guest timing:\n{timing}");

    // The agent works: an NFSv4.1 mount with the rootfs's modules.
    let a = vm.agent().await?;
    a.mount(
        ctx(T),
        &mount_request(nfs_volume("data", &ns.host_ip, EXPORT, "4.1"), 0),
    )
    .await?;
    std::fs::write(nfs.export_dir.join("hi.txt"), "systemd guest\n")?;
    assert_eq!(
        g.ok("cat /run/cnfs/volumes/data/hi.txt").await?,
        "systemd guest\n"
    );
    // Its journal keeps kata-agent's JSON shape.
    let journal = g.ok("journalctl -u cnfs-agent -o cat --no-pager").await?;
    let line = journal
        .lines()
        .find(|l| l.contains("\"cnfs-agent serving\""))
        .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(line)?;
    for key in [
        "msg",
        "level",
        "ts",
        "pid",
        "version",
        "name",
        "source",
        "subsystem",
    ] {
        assert!(v.get(key).is_some(), "{key} missing from {line}");
    }

    // Restarted by its unit after kill -9, and it re-learns the volume.
    g.ok("kill -9 $(systemctl show -p MainPID --value cnfs-agent)")
        .await?;
    vm.wait_for_agent(Duration::from_secs(30)).await?;
    let restarts = g
        .ok("systemctl show -p NRestarts --value cnfs-agent")
        .await?;
    assert_eq!(restarts.trim(), "1");
    let list = vm
        .agent()
        .await?
        .list(ctx(T), &agent::ListRequest::new())
        .await?;
    assert_eq!(list.volumes.len(), 1);
    assert_eq!(list.volumes[0].state, "mounted");

    // Stops cleanly (SIGTERM, within a second), and the volume stays mounted.
    g.ok("systemctl stop cnfs-agent").await?;
    let state = g
        .ok("systemctl show -p ActiveState --value cnfs-agent; \
             systemctl show -p Result --value cnfs-agent")
        .await?;
    assert_eq!(state, "inactive\nsuccess\n");
    assert!(g
        .ok("cat /proc/mounts")
        .await?
        .contains("/run/cnfs/volumes/data"));
    drop(nfs);
    Ok(())
}
