//! `cnfs-deploy install|uninstall`: see lib.rs and configs/deploy/.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use cnfs_deploy::{containerd, install, kata, label};

#[derive(Parser)]
#[command(
    name = "cnfs-deploy",
    version,
    about = "Install CNFS on this Kata node, or take it off"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Where the node's root file system is mounted.
    #[arg(long, default_value = "/host", global = true)]
    host_root: PathBuf,
    /// The installer image's payload directory.
    #[arg(long, default_value = "/payload", global = true)]
    payload: PathBuf,
    /// Kata's configuration that CNFS pods' configuration is derived from (host path).
    #[arg(long, default_value = kata::DEFAULT_BASE, global = true)]
    kata_config: String,
    /// Kata's agent-as-init initrd (host path; default: the configuration's `initrd`, else
    /// kata-deploy's kata-containers-initrd.img).
    #[arg(long, global = true)]
    kata_initrd: Option<String>,
    /// Kata's containerd shim, which the CNFS wrapper starts (host path).
    #[arg(
        long,
        default_value = "/opt/kata/bin/containerd-shim-kata-v2",
        global = true
    )]
    kata_shim: String,
    /// containerd's configuration file (host path).
    #[arg(long, default_value = containerd::CONFIG, global = true)]
    containerd_config: String,
    /// How to restart containerd when its configuration changed (split on spaces; "" for
    /// never).
    #[arg(long, default_value = "systemctl restart containerd", global = true)]
    restart_command: String,
    /// Run the restart command in the container's own mount namespace instead of the host's.
    #[arg(long, global = true)]
    restart_here: bool,
    /// This node's name, for the node label (the DaemonSet sets it from spec.nodeName).
    #[arg(long, env = "NODE_NAME", global = true)]
    node_name: Option<String>,
    /// The Kubernetes API server (default: the in-cluster one).
    #[arg(long, global = true)]
    api_server: Option<String>,
    /// The service account's token and CA.
    #[arg(long, default_value = label::SERVICE_ACCOUNT, global = true)]
    service_account_dir: String,
    /// After the work, wait for SIGTERM (as a DaemonSet container does) instead of exiting.
    #[arg(long, global = true)]
    wait: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Copy CNFS to /opt/cnfs, write its configuration, add the kata-cnfs runtime.
    Install,
    /// Restore every file the installer changed to its bytes from before.
    Uninstall,
}

fn wait_for_term() -> anyhow::Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block()?;
    let sig = set.wait()?;
    println!("cnfs-deploy: {sig} received, exiting (nothing is uninstalled on exit)");
    Ok(())
}

fn labeller(cli: &Cli) -> anyhow::Result<Option<(label::Api, String)>> {
    let Some(node) = cli.node_name.clone().filter(|n| !n.is_empty()) else {
        return Ok(None);
    };
    Ok(
        label::Api::from_env(cli.api_server.as_deref(), &cli.service_account_dir)?
            .map(|a| (a, node)),
    )
}

fn main() {
    let cli = Cli::parse();
    let label = match labeller(&cli) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cnfs-deploy: error: {e:#}");
            std::process::exit(1);
        }
    };
    let o = install::Options {
        label,
        host_root: cli.host_root,
        payload: cli.payload,
        kata_config: cli.kata_config,
        kata_initrd: cli.kata_initrd,
        kata_shim: cli.kata_shim,
        containerd_config: cli.containerd_config,
        restart: cli
            .restart_command
            .split_whitespace()
            .map(str::to_string)
            .collect(),
        restart_in_host: !cli.restart_here,
    };
    let result = match cli.cmd {
        Cmd::Install => install::install(&o).map(|r| ("installed", r)),
        Cmd::Uninstall => install::uninstall(&o).map(|r| ("uninstalled", r)),
    };
    match result {
        Ok((what, r)) => println!(
            "cnfs-deploy: {what}: {} file(s) changed{}",
            r.changed,
            if r.restarted {
                ", containerd restarted"
            } else {
                ""
            }
        ),
        Err(e) => {
            eprintln!("cnfs-deploy: error: {e:#}");
            std::process::exit(1);
        }
    }
    if cli.wait {
        if let Err(e) = wait_for_term() {
            eprintln!("cnfs-deploy: error: {e:#}");
            std::process::exit(1);
        }
    }
}
