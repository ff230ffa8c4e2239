//! The CSI hand-off: what `cnfs-csi node` leaves on the node for the CNFS shim, which owns
//! the guest mount. Everything lives under one run directory on tmpfs (default
//! [`DEFAULT_ROOT`]), keyed by a hash of the CSI target path:
//!
//! - `records/<key>.json`: [`Record`], written at `NodePublishVolume`, removed at
//!   `NodeUnpublishVolume`; never a secret in it.
//! - `secrets/<key>.json`: [`NodeSecret`], only when the volume needs one (CephFS and SMB
//!   credentials, an encrypted volume's `encryptionKey`); 0600 in a 0700 directory, on tmpfs
//!   only.
//! - `guests/<key>.json`: [`GuestUse`], written by the shim once the volume is mounted in a
//!   guest, so the node plugin can read its stats from that guest.
//! - `relay/<sandbox id>.sock`: the shim's stats relay for that sandbox's guest (the agent's
//!   `Stats` only), so the node plugin reaches no guest socket itself.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::agent;
use crate::spec::{FsKind, SpecError, VolumeSpec};
use crate::volume_url::{self, echo};

/// The node-publish secret key whose value is an encrypted volume's key, exactly as the
/// Kubernetes secret holds it (never trimmed).
pub const ENCRYPTION_KEY_SECRET: &str = "encryptionKey";

/// Where the node plugin and the shim meet, unless configured otherwise.
pub const DEFAULT_ROOT: &str = "/run/cnfs/csi";
/// Written into a record; a reader refuses other versions.
pub const RECORD_VERSION: u32 = 1;
/// The largest hand-off file read. A record holds CSI-bounded fields (ids of 128 bytes, a
/// 4 KiB context, 4 KiB of mount flags, a target path of at most 4 KiB): far below this.
pub const MAX_FILE: u64 = 64 * 1024;

/// One published volume, as the node plugin validated it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub version: u32,
    pub volume_id: String,
    /// The target path exactly as the CO gave it.
    pub target_path: String,
    /// The volume URL (see `volume_url`); never carries a key.
    pub source: String,
    pub read_only: bool,
    pub pod_namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
    /// An inline (ephemeral) volume: its source was written by the pod's author.
    pub ephemeral: bool,
    /// A [`NodeSecret`] file accompanies the record (the file system needs one).
    pub has_secret: bool,
    /// Mount flags from the volume capability (a PV's `mountOptions`): `key` or `key=value`.
    #[serde(default)]
    pub mount_flags: Vec<String>,
}

impl Record {
    /// The volume as the agent gets it: the source URL plus the mount flags, read-only if
    /// published so, and the credentials of `secret` for a file system that needs them;
    /// validated by the same rules as every other spec. Errors name the field
    /// (`volume_context.source`, `mount_flags`, `secrets.userKey`, ...) and never carry a
    /// secret's value.
    pub fn volume_spec(
        &self,
        secret: Option<&NodeSecret>,
    ) -> Result<(VolumeSpec, agent::VolumeSpec), SpecError> {
        let err = |field: &str, reason: String| SpecError {
            field: field.to_string(),
            reason,
        };
        let name = guest_volume_name(&self.target_path);
        let mut parsed =
            volume_url::parse(&name, &self.source).map_err(|r| err("volume_context.source", r))?;
        if parsed.secret_ref.is_some() {
            return Err(err(
                "volume_context.source",
                "secret= names a host-side secret of the annotation API; CSI volumes take \
                 credentials from the node-publish secret"
                    .into(),
            ));
        }
        if parsed.encryption_key_ref.is_some() {
            return Err(err(
                "volume_context.source",
                "encryption_key= names a host-side secret of the annotation API; CSI volumes \
                 do not take one"
                    .into(),
            ));
        }
        for flag in &self.mount_flags {
            let (k, v) = flag.split_once('=').unwrap_or((flag, ""));
            if parsed
                .wire
                .options
                .insert(k.to_string(), v.to_string())
                .is_some()
            {
                return Err(err(
                    "mount_flags",
                    format!(
                        "option {} is given more than once (source and mount flags together)",
                        echo(k)
                    ),
                ));
            }
        }
        parsed.wire.read_only |= self.read_only;
        let kind = FsKind::of_wire(&parsed.wire)
            .ok_or_else(|| err("volume_context.source", "names no file system".into()))?;
        // An encrypted volume's key is the secret's `encryptionKey`, whatever the file system.
        let key_field = format!("secrets.{ENCRYPTION_KEY_SECRET}");
        let key = secret.and_then(|s| s.0.get(ENCRYPTION_KEY_SECRET));
        match (parsed.wire.encryption.as_mut(), key) {
            (Some(e), Some(k)) if !k.is_empty() => e.key = k.as_bytes().to_vec(),
            (Some(_), _) => {
                return Err(err(
                    &key_field,
                    "is required for encrypted volumes: the node-publish secret \
                     (csi.storage.k8s.io/node-publish-secret-name) holds the volume's key"
                        .into(),
                ))
            }
            (None, Some(_)) => {
                return Err(err(
                    &key_field,
                    format!(
                        "is only for encrypted volumes (the source has no encryption={})",
                        crate::spec::encryption::MODE_LIST
                    ),
                ))
            }
            (None, None) => {}
        }
        // Keys the file system does not read are refused by name (for NFS: any key).
        let creds = secret
            .map(|s| {
                kind.credentials_from_map(
                    "secrets",
                    s.0.iter()
                        .filter(|(k, _)| k.as_str() != ENCRYPTION_KEY_SECRET)
                        .map(|(k, v)| (k.as_str(), v.as_str())),
                )
            })
            .transpose()?;
        if kind.needs_secret() {
            let required = kind.required_secret_keys();
            let creds = creds.ok_or_else(|| {
                err(
                    &format!("secrets.{}", required.first().copied().unwrap_or("secret")),
                    format!(
                        "{} volumes need a node-publish secret with {}",
                        kind.name(),
                        required.join(", ")
                    ),
                )
            })?;
            kind.apply_credentials("secrets", &mut parsed.wire, &creds)?;
        }
        let spec = VolumeSpec::from_wire(&parsed.wire).map_err(|e| {
            // The key came from the secret: name it there (the reason never shows a value).
            if e.field == "volume.encryption.key" {
                SpecError {
                    field: key_field.clone(),
                    reason: e.reason,
                }
            } else {
                e
            }
        })?;
        Ok((spec, parsed.wire))
    }
}

/// The node-publish secret of a volume that needs one, as the CSI request gave it (CephFS
/// `userKey`/`userID`, SMB `username`/`password`/`domain`: which keys is the file system's,
/// [`FsKind::secret_keys`]; plus [`ENCRYPTION_KEY_SECRET`] for an encrypted volume). Kept
/// beside the record, 0600, on tmpfs.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeSecret(pub BTreeMap<String, String>);

impl NodeSecret {
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        NodeSecret(
            pairs
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }
}

impl fmt::Debug for NodeSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, "<redacted>")))
            .finish()
    }
}

/// Which guest holds a published volume, and under which agent volume name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestUse {
    pub sandbox_id: String,
    pub volume: String,
}

/// The key of a target path: a hash, so any path maps to a fixed, safe file name.
pub fn key(target_path: &str) -> String {
    let digest = Sha256::digest(target_path.as_bytes());
    digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// The agent volume name of a CSI volume (a DNS label, unique per target path).
pub fn guest_volume_name(target_path: &str) -> String {
    format!("csi-{}", &key(target_path)[..20])
}

/// The hand-off directory.
#[derive(Debug, Clone)]
pub struct HandoffDir {
    root: PathBuf,
}

impl HandoffDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        HandoffDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn record_path(&self, target: &str) -> PathBuf {
        self.root
            .join("records")
            .join(format!("{}.json", key(target)))
    }

    pub fn secret_path(&self, target: &str) -> PathBuf {
        self.root
            .join("secrets")
            .join(format!("{}.json", key(target)))
    }

    pub fn guest_path(&self, target: &str) -> PathBuf {
        self.root
            .join("guests")
            .join(format!("{}.json", key(target)))
    }

    /// The shim's stats relay for a sandbox (its id must be validated by the caller).
    pub fn relay_path(&self, sandbox_id: &str) -> PathBuf {
        self.root.join("relay").join(format!("{sandbox_id}.sock"))
    }

    /// The record for `target`, if one exists and really is for that path.
    pub fn read_record(&self, target: &str) -> std::io::Result<Option<Record>> {
        let Some(r) = read_json::<Record>(&self.record_path(target))? else {
            return Ok(None);
        };
        if r.version != RECORD_VERSION {
            return Err(invalid(format!(
                "hand-off record for {} has version {}, expected {RECORD_VERSION}",
                echo(target),
                r.version
            )));
        }
        // A hash collision or a stale file must never hand one pod another's volume.
        Ok((r.target_path == target).then_some(r))
    }

    pub fn read_secret(&self, target: &str) -> std::io::Result<Option<NodeSecret>> {
        read_json(&self.secret_path(target))
    }

    pub fn read_guest(&self, target: &str) -> std::io::Result<Option<GuestUse>> {
        read_json(&self.guest_path(target))
    }

    pub fn write_record(&self, r: &Record) -> std::io::Result<()> {
        write_json(&self.record_path(&r.target_path), r)
    }

    pub fn write_secret(&self, target: &str, s: &NodeSecret) -> std::io::Result<()> {
        write_json(&self.secret_path(target), s)
    }

    pub fn write_guest(&self, target: &str, g: &GuestUse) -> std::io::Result<()> {
        write_json(&self.guest_path(target), g)
    }

    /// Removes the record, secret and guest files of `target`; missing files are fine.
    pub fn remove(&self, target: &str) -> std::io::Result<()> {
        for p in [
            self.secret_path(target),
            self.guest_path(target),
            self.record_path(target),
        ] {
            match std::fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }
}

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> std::io::Result<Option<T>> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    // Read one byte past the bound to tell a full file from an oversized one.
    let mut bytes = Vec::new();
    file.take(MAX_FILE + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(invalid(format!(
            "{}: longer than {MAX_FILE} bytes",
            path.display()
        )));
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        // serde's message names the field or the position, never a value.
        .map_err(|e| invalid(format!("{}: {e}", path.display())))
}

/// Writes `value` as `path` atomically (temp file + rename), 0600, in a 0700 directory. The
/// temp file's name is unique (O_EXCL, random suffix), so concurrent writers never share one.
fn write_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| invalid(format!("{} has no parent", path.display())))?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let bytes = serde_json::to_vec(value).map_err(|e| invalid(e.to_string()))?;
    let prefix = format!(
        ".{}.",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("record")
    );
    let mut tmp = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".tmp")
        .permissions(std::fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)?;
    tmp.write_all(&bytes)?;
    tmp.as_file().sync_all()?;
    // On failure the temp file is removed when `e` drops.
    tmp.persist(path).map(drop).map_err(|e| e.error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn record(target: &str) -> Record {
        Record {
            version: RECORD_VERSION,
            volume_id: "v1".into(),
            target_path: target.into(),
            source: "nfs://10.0.0.5/e".into(),
            read_only: false,
            pod_namespace: "ns".into(),
            pod_name: "p".into(),
            pod_uid: "u".into(),
            ephemeral: false,
            has_secret: true,
            mount_flags: vec![],
        }
    }

    const KEY: &str = "AQBSdFhlAAAAABAAWmDqDUUxmRX4fcLsaFk2tg==";

    #[test]
    fn a_record_becomes_the_agents_spec_with_flags_and_the_secret() {
        let mut r = record("/t");
        r.mount_flags = vec!["nconnect=4".into()];
        r.read_only = true;
        let (spec, wire) = r.volume_spec(None).unwrap();
        assert!(spec.read_only && wire.read_only);
        assert_eq!(spec.name, guest_volume_name("/t"));
        assert_eq!(wire.options.get("nconnect").map(String::as_str), Some("4"));

        r.source = "cephfs://10.0.0.1:6789/sub?fs=a".into();
        let e = r.volume_spec(None).unwrap_err();
        assert_eq!(e.field, "secrets.userKey");
        let s = NodeSecret::from_pairs([("userID", "x"), ("userKey", KEY)]);
        r.mount_flags.clear();
        let (_, wire) = r.volume_spec(Some(&s)).unwrap();
        assert_eq!(wire.cephfs().client, "x");
        assert_eq!(wire.cephfs().secret, KEY);
        r.source = "cephfs://10.0.0.1:6789/sub?fs=a&client=y".into();
        let e = r.volume_spec(Some(&s)).unwrap_err();
        assert_eq!(e.field, "secrets.userID");
        r.source = "cephfs://10.0.0.1:6789/sub?fs=a&secret=ref".into();
        assert_eq!(
            r.volume_spec(Some(&s)).unwrap_err().field,
            "volume_context.source"
        );
    }

    #[test]
    fn an_encryption_key_secret_reference_is_refused_for_csi_volumes() {
        let mut r = record("/t");
        r.source = "nfs://10.0.0.5/e?encryption=luks2&size=1Gi&encryption_key=k".into();
        let e = r.volume_spec(None).unwrap_err();
        assert_eq!(e.field, "volume_context.source");
        assert!(
            e.reason
                .starts_with("encryption_key= names a host-side secret"),
            "{e}"
        );
    }

    #[test]
    fn an_encrypted_volumes_key_is_the_exact_bytes_of_secrets_encryption_key() {
        let mut r = record("/t");
        r.source = "nfs://10.0.0.5/e?vers=4.1&encryption=luks2&size=1073741824".into();
        // Trailing newline and spaces kept: what `cryptsetup --key-file` reads of the same
        // secret file, for recovery.
        let key = " k3y with a trailing newline\n";
        let s = NodeSecret::from_pairs([(ENCRYPTION_KEY_SECRET, key)]);
        let (spec, wire) = r.volume_spec(Some(&s)).unwrap();
        let e = spec.encryption.as_ref().expect("encrypted");
        assert_eq!(e.key.expose(), key.as_bytes());
        assert_eq!(e.size, 1 << 30);
        assert_eq!(wire.encryption.key, key.as_bytes());
        // CephFS: the credentials and the key from one secret.
        r.source = "cephfs://10.0.0.1:6789/sub?fs=a&encryption=luks2&size=1Gi".into();
        let s = NodeSecret::from_pairs([
            ("userID", "x"),
            ("userKey", KEY),
            (ENCRYPTION_KEY_SECRET, key),
        ]);
        let (spec, wire) = r.volume_spec(Some(&s)).unwrap();
        assert_eq!(wire.cephfs().secret, KEY);
        assert_eq!(
            spec.encryption.expect("encrypted").key.expose(),
            key.as_bytes()
        );
    }

    #[test]
    fn a_gocryptfs_volumes_key_is_one_line_of_secrets_encryption_key() {
        let mut r = record("/t");
        r.source = "nfs://10.0.0.5/e?vers=4.1&encryption=gocryptfs".into();
        let s = NodeSecret::from_pairs([(ENCRYPTION_KEY_SECRET, " k3y, spaces kept ")]);
        let (spec, wire) = r.volume_spec(Some(&s)).unwrap();
        let e = spec.encryption.as_ref().expect("encrypted");
        assert_eq!(e.mode, crate::spec::EncryptionMode::Gocryptfs);
        assert_eq!(e.key.expose(), b" k3y, spaces kept ");
        assert_eq!(e.size, 0);
        assert_eq!(wire.encryption.key, b" k3y, spaces kept ");
        // A newline anywhere (`kubectl create secret --from-file` of an `echo`ed file) is
        // refused on the secret's key, without its value.
        for key in ["Secret-key\n", "Secret\nkey", "Secret\0key"] {
            let s = NodeSecret::from_pairs([(ENCRYPTION_KEY_SECRET, key)]);
            let e = r.volume_spec(Some(&s)).unwrap_err();
            assert_eq!(e.field, "secrets.encryptionKey", "{e}");
            assert!(
                e.reason
                    .starts_with("gocryptfs reads its password as one line"),
                "{e}"
            );
            assert!(!e.to_string().contains("Secret"), "{e}");
        }
        // Required as for luks2.
        let e = r.volume_spec(None).unwrap_err();
        assert_eq!(e.field, "secrets.encryptionKey");
        assert!(
            e.reason.starts_with("is required for encrypted volumes"),
            "{e}"
        );
    }

    #[test]
    fn a_missing_empty_oversized_or_stray_encryption_key_is_refused_naming_it_not_its_value() {
        let mut r = record("/t");
        r.source = "nfs://10.0.0.5/e?encryption=luks2&size=1Gi".into();
        for s in [
            None,
            Some(NodeSecret::default()),
            Some(NodeSecret::from_pairs([(ENCRYPTION_KEY_SECRET, "")])),
        ] {
            let e = r.volume_spec(s.as_ref()).unwrap_err();
            assert_eq!(e.field, "secrets.encryptionKey", "{e}");
            assert!(
                e.reason.starts_with("is required for encrypted volumes"),
                "{e}"
            );
        }
        let huge = "S".repeat(1025);
        let s = NodeSecret::from_pairs([(ENCRYPTION_KEY_SECRET, huge.as_str())]);
        let e = r.volume_spec(Some(&s)).unwrap_err();
        assert_eq!(e.field, "secrets.encryptionKey", "{e}");
        assert!(!e.to_string().contains("SSSS"), "{e}");
        // A plain volume takes no key.
        r.source = "nfs://10.0.0.5/e".into();
        let s = NodeSecret::from_pairs([(ENCRYPTION_KEY_SECRET, "secret-value")]);
        let e = r.volume_spec(Some(&s)).unwrap_err();
        assert_eq!(e.field, "secrets.encryptionKey");
        assert_eq!(
            e.reason,
            "is only for encrypted volumes (the source has no encryption=luks2 or gocryptfs)"
        );
        assert!(!e.to_string().contains("secret-value"), "{e}");
    }

    #[test]
    fn flags_are_held_to_the_same_allowlist_and_never_doubled() {
        let mut r = record("/t");
        r.source = "nfs://10.0.0.5/e?nconnect=2".into();
        r.mount_flags = vec!["nconnect=4".into()];
        assert_eq!(r.volume_spec(None).unwrap_err().field, "mount_flags");
        r.mount_flags = vec!["addr=10.9.9.9".into()];
        let e = r.volume_spec(None).unwrap_err();
        assert!(e.to_string().contains("addr"), "{e}");
    }

    #[test]
    fn records_round_trip_privately_and_only_for_their_path() {
        let dir = std::env::temp_dir().join(format!("cnfs-handoff-{}", std::process::id()));
        let h = HandoffDir::new(&dir);
        let t = "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/pv/mount";
        h.write_record(&record(t)).unwrap();
        let s = NodeSecret::from_pairs([("userID", "x"), ("userKey", "AQB=")]);
        h.write_secret(t, &s).unwrap();
        // The same JSON the first records had: {"userID":...,"userKey":...}.
        let json = std::fs::read_to_string(h.secret_path(t)).unwrap();
        assert_eq!(json.trim(), r#"{"userID":"x","userKey":"AQB="}"#);
        assert_eq!(h.read_record(t).unwrap(), Some(record(t)));
        assert_eq!(h.read_secret(t).unwrap(), Some(s.clone()));
        assert!(!format!("{s:?}").contains("AQB="));
        for p in [h.record_path(t), h.secret_path(t)] {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", p.display());
        }
        let mode = std::fs::metadata(dir.join("secrets"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        // A record whose path differs from the one asked for is not handed out.
        std::fs::copy(h.record_path(t), h.record_path("/other")).unwrap();
        assert_eq!(h.read_record("/other").unwrap(), None);
        h.remove(t).unwrap();
        h.remove(t).unwrap();
        assert_eq!(h.read_record(t).unwrap(), None);
        assert_eq!(h.read_secret(t).unwrap(), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn concurrent_writers_of_one_file_never_share_a_temp_file() {
        // Two publishes of one target through different paths (a symlinked kubelet root)
        // write the same record concurrently; each write must land whole.
        let dir = std::env::temp_dir().join(format!("cnfs-handoff-race-{}", std::process::id()));
        let h = HandoffDir::new(&dir);
        let t = "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/pv/mount";
        let errors: Vec<String> = std::thread::scope(|s| {
            let writers: Vec<_> = (0..16)
                .map(|i| {
                    let h = &h;
                    s.spawn(move || {
                        (0..20)
                            .filter_map(|j| {
                                let mut r = record(t);
                                r.volume_id = format!("v{i}-{j}");
                                h.write_record(&r).err().map(|e| e.to_string())
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            writers
                .into_iter()
                .flat_map(|w| w.join().expect("writer"))
                .collect()
        });
        assert!(
            errors.is_empty(),
            "{} of 320 writes failed, e.g. {:?}",
            errors.len(),
            &errors[..errors.len().min(3)]
        );
        assert!(h.read_record(t).unwrap().is_some());
        let names: Vec<_> = std::fs::read_dir(dir.join("records"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "temp files left: {names:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn guest_names_are_dns_labels_and_differ_per_target() {
        let a = guest_volume_name("/a");
        assert!(a.len() <= 63 && a.starts_with("csi-"));
        assert!(a
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
        assert_ne!(a, guest_volume_name("/b"));
    }
}
