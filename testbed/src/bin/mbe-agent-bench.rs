//! Measures the agent on this machine: binary size, memory idle and with a full node
//! (110 meshed pods), CPU per poll, and the time from the kubelet listing a pod to its
//! entries being in the maps, at the interval and with the cgroup trigger.
//!
//! Needs root (it runs the real agent against a kubelet stand-in on loopback) and the
//! release agent binary (`scripts/bench-agent` builds it). Prints figures; asserts nothing.
use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use merbridge_edge_testbed::{
    Node,
    agent::{Agent, agent_binary},
    kubelet_standin::{KubeletStandIn, Pki, Reply},
    podlist::{istio_pods, kubelet_fixture, with_items},
};
use serde_json::Value;

/// Directories made below the node's cgroup root, removed deepest first.
struct MadeDirs(Vec<PathBuf>);

impl MadeDirs {
    fn mkdirs(&mut self, dir: &Path) -> Result<()> {
        let mut missing = vec![];
        let mut p = dir.to_path_buf();
        while !p.exists() {
            missing.push(p.clone());
            p = p.parent().context("no parent")?.to_path_buf();
        }
        for d in missing.into_iter().rev() {
            fs::create_dir(&d).with_context(|| format!("mkdir {}", d.display()))?;
            self.0.push(d);
        }
        Ok(())
    }
}

impl Drop for MadeDirs {
    fn drop(&mut self) {
        for d in self.0.iter().rev() {
            let _ = fs::remove_dir(d);
        }
    }
}

/// The container cgroup directories a pod's JSON names, below `root`.
fn container_dirs(root: &Path, pod: &Value) -> Vec<PathBuf> {
    let uid = pod["metadata"]["uid"].as_str().unwrap_or_default();
    pod["status"]["containerStatuses"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["containerID"].as_str())
        .map(|id| {
            root.join(format!("kubepods/burstable/pod{uid}"))
                .join(id.trim_start_matches("containerd://"))
        })
        .collect()
}

fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .with_context(|| format!("{field} in /proc/{pid}/status"))
}

/// `VmRSS` split into heap and mapped files, and the peak.
fn memory(pid: u32) -> Result<String> {
    Ok(format!(
        "{} KiB ({} KiB anonymous, {} KiB file pages of the binary); peak {} KiB",
        status_kib(pid, "VmRSS:")?,
        status_kib(pid, "RssAnon:")?,
        status_kib(pid, "RssFile:")?,
        status_kib(pid, "VmHWM:")?
    ))
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = text.rsplit_once(')').context("stat format")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Unix ms of the first log line containing `needle` (the logger prints UTC ms stamps).
fn logged_at(agent: &Agent, needle: &str) -> Option<i64> {
    let log = agent.log();
    let line = log.lines().find(|l| l.contains(needle))?;
    let stamp = line.split_whitespace().next()?;
    parse_rfc3339_ms(stamp)
}

/// `2026-11-25T14:53:15.591Z` → Unix ms.
fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let (date, time) = s.trim_end_matches('Z').split_once('T')?;
    let d: Vec<i64> = date
        .split('-')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let (hms, ms) = time.split_once('.').unwrap_or((time, "0"));
    let t: Vec<i64> = hms
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let (y, m, day) = (d[0], d[1], d[2]);
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(((days * 24 + t[0]) * 60 + t[1]) * 60_000 + t[2] * 1000 + ms.parse::<i64>().ok()?)
}

/// A pseudo-random number of milliseconds below `below`, so bench steps do not fall
/// in step with the agent's polls.
fn jitter(below: u64) -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    u64::from(nanos.wrapping_mul(2654435761)) % below
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Lists `pod` on top of `full`, returns the ms until the agent logged it added (after
/// its map writes), then lists `full` again and waits for the removal.
fn list_and_time(
    agent: &mut Agent,
    kubelet: &KubeletStandIn,
    full: &Value,
    pod: &Value,
) -> Result<i64> {
    let mut list = full.clone();
    list["items"]
        .as_array_mut()
        .context("items")?
        .push(pod.clone());
    let listed = unix_ms();
    kubelet.set_reply(Reply::Body(serde_json::to_vec(&list)?));
    let name = format!(
        "pod shop/{} added",
        pod["metadata"]["name"].as_str().unwrap_or("")
    );
    agent.wait_log(&name, Duration::from_secs(5))?;
    let took = logged_at(agent, &name).context("log stamp")? - listed;
    kubelet.set_reply(Reply::Body(serde_json::to_vec(full)?));
    agent.wait_log(&name.replace("added", "removed"), Duration::from_secs(5))?;
    Ok(took)
}

fn main() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("mbe-agent-bench needs root: it runs the real agent (BPF programs, cgroups)");
    }
    let bin = agent_binary();
    let size = fs::metadata(&bin)
        .with_context(|| format!("{}: build it first (cargo build --release)", bin.display()))?
        .len();
    println!(
        "agent binary: {} ({:.2} MB)",
        bin.display(),
        size as f64 / 1e6
    );

    let helper = std::env::current_exe()?.with_file_name("mbe-testbed");
    let node = Node::new(&helper)?;
    let mut made = MadeDirs(vec![]);
    let pki = Pki::new(&node.scratch().join("pki"), "mbe-bench-ca")?;
    let base = kubelet_fixture();
    let kubelet = KubeletStandIn::start(
        &pki,
        None,
        "bench-token",
        Reply::Body(serde_json::to_vec(&base)?),
    )?;
    let token = node.scratch().join("token");
    fs::write(&token, "bench-token")?;
    let root = node.cgroup_root.display().to_string();
    let mut args = vec!["run".to_string(), "--cgroup-root".into(), root];
    args.extend(kubelet.agent_flags(&token, &pki.ca_file));
    args.extend(["--node-name", "edge-1", "--interval", "1s"].map(String::from));
    let extra = std::env::var("MBE_BENCH_AGENT_ARGS").unwrap_or_default();
    let args: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .chain(extra.split_whitespace())
        .collect();
    let mut agent = Agent::start(&args, &node.scratch().join("agent.log"))?;
    let pid = agent.proc.child.id();
    agent.wait_log("added: mesh osm", Duration::from_secs(10))?;
    std::thread::sleep(Duration::from_secs(3));
    println!("RSS idle (fixture: 7 pods, 4 meshed): {}", memory(pid)?);

    // A full node: 110 meshed pods with their container cgroups.
    let load = istio_pods(110);
    for pod in &load {
        for dir in container_dirs(&node.cgroup_root, pod) {
            made.mkdirs(&dir)?;
        }
    }
    // The pods listed later at the interval have their cgroups long before (no trigger).
    let extra = istio_pods(130);
    for pod in &extra[110..120] {
        for dir in container_dirs(&node.cgroup_root, pod) {
            made.mkdirs(&dir)?;
        }
    }
    let full = with_items(base.clone(), load.clone());
    kubelet.set_reply(Reply::Body(serde_json::to_vec(&full)?));
    agent.wait_metric(
        "merbridge_edge_pods{state=\"programmed\"}",
        |v| v == 114.0,
        Duration::from_secs(20),
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let seconds = 20;
    let (t0, r0) = (cpu_ticks(pid)?, kubelet.requests());
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    let (t1, r1) = (cpu_ticks(pid)?, kubelet.requests());
    let cpu_s = (t1 - t0) as f64 / ticks_per_second();
    let polls = r1 - r0;
    println!("RSS with 114 meshed pods: {}", memory(pid)?);
    println!(
        "CPU at 1s interval, 114 meshed pods: {:.1} ms over {polls} polls in {:.1}s = {:.2} ms/poll, {:.3}% of a core",
        cpu_s * 1e3,
        started.elapsed().as_secs_f64(),
        cpu_s * 1e3 / polls.max(1) as f64,
        cpu_s * 100.0 / started.elapsed().as_secs_f64()
    );
    println!(
        "last poll (fetch + parse + sync): {:.1} ms",
        agent.metric("merbridge_edge_last_poll_duration_seconds")? * 1e3
    );

    // Listing → maps, at the interval: the pod's cgroups exist before it is listed.
    let mut at_interval = vec![];
    for pod in &extra[110..120] {
        // Land at a random point of the interval.
        std::thread::sleep(Duration::from_millis(2500 + jitter(1000)));
        at_interval.push(list_and_time(&mut agent, &kubelet, &full, pod)?);
    }
    // With the trigger: the container cgroup appears, the kubelet lists the pod 200-400
    // ms later (its status update), and the agent must catch it within its poll burst.
    let mut triggered = vec![];
    for pod in &extra[120..130] {
        std::thread::sleep(Duration::from_millis(2500 + jitter(1000)));
        for dir in container_dirs(&node.cgroup_root, pod) {
            made.mkdirs(&dir)?;
        }
        std::thread::sleep(Duration::from_millis(200 + jitter(200)));
        triggered.push(list_and_time(&mut agent, &kubelet, &full, pod)?);
    }
    for (what, mut v) in [
        ("at the 1s interval", at_interval),
        ("with the cgroup trigger", triggered),
    ] {
        v.sort();
        println!(
            "kubelet lists pod → entries in maps, {what}: p50 {} ms, max {} ms (n={})",
            percentile(&v, 0.5),
            v[v.len() - 1],
            v.len()
        );
    }
    if let Ok(keep) = std::env::var("MBE_BENCH_KEEP_LOG") {
        fs::copy(&agent.log_path, keep)?;
    }
    drop(agent);
    drop(made);
    Ok(())
}
