//! The files under `configs/`, checked against the programs that read them: a real
//! containerd loads the runtime fragment, Kubernetes' typed API (k8s-openapi) reads the YAML,
//! a real Debian kernel config knows every symbol of the kernel fragment, and the CNFS files
//! have the documented keys and types. Each check is also run on a broken copy, to show that
//! it can fail.
//!
//! Needs: `containerd` (Debian's package; `cargo xtask test` installs it) and the Debian
//! kernel under `target/cnfs-cache/` (`cargo xtask setup`).

mod k8s;
use k8s::strict;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{anyhow, bail, ensure, Context};
use cnfs_protocols::agent;
use cnfs_protocols::spec::{self, NfsVersion, Server, Source, VolumeSpec};
use cnfs_testbed::containerd::{Containerd, MINIMAL};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::node::v1::RuntimeClass;
use serde_json::Value as Json;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    let p = repo().join("configs").join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

fn toml_table(text: &str) -> anyhow::Result<toml::Table> {
    text.parse::<toml::Table>().context("not valid TOML")
}

/// `t[a][b]...` as a table, or an error naming the missing step.
fn table_at<'a>(t: &'a toml::Table, path: &[&str]) -> anyhow::Result<&'a toml::Table> {
    let mut cur = t;
    for (i, key) in path.iter().enumerate() {
        cur = cur
            .get(*key)
            .and_then(|v| v.as_table())
            .ok_or_else(|| anyhow!("no table {:?}", path[..=i].join(".")))?;
    }
    Ok(cur)
}

fn strings(v: Option<&toml::Value>, what: &str) -> anyhow::Result<Vec<String>> {
    let arr = v
        .and_then(|v| v.as_array())
        .ok_or_else(|| anyhow!("{what}: expected an array of strings"))?;
    arr.iter()
        .map(|s| {
            s.as_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("{what}: {s} is not a string"))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// containerd
// ---------------------------------------------------------------------------------------

const V2_FRAGMENT: &str = "containerd/config.toml.d/cnfs-runtime.toml";
const V3_FRAGMENT: &str = "containerd/config-v3.toml.d/cnfs-runtime.toml";
const CRI_V2: &str = "io.containerd.grpc.v1.cri";
const CRI_V3: &str = "io.containerd.cri.v1.runtime";
const SITE_SANDBOX_IMAGE: &str = "registry.example.test/pause:3.9";

/// What an admin's config.toml already holds before CNFS: its own CRI settings and the
/// `runc` runtime (as `containerd config default` writes them). The CRI plugin is required,
/// so that a CRI config it refuses stops containerd instead of being logged and skipped.
fn site_config() -> String {
    format!(
        "{MINIMAL}required_plugins = [\"{CRI_V2}\"]\n\n\
         [plugins.\"{CRI_V2}\"]\n  sandbox_image = \"{SITE_SANDBOX_IMAGE}\"\n\
         [plugins.\"{CRI_V2}\".containerd.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n"
    )
}

/// The site config with the fragment appended, as configs/README.md tells admins to do.
fn site_config_with(fragment: &str) -> String {
    format!(
        "{}\n# appended: configs/{V2_FRAGMENT}\n{fragment}",
        site_config()
    )
}

fn need_containerd() {
    if let Err(e) = Containerd::require_installed() {
        panic!("{e:#}");
    }
}

/// The `kata-cnfs` runtime table under a CRI plugin's section.
fn kata_cnfs<'a>(t: &'a toml::Table, cri: &str) -> anyhow::Result<&'a toml::Table> {
    table_at(t, &["plugins", cri, "containerd", "runtimes", "kata-cnfs"])
}

/// Every key the fragment sets appears in `got` with the same value (tables recursively).
fn contains_all(want: &toml::Table, got: &toml::Table, at: &str) -> anyhow::Result<()> {
    for (k, w) in want {
        let g = got
            .get(k)
            .ok_or_else(|| anyhow!("{at}.{k} is missing from containerd's view"))?;
        match (w, g) {
            (toml::Value::Table(w), toml::Value::Table(g)) => {
                contains_all(w, g, &format!("{at}.{k}"))?
            }
            _ => ensure!(
                w == g,
                "{at}.{k}: the fragment says {w}, containerd has {g}"
            ),
        }
    }
    Ok(())
}

/// The values CNFS depends on, whatever else the fragment says.
fn check_cnfs_runtime(rt: &toml::Table) -> anyhow::Result<()> {
    ensure!(
        rt.get("runtime_type").and_then(|v| v.as_str()) == Some("io.containerd.cnfs.v2"),
        "runtime_type must be io.containerd.cnfs.v2, is {:?}",
        rt.get("runtime_type")
    );
    let pods = strings(rt.get("pod_annotations"), "pod_annotations")?;
    for p in ["io.katacontainers.*", "cnfs.io/*"] {
        ensure!(
            pods.iter().any(|x| x == p),
            "pod_annotations lacks {p:?}: {pods:?}"
        );
    }
    ensure!(
        rt.get("privileged_without_host_devices")
            .and_then(|v| v.as_bool())
            == Some(true),
        "privileged_without_host_devices must be true"
    );
    let opts = rt
        .get("options")
        .and_then(|v| v.as_table())
        .ok_or_else(|| anyhow!("no options table"))?;
    // The options are Kata's (the wrapper passes them on): ConfigPath names a Kata
    // configuration, never the wrapper's own file.
    let config_path = opts
        .get("ConfigPath")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    ensure!(
        config_path.starts_with('/')
            && config_path.ends_with(".toml")
            && !config_path.starts_with("/etc/cnfs/"),
        "options.ConfigPath must name Kata's configuration, is {config_path:?}"
    );
    Ok(())
}

/// `containerd config dump` output for the site config + fragment: the runtime is there as
/// the fragment wrote it, and the site's own CRI settings survived.
fn check_dump(dump: &str, fragment: &str) -> anyhow::Result<()> {
    let dump = toml_table(dump).context("containerd's dump")?;
    let frag = toml_table(fragment).context("the fragment")?;
    let want = kata_cnfs(&frag, CRI_V2).context("in the fragment")?;
    let got = kata_cnfs(&dump, CRI_V2).context("in containerd's dump")?;
    contains_all(want, got, "kata-cnfs")?;
    check_cnfs_runtime(got)?;
    let cri = table_at(&dump, &["plugins", CRI_V2])?;
    ensure!(
        cri.get("sandbox_image").and_then(|v| v.as_str()) == Some(SITE_SANDBOX_IMAGE),
        "the site's sandbox_image was lost: {:?}",
        cri.get("sandbox_image")
    );
    table_at(cri, &["containerd", "runtimes", "runc"])
        .context("the site's runc runtime was lost")?;
    Ok(())
}

#[test]
fn containerd_is_installed() {
    need_containerd();
    let v = Containerd::version().unwrap();
    eprintln!("{v}");
}

#[test]
fn containerd_reads_the_appended_fragment_and_keeps_the_site_settings() -> anyhow::Result<()> {
    need_containerd();
    let fragment = read(V2_FRAGMENT);
    let dump = Containerd::config_dump(&site_config_with(&fragment))?;
    check_dump(&dump, &fragment)
}

#[test]
fn a_broken_fragment_fails_the_dump_or_the_check() -> anyhow::Result<()> {
    need_containerd();
    let fragment = read(V2_FRAGMENT);
    let broken = |from: &str, to: &str| -> String {
        assert!(
            fragment.contains(from),
            "the fragment no longer contains {from:?}"
        );
        fragment.replace(from, to)
    };

    // A typo in the table path: containerd ignores the unknown key, the check sees no runtime.
    let typo = broken(
        ".containerd.runtimes.kata-cnfs",
        ".containerd.runtime.kata-cnfs",
    );
    let dump = Containerd::config_dump(&site_config_with(&typo))?;
    let e = check_dump(&dump, &fragment).expect_err("a misspelled table must fail the check");
    assert!(format!("{e:#}").contains("kata-cnfs"), "{e:#}");

    // A list written as a string: containerd itself refuses the config.
    let wrong_type = broken(
        r#"pod_annotations = ["io.katacontainers.*", "cnfs.io/*"]"#,
        r#"pod_annotations = "cnfs.io/*""#,
    );
    let e = Containerd::config_dump(&site_config_with(&wrong_type))
        .expect_err("a string where a list belongs must fail");
    assert!(format!("{e:#}").contains("[]string"), "{e:#}");

    // Not TOML at all.
    let syntax = broken("runtime_type = ", "runtime_type = = ");
    Containerd::config_dump(&site_config_with(&syntax)).expect_err("a syntax error must fail");

    // The fragment's values themselves: a different runtime_type fails the check.
    let other = broken("io.containerd.cnfs.v2", "io.containerd.kata.v2");
    let dump = Containerd::config_dump(&site_config_with(&other))?;
    check_dump(&dump, &other).expect_err("the wrong runtime_type must fail the check");
    Ok(())
}

#[test]
fn containerd_starts_with_the_fragment_and_serves_cri() -> anyhow::Result<()> {
    need_containerd();
    let fragment = read(V2_FRAGMENT);
    let c = Containerd::start(&site_config_with(&fragment))?;
    let version = c.ctr(&["version"])?;
    assert!(version.contains("Server:"), "{version}");
    let plugins = c.ctr(&["plugins", "ls"])?;
    let cri = plugins
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("cri"))
        .ok_or_else(|| anyhow!("no cri plugin listed:\n{plugins}"))?;
    assert!(cri.split_whitespace().any(|w| w == "ok"), "{cri}");
    // The running daemon's own view of the config file it was started with.
    let dump = cnfs_testbed::process::run(
        std::process::Command::new("containerd")
            .arg("--config")
            .arg(c.config_path())
            .args(["config", "dump"]),
    )?;
    check_dump(&dump, &fragment)
}

/// configs/README.md says: on containerd 1.x append the fragment, never import it. This
/// checks the reason on the installed containerd, so that the advice goes stale loudly.
#[test]
fn importing_the_fragment_replaces_the_cri_section_on_containerd_1x() -> anyhow::Result<()> {
    need_containerd();
    let path = repo().join("configs").join(V2_FRAGMENT).canonicalize()?;
    let with_import = format!("imports = [\"{}\"]\n{}", path.display(), site_config());
    let dump = toml_table(&Containerd::config_dump(&with_import)?)?;
    let cri = table_at(&dump, &["plugins", CRI_V2])?;
    let kept = cri.get("sandbox_image").and_then(|v| v.as_str()) == Some(SITE_SANDBOX_IMAGE);
    match Containerd::major_version()? {
        1 => {
            assert!(
                !kept,
                "containerd 1.x now merges imported plugin sections: update configs/README.md"
            );
            let e = match Containerd::start(&with_import) {
                Ok(_) => bail!("containerd 1.x started with the fragment imported alone: update configs/README.md"),
                Err(e) => format!("{e:#}"),
            };
            assert!(e.contains("default_runtime_name"), "{e}");
        }
        _ => assert!(
            kept,
            "containerd 2.x should merge an imported plugin section"
        ),
    }
    Ok(())
}

#[test]
fn v3_fragment_declares_the_same_runtime_as_the_v2_fragment() -> anyhow::Result<()> {
    let v2 = toml_table(&read(V2_FRAGMENT))?;
    let v3 = toml_table(&read(V3_FRAGMENT))?;
    // Appendable: tables only, no top-level key that would land in config.toml's last table.
    assert_eq!(v2.keys().collect::<Vec<_>>(), ["plugins"]);
    assert_eq!(v3.get("version").and_then(|v| v.as_integer()), Some(3));
    let a = kata_cnfs(&v2, CRI_V2)?;
    let mut b = kata_cnfs(&v3, CRI_V3)?.clone();
    assert_eq!(
        b.remove("sandboxer")
            .and_then(|v| v.as_str().map(str::to_string)),
        Some("podsandbox".to_string())
    );
    assert_eq!(a, &b, "the two containerd fragments disagree");
    check_cnfs_runtime(a)
}

// ---------------------------------------------------------------------------------------
// Kata drop-ins
// ---------------------------------------------------------------------------------------

const KATA_KERNEL: &str = "/opt/cnfs/share/kata/vmlinux-cnfs.container";
const KATA_INITRD: &str = "/opt/cnfs/share/kata/kata-cnfs-initrd.img";

/// A CNFS Kata drop-in: one hypervisor table (the Go runtime picks a random one when a
/// drop-in adds a second), only kernel/initrd/image, and `image = ""` when `initrd` is set
/// (both set is refused). Returns the hypervisor's name.
fn check_kata_dropin(text: &str) -> anyhow::Result<String> {
    let t = toml_table(text)?;
    ensure!(
        t.keys().eq(["hypervisor"].iter()),
        "only [hypervisor.*] belongs here: {:?}",
        t.keys().collect::<Vec<_>>()
    );
    let hv = table_at(&t, &["hypervisor"])?;
    ensure!(
        hv.len() == 1,
        "one hypervisor table per drop-in, found {:?}",
        hv.keys().collect::<Vec<_>>()
    );
    let (name, h) = hv.iter().next().unwrap();
    let h = h
        .as_table()
        .ok_or_else(|| anyhow!("hypervisor.{name} is not a table"))?;
    for k in h.keys() {
        ensure!(
            ["kernel", "initrd", "image", "kernel_params"].contains(&k.as_str()),
            "hypervisor.{name}.{k}: CNFS changes only kernel, initrd, image and kernel_params"
        );
    }
    let get = |k: &str| h.get(k).and_then(|v| v.as_str());
    // A drop-in's kernel_params replaces Kata's default: it must keep the cgroup v2 switches
    // (kata-agent powers a Debian 6.12 guest off without them) and must not bypass /init.
    let params: Vec<&str> = get("kernel_params")
        .ok_or_else(|| anyhow!("hypervisor.{name}.kernel_params is required"))?
        .split_whitespace()
        .collect();
    for p in ["cgroup_no_v1=all", "systemd.unified_cgroup_hierarchy=1"] {
        ensure!(params.contains(&p), "kernel_params lacks {p}");
    }
    ensure!(
        !params
            .iter()
            .any(|p| p.starts_with("init=") || p.starts_with("rdinit=")),
        "kernel_params must not name init= or rdinit=: the overlay's /init starts cnfs-agent"
    );
    ensure!(
        get("kernel") == Some(KATA_KERNEL),
        "kernel must be {KATA_KERNEL}"
    );
    match (get("initrd"), get("image")) {
        (Some(i), Some("")) if !i.is_empty() => {
            ensure!(i == KATA_INITRD, "initrd must be {KATA_INITRD}")
        }
        (Some(_), None) => {
            bail!("initrd set without image = \"\": Kata refuses image and initrd together")
        }
        other => bail!("expected initrd = {KATA_INITRD:?} and image = \"\", got {other:?}"),
    }
    Ok(name.clone())
}

#[test]
fn kata_dropins_change_only_the_guest_artefacts() -> anyhow::Result<()> {
    assert_eq!(
        check_kata_dropin(&read("kata/qemu/config.d/50-cnfs.toml"))?,
        "qemu"
    );
    assert_eq!(
        check_kata_dropin(&read("kata/clh/config.d/50-cnfs.toml"))?,
        "clh"
    );

    let both = format!(
        "{}\n[hypervisor.clh]\nkernel = \"{KATA_KERNEL}\"\n",
        read("kata/qemu/config.d/50-cnfs.toml")
    );
    check_kata_dropin(&both).expect_err("two hypervisor tables must fail");
    let no_image = format!(
        "[hypervisor.qemu]\nkernel = \"{KATA_KERNEL}\"\ninitrd = \"{KATA_INITRD}\"\n\
         kernel_params = \"cgroup_no_v1=all systemd.unified_cgroup_hierarchy=1\"\n"
    );
    check_kata_dropin(&no_image).expect_err("initrd without image = \"\" must fail");
    let qemu = read("kata/qemu/config.d/50-cnfs.toml");
    let no_cgroup = qemu.replace("cgroup_no_v1=all ", "");
    check_kata_dropin(&no_cgroup).expect_err("kernel_params without cgroup_no_v1=all");
    let rdinit = qemu.replace(
        "systemd.unified_cgroup_hierarchy=1\"",
        "systemd.unified_cgroup_hierarchy=1 rdinit=/sbin/init\"",
    );
    check_kata_dropin(&rdinit).expect_err("kernel_params with rdinit=");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Kubernetes YAML
// ---------------------------------------------------------------------------------------

fn yaml(rel: &str) -> Json {
    serde_yaml::from_str(&read(rel)).unwrap_or_else(|e| panic!("configs/{rel}: {e}"))
}

#[test]
fn runtimeclass_is_a_valid_runtime_class_for_the_containerd_runtime() -> anyhow::Result<()> {
    let rc: RuntimeClass = strict(&yaml("kubernetes/runtimeclass.yaml"))?;
    assert_eq!(rc.metadata.name.as_deref(), Some("kata-cnfs"));
    // The handler names the runtime in both containerd fragments.
    kata_cnfs(&toml_table(&read(V2_FRAGMENT))?, CRI_V2)?;
    kata_cnfs(&toml_table(&read(V3_FRAGMENT))?, CRI_V3)?;
    assert_eq!(rc.handler, "kata-cnfs");
    Ok(())
}

#[test]
fn example_pod_is_a_valid_pod() -> anyhow::Result<()> {
    let pod: Pod = strict(&yaml("kubernetes/example-pod.yaml"))?;
    let spec = pod.spec.context("no spec")?;
    assert_eq!(spec.runtime_class_name.as_deref(), Some("kata-cnfs"));
    let names: Vec<_> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["app", "worker"]);
    Ok(())
}

/// The SMB example: a valid Pod whose annotations the shim's own parser accepts, naming a
/// secret (never carrying credentials), and which the shipped example policy allows.
#[test]
fn example_smb_pod_is_valid_and_allowed_by_the_example_policy() -> anyhow::Result<()> {
    let pod: Pod = strict(&yaml("kubernetes/example-smb-pod.yaml"))?;
    let v = the_example_pods_one_volume(&pod)?;
    assert_eq!(v.spec.fs_name(), "smb");
    assert_eq!(v.secret_ref.as_deref(), Some("finance-smb"));
    Ok(())
}

/// The one volume of an example pod, after checking that the shim's own parser accepts its
/// annotations and that the shipped example policy allows it in the pod's namespace only.
fn the_example_pods_one_volume(
    pod: &Pod,
) -> anyhow::Result<cnfs_host_shim::annotations::PodVolume> {
    let annotations: std::collections::HashMap<String, String> = pod
        .metadata
        .annotations
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let mut volumes = cnfs_host_shim::annotations::parse(&annotations)
        .map_err(|e| anyhow!("the shim refuses the example: {e}"))?;
    ensure!(volumes.len() == 1, "{} volumes", volumes.len());
    let v = volumes.remove(0);
    let policy =
        cnfs_host::policy::Policy::parse(&read("cnfs/policy.toml")).map_err(|e| anyhow!("{e}"))?;
    let ns = pod.metadata.namespace.clone().context("no namespace")?;
    policy
        .check(&ns, &v.spec)
        .map_err(|e| anyhow!("the example policy refuses the example: {e}"))?;
    ensure!(
        policy.check("team-a", &v.spec).is_err(),
        "the example policy allows it in another namespace"
    );
    Ok(v)
}

/// The FUSE example: a valid Pod whose annotations the shim accepts, whose sidecar is a native
/// sidecar (an init container that keeps running, started before the apps), which the
/// shipped example policy allows in its namespace only.
#[test]
fn example_fuse_pod_is_valid_with_a_native_sidecar_and_allowed_by_the_example_policy(
) -> anyhow::Result<()> {
    let pod: Pod = strict(&yaml("kubernetes/example-fuse-pod.yaml"))?;
    let v = the_example_pods_one_volume(&pod)?;
    let cnfs_protocols::spec::Source::Fuse(f) = &v.spec.source else {
        bail!("not a FUSE volume: {:?}", v.spec.source);
    };
    let spec = pod.spec.context("no spec")?;
    let sidecar = spec
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == f.sidecar)
        .context("the sidecar is not an init container")?;
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    // It hands fuse-starter the socket path the shim binds, and the daemon /dev/fd/3.
    let args = sidecar.command.clone().unwrap_or_default();
    let at = args
        .iter()
        .position(|a| a == "--fd-passing-socket-path")
        .context("no --fd-passing-socket-path")?;
    assert_eq!(args.get(at + 1), Some(&f.socket));
    assert_eq!(args.last().map(String::as_str), Some("/dev/fd/3"));
    assert!(spec.containers.iter().all(|c| c.name != f.sidecar));
    Ok(())
}

#[test]
fn example_deployment_is_a_valid_deployment() -> anyhow::Result<()> {
    let d: Deployment = strict(&yaml("kubernetes/example-deployment.yaml"))?;
    let tpl = d.spec.context("no spec")?.template;
    let pod_spec = tpl.spec.context("no pod spec")?;
    assert_eq!(pod_spec.runtime_class_name.as_deref(), Some("kata-cnfs"));
    let ann = tpl
        .metadata
        .context("no template metadata")?
        .annotations
        .unwrap_or_default();
    assert!(
        ann.keys().any(|k| k.starts_with("cnfs.io/")),
        "no cnfs.io/ annotations on the pod template"
    );
    Ok(())
}

#[test]
fn misspelled_or_mistyped_fields_fail_the_kubernetes_check() {
    let mut pod = yaml("kubernetes/example-pod.yaml");
    let spec = pod["spec"].as_object_mut().unwrap();
    let rc = spec.remove("runtimeClassName").unwrap();
    spec.insert("runtimeClass".into(), rc);
    let e = strict::<Pod>(&pod).expect_err("a misspelled field must fail");
    assert!(format!("{e:#}").contains("runtimeClass"), "{e:#}");

    let mut d = yaml("kubernetes/example-deployment.yaml");
    d["spec"]["replicas"] = Json::String("two".into());
    strict::<Deployment>(&d).expect_err("a string for replicas must fail");

    let mut rc = yaml("kubernetes/runtimeclass.yaml");
    rc["kind"] = Json::String("RuntimeClas".into());
    strict::<RuntimeClass>(&rc).expect_err("a wrong kind must fail");
}

// --- the cnfs.io/ annotations -----------------------------------------------------------

/// One volume as the examples ask for it.
#[derive(Debug)]
struct ExampleVolume {
    spec: VolumeSpec,
    /// Option keys as written in the URL (before `vers`/`ro` are folded into typed fields).
    option_keys: Vec<String>,
    path: String,
    containers: Option<Vec<String>>,
}

/// `nfs://<server>[:<port>]/<export>?<k=v or flag>&...` into a wire spec. A structural
/// reading of the documented format; the shim's own parser is the authority.
fn parse_volume_url(name: &str, url: &str) -> anyhow::Result<(agent::VolumeSpec, Vec<String>)> {
    let (scheme, rest) = url.split_once("://").context("no scheme://")?;
    ensure!(
        scheme == "nfs",
        "scheme {scheme:?}: the examples use nfs:// only (extend this check with cephfs://)"
    );
    let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
    let slash = location
        .find('/')
        .context("no /<export> after the server")?;
    let (authority, export) = location.split_at(slash);
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').context("unclosed [ in the server")?;
        (h, after.strip_prefix(':'))
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    ensure!(!host.is_empty(), "no server");
    let mut wire = agent::VolumeSpec {
        name: name.to_string(),
        ..Default::default()
    };
    wire.set_nfs(agent::NfsSource {
        server: host.to_string(),
        export: export.to_string(),
        ..Default::default()
    });
    let mut keys = Vec::new();
    if let Some(p) = port {
        let p: u16 = p.parse().with_context(|| format!("port {p:?}"))?;
        wire.options.insert("port".into(), p.to_string());
        keys.push("port".to_string());
    }
    for item in query.split('&').filter(|s| !s.is_empty()) {
        let (k, v) = item.split_once('=').unwrap_or((item, ""));
        ensure!(!k.is_empty(), "empty option name in {item:?}");
        ensure!(
            wire.options.insert(k.to_string(), v.to_string()).is_none(),
            "option {k} given twice"
        );
        keys.push(k.to_string());
    }
    Ok((wire, keys))
}

/// Every `cnfs.io/` annotation of a pod, grouped by volume and validated: the kind is one
/// of volume/mount/containers, names are DNS labels, each volume has a mount and each
/// mount a volume, paths are absolute and clean, listed containers exist, and the volume
/// passes the spec validation the host and the guest share.
fn example_volumes(
    annotations: &BTreeMap<String, String>,
    containers: &[&str],
) -> anyhow::Result<BTreeMap<String, ExampleVolume>> {
    let mut by_kind: BTreeMap<&str, BTreeMap<&str, &str>> = BTreeMap::new();
    for (key, value) in annotations {
        let Some(rest) = key.strip_prefix("cnfs.io/") else {
            continue;
        };
        let (kind, name) = rest
            .split_once('.')
            .with_context(|| format!("{key}: no <kind>.<name>"))?;
        ensure!(
            ["volume", "mount", "containers"].contains(&kind),
            "{key}: unknown kind {kind:?}"
        );
        spec::validate_name(key, name)?;
        by_kind.entry(kind).or_default().insert(name, value);
    }
    let volumes = by_kind.remove("volume").unwrap_or_default();
    let mounts = by_kind.remove("mount").unwrap_or_default();
    let lists = by_kind.remove("containers").unwrap_or_default();
    for name in mounts.keys().chain(lists.keys()) {
        ensure!(
            volumes.contains_key(name),
            "cnfs.io/volume.{name} is missing"
        );
    }
    let mut out = BTreeMap::new();
    for (name, url) in volumes {
        let path = *mounts
            .get(name)
            .with_context(|| format!("cnfs.io/mount.{name} is missing"))?;
        ensure!(
            path.starts_with('/')
                && path != "/"
                && !path.split('/').any(|s| s == ".." || s == ".")
                && !path.contains("//"),
            "cnfs.io/mount.{name}: {path:?} is not a clean absolute path"
        );
        let list = match lists.get(name) {
            None => None,
            Some(l) => {
                let names: Vec<String> = l.split(',').map(|s| s.trim().to_string()).collect();
                for c in &names {
                    ensure!(
                        containers.contains(&c.as_str()),
                        "cnfs.io/containers.{name}: no container {c:?} in the pod"
                    );
                }
                Some(names)
            }
        };
        let (wire, option_keys) =
            parse_volume_url(name, url).with_context(|| format!("cnfs.io/volume.{name}"))?;
        let spec =
            VolumeSpec::from_wire(&wire).with_context(|| format!("cnfs.io/volume.{name}"))?;
        out.insert(
            name.to_string(),
            ExampleVolume {
                spec,
                option_keys,
                path: path.to_string(),
                containers: list,
            },
        );
    }
    Ok(out)
}

fn pod_parts(pod: &Pod) -> (String, BTreeMap<String, String>, Vec<String>) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let ann = pod.metadata.annotations.clone().unwrap_or_default();
    let names = pod
        .spec
        .as_ref()
        .map(|s| s.containers.iter().map(|c| c.name.clone()).collect())
        .unwrap_or_default();
    (ns, ann, names)
}

fn example_pod() -> Pod {
    strict(&yaml("kubernetes/example-pod.yaml")).unwrap()
}

/// The Deployment's pod template as the pod containerd will see (namespace from the
/// Deployment).
fn example_deployment_pod() -> Pod {
    let d: Deployment = strict(&yaml("kubernetes/example-deployment.yaml")).unwrap();
    let tpl = d.spec.unwrap().template;
    let mut metadata = tpl.metadata.unwrap_or_default();
    metadata.namespace = d.metadata.namespace;
    Pod {
        metadata,
        spec: tpl.spec,
        ..Default::default()
    }
}

#[test]
fn example_pod_annotations_describe_the_documented_volumes() -> anyhow::Result<()> {
    let (_, ann, names) = pod_parts(&example_pod());
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let v = example_volumes(&ann, &names)?;
    assert_eq!(v.keys().collect::<Vec<_>>(), ["reference", "shared"]);

    let shared = &v["shared"];
    assert_eq!(shared.path, "/data");
    assert_eq!(shared.containers, None, "shared goes to every container");
    assert!(!shared.spec.read_only);
    let Source::Nfs(n) = &shared.spec.source else {
        panic!("shared is not NFS")
    };
    assert_eq!(n.server, Server::Ip("10.0.0.5".parse()?));
    assert_eq!(n.export, "/exports/team-a/shared");
    assert_eq!(n.version, NfsVersion::V4_1);

    let reference = &v["reference"];
    assert_eq!(reference.path, "/reference");
    assert_eq!(reference.containers, Some(vec!["worker".to_string()]));
    assert!(reference.spec.read_only);
    let Source::Nfs(n) = &reference.spec.source else {
        panic!("reference is not NFS")
    };
    assert_eq!(n.server, Server::Host("nfs.example.com".into()));
    assert_eq!(n.version, NfsVersion::V4_2);
    Ok(())
}

#[test]
fn example_deployment_annotations_describe_a_volume() -> anyhow::Result<()> {
    let (_, ann, names) = pod_parts(&example_deployment_pod());
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let v = example_volumes(&ann, &names)?;
    assert_eq!(v.keys().collect::<Vec<_>>(), ["site"]);
    assert!(v["site"].spec.read_only);
    Ok(())
}

#[test]
fn malformed_volume_annotations_are_caught() {
    let good = [
        (
            "cnfs.io/volume.data",
            "nfs://10.0.0.5/exports/data?vers=4.1&ro&nconnect=4",
        ),
        ("cnfs.io/mount.data", "/data"),
    ];
    let cases: &[(&str, &[(&str, &str)])] = &[
        ("no mount", &[("cnfs.io/volume.data", "nfs://10.0.0.5/e")]),
        ("no volume", &[("cnfs.io/mount.data", "/data")]),
        ("relative path", &[good[0], ("cnfs.io/mount.data", "data")]),
        (
            "dot-dot path",
            &[good[0], ("cnfs.io/mount.data", "/a/../etc")],
        ),
        (
            "unknown kind",
            &[good[0], good[1], ("cnfs.io/size.data", "1")],
        ),
        (
            "bad name",
            &[
                ("cnfs.io/volume.Data", good[0].1),
                ("cnfs.io/mount.Data", "/d"),
            ],
        ),
        (
            "unknown container",
            &[good[0], good[1], ("cnfs.io/containers.data", "nope")],
        ),
        (
            "no export",
            &[("cnfs.io/volume.data", "nfs://10.0.0.5"), good[1]],
        ),
        (
            "bad scheme",
            &[("cnfs.io/volume.data", "smb://10.0.0.5/e"), good[1]],
        ),
        (
            "bad port",
            &[("cnfs.io/volume.data", "nfs://10.0.0.5:x/e"), good[1]],
        ),
        (
            "unknown option",
            &[("cnfs.io/volume.data", "nfs://10.0.0.5/e?bogus=1"), good[1]],
        ),
        (
            "reserved option",
            &[
                ("cnfs.io/volume.data", "nfs://10.0.0.5/e?clientaddr=1.2.3.4"),
                good[1],
            ],
        ),
        (
            "bad version",
            &[("cnfs.io/volume.data", "nfs://10.0.0.5/e?vers=5"), good[1]],
        ),
    ];
    let all: BTreeMap<String, String> = good
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    example_volumes(&all, &["app"]).expect("the good annotations must pass");
    for (what, ann) in cases {
        let ann: BTreeMap<String, String> = ann
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert!(
            example_volumes(&ann, &["app"]).is_err(),
            "{what}: accepted {ann:?}"
        );
    }
}

/// Go's `path.Match` as containerd applies it to pod_annotations, for the pattern forms
/// the fragments use (`*`, `?`, literals); anything else is refused rather than guessed.
fn go_path_match(pattern: &str, name: &str) -> anyhow::Result<bool> {
    ensure!(
        !pattern.contains(['[', '\\']),
        "pattern {pattern:?}: character classes and escapes are not modelled here"
    );
    fn m(p: &[char], n: &[char]) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some('*') => (0..=n.len())
                .take_while(|&i| i == 0 || n[i - 1] != '/')
                .any(|i| m(&p[1..], &n[i..])),
            Some('?') => n.first().is_some_and(|c| *c != '/') && m(&p[1..], &n[1..]),
            Some(c) => n.first() == Some(c) && m(&p[1..], &n[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    Ok(m(&p, &n))
}

#[test]
fn go_path_match_follows_containerds_semantics() {
    // (pattern, name, what path.Match answers)
    let table = [
        ("cnfs.io/*", "cnfs.io/volume.data", true),
        ("cnfs.io/*", "cnfs.io/", true),
        ("cnfs.io/*", "cnfs.io", false),
        ("cnfs.io/*", "cnfs.io/a/b", false),
        ("cnfs.io/*", "xcnfs.io/volume.a", false),
        ("cnfs.io/*", "cnfs.iox/volume.a", false),
        (
            "io.katacontainers.*",
            "io.katacontainers.config.hypervisor.kernel_params",
            true,
        ),
        ("io.katacontainers.*", "cnfs.io/volume.a", false),
        ("cnfs.io/volume.?", "cnfs.io/volume.a", true),
        ("cnfs.io/volume.?", "cnfs.io/volume.ab", false),
    ];
    for (p, n, want) in table {
        assert_eq!(
            go_path_match(p, n).unwrap(),
            want,
            "path.Match({p:?}, {n:?})"
        );
    }
    assert!(go_path_match("[a-z]*", "x").is_err());
}

#[test]
fn every_example_annotation_passes_containerds_pod_annotations() -> anyhow::Result<()> {
    let lists = [
        strings(
            kata_cnfs(&toml_table(&read(V2_FRAGMENT))?, CRI_V2)?.get("pod_annotations"),
            "v2",
        )?,
        strings(
            kata_cnfs(&toml_table(&read(V3_FRAGMENT))?, CRI_V3)?.get("pod_annotations"),
            "v3",
        )?,
    ];
    let passes = |key: &str, list: &[String]| -> anyhow::Result<bool> {
        for p in list {
            if go_path_match(p, key)? {
                return Ok(true);
            }
        }
        Ok(false)
    };
    for pod in [example_pod(), example_deployment_pod()] {
        let (_, ann, _) = pod_parts(&pod);
        ensure!(!ann.is_empty(), "an example pod without annotations");
        for key in ann.keys().filter(|k| k.starts_with("cnfs.io/")) {
            for list in &lists {
                ensure!(
                    passes(key, list)?,
                    "{key} does not pass pod_annotations {list:?}"
                );
            }
        }
    }
    // And the check can fail: a prefix missing from the list.
    assert!(!passes("cnfs.example/volume.a", &lists[0])?);
    Ok(())
}

// --- the example policy -----------------------------------------------------------------

fn in_cidr(ip: IpAddr, cidr: &str) -> bool {
    let Some((net, len)) = cidr.split_once('/') else {
        return cidr.parse::<IpAddr>().is_ok_and(|a| a == ip);
    };
    let (Ok(net), Ok(len)) = (net.parse::<IpAddr>(), len.parse::<u32>()) else {
        return false;
    };
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) if len <= 32 => {
            let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) if len <= 128 => {
            let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

/// The first `[[allow]]` entry that matches the whole volume, by the rules policy.toml
/// documents (namespace, file system, server by CIDR or exact name, path-segment prefix,
/// every option key written in the URL).
fn policy_allows(
    policy: &toml::Table,
    namespace: &str,
    v: &ExampleVolume,
) -> anyhow::Result<usize> {
    let Source::Nfs(n) = &v.spec.source else {
        bail!("only NFS examples are shipped")
    };
    let rules = policy
        .get("allow")
        .and_then(|a| a.as_array())
        .context("no [[allow]]")?;
    for (i, rule) in rules.iter().enumerate() {
        let rule = rule.as_table().context("[[allow]] entry")?;
        let list = |k: &str| strings(rule.get(k), k);
        let server_ok = list("servers")?.iter().any(|s| match &n.server {
            Server::Ip(ip) => in_cidr(*ip, s),
            Server::Host(h) => s.eq_ignore_ascii_case(h),
        });
        let export_ok = list("export_prefixes")?.iter().any(|p| {
            let p = p.trim_end_matches('/');
            n.export == p || n.export.starts_with(&format!("{p}/"))
        });
        let options = list("options")?;
        if list("namespaces")?.iter().any(|x| x == namespace)
            && list("filesystems")?.iter().any(|x| x == "nfs")
            && server_ok
            && export_ok
            && v.option_keys.iter().all(|k| options.contains(k))
        {
            return Ok(i);
        }
    }
    bail!(
        "no [[allow]] entry matches volume {} in namespace {namespace}",
        v.spec.name
    )
}

#[test]
fn example_volumes_are_allowed_by_the_example_policy() -> anyhow::Result<()> {
    let policy = toml_table(&read("cnfs/policy.toml"))?;
    for pod in [example_pod(), example_deployment_pod()] {
        let (ns, ann, names) = pod_parts(&pod);
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        for v in example_volumes(&ann, &names)?.values() {
            policy_allows(&policy, &ns, v)?;
            // Denied elsewhere: another namespace, or an export beside the prefix.
            policy_allows(&policy, "team-b", v).expect_err("another namespace must be denied");
        }
    }
    let mut beside = example_volumes(
        &BTreeMap::from([
            (
                "cnfs.io/volume.x".to_string(),
                "nfs://10.0.0.5/exports/team-ab?vers=4.1".to_string(),
            ),
            ("cnfs.io/mount.x".to_string(), "/x".to_string()),
        ]),
        &["app"],
    )?;
    let x = beside.remove("x").unwrap();
    policy_allows(&policy, "team-a", &x)
        .expect_err("/exports/team-ab is not under /exports/team-a");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Kernel fragment
// ---------------------------------------------------------------------------------------

/// `CONFIG_X=v` and `# CONFIG_X is not set` (as "n") lines; any other non-comment line is an
/// error.
fn fragment_entries(text: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(sym) = line
            .strip_prefix("# ")
            .and_then(|l| l.strip_suffix(" is not set"))
            .filter(|s| s.starts_with("CONFIG_"))
        {
            out.push((sym.to_string(), "n".to_string()));
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (sym, val) = line
            .split_once('=')
            .with_context(|| format!("line {}: {line:?} is not CONFIG_X=value", i + 1))?;
        ensure!(
            sym.strip_prefix("CONFIG_").is_some_and(|s| !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')),
            "line {}: {sym:?} is not a kernel symbol",
            i + 1
        );
        out.push((sym.to_string(), val.to_string()));
    }
    Ok(out)
}

/// Symbols of `entries` that `kernel_config` (a full .config) does not know at all.
fn unknown_symbols(entries: &[(String, String)], kernel_config: &str) -> Vec<String> {
    let known: BTreeSet<&str> = kernel_config
        .lines()
        .filter_map(|l| {
            l.split_once('=').map(|(s, _)| s).or_else(|| {
                l.strip_prefix("# ")
                    .and_then(|l| l.strip_suffix(" is not set"))
            })
        })
        .collect();
    entries
        .iter()
        .filter(|(s, _)| !known.contains(s.as_str()))
        .map(|(s, _)| s.clone())
        .collect()
}

fn debian_kernel_configs() -> Vec<PathBuf> {
    let cache = repo().join("target").join("cnfs-cache");
    let mut found = Vec::new();
    for k in std::fs::read_dir(&cache).into_iter().flatten().flatten() {
        if !k.file_name().to_string_lossy().starts_with("kernel-") {
            continue;
        }
        for f in std::fs::read_dir(k.path().join("boot"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if f.file_name().to_string_lossy().starts_with("config-") {
                found.push(f.path());
            }
        }
    }
    found.sort();
    assert!(
        !found.is_empty(),
        "no Debian kernel config under {}/kernel-*/boot/config-*: run `cargo xtask setup` \
         (`cargo xtask test` does it first)",
        cache.display()
    );
    found
}

#[test]
fn kernel_fragment_builds_everything_in() -> anyhow::Result<()> {
    let entries = fragment_entries(&read("kernel/cnfs.conf"))?;
    let mut seen = BTreeSet::new();
    for (sym, val) in &entries {
        ensure!(seen.insert(sym.as_str()), "{sym} is set twice");
        ensure!(
            val == "y" || val == "n",
            "{sym}={val}: Kata's guest kernel loads no modules, so everything is =y"
        );
    }
    for need in [
        "NFS_FS",
        "NFS_V3",
        "NFS_V4",
        "NFS_V4_1",
        "NFS_V4_2",
        "SUNRPC",
        "LOCKD",
        "CEPH_FS",
        "CEPH_LIB",
        "DNS_RESOLVER",
        "KEYS",
        "VSOCKETS",
        "VIRTIO_VSOCKETS",
        "MD",
        "BLK_DEV_DM",
        "DM_CRYPT",
    ] {
        let sym = format!("CONFIG_{need}");
        ensure!(
            entries.iter().any(|(s, v)| *s == sym && v == "y"),
            "{sym}=y is missing"
        );
    }
    fragment_entries("CONFIG_NFS_FS=y\nNFS_V4=y\n").expect_err("a line without CONFIG_ must fail");
    Ok(())
}

#[test]
fn kernel_fragment_symbols_exist_in_a_real_kernel() -> anyhow::Result<()> {
    let entries = fragment_entries(&read("kernel/cnfs.conf"))?;
    for config in debian_kernel_configs() {
        let text = std::fs::read_to_string(&config)?;
        let unknown = unknown_symbols(&entries, &text);
        ensure!(
            unknown.is_empty(),
            "{}: no such kernel symbols {unknown:?}",
            config.display()
        );
        // The same check on a misspelled symbol.
        let typo = vec![("CONFIG_NFS_V4_3".to_string(), "y".to_string())];
        assert_eq!(unknown_symbols(&typo, &text), ["CONFIG_NFS_V4_3"]);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// /etc/cnfs/shim.toml and policy.toml
// ---------------------------------------------------------------------------------------

/// The documented shim.toml keys with their types; unknown keys are errors.
fn check_shim_toml(text: &str) -> anyhow::Result<()> {
    let t = toml_table(text)?;
    let want: BTreeSet<&str> = [
        "delegate",
        "agent_port",
        "policy",
        "secrets_dir",
        "mount_timeout_seconds",
        "guest_connect_timeout_seconds",
    ]
    .into();
    let have: BTreeSet<&str> = t.keys().map(String::as_str).collect();
    ensure!(have == want, "keys {have:?}, documented {want:?}");
    let s = |k: &str| {
        t[k].as_str()
            .with_context(|| format!("{k} must be a string"))
    };
    let n = |k: &str| {
        t[k].as_integer()
            .with_context(|| format!("{k} must be an integer"))
    };
    ensure!(!s("delegate")?.is_empty(), "delegate is empty");
    for k in ["policy", "secrets_dir"] {
        ensure!(s(k)?.starts_with('/'), "{k} must be an absolute path");
    }
    let port = n("agent_port")?;
    ensure!(
        (1..=i64::from(u32::MAX)).contains(&port)
            && ![1024, 1025, 1026, 1027, 10240].contains(&port),
        "agent_port {port}: a vsock port Kata does not use"
    );
    for k in ["mount_timeout_seconds", "guest_connect_timeout_seconds"] {
        ensure!(n(k)? > 0, "{k} must be positive");
    }
    Ok(())
}

#[test]
fn shim_toml_has_the_documented_keys_and_types() -> anyhow::Result<()> {
    let text = read("cnfs/shim.toml");
    check_shim_toml(&text)?;
    let t = toml_table(&text)?;
    assert_eq!(
        t["agent_port"].as_integer(),
        Some(i64::from(cnfs_protocols::transport::DEFAULT_AGENT_PORT))
    );
    assert_eq!(t["policy"].as_str(), Some("/etc/cnfs/policy.toml"));
    assert_eq!(t["delegate"].as_str(), Some("containerd-shim-kata-v2"));

    check_shim_toml(&text.replace("agent_port = 17230", "agent_port = \"17230\""))
        .expect_err("a string port must fail");
    check_shim_toml(&text.replace("agent_port = 17230", "agent_port = 1026"))
        .expect_err("Kata's debug console port must fail");
    check_shim_toml(&text.replace("secrets_dir", "secret_dir"))
        .expect_err("a misspelled key must fail");
    Ok(())
}

/// policy.toml: only `[[allow]]` entries, each with exactly the documented keys as
/// non-empty string arrays and sensible values.
fn check_policy_toml(text: &str) -> anyhow::Result<usize> {
    let t = toml_table(text)?;
    ensure!(
        t.keys().eq(["allow"].iter()),
        "only [[allow]] entries belong here"
    );
    let rules = t["allow"]
        .as_array()
        .context("allow must be an array of tables")?;
    for (i, rule) in rules.iter().enumerate() {
        let rule = rule
            .as_table()
            .with_context(|| format!("allow[{i}] is not a table"))?;
        // An entry for FUSE only has no servers or prefixes (its daemon picks its own).
        let fuse_only = strings(rule.get("filesystems"), "filesystems")?
            .iter()
            .all(|f| f == "fuse");
        let want: BTreeSet<&str> = if fuse_only {
            ["namespaces", "filesystems", "options"].into()
        } else {
            [
                "namespaces",
                "filesystems",
                "servers",
                "export_prefixes",
                "options",
            ]
            .into()
        };
        let have: BTreeSet<&str> = rule.keys().map(String::as_str).collect();
        ensure!(
            have == want,
            "allow[{i}]: keys {have:?}, documented {want:?}"
        );
        for k in &want {
            ensure!(
                !strings(rule.get(*k), k)?.is_empty(),
                "allow[{i}].{k} is empty"
            );
        }
        for fs in strings(rule.get("filesystems"), "filesystems")? {
            ensure!(
                cnfs_protocols::spec::FsKind::by_name(&fs).is_some(),
                "allow[{i}]: file system {fs:?}"
            );
        }
        let present = |k: &str| -> anyhow::Result<Vec<String>> {
            match rule.get(k) {
                None => Ok(Vec::new()),
                v => strings(v, k),
            }
        };
        for p in present("export_prefixes")? {
            ensure!(
                p.starts_with('/'),
                "allow[{i}]: prefix {p:?} is not absolute"
            );
        }
        for s in present("servers")? {
            let ok = match s.split_once('/') {
                Some((ip, len)) => ip.parse::<IpAddr>().is_ok() && len.parse::<u8>().is_ok(),
                None => {
                    s.parse::<IpAddr>().is_ok()
                        || (!s.is_empty()
                            && s.split('.').all(|l| {
                                !l.is_empty()
                                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                            }))
                }
            };
            ensure!(
                ok,
                "allow[{i}]: server {s:?} is neither a CIDR nor a host name"
            );
        }
    }
    Ok(rules.len())
}

#[test]
fn policy_toml_has_the_documented_keys_and_types() -> anyhow::Result<()> {
    let text = read("cnfs/policy.toml");
    assert_eq!(
        check_policy_toml(&text)?,
        4,
        "the example has four [[allow]] entries"
    );
    check_policy_toml(&text.replace("export_prefixes", "export_prefix"))
        .expect_err("a misspelled key must fail");
    check_policy_toml(&text.replace("\"nfs\", \"cephfs\"", "\"nfs\", \"afs\""))
        .expect_err("an unknown file system must fail");
    check_policy_toml(&text.replace("\"10.0.0.0/8\"", "\"10.0.0.0/8/8\""))
        .expect_err("a bad CIDR must fail");
    Ok(())
}
