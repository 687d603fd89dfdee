//! Running the agent under test and reading what it logs.
use std::{
    fs,
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    agent_container::{self, Plan},
    containerd::Containerd,
    manifest::Manifest,
    proc::Guarded,
};

/// The agent binary: `$MERBRIDGE_EDGE_BIN`, else target/release/merbridge-edge of this workspace.
/// Under `MERBRIDGE_EDGE_RUNTIME=containerd`, `run` comes from the image archive instead
/// and this binary serves the other commands.
pub fn agent_binary() -> PathBuf {
    if let Ok(p) = std::env::var("MERBRIDGE_EDGE_BIN") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    root.join("target/release/merbridge-edge")
}

/// A running agent whose log goes to a file.
pub struct Agent {
    /// The process (under containerd: its `ctr run`, signals going to the task).
    pub proc: Guarded,
    /// Its log file.
    pub log_path: PathBuf,
    /// The container it runs in, under containerd (`MERBRIDGE_EDGE_RUNTIME=containerd`).
    /// Dropped after `proc`: the private containerd is torn down once the task is gone.
    pub container: Option<InContainer>,
}

/// An agent's container: what it was given and the private containerd running it.
pub struct InContainer {
    /// The container's grants, mounts and arguments.
    pub plan: Plan,
    /// The containerd it runs in, torn down (and checked empty) on drop.
    pub containerd: Containerd,
}

impl Drop for Agent {
    /// Stops the agent as its supervisor would (SIGTERM, then SIGKILL after 5 s), so
    /// it removes what it pinned.
    fn drop(&mut self) {
        if let Ok(None) = self.proc.child.try_wait() {
            self.proc.signal(libc::SIGTERM);
            self.proc.wait_for(Duration::from_secs(5));
        }
    }
}

impl Agent {
    /// Starts `merbridge-edge` with `args`, logging to `log_path`; `run` gets only the
    /// capabilities of the k3s manifest.
    /// Under `MERBRIDGE_EDGE_RUNTIME=containerd`, `run` runs from the shipped image
    /// instead (see [`Agent::start_in_containerd`]).
    pub fn start(args: &[&str], log_path: &Path) -> Result<Self> {
        if args.first() == Some(&"run") && agent_container::under_containerd() {
            return Self::start_in_containerd(args, log_path);
        }
        let bin = agent_binary();
        if !bin.exists() {
            bail!(
                "agent binary {} not found: build it first (cargo build --release)",
                bin.display()
            );
        }
        let log = fs::File::create(log_path)?;
        let mut args: Vec<&str> = args.to_vec();
        // A port of its own, read back from the log: tests never collide on 15890.
        if args.first() == Some(&"run") && !args.contains(&"--metrics-addr") {
            args.extend(["--metrics-addr", "127.0.0.1:0"]);
        }
        // `run` holds exactly the capabilities the k3s manifest grants, nothing more
        // (root's other capabilities are dropped from its bounding set by setpriv).
        let mut cmd = if args.first() == Some(&"run") {
            let caps = Manifest::load().setpriv_capabilities();
            let mut c = Command::new("setpriv");
            c.arg(format!("--inh-caps={caps}"))
                .arg(format!("--bounding-set={caps}"))
                .arg("--")
                .arg(&bin);
            c
        } else {
            Command::new(&bin)
        };
        let child = cmd
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Self {
            proc: Guarded::new(child, "agent"),
            log_path: log_path.to_path_buf(),
            container: None,
        })
    }

    /// Starts `merbridge-edge run` with `args` from the image archive
    /// `scripts/build-image` wrote, in a private containerd that imports it as k3s
    /// does, with what the k3s manifest grants (see [`Plan::new`]); its output goes to
    /// `log_path` through `ctr run`, which passes signals on to the task (SIGKILL goes
    /// to the task directly).
    pub fn start_in_containerd(args: &[&str], log_path: &Path) -> Result<Self> {
        let archive = agent_container::image_archive();
        if !archive.exists() {
            bail!(
                "image archive {} not found: run scripts/build-image",
                archive.display()
            );
        }
        let mut args: Vec<&str> = args.to_vec();
        if !args.contains(&"--metrics-addr") {
            args.extend(["--metrics-addr", "127.0.0.1:0"]);
        }
        let plan = Plan::new(&Manifest::load(), &args);
        let containerd = Containerd::start()?;
        let image = containerd.import(&archive)?;
        let id = format!("mbe-agent-{}", containerd.tag);
        let pid_file = containerd.dir.join("agent.pid");
        let log = fs::File::create(log_path)?;
        let pid_arg = pid_file.display().to_string();
        let child = plan
            .ctr_run(&containerd, &image, &id, &["--pid-file", &pid_arg])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting ctr run")?;
        let mut proc = Guarded::new(child, "agent (containerd)");
        let end = Instant::now() + Duration::from_secs(10);
        let pid = loop {
            if let Some(pid) = fs::read_to_string(&pid_file)
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok())
            {
                break pid;
            }
            if let Ok(Some(status)) = proc.child.try_wait() {
                bail!(
                    "ctr run exited ({status}) before the task started:\n{}\ncontainerd:\n{}",
                    fs::read_to_string(log_path).unwrap_or_default(),
                    containerd.log()
                );
            }
            if Instant::now() > end {
                bail!("the agent's task did not start within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        proc.target = Some(pid);
        Ok(Self {
            proc,
            log_path: log_path.to_path_buf(),
            container: Some(InContainer { plan, containerd }),
        })
    }

    /// Where the agent sees the host path `host`: itself, or its path in the container.
    pub fn path_seen(&self, host: &Path) -> PathBuf {
        match &self.container {
            Some(c) => c.plan.path_in_container(host),
            None => host.to_path_buf(),
        }
    }

    /// The process's effective capability set (CapEff of /proc/PID/status).
    pub fn effective_capabilities(&self) -> u64 {
        let status =
            fs::read_to_string(format!("/proc/{}/status", self.proc.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            .unwrap_or(u64::MAX)
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until the log has `count` lines containing `needle`.
    pub fn wait_log_count(&mut self, needle: &str, count: usize, limit: Duration) -> Result<()> {
        let end = Instant::now() + limit;
        loop {
            let log = self.log();
            if log.lines().filter(|l| l.contains(needle)).count() >= count {
                return Ok(());
            }
            if let Ok(Some(status)) = self.proc.child.try_wait() {
                bail!("agent exited ({status}) before logging {needle:?}:\n{log}");
            }
            if Instant::now() > end {
                bail!("agent did not log {needle:?} ({count}x) within {limit:?}:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The address of /metrics, /healthz and /readyz, from the agent's log.
    pub fn metrics_addr(&mut self) -> Result<String> {
        const SAYS: &str = "/readyz on http://";
        self.wait_log(SAYS, Duration::from_secs(10))?;
        let log = self.log();
        let line = log.lines().find(|l| l.contains(SAYS)).unwrap_or("");
        Ok(line.split(SAYS).nth(1).unwrap_or("").trim().to_string())
    }

    /// `GET path` on the agent's metrics listener: status and body.
    pub fn http_get(&mut self, path: &str) -> Result<(u16, String)> {
        let addr = self.metrics_addr()?;
        let mut s = TcpStream::connect(&addr).with_context(|| format!("connecting to {addr}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let status = text
            .get(9..12)
            .unwrap_or("")
            .parse()
            .context("status line")?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        Ok((status, body.to_string()))
    }

    /// The value of one sample of /metrics, named with its labels as exposed
    /// (`merbridge_edge_pods{state="meshed"}`).
    pub fn metric(&mut self, sample: &str) -> Result<f64> {
        let (_, body) = self.http_get("/metrics")?;
        body.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
            .with_context(|| format!("no sample {sample} in /metrics:\n{body}"))
    }

    /// Waits until `sample` satisfies `ok`; returns its last value.
    pub fn wait_metric(
        &mut self,
        sample: &str,
        ok: impl Fn(f64) -> bool,
        limit: Duration,
    ) -> Result<f64> {
        let end = Instant::now() + limit;
        loop {
            let v = self.metric(sample)?;
            if ok(v) {
                return Ok(v);
            }
            if Instant::now() > end {
                bail!(
                    "{sample} is {v} after {limit:?}; agent log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&mut self, needle: &str, limit: Duration) -> Result<()> {
        self.wait_log_count(needle, 1, limit)
    }
}
