//! Property tests for the policy file parser: TOML-ish text of any shape never panics and every
//! refusal names a line inside the text and a key; a valid generated policy reads back as it
//! was written; one typo in it (an unknown file system, a malformed server, an unclean prefix)
//! refuses the whole file, naming that entry's key and line. The inputs behind issue 10's item
//! 13 are kept as regression cases.

use cnfs_host::policy::{Policy, Rule};
use cnfs_protocols::spec::FsKind;
use proptest::prelude::*;

fn namespace() -> impl Strategy<Value = String> {
    prop_oneof![Just("*".to_string()), "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?"]
}

fn server() -> impl Strategy<Value = String> {
    prop_oneof![
        (any::<[u8; 4]>(), 0u8..=32)
            .prop_map(|(a, p)| format!("{}.{}.{}.{}/{p}", a[0], a[1], a[2], a[3])),
        any::<std::net::Ipv4Addr>().prop_map(|a| a.to_string()),
        any::<std::net::Ipv6Addr>().prop_map(|a| a.to_string()),
        (any::<std::net::Ipv6Addr>(), 0u8..=128).prop_map(|(a, p)| format!("{a}/{p}")),
        "[a-zA-Z][a-zA-Z0-9-]{0,10}[a-zA-Z0-9](\\.[a-z][a-z0-9]{0,8}){0,3}",
    ]
}

fn prefix() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("/".to_string()),
        // Segments start with a character other than '.', so none is "." or "..".
        "(/[a-zA-Z0-9_~+@-][a-zA-Z0-9._~+@-]{0,10}){1,4}/?",
    ]
}

fn rule() -> impl Strategy<Value = Rule> {
    (
        prop::collection::vec(namespace(), 1..4),
        prop::sample::subsequence(
            FsKind::ALL.iter().map(|k| k.name()).collect::<Vec<_>>(),
            1..=FsKind::ALL.len(),
        ),
        prop::collection::vec(server(), 1..4),
        prop::collection::vec(prefix(), 1..4),
        prop::collection::vec("[a-z][a-z0-9_]{0,15}", 0..4),
    )
        .prop_map(
            |(namespaces, filesystems, servers, export_prefixes, options)| Rule {
                namespaces,
                filesystems: filesystems.into_iter().map(str::to_string).collect(),
                servers,
                export_prefixes,
                options,
            },
        )
}

fn list(values: &[String]) -> String {
    // The generated values hold neither '"' nor '\', so a basic string needs no escapes.
    let quoted: Vec<String> = values.iter().map(|v| format!("\"{v}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

/// Six lines per entry: `[[allow]]` on line 1 + 6i, then one key per line in this order.
const KEYS: [&str; 5] = [
    "namespaces",
    "filesystems",
    "servers",
    "export_prefixes",
    "options",
];

fn render(rules: &[Rule]) -> String {
    let mut out = String::new();
    for r in rules {
        out.push_str("[[allow]]\n");
        for (key, values) in KEYS.iter().zip([
            &r.namespaces,
            &r.filesystems,
            &r.servers,
            &r.export_prefixes,
            &r.options,
        ]) {
            out.push_str(&format!("{key} = {}\n", list(values)));
        }
    }
    out
}

fn line_of_key(entry: usize, key: &str) -> usize {
    let k = KEYS.iter().position(|k| *k == key).expect("key");
    1 + 6 * entry + 1 + k
}

/// Pieces of policy files, shuffled into text of any shape.
fn tomlish() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        Just("[[allow]]".to_string()),
        Just("[allow]".to_string()),
        Just("\n".to_string()),
        Just(" = ".to_string()),
        Just("[".to_string()),
        Just("]".to_string()),
        Just("\"".to_string()),
        Just(", ".to_string()),
        Just("#".to_string()),
        Just("'".to_string()),
        Just("\"\"\"".to_string()),
        Just("\\".to_string()),
        prop::sample::select(KEYS.to_vec()).prop_map(str::to_string),
        prop::sample::select(vec![
            "nfs",
            "nsf",
            "cephfs",
            "*",
            "/x/../y",
            "10.0.0.0/8",
            "{}"
        ])
        .prop_map(str::to_string),
        prop::collection::vec(
            prop::sample::select("abcnfs0189./:*_[]-".chars().collect::<Vec<char>>()),
            0..12
        )
        .prop_map(String::from_iter),
        any::<char>().prop_map(String::from),
        any::<i64>().prop_map(|n| n.to_string()),
    ];
    prop::collection::vec(token, 0..40).prop_map(|t| t.concat())
}

fn check_refusal(text: &str) -> Result<(), TestCaseError> {
    if let Err(e) = Policy::parse(text) {
        let lines = text.split('\n').count();
        prop_assert!(
            e.line >= 1 && e.line <= lines,
            "line {} of {lines}: {e}",
            e.line
        );
        prop_assert!(!e.key.is_empty() && !e.reason.is_empty(), "{e}");
        prop_assert!(
            e.to_string().len() < 2048,
            "an error echoes little: {}",
            e.to_string().len()
        );
    }
    Ok(())
}

proptest! {
    // 6,000 cases: generating these token soups is the slow part (about 2 ms each unoptimized).
    #![proptest_config(ProptestConfig::with_cases(6_000))]

    #[test]
    fn tomlish_text_never_panics_and_refusals_name_a_line(text in tomlish()) {
        check_refusal(&text)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    #[test]
    fn any_text_never_panics(text in "(?s).{0,400}") {
        check_refusal(&text)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3_000))]

    #[test]
    fn valid_policies_read_back_as_written(rules in prop::collection::vec(rule(), 0..5)) {
        let text = render(&rules);
        let p = Policy::parse(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(p, Policy { allow: rules });
    }

    #[test]
    fn one_typo_refuses_the_file_naming_its_entry_line_and_key(
        rules in prop::collection::vec(rule(), 1..5),
        pick in any::<prop::sample::Index>(),
        typo in prop_oneof![
            (Just("filesystems"), prop::sample::select(vec!["nsf", "NFS", "cifs", "ceph", "nfs4", ""])),
            (Just("servers"), prop::sample::select(vec!["10.0.0.0/33", "10.0.0.256", "[fd00::5]", "nfs server", "a..b", "-x.example", ""])),
            (Just("export_prefixes"), prop::sample::select(vec!["/x/../y", "/x//y", "/x/./y", "exports", "/a b", ""])),
            (Just("namespaces"), prop::sample::select(vec!["Team-A", "team_a", "-a", "a-", ""])),
            (Just("options"), prop::sample::select(vec!["nconnect=4", "Rsize", "", "a b"])),
        ],
    ) {
        let mut rules = rules;
        let entry = pick.index(rules.len());
        let (key, bad) = typo;
        let r = &mut rules[entry];
        let values = match key {
            "filesystems" => &mut r.filesystems,
            "servers" => &mut r.servers,
            "export_prefixes" => &mut r.export_prefixes,
            "namespaces" => &mut r.namespaces,
            _ => &mut r.options,
        };
        values.push(bad.to_string());
        let text = render(&rules);
        let e = match Policy::parse(&text) {
            Ok(_) => return Err(TestCaseError::fail(format!("{bad:?} loaded:\n{text}"))),
            Err(e) => e,
        };
        prop_assert_eq!(e.key, format!("allow[{entry}].{key}"));
        prop_assert_eq!(e.line, line_of_key(entry, key));
    }
}

// ---- regression cases from issue 10, item 13 ------------------------------------------------

/// Puts one typo into an entry.
type Typo = fn(&mut Rule);

#[test]
fn the_issues_typos_are_refused() {
    let base = Rule {
        namespaces: vec!["team-a".into()],
        filesystems: vec!["nfs".into()],
        servers: vec!["10.0.0.0/8".into()],
        export_prefixes: vec!["/exports".into()],
        options: vec![],
    };
    let cases: [(&str, Typo, &str); 3] = [
        (
            "filesystems",
            |r| r.filesystems = vec!["nsf".into()],
            "\"nsf\" is not a file system CNFS mounts",
        ),
        (
            "servers",
            |r| r.servers = vec!["10.0.0/8/8".into()],
            "is not a CIDR",
        ),
        (
            "export_prefixes",
            |r| r.export_prefixes = vec!["/x/../y".into()],
            "must be a clean path",
        ),
    ];
    for (key, typo, reason) in cases {
        let mut r = base.clone();
        typo(&mut r);
        let text = render(&[base.clone(), r]);
        let e = Policy::parse(&text).expect_err(key);
        assert_eq!(
            (e.line, e.key.as_str()),
            (line_of_key(1, key), format!("allow[1].{key}").as_str()),
            "{e}"
        );
        assert!(e.reason.contains(reason), "{e}");
    }
}

#[test]
fn stray_characters_are_named_with_their_line_and_column() {
    // Found by the properties above: toml reports these with an empty message.
    for (text, line, what) in [("\r ", 1, "'\\r'"), ("#\0", 1, "'\\0'")] {
        let e = Policy::parse(text).expect_err(text);
        assert_eq!((e.line, e.key.as_str()), (line, "toml"), "{e}");
        assert!(
            e.reason
                .starts_with(&format!("unexpected character {what}")),
            "{e}"
        );
        assert!(e.reason.contains("(column "), "{e}");
    }
}
