//! Every name, address, key and size is checked before it can reach a `ceph` command line.

use crate::backend::BackendError;

use super::subvolumes::CephCluster;

/// Longest name (file system, group, subvolume, client id) accepted.
pub(super) const NAME_MAX: usize = 100;

/// Largest quota Ceph accepts (it parses sizes as signed 64-bit).
pub(super) const SIZE_MAX: u64 = i64::MAX as u64;

/// Names go on the `ceph` command line, so only a plain set of characters, and never a
/// leading `-` (an option) or `.` (hidden, `..`).
pub(super) fn check_name(field: &str, name: &str) -> Result<(), BackendError> {
    let why = if name.is_empty() {
        "is empty".to_string()
    } else if name.len() > NAME_MAX {
        format!("is longer than {NAME_MAX} bytes")
    } else if name.starts_with('-') || name.starts_with('.') {
        "starts with '-' or '.'".to_string()
    } else if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        format!("contains {c:?} (allowed: A-Z a-z 0-9 . _ -)")
    } else {
        return Ok(());
    };
    Err(BackendError::Invalid(format!(
        "{field} {} {why}",
        crate::bounds::echo(name)
    )))
}

/// Monitors go into `-m` (comma-joined) and the fsid is compared: check both.
pub(super) fn check_cluster(cluster: &CephCluster) -> Result<(), BackendError> {
    if cluster.monitors.is_empty() {
        return Err(BackendError::Invalid("no Ceph monitors given".to_string()));
    }
    for m in &cluster.monitors {
        let ok = !m.is_empty()
            && m.len() <= 256
            && !m.starts_with('-')
            && m.chars().all(|c| {
                c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '[' | ']' | '-' | '_')
            });
        if !ok {
            return Err(BackendError::Invalid(format!(
                "monitor address {m:?} is not host:port (allowed: A-Z a-z 0-9 . : [ ] - _)"
            )));
        }
    }
    if let Some(fsid) = &cluster.fsid {
        if !is_uuid(fsid) {
            return Err(BackendError::Invalid(format!(
                "fsid {fsid:?} is not a UUID"
            )));
        }
    }
    Ok(())
}

pub(super) fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Base64 shape only (alphabet, padding, length); whether Ceph can decode it is Ceph's call.
/// The reason never quotes the key.
pub(super) fn check_key_shape(key: &str) -> Result<(), &'static str> {
    if key.len() < 16 || key.len() > 256 {
        return Err("wrong length");
    }
    if !key.len().is_multiple_of(4) {
        return Err("length is not a multiple of 4");
    }
    let body = key.trim_end_matches('=');
    if key.len() - body.len() > 2 {
        return Err("too much '=' padding");
    }
    if !body
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
    {
        return Err("characters outside the base64 alphabet");
    }
    Ok(())
}

pub(super) fn check_size(size: u64) -> Result<(), BackendError> {
    if size == 0 || size > SIZE_MAX {
        return Err(BackendError::Invalid(format!(
            "size {size} is out of range: 1 to {SIZE_MAX} bytes (no size at all means no quota)"
        )));
    }
    Ok(())
}

pub(super) fn show_quota(q: Option<u64>) -> String {
    q.map_or_else(|| "none".to_string(), |b| format!("{b} bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cephfs::{CephCredentials, Subvolumes};

    /// The shape of a real cephx key (not one of any cluster).
    const KEY: &str = "AQC5ygZr0XC1MRAAw+DVI46MO/nuqITDNz+buQ==";

    fn cluster() -> CephCluster {
        CephCluster {
            monitors: vec!["127.0.0.1:3300".into()],
            fsid: None,
        }
    }

    #[test]
    fn names_are_checked_and_the_error_names_the_field() {
        for ok in ["a", "pvc-0f3e", "csi_vols", "A.b-c_9", &"x".repeat(100)] {
            assert!(check_name("subvolume name", ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("", "is empty"),
            (&"x".repeat(101), "longer than 100"),
            ("-rf", "starts with"),
            (".hidden", "starts with"),
            ("..", "starts with"),
            ("a b", "contains ' '"),
            ("a/b", "contains '/'"),
            ("a;b", "contains ';'"),
            ("é", "contains 'é'"),
            ("a\nb", "contains '\\n'"),
        ] {
            match check_name("subvolume group", bad) {
                Err(BackendError::Invalid(m)) => {
                    assert!(m.starts_with("subvolume group"), "{m}");
                    assert!(m.contains(why), "{bad:?}: {m}");
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        let creds = CephCredentials::new("admin", KEY).expect("valid");
        let c = cluster();
        for (fs, group, field) in [
            ("", "csi", "file system name"),
            ("cephfs", "-g", "subvolume group"),
        ] {
            match Subvolumes::new(&c, &creds, fs, group) {
                Err(BackendError::Invalid(m)) => assert!(m.starts_with(field), "{m}"),
                other => panic!("{other:?}"),
            }
        }
        match CephCredentials::new("client admin", KEY) {
            Err(BackendError::Invalid(m)) => assert!(m.starts_with("client id"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn cluster_addresses_fsid_and_sizes_are_checked() {
        let creds = CephCredentials::new("admin", KEY).expect("valid");
        let ok = CephCluster {
            monitors: vec![
                "10.0.0.1:3300".into(),
                "[fd00::1]:6789".into(),
                "v2:mon-a.example:3300".into(),
            ],
            fsid: Some("799f38ef-bbf1-4fd9-8b6b-5f66e8c272e8".into()),
        };
        assert!(Subvolumes::new(&ok, &creds, "cephfs", "csi").is_ok());
        for (monitors, fsid) in [
            (vec![], None),
            (vec!["".to_string()], None),
            (vec!["10.0.0.1:3300,10.0.0.2:3300".to_string()], None),
            (vec!["10.0.0.1 3300".to_string()], None),
            (vec!["--keyfile=/etc/shadow".to_string()], None),
            (
                vec!["10.0.0.1:3300".to_string()],
                Some("not-a-uuid".to_string()),
            ),
            (
                vec!["10.0.0.1:3300".to_string()],
                Some("799f38ef-bbf1-4fd9-8b6b-5f66e8c272e".to_string()),
            ),
        ] {
            let c = CephCluster { monitors, fsid };
            assert!(
                matches!(
                    Subvolumes::new(&c, &creds, "cephfs", "csi"),
                    Err(BackendError::Invalid(_))
                ),
                "{c:?} accepted"
            );
        }
        assert!(check_size(1).is_ok() && check_size(i64::MAX as u64).is_ok());
        assert!(matches!(check_size(0), Err(BackendError::Invalid(_))));
        assert!(matches!(
            check_size(i64::MAX as u64 + 1),
            Err(BackendError::Invalid(_))
        ));
    }
}
