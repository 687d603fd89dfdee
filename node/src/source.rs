//! Where PodLists come from: the kubelet, or a kubelet-style JSON file re-read when it
//! changes.
use std::{
    fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

use crate::podlist::{ErrorKind, MAX_PODLIST_BYTES, ParsedPods, PollError, parse_pod_list};

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

    /// The pods, if the file changed since the last read.
    pub fn poll(&mut self) -> Result<Option<ParsedPods>, PollError> {
        let origin = format!("pods file {}", self.path.display());
        let unreadable =
            |e: std::io::Error| PollError::new(ErrorKind::Connect, format!("{origin}: {e}"));
        let meta = fs::metadata(&self.path).map_err(unreadable)?;
        let stamp = (
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            meta.len(),
        );
        if self.last == Some(stamp) {
            return Ok(None);
        }
        // Remember the stamp before judging the content, so a bad file is reported once.
        self.last = Some(stamp);
        if meta.len() > MAX_PODLIST_BYTES {
            return Err(PollError::new(
                ErrorKind::TooLarge,
                format!(
                    "{origin}: {} bytes is over the {MAX_PODLIST_BYTES} byte limit",
                    meta.len()
                ),
            ));
        }
        let body = crate::files::read_beneath(&self.path, MAX_PODLIST_BYTES).map_err(unreadable)?;
        parse_pod_list(&origin, &body)
            .map(Some)
            .map_err(|e| PollError::new(ErrorKind::Body, format!("{e:#}")))
    }
}

/// Where the agent gets its pods from.
pub enum Source {
    /// The kubelet's `/pods`, polled every interval (boxed: the client is several times
    /// the size of a pods file).
    Kubelet(Box<crate::kubelet::KubeletClient>),
    /// A PodList file, checked for changes every tick.
    File(PodsFile),
}

impl Source {
    /// Says where pods come from, for logs.
    pub fn describe(&self) -> String {
        match self {
            Source::Kubelet(k) => format!("kubelet {}", k.pods_url()),
            Source::File(f) => format!("pods file {}", f.path.display()),
        }
    }

    /// New pods, `None` when the source has not changed since its last good answer.
    pub fn poll(&mut self) -> Result<Option<ParsedPods>, PollError> {
        match self {
            Source::Kubelet(k) => k.fetch(),
            Source::File(f) => f.poll(),
        }
    }

    /// Time to the next poll after a successful one.
    pub fn next_poll_after(&self, interval: std::time::Duration) -> std::time::Duration {
        match self {
            Source::Kubelet(_) => interval,
            // A stat per tick is cheap, and picks up an edited file at once.
            Source::File(_) => interval.min(std::time::Duration::from_millis(100)),
        }
    }
}
