//! `merbridge-edge run`: load the datapath, then keep its maps in step with the pods.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use log::{error, info, warn};
use merbridge_edge_probes_common::{COUNTER_COUNT, Counter};

use crate::{
    cgroup_watch::CgroupWatch,
    cgroups,
    check::{self, Verdict},
    datapath::{Datapath, DatapathOptions, MapSizes, kernel_addr},
    kubelet::{KubeletClient, KubeletConfig},
    mesh::MESHES,
    metrics::{self, Metrics, PodStatus},
    podlist::PollError,
    policy::{Desired, MeshSelection, PodPolicy, desired_state},
    sockhash_pin::{UNPINNED_LISTENERS_COST, UNPINNED_SOCKHASH_COST},
    source::{PodsFile, Source},
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

/// Where pods come from.
#[derive(Debug, Clone)]
pub enum SourceConfig {
    /// The kubelet's `/pods`.
    Kubelet(KubeletConfig),
    /// A PodList JSON file.
    File(PathBuf),
}

/// What `run` needs to know.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Where pods come from.
    pub source: SourceConfig,
    /// cgroup2 directory to attach to; detected when None.
    pub cgroup_root: Option<PathBuf>,
    /// bpffs mount for the sockhash pin; found when None.
    pub bpffs: Option<PathBuf>,
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
    /// Where to serve /metrics, /healthz and /readyz; None turns the listener off.
    pub metrics_addr: Option<SocketAddr>,
    /// Directory of pod network namespace files for inbound capture; None turns
    /// inbound capture off.
    pub netns_dir: Option<PathBuf>,
    /// Pin the sidecars' inbound listeners for the next agent to adopt.
    pub pin_listeners: bool,
}

/// Longest wait between polls while the source keeps failing.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Least time the main loop may go without completing a pass before `/healthz` fails:
/// a healthy pass can take seconds (a sync of many pods, a walk of the connection maps,
/// naming the certificate of a kubelet whose handshake failed).
pub const HEALTHZ_FLOOR: Duration = Duration::from_secs(10);

/// How long the main loop may go without completing a pass before `/healthz` fails:
/// three intervals or [`HEALTHZ_FLOOR`], whichever is longer, plus `kubelet_timeout`
/// when pods come from the kubelet (one request may hold the loop that long). The
/// backoff after failed polls adds nothing: the loop keeps passing at its 100 ms tick
/// while it waits to poll again.
pub fn healthz_bound(interval: Duration, kubelet_timeout: Option<Duration>) -> Duration {
    interval
        .saturating_mul(3)
        .max(HEALTHZ_FLOOR)
        .saturating_add(kubelet_timeout.unwrap_or_default())
}

/// Delay before the next poll after `failures` failures in a row: the interval,
/// doubling with each failure, capped at `MAX_BACKOFF` (or the interval if longer).
pub fn backoff(interval: Duration, failures: u32) -> Duration {
    let doubled = interval.saturating_mul(1 << failures.saturating_sub(1).min(16));
    doubled.min(MAX_BACKOFF.max(interval))
}

/// Consecutive poll failures, logged once per distinct message.
#[derive(Default)]
struct FailureLog {
    in_a_row: u32,
    last: Option<PollError>,
}

impl FailureLog {
    fn failed(&mut self, e: PollError, retry_in: Duration) {
        self.in_a_row += 1;
        if self.last.as_ref() != Some(&e) {
            error!(
                "{e}; keeping the last good state, retrying in {:.1}s",
                retry_in.as_secs_f64()
            );
        } else {
            log::debug!(
                "{} failed polls in a row ({}); retrying in {:.1}s",
                self.in_a_row,
                e.kind.label(),
                retry_in.as_secs_f64()
            );
        }
        self.last = Some(e);
    }

    fn succeeded(&mut self, source: &str) {
        if let Some(last) = self.last.take() {
            info!(
                "{source} answers again after {} failed poll(s) (last error: {})",
                self.in_a_row,
                last.kind.label()
            );
        }
        self.in_a_row = 0;
    }
}

/// Runs until SIGTERM or SIGINT.
pub fn run(opts: RunOptions) -> Result<()> {
    install_signal_handlers();
    let kubelet_timeout = match &opts.source {
        SourceConfig::Kubelet(k) => Some(k.request_timeout),
        SourceConfig::File(_) => None,
    };
    let heartbeat_bound = healthz_bound(opts.interval, kubelet_timeout);
    let metrics = Arc::new(Metrics::new(heartbeat_bound));
    if let Some(addr) = opts.metrics_addr {
        let bound = metrics::serve(addr, metrics.clone()).with_context(|| {
            format!("metrics address {addr}: cannot listen (pick another with --metrics-addr)")
        })?;
        info!(
            "/healthz fails when the main loop completes no pass for {:.1}s",
            heartbeat_bound.as_secs_f64()
        );
        info!("serving /metrics, /healthz and /readyz on http://{bound}");
    }
    let cgroup_root = cgroups::resolve_cgroup_root(opts.cgroup_root.as_deref())?;
    let report = check::run_checks(
        opts.netns_dir
            .as_deref()
            .unwrap_or(std::path::Path::new(crate::pod_netns::DEFAULT_NETNS_DIR)),
        opts.bpffs.as_deref(),
    );
    let mut accelerate = opts.accelerate;
    let mut netns_dir = opts.netns_dir.clone();
    if netns_dir.is_some() && !report.inbound_capture_possible() {
        for i in report
            .items
            .iter()
            .filter(|i| !i.ok && i.impact == check::Impact::InboundCapture)
        {
            warn!("{}: {} (needed by {})", i.what, i.detail, i.needed_by);
        }
        warn!(
            "inbound capture is not possible here: running without it (inbound reaches apps directly unless the mesh's iptables capture it)"
        );
        netns_dir = None;
    }
    match report.verdict {
        Verdict::Full | Verdict::WithoutInboundCapture => {}
        Verdict::WithoutAcceleration if accelerate => {
            for i in report.items.iter().filter(|i| !i.ok) {
                warn!("{}: {} (needed by {})", i.what, i.detail, i.needed_by);
            }
            warn!("sk_msg acceleration is not possible on this kernel: running without it");
            accelerate = false;
        }
        Verdict::WithoutAcceleration => {}
        Verdict::Cannot => {
            for i in report.items.iter().filter(|i| !i.ok) {
                error!(
                    "{}: {} — needed by {}; {}",
                    i.what, i.detail, i.needed_by, i.advice
                );
            }
            anyhow::bail!(
                "this kernel or process cannot run the agent (see `merbridge-edge check`)"
            );
        }
    }
    warn_what_unpinned_restarts_cost(&report, accelerate, opts.pin_listeners);
    if accelerate
        && let Some(w) = crate::tcp_memory::acceleration_warning(std::path::Path::new(
            crate::tcp_memory::TCP_MEM,
        ))
    {
        warn!("{w}");
    }
    let mut inbound_ports: Vec<u16> = MESHES.iter().map(|m| m.inbound_port).collect();
    inbound_ports.sort_unstable();
    inbound_ports.dedup();
    let mut dp = Datapath::load(&DatapathOptions {
        cgroup_root: cgroup_root.clone(),
        bpffs: opts.bpffs.clone(),
        accelerate,
        sizes: opts.sizes,
        netns_dir: netns_dir.clone(),
        inbound_ports,
        pin_listeners: opts.pin_listeners,
    })?;
    let inbound_capture = match (&netns_dir, dp.listeners_pin()) {
        (None, _) => "off (--no-inbound-capture): inbound reaches apps directly unless the mesh's iptables capture it".to_string(),
        (Some(d), Some(pin)) => format!("sk_lookup in each network namespace under {}; listeners pinned at {}", d.display(), pin.display()),
        (Some(d), None) => format!("sk_lookup in each network namespace under {}; listeners not pinned", d.display()),
    };
    metrics.update(|s| {
        s.attached = true;
        s.inbound_capture = inbound_capture;
        s.attached_to = format!(
            "{} (connect4/6, sendmsg/recvmsg4/6, post_bind4/6, getsockopt, sockops{})",
            cgroup_root.display(),
            if accelerate {
                ", sk_msg"
            } else {
                "; sk_msg acceleration off"
            }
        );
    });

    release_free_memory();
    let mut watch = match CgroupWatch::new(&cgroup_root) {
        Ok(w) => Some(w),
        Err(e) => {
            warn!("{e:#}: new pods are found at the next interval, not at once");
            None
        }
    };
    let mut burst_until: Option<Instant> = None;
    let mut programmer = Programmer::new(cgroup_root).with_rule_share(rule_share(opts.sizes.rules));
    let mut source = match &opts.source {
        SourceConfig::Kubelet(k) => Source::Kubelet(Box::new(KubeletClient::new(k.clone()))),
        SourceConfig::File(f) => Source::File(PodsFile::new(f)),
    };
    let origin = source.describe();
    metrics.update(|s| s.source = origin.clone());
    info!(
        "reading pods from {origin} every {:.1}s",
        opts.interval.as_secs_f64()
    );
    let mut desired: Option<Desired> = None;
    // A new PodList was parsed and not yet synced.
    let mut fresh_list = false;
    let mut failures = FailureLog::default();
    let tick = Duration::from_millis(100);
    let mut next_poll = Instant::now();
    let mut next_sync = Instant::now();
    let mut next_stats = Instant::now();
    let mut last_counters = None;
    let mut connection_maps = Vec::new();
    let mut next_connection_count = Instant::now();
    // Started: the heartbeat's bound counts from the first pass on.
    metrics.beat();
    while !STOP.load(Ordering::SeqCst) {
        let started = Instant::now();
        let mut polled = None;
        if watch.as_mut().is_some_and(CgroupWatch::changed) {
            // A container cgroup appeared: program it now. The kubelet lists the
            // container a little later (after its next status update), so keep polling
            // at the tick for a short while.
            log::debug!("pod cgroup directory created: polling now");
            next_sync = started;
            next_poll = next_poll.min(started);
            burst_until = Some(started + BURST);
        }
        if started >= next_poll {
            let fetch_started = Instant::now();
            let result = source.poll();
            // The body (up to megabytes) and the parse are gone now.
            release_free_memory();
            log::trace!("fetch took {:?}", fetch_started.elapsed());
            match result {
                Ok(Some(parsed)) => {
                    failures.succeeded(&origin);
                    for s in &parsed.skipped {
                        programmer.warn_once(s);
                    }
                    let skipped = parsed.skipped.len() as u64;
                    metrics.update(|m| m.pods_skipped = skipped);
                    let d = desired_state(&parsed.pods, opts.node_name.as_deref(), opts.meshes);
                    for w in &d.warnings {
                        programmer.warn_once(&w.0);
                    }
                    desired = Some(d);
                    fresh_list = true;
                    polled = Some(Ok(()));
                    next_sync = started;
                    next_poll = started + poll_delay(&source, opts.interval, burst_until, started);
                }
                Ok(None) => {
                    // Unchanged: a good poll for the kubelet; for a file, just a stat.
                    failures.succeeded(&origin);
                    if matches!(source, Source::Kubelet(_)) {
                        polled = Some(Ok(()));
                    }
                    next_poll = started + poll_delay(&source, opts.interval, burst_until, started)
                }
                Err(e) => {
                    let delay = backoff(opts.interval, failures.in_a_row + 1);
                    polled = Some(Err(e.kind));
                    failures.failed(e, delay);
                    next_poll = started + delay;
                }
            }
        }
        if started >= next_sync || started >= next_stats {
            // New pod network namespaces get the inbound-capture program before (or as)
            // their pods are programmed.
            if let Some(r) = dp.refresh_netns() {
                for f in &r.failed {
                    programmer.warn_once(f);
                }
                if r.attached + r.released > 0 {
                    log::debug!(
                        "network namespaces: {} attached, {} released",
                        r.attached,
                        r.released
                    );
                }
            }
        }
        if started >= next_sync {
            if let Some(desired) = &desired {
                let sync_started = Instant::now();
                let report = programmer.sync(&mut dp, &desired.pods);
                if std::mem::take(&mut fresh_list) {
                    programmer.end_warning_generation();
                }
                log::trace!("sync took {:?}", sync_started.elapsed());
                log::debug!("sync: {report:?}");
                let pods = desired
                    .pods
                    .iter()
                    .map(|p| pod_status(p, programmer.programmed_cgroups(&p.uid)))
                    .collect();
                metrics.update(|m| {
                    m.pods = pods;
                    m.pods_seen = desired.pods_seen as u64;
                    m.pods_meshed = desired.pods.len() as u64;
                    m.pods_programmed = report.programmed as u64;
                    m.pods_waiting_for_cgroups = report.waiting_for_cgroups as u64;
                    m.pods_map_full = report.map_full as u64;
                    m.map_write_errors += report.write_errors as u64;
                });
            }
            if let Some(w) = watch.as_mut() {
                w.refresh();
            }
            // New pods and changed pods come with a new PodList, new containers with an
            // inotify event: both sync at once. The periodic pass is a safety net, kept
            // at the interval only when inotify is unavailable.
            next_sync = Instant::now()
                + if watch.is_some() {
                    opts.interval * SAFETY_SYNC_INTERVALS
                } else {
                    opts.interval
                };
            next_stats = started;
        }
        if started >= next_stats {
            if started >= next_connection_count {
                connection_maps = dp.connection_map_usage();
                next_connection_count = started + CONNECTION_COUNT_EVERY;
            }
            let mut occupancy = dp.pod_map_usage(programmer.entry_counts());
            occupancy.extend(connection_maps.iter().cloned());
            let earlier_agent_sockets = dp.sweep_pins() as u64;
            let bypass: BTreeMap<[u32; 4], u64> = dp.bypass_by_pod().into_iter().collect();
            let netns_attached = dp.netns_attached().map_or(0, |(n, _)| n as u64);
            let listening = dp.listener_cgroups();
            let inbound_listeners = listening.len() as u64;
            if programmer.saw_listening(listening) {
                // A sidecar was seen listening: arm its pod (a sync writes only that).
                next_sync = started;
            }
            let promised = dp.promised_tuple_entries().ok();
            let counters = dp.counters().ok();
            log_counters_if_changed(counters.as_ref(), &mut last_counters);
            let map_kernel_bytes = crate::memory::map_kernel_bytes();
            let (resident, peak) = crate::memory::resident_bytes();
            metrics.update(|m| {
                m.maps = occupancy;
                m.map_kernel_bytes = map_kernel_bytes;
                m.resident_bytes = resident;
                m.peak_resident_bytes = peak;
                m.earlier_agent_sockets = earlier_agent_sockets;
                m.netns_attached = netns_attached;
                m.inbound_listeners = inbound_listeners;
                for p in &mut m.pods {
                    p.bypassed = p
                        .ips
                        .iter()
                        .filter_map(|ip| ip.parse().ok())
                        .map(|ip| bypass.get(&kernel_addr(ip)).copied().unwrap_or(0))
                        .sum();
                }
                if let Some(p) = promised {
                    m.promised_tuple_entries = p;
                }
                if let Some(c) = counters {
                    m.counters = Counter::ALL
                        .iter()
                        .map(|k| k.name().to_string())
                        .zip(c)
                        .collect();
                }
            });
            next_stats = started + opts.interval;
        }
        if let Some(outcome) = polled {
            let took = started.elapsed().as_secs_f64();
            metrics.update(|m| {
                m.last_poll_seconds = took;
                m.poll_seconds_sum += took;
                match outcome {
                    Ok(()) => {
                        m.polls_ok += 1;
                        m.last_success_unix = SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .ok()
                            .map(|d| d.as_secs_f64());
                    }
                    Err(kind) => *m.poll_errors.entry(kind).or_default() += 1,
                }
            });
        }
        // A pass completed: /healthz stays healthy while these keep coming.
        metrics.beat();
        let wake = next_poll.min(next_sync).min(next_stats);
        let nap = wake.saturating_duration_since(Instant::now()).min(tick);
        match &watch {
            Some(w) => w.wait(nap),
            None => std::thread::sleep(nap),
        }
    }
    info!("stopping: detaching probes");
    drop(dp);
    Ok(())
}

/// Says at start, when the check's test pin failed, what an agent restart will cost
/// with the features in use (nothing to say when neither pin is wanted).
fn warn_what_unpinned_restarts_cost(report: &check::Report, accelerate: bool, pin_listeners: bool) {
    let costs: Vec<&str> = [
        (accelerate, UNPINNED_SOCKHASH_COST),
        (pin_listeners, UNPINNED_LISTENERS_COST),
    ]
    .into_iter()
    .filter_map(|(wanted, cost)| wanted.then_some(cost))
    .collect();
    for i in report
        .items
        .iter()
        .filter(|i| !i.ok && i.impact == check::Impact::Restarts)
    {
        if costs.is_empty() {
            info!(
                "{}: {} (nothing is pinned with these flags)",
                i.what, i.detail
            );
            continue;
        }
        warn!(
            "{} fails, so an agent restart costs this: {}; to keep it, {}",
            i.what,
            costs.join("; "),
            i.advice
        );
        warn!("{}: {}", i.what, i.detail);
    }
}

/// A pod as `status` shows it; `programmed` is its cgroup count when in the maps.
fn pod_status(p: &PodPolicy, programmed: Option<usize>) -> PodStatus {
    let mut rules: Vec<String> = p
        .port_rules
        .iter()
        .map(|(kind, r)| {
            let ports = if r.first == r.last {
                r.first.to_string()
            } else {
                format!("{}-{}", r.first, r.last)
            };
            format!("{} port {ports}", kind.label())
        })
        .collect();
    rules.extend(
        p.cidr_rules
            .iter()
            .map(|(kind, c)| format!("{} {}/{}", kind.label(), c.addr, c.len)),
    );
    if let Some(port) = p.dns_port {
        rules.push(format!("dns → {port}"));
    }
    PodStatus {
        name: p.name.clone(),
        mesh: p.mesh.name().into(),
        ips: p
            .ip4
            .map(|a| a.to_string())
            .into_iter()
            .chain(p.ip6.map(|a| a.to_string()))
            .collect(),
        containers: programmed.unwrap_or(0),
        programmed: programmed.is_some(),
        proxy: format!(
            "out {} in {} uid {}",
            p.outbound_port, p.inbound_port, p.proxy_uid
        ),
        rules,
        bypassed: 0,
    }
}

/// Hands memory freed after parsing a PodList back to the kernel. glibc keeps freed
/// heap pages otherwise (musl's allocator returns them by itself).
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// With inotify working, a full re-sync runs every this many intervals.
const SAFETY_SYNC_INTERVALS: u32 = 10;

/// How often the per-connection maps are counted (a walk of up to 3 × 65536 keys).
const CONNECTION_COUNT_EVERY: Duration = Duration::from_secs(30);

/// How long polls stay at the tick after a cgroup appeared: the kubelet's status for a
/// new container follows within its PLEG relist period (1 s).
const BURST: Duration = Duration::from_secs(2);
/// Poll period during a burst.
const BURST_EVERY: Duration = Duration::from_millis(50);

fn poll_delay(
    source: &Source,
    interval: Duration,
    burst_until: Option<Instant>,
    now: Instant,
) -> Duration {
    let normal = source.next_poll_after(interval);
    match burst_until {
        Some(until) if now < until => normal.min(BURST_EVERY),
        _ => normal,
    }
}

/// Logs the kernel counters (debug level) when they moved since the last call.
fn log_counters_if_changed(
    now: Option<&[u64; COUNTER_COUNT as usize]>,
    last: &mut Option<Vec<u64>>,
) {
    let Some(now) = now else { return };
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

/// One pod's share of each rule map of `capacity` entries: a 16th, so a pod cannot
/// take the room of the others (a kubelet runs at most 110 pods; typical pods need a
/// handful of entries).
pub fn rule_share(capacity: u32) -> usize {
    (capacity as usize / 16).max(1)
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

    #[test]
    fn healthz_bound_is_three_intervals_with_a_floor_plus_the_kubelet_timeout() {
        let s = Duration::from_secs;
        assert_eq!(healthz_bound(s(2), None), s(10));
        assert_eq!(healthz_bound(s(2), Some(s(10))), s(20));
        assert_eq!(healthz_bound(s(5), None), s(15));
        assert_eq!(healthz_bound(s(60), Some(s(10))), s(190));
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let i = Duration::from_secs(2);
        assert_eq!(backoff(i, 1), Duration::from_secs(2));
        assert_eq!(backoff(i, 2), Duration::from_secs(4));
        assert_eq!(backoff(i, 4), Duration::from_secs(16));
        assert_eq!(backoff(i, 5), Duration::from_secs(30));
        assert_eq!(backoff(i, 1000), Duration::from_secs(30));
        // An interval longer than the cap is never shortened.
        assert_eq!(backoff(Duration::from_secs(60), 3), Duration::from_secs(60));
    }
}
