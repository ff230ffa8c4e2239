//! Least privilege: after start-up the agent keeps only what mounting needs. CAP_SYS_ADMIN
//! for mount(2)/umount2(2); CAP_SYSLOG to read the kernel log records of its own failed
//! mounts (`kmsg.rs`: with `dmesg_restrict = 1` nothing else may); CAP_CHOWN to give a new
//! encrypted tree (gocryptfs) to the volume's owner before it is published, and back to root
//! to remove it when another guest published first; CAP_SYS_RESOURCE to grow a mounted ext4
//! into a grown encrypted container (ext4's resize ioctl asks for it); CAP_SYS_MODULE only when
//! the guest kernel loads modules (a kernel with the file systems built in has no
//! /proc/modules). Everything else is dropped
//! from every set, the bounding set included, so no child can regain it.

use caps::{CapSet, Capability, CapsHashSet};

pub fn keep_set() -> Vec<Capability> {
    let mut keep = vec![
        Capability::CAP_SYS_ADMIN,
        Capability::CAP_SYSLOG,
        Capability::CAP_CHOWN,
        Capability::CAP_SYS_RESOURCE,
    ];
    if std::path::Path::new("/proc/modules").exists() {
        keep.push(Capability::CAP_SYS_MODULE);
    }
    keep
}

/// Drops every capability outside `keep`; returns the names kept.
pub fn drop_all_but(keep: &[Capability]) -> Result<Vec<String>, caps::errors::CapsError> {
    let keep_set: CapsHashSet = keep.iter().copied().collect();
    for cap in caps::all() {
        if !keep_set.contains(&cap) && caps::has_cap(None, CapSet::Bounding, cap)? {
            caps::drop(None, CapSet::Bounding, cap)?;
        }
    }
    caps::clear(None, CapSet::Ambient)?;
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new())?;
    caps::set(None, CapSet::Effective, &keep_set)?;
    caps::set(None, CapSet::Permitted, &keep_set)?;
    let mut names: Vec<String> = keep.iter().map(|c| c.to_string()).collect();
    names.sort();
    Ok(names)
}
