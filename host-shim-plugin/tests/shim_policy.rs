//! A sandbox under a broken policy fails loudly: the wrapper's `start` (whose error containerd
//! reports as the pod's) and its server refuse to run, naming the policy file, line and key.

use std::path::Path;
use std::process::{Command, Stdio};

use cnfs_host_shim::shim::config::ShimConfig;
use cnfs_host_shim::shim::sandbox::Sandbox;
use cnfs_testbed::TempDir;

const TYPO: &str = "# team A\n[[allow]]\nnamespaces = [\"team-a\"]\nfilesystems = [\"nsf\"]\n\
                    servers = [\"10.0.0.0/8\"]\nexport_prefixes = [\"/exports\"]\n";

fn write_config(dir: &Path, policy: &str) -> std::path::PathBuf {
    let p = dir.join("policy.toml");
    std::fs::write(&p, policy).expect("policy");
    let cfg = dir.join("shim.toml");
    // A delegate that does not exist: nothing may get as far as starting it.
    std::fs::write(
        &cfg,
        format!(
            "delegate = \"{}\"\npolicy = \"{}\"\n",
            dir.join("no-such-delegate").display(),
            p.display()
        ),
    )
    .expect("config");
    cfg
}

#[test]
fn start_refuses_a_policy_with_a_typo_naming_file_line_and_key() {
    let dir = TempDir::new("shim-policy-start").expect("temp dir");
    let cfg = write_config(dir.path(), TYPO);
    let out = Command::new(env!("CARGO_BIN_EXE_containerd-shim-cnfs-v2"))
        .args([
            "-namespace",
            "k8s.io",
            "-address",
            "/run/containerd/containerd.sock",
            "-id",
            "sb1",
            "start",
        ])
        .env("CNFS_SHIM_CONFIG", &cfg)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("run the shim");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let want = format!(
        "policy file {}, line 4: allow[0].filesystems: \"nsf\" is not a file system CNFS mounts (nfs, cephfs, smb, fuse)",
        dir.path().join("policy.toml").display()
    );
    assert!(err.contains(&want), "{err}");
    assert!(out.stdout.is_empty(), "no address printed");
}

#[test]
fn a_sandbox_under_a_broken_policy_does_not_start() {
    let dir = TempDir::new("shim-policy-sandbox").expect("temp dir");
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        TYPO.replace("[\"nsf\"]", "[\"nfs\"]")
            .replace("[\"/exports\"]", "[\"/x/../y\"]"),
    )
    .expect("policy");
    let cfg = ShimConfig {
        policy: Some(policy),
        ..ShimConfig::default()
    };
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let e = match Sandbox::new(cfg, log) {
        Ok(_) => panic!("a broken policy must not load"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("line 6: allow[0].export_prefixes: \"/x/../y\" must be a clean path"),
        "{e}"
    );
}
