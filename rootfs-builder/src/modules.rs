//! Picks kernel modules out of an extracted kernel package: the closure of the requested
//! names over `modules.dep`, decompressed to plain `.ko` (busybox modprobe in the test guest
//! cannot be relied on to decompress), and a `modules.dep` that lists only those.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{bail, Context as _, Result};

/// Module names use `_` in the kernel and may use `-` in file names.
fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

/// `kernel/drivers/net/virtio-net.ko.xz` -> `virtio_net`.
fn stem(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    canonical(file.split(".ko").next().unwrap_or(file))
}

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

/// Paths from modules.dep are joined to the kernel tree: refuse anything that could leave it.
fn check_rel(path: &str) -> Result<()> {
    if path.starts_with('/')
        || path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        bail!("modules.dep path {path:?} is not a plain relative path");
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

/// `modules.dep`: each module path with its dependencies, in the file's order (loading them
/// in reverse, then the module, works).
#[derive(Debug, Default)]
pub struct ModulesDep {
    deps: BTreeMap<String, Vec<String>>,
    by_name: BTreeMap<String, String>,
}

impl ModulesDep {
    pub fn parse(text: &str) -> Result<Self> {
        let mut dep = ModulesDep::default();
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let (module, deps) = line
                .split_once(':')
                .with_context(|| format!("modules.dep line {}: no `:`", n + 1))?;
            let module = module.trim().to_string();
            let deps: Vec<String> = deps.split_whitespace().map(str::to_string).collect();
            for p in std::iter::once(&module).chain(&deps) {
                check_rel(p).with_context(|| format!("modules.dep line {}", n + 1))?;
            }
            // depmod lists each name once; should two files share one, the first wins.
            dep.by_name.entry(stem(&module)).or_insert(module.clone());
            dep.deps.insert(module, deps);
        }
        Ok(dep)
    }

    pub fn find(&self, name: &str) -> Option<&str> {
        self.by_name.get(&canonical(name)).map(String::as_str)
    }

    /// Every module file needed for `paths`: themselves and their dependencies, transitively
    /// (depmod already lists the full set, but a hand-made file may not).
    pub fn closure<'a>(&self, paths: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<String> = paths.into_iter().map(str::to_string).collect();
        while let Some(p) = todo.pop() {
            if let Some(deps) = self.deps.get(&p) {
                todo.extend(deps.iter().filter(|d| !seen.contains(*d)).cloned());
            }
            seen.insert(p);
        }
        seen
    }

    /// A modules.dep for just `modules`, with paths rewritten to `.ko`, lines sorted.
    pub fn restricted(&self, modules: &BTreeSet<String>) -> Result<String> {
        let mut lines = Vec::new();
        for m in modules {
            let deps = self.deps.get(m).map(Vec::as_slice).unwrap_or_default();
            let mut line = format!("{}:", plain_path(m)?);
            for d in deps {
                line.push(' ');
                line.push_str(&plain_path(d)?);
            }
            lines.push(line);
        }
        lines.sort();
        Ok(lines.iter().map(|l| format!("{l}\n")).collect())
    }
}

/// `modules.builtin` lists modules compiled into the kernel: asking for one is fine, there is
/// just nothing to copy.
fn is_builtin(builtin: Option<&str>, name: &str) -> bool {
    let want = canonical(name);
    builtin.is_some_and(|t| {
        t.lines()
            .any(|l| !l.trim().is_empty() && stem(l.trim()) == want)
    })
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
        modules_dep: dep.restricted(&closure)?,
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
            dep.restricted(&c).expect("restricted"),
            "kernel/fs/nfs/nfs.ko: kernel/net/sunrpc/sunrpc.ko\nkernel/net/sunrpc/sunrpc.ko:\n"
        );
        let all = dep.closure(["kernel/fs/nfs/nfsv4.ko.xz"]);
        assert_eq!(all.len(), 4);
        // dependency order is kept: it is the load order, reversed
        assert!(dep.restricted(&all).expect("restricted").contains(
            "nfsv4.ko: kernel/net/dns_resolver/dns_resolver.ko kernel/fs/nfs/nfs.ko kernel/net/sunrpc/sunrpc.ko\n"
        ));
    }

    #[test]
    fn paths_leaving_the_tree_are_refused() {
        assert!(ModulesDep::parse("../../etc/shadow.ko:\n").is_err());
        assert!(ModulesDep::parse("/abs/x.ko:\n").is_err());
        assert!(ModulesDep::parse("a.ko: b/../../c.ko\n").is_err());
        assert!(ModulesDep::parse("no colon here\n").is_err());
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
