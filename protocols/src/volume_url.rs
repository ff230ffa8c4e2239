//! The one volume URL grammar CNFS reads, wherever a volume is named by a person: pod
//! annotations (`cnfs.io/volume.<name>`) and CSI volume context (`source`).
//!
//! - `nfs://server[:port]/export?vers=4.1&<nfs option>...`
//! - `cephfs://mon[,mon...]/path?fs=<name>&client=<id>[&fsid=<uuid>][&secret=<ref>][&<option>...]`
//!
//! The result is an unvalidated wire spec: callers fill in what comes from elsewhere (a
//! CephFS client and key from a CSI secret) and then validate with [`crate::spec`].

use std::collections::BTreeMap;

use crate::agent;

/// A parsed volume URL.
#[derive(Debug, Clone)]
pub struct VolumeUrl {
    /// The spec as written; not validated yet, key empty.
    pub wire: agent::VolumeSpec,
    /// `secret=`: the name of a secret held elsewhere (never a key itself).
    pub secret_ref: Option<String>,
}

impl VolumeUrl {
    pub fn is_cephfs(&self) -> bool {
        self.wire.has_cephfs()
    }
}

/// Parses `url` as volume `name`. The error is a reason to show next to the field.
pub fn parse(name: &str, url: &str) -> Result<VolumeUrl, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or("must be a URL like nfs://server/export or cephfs://monitor/path")?;
    if rest.contains(['#', '@', '%', ' ', '\t', '\n']) {
        return Err("must not contain '#', '@', '%' or white space".into());
    }
    let (authority_path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = match authority_path.find('/') {
        Some(i) => authority_path.split_at(i),
        None => (authority_path, ""),
    };
    let mut options = BTreeMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if options.insert(k.to_string(), v.to_string()).is_some() {
            return Err(format!("option {k:?} is given twice"));
        }
    }
    let mut wire = agent::VolumeSpec {
        name: name.to_string(),
        ..Default::default()
    };
    let mut secret_ref = None;
    match scheme {
        "nfs" => {
            let (server, port) = split_host_port(authority)?;
            if let Some(port) = port {
                if options.insert("port".into(), port).is_some() {
                    return Err("give the port either in the URL or as port=, not both".into());
                }
            }
            let version = options.remove("vers").or_else(|| options.remove("nfsvers"));
            wire.set_nfs(agent::NfsSource {
                server,
                export: path.to_string(),
                version: version.unwrap_or_default(),
                ..Default::default()
            });
        }
        "cephfs" => {
            let mut take = |k: &str| options.remove(k).unwrap_or_default();
            let fs_name = take("fs");
            let client = take("client");
            let fsid = take("fsid");
            let secret = take("secret");
            if !secret.is_empty() {
                secret_ref = Some(secret);
            }
            wire.set_cephfs(agent::CephFsSource {
                monitors: authority.split(',').map(str::to_string).collect(),
                fs_name,
                path: path.to_string(),
                client,
                fsid,
                ..Default::default()
            });
        }
        other => return Err(format!("scheme {other:?} is not supported (nfs, cephfs)")),
    }
    wire.options = options.into_iter().collect();
    Ok(VolumeUrl { wire, secret_ref })
}

/// `[v6]:port`, `[v6]`, `host:port`, `host`.
fn split_host_port(authority: &str) -> Result<(String, Option<String>), String> {
    if authority.is_empty() {
        return Err("the URL has no server".into());
    }
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or("unclosed '[' in the server address")?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.to_string()),
            None if after.is_empty() => None,
            None => return Err("unexpected text after the IPv6 address".into()),
        };
        return Ok((host.to_string(), port));
    }
    match authority.split_once(':') {
        Some((h, p)) => Ok((h.to_string(), Some(p.to_string()))),
        None => Ok((authority.to_string(), None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nfs_url_fills_server_export_version_and_options() {
        let u = parse("data", "nfs://[fd00::5]:2049/exports/a?vers=4.1&nconnect=4").unwrap();
        let n = u.wire.nfs();
        assert_eq!(
            (n.server.as_str(), n.export.as_str()),
            ("fd00::5", "/exports/a")
        );
        assert_eq!(n.version, "4.1");
        assert_eq!(u.wire.options.get("port").map(String::as_str), Some("2049"));
        assert_eq!(
            u.wire.options.get("nconnect").map(String::as_str),
            Some("4")
        );
        assert!(u.secret_ref.is_none());
    }

    #[test]
    fn cephfs_url_keeps_secret_as_a_reference() {
        let u = parse(
            "c",
            "cephfs://10.0.0.1:6789,10.0.0.2:6789/sub?fs=a&client=x&secret=s",
        )
        .unwrap();
        let c = u.wire.cephfs();
        assert_eq!(c.monitors, ["10.0.0.1:6789", "10.0.0.2:6789"]);
        assert_eq!((c.fs_name.as_str(), c.client.as_str()), ("a", "x"));
        assert!(c.secret.is_empty());
        assert_eq!(u.secret_ref.as_deref(), Some("s"));
    }

    #[test]
    fn malformed_urls_are_refused_with_a_reason() {
        for (url, why) in [
            ("10.0.0.1:/x", "must be a URL"),
            ("nfs://u@h/x", "must not contain"),
            ("nfs:///x", "no server"),
            ("nfs://h/x?vers=3&vers=4", "twice"),
            ("smb://h/x", "not supported"),
            ("nfs://[fd00::1/x", "unclosed"),
        ] {
            let e = parse("v", url).unwrap_err();
            assert!(e.contains(why), "{url}: {e}");
        }
    }
}
