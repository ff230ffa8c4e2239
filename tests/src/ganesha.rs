//! nfs-ganesha (VFS FSAL) exporting a temp dir, inside the test's network namespace, with
//! its own rpcbind for NFSv3 (ganesha refuses to start without one when v3 is on). Both run
//! with a private tmpfs on /run, so parallel instances never share rpcbind's socket.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::netns::NetNs;
use crate::process::Guarded;

/// Pseudo path of the export (NFSv4 and, with Mount_Path_Pseudo, NFSv3 alike).
pub const EXPORT: &str = "/export";

/// The NFSv4 lease (`NFSV4 { Lease_Lifetime }`, seconds; ganesha's default is 60): how long
/// the server keeps a silent client's state.
pub const LEASE_LIFETIME_S: u32 = 15;

pub struct Ganesha {
    proc: Guarded,
    /// The exported directory on the host: what the guest sees under the mount.
    pub export_dir: PathBuf,
    pub log: PathBuf,
    pub server_ip: String,
    pid_file: PathBuf,
    /// RecoveryRoot: with the `fs` backend, one directory per confirmed NFSv4 client id.
    pub recovery: PathBuf,
}

impl Ganesha {
    pub fn start(ns: &NetNs, dir: &Path) -> anyhow::Result<Self> {
        let root = dir.join("ganesha");
        let export_dir = root.join("export");
        let recovery = root.join("recovery");
        std::fs::create_dir_all(&export_dir)?;
        std::fs::create_dir_all(&recovery)?;
        let conf = root.join("ganesha.conf");
        let log = root.join("ganesha.log");
        std::fs::write(&conf, config(&export_dir, &recovery))?;
        let script = format!(
            "mount -t tmpfs -o mode=0755 cnfs-run /run && mkdir -p /run/rpcbind && \
             (rpcbind -f &) && sleep 0.3 && \
             exec ganesha.nfsd -F -L {log} -f {conf} -p {pid}",
            log = log.display(),
            conf = conf.display(),
            pid = root.join("ganesha.pid").display()
        );
        let mut cmd = ns.command("sh");
        cmd.args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut g = Ganesha {
            proc: Guarded::spawn("ganesha", cmd)?,
            export_dir,
            log,
            server_ip: ns.host_ip.clone(),
            pid_file: root.join("ganesha.pid"),
            recovery,
        };
        g.wait_ready(Duration::from_secs(30))?;
        Ok(g)
    }

    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if text.contains("NFS SERVER INITIALIZED") {
                return Ok(());
            }
            if !self.proc.alive() {
                anyhow::bail!("ganesha exited during start-up; log:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        anyhow::bail!("ganesha not ready after {timeout:?}")
    }

    /// ganesha.nfsd's process id, from its pid file; else the guarded process's (`ip netns
    /// exec` and `sh` both exec, so that one is ganesha too).
    pub fn pid(&self) -> u32 {
        std::fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| self.proc.pid())
    }

    /// Kills the server outright (SIGKILL): the "server died" fault.
    pub fn kill(&mut self) {
        self.proc.stop(Signal::SIGKILL, Duration::from_secs(5));
    }
}

fn config(export: &Path, recovery: &Path) -> String {
    format!(
        r#"NFS_CORE_PARAM {{
    Protocols = 3, 4;
    NFS_Port = 2049;
    MNT_Port = 20048;
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Mount_Path_Pseudo = true;
}}
NFSV4 {{
    Graceless = true;
    Lease_Lifetime = {LEASE_LIFETIME_S};
    RecoveryBackend = fs;
    RecoveryRoot = "{recovery}";
}}
EXPORT {{
    Export_Id = 1;
    Path = "{export}";
    Pseudo = "{EXPORT}";
    Protocols = 3, 4;
    Transports = TCP;
    Access_Type = RW;
    Squash = No_Root_Squash;
    SecType = sys;
    FSAL {{ Name = VFS; }}
}}
LOG {{ Default_Log_Level = EVENT; }}
"#,
        recovery = recovery.display(),
        export = export.display()
    )
}
