//! cnfs-csi: Identity, Node and Controller services of a CSI driver whose node plugin never
//! mounts on the host: it records a hand-off the CNFS shim turns into a guest mount.

pub mod backend;
pub mod bounds;
pub mod capability;
pub mod client;
pub mod controller;
pub mod encryption;
pub mod identity;
pub mod node;
pub mod server;

/// The CSI v1 messages and services (`proto/csi.proto`), generated at build time.
pub mod csi {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("csi.v1");
}
