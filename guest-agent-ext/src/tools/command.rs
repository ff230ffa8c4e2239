//! The tool runner's typed commands. The agent names an operation and its few parameters;
//! the runner checks them and builds the argv itself from the table below (design
//! encryption-luks2.md §1.3), so no caller, however confused, can hand cryptsetup or mke2fs
//! an option or a device of its own choosing.

use std::path::Path;

use cnfs_protocols::spec::{printable, validate_name, SpecError};
use serde::{Deserialize, Serialize};

/// What the agent may ask the runner to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// `cryptsetup luksFormat` of `/dev/loop<device>`, labelled `cnfs-<label_name>`. Only a
    /// loop device whose backing file is a new container's temp file is ever formatted.
    LuksFormat { device: u32, label_name: String },
    /// `cryptsetup open` of `/dev/loop<device>` as `cnfs-<name>`.
    LuksOpen {
        device: u32,
        name: String,
        read_only: bool,
    },
    /// `cryptsetup close cnfs-<name>`.
    LuksClose { name: String, deferred: bool },
    /// `mke2fs -t ext4` on `/dev/mapper/cnfs-<name>`, its root owned by `uid:gid`.
    Mkfs { name: String, uid: u32, gid: u32 },
    /// `cryptsetup --version`.
    Version,
    /// `gocryptfs -init` of the empty temp directory `<backing>/.cnfs-volume.gocryptfs.new-<temp>`
    /// of volume `name` (the agent publishes it by renaming it to [`GOCRYPTFS_DIR`]).
    GocryptfsInit { name: String, temp: String },
    /// A gocryptfs daemon serving volume `name`'s encrypted tree on the FUSE descriptor sent
    /// with the request (its mount made by the agent). It outlives the request, the runner and
    /// the agent; the unmount of its FUSE mount ends it.
    GocryptfsServe { name: String, read_only: bool },
    /// The lock holder of volume `name`'s luks2 container on an SMB share: a process that
    /// opens the container, takes the single-writer lock and keeps it until it is killed
    /// (cifs drops a byte-range lock at any close by the process that took it, so no short-
    /// lived process can hold it; design encryption-luks2.md §5.2). It reports on the pipe
    /// sent with the request; it outlives the request, the runner and the agent.
    HoldLock { name: String, read_only: bool },
}

/// The programs the runner may start (`<tools dir>/bin/<name>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    Cryptsetup,
    Mke2fs,
    Gocryptfs,
    /// The agent's own binary as `cnfs-lock-holder` ([`Command::HoldLock`]).
    LockHolder,
}

impl Tool {
    pub const ALL: [Tool; 4] = [
        Tool::Cryptsetup,
        Tool::Mke2fs,
        Tool::Gocryptfs,
        Tool::LockHolder,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Tool::Cryptsetup => "cryptsetup",
            Tool::Mke2fs => "mke2fs",
            Tool::Gocryptfs => "gocryptfs",
            Tool::LockHolder => LOCK_HOLDER_ARGV0,
        }
    }

    /// The capabilities the tool runs with (its bounding set; it runs as root): the
    /// device-mapper tools need CAP_SYS_ADMIN (dm ioctls) and CAP_MKNOD (/dev/mapper nodes);
    /// gocryptfs mounts nothing (the agent made its mount) but serves every user of the
    /// volume as root: it opens their files (DAC), creates files as the caller
    /// (setreuid/setgroups) and hands them to the caller (chown), as `-allow_other` does.
    pub fn capabilities(self) -> &'static [caps::Capability] {
        use caps::Capability as C;
        match self {
            Tool::Cryptsetup | Tool::Mke2fs => &[C::CAP_SYS_ADMIN, C::CAP_MKNOD],
            Tool::Gocryptfs => &[
                C::CAP_CHOWN,
                C::CAP_DAC_OVERRIDE,
                C::CAP_DAC_READ_SEARCH,
                C::CAP_FOWNER,
                C::CAP_FSETID,
                C::CAP_SETUID,
                C::CAP_SETGID,
            ],
            // Root owns the backing share's files: opening and locking one needs nothing.
            Tool::LockHolder => &[],
        }
    }
}

/// Why the runner did not start a tool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A parameter is malformed (the field is named).
    Invalid(SpecError),
    /// The parameters are well formed, but the device is not one this command may touch.
    Refused(String),
}

impl Command {
    /// The operation's name in error fields (`luks_open.name`).
    pub fn op(&self) -> &'static str {
        match self {
            Command::LuksFormat { .. } => "luks_format",
            Command::LuksOpen { .. } => "luks_open",
            Command::LuksClose { .. } => "luks_close",
            Command::Mkfs { .. } => "mkfs",
            Command::Version => "version",
            Command::GocryptfsInit { .. } => "gocryptfs_init",
            Command::GocryptfsServe { .. } => "gocryptfs_serve",
            Command::HoldLock { .. } => "hold_lock",
        }
    }

    pub fn tool(&self) -> Tool {
        match self {
            Command::Mkfs { .. } => Tool::Mke2fs,
            Command::GocryptfsInit { .. } | Command::GocryptfsServe { .. } => Tool::Gocryptfs,
            Command::HoldLock { .. } => Tool::LockHolder,
            _ => Tool::Cryptsetup,
        }
    }

    /// Whether the command reads a key on stdin (`--key-file=-`; gocryptfs: one line).
    pub fn takes_key(&self) -> bool {
        matches!(
            self,
            Command::LuksFormat { .. }
                | Command::LuksOpen { .. }
                | Command::GocryptfsInit { .. }
                | Command::GocryptfsServe { .. }
        )
    }

    /// Whether the command starts a daemon that takes the descriptor sent with it (gocryptfs:
    /// the FUSE device it serves; the lock holder: the pipe it reports on).
    pub fn is_daemon(&self) -> bool {
        matches!(
            self,
            Command::GocryptfsServe { .. } | Command::HoldLock { .. }
        )
    }

    /// The descriptor a daemon command takes, as errors name it.
    pub fn passed_fd_field(&self) -> String {
        match self {
            Command::HoldLock { .. } => format!("{}.report_fd", self.op()),
            _ => format!("{}.fuse_fd", self.op()),
        }
    }

    /// Checks the parameters: names are DNS labels (so `cnfs-<name>` fits a dm name), a key
    /// comes exactly with the commands that read one.
    pub fn validate(&self, key_len: Option<usize>) -> Result<(), SpecError> {
        let op = self.op();
        match self {
            Command::LuksFormat { label_name, .. } => {
                validate_name(&format!("{op}.label_name"), label_name)?
            }
            Command::LuksOpen { name, .. }
            | Command::LuksClose { name, .. }
            | Command::Mkfs { name, .. }
            | Command::GocryptfsServe { name, .. }
            | Command::HoldLock { name, .. } => validate_name(&format!("{op}.name"), name)?,
            Command::GocryptfsInit { name, temp } => {
                validate_name(&format!("{op}.name"), name)?;
                if !is_hex16(temp) {
                    return Err(SpecError {
                        field: format!("{op}.temp"),
                        reason: "must be 16 lowercase hex digits".into(),
                    });
                }
            }
            Command::Version => {}
        }
        match (self.takes_key(), key_len) {
            (true, None | Some(0)) => Err(SpecError {
                field: format!("{op}.key"),
                reason: "is required (the tool reads it on stdin)".into(),
            }),
            (false, Some(_)) => Err(SpecError {
                field: format!("{op}.key"),
                reason: "must not be sent: this command reads no key".into(),
            }),
            _ => Ok(()),
        }
    }

    /// The tool's arguments (after argv[0]), exactly as design §1.3 has them.
    pub fn args(&self) -> Vec<String> {
        let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        match self {
            Command::LuksFormat { device, label_name } => {
                let mut a = s(&[
                    "luksFormat",
                    "--batch-mode",
                    "--type",
                    "luks2",
                    "--cipher",
                    "aes-xts-plain64",
                    "--key-size",
                    "512",
                    "--sector-size",
                    "4096",
                    "--hash",
                    "sha256",
                    // Fixed, bounded cost: a container formatted in a big guest must open in a
                    // 512 MiB one (no benchmark, no memory taken from the formatting guest).
                    "--pbkdf",
                    "argon2id",
                    "--pbkdf-memory",
                    "65536",
                    "--pbkdf-parallel",
                    "1",
                    "--pbkdf-force-iterations",
                    "4",
                    "--use-urandom",
                    "--label",
                ]);
                a.push(dm_name(label_name));
                a.extend(s(&["--disable-external-tokens", "--key-file=-"]));
                a.push(loop_path(*device));
                a
            }
            Command::LuksOpen {
                device,
                name,
                read_only,
            } => {
                let mut a = s(&[
                    "open",
                    "--type",
                    "luks2",
                    "--disable-external-tokens",
                    "--key-file=-",
                ]);
                if *read_only {
                    a.push("--readonly".into());
                }
                a.push(loop_path(*device));
                a.push(dm_name(name));
                a
            }
            Command::LuksClose { name, deferred } => {
                let mut a = s(&["close"]);
                if *deferred {
                    a.push("--deferred".into());
                }
                a.push(dm_name(name));
                a
            }
            Command::Mkfs { name, uid, gid } => {
                let mut a = s(&[
                    "-t",
                    "ext4",
                    "-q",
                    "-F",
                    "-m",
                    "0",
                    "-e",
                    "remount-ro",
                    "-L",
                ]);
                // An ext4 label holds 16 bytes; a DNS label is ASCII, so this cuts no char.
                a.push(name.chars().take(16).collect());
                a.push("-E".into());
                a.push(format!(
                    "nodiscard,lazy_itable_init=1,root_owner={uid}:{gid}"
                ));
                a.push(format!("/dev/mapper/{}", dm_name(name)));
                a
            }
            Command::Version => s(&["--version"]),
            Command::GocryptfsInit { name, temp } => {
                // Defaults otherwise (AES-256-GCM, EME names, scrypt N=2^16): a tree made here
                // opens with a stock gocryptfs for recovery.
                let mut a = s(&["-init", "-q", "--"]);
                a.push(gocryptfs_temp_dir(name, temp));
                a
            }
            Command::GocryptfsServe { name, read_only } => {
                // -fg: no re-exec to daemonise (the runner starts it detached itself);
                // -allow_other: as root, new files belong to their creator; -sharedstorage:
                // other guests write the same tree (no inode-number or stat caching).
                let mut a = s(&["-fg", "-q", "-allow_other", "-sharedstorage", "-nosyslog"]);
                if *read_only {
                    a.push("-ro".into());
                }
                a.push("--".into());
                a.push(gocryptfs_dir(name));
                // go-fuse serves `/dev/fd/N` without mounting (the descriptor's number is the
                // same in the daemon: the runner clears its close-on-exec flag only).
                a.push(PASSED_FD_PLACEHOLDER.into());
                a
            }
            Command::HoldLock { name, read_only } => {
                let mode = if *read_only { "ro" } else { "rw" };
                vec![
                    luks2_container(name),
                    mode.into(),
                    PASSED_FD_PLACEHOLDER.into(),
                ]
            }
        }
    }
}

/// Stands in a daemon's argv for `/dev/fd/<the passed descriptor's number>`, which only the
/// runner knows.
pub const PASSED_FD_PLACEHOLDER: &str = "/dev/fd/<passed>";
/// argv[0] that makes the agent's binary an SMB luks2 container's lock holder.
pub const LOCK_HOLDER_ARGV0: &str = "cnfs-lock-holder";

/// Where the agent mounts volume shares (0700); the runner builds gocryptfs paths under it.
pub const BACKING_ROOT: &str = "/run/cnfs/backing";
pub use cnfs_protocols::spec::encryption::LUKS2_CONTAINER;
/// The encrypted tree's fixed name in the volume's directory.
pub const GOCRYPTFS_DIR: &str = "cnfs-volume.gocryptfs";
/// The prefix of a new tree's temp directory while it is initialised.
pub const GOCRYPTFS_TEMP_PREFIX: &str = ".cnfs-volume.gocryptfs.new-";

/// Volume `name`'s luks2 container (`luks2::CONTAINER` on its backing share).
pub fn luks2_container(name: &str) -> String {
    format!("{BACKING_ROOT}/{name}/{LUKS2_CONTAINER}")
}

pub fn gocryptfs_dir(name: &str) -> String {
    format!("{BACKING_ROOT}/{name}/{GOCRYPTFS_DIR}")
}

pub fn gocryptfs_temp_dir(name: &str, temp: &str) -> String {
    format!("{BACKING_ROOT}/{name}/{GOCRYPTFS_TEMP_PREFIX}{temp}")
}

pub fn is_hex16(s: &str) -> bool {
    s.len() == 16
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The dm-crypt mapping (and LUKS2 label) of volume `name`.
pub fn dm_name(name: &str) -> String {
    format!("cnfs-{name}")
}

fn loop_path(index: u32) -> String {
    format!("/dev/loop{index}")
}

/// The prefix of a container's temp file while it is being formatted.
pub const TEMP_PREFIX: &str = ".cnfs-volume.luks2.new-";

/// Whether `file_name` is a new container's temp file: `.cnfs-volume.luks2.new-<16 hex>`.
pub fn is_temp_container(file_name: &str) -> bool {
    file_name.strip_prefix(TEMP_PREFIX).is_some_and(is_hex16)
}

/// The second guard against formatting a published container: `/dev/loop<device>` must be
/// backed by a temp file (read from `<sysfs_root>/block/loop<N>/loop/backing_file`), whatever
/// the caller believes it set up.
pub fn check_format_target(sysfs_root: &Path, device: u32) -> Result<(), Refusal> {
    let sysfs = sysfs_root.join(format!("block/loop{device}/loop/backing_file"));
    let backing = std::fs::read_to_string(&sysfs).map_err(|e| {
        Refusal::Refused(format!(
            "luks_format.device: loop{device} has no backing file ({}: {e}); refusing to format it",
            sysfs.display()
        ))
    })?;
    // The kernel ends the path with a newline, and appends " (deleted)" to an unlinked file,
    // which then fails the name check too.
    let backing = backing.strip_suffix('\n').unwrap_or(&backing);
    let file_name = backing.rsplit('/').next().unwrap_or_default();
    if is_temp_container(file_name) {
        Ok(())
    } else {
        Err(Refusal::Refused(format!(
            "luks_format.device: loop{device} is backed by {:?}, not a new container's temp file \
             ({TEMP_PREFIX}<16 hex>); refusing to format it",
            printable(backing)
        )))
    }
}

/// The same guard for mkfs: `cnfs-<name>` must sit on exactly one loop device backed by a
/// new container's temp file, so that no race can ever put a file system over a published
/// container's data.
pub fn check_mkfs_target(sysfs_root: &Path, name: &str) -> Result<(), Refusal> {
    let want = dm_name(name);
    let refuse = |why: String| {
        Refusal::Refused(format!(
            "mkfs.name: {want} {why}; refusing to make a file system on it"
        ))
    };
    let block = sysfs_root.join("block");
    let dm = std::fs::read_dir(&block)
        .map_err(|e| refuse(format!("cannot be looked up ({}: {e})", block.display())))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|k| k.starts_with("dm-"))
        .find(|k| {
            std::fs::read_to_string(block.join(k).join("dm/name"))
                .is_ok_and(|n| n.trim_end() == want)
        })
        .ok_or_else(|| refuse("does not exist".into()))?;
    let slaves: Vec<String> = std::fs::read_dir(block.join(&dm).join("slaves"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let loop_index = match slaves.as_slice() {
        [one] => one.strip_prefix("loop").and_then(|n| n.parse::<u32>().ok()),
        _ => None,
    }
    .ok_or_else(|| refuse(format!("is not on exactly one loop device ({slaves:?})")))?;
    check_format_target(sysfs_root, loop_index).map_err(|e| match e {
        Refusal::Refused(m) => refuse(format!("is on loop{loop_index}: {m}")),
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mkfs_is_refused_unless_the_mapping_sits_on_one_temp_backed_loop() {
        let t = tempfile::tempdir().expect("tempdir");
        let w = |rel: &str, v: &str| {
            let p = t.path().join(rel);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, v).expect("write");
        };
        w("block/dm-1/dm/name", "cnfs-new\n");
        std::fs::create_dir_all(t.path().join("block/dm-1/slaves/loop4")).expect("mkdir");
        w(
            "block/loop4/loop/backing_file",
            "/run/cnfs/backing/new/.cnfs-volume.luks2.new-0123456789abcdef\n",
        );
        w("block/dm-2/dm/name", "cnfs-live\n");
        std::fs::create_dir_all(t.path().join("block/dm-2/slaves/loop5")).expect("mkdir");
        w(
            "block/loop5/loop/backing_file",
            "/run/cnfs/backing/live/cnfs-volume.luks2\n",
        );
        assert!(check_mkfs_target(t.path(), "new").is_ok());
        for (name, why) in [
            ("live", "not a new container's temp file"),
            ("absent", "does not exist"),
        ] {
            match check_mkfs_target(t.path(), name) {
                Err(Refusal::Refused(m)) => {
                    assert!(m.starts_with("mkfs.name: ") && m.contains(why), "{m}")
                }
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn argv_is_built_from_the_table() {
        let rows: &[(Command, &str)] = &[
            (
                Command::LuksFormat {
                    device: 3,
                    label_name: "data".into(),
                },
                "luksFormat --batch-mode --type luks2 --cipher aes-xts-plain64 --key-size 512 \
                 --sector-size 4096 --hash sha256 --pbkdf argon2id --pbkdf-memory 65536 \
                 --pbkdf-parallel 1 --pbkdf-force-iterations 4 --use-urandom --label cnfs-data \
                 --disable-external-tokens --key-file=- /dev/loop3",
            ),
            (
                Command::LuksOpen {
                    device: 12,
                    name: "data".into(),
                    read_only: true,
                },
                "open --type luks2 --disable-external-tokens --key-file=- --readonly /dev/loop12 \
                 cnfs-data",
            ),
            (
                Command::LuksOpen {
                    device: 0,
                    name: "d".into(),
                    read_only: false,
                },
                "open --type luks2 --disable-external-tokens --key-file=- /dev/loop0 cnfs-d",
            ),
            (
                Command::LuksClose {
                    name: "data".into(),
                    deferred: true,
                },
                "close --deferred cnfs-data",
            ),
            (
                Command::LuksClose {
                    name: "data".into(),
                    deferred: false,
                },
                "close cnfs-data",
            ),
            (
                Command::Mkfs {
                    name: "a-very-long-volume-name".into(),
                    uid: 1000,
                    gid: 2000,
                },
                "-t ext4 -q -F -m 0 -e remount-ro -L a-very-long-volu \
                 -E nodiscard,lazy_itable_init=1,root_owner=1000:2000 \
                 /dev/mapper/cnfs-a-very-long-volume-name",
            ),
            (Command::Version, "--version"),
        ];
        for (cmd, want) in rows {
            let want: Vec<&str> = want.split_whitespace().collect();
            assert_eq!(cmd.args(), want, "{cmd:?}");
        }
    }

    #[test]
    fn a_key_comes_exactly_with_the_commands_that_read_one() {
        let open = Command::LuksOpen {
            device: 1,
            name: "data".into(),
            read_only: false,
        };
        let close = Command::LuksClose {
            name: "data".into(),
            deferred: false,
        };
        assert_eq!(open.validate(Some(32)), Ok(()));
        assert_eq!(close.validate(None), Ok(()));
        for (cmd, key) in [(&open, None), (&open, Some(0)), (&close, Some(32))] {
            let e = cmd.validate(key).expect_err("refused");
            assert!(e.field.ends_with(".key"), "{e:?}");
        }
    }

    #[test]
    fn only_temp_container_names_may_be_formatted() {
        let rows = [
            (".cnfs-volume.luks2.new-0123456789abcdef", true),
            (".cnfs-volume.luks2.new-0123456789ABCDEF", false),
            (".cnfs-volume.luks2.new-0123456789abcde", false),
            (".cnfs-volume.luks2.new-0123456789abcdef0", false),
            (".cnfs-volume.luks2.new-0123456789abcdeg", false),
            ("cnfs-volume.luks2", false),
            ("", false),
        ];
        for (name, ok) in rows {
            assert_eq!(is_temp_container(name), ok, "{name:?}");
        }
    }
}
