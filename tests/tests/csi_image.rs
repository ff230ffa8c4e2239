//! The built `cnfs-csi` image (`cargo xtask images`) really runs as the manifests configure it:
//! imported into the test bed's private containerd and started with runc, its `cnfs-csi`
//! container translated field by field from `configs/csi/node.yaml` (node plugin) and
//! `configs/csi/controller.yaml` (controller). The test then plays kubelet and the CSI
//! sidecars over the plugin's socket from the host, and checks every effect where the other
//! side sees it: the shim's reader for hand-off records, the NFS server's export for volumes,
//! the host's mount table for "mounts nothing".
//!
//! How a manifest becomes a container: `ctr containers create` builds the OCI spec from the
//! image and every field ctr 1.6 can express (flags); the fields it cannot express are then
//! set in that spec the way containerd's CRI plugin (kubelet's runtime) sets them, and the
//! container runs from the edited spec on the image's unpacked snapshot (`ctr run --config`).
//! The translation refuses manifest fields it does not know, so a new field in the manifests
//! fails here until it is translated (or explained).
//!
//! Not reproduced, as ctr has no equivalent and cnfs-csi depends on none of it: the pod
//! sandbox (pause container and pod network: the node plugin gets an empty network namespace
//! of its own, the controller the NFS server's), the CRI plugin's /etc/hosts, /etc/hostname,
//! /etc/resolv.conf and /dev/termination-log mounts, the kubepods cgroup parent, AppArmor
//! (not enabled on this kernel), ctr's RLIMIT_NOFILE of 1024 (the CRI plugin sets none), the
//! probes, and the sidecar containers.

mod k8s;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context};
use cnfs_csi::csi::controller_client::ControllerClient;
use cnfs_csi::csi::identity_client::IdentityClient;
use cnfs_csi::csi::node_client::NodeClient;
use cnfs_csi::csi::plugin_capability;
use cnfs_csi::csi::volume_capability::access_mode::Mode;
use cnfs_csi::csi::volume_capability::{AccessMode, AccessType, MountVolume};
use cnfs_csi::csi::{
    CreateVolumeRequest, DeleteVolumeRequest, GetPluginCapabilitiesRequest, GetPluginInfoRequest,
    NodeGetInfoRequest, NodePublishVolumeRequest, NodeUnpublishVolumeRequest, ProbeRequest,
    VolumeCapability,
};
use cnfs_protocols::handoff::{self, HandoffDir};
use cnfs_protocols::spec::Source;
use cnfs_testbed::containerd::{Containerd, MINIMAL};
use cnfs_testbed::ganesha::EXPORT;
use cnfs_testbed::{images, unique_id, Ganesha, NetNs, TempDir};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::storage::v1::StorageClass;
use serde_json::{json, Value as Json};
use tonic::Code;

/// The driver name kubelet and the sidecars know the plugin by.
const DRIVER: &str = "csi.cnfs.io";
/// The node name kubelet's downward API gives the node plugin (`spec.nodeName`).
const NODE_NAME: &str = "node-a";
/// Bound on each CSI call and on a container's start and stop (a loaded two-core machine).
const T: Duration = Duration::from_secs(30);
/// A well-formed CephFS key (test only).
const KEY: &str = "AQBSdFhlAAAAABAAWmDqDUUxmRX4fcLsaFk2tg==";
/// An empty capability set in /proc/<pid>/status.
const NO_CAPS: &str = "0000000000000000";

// ---------------------------------------------------------------------------------------
// The manifests
// ---------------------------------------------------------------------------------------

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every document of `configs/<rel>`, as written.
fn documents(rel: &str) -> Vec<Json> {
    let p = repo().join("configs").join(rel);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|de| {
            serde::Deserialize::deserialize(de).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        })
        .filter(|j: &Json| !j.is_null())
        .collect()
}

/// The document of `kind` named `name` in `configs/<rel>`, checked to be a valid object of
/// the Kubernetes API (`T`) without unknown fields, and returned as written.
fn object<T>(rel: &str, kind: &str, name: &str) -> Json
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    let doc = documents(rel)
        .into_iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("configs/{rel}: no {kind} {name}"));
    k8s::strict::<T>(&doc).unwrap_or_else(|e| panic!("configs/{rel}: {kind} {name}: {e:#}"));
    doc
}

/// A Kubernetes quantity in thousandths of its unit ("64Mi" → 67108864000, "10m" → 10).
fn milli(q: &str) -> anyhow::Result<u128> {
    let split = q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len());
    let (n, suffix) = q.split_at(split);
    let n: u128 = n
        .parse()
        .with_context(|| format!("quantity {q:?}: not an integer"))?;
    let per_unit: u128 = match suffix {
        "m" => return Ok(n),
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => bail!("quantity {q:?}: suffix {suffix:?} is not translated"),
    };
    Ok(n * per_unit * 1000)
}

fn bytes(q: &str) -> anyhow::Result<u64> {
    Ok(u64::try_from(milli(q)? / 1000)?)
}

/// Fails on any key of `v` that is not in `known`: the translation must not skip a field.
fn only_known(what: &str, v: &Json, known: &[&str]) -> anyhow::Result<()> {
    let Some(map) = v.as_object() else {
        bail!("{what}: not an object: {v}")
    };
    let unknown: Vec<&String> = map
        .keys()
        .filter(|k| !known.contains(&k.as_str()))
        .collect();
    ensure!(
        unknown.is_empty(),
        "{what}: fields tests/tests/csi_image.rs does not translate: {unknown:?} \
         (translate them, or say there why they cannot be)"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Translation: one container of a pod → ctr flags + what ctr cannot express
// ---------------------------------------------------------------------------------------

/// What kubelet would find on the node for the pod's volumes, here in temp dirs.
struct Kubelet {
    /// hostPath path → the directory standing in for it.
    host_paths: BTreeMap<String, PathBuf>,
    /// ConfigMaps the pod may name (with this test bed's data).
    config_maps: Vec<Json>,
    /// Where emptyDir and configMap volumes are made (kubelet: /var/lib/kubelet/pods/<uid>).
    pod_dir: PathBuf,
}

/// One container as the runtime would start it.
#[derive(Debug, Default)]
struct Plan {
    image: String,
    /// `ctr containers create` flags (before the image).
    flags: Vec<String>,
    /// `command` + `args`, with `$(VAR)` references expanded as kubelet does.
    args: Vec<String>,
    // What ctr 1.6 cannot express, set in the spec it generates (see `finish_spec`):
    uid: Option<u32>,
    gid: Option<u32>,
    run_as_non_root: bool,
    drop_all_caps: bool,
    sysctls: BTreeMap<String, String>,
    cpu_shares: Option<u64>,
    /// Expected in the spec: `allowPrivilegeEscalation: false` is no_new_privs.
    no_new_privs: bool,
    /// Container path → host source of every bind mount (for the checks).
    binds: BTreeMap<String, PathBuf>,
}

/// Translates container `name` of `pod` (a pod template's `spec`, as written).
fn translate(pod: &Json, name: &str, kubelet: &Kubelet) -> anyhow::Result<Plan> {
    only_known(
        "pod spec",
        pod,
        &[
            // The API identity of the pod's processes: kubelet mounts a token only when
            // automountServiceAccountToken is not false (node.yaml: false; controller.yaml:
            // for the sidecars, which call the API server). There is no API server here and
            // cnfs-csi reads no token, so none is mounted.
            "serviceAccountName",
            "automountServiceAccountToken",
            // Scheduling only: which node, and eviction order. Nothing in the container.
            "priorityClassName",
            "nodeSelector",
            "securityContext",
            "containers",
            "volumes",
        ],
    )?;
    // Checked by `only_known` above: no hostNetwork, hostPID or hostIPC, so the container
    // gets namespaces of its own (ctr's default spec: new pid, ipc, uts, mount, network).
    let pod_sc = pod.get("securityContext").cloned().unwrap_or(json!({}));
    only_known(
        "pod securityContext",
        &pod_sc,
        &[
            "runAsUser",
            "runAsGroup",
            "runAsNonRoot",
            "seccompProfile",
            "sysctls",
        ],
    )?;
    let containers = pod["containers"]
        .as_array()
        .ok_or_else(|| anyhow!("pod spec: no containers"))?;
    // The sidecars (registrar, liveness probe, provisioner, resizer) are other images; the
    // test plays their part over the socket.
    let c = containers
        .iter()
        .find(|c| c["name"] == name)
        .ok_or_else(|| anyhow!("pod spec: no container {name}"))?;
    let what = format!("container {name}");
    only_known(
        &what,
        c,
        &[
            "name",
            "image",
            "command",
            "args",
            "env",
            "securityContext",
            // Informational (no hostPort): the healthz port is served by the liveness-probe
            // sidecar, not by cnfs-csi.
            "ports",
            // kubelet's prober (an HTTP GET to the liveness-probe sidecar); ctr has no
            // probes. The test calls Probe itself.
            "livenessProbe",
            "volumeMounts",
            "resources",
        ],
    )?;
    let mut plan = Plan {
        image: c["image"]
            .as_str()
            .ok_or_else(|| anyhow!("{what}: no image"))?
            .to_string(),
        ..Plan::default()
    };

    // env: values, and the downward API fields this node answers.
    let mut env: Vec<(String, String)> = Vec::new();
    for e in c["env"].as_array().into_iter().flatten() {
        only_known(&format!("{what} env"), e, &["name", "value", "valueFrom"])?;
        let key = e["name"].as_str().unwrap_or_default().to_string();
        let value = if let Some(v) = e.get("value") {
            v.as_str().unwrap_or_default().to_string()
        } else {
            let from = &e["valueFrom"];
            only_known(&format!("{what} env {key} valueFrom"), from, &["fieldRef"])?;
            match from["fieldRef"]["fieldPath"].as_str() {
                Some("spec.nodeName") => NODE_NAME.to_string(),
                other => bail!("{what} env {key}: fieldRef {other:?} is not translated"),
            }
        };
        plan.flags.push("--env".into());
        plan.flags.push(format!("{key}={value}"));
        env.push((key, value));
    }
    // command replaces the image's Entrypoint, args its Cmd; $(VAR) names an env entry.
    for part in ["command", "args"] {
        for a in c[part].as_array().into_iter().flatten() {
            let mut a = a
                .as_str()
                .ok_or_else(|| anyhow!("{what} {part}: not a string"))?
                .to_string();
            for (k, v) in &env {
                a = a.replace(&format!("$({k})"), v);
            }
            ensure!(
                !a.contains("$("),
                "{what} {part}: {a:?} names a variable the container does not have"
            );
            plan.args.push(a);
        }
    }
    // Without `command`, kubelet would run the image's Entrypoint with `args`.
    ensure!(
        c["command"].as_array().is_some_and(|a| !a.is_empty()),
        "{what}: a container without command is not translated"
    );

    // securityContext: the container's fields override the pod's.
    let sc = c.get("securityContext").cloned().unwrap_or(json!({}));
    only_known(
        &format!("{what} securityContext"),
        &sc,
        &[
            "privileged",
            "allowPrivilegeEscalation",
            "readOnlyRootFilesystem",
            "runAsUser",
            "capabilities",
            "seccompProfile",
        ],
    )?;
    let pick = |k: &str| sc.get(k).or_else(|| pod_sc.get(k)).cloned();
    // privileged: ctr's default spec is unprivileged; a privileged container is no test of
    // "runs without privilege".
    ensure!(
        sc["privileged"] != true,
        "{what}: privileged is not translated"
    );
    // allowPrivilegeEscalation: false is no_new_privs, ctr's default; true or unset (the API's
    // default allows escalation) is --allow-new-privs.
    plan.no_new_privs = sc["allowPrivilegeEscalation"] == false;
    if !plan.no_new_privs {
        plan.flags.push("--allow-new-privs".into());
    }
    if sc["readOnlyRootFilesystem"] == true {
        plan.flags.push("--read-only".into());
    }
    // runAsUser / runAsGroup: ctr 1.6 has no --user; set in the spec (without them the
    // image's user, 65532, stays).
    let id = |k: &str| -> anyhow::Result<Option<u32>> {
        pick(k)
            .map(|v| {
                v.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| anyhow!("{what}: {k} {v} is not a uid"))
            })
            .transpose()
    };
    plan.uid = id("runAsUser")?;
    plan.gid = id("runAsGroup")?;
    // runAsNonRoot: kubelet refuses to start the container as uid 0 (checked on the spec).
    plan.run_as_non_root = pick("runAsNonRoot") == Some(json!(true));
    // seccompProfile RuntimeDefault: containerd's default profile, which ctr's --seccomp
    // generates (the same generator the CRI plugin uses).
    let seccomp = pick("seccompProfile");
    match seccomp.as_ref().and_then(|p| p["type"].as_str()) {
        Some("RuntimeDefault") => plan.flags.push("--seccomp".into()),
        Some("Unconfined") | None => {}
        Some(other) => bail!("{what}: seccompProfile {other} is not translated"),
    }
    // capabilities: ctr's --cap-drop knows no ALL; dropping ALL empties every set in the
    // spec, as the CRI plugin does.
    let caps = sc.get("capabilities").cloned().unwrap_or(json!({}));
    only_known(&format!("{what} capabilities"), &caps, &["drop", "add"])?;
    ensure!(
        caps["add"].as_array().is_none_or(|a| a.is_empty()),
        "{what}: added capabilities are not translated"
    );
    for d in caps["drop"].as_array().into_iter().flatten() {
        match d.as_str() {
            Some("ALL") => plan.drop_all_caps = true,
            Some(cap) => {
                plan.flags.push("--cap-drop".into());
                plan.flags.push(format!("CAP_{cap}"));
            }
            None => bail!("{what}: capabilities.drop {d} is not a name"),
        }
    }
    // sysctls (pod level, namespaced): kubelet sets them in the pod's sandbox; ctr has no
    // flag, so they go into this container's spec (runc writes them in its network namespace).
    for s in pod_sc["sysctls"].as_array().into_iter().flatten() {
        let (k, v) = (s["name"].as_str(), s["value"].as_str());
        let (Some(k), Some(v)) = (k, v) else {
            bail!("pod sysctl {s}: name and value expected")
        };
        plan.sysctls.insert(k.to_string(), v.to_string());
    }

    // resources: the memory limit is the cgroup's limit; the CPU request becomes CPU shares
    // (kubelet: milli × 1024 / 1000, at least 2; ctr create has no --cpu-shares, so in the
    // spec). A memory request sets nothing in the container's cgroup.
    let res = c.get("resources").cloned().unwrap_or(json!({}));
    only_known(&format!("{what} resources"), &res, &["requests", "limits"])?;
    only_known(
        &format!("{what} resources.requests"),
        res.get("requests").unwrap_or(&json!({})),
        &["cpu", "memory"],
    )?;
    only_known(
        &format!("{what} resources.limits"),
        res.get("limits").unwrap_or(&json!({})),
        &["memory"],
    )?;
    if let Some(m) = res["limits"]["memory"].as_str() {
        plan.flags.push("--memory-limit".into());
        plan.flags.push(bytes(m)?.to_string());
    }
    if let Some(cpu) = res["requests"]["cpu"].as_str() {
        plan.cpu_shares = Some(u64::try_from((milli(cpu)? * 1024 / 1000).max(2))?);
    }

    // volumeMounts, by the pod's volumes.
    let volumes = pod["volumes"].as_array().cloned().unwrap_or_default();
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        only_known(
            &format!("{what} volumeMount"),
            m,
            &["name", "mountPath", "readOnly", "mountPropagation"],
        )?;
        let vname = m["name"].as_str().unwrap_or_default();
        let dst = m["mountPath"]
            .as_str()
            .ok_or_else(|| anyhow!("{what}: volumeMount {vname} without mountPath"))?;
        let vol = volumes
            .iter()
            .find(|v| v["name"] == vname)
            .ok_or_else(|| anyhow!("{what}: volumeMount names no volume {vname}"))?;
        // CRI's bind options: rbind, the propagation, rw|ro.
        let propagation = match m["mountPropagation"].as_str() {
            None | Some("None") => "rprivate",
            Some("HostToContainer") => "rslave",
            Some("Bidirectional") => "rshared",
            Some(other) => bail!("{what}: mountPropagation {other}"),
        };
        let mut read_only = m["readOnly"] == true;
        let src: PathBuf = if let Some(hp) = vol.get("hostPath") {
            only_known(&format!("volume {vname} hostPath"), hp, &["path", "type"])?;
            let path = hp["path"].as_str().unwrap_or_default();
            let dir = kubelet
                .host_paths
                .get(path)
                .ok_or_else(|| anyhow!("volume {vname}: no stand-in for hostPath {path}"))?;
            match hp["type"].as_str() {
                Some("Directory") => ensure!(
                    dir.is_dir(),
                    "volume {vname}: hostPath {path} (type Directory) must exist"
                ),
                Some("DirectoryOrCreate") => std::fs::create_dir_all(dir)?,
                other => bail!("volume {vname}: hostPath type {other:?} is not translated"),
            }
            dir.clone()
        } else if let Some(ed) = vol.get("emptyDir") {
            only_known(
                &format!("volume {vname} emptyDir"),
                ed,
                &["medium", "sizeLimit"],
            )?;
            match ed["medium"].as_str() {
                // kubelet mounts a tmpfs of sizeLimit and binds it in: the container sees
                // a tmpfs, world-writable like every emptyDir.
                Some("Memory") => {
                    let mut opts = vec!["mode=777".to_string()];
                    if let Some(limit) = ed["sizeLimit"].as_str() {
                        opts.push(format!("size={}", bytes(limit)?));
                    }
                    plan.flags.push("--mount".into());
                    plan.flags.push(format!(
                        "type=tmpfs,src=tmpfs,dst={dst},options={}",
                        opts.join(":")
                    ));
                    continue;
                }
                None | Some("") => {
                    let dir = kubelet.pod_dir.join("empty-dir").join(vname);
                    std::fs::create_dir_all(&dir)?;
                    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))?;
                    dir
                }
                Some(other) => bail!("volume {vname}: emptyDir medium {other}"),
            }
        } else if let Some(cm) = vol.get("configMap") {
            only_known(&format!("volume {vname} configMap"), cm, &["name"])?;
            let cm_name = cm["name"].as_str().unwrap_or_default();
            let map = kubelet
                .config_maps
                .iter()
                .find(|m| m["metadata"]["name"] == cm_name)
                .ok_or_else(|| anyhow!("volume {vname}: no ConfigMap {cm_name}"))?;
            // Every key a file, mode 0644 (defaultMode); kubelet mounts these read-only.
            let dir = kubelet.pod_dir.join("configmap").join(vname);
            std::fs::create_dir_all(&dir)?;
            for (key, value) in map["data"].as_object().into_iter().flatten() {
                let f = dir.join(key);
                std::fs::write(&f, value.as_str().unwrap_or_default())?;
                std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644))?;
            }
            read_only = true;
            dir
        } else {
            bail!("volume {vname}: only hostPath, emptyDir and configMap are translated: {vol}")
        };
        let src_text = src
            .to_str()
            .ok_or_else(|| anyhow!("{}: not UTF-8", src.display()))?;
        plan.flags.push("--mount".into());
        plan.flags.push(format!(
            "type=bind,src={src_text},dst={dst},options=rbind:{propagation}:{}",
            if read_only { "ro" } else { "rw" }
        ));
        plan.binds.insert(dst.to_string(), src);
    }
    Ok(plan)
}

/// Sets in the spec ctr generated what ctr cannot express, as the CRI plugin sets it, and
/// points it at the image's unpacked snapshot.
fn finish_spec(spec: &mut Json, plan: &Plan, rootfs: &Path) -> anyhow::Result<()> {
    ensure!(
        spec["process"]["args"] == json!(plan.args),
        "ctr did not keep the command line: {}",
        spec["process"]["args"]
    );
    let user = &mut spec["process"]["user"];
    if let Some(uid) = plan.uid {
        user["uid"] = json!(uid);
    }
    if let Some(gid) = plan.gid {
        // The CRI plugin: the primary group again as the only supplementary group (the
        // image has no /etc/group to add others from).
        user["gid"] = json!(gid);
        user["additionalGids"] = json!([gid]);
    }
    if plan.run_as_non_root {
        ensure!(
            spec["process"]["user"]["uid"] != 0,
            "runAsNonRoot: kubelet would refuse uid 0"
        );
    }
    ensure!(
        spec["process"]["noNewPrivileges"] == plan.no_new_privs,
        "noNewPrivileges is {}",
        spec["process"]["noNewPrivileges"]
    );
    if plan.drop_all_caps {
        spec["process"]["capabilities"] = json!({
            "bounding": [], "effective": [], "permitted": [], "inheritable": [], "ambient": []
        });
    }
    // ctr's default spec mounts a tmpfs on /run; the CRI plugin does not (WithoutRunMount):
    // /run of a pod's container is the image's.
    if let Some(mounts) = spec["mounts"].as_array_mut() {
        mounts.retain(|m| !(m["destination"] == "/run" && m["type"] == "tmpfs"));
    }
    if !plan.sysctls.is_empty() {
        spec["linux"]["sysctl"] = json!(plan.sysctls);
    }
    if let Some(shares) = plan.cpu_shares {
        spec["linux"]["resources"]["cpu"] = json!({ "shares": shares });
    }
    spec["root"]["path"] = json!(rootfs);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Running the container
// ---------------------------------------------------------------------------------------

/// A container started from the image; killed and removed on drop, also when a test fails.
struct Running<'a> {
    ctd: &'a Containerd,
    id: String,
    /// The container that was created (never started) for its spec and snapshot.
    template: String,
    /// The container's init (cnfs-csi) as the host sees it.
    pid: i32,
    /// cnfs-csi's stdout and stderr (its JSON log).
    log: PathBuf,
}

impl<'a> Running<'a> {
    /// `ctr containers create` with the plan's flags gives the spec and the unpacked
    /// snapshot (a container that never runs); the container then runs from the finished
    /// spec, detached, its output in a file.
    fn start(ctd: &'a Containerd, plan: &Plan, tag: &str, extra: &[&str]) -> anyhow::Result<Self> {
        let id = format!("{tag}-{}", unique_id());
        let template = format!("{id}-spec");
        let mut create: Vec<&str> = vec!["containers", "create", "--snapshotter", "native"];
        create.extend(plan.flags.iter().map(String::as_str));
        create.extend(extra);
        create.push(&plan.image);
        create.push(&template);
        // Without "--", ctr reads flags of the container's command line as its own.
        create.push("--");
        create.extend(plan.args.iter().map(String::as_str));
        ctd.ctr(&create)
            .context("creating the template container")?;
        let mut spec: Json =
            serde_json::from_str(&ctd.ctr(&["containers", "info", "--spec", &template])?)?;
        // "mount -t bind <snapshot dir> <target> -o rbind,rw"
        let mounts = ctd.ctr(&[
            "snapshots",
            "--snapshotter",
            "native",
            "mounts",
            "/unused",
            &template,
        ])?;
        let rootfs = mounts
            .split_whitespace()
            .nth(3)
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .ok_or_else(|| anyhow!("no snapshot directory in {mounts:?}"))?;
        finish_spec(&mut spec, plan, &rootfs)?;
        spec["linux"]["cgroupsPath"] = json!(format!("/default/{id}"));
        let spec_path = ctd.dir().join(format!("{id}.json"));
        std::fs::write(&spec_path, serde_json::to_vec_pretty(&spec)?)?;
        let log = ctd.dir().join(format!("{id}.log"));
        let log_uri = format!("file://{}", log.display());
        ctd.ctr(&[
            "run",
            "-d",
            "--log-uri",
            &log_uri,
            "--config",
            &spec_path.to_string_lossy(),
            &id,
        ])
        .context("starting the container")?;
        let mut running = Running {
            ctd,
            id,
            template,
            pid: 0,
            log,
        };
        running.pid = running
            .task()
            .map(|(pid, _)| pid)
            .ok_or_else(|| anyhow!("no task after ctr run: {}", running.log_text()))?;
        Ok(running)
    }

    /// The task's pid and status (RUNNING, STOPPED), if it exists.
    fn task(&self) -> Option<(i32, String)> {
        let list = self.ctd.ctr(&["tasks", "ls"]).ok()?;
        list.lines().find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next()? == self.id).then_some(())?;
            Some((f.next()?.parse().ok()?, f.next()?.to_string()))
        })
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Connects to `socket` (the host side of the plugin's socket) once it answers.
    async fn connect(&self, socket: &Path) -> anyhow::Result<tonic::transport::Channel> {
        let until = Instant::now() + T;
        loop {
            if socket.exists() {
                if let Ok(c) = cnfs_csi::client::connect(socket).await {
                    return Ok(c);
                }
            }
            let status = self.task().map(|(_, s)| s);
            ensure!(
                status.as_deref() == Some("RUNNING"),
                "cnfs-csi is {status:?} before its socket answered; its log:\n{}",
                self.log_text()
            );
            ensure!(
                Instant::now() < until,
                "{} did not answer within {T:?}; cnfs-csi's log:\n{}",
                socket.display(),
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The exit status of the stopped task, read by deleting it: containerd 1.6's `ctr tasks
    /// delete` warns "task <id> exit with non-zero exit code <n>" and says nothing for 0
    /// (cmd/ctr/commands/tasks/delete.go).
    fn exit_status(&self) -> anyhow::Result<i32> {
        let out = std::process::Command::new("ctr")
            .arg("-a")
            .arg(self.ctd.socket())
            .args(["tasks", "delete", &self.id])
            .stdin(std::process::Stdio::null())
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(out.status.success(), "ctr tasks delete: {stderr}");
        Ok(stderr
            .split("non-zero exit code ")
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0))
    }

    /// SIGTERM, as kubelet stops a container; waits (bounded) until the task stopped.
    fn stop(&self) -> anyhow::Result<()> {
        self.ctd
            .ctr(&["tasks", "kill", "--signal", "SIGTERM", &self.id])?;
        let until = Instant::now() + T;
        // Until it says STOPPED: a `ctr tasks ls` that fails (under load) is no answer.
        while self.task().map(|(_, s)| s).as_deref() != Some("STOPPED") {
            ensure!(
                Instant::now() < until,
                "cnfs-csi not stopped {T:?} after SIGTERM: {:?}",
                self.task()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let _ = self
            .ctd
            .ctr(&["--timeout", "10s", "tasks", "rm", "-f", &self.id]);
        // The template last: its snapshot is the container's root.
        for c in [&self.id, &self.template] {
            let _ = self.ctd.ctr(&["--timeout", "10s", "containers", "rm", c]);
        }
    }
}

/// A CSI call, bounded.
async fn call<T>(
    what: &str,
    fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout(T, fut).await {
        Ok(r) => r.map(tonic::Response::into_inner),
        Err(_) => panic!("{what} did not answer within {T:?}"),
    }
}

fn failure<T: std::fmt::Debug>(what: &str, r: Result<T, tonic::Status>) -> (Code, String) {
    match r {
        Ok(v) => panic!("{what} must fail, answered {v:?}"),
        Err(e) => (e.code(), e.message().to_string()),
    }
}

fn mount_cap(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

// ---------------------------------------------------------------------------------------
// What the host sees of the process and of the mount table
// ---------------------------------------------------------------------------------------

/// `Key: value` lines of /proc/<pid>/status.
fn proc_status(pid: i32) -> BTreeMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| {
            (
                k.to_string(),
                v.split_whitespace().collect::<Vec<_>>().join(" "),
            )
        })
        .collect()
}

/// The identity and confinement node.yaml / controller.yaml ask for, as the kernel reports it
/// for the running cnfs-csi: its uid and gid, no capability in any set, no_new_privs, a
/// seccomp filter, and namespaces of its own.
fn assert_confined(pid: i32, uid: u32, gid: u32) {
    let mut st = proc_status(pid);
    st.retain(|k, _| {
        k.starts_with("Cap")
            || ["Uid", "Gid", "Groups", "NoNewPrivs", "Seccomp"].contains(&k.as_str())
    });
    let ids = |k: &str| st.get(k).cloned().unwrap_or_default();
    assert_eq!(ids("Uid"), format!("{uid} {uid} {uid} {uid}"), "{st:?}");
    assert_eq!(ids("Gid"), format!("{gid} {gid} {gid} {gid}"), "{st:?}");
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(ids(set), NO_CAPS, "{set} of cnfs-csi: {st:?}");
    }
    assert_eq!(ids("NoNewPrivs"), "1", "allowPrivilegeEscalation: false");
    assert_eq!(
        ids("Seccomp"),
        "2",
        "seccompProfile RuntimeDefault: a filter"
    );
    for ns in ["pid", "ipc", "mnt", "uts"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).expect("ns");
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).expect("ns");
        assert_ne!(theirs, ours, "cnfs-csi shares the host's {ns} namespace");
    }
}

/// One line of a mountinfo file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MountLine {
    point: String,
    options: String,
    /// Propagation tags (`shared:N`, `master:N`); none for a private mount.
    tags: Vec<String>,
    fstype: String,
    source: String,
}

fn mountinfo(pid: &str) -> Vec<MountLine> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mountinfo");
    text.lines()
        .filter_map(|l| {
            let (head, tail) = l.split_once(" - ")?;
            let h: Vec<&str> = head.split(' ').collect();
            let t: Vec<&str> = tail.split(' ').collect();
            Some(MountLine {
                point: h.get(4)?.to_string(),
                options: h.get(5)?.to_string(),
                tags: h[6..].iter().map(|s| s.to_string()).collect(),
                fstype: t.first()?.to_string(),
                source: t.get(1)?.to_string(),
            })
        })
        .collect()
}

/// The container's own mount at `point`.
fn container_mount(pid: i32, point: &str) -> MountLine {
    mountinfo(&pid.to_string())
        .into_iter()
        .rev()
        .find(|m| m.point == point)
        .unwrap_or_else(|| panic!("nothing mounted at {point} in the container"))
}

/// Mounts in the host's table now that were not there `before` and that are network file
/// systems or lie under one of `dirs` (other tests on this machine mount elsewhere).
fn new_host_mounts(before: &[MountLine], dirs: &[&Path]) -> Vec<MountLine> {
    mountinfo("self")
        .into_iter()
        .filter(|m| {
            !before
                .iter()
                .any(|b| b.point == m.point && b.fstype == m.fstype && b.source == m.source)
        })
        .filter(|m| {
            m.fstype.starts_with("nfs")
                || m.fstype.starts_with("ceph")
                || m.fstype.starts_with("fuse")
                || dirs.iter().any(|d| Path::new(&m.point).starts_with(d))
        })
        .collect()
}

/// A hostPath on tmpfs (the node plugin's hand-off directory is on /run, a tmpfs).
fn tmpfs_dir(tag: &str) -> TempDir {
    let p = PathBuf::from("/dev/shm").join(format!("cnfs-{tag}-{}", unique_id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).expect("tmpfs dir");
    TempDir(p)
}

fn start_containerd() -> anyhow::Result<(Containerd, String)> {
    let archive = images::archive("cnfs-csi")?;
    let ctd = Containerd::start(MINIMAL)?;
    let names = images::import(&ctd, &archive)?;
    ensure!(
        names.len() == 1,
        "one image expected in the archive: {names:?}"
    );
    let name = names[0].clone();
    Ok((ctd, name))
}

#[test]
fn a_missing_archive_is_reported_with_the_command_that_builds_it() {
    let e = images::archive("cnfs-no-such-image").expect_err("no such archive");
    let msg = e.to_string();
    assert!(
        msg.contains("cnfs-no-such-image-") && msg.contains("`cargo xtask images`"),
        "{msg}"
    );
}

/// The translation refuses what it does not translate, naming it, so that the containers
/// below never run with a manifest field silently dropped; one row per field.
#[test]
fn the_translation_refuses_manifest_fields_it_does_not_translate() {
    let ds = object::<DaemonSet>("csi/node.yaml", "DaemonSet", "cnfs-csi-node");
    let pod = ds["spec"]["template"]["spec"].clone();
    let scratch = TempDir::new("csi-image-translate").expect("temp dir");
    let stand_in = |p: &str| {
        let d = scratch.path().join(p.trim_start_matches('/'));
        std::fs::create_dir_all(&d).expect("stand-in dir");
        (p.to_string(), d)
    };
    let kubelet = Kubelet {
        host_paths: BTreeMap::from([
            stand_in(&format!("/var/lib/kubelet/plugins/{DRIVER}")),
            stand_in("/var/lib/kubelet/pods"),
            stand_in(handoff::DEFAULT_ROOT),
        ]),
        config_maps: vec![],
        pod_dir: scratch.path().join("pod"),
    };

    // As written: translated, with what the checks below rely on.
    let plan = translate(&pod, "cnfs-csi", &kubelet).expect("node.yaml translates");
    for flag in ["--read-only", "--seccomp"] {
        assert!(plan.flags.iter().any(|f| f == flag), "{flag}: {plan:?}");
    }
    assert!(plan.drop_all_caps && plan.no_new_privs, "{plan:?}");
    assert_eq!((plan.uid, plan.gid), (Some(0), Some(0)));
    assert_eq!(plan.cpu_shares, Some(10), "cpu: 10m");
    assert!(
        plan.flags
            .windows(2)
            .any(|w| w == ["--memory-limit", "67108864"]),
        "{plan:?}"
    );
    assert_eq!(
        plan.binds.keys().map(String::as_str).collect::<Vec<_>>(),
        ["/csi", "/run/cnfs/csi", "/var/lib/kubelet/pods"]
    );
    assert!(
        plan.flags
            .iter()
            .filter(|f| f.starts_with("type=bind"))
            .all(|f| f.ends_with("options=rbind:rprivate:rw")),
        "{plan:?}"
    );

    type Edit = fn(&mut Json);
    let rows: Vec<(&str, Edit, &str)> = vec![
        (
            "host network",
            |p| p["hostNetwork"] = json!(true),
            "hostNetwork",
        ),
        (
            "pod-level fsGroup",
            |p| p["securityContext"]["fsGroup"] = json!(2000),
            "fsGroup",
        ),
        (
            "an added capability",
            |p| {
                cnfs_csi_container(p)["securityContext"]["capabilities"]["add"] =
                    json!(["SYS_ADMIN"])
            },
            "added capabilities",
        ),
        (
            "privileged",
            |p| cnfs_csi_container(p)["securityContext"]["privileged"] = json!(true),
            "privileged",
        ),
        (
            "a working directory",
            |p| cnfs_csi_container(p)["workingDir"] = json!("/"),
            "workingDir",
        ),
        (
            "a subPath",
            |p| cnfs_csi_container(p)["volumeMounts"][0]["subPath"] = json!("x"),
            "subPath",
        ),
        (
            "a hostPath of another type",
            |p| {
                for v in p["volumes"].as_array_mut().expect("volumes") {
                    if v["name"] == "handoff-dir" {
                        v["hostPath"]["type"] = json!("Socket");
                    }
                }
            },
            "hostPath type",
        ),
        (
            "another downward API field",
            |p| {
                cnfs_csi_container(p)["env"][0]["valueFrom"]["fieldRef"]["fieldPath"] =
                    json!("metadata.uid")
            },
            "fieldRef",
        ),
        (
            "a Localhost seccomp profile",
            |p| {
                cnfs_csi_container(p)["securityContext"]["seccompProfile"] =
                    json!({"type": "Localhost", "localhostProfile": "x.json"})
            },
            "seccompProfile",
        ),
        (
            "an undefined variable",
            |p| cnfs_csi_container(p)["args"][4] = json!("$(NODE_IP)"),
            "names a variable",
        ),
        (
            "a CPU limit",
            |p| cnfs_csi_container(p)["resources"]["limits"]["cpu"] = json!("1"),
            "resources.limits",
        ),
    ];
    for (case, edit, expected) in rows {
        let mut p = pod.clone();
        edit(&mut p);
        let e = translate(&p, "cnfs-csi", &kubelet).expect_err(case);
        let msg = format!("{e:#}");
        assert!(msg.contains(expected), "{case}: {msg}");
    }
}

/// The cnfs-csi container of a pod spec (test edits).
fn cnfs_csi_container(pod: &mut Json) -> &mut Json {
    pod["containers"]
        .as_array_mut()
        .expect("containers")
        .iter_mut()
        .find(|c| c["name"] == "cnfs-csi")
        .expect("container cnfs-csi")
}

// ---------------------------------------------------------------------------------------
// The node plugin
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_plugin_image_runs_as_node_yaml_says_and_hands_off_without_mounting(
) -> anyhow::Result<()> {
    let ds = object::<DaemonSet>("csi/node.yaml", "DaemonSet", "cnfs-csi-node");
    let pod = &ds["spec"]["template"]["spec"];

    // The node's directories (hostPath volumes), in temp dirs: kubelet's plugin directory
    // (DirectoryOrCreate), its pods directory (Directory: kubelet's, 0750), and the hand-off
    // directory on tmpfs as /run/cnfs/csi is.
    let pod_dir = TempDir::new("csi-image-node-pod")?;
    let plugin_dir = TempDir::new("csi-image-node-plugin")?;
    let pods_dir = TempDir::new("csi-image-node-pods")?;
    std::fs::set_permissions(pods_dir.path(), std::fs::Permissions::from_mode(0o750))?;
    let handoff_dir = tmpfs_dir("csi-image-node-handoff");
    let kubelet = Kubelet {
        host_paths: BTreeMap::from([
            (
                format!("/var/lib/kubelet/plugins/{DRIVER}"),
                plugin_dir.path().to_path_buf(),
            ),
            (
                "/var/lib/kubelet/pods".to_string(),
                pods_dir.path().to_path_buf(),
            ),
            (
                handoff::DEFAULT_ROOT.to_string(),
                handoff_dir.path().to_path_buf(),
            ),
        ]),
        config_maps: vec![],
        pod_dir: pod_dir.path().to_path_buf(),
    };
    let plan = translate(pod, "cnfs-csi", &kubelet)?;
    assert_eq!(
        plan.args,
        [
            "cnfs-csi",
            "node",
            "--endpoint",
            "unix:///csi/csi.sock",
            "--node-id",
            NODE_NAME
        ],
        "the command line after $(NODE_NAME) expansion"
    );

    let (ctd, image) = start_containerd()?;
    assert_eq!(
        plan.image, image,
        "node.yaml must name the image `cargo xtask images` builds"
    );
    let node = Running::start(&ctd, &plan, "cnfs-csi-node", &[])?;

    // As node.yaml says: uid 0 "that owns root's files, nothing more".
    assert_confined(node.pid, 0, 0);
    let root = container_mount(node.pid, "/");
    assert!(
        root.options.split(',').any(|o| o == "ro"),
        "readOnlyRootFilesystem: {root:?}"
    );
    for (dst, src) in &plan.binds {
        let m = container_mount(node.pid, dst);
        // mountPropagation: None: private, neither shared with nor receiving from the host.
        assert!(m.tags.is_empty(), "{dst} is not private: {m:?}");
        assert!(m.options.split(',').any(|o| o == "rw"), "{dst}: {m:?}");
        assert!(src.is_dir(), "{}", src.display());
    }
    // The CRI plugin mounts no tmpfs on /run (ctr's default spec would).
    assert!(
        !mountinfo(&node.pid.to_string())
            .iter()
            .any(|m| m.point == "/run"),
        "a mount on /run in the container"
    );
    let net = std::fs::read_link(format!("/proc/{}/ns/net", node.pid))?;
    assert_ne!(net, std::fs::read_link("/proc/self/ns/net")?, "hostNetwork");

    let socket = plugin_dir.path().join("csi.sock");
    let channel = node.connect(&socket).await?;
    let mut identity = IdentityClient::new(channel.clone());
    let mut csi = NodeClient::new(channel);

    // Identity, as the registrar and the liveness probe call it.
    let info = call(
        "GetPluginInfo",
        identity.get_plugin_info(GetPluginInfoRequest {}),
    )
    .await?;
    assert_eq!(info.name, DRIVER);
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    let probe = call("Probe", identity.probe(ProbeRequest {})).await?;
    assert_eq!(probe.ready, Some(true));
    let caps = call(
        "GetPluginCapabilities",
        identity.get_plugin_capabilities(GetPluginCapabilitiesRequest {}),
    )
    .await?;
    assert!(
        caps.capabilities.is_empty(),
        "a node plugin serves no controller: {caps:?}"
    );
    // NodeGetInfo: the node name from the downward API, through $(NODE_NAME).
    let info = call("NodeGetInfo", csi.node_get_info(NodeGetInfoRequest {})).await?;
    assert_eq!(info.node_id, NODE_NAME);

    // NodePublishVolume as kubelet calls it: the target's parent exists (kubelet makes it,
    // 0750), the target does not; host path and container path are the same string.
    let pod_uid = "0b5e6b1c-2f4a-4a47-9d1e-5f2c1c0c6a11";
    let pv = "pvc-7d3c2a1e-0000-4000-8000-000000000001";
    let rel = format!("{pod_uid}/volumes/kubernetes.io~csi/{pv}");
    let host_parent = pods_dir.path().join(&rel);
    std::fs::create_dir_all(&host_parent)?;
    std::fs::set_permissions(&host_parent, std::fs::Permissions::from_mode(0o750))?;
    let target = format!("/var/lib/kubelet/pods/{rel}/mount");
    let host_target = host_parent.join("mount");
    // What the controller puts in the volume context (192.0.2.0/24: documentation addresses;
    // the node plugin connects to nothing).
    let source = format!("nfs://192.0.2.5/exports/k8s/{pv}?vers=4.1");
    let volume_id = format!("nfs#delete#192.0.2.5#/exports/k8s#{pv}");
    let publish = NodePublishVolumeRequest {
        volume_id: volume_id.clone(),
        target_path: target.clone(),
        volume_capability: Some(mount_cap(Mode::MultiNodeMultiWriter)),
        volume_context: HashMap::from([
            ("source".to_string(), source.clone()),
            (
                "csi.storage.k8s.io/pod.namespace".to_string(),
                "team-a".to_string(),
            ),
            (
                "csi.storage.k8s.io/pod.name".to_string(),
                "cnfs-nfs-app".to_string(),
            ),
            (
                "csi.storage.k8s.io/pod.uid".to_string(),
                pod_uid.to_string(),
            ),
            (
                "csi.storage.k8s.io/ephemeral".to_string(),
                "false".to_string(),
            ),
        ]),
        ..Default::default()
    };
    let watched: [&Path; 3] = [pods_dir.path(), plugin_dir.path(), handoff_dir.path()];
    let before = mountinfo("self");

    // A bad source is refused by name, and leaves nothing behind.
    let mut bad = publish.clone();
    bad.volume_context
        .insert("source".into(), "nfs://192.0.2.5/exports/../etc".into());
    let (code, msg) = failure(
        "NodePublishVolume with a bad source",
        call("NodePublishVolume", csi.node_publish_volume(bad)).await,
    );
    assert_eq!(code, Code::InvalidArgument, "{msg}");
    // Named by the field of the volume it becomes (the same validation as the shim's).
    assert!(
        msg.contains("volume.nfs.export") && msg.contains("clean path"),
        "{msg}"
    );
    assert!(!host_target.exists(), "a refused publish made the target");

    call(
        "NodePublishVolume",
        csi.node_publish_volume(publish.clone()),
    )
    .await?;

    // The target is the plugin's explanatory file (not a mount), created as uid 0.
    let meta = std::fs::symlink_metadata(&host_target)?;
    assert!(meta.is_file(), "the target must be a file: {meta:?}");
    assert_eq!(meta.uid(), 0);
    assert_eq!(meta.permissions().mode() & 0o777, 0o444);
    let text = std::fs::read_to_string(&host_target)?;
    assert!(
        text.starts_with(cnfs_csi::node::TARGET_MARKER),
        "target file: {text:?}"
    );

    // The shim's side: a container of the pod whose bundle binds the target path (as the
    // CRI plugin writes it) is found by the shim's reader of bind sources, and the record in
    // the hand-off directory is there for that path, with the volume the agent will mount.
    let bundle = TempDir::new("csi-image-node-bundle")?;
    std::fs::write(
        bundle.path().join("config.json"),
        serde_json::to_vec(&json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/data", "type": "bind", "source": target,
                 "options": ["rbind", "rprivate", "rw"]},
            ],
        }))?,
    )?;
    let sources = cnfs_host_shim::handoff::bind_sources(bundle.path())?;
    assert!(sources.contains(&target), "{sources:?}");
    let shim_view = HandoffDir::new(handoff_dir.path());
    let record = shim_view
        .read_record(&target)?
        .unwrap_or_else(|| panic!("no hand-off record for {target} where the shim reads"));
    assert_eq!(record.volume_id, volume_id);
    assert_eq!(record.source, source);
    assert_eq!(
        (
            record.pod_namespace.as_str(),
            record.pod_name.as_str(),
            record.pod_uid.as_str()
        ),
        ("team-a", "cnfs-nfs-app", pod_uid)
    );
    assert!(!record.read_only && !record.ephemeral && !record.has_secret);
    let (spec, _) = record.volume_spec(None)?;
    assert_eq!(spec.name, handoff::guest_volume_name(&target));
    match &spec.source {
        Source::Nfs(nfs) => {
            assert_eq!(nfs.server.to_string(), "192.0.2.5");
            assert_eq!(nfs.export, format!("/exports/k8s/{pv}"));
        }
        other => panic!("an NFS volume expected: {other:?}"),
    }
    // Written by uid 0 of the container, private to root, no key anywhere.
    let rec_meta = std::fs::metadata(shim_view.record_path(&target))?;
    assert_eq!(
        (rec_meta.uid(), rec_meta.permissions().mode() & 0o777),
        (0, 0o600)
    );
    assert!(!shim_view.secret_path(&target).exists());
    // The same publish again (kubelet retries) is a success that changes nothing.
    call("NodePublishVolume again", csi.node_publish_volume(publish)).await?;
    assert_eq!(shim_view.read_record(&target)?, Some(record));

    // Nothing was mounted: not on the host, not in the plugin's own namespace.
    let host_new = new_host_mounts(&before, &watched);
    assert!(host_new.is_empty(), "new host mounts: {host_new:?}");
    assert!(
        !mountinfo("self")
            .iter()
            .any(|m| Path::new(&m.point) == host_target),
        "the target is a mount point"
    );
    let inside: Vec<MountLine> = mountinfo(&node.pid.to_string())
        .into_iter()
        .filter(|m| m.fstype.starts_with("nfs") || m.point.contains("kubernetes.io~csi"))
        .collect();
    assert!(inside.is_empty(), "mounts in the plugin: {inside:?}");

    // NodeUnpublishVolume: another volume's id is refused; the right one removes the record
    // and the target.
    let (code, msg) = failure(
        "NodeUnpublishVolume of another volume",
        call(
            "NodeUnpublishVolume",
            csi.node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: "nfs#delete#192.0.2.5#/exports/k8s#pvc-other".into(),
                target_path: target.clone(),
            }),
        )
        .await,
    );
    assert_eq!(code, Code::NotFound, "{msg}");
    assert!(msg.contains("target_path"), "{msg}");
    assert!(shim_view.read_record(&target)?.is_some());
    call(
        "NodeUnpublishVolume",
        csi.node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id,
            target_path: target.clone(),
        }),
    )
    .await?;
    assert_eq!(shim_view.read_record(&target)?, None);
    assert!(!host_target.exists(), "the target file is still there");
    let host_new = new_host_mounts(&before, &watched);
    assert!(host_new.is_empty(), "new host mounts: {host_new:?}");

    // kubelet stops the container with SIGTERM: cnfs-csi ends and removes its socket.
    drop(identity);
    drop(csi);
    node.stop()?;
    assert!(
        !socket.exists(),
        "the socket outlived the plugin; log:\n{}",
        node.log_text()
    );
    // It ended by itself, with status 0: SIGTERM was handled (its default action would end
    // it with 143), the shutdown ran to its end. Read from the task, not from the log: the
    // last lines a process writes before it exits have been seen missing from containerd
    // 1.6's `--log-uri file://` copy under load (its "stopped" record three times in CI,
    // once cut mid-line, once with "stopping" gone too), so no closing record is evidence.
    assert_eq!(node.exit_status()?, 0, "{}", node.log_text());
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The controller
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_image_runs_as_controller_yaml_says_and_provisions_on_a_real_nfs_server(
) -> anyhow::Result<()> {
    let deployment =
        object::<Deployment>("csi/controller.yaml", "Deployment", "cnfs-csi-controller");
    let pod = &deployment["spec"]["template"]["spec"];
    let dir = TempDir::new("csi-image-ctl")?;
    let ns = NetNs::create()?;
    let nfs = Ganesha::start(&ns, dir.path())?;

    // The ConfigMap as written, with this test bed's monitor address (in the test's
    // namespace, where nothing answers) for every cluster, so nothing could ever leave it.
    let mut config_map = object::<ConfigMap>("csi/controller.yaml", "ConfigMap", "cnfs-csi-config");
    let mut csi_toml: toml::Table = config_map["data"]["csi.toml"]
        .as_str()
        .expect("csi.toml in the ConfigMap")
        .parse()?;
    let clusters = csi_toml
        .get_mut("clusters")
        .and_then(|c| c.as_table_mut())
        .expect("[clusters] in csi.toml");
    for (_, cluster) in clusters.iter_mut() {
        let t = cluster.as_table_mut().expect("a cluster table");
        t.insert(
            "monitors".into(),
            toml::Value::Array(vec![format!("{}:6789", ns.void_ip).into()]),
        );
        t.insert("fsid".into(), "6b1f0c2e-3a4d-4e5f-8a9b-0c1d2e3f4a5b".into());
    }
    config_map["data"]["csi.toml"] = json!(toml::to_string(&csi_toml)?);
    let kubelet = Kubelet {
        host_paths: BTreeMap::new(),
        config_maps: vec![config_map],
        pod_dir: dir.path().join("pod"),
    };
    let plan = translate(pod, "cnfs-csi", &kubelet)?;
    assert_eq!(
        plan.sysctls.get("net.ipv4.ip_unprivileged_port_start"),
        Some(&"0".to_string())
    );

    let (ctd, image) = start_containerd()?;
    assert_eq!(
        plan.image, image,
        "controller.yaml must name the image `cargo xtask images` builds"
    );
    let sysctl = || -> anyhow::Result<String> {
        let out = ns
            .command("sysctl")
            .args(["-n", "net.ipv4.ip_unprivileged_port_start"])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    assert_eq!(
        sysctl()?,
        "1024",
        "the namespace starts with the kernel default"
    );
    // The pod's own network namespace is, here, the one where ganesha serves (ctr
    // --with-ns): the controller reaches the server as a pod reaches it over the pod network.
    let netns = format!("network:/run/netns/{}", ns.name);
    let ctl = Running::start(&ctd, &plan, "cnfs-csi-controller", &["--with-ns", &netns])?;

    // As controller.yaml says: the ordinary user 65532, nothing else.
    assert_confined(ctl.pid, 65532, 65532);
    assert_eq!(
        std::fs::metadata(format!("/proc/{}/ns/net", ctl.pid))?.ino(),
        std::fs::metadata(format!("/run/netns/{}", ns.name))?.ino(),
        "the controller runs in the server's network namespace"
    );
    // The pod sysctl reached the pod's network namespace.
    assert_eq!(sysctl()?, "0");
    let root = container_mount(ctl.pid, "/");
    assert!(root.options.split(',').any(|o| o == "ro"), "{root:?}");
    let config = container_mount(ctl.pid, "/etc/cnfs");
    assert!(config.options.split(',').any(|o| o == "ro"), "{config:?}");
    let tmp = container_mount(ctl.pid, "/tmp");
    assert_eq!(tmp.fstype, "tmpfs", "emptyDir medium Memory: {tmp:?}");
    let socket_dir = plan.binds.get("/csi").expect("the socket-dir volume");
    let before = mountinfo("self");

    let socket = socket_dir.join("csi.sock");
    let channel = ctl.connect(&socket).await?;
    let mut identity = IdentityClient::new(channel.clone());
    let mut csi = ControllerClient::new(channel);
    let info = call(
        "GetPluginInfo",
        identity.get_plugin_info(GetPluginInfoRequest {}),
    )
    .await?;
    assert_eq!(info.name, DRIVER);
    let probe = call("Probe", identity.probe(ProbeRequest {})).await?;
    assert_eq!(probe.ready, Some(true));
    let caps = call(
        "GetPluginCapabilities",
        identity.get_plugin_capabilities(GetPluginCapabilitiesRequest {}),
    )
    .await?;
    assert!(
        caps.capabilities.iter().any(|c| matches!(&c.r#type,
            Some(plugin_capability::Type::Service(s))
                if s.r#type == plugin_capability::service::Type::ControllerService as i32)),
        "{caps:?}"
    );

    // CreateVolume as csi-provisioner sends it for a PVC of storageclass-nfs.yaml: the
    // class's parameters (server and share of this test bed), minus nothing, plus the
    // --extra-create-metadata keys.
    let class = object::<StorageClass>("csi/storageclass-nfs.yaml", "StorageClass", "cnfs-nfs");
    let pv = "pvc-4c2d9e7a-1111-4222-8333-444455556666";
    let mut params: HashMap<String, String> = class["parameters"]
        .as_object()
        .expect("parameters")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
        .collect();
    params.insert("server".into(), nfs.server_ip.clone());
    params.insert("share".into(), EXPORT.into());
    for (k, v) in [
        ("csi.storage.k8s.io/pvc/name", "cnfs-nfs-data"),
        ("csi.storage.k8s.io/pvc/namespace", "team-a"),
        ("csi.storage.k8s.io/pv/name", pv),
    ] {
        params.insert(k.into(), v.into());
    }
    let create = CreateVolumeRequest {
        name: pv.into(),
        volume_capabilities: vec![mount_cap(Mode::MultiNodeMultiWriter)],
        parameters: params.clone(),
        ..Default::default()
    };

    // A class without a server is refused by name, before anything is made.
    let mut no_server = create.clone();
    no_server.parameters.remove("server");
    let (code, msg) = failure(
        "CreateVolume without a server",
        call("CreateVolume", csi.create_volume(no_server)).await,
    );
    assert_eq!(code, Code::InvalidArgument, "{msg}");
    assert!(msg.contains("parameters.server"), "{msg}");

    let vol = call("CreateVolume", csi.create_volume(create.clone()))
        .await?
        .volume
        .expect("a volume");
    assert_eq!(
        vol.volume_id,
        format!("nfs#delete#{}#{EXPORT}#{pv}", nfs.server_ip)
    );
    assert_eq!(
        vol.volume_context.get("source"),
        Some(&format!("nfs://{}{EXPORT}/{pv}?vers=4.1", nfs.server_ip))
    );
    // On the server: the volume's directory, world-writable, made by the NFS client in the
    // container (AUTH_SYS root, not squashed by this export).
    let on_server = nfs.export_dir.join(pv);
    let meta = std::fs::metadata(&on_server)
        .with_context(|| format!("{} not created on the export", on_server.display()))?;
    assert!(meta.is_dir());
    assert_eq!(meta.permissions().mode() & 0o777, 0o777);
    std::fs::write(on_server.join("data"), b"written by a pod")?;
    // The provisioner retries: the same volume, its data kept.
    let again = call("CreateVolume again", csi.create_volume(create))
        .await?
        .volume
        .expect("a volume");
    assert_eq!(again.volume_id, vol.volume_id);
    assert_eq!(std::fs::read(on_server.join("data"))?, b"written by a pod");

    // DeleteVolume (onDelete: delete): the directory and what is in it go.
    call(
        "DeleteVolume",
        csi.delete_volume(DeleteVolumeRequest {
            volume_id: vol.volume_id.clone(),
            ..Default::default()
        }),
    )
    .await?;
    assert!(!on_server.exists(), "{} still there", on_server.display());
    call(
        "DeleteVolume again",
        csi.delete_volume(DeleteVolumeRequest {
            volume_id: vol.volume_id.clone(),
            ..Default::default()
        }),
    )
    .await?;

    // CephFS needs the `ceph` program, which the image does not hold: a CreateVolume of
    // storageclass-cephfs.yaml (parameters as the provisioner sends them: without its
    // secret-name keys; the admin secret's id with a well-formed key) fails and says so.
    let class = object::<StorageClass>(
        "csi/storageclass-cephfs.yaml",
        "StorageClass",
        "cnfs-cephfs",
    );
    let params: HashMap<String, String> = class["parameters"]
        .as_object()
        .expect("parameters")
        .iter()
        .filter(|(k, _)| !k.contains("-secret-"))
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
        .collect();
    let admin = object::<Secret>("csi/storageclass-cephfs.yaml", "Secret", "cnfs-ceph-admin");
    let admin_id = admin["stringData"]["adminID"]
        .as_str()
        .expect("adminID")
        .to_string();
    let started = Instant::now();
    let (code, msg) = failure(
        "CephFS CreateVolume without the ceph CLI",
        call(
            "CreateVolume",
            csi.create_volume(CreateVolumeRequest {
                name: "pvc-9e8d7c6b-5555-4666-8777-888899990000".into(),
                volume_capabilities: vec![mount_cap(Mode::MultiNodeMultiWriter)],
                parameters: params,
                secrets: HashMap::from([
                    ("adminID".to_string(), admin_id),
                    ("adminKey".to_string(), KEY.to_string()),
                ]),
                ..Default::default()
            }),
        )
        .await,
    );
    eprintln!("CephFS CreateVolume in the image: {code:?}: {msg}");
    assert_eq!(code, Code::Internal, "{msg}");
    assert!(
        msg.contains("cannot run ceph") && msg.contains("ceph-common"),
        "the error must name the missing program: {msg}"
    );
    assert!(msg.contains("No such file or directory"), "{msg}");
    assert!(!msg.contains(KEY), "the key leaked: {msg}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a missing program must fail at once, took {:?}",
        started.elapsed()
    );

    // SMB likewise needs Samba's `smbclient`, which the image does not hold: a CreateVolume
    // of storageclass-smb.yaml fails at once naming it, without the password.
    let class = object::<StorageClass>("csi/storageclass-smb.yaml", "StorageClass", "cnfs-smb");
    let params: HashMap<String, String> = class["parameters"]
        .as_object()
        .expect("parameters")
        .iter()
        .filter(|(k, _)| !k.contains("-secret-"))
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
        .collect();
    const SMB_PW: &str = "image-smb-pw-31";
    let started = Instant::now();
    let (code, msg) = failure(
        "SMB CreateVolume without smbclient",
        call(
            "CreateVolume",
            csi.create_volume(CreateVolumeRequest {
                name: "pvc-9e8d7c6b-5555-4666-8777-888899990001".into(),
                volume_capabilities: vec![mount_cap(Mode::MultiNodeMultiWriter)],
                parameters: params,
                secrets: HashMap::from([
                    ("username".to_string(), "k8s-volumes".to_string()),
                    ("password".to_string(), SMB_PW.to_string()),
                ]),
                ..Default::default()
            }),
        )
        .await,
    );
    eprintln!("SMB CreateVolume in the image: {code:?}: {msg}");
    assert!(
        msg.contains("cannot run smbclient") && msg.contains("smbclient"),
        "the error must name the missing program: {msg}"
    );
    assert!(!msg.contains(SMB_PW), "the password leaked: {msg}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a missing program must fail at once, took {:?}",
        started.elapsed()
    );

    // The controller mounted nothing, on the host or in its own namespace.
    let host_new = new_host_mounts(&before, &[dir.path(), ctd.dir()]);
    assert!(host_new.is_empty(), "new host mounts: {host_new:?}");
    let inside: Vec<MountLine> = mountinfo(&ctl.pid.to_string())
        .into_iter()
        .filter(|m| m.fstype.starts_with("nfs") || m.fstype.starts_with("ceph"))
        .collect();
    assert!(inside.is_empty(), "mounts in the controller: {inside:?}");

    drop(identity);
    drop(csi);
    ctl.stop()?;
    assert!(
        !socket.exists(),
        "the socket outlived the controller; log:\n{}",
        ctl.log_text()
    );
    Ok(())
}
