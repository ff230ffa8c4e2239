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
        let dir = tempfile::tempdir().expect("tmp");
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

    fn run(&self, cmd: &str, env: &[(&str, &str)]) -> Output {
        let payload = payload();
        let restart = format!(
            "{} {}",
            restart_script().display(),
            self.root().join("restart.log").display()
        );
        let mut c = Command::new(env!("CARGO_BIN_EXE_cnfs-deploy"));
        c.arg(cmd)
            .arg("--host-root")
            .arg(self.root())
            .arg("--payload")
            .arg(payload)
            .args(["--restart-here", "--restart-command", &restart]);
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
        std::fs::write(&p, "#!/bin/sh\necho restart >> \"$1\"\n").expect("script");
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

#[test]
fn a_kill_at_any_write_is_finished_by_install_and_undone_by_uninstall() {
    let reference = Node::new(V2_SITE);
    reference.ok("install");
    let mut installed = reference.snapshot();
    installed.retain(|k, _| !k.starts_with("opt/cnfs/.deploy"));
    let writes = installed.len();
    let mut killed = 0;
    for n in 1..=writes {
        let n = n.to_string();
        let node = Node::new(V2_SITE);
        let before = node.snapshot();
        let out = node.run("install", &[("CNFS_DEPLOY_ABORT_AFTER_WRITES", &n)]);
        if out.status.signal() != Some(libc_sigabrt()) {
            // Fewer writes than n: the run finished.
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            continue;
        }
        killed += 1;
        node.ok("uninstall");
        assert_eq!(
            node.snapshot(),
            before,
            "killed after write {n}, then uninstalled"
        );

        let node = Node::new(V2_SITE);
        let _ = node.run("install", &[("CNFS_DEPLOY_ABORT_AFTER_WRITES", &n)]);
        node.ok("install");
        let mut now = node.snapshot();
        now.retain(|k, _| !k.starts_with("opt/cnfs/.deploy"));
        assert_eq!(
            now, installed,
            "killed after write {n}, then installed again"
        );
    }
    assert!(
        killed >= 8,
        "the install has at least 8 writes, killed {killed} times"
    );
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
