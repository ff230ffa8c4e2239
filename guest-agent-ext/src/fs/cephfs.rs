//! CephFS with the kernel client. The device uses the kernel's new syntax
//! `<client>@<fsid>.<fs>=<path>` with `mon_addr=` when the fsid is known, the legacy
//! `<mon>,<mon>:<path>` with `name=` and `fs=` otherwise. The key goes in `secret=`, which the
//! kernel never shows in /proc/mounts; the option string holding it is wiped after the call.

use async_trait::async_trait;
use cnfs_protocols::spec::{Source, VolumeSpec};

use super::{fs_options, vfs_flags, Context, MountHandler, MountPlan};
use crate::error::AgentError;
use crate::kmod;

pub struct CephFs;

#[async_trait]
impl MountHandler for CephFs {
    fn name(&self) -> &'static str {
        "cephfs"
    }

    fn kernel_types(&self) -> &'static [&'static str] {
        &["ceph"]
    }

    async fn plan(&self, spec: &VolumeSpec, ctx: &Context<'_>) -> Result<MountPlan, AgentError> {
        let Source::CephFs(c) = &spec.source else {
            return Err(AgentError::Internal(
                "cephfs handler given a non-CephFS spec".into(),
            ));
        };
        if c.secret.expose().is_empty() {
            return Err(AgentError::Invalid(cnfs_protocols::spec::SpecError {
                field: "volume.cephfs.secret".into(),
                reason: "is required".into(),
            }));
        }
        let dir = ctx.modules_dir.to_path_buf();
        tokio::task::spawn_blocking(move || kmod::ensure(&dir, "ceph"))
            .await
            .map_err(|e| AgentError::Internal(format!("module loading task: {e}")))?
            .map_err(|e| AgentError::FailedPrecondition(e.to_string()))?;

        let mons: Vec<String> = c.monitors.iter().map(|m| m.to_string()).collect();
        let mut opts = Vec::new();
        let source = match &c.fsid {
            Some(fsid) => {
                opts.push(format!("mon_addr={}", mons.join("/")));
                format!("{}@{fsid}.{}={}", c.client, c.fs_name, c.path)
            }
            None => {
                opts.push(format!("name={}", c.client));
                opts.push(format!("fs={}", c.fs_name));
                format!("{}:{}", mons.join(","), c.path)
            }
        };
        opts.extend(fs_options(spec));
        opts.push(format!("secret={}", c.secret.expose()));
        Ok(MountPlan {
            source,
            fs_type: "ceph".into(),
            flags: vfs_flags(spec),
            data: opts.join(","),
        })
    }
}
