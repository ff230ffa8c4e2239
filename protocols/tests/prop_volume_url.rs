//! Property tests of the volume URL parser (`volume_url::parse`), the one grammar for volume
//! names written by people (pod annotations, CSI `volume_context.source`): any string is
//! answered without a panic, URLs made from valid parts parse back to those parts, and
//! hostile forms are refused with a reason (and, through a hand-off record, the field).

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use cnfs_protocols::handoff::{Record, RECORD_VERSION};
use cnfs_protocols::spec::VolumeSpec;
use cnfs_protocols::volume_url::{self, echo, ECHO_MAX, MAX_URL};
use proptest::prelude::*;

/// Bytes an error may take: a reason plus a few bounded echoes.
const MAX_ERROR: usize = 1024;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // Failures are reported with their minimal input; no files written next to the tests.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Text that looks like a URL often enough to reach every branch of the parser.
fn url_like() -> impl Strategy<Value = String> {
    let scheme = prop_oneof![
        Just("nfs://"),
        Just("cephfs://"),
        Just("smb://"),
        Just(""),
        Just("nfs:/")
    ];
    let piece = prop_oneof![
        "[a-z0-9.-]{0,12}",
        "\\[[0-9a-f:.%]{0,20}\\]?",
        Just(":".to_string()),
        Just("/".to_string()),
        Just("?".to_string()),
        Just("&".to_string()),
        Just("=".to_string()),
        Just(",".to_string()),
        "[#@% \t\r\n\u{0}\u{7f}\u{85}\u{2028}]",
        "(vers|nfsvers|port|ro|rw|nconnect|fs|client|fsid|secret|addr|ms_mode)=?[0-9a-z.]{0,6}",
        any::<String>(),
    ];
    (scheme, proptest::collection::vec(piece, 0..12))
        .prop_map(|(s, pieces)| format!("{s}{}", pieces.concat()))
}

fn record(source: &str) -> Record {
    Record {
        version: RECORD_VERSION,
        volume_id: "v".into(),
        target_path: "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/pv/mount".into(),
        source: source.into(),
        read_only: false,
        pod_namespace: "ns".into(),
        pod_name: "p".into(),
        pod_uid: "u".into(),
        ephemeral: false,
        has_secret: false,
        mount_flags: vec![],
    }
}

/// The fields a refused source may be reported under: the URL itself, or a part of the
/// volume it describes.
fn assert_field_named(source: &str) {
    if let Err(e) = record(source).volume_spec(None) {
        assert!(
            e.field == "volume_context.source"
                || e.field.starts_with("volume.")
                || e.field.starts_with("secrets."),
            "{source:?}: unexpected field {:?}",
            e.field
        );
        assert!(!e.reason.is_empty());
        assert!(
            e.to_string().len() <= MAX_ERROR,
            "{} byte error",
            e.to_string().len()
        );
    }
}

proptest! {
    #![proptest_config(config(4000))]

    #[test]
    fn any_string_is_answered_without_a_panic_and_with_a_bounded_reason(
        url in prop_oneof![any::<String>(), url_like()]
    ) {
        match volume_url::parse("v", &url) {
            Ok(parsed) => {
                // Whatever parsed has no character the grammar forbids.
                prop_assert!(url.len() <= MAX_URL);
                let rest = url.split_once("://").map(|(_, r)| r).unwrap_or_default();
                prop_assert!(!rest.chars().any(|c| c.is_control() || c.is_whitespace()
                    || matches!(c, '#' | '@' | '%')));
                let _ = VolumeSpec::from_wire_unresolved(&parsed.wire);
            }
            Err(reason) => prop_assert!(!reason.is_empty() && reason.len() <= MAX_ERROR,
                "{} byte reason", reason.len()),
        }
        assert_field_named(&url);
    }

    #[test]
    fn echo_is_bounded_printable_and_says_the_full_length(text in any::<String>()) {
        let e = echo(&text);
        // Each shown character escapes to at most 10 bytes (\u{10ffff}).
        prop_assert!(e.len() <= ECHO_MAX * 10 + 40);
        prop_assert!(!e.chars().any(char::is_control), "{e:?}");
        prop_assert_eq!(
            e.ends_with(&format!("... ({} bytes)", text.len())),
            text.len() > ECHO_MAX
        );
    }
}

/// A unicast address `parse_server` takes.
fn unicast_v4() -> impl Strategy<Value = Ipv4Addr> {
    any::<Ipv4Addr>().prop_filter("unicast", |ip| {
        !(ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast())
    })
}

fn unicast_v6() -> impl Strategy<Value = Ipv6Addr> {
    any::<Ipv6Addr>().prop_filter("unicast", |ip| !(ip.is_unspecified() || ip.is_multicast()))
}

/// (text in the URL, the server as the spec holds it).
fn nfs_server() -> impl Strategy<Value = (String, String)> {
    prop_oneof![
        unicast_v4().prop_map(|ip| (ip.to_string(), ip.to_string())),
        unicast_v6().prop_map(|ip| (format!("[{ip}]"), ip.to_string())),
        "[a-z][a-z0-9-]{0,10}[a-z0-9](\\.[a-z][a-z0-9-]{0,10}[a-z0-9]){0,3}"
            .prop_map(|h| (h.clone(), h)),
    ]
}

fn path() -> impl Strategy<Value = String> {
    "(/[A-Za-z0-9_~+-][A-Za-z0-9._~+-]{0,11}){1,5}"
        .prop_filter("clean", |p| !p.split('/').any(|s| s == "." || s == ".."))
}

/// NFS options from the allowlist with values in range (never `port`, `vers`, `ro`).
fn nfs_options() -> impl Strategy<Value = HashMap<String, String>> {
    let option = prop_oneof![
        (1u32..=16).prop_map(|n| ("nconnect".to_string(), n.to_string())),
        (4096u32..=1_048_576).prop_map(|n| ("rsize".to_string(), n.to_string())),
        (4096u32..=1_048_576).prop_map(|n| ("wsize".to_string(), n.to_string())),
        (1u32..=6000).prop_map(|n| ("timeo".to_string(), n.to_string())),
        (0u32..=3600).prop_map(|n| ("actimeo".to_string(), n.to_string())),
        Just(("hard".to_string(), String::new())),
        Just(("nolock".to_string(), String::new())),
        Just(("noatime".to_string(), String::new())),
        Just(("nosuid".to_string(), String::new())),
        prop_oneof![Just("all"), Just("none"), Just("pos")]
            .prop_map(|v| ("lookupcache".to_string(), v.to_string())),
    ];
    proptest::collection::hash_map(option.prop_map(|(k, v)| (k, v)), Just(()), 0..5)
        .prop_map(|m| m.into_keys().collect())
}

fn query(options: &HashMap<String, String>) -> String {
    let mut pairs: Vec<String> = options
        .iter()
        .map(|(k, v)| {
            if v.is_empty() {
                k.clone()
            } else {
                format!("{k}={v}")
            }
        })
        .collect();
    pairs.sort();
    pairs.join("&")
}

proptest! {
    #![proptest_config(config(3000))]

    #[test]
    fn nfs_urls_made_from_valid_parts_parse_back_to_those_parts_and_validate(
        (server_text, server) in nfs_server(),
        port in proptest::option::of(1u16..),
        export in path(),
        version in prop_oneof![Just(""), Just("3"), Just("4.0"), Just("4.1"), Just("4.2")],
        options in nfs_options(),
        read_only in any::<bool>(),
    ) {
        let mut q = options.clone();
        if !version.is_empty() {
            q.insert("vers".into(), version.into());
        }
        if read_only {
            q.insert("ro".into(), String::new());
        }
        let authority = match port {
            Some(p) => format!("{server_text}:{p}"),
            None => server_text.clone(),
        };
        let url = format!("nfs://{authority}{export}?{}", query(&q));
        let parsed = volume_url::parse("data", &url).map_err(|e| TestCaseError::fail(format!("{url}: {e}")))?;
        let n = parsed.wire.nfs();
        prop_assert_eq!(&n.server, &server);
        prop_assert_eq!(&n.export, &export);
        prop_assert_eq!(n.version.as_str(), version);
        let mut want = options.clone();
        if let Some(p) = port {
            want.insert("port".into(), p.to_string());
        }
        if read_only {
            want.insert("ro".into(), String::new());
        }
        let got: HashMap<String, String> = parsed.wire.options.clone().into_iter().collect();
        prop_assert_eq!(got, want);
        prop_assert!(parsed.secret_ref.is_none());
        let spec = VolumeSpec::from_wire_unresolved(&parsed.wire)
            .map_err(|e| TestCaseError::fail(format!("{url}: {e}")))?;
        prop_assert_eq!(spec.read_only, read_only);
    }

    #[test]
    fn cephfs_urls_made_from_valid_parts_parse_back_to_those_parts_and_validate(
        monitors in proptest::collection::vec(
            prop_oneof![
                (unicast_v4(), 1u16..).prop_map(|(ip, p)| format!("{ip}:{p}")),
                (unicast_v6(), 1u16..).prop_map(|(ip, p)| format!("[{ip}]:{p}")),
            ],
            1..4,
        ),
        path in path(),
        fs in "[a-z][a-z0-9_-]{0,15}",
        client in "[a-z][a-z0-9_-]{0,15}",
        fsid in proptest::option::of("[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"),
        secret in proptest::option::of("[a-z][a-z0-9-]{0,20}"),
        ms_mode in proptest::option::of(prop_oneof![Just("crc"), Just("secure")]),
    ) {
        let mut q = vec![format!("fs={fs}"), format!("client={client}")];
        q.extend(fsid.iter().map(|f| format!("fsid={f}")));
        q.extend(secret.iter().map(|s| format!("secret={s}")));
        q.extend(ms_mode.iter().map(|m| format!("ms_mode={m}")));
        let url = format!("cephfs://{}{path}?{}", monitors.join(","), q.join("&"));
        let parsed = volume_url::parse("c", &url).map_err(|e| TestCaseError::fail(format!("{url}: {e}")))?;
        let c = parsed.wire.cephfs();
        prop_assert_eq!(&c.monitors, &monitors);
        prop_assert_eq!(&c.path, &path);
        prop_assert_eq!((&c.fs_name, &c.client), (&fs, &client));
        prop_assert_eq!(c.fsid.as_str(), fsid.as_deref().unwrap_or(""));
        prop_assert!(c.secret.is_empty(), "a secret= names a secret, never carries one");
        prop_assert_eq!(parsed.secret_ref, secret);
        prop_assert_eq!(
            parsed.wire.options.get("ms_mode").map(String::as_str),
            ms_mode
        );
        VolumeSpec::from_wire_unresolved(&parsed.wire)
            .map_err(|e| TestCaseError::fail(format!("{url}: {e}")))?;
    }

    #[test]
    fn a_forbidden_character_anywhere_after_the_scheme_is_refused(
        (server_text, _) in nfs_server(),
        export in path(),
        at in any::<proptest::sample::Index>(),
        bad in prop_oneof![
            Just('#'), Just('@'), Just('%'), Just(' '), Just('\t'), Just('\n'), Just('\r'),
            Just('\u{0}'), Just('\u{7f}'), Just('\u{85}'), Just('\u{a0}'), Just('\u{2028}'),
            Just('\u{3000}'),
        ],
    ) {
        let rest = format!("{server_text}{export}?vers=4.1");
        // Insert at a character boundary.
        let bounds: Vec<usize> = rest.char_indices().map(|(i, _)| i).chain([rest.len()]).collect();
        let i = bounds[at.index(bounds.len())];
        let url = format!("nfs://{}{bad}{}", &rest[..i], &rest[i..]);
        let e = volume_url::parse("v", &url).expect_err("forbidden character");
        prop_assert!(e.starts_with("must not contain"), "{url:?}: {e}");
        let r = record(&url).volume_spec(None).expect_err("refused");
        prop_assert_eq!(r.field, "volume_context.source");
    }

    #[test]
    fn user_info_is_refused_in_every_form(
        user in "[a-z]{1,8}(:[a-z0-9]{0,8})?",
        (server_text, _) in nfs_server(),
    ) {
        let url = format!("nfs://{user}@{server_text}/exports/a");
        let e = volume_url::parse("v", &url).expect_err("user info");
        prop_assert!(e.contains("'@'"), "{e}");
    }

    #[test]
    fn brackets_hold_an_ipv6_address_and_nothing_else(
        inner in prop_oneof![
            "[a-z][a-z0-9.-]{0,20}",
            unicast_v4().prop_map(|ip| ip.to_string()),
            "v[0-9a-f]\\.[a-z0-9:]{1,10}",
            Just(String::new()),
        ],
    ) {
        prop_assume!(inner.parse::<Ipv6Addr>().is_err());
        let url = format!("nfs://[{inner}]:2049/exports/a");
        let e = volume_url::parse("v", &url).expect_err("not IPv6");
        prop_assert!(e.contains("IPv6"), "{url}: {e}");
    }

    #[test]
    fn an_unbracketed_ipv6_server_is_refused_naming_a_field(ip in unicast_v6()) {
        // `fd00::5` reads as host `fd00` and port `:5`: some part of it must be refused.
        let url = format!("nfs://{ip}/exports/a");
        let e = record(&url).volume_spec(None).expect_err("unbracketed IPv6");
        prop_assert!(
            e.field == "volume_context.source" || e.field.starts_with("volume."),
            "{url}: {e}"
        );
    }

    #[test]
    fn urls_over_the_length_bound_are_refused_by_length(extra in 1usize..100_000) {
        let url = format!("nfs://10.0.0.5/{}", "e".repeat(MAX_URL - 15 + extra));
        let e = volume_url::parse("v", &url).expect_err("too long");
        prop_assert_eq!(e, format!("is {} bytes, longer than {MAX_URL} bytes", url.len()));
    }
}

#[test]
fn regression_four_megabyte_urls_names_and_option_floods_are_refused_quickly() {
    let start = std::time::Instant::now();
    let huge = 4 << 20;
    for url in [
        format!("nfs://10.0.0.5/{}", "e".repeat(huge)),
        format!("nfs://{}/e", "h".repeat(huge)),
        format!("nfs://10.0.0.5/e?{}", "nconnect=4&".repeat(huge / 11)),
        format!("{}://h/e", "s".repeat(huge)),
        format!("cephfs://{}/p?fs=a", "10.0.0.1:6789,".repeat(huge / 14)),
    ] {
        let e = volume_url::parse(&"n".repeat(huge), &url).expect_err("huge");
        assert!(
            e.contains("longer than 4096 bytes"),
            "{}",
            &e[..e.len().min(200)]
        );
        let r = record(&url).volume_spec(None).expect_err("huge");
        assert_eq!(r.field, "volume_context.source");
        assert!(r.to_string().len() < 200, "{}", r.to_string().len());
    }
    assert!(start.elapsed() < std::time::Duration::from_secs(5));
}
