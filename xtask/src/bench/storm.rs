//! The mount storm: N guests (default 4; `CNFS_STORM_GUESTS=n`) on one bridge in one namespace,
//! all booted first, mount the same nfs-ganesha export and then the same CephFS through their
//! agents at the same moment (a barrier releases every `Mount` together; each is timed on its
//! own), then each writes into its own directory. Next to that, in the same run and the same
//! guests, each guest mounting and writing alone. The servers' side: resident memory, CPU time,
//! file descriptors, TCP connections from the guests and per-client state (ganesha's NFSv4
//! client records, the MDS's sessions and caps) with no client, one and N, measured before
//! any data is written (so that I/O buffers do not pass for per-client state) and again after
//! the writes; the kernel CephFS client's `caps_max` against its default; and at the end how
//! long a guest that dies with its volumes mounted and files open keeps its state on each
//! server.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cnfs_protocols::agent;
use cnfs_protocols::agent_ttrpc::AgentClient;
use cnfs_testbed::ceph::{Ceph, FS_NAME};
use cnfs_testbed::ganesha::{EXPORT, LEASE_LIFETIME_S};
use cnfs_testbed::vm::ctx;
use cnfs_testbed::{
    message_of, mount_request, nfs_volume, Artifacts, Ganesha, GuestExec, NetNs, TempDir, Vm,
};
use tokio::sync::Barrier;

use super::percentile;

/// Bound on one agent call or guest command.
const T: Duration = Duration::from_secs(240);
/// The agent's own deadline for one mount.
const MOUNT_DEADLINE_MS: u32 = 180_000;
const WRITE_MIB: u64 = 16;
const FILES: u64 = 200;
/// Each guest alone, this many times.
const SOLO_ROUNDS: usize = 2;
/// All guests at once, this many times.
const STORM_ROUNDS: usize = 3;
const DEFAULT_GUESTS: usize = 4;
/// ganesha's default `RPC_Idle_Timeout_S` (the test bed does not set it).
const GANESHA_RPC_IDLE_S: u64 = 300;
/// The kernel CephFS client's cap limit tried against its default (none). The kernel raises
/// any smaller value to `max(max_readdir, 1024)` (`ceph_adjust_caps_max_min`), so 1024 is the
/// lowest that takes effect.
const CAPS_MAX: &str = "1024";
/// Files each guest creates in the caps comparison: more than `CAPS_MAX`.
const CAPS_FILES: u64 = 3000;
/// The contention control: a CPU-bound shell loop in the guest, no I/O and no server, alone
/// and on every guest at once (this machine emulates N vCPUs on 2 cores).
const SPIN: &str = "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done";
const CONTROL_ROUNDS: usize = 3;

/// What one task needs to drive one guest (the VMs themselves stay with `run`).
#[derive(Clone)]
struct Guest {
    i: usize,
    agent: AgentClient,
    exec: GuestExec,
}

#[derive(Clone)]
enum Fs {
    Nfs {
        server: String,
    },
    Ceph {
        monitor: String,
        key: String,
        options: Vec<(String, String)>,
    },
}

impl Fs {
    fn label(&self) -> &'static str {
        match self {
            Fs::Nfs { .. } => "NFSv4.1",
            Fs::Ceph { .. } => "CephFS",
        }
    }

    fn spec(&self, name: &str) -> agent::VolumeSpec {
        match self {
            Fs::Nfs { server } => nfs_volume(name, server, EXPORT, "4.1"),
            Fs::Ceph {
                monitor,
                key,
                options,
            } => {
                let mut spec = agent::VolumeSpec {
                    name: name.into(),
                    ..Default::default()
                };
                spec.set_cephfs(agent::CephFsSource {
                    monitors: vec![monitor.clone()],
                    fs_name: FS_NAME.into(),
                    path: "/".into(),
                    client: "admin".into(),
                    secret: key.clone(),
                    ..Default::default()
                });
                spec.options.extend(options.iter().cloned());
                spec
            }
        }
    }
}

/// The guest's agent mounts `fs` as volume `name`, with a sandbox id of its own (as the
/// wrapper sends one per pod: the NFSv4 client identity derives from it; two guests sharing
/// one would take each other's NFSv4 state).
async fn mount(g: &Guest, fs: &Fs, name: &str) -> Result<Duration, String> {
    let mut req = mount_request(fs.spec(name), MOUNT_DEADLINE_MS);
    req.sandbox_id = format!("storm-{}", g.i);
    let t = Instant::now();
    g.agent
        .mount(ctx(T), &req)
        .await
        .map_err(|e| format!("guest {} Mount {name}: {}", g.i, message_of(&e)))?;
    Ok(t.elapsed())
}

async fn unmount(g: &Guest, name: &str) -> Result<(), String> {
    g.agent
        .unmount(
            ctx(T),
            &agent::UnmountRequest {
                name: name.into(),
                timeout_ms: 60_000,
                ..Default::default()
            },
        )
        .await
        .map(|_| ())
        .map_err(|e| format!("guest {} Unmount {name}: {}", g.i, message_of(&e)))
}

/// The directory guest `i` writes in, in volume `name`.
fn sub_dir(g: &Guest, name: &str) -> String {
    format!("/run/cnfs/volumes/{name}/g{}", g.i)
}

/// `WRITE_MIB` MiB + fsync, then `FILES` files of 1 KiB, in the guest's own directory of
/// volume `name`: the time the guest's tool measured for both (not the exec helper's round
/// trip).
async fn write(g: &Guest, name: &str) -> Result<Duration, String> {
    let dir = sub_dir(g, name);
    let cmd = format!(
        "mkdir -p {dir} && cnfs-io-bench write {dir} {WRITE_MIB} && \
         cnfs-io-bench create {dir} {FILES}"
    );
    let fail = |why: String| format!("guest {} write in {dir}: {why}", g.i);
    let out = g
        .exec
        .run(&cmd, T)
        .await
        .map_err(|e| fail(format!("{e:#}")))?;
    if out.code != 0 {
        return Err(fail(format!("exit {}: {}", out.code, out.stderr.trim())));
    }
    let secs: Vec<f64> = out
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["secs"].as_f64())
        .collect();
    if secs.len() != 2 {
        return Err(fail(format!("tool output {:?}", out.stdout)));
    }
    Ok(Duration::from_secs_f64(secs.iter().sum()))
}

/// Removes what `write` left (untimed: memstore keeps Ceph's objects in the OSD's memory) and
/// unmounts.
async fn clean_and_unmount(g: &Guest, name: &str, errors: &mut Vec<String>) {
    if let Err(e) = g.exec.ok(&format!("rm -rf {}", sub_dir(g, name))).await {
        errors.push(format!("guest {} cleaning {name}: {e:#}", g.i));
    }
    if let Err(e) = unmount(g, name).await {
        errors.push(e);
    }
}

async fn spin(g: &Guest) -> Result<Duration, String> {
    let t = Instant::now();
    g.exec
        .ok(SPIN)
        .await
        .map_err(|e| format!("guest {} CPU loop: {e:#}", g.i))?;
    Ok(t.elapsed())
}

/// The control: the CPU loop on each guest alone, then on all at once; (alone, at once).
async fn control(guests: &[Guest], errors: &mut Vec<String>) -> (Vec<Duration>, Vec<Duration>) {
    let (mut alone, mut together) = (Vec::new(), Vec::new());
    for _ in 0..CONTROL_ROUNDS {
        for g in guests {
            match spin(g).await {
                Ok(d) => alone.push(d),
                Err(e) => errors.push(e),
            }
        }
    }
    for _ in 0..CONTROL_ROUNDS {
        for r in at_once(guests, |g| async move { spin(&g).await }).await {
            match r {
                Ok(d) => together.push(d),
                Err(e) => errors.push(e),
            }
        }
    }
    (alone, together)
}

/// Runs `f` on every guest at once: each waits at one barrier, so that all start together.
async fn at_once<F, Fut, R>(guests: &[Guest], f: F) -> Vec<R>
where
    F: Fn(Guest) -> Fut,
    Fut: std::future::Future<Output = R> + Send + 'static,
    R: Send + 'static,
{
    let barrier = Arc::new(Barrier::new(guests.len()));
    let tasks: Vec<_> = guests
        .iter()
        .map(|g| {
            let (barrier, work) = (barrier.clone(), f(g.clone()));
            tokio::spawn(async move {
                barrier.wait().await;
                work.await
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        match t.await {
            Ok(r) => out.push(r),
            Err(e) => panic!("storm task failed: {e}"),
        }
    }
    out
}

/// `name` mounted on every guest at once: the guests whose Mount succeeded; times and errors
/// appended.
async fn mount_all(
    guests: &[Guest],
    fs: &Fs,
    name: &str,
    times: &mut Vec<Duration>,
    errors: &mut Vec<String>,
) -> Vec<Guest> {
    let (fs2, name2) = (fs.clone(), name.to_string());
    let results = at_once(guests, move |g| {
        let (fs, name) = (fs2.clone(), name2.clone());
        async move { mount(&g, &fs, &name).await }
    })
    .await;
    let mut ok = Vec::new();
    for (g, r) in guests.iter().zip(results) {
        match r {
            Ok(d) => {
                times.push(d);
                ok.push(g.clone());
            }
            Err(e) => errors.push(e),
        }
    }
    ok
}

/// Every guest writes in volume `name` at once; times and errors appended.
async fn write_all(
    guests: &[Guest],
    name: &str,
    times: &mut Vec<Duration>,
    errors: &mut Vec<String>,
) {
    let name2 = name.to_string();
    let results = at_once(guests, move |g| {
        let name = name2.clone();
        async move { write(&g, &name).await }
    })
    .await;
    for r in results {
        match r {
            Ok(d) => times.push(d),
            Err(e) => errors.push(e),
        }
    }
}

// ---- the servers' side, read from /proc, `ss` and `ceph` ---------------------------------

fn status_field(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn rss_kb(pid: u32) -> u64 {
    status_field(pid, "VmRSS:")
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux unless built otherwise).
fn clk_tck() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// User + system CPU time of `pid` so far, in ms.
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name (which may hold spaces): state first, utime 12th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    match (f.get(11), f.get(12)) {
        (Some(u), Some(s)) => (u + s) * 1000.0 / clk_tck(),
        _ => 0.0,
    }
}

/// Open file descriptors of `pid`: all, and how many are sockets.
fn fds(pid: u32) -> (usize, usize) {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return (0, 0);
    };
    let mut total = 0;
    let mut sockets = 0;
    for e in dir.flatten() {
        total += 1;
        if std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:")) {
            sockets += 1;
        }
    }
    (total, sockets)
}

/// The IP of an `ip:port` as `ss` and Ceph print it, without brackets, the IPv4-mapped prefix
/// or Ceph's `v1:`/`v2:` and `/nonce`.
fn bare_ip(addr: &str) -> String {
    let addr = addr
        .trim_start_matches("v1:")
        .trim_start_matches("v2:")
        .split('/')
        .next()
        .unwrap_or("");
    let ip = addr.rsplit_once(':').map(|(ip, _)| ip).unwrap_or("");
    ip.trim_matches(['[', ']'])
        .trim_start_matches("::ffff:")
        .to_string()
}

/// Established TCP connections in the namespace whose peer is one of `guests`, by the server
/// process that holds them (`ss -tnp`: `users:(("ganesha.nfsd",pid=..,fd=..))`).
fn guest_conns(ns: &NetNs, guests: &[String]) -> BTreeMap<String, usize> {
    let out = cnfs_testbed::process::run(ns.command("ss").args(["-Htnp", "state", "established"]))
        .unwrap_or_default();
    let mut by = BTreeMap::new();
    for line in out.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        // Recv-Q Send-Q Local Peer [Process]
        let Some(peer) = cols.get(3) else { continue };
        if !guests.contains(&bare_ip(peer)) {
            continue;
        }
        let who = line
            .split_once("((\"")
            .and_then(|(_, r)| r.split_once('"'))
            .map(|(name, _)| name.to_string())
            .unwrap_or_else(|| "?".into());
        *by.entry(who).or_insert(0) += 1;
    }
    by
}

fn conns_text(c: &BTreeMap<String, usize>) -> String {
    if c.is_empty() {
        return "none".into();
    }
    c.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// ganesha's NFSv4 client records: with the `fs` recovery backend each confirmed client id is
/// a directory named `<address>-(<length>:<owner>)` under `RecoveryRoot/v4recov/<node>/`.
fn nfs_client_records(recovery: &Path) -> usize {
    let mut found = 0;
    let mut stack = vec![recovery.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            if !e.path().is_dir() {
                continue;
            }
            if e.file_name().to_string_lossy().contains("-(") {
                found += 1;
            } else {
                stack.push(e.path());
            }
        }
    }
    found
}

#[derive(Clone, Default)]
struct NfsSample {
    rss_kb: u64,
    threads: u64,
    fds: usize,
    sockets: usize,
    conns: usize,
    clients: usize,
}

fn nfs_sample(nfs: &Ganesha, ns: &NetNs, guests: &[String]) -> NfsSample {
    let pid = nfs.pid();
    let (fds, sockets) = fds(pid);
    NfsSample {
        rss_kb: rss_kb(pid),
        threads: status_field(pid, "Threads:"),
        fds,
        sockets,
        conns: guest_conns(ns, guests)
            .get("ganesha.nfsd")
            .copied()
            .unwrap_or(0),
        clients: nfs_client_records(&nfs.recovery),
    }
}

/// One MDS client session: `client.<id>`, state, caps, and whether it comes from a guest.
struct Session {
    client: String,
    state: String,
    caps: u64,
    guest: bool,
}

fn mds_sessions(ceph: &Ceph, guests: &[String]) -> Vec<Session> {
    let text = ceph
        .ceph(&["tell", &ceph.mds_name(), "session", "ls"])
        .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    v.as_array()
        .map(|list| {
            list.iter()
                .map(|s| {
                    // "inst": "client.4191 v1:10.1.2.5:0/392457071"
                    let inst = s["inst"].as_str().unwrap_or("");
                    let (client, addr) = inst.split_once(' ').unwrap_or((inst, ""));
                    Session {
                        client: client.to_string(),
                        state: s["state"].as_str().unwrap_or("?").to_string(),
                        caps: s["num_caps"].as_u64().unwrap_or(0),
                        guest: guests.contains(&bare_ip(addr)),
                    }
                })
                .collect()
        })
        .unwrap_or_default()
}

#[derive(Clone, Default)]
struct CephSample {
    rss_kb: BTreeMap<String, u64>,
    /// Sessions and caps of the guests' clients.
    sessions: usize,
    caps: u64,
    /// Sessions of other clients (the manager's own).
    others: usize,
    conns: BTreeMap<String, usize>,
}

fn ceph_sample(ceph: &mut Ceph, ns: &NetNs, guests: &[String]) -> CephSample {
    let rss_kb = ceph
        .daemons()
        .into_iter()
        .map(|(name, pid)| (name, rss_kb(pid)))
        .collect();
    let sessions = mds_sessions(ceph, guests);
    let (ours, others): (Vec<&Session>, Vec<&Session>) = sessions.iter().partition(|s| s.guest);
    CephSample {
        rss_kb,
        sessions: ours.len(),
        caps: ours.iter().map(|s| s.caps).sum(),
        others: others.len(),
        conns: guest_conns(ns, guests),
    }
}

/// CPU ms of the Ceph daemons that serve clients (mon, OSD, MDS; not the manager).
fn ceph_cpu_ms(ceph: &mut Ceph) -> f64 {
    ceph.daemons()
        .into_iter()
        .filter(|(name, _)| !name.starts_with("mgr"))
        .map(|(_, pid)| cpu_ms(pid))
        .sum()
}

// ---- one file system's storm -------------------------------------------------------------

#[derive(Default)]
struct Figures {
    solo_mount: Vec<Duration>,
    solo_write: Vec<Duration>,
    storm_mount: Vec<Duration>,
    storm_write: Vec<Duration>,
    /// Server CPU ms spent during the mount phases, the servers' idle rate (ticks, beacons)
    /// over the same wall time taken out.
    solo_cpu: f64,
    storm_cpu: f64,
    /// First-mount times per guest (modules, client identity): not in the figures above.
    warm: Vec<Duration>,
    errors: Vec<String>,
}

const IDLE: &str = "idle (warmed up, none mounted)";
const ONE: &str = "1 mounted, nothing written";

fn all_mounted(n: usize) -> String {
    format!("{n} mounted, nothing written")
}

/// Warm-up, the per-client cost phase, solo rounds and storm rounds of `fs`; `sample(phase)`
/// is called at the points the cost table shows; `cpu()` reads the servers' CPU time.
async fn storm<S, C>(guests: &[Guest], fs: &Fs, mut sample: S, cpu: C) -> Figures
where
    S: FnMut(&str),
    C: Fn() -> f64,
{
    let mut fig = Figures::default();
    let n = guests.len();
    let tag = match fs {
        Fs::Nfs { .. } => "n",
        Fs::Ceph { .. } => "c",
    };
    // The first mount of each guest loads the file system's modules (a CNFS kernel has them
    // built in) and fixes the NFSv4 client identity: done one by one, shown apart.
    for g in guests {
        let name = format!("{tag}warm");
        match mount(g, fs, &name).await {
            Ok(d) => fig.warm.push(d),
            Err(e) => fig.errors.push(e),
        }
        if let Err(e) = unmount(g, &name).await {
            fig.errors.push(e);
        }
    }
    sample(IDLE);
    // The servers' CPU use with no client (timers, beacons), to take out of the mount phases.
    let (c0, t0) = (cpu(), Instant::now());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle_rate = (cpu() - c0) / ms(t0.elapsed());

    // The servers' cost per mounted client before any data moves: one guest, then all.
    let name = format!("{tag}cost");
    let mut unused = Vec::new();
    let mut mounted = Vec::new();
    match mount(&guests[0], fs, &name).await {
        Ok(_) => mounted.push(guests[0].clone()),
        Err(e) => fig.errors.push(e),
    }
    sample(ONE);
    mounted.extend(mount_all(&guests[1..], fs, &name, &mut unused, &mut fig.errors).await);
    sample(&all_mounted(n));
    for g in &mounted {
        if let Err(e) = unmount(g, &name).await {
            fig.errors.push(e);
        }
    }

    for r in 0..SOLO_ROUNDS {
        for g in guests {
            let name = format!("{tag}solo{r}");
            let (before, t) = (cpu(), Instant::now());
            let m = mount(g, fs, &name).await;
            fig.solo_cpu += cpu() - before - idle_rate * ms(t.elapsed());
            match m {
                Ok(d) => fig.solo_mount.push(d),
                Err(e) => {
                    fig.errors.push(e);
                    continue;
                }
            }
            match write(g, &name).await {
                Ok(d) => fig.solo_write.push(d),
                Err(e) => fig.errors.push(e),
            }
            if r == 0 && g.i == 0 {
                sample("1 mounted, after its writes");
            }
            clean_and_unmount(g, &name, &mut fig.errors).await;
        }
    }

    for r in 0..STORM_ROUNDS {
        let name = format!("{tag}storm{r}");
        let (before, t) = (cpu(), Instant::now());
        let ok = mount_all(guests, fs, &name, &mut fig.storm_mount, &mut fig.errors).await;
        fig.storm_cpu += cpu() - before - idle_rate * ms(t.elapsed());
        write_all(&ok, &name, &mut fig.storm_write, &mut fig.errors).await;
        if r == 0 {
            sample(&format!("{n} mounted, after their writes"));
        }
        for g in &ok {
            clean_and_unmount(g, &name, &mut fig.errors).await;
        }
    }
    sample("none mounted again");
    fig
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn p(v: &[Duration], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort();
    if v.is_empty() {
        return f64::NAN;
    }
    ms(percentile(&v, q))
}

fn print_times(label: &str, fig: &Figures, n: usize) {
    let row = |what: &str, solo: &[Duration], storm: &[Duration]| {
        println!(
            "{:<34} {:>9.0} {:>9.0} {:>4} | {:>9.0} {:>9.0} {:>4} | {:>6.2}x {:>6.2}x",
            format!("{label} {what}"),
            p(solo, 0.5),
            p(solo, 0.99),
            solo.len(),
            p(storm, 0.5),
            p(storm, 0.99),
            storm.len(),
            p(storm, 0.5) / p(solo, 0.5),
            p(storm, 0.99) / p(solo, 0.99),
        );
    };
    row("Mount", &fig.solo_mount, &fig.storm_mount);
    row(
        &format!("write {WRITE_MIB} MiB+fsync, {FILES} files"),
        &fig.solo_write,
        &fig.storm_write,
    );
    let per = |cpu: f64, k: usize| if k == 0 { f64::NAN } else { cpu / k as f64 };
    println!(
        "  server CPU per Mount (idle rate taken out): alone {:.1} ms, {n} at once {:.1} ms; \
         first Mount per guest (loads the modules, not above): {}",
        per(fig.solo_cpu, fig.solo_mount.len()),
        per(fig.storm_cpu, fig.storm_mount.len()),
        fig.warm
            .iter()
            .map(|d| format!("{:.0} ms", ms(*d)))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

fn guests_wanted() -> anyhow::Result<usize> {
    match std::env::var("CNFS_STORM_GUESTS") {
        Err(_) => Ok(DEFAULT_GUESTS),
        Ok(v) => {
            let n: usize = v.trim().parse().map_err(|_| {
                anyhow::anyhow!("CNFS_STORM_GUESTS: {v:?} is not a number of guests")
            })?;
            anyhow::ensure!(
                (2..=cnfs_testbed::netns::MAX_GUESTS).contains(&n),
                "CNFS_STORM_GUESTS: {n} is out of range 2..={}",
                cnfs_testbed::netns::MAX_GUESTS
            );
            Ok(n)
        }
    }
}

/// One storm round of `fs` for the caps comparison: every guest creates `CAPS_FILES` files of
/// 1 KiB at once; the caps the guests hold right after and 15 s later (the kernel trims
/// unused caps from delayed work), the MDS's RSS, and the creation times.
async fn caps_round(
    guests: &[Guest],
    fs: &Fs,
    name: &str,
    ceph: &mut Ceph,
    ips: &[String],
    errors: &mut Vec<String>,
) -> (Vec<Duration>, u64, u64, u64, String) {
    let (mut mounts, mut writes) = (Vec::new(), Vec::new());
    let ok = mount_all(guests, fs, name, &mut mounts, errors).await;
    // What the kernel took (it lists caps_max when set; the key shows as <hidden>).
    let line = guests[0]
        .exec
        .ok(&format!(
            "grep ' /run/cnfs/volumes/{name} ' /proc/mounts; true"
        ))
        .await
        .unwrap_or_default()
        .trim()
        .to_string();
    let name2 = name.to_string();
    let results = at_once(&ok, move |g| {
        let name = name2.clone();
        async move {
            let dir = sub_dir(&g, &name);
            let out = g
                .exec
                .run(
                    &format!("mkdir -p {dir} && cnfs-io-bench create {dir} {CAPS_FILES}"),
                    T,
                )
                .await
                .map_err(|e| format!("guest {} create in {dir}: {e:#}", g.i))?;
            let secs = serde_json::from_str::<serde_json::Value>(out.stdout.trim())
                .ok()
                .and_then(|v| v["secs"].as_f64())
                .filter(|_| out.code == 0)
                .ok_or_else(|| {
                    format!(
                        "guest {} create in {dir}: exit {}: {}",
                        g.i, out.code, out.stderr
                    )
                })?;
            Ok::<_, String>(Duration::from_secs_f64(secs))
        }
    })
    .await;
    for r in results {
        match r {
            Ok(d) => writes.push(d),
            Err(e) => errors.push(e),
        }
    }
    let caps = |c: &mut Ceph| -> u64 {
        mds_sessions(c, ips)
            .iter()
            .filter(|s| s.guest)
            .map(|s| s.caps)
            .sum()
    };
    let right_after = caps(ceph);
    tokio::time::sleep(Duration::from_secs(15)).await;
    let later = caps(ceph);
    let mds = ceph
        .daemons()
        .into_iter()
        .find(|(d, _)| d.starts_with("mds"))
        .map(|(_, pid)| rss_kb(pid))
        .unwrap_or(0);
    for g in &ok {
        clean_and_unmount(g, name, errors).await;
    }
    (writes, right_after, later, mds, line)
}

pub async fn run() -> anyhow::Result<()> {
    let n = guests_wanted()?;
    println!(
        "\nbench: mount storm ({n} guests, 512M and 1 vCPU each, on one bridge; one nfs-ganesha, \
         one Ceph) ..."
    );
    let art = Artifacts::locate()?;
    let dir = TempDir::new("bench-storm")?;
    let ns = NetNs::create_with_guests(n)?;
    let nfs = Ganesha::start(&ns, dir.path())?;
    let ips: Vec<String> = (0..n).map(|i| ns.guest(i).ip).collect();
    let fresh = nfs_sample(&nfs, &ns, &ips);
    // Booted one after another, before anything is measured.
    let t = Instant::now();
    let mut vms = Vec::new();
    for i in 0..n {
        vms.push(Vm::boot_guest(&art, &ns, i, dir.path()).await?);
    }
    println!("booted {n} guests in {:.1?}", t.elapsed());
    let mut guests = Vec::new();
    for (i, vm) in vms.iter().enumerate() {
        guests.push(Guest {
            i,
            agent: vm.agent().await?,
            exec: vm.exec.clone(),
        });
    }

    let mut control_errors = Vec::new();
    let (spin_alone, spin_together) = control(&guests, &mut control_errors).await;

    // NFS.
    let nfs_fs = Fs::Nfs {
        server: ns.host_ip.clone(),
    };
    let mut nfs_samples = vec![("fresh (never mounted)".to_string(), fresh)];
    let nfs_fig = storm(
        &guests,
        &nfs_fs,
        |phase| nfs_samples.push((phase.to_string(), nfs_sample(&nfs, &ns, &ips))),
        || cpu_ms(nfs.pid()),
    )
    .await;

    // CephFS, same guests, same namespace.
    println!("bench: starting Ceph in the namespace ...");
    let ceph = std::sync::Mutex::new(Ceph::start(&ns, dir.path()).await?);
    let (monitor, key) = {
        let c = ceph.lock().map_err(|_| anyhow::anyhow!("ceph lock"))?;
        (c.mon_v1(), c.admin_key())
    };
    let ceph_fs = Fs::Ceph {
        monitor: monitor.clone(),
        key: key.clone(),
        options: Vec::new(),
    };
    let mut ceph_samples = Vec::new();
    let ceph_fig = storm(
        &guests,
        &ceph_fs,
        |phase| {
            if let Ok(mut c) = ceph.lock() {
                ceph_samples.push((phase.to_string(), ceph_sample(&mut c, &ns, &ips)));
            }
        },
        || ceph.lock().map(|mut c| ceph_cpu_ms(&mut c)).unwrap_or(0.0),
    )
    .await;
    let mut ceph = ceph
        .into_inner()
        .map_err(|_| anyhow::anyhow!("ceph lock"))?;

    // The kernel client's caps_max against its default, one storm round each.
    let capped = Fs::Ceph {
        monitor,
        key,
        options: vec![("caps_max".into(), CAPS_MAX.into())],
    };
    let mut caps_errors = Vec::new();
    let default_caps = caps_round(
        &guests,
        &ceph_fs,
        "capsdef",
        &mut ceph,
        &ips,
        &mut caps_errors,
    )
    .await;
    let capped_caps = caps_round(
        &guests,
        &capped,
        "capsmax",
        &mut ceph,
        &ips,
        &mut caps_errors,
    )
    .await;

    let fs_get = ceph
        .ceph(&["fs", "get", FS_NAME, "-f", "json"])
        .unwrap_or_default();
    let mdsmap: serde_json::Value = serde_json::from_str(&fs_get).unwrap_or_default();
    let session_timeout = mdsmap["mdsmap"]["session_timeout"].as_u64().unwrap_or(0);
    let session_autoclose = mdsmap["mdsmap"]["session_autoclose"].as_u64().unwrap_or(0);
    let conf = |key: &str| {
        ceph.ceph(&["config", "get", "mds", key])
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|e| format!("? ({e:#})"))
    };
    let keepalive = cnfs_testbed::process::run(
        ns.command("cat")
            .arg("/proc/sys/net/ipv4/tcp_keepalive_time"),
    )
    .map(|v| v.trim().to_string())
    .unwrap_or_else(|e| format!("? ({e:#})"));
    let settings: Vec<(&str, String)> = [
        "mds_defer_session_stale",
        "mds_session_blocklist_on_timeout",
        "mds_max_caps_per_client",
        "mds_min_caps_per_client",
        "mds_cap_revoke_eviction_timeout",
        "mds_cache_memory_limit",
        "ms_connection_idle_timeout",
    ]
    .into_iter()
    .map(|k| (k, conf(k)))
    .collect();

    // ---- the tables ----
    println!(
        "\nmount storm: {n} guests at once vs each guest alone (same run, same guests), ms; \
         p99 of so few samples is the worst one"
    );
    println!(
        "{:<34} {:>9} {:>9} {:>4} | {:>9} {:>9} {:>4} | {:>7} {:>7}",
        "", "alone p50", "p99", "n", "storm p50", "p99", "n", "p50", "p99"
    );
    print_times(nfs_fs.label(), &nfs_fig, n);
    print_times(ceph_fs.label(), &ceph_fig, n);
    println!(
        "{:<34} {:>9.0} {:>9.0} {:>4} | {:>9.0} {:>9.0} {:>4} | {:>6.2}x {:>6.2}x",
        "control: CPU loop, no I/O",
        p(&spin_alone, 0.5),
        p(&spin_alone, 0.99),
        spin_alone.len(),
        p(&spin_together, 0.5),
        p(&spin_together, 0.99),
        spin_together.len(),
        p(&spin_together, 0.5) / p(&spin_alone, 0.5),
        p(&spin_together, 0.99) / p(&spin_alone, 0.99),
    );
    let errors: Vec<&String> = control_errors
        .iter()
        .chain(&nfs_fig.errors)
        .chain(&ceph_fig.errors)
        .chain(&caps_errors)
        .collect();
    println!("errors: {}", errors.len());
    for e in &errors {
        println!("  {e}");
    }

    println!("\nnfs-ganesha 4.3 (VFS), {n} guests:");
    println!(
        "{:<34} {:>9} {:>8} {:>6} {:>8} {:>10} {:>14}",
        "", "RSS kB", "threads", "fds", "sockets", "TCP conns", "NFSv4 clients"
    );
    for (phase, s) in &nfs_samples {
        println!(
            "{phase:<34} {:>9} {:>8} {:>6} {:>8} {:>10} {:>14}",
            s.rss_kb, s.threads, s.fds, s.sockets, s.conns, s.clients
        );
    }
    let nfind = |k: &str| {
        nfs_samples
            .iter()
            .find(|(p, _)| p == k)
            .map(|(_, s)| s.clone())
            .unwrap_or_default()
    };
    let (idle, one, all) = (nfind(IDLE), nfind(ONE), nfind(&all_mounted(n)));
    println!(
        "ganesha RSS per mounted client: first {:+} kB over idle, each further {:+.0} kB \
         ((RSS at {n} - RSS at 1) / {})",
        one.rss_kb as i64 - idle.rss_kb as i64,
        (all.rss_kb as f64 - one.rss_kb as f64) / (n - 1) as f64,
        n - 1
    );

    println!("\nCeph 16.2 (memstore OSD: written data lives in the OSD's memory):");
    let daemons: Vec<String> = ceph_samples
        .first()
        .map(|(_, s)| s.rss_kb.keys().cloned().collect())
        .unwrap_or_default();
    let mut head = format!("{:<34}", "");
    for d in &daemons {
        head.push_str(&format!(" {:>10}", format!("{d} kB")));
    }
    head.push_str(&format!(
        " {:>9} {:>6} {:>7}  TCP conns from the guests",
        "sessions", "caps", "others"
    ));
    println!("{head}");
    for (phase, s) in &ceph_samples {
        let mut line = format!("{phase:<34}");
        for d in &daemons {
            line.push_str(&format!(" {:>10}", s.rss_kb.get(d).copied().unwrap_or(0)));
        }
        line.push_str(&format!(
            " {:>9} {:>6} {:>7}  {}",
            s.sessions,
            s.caps,
            s.others,
            conns_text(&s.conns)
        ));
        println!("{line}");
    }
    println!("(sessions, caps: the guests' clients; others: sessions of other clients)");
    let cfind = |k: &str| {
        ceph_samples
            .iter()
            .find(|(p, _)| p == k)
            .map(|(_, s)| s.clone())
            .unwrap_or_default()
    };
    let (cidle, cone, call) = (cfind(IDLE), cfind(ONE), cfind(&all_mounted(n)));
    for d in daemons.iter().filter(|d| !d.starts_with("mgr")) {
        let g = |s: &CephSample| s.rss_kb.get(d).copied().unwrap_or(0) as f64;
        println!(
            "{d} RSS per mounted client: first {:+.0} kB over idle, each further {:+.0} kB",
            g(&cone) - g(&cidle),
            (g(&call) - g(&cone)) / (n - 1) as f64
        );
    }
    println!(
        "\nCephFS caps_max (kernel client), one storm round each, every guest creating \
         {CAPS_FILES} files of 1 KiB: create p50, caps the {n} guests hold right after / 15 s \
         later, MDS RSS"
    );
    for (label, (writes, right_after, later, mds, line)) in [
        ("default (no limit)".to_string(), default_caps),
        (format!("caps_max={CAPS_MAX}"), capped_caps),
    ] {
        println!(
            "  {label:<20} create p50 {:>6.0} ms   caps {right_after:>6} / {later:>6}   MDS {mds} kB",
            p(&writes, 0.5)
        );
        println!("    guest 0: {line}");
    }

    println!(
        "\nsettings that bound a client's state: ganesha Lease_Lifetime {LEASE_LIFETIME_S} s \
         (test bed; ganesha's default 60), RPC_Idle_Timeout_S {GANESHA_RPC_IDLE_S} s (default), \
         Enable_TCP_keepalive (default on) with the namespace's tcp_keepalive_time {keepalive} s; \
         CephFS session_timeout {session_timeout} s, session_autoclose {session_autoclose} s, {}",
        settings
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );

    dead_guest(
        &guests,
        &mut vms,
        &nfs_fs,
        &ceph_fs,
        &nfs,
        &mut ceph,
        &ns,
        &ips,
        session_autoclose,
    )
    .await;
    drop(guests);
    drop(vms);
    drop(ceph);
    Ok(())
}

/// The last guest dies (QEMU SIGKILL) with both volumes mounted and a file open on each: what
/// each server keeps of it, and for how long.
#[allow(clippy::too_many_arguments)]
async fn dead_guest(
    guests: &[Guest],
    vms: &mut [Vm],
    nfs_fs: &Fs,
    ceph_fs: &Fs,
    nfs: &Ganesha,
    ceph: &mut Ceph,
    ns: &NetNs,
    ips: &[String],
    session_autoclose: u64,
) {
    let last = guests.len() - 1;
    let g = &guests[last];
    let mut errors = Vec::new();
    for (fs, name) in [(nfs_fs, "deadn"), (ceph_fs, "deadc")] {
        if let Err(e) = mount(g, fs, name).await {
            errors.push(e);
        }
    }
    let hold = "for v in deadn deadc; do echo x > /run/cnfs/volumes/$v/held; done; \
                sh -c 'exec 3</run/cnfs/volumes/deadn/held 4</run/cnfs/volumes/deadc/held; \
                exec sleep 100000' </dev/null >/dev/null 2>&1 &";
    if let Err(e) = g.exec.ok(hold).await {
        errors.push(format!("holding files open: {e:#}"));
    }
    let lines = g
        .exec
        .ok("grep -E ' /run/cnfs/volumes/dead(n|c) ' /proc/mounts; true")
        .await
        .unwrap_or_default();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let dead_ip = [ips[last].clone()];
    let state = |c: &mut Ceph| {
        let s = nfs_sample(nfs, ns, &dead_ip);
        let nfs_text = format!(
            "NFS: {} client record(s), ganesha conns from it {}, ganesha fds {}",
            s.clients, s.conns, s.fds
        );
        let sessions: Vec<String> = mds_sessions(c, &dead_ip)
            .iter()
            .filter(|s| s.guest)
            .map(|s| format!("{} {} {} caps", s.client, s.state, s.caps))
            .collect();
        let mut conns = guest_conns(ns, &dead_ip);
        conns.remove("ganesha.nfsd");
        let ceph_text = format!(
            "CephFS: sessions [{}], Ceph conns from it: {}",
            sessions.join("; "),
            conns_text(&conns)
        );
        let nfs_gone = s.clients == 0 && s.conns == 0;
        (nfs_text, ceph_text, nfs_gone, sessions.is_empty())
    };
    println!(
        "\na guest dies (QEMU SIGKILL) with both volumes mounted and a file open on each{}:",
        if errors.is_empty() {
            String::new()
        } else {
            format!(" (set-up errors: {})", errors.join("; "))
        }
    );
    for l in lines.lines() {
        println!("  its mount: {l}");
    }
    // Pacific prints two JSON arrays: the address entries, then the range entries.
    let blocklist = |c: &Ceph| match c.ceph(&["osd", "blocklist", "ls", "-f", "json"]) {
        Ok(t) => {
            let mut docs = serde_json::Deserializer::from_str(&t).into_iter::<serde_json::Value>();
            match docs.next() {
                Some(Ok(serde_json::Value::Array(v))) => {
                    let until: Vec<&str> = v.iter().filter_map(|e| e["until"].as_str()).collect();
                    if until.is_empty() {
                        v.len().to_string()
                    } else {
                        format!("{} (until {})", v.len(), until.join(", "))
                    }
                }
                _ => format!("? (output {:?})", t.trim()),
            }
        }
        Err(e) => format!("? ({e:#})"),
    };
    let blocked_before = blocklist(ceph);
    let (mut last_n, mut last_c, _, _) = state(ceph);
    println!("  t=0 s    {last_n}\n           {last_c}");
    vms[last].kill();
    let t0 = Instant::now();
    let bound = Duration::from_secs(session_autoclose.max(GANESHA_RPC_IDLE_S) + 30);
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (now_n, now_c, nfs_gone, ceph_gone) = state(ceph);
        let t = t0.elapsed().as_secs_f64();
        if now_n != last_n {
            println!("  t={t:<5.0}s {now_n}");
            last_n = now_n;
        }
        if now_c != last_c {
            println!("  t={t:<5.0}s {now_c}");
            last_c = now_c;
        }
        if (nfs_gone && ceph_gone) || t0.elapsed() > bound {
            println!(
                "  stopped watching at t={t:.0} s ({})",
                if nfs_gone && ceph_gone {
                    "neither server holds client state for it"
                } else {
                    "bound reached: the state above is still held"
                }
            );
            println!(
                "  Ceph OSD map blocklist entries: {blocked_before} before the guest died, {} now",
                blocklist(ceph)
            );
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_addresses_from_ss_and_ceph_come_out_as_bare_ipv4() {
        assert_eq!(bare_ip("[::ffff:10.1.2.3]:2049"), "10.1.2.3");
        assert_eq!(bare_ip("10.1.2.3:41234"), "10.1.2.3");
        assert_eq!(bare_ip("v1:10.1.2.5:0/392457071"), "10.1.2.5");
        assert_eq!(bare_ip("v2:10.1.2.6:3300/0"), "10.1.2.6");
    }

    #[test]
    fn nfs_client_records_count_ganesha_recovery_directories_only() {
        let dir = cnfs_testbed::TempDir::new("storm-recovery").expect("temp dir");
        let node = dir.path().join("v4recov/node0");
        for c in ["::ffff:10.1.2.2-(76:0x4c69)", "::ffff:10.1.2.3-(76:0x4c6a)"] {
            std::fs::create_dir_all(node.join(c)).expect("client dir");
        }
        std::fs::create_dir_all(dir.path().join("v4old/node0")).expect("old dir");
        std::fs::write(node.join("not-a-client-(file)"), b"").expect("file");
        assert_eq!(nfs_client_records(dir.path()), 2);
        assert_eq!(nfs_client_records(&dir.path().join("missing")), 0);
    }
}
