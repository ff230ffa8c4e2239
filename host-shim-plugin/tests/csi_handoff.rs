//! CSI end to end on the test bed: `cnfs-csi` (both services, one process, no capability)
//! provisions on a real backend, publishes to a kubelet-style target path, and the wrapper
//! shim under the real containerd turns the app container's bind mount of that target into
//! the guest kernel's mount.
//!
//! - NFS on the real nfs-ganesha: a directory per volume; under another runtime the same
//!   bind mount yields a file that refuses writes, never an empty directory.
//! - CephFS on a real single-node Ceph in the same namespace: a subvolume per volume whose
//!   quota the guest kernel enforces and `ControllerExpandVolume` raises; the keys (the
//!   provisioner's admin key, the pod's user key) appear in no record, log, state or output.

mod common;

use common::{shim_on_path, text};

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use cnfs_csi::csi::controller_client::ControllerClient;
use cnfs_csi::csi::node_client::NodeClient;
use cnfs_csi::csi::volume_capability::access_mode::Mode;
use cnfs_csi::csi::volume_capability::{AccessMode, AccessType, MountVolume};
use cnfs_csi::csi::*;
use cnfs_protocols::handoff::{self, HandoffDir};
use cnfs_testbed::ceph::{Ceph, FS_NAME};
use cnfs_testbed::containerd::{Containerd, MINIMAL};
use cnfs_testbed::ganesha::EXPORT;
use cnfs_testbed::{rootfs, GuestExec, TestBed};

const RUNC: &str = "io.containerd.runc.v2";
const CNFS: &str = "io.containerd.cnfs.v2";
const MIB: i64 = 1 << 20;

/// The `cnfs-csi` binary beside this package's shim, brought up to date first (when this
/// package's tests run alone, cargo has not built another package's binary; a stale one
/// would test old code). A no-op when the workspace build already made it.
fn csi_binary() -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    let shim = PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-cnfs-v2"));
    BUILT.call_once(|| {
        let release = shim.components().any(|c| c.as_os_str() == "release");
        let mut c = Command::new(env!("CARGO"));
        c.args(["build", "--quiet", "-p", "cnfs-csi", "--bin", "cnfs-csi"]);
        if release {
            c.arg("--release");
        }
        let st = c.status().expect("cargo runs");
        assert!(st.success(), "building cnfs-csi");
    });
    shim.with_file_name("cnfs-csi")
}

/// `cnfs-csi all` in the test's network namespace (the controller reaches the NFS server
/// and the Ceph monitors there), with every capability gone before exec.
struct Csi {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Csi {
    /// `config`: the controller's config (the Ceph clusters by id); `None` for none (NFS
    /// needs none).
    fn start(bed: &TestBed, pod: &Pod, config: Option<&Path>) -> anyhow::Result<Self> {
        let dir = bed.dir.path();
        let socket = dir.join("csi.sock");
        let log = dir.join("cnfs-csi.log");
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", bed.ns.name))
            .args([
                "setpriv",
                "--bounding-set=-all",
                "--inh-caps=-all",
                "--ambient-caps=-all",
                "--no-new-privs",
            ])
            .arg(csi_binary())
            .arg("--endpoint")
            .arg(&socket)
            .args(["all", "--node-id", "node-a", "--handoff-dir"])
            .arg(&pod.handoff_dir)
            // No Kata socket for the node plugin: stats must come through the shim's relay.
            .args(["--kata-sandbox-root", "/nonexistent/kata"])
            .arg("--config")
            .arg(config.unwrap_or(Path::new("/nonexistent/csi.toml")))
            .args(["--backend-timeout", "10"])
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

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Csi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One pod on the node: its sandbox id, the hand-off directory shared by the node plugin and
/// the shim (on tmpfs, where the node plugin insists keys go), the Kata sandbox root with a
/// stand-in monitor socket for the sandbox leading to the test guest, and the kubelet-style
/// target path of its one CSI volume.
struct Pod {
    sandbox: String,
    handoff_dir: PathBuf,
    kata_root: PathBuf,
    target: String,
    monitor: tokio::task::JoinHandle<()>,
}

impl Pod {
    fn new(bed: &TestBed) -> anyhow::Result<Self> {
        let dir = bed.dir.path();
        let handoff_dir = PathBuf::from(format!("/dev/shm/cnfs-e2e-{}", cnfs_testbed::unique_id()));
        let kata_root = dir.join("kata-run");
        let sandbox = format!("sb{}", cnfs_testbed::unique_id());
        std::fs::create_dir_all(kata_root.join(&sandbox))?;
        let monitor = cnfs_testbed::kata_monitor::serve(
            &kata_root.join(&sandbox).join("shim-monitor.sock"),
            &bed.vm.hvsock,
        )?;
        let pod_dir = dir.join("kubelet/pods/uid-1/volumes/kubernetes.io~csi/pv-1");
        std::fs::create_dir_all(&pod_dir)?;
        let target = pod_dir.join("mount").display().to_string();
        Ok(Pod {
            sandbox,
            handoff_dir,
            kata_root,
            target,
            monitor,
        })
    }

    /// The agent's name of the volume in the guest.
    fn guest_name(&self) -> String {
        handoff::guest_volume_name(&self.target)
    }

    /// The volume's mount point in the guest.
    fn guest_mount(&self) -> String {
        format!("/run/cnfs/volumes/{}", self.guest_name())
    }

    fn handoff(&self) -> HandoffDir {
        HandoffDir::new(&self.handoff_dir)
    }

    /// The volume context as kubelet passes it to NodePublishVolume: the controller's, plus
    /// the pod's namespace and name.
    fn publish_context(&self, vol: &Volume) -> HashMap<String, String> {
        let mut context = vol.volume_context.clone();
        context.insert("csi.storage.k8s.io/pod.namespace".into(), "team-a".into());
        context.insert("csi.storage.k8s.io/pod.name".into(), "app".into());
        context
    }

    /// containerd with the CNFS shim configured for this pod's Kata root and hand-off dir
    /// (runc's shim as the delegate).
    fn containerd(&self, dir: &Path) -> anyhow::Result<Containerd> {
        std::fs::write(
            dir.join("shim.toml"),
            format!(
                "delegate = \"containerd-shim-runc-v2\"\nkata_monitor_roots = [\"{}\"]\n\
                 csi_handoff_dir = \"{}\"\nguest_connect_timeout_seconds = 5\nmount_timeout_seconds = 20\n",
                self.kata_root.display(),
                self.handoff_dir.display()
            ),
        )?;
        std::env::set_var("CNFS_SHIM_CONFIG", dir.join("shim.toml"));
        Containerd::start(MINIMAL)
    }

    /// The pod under the CNFS runtime class: the sandbox, then an app container whose bind
    /// mount source is the target path, as CRI passes kubelet's volume. Returns everything
    /// `ctr` printed.
    fn run(&self, ctd: &Containerd, root: &str) -> String {
        let sandbox = &self.sandbox;
        let mut args: Vec<String> = cri("sandbox", sandbox, "POD");
        args.extend(["-d", "--rootfs", root, sandbox, "/bin/sleep", "600"].map(String::from));
        let a: Vec<&str> = std::iter::once("run")
            .chain(args.iter().map(String::as_str))
            .collect();
        let out = ctr(ctd, Some(CNFS), &a);
        assert!(out.status.success(), "sandbox: {}", text(&out.stderr));
        let mut printed = format!("{}{}", text(&out.stdout), text(&out.stderr));

        let app = format!("{sandbox}-app");
        let bind = format!("type=bind,src={},dst=/data,options=rbind:rw", self.target);
        let mut args: Vec<String> = cri("container", sandbox, "app");
        args.extend(["--mount", &bind, "--rootfs", root, &app, "/bin/true"].map(String::from));
        let a: Vec<&str> = std::iter::once("run")
            .chain(args.iter().map(String::as_str))
            .collect();
        let out = ctr(ctd, Some(CNFS), &a);
        // The wrapper re-pointed the bind mount at the guest's mount; runc (the test
        // delegate, on this host) cannot follow /proc/1/root into a guest, and its error
        // shows the mount.
        let err = text(&out.stderr);
        assert!(
            err.contains(&format!(
                "mounting \"/proc/1/root{}\" to rootfs at \"/data\"",
                self.guest_mount()
            )),
            "{err}\n{}",
            ctd.log_tail(40)
        );
        wait_gone(ctd, &app);
        printed.push_str(&text(&out.stdout));
        printed.push_str(&err);
        printed
    }

    /// Sandbox delete: afterwards the guest no longer has the CSI volume mounted.
    async fn delete(&self, ctd: &Containerd, g: &GuestExec) -> anyhow::Result<()> {
        let sandbox = &self.sandbox;
        ctr(ctd, None, &["task", "kill", "-s", "SIGKILL", sandbox]);
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let del = ctr(ctd, None, &["task", "delete", sandbox]);
            if del.status.success() {
                break;
            }
            assert!(Instant::now() < until, "{}", text(&del.stderr));
            std::thread::sleep(Duration::from_millis(200));
        }
        let mounts = g.ok("cat /proc/mounts").await?;
        assert!(!mounts.contains(&self.guest_name()), "{mounts}");
        assert!(
            !self.handoff().relay_path(&self.sandbox).exists(),
            "the stats relay ends with the sandbox"
        );
        Ok(())
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.monitor.abort();
        let _ = std::fs::remove_dir_all(&self.handoff_dir);
    }
}

fn mount_capability() -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode {
            mode: Mode::MultiNodeMultiWriter as i32,
        }),
    }
}

fn ctr(ctd: &Containerd, runtime: Option<&str>, args: &[&str]) -> Output {
    let mut c = Command::new("ctr");
    c.arg("-a").arg(ctd.socket());
    match runtime {
        Some(r) => {
            c.args(&args[..1]).args(["--runtime", r]).args(&args[1..]);
        }
        None => {
            c.args(args);
        }
    }
    c.stdin(Stdio::null()).output().expect("ctr runs")
}

fn cri(kind: &str, sandbox: &str, name: &str) -> Vec<String> {
    [
        format!("io.kubernetes.cri.container-type={kind}"),
        format!("io.kubernetes.cri.sandbox-id={sandbox}"),
        "io.kubernetes.cri.sandbox-namespace=team-a".to_string(),
        format!("io.kubernetes.cri.container-name={name}"),
    ]
    .into_iter()
    .flat_map(|a| ["--annotation".to_string(), a])
    .collect()
}

fn wait_gone(ctd: &Containerd, id: &str) {
    let until = Instant::now() + Duration::from_secs(20);
    while text(&ctr(ctd, None, &["task", "ls"]).stdout)
        .lines()
        .any(|l| l.split_whitespace().next() == Some(id))
    {
        assert!(Instant::now() < until, "task {id} still listed");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `script` in the guest as a container started by kata-agent would see the volume:
/// in a fresh mount namespace, with the volume bind-mounted at /tmp/ctr.
async fn in_container(g: &GuestExec, pod: &Pod, script: &str) -> anyhow::Result<String> {
    g.ok(&format!(
        "unshare -m sh -c 'src=$(readlink -f /proc/1/root{}) && \
         mkdir -p /tmp/ctr && mount --bind \"$src\" /tmp/ctr && {script}'",
        pod.guest_mount()
    ))
    .await
}

/// The volume's size as the guest's statfs reports it (blocks × block size).
async fn guest_statfs_bytes(g: &GuestExec, pod: &Pod) -> anyhow::Result<i64> {
    let out = g
        .ok(&format!("stat -f -c '%b %S' {}", pod.guest_mount()))
        .await?;
    let mut it = out
        .split_whitespace()
        .map(|v| v.parse::<i64>().unwrap_or(0));
    Ok(it.next().unwrap_or(0) * it.next().unwrap_or(0))
}

/// Whether a NodeGetVolumeStats answer reports inodes.
fn has_inodes(stats: &NodeGetVolumeStatsResponse) -> bool {
    stats
        .usage
        .iter()
        .any(|u| u.unit == volume_usage::Unit::Inodes as i32)
}

/// The bytes usage of a NodeGetVolumeStats answer, after checking the volume is healthy.
fn byte_usage(stats: &NodeGetVolumeStatsResponse) -> VolumeUsage {
    let cond = stats.volume_condition.as_ref().expect("condition");
    assert!(!cond.abnormal, "{cond:?}");
    *stats
        .usage
        .iter()
        .find(|u| u.unit == volume_usage::Unit::Bytes as i32)
        .expect("bytes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csi_volume_is_provisioned_published_and_mounted_by_the_guest() -> anyhow::Result<()> {
    shim_on_path();
    let bed = TestBed::start().await?;
    let dir = bed.dir.path();
    let pod = Pod::new(&bed)?;
    let target = pod.target.clone();
    let csi = Csi::start(&bed, &pod, None)?;
    let channel = cnfs_csi::client::connect(&csi.socket).await?;
    let mut controller = ControllerClient::new(channel.clone());
    let mut node = NodeClient::new(channel);
    let cap = mount_capability();

    // CreateVolume: a directory on the share, made by the controller in user space.
    let name = format!("pvc-{}", cnfs_testbed::unique_id());
    let create = CreateVolumeRequest {
        name: name.clone(),
        volume_capabilities: vec![cap.clone()],
        parameters: HashMap::from([
            ("fs".to_string(), "nfs".to_string()),
            ("server".to_string(), bed.ns.host_ip.clone()),
            ("share".to_string(), EXPORT.to_string()),
            ("vers".to_string(), "4.1".to_string()),
            ("onDelete".to_string(), "archive".to_string()),
            (
                "csi.storage.k8s.io/pvc/name".to_string(),
                "data".to_string(),
            ),
        ]),
        ..Default::default()
    };
    let vol = controller
        .create_volume(create.clone())
        .await?
        .into_inner()
        .volume
        .expect("volume");
    let server_dir = bed.nfs.export_dir.join(&name);
    assert!(
        server_dir.is_dir(),
        "the share has {}",
        server_dir.display()
    );
    // Idempotent, as the provisioner retries.
    let again = controller.create_volume(create).await?.into_inner().volume;
    assert_eq!(again.as_ref().map(|v| &v.volume_id), Some(&vol.volume_id));
    std::fs::write(server_dir.join("hello.txt"), "from the server\n")?;

    // NodePublishVolume to a kubelet-style target.
    node.node_publish_volume(NodePublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        target_path: target.clone(),
        volume_capability: Some(cap.clone()),
        volume_context: pod.publish_context(&vol),
        ..Default::default()
    })
    .await?;
    let guest_name = pod.guest_name();

    // The pod under the CNFS runtime class.
    let ctd = pod.containerd(dir)?;
    let root = rootfs::busybox(dir)?.display().to_string();
    pod.run(&ctd, &root);

    // The guest kernel mounted it; a process in a fresh mount namespace sees the data, as a
    // container started by kata-agent would.
    let g = &bed.vm.exec;
    let mounts = g.ok("cat /proc/mounts").await?;
    assert!(
        mounts.contains(&format!("/run/cnfs/volumes/{guest_name} nfs4")),
        "{mounts}"
    );
    let out = in_container(
        g,
        &pod,
        "cat /tmp/ctr/hello.txt && echo guest > /tmp/ctr/from-guest.txt",
    )
    .await?;
    assert_eq!(out, "from the server\n");
    assert_eq!(
        std::fs::read_to_string(server_dir.join("from-guest.txt"))?,
        "guest\n"
    );

    // NodeGetVolumeStats: read from the guest that holds the volume.
    let stats = node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: vol.volume_id.clone(),
            volume_path: target.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(
        byte_usage(&stats).total,
        guest_statfs_bytes(g, &pod).await?,
        "stats come from the guest's statfs"
    );
    assert!(has_inodes(&stats), "{stats:?}");
    // They came through the wrapper's relay (the plugin has no Kata socket): owner-only, and
    // it serves Stats and Ping, never Mount, Unmount or List.
    let relay = pod.handoff().relay_path(&pod.sandbox);
    assert_eq!(
        std::fs::metadata(&relay)?.permissions().mode() & 0o777,
        0o600
    );
    let through = cnfs_protocols::transport::connect(
        &cnfs_protocols::transport::AgentAddress::Unix { path: relay },
        Duration::from_secs(5),
    )
    .await?;
    let ctx = || ttrpc::context::with_timeout(Duration::from_secs(20).as_nanos() as i64);
    let e = through
        .mount(
            ctx(),
            &cnfs_testbed::mount_request(
                cnfs_testbed::nfs_volume("x", &bed.ns.host_ip, EXPORT, "4.1"),
                5_000,
            ),
        )
        .await
        .expect_err("relay refuses Mount");
    assert_eq!(
        cnfs_testbed::code_of(&e),
        ttrpc::Code::PERMISSION_DENIED,
        "{e:?}"
    );
    for e in [
        through
            .unmount(ctx(), &cnfs_protocols::agent::UnmountRequest::new())
            .await
            .expect_err("Unmount"),
        through
            .list(ctx(), &cnfs_protocols::agent::ListRequest::new())
            .await
            .expect_err("List"),
    ] {
        assert_eq!(
            cnfs_testbed::code_of(&e),
            ttrpc::Code::PERMISSION_DENIED,
            "{e:?}"
        );
    }
    assert!(g.ok("cat /proc/mounts").await?.contains(&pod.guest_name()));

    // The same pod under another runtime: never an empty host directory. Where the image
    // has a directory at the mount path, the container does not start; elsewhere it finds a
    // file that explains itself, and writes into the "volume" fail.
    let plain = format!("{}-runc", pod.sandbox);
    let bind = format!("type=bind,src={target},dst=/data,options=rbind:rw");
    let out = ctr(
        &ctd,
        Some(RUNC),
        &[
            "run",
            "--mount",
            &bind,
            "--rootfs",
            &root,
            &plain,
            "/bin/true",
        ],
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not a directory"),
        "{}",
        text(&out.stderr)
    );
    ctr(&ctd, None, &["container", "rm", &plain]);
    let elsewhere = format!("type=bind,src={target},dst=/volume,options=rbind:rw");
    let out = ctr(
        &ctd,
        Some(RUNC),
        &[
            "run",
            "--mount",
            &elsewhere,
            "--rootfs",
            &root,
            &plain,
            "/bin/sh",
            "-c",
            "cat /volume; echo x > /volume/f && echo WROTE || echo REFUSED",
        ],
    );
    let said = text(&out.stdout);
    assert!(
        said.contains("CNFS volume hand-off"),
        "{said} {}",
        text(&out.stderr)
    );
    assert!(
        said.contains("REFUSED") && !said.contains("WROTE"),
        "{said}"
    );
    ctr(&ctd, None, &["container", "rm", &plain]);
    assert!(std::fs::symlink_metadata(&target)?.is_file());

    // Sandbox delete: the guest unmounts the CSI volume.
    pod.delete(&ctd, g).await?;

    // Unpublish, then DeleteVolume honours onDelete=archive.
    node.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        target_path: target.clone(),
    })
    .await?;
    assert!(!Path::new(&target).exists());
    assert!(pod.handoff().read_record(&target)?.is_none());
    controller
        .delete_volume(DeleteVolumeRequest {
            volume_id: vol.volume_id.clone(),
            ..Default::default()
        })
        .await?;
    assert!(!server_dir.exists());
    let archived = bed.nfs.export_dir.join(format!("archived-{name}"));
    assert_eq!(
        std::fs::read_to_string(archived.join("from-guest.txt"))?,
        "guest\n"
    );
    let log = csi.log_text();
    assert!(
        log.contains("CreateVolume") && log.contains("NodePublishVolume"),
        "{log}"
    );
    Ok(())
}

/// `ceph fs subvolume info` of a subvolume in group `csi`, by the test bed's admin CLI.
fn subvolume_info(ceph: &Ceph, name: &str) -> anyhow::Result<serde_json::Value> {
    let out = ceph.ceph(&[
        "fs",
        "subvolume",
        "info",
        FS_NAME,
        name,
        "--group_name",
        "csi",
        "--format",
        "json",
    ])?;
    Ok(serde_json::from_str(&out)?)
}

/// The files under `paths` (recursively) that contain `needle`.
fn files_containing(needle: &str, paths: &[&Path]) -> anyhow::Result<String> {
    let out = Command::new("grep")
        .args(["-r", "-l", "-a", "-F", "-e", needle])
        .args(paths)
        .output()?;
    // 0: found, 1: not found; anything else (a path missing) would hide a finding.
    anyhow::ensure!(
        matches!(out.status.code(), Some(0 | 1)),
        "grep: {}",
        text(&out.stderr)
    );
    Ok(text(&out.stdout))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cephfs_csi_volume_is_a_subvolume_whose_quota_the_guest_enforces_and_expansion_raises(
) -> anyhow::Result<()> {
    shim_on_path();
    let bed = TestBed::start().await?;
    let dir = bed.dir.path();
    let ceph = Ceph::start(&bed.ns, dir).await?;
    let admin_key = ceph.admin_key();
    assert!(!admin_key.is_empty(), "the test bed's admin key");
    let config = dir.join("csi.toml");
    std::fs::write(
        &config,
        format!(
            "[clusters.test]\nmonitors = [\"{}\"]\nfsid = \"{}\"\n",
            ceph.mon_v1(),
            ceph.fsid()
        ),
    )?;
    let pod = Pod::new(&bed)?;
    let target = pod.target.clone();
    let csi = Csi::start(&bed, &pod, Some(&config))?;
    let channel = cnfs_csi::client::connect(&csi.socket).await?;
    let mut controller = ControllerClient::new(channel.clone());
    let mut node = NodeClient::new(channel);
    let cap = mount_capability();
    let admin = HashMap::from([
        ("adminID".to_string(), "admin".to_string()),
        ("adminKey".to_string(), admin_key.clone()),
    ]);
    // Everything the CSI calls answered, for the key check at the end.
    let mut answers = Vec::new();

    // CreateVolume without the admin key: refused, naming the field, nothing made.
    let name = format!("pvc-{}", cnfs_testbed::unique_id());
    let create = CreateVolumeRequest {
        name: name.clone(),
        volume_capabilities: vec![cap.clone()],
        capacity_range: Some(CapacityRange {
            required_bytes: 8 * MIB,
            limit_bytes: 0,
        }),
        parameters: HashMap::from([
            ("fs".to_string(), "cephfs".to_string()),
            ("clusterID".to_string(), "test".to_string()),
            ("fsName".to_string(), FS_NAME.to_string()),
            ("subvolumeGroup".to_string(), "csi".to_string()),
            (
                "csi.storage.k8s.io/pvc/name".to_string(),
                "data".to_string(),
            ),
        ]),
        secrets: admin.clone(),
        ..Default::default()
    };
    let mut keyless = create.clone();
    keyless.secrets.remove("adminKey");
    let e = controller
        .create_volume(keyless)
        .await
        .expect_err("no admin key");
    assert_eq!(format!("{:?}", e.code()), "InvalidArgument", "{e:?}");
    assert!(e.message().contains("secrets.adminKey"), "{e:?}");
    answers.push(format!("{e:?}"));
    assert!(subvolume_info(&ceph, &name).is_err(), "made without a key");

    // CreateVolume: a subvolume with the requested size as its quota.
    let vol = controller
        .create_volume(create.clone())
        .await?
        .into_inner()
        .volume
        .expect("volume");
    answers.push(format!("{vol:?}"));
    assert_eq!(vol.capacity_bytes, 8 * MIB);
    let info = subvolume_info(&ceph, &name)?;
    assert_eq!(info["bytes_quota"].as_u64(), Some(8 << 20), "{info}");
    let path = info["path"].as_str().expect("subvolume path").to_string();
    assert!(path.starts_with("/volumes/csi/"), "{path}");
    let source = vol.volume_context.get("source").expect("source");
    assert!(
        source.starts_with(&format!("cephfs://{}{path}?", ceph.mon_v1()))
            && source.contains(&format!("fs={FS_NAME}"))
            && source.contains(&format!("fsid={}", ceph.fsid())),
        "{source}"
    );
    // Idempotent, as the provisioner retries; another size for the same name is a conflict
    // that leaves the quota alone.
    let again = controller
        .create_volume(create.clone())
        .await?
        .into_inner()
        .volume
        .expect("volume");
    assert_eq!(
        (
            &again.volume_id,
            again.capacity_bytes,
            &again.volume_context
        ),
        (&vol.volume_id, vol.capacity_bytes, &vol.volume_context)
    );
    let mut bigger = create.clone();
    bigger.capacity_range = Some(CapacityRange {
        required_bytes: 16 * MIB,
        limit_bytes: 0,
    });
    let e = controller
        .create_volume(bigger)
        .await
        .expect_err("another size");
    assert_eq!(format!("{:?}", e.code()), "AlreadyExists", "{e:?}");
    answers.push(format!("{e:?}"));
    assert_eq!(
        subvolume_info(&ceph, &name)?["bytes_quota"].as_u64(),
        Some(8 << 20)
    );
    ceph.write_file(&format!("{path}/hello.txt"), b"from the server\n");

    // NodePublishVolume with a client restricted to the subvolume.
    let app_key = ceph.authorize("app", &path, "rw")?;
    node.node_publish_volume(NodePublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        target_path: target.clone(),
        volume_capability: Some(cap.clone()),
        volume_context: pod.publish_context(&vol),
        secrets: HashMap::from([
            ("userID".to_string(), "app".to_string()),
            ("userKey".to_string(), app_key.clone()),
        ]),
        ..Default::default()
    })
    .await?;
    let record = pod.handoff().read_record(&target)?.expect("record");
    assert!(record.has_secret && record.source == *source, "{record:?}");

    // The pod under the CNFS runtime class; the guest kernel mounts the subvolume.
    let ctd = pod.containerd(dir)?;
    let root = rootfs::busybox(dir)?.display().to_string();
    let printed = pod.run(&ctd, &root);
    let g = &bed.vm.exec;
    let mnt = pod.guest_mount();
    let mounts = g.ok("cat /proc/mounts").await?;
    assert!(mounts.contains(&format!("{mnt} ceph ")), "{mounts}");
    assert_eq!(
        in_container(g, &pod, "cat /tmp/ctr/hello.txt").await?,
        "from the server\n"
    );
    g.ok(&format!("echo guest > {mnt}/from-guest.txt && sync"))
        .await?;
    assert_eq!(
        ceph.read_file(&format!("{path}/from-guest.txt")),
        b"guest\n"
    );

    // The quota holds in the guest: 10 MiB do not fit in 8.
    let fill = format!("rm -f {mnt}/big && dd if=/dev/zero of={mnt}/big bs=1M count=10 conv=fsync");
    let out = g.run(&fill, Duration::from_secs(60)).await?;
    assert_ne!(out.code, 0, "wrote 10 MiB into 8: {}", out.stderr);
    assert!(
        out.stderr.contains("Disk quota exceeded"),
        "{}{}",
        out.stdout,
        out.stderr
    );

    // NodeGetVolumeStats: from the guest, where the kernel reports the quota as the size.
    let stats_request = NodeGetVolumeStatsRequest {
        volume_id: vol.volume_id.clone(),
        volume_path: target.clone(),
        ..Default::default()
    };
    let stats = node
        .node_get_volume_stats(stats_request.clone())
        .await?
        .into_inner();
    let bytes = byte_usage(&stats);
    assert_eq!(bytes.total, 8 * MIB, "{stats:?}");
    // CephFS reports its free inodes as unknown: no made-up inode figures.
    assert!(!has_inodes(&stats), "{stats:?}");
    assert_eq!(bytes.total, guest_statfs_bytes(g, &pod).await?);

    // ControllerExpandVolume raises the quota; no node step is needed.
    let expanded = controller
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: vol.volume_id.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: 16 * MIB,
                limit_bytes: 0,
            }),
            secrets: admin.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    answers.push(format!("{expanded:?}"));
    assert_eq!(expanded.capacity_bytes, 16 * MIB);
    assert!(!expanded.node_expansion_required);
    assert_eq!(
        subvolume_info(&ceph, &name)?["bytes_quota"].as_u64(),
        Some(16 << 20)
    );
    // The guest kernel learns the new quota from the MDS: the same 10 MiB now fit.
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let out = g.run(&fill, Duration::from_secs(60)).await?;
        if out.code == 0 {
            break;
        }
        assert!(
            Instant::now() < until,
            "10 MiB still refused after the expansion: {}",
            out.stderr
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        g.ok(&format!("stat -c %s {mnt}/big")).await?.trim(),
        (10 * MIB).to_string()
    );
    let stats = node
        .node_get_volume_stats(stats_request)
        .await?
        .into_inner();
    assert_eq!(byte_usage(&stats).total, 16 * MIB, "{stats:?}");

    // The keys appear nowhere but in the node-publish secret (the app key, on tmpfs for the
    // shim): not in the records, the target file, containerd's root, state and log, ctr's
    // output, the cnfs-csi log, the CSI answers, the guest's mount table or console.
    let h = pod.handoff();
    // The search does find a key: the app key's one place is its secret file.
    assert_eq!(
        files_containing(&app_key, &[pod.handoff_dir.as_path()])?.trim(),
        h.secret_path(&target).display().to_string(),
        "the app key outside its node-publish secret"
    );
    let records_dir = h.record_path(&target);
    let records_dir = records_dir.parent().expect("records dir");
    let guest_mounts = g.ok("cat /proc/mounts /proc/self/mountinfo").await?;
    for (who, key) in [("admin", &admin_key), ("app", &app_key)] {
        let found = files_containing(
            key,
            &[
                records_dir,
                Path::new(&target),
                ctd.dir(),
                csi.log.as_path(),
            ],
        )?;
        assert!(found.is_empty(), "the {who} key is in {found}");
        for (what, haystack) in [
            ("ctr output", &printed),
            ("containerd log", &ctd.log_tail(100_000)),
            ("cnfs-csi log", &csi.log_text()),
            ("CSI answers", &answers.join("\n")),
            ("guest mount table", &guest_mounts),
            ("guest console", &bed.vm.console_text()),
        ] {
            assert!(
                !haystack.contains(key.as_str()),
                "the {who} key is in the {what}"
            );
        }
    }
    assert!(
        files_containing(&admin_key, &[pod.handoff_dir.as_path()])?.is_empty(),
        "the admin key is in the hand-off dir"
    );

    // Sandbox delete: the guest unmounts the volume.
    pod.delete(&ctd, g).await?;

    // Unpublish removes the target, the record and the secret.
    node.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        target_path: target.clone(),
    })
    .await?;
    assert!(!Path::new(&target).exists());
    assert!(h.read_record(&target)?.is_none());
    assert!(!h.secret_path(&target).exists());
    assert!(files_containing(&app_key, &[pod.handoff_dir.as_path()])?.is_empty());

    // DeleteVolume removes the subvolume; again, it is already gone.
    let delete = DeleteVolumeRequest {
        volume_id: vol.volume_id.clone(),
        secrets: admin.clone(),
    };
    controller.delete_volume(delete.clone()).await?;
    let gone = subvolume_info(&ceph, &name).expect_err("subvolume removed");
    assert!(format!("{gone:#}").contains("does not exist"), "{gone:#}");
    controller.delete_volume(delete).await?;
    let log = csi.log_text();
    for key in [&admin_key, &app_key] {
        assert!(!log.contains(key.as_str()), "a key is in the cnfs-csi log");
    }
    assert!(
        log.contains("ControllerExpandVolume") && log.contains("DeleteVolume"),
        "{log}"
    );
    Ok(())
}

/// SMB through the whole CSI path: the controller makes the volume's directory on a real
/// Samba share with smbclient (no host mount), NodePublish hands the volume and its
/// node-publish secret to the shim, the guest kernel mounts the directory sealed, the pod's
/// container sees the server's file, and the password appears nowhere but in its one
/// secret file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_smb_csi_volume_is_a_share_directory_the_guest_mounts_sealed() -> anyhow::Result<()> {
    use cnfs_testbed::samba::{Samba, SambaSetup, Share};
    const USER: &str = "cnfscsismb";
    const PASSWORD: &str = "csi,smb=pw 5";
    shim_on_path();
    let bed = TestBed::start().await?;
    let dir = bed.dir.path();
    let samba = Samba::start(
        &bed.ns,
        dir,
        &SambaSetup::new()
            .user(USER, PASSWORD)
            .share(Share::new("data")),
    )?;
    let pod = Pod::new(&bed)?;
    let target = pod.target.clone();
    let csi = Csi::start(&bed, &pod, None)?;
    let channel = cnfs_csi::client::connect(&csi.socket).await?;
    let mut controller = ControllerClient::new(channel.clone());
    let mut node = NodeClient::new(channel);
    let cap = mount_capability();
    let secrets = HashMap::from([
        ("username".to_string(), USER.to_string()),
        ("password".to_string(), PASSWORD.to_string()),
    ]);
    let mut answers = Vec::new();

    let name = format!("pvc-{}", cnfs_testbed::unique_id());
    let create = CreateVolumeRequest {
        name: name.clone(),
        volume_capabilities: vec![cap.clone()],
        parameters: HashMap::from([
            ("fs".to_string(), "smb".to_string()),
            ("server".to_string(), samba.server_ip.clone()),
            ("share".to_string(), "data".to_string()),
            ("subDir".to_string(), "volumes".to_string()),
            ("vers".to_string(), "3.1.1".to_string()),
            ("onDelete".to_string(), "delete".to_string()),
        ]),
        secrets: secrets.clone(),
        ..Default::default()
    };
    let vol = controller
        .create_volume(create)
        .await?
        .into_inner()
        .volume
        .expect("volume");
    answers.push(format!("{vol:?}"));
    let source = vol.volume_context.get("source").expect("source").clone();
    assert!(
        source.starts_with(&format!("smb://{}/data/volumes/", samba.server_ip)),
        "{source}"
    );
    let share = samba.share_dir("data").expect("share").to_path_buf();
    let sub = source
        .split_once("/data/")
        .map(|(_, p)| p.split('?').next().unwrap_or_default().to_string())
        .expect("directory");
    let vol_dir = share.join(&sub);
    assert!(vol_dir.is_dir(), "{}", vol_dir.display());
    std::fs::write(vol_dir.join("hello.txt"), "from the server\n")?;

    node.node_publish_volume(NodePublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        target_path: target.clone(),
        volume_capability: Some(cap.clone()),
        volume_context: pod.publish_context(&vol),
        secrets: secrets.clone(),
        ..Default::default()
    })
    .await?;
    let record = pod.handoff().read_record(&target)?.expect("record");
    assert!(record.has_secret && record.source == source, "{record:?}");

    let ctd = pod.containerd(dir)?;
    let root = rootfs::busybox(dir)?.display().to_string();
    let printed = pod.run(&ctd, &root);
    let g = &bed.vm.exec;
    let mnt = pod.guest_mount();
    let mounts = g.ok("cat /proc/mounts").await?;
    let line = mounts
        .lines()
        .find(|l| l.contains(&format!("{mnt} cifs ")))
        .unwrap_or_default()
        .to_string();
    assert!(
        line.contains(",seal") && line.contains("vers=3.1.1"),
        "{mounts}"
    );
    assert_eq!(
        in_container(g, &pod, "cat /tmp/ctr/hello.txt").await?,
        "from the server\n"
    );
    g.ok(&format!("echo guest > {mnt}/from-guest.txt && sync"))
        .await?;
    assert_eq!(std::fs::read(vol_dir.join("from-guest.txt"))?, b"guest\n");

    // The password's one place is the node-publish secret file on tmpfs.
    let h = pod.handoff();
    assert_eq!(
        files_containing(PASSWORD, &[pod.handoff_dir.as_path()])?.trim(),
        h.secret_path(&target).display().to_string()
    );
    let records_dir = h.record_path(&target);
    let records_dir = records_dir.parent().expect("records dir");
    let found = files_containing(
        PASSWORD,
        &[
            records_dir,
            Path::new(&target),
            ctd.dir(),
            csi.log.as_path(),
        ],
    )?;
    assert!(found.is_empty(), "the password is in {found}");
    let guest_seen = g
        .ok("cat /proc/mounts /proc/self/mountinfo /run/cnfs/state/* 2>/dev/null; true")
        .await?;
    for (what, haystack) in [
        ("ctr output", &printed),
        ("containerd log", &ctd.log_tail(100_000)),
        ("cnfs-csi log", &csi.log_text()),
        ("CSI answers", &answers.join("\n")),
        ("guest", &guest_seen),
        ("guest console", &bed.vm.console_text()),
    ] {
        assert!(
            !haystack.contains(PASSWORD) && !haystack.contains("csi,,smb"),
            "the password is in the {what}"
        );
    }

    pod.delete(&ctd, g).await?;
    node.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        target_path: target.clone(),
    })
    .await?;
    assert!(!h.secret_path(&target).exists());
    let delete = DeleteVolumeRequest {
        volume_id: vol.volume_id.clone(),
        secrets,
    };
    controller.delete_volume(delete.clone()).await?;
    assert!(!vol_dir.exists(), "onDelete=delete removes the directory");
    controller.delete_volume(delete).await?;
    Ok(())
}

/// A FUSE inline volume through CSI: the pod's sidecar mounts the CSI volume where it wants
/// the fd-passing socket and gets the socket's directory there; the app mounts it and gets
/// the guest's FUSE mount; the stats say the volume waits for its daemon. (The daemon itself
/// is run in the guest by tests/tests/fuse_e2e.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fuse_csi_volume_gives_its_sidecar_the_socket_and_its_apps_the_volume(
) -> anyhow::Result<()> {
    shim_on_path();
    let bed = TestBed::start().await?;
    let dir = bed.dir.path();
    let pod = Pod::new(&bed)?;
    let csi = Csi::start(&bed, &pod, None)?;
    let mut node = NodeClient::new(cnfs_csi::client::connect(&csi.socket).await?);
    let context = HashMap::from([
        ("source".to_string(), "fuse://?sidecar=sshfs".to_string()),
        (
            "csi.storage.k8s.io/pod.namespace".to_string(),
            "team-a".to_string(),
        ),
        ("csi.storage.k8s.io/pod.name".to_string(), "web".to_string()),
        (
            "csi.storage.k8s.io/ephemeral".to_string(),
            "true".to_string(),
        ),
    ]);
    node.node_publish_volume(NodePublishVolumeRequest {
        volume_id: "csi-fuse-inline".into(),
        target_path: pod.target.clone(),
        volume_capability: Some(mount_capability()),
        volume_context: context,
        ..Default::default()
    })
    .await?;
    // An inline volume is the pod author's: the admin's policy must allow FUSE.
    let policy = dir.join("policy.toml");
    std::fs::write(
        &policy,
        "[[allow]]\nnamespaces = [\"team-a\"]\nfilesystems = [\"fuse\"]\n",
    )?;
    let ctd = pod.containerd(dir)?;
    let conf = dir.join("shim.toml");
    let text_conf = std::fs::read_to_string(&conf)?;
    std::fs::write(
        &conf,
        format!("{text_conf}policy = \"{}\"\n", policy.display()),
    )?;
    let root = rootfs::busybox(dir)?.display().to_string();
    let sandbox = &pod.sandbox;
    let mut args: Vec<String> = cri("sandbox", sandbox, "POD");
    args.extend(["-d", "--rootfs", &root, sandbox, "/bin/sleep", "600"].map(String::from));
    let a: Vec<&str> = std::iter::once("run")
        .chain(args.iter().map(String::as_str))
        .collect();
    let out = ctr(&ctd, Some(CNFS), &a);
    assert!(out.status.success(), "sandbox: {}", text(&out.stderr));

    // The sidecar first (as pods list it), then the app: each mounts the same CSI target.
    let guest = pod.guest_name();
    for (name, dst, source) in [
        (
            "sshfs",
            "/fuse-fd-passing",
            format!("/proc/1/root/run/cnfs/fuse/{guest}"),
        ),
        (
            "app",
            "/srv/web",
            format!("/proc/1/root/run/cnfs/volumes/{guest}"),
        ),
    ] {
        let id = format!("{sandbox}-{name}");
        let bind = format!("type=bind,src={},dst={dst},options=rbind:rw", pod.target);
        let mut args: Vec<String> = cri("container", sandbox, name);
        args.extend(["--mount", &bind, "--rootfs", &root, &id, "/bin/true"].map(String::from));
        let a: Vec<&str> = std::iter::once("run")
            .chain(args.iter().map(String::as_str))
            .collect();
        let out = ctr(&ctd, Some(CNFS), &a);
        // runc (the test delegate, on this host) cannot follow /proc/1/root into a guest:
        // its error shows the mount the wrapper made of the CSI bind.
        let err = text(&out.stderr);
        assert!(
            err.contains(&format!("mounting \"{source}\" to rootfs at \"{dst}\"")),
            "{name}: {err}\n{}",
            ctd.log_tail(40)
        );
        wait_gone(&ctd, &id);
    }
    let g = &bed.vm.exec;
    let mounts = g.ok("cat /proc/mounts").await?;
    assert!(
        mounts.contains(&format!("cnfs-fuse:sshfs /run/cnfs/volumes/{guest} fuse ")),
        "{mounts}"
    );
    g.ok(&format!(
        "test -S /run/cnfs/fuse/{guest}/fuse-csi-ephemeral.sock"
    ))
    .await?;

    // Nobody serves it yet: abnormal, saying for whom it waits.
    let stats = node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: "csi-fuse-inline".into(),
            volume_path: pod.target.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let cond = stats.volume_condition.expect("condition");
    assert!(cond.abnormal, "{cond:?}");
    assert!(
        cond.message.contains("waiting for container sshfs"),
        "{}",
        cond.message
    );
    pod.delete(&ctd, g).await?;
    assert_eq!(g.ok("ls /run/cnfs/fuse | wc -l").await?.trim(), "0");
    drop(csi);
    Ok(())
}
