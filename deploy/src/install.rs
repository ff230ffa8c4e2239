//! `install` and `uninstall`: everything is planned (read and checked) before the first
//! byte is written, so a node whose containerd or Kata configuration the installer does not
//! understand is left exactly as it was.

use std::path::PathBuf;

use anyhow::{bail, Context};

use crate::containerd::{self, Schema};
use crate::host::Host;
use crate::kata;
use crate::label;
use crate::ledger::{sha256, Kind, Ledger};

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

/// Test hook: abort (as kill -9 would stop it) after this many file writes.
const ABORT_AFTER: &str = "CNFS_DEPLOY_ABORT_AFTER_WRITES";

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
    writes: usize,
    abort_after: Option<usize>,
}

#[derive(PartialEq, Eq)]
enum Outcome {
    Unchanged,
    Written,
    Kept,
}

impl Writer<'_> {
    fn dirs(&mut self, path: &str, mode: u32) -> anyhow::Result<()> {
        let created = self.host.create_dirs(path, mode)?;
        self.ledger.add_dirs(self.host, created)
    }

    fn put(&mut self, path: &str, data: &[u8], mode: u32, kind: Kind) -> anyhow::Result<Outcome> {
        let current = self.host.read(path)?;
        if current.as_deref() == Some(data) {
            self.report.say("unchanged", path);
            return Ok(Outcome::Unchanged);
        }
        if kind == Kind::CreateOnly && current.is_some() {
            self.report
                .say("kept", &format!("{path} (exists; never overwritten)"));
            return Ok(Outcome::Kept);
        }
        if let Some(parent) = path
            .rsplit_once('/')
            .map(|(d, _)| d)
            .filter(|d| !d.is_empty())
        {
            self.dirs(parent, 0o755)?;
        }
        self.ledger.remember(self.host, path, kind)?;
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
        self.writes += 1;
        if self.abort_after == Some(self.writes) {
            std::process::abort();
        }
        Ok(Outcome::Written)
    }
}

fn payload_file(o: &Options, rel: &str) -> anyhow::Result<Vec<u8>> {
    let p = o.payload.join(rel);
    std::fs::read(&p).with_context(|| format!("the installer's payload has no {}", p.display()))
}

fn abort_after() -> Option<usize> {
    std::env::var(ABORT_AFTER).ok().and_then(|v| v.parse().ok())
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

fn restart(o: &Options, report: &mut Report) -> anyhow::Result<()> {
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
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    report.say(
        "restarted",
        &format!("containerd ({})", o.restart.join(" ")),
    );
    report.restarted = true;
    Ok(())
}

pub fn install(o: &Options) -> anyhow::Result<Report> {
    let host = Host::new(&o.host_root);
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

    let mut w = Writer {
        host: &host,
        ledger: Ledger::open(&host)?,
        report: Report::default(),
        writes: 0,
        abort_after: abort_after(),
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
    let mut containerd_changed = false;
    for (path, data) in &containerd_files {
        let kind = if path == &o.containerd_config {
            Kind::Edited
        } else {
            Kind::Owned
        };
        containerd_changed |= w.put(path, data, 0o644, kind)? == Outcome::Written;
    }
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
    if containerd_changed {
        restart(o, &mut report)?;
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

pub fn uninstall(o: &Options) -> anyhow::Result<Report> {
    let host = Host::new(&o.host_root);
    let mut report = Report::default();
    // First: no new CNFS pod is scheduled here while the files go.
    set_label(o, &mut report, None)?;
    let Some(mut ledger) = Ledger::load(&host)? else {
        report.say(
            "nothing to do",
            "(cnfs-deploy installed nothing on this node)",
        );
        return Ok(report);
    };
    let mut containerd_changed = false;
    let entries: Vec<_> = ledger.entries.iter().rev().cloned().collect();
    for e in entries {
        let current = host.read(&e.path)?;
        let original = match &e.original {
            None => None,
            Some(saved) => Some(host.read(saved)?.with_context(|| {
                format!("the saved original of {} ({saved}) is missing", e.path)
            })?),
        };
        let untouched = match &current {
            None => e.written.is_none(),
            Some(c) => {
                e.written.as_deref() == Some(sha256(c).as_str()) || Some(c) == original.as_ref()
            }
        };
        let is_containerd = e.path == o.containerd_config || e.path == containerd::DROP_IN;
        match (untouched, e.kind) {
            (true, _) | (false, Kind::Owned) => {
                match &original {
                    None => host.remove(&e.path)?,
                    Some(bytes) => host.write(&e.path, bytes, e.original_mode.unwrap_or(0o644))?,
                }
                if current != original {
                    report.changed += 1;
                    containerd_changed |= is_containerd;
                    report.say(
                        if original.is_some() {
                            "restored"
                        } else {
                            "removed"
                        },
                        &e.path,
                    );
                }
            }
            (false, Kind::CreateOnly) => {
                report.say(
                    "kept",
                    &format!("{} (edited since it was installed)", e.path),
                );
            }
            (false, Kind::Edited) => {
                let text = String::from_utf8(current.unwrap_or_default())
                    .map_err(|_| anyhow::anyhow!("{} is not UTF-8", e.path))?;
                let out = containerd::without_import(&e.path, &containerd::without_block(&text))?;
                host.write(&e.path, out.as_bytes(), host.mode(&e.path).unwrap_or(0o644))?;
                report.changed += 1;
                containerd_changed = true;
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
    if containerd_changed {
        restart(o, &mut report)?;
    }
    let dirs = ledger.dirs.clone();
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
