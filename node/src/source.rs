//! Where PodLists come from: a kubelet-style JSON file (re-read when it changes).
use std::{
    fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

use anyhow::{Context, Result, bail};
use k8s_openapi::{List, api::core::v1::Pod};

/// Largest PodList accepted (bytes). A node's 110 pods fit in well under 4 MiB.
pub const MAX_PODLIST_BYTES: u64 = 32 << 20;

/// Parses a kubelet `/pods` response body (a v1 PodList).
pub fn parse_pod_list(origin: &str, body: &[u8]) -> Result<Vec<Pod>> {
    let value: serde_json::Value =
        serde_json::from_slice(body).with_context(|| format!("{origin}: body is not JSON"))?;
    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
    if kind != "PodList" {
        bail!("{origin}: expected a v1 PodList, got kind {kind:?}");
    }
    let list: List<Pod> = serde_json::from_value(value)
        .with_context(|| format!("{origin}: JSON is not a valid v1 PodList"))?;
    Ok(list.items)
}

/// A pods file, read again whenever its size or modification time changes.
pub struct PodsFile {
    path: PathBuf,
    last: Option<(SystemTime, u64)>,
}

impl PodsFile {
    /// Watches `path`.
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            last: None,
        }
    }

    /// The pods, if the file changed since the last successful read.
    pub fn poll(&mut self) -> Result<Option<Vec<Pod>>> {
        let meta = fs::metadata(&self.path)
            .with_context(|| format!("pods file {}", self.path.display()))?;
        let stamp = (
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            meta.len(),
        );
        if self.last == Some(stamp) {
            return Ok(None);
        }
        if meta.len() > MAX_PODLIST_BYTES {
            bail!(
                "pods file {}: {} bytes is over the {} byte limit",
                self.path.display(),
                meta.len(),
                MAX_PODLIST_BYTES
            );
        }
        let body =
            fs::read(&self.path).with_context(|| format!("pods file {}", self.path.display()))?;
        let pods = parse_pod_list(&format!("pods file {}", self.path.display()), &body);
        // Remember the stamp even on error, so a bad file is reported once, not every tick.
        self.last = Some(stamp);
        pods.map(Some)
    }
}
