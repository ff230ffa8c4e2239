//! A real single-node Ceph cluster (Debian's ceph 16.2, "pacific") inside the test's network
//! namespace: one monitor, one manager, one OSD on `memstore` (no disks: the objects live in
//! the OSD's memory), one MDS, and a file system named [`FS_NAME`]. cephx is on.
//!
//! Everything runs by hand, without systemd, in the foreground, each daemon in its own process
//! group ([`Guarded`]). Every path Ceph would otherwise take from `/etc/ceph`, `/var/lib/ceph`,
//! `/var/log/ceph` or `/run/ceph` (config, keyring, `mon data`, `mgr data`, `osd data`,
//! `mds data`, `run dir`, admin sockets, pid files, `log file`, `mon cluster log file`,
//! `crash dir`) points under `<dir>/ceph/`, so parallel instances never share a path, and
//! the daemons bind only to the namespace's address (`ns.host_ip`): v2 on 3300 and v1 on 6789
//! for the monitor, 6800-7300 for the others.
//!
//! Everything is started with `nsenter --net=/run/netns/<ns>`: the namespace's network, the
//! host's mount namespace (unlike `ip netns exec`, which also unshares mounts). Nothing is
//! ever mounted, on the host or anywhere: host-side file access goes through libcephfs in
//! user space ([`Ceph::write_file`], [`Ceph::read_file`], [`Ceph::mkdir`]), driven by a small
//! `python3` script over Debian's `python3-cephfs` bindings (binary data through stdin and
//! stdout, paths through argv). `cephfs-shell` was not used: it is a separate package with
//! more dependencies (cmd2 and friends), and its `put`/`get` work on local files, where a
//! script keeps the bytes in pipes.
//!
//! Packages: `ceph-mon ceph-mgr ceph-osd ceph-mds ceph-common python3-cephfs`
//! (`--no-install-recommends`), plus `util-linux` for `nsenter`.
//!
//! Stopping: [`Drop`] SIGKILLs the daemons one by one, in the order MDS, OSD, manager, monitor
//! (each waited for before the next), also when a test fails. SIGKILL rather than SIGTERM on
//! purpose: all state is in memory or under `dir`, so there is nothing to flush, and a
//! graceful stop costs ~2 s per daemon and ~6.5 s for the MDS even with the monitor up (and
//! hangs the MDS once the monitor is gone). The fault helpers [`Ceph::stop_mon`] and
//! [`Ceph::stop_mds`] SIGKILL one daemon: "the server died".
//!
//! Secrets: the keys live in `<dir>/ceph/keyring` (0600). Errors and log excerpts this module
//! produces never contain them; only [`Ceph::admin_key`] and [`Ceph::authorize`] return keys,
//! and [`Ceph::ceph`] returns whatever the `ceph` command prints (see [`without_keys`]).

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::json;

use crate::netns::NetNs;
use crate::process::Guarded;

/// The file system every instance creates.
pub const FS_NAME: &str = "cephfs";

/// Bound on one `ceph` or libcephfs helper command.
const CMD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the `ceph` CLI tries to reach the monitor.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on the whole start-up.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// The python with Debian's `cephfs` module (a `python3` earlier in PATH may lack it).
const PYTHON: &str = "/usr/bin/python3";

/// One running cluster. Field order does not matter for stopping: [`Drop`] stops the daemons
/// explicitly in the safe order.
pub struct Ceph {
    mds: Option<Guarded>,
    osd: Option<Guarded>,
    mgr: Option<Guarded>,
    mon: Option<Guarded>,
    netns: String,
    ip: String,
    fsid: String,
    /// `<dir>/ceph`: config, keyring, data, run and log directories of this instance.
    pub root: PathBuf,
    pub conf: PathBuf,
    pub keyring: PathBuf,
    /// Start-up time, from the first daemon started to the cluster being ready.
    pub started_in: Duration,
}

/// Daemon names (`<type>.<id>`), fixed: each instance has its own namespace and directory.
const MON: &str = "a";
const MGR: &str = "x";
const OSD: &str = "0";
const MDS: &str = "a";

impl Ceph {
    /// Brings up mon, mgr, one memstore OSD, one MDS and the file system [`FS_NAME`] in `ns`,
    /// with all state under `dir/ceph`, and waits until `ceph -s` says HEALTH_OK with an
    /// active MDS, an active manager, the OSD up and every PG active+clean. Fails after ~60 s
    /// with the tails of the daemons' logs. The blocking work (~3 s on an idle machine) runs on
    /// tokio's blocking pool; [`Ceph::start_blocking`] is the same for callers without a runtime.
    pub async fn start(ns: &NetNs, dir: &Path) -> anyhow::Result<Ceph> {
        let (name, ip, dir) = (ns.name.clone(), ns.host_ip.clone(), dir.to_path_buf());
        tokio::task::spawn_blocking(move || Self::start_in(&name, &ip, &dir))
            .await
            .context("ceph start-up task")?
    }

    /// [`Ceph::start`] for synchronous callers.
    pub fn start_blocking(ns: &NetNs, dir: &Path) -> anyhow::Result<Ceph> {
        Self::start_in(&ns.name, &ns.host_ip, dir)
    }

    fn start_in(netns: &str, ip: &str, dir: &Path) -> anyhow::Result<Ceph> {
        let root = dir.join("ceph");
        let _ = std::fs::remove_dir_all(&root);
        for sub in [
            "log".to_string(),
            "run".to_string(),
            "crash".to_string(),
            "mon".to_string(),
            format!("mgr/{MGR}"),
            format!("osd/{OSD}"),
            format!("mds/{MDS}"),
        ] {
            std::fs::create_dir_all(root.join(sub))?;
        }
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))?;
        let fsid = new_uuid()?;
        let conf = root.join("ceph.conf");
        let keyring = root.join("keyring");
        std::fs::write(&conf, config(&root, &fsid, ip))?;

        let mut ceph = Ceph {
            mds: None,
            osd: None,
            mgr: None,
            mon: None,
            netns: netns.to_string(),
            ip: ip.to_string(),
            fsid,
            root,
            conf,
            keyring,
            started_in: Duration::ZERO,
        };
        ceph.make_keys()?;
        ceph.make_mon()?;

        let t0 = Instant::now();
        ceph.mon = Some(ceph.daemon("mon", MON)?);
        // The manager imports its python modules for a few seconds: start it at once. The MDS
        // waits as a standby until the file system exists.
        ceph.mgr = Some(ceph.daemon("mgr", MGR)?);
        ceph.mds = Some(ceph.daemon("mds", MDS)?);

        // One monitor session for the whole set-up (a `ceph` command costs ~0.45 s each).
        // The mgr's devicehealth module (always on) creates its pool once it runs; create it
        // here instead, so that readiness does not race with it.
        let osd_uuid = new_uuid()?;
        let out = ceph
            .mon_commands(&[
                json!({"prefix": "osd new", "uuid": osd_uuid}),
                json!({"prefix": "osd pool create", "pool": "cephfs_metadata", "pg_num": 8}),
                json!({"prefix": "osd pool create", "pool": "cephfs_data", "pg_num": 8}),
                json!({"prefix": "osd pool create", "pool": "device_health_metrics", "pg_num": 1}),
                json!({"prefix": "osd pool application enable",
                       "pool": "device_health_metrics", "app": "mgr_devicehealth"}),
                json!({"prefix": "fs new", "fs_name": FS_NAME,
                       "metadata": "cephfs_metadata", "data": "cephfs_data"}),
                json!({"prefix": "fs set", "fs_name": FS_NAME,
                       "var": "standby_count_wanted", "val": "0"}),
            ])
            .map_err(|e| ceph.with_logs(e))?;
        let id = out.first().map(|s| s.trim()).unwrap_or_default();
        anyhow::ensure!(id == OSD, "`osd new` gave osd.{id}");
        // Inside the namespace: it reads its config from the monitor.
        let mut mkfs = ceph.in_netns("ceph-osd");
        mkfs.arg("-c")
            .arg(&ceph.conf)
            .args(["--mkfs", "-i", OSD, "--osd-uuid", &osd_uuid]);
        exec(mkfs, None, CMD_TIMEOUT).map_err(|e| ceph.with_logs(e))?;
        ceph.osd = Some(ceph.daemon("osd", OSD)?);

        ceph.wait_ready(t0 + START_TIMEOUT)?;
        ceph.started_in = t0.elapsed();
        Ok(ceph)
    }

    /// One keyring with every entity, imported by `ceph-mon --mkfs`; all daemons read it.
    fn make_keys(&self) -> anyhow::Result<()> {
        let entities: [(&str, &[(&str, &str)]); 5] = [
            ("mon.", &[("mon", "allow *")]),
            (
                "client.admin",
                &[
                    ("mon", "allow *"),
                    ("osd", "allow *"),
                    ("mds", "allow *"),
                    ("mgr", "allow *"),
                ],
            ),
            (
                &format!("mgr.{MGR}"),
                &[
                    ("mon", "allow profile mgr"),
                    ("osd", "allow *"),
                    ("mds", "allow *"),
                ],
            ),
            (
                &format!("osd.{OSD}"),
                &[
                    ("mon", "allow profile osd"),
                    ("mgr", "allow profile osd"),
                    ("osd", "allow *"),
                ],
            ),
            (
                &format!("mds.{MDS}"),
                &[
                    ("mon", "allow profile mds"),
                    ("mgr", "allow profile mds"),
                    ("osd", "allow rwx"),
                    ("mds", "allow"),
                ],
            ),
        ];
        for (i, (name, caps)) in entities.iter().enumerate() {
            let mut cmd = Command::new("ceph-authtool");
            if i == 0 {
                cmd.arg("--create-keyring");
            }
            cmd.arg(&self.keyring).args(["--gen-key", "-n", name]);
            for (service, cap) in caps.iter() {
                cmd.args(["--cap", service, cap]);
            }
            exec(cmd, None, CMD_TIMEOUT)?;
        }
        std::fs::set_permissions(&self.keyring, std::fs::Permissions::from_mode(0o600))?;
        Ok(())
    }

    fn make_mon(&self) -> anyhow::Result<()> {
        let monmap = self.root.join("monmap");
        let mut cmd = Command::new("monmaptool");
        cmd.args(["--create", "--fsid", &self.fsid, "--addv", MON])
            .arg(format!("[v2:{},v1:{}]", self.mon_v2(), self.mon_v1()))
            .arg(&monmap);
        exec(cmd, None, CMD_TIMEOUT)?;
        let mut cmd = Command::new("ceph-mon");
        cmd.arg("-c")
            .arg(&self.conf)
            .args(["--mkfs", "-i", MON, "--monmap"])
            .arg(&monmap)
            .arg("--keyring")
            .arg(&self.keyring);
        exec(cmd, None, CMD_TIMEOUT)?;
        Ok(())
    }

    /// Starts `ceph-<kind> -f -i <id>` in the namespace, its stdout/stderr to
    /// `log/<kind>.out` (the daemon's own log is `log/<kind>.<id>.log`).
    fn daemon(&self, kind: &str, id: &str) -> anyhow::Result<Guarded> {
        let out = std::fs::File::create(self.root.join(format!("log/{kind}.out")))?;
        let mut cmd = self.in_netns(&format!("ceph-{kind}"));
        cmd.arg("-c")
            .arg(&self.conf)
            .args(["-f", "-i", id])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        Guarded::spawn(&format!("ceph-{kind}"), cmd)
    }

    /// `program` in the namespace's network, in the host's mount namespace.
    fn in_netns(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.netns))
            .arg("--")
            .arg(program);
        c
    }

    fn wait_ready(&mut self, until: Instant) -> anyhow::Result<()> {
        loop {
            let dead = [
                ("mon", &mut self.mon),
                ("mgr", &mut self.mgr),
                ("osd", &mut self.osd),
                ("mds", &mut self.mds),
            ]
            .into_iter()
            .find_map(|(kind, d)| d.as_mut().is_some_and(|d| !d.alive()).then_some(kind));
            if let Some(kind) = dead {
                let e = anyhow::anyhow!("ceph-{kind} exited during start-up");
                return Err(self.with_logs(e));
            }
            let last = match self.ceph_with(&["-s", "-f", "json"], Duration::from_secs(5)) {
                Ok(json) => match serde_json::from_str::<serde_json::Value>(&json) {
                    Ok(s) => match not_ready(&s) {
                        None => return Ok(()),
                        Some(why) => why,
                    },
                    Err(e) => format!("unreadable `ceph -s`: {e}"),
                },
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() > until {
                let e = anyhow::anyhow!(
                    "ceph not ready after {START_TIMEOUT:?}: {last}\n`ceph -s`:\n{}",
                    self.ceph_with(&["-s"], Duration::from_secs(5))
                        .unwrap_or_else(|e| format!("{e:#}"))
                );
                return Err(self.with_logs(e));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// `e` plus the last lines of every daemon's log and output file.
    fn with_logs(&self, e: anyhow::Error) -> anyhow::Error {
        let mut text = String::new();
        for name in [
            format!("mon.{MON}.log"),
            "mon.out".into(),
            format!("mgr.{MGR}.log"),
            "mgr.out".into(),
            format!("osd.{OSD}.log"),
            "osd.out".into(),
            format!("mds.{MDS}.log"),
            "mds.out".into(),
        ] {
            let path = self.root.join("log").join(&name);
            let log = std::fs::read_to_string(&path).unwrap_or_default();
            if log.trim().is_empty() {
                continue;
            }
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(25)..];
            text.push_str(&format!(
                "\n--- {} (last {} lines)\n",
                path.display(),
                tail.len()
            ));
            text.push_str(&without_keys(&tail.join("\n")));
        }
        anyhow::anyhow!("{e:#}\nceph logs:{text}")
    }

    pub fn fsid(&self) -> String {
        self.fsid.clone()
    }

    /// The monitor's msgr v1 address, `ip:6789`.
    pub fn mon_v1(&self) -> String {
        format!("{}:6789", self.ip)
    }

    /// The monitor's msgr v2 address, `ip:3300`.
    pub fn mon_v2(&self) -> String {
        format!("{}:3300", self.ip)
    }

    /// client.admin's base64 key.
    pub fn admin_key(&self) -> String {
        let text = std::fs::read_to_string(&self.keyring).unwrap_or_default();
        keyring_key(&text, "client.admin").unwrap_or_default()
    }

    /// Runs the `ceph` CLI with this instance's config and the admin keyring, inside the
    /// namespace, bounded (10 s to reach the monitor, killed 30 s later), and returns its stdout.
    /// Some commands print keys (`auth get`, `fs authorize`): see [`without_keys`].
    pub fn ceph(&self, args: &[&str]) -> anyhow::Result<String> {
        self.ceph_with(args, CONNECT_TIMEOUT)
    }

    fn ceph_with(&self, args: &[&str], connect: Duration) -> anyhow::Result<String> {
        let mut cmd = self.in_netns("ceph");
        cmd.arg("-c")
            .arg(&self.conf)
            .arg("--connect-timeout")
            .arg(connect.as_secs().max(1).to_string())
            .args(args);
        let out = exec(cmd, None, connect + CMD_TIMEOUT)
            .with_context(|| format!("ceph {}", args.join(" ")))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs monitor commands (JSON, as the `ceph` CLI sends them) in order over one librados
    /// session, as client.admin, inside the namespace; returns each command's output. Stops
    /// at the first failure.
    fn mon_commands(&self, cmds: &[serde_json::Value]) -> anyhow::Result<Vec<String>> {
        let mut cmd = self.in_netns(PYTHON);
        cmd.args(["-c", MON_COMMANDS_PY]).arg(&self.conf);
        let input = serde_json::to_vec(cmds)?;
        let out = exec(cmd, Some(&input), CMD_TIMEOUT).context("monitor commands")?;
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// `ceph fs authorize cephfs client.<client> <path> <perm>`, creating `path` in the file
    /// system first; returns the client's base64 key.
    pub fn authorize(&self, client: &str, path: &str, perm: &str) -> anyhow::Result<String> {
        if path != "/" {
            self.try_mkdir(path)?;
        }
        let entity = format!("client.{client}");
        let out = self.ceph(&["fs", "authorize", FS_NAME, &entity, path, perm])?;
        keyring_key(&out, &entity)
            .ok_or_else(|| anyhow::anyhow!("`ceph fs authorize` printed no key for {entity}"))
    }

    /// Writes `data` to `path` (absolute, in the file system) through libcephfs, replacing
    /// the file; the parent directory must exist. Panics on failure (see [`Ceph::try_write_file`]).
    pub fn write_file(&self, path: &str, data: &[u8]) {
        if let Err(e) = self.try_write_file(path, data) {
            panic!("writing {path} to cephfs: {e:#}");
        }
    }

    /// The contents of `path` through libcephfs. Panics on failure (see [`Ceph::try_read_file`]).
    pub fn read_file(&self, path: &str) -> Vec<u8> {
        self.try_read_file(path)
            .unwrap_or_else(|e| panic!("reading {path} from cephfs: {e:#}"))
    }

    /// Creates `path` and its missing parents through libcephfs. Panics on failure.
    pub fn mkdir(&self, path: &str) {
        if let Err(e) = self.try_mkdir(path) {
            panic!("mkdir {path} in cephfs: {e:#}");
        }
    }

    pub fn try_write_file(&self, path: &str, data: &[u8]) -> anyhow::Result<()> {
        self.libcephfs("write", path, Some(data)).map(|_| ())
    }

    pub fn try_read_file(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        self.libcephfs("read", path, None)
    }

    pub fn try_mkdir(&self, path: &str) -> anyhow::Result<()> {
        self.libcephfs("mkdir", path, None).map(|_| ())
    }

    fn libcephfs(&self, op: &str, path: &str, input: Option<&[u8]>) -> anyhow::Result<Vec<u8>> {
        anyhow::ensure!(
            path.starts_with('/'),
            "cephfs path must be absolute: {path}"
        );
        let mut cmd = self.in_netns(PYTHON);
        cmd.args(["-c", LIBCEPHFS_PY])
            .arg(&self.conf)
            .arg(op)
            .arg(path);
        let out = exec(cmd, input, CMD_TIMEOUT).with_context(|| format!("libcephfs {op}"))?;
        Ok(out.stdout)
    }

    /// SIGKILLs the monitor ("the monitor died"); the other daemons keep running.
    pub fn stop_mon(&mut self) {
        stop(&mut self.mon);
    }

    /// SIGKILLs the MDS ("the MDS died"); with no standby, the file system stays unserved.
    pub fn stop_mds(&mut self) {
        stop(&mut self.mds);
    }

    /// Process ids of the daemons still running (mon, mgr, osd, mds order).
    pub fn pids(&mut self) -> Vec<u32> {
        [&mut self.mon, &mut self.mgr, &mut self.osd, &mut self.mds]
            .into_iter()
            .flatten()
            .filter_map(|d| d.alive().then(|| d.pid()))
            .collect()
    }

    /// The daemons still running with their process ids: `("mon.a", pid)`, mgr, osd, mds.
    pub fn daemons(&mut self) -> Vec<(String, u32)> {
        [
            ("mon", MON, &mut self.mon),
            ("mgr", MGR, &mut self.mgr),
            ("osd", OSD, &mut self.osd),
            ("mds", MDS, &mut self.mds),
        ]
        .into_iter()
        .filter_map(|(kind, id, d)| {
            let d = d.as_mut()?;
            d.alive().then(|| (format!("{kind}.{id}"), d.pid()))
        })
        .collect()
    }

    /// The MDS's name for `ceph tell` (`mds.a`).
    pub fn mds_name(&self) -> String {
        format!("mds.{MDS}")
    }

    /// Sum of the daemons' resident set sizes, in bytes.
    pub fn rss_bytes(&mut self) -> u64 {
        self.pids()
            .into_iter()
            .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
            .filter_map(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .sum::<u64>()
            * 1024
    }
}

impl Drop for Ceph {
    fn drop(&mut self) {
        // MDS, OSD and manager before the monitor.
        stop(&mut self.mds);
        stop(&mut self.osd);
        stop(&mut self.mgr);
        stop(&mut self.mon);
    }
}

fn stop(d: &mut Option<Guarded>) {
    if let Some(mut d) = d.take() {
        d.stop(Signal::SIGKILL, Duration::from_secs(10));
    }
}

/// Why `ceph -s -f json` does not show a ready cluster, or `None` when it does.
fn not_ready(s: &serde_json::Value) -> Option<String> {
    let health = s["health"]["status"].as_str().unwrap_or("?");
    if health != "HEALTH_OK" {
        let checks: Vec<&String> = s["health"]["checks"]
            .as_object()
            .map(|m| m.keys().collect())
            .unwrap_or_default();
        return Some(format!("{health} {checks:?}"));
    }
    if s["mgrmap"]["available"] != serde_json::Value::Bool(true) {
        return Some("no active mgr".into());
    }
    if s["osdmap"]["num_up_osds"].as_u64() != Some(1) {
        return Some("osd not up".into());
    }
    let active_mds = s["fsmap"]["by_rank"]
        .as_array()
        .is_some_and(|r| r.iter().any(|m| m["status"] == "up:active"));
    if !active_mds {
        return Some("no active mds".into());
    }
    let pgs = &s["pgmap"];
    let total = pgs["num_pgs"].as_u64().unwrap_or(0);
    let clean: u64 = pgs["pgs_by_state"]
        .as_array()
        .map(|states| {
            states
                .iter()
                .filter(|st| st["state_name"] == "active+clean")
                .filter_map(|st| st["count"].as_u64())
                .sum()
        })
        .unwrap_or(0);
    if pgs["num_pools"].as_u64().unwrap_or(0) < 3 || total == 0 || clean != total {
        return Some(format!("pgs: {clean}/{total} active+clean"));
    }
    None
}

/// `text` without the lines that carry a key (`key = ...` in keyrings, `"key": ...` in JSON).
pub fn without_keys(text: &str) -> String {
    text.lines()
        .map(|l| {
            let t = l.trim_start();
            if t.starts_with("key") || t.starts_with("\"key\"") {
                "\t<key redacted>"
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The `key = ...` of section `[entity]` in keyring text.
fn keyring_key(text: &str, entity: &str) -> Option<String> {
    let header = format!("[{entity}]");
    let mut inside = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            inside = line == header;
        } else if inside {
            if let Some((k, v)) = line.split_once('=') {
                if k.trim() == "key" {
                    return Some(v.trim().to_string());
                }
            }
        }
    }
    None
}

fn new_uuid() -> anyhow::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/random/uuid")?
        .trim()
        .to_string())
}

/// Runs `cmd` in its own process group with `input` on stdin, killing the group after
/// `timeout`. An error carries the exit status and stderr (never stdout, which may hold keys).
fn exec(mut cmd: Command, input: Option<&[u8]>, timeout: Duration) -> anyhow::Result<Output> {
    cmd.process_group(0)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let what = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        cmd.get_args()
            .map(|a| a.to_string_lossy())
            .filter(|a| a.len() < 200)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    let pgid = Pid::from_raw(child.id() as i32);
    let stdin = child.stdin.take();
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let input = input.map(<[u8]>::to_vec);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let writer = std::thread::spawn(move || {
            if let (Some(mut w), Some(data)) = (stdin, input) {
                let _ = w.write_all(&data);
            }
        });
        let err_reader = std::thread::spawn(move || {
            let mut e = Vec::new();
            let _ = stderr.read_to_end(&mut e);
            e
        });
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        let err = err_reader.join().unwrap_or_default();
        let _ = writer.join();
        let status = child.wait();
        let _ = tx.send(status.map(|status| Output {
            status,
            stdout: out,
            stderr: err,
        }));
    });
    let out = match rx.recv_timeout(timeout) {
        Ok(r) => r.with_context(|| format!("waiting for {what}"))?,
        Err(_) => {
            let _ = killpg(pgid, Signal::SIGKILL);
            // The reader thread ends once the group is gone; its result no longer matters.
            anyhow::bail!("{what}: timed out after {timeout:?} (killed)");
        }
    };
    if !out.status.success() {
        anyhow::bail!(
            "{what} failed ({}): {}",
            out.status,
            without_keys(String::from_utf8_lossy(&out.stderr).trim())
        );
    }
    Ok(out)
}

fn config(root: &Path, fsid: &str, ip: &str) -> String {
    let r = root.display();
    format!(
        r#"[global]
fsid = {fsid}
mon host = [v2:{ip}:3300,v1:{ip}:6789]
public addr = {ip}
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = {r}/keyring
run dir = {r}/run
pid file = {r}/run/$name.pid
log file = {r}/log/$name.log
mon cluster log file = {r}/log/cluster.log
crash dir = {r}/crash
mon data = {r}/mon/$id
mgr data = {r}/mgr/$id
osd data = {r}/osd/$id
mds data = {r}/mds/$id
osd objectstore = memstore
memstore device bytes = 1073741824
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
# The test machine's disk may well be more than 70 % full; that is not the cluster's problem.
mon data avail warn = 2
mon data avail crit = 1
mgr initial modules = iostat
# The manager imports every module it finds, one after another (~4.5 s for all of Debian's):
# load only the always-on ones and iostat.
mgr disabled modules = alerts diskprediction_local influx insights localpool mirroring nfs osd_perf_query osd_support prometheus restful selftest snap_schedule stats telegraf test_orchestrator zabbix
# Faster start-up and state changes.
paxos propose interval = 0.1
mds beacon interval = 1
mgr stats period = 1
"#
    )
}

/// `python3 -c MON_COMMANDS_PY <conf>`: a JSON list of monitor commands on stdin, a JSON list
/// of their outputs on stdout.
const MON_COMMANDS_PY: &str = r#"
import json, sys, rados
r = rados.Rados(conffile=sys.argv[1])
r.connect(timeout=20)
outs = []
try:
    for cmd in json.load(sys.stdin):
        ret, out, err = r.mon_command(json.dumps(cmd), b'')
        if ret != 0:
            sys.exit('%s: %s (%d)' % (cmd['prefix'], err, ret))
        outs.append(out.decode(errors='replace'))
finally:
    r.shutdown()
json.dump(outs, sys.stdout)
"#;

/// libcephfs in user space: `python3 -c LIBCEPHFS_PY <conf> write|read|mkdir <path>`, data on
/// stdin/stdout.
const LIBCEPHFS_PY: &str = r#"
import os, sys, cephfs
conf, op, path = sys.argv[1:4]
fs = cephfs.LibCephFS(conffile=conf)
fs.conf_set('client_mount_timeout', '20')
fs.mount(filesystem_name='cephfs')
try:
    if op == 'write':
        data = sys.stdin.buffer.read()
        fd = fs.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        off = 0
        while off < len(data):
            off += fs.write(fd, data[off:off + (4 << 20)], off)
        fs.fsync(fd, 0)
        fs.close(fd)
    elif op == 'read':
        fd = fs.open(path, os.O_RDONLY)
        off = 0
        while True:
            chunk = fs.read(fd, off, 4 << 20)
            if not chunk:
                break
            sys.stdout.buffer.write(chunk)
            off += len(chunk)
        fs.close(fd)
    elif op == 'mkdir':
        fs.mkdirs(path, 0o755)
    else:
        sys.exit('unknown op ' + op)
finally:
    fs.unmount()
    fs.shutdown()
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyring_key_finds_the_right_section() {
        let text = "[client.a]\n\tkey = AAA==\n[client.b]\n\tkey = BBB==\n\tcaps mds = \"allow\"\n";
        assert_eq!(keyring_key(text, "client.b").as_deref(), Some("BBB=="));
        assert_eq!(keyring_key(text, "client.c"), None);
        assert!(!without_keys(text).contains("BBB"));
        assert!(without_keys(text).contains("caps mds"));
    }
}
