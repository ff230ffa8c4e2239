//! Picks kernel modules out of an extracted kernel package: the closure of the requested
//! names over `modules.dep` (read by `cnfs_protocols::modules_dep`, as the agent reads it),
//! decompressed to plain `.ko` (busybox modprobe in the test guest
//! cannot be relied on to decompress), and a `modules.dep` that lists only those.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{bail, Context as _, Result};
use cnfs_protocols::modules_dep::{self, ModulesDep};

/// Names end up in a shell `for` loop and in file lookups: keep them to a plain alphabet.
pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        bail!("kernel module name {name:?}: use letters, digits, `_` and `-` only");
    }
    Ok(())
}

/// The path a module gets in the initrd: the same, ending in plain `.ko`.
pub fn plain_path(path: &str) -> Result<String> {
    if path.ends_with(".ko") {
        return Ok(path.to_string());
    }
    if let Some(base) = path.strip_suffix(".ko.xz") {
        return Ok(format!("{base}.ko"));
    }
    if path.ends_with(".ko.zst") || path.ends_with(".ko.gz") {
        bail!("module {path}: only .ko and .ko.xz modules are supported (not zstd or gzip)");
    }
    bail!("module {path}: not a .ko or .ko.xz file");
}

/// The module's contents as a plain `.ko`.
pub fn decompress(path: &str, data: &[u8]) -> Result<Vec<u8>> {
    if path.ends_with(".ko.xz") {
        let mut out = Vec::new();
        lzma_rs::xz_decompress(&mut &data[..], &mut out)
            .with_context(|| format!("decompressing module {path}"))?;
        return Ok(out);
    }
    plain_path(path)?;
    Ok(data.to_vec())
}

/// A modules.dep for just `modules`, with paths rewritten to `.ko`, lines sorted; each line
/// keeps its dependencies in the original order (the load order, reversed).
pub fn restricted(dep: &ModulesDep, modules: &BTreeSet<String>) -> Result<String> {
    let mut lines = Vec::new();
    for m in modules {
        let mut line = format!("{}:", plain_path(m)?);
        for d in dep.deps_of(m).unwrap_or_default() {
            line.push(' ');
            line.push_str(&plain_path(d)?);
        }
        lines.push(line);
    }
    lines.sort();
    Ok(lines.iter().map(|l| format!("{l}\n")).collect())
}

/// `modules.builtin` lists modules compiled into the kernel: asking for one is fine, there is
/// just nothing to copy.
fn is_builtin(builtin: Option<&str>, name: &str) -> bool {
    builtin.is_some_and(|t| modules_dep::lists_builtin(t, name))
}

/// What goes under `lib/modules/<release>/` in the initrd.
#[derive(Debug, Default)]
pub struct Selection {
    /// Plain `.ko` paths relative to the release directory, and their contents.
    pub modules: Vec<(String, Vec<u8>)>,
    pub modules_dep: String,
    pub modules_builtin: Option<Vec<u8>>,
}

/// Reads `<kernel_tree>/lib/modules/<release>` and selects the closure of `names`.
pub fn select(kernel_tree: &Path, release: &str, names: &[String]) -> Result<Selection> {
    let dir = kernel_tree.join("lib/modules").join(release);
    let dep_path = dir.join("modules.dep");
    let dep_text = std::fs::read_to_string(&dep_path)
        .with_context(|| format!("reading {} (was depmod run?)", dep_path.display()))?;
    let dep = ModulesDep::parse(&dep_text).with_context(|| dep_path.display().to_string())?;
    let builtin_path = dir.join("modules.builtin");
    let builtin = match std::fs::read(&builtin_path) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(e).with_context(|| format!("reading {}", builtin_path.display()));
        }
    };
    let builtin_text = builtin.as_deref().map(String::from_utf8_lossy);

    let mut roots = Vec::new();
    for name in names {
        check_name(name)?;
        match dep.find(name) {
            Some(path) => roots.push(path),
            None if is_builtin(builtin_text.as_deref(), name) => {}
            None => bail!(
                "kernel module {name:?} is neither in {} nor built in",
                dep_path.display()
            ),
        }
    }
    let closure = dep.closure(roots);
    let mut modules = Vec::new();
    for rel in &closure {
        let file = dir.join(rel);
        let data =
            std::fs::read(&file).with_context(|| format!("reading module {}", file.display()))?;
        modules.push((plain_path(rel)?, decompress(rel, &data)?));
    }
    Ok(Selection {
        modules,
        modules_dep: restricted(&dep, &closure)?,
        modules_builtin: builtin,
    })
}

/// Puts the closure of `names` (from an extracted, depmod'ed kernel tree) into `t` under
/// `lib/modules/<release>/`, with a `modules.dep` restricted to it and `modules.builtin`.
pub fn add_to_tree(
    t: &mut crate::archive::Tree,
    kernel_tree: &Path,
    release: &str,
    names: &[String],
) -> Result<()> {
    if release.is_empty() || release.contains('/') || release == "." || release == ".." {
        bail!("--kernel-release {release:?} must be a single directory name");
    }
    let sel = select(kernel_tree, release, names)?;
    let base = format!("lib/modules/{release}");
    for (path, data) in sel.modules {
        t.file(&format!("{base}/{path}"), 0o644, data)?;
    }
    t.file(
        &format!("{base}/modules.dep"),
        0o644,
        sel.modules_dep.into_bytes(),
    )?;
    if let Some(builtin) = sel.modules_builtin {
        t.file(&format!("{base}/modules.builtin"), 0o644, builtin)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/fs/nfs/nfsv4.ko.xz: kernel/net/dns_resolver/dns_resolver.ko.xz kernel/fs/nfs/nfs.ko.xz kernel/net/sunrpc/sunrpc.ko.xz
kernel/fs/nfs/nfs.ko.xz: kernel/net/sunrpc/sunrpc.ko.xz
kernel/net/sunrpc/sunrpc.ko.xz:
kernel/net/dns_resolver/dns_resolver.ko.xz:
kernel/drivers/net/virtio-net.ko:
";

    #[test]
    fn names_match_with_dash_or_underscore() {
        let dep = ModulesDep::parse(DEP).expect("parse");
        assert_eq!(
            dep.find("virtio_net"),
            Some("kernel/drivers/net/virtio-net.ko")
        );
        assert_eq!(
            dep.find("virtio-net"),
            Some("kernel/drivers/net/virtio-net.ko")
        );
        assert_eq!(dep.find("nfs"), Some("kernel/fs/nfs/nfs.ko.xz"));
        assert_eq!(dep.find("ceph"), None);
    }

    #[test]
    fn closure_and_restricted_dep() {
        let dep = ModulesDep::parse(DEP).expect("parse");
        let c = dep.closure(["kernel/fs/nfs/nfs.ko.xz"]);
        assert_eq!(
            c.iter().map(String::as_str).collect::<Vec<_>>(),
            ["kernel/fs/nfs/nfs.ko.xz", "kernel/net/sunrpc/sunrpc.ko.xz"]
        );
        assert_eq!(
            restricted(&dep, &c).expect("restricted"),
            "kernel/fs/nfs/nfs.ko: kernel/net/sunrpc/sunrpc.ko\nkernel/net/sunrpc/sunrpc.ko:\n"
        );
        let all = dep.closure(["kernel/fs/nfs/nfsv4.ko.xz"]);
        assert_eq!(all.len(), 4);
        // dependency order is kept: it is the load order, reversed
        assert!(restricted(&dep, &all).expect("restricted").contains(
            "nfsv4.ko: kernel/net/dns_resolver/dns_resolver.ko kernel/fs/nfs/nfs.ko kernel/net/sunrpc/sunrpc.ko\n"
        ));
    }

    #[test]
    fn paths_leaving_the_tree_are_refused() {
        for (text, named) in [
            ("../../etc/shadow.ko:\n", "\"../../etc/shadow.ko\""),
            ("/abs/x.ko:\n", "\"/abs/x.ko\""),
            ("a.ko: b/../../c.ko\n", "\"b/../../c.ko\""),
            ("no colon here\n", "no `:`"),
        ] {
            let e = ModulesDep::parse(text).expect_err(text);
            assert!(e.to_string().starts_with("modules.dep line 1: "), "{e}");
            assert!(e.to_string().contains(named), "{e}");
        }
    }

    #[test]
    fn compression_suffixes() {
        assert_eq!(plain_path("a/b.ko.xz").expect("xz"), "a/b.ko");
        assert_eq!(plain_path("a/b.ko").expect("ko"), "a/b.ko");
        let e = plain_path("a/b.ko.zst").expect_err("zstd");
        assert!(format!("{e:#}").contains("a/b.ko.zst"));
        assert!(plain_path("a/b.o").is_err());

        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut &b"\x7fELF module"[..], &mut xz).expect("compress");
        assert_eq!(decompress("m.ko.xz", &xz).expect("xz"), b"\x7fELF module");
        assert_eq!(decompress("m.ko", b"plain").expect("ko"), b"plain");
        assert!(decompress("m.ko.xz", b"not xz").is_err());
    }

    #[test]
    fn builtin_names_match() {
        let b = "kernel/fs/ext4/ext4.ko\nkernel/drivers/net/virtio_net.ko\n";
        assert!(is_builtin(Some(b), "virtio-net"));
        assert!(is_builtin(Some(b), "ext4"));
        assert!(!is_builtin(Some(b), "nfs"));
        assert!(!is_builtin(None, "ext4"));
    }

    #[test]
    fn module_names_are_checked() {
        assert!(check_name("nfsv4").is_ok());
        assert!(check_name("virtio-net").is_ok());
        for bad in ["", "a b", "a/b", "$(x)"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
