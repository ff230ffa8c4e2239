//! FUSE: a file system served by a daemon in one of the pod's own containers (the sidecar).
//! The guest kernel mounts `fuse` with a `/dev/fuse` descriptor the agent opened; the
//! descriptor reaches the sidecar over a unix socket, as meta-fuse-csi-plugin's fuse-starter
//! expects it. The source names the sidecar and the socket's path in it; there is no server
//! and no secret (the daemon has its own).

use std::collections::BTreeMap;

use super::FieldValue::One;
use super::{err, printable, validate_name, validate_path, Kind, SpecError};
use crate::agent;

pub const NAME: &str = "fuse";
/// Kernel file system types of its mounts: `fuse`, or `fuse.<subtype>` when a daemon
/// mounts by itself (never the agent's mounts, listed for callers who name one).
pub(super) const KERNEL_TYPES: &[&str] = &["fuse"];

/// meta-fuse-csi-plugin's examples pass this path to fuse-starter; sidecar images written
/// for it find the socket unchanged.
pub const DEFAULT_SOCKET: &str = "/fuse-fd-passing/fuse-csi-ephemeral.sock";

/// Where the agent keeps each volume's socket directory in the guest.
pub const SOCKET_ROOT: &str = "/run/cnfs/fuse";

/// A unix socket path is at most 107 bytes (sun_path); the agent's is
/// `/run/cnfs/fuse/<name of up to 63>/<file>`, which leaves this much for the file name.
pub const MAX_SOCKET_FILE: usize = 107 - SOCKET_ROOT.len() - 1 - 63 - 1;

/// `sidecar ← socket` and the fields a listing shows.
pub(super) fn summary(f: &agent::FuseSource) -> (String, super::SummaryFields) {
    let socket = if f.socket.is_empty() {
        DEFAULT_SOCKET
    } else {
        &f.socket
    };
    let shown = format!("sidecar {}:{socket}", f.sidecar);
    let fields = vec![
        ("sidecar", One(f.sidecar.clone())),
        ("socket", One(socket.to_string())),
    ];
    (shown, fields)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FuseSource {
    /// The container that runs the daemon (CRI container name).
    pub sidecar: String,
    /// The socket's path in the sidecar: a directory (bound from the guest, the sidecar's
    /// alone) and a file name in it.
    pub socket: String,
}

impl FuseSource {
    /// The directory the sidecar sees the socket in.
    pub fn socket_dir(&self) -> &str {
        self.socket.rsplit_once('/').map_or("/", |(d, _)| d)
    }

    /// The socket's file name.
    pub fn socket_file(&self) -> &str {
        self.socket.rsplit_once('/').map_or("", |(_, f)| f)
    }

    pub(super) fn to_wire(&self) -> agent::FuseSource {
        agent::FuseSource {
            sidecar: self.sidecar.clone(),
            socket: self.socket.clone(),
            ..Default::default()
        }
    }
}

/// The guest directory that holds volume `name`'s socket.
pub fn socket_dir_in_guest(name: &str) -> std::path::PathBuf {
    std::path::Path::new(SOCKET_ROOT).join(name)
}

pub(super) const OPTIONS: &[(&str, Kind)] = &[
    // The daemon's user and group (`user_id=`/`group_id=`): without allow_other only
    // processes of that user and group reach the files. 4294967295 is "no id" to the kernel.
    ("uid", Kind::Uint(0, 4_294_967_294)),
    ("gid", Kind::Uint(0, 4_294_967_294)),
    // Every user reaches the files (the kernel still checks their permission bits: the
    // agent always mounts with default_permissions). A policy lists it to allow it.
    ("allow_other", Kind::Flag),
    ("max_read", Kind::Uint(4096, 1 << 20)),
];

pub(super) const RESERVED: &[(&str, &str)] = &[
    ("fd", "set by the agent: the descriptor it opened"),
    ("rootmode", "set by the agent"),
    ("user_id", "use uid"),
    ("group_id", "use gid"),
    (
        "default_permissions",
        "always set: the kernel checks permission bits",
    ),
    ("blksize", "only for fuseblk"),
];

/// `fuse://?sidecar=<container>[&socket=<path>][&<option>...]`: no server, no path.
pub(super) fn from_url(
    authority: &str,
    path: &str,
    options: &mut BTreeMap<String, String>,
) -> Result<agent::volume_spec::Source, String> {
    if !authority.is_empty() || !(path.is_empty() || path == "/") {
        return Err(
            "a FUSE volume has no server or path: fuse://?sidecar=<container>[&socket=<path>]"
                .into(),
        );
    }
    Ok(agent::volume_spec::Source::Fuse(agent::FuseSource {
        sidecar: options.remove("sidecar").unwrap_or_default(),
        socket: options.remove("socket").unwrap_or_default(),
        ..Default::default()
    }))
}

pub(super) fn parse(
    f: &agent::FuseSource,
    options: &BTreeMap<String, String>,
) -> Result<FuseSource, SpecError> {
    // Without allow_other the kernel admits only processes of the daemon's uid and gid; the
    // guest's root processes then get EACCES: kata-agent cannot stat the volume to bind it
    // into a container (rustjail's `src.is_dir()`), nor cnfs-agent probe it.
    if !options.contains_key("allow_other") {
        for key in ["uid", "gid"] {
            if options.get(key).is_some_and(|v| v != "0") {
                return err(
                    format!("volume.options.{key}"),
                    "a daemon user or group other than root needs allow_other: without it \
                     only that user and group reach the files, and kata-agent (root) cannot \
                     stat the volume to bind it into containers",
                );
            }
        }
    }
    validate_name("volume.fuse.sidecar", &f.sidecar)?;
    let field = "volume.fuse.socket";
    let socket = if f.socket.is_empty() {
        DEFAULT_SOCKET.to_string()
    } else {
        validate_path(field, &f.socket)?
    };
    let source = FuseSource {
        sidecar: f.sidecar.clone(),
        socket,
    };
    let (dir, file) = (source.socket_dir(), source.socket_file());
    // The directory is bound over whatever the sidecar has there.
    if dir.is_empty() || dir == "/" {
        return err(
            field,
            "must be a file in a directory of its own, like /fuse-fd-passing/fuse.sock",
        );
    }
    for system in ["/proc", "/sys", "/dev"] {
        if dir == system || dir.starts_with(&format!("{system}/")) {
            return err(field, format!("must not be under {system}"));
        }
    }
    if file.len() > MAX_SOCKET_FILE || file.starts_with('.') {
        return err(
            field,
            format!(
                "file name {:?} must be 1 to {MAX_SOCKET_FILE} characters and not start with '.' \
                 (a unix socket path is at most 107 bytes)",
                printable(file)
            ),
        );
    }
    Ok(source)
}

#[cfg(test)]
mod tests {
    use crate::agent;
    use crate::spec::VolumeSpec;

    fn fuse(opts: &[(&str, &str)]) -> agent::VolumeSpec {
        let mut w = agent::VolumeSpec {
            name: "site".into(),
            ..Default::default()
        };
        w.set_fuse(agent::FuseSource {
            sidecar: "sshfs".into(),
            ..Default::default()
        });
        for (k, v) in opts {
            w.options.insert(k.to_string(), v.to_string());
        }
        w
    }

    fn refused(opts: &[(&str, &str)]) -> (String, String) {
        let e = VolumeSpec::from_wire(&fuse(opts)).expect_err("refused");
        (e.field, e.reason)
    }

    #[test]
    fn a_daemon_user_other_than_root_needs_allow_other() {
        for key in ["uid", "gid"] {
            let (field, reason) = refused(&[(key, "1000")]);
            assert_eq!(field, format!("volume.options.{key}"));
            assert!(reason.contains("needs allow_other"), "{reason}");
        }
        let ok = VolumeSpec::from_wire(&fuse(&[
            ("uid", "1000"),
            ("gid", "1000"),
            ("allow_other", ""),
        ]))
        .expect("with allow_other");
        assert_eq!(ok.options.get("uid").map(String::as_str), Some("1000"));
        VolumeSpec::from_wire(&fuse(&[("uid", "0"), ("gid", "0")])).expect("root needs none");
    }

    #[test]
    fn numbers_with_a_leading_zero_are_refused_as_the_kernel_reads_them_octal() {
        let (field, reason) = refused(&[("max_read", "010000")]);
        assert_eq!(field, "volume.options.max_read");
        assert!(reason.contains("leading zero"), "{reason}");
        let (field, _) = refused(&[("uid", "0100"), ("allow_other", "")]);
        assert_eq!(field, "volume.options.uid");
    }

    #[test]
    fn the_default_socket_is_meta_fuses_and_splits_into_directory_and_file() {
        let s = VolumeSpec::from_wire(&fuse(&[])).expect("valid");
        let crate::spec::Source::Fuse(f) = &s.source else {
            panic!("fuse expected");
        };
        assert_eq!(f.socket, super::DEFAULT_SOCKET);
        assert_eq!(f.socket_dir(), "/fuse-fd-passing");
        assert_eq!(f.socket_file(), "fuse-csi-ephemeral.sock");
        assert_eq!(super::MAX_SOCKET_FILE, 28);
    }
}
