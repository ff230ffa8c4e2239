//! The wrapper's proxy between a containerd-like client and a stand-in delegate shim that keeps
//! a Go ttrpc server's rules: hooks run off the read loop (other calls keep flowing, frames of
//! one stream keep their order), undecodable requests are refused, oversized messages are
//! answered and the connection kept, and the wrapper outlives a failed connect to its delegate.

#[path = "common/delegate.rs"]
mod delegate;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cnfs_host_shim::annotations::{
    CRI_CONTAINER_NAME, CRI_CONTAINER_TYPE, CRI_SANDBOX_ID, CRI_SANDBOX_NAMESPACE,
};
use cnfs_host_shim::shim::config::ShimConfig;
use cnfs_host_shim::shim::delegate::{Delegate, PROBE_INTERVAL, REFUSALS_TO_GONE};
use cnfs_host_shim::shim::frames::{HEADER_LEN, MAX_PAYLOAD, TYPE_DATA, TYPE_REQUEST};
use cnfs_host_shim::shim::proxy::{self, Hooks};
use cnfs_host_shim::shim::sandbox::{After, Refusal, Sandbox};
use cnfs_protocols::handoff::{HandoffDir, Record, RECORD_VERSION};
use cnfs_testbed::TempDir;
use containerd_shim_protos::api::{CreateTaskRequest, DeleteRequest, StateRequest};
use delegate::{Client, FakeDelegate, FLAG_REMOTE_OPEN, TASK};
use oci_spec::runtime::{MountBuilder, Spec};
use protobuf::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::{watch, Notify, Semaphore};

/// Generous: the point is "answered while the other call is still pending", not speed.
const PROMPT: Duration = Duration::from_secs(20);

fn log() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

/// Hooks whose ids say what they do: `slow*` waits for the test's release, `deny*` refuses.
struct GatedHooks {
    entered: Mutex<Vec<String>>,
    entered_changed: Notify,
    release: Semaphore,
}

impl Default for GatedHooks {
    fn default() -> Self {
        GatedHooks {
            entered: Mutex::default(),
            entered_changed: Notify::new(),
            release: Semaphore::new(0),
        }
    }
}

impl GatedHooks {
    async fn gate(&self, id: &str) {
        if id.starts_with("slow") {
            self.entered.lock().expect("entered").push(id.to_string());
            self.entered_changed.notify_waiters();
            self.release.acquire().await.expect("gate").forget();
        }
    }

    async fn wait_entered(&self, id: &str) {
        tokio::time::timeout(PROMPT, async {
            loop {
                let notified = self.entered_changed.notified();
                if self
                    .entered
                    .lock()
                    .expect("entered")
                    .iter()
                    .any(|e| e == id)
                {
                    return;
                }
                notified.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the hook for {id} never ran"));
    }
}

#[async_trait]
impl Hooks for GatedHooks {
    async fn before_create(&self, id: &str, _bundle: &Path) -> Result<Option<After>, Refusal> {
        self.gate(id).await;
        if id.starts_with("deny") {
            return Err(Refusal {
                code: ttrpc::Code::PERMISSION_DENIED,
                message: "cnfs: denied by the test".into(),
            });
        }
        Ok(None)
    }

    async fn after_ok(&self, _after: After) -> Result<(), Refusal> {
        Ok(())
    }

    async fn before_delete(&self, id: &str) {
        self.gate(id).await;
    }
}

struct Wrapper {
    dir: TempDir,
    socket: PathBuf,
    delegate: FakeDelegate,
    serve: tokio::task::JoinHandle<()>,
}

impl Drop for Wrapper {
    fn drop(&mut self) {
        self.serve.abort();
    }
}

/// A wrapper serving `hooks` in front of a fake delegate that reports `shim_pid`.
async fn wrapper(tag: &str, hooks: Arc<dyn Hooks>, shim_pid: u32) -> Wrapper {
    let dir = TempDir::new(tag).expect("temp dir");
    let delegate = FakeDelegate::start(&dir.path().join("delegate.sock"), shim_pid);
    let socket = dir.path().join("wrapper.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    let d = Arc::new(Delegate::new(delegate.path.clone(), "sb1".into()));
    let serve = tokio::spawn(proxy::serve(listener, d, hooks, log()));
    Wrapper {
        dir,
        socket,
        delegate,
        serve,
    }
}

fn create(id: &str, bundle: &str) -> Vec<u8> {
    CreateTaskRequest {
        id: id.into(),
        bundle: bundle.into(),
        ..Default::default()
    }
    .write_to_bytes()
    .expect("encode")
}

fn state(id: &str) -> Vec<u8> {
    StateRequest {
        id: id.into(),
        ..Default::default()
    }
    .write_to_bytes()
    .expect("encode")
}

fn requests(seen: &[delegate::Seen], method: &str) -> usize {
    seen.iter()
        .filter(|s| s.kind == TYPE_REQUEST && s.method == method)
        .count()
}

// ---- item 9: hooks off the read loop -----------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_waiting_for_its_hook_does_not_hold_up_other_calls() {
    let hooks = Arc::new(GatedHooks::default());
    let w = wrapper("proxy-hol", hooks.clone(), std::process::id()).await;
    let mut c = Client::connect(&w.socket).await;
    c.call(1, TASK, "Create", &create("slow-app", "/b")).await;
    hooks.wait_entered("slow-app").await;

    c.call(3, TASK, "State", &state("other")).await;
    let r = c.reply().await;
    assert_eq!((r.stream_id, r.code), (3, ttrpc::Code::OK), "{r:?}");
    assert_eq!(r.payload, state("other"), "State's own answer");
    assert_eq!(
        requests(&w.delegate.seen(), "Create"),
        0,
        "Create still held"
    );

    hooks.release.add_permits(1);
    let r = c.reply().await;
    assert_eq!((r.stream_id, r.code), (1, ttrpc::Code::OK), "{r:?}");
    assert_eq!(r.payload, create("slow-app", "/b"), "Create's own answer");
    // The delegate took the late Create: its stream id was renumbered above State's.
    let seen = w.delegate.seen();
    assert!(seen.iter().all(|s| !s.refused_id), "{seen:?}");
    assert_eq!(w.delegate.methods(), ["State", "Create"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_waiting_for_its_unmounts_does_not_hold_up_other_calls() {
    let hooks = Arc::new(GatedHooks::default());
    let w = wrapper("proxy-hol-del", hooks.clone(), std::process::id()).await;
    let mut c = Client::connect(&w.socket).await;
    let del = DeleteRequest {
        id: "slow-sandbox".into(),
        ..Default::default()
    }
    .write_to_bytes()
    .expect("encode");
    c.call(1, TASK, "Delete", &del).await;
    hooks.wait_entered("slow-sandbox").await;
    c.call(3, TASK, "State", &state("app")).await;
    assert_eq!(c.reply().await.stream_id, 3);
    hooks.release.add_permits(1);
    let r = c.reply().await;
    assert_eq!((r.stream_id, r.code), (1, ttrpc::Code::OK), "{r:?}");
    assert_eq!(w.delegate.methods(), ["State", "Delete"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_of_a_held_stream_keep_their_order_behind_it() {
    let hooks = Arc::new(GatedHooks::default());
    let w = wrapper("proxy-order", hooks.clone(), std::process::id()).await;
    let mut c = Client::connect(&w.socket).await;
    // A client-streaming call: the delegate answers once the client closes its side.
    c.call_flagged(1, FLAG_REMOTE_OPEN, TASK, "Create", &create("slow-a", "/b"))
        .await;
    hooks.wait_entered("slow-a").await;
    c.data(1, b"d1", false).await;
    c.data(1, b"d2", true).await;
    c.call(3, TASK, "State", &state("x")).await;
    assert_eq!(c.reply().await.stream_id, 3);

    hooks.release.add_permits(1);
    assert_eq!(c.reply().await.stream_id, 1);
    let seen = w
        .delegate
        .wait_for("both data frames", |s| {
            s.iter().filter(|f| f.kind == TYPE_DATA).count() == 2
        })
        .await;
    let order: Vec<(String, Vec<u8>)> = seen
        .iter()
        .filter(|s| s.method != "Connect")
        .map(|s| (s.method.clone(), s.payload.clone()))
        .collect();
    assert_eq!(
        order,
        [
            ("State".to_string(), state("x")),
            ("Create".to_string(), create("slow-a", "/b")),
            (String::new(), b"d1".to_vec()),
            (String::new(), b"d2".to_vec()),
        ]
    );
    // The data frames went on the stream the Create was given, not on containerd's id.
    let create_id = seen
        .iter()
        .find(|s| s.method == "Create")
        .map(|s| s.stream_id);
    assert!(
        seen.iter()
            .filter(|s| s.kind == TYPE_DATA)
            .all(|s| Some(s.stream_id) == create_id),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_from_a_hook_is_answered_and_never_reaches_the_delegate() {
    let hooks = Arc::new(GatedHooks::default());
    let w = wrapper("proxy-deny", hooks, std::process::id()).await;
    let mut c = Client::connect(&w.socket).await;
    c.call(1, TASK, "Create", &create("deny-app", "/b")).await;
    let r = c.reply().await;
    assert_eq!((r.stream_id, r.code), (1, ttrpc::Code::PERMISSION_DENIED));
    assert_eq!(r.message, "cnfs: denied by the test");
    c.call(3, TASK, "State", &state("x")).await;
    assert_eq!(c.reply().await.code, ttrpc::Code::OK);
    assert_eq!(w.delegate.methods(), ["State"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_held_beyond_the_bound_are_refused_and_the_held_ones_complete() {
    let hooks = Arc::new(GatedHooks::default());
    let w = wrapper("proxy-bound", hooks.clone(), std::process::id()).await;
    let mut c = Client::connect(&w.socket).await;
    let held = proxy::MAX_HELD_CALLS as u32;
    for i in 0..held {
        c.call(
            1 + 2 * i,
            TASK,
            "Create",
            &create(&format!("slow-{i}"), "/b"),
        )
        .await;
    }
    hooks.wait_entered(&format!("slow-{}", held - 1)).await;
    let over = 1 + 2 * held;
    c.call(over, TASK, "Create", &create("slow-over", "/b"))
        .await;
    let r = c.reply().await;
    assert_eq!(
        (r.stream_id, r.code),
        (over, ttrpc::Code::RESOURCE_EXHAUSTED),
        "{r:?}"
    );
    assert!(r.message.contains("already in progress"), "{r:?}");

    hooks.release.add_permits(proxy::MAX_HELD_CALLS);
    let mut answered = Vec::new();
    for _ in 0..held {
        let r = c.reply().await;
        assert_eq!(r.code, ttrpc::Code::OK, "{r:?}");
        answered.push(r.stream_id);
    }
    answered.sort_unstable();
    assert_eq!(answered, (0..held).map(|i| 1 + 2 * i).collect::<Vec<_>>());
    let seen = w.delegate.seen();
    assert!(seen.iter().all(|s| !s.refused_id), "{seen:?}");
    assert_eq!(requests(&seen, "Create"), proxy::MAX_HELD_CALLS);
}

/// A stand-in Kata management socket that holds every request until released, then answers
/// 404 (a permanent error: the hand-off gives up at once).
fn held_monitor(socket: &Path) -> (watch::Sender<bool>, Arc<Notify>) {
    std::fs::create_dir_all(socket.parent().expect("parent")).expect("monitor dir");
    let listener = UnixListener::bind(socket).expect("monitor socket");
    let (release, released) = watch::channel(false);
    let asked = Arc::new(Notify::new());
    let notify = asked.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut released = released.clone();
            let notify = notify.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                notify.notify_one();
                let _ = released.wait_for(|r| *r).await;
                let _ = s
                    .write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    )
                    .await;
            });
        }
    });
    (release, asked)
}

/// A bundle for app container `app1` of sandbox `sb1` whose bind mount is a CSI target with
/// a hand-off record (a PersistentVolume: no policy check, the guest is what it waits for).
fn csi_bundle(dir: &Path) -> PathBuf {
    let target = dir.join("pods/u/volumes/kubernetes.io~csi/pv/mount");
    let target = target.display().to_string();
    HandoffDir::new(dir.join("handoff"))
        .write_record(&Record {
            version: RECORD_VERSION,
            volume_id: "vol".into(),
            target_path: target.clone(),
            source: "nfs://10.0.0.5/exports/x".into(),
            read_only: false,
            pod_namespace: "team-a".into(),
            pod_name: "p".into(),
            pod_uid: "u".into(),
            ephemeral: false,
            has_secret: false,
            mount_flags: vec![],
        })
        .expect("record");
    let bundle = dir.join("bundle");
    std::fs::create_dir_all(&bundle).expect("bundle");
    let mut spec = Spec::default();
    let m = MountBuilder::default()
        .destination("/data")
        .typ("bind")
        .source(&target)
        .options(vec!["rbind".to_string()])
        .build()
        .expect("mount");
    spec.set_mounts(Some(vec![m]));
    let ann: HashMap<String, String> = [
        (CRI_CONTAINER_TYPE, "container"),
        (CRI_SANDBOX_ID, "sb1"),
        (CRI_SANDBOX_NAMESPACE, "team-a"),
        (CRI_CONTAINER_NAME, "app"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    spec.set_annotations(Some(ann));
    spec.save(bundle.join("config.json")).expect("spec");
    bundle
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csi_hand_off_waiting_for_its_guest_does_not_hold_up_other_calls() {
    let dir = TempDir::new("proxy-csi").expect("temp dir");
    let d = dir.path();
    let bundle = csi_bundle(d);
    let (release, asked) = held_monitor(&d.join("kata/sb1/shim-monitor.sock"));
    let cfg = ShimConfig {
        csi_handoff_dir: d.join("handoff"),
        kata_monitor_roots: vec![d.join("kata")],
        guest_connect_timeout_seconds: 120,
        ..ShimConfig::default()
    };
    let sandbox = Arc::new(Sandbox::new(cfg, log()).expect("sandbox"));
    let w = wrapper("proxy-csi-w", sandbox, std::process::id()).await;
    let mut c = Client::connect(&w.socket).await;

    c.call(
        1,
        TASK,
        "Create",
        &create("app1", &bundle.display().to_string()),
    )
    .await;
    // The hand-off is now asking Kata for the guest, and will until released.
    tokio::time::timeout(PROMPT, asked.notified())
        .await
        .expect("the hand-off asks the management socket");
    c.call(3, TASK, "State", &state("sb1")).await;
    let r = c
        .reply_within(PROMPT)
        .await
        .expect("State answered while the CSI hand-off is pending");
    assert_eq!((r.stream_id, r.code), (3, ttrpc::Code::OK), "{r:?}");

    release.send(true).expect("release");
    let r = c.reply().await;
    assert_eq!(
        (r.stream_id, r.code),
        (1, ttrpc::Code::UNAVAILABLE),
        "{r:?}"
    );
    assert!(
        r.message
            .contains("CSI volumes: cannot reach the sandbox's guest"),
        "{r:?}"
    );
    assert_eq!(
        w.delegate.methods(),
        ["State"],
        "the refused Create stays here"
    );
}

// ---- item 10: fail closed ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_that_cannot_be_decoded_is_refused_not_forwarded() {
    let dir = TempDir::new("proxy-closed").expect("temp dir");
    // A plain container (no CRI annotations): its Create passes through untouched.
    let bundle = dir.path().join("bundle");
    std::fs::create_dir_all(&bundle).expect("bundle");
    Spec::default()
        .save(bundle.join("config.json"))
        .expect("spec");
    let sandbox = Arc::new(Sandbox::new(ShimConfig::default(), log()).expect("sandbox"));
    let w = wrapper("proxy-closed-w", sandbox, std::process::id()).await;
    let mut c = Client::connect(&w.socket).await;

    // A truncated varint: no CreateTaskRequest decodes from it.
    c.call(1, TASK, "Create", &[0xff, 0xff, 0xff]).await;
    let r = c.reply().await;
    assert_eq!(
        (r.stream_id, r.code),
        (1, ttrpc::Code::INVALID_ARGUMENT),
        "{r:?}"
    );
    assert!(
        r.message
            .starts_with("cnfs: the task Create request cannot be decoded")
            && r.message.contains("policy cannot be checked"),
        "{r:?}"
    );

    // A request envelope that does not decode is refused too (field 1, length 5, no bytes).
    let garbage = delegate_frame(5, TYPE_REQUEST, &[0x0a, 0x05]);
    c.wr.write_all(&garbage).await.expect("send");
    let r = c.reply().await;
    assert_eq!(
        (r.stream_id, r.code),
        (5, ttrpc::Code::INVALID_ARGUMENT),
        "{r:?}"
    );
    assert!(r.message.contains("cannot be decoded"), "{r:?}");

    // A decodable Create of the same connection still goes through.
    c.call(
        7,
        TASK,
        "Create",
        &create("plain", &bundle.display().to_string()),
    )
    .await;
    let r = c.reply().await;
    assert_eq!((r.stream_id, r.code), (7, ttrpc::Code::OK), "{r:?}");
    assert_eq!(w.delegate.methods(), ["Create"]);
    assert_eq!(
        w.delegate.seen().last().map(|s| s.payload.clone()),
        Some(create("plain", &bundle.display().to_string()))
    );
}

fn delegate_frame(stream_id: u32, kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut b = (payload.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(&stream_id.to_be_bytes());
    b.extend_from_slice(&[kind, 0]);
    b.extend_from_slice(payload);
    b
}

// ---- item 12: one oversized message, not the connection ----------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_is_refused_and_the_connection_kept() {
    let w = wrapper(
        "proxy-big-up",
        Arc::new(GatedHooks::default()),
        std::process::id(),
    )
    .await;
    let mut c = Client::connect(&w.socket).await;
    let len = MAX_PAYLOAD + 1;
    let mut big = Vec::with_capacity(HEADER_LEN + len);
    big.extend_from_slice(&delegate_frame(1, TYPE_REQUEST, &[]));
    big[..4].copy_from_slice(&(len as u32).to_be_bytes());
    big.resize(HEADER_LEN + len, 0x5a);
    // Written while the reply is read: the wrapper answers once it has skipped it all.
    let (mut rd, mut wr) = (c.rd, c.wr);
    let writer = tokio::spawn(async move {
        wr.write_all(&big).await.expect("send the big frame");
        wr
    });
    let first = tokio::time::timeout(PROMPT, cnfs_host_shim::shim::frames::Frame::read(&mut rd))
        .await
        .expect("an answer in time")
        .expect("the connection stays open");
    let wr = writer.await.expect("writer");
    c = Client { rd, wr };
    let first = match first {
        Some(cnfs_host_shim::shim::frames::Incoming::Frame(f)) => f,
        other => panic!("expected a reply, got {other:?}"),
    };
    assert_eq!(first.stream_id, 1);
    assert_eq!(first.response_code(), Some(ttrpc::Code::RESOURCE_EXHAUSTED));

    c.call(3, TASK, "State", &state("x")).await;
    let r = c.reply().await;
    assert_eq!((r.stream_id, r.code), (3, ttrpc::Code::OK), "{r:?}");
    assert_eq!(w.delegate.methods(), ["State"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_reply_is_refused_and_the_connection_kept() {
    let w = wrapper(
        "proxy-big-down",
        Arc::new(GatedHooks::default()),
        std::process::id(),
    )
    .await;
    let mut c = Client::connect(&w.socket).await;
    c.call(1, "test.Service", "Huge", b"").await;
    let r = c.reply().await;
    assert_eq!(
        (r.stream_id, r.code),
        (1, ttrpc::Code::RESOURCE_EXHAUSTED),
        "{r:?}"
    );
    assert!(
        r.message
            .contains(&format!("exceed maximum message size of {MAX_PAYLOAD}")),
        "{r:?}"
    );
    c.call(3, TASK, "State", &state("x")).await;
    let r = c.reply().await;
    assert_eq!((r.stream_id, r.code), (3, ttrpc::Code::OK), "{r:?}");
}

// ---- item 11: one failed connect is not the end ------------------------------------------

/// A process standing in for the delegate's; killed when dropped, so a failing test leaves
/// nothing behind.
struct Sleeper(std::process::Child);

impl Sleeper {
    fn start() -> Sleeper {
        Sleeper(
            std::process::Command::new("sleep")
                .arg("600")
                .spawn()
                .expect("sleep"),
        )
    }

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wrapper_outlives_its_delegates_socket_going_missing_and_ends_with_its_process() {
    let mut child = Sleeper::start();
    let w = wrapper("proxy-live", Arc::new(GatedHooks::default()), child.0.id()).await;
    w.delegate
        .wait_for("the wrapper asking its pid", |s| requests(s, "Connect") > 0)
        .await;
    // Connect refused (no socket) for a while: a probe every 500 ms would end the wrapper.
    let away = w.dir.path().join("away.sock");
    std::fs::rename(&w.delegate.path, &away).expect("hide the socket");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !w.serve.is_finished(),
        "the wrapper ended on a refused connect"
    );
    std::fs::rename(&away, &w.delegate.path).expect("restore the socket");
    let mut c = Client::connect(&w.socket).await;
    c.call(1, TASK, "State", &state("x")).await;
    assert_eq!(c.reply().await.code, ttrpc::Code::OK);

    // The delegate's process exits: the wrapper follows.
    child.end();
    let mut w = w;
    tokio::time::timeout(PROMPT, &mut w.serve)
        .await
        .expect("the wrapper ends when its delegate's process does")
        .expect("serve");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_waits_out_a_delegate_socket_that_is_briefly_missing() {
    let w = wrapper(
        "proxy-retry",
        Arc::new(GatedHooks::default()),
        std::process::id(),
    )
    .await;
    let away = w.dir.path().join("away.sock");
    std::fs::rename(&w.delegate.path, &away).expect("hide the socket");
    let mut c = Client::connect(&w.socket).await;
    c.call(1, TASK, "State", &state("x")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::rename(&away, &w.delegate.path).expect("restore the socket");
    let r = c.reply().await;
    assert_eq!((r.stream_id, r.code), (1, ttrpc::Code::OK), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delegate_that_gives_no_pid_is_gone_after_repeated_refusals() {
    // shim_pid 0: the wrapper falls back to probing the socket.
    let mut w = wrapper("proxy-nopid", Arc::new(GatedHooks::default()), 0).await;
    w.delegate
        .wait_for("the wrapper asking its pid", |s| requests(s, "Connect") > 0)
        .await;
    std::fs::remove_file(&w.delegate.path).expect("remove the socket");
    let bound = PROBE_INTERVAL * (REFUSALS_TO_GONE + 5);
    tokio::time::timeout(bound, &mut w.serve)
        .await
        .expect("the wrapper ends once nobody listens")
        .expect("serve");
}
