//! The tool runner, run as the real `cnfs-agent` binary started as `cnfs-tool-runner`, with
//! shell-script fakes of cryptsetup and mke2fs (no loader in the fake tools dir, so the runner
//! execs `bin/<name>` directly) that record their argv, environment and stdin.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cnfs_agent::error::AgentError;
use cnfs_agent::tools::{Command, Exit, ToolClient};

struct Bed {
    _dir: tempfile::TempDir,
    tools: PathBuf,
    record: PathBuf,
    sysfs: PathBuf,
}

fn bed() -> Bed {
    let dir = tempfile::tempdir().expect("temp dir");
    let (tools, record, sysfs) = (
        dir.path().join("tools"),
        dir.path().join("record"),
        dir.path().join("sys"),
    );
    for d in [&tools.join("bin"), &record, &sysfs] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    Bed {
        _dir: dir,
        tools,
        record,
        sysfs,
    }
}

impl Bed {
    /// `bin/<tool>`: a shell script, `$R` its record directory. PATH is /nonexistent for the
    /// tools, so the scripts name every program by its full path.
    fn fake(&self, tool: &str, body: &str) {
        let path = self.tools.join("bin").join(tool);
        let script = format!("#!/bin/sh\nR={}\n{body}\n", self.record.display());
        std::fs::write(&path, script).expect("write fake");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    /// Makes the fake sysfs say that /dev/loop<n> is backed by `file`.
    fn loop_backed_by(&self, n: u32, file: &str) {
        let dir = self.sysfs.join(format!("block/loop{n}/loop"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("backing_file"), format!("{file}\n")).expect("backing_file");
    }

    /// Makes the fake sysfs say that dm-<dm> is `cnfs-<name>` on /dev/loop<n> alone.
    fn mapping_on(&self, dm: u32, name: &str, n: u32) {
        let dir = self.sysfs.join(format!("block/dm-{dm}"));
        std::fs::create_dir_all(dir.join("dm")).expect("mkdir");
        std::fs::create_dir_all(dir.join(format!("slaves/loop{n}"))).expect("mkdir");
        std::fs::write(dir.join("dm/name"), format!("cnfs-{name}\n")).expect("dm name");
    }

    fn client(&self) -> ToolClient {
        ToolClient::spawn_with(
            Path::new(env!("CARGO_BIN_EXE_cnfs-agent")),
            &self.tools,
            false,
            Some(&self.sysfs),
        )
        .expect("runner starts")
    }

    fn recorded(&self, name: &str) -> Option<Vec<u8>> {
        std::fs::read(self.record.join(name)).ok()
    }

    /// Waits for the pid a fake wrote to `name`.
    async fn pid(&self, name: &str) -> i32 {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let text = self.recorded(name).unwrap_or_default();
            if let Ok(pid) = String::from_utf8_lossy(&text).trim().parse() {
                return pid;
            }
            assert!(Instant::now() < until, "the fake never wrote {name}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Waits up to 5 s for process `pid` to be gone (killed and reaped).
async fn assert_gone(pid: i32) {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let until = Instant::now() + Duration::from_secs(5);
    while proc.exists() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!proc.exists(), "tool {pid} is still there");
}

const TEMP: &str = "/run/cnfs/backing/data/vol/.cnfs-volume.luks2.new-0123456789abcdef";

/// A fake that records `<pid>`, then sleeps far past any deadline in these tests.
const SLEEPER: &str = "echo $$ > \"$R/pid.$$\"\necho $$ > \"$R/pid\"\nexec /bin/sleep 60";

fn version() -> Command {
    Command::Version
}

#[tokio::test]
async fn the_key_goes_to_stdin_and_never_to_argv_or_env() {
    let bed = bed();
    bed.fake(
        "cryptsetup",
        "printf '%s\\n' \"$@\" > \"$R/argv\"\n/usr/bin/env > \"$R/env\"\n/bin/cat > \"$R/stdin\"",
    );
    bed.loop_backed_by(7, TEMP);
    let client = bed.client();
    let key = b"correct-horse-battery-staple\n";
    let cmd = Command::LuksFormat {
        device: 7,
        label_name: "data".into(),
    };
    let outcome = client
        .call(cmd.clone(), Some(key), Duration::from_secs(10))
        .await
        .expect("runs");
    assert_eq!(outcome.exit, Exit::Code(0), "{outcome:?}");

    assert_eq!(bed.recorded("stdin").expect("stdin recorded"), key);
    let argv = String::from_utf8(bed.recorded("argv").expect("argv recorded")).expect("utf-8");
    let env = String::from_utf8(bed.recorded("env").expect("env recorded")).expect("utf-8");
    let want: Vec<String> = cmd.args();
    assert_eq!(argv.lines().collect::<Vec<_>>(), want, "argv");
    assert!(argv.contains("--key-file=-") && argv.ends_with("/dev/loop7\n"));
    for (what, text) in [("argv", &argv), ("env", &env)] {
        assert!(
            !text.contains("correct-horse"),
            "the key is in the tool's {what}: {text}"
        );
    }
    let mut vars: Vec<&str> = env
        .lines()
        // The shell adds its working directory by itself.
        .filter(|l| !l.starts_with("PWD="))
        .collect();
    vars.sort_unstable();
    assert_eq!(vars, ["DM_DISABLE_UDEV=1", "LC_ALL=C", "PATH=/nonexistent"]);
}

#[tokio::test]
async fn stderr_echoing_the_key_is_redacted() {
    let bed = bed();
    bed.fake(
        "cryptsetup",
        "/bin/cat > \"$R/key\"\n\
         printf 'No key available with this passphrase: ' >&2\n\
         /bin/cat \"$R/key\" >&2\n\
         printf ' (tried %s)\\n' \"$(/bin/cat \"$R/key\")\" >&2\n\
         printf 'bell\\007\\n' >&2\n\
         exit 2",
    );
    let client = bed.client();
    let key = b"hunter2-hunter2";
    let outcome = client
        .call(
            Command::LuksOpen {
                device: 3,
                name: "data".into(),
                read_only: false,
            },
            Some(key),
            Duration::from_secs(10),
        )
        .await
        .expect("runs");
    assert_eq!(outcome.exit, Exit::Code(2));
    assert_eq!(
        outcome.stderr,
        "No key available with this passphrase: <redacted> (tried <redacted>)\nbell\\u{7}\n"
    );
    assert!(!outcome.stderr.contains("hunter2"));
}

#[tokio::test]
async fn format_is_refused_for_a_loop_whose_backing_file_is_not_a_temp() {
    let bed = bed();
    bed.fake("cryptsetup", "/bin/cat > /dev/null\necho ran >> \"$R/ran\"");
    let deleted = format!("{TEMP} (deleted)");
    // (loop, its backing file or none, what the refusal names)
    let rows: &[(u32, Option<&str>, &str)] = &[
        (
            1,
            Some("/run/cnfs/backing/data/vol/cnfs-volume.luks2"),
            "cnfs-volume.luks2",
        ),
        (2, Some(&deleted), "(deleted)"),
        (
            3,
            Some("/run/cnfs/backing/data/vol/.cnfs-volume.luks2.new-0123456789ABCDEF"),
            "ABCDEF",
        ),
        (4, Some("/var/lib/images/disk.img"), "disk.img"),
        (5, None, "no backing file"),
    ];
    for (n, file, _) in rows {
        if let Some(file) = file {
            bed.loop_backed_by(*n, file);
        }
    }
    let client = bed.client();
    for (n, file, names) in rows {
        let got = client
            .call(
                Command::LuksFormat {
                    device: *n,
                    label_name: "data".into(),
                },
                Some(b"key"),
                Duration::from_secs(10),
            )
            .await;
        match got {
            Err(AgentError::FailedPrecondition(m)) => {
                assert!(
                    m.contains("luks_format.device")
                        && m.contains(&format!("loop{n}"))
                        && m.contains(names),
                    "loop{n} ({file:?}): {m}"
                );
            }
            other => panic!("loop{n} ({file:?}) was not refused: {other:?}"),
        }
    }
    assert_eq!(
        bed.recorded("ran"),
        None,
        "cryptsetup ran for a refused format"
    );
    // The same request on a temp file's loop runs.
    bed.loop_backed_by(6, TEMP);
    let ok = client
        .call(
            Command::LuksFormat {
                device: 6,
                label_name: "data".into(),
            },
            Some(b"key"),
            Duration::from_secs(10),
        )
        .await
        .expect("runs");
    assert_eq!(ok.exit, Exit::Code(0));
    assert_eq!(bed.recorded("ran").as_deref(), Some(&b"ran\n"[..]));
}

#[tokio::test]
async fn a_tool_past_its_deadline_is_killed() {
    let bed = bed();
    bed.fake("cryptsetup", SLEEPER);
    let client = bed.client();
    let start = Instant::now();
    let outcome = client
        .call(version(), None, Duration::from_millis(500))
        .await
        .expect("answers");
    assert_eq!(outcome.exit, Exit::TimedOut);
    assert!(
        outcome.duration >= Duration::from_millis(500),
        "{outcome:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert_gone(bed.pid("pid").await).await;
}

#[tokio::test]
async fn the_caller_going_away_kills_the_tool() {
    let bed = bed();
    bed.fake("cryptsetup", SLEEPER);
    let client = bed.client();
    let pid = {
        let call = client.call(version(), None, Duration::from_secs(60));
        tokio::select! {
            r = call => panic!("a 60 s sleeper answered: {r:?}"),
            pid = bed.pid("pid") => pid,
        }
        // The call's future is dropped here.
    };
    // It sleeps for 60 s: gone within 5 s means killed.
    assert_gone(pid).await;
}

#[tokio::test]
async fn a_seventeenth_concurrent_request_is_refused_busy() {
    let bed = bed();
    bed.fake("cryptsetup", SLEEPER);
    let client = bed.client();
    let calls: Vec<_> = (0..16)
        .map(|_| {
            let c = client.clone();
            tokio::spawn(async move { c.call(version(), None, Duration::from_secs(60)).await })
        })
        .collect();
    // All 16 tools are running.
    let until = Instant::now() + Duration::from_secs(20);
    let pids = loop {
        let pids: Vec<i32> = std::fs::read_dir(&bed.record)
            .expect("record dir")
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                name.strip_prefix("pid.")?.parse().ok()
            })
            .collect();
        if pids.len() == 16 {
            break pids;
        }
        assert!(Instant::now() < until, "only {} tools started", pids.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let start = Instant::now();
    match client.call(version(), None, Duration::from_secs(60)).await {
        Err(AgentError::Busy(m)) => assert!(m.contains("16"), "{m}"),
        other => panic!("the 17th request was not refused busy: {other:?}"),
    }
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "busy was not immediate"
    );
    for c in &calls {
        c.abort();
    }
    for pid in pids {
        assert_gone(pid).await;
    }
    // The places are free again: the next request runs (to its deadline).
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        match client
            .call(version(), None, Duration::from_millis(200))
            .await
        {
            Ok(o) => {
                assert_eq!(o.exit, Exit::TimedOut);
                break;
            }
            Err(AgentError::Busy(_)) if Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("after the 16 went: {e:?}"),
        }
    }
}

#[tokio::test]
async fn missing_tools_are_named() {
    let bed = bed();
    let client = bed.client();
    let bin = bed.tools.join("bin");
    let why = client.missing().expect("nothing installed");
    assert!(
        why.contains(&format!("{}/cryptsetup: not found", bin.display()))
            && why.contains("cnfs-rootfs-builder")
            && why.contains("--luks2-tools"),
        "{why}"
    );
    bed.fake("cryptsetup", "exit 0");
    let why = client.missing().expect("mke2fs missing");
    assert!(
        why.contains(&format!("{}/mke2fs: not found", bin.display())),
        "{why}"
    );
    bed.fake("mke2fs", "exit 0");
    assert_eq!(client.missing(), None);

    let off = ToolClient::disabled("encryption=luks2 is turned off (--no-luks2)");
    assert_eq!(
        off.missing().as_deref(),
        Some("encryption=luks2 is turned off (--no-luks2)")
    );
    match off.call(version(), None, Duration::from_secs(1)).await {
        Err(AgentError::FailedPrecondition(m)) => assert!(m.contains("--no-luks2"), "{m}"),
        other => panic!("a disabled client ran a tool: {other:?}"),
    }
}

#[tokio::test]
async fn names_that_are_not_dns_labels_are_refused() {
    let bed = bed();
    for tool in ["cryptsetup", "mke2fs"] {
        bed.fake(tool, "/bin/cat > /dev/null\necho ran >> \"$R/ran\"");
    }
    bed.loop_backed_by(1, TEMP);
    let client = bed.client();
    let long = "a".repeat(64);
    let open = |name: &str| Command::LuksOpen {
        device: 1,
        name: name.into(),
        read_only: false,
    };
    let close = |name: &str| Command::LuksClose {
        name: name.into(),
        deferred: false,
    };
    let mkfs = |name: &str| Command::Mkfs {
        name: name.into(),
        uid: 0,
        gid: 0,
    };
    // (command, sends a key, field, words of the reason)
    let rows: Vec<(Command, bool, &str, &str)> = vec![
        (open("Data"), true, "luks_open.name", "not a DNS label"),
        (open("-data"), true, "luks_open.name", "not a DNS label"),
        (open("data "), true, "luks_open.name", "not a DNS label"),
        (close("../etc"), false, "luks_close.name", "not a DNS label"),
        (close(&long), false, "luks_close.name", "at most 63"),
        (mkfs(""), false, "mkfs.name", "is required"),
        (mkfs("a/b"), false, "mkfs.name", "not a DNS label"),
        (
            Command::LuksFormat {
                device: 1,
                label_name: "data\n--force".into(),
            },
            true,
            "luks_format.label_name",
            "not a DNS label",
        ),
    ];
    for (cmd, with_key, field, reason) in rows {
        let key = with_key.then_some(&b"key"[..]);
        match client.call(cmd.clone(), key, Duration::from_secs(10)).await {
            Err(AgentError::Invalid(e)) => {
                assert_eq!(e.field, field, "{cmd:?}");
                assert!(e.reason.contains(reason), "{cmd:?}: {}", e.reason);
            }
            other => panic!("{cmd:?} was not refused: {other:?}"),
        }
    }
    assert_eq!(bed.recorded("ran"), None, "a tool ran for a refused name");
    let ok = client
        .call(close("data"), None, Duration::from_secs(10))
        .await
        .expect("a DNS label runs");
    assert_eq!(ok.exit, Exit::Code(0));
    assert_eq!(bed.recorded("ran").as_deref(), Some(&b"ran\n"[..]));
}

#[tokio::test]
async fn tools_run_with_only_sys_admin_and_mknod_and_under_the_runner_filter() {
    let bed = bed();
    bed.fake("mke2fs", "/bin/cat /proc/$$/status > \"$R/status\"");
    bed.loop_backed_by(
        4,
        "/run/cnfs/backing/data/.cnfs-volume.luks2.new-0123456789abcdef",
    );
    bed.mapping_on(1, "data", 4);
    let client = bed.client();
    let outcome = client
        .call(
            Command::Mkfs {
                name: "data".into(),
                uid: 1000,
                gid: 1000,
            },
            None,
            Duration::from_secs(10),
        )
        .await
        .expect("runs");
    assert_eq!(outcome.exit, Exit::Code(0), "{outcome:?}");
    let status = String::from_utf8(bed.recorded("status").expect("status")).expect("utf-8");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_default()
            .to_string()
    };
    // CAP_MKNOD is bit 27, CAP_SYS_ADMIN bit 21.
    let two = format!("{:016x}", (1u64 << 27) | (1u64 << 21));
    for set in ["CapBnd:", "CapPrm:", "CapEff:"] {
        assert_eq!(field(set), two, "{set} in\n{status}");
    }
    assert_eq!(field("CapInh:"), "0000000000000000");
    // 2: a seccomp filter is installed.
    assert_eq!(field("Seccomp:"), "2");
}

#[test]
fn a_client_under_the_agents_filter_reaches_the_runner() {
    let bed = bed();
    bed.fake("cryptsetup", "echo 'cryptsetup 2.6.1 flags: UDEV'");
    bed.fake("mke2fs", "exit 0");
    let client = bed.client();
    let prog = cnfs_agent::seccomp::program().expect("compiles");
    // The agent's allowlist on one thread of this test (seccomp without TSYNC is per thread):
    // what the agent does after start-up, the client must be able to do under it.
    let (missing, outcome) = std::thread::spawn(move || {
        seccompiler::apply_filter(&prog).expect("filter on this thread");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let missing = client.missing();
        let outcome = rt.block_on(client.call(Command::Version, None, Duration::from_secs(10)));
        (missing, outcome)
    })
    .join()
    .expect("thread");
    assert_eq!(missing, None);
    let outcome = outcome.expect("answers");
    assert_eq!(outcome.exit, Exit::Code(0));
    // `--version` answers on stdout, which comes back with stderr.
    assert_eq!(outcome.stderr, "cryptsetup 2.6.1 flags: UDEV\n");
}

#[tokio::test]
async fn a_descriptor_leaked_to_the_agent_does_not_reach_the_tools() {
    let bed = bed();
    bed.fake(
        "cryptsetup",
        "if [ -e /proc/$$/fd/200 ]; then echo open > \"$R/fd200\"; fi\necho ran > \"$R/ran\"",
    );
    // Fd 200 without close-on-exec, as a careless parent of the agent would leave it.
    let file = std::fs::File::open("/dev/null").expect("open");
    let leaked = nix::unistd::dup2(std::os::fd::AsRawFd::as_raw_fd(&file), 200).expect("dup2");
    let client = bed.client();
    nix::unistd::close(leaked).expect("close");
    let outcome = client
        .call(Command::Version, None, Duration::from_secs(10))
        .await
        .expect("runs");
    assert_eq!(outcome.exit, Exit::Code(0), "{outcome:?}");
    assert!(bed.recorded("ran").is_some(), "the fake did not run");
    assert_eq!(bed.recorded("fd200"), None, "fd 200 reached the tool");
}

#[tokio::test]
async fn mkfs_is_refused_on_a_mapping_over_a_published_container() {
    let bed = bed();
    bed.fake("mke2fs", "/bin/echo ran > \"$R/ran\"");
    bed.loop_backed_by(2, "/run/cnfs/backing/data/cnfs-volume.luks2");
    bed.mapping_on(0, "data", 2);
    let client = bed.client();
    let mkfs = Command::Mkfs {
        name: "data".into(),
        uid: 0,
        gid: 0,
    };
    match client.call(mkfs, None, Duration::from_secs(10)).await {
        Err(AgentError::FailedPrecondition(m)) => {
            assert!(m.starts_with("mkfs.name: cnfs-data "), "{m}");
            assert!(m.contains("not a new container's temp file"), "{m}");
        }
        other => panic!("mkfs over a published container was not refused: {other:?}"),
    }
    assert_eq!(bed.recorded("ran"), None, "mke2fs ran");
}

/// A gocryptfs fake: records its argv, stdin, capabilities, session and what its FUSE
/// descriptor (the last argument, `/dev/fd/N`) points at, then exits with the code in
/// `$R/exit` once that file appears (the test's stand-in for an unmount).
const GOCRYPTFS_FAKE: &str = "printf '%s\\n' \"$@\" > \"$R/argv\"
/bin/cat > \"$R/stdin\"
/bin/cat /proc/$$/status > \"$R/status\"
/bin/cut -d' ' -f6 /proc/$$/stat > \"$R/session\"
for a in \"$@\"; do last=\"$a\"; done
/bin/readlink \"/proc/$$/fd/${last#/dev/fd/}\" > \"$R/fd\"
echo $$ > \"$R/pid\"
while [ ! -e \"$R/exit\" ]; do /bin/sleep 0.05; done
exit $(/bin/cat \"$R/exit\")";

fn fuse_device() -> std::os::fd::OwnedFd {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .expect("this test needs /dev/fuse")
        .into()
}

fn serve(name: &str) -> Command {
    Command::GocryptfsServe {
        name: name.into(),
        read_only: false,
    }
}

#[tokio::test]
async fn a_daemon_gets_its_key_its_descriptor_and_its_own_capabilities_and_outlives_the_runner() {
    let bed = bed();
    bed.fake("gocryptfs", GOCRYPTFS_FAKE);
    let client = bed.client();
    let key = b"shared \x01 key";
    let daemon = client
        .start_daemon(
            serve("data"),
            Some(key),
            &fuse_device(),
            Duration::from_secs(10),
        )
        .await
        .expect("started");
    let pid = bed.pid("pid").await;
    assert_eq!(daemon.pid as i32, pid);
    let argv = String::from_utf8(bed.recorded("argv").expect("argv")).expect("utf-8");
    let args: Vec<&str> = argv.lines().collect();
    assert_eq!(
        &args[..7],
        &[
            "-fg",
            "-q",
            "-allow_other",
            "-sharedstorage",
            "-nosyslog",
            "--",
            "/run/cnfs/backing/data/cnfs-volume.gocryptfs"
        ],
        "{argv}"
    );
    assert!(args[7].starts_with("/dev/fd/"), "{argv}");
    assert_eq!(bed.recorded("stdin").as_deref(), Some(&key[..]));
    assert_eq!(
        String::from_utf8_lossy(&bed.recorded("fd").expect("fd")).trim(),
        "/dev/fuse"
    );
    // Its own session (setsid): not in the runner's group, not killed with it.
    assert_eq!(
        String::from_utf8_lossy(&bed.recorded("session").expect("session")).trim(),
        pid.to_string()
    );
    // CAP_CHOWN 0, DAC_OVERRIDE 1, DAC_READ_SEARCH 2, FOWNER 3, FSETID 4, SETGID 6,
    // SETUID 7; not SYS_ADMIN (21), MKNOD (27) or SETPCAP (8), which the runner holds.
    // Root's exec gives permitted = bounding | inheritable: the runner's empty inheritable
    // set is what makes the bounding set the whole story.
    let status = String::from_utf8(bed.recorded("status").expect("status")).expect("utf-8");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_default()
            .to_string()
    };
    for set in ["CapBnd:", "CapPrm:", "CapEff:"] {
        assert_eq!(
            field(set),
            format!("{:016x}", 0b1101_1111u64),
            "{set} in\n{status}"
        );
    }
    for set in ["CapInh:", "CapAmb:"] {
        assert_eq!(field(set), "0000000000000000", "{set} in\n{status}");
    }

    // The runner goes (the agent's restart); the daemon serves on.
    drop(client);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "the daemon died with the runner"
    );
    std::fs::write(bed.record.join("exit"), "0").expect("stop it");
    assert_gone(pid).await;
}

#[tokio::test]
async fn a_daemon_that_exits_reports_its_code_to_a_caller_still_listening() {
    let bed = bed();
    bed.fake("gocryptfs", GOCRYPTFS_FAKE);
    std::fs::write(bed.record.join("exit"), "12").expect("exit code");
    let client = bed.client();
    let daemon = client
        .start_daemon(
            serve("data"),
            Some(b"wrong"),
            &fuse_device(),
            Duration::from_secs(10),
        )
        .await
        .expect("started");
    assert_eq!(
        daemon.exited(Duration::from_secs(10)).await,
        Some(Exit::Code(12))
    );
}

#[tokio::test]
async fn a_daemon_is_refused_without_a_fuse_descriptor_or_with_another_one() {
    let bed = bed();
    bed.fake("gocryptfs", GOCRYPTFS_FAKE);
    let client = bed.client();
    match client
        .call(serve("data"), Some(b"k"), Duration::from_secs(5))
        .await
    {
        Err(AgentError::Invalid(e)) => {
            assert_eq!(e.field, "gocryptfs_serve.fuse_fd");
            assert!(e.reason.contains("is required"), "{e:?}");
        }
        other => panic!("served without a descriptor: {other:?}"),
    }
    let null: std::os::fd::OwnedFd = std::fs::File::open("/dev/null").expect("null").into();
    match client
        .start_daemon(serve("data"), Some(b"k"), &null, Duration::from_secs(5))
        .await
    {
        Err(AgentError::FailedPrecondition(m)) => {
            assert!(m.contains("is not /dev/fuse"), "{m}")
        }
        Err(other) => panic!("wrong refusal: {other:?}"),
        Ok(d) => panic!("served /dev/null (pid {})", d.pid),
    }
    assert!(bed.recorded("argv").is_none(), "the fake ran");
}

#[tokio::test]
async fn gocryptfs_init_runs_only_in_a_temp_directory_of_a_valid_volume() {
    let bed = bed();
    bed.fake(
        "gocryptfs",
        "printf '%s\\n' \"$@\" > \"$R/argv\"\n/bin/cat > \"$R/stdin\"",
    );
    let client = bed.client();
    let out = client
        .call(
            Command::GocryptfsInit {
                name: "data".into(),
                temp: "0123456789abcdef".into(),
            },
            Some(b"k3y"),
            Duration::from_secs(10),
        )
        .await
        .expect("runs");
    assert_eq!(out.exit, Exit::Code(0), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&bed.recorded("argv").expect("argv")),
        "-init\n-q\n--\n/run/cnfs/backing/data/.cnfs-volume.gocryptfs.new-0123456789abcdef\n"
    );
    assert_eq!(bed.recorded("stdin").as_deref(), Some(&b"k3y"[..]));
    // The runner's own guard: a key gocryptfs would cut at its newline is refused.
    match client
        .call(
            Command::GocryptfsInit {
                name: "data".into(),
                temp: "0123456789abcdef".into(),
            },
            Some(b"first\nsecond"),
            Duration::from_secs(5),
        )
        .await
    {
        Err(AgentError::Invalid(e)) => {
            assert_eq!(e.field, "gocryptfs_init.key");
            assert!(!e.reason.contains("second"), "{e:?}");
        }
        other => panic!("a two-line key was run: {other:?}"),
    }
    for temp in ["../../etc", "0123456789ABCDEF", "0123"] {
        match client
            .call(
                Command::GocryptfsInit {
                    name: "data".into(),
                    temp: temp.into(),
                },
                Some(b"k"),
                Duration::from_secs(5),
            )
            .await
        {
            Err(AgentError::Invalid(e)) => assert_eq!(e.field, "gocryptfs_init.temp", "{e:?}"),
            other => panic!("{temp:?} accepted: {other:?}"),
        }
    }
}

/// The pids of lock holders of `container` (argv[0] `cnfs-lock-holder`, then the path).
fn holders_of(container: &Path) -> Vec<i32> {
    let want = format!("cnfs-lock-holder\0{}\0", container.display());
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<i32>().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            cmdline.starts_with(want.as_bytes()).then_some(pid)
        })
        .collect()
}

/// The SMB lock holder (the agent's own binary, started by the runner): it reports a
/// missing container, holds an existing one's lock until it is killed (a second holder, as
/// a second client would, meets it, for writing and for reading), outlives the runner, and
/// takes nothing but a pipe to report on.
#[tokio::test]
async fn a_lock_holder_keeps_its_lock_until_killed_and_a_second_holder_meets_it() {
    use cnfs_agent::tools::holder::Report;
    use nix::errno::Errno;
    let bed = bed();
    let client = bed.client();
    let name = format!("holdtest{}", std::process::id());
    let dir = Path::new("/run/cnfs/backing").join(&name);
    let container = dir.join("cnfs-volume.luks2");
    let _ = std::fs::remove_dir_all(&dir);
    let t = Duration::from_secs(10);
    assert_eq!(
        client.hold_lock(&name, false, t).await.expect("report"),
        Report::Open(Errno::ENOENT)
    );
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(&container, b"container").expect("container");
    assert_eq!(
        client.hold_lock(&name, false, t).await.expect("report"),
        Report::Held
    );
    let first = holders_of(&container);
    assert_eq!(first.len(), 1, "{first:?}");
    for read_only in [false, true] {
        match client.hold_lock(&name, read_only, t).await.expect("report") {
            Report::Lock(Errno::EAGAIN | Errno::EACCES) => {}
            other => panic!("second holder (read_only {read_only}): {other:?}"),
        }
    }
    // A refused holder reports, then exits: a moment later only the first is left.
    let until = Instant::now() + Duration::from_secs(5);
    while holders_of(&container) != first && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(holders_of(&container), first, "a refused holder stayed");

    let null: std::os::fd::OwnedFd = std::fs::File::open("/dev/null").expect("null").into();
    let cmd = Command::HoldLock {
        name: name.clone(),
        read_only: false,
    };
    match client.start_daemon(cmd, None, &null, t).await {
        Err(AgentError::FailedPrecondition(m)) => {
            assert!(m.contains("hold_lock.report_fd: is not a pipe"), "{m}")
        }
        Err(other) => panic!("wrong refusal: {other:?}"),
        Ok(d) => panic!("started a holder on /dev/null (pid {})", d.pid),
    }

    drop(client);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        holders_of(&container),
        first,
        "the holder died with the runner"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    assert_gone(first[0]).await;
    let client = bed.client();
    assert_eq!(
        client.hold_lock(&name, false, t).await.expect("report"),
        Report::Held,
        "the lock went with its holder"
    );
    for pid in holders_of(&container) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        assert_gone(pid).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
