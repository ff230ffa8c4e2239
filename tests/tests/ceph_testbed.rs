//! The test bed's Ceph cluster on its own (no VM): it comes up healthy inside a fresh network
//! namespace, moves data through libcephfs byte-exactly, hands out path-restricted keys, and
//! leaves no daemon behind, also after faults.

use std::path::Path;
use std::time::{Duration, Instant};

use cnfs_testbed::ceph::{without_keys, Ceph};
use cnfs_testbed::{NetNs, TempDir};

/// Pids of ceph daemons whose command line mentions `dir`.
fn ceph_daemons_under(dir: &Path) -> Vec<(u32, String)> {
    let needle = dir.to_string_lossy().into_owned();
    cnfs_testbed::process::processes()
        .into_iter()
        .map(|(pid, argv)| (pid, argv.join(" ")))
        .filter(|(_, cmdline)| {
            let daemon = ["ceph-mon", "ceph-mgr", "ceph-osd", "ceph-mds"]
                .iter()
                .any(|d| cmdline.contains(d));
            daemon && cmdline.contains(&needle)
        })
        .collect()
}

/// Drops `ceph` and checks that none of its daemons is left.
fn drop_and_check_nothing_left(ceph: Ceph, dir: &Path) {
    let t = Instant::now();
    drop(ceph);
    eprintln!("ceph stopped in {:?}", t.elapsed());
    let left = ceph_daemons_under(dir);
    assert!(left.is_empty(), "still running after drop: {left:?}");
}

fn random_bytes(n: usize) -> Vec<u8> {
    use std::io::Read;
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("reading /dev/urandom");
    buf
}

async fn start() -> anyhow::Result<(TempDir, NetNs, Ceph)> {
    let dir = TempDir::new("ceph")?;
    let ns = NetNs::create()?;
    let mut ceph = Ceph::start(&ns, dir.path()).await?;
    let rss = ceph.rss_bytes();
    eprintln!(
        "ceph ready in {:?}, daemons' RSS {} MiB",
        ceph.started_in,
        rss >> 20
    );
    Ok((dir, ns, ceph))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ceph_cluster_comes_up_and_moves_data_through_libcephfs() -> anyhow::Result<()> {
    let (dir, _ns, mut ceph) = start().await?;
    assert!(!ceph_daemons_under(dir.path()).is_empty());
    assert_eq!(ceph.pids().len(), 4);

    let status: serde_json::Value = serde_json::from_str(&ceph.ceph(&["-s", "-f", "json"])?)?;
    assert_eq!(status["health"]["status"], "HEALTH_OK", "{status:#}");
    assert_eq!(status["fsid"], ceph.fsid().as_str());
    let ranks = status["fsmap"]["by_rank"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        ranks.iter().any(|r| r["status"] == "up:active"),
        "no active MDS: {status:#}"
    );
    let text = ceph.ceph(&["-s"])?;
    assert!(text.contains("HEALTH_OK"), "{text}");
    let fs = ceph.ceph(&["fs", "ls"])?;
    assert!(fs.contains("name: cephfs"), "{fs}");
    // The monitor listens on both protocols at the namespace's address.
    let mons = ceph.ceph(&["mon", "dump"])?;
    assert!(
        mons.contains(&format!("v2:{}", ceph.mon_v2()))
            && mons.contains(&format!("v1:{}", ceph.mon_v1())),
        "{mons}"
    );

    // 1 MiB of random bytes (every byte value, NULs and newlines included) round-trips.
    let data = random_bytes(1 << 20);
    let t = Instant::now();
    ceph.write_file("/random.bin", &data);
    let back = ceph.read_file("/random.bin");
    eprintln!("1 MiB written and read back in {:?}", t.elapsed());
    assert_eq!(back.len(), data.len());
    assert!(back == data, "1 MiB file came back different");

    // Rewriting replaces the file (truncates).
    ceph.write_file("/random.bin", b"short");
    assert_eq!(ceph.read_file("/random.bin"), b"short");

    // No parent, no file; after mkdir it works.
    assert!(ceph.try_write_file("/a/b/c.txt", b"x").is_err());
    assert!(ceph.try_read_file("/missing").is_err());
    ceph.mkdir("/a/b");
    let nested = b"nested\0\xff\n\r data".to_vec();
    ceph.write_file("/a/b/c.txt", &nested);
    assert_eq!(ceph.read_file("/a/b/c.txt"), nested);
    ceph.write_file("/a/empty", b"");
    assert_eq!(ceph.read_file("/a/empty"), b"");

    // Data went to the cluster: the data pool holds objects. Pool statistics reach the
    // manager every `mgr stats period` (1 s), so they may lag the writes a little.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let df: serde_json::Value = serde_json::from_str(&ceph.ceph(&["df", "-f", "json"])?)?;
        let data_pool = df["pools"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["name"] == "cephfs_data"))
            .cloned()
            .unwrap_or_default();
        if data_pool["stats"]["objects"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(std::time::Instant::now() < until, "{data_pool:#}");
        std::thread::sleep(std::time::Duration::from_millis(500));
    }

    // Nothing was written where another instance (or the host's own Ceph) would look.
    for log in ["cluster.log", "mon.a.log", "mds.a.log"] {
        assert!(
            ceph.root.join("log").join(log).exists(),
            "{log} not in the temp dir"
        );
    }
    drop_and_check_nothing_left(ceph, dir.path());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorized_client_key_is_restricted_to_its_path() -> anyhow::Result<()> {
    let (dir, _ns, ceph) = start().await?;
    let admin = ceph.admin_key();
    assert!(is_cephx_key(&admin), "admin key is not a cephx key");

    let key = ceph.authorize("app", "/sub", "rw")?;
    assert!(is_cephx_key(&key), "authorize did not return a cephx key");
    assert_ne!(key, admin, "the app got the admin key");

    let auth = ceph.ceph(&["auth", "get", "client.app"])?;
    let shown = without_keys(&auth);
    assert!(auth.contains(&key), "auth get shows another key:\n{shown}");
    let mds_caps = auth
        .lines()
        .find(|l| l.trim_start().starts_with("caps mds"))
        .unwrap_or_default();
    assert!(
        mds_caps.contains("path=/sub") && mds_caps.contains("allow rw"),
        "mds caps not restricted to /sub:\n{shown}"
    );
    // The directory it names exists (authorize created it), and a second client for the same
    // path gets a key of its own.
    ceph.write_file("/sub/x", b"in sub");
    assert_eq!(ceph.read_file("/sub/x"), b"in sub");
    let other = ceph.authorize("ro", "/sub", "r")?;
    assert!(other != key && other != admin);
    let ro = without_keys(&ceph.ceph(&["auth", "get", "client.ro"])?);
    assert!(ro.contains("allow r fsname=cephfs path=/sub"), "{ro}");

    drop_and_check_nothing_left(ceph, dir.path());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_stop_daemons_and_drop_leaves_nothing_running() -> anyhow::Result<()> {
    let (dir, _ns, mut ceph) = start().await?;
    let before = ceph_daemons_under(dir.path());
    assert_eq!(before.len(), 4, "{before:?}");

    ceph.stop_mds();
    let left = ceph_daemons_under(dir.path());
    assert_eq!(left.len(), 3, "{left:?}");
    assert!(
        left.iter().all(|(_, c)| !c.contains("ceph-mds")),
        "{left:?}"
    );
    assert_eq!(ceph.pids().len(), 3);

    ceph.stop_mon();
    assert!(ceph_daemons_under(dir.path())
        .iter()
        .all(|(_, c)| !c.contains("ceph-mon")));
    // With the monitor gone, a command fails within its bound instead of hanging.
    let t = Instant::now();
    assert!(ceph.ceph(&["health"]).is_err());
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());

    drop_and_check_nothing_left(ceph, dir.path());
    Ok(())
}

/// Base64 of a cephx secret: 28 bytes → 40 characters ending in `==`.
fn is_cephx_key(k: &str) -> bool {
    k.len() == 40
        && k.ends_with("==")
        && k[..38]
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '/')
}
