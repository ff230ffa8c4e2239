//! `kata-kernel`: a distribution kernel (Debian's `linux-image-cloud-amd64`, which has NFS,
//! CephFS, CIFS, vsock and virtio as modules and runs kata-agent) in the forms Kata's
//! hypervisors boot, so that admins need no kernel build:
//! - `vmlinux-cnfs.container`: the uncompressed ELF taken out of the bzImage. Kata configures
//!   an ELF `vmlinux.container` for QEMU, Cloud Hypervisor, Firecracker and Dragonball alike;
//!   QEMU and Cloud Hypervisor boot an ELF only through its PVH entry note
//!   (`XEN_ELFNOTE_PHYS32_ENTRY`), which this checks for and reports; Firecracker and
//!   Dragonball need the ELF but not the note.
//! - `vmlinuz-cnfs.container`: the bzImage as it is (QEMU, and Cloud Hypervisor since v39).
//!
//! The bzImage's payload is found from its boot protocol header (`payload_offset`,
//! `payload_length`, protocol 2.08+) and decompressed (zstd, xz or gzip: what distributions
//! use).

use std::io::Read;
use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};

use crate::archive::{read_input, write_output};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The distribution's compressed kernel (bzImage), e.g. /boot/vmlinuz-6.12...-cloud-amd64.
    #[arg(long, value_name = "PATH")]
    pub vmlinuz: PathBuf,
    /// Directory for `vmlinux-cnfs.container` and `vmlinuz-cnfs.container`.
    #[arg(long, value_name = "DIR")]
    pub out_dir: PathBuf,
}

/// What was found in a bzImage.
#[derive(Debug, PartialEq, Eq)]
pub struct Kernel {
    pub elf: Vec<u8>,
    pub compression: &'static str,
    pub pvh: bool,
}

fn le16(b: &[u8], at: usize) -> Result<u16> {
    let s = b.get(at..at + 2).context("bzImage header is truncated")?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

fn le32(b: &[u8], at: usize) -> Result<u32> {
    let s = b.get(at..at + 4).context("bzImage header is truncated")?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// The ELF inside a bzImage, decompressed, and whether it has a PVH entry.
pub fn extract(bz: &[u8]) -> Result<Kernel> {
    // Linux boot protocol (Documentation/arch/x86/boot.rst): "HdrS" at 0x202.
    if bz.get(0x202..0x206) != Some(b"HdrS") {
        bail!("not a bzImage: no \"HdrS\" boot header at 0x202");
    }
    let version = le16(bz, 0x206)?;
    if version < 0x208 {
        bail!("boot protocol {version:#x} has no payload fields (2.08+ needed)");
    }
    let setup_sects = match bz.get(0x1f1).copied().unwrap_or(0) {
        0 => 4,
        n => usize::from(n),
    };
    let pm_start = (setup_sects + 1) * 512;
    let offset = pm_start + le32(bz, 0x248)? as usize;
    let length = le32(bz, 0x24c)? as usize;
    let payload = bz
        .get(offset..offset + length)
        .context("the bzImage payload lies outside the file")?;
    let (compression, elf) = decompress(payload)?;
    if elf.get(..4) != Some(b"\x7fELF") {
        bail!("the {compression} payload is not an ELF image");
    }
    if elf.get(4) != Some(&2) || le16(&elf, 18)? != 62 {
        bail!("the kernel is not a 64-bit x86_64 ELF");
    }
    let pvh = has_pvh_note(&elf)?;
    Ok(Kernel {
        elf,
        compression,
        pvh,
    })
}

fn decompress(payload: &[u8]) -> Result<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    if payload.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        // One zstd frame, then the kernel's 4-byte size trailer (ignored).
        let mut rd = payload;
        let mut d = ruzstd::decoding::StreamingDecoder::new(&mut rd)
            .map_err(|e| anyhow::anyhow!("zstd payload: {e}"))?;
        d.read_to_end(&mut out).context("zstd payload")?;
        return Ok(("zstd", out));
    }
    if payload.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        lzma_rs::xz_decompress(&mut &payload[..], &mut out)
            .map_err(|e| anyhow::anyhow!("xz payload: {e}"))?;
        return Ok(("xz", out));
    }
    if payload.starts_with(&[0x1f, 0x8b]) {
        flate2::read::GzDecoder::new(payload)
            .read_to_end(&mut out)
            .context("gzip payload")?;
        return Ok(("gzip", out));
    }
    bail!(
        "the bzImage payload's compression is not zstd, xz or gzip (starts {:02x?})",
        &payload[..payload.len().min(6)]
    )
}

/// True when a PT_NOTE segment holds a "Xen" note of type 18 (XEN_ELFNOTE_PHYS32_ENTRY): the
/// PVH entry point QEMU and Cloud Hypervisor boot an ELF kernel through.
fn has_pvh_note(elf: &[u8]) -> Result<bool> {
    const PT_NOTE: u32 = 4;
    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
    let u64at = |at: usize| -> Result<u64> {
        let s = elf.get(at..at + 8).context("ELF header is truncated")?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    };
    let phoff = u64at(0x20)? as usize;
    let phentsize = usize::from(le16(elf, 0x36)?);
    let phnum = usize::from(le16(elf, 0x38)?);
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if le32(elf, ph)? != PT_NOTE {
            continue;
        }
        let (off, size) = (u64at(ph + 8)? as usize, u64at(ph + 32)? as usize);
        let notes = elf
            .get(off..off + size)
            .context("PT_NOTE outside the file")?;
        let mut at = 0;
        while at + 12 <= notes.len() {
            let namesz = le32(notes, at)? as usize;
            let descsz = le32(notes, at + 4)? as usize;
            let kind = le32(notes, at + 8)?;
            let name = notes.get(at + 12..at + 12 + namesz).unwrap_or_default();
            if kind == XEN_ELFNOTE_PHYS32_ENTRY && name.starts_with(b"Xen") {
                return Ok(true);
            }
            at += 12 + namesz.div_ceil(4) * 4 + descsz.div_ceil(4) * 4;
        }
    }
    Ok(false)
}

pub fn run(args: &Args) -> Result<()> {
    let bz = read_input(&args.vmlinuz, "--vmlinuz")?;
    let k = extract(&bz).with_context(|| format!("--vmlinuz {}", args.vmlinuz.display()))?;
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("creating {}", args.out_dir.display()))?;
    write_output(&args.out_dir.join("vmlinux-cnfs.container"), &k.elf)?;
    write_output(&args.out_dir.join("vmlinuz-cnfs.container"), &bz)?;
    println!(
        "vmlinux-cnfs.container: {} bytes, ELF from a {} payload, PVH entry: {}",
        k.elf.len(),
        k.compression,
        if k.pvh { "yes" } else { "no" }
    );
    if k.pvh {
        println!("boots under QEMU, Cloud Hypervisor, Firecracker and Dragonball (kernel = .../vmlinux-cnfs.container)");
    } else {
        println!("no PVH note: QEMU and Cloud Hypervisor need vmlinuz-cnfs.container (bzImage; Cloud Hypervisor v39+); Firecracker and Dragonball boot the ELF");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 x86_64 image with one PT_NOTE segment holding `note`.
    fn elf_with_note(note_type: u32) -> Vec<u8> {
        let mut e = vec![0u8; 0x40 + 0x38];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2;
        e[18..20].copy_from_slice(&62u16.to_le_bytes());
        e[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        e[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes());
        e[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let mut note = Vec::new();
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&8u32.to_le_bytes());
        note.extend_from_slice(&note_type.to_le_bytes());
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&0x100_0000u64.to_le_bytes());
        let off = e.len();
        let ph = 0x40;
        e[ph..ph + 4].copy_from_slice(&4u32.to_le_bytes());
        e[ph + 8..ph + 16].copy_from_slice(&(off as u64).to_le_bytes());
        e[ph + 32..ph + 40].copy_from_slice(&(note.len() as u64).to_le_bytes());
        e.extend(note);
        e
    }

    /// A bzImage shell around a gzip'ed payload.
    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 5 * 512];
        b[0x1f1] = 4;
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        b[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        b[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        b.extend_from_slice(&[0u8; 16]);
        b.extend_from_slice(payload);
        b.extend_from_slice(&[0u8; 4]);
        b
    }

    fn gz(data: &[u8]) -> Vec<u8> {
        crate::archive::gzip(data).expect("gzip")
    }

    #[test]
    fn the_elf_and_its_pvh_note_come_out_of_a_bzimage() {
        let elf = elf_with_note(18);
        let k = extract(&bzimage(&gz(&elf))).expect("extract");
        assert_eq!((k.elf, k.compression, k.pvh), (elf, "gzip", true));
        let other = elf_with_note(17);
        assert!(!extract(&bzimage(&gz(&other))).expect("extract").pvh);
        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut &elf_with_note(18)[..], &mut xz).expect("xz");
        assert_eq!(extract(&bzimage(&xz)).expect("xz").compression, "xz");
    }

    #[test]
    fn what_is_not_a_bootable_x86_64_bzimage_is_refused_with_the_reason() {
        let e = extract(&[0u8; 4096]).expect_err("no header");
        assert!(e.to_string().contains("HdrS"), "{e}");
        let e = extract(&bzimage(b"\x42\x5a\x68plain")).expect_err("bzip2");
        assert!(e.to_string().contains("not zstd, xz or gzip"), "{e}");
        let e = extract(&bzimage(&gz(b"not an elf"))).expect_err("no elf");
        assert!(e.to_string().contains("not an ELF"), "{e}");
    }
}
