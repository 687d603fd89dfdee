//! `merbridge-edge run`: load the datapath, then keep its maps in step with the pods.
use std::{
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::Result;
use log::{error, info};
use merbridge_edge_probes_common::Counter;

use crate::{
    cgroups,
    datapath::{Datapath, DatapathOptions, MapSizes},
    policy::{MeshSelection, desired_state},
    source::PodsFile,
    sync::Programmer,
};

/// Set by SIGTERM/SIGINT.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

/// What `run` needs to know.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The PodList JSON file to read.
    pub pods_file: PathBuf,
    /// cgroup2 directory to attach to; detected when None.
    pub cgroup_root: Option<PathBuf>,
    /// Time between polls.
    pub interval: Duration,
    /// Only pods bound to this node are programmed.
    pub node_name: Option<String>,
    /// Meshes to look for.
    pub meshes: MeshSelection,
    /// sk_msg acceleration.
    pub accelerate: bool,
    /// Map sizes.
    pub sizes: MapSizes,
}

/// Runs until SIGTERM or SIGINT.
pub fn run(opts: RunOptions) -> Result<()> {
    install_signal_handlers();
    let cgroup_root = match opts.cgroup_root.clone() {
        Some(p) => p,
        None => cgroups::detect_cgroup2_mount()?,
    };
    cgroups::check_cgroup2(&cgroup_root)?;
    let mut dp = Datapath::load(&DatapathOptions {
        cgroup_root: cgroup_root.clone(),
        accelerate: opts.accelerate,
        sizes: opts.sizes,
    })?;
    let mut programmer = Programmer::new(cgroup_root);
    let mut source = PodsFile::new(&opts.pods_file);
    let mut pods = None;
    let mut failing = false;
    let tick = Duration::from_millis(100);
    let mut next_sync = Instant::now();
    let mut last_counters = None;
    while !STOP.load(Ordering::SeqCst) {
        match source.poll() {
            Ok(Some(new)) => {
                if failing {
                    info!("pods file {} is readable again", opts.pods_file.display());
                    failing = false;
                }
                pods = Some(new);
                next_sync = Instant::now();
            }
            Ok(None) => {}
            Err(e) => {
                if !failing {
                    error!("{e:#}; keeping the last good state");
                    failing = true;
                }
            }
        }
        if Instant::now() >= next_sync {
            if let Some(pods) = &pods {
                let desired = desired_state(pods, opts.node_name.as_deref(), opts.meshes);
                for w in &desired.warnings {
                    programmer.warn_once(&w.0);
                }
                let report = programmer.sync(&mut dp, &desired.pods);
                log::debug!("sync: {report:?}");
            }
            log_counters_if_changed(&dp, &mut last_counters);
            next_sync = Instant::now() + opts.interval;
        }
        std::thread::sleep(tick);
    }
    info!("stopping: detaching probes");
    drop(dp);
    Ok(())
}

/// Logs the kernel counters (debug level) when they moved since the last call.
fn log_counters_if_changed(dp: &Datapath, last: &mut Option<Vec<u64>>) {
    let Ok(now) = dp.counters() else { return };
    if last.as_deref() == Some(&now[..]) {
        return;
    }
    let text: Vec<String> = Counter::ALL
        .iter()
        .zip(now.iter())
        .map(|(c, v)| format!("{}={v}", c.name()))
        .collect();
    log::debug!("counters: {}", text.join(" "));
    *last = Some(now.to_vec());
}

/// Parses `2s`, `500ms`, `1m` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (like 2s or 500ms)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s or m)")),
    };
    if !(0.01..=3600.0).contains(&secs) {
        return Err(format!("{s:?} is outside 10ms..1h"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("2h").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("abc").is_err());
    }
}
