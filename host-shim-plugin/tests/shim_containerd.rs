//! `containerd-shim-cnfs-v2` under the real containerd (Debian's package, private root,
//! state and sockets). With runc's shim as the delegate, containers behave exactly as
//! without the wrapper; with a test guest behind a stand-in Kata management socket (the only
//! simulated part of Kata), pod annotations become guest kernel mounts.

mod common;

use common::{shim_on_path, text};

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use cnfs_testbed::containerd::{Containerd, MINIMAL};
use cnfs_testbed::ganesha::EXPORT;
use cnfs_testbed::{rootfs, TempDir, TestBed};

const RUNC: &str = "io.containerd.runc.v2";
const CNFS: &str = "io.containerd.cnfs.v2";

struct Ctr<'a> {
    ctd: &'a Containerd,
}

impl Ctr<'_> {
    /// `ctr` with the runtime's flags placed after `subcommand` (e.g. `run`).
    fn run(&self, runtime: &str, subcommand: &[&str], rest: &[&str]) -> Output {
        let mut c = Command::new("ctr");
        c.arg("-a").arg(self.ctd.socket()).args(subcommand);
        c.args(["--runtime", runtime]);
        c.args(rest).stdin(Stdio::null());
        c.output().expect("ctr runs")
    }

    fn plain(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("-a")
            .arg(self.ctd.socket())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("ctr runs")
    }
}

/// Writes the wrapper's config and points containerd (and so its shims) at it. Each test
/// runs in its own process under nextest, so the environment is the test's own.
fn write_config(dir: &Path, body: &str) {
    let p = dir.join("shim.toml");
    std::fs::write(&p, body).expect("shim config");
    std::env::set_var("CNFS_SHIM_CONFIG", &p);
}

/// Waits until `ctr task ls` shows `id` in `status` (or no longer lists it, for "gone").
fn wait_task(ctr: &Ctr, id: &str, status: &str) {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let ls = text(&ctr.plain(&["task", "ls"]).stdout);
        let line = ls.lines().find(|l| l.split_whitespace().next() == Some(id));
        let ok = match status {
            "gone" => line.is_none(),
            s => line.is_some_and(|l| l.contains(s)),
        };
        if ok {
            return;
        }
        assert!(
            Instant::now() < until,
            "task {id} never became {status}:\n{ls}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Processes of our wrapper started for this containerd.
fn wrapper_pids(ctd: &Containerd) -> Vec<String> {
    let sock = ctd.socket().display().to_string();
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let pid = e.file_name().to_string_lossy().into_owned();
                    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                    let cmd = text(&cmd).replace('\0', " ");
                    (cmd.contains("containerd-shim-cnfs-v2") && cmd.contains(&sock)).then_some(pid)
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn with_runc_as_delegate_containers_behave_exactly_as_without_the_wrapper() {
    shim_on_path();
    let dir = TempDir::new("shim-runc").expect("dir");
    let root = rootfs::busybox(dir.path()).expect("rootfs");
    let root = root.display().to_string();
    write_config(dir.path(), "delegate = \"containerd-shim-runc-v2\"\n");
    let ctd = Containerd::start(MINIMAL).expect("containerd");
    let ctr = Ctr { ctd: &ctd };

    let mut seen = Vec::new();
    for (runtime, tag) in [(RUNC, "runc"), (CNFS, "cnfs")] {
        // Foreground run: output and exit status pass through.
        let id = format!("fg-{tag}");
        let out = ctr.run(
            runtime,
            &["run"],
            &[
                "--rm",
                "--rootfs",
                &root,
                &id,
                "/bin/sh",
                "-c",
                // The pause before exit: containerd 1.6's stdio copy lost the whole output
                // of a task that exited at once, seen once under load with runc alone
                // (not a wrapper matter; both runs get the same command).
                "echo out; echo err >&2; sleep 1; exit 3",
            ],
        );
        // Detached: exec, kill, delete.
        let id2 = format!("bg-{tag}");
        let started = ctr.run(
            runtime,
            &["run"],
            &["-d", "--rootfs", &root, &id2, "/bin/sleep", "600"],
        );
        assert!(started.status.success(), "{tag}: {}", text(&started.stderr));
        wait_task(&ctr, &id2, "RUNNING");
        let exec = ctr.plain(&[
            "task",
            "exec",
            "--exec-id",
            "e1",
            &id2,
            "/bin/sh",
            "-c",
            "echo from-exec; sleep 1; exit 5",
        ]);
        let ps = text(&ctr.plain(&["task", "ps", &id2]).stdout);
        let kill = ctr.plain(&["task", "kill", "-s", "SIGKILL", &id2]);
        assert!(kill.status.success(), "{tag}: {}", text(&kill.stderr));
        wait_task(&ctr, &id2, "STOPPED");
        let del = ctr.plain(&["task", "delete", &id2]);
        assert!(del.status.success(), "{tag}: {}", text(&del.stderr));
        let rm = ctr.plain(&["container", "rm", &id2]);
        assert!(rm.status.success(), "{tag}: {}", text(&rm.stderr));
        seen.push((
            out.status.code(),
            text(&out.stdout),
            exec.status.code(),
            text(&exec.stdout),
            ps.lines().count(),
        ));
    }
    assert_eq!(
        seen[0],
        (Some(3), "out\n".into(), Some(5), "from-exec\n".into(), 2)
    );
    assert_eq!(seen[0], seen[1], "runc alone vs. through the wrapper");
    wait_task(&ctr, "fg-cnfs", "gone");
    // Every wrapper exited with its delegate.
    let until = Instant::now() + Duration::from_secs(10);
    while !wrapper_pids(&ctd).is_empty() {
        assert!(
            Instant::now() < until,
            "wrappers left running: {:?}",
            wrapper_pids(&ctd)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A pod as CRI would create it: the sandbox container, then an app container.
fn cri_annotations(kind: &str, sandbox: &str, namespace: &str, name: &str) -> Vec<String> {
    vec![
        format!("io.kubernetes.cri.container-type={kind}"),
        format!("io.kubernetes.cri.sandbox-id={sandbox}"),
        format!("io.kubernetes.cri.sandbox-namespace={namespace}"),
        format!("io.kubernetes.cri.container-name={name}"),
    ]
}

fn with_annotations<'a>(list: &'a [String], rest: &[&'a str]) -> Vec<&'a str> {
    let mut v = Vec::new();
    for a in list {
        v.push("--annotation");
        v.push(a.as_str());
    }
    v.extend_from_slice(rest);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_annotations_become_guest_mounts_and_bind_mounts_and_failures_leave_nothing(
) -> anyhow::Result<()> {
    shim_on_path();
    let bed = TestBed::start().await?;
    let dir = bed.dir.path();
    let root = rootfs::busybox(dir)?.display().to_string();
    let monitor_root = dir.join("kata-run");
    let sandbox = format!("sb{}", cnfs_testbed::unique_id());
    std::fs::create_dir_all(monitor_root.join(&sandbox))?;
    let _monitor = cnfs_testbed::kata_monitor::serve(
        &monitor_root.join(&sandbox).join("shim-monitor.sock"),
        &bed.vm.hvsock,
    )?;
    let secrets = dir.join("secrets");
    std::fs::create_dir_all(secrets.join("team-a"))?;
    for d in [&secrets, &secrets.join("team-a")] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))?;
    }
    let policy = dir.join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "[[allow]]\nnamespaces = [\"team-a\"]\nfilesystems = [\"nfs\", \"cephfs\"]\n\
             servers = [\"{}/24\"]\nexport_prefixes = [\"{EXPORT}\"]\noptions = [\"nconnect\"]\n\
             [[allow]]\nnamespaces = [\"team-a\"]\nfilesystems = [\"smb\"]\n\
             servers = [\"{}/24\"]\nexport_prefixes = [\"/data\"]\noptions = []\n\
             [[allow]]\nnamespaces = [\"team-a\"]\nfilesystems = [\"fuse\"]\n",
            bed.ns.host_ip, bed.ns.host_ip
        ),
    )?;
    write_config(
        dir,
        &format!(
            "delegate = \"containerd-shim-runc-v2\"\npolicy = \"{}\"\nsecrets_dir = \"{}\"\n\
             kata_monitor_roots = [\"{}\"]\nguest_connect_timeout_seconds = 5\nmount_timeout_seconds = 8\n",
            policy.display(),
            secrets.display(),
            monitor_root.display()
        ),
    );
    let ctd = Containerd::start(MINIMAL)?;
    let ctr = Ctr { ctd: &ctd };
    let server = bed.ns.host_ip.clone();
    let vol = format!("d{}", cnfs_testbed::unique_id());
    let pod = vec![
        format!("cnfs.io/volume.{vol}=nfs://{server}{EXPORT}?vers=4.1&nconnect=2"),
        format!("cnfs.io/mount.{vol}=/data"),
        format!("cnfs.io/containers.{vol}=worker"),
    ];
    let mut sb_ann = cri_annotations("sandbox", &sandbox, "team-a", "POD");
    sb_ann.extend(pod.clone());
    let args = with_annotations(
        &sb_ann,
        &["-d", "--rootfs", &root, &sandbox, "/bin/sleep", "600"],
    );
    let out = ctr.run(CNFS, &["run"], &args);
    assert!(out.status.success(), "sandbox: {}", text(&out.stderr));
    let mounts = bed.vm.exec.ok("cat /proc/mounts").await?;
    assert!(
        mounts.contains(&format!("/run/cnfs/volumes/{vol} nfs4")),
        "{mounts}"
    );
    std::fs::write(bed.nfs.export_dir.join("hello.txt"), "from the server\n")?;
    assert_eq!(
        bed.vm
            .exec
            .ok(&format!("cat /run/cnfs/volumes/{vol}/hello.txt"))
            .await?,
        "from the server\n"
    );

    // App containers join the sandbox's wrapper. One the volume is not for (its
    // cnfs.io/containers list names another container) gets no mount and runs.
    let mut app_ann = cri_annotations("container", &sandbox, "team-a", "app");
    app_ann.extend(pod.clone());
    let app = format!("{sandbox}-app");
    let args = with_annotations(
        &app_ann,
        &["-d", "--rootfs", &root, &app, "/bin/sleep", "600"],
    );
    let out = ctr.run(CNFS, &["run"], &args);
    assert!(out.status.success(), "app: {}", text(&out.stderr));
    let bundle = ctd
        .dir()
        .join("state/io.containerd.runtime.v2.task/default")
        .join(&app)
        .join("config.json");
    let spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&bundle)?)?;
    let dests: Vec<&str> = spec["mounts"]
        .as_array()
        .map(|a| a.iter().filter_map(|m| m["destination"].as_str()).collect())
        .unwrap_or_default();
    assert!(!dests.contains(&"/data"), "{dests:?}");
    // The worker gets the bind mount with the pass-through source. Its delegate here is runc
    // on this host, not kata-agent in the guest, so runc cannot follow /proc/1/root into a
    // guest and refuses: its error shows the exact mount the wrapper added to config.json.
    let mut worker_ann = cri_annotations("container", &sandbox, "team-a", "worker");
    worker_ann.extend(pod.clone());
    let worker = format!("{sandbox}-worker");
    let args = with_annotations(
        &worker_ann,
        &["-d", "--rootfs", &root, &worker, "/bin/sleep", "600"],
    );
    let out = ctr.run(CNFS, &["run"], &args);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!(
            "mounting \"/proc/1/root/run/cnfs/volumes/{vol}\" to rootfs at \"/data\""
        )),
        "{err}"
    );
    wait_task(&ctr, &worker, "gone");
    assert_eq!(wrapper_pids(&ctd).len(), 1, "one wrapper per sandbox");

    // Delete: the sandbox's volumes are unmounted in the guest.
    for id in [app.as_str(), sandbox.as_str()] {
        ctr.plain(&["task", "kill", "-s", "SIGKILL", id]);
        wait_task(&ctr, id, "STOPPED");
        let del = ctr.plain(&["task", "delete", id]);
        assert!(del.status.success(), "{}", text(&del.stderr));
    }
    let mounts = bed.vm.exec.ok("cat /proc/mounts").await?;
    assert!(
        !mounts.contains(&format!("/run/cnfs/volumes/{vol}")),
        "{mounts}"
    );

    // Refusals: each fails the sandbox Create with a message naming the cause; nothing is
    // mounted and no task is left.
    let cases: Vec<(String, Vec<String>, &str)> = vec![
        ("team-b".into(), pod.clone(), "policy denies volume"),
        ("team-a".into(), vec![format!("cnfs.io/volume.{vol}=nfs://{server}{EXPORT}?addr=1.2.3.4"), format!("cnfs.io/mount.{vol}=/data")], "volume.options.addr"),
        ("team-a".into(), vec![format!("cnfs.io/volume.{vol}=nfs://{server}/other"), format!("cnfs.io/mount.{vol}=/data")], "outside the allowed prefixes"),
        (
            "team-a".into(),
            vec![
                format!("cnfs.io/volume.{vol}=cephfs://{server}:6789{EXPORT}?fs=cephfs&client=app&secret=missing-key"),
                format!("cnfs.io/mount.{vol}=/data"),
            ],
            "\"missing-key\" for namespace team-a does not exist",
        ),
    ];
    for (i, (namespace, ann, needle)) in cases.into_iter().enumerate() {
        let id = format!("{sandbox}-bad{i}");
        let mut a = cri_annotations("sandbox", &id, &namespace, "POD");
        a.extend(ann);
        let args = with_annotations(&a, &["-d", "--rootfs", &root, &id, "/bin/sleep", "600"]);
        let out = ctr.run(CNFS, &["run"], &args);
        assert!(!out.status.success(), "{needle}: created");
        assert!(
            text(&out.stderr).contains(needle),
            "{needle}: {}",
            text(&out.stderr)
        );
        wait_task(&ctr, &id, "gone");
    }
    // Several volumes are mounted at once, all or nothing: the second of three names an
    // export directory that does not exist, so the pod fails naming it and the guest keeps
    // none of the three (those that succeeded are unmounted again).
    for d in ["all-a", "all-c"] {
        std::fs::create_dir_all(bed.nfs.export_dir.join(d))?;
    }
    let id = format!("{sandbox}-all");
    std::fs::create_dir_all(monitor_root.join(&id))?;
    let _all_monitor = cnfs_testbed::kata_monitor::serve(
        &monitor_root.join(&id).join("shim-monitor.sock"),
        &bed.vm.hvsock,
    )?;
    let mut a = cri_annotations("sandbox", &id, "team-a", "POD");
    for (name, dir) in [
        ("all-a", "all-a"),
        ("all-b", "all-missing"),
        ("all-c", "all-c"),
    ] {
        a.push(format!(
            "cnfs.io/volume.{name}=nfs://{server}{EXPORT}/{dir}?vers=4.1"
        ));
        a.push(format!("cnfs.io/mount.{name}=/{name}"));
    }
    let args = with_annotations(&a, &["-d", "--rootfs", &root, &id, "/bin/sleep", "600"]);
    let out = ctr.run(CNFS, &["run"], &args);
    assert!(!out.status.success(), "created with a missing export");
    let err = text(&out.stderr);
    assert!(
        err.contains("annotation \"cnfs.io/volume.all-b\": mounting in the guest failed"),
        "{err}"
    );
    wait_task(&ctr, &id, "gone");
    let mounts = bed.vm.exec.ok("cat /proc/mounts").await?;
    assert!(!mounts.contains("/run/cnfs/volumes/all-"), "{mounts}");

    // CephFS through the shim: a real Ceph cluster in the namespace, the pod names a host-side
    // secret, the guest kernel mounts with it, and the key appears in no output, log or file
    // on the host side (containerd's root, state and log, the bundle) nor in the guest's
    // console.
    let ceph = cnfs_testbed::ceph::Ceph::start(&bed.ns, dir).await?;
    let key = ceph.authorize("app", EXPORT, "rw")?;
    let key = key.as_str();
    let key_file = secrets.join("team-a").join("ceph-key");
    std::fs::write(&key_file, format!("{key}\n"))?;
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))?;
    let id = format!("{sandbox}-ceph");
    std::fs::create_dir_all(monitor_root.join(&id))?;
    let _ceph_monitor = cnfs_testbed::kata_monitor::serve(
        &monitor_root.join(&id).join("shim-monitor.sock"),
        &bed.vm.hvsock,
    )?;
    let mut a = cri_annotations("sandbox", &id, "team-a", "POD");
    a.push(format!(
        "cnfs.io/volume.{vol}=cephfs://{}{EXPORT}?fs=cephfs&client=app&secret=ceph-key",
        ceph.mon_v1()
    ));
    a.push(format!("cnfs.io/mount.{vol}=/data"));
    let args = with_annotations(&a, &["-d", "--rootfs", &root, &id, "/bin/sleep", "600"]);
    let out = ctr.run(CNFS, &["run"], &args);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    let mounts = bed.vm.exec.ok("cat /proc/mounts").await?;
    assert!(
        mounts.contains(&format!("/run/cnfs/volumes/{vol} ceph")),
        "{mounts}"
    );
    bed.vm
        .exec
        .ok(&format!(
            "echo via-shim > /run/cnfs/volumes/{vol}/shim.txt && sync"
        ))
        .await?;
    assert_eq!(
        ceph.try_read_file(&format!("{EXPORT}/shim.txt"))?,
        b"via-shim\n"
    );
    ctr.plain(&["task", "kill", "-s", "SIGKILL", &id]);
    wait_task(&ctr, &id, "STOPPED");
    let del = ctr.plain(&["task", "delete", &id]);
    assert!(del.status.success(), "{}", text(&del.stderr));
    assert!(!bed
        .vm
        .exec
        .ok("cat /proc/mounts")
        .await?
        .contains(&format!("/run/cnfs/volumes/{vol}")));
    let grep = Command::new("grep")
        .args(["-r", "-l", "-a", key])
        .arg(ctd.dir())
        .output()?;
    assert!(
        grep.stdout.is_empty(),
        "key found in {}",
        text(&grep.stdout)
    );
    for (what, haystack) in [
        ("ctr output", format!("{err}{}", text(&out.stdout))),
        ("containerd log", ctd.log_tail(100_000)),
        ("guest console", bed.vm.console_text()),
    ] {
        assert!(!haystack.contains(key), "key in {what}");
    }

    // SMB through the shim: a real Samba server in the namespace, the pod names a host-side
    // secret in mount.cifs's credentials format, the guest kernel mounts the share sealed,
    // and the password appears in no output, log or file on the host side nor in the guest.
    const SMB_USER: &str = "cnfsshimsmb";
    const SMB_PW: &str = "shim,smb=pw 9";
    let samba = cnfs_testbed::samba::Samba::start(
        &bed.ns,
        dir,
        &cnfs_testbed::samba::SambaSetup::new()
            .user(SMB_USER, SMB_PW)
            .share(cnfs_testbed::samba::Share::new("data")),
    )?;
    let cred_file = secrets.join("team-a").join("smb-cred");
    std::fs::write(
        &cred_file,
        format!("username={SMB_USER}\npassword={SMB_PW}\n"),
    )?;
    std::fs::set_permissions(&cred_file, std::fs::Permissions::from_mode(0o600))?;
    let id = format!("{sandbox}-smb");
    std::fs::create_dir_all(monitor_root.join(&id))?;
    let _smb_monitor = cnfs_testbed::kata_monitor::serve(
        &monitor_root.join(&id).join("shim-monitor.sock"),
        &bed.vm.hvsock,
    )?;
    let mut a = cri_annotations("sandbox", &id, "team-a", "POD");
    a.push(format!(
        "cnfs.io/volume.{vol}=smb://{}/data?secret=smb-cred",
        samba.server_ip
    ));
    a.push(format!("cnfs.io/mount.{vol}=/data"));
    let args = with_annotations(&a, &["-d", "--rootfs", &root, &id, "/bin/sleep", "600"]);
    let out = ctr.run(CNFS, &["run"], &args);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    let mounts = bed.vm.exec.ok("cat /proc/mounts").await?;
    let line = mounts
        .lines()
        .find(|l| l.contains(&format!("/run/cnfs/volumes/{vol} cifs")))
        .unwrap_or_default();
    assert!(
        line.contains("seal") && line.contains("vers=3.1.1"),
        "{mounts}"
    );
    bed.vm
        .exec
        .ok(&format!(
            "echo via-shim > /run/cnfs/volumes/{vol}/smb.txt && sync"
        ))
        .await?;
    let share = samba.share_dir("data").expect("share");
    assert_eq!(std::fs::read(share.join("smb.txt"))?, b"via-shim\n");
    ctr.plain(&["task", "kill", "-s", "SIGKILL", &id]);
    wait_task(&ctr, &id, "STOPPED");
    let del = ctr.plain(&["task", "delete", &id]);
    assert!(del.status.success(), "{}", text(&del.stderr));
    assert!(!bed
        .vm
        .exec
        .ok("cat /proc/mounts")
        .await?
        .contains(&format!("/run/cnfs/volumes/{vol}")));
    let grep = Command::new("grep")
        .args(["-r", "-l", "-a", "-F", SMB_PW])
        .arg(ctd.dir())
        .output()?;
    assert!(
        grep.stdout.is_empty(),
        "password found in {}",
        text(&grep.stdout)
    );
    for (what, haystack) in [
        ("ctr output", format!("{err}{}", text(&out.stdout))),
        ("containerd log", ctd.log_tail(100_000)),
        ("guest console", bed.vm.console_text()),
        ("guest mounts", mounts),
    ] {
        assert!(
            !haystack.contains(SMB_PW) && !haystack.contains("shim,,smb"),
            "password in {what}"
        );
    }
    drop(samba);

    // FUSE through the shim: the guest mounts the volume at the sandbox's Create (nobody
    // serves it yet). The sidecar's config.json gets the directory of the volume's socket
    // and nothing else of it; the app it is for gets the volume; a container it is not for
    // gets neither. (runc on this host cannot follow /proc/1/root into a guest: the refused
    // creates show the exact mount the wrapper added.)
    let id = format!("{sandbox}-fuse");
    std::fs::create_dir_all(monitor_root.join(&id))?;
    let _fuse_monitor = cnfs_testbed::kata_monitor::serve(
        &monitor_root.join(&id).join("shim-monitor.sock"),
        &bed.vm.hvsock,
    )?;
    let fuse_pod = vec![
        format!("cnfs.io/volume.{vol}=fuse://?sidecar=sshfs"),
        format!("cnfs.io/mount.{vol}=/srv/web"),
        format!("cnfs.io/containers.{vol}=web"),
    ];
    let mut a = cri_annotations("sandbox", &id, "team-a", "POD");
    a.extend(fuse_pod.clone());
    let args = with_annotations(&a, &["-d", "--rootfs", &root, &id, "/bin/sleep", "600"]);
    let out = ctr.run(CNFS, &["run"], &args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mounts = bed.vm.exec.ok("cat /proc/mounts").await?;
    assert!(
        mounts.contains(&format!("cnfs-fuse:sshfs /run/cnfs/volumes/{vol} fuse ")),
        "{mounts}"
    );
    bed.vm
        .exec
        .ok(&format!(
            "test -S /run/cnfs/fuse/{vol}/fuse-csi-ephemeral.sock"
        ))
        .await?;
    let container = |name: &str| {
        let mut ann = cri_annotations("container", &id, "team-a", name);
        ann.extend(fuse_pod.clone());
        let cid = format!("{id}-{name}");
        let args = with_annotations(&ann, &["-d", "--rootfs", &root, &cid, "/bin/sleep", "600"]);
        let out = ctr.run(CNFS, &["run"], &args);
        (cid, out)
    };
    let (other, out) = container("other");
    assert!(out.status.success(), "other: {}", text(&out.stderr));
    let spec: serde_json::Value = serde_json::from_slice(&std::fs::read(
        ctd.dir()
            .join("state/io.containerd.runtime.v2.task/default")
            .join(&other)
            .join("config.json"),
    )?)?;
    let sources: Vec<&str> = spec["mounts"]
        .as_array()
        .map(|a| a.iter().filter_map(|m| m["source"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        sources.iter().all(|s| !s.contains("/run/cnfs/")),
        "{sources:?}"
    );
    for (name, source, dest) in [
        (
            "sshfs",
            format!("/proc/1/root/run/cnfs/fuse/{vol}"),
            "/fuse-fd-passing",
        ),
        (
            "web",
            format!("/proc/1/root/run/cnfs/volumes/{vol}"),
            "/srv/web",
        ),
    ] {
        let (cid, out) = container(name);
        assert!(!out.status.success(), "{name} ran");
        let err = text(&out.stderr);
        assert!(
            err.contains(&format!("mounting \"{source}\" to rootfs at \"{dest}\"")),
            "{name}: {err}"
        );
        wait_task(&ctr, &cid, "gone");
    }
    for cid in [other.as_str(), id.as_str()] {
        ctr.plain(&["task", "kill", "-s", "SIGKILL", cid]);
        wait_task(&ctr, cid, "STOPPED");
        let del = ctr.plain(&["task", "delete", cid]);
        assert!(del.status.success(), "{}", text(&del.stderr));
    }
    let mounts = bed.vm.exec.ok("cat /proc/mounts").await?;
    assert!(
        !mounts.contains(&format!("/run/cnfs/volumes/{vol}")),
        "{mounts}"
    );
    assert_eq!(
        bed.vm.exec.ok("ls /run/cnfs/fuse | wc -l").await?.trim(),
        "0"
    );

    // An encrypted volume through the shim, in the same guest and containerd.
    let luks = LuksPod {
        bed: &bed,
        ctd: &ctd,
        root: &root,
        monitor_root: &monitor_root,
        secrets: &secrets,
        policy: &policy,
        sandbox: &sandbox,
    };
    luks.an_encrypted_volume_keeps_plaintext_and_key_in_the_guest()
        .await?;
    luks.a_missing_or_open_key_secret_fails_the_sandbox_naming_annotation_and_option()?;

    // An unreachable guest: no management socket for this sandbox id.
    let id = format!("{sandbox}-nowhere");
    let mut a = cri_annotations("sandbox", &id, "team-a", "POD");
    a.extend(pod.clone());
    let args = with_annotations(&a, &["-d", "--rootfs", &root, &id, "/bin/sleep", "600"]);
    let out = ctr.run(CNFS, &["run"], &args);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("cannot reach the sandbox's guest"),
        "{}",
        text(&out.stderr)
    );
    wait_task(&ctr, &id, "gone");
    let mounts = bed.vm.exec.ok("cat /proc/mounts").await?;
    assert!(!mounts.contains("/run/cnfs/volumes/"), "{mounts}");
    Ok(())
}

/// Processes whose command line contains all of `needles`.
fn pids_with(needles: &[&str]) -> Vec<i32> {
    cnfs_testbed::process::processes()
        .into_iter()
        .filter(|(_, argv)| {
            let cmd = argv.join(" ");
            needles.iter().all(|n| cmd.contains(n))
        })
        .filter_map(|(pid, _)| i32::try_from(pid).ok())
        .collect()
}

#[test]
fn a_dead_wrapper_is_cleaned_up_through_the_delegates_delete() {
    shim_on_path();
    let dir = TempDir::new("shim-dead").expect("dir");
    let root = rootfs::busybox(dir.path())
        .expect("rootfs")
        .display()
        .to_string();
    write_config(dir.path(), "delegate = \"containerd-shim-runc-v2\"\n");
    let ctd = Containerd::start(MINIMAL).expect("containerd");
    let ctr = Ctr { ctd: &ctd };
    let id = format!("doomed{}", cnfs_testbed::unique_id());
    let out = ctr.run(
        CNFS,
        &["run"],
        &["-d", "--rootfs", &root, &id, "/bin/sleep", "600"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_task(&ctr, &id, "RUNNING");
    let sock = ctd.socket().display().to_string();
    let wrapper = pids_with(&["containerd-shim-cnfs-v2", &sock, &format!("-id {id} ")]);
    let delegate = pids_with(&["containerd-shim-runc-v2", &sock, &format!("-id {id} ")]);
    assert_eq!(
        (wrapper.len(), delegate.len()),
        (1, 1),
        "{wrapper:?} {delegate:?}"
    );
    // The container's process, from `ctr task ls` (TASK PID STATUS).
    let ls = text(&ctr.plain(&["task", "ls"]).stdout);
    let task_pid: i32 = ls
        .lines()
        .find(|l| l.starts_with(id.as_str()))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .expect("task pid");
    let proc_dir = format!("/proc/{task_pid}");
    assert!(Path::new(&proc_dir).exists());
    // Both shims die at once; containerd must clean up with `containerd-shim-cnfs-v2 delete`,
    // which runs the delegate's `delete` (runc kills and removes the container).
    for pid in wrapper.iter().chain(&delegate) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let ls = text(&ctr.plain(&["task", "ls"]).stdout);
        let running = ls
            .lines()
            .any(|l| l.starts_with(id.as_str()) && l.contains("RUNNING"));
        if !running && !Path::new(&proc_dir).exists() {
            break;
        }
        assert!(
            Instant::now() < until,
            "not cleaned up:\n{ls}\n{}",
            ctd.log_tail(20)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // runc's own record of the container is gone too (its delete ran).
    let runc = Command::new("runc")
        .args(["--root", "/run/containerd/runc/default", "list", "-q"])
        .output()
        .expect("runc");
    assert!(
        !text(&runc.stdout).lines().any(|l| l == id.as_str()),
        "{}",
        ctd.log_tail(30)
    );
    let rm = ctr.plain(&["container", "rm", &id]);
    assert!(rm.status.success(), "{}", text(&rm.stderr));
}

/// Files under `dir` holding `needle` (a byte search, like `grep -r -a`).
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            // Sockets and fifos (containerd's) are not read.
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file()
                && std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
            {
                hits.push(p.display().to_string());
            }
        }
    }
    hits
}

/// Host `cryptsetup` (exit status, stdout and stderr).
fn host_cryptsetup(args: &[&str]) -> (bool, String) {
    let out = Command::new("cryptsetup")
        .args(args)
        .output()
        .expect("host cryptsetup runs");
    (
        out.status.success(),
        format!("{}{}", text(&out.stdout), text(&out.stderr)),
    )
}

/// The encrypted-volume part of the pod test: what it shares with the rest of it.
struct LuksPod<'a> {
    bed: &'a TestBed,
    ctd: &'a Containerd,
    root: &'a str,
    monitor_root: &'a Path,
    secrets: &'a Path,
    policy: &'a Path,
    sandbox: &'a str,
}

impl LuksPod<'_> {
    /// The pod test's policy plus an entry for encrypted NFS volumes under `<export>/luks`
    /// (`encryption` and `size` listed), and a mount deadline for a first use (two argon2
    /// passes and mkfs under TCG). Wrappers read both when they start.
    fn allow_encryption(&self) {
        let server = &self.bed.ns.host_ip;
        let mut text = std::fs::read_to_string(self.policy).expect("policy");
        if !text.contains("\"encryption\"") {
            text.push_str(&format!(
                "[[allow]]\nnamespaces = [\"team-a\"]\nfilesystems = [\"nfs\"]\n\
                 servers = [\"{server}/24\"]\nexport_prefixes = [\"{EXPORT}/luks\"]\n\
                 options = [\"encryption\", \"size\"]\n"
            ));
            std::fs::write(self.policy, text).expect("policy");
        }
        let cfg = std::env::var_os("CNFS_SHIM_CONFIG").expect("shim config set");
        let body = std::fs::read_to_string(&cfg).expect("shim config");
        let body = body.replace(
            "mount_timeout_seconds = 8\n",
            "mount_timeout_seconds = 150\n",
        );
        assert!(body.contains("mount_timeout_seconds = 150"), "{body}");
        std::fs::write(&cfg, body).expect("shim config");
    }

    fn key_secret(&self, name: &str, bytes: &[u8], mode: u32) -> std::path::PathBuf {
        let f = self.secrets.join("team-a").join(name);
        std::fs::write(&f, bytes).expect("key secret");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).expect("chmod");
        f
    }

    fn annotations(&self, id: &str, kind: &str, name: &str, vol: &str, url: &str) -> Vec<String> {
        let mut a = cri_annotations(kind, id, "team-a", name);
        a.push(format!("cnfs.io/volume.{vol}={url}"));
        a.push(format!("cnfs.io/mount.{vol}=/secure"));
        a
    }

    /// Sandbox annotations `nfs://...?encryption=luks2&size=128Mi&encryption_key=<name>` with
    /// binary key bytes in the host secret: the guest formats and mounts the volume, a
    /// container's bind (the exact source the wrapper gave it) writes a canary, the export
    /// holds one stock LUKS2 file that the secret file's exact bytes open, neither canary nor
    /// key is on the server or in anything containerd, the shim or the guest kept, and the
    /// sandbox's delete takes the whole stack down.
    async fn an_encrypted_volume_keeps_plaintext_and_key_in_the_guest(&self) -> anyhow::Result<()> {
        let (bed, ctr) = (self.bed, Ctr { ctd: self.ctd });
        // Until the policy lists `encryption`, the export's plain entry does not allow it.
        let id = format!("{}-luksdenied", self.sandbox);
        let url = format!(
            "nfs://{}{EXPORT}/luks/pod?encryption=luks2&size=128Mi&encryption_key=luks-key",
            bed.ns.host_ip
        );
        let a = self.annotations(&id, "sandbox", "POD", "sec", &url);
        let args = with_annotations(&a, &["-d", "--rootfs", self.root, &id, "/bin/sleep", "600"]);
        let out = ctr.run(CNFS, &["run"], &args);
        assert!(!out.status.success(), "allowed without a policy entry");
        assert!(
            text(&out.stderr).contains("policy denies volume")
                && text(&out.stderr).contains("option encryption is not allowed"),
            "{}",
            text(&out.stderr)
        );
        wait_task(&ctr, &id, "gone");
        self.allow_encryption();
        let marker = format!("SHIM-LUKS-KEY-{}", std::process::id());
        let mut key = b"\x00\xfe\x01".to_vec();
        key.extend_from_slice(marker.as_bytes());
        key.extend_from_slice(b" \xff\n");
        let key_file = self.key_secret("luks-key", &key, 0o600);
        let backing = bed.nfs.export_dir.join("luks/pod");
        std::fs::create_dir_all(&backing)?;
        let id = format!("{}-luks", self.sandbox);
        let vol = format!("l{}", cnfs_testbed::unique_id());
        std::fs::create_dir_all(self.monitor_root.join(&id))?;
        let _monitor = cnfs_testbed::kata_monitor::serve(
            &self.monitor_root.join(&id).join("shim-monitor.sock"),
            &bed.vm.hvsock,
        )?;
        let mut outputs = Vec::new();
        let a = self.annotations(&id, "sandbox", "POD", &vol, &url);
        let args = with_annotations(&a, &["-d", "--rootfs", self.root, &id, "/bin/sleep", "600"]);
        let out = ctr.run(CNFS, &["run"], &args);
        outputs.extend_from_slice(&out.stdout);
        outputs.extend_from_slice(&out.stderr);
        assert!(
            out.status.success(),
            "encrypted sandbox: {}",
            text(&out.stderr)
        );
        let mounts = bed.vm.exec.ok("cat /proc/mounts").await?;
        assert!(
            mounts.contains(&format!("/run/cnfs/volumes/{vol} ext4 "))
                && mounts.contains(&format!("/run/cnfs/backing/{vol} nfs4 ")),
            "{mounts}"
        );

        // The app container gets the bind the wrapper adds (runc, the delegate here, cannot
        // follow /proc/1/root into the guest: its refusal shows the source). In the guest,
        // that source is bound into a fresh mount namespace as kata-agent's rustjail does,
        // and the container's write lands in the volume.
        let worker = format!("{id}-worker");
        let a = self.annotations(&id, "container", "worker", &vol, &url);
        let args = with_annotations(
            &a,
            &["-d", "--rootfs", self.root, &worker, "/bin/sleep", "600"],
        );
        let out = ctr.run(CNFS, &["run"], &args);
        outputs.extend_from_slice(&out.stdout);
        outputs.extend_from_slice(&out.stderr);
        let err = text(&out.stderr);
        let source = format!("/proc/1/root/run/cnfs/volumes/{vol}");
        assert!(
            err.contains(&format!("mounting \"{source}\" to rootfs at \"/secure\"")),
            "{err}"
        );
        wait_task(&ctr, &worker, "gone");
        let canary = format!("SHIM-PLAINTEXT-CANARY-{}", std::process::id());
        bed.vm
            .exec
            .ok(&format!(
                "unshare -m sh -c 'src=$(readlink -f {source}) && mkdir -p /tmp/ctr && \
                 mount --bind \"$src\" /tmp/ctr && \
                 for i in 1 2 3 4; do echo {canary} >> /tmp/ctr/canary.txt; done && sync'"
            ))
            .await?;
        assert_eq!(
            bed.vm
                .exec
                .ok(&format!("head -n 1 /run/cnfs/volumes/{vol}/canary.txt"))
                .await?
                .trim(),
            canary
        );

        // On the host: one LUKS2 file in the volume's directory, no plaintext, no key.
        let listing: Vec<String> = std::fs::read_dir(&backing)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(listing, vec!["cnfs-volume.luks2".to_string()]);
        let container = backing.join("cnfs-volume.luks2").display().to_string();
        let (is_luks, out) = host_cryptsetup(&["isLuks", "--type", "luks2", &container]);
        assert!(is_luks, "host cryptsetup isLuks: {out}");
        for (what, needle) in [("canary", canary.as_bytes()), ("key", marker.as_bytes())] {
            assert_eq!(
                files_holding(&bed.nfs.export_dir, needle),
                Vec::<String>::new(),
                "{what} on the server"
            );
        }

        // Delete: the stack is gone from the guest.
        ctr.plain(&["task", "kill", "-s", "SIGKILL", &id]);
        wait_task(&ctr, &id, "STOPPED");
        let del = ctr.plain(&["task", "delete", &id]);
        assert!(del.status.success(), "{}", text(&del.stderr));
        let mounts = bed.vm.exec.ok("cat /proc/mounts").await?;
        assert!(
            !mounts.contains(&format!("/run/cnfs/volumes/{vol}"))
                && !mounts.contains(&format!("/run/cnfs/backing/{vol}")),
            "{mounts}"
        );
        bed.vm
            .exec
            .ok(&format!("! test -e /dev/mapper/cnfs-{vol}"))
            .await?;
        // With the guest's lock released, the secret file's exact bytes open the container
        // on the host, and the same bytes without their trailing newline do not.
        let (opens, out) = host_cryptsetup(&[
            "open",
            "--test-passphrase",
            "--key-file",
            &key_file.display().to_string(),
            &container,
        ]);
        assert!(opens, "the secret file opens the container: {out}");
        let trimmed = self.key_secret("luks-key-trimmed", &key[..key.len() - 1], 0o600);
        let (opens, _) = host_cryptsetup(&[
            "open",
            "--test-passphrase",
            "--key-file",
            &trimmed.display().to_string(),
            &container,
        ]);
        assert!(!opens, "the key without its trailing newline opened it");

        // Neither the key nor the canary in what containerd and the wrappers kept (root,
        // state with the bundles, the log the shims write to), in ctr's output, or in the
        // guest's state files, mounts and console.
        let guest_records = bed
            .vm
            .exec
            .ok("cat /run/cnfs/state/* /proc/mounts 2>/dev/null; true")
            .await?;
        for (what, needle) in [
            ("raw key", key.as_slice()),
            ("key", marker.as_bytes()),
            ("canary", canary.as_bytes()),
        ] {
            assert_eq!(
                files_holding(self.ctd.dir(), needle),
                Vec::<String>::new(),
                "{what} kept by containerd or the shim"
            );
            for (place, haystack) in [
                ("ctr output", outputs.as_slice()),
                ("guest records", guest_records.as_bytes()),
            ] {
                assert!(
                    !haystack.windows(needle.len()).any(|w| w == needle),
                    "{what} in the {place}"
                );
            }
        }
        assert!(
            !bed.vm.console_text().contains(&marker),
            "key in the guest console"
        );
        // The shim's log reached containerd's (the lines it writes about this sandbox).
        assert!(
            self.ctd
                .log_tail(100_000)
                .contains("volumes mounted in the guest"),
            "the wrappers' log is not where the test looks"
        );
        std::fs::remove_file(trimmed)?;
        Ok(())
    }

    /// A key secret that does not exist, or is open to others, fails the sandbox's Create
    /// with a message naming the annotation, the option and the secret, never its content.
    fn a_missing_or_open_key_secret_fails_the_sandbox_naming_annotation_and_option(
        &self,
    ) -> anyhow::Result<()> {
        let ctr = Ctr { ctd: self.ctd };
        let marker = format!("OPEN-LUKS-KEY-{}", std::process::id());
        self.key_secret("open-key", marker.as_bytes(), 0o644);
        for (i, (secret, needle)) in [
            (
                "no-such-key",
                "encryption_key=no-such-key: secret \"no-such-key\" for namespace team-a \
                 does not exist",
            ),
            ("open-key", "must not be accessible by group or others"),
        ]
        .into_iter()
        .enumerate()
        {
            let id = format!("{}-luksbad{i}", self.sandbox);
            let url = format!(
                "nfs://{}{EXPORT}/luks/pod?encryption=luks2&size=128Mi&encryption_key={secret}",
                self.bed.ns.host_ip
            );
            let a = self.annotations(&id, "sandbox", "POD", "sec", &url);
            let args =
                with_annotations(&a, &["-d", "--rootfs", self.root, &id, "/bin/sleep", "600"]);
            let out = ctr.run(CNFS, &["run"], &args);
            let err = text(&out.stderr);
            assert!(!out.status.success(), "{secret}: created");
            assert!(
                err.contains("annotation \"cnfs.io/volume.sec\": encryption_key=")
                    && err.contains(needle),
                "{secret}: {err}"
            );
            assert!(!err.contains(&marker), "{secret}: content echoed: {err}");
            wait_task(&ctr, &id, "gone");
        }
        assert_eq!(
            files_holding(self.ctd.dir(), marker.as_bytes()),
            Vec::<String>::new()
        );
        std::fs::remove_file(self.secrets.join("team-a/open-key"))?;
        Ok(())
    }
}
