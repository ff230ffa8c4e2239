//! The CSI driver's CephFS controller backend against the test bed's real Ceph cluster:
//! subvolumes are created, looked up, resized and removed through the `ceph` CLI as the
//! backend runs it, and every effect is checked on the server with the test bed's own admin
//! CLI and libcephfs. Also: refused credentials, unreachable monitors within a bound, and the
//! key in no error text.
//!
//! The backend knows nothing of network namespaces: each call runs on a thread that entered
//! the test's namespace, and the `ceph` processes it spawns inherit that.

use std::future::Future;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use cnfs_csi::backend::cephfs::{CephCluster, CephCredentials, SubvolumeInfo, Subvolumes};
use cnfs_csi::backend::BackendError;
use cnfs_testbed::ceph::{Ceph, FS_NAME};
use cnfs_testbed::{NetNs, TempDir};

const MIB: u64 = 1 << 20;
const GROUP: &str = "csi";
/// Per-command bound for the calls that should succeed.
const T: Duration = Duration::from_secs(30);
/// Bound for the calls that must give up; the assertions allow for a loaded 2-core machine.
const SHORT: Duration = Duration::from_secs(5);
const GIVE_UP_WITHIN: Duration = Duration::from_secs(30);
/// Base64 of "ABCDEFGHIJKLMNOPQRSTUVWXYZ": a valid key shape that Ceph cannot decode, and
/// quotes in its log output ("failed to decode key '...'").
const UNDECODABLE_KEY: &str = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=";

/// Runs `fut` on a fresh thread inside `ns`'s network namespace, with its own current-thread
/// runtime.
fn in_ns<F>(ns: &NetNs, fut: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            let f = std::fs::File::open(format!("/run/netns/{}", ns.name)).expect("netns file");
            // SAFETY: setns(2) on a descriptor we own; it changes only this thread's network
            // namespace, which is what the processes it spawns inherit.
            let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(fut)
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// The test bed's own view of a subvolume (admin CLI): `fs subvolume info` as JSON.
fn server_info(ceph: &Ceph, name: &str) -> anyhow::Result<serde_json::Value> {
    let out = ceph.ceph(&[
        "fs",
        "subvolume",
        "info",
        FS_NAME,
        name,
        "--group_name",
        GROUP,
        "--format",
        "json",
    ])?;
    Ok(serde_json::from_str(&out)?)
}

fn server_names(ceph: &Ceph) -> anyhow::Result<Vec<String>> {
    let out = ceph.ceph(&["fs", "subvolume", "ls", FS_NAME, "--group_name", GROUP])?;
    let list: Vec<serde_json::Value> = serde_json::from_str(&out)?;
    Ok(list
        .iter()
        .filter_map(|v| v["name"].as_str().map(str::to_string))
        .collect())
}

/// Every error's text, for the "no key anywhere" check at the end.
fn text(e: &BackendError) -> String {
    format!("{e} / {e:?}")
}

#[test]
fn subvolumes_are_created_checked_resized_and_removed_on_a_real_cluster() -> anyhow::Result<()> {
    let dir = TempDir::new("csi-cephfs")?;
    let ns = NetNs::create()?;
    let mut ceph = Ceph::start_blocking(&ns, dir.path())?;
    eprintln!("ceph ready in {:?}", ceph.started_in);
    let admin_key = ceph.admin_key();
    let cluster = CephCluster {
        monitors: vec![ceph.mon_v2()],
        fsid: Some(ceph.fsid()),
    };
    let admin = CephCredentials::new("admin", admin_key.clone())?;
    let sv = Subvolumes::new(&cluster, &admin, FS_NAME, GROUP)?.with_timeout(T);
    let mut errors: Vec<String> = Vec::new();

    // The group does not exist yet: create makes it.
    let groups = ceph.ceph(&["fs", "subvolumegroup", "ls", FS_NAME])?;
    assert!(!groups.contains(GROUP), "{groups}");
    let t = Instant::now();
    let created = in_ns(&ns, sv.create("pvc-a", Some(10 * MIB)))?;
    eprintln!("create (group + subvolume) took {:?}", t.elapsed());
    assert_eq!(created.bytes_quota, Some(10 * MIB));
    assert!(
        created.path.starts_with("/volumes/csi/pvc-a/"),
        "{created:?}"
    );
    let groups = ceph.ceph(&["fs", "subvolumegroup", "ls", FS_NAME])?;
    assert!(groups.contains(&format!("\"{GROUP}\"")), "{groups}");

    // Server side: quota, mode 0777, the path getpath gives, and the directory is there.
    let info = server_info(&ceph, "pvc-a")?;
    assert_eq!(info["bytes_quota"], 10 * MIB, "{info:#}");
    assert_eq!(
        info["mode"].as_u64().map(|m| m & 0o7777),
        Some(0o777),
        "{info:#}"
    );
    let getpath = ceph.ceph(&[
        "fs",
        "subvolume",
        "getpath",
        FS_NAME,
        "pvc-a",
        "--group_name",
        GROUP,
    ])?;
    assert_eq!(getpath.trim(), created.path);
    let probe = format!("{}/probe", created.path);
    ceph.try_write_file(&probe, b"written by the test")?;
    assert_eq!(ceph.try_read_file(&probe)?, b"written by the test");

    // Same request again: the same subvolume. Another size: refused, and the quota stays
    // (Ceph's own `create` would have applied the new size).
    let again = in_ns(&ns, sv.create("pvc-a", Some(10 * MIB)))?;
    assert_eq!(again, created);
    match in_ns(&ns, sv.create("pvc-a", Some(20 * MIB))) {
        Err(e @ BackendError::AlreadyExists(_)) => errors.push(text(&e)),
        other => panic!("create with another size: {other:?}"),
    }
    match in_ns(&ns, sv.create("pvc-a", None)) {
        Err(e @ BackendError::AlreadyExists(_)) => errors.push(text(&e)),
        other => panic!("create without a size: {other:?}"),
    }
    assert_eq!(server_info(&ceph, "pvc-a")?["bytes_quota"], 10 * MIB);

    // No size: no quota.
    let unlimited = in_ns(&ns, sv.create("pvc-unlimited", None))?;
    assert_eq!(unlimited.bytes_quota, None);
    assert_eq!(
        server_info(&ceph, "pvc-unlimited")?["bytes_quota"],
        "infinite"
    );

    // Lookups: found (also over msgr v1 and with two monitor addresses), missing, missing
    // group, missing file system.
    assert_eq!(in_ns(&ns, sv.info("pvc-a"))?, Some(created.clone()));
    let both = CephCluster {
        monitors: vec![ceph.mon_v1(), ceph.mon_v2()],
        fsid: None,
    };
    let sv_both = Subvolumes::new(&both, &admin, FS_NAME, GROUP)?.with_timeout(T);
    assert_eq!(in_ns(&ns, sv_both.info("pvc-a"))?, Some(created.clone()));
    assert_eq!(in_ns(&ns, sv.info("pvc-missing"))?, None);
    let other_group = Subvolumes::new(&cluster, &admin, FS_NAME, "no-such-group")?.with_timeout(T);
    assert_eq!(in_ns(&ns, other_group.info("pvc-a"))?, None);
    let other_fs = Subvolumes::new(&cluster, &admin, "no-such-fs", GROUP)?.with_timeout(T);
    match in_ns(&ns, other_fs.info("pvc-a")) {
        Err(e @ BackendError::NotFound(_)) => errors.push(text(&e)),
        other => panic!("info in a missing file system: {other:?}"),
    }
    match in_ns(&ns, other_fs.delete("pvc-a")) {
        Err(e @ BackendError::NotFound(_)) => errors.push(text(&e)),
        other => panic!("delete in a missing file system: {other:?}"),
    }

    // Resize: the quota changes on the server; a missing subvolume is NotFound.
    assert_eq!(in_ns(&ns, sv.resize("pvc-a", 20 * MIB))?, 20 * MIB);
    assert_eq!(server_info(&ceph, "pvc-a")?["bytes_quota"], 20 * MIB);
    assert_eq!(
        in_ns(&ns, sv.info("pvc-a"))?,
        Some(SubvolumeInfo {
            path: created.path.clone(),
            bytes_quota: Some(20 * MIB),
        })
    );
    match in_ns(&ns, sv.resize("pvc-missing", 20 * MIB)) {
        Err(e @ BackendError::NotFound(_)) => errors.push(text(&e)),
        other => panic!("resize of a missing subvolume: {other:?}"),
    }

    // Another cluster's fsid: refused before anything is done.
    let wrong_fsid = CephCluster {
        monitors: vec![ceph.mon_v2()],
        fsid: Some("11111111-2222-3333-4444-555555555555".into()),
    };
    let sv_wrong = Subvolumes::new(&wrong_fsid, &admin, FS_NAME, GROUP)?.with_timeout(T);
    match in_ns(&ns, sv_wrong.create("pvc-wrong-cluster", Some(MIB))) {
        Err(e @ BackendError::Invalid(_)) => {
            assert!(text(&e).contains(&ceph.fsid()), "{e}");
            errors.push(text(&e));
        }
        other => panic!("create with a wrong fsid: {other:?}"),
    }
    assert!(!server_names(&ceph)?.contains(&"pvc-wrong-cluster".to_string()));

    // Delete: gone on the server; again, and in a missing group: still Ok.
    in_ns(&ns, sv.delete("pvc-a"))?;
    let names = server_names(&ceph)?;
    assert!(!names.contains(&"pvc-a".to_string()), "{names:?}");
    assert!(names.contains(&"pvc-unlimited".to_string()), "{names:?}");
    let gone = server_info(&ceph, "pvc-a").expect_err("info of a removed subvolume");
    assert!(format!("{gone:#}").contains("does not exist"), "{gone:#}");
    assert!(ceph.try_read_file(&probe).is_err());
    in_ns(&ns, sv.delete("pvc-a"))?;
    in_ns(&ns, other_group.delete("pvc-a"))?;
    assert_eq!(in_ns(&ns, sv.info("pvc-a"))?, None);

    // Credentials. Another client's valid key under client.admin: refused at connect.
    let app_key = ceph.authorize("app", "/app", "rw")?;
    let wrong_key = CephCredentials::new("admin", app_key.clone())?;
    let sv_wrong_key = Subvolumes::new(&cluster, &wrong_key, FS_NAME, GROUP)?.with_timeout(T);
    match in_ns(&ns, sv_wrong_key.create("pvc-denied", Some(MIB))) {
        Err(e @ BackendError::PermissionDenied(_)) => {
            eprintln!("wrong key: {e}");
            errors.push(text(&e));
        }
        other => panic!("create with a wrong key: {other:?}"),
    }
    // A key restricted to a path (no mgr caps): connects, then the manager refuses.
    let restricted = CephCredentials::new("app", app_key.clone())?;
    let sv_restricted = Subvolumes::new(&cluster, &restricted, FS_NAME, GROUP)?.with_timeout(T);
    for result in [
        in_ns(&ns, sv_restricted.create("pvc-denied", Some(MIB))).map(|_| ()),
        in_ns(&ns, sv_restricted.info("pvc-unlimited")).map(|_| ()),
        in_ns(&ns, sv_restricted.delete("pvc-unlimited")),
    ] {
        match result {
            Err(e @ BackendError::PermissionDenied(_)) => {
                eprintln!("path-restricted key: {e}");
                assert!(text(&e).contains("access denied"), "{e}");
                errors.push(text(&e));
            }
            other => panic!("path-restricted key: {other:?}"),
        }
    }
    // A key Ceph cannot decode, and quotes back in its log lines: refused, and not quoted
    // in the error.
    let undecodable = CephCredentials::new("admin", UNDECODABLE_KEY)?;
    let sv_undecodable = Subvolumes::new(&cluster, &undecodable, FS_NAME, GROUP)?.with_timeout(T);
    match in_ns(&ns, sv_undecodable.info("pvc-unlimited")) {
        Err(e @ BackendError::Invalid(_)) => {
            eprintln!("undecodable key: {e}");
            assert!(text(&e).contains("decode"), "{e}");
            errors.push(text(&e));
        }
        other => panic!("undecodable key: {other:?}"),
    }
    let names = server_names(&ceph)?;
    assert!(!names.contains(&"pvc-denied".to_string()), "{names:?}");
    assert!(names.contains(&"pvc-unlimited".to_string()), "{names:?}");

    // The monitor dies: every call gives up as Unavailable within its bound.
    ceph.stop_mon();
    let sv_short = Subvolumes::new(&cluster, &admin, FS_NAME, GROUP)?.with_timeout(SHORT);
    for (what, result) in [
        ("info", {
            let t = Instant::now();
            (
                in_ns(&ns, sv_short.info("pvc-unlimited")).map(|_| ()),
                t.elapsed(),
            )
        }),
        ("create", {
            let t = Instant::now();
            (
                in_ns(&ns, sv_short.create("pvc-b", Some(MIB))).map(|_| ()),
                t.elapsed(),
            )
        }),
    ] {
        let (result, took) = result;
        eprintln!("{what} with the monitor down: {took:?}");
        assert!(took < GIVE_UP_WITHIN, "{what} took {took:?}");
        match result {
            Err(e @ BackendError::Unavailable(_)) => {
                assert!(
                    text(&e).contains(&ceph.mon_v2()) && text(&e).contains("within 5 s"),
                    "{e}"
                );
                errors.push(text(&e));
            }
            other => panic!("{what} with the monitor down: {other:?}"),
        }
    }

    for e in &errors {
        for key in [admin_key.as_str(), app_key.as_str(), UNDECODABLE_KEY] {
            assert!(!e.contains(key), "a key in {e}");
            assert!(!e.contains(key.trim_end_matches('=')), "a key in {e}");
        }
    }
    drop(ceph);
    Ok(())
}

#[test]
fn unreachable_monitors_are_unavailable_within_the_bound() -> anyhow::Result<()> {
    // A namespace without Ceph: the namespace's own address refuses (nothing listens), the
    // void address never answers.
    let ns = NetNs::create()?;
    let key = "AQC5ygZr0XC1MRAAw+DVI46MO/nuqITDNz+buQ==";
    let creds = CephCredentials::new("admin", key)?;
    for monitor in [
        format!("{}:3300", ns.host_ip),
        format!("{}:6789", ns.void_ip),
    ] {
        let cluster = CephCluster {
            monitors: vec![monitor.clone()],
            fsid: Some("11111111-2222-3333-4444-555555555555".into()),
        };
        let sv = Subvolumes::new(&cluster, &creds, FS_NAME, GROUP)?.with_timeout(SHORT);
        let t = Instant::now();
        let result = in_ns(&ns, sv.create("pvc-x", Some(MIB)));
        let took = t.elapsed();
        eprintln!("{monitor}: {took:?}: {result:?}");
        assert!(took < GIVE_UP_WITHIN, "{monitor}: took {took:?}");
        assert!(
            took >= Duration::from_secs(3),
            "{monitor}: gave up early: {took:?}"
        );
        match result {
            Err(e @ BackendError::Unavailable(_)) => {
                let msg = text(&e);
                assert!(
                    msg.contains(&monitor) && msg.contains("within 5 s"),
                    "{msg}"
                );
                assert!(
                    !msg.contains(key) && !msg.contains(key.trim_end_matches('=')),
                    "{msg}"
                );
            }
            other => panic!("{monitor}: {other:?}"),
        }
    }
    Ok(())
}

/// `cnfs-csi controller` in the test's namespace, killed at drop.
struct Controller(std::process::Child);

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_cephfs_volume_is_a_subvolume_whose_quota_holds_the_container_and_64_mib(
) -> anyhow::Result<()> {
    use cnfs_csi::csi::controller_client::ControllerClient;
    use cnfs_csi::csi::volume_capability::access_mode::Mode;
    use cnfs_csi::csi::volume_capability::{AccessMode, AccessType, MountVolume};
    use cnfs_csi::csi::{
        CapacityRange, ControllerExpandVolumeRequest, CreateVolumeRequest, DeleteVolumeRequest,
        VolumeCapability,
    };
    use std::collections::HashMap;
    const SIZE: i64 = 128 << 20;

    let dir = TempDir::new("csi-cephfs-luks2")?;
    let ns = NetNs::create()?;
    let ceph = tokio::task::block_in_place(|| Ceph::start_blocking(&ns, dir.path()))?;
    let config = dir.path().join("csi.toml");
    std::fs::write(
        &config,
        format!(
            "[clusters.test]\nmonitors = [\"{}\"]\nfsid = \"{}\"\n",
            ceph.mon_v2(),
            ceph.fsid()
        ),
    )?;
    let socket = dir.path().join("csi.sock");
    let _csi = Controller(
        std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", ns.name))
            .arg(tokio::task::block_in_place(
                cnfs_testbed::artifacts::csi_binary,
            ))
            .arg("--endpoint")
            .arg(&socket)
            .arg("controller")
            .arg("--config")
            .arg(&config)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("cnfs-csi.log"))?)
            .spawn()?,
    );
    let end = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        anyhow::ensure!(Instant::now() < end, "cnfs-csi did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut controller = ControllerClient::new(cnfs_csi::client::connect(&socket).await?);
    let secrets = HashMap::from([
        ("adminID".to_string(), "admin".to_string()),
        ("adminKey".to_string(), ceph.admin_key()),
    ]);
    let name = "pvc-luks2";
    let vol = controller
        .create_volume(CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(CapacityRange {
                required_bytes: SIZE,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![VolumeCapability {
                access_type: Some(AccessType::Mount(MountVolume::default())),
                access_mode: Some(AccessMode {
                    mode: Mode::SingleNodeWriter as i32,
                }),
            }],
            parameters: HashMap::from([
                ("fs".to_string(), "cephfs".to_string()),
                ("clusterID".to_string(), "test".to_string()),
                ("fsName".to_string(), FS_NAME.to_string()),
                ("encryption".to_string(), "luks2".to_string()),
            ]),
            secrets: secrets.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .volume
        .expect("volume");
    assert_eq!(
        vol.volume_id,
        format!("cephfs+luks2#test#{FS_NAME}#{GROUP}#{name}")
    );
    // The capacity is the container's; the quota holds it and 64 MiB more.
    assert_eq!(vol.capacity_bytes, SIZE);
    let info = server_info(&ceph, name)?;
    assert_eq!(info["bytes_quota"], SIZE as u64 + 64 * MIB, "{info:#}");
    let source = &vol.volume_context["source"];
    assert!(
        source.starts_with(&format!(
            "cephfs://{}/volumes/{GROUP}/{name}/",
            ceph.mon_v2()
        )) && source.ends_with(&format!(
            "?fs={FS_NAME}&fsid={}&encryption=luks2&size={SIZE}&grow=quota",
            ceph.fsid()
        )),
        "{source}"
    );

    // Expansion raises the quota to the new container plus 64 MiB (the guest sizes a
    // `grow=quota` container from it at its next mount: cephfs_e2e step 6b); a smaller size
    // afterwards lowers nothing and answers the size the quota gives.
    let expand = |required: i64| ControllerExpandVolumeRequest {
        volume_id: vol.volume_id.clone(),
        capacity_range: Some(CapacityRange {
            required_bytes: required,
            limit_bytes: 0,
        }),
        secrets: secrets.clone(),
        ..Default::default()
    };
    let grown = controller
        .controller_expand_volume(expand(2 * SIZE))
        .await?
        .into_inner();
    assert_eq!(grown.capacity_bytes, 2 * SIZE);
    assert!(!grown.node_expansion_required);
    assert_eq!(
        server_info(&ceph, name)?["bytes_quota"],
        2 * SIZE as u64 + 64 * MIB
    );
    let again = controller
        .controller_expand_volume(expand(SIZE))
        .await?
        .into_inner();
    assert_eq!(again.capacity_bytes, 2 * SIZE, "shrank");
    assert_eq!(
        server_info(&ceph, name)?["bytes_quota"],
        2 * SIZE as u64 + 64 * MIB
    );
    // An admin took the quota off: expansion puts one back (the quota is how the new size
    // reaches the guest; without one it answered success and the container never grew).
    ceph.ceph(&[
        "fs",
        "subvolume",
        "resize",
        FS_NAME,
        name,
        "inf",
        "--group_name",
        GROUP,
    ])?;
    assert_eq!(server_info(&ceph, name)?["bytes_quota"], "infinite");
    let unlimited = controller
        .controller_expand_volume(expand(3 * SIZE))
        .await?
        .into_inner();
    assert_eq!(unlimited.capacity_bytes, 3 * SIZE);
    assert_eq!(
        server_info(&ceph, name)?["bytes_quota"],
        3 * SIZE as u64 + 64 * MIB
    );

    controller
        .delete_volume(DeleteVolumeRequest {
            volume_id: vol.volume_id.clone(),
            secrets,
        })
        .await?;
    assert!(
        !server_names(&ceph)?.iter().any(|n| n == name),
        "subvolume left"
    );
    Ok(())
}
