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

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::{ArgGroup, Parser, Subcommand};
use cnfs_host::kata::{self, KataError, MonitorPaths};
use cnfs_protocols::agent::{self, Health};
use cnfs_protocols::spec::{SpecError, VolumeSpec};
use cnfs_protocols::transport::{AgentAddress, DEFAULT_AGENT_PORT};
use serde_json::{json, Value};
use ttrpc::Code;

const EXIT_OTHER: u8 = 1;
const EXIT_UNREACHABLE: u8 = 3;
const EXIT_INVALID: u8 = 4;
const EXIT_NOT_FOUND: u8 = 5;
const EXIT_EXISTS: u8 = 6;
const EXIT_DEADLINE: u8 = 7;
const EXIT_PERMISSION: u8 = 8;
const EXIT_UNAVAILABLE: u8 = 9;

/// Extra time the client waits past the deadline it gives the agent, so that the agent's own
/// `DEADLINE_EXCEEDED` (with its explanation) arrives rather than a bare client timeout.
const REPLY_GRACE: Duration = Duration::from_secs(2);

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
  ping     {agent, version, sandbox_id, filesystems[], capabilities[], uptime_ms, volumes}
  list     {volumes: [{name, fs, fs_type, state, source, device, mount_point, read_only,
            options{}, nfs{server, export, version} | null,
            cephfs{monitors[], fs_name, path, client, fsid} | null}]}
  stats    {name, health (healthy|unresponsive|error|not mounted|unknown), health_detail,
            total_bytes, used_bytes, free_bytes, available_bytes, total_inodes, used_inodes,
            free_inodes, probe_ms, warnings[]}
  mount    {name, mount_point, already_mounted, duration_ms}
  unmount  {name, method (umount|force|detach), duration_ms, attempts[], held_by[]}

Examples:
  cnfsctl --sandbox 3f2a... ping
  cnfsctl --sandbox 3f2a... mount --name data --nfs 10.0.0.5:/exports/data -o hard -o rsize=65536
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
    /// Agent version, sandbox, file systems, capabilities, uptime, volume count.
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
    /// (e.g. smb://files/data/team?vers=3.1.1). Credentials come from --secret-file.
    #[arg(long, value_name = "URL")]
    source: Option<String>,

    /// The credentials of a --source volume whose file system needs them, in the format of an
    /// annotation secret (CephFS: the key; SMB: username=, password=, domain= lines). Read
    /// here, sent to the guest only, never printed.
    #[arg(long, value_name = "PATH", requires = "source")]
    secret_file: Option<PathBuf>,

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

/// A problem with the command line found after parsing (exit code 4).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct InvalidArgument(String);

/// A non-OK answer from the agent.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", code_name(*.code))]
struct RpcError {
    code: Code,
    message: String,
}

/// The connection broke or the request timed out on our side.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("no answer within {0:?}")]
    Deadline(Duration),
    #[error("{0}")]
    Transport(String),
}

fn code_name(c: Code) -> String {
    format!("{c:?}")
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

/// The documented exit code for an error, from the first cause that decides it.
fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(k) = cause.downcast_ref::<KataError>() {
            return match k {
                KataError::BadSandboxId(_) => EXIT_INVALID,
                _ => EXIT_UNREACHABLE,
            };
        }
        if cause.downcast_ref::<InvalidArgument>().is_some()
            || cause.downcast_ref::<SpecError>().is_some()
        {
            return EXIT_INVALID;
        }
        if let Some(r) = cause.downcast_ref::<RpcError>() {
            return match r.code {
                Code::INVALID_ARGUMENT | Code::OUT_OF_RANGE => EXIT_INVALID,
                Code::NOT_FOUND => EXIT_NOT_FOUND,
                Code::ALREADY_EXISTS => EXIT_EXISTS,
                Code::DEADLINE_EXCEEDED => EXIT_DEADLINE,
                Code::PERMISSION_DENIED | Code::UNAUTHENTICATED => EXIT_PERMISSION,
                Code::UNAVAILABLE | Code::FAILED_PRECONDITION => EXIT_UNAVAILABLE,
                _ => EXIT_OTHER,
            };
        }
        if let Some(c) = cause.downcast_ref::<CallError>() {
            return match c {
                CallError::Deadline(_) => EXIT_DEADLINE,
                CallError::Transport(_) => EXIT_UNREACHABLE,
            };
        }
    }
    EXIT_OTHER
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

/// The agent's address from `--url` or through the sandbox's Kata shim.
async fn resolve(cli: &Cli, timeout: Duration) -> anyhow::Result<AgentAddress> {
    if let Some(url) = &cli.url {
        return AgentAddress::parse(url).map_err(|e| InvalidArgument(format!("--url: {e}")).into());
    }
    let sandbox = cli
        .sandbox
        .as_deref()
        .ok_or_else(|| InvalidArgument("one of --sandbox or --url is required".into()))?;
    let paths = match &cli.monitor_socket {
        Some(p) => MonitorPaths::socket(p),
        None => MonitorPaths::default(),
    };
    kata::find_agent(sandbox, &paths, cli.port, timeout)
        .await
        .with_context(|| format!("finding sandbox {sandbox}"))
}

/// Runs one request with `timeout` given to the agent and a little more for the answer.
async fn call<T, F, Fut>(timeout: Duration, f: F) -> anyhow::Result<T>
where
    F: FnOnce(ttrpc::context::Context) -> Fut,
    Fut: std::future::Future<Output = ttrpc::Result<T>>,
{
    let ctx = ttrpc::context::with_timeout(timeout.as_nanos() as i64);
    let wait = timeout + REPLY_GRACE;
    match tokio::time::timeout(wait, f(ctx)).await {
        Err(_) => Err(CallError::Deadline(wait).into()),
        Ok(Ok(r)) => Ok(r),
        Ok(Err(ttrpc::Error::RpcStatus(s))) => Err(RpcError {
            code: s.code(),
            message: s.message().to_string(),
        }
        .into()),
        Ok(Err(ttrpc::Error::Others(m))) if m.contains("deadline") || m.contains("timeout") => {
            Err(CallError::Deadline(timeout).into())
        }
        Ok(Err(e)) => Err(CallError::Transport(e.to_string()).into()),
    }
}

/// A --source volume: the annotations' grammar, with the credentials its file system needs
/// read from --secret-file (the file system reads its own format).
fn url_volume(m: &MountArgs, url: &str) -> anyhow::Result<agent::VolumeSpec> {
    let parsed = cnfs_protocols::volume_url::parse(&m.name, url)
        .map_err(|e| InvalidArgument(format!("--source: {e}")))?;
    if parsed.secret_ref.is_some() {
        return Err(InvalidArgument(
            "--source: secret= names a secret of the shim's secret directory; give --secret-file"
                .into(),
        )
        .into());
    }
    let mut wire = parsed.wire;
    let kind = cnfs_protocols::spec::FsKind::of_wire(&wire)
        .ok_or_else(|| InvalidArgument("--source: names no file system".into()))?;
    match (&m.secret_file, kind.needs_secret()) {
        (None, true) => {
            return Err(InvalidArgument(format!(
                "--secret-file: {} volumes need credentials ({})",
                kind.name(),
                kind.required_secret_keys().join(", ")
            ))
            .into())
        }
        (Some(_), false) => {
            return Err(InvalidArgument(format!(
                "--secret-file: {} volumes take no secret",
                kind.name()
            ))
            .into())
        }
        (Some(path), true) => {
            let meta = std::fs::metadata(path)
                .with_context(|| format!("--secret-file {}", path.display()))?;
            if meta.len() > 64 * 1024 {
                return Err(InvalidArgument(format!(
                    "--secret-file {}: larger than 64 KiB",
                    path.display()
                ))
                .into());
            }
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--secret-file {}", path.display()))?;
            let creds = kind
                .credentials_from_file(&text)
                .map_err(|e| InvalidArgument(format!("--secret-file {}: {e}", path.display())))?;
            kind.apply_credentials("--secret-file", &mut wire, &creds)
                .map_err(|e| InvalidArgument(e.to_string()))?;
        }
        (None, false) => {}
    }
    Ok(wire)
}

/// Builds and validates the wire request (the same rules the agent applies).
fn mount_request(m: &MountArgs, sandbox: Option<&str>) -> anyhow::Result<agent::MountRequest> {
    let mut options: HashMap<String, String> = HashMap::new();
    for arg in &m.options {
        for item in arg.split(',') {
            let (key, value) = item.split_once('=').unwrap_or((item, ""));
            if key.is_empty() {
                return Err(
                    InvalidArgument(format!("-o {:?}: expected KEY or KEY=VALUE", arg)).into(),
                );
            }
            if options.insert(key.to_string(), value.to_string()).is_some() {
                return Err(InvalidArgument(format!(
                    "volume.options.{}: given more than once",
                    key.escape_default()
                ))
                .into());
            }
        }
    }
    let mut volume = match (&m.source, &m.nfs) {
        (Some(url), _) => url_volume(m, url)?,
        (None, Some(nfs)) => {
            let (server, export) = split_nfs(nfs)?;
            let mut v = agent::VolumeSpec {
                name: m.name.clone(),
                ..Default::default()
            };
            v.set_nfs(agent::NfsSource {
                server,
                export,
                version: m.version.clone().unwrap_or_default(),
                ..Default::default()
            });
            v
        }
        (None, None) => return Err(InvalidArgument("give --nfs or --source".into()).into()),
    };
    volume.read_only |= m.ro;
    for (k, v) in options {
        if volume.options.insert(k.clone(), v).is_some() {
            return Err(InvalidArgument(format!(
                "volume.options.{}: given in the URL and with -o",
                k.escape_default()
            ))
            .into());
        }
    }
    VolumeSpec::from_wire(&volume).context("invalid volume")?;
    Ok(agent::MountRequest {
        volume: protobuf::MessageField::some(volume),
        sandbox_id: sandbox.unwrap_or_default().to_string(),
        // The agent's default, capped by the request's deadline.
        timeout_ms: 0,
        ..Default::default()
    })
}

/// `SERVER:/EXPORT` or `[IPV6]:/EXPORT`.
fn split_nfs(s: &str) -> anyhow::Result<(String, String)> {
    let bad = || {
        InvalidArgument(format!(
            "--nfs {:?}: expected SERVER:/EXPORT (IPv6: [ADDR]:/EXPORT)",
            s.escape_default().to_string()
        ))
    };
    let (server, export) = if let Some(rest) = s.strip_prefix('[') {
        let (addr, export) = rest.split_once("]:").ok_or_else(bad)?;
        (addr, export)
    } else {
        s.split_once(':').ok_or_else(bad)?
    };
    if server.is_empty() || export.is_empty() {
        return Err(bad().into());
    }
    Ok((server.to_string(), export.to_string()))
}

// ---- output -------------------------------------------------------------------------------

fn to_json(v: &Value) -> String {
    format!("{v}\n")
}

/// Aligned columns; the last column is not padded.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let last = row.len().saturating_sub(1);
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i == last {
                line.push_str(cell);
            } else {
                let w = widths.get(i).copied().unwrap_or(0);
                let _ = write!(line, "{cell:<w$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Key/value lines with aligned values.
fn fields(pairs: &[(&str, String)]) -> String {
    let w = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in pairs {
        let _ = writeln!(out, "{k:<w$}  {v}");
    }
    out
}

/// Text from the agent shown in a table: control characters escaped.
fn clean(s: &str) -> String {
    if s.chars().any(char::is_control) {
        s.chars().flat_map(char::escape_default).collect()
    } else {
        s.to_string()
    }
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        clean(s)
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        "-".into()
    } else {
        format!("{:.0}%", part as f64 * 100.0 / whole as f64)
    }
}

fn human_duration_ms(ms: u64) -> String {
    let s = ms / 1000;
    let (d, h, m, sec) = (s / 86_400, (s / 3600) % 24, (s / 60) % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{}.{:01}s", sec, (ms % 1000) / 100),
        (0, 0, _) => format!("{m}m {sec}s"),
        (0, _, _) => format!("{h}h {m}m {sec}s"),
        _ => format!("{d}d {h}h {m}m"),
    }
}

fn list_or_dash(items: &[String]) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items
            .iter()
            .map(|s| clean(s))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn render_ping(addr: &AgentAddress, p: &agent::PingResponse, json: bool) -> String {
    if json {
        return to_json(&json!({
            "agent": addr.to_string(),
            "version": p.version,
            "sandbox_id": p.sandbox_id,
            "filesystems": p.filesystems,
            "capabilities": p.capabilities,
            "uptime_ms": p.uptime_ms,
            "volumes": p.volumes,
        }));
    }
    fields(&[
        ("agent", addr.to_string()),
        ("version", or_dash(&p.version)),
        ("sandbox", or_dash(&p.sandbox_id)),
        ("filesystems", list_or_dash(&p.filesystems)),
        ("capabilities", list_or_dash(&p.capabilities)),
        ("uptime", human_duration_ms(p.uptime_ms)),
        ("volumes", p.volumes.to_string()),
    ])
}

/// `server:/export` or `mon1,mon2:/path` from the spec (what was asked for).
fn spec_source(v: &agent::VolumeSpec) -> String {
    match &v.source {
        Some(agent::volume_spec::Source::Nfs(n)) => {
            if n.server.contains(':') {
                format!("[{}]:{}", n.server, n.export)
            } else {
                format!("{}:{}", n.server, n.export)
            }
        }
        Some(agent::volume_spec::Source::Cephfs(c)) => {
            format!("{}:{}", c.monitors.join(","), c.path)
        }
        Some(agent::volume_spec::Source::Smb(x)) => {
            format!("//{}/{}{}", x.server, x.share, x.path)
        }
        _ => String::new(),
    }
}

fn spec_fs(v: &agent::VolumeSpec) -> &'static str {
    cnfs_protocols::spec::FsKind::of_wire(v).map_or("", |k| k.name())
}

fn render_list(r: &agent::ListResponse, json: bool) -> String {
    if json {
        let volumes: Vec<Value> = r
            .volumes
            .iter()
            .map(|s| {
                let v = &s.volume;
                let options: serde_json::Map<String, Value> = {
                    let mut o: Vec<_> = v.options.iter().collect();
                    o.sort();
                    o.into_iter()
                        .map(|(k, val)| (k.clone(), Value::String(val.clone())))
                        .collect()
                };
                let nfs = match &v.source {
                    Some(agent::volume_spec::Source::Nfs(n)) => json!({
                        "server": n.server, "export": n.export, "version": n.version,
                    }),
                    _ => Value::Null,
                };
                // The agent blanks secrets in List; never print one anyway.
                let cephfs = match &v.source {
                    Some(agent::volume_spec::Source::Cephfs(c)) => json!({
                        "monitors": c.monitors, "fs_name": c.fs_name, "path": c.path,
                        "client": c.client, "fsid": c.fsid,
                    }),
                    _ => Value::Null,
                };
                let smb = match &v.source {
                    Some(agent::volume_spec::Source::Smb(x)) => json!({
                        "server": x.server, "share": x.share, "path": x.path,
                        "version": x.version, "domain": x.domain,
                    }),
                    _ => Value::Null,
                };
                json!({
                    "name": v.name,
                    "fs": spec_fs(v),
                    "fs_type": s.fs_type,
                    "state": s.state,
                    "source": spec_source(v),
                    "device": s.device,
                    "mount_point": s.mount_point,
                    "read_only": v.read_only,
                    "options": options,
                    "nfs": nfs,
                    "cephfs": cephfs,
                    "smb": smb,
                })
            })
            .collect();
        return to_json(&json!({ "volumes": volumes }));
    }
    let rows: Vec<Vec<String>> = r
        .volumes
        .iter()
        .map(|s| {
            let v = &s.volume;
            let fs = if s.fs_type.is_empty() {
                spec_fs(v).to_string()
            } else {
                s.fs_type.clone()
            };
            let source = if s.device.is_empty() {
                spec_source(v)
            } else {
                s.device.clone()
            };
            let mut state = or_dash(&s.state);
            if v.read_only {
                state.push_str(",ro");
            }
            vec![
                or_dash(&v.name),
                or_dash(&fs),
                state,
                or_dash(&source),
                or_dash(&s.mount_point),
            ]
        })
        .collect();
    table(&["NAME", "FS", "STATE", "SOURCE", "MOUNTPOINT"], &rows)
}

fn health_name(h: &protobuf::EnumOrUnknown<Health>) -> String {
    match h.enum_value() {
        Ok(Health::HEALTHY) => "healthy".into(),
        Ok(Health::UNRESPONSIVE) => "unresponsive".into(),
        Ok(Health::ERROR) => "error".into(),
        Ok(Health::NOT_MOUNTED) => "not mounted".into(),
        Ok(Health::HEALTH_UNKNOWN) => "unknown".into(),
        Err(n) => format!("unknown({n})"),
    }
}

fn render_stats(name: &str, s: &agent::StatsResponse, json: bool) -> String {
    let used = s.total_bytes.saturating_sub(s.free_bytes);
    let used_inodes = s.total_inodes.saturating_sub(s.free_inodes);
    let health = health_name(&s.health);
    if json {
        return to_json(&json!({
            "name": name,
            "health": health,
            "health_detail": s.health_detail,
            "total_bytes": s.total_bytes,
            "used_bytes": used,
            "free_bytes": s.free_bytes,
            "available_bytes": s.available_bytes,
            "total_inodes": s.total_inodes,
            "used_inodes": used_inodes,
            "free_inodes": s.free_inodes,
            "probe_ms": s.probe_ms,
            "warnings": s.warnings,
        }));
    }
    let warnings = if s.warnings.is_empty() {
        "none".to_string()
    } else {
        s.warnings
            .iter()
            .map(|w| clean(w))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let health_text = if s.health_detail.is_empty() {
        health
    } else {
        format!("{health} ({})", clean(&s.health_detail))
    };
    fields(&[
        ("volume", clean(name)),
        ("health", health_text),
        ("size", human_bytes(s.total_bytes)),
        (
            "used",
            format!("{} ({})", human_bytes(used), percent(used, s.total_bytes)),
        ),
        ("available", human_bytes(s.available_bytes)),
        (
            "inodes",
            format!(
                "{used_inodes} used of {} ({}), {} free",
                s.total_inodes,
                percent(used_inodes, s.total_inodes),
                s.free_inodes
            ),
        ),
        ("probe", format!("{} ms", s.probe_ms)),
        ("warnings", warnings),
    ])
}

fn render_mount(name: &str, r: &agent::MountResponse, json: bool) -> String {
    if json {
        return to_json(&json!({
            "name": name,
            "mount_point": r.mount_point,
            "already_mounted": r.already_mounted,
            "duration_ms": r.duration_ms,
        }));
    }
    if r.already_mounted {
        format!(
            "{name} already mounted at {} (nothing done)\n",
            clean(&r.mount_point)
        )
    } else {
        format!(
            "mounted {name} at {} in {} ms\n",
            clean(&r.mount_point),
            r.duration_ms
        )
    }
}

fn render_unmount(name: &str, r: &agent::UnmountResponse, json: bool) -> String {
    if json {
        return to_json(&json!({
            "name": name,
            "method": r.method,
            "duration_ms": r.duration_ms,
            "attempts": r.attempts,
            "held_by": r.held_by,
        }));
    }
    let held = if r.held_by.is_empty() {
        "none".to_string()
    } else {
        r.held_by
            .iter()
            .map(|a| clean(a))
            .collect::<Vec<_>>()
            .join("; ")
    };
    fields(&[
        ("unmounted", clean(name)),
        ("still held by", held),
        ("method", or_dash(&r.method)),
        ("duration", format!("{} ms", r.duration_ms)),
        (
            "failed attempts",
            if r.attempts.is_empty() {
                "none".into()
            } else {
                r.attempts
                    .iter()
                    .map(|a| clean(a))
                    .collect::<Vec<_>>()
                    .join("; ")
            },
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount_args(nfs: &str, opts: &[&str]) -> MountArgs {
        MountArgs {
            name: "data".into(),
            nfs: Some(nfs.into()),
            source: None,
            secret_file: None,
            version: None,
            ro: false,
            options: opts.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn url_volumes_take_their_credentials_from_the_secret_file_only() {
        let dir = std::env::temp_dir().join(format!("cnfsctl-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("creds");
        std::fs::write(&file, "username=alice\npassword=s3cr,et\n").expect("write");
        let mut m = mount_args("unused:/x", &["uid=1000"]);
        m.nfs = None;
        m.source = Some("smb://10.0.0.9/data/team?vers=3.1.1".into());
        m.secret_file = Some(file.clone());
        let r = mount_request(&m, None).expect("valid");
        let smb = r.volume.smb();
        assert_eq!((smb.share.as_str(), smb.path.as_str()), ("data", "/team"));
        assert_eq!(smb.password, "s3cr,et");
        assert_eq!(
            r.volume.options.get("uid").map(String::as_str),
            Some("1000")
        );
        m.secret_file = None;
        let e = mount_request(&m, None).expect_err("no secret file");
        assert_eq!(exit_code(&e), EXIT_INVALID);
        assert!(
            e.to_string().contains("--secret-file") && e.to_string().contains("password"),
            "{e}"
        );
        m.source = Some("smb://10.0.0.9/data?secret=team-a".into());
        let e = mount_request(&m, None).expect_err("secret ref");
        assert!(e.to_string().contains("give --secret-file"), "{e}");
        std::fs::write(&file, "username=alice\ntoken=s3cr\n").expect("write");
        m.source = Some("smb://10.0.0.9/data".into());
        m.secret_file = Some(file);
        let e = mount_request(&m, None).expect_err("bad file");
        assert!(
            e.to_string().contains("line 2") && !e.to_string().contains("s3cr"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn nfs_argument_forms() {
        assert_eq!(
            split_nfs("10.0.0.1:/exports/a").expect("ok"),
            ("10.0.0.1".into(), "/exports/a".into())
        );
        assert_eq!(
            split_nfs("[fd00::1]:/x").expect("ok"),
            ("fd00::1".into(), "/x".into())
        );
        for bad in ["10.0.0.1", ":/x", "srv:", "[fd00::1]/x"] {
            let e = split_nfs(bad).expect_err(bad);
            assert_eq!(exit_code(&e), EXIT_INVALID, "{bad}");
        }
    }

    #[test]
    fn mount_request_is_validated_locally_with_the_field_named() {
        let r = mount_request(
            &mount_args("srv:/x", &["hard,rsize=65536", "ro"]),
            Some("sb"),
        )
        .expect("valid");
        let v = r.volume.as_ref().expect("volume");
        assert_eq!(v.options.get("rsize").map(String::as_str), Some("65536"));
        assert_eq!(r.sandbox_id, "sb");
        for (opts, field) in [
            (&["addr=1.2.3.4"][..], "volume.options.addr"),
            (&["rsize=1"][..], "volume.options.rsize"),
            (&["hard", "hard"][..], "volume.options.hard"),
            (&["=x"][..], "-o"),
        ] {
            let e = mount_request(&mount_args("srv:/x", opts), None).expect_err(field);
            assert!(format!("{e:#}").contains(field), "{e:#}");
            assert_eq!(exit_code(&e), EXIT_INVALID);
        }
        let e = mount_request(&mount_args("srv:relative", &[]), None).expect_err("export");
        assert!(format!("{e:#}").contains("volume.nfs.export"), "{e:#}");
    }

    #[test]
    fn exit_codes_follow_the_agent_status() {
        for (code, want) in [
            (Code::INVALID_ARGUMENT, EXIT_INVALID),
            (Code::NOT_FOUND, EXIT_NOT_FOUND),
            (Code::ALREADY_EXISTS, EXIT_EXISTS),
            (Code::DEADLINE_EXCEEDED, EXIT_DEADLINE),
            (Code::PERMISSION_DENIED, EXIT_PERMISSION),
            (Code::UNAVAILABLE, EXIT_UNAVAILABLE),
            (Code::FAILED_PRECONDITION, EXIT_UNAVAILABLE),
            (Code::INTERNAL, EXIT_OTHER),
        ] {
            let e = anyhow::Error::from(RpcError {
                code,
                message: "m".into(),
            })
            .context("mount x");
            assert_eq!(exit_code(&e), want, "{code:?}");
        }
        let e = anyhow::Error::from(KataError::NoMonitorSocket {
            sandbox: "x".into(),
            tried: vec![],
            waited: Duration::ZERO,
        });
        assert_eq!(exit_code(&e), EXIT_UNREACHABLE);
        assert_eq!(
            exit_code(&anyhow::Error::from(CallError::Deadline(Duration::ZERO))),
            EXIT_DEADLINE
        );
        assert_eq!(exit_code(&anyhow!("other")), EXIT_OTHER);
    }

    #[test]
    fn tables_align_and_sizes_read_well() {
        let t = table(
            &["NAME", "FS", "STATE"],
            &[vec!["a".into(), "nfs4".into(), "mounted".into()]],
        );
        assert_eq!(t, "NAME  FS    STATE\na     nfs4  mounted\n");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(10 << 30), "10.0 GiB");
        assert_eq!(human_duration_ms(1500), "1.5s");
        assert_eq!(human_duration_ms(3_723_000), "1h 2m 3s");
        assert_eq!(percent(1, 0), "-");
    }
}
