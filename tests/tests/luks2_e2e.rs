//! End to end: an encrypted (`luks2`) volume on NFSv4.1 from nfs-ganesha, in one real guest.
//! The guest's agent mounts the export at /run/cnfs/backing/<name>, formats a new
//! `cnfs-volume.luks2` there (Debian's cryptsetup and mke2fs from the image's tool prefix,
//! run by the agent's tool runner), opens it through a loop device and dm-crypt and mounts
//! the ext4 inside. Checked from the host: the file is stock LUKS2 (host `cryptsetup
//! isLuks`/`luksDump`), no plaintext canary and no key byte anywhere on the server or in what
//! the guest logs and records; then the lifecycle: unmount and reopen, agent kill -9 and
//! restart, a wrong key, a plain file in the container's place, a second opener while the
//! first holds it, both header copies damaged, and nothing left behind after each fault.

use std::path::Path;
use std::time::Duration;

use cnfs_protocols::agent;
use cnfs_protocols::agent_ttrpc::AgentClient;
use cnfs_testbed::ganesha::{Ganesha, EXPORT};
use cnfs_testbed::process::files_containing;
use cnfs_testbed::vm::ctx;
use cnfs_testbed::{code_of, message_of, mount_request, nfs_volume, GuestExec, NetNs, TempDir, Vm};
use ttrpc::Code;

const T: Duration = Duration::from_secs(240);
/// First use runs two argon2 passes and mkfs, reopening one more: generous under TCG.
const MOUNT_MS: u32 = 180_000;
const KEY: &[u8] = b"k3y-\x00\x01\xfe binary key bytes\n";
const SIZE: u64 = 128 << 20;

fn luks2_volume(name: &str, server: &str, dir: &str, key: &[u8]) -> agent::VolumeSpec {
    let mut spec = nfs_volume(name, server, &format!("{EXPORT}/{dir}"), "4.1");
    spec.encryption = protobuf::MessageField::some(agent::Encryption {
        mode: "luks2".into(),
        key: key.to_vec(),
        size_bytes: SIZE,
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

async fn stats(
    a: &AgentClient,
    name: &str,
    timeout_ms: u32,
) -> anyhow::Result<agent::StatsResponse> {
    Ok(a.stats(
        ctx(T),
        &agent::StatsRequest {
            name: name.into(),
            timeout_ms,
            ..Default::default()
        },
    )
    .await?)
}

/// Nothing of an encrypted volume is left in the guest: no dm device, no bound loop, no
/// backing mount, no volume mount.
async fn nothing_left(g: &GuestExec) -> anyhow::Result<()> {
    let dm = g.ok("ls /sys/block | grep '^dm-' || true").await?;
    let loops = g
        .ok("for l in /sys/block/loop*/loop/backing_file; do [ -e \"$l\" ] && cat \"$l\"; done; true")
        .await?;
    let mounts = g
        .ok("grep -E 'cnfs/(backing|volumes)' /proc/mounts || true")
        .await?;
    anyhow::ensure!(
        dm.trim().is_empty() && loops.trim().is_empty() && mounts.trim().is_empty(),
        "left behind: dm={dm:?} loops={loops:?} mounts={mounts:?}"
    );
    Ok(())
}

/// [`nothing_left`], waited for: deferred removals finish a moment after their last user.
async fn nothing_left_within(g: &GuestExec, within: Duration) -> anyhow::Result<()> {
    let until = std::time::Instant::now() + within;
    loop {
        let left = nothing_left(g).await;
        if left.is_ok() || std::time::Instant::now() > until {
            return left;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The names in a server directory, as the host sees them.
fn names_in(dir: &Path) -> anyhow::Result<Vec<String>> {
    Ok(std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect())
}

fn sha256(p: &Path) -> anyhow::Result<String> {
    let out = std::process::Command::new("sha256sum").arg(p).output()?;
    anyhow::ensure!(out.status.success(), "sha256sum {}", p.display());
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

fn host_cryptsetup(args: &[&str]) -> anyhow::Result<(bool, String)> {
    let out = std::process::Command::new("cryptsetup")
        .args(args)
        .output()?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_volume_keeps_its_data_and_its_secrets() -> anyhow::Result<()> {
    let art = cnfs_testbed::Artifacts::locate()?;
    let dir = TempDir::new("luks2")?;
    let ns = NetNs::create()?;
    let ganesha = Ganesha::start(&ns, dir.path())?;
    let export = ganesha.export_dir.clone();
    for d in ["sec", "plain", "damaged"] {
        std::fs::create_dir_all(export.join(d))?;
    }
    let vm = Vm::boot(&art, &ns, dir.path()).await?;
    let g = &vm.exec;
    let a = vm.agent().await?;
    let server = ganesha.server_ip.clone();

    let ping = a.ping(ctx(T), &agent::PingRequest::new()).await?;
    assert_eq!(
        ping.encryption_modes,
        vec!["luks2".to_string(), "gocryptfs".to_string()],
        "{ping:?}"
    );

    // First use formats. The volume is ext4 on dm-crypt, its root owned as asked.
    let first = mount(&a, luks2_volume("sec", &server, "sec", KEY)).await?;
    assert!(!first.already_mounted);
    let mounts = g.ok("cat /proc/mounts").await?;
    assert!(
        mounts.contains("/run/cnfs/volumes/sec ext4 "),
        "not ext4 at the volume: {mounts}"
    );
    assert!(mounts.contains("/run/cnfs/backing/sec nfs4 "), "{mounts}");
    assert_eq!(
        g.ok("stat -c %u:%g /run/cnfs/volumes/sec").await?.trim(),
        "1000:1000"
    );
    let canary = format!("CNFS-PLAINTEXT-CANARY-{}", std::process::id());
    g.ok(&format!(
        "for i in 1 2 3 4 5 6 7 8; do echo {canary} >> /run/cnfs/volumes/sec/canary.txt; done; \
         head -c 3000000 /dev/urandom > /run/cnfs/volumes/sec/blob && sync"
    ))
    .await?;
    let sums = g
        .ok("cd /run/cnfs/volumes/sec && sha256sum canary.txt blob")
        .await?;

    // The host sees one stock LUKS2 file and no plaintext or key bytes anywhere.
    let container = export.join("sec/cnfs-volume.luks2");
    let listing = names_in(&export.join("sec"))?;
    assert_eq!(
        listing,
        vec!["cnfs-volume.luks2".to_string()],
        "no temp left"
    );
    assert_eq!(std::fs::metadata(&container)?.len(), SIZE);
    let (is_luks, out) = host_cryptsetup(&[
        "isLuks",
        "--type",
        "luks2",
        &container.display().to_string(),
    ])?;
    assert!(is_luks, "host cryptsetup isLuks: {out}");
    let (_, dump) = host_cryptsetup(&["luksDump", &container.display().to_string()])?;
    for want in ["argon2id", "aes-xts-plain64", "4096 [bytes]", "cnfs-sec"] {
        assert!(dump.contains(want), "luksDump lacks {want:?}:\n{dump}");
    }
    assert!(
        files_containing(&export, canary.as_bytes())?.is_empty(),
        "plaintext on the server"
    );
    assert!(
        files_containing(&export, KEY)?.is_empty(),
        "key on the server"
    );

    // List and the agent's records never hold the key.
    let list = a.list(ctx(T), &agent::ListRequest::new()).await?;
    let listed = list
        .volumes
        .iter()
        .find(|v| v.volume.name == "sec")
        .expect("listed");
    assert!(
        listed.volume.encryption.key.is_empty() && listed.volume.encryption.mode == "luks2",
        "{listed:?}"
    );

    // The same Mount again is idempotent, with another key it is refused.
    assert!(
        mount(&a, luks2_volume("sec", &server, "sec", KEY))
            .await?
            .already_mounted
    );
    let e = mount(&a, luks2_volume("sec", &server, "sec", b"another key"))
        .await
        .expect_err("mounted with another key");
    assert_eq!(code_of(&e), Code::PERMISSION_DENIED, "{e:?}");
    assert!(message_of(&e).contains("mounted with another key"), "{e:?}");

    // A second opener of the same container while "sec" holds it: refused, nothing built.
    let e = mount(&a, luks2_volume("sec2", &server, "sec", KEY))
        .await
        .expect_err("the container is held");
    assert_eq!(code_of(&e), Code::FAILED_PRECONDITION, "{e:?}");
    assert!(message_of(&e).contains("in use by another client"), "{e:?}");
    assert!(!g
        .ok("cat /proc/mounts")
        .await?
        .contains("cnfs/backing/sec2"));

    // Unmount takes down ext4, dm-crypt, loop and the share; reopening reads the same data.
    let u = unmount(&a, "sec").await?;
    assert_eq!(u.method, "umount", "{u:?}");
    nothing_left(g).await?;
    mount(&a, luks2_volume("sec", &server, "sec", KEY)).await?;
    assert_eq!(
        g.ok("cd /run/cnfs/volumes/sec && sha256sum canary.txt blob")
            .await?,
        sums
    );

    // The agent is killed and restarted under the mounted volume: the volume stays, reads,
    // and Unmount takes the stack down from the kernel's state.
    g.ok("kill -9 $(pidof cnfs-agent); sleep 0.5; /usr/bin/cnfs-agent </dev/null >/dev/console 2>&1 &")
        .await?;
    vm.wait_for_agent(Duration::from_secs(60)).await?;
    let a = vm.agent().await?;
    assert_eq!(
        g.ok("cd /run/cnfs/volumes/sec && sha256sum canary.txt blob")
            .await?,
        sums
    );
    let again = mount(&a, luks2_volume("sec", &server, "sec", KEY)).await?;
    assert!(again.already_mounted, "the restarted agent knows it");
    unmount(&a, "sec").await?;
    nothing_left(g).await?;

    // A wrong key: PERMISSION_DENIED, the container byte for byte unchanged, nothing left.
    let before = sha256(&container)?;
    let e = mount(&a, luks2_volume("sec", &server, "sec", b"not the key"))
        .await
        .expect_err("wrong key");
    assert_eq!(code_of(&e), Code::PERMISSION_DENIED, "{e:?}");
    assert!(message_of(&e).contains("the key does not open it"), "{e:?}");
    assert_eq!(
        sha256(&container)?,
        before,
        "a wrong key changed the container"
    );
    nothing_left(g).await?;

    // A plain file in the container's place is refused and never formatted.
    let plain = export.join("plain/cnfs-volume.luks2");
    std::fs::write(&plain, vec![0x42u8; 1 << 20])?;
    let plain_sum = sha256(&plain)?;
    let e = mount(&a, luks2_volume("plain", &server, "plain", KEY))
        .await
        .expect_err("not LUKS2");
    assert_eq!(code_of(&e), Code::FAILED_PRECONDITION, "{e:?}");
    assert!(message_of(&e).contains("never formats"), "{e:?}");
    assert_eq!(sha256(&plain)?, plain_sum);
    nothing_left(g).await?;

    // Both header copies damaged but their magic intact: FAILED_PRECONDITION naming the file.
    let damaged = export.join("damaged/cnfs-volume.luks2");
    std::fs::copy(&container, &damaged)?;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&damaged)?;
        // The JSON areas after each 4 KiB binary header: their checksums no longer match.
        f.write_all_at(&[0x7bu8; 512], 0x1000)?;
        f.write_all_at(&[0x7bu8; 512], 0x5000)?;
    }
    let damaged_sum = sha256(&damaged)?;
    let e = mount(&a, luks2_volume("damaged", &server, "damaged", KEY))
        .await
        .expect_err("damaged headers");
    assert_eq!(code_of(&e), Code::FAILED_PRECONDITION, "{e:?}");
    assert!(
        message_of(&e).contains("cryptsetup cannot open it"),
        "{e:?}"
    );
    assert!(message_of(&e).contains("luksHeaderRestore"), "{e:?}");
    assert!(message_of(&e).contains("cnfs-volume.luks2"), "{e:?}");
    assert_eq!(
        sha256(&damaged)?,
        damaged_sum,
        "never repaired or formatted"
    );
    nothing_left(g).await?;

    // The right key still opens the original.
    mount(&a, luks2_volume("sec", &server, "sec", KEY)).await?;
    assert_eq!(
        g.ok("cd /run/cnfs/volumes/sec && sha256sum canary.txt blob")
            .await?,
        sums
    );
    unmount(&a, "sec").await?;
    nothing_left(g).await?;

    // A larger size at a later mount grows the container, the mapping and the ext4 (online,
    // before the Mount answers), data intact; a smaller one never shrinks it.
    std::fs::create_dir_all(export.join("grow"))?;
    let sized = |size: u64| {
        let mut v = luks2_volume("grow", &server, "grow", KEY);
        if let Some(e) = v.encryption.as_mut() {
            e.size_bytes = size;
        }
        v
    };
    let fs_bytes = |out: String| -> u64 {
        let mut f = out
            .split_whitespace()
            .map(|n| n.parse::<u64>().unwrap_or(0));
        f.next().unwrap_or(0) * f.next().unwrap_or(0)
    };
    mount(&a, sized(SIZE)).await?;
    let grow_sum = g
        .ok("head -c 2000000 /dev/urandom > /run/cnfs/volumes/grow/d && sync && sha256sum /run/cnfs/volumes/grow/d")
        .await?;
    let small = fs_bytes(g.ok("stat -f -c '%b %S' /run/cnfs/volumes/grow").await?);
    unmount(&a, "grow").await?;
    mount(&a, sized(2 * SIZE)).await?;
    let container = export.join("grow/cnfs-volume.luks2");
    assert_eq!(std::fs::metadata(&container)?.len(), 2 * SIZE);
    let big = fs_bytes(g.ok("stat -f -c '%b %S' /run/cnfs/volumes/grow").await?);
    assert!(
        big > small + SIZE * 3 / 4 && big <= 2 * SIZE,
        "ext4 did not grow into the container: {small} -> {big}"
    );
    assert_eq!(g.ok("sha256sum /run/cnfs/volumes/grow/d").await?, grow_sum);
    unmount(&a, "grow").await?;
    mount(&a, sized(SIZE)).await?;
    assert_eq!(
        std::fs::metadata(&container)?.len(),
        2 * SIZE,
        "a smaller size shrank the container"
    );
    assert_eq!(g.ok("sha256sum /run/cnfs/volumes/grow/d").await?, grow_sum);
    unmount(&a, "grow").await?;
    // A size recorded beside the container (as CSI expansion records it) wins over a smaller
    // `size`; names that are not a well-formed size (out of range, not whole 4 KiB sectors)
    // are ignored. Made through the server (as the CSI controller makes them), by a plain
    // volume of the same directory: behind ganesha's back its directory cache would not see
    // them for a while.
    let recorded = 3 * SIZE;
    mount(
        &a,
        nfs_volume("growdir", &server, &format!("{EXPORT}/grow"), "4.1"),
    )
    .await?;
    for marker in [
        cnfs_protocols::spec::encryption::size_marker(recorded),
        "cnfs-volume.size.70368744177664000".to_string(),
        format!("cnfs-volume.size.{}", 4 * SIZE + 1),
    ] {
        g.ok(&format!("mkdir /run/cnfs/volumes/growdir/{marker}"))
            .await?;
    }
    unmount(&a, "growdir").await?;
    mount(&a, sized(SIZE)).await?;
    assert_eq!(
        std::fs::metadata(&container)?.len(),
        recorded,
        "the recorded size was not taken (or a malformed marker was)"
    );
    let recorded_fs = fs_bytes(g.ok("stat -f -c '%b %S' /run/cnfs/volumes/grow").await?);
    assert!(
        recorded_fs > big + SIZE * 3 / 4 && recorded_fs <= recorded,
        "ext4 did not grow to the recorded size: {big} -> {recorded_fs}"
    );
    assert_eq!(g.ok("sha256sum /run/cnfs/volumes/grow/d").await?, grow_sum);
    unmount(&a, "grow").await?;
    nothing_left(g).await?;

    // The agent is killed while cryptsetup formats a new container: the runner and the tool
    // die with it, nothing is published, and the next Mount (after a restart) formats afresh
    // and clears the half-built stack first.
    std::fs::create_dir_all(export.join("crash"))?;
    let a2 = vm.agent().await?;
    let server2 = server.clone();
    let pending =
        tokio::spawn(
            async move { mount(&a2, luks2_volume("crash", &server2, "crash", KEY)).await },
        );
    g.ok("for i in $(seq 1 400); do grep -qs 'luks[F]ormat' /proc/[0-9]*/cmdline && break; \
          sleep 0.1; done; grep -qs 'luks[F]ormat' /proc/[0-9]*/cmdline && kill -9 $(pidof cnfs-agent)")
        .await?;
    let killed = pending.await?;
    assert!(
        killed.is_err(),
        "the mount cannot have finished: {killed:?}"
    );
    assert_eq!(
        g.ok("sleep 1; grep -ls -e 'luks[F]ormat' -e 'cnfs-tool-[r]unner' /proc/[0-9]*/cmdline || true")
            .await?
            .trim(),
        "",
        "the runner and its tool outlived the agent"
    );
    assert!(
        !export.join("crash/cnfs-volume.luks2").exists(),
        "a half-formatted container was published"
    );
    g.ok("/usr/bin/cnfs-agent </dev/null >/dev/console 2>&1 &")
        .await?;
    vm.wait_for_agent(Duration::from_secs(60)).await?;
    let a = vm.agent().await?;
    // The restarted agent clears the half-built stack (dm-crypt, loop, share) by itself.
    let left = nothing_left_within(g, Duration::from_secs(30)).await;
    left?;
    let temps = std::fs::read_dir(export.join("crash"))?.count();
    assert_eq!(temps, 1, "the killed format left its temporary container");
    mount(&a, luks2_volume("crash", &server, "crash", KEY)).await?;
    let listing = names_in(&export.join("crash"))?;
    assert_eq!(
        listing,
        vec!["cnfs-volume.luks2".to_string()],
        "the abandoned temporary container is removed once the published one is open"
    );
    g.ok("echo after-crash > /run/cnfs/volumes/crash/f && sync")
        .await?;
    unmount(&a, "crash").await?;
    nothing_left(g).await?;
    let (is_luks, out) = host_cryptsetup(&[
        "isLuks",
        &export.join("crash/cnfs-volume.luks2").display().to_string(),
    ])?;
    assert!(is_luks, "{out}");

    // No key byte in what the guest logged (console), recorded (state files) or mounted.
    let key_text = String::from_utf8_lossy(KEY).into_owned();
    let records = g
        .ok("cat /run/cnfs/state/* /proc/mounts /proc/self/mountinfo 2>/dev/null; true")
        .await?;
    for (what, text) in [("console", vm.console_text()), ("records", records)] {
        assert!(!text.contains(&key_text), "key in the guest's {what}");
        assert!(
            !text.contains("binary key bytes"),
            "key in the guest's {what}"
        );
    }

    // A process in the guest keeps the volume busy while its server is alive: Unmount
    // detaches it, and neither shuts the share down nor forces it: the process keeps reading
    // and writing its data, and the stack goes once it lets go.
    mount(&a, luks2_volume("sec", &server, "sec", KEY)).await?;
    let holder = g
        .ok("(cd /run/cnfs/volumes/sec && exec sleep 600) >/dev/null 2>&1 & echo $!")
        .await?
        .trim()
        .to_string();
    let u = unmount(&a, "sec").await?;
    assert_eq!(u.method, "detach", "{u:?}");
    assert!(
        u.attempts
            .iter()
            .any(|s| s.contains("server answers; not shut down")),
        "{u:?}"
    );
    assert!(
        !u.attempts
            .iter()
            .any(|s| s.starts_with("backing force") || s.contains("client shut down")),
        "{u:?}"
    );
    assert!(u.attempts.iter().any(|s| s == "backing: detach"), "{u:?}");
    assert_eq!(
        g.ok(&format!(
            "cat /proc/{holder}/cwd/canary.txt | head -1; echo later > /proc/{holder}/cwd/late.txt && sync && cat /proc/{holder}/cwd/late.txt"
        ))
        .await?,
        format!("{canary}\nlater\n")
    );
    g.ok(&format!("kill {holder}")).await?;
    let left = nothing_left_within(g, Duration::from_secs(30)).await;
    left.map_err(|e| anyhow::anyhow!("{e}; once the holder ended, after {u:?}"))?;
    mount(&a, luks2_volume("sec", &server, "sec", KEY)).await?;
    assert_eq!(g.ok("cat /run/cnfs/volumes/sec/late.txt").await?, "later\n");

    // The server dies under a mounted volume with writes in flight: Unmount is bounded and,
    // once the share is forced, nothing of the stack is left.
    let healthy = stats(&a, "sec", 5000).await?;
    assert_eq!(
        healthy.health.enum_value(),
        Ok(agent::Health::HEALTHY),
        "{healthy:?}"
    );
    assert!(
        healthy.total_bytes > 100 << 20 && healthy.total_bytes <= SIZE,
        "the figures are the volume's, not the share's: {healthy:?}"
    );
    let mut ganesha = ganesha;
    ganesha.kill();
    g.ok("(head -c 8000000 /dev/urandom > /run/cnfs/volumes/sec/late; sync) >/dev/null 2>&1 &")
        .await?;
    // ext4 answers statfs from memory; the health is the share's.
    let dead = stats(&a, "sec", 1500).await?;
    assert_eq!(
        dead.health.enum_value(),
        Ok(agent::Health::UNRESPONSIVE),
        "{dead:?}"
    );
    let started = std::time::Instant::now();
    let u = a
        .unmount(
            ctx(T),
            &agent::UnmountRequest {
                name: "sec".into(),
                timeout_ms: 20_000,
                ..Default::default()
            },
        )
        .await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(40),
        "Unmount took {took:?}: {u:?}"
    );
    let u = u?;
    assert_ne!(u.method, "none", "{u:?}");
    let left = nothing_left_within(g, Duration::from_secs(30)).await;
    left.map_err(|e| anyhow::anyhow!("{e}; unmount said {u:?}"))?;
    Ok(())
}

/// A guest holding an encrypted volume is killed (QEMU SIGKILL, no unmount): another guest
/// (another sandbox, so another NFSv4 client to the server) is refused while the dead one's
/// lease runs and opens the volume once the server has expired it, with everything written
/// and synced before the crash intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_holder_frees_the_volume_for_another_guest_after_its_lease() -> anyhow::Result<()>
{
    let art = cnfs_testbed::Artifacts::locate()?;
    let dir = TempDir::new("luks2-crash")?;
    let ns = NetNs::create()?;
    let ganesha = Ganesha::start(&ns, dir.path())?;
    std::fs::create_dir_all(ganesha.export_dir.join("v"))?;
    let server = ganesha.server_ip.clone();
    let request = |sandbox: &str| {
        let mut r = mount_request(luks2_volume("v", &server, "v", KEY), MOUNT_MS);
        r.sandbox_id = sandbox.into();
        r
    };

    let mut first = Vm::boot(&art, &ns, &dir.path().join("first")).await?;
    let a = first.agent().await?;
    a.mount(ctx(T), &request("sandbox-first")).await?;
    let g = &first.exec;
    g.ok("head -c 2000000 /dev/urandom > /run/cnfs/volumes/v/blob && echo kept > /run/cnfs/volumes/v/note && sync")
        .await?;
    let sums = g
        .ok("cd /run/cnfs/volumes/v && sha256sum blob note")
        .await?;
    first.kill();
    let killed = std::time::Instant::now();

    let second = Vm::boot(&art, &ns, &dir.path().join("second")).await?;
    let b = second.agent().await?;
    let mut refused = 0;
    let opened = loop {
        match b.mount(ctx(T), &request("sandbox-second")).await {
            Ok(_) => break killed.elapsed(),
            Err(e) => {
                assert_eq!(code_of(&e), Code::FAILED_PRECONDITION, "{e:?}");
                assert!(message_of(&e).contains("in use by another client"), "{e:?}");
                refused += 1;
                assert!(
                    killed.elapsed() < Duration::from_secs(120),
                    "still locked {:?} after the holder died (lease 15 s)",
                    killed.elapsed()
                );
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    };
    eprintln!("opened {opened:?} after the holder was killed, refused {refused} time(s) before");
    assert_eq!(
        second
            .exec
            .ok("cd /run/cnfs/volumes/v && sha256sum blob note")
            .await?,
        sums,
        "data synced before the crash"
    );
    unmount(&b, "v").await?;
    nothing_left(&second.exec).await?;
    drop(ganesha);
    Ok(())
}
