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
//!
//! [[allow]]                                    # FUSE volumes: no servers, no path
//! namespaces = ["team-b"]
//! filesystems = ["fuse"]
//! options = ["allow_other"]
//! ```
//!
//! An encrypted volume (`encryption=luks2&size=10Gi[&owner=1000:1000]`) needs an entry whose
//! `options` name `encryption` and `size`, and `owner` when it sets an owner other than
//! 0:0: those are URL options, not mount options, but a pod chooses them all the same. A
//! gocryptfs volume (`encryption=gocryptfs[&owner=...]`) has no size: `encryption` (and
//! `owner`) suffice.
//!
//! `servers` and `export_prefixes` are required when an entry lists a file system with
//! servers (all but `fuse`, whose daemon picks its own: a network policy bounds where it
//! goes).
//!
//! Loading is strict, because a typo would otherwise load silently and never match: an
//! unknown file system, a server that is neither a CIDR, an address nor a host name, a prefix
//! that is not an absolute clean path, a namespace that is not a Kubernetes name, an option key
//! that is not a key, an empty list (an entry that can never match) or an unknown key refuse
//! the whole file, naming the line and the key.

use std::net::IpAddr;
use std::ops::Range;
use std::path::Path;

use cnfs_protocols::spec::{self, encryption, FsKind, Server, VolumeSpec};
use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub allow: Vec<Rule>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    pub namespaces: Vec<String>,
    pub filesystems: Vec<String>,
    pub servers: Vec<String>,
    pub export_prefixes: Vec<String>,
    pub options: Vec<String>,
}

/// The file as written, with the places of its values for error messages.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    allow: Vec<RawRule>,
}

type List = Spanned<Vec<Spanned<String>>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    namespaces: List,
    filesystems: List,
    #[serde(default)]
    servers: Option<List>,
    #[serde(default)]
    export_prefixes: Option<List>,
    #[serde(default)]
    options: Option<List>,
}

/// Why a policy text does not load: where (line, from 1) and which key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {key}: {reason}")]
pub struct ParseError {
    pub line: usize,
    /// `allow[<entry>].<key>`, or what TOML itself names (`toml` for a syntax error).
    pub key: String,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy file {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("policy file {path}, {error}")]
    Invalid { path: String, error: ParseError },
    #[error("policy denies volume {volume} for namespace {namespace}: {reason}")]
    Denied {
        volume: String,
        namespace: String,
        reason: String,
    },
}

fn line_of(text: &str, at: usize) -> usize {
    text.get(..at).unwrap_or(text).matches('\n').count() + 1
}

impl Policy {
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError::Load {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::parse(&text).map_err(|error| PolicyError::Invalid {
            path: path.display().to_string(),
            error,
        })
    }

    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let raw: RawPolicy = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
        let mut policy = Policy::default();
        for (i, r) in raw.allow.into_iter().enumerate() {
            let at = |span: Range<usize>, key: &str, reason: String| ParseError {
                line: line_of(text, span.start),
                key: format!("allow[{i}].{key}"),
                reason,
            };
            let list = |l: List, key: &str, check: fn(&str) -> Result<(), String>| {
                let span = l.span();
                let values = l.into_inner();
                if values.is_empty() && key != "options" {
                    return Err(at(
                        span,
                        key,
                        "is empty, so this entry could never match".into(),
                    ));
                }
                values
                    .into_iter()
                    .map(|v| {
                        let span = v.span();
                        let v = v.into_inner();
                        check(&v)
                            .map(|()| v)
                            .map_err(|reason| at(span, key, reason))
                    })
                    .collect::<Result<Vec<String>, ParseError>>()
            };
            let fs_span = r.filesystems.span();
            let filesystems = list(r.filesystems, "filesystems", check_filesystem)?;
            let with_servers = filesystems
                .iter()
                .find(|f| FsKind::by_name(f).is_some_and(FsKind::has_servers));
            let required = |l: Option<List>, key: &str, check| match (l, with_servers) {
                (Some(l), _) => list(l, key, check),
                (None, None) => Ok(Vec::new()),
                (None, Some(fs)) => Err(at(
                    fs_span.clone(),
                    key,
                    format!("is required for {fs} volumes"),
                )),
            };
            let servers = required(r.servers, "servers", check_server)?;
            let export_prefixes = required(r.export_prefixes, "export_prefixes", check_prefix)?;
            policy.allow.push(Rule {
                namespaces: list(r.namespaces, "namespaces", check_namespace)?,
                filesystems,
                servers,
                export_prefixes,
                options: match r.options {
                    Some(o) => list(o, "options", check_option)?,
                    None => Vec::new(),
                },
            });
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
        // The source type says what its servers and path are (an SMB share's path is
        // `/share/dir`); a FUSE volume has neither.
        if v.source.kind().has_servers() {
            let (servers, path) = v.source.policy_target();
            let path = path.as_str();
            for s in &servers {
                if !self.allows_server(s) {
                    return Err(format!("server {s} is not allowed"));
                }
            }
            if !self.export_prefixes.iter().any(|p| under_prefix(path, p)) {
                return Err(format!("path {path} is outside the allowed prefixes"));
            }
        }
        for key in v.options.keys() {
            if !self.options.iter().any(|o| o == key) {
                return Err(format!("option {key} is not allowed"));
            }
        }
        // Taken out of the mount options into the spec's encryption, and allowed the same way.
        if let Some(e) = &v.encryption {
            let owner = (e.uid, e.gid) != (0, 0);
            let keys = [
                (encryption::OPT_ENCRYPTION, true),
                (encryption::OPT_SIZE, e.mode.has_size()),
                (encryption::OPT_OWNER, owner),
                (encryption::OPT_GROW, e.grow_to_quota),
            ];
            for (key, _) in keys.iter().filter(|(_, used)| *used) {
                if !self.options.iter().any(|o| o == key) {
                    return Err(format!("option {key} is not allowed"));
                }
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

/// A TOML error with its line; the key is the text at its place when that is a key.
fn toml_error(text: &str, e: &toml::de::Error) -> ParseError {
    let span = e.span().unwrap_or(0..0);
    let word = text.get(span.clone()).unwrap_or_default().trim();
    let is_key = !word.is_empty()
        && word.len() <= 64
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'[' | b']'));
    let line_start = text
        .get(..span.start)
        .and_then(|t| t.rfind('\n'))
        .map_or(0, |i| i + 1);
    let column = text
        .get(line_start..span.start)
        .map_or(1, |t| t.chars().count() + 1);
    let words: Vec<&str> = e
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let message = if words.is_empty() {
        // toml gives no words for a stray character: name it.
        match text.get(span.start..).and_then(|t| t.chars().next()) {
            Some(c) => format!("unexpected character {c:?}"),
            None => "unexpected end of file".to_string(),
        }
    } else {
        words.join("; ")
    };
    ParseError {
        line: line_of(text, span.start),
        key: if is_key {
            word.to_string()
        } else {
            "toml".into()
        },
        reason: format!("{message} (column {column})"),
    }
}

fn check_namespace(ns: &str) -> Result<(), String> {
    // A Kubernetes namespace is a DNS label (RFC 1123): anything else never matches a pod.
    let label = !ns.is_empty()
        && ns.len() <= 63
        && ns
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !ns.starts_with('-')
        && !ns.ends_with('-');
    if ns == "*" || label {
        Ok(())
    } else {
        Err(format!(
            "\"{}\" is not a Kubernetes namespace name (lower-case letters, digits and '-', at most 63) or \"*\"",
            spec::printable(ns)
        ))
    }
}

fn check_filesystem(fs: &str) -> Result<(), String> {
    if FsKind::by_name(fs).is_some() {
        Ok(())
    } else {
        let known: Vec<&str> = FsKind::ALL.iter().map(|k| k.name()).collect();
        Err(format!(
            "\"{}\" is not a file system CNFS mounts ({})",
            spec::printable(fs),
            known.join(", ")
        ))
    }
}

fn check_server(s: &str) -> Result<(), String> {
    if s.contains('/') {
        return s.parse::<IpNet>().map(drop).map_err(|_| {
            format!(
                "\"{}\" is not a CIDR (such as 10.0.0.0/8)",
                spec::printable(s)
            )
        });
    }
    if s.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    if s.starts_with('[') {
        return Err(format!(
            "\"{}\": write an IPv6 address without brackets",
            spec::printable(s)
        ));
    }
    let labels_ok = s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    // An all-numeric dotted name that is not an address is a typo (10.0.0.256), not a host.
    let numeric = s.split('.').all(|l| l.bytes().all(|b| b.is_ascii_digit()));
    if labels_ok && !numeric {
        Ok(())
    } else {
        Err(format!(
            "\"{}\" is neither a CIDR, an IP address nor a host name",
            spec::printable(s)
        ))
    }
}

fn check_prefix(p: &str) -> Result<(), String> {
    spec::validate_path("export_prefixes", p)
        .map(drop)
        .map_err(|e| format!("\"{}\" {}", spec::printable(p), e.reason))
}

fn check_option(o: &str) -> Result<(), String> {
    let key = !o.is_empty()
        && o.len() <= 32
        && o.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if key {
        Ok(())
    } else {
        Err(format!(
            "\"{}\" is not an option key (lower-case letters, digits and '_')",
            spec::printable(o)
        ))
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

    fn fuse(sidecar: &str, opts: &[(&str, &str)]) -> VolumeSpec {
        let mut w = agent::VolumeSpec {
            name: "f".into(),
            ..Default::default()
        };
        w.set_fuse(agent::FuseSource {
            sidecar: sidecar.into(),
            ..Default::default()
        });
        for (k, v) in opts {
            w.options.insert(k.to_string(), v.to_string());
        }
        VolumeSpec::from_wire(&w).expect("valid spec")
    }

    #[test]
    fn fuse_volumes_need_a_fuse_entry_and_allow_other_must_be_listed() {
        let p = Policy::parse(
            "[[allow]]\nnamespaces = [\"team-b\"]\nfilesystems = [\"fuse\"]\n\
             options = [\"uid\"]\n",
        )
        .expect("a fuse-only entry needs no servers or prefixes");
        p.check("team-b", &fuse("sshfs", &[("uid", "0")]))
            .expect("allowed");
        let denied = |ns: &str, v: &VolumeSpec| match p.check(ns, v) {
            Err(PolicyError::Denied { reason, .. }) => reason,
            other => panic!("expected a denial, got {other:?}"),
        };
        assert_eq!(
            denied("team-b", &fuse("sshfs", &[("allow_other", "")])),
            "option allow_other is not allowed"
        );
        assert_eq!(
            denied("team-a", &fuse("sshfs", &[])),
            "no policy rule allows this namespace"
        );
        // The NFS example policy has no fuse entry: FUSE is denied by default.
        let nfs_only = Policy::parse(POLICY).expect("loads");
        match nfs_only.check("team-a", &fuse("sshfs", &[])) {
            Err(PolicyError::Denied { reason, .. }) => {
                assert_eq!(reason, "file system fuse is not allowed")
            }
            other => panic!("expected a denial, got {other:?}"),
        }
    }

    fn encrypted(owner: Option<&str>) -> VolumeSpec {
        let url = match owner {
            Some(o) => {
                format!("nfs://10.1.2.3/exports/team-a/sec?encryption=luks2&size=1Gi&owner={o}")
            }
            None => "nfs://10.1.2.3/exports/team-a/sec?encryption=luks2&size=1Gi".to_string(),
        };
        let parsed = cnfs_protocols::volume_url::parse("sec", &url).expect("url");
        VolumeSpec::from_wire_unresolved(&parsed.wire).expect("valid spec")
    }

    #[test]
    fn a_gocryptfs_volume_needs_encryption_and_owner_listed_but_no_size() {
        let gocryptfs = |query: &str| {
            let url = format!("nfs://10.1.2.3/exports/team-a/shared?encryption=gocryptfs{query}");
            let parsed = cnfs_protocols::volume_url::parse("shared", &url).expect("url");
            VolumeSpec::from_wire_unresolved(&parsed.wire).expect("valid spec")
        };
        let denied = |p: &Policy, v: &VolumeSpec| match p.check("team-a", v) {
            Err(PolicyError::Denied { reason, .. }) => reason,
            other => panic!("expected a denial, got {other:?}"),
        };
        let p = team_a("[\"nconnect\"]");
        assert_eq!(
            denied(&p, &gocryptfs("")),
            "option encryption is not allowed"
        );
        let p = team_a("[\"encryption\"]");
        p.check("team-a", &gocryptfs("")).expect("no size to allow");
        p.check("team-a", &gocryptfs("&owner=0:0"))
            .expect("owner 0:0 is the default");
        assert_eq!(
            denied(&p, &gocryptfs("&owner=1000:1000")),
            "option owner is not allowed"
        );
        let p = team_a("[\"encryption\", \"owner\"]");
        p.check("team-a", &gocryptfs("&owner=1000:1000"))
            .expect("allowed");
        // The same entry still denies a luks2 volume its size.
        assert_eq!(denied(&p, &encrypted(None)), "option size is not allowed");
    }

    fn team_a(options: &str) -> Policy {
        Policy::parse(&format!(
            "[[allow]]\nnamespaces = [\"team-a\"]\nfilesystems = [\"nfs\"]\n\
             servers = [\"10.0.0.0/8\"]\nexport_prefixes = [\"/exports/team-a\"]\n\
             options = {options}\n"
        ))
        .expect("policy")
    }

    #[test]
    fn encryption_is_denied_unless_the_entry_lists_encryption_size_and_owner() {
        let denied = |p: &Policy, v: &VolumeSpec| match p.check("team-a", v) {
            Err(PolicyError::Denied { reason, .. }) => reason,
            other => panic!("expected a denial, got {other:?}"),
        };
        // An entry that allows the share but says nothing of encryption denies it.
        let p = team_a("[\"nconnect\"]");
        p.check("team-a", &nfs("10.1.2.3", "/exports/team-a", &[]))
            .expect("plain volume allowed");
        assert_eq!(
            denied(&p, &encrypted(None)),
            "option encryption is not allowed"
        );
        let p = Policy::parse(POLICY).expect("example");
        assert_eq!(
            denied(&p, &encrypted(None)),
            "option encryption is not allowed"
        );
        // Each of them must be listed.
        let p = team_a("[\"encryption\"]");
        assert_eq!(denied(&p, &encrypted(None)), "option size is not allowed");
        let p = team_a("[\"encryption\", \"size\"]");
        p.check("team-a", &encrypted(None)).expect("allowed");
        p.check("team-a", &encrypted(Some("0:0")))
            .expect("owner 0:0 is the default");
        assert_eq!(
            denied(&p, &encrypted(Some("1000:1000"))),
            "option owner is not allowed"
        );
        let p = team_a("[\"encryption\", \"size\", \"owner\"]");
        p.check("team-a", &encrypted(Some("1000:1000")))
            .expect("allowed");
    }

    #[test]
    fn grow_to_quota_is_denied_unless_the_entry_lists_grow() {
        let url = "cephfs://10.1.2.3:6789/exports/team-a/sec?fs=cephfs&client=u&secret=s\
                   &encryption=luks2&size=1Gi&grow=quota";
        let parsed = cnfs_protocols::volume_url::parse("sec", url).expect("url");
        let v = VolumeSpec::from_wire_unresolved(&parsed.wire).expect("valid spec");
        let entry = |options: &str| {
            Policy::parse(&format!(
                "[[allow]]\nnamespaces = [\"team-a\"]\nfilesystems = [\"cephfs\"]\n\
                 servers = [\"10.0.0.0/8\"]\nexport_prefixes = [\"/exports/team-a\"]\n\
                 options = {options}\n"
            ))
            .expect("policy")
        };
        match entry("[\"encryption\", \"size\"]").check("team-a", &v) {
            Err(PolicyError::Denied { reason, .. }) => {
                assert_eq!(reason, "option grow is not allowed")
            }
            other => panic!("expected a denial, got {other:?}"),
        }
        entry("[\"encryption\", \"size\", \"grow\"]")
            .check("team-a", &v)
            .expect("allowed");
    }

    #[test]
    fn an_entry_with_servers_to_match_cannot_leave_them_out() {
        for (missing, text) in [
            (
                "servers",
                "[[allow]]\nnamespaces = [\"a\"]\nfilesystems = [\"fuse\", \"smb\"]\n\
                 export_prefixes = [\"/\"]\n",
            ),
            (
                "export_prefixes",
                "[[allow]]\nnamespaces = [\"a\"]\nfilesystems = [\"nfs\"]\n\
                 servers = [\"10.0.0.0/8\"]\n",
            ),
        ] {
            let e = Policy::parse(text).expect_err(missing);
            assert_eq!(e.line, 3, "{e}");
            assert_eq!(e.key, format!("allow[0].{missing}"));
            assert!(e.reason.starts_with("is required for "), "{e}");
        }
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

    /// An entry that is valid except for `key`, which is written on line 4 of the text.
    fn entry_with(key: &str, value: &str) -> String {
        let mut lines = vec![
            "namespaces = [\"team-a\"]".to_string(),
            "filesystems = [\"nfs\"]".to_string(),
            "servers = [\"10.0.0.0/8\"]".to_string(),
            "export_prefixes = [\"/exports\"]".to_string(),
            "options = [\"nconnect\"]".to_string(),
        ];
        lines.retain(|l| !l.starts_with(&format!("{key} ")));
        lines.insert(1, format!("{key} = {value}"));
        format!("# team A\n[[allow]]\n{}\n", lines.join("\n"))
    }

    #[test]
    fn typos_refuse_the_policy_naming_line_and_key() {
        // (key, value as written, words the reason must contain)
        let rows = [
            (
                "filesystems",
                r#"["nfs", "nsf"]"#,
                "\"nsf\" is not a file system CNFS mounts (nfs, cephfs, smb, fuse)",
            ),
            ("filesystems", r#"["NFS"]"#, "\"NFS\" is not a file system"),
            ("filesystems", "[]", "is empty"),
            ("servers", r#"["10.0.0.0/99"]"#, "is not a CIDR"),
            (
                "servers",
                r#"["10.0.0.256"]"#,
                "neither a CIDR, an IP address nor a host name",
            ),
            ("servers", r#"["nfs_server.example.com"]"#, "neither a CIDR"),
            ("servers", r#"["nfs.example.com:2049"]"#, "neither a CIDR"),
            ("servers", r#"["[fd00::5]"]"#, "without brackets"),
            ("servers", r#"[""]"#, "neither a CIDR"),
            (
                "export_prefixes",
                r#"["/x/../y"]"#,
                "\"/x/../y\" must be a clean path",
            ),
            ("export_prefixes", r#"["/x//y"]"#, "must be a clean path"),
            ("export_prefixes", r#"["/x/./y"]"#, "must be a clean path"),
            (
                "export_prefixes",
                r#"["exports"]"#,
                "must be an absolute path",
            ),
            ("export_prefixes", r#"["/ex ports"]"#, "is not allowed"),
            (
                "namespaces",
                r#"["Team-A"]"#,
                "is not a Kubernetes namespace name",
            ),
            (
                "namespaces",
                r#"["team a"]"#,
                "is not a Kubernetes namespace name",
            ),
            ("namespaces", "[]", "is empty"),
            ("options", r#"["nconnect=4"]"#, "is not an option key"),
        ];
        for (key, value, reason) in rows {
            let text = entry_with(key, value);
            let e = Policy::parse(&text).expect_err(&text);
            assert_eq!(e.line, 4, "{text}\n{e}");
            assert_eq!(e.key, format!("allow[0].{key}"), "{text}\n{e}");
            assert!(e.reason.contains(reason), "{text}\n{e}");
            assert!(
                e.to_string()
                    .starts_with(&format!("line 4: allow[0].{key}: ")),
                "{e}"
            );
        }
        // The same entry without the typo loads.
        for key in [
            "filesystems",
            "servers",
            "export_prefixes",
            "namespaces",
            "options",
        ] {
            let good = entry_with(
                key,
                &format!(
                    "{:?}",
                    match key {
                        "filesystems" => vec!["nfs", "cephfs"],
                        "servers" => vec![
                            "10.0.0.0/8",
                            "192.168.1.10",
                            "fd00::/8",
                            "nfs.example.com",
                            "NFS-1.example.com"
                        ],
                        "export_prefixes" => vec!["/exports", "/exports/team-a/", "/"],
                        "namespaces" => vec!["team-a", "*", "a1"],
                        _ => vec!["nconnect", "ms_mode"],
                    }
                ),
            );
            Policy::parse(&good).unwrap_or_else(|e| panic!("{good}\n{e}"));
        }
    }

    #[test]
    fn the_second_entry_is_named_by_its_index_and_line() {
        let text = format!(
            "{}\n{}",
            entry_with("options", "[]"),
            entry_with("filesystems", r#"["afs"]"#)
        );
        let e = Policy::parse(&text).expect_err("afs");
        assert_eq!(
            (e.line, e.key.as_str()),
            (12, "allow[1].filesystems"),
            "{e}"
        );
    }

    #[test]
    fn toml_errors_name_their_line_and_key() {
        let e = Policy::parse("[[allow]]\nnamespaces = [\"a\"]\nfilesystem = [\"nfs\"]\n")
            .expect_err("unknown key");
        assert_eq!((e.line, e.key.as_str()), (3, "filesystem"), "{e}");
        assert!(e.reason.contains("unknown field"), "{e}");
        let e = Policy::parse("\n\n[[allows]]\n").expect_err("unknown table");
        assert_eq!((e.line, e.key.as_str()), (3, "allows"), "{e}");
        let e = Policy::parse("[[allow]]\nnamespaces = [\"a\" \"b\"]\nfilesystems = []\n")
            .expect_err("syntax");
        assert_eq!((e.line, e.key.as_str()), (2, "toml"), "{e}");
        let e = Policy::parse("[[allow]]\nnamespaces = [\"a\"]\n").expect_err("missing keys");
        assert!(e.reason.contains("missing field"), "{e}");
    }

    #[test]
    fn a_file_with_a_typo_fails_to_load_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("cnfs-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("policy.toml");
        std::fs::write(&path, entry_with("filesystems", r#"["nsf"]"#)).expect("write");
        let e = Policy::load(&path).expect_err("typo").to_string();
        assert!(
            e.starts_with(&format!(
                "policy file {}, line 4: allow[0].filesystems: ",
                path.display()
            )),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_shipped_example_policy_loads() {
        let p = Policy::parse(include_str!("../../configs/cnfs/policy.toml")).expect("example");
        assert_eq!(p.allow.len(), 4);
        assert_eq!(p.allow[1].filesystems, ["nfs", "cephfs"]);
        assert_eq!(p.allow[2].filesystems, ["smb"]);
        assert_eq!(p.allow[3].filesystems, ["fuse"]);
        assert!(p.allow[3].servers.is_empty());
    }

    #[test]
    fn every_file_system_a_volume_can_have_is_known_to_the_policy() {
        let cephfs = {
            let mut w = agent::VolumeSpec {
                name: "c".into(),
                ..Default::default()
            };
            w.set_cephfs(agent::CephFsSource {
                monitors: vec!["10.0.0.1:6789".into()],
                fs_name: "fs".into(),
                client: "c".into(),
                path: "/".into(),
                ..Default::default()
            });
            VolumeSpec::from_wire_unresolved(&w).expect("cephfs spec")
        };
        for v in [nfs("10.0.0.1", "/e", &[]), cephfs] {
            assert!(FsKind::by_name(v.fs_name()).is_some(), "{}", v.fs_name());
        }
    }
}
