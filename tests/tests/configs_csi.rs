//! The CSI driver's Kubernetes manifests (`configs/csi/*.yaml`), read offline with Kubernetes'
//! own API types (k8s-openapi; a field the API does not have fails) and checked for what
//! `configs/csi/README.md` claims: the node plugin and the controller run without privilege
//! (no privileged container, no capability, no privilege escalation, no host namespace, no
//! mount propagation, exactly the documented host paths), the CSIDriver is the one the
//! StorageClasses and the registrar name, every secret a StorageClass names exists with the keys
//! the driver reads, every ServiceAccount exists and has the RBAC its sidecars need (and the
//! node plugin none), and every example pod runs under the CNFS RuntimeClass with volumes whose
//! `source` passes the URL grammar and validation the shim uses. A table of broken copies shows
//! that each check can fail.

mod k8s;
use k8s::strict;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use anyhow::{anyhow, bail, ensure, Context};
use cnfs_protocols::spec::VolumeSpec;
use cnfs_protocols::{handoff, volume_url};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PersistentVolume, PersistentVolumeClaim, Pod, PodSpec, Secret,
    ServiceAccount,
};
use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, Subject,
};
use k8s_openapi::api::storage::v1::{CSIDriver, StorageClass};
use serde::Deserialize;
use serde_json::Value as Json;

/// The driver name configs/csi/README.md documents.
const DRIVER: &str = "csi.cnfs.io";
const NAMESPACE: &str = "cnfs-system";
const NODE_DAEMONSET: &str = "cnfs-csi-node";
const CONTROLLER_DEPLOYMENT: &str = "cnfs-csi-controller";
const CONFIG_MAP: &str = "cnfs-csi-config";
/// The driver's CSI socket inside its pods.
const SOCKET_DIR: &str = "/csi";
const ENDPOINT: &str = "unix:///csi/csi.sock";
/// Kata's run directories: the node plugin must not see them (stats come through the
/// shim's relay in the hand-off directory).
const KATA_RUN_DIRS: [&str; 2] = ["/run/vc", "/run/kata"];
/// Files configs/csi/README.md documents; any other *.yaml there is checked as well.
const FILES: [&str; 10] = [
    "namespace.yaml",
    "csidriver.yaml",
    "rbac.yaml",
    "controller.yaml",
    "node.yaml",
    "storageclass-nfs.yaml",
    "storageclass-cephfs.yaml",
    "storageclass-smb.yaml",
    "inline-ephemeral.yaml",
    "static-pv.yaml",
];
/// Sysctls kubelet allows without --allowed-unsafe-sysctls (namespaced, isolated per pod).
const SAFE_SYSCTLS: [&str; 5] = [
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_unprivileged_port_start",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read_config(rel: &str) -> String {
    let p = repo().join("configs").join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

// ---------------------------------------------------------------------------------------
// Reading: YAML documents → typed API objects, unknown fields refused
// (the approach of tests/tests/configs.rs, for multi-document files)
// ---------------------------------------------------------------------------------------

/// One YAML document as written, with the file it came from.
#[derive(Debug, Clone)]
struct RawDoc {
    file: String,
    json: Json,
}

impl RawDoc {
    fn kind(&self) -> &str {
        self.json["kind"].as_str().unwrap_or_default()
    }
    fn name(&self) -> &str {
        self.json["metadata"]["name"].as_str().unwrap_or_default()
    }
}

/// Every document of every `configs/csi/*.yaml` (empty documents skipped).
fn raw_docs() -> Vec<RawDoc> {
    let dir = repo().join("configs/csi");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        // kustomize's own file (configs/deploy), checked by configs_deploy.rs.
        .filter(|n| n != "kustomization.yaml")
        .collect();
    files.sort();
    for f in FILES {
        assert!(
            files.iter().any(|x| x == f),
            "configs/csi/{f} is missing (documented in configs/csi/README.md)"
        );
    }
    let mut out = Vec::new();
    for file in files {
        let text = read_config(&format!("csi/{file}"));
        for (i, de) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let json = Json::deserialize(de)
                .unwrap_or_else(|e| panic!("configs/csi/{file}, document {i}: {e}"));
            if !json.is_null() {
                out.push(RawDoc {
                    file: file.clone(),
                    json,
                });
            }
        }
    }
    out
}

/// All manifests, typed.
#[derive(Debug, Default)]
struct Set {
    namespaces: Vec<Namespace>,
    csi_drivers: Vec<CSIDriver>,
    service_accounts: Vec<ServiceAccount>,
    config_maps: Vec<ConfigMap>,
    secrets: Vec<Secret>,
    daemon_sets: Vec<DaemonSet>,
    deployments: Vec<Deployment>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    storage_classes: Vec<StorageClass>,
    pvcs: Vec<PersistentVolumeClaim>,
    pvs: Vec<PersistentVolume>,
    pods: Vec<Pod>,
}

fn typed(docs: &[RawDoc]) -> anyhow::Result<Set> {
    let mut s = Set::default();
    for d in docs {
        let api = d.json["apiVersion"].as_str().unwrap_or_default();
        let at = || format!("configs/csi/{}: {api} {} {:?}", d.file, d.kind(), d.name());
        let j = &d.json;
        match (api, d.kind()) {
            ("v1", "Namespace") => s.namespaces.push(strict(j).with_context(at)?),
            ("v1", "ServiceAccount") => s.service_accounts.push(strict(j).with_context(at)?),
            ("v1", "ConfigMap") => s.config_maps.push(strict(j).with_context(at)?),
            ("v1", "Secret") => s.secrets.push(strict(j).with_context(at)?),
            ("v1", "PersistentVolumeClaim") => s.pvcs.push(strict(j).with_context(at)?),
            ("v1", "PersistentVolume") => s.pvs.push(strict(j).with_context(at)?),
            ("v1", "Pod") => s.pods.push(strict(j).with_context(at)?),
            ("apps/v1", "DaemonSet") => s.daemon_sets.push(strict(j).with_context(at)?),
            ("apps/v1", "Deployment") => s.deployments.push(strict(j).with_context(at)?),
            ("storage.k8s.io/v1", "CSIDriver") => s.csi_drivers.push(strict(j).with_context(at)?),
            ("storage.k8s.io/v1", "StorageClass") => {
                s.storage_classes.push(strict(j).with_context(at)?)
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                s.cluster_roles.push(strict(j).with_context(at)?)
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                s.cluster_role_bindings.push(strict(j).with_context(at)?)
            }
            ("rbac.authorization.k8s.io/v1", "Role") => s.roles.push(strict(j).with_context(at)?),
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
                s.role_bindings.push(strict(j).with_context(at)?)
            }
            _ => bail!("{}: a kind this test does not check; add it here", at()),
        }
    }
    Ok(s)
}

fn load() -> Set {
    typed(&raw_docs()).unwrap_or_else(|e| panic!("{e:#}"))
}

fn name_of(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    m.name.as_deref().unwrap_or_default()
}

fn ns_of(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    m.namespace.as_deref().unwrap_or("default")
}

/// The RuntimeClass CNFS pods must use, from configs/kubernetes/runtimeclass.yaml.
fn cnfs_runtime_class() -> RuntimeClass {
    let doc: Json = serde_yaml::from_str(&read_config("kubernetes/runtimeclass.yaml")).unwrap();
    strict(&doc).expect("configs/kubernetes/runtimeclass.yaml")
}

/// The node label that marks CNFS nodes: runtimeclass.yaml's scheduling.nodeSelector, or,
/// while that is commented out, the label its comment tells admins to use.
fn cnfs_node_label() -> (String, String) {
    const KEY: &str = "cnfs.io/runtime";
    if let Some(v) = cnfs_runtime_class()
        .scheduling
        .and_then(|s| s.node_selector)
        .and_then(|n| n.get(KEY).cloned())
    {
        return (KEY.into(), v);
    }
    let text = read_config("kubernetes/runtimeclass.yaml");
    let value = text
        .lines()
        .filter_map(|l| l.split_once(&format!("{KEY}:")))
        .map(|(_, v)| v.trim().trim_matches('"').to_string())
        .next()
        .expect("configs/kubernetes/runtimeclass.yaml names no cnfs.io/runtime node label");
    (KEY.into(), value)
}

// ---------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------

/// The one CSIDriver: named as documented, no attach, pod info on mount, no fsGroup
/// handling, persistent and inline volumes, no republish. Returns its name.
fn check_csi_driver(s: &Set) -> anyhow::Result<String> {
    ensure!(
        s.csi_drivers.len() == 1,
        "expected one CSIDriver, found {}",
        s.csi_drivers.len()
    );
    let d = &s.csi_drivers[0];
    let name = name_of(&d.metadata);
    ensure!(
        name == DRIVER,
        "CSIDriver is {name:?}, documented as {DRIVER}"
    );
    let spec = &d.spec;
    ensure!(
        spec.attach_required == Some(false),
        "CSIDriver attachRequired must be false (nothing attaches), is {:?}",
        spec.attach_required
    );
    ensure!(
        spec.pod_info_on_mount == Some(true),
        "CSIDriver podInfoOnMount must be true (the hand-off names the pod), is {:?}",
        spec.pod_info_on_mount
    );
    ensure!(
        spec.fs_group_policy.as_deref() == Some("None"),
        "CSIDriver fsGroupPolicy must be None (no chown of a hand-off file), is {:?}",
        spec.fs_group_policy
    );
    let modes: BTreeSet<&str> = spec
        .volume_lifecycle_modes
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    ensure!(
        modes == BTreeSet::from(["Persistent", "Ephemeral"]),
        "CSIDriver volumeLifecycleModes must be Persistent and Ephemeral, are {modes:?}"
    );
    ensure!(
        spec.requires_republish == Some(false),
        "CSIDriver requiresRepublish must be false, is {:?}",
        spec.requires_republish
    );
    Ok(name.to_string())
}

fn all_containers(spec: &PodSpec) -> impl Iterator<Item = &Container> {
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
}

fn container<'a>(spec: &'a PodSpec, name: &str) -> anyhow::Result<&'a Container> {
    spec.containers
        .iter()
        .find(|c| c.name == name)
        .ok_or_else(|| anyhow!("no container {name:?}"))
}

fn args(c: &Container) -> Vec<&str> {
    c.args.iter().flatten().map(String::as_str).collect()
}

/// No privilege in a pod: no host namespace, and every container unprivileged, without
/// privilege escalation, with ALL capabilities dropped and none added, a read-only root file
/// system and a confining seccomp profile; no host ports, no Bidirectional propagation, only
/// safe sysctls.
fn check_unprivileged(spec: &PodSpec) -> anyhow::Result<()> {
    ensure!(spec.host_network != Some(true), "hostNetwork is set");
    ensure!(spec.host_pid != Some(true), "hostPID is set");
    ensure!(spec.host_ipc != Some(true), "hostIPC is set");
    ensure!(
        spec.ephemeral_containers.is_none(),
        "ephemeral containers in a manifest"
    );
    let pod_sc = spec.security_context.clone().unwrap_or_default();
    for s in pod_sc.sysctls.iter().flatten() {
        ensure!(
            SAFE_SYSCTLS.contains(&s.name.as_str()),
            "sysctl {} is not one of kubelet's safe sysctls",
            s.name
        );
    }
    for c in all_containers(spec) {
        let n = &c.name;
        let sc = c
            .security_context
            .as_ref()
            .ok_or_else(|| anyhow!("container {n}: no securityContext"))?;
        ensure!(
            sc.privileged == Some(false),
            "container {n}: privileged must be false, is {:?}",
            sc.privileged
        );
        ensure!(
            sc.allow_privilege_escalation == Some(false),
            "container {n}: allowPrivilegeEscalation must be false, is {:?}",
            sc.allow_privilege_escalation
        );
        let caps = sc.capabilities.clone().unwrap_or_default();
        ensure!(
            caps.drop.iter().flatten().any(|d| d == "ALL"),
            "container {n}: capabilities must drop ALL, drop {:?}",
            caps.drop
        );
        ensure!(
            caps.add.iter().flatten().next().is_none(),
            "container {n}: adds capabilities {:?}",
            caps.add
        );
        ensure!(
            sc.read_only_root_filesystem == Some(true),
            "container {n}: readOnlyRootFilesystem must be true"
        );
        ensure!(
            sc.proc_mount.as_deref().unwrap_or("Default") == "Default",
            "container {n}: procMount {:?}",
            sc.proc_mount
        );
        let seccomp = sc
            .seccomp_profile
            .as_ref()
            .or(pod_sc.seccomp_profile.as_ref())
            .map(|p| p.type_.as_str());
        ensure!(
            matches!(seccomp, Some("RuntimeDefault") | Some("Localhost")),
            "container {n}: seccomp profile must be RuntimeDefault (or Localhost), is {seccomp:?}"
        );
        for p in c.ports.iter().flatten() {
            ensure!(
                p.host_port.is_none(),
                "container {n}: hostPort {:?}",
                p.host_port
            );
        }
        for m in c.volume_mounts.iter().flatten() {
            ensure!(
                m.mount_propagation.as_deref() != Some("Bidirectional"),
                "container {n}: volume {} mounted with mountPropagation Bidirectional",
                m.name
            );
        }
    }
    Ok(())
}

/// One hostPath the node plugin may have: its type, where it is mounted (every mount of it),
/// read-only or not.
struct HostDir {
    path: String,
    type_: &'static str,
    mount_path: String,
    read_only: bool,
}

fn node_host_dirs(driver: &str) -> Vec<HostDir> {
    let same = |path: &str, type_, read_only| HostDir {
        path: path.into(),
        type_,
        mount_path: path.into(),
        read_only,
    };
    vec![
        HostDir {
            path: format!("/var/lib/kubelet/plugins/{driver}"),
            type_: "DirectoryOrCreate",
            mount_path: SOCKET_DIR.into(),
            read_only: false,
        },
        HostDir {
            path: "/var/lib/kubelet/plugins_registry".into(),
            type_: "Directory",
            mount_path: "/registration".into(),
            read_only: false,
        },
        same("/var/lib/kubelet/pods", "Directory", false),
        same(handoff::DEFAULT_ROOT, "DirectoryOrCreate", false),
    ]
}

/// The node DaemonSet: unprivileged (see `check_unprivileged`), no mount propagation at all,
/// exactly the documented host paths mounted as documented, the cnfs-csi command line, the
/// registrar pointing kubelet at this driver's socket, only CNFS nodes, no API token.
fn check_node_plugin(s: &Set, driver: &str) -> anyhow::Result<()> {
    let ds = s
        .daemon_sets
        .iter()
        .find(|d| name_of(&d.metadata) == NODE_DAEMONSET)
        .ok_or_else(|| anyhow!("no DaemonSet {NODE_DAEMONSET}"))?;
    ensure!(
        ns_of(&ds.metadata) == NAMESPACE,
        "DaemonSet not in {NAMESPACE}"
    );
    let spec = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .context("DaemonSet has no pod spec")?;
    check_unprivileged(spec).context("node plugin")?;

    for c in all_containers(spec) {
        for m in c.volume_mounts.iter().flatten() {
            let p = m.mount_propagation.as_deref().unwrap_or("None");
            ensure!(
                p == "None",
                "node plugin: container {} mounts {} with mountPropagation {p}: it mounts nothing, so None",
                c.name,
                m.name
            );
        }
    }

    // Host paths: exactly the documented ones.
    let want = node_host_dirs(driver);
    let volumes: Vec<_> = spec.volumes.iter().flatten().collect();
    let host: BTreeMap<&str, (&str, Option<&str>)> = volumes
        .iter()
        .filter_map(|v| {
            v.host_path
                .as_ref()
                .map(|h| (h.path.as_str(), (v.name.as_str(), h.type_.as_deref())))
        })
        .collect();
    let want_paths: BTreeSet<&str> = want.iter().map(|h| h.path.as_str()).collect();
    let have_paths: BTreeSet<&str> = host.keys().copied().collect();
    ensure!(
        have_paths == want_paths,
        "node plugin hostPath volumes are {have_paths:?}, documented: {want_paths:?}"
    );
    for h in &want {
        let (vol, type_) = host[h.path.as_str()];
        ensure!(
            type_ == Some(h.type_),
            "hostPath {}: type {type_:?}, expected {}",
            h.path,
            h.type_
        );
        let mounts: Vec<_> = all_containers(spec)
            .flat_map(|c| c.volume_mounts.iter().flatten().map(move |m| (c, m)))
            .filter(|(_, m)| m.name == vol)
            .collect();
        ensure!(!mounts.is_empty(), "hostPath {} is mounted nowhere", h.path);
        for (c, m) in mounts {
            ensure!(
                m.mount_path == h.mount_path,
                "container {}: hostPath {} at {}, expected {}",
                c.name,
                h.path,
                m.mount_path,
                h.mount_path
            );
            if h.read_only {
                ensure!(
                    m.read_only == Some(true),
                    "container {}: hostPath {} must be read-only",
                    c.name,
                    h.path
                );
            }
        }
    }

    // cnfs-csi node: command line, node name, and everything it works on mounted.
    let node = container(spec, "cnfs-csi")?;
    ensure!(
        args(node) == ["node", "--endpoint", ENDPOINT, "--node-id", "$(NODE_NAME)"],
        "cnfs-csi node args: {:?}",
        args(node)
    );
    let node_name = node
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    ensure!(
        node_name == Some("spec.nodeName"),
        "NODE_NAME must come from spec.nodeName, is {node_name:?}"
    );
    let mounted: BTreeMap<&str, bool> = node
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.mount_path.as_str(), m.read_only == Some(true)))
        .collect();
    for path in [SOCKET_DIR, "/var/lib/kubelet/pods", handoff::DEFAULT_ROOT] {
        ensure!(mounted.contains_key(path), "cnfs-csi node lacks {path}");
    }
    for kata in KATA_RUN_DIRS {
        ensure!(
            !mounted
                .keys()
                .any(|p| std::path::Path::new(p).starts_with(kata)
                    || std::path::Path::new(kata).starts_with(p)),
            "cnfs-csi node must not see Kata's sockets ({kata}): stats come through the shim's relay"
        );
    }

    // The registrar tells kubelet where this driver's socket is on the host.
    let reg = container(spec, "node-driver-registrar")?;
    let reg_args = args(reg);
    let registration =
        format!("--kubelet-registration-path=/var/lib/kubelet/plugins/{driver}/csi.sock");
    for a in ["--csi-address=/csi/csi.sock", registration.as_str()] {
        ensure!(reg_args.contains(&a), "registrar lacks {a}: {reg_args:?}");
    }

    // Only CNFS nodes, as the RuntimeClass documents them.
    let (key, value) = cnfs_node_label();
    let sel = spec.node_selector.clone().unwrap_or_default();
    ensure!(
        sel.get(&key) == Some(&value),
        "node plugin nodeSelector must be {key}={value}, is {sel:?}"
    );

    // No API access: no token in the pod.
    let sa_name = spec.service_account_name.as_deref().unwrap_or("default");
    let sa_automount = s
        .service_accounts
        .iter()
        .find(|a| name_of(&a.metadata) == sa_name && ns_of(&a.metadata) == NAMESPACE)
        .and_then(|a| a.automount_service_account_token);
    ensure!(
        spec.automount_service_account_token.or(sa_automount) == Some(false),
        "the node plugin calls no API: automountServiceAccountToken must be false"
    );
    Ok(())
}

/// The controller Deployment: unprivileged, non-root, no host path at all, the documented
/// command lines, its config from the ConfigMap.
fn check_controller(s: &Set) -> anyhow::Result<()> {
    let d = s
        .deployments
        .iter()
        .find(|d| name_of(&d.metadata) == CONTROLLER_DEPLOYMENT)
        .ok_or_else(|| anyhow!("no Deployment {CONTROLLER_DEPLOYMENT}"))?;
    ensure!(
        ns_of(&d.metadata) == NAMESPACE,
        "Deployment not in {NAMESPACE}"
    );
    let spec = d
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .context("Deployment has no pod spec")?;
    check_unprivileged(spec).context("controller")?;
    ensure!(
        spec.security_context
            .as_ref()
            .and_then(|s| s.run_as_non_root)
            == Some(true),
        "controller: runAsNonRoot must be true"
    );
    for c in all_containers(spec) {
        let uid = c.security_context.as_ref().and_then(|s| s.run_as_user);
        ensure!(
            uid != Some(0),
            "controller: container {} runs as root",
            c.name
        );
    }
    for v in spec.volumes.iter().flatten() {
        ensure!(
            v.host_path.is_none(),
            "controller: hostPath volume {} (it needs no host access)",
            v.name
        );
    }

    let ctl = container(spec, "cnfs-csi")?;
    ensure!(
        args(ctl)
            == [
                "controller",
                "--endpoint",
                ENDPOINT,
                "--config",
                "/etc/cnfs/csi.toml"
            ],
        "cnfs-csi controller args: {:?}",
        args(ctl)
    );
    let config_volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.config_map.as_ref().map(|c| c.name.as_str()) == Some(CONFIG_MAP))
        .ok_or_else(|| anyhow!("controller: no volume from ConfigMap {CONFIG_MAP}"))?;
    ensure!(
        ctl.volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == config_volume.name && m.mount_path == "/etc/cnfs"),
        "controller: ConfigMap {CONFIG_MAP} is not mounted at /etc/cnfs"
    );
    csi_toml(s)?;

    let socket_volume = ctl
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == SOCKET_DIR)
        .ok_or_else(|| anyhow!("controller: cnfs-csi has no {SOCKET_DIR}"))?;
    ensure!(
        spec.volumes
            .iter()
            .flatten()
            .any(|v| v.name == socket_volume.name && v.empty_dir.is_some()),
        "controller: the CSI socket directory must be an emptyDir"
    );

    let prov = container(spec, "csi-provisioner")?;
    for a in [
        "--csi-address=/csi/csi.sock",
        "--leader-election",
        "--extra-create-metadata",
        "--timeout=60s",
    ] {
        ensure!(
            args(prov).contains(&a),
            "csi-provisioner lacks {a}: {:?}",
            args(prov)
        );
    }
    let res = container(spec, "csi-resizer")?;
    for a in ["--csi-address=/csi/csi.sock", "--leader-election"] {
        ensure!(
            args(res).contains(&a),
            "csi-resizer lacks {a}: {:?}",
            args(res)
        );
    }
    for c in [prov, res] {
        ensure!(
            c.volume_mounts
                .iter()
                .flatten()
                .any(|m| m.name == socket_volume.name && m.mount_path == SOCKET_DIR),
            "{} does not share the CSI socket directory",
            c.name
        );
    }
    Ok(())
}

/// `csi.toml` from the ConfigMap, parsed.
fn csi_toml(s: &Set) -> anyhow::Result<toml::Table> {
    let cm = s
        .config_maps
        .iter()
        .find(|c| name_of(&c.metadata) == CONFIG_MAP && ns_of(&c.metadata) == NAMESPACE)
        .ok_or_else(|| anyhow!("no ConfigMap {NAMESPACE}/{CONFIG_MAP}"))?;
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get("csi.toml"))
        .ok_or_else(|| anyhow!("ConfigMap {CONFIG_MAP} has no csi.toml"))?;
    text.parse::<toml::Table>()
        .context("csi.toml in the ConfigMap is not TOML")
}

/// Images are pinned (a tag, never `latest`); sidecars come from sig-storage; cnfs-csi's
/// tag follows the workspace version.
fn check_images(s: &Set) -> anyhow::Result<()> {
    let specs = s
        .daemon_sets
        .iter()
        .filter_map(|d| d.spec.as_ref()?.template.spec.as_ref())
        .chain(
            s.deployments
                .iter()
                .filter_map(|d| d.spec.as_ref()?.template.spec.as_ref()),
        );
    for spec in specs {
        for c in all_containers(spec) {
            let image = c.image.as_deref().unwrap_or_default();
            let (repo, tag) = image
                .rsplit_once(':')
                .filter(|(_, t)| !t.contains('/'))
                .ok_or_else(|| anyhow!("container {}: image {image:?} has no tag", c.name))?;
            ensure!(
                tag != "latest",
                "container {}: image {image} is not pinned",
                c.name
            );
            if c.name == "cnfs-csi" {
                ensure!(
                    repo.ends_with("/cnfs-csi") && tag == env!("CARGO_PKG_VERSION"),
                    "cnfs-csi image {image}: expected .../cnfs-csi:{}",
                    env!("CARGO_PKG_VERSION")
                );
            } else {
                ensure!(
                    repo.starts_with("registry.k8s.io/sig-storage/"),
                    "container {}: sidecar image {image} not from registry.k8s.io/sig-storage",
                    c.name
                );
            }
        }
    }
    Ok(())
}

/// Why a StorageClass of file system `fs` names a secret, and the keys the driver requires
/// in it.
fn secret_keys(fs: &str, purpose: &str) -> Option<[&'static str; 2]> {
    match (fs, purpose) {
        ("smb", "provisioner" | "node-publish") => Some(["username", "password"]),
        (_, "provisioner" | "controller-expand") => Some(["adminID", "adminKey"]),
        (_, "node-publish") => Some(["userID", "userKey"]),
        _ => None,
    }
}

/// `csi.storage.k8s.io/` parameters external-provisioner knows (v5.2.0,
/// pkg/controller/controller.go); it refuses any other key with that prefix.
fn reserved_parameter(key: &str) -> bool {
    const SECRETS: [&str; 7] = [
        "",
        "provisioner-",
        "controller-publish-",
        "node-stage-",
        "node-publish-",
        "controller-expand-",
        "node-expand-",
    ];
    key == "fstype"
        || SECRETS
            .iter()
            .any(|p| key == format!("{p}secret-name") || key == format!("{p}secret-namespace"))
}

/// The secrets a StorageClass names: (purpose, namespace, name).
fn class_secrets(sc: &StorageClass) -> anyhow::Result<Vec<(String, String, String)>> {
    let params = sc.parameters.clone().unwrap_or_default();
    let mut out = Vec::new();
    for (k, _) in params.iter() {
        let Some(rest) = k.strip_prefix("csi.storage.k8s.io/") else {
            continue;
        };
        ensure!(
            reserved_parameter(rest),
            "parameter {k}: external-provisioner refuses unknown csi.storage.k8s.io/ keys"
        );
        let Some(purpose) = rest.strip_suffix("-secret-name") else {
            continue;
        };
        let name = &params[k];
        let ns = params
            .get(&format!("csi.storage.k8s.io/{purpose}-secret-namespace"))
            .ok_or_else(|| anyhow!("{k} without its -secret-namespace"))?;
        out.push((purpose.to_string(), ns.clone(), name.clone()));
    }
    for k in params.keys() {
        if let Some(purpose) = k
            .strip_prefix("csi.storage.k8s.io/")
            .and_then(|r| r.strip_suffix("-secret-namespace"))
        {
            ensure!(
                params.contains_key(&format!("csi.storage.k8s.io/{purpose}-secret-name")),
                "{k} without its -secret-name"
            );
        }
    }
    Ok(out)
}

/// A volume `source` in the annotations' URL grammar, validated as the host and guest do.
fn check_source(source: &str) -> anyhow::Result<()> {
    let url = volume_url::parse("csi", source).map_err(|e| anyhow!("source {source:?}: {e}"))?;
    let spec = if url.kind().is_some_and(|k| k.needs_secret()) {
        VolumeSpec::from_wire_unresolved(&url.wire)
    } else {
        VolumeSpec::from_wire(&url.wire)
    };
    spec.with_context(|| format!("source {source:?}"))?;
    Ok(())
}

/// StorageClasses: provisioned by this driver, parameters the driver and the provisioner
/// accept, expansion only where there is a quota, every named secret complete.
fn check_storage_classes(s: &Set, driver: &str) -> anyhow::Result<()> {
    ensure!(!s.storage_classes.is_empty(), "no StorageClass");
    let clusters = csi_toml(s)?;
    for sc in &s.storage_classes {
        let n = name_of(&sc.metadata);
        ensure!(
            sc.provisioner == driver,
            "StorageClass {n}: provisioner {:?}, the CSIDriver is {driver}",
            sc.provisioner
        );
        let p = sc.parameters.clone().unwrap_or_default();
        let get = |k: &str| {
            p.get(k)
                .map(String::as_str)
                .ok_or_else(|| anyhow!("StorageClass {n}: parameter {k} is missing"))
        };
        let secrets = class_secrets(sc).with_context(|| format!("StorageClass {n}"))?;
        ensure!(
            sc.volume_binding_mode.as_deref() == Some("Immediate"),
            "StorageClass {n}: volumeBindingMode must be Immediate"
        );
        match get("fs")? {
            "nfs" => {
                let (server, share, vers) = (get("server")?, get("share")?, get("vers")?);
                check_source(&format!("nfs://{server}{share}?vers={vers}"))
                    .with_context(|| format!("StorageClass {n}: server/share/vers"))?;
                let on_delete = get("onDelete")?;
                ensure!(
                    cnfs_csi::backend::OnDelete::parse(on_delete).is_some(),
                    "StorageClass {n}: onDelete {on_delete:?} is not retain, delete or archive"
                );
                ensure!(
                    sc.allow_volume_expansion == Some(false),
                    "StorageClass {n}: NFS has no quota, allowVolumeExpansion must be false"
                );
                ensure!(secrets.is_empty(), "StorageClass {n}: NFS reads no secrets");
            }
            "cephfs" => {
                let cluster = get("clusterID")?;
                table_has(&clusters, &["clusters", cluster]).with_context(|| {
                    format!("StorageClass {n}: clusterID {cluster} is not in csi.toml")
                })?;
                ensure!(!get("fsName")?.is_empty(), "StorageClass {n}: empty fsName");
                ensure!(
                    !get("subvolumeGroup")?.is_empty(),
                    "StorageClass {n}: empty subvolumeGroup"
                );
                ensure!(
                    sc.allow_volume_expansion == Some(true),
                    "StorageClass {n}: CephFS quotas grow, allowVolumeExpansion must be true"
                );
                let purposes: BTreeSet<&str> = secrets.iter().map(|s| s.0.as_str()).collect();
                for need in ["provisioner", "controller-expand", "node-publish"] {
                    ensure!(
                        purposes.contains(need),
                        "StorageClass {n}: CephFS needs a {need} secret"
                    );
                }
            }
            "smb" => {
                let (server, share) = (get("server")?, get("share")?);
                let sub = p.get("subDir").map(String::as_str).unwrap_or_default();
                let vers = get("vers")?;
                check_source(&format!("smb://{server}/{share}/{sub}?vers={vers}"))
                    .with_context(|| format!("StorageClass {n}: server/share/subDir/vers"))?;
                let on_delete = get("onDelete")?;
                ensure!(
                    ["retain", "delete"].contains(&on_delete),
                    "StorageClass {n}: onDelete {on_delete:?} is not retain or delete"
                );
                ensure!(
                    sc.allow_volume_expansion == Some(false),
                    "StorageClass {n}: SMB has no quota, allowVolumeExpansion must be false"
                );
                let purposes: BTreeSet<&str> = secrets.iter().map(|s| s.0.as_str()).collect();
                ensure!(
                    purposes == BTreeSet::from(["provisioner", "node-publish"]),
                    "StorageClass {n}: SMB needs a provisioner and a node-publish secret, has {purposes:?}"
                );
            }
            other => bail!("StorageClass {n}: fs {other:?} is not nfs, cephfs or smb"),
        }
        ensure!(
            sc.reclaim_policy.as_deref() == Some("Delete"),
            "StorageClass {n}: reclaimPolicy must be Delete"
        );
    }
    Ok(())
}

fn table_has(t: &toml::Table, path: &[&str]) -> anyhow::Result<()> {
    let mut cur = t;
    for (i, k) in path.iter().enumerate() {
        cur = cur
            .get(*k)
            .and_then(|v| v.as_table())
            .ok_or_else(|| anyhow!("no table {}", path[..=i].join(".")))?;
    }
    Ok(())
}

/// Every secret a StorageClass names is here as an example, with the keys the driver reads;
/// the key values are placeholders, never a real key.
fn check_secrets(s: &Set) -> anyhow::Result<()> {
    for sc in &s.storage_classes {
        let n = name_of(&sc.metadata);
        let fs = sc
            .parameters
            .as_ref()
            .and_then(|p| p.get("fs"))
            .map(String::as_str)
            .unwrap_or_default();
        for (purpose, ns, name) in class_secrets(sc)? {
            let keys = secret_keys(fs, &purpose)
                .ok_or_else(|| anyhow!("StorageClass {n}: cnfs-csi reads no {purpose} secret"))?;
            let secret = s
                .secrets
                .iter()
                .find(|x| name_of(&x.metadata) == name && ns_of(&x.metadata) == ns)
                .ok_or_else(|| {
                    anyhow!("StorageClass {n}: {purpose} secret {ns}/{name} is not in configs/csi")
                })?;
            let data = secret.string_data.clone().unwrap_or_default();
            ensure!(
                secret.data.is_none(),
                "Secret {ns}/{name}: use stringData with placeholders, not data"
            );
            for k in keys {
                let v = data
                    .get(k)
                    .ok_or_else(|| anyhow!("Secret {ns}/{name} lacks {k} ({purpose})"))?;
                ensure!(!v.is_empty(), "Secret {ns}/{name}: {k} is empty");
                if k.ends_with("Key") || k == "password" {
                    ensure!(
                        v.starts_with("REPLACE-"),
                        "Secret {ns}/{name}: {k} must be an obvious placeholder (REPLACE-...)"
                    );
                }
            }
        }
    }
    Ok(())
}

/// (apiGroup, resource, verbs) a sidecar needs.
type Need = (&'static str, &'static str, &'static [&'static str]);

/// external-provisioner v5.2.0 (deploy/kubernetes/rbac.yaml), without snapshots and capacity.
const PROVISIONER_NEEDS: [Need; 7] = [
    (
        "",
        "persistentvolumes",
        &["get", "list", "watch", "create", "delete", "patch"],
    ),
    (
        "",
        "persistentvolumeclaims",
        &["get", "list", "watch", "update"],
    ),
    (
        "storage.k8s.io",
        "storageclasses",
        &["get", "list", "watch"],
    ),
    (
        "",
        "events",
        &["list", "watch", "create", "update", "patch"],
    ),
    ("storage.k8s.io", "csinodes", &["get", "list", "watch"]),
    ("", "nodes", &["get", "list", "watch"]),
    (
        "storage.k8s.io",
        "volumeattachments",
        &["get", "list", "watch"],
    ),
];
/// external-resizer v1.13.2 (deploy/kubernetes/rbac.yaml), without pods (see
/// RESIZER_POD_NEEDS) and VolumeAttributesClasses (feature gate off).
const RESIZER_NEEDS: [Need; 4] = [
    ("", "persistentvolumes", &["get", "list", "watch", "patch"]),
    ("", "persistentvolumeclaims", &["get", "list", "watch"]),
    ("", "persistentvolumeclaims/status", &["patch"]),
    (
        "",
        "events",
        &["list", "watch", "create", "update", "patch"],
    ),
];
/// Unless run with --handle-volume-inuse-error=false, the resizer watches all pods.
const RESIZER_POD_NEEDS: Need = ("", "pods", &["get", "list", "watch"]);
/// --leader-election: leases in the pod's namespace.
const LEADER_NEEDS: Need = (
    "coordination.k8s.io",
    "leases",
    &["get", "watch", "list", "delete", "update", "create"],
);

fn rule_allows(
    r: &PolicyRule,
    group: &str,
    resource: &str,
    verb: &str,
    name: Option<&str>,
) -> bool {
    let has = |v: &Option<Vec<String>>, x: &str| v.iter().flatten().any(|s| s == x || s == "*");
    has(&r.api_groups, group)
        && has(&r.resources, resource)
        && r.verbs.iter().any(|v| v == verb || v == "*")
        && match (&r.resource_names, name) {
            (None, _) => true,
            (Some(names), _) if names.is_empty() => true,
            (Some(names), Some(n)) => names.iter().any(|x| x == n),
            (Some(_), None) => false,
        }
}

fn is_sa(subj: &Subject, ns: &str, name: &str) -> bool {
    subj.kind == "ServiceAccount" && subj.name == name && subj.namespace.as_deref() == Some(ns)
}

/// Does ServiceAccount `sa_ns/sa` hold `verb` on `group/resource` (in namespace `in_ns`, or
/// cluster-wide when `None`), for object `name` if given?
fn allowed(
    s: &Set,
    (sa_ns, sa): (&str, &str),
    in_ns: Option<&str>,
    (group, resource, verb): (&str, &str, &str),
    name: Option<&str>,
) -> bool {
    let cluster_rules = |role: &str| -> Vec<&PolicyRule> {
        s.cluster_roles
            .iter()
            .filter(|r| name_of(&r.metadata) == role)
            .flat_map(|r| r.rules.iter().flatten())
            .collect()
    };
    let via_cluster = s
        .cluster_role_bindings
        .iter()
        .filter(|b| b.subjects.iter().flatten().any(|x| is_sa(x, sa_ns, sa)))
        .filter(|b| b.role_ref.kind == "ClusterRole")
        .flat_map(|b| cluster_rules(&b.role_ref.name))
        .any(|r| rule_allows(r, group, resource, verb, name));
    if via_cluster {
        return true;
    }
    let Some(ns) = in_ns else { return false };
    s.role_bindings
        .iter()
        .filter(|b| ns_of(&b.metadata) == ns)
        .filter(|b| b.subjects.iter().flatten().any(|x| is_sa(x, sa_ns, sa)))
        .flat_map(|b| match b.role_ref.kind.as_str() {
            "ClusterRole" => cluster_rules(&b.role_ref.name),
            _ => s
                .roles
                .iter()
                .filter(|r| name_of(&r.metadata) == b.role_ref.name && ns_of(&r.metadata) == ns)
                .flat_map(|r| r.rules.iter().flatten())
                .collect(),
        })
        .any(|r| rule_allows(r, group, resource, verb, name))
}

/// Every workload's ServiceAccount exists; the controller's holds what its sidecars need
/// (leases when electing a leader, the StorageClasses' controller secrets by name); the node
/// plugin's holds nothing; bindings point at roles and accounts that exist; no wildcard and
/// no cluster-wide secret access.
fn check_rbac(s: &Set) -> anyhow::Result<()> {
    let sa_exists = |ns: &str, name: &str| {
        s.service_accounts
            .iter()
            .any(|a| name_of(&a.metadata) == name && ns_of(&a.metadata) == ns)
    };
    let workloads: Vec<(&str, &str, &PodSpec)> = s
        .daemon_sets
        .iter()
        .filter_map(|d| {
            Some((
                ns_of(&d.metadata),
                name_of(&d.metadata),
                d.spec.as_ref()?.template.spec.as_ref()?,
            ))
        })
        .chain(s.deployments.iter().filter_map(|d| {
            Some((
                ns_of(&d.metadata),
                name_of(&d.metadata),
                d.spec.as_ref()?.template.spec.as_ref()?,
            ))
        }))
        .collect();
    for (ns, name, spec) in &workloads {
        let sa = spec
            .service_account_name
            .as_deref()
            .ok_or_else(|| anyhow!("{ns}/{name}: no serviceAccountName (never the default)"))?;
        ensure!(
            sa_exists(ns, sa),
            "{ns}/{name}: ServiceAccount {ns}/{sa} is not defined"
        );
        ensure!(
            s.namespaces.iter().any(|n| name_of(&n.metadata) == *ns),
            "{ns}/{name}: Namespace {ns} is not defined"
        );
    }

    // Bindings point at what exists.
    for b in &s.cluster_role_bindings {
        let n = name_of(&b.metadata);
        ensure!(
            b.role_ref.kind == "ClusterRole"
                && s.cluster_roles
                    .iter()
                    .any(|r| name_of(&r.metadata) == b.role_ref.name),
            "ClusterRoleBinding {n}: ClusterRole {} is not defined",
            b.role_ref.name
        );
        for x in b.subjects.iter().flatten() {
            let ns = x.namespace.as_deref().unwrap_or_default();
            ensure!(
                x.kind == "ServiceAccount" && sa_exists(ns, &x.name),
                "ClusterRoleBinding {n}: subject {ns}/{} is not a ServiceAccount defined here",
                x.name
            );
        }
    }
    for b in &s.role_bindings {
        let (n, ns) = (name_of(&b.metadata), ns_of(&b.metadata));
        let exists = match b.role_ref.kind.as_str() {
            "Role" => s
                .roles
                .iter()
                .any(|r| name_of(&r.metadata) == b.role_ref.name && ns_of(&r.metadata) == ns),
            _ => s
                .cluster_roles
                .iter()
                .any(|r| name_of(&r.metadata) == b.role_ref.name),
        };
        ensure!(
            exists,
            "RoleBinding {ns}/{n}: {} {} is not defined",
            b.role_ref.kind,
            b.role_ref.name
        );
        for x in b.subjects.iter().flatten() {
            let sns = x.namespace.as_deref().unwrap_or_default();
            ensure!(
                x.kind == "ServiceAccount" && sa_exists(sns, &x.name),
                "RoleBinding {ns}/{n}: subject {sns}/{} is not a ServiceAccount defined here",
                x.name
            );
        }
    }

    // Least privilege: no wildcards, no cluster-wide secrets.
    let all_rules = s
        .cluster_roles
        .iter()
        .map(|r| (name_of(&r.metadata), true, &r.rules))
        .chain(
            s.roles
                .iter()
                .map(|r| (name_of(&r.metadata), false, &r.rules)),
        );
    for (n, cluster, rules) in all_rules {
        for r in rules.iter().flatten() {
            let lists = [&r.api_groups, &r.resources, &Some(r.verbs.clone())];
            ensure!(
                !lists.iter().any(|l| l.iter().flatten().any(|x| x == "*")),
                "role {n}: wildcard rule {r:?}"
            );
            ensure!(
                !(cluster && r.resources.iter().flatten().any(|x| x == "secrets")),
                "ClusterRole {n} grants secrets: grant them by name in the secrets' namespace"
            );
        }
    }

    // The controller: what its sidecars need.
    let (_, _, ctl) = workloads
        .iter()
        .find(|(ns, n, _)| *ns == NAMESPACE && *n == CONTROLLER_DEPLOYMENT)
        .ok_or_else(|| anyhow!("no Deployment {CONTROLLER_DEPLOYMENT}"))?;
    let ctl_sa = (
        NAMESPACE,
        ctl.service_account_name.as_deref().unwrap_or_default(),
    );
    let mut needs: Vec<(&str, Need)> = Vec::new();
    let mut leader = false;
    for c in &ctl.containers {
        let a = args(c);
        match c.name.as_str() {
            "csi-provisioner" => needs.extend(PROVISIONER_NEEDS.map(|n| ("csi-provisioner", n))),
            "csi-resizer" => {
                needs.extend(RESIZER_NEEDS.map(|n| ("csi-resizer", n)));
                if !a.contains(&"--handle-volume-inuse-error=false") {
                    needs.push(("csi-resizer", RESIZER_POD_NEEDS));
                }
            }
            _ => {}
        }
        leader |= a.contains(&"--leader-election");
        ensure!(
            !a.iter()
                .any(|x| x.starts_with("--leader-election-namespace")),
            "{}: another leader election namespace needs its own Role; extend this test",
            c.name
        );
    }
    for (who, (group, resource, verbs)) in &needs {
        for verb in *verbs {
            ensure!(
                allowed(s, ctl_sa, None, (group, resource, verb), None),
                "{who}: ServiceAccount {}/{} may not {verb} {resource} (group {group:?})",
                ctl_sa.0,
                ctl_sa.1
            );
        }
    }
    if leader {
        let (group, resource, verbs) = LEADER_NEEDS;
        for verb in verbs {
            ensure!(
                allowed(s, ctl_sa, Some(NAMESPACE), (group, resource, verb), None),
                "leader election: {}/{} may not {verb} {resource} in {NAMESPACE}",
                ctl_sa.0,
                ctl_sa.1
            );
        }
    }
    for sc in &s.storage_classes {
        for (purpose, ns, name) in class_secrets(sc)? {
            if purpose == "node-publish" {
                continue; // kubelet reads it, through the node authorizer
            }
            ensure!(
                allowed(s, ctl_sa, Some(&ns), ("", "secrets", "get"), Some(&name)),
                "StorageClass {}: the controller may not get its {purpose} secret {ns}/{name}",
                name_of(&sc.metadata)
            );
        }
    }

    // The node plugin: bound to nothing.
    let (_, _, node) = workloads
        .iter()
        .find(|(ns, n, _)| *ns == NAMESPACE && *n == NODE_DAEMONSET)
        .ok_or_else(|| anyhow!("no DaemonSet {NODE_DAEMONSET}"))?;
    let node_sa = node.service_account_name.as_deref().unwrap_or_default();
    let bound = s
        .cluster_role_bindings
        .iter()
        .flat_map(|b| b.subjects.iter().flatten())
        .chain(
            s.role_bindings
                .iter()
                .flat_map(|b| b.subjects.iter().flatten()),
        )
        .any(|x| is_sa(x, NAMESPACE, node_sa));
    ensure!(
        !bound,
        "the node plugin's ServiceAccount {node_sa} is bound to a role: it needs none"
    );
    Ok(())
}

/// Example pods: the CNFS RuntimeClass, and only volumes of this driver, each resolvable
/// (PVC → StorageClass of this driver, or PVC → PV of this driver) with a valid `source`.
fn check_examples(s: &Set, driver: &str, runtime_class: &str) -> anyhow::Result<()> {
    ensure!(!s.pods.is_empty(), "no example Pod");
    for pv in &s.pvs {
        let n = name_of(&pv.metadata);
        let csi = pv
            .spec
            .as_ref()
            .and_then(|s| s.csi.as_ref())
            .ok_or_else(|| anyhow!("PersistentVolume {n}: not a CSI volume"))?;
        ensure!(
            csi.driver == driver,
            "PersistentVolume {n}: driver {}",
            csi.driver
        );
        ensure!(
            !csi.volume_handle.is_empty(),
            "PersistentVolume {n}: no volumeHandle"
        );
        check_volume_attributes(csi.volume_attributes.as_ref())
            .with_context(|| format!("PersistentVolume {n}"))?;
    }
    for pod in &s.pods {
        let (ns, n) = (ns_of(&pod.metadata), name_of(&pod.metadata));
        let spec = pod.spec.as_ref().context("Pod without spec")?;
        ensure!(
            spec.runtime_class_name.as_deref() == Some(runtime_class),
            "Pod {ns}/{n}: runtimeClassName must be {runtime_class} (configs/kubernetes/runtimeclass.yaml), is {:?}",
            spec.runtime_class_name
        );
        let mut cnfs_volumes = 0;
        for v in spec.volumes.iter().flatten() {
            if let Some(csi) = &v.csi {
                ensure!(
                    csi.driver == driver,
                    "Pod {ns}/{n}: inline driver {}",
                    csi.driver
                );
                check_volume_attributes(csi.volume_attributes.as_ref())
                    .with_context(|| format!("Pod {ns}/{n}, volume {}", v.name))?;
                cnfs_volumes += 1;
            } else if let Some(claim) = &v.persistent_volume_claim {
                check_claim(s, ns, &claim.claim_name, driver)
                    .with_context(|| format!("Pod {ns}/{n}, volume {}", v.name))?;
                cnfs_volumes += 1;
            }
        }
        ensure!(cnfs_volumes > 0, "Pod {ns}/{n} uses no {driver} volume");
    }
    Ok(())
}

/// Volume context as people write it: `source` only, valid.
fn check_volume_attributes(attrs: Option<&BTreeMap<String, String>>) -> anyhow::Result<()> {
    let attrs = attrs.cloned().unwrap_or_default();
    let keys: Vec<&str> = attrs.keys().map(String::as_str).collect();
    ensure!(
        keys == ["source"],
        "volumeAttributes must be exactly `source`, are {keys:?}"
    );
    check_source(&attrs["source"])
}

/// A PVC in `ns` that ends at this driver: through a StorageClass or a PV.
fn check_claim(s: &Set, ns: &str, claim: &str, driver: &str) -> anyhow::Result<()> {
    let pvc = s
        .pvcs
        .iter()
        .find(|p| name_of(&p.metadata) == claim && ns_of(&p.metadata) == ns)
        .ok_or_else(|| anyhow!("PVC {ns}/{claim} is not defined"))?;
    let spec = pvc.spec.as_ref().context("PVC without spec")?;
    match (spec.volume_name.as_deref(), spec.storage_class_name.as_deref()) {
        (Some(pv_name), Some("")) => {
            let pv = s
                .pvs
                .iter()
                .find(|p| name_of(&p.metadata) == pv_name)
                .ok_or_else(|| anyhow!("PVC {ns}/{claim}: PV {pv_name} is not defined"))?;
            let pv_spec = pv.spec.as_ref().context("PV without spec")?;
            ensure!(
                pv_spec.storage_class_name.as_deref().unwrap_or_default().is_empty(),
                "PV {pv_name}: a static PV has no class"
            );
            if let Some(r) = &pv_spec.claim_ref {
                ensure!(
                    r.namespace.as_deref() == Some(ns) && r.name.as_deref() == Some(claim),
                    "PV {pv_name} is reserved for another claim: {r:?}"
                );
            }
            let d = pv_spec.csi.as_ref().map(|c| c.driver.as_str());
            ensure!(d == Some(driver), "PV {pv_name}: driver {d:?}");
        }
        (Some(pv), class) => bail!(
            "PVC {ns}/{claim}: volumeName {pv} with storageClassName {class:?}: set \"\" so that the default class does not apply"
        ),
        (None, Some(class)) => {
            let sc = s
                .storage_classes
                .iter()
                .find(|c| name_of(&c.metadata) == class)
                .ok_or_else(|| anyhow!("PVC {ns}/{claim}: StorageClass {class} is not defined"))?;
            ensure!(sc.provisioner == driver, "StorageClass {class}: provisioner {}", sc.provisioner);
        }
        (None, None) => bail!("PVC {ns}/{claim}: no storageClassName (the cluster default would apply)"),
    }
    Ok(())
}

/// Everything, as the regression table uses it.
fn check_all(s: &Set) -> anyhow::Result<()> {
    let driver = check_csi_driver(s)?;
    check_node_plugin(s, &driver)?;
    check_controller(s)?;
    check_images(s)?;
    check_storage_classes(s, &driver)?;
    check_secrets(s)?;
    check_rbac(s)?;
    check_examples(s, &driver, &cnfs_runtime_class_name())?;
    Ok(())
}

fn cnfs_runtime_class_name() -> String {
    cnfs_runtime_class()
        .metadata
        .name
        .expect("RuntimeClass name")
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[test]
fn every_manifest_is_a_kubernetes_object_without_unknown_fields() {
    let docs = raw_docs();
    let s = typed(&docs).unwrap_or_else(|e| panic!("{e:#}"));
    let count = |f: &str| docs.iter().filter(|d| d.file == f).count();
    for f in FILES {
        assert!(count(f) > 0, "configs/csi/{f} holds no object");
    }
    // Every namespaced object of the driver lives in its namespace, which is defined.
    assert_eq!(
        s.namespaces
            .iter()
            .map(|n| name_of(&n.metadata))
            .collect::<Vec<_>>(),
        [NAMESPACE]
    );
    eprintln!(
        "{} documents in {} files",
        docs.len(),
        docs.iter().map(|d| &d.file).collect::<BTreeSet<_>>().len()
    );
}

#[test]
fn csi_driver_attaches_nothing_and_passes_pod_info() -> anyhow::Result<()> {
    assert_eq!(check_csi_driver(&load())?, DRIVER);
    Ok(())
}

#[test]
fn node_plugin_is_unprivileged_and_mounts_only_the_documented_host_paths() -> anyhow::Result<()> {
    check_node_plugin(&load(), DRIVER)
}

#[test]
fn controller_is_unprivileged_non_root_and_uses_no_host_path() -> anyhow::Result<()> {
    let s = load();
    check_controller(&s)?;
    check_images(&s)
}

#[test]
fn storage_classes_use_this_driver_with_parameters_it_accepts() -> anyhow::Result<()> {
    let s = load();
    check_storage_classes(&s, DRIVER)?;
    let fs: BTreeSet<String> = s
        .storage_classes
        .iter()
        .filter_map(|c| c.parameters.as_ref()?.get("fs").cloned())
        .collect();
    assert_eq!(
        fs,
        BTreeSet::from(["cephfs".into(), "nfs".into(), "smb".into()])
    );
    Ok(())
}

#[test]
fn storage_class_secrets_exist_with_the_keys_the_driver_reads() -> anyhow::Result<()> {
    let s = load();
    check_secrets(&s)?;
    let named: usize = s
        .storage_classes
        .iter()
        .map(|c| class_secrets(c).unwrap().len())
        .sum();
    assert!(named >= 3, "the CephFS class names its three secrets");
    Ok(())
}

#[test]
fn service_accounts_exist_with_the_rbac_their_sidecars_need() -> anyhow::Result<()> {
    check_rbac(&load())
}

#[test]
fn example_pods_use_the_cnfs_runtime_class_and_valid_volumes() -> anyhow::Result<()> {
    let s = load();
    let rc = cnfs_runtime_class_name();
    assert_eq!(rc, "kata-cnfs");
    check_examples(&s, DRIVER, &rc)?;
    // One of each way to get a volume: provisioned (both classes), static, inline.
    let inline = s
        .pods
        .iter()
        .flat_map(|p| p.spec.iter().flat_map(|s| s.volumes.iter().flatten()))
        .filter(|v| v.csi.is_some())
        .count();
    assert!(inline >= 1 && s.pvs.len() == 1 && s.pvcs.len() >= 3);
    Ok(())
}

/// One change to a manifest, at a path (see [`at`]).
enum Op {
    Set(Json),
    Remove,
    Push(Json),
    Rename(&'static str),
    RemoveItem(&'static str),
}

/// The node `path` of `doc`: segments separated by `/` (`~1` for a `/` inside a key); in an
/// array, a segment is an index or `key=value` (the element whose `key` is `value`). A
/// leading `$name` stands for `spec/template/spec/containers/name=<name>`.
fn at<'a>(doc: &'a mut Json, path: &str) -> &'a mut Json {
    let path = match path.strip_prefix('$') {
        Some(rest) => {
            let (c, rest) = rest.split_once('/').unwrap_or((rest, ""));
            format!("spec/template/spec/containers/name={c}/{rest}")
        }
        None => path.to_string(),
    };
    let mut cur = doc;
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        cur = select(cur, seg).unwrap_or_else(|| panic!("no {seg:?} in {path}"));
    }
    cur
}

fn select<'a>(node: &'a mut Json, seg: &str) -> Option<&'a mut Json> {
    match node {
        Json::Array(items) => match seg.split_once('=') {
            Some((k, v)) => items
                .iter_mut()
                .find(|x| x[k] == v.replace("~1", "/").as_str()),
            None => items.get_mut(seg.parse::<usize>().ok()?),
        },
        Json::Object(o) => o.get_mut(&seg.replace("~1", "/")),
        _ => None,
    }
}

fn apply(doc: &mut Json, path: &str, op: &Op) {
    let (parent, last) = path.rsplit_once('/').unwrap_or(("", path));
    let parent = at(doc, parent);
    let key = last.replace("~1", "/");
    match op {
        Op::Set(v) => match parent.as_object_mut() {
            Some(o) => {
                o.insert(key, v.clone());
            }
            None => *select(parent, last).expect("no such element") = v.clone(),
        },
        Op::Remove => {
            let o = parent.as_object_mut().expect("an object");
            o.remove(&key)
                .unwrap_or_else(|| panic!("nothing at {path}"));
        }
        Op::Push(v) => select(parent, last)
            .and_then(Json::as_array_mut)
            .expect("an array")
            .push(v.clone()),
        Op::Rename(new) => {
            let o = parent.as_object_mut().expect("an object");
            let v = o
                .remove(&key)
                .unwrap_or_else(|| panic!("nothing at {path}"));
            o.insert(new.to_string(), v);
        }
        Op::RemoveItem(item) => {
            let a = select(parent, last)
                .and_then(Json::as_array_mut)
                .expect("an array");
            let before = a.len();
            a.retain(|x| x != item);
            assert_ne!(a.len(), before, "no {item:?} in {path}");
        }
    }
}

#[test]
fn every_regression_fails_a_check() {
    use serde_json::json;
    use Op::*;
    let originals = raw_docs();
    check_all(&typed(&originals).unwrap()).expect("the manifests as committed pass");

    const DS: &str = "DaemonSet";
    const DEP: &str = "Deployment";
    const SC: &str = "StorageClass";
    // (what, kind, name, path, change, words the error must contain)
    #[rustfmt::skip]
    let table: Vec<(&str, &str, &str, &str, Op, &str)> = vec![
        // The node plugin.
        ("node privileged", DS, NODE_DAEMONSET, "$cnfs-csi/securityContext/privileged", Set(json!(true)), "privileged must be false"),
        ("node adds SYS_ADMIN", DS, NODE_DAEMONSET, "$cnfs-csi/securityContext/capabilities/add", Set(json!(["SYS_ADMIN"])), "adds capabilities"),
        ("node keeps capabilities", DS, NODE_DAEMONSET, "$cnfs-csi/securityContext/capabilities/drop", Set(json!(["NET_RAW"])), "drop ALL"),
        ("registrar escalates", DS, NODE_DAEMONSET, "$node-driver-registrar/securityContext/allowPrivilegeEscalation", Set(json!(true)), "allowPrivilegeEscalation"),
        ("probe without securityContext", DS, NODE_DAEMONSET, "$liveness-probe/securityContext", Remove, "no securityContext"),
        ("writable root fs", DS, NODE_DAEMONSET, "$cnfs-csi/securityContext/readOnlyRootFilesystem", Set(json!(false)), "readOnlyRootFilesystem"),
        ("unconfined seccomp", DS, NODE_DAEMONSET, "$cnfs-csi/securityContext/seccompProfile/type", Set(json!("Unconfined")), "seccomp"),
        ("Bidirectional", DS, NODE_DAEMONSET, "$cnfs-csi/volumeMounts/mountPath=~1var~1lib~1kubelet~1pods/mountPropagation", Set(json!("Bidirectional")), "Bidirectional"),
        ("HostToContainer", DS, NODE_DAEMONSET, "$cnfs-csi/volumeMounts/mountPath=~1var~1lib~1kubelet~1pods/mountPropagation", Set(json!("HostToContainer")), "mountPropagation HostToContainer"),
        ("hostNetwork", DS, NODE_DAEMONSET, "spec/template/spec/hostNetwork", Set(json!(true)), "hostNetwork"),
        ("hostPID", DS, NODE_DAEMONSET, "spec/template/spec/hostPID", Set(json!(true)), "hostPID"),
        ("host port", DS, NODE_DAEMONSET, "$cnfs-csi/ports/0/hostPort", Set(json!(9808)), "hostPort"),
        ("host root mounted", DS, NODE_DAEMONSET, "spec/template/spec/volumes", Push(json!({"name": "root", "hostPath": {"path": "/"}})), "hostPath volumes are"),
        ("Kata sockets mounted", DS, NODE_DAEMONSET, "$cnfs-csi/volumeMounts", Push(json!({"name": "pods-dir", "mountPath": "/run/vc", "readOnly": true})), "at /run/vc"),
        ("pods dir elsewhere", DS, NODE_DAEMONSET, "$cnfs-csi/volumeMounts/mountPath=~1var~1lib~1kubelet~1pods/mountPath", Set(json!("/pods")), "expected /var/lib/kubelet/pods"),
        ("any node", DS, NODE_DAEMONSET, "spec/template/spec/nodeSelector", Remove, "nodeSelector"),
        ("node token", DS, NODE_DAEMONSET, "spec/template/spec/automountServiceAccountToken", Set(json!(true)), "automountServiceAccountToken"),
        ("node args", DS, NODE_DAEMONSET, "$cnfs-csi/args/4", Set(json!("node-1")), "cnfs-csi node args"),
        ("registrar names another socket", DS, NODE_DAEMONSET, "$node-driver-registrar/args/1", Set(json!("--kubelet-registration-path=/var/lib/kubelet/plugins/other/csi.sock")), "registrar lacks"),
        // The controller.
        ("controller privileged", DEP, CONTROLLER_DEPLOYMENT, "$csi-provisioner/securityContext/privileged", Set(json!(true)), "privileged must be false"),
        ("controller as root", DEP, CONTROLLER_DEPLOYMENT, "$csi-resizer/securityContext/runAsUser", Set(json!(0)), "runs as root"),
        ("controller unsafe sysctl", DEP, CONTROLLER_DEPLOYMENT, "spec/template/spec/securityContext/sysctls/0/name", Set(json!("net.ipv4.ip_forward")), "safe sysctls"),
        ("controller host path", DEP, CONTROLLER_DEPLOYMENT, "spec/template/spec/volumes/name=socket-dir", Set(json!({"name": "socket-dir", "hostPath": {"path": "/run/csi"}})), "hostPath"),
        ("controller config elsewhere", DEP, CONTROLLER_DEPLOYMENT, "$cnfs-csi/args/4", Set(json!("/etc/csi.toml")), "cnfs-csi controller args"),
        ("unpinned image", DEP, CONTROLLER_DEPLOYMENT, "$csi-resizer/image", Set(json!("registry.k8s.io/sig-storage/csi-resizer:latest")), "not pinned"),
        ("no leader election", DEP, CONTROLLER_DEPLOYMENT, "$csi-provisioner/args", RemoveItem("--leader-election"), "csi-provisioner lacks --leader-election"),
        // The CSIDriver.
        ("attachRequired", "CSIDriver", DRIVER, "spec/attachRequired", Set(json!(true)), "attachRequired"),
        ("no pod info", "CSIDriver", DRIVER, "spec/podInfoOnMount", Set(json!(false)), "podInfoOnMount"),
        ("fsGroup handled", "CSIDriver", DRIVER, "spec/fsGroupPolicy", Set(json!("File")), "fsGroupPolicy"),
        ("no inline volumes", "CSIDriver", DRIVER, "spec/volumeLifecycleModes", Set(json!(["Persistent"])), "volumeLifecycleModes"),
        // StorageClasses and their secrets.
        ("other provisioner", SC, "cnfs-nfs", "provisioner", Set(json!("nfs.csi.k8s.io")), "provisioner \"nfs.csi.k8s.io\""),
        ("bad onDelete", SC, "cnfs-nfs", "parameters/onDelete", Set(json!("shred")), "onDelete"),
        ("bad NFS version", SC, "cnfs-nfs", "parameters/vers", Set(json!("5")), "server/share/vers"),
        ("NFS expansion", SC, "cnfs-nfs", "allowVolumeExpansion", Set(json!(true)), "no quota"),
        ("unknown Ceph cluster", SC, "cnfs-cephfs", "parameters/clusterID", Set(json!("ceph-test")), "not in csi.toml"),
        ("reserved parameter typo", SC, "cnfs-cephfs", "parameters/csi.storage.k8s.io~1node-publish-secret-nmae", Set(json!("x")), "unknown csi.storage.k8s.io/"),
        ("secret without namespace", SC, "cnfs-cephfs", "parameters/csi.storage.k8s.io~1node-publish-secret-namespace", Remove, "without its -secret-namespace"),
        ("no expand secret", SC, "cnfs-cephfs", "parameters/csi.storage.k8s.io~1controller-expand-secret-name", Remove, "without its -secret-name"),
        ("missing user secret", "Secret", "cnfs-ceph-user", "metadata/name", Set(json!("cnfs-ceph-user-old")), "is not in configs/csi"),
        ("wrong key name", "Secret", "cnfs-ceph-admin", "stringData/adminKey", Rename("key"), "lacks adminKey"),
        ("real-looking key", "Secret", "cnfs-ceph-user", "stringData/userKey", Set(json!("AQBvaBFZAAAAABAA9VHgwCg3rWn8fMaX8KL01A==")), "placeholder"),
        ("SMB archive", SC, "cnfs-smb", "parameters/onDelete", Set(json!("archive")), "not retain or delete"),
        ("SMB1", SC, "cnfs-smb", "parameters/vers", Set(json!("1.0")), "server/share/subDir/vers"),
        ("real-looking SMB password", "Secret", "cnfs-smb-creds", "stringData/password", Set(json!("hunter2")), "placeholder"),
        ("unknown Ceph cluster in csi.toml", "ConfigMap", CONFIG_MAP, "data/csi.toml", Set(json!("[clusters.other]\n")), "not in csi.toml"),
        // RBAC.
        ("provisioner binding to another account", "ClusterRoleBinding", "cnfs-csi-provisioner", "subjects/0/name", Set(json!("someone-else")), "not a ServiceAccount defined here"),
        ("provisioner cannot create PVs", "ClusterRole", "cnfs-csi-provisioner", "rules/0/verbs", RemoveItem("create"), "may not create persistentvolumes"),
        ("resizer cannot patch PVC status", "ClusterRole", "cnfs-csi-resizer", "rules/2/verbs", RemoveItem("patch"), "may not patch persistentvolumeclaims/status"),
        ("resizer watches pods without RBAC", DEP, CONTROLLER_DEPLOYMENT, "$csi-resizer/args", RemoveItem("--handle-volume-inuse-error=false"), "may not get pods"),
        ("no leases", "Role", "cnfs-csi-leader-election", "rules/0/resources", Set(json!(["configmaps"])), "leader election"),
        ("admin secret unreadable", "Role", "cnfs-csi-controller-secrets", "rules/0/resourceNames", Set(json!(["cnfs-ceph-other"])), "may not get its"),
        ("secrets cluster-wide", "ClusterRole", "cnfs-csi-resizer", "rules", Push(json!({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]})), "grants secrets"),
        ("wildcard verbs", "ClusterRole", "cnfs-csi-resizer", "rules/0/verbs", Set(json!(["*"])), "wildcard"),
        ("node plugin bound", "RoleBinding", "cnfs-csi-leader-election", "subjects", Push(json!({"kind": "ServiceAccount", "name": "cnfs-csi-node", "namespace": NAMESPACE})), "needs none"),
        ("controller account missing", "ServiceAccount", "cnfs-csi-controller", "metadata/name", Set(json!("cnfs-csi-ctl")), "ServiceAccount cnfs-system/cnfs-csi-controller is not defined"),
        ("binding to a missing role", "RoleBinding", "cnfs-csi-controller-secrets", "roleRef/name", Set(json!("cnfs-csi-secrets")), "is not defined"),
        // Example pods and volumes.
        ("pod on runc", "Pod", "cnfs-nfs-app", "spec/runtimeClassName", Set(json!("runc")), "runtimeClassName must be kata-cnfs"),
        ("pod without runtime class", "Pod", "cnfs-inline-scratch", "spec/runtimeClassName", Remove, "runtimeClassName must be kata-cnfs"),
        ("inline option not allowed", "Pod", "cnfs-inline-scratch", "spec/volumes/0/csi/volumeAttributes/source", Set(json!("nfs://10.0.0.5/exports/scratch?vers=4.1&bogus=1")), "source"),
        ("inline attribute typo", "Pod", "cnfs-inline-scratch", "spec/volumes/0/csi/volumeAttributes/source", Rename("sorce"), "exactly `source`"),
        ("inline other driver", "Pod", "cnfs-inline-scratch", "spec/volumes/0/csi/driver", Set(json!("nfs.csi.k8s.io")), "inline driver"),
        ("static source not a volume URL", "PersistentVolume", "cnfs-static-data", "spec/csi/volumeAttributes/source", Set(json!("ftp://10.0.0.5/data")), "source"),
        ("static PV for another claim", "PersistentVolume", "cnfs-static-data", "spec/claimRef/name", Set(json!("other")), "reserved for another claim"),
        ("PVC of an unknown class", "PersistentVolumeClaim", "cnfs-nfs-data", "spec/storageClassName", Set(json!("standard")), "StorageClass standard is not defined"),
        ("static PVC takes the default class", "PersistentVolumeClaim", "cnfs-static-data", "spec/storageClassName", Remove, "storageClassName"),
        ("PVC missing", "PersistentVolumeClaim", "cnfs-cephfs-data", "metadata/name", Set(json!("cnfs-cephfs-old")), "PVC team-a/cnfs-cephfs-data is not defined"),
        // A manifest the API would not take as written.
        ("misspelled field", DS, NODE_DAEMONSET, "$cnfs-csi/securityContext/privilegd", Set(json!(true)), "privilegd (unknown field)"),
        ("string for a bool", "CSIDriver", DRIVER, "spec/attachRequired", Set(json!("false")), "not a valid object"),
    ];

    let mut failures = Vec::new();
    for (what, kind, name, path, op, expect) in &table {
        let mut docs = originals.clone();
        let doc = docs
            .iter_mut()
            .find(|d| d.kind() == *kind && d.name() == *name)
            .unwrap_or_else(|| panic!("{what}: no {kind} {name}"));
        apply(&mut doc.json, path, op);
        match typed(&docs).and_then(|s| check_all(&s)) {
            Ok(()) => failures.push(format!("{what}: passed every check")),
            Err(e) if !format!("{e:#}").contains(expect) => {
                failures.push(format!("{what}: failed, but not with {expect:?}: {e:#}"))
            }
            Err(_) => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!("{} broken copies, each refused", table.len());
}
