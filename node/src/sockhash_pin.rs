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
                    "no bpffs mounted: accelerated connections lose bytes not yet read if the agent restarts (mount bpffs at /sys/fs/bpf)"
                );
                return Self::default();
            }
            Err(e) => {
                warn!(
                    "{e:#}: the sockhash is not pinned; accelerated connections lose bytes not yet read if the agent restarts"
                );
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
                warn!(
                    "{e:#}: accelerated connections lose bytes not yet read if the agent restarts"
                );
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
