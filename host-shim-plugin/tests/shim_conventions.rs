//! containerd's command-like shim flags on the real wrapper binary (runtime v2 README, "Command-
//! like flags"): `-v` prints the version and exits; `-info` reads the runtime options on stdin
//! and prints the RuntimeInfo protobuf, which the wrapper takes from its delegate unchanged
//! (bytes, stderr and exit status). Tested against a stand-in delegate that echoes what it got,
//! and against Debian's real containerd 1.6 runc shim, which predates `-info` (containerd 2.x
//! asks for it; 1.6 does not, so here the delegate's own refusal must come back unchanged).

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

fn wrapper() -> Command {
    Command::new(env!("CARGO_BIN_EXE_containerd-shim-cnfs-v2"))
}

fn config(dir: &Path, delegate: &str) -> std::path::PathBuf {
    let p = dir.join("shim.toml");
    std::fs::write(&p, format!("delegate = \"{delegate}\"\n")).expect("config");
    p
}

fn run_with_stdin(mut cmd: Command, stdin: &[u8]) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("write");
    child.wait_with_output().expect("wait")
}

#[test]
fn dash_v_prints_the_version_and_starts_nothing() {
    let dir = std::env::temp_dir().join(format!("cnfs-shim-v-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    // A delegate that would leave a mark if it were started.
    let mark = dir.join("started");
    let delegate = dir.join("delegate.sh");
    std::fs::write(&delegate, format!("#!/bin/sh\ntouch {}\n", mark.display())).expect("w");
    std::fs::set_permissions(&delegate, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    for flag in ["-v", "-version", "--version"] {
        let out = wrapper()
            .arg(flag)
            .env(
                "CNFS_SHIM_CONFIG",
                config(&dir, &delegate.display().to_string()),
            )
            .output()
            .expect("run");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{flag}: {out:?}");
        assert!(
            text.contains("containerd-shim-cnfs-v2") && text.contains(env!("CARGO_PKG_VERSION")),
            "{flag}: {text}"
        );
    }
    assert!(!mark.exists(), "-v started the delegate");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dash_info_returns_the_delegates_answer_byte_for_byte() {
    let dir = std::env::temp_dir().join(format!("cnfs-shim-info-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    // Stand-in delegate: answers with its arguments, then the options it read, unchanged.
    let delegate = dir.join("delegate.sh");
    std::fs::write(
        &delegate,
        "#!/bin/sh\nprintf 'args:%s|' \"$*\"\ncat\nprintf 'warned\\n' >&2\nexit 0\n",
    )
    .expect("w");
    std::fs::set_permissions(&delegate, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let options: Vec<u8> = (0u8..=255).collect();
    let mut cmd = wrapper();
    cmd.args(["-namespace", "k8s.io", "-info"]).env(
        "CNFS_SHIM_CONFIG",
        config(&dir, &delegate.display().to_string()),
    );
    let out = run_with_stdin(cmd, &options);
    assert!(out.status.success(), "{out:?}");
    let mut want = b"args:-namespace k8s.io -info|".to_vec();
    want.extend_from_slice(&options);
    assert_eq!(
        out.stdout, want,
        "the RuntimeInfo bytes must pass unchanged"
    );
    assert_eq!(out.stderr, b"warned\n");

    // A delegate that fails: its status and message come back as they are.
    std::fs::write(&delegate, "#!/bin/sh\necho 'no info here' >&2\nexit 3\n").expect("w");
    let out = run_with_stdin(
        {
            let mut c = wrapper();
            c.arg("-info").env(
                "CNFS_SHIM_CONFIG",
                config(&dir, &delegate.display().to_string()),
            );
            c
        },
        b"",
    );
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(out.stderr, b"no info here\n");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dash_info_with_containerd_16s_runc_shim_returns_its_own_refusal() {
    let runc = "/usr/bin/containerd-shim-runc-v2";
    assert!(Path::new(runc).exists(), "the test bed installs containerd");
    let dir = std::env::temp_dir().join(format!("cnfs-shim-info16-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let direct = run_with_stdin(
        {
            let mut c = Command::new(runc);
            c.arg("-info");
            c
        },
        b"",
    );
    let mut cmd = wrapper();
    cmd.arg("-info").env("CNFS_SHIM_CONFIG", config(&dir, runc));
    let wrapped = run_with_stdin(cmd, b"");
    assert_eq!(wrapped.status.code(), direct.status.code());
    assert_eq!(wrapped.stdout, direct.stdout);
    assert_eq!(wrapped.stderr, direct.stderr);
    assert!(
        String::from_utf8_lossy(&wrapped.stderr).contains("-info"),
        "{wrapped:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
