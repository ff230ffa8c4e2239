//! A QEMU guest (software emulation: this machine has no usable KVM) with a hybrid-vsock
//! device served by `vhost-device-vsock`, the same `CONNECT <port>` socket Kata uses with
//! Cloud Hypervisor and Firecracker. The guest's network is a tap in the test's namespace.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use cnfs_protocols::agent;
use cnfs_protocols::agent_ttrpc::AgentClient;
use cnfs_protocols::transport::{self, AgentAddress, DEFAULT_AGENT_PORT};
use nix::sys::signal::Signal;

use crate::artifacts::Artifacts;
use crate::guest::GuestExec;
use crate::netns::{GuestNet, NetNs};
use crate::process::{wait_for, Guarded};

/// The NFS server's name inside test guests (their /etc/hosts), for name resolution tests.
pub const NFS_HOST_NAME: &str = "nfs.cnfs.test";

/// What a guest boots: kernel, initrd and command line.
pub struct Boot {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
    /// Guest memory (QEMU's `-m`), e.g. "512M".
    pub memory: String,
    /// More QEMU arguments (the bench's virtio-fs device).
    pub qemu_extra: Vec<String>,
}

/// QEMU's accelerator: KVM where it works (`/dev/kvm`, a CPU with VMX or SVM and kvm_intel or
/// kvm_amd loaded: a nested PVM device does not count, a stock guest kernel hangs on it), else
/// TCG; `CNFS_ACCEL=tcg|kvm` decides instead.
pub fn accel() -> &'static str {
    static ACCEL: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    ACCEL.get_or_init(|| match std::env::var("CNFS_ACCEL").as_deref() {
        Ok("kvm") => "kvm",
        Ok(_) => "tcg",
        Err(_) => {
            let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
            let flags = cpu.lines().find(|l| l.starts_with("flags")).unwrap_or("");
            let vt = flags.split_whitespace().any(|f| f == "vmx" || f == "svm");
            let module = ["kvm_intel", "kvm_amd"]
                .iter()
                .any(|m| Path::new("/sys/module").join(m).exists());
            if vt && module && Path::new("/dev/kvm").exists() {
                "kvm"
            } else {
                "tcg"
            }
        }
    })
}

impl Boot {
    /// The test guests' command line (console, no reboot on panic, the network for the test
    /// init or stand-in) with `extra` appended.
    pub fn test_append(ns: &NetNs, extra: &str) -> String {
        Self::test_append_at(ns, &ns.guest_ip, extra)
    }

    /// [`Boot::test_append`] for a guest at `guest_ip` (guest `i` of a multi-guest namespace:
    /// `ns.guest(i).ip`).
    pub fn test_append_at(ns: &NetNs, guest_ip: &str, extra: &str) -> String {
        format!(
            "console=ttyS0 panic=-1 loglevel=4 cnfs.ip={guest_ip}/24 cnfs.hostname=cnfs-guest \
             cnfs.hosts={NFS_HOST_NAME}/{} {extra}",
            ns.host_ip
        )
    }
}

pub struct Vm {
    // Drop order: QEMU before its vsock backend.
    qemu: Guarded,
    _vsock: Guarded,
    pub hvsock: PathBuf,
    pub console: PathBuf,
    pub exec: GuestExec,
}

impl Vm {
    /// Boots a guest and waits until its agent answers. An emulated guest whose hybrid vsock
    /// never comes up (seen once in CI on this shared machine: the agent logged that it was
    /// serving, the host's CONNECTs never reached it) is booted once more, fresh, rather than
    /// failing the test on an emulator hiccup; the first attempt's logs are kept beside.
    pub async fn boot(art: &Artifacts, ns: &NetNs, dir: &Path) -> anyhow::Result<Self> {
        let boot = Boot {
            kernel: art.kernel.clone(),
            initrd: art.initrd.clone(),
            append: Boot::test_append(ns, ""),
            memory: "512M".into(),
            qemu_extra: Vec::new(),
        };
        Self::boot_with(&boot, ns, dir).await
    }

    /// Boots `boot` and waits for its agent, once more if its hybrid vsock never came up.
    pub async fn boot_with(boot: &Boot, ns: &NetNs, dir: &Path) -> anyhow::Result<Self> {
        Self::boot_retrying(boot, ns, &single_guest(ns), dir, "vm").await
    }

    /// Boots guest `i` of a namespace made by [`NetNs::create_with_guests`]: the test guest
    /// (512M, as [`Vm::boot`]) on tap `i` with address and MAC `ns.guest(i)`, its files under
    /// `dir/vm{i}`; waits for its agent, once more if its hybrid vsock never came up.
    pub async fn boot_guest(
        art: &Artifacts,
        ns: &NetNs,
        i: usize,
        dir: &Path,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            i < ns.guests,
            "guest {i}: namespace {} has taps for {} guests",
            ns.name,
            ns.guests
        );
        let net = ns.guest(i);
        let boot = Boot {
            kernel: art.kernel.clone(),
            initrd: art.initrd.clone(),
            append: Boot::test_append_at(ns, &net.ip, ""),
            memory: "512M".into(),
            qemu_extra: Vec::new(),
        };
        Self::boot_retrying(&boot, ns, &net, dir, &format!("vm{i}")).await
    }

    async fn boot_retrying(
        boot: &Boot,
        ns: &NetNs,
        net: &GuestNet,
        dir: &Path,
        tag: &str,
    ) -> anyhow::Result<Self> {
        match Self::boot_once(boot, ns, net, &dir.join(tag), true).await {
            Ok(vm) => Ok(vm),
            Err(first) => {
                eprintln!("testbed: guest did not come up, booting it again: {first:#}");
                Self::boot_once(boot, ns, net, &dir.join(format!("{tag}-retry")), true)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e:#}\n(first attempt: {first:#})"))
            }
        }
    }

    /// Starts `boot` without waiting for anything (for guests expected not to come up).
    pub async fn start(boot: &Boot, ns: &NetNs, dir: &Path) -> anyhow::Result<Self> {
        Self::boot_once(boot, ns, &single_guest(ns), &dir.join("vm"), false).await
    }

    /// True while QEMU runs (a guest whose kernel panicked exits: `-no-reboot`).
    pub fn running(&mut self) -> bool {
        self.qemu.alive()
    }

    async fn boot_once(
        boot: &Boot,
        ns: &NetNs,
        net: &GuestNet,
        vmdir: &Path,
        wait: bool,
    ) -> anyhow::Result<Self> {
        let vmdir = vmdir.to_path_buf();
        std::fs::create_dir_all(&vmdir)?;
        let vhost_sock = vmdir.join("vhost-user.sock");
        let hvsock = vmdir.join("hvsock");
        let console = vmdir.join("console.log");
        let mut vs = Command::new(vhost_device_vsock());
        vs.arg("--guest-cid=3")
            .arg(format!("--socket={}", vhost_sock.display()))
            .arg(format!("--uds-path={}", hvsock.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(vmdir.join("vhost-device-vsock.log"))?);
        let vsock = Guarded::spawn("vhost-device-vsock", vs)?;
        wait_for(Duration::from_secs(10), "vhost-user socket", || {
            let ok = vhost_sock.exists();
            async move { ok.then_some(()) }
        })
        .await?;

        let mem = boot.memory.as_str();
        let append = &boot.append;
        let mut q = ns.command("qemu-system-x86_64");
        q.args(["-accel", accel(), "-cpu", "max", "-smp", "1", "-m", mem])
            .args(["-display", "none", "-no-reboot", "-nodefaults"])
            .arg("-kernel")
            .arg(&boot.kernel)
            .arg("-initrd")
            .arg(&boot.initrd)
            .args(["-append", append])
            .args(["-serial", &format!("file:{}", console.display())])
            .args([
                "-object",
                &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
            ])
            .args(["-numa", "node,memdev=mem"])
            .args([
                "-chardev",
                &format!("socket,id=vsock0,path={}", vhost_sock.display()),
            ])
            .args(["-device", "vhost-user-vsock-pci,chardev=vsock0"])
            .args([
                "-netdev",
                &format!("tap,id=net0,ifname={},script=no,downscript=no", net.tap),
            ])
            .args([
                "-device",
                &match &net.mac {
                    Some(mac) => format!("virtio-net-pci,netdev=net0,mac={mac}"),
                    None => "virtio-net-pci,netdev=net0".to_string(),
                },
            ])
            .args(&boot.qemu_extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(vmdir.join("qemu.log"))?);
        let qemu = Guarded::spawn("qemu", q)?;
        let vm = Vm {
            qemu,
            _vsock: vsock,
            exec: GuestExec::new(&hvsock),
            hvsock,
            console,
        };
        if wait {
            vm.wait_for_agent(Duration::from_secs(60)).await?;
        }
        Ok(vm)
    }

    pub fn agent_address(&self) -> AgentAddress {
        AgentAddress::Hvsock {
            path: self.hvsock.clone(),
            port: DEFAULT_AGENT_PORT,
        }
    }

    /// A fresh ttrpc connection to the agent.
    pub async fn agent(&self) -> anyhow::Result<AgentClient> {
        Ok(transport::connect(&self.agent_address(), Duration::from_secs(10)).await?)
    }

    /// Waits until the agent answers Ping (the guest booted and the agent started).
    pub async fn wait_for_agent(&self, timeout: Duration) -> anyhow::Result<()> {
        let res = wait_for(timeout, "cnfs-agent to answer Ping", || async {
            let client = self.agent().await.ok()?;
            client
                .ping(ctx(Duration::from_secs(5)), &agent::PingRequest::new())
                .await
                .ok()
        })
        .await;
        res.map(|_| ())
            .map_err(|e| anyhow::anyhow!("{e}; guest console:\n{}", self.console_text()))
    }

    pub fn console_text(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Whether the console shows `needle` within a few seconds: the agent writes its log from
    /// a thread of its own, so a line may land just after the request it describes.
    pub async fn console_shows(&self, needle: &str) -> bool {
        let until = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            if self.console_text().contains(needle) {
                return true;
            }
            if std::time::Instant::now() > until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Powers the guest off hard (QEMU killed).
    pub fn kill(&mut self) {
        self.qemu.stop(Signal::SIGKILL, Duration::from_secs(5));
    }
}

/// The one guest of a namespace as the single-guest paths have always booted it: `ns.tap`,
/// `ns.guest_ip`, QEMU's default MAC.
fn single_guest(ns: &NetNs) -> GuestNet {
    GuestNet {
        tap: ns.tap.clone(),
        ip: ns.guest_ip.clone(),
        mac: None,
    }
}

/// A ttrpc request context with a deadline.
pub fn ctx(timeout: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(timeout.as_nanos() as i64)
}

fn vhost_device_vsock() -> PathBuf {
    // cargo install puts it in ~/.cargo/bin, which may not be on a test runner's PATH.
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    home.map(|h| h.join("bin").join("vhost-device-vsock"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("vhost-device-vsock"))
}
