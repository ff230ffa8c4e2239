//! Property tests for the volume spec validation both host and guest run: any wire spec is
//! either refused naming a field or accepted with invariants that keep the kernel's option
//! string and device name intact (no `,` `=` or blanks where they could bend them).

use cnfs_protocols::agent;
use cnfs_protocols::spec::{Source, VolumeSpec};
use proptest::prelude::*;

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9.:/\\[\\]-]{0,30}",
        "\\PC{0,30}",
        Just("10.0.0.5".to_string()),
        Just("fd00::5".to_string()),
        Just("/exports/a".to_string()),
        Just("4.1".to_string()),
    ]
}

fn option() -> impl Strategy<Value = (String, String)> {
    let keys = prop_oneof![
        Just("vers".to_string()),
        Just("nfsvers".to_string()),
        Just("proto".to_string()),
        Just("rsize".to_string()),
        Just("sec".to_string()),
        Just("ro".to_string()),
        Just("hard".to_string()),
        Just("ms_mode".to_string()),
        "[a-z_]{1,12}",
        "\\PC{0,12}",
    ];
    (keys, text())
}

fn wire() -> impl Strategy<Value = agent::VolumeSpec> {
    (
        "[a-z0-9-]{0,12}|\\PC{0,20}",
        any::<bool>(),
        any::<bool>(),
        text(),
        text(),
        text(),
        proptest::collection::vec(option(), 0..6),
        proptest::collection::vec(text(), 0..3),
    )
        .prop_map(|(name, ceph, ro, a, b, c, opts, mons)| {
            let mut w = agent::VolumeSpec {
                name,
                read_only: ro,
                options: opts.into_iter().collect(),
                ..Default::default()
            };
            if ceph {
                w.set_cephfs(agent::CephFsSource {
                    monitors: mons,
                    fs_name: a,
                    path: b,
                    client: c,
                    secret: "AQBZmhVnAAAAABAAnSPfp0VLPtO2ZUbWjaTYbA==".into(),
                    ..Default::default()
                });
            } else {
                w.set_nfs(agent::NfsSource {
                    server: a,
                    export: b,
                    version: c,
                    ..Default::default()
                });
            }
            w
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8000))]

    #[test]
    fn any_wire_spec_is_refused_by_field_or_accepted_clean(w in wire()) {
        match VolumeSpec::from_wire(&w) {
            Err(e) => {
                prop_assert!(e.field.starts_with("volume") || e.field == "name", "{}", e.field);
                prop_assert!(e.to_string().len() < 600);
            }
            Ok(s) => {
                for (k, v) in &s.options {
                    for c in [',', '=', ' ', '\n'] {
                        prop_assert!(!k.contains(c) && !v.contains(c), "{k}={v}");
                    }
                }
                if let Source::Nfs(n) = &s.source {
                    prop_assert!(n.export.starts_with('/') && !n.export.contains(','));
                    prop_assert!(!n.server.to_string().contains(','));
                }
                // The wire form of an accepted spec is accepted again, unchanged.
                let again = VolumeSpec::from_wire(&s.to_wire(true));
                prop_assert_eq!(again.as_ref().ok(), Some(&s));
            }
        }
    }
}
