//! `/metrics` (Prometheus text format), `/healthz` and `/readyz`, served by a small
//! HTTP/1.1 listener on a thread of its own, so a slow scraper never delays a poll.
//! The poll loop publishes a [`Snapshot`]; the listener only reads it. The loop also
//! beats a [`Heartbeat`] after every pass: `/healthz` fails when the last beat is older
//! than its bound, so a wedged loop is seen even though this thread still answers.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::podlist::ErrorKind;

/// Entries and capacity of one kernel map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapUsage {
    /// Map name, as in the probes.
    pub name: String,
    /// Entries now in the map.
    pub entries: u64,
    /// The map's max_entries.
    pub capacity: u64,
}

/// One meshed pod as `status` shows it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PodStatus {
    /// `namespace/name`.
    pub name: String,
    /// Mesh name.
    pub mesh: String,
    /// Pod IPs.
    pub ips: Vec<String>,
    /// Container cgroups found and programmed.
    pub containers: usize,
    /// All its entries are in the maps.
    pub programmed: bool,
    /// Sidecar outbound and inbound ports, and its uid.
    pub proxy: String,
    /// Exclusions and inclusions, like `out-exclude port 5432`.
    pub rules: Vec<String>,
    /// The bypass ledger: inbound connections that reached the app without the
    /// sidecar (0 whenever inbound capture works).
    #[serde(default)]
    pub bypassed: u64,
}

/// What the agent knows about itself, published after every poll.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Snapshot {
    /// The probes are loaded and attached.
    pub attached: bool,
    /// Where, and which programs.
    pub attached_to: String,
    /// Where pods come from.
    pub source: String,
    /// Meshed pods.
    pub pods: Vec<PodStatus>,
    /// Successful polls since start.
    pub polls_ok: u64,
    /// Failed polls by kind since start.
    pub poll_errors: BTreeMap<ErrorKind, u64>,
    /// Duration of the last poll (fetch, parse, sync), seconds.
    pub last_poll_seconds: f64,
    /// Sum of all poll durations, seconds.
    pub poll_seconds_sum: f64,
    /// Unix time of the last successful poll.
    pub last_success_unix: Option<f64>,
    /// Pods listed for this node.
    pub pods_seen: u64,
    /// Meshed pods among them.
    pub pods_meshed: u64,
    /// Meshed pods whose entries are all in the maps.
    pub pods_programmed: u64,
    /// Meshed pods with no container cgroup found yet.
    pub pods_waiting_for_cgroups: u64,
    /// PodList items skipped as malformed in the last good list.
    pub pods_skipped: u64,
    /// Meshed pods left unredirected because a map is full.
    pub pods_map_full: u64,
    /// Map writes that failed since start.
    pub map_write_errors: u64,
    /// Open sockets accelerated by an earlier agent (its sockhash stays pinned until
    /// they close).
    pub earlier_agent_sockets: u64,
    /// Original-destination tuple entries the connect hooks have promised (real-time
    /// occupancy of ORIGINAL_DST_BY_TUPLE, bounded by its capacity).
    pub promised_tuple_entries: u64,
    /// Kernel maps.
    pub maps: Vec<MapUsage>,
    /// Kernel counters by name.
    pub counters: Vec<(String, u64)>,
    /// Inbound capture: where sk_lookup is attached, or why not.
    #[serde(default)]
    pub inbound_capture: String,
    /// Network namespaces with sk_lookup attached.
    #[serde(default)]
    pub netns_attached: u64,
    /// Sidecar inbound listeners registered.
    #[serde(default)]
    pub inbound_listeners: u64,
    /// Kernel memory of the agent's maps (sum of their `memlock`), bytes.
    #[serde(default)]
    pub map_kernel_bytes: u64,
    /// The agent's resident memory now, bytes.
    #[serde(default)]
    pub resident_bytes: u64,
    /// The agent's peak resident memory so far, bytes.
    #[serde(default)]
    pub peak_resident_bytes: u64,
}

impl Snapshot {
    /// Probes attached and at least one successful poll.
    pub fn ready(&self) -> bool {
        self.attached && self.polls_ok > 0
    }
}

/// When the main loop last completed a pass, on the monotonic clock, and how long it
/// may go without one before `/healthz` fails.
#[derive(Debug)]
pub struct Heartbeat {
    /// Start of the clock the beats are counted on.
    origin: Instant,
    /// Milliseconds from `origin` to the last beat.
    last_ms: AtomicU64,
    /// Longest time between beats of a healthy loop.
    bound: Duration,
}

impl Heartbeat {
    /// A heartbeat that beats now and allows `bound` between beats.
    pub fn new(bound: Duration) -> Self {
        Self {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
            bound,
        }
    }

    /// Records a completed pass.
    pub fn beat(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Time since the last beat.
    pub fn since_last(&self) -> Duration {
        self.origin
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }

    /// The allowed time between beats.
    pub fn bound(&self) -> Duration {
        self.bound
    }

    /// `Ok` while the last beat is within the bound, else the one-line reason.
    pub fn check(&self) -> Result<(), String> {
        let since = self.since_last();
        if since <= self.bound {
            return Ok(());
        }
        Err(format!(
            "not healthy: the main loop has not completed a pass for {:.1}s (bound {:.1}s)\n",
            since.as_secs_f64(),
            self.bound.as_secs_f64()
        ))
    }
}

/// The shared, latest snapshot, and the main loop's heartbeat.
#[derive(Debug)]
pub struct Metrics {
    snapshot: Mutex<Snapshot>,
    heartbeat: Heartbeat,
}

impl Metrics {
    /// An empty snapshot; `/healthz` fails once the loop goes `heartbeat_bound` without
    /// a [`Metrics::beat`] (counted from now).
    pub fn new(heartbeat_bound: Duration) -> Self {
        Self {
            snapshot: Mutex::default(),
            heartbeat: Heartbeat::new(heartbeat_bound),
        }
    }

    /// Replaces the snapshot through `f`.
    pub fn update(&self, f: impl FnOnce(&mut Snapshot)) {
        let mut s = self.snapshot.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
    }

    /// A copy of the snapshot.
    pub fn get(&self) -> Snapshot {
        self.snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records a completed pass of the main loop.
    pub fn beat(&self) {
        self.heartbeat.beat();
    }

    /// The main loop's heartbeat.
    pub fn heartbeat(&self) -> &Heartbeat {
        &self.heartbeat
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// The Prometheus text exposition of `s`.
pub fn render(s: &Snapshot) -> String {
    let mut o = String::with_capacity(4096);
    family(
        &mut o,
        "merbridge_edge_ready",
        "gauge",
        "1 when the probes are attached and a poll has succeeded.",
    );
    let _ = writeln!(o, "merbridge_edge_ready {}", u8::from(s.ready()));
    family(
        &mut o,
        "merbridge_edge_pods",
        "gauge",
        "Pods by state: seen on this node, meshed, programmed into the maps, waiting for a container cgroup, skipped as malformed, left out by a full map.",
    );
    for (state, v) in [
        ("seen", s.pods_seen),
        ("meshed", s.pods_meshed),
        ("programmed", s.pods_programmed),
        ("waiting_for_cgroups", s.pods_waiting_for_cgroups),
        ("skipped", s.pods_skipped),
        ("map_full", s.pods_map_full),
    ] {
        let _ = writeln!(o, "merbridge_edge_pods{{state=\"{state}\"}} {v}");
    }
    family(
        &mut o,
        "merbridge_edge_polls_total",
        "counter",
        "Successful polls of the pod source.",
    );
    let _ = writeln!(o, "merbridge_edge_polls_total {}", s.polls_ok);
    family(
        &mut o,
        "merbridge_edge_poll_errors_total",
        "counter",
        "Failed polls of the pod source, by kind.",
    );
    for kind in ErrorKind::ALL {
        let v = s.poll_errors.get(&kind).copied().unwrap_or(0);
        let _ = writeln!(
            o,
            "merbridge_edge_poll_errors_total{{kind=\"{}\"}} {v}",
            kind.label()
        );
    }
    family(
        &mut o,
        "merbridge_edge_poll_duration_seconds",
        "summary",
        "Time spent per poll: fetch, parse, and map sync.",
    );
    let polls = s.polls_ok + s.poll_errors.values().sum::<u64>();
    let _ = writeln!(
        o,
        "merbridge_edge_poll_duration_seconds_sum {}\nmerbridge_edge_poll_duration_seconds_count {polls}",
        s.poll_seconds_sum
    );
    family(
        &mut o,
        "merbridge_edge_last_poll_duration_seconds",
        "gauge",
        "Duration of the latest poll.",
    );
    let _ = writeln!(
        o,
        "merbridge_edge_last_poll_duration_seconds {}",
        s.last_poll_seconds
    );
    family(
        &mut o,
        "merbridge_edge_last_successful_poll_timestamp_seconds",
        "gauge",
        "Unix time of the latest successful poll (0: none yet).",
    );
    let _ = writeln!(
        o,
        "merbridge_edge_last_successful_poll_timestamp_seconds {}",
        s.last_success_unix.unwrap_or(0.0)
    );
    family(
        &mut o,
        "merbridge_edge_map_write_errors_total",
        "counter",
        "Map writes that failed (full map or refused); the pod concerned is left unredirected.",
    );
    let _ = writeln!(
        o,
        "merbridge_edge_map_write_errors_total {}",
        s.map_write_errors
    );
    family(
        &mut o,
        "merbridge_edge_earlier_agent_sockets",
        "gauge",
        "Open sockets accelerated by an earlier agent; its sockhash stays pinned until they close.",
    );
    let _ = writeln!(
        o,
        "merbridge_edge_earlier_agent_sockets {}",
        s.earlier_agent_sockets
    );
    family(
        &mut o,
        "merbridge_edge_promised_tuple_entries",
        "gauge",
        "Original-destination tuple entries promised by the connect hooks (in use or being set up); at the map's capacity new connections go unredirected (map_full).",
    );
    let _ = writeln!(
        o,
        "merbridge_edge_promised_tuple_entries {}",
        s.promised_tuple_entries
    );
    for (name, help, value) in [
        (
            "merbridge_edge_map_kernel_memory_bytes",
            "Kernel memory of the agent's eBPF maps (the kernel's memlock figure of each, summed); on 5.11+ charged to the agent's cgroup.",
            s.map_kernel_bytes,
        ),
        (
            "merbridge_edge_resident_memory_bytes",
            "The agent process's resident memory.",
            s.resident_bytes,
        ),
        (
            "merbridge_edge_peak_resident_memory_bytes",
            "The agent process's peak resident memory (VmHWM).",
            s.peak_resident_bytes,
        ),
    ] {
        family(&mut o, name, "gauge", help);
        let _ = writeln!(o, "{name} {value}");
    }
    family(
        &mut o,
        "merbridge_edge_netns_attached",
        "gauge",
        "Pod network namespaces with the inbound-capture program (sk_lookup) attached.",
    );
    let _ = writeln!(o, "merbridge_edge_netns_attached {}", s.netns_attached);
    family(
        &mut o,
        "merbridge_edge_inbound_listeners",
        "gauge",
        "Sidecar inbound listening sockets registered for inbound capture.",
    );
    let _ = writeln!(
        o,
        "merbridge_edge_inbound_listeners {}",
        s.inbound_listeners
    );
    family(
        &mut o,
        "merbridge_edge_inbound_bypassed_total",
        "counter",
        "The bypass ledger: inbound connections that reached a meshed pod's app without its sidecar.",
    );
    for p in &s.pods {
        let _ = writeln!(
            o,
            "merbridge_edge_inbound_bypassed_total{{pod=\"{}\"}} {}",
            p.name, p.bypassed
        );
    }
    type MapField = fn(&MapUsage) -> u64;
    let per_map: [(&str, &str, MapField); 2] = [
        (
            "merbridge_edge_map_entries",
            "Entries in each kernel map.",
            |m| m.entries,
        ),
        (
            "merbridge_edge_map_capacity",
            "max_entries of each kernel map.",
            |m| m.capacity,
        ),
    ];
    for (name, help, value) in per_map {
        family(&mut o, name, "gauge", help);
        for m in &s.maps {
            let _ = writeln!(o, "{name}{{map=\"{}\"}} {}", m.name, value(m));
        }
    }
    family(
        &mut o,
        "merbridge_edge_datapath_events_total",
        "counter",
        "Kernel counters: redirects, passes, getsockopt answers, sk_msg messages, map-full events, DNS.",
    );
    for (name, v) in s.counters.iter().filter(|(n, _)| !n.ends_with("_bytes")) {
        let _ = writeln!(
            o,
            "merbridge_edge_datapath_events_total{{event=\"{name}\"}} {v}"
        );
    }
    family(
        &mut o,
        "merbridge_edge_datapath_bytes_total",
        "counter",
        "Bytes moved by the datapath (sk_msg between local sockets).",
    );
    for (name, v) in s.counters.iter().filter(|(n, _)| n.ends_with("_bytes")) {
        let event = name.trim_end_matches("_bytes");
        let _ = writeln!(
            o,
            "merbridge_edge_datapath_bytes_total{{event=\"{event}\"}} {v}"
        );
    }
    o
}

/// Binds `addr` and serves the endpoints from a thread; returns the bound address.
pub fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                // One connection at a time, each bounded by short timeouts.
                let _ = handle(stream, &metrics);
            }
        })?;
    Ok(bound)
}

/// Largest request head read.
const MAX_REQUEST: usize = 8192;

fn handle(mut stream: TcpStream, metrics: &Metrics) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_REQUEST {
            return respond(
                &mut stream,
                431,
                "text/plain",
                "request head too large\n",
                false,
            );
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return respond(&mut stream, 405, "text/plain", "only GET\n", head_only);
    }
    let snapshot = metrics.get();
    match path {
        "/metrics" => respond(
            &mut stream,
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            &render(&snapshot),
            head_only,
        ),
        "/healthz" => match metrics.heartbeat.check() {
            Ok(()) => respond(&mut stream, 200, "text/plain", "ok\n", head_only),
            Err(why) => respond(&mut stream, 503, "text/plain", &why, head_only),
        },
        "/status" => respond(
            &mut stream,
            200,
            "application/json",
            &serde_json::to_string(&snapshot).unwrap_or_default(),
            head_only,
        ),
        "/readyz" if snapshot.ready() => {
            respond(&mut stream, 200, "text/plain", "ready\n", head_only)
        }
        "/readyz" => {
            let why = if snapshot.attached {
                "not ready: no successful poll yet\n"
            } else {
                "not ready: probes not attached\n"
            };
            respond(&mut stream, 503, "text/plain", why, head_only)
        }
        _ => respond(
            &mut stream,
            404,
            "text/plain",
            "not found: try /metrics, /healthz, /readyz or /status\n",
            head_only,
        ),
    }
}

fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &str,
    head_only: bool,
) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        out.push_str(body);
    }
    stream.write_all(out.as_bytes())?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let status = text[9..12].parse().unwrap();
        let body = text.split_once("\r\n\r\n").unwrap().1.to_string();
        (status, body)
    }

    #[test]
    fn endpoints_follow_the_snapshot() {
        let metrics = Arc::new(Metrics::new(Duration::from_secs(60)));
        let addr = serve("127.0.0.1:0".parse().unwrap(), metrics.clone()).unwrap();
        assert_eq!(get(addr, "/healthz").0, 200);
        let (status, body) = get(addr, "/readyz");
        assert_eq!(status, 503);
        assert!(body.contains("not attached"), "{body}");
        metrics.update(|s| s.attached = true);
        assert!(get(addr, "/readyz").1.contains("no successful poll"));
        metrics.update(|s| {
            s.polls_ok = 3;
            s.pods_programmed = 2;
            s.poll_errors.insert(ErrorKind::Forbidden, 4);
            s.maps.push(MapUsage {
                name: "POD_BY_IP".into(),
                entries: 2,
                capacity: 2048,
            });
            s.counters = vec![("redirect_outbound".into(), 7), ("sk_msg_bytes".into(), 99)];
        });
        assert_eq!(get(addr, "/readyz").0, 200);
        let (status, body) = get(addr, "/metrics");
        assert_eq!(status, 200);
        for line in [
            "merbridge_edge_ready 1",
            "merbridge_edge_pods{state=\"programmed\"} 2",
            "merbridge_edge_poll_errors_total{kind=\"forbidden\"} 4",
            "merbridge_edge_poll_errors_total{kind=\"tls\"} 0",
            "merbridge_edge_poll_duration_seconds_count 7",
            "merbridge_edge_map_entries{map=\"POD_BY_IP\"} 2",
            "merbridge_edge_map_capacity{map=\"POD_BY_IP\"} 2048",
            "merbridge_edge_datapath_events_total{event=\"redirect_outbound\"} 7",
            "merbridge_edge_datapath_bytes_total{event=\"sk_msg\"} 99",
        ] {
            assert!(
                body.lines().any(|l| l == line),
                "missing {line:?} in\n{body}"
            );
        }
        assert_eq!(get(addr, "/nope").0, 404);
    }

    #[test]
    fn healthz_fails_while_the_heartbeat_is_stale_and_recovers_with_a_beat() {
        let metrics = Arc::new(Metrics::new(Duration::from_millis(300)));
        let addr = serve("127.0.0.1:0".parse().unwrap(), metrics.clone()).unwrap();
        metrics.beat();
        assert_eq!(get(addr, "/healthz"), (200, "ok\n".to_string()));
        // The loop stops beating: past the bound, /healthz says how long and the bound.
        std::thread::sleep(Duration::from_millis(450));
        let (status, body) = get(addr, "/healthz");
        assert_eq!(status, 503, "{body}");
        assert!(
            body.starts_with("not healthy: the main loop has not completed a pass for 0.")
                && body.ends_with("s (bound 0.3s)\n")
                && body.lines().count() == 1,
            "{body:?}"
        );
        // Readiness is not the heartbeat's business.
        metrics.update(|s| {
            s.attached = true;
            s.polls_ok = 1;
        });
        assert_eq!(get(addr, "/readyz").0, 200);
        // A fresh beat: healthy again at once.
        metrics.beat();
        assert_eq!(get(addr, "/healthz").0, 200);
        assert!(metrics.heartbeat().since_last() < Duration::from_millis(300));
    }

    #[test]
    fn every_family_has_help_and_type_and_valid_samples() {
        let text = render(&Snapshot::default());
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap();
                assert!(text.contains(&format!("# HELP {name} ")), "{name}");
            } else if !line.starts_with('#') {
                let (name, value) = line.rsplit_once(' ').unwrap();
                assert!(name.starts_with("merbridge_edge_"), "{line}");
                value.parse::<f64>().unwrap_or_else(|_| panic!("{line}"));
            }
        }
    }
}
