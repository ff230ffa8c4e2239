//! SMB 2.1 / 3.x (the kernel's `cifs`): the source's fields, its options, its URL form, its
//! credentials and what the policy matches. SMB1 and 2.0 are refused; SMB3 volumes are sealed
//! (encrypted on the wire) unless the caller says `noseal`.

use std::collections::BTreeMap;

use super::FieldValue::One;
use super::{
    err, parse_server, printable, validate_path, Credentials, Kind, Secret, Server, SpecError,
    Typed,
};
use crate::agent;

pub const NAME: &str = "smb";
/// Kernel file system types a mount of it shows (`/proc/mounts`) or a caller may name.
pub(super) const KERNEL_TYPES: &[&str] = &["cifs", "smb3"];

/// `//server/share/path` and the fields a listing shows (never the credentials).
pub(super) fn summary(s: &agent::SmbSource) -> (String, super::SummaryFields) {
    let shown = format!("//{}/{}{}", s.server, s.share, s.path);
    let fields = vec![
        ("server", One(s.server.clone())),
        ("share", One(s.share.clone())),
        ("path", One(s.path.clone())),
        ("version", One(s.version.clone())),
        ("domain", One(s.domain.clone())),
    ];
    (shown, fields)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmbSource {
    pub server: Server,
    pub share: String,
    /// A directory inside the share: `/` for its root.
    pub path: String,
    pub version: SmbVersion,
    /// Encryption on the wire (`seal`): on by default for SMB3, impossible for 2.1.
    pub seal: bool,
    pub username: String,
    pub password: Secret,
    pub domain: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmbVersion {
    V2_1,
    V3_0,
    V3_02,
    V3_1_1,
}

impl SmbVersion {
    /// The value of the kernel's `vers=` option.
    pub fn as_str(self) -> &'static str {
        match self {
            SmbVersion::V2_1 => "2.1",
            SmbVersion::V3_0 => "3.0",
            SmbVersion::V3_02 => "3.02",
            SmbVersion::V3_1_1 => "3.1.1",
        }
    }

    fn parse(field: &str, v: &str) -> Result<Self, SpecError> {
        match v {
            "2.1" => Ok(SmbVersion::V2_1),
            "3" | "3.0" => Ok(SmbVersion::V3_0),
            "3.02" | "3.0.2" => Ok(SmbVersion::V3_02),
            "" | "3.1.1" | "3.11" => Ok(SmbVersion::V3_1_1),
            "1.0" | "1" | "2.0" | "2" => err(
                field,
                "SMB1 and SMB 2.0 are refused (insecure, unsupported by current servers): use 3.1.1, 3.02, 3.0 or 2.1",
            ),
            _ => err(field, "must be one of 2.1, 3.0, 3.02, 3.1.1"),
        }
    }
}

pub(super) const OPTIONS: &[(&str, Kind)] = &[
    // Folded into `version`.
    ("vers", Kind::Typed),
    // `seal` is the default for SMB3; `noseal` (CNFS's, not passed to the kernel) turns it off.
    ("seal", Kind::Flag),
    ("noseal", Kind::Flag),
    ("sec", Kind::OneOf(&["ntlmssp", "ntlmsspi"])),
    ("sign", Kind::Flag),
    ("port", Kind::Uint(1, 65535)),
    ("uid", Kind::Uint(0, 4_294_967_294)),
    ("gid", Kind::Uint(0, 4_294_967_294)),
    ("forceuid", Kind::Flag),
    ("forcegid", Kind::Flag),
    ("file_mode", Kind::Octal(0o7777)),
    ("dir_mode", Kind::Octal(0o7777)),
    ("noperm", Kind::Flag),
    (
        "cache",
        Kind::OneOf(&["strict", "none", "loose", "singleclient", "ro"]),
    ),
    ("actimeo", Kind::Uint(0, 3600)),
    ("acregmax", Kind::Uint(0, 3600)),
    ("acdirmax", Kind::Uint(0, 3600)),
    ("closetimeo", Kind::Uint(0, 3600)),
    ("nobrl", Kind::Flag),
    ("mfsymlinks", Kind::Flag),
    ("nounix", Kind::Flag),
    ("serverino", Kind::Flag),
    ("noserverino", Kind::Flag),
    ("mapposix", Kind::Flag),
    ("nomapposix", Kind::Flag),
    ("nocase", Kind::Flag),
    ("hard", Kind::Flag),
    ("soft", Kind::Flag),
    ("echo_interval", Kind::Uint(1, 600)),
    ("rsize", Kind::Uint(4096, 8 << 20)),
    ("wsize", Kind::Uint(4096, 8 << 20)),
    ("nostrictsync", Kind::Flag),
    ("nohandlecache", Kind::Flag),
];

const CREDENTIALS: &str = "pass credentials in the volume's secret (username, password, domain)";

pub(super) const RESERVED: &[(&str, &str)] = &[
    ("username", CREDENTIALS),
    ("user", CREDENTIALS),
    ("password", CREDENTIALS),
    ("pass", CREDENTIALS),
    ("password2", CREDENTIALS),
    ("domain", CREDENTIALS),
    ("dom", CREDENTIALS),
    ("workgroup", CREDENTIALS),
    ("credentials", CREDENTIALS),
    ("cred", CREDENTIALS),
    ("ip", "set by the agent from the resolved server address"),
    ("addr", "set by the agent from the resolved server address"),
    ("unc", "the share is the volume's smb.share"),
    ("prefixpath", "the directory is the volume's smb.path"),
    (
        "multiuser",
        "needs cifs.upcall and per-user keys in the guest, which CNFS guests do not run",
    ),
    (
        "cruid",
        "needs cifs.upcall in the guest, which CNFS guests do not run",
    ),
    (
        "upcall_target",
        "needs cifs.upcall in the guest, which CNFS guests do not run",
    ),
    (
        "guest",
        "anonymous access is not supported: give credentials",
    ),
];

pub(super) const CONFLICTS: &[(&str, &str)] = &[
    ("hard", "soft"),
    ("seal", "noseal"),
    ("serverino", "noserverino"),
    ("mapposix", "nomapposix"),
];

pub(super) fn refuse(key: &str, value: &str) -> Option<&'static str> {
    (key == "sec" && value.starts_with("krb5")).then_some(
        "Kerberos needs cifs.upcall and a keytab in the guest, which CNFS guests do not run: use sec=ntlmssp",
    )
}

/// The keys of an SMB secret (CSI node-publish secret, or an annotation's secret file with
/// one `key=value` per line, the format of mount.cifs's `credentials=` file).
pub const SECRET_KEYS: &[&str] = &["username", "password", "domain"];
pub const REQUIRED_SECRET_KEYS: &[&str] = &["username", "password"];

/// The kernel's cifs client hashes at most 128 bytes of a password (`E_md4hash` in
/// fs/smb/client/smbencrypt.c): a longer one never logs on, and fails as a wrong password.
const MAX_PASSWORD: usize = 128;

/// Mount options that a security module takes out of the option string before cifs reads it
/// (SELinux's and Smack's `sb_eat_lsm_opts`), splitting at every comma: a password's `,,` is
/// no escape from them.
const LSM_OPTIONS: &[&str] = &[
    "context=",
    "fscontext=",
    "defcontext=",
    "rootcontext=",
    "smackfs",
];

/// Whether a security module would read part of `password` as one of its own mount options.
fn lsm_would_take(password: &str) -> bool {
    password
        .split(',')
        .skip(1)
        .any(|seg| seg == "seclabel" || LSM_OPTIONS.iter().any(|p| seg.starts_with(p)))
}

pub(super) fn credentials_from_file(text: &str) -> Result<Credentials, String> {
    // Windows editors may start the file with a byte order mark.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(format!("line {} is not key=value", i + 1));
        };
        let k = match k.trim() {
            "user" => "username",
            "pass" => "password",
            "dom" | "workgroup" => "domain",
            k => k,
        };
        // The key is not shown: a file of another format (a CephFS key, a password alone on
        // its line) would put its secret there.
        let Some(key) = SECRET_KEYS.iter().find(|s| **s == k) else {
            return Err(format!(
                "line {}: unknown key (username, password, domain; the line is not shown)",
                i + 1
            ));
        };
        if pairs.iter().any(|(seen, _)| seen == key) {
            return Err(format!("line {}: {key} is given twice", i + 1));
        }
        pairs.push((key, v));
    }
    Ok(Credentials::from_pairs(pairs))
}

pub(super) fn apply(s: &mut agent::SmbSource, creds: &Credentials) {
    if let Some(u) = creds.get("username") {
        s.username = u.to_string();
    }
    if let Some(p) = creds.get("password") {
        s.password = p.to_string();
    }
    if let Some(d) = creds.get("domain") {
        s.domain = d.to_string();
    }
}

/// `smb://server[:port]/share[/path]?vers=3.1.1&<option>...`
pub(super) fn from_url(
    authority: &str,
    path: &str,
    options: &mut BTreeMap<String, String>,
) -> Result<agent::volume_spec::Source, String> {
    let server = crate::volume_url::server_and_port(authority, options)?;
    let rest = path.trim_start_matches('/');
    let (share, sub) = rest.split_once('/').unwrap_or((rest, ""));
    if share.is_empty() {
        return Err("the URL has no share: smb://server/share[/path]".into());
    }
    Ok(agent::volume_spec::Source::Smb(agent::SmbSource {
        server,
        share: share.to_string(),
        path: if sub.is_empty() {
            String::new()
        } else {
            format!("/{sub}")
        },
        version: options.remove("vers").unwrap_or_default(),
        ..Default::default()
    }))
}

/// Characters allowed in share, user and domain names: enough for Windows, Azure Files and
/// Samba names, and none that could bend the kernel's option string (`,` `=`) or UNC (`/` `\`).
fn name(field: &str, v: &str, max: usize, extra: &str) -> Result<String, SpecError> {
    if v.is_empty() || v.len() > max {
        return err(field, format!("must be 1 to {max} characters"));
    }
    if let Some(c) = v
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-_.".contains(*c) || extra.contains(*c)))
    {
        return err(
            field,
            format!("character {:?} is not allowed", printable(&c.to_string())),
        );
    }
    Ok(v.to_string())
}

pub(super) fn parse(
    s: &agent::SmbSource,
    typed: &Typed,
    options: &BTreeMap<String, String>,
    require_secret: bool,
) -> Result<SmbSource, SpecError> {
    let server = parse_server("volume.smb.server", &s.server)?;
    let share = name("volume.smb.share", &s.share, 80, "$")?;
    let path = if s.path.is_empty() {
        "/".to_string()
    } else {
        validate_path("volume.smb.path", &s.path)?
    };
    let mut version = SmbVersion::parse("volume.smb.version", &s.version)?;
    if let Some((field, value)) = typed.get("vers") {
        let v = SmbVersion::parse(field, value)?;
        if !s.version.is_empty() && v != version {
            return err(field.clone(), "contradicts volume.smb.version");
        }
        version = v;
    }
    if version == SmbVersion::V2_1 && options.contains_key("seal") {
        return err(
            "volume.options.seal",
            "SMB 2.1 has no encryption: use vers=3.0 or later",
        );
    }
    let seal = version != SmbVersion::V2_1 && !options.contains_key("noseal");
    // Credentials: never echoed, not even in part.
    let username = if s.username.is_empty() && !require_secret {
        String::new()
    } else {
        name("volume.smb.username", &s.username, 104, "@$").map_err(|e| SpecError {
            field: e.field,
            reason: "must be 1 to 104 letters, digits or - _ . @ $ (value not shown)".into(),
        })?
    };
    let domain = if s.domain.is_empty() {
        String::new()
    } else {
        name("volume.smb.domain", &s.domain, 255, "")?
    };
    let password_ok = (s.password.is_empty() && !require_secret)
        || !s.password.is_empty()
            && s.password.len() <= MAX_PASSWORD
            && !s.password.chars().any(|c| c.is_control());
    if !password_ok {
        return err(
            "volume.smb.password",
            format!("is required, at most {MAX_PASSWORD} bytes (the most the kernel's cifs client uses), no control characters (value not shown)"),
        );
    }
    if lsm_would_take(&s.password) {
        return err(
            "volume.smb.password",
            "has a comma followed by a security module's mount option (context=, fscontext=, defcontext=, rootcontext=, seclabel, smackfs...), which the kernel would take out of it (value not shown)",
        );
    }
    Ok(SmbSource {
        server,
        share,
        path,
        version,
        seal,
        username,
        password: Secret(s.password.clone()),
        domain,
    })
}

impl SmbSource {
    pub(super) fn to_wire(&self, with_secret: bool) -> agent::SmbSource {
        agent::SmbSource {
            server: self.server.to_string(),
            share: self.share.clone(),
            path: if self.path == "/" {
                String::new()
            } else {
                self.path.clone()
            },
            version: self.version.as_str().to_string(),
            username: if with_secret {
                self.username.clone()
            } else {
                String::new()
            },
            password: if with_secret {
                self.password.expose().to_string()
            } else {
                String::new()
            },
            domain: self.domain.clone(),
            ..Default::default()
        }
    }

    /// What the policy's `export_prefixes` match: the share and the directory in it.
    pub fn share_path(&self) -> String {
        match self.path.as_str() {
            "/" => format!("/{}", self.share),
            p => format!("/{}{p}", self.share),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{FsKind, Source, VolumeSpec};
    use super::*;

    fn smb(server: &str, share: &str, path: &str) -> agent::VolumeSpec {
        let mut w = agent::VolumeSpec {
            name: "files".into(),
            ..Default::default()
        };
        w.set_smb(agent::SmbSource {
            server: server.into(),
            share: share.into(),
            path: path.into(),
            username: "alice".into(),
            password: "pa,ss=word w".into(),
            ..Default::default()
        });
        w
    }

    fn with_opt(mut w: agent::VolumeSpec, k: &str, v: &str) -> agent::VolumeSpec {
        w.options.insert(k.into(), v.into());
        w
    }

    #[test]
    fn smb3_is_sealed_by_default_and_round_trips() {
        let s = VolumeSpec::from_wire(&with_opt(smb("10.0.0.9", "data", "/team/a"), "uid", "1000"))
            .expect("valid");
        let Source::Smb(x) = &s.source else {
            panic!("smb expected")
        };
        assert_eq!((x.version, x.seal), (SmbVersion::V3_1_1, true));
        assert_eq!(x.share_path(), "/data/team/a");
        assert_eq!(VolumeSpec::from_wire(&s.to_wire(true)).expect("again"), s);
        // List and logs never carry the credentials.
        let listed = s.to_wire(false);
        assert!(listed.smb().password.is_empty() && listed.smb().username.is_empty());
        assert!(!format!("{s:?}").contains("pa,ss"));
        let w = with_opt(smb("10.0.0.9", "data", ""), "noseal", "");
        let Source::Smb(x) = VolumeSpec::from_wire(&w).expect("noseal").source else {
            panic!()
        };
        assert!(!x.seal);
        let w = with_opt(smb("10.0.0.9", "data", ""), "vers", "2.1");
        let Source::Smb(x) = VolumeSpec::from_wire(&w).expect("2.1").source else {
            panic!()
        };
        assert_eq!((x.version, x.seal), (SmbVersion::V2_1, false));
    }

    #[test]
    fn hostile_or_unsafe_smb_inputs_name_their_field() {
        let cases: Vec<(agent::VolumeSpec, &str, &str)> = vec![
            (smb("10.0.0.9,ip=1.2.3.4", "d", ""), "volume.smb.server", ""),
            (smb("10.0.0.9", "", ""), "volume.smb.share", "1 to 80"),
            (
                smb("10.0.0.9", "d/x", ""),
                "volume.smb.share",
                "not allowed",
            ),
            (
                smb("10.0.0.9", "d,vers=1.0", ""),
                "volume.smb.share",
                "not allowed",
            ),
            (smb("10.0.0.9", "d", "rel"), "volume.smb.path", "absolute"),
            (smb("10.0.0.9", "d", "/a/../b"), "volume.smb.path", "clean"),
            (
                with_opt(smb("10.0.0.9", "d", ""), "vers", "1.0"),
                "volume.options.vers",
                "SMB1",
            ),
            (
                with_opt(smb("10.0.0.9", "d", ""), "vers", "2.0"),
                "volume.options.vers",
                "SMB1",
            ),
            (
                with_opt(
                    with_opt(smb("10.0.0.9", "d", ""), "vers", "2.1"),
                    "seal",
                    "",
                ),
                "volume.options.seal",
                "no encryption",
            ),
            (
                with_opt(smb("10.0.0.9", "d", ""), "sec", "krb5i"),
                "volume.options.sec",
                "cifs.upcall",
            ),
            (
                with_opt(smb("10.0.0.9", "d", ""), "password", "x"),
                "volume.options.password",
                "secret",
            ),
            (
                with_opt(smb("10.0.0.9", "d", ""), "credentials", "/etc/x"),
                "volume.options.credentials",
                "secret",
            ),
            (
                with_opt(smb("10.0.0.9", "d", ""), "ip", "1.2.3.4"),
                "volume.options.ip",
                "agent",
            ),
            (
                with_opt(smb("10.0.0.9", "d", ""), "multiuser", ""),
                "volume.options.multiuser",
                "cifs.upcall",
            ),
            (
                with_opt(smb("10.0.0.9", "d", ""), "file_mode", "755"),
                "volume.options.file_mode",
                "octal",
            ),
            (
                with_opt(smb("10.0.0.9", "d", ""), "file_mode", "017777"),
                "volume.options.file_mode",
                "at most",
            ),
            (
                with_opt(smb("10.0.0.9", "d", ""), "nconnect", "4"),
                "volume.options.nconnect",
                "not allowed for smb",
            ),
            (
                with_opt(with_opt(smb("10.0.0.9", "d", ""), "seal", ""), "noseal", ""),
                "volume.options.noseal",
                "contradicts",
            ),
        ];
        for (w, field, why) in cases {
            let e = VolumeSpec::from_wire(&w).expect_err(field);
            assert_eq!(e.field, field, "{e}");
            assert!(e.reason.contains(why), "{field}: {e}");
        }
        let mut w = smb("10.0.0.9", "d", "");
        w.mut_smb().password = "bad\npass".into();
        let e = VolumeSpec::from_wire(&w).expect_err("control");
        assert_eq!(e.field, "volume.smb.password");
        assert!(!e.to_string().contains("bad"), "{e}");
        w.mut_smb().password.clear();
        assert_eq!(
            VolumeSpec::from_wire(&w).expect_err("missing").field,
            "volume.smb.password"
        );
        assert!(
            VolumeSpec::from_wire_unresolved(&w).is_ok(),
            "the host resolves it later"
        );
        w.mut_smb().username = "al,ice".into();
        let e = VolumeSpec::from_wire_unresolved(&w).expect_err("comma");
        assert_eq!(e.field, "volume.smb.username");
        assert!(!e.to_string().contains("al,ice"), "{e}");
    }

    #[test]
    fn listings_and_kernel_types_name_the_file_system_without_its_secrets() {
        let w = smb("10.0.0.9", "data", "/team");
        let (kind, shown, fields) = FsKind::summary(&w).expect("summary");
        assert_eq!(
            (kind, shown.as_str()),
            (FsKind::Smb, "//10.0.0.9/data/team")
        );
        let all = format!("{fields:?}");
        assert!(!all.contains("pa,ss") && !all.contains("alice"), "{all}");
        for (t, k) in [
            ("cifs", FsKind::Smb),
            ("smb3", FsKind::Smb),
            ("smb", FsKind::Smb),
            ("nfs4", FsKind::Nfs),
            ("ceph", FsKind::CephFs),
        ] {
            assert_eq!(FsKind::by_name_or_kernel_type(t), Some(k), "{t}");
        }
        assert_eq!(FsKind::by_name_or_kernel_type("xfs"), None);
    }

    #[test]
    fn smb_urls_and_credentials_files_fill_the_spec() {
        let u = crate::volume_url::parse(
            "f",
            "smb://files.example.com:4445/data/team/a?vers=3.0&secret=smb-creds&uid=1000",
        )
        .expect("url");
        let s = u.wire.smb();
        assert_eq!(
            (
                s.server.as_str(),
                s.share.as_str(),
                s.path.as_str(),
                s.version.as_str()
            ),
            ("files.example.com", "data", "/team/a", "3.0")
        );
        assert_eq!(u.secret_ref.as_deref(), Some("smb-creds"));
        assert_eq!(u.wire.options.get("port").map(String::as_str), Some("4445"));
        let creds = FsKind::Smb
            .credentials_from_file("# for team a\nusername=alice\npassword=p=w,1 \ndomain=CORP\n")
            .expect("file");
        let mut w = u.wire.clone();
        FsKind::Smb
            .apply_credentials("secret", &mut w, &creds)
            .expect("apply");
        assert_eq!(w.smb().password, "p=w,1 ");
        assert!(VolumeSpec::from_wire(&w).is_ok());
        let e = FsKind::Smb
            .credentials_from_file("username=a\nsecret-pw\n")
            .expect_err("no =");
        assert!(e.contains("line 2") && !e.contains("secret-pw"), "{e}");
        let e = FsKind::Smb
            .apply_credentials(
                "secret",
                &mut w,
                &Credentials::from_pairs([("username", "a")]),
            )
            .expect_err("no password");
        assert_eq!(e.field, "secret.password");
        let e = FsKind::Smb
            .credentials_from_map("secrets", [("userKey", "x")])
            .expect_err("ceph key");
        assert_eq!(e.field, "secrets.userKey");
        assert!(e.reason.contains("username, password, domain"), "{e}");
        assert!(crate::volume_url::parse("f", "smb://h/").is_err());
    }

    fn with_password(password: &str) -> agent::VolumeSpec {
        let mut w = agent::VolumeSpec {
            name: "files".into(),
            ..Default::default()
        };
        w.set_smb(agent::SmbSource {
            server: "10.0.0.9".into(),
            share: "data".into(),
            username: "alice".into(),
            password: password.into(),
            ..Default::default()
        });
        w
    }

    #[test]
    fn a_secret_file_of_another_format_is_refused_without_showing_its_content() {
        // A CephFS key file named by an smb:// annotation: its one line is not a key name,
        // and the pod's event must not show the key.
        let key = "AQBSdFhlAAAAABAAWmDqDUUxmRX4fcLsaFk2tg==";
        let e = FsKind::Smb
            .credentials_from_file(key)
            .expect_err("not key=value");
        assert!(e.contains("line 1"), "{e}");
        assert!(!e.contains("AQBSdFhl"), "{e}");
        // A password alone on a line, with a '=' in it.
        let e = FsKind::Smb
            .credentials_from_file("username=alice\nhunter2=x\n")
            .expect_err("unknown key");
        assert!(e.contains("line 2") && !e.contains("hunter2"), "{e}");
    }

    #[test]
    fn a_secret_file_naming_a_key_twice_is_refused_by_line() {
        for (text, line) in [
            ("username=alice\npassword=one\npassword=two\n", "line 3"),
            ("user=alice\nusername=bob\npassword=one\n", "line 2"),
            ("username=a\npass=one\npassword=two\n", "line 3"),
            ("username=a\npassword=p\ndomain=A\nworkgroup=B\n", "line 4"),
        ] {
            let e = FsKind::Smb
                .credentials_from_file(text)
                .expect_err("duplicate");
            assert!(e.contains(line) && e.contains("twice"), "{text:?}: {e}");
            assert!(!e.contains("one") && !e.contains("two"), "{e}");
        }
    }

    #[test]
    fn a_byte_order_mark_before_the_first_key_is_not_part_of_it() {
        let creds = FsKind::Smb
            .credentials_from_file("\u{feff}username=alice\r\npassword=pw\r\n")
            .expect("a BOM from a Windows editor");
        assert_eq!(
            (creds.get("username"), creds.get("password")),
            (Some("alice"), Some("pw"))
        );
    }

    #[test]
    fn passwords_longer_than_the_kernel_hashes_are_refused() {
        // cifs hashes at most 128 bytes of the password (E_md4hash): a longer one can never
        // log on, and would fail as "wrong password".
        for ok in ["p".repeat(128), "é".repeat(64)] {
            assert!(VolumeSpec::from_wire(&with_password(&ok)).is_ok(), "{ok}");
        }
        for long in ["p".repeat(129), "é".repeat(65)] {
            let e = VolumeSpec::from_wire(&with_password(&long)).expect_err("too long");
            assert_eq!(e.field, "volume.smb.password");
            assert!(e.reason.contains("128 bytes"), "{e}");
        }
    }

    #[test]
    fn passwords_a_security_module_would_read_as_mount_options_are_refused() {
        // SELinux (and Smack) take their options out of the string before cifs reads it,
        // splitting at every comma: `,,` does not protect these.
        for bad in [
            "pw,context=system_u:object_r:tmp_t:s0",
            "pw,fscontext=x",
            "pw,defcontext=x",
            "pw,rootcontext=x",
            "pw,seclabel",
            "pw,seclabel,more",
            "a,b,smackfsroot=x",
        ] {
            let e = VolumeSpec::from_wire(&with_password(bad)).expect_err(bad);
            assert_eq!(e.field, "volume.smb.password", "{bad}");
            assert!(e.reason.contains("security module"), "{e}");
            assert!(!e.to_string().contains("pw,"), "{e}");
        }
        for ok in [
            "context=x,y",
            "pw,contexts",
            "pw,seclabel2",
            "pw,Context=x",
            "pw, context=x",
            "a,,b,",
        ] {
            assert!(VolumeSpec::from_wire(&with_password(ok)).is_ok(), "{ok}");
        }
    }
}
