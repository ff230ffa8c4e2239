//! containerd-shim-cnfs-v2: see `cnfs_host_shim::shim` for the design.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cnfs_host::policy::Policy;
use cnfs_host_shim::shim::config::{self, ShimConfig};
use cnfs_host_shim::shim::delegate::Delegate;
use cnfs_host_shim::shim::{self, proxy, sandbox::Sandbox, Args};
use slog::{o, Drain};

/// The delegate binary used at `start`, remembered in the bundle for `delete`.
const DELEGATE_FILE: &str = "cnfs-delegate";

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let result = Args::parse(&argv)
        .map_err(anyhow::Error::msg)
        .and_then(|args| match args.action.as_deref() {
            _ if args.version => {
                println!(
                    "containerd-shim-cnfs-v2:\n  Version: {}\n  (wraps the delegate shim named in {})",
                    env!("CARGO_PKG_VERSION"),
                    config_path().display()
                );
                Ok(())
            }
            _ if args.info => info(&args),
            Some("start") => start(&args),
            Some("delete") => delete(&args),
            None => serve(&args),
            Some(other) => bail!("unknown action {other:?} (start, delete)"),
        });
    if let Err(e) = result {
        eprintln!("containerd-shim-cnfs-v2: {e:#}");
        std::process::exit(1);
    }
}

fn config_path() -> PathBuf {
    let argv0 = std::env::args().next().unwrap_or_default();
    config::path_for(std::env::var_os("CNFS_SHIM_CONFIG"), &argv0)
}

/// `start`: make sure the sandbox's wrapper runs and print its address.
fn start(args: &Args) -> anyhow::Result<()> {
    let bundle = std::env::current_dir().context("bundle directory")?;
    let mut options = Vec::new();
    std::io::stdin()
        .read_to_end(&mut options)
        .context("reading runtime options")?;
    let cfg_path = config_path();
    let cfg = ShimConfig::load(&cfg_path)?;
    // A broken policy fails the sandbox here, loudly: containerd reports this error (naming
    // the file, line and key) as the pod's, instead of a server that never listens.
    if let Some(policy) = &cfg.policy {
        Policy::load(policy)?;
    }
    let group = shim::group_id(&bundle, &args.id);
    let dir = Path::new(shim::SOCKET_DIR);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let socket = shim::socket_path(dir, &args.address, &args.namespace, &group);
    let _ = std::fs::write(bundle.join(DELEGATE_FILE), &cfg.delegate);
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        // Another container of a sandbox whose wrapper (and delegate) already run.
        println!("unix://{}", socket.display());
        return Ok(());
    }
    let _ = std::fs::remove_file(&socket);

    // The delegate's own `start`, with the same flags, stdin and environment.
    let out = run_delegate(
        &cfg.delegate,
        &args.passthrough,
        "start",
        &options,
        Some(&bundle),
    )?;
    if !out.status.success() {
        bail!(
            "delegate shim {} start failed: {}",
            cfg.delegate,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let delegate = shim::parse_shim_address(&String::from_utf8_lossy(&out.stdout))
        .map_err(anyhow::Error::msg)?;

    let exe = std::env::current_exe().context("own executable")?;
    let mut server = Command::new(exe);
    server
        .args(&args.passthrough)
        .arg("-socket")
        .arg(&socket)
        .arg("-delegate-address")
        .arg(&delegate)
        .arg("-config")
        .arg(&cfg_path)
        .current_dir(&bundle)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_target(&bundle));
    // std has no safe setsid for a child (process_group is setpgid, which keeps the session).
    // SAFETY: the hook runs between fork and exec and only makes the setsid(2) system call,
    // which is async-signal-safe and allocates nothing: the server outlives `start`.
    unsafe {
        server.pre_exec(|| {
            let _ = nix::unistd::setsid();
            Ok(())
        });
    }
    server.spawn().context("starting the wrapper server")?;
    let until = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if Instant::now() > until {
            bail!(
                "the wrapper server did not listen on {} in time",
                socket.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("unix://{}", socket.display());
    Ok(())
}

/// containerd reads shim logs from the `log` fifo in the bundle when it has one.
fn log_target(bundle: &Path) -> Stdio {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(bundle.join("log"))
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null())
}

/// Runs the delegate shim with containerd's flags and `action`, `options` on its stdin (the
/// runtime options containerd passed us), and collects its output.
fn run_delegate(
    delegate: &str,
    flags: &[String],
    action: &str,
    options: &[u8],
    cwd: Option<&Path>,
) -> anyhow::Result<std::process::Output> {
    let mut cmd = Command::new(delegate);
    cmd.args(flags)
        .arg(action)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting the delegate shim {delegate:?}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(options)
            .context("passing runtime options to the delegate")?;
    }
    child
        .wait_with_output()
        .with_context(|| format!("waiting for the delegate's {action}"))
}

/// `-info` (containerd 2.x asks every shim for its RuntimeInfo): the delegate's answer,
/// byte for byte, for the same options on stdin; its exit status and stderr too. The wrapper
/// adds nothing to the runtime's features.
fn info(args: &Args) -> anyhow::Result<()> {
    let mut options = Vec::new();
    std::io::stdin()
        .read_to_end(&mut options)
        .context("reading runtime options")?;
    let cfg = ShimConfig::load(&config_path())?;
    let out = run_delegate(&cfg.delegate, &args.passthrough, "-info", &options, None)?;
    std::io::stdout().write_all(&out.stdout)?;
    std::io::stderr().write_all(&out.stderr)?;
    std::process::exit(out.status.code().unwrap_or(1));
}

/// `delete`: the delegate cleans up its own state; its answer goes back unchanged.
fn delete(args: &Args) -> anyhow::Result<()> {
    let bundle = args
        .bundle
        .as_ref()
        .map(PathBuf::from)
        .or_else(|| std::env::current_dir().ok())
        .context("no bundle")?;
    let delegate = std::fs::read_to_string(bundle.join(DELEGATE_FILE))
        .ok()
        .filter(|d| !d.trim().is_empty())
        .map(|d| d.trim().to_string())
        .map_or_else(|| ShimConfig::load(&config_path()).map(|c| c.delegate), Ok)?;
    let out = Command::new(&delegate)
        .args(&args.passthrough)
        .arg("delete")
        .current_dir(&bundle)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {delegate} delete"))?;
    std::io::stdout().write_all(&out.stdout)?;
    std::io::stderr().write_all(&out.stderr)?;
    std::process::exit(out.status.code().unwrap_or(1));
}

/// The long-lived server (started by `start`).
fn serve(args: &Args) -> anyhow::Result<()> {
    let socket = PathBuf::from(args.socket.as_deref().context("-socket is required")?);
    let delegate = PathBuf::from(
        args.delegate_address
            .as_deref()
            .context("-delegate-address is required")?,
    );
    let cfg = ShimConfig::load(Path::new(
        args.config.as_deref().unwrap_or(config::DEFAULT_PATH),
    ))?;
    let drain = slog_json::Json::new(std::io::stderr())
        .add_default_keys()
        .build();
    // `-debug` (containerd's shim flag) lets debug lines through; info and up otherwise.
    let level = if args.debug {
        slog::Level::Debug
    } else {
        slog::Level::Info
    };
    let log = slog::Logger::root(
        slog::LevelFilter::new(Mutex::new(drain).map(slog::Fuse), level).fuse(),
        o!("name" => "containerd-shim-cnfs-v2", "id" => args.id.clone(), "pid" => std::process::id()),
    );
    let sandbox = Arc::new(Sandbox::new(cfg, log.clone())?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let _ = std::fs::remove_file(&socket);
        let listener = tokio::net::UnixListener::bind(&socket)
            .with_context(|| format!("binding {}", socket.display()))?;
        let delegate = Arc::new(Delegate::new(delegate, args.id.clone()));
        proxy::serve(listener, delegate, sandbox, log).await;
        let _ = std::fs::remove_file(&socket);
        anyhow::Ok(())
    })
}
