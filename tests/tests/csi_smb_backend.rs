//! The CSI controller's SMB backend against the test bed's real Samba (no VM): `smbclient`
//! runs as the backend runs it, on a thread inside the test's network namespace (the
//! processes it spawns inherit that), and every effect is checked on the server side, in the
//! share's host directory. Also: refused credentials and shares by kind, unreachable servers
//! within a bound, the password in no error and on no disk, and no Samba state of the host
//! touched.

use std::collections::HashMap;
use std::future::Future;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cnfs_csi::backend::smb::{SmbClient, SmbCredentials, SmbShare, SmbVolume};
use cnfs_csi::backend::{BackendError, OnDelete};
use cnfs_testbed::samba::{Samba, SambaSetup, Share};
use cnfs_testbed::{NetNs, TempDir};

/// Budget of an operation that should succeed (generous: a loaded two-core machine).
const T: Duration = Duration::from_secs(20);
const ALICE: &str = "cnfsalice";
const ALICE_PW: &str = "alice pw;with=odd#chars";
/// Leading white space: smbclient's authentication file would drop it.
const BOB: &str = "cnfsbob";
const BOB_PW: &str = "  bob-pw";

/// Field order is drop order: the server goes first, then the namespace, then the files.
struct Bed {
    smb: Samba,
    ns: NetNs,
    dir: TempDir,
}

impl Bed {
    fn start() -> anyhow::Result<Self> {
        let dir = TempDir::new("csi-smb")?;
        let ns = NetNs::create()?;
        let smb = Samba::start(
            &ns,
            dir.path(),
            &SambaSetup::new()
                .user(ALICE, ALICE_PW)
                .user(BOB, BOB_PW)
                .share(Share::new("data"))
                .share(Share::new("nofollow").option("follow symlinks", "no")),
        )?;
        Ok(Bed { smb, ns, dir })
    }

    fn share(&self, name: &str) -> SmbShare {
        SmbShare {
            server: self.smb.server_ip.clone(),
            share: name.to_string(),
        }
    }

    /// `<share dir on the host>/<rel>`.
    fn on_server(&self, share: &str, rel: &str) -> PathBuf {
        self.smb.share_dir(share).expect("share").join(rel)
    }

    /// Runs `fut` on a thread that has joined the namespace's network, with its own
    /// current-thread runtime: the `smbclient` processes it starts live where the server is.
    fn run<F>(&self, fut: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        let path = format!("/run/netns/{}", self.ns.name);
        std::thread::scope(|s| {
            s.spawn(move || {
                let f = std::fs::File::open(&path).expect("opening the namespace");
                // Only this thread's network namespace changes; the processes it spawns
                // inherit it.
                nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime")
                    .block_on(fut)
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }
}

fn secrets(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn creds(user: &str, password: &str) -> SmbCredentials {
    SmbCredentials::from_secrets(
        "secrets",
        &secrets(&[("username", user), ("password", password)]),
    )
    .expect("valid credentials")
}

/// Gives a tree made on the host to `uid`, as if the account had written it.
fn chown_tree(p: &Path, uid: u32) -> anyhow::Result<()> {
    std::os::unix::fs::lchown(p, Some(uid), Some(uid))?;
    if p.is_dir() && !p.is_symlink() {
        for e in std::fs::read_dir(p)? {
            chown_tree(&e?.path(), uid)?;
        }
    }
    Ok(())
}

/// Every error's text, for the "no password anywhere" checks.
fn text(e: &BackendError) -> String {
    format!("{e} / {e:?}")
}

#[test]
fn volume_directories_are_created_owned_by_the_account_probed_and_removed() -> anyhow::Result<()> {
    let bed = Bed::start()?;
    let data = bed.share("data");
    let alice = creds(ALICE, ALICE_PW);
    let uid = bed.smb.uid_of(ALICE).expect("alice's uid");
    let c = SmbClient::new(&data, &alice)?.with_timeout(T);

    // A StorageClass with a subDir: the parents are made too, the directory belongs to the
    // provisioner's account, and the source names it.
    let params = secrets(&[
        ("fs", "smb"),
        ("server", &bed.smb.server_ip),
        ("share", "data"),
        ("subDir", "k8s/vols"),
        ("vers", "3.1.1"),
    ]);
    let planned = SmbVolume::plan("pvc-a", &params)?;
    assert_eq!(planned.volume.dir, "k8s/vols/pvc-a");
    assert_eq!(
        planned.source,
        format!("smb://{}/data/k8s/vols/pvc-a?vers=3.1.1", bed.smb.server_ip)
    );
    let t = Instant::now();
    bed.run(c.create_dir(&planned.volume.dir))?;
    eprintln!("create (with parents) took {:?}", t.elapsed());
    let a = bed.on_server("data", "k8s/vols/pvc-a");
    assert!(a.is_dir(), "{} not created", a.display());
    assert_eq!(std::fs::metadata(&a)?.uid(), uid, "owned by the account");

    // Again: a no-op that keeps what is inside.
    std::fs::write(a.join("data"), b"first volume")?;
    bed.run(c.create_dir("k8s/vols/pvc-a"))?;
    assert_eq!(std::fs::read(a.join("data"))?, b"first volume");

    // Probe.
    assert!(bed.run(c.dir_exists("k8s/vols/pvc-a"))?);
    assert!(!bed.run(c.dir_exists("k8s/vols/pvc-none"))?);
    assert!(!bed.run(c.dir_exists("no/such/parent"))?);

    // A file where a volume would go is refused and left alone.
    std::fs::write(bed.on_server("data", "plain"), b"not a volume")?;
    for r in [
        bed.run(c.create_dir("plain")),
        bed.run(c.delete_dir("plain", OnDelete::Delete)),
    ] {
        match r {
            Err(BackendError::Invalid(m)) => assert!(m.contains("not a directory"), "{m}"),
            other => panic!("a file at a volume's name: {other:?}"),
        }
    }
    assert!(!bed.run(c.dir_exists("plain"))?);
    assert_eq!(
        std::fs::read(bed.on_server("data", "plain"))?,
        b"not a volume"
    );

    // Retain: nothing changes.
    bed.run(c.delete_dir("k8s/vols/pvc-a", OnDelete::Retain))?;
    assert_eq!(std::fs::read(a.join("data"))?, b"first volume");

    // Delete: a whole tree goes (nested and empty directories, many files), the parents
    // stay; a second delete is fine.
    std::fs::create_dir_all(a.join("sub/deeper"))?;
    std::fs::create_dir_all(a.join("empty"))?;
    for i in 0..200 {
        std::fs::write(a.join(format!("file-with-a-longish-name-{i:04}")), b"x")?;
    }
    std::fs::write(a.join("sub/deeper/f3"), b"three")?;
    chown_tree(&a, uid)?;
    let t = Instant::now();
    bed.run(c.delete_dir("k8s/vols/pvc-a", OnDelete::Delete))?;
    eprintln!("deleted a tree of ~205 entries in {:?}", t.elapsed());
    assert!(!a.exists(), "pvc-a still there after delete");
    assert!(bed.on_server("data", "k8s/vols").is_dir());
    assert!(!bed.run(c.dir_exists("k8s/vols/pvc-a"))?);
    for policy in [OnDelete::Delete, OnDelete::Retain] {
        bed.run(c.delete_dir("k8s/vols/pvc-a", policy))?;
    }

    // A password with leading white space works (it goes by PASSWD_FD, not the file).
    let bob = creds(BOB, BOB_PW);
    let cb = SmbClient::new(&data, &bob)?.with_timeout(T);
    bed.run(cb.create_dir("pvc-bob"))?;
    let b = bed.on_server("data", "pvc-bob");
    assert_eq!(
        std::fs::metadata(&b)?.uid(),
        bed.smb.uid_of(BOB).expect("uid")
    );
    bed.run(cb.delete_dir("pvc-bob", OnDelete::Delete))?;
    assert!(!b.exists());

    // Bad paths never reach the server.
    for bad in ["../escape", "", "a//b", "..", "spaced name", "a;mkdir x"] {
        match bed.run(c.create_dir(bad)) {
            Err(BackendError::Invalid(m)) => assert!(m.starts_with("path:"), "{bad:?}: {m}"),
            other => panic!("{bad:?}: {other:?}"),
        }
    }

    // Everything else in the share is as the steps above left it.
    let mut left: Vec<String> = std::fs::read_dir(bed.on_server("data", ""))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["k8s", "plain"]);
    let _ = &bed.dir;
    Ok(())
}

#[test]
fn refusals_are_classified_bounded_and_never_show_the_password() -> anyhow::Result<()> {
    let bed = Bed::start()?;
    let data = bed.share("data");
    let gencache = Path::new("/run/samba/gencache.tdb");
    let host_cache_before = std::fs::metadata(gencache).and_then(|m| m.modified()).ok();
    let mut errors: Vec<String> = Vec::new();

    // Wrong password, another account's password, an unknown account: PermissionDenied
    // (Samba does not say which), naming the status and not the password.
    for (user, pw) in [
        (ALICE, "not-the-password"),
        (BOB, ALICE_PW),
        ("cnfsnobody", ALICE_PW),
    ] {
        let c = creds(user, pw);
        match bed.run(
            SmbClient::new(&data, &c)?
                .with_timeout(T)
                .create_dir("pvc-x"),
        ) {
            Err(e @ BackendError::PermissionDenied(_)) => {
                let m = text(&e);
                assert!(m.contains("NT_STATUS_LOGON_FAILURE"), "{m}");
                errors.push(m);
            }
            other => panic!("{user}: {other:?}"),
        }
    }
    assert!(!bed.on_server("data", "pvc-x").exists());

    // An unknown share: NotFound.
    let alice = creds(ALICE, ALICE_PW);
    let nosuch = bed.share("nosuchshare");
    match bed.run(
        SmbClient::new(&nosuch, &alice)?
            .with_timeout(T)
            .dir_exists("pvc-x"),
    ) {
        Err(e @ BackendError::NotFound(_)) => {
            assert!(text(&e).contains("NT_STATUS_BAD_NETWORK_NAME"), "{e}");
            errors.push(text(&e));
        }
        other => panic!("unknown share: {other:?}"),
    }

    // Secrets: unknown keys refused by name, missing ones named, before any connection.
    for (pairs, field) in [
        (
            vec![
                ("username", ALICE),
                ("password", ALICE_PW),
                ("userKey", "k"),
            ],
            "secrets.userKey",
        ),
        (vec![("username", ALICE)], "secrets.password"),
        (vec![("password", ALICE_PW)], "secrets.username"),
    ] {
        match SmbCredentials::from_secrets("secrets", &secrets(&pairs)) {
            Err(e @ BackendError::Invalid(_)) => {
                assert!(e.to_string().starts_with(&format!("{field}:")), "{e}");
                errors.push(text(&e));
            }
            other => panic!("{pairs:?}: {other:?}"),
        }
    }

    // Nothing listening: Unavailable at once. An address nobody answers: Unavailable
    // within the bound.
    for (server, bound) in [
        ("127.0.0.1".to_string(), Duration::from_secs(10)),
        (bed.ns.void_ip.clone(), Duration::from_secs(15)),
    ] {
        let share = SmbShare {
            server: server.clone(),
            share: "data".into(),
        };
        let t = Instant::now();
        let r = bed.run(
            SmbClient::new(&share, &alice)?
                .with_timeout(Duration::from_secs(5))
                .create_dir("pvc-x"),
        );
        let took = t.elapsed();
        match r {
            Err(e @ BackendError::Unavailable(_)) => {
                assert!(e.to_string().contains(&server), "{e}");
                errors.push(text(&e));
            }
            other => panic!("{server}: {other:?}"),
        }
        assert!(took < bound, "{server}: {took:?}");
        eprintln!("{server}: unavailable after {took:?}");
    }

    // No error and no server log line holds a password; the host's Samba cache was not
    // touched (smbclient's caches live in its private directory).
    for e in &errors {
        for pw in [ALICE_PW, BOB_PW.trim(), "not-the-password"] {
            assert!(!e.contains(pw), "password in {e}");
        }
    }
    let log = bed.smb.log_text();
    assert!(
        !log.contains(ALICE_PW) && !log.contains("not-the-password"),
        "password in the server log"
    );
    let host_cache_after = std::fs::metadata(gencache).and_then(|m| m.modified()).ok();
    assert_eq!(
        host_cache_before,
        host_cache_after,
        "{} changed",
        gencache.display()
    );
    Ok(())
}

#[test]
fn on_a_share_that_follows_no_symlinks_a_delete_never_reaches_through_one() -> anyhow::Result<()> {
    let bed = Bed::start()?;
    let share = bed.share("nofollow");
    let alice = creds(ALICE, ALICE_PW);
    let uid = bed.smb.uid_of(ALICE).expect("uid");
    let c = SmbClient::new(&share, &alice)?.with_timeout(T);
    // Two volumes of one account; the first holds a server-side link into the second.
    bed.run(c.create_dir("pvc-1"))?;
    bed.run(c.create_dir("pvc-2"))?;
    let (one, two) = (
        bed.on_server("nofollow", "pvc-1"),
        bed.on_server("nofollow", "pvc-2"),
    );
    std::fs::write(two.join("keep"), b"the other volume")?;
    std::fs::write(one.join("mine"), b"x")?;
    std::os::unix::fs::symlink("../pvc-2", one.join("link"))?;
    chown_tree(&bed.on_server("nofollow", ""), uid)?;

    match bed.run(c.delete_dir("pvc-1", OnDelete::Delete)) {
        Err(BackendError::Failed(m)) => {
            assert!(m.contains("NT_STATUS_DIRECTORY_NOT_EMPTY"), "{m}")
        }
        other => panic!("delete through a hidden link: {other:?}"),
    }
    assert_eq!(std::fs::read(two.join("keep"))?, b"the other volume");
    assert!(one.join("link").is_symlink(), "the link itself stays");
    Ok(())
}

/// The names in a volume directory on the server, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("the volume's directory")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// ControllerExpandVolume of an SMB class's luks2 volume, against the real server: the new
/// size is an empty directory `cnfs-volume.size.<bytes>` beside the container, made by the
/// provisioner's account; a repeat or a smaller size writes nothing, a larger one replaces
/// the smaller markers, the container's length counts as recorded, and a missing directory
/// is no volume (the controller's NOT_FOUND). DeleteVolume then removes the directory with
/// the container and the markers inside.
#[test]
fn luks2_sizes_are_recorded_beside_the_container_on_the_share_and_never_shrink(
) -> anyhow::Result<()> {
    const G: u64 = 1 << 30;
    let bed = Bed::start()?;
    let data = bed.share("data");
    let alice = creds(ALICE, ALICE_PW);
    let uid = bed.smb.uid_of(ALICE).expect("alice's uid");
    let c = SmbClient::new(&data, &alice)?.with_timeout(T);
    bed.run(c.create_dir("k8s/pvc-luks2"))?;
    let vol = bed.on_server("data", "k8s/pvc-luks2");

    // The first expansion: its marker, a directory of the account's, and nothing else.
    let t = Instant::now();
    assert_eq!(
        bed.run(c.record_container_size("k8s/pvc-luks2", G + 4096))?,
        Some(G + 4096)
    );
    eprintln!("first size recorded in {:?}", t.elapsed());
    assert_eq!(names_in(&vol), ["cnfs-volume.size.1073745920"]);
    let marker = vol.join("cnfs-volume.size.1073745920");
    assert!(marker.is_dir());
    assert_eq!(
        std::fs::metadata(&marker)?.uid(),
        uid,
        "made by the account"
    );
    let made = std::fs::metadata(&marker)?.ino();

    // The same size again, and smaller ones: answered with what is recorded, nothing written.
    for size in [G + 4096, G, 512 << 20] {
        assert_eq!(
            bed.run(c.record_container_size("k8s/pvc-luks2", size))?,
            Some(G + 4096),
            "{size}"
        );
        assert_eq!(names_in(&vol), ["cnfs-volume.size.1073745920"], "{size}");
    }
    assert_eq!(std::fs::metadata(&marker)?.ino(), made, "the same marker");

    // Larger: its marker, and the smaller one goes.
    assert_eq!(
        bed.run(c.record_container_size("k8s/pvc-luks2", 2 * G))?,
        Some(2 * G)
    );
    assert_eq!(names_in(&vol), ["cnfs-volume.size.2147483648"]);

    // The container the guest grew (sparse, 3 GiB) is the size: a request below it writes
    // nothing and is answered with its length.
    let container = vol.join("cnfs-volume.luks2");
    std::fs::File::create(&container)?.set_len(3 * G)?;
    chown_tree(&container, uid)?;
    assert_eq!(
        bed.run(c.record_container_size("k8s/pvc-luks2", 5 * G / 2))?,
        Some(3 * G)
    );
    assert_eq!(
        names_in(&vol),
        ["cnfs-volume.luks2", "cnfs-volume.size.2147483648"]
    );

    // Names that say nothing are ignored and left alone: a malformed marker, a temporary; a
    // file with a marker's name counts (the guest reads names), and no rmdir removes it.
    std::fs::create_dir(vol.join("cnfs-volume.size.123"))?;
    std::fs::write(vol.join(".cnfs-volume.luks2.new-3f9a"), b"")?;
    std::fs::write(vol.join("cnfs-volume.size.8589934592"), b"")?;
    chown_tree(&vol, uid)?;
    assert_eq!(
        bed.run(c.record_container_size("k8s/pvc-luks2", 5 * G))?,
        Some(8 * G)
    );
    assert_eq!(
        bed.run(c.record_container_size("k8s/pvc-luks2", 16 * G))?,
        Some(16 * G)
    );
    assert_eq!(
        names_in(&vol),
        [
            ".cnfs-volume.luks2.new-3f9a",
            "cnfs-volume.luks2",
            "cnfs-volume.size.123",
            "cnfs-volume.size.17179869184",
            "cnfs-volume.size.8589934592",
        ]
    );
    assert_eq!(std::fs::metadata(&container)?.len(), 3 * G, "never touched");

    // No directory: no volume, and nothing is made.
    assert_eq!(
        bed.run(c.record_container_size("k8s/pvc-none", 2 * G))?,
        None
    );
    assert!(!bed.on_server("data", "k8s/pvc-none").exists());
    // A file where the volume would be is refused and left alone.
    std::fs::write(bed.on_server("data", "k8s/plain"), b"not a volume")?;
    match bed.run(c.record_container_size("k8s/plain", 2 * G)) {
        Err(BackendError::Invalid(m)) => assert!(m.contains("not a directory"), "{m}"),
        other => panic!("a file at a volume's name: {other:?}"),
    }
    assert_eq!(
        std::fs::read(bed.on_server("data", "k8s/plain"))?,
        b"not a volume"
    );

    // The provisioner, as ControllerExpandVolume calls it for `smb+luks2#<fields>`: the
    // volume's size, and None (NOT_FOUND) for a volume whose directory is gone.
    let smb = cnfs_csi::backend::provisioner("smb").expect("registered");
    let config = cnfs_csi::backend::ControllerConfig::default();
    let ctx = cnfs_csi::backend::Context {
        config: &config,
        timeout: T,
    };
    let account = secrets(&[("username", ALICE), ("password", ALICE_PW)]);
    let fields = |dir: &str| format!("delete#{}#data#{dir}", bed.smb.server_ip);
    assert_eq!(
        bed.run(smb.expand_luks2(&ctx, &fields("k8s/pvc-luks2"), &account, 17 * G))?,
        Some(17 * G)
    );
    assert!(vol.join("cnfs-volume.size.18253611008").is_dir());
    assert!(!vol.join("cnfs-volume.size.17179869184").exists());
    assert_eq!(
        bed.run(smb.expand_luks2(&ctx, &fields("k8s/pvc-gone"), &account, 2 * G))?,
        None
    );

    // DeleteVolume: the directory goes with the container and the markers in it.
    bed.run(smb.delete(&ctx, &fields("k8s/pvc-luks2"), &account))?;
    assert!(!vol.exists(), "the volume's directory is still there");
    assert!(bed.on_server("data", "k8s").is_dir());
    Ok(())
}
