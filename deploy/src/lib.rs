//! cnfs-deploy: installs CNFS on a node that runs Kata Containers under containerd, from a
//! privileged DaemonSet (as kata-deploy installs Kata), and takes it off again byte for byte.

pub mod containerd;
pub mod host;
pub mod install;
pub mod kata;
pub mod label;
pub mod ledger;
