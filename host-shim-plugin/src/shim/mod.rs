//! `containerd-shim-cnfs-v2`: a containerd shim v2 that wraps the real shim (Kata's).
//! containerd runs it as `<flags> start` (answer with a socket address), `<flags> delete`
//! (clean up after a dead shim), and the `start` step runs it once more without an action as
//! the long-lived server. One wrapper serves a whole sandbox: its socket name is a hash of
//! containerd's address, the namespace and the CRI sandbox id, as containerd's own shims do.

pub mod config;
pub mod delegate;
pub mod frames;
pub mod proxy;
pub mod relay;
pub mod sandbox;

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::annotations::CRI_SANDBOX_ID;

/// Where wrapper sockets live.
pub const SOCKET_DIR: &str = "/run/cnfs/s";

/// The shim v2 command line: Go-style `-flag value` pairs, then an optional action.
#[derive(Debug, Default, Clone)]
pub struct Args {
    pub namespace: String,
    pub address: String,
    pub publish_binary: String,
    pub id: String,
    pub bundle: Option<String>,
    pub debug: bool,
    /// `-v` / `-version`: print the version and exit (containerd's shim convention).
    pub version: bool,
    /// `-info`: RuntimeInfo for the options on stdin, printed as protobuf (containerd 2.x).
    pub info: bool,
    /// Our own flags for the server process.
    pub socket: Option<String>,
    pub delegate_address: Option<String>,
    pub config: Option<String>,
    pub action: Option<String>,
    /// The flags containerd gave, to hand to the delegate unchanged.
    pub passthrough: Vec<String>,
}

impl Args {
    pub fn parse(argv: &[String]) -> Result<Self, String> {
        let mut a = Args::default();
        let mut i = 0;
        while i < argv.len() {
            let arg = &argv[i];
            let Some(flag) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
                if a.action.is_some() {
                    return Err(format!("unexpected argument {arg:?}"));
                }
                a.action = Some(arg.clone());
                i += 1;
                continue;
            };
            let (name, inline) = match flag.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (flag, None),
            };
            // Boolean flags (Go's flag package: no separate value).
            match name {
                "debug" => {
                    a.debug = true;
                    a.passthrough.push(arg.clone());
                    i += 1;
                    continue;
                }
                "v" | "version" => {
                    a.version = true;
                    i += 1;
                    continue;
                }
                "info" => {
                    a.info = true;
                    i += 1;
                    continue;
                }
                _ => {}
            }
            let value = match inline {
                Some(v) => v,
                None => {
                    i += 1;
                    argv.get(i)
                        .cloned()
                        .ok_or_else(|| format!("flag -{name} needs a value"))?
                }
            };
            let ours = matches!(name, "socket" | "delegate-address" | "config");
            match name {
                "namespace" => a.namespace = value.clone(),
                "address" => a.address = value.clone(),
                "publish-binary" => a.publish_binary = value.clone(),
                "id" => a.id = value.clone(),
                "bundle" => a.bundle = Some(value.clone()),
                "socket" => a.socket = Some(value.clone()),
                "delegate-address" => a.delegate_address = Some(value.clone()),
                "config" => a.config = Some(value.clone()),
                // Unknown flags (newer containerd) go to the delegate untouched.
                _ => {}
            }
            if !ours {
                a.passthrough.push(format!("-{name}"));
                a.passthrough.push(value);
            }
            i += 1;
        }
        Ok(a)
    }
}

/// The id a container is grouped under: its CRI sandbox, or itself.
pub fn group_id(bundle: &Path, id: &str) -> String {
    oci_spec::runtime::Spec::load(bundle.join("config.json"))
        .ok()
        .and_then(|s| s.annotations().clone())
        .and_then(|a| a.get(CRI_SANDBOX_ID).cloned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| id.to_string())
}

/// `/run/cnfs/s/<sha256(address, namespace, group)[..32]>.sock` (short: unix paths max 108).
pub fn socket_path(dir: &Path, address: &str, namespace: &str, group: &str) -> PathBuf {
    let mut h = Sha256::new();
    for part in [address, namespace, group] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    let hex: String = h
        .finalize()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect();
    dir.join(format!("{hex}.sock"))
}

/// The address a shim printed on `start`: plain (`unix:///path`) or containerd 2.x's
/// bootstrap JSON (`{"version":2,"address":"unix:///path","protocol":"ttrpc"}`).
pub fn parse_shim_address(out: &str) -> Result<PathBuf, String> {
    let out = out.trim();
    let addr = if out.starts_with('{') {
        let v: serde_json::Value =
            serde_json::from_str(out).map_err(|e| format!("shim printed bad JSON: {e}"))?;
        if v.get("protocol")
            .and_then(|p| p.as_str())
            .is_some_and(|p| p != "ttrpc")
        {
            return Err("the delegate shim speaks a protocol other than ttrpc".into());
        }
        v.get("address")
            .and_then(|a| a.as_str())
            .ok_or("shim bootstrap JSON has no address")?
            .to_string()
    } else {
        out.to_string()
    };
    // The plain form is `unix:///path`; the JSON bootstrap's address may be a bare path
    // (containerd's runtime v2 README shows "/address/of/task/service").
    let path = match addr.strip_prefix("unix://") {
        Some(p) => p,
        None if out.starts_with('{') && addr.starts_with('/') => addr.as_str(),
        None => return Err(format!("delegate shim address {addr:?} is not unix://")),
    };
    if !path.starts_with('/') {
        return Err(format!("delegate shim address {addr:?} is not absolute"));
    }
    Ok(PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn parses_containerd_shim_command_lines() {
        let a = Args::parse(&argv(
            "-namespace k8s.io -address /run/containerd/containerd.sock -publish-binary /usr/bin/containerd -id abc -debug start",
        ))
        .expect("args");
        assert_eq!((a.namespace.as_str(), a.id.as_str()), ("k8s.io", "abc"));
        assert!(a.debug);
        assert_eq!(a.action.as_deref(), Some("start"));
        assert_eq!(
            a.passthrough,
            argv("-namespace k8s.io -address /run/containerd/containerd.sock -publish-binary /usr/bin/containerd -id abc -debug")
        );
        let b = Args::parse(&argv(
            "-id x -socket /s -delegate-address /d -config /c -bundle /b delete",
        ))
        .expect("args");
        assert_eq!(b.socket.as_deref(), Some("/s"));
        assert_eq!(b.passthrough, argv("-id x -bundle /b"));
        assert!(Args::parse(&argv("-id")).is_err());
        // containerd's command-like flags: -v/-version and -info take no value; -v is not
        // -debug.
        let v = Args::parse(&argv("-v")).expect("args");
        assert!(v.version && !v.debug && v.passthrough.is_empty());
        assert!(Args::parse(&argv("--version")).expect("args").version);
        let i = Args::parse(&argv("-namespace k8s.io -info")).expect("args");
        assert!(i.info && i.action.is_none());
        assert_eq!(i.passthrough, argv("-namespace k8s.io"));
        assert!(Args::parse(&argv("start delete")).is_err());
    }

    #[test]
    fn socket_names_group_by_sandbox_and_stay_short() {
        let d = Path::new(SOCKET_DIR);
        let a = socket_path(d, "/run/containerd/containerd.sock", "k8s.io", "sb1");
        assert_eq!(
            a,
            socket_path(d, "/run/containerd/containerd.sock", "k8s.io", "sb1")
        );
        assert_ne!(
            a,
            socket_path(d, "/run/containerd/containerd.sock", "default", "sb1")
        );
        assert!(a.as_os_str().len() < 100);
    }

    #[test]
    fn reads_plain_and_bootstrap_addresses() {
        assert_eq!(
            parse_shim_address("unix:///run/x.sock\n").expect("plain"),
            PathBuf::from("/run/x.sock")
        );
        assert_eq!(
            parse_shim_address(
                r#"{"version":2,"address":"unix:///run/y.sock","protocol":"ttrpc"}"#
            )
            .expect("json"),
            PathBuf::from("/run/y.sock")
        );
        assert!(parse_shim_address("tcp://1.2.3.4:5").is_err());
        assert_eq!(
            parse_shim_address(r#"{"version":2,"address":"/run/z.sock","protocol":"ttrpc"}"#)
                .expect("bare path in JSON"),
            PathBuf::from("/run/z.sock")
        );
        assert!(parse_shim_address("/run/plain-without-scheme.sock").is_err());
        assert!(
            parse_shim_address(r#"{"version":2,"address":"unix:///g","protocol":"grpc"}"#).is_err()
        );
    }
}
