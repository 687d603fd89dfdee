//! A private containerd for the tests: its own configuration, root, state and sockets
//! under a temporary directory, started by the test and stopped at the end, never the
//! machine's own. Images are imported the way k3s's air-gap directory imports them
//! (`ctr -n k8s.io images import`). Tear-down removes what the run made and says what
//! it found left behind: containers, tasks, images, snapshots, leases, content, shims,
//! cgroups, mounts, the daemon itself and its directories.
use std::{
    collections::BTreeSet,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// The containerd namespace the CRI plugin (and so k3s) keeps its images and pods in.
pub const NAMESPACE: &str = "k8s.io";

/// Where containerd's shims put their sockets, whatever the daemon's own paths are
/// (containerd 1.6 fixes it); tear-down checks that no socket of ours stays there.
const SHIM_SOCKET_DIR: &str = "/run/containerd/s";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Why a private containerd cannot run here, if it cannot (a missing tool).
pub fn missing_tool() -> Option<String> {
    for tool in ["containerd", "ctr", "containerd-shim-runc-v2", "runc"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            return Some(format!(
                "needs {tool} (scripts/bootstrap installs containerd)"
            ));
        }
    }
    None
}

/// A running private containerd. Stop it with [`Containerd::shutdown`], which fails
/// naming whatever was left behind; dropping it tears down the same way and panics on
/// leftovers unless the thread is already panicking.
pub struct Containerd {
    /// Unique short tag in every name this instance makes.
    pub tag: String,
    /// Its directory: configuration, root, state, sockets, runc state, I/O fifos.
    pub dir: PathBuf,
    /// The cgroup path (relative to each hierarchy) that containers run here go below.
    pub cgroup_parent: String,
    daemon: Option<Child>,
    shim_sockets_before: BTreeSet<OsString>,
    run_containerd_existed: bool,
}

impl Containerd {
    /// Writes a configuration of its own and starts containerd on it; waits until it
    /// answers.
    pub fn start() -> Result<Self> {
        if let Some(why) = missing_tool() {
            bail!("{why}");
        }
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{:x}{n}", std::process::id() % 0xfff);
        let dir = std::env::temp_dir().join(format!("mbe-containerd-{tag}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let d = dir.display();
        // Only what the tests use: no CRI plugin (the tests drive containerd through
        // its own API, as `ctr` does), no snapshotters that need other filesystems.
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#
        );
        fs::write(dir.join("config.toml"), config)?;
        let run_containerd_existed = Path::new("/run/containerd").exists();
        let shim_sockets_before = shim_sockets();
        let log = fs::File::create(dir.join("containerd.log"))?;
        let daemon = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting containerd")?;
        let mut me = Self {
            cgroup_parent: format!("/mbe-containerd-{tag}"),
            tag,
            dir,
            daemon: Some(daemon),
            shim_sockets_before,
            run_containerd_existed,
        };
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            let ok = me
                .ctr()
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(me);
            }
            if let Some(Ok(Some(status))) = me.daemon.as_mut().map(|d| d.try_wait()) {
                bail!("containerd exited ({status}):\n{}", me.log());
            }
            if Instant::now() > end {
                bail!("containerd did not answer within 15 s:\n{}", me.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The daemon's process id.
    pub fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(|d| d.id())
    }

    /// The daemon's API socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// What the daemon logged.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// `ctr` talking to this containerd, in the `k8s.io` namespace.
    pub fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(self.socket())
            .args(["-n", NAMESPACE]);
        c
    }

    /// The flags `ctr run` needs to keep runc's state and the task's I/O fifos in this
    /// instance's directory (their defaults are under /run/containerd).
    pub fn ctr_run_private_flags(&self) -> Vec<String> {
        vec![
            "--runc-root".into(),
            self.dir.join("runc").display().to_string(),
            "--fifo-dir".into(),
            self.dir.join("fifo").display().to_string(),
        ]
    }

    /// Imports an OCI archive as k3s imports its air-gap images; returns the image name.
    pub fn import(&self, archive: &Path) -> Result<String> {
        let out = crate::proc::run(self.ctr().args(["images", "import"]).arg(archive))?;
        // "unpacking NAME (sha256:…)...done"
        out.lines()
            .find_map(|l| l.strip_prefix("unpacking ")?.split(' ').next())
            .map(String::from)
            .with_context(|| {
                format!(
                    "no image named by the import of {}: {out}",
                    archive.display()
                )
            })
    }

    /// The ids of one kind of object (`containers`, `tasks`, `images`, `snapshots`,
    /// `leases`, `content`) this containerd holds in the `k8s.io` namespace.
    pub fn list(&self, kind: &str) -> Result<Vec<String>> {
        let out = crate::proc::run(self.ctr().args([kind, "ls"]))?;
        // Every listing has a header line; the first column is the id.
        Ok(out
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next())
            .map(String::from)
            .collect())
    }

    /// Stops and removes everything; fails naming what was left behind by the run
    /// (containers or tasks still there) or by the tear-down itself.
    pub fn shutdown(mut self) -> Result<()> {
        let left = self.teardown();
        if left.is_empty() {
            Ok(())
        } else {
            bail!("left behind: {}", left.join("; "))
        }
    }

    /// Tears down (once) and returns what was found left behind.
    fn teardown(&mut self) -> Vec<String> {
        let Some(mut daemon) = self.daemon.take() else {
            return vec![];
        };
        let mut left = vec![];
        // What the run should have removed itself (`ctr run --rm` deletes its
        // container when the task exits).
        for kind in ["tasks", "containers"] {
            match self.list(kind) {
                Ok(ids) if ids.is_empty() => {}
                Ok(ids) => left.push(format!("{kind} after the run: {ids:?}")),
                Err(e) => left.push(format!("listing {kind}: {e:#}")),
            }
        }
        for id in self.list("tasks").unwrap_or_default() {
            let _ = self
                .ctr()
                .args(["tasks", "kill", "-s", "SIGKILL", &id])
                .output();
            let _ = self
                .ctr()
                .args(["tasks", "delete", "--force", &id])
                .output();
        }
        for id in self.list("containers").unwrap_or_default() {
            let _ = self.ctr().args(["containers", "delete", &id]).output();
        }
        // The images the tests imported go, and with them (garbage collection, waited
        // for with --sync) their content and snapshots.
        let images = self.list("images").unwrap_or_default();
        if !images.is_empty() {
            let out = self
                .ctr()
                .args(["images", "rm", "--sync"])
                .args(&images)
                .output();
            if !out.is_ok_and(|o| o.status.success()) {
                left.push(format!("images not removed: {images:?}"));
            }
        }
        for kind in ["images", "snapshots", "leases", "content"] {
            match self.list(kind) {
                Ok(ids) if ids.is_empty() => {}
                Ok(ids) => left.push(format!("{kind} after removing the images: {ids:?}")),
                Err(e) => left.push(format!("listing {kind}: {e:#}")),
            }
        }
        // The daemon, then any shim of ours that outlived it.
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(10);
        while daemon.try_wait().ok().flatten().is_none() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        if daemon.try_wait().ok().flatten().is_none() {
            left.push("containerd still running 10 s after SIGTERM".into());
            let _ = daemon.kill();
        }
        let _ = daemon.wait();
        for pid in self.processes_naming_our_socket() {
            left.push(format!("process {pid} still running (a shim)"));
            // SAFETY: a shim this containerd started for the test.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        left.extend(self.remove_cgroups());
        // New sockets nobody answers on are ours, left behind; live ones belong to
        // another containerd running at the same time (a test's agent and its pods).
        let now = shim_sockets();
        let new: Vec<_> = now
            .difference(&self.shim_sockets_before)
            .filter(|name| {
                std::os::unix::net::UnixStream::connect(Path::new(SHIM_SOCKET_DIR).join(name))
                    .is_err()
            })
            .collect();
        if !new.is_empty() {
            left.push(format!("shim sockets in {SHIM_SOCKET_DIR}: {new:?}"));
        }
        if !self.run_containerd_existed {
            // The shim made /run/containerd/s; nothing else of ours is there.
            let _ = fs::remove_dir(SHIM_SOCKET_DIR);
            let _ = fs::remove_dir("/run/containerd");
        }
        for mount in mounts_below(&self.dir) {
            left.push(format!("mount {} still there", mount.display()));
            let _ = Command::new("umount").arg("-l").arg(&mount).status();
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            left.push(format!("removing {}: {e}", self.dir.display()));
        }
        if self.dir.exists() {
            left.push(format!("{} still there", self.dir.display()));
        }
        left
    }

    /// Processes whose command line names this instance's directory (containerd's
    /// shims are started with `-address <our socket>`).
    fn processes_naming_our_socket(&self) -> Vec<u32> {
        let needle = self.dir.display().to_string();
        let Ok(entries) = fs::read_dir("/proc") else {
            return vec![];
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                    .unwrap_or(false)
            })
            .collect()
    }

    /// Removes the containers' cgroup parent from every hierarchy (runc removes each
    /// container's own cgroup, not the parents); returns what could not be removed.
    fn remove_cgroups(&self) -> Vec<String> {
        let mut left = vec![];
        let parent = self.cgroup_parent.trim_start_matches('/');
        for dir in cgroup_hierarchies() {
            let path = dir.join(parent);
            if !path.exists() {
                continue;
            }
            // Children first (a container's cgroup runc did not remove).
            if let Ok(children) = fs::read_dir(&path) {
                for c in children.flatten() {
                    if c.path().is_dir() && fs::remove_dir(c.path()).is_ok() {
                        left.push(format!("cgroup {} left by the run", c.path().display()));
                    }
                }
            }
            if let Err(e) = fs::remove_dir(&path) {
                left.push(format!("removing cgroup {}: {e}", path.display()));
            }
        }
        left
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let left = self.teardown();
        if !left.is_empty() {
            let said = format!(
                "private containerd {}: left behind: {}",
                self.tag,
                left.join("; ")
            );
            if std::thread::panicking() {
                eprintln!("{said}");
            } else {
                panic!("{said}");
            }
        }
    }
}

/// The entries of containerd's shim socket directory.
fn shim_sockets() -> BTreeSet<OsString> {
    fs::read_dir(SHIM_SOCKET_DIR)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default()
}

/// Every cgroup hierarchy's mount point (cgroup v1 controllers and cgroup2).
pub fn cgroup_hierarchies() -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mount_point = left.split_whitespace().nth(4)?;
            (fstype == "cgroup" || fstype == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .collect()
}

/// Mount points at or below `dir`.
fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(PathBuf::from))
        .filter(|m| m.starts_with(dir))
        .collect()
}
