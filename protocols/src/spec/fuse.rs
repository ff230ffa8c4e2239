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
    // processes of that user reach the files. 4294967295 is "no id" to the kernel.
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

pub(super) fn parse(f: &agent::FuseSource) -> Result<FuseSource, SpecError> {
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
