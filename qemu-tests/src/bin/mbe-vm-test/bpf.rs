//! What is loaded and attached, asked of the kernel directly with bpf(2): the names
//! of loaded programs, how many programs a cgroup has per attach type, and how many
//! sk_lookup programs a network namespace has.
use std::{
    fs, io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use anyhow::{Context, Result};

const BPF_PROG_GET_NEXT_ID: i64 = 11;
const BPF_PROG_GET_FD_BY_ID: i64 = 13;
const BPF_OBJ_GET_INFO_BY_FD: i64 = 15;
const BPF_PROG_QUERY: i64 = 16;

/// The cgroup attach types the agent uses, with the kernel's numbers.
pub const AGENT_ATTACH_TYPES: &[(u32, &str)] = &[
    (3, "sock_ops"),
    (10, "connect4"),
    (11, "connect6"),
    (12, "post_bind4"),
    (13, "post_bind6"),
    (14, "sendmsg4"),
    (15, "sendmsg6"),
    (19, "recvmsg4"),
    (20, "recvmsg6"),
    (21, "getsockopt"),
];

/// bpf(cmd, attr) with a zero-padded 128-byte attr.
fn bpf(cmd: i64, attr: &mut [u8; 128]) -> io::Result<i64> {
    // SAFETY: attr is a valid, writable buffer of the size passed.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn put_u32(a: &mut [u8; 128], at: usize, v: u32) {
    a[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

fn get_u32(a: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(a[at..at + 4].try_into().unwrap())
}

/// Names of every loaded BPF program.
pub fn loaded_program_names() -> Result<Vec<String>> {
    let mut names = vec![];
    let mut id = 0u32;
    loop {
        let mut a = [0u8; 128];
        put_u32(&mut a, 0, id);
        match bpf(BPF_PROG_GET_NEXT_ID, &mut a) {
            Ok(_) => id = get_u32(&a, 4),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(names),
            Err(e) => return Err(e).context("BPF_PROG_GET_NEXT_ID"),
        }
        let mut a = [0u8; 128];
        put_u32(&mut a, 0, id);
        let fd = match bpf(BPF_PROG_GET_FD_BY_ID, &mut a) {
            // SAFETY: a new fd the kernel returned.
            Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd as i32) },
            // Unloaded in between.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e).with_context(|| format!("BPF_PROG_GET_FD_BY_ID {id}")),
        };
        // struct bpf_prog_info: name[16] at offset 64.
        let mut info = [0u8; 256];
        let mut a = [0u8; 128];
        put_u32(&mut a, 0, fd.as_raw_fd() as u32);
        put_u32(&mut a, 4, info.len() as u32);
        a[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a)
            .with_context(|| format!("BPF_OBJ_GET_INFO_BY_FD of program {id}"))?;
        let name: Vec<u8> = info[64..80]
            .iter()
            .copied()
            .take_while(|&b| b != 0)
            .collect();
        names.push(String::from_utf8_lossy(&name).into_owned());
    }
}

/// The kernel's number for sk_lookup (BPF_SK_LOOKUP), attached to a network namespace.
const SK_LOOKUP: u32 = 36;

/// Programs attached to `path` (a cgroup directory or a network namespace file) for
/// `attach_type` (BPF_PROG_QUERY).
pub fn attached_count(path: &Path, attach_type: u32) -> Result<u32> {
    let target = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut a = [0u8; 128];
    put_u32(&mut a, 0, target.as_raw_fd() as u32);
    put_u32(&mut a, 4, attach_type);
    bpf(BPF_PROG_QUERY, &mut a)
        .with_context(|| format!("BPF_PROG_QUERY {} type {attach_type}", path.display()))?;
    // query.prog_cnt at offset 24.
    Ok(get_u32(&a, 24))
}

/// sk_lookup programs attached to the network namespace pinned at `path`.
pub fn sk_lookup_count(path: &Path) -> Result<u32> {
    attached_count(path, SK_LOOKUP)
}

/// `name=count` for each attach type the agent uses, and the total.
pub fn attached_summary(path: &Path) -> Result<(String, u32)> {
    let mut parts = vec![];
    let mut total = 0;
    for &(ty, name) in AGENT_ATTACH_TYPES {
        let n = attached_count(path, ty)?;
        total += n;
        parts.push(format!("{name}={n}"));
    }
    Ok((parts.join(" "), total))
}
