//! The Kata configuration for CNFS pods and the guest initrd, derived from the Kata that is
//! installed on the node.
//!
//! kata-deploy keeps each runtime's configuration as a real file with a `config.d/` of
//! drop-ins beside it (`/opt/kata/share/defaults/kata-containers/runtimes/<shim>/`, the old
//! path `configuration-<shim>.toml` being a symlink to it; artifacts/install.rs,
//! setup_runtime_directory), and Kata applies the drop-ins in name order, each key replacing
//! the base's. CNFS's configuration lives in its own directory
//! ([`CONFIG`], outside `/opt/kata`, so upgrading or removing kata-deploy never touches it):
//! Kata's base configuration with Kata's drop-ins applied, then CNFS's settings (the shipped
//! `configs/kata/<hypervisor>/config.d/50-cnfs.toml`: kernel, initrd, no image), with
//! `kernel_params` merged instead of replaced. An admin's own changes for CNFS pods go in a
//! `config.d/` beside it (Kata reads it; the installer never writes there).

use anyhow::{bail, Context};

use crate::host::Host;

/// The configuration containerd's `ConfigPath` names for the kata-cnfs runtime.
pub const CONFIG: &str = "/opt/cnfs/share/defaults/kata-containers/configuration-cnfs.toml";
/// kata-deploy's Go-runtime QEMU configuration (a symlink into `runtimes/qemu/`).
pub const DEFAULT_BASE: &str = "/opt/kata/share/defaults/kata-containers/configuration-qemu.toml";
/// kata-deploy's agent-as-init initrd (osbuilder `AGENT_INIT=yes`).
pub const DEFAULT_INITRD: &str = "/opt/kata/share/kata-containers/kata-containers-initrd.img";
/// Where CNFS's guest kernel and initrd are installed (the drop-ins name these).
pub const KERNEL: &str = "/opt/cnfs/share/kata/vmlinux-cnfs.container";
pub const INITRD: &str = "/opt/cnfs/share/kata/kata-cnfs-initrd.img";

/// The hypervisor section a Kata configuration configures (`[hypervisor.<name>]`).
pub fn hypervisor(path: &str, doc: &toml_edit::DocumentMut) -> anyhow::Result<String> {
    let names: Vec<String> = doc
        .get("hypervisor")
        .and_then(|h| h.as_table_like())
        .map(|t| t.iter().map(|(k, _)| k.to_string()).collect())
        .unwrap_or_default();
    match names.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("{path} has no [hypervisor.<name>] section; is it a Kata configuration?"),
        many => bail!(
            "{path} configures several hypervisors ({}); Kata would pick one at random",
            many.join(", ")
        ),
    }
}

/// Applies `src` onto `dst` the way Kata applies a drop-in: tables merge, values replace.
fn overlay(dst: &mut toml_edit::Table, src: &toml_edit::Table) {
    for (k, v) in src.iter() {
        match (dst.get_mut(k), v) {
            (Some(toml_edit::Item::Table(d)), toml_edit::Item::Table(s)) => overlay(d, s),
            _ => {
                dst.insert(k, v.clone());
            }
        }
    }
}

/// Kernel command-line words: ours win over the base's for the same `key`.
pub fn merge_params(base: &str, ours: &str) -> String {
    let key = |w: &str| w.split_once('=').map_or(w, |(k, _)| k).to_string();
    let ours: Vec<&str> = ours.split_whitespace().collect();
    let mut out: Vec<&str> = base
        .split_whitespace()
        .filter(|w| !ours.iter().any(|o| key(o) == key(w)))
        .collect();
    out.extend(ours);
    out.join(" ")
}

fn parse(path: &str, bytes: &[u8]) -> anyhow::Result<toml_edit::DocumentMut> {
    std::str::from_utf8(bytes)
        .map_err(|_| anyhow::anyhow!("{path} is not UTF-8"))?
        .parse()
        .map_err(|e| anyhow::anyhow!("{path} is not valid TOML ({e})"))
}

/// What the installer writes for Kata.
pub struct Plan {
    pub hypervisor: String,
    /// The resolved base configuration it was derived from.
    pub base: String,
    pub config: Vec<u8>,
    /// Kata's initrd the guest initrd was built from.
    pub kata_initrd: String,
    pub initrd: Vec<u8>,
}

/// `drop_in_for(hypervisor)` gives the shipped CNFS drop-in for that hypervisor.
pub fn plan(
    host: &Host,
    base: &str,
    kata_initrd: Option<&str>,
    drop_in_for: impl Fn(&str) -> anyhow::Result<Vec<u8>>,
    overlay_cpio: &[u8],
) -> anyhow::Result<Plan> {
    let resolved = host.resolve(base)?;
    if resolved == host.resolve(CONFIG)? {
        bail!(
            "{base} is CNFS's own configuration ({CONFIG}): name Kata's with --kata-config \
             (default {DEFAULT_BASE})"
        );
    }
    let bytes = host.read(&resolved)?.with_context(|| {
        format!(
            "Kata's configuration {base} is not on this node: install Kata first (kata-deploy \
             puts it there) or name another with --kata-config"
        )
    })?;
    let mut doc = parse(&resolved, &bytes)?;
    // Kata's own drop-ins for that configuration, in name order.
    let dir = resolved.rsplit_once('/').map_or("/", |(d, _)| d);
    let drop_dir = format!("{dir}/config.d");
    // Listed through the host's links (config.d itself may be one).
    let mut names: Vec<String> = host
        .list(&drop_dir)
        .unwrap_or_default()
        .into_iter()
        .filter(|n| n.ends_with(".toml") && !n.starts_with('.'))
        .collect();
    names.sort();
    for n in &names {
        let p = format!("{drop_dir}/{n}");
        let Some(b) = host.read(&p)? else { continue };
        let d = parse(&p, &b)?;
        overlay(doc.as_table_mut(), d.as_table());
    }
    let hv = hypervisor(&resolved, &doc)?;
    let ours_bytes = drop_in_for(&hv)?;
    let ours = parse(&format!("the CNFS drop-in for {hv}"), &ours_bytes)?;
    let section = |d: &toml_edit::DocumentMut, k: &str| -> Option<String> {
        d.get("hypervisor")?
            .get(&hv)?
            .get(k)?
            .as_str()
            .map(str::to_string)
    };
    if section(&ours, "kernel").as_deref() != Some(KERNEL)
        || section(&ours, "initrd").as_deref() != Some(INITRD)
    {
        bail!("the CNFS drop-in for {hv} must set kernel = {KERNEL:?} and initrd = {INITRD:?}");
    }
    let params = merge_params(
        &section(&doc, "kernel_params").unwrap_or_default(),
        &section(&ours, "kernel_params").unwrap_or_default(),
    );
    let kata_initrd = match kata_initrd {
        Some(p) => p.to_string(),
        None => section(&doc, "initrd")
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| DEFAULT_INITRD.to_string()),
    };
    overlay(doc.as_table_mut(), ours.as_table());
    doc["hypervisor"][hv.as_str()]["kernel_params"] = toml_edit::value(params);

    let header = format!(
        "# Written by cnfs-deploy for the kata-cnfs runtime: Kata's {resolved}\n\
         # with its config.d drop-ins applied, then CNFS's guest kernel and initrd. Rewritten on\n\
         # every install: put changes for CNFS pods in a config.d/ beside this file.\n\n"
    );
    let config = format!("{header}{doc}").into_bytes();

    let kata_initrd_path = host.resolve(&kata_initrd)?;
    // A CNFS drop-in in Kata's own config.d (the manual install) names CNFS's initrd:
    // building from it would append the overlay to the last run's output, every run.
    if kata_initrd_path == host.resolve(INITRD)? {
        bail!(
            "Kata's configuration {resolved} (with its config.d) names CNFS's own initrd \
             {INITRD}, so Kata's initrd is unknown (a CNFS drop-in installed by hand in Kata's \
             config.d? remove it); name Kata's initrd with --kata-initrd (kata-deploy's: \
             {DEFAULT_INITRD})"
        );
    }
    let mut initrd = host.read(&kata_initrd_path)?.with_context(|| {
        format!(
            "Kata's initrd {kata_initrd} is not on this node: CNFS adds its agent to Kata's \
             agent-as-init initrd (kata-deploy ships kata-containers-initrd.img); name it with \
             --kata-initrd"
        )
    })?;
    // Concatenated archives: the kernel unpacks each in turn (the overlay is compressed, so
    // it needs no alignment).
    initrd.extend_from_slice(overlay_cpio);
    Ok(Plan {
        hypervisor: hv,
        base: resolved,
        config,
        kata_initrd: kata_initrd_path,
        initrd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const QEMU_DROP_IN: &[u8] = include_bytes!("../../configs/kata/qemu/config.d/50-cnfs.toml");
    const CLH_DROP_IN: &[u8] = include_bytes!("../../configs/kata/clh/config.d/50-cnfs.toml");

    fn drop_in(hv: &str) -> anyhow::Result<Vec<u8>> {
        match hv {
            "qemu" => Ok(QEMU_DROP_IN.to_vec()),
            "clh" => Ok(CLH_DROP_IN.to_vec()),
            other => bail!("no CNFS drop-in for hypervisor {other}"),
        }
    }

    /// kata-deploy's layout: the old path a symlink into runtimes/qemu/, drop-ins beside it.
    fn kata_deploy_node(base: &str) -> (tempfile::TempDir, Host) {
        let d = tempfile::tempdir().expect("tmp");
        let host = Host::new(d.path());
        let rt = "/opt/kata/share/defaults/kata-containers/runtimes/qemu";
        host.create_dirs(&format!("{rt}/config.d"), 0o755)
            .expect("dirs");
        host.write(
            &format!("{rt}/configuration-qemu.toml"),
            base.as_bytes(),
            0o644,
        )
        .expect("base");
        host.write(
            &format!("{rt}/config.d/30-kernel-params.toml"),
            b"[hypervisor.qemu]\nkernel_params = \"agent.log=debug systemd.unified_cgroup_hierarchy=0\"\n",
            0o644,
        )
        .expect("drop-in");
        std::os::unix::fs::symlink(
            "runtimes/qemu/configuration-qemu.toml",
            host.path(DEFAULT_BASE),
        )
        .expect("link");
        host.create_dirs("/opt/kata/share/kata-containers", 0o755)
            .expect("dirs");
        host.write(DEFAULT_INITRD, b"KATA-INITRD", 0o644)
            .expect("initrd");
        (d, host)
    }

    const BASE: &str = "# Kata's comment\n[hypervisor.qemu]\npath = \"/opt/kata/bin/qemu-system-x86_64\"\nkernel = \"/opt/kata/share/kata-containers/vmlinux.container\"\nimage = \"/opt/kata/share/kata-containers/kata-containers.img\"\nkernel_params = \"cgroup_no_v1=all\"\ndefault_memory = 2048\n\n[agent.kata]\ndial_timeout = 45\n";

    #[test]
    fn the_cnfs_configuration_is_katas_with_its_drop_ins_then_cnfs_settings() {
        let (_d, host) = kata_deploy_node(BASE);
        let p = plan(&host, DEFAULT_BASE, None, drop_in, b"OVERLAY").expect("plan");
        assert_eq!(p.hypervisor, "qemu");
        assert_eq!(
            p.base,
            "/opt/kata/share/defaults/kata-containers/runtimes/qemu/configuration-qemu.toml"
        );
        let text = String::from_utf8(p.config).expect("utf8");
        assert!(
            text.contains("# Kata's comment"),
            "Kata's comments kept: {text}"
        );
        let t: toml::Table = text.parse().expect("toml");
        let q = &t["hypervisor"]["qemu"];
        assert_eq!(q["kernel"].as_str(), Some(KERNEL));
        assert_eq!(q["initrd"].as_str(), Some(INITRD));
        assert_eq!(q["image"].as_str(), Some(""));
        assert_eq!(
            q["default_memory"].as_integer(),
            Some(2048),
            "Kata's other settings kept"
        );
        assert_eq!(t["agent"]["kata"]["dial_timeout"].as_integer(), Some(45));
        // Kata's drop-in replaced the base's words (drop-in keys replace); CNFS's merge in.
        assert_eq!(
            q["kernel_params"].as_str(),
            Some("agent.log=debug cgroup_no_v1=all systemd.unified_cgroup_hierarchy=1")
        );
        assert_eq!(p.initrd, b"KATA-INITRDOVERLAY");
        assert_eq!(p.kata_initrd, DEFAULT_INITRD);
    }

    #[test]
    fn a_missing_kata_or_an_unknown_hypervisor_is_named() {
        let d = tempfile::tempdir().expect("tmp");
        let host = Host::new(d.path());
        let e = plan(&host, DEFAULT_BASE, None, drop_in, b"")
            .err()
            .expect("no kata");
        assert!(e.to_string().contains("install Kata first"), "{e}");
        let (_d, host) =
            kata_deploy_node(&BASE.replace("hypervisor.qemu", "hypervisor.firecracker"));
        // The drop-in of the base's own name was for qemu: now two hypervisors.
        let e = plan(&host, DEFAULT_BASE, None, drop_in, b"")
            .err()
            .expect("two");
        assert!(e.to_string().contains("several hypervisors"), "{e}");
        let (_d, host) = kata_deploy_node(&BASE.replace("hypervisor.qemu", "hypervisor.fc"));
        std::fs::remove_file(host.path(
            "/opt/kata/share/defaults/kata-containers/runtimes/qemu/config.d/30-kernel-params.toml",
        ))
        .expect("rm");
        let e = plan(&host, DEFAULT_BASE, None, drop_in, b"")
            .err()
            .expect("fc");
        assert!(
            e.to_string().contains("no CNFS drop-in for hypervisor fc"),
            "{e}"
        );
        let (_d, host) = kata_deploy_node(BASE);
        std::fs::remove_file(host.path(DEFAULT_INITRD)).expect("rm");
        let e = plan(&host, DEFAULT_BASE, None, drop_in, b"")
            .err()
            .expect("initrd");
        assert!(e.to_string().contains("--kata-initrd"), "{e}");
    }

    #[test]
    fn a_config_d_that_is_an_absolute_link_is_read_on_the_host() {
        let (_d, host) = kata_deploy_node(BASE);
        let rt = "/opt/kata/share/defaults/kata-containers/runtimes/qemu";
        std::fs::rename(
            host.path(&format!("{rt}/config.d")),
            host.path("/opt/kata-config.d"),
        )
        .expect("move");
        std::os::unix::fs::symlink("/opt/kata-config.d", host.path(&format!("{rt}/config.d")))
            .expect("link");
        let p = plan(&host, DEFAULT_BASE, None, drop_in, b"").expect("plan");
        let t: toml::Table = String::from_utf8(p.config)
            .expect("utf8")
            .parse()
            .expect("toml");
        assert_eq!(
            t["hypervisor"]["qemu"]["kernel_params"].as_str(),
            Some("agent.log=debug cgroup_no_v1=all systemd.unified_cgroup_hierarchy=1"),
            "Kata's drop-in behind the link applied"
        );
    }

    #[test]
    fn kernel_params_keep_the_base_words_and_replace_same_keys() {
        assert_eq!(merge_params("", "a=1 b"), "a=1 b");
        assert_eq!(merge_params("a=0 c quiet", "a=1 b"), "c quiet a=1 b");
        assert_eq!(merge_params("b", "b"), "b");
    }
}
