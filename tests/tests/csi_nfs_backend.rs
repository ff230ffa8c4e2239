//! The CSI controller's NFS backend against a real nfs-ganesha (no VM): the user-space NFSv3
//! client runs on a thread inside the test's network namespace, and every effect is checked
//! on the server side, in the exported host directory.

use std::future::Future;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cnfs_csi::backend::nfs::NfsShare;
use cnfs_csi::backend::{BackendError, OnDelete};
use cnfs_testbed::ganesha::EXPORT;
use cnfs_testbed::process::run;
use cnfs_testbed::{Ganesha, NetNs, TempDir};

/// Budget of an operation that should succeed (generous: a loaded two-core machine).
const T: Duration = Duration::from_secs(20);

/// Field order is drop order: the server goes first, then the namespace, then the files.
struct Bed {
    nfs: Ganesha,
    ns: NetNs,
    dir: TempDir,
}

impl Bed {
    fn start() -> anyhow::Result<Self> {
        let dir = TempDir::new("csi-nfs")?;
        let ns = NetNs::create()?;
        let nfs = Ganesha::start(&ns, dir.path())?;
        Ok(Bed { nfs, ns, dir })
    }

    fn share(&self) -> NfsShare {
        NfsShare {
            server: self.ns.host_ip.clone(),
            port: None,
            export: EXPORT.to_string(),
        }
    }

    /// `<export dir on the host>/<rel>`.
    fn on_server(&self, rel: &str) -> std::path::PathBuf {
        self.nfs.export_dir.join(rel)
    }

    /// Runs `fut` on a thread that has joined the namespace's network, with its own
    /// current-thread runtime: the client's sockets then live where the server is.
    fn run<F>(&self, fut: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        let path = format!("/run/netns/{}", self.ns.name);
        std::thread::scope(|s| {
            s.spawn(move || {
                let f = std::fs::File::open(&path).expect("opening the namespace");
                // SAFETY: a plain syscall on a valid fd; it only changes this thread's
                // network namespace.
                let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime")
                    .block_on(fut)
            })
            .join()
            .expect("client thread panicked")
        })
    }
}

/// `chattr +i` on a path for as long as the guard lives (so the temp dir can be removed
/// afterwards, also when the test fails).
struct Immutable(std::path::PathBuf);

impl Immutable {
    fn set(p: &Path) -> anyhow::Result<Self> {
        run(std::process::Command::new("chattr").arg("+i").arg(p))?;
        Ok(Immutable(p.to_path_buf()))
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .output();
    }
}

fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn invalid_message<T: std::fmt::Debug>(r: Result<T, BackendError>) -> String {
    match r {
        Err(BackendError::Invalid(m)) => m,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

fn unavailable_message<T: std::fmt::Debug>(r: Result<T, BackendError>) -> String {
    match r {
        Err(BackendError::Unavailable(m)) => m,
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[test]
fn volume_directories_are_created_probed_and_removed_on_the_server() -> anyhow::Result<()> {
    let bed = Bed::start()?;
    let share = bed.share();

    // Create: a world-writable directory appears in the export; a second create is a no-op
    // that keeps what is inside.
    bed.run(share.create_dir("pvc-a", T))?;
    let a = bed.on_server("pvc-a");
    assert!(a.is_dir(), "{} not created", a.display());
    assert_eq!(mode_of(&a), 0o777);
    std::fs::write(a.join("data"), b"first volume")?;
    bed.run(share.create_dir("pvc-a", T))?;
    assert_eq!(std::fs::read(a.join("data"))?, b"first volume");
    // An explicit mode is applied exactly, whatever the server's umask.
    bed.run(share.create_dir_with_mode("pvc-m", 0o750, T))?;
    assert_eq!(mode_of(&bed.on_server("pvc-m")), 0o750);

    // Probe.
    assert!(bed.run(share.dir_exists("pvc-a", T))?);
    assert!(!bed.run(share.dir_exists("pvc-none", T))?);

    // A file where a volume would go is refused and left alone.
    std::fs::write(bed.on_server("plain"), b"not a volume")?;
    let m = invalid_message(bed.run(share.create_dir("plain", T)));
    assert!(m.contains("name"), "{m}");
    assert!(!bed.run(share.dir_exists("plain", T))?);
    let m = invalid_message(bed.run(share.delete_dir("plain", OnDelete::Delete, T)));
    assert!(m.contains("name"), "{m}");
    assert_eq!(std::fs::read(bed.on_server("plain"))?, b"not a volume");

    // Retain: nothing changes.
    bed.run(share.delete_dir("pvc-a", OnDelete::Retain, T))?;
    assert_eq!(std::fs::read(a.join("data"))?, b"first volume");

    // Archive: renamed beside itself with its data; a second archive of the same name gets
    // the unix-seconds suffix and leaves the first archive as it was.
    bed.run(share.delete_dir("pvc-a", OnDelete::Archive, T))?;
    assert!(!a.exists(), "pvc-a still there after archive");
    assert_eq!(
        std::fs::read(bed.on_server("archived-pvc-a/data"))?,
        b"first volume"
    );
    assert!(!bed.run(share.dir_exists("pvc-a", T))?);
    bed.run(share.create_dir("pvc-a", T))?;
    std::fs::write(a.join("data"), b"second volume")?;
    let before = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    bed.run(share.delete_dir("pvc-a", OnDelete::Archive, T))?;
    let after = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    assert!(!a.exists());
    assert_eq!(
        std::fs::read(bed.on_server("archived-pvc-a/data"))?,
        b"first volume"
    );
    let second: Vec<String> = std::fs::read_dir(&bed.nfs.export_dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("archived-pvc-a-"))
        .collect();
    assert_eq!(second.len(), 1, "{second:?}");
    let secs: u64 = second[0]["archived-pvc-a-".len()..].parse()?;
    assert!(
        (before..=after).contains(&secs),
        "{secs} not in {before}..={after}"
    );
    assert_eq!(
        std::fs::read(bed.on_server(&second[0]).join("data"))?,
        b"second volume"
    );

    // Delete: a whole tree goes (many files, so listing takes several READDIR pages; nested
    // and empty directories; symlinks), and nothing a symlink points to is touched.
    let outside = bed.dir.path().join("outside");
    std::fs::create_dir_all(&outside)?;
    std::fs::write(outside.join("keep"), b"outside the export")?;
    let t = bed.on_server("pvc-t");
    std::fs::create_dir_all(t.join("sub/deeper"))?;
    std::fs::create_dir_all(t.join("empty"))?;
    for i in 0..600 {
        std::fs::write(t.join(format!("file-with-a-longish-name-{i:04}")), b"x")?;
    }
    std::fs::write(t.join("sub/f2"), b"two")?;
    std::fs::write(t.join("sub/deeper/f3"), b"three")?;
    std::os::unix::fs::symlink(&outside, t.join("link-to-dir"))?;
    std::os::unix::fs::symlink(outside.join("keep"), t.join("sub/link-to-file"))?;
    std::os::unix::fs::symlink("../../nowhere", t.join("sub/deeper/dangling"))?;
    std::fs::set_permissions(t.join("sub/deeper"), std::fs::Permissions::from_mode(0o500))?;
    assert!(bed.run(share.dir_exists("pvc-t", T))?);
    let started = Instant::now();
    bed.run(share.delete_dir("pvc-t", OnDelete::Delete, T))?;
    eprintln!("deleted a tree of ~610 entries in {:?}", started.elapsed());
    assert!(!t.exists(), "pvc-t still there after delete");
    assert_eq!(std::fs::read(outside.join("keep"))?, b"outside the export");
    assert!(!bed.run(share.dir_exists("pvc-t", T))?);

    // Missing directories are fine for every policy.
    for policy in [OnDelete::Delete, OnDelete::Archive, OnDelete::Retain] {
        bed.run(share.delete_dir("pvc-t", policy, T))?;
    }

    // Bad names never reach the server.
    for bad in ["../escape", "", "a/b", "..", "spaced name"] {
        let m = invalid_message(bed.run(share.create_dir(bad, T)));
        assert!(m.contains("name"), "{bad:?}: {m}");
    }
    assert!(!bed
        .nfs
        .export_dir
        .parent()
        .is_some_and(|p| p.join("escape").exists()));

    // Everything else in the export is as the steps above left it.
    let mut left: Vec<String> = std::fs::read_dir(&bed.nfs.export_dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    let mut expected = vec![
        "archived-pvc-a".to_string(),
        second[0].clone(),
        "plain".to_string(),
        "pvc-m".to_string(),
    ];
    expected.sort();
    assert_eq!(left, expected);
    Ok(())
}

#[test]
fn failures_are_classified_and_bounded() -> anyhow::Result<()> {
    let bed = Bed::start()?;
    let good = bed.share();

    // A host name is resolved (inside the namespace, "localhost" is its own loopback).
    let by_name = NfsShare {
        server: "localhost".into(),
        ..good.clone()
    };
    bed.run(by_name.create_dir("by-name", T))?;
    assert!(bed.on_server("by-name").is_dir());

    // An export the server does not have.
    let missing = NfsShare {
        export: "/no-such-export".into(),
        ..good.clone()
    };
    match bed.run(missing.create_dir("x", T)) {
        Err(BackendError::NotFound(m)) => {
            eprintln!("unknown export: {m}");
            assert!(m.contains("/no-such-export"), "{m}");
            assert!(m.contains(&bed.ns.host_ip), "{m}");
        }
        other => panic!("expected NotFound, got {other:?}"),
    }

    // The server refuses the write: an immutable export root stops even an unsquashed root.
    {
        let _immutable = Immutable::set(&bed.nfs.export_dir)?;
        match bed.run(good.create_dir("denied", T)) {
            Err(BackendError::PermissionDenied(m)) => {
                eprintln!("refused write: {m}");
                assert!(m.contains(&bed.ns.host_ip) && m.contains("denied"), "{m}");
            }
            other => panic!("expected PermissionDenied, got {other:?}"),
        }
    }
    assert!(!bed.on_server("denied").exists());

    // An NFS port nobody listens on: refused at once.
    let closed = NfsShare {
        port: Some(2050),
        ..good.clone()
    };
    let started = Instant::now();
    let m = unavailable_message(bed.run(closed.dir_exists("x", T)));
    eprintln!("closed port: {m}");
    assert!(m.contains(&bed.ns.host_ip) && m.contains("2050"), "{m}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    // A black hole: void_ip resolves to a MAC nobody owns on a tap nobody reads, so SYNs
    // vanish without an answer or an error; only the timeout can end the call.
    run(std::process::Command::new("ip").args([
        "-n",
        &bed.ns.name,
        "neigh",
        "replace",
        &bed.ns.void_ip,
        "lladdr",
        "02:00:00:00:00:99",
        "dev",
        &bed.ns.tap,
        "nud",
        "permanent",
    ]))?;
    let silent = NfsShare {
        server: bed.ns.void_ip.clone(),
        ..good.clone()
    };
    let deadline = Duration::from_secs(3);
    for (what, op) in [("create_dir", 0), ("dir_exists", 1), ("delete_dir", 2)] {
        let started = Instant::now();
        let r = bed.run(async {
            match op {
                0 => silent.create_dir("x", deadline).await,
                1 => silent.dir_exists("x", deadline).await.map(|_| ()),
                _ => silent.delete_dir("x", OnDelete::Delete, deadline).await,
            }
        });
        let took = started.elapsed();
        let m = unavailable_message(r);
        eprintln!("black hole, {what}, after {took:?}: {m}");
        assert!(
            m.contains(&bed.ns.void_ip) && m.contains("within 3 s"),
            "{what}: {m}"
        );
        assert!(
            took >= Duration::from_millis(2900),
            "{what} gave up early ({took:?}): the black hole answered?"
        );
        assert!(took < Duration::from_secs(20), "{what} took {took:?}");
    }

    // The server itself is unharmed by all of this.
    assert!(bed.run(good.dir_exists("by-name", T))?);
    Ok(())
}
