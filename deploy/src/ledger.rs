//! What the installer changed on the node, so that `uninstall` can put every byte back.
//!
//! Before a file is first changed, its original bytes and mode (or its absence) are saved
//! under [`LEDGER_DIR`] and the ledger is written; only then is the file replaced. So a
//! kill at any point leaves either an unchanged file or a ledger entry that knows its
//! original, and a later run (install or uninstall) finishes the job. A later install never
//! saves the installer's own output as an "original".

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::host::Host;

/// The installer's own records on the node.
pub const LEDGER_DIR: &str = "/opt/cnfs/.deploy";
const LEDGER_FILE: &str = "/opt/cnfs/.deploy/ledger.json";

/// How a file is handled on install and uninstall.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// The installer's file: written on every install, restored on uninstall.
    Owned,
    /// Written only when absent (the admin's from then on): removed on uninstall only if
    /// still exactly what the installer wrote.
    CreateOnly,
    /// A file the installer edits in place (containerd's config.toml): restored on
    /// uninstall if unchanged since, else only the installer's edit is taken out.
    Edited,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    pub kind: Kind,
    /// Where the original bytes are saved (`None`: the file did not exist).
    pub original: Option<String>,
    pub original_mode: Option<u32>,
    /// sha256 of what the installer last wrote (`None` before the first write).
    pub written: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Ledger {
    pub entries: Vec<Entry>,
    /// Directories the installer created, outermost first.
    pub dirs: Vec<String>,
    #[serde(default)]
    next_backup: u64,
}

pub fn sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Ledger {
    /// The ledger on the node, or `None` when nothing was installed.
    pub fn load(host: &Host) -> anyhow::Result<Option<Self>> {
        match host.read(LEDGER_FILE)? {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
                anyhow::anyhow!(
                    "{LEDGER_FILE} is not a cnfs-deploy ledger ({e}); not touching anything"
                )
            }),
        }
    }

    /// The ledger for an install: the existing one, or a new one (with the directories
    /// created for it recorded, so uninstall removes them too).
    pub fn open(host: &Host) -> anyhow::Result<Self> {
        if let Some(me) = Self::load(host)? {
            return Ok(me);
        }
        let mut dirs = host.create_dirs("/opt/cnfs", 0o755)?;
        dirs.extend(host.create_dirs(LEDGER_DIR, 0o700)?);
        let mut me = Ledger {
            dirs,
            ..Ledger::default()
        };
        // The ledger's own directory goes with `forget`, not with the other directories.
        me.dirs.retain(|d| d != LEDGER_DIR);
        me.save(host)?;
        Ok(me)
    }

    pub fn save(&self, host: &Host) -> anyhow::Result<()> {
        let mut me = serde_json::to_vec_pretty(self)?;
        me.push(b'\n');
        host.write(LEDGER_FILE, &me, 0o600)
    }

    /// Removes the ledger and its saved originals (after a complete uninstall).
    pub fn forget(host: &Host) -> anyhow::Result<()> {
        let dir = host.path(LEDGER_DIR);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub fn entry(&self, path: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.path == path)
    }

    /// Records `path`'s original (once) and saves the ledger, before the file is changed.
    pub fn remember(&mut self, host: &Host, path: &str, kind: Kind) -> anyhow::Result<()> {
        if self.entry(path).is_some() {
            return Ok(());
        }
        let (original, original_mode) = match host.read(path)? {
            None => (None, None),
            Some(bytes) => {
                self.next_backup += 1;
                let saved = format!("{LEDGER_DIR}/originals/{}", self.next_backup);
                host.create_dirs(&format!("{LEDGER_DIR}/originals"), 0o700)?;
                host.write(&saved, &bytes, 0o600)?;
                (Some(saved), host.mode(path))
            }
        };
        self.entries.push(Entry {
            path: path.to_string(),
            kind,
            original,
            original_mode,
            written: None,
        });
        self.save(host)
    }

    pub fn set_written(&mut self, host: &Host, path: &str, data: &[u8]) -> anyhow::Result<()> {
        if let Some(e) = self.entries.iter_mut().find(|e| e.path == path) {
            e.written = Some(sha256(data));
        }
        self.save(host)
    }

    pub fn drop_entry(&mut self, host: &Host, path: &str) -> anyhow::Result<()> {
        self.entries.retain(|e| e.path != path);
        self.save(host)
    }

    /// Records directories the installer created (they are removed on uninstall if empty).
    pub fn add_dirs(&mut self, host: &Host, dirs: Vec<String>) -> anyhow::Result<()> {
        if dirs.is_empty() {
            return Ok(());
        }
        for d in dirs {
            if !self.dirs.contains(&d) {
                self.dirs.push(d);
            }
        }
        self.save(host)
    }
}
