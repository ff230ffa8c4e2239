//! Host side of CNFS. `annotations` parses what pod authors write, `secrets` resolves key
//! references from a root-only directory, `handoff` adds the containers' bind mounts, and the
//! shim and `cnfsctl` binaries put them together with the `cnfs-host` crate (shared with
//! cnfs-csi): `cnfs_host::policy` decides what the cluster admin allows, `cnfs_host::kata`
//! finds a sandbox's guest.

pub mod annotations;
pub mod handoff;
pub mod secrets;
pub mod shim;
