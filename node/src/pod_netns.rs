//! The sk_lookup program in every pod network namespace of the node.
//!
//! containerd's CRI plugin (k3s's runtime) pins each pod's network namespace as a file
//! under `/var/run/netns` (`cni-<uuid>`). The agent attaches one sk_lookup link to each
//! namespace file it finds there; the program decides by destination address (a meshed
//! pod's address, known from the PodList), so no namespace needs to be matched to its
//! pod. Opening a namespace file needs no capability (nsfs files are world-readable);
//! attaching needs CAP_NET_ADMIN and CAP_BPF, which the agent already holds. Links are
//! bpf_links owned by the agent: they go when it exits, and a namespace that is
//! deleted ends its link by itself.
use std::{
    collections::BTreeMap,
    fs::{self, File},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use aya::programs::{SkLookup, sk_lookup::SkLookupLinkId};

/// Where containerd's CRI plugin and `ip netns` put network namespace files.
pub const DEFAULT_NETNS_DIR: &str = "/var/run/netns";

/// One attached namespace.
#[derive(Debug)]
struct Attached {
    /// The file it was found as.
    path: PathBuf,
    link: SkLookupLinkId,
}

/// What one refresh did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct NetnsReport {
    /// Namespaces newly attached.
    pub attached: usize,
    /// Namespaces gone since the last refresh (their links released).
    pub released: usize,
    /// Namespace files that could not be opened or attached, with why.
    pub failed: Vec<String>,
}

/// The sk_lookup links, one per network namespace (by nsfs inode, so a namespace
/// listed under two names gets one link).
#[derive(Debug)]
pub struct PodNetns {
    dir: PathBuf,
    links: BTreeMap<u64, Attached>,
}

impl PodNetns {
    /// Namespaces found in `dir` (nothing attached yet).
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            links: BTreeMap::new(),
        }
    }

    /// The directory watched.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Namespaces with a link now.
    pub fn attached(&self) -> usize {
        self.links.len()
    }

    /// Attaches `program` to every namespace file in the directory that has no link
    /// yet, and releases the links of namespaces whose files are gone. A missing
    /// directory is not an error (no pods yet): it is reported as one failure line.
    pub fn refresh(&mut self, program: &mut SkLookup) -> NetnsReport {
        let mut report = NetnsReport::default();
        let mut seen = BTreeMap::new();
        match fs::read_dir(&self.dir) {
            Ok(entries) => {
                for entry in entries.flatten() {
                    let path = entry.path();
                    // nsfs files stat as the namespace itself: its inode identifies it.
                    match fs::metadata(&path) {
                        Ok(m) if m.is_file() => {
                            seen.insert(m.ino(), path);
                        }
                        // Not a namespace (a directory, a socket): not ours to judge.
                        Ok(_) => {}
                        // Deleted between listing and stat.
                        Err(_) => {}
                    }
                }
            }
            Err(e) => report.failed.push(format!(
                "network namespace directory {}: {e}",
                self.dir.display()
            )),
        }
        let gone: Vec<u64> = self
            .links
            .keys()
            .filter(|ino| !seen.contains_key(ino))
            .copied()
            .collect();
        for ino in gone {
            if let Some(a) = self.links.remove(&ino) {
                // The namespace may be gone already, which ended the link; either way
                // the link object is released here.
                let _ = program.detach(a.link);
                report.released += 1;
            }
        }
        for (ino, path) in seen {
            if self.links.contains_key(&ino) {
                continue;
            }
            let attached = File::open(&path)
                .map_err(|e| format!("opening {}: {e}", path.display()))
                .and_then(|f| {
                    program
                        .attach(&f)
                        .map_err(|e| format!("attaching sk_lookup to {}: {e}", path.display()))
                });
            match attached {
                Ok(link) => {
                    log::debug!("sk_lookup attached to network namespace {}", path.display());
                    self.links.insert(ino, Attached { path, link });
                    report.attached += 1;
                }
                Err(e) => report.failed.push(e),
            }
        }
        report
    }

    /// The namespace files with a link, for status.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.links.values().map(|a| a.path.clone()).collect()
    }
}
