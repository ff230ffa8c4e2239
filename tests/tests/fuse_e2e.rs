//! End to end: a FUSE volume served by Debian's unmodified `sshfs` inside the guest. The agent
//! opens /dev/fuse and mounts `fuse`; a process in its own mount namespace stands in for the
//! sidecar container (the shim's bind of the socket directory, then meta-fuse-csi-plugin's
//! fuse-starter protocol through `cnfs-fuse-starter`) and runs `sshfs -o directport` against
//! OpenSSH's sftp-server in the test's namespace; another fresh mount namespace stands in for
//! the app container (kata-agent's canonicalize + bind) and reads and writes files that
//! appear on the host. Then the lifecycle: health before and after the daemon answers, a
//! second daemon refused, an agent restart under a running daemon, the daemon killed
//! (ENOTCONN), a sidecar restart getting a fresh mount, and a bounded Unmount.

use std::time::{Duration, Instant};

use cnfs_protocols::agent::{self, Health};
use cnfs_protocols::agent_ttrpc::AgentClient;
use cnfs_testbed::sftp::Sftp;
use cnfs_testbed::vm::ctx;
use cnfs_testbed::{code_of, message_of, mount_request, Artifacts, GuestExec, NetNs, TempDir, Vm};
use ttrpc::Code;

const T: Duration = Duration::from_secs(60);
const PORT: u16 = 2222;
const SOCKET: &str = "/fuse-fd-passing/fuse-csi-ephemeral.sock";

fn fuse_volume(name: &str, sidecar: &str, socket: &str) -> agent::VolumeSpec {
    let mut spec = agent::VolumeSpec {
        name: name.into(),
        ..Default::default()
    };
    spec.set_fuse(agent::FuseSource {
        sidecar: sidecar.into(),
        socket: socket.into(),
        ..Default::default()
    });
    spec
}

/// Starts the sidecar stand-in in the background: a fresh mount namespace with the volume's
/// socket directory bound read-only where the sidecar expects it (what the shim's
/// config.json mount becomes), then fuse-starter execs sshfs on /dev/fd/3, in the foreground
/// (it is the daemon).
async fn start_sidecar(g: &GuestExec, server: &str, dir: &str, log: &str) -> anyhow::Result<()> {
    g.ok(&format!(
        "(unshare -m sh -c 'mkdir -p /fuse-fd-passing && \
           mount --bind \"$(readlink -f /proc/1/root/run/cnfs/fuse/web)\" /fuse-fd-passing && \
           mount -o remount,bind,ro /fuse-fd-passing && \
           exec cnfs-fuse-starter --fd-passing-socket-path {SOCKET} -- \
             sshfs -f -o directport={PORT} {server}:{dir} /dev/fd/3' \
         </dev/null >{log} 2>&1 &)"
    ))
    .await?;
    Ok(())
}

async fn stats(a: &AgentClient, name: &str) -> anyhow::Result<agent::StatsResponse> {
    Ok(a.stats(
        ctx(T),
        &agent::StatsRequest {
            name: name.into(),
            timeout_ms: 2000,
            ..Default::default()
        },
    )
    .await?)
}

/// Polls Stats until `want`, for at most `within`; the last answer either way.
async fn health_becomes(
    a: &AgentClient,
    name: &str,
    want: Health,
    within: Duration,
) -> anyhow::Result<agent::StatsResponse> {
    let until = Instant::now() + within;
    loop {
        let s = stats(a, name).await?;
        if s.health.enum_value() == Ok(want) || Instant::now() > until {
            return Ok(s);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sshfs_serves_a_fuse_volume_from_the_sidecar_and_apps_reach_it() -> anyhow::Result<()> {
    let art = Artifacts::locate()?;
    let dir = TempDir::new("fuse")?;
    let ns = NetNs::create()?;
    let served = dir.path().join("served");
    std::fs::create_dir_all(&served)?;
    let _sftp = Sftp::start(&ns, &served, PORT)?;
    let vm = Vm::boot(&art, &ns, dir.path()).await?;
    let g = &vm.exec;
    let a = vm.agent().await?;
    let server = ns.host_ip.clone();
    let served_path = served.display().to_string();

    // Refused before anything is made: the socket path is checked by field.
    let e = a
        .mount(
            ctx(T),
            &mount_request(fuse_volume("bad", "sshfs", "/fuse.sock"), 0),
        )
        .await
        .expect_err("a socket at the root");
    assert_eq!(code_of(&e), Code::INVALID_ARGUMENT, "{e:?}");
    assert!(
        message_of(&e).starts_with("volume.fuse.socket: "),
        "{}",
        message_of(&e)
    );
    let e = a
        .mount(ctx(T), &{
            let mut r = mount_request(fuse_volume("bad", "sshfs", ""), 0);
            r.volume
                .mut_or_insert_default()
                .options
                .insert("fd".into(), "0".into());
            r
        })
        .await
        .expect_err("fd= is the agent's");
    assert_eq!(code_of(&e), Code::INVALID_ARGUMENT);
    assert!(message_of(&e).starts_with("volume.options.fd: "), "{e:?}");
    // A daemon user other than root without allow_other: kata-agent could not reach it.
    let e = a
        .mount(ctx(T), &{
            let mut r = mount_request(fuse_volume("bad", "sshfs", ""), 0);
            let o = &mut r.volume.mut_or_insert_default().options;
            o.insert("uid".into(), "1000".into());
            o.insert("gid".into(), "1000".into());
            r
        })
        .await
        .expect_err("uid 1000 without allow_other");
    assert_eq!(code_of(&e), Code::INVALID_ARGUMENT);
    assert!(message_of(&e).starts_with("volume.options.uid: "), "{e:?}");
    assert!(!g.ok("cat /proc/mounts").await?.contains("fuse"));
    assert_eq!(
        g.ok("ls /run/cnfs/fuse 2>/dev/null | wc -l").await?.trim(),
        "0"
    );

    // Mount: the kernel's mount is there at once; nobody serves it yet.
    let done = a
        .mount(ctx(T), &mount_request(fuse_volume("web", "sshfs", ""), 0))
        .await?;
    assert_eq!(done.mount_point, "/run/cnfs/volumes/web");
    let mounts = g.ok("cat /proc/mounts").await?;
    let line = mounts
        .lines()
        .find(|l| l.contains(" /run/cnfs/volumes/web "))
        .unwrap_or_default()
        .to_string();
    assert!(
        line.starts_with("cnfs-fuse:sshfs /run/cnfs/volumes/web fuse "),
        "{mounts}"
    );
    for opt in [
        "nosuid",
        "nodev",
        "user_id=0",
        "group_id=0",
        "default_permissions",
    ] {
        assert!(line.contains(opt), "{opt} missing: {line}");
    }
    assert!(
        !line.contains("allow_other"),
        "allow_other was not asked for: {line}"
    );
    assert_eq!(
        g.ok("stat -c %F:%a /run/cnfs/fuse/web/fuse-csi-ephemeral.sock")
            .await?
            .trim(),
        "socket:666"
    );
    let s = stats(&a, "web").await?;
    assert_eq!(s.health.enum_value(), Ok(Health::NOT_READY), "{s:?}");
    assert!(
        s.health_detail.contains(
            "waiting for container sshfs to connect to /fuse-fd-passing/fuse-csi-ephemeral.sock"
        ),
        "{}",
        s.health_detail
    );

    // An app container created before its sidecar waits: kata-agent stats a bind mount's
    // source before it binds (rustjail `mount_from`: `src.is_dir()`), and a FUSE root's
    // attributes come from the daemon. busybox's mount does the same here. Once the daemon
    // serves, the bind and the read complete.
    std::fs::write(served.join("from-host.txt"), "written on the server\n")?;
    g.ok("(unshare -m sh -c 'mkdir -p /tmp/early && \
          mount --bind \"$(readlink -f /proc/1/root/run/cnfs/volumes/web)\" /tmp/early && \
          echo bound >/tmp/early.log && cat /tmp/early/from-host.txt >>/tmp/early.log 2>&1' \
          </dev/null >/dev/null 2>&1 &)")
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        g.ok("cat /tmp/early.log 2>/dev/null; true").await?,
        "",
        "the early app's bind should wait for the daemon"
    );

    // The sidecar takes the descriptor; sshfs answers; the volume is healthy.
    start_sidecar(g, &server, &served_path, "/tmp/sidecar-1.log").await?;
    let s = health_becomes(&a, "web", Health::HEALTHY, Duration::from_secs(30)).await?;
    assert_eq!(
        s.health.enum_value(),
        Ok(Health::HEALTHY),
        "{s:?}\nsidecar: {}",
        g.ok("cat /tmp/sidecar-1.log").await?
    );
    assert!(g
        .ok("cat /tmp/sidecar-1.log")
        .await?
        .contains("received fd for volume web"));
    let until = Instant::now() + Duration::from_secs(10);
    while g
        .ok("cat /tmp/early.log 2>/dev/null; true")
        .await?
        .lines()
        .count()
        < 2
        && Instant::now() < until
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        g.ok("cat /tmp/early.log").await?,
        "bound\nwritten on the server\n",
        "the early app's bind and read complete once the daemon serves"
    );
    assert_eq!(
        g.ok("cat /tmp/early.log").await?,
        "bound\nwritten on the server\n",
        "the early app's read completes once the daemon serves"
    );
    // The agent kept no copy of the descriptor: only sshfs holds /dev/fuse.
    let holders = g
        .ok("for p in /proc/[0-9]*; do ls -l $p/fd 2>/dev/null | grep -q /dev/fuse && cat $p/comm; done; true")
        .await?;
    assert_eq!(
        holders.trim(),
        "sshfs",
        "processes holding /dev/fuse: {holders}"
    );

    // An app container: a fresh mount namespace, kata-agent's canonicalize + bind.
    let out = g
        .ok(
            "unshare -m sh -c 'src=$(readlink -f /proc/1/root/run/cnfs/volumes/web) && \
             mkdir -p /tmp/app && mount --bind \"$src\" /tmp/app && cat /tmp/app/from-host.txt && \
             echo from the app > /tmp/app/from-app.txt && mkdir /tmp/app/sub && ls /tmp/app'",
        )
        .await?;
    assert_eq!(
        out,
        "written on the server\nfrom-app.txt\nfrom-host.txt\nsub\n"
    );
    assert_eq!(
        std::fs::read_to_string(served.join("from-app.txt"))?,
        "from the app\n"
    );
    assert!(served.join("sub").is_dir());

    // A second daemon while the first serves: closed without a descriptor.
    let second = g
        .run(
            "cnfs-fuse-starter --connect-timeout 5 \
             --fd-passing-socket-path /run/cnfs/fuse/web/fuse-csi-ephemeral.sock -- true",
            Duration::from_secs(30),
        )
        .await?;
    assert_eq!(second.code, 2, "{second:?}");
    assert!(
        second.stderr.contains("without sending"),
        "{}",
        second.stderr
    );
    assert_eq!(
        g.ok("cat /run/cnfs/volumes/web/from-host.txt").await?,
        "written on the server\n"
    );

    // The agent restarts under a running daemon: the mount is untouched, the volume known.
    g.ok("kill -9 $(pidof cnfs-agent); /usr/bin/cnfs-agent </dev/null >/dev/console 2>&1 &")
        .await?;
    vm.wait_for_agent(Duration::from_secs(30)).await?;
    let a = vm.agent().await?;
    let list = a.list(ctx(T), &agent::ListRequest::new()).await?;
    assert_eq!(list.volumes.len(), 1, "{list:?}");
    assert_eq!(list.volumes[0].state, "mounted");
    assert_eq!(list.volumes[0].fs_type, "fuse");
    assert!(
        a.mount(ctx(T), &mount_request(fuse_volume("web", "sshfs", ""), 0))
            .await?
            .already_mounted
    );
    let s = health_becomes(&a, "web", Health::HEALTHY, Duration::from_secs(10)).await?;
    assert_eq!(s.health.enum_value(), Ok(Health::HEALTHY), "{s:?}");
    assert_eq!(
        g.ok("cat /run/cnfs/volumes/web/from-host.txt").await?,
        "written on the server\n"
    );

    // A long-lived app keeps a bind of this mount (what a running container has).
    g.ok(
        "(unshare -m sh -c 'mkdir -p /tmp/app && mount --bind /run/cnfs/volumes/web /tmp/app && \
          while true; do cat /tmp/app/from-host.txt >/tmp/app-read.log 2>&1; sleep 0.3; done' \
          </dev/null >/dev/null 2>&1 &)",
    )
    .await?;

    // The daemon hangs (its SFTP server stops answering): a probe's statfs, once sshfs has
    // read it, waits uninterruptibly, so SIGKILL cannot end the probe's child. Stats says
    // UNRESPONSIVE each time and no second child piles up; when the server answers again,
    // the volume is healthy.
    let sessions = |sig: nix::sys::signal::Signal| {
        for (pid, argv) in cnfs_testbed::process::processes() {
            // This test's sessions only (other tests may run sftp-servers).
            if argv.first().map(String::as_str) == Some(cnfs_testbed::sftp::SFTP_SERVER)
                && argv.contains(&served_path)
            {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
            }
        }
    };
    sessions(nix::sys::signal::Signal::SIGSTOP);
    let children = format!(
        "{}; cat /proc/$a/task/*/children | wc -w",
        cnfs_testbed::guest::AGENT_PID_SH
    );
    let before: usize = g.ok(&children).await?.trim().parse()?;
    for round in 0..4 {
        let s = stats(&a, "web").await?;
        assert_eq!(
            s.health.enum_value(),
            Ok(Health::UNRESPONSIVE),
            "round {round}: {s:?}"
        );
    }
    let during: usize = g.ok(&children).await?.trim().parse()?;
    assert!(
        during <= before + 1,
        "children of the agent: {before} before, {during} during"
    );
    sessions(nix::sys::signal::Signal::SIGCONT);
    let s = health_becomes(&a, "web", Health::HEALTHY, Duration::from_secs(20)).await?;
    assert_eq!(s.health.enum_value(), Ok(Health::HEALTHY), "{s:?}");

    // The daemon dies: the volume reports it, nothing hangs.
    g.ok("kill -9 $(pidof sshfs)").await?;
    let s = health_becomes(&a, "web", Health::ERROR, Duration::from_secs(10)).await?;
    assert_eq!(s.health.enum_value(), Ok(Health::ERROR), "{s:?}");
    assert!(
        // ENOTCONN, or ECONNABORTED for a probe in flight when the daemon died.
        (s.health_detail.contains("not connected") || s.health_detail.contains("connection abort"))
            && s.health_detail.contains("is gone"),
        "{}",
        s.health_detail
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        g.ok("cat /tmp/app-read.log")
            .await?
            .contains("not connected"),
        "the app's copy should fail with ENOTCONN"
    );

    // The sidecar restarts (meta-fuse's starter removed the socket file; the agent put it
    // back): a fresh mount and descriptor; new binds reach the server again. The long-lived
    // app's copy is the dead mount and stays so.
    g.ok("rm -f /run/cnfs/fuse/web/fuse-csi-ephemeral.sock")
        .await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    start_sidecar(g, &server, &served_path, "/tmp/sidecar-2.log").await?;
    let s = health_becomes(&a, "web", Health::HEALTHY, Duration::from_secs(30)).await?;
    assert_eq!(
        s.health.enum_value(),
        Ok(Health::HEALTHY),
        "{s:?}\nsidecar: {}",
        g.ok("cat /tmp/sidecar-2.log").await?
    );
    assert_eq!(
        g.ok("cat /run/cnfs/volumes/web/from-app.txt").await?,
        "from the app\n"
    );
    assert!(g
        .ok("cat /tmp/app-read.log")
        .await?
        .contains("not connected"));
    // A container started now binds the fresh mount.
    g.ok(
        "(unshare -m sh -c 'mkdir -p /tmp/app2 && mount --bind /run/cnfs/volumes/web /tmp/app2 && \
          exec sleep 600' </dev/null >/dev/null 2>&1 &)",
    )
    .await?;

    // Unmount: refused while the app holds its copy, then forced and bounded even with the
    // daemon dead again; nothing left.
    let e = a
        .unmount(
            ctx(T),
            &agent::UnmountRequest {
                name: "web".into(),
                ..Default::default()
            },
        )
        .await
        .expect_err("held by the app");
    assert_eq!(code_of(&e), Code::FAILED_PRECONDITION, "{e:?}");
    g.ok("kill -9 $(pidof sshfs)").await?;
    let start = Instant::now();
    let u = a
        .unmount(
            ctx(T),
            &agent::UnmountRequest {
                name: "web".into(),
                timeout_ms: 10_000,
                force: true,
                ..Default::default()
            },
        )
        .await?;
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );
    assert!(!u.held_by.is_empty(), "{u:?}");
    let mounts = g.ok("cat /proc/mounts").await?;
    assert!(!mounts.contains("/run/cnfs/volumes/web"), "{mounts}");
    assert_eq!(
        g.ok("ls /run/cnfs/fuse 2>/dev/null | wc -l").await?.trim(),
        "0"
    );
    let l = a.list(ctx(T), &agent::ListRequest::new()).await?;
    assert!(l.volumes.is_empty(), "{l:?}");
    g.ok("pkill -f app-read.log; pkill sleep; true").await?;
    Ok(())
}
