//! The CSI controller's NFS backend against a real nfs-ganesha: the user-space NFSv3 client
//! runs on a thread inside the test's network namespace, and every effect is checked on the
//! server side, in the exported host directory. One case boots a guest: an encrypted
//! (`encryption: luks2`) volume from CreateVolume to NodeUnpublishVolume, grown by
//! ControllerExpandVolume at its next mount in between, the real `cnfs-csi`
//! binary (no capability) playing both services and the test playing kubelet and the CNFS
//! shim (hand-off record and node-publish secret → the agent's Mount).

use std::collections::HashMap;
use std::future::Future;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cnfs_csi::backend::nfs::NfsShare;
use cnfs_csi::backend::{BackendError, OnDelete};
use cnfs_csi::csi::controller_client::ControllerClient;
use cnfs_csi::csi::node_client::NodeClient;
use cnfs_csi::csi::volume_capability::access_mode::Mode;
use cnfs_csi::csi::volume_capability::{AccessMode, AccessType, MountVolume};
use cnfs_csi::csi::{
    CapacityRange, ControllerExpandVolumeRequest, CreateVolumeRequest, DeleteVolumeRequest,
    NodePublishVolumeRequest, NodeUnpublishVolumeRequest, VolumeCapability,
};
use cnfs_protocols::agent;
use cnfs_protocols::handoff::{self, HandoffDir};
use cnfs_testbed::ganesha::EXPORT;
use cnfs_testbed::process::{files_containing, run};
use cnfs_testbed::vm::ctx;
use cnfs_testbed::{mount_request, Artifacts, Ganesha, NetNs, TempDir, Vm};

/// Budget of an operation that should succeed (generous: a loaded two-core machine).
const T: Duration = Duration::from_secs(20);

/// Field order is drop order: the server goes first, then the namespace, then the files.
struct Bed {
    nfs: Ganesha,
    ns: NetNs,
    dir: TempDir,
}

impl Bed {
    fn start() -> anyhow::Result<Self> {
        let dir = TempDir::new("csi-nfs")?;
        let ns = NetNs::create()?;
        let nfs = Ganesha::start(&ns, dir.path())?;
        Ok(Bed { nfs, ns, dir })
    }

    fn share(&self) -> NfsShare {
        NfsShare {
            server: self.ns.host_ip.clone(),
            port: None,
            export: EXPORT.to_string(),
        }
    }

    /// `<export dir on the host>/<rel>`.
    fn on_server(&self, rel: &str) -> std::path::PathBuf {
        self.nfs.export_dir.join(rel)
    }

    /// Runs `fut` on a thread that has joined the namespace's network, with its own
    /// current-thread runtime: the client's sockets then live where the server is.
    fn run<F>(&self, fut: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        let path = format!("/run/netns/{}", self.ns.name);
        std::thread::scope(|s| {
            s.spawn(move || {
                let f = std::fs::File::open(&path).expect("opening the namespace");
                // SAFETY: a plain syscall on a valid fd; it only changes this thread's
                // network namespace.
                let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime")
                    .block_on(fut)
            })
            .join()
            .expect("client thread panicked")
        })
    }
}

/// `chattr +i` on a path for as long as the guard lives (so the temp dir can be removed
/// afterwards, also when the test fails).
struct Immutable(std::path::PathBuf);

impl Immutable {
    fn set(p: &Path) -> anyhow::Result<Self> {
        run(std::process::Command::new("chattr").arg("+i").arg(p))?;
        Ok(Immutable(p.to_path_buf()))
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .output();
    }
}

fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn invalid_message<T: std::fmt::Debug>(r: Result<T, BackendError>) -> String {
    match r {
        Err(BackendError::Invalid(m)) => m,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

fn unavailable_message<T: std::fmt::Debug>(r: Result<T, BackendError>) -> String {
    match r {
        Err(BackendError::Unavailable(m)) => m,
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[test]
fn volume_directories_are_created_probed_and_removed_on_the_server() -> anyhow::Result<()> {
    let bed = Bed::start()?;
    let share = bed.share();

    // Create: a world-writable directory appears in the export; a second create is a no-op
    // that keeps what is inside.
    bed.run(share.create_dir("pvc-a", T))?;
    let a = bed.on_server("pvc-a");
    assert!(a.is_dir(), "{} not created", a.display());
    assert_eq!(mode_of(&a), 0o777);
    std::fs::write(a.join("data"), b"first volume")?;
    bed.run(share.create_dir("pvc-a", T))?;
    assert_eq!(std::fs::read(a.join("data"))?, b"first volume");
    // An explicit mode is applied exactly, whatever the server's umask.
    bed.run(share.create_dir_with_mode("pvc-m", 0o750, T))?;
    assert_eq!(mode_of(&bed.on_server("pvc-m")), 0o750);

    // Probe.
    assert!(bed.run(share.dir_exists("pvc-a", T))?);
    assert!(!bed.run(share.dir_exists("pvc-none", T))?);

    // A file where a volume would go is refused and left alone.
    std::fs::write(bed.on_server("plain"), b"not a volume")?;
    let m = invalid_message(bed.run(share.create_dir("plain", T)));
    assert!(m.contains("name"), "{m}");
    assert!(!bed.run(share.dir_exists("plain", T))?);
    let m = invalid_message(bed.run(share.delete_dir("plain", OnDelete::Delete, T)));
    assert!(m.contains("name"), "{m}");
    assert_eq!(std::fs::read(bed.on_server("plain"))?, b"not a volume");

    // Retain: nothing changes.
    bed.run(share.delete_dir("pvc-a", OnDelete::Retain, T))?;
    assert_eq!(std::fs::read(a.join("data"))?, b"first volume");

    // Archive: renamed beside itself with its data; a second archive of the same name gets
    // the unix-seconds suffix and leaves the first archive as it was.
    bed.run(share.delete_dir("pvc-a", OnDelete::Archive, T))?;
    assert!(!a.exists(), "pvc-a still there after archive");
    assert_eq!(
        std::fs::read(bed.on_server("archived-pvc-a/data"))?,
        b"first volume"
    );
    assert!(!bed.run(share.dir_exists("pvc-a", T))?);
    bed.run(share.create_dir("pvc-a", T))?;
    std::fs::write(a.join("data"), b"second volume")?;
    let before = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    bed.run(share.delete_dir("pvc-a", OnDelete::Archive, T))?;
    let after = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    assert!(!a.exists());
    assert_eq!(
        std::fs::read(bed.on_server("archived-pvc-a/data"))?,
        b"first volume"
    );
    let second: Vec<String> = std::fs::read_dir(&bed.nfs.export_dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("archived-pvc-a-"))
        .collect();
    assert_eq!(second.len(), 1, "{second:?}");
    let secs: u64 = second[0]["archived-pvc-a-".len()..].parse()?;
    assert!(
        (before..=after).contains(&secs),
        "{secs} not in {before}..={after}"
    );
    assert_eq!(
        std::fs::read(bed.on_server(&second[0]).join("data"))?,
        b"second volume"
    );

    // Delete: a whole tree goes (many files, so listing takes several READDIR pages; nested
    // and empty directories; symlinks), and nothing a symlink points to is touched.
    let outside = bed.dir.path().join("outside");
    std::fs::create_dir_all(&outside)?;
    std::fs::write(outside.join("keep"), b"outside the export")?;
    let t = bed.on_server("pvc-t");
    std::fs::create_dir_all(t.join("sub/deeper"))?;
    std::fs::create_dir_all(t.join("empty"))?;
    for i in 0..600 {
        std::fs::write(t.join(format!("file-with-a-longish-name-{i:04}")), b"x")?;
    }
    std::fs::write(t.join("sub/f2"), b"two")?;
    std::fs::write(t.join("sub/deeper/f3"), b"three")?;
    std::os::unix::fs::symlink(&outside, t.join("link-to-dir"))?;
    std::os::unix::fs::symlink(outside.join("keep"), t.join("sub/link-to-file"))?;
    std::os::unix::fs::symlink("../../nowhere", t.join("sub/deeper/dangling"))?;
    std::fs::set_permissions(t.join("sub/deeper"), std::fs::Permissions::from_mode(0o500))?;
    assert!(bed.run(share.dir_exists("pvc-t", T))?);
    let started = Instant::now();
    bed.run(share.delete_dir("pvc-t", OnDelete::Delete, T))?;
    eprintln!("deleted a tree of ~610 entries in {:?}", started.elapsed());
    assert!(!t.exists(), "pvc-t still there after delete");
    assert_eq!(std::fs::read(outside.join("keep"))?, b"outside the export");
    assert!(!bed.run(share.dir_exists("pvc-t", T))?);

    // Missing directories are fine for every policy.
    for policy in [OnDelete::Delete, OnDelete::Archive, OnDelete::Retain] {
        bed.run(share.delete_dir("pvc-t", policy, T))?;
    }

    // Bad names never reach the server.
    for bad in ["../escape", "", "a/b", "..", "spaced name"] {
        let m = invalid_message(bed.run(share.create_dir(bad, T)));
        assert!(m.contains("name"), "{bad:?}: {m}");
    }
    assert!(!bed
        .nfs
        .export_dir
        .parent()
        .is_some_and(|p| p.join("escape").exists()));

    // Everything else in the export is as the steps above left it.
    let mut left: Vec<String> = std::fs::read_dir(&bed.nfs.export_dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    let mut expected = vec![
        "archived-pvc-a".to_string(),
        second[0].clone(),
        "plain".to_string(),
        "pvc-m".to_string(),
    ];
    expected.sort();
    assert_eq!(left, expected);
    Ok(())
}

#[test]
fn failures_are_classified_and_bounded() -> anyhow::Result<()> {
    let bed = Bed::start()?;
    let good = bed.share();

    // A host name is resolved (inside the namespace, "localhost" is its own loopback).
    let by_name = NfsShare {
        server: "localhost".into(),
        ..good.clone()
    };
    bed.run(by_name.create_dir("by-name", T))?;
    assert!(bed.on_server("by-name").is_dir());

    // An export the server does not have.
    let missing = NfsShare {
        export: "/no-such-export".into(),
        ..good.clone()
    };
    match bed.run(missing.create_dir("x", T)) {
        Err(BackendError::NotFound(m)) => {
            eprintln!("unknown export: {m}");
            assert!(m.contains("/no-such-export"), "{m}");
            assert!(m.contains(&bed.ns.host_ip), "{m}");
        }
        other => panic!("expected NotFound, got {other:?}"),
    }

    // The server refuses the write: an immutable export root stops even an unsquashed root.
    {
        let _immutable = Immutable::set(&bed.nfs.export_dir)?;
        match bed.run(good.create_dir("denied", T)) {
            Err(BackendError::PermissionDenied(m)) => {
                eprintln!("refused write: {m}");
                assert!(m.contains(&bed.ns.host_ip) && m.contains("denied"), "{m}");
            }
            other => panic!("expected PermissionDenied, got {other:?}"),
        }
    }
    assert!(!bed.on_server("denied").exists());

    // An NFS port nobody listens on: refused at once.
    let closed = NfsShare {
        port: Some(2050),
        ..good.clone()
    };
    let started = Instant::now();
    let m = unavailable_message(bed.run(closed.dir_exists("x", T)));
    eprintln!("closed port: {m}");
    assert!(m.contains(&bed.ns.host_ip) && m.contains("2050"), "{m}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    // A black hole: void_ip resolves to a MAC nobody owns on a tap nobody reads, so SYNs
    // vanish without an answer or an error; only the timeout can end the call.
    run(std::process::Command::new("ip").args([
        "-n",
        &bed.ns.name,
        "neigh",
        "replace",
        &bed.ns.void_ip,
        "lladdr",
        "02:00:00:00:00:99",
        "dev",
        &bed.ns.tap,
        "nud",
        "permanent",
    ]))?;
    let silent = NfsShare {
        server: bed.ns.void_ip.clone(),
        ..good.clone()
    };
    let deadline = Duration::from_secs(3);
    for (what, op) in [("create_dir", 0), ("dir_exists", 1), ("delete_dir", 2)] {
        let started = Instant::now();
        let r = bed.run(async {
            match op {
                0 => silent.create_dir("x", deadline).await,
                1 => silent.dir_exists("x", deadline).await.map(|_| ()),
                _ => silent.delete_dir("x", OnDelete::Delete, deadline).await,
            }
        });
        let took = started.elapsed();
        let m = unavailable_message(r);
        eprintln!("black hole, {what}, after {took:?}: {m}");
        assert!(
            m.contains(&bed.ns.void_ip) && m.contains("within 3 s"),
            "{what}: {m}"
        );
        assert!(
            took >= Duration::from_millis(2900),
            "{what} gave up early ({took:?}): the black hole answered?"
        );
        assert!(took < Duration::from_secs(20), "{what} took {took:?}");
    }

    // The server itself is unharmed by all of this.
    assert!(bed.run(good.dir_exists("by-name", T))?);
    Ok(())
}

/// `cnfs-csi all` in the test's network namespace (the controller reaches ganesha there),
/// with every capability gone before exec, as the node DaemonSet runs it.
struct Csi {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Csi {
    fn start(ns: &NetNs, dir: &Path, handoff_dir: &Path) -> anyhow::Result<Self> {
        let socket = dir.join("csi.sock");
        let log = dir.join("cnfs-csi.log");
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", ns.name))
            .args([
                "setpriv",
                "--bounding-set=-all",
                "--inh-caps=-all",
                "--ambient-caps=-all",
                "--no-new-privs",
            ])
            .arg(cnfs_testbed::artifacts::csi_binary())
            .arg("--endpoint")
            .arg(&socket)
            .args(["all", "--node-id", "node-a", "--handoff-dir"])
            .arg(handoff_dir)
            .args(["--kata-sandbox-root", "/nonexistent/kata"])
            .args([
                "--config",
                "/nonexistent/csi.toml",
                "--backend-timeout",
                "10",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let end = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            anyhow::ensure!(Instant::now() < end, "cnfs-csi did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Csi { child, socket, log })
    }
}

impl Drop for Csi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A hand-off directory on tmpfs (the node plugin writes keys nowhere else), removed at drop.
struct ShmDir(PathBuf);

impl Drop for ShmDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rwo() -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_csi_volume_is_a_luks2_container_on_the_share_that_only_the_guest_reads(
) -> anyhow::Result<()> {
    // Raw bytes of the Kubernetes secret's value, a trailing newline included.
    const VOLUME_KEY: &str = "csi-e2e volume key: 3f9a0c17d2b84e61\n";
    const SIZE: i64 = 128 << 20;
    let art = Artifacts::locate()?;
    let dir = TempDir::new("csi-luks2")?;
    let ns = NetNs::create()?;
    let nfs = Ganesha::start(&ns, dir.path())?;
    let handoff_dir = ShmDir(PathBuf::from(format!(
        "/dev/shm/cnfs-csi-luks2-{}",
        cnfs_testbed::unique_id()
    )));
    let csi = Csi::start(&ns, dir.path(), &handoff_dir.0)?;
    let channel = cnfs_csi::client::connect(&csi.socket).await?;
    let mut controller = ControllerClient::new(channel.clone());
    let mut node = NodeClient::new(channel);

    // CreateVolume of an `encryption: luks2` class: a directory on the share, and a source
    // that tells the node side the mode and the container's size.
    let name = format!("pvc-{}", cnfs_testbed::unique_id());
    let vol = controller
        .create_volume(CreateVolumeRequest {
            name: name.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: SIZE,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![rwo()],
            parameters: HashMap::from([
                ("fs".to_string(), "nfs".to_string()),
                ("server".to_string(), ns.host_ip.clone()),
                ("share".to_string(), EXPORT.to_string()),
                ("vers".to_string(), "4.1".to_string()),
                ("onDelete".to_string(), "delete".to_string()),
                ("encryption".to_string(), "luks2".to_string()),
            ]),
            ..Default::default()
        })
        .await?
        .into_inner()
        .volume
        .expect("volume");
    assert!(vol.volume_id.starts_with("nfs+luks2#"), "{}", vol.volume_id);
    assert_eq!(vol.capacity_bytes, SIZE);
    let source = &vol.volume_context["source"];
    assert_eq!(
        source,
        &format!(
            "nfs://{}{EXPORT}/{name}?vers=4.1&encryption=luks2&size={SIZE}",
            ns.host_ip
        )
    );
    let server_dir = nfs.export_dir.join(&name);
    assert!(server_dir.is_dir(), "{} not created", server_dir.display());

    // NodePublishVolume with the key in the node-publish secret, as kubelet sends it.
    let pod_dir = dir
        .path()
        .join("kubelet/pods/uid-1/volumes/kubernetes.io~csi/pv-1");
    std::fs::create_dir_all(&pod_dir)?;
    let target = pod_dir.join("mount").display().to_string();
    let mut context = vol.volume_context.clone();
    context.insert("csi.storage.k8s.io/pod.namespace".into(), "team-a".into());
    context.insert("csi.storage.k8s.io/pod.name".into(), "app".into());
    node.node_publish_volume(NodePublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        target_path: target.clone(),
        volume_capability: Some(rwo()),
        volume_context: context,
        secrets: HashMap::from([("encryptionKey".to_string(), VOLUME_KEY.to_string())]),
        ..Default::default()
    })
    .await?;

    // The shim's part: the record and the key from the hand-off, the spec, the agent's Mount.
    let h = HandoffDir::new(&handoff_dir.0);
    let record = h.read_record(&target)?.expect("record");
    assert!(record.has_secret, "{record:?}");
    assert!(
        !std::fs::read_to_string(h.record_path(&target))?.contains("volume key"),
        "the record holds no key"
    );
    let secret = h.read_secret(&target)?.expect("the key beside the record");
    let (spec, wire) = record.volume_spec(Some(&secret))?;
    let enc = spec.encryption.as_ref().expect("encrypted");
    assert_eq!(enc.key.expose(), VOLUME_KEY.as_bytes());
    assert_eq!(enc.size, SIZE as u64);

    let vm = Vm::boot(&art, &ns, dir.path()).await?;
    let g = &vm.exec;
    let a = vm.agent().await?;
    let guest_name = handoff::guest_volume_name(&target);
    let t = Duration::from_secs(240);
    // First use: two argon2 passes and mkfs under TCG.
    a.mount(ctx(t), &mount_request(wire.clone(), 180_000))
        .await?;
    let mounts = g.ok("cat /proc/mounts").await?;
    assert!(
        mounts.contains(&format!("/run/cnfs/volumes/{guest_name} ext4 ")),
        "{mounts}"
    );

    // A container's write, through its own bind mount of the volume.
    let canary = format!("CNFS-CSI-PLAINTEXT-CANARY-{}", cnfs_testbed::unique_id());
    g.ok(&format!(
        "unshare -m sh -c 'mkdir -p /tmp/ctr && mount --bind /run/cnfs/volumes/{guest_name} \
         /tmp/ctr && for i in 1 2 3 4 5 6 7 8; do echo {canary} >> /tmp/ctr/canary.txt; done \
         && sync'"
    ))
    .await?;
    assert_eq!(
        g.ok(&format!("cat /run/cnfs/volumes/{guest_name}/canary.txt"))
            .await?
            .lines()
            .filter(|l| *l == canary)
            .count(),
        8
    );

    // ControllerExpandVolume while the pod runs: the new size is recorded beside the
    // container on the share; the mounted volume keeps its size until its next mount.
    let ext4_bytes = |out: String| -> u64 {
        let mut f = out
            .split_whitespace()
            .map(|n| n.parse::<u64>().unwrap_or(0));
        f.next().unwrap_or(0) * f.next().unwrap_or(0)
    };
    let statfs = format!("stat -f -c '%b %S' /run/cnfs/volumes/{guest_name}");
    let small = ext4_bytes(g.ok(&statfs).await?);
    let grown = controller
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: vol.volume_id.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: 2 * SIZE,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(grown.capacity_bytes, 2 * SIZE, "{grown:?}");
    assert!(!grown.node_expansion_required, "{grown:?}");
    let marker = format!("cnfs-volume.size.{}", 2 * SIZE);
    assert!(
        server_dir.join(&marker).is_dir(),
        "no {marker} on the share"
    );
    let container = server_dir.join("cnfs-volume.luks2");
    assert_eq!(std::fs::metadata(&container)?.len(), SIZE as u64);
    assert_eq!(
        ext4_bytes(g.ok(&statfs).await?),
        small,
        "grown before a mount"
    );

    // The pod restarts: unmounted, then mounted again with the same volume context (whose
    // size is still the old one). The guest takes the recorded size and grows the container
    // file, the mapping and ext4, data intact.
    let unmount = agent::UnmountRequest {
        name: guest_name.clone(),
        timeout_ms: 30_000,
        force: true,
        ..Default::default()
    };
    a.unmount(ctx(t), &unmount).await?;
    a.mount(ctx(t), &mount_request(wire, 180_000)).await?;
    assert_eq!(
        std::fs::metadata(&container)?.len(),
        2 * SIZE as u64,
        "the container on the share did not grow to the recorded size"
    );
    let big = ext4_bytes(g.ok(&statfs).await?);
    assert!(
        big > small + SIZE as u64 * 3 / 4 && big <= 2 * SIZE as u64,
        "ext4 did not grow into the container: {small} -> {big}"
    );
    assert_eq!(
        g.ok(&format!("cat /run/cnfs/volumes/{guest_name}/canary.txt"))
            .await?
            .lines()
            .filter(|l| *l == canary)
            .count(),
        8
    );

    // Sandbox delete (the shim unmounts), then kubelet's NodeUnpublishVolume.
    a.unmount(ctx(t), &unmount).await?;
    node.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        target_path: target.clone(),
    })
    .await?;

    // The share holds one stock LUKS2 container, its size marker and no plaintext.
    let mut listing: Vec<String> = std::fs::read_dir(&server_dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    listing.sort();
    assert_eq!(
        listing,
        ["cnfs-volume.luks2".to_string(), marker],
        "no temp file left"
    );
    assert_eq!(std::fs::metadata(&container)?.len(), 2 * SIZE as u64);
    let out = Command::new("cryptsetup")
        .args(["isLuks", "--type", "luks2"])
        .arg(&container)
        .output()?;
    assert!(
        out.status.success(),
        "host cryptsetup isLuks: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        files_containing(&nfs.export_dir, canary.as_bytes())?.is_empty(),
        "plaintext on the server"
    );
    assert!(
        files_containing(&nfs.export_dir, VOLUME_KEY.as_bytes())?.is_empty(),
        "key on the server"
    );

    // Nothing is left: in the guest no volume or backing mount, dm device or bound loop; on
    // the node no target, record or key.
    let dm = g.ok("ls /sys/block | grep '^dm-' || true").await?;
    let loops = g
        .ok("for l in /sys/block/loop*/loop/backing_file; do [ -e \"$l\" ] && cat \"$l\"; done; true")
        .await?;
    let left = g
        .ok("grep -E 'cnfs/(backing|volumes)' /proc/mounts || true")
        .await?;
    assert!(
        dm.trim().is_empty() && loops.trim().is_empty() && left.trim().is_empty(),
        "left in the guest: dm={dm:?} loops={loops:?} mounts={left:?}"
    );
    assert!(!Path::new(&target).exists(), "target left");
    assert!(h.read_record(&target)?.is_none() && h.read_secret(&target)?.is_none());

    // DeleteVolume finds the provisioner through the encrypted id.
    controller
        .delete_volume(DeleteVolumeRequest {
            volume_id: vol.volume_id.clone(),
            ..Default::default()
        })
        .await?;
    assert!(!server_dir.exists(), "onDelete=delete removed it");

    // The key is in nothing the plugin logged.
    let log = std::fs::read_to_string(&csi.log)?;
    assert!(log.contains("NodePublishVolume"), "{log}");
    assert!(!log.contains("volume key"), "{log}");
    drop(vm);
    Ok(())
}

/// The example in configs/kubernetes/example-csi-luks2.yaml is what the driver accepts: the
/// class's parameters plan an encrypted NFS volume, the claim asks for a mode and a size the
/// controller takes, the secret the class names (templates resolved for the claim) holds
/// `encryptionKey`, and a publish with it is valid.
#[test]
fn the_luks2_csi_example_is_a_class_claim_and_secret_the_driver_accepts() -> anyhow::Result<()> {
    use cnfs_csi::backend::nfs::{NfsVolume, PARAMETERS};
    use cnfs_protocols::spec::EncryptionMode;

    let ex = Example::read("example-csi-luks2.yaml")?;
    let (class, claim, pod) = (
        ex.of("StorageClass")?,
        ex.of("PersistentVolumeClaim")?,
        ex.of("Pod")?,
    );
    assert_eq!(class["provisioner"], "csi.cnfs.io");
    assert_eq!(
        class["allowVolumeExpansion"], true,
        "an NFS class's luks2 volumes grow at their next mount"
    );
    let params: HashMap<String, String> = serde_json::from_value(class["parameters"].clone())?;
    assert_eq!(
        cnfs_csi::encryption::from_parameters(&params).map_err(|e| anyhow::anyhow!("{e:?}"))?,
        Some(EncryptionMode::Luks2)
    );
    // Every parameter is one the controller reads or external-provisioner consumes.
    for k in params.keys() {
        assert!(
            PARAMETERS.contains(&k.as_str())
                || k == cnfs_csi::encryption::PARAMETER
                || k.starts_with("csi.storage.k8s.io/node-publish-secret-"),
            "parameter {k}"
        );
    }
    let driver_params: HashMap<String, String> = params
        .iter()
        .filter(|(k, _)| !k.contains('/') && k.as_str() != "encryption")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let (_, planned) = NfsVolume::plan("pvc-0a1b", &driver_params)
        .map_err(|e| anyhow::anyhow!("the class's parameters: {e}"))?;

    // The claim: a single-node mode and a size the controller turns into a container.
    let modes: Vec<String> = serde_json::from_value(claim["spec"]["accessModes"].clone())?;
    assert!(
        modes
            .iter()
            .all(|m| m == "ReadWriteOncePod" || m == "ReadWriteOnce"),
        "{modes:?}"
    );
    let storage = claim["spec"]["resources"]["requests"]["storage"]
        .as_str()
        .unwrap_or_default();
    let size = cnfs_protocols::spec::encryption::parse_size("storage", storage)?;
    let size = cnfs_csi::encryption::container_size(cnfs_csi::backend::Capacity {
        required: size,
        limit: 0,
    })
    .map_err(|e| anyhow::anyhow!("{e:?}"))?;

    // The secret the class names for this claim exists and holds encryptionKey.
    let key = ex.key_for_claim(&params)?;
    let key = key.as_str();

    // The pod runs under the CNFS runtime class, and a publish of the volume with that secret
    // is valid.
    assert_eq!(pod["spec"]["runtimeClassName"], "kata-cnfs");
    let source = cnfs_csi::encryption::add_to_source(&planned, EncryptionMode::Luks2, size);
    let p = cnfs_csi::node::validate_publish(&NodePublishVolumeRequest {
        volume_id: "nfs+luks2#delete#10.0.0.5#/exports/k8s#pvc-0a1b".into(),
        target_path: "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/pvc-0a1b/mount".into(),
        volume_capability: Some(rwo()),
        volume_context: HashMap::from([("source".to_string(), source)]),
        secrets: HashMap::from([("encryptionKey".to_string(), key.to_string())]),
        ..Default::default()
    })
    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    assert!(p.record.has_secret);
    Ok(())
}

fn rwx() -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode {
            mode: Mode::MultiNodeMultiWriter as i32,
        }),
    }
}

/// A ReadWriteMany `encryption: gocryptfs` claim, published to two pods (two targets, two
/// hand-offs) whose guest volumes see each other's files, while the share holds only the
/// encrypted tree. One guest serves both pods here (each pod has its own guest in a cluster;
/// each volume is its own NFS superblock and gocryptfs daemon either way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_encrypted_csi_volume_serves_two_pods_that_see_each_others_files(
) -> anyhow::Result<()> {
    const VOLUME_KEY: &str = "csi-e2e shared key: 7c1e5a93b0d24f68";
    let art = Artifacts::locate()?;
    let dir = TempDir::new("csi-gocryptfs")?;
    let ns = NetNs::create()?;
    let nfs = Ganesha::start(&ns, dir.path())?;
    let handoff_dir = ShmDir(PathBuf::from(format!(
        "/dev/shm/cnfs-csi-gocryptfs-{}",
        cnfs_testbed::unique_id()
    )));
    let csi = Csi::start(&ns, dir.path(), &handoff_dir.0)?;
    let channel = cnfs_csi::client::connect(&csi.socket).await?;
    let mut controller = ControllerClient::new(channel.clone());
    let mut node = NodeClient::new(channel);

    let name = format!("pvc-{}", cnfs_testbed::unique_id());
    let vol = controller
        .create_volume(CreateVolumeRequest {
            name: name.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: 1 << 30,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![rwx()],
            parameters: HashMap::from([
                ("fs".to_string(), "nfs".to_string()),
                ("server".to_string(), ns.host_ip.clone()),
                ("share".to_string(), EXPORT.to_string()),
                ("vers".to_string(), "4.1".to_string()),
                ("onDelete".to_string(), "delete".to_string()),
                ("encryption".to_string(), "gocryptfs".to_string()),
            ]),
            ..Default::default()
        })
        .await?
        .into_inner()
        .volume
        .expect("volume");
    assert!(
        vol.volume_id.starts_with("nfs+gocryptfs#"),
        "{}",
        vol.volume_id
    );
    assert_eq!(
        vol.volume_context["source"],
        format!(
            "nfs://{}{EXPORT}/{name}?vers=4.1&encryption=gocryptfs",
            ns.host_ip
        ),
        "no size: the volume shares the file system's space"
    );
    let server_dir = nfs.export_dir.join(&name);

    // Two pods publish it, each with the key in its node-publish secret.
    let h = HandoffDir::new(&handoff_dir.0);
    let mut targets = Vec::new();
    let mut wires = Vec::new();
    for pod in ["uid-1", "uid-2"] {
        let pod_dir = dir
            .path()
            .join(format!("kubelet/pods/{pod}/volumes/kubernetes.io~csi/pv-1"));
        std::fs::create_dir_all(&pod_dir)?;
        let target = pod_dir.join("mount").display().to_string();
        let mut context = vol.volume_context.clone();
        context.insert("csi.storage.k8s.io/pod.namespace".into(), "team-a".into());
        context.insert("csi.storage.k8s.io/pod.name".into(), format!("app-{pod}"));
        node.node_publish_volume(NodePublishVolumeRequest {
            volume_id: vol.volume_id.clone(),
            target_path: target.clone(),
            volume_capability: Some(rwx()),
            volume_context: context,
            secrets: HashMap::from([("encryptionKey".to_string(), VOLUME_KEY.to_string())]),
            ..Default::default()
        })
        .await?;
        let record = h.read_record(&target)?.expect("record");
        let secret = h.read_secret(&target)?.expect("the key beside the record");
        let (spec, wire) = record.volume_spec(Some(&secret))?;
        let enc = spec.encryption.as_ref().expect("encrypted");
        assert_eq!(enc.key.expose(), VOLUME_KEY.as_bytes());
        assert_eq!(enc.mode.as_str(), "gocryptfs");
        wires.push((handoff::guest_volume_name(&target), wire));
        targets.push(target);
    }

    let vm = Vm::boot(&art, &ns, dir.path()).await?;
    let g = &vm.exec;
    let a = vm.agent().await?;
    let t = Duration::from_secs(240);
    for (_, wire) in &wires {
        a.mount(ctx(t), &mount_request(wire.clone(), 180_000))
            .await?;
    }
    let (one, two) = (&wires[0].0, &wires[1].0);
    // Each pod's container writes through its own bind; the other pod reads it.
    let canary = format!("CNFS-CSI-SHARED-CANARY-{}", cnfs_testbed::unique_id());
    let write = |vol: &str, file: &str, text: &str| {
        format!(
            "unshare -m sh -c 'mkdir -p /tmp/ctr && mount --bind /run/cnfs/volumes/{vol} \
             /tmp/ctr && echo {text} > /tmp/ctr/{file} && sync'"
        )
    };
    g.ok(&write(one, "from-one.txt", &canary)).await?;
    g.ok(&write(two, "from-two.txt", "second-pod")).await?;
    assert_eq!(
        g.ok(&format!("cat /run/cnfs/volumes/{two}/from-one.txt"))
            .await?
            .trim(),
        canary
    );
    let seen = g
        .ok(&format!(
            "for i in $(seq 1 50); do cat /run/cnfs/volumes/{one}/from-two.txt 2>/dev/null && break; sleep 0.2; done"
        ))
        .await?;
    assert_eq!(seen.trim(), "second-pod");

    for ((guest_name, _), target) in wires.iter().zip(&targets) {
        a.unmount(
            ctx(t),
            &agent::UnmountRequest {
                name: guest_name.clone(),
                timeout_ms: 30_000,
                force: true,
                ..Default::default()
            },
        )
        .await?;
        node.node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: vol.volume_id.clone(),
            target_path: target.clone(),
        })
        .await?;
        assert!(h.read_record(target)?.is_none() && h.read_secret(target)?.is_none());
    }

    // The share holds the encrypted tree only: no plaintext, no plaintext name, no key.
    let listing: Vec<String> = std::fs::read_dir(&server_dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(listing, ["cnfs-volume.gocryptfs"], "no temp directory left");
    for needle in [canary.as_bytes(), VOLUME_KEY.as_bytes(), b"from-one"] {
        assert!(
            files_containing(&nfs.export_dir, needle)?.is_empty(),
            "{} on the server",
            String::from_utf8_lossy(needle)
        );
    }
    let names: Vec<String> = std::fs::read_dir(server_dir.join("cnfs-volume.gocryptfs"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.contains("from-")),
        "plaintext names: {names:?}"
    );
    let left = g
        // No literal "gocryptfs" in this shell's own command line, which the grep reads too.
        .ok("grep -E 'cnfs/(backing|volumes|gocryptf[s])' /proc/mounts; grep -ls 'gocryptf[s]' /proc/[0-9]*/cmdline; true")
        .await?;
    assert!(left.trim().is_empty(), "left in the guest: {left}");

    controller
        .delete_volume(DeleteVolumeRequest {
            volume_id: vol.volume_id.clone(),
            ..Default::default()
        })
        .await?;
    assert!(!server_dir.exists(), "onDelete=delete removed it");
    let log = std::fs::read_to_string(&csi.log)?;
    assert!(!log.contains("shared key"), "{log}");
    drop(vm);
    Ok(())
}

/// configs/kubernetes/example-csi-gocryptfs.yaml is what the driver accepts: the class plans
/// a gocryptfs volume on NFS, the claim is ReadWriteMany, the secret the class names for the
/// claim holds `encryptionKey`, and the Deployment's pods run under the CNFS runtime class.
#[test]
fn the_gocryptfs_csi_example_is_a_shared_class_claim_and_secret_the_driver_accepts(
) -> anyhow::Result<()> {
    use cnfs_protocols::spec::EncryptionMode;

    let ex = Example::read("example-csi-gocryptfs.yaml")?;
    let (class, claim, deploy) = (
        ex.of("StorageClass")?,
        ex.of("PersistentVolumeClaim")?,
        ex.of("Deployment")?,
    );
    assert_eq!(class["provisioner"], "csi.cnfs.io");
    let params: HashMap<String, String> = serde_json::from_value(class["parameters"].clone())?;
    assert_eq!(
        cnfs_csi::encryption::from_parameters(&params).map_err(|e| anyhow::anyhow!("{e:?}"))?,
        Some(EncryptionMode::Gocryptfs)
    );
    let modes: Vec<String> = serde_json::from_value(claim["spec"]["accessModes"].clone())?;
    assert_eq!(modes, ["ReadWriteMany"]);
    let key = ex.key_for_claim(&params)?;
    assert!(
        EncryptionMode::Gocryptfs
            .refuses_key(key.as_bytes())
            .is_none(),
        "the example key is one line"
    );
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(pod["runtimeClassName"], "kata-cnfs");
    assert_eq!(
        pod["volumes"][0]["persistentVolumeClaim"]["claimName"],
        claim["metadata"]["name"]
    );
    assert!(deploy["spec"]["replicas"].as_u64().unwrap_or(0) >= 2);
    Ok(())
}

/// The documents of an example under configs/kubernetes/, by kind.
struct Example {
    path: PathBuf,
    docs: Vec<serde_json::Value>,
}

impl Example {
    fn read(file: &str) -> anyhow::Result<Example> {
        use serde::Deserialize;
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../configs/kubernetes")
            .join(file);
        let text = std::fs::read_to_string(&path)?;
        let docs = serde_yaml::Deserializer::from_str(&text)
            .map(serde_json::Value::deserialize)
            .collect::<Result<_, _>>()?;
        Ok(Example { path, docs })
    }

    fn of(&self, kind: &str) -> anyhow::Result<&serde_json::Value> {
        self.docs
            .iter()
            .find(|d| d["kind"] == kind)
            .ok_or_else(|| anyhow::anyhow!("no {kind} in {}", self.path.display()))
    }

    /// The class's node-publish secret (name, namespace templates resolved for the claim)
    /// is the example's Secret; returns its `encryptionKey`.
    fn key_for_claim(&self, params: &HashMap<String, String>) -> anyhow::Result<String> {
        let (claim, secret) = (self.of("PersistentVolumeClaim")?, self.of("Secret")?);
        let resolve = |t: &str| {
            t.replace(
                "${pvc.name}",
                claim["metadata"]["name"].as_str().unwrap_or_default(),
            )
            .replace(
                "${pvc.namespace}",
                claim["metadata"]["namespace"].as_str().unwrap_or_default(),
            )
        };
        assert_eq!(
            resolve(&params["csi.storage.k8s.io/node-publish-secret-name"]),
            secret["metadata"]["name"]
        );
        assert_eq!(
            resolve(&params["csi.storage.k8s.io/node-publish-secret-namespace"]),
            secret["metadata"]["namespace"]
        );
        Ok(secret["stringData"]["encryptionKey"]
            .as_str()
            .expect("stringData.encryptionKey")
            .to_string())
    }
}
