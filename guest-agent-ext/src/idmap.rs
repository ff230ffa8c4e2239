//! NFSv4 owners in a guest without an idmapper. An NFSv4 server names a file's owner and
//! group as strings: numeric (`"1234"`, Linux knfsd's default for `sec=sys`, nfs-ganesha's for
//! ids it cannot name) or `user@domain` (ganesha for ids its host can name, such as root;
//! appliances). The guest kernel maps numeric strings itself; for a name it asks user space
//! through the `id_resolver` key type, which runs `/sbin/request-key` (hard-coded in the
//! kernel), and with nobody there every such file shows as 4294967294.
//!
//! `cnfs-agent` invoked as `request-key` answers those upcalls without a directory service:
//! `<digits>@domain` is that number, `root` is 0, `nobody`/`nogroup` are 65534, and other
//! names come from the guest's own /etc/passwd and /etc/group; anything else is refused
//! (negated for 10 minutes), so it shows as 4294967294 and `Stats` says why. Ownership is
//! right for numeric servers and for root; a server that names other users needs
//! `Only_Numeric_Owners = true` (ganesha) or numeric ids (knfsd: the default).

use std::path::Path;

/// The kernel's answer for an owner it could not map (`(u32)-2`).
pub const UNMAPPED_ID: u64 = 4_294_967_294;

const KEYCTL_DESCRIBE: libc::c_int = 6;
const KEYCTL_INSTANTIATE: libc::c_int = 12;
const KEYCTL_NEGATE: libc::c_int = 13;
const KEYCTL_ASSUME_AUTHORITY: libc::c_int = 16;
const NEGATIVE_TIMEOUT_S: libc::c_ulong = 600;

/// True when invoked as the kernel's key upcall helper.
pub fn invoked_as_request_key(argv0: &str) -> bool {
    Path::new(argv0)
        .file_name()
        .is_some_and(|n| n == "request-key")
}

/// The id for an `id_resolver` key description (`uid:<name>` or `gid:<name>`), or `None`.
pub fn resolve(description: &str, passwd: &str, group: &str) -> Option<u32> {
    let (kind, who) = description.split_once(':')?;
    let name = who.split_once('@').map_or(who, |(n, _)| n);
    if !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()) {
        return name.parse().ok();
    }
    let table = match kind {
        "uid" => passwd,
        "gid" => group,
        _ => return None,
    };
    let from_table = table.lines().find_map(|l| {
        let mut f = l.split(':');
        let (n, _, id) = (f.next()?, f.next()?, f.next()?);
        (n == name).then(|| id.parse().ok()).flatten()
    });
    from_table.or(match name {
        "root" => Some(0),
        "nobody" | "nogroup" => Some(65_534),
        _ => None,
    })
}

fn keyctl(
    op: libc::c_int,
    a: libc::c_ulong,
    b: libc::c_ulong,
    c: libc::c_ulong,
    d: libc::c_ulong,
) -> libc::c_long {
    // SAFETY: keyctl(2) with integer arguments; pointers passed in them are to live buffers
    // of the length given alongside (see the callers).
    unsafe { libc::syscall(libc::SYS_keyctl, op, a, b, c, d) }
}

/// The kernel runs the helper with no standard output: what it did goes to the kernel log.
fn kmsg(msg: &str) {
    use std::io::Write;
    // One write(2): /dev/kmsg makes a record of every write.
    if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open("/dev/kmsg") {
        let _ = f.write_all(format!("cnfs request-key: {msg}\n").as_bytes());
    }
}

/// `request-key <op> <key> <uid> <gid> <thread> <process> <session>`: instantiates or
/// negates the key; returns the process's exit status.
pub fn run(argv: &[String]) -> i32 {
    let (Some(op), Some(key)) = (argv.get(1), argv.get(2).and_then(|k| k.parse::<i32>().ok()))
    else {
        eprintln!("request-key: usage: request-key create <key> ...");
        return 2;
    };
    let key = key as libc::c_ulong;
    if op != "create" {
        return 1;
    }
    let mut buf = [0u8; 512];
    let n = keyctl(
        KEYCTL_DESCRIBE,
        key,
        buf.as_mut_ptr() as libc::c_ulong,
        buf.len() as libc::c_ulong,
        0,
    );
    let Some(desc) = usize::try_from(n)
        .ok()
        .and_then(|n| buf.get(..n.min(buf.len())))
        .map(|d| {
            String::from_utf8_lossy(d)
                .trim_end_matches('\0')
                .to_string()
        })
    else {
        kmsg(&format!(
            "describing key {key}: {}",
            std::io::Error::last_os_error()
        ));
        return 1;
    };
    // "type;uid;gid;perm;description"
    let mut parts = desc.splitn(5, ';');
    let (ty, description) = (
        parts.next().unwrap_or_default(),
        parts.nth(3).unwrap_or_default(),
    );
    // Instantiating or negating needs the authority the kernel left in our session keyring.
    // (It returns the authorization key's serial.)
    if keyctl(KEYCTL_ASSUME_AUTHORITY, key, 0, 0, 0) < 0 {
        kmsg(&format!(
            "assuming authority over {description}: {}",
            std::io::Error::last_os_error()
        ));
        return 1;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let id = (ty == "id_resolver")
        .then(|| resolve(description, &passwd, &group))
        .flatten();
    match id {
        Some(id) => {
            // As nfsidmap does: the decimal id with its NUL.
            let payload = format!("{id}\0");
            let rc = keyctl(
                KEYCTL_INSTANTIATE,
                key,
                payload.as_ptr() as libc::c_ulong,
                payload.len() as libc::c_ulong,
                0,
            );
            if rc != 0 {
                kmsg(&format!(
                    "instantiating {description}: {}",
                    std::io::Error::last_os_error()
                ));
            }
            i32::from(rc != 0)
        }
        None => {
            // Other key types reach the same helper (cifs asks for `cifs.spnego` keys when a
            // volume says sec=krb5, which the agent refuses up front): refused without an
            // NFS-owner message that would mislead whoever reads the kernel log.
            if ty == "id_resolver" {
                kmsg(&format!("{description}: not mapped (shown as 4294967294)"));
            } else {
                kmsg(&format!("{ty} key requested: not served by cnfs-agent"));
            }
            keyctl(KEYCTL_NEGATE, key, NEGATIVE_TIMEOUT_S, 0, 0);
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\ndaemon:x:1:1::/:/bin/false\n";
    const GROUP: &str = "root:x:0:\nstaff:x:50:\n";

    #[test]
    fn numeric_names_root_nobody_and_guest_users_map_and_others_do_not() {
        assert_eq!(resolve("uid:1234@localdomain", PASSWD, GROUP), Some(1234));
        assert_eq!(resolve("gid:1234", PASSWD, GROUP), Some(1234));
        assert_eq!(resolve("uid:root@example.com", PASSWD, GROUP), Some(0));
        assert_eq!(resolve("uid:root@example.com", "", ""), Some(0));
        assert_eq!(resolve("gid:staff@example.com", PASSWD, GROUP), Some(50));
        assert_eq!(resolve("uid:daemon@x", PASSWD, GROUP), Some(1));
        assert_eq!(resolve("uid:nobody@x", PASSWD, GROUP), Some(65_534));
        assert_eq!(resolve("uid:alice@example.com", PASSWD, GROUP), None);
        assert_eq!(
            resolve("uid:99999999999@x", PASSWD, GROUP),
            None,
            "not a u32"
        );
        assert_eq!(resolve("user:0", PASSWD, GROUP), Some(0));
        assert_eq!(resolve("bogus", PASSWD, GROUP), None);
        assert!(invoked_as_request_key("/sbin/request-key"));
        assert!(!invoked_as_request_key("/usr/bin/cnfs-agent"));
    }
}
