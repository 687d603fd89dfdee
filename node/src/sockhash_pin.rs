//! Accelerated connections outliving the agent.
//!
//! When the sockhash holding a socket is freed, the kernel takes the socket out of
//! sk_msg under whoever is using it: a reader blocked on it is woken and its blocking
//! read returns EAGAIN, which many apps treat as fatal. A sockhash held only by the
//! agent's descriptors is freed when the agent exits, so a restart or a crash under load
//! could cut live connections. The agent therefore pins its sockhash in bpffs
//! (`<bpffs>/merbridge-edge/sockhash-<map id>`): the pin keeps the sockhash and its
//! sk_msg program working for the connections already in it until they close by
//! themselves (new connections are not added: sockops goes with the agent). A pin whose
//! sockhash is empty is removed: by the agent as it stops, by the next agent while it
//! runs, or by `merbridge-edge cleanup`.
use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use aya::maps::{Map, MapData, SockHash};
use log::{info, warn};
use merbridge_edge_probes_common::SocketTuple;

use crate::cleanup::{PIN_DIR, bpffs_mounts};

/// Name prefix of sockhash pins in the pin directory.
pub const SOCKHASH_PIN_PREFIX: &str = "sockhash-";

/// Most entries counted in a pinned sockhash (the count is for logs and metrics).
const COUNT_LIMIT: usize = 1 << 20;

/// The agent's sockhash pin and the ones earlier agents left.
#[derive(Debug, Default)]
pub struct SockhashPins {
    /// Where pins go; None without bpffs.
    dir: Option<PathBuf>,
    /// This agent's pin.
    own: Option<PathBuf>,
}

/// The pin directory: `merbridge-edge` under `bpffs` when given (it must be a bpffs
/// mount), else under /sys/fs/bpf when that is bpffs, else under the first bpffs mount.
pub fn pin_dir(bpffs: Option<&Path>) -> Result<Option<PathBuf>> {
    if let Some(given) = bpffs {
        const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
        let c = std::ffi::CString::new(given.as_os_str().as_encoded_bytes())
            .with_context(|| format!("--bpffs {}", given.display()))?;
        // SAFETY: statfs fills the zeroed struct; the path is NUL-terminated.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
            anyhow::bail!(
                "--bpffs {}: {}",
                given.display(),
                std::io::Error::last_os_error()
            );
        }
        #[allow(clippy::unnecessary_cast)]
        if st.f_type as i64 != BPF_FS_MAGIC {
            anyhow::bail!("--bpffs {}: not a bpffs mount", given.display());
        }
        return Ok(Some(given.join(PIN_DIR)));
    }
    let mounts = bpffs_mounts();
    let preferred = Path::new("/sys/fs/bpf");
    let mount = mounts
        .iter()
        .find(|m| m.as_path() == preferred)
        .or(mounts.first());
    Ok(mount.map(|m| m.join(PIN_DIR)))
}

/// What a sockhash that cannot be pinned costs, as the agent says it.
pub const UNPINNED_SOCKHASH_COST: &str = "sk_msg-accelerated connections still open when the agent stops, restarts or crashes can be cut (their sockhash dies with the agent, and a read blocked on such a socket returns EAGAIN, which many apps treat as fatal)";

/// What a listener map that cannot be pinned costs with `--pin-inbound-listeners`.
pub const UNPINNED_LISTENERS_COST: &str = "--pin-inbound-listeners has no effect: a restarted agent does not adopt the sidecars' inbound listeners, so meshed pods' inbound reaches their apps uncaptured (counted by the bypass ledger) until each sidecar listens again";

/// Tries what the agent's pins need in the pin directory under `bpffs` (see
/// [`pin_dir`]): creates the directory, pins a one-entry array map there as
/// `check-<pid>` and removes the pin again (and the directory, when it made it).
/// Returns the directory, or what failed with the path and the errno name (EACCES
/// from an AppArmor profile that denies writes there, EROFS on a read-only mount).
pub fn try_pin(bpffs: Option<&Path>) -> Result<PathBuf> {
    let dir =
        pin_dir(bpffs)?.context("no bpffs mounted (mount one at /sys/fs/bpf, or pass --bpffs)")?;
    let existed = dir.exists();
    fs::create_dir_all(&dir)
        .map_err(named_errno)
        .with_context(|| format!("creating {}", dir.display()))?;
    let pinned = pin_test_map(&dir.join(format!("check-{}", std::process::id())));
    if !existed {
        // Only when empty: an agent may have pinned there meanwhile.
        let _ = fs::remove_dir(&dir);
    }
    pinned.map(|()| dir)
}

/// `e` with its errno's name in front (`EACCES: Permission denied (os error 13)`).
fn named_errno(e: std::io::Error) -> std::io::Error {
    let name = match e.raw_os_error() {
        Some(libc::EACCES) => "EACCES",
        Some(libc::EPERM) => "EPERM",
        Some(libc::EROFS) => "EROFS",
        Some(libc::ENOENT) => "ENOENT",
        Some(libc::EEXIST) => "EEXIST",
        Some(libc::ENOTDIR) => "ENOTDIR",
        Some(libc::EINVAL) => "EINVAL",
        _ => return e,
    };
    std::io::Error::new(e.kind(), format!("{name}: {e}"))
}

/// Pins a fresh one-entry array map at `path`, then removes the pin.
fn pin_test_map(path: &Path) -> Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    // map_type, key_size, value_size, max_entries: the head of `union bpf_attr`.
    let mut create = [BPF_MAP_TYPE_ARRAY, 4, 4, 1];
    // SAFETY: bpf(2) reads an attr buffer of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            create.as_mut_ptr(),
            std::mem::size_of_val(&create),
        )
    };
    if fd < 0 {
        return Err(named_errno(std::io::Error::last_os_error()))
            .context("creating a test map to pin (needs CAP_BPF)");
    }
    // SAFETY: a fresh fd that nothing else owns.
    let map = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let name = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .with_context(|| format!("pin path {}", path.display()))?;
    /// The BPF_OBJ_PIN part of `union bpf_attr`.
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let mut attr = ObjPin {
        pathname: name.as_ptr() as u64,
        bpf_fd: map.as_raw_fd() as u32,
        file_flags: 0,
    };
    // SAFETY: as above; `name` outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_PIN,
            &mut attr as *mut ObjPin,
            std::mem::size_of::<ObjPin>(),
        )
    };
    if r < 0 {
        return Err(named_errno(std::io::Error::last_os_error()))
            .with_context(|| format!("pinning a test map at {}", path.display()));
    }
    fs::remove_file(path)
        .map_err(named_errno)
        .with_context(|| format!("removing the test pin {}", path.display()))
}

/// Sockets in the sockhash pinned at `path`.
pub fn pinned_entries(path: &Path) -> Result<usize> {
    // MapData, not MapInfo::from_pin: that one reopens the map by id, which needs
    // CAP_SYS_ADMIN.
    let map = MapData::from_pin(path).with_context(|| format!("opening pin {}", path.display()))?;
    let sockhash: SockHash<MapData, SocketTuple> = SockHash::try_from(Map::SockHash(map))
        .with_context(|| format!("the pin {} is not one of our sockhashes", path.display()))?;
    let mut count = 0;
    for key in sockhash.keys().take(COUNT_LIMIT) {
        key.with_context(|| format!("reading the sockhash pinned at {}", path.display()))?;
        count += 1;
    }
    Ok(count)
}

impl SockhashPins {
    /// Pins `sockhash` (the agent's, with sk_msg attached). Without bpffs, or when the
    /// pin fails, the agent runs on and says what that costs.
    pub fn pin(sockhash: &Map, bpffs: Option<&Path>) -> Self {
        let dir = match pin_dir(bpffs) {
            Ok(Some(dir)) => dir,
            Ok(None) => {
                warn!(
                    "no bpffs mounted (mount bpffs at /sys/fs/bpf, or pass --bpffs): the sockhash is not pinned: {UNPINNED_SOCKHASH_COST}"
                );
                return Self::default();
            }
            Err(e) => {
                warn!("{e:#}: the sockhash is not pinned: {UNPINNED_SOCKHASH_COST}");
                return Self::default();
            }
        };
        let pinned = (|| -> Result<PathBuf> {
            let id = match sockhash {
                Map::SockHash(data) => data.info()?.id(),
                _ => anyhow::bail!("not a sockhash"),
            };
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let path = dir.join(format!("{SOCKHASH_PIN_PREFIX}{id}"));
            sockhash
                .pin(&path)
                .with_context(|| format!("pinning the sockhash at {}", path.display()))?;
            Ok(path)
        })();
        match pinned {
            Ok(path) => {
                info!(
                    "sockhash pinned at {} (kept while connections it accelerated are open)",
                    path.display()
                );
                Self {
                    dir: Some(dir),
                    own: Some(path),
                }
            }
            Err(e) => {
                warn!("{e:#}: the sockhash is not pinned: {UNPINNED_SOCKHASH_COST}");
                Self {
                    dir: Some(dir),
                    own: None,
                }
            }
        }
    }

    /// This agent's pin.
    pub fn own(&self) -> Option<&Path> {
        self.own.as_deref()
    }

    /// Removes the empty sockhash pins earlier agents left; returns the sockets their
    /// non-empty ones still carry (connections accelerated before this agent started).
    pub fn sweep(&self) -> usize {
        let Some(dir) = &self.dir else {
            return 0;
        };
        let mut draining = 0;
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let ours = self.own.as_deref() == Some(path.as_path());
            let name = entry.file_name();
            if ours || !name.to_string_lossy().starts_with(SOCKHASH_PIN_PREFIX) {
                continue;
            }
            match pinned_entries(&path) {
                Ok(0) => match fs::remove_file(&path) {
                    Ok(()) => info!(
                        "removed {}: an earlier agent's sockhash, its connections all closed",
                        path.display()
                    ),
                    Err(e) => warn!("removing {}: {e}", path.display()),
                },
                Ok(n) => draining += n,
                Err(e) => log::debug!("{e:#}"),
            }
        }
        draining
    }

    /// At stop, after the programs are detached (nothing adds sockets any more): removes
    /// this agent's pin when its sockhash is empty, else leaves it to the connections.
    pub fn release(self) {
        let Some(path) = self.own else {
            return;
        };
        match pinned_entries(&path) {
            Ok(0) => {
                if let Err(e) = fs::remove_file(&path) {
                    warn!("removing {}: {e}", path.display());
                }
            }
            Ok(n) => info!(
                "{n} accelerated socket(s) still open: their sockhash stays pinned at {} until they close (the next agent or `merbridge-edge cleanup` removes it)",
                path.display()
            ),
            Err(e) => warn!("{e:#}; leaving {} in place", path.display()),
        }
    }
}
