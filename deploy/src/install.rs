//! `install` and `uninstall`: everything is planned (read and checked) before the first
//! byte is written, so a node whose containerd or Kata configuration the installer does not
//! understand is left exactly as it was.

use std::path::PathBuf;

use anyhow::{bail, Context};
use cnfs_protocols::spec::printable_within;

use crate::containerd::{self, Schema};
use crate::host::Host;
use crate::kata;
use crate::label;
use crate::ledger::{Kind, Ledger};

pub const SHIM: &str = "/opt/cnfs/bin/containerd-shim-cnfs-v2";
pub const CNFSCTL: &str = "/opt/cnfs/bin/cnfsctl";
pub const SHIM_CONFIG: &str = "/etc/cnfs/shim.toml";
pub const POLICY: &str = "/etc/cnfs/policy.toml";
pub const POLICY_EXAMPLE: &str = "/opt/cnfs/share/doc/policy.example.toml";
pub const SECRETS: &str = "/etc/cnfs/secrets";

/// The policy written when the node has none: nothing is allowed until the admin says so.
pub const DENY_ALL_POLICY: &str = "\
# /etc/cnfs/policy.toml: which network volumes pods may ask for (written by cnfs-deploy
# because there was none; it never overwrites this file, and uninstall leaves it once edited).
#
# Deny by default: a volume is mounted only when one [[allow]] entry matches all of it.
# The keys are explained, with examples, in /opt/cnfs/share/doc/policy.example.toml.
";

pub struct Options {
    pub host_root: PathBuf,
    /// The installer image's payload (bin/, share/kata/, configs/).
    pub payload: PathBuf,
    pub kata_config: String,
    pub kata_initrd: Option<String>,
    pub kata_shim: String,
    pub containerd_config: String,
    /// How containerd is restarted (argv); empty: not restarted.
    pub restart: Vec<String>,
    /// Run the restart command in the host's mount namespace (PID 1's; needs hostPID).
    pub restart_in_host: bool,
    /// The Kubernetes API and this node's name, to set and remove the node label.
    pub label: Option<(label::Api, String)>,
}

#[derive(Default)]
pub struct Report {
    pub lines: Vec<String>,
    pub changed: usize,
    pub restarted: bool,
}

impl Report {
    fn say(&mut self, verb: &str, what: &str) {
        let line = format!("{verb} {what}");
        println!("cnfs-deploy: {line}");
        self.lines.push(line);
    }
}

struct Writer<'a> {
    host: &'a Host,
    ledger: Ledger,
    report: Report,
}

impl Writer<'_> {
    fn dirs(&mut self, path: &str, mode: u32) -> anyhow::Result<()> {
        let missing = self.host.missing_dirs(path)?;
        self.ledger.add_dirs(self.host, missing)?;
        self.host.create_dirs(path, mode)?;
        Ok(())
    }

    fn put(&mut self, path: &str, data: &[u8], mode: u32, kind: Kind) -> anyhow::Result<()> {
        let current = self.host.read(path)?;
        if current.as_deref() == Some(data) {
            self.report.say("unchanged", path);
            return Ok(());
        }
        // Anything there, a dangling link included, is the admin's.
        if kind == Kind::CreateOnly && self.host.exists(path) {
            self.report
                .say("kept", &format!("{path} (exists; never overwritten)"));
            return Ok(());
        }
        // A file edited in place keeps its mode (config.toml may hold registry credentials).
        let mode = match kind {
            Kind::Edited => self.host.mode(path).unwrap_or(mode),
            _ => mode,
        };
        if let Some(parent) = path
            .rsplit_once('/')
            .map(|(d, _)| d)
            .filter(|d| !d.is_empty())
        {
            self.dirs(parent, 0o755)?;
        }
        self.ledger.note_edit(self.host, path, current.as_deref())?;
        self.ledger.remember(self.host, path, kind)?;
        self.ledger.set_pending(self.host, path, data)?;
        self.host.write(path, data, mode)?;
        self.ledger.set_written(self.host, path, data)?;
        self.report.say(
            if current.is_some() {
                "updated"
            } else {
                "created"
            },
            path,
        );
        self.report.changed += 1;
        Ok(())
    }
}

fn payload_file(o: &Options, rel: &str) -> anyhow::Result<Vec<u8>> {
    let p = o.payload.join(rel);
    std::fs::read(&p).with_context(|| format!("the installer's payload has no {}", p.display()))
}

/// What containerd's configuration becomes: (path, new bytes) for each file to write.
fn containerd_plan(host: &Host, o: &Options) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let path = &o.containerd_config;
    let text = host.read(path)?.with_context(|| {
        format!(
            "{path} does not exist: write containerd's configuration first (`containerd config \
             default`), or name it with --containerd-config"
        )
    })?;
    let text = String::from_utf8(text).map_err(|_| anyhow::anyhow!("{path} is not UTF-8"))?;
    let schema = containerd::schema(path, &text)?;
    let template = |rel: &str| -> anyhow::Result<String> {
        String::from_utf8(payload_file(o, rel)?).context("the containerd fragment is not UTF-8")
    };
    Ok(match schema {
        Schema::V2 => {
            let frag = containerd::fragment(
                &template("configs/containerd/config.toml.d/cnfs-runtime.toml")?,
                &schema,
                SHIM,
                kata::CONFIG,
            )?;
            vec![(
                path.clone(),
                containerd::with_block(path, &text, &frag)?.into_bytes(),
            )]
        }
        Schema::V3 { imports_drop_in } => {
            let frag = containerd::fragment(
                &template("configs/containerd/config-v3.toml.d/cnfs-runtime.toml")?,
                &schema,
                SHIM,
                kata::CONFIG,
            )?;
            let mut files = vec![(containerd::DROP_IN.to_string(), frag.into_bytes())];
            if !imports_drop_in {
                files.push((
                    path.clone(),
                    containerd::with_import(path, &text)?.into_bytes(),
                ));
            }
            files
        }
    })
}

fn shim_config(o: &Options, host: &Host) -> anyhow::Result<Vec<u8>> {
    if !host.exists(&o.kata_shim) {
        bail!(
            "Kata's shim {} is not on this node: install Kata first, or name it with --kata-shim",
            o.kata_shim
        );
    }
    let text = String::from_utf8(payload_file(o, "configs/cnfs/shim.toml")?)
        .context("shim.toml is not UTF-8")?;
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e| anyhow::anyhow!("the shipped shim.toml is not TOML ({e})"))?;
    doc["delegate"] = toml_edit::value(o.kata_shim.as_str());
    Ok(doc.to_string().into_bytes())
}

fn restart(o: &Options, host: &Host, report: &mut Report) -> anyhow::Result<()> {
    let Some((program, args)) = o.restart.split_first() else {
        report.say("not restarting", "containerd (no --restart-command)");
        return Ok(());
    };
    let mut cmd = std::process::Command::new(program);
    cmd.args(args);
    if o.restart_in_host {
        use std::os::unix::process::CommandExt;
        let ns = std::fs::File::open("/proc/1/ns/mnt")
            .context("opening PID 1's mount namespace (the DaemonSet needs hostPID: true)")?;
        // SAFETY: runs in the forked child before exec; setns(2) is a single system call
        // that allocates nothing and touches no lock, so it is safe after fork.
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNS)
                    .map_err(std::io::Error::from)
            });
        }
    }
    let out = cmd
        .output()
        .with_context(|| format!("running {}", o.restart.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            o.restart.join(" "),
            out.status,
            // systemctl's message; bounded like every echo of another program's output.
            printable_within(String::from_utf8_lossy(&out.stderr).trim(), 512)
        );
    }
    report.say(
        "restarted",
        &format!("containerd ({})", o.restart.join(" ")),
    );
    report.restarted = true;
    host.changed();
    Ok(())
}

fn parent(path: &str) -> &str {
    path.rsplit_once('/').map_or("/", |(d, _)| d)
}

pub fn install(o: &Options) -> anyhow::Result<Report> {
    let host = Host::new(&o.host_root);
    if let Some((_, node)) = &o.label {
        label::check_node_name(node)?;
    }
    let _lock = host.lock()?;
    // Plan: everything read and checked before anything is written.
    let containerd_files = containerd_plan(&host, o)?;
    let shim_toml = shim_config(o, &host)?;
    let drop_in_for = |hv: &str| {
        payload_file(o, &format!("configs/kata/{hv}/config.d/50-cnfs.toml")).map_err(|_| {
            anyhow::anyhow!("CNFS has no Kata drop-in for hypervisor {hv} (it ships qemu and clh)")
        })
    };
    let overlay = payload_file(o, "share/kata/cnfs-overlay.cpio.gz")?;
    let kata = kata::plan(
        &host,
        &o.kata_config,
        o.kata_initrd.as_deref(),
        drop_in_for,
        &overlay,
    )?;
    let bins = [
        (SHIM, payload_file(o, "bin/containerd-shim-cnfs-v2")?),
        (CNFSCTL, payload_file(o, "bin/cnfsctl")?),
    ];
    let kernel = payload_file(o, "share/kata/vmlinux-cnfs.container")?;
    let policy_example = payload_file(o, "configs/cnfs/policy.toml")?;
    // Every file the install may write: checked (and cleared of a killed run's temporary
    // files) before the first write.
    let targets: Vec<&str> = [
        SHIM,
        CNFSCTL,
        kata::KERNEL,
        kata::INITRD,
        kata::CONFIG,
        POLICY_EXAMPLE,
        SHIM_CONFIG,
        crate::ledger::LEDGER_FILE,
    ]
    .into_iter()
    .chain(containerd_files.iter().map(|(p, _)| p.as_str()))
    .collect();
    // An existing policy is kept as it is (a link, even a dangling one); only a directory
    // in its place is refused.
    let policy_kept = host.exists(POLICY) && !host.is_dir(POLICY);
    for t in targets.iter().chain((!policy_kept).then_some(&POLICY)) {
        host.check_target(t)?;
    }
    for t in targets.iter().chain([&POLICY]) {
        host.remove_temporaries(parent(t))?;
    }

    let mut w = Writer {
        host: &host,
        ledger: Ledger::open(&host)?,
        report: Report::default(),
    };
    for (path, data) in &bins {
        w.put(path, data, 0o755, Kind::Owned)?;
    }
    w.put(kata::KERNEL, &kernel, 0o644, Kind::Owned)?;
    w.put(kata::INITRD, &kata.initrd, 0o644, Kind::Owned)?;
    w.put(kata::CONFIG, &kata.config, 0o644, Kind::Owned)?;
    w.put(POLICY_EXAMPLE, &policy_example, 0o644, Kind::Owned)?;
    w.put(SHIM_CONFIG, &shim_toml, 0o644, Kind::Owned)?;
    w.put(POLICY, DENY_ALL_POLICY.as_bytes(), 0o644, Kind::CreateOnly)?;
    w.dirs(SECRETS, 0o700)?;
    // Recorded before containerd's files change: a run killed before the restart (or whose
    // restart failed) leaves it set, and the next run restarts containerd.
    for (path, data) in &containerd_files {
        if host.read(path)?.as_deref() != Some(data.as_slice()) {
            w.ledger.set_restart_pending(&host, true)?;
        }
    }
    for (path, data) in &containerd_files {
        let kind = if path == &o.containerd_config {
            Kind::Edited
        } else {
            Kind::Owned
        };
        w.put(path, data, 0o644, kind)?;
    }
    let mut ledger = w.ledger;
    let mut report = w.report;
    report.say(
        "configured",
        &format!(
            "runtime {} from Kata's {} ({}) and {}",
            containerd::HANDLER,
            kata.base,
            kata.hypervisor,
            kata.kata_initrd
        ),
    );
    if ledger.restart_pending {
        restart(o, &host, &mut report)?;
        ledger.set_restart_pending(&host, false)?;
    } else {
        report.say(
            "not restarting",
            "containerd (its configuration is unchanged)",
        );
    }
    // Last: the scheduler sends CNFS pods here only once everything above is in place.
    set_label(o, &mut report, Some(label::VALUE))?;
    Ok(report)
}

fn set_label(o: &Options, report: &mut Report, value: Option<&str>) -> anyhow::Result<()> {
    let Some((api, node)) = &o.label else {
        report.say(
            "not labelling",
            "the node (no NODE_NAME or not in a cluster)",
        );
        return Ok(());
    };
    api.label(node, value)?;
    match value {
        Some(v) => report.say("labelled", &format!("node {node} {}={v}", label::KEY)),
        None => report.say("unlabelled", &format!("node {node} ({})", label::KEY)),
    }
    Ok(())
}

/// What uninstall makes of one file.
enum Undo {
    /// Its original bytes and mode, or its absence.
    Restore(Option<Vec<u8>>, u32),
    /// The current file with only the installer's block or `imports` entry taken out.
    TakeOut(Vec<u8>),
    /// Left as it is, for this reason.
    Keep(&'static str),
}

pub fn uninstall(o: &Options) -> anyhow::Result<Report> {
    let host = Host::new(&o.host_root);
    let _lock = host.lock()?;
    let mut report = Report::default();
    // First: no new CNFS pod is scheduled here while the files go.
    set_label(o, &mut report, None)?;
    let Some(mut ledger) = Ledger::load(&host)? else {
        if Ledger::remove_leftover(&host)? {
            report.say("removed", "/opt/cnfs/ (left empty by a killed run)");
        }
        report.say(
            "nothing to do",
            "(cnfs-deploy installed nothing on this node)",
        );
        return Ok(report);
    };
    let entries: Vec<_> = ledger.entries.iter().rev().cloned().collect();
    for e in &entries {
        host.remove_temporaries(parent(&e.path))?;
    }
    for e in entries {
        let current = host.read(&e.path)?;
        // Ok(None): the file did not exist; Err: its saved copy is gone.
        let original = match &e.original {
            None => Ok(None),
            Some(saved) => host.read(saved)?.map(Some).ok_or(saved),
        };
        let untouched = !e.edited_since
            && match (&current, &original) {
                (None, _) => e.written.is_none(),
                (Some(c), Ok(orig)) => e.is_installers(c) || Some(c) == orig.as_ref(),
                (Some(c), Err(_)) => e.is_installers(c),
            };
        let mode = e.original_mode.unwrap_or(0o644);
        let undo = match (e.kind, untouched, original) {
            (Kind::Edited, _, Err(_)) | (Kind::Edited, false, Ok(_)) => match &current {
                // The admin deleted it: it stays deleted.
                None => Undo::Keep("deleted since it was installed"),
                Some(c) => {
                    let text = std::str::from_utf8(c)
                        .map_err(|_| anyhow::anyhow!("{} is not UTF-8", e.path))?;
                    let out =
                        containerd::without_import(&e.path, &containerd::without_block(text))?;
                    Undo::TakeOut(out.into_bytes())
                }
            },
            (_, _, Err(saved)) => bail!(
                "the saved original of {} ({saved}) is missing: put it back, or restore {} \
                 yourself and remove {saved}'s entry from the ledger",
                e.path,
                e.path
            ),
            (Kind::CreateOnly, false, Ok(_)) => Undo::Keep("edited since it was installed"),
            (_, _, Ok(orig)) => Undo::Restore(orig, mode),
        };
        let is_containerd = e.kind == Kind::Edited || e.path == containerd::DROP_IN;
        let after = match &undo {
            Undo::Restore(b, _) => b.clone(),
            Undo::TakeOut(b) => Some(b.clone()),
            Undo::Keep(_) => current.clone(),
        };
        if after != current && is_containerd {
            ledger.set_restart_pending(&host, true)?;
        }
        match undo {
            Undo::Keep(why) => {
                if current.is_some() {
                    report.say("kept", &format!("{} ({why})", e.path));
                }
            }
            Undo::Restore(orig, mode) if after != current => {
                match &orig {
                    None => host.remove(&e.path)?,
                    Some(bytes) => host.write(&e.path, bytes, mode)?,
                }
                report.changed += 1;
                report.say(
                    if orig.is_some() {
                        "restored"
                    } else {
                        "removed"
                    },
                    &e.path,
                );
            }
            Undo::Restore(..) => {}
            Undo::TakeOut(out) => {
                if after != current {
                    let mode = host.mode(&e.path).unwrap_or(0o644);
                    host.write(&e.path, &out, mode)?;
                    report.changed += 1;
                }
                report.say(
                    "edited",
                    &format!(
                        "{} (changed since install: only CNFS's part taken out)",
                        e.path
                    ),
                );
            }
        }
        ledger.drop_entry(&host, &e.path)?;
    }
    if ledger.restart_pending {
        restart(o, &host, &mut report)?;
    }
    // Directories before the ledger (a kill in between leaves a ledger that knows them);
    // those holding the ledger after it.
    let dirs = ledger.dirs.clone();
    for d in dirs.iter().rev() {
        if host.remove_dir_if_empty(d) {
            report.say("removed", &format!("{d}/"));
        }
    }
    Ledger::forget(&host)?;
    for d in dirs.iter().rev() {
        if host.remove_dir_if_empty(d) {
            report.say("removed", &format!("{d}/"));
        }
    }
    Ok(report)
}

/// For tests: the payload directory as `cargo xtask images` lays it out.
pub fn payload_layout() -> &'static [&'static str] {
    &[
        "bin/containerd-shim-cnfs-v2",
        "bin/cnfsctl",
        "share/kata/vmlinux-cnfs.container",
        "share/kata/cnfs-overlay.cpio.gz",
        "configs/cnfs/shim.toml",
        "configs/cnfs/policy.toml",
        "configs/containerd/config.toml.d/cnfs-runtime.toml",
        "configs/containerd/config-v3.toml.d/cnfs-runtime.toml",
        "configs/kata/qemu/config.d/50-cnfs.toml",
        "configs/kata/clh/config.d/50-cnfs.toml",
    ]
}
