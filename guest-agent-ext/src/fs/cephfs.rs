//! CephFS with the kernel client. The device uses the kernel's new syntax
//! `<client>@<fsid>.<fs>=<path>` with `mon_addr=` when the fsid is known, the legacy
//! `<mon>,<mon>:<path>` with `name=` and `mds_namespace=` otherwise. The key goes in `secret=`, which the
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

    fn mount_error(&self, what: &str, errno: nix::errno::Errno) -> Option<AgentError> {
        use nix::errno::Errno;
        match errno {
            // Linux 6.12 answers EHOSTUNREACH both for a file system name no MDS serves and for
            // a key the monitors reject (measured); errno alone cannot tell them apart.
            Errno::EHOSTUNREACH => Some(AgentError::NotFound(format!(
                "mounting {what}: the cluster did not serve this client: unknown file system \
                 name, its MDS down, or a key the monitors rejected (check fs_name, client and key)"
            ))),
            // The kernel could not use the key (not a cephx key) or an option.
            Errno::EINVAL => Some(AgentError::Invalid(cnfs_protocols::spec::SpecError {
                field: "volume.cephfs".into(),
                reason: format!("mounting {what}: the kernel rejected the key or an option (the guest's dmesg says which)"),
            })),
            _ => None,
        }
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
        // msgr2 secure mode encrypts with AES-GCM; the kernel asks for it by crypto alias,
        // which a guest without modprobe aliases cannot resolve: load it up front.
        let secure = spec
            .options
            .get("ms_mode")
            .is_some_and(|m| m.contains("secure"));
        tokio::task::spawn_blocking(move || -> Result<(), kmod::KmodError> {
            kmod::ensure(&dir, "ceph")?;
            if secure {
                kmod::ensure(&dir, "gcm")?;
                kmod::ensure(&dir, "ghash_generic")?;
            }
            Ok(())
        })
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
                // `fs=` is mount.ceph's spelling; the kernel takes `mds_namespace=`.
                opts.push(format!("mds_namespace={}", c.fs_name));
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
