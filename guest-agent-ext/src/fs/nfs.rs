//! NFS v3 / v4.x. The agent builds the kernel's option string itself: `addr=` from the
//! server resolved in the guest, `clientaddr=` from the route to it, `vers=`, then the
//! caller's allowlisted options. NFSv3 is mounted with `nolock` (no statd in the guest:
//! locks stay local to the pod's VM, which holds all of the pod's containers).

use std::net::{IpAddr, SocketAddr, UdpSocket};

use async_trait::async_trait;
use cnfs_protocols::spec::{NfsVersion, Server, Source, VolumeSpec};

use super::{fs_options, same_path, vfs_flags, Context, MountHandler, MountPlan, Plain};
use crate::error::AgentError;
use crate::idmap::UNMAPPED_ID;
use crate::kmod;
use crate::mountinfo::MountEntry;

pub struct Nfs;

#[async_trait]
impl MountHandler for Nfs {
    fn name(&self) -> &'static str {
        "nfs"
    }

    fn kernel_types(&self) -> &'static [&'static str] {
        cnfs_protocols::spec::FsKind::Nfs.kernel_types()
    }

    fn recognises(&self, spec: &VolumeSpec, e: &MountEntry) -> bool {
        let Source::Nfs(n) = &spec.source else {
            return false;
        };
        let Some((host, export)) = split_source(&e.source) else {
            return false;
        };
        let server = match &n.server {
            Server::Ip(ip) => host.parse::<IpAddr>().is_ok_and(|h| h == *ip),
            Server::Host(name) => host.eq_ignore_ascii_case(name),
        };
        self.kernel_types().contains(&e.fs_type.as_str())
            && server
            && same_path(export, &n.export)
            && e.option("vers") == Some(n.version.as_str())
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

        let addr = super::resolve(&nfs.server, "NFS server", ctx.budget).await?;
        // A host name's family is known only now; `proto=tcp6` to an IPv4 address would be
        // a bare EINVAL from the kernel.
        cnfs_protocols::spec::check_address_family(&spec.options, addr)?;
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
            attempt: Box::new(Plain),
        })
    }

    fn root_owner_warning(&self, uid: u64, gid: u64) -> Option<String> {
        (uid == UNMAPPED_ID || gid == UNMAPPED_ID).then(|| {
            format!(
                "the volume's root shows owner {uid}:{gid}: the server names owners the \
                 guest cannot map (4294967294 = unmapped); have it send numeric ids \
                 (nfs-ganesha: NFSv4 {{ Only_Numeric_Owners = true; }}; Linux knfsd does \
                 for sec=sys by default)"
            )
        })
    }
}

/// Splits an NFS device (`host:/export`, `[v6]:/export`) into host and export.
fn split_source(source: &str) -> Option<(&str, &str)> {
    if let Some(rest) = source.strip_prefix('[') {
        let (host, export) = rest.split_once("]:")?;
        return Some((host, export));
    }
    source.split_once(':')
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

    fn entry(fs_type: &str, source: &str, options: &str) -> MountEntry {
        MountEntry {
            id: 40,
            dev: "0:52".into(),
            mount_point: "/run/cnfs/volumes/v".into(),
            fs_type: fs_type.into(),
            source: source.into(),
            options: options.into(),
        }
    }

    fn spec(server: &str, export: &str, version: &str) -> VolumeSpec {
        let w = cnfs_protocols::agent::VolumeSpec {
            name: "v".into(),
            source: Some(cnfs_protocols::agent::volume_spec::Source::Nfs(
                cnfs_protocols::agent::NfsSource {
                    server: server.into(),
                    export: export.into(),
                    version: version.into(),
                    ..Default::default()
                },
            )),
            ..Default::default()
        };
        VolumeSpec::from_wire(&w).expect("valid")
    }

    #[test]
    fn adoption_compares_parsed_fields_including_ipv6() {
        let v6 = spec("fd00::5", "/exports/a", "4.1");
        let e = entry("nfs4", "[fd00::5]:/exports/a", "rw,vers=4.1,addr=fd00::5");
        assert!(
            Nfs.recognises(&v6, &e),
            "an IPv6 mount was never adopted before"
        );
        let e = entry("nfs4", "[fd00:0::5]:/exports/a/", "rw,vers=4.1");
        assert!(Nfs.recognises(&v6, &e), "same address, other spelling");
        let v4 = spec("10.0.0.5", "/exports/a", "3");
        assert!(Nfs.recognises(&v4, &entry("nfs", "10.0.0.5:/exports/a", "vers=3")));
        for (t, src, opts) in [
            ("nfs", "10.0.0.5:/exports/a", "vers=4.1"),
            ("nfs", "10.0.0.50:/exports/a", "vers=3"),
            ("nfs", "10.0.0.5:/exports/ab", "vers=3"),
            ("nfs", "10.0.0.5:/exports", "vers=3"),
            ("ceph", "10.0.0.5:/exports/a", "vers=3"),
            ("nfs", "10.0.0.5:/exports/a", "xvers=3"),
        ] {
            assert!(
                !Nfs.recognises(&v4, &entry(t, src, opts)),
                "{t} {src} {opts}"
            );
        }
        let host = spec("NFS.example.com", "/x", "4.2");
        assert!(Nfs.recognises(&host, &entry("nfs4", "nfs.example.com:/x", "vers=4.2")));
    }

    #[test]
    fn only_an_unmapped_root_owner_gets_a_warning() {
        assert_eq!(Nfs.root_owner_warning(0, 0), None);
        assert_eq!(Nfs.root_owner_warning(1234, 65534), None);
        let w = Nfs
            .root_owner_warning(UNMAPPED_ID, 0)
            .expect("unmapped uid");
        assert!(
            w.contains("4294967294:0") && w.contains("Only_Numeric_Owners"),
            "{w}"
        );
        assert!(Nfs.root_owner_warning(0, UNMAPPED_ID).is_some());
    }

    #[test]
    fn source_address_follows_the_route() {
        let src = source_address("127.0.0.1".parse().expect("ip")).expect("route");
        assert!(src.is_loopback());
    }
}
