//! What `ceph fs subvolume info` and `resize` print (`--format json`), read.

use serde_json::Value;

use super::subvolumes::SubvolumeInfo;

/// `fs subvolume info --format json`: `path` and `bytes_quota` (a number, or `"infinite"`).
pub(super) fn parse_info(out: &str) -> Result<SubvolumeInfo, String> {
    let v: Value =
        serde_json::from_str(out).map_err(|e| format!("unreadable `subvolume info`: {e}"))?;
    let path = v["path"]
        .as_str()
        .filter(|p| p.starts_with('/'))
        .ok_or("`subvolume info` has no absolute path")?
        .to_string();
    let bytes_quota = quota(&v["bytes_quota"]).ok_or("`subvolume info` has no bytes_quota")?;
    Ok(SubvolumeInfo { path, bytes_quota })
}

/// `fs subvolume resize --format json`: a list of one-key objects, one of them
/// `{"bytes_quota": N}`.
pub(super) fn parse_resize(out: &str) -> Result<Option<u64>, String> {
    let v: Value =
        serde_json::from_str(out).map_err(|e| format!("unreadable `subvolume resize`: {e}"))?;
    v.as_array()
        .and_then(|items| items.iter().find_map(|i| i.get("bytes_quota")))
        .and_then(quota)
        .ok_or_else(|| "`subvolume resize` printed no bytes_quota".to_string())
}

/// A quota value: `Some(None)` for no quota (`"infinite"`, or 0, which Ceph treats alike).
pub(super) fn quota(v: &Value) -> Option<Option<u64>> {
    match v {
        Value::String(s) if s == "infinite" => Some(None),
        Value::Number(n) => n.as_u64().map(|q| (q > 0).then_some(q)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_and_resize_output_is_parsed() {
        // As printed by Ceph 16.2.15 (shortened).
        let info = r#"{"atime": "2026-11-25 11:47:58", "bytes_pcent": "0.00", "bytes_quota": 20971520,
            "bytes_used": 0, "data_pool": "cephfs_data", "mode": 16895,
            "path": "/volumes/csi/v1/280ec0a5-f319-4c2d-846e-3362333857bc", "state": "complete",
            "type": "subvolume", "uid": 0}"#;
        assert_eq!(
            parse_info(info),
            Ok(SubvolumeInfo {
                path: "/volumes/csi/v1/280ec0a5-f319-4c2d-846e-3362333857bc".into(),
                bytes_quota: Some(20971520),
            })
        );
        let infinite = r#"{"bytes_quota": "infinite", "path": "/volumes/csi/v2/abc"}"#;
        assert_eq!(parse_info(infinite).map(|i| i.bytes_quota), Ok(None));
        for bad in [
            "",
            "[]",
            r#"{"bytes_quota": 1}"#,
            r#"{"bytes_quota": 1, "path": "relative"}"#,
            r#"{"bytes_quota": -1, "path": "/p"}"#,
            r#"{"bytes_quota": "lots", "path": "/p"}"#,
            r#"{"path": "/p"}"#,
        ] {
            assert!(parse_info(bad).is_err(), "{bad}");
        }
        let resize = r#"[{"bytes_used": 0}, {"bytes_quota": 30000000}, {"bytes_pcent": "0.00"}]"#;
        assert_eq!(parse_resize(resize), Ok(Some(30000000)));
        assert_eq!(parse_resize(r#"[{"bytes_quota": 0}]"#), Ok(None));
        assert!(parse_resize(r#"[{"bytes_used": 0}]"#).is_err());
        assert!(parse_resize("{}").is_err());
    }
}
