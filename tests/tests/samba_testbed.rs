//! The test bed's Samba server: on its own with `smbclient` inside the namespace (data both
//! ways, refused logins and shares, per-share encryption, no host account or daemon left
//! behind), and what the real guest kernel's cifs client does against it (the facts the SMB
//! handler is built on: options shown in /proc/mounts, errno per failure, how long each takes).

use std::path::Path;
use std::time::{Duration, Instant};

use cnfs_testbed::process::md5_hex;
use cnfs_testbed::samba::{ClientOutput, Samba, SambaSetup, Share};
use cnfs_testbed::{Artifacts, GuestExec, NetNs, TempDir, Vm};

const ALICE: &str = "cnfsalice";
const ALICE_PW: &str = "alice-pw 1";
const BOB: &str = "cnfsbob";
const BOB_PW: &str = "bob-pw 2";

/// Pids of smbd processes whose command line names `conf`.
fn smbd_under(conf: &Path) -> Vec<(u32, String)> {
    let needle = conf.to_string_lossy().into_owned();
    cnfs_testbed::process::processes()
        .into_iter()
        .map(|(pid, argv)| (pid, argv.join(" ")))
        .filter(|(_, cmdline)| cmdline.contains("smbd") && cmdline.contains(&needle))
        .collect()
}

fn random_bytes(n: usize) -> Vec<u8> {
    use std::io::Read;
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("reading /dev/urandom");
    buf
}

fn setup() -> SambaSetup {
    SambaSetup::new()
        .user(ALICE, ALICE_PW)
        .user(BOB, BOB_PW)
        .share(Share::new("data"))
        .share(Share::new("sealed").option("smb encrypt", "required"))
}

fn refused_with(out: &ClientOutput, status: &str) {
    assert!(
        !out.success,
        "expected {status}, got success:\n{}",
        out.text()
    );
    assert_eq!(out.nt_status().as_deref(), Some(status), "{}", out.text());
}

#[test]
fn samba_moves_data_both_ways_and_refuses_bad_logins_and_unknown_shares() -> anyhow::Result<()> {
    let dir = TempDir::new("smb")?;
    let ns = NetNs::create()?;
    let smb = Samba::start(&ns, dir.path(), &setup())?;
    eprintln!("smbd listening after {:?}", smb.started_in);
    let data = smb.share_dir("data").expect("data share").to_path_buf();
    let local = smb.root.join("client");

    // Client → server: 1 MiB of every byte value arrives byte for byte, owned by the user's
    // own uid on the host.
    let up = random_bytes(1 << 20);
    std::fs::write(local.join("up.bin"), &up)?;
    let out = smb.smbclient(ALICE, ALICE_PW, "data", "put up.bin up.bin", &[])?;
    assert!(out.success, "{}", out.text());
    let landed = std::fs::read(data.join("up.bin"))?;
    assert_eq!(md5_hex(&landed), md5_hex(&up));
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata(data.join("up.bin"))?.uid();
    assert_eq!(Some(uid), smb.uid_of(ALICE));

    // Server → client.
    let down = random_bytes(300_000);
    std::fs::write(data.join("host.bin"), &down)?;
    let out = smb.smbclient(BOB, BOB_PW, "data", "get host.bin down.bin", &[])?;
    assert!(out.success, "{}", out.text());
    assert_eq!(
        md5_hex(&std::fs::read(local.join("down.bin"))?),
        md5_hex(&down)
    );

    // Refusals: wrong password, another user's password, a user that does not exist (all
    // the same status: Samba does not say which), and a share that does not exist.
    let wrong = smb.smbclient(ALICE, "not-the-password", "data", "ls", &[])?;
    refused_with(&wrong, "NT_STATUS_LOGON_FAILURE");
    let swapped = smb.smbclient(BOB, ALICE_PW, "data", "ls", &[])?;
    refused_with(&swapped, "NT_STATUS_LOGON_FAILURE");
    let nobody = smb.smbclient("cnfsnobody", ALICE_PW, "data", "ls", &[])?;
    refused_with(&nobody, "NT_STATUS_LOGON_FAILURE");
    let no_share = smb.smbclient(ALICE, ALICE_PW, "nosuchshare", "ls", &[])?;
    refused_with(&no_share, "NT_STATUS_BAD_NETWORK_NAME");
    // The refused password reached no file and no log line.
    assert!(!smb.log_text().contains("not-the-password"));

    // `smb encrypt = required` on one share: SMB 3 clients get in (encrypted), an SMB 2.1
    // client (no encryption in that dialect) is turned away at that share only.
    let sealed = smb.smbclient(ALICE, ALICE_PW, "sealed", "ls", &[])?;
    assert!(sealed.success, "{}", sealed.text());
    let old = smb.smbclient(ALICE, ALICE_PW, "sealed", "ls", &["-m", "SMB2_10"])?;
    refused_with(&old, "NT_STATUS_ACCESS_DENIED");
    let plain = smb.smbclient(ALICE, ALICE_PW, "data", "ls", &["-m", "SMB2_10"])?;
    assert!(plain.success, "{}", plain.text());

    // SMB1 is refused by the server (min protocol SMB2_10), whatever the client allows.
    let smb1 = smb.smbclient(
        ALICE,
        ALICE_PW,
        "data",
        "ls",
        &["-m", "NT1", "--option=client min protocol=NT1"],
    )?;
    assert!(!smb1.success, "SMB1 accepted:\n{}", smb1.text());
    eprintln!("SMB1 client: {}", smb1.text().trim());

    // The users exist only in the server's view: the host's account files and mounts are
    // untouched.
    for file in ["/etc/passwd", "/etc/group"] {
        let text = std::fs::read_to_string(file)?;
        assert!(
            !text.contains(ALICE) && !text.contains(BOB),
            "{file} changed"
        );
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    assert!(
        !mounts.contains(" /etc/passwd ") && !mounts.contains(" /etc/group "),
        "a bind mount leaked to the host"
    );

    // The log is in the temp dir; stopping leaves no smbd.
    let conf = smb.conf.clone();
    assert!(!smbd_under(&conf).is_empty());
    assert!(smb.log.starts_with(dir.path()) && smb.log_text().contains("smbd version"));
    let t = Instant::now();
    drop(smb);
    eprintln!("smbd stopped in {:?}", t.elapsed());
    let left = smbd_under(&conf);
    assert!(left.is_empty(), "still running after drop: {left:?}");
    Ok(())
}

#[test]
fn a_killed_server_refuses_connections_and_leaves_no_smbd() -> anyhow::Result<()> {
    let dir = TempDir::new("smb-kill")?;
    let ns = NetNs::create()?;
    let mut smb = Samba::start(&ns, dir.path(), &setup())?;
    // A connection makes smbd fork a child for it; the kill must take that one too.
    let out = smb.smbclient(ALICE, ALICE_PW, "data", "ls", &[])?;
    assert!(out.success, "{}", out.text());
    assert!(!smbd_under(&smb.conf).is_empty());
    smb.kill();
    let left = smbd_under(&smb.conf);
    assert!(left.is_empty(), "still running after kill: {left:?}");
    let out = smb.smbclient(ALICE, ALICE_PW, "data", "ls", &[])?;
    refused_with(&out, "NT_STATUS_CONNECTION_REFUSED");
    Ok(())
}

#[test]
fn a_host_account_name_or_a_bad_share_name_is_refused_before_smbd_starts() -> anyhow::Result<()> {
    let dir = TempDir::new("smb-bad")?;
    let ns = NetNs::create()?;
    let e = Samba::start(&ns, dir.path(), &SambaSetup::new().user("root", "pw"))
        .err()
        .expect("root is a host account");
    let msg = format!("{e:#}");
    assert!(
        msg.contains("user name \"root\"") && msg.contains("already a host account"),
        "{msg}"
    );
    let e = Samba::start(&ns, dir.path(), &SambaSetup::new().share(Share::new("a/b")))
        .err()
        .expect("slash in a share name");
    assert!(format!("{e:#}").contains("share name \"a/b\""), "{e:#}");
    let e = Samba::start(
        &ns,
        dir.path(),
        &SambaSetup::new().user(ALICE, "two\nlines"),
    )
    .err()
    .expect("newline in a password");
    let msg = format!("{e:#}");
    assert!(
        msg.contains("password") && !msg.contains("two\nlines"),
        "{msg}"
    );
    assert!(smbd_under(&dir.path().join("samba/smb.conf")).is_empty());
    Ok(())
}

/// One `mount -t cifs` by the guest's busybox: its exit code, the errno it reported, the
/// kernel's log lines from the attempt, and how long it took by the guest's clock. (busybox
/// retries once read-only after EACCES, so a refused login shows two attempts in the log.)
#[derive(Debug)]
struct Attempt {
    code: i32,
    /// busybox's `mount: mounting X on Y failed: <strerror>`.
    message: String,
    kernel: String,
    secs: f64,
}

/// One failing mount and what it must fail with.
struct Case {
    what: &'static str,
    source: String,
    options: String,
    errno: i32,
    /// A line the kernel logs for it ("" for none checked).
    kernel_says: &'static str,
    /// Bounds on how long it takes, in seconds.
    secs: (f64, f64),
}

/// The errnos a cifs mount was seen to fail with, and the others worth telling apart.
const ERRNOS: [i32; 12] = [
    libc::EINPROGRESS,
    libc::EACCES,
    libc::ENOENT,
    libc::ECONNREFUSED,
    libc::EHOSTUNREACH,
    libc::EHOSTDOWN,
    libc::ETIMEDOUT,
    libc::EOPNOTSUPP,
    libc::ENOKEY,
    libc::EINVAL,
    libc::EIO,
    libc::ECONNRESET,
];

impl Attempt {
    /// The errno whose text busybox printed (host and guest share glibc's strerror texts).
    fn errno(&self) -> Option<i32> {
        let text = self.message.rsplit("failed: ").next()?.trim();
        ERRNOS.into_iter().find(|&e| {
            let desc = std::io::Error::from_raw_os_error(e).to_string();
            desc.split(" (os error").next() == Some(text)
        })
    }
}

/// Mounts `source` on /mnt/t in the guest with `options`, SIGKILLed after `bound` seconds.
/// A source written `/\server/share` reaches mount(2) with the options as given: busybox
/// adds `unc=` and `ip=` only to sources that start with `//` or `\\`, while the kernel
/// takes any two delimiters. (busybox still drops empty options, so `,,` cannot be sent.)
async fn mount_in_guest(g: &GuestExec, source: &str, options: &str, bound: u64) -> Attempt {
    let cmd = format!(
        "dmesg -c >/dev/null; mkdir -p /mnt/t; s=$(cut -d' ' -f1 /proc/uptime); \
         timeout -s KILL {bound} mount -t cifs '{source}' /mnt/t -o '{options}' 2>/tmp/err; \
         rc=$?; e=$(cut -d' ' -f1 /proc/uptime); echo \"$rc $s $e\"; cat /tmp/err; \
         echo ---; dmesg"
    );
    let out = g
        .run(&cmd, Duration::from_secs(bound + 30))
        .await
        .expect("guest exec");
    let (head, kernel) = out.stdout.split_once("---\n").unwrap_or((&out.stdout, ""));
    let mut lines = head.lines();
    let nums: Vec<f64> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    let a = Attempt {
        code: nums.first().map(|c| *c as i32).unwrap_or(-1),
        message: lines.collect::<Vec<_>>().join("\n"),
        kernel: kernel.to_string(),
        secs: nums
            .get(2)
            .zip(nums.get(1))
            .map(|(e, s)| e - s)
            .unwrap_or(-1.0),
    };
    eprintln!(
        "mount {source} -o <{} bytes>: exit {}, errno {:?}, {:.2} s: {}\n{}",
        options.len(),
        a.code,
        a.errno(),
        a.secs,
        a.message,
        a.kernel.trim_end()
    );
    a
}

/// The /proc/mounts line of the mount on /mnt/t.
async fn mounts_line(g: &GuestExec) -> String {
    let mounts = g.ok("cat /proc/mounts").await.expect("guest /proc/mounts");
    mounts
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("/mnt/t"))
        .unwrap_or_default()
        .to_string()
}

/// The encryption the server reports for its tree connect to `share`.
fn server_tcon_encryption(smb: &Samba, share: &str) -> serde_json::Value {
    let status = smb.status_json().expect("smbstatus");
    status["tcons"]
        .as_object()
        .and_then(|t| t.values().find(|t| t["service"] == share))
        .map(|t| t["encryption"].clone())
        .unwrap_or_default()
}

const CAROL: &str = "cnfscarol";
/// A password with '=' and a space, both plain characters to the cifs option parser.
const CAROL_PW: &str = "carol=pw 3";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_kernel_mounts_samba_sealed_hides_the_password_and_fails_each_way_with_its_errno(
) -> anyhow::Result<()> {
    let art = Artifacts::locate()?;
    let dir = TempDir::new("smb-guest")?;
    let ns = NetNs::create()?;
    // Log level 3: the server's reason for refusing SMB1 is logged at that level.
    let mut smb = Samba::start(&ns, dir.path(), &setup().global("log level", "3"))?;
    smb.add_user(CAROL, CAROL_PW)?;
    let vm = Vm::boot(&art, &ns, dir.path()).await?;
    let g = &vm.exec;
    let ip = smb.server_ip.clone();
    let raw = |share: &str| format!("/\\{ip}/{share}");
    let creds = format!("username={ALICE},password={ALICE_PW}");
    let sealed_311 = format!("{creds},vers=3.1.1,seal");

    // The test guest loads cifs with busybox's modprobe (modules.dep, no softdeps).
    let out = g
        .ok("modprobe cifs && grep -w cifs /proc/filesystems")
        .await?;
    assert!(out.contains("nodev\tcifs"), "{out}");

    // cifs alone cannot sign or seal: its crypto (soft dependencies cmac, ccm, gcm, and gcm's
    // ghash) is modules in Debian's kernel, and the kernel's own request_module for them
    // fails in the test guest (busybox modprobe, no modules.alias in the initrd). The
    // failure is ENOENT, the same errno as an unknown share: load them before mounting.
    let a = mount_in_guest(g, &raw("data"), &sealed_311, 60).await;
    assert_eq!(a.errno(), Some(libc::ENOENT), "{a:#?}");
    assert!(
        a.kernel
            .contains("Could not allocate shash TFM 'cmac(aes)'")
            || a.kernel.contains("Failed alloc encrypt aead"),
        "{a:#?}"
    );
    g.ok("for m in cmac ccm gcm ghash_generic; do modprobe $m || exit 1; done")
        .await?;

    // vers=3.1.1 + seal through busybox's own cifs path (it adds unc= and ip=).
    let a = mount_in_guest(g, &format!("//{ip}/data"), &sealed_311, 60).await;
    assert_eq!(a.code, 0, "{a:#?}");
    let line = mounts_line(g).await;
    eprintln!("/proc/mounts (busybox //): {line}");
    g.ok("umount /mnt/t").await?;

    // The same as a raw mount(2): the kernel takes the address from the UNC itself.
    let a = mount_in_guest(g, &raw("data"), &sealed_311, 60).await;
    assert_eq!(a.code, 0, "{a:#?}");
    assert!(a.secs < 10.0, "{a:#?}");
    let line = mounts_line(g).await;
    eprintln!("/proc/mounts (raw): {line}");
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        fields.get(..3),
        Some(&[&*format!("//{ip}/data"), "/mnt/t", "cifs"][..])
    );
    let opts: Vec<&str> = fields.get(3).unwrap_or(&"").split(',').collect();
    for want in [
        "vers=3.1.1".to_string(),
        "seal".into(),
        format!("username={ALICE}"),
        format!("addr={ip}"),
    ] {
        assert!(opts.contains(&want.as_str()), "{want} not in {line}");
    }
    // The password is nowhere the guest shows mounts or cifs state.
    for file in [
        "/proc/mounts",
        "/proc/self/mountinfo",
        "/proc/fs/cifs/DebugData",
    ] {
        let text = g.ok(&format!("cat {file}")).await?;
        assert!(
            !text.contains(ALICE_PW) && !text.contains("password") && !text.contains("pass="),
            "{file} shows the password"
        );
    }
    // The server agrees: SMB 3.1.1, as alice, the share's traffic encrypted.
    let status = smb.status_json()?;
    let session = status["sessions"]
        .as_object()
        .and_then(|s| s.values().next().cloned())
        .unwrap_or_default();
    assert_eq!(session["username"], ALICE, "{status:#}");
    assert_eq!(session["session_dialect"], "SMB3_11", "{status:#}");
    let enc = server_tcon_encryption(&smb, "data");
    assert_eq!(enc["degree"], "full", "{status:#}");
    assert_eq!(enc["cipher"], "AES-128-GCM", "{status:#}");

    // Data both ways, checked by MD5 on both sides; the guest's files are alice's on the host.
    let share = smb.share_dir("data").expect("data share").to_path_buf();
    let guest_md5 = g
        .ok(
            "dd if=/dev/urandom of=/mnt/t/guest.bin bs=64k count=16 2>/dev/null && sync && \
             md5sum /mnt/t/guest.bin",
        )
        .await?;
    let on_host = std::fs::read(share.join("guest.bin"))?;
    assert_eq!(on_host.len(), 1 << 20);
    assert_eq!(
        guest_md5.split_whitespace().next(),
        Some(&*md5_hex(&on_host))
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        Some(std::fs::metadata(share.join("guest.bin"))?.uid()),
        smb.uid_of(ALICE)
    );
    let host_data = random_bytes(700_000);
    std::fs::write(share.join("host.bin"), &host_data)?;
    let in_guest = g.ok("md5sum /mnt/t/host.bin").await?;
    assert_eq!(
        in_guest.split_whitespace().next(),
        Some(&*md5_hex(&host_data))
    );
    g.ok("umount /mnt/t").await?;

    // A user added while the server runs can mount at once; '=' and a space in a password
    // pass through the option string unchanged (options are split on ',' only, a key from
    // its value at the first '='). A ',' in a password cannot be tried with busybox, which
    // drops the empty option in ",," before mount(2).
    let a = mount_in_guest(
        g,
        &raw("data"),
        &format!("username={CAROL},password={CAROL_PW},vers=3.1.1,seal"),
        60,
    )
    .await;
    assert_eq!(a.code, 0, "{a:#?}");
    let line = mounts_line(g).await;
    assert!(line.contains(&format!("username={CAROL},")), "{line}");
    assert!(!line.contains("pw 3"), "{line}");
    g.ok("umount /mnt/t").await?;

    // A share that requires encryption is encrypted without `seal`, and /proc/mounts then
    // does not say so.
    let a = mount_in_guest(g, &raw("sealed"), &format!("{creds},vers=3.1.1"), 60).await;
    assert_eq!(a.code, 0, "{a:#?}");
    let line = mounts_line(g).await;
    assert!(!line.split(',').any(|o| o == "seal"), "{line}");
    assert_eq!(server_tcon_encryption(&smb, "sealed")["degree"], "full");
    g.ok("umount /mnt/t").await?;

    // Failures, each as its errno, with how long it took. Wrong password and unknown user
    // are the same to the kernel (the server says STATUS_LOGON_FAILURE for both).
    // Unreachable servers: without `port=`, cifs tries 445 and then 139, each connect bounded
    // by the socket's 5 s send timeout (black hole) or by ARP giving up (~3 s, no host); with
    // `port=445`, one try. The black hole's errno is EINPROGRESS: the timed-out connect's own.
    let hole = ns.void_ip.replace(".99", ".98");
    g.ok(&format!("arp -i eth0 -s {hole} 02:00:00:00:00:98"))
        .await?;
    let cases = [
        Case {
            what: "wrong password",
            source: raw("data"),
            options: format!("username={ALICE},password=wrong,vers=3.1.1,seal"),
            errno: libc::EACCES,
            kernel_says: "STATUS_LOGON_FAILURE",
            secs: (0.0, 10.0),
        },
        Case {
            what: "unknown user",
            source: raw("data"),
            options: "username=cnfsnobody,password=x,vers=3.1.1,seal".into(),
            errno: libc::EACCES,
            kernel_says: "STATUS_LOGON_FAILURE",
            secs: (0.0, 10.0),
        },
        Case {
            what: "unknown share",
            source: raw("nosuchshare"),
            options: sealed_311.clone(),
            errno: libc::ENOENT,
            kernel_says: "BAD_NETWORK_NAME",
            secs: (0.0, 10.0),
        },
        Case {
            what: "nothing listening (port=4455)",
            source: raw("data"),
            options: format!("{sealed_311},port=4455"),
            errno: libc::ECONNREFUSED,
            kernel_says: "",
            secs: (0.0, 10.0),
        },
        Case {
            what: "vers=1.0 (server min protocol SMB2_10)",
            source: raw("data"),
            options: format!("{creds},vers=1.0"),
            errno: libc::EOPNOTSUPP,
            kernel_says: "",
            secs: (0.0, 10.0),
        },
        Case {
            what: "vers=2.1 with seal",
            source: raw("data"),
            options: format!("{creds},vers=2.1,seal"),
            errno: libc::EOPNOTSUPP,
            kernel_says: "",
            secs: (0.0, 10.0),
        },
        Case {
            what: "sec=krb5 without keys",
            source: raw("data"),
            options: format!("username={ALICE},vers=3.1.1,seal,sec=krb5"),
            errno: libc::ENOKEY,
            kernel_says: "",
            secs: (0.0, 10.0),
        },
        Case {
            what: "no such host (no ARP answer)",
            source: format!("/\\{}/data", ns.void_ip),
            options: sealed_311.clone(),
            errno: libc::EHOSTUNREACH,
            kernel_says: "",
            secs: (4.0, 20.0),
        },
        Case {
            what: "no such host, port=445",
            source: format!("/\\{}/data", ns.void_ip),
            options: format!("{sealed_311},port=445"),
            errno: libc::EHOSTUNREACH,
            kernel_says: "",
            secs: (2.0, 10.0),
        },
        Case {
            what: "black hole (packets dropped)",
            source: format!("/\\{hole}/data"),
            options: sealed_311.clone(),
            errno: libc::EINPROGRESS,
            kernel_says: "",
            secs: (9.0, 30.0),
        },
        Case {
            what: "black hole, port=445",
            source: format!("/\\{hole}/data"),
            options: format!("{sealed_311},port=445"),
            errno: libc::EINPROGRESS,
            kernel_says: "",
            secs: (4.5, 15.0),
        },
    ];
    let mut facts = Vec::new();
    for case in cases {
        let a = mount_in_guest(g, &case.source, &case.options, 150).await;
        let what = case.what;
        assert_ne!(a.code, 0, "{what}: mounted");
        assert_eq!(a.errno(), Some(case.errno), "{what}: {a:#?}");
        assert!(a.kernel.contains(case.kernel_says), "{what}: {a:#?}");
        let (min, max) = case.secs;
        assert!(
            (min..max).contains(&a.secs),
            "{what}: took {:.2} s, expected {min}..{max}",
            a.secs
        );
        facts.push((what, a.errno(), a.secs));
    }
    let log = smb.log_text();
    assert!(log.contains("No protocol supported"), "server log on SMB1");

    for (what, errno, secs) in &facts {
        eprintln!("FACT {what}: errno {errno:?}, {secs:.2} s");
    }
    Ok(())
}
