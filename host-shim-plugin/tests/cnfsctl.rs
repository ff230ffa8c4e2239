//! `cnfsctl` end to end: the real binary against a real guest (QEMU, cnfs-agent, nfs-ganesha)
//! from the test bed, reached through a Kata-style shim management socket or a direct URL.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cnfs_testbed::ganesha::EXPORT;
use cnfs_testbed::TestBed;
use serde_json::Value;

const SANDBOX: &str = "cnfsctl-e2e-sandbox";

/// The output of one `cnfsctl` run.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?} / {:?}", self.stdout, self.stderr))
    }

    fn ok(self) -> Self {
        assert_eq!(self.code, 0, "{self:?}");
        self
    }
}

/// Runs the real `cnfsctl` without blocking the test's runtime.
async fn cnfsctl(args: &[&str]) -> Run {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_cnfsctl"))
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("cnfsctl finished in time")
    .expect("cnfsctl ran");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn guest_has_mount(bed: &TestBed, name: &str) -> bool {
    let out = bed
        .vm
        .exec
        .run(
            &format!("grep ' /run/cnfs/volumes/{name} ' /proc/mounts"),
            Duration::from_secs(30),
        )
        .await
        .expect("guest exec");
    out.code == 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cnfsctl_finds_the_guest_via_kata_monitor_socket_and_manages_an_nfs_volume_with_scriptable_exit_codes(
) -> anyhow::Result<()> {
    let bed = TestBed::start().await?;
    let monitor: PathBuf = bed.dir.path().join("shim-monitor.sock");
    let _monitor = cnfs_testbed::kata_monitor::serve(&monitor, &bed.vm.hvsock)?;
    let monitor_arg = monitor.display().to_string();
    let via_sandbox: Vec<&str> = vec!["--sandbox", SANDBOX, "--monitor-socket", &monitor_arg];
    let url = format!("hvsock://{}:17230", bed.vm.hvsock.display());
    let via_url: Vec<&str> = vec!["--url", &url];
    let args = |base: &[&str], rest: &[&str]| -> Vec<String> {
        base.iter().chain(rest).map(|s| s.to_string()).collect()
    };
    let run = |a: Vec<String>| async move {
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        cnfsctl(&refs).await
    };

    // ping, as a table, through the (stand-in) Kata shim: the CNFS port replaced kata-agent's.
    let r = run(args(&via_sandbox, &["ping"])).await.ok();
    assert!(
        r.stdout
            .lines()
            .any(|l| l.starts_with("agent ") && l.ends_with(&url)),
        "{}",
        r.stdout
    );
    for key in [
        "version",
        "sandbox",
        "filesystems",
        "capabilities",
        "uptime",
        "volumes",
    ] {
        assert!(
            r.stdout.lines().any(|l| l.starts_with(key)),
            "{key}: {}",
            r.stdout
        );
    }
    assert!(r.stdout.contains("nfs"), "{}", r.stdout);
    // ... and as JSON, both ways.
    for base in [&via_sandbox, &via_url] {
        let j = run(args(base, &["--json", "ping"])).await.ok().json();
        assert_eq!(j["agent"], url.as_str(), "{j}");
        assert!(j["version"].as_str().is_some_and(|v| !v.is_empty()), "{j}");
        assert!(
            j["filesystems"]
                .as_array()
                .is_some_and(|f| f.iter().any(|x| x == "nfs")),
            "{j}"
        );
        assert!(
            j["capabilities"].is_array() && j["uptime_ms"].is_u64(),
            "{j}"
        );
        assert_eq!(j["volumes"], 0, "{j}");
    }

    // mount an NFSv4.1 volume: the guest's kernel holds it and sees the server's files.
    let nfs = format!("{}:{EXPORT}", bed.ns.host_ip);
    let r = run(args(
        &via_sandbox,
        &[
            "mount",
            "--name",
            "web",
            "--nfs",
            &nfs,
            "--version",
            "4.1",
            "-o",
            "hard",
        ],
    ))
    .await
    .ok();
    assert!(r.stdout.contains("/run/cnfs/volumes/web"), "{}", r.stdout);
    let line = bed
        .vm
        .exec
        .ok("grep /run/cnfs/volumes/web /proc/mounts")
        .await?;
    assert!(
        line.contains(" nfs4 ") && line.contains("vers=4.1"),
        "{line}"
    );
    std::fs::write(
        bed.nfs.export_dir.join("from-host.txt"),
        "written on the host\n",
    )?;
    assert_eq!(
        bed.vm
            .exec
            .ok("cat /run/cnfs/volumes/web/from-host.txt")
            .await?,
        "written on the host\n"
    );
    // The same mount again is idempotent (exit 0, nothing done).
    let j = run(args(
        &via_url,
        &[
            "--json", "mount", "--name", "web", "--nfs", &nfs, "-o", "hard",
        ],
    ))
    .await
    .ok()
    .json();
    assert_eq!(j["already_mounted"], true, "{j}");
    assert_eq!(j["mount_point"], "/run/cnfs/volumes/web", "{j}");

    // list: table and JSON.
    let r = run(args(&via_url, &["list"])).await.ok();
    let mut lines = r.stdout.lines();
    let header = lines.next().unwrap_or_default();
    assert!(
        header.starts_with("NAME") && header.contains("STATE") && header.ends_with("MOUNTPOINT"),
        "{}",
        r.stdout
    );
    let row = lines.next().unwrap_or_default();
    assert!(
        row.starts_with("web ")
            && row.contains("mounted")
            && row.contains(&nfs)
            && row.ends_with("/run/cnfs/volumes/web"),
        "{}",
        r.stdout
    );
    let j = run(args(&via_sandbox, &["--json", "list"]))
        .await
        .ok()
        .json();
    let vols = j["volumes"].as_array().cloned().unwrap_or_default();
    let web = vols
        .iter()
        .find(|v| v["name"] == "web")
        .unwrap_or_else(|| panic!("web listed: {j}"));
    assert_eq!(web["state"], "mounted", "{j}");
    assert_eq!(web["fs"], "nfs", "{j}");
    assert_eq!(web["fs_type"], "nfs4", "{j}");
    assert_eq!(web["nfs"]["version"], "4.1", "{j}");
    assert_eq!(web["nfs"]["server"], bed.ns.host_ip.as_str(), "{j}");
    assert_eq!(web["options"]["hard"], "", "{j}");
    assert_eq!(web["mount_point"], "/run/cnfs/volumes/web", "{j}");

    // stats: healthy, sizes agree with the guest's own statfs.
    let r = run(args(&via_sandbox, &["stats", "web"])).await.ok();
    assert!(
        r.stdout
            .lines()
            .any(|l| l.starts_with("health") && l.contains("healthy")),
        "{}",
        r.stdout
    );
    for key in ["size", "used", "available", "inodes", "probe"] {
        assert!(
            r.stdout.lines().any(|l| l.starts_with(key)),
            "{key}: {}",
            r.stdout
        );
    }
    let j = run(args(&via_url, &["--json", "stats", "web"]))
        .await
        .ok()
        .json();
    assert_eq!(j["health"], "healthy", "{j}");
    let guest = bed
        .vm
        .exec
        .ok("stat -f -c '%S %b' /run/cnfs/volumes/web")
        .await?;
    let f: Vec<u64> = guest
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    assert_eq!(f.len(), 2, "{guest}");
    assert_eq!(j["total_bytes"], f[0] * f[1], "{j} / {guest}");

    // Exit codes scripts rely on.
    // 5: no such volume.
    let r = run(args(&via_url, &["unmount", "nope"])).await;
    assert_eq!(r.code, 5, "{r:?}");
    assert!(
        r.stderr.starts_with("cnfsctl: ") && r.stderr.lines().count() == 1,
        "{r:?}"
    );
    let r = run(args(&via_sandbox, &["stats", "nope"])).await;
    assert_eq!(r.code, 5, "{r:?}");
    // 4: an option only the agent may set; refused locally, the field named.
    let r = run(args(
        &via_sandbox,
        &[
            "mount",
            "--name",
            "bad",
            "--nfs",
            &nfs,
            "-o",
            "addr=1.2.3.4",
        ],
    ))
    .await;
    assert_eq!(r.code, 4, "{r:?}");
    assert!(r.stderr.contains("volume.options.addr"), "{r:?}");
    assert!(
        r.stderr.starts_with("cnfsctl: ") && r.stderr.lines().count() == 1,
        "{r:?}"
    );
    // 6: the same name with another export.
    std::fs::create_dir_all(bed.nfs.export_dir.join("sub"))?;
    let other = format!("{}:{EXPORT}/sub", bed.ns.host_ip);
    let r = run(args(&via_url, &["mount", "--name", "web", "--nfs", &other])).await;
    assert_eq!(r.code, 6, "{r:?}");
    assert!(r.stderr.contains("ALREADY_EXISTS"), "{r:?}");
    // The first mount is untouched.
    assert!(guest_has_mount(&bed, "web").await);

    // unmount: method reported, gone in the guest.
    let r = run(args(&via_sandbox, &["unmount", "web"])).await.ok();
    assert!(
        r.stdout
            .lines()
            .any(|l| l.starts_with("method") && l.contains("umount")),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("failed attempts"), "{}", r.stdout);
    assert!(!guest_has_mount(&bed, "web").await);
    let j = run(args(&via_url, &["--json", "list"])).await.ok().json();
    assert_eq!(j["volumes"], serde_json::json!([]), "{j}");
    // Unmount JSON on a second volume.
    run(args(&via_url, &["mount", "--name", "tmp", "--nfs", &nfs]))
        .await
        .ok();
    let j = run(args(&via_url, &["--json", "unmount", "tmp"]))
        .await
        .ok()
        .json();
    assert_eq!(j["name"], "tmp", "{j}");
    assert!(j["method"].is_string() && j["attempts"].is_array(), "{j}");
    assert!(!guest_has_mount(&bed, "tmp").await);

    // The same guest, an encrypted volume, then a shared encrypted one.
    an_encrypted_volume_is_mounted_with_its_key_file_and_the_key_is_never_shown(&bed, &via_url)
        .await?;
    a_shared_encrypted_volume_is_mounted_with_a_one_line_key_file(&bed, &via_url).await
}

/// `--source nfs://...?encryption=gocryptfs --key-file F`: the guest initialises a gocryptfs
/// tree on the export and serves it; `list` says gocryptfs with no size and no key; the
/// server holds the tree and no plaintext; a key file ending in a newline is refused before
/// the guest is asked, naming the file and not the key.
async fn a_shared_encrypted_volume_is_mounted_with_a_one_line_key_file(
    bed: &TestBed,
    via_url: &[&str],
) -> anyhow::Result<()> {
    let marker = format!("CNFSCTL-GOCRYPTFS-KEY-{}", std::process::id());
    let key = format!("\u{1}{marker} \u{fe}").into_bytes();
    let key_file = bed.dir.path().join("shared.key");
    std::fs::write(&key_file, &key)?;
    let echoed_file = bed.dir.path().join("echoed.key");
    std::fs::write(&echoed_file, [&key[..], b"\n"].concat())?;
    std::fs::create_dir_all(bed.nfs.export_dir.join("shr"))?;
    let source = format!("nfs://{}{EXPORT}/shr?encryption=gocryptfs", bed.ns.host_ip);
    let mut outputs: Vec<u8> = Vec::new();
    let key_arg = key_file.display().to_string();
    let r = slow(
        via_url,
        &[
            "mount",
            "--name",
            "shr",
            "--source",
            &source,
            "--key-file",
            &key_arg,
        ],
    )
    .await;
    outputs.extend_from_slice(format!("{}{}", r.stdout, r.stderr).as_bytes());
    let r = r.ok();
    assert!(r.stdout.contains("/run/cnfs/volumes/shr"), "{}", r.stdout);
    let mounts = bed.vm.exec.ok("cat /proc/mounts").await?;
    assert!(
        mounts.contains("/run/cnfs/volumes/shr fuse.gocryptfs "),
        "{mounts}"
    );
    let r = slow(via_url, &["--json", "list"]).await;
    outputs.extend_from_slice(r.stdout.as_bytes());
    let j = r.ok().json();
    let vols = j["volumes"].as_array().cloned().unwrap_or_default();
    let shr = vols
        .iter()
        .find(|v| v["name"] == "shr")
        .unwrap_or_else(|| panic!("shr listed: {j}"));
    assert_eq!(
        shr["encryption"],
        serde_json::json!({"mode": "gocryptfs", "size_bytes": 0, "uid": 0, "gid": 0}),
        "{j}"
    );
    let canary = format!("CNFSCTL-SHARED-CANARY-{}", std::process::id());
    bed.vm
        .exec
        .ok(&format!(
            "echo {canary} > /run/cnfs/volumes/shr/canary.txt && sync"
        ))
        .await?;
    let r = slow(via_url, &["unmount", "shr"]).await;
    outputs.extend_from_slice(format!("{}{}", r.stdout, r.stderr).as_bytes());
    r.ok();
    assert!(!guest_has_mount(bed, "shr").await);
    let tree = bed.nfs.export_dir.join("shr/cnfs-volume.gocryptfs");
    assert!(
        tree.join("gocryptfs.conf").is_file(),
        "no tree on the server"
    );
    assert!(
        files_holding(&bed.nfs.export_dir, canary.as_bytes()).is_empty(),
        "plaintext on the server"
    );

    // `echo key > file` leaves a newline gocryptfs would cut: refused locally (exit 4).
    let echoed = echoed_file.display().to_string();
    let r = slow(
        via_url,
        &[
            "mount",
            "--name",
            "shr",
            "--source",
            &source,
            "--key-file",
            &echoed,
        ],
    )
    .await;
    outputs.extend_from_slice(format!("{}{}", r.stdout, r.stderr).as_bytes());
    assert_eq!(r.code, 4, "{r:?}");
    assert!(
        r.stderr.contains("--key-file") && r.stderr.contains("newline"),
        "{r:?}"
    );
    assert!(!guest_has_mount(bed, "shr").await);
    assert_eq!(leaks(&outputs, &key, &marker), Vec::<String>::new());
    Ok(())
}

/// cnfsctl with the guest found by `via_url` and a long request deadline (first use of an
/// encrypted volume derives keys and makes file systems under TCG).
async fn slow(via_url: &[&str], rest: &[&str]) -> Run {
    let a: Vec<&str> = via_url
        .iter()
        .chain(&["--timeout", "120"])
        .chain(rest)
        .copied()
        .collect();
    cnfsctl(&a).await
}

/// Bytes in no output: raw, and as the escapes or numbers a careless printer would make of
/// the key's distinctive middle (`marker`).
fn leaks(haystack: &[u8], key: &[u8], marker: &str) -> Vec<String> {
    let decimal: Vec<String> = marker.bytes().map(|b| b.to_string()).collect();
    let mut hits = Vec::new();
    for (what, needle) in [
        ("raw key", key.to_vec()),
        ("marker", marker.as_bytes().to_vec()),
        ("decimal", decimal.join(",").into_bytes()),
        ("decimal list", decimal.join(", ").into_bytes()),
    ] {
        if haystack.windows(needle.len()).any(|w| w == needle) {
            hits.push(what.to_string());
        }
    }
    hits
}

/// Files under `dir` holding `needle` (a byte search, like `grep -r -a`).
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for p in entries.flatten().map(|e| e.path()) {
            if p.is_dir() {
                stack.push(p);
            } else if std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
            {
                hits.push(p.display().to_string());
            }
        }
    }
    hits
}

/// Host `cryptsetup` (exit status, stdout and stderr).
fn host_cryptsetup(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("cryptsetup")
        .args(args)
        .output()
        .expect("host cryptsetup runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `--source nfs://...?encryption=luks2&size=128Mi --key-file F`: the guest formats and opens
/// a LUKS2 container on the export, `list` shows the mode and never the key, the host sees a
/// stock LUKS2 file that the key file's exact bytes (trailing newline included) open, a wrong
/// key exits 8 (PERMISSION_DENIED) naming the reason, and an encrypted URL without
/// `--key-file` is refused before the guest is asked.
async fn an_encrypted_volume_is_mounted_with_its_key_file_and_the_key_is_never_shown(
    bed: &TestBed,
    via_url: &[&str],
) -> anyhow::Result<()> {
    let marker = format!("CNFSCTL-LUKS-KEY-{}", std::process::id());
    let mut key = b"\x00\xfe\x01".to_vec();
    key.extend_from_slice(marker.as_bytes());
    key.extend_from_slice(b" \xff\n");
    let key_file = bed.dir.path().join("luks.key");
    std::fs::write(&key_file, &key)?;
    let wrong_file = bed.dir.path().join("wrong.key");
    std::fs::write(&wrong_file, format!("not-{marker}\n"))?;
    // The same bytes without the trailing newline: must not open it.
    let trimmed_file = bed.dir.path().join("trimmed.key");
    std::fs::write(&trimmed_file, &key[..key.len() - 1])?;
    std::fs::create_dir_all(bed.nfs.export_dir.join("sec"))?;
    let source = format!(
        "nfs://{}{EXPORT}/sec?encryption=luks2&size=128Mi",
        bed.ns.host_ip
    );
    let (key_arg, wrong_arg) = (
        key_file.display().to_string(),
        wrong_file.display().to_string(),
    );
    let mut outputs: Vec<u8> = Vec::new();
    // First use formats (two argon2 passes and mkfs under TCG): a long request deadline.
    let keep = |outputs: &mut Vec<u8>, r: &Run| {
        outputs.extend_from_slice(r.stdout.as_bytes());
        outputs.extend_from_slice(r.stderr.as_bytes());
    };

    let r = slow(
        via_url,
        &[
            "mount",
            "--name",
            "sec",
            "--source",
            &source,
            "--key-file",
            &key_arg,
        ],
    )
    .await;
    keep(&mut outputs, &r);
    let r = r.ok();
    assert!(r.stdout.contains("/run/cnfs/volumes/sec"), "{}", r.stdout);
    let mounts = bed.vm.exec.ok("cat /proc/mounts").await?;
    assert!(mounts.contains("/run/cnfs/volumes/sec ext4 "), "{mounts}");
    assert!(mounts.contains("/run/cnfs/backing/sec nfs4 "), "{mounts}");

    // list: the table's state says luks2, the JSON has the mode and size; no key anywhere.
    let r = slow(via_url, &["list"]).await;
    keep(&mut outputs, &r);
    let r = r.ok();
    let row = r
        .stdout
        .lines()
        .find(|l| l.starts_with("sec "))
        .unwrap_or_default();
    assert!(
        row.contains("mounted,luks2") && row.ends_with("/run/cnfs/volumes/sec"),
        "{}",
        r.stdout
    );
    let r = slow(via_url, &["--json", "list"]).await;
    keep(&mut outputs, &r);
    let j = r.ok().json();
    let vols = j["volumes"].as_array().cloned().unwrap_or_default();
    let sec = vols
        .iter()
        .find(|v| v["name"] == "sec")
        .unwrap_or_else(|| panic!("sec listed: {j}"));
    assert_eq!(
        sec["encryption"],
        serde_json::json!({"mode": "luks2", "size_bytes": 128u64 << 20, "uid": 0, "gid": 0}),
        "{j}"
    );
    assert_eq!(sec["fs_type"], "ext4", "{j}");
    assert_eq!(
        sec["options"],
        serde_json::json!({}),
        "encryption options are no mount options: {j}"
    );

    // Written in the guest through the volume; the server keeps ciphertext only.
    let canary = format!("CNFSCTL-PLAINTEXT-CANARY-{}", std::process::id());
    bed.vm
        .exec
        .ok(&format!(
            "for i in 1 2 3 4; do echo {canary} >> /run/cnfs/volumes/sec/canary.txt; done && sync"
        ))
        .await?;
    let r = slow(via_url, &["unmount", "sec"]).await;
    keep(&mut outputs, &r);
    r.ok();
    let mounts = bed.vm.exec.ok("cat /proc/mounts").await?;
    assert!(
        !mounts.contains("/run/cnfs/volumes/sec") && !mounts.contains("/run/cnfs/backing/sec"),
        "{mounts}"
    );
    let container = bed.nfs.export_dir.join("sec/cnfs-volume.luks2");
    let container_arg = container.display().to_string();
    let (is_luks, out) = host_cryptsetup(&["isLuks", "--type", "luks2", &container_arg]);
    assert!(is_luks, "host cryptsetup isLuks: {out}");
    // The key is the file's exact bytes: the same file opens it, without its newline it
    // does not.
    let (opens, out) = host_cryptsetup(&[
        "open",
        "--test-passphrase",
        "--key-file",
        &key_arg,
        &container_arg,
    ]);
    assert!(opens, "the key file opens the container on the host: {out}");
    let (opens, _) = host_cryptsetup(&[
        "open",
        "--test-passphrase",
        "--key-file",
        &trimmed_file.display().to_string(),
        &container_arg,
    ]);
    assert!(!opens, "the key without its trailing newline opened it");
    assert!(
        files_holding(&bed.nfs.export_dir, canary.as_bytes()).is_empty(),
        "plaintext on the server"
    );
    assert!(
        files_holding(&bed.nfs.export_dir, marker.as_bytes()).is_empty(),
        "key on the server"
    );

    // A wrong key: exit 8 (PERMISSION_DENIED), the reason named, nothing mounted.
    let r = slow(
        via_url,
        &[
            "mount",
            "--name",
            "sec",
            "--source",
            &source,
            "--key-file",
            &wrong_arg,
        ],
    )
    .await;
    keep(&mut outputs, &r);
    assert_eq!(r.code, 8, "{r:?}");
    assert!(
        r.stderr.starts_with("cnfsctl: ")
            && r.stderr.contains("the key does not open it")
            && r.stderr.lines().count() == 1,
        "{r:?}"
    );
    assert!(!guest_has_mount(bed, "sec").await);
    assert!(
        !bed.vm
            .exec
            .ok("cat /proc/mounts")
            .await?
            .contains("/run/cnfs/backing/sec"),
        "the share stayed mounted after a wrong key"
    );

    // No --key-file for an encrypted URL: refused locally (exit 4), the flag named.
    let r = slow(via_url, &["mount", "--name", "sec", "--source", &source]).await;
    keep(&mut outputs, &r);
    assert_eq!(r.code, 4, "{r:?}");
    assert!(
        r.stderr.starts_with("cnfsctl: --key-file: ") && r.stderr.contains("encrypted"),
        "{r:?}"
    );

    // The key in none of cnfsctl's output, nor in the guest's records and console.
    assert_eq!(leaks(&outputs, &key, &marker), Vec::<String>::new());
    let records = bed
        .vm
        .exec
        .ok("cat /run/cnfs/state/* /proc/mounts 2>/dev/null; true")
        .await?;
    assert_eq!(
        leaks(records.as_bytes(), &key, &marker),
        Vec::<String>::new()
    );
    assert_eq!(
        leaks(bed.vm.console_text().as_bytes(), &key, &marker),
        Vec::<String>::new()
    );
    Ok(())
}

/// No VM needed: what happens before the guest is ever reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cnfsctl_reports_a_missing_sandbox_and_bad_usage_with_their_exit_codes() {
    // 3: the sandbox's management socket does not exist; gives up at --timeout.
    let t0 = Instant::now();
    let r = cnfsctl(&[
        "--sandbox",
        "no-such-sandbox",
        "--monitor-socket",
        "/nonexistent/cnfs-test/shim-monitor.sock",
        "--timeout",
        "2",
        "ping",
    ])
    .await;
    let took = t0.elapsed();
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "{took:?}"
    );
    assert!(
        r.stderr.starts_with("cnfsctl: ")
            && r.stderr
                .contains("/nonexistent/cnfs-test/shim-monitor.sock")
            && r.stderr.lines().count() == 1,
        "{r:?}"
    );
    // 3: an agent URL nobody answers.
    let r = cnfsctl(&[
        "--url",
        "unix:///nonexistent/cnfs-test/agent.sock",
        "--timeout",
        "1",
        "list",
    ])
    .await;
    assert_eq!(r.code, 3, "{r:?}");
    // 4: a sandbox id that could climb out of Kata's directories; a bad URL; a bad name.
    let r = cnfsctl(&["--sandbox", "../etc", "ping"]).await;
    assert_eq!(r.code, 4, "{r:?}");
    assert_eq!(r.stderr.matches("sandbox id").count(), 1, "{r:?}");
    let r = cnfsctl(&["--url", "tcp://1.2.3.4:5", "ping"]).await;
    assert_eq!(r.code, 4, "{r:?}");
    let r = cnfsctl(&[
        "--url",
        "unix:///nonexistent",
        "mount",
        "--name",
        "Bad_Name",
        "--nfs",
        "10.0.0.1:/x",
    ])
    .await;
    assert_eq!(r.code, 4, "{r:?}");
    assert!(r.stderr.contains("volume.name"), "{r:?}");
    // 2: usage errors (clap): no target, both targets, unknown command.
    for args in [
        &["ping"][..],
        &["--sandbox", "a", "--url", "unix:///x", "ping"][..],
        &["--sandbox", "a", "frobnicate"][..],
    ] {
        let r = cnfsctl(args).await;
        assert_eq!(r.code, 2, "{args:?}: {r:?}");
    }
    // --help documents the exit codes and the JSON keys.
    let r = cnfsctl(&["--help"]).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains("Exit codes:") && r.stdout.contains("already_mounted"),
        "{}",
        r.stdout
    );
}
