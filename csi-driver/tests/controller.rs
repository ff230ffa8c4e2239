//! The Controller service of the real `cnfs-csi` over its socket, as csi-sanity's
//! "Controller Service" specs check it (names given per block), against a real nfs-ganesha
//! in the test's network namespace; the process runs with no capability.

mod common;

use std::collections::HashMap;

use cnfs_csi::csi::controller_service_capability::rpc::Type as Cap;
use cnfs_csi::csi::controller_service_capability::Type as CapType;
use cnfs_csi::csi::plugin_capability;
use cnfs_csi::csi::volume_capability::access_mode::Mode;
use cnfs_csi::csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use cnfs_csi::csi::*;
use cnfs_testbed::ganesha::{Ganesha, EXPORT};
use cnfs_testbed::{NetNs, TempDir};
use common::Plugin;
use tonic::Code;

const KEY: &str = "AQBSdFhlAAAAABAAWmDqDUUxmRX4fcLsaFk2tg==";

fn cap(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

fn err<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
    let e = r.expect_err("the call must fail");
    (e.code(), e.message().to_string())
}

/// A method the driver does not serve answers UNIMPLEMENTED (the CO only calls what the
/// capabilities advertise).
async fn unimplemented(channel: tonic::transport::Channel, path: &'static str) -> Code {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let codec = tonic_prost::ProstCodec::<ProbeRequest, ProbeResponse>::default();
    let r = grpc
        .unary(
            tonic::Request::new(ProbeRequest {}),
            tonic::codegen::http::uri::PathAndQuery::from_static(path),
            codec,
        )
        .await;
    r.expect_err("not served").code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_follows_csi_sanity_against_a_real_nfs_server() -> anyhow::Result<()> {
    let ns = NetNs::create()?;
    // As in the controller Deployment: reserved source ports need no capability in this
    // namespace, so the NFS client uses one (Linux nfsd's default "secure" wants that).
    let st = ns
        .command("sysctl")
        .args(["-qw", "net.ipv4.ip_unprivileged_port_start=0"])
        .status()?;
    anyhow::ensure!(st.success(), "sysctl in the namespace");
    let dir = TempDir::new("csi-ctl")?;
    let nfs = Ganesha::start(&ns, dir.path())?;
    let mut plugin = Plugin::start_in(
        "controller",
        Some(&ns.name),
        "controller",
        &[
            "--config".into(),
            "/nonexistent/csi.toml".into(),
            "--backend-timeout".into(),
            "5".into(),
        ],
    )?;
    let channel = plugin.channel().await?;
    let mut c = cnfs_csi::csi::controller_client::ControllerClient::new(channel.clone());
    let mut id = cnfs_csi::csi::identity_client::IdentityClient::new(channel.clone());

    // Identity "GetPluginCapabilities": the controller service and online expansion.
    let caps = id
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await?
        .into_inner()
        .capabilities;
    assert!(caps.iter().any(|c| matches!(&c.r#type,
        Some(plugin_capability::Type::Service(s)) if s.r#type == plugin_capability::service::Type::ControllerService as i32)));
    assert!(caps.iter().any(|c| matches!(&c.r#type,
        Some(plugin_capability::Type::VolumeExpansion(e)) if e.r#type == plugin_capability::volume_expansion::Type::Online as i32)));

    // "ControllerGetCapabilities should return appropriate values": exactly what is served.
    let caps: Vec<i32> = c
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await?
        .into_inner()
        .capabilities
        .into_iter()
        .filter_map(|c| c.r#type.map(|CapType::Rpc(r)| r.r#type))
        .collect();
    assert_eq!(
        caps,
        [Cap::CreateDeleteVolume as i32, Cap::ExpandVolume as i32]
    );
    for path in [
        "/csi.v1.Controller/ControllerPublishVolume",
        "/csi.v1.Controller/ListVolumes",
        "/csi.v1.Controller/GetCapacity",
        "/csi.v1.Controller/CreateSnapshot",
        "/csi.v1.Node/NodeStageVolume",
    ] {
        assert_eq!(
            unimplemented(channel.clone(), path).await,
            Code::Unimplemented,
            "{path}"
        );
    }

    let params = HashMap::from([
        ("fs".to_string(), "nfs".to_string()),
        ("server".to_string(), ns.host_ip.clone()),
        ("share".to_string(), EXPORT.to_string()),
        ("vers".to_string(), "4.1".to_string()),
        ("onDelete".to_string(), "delete".to_string()),
    ]);
    let create = CreateVolumeRequest {
        name: "pvc-sanity-1".into(),
        volume_capabilities: vec![cap(Mode::SingleNodeWriter)],
        parameters: params.clone(),
        ..Default::default()
    };

    // "CreateVolume should fail when no name / no volume capabilities are provided", and
    // CNFS's own checks, each naming the field.
    let mut block = cap(Mode::SingleNodeWriter);
    block.access_type = Some(AccessType::Block(BlockVolume {}));
    let cases: Vec<(CreateVolumeRequest, Code, &str)> = vec![
        (
            CreateVolumeRequest {
                name: "".into(),
                ..create.clone()
            },
            Code::InvalidArgument,
            "name",
        ),
        (
            CreateVolumeRequest {
                volume_capabilities: vec![],
                ..create.clone()
            },
            Code::InvalidArgument,
            "volume_capabilities",
        ),
        (
            CreateVolumeRequest {
                volume_capabilities: vec![block],
                ..create.clone()
            },
            Code::InvalidArgument,
            "volume_capabilities[0]",
        ),
        (
            CreateVolumeRequest {
                parameters: HashMap::new(),
                ..create.clone()
            },
            Code::InvalidArgument,
            "parameters.fs",
        ),
        (
            CreateVolumeRequest {
                parameters: {
                    let mut p = params.clone();
                    p.insert("mountOptions".into(), "x".into());
                    p
                },
                ..create.clone()
            },
            Code::InvalidArgument,
            "parameters",
        ),
        (
            CreateVolumeRequest {
                parameters: {
                    let mut p = params.clone();
                    p.insert("onDelete".into(), "shred".into());
                    p
                },
                ..create.clone()
            },
            Code::InvalidArgument,
            "parameters.onDelete",
        ),
        (
            CreateVolumeRequest {
                capacity_range: Some(CapacityRange {
                    required_bytes: 20,
                    limit_bytes: 10,
                }),
                ..create.clone()
            },
            Code::OutOfRange,
            "capacity_range",
        ),
        (
            CreateVolumeRequest {
                volume_content_source: Some(VolumeContentSource::default()),
                ..create.clone()
            },
            Code::InvalidArgument,
            "volume_content_source",
        ),
        (
            CreateVolumeRequest {
                parameters: HashMap::from([
                    ("fs".to_string(), "cephfs".to_string()),
                    ("clusterID".to_string(), "nowhere".to_string()),
                    ("fsName".to_string(), "cephfs".to_string()),
                ]),
                secrets: HashMap::from([
                    ("adminID".to_string(), "admin".to_string()),
                    ("adminKey".to_string(), KEY.to_string()),
                ]),
                ..create.clone()
            },
            Code::FailedPrecondition,
            "clusterID",
        ),
    ];
    for (req, want, field) in cases {
        let (code, msg) = err(c.create_volume(req.clone()).await);
        assert_eq!(code, want, "{msg}");
        assert!(
            msg.starts_with(field),
            "expected {field:?} first in {msg:?}"
        );
        assert!(!msg.contains(KEY));
    }
    // Nothing was made on the share by any refusal.
    assert!(!nfs.export_dir.join("pvc-sanity-1").exists());

    // "should return appropriate values SingleNodeWriter NoCapacity" and "should not fail
    // when requesting to create a volume with already existing name and same capacity".
    let v = c
        .create_volume(create.clone())
        .await?
        .into_inner()
        .volume
        .expect("volume");
    assert!(
        nfs.export_dir.join("pvc-sanity-1").is_dir(),
        "made on the server"
    );
    assert_eq!(v.capacity_bytes, 0, "NFS has no quota: capacity unknown");
    assert_eq!(
        v.volume_context.get("source").map(String::as_str),
        Some(format!("nfs://{}{EXPORT}/pvc-sanity-1?vers=4.1", ns.host_ip).as_str())
    );
    let again = c
        .create_volume(create.clone())
        .await?
        .into_inner()
        .volume
        .expect("volume");
    assert_eq!(again.volume_id, v.volume_id);

    // "ValidateVolumeCapabilities should fail when no volume id / no capabilities are
    // provided, or the volume does not exist; should return appropriate values".
    let validate = ValidateVolumeCapabilitiesRequest {
        volume_id: v.volume_id.clone(),
        volume_capabilities: vec![cap(Mode::MultiNodeMultiWriter)],
        ..Default::default()
    };
    let ok = c
        .validate_volume_capabilities(validate.clone())
        .await?
        .into_inner();
    assert!(ok.confirmed.is_some(), "{ok:?}");
    for (req, want) in [
        (
            ValidateVolumeCapabilitiesRequest {
                volume_id: "".into(),
                ..validate.clone()
            },
            Code::InvalidArgument,
        ),
        (
            ValidateVolumeCapabilitiesRequest {
                volume_capabilities: vec![],
                ..validate.clone()
            },
            Code::InvalidArgument,
        ),
        (
            ValidateVolumeCapabilitiesRequest {
                volume_id: "reallyfakevolumeid".into(),
                ..validate.clone()
            },
            Code::NotFound,
        ),
        (
            ValidateVolumeCapabilitiesRequest {
                volume_id: v.volume_id.replace("pvc-sanity-1", "pvc-missing"),
                ..validate.clone()
            },
            Code::NotFound,
        ),
    ] {
        assert_eq!(err(c.validate_volume_capabilities(req).await).0, want);
    }

    // ControllerExpandVolume: argument checks, unknown volumes, and NFS has no quota.
    let expand = ControllerExpandVolumeRequest {
        volume_id: v.volume_id.clone(),
        capacity_range: Some(CapacityRange {
            required_bytes: 1 << 30,
            limit_bytes: 0,
        }),
        ..Default::default()
    };
    for (req, want) in [
        (
            ControllerExpandVolumeRequest {
                volume_id: "".into(),
                ..expand.clone()
            },
            Code::InvalidArgument,
        ),
        (
            ControllerExpandVolumeRequest {
                capacity_range: None,
                ..expand.clone()
            },
            Code::InvalidArgument,
        ),
        (
            ControllerExpandVolumeRequest {
                volume_id: "reallyfakevolumeid".into(),
                ..expand.clone()
            },
            Code::NotFound,
        ),
        (expand.clone(), Code::FailedPrecondition),
    ] {
        assert_eq!(err(c.controller_expand_volume(req).await).0, want);
    }

    // "DeleteVolume should fail when no volume id is provided; should succeed when an invalid
    // volume id is used; should return appropriate values no optional values added".
    assert_eq!(
        err(c.delete_volume(DeleteVolumeRequest::default()).await).0,
        Code::InvalidArgument
    );
    c.delete_volume(DeleteVolumeRequest {
        volume_id: "reallyfakevolumeid".into(),
        ..Default::default()
    })
    .await?;
    std::fs::write(nfs.export_dir.join("pvc-sanity-1/data.txt"), "x")?;
    let delete = DeleteVolumeRequest {
        volume_id: v.volume_id.clone(),
        ..Default::default()
    };
    c.delete_volume(delete.clone()).await?;
    assert!(
        !nfs.export_dir.join("pvc-sanity-1").exists(),
        "onDelete=delete removed it"
    );
    c.delete_volume(delete).await?;

    // An encrypted volume: its id and source say luks2 and its size; multi-node
    // capabilities are answered unconfirmed, saying why; it grows at its next mount.
    let mut luks2 = params.clone();
    luks2.insert("encryption".into(), "luks2".into());
    let enc = c
        .create_volume(CreateVolumeRequest {
            name: "pvc-luks2-1".into(),
            parameters: luks2,
            capacity_range: Some(CapacityRange {
                required_bytes: (100 << 20) + 1,
                limit_bytes: 0,
            }),
            ..create.clone()
        })
        .await?
        .into_inner()
        .volume
        .expect("volume");
    assert!(enc.volume_id.starts_with("nfs+luks2#delete#"), "{enc:?}");
    assert_eq!(
        enc.capacity_bytes,
        (100 << 20) + 4096,
        "rounded up to 4 KiB"
    );
    assert!(
        enc.volume_context["source"]
            .ends_with("/pvc-luks2-1?vers=4.1&encryption=luks2&size=104861696"),
        "{enc:?}"
    );
    assert!(nfs.export_dir.join("pvc-luks2-1").is_dir());
    let check = |mode: Mode| ValidateVolumeCapabilitiesRequest {
        volume_id: enc.volume_id.clone(),
        volume_capabilities: vec![cap(mode)],
        ..Default::default()
    };
    let shared = c
        .validate_volume_capabilities(check(Mode::MultiNodeMultiWriter))
        .await?
        .into_inner();
    assert!(shared.confirmed.is_none(), "{shared:?}");
    assert!(
        shared.message.starts_with(
            "volume_capabilities[0].access_mode.mode: MULTI_NODE_MULTI_WRITER is refused for \
             encryption=luks2"
        ),
        "{shared:?}"
    );
    let single = c
        .validate_volume_capabilities(check(Mode::SingleNodeReaderOnly))
        .await?
        .into_inner();
    assert!(single.confirmed.is_some(), "{single:?}");

    // ControllerExpandVolume: the container's new size (sized as CreateVolume sizes one) is
    // an empty directory beside the container, which the guest reads at its next mount; the
    // node has nothing to do.
    let vol_dir = nfs.export_dir.join("pvc-luks2-1");
    let listing = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&vol_dir)
            .expect("the volume's directory")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let grow = |required: i64, limit: i64| ControllerExpandVolumeRequest {
        volume_id: enc.volume_id.clone(),
        capacity_range: Some(CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }),
        ..Default::default()
    };
    let grown = |r: tonic::Response<ControllerExpandVolumeResponse>| {
        let r = r.into_inner();
        assert!(!r.node_expansion_required, "{r:?}");
        r.capacity_bytes
    };
    assert_eq!(
        grown(c.controller_expand_volume(grow((1 << 30) + 1, 0)).await?),
        (1 << 30) + 4096,
        "rounded up to 4 KiB"
    );
    assert_eq!(listing(), ["cnfs-volume.size.1073745920"]);
    assert!(vol_dir.join("cnfs-volume.size.1073745920").is_dir());
    // A repeat is answered the same and writes nothing; so is a smaller size (never shrinks).
    for required in [(1 << 30) + 1, 1 << 30, 512 << 20] {
        assert_eq!(
            grown(c.controller_expand_volume(grow(required, 0)).await?),
            (1 << 30) + 4096,
            "{required}"
        );
        assert_eq!(listing(), ["cnfs-volume.size.1073745920"], "{required}");
    }
    // Unless the caller's limit is below what is recorded: OUT_OF_RANGE, nothing written.
    let (code, msg) = err(c.controller_expand_volume(grow(512 << 20, 768 << 20)).await);
    assert_eq!(code, Code::OutOfRange, "{msg}");
    assert_eq!(
        msg,
        "capacity_range: the volume is 1073745920 bytes already, above limit_bytes \
         (805306368); volumes never shrink"
    );
    // A larger size: its marker, and the smaller one goes.
    assert_eq!(
        grown(c.controller_expand_volume(grow(2 << 30, 0)).await?),
        2 << 30
    );
    assert_eq!(listing(), ["cnfs-volume.size.2147483648"]);
    // A container the guest grew beyond the request (its length) is the size: nothing new.
    std::fs::File::create(vol_dir.join("cnfs-volume.luks2"))?.set_len(3 << 30)?;
    assert_eq!(
        grown(c.controller_expand_volume(grow(5 << 29, 0)).await?),
        3 << 30
    );
    assert_eq!(
        listing(),
        ["cnfs-volume.luks2", "cnfs-volume.size.2147483648"]
    );
    // Capacities are checked as for CreateVolume, naming the field.
    let (code, msg) = err(c.controller_expand_volume(grow(32 << 20, 0)).await);
    assert_eq!(code, Code::OutOfRange, "{msg}");
    assert!(
        msg.starts_with("capacity_range: 33554432 bytes is below the 67108864 bytes (64 MiB)"),
        "{msg}"
    );
    // A volume whose directory is gone: NOT_FOUND, and nothing is made.
    let missing = enc.volume_id.replace("pvc-luks2-1", "pvc-luks2-gone");
    let (code, msg) = err(c
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: missing.clone(),
            ..grow(2 << 30, 0)
        })
        .await);
    assert_eq!(code, Code::NotFound, "{msg}");
    assert_eq!(msg, format!("volume {missing:?} does not exist"));
    assert!(!nfs.export_dir.join("pvc-luks2-gone").exists());
    c.delete_volume(DeleteVolumeRequest {
        volume_id: enc.volume_id.clone(),
        ..Default::default()
    })
    .await?;
    assert!(
        !nfs.export_dir.join("pvc-luks2-1").exists(),
        "deleted by its luks2 id"
    );

    // A gocryptfs volume: its id and source say gocryptfs, no size (the capacity is a plain
    // NFS volume's: none); every access mode is confirmed, as for a plain volume, and
    // expansion is answered as for one.
    let mut gocryptfs = params.clone();
    gocryptfs.insert("encryption".into(), "gocryptfs".into());
    let shared = c
        .create_volume(CreateVolumeRequest {
            name: "pvc-gocryptfs-1".into(),
            parameters: gocryptfs,
            volume_capabilities: vec![cap(Mode::MultiNodeMultiWriter)],
            capacity_range: Some(CapacityRange {
                required_bytes: 1 << 30,
                limit_bytes: 0,
            }),
            ..create.clone()
        })
        .await?
        .into_inner()
        .volume
        .expect("volume");
    assert!(
        shared.volume_id.starts_with("nfs+gocryptfs#delete#"),
        "{shared:?}"
    );
    assert_eq!(shared.capacity_bytes, 0, "no size: a plain NFS volume's");
    assert!(
        shared.volume_context["source"].ends_with("/pvc-gocryptfs-1?vers=4.1&encryption=gocryptfs"),
        "{shared:?}"
    );
    assert!(nfs.export_dir.join("pvc-gocryptfs-1").is_dir());
    for mode in [
        Mode::MultiNodeMultiWriter,
        Mode::MultiNodeReaderOnly,
        Mode::SingleNodeWriter,
    ] {
        let r = c
            .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
                volume_id: shared.volume_id.clone(),
                volume_capabilities: vec![cap(mode)],
                ..Default::default()
            })
            .await?
            .into_inner();
        assert!(r.confirmed.is_some(), "{mode:?}: {r:?}");
    }
    let plain = err(c.controller_expand_volume(expand.clone()).await);
    let grown = err(c
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: shared.volume_id.clone(),
            ..expand.clone()
        })
        .await);
    assert_eq!(grown, plain, "as for a plain NFS volume");
    c.delete_volume(DeleteVolumeRequest {
        volume_id: shared.volume_id.clone(),
        ..Default::default()
    })
    .await?;
    assert!(
        !nfs.export_dir.join("pvc-gocryptfs-1").exists(),
        "deleted by its gocryptfs id"
    );

    // A server that does not answer: UNAVAILABLE within the backend bound, never a hang.
    let t = std::time::Instant::now();
    let (code, msg) = err(c
        .create_volume(CreateVolumeRequest {
            name: "pvc-void".into(),
            parameters: {
                let mut p = params.clone();
                p.insert("server".into(), ns.void_ip.clone());
                p
            },
            ..create.clone()
        })
        .await);
    assert_eq!(code, Code::Unavailable, "{msg}");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(30),
        "{:?}",
        t.elapsed()
    );

    for (k, v) in plugin.capabilities()? {
        assert_eq!(v, "0000000000000000", "{k} of the controller process");
    }
    let strace = plugin.stop()?;
    common::assert_no_mount_calls(&strace);
    let reserved = strace.lines().filter(|l| l.contains("bind(")).any(|l| {
        l.split("sin_port=htons(")
            .nth(1)
            .and_then(|r| r.split(')').next())
            .and_then(|p| p.parse::<u16>().ok())
            .is_some_and(|p| (665..1024).contains(&p))
    });
    assert!(reserved, "the NFS client bound no reserved port: {strace}");
    let log = plugin.log();
    assert!(log.contains("CreateVolume"), "{log}");
    assert!(!log.contains(KEY), "{log}");
    Ok(())
}
