//! The agent under test: started on the pods file with its log in a file, asked for
//! its metrics, stopped with SIGTERM; verifier logs picked out of what it printed.
use std::{
    fs,
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// The agent binary in the initramfs.
pub const BINARY: &str = "/merbridge-edge";
/// Where its metrics are served.
pub const METRICS_ADDR: &str = "127.0.0.1:15890";

/// A running agent.
pub struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    /// `merbridge-edge run` on `pods_file`, attached at `cgroup_root` and to the
    /// network namespaces pinned in `netns_dir`.
    pub fn start(
        pods_file: &Path,
        cgroup_root: &Path,
        netns_dir: &Path,
        log: &Path,
    ) -> Result<Self> {
        let out = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(BINARY)
            .arg("run")
            .arg("--pods-file")
            .arg(pods_file)
            .arg("--cgroup-root")
            .arg(cgroup_root)
            .arg("--netns-dir")
            .arg(netns_dir)
            .args([
                "--interval",
                "200ms",
                "--metrics-addr",
                METRICS_ADDR,
                "--node-name",
                "edge-1",
            ])
            .args(["--log-level", "debug"])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {BINARY}"))?;
        Ok(Self {
            child,
            log: log.to_path_buf(),
        })
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its exit status, if it exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits until the metrics sample `sample` reaches `want` (the agent must stay up).
    pub fn wait_metric(&mut self, sample: &str, want: f64, limit: Duration) -> Result<f64> {
        let end = Instant::now() + limit;
        let mut last = None;
        loop {
            if let Some(s) = self.exited() {
                bail!("the agent exited ({s})");
            }
            if let Ok(body) = metrics() {
                last = metric(&body, sample);
                if last.is_some_and(|v| v >= want) {
                    return Ok(last.unwrap());
                }
            }
            if Instant::now() > end {
                bail!("{sample} is {last:?} after {limit:?}, want {want}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL, then waits up to `limit` for the exit.
    pub fn kill(&mut self, limit: Duration) -> Result<ExitStatus> {
        self.signal(libc::SIGKILL, limit)
    }

    /// SIGTERM, then waits up to `limit` for the exit.
    pub fn terminate(&mut self, limit: Duration) -> Result<ExitStatus> {
        self.signal(libc::SIGTERM, limit)
    }

    fn signal(&mut self, signal: i32, limit: Duration) -> Result<ExitStatus> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let end = Instant::now() + limit;
        loop {
            if let Some(s) = self.exited() {
                return Ok(s);
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("the agent did not exit within {limit:?} of signal {signal}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// GET /metrics from the agent.
pub fn metrics() -> Result<String> {
    let mut s = TcpStream::connect(METRICS_ADDR)
        .with_context(|| format!("connecting to {METRICS_ADDR}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {METRICS_ADDR}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

/// The value of one sample, named with its labels as exposed.
pub fn metric(body: &str, sample: &str) -> Option<f64> {
    body.lines().find_map(|l| {
        l.strip_prefix(sample)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The verifier's words in an agent's output: from the first line that mentions the
/// verifier to the end (at most 400 lines).
pub fn verifier_log(output: &str) -> Vec<String> {
    let lines: Vec<&str> = output.lines().collect();
    match lines
        .iter()
        .position(|l| l.to_ascii_lowercase().contains("verifier"))
    {
        Some(i) => lines[i..].iter().take(400).map(|l| l.to_string()).collect(),
        None => vec![],
    }
}
