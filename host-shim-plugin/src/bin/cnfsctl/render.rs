//! What the agent answered, shown two ways: aligned tables and fields for people (agent text
//! with control characters escaped), or one JSON object per command with stable keys (see
//! `--help`). Never prints a secret.

use std::fmt::Write as _;

use cnfs_protocols::agent::{self, Health};
use cnfs_protocols::spec::{FieldValue, FsKind};
use cnfs_protocols::transport::AgentAddress;
use serde_json::{json, Value};

fn to_json(v: &Value) -> String {
    format!("{v}\n")
}

/// Aligned columns; the last column is not padded.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let last = row.len().saturating_sub(1);
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i == last {
                line.push_str(cell);
            } else {
                let w = widths.get(i).copied().unwrap_or(0);
                let _ = write!(line, "{cell:<w$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Key/value lines with aligned values.
fn fields(pairs: &[(&str, String)]) -> String {
    let w = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in pairs {
        let _ = writeln!(out, "{k:<w$}  {v}");
    }
    out
}

/// Text from the agent shown in a table: control characters escaped.
fn clean(s: &str) -> String {
    if s.chars().any(char::is_control) {
        s.chars().flat_map(char::escape_default).collect()
    } else {
        s.to_string()
    }
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        clean(s)
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        "-".into()
    } else {
        format!("{:.0}%", part as f64 * 100.0 / whole as f64)
    }
}

fn human_duration_ms(ms: u64) -> String {
    let s = ms / 1000;
    let (d, h, m, sec) = (s / 86_400, (s / 3600) % 24, (s / 60) % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{}.{:01}s", sec, (ms % 1000) / 100),
        (0, 0, _) => format!("{m}m {sec}s"),
        (0, _, _) => format!("{h}h {m}m {sec}s"),
        _ => format!("{d}d {h}h {m}m"),
    }
}

fn list_or_dash(items: &[String]) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items
            .iter()
            .map(|s| clean(s))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

pub(crate) fn render_ping(addr: &AgentAddress, p: &agent::PingResponse, json: bool) -> String {
    if json {
        return to_json(&json!({
            "agent": addr.to_string(),
            "version": p.version,
            "sandbox_id": p.sandbox_id,
            "filesystems": p.filesystems,
            "capabilities": p.capabilities,
            "encryption_modes": p.encryption_modes,
            "uptime_ms": p.uptime_ms,
            "volumes": p.volumes,
        }));
    }
    fields(&[
        ("agent", addr.to_string()),
        ("version", or_dash(&p.version)),
        ("sandbox", or_dash(&p.sandbox_id)),
        ("filesystems", list_or_dash(&p.filesystems)),
        ("capabilities", list_or_dash(&p.capabilities)),
        ("encryption", list_or_dash(&p.encryption_modes)),
        ("uptime", human_duration_ms(p.uptime_ms)),
        ("volumes", p.volumes.to_string()),
    ])
}

/// `server:/export` or `mon1,mon2:/path` from the spec (what was asked for).
/// `server:/export`, `mons:/path`, `//server/share/dir`: what was asked for.
fn spec_source(v: &agent::VolumeSpec) -> String {
    FsKind::summary(v)
        .map(|(_, shown, _)| shown)
        .unwrap_or_default()
}

fn spec_fs(v: &agent::VolumeSpec) -> &'static str {
    FsKind::of_wire(v).map_or("", |k| k.name())
}

/// An encrypted volume's mode, size and owner, never its key (the agent blanks it in List
/// as well).
fn encryption_json(v: &agent::VolumeSpec) -> Value {
    match v.encryption.as_ref() {
        Some(e) => json!({
            "mode": e.mode,
            "size_bytes": e.size_bytes,
            "uid": e.uid,
            "gid": e.gid,
        }),
        None => Value::Null,
    }
}

pub(crate) fn render_list(r: &agent::ListResponse, json: bool) -> String {
    if json {
        let volumes: Vec<Value> = r
            .volumes
            .iter()
            .map(|s| {
                let v = &s.volume;
                let options: serde_json::Map<String, Value> = {
                    let mut o: Vec<_> = v.options.iter().collect();
                    o.sort();
                    o.into_iter()
                        .map(|(k, val)| (k.clone(), Value::String(val.clone())))
                        .collect()
                };
                // One object per file system, `null` but for the volume's own; its fields
                // are the file system's (never a secret: the agent blanks them in List too).
                let summary = FsKind::summary(v);
                let mut out = json!({
                    "name": v.name,
                    "fs": spec_fs(v),
                    "fs_type": s.fs_type,
                    "state": s.state,
                    "source": spec_source(v),
                    "device": s.device,
                    "mount_point": s.mount_point,
                    "read_only": v.read_only,
                    "options": options,
                });
                for kind in FsKind::ALL {
                    let fields = match &summary {
                        Some((k, _, fields)) if k == kind => Value::Object(
                            fields
                                .iter()
                                .map(|(f, v)| {
                                    let v = match v {
                                        FieldValue::One(one) => json!(one),
                                        FieldValue::Many(many) => json!(many),
                                    };
                                    (f.to_string(), v)
                                })
                                .collect(),
                        ),
                        _ => Value::Null,
                    };
                    out[kind.name()] = fields;
                }
                out["encryption"] = encryption_json(v);
                out
            })
            .collect();
        return to_json(&json!({ "volumes": volumes }));
    }
    let rows: Vec<Vec<String>> = r
        .volumes
        .iter()
        .map(|s| {
            let v = &s.volume;
            let fs = if s.fs_type.is_empty() {
                spec_fs(v).to_string()
            } else {
                s.fs_type.clone()
            };
            let source = if s.device.is_empty() {
                spec_source(v)
            } else {
                s.device.clone()
            };
            let mut state = or_dash(&s.state);
            if v.read_only {
                state.push_str(",ro");
            }
            if let Some(e) = v.encryption.as_ref() {
                state.push(',');
                state.push_str(&clean(&e.mode));
            }
            vec![
                or_dash(&v.name),
                or_dash(&fs),
                state,
                or_dash(&source),
                or_dash(&s.mount_point),
            ]
        })
        .collect();
    table(&["NAME", "FS", "STATE", "SOURCE", "MOUNTPOINT"], &rows)
}

fn health_name(h: &protobuf::EnumOrUnknown<Health>) -> String {
    match h.enum_value() {
        Ok(Health::HEALTHY) => "healthy".into(),
        Ok(Health::UNRESPONSIVE) => "unresponsive".into(),
        Ok(Health::ERROR) => "error".into(),
        Ok(Health::NOT_MOUNTED) => "not mounted".into(),
        Ok(Health::NOT_READY) => "not ready".into(),
        Ok(Health::HEALTH_UNKNOWN) => "unknown".into(),
        Err(n) => format!("unknown({n})"),
    }
}

pub(crate) fn render_stats(name: &str, s: &agent::StatsResponse, json: bool) -> String {
    let used = s.total_bytes.saturating_sub(s.free_bytes);
    let used_inodes = s.total_inodes.saturating_sub(s.free_inodes);
    let health = health_name(&s.health);
    if json {
        return to_json(&json!({
            "name": name,
            "health": health,
            "health_detail": s.health_detail,
            "total_bytes": s.total_bytes,
            "used_bytes": used,
            "free_bytes": s.free_bytes,
            "available_bytes": s.available_bytes,
            "total_inodes": s.total_inodes,
            "used_inodes": used_inodes,
            "free_inodes": s.free_inodes,
            "probe_ms": s.probe_ms,
            "warnings": s.warnings,
        }));
    }
    let warnings = if s.warnings.is_empty() {
        "none".to_string()
    } else {
        s.warnings
            .iter()
            .map(|w| clean(w))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let health_text = if s.health_detail.is_empty() {
        health
    } else {
        format!("{health} ({})", clean(&s.health_detail))
    };
    fields(&[
        ("volume", clean(name)),
        ("health", health_text),
        ("size", human_bytes(s.total_bytes)),
        (
            "used",
            format!("{} ({})", human_bytes(used), percent(used, s.total_bytes)),
        ),
        ("available", human_bytes(s.available_bytes)),
        (
            "inodes",
            format!(
                "{used_inodes} used of {} ({}), {} free",
                s.total_inodes,
                percent(used_inodes, s.total_inodes),
                s.free_inodes
            ),
        ),
        ("probe", format!("{} ms", s.probe_ms)),
        ("warnings", warnings),
    ])
}

pub(crate) fn render_mount(name: &str, r: &agent::MountResponse, json: bool) -> String {
    if json {
        return to_json(&json!({
            "name": name,
            "mount_point": r.mount_point,
            "already_mounted": r.already_mounted,
            "duration_ms": r.duration_ms,
        }));
    }
    if r.already_mounted {
        format!(
            "{name} already mounted at {} (nothing done)\n",
            clean(&r.mount_point)
        )
    } else {
        format!(
            "mounted {name} at {} in {} ms\n",
            clean(&r.mount_point),
            r.duration_ms
        )
    }
}

pub(crate) fn render_unmount(name: &str, r: &agent::UnmountResponse, json: bool) -> String {
    if json {
        return to_json(&json!({
            "name": name,
            "method": r.method,
            "duration_ms": r.duration_ms,
            "attempts": r.attempts,
            "held_by": r.held_by,
        }));
    }
    let held = if r.held_by.is_empty() {
        "none".to_string()
    } else {
        r.held_by
            .iter()
            .map(|a| clean(a))
            .collect::<Vec<_>>()
            .join("; ")
    };
    fields(&[
        ("unmounted", clean(name)),
        ("still held by", held),
        ("method", or_dash(&r.method)),
        ("duration", format!("{} ms", r.duration_ms)),
        (
            "failed attempts",
            if r.attempts.is_empty() {
                "none".into()
            } else {
                r.attempts
                    .iter()
                    .map(|a| clean(a))
                    .collect::<Vec<_>>()
                    .join("; ")
            },
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_sizes_read_well() {
        let t = table(
            &["NAME", "FS", "STATE"],
            &[vec!["a".into(), "nfs4".into(), "mounted".into()]],
        );
        assert_eq!(t, "NAME  FS    STATE\na     nfs4  mounted\n");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(10 << 30), "10.0 GiB");
        assert_eq!(human_duration_ms(1500), "1.5s");
        assert_eq!(human_duration_ms(3_723_000), "1h 2m 3s");
        assert_eq!(percent(1, 0), "-");
    }

    #[test]
    fn a_listing_shows_encryption_but_never_a_key() {
        let mut v = agent::VolumeSpec {
            name: "sec".into(),
            ..Default::default()
        };
        v.set_nfs(agent::NfsSource {
            server: "10.0.0.5".into(),
            export: "/exports/sec".into(),
            version: "4.1".into(),
            ..Default::default()
        });
        // Even if a key came back, it is not shown.
        v.encryption = Some(agent::Encryption {
            mode: "luks2".into(),
            key: b"LeakedKeyBytes".to_vec(),
            size_bytes: 1 << 30,
            uid: 1000,
            gid: 100,
            ..Default::default()
        })
        .into();
        let r = agent::ListResponse {
            volumes: vec![agent::VolumeStatus {
                volume: Some(v).into(),
                state: "mounted".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let j: Value = serde_json::from_str(&render_list(&r, true)).expect("json");
        assert_eq!(
            j["volumes"][0]["encryption"],
            json!({"mode": "luks2", "size_bytes": 1u64 << 30, "uid": 1000, "gid": 100})
        );
        let t = render_list(&r, false);
        assert!(t.contains("mounted,luks2"), "{t}");
        for shown in [render_list(&r, true), t] {
            assert!(!shown.contains("LeakedKey"), "{shown}");
            // Nor as bytes: 76 = 'L', 101 = 'e'.
            assert!(!shown.contains("76, 101"), "{shown}");
        }
    }

    #[test]
    fn a_listing_shows_a_gocryptfs_volumes_mode_with_no_size_and_no_key() {
        let mut v = agent::VolumeSpec {
            name: "shared".into(),
            read_only: true,
            ..Default::default()
        };
        v.set_nfs(agent::NfsSource {
            server: "10.0.0.5".into(),
            export: "/exports/shared".into(),
            version: "3".into(),
            ..Default::default()
        });
        v.encryption = Some(agent::Encryption {
            mode: "gocryptfs".into(),
            key: b"LeakedKeyBytes".to_vec(),
            uid: 1000,
            gid: 100,
            ..Default::default()
        })
        .into();
        let r = agent::ListResponse {
            volumes: vec![agent::VolumeStatus {
                volume: Some(v).into(),
                state: "mounted".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let j: Value = serde_json::from_str(&render_list(&r, true)).expect("json");
        assert_eq!(
            j["volumes"][0]["encryption"],
            json!({"mode": "gocryptfs", "size_bytes": 0, "uid": 1000, "gid": 100})
        );
        let t = render_list(&r, false);
        assert!(t.contains("mounted,ro,gocryptfs"), "{t}");
        for shown in [render_list(&r, true), t] {
            assert!(!shown.contains("LeakedKey"), "{shown}");
        }
    }
}
