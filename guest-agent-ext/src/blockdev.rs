//! Loop devices and the kernel's view of device-mapper devices, for encrypted volumes.
//!
//! The loop ioctls are written out here (libc has none of them, and the loop crates run
//! bindgen at build time and open the backing file by path, while CNFS hands over its own,
//! already locked descriptor). The functions marked "child-safe" make system calls only and
//! allocate nothing: they run in a killable child after fork, because every step that
//! touches a network file can hang on a dead server.

use std::ffi::CStr;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;

const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
/// `_IOR(0x12, 114, size_t)`: a block device's size in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `_IOW('f', 16, __u64)`: grows a mounted ext4 to a number of blocks (fs/ext4/ioctl.c;
/// needs CAP_SYS_RESOURCE).
const EXT4_IOC_RESIZE_FS: libc::c_ulong = 0x4008_6610;
/// `_IOR('X', 125, __u32)`: shuts a mounted file system down (fs/ext4/ioctl.c; needs
/// CAP_SYS_ADMIN).
const FS_IOC_SHUTDOWN: libc::c_ulong = 0x8004_587d;
/// Shut down without writing anything more, not even the journal.
const EXT4_GOING_FLAGS_NOLOGFLUSH: u32 = 2;
pub const LO_FLAGS_READ_ONLY: u32 = 1;
pub const LO_FLAGS_DIRECT_IO: u32 = 16;

/// `struct loop_info64` (include/uapi/linux/loop.h).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LoopInfo64 {
    pub lo_device: u64,
    pub lo_inode: u64,
    pub lo_rdevice: u64,
    pub lo_offset: u64,
    pub lo_sizelimit: u64,
    pub lo_number: u32,
    pub lo_encrypt_type: u32,
    pub lo_encrypt_key_size: u32,
    pub lo_flags: u32,
    pub lo_file_name: [u8; 64],
    pub lo_crypt_name: [u8; 64],
    pub lo_encrypt_key: [u8; 32],
    pub lo_init: [u64; 2],
}

/// `struct loop_config`, LOOP_CONFIGURE's argument (Linux 5.8+): the backing descriptor and
/// the status in one call, so a half-configured device is never visible.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

const ZERO_INFO: LoopInfo64 = LoopInfo64 {
    lo_device: 0,
    lo_inode: 0,
    lo_rdevice: 0,
    lo_offset: 0,
    lo_sizelimit: 0,
    lo_number: 0,
    lo_encrypt_type: 0,
    lo_encrypt_key_size: 0,
    lo_flags: 0,
    lo_file_name: [0; 64],
    lo_crypt_name: [0; 64],
    lo_encrypt_key: [0; 32],
    lo_init: [0; 2],
};

/// `/dev/loop<n>` in a caller's stack buffer (child-safe: nothing allocated).
fn loop_path(n: u32, buf: &mut [u8; 24]) -> &CStr {
    let prefix = b"/dev/loop";
    buf[..prefix.len()].copy_from_slice(prefix);
    let mut digits = [0u8; 10];
    let mut len = 0;
    let mut v = n;
    loop {
        digits[len] = b'0' + (v % 10) as u8;
        len += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[prefix.len() + i] = digits[len - 1 - i];
    }
    buf[prefix.len() + len] = 0;
    // The buffer holds one NUL, written just above; the fallback cannot happen.
    CStr::from_bytes_until_nul(&buf[..]).unwrap_or(c"/dev/loop")
}

fn open_raw(path: &CStr, flags: libc::c_int) -> Result<RawFd, Errno> {
    // SAFETY: a NUL-terminated path that outlives the call; open(2) reads only it.
    let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        Err(Errno::last())
    } else {
        Ok(fd)
    }
}

fn close_raw(fd: RawFd) {
    // SAFETY: closes a descriptor this module opened and owns; nothing uses it afterwards.
    unsafe { libc::close(fd) };
}

/// Binds `backing` to a free loop device with LOOP_CONFIGURE and returns its number. The
/// loop takes its own reference to the open file (and so keeps any lock on it); `backing`
/// may be closed afterwards. Direct I/O is asked for (no second page cache in the guest) and
/// dropped if the file cannot do it. Child-safe.
pub fn attach(backing: RawFd, read_only: bool) -> Result<u32, Errno> {
    let ctl = open_raw(c"/dev/loop-control", libc::O_RDWR)?;
    let mut result = Err(Errno::EBUSY);
    // Another process may take the free device between GET_FREE and CONFIGURE.
    for _ in 0..8 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
        let n = unsafe { libc::ioctl(ctl, LOOP_CTL_GET_FREE) };
        if n < 0 {
            result = Err(Errno::last());
            break;
        }
        let n = n as u32;
        let mut buf = [0u8; 24];
        let dev = match open_raw(
            loop_path(n, &mut buf),
            if read_only {
                libc::O_RDONLY
            } else {
                libc::O_RDWR
            },
        ) {
            Ok(fd) => fd,
            Err(e) => {
                result = Err(e);
                break;
            }
        };
        let mut flags = LO_FLAGS_DIRECT_IO;
        if read_only {
            flags |= LO_FLAGS_READ_ONLY;
        }
        let mut rc = configure(dev, backing, flags);
        if rc == Err(Errno::EINVAL) {
            rc = configure(dev, backing, flags & !LO_FLAGS_DIRECT_IO);
        }
        close_raw(dev);
        match rc {
            Ok(()) => {
                result = Ok(n);
                break;
            }
            Err(Errno::EBUSY) => continue,
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    close_raw(ctl);
    result
}

fn configure(dev: RawFd, backing: RawFd, flags: u32) -> Result<(), Errno> {
    let mut info = ZERO_INFO;
    info.lo_flags = flags;
    let cfg = LoopConfig {
        fd: backing as u32,
        block_size: 0,
        info,
        reserved: [0; 8],
    };
    // SAFETY: LOOP_CONFIGURE reads one `struct loop_config`, laid out above (size asserted),
    // from a pointer to a value on the stack that outlives the call.
    let rc = unsafe { libc::ioctl(dev, LOOP_CONFIGURE, &cfg as *const LoopConfig) };
    if rc < 0 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

/// Grows the ext4 mounted at `mount_point` to fill `device` (its block device), online.
/// Returns `[device bytes, blocks before, blocks after]`. Child-safe.
pub fn grow_ext4(device: &CStr, mount_point: &CStr) -> Result<[u64; 3], Errno> {
    let dev = open_raw(device, libc::O_RDONLY)?;
    let mut bytes: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 to a value on the stack.
    let rc = unsafe { libc::ioctl(dev, BLKGETSIZE64, &mut bytes as *mut u64) };
    let errno = Errno::last();
    close_raw(dev);
    if rc < 0 {
        return Err(errno);
    }
    let dir = open_raw(mount_point, libc::O_RDONLY | libc::O_DIRECTORY)?;
    // SAFETY: an all-zero `struct statfs` is valid; fstatfs(2) fills it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs(2) writes one `struct statfs` to a value on the stack.
    let rc = unsafe { libc::fstatfs(dir, &mut st) };
    if rc < 0 || st.f_bsize <= 0 {
        let e = Errno::last();
        close_raw(dir);
        return Err(if rc < 0 { e } else { Errno::EINVAL });
    }
    let (before, blocks) = (st.f_blocks, bytes / st.f_bsize as u64);
    let mut result = Ok([bytes, before, blocks]);
    if blocks > before {
        // SAFETY: EXT4_IOC_RESIZE_FS reads one u64 from a value on the stack.
        let rc = unsafe { libc::ioctl(dir, EXT4_IOC_RESIZE_FS, &blocks as *const u64) };
        if rc < 0 {
            result = Err(Errno::last());
        }
    }
    close_raw(dir);
    result
}

/// `struct dm_ioctl` (include/uapi/linux/dm-ioctl.h): 312 bytes, name at 48, data at 312.
const DM_IOCTL_SIZE: usize = 312;
const DM_NAME_AT: usize = 48;
const DM_NAME_LEN: usize = 128;
/// `_IOWR(0xfd, 6, struct dm_ioctl)` and `_IOWR(0xfd, 9, struct dm_ioctl)`.
const DM_DEV_SUSPEND: libc::c_ulong = 0xc138_fd06;
const DM_TABLE_LOAD: libc::c_ulong = 0xc138_fd09;
/// I/O the target pushes back is kept for the new table rather than failed (the suspend
/// still waits for I/O in flight: dm-crypt's, stuck on a dead server, keeps it waiting).
const DM_NOFLUSH_FLAG: u32 = 1 << 11;
/// Do not freeze the file system on top (that would write to the device).
const DM_SKIP_LOCKFS_FLAG: u32 = 1 << 10;
/// `struct dm_target_spec`: sector_start, length, status, next, target_type[16].
const DM_TARGET_SPEC_SIZE: usize = 40;

/// Swaps device-mapper device `dm_name`'s table for one `error` target of `sectors`
/// sectors: every later read and write of it fails at once, nothing more reaches the device
/// below. The table is loaded (inactive, nothing changes yet), then one resume call swaps it
/// in: the kernel suspends (without flushing queued I/O, without freezing the file system),
/// swaps and resumes within that call, so a kill at any point leaves either the old table
/// or the new one running, never a suspended device. Child-safe (the buffer is on the stack).
pub fn fail_all_io(dm_name: &CStr, sectors: u64) -> Result<(), Errno> {
    let name = dm_name.to_bytes();
    if name.is_empty() || name.len() >= DM_NAME_LEN {
        return Err(Errno::EINVAL);
    }
    #[repr(C, align(8))]
    struct Buf([u8; DM_IOCTL_SIZE + DM_TARGET_SPEC_SIZE + 8]);
    let header = |buf: &mut Buf, size: usize, targets: u32, flags: u32| {
        buf.0.fill(0);
        for (i, v) in [4u32, 0, 0].iter().enumerate() {
            buf.0[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
        }
        buf.0[12..16].copy_from_slice(&(size as u32).to_ne_bytes());
        buf.0[16..20].copy_from_slice(&(DM_IOCTL_SIZE as u32).to_ne_bytes());
        buf.0[20..24].copy_from_slice(&targets.to_ne_bytes());
        buf.0[28..32].copy_from_slice(&flags.to_ne_bytes());
        buf.0[DM_NAME_AT..DM_NAME_AT + name.len()].copy_from_slice(name);
    };
    let ctl = open_raw(c"/dev/mapper/control", libc::O_RDWR)?;
    let mut buf = Buf([0; DM_IOCTL_SIZE + DM_TARGET_SPEC_SIZE + 8]);
    let call = |buf: &mut Buf, req: libc::c_ulong| {
        // SAFETY: the device-mapper ioctls read and write at most `data_size` bytes of the
        // buffer on the stack, which is that long.
        let rc = unsafe { libc::ioctl(ctl, req, buf.0.as_mut_ptr()) };
        if rc < 0 {
            Err(Errno::last())
        } else {
            Ok(())
        }
    };
    let size = buf.0.len();
    header(&mut buf, size, 1, 0);
    let spec = DM_IOCTL_SIZE;
    buf.0[spec + 8..spec + 16].copy_from_slice(&sectors.to_ne_bytes());
    // `next`: the offset of the next spec from this one; none follows.
    let next = (size - spec) as u32;
    buf.0[spec + 20..spec + 24].copy_from_slice(&next.to_ne_bytes());
    buf.0[spec + 24..spec + 29].copy_from_slice(b"error");
    // The error target takes no parameters: an empty string follows the spec.
    let swapped = call(&mut buf, DM_TABLE_LOAD).and_then(|()| {
        header(
            &mut buf,
            DM_IOCTL_SIZE,
            0,
            DM_NOFLUSH_FLAG | DM_SKIP_LOCKFS_FLAG,
        );
        call(&mut buf, DM_DEV_SUSPEND)
    });
    close_raw(ctl);
    swapped
}

/// Shuts the file system mounted at `mount_point` down without writing anything more to its
/// device: every later read and write fails with EIO until it is unmounted. Child-safe.
pub fn shut_down(mount_point: &CStr) -> Result<(), Errno> {
    let dir = open_raw(mount_point, libc::O_RDONLY | libc::O_DIRECTORY)?;
    let flags = EXT4_GOING_FLAGS_NOLOGFLUSH;
    // SAFETY: FS_IOC_SHUTDOWN reads one u32 from a value on the stack.
    let rc = unsafe { libc::ioctl(dir, FS_IOC_SHUTDOWN, &flags as *const u32) };
    let errno = Errno::last();
    close_raw(dir);
    if rc < 0 {
        return Err(errno);
    }
    Ok(())
}

/// Releases loop device `n` from its file. A device still open (a dm-crypt mapping on it
/// being removed) is cleared by the kernel when its last user closes it. Child-safe.
pub fn detach(n: u32) -> Result<(), Errno> {
    let mut buf = [0u8; 24];
    let dev = open_raw(loop_path(n, &mut buf), libc::O_RDONLY)?;
    // SAFETY: LOOP_CLR_FD takes no argument.
    let rc = unsafe { libc::ioctl(dev, LOOP_CLR_FD, 0) };
    let errno = Errno::last();
    close_raw(dev);
    match rc {
        0 => Ok(()),
        // Not bound (any more): nothing to clear.
        _ if errno == Errno::ENXIO => Ok(()),
        _ => Err(errno),
    }
}

/// The device and inode of loop `n`'s backing file, as the kernel recorded them: how a loop
/// is matched to a file whatever path it shows (an NFS silly-rename, " (deleted)").
pub fn backing_identity(n: u32) -> Result<(u64, u64), Errno> {
    let mut buf = [0u8; 24];
    let dev = open_raw(loop_path(n, &mut buf), libc::O_RDONLY)?;
    let mut info = ZERO_INFO;
    // SAFETY: LOOP_GET_STATUS64 writes one `struct loop_info64` to a value on the stack.
    let rc = unsafe { libc::ioctl(dev, LOOP_GET_STATUS64, &mut info as *mut LoopInfo64) };
    let errno = Errno::last();
    close_raw(dev);
    if rc < 0 {
        return Err(errno);
    }
    Ok((info.lo_device, info.lo_inode))
}

/// What sysfs (`root`, normally `/sys`) says about the block devices behind a volume.
pub struct Sysfs {
    root: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Sysfs {
            root: PathBuf::from("/sys"),
        }
    }
}

impl Sysfs {
    pub fn at(root: &Path) -> Self {
        Sysfs {
            root: root.to_path_buf(),
        }
    }

    fn read(&self, rel: &str) -> Option<String> {
        std::fs::read_to_string(self.root.join(rel))
            .ok()
            .map(|s| s.trim_end_matches('\n').to_string())
    }

    /// The `dm-N` kernel name of the device-mapper device called `dm_name`, if one exists.
    pub fn dm_by_name(&self, dm_name: &str) -> Option<String> {
        let dir = std::fs::read_dir(self.root.join("block")).ok()?;
        dir.flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|k| k.starts_with("dm-"))
            .find(|k| self.read(&format!("block/{k}/dm/name")).as_deref() == Some(dm_name))
    }

    /// Block device `kernel_name`'s size in 512-byte sectors (`/sys/block/<name>/size`).
    pub fn sectors(&self, kernel_name: &str) -> Option<u64> {
        self.read(&format!("block/{kernel_name}/size"))?
            .parse()
            .ok()
    }

    /// The names of all device-mapper devices.
    pub fn dm_names(&self) -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(self.root.join("block")) else {
            return Vec::new();
        };
        let mut names: Vec<String> = dir
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|k| k.starts_with("dm-"))
            .filter_map(|k| self.read(&format!("block/{k}/dm/name")))
            .collect();
        names.sort();
        names
    }

    /// The loop devices a device-mapper device sits on (`loopN` numbers).
    pub fn loop_slaves(&self, dm: &str) -> Vec<u32> {
        let Ok(dir) = std::fs::read_dir(self.root.join("block").join(dm).join("slaves")) else {
            return Vec::new();
        };
        let mut loops: Vec<u32> = dir
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|s| s.strip_prefix("loop"))
                    .and_then(|n| n.parse().ok())
            })
            .collect();
        loops.sort_unstable();
        loops
    }

    /// Loop devices whose backing file's path lies under `dir` (as the kernel shows it).
    pub fn loops_under(&self, dir: &Path) -> Vec<u32> {
        let Ok(block) = std::fs::read_dir(self.root.join("block")) else {
            return Vec::new();
        };
        let mut prefix = dir.as_os_str().to_string_lossy().into_owned();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        let mut loops: Vec<u32> = block
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let n: u32 = name.strip_prefix("loop")?.parse().ok()?;
                let file = self.read(&format!("block/{name}/loop/backing_file"))?;
                file.starts_with(&prefix).then_some(n)
            })
            .collect();
        loops.sort_unstable();
        loops
    }

    /// Whether loop `n` does direct I/O on its file (the effective value, for the log).
    pub fn loop_dio(&self, n: u32) -> Option<bool> {
        self.read(&format!("block/loop{n}/loop/dio"))
            .map(|v| v.trim() == "1")
    }

    /// The loop devices bound to a file.
    pub fn bound_loops(&self) -> Vec<u32> {
        let Ok(block) = std::fs::read_dir(self.root.join("block")) else {
            return Vec::new();
        };
        let mut loops: Vec<u32> = block
            .flatten()
            .filter_map(|e| {
                let n: u32 = e.file_name().to_str()?.strip_prefix("loop")?.parse().ok()?;
                self.loop_bound(n).then_some(n)
            })
            .collect();
        loops.sort_unstable();
        loops
    }

    /// Whether a bound loop device's backing file is `file` as the kernel names it (its path,
    /// also once its share is detached, as `readlink` of a descriptor of the same file shows
    /// it from the same process). Reads sysfs only: never the file's server.
    pub fn loop_uses(&self, file: &Path) -> bool {
        self.bound_loops().into_iter().any(|n| {
            self.read(&format!("block/loop{n}/loop/backing_file"))
                .is_some_and(|b| b.trim_end_matches('\n') == file.as_os_str().to_string_lossy())
        })
    }

    /// Whether loop `n` is bound to a file at all.
    pub fn loop_bound(&self, n: u32) -> bool {
        self.read(&format!("block/loop{n}/loop/backing_file"))
            .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_paths_are_formatted_without_allocating() {
        let mut buf = [0u8; 24];
        assert_eq!(loop_path(0, &mut buf), c"/dev/loop0");
        assert_eq!(loop_path(17, &mut buf), c"/dev/loop17");
        assert_eq!(loop_path(u32::MAX, &mut buf), c"/dev/loop4294967295");
    }

    fn fake_sysfs() -> tempfile::TempDir {
        let t = tempfile::tempdir().expect("tempdir");
        let w = |rel: &str, v: &str| {
            let p = t.path().join(rel);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, v).expect("write");
        };
        w("block/dm-0/dm/name", "other\n");
        w("block/dm-3/dm/name", "cnfs-data\n");
        std::fs::create_dir_all(t.path().join("block/dm-3/slaves/loop7")).expect("mkdir");
        w(
            "block/loop7/loop/backing_file",
            "/run/cnfs/backing/data/cnfs-volume.luks2\n",
        );
        w("block/loop7/loop/dio", "1\n");
        w(
            "block/loop2/loop/backing_file",
            "/run/cnfs/backing/data2/cnfs-volume.luks2\n",
        );
        std::fs::create_dir_all(t.path().join("block/loop3/loop")).expect("mkdir");
        t
    }

    #[test]
    fn a_volume_stack_is_found_by_dm_name_slaves_and_backing_path() {
        let t = fake_sysfs();
        let s = Sysfs::at(t.path());
        assert_eq!(s.dm_by_name("cnfs-data").as_deref(), Some("dm-3"));
        assert_eq!(s.dm_by_name("cnfs-nope"), None);
        assert_eq!(
            s.dm_names(),
            vec!["cnfs-data".to_string(), "other".to_string()]
        );
        assert_eq!(s.loop_slaves("dm-3"), vec![7]);
        // "data" must not match "data2"'s directory.
        assert_eq!(s.loops_under(Path::new("/run/cnfs/backing/data")), vec![7]);
        assert_eq!(s.loops_under(Path::new("/run/cnfs/backing/data2")), vec![2]);
        assert_eq!(s.loop_dio(7), Some(true));
        assert!(s.loop_bound(7));
        assert!(!s.loop_bound(3), "an unbound loop has no backing_file");
    }
}
