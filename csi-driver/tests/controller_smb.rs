//! The Controller service of the real `cnfs-csi` over its socket, for SMB StorageClasses,
//! against a real Samba in the test's network namespace: the process runs with no
//! capability, makes no mount call, and its `smbclient` children get the provisioner secret's
//! account; the CSI codes are those a CO acts on, and no message or log line holds the
//! password.

mod common;

use std::collections::HashMap;

use cnfs_csi::csi::volume_capability::access_mode::Mode;
use cnfs_csi::csi::*;
use cnfs_testbed::samba::{Samba, SambaSetup, Share};
use cnfs_testbed::{NetNs, TempDir};
use common::{code, mount_cap, Plugin};
use std::os::unix::fs::MetadataExt;
use tonic::Code;

const USER: &str = "cnfsprov";
const PASSWORD: &str = "prov-pw;with=odd#chars";

fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smb_volumes_are_provisioned_validated_and_deleted_with_csi_codes() -> anyhow::Result<()> {
    let ns = NetNs::create()?;
    let dir = TempDir::new("csi-ctl-smb")?;
    let smb = Samba::start(
        &ns,
        dir.path(),
        &SambaSetup::new()
            .user(USER, PASSWORD)
            .share(Share::new("data")),
    )?;
    let share_dir = smb.share_dir("data").expect("share").to_path_buf();
    let mut plugin = Plugin::start_in(
        "controller-smb",
        Some(&ns.name),
        "controller",
        &[
            "--config".into(),
            "/nonexistent/csi.toml".into(),
            "--backend-timeout".into(),
            "10".into(),
        ],
    )?;
    let mut c = plugin.controller().await?;

    let params = map(&[
        ("fs", "smb"),
        ("server", &smb.server_ip),
        ("share", "data"),
        ("subDir", "k8s"),
        ("vers", "3.1.1"),
        ("onDelete", "delete"),
        (
            "csi.storage.k8s.io/provisioner-secret-name",
            "cnfs-smb-admin",
        ),
    ]);
    let secrets = map(&[("username", USER), ("password", PASSWORD)]);
    let create = CreateVolumeRequest {
        name: "pvc-smb-1".into(),
        volume_capabilities: vec![mount_cap(Mode::MultiNodeMultiWriter)],
        parameters: params.clone(),
        secrets: secrets.clone(),
        ..Default::default()
    };

    // Refusals, each with the code a CO acts on and the field or status named first.
    let with = |f: &dyn Fn(&mut CreateVolumeRequest)| {
        let mut r = create.clone();
        f(&mut r);
        r
    };
    let cases: Vec<(CreateVolumeRequest, Code, &str)> = vec![
        (
            with(&|r| {
                r.secrets
                    .insert("password".into(), "not-the-password".into());
            }),
            Code::PermissionDenied,
            "creating //",
        ),
        (
            with(&|r| {
                r.parameters.insert("share".into(), "nosuchshare".into());
            }),
            Code::NotFound,
            "creating //",
        ),
        (
            with(&|r| {
                r.secrets.insert("userKey".into(), "x".into());
            }),
            Code::InvalidArgument,
            "secrets.userKey",
        ),
        (
            with(&|r| {
                r.secrets.remove("password");
            }),
            Code::InvalidArgument,
            "secrets.password",
        ),
        (
            with(&|r| {
                r.parameters.insert("onDelete".into(), "archive".into());
            }),
            Code::InvalidArgument,
            "parameters.onDelete",
        ),
        (
            with(&|r| {
                r.parameters.insert("subDir".into(), "../up".into());
            }),
            Code::InvalidArgument,
            "parameters.subDir",
        ),
        (
            with(&|r| {
                r.parameters.insert("export".into(), "/x".into());
            }),
            Code::InvalidArgument,
            "parameters",
        ),
        (
            with(&|r| {
                r.parameters.insert("server".into(), ns.void_ip.clone());
            }),
            Code::Unavailable,
            "creating //",
        ),
    ];
    for (req, want, first) in cases {
        let (got, msg) = code(c.create_volume(req).await);
        assert_eq!(got, want, "{msg}");
        assert!(
            msg.starts_with(first),
            "expected {first:?} first in {msg:?}"
        );
        assert!(
            !msg.contains(PASSWORD) && !msg.contains("not-the-password"),
            "{msg}"
        );
    }
    if let Ok(d) = std::fs::read_dir(share_dir.join("k8s")) {
        let made: Vec<_> = d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
        assert!(made.is_empty(), "a refusal made {made:?}");
    }

    // Create, and again: the same volume. The directory belongs to the account.
    let v = c
        .create_volume(create.clone())
        .await?
        .into_inner()
        .volume
        .expect("volume");
    let made = share_dir.join("k8s/pvc-smb-1");
    assert!(made.is_dir(), "made on the server");
    assert_eq!(
        std::fs::metadata(&made)?.uid(),
        smb.uid_of(USER).expect("uid")
    );
    assert_eq!(v.capacity_bytes, 0, "SMB has no quota: capacity unknown");
    assert_eq!(
        v.volume_id,
        format!("smb#delete#{}#data#k8s/pvc-smb-1", smb.server_ip)
    );
    assert_eq!(
        v.volume_context.get("source").map(String::as_str),
        Some(format!("smb://{}/data/k8s/pvc-smb-1?vers=3.1.1", smb.server_ip).as_str())
    );
    let again = c
        .create_volume(create.clone())
        .await?
        .into_inner()
        .volume
        .expect("volume");
    assert_eq!(again.volume_id, v.volume_id);

    // ValidateVolumeCapabilities looks with the secrets it is given.
    let validate = ValidateVolumeCapabilitiesRequest {
        volume_id: v.volume_id.clone(),
        volume_capabilities: vec![mount_cap(Mode::MultiNodeMultiWriter)],
        secrets: secrets.clone(),
        ..Default::default()
    };
    let ok = c
        .validate_volume_capabilities(validate.clone())
        .await?
        .into_inner();
    assert!(ok.confirmed.is_some(), "{ok:?}");
    let missing = ValidateVolumeCapabilitiesRequest {
        volume_id: v.volume_id.replace("pvc-smb-1", "pvc-none"),
        ..validate.clone()
    };
    assert_eq!(
        code(c.validate_volume_capabilities(missing).await).0,
        Code::NotFound
    );

    // No quota to grow.
    let (got, msg) = code(
        c.controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: 1 << 30,
                limit_bytes: 0,
            }),
            secrets: secrets.clone(),
            ..Default::default()
        })
        .await,
    );
    assert_eq!(got, Code::FailedPrecondition, "{msg}");

    // Delete needs the account; then the tree goes, and a second delete is fine.
    std::fs::write(made.join("data.txt"), "x")?;
    std::os::unix::fs::chown(made.join("data.txt"), smb.uid_of(USER), smb.uid_of(USER))?;
    let delete = DeleteVolumeRequest {
        volume_id: v.volume_id.clone(),
        secrets: secrets.clone(),
    };
    let (got, msg) = code(
        c.delete_volume(DeleteVolumeRequest {
            secrets: HashMap::new(),
            ..delete.clone()
        })
        .await,
    );
    assert_eq!(got, Code::InvalidArgument, "{msg}");
    assert!(msg.starts_with("secrets.username"), "{msg}");
    assert!(made.is_dir());
    c.delete_volume(delete.clone()).await?;
    assert!(!made.exists(), "onDelete=delete removed it");
    c.delete_volume(delete).await?;

    // onDelete=retain: deleting keeps the directory and needs no secret.
    let mut retain = create.clone();
    retain.name = "pvc-smb-2".into();
    retain.parameters.insert("onDelete".into(), "retain".into());
    let kept = c
        .create_volume(retain)
        .await?
        .into_inner()
        .volume
        .expect("volume");
    c.delete_volume(DeleteVolumeRequest {
        volume_id: kept.volume_id.clone(),
        secrets: HashMap::new(),
    })
    .await?;
    assert!(share_dir.join("k8s/pvc-smb-2").is_dir(), "retained");

    for (k, v) in plugin.capabilities()? {
        assert_eq!(v, "0000000000000000", "{k} of the controller process");
    }
    let strace = plugin.stop()?;
    common::assert_no_mount_calls(&strace);
    assert!(
        strace
            .lines()
            .any(|l| l.contains("execve(") && l.contains("smbclient")),
        "smbclient was not run by the plugin: {strace}"
    );
    assert!(!strace.contains(PASSWORD), "password in a traced argument");
    let log = plugin.log();
    assert!(log.contains("CreateVolume"), "{log}");
    assert!(
        !log.contains(PASSWORD) && !log.contains("not-the-password"),
        "{log}"
    );
    assert!(
        !smb.log_text().contains(PASSWORD),
        "password in the server log"
    );
    Ok(())
}

/// Encrypted volumes of SMB classes through the real plugin and a real Samba: luks2 (one
/// node, the claim's size is the container's, grown by a marker beside it) and gocryptfs
/// (every mode, no size of its own), each its own directory, removed with what the guest
/// left in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_smb_volumes_are_provisioned_grown_and_deleted_with_csi_codes(
) -> anyhow::Result<()> {
    let ns = NetNs::create()?;
    let dir = TempDir::new("csi-ctl-smb-enc")?;
    let smb = Samba::start(
        &ns,
        dir.path(),
        &SambaSetup::new()
            .user(USER, PASSWORD)
            .share(Share::new("data")),
    )?;
    let share_dir = smb.share_dir("data").expect("share").to_path_buf();
    let uid = smb.uid_of(USER).expect("uid");
    let mut plugin = Plugin::start_in(
        "controller-smb-enc",
        Some(&ns.name),
        "controller",
        &[
            "--config".into(),
            "/nonexistent/csi.toml".into(),
            "--backend-timeout".into(),
            "10".into(),
        ],
    )?;
    let mut c = plugin.controller().await?;
    let secrets = map(&[("username", USER), ("password", PASSWORD)]);
    let class = |mode: &str| {
        map(&[
            ("fs", "smb"),
            ("server", &smb.server_ip),
            ("share", "data"),
            ("subDir", "k8s"),
            ("vers", "3.1.1"),
            ("encryption", mode),
        ])
    };
    let luks2 = CreateVolumeRequest {
        name: "pvc-smb-luks2".into(),
        capacity_range: Some(CapacityRange {
            required_bytes: (128 << 20) + 1,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap(Mode::SingleNodeSingleWriter)],
        parameters: class("luks2"),
        secrets: secrets.clone(),
        ..Default::default()
    };

    // luks2 is one guest's: a multi-node mode is refused before anything is made.
    let (got, msg) = code(
        c.create_volume(CreateVolumeRequest {
            volume_capabilities: vec![mount_cap(Mode::MultiNodeMultiWriter)],
            ..luks2.clone()
        })
        .await,
    );
    assert_eq!(got, Code::InvalidArgument, "{msg}");
    assert!(
        msg.starts_with("volume_capabilities[0].access_mode.mode: MULTI_NODE_MULTI_WRITER"),
        "{msg}"
    );
    assert!(!share_dir.join("k8s").exists(), "a refusal made something");

    // Created: the container's size (rounded up to 4 KiB) is the capacity, the id and the
    // source say luks2, the directory is the account's; again, the same volume.
    const SIZE: i64 = (128 << 20) + 4096;
    let v = c
        .create_volume(luks2.clone())
        .await?
        .into_inner()
        .volume
        .expect("volume");
    assert_eq!(v.capacity_bytes, SIZE);
    assert_eq!(
        v.volume_id,
        format!("smb+luks2#delete#{}#data#k8s/pvc-smb-luks2", smb.server_ip)
    );
    assert_eq!(
        v.volume_context.get("source").map(String::as_str),
        Some(
            format!(
                "smb://{}/data/k8s/pvc-smb-luks2?vers=3.1.1&encryption=luks2&size={SIZE}",
                smb.server_ip
            )
            .as_str()
        )
    );
    let vol = share_dir.join("k8s/pvc-smb-luks2");
    assert!(vol.is_dir(), "made on the server");
    assert_eq!(std::fs::metadata(&vol)?.uid(), uid);
    let again = c
        .create_volume(luks2.clone())
        .await?
        .into_inner()
        .volume
        .expect("volume");
    assert_eq!(
        (again.volume_id.as_str(), again.capacity_bytes),
        (v.volume_id.as_str(), SIZE)
    );
    let validate = ValidateVolumeCapabilitiesRequest {
        volume_id: v.volume_id.clone(),
        volume_capabilities: vec![mount_cap(Mode::MultiNodeMultiWriter)],
        secrets: secrets.clone(),
        ..Default::default()
    };
    let r = c.validate_volume_capabilities(validate).await?.into_inner();
    assert!(r.confirmed.is_none(), "{r:?}");
    assert!(r.message.contains("refused for encryption=luks2"), "{r:?}");

    // ControllerExpandVolume: the account is needed (the controller-expand secret), then the
    // new size is a marker beside the container, which the guest reads at its next mount.
    let grow = |required: i64, secrets: &HashMap<String, String>| ControllerExpandVolumeRequest {
        volume_id: v.volume_id.clone(),
        capacity_range: Some(CapacityRange {
            required_bytes: required,
            limit_bytes: 0,
        }),
        secrets: secrets.clone(),
        ..Default::default()
    };
    let (got, msg) = code(
        c.controller_expand_volume(grow(256 << 20, &HashMap::new()))
            .await,
    );
    assert_eq!(got, Code::InvalidArgument, "{msg}");
    assert!(
        msg.starts_with("secrets: growing an SMB volume")
            && msg.contains("controller-expand-secret-name"),
        "{msg}"
    );
    assert!(std::fs::read_dir(&vol)?.next().is_none(), "nothing written");
    for _ in 0..2 {
        let r = c
            .controller_expand_volume(grow(256 << 20, &secrets))
            .await?
            .into_inner();
        assert_eq!(r.capacity_bytes, 256 << 20);
        assert!(!r.node_expansion_required, "{r:?}");
        let names: Vec<_> = std::fs::read_dir(&vol)?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, ["cnfs-volume.size.268435456"]);
    }
    assert!(vol.join("cnfs-volume.size.268435456").is_dir());
    // Smaller: never shrinks; a volume whose directory is gone: NOT_FOUND.
    let r = c
        .controller_expand_volume(grow(128 << 20, &secrets))
        .await?
        .into_inner();
    assert_eq!(r.capacity_bytes, 256 << 20);
    let gone = v.volume_id.replace("pvc-smb-luks2", "pvc-smb-gone");
    let (got, msg) = code(
        c.controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: gone.clone(),
            ..grow(256 << 20, &secrets)
        })
        .await,
    );
    assert_eq!(got, Code::NotFound, "{msg}");
    assert_eq!(msg, format!("volume {gone:?} does not exist"));
    assert!(!share_dir.join("k8s/pvc-smb-gone").exists());

    // gocryptfs: every mode, no size of its own (capacity unknown, as for a plain volume),
    // and nothing to grow.
    let shared = CreateVolumeRequest {
        name: "pvc-smb-gocryptfs".into(),
        capacity_range: Some(CapacityRange {
            required_bytes: 1 << 30,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![
            mount_cap(Mode::MultiNodeMultiWriter),
            mount_cap(Mode::MultiNodeReaderOnly),
        ],
        parameters: class("gocryptfs"),
        secrets: secrets.clone(),
        ..Default::default()
    };
    let g = c
        .create_volume(shared)
        .await?
        .into_inner()
        .volume
        .expect("volume");
    assert_eq!(g.capacity_bytes, 0);
    assert_eq!(
        g.volume_id,
        format!(
            "smb+gocryptfs#delete#{}#data#k8s/pvc-smb-gocryptfs",
            smb.server_ip
        )
    );
    assert_eq!(
        g.volume_context.get("source").map(String::as_str),
        Some(
            format!(
                "smb://{}/data/k8s/pvc-smb-gocryptfs?vers=3.1.1&encryption=gocryptfs",
                smb.server_ip
            )
            .as_str()
        )
    );
    let (got, msg) = code(
        c.controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: g.volume_id.clone(),
            ..grow(2 << 30, &secrets)
        })
        .await,
    );
    assert_eq!(got, Code::FailedPrecondition, "{msg}");
    assert!(
        msg.starts_with("smb volumes have no quota to grow"),
        "{msg}"
    );

    // DeleteVolume removes each directory with what the guests left in it: a sparse
    // container and its markers; an encrypted tree.
    let container = vol.join("cnfs-volume.luks2");
    std::fs::File::create(&container)?.set_len(256 << 20)?;
    let tree = share_dir.join("k8s/pvc-smb-gocryptfs/cnfs-volume.gocryptfs");
    std::fs::create_dir_all(tree.join("Xb3kQ2"))?;
    std::fs::write(tree.join("gocryptfs.conf"), "{}")?;
    std::fs::write(tree.join("Xb3kQ2/gocryptfs.diriv"), [0u8; 16])?;
    for p in [
        &container,
        &tree,
        &tree.join("Xb3kQ2"),
        &tree.join("gocryptfs.conf"),
    ] {
        std::os::unix::fs::chown(p, Some(uid), Some(uid))?;
    }
    std::os::unix::fs::chown(tree.join("Xb3kQ2/gocryptfs.diriv"), Some(uid), Some(uid))?;
    for id in [&v.volume_id, &g.volume_id] {
        c.delete_volume(DeleteVolumeRequest {
            volume_id: id.clone(),
            secrets: secrets.clone(),
        })
        .await?;
    }
    assert!(!vol.exists(), "the luks2 volume's directory is still there");
    assert!(!share_dir.join("k8s/pvc-smb-gocryptfs").exists());
    assert!(share_dir.join("k8s").is_dir());

    let strace = plugin.stop()?;
    common::assert_no_mount_calls(&strace);
    assert!(!strace.contains(PASSWORD), "password in a traced argument");
    let log = plugin.log();
    assert!(!log.contains(PASSWORD), "{log}");
    Ok(())
}
