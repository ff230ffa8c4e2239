//! Property tests of the CSI hand-off files (`handoff.rs`), which the shim reads from a
//! directory the node plugin writes: any bytes or JSON in a record, secret or guest file are
//! answered without a panic, valid ones round-trip exactly, an oversized file is refused, and
//! a record's `volume_spec` names the field of whatever it refuses.

use std::path::PathBuf;

use cnfs_protocols::handoff::{
    self, GuestUse, HandoffDir, NodeSecret, Record, MAX_FILE, RECORD_VERSION,
};
use proptest::prelude::*;
use serde_json::{json, Value};

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A private hand-off directory on tmpfs when there is one (the product's own place).
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Self {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let d = base.join(format!("cnfs-prop-handoff-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        Dir(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn record_strategy() -> impl Strategy<Value = Record> {
    (
        (
            any::<String>(),
            prop_oneof![any::<String>(), "(/[a-z0-9~._-]{1,12}){1,6}"],
            prop_oneof![
                any::<String>(),
                Just("nfs://10.0.0.5/e?vers=4.1".to_string())
            ],
            any::<bool>(),
        ),
        (
            any::<String>(),
            any::<String>(),
            any::<String>(),
            any::<bool>(),
            any::<bool>(),
            proptest::collection::vec(any::<String>(), 0..4),
        ),
    )
        .prop_map(
            |((volume_id, target_path, source, read_only), (ns, name, uid, eph, sec, flags))| {
                Record {
                    version: RECORD_VERSION,
                    volume_id,
                    target_path,
                    source,
                    read_only,
                    pod_namespace: ns,
                    pod_name: name,
                    pod_uid: uid,
                    ephemeral: eph,
                    has_secret: sec,
                    mount_flags: flags,
                }
            },
        )
}

/// Arbitrary JSON, nested a few levels.
fn json_strategy() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            proptest::collection::btree_map(
                prop_oneof![
                    any::<String>(),
                    Just("version".to_string()),
                    Just("volume_id".to_string()),
                    Just("target_path".to_string()),
                    Just("source".to_string()),
                    Just("userKey".to_string()),
                    Just("sandbox_id".to_string()),
                ],
                inner,
                0..8
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A record in JSON with some of its fields replaced by arbitrary values.
fn mutated_record_json() -> impl Strategy<Value = Value> {
    (
        record_strategy(),
        proptest::collection::vec(
            (
                prop_oneof![
                    Just("version"),
                    Just("volume_id"),
                    Just("target_path"),
                    Just("read_only"),
                    Just("mount_flags"),
                    Just("has_secret"),
                ],
                json_strategy(),
            ),
            0..3,
        ),
    )
        .prop_map(|(r, changes)| {
            let mut v = serde_json::to_value(&r).expect("a record serializes");
            for (k, value) in changes {
                v[k] = value;
            }
            v
        })
}

const TARGET: &str = "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/pv/mount";

proptest! {
    #![proptest_config(config(1500))]

    #[test]
    fn any_bytes_in_hand_off_files_are_answered_without_a_panic(
        bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..512),
            json_strategy().prop_map(|v| serde_json::to_vec(&v).expect("json")),
            mutated_record_json().prop_map(|v| serde_json::to_vec(&v).expect("json")),
        ]
    ) {
        let dir = Dir::new("bytes");
        let h = HandoffDir::new(&dir.0);
        for path in [h.record_path(TARGET), h.secret_path(TARGET), h.guest_path(TARGET)] {
            std::fs::create_dir_all(path.parent().expect("parent"))?;
            std::fs::write(&path, &bytes)?;
        }
        match h.read_record(TARGET) {
            // Only a record for this very target is ever handed out.
            Ok(Some(r)) => prop_assert_eq!(r.target_path, TARGET),
            Ok(None) => {}
            Err(e) => prop_assert_eq!(e.kind(), std::io::ErrorKind::InvalidData),
        }
        let _ = h.read_secret(TARGET);
        let _ = h.read_guest(TARGET);
    }

    #[test]
    fn valid_records_secrets_and_guest_uses_round_trip_exactly(
        mut r in record_strategy(),
        key in any::<String>(),
        client in proptest::option::of(any::<String>()),
        sandbox in any::<String>(),
        volume in any::<String>(),
    ) {
        let dir = Dir::new("round");
        let h = HandoffDir::new(&dir.0);
        // The record's key is a hash of its target path: any path is a safe file name.
        r.target_path = format!("/{}", r.target_path);
        h.write_record(&r)?;
        prop_assert_eq!(h.read_record(&r.target_path)?, Some(r.clone()));
        let s = NodeSecret::from_pairs(
            client.iter().map(|c| ("userID", c.as_str())).chain([("userKey", key.as_str())]),
        );
        h.write_secret(&r.target_path, &s)?;
        prop_assert_eq!(h.read_secret(&r.target_path)?, Some(s));
        let g = GuestUse { sandbox_id: sandbox, volume };
        h.write_guest(&r.target_path, &g)?;
        prop_assert_eq!(h.read_guest(&r.target_path)?, Some(g));
        // Exactly the three files, no temp file left beside them.
        for sub in ["records", "secrets", "guests"] {
            let names: Vec<String> = std::fs::read_dir(dir.0.join(sub))?
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<Result<_, _>>()?;
            prop_assert_eq!(names, vec![format!("{}.json", handoff::key(&r.target_path))]);
        }
        h.remove(&r.target_path)?;
        prop_assert_eq!(h.read_record(&r.target_path)?, None);
        prop_assert_eq!(h.read_secret(&r.target_path)?, None);
    }

    #[test]
    fn a_records_volume_spec_never_panics_and_names_the_field_it_refuses(
        r in record_strategy(),
        secret in proptest::option::of((proptest::option::of("[a-z]{1,8}"),
            prop_oneof![any::<String>(), Just("AQBSdFhlAAAAABAAWmDqDUUxmRX4fcLsaFk2tg==".to_string())])),
    ) {
        let secret = secret.map(|(client, key): (Option<String>, String)| {
            NodeSecret::from_pairs(
                client.iter().map(|c| ("userID", c.as_str())).chain([("userKey", key.as_str())]),
            )
        });
        match r.volume_spec(secret.as_ref()) {
            Ok((spec, wire)) => {
                prop_assert_eq!(&spec.name, &handoff::guest_volume_name(&r.target_path));
                prop_assert!(spec.read_only || !r.read_only);
                prop_assert_eq!(wire.name, spec.name);
            }
            Err(e) => {
                let known = ["volume_context.source", "mount_flags", "secrets.userKey",
                    "secrets.userID"];
                prop_assert!(known.contains(&e.field.as_str()) || e.field.starts_with("volume."),
                    "unexpected field {:?}", e.field);
                prop_assert!(e.to_string().len() <= 1024, "{} byte error", e.to_string().len());
                if let Some(key) = secret.as_ref().and_then(|s| s.0.get("userKey")) {
                    if key.len() >= 8 {
                        prop_assert!(!e.to_string().contains(key.as_str()), "the key is echoed");
                    }
                }
            }
        }
    }
}

#[test]
fn regression_an_oversized_hand_off_file_is_refused_unread() {
    let dir = Dir::new("huge");
    let h = HandoffDir::new(&dir.0);
    let mut r = serde_json::to_value(Record {
        version: RECORD_VERSION,
        volume_id: "v".into(),
        target_path: TARGET.into(),
        source: "nfs://10.0.0.5/e".into(),
        read_only: false,
        pod_namespace: String::new(),
        pod_name: String::new(),
        pod_uid: String::new(),
        ephemeral: false,
        has_secret: false,
        mount_flags: vec![],
    })
    .expect("json");
    // A valid record, 4 MB long.
    r["pod_name"] = json!("p".repeat(4 << 20));
    std::fs::create_dir_all(h.record_path(TARGET).parent().expect("parent")).expect("dir");
    std::fs::write(h.record_path(TARGET), serde_json::to_vec(&r).expect("json")).expect("write");
    let e = h.read_record(TARGET).expect_err("oversized");
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    assert!(
        e.to_string()
            .contains(&format!("longer than {MAX_FILE} bytes")),
        "{e}"
    );
    // At the bound it is read.
    r["pod_name"] = json!("");
    let mut bytes = serde_json::to_vec(&r).expect("json");
    let pad = MAX_FILE as usize - bytes.len();
    bytes.extend(vec![b' '; pad]);
    std::fs::write(h.record_path(TARGET), &bytes).expect("write");
    assert!(h.read_record(TARGET).expect("at the bound").is_some());
}

#[test]
fn regression_a_huge_mount_flag_is_named_and_echoed_bounded() {
    let r = Record {
        version: RECORD_VERSION,
        volume_id: "v".into(),
        target_path: TARGET.into(),
        source: "nfs://10.0.0.5/e".into(),
        read_only: false,
        pod_namespace: String::new(),
        pod_name: String::new(),
        pod_uid: String::new(),
        ephemeral: false,
        has_secret: false,
        mount_flags: vec!["nconnect=4".into(), format!("{}=1", "k".repeat(4 << 20))],
    };
    let e = r.volume_spec(None).expect_err("refused");
    assert!(e.field.starts_with("volume.options.kkk"), "{e}");
    assert!(
        e.to_string().len() < 300,
        "{} byte error",
        e.to_string().len()
    );
    let r = Record {
        mount_flags: vec![format!("{}=1", "k".repeat(4 << 20)); 2],
        ..r
    };
    let e = r.volume_spec(None).expect_err("given twice");
    assert_eq!(e.field, "mount_flags");
    assert!(
        e.to_string().contains("(4194304 bytes)") && e.to_string().len() < 300,
        "{e}"
    );
}
