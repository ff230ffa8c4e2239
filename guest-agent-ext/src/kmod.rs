//! Loads the kernel modules a file system needs when the guest kernel has them as modules
//! (Debian kernels in test guests); a kernel with them built in (Kata's, with CNFS's config
//! fragment) needs nothing. Dependencies come from `modules.dep` (read by
//! `cnfs_protocols::modules_dep`, as the image builder reads it), loaded deepest first, the
//! way modprobe does; compressed modules are handed to the kernel to decompress.

use std::fs::File;
use std::path::{Path, PathBuf};

use cnfs_protocols::modules_dep::{self, canonical, module_name, ModulesDep, ModulesDepError};
use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};

#[derive(Debug, thiserror::Error)]
pub enum KmodError {
    #[error("kernel module {0} is neither loaded, built in, nor listed in {1}")]
    Missing(String, String),
    #[error("loading kernel module {module} from {path}: {errno}")]
    Load {
        module: String,
        path: String,
        errno: Errno,
    },
    #[error("reading {0}: {1}")]
    Io(String, std::io::Error),
    #[error("{0}: {1}")]
    Parse(String, ModulesDepError),
}

/// `/lib/modules/<release>` of the running kernel.
pub fn default_dir() -> PathBuf {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    Path::new("/lib/modules").join(release)
}

fn is_loaded(name: &str) -> bool {
    Path::new("/sys/module").join(canonical(name)).exists()
}

fn is_builtin(dir: &Path, name: &str) -> bool {
    std::fs::read_to_string(dir.join("modules.builtin"))
        .map(|t| modules_dep::lists_builtin(&t, name))
        .unwrap_or(false)
}

/// Makes sure `name` is available: already loaded, built in, or loaded now with its
/// dependencies. Blocking (file reads and finit_module); call it off the async workers.
pub fn ensure(dir: &Path, name: &str) -> Result<(), KmodError> {
    if is_loaded(name) || is_builtin(dir, name) {
        return Ok(());
    }
    let dep_path = dir.join("modules.dep");
    let deps = std::fs::read_to_string(&dep_path)
        .map_err(|e| KmodError::Io(dep_path.display().to_string(), e))?;
    let order = ModulesDep::parse(&deps)
        .map_err(|e| KmodError::Parse(dep_path.display().to_string(), e))?
        .load_order(name)
        .ok_or_else(|| KmodError::Missing(name.to_string(), dep_path.display().to_string()))?;
    for rel in order {
        if is_loaded(&module_name(&rel)) {
            continue;
        }
        let path = dir.join(&rel);
        load_file(&path).map_err(|errno| KmodError::Load {
            module: module_name(&rel),
            path: path.display().to_string(),
            errno,
        })?;
    }
    Ok(())
}

/// finit_module(2); compressed files (`.ko.xz`, `.ko.zst`, `.ko.gz`) ask the kernel to
/// decompress (MODULE_INIT_COMPRESSED_FILE, Linux 6.4+).
fn load_file(path: &Path) -> Result<(), Errno> {
    // Not among nix's named flags (its list predates Linux 6.4).
    const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;
    let file =
        File::open(path).map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    let compressed = !path.to_string_lossy().ends_with(".ko");
    let flags = if compressed {
        ModuleInitFlags::from_bits_retain(MODULE_INIT_COMPRESSED_FILE)
    } else {
        ModuleInitFlags::empty()
    };
    match finit_module(&file, c"", flags) {
        Ok(()) | Err(Errno::EEXIST) => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/fs/nfs/nfsv4.ko.xz: kernel/net/dns_resolver/dns_resolver.ko.xz kernel/fs/nfs/nfs.ko.xz kernel/net/sunrpc/sunrpc.ko.xz
kernel/fs/nfs/nfs.ko.xz: kernel/net/sunrpc/sunrpc.ko.xz
kernel/net/sunrpc/sunrpc.ko.xz:
kernel/drivers/net/virtio-net.ko:
";

    #[test]
    fn dependencies_load_deepest_first() {
        let dep = ModulesDep::parse(DEP).expect("parse");
        assert_eq!(
            dep.load_order("nfsv4").expect("listed"),
            vec![
                "kernel/net/sunrpc/sunrpc.ko.xz",
                "kernel/fs/nfs/nfs.ko.xz",
                "kernel/net/dns_resolver/dns_resolver.ko.xz",
                "kernel/fs/nfs/nfsv4.ko.xz",
            ]
        );
        assert_eq!(
            dep.load_order("virtio_net")
                .expect("dash and underscore match"),
            vec!["kernel/drivers/net/virtio-net.ko"]
        );
        assert!(dep.load_order("ceph").is_none());
    }

    #[test]
    fn a_module_missing_from_modules_dep_or_a_bad_file_is_named() {
        let dir = std::env::temp_dir().join(format!("cnfs-kmod-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("modules.dep"), DEP).expect("write");
        // Not a real module name anywhere, so never loaded or built in on the test host.
        let e = ensure(&dir, "cnfs-no-such-module").expect_err("missing");
        assert!(
            matches!(e, KmodError::Missing(ref m, _) if m == "cnfs-no-such-module"),
            "{e}"
        );
        std::fs::write(dir.join("modules.dep"), "kernel/a.ko:\n/abs/b.ko:\n").expect("write");
        let e = ensure(&dir, "cnfs-no-such-module").expect_err("bad file");
        assert!(e.to_string().contains("modules.dep line 2"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
