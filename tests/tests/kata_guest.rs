//! Real Kata guests (issue 9): the README's admin recipe, run exactly as written, on an
//! initrd laid out the way Kata's osbuilder lays out `AGENT_INIT=yes` images
//! (tools/osbuilder/rootfs-builder/rootfs.sh and initrd-builder/initrd_builder.sh):
//! kata-agent moved to `/sbin/init`, `/init -> /sbin/init`, no `/usr/bin/kata-agent`, the
//! device nodes MAKEDEV makes, an empty `/etc/resolv.conf`, `var/run -> /run`, archived with
//! `find . | cpio -H newc -o | gzip -9`. kata-agent itself is the test-only stand-in
//! (`kata-agent-standin`, whose header lists the behaviours it reproduces). The kernel is
//! Debian's, turned by `cnfs-rootfs-builder kata-kernel` into the ELF Kata configures, booted
//! through its PVH entry as QEMU and Cloud Hypervisor do; its modules come in the overlay.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cnfs_protocols::agent;
use cnfs_testbed::artifacts::Parts;
use cnfs_testbed::ganesha::EXPORT;
use cnfs_testbed::guest::AGENT_PID_SH;
use cnfs_testbed::netns::NetNs;
use cnfs_testbed::process::run;
use cnfs_testbed::vm::{ctx, Boot, Vm};
use cnfs_testbed::{mount_request, nfs_volume, Ganesha, TempDir};

const T: Duration = Duration::from_secs(60);
/// Kata's default `kernel_params` (every arch): without them kata-agent powers the VM off on
/// a kernel without cgroup v1 memory and cpuset controllers, such as Debian's 6.12.
const KATA_PARAMS: &str = "cgroup_no_v1=all systemd.unified_cgroup_hierarchy=1";

/// A rootfs directory in osbuilder's agent-as-init layout on a merged-/usr root (Ubuntu's:
/// `bin`, `sbin` and `lib` are links into `usr/`), with the stand-in as kata-agent.
fn osbuilder_rootfs(dir: &Path, parts: &Parts) -> anyhow::Result<PathBuf> {
    let root = dir.join("rootfs");
    for d in [
        "usr/bin", "usr/sbin", "usr/lib", "etc", "proc", "sys", "dev", "run", "tmp", "var", "root",
    ] {
        std::fs::create_dir_all(root.join(d))?;
    }
    for (link, to) in [("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib")] {
        symlink(to, root.join(link))?;
    }
    // setup_agent_init: the agent binary is moved to /sbin/init.
    std::fs::copy(parts.bin("kata-agent-standin"), root.join("usr/sbin/init"))?;
    // initrd_builder.sh: /init -> /sbin/init when the rootfs has no /init.
    symlink("/sbin/init", root.join("init"))?;
    // ubuntu/rootfs_lib.sh: var/run -> /run, MAKEDEV console tty ttyS null zero fd.
    symlink("/run", root.join("var/run"))?;
    for (name, major, minor) in [
        ("console", 5, 1),
        ("tty", 5, 0),
        ("ttyS0", 4, 64),
        ("null", 1, 3),
        ("zero", 1, 5),
    ] {
        nix::sys::stat::mknod(
            &root.join("dev").join(name),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(major, minor),
        )?;
    }
    symlink("/proc/self/fd", root.join("dev/fd"))?;
    // rootfs.sh: an empty resolv.conf for the agent to bind the container's over.
    std::fs::write(root.join("etc/resolv.conf"), "")?;
    std::fs::write(root.join("etc/hostname"), "kata-guest\n")?;
    // A userland (Ubuntu's in a real image; busybox here) and the test's exec helper.
    std::fs::copy("/bin/busybox", root.join("usr/bin/busybox"))?;
    let applets = run(Command::new("/bin/busybox").arg("--list"))?;
    for a in applets.lines().filter(|a| !a.is_empty() && *a != "init") {
        let _ = symlink("busybox", root.join("usr/bin").join(a));
    }
    std::fs::copy(
        parts.bin("cnfs-test-exec"),
        root.join("usr/bin/cnfs-test-exec"),
    )?;
    Ok(root)
}

/// osbuilder's initrd command, with its gzip level.
fn osbuilder_initrd(root: &Path, out: &Path) -> anyhow::Result<()> {
    cnfs_testbed::osbuilder::initrd(root, out, 9)
}

/// The README's recipe: `cnfs-rootfs-builder initrd-overlay ... --gzip`, appended with `cat`.
fn with_cnfs_overlay(
    parts: &Parts,
    base: &Path,
    dir: &Path,
    extra: &[&str],
) -> anyhow::Result<PathBuf> {
    let overlay = dir.join("cnfs.cpio.gz");
    let mut b = Command::new(parts.bin("cnfs-rootfs-builder"));
    b.arg("initrd-overlay")
        .arg("--agent")
        .arg(parts.bin("cnfs-agent"))
        .arg("--gzip")
        .arg("--kernel-tree")
        .arg(&parts.kernel_tree)
        .args(["--kernel-release", &parts.kernel_release])
        .args(["--boot-module", "virtio_net"])
        .args(["--boot-module", "vmw_vsock_virtio_transport"])
        .args(["--module", "nfsv3", "--module", "nfsv4"])
        .args(extra)
        .arg("--out")
        .arg(&overlay);
    run(&mut b)?;
    let out = dir.join("kata-cnfs-initrd.img");
    run(Command::new("sh").args([
        "-c",
        &format!(
            "cat {} {} > {}",
            base.display(),
            overlay.display(),
            out.display()
        ),
    ]))?;
    Ok(out)
}

use cnfs_testbed::osbuilder::kata_kernel;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_recipe_boots_an_osbuilder_initrd_with_debians_kernel_and_a_supervised_agent(
) -> anyhow::Result<()> {
    let parts = Parts::locate()?;
    let dir = TempDir::new("kata")?;
    let ns = NetNs::create()?;
    let nfs = Ganesha::start(&ns, dir.path())?;
    let root = osbuilder_rootfs(dir.path(), &parts)?;
    let base = dir.path().join("kata-containers-initrd.img");
    osbuilder_initrd(&root, &base)?;
    let initrd = with_cnfs_overlay(&parts, &base, dir.path(), &[])?;
    let (vmlinux, report) = kata_kernel(&parts, dir.path())?;
    assert!(report.contains("PVH entry: yes"), "{report}");
    let elf = std::fs::read(&vmlinux)?;
    assert_eq!(
        &elf[..4],
        b"\x7fELF",
        "the kernel Kata boots is the ELF, not the bzImage"
    );

    let boot = Boot {
        kernel: vmlinux,
        initrd,
        append: Boot::test_append(&ns, KATA_PARAMS),
        memory: "512M".into(),
        qemu_extra: Vec::new(),
    };
    let vm = Vm::boot_with(&boot, &ns, dir.path()).await?;
    let g = &vm.exec;
    g.wait_ready(T).await?;
    // PID 1 is kata-agent (the stand-in at /sbin/init), not cnfs-agent; cnfs-agent runs under
    // its supervisor, a child of PID 1.
    let pid1 = g
        .ok("readlink /proc/1/exe; tr '\\0' ' ' < /proc/1/cmdline")
        .await?;
    // Started as /sbin/init, which is usr/sbin/init on a merged-/usr root.
    assert_eq!(pid1, "/usr/sbin/init\n/sbin/init ");
    let tree = g
        .ok(&format!(
            "{AGENT_PID_SH}; sup=$(sed -n 's/^PPid:[[:space:]]*//p' /proc/$a/status); \
             echo $(sed -n 's/^PPid:[[:space:]]*//p' /proc/$sup/status) $(readlink /proc/$sup/exe)"
        ))
        .await?;
    // The supervisor is the overlay's /init (a copy of cnfs-agent) that forked before init.
    assert_eq!(tree.trim(), "1 /init", "supervisor's parent and binary");
    let console = vm.console_text();
    assert!(
        console.contains("loaded boot modules virtio_net vmw_vsock_virtio_transport"),
        "{console}"
    );
    let console = console_with(&vm, "kata-agent stand-in ready").await;
    assert!(console.contains("kata-agent stand-in ready"), "{console}");
    // The overlay left the merged-/usr links alone (a `lib` or `sbin` entry would replace them).
    let links = g
        .ok("for l in /bin /sbin /lib; do readlink $l; done")
        .await?;
    assert_eq!(links, "usr/bin\nusr/sbin\nusr/lib\n");
    // /run is kata-agent's tmpfs, mounted before cnfs-agent started (nothing hidden under it).
    assert!(g
        .ok("test -S /run/cnfs/agent.sock && echo ok")
        .await?
        .contains("ok"));

    // The guest kernel mounts NFS with modules from the overlay, loaded by cnfs-agent.
    let a = vm.agent().await?;
    a.mount(
        ctx(T),
        &mount_request(nfs_volume("data", &ns.host_ip, EXPORT, "4.1"), 0),
    )
    .await?;
    std::fs::write(nfs.export_dir.join("hello.txt"), "from the server\n")?;

    // NFSv4 owners. ganesha (default configuration) sends `root@<domain>` for uid 0 and
    // `daemon@<domain>` for uid 1, which its host can name, and "1234" for an id it cannot:
    // the guest maps the number itself, and root through cnfs-agent's request-key helper;
    // daemon is not in the guest, stays unmapped, and Stats says why.
    for (file, id) in [("by-root", 0u32), ("by-1234", 1234), ("by-daemon", 1)] {
        let p = nfs.export_dir.join(file);
        std::fs::write(&p, file)?;
        std::os::unix::fs::chown(&p, Some(id), Some(id))?;
    }
    let owners = g
        .ok("cd /run/cnfs/volumes/data && stat -c '%n %u %g' by-root by-1234 by-daemon")
        .await?;
    assert_eq!(
        owners,
        "by-root 0 0\nby-1234 1234 1234\nby-daemon 4294967294 4294967294\n"
    );
    let s = a
        .stats(
            ctx(T),
            &agent::StatsRequest {
                name: "data".into(),
                ..Default::default()
            },
        )
        .await?;
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    // A volume whose root the server names by a user the guest does not know.
    std::fs::create_dir_all(nfs.export_dir.join("owned"))?;
    std::os::unix::fs::chown(nfs.export_dir.join("owned"), Some(1), Some(1))?;
    a.mount(
        ctx(T),
        &mount_request(
            nfs_volume("fresh", &ns.host_ip, &format!("{EXPORT}/owned"), "4.1"),
            0,
        ),
    )
    .await?;
    let s = a
        .stats(
            ctx(T),
            &agent::StatsRequest {
                name: "fresh".into(),
                ..Default::default()
            },
        )
        .await?;
    assert!(
        s.warnings
            .iter()
            .any(|w| w.contains("4294967294") && w.contains("Only_Numeric_Owners")),
        "{:?}",
        s.warnings
    );
    a.unmount(
        ctx(T),
        &agent::UnmountRequest {
            name: "fresh".into(),
            ..Default::default()
        },
    )
    .await?;
    // A container set up as rustjail does, with the bind mount the shim injects.
    g.ok(
        "mkdir -p /run/ctr/rootfs/bin && cp /bin/busybox /run/ctr/rootfs/bin/ && \
          for a in sh cat echo sleep; do ln -s busybox /run/ctr/rootfs/bin/$a; done",
    )
    .await?;
    let out = g
        .ok("/sbin/init container --rootfs /run/ctr/rootfs \
             --bind /proc/1/root/run/cnfs/volumes/data:/data:bind,nosuid,nodev \
             -- /bin/busybox sh -c 'cat /data/hello.txt && echo ctr > /data/from-ctr.txt'")
        .await?;
    assert_eq!(out, "from the server\n");
    assert_eq!(
        std::fs::read_to_string(nfs.export_dir.join("from-ctr.txt"))?,
        "ctr\n"
    );

    // Supervised: killed outright, cnfs-agent is back, knows its volume, and says so.
    g.ok(&format!("{AGENT_PID_SH}; kill -9 $a")).await?;
    vm.wait_for_agent(Duration::from_secs(30)).await?;
    let list = vm
        .agent()
        .await?
        .list(ctx(T), &agent::ListRequest::new())
        .await?;
    assert_eq!(list.volumes.len(), 1);
    assert_eq!(list.volumes[0].state, "mounted");
    // The supervisor's line may reach the console a moment after the new agent answers
    // (or the old one's last answer): waited for, not raced.
    let said =
        cnfs_testbed::process::wait_for(Duration::from_secs(30), "the restart line", || async {
            vm.console_text()
                .contains("cnfs-agent was killed by SIGKILL; restarting")
                .then_some(())
        })
        .await;
    assert!(said.is_ok(), "no restart line on the console");

    // A running container holds its own copy of the volume (a bind in its namespace): an
    // Unmount would leave it reading and writing while reporting the volume gone, so it is
    // refused naming the container; forced, it goes ahead and names who still holds it.
    g.ok("(/sbin/init container --rootfs /run/ctr/rootfs \
          --bind /proc/1/root/run/cnfs/volumes/data:/data:bind,nosuid,nodev \
          -- /bin/sleep 600 </dev/null >/dev/null 2>&1 &); sleep 1")
        .await?;
    let a = vm.agent().await?;
    let unmount = |force: bool| agent::UnmountRequest {
        name: "data".into(),
        force,
        ..Default::default()
    };
    let e = a.unmount(ctx(T), &unmount(false)).await.expect_err("held");
    assert_eq!(
        cnfs_testbed::code_of(&e),
        ttrpc::Code::FAILED_PRECONDITION,
        "{e:?}"
    );
    let msg = cnfs_testbed::message_of(&e);
    assert!(
        msg.contains("(sleep) at /data") && msg.contains("force"),
        "{msg}"
    );
    assert!(
        g.ok("grep -c /run/cnfs/volumes/data /proc/mounts")
            .await?
            .trim()
            == "1"
    );
    let r = a.unmount(ctx(T), &unmount(true)).await?;
    assert!(
        r.held_by.iter().any(|h| h.contains("(sleep) at /data")),
        "{:?}",
        r.held_by
    );
    assert!(!g
        .ok("cat /proc/mounts")
        .await?
        .contains("/run/cnfs/volumes/data"));
    drop(nfs);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_then_falls_back_to_osbuilders_init_and_no_init_at_all_is_one_clear_line(
) -> anyhow::Result<()> {
    let parts = Parts::locate()?;
    let dir = TempDir::new("kata-init")?;
    let ns = NetNs::create()?;
    let (vmlinux, _) = kata_kernel(&parts, dir.path())?;

    // The old default (`then=/usr/bin/kata-agent`), which osbuilder's images do not have:
    // the guest still boots its kata-agent, and the console says what happened.
    let root = osbuilder_rootfs(dir.path(), &parts)?;
    let base = dir.path().join("base.img");
    osbuilder_initrd(&root, &base)?;
    let initrd = with_cnfs_overlay(
        &parts,
        &base,
        dir.path(),
        &["--then", "/usr/bin/kata-agent"],
    )?;
    let boot = Boot {
        kernel: vmlinux.clone(),
        initrd,
        append: Boot::test_append(&ns, KATA_PARAMS),
        memory: "512M".into(),
        qemu_extra: Vec::new(),
    };
    let vm = Vm::boot_with(&boot, &ns, dir.path()).await?;
    let console = vm.console_text();
    assert!(
        console
            .contains("exec /usr/bin/kata-agent: No such file or directory; trying the next place"),
        "{console}"
    );
    let console = console_with(&vm, "kata-agent stand-in ready").await;
    assert!(console.contains("kata-agent stand-in ready"), "{console}");
    drop(vm);

    // No init anywhere: PID 1 says what it tried, in one line, before the kernel panics.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(empty.join("dev"))?;
    nix::sys::stat::mknod(
        &empty.join("dev/console"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        nix::sys::stat::makedev(5, 1),
    )?;
    let base = dir.path().join("empty.img");
    osbuilder_initrd(&empty, &base)?;
    let nothing = dir.path().join("nothing");
    std::fs::create_dir_all(&nothing)?;
    let initrd = with_cnfs_overlay(&parts, &base, &nothing, &[])?;
    let boot = Boot {
        kernel: vmlinux,
        initrd,
        append: Boot::test_append(&ns, KATA_PARAMS),
        memory: "512M".into(),
        qemu_extra: Vec::new(),
    };
    let dir2 = TempDir::new("kata-noinit")?;
    let mut vm = Vm::start(&boot, &ns, dir2.path()).await?;
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while vm.running() && std::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let console = vm.console_text();
    let line = console
        .lines()
        .find(|l| l.contains("FATAL: could not start the guest's init"))
        .unwrap_or_default();
    for tried in [
        "/sbin/init (No such file or directory)",
        "/usr/bin/kata-agent",
        "/lib/systemd/systemd",
    ] {
        assert!(
            line.contains(tried),
            "{tried} not named in {line:?}\n{console}"
        );
    }
    assert!(line.contains("then= in /etc/cnfs/init.conf"), "{line}");
    Ok(())
}

/// The console once it shows `needle`, or after 30 s: the guest's processes start in
/// parallel, so the agent may answer before the stand-in has printed its line.
async fn console_with(vm: &Vm, needle: &str) -> String {
    let until = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let console = vm.console_text();
        if console.contains(needle) || std::time::Instant::now() > until {
            return console;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
