//! The files the dynamic loader needs to run a host program in a guest: the program, its
//! interpreter (PT_INTERP) and the transitive DT_NEEDED closure, each resolved as glibc's
//! ld.so resolves it (read from the ELF files; neither `ldd` nor the program is run).
//!
//! Where each file goes in the guest: the program at its own path, the interpreter at exactly
//! its PT_INTERP path, a library where the guest's loader will look it up. Paths keep the
//! loader's spelling (`/lib/x86_64-linux-gnu/libc.so.6`, not the `/usr/lib/...` a merged-/usr
//! host resolves it to), so the guest needs no `lib -> usr/lib` link and its own `/lib` stays
//! a directory; the content is the real file's (symlinks followed). The guest has no
//! /etc/ld.so.cache, so its loader searches only RPATH/RUNPATH and its built-in system
//! directories: a library found through an ld.so.conf directory that is not a system directory
//! goes into the first system directory.

use std::collections::VecDeque;
use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use object::elf;
use object::read::elf::{Dyn as _, FileHeader, ProgramHeader as _};
use object::read::StringTable;
use object::{Endianness, FileKind};

/// Debian glibc's built-in directories, what `ld.so --help` lists as "system search path".
/// Not /lib64: Debian's loader does not search it (only the interpreter lives there).
pub const SYSTEM_DIRS: [&str; 4] = [
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib",
    "/usr/lib",
];

const LD_SO_CONF: &str = "/etc/ld.so.conf";

/// `include` nesting in ld.so.conf, bounded so an include loop is an error, not a hang.
const MAX_INCLUDE_DEPTH: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Program,
    Interpreter,
    Library,
}

/// One file of the closure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoaderFile {
    pub role: Role,
    /// Absolute and normalized: where the guest's kernel or loader opens it.
    pub guest_path: PathBuf,
    /// The host path the loader opened; reading it follows symlinks to the real file.
    pub source: PathBuf,
    pub mode: u32,
}

impl LoaderFile {
    /// `guest_path` as an archive path (relative, `/`-separated).
    pub fn archive_path(&self) -> Result<&str> {
        let s = self
            .guest_path
            .to_str()
            .with_context(|| format!("{}: path is not UTF-8", self.guest_path.display()))?;
        Ok(s.trim_start_matches('/'))
    }
}

/// Where libraries are searched after RPATH/RUNPATH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchPath {
    /// The directories of ld.so.conf in order: what ldconfig puts in ld.so.cache.
    pub conf_dirs: Vec<PathBuf>,
    /// The loader's built-in directories, searched last.
    pub system_dirs: Vec<PathBuf>,
}

impl SearchPath {
    /// This host's: /etc/ld.so.conf and Debian's system directories.
    pub fn host() -> Result<Self> {
        Self::from_conf(
            Path::new(LD_SO_CONF),
            SYSTEM_DIRS.iter().map(PathBuf::from).collect(),
        )
    }

    /// Reads `conf` as ldconfig does: one directory a line, `#` comments, `include GLOB...`
    /// (relative to the including file's directory), `hwcap` lines ignored, repeats dropped.
    pub fn from_conf(conf: &Path, system_dirs: Vec<PathBuf>) -> Result<Self> {
        let mut conf_dirs = Vec::new();
        read_conf(conf, 0, &mut conf_dirs)?;
        Ok(Self {
            conf_dirs,
            system_dirs,
        })
    }
}

fn read_conf(path: &Path, depth: usize, dirs: &mut Vec<PathBuf>) -> Result<()> {
    if depth > MAX_INCLUDE_DEPTH {
        bail!(
            "{}: `include` nested more than {MAX_INCLUDE_DEPTH} deep (an include loop?)",
            path.display()
        );
    }
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        // ldconfig, too, runs with no ld.so.conf at all.
        Err(e) if e.kind() == ErrorKind::NotFound && depth == 0 => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let (word, rest) = line.split_once([' ', '\t']).unwrap_or((line, ""));
        if word == "include" {
            for pattern in rest.split_whitespace() {
                let pattern = match path.parent() {
                    Some(dir) if !pattern.starts_with('/') => dir.join(pattern),
                    _ => PathBuf::from(pattern),
                };
                let text = pattern.to_str().with_context(|| {
                    format!(
                        "{}: include {}: not UTF-8",
                        path.display(),
                        pattern.display()
                    )
                })?;
                let files = glob::glob(text)
                    .with_context(|| format!("{}: include {text}", path.display()))?;
                for file in files {
                    let file =
                        file.with_context(|| format!("{}: include {text}", path.display()))?;
                    read_conf(&file, depth + 1, dirs)?;
                }
            }
            continue;
        }
        if word.eq_ignore_ascii_case("hwcap") {
            continue;
        }
        // ldconfig's old `DIR=TYPE` form: the type is no longer used.
        let dir = line.split_once('=').map_or(line, |(d, _)| d).trim_end();
        let dir = dir.trim_end_matches('/');
        // Relative directories would depend on the loader's working directory.
        if !dir.starts_with('/') {
            continue;
        }
        let dir = PathBuf::from(dir);
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    Ok(())
}

/// What ld.so requires every object of one process to share (it skips a candidate that
/// differs and goes on searching).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Kind {
    class: u8,
    data: u8,
    machine: u16,
}

#[derive(Debug, Default)]
struct ElfInfo {
    kind: Kind,
    interpreter: Option<String>,
    needed: Vec<String>,
    soname: Option<String>,
    /// None when DT_RUNPATH is present: ld.so then ignores DT_RPATH.
    rpath: Option<String>,
    runpath: Option<String>,
    /// DF_1_NODEFLIB: neither ld.so.cache nor the system directories are searched.
    nodeflib: bool,
}

fn kind_of(data: &[u8]) -> Option<Kind> {
    match FileKind::parse(data).ok()? {
        FileKind::Elf32 => header_kind::<elf::FileHeader32<Endianness>>(data),
        FileKind::Elf64 => header_kind::<elf::FileHeader64<Endianness>>(data),
        _ => None,
    }
}

fn header_kind<Elf: FileHeader<Endian = Endianness>>(data: &[u8]) -> Option<Kind> {
    let header = Elf::parse(data).ok()?;
    let endian = header.endian().ok()?;
    Some(Kind {
        class: header.e_ident().class,
        data: header.e_ident().data,
        machine: header.e_machine(endian),
    })
}

fn parse_elf(data: &[u8]) -> Result<ElfInfo> {
    match FileKind::parse(data) {
        Ok(FileKind::Elf32) => parse_as::<elf::FileHeader32<Endianness>>(data),
        Ok(FileKind::Elf64) => parse_as::<elf::FileHeader64<Endianness>>(data),
        _ => bail!("not an ELF file"),
    }
}

fn utf8(bytes: &[u8], what: &str) -> Result<String> {
    String::from_utf8(bytes.to_vec()).with_context(|| format!("{what} is not UTF-8"))
}

/// Reads the program headers and the dynamic segment, as the loader does (section headers
/// may be stripped).
fn parse_as<Elf: FileHeader<Endian = Endianness>>(data: &[u8]) -> Result<ElfInfo> {
    let header = Elf::parse(data)?;
    let endian = header.endian()?;
    let mut info = ElfInfo {
        kind: Kind {
            class: header.e_ident().class,
            data: header.e_ident().data,
            machine: header.e_machine(endian),
        },
        ..ElfInfo::default()
    };
    let phdrs = header.program_headers(endian, data)?;
    let mut dynamic = None;
    for ph in phdrs {
        if let Some(interp) = ph.interpreter(endian, data)? {
            info.interpreter = Some(utf8(interp, "PT_INTERP")?);
        }
        if let Some(d) = ph.dynamic(endian, data)? {
            dynamic = Some(d);
        }
    }
    let Some(dynamic) = dynamic else {
        return Ok(info);
    };
    let entries = dynamic
        .iter()
        .map(|d| (d.tag(endian), d.val(endian)))
        .take_while(|(tag, _)| *tag != elf::DT_NULL);
    let (mut strtab, mut strsz) = (None, None);
    for (tag, val) in entries.clone() {
        match tag {
            elf::DT_STRTAB => strtab = Some(val),
            elf::DT_STRSZ => strsz = Some(val),
            elf::DT_FLAGS_1 => info.nodeflib = val & u64::from(elf::DF_1_NODEFLIB) != 0,
            _ => {}
        }
    }
    let (Some(addr), Some(size)) = (strtab, strsz) else {
        return Ok(info);
    };
    // DT_STRTAB is an address: the table is where the PT_LOAD mapping that address puts it.
    let table = phdrs
        .iter()
        .filter(|ph| ph.p_type(endian) == elf::PT_LOAD)
        .find_map(|ph| ph.data_range(endian, data, addr, size).ok().flatten())
        .context("DT_STRTAB is not inside a PT_LOAD segment")?;
    let strings = StringTable::new(table, 0, size);
    let string = |val: u64, what: &str| -> Result<String> {
        let offset = u32::try_from(val).with_context(|| format!("{what}: bad string offset"))?;
        let bytes = strings
            .get(offset)
            .map_err(|()| anyhow::anyhow!("{what}: string offset {offset} out of DT_STRTAB"))?;
        utf8(bytes, what)
    };
    for (tag, val) in entries {
        match tag {
            elf::DT_NEEDED => info.needed.push(string(val, "DT_NEEDED")?),
            elf::DT_SONAME => info.soname = Some(string(val, "DT_SONAME")?),
            elf::DT_RPATH => info.rpath = Some(string(val, "DT_RPATH")?),
            elf::DT_RUNPATH => info.runpath = Some(string(val, "DT_RUNPATH")?),
            _ => {}
        }
    }
    if info.runpath.is_some() {
        info.rpath = None;
    }
    Ok(info)
}

/// `..` and `.` resolved by name: in the guest every directory on these paths is a real one.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

fn mode_of(path: &Path) -> Result<u32> {
    let meta = fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(meta.permissions().mode() & 0o777)
}

struct Object {
    /// The path the loader opens on the host.
    host: PathBuf,
    guest: PathBuf,
    /// Placed elsewhere in the guest than found on the host: `$ORIGIN` would differ.
    relocated: bool,
    /// The names this object answers to: the ones it was requested by and its DT_SONAME.
    names: Vec<String>,
    /// The object whose DT_NEEDED loaded it: its DT_RPATH is searched too.
    loader: Option<usize>,
    real: PathBuf,
    info: ElfInfo,
}

struct Found {
    host: PathBuf,
    guest: PathBuf,
    relocated: bool,
    info: ElfInfo,
}

struct Resolver<'a> {
    search: &'a SearchPath,
    program: String,
    kind: Kind,
    objects: Vec<Object>,
}

impl Resolver<'_> {
    /// `$ORIGIN` of object `i`, the directory it was opened from.
    fn origin(&self, i: usize) -> Result<&Path> {
        let o = &self.objects[i];
        if o.relocated {
            bail!(
                "{}: uses $ORIGIN but is placed in {} in the guest; not supported",
                o.host.display(),
                o.guest.display()
            );
        }
        o.host
            .parent()
            .with_context(|| format!("{}: no directory", o.host.display()))
    }

    /// The directories of an RPATH or RUNPATH of object `i`.
    fn expand(&self, list: &str, i: usize, tag: &str) -> Result<Vec<PathBuf>> {
        let mut dirs = Vec::new();
        for entry in list.split(':') {
            let mut dir = entry.to_string();
            for token in ["${ORIGIN}", "$ORIGIN"] {
                if dir.contains(token) {
                    let origin = self.origin(i)?;
                    let origin = origin.to_str().with_context(|| {
                        format!("{}: path is not UTF-8", self.objects[i].host.display())
                    })?;
                    dir = dir.replace(token, origin);
                }
            }
            if dir.contains('$') {
                bail!(
                    "{}: {tag} entry {entry:?}: only $ORIGIN is supported",
                    self.objects[i].host.display()
                );
            }
            // A relative entry is relative to the loader's working directory, unknown here.
            if dir.starts_with('/') {
                dirs.push(PathBuf::from(dir));
            }
        }
        Ok(dirs)
    }

    /// `dir/name` when it is an ELF file of the program's kind; other candidates are skipped,
    /// as ld.so skips them.
    fn try_dir(&self, dir: &Path, name: &str, searched: &mut Vec<String>) -> Result<Option<Found>> {
        let shown = dir.display().to_string();
        if !searched.contains(&shown) {
            searched.push(shown);
        }
        let path = dir.join(name);
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::NotFound | ErrorKind::NotADirectory | ErrorKind::IsADirectory
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        if kind_of(&data) != Some(self.kind) {
            return Ok(None);
        }
        let info = parse_elf(&data).with_context(|| path.display().to_string())?;
        Ok(Some(Found {
            guest: normalize(&path),
            host: path,
            relocated: false,
            info,
        }))
    }

    /// Where the loader finds `name` for object `req`: the DT_RPATHs of `req` and the objects
    /// that loaded it (unless `req` has DT_RUNPATH), `req`'s DT_RUNPATH, ld.so.conf, the system
    /// directories (glibc's _dl_map_object order, without LD_LIBRARY_PATH).
    fn find(&self, name: &str, req: usize) -> Result<Found> {
        let mut searched = Vec::new();
        let info = &self.objects[req].info;
        if info.runpath.is_none() {
            let mut at = Some(req);
            while let Some(i) = at {
                if let Some(rpath) = &self.objects[i].info.rpath {
                    for dir in self.expand(rpath, i, "DT_RPATH")? {
                        if let Some(f) = self.try_dir(&dir, name, &mut searched)? {
                            return Ok(f);
                        }
                    }
                }
                at = self.objects[i].loader;
            }
        }
        if let Some(runpath) = &info.runpath {
            for dir in self.expand(runpath, req, "DT_RUNPATH")? {
                if let Some(f) = self.try_dir(&dir, name, &mut searched)? {
                    return Ok(f);
                }
            }
        }
        if !info.nodeflib {
            let system = &self.search.system_dirs;
            for dir in &self.search.conf_dirs {
                if let Some(mut f) = self.try_dir(dir, name, &mut searched)? {
                    if !system.contains(dir) {
                        // Without ld.so.cache the guest's loader would not look in `dir`.
                        let first = system.first().with_context(|| {
                            format!(
                                "{name} is in {}, and no system directory is set",
                                dir.display()
                            )
                        })?;
                        f.guest = normalize(&first.join(name));
                        f.relocated = true;
                    }
                    return Ok(f);
                }
            }
            for dir in system {
                if let Some(f) = self.try_dir(dir, name, &mut searched)? {
                    return Ok(f);
                }
            }
        }
        let by = if req == 0 {
            String::new()
        } else {
            format!(" (required by {})", self.objects[req].host.display())
        };
        bail!(
            "{} needs {name}{by}: not found in {}",
            self.program,
            if searched.is_empty() {
                "any directory (DF_1_NODEFLIB and no RPATH/RUNPATH)".to_string()
            } else {
                searched.join(", ")
            }
        )
    }

    fn add(&mut self, found: Found, name: &str, loader: Option<usize>) -> Result<()> {
        let real = fs::canonicalize(&found.host)
            .with_context(|| format!("resolving {}", found.host.display()))?;
        if let Some(other) = self.objects.iter().find(|o| o.real == real) {
            bail!(
                "{} needs {name}, found as {}: the same file as {}, under another name \
                 (the guest would load it twice); not supported",
                self.program,
                found.host.display(),
                other.host.display()
            );
        }
        let mut names = vec![name.to_string()];
        names.extend(found.info.soname.clone());
        self.objects.push(Object {
            host: found.host,
            guest: found.guest,
            relocated: found.relocated,
            names,
            loader,
            real,
            info: found.info,
        });
        Ok(())
    }
}

/// The program (at its absolute path), its interpreter and its libraries, in the loader's
/// order (breadth first). A static program (no PT_INTERP) gives only itself. The program's
/// `$ORIGIN` is the directory of the path given, where it is placed in the guest (the host's
/// loader would use the directory of its real path; they differ only for a symlink).
pub fn closure(program: &Path, search: &SearchPath) -> Result<Vec<LoaderFile>> {
    Ok(resolve(program, search)?
        .into_iter()
        .map(|r| r.file)
        .collect())
}

/// A file of the closure with what placing it elsewhere depends on.
struct Resolved {
    file: LoaderFile,
    /// The name the loader first looks it up by (DT_NEEDED, or PT_INTERP for the interpreter);
    /// later requests match it by that name or its soname.
    requested_as: Option<String>,
    soname: Option<String>,
    /// It has DT_RPATH or DT_RUNPATH.
    search_path: bool,
}

/// The closure like [`closure`], but with every file placed in a private prefix:
/// the program at `<prefix>/bin/<file name>`, the interpreter and each library at
/// `<prefix>/lib/<soname or file name>`. Nothing lands in the loader's own directories, so
/// an image's /lib is never replaced; the guest runs the program as
/// `<prefix>/lib/<interpreter> --inhibit-cache --library-path <prefix>/lib <prefix>/bin/NAME`.
/// Refused: a dynamic program without an interpreter to run it, a file with DT_RPATH or
/// DT_RUNPATH (DT_RPATH is searched before --library-path, and both name host directories),
/// a library asked for by a name other than the one it gets (the loader searches
/// --library-path by the DT_NEEDED name) and two files given the same name.
pub fn closure_into_prefix(
    program: &Path,
    search: &SearchPath,
    prefix: &Path,
) -> Result<Vec<LoaderFile>> {
    let shown = program.display();
    if !prefix.is_absolute() {
        bail!("prefix {} is not an absolute path", prefix.display());
    }
    let resolved = resolve(program, search)?;
    if resolved.len() < 2 {
        // Only a dynamic program is run through the prefix's loader.
        bail!("{shown} has no PT_INTERP: a static program needs no prefix");
    }
    let mut out: Vec<LoaderFile> = Vec::with_capacity(resolved.len());
    for r in resolved {
        let source = r.file.source.display();
        if r.search_path {
            bail!(
                "{shown}: {source} has DT_RPATH or DT_RUNPATH, which name host directories; \
                 not supported in a private prefix"
            );
        }
        let host_name = || {
            r.file
                .source
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_string)
                .with_context(|| format!("{shown}: {source} has no UTF-8 file name"))
        };
        let (dir, name) = match r.file.role {
            Role::Program => ("bin", host_name()?),
            Role::Interpreter => ("lib", r.soname.clone().map_or_else(host_name, Ok)?),
            Role::Library => {
                let name = r.soname.clone().map_or_else(host_name, Ok)?;
                if let Some(other) = r.requested_as.as_ref().filter(|n| **n != name) {
                    bail!(
                        "{shown} needs {other}, found as {source} whose soname is {name}: \
                         the loader would look for {other} in the prefix; not supported"
                    );
                }
                ("lib", name)
            }
        };
        let guest_path = normalize(&prefix.join(dir).join(&name));
        if let Some(prev) = out.iter().find(|f| f.guest_path == guest_path) {
            bail!(
                "{shown}: {} and {source} would both be {}",
                prev.source.display(),
                guest_path.display()
            );
        }
        out.push(LoaderFile {
            guest_path,
            ..r.file
        });
    }
    Ok(out)
}

fn resolve(program: &Path, search: &SearchPath) -> Result<Vec<Resolved>> {
    let abs = std::path::absolute(program)
        .with_context(|| format!("{}: making the path absolute", program.display()))?;
    let path = normalize(&abs);
    let shown = path.display().to_string();
    let data = fs::read(&path).with_context(|| format!("reading {shown}"))?;
    let info = parse_elf(&data).with_context(|| shown.clone())?;
    let mut out = vec![Resolved {
        file: LoaderFile {
            role: Role::Program,
            guest_path: path.clone(),
            source: path.clone(),
            mode: 0o755,
        },
        requested_as: None,
        soname: info.soname.clone(),
        search_path: info.rpath.is_some() || info.runpath.is_some(),
    }];
    let Some(interp) = info.interpreter.clone() else {
        if !info.needed.is_empty() {
            bail!(
                "{shown} needs {} but has no PT_INTERP (a shared library, not a program?)",
                info.needed.join(", ")
            );
        }
        return Ok(out);
    };
    if !interp.starts_with('/') {
        bail!("{shown}: PT_INTERP {interp:?} is not an absolute path");
    }
    let mut r = Resolver {
        search,
        program: shown.clone(),
        kind: info.kind,
        objects: Vec::new(),
    };
    r.objects.push(Object {
        real: fs::canonicalize(&path).with_context(|| format!("resolving {shown}"))?,
        guest: path.clone(),
        host: path,
        relocated: false,
        names: info.soname.iter().cloned().collect(),
        loader: None,
        info,
    });
    let interp_path = PathBuf::from(&interp);
    let interp_data =
        fs::read(&interp_path).with_context(|| format!("{shown}: reading interpreter {interp}"))?;
    if kind_of(&interp_data) != Some(r.kind) {
        bail!(
            "{shown}: interpreter {interp} is not an ELF file of the program's class and machine"
        );
    }
    let interp_info = parse_elf(&interp_data).with_context(|| interp.clone())?;
    r.add(
        Found {
            guest: normalize(&interp_path),
            host: interp_path,
            relocated: false,
            info: interp_info,
        },
        &interp,
        None,
    )?;

    let mut queue = VecDeque::from([0]);
    while let Some(i) = queue.pop_front() {
        for name in r.objects[i].info.needed.clone() {
            // Already loaded under this name or soname (libc's ld-linux-x86-64.so.2 is the
            // interpreter): ld.so reuses it.
            if r.objects.iter().any(|o| o.names.contains(&name)) {
                continue;
            }
            let found = if name.contains('/') {
                // A path, not a name: opened as it is, no search.
                if !name.starts_with('/') {
                    bail!("{shown}: DT_NEEDED {name:?} is relative to the working directory");
                }
                let path = PathBuf::from(&name);
                let (dir, file) = (path.parent(), path.file_name().and_then(|f| f.to_str()));
                let (Some(dir), Some(file)) = (dir, file) else {
                    bail!("{shown}: DT_NEEDED {name:?} is not a file path");
                };
                r.try_dir(dir, file, &mut Vec::new())?
                    .with_context(|| format!("{shown} needs {name}: no such ELF file"))?
            } else {
                r.find(&name, i)?
            };
            r.add(found, &name, Some(i))?;
            queue.push_back(r.objects.len() - 1);
        }
    }
    for (i, o) in r.objects.iter().enumerate().skip(1) {
        out.push(Resolved {
            file: LoaderFile {
                role: if i == 1 {
                    Role::Interpreter
                } else {
                    Role::Library
                },
                guest_path: o.guest.clone(),
                source: o.host.clone(),
                mode: mode_of(&o.host)?,
            },
            // `add` puts the name it was first asked for by first.
            requested_as: o.names.first().cloned(),
            soname: o.info.soname.clone(),
            search_path: o.info.rpath.is_some() || o.info.runpath.is_some(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;
    use crate::testutil::TempDir;

    const INTERP: &str = "/lib64/ld-linux-x86-64.so.2";

    fn host() -> SearchPath {
        SearchPath::host().expect("host search path")
    }

    fn at<'a>(files: &'a [LoaderFile], guest: &str) -> &'a LoaderFile {
        files
            .iter()
            .find(|f| f.guest_path == Path::new(guest))
            .unwrap_or_else(|| panic!("{guest} missing from {files:#?}"))
    }

    fn guest_paths(files: &[LoaderFile]) -> Vec<String> {
        files
            .iter()
            .map(|f| f.guest_path.display().to_string())
            .collect()
    }

    #[derive(Clone, Copy)]
    enum Link {
        Rpath,
        Runpath,
        NoPath,
        RpathNoDefaultLib,
    }

    /// Built with the C compiler Rust links with: `lib/libb.so`, `lib/liba.so` (needs
    /// libb.so, no RPATH of its own) and `bin/prog` (needs liba.so; `$ORIGIN/../lib` as
    /// `link` says).
    fn fixture(tag: &str, link: Link) -> (TempDir, PathBuf) {
        let dir = TempDir::new(tag);
        let d = dir.path();
        std::fs::create_dir_all(d.join("lib")).expect("mkdir lib");
        std::fs::create_dir_all(d.join("bin")).expect("mkdir bin");
        std::fs::write(d.join("b.c"), "int b(void) { return 1; }\n").expect("b.c");
        std::fs::write(d.join("a.c"), "int b(void);\nint a(void) { return b(); }\n").expect("a.c");
        std::fs::write(
            d.join("main.c"),
            "int a(void);\nint main(void) { return a(); }\n",
        )
        .expect("main.c");
        let cc = |args: &[&str]| {
            let out = Command::new("cc")
                .current_dir(d)
                .args(args)
                .output()
                .expect("running cc");
            assert!(
                out.status.success(),
                "cc {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        cc(&[
            "-shared",
            "-fPIC",
            "-Wl,-soname,libb.so",
            "-o",
            "lib/libb.so",
            "b.c",
        ]);
        let a = [
            "-shared",
            "-fPIC",
            "-Wl,-soname,liba.so",
            "-o",
            "lib/liba.so",
        ];
        cc(&[&a[..], &["a.c", "-Llib", "-lb"]].concat());
        let mut prog = vec![
            "-o",
            "bin/prog",
            "main.c",
            "-Llib",
            "-la",
            "-Wl,-rpath-link,lib",
        ];
        prog.extend(match link {
            Link::Rpath => &["-Wl,-rpath,$ORIGIN/../lib", "-Wl,--disable-new-dtags"][..],
            Link::Runpath => &["-Wl,-rpath,$ORIGIN/../lib", "-Wl,--enable-new-dtags"],
            Link::NoPath => &[],
            Link::RpathNoDefaultLib => &[
                "-Wl,-rpath,$ORIGIN/../lib",
                "-Wl,--disable-new-dtags",
                "-Wl,-z,nodefaultlib",
            ],
        });
        cc(&prog);
        let prog = d.join("bin/prog");
        (dir, prog)
    }

    #[test]
    fn dynamic_program_gets_interpreter_libc_and_transitive_libraries() {
        let files = closure(Path::new("/bin/ls"), &host()).expect("closure of /bin/ls");
        assert_eq!(
            files[0],
            LoaderFile {
                role: Role::Program,
                guest_path: "/bin/ls".into(),
                source: "/bin/ls".into(),
                mode: 0o755,
            }
        );
        assert_eq!(files[1].role, Role::Interpreter);
        assert_eq!(files[1].guest_path, Path::new(INTERP));
        assert_eq!(files[1].mode, 0o755, "the kernel execs the interpreter");
        let libc = at(&files, "/lib/x86_64-linux-gnu/libc.so.6");
        assert_eq!(libc.role, Role::Library);
        assert_eq!(libc.mode, mode_of(&libc.source).expect("libc mode"));
        // libselinux's dependency: the closure is transitive.
        at(&files, "/lib/x86_64-linux-gnu/libpcre2-8.so.0");
        // libc's DT_NEEDED ld-linux-x86-64.so.2 is the interpreter, already loaded.
        let paths = guest_paths(&files);
        assert!(
            !paths.contains(&"/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2".to_string()),
            "{paths:?}"
        );
        let mut unique = paths.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), paths.len(), "{paths:?}");
    }

    #[test]
    fn sshfs_closure_holds_fuse_and_glib_when_installed() {
        let sshfs = Path::new("/usr/bin/sshfs");
        if !sshfs.exists() {
            eprintln!("skipped: /usr/bin/sshfs is not installed (`cargo xtask setup` installs it)");
            return;
        }
        let files = closure(sshfs, &host()).expect("closure of sshfs");
        assert_eq!(files[1].guest_path, Path::new(INTERP));
        for lib in ["libfuse3.so.3", "libglib-2.0.so.0", "libc.so.6"] {
            at(&files, &format!("/lib/x86_64-linux-gnu/{lib}"));
        }
    }

    #[test]
    fn static_program_is_its_own_closure() {
        let files = closure(Path::new("/bin/busybox"), &host()).expect("closure of busybox");
        assert_eq!(guest_paths(&files), ["/bin/busybox"]);
        assert_eq!(files[0].role, Role::Program);
    }

    #[test]
    fn rpath_with_origin_is_searched_and_inherited_by_dependencies() {
        let (dir, prog) = fixture("rpath", Link::Rpath);
        let files = closure(&prog, &host()).expect("closure");
        let lib = dir.path().join("lib");
        let a = at(&files, lib.join("liba.so").to_str().expect("utf8"));
        assert_eq!(a.source, dir.path().join("bin/../lib/liba.so"));
        // liba.so has no RPATH: libb.so is found through the program's.
        let b = at(&files, lib.join("libb.so").to_str().expect("utf8"));
        assert_eq!(b.source, dir.path().join("bin/../lib/libb.so"));
        at(&files, "/lib/x86_64-linux-gnu/libc.so.6");
    }

    #[test]
    fn runpath_is_not_inherited_by_dependencies() {
        let (dir, prog) = fixture("runpath", Link::Runpath);
        let e = format!(
            "{:#}",
            closure(&prog, &host()).expect_err("libb.so is not found")
        );
        let liba = dir.path().join("bin/../lib/liba.so");
        let head = format!(
            "{} needs libb.so (required by {}): not found in ",
            prog.display(),
            liba.display()
        );
        assert!(e.starts_with(&head), "{e}");
        let searched = &e[head.len()..];
        assert!(searched.contains("/lib/x86_64-linux-gnu"), "{e}");
        assert!(
            !searched.contains(dir.path().to_str().expect("utf8")),
            "{e}"
        );
    }

    #[test]
    fn missing_library_is_an_error_naming_program_and_library() {
        let (dir, prog) = fixture("missing", Link::Rpath);
        std::fs::remove_file(dir.path().join("lib/liba.so")).expect("rm liba");
        let e = format!(
            "{:#}",
            closure(&prog, &host()).expect_err("liba.so is gone")
        );
        let head = format!(
            "{} needs liba.so: not found in {}, ",
            prog.display(),
            dir.path().join("bin/../lib").display()
        );
        assert!(e.starts_with(&head), "{e}");
        assert!(e.contains("/usr/lib/x86_64-linux-gnu"), "{e}");
    }

    #[test]
    fn search_path_without_the_library_names_it_and_the_directories() {
        let empty = TempDir::new("empty-lib");
        let search = SearchPath {
            conf_dirs: Vec::new(),
            system_dirs: vec![empty.path().to_path_buf()],
        };
        let e = format!(
            "{:#}",
            closure(Path::new("/bin/ls"), &search).expect_err("no libs")
        );
        assert_eq!(
            e,
            format!(
                "/bin/ls needs libselinux.so.1: not found in {}",
                empty.path().display()
            )
        );
    }

    #[test]
    fn nodefaultlib_program_searches_only_its_rpath() {
        let (dir, prog) = fixture("nodeflib", Link::RpathNoDefaultLib);
        let e = format!(
            "{:#}",
            closure(&prog, &host()).expect_err("libc not in RPATH")
        );
        assert_eq!(
            e,
            format!(
                "{} needs libc.so.6: not found in {}",
                prog.display(),
                dir.path().join("bin/../lib").display()
            )
        );
    }

    const PREFIX: &str = "/usr/lib/cnfs/tools";

    #[test]
    fn prefix_closure_puts_the_program_in_bin_and_loader_and_libraries_in_lib() {
        let (dir, prog) = fixture("prefix", Link::NoPath);
        let lib = dir.path().join("lib");
        let search = SearchPath {
            conf_dirs: vec![lib.clone()],
            system_dirs: SYSTEM_DIRS.iter().map(PathBuf::from).collect(),
        };
        let files = closure_into_prefix(&prog, &search, Path::new(PREFIX)).expect("closure");
        let plain = closure(&prog, &search).expect("plain closure");
        // The same files, in the same order, with the same roles and modes: only placed apart.
        assert_eq!(files.len(), plain.len());
        for (f, p) in files.iter().zip(&plain) {
            assert_eq!((&f.source, f.role, f.mode), (&p.source, p.role, p.mode));
        }
        let prog_file = at(&files, "/usr/lib/cnfs/tools/bin/prog");
        assert_eq!((prog_file.role, prog_file.mode), (Role::Program, 0o755));
        assert_eq!(prog_file.source, prog);
        let loader = at(&files, "/usr/lib/cnfs/tools/lib/ld-linux-x86-64.so.2");
        assert_eq!(loader.role, Role::Interpreter);
        assert_eq!(loader.source, Path::new(INTERP));
        assert_eq!(
            at(&files, "/usr/lib/cnfs/tools/lib/liba.so").source,
            lib.join("liba.so")
        );
        assert_eq!(
            at(&files, "/usr/lib/cnfs/tools/lib/libb.so").source,
            lib.join("libb.so")
        );
        at(&files, "/usr/lib/cnfs/tools/lib/libc.so.6");
        let outside: Vec<String> = guest_paths(&files)
            .into_iter()
            .filter(|p| !p.starts_with("/usr/lib/cnfs/tools/"))
            .collect();
        assert_eq!(outside, Vec::<String>::new());
    }

    #[test]
    fn prefix_closure_refuses_rpath_static_programs_and_a_relative_prefix() {
        let (dir, prog) = fixture("prefix-rpath", Link::Rpath);
        let e = format!(
            "{:#}",
            closure_into_prefix(&prog, &host(), Path::new(PREFIX)).expect_err("DT_RPATH")
        );
        assert_eq!(
            e,
            format!(
                "{0}: {0} has DT_RPATH or DT_RUNPATH, which name host directories; not \
                 supported in a private prefix",
                prog.display()
            )
        );
        let e = format!(
            "{:#}",
            closure_into_prefix(Path::new("/bin/busybox"), &host(), Path::new(PREFIX))
                .expect_err("static")
        );
        assert_eq!(
            e,
            "/bin/busybox has no PT_INTERP: a static program needs no prefix"
        );
        let e = format!(
            "{:#}",
            closure_into_prefix(&prog, &host(), Path::new("usr/lib/x")).expect_err("relative")
        );
        assert_eq!(e, "prefix usr/lib/x is not an absolute path");
        drop(dir);
    }

    #[test]
    fn prefix_closure_refuses_a_library_whose_soname_is_not_the_name_asked_for() {
        let (dir, prog) = fixture("prefix-soname", Link::NoPath);
        let lib = dir.path().join("lib");
        // libb.so answers to another soname: in the prefix it would be `libb.so.2`, and the
        // loader, asked for `libb.so` by liba.so, would not find it there.
        let out = Command::new("cc")
            .current_dir(dir.path())
            .args([
                "-shared",
                "-fPIC",
                "-Wl,-soname,libb.so.2",
                "-o",
                "lib/libb.so",
                "b.c",
            ])
            .output()
            .expect("running cc");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let search = SearchPath {
            conf_dirs: vec![lib.clone()],
            system_dirs: SYSTEM_DIRS.iter().map(PathBuf::from).collect(),
        };
        let e = format!(
            "{:#}",
            closure_into_prefix(&prog, &search, Path::new(PREFIX)).expect_err("soname")
        );
        assert_eq!(
            e,
            format!(
                "{} needs libb.so, found as {} whose soname is libb.so.2: the loader would \
                 look for libb.so in the prefix; not supported",
                prog.display(),
                lib.join("libb.so").display()
            )
        );
    }

    #[test]
    fn library_from_a_non_system_conf_dir_goes_to_the_first_system_dir() {
        let (dir, prog) = fixture("conf-dir", Link::NoPath);
        let lib = dir.path().join("lib");
        let search = SearchPath {
            conf_dirs: vec![lib.clone()],
            system_dirs: SYSTEM_DIRS.iter().map(PathBuf::from).collect(),
        };
        let files = closure(&prog, &search).expect("closure");
        let a = at(&files, "/lib/x86_64-linux-gnu/liba.so");
        assert_eq!(a.source, lib.join("liba.so"));
        assert_eq!(
            at(&files, "/lib/x86_64-linux-gnu/libb.so").source,
            lib.join("libb.so")
        );
    }

    #[test]
    fn candidate_of_another_class_or_machine_is_skipped() {
        let (dir, prog) = fixture("class", Link::NoPath);
        // An i386 ELF header (ELFCLASS32, EM_386) under the same name, searched first.
        let i386 = dir.path().join("i386");
        std::fs::create_dir_all(&i386).expect("mkdir");
        let mut header = vec![0u8; 52];
        header[..7].copy_from_slice(&[0x7f, b'E', b'L', b'F', 1, 1, 1]);
        header[16] = 3; // ET_DYN
        header[18] = 3; // EM_386
        header[20] = 1; // EV_CURRENT
        std::fs::write(i386.join("liba.so"), &header).expect("write");
        std::fs::write(i386.join("libb.so"), b"not ELF").expect("write");
        let lib = dir.path().join("lib");
        let search = SearchPath {
            conf_dirs: vec![i386.clone(), lib.clone()],
            system_dirs: SYSTEM_DIRS.iter().map(PathBuf::from).collect(),
        };
        let files = closure(&prog, &search).expect("closure");
        let a = at(&files, "/lib/x86_64-linux-gnu/liba.so");
        assert_eq!(a.source, lib.join("liba.so"));
        assert_eq!(
            at(&files, "/lib/x86_64-linux-gnu/libb.so").source,
            lib.join("libb.so")
        );
        let only_i386 = SearchPath {
            conf_dirs: vec![i386.clone()],
            system_dirs: Vec::new(),
        };
        let e = format!("{:#}", closure(&prog, &only_i386).expect_err("wrong class"));
        assert_eq!(
            e,
            format!(
                "{} needs liba.so: not found in {}",
                prog.display(),
                i386.display()
            )
        );
    }

    #[test]
    fn ld_so_conf_is_read_as_ldconfig_reads_it() {
        let dir = TempDir::new("ldconf");
        let d = dir.path();
        std::fs::create_dir_all(d.join("conf.d")).expect("mkdir");
        std::fs::write(
            d.join("ld.so.conf"),
            "# comment\n/opt/a/  # trailing comment\ninclude conf.d/*.conf\n\
             hwcap 0 nosegneg\n/opt/a\nrelative/dir\n  /opt/z=libc6\n",
        )
        .expect("conf");
        std::fs::write(d.join("conf.d/b.conf"), "/opt/b\n").expect("b");
        std::fs::write(d.join("conf.d/a.conf"), "/opt/c\n").expect("a");
        std::fs::write(d.join("conf.d/skipped.txt"), "/opt/no\n").expect("txt");
        let s = SearchPath::from_conf(&d.join("ld.so.conf"), vec!["/sys1".into()]).expect("parse");
        let dirs: Vec<&str> = s
            .conf_dirs
            .iter()
            .map(|p| p.to_str().expect("utf8"))
            .collect();
        assert_eq!(dirs, ["/opt/a", "/opt/c", "/opt/b", "/opt/z"]);
        assert_eq!(s.system_dirs, [PathBuf::from("/sys1")]);
        let none = SearchPath::from_conf(&d.join("absent.conf"), Vec::new()).expect("absent");
        assert!(none.conf_dirs.is_empty());
    }

    #[test]
    fn ld_so_conf_include_loop_is_an_error() {
        let dir = TempDir::new("ldconf-loop");
        let conf = dir.path().join("loop.conf");
        std::fs::write(&conf, "/opt/a\ninclude loop.conf\n").expect("conf");
        let e = format!(
            "{:#}",
            SearchPath::from_conf(&conf, Vec::new()).expect_err("include loop")
        );
        assert!(e.contains("loop.conf: `include` nested more than"), "{e}");
    }
}
