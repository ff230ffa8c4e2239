//! `modules.dep`, depmod's index of kernel modules, read the same way by the guest agent
//! (which loads a file system's modules) and the rootfs builder (which copies them into an
//! image): each line is `<module path>: <dependency path> ...`, the dependencies listed so
//! that loading them in reverse, then the module, works. Module names use `_` in the kernel
//! and may use `-` in file names (`virtio-net.ko` is `virtio_net`).

use std::collections::{BTreeMap, BTreeSet};

/// A `modules.dep` line that cannot be used, by its 1-based number.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("modules.dep line {line}: {reason}")]
pub struct ModulesDepError {
    pub line: usize,
    pub reason: String,
}

/// The name the kernel knows a module by: `-` in file names is `_` in sysfs.
pub fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

/// The module name of a path from `modules.dep` or `modules.builtin`:
/// `kernel/drivers/net/virtio-net.ko.xz` -> `virtio_net`.
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    canonical(file.split(".ko").next().unwrap_or(file))
}

/// True when `modules.builtin` text (one path per line) lists module `name`: the kernel has
/// it compiled in, so there is nothing to load or copy.
pub fn lists_builtin(modules_builtin: &str, name: &str) -> bool {
    let want = canonical(name);
    modules_builtin
        .lines()
        .map(str::trim)
        .any(|l| !l.is_empty() && module_name(l) == want)
}

/// A parsed `modules.dep`: each module path with its dependencies, in the file's order.
#[derive(Debug, Default)]
pub struct ModulesDep {
    deps: BTreeMap<String, Vec<String>>,
    by_name: BTreeMap<String, String>,
}

impl ModulesDep {
    /// Parses the whole file. Blank lines are skipped; a line without `:`, or a path that
    /// is absolute or has an empty, `.` or `..` component (it is joined to a modules
    /// directory and must stay in it), is refused with its line number.
    pub fn parse(text: &str) -> Result<Self, ModulesDepError> {
        let mut dep = ModulesDep::default();
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let error = |reason: String| ModulesDepError {
                line: n + 1,
                reason,
            };
            let (module, deps) = line
                .split_once(':')
                .ok_or_else(|| error("no `:` after the module path".into()))?;
            let module = module.trim().to_string();
            let deps: Vec<String> = deps.split_whitespace().map(str::to_string).collect();
            for p in std::iter::once(&module).chain(&deps) {
                if !is_plain_relative(p) {
                    return Err(error(format!(
                        "path {p:?} is not a plain relative path (absolute, empty, `.` or `..`)"
                    )));
                }
            }
            // depmod lists each name once; should two files share one, the first wins.
            dep.by_name
                .entry(module_name(&module))
                .or_insert(module.clone());
            dep.deps.insert(module, deps);
        }
        Ok(dep)
    }

    /// The path of module `name` (`-` and `_` alike), if listed.
    pub fn find(&self, name: &str) -> Option<&str> {
        self.by_name.get(&canonical(name)).map(String::as_str)
    }

    /// The dependencies `modules.dep` lists for module `path`, in its order.
    pub fn deps_of(&self, path: &str) -> Option<&[String]> {
        self.deps.get(path).map(Vec::as_slice)
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

    /// The order to load module `name` in: every dependency before the modules that need it
    /// (each line's list taken in reverse, as modprobe does, transitively), the module last.
    /// `None` when `modules.dep` does not list it. A cycle (never written by depmod) ends
    /// where it closes instead of looping.
    pub fn load_order(&self, name: &str) -> Option<Vec<String>> {
        let root = self.find(name)?;
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        // Depth first, post-order, without recursion: (path, dependencies already pushed).
        let mut stack = vec![(root, false)];
        while let Some((path, expanded)) = stack.pop() {
            if expanded {
                order.push(path.to_string());
                continue;
            }
            if !seen.insert(path) {
                continue;
            }
            stack.push((path, true));
            // Pushed in file order, so popped (and loaded) in reverse, as modprobe does.
            for d in self.deps_of(path).unwrap_or_default() {
                if !seen.contains(d.as_str()) {
                    stack.push((d, false));
                }
            }
        }
        Some(order)
    }
}

fn is_plain_relative(path: &str) -> bool {
    !path.starts_with('/')
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DEP: &str = "\
kernel/fs/nfs/nfsv4.ko.xz: kernel/net/dns_resolver/dns_resolver.ko.xz kernel/fs/nfs/nfs.ko.xz kernel/net/sunrpc/sunrpc.ko.xz
kernel/fs/nfs/nfs.ko.xz: kernel/net/sunrpc/sunrpc.ko.xz
kernel/net/sunrpc/sunrpc.ko.xz:
kernel/net/dns_resolver/dns_resolver.ko.xz:
kernel/drivers/net/virtio-net.ko:
";

    #[test]
    fn dependencies_load_deepest_first() {
        let dep = ModulesDep::parse(DEP).expect("parse");
        assert_eq!(
            dep.load_order("nfsv4").expect("listed"),
            [
                "kernel/net/sunrpc/sunrpc.ko.xz",
                "kernel/fs/nfs/nfs.ko.xz",
                "kernel/net/dns_resolver/dns_resolver.ko.xz",
                "kernel/fs/nfs/nfsv4.ko.xz",
            ]
        );
        assert_eq!(
            dep.load_order("virtio_net")
                .expect("dash and underscore match"),
            ["kernel/drivers/net/virtio-net.ko"]
        );
        assert_eq!(dep.load_order("ceph"), None);
    }

    #[test]
    fn a_hand_made_file_missing_indirect_dependencies_still_loads_them_first() {
        // `a` lists only `b`; `b` needs `c`: c, b, a.
        let dep = ModulesDep::parse("a.ko: b.ko\nb.ko: c.ko\nc.ko:\n").expect("parse");
        assert_eq!(
            dep.load_order("a").expect("listed"),
            ["c.ko", "b.ko", "a.ko"]
        );
        // A cycle ends instead of looping, each module once.
        let cyclic = ModulesDep::parse("a.ko: b.ko\nb.ko: a.ko\n").expect("parse");
        assert_eq!(cyclic.load_order("a").expect("listed"), ["b.ko", "a.ko"]);
    }

    #[test]
    fn names_match_with_dash_or_underscore() {
        assert_eq!(
            module_name("kernel/drivers/net/virtio-net.ko.xz"),
            "virtio_net"
        );
        let dep = ModulesDep::parse(DEP).expect("parse");
        assert_eq!(
            dep.find("virtio-net"),
            Some("kernel/drivers/net/virtio-net.ko")
        );
        assert!(lists_builtin(
            "kernel/fs/ext4/ext4.ko\n\nkernel/drivers/net/virtio_net.ko\n",
            "virtio-net"
        ));
        assert!(!lists_builtin("kernel/fs/ext4/ext4.ko\n", "nfs"));
    }

    #[test]
    fn bad_lines_are_refused_by_number() {
        for (text, line, names) in [
            ("a.ko:\n../../etc/shadow.ko:\n", 2, "../../etc/shadow.ko"),
            ("/abs/x.ko:\n", 1, "/abs/x.ko"),
            ("a.ko: b/../../c.ko\n", 1, "b/../../c.ko"),
            ("a.ko: b//c.ko\n", 1, "b//c.ko"),
            ("\na.ko:\nno colon here\n", 3, "no `:`"),
        ] {
            let e = ModulesDep::parse(text).expect_err(text);
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.to_string().contains(names), "{text:?}: {e}");
        }
    }

    proptest! {
        #[test]
        fn parsing_any_text_never_panics_and_its_orders_end(
            text in prop_oneof![
                "\\PC{0,400}",
                "([a-z/._-]{0,12}:( [a-z/._-]{0,12}){0,4}\n){0,12}",
                "(m[0-3]\\.ko:( m[0-3]\\.ko){0,4}\n){0,6}",
            ],
            name in "[a-z0-3_-]{0,6}",
        ) {
            if let Ok(dep) = ModulesDep::parse(&text) {
                let all: Vec<String> = dep.deps.keys().cloned().collect();
                let closure = dep.closure(all.iter().map(String::as_str));
                prop_assert!(closure.len() >= all.len());
                if let Some(order) = dep.load_order(&name) {
                    // The module comes last, each file at most once.
                    prop_assert_eq!(order.last().map(String::as_str), dep.find(&name));
                    let unique: BTreeSet<&String> = order.iter().collect();
                    prop_assert_eq!(unique.len(), order.len());
                }
            }
            let _ = lists_builtin(&text, &name);
        }
    }
}
