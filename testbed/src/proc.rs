//! Child processes placed in a pod: a network namespace, a cgroup and a uid.
use std::{
    fs::File,
    io::Write,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use merbridge_edge_standins::become_uid;

/// Where and as whom a process runs.
#[derive(Clone, Debug)]
pub struct Placement {
    /// Network namespace name (under /run/netns), or None for the caller's.
    pub netns: Option<String>,
    /// cgroup directory to join, or None to stay.
    pub cgroup: Option<std::path::PathBuf>,
    /// uid (and gid) to switch to, or None to stay root.
    pub uid: Option<u32>,
}

/// Makes `cmd` start inside `place`.
pub fn place(cmd: &mut Command, place: &Placement) -> Result<()> {
    let netns = match &place.netns {
        Some(n) => {
            Some(File::open(format!("/run/netns/{n}")).with_context(|| format!("netns {n}"))?)
        }
        None => None,
    };
    let procs = match &place.cgroup {
        Some(c) => Some(
            std::fs::OpenOptions::new()
                .write(true)
                .open(c.join("cgroup.procs"))
                .with_context(|| format!("cgroup {}", c.display()))?,
        ),
        None => None,
    };
    let uid = place.uid;
    // SAFETY: only async-signal-safe calls (write, setns, and setgroups, setgid, setuid in become_uid) run in the child.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(f) = &procs {
                let mut f: &File = f;
                f.write_all(b"0")?;
            }
            if let Some(ns) = &netns
                && libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            match uid {
                Some(uid) => become_uid(uid),
                None => Ok(()),
            }
        });
    }
    Ok(())
}

/// A child that is killed and reaped on drop.
pub struct Guarded {
    /// The child.
    pub child: Child,
    /// What it is, for messages.
    pub what: String,
    /// The process that signals go to when it is not the child: a container's task,
    /// whose `ctr run` passes on every signal but SIGKILL (it cannot catch that one).
    pub target: Option<u32>,
}

impl Guarded {
    /// A child that is its own signal target.
    pub fn new(child: Child, what: impl Into<String>) -> Self {
        Self {
            child,
            what: what.into(),
            target: None,
        }
    }

    /// The process id that signals go to and whose /proc describes the guarded
    /// program (the container's task for an agent under containerd).
    pub fn pid(&self) -> u32 {
        self.target.unwrap_or_else(|| self.child.id())
    }

    /// Sends a signal.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill on our own child's pid, or on the task of the container it runs.
        unsafe { libc::kill(self.pid() as i32, sig) };
    }

    /// Waits up to `limit` for the child to exit; returns its status if it did.
    pub fn wait_for(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + limit;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if self.target.is_some() {
                // The task first, so that its `ctr run` removes the container and exits.
                self.signal(libc::SIGKILL);
                self.wait_for(Duration::from_secs(5));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Runs a command to completion, failing with its output if it fails.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip` with arguments.
pub fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

/// Whether a path exists (for cleanup checks).
pub fn exists(p: &Path) -> bool {
    p.exists()
}
