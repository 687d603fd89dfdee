//! `merbridge-edge cleanup`: removes whatever an agent could have left in the kernel.
//!
//! The agent itself leaves nothing: its attachments are bpf_links and its maps belong
//! to its file descriptors, so the kernel drops them when it exits in any way. What can
//! outlive it is what was pinned: pins under `<bpffs>/merbridge-edge` (by tools or
//! earlier builds), and any bpf_link of one of our programs (`mb_*`) kept alive by a
//! pin elsewhere. Idempotent, and safe when nothing is there.
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Result, bail};

use crate::mountinfo;

/// The directory under every bpffs mount that belongs to the agent.
pub const PIN_DIR: &str = "merbridge-edge";

/// Our programs' names start with this.
const PROGRAM_PREFIX: &str = "mb_";

/// Every bpffs mount point, from /proc/self/mountinfo (none when it cannot be read).
pub(crate) fn bpffs_mounts() -> Vec<PathBuf> {
    mountinfo::read_mount_points("bpf").unwrap_or_default()
}

/// Other running agents (`merbridge-edge run`), by pid.
pub fn running_agents() -> Vec<u32> {
    let me = std::process::id();
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let mut args = cmdline.split(|b| *b == 0);
            let exe = args.next().unwrap_or_default();
            exe.ends_with(b"merbridge-edge") && args.next() == Some(b"run")
        })
        .collect()
}

fn remove_tree(path: &Path, removed: &mut Vec<String>) -> std::io::Result<()> {
    if path.is_dir() {
        for entry in fs::read_dir(path)? {
            remove_tree(&entry?.path(), removed)?;
        }
        fs::remove_dir(path)?;
    } else {
        fs::remove_file(path)?;
        removed.push(format!("removed pin {}", path.display()));
    }
    Ok(())
}

/// Detaches the bpf_link with `id`.
fn detach_link(id: u32) -> std::io::Result<()> {
    const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
    const BPF_LINK_DETACH: libc::c_long = 34;
    // Both commands read a few u32 fields at the start of `union bpf_attr`.
    let mut attr = [0u32; 4];
    attr[0] = id;
    // SAFETY: bpf(2) with an attr buffer of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_GET_FD_BY_ID,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut attr = [0u32; 4];
    attr[0] = fd as u32;
    // SAFETY: as above; then the fd we opened is closed.
    let r = unsafe {
        let r = libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        );
        libc::close(fd as i32);
        r
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Removes our pins and detaches our links; returns one line per thing removed.
/// Refuses while an agent runs (it would lose its attachments) unless `force`.
pub fn cleanup(force: bool) -> Result<Vec<String>> {
    let agents = running_agents();
    if !agents.is_empty() && !force {
        bail!(
            "an agent is running (pid {}): stop it first (its attachments go with it), or pass --force",
            agents
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut done = Vec::new();
    for mount in bpffs_mounts() {
        let dir = mount.join(PIN_DIR);
        if dir.exists() {
            if let Err(e) = remove_tree(&dir, &mut done) {
                bail!("removing {}: {e}", dir.display());
            }
            done.push(format!("removed {}", dir.display()));
        }
    }
    // Links still alive after the pins went: pinned elsewhere, or held by a process.
    let names: BTreeMap<u32, String> = aya::programs::loaded_programs()
        .flatten()
        .filter_map(|p| Some((p.id(), p.name_as_str()?.to_string())))
        .collect();
    for link in aya::programs::loaded_links().flatten() {
        let Some(name) = names.get(&link.program_id()) else {
            continue;
        };
        if !name.starts_with(PROGRAM_PREFIX) {
            continue;
        }
        match detach_link(link.id()) {
            Ok(()) => done.push(format!("detached link {} (program {name})", link.id())),
            Err(e) => bail!("detaching link {} (program {name}): {e}", link.id()),
        }
    }
    Ok(done)
}
