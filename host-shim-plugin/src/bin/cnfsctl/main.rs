//! `cnfsctl`: the operator's CLI for a sandbox's CNFS agent.
//!
//! Finds the guest through the Kata shim's management socket (`--sandbox`) or takes the agent
//! URL directly (`--url`), then runs one command: `ping`, `list`, `stats`, `mount`,
//! `unmount`. Tables for people, `--json` (one object per command) for scripts.
//!
//! Exit codes (also in `--help`):
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | any other error |
//! | 2 | usage error (command line) |
//! | 3 | agent unreachable, sandbox not found |
//! | 4 | invalid argument (checked locally, or the agent's `INVALID_ARGUMENT`) |
//! | 5 | not found |
//! | 6 | already exists |
//! | 7 | deadline exceeded |
//! | 8 | permission denied |
//! | 9 | unavailable, failed precondition |
//!
//! Errors go to stderr as one line, `cnfsctl: <message>`.
//!
//! The command line and what each command does are here; building the mount request is in
//! `request`, reaching the agent and the exit codes in `call`, the output in `render`.

mod call;
mod render;
mod request;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::{ArgGroup, Parser, Subcommand};
use cnfs_host::kata;
use cnfs_protocols::agent;
use cnfs_protocols::transport::DEFAULT_AGENT_PORT;

use crate::call::{call, exit_code, resolve};
use crate::render::{render_list, render_mount, render_ping, render_stats, render_unmount};
use crate::request::mount_request;

const AFTER_HELP: &str = "\
Exit codes:
  0  success
  1  any other error
  2  usage error (command line)
  3  agent unreachable, sandbox not found
  4  invalid argument (checked locally, or the agent's INVALID_ARGUMENT)
  5  not found
  6  already exists
  7  deadline exceeded
  8  permission denied
  9  unavailable, failed precondition
Errors go to stderr as one line: \"cnfsctl: <message>\".

JSON output (--json), one object per command; keys are stable:
  ping     {agent, version, sandbox_id, filesystems[], capabilities[], encryption_modes[],
            uptime_ms, volumes}
  list     {volumes: [{name, fs, fs_type, state, source, device, mount_point, read_only,
            options{}, nfs{server, export, version} | null,
            cephfs{monitors[], fs_name, path, client, fsid} | null,
            smb{server, share, path, version, domain} | null,
            encryption{mode (luks2|gocryptfs), size_bytes (0 for gocryptfs), uid, gid}
            | null}]}
  stats    {name, health (healthy|unresponsive|error|not mounted|unknown), health_detail,
            total_bytes, used_bytes, free_bytes, available_bytes, total_inodes, used_inodes,
            free_inodes, probe_ms, warnings[]}
  mount    {name, mount_point, already_mounted, duration_ms}
  unmount  {name, method (umount|force|detach), duration_ms, attempts[], held_by[]}

Examples:
  cnfsctl --sandbox 3f2a... ping
  cnfsctl --sandbox 3f2a... mount --name data --nfs 10.0.0.5:/exports/data -o hard -o rsize=65536
  cnfsctl --sandbox 3f2a... mount --name sec --key-file /root/sec.key \
          --source 'nfs://10.0.0.5/exports/sec?vers=4.1&encryption=luks2&size=10Gi&owner=1000:1000'
  cnfsctl --url hvsock:///run/vc/firecracker/3f2a.../root/kata.hvsock:17230 --json list";

/// Talk to the CNFS agent inside a Kata sandbox's VM.
#[derive(Debug, Parser)]
#[command(
    name = "cnfsctl",
    version,
    about = "Talk to the CNFS agent inside a Kata sandbox's VM",
    long_about = "Talk to the CNFS agent inside a Kata sandbox's VM.\n\n\
                  --sandbox finds the guest the way `kata-runtime exec` does: it asks the Kata \
                  shim's management socket (/run/vc/sbs/<id>/shim-monitor.sock, then \
                  /run/kata/<id>/shim-monitor.sock) for the agent URL and replaces kata-agent's \
                  port with CNFS's (--port). --url names the agent directly.",
    after_long_help = AFTER_HELP,
    group(ArgGroup::new("target").required(true).args(["sandbox", "url"]))
)]
struct Cli {
    /// Sandbox id (the pod sandbox's container id, as Kata names its directories).
    #[arg(long, value_name = "ID")]
    sandbox: Option<String>,

    /// Kata shim management socket to ask instead of the default locations (with --sandbox).
    #[arg(long, value_name = "PATH", requires = "sandbox")]
    monitor_socket: Option<PathBuf>,

    /// Agent URL: vsock://CID:PORT, hvsock://PATH:PORT or unix://PATH.
    #[arg(long, value_name = "URL")]
    url: Option<String>,

    /// CNFS agent's vsock port in the guest (with --sandbox; --url carries its own port).
    #[arg(long, value_name = "PORT", default_value_t = DEFAULT_AGENT_PORT, conflicts_with = "url")]
    port: u32,

    /// Print one JSON object instead of a table.
    #[arg(long, global = true)]
    json: bool,

    /// Seconds to wait for the guest (finding and connecting) and, again, for the request.
    #[arg(long, value_name = "SECS", default_value_t = 30, global = true,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout: u64,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Agent version, sandbox, file systems, capabilities, encryption modes, uptime, volume
    /// count.
    Ping,
    /// Every volume the agent knows.
    List,
    /// Size, usage, inodes and health of one volume.
    Stats {
        /// Volume name.
        name: String,
    },
    /// Mount an NFS volume at /run/cnfs/volumes/<NAME> in the guest.
    Mount(MountArgs),
    /// Unmount a volume (escalating to a forced, then lazy unmount if needed). Refused while
    /// containers hold a copy of it, unless --force.
    Unmount {
        /// Volume name.
        name: String,
        /// Unmount even while containers hold their copy (they keep it until they end).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, clap::Args)]
struct MountArgs {
    /// Volume name (DNS label: lower-case letters, digits, '-').
    #[arg(long, value_name = "NAME")]
    name: String,

    /// NFS server and export: SERVER:/EXPORT (IPv6: [ADDR]:/EXPORT).
    #[arg(
        long,
        value_name = "SERVER:/EXPORT",
        conflicts_with = "source",
        required_unless_present = "source"
    )]
    nfs: Option<String>,

    /// Any volume in the annotations' URL grammar: nfs://, cephfs://, smb://
    /// (e.g. smb://files/data/team?vers=3.1.1). Credentials come from --secret-file; an
    /// encrypted volume's key (encryption=luks2&size=10Gi, or encryption=gocryptfs) from
    /// --key-file.
    #[arg(long, value_name = "URL")]
    source: Option<String>,

    /// The credentials of a --source volume whose file system needs them, in the format of an
    /// annotation secret (CephFS: the key; SMB: username=, password=, domain= lines). Read
    /// here, sent to the guest only, never printed.
    #[arg(long, value_name = "PATH", requires = "source")]
    secret_file: Option<PathBuf>,

    /// The key of an encrypted --source volume: the file's bytes, exactly, 1 to 1024 (no
    /// newline is trimmed: for luks2 the same file opens the container with `cryptsetup
    /// --key-file`; gocryptfs reads one line, so its key file has no newline or NUL byte at
    /// all). Read here, sent to the guest only, never printed.
    #[arg(long, value_name = "PATH", requires = "source")]
    key_file: Option<PathBuf>,

    /// NFS version: 3, 4.0, 4.1 or 4.2 [default: 4.1].
    #[arg(long, value_name = "VERSION")]
    version: Option<String>,

    /// Mount read-only.
    #[arg(long)]
    ro: bool,

    /// Mount option KEY or KEY=VALUE; repeat, or separate with commas. Checked against the
    /// same allowlist the agent uses.
    #[arg(short = 'o', long = "option", value_name = "KEY[=VALUE]")]
    options: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(&anyhow!(e).context("starting the async runtime")),
    };
    match runtime.block_on(run(&cli)) {
        Ok(out) => {
            let mut stdout = std::io::stdout().lock();
            // A closed pipe (`| head`) is not an error worth reporting.
            let _ = stdout.write_all(out.as_bytes());
            let _ = stdout.flush();
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

fn fail(e: &anyhow::Error) -> ExitCode {
    let msg = format!("{e:#}").replace(['\n', '\r'], " ");
    eprintln!("cnfsctl: {msg}");
    ExitCode::from(exit_code(e))
}

async fn run(cli: &Cli) -> anyhow::Result<String> {
    let timeout = Duration::from_secs(cli.timeout);
    // Validate everything local before touching the guest.
    let mount_req = match &cli.command {
        Command::Mount(m) => Some(mount_request(m, cli.sandbox.as_deref())?),
        _ => None,
    };
    let addr = resolve(cli, timeout).await?;
    // The error names the address and how long it tried.
    let (client, ping) = kata::connect_and_ping(&addr, timeout).await?;
    let json = cli.json;
    match &cli.command {
        Command::Ping => Ok(render_ping(&addr, &ping, json)),
        Command::List => {
            let r = call(timeout, |ctx| {
                let client = client.clone();
                async move { client.list(ctx, &agent::ListRequest::new()).await }
            })
            .await
            .context("list")?;
            Ok(render_list(&r, json))
        }
        Command::Stats { name } => {
            let req = agent::StatsRequest {
                name: name.clone(),
                timeout_ms: 0,
                ..Default::default()
            };
            let r = call(timeout, |ctx| {
                let client = client.clone();
                let req = req.clone();
                async move { client.stats(ctx, &req).await }
            })
            .await
            .with_context(|| format!("stats {name}"))?;
            Ok(render_stats(name, &r, json))
        }
        Command::Mount(m) => {
            let req = mount_req.ok_or_else(|| anyhow!("internal: mount request missing"))?;
            let r = call(timeout, |ctx| {
                let client = client.clone();
                let req = req.clone();
                async move { client.mount(ctx, &req).await }
            })
            .await
            .with_context(|| format!("mount {}", m.name))?;
            Ok(render_mount(&m.name, &r, json))
        }
        Command::Unmount { name, force } => {
            let req = agent::UnmountRequest {
                name: name.clone(),
                timeout_ms: 0,
                force: *force,
                ..Default::default()
            };
            let r = call(timeout, |ctx| {
                let client = client.clone();
                let req = req.clone();
                async move { client.unmount(ctx, &req).await }
            })
            .await
            .with_context(|| format!("unmount {name}"))?;
            Ok(render_unmount(name, &r, json))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
