//! The wrapper outlives a moment in which its process has no file descriptor left (`EMFILE`):
//! a failed connect says nothing about the delegate. Its own test binary, because it exhausts
//! the descriptors of the whole process.

#[path = "common/delegate.rs"]
mod delegate;

use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cnfs_host_shim::shim::delegate::Delegate;
use cnfs_host_shim::shim::proxy::{self, Hooks};
use cnfs_host_shim::shim::sandbox::{After, Refusal};
use cnfs_testbed::TempDir;
use delegate::{Client, FakeDelegate, TASK};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use tokio::net::UnixListener;

struct NoHooks;

#[async_trait]
impl Hooks for NoHooks {
    async fn before_create(
        &self,
        _id: &str,
        _bundle: &std::path::Path,
    ) -> Result<Option<After>, Refusal> {
        Ok(None)
    }
    async fn after_ok(&self, _after: After) -> Result<(), Refusal> {
        Ok(())
    }
    async fn before_delete(&self, _id: &str) {}
}

/// A process standing in for the delegate's; killed when dropped.
struct Sleeper(std::process::Child);

impl Sleeper {
    fn end(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        self.end();
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

fn has_pidfd() -> bool {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten().any(|e| {
                std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains("pidfd"))
            })
        })
        .unwrap_or(false)
}

fn nofile() -> libc::rlimit {
    let (rlim_cur, rlim_max) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    libc::rlimit { rlim_cur, rlim_max }
}

fn set_nofile(lim: &libc::rlimit) {
    setrlimit(Resource::RLIMIT_NOFILE, lim.rlim_cur, lim.rlim_max).expect("setrlimit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wrapper_outlives_a_moment_without_file_descriptors() {
    let dir = TempDir::new("proxy-emfile").expect("temp dir");
    let mut child = Sleeper(
        std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .expect("sleep"),
    );
    let fake = FakeDelegate::start(&dir.path().join("delegate.sock"), child.0.id());
    let socket = dir.path().join("wrapper.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    let d = Arc::new(Delegate::new(fake.path.clone(), "sb1".into()));
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let serve = tokio::spawn(proxy::serve(listener, d, Arc::new(NoHooks), log));
    fake.wait_for("the wrapper asking its pid", |s| {
        s.iter().any(|f| f.method == "Connect")
    })
    .await;
    // The pidfd is open once the answer is in.
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while !has_pidfd() {
        assert!(std::time::Instant::now() < until, "no pidfd appeared");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Use up every descriptor for 2 s: an old-style probe every 500 ms would fail with EMFILE.
    let saved = nofile();
    set_nofile(&libc::rlimit {
        rlim_cur: (open_fds() + 16) as libc::rlim_t,
        rlim_max: saved.rlim_max,
    });
    let mut filler = Vec::new();
    loop {
        match File::open("/dev/null") {
            Ok(f) => filler.push(f),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EMFILE), "{e}");
                break;
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let alive = !serve.is_finished();
    drop(filler);
    set_nofile(&saved);
    assert!(alive, "the wrapper ended while descriptors ran out");

    let mut c = Client::connect(&socket).await;
    c.call(1, TASK, "State", b"").await;
    assert_eq!(c.reply().await.code, ttrpc::Code::OK);

    child.end();
    tokio::time::timeout(Duration::from_secs(20), serve)
        .await
        .expect("the wrapper ends with its delegate's process")
        .expect("serve");
}
