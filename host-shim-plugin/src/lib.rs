//! Host side of CNFS. `annotations` parses what pod authors write, `policy` decides what the
//! cluster admin allows, `secrets` resolves key references from a root-only directory,
//! `handoff` adds the containers' bind mounts, `kata` finds a sandbox's guest, and the shim
//! and `cnfsctl` binaries put them together.

pub mod annotations;
pub mod handoff;
pub mod kata;
pub mod policy;
pub mod secrets;
pub mod shim;
