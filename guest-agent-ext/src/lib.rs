//! cnfs-agent: performs kernel mounts of network file systems inside a Kata guest on ttrpc
//! requests from the host. See `main.rs` for start-up; the modules are named for their job.

pub mod blockdev;
pub mod error;
pub mod fs;
pub mod gate;
pub mod idmap;
pub mod init;
pub mod killable;
pub mod kmod;
pub mod kmsg;
pub mod listen;
pub mod logging;
pub mod mountinfo;
pub mod privileges;
pub mod seccomp;
pub mod service;
pub mod tools;
pub mod volumes;
