//! End to end: a shared encrypted (`gocryptfs`) volume on NFSv4.1 from nfs-ganesha, in one
//! real guest. The agent mounts the export at /run/cnfs/backing/<name>, initialises a new
//! `cnfs-volume.gocryptfs` tree there (Debian's gocryptfs from the image's tool prefix, run by
//! the agent's tool runner), mounts FUSE itself and has the runner start a gocryptfs daemon
//! on that mount's descriptor. Checked from the host: only ciphertext and encrypted names on
//! the server, a stock gocryptfs on the host opens the tree with the same key (recovery);
//! two volumes of the same directory (two NFS clients, two daemons) see each other's writes
//! (the ReadWriteMany case); then the lifecycle: unmount and reopen, agent kill -9 and restart
//! (the daemon serves on), a wrong key, an existing directory without configuration, a
//! damaged configuration, a dead daemon, and nothing left behind after each.

use std::path::Path;
use std::time::Duration;

use cnfs_protocols::agent;
use cnfs_protocols::agent_ttrpc::AgentClient;
use cnfs_testbed::ganesha::{Ganesha, EXPORT};
use cnfs_testbed::process::files_containing;
use cnfs_testbed::vm::ctx;
use cnfs_testbed::{code_of, message_of, nfs_volume, GuestExec, NetNs, TempDir, Vm};
use ttrpc::Code;

const T: Duration = Duration::from_secs(240);
/// gocryptfs's scrypt (64 MiB) runs once at -init and once per open: generous under TCG.
const MOUNT_MS: u32 = 180_000;
const KEY: &[u8] = b"g0cryptfs key \x01\xfe bytes";

fn shared_volume(name: &str, server: &str, dir: &str, key: &[u8]) -> agent::VolumeSpec {
    let mut spec = nfs_volume(name, server, &format!("{EXPORT}/{dir}"), "4.1");
    spec.encryption = protobuf::MessageField::some(agent::Encryption {
        mode: "gocryptfs".into(),
        key: key.to_vec(),
        uid: 1000,
        gid: 1000,
        ..Default::default()
    });
    spec
}

async fn mount(
    a: &AgentClient,
    spec: agent::VolumeSpec,
) -> Result<agent::MountResponse, ttrpc::Error> {
    cnfs_testbed::mount_within(a, spec, MOUNT_MS).await
}

async fn unmount(a: &AgentClient, name: &str) -> anyhow::Result<agent::UnmountResponse> {
    cnfs_testbed::unmount_within(a, name, 30_000).await
}

/// gocryptfs daemons running in the guest.
async fn daemons(g: &GuestExec) -> anyhow::Result<usize> {
    let out = g
        .ok("grep -ls 'gocryptf[s]' /proc/[0-9]*/cmdline 2>/dev/null | grep -v self || true")
        .await?;
    Ok(out.lines().filter(|l| !l.trim().is_empty()).count())
}

/// Nothing of a gocryptfs volume is left in the guest: no backing, FUSE or volume mount, no
/// daemon. Waited for: a daemon ends a moment after its mount goes.
async fn nothing_left(g: &GuestExec) -> anyhow::Result<()> {
    let until = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let mounts = g
            .ok("grep -E 'cnfs/(backing|volumes|gocryptfs)' /proc/mounts || true")
            .await?;
        let n = daemons(g).await?;
        if mounts.trim().is_empty() && n == 0 {
            return Ok(());
        }
        if std::time::Instant::now() > until {
            anyhow::bail!("left behind: mounts={mounts:?} daemons={n}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Every name under `dir`, relative, sorted, with each file's checksum: what a fault must
/// leave unchanged.
fn tree_state(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            let rel = p.strip_prefix(dir)?.display().to_string();
            if p.is_dir() {
                out.push(format!("{rel}/"));
                stack.push(p);
            } else {
                out.push(format!("{rel} {:x}", md5_like(&std::fs::read(&p)?)));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// A cheap content fingerprint (FNV-1a), enough to see a change in a test.
fn md5_like(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The names of everything under `dir` (the server's view), at any depth.
fn all_names(dir: &Path) -> anyhow::Result<Vec<String>> {
    Ok(tree_state(dir)?
        .into_iter()
        .map(|l| l.split(' ').next().unwrap_or_default().to_string())
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_encrypted_volume_serves_two_clients_and_keeps_its_secrets() -> anyhow::Result<()>
{
    let art = cnfs_testbed::Artifacts::locate()?;
    let dir = TempDir::new("gocryptfs")?;
    let ns = NetNs::create()?;
    let ganesha = Ganesha::start(&ns, dir.path())?;
    let export = ganesha.export_dir.clone();
    for d in ["shr", "noconf", "damaged"] {
        std::fs::create_dir_all(export.join(d))?;
    }
    std::fs::write(export.join("noconf/existing.txt"), b"someone's plain data")?;
    let vm = Vm::boot(&art, &ns, dir.path()).await?;
    let g = &vm.exec;
    let a = vm.agent().await?;
    let server = ganesha.server_ip.clone();

    let ping = a.ping(ctx(T), &agent::PingRequest::new()).await?;
    assert!(
        ping.encryption_modes.contains(&"gocryptfs".to_string()),
        "{ping:?}"
    );

    // First use initialises the tree; the volume is served by one gocryptfs daemon.
    let first = mount(&a, shared_volume("shr", &server, "shr", KEY)).await?;
    assert!(!first.already_mounted);
    let mounts = g.ok("cat /proc/mounts").await?;
    assert!(
        mounts.contains("/run/cnfs/volumes/shr fuse.gocryptfs "),
        "not gocryptfs at the volume: {mounts}"
    );
    assert!(mounts.contains("/run/cnfs/backing/shr nfs4 "), "{mounts}");
    assert_eq!(daemons(g).await?, 1);
    assert_eq!(
        g.ok("stat -c %u:%g:%a /run/cnfs/volumes/shr").await?.trim(),
        "1000:1000:755"
    );
    let canary = format!("CNFS-PLAINTEXT-CANARY-{}", std::process::id());
    g.ok(&format!(
        "mkdir /run/cnfs/volumes/shr/secret-dir-name && \
         for i in 1 2 3 4 5 6 7 8; do echo {canary} >> /run/cnfs/volumes/shr/secret-dir-name/canary.txt; done; \
         head -c 3000000 /dev/urandom > /run/cnfs/volumes/shr/blob && sync"
    ))
    .await?;
    let sums = g
        .ok("cd /run/cnfs/volumes/shr && sha256sum secret-dir-name/canary.txt blob")
        .await?;

    // The server holds the fixed tree only: no temp, no plaintext, no plaintext name, no key.
    let listing: Vec<String> = std::fs::read_dir(export.join("shr"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(listing, vec!["cnfs-volume.gocryptfs".to_string()]);
    let tree = export.join("shr/cnfs-volume.gocryptfs");
    assert!(tree.join("gocryptfs.conf").is_file() && tree.join("gocryptfs.diriv").is_file());
    let names = all_names(&tree)?.join("\n");
    for plain in ["secret-dir-name", "canary", "blob"] {
        assert!(
            !names.contains(plain),
            "plaintext name {plain} on the server:\n{names}"
        );
    }
    assert!(
        files_containing(&export, canary.as_bytes())?.is_empty(),
        "plaintext on the server"
    );
    assert!(
        files_containing(&export, KEY)?.is_empty(),
        "key on the server"
    );

    // A second volume of the same directory: a second NFS client and daemon in this guest,
    // as another pod's guest would be. Each sees the other's writes.
    mount(&a, shared_volume("shr2", &server, "shr", KEY)).await?;
    assert_eq!(daemons(g).await?, 2);
    assert_eq!(
        g.ok("cd /run/cnfs/volumes/shr2 && sha256sum secret-dir-name/canary.txt blob")
            .await?,
        sums,
        "the second client reads what the first wrote"
    );
    g.ok("echo from-the-second-client > /run/cnfs/volumes/shr2/second.txt && sync")
        .await?;
    let seen = g
        .ok("for i in $(seq 1 50); do cat /run/cnfs/volumes/shr/second.txt 2>/dev/null && break; sleep 0.2; done")
        .await?;
    assert_eq!(seen.trim(), "from-the-second-client");
    unmount(&a, "shr2").await?;

    // The host's stock gocryptfs opens the tree with the key while the guest has it mounted
    // (the recovery procedure, and a second client on another kernel): it reads what the
    // guest wrote, and the guest reads what it writes.
    let host_plain = dir.path().join("host-plain");
    std::fs::create_dir_all(&host_plain)?;
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, KEY)?;
    let status = std::process::Command::new("gocryptfs")
        .args(["-q", "-sharedstorage", "-passfile"])
        .arg(&key_file)
        .arg(&tree)
        .arg(&host_plain)
        .status()?;
    anyhow::ensure!(status.success(), "host gocryptfs: {status}");
    let host_sums = std::process::Command::new("sha256sum")
        .args(["secret-dir-name/canary.txt", "blob"])
        .current_dir(&host_plain)
        .output();
    std::fs::write(host_plain.join("from-host.txt"), b"written on the host\n")?;
    let _ = std::process::Command::new("umount")
        .arg(&host_plain)
        .status();
    assert_eq!(
        String::from_utf8_lossy(&host_sums?.stdout),
        sums,
        "the host reads the guest's data"
    );
    let seen = g
        .ok("for i in $(seq 1 50); do cat /run/cnfs/volumes/shr/from-host.txt 2>/dev/null && break; sleep 0.2; done")
        .await?;
    assert_eq!(seen, "written on the host\n");

    // Two first uses of one absent tree at once (two pods starting together): one tree is
    // published, the loser uses it and removes its own temp, both see each other's writes.
    std::fs::create_dir_all(export.join("race"))?;
    let (a1, a2) = (vm.agent().await?, vm.agent().await?);
    let (s1, s2) = (server.clone(), server.clone());
    let first =
        tokio::spawn(async move { mount(&a1, shared_volume("race1", &s1, "race", KEY)).await });
    let second =
        tokio::spawn(async move { mount(&a2, shared_volume("race2", &s2, "race", KEY)).await });
    first.await??;
    second.await??;
    let top: Vec<String> = std::fs::read_dir(export.join("race"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        top,
        vec!["cnfs-volume.gocryptfs".to_string()],
        "one tree, no temp"
    );
    g.ok("echo one > /run/cnfs/volumes/race1/a && echo two > /run/cnfs/volumes/race2/b && sync")
        .await?;
    let seen = g
        .ok("for i in $(seq 1 50); do cat /run/cnfs/volumes/race2/a /run/cnfs/volumes/race1/b 2>/dev/null && break; sleep 0.2; done")
        .await?;
    assert_eq!(seen, "one\ntwo\n");
    for n in ["race1", "race2"] {
        unmount(&a, n).await?;
    }

    // The same Mount again is idempotent; with another key it is refused.
    assert!(
        mount(&a, shared_volume("shr", &server, "shr", KEY))
            .await?
            .already_mounted
    );
    let e = mount(&a, shared_volume("shr", &server, "shr", b"another key"))
        .await
        .expect_err("mounted with another key");
    assert_eq!(code_of(&e), Code::PERMISSION_DENIED, "{e:?}");

    // A key gocryptfs could not read as one line is refused before anything is mounted.
    let e = mount(&a, shared_volume("nl", &server, "shr", b"two\nlines"))
        .await
        .expect_err("newline in the key");
    assert_eq!(code_of(&e), Code::INVALID_ARGUMENT, "{e:?}");
    assert!(message_of(&e).contains("volume.encryption.key"), "{e:?}");
    assert!(
        !message_of(&e).contains("lines"),
        "the key is echoed: {e:?}"
    );

    // Unmount takes down the bind, the FUSE mount (the daemon ends) and the share;
    // reopening reads the same data.
    let u = unmount(&a, "shr").await?;
    assert_eq!(u.method, "umount", "{u:?}");
    assert!(
        u.attempts.is_empty(),
        "a plain unmount had difficulties: {u:?}"
    );
    nothing_left(g).await?;
    mount(&a, shared_volume("shr", &server, "shr", KEY)).await?;
    assert_eq!(
        g.ok("cd /run/cnfs/volumes/shr && sha256sum secret-dir-name/canary.txt blob")
            .await?,
        sums
    );

    // The agent is killed and restarted under the mounted volume: the daemon serves on,
    // the restarted agent knows the volume, and its Unmount ends the daemon.
    g.ok("kill -9 $(pidof cnfs-agent); sleep 0.5; /usr/bin/cnfs-agent </dev/null >/dev/console 2>&1 &")
        .await?;
    vm.wait_for_agent(Duration::from_secs(60)).await?;
    let a = vm.agent().await?;
    assert_eq!(daemons(g).await?, 1, "the daemon died with the agent");
    assert_eq!(
        g.ok("cd /run/cnfs/volumes/shr && sha256sum secret-dir-name/canary.txt blob")
            .await?,
        sums
    );
    let again = mount(&a, shared_volume("shr", &server, "shr", KEY)).await?;
    assert!(again.already_mounted, "the restarted agent knows it");
    unmount(&a, "shr").await?;
    nothing_left(g).await?;

    // A wrong key: PERMISSION_DENIED, the tree unchanged, nothing left.
    let before = tree_state(&tree)?;
    let e = mount(&a, shared_volume("shr", &server, "shr", b"not the key"))
        .await
        .expect_err("wrong key");
    assert_eq!(code_of(&e), Code::PERMISSION_DENIED, "{e:?}");
    assert!(message_of(&e).contains("the key does not open it"), "{e:?}");
    assert_eq!(tree_state(&tree)?, before, "a wrong key changed the tree");
    nothing_left(g).await?;

    // An existing directory without configuration in the tree's place: refused, untouched.
    std::fs::create_dir_all(export.join("noconf/cnfs-volume.gocryptfs"))?;
    std::fs::write(
        export.join("noconf/cnfs-volume.gocryptfs/data"),
        b"not gocryptfs",
    )?;
    let noconf = tree_state(&export.join("noconf"))?;
    let e = mount(&a, shared_volume("noconf", &server, "noconf", KEY))
        .await
        .expect_err("no gocryptfs.conf");
    assert_eq!(code_of(&e), Code::FAILED_PRECONDITION, "{e:?}");
    assert!(message_of(&e).contains("never initialises"), "{e:?}");
    assert_eq!(tree_state(&export.join("noconf"))?, noconf);
    nothing_left(g).await?;

    // A damaged configuration: FAILED_PRECONDITION naming it, never re-initialised.
    let damaged = export.join("damaged/cnfs-volume.gocryptfs");
    std::fs::create_dir_all(&damaged)?;
    for f in ["gocryptfs.conf", "gocryptfs.diriv"] {
        std::fs::copy(tree.join(f), damaged.join(f))?;
    }
    std::fs::write(damaged.join("gocryptfs.conf"), b"{ this is not json")?;
    let damaged_state = tree_state(&damaged)?;
    let e = mount(&a, shared_volume("damaged", &server, "damaged", KEY))
        .await
        .expect_err("damaged configuration");
    assert_eq!(code_of(&e), Code::FAILED_PRECONDITION, "{e:?}");
    assert!(message_of(&e).contains("gocryptfs.conf"), "{e:?}");
    assert_eq!(tree_state(&damaged)?, damaged_state);
    nothing_left(g).await?;

    // A daemon that dies: Stats says the volume is not healthy (accesses fail at once, no
    // hang), and Unmount still takes everything down.
    mount(&a, shared_volume("shr", &server, "shr", KEY)).await?;
    g.ok("for p in $(grep -ls 'gocryptf[s]' /proc/[0-9]*/cmdline | cut -d/ -f3); do kill -9 $p; done")
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let st = a
        .stats(
            ctx(T),
            &agent::StatsRequest {
                name: "shr".into(),
                timeout_ms: 10_000,
                ..Default::default()
            },
        )
        .await?;
    assert_eq!(
        st.health.enum_value(),
        Ok(agent::Health::ERROR),
        "a dead daemon: {st:?}"
    );
    let ls = g
        .run("ls /run/cnfs/volumes/shr", Duration::from_secs(20))
        .await?;
    assert!(
        ls.code != 0 && ls.stderr.contains("not connected"),
        "accesses fail at once: {ls:?}"
    );
    unmount(&a, "shr").await?;
    nothing_left(g).await?;

    // No key byte in what the guest logged (console), recorded (state files) or mounted.
    let key_text = String::from_utf8_lossy(KEY).into_owned();
    let records = g
        .ok("cat /run/cnfs/state/* /proc/mounts /proc/self/mountinfo 2>/dev/null; true")
        .await?;
    for (what, text) in [("console", vm.console_text()), ("records", records)] {
        assert!(!text.contains(&key_text), "key in the guest's {what}");
        assert!(!text.contains("g0cryptfs key"), "key in the guest's {what}");
        assert!(!text.contains(&canary), "plaintext in the guest's {what}");
    }

    // The server dies under a mounted volume with a write in flight: the daemon waits on the
    // share; Stats says UNRESPONSIVE, Unmount is bounded and, once the share is shut down,
    // nothing is left (no mount, no daemon).
    mount(&a, shared_volume("shr", &server, "shr", KEY)).await?;
    let mut ganesha = ganesha;
    ganesha.kill();
    g.ok("(head -c 8000000 /dev/urandom > /run/cnfs/volumes/shr/late; sync) >/dev/null 2>&1 &")
        .await?;
    let dead = a
        .stats(
            ctx(T),
            &agent::StatsRequest {
                name: "shr".into(),
                timeout_ms: 1500,
                ..Default::default()
            },
        )
        .await?;
    assert_eq!(
        dead.health.enum_value(),
        Ok(agent::Health::UNRESPONSIVE),
        "{dead:?}"
    );
    let started = std::time::Instant::now();
    let u = cnfs_testbed::unmount_within(&a, "shr", 20_000).await?;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(40),
        "Unmount took {took:?}: {u:?}"
    );
    assert!(
        u.attempts.iter().any(|s| s.contains("shut down")),
        "the dead share was not given up: {u:?}"
    );
    nothing_left(g).await?;
    Ok(())
}
