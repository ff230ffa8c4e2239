//! Encrypted volumes against plain ones, in one guest and one run: the same ganesha export
//! mounted plainly (NFSv4.1), as a `luks2` volume (a 1 GiB container on it: loop, dm-crypt,
//! ext4) and as a `gocryptfs` volume (file-level, a FUSE daemon in the data path), the data
//! path's workloads on each, alternating. Also the one-off costs (first use:
//! format; later: open), whether the loop does direct I/O, and which xts(aes) implementation
//! the guest kernel picked (under TCG the AES instructions are emulated too, so the ratio on
//! KVM is better).

use std::time::{Duration, Instant};

use super::data_path::{print_table, rounds, Path_};
use cnfs_protocols::agent;
use cnfs_testbed::ganesha::EXPORT;
use cnfs_testbed::vm::{ctx, Boot};
use cnfs_testbed::{mount_request, nfs_volume, Artifacts, Ganesha, NetNs, TempDir, Vm};

const T: Duration = Duration::from_secs(300);
const SIZE: u64 = 1 << 30;

fn luks2(server: &str, key: &[u8]) -> agent::VolumeSpec {
    let mut spec = nfs_volume("enc", server, &format!("{EXPORT}/enc"), "4.1");
    spec.encryption = protobuf::MessageField::some(agent::Encryption {
        mode: "luks2".into(),
        key: key.to_vec(),
        size_bytes: SIZE,
        ..Default::default()
    });
    spec
}

fn gocryptfs(server: &str, key: &[u8]) -> agent::VolumeSpec {
    let mut spec = nfs_volume("shr", server, &format!("{EXPORT}/shr"), "4.1");
    spec.encryption = protobuf::MessageField::some(agent::Encryption {
        mode: "gocryptfs".into(),
        key: key.to_vec(),
        ..Default::default()
    });
    spec
}

pub async fn run() -> anyhow::Result<()> {
    println!("\nbench: encryption (NFSv4.1 plain vs luks2 vs gocryptfs on the same export) ...");
    let art = Artifacts::locate()?;
    let dir = TempDir::new("bench-enc")?;
    let ns = NetNs::create()?;
    let nfs = Ganesha::start(&ns, dir.path())?;
    for d in ["plain", "enc", "shr"] {
        std::fs::create_dir_all(nfs.export_dir.join(d))?;
    }
    let boot = Boot {
        kernel: art.kernel.clone(),
        initrd: art.initrd.clone(),
        append: Boot::test_append(&ns, ""),
        memory: "1024M".into(),
        qemu_extra: Vec::new(),
    };
    let vm = Vm::boot_with(&boot, &ns, dir.path()).await?;
    let g = &vm.exec;
    let a = vm.agent().await?;
    let server = ns.host_ip.clone();
    let key: Vec<u8> = (0..64u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(11))
        .collect();

    a.mount(
        ctx(T),
        &mount_request(
            nfs_volume("plain", &server, &format!("{EXPORT}/plain"), "4.1"),
            0,
        ),
    )
    .await?;
    let started = Instant::now();
    a.mount(ctx(T), &mount_request(luks2(&server, &key), 240_000))
        .await?;
    let first = started.elapsed();
    a.unmount(
        ctx(T),
        &agent::UnmountRequest {
            name: "enc".into(),
            ..Default::default()
        },
    )
    .await?;
    let started = Instant::now();
    a.mount(ctx(T), &mount_request(luks2(&server, &key), 240_000))
        .await?;
    let reopen = started.elapsed();
    // gocryptfs reads its key as one line: the same bytes without newline or NUL.
    let line_key: Vec<u8> = key.iter().map(|b| b | 0x80).collect();
    let started = Instant::now();
    a.mount(
        ctx(T),
        &mount_request(gocryptfs(&server, &line_key), 240_000),
    )
    .await?;
    let go_first = started.elapsed();
    a.unmount(
        ctx(T),
        &agent::UnmountRequest {
            name: "shr".into(),
            ..Default::default()
        },
    )
    .await?;
    let started = Instant::now();
    a.mount(
        ctx(T),
        &mount_request(gocryptfs(&server, &line_key), 240_000),
    )
    .await?;
    let go_reopen = started.elapsed();
    let dio = g
        .ok("cat /sys/block/loop*/loop/dio 2>/dev/null | head -1")
        .await?;
    let driver = g
        .ok("awk '/^name/{n=$3} /^driver/{d=$3} /^priority/{if (n==\"xts(aes)\") print d, $3}' /proc/crypto")
        .await?;
    let paths = [
        Path_ {
            label: "NFSv4.1".into(),
            root: "/run/cnfs/volumes/plain".into(),
            nfs: true,
        },
        Path_ {
            label: "luks2 on NFS".into(),
            root: "/run/cnfs/volumes/enc".into(),
            nfs: false,
        },
        Path_ {
            label: "gocryptfs on NFS".into(),
            root: "/run/cnfs/volumes/shr".into(),
            nfs: false,
        },
    ];
    let (mut secs, ops) = rounds(g, &paths, "encryption").await?;
    println!(
        "guest: {} accel, {}",
        cnfs_testbed::vm::accel(),
        g.ok("uname -r").await?.trim()
    );
    println!(
        "luks2 one-off costs: first use (format: 2 argon2id passes of 64 MiB + mkfs of {} GiB) {first:.2?}, \
         later open (1 argon2id pass) {reopen:.2?}",
        SIZE >> 30
    );
    println!(
        "gocryptfs one-off costs: first use (gocryptfs -init: scrypt, then open: scrypt again) \
         {go_first:.2?}, later open (1 scrypt) {go_reopen:.2?}"
    );
    println!(
        "loop direct I/O: {}; xts(aes) drivers (driver priority) in the guest: {}",
        dio.trim(),
        driver.trim().replace('\n', "; ")
    );
    print_table(&paths, &mut secs, &ops);
    Ok(())
}
