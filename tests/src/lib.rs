//! The CNFS test bed: everything an end-to-end test needs to drive a real guest kernel.
//! Each [`TestBed`] gets its own network namespace, tap, 10.x subnet, socket paths and temp
//! dir, so tests run in parallel; everything it starts is stopped on drop, also when a test
//! fails.

pub mod artifacts;
pub mod ceph;
pub mod containerd;
pub mod fd_passing;
pub mod ganesha;
pub mod guest;
pub mod images;
pub mod kata_monitor;
pub mod netns;
pub mod osbuilder;
pub mod process;
pub mod raw;
pub mod rootfs;
pub mod samba;
pub mod sftp;
pub mod vm;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

pub use artifacts::Artifacts;
pub use ganesha::Ganesha;
pub use guest::GuestExec;
pub use netns::NetNs;
pub use vm::Vm;

/// A per-instance id, unique on this machine for the life of the process.
pub fn unique_id() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    (std::process::id() % 10_000) * 100 + n % 100
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> std::io::Result<Self> {
        let p = std::env::temp_dir().join(format!("cnfs-{tag}-{}", unique_id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("CNFS_KEEP_TMP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// One guest with an NFS server beside it: the unit every end-to-end test starts from.
/// Field order is drop order: the VM goes first, then the server, then the namespace.
pub struct TestBed {
    pub vm: Vm,
    pub nfs: Ganesha,
    pub ns: NetNs,
    pub dir: TempDir,
}

impl TestBed {
    /// Namespace + ganesha exporting a fresh directory + a booted guest whose agent answers.
    pub async fn start() -> anyhow::Result<Self> {
        let art = Artifacts::locate()?;
        let dir = TempDir::new("bed")?;
        let ns = NetNs::create()?;
        let nfs = Ganesha::start(&ns, dir.path())?;
        let vm = Vm::boot(&art, &ns, dir.path()).await?;
        Ok(TestBed { vm, nfs, ns, dir })
    }
}

/// An NFS volume spec as a host would send it.
pub fn nfs_volume(
    name: &str,
    server: &str,
    export: &str,
    version: &str,
) -> cnfs_protocols::agent::VolumeSpec {
    let mut spec = cnfs_protocols::agent::VolumeSpec {
        name: name.into(),
        ..Default::default()
    };
    spec.set_nfs(cnfs_protocols::agent::NfsSource {
        server: server.into(),
        export: export.into(),
        version: version.into(),
        ..Default::default()
    });
    spec
}

/// A Mount request for `spec` with a sandbox id and a deadline.
pub fn mount_request(
    spec: cnfs_protocols::agent::VolumeSpec,
    timeout_ms: u32,
) -> cnfs_protocols::agent::MountRequest {
    cnfs_protocols::agent::MountRequest {
        volume: protobuf::MessageField::some(spec),
        sandbox_id: "sandbox-e2e".into(),
        timeout_ms,
        ..Default::default()
    }
}

/// Mount through `a` with the agent's deadline `timeout_ms`; the call itself waits 240 s.
pub async fn mount_within(
    a: &cnfs_protocols::agent_ttrpc::AgentClient,
    spec: cnfs_protocols::agent::VolumeSpec,
    timeout_ms: u32,
) -> Result<cnfs_protocols::agent::MountResponse, ttrpc::Error> {
    a.mount(
        vm::ctx(std::time::Duration::from_secs(240)),
        &mount_request(spec, timeout_ms),
    )
    .await
}

/// Unmount through `a` with the agent's deadline `timeout_ms`.
pub async fn unmount_within(
    a: &cnfs_protocols::agent_ttrpc::AgentClient,
    name: &str,
    timeout_ms: u32,
) -> anyhow::Result<cnfs_protocols::agent::UnmountResponse> {
    Ok(a.unmount(
        vm::ctx(std::time::Duration::from_secs(240)),
        &cnfs_protocols::agent::UnmountRequest {
            name: name.into(),
            timeout_ms,
            ..Default::default()
        },
    )
    .await?)
}

/// The status code of a failed agent call (`UNKNOWN` for a transport error).
pub fn code_of(e: &ttrpc::Error) -> ttrpc::Code {
    match e {
        ttrpc::Error::RpcStatus(s) => s.code(),
        _ => ttrpc::Code::UNKNOWN,
    }
}

/// The message of a failed agent call.
pub fn message_of(e: &ttrpc::Error) -> String {
    match e {
        ttrpc::Error::RpcStatus(s) => s.message().to_string(),
        other => other.to_string(),
    }
}
