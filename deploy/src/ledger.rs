//! What the installer changed on the node, so that `uninstall` can put every byte back.
//!
//! Before a file is first changed, its original bytes and mode (or its absence) are saved
//! under [`LEDGER_DIR`] and the ledger is written; before each write the hash of the new
//! bytes is recorded too; only then is the file replaced. So a kill at any point leaves
//! either an unchanged file or a ledger entry that knows its original and recognises the
//! installer's bytes, and a later run (install or uninstall) finishes the job. A later
//! install never saves the installer's own output as an "original".

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::host::Host;

/// The installer's own directory on the node.
pub const OPT_CNFS: &str = "/opt/cnfs";
/// The installer's own records on the node.
pub const LEDGER_DIR: &str = "/opt/cnfs/.deploy";
pub const LEDGER_FILE: &str = "/opt/cnfs/.deploy/ledger.json";
const ORIGINALS: &str = "/opt/cnfs/.deploy/originals";

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
    /// sha256 of what the installer is writing (set before the write, cleared after): a
    /// kill in between leaves either bytes, and both are the installer's.
    #[serde(default)]
    pub pending: Option<String>,
    /// The admin changed the file after the installer wrote it and a later install wrote it
    /// again: the original is stale, so uninstall takes out only the installer's part.
    #[serde(default)]
    pub edited_since: bool,
}

impl Entry {
    /// Whether `bytes` are what the installer wrote (or was writing) there.
    pub fn is_installers(&self, bytes: &[u8]) -> bool {
        let h = sha256(bytes);
        self.written.as_deref() == Some(h.as_str()) || self.pending.as_deref() == Some(h.as_str())
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Ledger {
    pub entries: Vec<Entry>,
    /// Directories the installer created, outermost first.
    pub dirs: Vec<String>,
    #[serde(default)]
    next_backup: u64,
    /// containerd's configuration was (or is being) changed and containerd has not been
    /// restarted since: the next run restarts it even if it changes nothing.
    #[serde(default)]
    pub restart_pending: bool,
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

    /// Whether `/opt/cnfs` is what a run killed before saving its first ledger (or after
    /// removing its last) leaves: empty, or only a `.deploy` holding no ledger. No one else
    /// makes such a directory, so it is the installer's.
    pub fn leftover(host: &Host) -> bool {
        let Some(names) = host.list(OPT_CNFS) else {
            return false;
        };
        names
            .iter()
            .all(|n| format!("{OPT_CNFS}/{n}") == LEDGER_DIR)
            && host
                .list(LEDGER_DIR)
                .unwrap_or_default()
                .iter()
                .all(|n| n.starts_with(crate::host::TEMP_PREFIX))
    }

    /// Removes a [`Ledger::leftover`] `/opt/cnfs`; says whether there was one.
    pub fn remove_leftover(host: &Host) -> anyhow::Result<bool> {
        if !Self::leftover(host) {
            return Ok(false);
        }
        host.remove_temporaries(LEDGER_DIR)?;
        host.remove_dir_if_empty(LEDGER_DIR);
        Ok(host.remove_dir_if_empty(OPT_CNFS))
    }

    /// The ledger for an install: the existing one, or a new one (with the directories
    /// created for it recorded, so uninstall removes them too).
    pub fn open(host: &Host) -> anyhow::Result<Self> {
        if let Some(me) = Self::load(host)? {
            host.remove_temporaries(LEDGER_DIR)?;
            host.remove_temporaries(ORIGINALS)?;
            return Ok(me);
        }
        let leftover = Self::leftover(host);
        host.remove_temporaries(LEDGER_DIR)?;
        let mut dirs = host.create_dirs(OPT_CNFS, 0o755)?;
        if leftover && dirs.is_empty() {
            dirs.push(OPT_CNFS.to_string());
        }
        // The ledger's own directory goes with `forget`, not with the other directories.
        host.create_dirs(LEDGER_DIR, 0o700)?;
        let me = Ledger {
            dirs,
            ..Ledger::default()
        };
        me.save(host)?;
        Ok(me)
    }

    pub fn save(&self, host: &Host) -> anyhow::Result<()> {
        let mut me = serde_json::to_vec_pretty(self)?;
        me.push(b'\n');
        host.write(LEDGER_FILE, &me, 0o600)
    }

    /// Removes the ledger and its saved originals (after a complete uninstall). The ledger
    /// file goes last but one: until then a killed uninstall is finished by the next one.
    pub fn forget(host: &Host) -> anyhow::Result<()> {
        host.remove_tree(ORIGINALS)?;
        host.remove_temporaries(LEDGER_DIR)?;
        host.remove(LEDGER_FILE)?;
        host.remove_dir_if_empty(LEDGER_DIR);
        Ok(())
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
                let saved = format!("{ORIGINALS}/{}", self.next_backup);
                host.create_dirs(ORIGINALS, 0o700)?;
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
            pending: None,
            edited_since: false,
        });
        self.save(host)
    }

    /// Before an install rewrites `path` (now `current`): if the admin changed it since the
    /// installer last wrote it, its saved original no longer stands for it; say so.
    pub fn note_edit(
        &mut self,
        host: &Host,
        path: &str,
        current: Option<&[u8]>,
    ) -> anyhow::Result<()> {
        let Some(e) = self.entry(path) else {
            return Ok(());
        };
        let Some(current) = current else {
            return Ok(());
        };
        if e.edited_since || e.is_installers(current) {
            return Ok(());
        }
        let original = match &e.original {
            Some(saved) => host.read(saved)?,
            None => None,
        };
        if original.as_deref() == Some(current) {
            return Ok(());
        }
        if let Some(e) = self.entries.iter_mut().find(|e| e.path == path) {
            e.edited_since = true;
        }
        self.save(host)
    }

    /// Records the hash of the bytes about to be written to `path` (before the write).
    pub fn set_pending(&mut self, host: &Host, path: &str, data: &[u8]) -> anyhow::Result<()> {
        if let Some(e) = self.entries.iter_mut().find(|e| e.path == path) {
            e.pending = Some(sha256(data));
        }
        self.save(host)
    }

    pub fn set_written(&mut self, host: &Host, path: &str, data: &[u8]) -> anyhow::Result<()> {
        if let Some(e) = self.entries.iter_mut().find(|e| e.path == path) {
            e.written = Some(sha256(data));
            e.pending = None;
        }
        self.save(host)
    }

    pub fn drop_entry(&mut self, host: &Host, path: &str) -> anyhow::Result<()> {
        self.entries.retain(|e| e.path != path);
        self.save(host)
    }

    /// Sets or clears [`Ledger::restart_pending`] (saved when it changes).
    pub fn set_restart_pending(&mut self, host: &Host, pending: bool) -> anyhow::Result<()> {
        if self.restart_pending == pending {
            return Ok(());
        }
        self.restart_pending = pending;
        self.save(host)
    }

    /// Records directories the installer is about to create (removed on uninstall if
    /// empty): recorded first, so a kill between the two leaks none.
    pub fn add_dirs(&mut self, host: &Host, dirs: Vec<String>) -> anyhow::Result<()> {
        let before = self.dirs.len();
        for d in dirs {
            if !self.dirs.contains(&d) {
                self.dirs.push(d);
            }
        }
        if self.dirs.len() == before {
            return Ok(());
        }
        self.save(host)
    }
}
