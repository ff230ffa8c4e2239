//! The cluster admin's policy, read by the shim: deny by default. A volume is mounted only
//! when one `[[allow]]` entry matches all of it: the pod's Kubernetes namespace, the file
//! system, every server (NFS server or CephFS monitor), the export/path prefix and every
//! option key. The guest re-checks its own invariants (the shared spec validation).
//!
//! ```toml
//! [[allow]]
//! namespaces = ["team-a"]                      # "*" matches any namespace
//! filesystems = ["nfs"]
//! servers = ["10.0.0.0/8", "nfs.example.com"]  # CIDRs or exact host names
//! export_prefixes = ["/exports/team-a"]        # path-segment prefixes
//! options = ["nconnect", "rsize", "wsize"]     # option keys a pod may set
//! ```

use std::net::IpAddr;
use std::path::Path;

use cnfs_protocols::spec::{Server, Source, VolumeSpec};
use ipnet::IpNet;
use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default)]
    pub allow: Vec<Rule>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub namespaces: Vec<String>,
    pub filesystems: Vec<String>,
    pub servers: Vec<String>,
    pub export_prefixes: Vec<String>,
    #[serde(default)]
    pub options: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy file {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("policy denies volume {volume} for namespace {namespace}: {reason}")]
    Denied {
        volume: String,
        namespace: String,
        reason: String,
    },
}

impl Policy {
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let load_err = |reason: String| PolicyError::Load {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| load_err(e.to_string()))?;
        Self::parse(&text).map_err(load_err)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let policy: Policy = toml::from_str(text).map_err(|e| e.to_string())?;
        for (i, rule) in policy.allow.iter().enumerate() {
            for s in &rule.servers {
                if s.contains('/') && s.parse::<IpNet>().is_err() {
                    return Err(format!("allow[{i}].servers: {s:?} is not a CIDR"));
                }
            }
            for p in &rule.export_prefixes {
                if !p.starts_with('/') {
                    return Err(format!(
                        "allow[{i}].export_prefixes: {p:?} must be absolute"
                    ));
                }
            }
        }
        Ok(policy)
    }

    /// Allows `volume` for `namespace`, or says why not (from the rules for that namespace).
    pub fn check(&self, namespace: &str, volume: &VolumeSpec) -> Result<(), PolicyError> {
        let deny = |reason: String| PolicyError::Denied {
            volume: volume.name.clone(),
            namespace: namespace.to_string(),
            reason,
        };
        let rules: Vec<&Rule> = self
            .allow
            .iter()
            .filter(|r| r.namespaces.iter().any(|n| n == "*" || n == namespace))
            .collect();
        if rules.is_empty() {
            return Err(deny("no policy rule allows this namespace".into()));
        }
        let mut why = String::new();
        for rule in rules {
            match rule.admits(volume) {
                Ok(()) => return Ok(()),
                Err(reason) if why.is_empty() => why = reason,
                Err(_) => {}
            }
        }
        Err(deny(why))
    }
}

impl Rule {
    fn admits(&self, v: &VolumeSpec) -> Result<(), String> {
        let fs = v.fs_name();
        if !self.filesystems.iter().any(|f| f == fs) {
            return Err(format!("file system {fs} is not allowed"));
        }
        let (servers, path): (Vec<Server>, &str) = match &v.source {
            Source::Nfs(n) => (vec![n.server.clone()], &n.export),
            Source::CephFs(c) => (
                c.monitors.iter().map(|m| Server::Ip(m.ip())).collect(),
                &c.path,
            ),
        };
        for s in &servers {
            if !self.allows_server(s) {
                return Err(format!("server {s} is not allowed"));
            }
        }
        if !self.export_prefixes.iter().any(|p| under_prefix(path, p)) {
            return Err(format!("path {path} is outside the allowed prefixes"));
        }
        for key in v.options.keys() {
            if !self.options.iter().any(|o| o == key) {
                return Err(format!("option {key} is not allowed"));
            }
        }
        Ok(())
    }

    fn allows_server(&self, server: &Server) -> bool {
        self.servers.iter().any(|allowed| match server {
            Server::Ip(ip) => match allowed.parse::<IpNet>() {
                Ok(net) => net.contains(ip),
                Err(_) => allowed.parse::<IpAddr>().is_ok_and(|a| a == *ip),
            },
            // A host name is allowed only by name: the guest resolves it, so a CIDR says
            // nothing about where it will point.
            Server::Host(h) => allowed.eq_ignore_ascii_case(h),
        })
    }
}

/// `/exports/a` is under `/exports` and `/exports/a`, not under `/exports/ab`.
fn under_prefix(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    prefix.is_empty() || path == prefix || path.starts_with(&format!("{prefix}/"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnfs_protocols::agent;

    const POLICY: &str = r#"
[[allow]]
namespaces = ["team-a"]
filesystems = ["nfs"]
servers = ["10.0.0.0/8", "nfs.example.com"]
export_prefixes = ["/exports/team-a"]
options = ["nconnect"]

[[allow]]
namespaces = ["*"]
filesystems = ["nfs"]
servers = ["192.168.1.10"]
export_prefixes = ["/public"]
"#;

    fn nfs(server: &str, export: &str, opts: &[(&str, &str)]) -> VolumeSpec {
        let mut w = agent::VolumeSpec {
            name: "v".into(),
            ..Default::default()
        };
        w.set_nfs(agent::NfsSource {
            server: server.into(),
            export: export.into(),
            ..Default::default()
        });
        for (k, v) in opts {
            w.options.insert(k.to_string(), v.to_string());
        }
        VolumeSpec::from_wire(&w).expect("valid spec")
    }

    #[test]
    fn allows_only_what_a_rule_covers() {
        let p = Policy::parse(POLICY).expect("policy");
        let ok = [
            ("team-a", nfs("10.1.2.3", "/exports/team-a", &[])),
            (
                "team-a",
                nfs("10.1.2.3", "/exports/team-a/x", &[("nconnect", "4")]),
            ),
            ("team-a", nfs("NFS.example.com", "/exports/team-a", &[])),
            ("team-b", nfs("192.168.1.10", "/public/docs", &[])),
        ];
        for (ns, v) in ok {
            p.check(ns, &v).expect("allowed");
        }
        let denied = [
            (
                "team-b",
                nfs("10.1.2.3", "/exports/team-a", &[]),
                "server 10.1.2.3",
            ),
            (
                "team-a",
                nfs("11.0.0.1", "/exports/team-a", &[]),
                "server 11.0.0.1",
            ),
            (
                "team-a",
                nfs("10.1.2.3", "/exports/team-ab", &[]),
                "outside the allowed prefixes",
            ),
            (
                "team-a",
                nfs("10.1.2.3", "/exports/team-a", &[("rsize", "65536")]),
                "option rsize",
            ),
            (
                "team-a",
                nfs("evil.example.com", "/exports/team-a", &[]),
                "server evil.example.com",
            ),
        ];
        for (ns, v, why) in denied {
            let e = p.check(ns, &v).expect_err(why).to_string();
            assert!(
                e.contains(why) && e.contains(&format!("namespace {ns}")),
                "{e}"
            );
        }
        let empty = Policy::default();
        let e = empty
            .check("team-a", &nfs("10.1.2.3", "/exports/team-a", &[]))
            .expect_err("deny");
        assert!(e
            .to_string()
            .contains("no policy rule allows this namespace"));
    }

    #[test]
    fn malformed_policies_are_refused() {
        assert!(Policy::parse("[[allow]]\nnamespaces=[\"a\"]\n").is_err());
        assert!(Policy::parse("[[allow]]\nnamespaces=[]\nfilesystems=[]\nservers=[\"10.0.0.0/99\"]\nexport_prefixes=[]\n").is_err());
        assert!(Policy::parse(
            "[[allow]]\nnamespaces=[]\nfilesystems=[]\nservers=[]\nexport_prefixes=[\"rel\"]\n"
        )
        .is_err());
        assert!(Policy::parse("[[allows]]\n").is_err());
    }
}
