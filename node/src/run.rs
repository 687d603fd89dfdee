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
    datapath::{Datapath, DatapathOptions, MapSizes, describe_attachments, kernel_addr},
    kubelet::{KubeletClient, KubeletConfig},
    mesh::MESHES,
    metrics::{self, MapUsage, Metrics, PodStatus},
    podlist::{ErrorKind, PollError},
    policy::{Desired, MeshSelection, PodPolicy, desired_state},
    sockhash_pin::{UNPINNED_LISTENERS_COST, UNPINNED_SOCKHASH_COST},
    source::{PodsFile, Source},
    sync::Programmer,
    warnings::WarnOnce,
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
    let features = features_possible(&report, opts.accelerate, opts.netns_dir.clone())?;
    warn_what_unpinned_restarts_cost(&report, features.accelerate, opts.pin_listeners);
    if features.accelerate
        && let Some(w) = crate::tcp_memory::acceleration_warning(std::path::Path::new(
            crate::tcp_memory::TCP_MEM,
        ))
    {
        warn!("{w}");
    }
    let mut inbound_ports: Vec<u16> = MESHES.iter().map(|m| m.inbound_port).collect();
    inbound_ports.sort_unstable();
    inbound_ports.dedup();
    let dp = Datapath::load(&DatapathOptions {
        cgroup_root: cgroup_root.clone(),
        bpffs: opts.bpffs.clone(),
        accelerate: features.accelerate,
        sizes: opts.sizes,
        netns_dir: features.netns_dir.clone(),
        inbound_ports,
        pin_listeners: opts.pin_listeners,
    })?;
    let inbound_capture = match (&features.netns_dir, dp.listeners_pin()) {
        (None, _) => "off (--no-inbound-capture): inbound reaches apps directly unless the mesh's iptables capture it".to_string(),
        (Some(d), Some(pin)) => format!("sk_lookup in each network namespace under {}; listeners pinned at {}", d.display(), pin.display()),
        (Some(d), None) => format!("sk_lookup in each network namespace under {}; listeners not pinned", d.display()),
    };
    metrics.update(|s| {
        s.attached = true;
        s.inbound_capture = inbound_capture;
        s.attached_to = describe_attachments(&cgroup_root, features.accelerate);
    });

    release_free_memory();
    let mut agent = AgentLoop::new(&opts, cgroup_root, dp, metrics);
    // Started: the heartbeat's bound counts from the first pass on.
    agent.metrics.beat();
    while !STOP.load(Ordering::SeqCst) {
        agent.pass();
    }
    info!("stopping: detaching probes");
    drop(agent);
    Ok(())
}

/// What the agent runs with, after the checks had their say.
struct Features {
    /// sk_msg acceleration.
    accelerate: bool,
    /// Where the pod network namespaces are, with inbound capture on.
    netns_dir: Option<PathBuf>,
}

/// Turns off what the check `report` says this kernel or process cannot do (saying
/// why), or refuses when the agent cannot run at all.
fn features_possible(
    report: &check::Report,
    accelerate: bool,
    netns_dir: Option<PathBuf>,
) -> Result<Features> {
    let mut features = Features {
        accelerate,
        netns_dir,
    };
    if features.netns_dir.is_some() && !report.inbound_capture_possible() {
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
        features.netns_dir = None;
    }
    match report.verdict {
        Verdict::Full | Verdict::WithoutInboundCapture => {}
        Verdict::WithoutAcceleration if features.accelerate => {
            for i in report.items.iter().filter(|i| !i.ok) {
                warn!("{}: {} (needed by {})", i.what, i.detail, i.needed_by);
            }
            warn!("sk_msg acceleration is not possible on this kernel: running without it");
            features.accelerate = false;
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
    Ok(features)
}

/// When each step of the main loop is due next.
struct Timers {
    /// The next read of the source.
    poll: Instant,
    /// The next sync of the maps with the desired state.
    sync: Instant,
    /// The next publication of map occupancy, counters and memory.
    publish: Instant,
    /// The next count of the per-connection maps (a long walk: rarer).
    connection_count: Instant,
    /// Polls stay at [`BURST_EVERY`] until then (a pod cgroup appeared).
    burst_until: Option<Instant>,
}

impl Timers {
    /// Everything due now.
    fn all_due(now: Instant) -> Self {
        Self {
            poll: now,
            sync: now,
            publish: now,
            connection_count: now,
            burst_until: None,
        }
    }

    /// When the loop has something to do next.
    fn next_wake(&self) -> Instant {
        self.poll.min(self.sync).min(self.publish)
    }
}

/// The main loop: one pass polls the source, syncs the maps and publishes what the
/// kernel holds, each step when its timer is due.
struct AgentLoop {
    metrics: Arc<Metrics>,
    dp: Datapath,
    programmer: Programmer,
    warnings: WarnOnce,
    source: Source,
    /// The source, described for logs and `status`.
    origin: String,
    watch: Option<CgroupWatch>,
    interval: Duration,
    node_name: Option<String>,
    meshes: MeshSelection,
    /// The desired state from the last PodList parsed.
    desired: Option<Desired>,
    /// A new PodList was parsed and not yet synced.
    fresh_list: bool,
    failures: FailureLog,
    timers: Timers,
    /// The kernel counters as last logged.
    last_counters: Option<Vec<u64>>,
    /// The per-connection maps as last counted.
    connection_maps: Vec<MapUsage>,
}

/// The time between passes when nothing is due sooner.
const TICK: Duration = Duration::from_millis(100);

impl AgentLoop {
    fn new(opts: &RunOptions, cgroup_root: PathBuf, dp: Datapath, metrics: Arc<Metrics>) -> Self {
        let watch = match CgroupWatch::new(&cgroup_root) {
            Ok(w) => Some(w),
            Err(e) => {
                warn!("{e:#}: new pods are found at the next interval, not at once");
                None
            }
        };
        let programmer = Programmer::new(cgroup_root).with_rule_share(rule_share(opts.sizes.rules));
        let source = match &opts.source {
            SourceConfig::Kubelet(k) => Source::Kubelet(Box::new(KubeletClient::new(k.clone()))),
            SourceConfig::File(f) => Source::File(PodsFile::new(f)),
        };
        let origin = source.describe();
        metrics.update(|s| s.source = origin.clone());
        info!(
            "reading pods from {origin} every {:.1}s",
            opts.interval.as_secs_f64()
        );
        Self {
            metrics,
            dp,
            programmer,
            warnings: WarnOnce::default(),
            source,
            origin,
            watch,
            interval: opts.interval,
            node_name: opts.node_name.clone(),
            meshes: opts.meshes,
            desired: None,
            fresh_list: false,
            failures: FailureLog::default(),
            timers: Timers::all_due(Instant::now()),
            last_counters: None,
            connection_maps: Vec::new(),
        }
    }

    /// One pass: each step that is due, then a nap until the next is (at most a tick).
    fn pass(&mut self) {
        let started = Instant::now();
        if self.watch.as_mut().is_some_and(CgroupWatch::changed) {
            // A container cgroup appeared: program it now. The kubelet lists the
            // container a little later (after its next status update), so keep polling
            // at the tick for a short while.
            log::debug!("pod cgroup directory created: polling now");
            self.timers.sync = started;
            self.timers.poll = self.timers.poll.min(started);
            self.timers.burst_until = Some(started + BURST);
        }
        let polled = (started >= self.timers.poll).then(|| self.poll(started));
        if started >= self.timers.sync || started >= self.timers.publish {
            self.refresh_netns();
        }
        if started >= self.timers.sync {
            self.sync(started);
        }
        if started >= self.timers.publish {
            self.publish(started);
        }
        if let Some(Some(outcome)) = polled {
            self.record_poll(started, outcome);
        }
        // A pass completed: /healthz stays healthy while these keep coming.
        self.metrics.beat();
        let nap = self
            .timers
            .next_wake()
            .saturating_duration_since(Instant::now())
            .min(TICK);
        match &self.watch {
            Some(w) => w.wait(nap),
            None => std::thread::sleep(nap),
        }
    }

    /// Reads the source; a new PodList becomes the desired state. The outcome, when the
    /// read counts as a poll (a file found unchanged does not).
    fn poll(&mut self, started: Instant) -> Option<Result<(), ErrorKind>> {
        let fetch_started = Instant::now();
        let result = self.source.poll();
        // The body (up to megabytes) and the parse are gone now.
        release_free_memory();
        log::trace!("fetch took {:?}", fetch_started.elapsed());
        match result {
            Ok(Some(parsed)) => {
                self.failures.succeeded(&self.origin);
                for s in &parsed.skipped {
                    self.warnings.warn(s);
                }
                let skipped = parsed.skipped.len() as u64;
                self.metrics.update(|m| m.pods_skipped = skipped);
                let d = desired_state(&parsed.pods, self.node_name.as_deref(), self.meshes);
                for w in &d.warnings {
                    self.warnings.warn(&w.0);
                }
                self.desired = Some(d);
                self.fresh_list = true;
                self.timers.sync = started;
                self.timers.poll = started + self.poll_delay(started);
                Some(Ok(()))
            }
            Ok(None) => {
                // Unchanged: a good poll for the kubelet; for a file, just a stat.
                self.failures.succeeded(&self.origin);
                self.timers.poll = started + self.poll_delay(started);
                matches!(self.source, Source::Kubelet(_)).then_some(Ok(()))
            }
            Err(e) => {
                let delay = backoff(self.interval, self.failures.in_a_row + 1);
                let kind = e.kind;
                self.failures.failed(e, delay);
                self.timers.poll = started + delay;
                Some(Err(kind))
            }
        }
    }

    /// Time to the next poll: the source's own pace, at most [`BURST_EVERY`] during a
    /// burst.
    fn poll_delay(&self, now: Instant) -> Duration {
        let normal = self.source.next_poll_after(self.interval);
        match self.timers.burst_until {
            Some(until) if now < until => normal.min(BURST_EVERY),
            _ => normal,
        }
    }

    /// New pod network namespaces get the inbound-capture program before (or as) their
    /// pods are programmed.
    fn refresh_netns(&mut self) {
        let Some(r) = self.dp.refresh_netns() else {
            return;
        };
        for f in &r.failed {
            self.warnings.warn(f);
        }
        if r.attached + r.released > 0 {
            log::debug!(
                "network namespaces: {} attached, {} released",
                r.attached,
                r.released
            );
        }
    }

    /// Writes the differences between the desired state and the maps; publishes the pods.
    fn sync(&mut self, started: Instant) {
        if let Some(desired) = &self.desired {
            let sync_started = Instant::now();
            let report = self
                .programmer
                .sync(&mut self.dp, &desired.pods, &mut self.warnings);
            if std::mem::take(&mut self.fresh_list) {
                self.warnings.end_generation();
            }
            log::trace!("sync took {:?}", sync_started.elapsed());
            log::debug!("sync: {report:?}");
            let pods = desired
                .pods
                .iter()
                .map(|p| pod_status(p, self.programmer.programmed_cgroups(&p.uid)))
                .collect();
            self.metrics.update(|m| {
                m.pods = pods;
                m.pods_seen = desired.pods_seen as u64;
                m.pods_meshed = desired.pods.len() as u64;
                m.pods_programmed = report.programmed as u64;
                m.pods_waiting_for_cgroups = report.waiting_for_cgroups as u64;
                m.pods_map_full = report.map_full as u64;
                m.map_write_errors += report.write_errors as u64;
            });
        }
        if let Some(w) = self.watch.as_mut() {
            w.refresh();
        }
        // New pods and changed pods come with a new PodList, new containers with an
        // inotify event: both sync at once. The periodic pass is a safety net, kept
        // at the interval only when inotify is unavailable.
        self.timers.sync = Instant::now()
            + if self.watch.is_some() {
                self.interval * SAFETY_SYNC_INTERVALS
            } else {
                self.interval
            };
        self.timers.publish = started;
    }

    /// Publishes what the kernel holds: map occupancy, pins of earlier agents, the
    /// bypass ledger, inbound listeners, counters and memory.
    fn publish(&mut self, started: Instant) {
        let dp = &self.dp;
        if started >= self.timers.connection_count {
            self.connection_maps = dp.connection_map_usage();
            self.timers.connection_count = started + CONNECTION_COUNT_EVERY;
        }
        let mut occupancy = dp.pod_map_usage(self.programmer.entry_counts());
        occupancy.extend(self.connection_maps.iter().cloned());
        let earlier_agent_sockets = dp.sweep_pins() as u64;
        let bypass: BTreeMap<[u32; 4], u64> = dp.bypass_by_pod().into_iter().collect();
        let netns_attached = dp.netns_attached().map_or(0, |(n, _)| n as u64);
        let listening = dp.listener_cgroups();
        let inbound_listeners = listening.len() as u64;
        if self.programmer.saw_listening(listening) {
            // A sidecar was seen listening: arm its pod (a sync writes only that).
            self.timers.sync = started;
        }
        let promised = dp.promised_tuple_entries().ok();
        let counters = dp.counters().ok();
        log_counters_if_changed(counters.as_ref(), &mut self.last_counters);
        let map_kernel_bytes = crate::memory::map_kernel_bytes();
        let (resident, peak) = crate::memory::resident_bytes();
        self.metrics.update(|m| {
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
        self.timers.publish = started + self.interval;
    }

    /// Counts a poll's outcome and how long the pass took so far.
    fn record_poll(&self, started: Instant, outcome: Result<(), ErrorKind>) {
        let took = started.elapsed().as_secs_f64();
        self.metrics.update(|m| {
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
