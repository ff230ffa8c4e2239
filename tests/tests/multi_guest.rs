//! The test bed's multi-guest namespace: two guests on one bridge reach the same nfs-ganesha,
//! each through its own tap, address and MAC (what `cargo xtask bench --part storm` builds on).

use std::time::Duration;

use cnfs_testbed::ganesha::EXPORT;
use cnfs_testbed::vm::ctx;
use cnfs_testbed::{mount_request, nfs_volume, Artifacts, Ganesha, NetNs, TempDir, Vm};

const T: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_guests_on_one_namespace_mount_one_export_and_see_each_others_files(
) -> anyhow::Result<()> {
    let art = Artifacts::locate()?;
    let dir = TempDir::new("multi-guest")?;
    let ns = NetNs::create_with_guests(2)?;
    let nfs = Ganesha::start(&ns, dir.path())?;
    // One at a time: booting is not what this test is about, and two emulated boots at once
    // on a shared 2-core machine only make the agent wait longer.
    let mut vms = Vec::new();
    for i in 0..2 {
        vms.push(Vm::boot_guest(&art, &ns, i, dir.path()).await?);
    }
    let server = ns.host_ip.clone();
    for (i, vm) in vms.iter().enumerate() {
        // Each guest has its own address on the bridge (the server tells them apart by it).
        let addr = vm.exec.ok("ip -4 addr show dev eth0").await?;
        assert!(
            addr.contains(&format!("inet {}/24", ns.guest(i).ip)),
            "guest {i}: {addr}"
        );
        // A sandbox id per guest, as the wrapper sends one per pod: the NFSv4 client identity
        // derives from it, and two guests sharing one would expire each other's state.
        let mut req = mount_request(nfs_volume("shared", &server, EXPORT, "4.1"), 60_000);
        req.sandbox_id = format!("multi-guest-{i}");
        vm.agent().await?.mount(ctx(T), &req).await?;
        vm.exec
            .ok(&format!(
                "echo from-guest-{i} > /run/cnfs/volumes/shared/g{i}.txt && sync"
            ))
            .await?;
    }
    for (i, vm) in vms.iter().enumerate() {
        let other = 1 - i;
        let text = vm
            .exec
            .ok(&format!("cat /run/cnfs/volumes/shared/g{other}.txt"))
            .await?;
        assert_eq!(text, format!("from-guest-{other}\n"), "guest {i}");
    }
    for i in 0..2 {
        let on_server = std::fs::read_to_string(nfs.export_dir.join(format!("g{i}.txt")))?;
        assert_eq!(on_server, format!("from-guest-{i}\n"));
    }
    // Two clients, two connections: each guest reached the server over its own tap.
    let ss = cnfs_testbed::process::run(
        ns.command("ss")
            .args(["-Htn", "state", "established"])
            .arg("( sport = :2049 )"),
    )?;
    let peers: std::collections::BTreeSet<String> = ss
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .filter_map(|p| p.rsplit_once(':'))
        // ganesha listens on IPv6 too: IPv4 peers then show as [::ffff:a.b.c.d].
        .map(|(ip, _)| {
            ip.trim_matches(['[', ']'])
                .trim_start_matches("::ffff:")
                .to_string()
        })
        .collect();
    let want: std::collections::BTreeSet<String> = (0..2).map(|i| ns.guest(i).ip).collect();
    assert_eq!(peers, want, "{ss}");
    Ok(())
}
