//! `kubectl apply -k configs/deploy`: the kustomization, read offline the way kustomize
//! reads it (kustomize itself is not installed here; the rules checked are its documented
//! ones: `resources` are files in or below the kustomization's directory or directories with
//! their own kustomization.yaml, `images` rewrite every container image of that name), and
//! every object it applies read as Kubernetes' typed API (k8s-openapi). Then what the README
//! and installer.yaml promise: the images are named and tagged in one place and agree with
//! `cargo xtask images`; only the installer is privileged; the uninstall overlay only swaps
//! its arguments; the node label it sets is the one the RuntimeClass and the CSI node plugin
//! select.

mod k8s;
use k8s::strict;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::api::rbac::v1::ClusterRole;
use serde_json::Value as Json;

fn configs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs")
}

fn yaml_docs(path: &Path) -> anyhow::Result<Vec<Json>> {
    use serde::Deserialize;
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let mut out = Vec::new();
    for de in serde_yaml::Deserializer::from_str(&text) {
        let j = Json::deserialize(de).with_context(|| format!("{}", path.display()))?;
        if !j.is_null() {
            out.push(j);
        }
    }
    Ok(out)
}

/// The objects a kustomization applies (resources only; `images` and `patches` are
/// returned for the caller to apply), following kustomize's load rules.
struct Kustomization {
    objects: Vec<Json>,
    images: Vec<Json>,
    patches: Vec<Json>,
}

fn load(dir: &Path) -> anyhow::Result<Kustomization> {
    let k = yaml_docs(&dir.join("kustomization.yaml"))?
        .pop()
        .ok_or_else(|| anyhow!("{}: empty kustomization", dir.display()))?;
    ensure!(
        k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" && k["kind"] == "Kustomization",
        "{}: not a Kustomization",
        dir.display()
    );
    let mut out = Kustomization {
        objects: Vec::new(),
        images: k["images"].as_array().cloned().unwrap_or_default(),
        patches: k["patches"].as_array().cloned().unwrap_or_default(),
    };
    let root = dir.canonicalize()?;
    for r in k["resources"].as_array().into_iter().flatten() {
        let r = r
            .as_str()
            .ok_or_else(|| anyhow!("a resource that is not a path"))?;
        let p = dir
            .join(r)
            .canonicalize()
            .with_context(|| format!("{}: resource {r}", dir.display()))?;
        if p.is_dir() {
            ensure!(
                p.join("kustomization.yaml").is_file(),
                "{}: directory resource {r} has no kustomization.yaml",
                dir.display()
            );
            let sub = load(&p)?;
            // A base's images and patches apply to its own objects first.
            let mut objs = sub.objects;
            apply(&mut objs, &sub.images, &sub.patches)?;
            out.objects.extend(objs);
        } else {
            // kustomize's default load restriction: files only in or below the root.
            ensure!(
                p.starts_with(&root),
                "{}: file resource {r} is outside the kustomization root (kustomize refuses it)",
                dir.display()
            );
            out.objects.extend(yaml_docs(&p)?);
        }
    }
    Ok(out)
}

fn containers_mut(o: &mut Json) -> Vec<&mut Json> {
    // pointer_mut, not IndexMut: indexing would add the missing keys to every object.
    let mut out = Vec::new();
    if let Some(spec) = o
        .pointer_mut("/spec/template/spec")
        .and_then(|s| s.as_object_mut())
    {
        for (k, v) in spec.iter_mut() {
            if k == "containers" || k == "initContainers" {
                out.extend(v.as_array_mut().into_iter().flatten());
            }
        }
    }
    out
}

/// kustomize's images transformer (name match ignores the tag) and JSON 6902 patches
/// (`replace` only: what the uninstall overlay uses).
fn apply(objs: &mut [Json], images: &[Json], patches: &[Json]) -> anyhow::Result<()> {
    for o in objs.iter_mut() {
        for c in containers_mut(o) {
            let image = c["image"].as_str().unwrap_or_default().to_string();
            let name = image
                .rsplit_once(':')
                .filter(|(_, t)| !t.contains('/'))
                .map_or(image.as_str(), |(n, _)| n);
            if let Some(i) = images.iter().find(|i| i["name"] == name) {
                let new_name = i["newName"].as_str().unwrap_or(name);
                let tag = i["newTag"]
                    .as_str()
                    .ok_or_else(|| anyhow!("images entry {name} has no newTag"))?;
                c["image"] = Json::String(format!("{new_name}:{tag}"));
            }
        }
    }
    for p in patches {
        let (kind, name) = (&p["target"]["kind"], &p["target"]["name"]);
        let ops: Vec<Json> = serde_yaml::from_str(p["patch"].as_str().unwrap_or_default())?;
        let mut hit = 0;
        for o in objs
            .iter_mut()
            .filter(|o| &o["kind"] == kind && &o["metadata"]["name"] == name)
        {
            hit += 1;
            for op in &ops {
                ensure!(
                    op["op"] == "replace",
                    "only replace patches are modelled: {op}"
                );
                let path = op["path"].as_str().unwrap_or_default();
                let slot = o
                    .pointer_mut(path)
                    .ok_or_else(|| anyhow!("patch path {path} does not exist in {kind} {name}"))?;
                *slot = op["value"].clone();
            }
        }
        ensure!(hit == 1, "patch target {kind} {name} matched {hit} objects");
    }
    Ok(())
}

fn render(dir: &Path) -> anyhow::Result<Vec<Json>> {
    let mut k = load(dir)?;
    apply(&mut k.objects, &k.images, &k.patches)?;
    Ok(k.objects)
}

fn find<'a>(objs: &'a [Json], kind: &str, name: &str) -> anyhow::Result<&'a Json> {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .ok_or_else(|| anyhow!("no {kind} {name} in the kustomization"))
}

/// The repository and version `cargo xtask images` names its images with.
fn xtask_repository() -> anyhow::Result<String> {
    let src = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../xtask/src/images.rs"),
    )?;
    let line = src
        .lines()
        .find(|l| l.starts_with("pub const IMAGE_REPOSITORY"))
        .ok_or_else(|| anyhow!("no IMAGE_REPOSITORY in xtask"))?;
    Ok(line.split('"').nth(1).unwrap_or_default().to_string())
}

#[test]
fn every_object_is_a_valid_kubernetes_object_and_images_are_set_in_one_place() -> anyhow::Result<()>
{
    let objs = render(&configs().join("deploy"))?;
    let k = yaml_docs(&configs().join("deploy/kustomization.yaml"))?.remove(0);
    let repo = xtask_repository()?;
    let version = env!("CARGO_PKG_VERSION");
    let mut named = BTreeMap::new();
    for i in k["images"].as_array().into_iter().flatten() {
        let name = i["name"].as_str().unwrap_or_default();
        ensure!(
            i["newTag"] == version,
            "images entry {name}: newTag must be {version} (cargo xtask images), is {}",
            i["newTag"]
        );
        ensure!(
            name.starts_with(&format!("{repo}/")),
            "images entry {name} is not under {repo}"
        );
        named.insert(name.to_string(), 0);
    }
    ensure!(named.len() == 2, "cnfs-csi and cnfs-deploy: {named:?}");
    for o in &objs {
        let kind = o["kind"].as_str().unwrap_or_default();
        match kind {
            "DaemonSet" => drop(strict::<DaemonSet>(o)?),
            "Deployment" => drop(strict::<Deployment>(o)?),
            "RuntimeClass" => drop(strict::<RuntimeClass>(o)?),
            "ClusterRole" => drop(strict::<ClusterRole>(o)?),
            _ => {}
        }
        let mut o = o.clone();
        for c in containers_mut(&mut o) {
            let image = c["image"].as_str().unwrap_or_default();
            if let Some((name, _)) = image
                .rsplit_once(':')
                .filter(|(n, _)| n.starts_with(&format!("{repo}/")))
            {
                let n = named.get_mut(name).ok_or_else(|| {
                    anyhow!("{image} has no images entry in configs/deploy/kustomization.yaml")
                })?;
                *n += 1;
                ensure!(image.ends_with(&format!(":{version}")), "{image}");
            }
        }
    }
    ensure!(
        named.values().all(|n| *n > 0),
        "an images entry names no container: {named:?}"
    );
    // The manifests' own tags (for kubectl apply -f) agree with the kustomization.
    for f in [
        "csi/node.yaml",
        "csi/controller.yaml",
        "deploy/installer.yaml",
    ] {
        let text = std::fs::read_to_string(configs().join(f))?;
        for l in text
            .lines()
            .filter(|l| l.contains(&format!("image: {repo}/")))
        {
            ensure!(
                l.trim_end().ends_with(&format!(":{version}")),
                "configs/{f}: {l}"
            );
        }
    }
    Ok(())
}

#[test]
fn only_the_installer_is_privileged_and_it_gets_what_it_needs() -> anyhow::Result<()> {
    let objs = render(&configs().join("deploy"))?;
    let ds: DaemonSet = strict(find(&objs, "DaemonSet", "cnfs-deploy")?)?;
    let spec = ds
        .spec
        .and_then(|s| s.template.spec)
        .ok_or_else(|| anyhow!("no pod spec"))?;
    ensure!(
        spec.host_pid == Some(true),
        "hostPID: the restart runs in PID 1's mount namespace"
    );
    let c = &spec.containers[0];
    ensure!(
        c.args.as_deref() == Some(&["install".to_string(), "--wait".to_string()][..]),
        "{:?}",
        c.args
    );
    ensure!(c.security_context.as_ref().and_then(|s| s.privileged) == Some(true));
    let env = c.env.as_deref().unwrap_or_default();
    ensure!(
        env.iter().any(|e| e.name == "NODE_NAME"
            && e.value_from
                .as_ref()
                .and_then(|v| v.field_ref.as_ref())
                .map(|f| f.field_path.as_str())
                == Some("spec.nodeName")),
        "NODE_NAME from spec.nodeName"
    );
    let mount = c
        .volume_mounts
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|m| m.mount_path == "/host")
        .ok_or_else(|| anyhow!("no /host mount"))?;
    let vol = spec
        .volumes
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|v| v.name == mount.name)
        .ok_or_else(|| anyhow!("no host-root volume"))?;
    ensure!(
        vol.host_path.as_ref().map(|h| h.path.as_str()) == Some("/"),
        "the node's root at /host"
    );
    ensure!(
        spec.node_selector
            .as_ref()
            .and_then(|n| n.get("katacontainers.io/kata-runtime"))
            .map(String::as_str)
            == Some("true"),
        "only on nodes kata-deploy set up"
    );
    // Its RBAC: get and patch nodes, nothing else.
    let role: ClusterRole = strict(find(&objs, "ClusterRole", "cnfs-deploy")?)?;
    let rules = role.rules.unwrap_or_default();
    ensure!(rules.len() == 1, "{rules:?}");
    ensure!(rules[0].resources.as_deref() == Some(&["nodes".to_string()][..]));
    ensure!(rules[0].verbs == ["get", "patch"], "{:?}", rules[0].verbs);
    // Every other workload: no privileged container, no host PID.
    for o in objs
        .iter()
        .filter(|o| o["kind"] == "DaemonSet" || o["kind"] == "Deployment")
    {
        if o["metadata"]["name"] == "cnfs-deploy" {
            continue;
        }
        let spec = &o["spec"]["template"]["spec"];
        ensure!(
            spec["hostPID"] != true,
            "{} joins the host PID namespace",
            o["metadata"]["name"]
        );
        for c in spec["containers"].as_array().into_iter().flatten() {
            ensure!(
                c["securityContext"]["privileged"] != true,
                "{} / {} is privileged",
                o["metadata"]["name"],
                c["name"]
            );
        }
    }
    Ok(())
}

#[test]
fn the_node_label_the_installer_sets_is_what_the_runtime_class_and_the_node_plugin_select(
) -> anyhow::Result<()> {
    let objs = render(&configs().join("deploy"))?;
    let (key, value) = (cnfs_deploy::label::KEY, cnfs_deploy::label::VALUE);
    let rc: RuntimeClass = strict(find(&objs, "RuntimeClass", "kata-cnfs")?)?;
    let sel = rc
        .scheduling
        .and_then(|s| s.node_selector)
        .unwrap_or_default();
    ensure!(
        sel.get(key).map(String::as_str) == Some(value),
        "RuntimeClass nodeSelector {sel:?}"
    );
    let node: DaemonSet = strict(find(&objs, "DaemonSet", "cnfs-csi-node")?)?;
    let sel = node
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|s| s.node_selector)
        .unwrap_or_default();
    ensure!(
        sel.get(key).map(String::as_str) == Some(value),
        "CSI node plugin nodeSelector {sel:?}"
    );
    Ok(())
}

#[test]
fn the_uninstall_overlay_only_turns_the_installer_into_the_uninstaller() -> anyhow::Result<()> {
    let install = render(&configs().join("deploy"))?;
    let uninstall = render(&configs().join("deploy/uninstall"))?;
    ensure!(install.len() == uninstall.len(), "the same objects");
    let mut changed = Vec::new();
    for (a, b) in install.iter().zip(&uninstall) {
        if a != b {
            changed.push(format!("{} {}", a["kind"], a["metadata"]["name"]));
        }
    }
    ensure!(changed == ["\"DaemonSet\" \"cnfs-deploy\""], "{changed:?}");
    let args = &find(&uninstall, "DaemonSet", "cnfs-deploy")?["spec"]["template"]["spec"]
        ["containers"][0]["args"];
    ensure!(
        args == &serde_json::json!(["uninstall", "--wait"]),
        "{args}"
    );
    Ok(())
}

#[test]
fn a_resource_outside_the_kustomization_root_fails_the_check() -> anyhow::Result<()> {
    let tmp = cnfs_testbed::TempDir::new("kustomize")?;
    let d = tmp.path().join("k");
    std::fs::create_dir_all(&d)?;
    std::fs::write(
        tmp.path().join("outside.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: x\n",
    )?;
    std::fs::write(d.join("kustomization.yaml"), "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - ../outside.yaml\n")?;
    let e = match render(&d) {
        Ok(_) => bail!("a file outside the root was accepted"),
        Err(e) => e,
    };
    ensure!(
        format!("{e:#}").contains("outside the kustomization root"),
        "{e:#}"
    );
    Ok(())
}
