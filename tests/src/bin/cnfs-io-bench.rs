//! Test-only I/O workload for `cargo xtask bench`, run inside the test guest (static, no
//! library closure), so that every file system path is driven by the same code and timed
//! by the same clock. One phase per run; one JSON line out:
//! `{"phase":"write","secs":1.23,"ops":256,"bytes":268435456}`.
//!
//! - `write DIR MIB`: DIR/seq.bin in 1 MiB writes, then fsync (the time includes it)
//! - `read DIR`: DIR/seq.bin in 1 MiB reads (the caller drops the caches first)
//! - `randread DIR COUNT`: COUNT 4 KiB reads at pseudo-random aligned offsets of seq.bin
//! - `create DIR N`: N files of 1 KiB in DIR/meta (written, closed)
//! - `stat DIR N`: stat of each of them
//! - `ls DIR`: readdir of DIR/meta and lstat of every entry (what `ls -l` does)
//! - `unlink DIR N`: removes them and DIR/meta
//! - `tree SRC DST`: copies the tree SRC to DST (files and directories), fsync at the end

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

const MIB: usize = 1 << 20;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match run(&args[1..]) {
        Ok((ops, bytes, secs)) => println!(
            "{{\"phase\":\"{}\",\"secs\":{secs:.6},\"ops\":{ops},\"bytes\":{bytes}}}",
            args.get(1).map(String::as_str).unwrap_or("")
        ),
        Err(e) => {
            eprintln!("cnfs-io-bench: {e}");
            std::process::exit(2);
        }
    }
}

fn number(args: &[String], i: usize, what: &str) -> Result<u64, String> {
    args.get(i)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("{what}: a number is required"))
}

fn io<'a>(what: &'a str, path: &'a Path) -> impl Fn(std::io::Error) -> String + 'a {
    move |e| format!("{what} {}: {e}", path.display())
}

/// (operations, bytes, seconds) of one phase.
fn run(args: &[String]) -> Result<(u64, u64, f64), String> {
    let phase = args.first().map(String::as_str).unwrap_or("");
    let dir = Path::new(args.get(1).ok_or("DIR is required")?);
    let seq = dir.join("seq.bin");
    let meta = dir.join("meta");
    let start = Instant::now();
    let (ops, bytes) = match phase {
        "write" => {
            let mib = number(args, 2, "MIB")?;
            let mut f = File::create(&seq).map_err(io("creating", &seq))?;
            let mut block = vec![0u8; MIB];
            for (i, b) in block.iter_mut().enumerate() {
                *b = (i * 7 + 13) as u8;
            }
            for _ in 0..mib {
                f.write_all(&block).map_err(io("writing", &seq))?;
            }
            f.sync_all().map_err(io("fsync of", &seq))?;
            (mib, mib * MIB as u64)
        }
        "read" => {
            let mut f = File::open(&seq).map_err(io("opening", &seq))?;
            let mut block = vec![0u8; MIB];
            let (mut ops, mut bytes) = (0u64, 0u64);
            loop {
                let n = f.read(&mut block).map_err(io("reading", &seq))?;
                if n == 0 {
                    break;
                }
                ops += 1;
                bytes += n as u64;
            }
            (ops, bytes)
        }
        "randread" => {
            let count = number(args, 2, "COUNT")?;
            let f = File::open(&seq).map_err(io("opening", &seq))?;
            let len = f.metadata().map_err(io("stat of", &seq))?.len();
            let blocks = (len / 4096).max(1);
            let mut block = [0u8; 4096];
            // xorshift64: deterministic, the same offsets on every path.
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            for _ in 0..count {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                f.read_exact_at(&mut block, (x % blocks) * 4096)
                    .map_err(io("reading", &seq))?;
            }
            (count, count * 4096)
        }
        "create" => {
            let n = number(args, 2, "N")?;
            fs::create_dir_all(&meta).map_err(io("creating", &meta))?;
            let data = [b'x'; 1024];
            for i in 0..n {
                let p = meta.join(format!("f{i}"));
                // O_CREAT|O_TRUNC, as shells and most programs create files. (O_EXCL costs
                // NFSv4 a SETATTR per file on ganesha, which takes no attributes with an
                // exclusive create: measured.)
                let mut f = File::create(&p).map_err(io("creating", &p))?;
                f.write_all(&data).map_err(io("writing", &p))?;
            }
            (n, n * 1024)
        }
        "stat" => {
            let n = number(args, 2, "N")?;
            for i in 0..n {
                let p = meta.join(format!("f{i}"));
                fs::metadata(&p).map_err(io("stat of", &p))?;
            }
            (n, 0)
        }
        "ls" => {
            let mut n = 0;
            for e in fs::read_dir(&meta).map_err(io("reading", &meta))? {
                let e = e.map_err(io("reading", &meta))?;
                fs::symlink_metadata(e.path()).map_err(io("lstat of", &e.path()))?;
                n += 1;
            }
            (n, 0)
        }
        "unlink" => {
            let n = number(args, 2, "N")?;
            for i in 0..n {
                let p = meta.join(format!("f{i}"));
                fs::remove_file(&p).map_err(io("removing", &p))?;
            }
            fs::remove_dir(&meta).map_err(io("removing", &meta))?;
            (n, 0)
        }
        "tree" => {
            let dst = Path::new(args.get(2).ok_or("DST is required")?);
            let (mut ops, mut bytes) = (0, 0);
            copy_tree(dir, dst, &mut ops, &mut bytes)?;
            (ops, bytes)
        }
        other => return Err(format!("unknown phase {other:?}")),
    };
    Ok((ops, bytes, start.elapsed().as_secs_f64()))
}

fn copy_tree(src: &Path, dst: &Path, ops: &mut u64, bytes: &mut u64) -> Result<(), String> {
    fs::create_dir_all(dst).map_err(io("creating", dst))?;
    for e in fs::read_dir(src).map_err(io("reading", src))? {
        let e = e.map_err(io("reading", src))?;
        let to = dst.join(e.file_name());
        let kind = e.file_type().map_err(io("type of", &e.path()))?;
        if kind.is_dir() {
            copy_tree(&e.path(), &to, ops, bytes)?;
        } else if kind.is_file() {
            *bytes += fs::copy(e.path(), &to).map_err(io("copying", &e.path()))?;
        }
        *ops += 1;
    }
    Ok(())
}
