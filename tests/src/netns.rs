//! A network namespace with a tap device and a private 10.x /24: the host side (the NFS
//! server) is .1, the guest .2. Traffic never leaves the namespace.
//!
//! [`NetNs::create_with_guests`] makes room for several guests on the same servers: a bridge
//! `br0` holds the host address and taps `tap0..tapN-1` are its ports, guest `i` at `.{2+i}`
//! (guest 0 has the single-guest tap name and address).

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
    /// The device that holds `host_ip`: `tap` here, the bridge in a multi-guest namespace.
    pub host_dev: String,
    /// How many guests the namespace has taps for (1 unless made by `create_with_guests`).
    pub guests: usize,
}

/// One guest's place in a namespace: its tap, its address and (multi-guest only) the MAC
/// its virtio-net device must have (QEMU gives every guest the same default MAC, which a
/// bridge cannot tell apart).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestNet {
    pub tap: String,
    pub ip: String,
    pub mac: Option<String>,
}

/// Most guests a multi-guest namespace takes: their addresses (.2 up) stay below `void_ip`
/// (.99).
pub const MAX_GUESTS: usize = 64;

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
            host_dev: "tap0".to_string(),
            guests: 1,
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

    /// A namespace for `n` guests on the same servers: bridge `br0` with the host address,
    /// taps `tap0..tap{n-1}` as its ports (STP off, no forwarding delay: a port forwards as soon
    /// as QEMU opens its tap), guest `i` at `.{2+i}` (see [`NetNs::guest`]).
    pub fn create_with_guests(n: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(
            (1..=MAX_GUESTS).contains(&n),
            "guests: {n} is out of range 1..={MAX_GUESTS}"
        );
        let id = unique_id();
        let name = format!("cnfs-t{id}");
        let net = format!("10.{}.{}", 100 + (id / 250) % 150, id % 250);
        let ns = NetNs {
            tap: "tap0".to_string(),
            host_ip: format!("{net}.1"),
            guest_ip: format!("{net}.2"),
            void_ip: format!("{net}.99"),
            host_dev: "br0".to_string(),
            guests: n,
            name,
        };
        let _ = Command::new("ip").args(["netns", "del", &ns.name]).output();
        run(Command::new("ip").args(["netns", "add", &ns.name]))?;
        let cidr = format!("{}/24", ns.host_ip);
        let ip = |args: &[&str]| run(Command::new("ip").arg("-n").arg(&ns.name).args(args));
        ip(&["link", "set", "lo", "up"])?;
        ip(&["link", "add", "br0", "type", "bridge", "stp_state", "0"])?;
        ip(&["link", "set", "br0", "type", "bridge", "forward_delay", "0"])?;
        ip(&["addr", "add", &cidr, "dev", "br0"])?;
        ip(&["link", "set", "br0", "up"])?;
        for i in 0..n {
            let tap = ns.guest(i).tap;
            ip(&["tuntap", "add", "dev", &tap, "mode", "tap"])?;
            ip(&["link", "set", &tap, "master", "br0"])?;
            ip(&["link", "set", &tap, "up"])?;
        }
        Ok(ns)
    }

    /// Guest `i`'s tap, address and MAC. Guest 0 is `tap`/`guest_ip`; a single-guest
    /// namespace leaves the MAC to QEMU, as it always has.
    pub fn guest(&self, i: usize) -> GuestNet {
        let net = self
            .host_ip
            .rsplit_once('.')
            .map(|(net, _)| net)
            .unwrap_or_default();
        GuestNet {
            tap: format!("tap{i}"),
            ip: format!("{net}.{}", 2 + i),
            // QEMU's prefix, unique per guest within the namespace.
            mac: (self.guests > 1).then(|| format!("52:54:00:c0:00:{:02x}", i % 256)),
        }
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
