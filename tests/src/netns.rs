//! A network namespace with a tap device and a private 10.x /24: the host side (the NFS
//! server) is .1, the guest .2. Traffic never leaves the namespace.

use std::process::Command;

use crate::process::run;
use crate::unique_id;

pub struct NetNs {
    pub name: String,
    pub tap: String,
    /// Server (namespace) address, e.g. 10.201.7.1.
    pub host_ip: String,
    /// Guest address, e.g. 10.201.7.2.
    pub guest_ip: String,
    /// An address on the subnet where nothing answers (for black-hole tests).
    pub void_ip: String,
}

impl NetNs {
    pub fn create() -> anyhow::Result<Self> {
        let id = unique_id();
        let name = format!("cnfs-t{id}");
        let net = format!("10.{}.{}", 100 + (id / 250) % 150, id % 250);
        let ns = NetNs {
            tap: "tap0".to_string(),
            host_ip: format!("{net}.1"),
            guest_ip: format!("{net}.2"),
            void_ip: format!("{net}.99"),
            name,
        };
        let _ = Command::new("ip").args(["netns", "del", &ns.name]).output();
        run(Command::new("ip").args(["netns", "add", &ns.name]))?;
        let cidr = format!("{}/24", ns.host_ip);
        let setup = [
            vec!["link", "set", "lo", "up"],
            vec!["tuntap", "add", "dev", &ns.tap, "mode", "tap"],
            vec!["addr", "add", &cidr, "dev", &ns.tap],
            vec!["link", "set", &ns.tap, "up"],
        ];
        for args in setup {
            run(Command::new("ip").arg("-n").arg(&ns.name).args(args))?;
        }
        Ok(ns)
    }

    /// A command that runs inside the namespace (`ip netns exec`, which also gives it a
    /// private mount namespace).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
