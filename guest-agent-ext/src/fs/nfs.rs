//! NFS v3 / v4.x. The agent builds the kernel's option string itself: `addr=` from the
//! server resolved in the guest, `clientaddr=` from the route to it, `vers=`, then the
//! caller's allowlisted options. NFSv3 is mounted with `nolock` (no statd in the guest:
//! locks stay local to the pod's VM, which holds all of the pod's containers).

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use async_trait::async_trait;
use cnfs_protocols::spec::{NfsVersion, Server, Source, VolumeSpec};

use super::{fs_options, vfs_flags, Context, MountHandler, MountPlan};
use crate::error::AgentError;
use crate::kmod;

pub struct Nfs;

#[async_trait]
impl MountHandler for Nfs {
    fn name(&self) -> &'static str {
        "nfs"
    }

    fn kernel_types(&self) -> &'static [&'static str] {
        &["nfs", "nfs4"]
    }

    async fn plan(&self, spec: &VolumeSpec, ctx: &Context<'_>) -> Result<MountPlan, AgentError> {
        let Source::Nfs(nfs) = &spec.source else {
            return Err(AgentError::Internal(
                "nfs handler given a non-NFS spec".into(),
            ));
        };
        let module = match nfs.version {
            NfsVersion::V3 => "nfsv3",
            _ => "nfsv4",
        };
        let dir = ctx.modules_dir.to_path_buf();
        let client_id = ctx.client_id.to_string();
        tokio::task::spawn_blocking(move || -> Result<(), AgentError> {
            kmod::ensure(&dir, module)
                .map_err(|e| AgentError::FailedPrecondition(e.to_string()))?;
            set_client_id(&client_id)
        })
        .await
        .map_err(|e| AgentError::Internal(format!("module loading task: {e}")))??;

        let addr = resolve(&nfs.server, ctx.budget).await?;
        let mut opts = vec![
            format!("vers={}", nfs.version.as_str()),
            format!("addr={addr}"),
        ];
        if nfs.version == NfsVersion::V3 {
            if !spec.options.contains_key("nolock") && !spec.options.contains_key("local_lock") {
                opts.push("nolock".into());
            }
        } else {
            opts.push(format!("clientaddr={}", source_address(addr)?));
        }
        opts.extend(fs_options(spec));
        let host = match addr {
            IpAddr::V6(_) => format!("[{}]", nfs.server.to_string().trim_matches(['[', ']'])),
            IpAddr::V4(_) => nfs.server.to_string(),
        };
        Ok(MountPlan {
            source: format!("{host}:{}", nfs.export),
            fs_type: if nfs.version == NfsVersion::V3 {
                "nfs"
            } else {
                "nfs4"
            }
            .to_string(),
            flags: vfs_flags(spec),
            data: opts.join(","),
        })
    }
}

/// Gives this guest's NFSv4 client a unique identity before its first mount: identical
/// guests would otherwise present the same client id (from the same hostname) and the
/// server would expire one when the other mounts.
fn set_client_id(id: &str) -> Result<(), AgentError> {
    let param = std::path::Path::new("/sys/module/nfs/parameters/nfs4_unique_id");
    let current = std::fs::read_to_string(param).unwrap_or_default();
    if !current.trim().is_empty() {
        return Ok(());
    }
    std::fs::write(param, id).map_err(|e| {
        AgentError::FailedPrecondition(format!(
            "setting the NFSv4 client identity in {}: {e}",
            param.display()
        ))
    })
}

/// Resolves the server inside the guest, bounded; an address passes through.
async fn resolve(server: &Server, budget: Duration) -> Result<IpAddr, AgentError> {
    let host = match server {
        Server::Ip(ip) => return Ok(*ip),
        Server::Host(h) => h.clone(),
    };
    let lookup = tokio::net::lookup_host((host.clone(), 2049));
    let addrs: Vec<SocketAddr> = tokio::time::timeout(budget, lookup)
        .await
        .map_err(|_| {
            AgentError::Deadline(format!("resolving NFS server {host:?}: no answer in time"))
        })?
        .map_err(|e| AgentError::Unavailable(format!("resolving NFS server {host:?}: {e}")))?
        .collect();
    // Prefer IPv4 when both exist, as mount.nfs does by default.
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .map(|a| a.ip())
        .ok_or_else(|| AgentError::NotFound(format!("NFS server {host:?} has no address")))
}

/// The guest address the server will see: the source address the kernel picks for the route
/// to `server`. Connecting a UDP socket performs exactly that route lookup and sends nothing.
pub fn source_address(server: IpAddr) -> Result<IpAddr, AgentError> {
    let bind: SocketAddr = match server {
        IpAddr::V4(_) => "0.0.0.0:0"
            .parse()
            .map_err(|_| AgentError::Internal("addr".into()))?,
        IpAddr::V6(_) => "[::]:0"
            .parse()
            .map_err(|_| AgentError::Internal("addr".into()))?,
    };
    let no_route = |e: std::io::Error| {
        AgentError::Unavailable(format!(
            "no route from the guest to NFS server {server}: {e}"
        ))
    };
    let sock = UdpSocket::bind(bind).map_err(no_route)?;
    sock.connect(SocketAddr::new(server, 2049))
        .map_err(no_route)?;
    Ok(sock.local_addr().map_err(no_route)?.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_address_follows_the_route() {
        let src = source_address("127.0.0.1".parse().expect("ip")).expect("route");
        assert!(src.is_loopback());
    }
}
