//! The data path, side by side in one guest and one run: the same server directory through
//! the guest kernel's NFS client (a CNFS volume) and through virtio-fs as Kata configures it
//! (virtiofsd `--cache=auto --thread-pool-size=1 --announce-submounts`, `vhost-user-fs-pci`
//! with `queue-size=1024` and no DAX window, the guest mounting `virtiofs` without options).
//! The host here has no NFS client, so virtiofsd serves the directory directly: an upper
//! bound for Kata's path, which adds a host NFS hop. Each workload is `cnfs-io-bench` in the
//! guest; each path gets its own directories (ganesha caches attributes and listings, so
//! neither path sees the other's files); medians of `ROUNDS`, the two paths alternating.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::median;
use anyhow::Context;
use cnfs_testbed::ganesha::EXPORT;
use cnfs_testbed::process::{wait_for, Guarded};
use cnfs_testbed::vm::{ctx, Boot};
use cnfs_testbed::{mount_request, nfs_volume, Artifacts, Ganesha, GuestExec, NetNs, TempDir, Vm};

const T: Duration = Duration::from_secs(120);
const ROUNDS: usize = 3;
const FILE_MIB: u64 = 256;
const FILES: u64 = 2000;
const RANDOM_READS: u64 = 2000;
/// Kata's virtio-fs tag.
const TAG: &str = "kataShared";
const VIRTIOFS: &str = "/mnt/virtiofs";

/// One workload step: `cnfs-io-bench` arguments after the directory, and whether the guest's
/// caches are dropped first (a cold step).
pub(super) struct Step {
    name: &'static str,
    args: String,
    cold: bool,
}

pub(super) fn steps() -> Vec<Step> {
    let s = |name, args: String, cold| Step { name, args, cold };
    vec![
        s("write", format!("write {{dir}} {FILE_MIB}"), false),
        s("read", "read {dir}".to_string(), true),
        s("randread", format!("randread {{dir}} {RANDOM_READS}"), true),
        s("create", format!("create {{dir}} {FILES}"), false),
        s("stat", format!("stat {{dir}} {FILES}"), true),
        s("ls", "ls {dir}".to_string(), true),
        s("unlink", format!("unlink {{dir}} {FILES}"), false),
        s("tree", "tree /lib/modules {dir}/tree".to_string(), true),
    ]
}

/// A path under test: where it is mounted in the guest.
pub(super) struct Path_ {
    pub(super) label: String,
    pub(super) root: String,
    pub(super) nfs: bool,
}

/// The NFS client's per-operation counts of the mount at `mount_point`
/// (`/proc/self/mountstats`, "per-op statistics": `OP: ops trans timeouts ...`).
fn nfs_ops(mountstats: &str, mount_point: &str) -> BTreeMap<String, u64> {
    let mut ops = BTreeMap::new();
    let mut ours = false;
    let mut per_op = false;
    for line in mountstats.lines() {
        if line.starts_with("device ") {
            ours = line.contains(&format!(" mounted on {mount_point} "));
            per_op = false;
            continue;
        }
        if !ours {
            continue;
        }
        if line.trim() == "per-op statistics" {
            per_op = true;
            continue;
        }
        if per_op {
            if let Some((op, rest)) = line.trim().split_once(':') {
                if let Some(n) = rest.split_whitespace().next().and_then(|v| v.parse().ok()) {
                    ops.insert(op.to_string(), n);
                }
            }
        }
    }
    ops
}

async fn drop_caches(g: &GuestExec) -> anyhow::Result<()> {
    g.ok("sync; echo 3 > /proc/sys/vm/drop_caches").await?;
    Ok(())
}

/// Runs every step once on `p` in directory `dir`; seconds per step, and the NFS operations
/// each step cost.
pub(super) async fn round(
    g: &GuestExec,
    p: &Path_,
    dir: &str,
) -> anyhow::Result<Vec<(f64, BTreeMap<String, u64>)>> {
    g.ok(&format!("mkdir -p {dir}")).await?;
    let mut out = Vec::new();
    for step in steps() {
        if step.cold {
            drop_caches(g).await?;
        }
        let before = if p.nfs {
            nfs_ops(&g.ok("cat /proc/self/mountstats").await?, &p.root)
        } else {
            BTreeMap::new()
        };
        let args = step.args.replace("{dir}", dir);
        let line = g
            .run(&format!("cnfs-io-bench {args}"), T)
            .await
            .with_context(|| format!("{} {}", p.label, step.name))?;
        anyhow::ensure!(
            line.code == 0,
            "{} {}: {}{}",
            p.label,
            step.name,
            line.stdout,
            line.stderr
        );
        let v: serde_json::Value = serde_json::from_str(line.stdout.trim())
            .with_context(|| format!("{} {}: {:?}", p.label, step.name, line.stdout))?;
        let secs = v["secs"].as_f64().unwrap_or(f64::NAN);
        let mut delta = BTreeMap::new();
        if p.nfs {
            let after = nfs_ops(&g.ok("cat /proc/self/mountstats").await?, &p.root);
            for (op, n) in after {
                let d = n.saturating_sub(before.get(&op).copied().unwrap_or(0));
                if d > 0 {
                    delta.insert(op, d);
                }
            }
        }
        out.push((secs, delta));
    }
    g.ok(&format!("rm -rf {dir}")).await?;
    Ok(out)
}

/// Seconds per step.
pub(super) type Secs = Vec<Vec<Vec<f64>>>;
/// NFS operations per step.
pub(super) type Ops = Vec<Vec<BTreeMap<String, u64>>>;

/// `ROUNDS` rounds of every step on every path: `secs[path][step]` the seconds of each
/// round, `ops[path][step]` the NFS operations of the last.
pub(super) async fn rounds(
    g: &GuestExec,
    paths: &[Path_],
    what: &str,
) -> anyhow::Result<(Secs, Ops)> {
    let n_steps = steps().len();
    let mut secs = vec![vec![Vec::new(); n_steps]; paths.len()];
    let mut ops = vec![vec![BTreeMap::new(); n_steps]; paths.len()];
    for r in 0..ROUNDS {
        // Alternate the order so that drift on this shared machine does not favour one path.
        let mut order: Vec<usize> = (0..paths.len()).collect();
        if r % 2 == 1 {
            order.reverse();
        }
        for &i in &order {
            let p = &paths[i];
            let d = format!("{}/bench-{i}-{r}", p.root);
            for (s, (t, o)) in round(g, p, &d).await?.into_iter().enumerate() {
                secs[i][s].push(t);
                ops[i][s] = o;
            }
        }
        eprintln!("bench: {what} round {} of {ROUNDS} done", r + 1);
    }
    Ok((secs, ops))
}

fn virtiofsd() -> anyhow::Result<std::path::PathBuf> {
    let p = crate::setup::cargo_home().join("bin").join("virtiofsd");
    anyhow::ensure!(
        p.exists(),
        "{} is missing: `cargo xtask bench` installs it (cargo install --locked virtiofsd)",
        p.display()
    );
    Ok(p)
}

/// The data path figures. `variants`: extra NFS option sets to measure beside CNFS's
/// defaults (`key=value,flag,...`).
pub async fn run(variants: &[String]) -> anyhow::Result<()> {
    println!("\nbench: data path (same directory, NFSv4.1 in the guest kernel vs virtio-fs) ...");
    let art = Artifacts::locate()?;
    let dir = TempDir::new("bench-data")?;
    let ns = NetNs::create()?;
    let nfs = Ganesha::start(&ns, dir.path())?;
    let sock = dir.path().join("virtiofs.sock");
    let mut cmd = Command::new(virtiofsd()?);
    // Kata's defaults (configuration-qemu.toml: virtio_fs_cache = "auto",
    // virtio_fs_extra_args = ["--thread-pool-size=1", "--announce-submounts"]).
    cmd.arg(format!("--socket-path={}", sock.display()))
        .arg(format!("--shared-dir={}", nfs.export_dir.display()))
        .args([
            "--cache=auto",
            "--thread-pool-size=1",
            "--announce-submounts",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("virtiofsd.log"))?);
    let _virtiofsd = Guarded::spawn("virtiofsd", cmd)?;
    wait_for(Duration::from_secs(10), "virtiofsd's socket", || {
        let ok = sock.exists();
        async move { ok.then_some(()) }
    })
    .await?;
    let boot = Boot {
        kernel: art.kernel.clone(),
        initrd: art.initrd.clone(),
        append: Boot::test_append(&ns, ""),
        memory: "1024M".into(),
        qemu_extra: vec![
            "-chardev".into(),
            format!("socket,id=fs0,path={}", sock.display()),
            "-device".into(),
            format!("vhost-user-fs-pci,queue-size=1024,chardev=fs0,tag={TAG}"),
        ],
    };
    let vm = Vm::boot_with(&boot, &ns, dir.path()).await?;
    let g = &vm.exec;
    let a = vm.agent().await?;
    let server = ns.host_ip.clone();
    g.ok(&format!(
        "mkdir -p {VIRTIOFS} && mount -t virtiofs {TAG} {VIRTIOFS}"
    ))
    .await?;
    let mut paths = vec![Path_ {
        label: "virtio-fs".into(),
        root: VIRTIOFS.into(),
        nfs: false,
    }];
    let sets: Vec<String> = std::iter::once(String::new())
        .chain(variants.iter().cloned())
        .collect();
    for (i, set) in sets.iter().enumerate() {
        let name = format!("nfs{i}");
        // The kernel shares one NFS client (its connections, `nconnect` included) among the
        // mounts of one server address: each variant gets an address of its own on the same
        // server (ganesha listens on all of them), so its options are its own.
        let address = if i == 0 {
            server.clone()
        } else {
            let alias = alias_address(&server, i)?;
            let out = ns
                .command("ip")
                .args(["addr", "add", &format!("{alias}/24"), "dev", &ns.host_dev])
                .output()?;
            anyhow::ensure!(
                out.status.success(),
                "adding {alias} in the namespace: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            alias
        };
        let mut spec = nfs_volume(&name, &address, EXPORT, "4.1");
        for item in set.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = item.split_once('=').unwrap_or((item, ""));
            spec.options.insert(k.to_string(), v.to_string());
        }
        a.mount(ctx(T), &mount_request(spec, 0)).await?;
        let label = if set.is_empty() {
            "CNFS NFSv4.1".to_string()
        } else {
            format!("NFSv4.1 {set}")
        };
        paths.push(Path_ {
            label,
            root: format!("/run/cnfs/volumes/{name}"),
            nfs: true,
        });
    }
    println!(
        "guest: {} accel, {}; virtiofsd {}",
        cnfs_testbed::vm::accel(),
        g.ok("uname -r").await?.trim(),
        version_of(&virtiofsd()?)
    );
    let (mut secs, ops) = rounds(g, &paths, "data path").await?;
    print_table(&paths, &mut secs, &ops);
    for p in paths.iter().filter(|p| p.nfs) {
        let opts = g
            .ok(&format!("grep ' {} ' /proc/mounts", p.root))
            .await
            .unwrap_or_default();
        println!("  {}: {}", p.label, opts.trim());
        // The connections the client really has (nconnect): from the transport lines.
        let xprts = g
            .ok(&format!(
                "awk '/^device .* mounted on {} /{{f=1;next}} /^device /{{f=0}} f && /xprt:/' \
                 /proc/self/mountstats | wc -l",
                p.root.replace('/', "\\/")
            ))
            .await
            .unwrap_or_default();
        println!("    transports: {}", xprts.trim());
    }
    Ok(())
}

/// Variant `i`'s server address: the server's subnet, host 200 + `i`.
fn alias_address(server: &str, i: usize) -> anyhow::Result<String> {
    let (net, _) = server
        .rsplit_once('.')
        .ok_or_else(|| anyhow::anyhow!("server address {server}: not IPv4"))?;
    anyhow::ensure!(i < 50, "at most 49 NFS variants");
    Ok(format!("{net}.{}", 200 + i))
}

fn version_of(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

pub(super) fn print_table(
    paths: &[Path_],
    secs: &mut [Vec<Vec<f64>>],
    ops: &[Vec<BTreeMap<String, u64>>],
) {
    let steps = steps();
    let what = |name: &str| match name {
        "write" => format!("write {FILE_MIB} MiB + fsync"),
        "read" => format!("read {FILE_MIB} MiB, cold"),
        "randread" => format!("{RANDOM_READS} x 4 KiB random reads, cold"),
        "create" => format!("create {FILES} x 1 KiB"),
        "stat" => format!("stat {FILES}, cold"),
        "ls" => format!("readdir + lstat {FILES} (ls -l), cold"),
        "unlink" => format!("unlink {FILES}"),
        "tree" => "copy /lib/modules (tree), cold source".to_string(),
        other => other.to_string(),
    };
    println!(
        "\n{:<40} {}",
        "median of 3, seconds",
        paths
            .iter()
            .map(|p| format!(" {:>17}", p.label))
            .collect::<Vec<_>>()
            .join("")
    );
    for (s, step) in steps.iter().enumerate() {
        let base = median(&mut secs[0][s]);
        let mut line = format!("{:<40}  {base:>16.3}", what(step.name));
        for path in secs.iter_mut().skip(1) {
            let t = median(&mut path[s]);
            line.push_str(&format!(" {:>9.3} ({:.2}x)", t, t / base));
        }
        println!("{line}");
    }
    // Only NFS paths count operations (/proc/self/mountstats): no heading for a table
    // without one (CephFS kernel vs ceph-fuse).
    if paths.iter().any(|p| p.nfs) {
        println!("\nNFS operations per step (last round):");
    }
    for (i, p) in paths.iter().enumerate().filter(|(_, p)| p.nfs) {
        println!("  {}", p.label);
        for (s, step) in steps.iter().enumerate() {
            let mut top: Vec<(&String, &u64)> = ops[i][s].iter().collect();
            top.sort_by(|a, b| b.1.cmp(a.1));
            let shown: Vec<String> = top
                .iter()
                .take(6)
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            println!("    {:<10} {}", step.name, shown.join(", "));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_variant_gets_its_own_address_on_the_server_subnet() {
        assert_eq!(alias_address("10.100.7.1", 1).expect("ok"), "10.100.7.201");
        assert_eq!(alias_address("10.100.7.1", 2).expect("ok"), "10.100.7.202");
        assert!(alias_address("10.100.7.1", 50).is_err());
        assert!(alias_address("fd00::1", 1).is_err());
    }

    #[test]
    fn mountstats_per_op_counts_of_one_mount_are_read() {
        let text = "device proc mounted on /proc with fstype proc\n\
            device 10.0.0.1:/export mounted on /run/cnfs/volumes/a with fstype nfs4 statvers=1.1\n\
            \topts:\trw,vers=4.1\n\
            \tper-op statistics\n\
            \t        NULL: 0 0 0 0 0 0 0 0 0\n\
            \t        READ: 12 12 0 1 2 3 4 5 0\n\
            \t      GETATTR: 7 7 0 1 2 3 4 5 0\n\
            device 10.0.0.1:/export mounted on /run/cnfs/volumes/b with fstype nfs4 statvers=1.1\n\
            \tper-op statistics\n\
            \t        READ: 99 99 0 1 2 3 4 5 0\n";
        let a = nfs_ops(text, "/run/cnfs/volumes/a");
        assert_eq!(a.get("READ"), Some(&12));
        assert_eq!(a.get("GETATTR"), Some(&7));
        assert_eq!(a.get("NULL"), Some(&0));
        assert_eq!(nfs_ops(text, "/run/cnfs/volumes/b").get("READ"), Some(&99));
        assert!(nfs_ops(text, "/nowhere").is_empty());
    }
}
