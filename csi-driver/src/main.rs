//! `cnfs-csi`: the CSI driver's node plugin (`node`), controller (`controller`), or both in
//! one process (`all`, for tests and single-node clusters).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use cnfs_csi::controller::{ControllerConfig, ControllerService};
use cnfs_csi::csi::controller_server::ControllerServer;
use cnfs_csi::csi::identity_server::IdentityServer;
use cnfs_csi::csi::node_server::NodeServer;
use cnfs_csi::identity::IdentityService;
use cnfs_csi::node::{NodeConfig, NodeService};
use cnfs_csi::server;
use cnfs_host::kata::MonitorPaths;
use cnfs_protocols::handoff::DEFAULT_ROOT;
use cnfs_protocols::transport::DEFAULT_AGENT_PORT;
use slog::{info, o, Drain};

#[derive(Parser)]
#[command(
    name = "cnfs-csi",
    version,
    about = "CSI driver that hands NFS and CephFS volumes to Kata guests; mounts nothing on the host"
)]
struct Cli {
    /// The CSI socket: unix:///path or /path.
    #[arg(long, global = true, default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(clap::Args, Clone)]
struct NodeArgs {
    /// This node's name (Kubernetes: the node name, from the downward API).
    #[arg(long)]
    node_id: String,
    /// The hand-off directory shared with the CNFS shim (must be on tmpfs).
    #[arg(long, default_value = DEFAULT_ROOT)]
    handoff_dir: PathBuf,
    /// Kata sandbox directories holding `<sandbox>/shim-monitor.sock` (default: both Kata
    /// runtimes' locations).
    #[arg(long = "kata-sandbox-root")]
    kata_roots: Vec<PathBuf>,
    /// The CNFS agent's vsock port in the guest.
    #[arg(long, default_value_t = DEFAULT_AGENT_PORT)]
    agent_port: u32,
    /// Bound on reading a volume's stats from its guest, in seconds.
    #[arg(long, default_value_t = 5)]
    stats_timeout: u64,
}

#[derive(clap::Args, Clone)]
struct ControllerArgs {
    /// Ceph clusters StorageClasses name by clusterID (missing file: NFS only).
    #[arg(long, default_value = "/etc/cnfs/csi.toml")]
    config: PathBuf,
    /// Bound on each backend operation, in seconds.
    #[arg(long, default_value_t = 30)]
    backend_timeout: u64,
}

#[derive(Subcommand)]
enum Mode {
    /// The node plugin (a DaemonSet on Kata nodes): Identity + Node.
    Node(NodeArgs),
    /// The controller (a Deployment with external-provisioner and -resizer): Identity +
    /// Controller.
    Controller(ControllerArgs),
    /// Both in one process (single-node clusters, tests).
    All {
        #[command(flatten)]
        node: NodeArgs,
        #[command(flatten)]
        controller: ControllerArgs,
    },
}

fn node_service(a: NodeArgs, log: &slog::Logger) -> anyhow::Result<NodeService> {
    anyhow::ensure!(!a.node_id.is_empty(), "--node-id: is required");
    // NodeGetInfo's node_id: the CSI spec's own limit for it.
    anyhow::ensure!(
        a.node_id.len() <= cnfs_csi::bounds::MAX_NODE_ID,
        "--node-id: is {} bytes, longer than the CSI limit of {} bytes",
        a.node_id.len(),
        cnfs_csi::bounds::MAX_NODE_ID
    );
    let kata = if a.kata_roots.is_empty() {
        MonitorPaths::default()
    } else {
        MonitorPaths::with_roots(a.kata_roots)
    };
    Ok(NodeService::new(
        NodeConfig {
            node_id: a.node_id,
            handoff_root: a.handoff_dir,
            kata,
            agent_port: a.agent_port,
            stats_timeout: Duration::from_secs(a.stats_timeout.max(1)),
        },
        log.new(o!("service" => "node")),
    ))
}

fn controller_service(a: ControllerArgs, log: &slog::Logger) -> anyhow::Result<ControllerService> {
    let cfg = ControllerConfig::load(&a.config)?;
    Ok(ControllerService::new(
        cfg,
        Duration::from_secs(a.backend_timeout.max(1)),
        log.new(o!("service" => "controller")),
    ))
}

fn logger() -> slog::Logger {
    let drain = slog_json::Json::new(std::io::stderr())
        .add_default_keys()
        .build()
        .fuse();
    let drain = std::sync::Mutex::new(drain).fuse();
    slog::Logger::root(drain, o!("source" => "cnfs-csi"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let log = logger();
    let path = server::socket_path(&cli.endpoint)?;
    let incoming = server::bind(&path)?;
    let (node, controller) = match cli.mode {
        Mode::Node(a) => (Some(node_service(a, &log)?), None),
        Mode::Controller(a) => (None, Some(controller_service(a, &log)?)),
        Mode::All { node, controller } => (
            Some(node_service(node, &log)?),
            Some(controller_service(controller, &log)?),
        ),
    };
    let router = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(IdentityService {
            controller: controller.is_some(),
        }))
        .add_optional_service(node.map(NodeServer::new))
        .add_optional_service(controller.map(ControllerServer::new));
    info!(log, "serving"; "endpoint" => path.display().to_string(), "version" => env!("CARGO_PKG_VERSION"));
    // On SIGTERM stop accepting; calls in flight get a short grace period, then the process
    // ends even if a client keeps its connection open.
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
        let _ = stop_rx.await;
    }));
    server::shutdown_signal().await;
    info!(log, "stopping");
    let _ = stop_tx.send(());
    match tokio::time::timeout(Duration::from_secs(5), serving).await {
        Ok(Ok(r)) => r?,
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => info!(log, "grace period over; closing open connections"),
    }
    let _ = std::fs::remove_file(&path);
    info!(log, "stopped");
    Ok(())
}
