//! `cargo xtask demo`: the main job, narrated. A real QEMU guest's kernel mounts a real
//! nfs-ganesha export on request from the host over hybrid vsock; data moves both ways.

use std::time::{Duration, Instant};

use cnfs_protocols::agent;
use cnfs_testbed::{ganesha::EXPORT, vm::ctx, TestBed};

pub async fn run() -> anyhow::Result<()> {
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
    println!(
        "demo: OK in {:.1?}; everything it started is stopped now",
        t.elapsed()
    );
    Ok(())
}
