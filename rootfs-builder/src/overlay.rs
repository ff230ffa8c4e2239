//! `initrd-overlay`: a cpio to append to a Kata initrd whose `/init` is kata-agent. The kernel
//! unpacks concatenated archives in order, so these entries replace the earlier ones: `/init`
//! becomes the agent, which reads `/etc/cnfs/init.conf`, starts itself in a child and execs
//! the `then=` program so kata-agent still ends up as PID 1.
//!
//! The kernel looks for an uncompressed cpio only at 4-byte aligned offsets: appended to a
//! compressed initrd whose length is not a multiple of 4, a plain overlay is rejected
//! ("invalid magic") and silently not applied. Use `--gzip` there, or pad the base first
//! (`truncate -s %4 BASE`).

use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::archive::{gzip, read_input, write_output, Tree};
use crate::DEFAULT_AGENT_PORT;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The cnfs-agent binary (installed as /usr/bin/cnfs-agent and as /init).
    #[arg(long, value_name = "PATH")]
    pub agent: PathBuf,
    /// vsock port the agent serves the host on.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_AGENT_PORT)]
    pub port: u32,
    /// The program the agent execs as PID 1 once its service is started.
    #[arg(long, value_name = "PATH", default_value = "/usr/bin/kata-agent")]
    pub then: String,
    /// Where to write the archive.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Gzip the archive. Needed to append to a compressed initrd whose size is not a
    /// multiple of 4: the kernel looks for a plain cpio only at 4-byte aligned offsets.
    #[arg(long)]
    pub gzip: bool,
}

pub fn build_tree(args: &Args) -> Result<Tree> {
    // One `key=value` per line: a newline or blank in the path would break the file's format.
    if !args.then.starts_with('/') || args.then.chars().any(char::is_whitespace) {
        bail!(
            "--then {:?} must be an absolute path without blanks",
            args.then
        );
    }
    let agent = read_input(&args.agent, "--agent")?;
    let mut t = Tree::new();
    t.file("usr/bin/cnfs-agent", 0o755, agent.clone())?;
    t.file("init", 0o755, agent)?;
    let conf = format!("then={}\nargs=--vsock-port {}\n", args.then, args.port);
    t.file("etc/cnfs/init.conf", 0o644, conf.into_bytes())?;
    Ok(t)
}

pub fn build(args: &Args) -> Result<Vec<u8>> {
    let newc = build_tree(args)?.to_newc()?;
    if args.gzip {
        gzip(&newc)
    } else {
        Ok(newc)
    }
}

pub fn run(args: &Args) -> Result<()> {
    write_output(&args.out, &build(args)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{gunzip, read_newc, TempDir};

    fn args(dir: &TempDir) -> Args {
        let agent = dir.path().join("agent");
        std::fs::write(&agent, b"agent binary").expect("agent");
        Args {
            agent,
            port: DEFAULT_AGENT_PORT,
            then: "/usr/bin/kata-agent".into(),
            out: dir.path().join("overlay.cpio"),
            gzip: false,
        }
    }

    #[test]
    fn overlay_entries_and_modes() {
        let dir = TempDir::new("overlay");
        let a = args(&dir);
        run(&a).expect("build");
        let entries = read_newc(&std::fs::read(&a.out).expect("out"));
        let got: Vec<(&str, u32)> = entries.iter().map(|e| (e.name.as_str(), e.mode)).collect();
        assert_eq!(
            got,
            [
                ("etc", 0o040_755),
                ("etc/cnfs", 0o040_755),
                ("etc/cnfs/init.conf", 0o100_644),
                ("init", 0o100_755),
                ("usr", 0o040_755),
                ("usr/bin", 0o040_755),
                ("usr/bin/cnfs-agent", 0o100_755),
            ]
        );
        assert_eq!(
            entries[2].data,
            b"then=/usr/bin/kata-agent\nargs=--vsock-port 17230\n"
        );
        assert_eq!(entries[3].data, b"agent binary");
        assert_eq!(entries[6].data, b"agent binary");
        assert!(entries
            .iter()
            .all(|e| e.uid == 0 && e.gid == 0 && e.mtime == 0));
    }

    #[test]
    fn gzip_variant_holds_the_same_archive() {
        let dir = TempDir::new("overlay-gz");
        let mut a = args(&dir);
        a.port = 999;
        a.then = "/sbin/other".into();
        let plain = build(&a).expect("plain");
        a.gzip = true;
        let gz = build(&a).expect("gzip");
        assert_eq!(gunzip(&gz), plain);
        assert_eq!(gz, build(&a).expect("again"), "reproducible");
        let entries = read_newc(&plain);
        assert_eq!(
            entries[2].data,
            b"then=/sbin/other\nargs=--vsock-port 999\n"
        );
    }

    #[test]
    fn bad_then_and_missing_agent_are_refused() {
        let dir = TempDir::new("overlay-bad");
        let mut a = args(&dir);
        a.then = "kata-agent".into();
        assert!(build(&a).is_err());
        a.then = "/usr/bin/kata agent".into();
        assert!(build(&a).is_err());
        a.then = "/usr/bin/kata-agent".into();
        a.agent = dir.path().join("missing-agent");
        let e = build(&a).expect_err("missing agent");
        assert!(format!("{e:#}").contains("missing-agent"), "{e:#}");
    }
}
