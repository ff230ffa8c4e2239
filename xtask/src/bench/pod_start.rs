//! Pod start: a sandbox `Create` (`ctr run -d`, the test bed's containerd 1.6) through
//! `containerd-shim-cnfs-v2` with 0, 1, 4 and 16 NFS volumes, next to the same sandbox created
//! straight by the delegate (runc's shim here: Kata's runtime does not run on this machine;
//! the stand-in Kata monitor socket leads the wrapper to the test guest). The wrapper's own
//! log line splits its share: validation (annotations, policy, secrets), guest discovery
//! (Kata's management socket), connecting, and the mounts; beside them the same mounts made
//! with busybox in the same guest, one after another.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use cnfs_testbed::containerd::{Containerd, MINIMAL};
use cnfs_testbed::ganesha::EXPORT;
use cnfs_testbed::{rootfs, TestBed};

use super::median;
use crate::{root, sh};

const ROUNDS: usize = 5;
const CNFS: &str = "io.containerd.cnfs.v2";
const RUNC: &str = "io.containerd.runc.v2";

/// `ctr` against the bench's containerd.
fn ctr(ctd: &Containerd, args: &[String]) -> anyhow::Result<std::process::Output> {
    Ok(Command::new("ctr")
        .arg("-a")
        .arg(ctd.socket())
        .args(args)
        .output()?)
}

/// A sandbox with `volumes` CNFS volumes, created by `runtime`; the time `ctr run -d` took.
fn create(
    ctd: &Containerd,
    runtime: &str,
    id: &str,
    root: &str,
    volumes: &[String],
) -> anyhow::Result<Duration> {
    let mut args: Vec<String> = vec!["run".into(), "--runtime".into(), runtime.into()];
    for a in [
        "io.kubernetes.cri.container-type=sandbox".to_string(),
        format!("io.kubernetes.cri.sandbox-id={id}"),
        "io.kubernetes.cri.sandbox-namespace=bench".to_string(),
        "io.kubernetes.cri.container-name=POD".to_string(),
    ]
    .into_iter()
    .chain(volumes.iter().cloned())
    {
        args.push("--annotation".into());
        args.push(a);
    }
    args.extend(["-d", "--rootfs", root, id, "/bin/sleep", "600"].map(String::from));
    let t = Instant::now();
    let out = ctr(ctd, &args)?;
    let took = t.elapsed();
    anyhow::ensure!(
        out.status.success(),
        "{runtime} {id}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(took)
}

fn remove(ctd: &Containerd, id: &str) -> anyhow::Result<()> {
    let _ = ctr(
        ctd,
        &[
            "task".into(),
            "kill".into(),
            "-s".into(),
            "SIGKILL".into(),
            id.into(),
        ],
    );
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let out = ctr(ctd, &["task".into(), "delete".into(), id.into()])?;
        if out.status.success() || Instant::now() > until {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = ctr(ctd, &["container".into(), "delete".into(), id.into()]);
    Ok(())
}

/// A number field of the wrapper's JSON log line (`"key":123`).
fn field(line: &str, key: &str) -> Option<f64> {
    let at = line.find(&format!("\"{key}\":"))? + key.len() + 3;
    let digits: String = line[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

pub async fn run() -> anyhow::Result<()> {
    println!(
        "\nbench: pod start (sandbox Create through the wrapper vs straight to the delegate) ..."
    );
    sh(Command::new("cargo")
        .current_dir(root())
        .args(["build", "--release", "-p", "cnfs-host-shim"])
        .args(["--bin", "containerd-shim-cnfs-v2"]))?;
    let bin = root().join("target/release");
    let path = std::env::var("PATH").unwrap_or_default();
    std::env::set_var("PATH", format!("{}:{path}", bin.display()));
    let bed = TestBed::start().await?;
    let dir = bed.dir.path();
    let server = bed.ns.host_ip.clone();
    for i in 0..16 {
        std::fs::create_dir_all(bed.nfs.export_dir.join(format!("v{i}")))?;
    }
    let policy = dir.join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "[[allow]]\nnamespaces = [\"bench\"]\nfilesystems = [\"nfs\"]\n\
             servers = [\"{server}/24\"]\nexport_prefixes = [\"{EXPORT}\"]\noptions = [\"vers\"]\n"
        ),
    )?;
    let monitor_root = dir.join("kata-run");
    let conf = dir.join("shim.toml");
    std::fs::write(
        &conf,
        format!(
            "delegate = \"containerd-shim-runc-v2\"\npolicy = \"{}\"\n\
             kata_monitor_roots = [\"{}\"]\nmount_timeout_seconds = 60\n",
            policy.display(),
            monitor_root.display()
        ),
    )?;
    std::env::set_var("CNFS_SHIM_CONFIG", &conf);
    let ctd = Containerd::start(MINIMAL)?;
    let root = rootfs::busybox(dir)?.display().to_string();
    let g = &bed.vm.exec;
    // The agent loads the NFS modules at its first mount: not part of any pod's start.
    let agent = bed.vm.agent().await?;
    let t = Duration::from_secs(60);
    agent
        .mount(
            cnfs_testbed::vm::ctx(t),
            &cnfs_testbed::mount_request(
                cnfs_testbed::nfs_volume("warm", &server, EXPORT, "4.1"),
                0,
            ),
        )
        .await?;
    agent
        .unmount(
            cnfs_testbed::vm::ctx(t),
            &cnfs_protocols::agent::UnmountRequest {
                name: "warm".into(),
                ..Default::default()
            },
        )
        .await?;

    println!(
        "\n{:<8} {:>11} {:>11} {:>9} {:>7} | {:>9} {:>9} {:>9} {:>9} | {:>12}",
        "volumes",
        "runc (ms)",
        "CNFS (ms)",
        "added",
        "share",
        "validate",
        "discover",
        "connect",
        "mounts",
        "busybox (ms)"
    );
    let mut k = 0;
    for n in [0usize, 1, 4, 16] {
        let volumes: Vec<String> = (0..n)
            .flat_map(|i| {
                [
                    format!("cnfs.io/volume.v{i}=nfs://{server}{EXPORT}/v{i}?vers=4.1"),
                    format!("cnfs.io/mount.v{i}=/v{i}"),
                ]
            })
            .collect();
        let (mut straight, mut wrapped) = (Vec::new(), Vec::new());
        let (mut validate, mut discover, mut connect, mut mounts) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            k += 1;
            let id = format!("bench-runc-{n}-{k}");
            straight.push(create(&ctd, RUNC, &id, &root, &volumes)?.as_secs_f64() * 1e3);
            remove(&ctd, &id)?;
            let id = format!("bench-cnfs-{n}-{k}");
            std::fs::create_dir_all(monitor_root.join(&id))?;
            let monitor = cnfs_testbed::kata_monitor::serve(
                &monitor_root.join(&id).join("shim-monitor.sock"),
                &bed.vm.hvsock,
            )?;
            wrapped.push(create(&ctd, CNFS, &id, &root, &volumes)?.as_secs_f64() * 1e3);
            if n > 0 {
                let log = ctd.log_tail(400);
                let line = log
                    .lines()
                    .rev()
                    .find(|l| l.contains("volumes mounted in the guest") && l.contains(&id))
                    .with_context(|| format!("no wrapper log line for {id}"))?;
                validate.push(field(line, "validate_us").unwrap_or(f64::NAN) / 1e3);
                discover.push(field(line, "discovery_ms").unwrap_or(f64::NAN));
                connect.push(field(line, "connect_ms").unwrap_or(f64::NAN));
                mounts.push(field(line, "mounts_ms").unwrap_or(f64::NAN));
            }
            remove(&ctd, &id)?;
            monitor.abort();
        }
        // The same mounts with busybox in the same guest, one after another.
        let mut raw = Vec::new();
        for _ in 0..ROUNDS.min(3) {
            let script: String = (0..n)
                .map(|i| {
                    format!(
                        "mkdir -p /tmp/b{i} && mount -t nfs4 -o vers=4.1,addr={server} \
                         {server}:{EXPORT}/v{i} /tmp/b{i}; "
                    )
                })
                .collect();
            let t = Instant::now();
            if n > 0 {
                g.ok(&script).await?;
            }
            raw.push(t.elapsed().as_secs_f64() * 1e3);
            let undo: String = (0..n).map(|i| format!("umount /tmp/b{i}; ")).collect();
            if n > 0 {
                g.ok(&undo).await?;
            }
        }
        let (s, w) = (median(&mut straight), median(&mut wrapped));
        let (v, d, c, m) = (
            median(&mut validate),
            median(&mut discover),
            median(&mut connect),
            median(&mut mounts),
        );
        let ours = w - s - if n > 0 { m } else { 0.0 };
        println!(
            "{n:<8} {s:>11.1} {w:>11.1} {:>9.1} {:>6.1}% | {v:>9.2} {d:>9.1} {c:>9.1} {m:>9.1} | {:>12.1}",
            w - s,
            100.0 * ours / w,
            median(&mut raw)
        );
    }
    println!(
        "(added: CNFS time minus runc time; share: CNFS's own part (added minus the mounts) of \
         the whole Create; busybox: the same mounts one after another in the guest, incl. the \
         exec helper's ~9 ms)"
    );
    Ok(())
}
