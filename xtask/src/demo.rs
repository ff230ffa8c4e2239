//! `cargo xtask demo`: the main job, narrated. A real QEMU guest's kernel mounts a real
//! nfs-ganesha export on request from the host over hybrid vsock; data moves both ways.

use std::time::{Duration, Instant};

use cnfs_protocols::agent;
use cnfs_testbed::{ganesha::EXPORT, vm::ctx, TestBed};

pub async fn run(cephfs: bool) -> anyhow::Result<()> {
    let t = Instant::now();
    println!("demo: starting a network namespace, nfs-ganesha and a QEMU guest ...");
    let bed = TestBed::start().await?;
    println!(
        "demo: guest up in {:.1?}; NFS server {} (export {EXPORT}), guest {}",
        t.elapsed(),
        bed.ns.host_ip,
        bed.ns.guest_ip
    );
    let agent = bed.vm.agent().await?;
    let ping = agent
        .ping(ctx(Duration::from_secs(5)), &agent::PingRequest::new())
        .await?;
    println!(
        "demo: cnfs-agent {} answers over {}; file systems: {}; capabilities kept: {}",
        ping.version,
        bed.vm.agent_address(),
        ping.filesystems.join(","),
        ping.capabilities.join(",")
    );

    let mut spec = agent::VolumeSpec {
        name: "demo".into(),
        ..Default::default()
    };
    spec.set_nfs(agent::NfsSource {
        server: bed.ns.host_ip.clone(),
        export: EXPORT.into(),
        version: "4.1".into(),
        ..Default::default()
    });
    let req = agent::MountRequest {
        volume: protobuf::MessageField::some(spec),
        sandbox_id: "demo-sandbox".into(),
        ..Default::default()
    };
    let m = agent.mount(ctx(Duration::from_secs(60)), &req).await?;
    println!("demo: Mount -> {} in {} ms", m.mount_point, m.duration_ms);
    let mounts = bed
        .vm
        .exec
        .ok("grep /run/cnfs/volumes /proc/mounts")
        .await?;
    println!("demo: guest /proc/mounts: {}", mounts.trim());

    bed.vm
        .exec
        .ok("echo 'written by the guest kernel' > /run/cnfs/volumes/demo/from-guest.txt")
        .await?;
    let on_host = std::fs::read_to_string(bed.nfs.export_dir.join("from-guest.txt"))?;
    println!(
        "demo: host reads the export's from-guest.txt: {:?}",
        on_host.trim()
    );
    std::fs::write(
        bed.nfs.export_dir.join("from-host.txt"),
        "written on the server\n",
    )?;
    let in_guest = bed
        .vm
        .exec
        .ok("cat /run/cnfs/volumes/demo/from-host.txt")
        .await?;
    println!(
        "demo: guest reads from-host.txt through its mount: {:?}",
        in_guest.trim()
    );

    let s = agent
        .stats(
            ctx(Duration::from_secs(10)),
            &agent::StatsRequest {
                name: "demo".into(),
                ..Default::default()
            },
        )
        .await?;
    println!(
        "demo: Stats -> {:?}, {} MiB total, {} MiB available",
        s.health.enum_value_or_default(),
        s.total_bytes >> 20,
        s.available_bytes >> 20
    );
    let u = agent
        .unmount(
            ctx(Duration::from_secs(30)),
            &agent::UnmountRequest {
                name: "demo".into(),
                ..Default::default()
            },
        )
        .await?;
    println!(
        "demo: Unmount -> method {} in {} ms",
        u.method, u.duration_ms
    );
    if on_host.trim() != "written by the guest kernel" || in_guest.trim() != "written on the server"
    {
        anyhow::bail!("demo: data did not round-trip");
    }
    if cephfs {
        ceph_scenario(&bed).await?;
    }
    println!(
        "demo: OK in {:.1?}; everything it started is stopped now",
        t.elapsed()
    );
    Ok(())
}

/// The second scenario (`--cephfs`): a real single-node Ceph cluster in the same namespace,
/// CephFS mounted by the guest kernel with a key restricted to one directory.
async fn ceph_scenario(bed: &TestBed) -> anyhow::Result<()> {
    let t = Instant::now();
    println!("demo: starting Ceph (mon, mgr, memstore OSD, MDS) in the namespace ...");
    let ceph = cnfs_testbed::ceph::Ceph::start(&bed.ns, bed.dir.path()).await?;
    println!(
        "demo: Ceph up in {:.1?}; fsid {}, monitor {}",
        t.elapsed(),
        ceph.fsid(),
        ceph.mon_v2()
    );
    let key = ceph.authorize("demo", "/demo", "rw")?;
    let mut spec = agent::VolumeSpec {
        name: "ceph-demo".into(),
        ..Default::default()
    };
    spec.set_cephfs(agent::CephFsSource {
        monitors: vec![ceph.mon_v2()],
        fs_name: cnfs_testbed::ceph::FS_NAME.into(),
        path: "/demo".into(),
        client: "demo".into(),
        secret: key.clone(),
        fsid: ceph.fsid(),
        ..Default::default()
    });
    spec.options.insert("ms_mode".into(), "secure".into());
    let agent = bed.vm.agent().await?;
    let m = agent
        .mount(
            ctx(Duration::from_secs(90)),
            &cnfs_testbed::mount_request(spec, 60_000),
        )
        .await?;
    println!(
        "demo: Mount CephFS /demo (client.demo, msgr2 secure) -> {} in {} ms",
        m.mount_point, m.duration_ms
    );
    let line = bed
        .vm
        .exec
        .ok("grep ' /run/cnfs/volumes/ceph-demo ' /proc/mounts")
        .await?;
    println!(
        "demo: guest /proc/mounts (the key is hidden): {}",
        line.trim()
    );
    if line.contains(&key) {
        anyhow::bail!("demo: the key is visible in /proc/mounts");
    }
    bed.vm
        .exec
        .ok("echo 'written by the guest kernel' > /run/cnfs/volumes/ceph-demo/from-guest.txt && sync")
        .await?;
    let back = ceph.try_read_file("/demo/from-guest.txt")?;
    println!(
        "demo: libcephfs on the host reads: {:?}",
        String::from_utf8_lossy(&back).trim()
    );
    agent
        .unmount(
            ctx(Duration::from_secs(30)),
            &agent::UnmountRequest {
                name: "ceph-demo".into(),
                ..Default::default()
            },
        )
        .await?;
    if back != b"written by the guest kernel\n" {
        anyhow::bail!("demo: CephFS data did not round-trip");
    }
    Ok(())
}
