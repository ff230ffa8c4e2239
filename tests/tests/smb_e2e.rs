//! End to end: cnfs-agent mounts SMB shares of a real Samba server (tests/src/samba.rs, in
//! the test's namespace) with the guest kernel's cifs client: SMB 3.1.1 sealed by default,
//! data both ways checked by MD5, the password nowhere the guest or host shows it, each
//! failure read as its cause, faults bounded, a restarted agent keeping the volume.

use std::time::{Duration, Instant};

use cnfs_protocols::agent;
use cnfs_testbed::process::md5_hex;
use cnfs_testbed::samba::{Samba, SambaSetup, Share};
use cnfs_testbed::vm::ctx;
use cnfs_testbed::{code_of, message_of, Artifacts, NetNs, TempDir, Vm};
use ttrpc::Code;

const T: Duration = Duration::from_secs(90);
const ALICE: &str = "cnfssmbalice";
/// A comma (the kernel's option separator, escaped by the agent), '=' and a space.
const ALICE_PW: &str = "al,ice=pw 1";
const BOB: &str = "cnfssmbbob";
const BOB_PW: &str = "bob-pw-2";

struct Bed {
    // Drop order: the VM first, then the server, then the namespace.
    vm: Vm,
    smb: Samba,
    _ns: NetNs,
    _dir: TempDir,
}

async fn start(tag: &str) -> anyhow::Result<Bed> {
    let art = Artifacts::locate()?;
    let dir = TempDir::new(tag)?;
    let ns = NetNs::create()?;
    let setup = SambaSetup::new()
        .user(ALICE, ALICE_PW)
        .user(BOB, BOB_PW)
        .share(Share::new("data"))
        .share(Share::new("sealed").option("smb encrypt", "required"));
    let smb = Samba::start(&ns, dir.path(), &setup)?;
    let vm = Vm::boot(&art, &ns, dir.path()).await?;
    Ok(Bed {
        vm,
        smb,
        _ns: ns,
        _dir: dir,
    })
}

/// A Mount request; `creds` is (user name, password).
fn request(
    name: &str,
    server: &str,
    share: &str,
    path: &str,
    creds: (&str, &str),
    options: &[(&str, &str)],
    timeout_ms: u32,
) -> agent::MountRequest {
    let (user, password) = creds;
    let mut spec = agent::VolumeSpec {
        name: name.into(),
        ..Default::default()
    };
    spec.set_smb(agent::SmbSource {
        server: server.into(),
        share: share.into(),
        path: path.into(),
        username: user.into(),
        password: password.into(),
        ..Default::default()
    });
    for (k, v) in options {
        spec.options.insert(k.to_string(), v.to_string());
    }
    cnfs_testbed::mount_request(spec, timeout_ms)
}

async fn stats(
    agent: &cnfs_protocols::agent_ttrpc::AgentClient,
    name: &str,
) -> anyhow::Result<agent::StatsResponse> {
    Ok(agent
        .stats(
            ctx(T),
            &agent::StatsRequest {
                name: name.into(),
                ..Default::default()
            },
        )
        .await?)
}

/// Runs `write` (a shell command ending in `echo rc=$?`) in the guest every 250 ms until it
/// no longer succeeds, at most `tries` times: its last output.
async fn until_refused(
    g: &cnfs_testbed::GuestExec,
    write: &str,
    tries: u32,
) -> anyhow::Result<String> {
    let mut out = String::new();
    for _ in 0..tries {
        out = g.ok(write).await?;
        if !out.contains("rc=0") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(out)
}

/// The encryption the server reports for its tree connect to `share`.
fn server_encryption(smb: &Samba, share: &str) -> serde_json::Value {
    let status = smb.status_json().expect("smbstatus");
    status["tcons"]
        .as_object()
        .and_then(|t| t.values().find(|t| t["service"] == share))
        .map(|t| t["encryption"].clone())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smb_volumes_are_sealed_move_data_both_ways_and_hide_the_password() -> anyhow::Result<()> {
    let bed = start("smb-data").await?;
    let agent = bed.vm.agent().await?;
    let g = &bed.vm.exec;
    let ip = bed.smb.server_ip.clone();
    let share = bed.smb.share_dir("data").expect("share").to_path_buf();
    std::fs::create_dir_all(share.join("team/a"))?;
    std::os::unix::fs::chown(share.join("team"), bed.smb.uid_of(ALICE), None)?;
    std::os::unix::fs::chown(share.join("team/a"), bed.smb.uid_of(ALICE), None)?;

    // The root of the share and a directory in it, SMB 3.1.1 sealed by default.
    let r = agent
        .mount(
            ctx(T),
            &request("files", &ip, "data", "", (ALICE, ALICE_PW), &[], 60_000),
        )
        .await?;
    assert!(!r.already_mounted);
    agent
        .mount(
            ctx(T),
            &request(
                "team",
                &ip,
                "data",
                "/team/a",
                (ALICE, ALICE_PW),
                &[("uid", "1000")],
                60_000,
            ),
        )
        .await?;
    let enc = server_encryption(&bed.smb, "data");
    assert_eq!(
        enc["degree"], "full",
        "the server sees the share's traffic encrypted: {enc}"
    );
    let mounts = g.ok("cat /proc/mounts").await?;
    let line = mounts
        .lines()
        .find(|l| l.contains(" /run/cnfs/volumes/files "))
        .expect("mounted");
    assert!(
        line.starts_with(&format!("//{ip}/data /run/cnfs/volumes/files cifs ")),
        "{line}"
    );
    for want in [
        "vers=3.1.1",
        ",seal,",
        &format!("username={ALICE}"),
        "nosuid",
        "nodev",
    ] {
        assert!(line.contains(want), "{want} missing: {line}");
    }

    // Data both ways, by MD5 on each side.
    let guest_md5 = g
        .ok(
            "dd if=/dev/urandom of=/run/cnfs/volumes/files/g.bin bs=64k count=32 2>/dev/null && \
             sync && md5sum /run/cnfs/volumes/files/g.bin",
        )
        .await?;
    let host = std::fs::read(share.join("g.bin"))?;
    assert_eq!(host.len(), 2 << 20);
    assert!(guest_md5.starts_with(&md5_hex(&host)), "{guest_md5}");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(share.join("team/a/h.bin"), &data)?;
    let in_guest = g.ok("md5sum /run/cnfs/volumes/team/h.bin").await?;
    assert!(in_guest.starts_with(&md5_hex(&data)), "{in_guest}");
    assert!(
        !g.ok("ls /run/cnfs/volumes/team").await?.contains("g.bin"),
        "the subdirectory only"
    );

    // Stats: healthy, with figures.
    let st = stats(&agent, "files").await?;
    assert_eq!(
        st.health.enum_value_or_default(),
        agent::Health::HEALTHY,
        "{st:?}"
    );
    assert!(st.total_bytes > 0, "{st:?}");

    // The password: not in /proc/mounts, mountinfo, cifs' debug data, the agent's state,
    // its log, or List (which blanks the user name too).
    let list = agent.list(ctx(T), &agent::ListRequest::new()).await?;
    let listed = format!("{list:?}");
    let seen = g
        .ok("cat /proc/mounts /proc/self/mountinfo /proc/fs/cifs/DebugData /run/cnfs/state/* 2>/dev/null; true")
        .await?;
    for text in [&seen, &listed, &bed.vm.console_text()] {
        assert!(
            !text.contains(ALICE_PW) && !text.contains("al,,ice"),
            "password shown"
        );
    }
    assert!(
        listed.contains("share: \"data\"") && !listed.contains(ALICE),
        "{listed}"
    );

    // SMB 3.0 with noseal on a plain share: not encrypted; an encrypted share refuses 2.1.
    agent
        .mount(
            ctx(T),
            &request(
                "plain",
                &ip,
                "data",
                "",
                (BOB, BOB_PW),
                &[("vers", "3.0"), ("noseal", "")],
                60_000,
            ),
        )
        .await?;
    let line = g
        .ok("grep ' /run/cnfs/volumes/plain ' /proc/mounts")
        .await?;
    assert!(
        line.contains("vers=3.0") && !line.contains(",seal"),
        "{line}"
    );
    let e = agent
        .mount(
            ctx(T),
            &request(
                "old",
                &ip,
                "sealed",
                "",
                (BOB, BOB_PW),
                &[("vers", "2.1")],
                60_000,
            ),
        )
        .await
        .expect_err("2.1 on an encrypted share");
    assert_eq!(code_of(&e), Code::PERMISSION_DENIED, "{e:?}");

    // A shared encrypted (gocryptfs) volume on the share: the tree on the server, no
    // plaintext, the data read back after a remount.
    std::fs::create_dir_all(share.join("gc"))?;
    std::os::unix::fs::chown(share.join("gc"), bed.smb.uid_of(ALICE), None)?;
    let gc = |name: &str| {
        let mut r = request(name, &ip, "data", "/gc", (ALICE, ALICE_PW), &[], 120_000);
        r.volume.mut_or_insert_default().encryption =
            protobuf::MessageField::some(agent::Encryption {
                mode: "gocryptfs".into(),
                key: b"smb shared key".to_vec(),
                ..Default::default()
            });
        r
    };
    agent.mount(ctx(T), &gc("gc")).await?;
    let canary = "CNFS-SMB-GOCRYPTFS-CANARY";
    let sum = g
        .ok(&format!(
            "echo {canary} > /run/cnfs/volumes/gc/c.txt && sync && md5sum /run/cnfs/volumes/gc/c.txt"
        ))
        .await?;
    let tree = share.join("gc/cnfs-volume.gocryptfs");
    assert!(
        tree.join("gocryptfs.conf").is_file(),
        "no tree on the share"
    );
    assert!(
        cnfs_testbed::process::files_containing(&share, canary.as_bytes())?.is_empty(),
        "plaintext on the share"
    );
    agent
        .unmount(
            ctx(T),
            &agent::UnmountRequest {
                name: "gc".into(),
                ..Default::default()
            },
        )
        .await?;
    agent.mount(ctx(T), &gc("gc")).await?;
    assert_eq!(g.ok("md5sum /run/cnfs/volumes/gc/c.txt").await?, sum);

    for name in ["files", "team", "plain", "gc"] {
        agent
            .unmount(
                ctx(T),
                &agent::UnmountRequest {
                    name: name.into(),
                    ..Default::default()
                },
            )
            .await?;
    }
    assert!(!g.ok("cat /proc/mounts").await?.contains("cifs"));
    assert!(!g.ok("cat /proc/mounts").await?.contains("gocryptfs"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smb_failures_name_their_cause_faults_are_bounded_and_a_restart_keeps_the_volume(
) -> anyhow::Result<()> {
    let mut bed = start("smb-faults").await?;
    let agent = bed.vm.agent().await?;
    let g = &bed.vm.exec;
    let ip = bed.smb.server_ip.clone();
    let fail = |name: &'static str, e: ttrpc::Error, code: Code, text: &str| {
        assert_eq!(code_of(&e), code, "{name}: {e:?}");
        assert!(message_of(&e).contains(text), "{name}: {}", message_of(&e));
        assert!(
            !message_of(&e).contains(ALICE_PW),
            "{name}: password in the error"
        );
    };

    let e = agent
        .mount(
            ctx(T),
            &request("w", &ip, "data", "", (ALICE, "wrong"), &[], 60_000),
        )
        .await
        .expect_err("wrong password");
    fail(
        "wrong password",
        e,
        Code::PERMISSION_DENIED,
        "refused the credentials of user",
    );
    let e = agent
        .mount(
            ctx(T),
            &request("w", &ip, "nosuchshare", "", (ALICE, ALICE_PW), &[], 60_000),
        )
        .await
        .expect_err("unknown share");
    fail(
        "unknown share",
        e,
        Code::NOT_FOUND,
        "has no share nosuchshare",
    );
    let e = agent
        .mount(
            ctx(T),
            &request(
                "w",
                &ip,
                "data",
                "",
                (ALICE, ALICE_PW),
                &[("port", "4455")],
                60_000,
            ),
        )
        .await
        .expect_err("nothing listening");
    fail(
        "closed port",
        e,
        Code::UNAVAILABLE,
        "cannot reach the SMB server",
    );
    let e = agent
        .mount(
            ctx(T),
            &request(
                "w",
                &ip,
                "data",
                "",
                (ALICE, ALICE_PW),
                &[("vers", "1.0")],
                60_000,
            ),
        )
        .await
        .expect_err("SMB1");
    fail("SMB1", e, Code::INVALID_ARGUMENT, "volume.options.vers");
    assert!(
        !g.ok("cat /proc/mounts").await?.contains("cifs"),
        "nothing half-mounted"
    );
    assert!(
        !g.ok("ls /run/cnfs/volumes").await?.contains('w'),
        "no leftover directory"
    );

    // Restarted agent: the volume is re-learned and a repeated Mount is idempotent.
    let keep = request("keep", &ip, "data", "", (ALICE, ALICE_PW), &[], 60_000);
    agent.mount(ctx(T), &keep).await?;
    g.ok("kill -9 $(pidof cnfs-agent); /usr/bin/cnfs-agent </dev/null >/dev/console 2>&1 &")
        .await?;
    bed.vm.wait_for_agent(Duration::from_secs(30)).await?;
    let agent = bed.vm.agent().await?;
    let list = agent.list(ctx(T), &agent::ListRequest::new()).await?;
    assert_eq!(list.volumes.len(), 1, "{list:?}");
    assert_eq!(list.volumes[0].state, "mounted");
    assert!(agent.mount(ctx(T), &keep).await?.already_mounted);

    // The server dies while a writer keeps the volume busy: Unmount is bounded and leaves
    // nothing mounted.
    g.ok("(dd if=/dev/zero of=/run/cnfs/volumes/keep/w.bin bs=64k count=100000 </dev/null >/dev/null 2>&1 &)")
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    bed.smb.kill();
    let bound = Duration::from_secs(15);
    let start = Instant::now();
    agent
        .unmount(
            ctx(T),
            &agent::UnmountRequest {
                name: "keep".into(),
                timeout_ms: bound.as_millis() as u32,
                ..Default::default()
            },
        )
        .await?;
    assert!(
        start.elapsed() < bound + Duration::from_secs(5),
        "unmount took {:?}",
        start.elapsed()
    );
    assert!(!g
        .ok("cat /proc/mounts")
        .await?
        .contains("/run/cnfs/volumes/keep"));
    agent
        .ping(ctx(Duration::from_secs(10)), &agent::PingRequest::new())
        .await?;
    Ok(())
}

/// An encrypted block volume (luks2) on an SMB share: cifs drops a byte-range lock at any
/// close by the process that took it, so a lock holder process keeps the single-writer lock
/// for as long as the volume is mounted (design encryption-luks2.md §5.2). Checked: the
/// share holds a LUKS2 file and no plaintext; a second opener (its own SMB session) is
/// refused while the volume is mounted, also after the agent was killed and restarted
/// (the holder outlives it); Unmount ends the holder, and the other name then opens the
/// same container with the data intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_smb_luks2_volume_keeps_one_writer_across_agent_restarts() -> anyhow::Result<()> {
    let bed = start("smb-luks2").await?;
    let ip = bed.smb.server_ip.clone();
    let share = bed
        .smb
        .share_dir("data")
        .ok_or_else(|| anyhow::anyhow!("no data share"))?
        .to_path_buf();
    std::fs::create_dir_all(share.join("lk"))?;
    std::os::unix::fs::chown(share.join("lk"), bed.smb.uid_of(ALICE), None)?;
    const KEY: &[u8] = b"smb luks2 key, exact bytes\n";
    let lk = |name: &str| {
        let mut r = request(name, &ip, "data", "/lk", (ALICE, ALICE_PW), &[], 180_000);
        r.volume.mut_or_insert_default().encryption =
            protobuf::MessageField::some(agent::Encryption {
                mode: "luks2".into(),
                key: KEY.to_vec(),
                size_bytes: 128 << 20,
                ..Default::default()
            });
        r
    };
    let unmount = |name: &str| agent::UnmountRequest {
        name: name.into(),
        ..Default::default()
    };
    let holders = "for p in /proc/[0-9]*; do \
                   tr '\\0' ' ' < $p/cmdline 2>/dev/null | grep -q '^cnfs-lock-holder ' && echo ${p#/proc/}; \
                   done; true";

    let agent = bed.vm.agent().await?;
    let g = bed.vm.exec.clone();
    agent.mount(ctx(T), &lk("lk")).await?;
    let canary = "CNFS-SMB-LUKS2-CANARY";
    let sums = g
        .ok(&format!(
            "cd /run/cnfs/volumes/lk && echo {canary} > c.txt && head -c 3000000 /dev/urandom > blob \
             && sync && md5sum c.txt blob"
        ))
        .await?;
    let container = share.join("lk/cnfs-volume.luks2");
    let luks = std::process::Command::new("cryptsetup")
        .arg("isLuks")
        .arg(&container)
        .status()?;
    assert!(luks.success(), "the share holds no LUKS2 container");
    assert!(
        cnfs_testbed::process::files_containing(&share, canary.as_bytes())?.is_empty(),
        "plaintext on the share"
    );
    // Every short-lived process that opened the container has closed it by now (each close
    // would have dropped a lock it took): the holder's lock keeps a second client out.
    let refused = |e: ttrpc::Error, when: &str| {
        assert_eq!(code_of(&e), Code::FAILED_PRECONDITION, "{when}: {e:?}");
        assert!(
            message_of(&e).contains("in use by another client"),
            "{when}: {}",
            message_of(&e)
        );
    };
    let e = agent
        .mount(ctx(T), &lk("lk2"))
        .await
        .expect_err("second opener");
    refused(e, "while mounted");
    let holder = g.ok(holders).await?;
    assert_eq!(
        holder.split_whitespace().count(),
        1,
        "one lock holder: {holder:?}"
    );

    let left = g
        .ok("grep -c 'cnfs/backing/lk2\\|cnfs/volumes/lk2' /proc/mounts || true")
        .await?;
    assert_eq!(
        left.trim(),
        "0",
        "the refused opener left its share mounted"
    );
    assert_eq!(
        g.ok(holders).await?,
        holder,
        "the refused opener's holder stayed"
    );

    // The agent is killed (not its holder) and restarted: the volume and its lock stay.
    g.ok(&format!(
        "{}; kill -9 $a; while kill -0 $a 2>/dev/null; do sleep 0.1; done; \
         /usr/bin/cnfs-agent </dev/null >/dev/console 2>&1 &",
        cnfs_testbed::guest::AGENT_PID_SH
    ))
    .await?;
    bed.vm.wait_for_agent(Duration::from_secs(60)).await?;
    let agent = bed.vm.agent().await?;
    assert_eq!(
        g.ok(holders).await?,
        holder,
        "the holder outlives the agent"
    );
    assert!(agent.mount(ctx(T), &lk("lk")).await?.already_mounted);
    let e = agent
        .mount(ctx(T), &lk("lk2"))
        .await
        .expect_err("second opener after the restart");
    refused(e, "after an agent restart");
    assert_eq!(
        g.ok("cd /run/cnfs/volumes/lk && md5sum c.txt blob").await?,
        sums
    );

    // No key in what the guest logged (console), recorded (state files), mounted, or in any
    // process's arguments (the holder's included), nor in the server's log.
    let records = g
        .ok(
            "cat /run/cnfs/state/* /proc/mounts /proc/self/mountinfo 2>/dev/null; \
             for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done; true",
        )
        .await?;
    for (what, text) in [
        ("console", bed.vm.console_text()),
        ("records", records),
        ("Samba log", bed.smb.log_text()),
    ] {
        assert!(!text.contains("smb luks2 key"), "key in the {what}");
    }

    // Unmount while a process still holds the volume: it is detached, and the lock holder
    // stays as long as the loop device under it does (past the agent's retry 15 s later),
    // so the other name is still refused; once the process lets go, the stack and then
    // the holder go by themselves.
    g.ok("(cd /run/cnfs/volumes/lk && exec sleep 600) >/dev/null 2>&1 &")
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let u = agent.unmount(ctx(T), &unmount("lk")).await?;
    assert_eq!(u.method, "detach", "{u:?}");
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(
        g.ok(holders).await?,
        holder,
        "the holder went while its loop lived"
    );
    let e = agent
        .mount(ctx(T), &lk("lk2"))
        .await
        .expect_err("a second opener while the detached volume's loop lives");
    assert_eq!(code_of(&e), Code::FAILED_PRECONDITION, "{e:?}");
    // The detached volume still serves its user (through the process's own directory)...
    let through = "cd /proc/$(pidof sleep)/cwd && (echo late > late && sync late) 2>&1; echo rc=$?";
    let served = g.ok(through).await?;
    assert!(
        served.contains("rc=0"),
        "the detached volume stopped serving: {served}"
    );
    // ... and its lock is still watched: someone kills the holder, and the volume is cut
    // off from its container (before, nothing watched a detached volume: it kept writing
    // into a container a second guest could open).
    g.ok(&format!("kill -9 {}", holder.trim())).await?;
    let cut = until_refused(&g, through, 40).await?;
    assert!(
        cut.contains("Input/output error"),
        "a detached volume whose lock went still writes: {cut}"
    );
    let container = share.join("lk").join("cnfs-volume.luks2");
    let cut_off = md5_hex(&std::fs::read(&container)?);
    g.ok("kill $(pidof sleep)").await?;
    let until = Instant::now() + Duration::from_secs(60);
    while g.ok("ls /sys/block | grep -c '^dm-' || true").await?.trim() != "0" {
        assert!(
            Instant::now() < until,
            "the detached stack outlived its last user by a minute"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(
        md5_hex(&std::fs::read(&container)?),
        cut_off,
        "the detached volume's last unmount wrote into its container after the cut"
    );
    assert_eq!(g.ok(holders).await?.trim(), "");
    // The other name then opens the same container, with what was synced before the cut.
    agent.mount(ctx(T), &lk("lk2")).await?;
    assert_eq!(
        g.ok("cd /run/cnfs/volumes/lk2 && md5sum c.txt blob && cat late")
            .await?,
        format!("{sums}late\n")
    );
    // Someone kills the holder: Stats says the lock is gone (a second client could open the
    // container now), and Unmount still takes everything down.
    let healthy = stats(&agent, "lk2").await?;
    assert_eq!(
        healthy.health.enum_value_or_default(),
        agent::Health::HEALTHY
    );
    g.ok(&format!("kill -9 {}", g.ok(holders).await?.trim()))
        .await?;
    let lost = stats(&agent, "lk2").await?;
    assert_eq!(
        lost.health.enum_value_or_default(),
        agent::Health::ERROR,
        "{lost:?}"
    );
    assert!(
        lost.health_detail.contains("single-writer lock is gone"),
        "{}",
        lost.health_detail
    );
    // ... and the volume is shut down: no more writes reach the container.
    let write = "(echo late > /run/cnfs/volumes/lk2/late && sync /run/cnfs/volumes/lk2/late) 2>&1; echo rc=$?";
    let fenced = until_refused(&g, write, 20).await?;
    assert!(
        fenced.contains("Input/output error"),
        "writes still go through: {fenced}"
    );
    // Cut off below ext4 too: the mapping fails reads (its table is an error target; read
    // past the page cache), and
    // nothing more reaches the container, not even what the unmount writes (ext4's
    // superblock), which would land in a container another guest may have opened.
    let read = g
        .ok("(dd if=/dev/mapper/cnfs-lk2 of=/dev/null bs=4096 count=1 iflag=direct) 2>&1; echo rc=$?")
        .await?;
    assert!(read.contains("rc=1"), "the mapping still reads: {read}");
    // Mounting it again does not pass it off as served.
    let again = agent
        .mount(ctx(T), &lk("lk2"))
        .await
        .expect_err("a cut-off volume mounted again as if served");
    assert_eq!(code_of(&again), Code::FAILED_PRECONDITION, "{again:?}");
    assert!(
        message_of(&again).contains("single-writer lock is gone"),
        "{again:?}"
    );
    let container = share.join("lk").join("cnfs-volume.luks2");
    let before = md5_hex(&std::fs::read(&container)?);
    agent.unmount(ctx(T), &unmount("lk2")).await?;
    assert_eq!(
        md5_hex(&std::fs::read(&container)?),
        before,
        "the unmount of a cut-off volume wrote to its container"
    );
    assert_eq!(g.ok(holders).await?.trim(), "");
    let mounts = g.ok("grep -E 'cifs|cnfs/' /proc/mounts || true").await?;
    assert!(mounts.trim().is_empty(), "left mounted: {mounts}");
    let dm = g.ok("ls /sys/block | grep '^dm-' || true").await?;
    assert!(dm.trim().is_empty(), "dm device left: {dm}");
    Ok(())
}

/// Two guests (two SMB clients) and one SMB luks2 volume: while the first holds it, the
/// second is refused; then the first dies (QEMU killed: no unmount, no close) and Samba
/// keeps the dead client's lock until it notices the connection is gone, by TCP keepalive
/// (`socket options`, as the README tells admins to set; Linux's default would be 2 hours);
/// then the second opens the volume with everything synced before the crash intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_smb_luks2_holder_frees_the_volume_once_samba_drops_its_connection(
) -> anyhow::Result<()> {
    let art = Artifacts::locate()?;
    let dir = TempDir::new("smb-luks2-crash")?;
    let ns = NetNs::create_with_guests(2)?;
    let setup = SambaSetup::new()
        .user(ALICE, ALICE_PW)
        .share(Share::new("data"))
        .global(
            "socket options",
            "TCP_NODELAY SO_KEEPALIVE TCP_KEEPIDLE=10 TCP_KEEPINTVL=5 TCP_KEEPCNT=3 \
             TCP_USER_TIMEOUT=30000",
        );
    let mut smb = Samba::start(&ns, dir.path(), &setup)?;
    let ip = smb.server_ip.clone();
    let share = smb
        .share_dir("data")
        .ok_or_else(|| anyhow::anyhow!("no data share"))?
        .to_path_buf();
    std::fs::create_dir_all(share.join("v"))?;
    std::os::unix::fs::chown(share.join("v"), smb.uid_of(ALICE), None)?;
    let v = || {
        let mut r = request("v", &ip, "data", "/v", (ALICE, ALICE_PW), &[], 180_000);
        r.volume.mut_or_insert_default().encryption =
            protobuf::MessageField::some(agent::Encryption {
                mode: "luks2".into(),
                key: b"crash key".to_vec(),
                size_bytes: 128 << 20,
                ..Default::default()
            });
        r
    };
    let in_use = |e: &ttrpc::Error| {
        code_of(e) == Code::FAILED_PRECONDITION
            && message_of(e).contains("in use by another client")
    };

    let mut first = Vm::boot_guest(&art, &ns, 0, dir.path()).await?;
    let second = Vm::boot_guest(&art, &ns, 1, dir.path()).await?;
    first.agent().await?.mount(ctx(T), &v()).await?;
    let sums = first
        .exec
        .ok(
            "cd /run/cnfs/volumes/v && head -c 2000000 /dev/urandom > blob && echo kept > note \
             && sync && md5sum blob note",
        )
        .await?;
    let b = second.agent().await?;
    let e = b
        .mount(ctx(T), &v())
        .await
        .expect_err("a second guest opened a held volume");
    assert!(in_use(&e), "{e:?}");
    first.kill();
    let killed = Instant::now();

    let mut refused = 0;
    let opened = loop {
        match b.mount(ctx(T), &v()).await {
            Ok(_) => break killed.elapsed(),
            Err(e) => {
                assert!(in_use(&e), "{e:?}");
                refused += 1;
                assert!(
                    killed.elapsed() < Duration::from_secs(150),
                    "still locked {:?} after the holder died (keepalive ~25 s)",
                    killed.elapsed()
                );
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    };
    eprintln!("opened {opened:?} after the holder was killed, refused {refused} time(s) before");
    assert!(
        refused > 0,
        "opened at once: the dead guest's lock was not held"
    );
    assert_eq!(
        second
            .exec
            .ok("cd /run/cnfs/volumes/v && md5sum blob note")
            .await?,
        sums,
        "data synced before the crash"
    );
    b.unmount(
        ctx(T),
        &agent::UnmountRequest {
            name: "v".into(),
            ..Default::default()
        },
    )
    .await?;
    let mounts = second
        .exec
        .ok("grep -E 'cifs|cnfs/' /proc/mounts || true")
        .await?;
    assert!(mounts.trim().is_empty(), "left mounted: {mounts}");

    // The server dies under writes: Unmount is bounded and leaves no mount, mapping, loop or
    // holder behind.
    b.mount(ctx(T), &v()).await?;
    second
        .exec
        .ok("(dd if=/dev/zero of=/run/cnfs/volumes/v/w.bin bs=64k count=100000 </dev/null >/dev/null 2>&1 &)")
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    smb.kill();
    let bound = Duration::from_secs(30);
    let start = Instant::now();
    let u = b
        .unmount(
            ctx(bound + Duration::from_secs(30)),
            &agent::UnmountRequest {
                name: "v".into(),
                timeout_ms: bound.as_millis() as u32,
                ..Default::default()
            },
        )
        .await?;
    let took = start.elapsed();
    // As for NFS (luks2_e2e): the steps after the deadline (a tool's kill grace, the share's
    // detach) may run it over by a few seconds; never by much.
    assert!(
        took < bound + Duration::from_secs(15),
        "unmount took {took:?}: {u:?}"
    );
    // The volume, still busy (dd), is detached. cifs has no switch that fails requests in
    // flight (NFS has /sys/fs/nfs/<dev>/shutdown), so the loop's I/O waits for the server,
    // and dm-crypt, the loop and the lock holder with it. The server comes back: the I/O
    // fails on the forced share, dd lets go, and the stack goes by itself, the holder last
    // (it ends itself once its loop device has gone).
    smb = Samba::start(&ns, &dir.path().join("again"), &setup)?;
    let until = Instant::now() + Duration::from_secs(120);
    let left = loop {
        let left = second
            .exec
            .ok("grep -E 'cifs|cnfs/' /proc/mounts; ls /sys/block | grep -E '^(dm-|loop)' | \
                 while read d; do [ -e /sys/block/$d/loop/backing_file ] || [ -e /sys/block/$d/dm ] && echo $d; done; \
                 for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null | grep '^cnfs-lock-holder '; done; true")
            .await?;
        if left.trim().is_empty() || Instant::now() > until {
            break left;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    if !left.trim().is_empty() {
        let dbg = second
            .exec
            .ok("ps -o pid,stat,args | grep -v ' [SI]W'; true")
            .await?;
        eprintln!("DEBUG {dbg}");
    }
    assert!(
        left.trim().is_empty(),
        "left {:?} after the server died and came back: {left}; unmount said {u:?}",
        start.elapsed()
    );
    eprintln!(
        "unmount with the server dead under writes took {took:?}; all gone {:?} after",
        start.elapsed()
    );
    drop(second);
    drop(smb);
    Ok(())
}

/// The smbd processes serving the client at `ip` (one per connection).
fn smbd_serving(smb: &Samba, ip: &str) -> Vec<i32> {
    let status = smb.status_json().expect("smbstatus");
    let mut pids: Vec<i32> = status["sessions"]
        .as_object()
        .map(|s| {
            s.values()
                .filter(|s| s["remote_machine"] == ip)
                .filter_map(|s| s["server_id"]["pid"].as_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Samba keeps no byte-range lock of a connection that ends (without durable handles,
/// which Samba's defaults do not grant), and cifs puts a handle's locks back only when the
/// handle is next used. On an idle volume no one used it, and a second guest opened the
/// volume (this test failed so before the holder read its handle every second). Then the
/// lock holder is stopped across a lost connection, so the second guest gets in before
/// it: the holder finds its lock gone when it runs again and ends, and `Stats` says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_smb_luks2_volume_keeps_its_lock_when_the_connection_is_lost_and_remade(
) -> anyhow::Result<()> {
    let art = Artifacts::locate()?;
    let dir = TempDir::new("smb-luks2-reconnect")?;
    let ns = NetNs::create_with_guests(2)?;
    let setup = SambaSetup::new()
        .user(ALICE, ALICE_PW)
        .share(Share::new("data"));
    let smb = Samba::start(&ns, dir.path(), &setup)?;
    let ip = smb.server_ip.clone();
    let share = smb
        .share_dir("data")
        .ok_or_else(|| anyhow::anyhow!("no data share"))?
        .to_path_buf();
    std::fs::create_dir_all(share.join("v"))?;
    std::os::unix::fs::chown(share.join("v"), smb.uid_of(ALICE), None)?;
    let v = || {
        let mut r = request("v", &ip, "data", "/v", (ALICE, ALICE_PW), &[], 180_000);
        r.volume.mut_or_insert_default().encryption =
            protobuf::MessageField::some(agent::Encryption {
                mode: "luks2".into(),
                key: b"reconnect key".to_vec(),
                size_bytes: 128 << 20,
                ..Default::default()
            });
        r
    };
    let first = Vm::boot_guest(&art, &ns, 0, dir.path()).await?;
    let second = Vm::boot_guest(&art, &ns, 1, dir.path()).await?;
    let a = first.agent().await?;
    let b = second.agent().await?;
    a.mount(ctx(T), &v()).await?;
    first
        .exec
        .ok("date > /run/cnfs/volumes/v/note && sync")
        .await?;
    // Idle: no write for 5 s (ext4's lazy inode table init is done; the holder reads).
    let mut last = String::new();
    for _ in 0..60 {
        let now = first
            .exec
            .ok("grep -E '^(Writes|Flushes):' /proc/fs/cifs/Stats")
            .await?;
        if now == last {
            break;
        }
        last = now;
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let guest0 = ns.guest(0).ip;
    let drop_connection = || -> anyhow::Result<Vec<i32>> {
        let serving = smbd_serving(&smb, &guest0);
        anyhow::ensure!(!serving.is_empty(), "no smbd serves the first guest");
        for pid in &serving {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            )?;
        }
        Ok(serving)
    };
    let reconnected = |old: &[i32]| {
        let now = smbd_serving(&smb, &guest0);
        !now.is_empty() && now.iter().all(|p| !old.contains(p))
    };
    let in_use = |e: &ttrpc::Error| {
        code_of(e) == Code::FAILED_PRECONDITION
            && message_of(e).contains("in use by another client")
    };

    let old = drop_connection()?;
    let until = Instant::now() + Duration::from_secs(60);
    while !reconnected(&old) {
        assert!(Instant::now() < until, "the first guest did not reconnect");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let e = b
        .mount(ctx(T), &v())
        .await
        .expect_err("a second guest opened an idle volume after the first reconnected");
    assert!(in_use(&e), "{e:?}");
    // The first holds two locks on the server (the second guest's open broke any lease
    // under which cifs kept them to itself): the byte at 2^62 and the witness after it,
    // each its own, so that a check lets go of one while the other keeps others out.
    let locks = smb.byte_range_locks()?;
    for byte in [1u64 << 62, (1u64 << 62) + 1] {
        assert!(
            locks.contains(&(byte, 1)),
            "no lock on byte {byte} at the server: {locks:?}"
        );
    }
    let s = stats(&a, "v").await?;
    assert_eq!(s.health, agent::Health::HEALTHY.into(), "{s:?}");

    // The first's agent is killed and restarted (the volume's watch is re-learnt).
    first
        .exec
        .ok(&format!(
            "{}; kill -9 $a; while kill -0 $a 2>/dev/null; do sleep 0.1; done; \
             /usr/bin/cnfs-agent </dev/null >/dev/console 2>&1 &",
            cnfs_testbed::guest::AGENT_PID_SH
        ))
        .await?;
    first.wait_for_agent(Duration::from_secs(60)).await?;
    let a = first.agent().await?;

    // The holder cannot run while the connection is remade: the second guest gets the
    // lock first. The first's holder finds that out and ends; Stats says the lock is gone,
    // and the first's volume is shut down (no more writes reach the container).
    let holder = first
        .exec
        .ok("for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null | grep -q '^cnfs-lock-holder ' && echo ${p#/proc/}; done; true")
        .await?;
    let holder = holder.trim().to_string();
    assert!(
        !holder.is_empty() && !holder.contains('\n'),
        "one holder: {holder:?}"
    );
    first.exec.ok(&format!("kill -STOP {holder}")).await?;
    drop_connection()?;
    b.mount(ctx(T), &v()).await?;
    first.exec.ok(&format!("kill -CONT {holder}")).await?;
    let until = Instant::now() + Duration::from_secs(60);
    let s = loop {
        let s = stats(&a, "v").await?;
        if s.health == agent::Health::ERROR.into() || Instant::now() > until {
            break s;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert_eq!(s.health, agent::Health::ERROR.into(), "{s:?}");
    assert!(
        s.health_detail.contains("single-writer lock is gone"),
        "{s:?}"
    );
    // The watch cuts the volume off right after the holder ends; Stats may say so first.
    let fenced = until_refused(
        &first.exec,
        "(echo late > /run/cnfs/volumes/v/late) 2>&1; echo rc=$?",
        20,
    )
    .await?;
    assert!(
        fenced.contains("Input/output error"),
        "writes still go through: {fenced}"
    );
    let read = first
        .exec
        .ok("(dd if=/dev/mapper/cnfs-v of=/dev/null bs=4096 count=1 iflag=direct) 2>&1; echo rc=$?")
        .await?;
    assert!(read.contains("rc=1"), "the mapping still reads: {read}");
    for (agent, who) in [(&b, "second"), (&a, "first")] {
        agent
            .unmount(
                ctx(T),
                &agent::UnmountRequest {
                    name: "v".into(),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| anyhow::anyhow!("unmount in the {who} guest: {e:?}"))?;
    }
    Ok(())
}
