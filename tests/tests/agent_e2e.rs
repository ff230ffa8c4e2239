//! End to end: a real QEMU guest kernel mounts a real nfs-ganesha export on requests from
//! the host over hybrid vsock. Each test boots its own guest (its own namespace, subnet and
//! sockets) and asserts effects on both sides.

use std::time::{Duration, Instant};

use cnfs_protocols::agent::{self, Health};
use cnfs_testbed::ganesha::EXPORT;
use cnfs_testbed::guest::AGENT_PID_SH;
use cnfs_testbed::vm::ctx;
use cnfs_testbed::{code_of, message_of, mount_request, nfs_volume, TestBed};
use ttrpc::Code;

const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nfs_v41_and_v3_move_data_both_ways_and_reach_a_fresh_mount_namespace() -> anyhow::Result<()>
{
    let bed = TestBed::start().await?;
    let agent = bed.vm.agent().await?;
    let server = bed.ns.host_ip.clone();
    let g = &bed.vm.exec;

    for (name, version) in [("v41", "4.1"), ("v3", "3")] {
        let r = agent
            .mount(
                ctx(T),
                &mount_request(nfs_volume(name, &server, EXPORT, version), 0),
            )
            .await?;
        assert_eq!(r.mount_point, format!("/run/cnfs/volumes/{name}"));
        assert!(!r.already_mounted);
    }

    // The guest kernel holds the mounts, with the options the agent built.
    let mounts = g.ok("cat /proc/mounts").await?;
    let line = |mp: &str| {
        mounts
            .lines()
            .find(|l| l.contains(mp))
            .unwrap_or_default()
            .to_string()
    };
    let v41 = line("/run/cnfs/volumes/v41");
    assert!(v41.contains(" nfs4 ") && v41.contains("vers=4.1"), "{v41}");
    assert!(
        v41.contains(&format!("clientaddr={}", bed.ns.guest_ip)),
        "{v41}"
    );
    assert!(v41.contains("nosuid") && v41.contains("nodev"), "{v41}");
    let v3 = line("/run/cnfs/volumes/v3");
    assert!(
        v3.contains(" nfs ") && v3.contains("vers=3") && v3.contains("nolock"),
        "{v3}"
    );
    // A unique NFSv4 client identity was set before the first mount.
    let id = g
        .ok("cat /sys/module/nfs/parameters/nfs4_unique_id")
        .await?;
    assert_eq!(id.trim(), "cnfs-sandbox-e2e");

    for name in ["v41", "v3"] {
        // Guest → server: a 1 MiB random file, compared by checksum on the host.
        let sum = g
            .ok(&format!(
                "head -c 1048576 /dev/urandom > /run/cnfs/volumes/{name}/g-{name}.bin && sync && \
                 md5sum /run/cnfs/volumes/{name}/g-{name}.bin"
            ))
            .await?;
        let host_bytes = std::fs::read(bed.nfs.export_dir.join(format!("g-{name}.bin")))?;
        assert_eq!(host_bytes.len(), 1 << 20);
        let host_sum = cnfs_testbed::process::run(
            std::process::Command::new("md5sum")
                .arg(bed.nfs.export_dir.join(format!("g-{name}.bin"))),
        )?;
        assert_eq!(
            sum.split_whitespace().next(),
            host_sum.split_whitespace().next()
        );
        // Server → guest.
        let text = format!("from the host for {name}\n");
        std::fs::write(bed.nfs.export_dir.join(format!("h-{name}.txt")), &text)?;
        let seen = g
            .ok(&format!("cat /run/cnfs/volumes/{name}/h-{name}.txt"))
            .await?;
        assert_eq!(seen, text);
    }

    // What kata-agent does for a pass-through bind mount: in a fresh mount namespace,
    // canonicalize /proc/1/root/run/cnfs/volumes/<name> and bind-mount the result.
    let out = g
        .ok("unshare -m sh -c 'src=$(readlink -f /proc/1/root/run/cnfs/volumes/v41) && \
             mkdir -p /tmp/ctr && mount --bind \"$src\" /tmp/ctr && echo \"$src\" && cat /tmp/ctr/h-v41.txt && \
             echo ctr > /tmp/ctr/from-container.txt'")
        .await?;
    assert_eq!(out, "/run/cnfs/volumes/v41\nfrom the host for v41\n");
    assert_eq!(
        std::fs::read_to_string(bed.nfs.export_dir.join("from-container.txt"))?,
        "ctr\n"
    );
    // The bind lived in the child namespace only.
    assert!(!g.ok("cat /proc/mounts").await?.contains("/tmp/ctr"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmount_list_stats_idempotency_and_least_privilege() -> anyhow::Result<()> {
    let bed = TestBed::start().await?;
    let agent = bed.vm.agent().await?;
    let server = bed.ns.host_ip.clone();
    let g = &bed.vm.exec;
    std::fs::create_dir_all(bed.nfs.export_dir.join("sub"))?;

    let spec = nfs_volume("a", &server, EXPORT, "4.1");
    assert!(
        !agent
            .mount(ctx(T), &mount_request(spec.clone(), 0))
            .await?
            .already_mounted
    );
    // The same request again: nothing done, reported as already mounted.
    assert!(
        agent
            .mount(ctx(T), &mount_request(spec.clone(), 0))
            .await?
            .already_mounted
    );
    // Same name, different spec: AlreadyExists, and the first mount is untouched.
    let other = nfs_volume("a", &server, &format!("{EXPORT}/sub"), "4.1");
    let e = agent
        .mount(ctx(T), &mount_request(other, 0))
        .await
        .expect_err("conflict");
    assert_eq!(code_of(&e), Code::ALREADY_EXISTS, "{e:?}");
    assert_eq!(
        g.ok("grep -c ' /run/cnfs/volumes/a ' /proc/mounts")
            .await?
            .trim(),
        "1"
    );

    // A server given by host name is resolved in the guest (its /etc/hosts here).
    let by_name = nfs_volume("named", cnfs_testbed::vm::NFS_HOST_NAME, EXPORT, "4.1");
    agent.mount(ctx(T), &mount_request(by_name, 0)).await?;
    let line = g
        .ok("grep ' /run/cnfs/volumes/named ' /proc/mounts")
        .await?;
    // (The kernel shows the resolved address as the device, not the name.)
    assert!(line.starts_with(&format!("{server}:{EXPORT} ")), "{line}");
    assert!(line.contains(&format!("addr={server}")), "{line}");
    agent
        .unmount(
            ctx(T),
            &agent::UnmountRequest {
                name: "named".into(),
                ..Default::default()
            },
        )
        .await?;
    let unknown = nfs_volume("unknown", "no-such-host.cnfs.test", EXPORT, "4.1");
    let e = agent
        .mount(ctx(T), &mount_request(unknown, 10_000))
        .await
        .expect_err("unresolvable");
    assert!(message_of(&e).contains("no-such-host.cnfs.test"), "{e:?}");

    // Two volumes at once, in parallel.
    let (rb, rc) = (
        mount_request(nfs_volume("b", &server, EXPORT, "4.2"), 0),
        mount_request(nfs_volume("c", &server, &format!("{EXPORT}/sub"), "4.1"), 0),
    );
    let (b, c) = tokio::join!(agent.mount(ctx(T), &rb), agent.mount(ctx(T), &rc));
    b?;
    c?;

    let list = agent.list(ctx(T), &agent::ListRequest::new()).await?;
    let names: Vec<&str> = list
        .volumes
        .iter()
        .map(|v| v.volume.name.as_str())
        .collect();
    assert_eq!(names, ["a", "b", "c"]);
    let a = &list.volumes[0];
    assert_eq!(a.state, "mounted");
    assert_eq!(a.fs_type, "nfs4");
    assert_eq!(a.device, format!("{server}:{EXPORT}"));
    assert_eq!(a.volume.nfs().version, "4.1");

    // Stats agree with the guest's own statfs of the mount.
    let s = agent
        .stats(
            ctx(T),
            &agent::StatsRequest {
                name: "a".into(),
                ..Default::default()
            },
        )
        .await?;
    assert_eq!(
        s.health.enum_value_or_default(),
        Health::HEALTHY,
        "{}",
        s.health_detail
    );
    let guest = g.ok("stat -f -c '%S %b %c' /run/cnfs/volumes/a").await?;
    let f: Vec<u64> = guest
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    assert_eq!(s.total_bytes, f[0] * f[1], "guest stat -f: {guest}");
    assert_eq!(s.total_inodes, f[2]);
    assert!(s.total_bytes > 0 && s.available_bytes <= s.total_bytes);

    // Unmount: the mount, its directory and its listing are gone; a repeat is NotFound.
    let u = agent
        .unmount(
            ctx(T),
            &agent::UnmountRequest {
                name: "a".into(),
                ..Default::default()
            },
        )
        .await?;
    assert_eq!(u.method, "umount");
    assert!(!g
        .ok("cat /proc/mounts")
        .await?
        .contains("/run/cnfs/volumes/a "));
    assert_ne!(g.run("test -e /run/cnfs/volumes/a", T).await?.code, 0);
    let names: Vec<String> = agent
        .list(ctx(T), &agent::ListRequest::new())
        .await?
        .volumes
        .iter()
        .map(|v| v.volume.name.clone())
        .collect();
    assert_eq!(names, ["b", "c"]);
    let e = agent
        .unmount(
            ctx(T),
            &agent::UnmountRequest {
                name: "a".into(),
                ..Default::default()
            },
        )
        .await
        .expect_err("gone");
    assert_eq!(code_of(&e), Code::NOT_FOUND);
    let e = agent
        .stats(
            ctx(T),
            &agent::StatsRequest {
                name: "a".into(),
                ..Default::default()
            },
        )
        .await
        .expect_err("gone");
    assert_eq!(code_of(&e), Code::NOT_FOUND);

    // Least privilege: the agent kept CAP_SYS_ADMIN, CAP_SYSLOG, CAP_CHOWN, CAP_SYS_RESOURCE
    // and CAP_SYS_MODULE only, in every set.
    let ping = agent.ping(ctx(T), &agent::PingRequest::new()).await?;
    assert_eq!(
        ping.capabilities,
        [
            "CAP_CHOWN",
            "CAP_SYSLOG",
            "CAP_SYS_ADMIN",
            "CAP_SYS_MODULE",
            "CAP_SYS_RESOURCE"
        ]
    );
    let status = g
        .ok(&format!("{AGENT_PID_SH}; cat /proc/$a/status"))
        .await?;
    let cap = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| u64::from_str_radix(v.trim(), 16).unwrap_or(u64::MAX))
    };
    let want = (1u64 << 21) | (1u64 << 34) | (1u64 << 16) | (1u64 << 24) | 1;
    for set in ["CapEff:", "CapPrm:", "CapBnd:"] {
        assert_eq!(cap(set), Some(want), "{set} in\n{status}");
    }
    assert_eq!(cap("CapInh:"), Some(0));
    // The local socket is for root in the guest's root namespace only.
    let perms = g.ok("stat -c '%a' /run/cnfs/agent.sock /run/cnfs").await?;
    assert_eq!(perms, "600\n700\n");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_with_the_field_named_and_nothing_is_mounted() -> anyhow::Result<()>
{
    let bed = TestBed::start().await?;
    let agent = bed.vm.agent().await?;
    let s = bed.ns.host_ip.clone();
    let vol =
        |server: &str, export: &str, version: &str| nfs_volume("bad", server, export, version);
    let opt = |k: &str, v: &str| {
        let mut spec = vol(&s, EXPORT, "4.1");
        spec.options.insert(k.into(), v.into());
        spec
    };
    let named = |name: &str| nfs_volume(name, &s, EXPORT, "4.1");
    let mut ceph = agent::VolumeSpec {
        name: "bad".into(),
        ..Default::default()
    };
    ceph.set_cephfs(agent::CephFsSource {
        monitors: vec![format!("{s}:6789")],
        fs_name: "cephfs".into(),
        client: "admin".into(),
        secret: "AQBvalidlookingkey==".into(),
        ..Default::default()
    });
    let mut ceph_bad_mon = ceph.clone();
    ceph_bad_mon.mut_cephfs().monitors = vec!["10.0.0.1".into()];
    let mut ceph_bad_fsid = ceph.clone();
    ceph_bad_fsid.mut_cephfs().fsid = "not-a-uuid".into();
    let mut ceph_no_key = ceph.clone();
    ceph_no_key.mut_cephfs().secret = String::new();
    let no_source = agent::VolumeSpec {
        name: "bad".into(),
        ..Default::default()
    };

    use Code::{INVALID_ARGUMENT as IA, NOT_FOUND as NF};
    let rows: Vec<(agent::VolumeSpec, Code, &str)> = vec![
        (named(""), IA, "volume.name"),
        (named("UPPER"), IA, "volume.name"),
        (named("a/b"), IA, "volume.name"),
        (named(".."), IA, "volume.name"),
        (named("-lead"), IA, "volume.name"),
        (named(&"x".repeat(64)), IA, "volume.name"),
        (no_source, IA, "volume.source"),
        (vol("", EXPORT, "4.1"), IA, "volume.nfs.server"),
        (
            vol(&format!("{s},addr=10.9.9.9"), EXPORT, "4.1"),
            IA,
            "volume.nfs.server",
        ),
        (vol("host name", EXPORT, "4.1"), IA, "volume.nfs.server"),
        (vol("0.0.0.0", EXPORT, "4.1"), IA, "volume.nfs.server"),
        (vol("224.0.0.1", EXPORT, "4.1"), IA, "volume.nfs.server"),
        (vol("-bad.example", EXPORT, "4.1"), IA, "volume.nfs.server"),
        (vol(&s, "", "4.1"), IA, "volume.nfs.export"),
        (vol(&s, "export", "4.1"), IA, "volume.nfs.export"),
        (vol(&s, "/export/../etc", "4.1"), IA, "volume.nfs.export"),
        (vol(&s, "/export,vers=3", "4.1"), IA, "volume.nfs.export"),
        (vol(&s, "/export/./x", "4.1"), IA, "volume.nfs.export"),
        (vol(&s, "/exp\nort", "4.1"), IA, "volume.nfs.export"),
        (vol(&s, EXPORT, "5"), IA, "volume.nfs.version"),
        (vol(&s, EXPORT, "4.3"), IA, "volume.nfs.version"),
        (opt("addr", "10.9.9.9"), IA, "volume.options.addr"),
        (
            opt("clientaddr", "10.9.9.9"),
            IA,
            "volume.options.clientaddr",
        ),
        (opt("mounthost", "evil"), IA, "volume.options.mounthost"),
        (
            opt("rsize", "65536,addr=10.9.9.9"),
            IA,
            "volume.options.rsize",
        ),
        (opt("rsize", "1"), IA, "volume.options.rsize"),
        (opt("nconnect", "99"), IA, "volume.options.nconnect"),
        (opt("proto", "udp"), IA, "volume.options.proto"),
        (opt("sec", "none"), IA, "volume.options.sec"),
        (opt("hard", "yes"), IA, "volume.options.hard"),
        (opt("lock", ""), IA, "volume.options.lock"),
        (opt("context", "system_u"), IA, "volume.options.context"),
        (opt("x-unknown", ""), IA, "volume.options.x-unknown"),
        (opt("vers", "2"), IA, "volume.options.vers"),
        (opt("rw", ""), IA, "volume.options.rw"),
        (ceph_bad_mon, IA, "volume.cephfs.monitors[0]"),
        (ceph_bad_fsid, IA, "volume.cephfs.fsid"),
        (ceph_no_key, IA, "volume.cephfs.secret"),
        (vol(&s, "/no-such-export", "4.1"), NF, "volume bad"),
    ];
    let mut rows = rows;
    // rw contradicts read_only only when read_only is set.
    if let Some(r) = rows.iter_mut().find(|r| r.2 == "volume.options.rw") {
        r.0.read_only = true;
    }
    assert!(rows.len() >= 30);
    for (spec, code, needle) in rows {
        let e = agent
            .mount(ctx(T), &mount_request(spec.clone(), 20_000))
            .await
            .expect_err(needle);
        assert_eq!(code_of(&e), code, "{needle}: {e:?}");
        assert!(
            message_of(&e).contains(needle),
            "{needle}: {}",
            message_of(&e)
        );
    }
    // Request-level fields.
    let e = agent
        .mount(ctx(T), &agent::MountRequest::new())
        .await
        .expect_err("no volume");
    assert_eq!(
        (code_of(&e), message_of(&e).starts_with("volume:")),
        (IA, true)
    );
    let mut bad_sandbox = mount_request(named("ok"), 0);
    bad_sandbox.sandbox_id = "id with spaces".into();
    let e = agent
        .mount(ctx(T), &bad_sandbox)
        .await
        .expect_err("bad sandbox");
    assert_eq!(
        (code_of(&e), message_of(&e).starts_with("sandbox_id:")),
        (IA, true)
    );
    let e = agent
        .unmount(
            ctx(T),
            &agent::UnmountRequest {
                name: "../etc".into(),
                ..Default::default()
            },
        )
        .await
        .expect_err("bad name");
    assert_eq!(code_of(&e), IA);

    // Nothing was mounted or left behind.
    assert!(agent
        .list(ctx(T), &agent::ListRequest::new())
        .await?
        .volumes
        .is_empty());
    let g = &bed.vm.exec;
    assert!(!g
        .ok("cat /proc/mounts")
        .await?
        .contains("/run/cnfs/volumes"));
    assert_eq!(g.ok("ls -A /run/cnfs/volumes 2>/dev/null; true").await?, "");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmount_with_dead_server_is_bounded_and_the_agent_keeps_answering() -> anyhow::Result<()> {
    let mut bed = TestBed::start().await?;
    let agent = bed.vm.agent().await?;
    let server = bed.ns.host_ip.clone();
    agent
        .mount(
            ctx(T),
            &mount_request(nfs_volume("dead", &server, EXPORT, "4.1"), 0),
        )
        .await?;
    // A process keeps the volume busy, as a container would.
    bed.vm
        .exec
        .ok("cd /run/cnfs/volumes/dead && (sleep 600 </dev/null >/dev/null 2>&1 &)")
        .await?;
    bed.nfs.kill();

    let bound = Duration::from_secs(12);
    let start = Instant::now();
    let u = agent
        .unmount(
            ctx(T),
            &agent::UnmountRequest {
                name: "dead".into(),
                timeout_ms: bound.as_millis() as u32,
                ..Default::default()
            },
        )
        .await?;
    let took = start.elapsed();
    assert!(
        took < bound + Duration::from_secs(5),
        "unmount took {took:?}"
    );
    assert_ne!(
        u.method, "umount",
        "a busy mount of a dead server needs escalation: {u:?}"
    );
    assert!(!u.attempts.is_empty());
    agent
        .ping(ctx(Duration::from_secs(10)), &agent::PingRequest::new())
        .await?;
    assert!(agent
        .list(ctx(T), &agent::ListRequest::new())
        .await?
        .volumes
        .is_empty());
    assert!(!bed
        .vm
        .exec
        .ok("cat /proc/mounts")
        .await?
        .contains("/run/cnfs/volumes/dead"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mount_of_a_silent_server_times_out_while_other_requests_are_served() -> anyhow::Result<()>
{
    let bed = TestBed::start().await?;
    let agent = bed.vm.agent().await?;
    let server = bed.ns.host_ip.clone();
    agent
        .mount(
            ctx(T),
            &mount_request(nfs_volume("good", &server, EXPORT, "4.1"), 0),
        )
        .await?;

    // A black hole: void_ip resolves to a MAC nobody owns, so the guest's packets vanish
    // without an answer or an error; the mount can only time out.
    bed.vm
        .exec
        .ok(&format!(
            "arp -i eth0 -s {} 02:00:00:00:00:99",
            bed.ns.void_ip
        ))
        .await?;
    let deadline = Duration::from_secs(8);
    let silent = mount_request(
        nfs_volume("void", &bed.ns.void_ip, EXPORT, "4.1"),
        deadline.as_millis() as u32,
    );
    let start = Instant::now();
    let pending = agent.mount(ctx(T), &silent);
    tokio::pin!(pending);
    // While it hangs: Ping, List and Stats of the healthy volume all answer.
    let others = async {
        let a = bed.vm.agent().await?;
        a.ping(ctx(T), &agent::PingRequest::new()).await?;
        let l = a.list(ctx(T), &agent::ListRequest::new()).await?;
        let s = a
            .stats(
                ctx(T),
                &agent::StatsRequest {
                    name: "good".into(),
                    ..Default::default()
                },
            )
            .await?;
        anyhow::Ok((l.volumes.len(), s.health.enum_value_or_default()))
    };
    let served = tokio::select! {
        r = &mut pending => anyhow::bail!("the silent mount returned before the others were served: {r:?}"),
        o = others => o?,
    };
    assert_eq!(served, (1, Health::HEALTHY));
    let e = pending.await.expect_err("no server");
    let took = start.elapsed();
    assert_eq!(code_of(&e), Code::DEADLINE_EXCEEDED, "{e:?}");
    assert!(took < deadline + Duration::from_secs(6), "took {took:?}");
    // Nothing half-mounted: no mount, no directory, not listed.
    let g = &bed.vm.exec;
    assert!(!g
        .ok("cat /proc/mounts")
        .await?
        .contains("/run/cnfs/volumes/void"));
    assert_ne!(g.run("test -e /run/cnfs/volumes/void", T).await?.code, 0);
    let l = agent.list(ctx(T), &agent::ListRequest::new()).await?;
    assert_eq!(l.volumes.len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_relearns_live_mounts_and_stays_idempotent() -> anyhow::Result<()> {
    let bed = TestBed::start().await?;
    let server = bed.ns.host_ip.clone();
    let g = &bed.vm.exec;
    let spec = nfs_volume("keep", &server, EXPORT, "4.1");
    let agent = bed.vm.agent().await?;
    agent.mount(ctx(T), &mount_request(spec.clone(), 0)).await?;
    agent
        .mount(
            ctx(T),
            &mount_request(nfs_volume("bare", &server, EXPORT, "4.2"), 0),
        )
        .await?;
    drop(agent);

    // Kill the agent outright; its state file for "bare" goes too, so it must adopt that
    // one from mountinfo alone.
    g.ok(
        "kill -9 $(pidof cnfs-agent); rm -f /run/cnfs/state/bare.pb; \
          /usr/bin/cnfs-agent </dev/null >/dev/console 2>&1 &",
    )
    .await?;
    bed.vm.wait_for_agent(Duration::from_secs(30)).await?;
    let agent = bed.vm.agent().await?;
    let list = agent.list(ctx(T), &agent::ListRequest::new()).await?;
    let seen: Vec<(&str, &str)> = list
        .volumes
        .iter()
        .map(|v| (v.volume.name.as_str(), v.state.as_str()))
        .collect();
    assert_eq!(seen, [("bare", "adopted"), ("keep", "mounted")]);
    assert_eq!(list.volumes[1].volume.nfs().version, "4.1");

    // Repeating the mounts changes nothing and duplicates nothing.
    assert!(
        agent
            .mount(ctx(T), &mount_request(spec, 0))
            .await?
            .already_mounted
    );
    // Adoption compares what the kernel shows: another NFS version is a conflict.
    let e = agent
        .mount(
            ctx(T),
            &mount_request(nfs_volume("bare", &server, EXPORT, "4.1"), 0),
        )
        .await
        .expect_err("other version");
    assert_eq!(code_of(&e), Code::ALREADY_EXISTS, "{e:?}");
    let bare = nfs_volume("bare", &server, EXPORT, "4.2");
    assert!(
        agent
            .mount(ctx(T), &mount_request(bare, 0))
            .await?
            .already_mounted
    );
    let n = g.ok("grep -c /run/cnfs/volumes /proc/mounts").await?;
    assert_eq!(n.trim(), "2");
    let list = agent.list(ctx(T), &agent::ListRequest::new()).await?;
    assert!(
        list.volumes.iter().all(|v| v.state == "mounted"),
        "{:?}",
        list.volumes
    );
    std::fs::write(bed.nfs.export_dir.join("after-restart.txt"), "still here\n")?;
    assert_eq!(
        g.ok("cat /run/cnfs/volumes/keep/after-restart.txt").await?,
        "still here\n"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_host_may_use_the_vsock_port() -> anyhow::Result<()> {
    let bed = TestBed::start().await?;
    let g = &bed.vm.exec;
    // The guest has a loopback vsock transport: a process in the guest reaching the agent's
    // vsock port (CID 1 = local) is refused, while the same probe over the agent's local
    // socket (root only) answers, which shows the probe itself works.
    let local = g.ok("cnfs-test-exec probe vsock://1:17230").await?;
    assert!(local.starts_with("refused"), "{local}");
    let unix = g
        .ok("cnfs-test-exec probe unix:///run/cnfs/agent.sock")
        .await?;
    assert_eq!(unix.trim(), "answered");
    assert!(
        bed.vm
            .console_shows("refused vsock connection from a peer that is not the host")
            .await
    );
    Ok(())
}
