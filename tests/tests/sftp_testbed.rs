//! The test bed's SFTP server (what a guest's `sshfs -o directport=` mounts), on its own
//! inside a network namespace: it speaks SFTP on `ns.host_ip:port` there and nowhere else,
//! `sshfs` from inside the namespace reads and writes the served directory, killed sessions
//! drop their connections while new ones are still served, and drop leaves nothing running.
//! Needs root (network namespaces, FUSE mounts).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cnfs_testbed::process::run;
use cnfs_testbed::sftp::{Sftp, SFTP_SERVER};
use cnfs_testbed::{NetNs, TempDir};
use nix::sched::{setns, CloneFlags};

const PORT: u16 = 2222;
const SSH_FXP_INIT: u8 = 1;
const SSH_FXP_VERSION: u8 = 2;

/// A TCP connection made from inside `ns` (a thread of its own enters it; the socket stays
/// there).
fn connect_in(ns: &NetNs, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let path = format!("/var/run/netns/{}", ns.name);
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path)?;
        setns(&f, CloneFlags::CLONE_NEWNET)?;
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(s)
    })
    .join()
    .expect("connect thread")
}

/// Sends SSH_FXP_INIT (version 3) and returns the reply's packet type and version.
fn sftp_init(s: &mut TcpStream) -> (u8, u32) {
    let mut packet = Vec::new();
    packet.extend_from_slice(&5u32.to_be_bytes());
    packet.push(SSH_FXP_INIT);
    packet.extend_from_slice(&3u32.to_be_bytes());
    s.write_all(&packet).expect("sending INIT");
    let mut head = [0u8; 9];
    s.read_exact(&mut head).expect("reading the reply");
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    // The rest: extension pairs, not looked at.
    let mut rest = vec![0u8; len.saturating_sub(5)];
    s.read_exact(&mut rest).expect("reading the extensions");
    (
        head[4],
        u32::from_be_bytes([head[5], head[6], head[7], head[8]]),
    )
}

/// Pids of running sftp-server processes serving `dir`.
fn servers_of(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    cnfs_testbed::process::processes()
        .into_iter()
        .filter(|(_, argv)| argv.first().map(String::as_str) == Some(SFTP_SERVER))
        .filter(|(_, argv)| argv.contains(&needle))
        .map(|(pid, _)| pid)
        .collect()
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A temp dir with the served directory `export/` in it (the log goes beside it).
fn served() -> (TempDir, std::path::PathBuf) {
    let tmp = TempDir::new("sftp").expect("tmp");
    let export = tmp.path().join("export");
    std::fs::create_dir_all(&export).expect("mkdir");
    (tmp, export)
}

#[test]
fn sftp_server_answers_init_with_version_3_inside_the_namespace() {
    let ns = NetNs::create().expect("netns");
    let (_tmp, export) = served();
    let sftp = Sftp::start(&ns, &export, PORT).expect("sftp");
    assert_eq!(sftp.addr.to_string(), format!("{}:{PORT}", ns.host_ip));
    let mut s = connect_in(&ns, sftp.addr).expect("connect inside the namespace");
    assert_eq!(sftp_init(&mut s), (SSH_FXP_VERSION, 3));
    assert_eq!(sftp.connections(), 1);
    assert_eq!(sftp.live_sessions(), 1);
    wait_for("the session in the log", || {
        std::fs::read_to_string(&sftp.log)
            .unwrap_or_default()
            .contains("session opened")
    });
    assert_eq!(
        sftp.log.parent(),
        export.parent(),
        "the log lands beside the served directory"
    );
}

#[test]
fn sftp_listener_exists_in_the_namespace_only() {
    let ns = NetNs::create().expect("netns");
    let (_tmp, export) = served();
    let sftp = Sftp::start(&ns, &export, PORT).expect("sftp");
    let listening = format!("{}:{PORT}", ns.host_ip);
    let inside = run(ns.command("ss").args(["-Hltn"])).expect("ss in the namespace");
    assert!(inside.contains(&listening), "inside:\n{inside}");
    let outside = run(Command::new("ss").args(["-Hltn"])).expect("ss on the host");
    assert!(!outside.contains(&listening), "outside:\n{outside}");
    drop(sftp);
}

#[test]
fn sshfs_in_the_namespace_writes_and_reads_the_served_directory() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "this test mounts sshfs on the host: needs /dev/fuse"
    );
    let ns = NetNs::create().expect("netns");
    let (tmp, export) = served();
    std::fs::write(export.join("from-host"), "written on the host\n").expect("write");
    let sftp = Sftp::start(&ns, &export, PORT).expect("sftp");
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    // One shell: `ip netns exec` gives every command a private mount namespace, so the mount
    // is visible only to the commands after it in the same one.
    let script = format!(
        "set -e; sshfs -o directport={PORT} {ip}:{export} {mnt}; \
         echo 'written through sshfs' > {mnt}/from-client; cat {mnt}/from-host; \
         fusermount3 -u {mnt}",
        ip = ns.host_ip,
        export = export.display(),
        mnt = mnt.display(),
    );
    let out = run(ns.command("sh").args(["-c", &script])).expect("sshfs session");
    assert_eq!(out, "written on the host\n");
    assert_eq!(
        std::fs::read_to_string(export.join("from-client")).expect("read"),
        "written through sshfs\n"
    );
    assert!(sftp.connections() >= 1);
}

#[test]
fn killed_sessions_drop_their_connections_and_new_ones_are_served() {
    let ns = NetNs::create().expect("netns");
    let (_tmp, export) = served();
    let sftp = Sftp::start(&ns, &export, PORT).expect("sftp");
    let mut first = connect_in(&ns, sftp.addr).expect("connect");
    assert_eq!(sftp_init(&mut first), (SSH_FXP_VERSION, 3));
    assert_eq!(servers_of(&export).len(), 1);
    assert_eq!(sftp.kill_sessions(), 1);
    assert!(servers_of(&export).is_empty(), "{:?}", servers_of(&export));
    // The client sees the connection end (EOF or reset), not a hang.
    let mut buf = [0u8; 1];
    match first.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the connection to end, got {other:?}"),
    }
    let mut second = connect_in(&ns, sftp.addr).expect("reconnect");
    assert_eq!(sftp_init(&mut second), (SSH_FXP_VERSION, 3));
    assert_eq!(sftp.connections(), 2);
    assert_eq!(sftp.live_sessions(), 1);
}

#[test]
fn drop_stops_the_listener_and_every_session() {
    let ns = NetNs::create().expect("netns");
    let (_tmp, export) = served();
    let sftp = Sftp::start(&ns, &export, PORT).expect("sftp");
    let addr = sftp.addr;
    let mut client = connect_in(&ns, addr).expect("connect");
    assert_eq!(sftp_init(&mut client), (SSH_FXP_VERSION, 3));
    assert_eq!(servers_of(&export).len(), 1);
    drop(sftp);
    assert!(servers_of(&export).is_empty(), "{:?}", servers_of(&export));
    let err = connect_in(&ns, addr).expect_err("nothing listens after drop");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
}

#[test]
fn a_second_server_on_a_taken_port_fails_naming_the_address() {
    let ns = NetNs::create().expect("netns");
    let (_tmp, export) = served();
    let _first = Sftp::start(&ns, &export, PORT).expect("sftp");
    let err = Sftp::start(&ns, &export, PORT)
        .err()
        .expect("the port is taken");
    let text = format!("{err:#}");
    assert!(
        text.contains(&format!("listening on {}:{PORT}", ns.host_ip)),
        "{text}"
    );
    assert!(text.contains("in use"), "{text}");
}
