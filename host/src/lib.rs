//! Host side of CNFS shared by the wrapper shim, `cnfsctl` and `cnfs-csi`: `kata` finds a
//! sandbox's guest through its Kata shim and reaches CNFS's agent there, `policy` decides what
//! the cluster admin allows. Nothing here depends on the shim, so the CSI driver can use it.

pub mod kata;
pub mod policy;
