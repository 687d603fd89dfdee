//! The complete verifier log of a probe this kernel rejects. The agent reports a
//! rejection in one line (the error and the verifier's last words); to report the whole
//! log, this takes the probe object the agent embeds (the BPF ELF inside its binary),
//! creates its maps (legacy `maps` section, 16 entries each, as `check` makes them)
//! and its globals' sections (one-entry arrays, `.rodata` frozen, `ACCELERATE` = 1),
//! points the program's loads at them and loads it with the verifier log on. Only
//! programs whose relocations all name maps or globals are loaded this way (calls into
//! `.text` are not); for any other the reason is given instead.
use std::{collections::BTreeMap, fs, os::fd::AsRawFd, path::Path};

use anyhow::{Context, Result, bail};

const EM_BPF: u16 = 247;
const SHT_SYMTAB: u32 = 2;
const SHT_REL: u32 = 9;
const R_BPF_64_64: u32 = 1;
const BPF_PSEUDO_MAP_FD: u8 = 1;
const BPF_PSEUDO_MAP_VALUE: u8 = 2;
const BPF_F_RDONLY_PROG: u32 = 1 << 7;
const BPF_MAP_UPDATE_ELEM: i64 = 2;
const BPF_MAP_FREEZE: i64 = 22;
/// Globals the agent sets before loading, with the value `check` gives them
/// (`ACCELERATE`: 1, as `check` tries the probes with acceleration on).
const GLOBALS: [(&str, u32); 1] = [("ACCELERATE", 1)];
const BPF_MAP_CREATE: i64 = 0;
const BPF_PROG_LOAD: i64 = 5;
/// Map entries, as `merbridge-edge check` sizes the maps.
const MAX_ENTRIES: u32 = 16;
/// The verifier log buffer (the kernel's limit before 5.2 is 16 MiB - 1).
const LOG_SIZE: usize = (16 << 20) - 1;

/// An ELF section header (the fields used).
struct Section {
    name: String,
    kind: u32,
    offset: usize,
    size: usize,
    link: u32,
    info: u32,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// The BPF object embedded in `binary`: a little-endian 64-bit ELF for EM_BPF, cut at
/// the end of its section header table.
pub fn embedded_object(binary: &[u8]) -> Result<Vec<u8>> {
    let mut at = 0;
    while let Some(i) = binary[at..].windows(4).position(|w| w == b"\x7fELF") {
        let start = at + i;
        let h = &binary[start..];
        if h.len() > 64 && h[4] == 2 && h[5] == 1 && u16_at(h, 18) == EM_BPF {
            let shoff = u64_at(h, 0x28) as usize;
            let end = shoff + u16_at(h, 0x3a) as usize * u16_at(h, 0x3c) as usize;
            if end <= h.len() {
                return Ok(h[..end].to_vec());
            }
        }
        at = start + 4;
    }
    bail!("no BPF object in the agent binary")
}

fn sections(obj: &[u8]) -> Result<Vec<Section>> {
    let shoff = u64_at(obj, 0x28) as usize;
    let entsize = u16_at(obj, 0x3a) as usize;
    let count = u16_at(obj, 0x3c) as usize;
    let strndx = u16_at(obj, 0x3e) as usize;
    let header = |i: usize| shoff + i * entsize;
    let names_at = u64_at(obj, header(strndx) + 0x18) as usize;
    let mut out = vec![];
    for i in 0..count {
        let h = header(i);
        let name_off = names_at + u32_at(obj, h) as usize;
        let name_end = obj[name_off..]
            .iter()
            .position(|&b| b == 0)
            .context("section name")?;
        out.push(Section {
            name: String::from_utf8_lossy(&obj[name_off..name_off + name_end]).into_owned(),
            kind: u32_at(obj, h + 4),
            offset: u64_at(obj, h + 0x18) as usize,
            size: u64_at(obj, h + 0x20) as usize,
            link: u32_at(obj, h + 0x28),
            info: u32_at(obj, h + 0x2c),
        });
    }
    Ok(out)
}

/// One symbol: name, section index, value.
fn symbol(obj: &[u8], secs: &[Section], symtab: &Section, i: usize) -> (String, u16, u64) {
    let at = symtab.offset + i * 24;
    let strtab = &secs[symtab.link as usize];
    let name_off = strtab.offset + u32_at(obj, at) as usize;
    let len = obj[name_off..].iter().position(|&b| b == 0).unwrap_or(0);
    (
        String::from_utf8_lossy(&obj[name_off..name_off + len]).into_owned(),
        u16_at(obj, at + 6),
        u64_at(obj, at + 8),
    )
}

fn bpf(cmd: i64, attr: &mut [u8]) -> std::io::Result<i32> {
    // SAFETY: attr is a valid, writable buffer of the size passed.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r as i32)
    }
}

/// The program and attach type of a probe section.
fn types(section: &str) -> Option<(u32, u32)> {
    Some(match section {
        "cgroup/connect4" => (18, 10),
        "cgroup/connect6" => (18, 11),
        "cgroup/post_bind4" => (9, 12),
        "cgroup/post_bind6" => (9, 13),
        "cgroup/sendmsg4" => (18, 14),
        "cgroup/sendmsg6" => (18, 15),
        "cgroup/recvmsg4" => (18, 19),
        "cgroup/recvmsg6" => (18, 20),
        "cgroup/getsockopt" => (25, 21),
        "sockops" => (13, 3),
        "sk_msg" => (16, 7),
        "sk_lookup" => (30, 36),
        _ => return None,
    })
}

/// Loads probe `program` of the agent at `agent` with the verifier log on: the log's
/// lines (also when the verifier accepts it).
pub fn verifier_log(agent: &Path, program: &str) -> Result<Vec<String>> {
    // Kernels before 5.11 charge maps to RLIMIT_MEMLOCK (the agent raises it too).
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid struct.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    let binary = fs::read(agent).with_context(|| format!("reading {}", agent.display()))?;
    let obj = embedded_object(&binary)?;
    let secs = sections(&obj)?;
    let symtab = secs
        .iter()
        .find(|s| s.kind == SHT_SYMTAB)
        .context("no symbol table")?;
    let maps_index = secs
        .iter()
        .position(|s| s.name == "maps")
        .context("no maps section")?;
    let license = secs
        .iter()
        .find(|s| s.name == "license")
        .map(|s| obj[s.offset..s.offset + s.size].to_vec())
        .unwrap_or_else(|| b"GPL\0".to_vec());
    // The program: a FUNC symbol named `program`, alone in its section.
    let (prog_index, section) = (0..symtab.size / 24)
        .map(|i| symbol(&obj, &secs, symtab, i))
        .find(|(name, _, _)| name == program)
        .map(|(_, shndx, _)| (shndx as usize, &secs[shndx as usize]))
        .with_context(|| format!("no program {program} in the probe object"))?;
    // FUNC symbols of the section: the program alone, else (local functions to place
    // as the agent's loader does) this loader would not load what the agent loads.
    let size_at = |i: usize| u64_at(&obj, symtab.offset + i * 24 + 16);
    let funcs: Vec<u64> = (0..symtab.size / 24)
        .filter(|&i| {
            obj[symtab.offset + i * 24 + 4] & 0xf == 2
                && u16_at(&obj, symtab.offset + i * 24 + 6) as usize == prog_index
        })
        .map(size_at)
        .collect();
    if funcs.len() != 1 || funcs[0] as usize != section.size {
        bail!(
            "{program}'s section {} holds more than the program ({} functions, {} of {} \
             bytes); the agent's one-line report is all there is",
            section.name,
            funcs.len(),
            funcs.first().copied().unwrap_or(0),
            section.size
        );
    }
    let (prog_type, attach_type) = types(&section.name)
        .with_context(|| format!("unknown program section {}", section.name))?;
    let mut insns = obj[section.offset..section.offset + section.size].to_vec();
    let rel = secs
        .iter()
        .find(|s| s.kind == SHT_REL && s.info as usize == prog_index);
    let mut maps: BTreeMap<String, std::os::fd::OwnedFd> = BTreeMap::new();
    for r in rel
        .map(|r| {
            (r.offset..r.offset + r.size)
                .step_by(16)
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
    {
        let offset = u64_at(&obj, r) as usize;
        let info = u64_at(&obj, r + 8);
        let (sym, kind) = ((info >> 32) as usize, (info & 0xffff_ffff) as u32);
        let (name, shndx, value) = symbol(&obj, &secs, symtab, sym);
        let data = &secs[shndx as usize];
        if kind == R_BPF_64_64
            && shndx as usize != maps_index
            && [".rodata", ".data", ".bss"]
                .iter()
                .any(|d| data.name == *d || data.name.starts_with(&format!("{d}.")))
        {
            // A global: its section as a one-entry array map (read-only and frozen for
            // .rodata), the load pointing into it.
            let key = format!("section {}", data.name);
            if !maps.contains_key(&key) {
                let size = data.size.max(1) as u32;
                let mut attr = [0u8; 128];
                attr[0..4].copy_from_slice(&2u32.to_le_bytes()); // BPF_MAP_TYPE_ARRAY
                attr[4..8].copy_from_slice(&4u32.to_le_bytes());
                attr[8..12].copy_from_slice(&size.to_le_bytes());
                attr[12..16].copy_from_slice(&1u32.to_le_bytes());
                let rodata = data.name.starts_with(".rodata");
                if rodata {
                    attr[16..20].copy_from_slice(&BPF_F_RDONLY_PROG.to_le_bytes());
                }
                let fd = bpf(BPF_MAP_CREATE, &mut attr)
                    .with_context(|| format!("creating the map of {}", data.name))?;
                let mut value = if data.name.starts_with(".bss") {
                    vec![0u8; size as usize]
                } else {
                    obj[data.offset..data.offset + data.size].to_vec()
                };
                value.resize(size as usize, 0);
                // The agent's defaults for the globals it overrides.
                for (global, v) in GLOBALS {
                    if let Some((_, gshndx, gvalue)) = (0..symtab.size / 24)
                        .map(|i| symbol(&obj, &secs, symtab, i))
                        .find(|(n, _, _)| n == global)
                        && gshndx == shndx
                    {
                        let at = gvalue as usize;
                        value[at..at + 4].copy_from_slice(&v.to_le_bytes());
                    }
                }
                let zero = 0u32;
                let mut attr = [0u8; 128];
                attr[0..4].copy_from_slice(&(fd as u32).to_le_bytes());
                attr[8..16].copy_from_slice(&(&zero as *const u32 as u64).to_le_bytes());
                attr[16..24].copy_from_slice(&(value.as_ptr() as u64).to_le_bytes());
                bpf(BPF_MAP_UPDATE_ELEM, &mut attr)
                    .with_context(|| format!("filling the map of {}", data.name))?;
                if rodata {
                    let mut attr = [0u8; 128];
                    attr[0..4].copy_from_slice(&(fd as u32).to_le_bytes());
                    bpf(BPF_MAP_FREEZE, &mut attr)
                        .with_context(|| format!("freezing the map of {}", data.name))?;
                }
                // SAFETY: a new fd the kernel returned.
                maps.insert(key.clone(), unsafe {
                    std::os::fd::FromRawFd::from_raw_fd(fd)
                });
            }
            let fd = maps[&key].as_raw_fd();
            let addend = u32_at(&insns, offset + 4) as u64 + value;
            insns[offset + 1] = (insns[offset + 1] & 0x0f) | (BPF_PSEUDO_MAP_VALUE << 4);
            insns[offset + 4..offset + 8].copy_from_slice(&fd.to_le_bytes());
            insns[offset + 12..offset + 16].copy_from_slice(&(addend as u32).to_le_bytes());
            continue;
        }
        if kind != R_BPF_64_64 || shndx as usize != maps_index {
            bail!(
                "{program} has a relocation this loader does not handle ({name} in {}, type \
                 {kind}); the agent's one-line report is all there is",
                data.name
            );
        }
        if !maps.contains_key(&name) {
            let def = secs[maps_index].offset + value as usize;
            let mut attr = [0u8; 128];
            attr[0..4].copy_from_slice(&obj[def..def + 4]); // map_type
            attr[4..8].copy_from_slice(&obj[def + 4..def + 8]); // key_size
            attr[8..12].copy_from_slice(&obj[def + 8..def + 12]); // value_size
            attr[12..16].copy_from_slice(&MAX_ENTRIES.to_le_bytes());
            attr[16..20].copy_from_slice(&obj[def + 16..def + 20]); // map_flags
            let fd =
                bpf(BPF_MAP_CREATE, &mut attr).with_context(|| format!("creating map {name}"))?;
            // SAFETY: a new fd the kernel returned.
            maps.insert(name.clone(), unsafe {
                std::os::fd::FromRawFd::from_raw_fd(fd)
            });
        }
        let fd = maps[&name].as_raw_fd();
        // ld_imm64: src_reg in the high nibble of byte 1, imm at 4.
        insns[offset + 1] = (insns[offset + 1] & 0x0f) | (BPF_PSEUDO_MAP_FD << 4);
        insns[offset + 4..offset + 8].copy_from_slice(&fd.to_le_bytes());
    }
    let mut log = vec![0u8; LOG_SIZE];
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&prog_type.to_le_bytes());
    attr[4..8].copy_from_slice(&((insns.len() / 8) as u32).to_le_bytes());
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_le_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_le_bytes());
    attr[24..28].copy_from_slice(&1u32.to_le_bytes()); // log_level
    attr[28..32].copy_from_slice(&(log.len() as u32).to_le_bytes());
    attr[32..40].copy_from_slice(&(log.as_mut_ptr() as u64).to_le_bytes());
    // prog_name at 48 (16 bytes), expected_attach_type at 68.
    let short: Vec<u8> = program.bytes().take(15).collect();
    attr[48..48 + short.len()].copy_from_slice(&short);
    attr[68..72].copy_from_slice(&attach_type.to_le_bytes());
    let result = bpf(BPF_PROG_LOAD, &mut attr);
    let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
    let mut lines: Vec<String> = String::from_utf8_lossy(&log[..end])
        .lines()
        .map(String::from)
        .collect();
    match result {
        Ok(fd) => {
            // SAFETY: closing the program fd the kernel returned.
            unsafe { libc::close(fd) };
            lines.insert(
                0,
                format!("{program}: accepted by the verifier when loaded alone"),
            );
        }
        Err(e) => lines.insert(0, format!("{program}: BPF_PROG_LOAD: {e}; verifier log:")),
    }
    Ok(lines)
}
