//! End to end: the guest kernel mounts CephFS from a real single-node Ceph cluster (mon, mgr,
//! memstore OSD, MDS, cephx) in the test's namespace. Host-side file access goes through
//! libcephfs in user space; nothing is mounted on the host.

use std::time::{Duration, Instant};

use cnfs_protocols::agent;
use cnfs_testbed::ceph::Ceph;
use cnfs_testbed::vm::ctx;
use cnfs_testbed::{code_of, message_of, TestBed};
use ttrpc::Code;

const T: Duration = Duration::from_secs(90);

struct Vol<'a> {
    name: &'a str,
    monitors: Vec<String>,
    path: &'a str,
    client: &'a str,
    key: String,
    fsid: Option<String>,
    options: Vec<(&'a str, &'a str)>,
}

impl Vol<'_> {
    fn request(&self, timeout_ms: u32) -> agent::MountRequest {
        let mut spec = agent::VolumeSpec {
            name: self.name.into(),
            ..Default::default()
        };
        spec.set_cephfs(agent::CephFsSource {
            monitors: self.monitors.clone(),
            fs_name: "cephfs".into(),
            path: self.path.into(),
            client: self.client.into(),
            secret: self.key.clone(),
            fsid: self.fsid.clone().unwrap_or_default(),
            ..Default::default()
        });
        for (k, v) in &self.options {
            spec.options.insert(k.to_string(), v.to_string());
        }
        cnfs_testbed::mount_request(spec, timeout_ms)
    }
}

async fn start() -> anyhow::Result<(TestBed, Ceph)> {
    let bed = TestBed::start().await?;
    let ceph = Ceph::start(&bed.ns, bed.dir.path()).await?;
    Ok((bed, ceph))
}

/// Fails if `key` appears in anything the test collected.
async fn assert_key_hidden(bed: &TestBed, key: &str, texts: &[String]) -> anyhow::Result<()> {
    let mounts = bed
        .vm
        .exec
        .ok("cat /proc/mounts /proc/self/mountinfo")
        .await?;
    assert!(!mounts.contains(key), "key in /proc/mounts");
    let state = bed
        .vm
        .exec
        .ok("cat /run/cnfs/state/* 2>/dev/null; true")
        .await?;
    assert!(!state.contains(key), "key in the agent's state files");
    assert!(
        !bed.vm.console_text().contains(key),
        "key in the guest console / agent log"
    );
    for t in texts {
        assert!(!t.contains(key), "key in {t:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cephfs_admin_and_restricted_keys_move_data_and_keys_stay_hidden() -> anyhow::Result<()> {
    let (bed, ceph) = start().await?;
    let agent = bed.vm.agent().await?;
    let g = &bed.vm.exec;
    let admin = ceph.admin_key();

    // 1. The whole file system with the admin key (legacy device syntax, no fsid).
    let whole = Vol {
        name: "whole",
        monitors: vec![ceph.mon_v1()],
        path: "/",
        client: "admin",
        key: admin.clone(),
        fsid: None,
        options: vec![],
    };
    agent.mount(ctx(T), &whole.request(60_000)).await?;
    let sum = g
        .ok("head -c 1048576 /dev/urandom > /run/cnfs/volumes/whole/g.bin && sync && md5sum /run/cnfs/volumes/whole/g.bin")
        .await?;
    let back = ceph.try_read_file("/g.bin")?;
    assert_eq!(back.len(), 1 << 20);
    let host_sum = cnfs_testbed::process::md5_hex(&back);
    assert_eq!(sum.split_whitespace().next(), Some(host_sum.as_str()));
    ceph.try_write_file("/from-host.txt", b"written through libcephfs\n")?;
    assert_eq!(
        g.ok("cat /run/cnfs/volumes/whole/from-host.txt").await?,
        "written through libcephfs\n"
    );

    // 2. A key restricted to /sub mounts /sub (new device syntax with the fsid) and is refused /.
    let key = ceph.authorize("app", "/sub", "rw")?;
    let sub = Vol {
        name: "sub",
        monitors: vec![ceph.mon_v1()],
        path: "/sub",
        client: "app",
        key: key.clone(),
        fsid: Some(ceph.fsid()),
        options: vec![],
    };
    agent.mount(ctx(T), &sub.request(60_000)).await?;
    g.ok("echo app > /run/cnfs/volumes/sub/app.txt && sync")
        .await?;
    assert_eq!(ceph.try_read_file("/sub/app.txt")?, b"app\n");
    let root = Vol {
        name: "root",
        path: "/",
        ..sub_like(&sub)
    };
    let e = agent
        .mount(ctx(T), &root.request(30_000))
        .await
        .expect_err("restricted");
    assert_eq!(code_of(&e), Code::PERMISSION_DENIED, "{e:?}");
    let denied = message_of(&e);
    // A wrong key is refused too, with a readable reason. The kernel fails this mount with
    // EHOSTUNREACH, like an unknown file system; the agent tells them apart by its log.
    let other_key = ceph.authorize("other", "/other", "rw")?;
    let wrong = Vol {
        name: "wrong",
        // A real cephx key, but another client's.
        key: other_key.clone(),
        ..sub_like(&sub)
    };
    let e = agent
        .mount(ctx(T), &wrong.request(30_000))
        .await
        .expect_err("wrong key");
    assert_eq!(code_of(&e), Code::PERMISSION_DENIED, "{e:?}");
    let wrong_msg = message_of(&e);
    assert!(
        wrong_msg.contains("rejected the key of client.app")
            && wrong_msg.contains("wrong or was revoked"),
        "{e:?}"
    );
    // A revoked key (its client removed), over msgr2 this time (the kernel words it otherwise).
    let gone_key = ceph.authorize("gone", "/gone", "rw")?;
    ceph.ceph(&["auth", "rm", "client.gone"])?;
    let revoked = Vol {
        name: "revoked",
        monitors: vec![ceph.mon_v2()],
        path: "/gone",
        client: "gone",
        key: gone_key.clone(),
        fsid: Some(ceph.fsid()),
        options: vec![("ms_mode", "crc")],
    };
    let e = agent
        .mount(ctx(T), &revoked.request(30_000))
        .await
        .expect_err("revoked key");
    assert_eq!(code_of(&e), Code::PERMISSION_DENIED, "{e:?}");
    let revoked_msg = message_of(&e);
    assert!(
        revoked_msg.contains("rejected the key of client.gone"),
        "{e:?}"
    );
    let mounts = g.ok("cat /proc/mounts").await?;
    for name in ["root", "wrong", "revoked"] {
        assert!(
            !mounts.contains(&format!("/run/cnfs/volumes/{name} ")),
            "{mounts}"
        );
    }

    // 3. msgr2 with ms_mode=secure.
    let secure = Vol {
        name: "secure",
        monitors: vec![ceph.mon_v2()],
        path: "/",
        client: "admin",
        key: admin.clone(),
        fsid: Some(ceph.fsid()),
        options: vec![("ms_mode", "secure")],
    };
    agent.mount(ctx(T), &secure.request(60_000)).await?;
    g.ok("echo secure > /run/cnfs/volumes/secure/s.txt && sync")
        .await?;
    assert_eq!(ceph.try_read_file("/s.txt")?, b"secure\n");
    let line = g
        .ok("grep ' /run/cnfs/volumes/secure ' /proc/mounts")
        .await?;
    assert!(line.contains("ms_mode=secure"), "{line}");

    // The volumes are listed without their keys, and repeated mounts are idempotent.
    let list = agent.list(ctx(T), &agent::ListRequest::new()).await?;
    assert_eq!(list.volumes.len(), 3);
    assert!(list
        .volumes
        .iter()
        .all(|v| v.volume.cephfs().secret.is_empty() && v.fs_type == "ceph"));
    assert!(
        agent
            .mount(ctx(T), &whole.request(60_000))
            .await?
            .already_mounted
    );

    // 5. The keys appear nowhere: mounts, state, logs, errors.
    for k in [&admin, &key, &other_key, &gone_key] {
        assert_key_hidden(
            &bed,
            k,
            &[
                denied.clone(),
                wrong_msg.clone(),
                revoked_msg.clone(),
                format!("{list:?}"),
            ],
        )
        .await?;
    }

    // 6. An encrypted volume on CephFS: a LUKS2 container in /enc, ext4 inside, in the guest.
    g.ok("mkdir -p /run/cnfs/volumes/whole/enc").await?;
    let enc_request = |name: &str| {
        let mut r = Vol {
            name,
            path: "/enc",
            ..sub_like(&whole)
        }
        .request(180_000);
        r.volume.mut_or_insert_default().encryption =
            protobuf::MessageField::some(agent::Encryption {
                mode: "luks2".into(),
                key: b"ceph volume key".to_vec(),
                size_bytes: 128 << 20,
                ..Default::default()
            });
        r
    };
    agent
        .mount(ctx(Duration::from_secs(240)), &enc_request("enc"))
        .await?;
    let canary = "CNFS-CEPHFS-PLAINTEXT-CANARY";
    let enc_sum = g
        .ok(&format!(
            "echo {canary} > /run/cnfs/volumes/enc/c.txt && sync && md5sum /run/cnfs/volumes/enc/c.txt"
        ))
        .await?;
    assert!(g
        .ok("cat /proc/mounts")
        .await?
        .contains("/run/cnfs/volumes/enc ext4 "));
    let container = ceph.try_read_file("/enc/cnfs-volume.luks2")?;
    assert_eq!(container.len(), 128 << 20);
    assert_eq!(
        &container[..6],
        b"LUKS\xba\xbe",
        "a LUKS2 header on the pool"
    );
    assert!(
        !container
            .windows(canary.len())
            .any(|w| w == canary.as_bytes()),
        "plaintext in the pool"
    );
    // A second opener (its own client session: `noshare`) meets the MDS's lock.
    let e = agent
        .mount(ctx(Duration::from_secs(240)), &enc_request("enc2"))
        .await
        .expect_err("the container is held");
    assert_eq!(code_of(&e), Code::FAILED_PRECONDITION, "{e:?}");
    assert!(message_of(&e).contains("in use by another client"), "{e:?}");
    let u = agent
        .unmount(
            ctx(T),
            &agent::UnmountRequest {
                name: "enc".into(),
                ..Default::default()
            },
        )
        .await?;
    assert_eq!(u.method, "umount", "{u:?}");
    assert_eq!(
        g.ok("ls /sys/block | grep -c '^dm-' || true").await?.trim(),
        "0"
    );
    agent
        .mount(ctx(Duration::from_secs(240)), &enc_request("enc"))
        .await?;
    assert_eq!(g.ok("md5sum /run/cnfs/volumes/enc/c.txt").await?, enc_sum);

    // 6b. `grow=quota`, as the CSI driver makes CephFS luks2 volumes: in a subvolume whose
    // quota is 256 MiB + 64 MiB the container is 256 MiB from first use (its `size` says
    // 128 MiB), and after the quota is raised (ControllerExpandVolume's `subvolume resize`)
    // the next mount grows it, and ext4, with the data intact.
    const MIB: u64 = 1 << 20;
    let quota = |mib: u64| ((mib + 64) * MIB).to_string();
    ceph.ceph(&[
        "fs",
        "subvolume",
        "create",
        "cephfs",
        "q1",
        "--size",
        &quota(256),
    ])?;
    let q1 = ceph
        .ceph(&["fs", "subvolume", "getpath", "cephfs", "q1"])?
        .trim()
        .to_string();
    let quota_request = || {
        let mut r = Vol {
            name: "quota",
            path: &q1,
            ..sub_like(&whole)
        }
        .request(180_000);
        r.volume.mut_or_insert_default().encryption =
            protobuf::MessageField::some(agent::Encryption {
                mode: "luks2".into(),
                key: b"ceph volume key".to_vec(),
                size_bytes: 128 << 20,
                grow_to_quota: true,
                ..Default::default()
            });
        r
    };
    let sizes = "stat -c %s /run/cnfs/backing/quota/cnfs-volume.luks2; \
                 stat -f -c '%b %S' /run/cnfs/volumes/quota";
    let read_sizes = |out: String| -> (u64, u64) {
        let n: Vec<u64> = out
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        (
            n.first().copied().unwrap_or(0),
            n.get(1).copied().unwrap_or(0) * n.get(2).copied().unwrap_or(0),
        )
    };
    agent
        .mount(ctx(Duration::from_secs(240)), &quota_request())
        .await?;
    let q_sum = g
        .ok("head -c 1000000 /dev/urandom > /run/cnfs/volumes/quota/d && sync && md5sum /run/cnfs/volumes/quota/d")
        .await?;
    let (file, fs) = read_sizes(g.ok(sizes).await?);
    assert_eq!(file, 256 * MIB, "first use did not size from the quota");
    assert!(fs > 192 * MIB && fs <= 256 * MIB, "ext4 of {fs} bytes");
    let unmount = |name: &'static str| agent::UnmountRequest {
        name: name.into(),
        ..Default::default()
    };
    agent.unmount(ctx(T), &unmount("quota")).await?;
    ceph.ceph(&[
        "fs",
        "subvolume",
        "resize",
        "cephfs",
        "q1",
        &quota(384),
        "--no_shrink",
    ])?;
    agent
        .mount(ctx(Duration::from_secs(240)), &quota_request())
        .await?;
    let (file, grown) = read_sizes(g.ok(sizes).await?);
    assert_eq!(
        file,
        384 * MIB,
        "the raised quota did not grow the container"
    );
    assert!(grown > fs + 96 * MIB, "ext4 did not grow: {fs} -> {grown}");
    assert_eq!(g.ok("md5sum /run/cnfs/volumes/quota/d").await?, q_sum);
    agent.unmount(ctx(T), &unmount("quota")).await?;
    ceph.ceph(&["fs", "subvolume", "rm", "cephfs", "q1"])?;

    // 7. A shared encrypted (gocryptfs) volume on CephFS: the tree in /shr, no plaintext in
    // the pool under the plaintext name, the data read back after a remount.
    g.ok("mkdir -p /run/cnfs/volumes/whole/shr").await?;
    let shared_request = |name: &str| {
        let mut r = Vol {
            name,
            path: "/shr",
            ..sub_like(&whole)
        }
        .request(180_000);
        r.volume.mut_or_insert_default().encryption =
            protobuf::MessageField::some(agent::Encryption {
                mode: "gocryptfs".into(),
                key: b"ceph shared key".to_vec(),
                ..Default::default()
            });
        r
    };
    agent
        .mount(ctx(Duration::from_secs(240)), &shared_request("shr"))
        .await?;
    assert!(g
        .ok("cat /proc/mounts")
        .await?
        .contains("/run/cnfs/volumes/shr fuse.gocryptfs "));
    let shr_sum = g
        .ok(&format!(
            "echo {canary} > /run/cnfs/volumes/shr/c.txt && sync && md5sum /run/cnfs/volumes/shr/c.txt"
        ))
        .await?;
    let conf = ceph.try_read_file("/shr/cnfs-volume.gocryptfs/gocryptfs.conf")?;
    assert!(
        String::from_utf8_lossy(&conf).contains("\"EncryptedKey\""),
        "a gocryptfs configuration in the pool"
    );
    assert!(
        ceph.try_read_file("/shr/cnfs-volume.gocryptfs/c.txt")
            .is_err(),
        "a plaintext name in the pool"
    );
    agent
        .unmount(
            ctx(T),
            &agent::UnmountRequest {
                name: "shr".into(),
                ..Default::default()
            },
        )
        .await?;
    agent
        .mount(ctx(Duration::from_secs(240)), &shared_request("shr"))
        .await?;
    assert_eq!(g.ok("md5sum /run/cnfs/volumes/shr/c.txt").await?, shr_sum);
    Ok(())
}

fn sub_like<'a>(v: &Vol<'a>) -> Vol<'a> {
    Vol {
        name: v.name,
        monitors: v.monitors.clone(),
        path: v.path,
        client: v.client,
        key: v.key.clone(),
        fsid: v.fsid.clone(),
        options: v.options.clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cephfs_faults_are_bounded_and_a_restarted_agent_keeps_the_volume() -> anyhow::Result<()> {
    let (bed, mut ceph) = start().await?;
    let agent = bed.vm.agent().await?;
    let g = &bed.vm.exec;
    let vol = |name: &'static str| Vol {
        name,
        monitors: vec![ceph.mon_v1()],
        path: "/",
        client: "admin",
        key: ceph.admin_key(),
        fsid: None,
        options: vec![],
    };
    agent.mount(ctx(T), &vol("keep").request(60_000)).await?;
    let other = vol("other");

    // Unknown file system: NotFound.
    let mut nofs = vol("nofs").request(30_000);
    nofs.volume.mut_or_insert_default().mut_cephfs().fs_name = "nosuchfs".into();
    let e = agent.mount(ctx(T), &nofs).await.expect_err("no fs");
    assert_eq!(code_of(&e), Code::NOT_FOUND, "{e:?}");
    assert!(
        message_of(&e).contains("no MDS serves file system \"nosuchfs\""),
        "{e:?}"
    );

    // Agent restarted: the CephFS volume is still listed and a repeated Mount is idempotent.
    g.ok("kill -9 $(pidof cnfs-agent); /usr/bin/cnfs-agent </dev/null >/dev/console 2>&1 &")
        .await?;
    bed.vm.wait_for_agent(Duration::from_secs(30)).await?;
    let agent = bed.vm.agent().await?;
    let list = agent.list(ctx(T), &agent::ListRequest::new()).await?;
    assert_eq!(list.volumes.len(), 1);
    assert_eq!(
        (
            list.volumes[0].volume.name.as_str(),
            list.volumes[0].state.as_str()
        ),
        ("keep", "mounted")
    );
    assert!(
        agent
            .mount(ctx(T), &vol("keep").request(60_000))
            .await?
            .already_mounted
    );

    // MDS stopped while mounted, a process keeping the volume busy: Unmount is bounded.
    g.ok("cd /run/cnfs/volumes/keep && (sleep 600 </dev/null >/dev/null 2>&1 &)")
        .await?;
    ceph.stop_mds();
    let bound = Duration::from_secs(12);
    let start = Instant::now();
    let u = agent
        .unmount(
            ctx(T),
            &agent::UnmountRequest {
                name: "keep".into(),
                timeout_ms: bound.as_millis() as u32,
                ..Default::default()
            },
        )
        .await?;
    assert!(
        start.elapsed() < bound + Duration::from_secs(5),
        "unmount took {:?}",
        start.elapsed()
    );
    assert!(
        !g.ok("cat /proc/mounts")
            .await?
            .contains("/run/cnfs/volumes/keep"),
        "{u:?}"
    );

    // Monitor stopped before a mount: DeadlineExceeded within the deadline, agent answering.
    ceph.stop_mon();
    let deadline = Duration::from_secs(8);
    let start = Instant::now();
    let e = agent
        .mount(ctx(T), &other.request(deadline.as_millis() as u32))
        .await
        .expect_err("no mon");
    assert_eq!(code_of(&e), Code::DEADLINE_EXCEEDED, "{e:?}");
    assert!(
        start.elapsed() < deadline + Duration::from_secs(6),
        "took {:?}",
        start.elapsed()
    );
    agent
        .ping(ctx(Duration::from_secs(10)), &agent::PingRequest::new())
        .await?;
    assert!(!g
        .ok("cat /proc/mounts")
        .await?
        .contains("/run/cnfs/volumes/other"));
    Ok(())
}
