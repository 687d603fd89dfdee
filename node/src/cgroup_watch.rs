//! Watching the kubelet's pod cgroup directories with inotify, so a new pod or a
//! restarted container triggers a poll at once instead of waiting for the interval.
//!
//! Watched: the QoS directories of both cgroup drivers (new pod directories appear
//! there) and every pod directory (new container directories appear there). inotify is
//! not recursive, so pod directories are added as they show up. Nothing here is needed
//! for correctness: when inotify is unavailable the interval still finds everything.
use std::{
    collections::{HashMap, HashSet},
    ffi::CString,
    fs,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Result, bail};

/// Directories (relative to the cgroup2 root) where the kubelet creates pod cgroups.
fn qos_dirs() -> Vec<String> {
    let mut out = Vec::new();
    for prefix in ["", "k3s/", "kubelet/"] {
        out.push(format!("{prefix}kubepods"));
        out.push(format!("{prefix}kubepods.slice"));
        for qos in ["burstable", "besteffort"] {
            out.push(format!("{prefix}kubepods/{qos}"));
            out.push(format!("{prefix}kubepods.slice/kubepods-{qos}.slice"));
        }
    }
    out
}

/// A pod directory's name, for either cgroup driver.
fn is_pod_dir(name: &str) -> bool {
    name.starts_with("pod") || (name.starts_with("kubepods-") && name.contains("-pod"))
}

/// What a watched directory holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Holds {
    /// The root or a kubelet prefix directory: QoS directories may appear.
    Parents,
    /// A QoS directory: pod directories appear.
    Pods,
    /// A pod directory: container directories appear.
    Containers,
}

/// An inotify instance over the pod cgroup directories.
pub struct CgroupWatch {
    fd: OwnedFd,
    root: PathBuf,
    watched: HashMap<i32, (PathBuf, Holds)>,
    paths: HashSet<PathBuf>,
}

impl CgroupWatch {
    /// Starts watching below `root` (the cgroup2 directory the agent attached to).
    pub fn new(root: &Path) -> Result<Self> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            bail!("inotify_init1: {}", std::io::Error::last_os_error());
        }
        let mut w = Self {
            // SAFETY: fd is a fresh descriptor owned by nobody else.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            root: root.to_path_buf(),
            watched: HashMap::new(),
            paths: HashSet::new(),
        };
        w.refresh();
        Ok(w)
    }

    /// Watches `dir`; false when it already was (or cannot be).
    fn add(&mut self, dir: &Path, holds: Holds) -> bool {
        if self.paths.contains(dir) {
            return false;
        }
        let Ok(c) = CString::new(dir.as_os_str().as_encoded_bytes()) else {
            return false;
        };
        let mask = libc::IN_CREATE | libc::IN_ONLYDIR;
        // SAFETY: valid fd and NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), mask) };
        if wd < 0 {
            return false;
        }
        self.watched.insert(wd, (dir.to_path_buf(), holds));
        self.paths.insert(dir.to_path_buf())
    }

    /// Picks up QoS and pod directories that appeared without an event (made before
    /// their parent was watched); true when a pod directory was newly found.
    pub fn refresh(&mut self) -> bool {
        self.forget_removed();
        let root = self.root.clone();
        self.add(&root, Holds::Parents);
        for prefix in ["k3s", "kubelet"] {
            if root.join(prefix).is_dir() {
                self.add(&root.join(prefix), Holds::Parents);
            }
        }
        let mut found = false;
        for rel in qos_dirs() {
            let dir = root.join(rel);
            if !dir.is_dir() {
                continue;
            }
            self.add(&dir, Holds::Pods);
            for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
                let name = entry.file_name();
                if is_pod_dir(&name.to_string_lossy()) && entry.path().is_dir() {
                    found |= self.add(&entry.path(), Holds::Containers);
                }
            }
        }
        found
    }

    /// Drops the watches of directories that are gone. cgroupfs (kernfs) does not
    /// end a watch when its directory is removed (no IN_IGNORED), so without this every
    /// pod that ever ran would keep a watch, and the watch would pin its dead cgroup.
    fn forget_removed(&mut self) {
        let gone: Vec<i32> = self
            .watched
            .iter()
            .filter(|(_, (path, _))| !path.is_dir())
            .map(|(wd, _)| *wd)
            .collect();
        for wd in gone {
            // SAFETY: plain syscall on our descriptor; a stale wd just fails.
            unsafe { libc::inotify_rm_watch(self.fd.as_raw_fd(), wd) };
            if let Some((path, _)) = self.watched.remove(&wd) {
                self.paths.remove(&path);
            }
        }
    }

    /// Directories watched now.
    #[cfg(test)]
    fn watch_count(&self) -> usize {
        self.watched.len()
    }

    /// Sleeps until an event is pending or `limit` passes.
    pub fn wait(&self, limit: std::time::Duration) {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = limit.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd; EINTR (a signal) just ends the wait early.
        unsafe { libc::poll(&mut pfd, 1, ms) };
    }

    /// Reads pending events; true when a pod or container directory appeared.
    pub fn changed(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        let mut changed = false;
        let mut rescan = false;
        loop {
            // SAFETY: reading into a buffer of the given length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            let n = n as usize;
            let header = std::mem::size_of::<libc::inotify_event>();
            let mut at = 0;
            while at + header <= n {
                // SAFETY: the kernel wrote a whole event at `at`; read it unaligned.
                let ev: libc::inotify_event =
                    unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
                let name = &buf[at + header..(at + header + ev.len as usize).min(n)];
                let name = String::from_utf8_lossy(name)
                    .trim_end_matches('\0')
                    .to_string();
                at += header + ev.len as usize;
                if ev.mask & libc::IN_IGNORED != 0 {
                    if let Some((path, _)) = self.watched.remove(&ev.wd) {
                        self.paths.remove(&path);
                    }
                    continue;
                }
                if ev.mask & libc::IN_Q_OVERFLOW != 0 {
                    changed = true;
                    rescan = true;
                    continue;
                }
                match self.watched.get(&ev.wd).map(|(_, h)| *h) {
                    Some(Holds::Containers) => changed = true,
                    Some(Holds::Pods) if is_pod_dir(&name) => rescan = true,
                    // A QoS or prefix directory, or something else: rescan to find out.
                    Some(Holds::Pods | Holds::Parents) => rescan = true,
                    None => {}
                }
            }
        }
        // New pod directories (and the containers made in them before their watch
        // was in place) are found by the rescan.
        if rescan && self.refresh() {
            changed = true;
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_directory_names_of_both_drivers() {
        assert!(is_pod_dir("pod5b7f3c1e-8a2d-4f6b-9c0e-1d2e3f4a5b6c"));
        assert!(is_pod_dir(
            "kubepods-burstable-pod5b7f3c1e_8a2d_4f6b_9c0e_1d2e3f4a5b6c.slice"
        ));
        assert!(!is_pod_dir("burstable"));
        assert!(!is_pod_dir("kubepods-besteffort.slice"));
    }

    #[test]
    fn new_pods_and_containers_are_seen_in_a_plain_directory_tree() {
        // inotify works the same on tmpfs/ext4 as on cgroupfs for directory creation.
        let root = std::env::temp_dir().join(format!("mbe-watch-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        let mut w = CgroupWatch::new(&root).unwrap();
        fs::create_dir_all(root.join("kubepods/burstable")).unwrap();
        assert!(!w.changed(), "QoS directories alone are no news");
        assert!(!w.changed());
        let pod = root.join("kubepods/burstable/podabc");
        fs::create_dir(&pod).unwrap();
        assert!(w.changed(), "new pod directory");
        fs::create_dir(pod.join("c1")).unwrap();
        assert!(w.changed(), "new container in a watched pod");
        fs::create_dir(root.join("kubepods/burstable/not-a-pod")).unwrap();
        assert!(!w.changed(), "other directories are ignored");
        // The kubelet's directories made after the agent started.
        fs::create_dir_all(root.join(
            "k3s/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-poda_b.slice/c1",
        ))
        .unwrap();
        assert!(w.changed(), "a pod below directories made later");
        // A pod directory with a container made in one go (before its watch).
        fs::create_dir_all(root.join("kubepods/burstable/podxyz/c1")).unwrap();
        assert!(w.changed());
        // Removed pods give their watches back at the next refresh, events read or not.
        let before = w.watch_count();
        fs::remove_dir_all(root.join("kubepods/burstable/podxyz")).unwrap();
        fs::remove_dir_all(&pod).unwrap();
        w.refresh();
        assert_eq!(w.watch_count(), before - 2);
        let _ = fs::remove_dir_all(&root);
    }
}
