//! `cargo xtask bench`: figures from one run on the test bed, each next to its baseline
//! measured in the same run (this machine is shared and noisy; compare ratios, not absolutes).
//! Not part of CI's pass/fail.

use std::time::{Duration, Instant};

use cnfs_protocols::agent;
use cnfs_protocols::transport::hvsock_handshake;
use cnfs_testbed::ganesha::EXPORT;
use cnfs_testbed::guest::ECHO_PORT;
use cnfs_testbed::vm::ctx;
use cnfs_testbed::{mount_request, nfs_volume, TestBed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod cephfs;
mod data_path;
mod encryption;
mod pod_start;
mod storm;

/// Which part of the bench to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// Everything.
    All,
    /// The agent's calls: Ping, Mount, List, Stats, floods.
    Control,
    /// Reading and writing through each file system path.
    Data,
    /// Sandbox Create through the wrapper vs straight to the delegate.
    PodStart,
    /// Plain NFS vs an encrypted (luks2) volume on the same server.
    Encryption,
    /// N guests mounting the same NFS export and CephFS at once; the servers' cost per client.
    Storm,
    /// The guest kernel's CephFS client vs ceph-fuse on the same file system.
    Cephfs,
}

const T: Duration = Duration::from_secs(60);

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The middle value (NaN for none): the figure each bench table shows.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn summary(mut v: Vec<Duration>) -> String {
    v.sort();
    format!(
        "p50 {:>8.2?}  p99 {:>8.2?}  (n={})",
        percentile(&v, 0.5),
        percentile(&v, 0.99),
        v.len()
    )
}

pub async fn run(part: Part, nfs_variants: &[String]) -> anyhow::Result<()> {
    if matches!(part, Part::All | Part::Control) {
        control().await?;
    }
    if matches!(part, Part::All | Part::Data) {
        data_path::run(nfs_variants).await?;
    }
    if matches!(part, Part::All | Part::PodStart) {
        pod_start::run().await?;
    }
    if matches!(part, Part::All | Part::Encryption) {
        encryption::run().await?;
    }
    if matches!(part, Part::All | Part::Storm) {
        storm::run().await?;
    }
    if matches!(part, Part::All | Part::Cephfs) {
        cephfs::run().await?;
    }
    Ok(())
}

/// Restarts the guest's agent with its log going to `log`; a connection to the new one.
async fn restart_agent(
    vm: &cnfs_testbed::Vm,
    log: &str,
) -> anyhow::Result<cnfs_protocols::agent_ttrpc::AgentClient> {
    vm.exec
        .ok(&format!(
            "{}; kill -9 $a; while kill -0 $a 2>/dev/null; do sleep 0.1; done; \
             /usr/bin/cnfs-agent </dev/null >{log} 2>&1 &",
            cnfs_testbed::guest::AGENT_PID_SH
        ))
        .await?;
    vm.wait_for_agent(T).await?;
    vm.agent().await
}

async fn control() -> anyhow::Result<()> {
    println!("bench: booting the test bed (QEMU under TCG, nfs-ganesha in a namespace) ...");
    let bed = TestBed::start().await?;
    let agent = bed.vm.agent().await?;
    let g = &bed.vm.exec;
    let server = bed.ns.host_ip.clone();

    // 1. Ping over hybrid vsock next to a raw 64-byte echo on the same transport.
    let n = 300;
    let mut ping = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        agent.ping(ctx(T), &agent::PingRequest::new()).await?;
        ping.push(t.elapsed());
    }
    let mut s = tokio::net::UnixStream::connect(&bed.vm.hvsock).await?;
    hvsock_handshake(&mut s, ECHO_PORT, "echo").await?;
    let mut echo = Vec::with_capacity(n);
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(&msg).await?;
        s.read_exact(&mut back).await?;
        echo.push(t.elapsed());
    }
    println!("Ping round trip (ttrpc)      {}", summary(ping));
    println!("raw echo, same transport     {}", summary(echo));

    // Where Ping's time goes: the agent writes one JSON log line per request, synchronously,
    // to its stderr, which is the serial console here (as in guests whose agent log goes to
    // the console). The same agent with its log to /dev/null, same guest:
    let quiet = restart_agent(&bed.vm, "/dev/null").await?;
    let mut ping_quiet = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        quiet.ping(ctx(T), &agent::PingRequest::new()).await?;
        ping_quiet.push(t.elapsed());
    }
    println!("Ping, agent log to /dev/null {}", summary(ping_quiet));
    // Back to the console for the rest.
    let agent = restart_agent(&bed.vm, "/dev/console").await?;

    // 2. Mount latency: the agent's Mount next to busybox mount(8) of the same export in the
    //    same guest (through the test exec helper, whose own overhead is shown to subtract).
    // The first mount loads the NFS modules and sets the client identity: shown apart.
    let t = Instant::now();
    agent
        .mount(
            ctx(T),
            &mount_request(nfs_volume("warm", &server, EXPORT, "4.1"), 0),
        )
        .await?;
    println!("first Mount (loads modules)  {:>8.2?}", t.elapsed());
    agent
        .unmount(
            ctx(T),
            &agent::UnmountRequest {
                name: "warm".into(),
                ..Default::default()
            },
        )
        .await?;
    let rounds = 10;
    let (mut via_agent, mut via_busybox, mut exec_overhead) = (vec![], vec![], vec![]);
    let opts = format!("vers=4.1,addr={server},clientaddr={}", bed.ns.guest_ip);
    for i in 0..rounds {
        let name = format!("m{i}");
        let t = Instant::now();
        agent
            .mount(
                ctx(T),
                &mount_request(nfs_volume(&name, &server, EXPORT, "4.1"), 0),
            )
            .await?;
        via_agent.push(t.elapsed());
        agent
            .unmount(
                ctx(T),
                &agent::UnmountRequest {
                    name,
                    ..Default::default()
                },
            )
            .await?;
        let t = Instant::now();
        g.ok(&format!(
            "mkdir -p /tmp/bb && mount -t nfs4 -o {opts} {server}:{EXPORT} /tmp/bb"
        ))
        .await?;
        via_busybox.push(t.elapsed());
        g.ok("umount /tmp/bb").await?;
        let t = Instant::now();
        g.ok("true").await?;
        exec_overhead.push(t.elapsed());
    }
    println!("Mount NFSv4.1 via cnfs-agent {}", summary(via_agent));
    println!("busybox mount, same guest    {}", summary(via_busybox));
    println!("  (exec helper overhead      {})", summary(exec_overhead));

    // 3. The agent's footprint.
    let status = g
        .ok(&format!(
            "{}; cat /proc/$a/status",
            cnfs_testbed::guest::AGENT_PID_SH
        ))
        .await?;
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap_or("VmRSS: ?")
        .to_string();
    let size = g.ok("wc -c < /usr/bin/cnfs-agent").await?;
    println!(
        "agent {}; static binary {} bytes",
        rss.replace('\t', " "),
        size.trim()
    );

    // 3b. Floods: the agent's memory and the host's Ping while 300 connections sit idle and
    //     100 more announce 4 MiB frames they never finish (the gate bounds both).
    let rss_of = |out: String| {
        out.split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let rss_cmd = format!(
        "{}; grep VmRSS /proc/$a/status",
        cnfs_testbed::guest::AGENT_PID_SH
    );
    let idle_rss = rss_of(g.ok(&rss_cmd).await?);
    let mut conns = Vec::new();
    for _ in 0..300 {
        if let Ok(c) = cnfs_testbed::raw::RawConn::connect(&bed.vm.hvsock).await {
            conns.push(c);
        }
    }
    for i in 0..100u32 {
        let c = cnfs_testbed::raw::RawConn::half_sent_huge_frame(&bed.vm.hvsock, 2 * i + 1).await?;
        conns.push(c);
    }
    let flood = bed.vm.agent().await?;
    let mut flooded = Vec::with_capacity(50);
    for _ in 0..50 {
        let t = Instant::now();
        flood.ping(ctx(T), &agent::PingRequest::new()).await?;
        flooded.push(t.elapsed());
    }
    let flood_rss = rss_of(g.ok(&rss_cmd).await?);
    drop(conns);
    println!(
        "agent RSS idle {idle_rss} kB; with 300 idle + 100 half-sent 4 MiB frames {flood_rss} kB"
    );
    println!("Ping during that flood        {}", summary(flooded));
    // The flood evicted the idle connection this bench started with: a fresh one.
    let agent = bed.vm.agent().await?;

    // 4. List and Stats with 200 volumes mounted.
    let volumes = 200;
    let t = Instant::now();
    for i in 0..volumes {
        let export = format!("{EXPORT}/d{i}");
        std::fs::create_dir_all(bed.nfs.export_dir.join(format!("d{i}")))?;
        agent
            .mount(
                ctx(T),
                &mount_request(nfs_volume(&format!("v{i}"), &server, &export, "4.1"), 0),
            )
            .await?;
    }
    println!("mounted {volumes} volumes in {:.1?}", t.elapsed());
    let (mut list, mut stats) = (vec![], vec![]);
    for i in 0..50 {
        let t = Instant::now();
        let l = agent.list(ctx(T), &agent::ListRequest::new()).await?;
        list.push(t.elapsed());
        anyhow::ensure!(
            l.volumes.len() == volumes,
            "List saw {} volumes",
            l.volumes.len()
        );
        let t = Instant::now();
        agent
            .stats(
                ctx(T),
                &agent::StatsRequest {
                    name: format!("v{}", i * 4),
                    ..Default::default()
                },
            )
            .await?;
        stats.push(t.elapsed());
    }
    println!("List, {volumes} volumes          {}", summary(list));
    println!("Stats, {volumes} volumes         {}", summary(stats));
    // 5. CephFS Mount latency next to busybox `mount -t ceph` of the same file system.
    println!("bench: starting Ceph in the namespace ...");
    let ceph = cnfs_testbed::ceph::Ceph::start(&bed.ns, bed.dir.path()).await?;
    let key = ceph.admin_key();
    let (mut via_agent, mut via_busybox) = (vec![], vec![]);
    for i in 0..rounds {
        let name = format!("c{i}");
        let mut spec = agent::VolumeSpec {
            name: name.clone(),
            ..Default::default()
        };
        spec.set_cephfs(agent::CephFsSource {
            monitors: vec![ceph.mon_v1()],
            fs_name: cnfs_testbed::ceph::FS_NAME.into(),
            path: "/".into(),
            client: "admin".into(),
            secret: key.clone(),
            ..Default::default()
        });
        let t = Instant::now();
        agent.mount(ctx(T), &mount_request(spec, 0)).await?;
        via_agent.push(t.elapsed());
        agent
            .unmount(
                ctx(T),
                &agent::UnmountRequest {
                    name,
                    ..Default::default()
                },
            )
            .await?;
        let t = Instant::now();
        g.ok(&format!(
            "mkdir -p /tmp/cb && mount -t ceph -o name=admin,mds_namespace={},secret={key} {}:/ /tmp/cb",
            cnfs_testbed::ceph::FS_NAME,
            ceph.mon_v1()
        ))
        .await?;
        via_busybox.push(t.elapsed());
        g.ok("umount /tmp/cb").await?;
    }
    println!("Mount CephFS via cnfs-agent  {}", summary(via_agent));
    println!("busybox mount -t ceph        {}", summary(via_busybox));
    drop(ceph);

    let rss = g
        .ok(&format!(
            "{}; grep VmRSS /proc/$a/status",
            cnfs_testbed::guest::AGENT_PID_SH
        ))
        .await?;
    println!(
        "agent with {volumes} volumes: {}",
        rss.trim().replace('\t', " ")
    );
    Ok(())
}
