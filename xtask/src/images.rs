//! OCI images of CNFS's static binaries, built offline and reproducibly (issue 11): an OCI
//! image layout (image-spec v1.1: `oci-layout`, `index.json`, `blobs/sha256/...`) in one tar,
//! which `ctr images import` and registries (`skopeo copy oci-archive:...`) take. Everything
//! that could vary is fixed: file order, times (0), owners (0:0), gzip header, JSON key
//! order; so the same inputs give the same digest.
//!
//! Written by hand rather than with buildah: it needs no daemon, storage driver or root, and
//! the whole format is four small JSON documents and two tars (serde_json, tar, flate2, sha2,
//! all well-kept crates already in the dependency tree).

use std::io::Write;
use std::path::Path;
use std::process::Command;

use anyhow::Context;
use flate2::{Compression, GzBuilder};
use serde_json::json;
use sha2::{Digest, Sha256};

/// One file in the image's single layer.
pub struct File {
    pub path: String,
    pub mode: u32,
    pub data: Vec<u8>,
}

pub struct Image {
    /// Repository and tag, e.g. `registry.example.com/cnfs/cnfs-csi:0.1.0`.
    pub reference: String,
    pub version: String,
    /// The source revision (git commit) the binaries were built from.
    pub revision: String,
    pub source: String,
    pub licenses: String,
    pub entrypoint: Vec<String>,
    /// `uid:gid` the container runs as unless the pod says otherwise.
    pub user: String,
    pub files: Vec<File>,
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A path in a tar: a directory (`None`) or a file's mode and bytes.
type Entry<'a> = (String, Option<(u32, &'a [u8])>);

/// A tar with fixed metadata; directories for every parent, all sorted.
fn tar(entries: &[(String, u32, Vec<u8>)]) -> anyhow::Result<Vec<u8>> {
    let mut paths: Vec<Entry<'_>> = Vec::new();
    for (p, mode, data) in entries {
        let mut acc = String::new();
        let parents = p.rsplit_once('/').map_or("", |(d, _)| d);
        for comp in parents.split('/').filter(|c| !c.is_empty()) {
            acc.push_str(comp);
            acc.push('/');
            if !paths.iter().any(|(q, _)| q == &acc) {
                paths.push((acc.clone(), None));
            }
        }
        paths.push((p.clone(), Some((*mode, data.as_slice()))));
    }
    paths.sort_by(|a, b| a.0.cmp(&b.0));
    let mut b = tar::Builder::new(Vec::new());
    for (p, file) in paths {
        let mut h = tar::Header::new_ustar();
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        match file {
            None => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                h.set_cksum();
                b.append_data(&mut h, &p, std::io::empty())?;
            }
            Some((mode, data)) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(mode);
                h.set_size(data.len() as u64);
                h.set_cksum();
                b.append_data(&mut h, &p, data)?;
            }
        }
    }
    Ok(b.into_inner()?)
}

fn gzip(data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut enc = GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(Vec::new(), Compression::default());
    enc.write_all(data)?;
    Ok(enc.finish()?)
}

/// The image as an OCI layout archive, and the digest of its manifest.
pub fn oci_archive(img: &Image) -> anyhow::Result<(Vec<u8>, String)> {
    let layer_tar = tar(&img
        .files
        .iter()
        .map(|f| {
            (
                f.path.trim_start_matches('/').to_string(),
                f.mode,
                f.data.clone(),
            )
        })
        .collect::<Vec<_>>())
    .context("layer")?;
    let diff_id = format!("sha256:{}", sha256_hex(&layer_tar));
    let layer = gzip(&layer_tar)?;
    let layer_digest = format!("sha256:{}", sha256_hex(&layer));
    let labels = json!({
        "org.opencontainers.image.licenses": img.licenses,
        "org.opencontainers.image.revision": img.revision,
        "org.opencontainers.image.source": img.source,
        "org.opencontainers.image.version": img.version,
    });
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "config": {
            "Entrypoint": img.entrypoint,
            "Labels": labels,
            "User": img.user,
        },
        "created": "1970-01-01T00:00:00Z",
        "os": "linux",
        "rootfs": {"diff_ids": [diff_id], "type": "layers"},
    }))?;
    let config_digest = format!("sha256:{}", sha256_hex(&config));
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": layer_digest,
            "size": layer.len(),
        }],
        "annotations": labels,
    }))?;
    let manifest_digest = format!("sha256:{}", sha256_hex(&manifest));
    let tag = img.reference.rsplit_once(':').map_or("latest", |(_, t)| t);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": {
                "io.containerd.image.name": img.reference,
                "org.opencontainers.image.ref.name": tag,
            },
            "platform": {"architecture": "amd64", "os": "linux"},
        }],
    }))?;
    let blob = |d: &str| format!("blobs/sha256/{}", d.trim_start_matches("sha256:"));
    let archive = tar(&[
        (
            "oci-layout".into(),
            0o644,
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
        ),
        ("index.json".into(), 0o644, index),
        (blob(&manifest_digest), 0o644, manifest),
        (blob(&config_digest), 0o644, config),
        (blob(&layer_digest), 0o644, layer),
    ])?;
    Ok((archive, manifest_digest))
}

/// Where the project's images are published: the one place their name is set in code
/// (configs/deploy/kustomization.yaml sets the same for the manifests; a unit test there
/// checks they agree).
pub const IMAGE_REPOSITORY: &str = "registry.example.com/cnfs";

/// The guest modules the installed initrd carries (Debian's kernel has these as modules;
/// Kata's own kernel with configs/kernel/cnfs.conf has them built in).
const BOOT_MODULES: &[&str] = &[
    "virtio_net",
    "vmw_vsock_virtio_transport",
    "virtio_blk",
    "overlay",
];
const VOLUME_MODULES: &[&str] = &[
    "nfsv3",
    "nfsv4",
    "ceph",
    "gcm",
    "ghash_generic",
    "cifs",
    "cmac",
    "ccm",
];

fn git_revision() -> String {
    Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(crate::root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn read(p: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(p).with_context(|| format!("reading {}", p.display()))
}

/// `cargo xtask images`: `cnfs-csi` (node and controller) and `cnfs-deploy` (the installer,
/// with its payload: the shim, cnfsctl, the guest kernel and the initrd overlay, the
/// configuration templates) as OCI archives in target/images/.
pub fn build_all(k: &crate::setup::KernelTree) -> anyhow::Result<()> {
    let triple = "x86_64-unknown-linux-gnu";
    crate::sh(
        crate::cargo()
            .args(["build", "--release", "--target", triple])
            .args([
                "-p",
                "cnfs-csi",
                "-p",
                "cnfs-deploy",
                "-p",
                "cnfs-host-shim",
            ])
            .args(["--bin", "cnfs-csi", "--bin", "cnfs-deploy"])
            .args(["--bin", "containerd-shim-cnfs-v2", "--bin", "cnfsctl"])
            .env("RUSTFLAGS", crate::static_rustflags()),
    )?;
    let root = crate::root();
    let bin = root.join("target").join(triple).join("release");
    let out = root.join("target").join("images");
    std::fs::create_dir_all(&out)?;

    // Guest assets, made the way configs/README.md tells admins to make them.
    let work = out.join("payload-work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let builder = root.join("target/release/cnfs-rootfs-builder");
    crate::sh(
        Command::new(&builder)
            .arg("kata-kernel")
            .arg("--vmlinuz")
            .arg(&k.vmlinuz)
            .arg("--out-dir")
            .arg(&work),
    )?;
    let mut overlay = Command::new(&builder);
    overlay
        .arg("initrd-overlay")
        .arg("--agent")
        .arg(bin.join("cnfs-agent"))
        .arg("--gzip")
        .arg("--kernel-tree")
        .arg(&k.tree)
        .args(["--kernel-release", &k.release]);
    for m in BOOT_MODULES {
        overlay.args(["--boot-module", m]);
    }
    for m in VOLUME_MODULES {
        overlay.args(["--module", m]);
    }
    // Encrypted volumes: cryptsetup and mke2fs (luks2) and gocryptfs under
    // /usr/lib/cnfs/tools, sharing one copy of each library, and their modules.
    overlay.args(["--luks2-tools", "--gocryptfs-tools"]);
    crate::sh(overlay.arg("--out").arg(work.join("cnfs-overlay.cpio.gz")))?;

    let version = env!("CARGO_PKG_VERSION").to_string();
    let image = |name: &str, entrypoint: &str, user: &str, files: Vec<File>| Image {
        reference: format!("{IMAGE_REPOSITORY}/{name}:{version}"),
        version: version.clone(),
        revision: git_revision(),
        source: "https://github.com/cnfs/cnfs".into(),
        licenses: "Apache-2.0".into(),
        entrypoint: vec![entrypoint.into()],
        user: user.into(),
        files,
    };
    let csi = image(
        "cnfs-csi",
        "/usr/bin/cnfs-csi",
        "65532:65532",
        vec![File {
            path: "/usr/bin/cnfs-csi".into(),
            mode: 0o755,
            data: read(&bin.join("cnfs-csi"))?,
        }],
    );
    // The installer's payload, in the layout cnfs-deploy reads (one list, in its crate).
    let mut files = vec![File {
        path: "/usr/bin/cnfs-deploy".into(),
        mode: 0o755,
        data: read(&bin.join("cnfs-deploy"))?,
    }];
    for rel in cnfs_deploy::install::payload_layout() {
        let (src, mode) = if let Some(c) = rel.strip_prefix("configs/") {
            (root.join("configs").join(c), 0o644)
        } else if let Some(b) = rel.strip_prefix("bin/") {
            (bin.join(b), 0o755)
        } else if let Some(f) = rel.strip_prefix("share/kata/") {
            (work.join(f), 0o644)
        } else {
            anyhow::bail!("payload entry {rel} has no source");
        };
        files.push(File {
            path: format!("/payload/{rel}"),
            mode,
            data: read(&src)?,
        });
    }
    // Runs as root: it installs host software (privileged DaemonSet, configs/deploy/).
    let deploy = image("cnfs-deploy", "/usr/bin/cnfs-deploy", "0:0", files);
    for img in [csi, deploy] {
        let (archive, digest) = oci_archive(&img)?;
        let name = img
            .reference
            .rsplit_once('/')
            .map_or(img.reference.as_str(), |(_, n)| n)
            .replace(':', "-");
        let path = out.join(format!("{name}.oci.tar"));
        std::fs::write(&path, archive)?;
        println!("{} {digest} {}", img.reference, path.display());
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// Where the CephFS bench puts ceph-fuse in its guest: a private prefix like the agent's
/// tools' (`/usr/lib/cnfs/tools`), so that no file of the test image's own /lib is replaced.
pub const BENCH_PREFIX: &str = "/usr/lib/cnfs/bench";

/// The program the CephFS bench runs in its guest (Debian package ceph-fuse).
const CEPH_FUSE: &str = "/usr/bin/ceph-fuse";

/// `cpio ARGS` in `dir` with `input` on stdin; its stdout.
fn cpio(args: &[&str], dir: &Path, input: &[u8]) -> anyhow::Result<Vec<u8>> {
    use std::process::Stdio;
    let mut child = Command::new("cpio")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running cpio (Debian package cpio)")?;
    let mut stdin = child.stdin.take().context("cpio's stdin")?;
    let input = input.to_vec();
    // Written from a thread: cpio may fill its stdout before it has read all of its input.
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output()?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("cpio input thread panicked"))??;
    anyhow::ensure!(
        out.status.success(),
        "cpio {}: {}: {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(out.stdout)
}

fn gunzip(data: &[u8]) -> anyhow::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(data).read_to_end(&mut out)?;
    Ok(out)
}

/// Where each file of a program's closure goes (archive paths, as `cpio -t` lists them):
/// the program to `BENCH_PREFIX/bin`, everything else (the loader, the libraries) to
/// `BENCH_PREFIX/lib` under its file name. Refused: two files for one place, a closure
/// without the program or without the loader the bench runs it through.
fn bench_placement<'a>(files: &[&'a str], program: &str) -> anyhow::Result<Vec<(&'a str, String)>> {
    let prefix = BENCH_PREFIX.trim_start_matches('/');
    let mut placed: std::collections::BTreeMap<String, &str> = Default::default();
    for &name in files {
        let file = name.rsplit('/').next().unwrap_or(name);
        let dir = if format!("/{name}") == program {
            "bin"
        } else {
            "lib"
        };
        let dest = format!("{prefix}/{dir}/{file}");
        if let Some(prev) = placed.insert(dest.clone(), name) {
            anyhow::bail!("{prev} and {name} would both be {dest}");
        }
    }
    let program_name = program.rsplit('/').next().unwrap_or(program);
    for want in [
        format!("{prefix}/bin/{program_name}"),
        format!("{prefix}/lib/ld-linux-x86-64.so.2"),
    ] {
        anyhow::ensure!(
            placed.contains_key(&want),
            "the closure of {program} has nothing for {want}: {files:?}"
        );
    }
    Ok(placed.into_iter().map(|(dest, src)| (src, dest)).collect())
}

/// The CephFS bench guest's own addition to the test initrd (which every test boots, and
/// which stays without it): a gzip'ed newc cpio with this host's ceph-fuse at
/// `BENCH_PREFIX/bin/ceph-fuse` and its loader and libraries in `BENCH_PREFIX/lib`, run as
/// `BENCH_PREFIX/lib/ld-linux-x86-64.so.2 --library-path BENCH_PREFIX/lib ...` (as the
/// agent's tool runner runs cryptsetup). The closure is the rootfs builder's: what
/// `test-initrd --binary /usr/bin/ceph-fuse` adds over the same build without it (at the
/// loader's own paths there), each file moved under the prefix by its file name, the name
/// the loader searches `--library-path` by. The archive holds `usr/lib/cnfs` and below only:
/// appended after the test initrd, no entry of it replaces one of the image's. `work` is a
/// scratch directory.
pub fn ceph_fuse_cpio(work: &Path) -> anyhow::Result<Vec<u8>> {
    anyhow::ensure!(
        Path::new(CEPH_FUSE).is_file(),
        "{CEPH_FUSE} is missing: install the Debian package ceph-fuse (`cargo xtask bench` does)"
    );
    let parts = cnfs_testbed::artifacts::Parts::locate()?;
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work)?;
    // The entries of a test initrd built with `extra` (as `cpio -t` lists them), and the
    // uncompressed archive.
    let build = |name: &str, extra: &[&str]| -> anyhow::Result<(Vec<String>, Vec<u8>)> {
        let out = work.join(format!("{name}.cpio.gz"));
        crate::sh(
            Command::new(parts.bin("cnfs-rootfs-builder"))
                .arg("test-initrd")
                .arg("--kernel-tree")
                .arg(&parts.kernel_tree)
                .args(["--kernel-release", &parts.kernel_release])
                .arg("--agent")
                .arg(parts.bin("cnfs-agent"))
                .args(["--busybox", "/bin/busybox"])
                .args(extra)
                .arg("--out")
                .arg(&out),
        )?;
        let newc = gunzip(&read(&out)?)?;
        let list = cpio(&["-it", "--quiet"], work, &newc)?;
        let names = String::from_utf8(list)
            .context("cpio listing")?
            .lines()
            .map(str::to_string)
            .collect();
        Ok((names, newc))
    };
    let (base, _) = build("base", &[])?;
    let (with, newc) = build("with-ceph-fuse", &["--binary", CEPH_FUSE])?;
    let tree = work.join("with-ceph-fuse");
    std::fs::create_dir_all(&tree)?;
    cpio(
        &["-idm", "--quiet", "--no-absolute-filenames"],
        &tree,
        &newc,
    )?;
    let stage = work.join("stage");
    let mut added = Vec::new();
    for name in with.iter().filter(|n| !base.contains(n)) {
        // Files only: the loader's directories are not part of the prefix.
        if std::fs::symlink_metadata(tree.join(name))?.is_file() {
            added.push(name.as_str());
        }
    }
    for (src, dest) in bench_placement(&added, CEPH_FUSE)? {
        let dest = stage.join(dest);
        std::fs::create_dir_all(dest.parent().context("parent")?)?;
        std::fs::copy(tree.join(src), &dest).with_context(|| format!("copying {src}"))?;
    }
    // Directories before their files, sorted: the kernel creates a file's parent only from
    // an earlier entry.
    let mut names = vec!["usr/lib/cnfs".to_string()];
    let mut dirs = vec![stage.join("usr/lib/cnfs")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                dirs.push(p.clone());
            }
            let rel = p
                .strip_prefix(&stage)?
                .to_str()
                .context("a non-UTF-8 name")?;
            names.push(rel.to_string());
        }
    }
    names.sort();
    let list: String = names.iter().map(|n| format!("{n}\n")).collect();
    let newc = cpio(
        &["-o", "-H", "newc", "-R", "0:0", "--reproducible", "--quiet"],
        &stage,
        list.as_bytes(),
    )?;
    gzip(&newc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(data: &[u8]) -> Image {
        Image {
            reference: "registry.example.com/cnfs/test:0.1.0".into(),
            version: "0.1.0".into(),
            revision: "abc".into(),
            source: "https://example.com/cnfs".into(),
            licenses: "Apache-2.0".into(),
            entrypoint: vec!["/usr/bin/x".into()],
            user: "65532:65532".into(),
            files: vec![File {
                path: "/usr/bin/x".into(),
                mode: 0o755,
                data: data.to_vec(),
            }],
        }
    }

    #[test]
    fn the_bench_closure_goes_under_the_private_prefix_by_file_name() {
        let files = [
            "lib64/ld-linux-x86-64.so.2",
            "lib/x86_64-linux-gnu/libc.so.6",
            "usr/bin/ceph-fuse",
            "usr/lib/x86_64-linux-gnu/ceph/libceph-common.so.2",
        ];
        let placed = bench_placement(&files, "/usr/bin/ceph-fuse").expect("placement");
        assert_eq!(
            placed,
            [
                (
                    "usr/bin/ceph-fuse",
                    "usr/lib/cnfs/bench/bin/ceph-fuse".to_string()
                ),
                (
                    "lib64/ld-linux-x86-64.so.2",
                    "usr/lib/cnfs/bench/lib/ld-linux-x86-64.so.2".to_string()
                ),
                (
                    "lib/x86_64-linux-gnu/libc.so.6",
                    "usr/lib/cnfs/bench/lib/libc.so.6".to_string()
                ),
                (
                    "usr/lib/x86_64-linux-gnu/ceph/libceph-common.so.2",
                    "usr/lib/cnfs/bench/lib/libceph-common.so.2".to_string()
                ),
            ]
        );
    }

    #[test]
    fn a_bench_closure_with_a_clash_or_without_its_loader_is_refused() {
        let clash = [
            "lib64/ld-linux-x86-64.so.2",
            "usr/bin/ceph-fuse",
            "lib/x86_64-linux-gnu/libz.so.1",
            "usr/lib/x86_64-linux-gnu/libz.so.1",
        ];
        let e = bench_placement(&clash, "/usr/bin/ceph-fuse").expect_err("clash");
        assert_eq!(
            e.to_string(),
            "lib/x86_64-linux-gnu/libz.so.1 and usr/lib/x86_64-linux-gnu/libz.so.1 would both \
             be usr/lib/cnfs/bench/lib/libz.so.1"
        );
        let e =
            bench_placement(&["usr/bin/ceph-fuse"], "/usr/bin/ceph-fuse").expect_err("no loader");
        assert!(
            e.to_string()
                .contains("has nothing for usr/lib/cnfs/bench/lib/ld-linux-x86-64.so.2"),
            "{e}"
        );
        let e = bench_placement(&["lib64/ld-linux-x86-64.so.2"], "/usr/bin/ceph-fuse")
            .expect_err("no program");
        assert!(
            e.to_string()
                .contains("has nothing for usr/lib/cnfs/bench/bin/ceph-fuse"),
            "{e}"
        );
    }

    #[test]
    fn the_same_inputs_give_the_same_bytes_and_digest() {
        let (a, da) = oci_archive(&image(b"binary")).expect("a");
        let (b, db) = oci_archive(&image(b"binary")).expect("b");
        assert_eq!((a, da.clone()), (b, db));
        let (_, dc) = oci_archive(&image(b"other")).expect("c");
        assert_ne!(da, dc);
    }

    /// The format against a real peer: containerd imports the archive (by the name in the
    /// index), unpacks the layer and runs its entrypoint as the image's user.
    #[test]
    fn containerd_imports_the_archive_and_runs_its_entrypoint_as_its_user() {
        use cnfs_testbed::containerd::{Containerd, MINIMAL};
        let img = Image {
            reference: "registry.example.com/cnfs/busybox-test:0.1.0".into(),
            entrypoint: vec!["/bin/busybox".into(), "id".into()],
            files: vec![File {
                path: "/bin/busybox".into(),
                mode: 0o755,
                data: std::fs::read("/bin/busybox").expect("static busybox (busybox-static)"),
            }],
            ..image(b"")
        };
        let (archive, digest) = oci_archive(&img).expect("build");
        let ctd = Containerd::start(MINIMAL).expect("containerd");
        let path = ctd.dir().join("image.oci.tar");
        std::fs::write(&path, archive).expect("write");
        let path = path.display().to_string();
        ctd.ctr(&["images", "import", "--snapshotter", "native", &path])
            .expect("import");
        let list = ctd.ctr(&["images", "ls"]).expect("ls");
        assert!(
            list.contains("registry.example.com/cnfs/busybox-test:0.1.0") && list.contains(&digest),
            "{list}"
        );
        let out = ctd
            .ctr(&[
                "run",
                "--rm",
                "--snapshotter",
                "native",
                "registry.example.com/cnfs/busybox-test:0.1.0",
                "cnfs-image-test",
            ])
            .expect("run");
        assert!(out.starts_with("uid=65532 gid=65532"), "{out}");
    }

    #[test]
    fn the_layout_holds_what_the_index_and_manifest_name() {
        let (archive, digest) = oci_archive(&image(b"binary")).expect("build");
        let mut ar = tar::Archive::new(&archive[..]);
        let mut files = std::collections::BTreeMap::new();
        for e in ar.entries().expect("entries") {
            let mut e = e.expect("entry");
            let path = e.path().expect("path").display().to_string();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).expect("read");
            assert_eq!(e.header().mtime().expect("mtime"), 0);
            files.insert(path, data);
        }
        let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).expect("index");
        assert_eq!(index["manifests"][0]["digest"], digest);
        let m = &files[&format!("blobs/sha256/{}", &digest[7..])];
        assert_eq!(
            format!("sha256:{}", sha256_hex(m)),
            digest,
            "blobs are content-addressed"
        );
        let manifest: serde_json::Value = serde_json::from_slice(m).expect("manifest");
        let layer_digest = manifest["layers"][0]["digest"].as_str().expect("layer");
        assert!(files.contains_key(&format!("blobs/sha256/{}", &layer_digest[7..])));
        assert_eq!(
            manifest["annotations"]["org.opencontainers.image.version"],
            "0.1.0"
        );
        assert_eq!(
            index["manifests"][0]["annotations"]["io.containerd.image.name"],
            "registry.example.com/cnfs/test:0.1.0"
        );
    }
}
