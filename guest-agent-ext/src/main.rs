//! cnfs-agent entry point: logging, privileges, re-learning mounts, then serving ttrpc on
//! vsock (host only) and a local unix socket until SIGTERM/SIGINT.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use cnfs_agent::gate::{Gate, Limits};
use cnfs_agent::tools::{self, ToolClient};
use cnfs_agent::volumes::{Config, Volumes};
use cnfs_agent::{listen, logging, privileges, service, service::Service};
use cnfs_protocols::{spec, transport::DEFAULT_AGENT_PORT};
use slog::{error, info};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "CNFS guest agent: kernel mounts of NFS/CephFS on request from the host"
)]
struct Args {
    /// vsock port to serve the host on (0 disables vsock).
    #[arg(long, default_value_t = DEFAULT_AGENT_PORT)]
    vsock_port: u32,
    /// Local unix socket for in-guest tools ("" disables it).
    #[arg(long, default_value = "/run/cnfs/agent.sock")]
    unix_socket: PathBuf,
    /// Directory for the per-volume state files (spec without secrets).
    #[arg(long, default_value = "/run/cnfs/state")]
    state_dir: PathBuf,
    /// Kernel modules directory (default: /lib/modules/<running release>).
    #[arg(long)]
    modules_dir: Option<PathBuf>,
    /// Sandbox id (gives the NFSv4 client identity); else taken from the first request.
    #[arg(long)]
    sandbox_id: Option<String>,
    /// Default deadline for a mount, in seconds.
    #[arg(long, default_value_t = 30)]
    mount_timeout: u64,
    /// Default bound for an unmount (all escalation steps), in seconds.
    #[arg(long, default_value_t = 10)]
    unmount_timeout: u64,
    /// Default bound for the Stats health probe, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    probe_timeout_ms: u64,
    /// Run without the system call allowlist (for diagnosing a call the filter refuses).
    #[arg(long)]
    no_seccomp: bool,
    /// Start no tool runner: encrypted volumes (luks2, gocryptfs) are refused.
    #[arg(long)]
    no_luks2: bool,
    /// Log level: error, warning, info, debug.
    #[arg(long, default_value = "info")]
    log_level: String,
}

fn main() -> anyhow::Result<()> {
    let argv: Vec<String> = std::env::args().collect();
    if argv
        .first()
        .is_some_and(|a| cnfs_agent::idmap::invoked_as_request_key(a))
    {
        std::process::exit(cnfs_agent::idmap::run(&argv));
    }
    if argv
        .first()
        .is_some_and(|a| tools::holder::invoked_as_holder(a))
    {
        std::process::exit(tools::holder::run(&argv));
    }
    if argv.first().is_some_and(|a| tools::invoked_as_runner(a)) {
        std::process::exit(tools::runner::run(argv));
    }
    if argv
        .first()
        .is_some_and(|a| cnfs_agent::init::invoked_as_init(a))
    {
        // Only returns on failure; the guest's real init could not be started.
        cnfs_agent::init::run(argv).map_err(anyhow::Error::msg)?;
    }
    let args = Args::parse();
    let level = args.log_level.parse::<slog::Level>().map_err(|()| {
        anyhow::anyhow!(
            "--log-level {:?}: use error, warning, info or debug",
            args.log_level
        )
    })?;
    // The guard flushes the log queue when main returns.
    let (log, _log_flush) = logging::logger(level);
    if let Some(id) = &args.sandbox_id {
        spec::validate_sandbox_id("--sandbox-id", id)?;
    }
    // Before the runtime, the capability drop and the filter: the runner must be able to exec.
    let tools = start_tool_runner(&args, &log);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(serve(args, tools, log.clone()));
    if let Err(e) = &result {
        error!(log, "cnfs-agent stopped"; "error" => format!("{e:#}"));
    }
    // Not waiting for blocking tasks: one stuck on a dead server must not keep the agent
    // from exiting (and a successor from starting).
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

/// The tool runner for LUKS2 volumes; a failure to start it disables them, nothing more.
fn start_tool_runner(args: &Args, log: &slog::Logger) -> ToolClient {
    if args.no_luks2 {
        info!(log, "tool runner not started (--no-luks2)");
        return ToolClient::disabled(
            "encrypted volumes (luks2, gocryptfs) are turned off in this guest (cnfs-agent --no-luks2)",
        );
    }
    match ToolClient::spawn(Path::new(tools::DEFAULT_TOOLS_DIR), args.no_seccomp) {
        Ok(client) => {
            match client.missing() {
                None => info!(log, "tool runner started"),
                Some(why) => info!(log, "tool runner started; luks2 volumes unavailable";
                    "why" => why),
            }
            client
        }
        Err(e) => {
            error!(log, "tool runner did not start; luks2 volumes unavailable"; "error" => %e);
            ToolClient::disabled(&format!("the tool runner did not start: {e}"))
        }
    }
}

async fn serve(args: Args, tools: ToolClient, log: slog::Logger) -> anyhow::Result<()> {
    // Doors first (binding may need privileges we are about to drop), then drop them.
    let vsock = match args.vsock_port {
        0 => None,
        port => Some(
            listen::vsock(port, log.clone())
                .with_context(|| format!("binding vsock port {port}"))?,
        ),
    };
    let unix = match args.unix_socket.as_os_str().is_empty() {
        true => None,
        false => Some(
            listen::unix(&args.unix_socket)
                .with_context(|| format!("binding {}", args.unix_socket.display()))?,
        ),
    };
    // FUSE volumes need /dev/fuse; creating it takes CAP_MKNOD, which goes with the rest.
    match cnfs_agent::fs::fuse::ensure_device_node() {
        Ok(true) => info!(log, "created /dev/fuse"),
        Ok(false) => {}
        Err(e) => info!(log, "could not create /dev/fuse; FUSE volumes will fail"; "error" => %e),
    }
    let kept =
        privileges::drop_all_but(&privileges::keep_set()).context("dropping capabilities")?;
    info!(log, "capabilities dropped"; "kept" => kept.join(","));

    let volumes = Arc::new(Volumes::new(
        Config {
            modules_dir: args
                .modules_dir
                .unwrap_or_else(cnfs_agent::kmod::default_dir),
            state_dir: args.state_dir,
            sandbox_id: args.sandbox_id,
            default_mount_timeout: Duration::from_secs(args.mount_timeout),
            max_timeout: Duration::from_secs(300),
            default_unmount_timeout: Duration::from_secs(args.unmount_timeout),
            default_probe_timeout: Duration::from_millis(args.probe_timeout_ms),
            tools,
        },
        log.clone(),
    ));
    let found = volumes
        .relearn()
        .context("re-learning mounts from mountinfo")?;
    info!(log, "volumes re-learnt"; "count" => found.len(), "names" => found.join(","));
    if args.no_seccomp {
        info!(log, "system call filter disabled (--no-seccomp)");
    } else {
        let n = cnfs_agent::seccomp::install().context("installing the system call filter")?;
        info!(log, "system call filter installed"; "allowed_calls" => n);
    }

    let service = Arc::new(Service::new(volumes, log.clone(), kept));
    let gate = Arc::new(Gate::new(Limits::default(), service::screen(), log.clone()));
    let mut server = ttrpc::r#async::Server::new()
        .add_listener(listen::merge(vsock, unix, gate, log.clone()))
        .register_service(service::services(service));
    server.start().await.context("starting the ttrpc server")?;
    info!(log, "cnfs-agent serving"; "vsock_port" => args.vsock_port,
        "unix_socket" => args.unix_socket.display().to_string());

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    info!(log, "cnfs-agent stopping; volumes stay mounted");
    // Requests still running are not waited for long: mounts in flight die with the agent
    // (their children get SIGKILL from the kernel) and a successor re-learns what is mounted.
    let _ = tokio::time::timeout(Duration::from_secs(1), server.shutdown()).await;
    Ok(())
}
