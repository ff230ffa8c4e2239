//! CSI conformance of the real `cnfs-csi` binary over its socket, following what csi-sanity
//! checks (its spec names are given per test), plus CNFS's own promises: the node plugin runs
//! with no capability, calls no mount system call, and keeps keys out of records, errors and
//! logs.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use cnfs_csi::csi::node_service_capability::rpc::Type as NodeCap;
use cnfs_csi::csi::node_service_capability::Type as NodeCapType;
use cnfs_csi::csi::volume_capability::access_mode::Mode;
use cnfs_csi::csi::volume_capability::{AccessMode, AccessType, BlockVolume};
use cnfs_csi::csi::*;
use cnfs_protocols::handoff::{self, HandoffDir};
use common::{code, mount_cap, publish, Node, Plugin, KEY};
use tonic::Code;

#[tokio::test]
async fn identity_answers_like_csi_sanity_expects() -> anyhow::Result<()> {
    let node = Node::start("identity")?;
    let mut id = node.plugin.identity().await?;
    // csi-sanity "GetPluginInfo should return appropriate information".
    let info = id
        .get_plugin_info(GetPluginInfoRequest {})
        .await?
        .into_inner();
    assert_eq!(info.name, "csi.cnfs.io");
    assert!(info.name.len() <= 63);
    assert!(!info.vendor_version.is_empty());
    // "GetPluginCapabilities should return appropriate capabilities": a node-only process
    // does not claim the Controller service.
    let caps = id
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await?
        .into_inner();
    assert!(caps.capabilities.is_empty(), "{caps:?}");
    // "Probe should return appropriate information".
    let probe = id.probe(ProbeRequest {}).await?.into_inner();
    assert_eq!(probe.ready, Some(true));
    Ok(())
}

#[tokio::test]
async fn node_capabilities_info_and_argument_validation() -> anyhow::Result<()> {
    let node = Node::start("args")?;
    let mut n = node.plugin.node().await?;
    // "NodeGetCapabilities should return appropriate capabilities": only what is implemented.
    let caps: Vec<i32> = n
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await?
        .into_inner()
        .capabilities
        .into_iter()
        .filter_map(|c| c.r#type.map(|NodeCapType::Rpc(r)| r.r#type))
        .collect();
    assert!(caps.contains(&(NodeCap::GetVolumeStats as i32)));
    assert!(caps.contains(&(NodeCap::VolumeCondition as i32)));
    assert!(!caps.contains(&(NodeCap::StageUnstageVolume as i32)));
    assert!(!caps.contains(&(NodeCap::ExpandVolume as i32)));
    // "NodeGetInfo should return appropriate values".
    let info = n.node_get_info(NodeGetInfoRequest {}).await?.into_inner();
    assert_eq!(info.node_id, "node-a");
    // NodeStageVolume is not advertised, so it is not served.
    let t = node.target("p0", "pv0");
    let ok = publish(&t, "nfs://10.0.0.5/exports/a?vers=4.1");
    // "NodePublishVolume should fail when no volume id / target path / volume capability is
    // provided", and CNFS's own field checks. Each names the field.
    let cases: Vec<(NodePublishVolumeRequest, &str)> = vec![
        (
            NodePublishVolumeRequest {
                volume_id: "".into(),
                ..ok.clone()
            },
            "volume_id",
        ),
        (
            NodePublishVolumeRequest {
                target_path: "".into(),
                ..ok.clone()
            },
            "target_path",
        ),
        (
            NodePublishVolumeRequest {
                target_path: "relative/path".into(),
                ..ok.clone()
            },
            "target_path",
        ),
        (
            NodePublishVolumeRequest {
                target_path: format!("{t}/../../x"),
                ..ok.clone()
            },
            "target_path",
        ),
        (
            NodePublishVolumeRequest {
                volume_capability: None,
                ..ok.clone()
            },
            "volume_capability",
        ),
        (
            NodePublishVolumeRequest {
                volume_capability: Some(VolumeCapability {
                    access_type: Some(AccessType::Block(BlockVolume {})),
                    access_mode: Some(AccessMode {
                        mode: Mode::SingleNodeWriter as i32,
                    }),
                }),
                ..ok.clone()
            },
            "volume_capability",
        ),
        (
            NodePublishVolumeRequest {
                volume_capability: Some(mount_cap(Mode::Unknown)),
                ..ok.clone()
            },
            "volume_capability.access_mode.mode",
        ),
        (
            NodePublishVolumeRequest {
                volume_context: HashMap::new(),
                ..ok.clone()
            },
            "volume_context.source",
        ),
        (
            NodePublishVolumeRequest {
                volume_context: HashMap::from([
                    ("source".to_string(), "nfs://10.0.0.5/e".to_string()),
                    ("server".to_string(), "10.0.0.5".to_string()),
                ]),
                ..ok.clone()
            },
            "volume_context",
        ),
        (
            publish(&t, "nfs://10.0.0.5/exports/a?addr=10.9.9.9"),
            "volume.options.addr",
        ),
        (
            publish(&t, "nfs://10.0.0.5/exports/../etc"),
            "volume.nfs.export",
        ),
        (publish(&t, "ftp://10.0.0.5/share"), "volume_context.source"),
        (publish(&t, "smb://10.0.0.5/share"), "secrets.username"),
        (
            publish(&t, "cephfs://10.0.0.7:6789/sub?fs=a&client=x"),
            "secrets.userKey",
        ),
        (
            NodePublishVolumeRequest {
                secrets: HashMap::from([("adminKey".to_string(), KEY.to_string())]),
                ..ok.clone()
            },
            "secrets",
        ),
    ];
    for (req, field) in cases {
        let (c, msg) = code(n.node_publish_volume(req.clone()).await);
        assert_eq!(c, Code::InvalidArgument, "{req:?}: {msg}");
        assert!(
            msg.starts_with(field),
            "expected the field {field:?} in {msg:?}"
        );
    }
    // Nothing was left behind by any refusal.
    assert!(!Path::new(&t).exists());
    assert!(HandoffDir::new(&node.handoff).read_record(&t)?.is_none());
    // "NodeUnpublishVolume should fail when no volume id / target path is provided".
    for (req, field) in [
        (
            NodeUnpublishVolumeRequest {
                volume_id: "".into(),
                target_path: t.clone(),
            },
            "volume_id",
        ),
        (
            NodeUnpublishVolumeRequest {
                volume_id: "vol-1".into(),
                target_path: "".into(),
            },
            "target_path",
        ),
    ] {
        let (c, msg) = code(n.node_unpublish_volume(req).await);
        assert_eq!(c, Code::InvalidArgument, "{msg}");
        assert!(msg.starts_with(field), "{msg}");
    }
    // "NodeGetVolumeStats should fail when no volume id / volume path is provided, or the
    // volume is not found".
    for (req, want) in [
        (
            NodeGetVolumeStatsRequest {
                volume_id: "".into(),
                volume_path: t.clone(),
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            NodeGetVolumeStatsRequest {
                volume_id: "vol-1".into(),
                volume_path: "".into(),
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            NodeGetVolumeStatsRequest {
                volume_id: "vol-1".into(),
                volume_path: t.clone(),
                ..Default::default()
            },
            Code::NotFound,
        ),
    ] {
        let (c, msg) = code(n.node_get_volume_stats(req).await);
        assert_eq!(c, want, "{msg}");
    }
    Ok(())
}

#[tokio::test]
async fn publish_leaves_a_record_and_a_loud_target_and_unpublish_removes_them() -> anyhow::Result<()>
{
    let mut node = Node::start("publish")?;
    let mut n = node.plugin.node().await?;
    let h = HandoffDir::new(&node.handoff);

    // NFS, as kubelet calls it (parent made, target absent).
    let t = node.target("pod-1", "pv-nfs");
    let req = publish(&t, "nfs://10.0.0.5/exports/a?vers=4.1&nconnect=2");
    n.node_publish_volume(req.clone()).await?;
    let rec = h.read_record(&t)?.expect("record");
    assert_eq!(
        (rec.volume_id.as_str(), rec.pod_namespace.as_str()),
        ("vol-1", "team-a")
    );
    assert!(!rec.has_secret && !rec.read_only && !rec.ephemeral);
    let mode = std::fs::metadata(h.record_path(&t))?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // The target is a read-only file that says what to do, not a directory that would
    // swallow writes under another runtime.
    let meta = std::fs::symlink_metadata(&t)?;
    assert!(meta.is_file());
    assert_eq!(meta.permissions().mode() & 0o777, 0o444);
    let text = std::fs::read_to_string(&t)?;
    assert!(
        text.starts_with("CNFS volume hand-off") && text.contains("runtime class"),
        "{text}"
    );
    // "should be idempotent": the same publish again is OK and changes nothing.
    n.node_publish_volume(req.clone()).await?;
    assert_eq!(h.read_record(&t)?, Some(rec.clone()));
    // Another volume or source at the same target: ALREADY_EXISTS.
    let other = NodePublishVolumeRequest {
        volume_id: "vol-2".into(),
        ..req.clone()
    };
    assert_eq!(
        code(n.node_publish_volume(other).await).0,
        Code::AlreadyExists
    );
    // A CO that made the target as an empty directory (csi-sanity, older kubelets) is fine.
    let t_dir = node.target("pod-1", "pv-dir");
    std::fs::create_dir(&t_dir)?;
    n.node_publish_volume(NodePublishVolumeRequest {
        readonly: true,
        ..publish(&t_dir, "nfs://10.0.0.5/exports/b")
    })
    .await?;
    assert!(std::fs::symlink_metadata(&t_dir)?.is_file());
    assert!(h.read_record(&t_dir)?.expect("record").read_only);
    // Published but no guest has it yet: stats say so as a volume condition.
    let stats = n
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: "vol-1".into(),
            volume_path: t.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let cond = stats.volume_condition.expect("condition");
    assert!(
        cond.abnormal && cond.message.contains("runtime class"),
        "{cond:?}"
    );

    // CephFS: the key goes to a 0600 secret file on tmpfs, never into the record.
    let tc = node.target("pod-2", "pv-ceph");
    let ceph = NodePublishVolumeRequest {
        volume_id: "vol-c".into(),
        secrets: HashMap::from([
            ("userID".to_string(), "app".to_string()),
            ("userKey".to_string(), KEY.to_string()),
        ]),
        ..publish(&tc, "cephfs://10.0.0.7:6789/volumes/csi/v1?fs=cephfs")
    };
    n.node_publish_volume(ceph.clone()).await?;
    let rec_c = h.read_record(&tc)?.expect("record");
    assert!(rec_c.has_secret);
    let secret = h.read_secret(&tc)?.expect("secret");
    assert_eq!(
        (
            secret.0.get("userID").map(String::as_str),
            secret.0.get("userKey").map(String::as_str)
        ),
        (Some("app"), Some(KEY))
    );
    assert_eq!(
        std::fs::metadata(h.secret_path(&tc))?.permissions().mode() & 0o777,
        0o600
    );
    // The shim can rebuild the agent's spec from what was left.
    let (_, wire) = rec_c.volume_spec(Some(&secret))?;
    assert_eq!(wire.name, handoff::guest_volume_name(&tc));
    // A wrong-looking key is refused without being echoed.
    let bad = NodePublishVolumeRequest {
        secrets: HashMap::from([
            ("userID".to_string(), "app".to_string()),
            ("userKey".to_string(), "not-a-key-SECRETVALUE".to_string()),
        ]),
        ..publish(
            &node.target("pod-3", "pv"),
            "cephfs://10.0.0.7:6789/v?fs=cephfs",
        )
    };
    let (c, msg) = code(n.node_publish_volume(bad).await);
    assert_eq!(c, Code::InvalidArgument);
    assert!(!msg.contains("SECRETVALUE"), "{msg}");

    // "NodeUnpublishVolume should remove target path" and be idempotent.
    for (target, id) in [(&t, "vol-1"), (&tc, "vol-c"), (&t_dir, "vol-1")] {
        let req = NodeUnpublishVolumeRequest {
            volume_id: id.into(),
            target_path: target.clone(),
        };
        n.node_unpublish_volume(req.clone()).await?;
        n.node_unpublish_volume(req).await?;
        assert!(!Path::new(target).exists(), "{target}");
        assert!(h.read_record(target)?.is_none());
        assert!(h.read_secret(target)?.is_none());
    }
    // Unpublishing a path that was never published is fine too.
    n.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: "vol-9".into(),
        target_path: node.target("pod-9", "pv"),
    })
    .await?;

    // The key is nowhere in the plugin's log.
    let strace = node.plugin.stop()?;
    let log = node.plugin.log();
    assert!(log.contains("NodePublishVolume"), "{log}");
    assert!(!log.contains(KEY) && !log.contains("SECRETVALUE"), "{log}");
    common::assert_no_mount_calls(&strace);
    Ok(())
}

#[tokio::test]
async fn a_key_is_never_written_outside_tmpfs() -> anyhow::Result<()> {
    // A hand-off directory on a disk file system: NFS publishes work, CephFS (a key) is
    // refused before anything is created.
    let disk = std::env::temp_dir().join(format!("cnfs-csi-disk-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&disk);
    let fs_type = nix::sys::statfs::statfs(&std::env::temp_dir())?.filesystem_type();
    if fs_type.0 as i64 == 0x0102_1994 {
        eprintln!("skipped: {} is tmpfs here", std::env::temp_dir().display());
        return Ok(());
    }
    let plugin = Plugin::start(
        "disk",
        "node",
        &[
            "--node-id".into(),
            "n".into(),
            "--handoff-dir".into(),
            disk.display().to_string(),
        ],
    )?;
    let mut n = plugin.node().await?;
    let parent = plugin.dir.join("pods/p/volumes/kubernetes.io~csi/pv");
    std::fs::create_dir_all(&parent)?;
    let t = parent.join("mount").display().to_string();
    let req = NodePublishVolumeRequest {
        secrets: HashMap::from([
            ("userID".to_string(), "app".to_string()),
            ("userKey".to_string(), KEY.to_string()),
        ]),
        ..publish(&t, "cephfs://10.0.0.7:6789/v?fs=cephfs")
    };
    let (c, msg) = code(n.node_publish_volume(req).await);
    assert_eq!(c, Code::FailedPrecondition, "{msg}");
    assert!(msg.contains("tmpfs"), "{msg}");
    assert!(!Path::new(&t).exists());
    assert!(!HandoffDir::new(&disk).secret_path(&t).exists());
    n.node_publish_volume(publish(&t, "nfs://10.0.0.5/e"))
        .await?;
    assert!(Path::new(&t).is_file());
    let _ = std::fs::remove_dir_all(&disk);
    Ok(())
}

#[tokio::test]
async fn the_node_plugin_runs_with_no_capability_and_never_mounts() -> anyhow::Result<()> {
    let mut node = Node::start("caps")?;
    for (k, v) in node.plugin.capabilities()? {
        assert_eq!(v, "0000000000000000", "{k} of the plugin process");
    }
    let mut n = node.plugin.node().await?;
    let t = node.target("p", "pv");
    n.node_publish_volume(publish(&t, "nfs://10.0.0.5/e"))
        .await?;
    n.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: "vol-1".into(),
        target_path: t,
    })
    .await?;
    let strace = node.plugin.stop()?;
    common::assert_no_mount_calls(&strace);
    Ok(())
}

#[tokio::test]
async fn a_symlinked_kubelet_root_is_handed_off_under_both_paths() -> anyhow::Result<()> {
    // containerd resolves symlinks in a bind source before the shim sees it, so a kubelet
    // root that is a symlink (e.g. /var/lib/kubelet -> /data/kubelet) needs the record under
    // the resolved path too.
    let node = Node::start("symlink")?;
    let mut n = node.plugin.node().await?;
    let real = node.plugin.dir.join("data-kubelet");
    let parent = real.join("pods/u/volumes/kubernetes.io~csi/pv");
    std::fs::create_dir_all(&parent)?;
    let link = node.plugin.dir.join("kubelet");
    std::os::unix::fs::symlink(&real, &link)?;
    let target = link
        .join("pods/u/volumes/kubernetes.io~csi/pv/mount")
        .display()
        .to_string();
    let resolved = parent.join("mount").display().to_string();
    let req = NodePublishVolumeRequest {
        secrets: HashMap::from([
            ("userID".to_string(), "app".to_string()),
            ("userKey".to_string(), KEY.to_string()),
        ]),
        ..publish(&target, "cephfs://10.0.0.7:6789/v?fs=cephfs")
    };
    n.node_publish_volume(req).await?;
    let h = HandoffDir::new(&node.handoff);
    let by_link = h
        .read_record(&target)?
        .expect("record under kubelet's path");
    let by_real = h
        .read_record(&resolved)?
        .expect("record under the resolved path");
    assert_eq!(by_real.target_path, resolved);
    assert_eq!(by_link.volume_id, by_real.volume_id);
    assert!(h.read_secret(&resolved)?.is_some());
    n.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: "vol-1".into(),
        target_path: target.clone(),
    })
    .await?;
    for t in [&target, &resolved] {
        assert!(h.read_record(t)?.is_none(), "{t}");
        assert!(h.read_secret(t)?.is_none(), "{t}");
    }
    assert!(!Path::new(&resolved).exists());
    Ok(())
}
