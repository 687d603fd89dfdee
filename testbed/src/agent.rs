//! Running the agent under test and reading what it logs.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::proc::Guarded;

/// The agent binary: `$MERBRIDGE_EDGE_BIN`, else target/release/merbridge-edge of this workspace.
pub fn agent_binary() -> PathBuf {
    if let Ok(p) = std::env::var("MERBRIDGE_EDGE_BIN") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    root.join("target/release/merbridge-edge")
}

/// A running agent whose log goes to a file.
pub struct Agent {
    /// The process.
    pub proc: Guarded,
    /// Its log file.
    pub log_path: PathBuf,
}

impl Agent {
    /// Starts `merbridge-edge` with `args`, logging to `log_path`.
    pub fn start(args: &[&str], log_path: &Path) -> Result<Self> {
        let bin = agent_binary();
        if !bin.exists() {
            bail!(
                "agent binary {} not found: build it first (cargo build --release)",
                bin.display()
            );
        }
        let log = fs::File::create(log_path)?;
        let child = Command::new(&bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Self {
            proc: Guarded {
                child,
                what: "agent".into(),
            },
            log_path: log_path.to_path_buf(),
        })
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

    /// Waits until the log contains `needle`.
    pub fn wait_log(&mut self, needle: &str, limit: Duration) -> Result<()> {
        self.wait_log_count(needle, 1, limit)
    }
}
