//! Property tests of `NodePublishVolume` validation (`node::validate_publish`), which reads
//! what kubelet (and, for inline volumes, a pod's author) sends: any request is answered
//! without a panic; an accepted one satisfies every bound and shape the hand-off relies on;
//! a refused one is `INVALID_ARGUMENT` naming a known field, in a short message that never
//! carries the key.

use std::collections::HashMap;

use cnfs_csi::bounds::{MAX_MAP, MAX_PATH, MAX_PATH_COMPONENT, MAX_STRING};
use cnfs_csi::csi::volume_capability::access_mode::Mode;
use cnfs_csi::csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use cnfs_csi::csi::{NodePublishVolumeRequest, VolumeCapability};
use cnfs_csi::node::validate_publish;
use cnfs_protocols::handoff;
use proptest::prelude::*;
use tonic::Code;

const KEY: &str = "AQBSdFhlAAAAABAAWmDqDUUxmRX4fcLsaFk2tg==";

/// The fields a refusal may name (their first word in the message).
const FIELDS: &[&str] = &[
    "volume_id",
    "target_path",
    "volume_capability",
    "volume_context",
    "secrets",
    "mount_flags",
    "volume.",
];

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn sized(ok: &'static str) -> impl Strategy<Value = String> {
    prop_oneof![
        20 => ok,
        1 => any::<String>(),
        1 => (120usize..140).prop_map(|n| "v".repeat(n)),
        1 => (4000usize..5000).prop_map(|n| "w".repeat(n)),
    ]
}

fn target() -> impl Strategy<Value = String> {
    prop_oneof![
        20 => "/var/lib/kubelet/pods/[0-9a-f-]{8,36}/volumes/kubernetes.io~csi/pvc-[a-z0-9-]{1,20}/mount",
        1 => any::<String>(),
        1 => "(/[a-z.]{0,3}){1,6}",
        1 => (250usize..260).prop_map(|n| format!("/kubelet/{}", "c".repeat(n))),
        1 => (4080usize..4110).prop_map(|n| format!("/{}", "p/".repeat(n / 2))),
    ]
}

fn capability() -> impl Strategy<Value = Option<VolumeCapability>> {
    let flags = prop_oneof![
        8 => proptest::collection::vec(
            prop_oneof![
                Just("nconnect=4".to_string()),
                Just("ro".to_string()),
                Just("noatime".to_string()),
                Just("nosuid".to_string()),
            ],
            0..3,
        ),
        2 => proptest::collection::vec(
            prop_oneof![
                Just("rsize=65536".to_string()),
                Just("addr=10.9.9.9".to_string()),
                "[a-z]{1,10}(=[0-9a-z]{0,6})?",
            ],
            0..4,
        ),
        1 => proptest::collection::vec(any::<String>(), 0..3),
        1 => (100usize..600).prop_map(|n| vec!["noatime".to_string(); n]),
    ];
    let access = prop_oneof![
        8 => (
            prop_oneof![Just(""), Just("nfs"), Just("nfs4"), Just("ceph"), Just("xfs")],
            flags,
            prop_oneof![9 => Just(String::new()), 1 => any::<String>()],
        )
            .prop_map(|(fs, mount_flags, group)| {
                Some(AccessType::Mount(MountVolume {
                    fs_type: fs.to_string(),
                    mount_flags,
                    volume_mount_group: group,
                }))
            }),
        1 => Just(Some(AccessType::Block(BlockVolume {}))),
        1 => Just(None),
    ];
    let mode = prop_oneof![
        8 => (1i32..=7).prop_map(|m| Some(AccessMode { mode: m })),
        1 => any::<i32>().prop_map(|m| Some(AccessMode { mode: m })),
        1 => Just(None),
    ];
    prop_oneof![
        9 => (access, mode).prop_map(|(access_type, access_mode)| Some(VolumeCapability {
            access_type,
            access_mode,
        })),
        1 => Just(None),
    ]
}

fn source() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop_oneof![
            Just("nfs://10.0.0.5/exports/a?vers=4.1"),
            Just("nfs://[fd00::5]:2049/exports/b?vers=3&proto=tcp6"),
            Just("nfs://nfs.example.com/exports/c"),
            Just("cephfs://10.0.0.7:6789/volumes/csi/v1?fs=cephfs"),
            Just("cephfs://10.0.0.7:6789/v?fs=cephfs&client=app"),
            Just("nfs://10.0.0.5/exports/e?vers=4.1&encryption=luks2&size=134217728"),
            Just("nfs://10.0.0.5/exports/e?encryption=luks2&size=1Gi&owner=1000:1000"),
        ]
        .prop_map(String::from),
        2 => prop_oneof![
            Just("nfs://10.0.0.5/exports/a?secret=x"),
            Just("nfs://u@10.0.0.5/x"),
            Just("smb://h/x"),
        ]
        .prop_map(String::from),
        2 => "(nfs|cephfs)://[a-z0-9.:,\\[\\]]{1,24}(/[a-zA-Z0-9._-]{0,10}){0,4}(\\?[a-z0-9=&._-]{0,30})?",
        1 => any::<String>(),
        1 => (4090usize..4200).prop_map(|n| format!("nfs://10.0.0.5/{}", "e".repeat(n))),
    ]
}

fn context() -> impl Strategy<Value = HashMap<String, String>> {
    let extra = proptest::collection::hash_map(
        prop_oneof![
            3 => Just("csi.storage.k8s.io/pod.namespace".to_string()),
            3 => Just("csi.storage.k8s.io/pod.name".to_string()),
            3 => Just("csi.storage.k8s.io/pod.uid".to_string()),
            3 => Just("csi.storage.k8s.io/ephemeral".to_string()),
            3 => Just("csi.storage.k8s.io/serviceAccount.name".to_string()),
            3 => Just("storage.kubernetes.io/csiProvisionerIdentity".to_string()),
            // Inline volumes' encryption attributes.
            1 => Just("encryption".to_string()),
            1 => Just("size".to_string()),
            1 => Just("server".to_string()),
            1 => any::<String>(),
        ],
        prop_oneof![
            8 => "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?",
            2 => "[a-z0-9]([a-z0-9.-]{0,20}[a-z0-9])?",
            1 => Just("true".to_string()),
            1 => Just("false".to_string()),
            1 => Just("luks2".to_string()),
            1 => Just("256Mi".to_string()),
            1 => any::<String>(),
        ],
        0..5,
    );
    (proptest::option::weighted(0.9, source()), extra).prop_map(|(source, mut m)| {
        if let Some(s) = source {
            m.insert("source".into(), s);
        }
        m
    })
}

fn secrets() -> impl Strategy<Value = HashMap<String, String>> {
    prop_oneof![
        3 => Just(HashMap::new()),
        3 => Just(HashMap::from([
            ("userID".to_string(), "app".to_string()),
            ("userKey".to_string(), KEY.to_string()),
        ])),
        1 => Just(HashMap::from([("userKey".to_string(), KEY.to_string())])),
        2 => Just(HashMap::from([("encryptionKey".to_string(), KEY.to_string())])),
        2 => proptest::collection::hash_map(
            prop_oneof![Just("userID".to_string()), Just("userKey".to_string()), any::<String>()],
            any::<String>(),
            0..3,
        ),
        1 => (4090usize..4200).prop_map(|n| HashMap::from([("userKey".to_string(), "k".repeat(n))])),
    ]
}

fn request() -> impl Strategy<Value = NodePublishVolumeRequest> {
    (
        sized("[a-z0-9#._-]{1,40}"),
        target(),
        capability(),
        any::<bool>(),
        context(),
        secrets(),
        any::<String>(),
    )
        .prop_map(
            |(
                volume_id,
                target_path,
                volume_capability,
                readonly,
                volume_context,
                secrets,
                staging,
            )| {
                NodePublishVolumeRequest {
                    volume_id,
                    target_path,
                    volume_capability,
                    readonly,
                    volume_context,
                    secrets,
                    staging_target_path: staging,
                    ..Default::default()
                }
            },
        )
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn check(req: &NodePublishVolumeRequest) -> Result<bool, TestCaseError> {
    match validate_publish(req) {
        Ok(p) => {
            let r = &p.record;
            // CSI's limits and the shapes the shim relies on.
            prop_assert!(!r.volume_id.is_empty() && r.volume_id.len() <= MAX_STRING);
            prop_assert!(!r.volume_id.chars().any(char::is_control));
            prop_assert_eq!(&p.target, &req.target_path);
            prop_assert_eq!(&r.target_path, &p.target);
            prop_assert!(p.target.starts_with('/') && p.target.len() <= MAX_PATH);
            prop_assert!(!p
                .target
                .split('/')
                .any(|c| c == ".." || c.len() > MAX_PATH_COMPONENT));
            prop_assert!(!p.target.chars().any(char::is_control));
            let ctx: usize = req
                .volume_context
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum();
            prop_assert!(ctx <= MAX_MAP);
            prop_assert!(r.source.len() <= MAX_MAP);
            prop_assert!(r.mount_flags.iter().all(|f| f.len() <= MAX_STRING));
            prop_assert!(r.mount_flags.iter().map(String::len).sum::<usize>() <= 4096);
            prop_assert!(r.pod_namespace.is_empty() || is_dns_label(&r.pod_namespace));
            prop_assert!(
                r.pod_name.is_empty()
                    || (r.pod_name.len() <= 253 && r.pod_name.split('.').all(is_dns_label))
            );
            prop_assert!(r
                .pod_uid
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-'));
            prop_assert!(r.read_only || !req.readonly);
            // The record alone rebuilds a valid volume (what the shim does), and a key goes
            // with it exactly when the volume is CephFS or encrypted.
            let (spec, _) = r
                .volume_spec(p.secret.as_ref())
                .map_err(|e| TestCaseError::fail(format!("accepted, then refused: {e}")))?;
            prop_assert_eq!(
                r.has_secret,
                spec.fs_name() == "cephfs" || spec.encryption.is_some()
            );
            // An encrypted volume is never published for several nodes.
            if spec.encryption.is_some() {
                let mode = req
                    .volume_capability
                    .as_ref()
                    .and_then(|c| c.access_mode.as_ref())
                    .map(|m| m.mode);
                prop_assert!(
                    !matches!(mode, Some(3..=5)),
                    "encrypted volume published in multi-node mode {:?}",
                    mode
                );
            }
            prop_assert!(!r.has_secret || p.secret.is_some());
            prop_assert_eq!(spec.name, handoff::guest_volume_name(&p.target));
            // No key in the record.
            let json = serde_json::to_string(r).expect("json");
            prop_assert!(!json.contains(KEY));
            Ok(true)
        }
        Err(e) => {
            prop_assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
            let m = e.message();
            prop_assert!(
                FIELDS.iter().any(|f| m.starts_with(f)),
                "no known field in {:?}",
                &m[..m.len().min(200)]
            );
            prop_assert!(m.len() <= 1024, "{} byte message", m.len());
            for v in req.secrets.values().filter(|v| v.len() >= 8) {
                prop_assert!(!m.contains(v.as_str()), "a secret value is echoed");
            }
            Ok(false)
        }
    }
}

proptest! {
    #![proptest_config(config(6000))]

    #[test]
    fn any_publish_request_is_answered_and_accepted_ones_keep_every_invariant(
        req in request()
    ) {
        check(&req)?;
    }
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn kubelet_shaped_requests_are_accepted(
        pod in "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
        pv in "pvc-[0-9a-f]{8}-[0-9a-f]{4}",
        ns in "[a-z]([a-z0-9-]{0,30}[a-z0-9])?",
        name in "[a-z]([a-z0-9-]{0,20}[a-z0-9])?(\\.[a-z0-9]{1,5}){0,2}",
        mode in prop_oneof![Just(Mode::SingleNodeWriter), Just(Mode::MultiNodeMultiWriter),
            Just(Mode::MultiNodeReaderOnly)],
        cephfs in any::<bool>(),
        ephemeral in any::<bool>(),
    ) {
        let target = format!("/var/lib/kubelet/pods/{pod}/volumes/kubernetes.io~csi/{pv}/mount");
        let (source, secrets) = if cephfs {
            (
                format!("cephfs://10.0.0.7:6789/volumes/csi/{pv}?fs=cephfs"),
                HashMap::from([
                    ("userID".to_string(), "app".to_string()),
                    ("userKey".to_string(), KEY.to_string()),
                ]),
            )
        } else {
            (format!("nfs://10.0.0.5/exports/k8s/{pv}?vers=4.1"), HashMap::new())
        };
        let req = NodePublishVolumeRequest {
            volume_id: format!("nfs#retain#10.0.0.5#/exports/k8s#{pv}"),
            target_path: target,
            volume_capability: Some(VolumeCapability {
                access_type: Some(AccessType::Mount(MountVolume::default())),
                access_mode: Some(AccessMode { mode: mode as i32 }),
            }),
            volume_context: HashMap::from([
                ("source".to_string(), source),
                ("csi.storage.k8s.io/pod.namespace".to_string(), ns),
                ("csi.storage.k8s.io/pod.name".to_string(), name),
                ("csi.storage.k8s.io/pod.uid".to_string(), pod),
                ("csi.storage.k8s.io/serviceAccount.name".to_string(), "default".to_string()),
                ("csi.storage.k8s.io/ephemeral".to_string(), ephemeral.to_string()),
                (
                    "storage.kubernetes.io/csiProvisionerIdentity".to_string(),
                    "1700000000000-8081-csi.cnfs.io".to_string(),
                ),
            ]),
            secrets,
            ..Default::default()
        };
        prop_assert!(check(&req)?, "refused: {:?}", validate_publish(&req).err());
        let p = validate_publish(&req).expect("accepted");
        prop_assert_eq!(p.record.ephemeral, ephemeral);
        prop_assert_eq!(p.record.read_only, mode == Mode::MultiNodeReaderOnly);
    }
}

#[test]
fn regression_four_megabyte_fields_are_refused_by_name() {
    let huge = "h".repeat(4 << 20);
    let ok = NodePublishVolumeRequest {
        volume_id: "vol-1".into(),
        target_path: "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/pv/mount".into(),
        volume_capability: Some(VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume::default())),
            access_mode: Some(AccessMode {
                mode: Mode::MultiNodeMultiWriter as i32,
            }),
        }),
        volume_context: HashMap::from([(
            "source".to_string(),
            "nfs://10.0.0.5/exports/a".to_string(),
        )]),
        ..Default::default()
    };
    assert!(validate_publish(&ok).is_ok());
    let with_ctx = |k: &str, v: &str| {
        let mut r = ok.clone();
        r.volume_context.insert(k.into(), v.into());
        r
    };
    let cases = [
        (
            NodePublishVolumeRequest {
                volume_id: huge.clone(),
                ..ok.clone()
            },
            "volume_id",
        ),
        (
            NodePublishVolumeRequest {
                target_path: format!("/{huge}"),
                ..ok.clone()
            },
            "target_path",
        ),
        (with_ctx("source", &huge), "volume_context"),
        (with_ctx(&huge, "v"), "volume_context"),
        (
            NodePublishVolumeRequest {
                secrets: HashMap::from([(huge.clone(), "v".to_string())]),
                ..ok.clone()
            },
            "secrets",
        ),
        (
            NodePublishVolumeRequest {
                volume_capability: Some(VolumeCapability {
                    access_type: Some(AccessType::Mount(MountVolume {
                        mount_flags: vec![huge.clone()],
                        ..Default::default()
                    })),
                    ..ok.volume_capability.clone().expect("cap")
                }),
                ..ok.clone()
            },
            "volume_capability.mount.mount_flags",
        ),
    ];
    for (req, field) in cases {
        let e = validate_publish(&req).expect_err(field);
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with(field), "{field}: {}", e.message());
        assert!(
            e.message().len() < 300,
            "{field}: {} bytes",
            e.message().len()
        );
    }
}
