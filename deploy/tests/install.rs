//! The installer binary against node file systems laid out as kata-deploy and containerd
//! 1.6/1.7/2.x leave them: idempotency, byte-for-byte uninstall, kill -9 at every write,
//! configurations it must not touch. (tests/tests/deploy.rs runs the real image under a real
//! containerd.)

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const V2_SITE: &str = r#"version = 2
root = "/var/lib/containerd"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.9"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
"#;
/// What `containerd config default` writes on 2.2: conf.d imported.
const V3_SITE_CONF_D: &str =
    "version = 3\nimports = ['/etc/containerd/conf.d/*.toml']\nroot = '/var/lib/containerd'\n";
/// containerd 2.0/2.1 style: no imports.
const V3_SITE: &str = "version = 3\nroot = '/var/lib/containerd'\n\n[plugins.'io.containerd.cri.v1.runtime']\n  enable_selinux = false\n";
const KATA_BASE: &str = "# Kata\n[hypervisor.qemu]\nkernel = \"/opt/kata/share/kata-containers/vmlinux.container\"\nimage = \"/opt/kata/share/kata-containers/kata-containers.img\"\nkernel_params = \"\"\n";

struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    /// A node with Kata installed by kata-deploy and containerd's config.toml.
    fn new(containerd: &str) -> Self {
        // On tmpfs where there is one: the installer fsyncs every write, and the kill tests
        // run it hundreds of times.
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::tempdir_in(shm)
        } else {
            tempfile::tempdir()
        }
        .expect("tmp");
        let n = Node { dir };
        let rt = "opt/kata/share/defaults/kata-containers/runtimes/qemu";
        n.write(
            &format!("{rt}/configuration-qemu.toml"),
            KATA_BASE.as_bytes(),
            0o644,
        );
        std::os::unix::fs::symlink(
            "runtimes/qemu/configuration-qemu.toml",
            n.root()
                .join("opt/kata/share/defaults/kata-containers/configuration-qemu.toml"),
        )
        .expect("link");
        n.write(
            "opt/kata/share/kata-containers/kata-containers-initrd.img",
            b"KATA",
            0o644,
        );
        n.write("opt/kata/bin/containerd-shim-kata-v2", b"#!kata", 0o755);
        n.write("etc/containerd/config.toml", containerd.as_bytes(), 0o644);
        n.write("restart.log", b"", 0o644);
        n
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn write(&self, rel: &str, data: &[u8], mode: u32) {
        let p = self.root().join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, data).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.root().join(rel)).unwrap_or_default()
    }

    /// Every path under the root: directories, files (mode and bytes), links.
    fn snapshot(&self) -> BTreeMap<String, String> {
        fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
            let mut entries: Vec<_> = std::fs::read_dir(dir)
                .expect("ls")
                .map(|e| e.expect("entry").path())
                .collect();
            entries.sort();
            for p in entries {
                let rel = p.strip_prefix(base).expect("rel").display().to_string();
                let m = p.symlink_metadata().expect("meta");
                let mode = m.permissions().mode() & 0o7777;
                if m.file_type().is_symlink() {
                    out.insert(
                        rel,
                        format!("link {:?}", std::fs::read_link(&p).expect("link")),
                    );
                } else if m.is_dir() {
                    out.insert(rel, format!("dir {mode:o}"));
                    walk(base, &p, out);
                } else {
                    let data = std::fs::read(&p).expect("read");
                    out.insert(
                        rel,
                        format!("file {mode:o} {}", String::from_utf8_lossy(&data)),
                    );
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(&self.root(), &self.root(), &mut out);
        out.remove("restart.log");
        out
    }

    fn restarts(&self) -> usize {
        self.read("restart.log").lines().count()
    }

    /// containerd's configuration as it reads it: config.toml, then the 2.x drop-in.
    fn containerd_config(&self) -> Vec<u8> {
        let mut all =
            std::fs::read(self.root().join("etc/containerd/config.toml")).unwrap_or_default();
        all.extend(
            std::fs::read(self.root().join("etc/containerd/conf.d/cnfs.toml")).unwrap_or_default(),
        );
        all
    }

    /// Whether containerd runs the configuration on disk: restarted after its last change,
    /// or never restarted and the configuration is the node's own (`site`).
    fn containerd_runs_what_is_on_disk(&self, site: &str) -> bool {
        let now = self.containerd_config();
        match self.read("restart.log").lines().last() {
            Some(seen) => seen == cnfs_deploy::ledger::sha256(&now),
            None => now == site.as_bytes(),
        }
    }

    fn command(&self, cmd: &str) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cnfs-deploy"));
        c.arg(cmd)
            .arg("--host-root")
            .arg(self.root())
            .arg("--payload")
            .arg(payload());
        c
    }

    fn restart_command(&self) -> String {
        format!(
            "{} {} {}",
            restart_script().display(),
            self.root().join("restart.log").display(),
            self.root().display()
        )
    }

    fn run(&self, cmd: &str, env: &[(&str, &str)]) -> Output {
        let mut c = self.command(cmd);
        c.args([
            "--restart-here",
            "--restart-command",
            &self.restart_command(),
        ]);
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().expect("run cnfs-deploy")
    }

    fn ok(&self, cmd: &str) -> String {
        let out = self.run(cmd, &[]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "cnfs-deploy {cmd}: {text}");
        text
    }
}

/// A payload laid out as the installer image has it (small stand-in bytes: nothing here
/// runs the binaries; tests/tests/deploy.rs uses the real image).
fn payload() -> PathBuf {
    static ONCE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("cnfs-deploy-payload-{}", std::process::id()));
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for rel in cnfs_deploy::install::payload_layout() {
            let p = dir.join(rel);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            let data = match rel.strip_prefix("configs/") {
                Some(c) => std::fs::read(repo.join("configs").join(c)).expect("config"),
                None => format!("payload {rel}").into_bytes(),
            };
            std::fs::write(&p, data).expect("write");
        }
        dir
    })
    .clone()
}

fn restart_script() -> PathBuf {
    static ONCE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("cnfs-deploy-restart-{}.sh", std::process::id()));
        // Logs which configuration containerd was restarted with (its hash).
        std::fs::write(
            &p,
            "#!/bin/sh\ncat \"$2/etc/containerd/config.toml\" \"$2/etc/containerd/conf.d/cnfs.toml\" \
             2>/dev/null | sha256sum | cut -d' ' -f1 >> \"$1\"\n",
        )
        .expect("script");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        p
    })
    .clone()
}

#[test]
fn install_writes_everything_once_and_a_second_run_changes_nothing() {
    let node = Node::new(V2_SITE);
    let out = node.ok("install");
    assert_eq!(node.restarts(), 1, "containerd restarted once: {out}");
    let config = node.read("etc/containerd/config.toml");
    assert!(
        config.starts_with(V2_SITE),
        "the site config is kept as it was: {config}"
    );
    assert!(
        config.contains("runtime_path = \"/opt/cnfs/bin/containerd-shim-cnfs-v2\""),
        "{config}"
    );
    assert!(
        config.contains(
            "ConfigPath = \"/opt/cnfs/share/defaults/kata-containers/configuration-cnfs.toml\""
        ),
        "{config}"
    );
    let shim: toml::Table = node.read("etc/cnfs/shim.toml").parse().expect("shim.toml");
    assert_eq!(
        shim["delegate"].as_str(),
        Some("/opt/kata/bin/containerd-shim-kata-v2")
    );
    let policy: toml::Table = node.read("etc/cnfs/policy.toml").parse().expect("policy");
    assert!(
        policy.is_empty(),
        "deny-all: no [[allow]] entry: {policy:?}"
    );
    let kata: toml::Table = node
        .read("opt/cnfs/share/defaults/kata-containers/configuration-cnfs.toml")
        .parse()
        .expect("kata config");
    assert_eq!(
        kata["hypervisor"]["qemu"]["initrd"].as_str(),
        Some("/opt/cnfs/share/kata/kata-cnfs-initrd.img")
    );
    assert_eq!(
        node.read("opt/cnfs/share/kata/kata-cnfs-initrd.img"),
        "KATApayload share/kata/cnfs-overlay.cpio.gz"
    );
    let secrets = node
        .root()
        .join("etc/cnfs/secrets")
        .metadata()
        .expect("secrets");
    assert_eq!(secrets.permissions().mode() & 0o777, 0o700);

    let before = node.snapshot();
    let again = node.ok("install");
    assert_eq!(
        node.restarts(),
        1,
        "no restart when nothing changed: {again}"
    );
    assert!(again.contains("0 file(s) changed"), "{again}");
    assert_eq!(node.snapshot(), before, "a second install changes no byte");
}

fn round_trip(site: &str) {
    let node = Node::new(site);
    let before = node.snapshot();
    node.ok("install");
    assert_ne!(node.snapshot(), before);
    let out = node.ok("uninstall");
    assert_eq!(
        node.snapshot(),
        before,
        "uninstall restores every byte: {out}"
    );
    assert_eq!(
        node.restarts(),
        2,
        "restarted after install and after uninstall: {out}"
    );
    let again = node.ok("uninstall");
    assert!(again.contains("nothing to do"), "{again}");
}

#[test]
fn uninstall_restores_a_containerd_1x_node_byte_for_byte() {
    round_trip(V2_SITE);
}

#[test]
fn uninstall_restores_a_containerd_2x_node_without_imports_byte_for_byte() {
    let node = Node::new(V3_SITE);
    node.ok("install");
    let config = node.read("etc/containerd/config.toml");
    assert!(
        config.contains("imports = [\"/etc/containerd/conf.d/cnfs.toml\"]"),
        "{config}"
    );
    assert!(node
        .read("etc/containerd/conf.d/cnfs.toml")
        .contains("io.containerd.cri.v1.runtime"));
    node.ok("uninstall");
    round_trip(V3_SITE);
}

#[test]
fn a_containerd_22_node_gets_only_the_drop_in() {
    let node = Node::new(V3_SITE_CONF_D);
    node.ok("install");
    assert_eq!(
        node.read("etc/containerd/config.toml"),
        V3_SITE_CONF_D,
        "config.toml untouched"
    );
    let drop_in: toml::Table = node
        .read("etc/containerd/conf.d/cnfs.toml")
        .parse()
        .expect("toml");
    assert_eq!(drop_in["version"].as_integer(), Some(3));
    round_trip(V3_SITE_CONF_D);
}

#[test]
fn configs_it_does_not_understand_are_left_alone_and_named() {
    let cases = [
        ("[plugins.cri]\nsystemd_cgroup = true\n", "no `version` key"),
        ("version = 2\n[plugins\n", "not valid TOML"),
        ("version = 7x\n", "not valid TOML"),
    ];
    for (config, why) in cases {
        let node = Node::new(config);
        let before = node.snapshot();
        let out = node.run("install", &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("/etc/containerd/config.toml") && err.contains(why),
            "{err}"
        );
        assert_eq!(node.snapshot(), before, "nothing written for {config:?}");
        assert_eq!(node.restarts(), 0);
    }
    let node = Node::new(V2_SITE);
    std::fs::remove_file(node.root().join("opt/kata/bin/containerd-shim-kata-v2")).expect("rm");
    let before = node.snapshot();
    let out = node.run("install", &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--kata-shim"), "{err}");
    assert_eq!(node.snapshot(), before);
}

#[test]
fn the_admins_policy_and_later_edits_are_kept() {
    let node = Node::new(V2_SITE);
    node.write(
        "etc/cnfs/policy.toml",
        b"[[allow]]\nnamespaces = [\"a\"]\n",
        0o600,
    );
    node.ok("install");
    assert_eq!(
        node.read("etc/cnfs/policy.toml"),
        "[[allow]]\nnamespaces = [\"a\"]\n"
    );
    node.ok("uninstall");
    assert_eq!(
        node.read("etc/cnfs/policy.toml"),
        "[[allow]]\nnamespaces = [\"a\"]\n"
    );

    // A policy it wrote and the admin then edited stays; an admin's later line in
    // config.toml stays while CNFS's block goes.
    let node = Node::new(V2_SITE);
    node.ok("install");
    node.write("etc/cnfs/policy.toml", b"# mine\n", 0o644);
    let config = node.read("etc/containerd/config.toml");
    node.write(
        "etc/containerd/config.toml",
        format!("{config}\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n").as_bytes(),
        0o644,
    );
    let out = node.ok("uninstall");
    assert_eq!(node.read("etc/cnfs/policy.toml"), "# mine\n", "{out}");
    let config = node.read("etc/containerd/config.toml");
    assert!(
        !config.contains("kata-cnfs") && config.contains("certs.d"),
        "{config}"
    );
    assert!(config.starts_with(V2_SITE), "{config}");
}

/// Runs `cmd` killed after its `n`th change to the node; `true` if it was killed (`false`:
/// it has fewer changes and finished).
fn killed_at(node: &Node, cmd: &str, n: usize) -> bool {
    let out = node.run(cmd, &[("CNFS_DEPLOY_ABORT_AFTER_WRITES", &n.to_string())]);
    if out.status.signal() == Some(libc_sigabrt()) {
        return true;
    }
    assert!(
        out.status.success(),
        "{cmd} with abort after {n}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    false
}

fn without_ledger(mut s: BTreeMap<String, String>) -> BTreeMap<String, String> {
    s.retain(|k, _| !k.starts_with("opt/cnfs/.deploy"));
    s
}

/// Kills install, then uninstall, after every single change each makes (directories,
/// temporary files before their rename, files, ledger saves, the restart), and checks that
/// the next run finishes the job: the same files as an uninterrupted run, byte for byte, and
/// containerd restarted after the last change of its configuration.
fn kill_anywhere(site: &str) {
    let reference = Node::new(site);
    reference.ok("install");
    let installed = without_ledger(reference.snapshot());
    let mut killed = 0;
    for n in 1.. {
        let node = Node::new(site);
        let before = node.snapshot();
        if !killed_at(&node, "install", n) {
            break;
        }
        killed += 1;
        node.ok("uninstall");
        assert_eq!(
            node.snapshot(),
            before,
            "install killed after change {n}, then uninstalled"
        );
        assert!(
            node.containerd_runs_what_is_on_disk(site),
            "install killed after change {n}, then uninstalled: containerd not restarted"
        );

        let node = Node::new(site);
        let before = node.snapshot();
        killed_at(&node, "install", n);
        node.ok("install");
        assert_eq!(
            without_ledger(node.snapshot()),
            installed,
            "install killed after change {n}, then installed again"
        );
        assert!(
            node.containerd_runs_what_is_on_disk(site),
            "install killed after change {n}, then installed again: containerd not restarted"
        );
        node.ok("uninstall");
        assert_eq!(
            node.snapshot(),
            before,
            "install killed after change {n}, installed again, uninstalled"
        );
    }
    assert!(
        killed >= 20,
        "the install makes at least 20 changes, killed {killed} times"
    );
    let mut killed = 0;
    for n in 1.. {
        let node = Node::new(site);
        let before = node.snapshot();
        node.ok("install");
        if !killed_at(&node, "uninstall", n) {
            break;
        }
        killed += 1;
        node.ok("uninstall");
        assert_eq!(
            node.snapshot(),
            before,
            "uninstall killed after change {n}, then uninstalled again"
        );
        assert!(
            node.containerd_runs_what_is_on_disk(site),
            "uninstall killed after change {n}: containerd not restarted"
        );
    }
    assert!(
        killed >= 10,
        "the uninstall makes at least 10 changes, killed {killed} times"
    );
}

#[test]
fn a_kill_at_any_point_of_a_1x_install_or_uninstall_is_finished_by_the_next_run() {
    kill_anywhere(V2_SITE);
}

#[test]
fn a_kill_at_any_point_of_a_2x_install_or_uninstall_is_finished_by_the_next_run() {
    kill_anywhere(V3_SITE);
}

fn libc_sigabrt() -> i32 {
    6
}

/// A stand-in for the API server's node PATCH endpoint (plain HTTP on loopback: what is
/// checked is the request the installer sends and how it reads the answer; the TLS set-up
/// with the service account's CA is ureq's and rustls'). Answers each request with the next
/// scripted status and body, and returns what it received.
fn api_server(answers: Vec<(u16, String)>) -> (String, std::thread::JoinHandle<Vec<String>>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", l.local_addr().expect("addr"));
    let h = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for (status, body) in answers {
            let (s, _) = l.accept().expect("accept");
            let mut r = BufReader::new(s.try_clone().expect("clone"));
            let mut head = String::new();
            let mut len = 0;
            loop {
                let mut line = String::new();
                r.read_line(&mut line).expect("line");
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().expect("length");
                }
                if line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            let mut b = vec![0; len];
            r.read_exact(&mut b).expect("body");
            seen.push(format!("{head}\n{}", String::from_utf8_lossy(&b)));
            let mut s = s;
            write!(
                s,
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .expect("answer");
        }
        seen
    });
    (url, h)
}

#[test]
fn the_node_is_labelled_after_install_and_unlabelled_before_uninstall() {
    let node = Node::new(V2_SITE);
    let account = node.dir.path().join("sa");
    std::fs::create_dir_all(&account).expect("sa");
    std::fs::write(account.join("token"), "tok-123\n").expect("token");
    let (url, server) = api_server(vec![(200, "{}".into()), (200, "{}".into())]);
    let api = [
        "--api-server",
        &url,
        "--service-account-dir",
        account.to_str().expect("utf8"),
    ];
    for cmd in ["install", "uninstall"] {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cnfs-deploy"));
        let out = c
            .arg(cmd)
            .arg("--host-root")
            .arg(node.root())
            .arg("--payload")
            .arg(payload())
            .args(["--restart-command", ""])
            .args(api)
            .env("NODE_NAME", "node-1")
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let seen = server.join().expect("server");
    assert_eq!(seen.len(), 2);
    for (req, value) in seen.iter().zip(["\"kata-cnfs\"", "null"]) {
        let lower = req.to_ascii_lowercase();
        assert!(
            req.starts_with("PATCH /api/v1/nodes/node-1 HTTP/1.1\r\n"),
            "{req}"
        );
        assert!(lower.contains("authorization: bearer tok-123\r\n"), "{req}");
        assert!(
            lower.contains("content-type: application/merge-patch+json\r\n"),
            "{req}"
        );
        let body = req.split_once("\n\n").map(|(_, b)| b).unwrap_or_default();
        assert_eq!(
            body,
            format!("{{\"metadata\":{{\"labels\":{{\"cnfs.io/runtime\":{value}}}}}}}")
        );
    }
}

#[test]
fn a_refused_label_fails_the_run_with_a_bounded_message_and_a_retry_finishes() {
    let node = Node::new(V2_SITE);
    let account = node.dir.path().join("sa");
    std::fs::create_dir_all(&account).expect("sa");
    std::fs::write(account.join("token"), "tok").expect("token");
    let huge = format!(
        "{{\"message\":\"nodes is forbidden{}\"}}",
        "x".repeat(100_000)
    );
    let (url, server) = api_server(vec![(403, huge), (200, "{}".into())]);
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_cnfs-deploy"))
            .arg("install")
            .arg("--host-root")
            .arg(node.root())
            .arg("--payload")
            .arg(payload())
            .args(["--restart-command", "", "--api-server", &url])
            .arg("--service-account-dir")
            .arg(&account)
            .env("NODE_NAME", "node-1")
            .output()
            .expect("run")
    };
    let out = run();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("403") && err.contains("nodes is forbidden"),
        "{err}"
    );
    assert!(
        err.len() < 2048,
        "the answer is echoed bounded: {} bytes",
        err.len()
    );
    let out = run();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 file(s) changed"));
    assert_eq!(server.join().expect("server").len(), 2);
}

fn failed(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "expected a refusal: {err}");
    err
}

#[test]
fn a_config_toml_that_is_a_link_stays_a_link_and_its_target_is_edited_and_restored() {
    // Absolute (a host path: the installer must not follow it inside its own container)
    // and relative links, as distributions and k3s-style layouts have them.
    for target in [
        "/etc/containerd-site/config.toml",
        "../containerd-site/config.toml",
    ] {
        let node = Node::new(V2_SITE);
        let link = node.root().join("etc/containerd/config.toml");
        std::fs::remove_file(&link).expect("rm");
        node.write("etc/containerd-site/config.toml", V2_SITE.as_bytes(), 0o644);
        std::os::unix::fs::symlink(target, &link).expect("link");
        let before = node.snapshot();
        let out = node.ok("install");
        assert_eq!(
            std::fs::read_link(&link).expect("still a link").to_str(),
            Some(target),
            "{out}"
        );
        let edited = node.read("etc/containerd-site/config.toml");
        assert!(
            edited.starts_with(V2_SITE) && edited.contains("runtimes.kata-cnfs]"),
            "the link's target got the runtime: {edited}"
        );
        assert!(node.ok("install").contains("0 file(s) changed"));
        let out = node.ok("uninstall");
        assert_eq!(node.snapshot(), before, "link {target}: {out}");
    }
}

#[test]
fn a_comment_quoting_the_begin_marker_is_not_taken_for_the_block() {
    let site = V2_SITE.replace(
        "root = ",
        &format!(
            "# cnfs-deploy writes its runtime after \"{}\"\nroot = ",
            cnfs_deploy::containerd::BEGIN
        ),
    );
    let node = Node::new(&site);
    let before = node.snapshot();
    node.ok("install");
    let once = node.read("etc/containerd/config.toml");
    assert!(once.starts_with(&site), "{once}");
    let again = node.ok("install");
    assert!(again.contains("0 file(s) changed"), "{again}");
    assert_eq!(node.read("etc/containerd/config.toml"), once);
    // Uninstall after an admin's edit takes out the block only, not what follows the quote.
    node.write(
        "etc/containerd/config.toml",
        format!("{once}# admin\n").as_bytes(),
        0o644,
    );
    node.ok("uninstall");
    assert_eq!(
        node.read("etc/containerd/config.toml"),
        format!("{site}# admin\n")
    );
    node.write("etc/containerd/config.toml", site.as_bytes(), 0o644);
    assert_eq!(node.snapshot(), before);
}

#[test]
fn an_admins_edit_made_before_a_later_install_survives_uninstall() {
    // The admin edits outside and inside the block; the next install (a restarted pod, an
    // upgrade) rewrites the block; uninstall must keep the admin's own edit.
    let node = Node::new(V2_SITE);
    node.ok("install");
    let config = node.read("etc/containerd/config.toml");
    let registry = "\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n";
    node.write(
        "etc/containerd/config.toml",
        format!("{config}{registry}")
            .replace(
                "privileged_without_host_devices = true",
                "privileged_without_host_devices = false",
            )
            .as_bytes(),
        0o644,
    );
    let out = node.ok("install");
    assert!(
        out.contains("1 file(s) changed"),
        "the block rewritten: {out}"
    );
    let out = node.ok("uninstall");
    assert_eq!(
        node.read("etc/containerd/config.toml"),
        format!("{V2_SITE}{registry}"),
        "{out}"
    );

    // containerd upgraded to 2.x between two installs (config migrated to version 3):
    // uninstall must not put the 1.x config back.
    let node = Node::new(V2_SITE);
    node.ok("install");
    node.write("etc/containerd/config.toml", V3_SITE.as_bytes(), 0o644);
    node.ok("install");
    let out = node.ok("uninstall");
    let config: toml::Table = node
        .read("etc/containerd/config.toml")
        .parse()
        .expect("toml");
    assert_eq!(config["version"].as_integer(), Some(3), "{out}");
    assert_eq!(
        config["imports"].as_array().map(Vec::len),
        Some(0),
        "the drop-in's import taken out: {config:?}"
    );
    assert!(!node.root().join("etc/containerd/conf.d/cnfs.toml").exists());
}

#[test]
fn a_private_config_toml_keeps_its_mode() {
    // config.toml may hold registry credentials: the install must not make it readable.
    let node = Node::new(V2_SITE);
    let config = node.root().join("etc/containerd/config.toml");
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    node.ok("install");
    let mode = config.metadata().expect("meta").permissions().mode() & 0o7777;
    assert_eq!(mode, 0o600, "mode after install: {mode:o}");
}

#[test]
fn a_failed_restart_is_retried_by_the_next_run() {
    let node = Node::new(V2_SITE);
    let out = node
        .command("install")
        .args(["--restart-here", "--restart-command", "false"])
        .output()
        .expect("run");
    let err = failed(&out);
    assert!(err.contains("`false` failed"), "{err}");
    let out = node.ok("install");
    assert_eq!(node.restarts(), 1, "restarted by the second run: {out}");
    assert!(node.containerd_runs_what_is_on_disk(V2_SITE), "{out}");
    node.ok("install");
    assert_eq!(node.restarts(), 1, "and only once");
}

#[test]
fn a_directory_in_place_of_policy_toml_is_refused_before_any_write() {
    let node = Node::new(V2_SITE);
    std::fs::create_dir_all(node.root().join("etc/cnfs/policy.toml")).expect("mkdir");
    let before = node.snapshot();
    let err = failed(&node.run("install", &[]));
    assert!(
        err.contains("/etc/cnfs/policy.toml is a directory"),
        "{err}"
    );
    assert_eq!(node.snapshot(), before, "nothing written");
}

#[test]
fn a_dangling_policy_link_is_the_admins_and_outlives_install_and_uninstall() {
    let node = Node::new(V2_SITE);
    std::fs::create_dir_all(node.root().join("etc/cnfs")).expect("mkdir");
    let link = node.root().join("etc/cnfs/policy.toml");
    std::os::unix::fs::symlink("/etc/site/cnfs-policy.toml", &link).expect("link");
    let before = node.snapshot();
    let out = node.ok("install");
    assert!(out.contains("kept /etc/cnfs/policy.toml"), "{out}");
    assert!(link
        .symlink_metadata()
        .expect("link")
        .file_type()
        .is_symlink());
    assert!(
        !node.root().join("etc/site").exists(),
        "nothing written through it"
    );
    node.ok("uninstall");
    assert_eq!(node.snapshot(), before);
}

#[test]
fn an_invalid_node_name_is_refused_before_any_write() {
    let node = Node::new(V2_SITE);
    let account = node.dir.path().join("sa");
    std::fs::create_dir_all(&account).expect("sa");
    std::fs::write(account.join("token"), "tok").expect("token");
    let before = node.snapshot();
    let out = node
        .command("install")
        .args(["--restart-command", ""])
        // Never contacted: the name is refused first.
        .args(["--api-server", "http://127.0.0.1:9"])
        .arg("--service-account-dir")
        .arg(&account)
        .env("NODE_NAME", "Node_1/../x")
        .output()
        .expect("run");
    let err = failed(&out);
    assert!(
        err.contains("NODE_NAME \"Node_1/../x\" is not a Kubernetes node name")
            || err.contains("NODE_NAME Node_1/../x is not a Kubernetes node name"),
        "{err}"
    );
    assert_eq!(node.snapshot(), before, "nothing written");
}

#[test]
fn uninstall_without_the_saved_original_takes_only_cnfs_part_out_of_config_toml() {
    let node = Node::new(V2_SITE);
    let before = node.snapshot();
    node.ok("install");
    std::fs::remove_dir_all(node.root().join("opt/cnfs/.deploy/originals")).expect("rm");
    let out = node.ok("uninstall");
    assert_eq!(node.snapshot(), before, "{out}");
}

#[test]
fn uninstall_leaves_a_config_toml_the_admin_deleted_deleted() {
    let node = Node::new(V2_SITE);
    node.ok("install");
    std::fs::remove_file(node.root().join("etc/containerd/config.toml")).expect("rm");
    let out = node.ok("uninstall");
    assert!(
        !node.root().join("etc/containerd/config.toml").exists(),
        "uninstall created config.toml again: {out}"
    );
}

#[test]
fn install_and_uninstall_started_together_take_turns() {
    for round in 0..12 {
        let node = Node::new(V2_SITE);
        let before = node.snapshot();
        let spawn = |cmd: &str| {
            node.command(cmd)
                .args([
                    "--restart-here",
                    "--restart-command",
                    &node.restart_command(),
                ])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn")
        };
        // Uninstall first: it finds the ledger the install is writing.
        let install = spawn("install");
        std::thread::sleep(std::time::Duration::from_millis(round));
        let uninstall = spawn("uninstall");
        for (what, child) in [("install", install), ("uninstall", uninstall)] {
            let out = child.wait_with_output().expect("wait");
            assert!(
                out.status.success(),
                "round {round}: {what}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        node.ok("uninstall");
        assert_eq!(node.snapshot(), before, "round {round}");
        assert!(
            node.containerd_runs_what_is_on_disk(V2_SITE),
            "round {round}"
        );
    }
}

/// Runs `cnfs-deploy install` with the node's `rel` directory mounted read-only (in a mount
/// namespace of its own); `None` where this test cannot make mounts (not root).
fn install_with_read_only(node: &Node, rel: &str) -> Option<Output> {
    let can = Command::new("unshare")
        .args(["-m", "true"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !can {
        return None;
    }
    let mut c = Command::new("unshare");
    c.args([
        "-m",
        "sh",
        "-c",
        "mount --bind \"$0\" \"$0\" && mount -o remount,ro,bind \"$0\" \"$0\" && exec \"$@\"",
    ])
    .arg(node.root().join(rel))
    .arg(env!("CARGO_BIN_EXE_cnfs-deploy"))
    .arg("install")
    .arg("--host-root")
    .arg(node.root())
    .arg("--payload")
    .arg(payload())
    .args([
        "--restart-here",
        "--restart-command",
        &node.restart_command(),
    ]);
    Some(c.output().expect("run"))
}

#[test]
fn a_read_only_etc_is_refused_before_any_write() {
    let node = Node::new(V2_SITE);
    let before = node.snapshot();
    let Some(out) = install_with_read_only(&node, "etc") else {
        eprintln!("skipped: cannot make a read-only mount here (needs root)");
        return;
    };
    let err = failed(&out);
    assert!(
        err.contains("/etc/cnfs/shim.toml: cannot write in /etc") && err.contains("read-only"),
        "{err}"
    );
    assert_eq!(node.snapshot(), before, "nothing written");
}

/// Configs that are unusual but valid, each installed twice and uninstalled: the second
/// install changes nothing, uninstall restores every byte.
#[test]
fn unusual_but_valid_configs_round_trip_byte_for_byte() {
    let crlf = V2_SITE.replace('\n', "\r\n");
    let no_newline = V2_SITE.trim_end().to_string();
    let dotted = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\ncontainerd.default_runtime_name = \"runc\"\ncontainerd.runtimes.runc.runtime_type = \"io.containerd.runc.v2\"\n".to_string();
    let v3_duplicates =
        "version = 3\nimports = [\"/etc/containerd/site.toml\", \"/etc/containerd/site.toml\"]\n"
            .to_string();
    for site in [crlf, no_newline, dotted, v3_duplicates] {
        let node = Node::new(&site);
        let before = node.snapshot();
        node.ok("install");
        let again = node.ok("install");
        assert!(again.contains("0 file(s) changed"), "{site:?}: {again}");
        node.ok("uninstall");
        assert_eq!(node.snapshot(), before, "{site:?}");
    }
    // A relative `imports` glob that covers conf.d: config.toml is not touched.
    let site = "version = 3\nimports = [\"conf.d/*.toml\"]\n";
    let node = Node::new(site);
    node.ok("install");
    assert_eq!(node.read("etc/containerd/config.toml"), site);
}

#[test]
fn what_the_installer_cannot_safely_change_is_refused_before_any_write() {
    let inline = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  runtimes = { runc = { runtime_type = \"io.containerd.runc.v2\" } }\n";
    let node = Node::new(inline);
    let before = node.snapshot();
    let err = failed(&node.run("install", &[]));
    assert!(
        err.contains("/etc/containerd/config.toml with the runtime appended"),
        "{err}"
    );
    assert_eq!(node.snapshot(), before, "inline tables");

    // Kata's configuration a link loop.
    let node = Node::new(V2_SITE);
    let defaults = node.root().join("opt/kata/share/defaults/kata-containers");
    std::fs::remove_file(defaults.join("configuration-qemu.toml")).expect("rm");
    std::os::unix::fs::symlink("loop.toml", defaults.join("configuration-qemu.toml")).expect("a");
    std::os::unix::fs::symlink("configuration-qemu.toml", defaults.join("loop.toml")).expect("b");
    let before = node.snapshot();
    let err = failed(&node.run("install", &[]));
    assert!(
        err.contains("configuration-qemu.toml: more than 16 symbolic links"),
        "{err}"
    );
    assert_eq!(node.snapshot(), before, "Kata's link loop");

    // A ledger that is not one (truncated): neither install nor uninstall touches anything.
    let node = Node::new(V2_SITE);
    node.ok("install");
    let ledger = node.root().join("opt/cnfs/.deploy/ledger.json");
    let text = std::fs::read(&ledger).expect("ledger");
    std::fs::write(&ledger, &text[..text.len() / 2]).expect("truncate");
    let before = node.snapshot();
    for cmd in ["install", "uninstall"] {
        let err = failed(&node.run(cmd, &[]));
        assert!(
            err.contains("/opt/cnfs/.deploy/ledger.json is not a cnfs-deploy ledger"),
            "{cmd}: {err}"
        );
        assert_eq!(node.snapshot(), before, "{cmd} with a truncated ledger");
    }
}

#[test]
fn a_node_installed_by_hand_before_is_refused_instead_of_growing_the_initrd_each_run() {
    // configs/README.md's appendix puts CNFS's drop-in into Kata's own config.d, so Kata's
    // configuration names CNFS's initrd: deriving from it would append the overlay to the
    // installer's own output on every run.
    let node = Node::new(V2_SITE);
    let drop_in = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/kata/qemu/config.d/50-cnfs.toml"),
    )
    .expect("drop-in");
    node.write(
        "opt/kata/share/defaults/kata-containers/runtimes/qemu/config.d/50-cnfs.toml",
        &drop_in,
        0o644,
    );
    node.write(
        "opt/cnfs/share/kata/kata-cnfs-initrd.img",
        b"KATA+CNFS",
        0o644,
    );
    let before = node.snapshot();
    let err = failed(&node.run("install", &[]));
    assert!(
        err.contains("/opt/cnfs/share/kata/kata-cnfs-initrd.img") && err.contains("--kata-initrd"),
        "{err}"
    );
    assert_eq!(node.snapshot(), before, "nothing written");
    // Named explicitly, Kata's initrd is used and a second run changes nothing.
    let kata_initrd = "/opt/kata/share/kata-containers/kata-containers-initrd.img";
    let run = || {
        node.command("install")
            .args([
                "--restart-here",
                "--restart-command",
                &node.restart_command(),
            ])
            .args(["--kata-initrd", kata_initrd])
            .output()
            .expect("run")
    };
    assert!(run().status.success());
    let again = String::from_utf8_lossy(&run().stdout).into_owned();
    assert!(again.contains("0 file(s) changed"), "{again}");

    // Pointed at the CNFS configuration itself: refused too.
    let node = Node::new(V2_SITE);
    node.ok("install");
    let out = node
        .command("install")
        .args(["--restart-command", ""])
        .args([
            "--kata-config",
            "/opt/cnfs/share/defaults/kata-containers/configuration-cnfs.toml",
        ])
        .output()
        .expect("run");
    let err = failed(&out);
    assert!(err.contains("is CNFS's own"), "{err}");
}

#[test]
fn a_failing_restart_commands_output_is_echoed_bounded() {
    let node = Node::new(V2_SITE);
    let script = node.dir.path().join("noisy.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\nhead -c 100000 /dev/zero | tr '\\0' x >&2\nexit 3\n",
    )
    .expect("script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = node
        .command("install")
        .args(["--restart-here", "--restart-command"])
        .arg(&script)
        .output()
        .expect("run");
    let err = failed(&out);
    assert!(
        err.contains("failed (exit status: 3): xxx"),
        "{}",
        &err[..err.len().min(300)]
    );
    assert!(err.len() < 2048, "echoed bounded: {} bytes", err.len());
}

#[test]
fn a_file_in_place_of_etc_cnfs_is_refused_before_any_write() {
    let node = Node::new(V2_SITE);
    node.write("etc/cnfs", b"not a directory", 0o644);
    let before = node.snapshot();
    let err = failed(&node.run("install", &[]));
    assert!(
        err.contains("/etc/cnfs/shim.toml: /etc/cnfs is not a directory"),
        "{err}"
    );
    assert_eq!(node.snapshot(), before, "nothing written");
}
