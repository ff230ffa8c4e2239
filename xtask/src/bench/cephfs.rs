//! The two CephFS clients side by side, in one guest and one run: the test bed's file system
//! mounted by the guest kernel (a CNFS CephFS volume through the agent's Mount) and by
//! Debian's ceph-fuse (as root, FUSE options as defaults), each in its own directory of the
//! same file system (`/kernel`, `/fuse`), the data path's workloads on each, alternating,
//! medians of 3. Both speak msgr2 in crc mode (the kernel's `ms_mode=crc`, ceph-fuse's
//! `ms_client_mode`/`ms_mon_client_mode`), as client.admin.
//!
//! ceph-fuse is not in the test initrd that every test boots: this guest boots the test initrd
//! with a cpio of its own appended (`images::ceph_fuse_cpio`: ceph-fuse and its library
//! closure under a private prefix), and runs it through its own loader, as the agent's tool
//! runner runs cryptsetup. Its configuration and keyring are written into the guest at run
//! time.
//!
//! What "cold" means differs: the cold steps drop the guest kernel's caches, which drops the
//! kernel client's inodes and with them their caps; ceph-fuse's own caches (inodes, caps and
//! the object cacher's data, in the daemon's memory) are not the kernel's to drop. The probe
//! after the rounds shows what each client still held and fetched.

use std::time::{Duration, Instant};

use super::data_path::{print_table, rounds, Path_};
use super::median;
use crate::images::BENCH_PREFIX;
use anyhow::Context;
use cnfs_protocols::agent;
use cnfs_testbed::ceph::{Ceph, FS_NAME};
use cnfs_testbed::vm::{ctx, Boot};
use cnfs_testbed::{mount_request, Artifacts, GuestExec, NetNs, TempDir, Vm};

const T: Duration = Duration::from_secs(120);
/// The kernel client's volume, at /run/cnfs/volumes/VOLUME.
const VOLUME: &str = "kcephfs";
const FUSE_MNT: &str = "/mnt/ceph-fuse";
const CONF: &str = "/etc/ceph/ceph.conf";
const KEYRING: &str = "/etc/ceph/ceph.client.admin.keyring";
const PID_FILE: &str = "/run/ceph-fuse.pid";
/// ceph-fuse's own log, and its stdout/stderr.
const LOG: &str = "/tmp/ceph-fuse.log";
const OUT: &str = "/tmp/ceph-fuse.out";
/// Mounts after the first one, per client.
const REMOUNTS: usize = 3;
/// The probe: files stat'ed and MiB read, cold.
const PROBE_FILES: u64 = 2000;
const PROBE_MIB: u64 = 64;

fn kernel_volume(ceph: &Ceph, key: &str) -> agent::MountRequest {
    let mut spec = agent::VolumeSpec {
        name: VOLUME.into(),
        ..Default::default()
    };
    spec.set_cephfs(agent::CephFsSource {
        monitors: vec![ceph.mon_v2()],
        fs_name: FS_NAME.into(),
        path: "/kernel".into(),
        client: "admin".into(),
        secret: key.into(),
        fsid: ceph.fsid(),
        ..Default::default()
    });
    spec.options.insert("ms_mode".into(), "crc".into());
    mount_request(spec, 60_000)
}

/// ceph-fuse through its own loader and libraries; `args` after the program.
fn ceph_fuse(args: &str) -> String {
    format!(
        "{BENCH_PREFIX}/lib/ld-linux-x86-64.so.2 --inhibit-cache --library-path \
         {BENCH_PREFIX}/lib --argv0 ceph-fuse {BENCH_PREFIX}/bin/ceph-fuse {args}"
    )
}

/// Writes ceph-fuse's configuration and client.admin's keyring (0600) into the guest.
async fn configure(g: &GuestExec, ceph: &Ceph, key: &str) -> anyhow::Result<()> {
    // The key goes into a shell command: base64 only.
    anyhow::ensure!(
        !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+/=".contains(c)),
        "client.admin's key is not base64"
    );
    g.ok(&format!(
        "set -e; mkdir -p /etc/ceph {FUSE_MNT} && ln -sf /proc/mounts /etc/mtab && \
         cat > {CONF} <<'EOF'\n\
         [global]\n\
         fsid = {fsid}\n\
         mon host = v2:{mon}\n\
         ms client mode = crc\n\
         ms mon client mode = crc\n\
         keyring = {KEYRING}\n\
         log file = {LOG}\n\
         run dir = /run/ceph\n\
         admin socket = /run/ceph/ceph-fuse.asok\n\
         pid file = {PID_FILE}\n\
         EOF\n\
         umask 077 && printf '[client.admin]\\n\\tkey = %s\\n' '{key}' > {KEYRING} && \
         {{ [ -e /dev/fuse ] || modprobe fuse; }}",
        fsid = ceph.fsid(),
        mon = ceph.mon_v2(),
    ))
    .await?;
    Ok(())
}

/// Mounts `/fuse` of the file system at [`FUSE_MNT`] with ceph-fuse; the time until it has
/// daemonized with the mount in place (ceph-fuse's parent exits then).
async fn mount_fuse(g: &GuestExec) -> anyhow::Result<Duration> {
    let cmd = ceph_fuse(&format!(
        "-c {CONF} -n client.admin --client_fs={FS_NAME} --client_mountpoint=/fuse {FUSE_MNT} \
         </dev/null >>{OUT} 2>&1"
    ));
    let t = Instant::now();
    let out = g.run(&cmd, T).await?;
    let took = t.elapsed();
    if out.code != 0 {
        let logs = g
            .ok(&format!(
                "head -c 3000 {OUT}; grep -E '^[^ ]+ [0-9a-f]+ -1 ' {LOG} | tail -n 20; true"
            ))
            .await
            .unwrap_or_default();
        anyhow::bail!("ceph-fuse exited {}:\n{logs}", out.code);
    }
    g.ok(&format!("grep -q ' {FUSE_MNT} fuse' /proc/mounts"))
        .await
        .context("ceph-fuse exited 0 but nothing is mounted")?;
    Ok(took)
}

async fn unmount_fuse(g: &GuestExec) -> anyhow::Result<()> {
    g.ok(&format!(
        "p=$(cat {PID_FILE}) && umount {FUSE_MNT} && \
         while kill -0 $p 2>/dev/null; do sleep 0.1; done"
    ))
    .await?;
    Ok(())
}

async fn unmount_kernel(a: &cnfs_protocols::agent_ttrpc::AgentClient) -> anyhow::Result<()> {
    a.unmount(
        ctx(T),
        &agent::UnmountRequest {
            name: VOLUME.into(),
            ..Default::default()
        },
    )
    .await?;
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The guest's received bytes and packets on eth0 (all of its traffic with the cluster).
async fn eth0_rx(g: &GuestExec) -> anyhow::Result<(u64, u64)> {
    let line = g.ok("grep 'eth0:' /proc/net/dev").await?;
    let mut f = line
        .split_once(':')
        .map(|(_, r)| r)
        .unwrap_or_default()
        .split_whitespace()
        .map(|v| v.parse::<u64>().unwrap_or(0));
    Ok((f.next().unwrap_or(0), f.next().unwrap_or(0)))
}

/// Caps each client holds per the MDS (`session ls`): (kernel, ceph-fuse).
fn caps(ceph: &Ceph) -> (i64, i64) {
    let text = ceph
        .ceph(&["tell", &ceph.mds_name(), "session", "ls"])
        .unwrap_or_default();
    let sessions: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap_or_default();
    let of = |kernel: bool| {
        sessions
            .iter()
            .filter(|s| s["client_metadata"]["kernel_version"].is_string() == kernel)
            .map(|s| s["num_caps"].as_i64().unwrap_or(0))
            .sum()
    };
    (of(true), of(false))
}

/// Runs one `cnfs-io-bench` phase in the guest: its seconds.
async fn io_bench(g: &GuestExec, args: &str) -> anyhow::Result<f64> {
    let out = g.run(&format!("cnfs-io-bench {args}"), T).await?;
    anyhow::ensure!(
        out.code == 0,
        "cnfs-io-bench {args}: {}{}",
        out.stdout,
        out.stderr
    );
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim())
        .with_context(|| format!("cnfs-io-bench {args}: {:?}", out.stdout))?;
    Ok(v["secs"].as_f64().unwrap_or(f64::NAN))
}

/// A cold `stat` of every probe file and a cold read of the probe file on `p`: seconds and
/// what the guest received meanwhile.
async fn cold_steps(g: &GuestExec, p: &Path_, when: &str) -> anyhow::Result<()> {
    let d = format!("{}/probe", p.root);
    let (_, pk0) = eth0_rx(g).await?;
    let stat = io_bench(g, &format!("stat {d} {PROBE_FILES}")).await?;
    let (b1, pk1) = eth0_rx(g).await?;
    let read = io_bench(g, &format!("read {d}")).await?;
    let (b2, _) = eth0_rx(g).await?;
    println!(
        "  {:<36} {stat:>7.3} {:>8} {read:>8.3} {:>8.1}",
        format!("{}, {when}", p.label),
        pk1.saturating_sub(pk0),
        b2.saturating_sub(b1) as f64 / (1 << 20) as f64
    );
    Ok(())
}

/// After the rounds: what a cold step finds in each client. Files are created and a file
/// written on both paths and the guest's caches dropped, as before a cold step of the rounds;
/// then the caps each client still holds (per the MDS), and per path a cold `stat` of every
/// file and a cold read of the file, with what the guest received from the network meanwhile;
/// then the same after each client was unmounted and mounted again (nothing cached anywhere).
async fn probe(
    g: &GuestExec,
    a: &cnfs_protocols::agent_ttrpc::AgentClient,
    ceph: &Ceph,
    key: &str,
    paths: &[Path_],
) -> anyhow::Result<()> {
    for p in paths {
        let d = format!("{}/probe", p.root);
        g.ok(&format!("mkdir -p {d}")).await?;
        io_bench(g, &format!("create {d} {PROBE_FILES}")).await?;
        io_bench(g, &format!("write {d} {PROBE_MIB}")).await?;
    }
    g.ok("sync; echo 3 > /proc/sys/vm/drop_caches").await?;
    let (k, f) = caps(ceph);
    println!(
        "\nprobe: {PROBE_FILES} files and a {PROBE_MIB} MiB file on each path; after the guest's \
         drop_caches the MDS counts {k} caps held by the kernel client, {f} by ceph-fuse"
    );
    println!(
        "  {:<36} {:>7} {:>8} {:>8} {:>8}",
        "", "stat s", "packets", "read s", "MiB in"
    );
    for p in paths {
        cold_steps(g, p, "after drop_caches").await?;
    }
    unmount_kernel(a).await?;
    a.mount(ctx(T), &kernel_volume(ceph, key)).await?;
    unmount_fuse(g).await?;
    mount_fuse(g).await?;
    for p in paths {
        cold_steps(g, p, "remounted").await?;
    }
    for p in paths {
        g.ok(&format!("rm -rf {}/probe", p.root)).await?;
    }
    Ok(())
}

pub async fn run() -> anyhow::Result<()> {
    println!("\nbench: CephFS (the guest kernel's client vs ceph-fuse, same file system) ...");
    let art = Artifacts::locate()?;
    let dir = TempDir::new("bench-cephfs")?;
    // The test initrd with ceph-fuse appended: for this guest only.
    let extra = crate::images::ceph_fuse_cpio(&dir.path().join("ceph-fuse-cpio"))?;
    let initrd = dir.path().join("initrd-cephfs-bench.img");
    let mut bytes = std::fs::read(&art.initrd)?;
    bytes.extend_from_slice(&extra);
    std::fs::write(&initrd, bytes)?;
    let ns = NetNs::create()?;
    let ceph = Ceph::start(&ns, dir.path()).await?;
    for d in ["/kernel", "/fuse"] {
        ceph.try_mkdir(d)?;
    }
    let key = ceph.admin_key();
    let boot = Boot {
        kernel: art.kernel.clone(),
        initrd,
        append: Boot::test_append(&ns, ""),
        memory: "1024M".into(),
        qemu_extra: Vec::new(),
    };
    let vm = Vm::boot_with(&boot, &ns, dir.path()).await?;
    let g = &vm.exec;
    let a = vm.agent().await?;
    configure(g, &ceph, &key).await?;
    let version = g.ok(&ceph_fuse("--version")).await?;

    // Mount times: the first of each (the kernel loads ceph.ko, ceph-fuse its ~26 MB of
    // libraries), then REMOUNTS more, alternating; the last ones stay for the rounds.
    let t = Instant::now();
    a.mount(ctx(T), &kernel_volume(&ceph, &key)).await?;
    let kernel_first = t.elapsed();
    let fuse_first = mount_fuse(g).await?;
    let (mut kernel_again, mut fuse_again, mut exec) = (vec![], vec![], vec![]);
    for _ in 0..REMOUNTS {
        unmount_kernel(&a).await?;
        let t = Instant::now();
        a.mount(ctx(T), &kernel_volume(&ceph, &key)).await?;
        kernel_again.push(ms(t.elapsed()));
        unmount_fuse(g).await?;
        fuse_again.push(ms(mount_fuse(g).await?));
        let t = Instant::now();
        g.ok("true").await?;
        exec.push(ms(t.elapsed()));
    }

    let paths = [
        Path_ {
            label: "kernel CephFS".into(),
            root: format!("/run/cnfs/volumes/{VOLUME}"),
            nfs: false,
        },
        Path_ {
            label: "ceph-fuse".into(),
            root: FUSE_MNT.into(),
            nfs: false,
        },
    ];
    let (mut secs, ops) = rounds(g, &paths, "cephfs").await?;
    println!(
        "guest: {} accel, {}; {} (the cluster: Debian's ceph 16.2, memstore OSD)",
        cnfs_testbed::vm::accel(),
        g.ok("uname -r").await?.trim(),
        version.trim()
    );
    println!(
        "mount, ms: kernel (agent Mount) first {:.0} (loads ceph.ko), then median {:.0}; \
         ceph-fuse first {:.0}, then median {:.0} (through the exec helper: {:.0} of it)",
        ms(kernel_first),
        median(&mut kernel_again),
        ms(fuse_first),
        median(&mut fuse_again),
        median(&mut exec),
    );
    print_table(&paths, &mut secs, &ops);
    println!(
        "  (none: no NFS path here)\n\
         cold steps: the guest's drop_caches does not reach ceph-fuse's own caches (the probe)\n\
         mounts:"
    );
    for p in &paths {
        let line = g
            .ok(&format!("grep ' {} ' /proc/mounts", p.root))
            .await
            .unwrap_or_default();
        println!("  {}: {}", p.label, line.trim());
    }
    let rss = g
        .ok(&format!("grep VmRSS /proc/$(cat {PID_FILE})/status"))
        .await
        .unwrap_or_default();
    println!(
        "  ceph-fuse after the rounds: {}",
        rss.trim().replace('\t', " ")
    );
    probe(g, &a, &ceph, &key, &paths).await?;
    unmount_fuse(g).await?;
    unmount_kernel(&a).await?;
    drop(vm);
    drop(ceph);
    Ok(())
}
