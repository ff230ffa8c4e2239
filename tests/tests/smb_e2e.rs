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
    let st = agent
        .stats(
            ctx(T),
            &agent::StatsRequest {
                name: "files".into(),
                ..Default::default()
            },
        )
        .await?;
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
