//! A private Samba file server (Debian's `samba` 4.17, `smbd` only) inside the test's network
//! namespace, listening on `ns.host_ip:445`, with the shares and users the test asks for.
//!
//! No system state is read or written: `smbd` runs with its own `smb.conf` (`-s`), and every
//! path Samba would otherwise take from `/etc/samba`, `/var/lib/samba`, `/var/cache/samba`,
//! `/run/samba` or `/var/log/samba` (state, lock, private, cache, pid, ncalrpc, bind-dns,
//! usershare and winbindd directories, the passdb `tdbsam` file, the smbpasswd file, the log
//! file) points under `<dir>/samba/`. The clients this module runs (`smbclient`, `pdbedit`,
//! `smbstatus`) use the same file or a client one beside it, so they never touch
//! `/var/cache/samba` either.
//!
//! Users: Samba maps every SMB user to a Unix account (`getpwnam`) both when its password is
//! set and at every logon. Instead of adding accounts to the host (`useradd` and `userdel` on
//! drop would leave them behind whenever a test is killed, and would race other tests editing
//! `/etc/passwd`), or mapping every SMB user onto one existing account with `username map` (the
//! passdb then knows one password for all of them, so "user A with B's password" could not be
//! tested), the server runs with a private view of `/etc/passwd` and `/etc/group`: `ip netns
//! exec` gives each command a private mount namespace (mounts are slaves of the host's, never
//! propagated back), where a copy of the host's files plus the test's users is bind-mounted over
//! the originals before `smbd` or `pdbedit` starts. The host's files never change; the view
//! ends with the last process in it. Test users get unused uids from [`FIRST_UID`] up, and a
//! name that is already a host account is refused (`getpwnam` would find the host's first).
//!
//! Protocol: `server min protocol = SMB2_10` unless the test sets a global of its own (its
//! globals come after the defaults, and Samba keeps the last value). No NetBIOS, no printers,
//! no guest access (`map to guest = never`), and `rpc start on demand helpers = no`: file
//! sharing and mounts need no DCE/RPC, and the on-demand `samba-dcerpcd` would be a process
//! this module did not start. `smbd` runs `--foreground --no-process-group` in the process
//! group [`Guarded`] made for it, so stopping the group stops its forked children too.
//!
//! Secrets: passwords go to `pdbedit` on stdin and to `smbclient` in a 0600 credentials file
//! that is removed after the call, never in argv; errors never contain them.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::Signal;

use crate::netns::NetNs;
use crate::process::Guarded;

/// The port `smbd` listens on (SMB over TCP, no NetBIOS).
pub const SMB_PORT: u16 = 445;
/// The first uid (and gid) given to a test user; ids the host already uses are skipped.
pub const FIRST_UID: u32 = 61000;
/// Bound on the server's start-up.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on one client command (`smbclient`, `pdbedit`, `smbstatus`).
const CMD_TIMEOUT: Duration = Duration::from_secs(30);

/// A share the server exports.
#[derive(Clone, Debug)]
pub struct Share {
    pub name: String,
    dir: Option<PathBuf>,
    options: Vec<(String, String)>,
}

impl Share {
    /// A writable share backed by a fresh directory `<dir>/samba/shares/<name>`.
    pub fn new(name: &str) -> Self {
        Share {
            name: name.to_string(),
            dir: None,
            options: Vec::new(),
        }
    }

    /// Exports an existing directory instead of a fresh one.
    pub fn at(mut self, dir: &Path) -> Self {
        self.dir = Some(dir.to_path_buf());
        self
    }

    /// A share option, e.g. `("smb encrypt", "required")` or `("read only", "yes")`.
    pub fn option(mut self, key: &str, value: &str) -> Self {
        self.options.push((key.to_string(), value.to_string()));
        self
    }
}

/// An SMB user and its password.
#[derive(Clone)]
pub struct User {
    pub name: String,
    pub password: String,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("name", &self.name)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// What the server starts with.
#[derive(Clone, Debug, Default)]
pub struct SambaSetup {
    pub shares: Vec<Share>,
    pub users: Vec<User>,
    /// Extra `[global]` options, after (and so overriding) the defaults.
    pub global: Vec<(String, String)>,
}

impl SambaSetup {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn share(mut self, share: Share) -> Self {
        self.shares.push(share);
        self
    }

    pub fn user(mut self, name: &str, password: &str) -> Self {
        self.users.push(User {
            name: name.to_string(),
            password: password.to_string(),
        });
        self
    }

    pub fn global(mut self, key: &str, value: &str) -> Self {
        self.global.push((key.to_string(), value.to_string()));
        self
    }
}

/// What a client command printed. `smbclient` reports NT status codes on stdout or stderr
/// depending on the step, so [`ClientOutput::text`] joins both.
#[derive(Debug)]
pub struct ClientOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl ClientOutput {
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    /// The first `NT_STATUS_...` code in the output, e.g. `NT_STATUS_LOGON_FAILURE`.
    pub fn nt_status(&self) -> Option<String> {
        let text = self.text();
        let start = text.find("NT_STATUS_")?;
        let code: String = text[start..]
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        Some(code)
    }
}

/// One running `smbd`. Dropping it stops the server and its children (SIGTERM to the group,
/// SIGKILL after 3 s), reaps the leader and waits (up to 5 s) until no child runs.
pub struct Samba {
    /// `None` only while starting.
    proc: Option<Guarded>,
    netns: String,
    /// The server's address in the namespace (`ns.host_ip`).
    pub server_ip: String,
    /// `<dir>/samba`: config, state and log directories of this instance.
    pub root: PathBuf,
    pub conf: PathBuf,
    /// `smbd`'s log file.
    pub log: PathBuf,
    client_conf: PathBuf,
    passwd: PathBuf,
    group: PathBuf,
    shares: BTreeMap<String, PathBuf>,
    uids: BTreeMap<String, u32>,
    /// From spawning `smbd` to its socket listening.
    pub started_in: Duration,
}

impl Samba {
    /// Starts `smbd` in `ns` with `setup`'s shares and users; returns once it listens.
    pub fn start(ns: &NetNs, dir: &Path, setup: &SambaSetup) -> anyhow::Result<Self> {
        let root = dir.join("samba");
        let _ = std::fs::remove_dir_all(&root);
        for sub in [
            "state",
            "lock",
            "private",
            "cache",
            "pid",
            "ncalrpc",
            "bind-dns",
            "winbindd",
            "ntp_signd",
            "usershares",
            "log",
            "etc",
            "shares",
            "client",
        ] {
            std::fs::create_dir_all(root.join(sub))?;
        }
        // The passdb (password hashes) lives here: root's only, as in /var/lib/samba/private.
        std::fs::set_permissions(root.join("private"), std::fs::Permissions::from_mode(0o700))?;

        let mut shares = BTreeMap::new();
        for share in &setup.shares {
            check_name("share name", &share.name)?;
            for (k, v) in &share.options {
                check_option(&format!("share {} option", share.name), k, v)?;
            }
            let path = match &share.dir {
                Some(d) => d.clone(),
                None => {
                    let d = root.join("shares").join(&share.name);
                    std::fs::create_dir_all(&d)?;
                    // Every test user writes here as its own uid.
                    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777))?;
                    d
                }
            };
            anyhow::ensure!(
                shares.insert(share.name.clone(), path).is_none(),
                "share name {:?}: given twice",
                share.name
            );
        }
        for (k, v) in &setup.global {
            check_option("global option", k, v)?;
        }

        let conf = root.join("smb.conf");
        let log = root.join("log").join("log.smbd");
        std::fs::write(&conf, config(&root, &ns.host_ip, setup, &shares))?;
        let client_conf = root.join("client").join("smb.conf");
        std::fs::write(&client_conf, client_config(&root.join("client")))?;

        let passwd = root.join("etc").join("passwd");
        let group = root.join("etc").join("group");
        std::fs::copy("/etc/passwd", &passwd).context("copying /etc/passwd")?;
        std::fs::copy("/etc/group", &group).context("copying /etc/group")?;

        let out = std::fs::File::create(root.join("log").join("smbd.out"))?;
        let mut smbd = Samba {
            proc: None,
            netns: ns.name.clone(),
            server_ip: ns.host_ip.clone(),
            root,
            conf,
            log,
            client_conf,
            passwd,
            group,
            shares,
            uids: BTreeMap::new(),
            started_in: Duration::ZERO,
        };
        for user in &setup.users {
            smbd.add_user(&user.name, &user.password)?;
        }
        let mut cmd = smbd.in_server_view();
        // `-l`: the lines smbd logs before it has read its config (`log file`, the same
        // file) go there too, not to /var/log/samba.
        cmd.args(["smbd", "--foreground", "--no-process-group", "-s"])
            .arg(&smbd.conf)
            .arg("-l")
            .arg(smbd.root.join("log"))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let t0 = Instant::now();
        smbd.proc = Some(Guarded::spawn("smbd", cmd)?);
        smbd.wait_ready(t0 + START_TIMEOUT)?;
        smbd.started_in = t0.elapsed();
        Ok(smbd)
    }

    /// Adds an SMB user with `password` (a Unix account in the server's private view plus a
    /// passdb entry); also works while the server runs.
    pub fn add_user(&mut self, name: &str, password: &str) -> anyhow::Result<()> {
        check_name("user name", name)?;
        check_secret("password", password)?;
        anyhow::ensure!(
            !self.uids.contains_key(name),
            "user name {name:?}: given twice"
        );
        let host_passwd = std::fs::read_to_string("/etc/passwd")?;
        anyhow::ensure!(
            !host_passwd
                .lines()
                .any(|l| l.split(':').next() == Some(name)),
            "user name {name:?}: already a host account (the server would see the host's)"
        );
        let uid = free_id(&self.uids)?;
        // Rewritten in place, not replaced: a running server's bind mount keeps the inode.
        let mut passwd = std::fs::read_to_string(&self.passwd)?;
        passwd.push_str(&format!(
            "{name}:x:{uid}:{uid}:CNFS test user:/nonexistent:/usr/sbin/nologin\n"
        ));
        std::fs::write(&self.passwd, passwd)?;
        let mut group = std::fs::read_to_string(&self.group)?;
        group.push_str(&format!("{name}:x:{uid}:\n"));
        std::fs::write(&self.group, group)?;
        self.uids.insert(name.to_string(), uid);

        let mut cmd = self.in_server_view();
        cmd.args(timeout_prefix())
            .arg("pdbedit")
            .arg("-s")
            .arg(&self.conf)
            .args(["-a", "-t", "-u", name]);
        let out = run_bounded(cmd, Some(format!("{password}\n{password}\n").as_bytes()))?;
        anyhow::ensure!(
            out.success,
            "pdbedit -a {name} failed: {}",
            out.stderr.trim()
        );
        Ok(())
    }

    /// The host directory behind `share`.
    pub fn share_dir(&self, share: &str) -> Option<&Path> {
        self.shares.get(share).map(PathBuf::as_path)
    }

    /// The Unix uid (and gid) files written by `user` get on the host.
    pub fn uid_of(&self, user: &str) -> Option<u32> {
        self.uids.get(user).copied()
    }

    /// `//<server ip>/<share>`, the UNC path a client names.
    pub fn unc(&self, share: &str) -> String {
        format!("//{}/{share}", self.server_ip)
    }

    /// Runs `smbclient //<server>/<share> -c <commands>` inside the namespace as `user` with
    /// `password`, with `extra` arguments (e.g. `["-m", "NT1"]`). A failing client is not an
    /// error: the output says why.
    pub fn smbclient(
        &self,
        user: &str,
        password: &str,
        share: &str,
        commands: &str,
        extra: &[&str],
    ) -> anyhow::Result<ClientOutput> {
        check_secret("password", password)?;
        anyhow::ensure!(
            !user.contains(['\n', '\r', '\0']),
            "user name {user:?}: has a line break or NUL"
        );
        let auth = self
            .root
            .join("client")
            .join(format!("auth-{}", crate::unique_id()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode_0600()
            .open(&auth)
            .with_context(|| format!("creating {}", auth.display()))?;
        f.write_all(format!("username = {user}\npassword = {password}\n").as_bytes())?;
        drop(f);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns])
            .args(timeout_prefix())
            .arg("smbclient")
            .arg(self.unc(share))
            .arg("-s")
            .arg(&self.client_conf)
            .arg("-A")
            .arg(&auth)
            .args(["-c", commands])
            .args(extra)
            .current_dir(self.root.join("client"));
        let out = run_bounded(cmd, None);
        let _ = std::fs::remove_file(&auth);
        out
    }

    /// `smbstatus --json` (sessions, tree connects, their signing and encryption), read from
    /// the server's own state.
    pub fn status_json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_str(&self.smbstatus("--json")?).context("smbstatus --json output")
    }

    /// `smbstatus <what>` against this server's configuration: its standard output.
    fn smbstatus(&self, what: &str) -> anyhow::Result<String> {
        let mut cmd = self.in_server_view();
        cmd.args(timeout_prefix())
            .arg("smbstatus")
            .arg("-s")
            .arg(&self.conf)
            .arg(what);
        let out = run_bounded(cmd, None)?;
        anyhow::ensure!(
            out.success,
            "smbstatus {what} failed: {}",
            out.text().trim()
        );
        Ok(out.stdout)
    }

    /// The byte-range locks the server holds, as (start, size) of every lock listed,
    /// whatever file or client: from `smbstatus -B`'s text, whose offsets are 64-bit
    /// (Samba 4.17's JSON cuts them to an `int`: a lock at 2^62 shows as 0 there).
    pub fn byte_range_locks(&self) -> anyhow::Result<Vec<(u64, u64)>> {
        // `<pid> <dev:inode> R|W <start> <size> <share path> <name>` under a header.
        Ok(self
            .smbstatus("-B")?
            .lines()
            .filter_map(|line| {
                let w: Vec<&str> = line.split_whitespace().collect();
                match w.as_slice() {
                    [_, _, "R" | "W", start, size, ..] => {
                        Some((start.parse().ok()?, size.parse().ok()?))
                    }
                    _ => None,
                }
            })
            .collect())
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The leader's pid (the whole server is its process group).
    pub fn pid(&self) -> u32 {
        self.proc.as_ref().map(Guarded::pid).unwrap_or(0)
    }

    /// Kills the server outright (SIGKILL to its group): the "server died" fault. Returns
    /// once no process of the group runs any more.
    pub fn kill(&mut self) {
        self.stop(Signal::SIGKILL);
    }

    /// Signals the group, waits for the leader (reaped by [`Guarded`]), SIGKILLs the rest,
    /// then waits until the forked children (reparented to init when the leader went) are
    /// gone too, so a caller that looks right after finds no smbd left.
    fn stop(&mut self, sig: Signal) {
        let Some(mut p) = self.proc.take() else {
            return;
        };
        let pgid = p.pid();
        p.stop(sig, Duration::from_secs(3));
        let until = Instant::now() + Duration::from_secs(5);
        while group_alive(pgid) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A command (its program and arguments still to add) in the namespace's network, with
    /// the private `/etc/passwd` and `/etc/group` bind-mounted in the private mount namespace
    /// `ip netns exec` gives it.
    fn in_server_view(&self) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns, "sh", "-c"])
            .arg(
                "mount --bind \"$1\" /etc/passwd && mount --bind \"$2\" /etc/group && \
                 shift 2 && exec \"$@\"",
            )
            .arg("sh")
            .arg(&self.passwd)
            .arg(&self.group);
        c
    }

    fn wait_ready(&mut self, until: Instant) -> anyhow::Result<()> {
        let want = listen_address(&self.server_ip)?;
        loop {
            if !self.proc.as_mut().is_some_and(Guarded::alive) {
                anyhow::bail!("smbd exited during start-up{}", self.logs());
            }
            // The leader's /proc/<pid>/net is the namespace's: no process needed to look.
            let tcp = std::fs::read_to_string(format!("/proc/{}/net/tcp", self.pid()))
                .unwrap_or_default();
            if tcp.lines().skip(1).any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.get(1) == Some(&want.as_str()) && f.get(3) == Some(&"0A")
            }) {
                return Ok(());
            }
            if Instant::now() > until {
                anyhow::bail!(
                    "smbd not listening on {}:{SMB_PORT} after {START_TIMEOUT:?}{}",
                    self.server_ip,
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last lines of the log and of the captured stdout/stderr, for errors.
    fn logs(&self) -> String {
        let mut text = String::new();
        for path in [self.log.clone(), self.root.join("log").join("smbd.out")] {
            let log = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(25)..];
            text.push_str(&format!("\n--- {}\n{}", path.display(), tail.join("\n")));
        }
        text
    }
}

impl Drop for Samba {
    fn drop(&mut self) {
        self.stop(Signal::SIGTERM);
    }
}

/// True while a process of group `pgid` runs (zombies waiting for init do not count).
fn group_alive(pgid: u32) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten().any(|e| {
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // "pid (comm) state ppid pgrp ...": comm may hold spaces, so split after its ')'.
        let mut f = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .unwrap_or_default()
            .split_whitespace();
        let (state, pgrp) = (f.next(), f.nth(1));
        state.is_some_and(|s| s != "Z") && pgrp == Some(&*pgid.to_string())
    })
}

/// `OpenOptions` with mode 0600 (a credentials file).
trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}

impl Mode0600 for std::fs::OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600)
    }
}

/// `timeout` in front of a client command: SIGTERM at the bound, SIGKILL 2 s later.
fn timeout_prefix() -> [String; 4] {
    [
        "timeout".into(),
        "-k".into(),
        "2".into(),
        format!("{}", CMD_TIMEOUT.as_secs()),
    ]
}

/// Runs `cmd` to completion (bounded by the `timeout` prefix), `input` on stdin.
fn run_bounded(mut cmd: Command, input: Option<&[u8]>) -> anyhow::Result<ClientOutput> {
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    if let (Some(mut stdin), Some(data)) = (child.stdin.take(), input) {
        // A client that exits early closes its stdin; its output says why.
        let _ = stdin.write_all(data);
    }
    let out = child.wait_with_output()?;
    Ok(ClientOutput {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// `ip` as `/proc/net/tcp` prints a local address listening on [`SMB_PORT`].
fn listen_address(ip: &str) -> anyhow::Result<String> {
    let addr: std::net::Ipv4Addr = ip
        .parse()
        .with_context(|| format!("server address {ip:?}: not IPv4"))?;
    // The kernel prints the network-order word as a native integer.
    Ok(format!(
        "{:08X}:{SMB_PORT:04X}",
        u32::from_ne_bytes(addr.octets())
    ))
}

/// The lowest id from [`FIRST_UID`] that no host user or group and no test user has.
fn free_id(taken: &BTreeMap<String, u32>) -> anyhow::Result<u32> {
    let mut used: Vec<u32> = taken.values().copied().collect();
    for file in ["/etc/passwd", "/etc/group"] {
        let text = std::fs::read_to_string(file)?;
        used.extend(
            text.lines()
                .filter_map(|l| l.split(':').nth(2).and_then(|id| id.parse::<u32>().ok())),
        );
    }
    (FIRST_UID..FIRST_UID + 1000)
        .find(|id| !used.contains(id))
        .ok_or_else(|| anyhow::anyhow!("no free uid from {FIRST_UID}"))
}

/// Share and user names: what smb.conf section names and passwd entries can hold safely.
fn check_name(field: &str, value: &str) -> anyhow::Result<()> {
    let ok = !value.is_empty()
        && value.len() <= 32
        && value.starts_with(|c: char| c.is_ascii_lowercase())
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    anyhow::ensure!(
        ok,
        "{field} {value:?}: use 1-32 of a-z 0-9 - _, starting with a letter"
    );
    // Samba's own sections.
    anyhow::ensure!(
        !["global", "homes", "printers", "ipc"].contains(&value),
        "{field} {value:?}: reserved by Samba"
    );
    Ok(())
}

/// An smb.conf option: one line, a key without `=` or brackets.
fn check_option(field: &str, key: &str, value: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !key.trim().is_empty() && !key.contains(['=', '[', ']', '\n', '\r', '\0']),
        "{field} {key:?}: not an option name"
    );
    anyhow::ensure!(
        !value.contains(['\n', '\r', '\0']),
        "{field} {key:?}: value has a line break or NUL"
    );
    Ok(())
}

/// A password: one line (it goes to `pdbedit` and a credentials file line by line).
fn check_secret(field: &str, value: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !value.is_empty() && !value.contains(['\n', '\r', '\0']),
        "{field}: empty, or has a line break or NUL"
    );
    Ok(())
}

fn config(root: &Path, ip: &str, setup: &SambaSetup, shares: &BTreeMap<String, PathBuf>) -> String {
    let r = root.display();
    let mut text = format!(
        r#"[global]
server role = standalone server
netbios name = CNFS-SMB
workgroup = CNFS
interfaces = {ip}/24
bind interfaces only = yes
smb ports = {SMB_PORT}
disable netbios = yes
server min protocol = SMB2_10
map to guest = never
rpc start on demand helpers = no
load printers = no
printcap name = /dev/null
disable spoolss = yes
state directory = {r}/state
lock directory = {r}/lock
private dir = {r}/private
cache directory = {r}/cache
pid directory = {r}/pid
ncalrpc dir = {r}/ncalrpc
binddns dir = {r}/bind-dns
usershare max shares = 0
usershare path = {r}/usershares
winbindd socket directory = {r}/winbindd
ntp signd socket directory = {r}/ntp_signd
smb passwd file = {r}/private/smbpasswd
passdb backend = tdbsam:{r}/private/passdb.tdb
logging = file
log file = {r}/log/log.smbd
max log size = 0
log level = 1
"#
    );
    for (k, v) in &setup.global {
        text.push_str(&format!("{k} = {v}\n"));
    }
    for share in &setup.shares {
        let path = shares.get(&share.name).map(|p| p.display().to_string());
        text.push_str(&format!(
            "\n[{}]\npath = {}\nread only = no\n",
            share.name,
            path.unwrap_or_default()
        ));
        for (k, v) in &share.options {
            text.push_str(&format!("{k} = {v}\n"));
        }
    }
    text
}

/// The clients' own config: SMB2 and up, caches and locks in `dir`.
fn client_config(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"[global]
client min protocol = SMB2_10
state directory = {d}
lock directory = {d}
private dir = {d}
cache directory = {d}
pid directory = {d}
ncalrpc dir = {d}
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_address_matches_proc_net_tcp_format() {
        // From a real /proc/net/tcp: 10.250.1.1:445 listening.
        assert_eq!(listen_address("10.250.1.1").expect("ipv4"), "0101FA0A:01BD");
        let e = listen_address("nfs.cnfs.test").expect_err("not an address");
        assert!(format!("{e:#}").contains("server address"), "{e:#}");
    }

    #[test]
    fn names_and_options_that_would_break_the_config_are_refused() {
        for (name, why) in [
            ("", "use 1-32"),
            ("Data", "use 1-32"),
            ("da ta", "use 1-32"),
            ("x]\n[global", "use 1-32"),
            ("global", "reserved"),
            ("ipc", "reserved"),
        ] {
            let e = check_name("share name", name).expect_err(name);
            let msg = format!("{e:#}");
            assert!(msg.contains("share name") && msg.contains(why), "{msg}");
        }
        check_name("share name", "data-1").expect("plain name");
        let e = check_option("share data option", "path", "/x\n[evil]").expect_err("newline");
        assert!(
            format!("{e:#}").contains("share data option \"path\""),
            "{e:#}"
        );
        let e = check_option("global option", "a = b", "c").expect_err("'=' in key");
        assert!(format!("{e:#}").contains("not an option name"), "{e:#}");
        let e = check_secret("password", "a\nb").expect_err("newline");
        assert!(
            !format!("{e:#}").contains("a\nb"),
            "the error shows the secret"
        );
    }

    #[test]
    fn nt_status_is_found_on_either_stream() {
        let out = ClientOutput {
            success: false,
            stdout: String::new(),
            stderr: "session setup failed: NT_STATUS_LOGON_FAILURE\n".into(),
        };
        assert_eq!(out.nt_status().as_deref(), Some("NT_STATUS_LOGON_FAILURE"));
        let ok = ClientOutput {
            success: true,
            stdout: "putting file".into(),
            stderr: String::new(),
        };
        assert_eq!(ok.nt_status(), None);
    }
}
