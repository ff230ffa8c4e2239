//! SMB 2.1 / 3.x with the kernel's cifs client. The agent builds the option string itself:
//! `ip=` from the server resolved in the guest, `port=445` unless the caller set one (cifs
//! would otherwise try 445, then 139: twice the wait on an unreachable server), `vers=`,
//! the credentials, `seal` for SMB3 unless the caller said `noseal`, then the caller's
//! allowlisted options.
//!
//! Measured on the test guest (Debian 6.12, Samba 4.17; tests/tests/samba_testbed.rs):
//! wrong password and unknown user are both EACCES (STATUS_LOGON_FAILURE); an unknown share
//! is ENOENT (BAD_NETWORK_NAME); a refused dialect or encryption is EOPNOTSUPP; nothing
//! listening is ECONNREFUSED, no host EHOSTUNREACH, a black hole EINPROGRESS after ~5 s.
//! SMB3 without the cmac/ccm/gcm modules also fails with ENOENT, so they are loaded first.
//! `/proc/mounts` shows `username=`, never the password.

use async_trait::async_trait;
use cnfs_protocols::spec::{Server, SmbSource, SmbVersion, Source, VolumeSpec};
use nix::errno::Errno;

use super::{fs_options, same_path, vfs_flags, Attempt, Context, MountHandler, MountPlan};
use crate::error::AgentError;
use crate::kmod;
use crate::mountinfo::MountEntry;

pub struct Smb;

/// Options CNFS reads itself and never passes to the kernel.
const CNFS_ONLY: &[&str] = &["seal", "noseal"];

#[async_trait]
impl MountHandler for Smb {
    fn name(&self) -> &'static str {
        cnfs_protocols::spec::FsKind::Smb.name()
    }

    fn kernel_types(&self) -> &'static [&'static str] {
        cnfs_protocols::spec::FsKind::Smb.kernel_types()
    }

    fn recognises(&self, spec: &VolumeSpec, e: &MountEntry) -> bool {
        let Source::Smb(s) = &spec.source else {
            return false;
        };
        let Some((host, share, path)) = split_unc(&e.source) else {
            return false;
        };
        let server = match &s.server {
            Server::Ip(ip) => host.parse::<std::net::IpAddr>().is_ok_and(|h| h == *ip),
            Server::Host(name) => host.eq_ignore_ascii_case(name),
        };
        self.kernel_types().contains(&e.fs_type.as_str())
            && server
            // Share names are case-insensitive on SMB servers.
            && share.eq_ignore_ascii_case(&s.share)
            && same_path(&format!("/{path}"), &s.path)
            && e.option("vers") == Some(s.version.as_str())
            && e.option("username") == Some(s.username.as_str())
    }

    async fn plan(&self, spec: &VolumeSpec, ctx: &Context<'_>) -> Result<MountPlan, AgentError> {
        let Source::Smb(s) = &spec.source else {
            return Err(AgentError::Internal(
                "smb handler given a non-SMB spec".into(),
            ));
        };
        let dir = ctx.modules_dir.to_path_buf();
        // SMB3 signs with AES-CMAC and seals with AES-GCM/CCM, asked for by crypto name: a
        // guest without modprobe aliases cannot resolve those, and the mount then fails
        // with the same ENOENT as an unknown share. Kata's own kernel builds them in (CIFS=y
        // selects them) and has no modules directory: there a failure to load is no error,
        // only a note for reading an ENOENT.
        let smb3 = s.version != SmbVersion::V2_1;
        let crypto =
            tokio::task::spawn_blocking(move || -> Result<Option<String>, kmod::KmodError> {
                kmod::ensure(&dir, "cifs")?;
                if !smb3 {
                    return Ok(None);
                }
                Ok(["cmac", "ccm", "gcm", "ghash_generic"]
                    .into_iter()
                    .find_map(|m| kmod::ensure(&dir, m).err().map(|e| e.to_string())))
            })
            .await
            .map_err(|e| AgentError::Internal(format!("module loading task: {e}")))?
            .map_err(|e| AgentError::FailedPrecondition(e.to_string()))?;

        let addr = super::resolve(&s.server, "SMB server", ctx.budget).await?;
        Ok(MountPlan {
            source: unc(s),
            fs_type: "cifs".into(),
            flags: vfs_flags(spec),
            data: mount_data(spec, s, addr),
            attempt: Box::new(SmbAttempt {
                source: s.clone(),
                crypto,
            }),
        })
    }
}

/// The device: `//server/share[/path]`. An IPv6 server goes unbracketed: the kernel splits
/// the UNC at `/` or `\` only, and reads the address from `ip=`.
fn unc(s: &SmbSource) -> String {
    let path = if s.path == "/" { "" } else { s.path.as_str() };
    format!("//{}/{}{path}", s.server, s.share)
}

/// The option string for mount(2), with the server's address `addr`.
fn mount_data(spec: &VolumeSpec, s: &SmbSource, addr: std::net::IpAddr) -> String {
    let mut opts = vec![
        format!("vers={}", s.version.as_str()),
        format!("ip={addr}"),
        format!("username={}", s.username),
        // The kernel reads `,,` inside a password as one comma.
        format!("password={}", s.password.expose().replace(',', ",,")),
    ];
    if !spec.options.contains_key("port") {
        opts.push("port=445".into());
    }
    if !s.domain.is_empty() {
        opts.push(format!("domain={}", s.domain));
    }
    if s.seal {
        opts.push("seal".into());
    }
    // A DFS referral would send the guest to a server the policy never saw (the admin
    // allowed this server and share, not wherever it refers to).
    opts.push("nodfs".into());
    opts.extend(fs_options(spec).filter(|o| {
        let key = o.split_once('=').map_or(o.as_str(), |(k, _)| k);
        !CNFS_ONLY.contains(&key)
    }));
    opts.join(",")
}

/// Splits the kernel's device `//host/share[/path]` (the UNC as mounted).
fn split_unc(source: &str) -> Option<(&str, &str, &str)> {
    let rest = source.strip_prefix("//")?;
    let (host, rest) = rest.split_once('/')?;
    let (share, path) = rest.split_once('/').unwrap_or((rest, ""));
    Some((host, share, path))
}

/// Reads a failed cifs mount by its errno (what the kernel returns is distinct for the cases
/// a caller can act on; see the module comment).
struct SmbAttempt {
    source: SmbSource,
    /// Why an SMB3 crypto module could not be loaded, if one could not (it may be built in).
    crypto: Option<String>,
}

impl Attempt for SmbAttempt {
    fn failed(&mut self, what: &str, errno: Errno) -> Option<AgentError> {
        let s = &self.source;
        Some(match errno {
            Errno::EACCES | Errno::EPERM => AgentError::PermissionDenied(format!(
                "mounting {what}: the server refused the credentials of user {} (wrong \
                 password, unknown user, or no access to share {})",
                s.username, s.share
            )),
            Errno::ENOENT => match &self.crypto {
                None => AgentError::NotFound(format!(
                    "mounting {what}: the server has no share {} (or no directory {} in it)",
                    s.share, s.path
                )),
                // The kernel's ENOENT is the same for a missing share and missing crypto.
                Some(why) => AgentError::FailedPrecondition(format!(
                    "mounting {what}: ENOENT: no share {} on the server, or the guest kernel                      lacks the SMB3 crypto (cmac, ccm, gcm), which could not be loaded: {why}",
                    s.share
                )),
            },
            Errno::EOPNOTSUPP => AgentError::FailedPrecondition(format!(
                "mounting {what}: the server does not offer SMB {}{} (SMB1 and 2.0 are never \
                 used; an encrypted share needs SMB 3.0 or later)",
                s.version.as_str(),
                if s.seal {
                    " with encryption (seal)"
                } else {
                    ""
                }
            )),
            Errno::ECONNREFUSED
            | Errno::EHOSTUNREACH
            | Errno::ENETUNREACH
            | Errno::EHOSTDOWN
            | Errno::ETIMEDOUT
            | Errno::EINPROGRESS => AgentError::Unavailable(format!(
                "mounting {what}: cannot reach the SMB server {} ({errno})",
                s.server
            )),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnfs_protocols::agent;

    fn spec(server: &str, share: &str, path: &str) -> VolumeSpec {
        let mut w = agent::VolumeSpec {
            name: "files".into(),
            ..Default::default()
        };
        w.set_smb(agent::SmbSource {
            server: server.into(),
            share: share.into(),
            path: path.into(),
            username: "alice".into(),
            password: "Zq9-secret".into(),
            ..Default::default()
        });
        VolumeSpec::from_wire(&w).expect("valid")
    }

    fn entry(source: &str, options: &str) -> MountEntry {
        MountEntry {
            id: 1,
            dev: "0:50".into(),
            mount_point: "/run/cnfs/volumes/files".into(),
            fs_type: "cifs".into(),
            source: source.into(),
            options: options.into(),
        }
    }

    #[test]
    fn adoption_compares_parsed_unc_and_options() {
        let opts = "rw,relatime,vers=3.1.1,cache=strict,username=alice,uid=0,addr=10.0.0.9,seal";
        let s = spec("10.0.0.9", "data", "/team");
        assert!(Smb.recognises(&s, &entry("//10.0.0.9/DATA/team", opts)));
        for (source, options) in [
            ("//10.0.0.9/data", opts),
            ("//10.0.0.9/data/team2", opts),
            ("//10.0.0.19/data/team", opts),
            ("//10.0.0.9/data2/team", opts),
            (
                "//10.0.0.9/data/team",
                &opts.replace("vers=3.1.1", "vers=3.0"),
            ),
            ("//10.0.0.9/data/team", &opts.replace("alice", "alice2")),
        ] {
            assert!(
                !Smb.recognises(&s, &entry(source, options)),
                "{source} {options}"
            );
        }
        assert!(Smb.recognises(
            &spec("10.0.0.9", "data", ""),
            &entry("//10.0.0.9/data", opts)
        ));
    }

    /// The kernel's reading of a cifs option string (`smb3_fs_context_parse_monolithic` in
    /// fs/smb/client/fs_context.c): split at `,`, where `,,` is a comma inside the option;
    /// an empty option ends the string; the first `=` splits key and value.
    fn kernel_options(data: &str) -> Vec<(String, Option<String>)> {
        let mut out = Vec::new();
        let mut chars = data.chars().peekable();
        loop {
            let mut option = String::new();
            let mut more = false;
            while let Some(c) = chars.next() {
                if c != ',' {
                    option.push(c);
                } else if chars.peek() == Some(&',') {
                    chars.next();
                    option.push(',');
                } else {
                    more = true;
                    break;
                }
            }
            if option.is_empty() {
                return out;
            }
            out.push(match option.split_once('=') {
                Some((k, v)) => (k.to_string(), Some(v.to_string())),
                None => (option, None),
            });
            if !more {
                return out;
            }
        }
    }

    fn smb_of(spec: &VolumeSpec) -> &SmbSource {
        match &spec.source {
            Source::Smb(s) => s,
            _ => unreachable!(),
        }
    }

    #[test]
    fn the_kernel_reads_back_the_whole_password_and_nothing_more() {
        let addr: std::net::IpAddr = "10.0.0.9".parse().expect("ip");
        for password in [
            ",",
            ",,",
            "a,",
            ",a",
            "a,,b",
            "a,,,b",
            "p=w,1 ",
            "x,ip=1.2.3.4",
            "x,vers=2.0,sec=none",
            "x,,seal",
            " lead",
            "é,ü=ß",
            "\"q,\"",
        ] {
            let mut w = spec("10.0.0.9", "data", "/team").to_wire(true);
            w.mut_smb().password = password.into();
            w.mut_smb().domain = "CORP".into();
            w.options.insert("uid".into(), "1000".into());
            let s = VolumeSpec::from_wire(&w).expect(password);
            let opts = kernel_options(&mount_data(&s, smb_of(&s), addr));
            let keys: Vec<&str> = opts.iter().map(|(k, _)| k.as_str()).collect();
            assert_eq!(
                keys,
                ["vers", "ip", "username", "password", "port", "domain", "seal", "nodfs", "uid"],
                "{password:?}"
            );
            assert_eq!(opts[3].1.as_deref(), Some(password));
            assert_eq!(opts[1].1.as_deref(), Some("10.0.0.9"));
        }
    }

    #[test]
    fn an_ipv6_server_is_named_bare_in_the_unc_and_in_ip() {
        // The kernel splits the UNC at '/' or '\\' only (smb3_parse_devname) and would not
        // parse a bracketed address (cifs_convert_address); the address comes from ip=.
        let s = spec("[fd00::5]", "data", "/team");
        let smb = smb_of(&s);
        assert_eq!(unc(smb), "//fd00::5/data/team");
        let addr = "fd00::5".parse().expect("ip");
        let opts = kernel_options(&mount_data(&s, smb, addr));
        assert!(
            opts.contains(&("ip".into(), Some("fd00::5".into()))),
            "{opts:?}"
        );
        // As the kernel shows it in mountinfo, it is recognised again.
        let opts = "rw,vers=3.1.1,username=alice,addr=fd00::5,seal";
        assert!(Smb.recognises(&s, &entry("//fd00::5/data/team", opts)));
        assert_eq!(
            unc(smb_of(&spec("10.0.0.9", "data", ""))),
            "//10.0.0.9/data"
        );
    }

    #[test]
    fn each_errno_the_kernel_returns_is_read_as_its_cause() {
        let mut a = SmbAttempt {
            source: match spec("10.0.0.9", "data", "").source {
                Source::Smb(s) => s,
                _ => unreachable!(),
            },
            crypto: None,
        };
        let code = |e: Option<AgentError>| format!("{:?}", e.expect("mapped"));
        assert!(code(a.failed("v", Errno::EACCES)).starts_with("PermissionDenied"));
        assert!(code(a.failed("v", Errno::ENOENT)).starts_with("NotFound"));
        assert!(code(a.failed("v", Errno::EOPNOTSUPP)).contains("with encryption"));
        assert!(code(a.failed("v", Errno::EINPROGRESS)).starts_with("Unavailable"));
        assert!(a.failed("v", Errno::EIO).is_none());
        // The password never appears in an error.
        for e in [
            Errno::EACCES,
            Errno::ENOENT,
            Errno::EOPNOTSUPP,
            Errno::ECONNREFUSED,
        ] {
            assert!(!code(a.failed("v", e)).contains("Zq9-secret"));
        }
        // Without the SMB3 crypto modules the same ENOENT is not read as a missing share.
        a.crypto = Some("module cmac is not in modules.dep".into());
        let e = code(a.failed("v", Errno::ENOENT));
        assert!(
            e.starts_with("FailedPrecondition") && e.contains("cmac"),
            "{e}"
        );
    }
}
