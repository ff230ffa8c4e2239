//! Property tests of the annotation parser (`annotations::parse`), which reads tenant input:
//! any annotation map is answered without a panic, an accepted set satisfies every invariant
//! the shim relies on, a refusal names one of the annotations it was given and stays short,
//! and oversized input is refused.

use std::collections::{BTreeSet, HashMap};

use cnfs_host_shim::annotations::{self, PREFIX};
use cnfs_protocols::spec;
use proptest::prelude::*;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Volume names from a small pool, so that volume, mount and containers annotations meet.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop_oneof![Just("data"), Just("logs"), Just("a"), Just("x-1")].prop_map(String::from),
        1 => "[a-zA-Z0-9._-]{0,70}",
        1 => any::<String>(),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => (prop_oneof![Just("volume"), Just("mount"), Just("containers")], name())
            .prop_map(|(kind, n)| format!("{PREFIX}{kind}.{n}")),
        1 => any::<String>().prop_map(|s| format!("{PREFIX}{s}")),
        1 => any::<String>(),
        1 => Just("io.kubernetes.cri.sandbox-id".to_string()),
    ]
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        // Volume URLs, good and bad.
        3 => prop_oneof![
            Just("nfs://10.0.0.5/exports/a?vers=4.1&nconnect=4"),
            Just("nfs://[fd00::5]:2049/logs?ro"),
            Just("cephfs://10.0.0.1:6789,10.0.0.2:6789/sub?fs=a&client=app&secret=s"),
            Just("cephfs://10.0.0.1:6789/?fs=a&client=b"),
            Just("nfs://user@10.0.0.5/x"),
            Just("nfs://10.0.0.5/x?addr=1.2.3.4"),
            Just("nfs://[host]/x"),
        ]
        .prop_map(String::from),
        2 => "nfs://[a-z0-9.:\\[\\]]{1,20}(/[a-z0-9.]{0,8}){0,3}(\\?[a-z=&0-9.]{0,20})?",
        // Container paths, good and bad.
        3 => prop_oneof![
            Just("/data"),
            Just("/var/log/shared/"),
            Just("/"),
            Just("/proc/self"),
            Just("/dev"),
            Just("relative"),
            Just("/a/../etc"),
        ]
        .prop_map(String::from),
        2 => "(/[a-z0-9._-]{0,8}){1,4}",
        // Container lists.
        2 => "[a-z0-9-]{1,8}(, ?[a-zA-Z0-9-]{0,8}){0,3}",
        1 => any::<String>(),
        // Oversized.
        1 => (2040usize..2100).prop_map(|n| format!("/{}", "d".repeat(n))),
    ]
}

fn annotation_map() -> impl Strategy<Value = HashMap<String, String>> {
    proptest::collection::hash_map(key(), value(), 0..24)
}

/// Every volume of a complete, valid pod (so accepted sets are generated often).
fn valid_pod() -> impl Strategy<Value = HashMap<String, String>> {
    proptest::collection::btree_set("[a-z][a-z0-9-]{0,10}[a-z0-9]", 1..=16).prop_map(|names| {
        let mut m = HashMap::new();
        for (i, n) in names.iter().enumerate() {
            m.insert(
                format!("{PREFIX}volume.{n}"),
                format!("nfs://10.0.0.{}/exports/{n}?vers=4.1", i + 1),
            );
            m.insert(format!("{PREFIX}mount.{n}"), format!("/mnt/{n}"));
            if i % 3 == 0 {
                m.insert(format!("{PREFIX}containers.{n}"), "app, worker".into());
            }
        }
        m
    })
}

fn check(a: &HashMap<String, String>) -> Result<(), TestCaseError> {
    match annotations::parse(a) {
        Ok(volumes) => {
            prop_assert!(volumes.len() <= 16);
            let names: Vec<&str> = volumes.iter().map(|v| v.name()).collect();
            let mut sorted = names.clone();
            sorted.sort_unstable();
            sorted.dedup();
            prop_assert_eq!(&sorted, &names, "sorted by name, each once");
            let mut paths = BTreeSet::new();
            for v in &volumes {
                spec::validate_name("name", v.name())
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let (volume_key, mount_key) = (
                    format!("{PREFIX}volume.{}", v.name()),
                    format!("{PREFIX}mount.{}", v.name()),
                );
                prop_assert!(a.contains_key(&volume_key) && a.contains_key(&mount_key));
                prop_assert!(v.path.starts_with('/') && v.path != "/");
                prop_assert!(!v.path.ends_with('/') && !v.path.contains("//"));
                prop_assert!(!v.path.split('/').any(|s| s == "." || s == ".."));
                for system in ["/proc", "/sys", "/dev"] {
                    let under = v.path == system || v.path.starts_with(&format!("{system}/"));
                    prop_assert!(!under, "{} is under {}", v.path, system);
                }
                prop_assert!(paths.insert(v.path.clone()), "two volumes on {}", v.path);
                if let Some(list) = &v.containers {
                    for c in list {
                        spec::validate_name("c", c)
                            .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    }
                }
                if v.secret_ref.is_some() {
                    prop_assert_eq!(v.spec.fs_name(), "cephfs");
                }
            }
        }
        Err(e) => {
            // A refusal names one of the given annotations (or the volume set as a whole).
            prop_assert!(
                a.contains_key(&e.annotation)
                    || e.annotation == format!("{PREFIX}volume.*")
                    || (e.annotation.ends_with("...") && e.reason.contains("longer than")),
                "unknown annotation {:?}",
                e.annotation
            );
            prop_assert!(!e.reason.is_empty());
            let shown = e.to_string();
            prop_assert!(shown.len() <= 2048, "{} byte error", shown.len());
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn any_annotation_map_is_answered_and_accepted_sets_keep_every_invariant(
        a in annotation_map()
    ) {
        check(&a)?;
    }

    #[test]
    fn valid_pods_are_accepted_with_one_volume_per_name(a in valid_pod()) {
        let volumes = annotations::parse(&a).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(volumes.len() * 2 + volumes.iter().filter(|v| v.containers.is_some()).count(), a.len());
        check(&a)?;
    }

    #[test]
    fn a_seventeenth_volume_is_refused(mut a in valid_pod(), extra in "[a-z]{20}") {
        let n = a.keys().filter(|k| k.starts_with("cnfs.io/volume.")).count();
        for i in n..17 {
            a.insert(format!("{PREFIX}volume.{extra}{i}"), "nfs://10.0.0.1/x".into());
            a.insert(format!("{PREFIX}mount.{extra}{i}"), format!("/{extra}{i}"));
        }
        let e = annotations::parse(&a).expect_err("17 volumes");
        prop_assert_eq!(e.annotation, format!("{PREFIX}volume.*"));
    }

    #[test]
    fn oversized_values_and_keys_are_refused_with_a_short_error(
        len in 2049usize..100_000,
        kind in prop_oneof![Just("volume"), Just("mount"), Just("containers")],
        in_key in any::<bool>(),
    ) {
        let big = "x".repeat(len);
        let a = if in_key {
            HashMap::from([(format!("{PREFIX}{kind}.{big}"), "/d".to_string())])
        } else {
            HashMap::from([(format!("{PREFIX}{kind}.d"), big)])
        };
        let e = annotations::parse(&a).expect_err("oversized");
        prop_assert!(e.reason.contains("longer than"), "{}", e.reason);
        prop_assert!(e.to_string().len() < 300, "{} byte error", e.to_string().len());
    }
}

#[test]
fn regression_four_megabyte_annotations_are_refused_quickly() {
    let start = std::time::Instant::now();
    let huge = "v".repeat(4 << 20);
    for a in [
        HashMap::from([(format!("{PREFIX}volume.{huge}"), "nfs://h/x".to_string())]),
        HashMap::from([(format!("{PREFIX}volume.d"), format!("nfs://h/{huge}"))]),
        HashMap::from([
            (format!("{PREFIX}volume.d"), "nfs://10.0.0.1/x".to_string()),
            (format!("{PREFIX}mount.d"), "/d".to_string()),
            (format!("{PREFIX}containers.d"), huge.clone()),
        ]),
    ] {
        let e = annotations::parse(&a).expect_err("huge");
        assert!(
            e.to_string().len() < 300,
            "{} byte error",
            e.to_string().len()
        );
    }
    assert!(start.elapsed() < std::time::Duration::from_secs(5));
}
