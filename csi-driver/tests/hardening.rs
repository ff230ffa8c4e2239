//! Hardening of the real `cnfs-csi` binary over its socket: concurrent publishes never share
//! a temp file, and caller strings are held to the CSI spec's size limits (refused by field,
//! echoed only in bounded form in errors and logs).

mod common;

use std::collections::HashMap;
use std::path::Path;

use cnfs_csi::csi::volume_capability::access_mode::Mode;
use cnfs_csi::csi::volume_capability::{AccessMode, AccessType, MountVolume};
use cnfs_csi::csi::*;
use cnfs_protocols::handoff::HandoffDir;
use common::{code, publish, Node};
use tonic::Code;

/// All of `reqs` at once (one HTTP/2 connection multiplexes them): (target, error or "").
async fn publish_all(node: &Node, reqs: Vec<NodePublishVolumeRequest>) -> Vec<(String, String)> {
    let client = node.plugin.node().await.expect("client");
    let mut set = tokio::task::JoinSet::new();
    for req in reqs {
        let mut c = client.clone();
        set.spawn(async move {
            let t = req.target_path.clone();
            let r = c.node_publish_volume(req).await;
            (
                t,
                r.map(|_| String::new())
                    .unwrap_or_else(|e| e.message().to_string()),
            )
        });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        out.push(r.expect("task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishes_in_one_parent_and_in_many_each_get_their_own_target(
) -> anyhow::Result<()> {
    // Issue 10 item 14: with one temp name per parent directory, concurrent publishes into
    // one parent failed or left another volume's text at a target.
    let node = Node::start("concurrent")?;
    let shared = node.pods.join("shared-parent");
    std::fs::create_dir_all(&shared)?;
    let h = HandoffDir::new(&node.handoff);
    for round in 0..25 {
        let mut reqs = Vec::new();
        for i in 0..32 {
            // Half in one parent directory, half in a parent of their own.
            let target = if i % 2 == 0 {
                shared.join(format!("t{i}")).display().to_string()
            } else {
                node.target(&format!("pod-{i}"), "pv")
            };
            reqs.push(NodePublishVolumeRequest {
                volume_id: format!("vol-{round}-{i}"),
                ..publish(&target, &format!("nfs://10.0.0.5/exports/v{i}"))
            });
        }
        let want: HashMap<String, String> = reqs
            .iter()
            .map(|r| (r.target_path.clone(), r.volume_id.clone()))
            .collect();
        let failed: Vec<_> = publish_all(&node, reqs)
            .await
            .into_iter()
            .filter(|(_, e)| !e.is_empty())
            .collect();
        assert!(
            failed.is_empty(),
            "round {round}: failed publishes {failed:?}"
        );
        for (target, id) in &want {
            let text = std::fs::read_to_string(target)?;
            assert!(
                text.contains(&format!("volume {id:?}")),
                "round {round}: {target} holds another volume's text: {text}"
            );
            assert_eq!(
                h.read_record(target)?.map(|r| r.volume_id).as_deref(),
                Some(id.as_str())
            );
        }
        // No temp file is left next to the targets or the records.
        for dir in [shared.clone(), node.handoff.join("records")] {
            let stray: Vec<String> = std::fs::read_dir(&dir)?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.'))
                .collect();
            assert!(
                stray.is_empty(),
                "temp files left in {}: {stray:?}",
                dir.display()
            );
        }
        let mut n = node.plugin.node().await?;
        for (target, id) in want {
            n.node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: id,
                target_path: target.clone(),
            })
            .await?;
            assert!(!Path::new(&target).exists(), "{target}");
        }
    }
    Ok(())
}

/// Asserts an `INVALID_ARGUMENT` naming `field` whose message is bounded.
fn refused<T: std::fmt::Debug>(r: Result<T, tonic::Status>, field: &str, what: &str) {
    let (c, msg) = code(r);
    let shown = &msg[..msg.len().min(300)];
    assert_eq!(c, Code::InvalidArgument, "{what}: {shown}");
    assert!(
        msg.starts_with(field),
        "{what}: expected the field {field:?} in {shown:?}"
    );
    assert!(msg.len() < 1024, "{what}: a {} byte message", msg.len());
}

/// No log line is longer than a bounded message could make it.
fn assert_log_bounded(log: &str) {
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 2048, "a log line of {longest} bytes");
}

/// Just under tonic's 4 MiB message limit, so the call reaches the driver.
const HUGE: usize = 4_000_000;

#[tokio::test]
async fn node_refuses_strings_over_the_csi_limits_by_field_and_echoes_them_bounded(
) -> anyhow::Result<()> {
    // Issue 10 item 15: CSI's "Size Limits" (strings 128 bytes, maps 4 KiB, mount_flags
    // 4 KiB in all; paths up to the OS's PATH_MAX / NAME_MAX).
    let mut node = Node::start("limits")?;
    let mut n = node.plugin.node().await?;
    let t = node.target("p", "pv");
    let ok = publish(&t, "nfs://10.0.0.5/exports/a?vers=4.1");
    let with_ctx = |k: &str, v: &str| {
        let mut r = ok.clone();
        r.volume_context.insert(k.to_string(), v.to_string());
        r
    };
    let with_cap = |fs_type: String, flags: Vec<String>| NodePublishVolumeRequest {
        volume_capability: Some(VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type,
                mount_flags: flags,
                ..Default::default()
            })),
            access_mode: Some(AccessMode {
                mode: Mode::MultiNodeMultiWriter as i32,
            }),
        }),
        ..ok.clone()
    };
    let long_component = node
        .target("p", "pv")
        .replace("/mount", &format!("/{}", "m".repeat(256)));
    let cases: Vec<(&str, NodePublishVolumeRequest, &str)> = vec![
        (
            "volume_id of 129 bytes",
            NodePublishVolumeRequest {
                volume_id: "v".repeat(129),
                ..ok.clone()
            },
            "volume_id",
        ),
        (
            "volume_id of 4 MB",
            NodePublishVolumeRequest {
                volume_id: "v".repeat(HUGE),
                ..ok.clone()
            },
            "volume_id",
        ),
        (
            "volume_id with a newline",
            NodePublishVolumeRequest {
                volume_id: "vol\n{\"level\":\"forged\"}".into(),
                ..ok.clone()
            },
            "volume_id",
        ),
        (
            "target_path over PATH_MAX",
            NodePublishVolumeRequest {
                target_path: format!("{t}{}", "/x".repeat(2100)),
                ..ok.clone()
            },
            "target_path",
        ),
        (
            "target_path with a component over NAME_MAX",
            NodePublishVolumeRequest {
                target_path: long_component,
                ..ok.clone()
            },
            "target_path",
        ),
        (
            "target_path with a control character",
            NodePublishVolumeRequest {
                target_path: format!("{t}\r"),
                ..ok.clone()
            },
            "target_path",
        ),
        (
            "fs_type of 4 MB",
            with_cap("n".repeat(HUGE), vec![]),
            "volume_capability.mount.fs_type",
        ),
        (
            "a mount flag of 129 bytes",
            with_cap(String::new(), vec![format!("rsize={}", "1".repeat(123))]),
            "volume_capability.mount.mount_flags[0]",
        ),
        (
            "mount flags over 4 KiB in all",
            with_cap(String::new(), vec!["nconnect=4".to_string(); 420]),
            "volume_capability.mount.mount_flags",
        ),
        (
            "volume_context over 4 KiB",
            with_ctx("csi.storage.k8s.io/serviceAccount.name", &"s".repeat(4100)),
            "volume_context",
        ),
        (
            "a 4 MB source",
            with_ctx("source", &format!("nfs://10.0.0.5/{}", "e".repeat(HUGE))),
            "volume_context",
        ),
        (
            "a pod namespace that is no DNS label",
            with_ctx("csi.storage.k8s.io/pod.namespace", "Team_A"),
            "volume_context.csi.storage.k8s.io/pod.namespace",
        ),
        (
            "a pod name that is no DNS subdomain",
            with_ctx("csi.storage.k8s.io/pod.name", &"a".repeat(254)),
            "volume_context.csi.storage.k8s.io/pod.name",
        ),
        (
            "an ephemeral flag that is no boolean",
            with_ctx("csi.storage.k8s.io/ephemeral", "yes"),
            "volume_context.csi.storage.k8s.io/ephemeral",
        ),
        (
            "secrets over 4 KiB",
            NodePublishVolumeRequest {
                secrets: HashMap::from([("userKey".to_string(), "k".repeat(4100))]),
                ..ok.clone()
            },
            "secrets",
        ),
    ];
    for (what, req, field) in cases {
        refused(n.node_publish_volume(req).await, field, what);
    }
    // Nothing was left behind by any refusal.
    assert!(!Path::new(&t).exists());
    assert_eq!(
        std::fs::read_dir(node.pods.join("p/volumes/kubernetes.io~csi/pv"))?.count(),
        0
    );
    assert!(!node.handoff.join("records").exists());

    // An unknown context key is named, in bounded form, with its length.
    let key = format!("k{}", "y".repeat(3000));
    let (_, msg) = code(n.node_publish_volume(with_ctx(&key, "v")).await);
    assert!(
        msg.starts_with("volume_context: unknown key")
            && msg.contains("(3001 bytes)")
            && msg.len() < 512,
        "{msg}"
    );

    // Unpublish and stats hold the same fields to the same limits.
    refused(
        n.node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: "v".repeat(HUGE),
            target_path: t.clone(),
        })
        .await,
        "volume_id",
        "unpublish: 4 MB volume_id",
    );
    refused(
        n.node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: "vol-1".into(),
            target_path: format!("/{}", "p".repeat(HUGE)),
        })
        .await,
        "target_path",
        "unpublish: 4 MB target_path",
    );
    refused(
        n.node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: "v".repeat(129),
            volume_path: t.clone(),
            ..Default::default()
        })
        .await,
        "volume_id",
        "stats: volume_id of 129 bytes",
    );

    // The log names the calls, shows the 4 MB id only bounded, and has no forged line.
    node.plugin.stop()?;
    let log = node.plugin.log();
    assert!(
        log.contains("NodePublishVolume") && log.contains("(4000000 bytes)"),
        "{}",
        &log[..log.len().min(2000)]
    );
    assert_log_bounded(&log);
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("every log line is JSON");
        assert_ne!(v["level"], "forged", "{line}");
    }
    Ok(())
}

#[tokio::test]
async fn node_accepts_strings_at_the_limits() -> anyhow::Result<()> {
    let node = Node::start("at-limits")?;
    let mut n = node.plugin.node().await?;
    let h = HandoffDir::new(&node.handoff);
    // A volume id of exactly 128 bytes and a target path of about 4000 bytes whose
    // components are NAME_MAX long.
    let mut parent = node.pods.join("deep").display().to_string();
    // Fill up to 4095 bytes (PATH_MAX less its NUL) with a 255-byte leaf last, never
    // leaving a one-byte (empty) component.
    let mut rest = 4095 - parent.len() - 256;
    while rest > 0 {
        let mut chunk = rest.min(256);
        if rest - chunk == 1 {
            chunk -= 1;
        }
        parent = format!("{parent}/{}", "d".repeat(chunk - 1));
        rest -= chunk;
    }
    std::fs::create_dir_all(&parent)?;
    let t = format!("{parent}/{}", "m".repeat(255));
    assert_eq!(t.len(), 4095);
    let id = "v".repeat(128);
    n.node_publish_volume(NodePublishVolumeRequest {
        volume_id: id.clone(),
        ..publish(&t, "nfs://10.0.0.5/exports/a?vers=4.1")
    })
    .await?;
    assert_eq!(h.read_record(&t)?.map(|r| r.volume_id), Some(id.clone()));
    n.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: id,
        target_path: t.clone(),
    })
    .await?;
    assert!(!Path::new(&t).exists());
    Ok(())
}

#[tokio::test]
async fn a_provisioned_pvs_context_with_the_provisioner_identity_is_published() -> anyhow::Result<()>
{
    // external-provisioner puts its identity into every PV it makes; kubelet passes it on
    // in volume_context, so it must not be refused as an unknown key.
    let node = Node::start("provisioned")?;
    let mut n = node.plugin.node().await?;
    let h = HandoffDir::new(&node.handoff);
    let t = node.target("p", "pvc-1");
    let mut req = publish(&t, "nfs://10.0.0.5/exports/a/pvc-1?vers=4.1");
    req.volume_context.insert(
        "storage.kubernetes.io/csiProvisionerIdentity".into(),
        "1700000000000-8081-csi.cnfs.io".into(),
    );
    n.node_publish_volume(req).await?;
    assert!(h.read_record(&t)?.is_some());
    Ok(())
}

#[tokio::test]
async fn controller_refuses_over_limit_names_ids_and_maps_before_any_backend_call(
) -> anyhow::Result<()> {
    let mut plugin = common::Plugin::start(
        "ctl-limits",
        "controller",
        &[
            "--config".into(),
            "/nonexistent/csi.toml".into(),
            "--backend-timeout".into(),
            "2".into(),
        ],
    )?;
    let mut c = plugin.controller().await?;
    let cap = common::mount_cap(Mode::MultiNodeMultiWriter);
    // Only loopback is ever named: nothing here may reach a server.
    let nfs = |share: &str| {
        HashMap::from([
            ("fs".to_string(), "nfs".to_string()),
            ("server".to_string(), "127.0.0.1".to_string()),
            ("share".to_string(), share.to_string()),
        ])
    };
    let create = CreateVolumeRequest {
        name: "pvc-1".into(),
        volume_capabilities: vec![cap.clone()],
        parameters: nfs("/exports"),
        ..Default::default()
    };
    let cases: Vec<(&str, CreateVolumeRequest, &str)> = vec![
        (
            "name of 129 bytes",
            CreateVolumeRequest {
                name: "n".repeat(129),
                ..create.clone()
            },
            "name",
        ),
        (
            "name of 4 MB",
            CreateVolumeRequest {
                name: "n".repeat(HUGE),
                ..create.clone()
            },
            "name",
        ),
        (
            "name with a banned control character",
            CreateVolumeRequest {
                name: "pvc-\u{1b}[31m".into(),
                ..create.clone()
            },
            "name",
        ),
        (
            "parameters over 4 KiB",
            CreateVolumeRequest {
                parameters: nfs(&format!("/{}", "e".repeat(4100))),
                ..create.clone()
            },
            "parameters",
        ),
        (
            "secrets over 4 KiB",
            CreateVolumeRequest {
                secrets: HashMap::from([("adminKey".to_string(), "k".repeat(4100))]),
                ..create.clone()
            },
            "secrets",
        ),
        (
            "a share that makes the volume id longer than 128 bytes",
            CreateVolumeRequest {
                parameters: nfs(&format!("/exports/{}", "s".repeat(100))),
                ..create.clone()
            },
            "parameters",
        ),
        (
            "a 4 MB fs_type",
            CreateVolumeRequest {
                volume_capabilities: vec![VolumeCapability {
                    access_type: Some(AccessType::Mount(MountVolume {
                        fs_type: "n".repeat(HUGE),
                        ..Default::default()
                    })),
                    ..cap.clone()
                }],
                ..create.clone()
            },
            "volume_capabilities[0].mount.fs_type",
        ),
    ];
    for (what, req, field) in cases {
        refused(c.create_volume(req).await, field, what);
    }
    let (_, msg) = code(
        c.create_volume(CreateVolumeRequest {
            parameters: nfs(&format!("/exports/{}", "s".repeat(100))),
            ..create.clone()
        })
        .await,
    );
    assert!(msg.contains("volume id would be"), "{msg}");

    let long_id = "nfs#retain#127.0.0.1#/exports#".to_string() + &"d".repeat(100);
    refused(
        c.delete_volume(DeleteVolumeRequest {
            volume_id: long_id.clone(),
            ..Default::default()
        })
        .await,
        "volume_id",
        "delete: volume_id of 130 bytes",
    );
    refused(
        c.validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id: "v".repeat(HUGE),
            volume_capabilities: vec![cap.clone()],
            ..Default::default()
        })
        .await,
        "volume_id",
        "validate: 4 MB volume_id",
    );
    refused(
        c.validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id: "nfs#retain#127.0.0.1#/exports#d".into(),
            volume_context: HashMap::from([("source".to_string(), "s".repeat(4100))]),
            volume_capabilities: vec![cap.clone()],
            ..Default::default()
        })
        .await,
        "volume_context",
        "validate: volume_context over 4 KiB",
    );
    refused(
        c.controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: "v".repeat(HUGE),
            capacity_range: Some(CapacityRange {
                required_bytes: 1 << 30,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await,
        "volume_id",
        "expand: 4 MB volume_id",
    );
    plugin.stop()?;
    let log = plugin.log();
    assert!(
        log.contains("CreateVolume") && log.contains("(4000000 bytes)"),
        "{}",
        &log[..log.len().min(2000)]
    );
    assert_log_bounded(&log);
    Ok(())
}

#[test]
fn a_node_id_over_the_csi_limit_stops_the_plugin_at_start() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("cnfs-csi-nodeid-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cnfs-csi"))
        .arg("--endpoint")
        .arg(dir.join("csi.sock"))
        .args(["node", "--node-id", &"n".repeat(257), "--handoff-dir"])
        .arg(dir.join("handoff"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if std::time::Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_dir_all(&dir);
            panic!("cnfs-csi kept running with a 257-byte node id");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)?;
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!status.success());
    assert!(err.contains("--node-id") && err.contains("256"), "{err}");
    Ok(())
}
