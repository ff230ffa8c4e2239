//! Runs the real `cnfs-csi` binary the way the node DaemonSet does: without a single
//! capability (bounding, inheritable and ambient sets cleared before exec, no_new_privs), and
//! under strace watching every mount-family system call.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cnfs_csi::csi::controller_client::ControllerClient;
use cnfs_csi::csi::identity_client::IdentityClient;
use cnfs_csi::csi::node_client::NodeClient;
use cnfs_csi::csi::volume_capability::access_mode::Mode;
use cnfs_csi::csi::volume_capability::{AccessMode, AccessType, MountVolume};
use cnfs_csi::csi::{NodePublishVolumeRequest, VolumeCapability};
use tonic::transport::Channel;
use tonic::Code;

/// Every system call that can mount, unmount or move a mount.
pub const MOUNT_SYSCALLS: &str =
    "mount,umount2,fsopen,fsconfig,fsmount,move_mount,open_tree,mount_setattr,pivot_root";

pub struct Plugin {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub strace_log: PathBuf,
    pub stderr_log: PathBuf,
    strace: Child,
    pub pid: i32,
}

impl Plugin {
    /// `mode` is `node`, `controller` or `all`; `args` follow it.
    pub fn start(tag: &str, mode: &str, args: &[String]) -> anyhow::Result<Self> {
        Self::start_in(tag, None, mode, args)
    }

    /// [`Plugin::start`] inside network namespace `netns` (where the test's servers are).
    pub fn start_in(
        tag: &str,
        netns: Option<&str>,
        mode: &str,
        args: &[String],
    ) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("cnfs-csi-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("csi.sock");
        let strace_log = dir.join("strace.log");
        let stderr_log = dir.join("plugin.log");
        let bin = env!("CARGO_BIN_EXE_cnfs-csi");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg("strace");
                c
            }
            None => Command::new("strace"),
        };
        let strace = cmd
            .args([
                "-f",
                "-qq",
                "-e",
                "signal=none",
                "-e",
                &format!("trace=execve,bind,{MOUNT_SYSCALLS}"),
                "-o",
            ])
            .arg(&strace_log)
            .args([
                "setpriv",
                "--bounding-set=-all",
                "--inh-caps=-all",
                "--ambient-caps=-all",
                "--no-new-privs",
            ])
            .arg(bin)
            .arg("--endpoint")
            .arg(&socket)
            .arg(mode)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_log)?)
            .spawn()?;
        let end = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            anyhow::ensure!(
                Instant::now() < end,
                "cnfs-csi did not create its socket: {}",
                std::fs::read_to_string(&stderr_log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let pid = find_pid(&socket)?;
        Ok(Plugin {
            dir,
            socket,
            strace_log,
            stderr_log,
            strace,
            pid,
        })
    }

    pub async fn channel(&self) -> anyhow::Result<Channel> {
        cnfs_csi::client::connect(&self.socket).await
    }

    pub async fn identity(&self) -> anyhow::Result<IdentityClient<Channel>> {
        Ok(IdentityClient::new(self.channel().await?))
    }

    pub async fn node(&self) -> anyhow::Result<NodeClient<Channel>> {
        Ok(NodeClient::new(self.channel().await?))
    }

    pub async fn controller(&self) -> anyhow::Result<ControllerClient<Channel>> {
        Ok(ControllerClient::new(self.channel().await?))
    }

    /// `CapPrm`, `CapEff`, `CapBnd`, `CapAmb` of the plugin process.
    pub fn capabilities(&self) -> anyhow::Result<Vec<(String, String)>> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        Ok(status
            .lines()
            .filter(|l| l.starts_with("Cap"))
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_string(), v.trim().to_string()))
            .collect())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// Stops the plugin (SIGTERM, as the kubelet does) and returns what strace saw.
    pub fn stop(&mut self) -> anyhow::Result<String> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        let end = Instant::now() + Duration::from_secs(20);
        while self.strace.try_wait()?.is_none() {
            if Instant::now() > end {
                let _ = self.strace.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(std::fs::read_to_string(&self.strace_log)?)
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.strace.kill();
        let _ = self.strace.wait();
        if std::env::var_os("CNFS_KEEP_TMP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The `cnfs-csi` process serving `socket` (strace and setpriv sit above it).
fn find_pid(socket: &Path) -> anyhow::Result<i32> {
    let needle = socket.to_string_lossy().into_owned();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(pid) = entry?.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_plugin = args.first().is_some_and(|a| a.ends_with("/cnfs-csi"));
        if is_plugin && args.contains(&needle) {
            return Ok(pid);
        }
    }
    anyhow::bail!("no cnfs-csi process serves {}", socket.display())
}

/// A tmpfs directory for the hand-off (the node plugin refuses to put keys anywhere else).
pub fn tmpfs_dir(tag: &str) -> PathBuf {
    let d = PathBuf::from("/dev/shm").join(format!("cnfs-csi-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// strace's log holds one line per traced call: `execve` (traced to prove strace watched the
/// plugin), `bind` (source ports, see the controller suite) and any mount-family call, which
/// must not be there.
pub fn assert_no_mount_calls(strace: &str) {
    let calls: Vec<&str> = strace
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.contains("execve(") && !l.contains("bind("))
        .collect();
    assert!(calls.is_empty(), "mount-family system calls: {calls:?}");
    assert!(
        strace
            .lines()
            .any(|l| l.contains("execve(") && l.contains("/cnfs-csi\"")),
        "strace did not see the plugin start: {strace:?}"
    );
}

/// A well-formed CephFS key (test only).
pub const KEY: &str = "AQBSdFhlAAAAABAAWmDqDUUxmRX4fcLsaFk2tg==";

/// File-system access in `mode`.
pub fn mount_cap(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

/// A node plugin (`cnfs-csi node`) with its hand-off directory on tmpfs.
pub struct Node {
    pub plugin: Plugin,
    pub handoff: PathBuf,
    pub pods: PathBuf,
}

impl Node {
    pub fn start(tag: &str) -> anyhow::Result<Self> {
        let handoff = tmpfs_dir(tag);
        let plugin = Plugin::start(
            tag,
            "node",
            &[
                "--node-id".into(),
                "node-a".into(),
                "--handoff-dir".into(),
                handoff.display().to_string(),
                "--kata-sandbox-root".into(),
                "/nonexistent/kata".into(),
                "--stats-timeout".into(),
                "1".into(),
            ],
        )?;
        let pods = plugin.dir.join("pods");
        Ok(Node {
            plugin,
            handoff,
            pods,
        })
    }

    /// A target path as kubelet makes it: its parent exists, the target does not.
    pub fn target(&self, pod: &str, pv: &str) -> String {
        let parent = self
            .pods
            .join(pod)
            .join("volumes/kubernetes.io~csi")
            .join(pv);
        std::fs::create_dir_all(&parent).expect("parent");
        parent.join("mount").display().to_string()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.handoff);
    }
}

/// A valid publish of `source` at `target` (volume `vol-1`, pod `team-a/app`).
pub fn publish(target: &str, source: &str) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: "vol-1".into(),
        target_path: target.into(),
        volume_capability: Some(mount_cap(Mode::MultiNodeMultiWriter)),
        volume_context: HashMap::from([
            ("source".to_string(), source.to_string()),
            (
                "csi.storage.k8s.io/pod.namespace".to_string(),
                "team-a".to_string(),
            ),
            ("csi.storage.k8s.io/pod.name".to_string(), "app".to_string()),
        ]),
        ..Default::default()
    }
}

/// The code and message of a call that must fail.
pub fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> (Code, String) {
    let e = r.expect_err("the call must fail");
    (e.code(), e.message().to_string())
}
