//! The checks, in order, mirroring testbed/tests/datapath.rs and inbound.rs: the
//! probes pass the verifier, the agent attaches and programs the pods, outbound
//! redirect and inbound capture at the receiving pod with SO_ORIGINAL_DST, exclusions
//! (outbound at the client's sidecar, inbound at the server's), a plain pod, a host
//! process and another node captured inbound only, refused while a sidecar is down, an
//! empty bypass ledger, sk_msg moves data intact, and after SIGTERM nothing stays
//! attached.
use std::{
    collections::BTreeMap,
    fs,
    net::Ipv4Addr,
    path::Path,
    process::Child,
    time::{Duration, Instant},
};

use merbridge_edge_qemu_tests::protocol;

use crate::{
    agent::{self, Agent},
    bpf,
    pods::{self, GATEWAY, NETNS_DIR, Node, REMOTE_IP},
    sys,
};

/// uid of the app stand-ins.
const APP_UID: u32 = 1000;
/// uid of the sidecar stand-ins (Istio's proxy uid).
const PROXY_UID: u32 = 1337;
const CGROUP_ROOT: &str = "/sys/fs/cgroup/mbe-node";
/// The other node's cgroup: outside [`CGROUP_ROOT`], so no hook of the agent runs for
/// its processes.
const REMOTE_CGROUP: &str = "/sys/fs/cgroup/mbe-remote";
/// Every app echoes on these ports.
const APP_PORTS: [&str; 3] = ["8080", "9002", "9003"];
/// a's `excludeOutboundPorts` (b captures it inbound).
const EXCLUDED_OUTBOUND: u16 = 9003;
/// b's `excludeInboundPorts`.
const EXCLUDED_INBOUND: u16 = 9002;
/// Connections at once from the other node.
const REMOTE_CONNS: usize = 20;
const PODS_FILE: &str = "/tmp/pods.json";
const AGENT_LOG: &str = "/tmp/agent.log";
/// Under TCG everything is 10–50x slower than on hardware.
const PATIENCE: Duration = Duration::from_secs(20);
/// The pods with a sidecar.
const MESHED: [&str; 2] = ["a", "b"];
/// A refused connection is answered at once; a dropped one would wait for the
/// client's 10 s connect timeout.
const REFUSED_WITHIN: Duration = Duration::from_secs(5);
const PROGRAMMED: &str = "merbridge_edge_pods{state=\"programmed\"}";
const NETNS_ATTACHED: &str = "merbridge_edge_netns_attached";
const LISTENERS: &str = "merbridge_edge_inbound_listeners";
const REDIRECT_INBOUND: &str = "merbridge_edge_datapath_events_total{event=\"redirect_inbound\"}";
const INBOUND_REFUSED: &str = "merbridge_edge_datapath_events_total{event=\"inbound_refused\"}";
const SK_MSG: &str = "merbridge_edge_datapath_bytes_total{event=\"sk_msg\"}";

/// Why a check failed: a summary, output lines, and any verifier log.
#[derive(Default)]
pub struct Failure {
    summary: String,
    details: Vec<String>,
    verifier: Vec<String>,
}

impl Failure {
    fn new(summary: impl Into<String>) -> Self {
        Self {
            summary: summary.into(),
            ..Self::default()
        }
    }

    fn details(mut self, text: &str) -> Self {
        self.details.extend(text.lines().map(String::from));
        self
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Self::new(format!("{e:#}"))
    }
}

/// Prints one result line per check and counts them.
#[derive(Default)]
pub struct Reporter {
    passed: usize,
    failed: usize,
}

impl Reporter {
    /// Prints the outcome of check `name`.
    pub fn record(&mut self, name: &str, outcome: Result<String, Failure>) -> bool {
        match outcome {
            Ok(summary) => {
                self.passed += 1;
                println!("{}", protocol::result_line(name, true, &summary));
                true
            }
            Err(f) => {
                self.failed += 1;
                println!("{}", protocol::result_line(name, false, &f.summary));
                for d in &f.details {
                    println!("{}", protocol::detail_line(name, d));
                }
                for v in &f.verifier {
                    println!("{}", protocol::verifier_line(v));
                }
                false
            }
        }
    }

    /// Prints the final `N passed, N failed` line.
    pub fn finish(&self) {
        println!("{}", protocol::summary_line(self.passed, self.failed));
    }
}

fn sidecar_log(pod: &str) -> Vec<String> {
    fs::read_to_string(sidecar_log_path(pod))
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

fn sidecar_log_path(pod: &str) -> String {
    format!("/tmp/sidecar-{pod}.log")
}

/// Waits until sidecar `pod` logged more than `before` lines (or the patience ends),
/// and returns the new ones.
fn new_sidecar_lines(pod: &str, before: usize, want: usize) -> Vec<String> {
    let end = Instant::now() + PATIENCE;
    loop {
        let lines = sidecar_log(pod);
        if lines.len() >= before + want || Instant::now() > end {
            return lines[before.min(lines.len())..].to_vec();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The app that greeted the client.
fn who(out: &str) -> &str {
    field(out, "who=")
}

/// Whom the app saw connecting (`peer=` of its greeting).
fn app_peer(out: &str) -> &str {
    field(out, "peer=")
}

fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.split_whitespace()
        .find_map(|p| p.strip_prefix(key))
        .unwrap_or("")
}

/// Whether the app got the connection from its sidecar's inbound passthrough
/// (127.0.0.6, like Envoy).
fn via_passthrough(out: &str) -> bool {
    app_peer(out).starts_with("127.0.0.6:")
}

/// Whether a sidecar log line is an inbound connection from `peer` with the original
/// destination `orig`.
fn inbound_from(line: &str, peer: Ipv4Addr, orig: &str) -> bool {
    let fields: Vec<&str> = line.split_whitespace().collect();
    fields.contains(&"listener=inbound")
        && fields.contains(&format!("orig={orig}").as_str())
        && field(line, "peer=").starts_with(&format!("{peer}:"))
}

/// The pods, the node and the apps: a, b meshed (Istio), c plain, each namespace
/// pinned under /var/run/netns; each app echoes on 8080, 9002 and 9003; a excludes
/// outbound port 9003, b inbound port 9002. Another node (not a pod: no pods file
/// entry, no namespace file) at 10.232.0.2. The sidecars start later, after the agent
/// (see [`start_sidecar`]).
fn setup() -> anyhow::Result<(Node, Vec<Child>)> {
    let modules = sys::load_modules(Path::new("/modules"))?;
    let mut node = Node::new(Path::new(CGROUP_ROOT))?;
    let istio = (
        "sidecar.istio.io/status",
        "{\"containers\":[\"istio-proxy\"]}",
    );
    node.add_pod(
        "a",
        &["app", "istio-proxy"],
        &[
            istio,
            (
                "traffic.sidecar.istio.io/excludeOutboundPorts",
                &EXCLUDED_OUTBOUND.to_string(),
            ),
        ],
    )?;
    node.add_pod(
        "b",
        &["app", "istio-proxy"],
        &[
            istio,
            (
                "traffic.sidecar.istio.io/excludeInboundPorts",
                &EXCLUDED_INBOUND.to_string(),
            ),
        ],
    )?;
    node.add_pod("c", &["app"], &[])?;
    node.add_remote(Path::new(REMOTE_CGROUP))?;
    let mut apps = vec![];
    for pod in ["a", "b", "c"] {
        let name = format!("{pod}-app");
        let mut args = vec![name.as_str()];
        args.extend(APP_PORTS);
        apps.push(node.start(pod, "app", APP_UID, "echo", &args, 8080)?);
    }
    for pod in MESHED {
        pods::shared_log(&sidecar_log_path(pod))?;
    }
    fs::write(PODS_FILE, serde_json::to_vec_pretty(&node.pod_list())?)?;
    println!(
        "mbe-vm-test: modules {modules:?}, pods a b c up, namespaces in {NETNS_DIR}, \
         another node at {REMOTE_IP}"
    );
    Ok((node, apps))
}

/// Starts the sidecar stand-in of `pod` (outbound 15001, inbound 15006) and waits
/// until it listens on 15006.
fn start_sidecar(node: &Node, pod: &str) -> anyhow::Result<Child> {
    let log = sidecar_log_path(pod);
    node.start(
        pod,
        "istio-proxy",
        PROXY_UID,
        "sidecar",
        &[pod, "15001", "15006", &log],
        15006,
    )
}

/// `merbridge-edge check --json`: every probe through this kernel's verifier.
fn verifier() -> Result<String, Failure> {
    let out = std::process::Command::new(agent::BINARY)
        .args(["check", "--json"])
        .output()
        .map_err(|e| Failure::new(format!("running {} check: {e}", agent::BINARY)))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let report: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        Failure::new(format!(
            "check --json printed no JSON ({e}), exit {}",
            out.status
        ))
        .details(&text)
        .details(&String::from_utf8_lossy(&out.stderr))
    })?;
    let items = report["items"].as_array().cloned().unwrap_or_default();
    let probes: Vec<&serde_json::Value> = items
        .iter()
        .filter(|i| {
            i["what"]
                .as_str()
                .is_some_and(|w| w.contains("passes the verifier"))
        })
        .collect();
    let rejected: Vec<String> = probes
        .iter()
        .filter(|i| i["ok"] != serde_json::Value::Bool(true))
        .map(|i| {
            format!(
                "{}: {}",
                i["what"].as_str().unwrap_or("?"),
                i["detail"].as_str().unwrap_or("")
            )
        })
        .collect();
    if probes.is_empty() || !rejected.is_empty() {
        let mut f = Failure::new(format!(
            "{} of {} probes rejected",
            rejected.len(),
            probes.len()
        ));
        f.verifier = rejected.clone();
        return Err(f
            .details(&rejected.join("\n"))
            .details(&String::from_utf8_lossy(&out.stderr)));
    }
    let missing: Vec<String> = items
        .iter()
        .filter(|i| i["ok"] != serde_json::Value::Bool(true))
        .map(|i| i["what"].as_str().unwrap_or("?").to_string())
        .collect();
    Ok(format!(
        "{} probes loaded; verdict {}{}",
        probes.len(),
        report["verdict"].as_str().unwrap_or("?"),
        if missing.is_empty() {
            String::new()
        } else {
            format!("; missing: {}", missing.join(", "))
        }
    ))
}

fn agent_failure(agent: &Agent, summary: String) -> Failure {
    let log = agent.log();
    let mut f = Failure::new(summary);
    f.verifier = agent::verifier_log(&log);
    let lines: Vec<&str> = log.lines().collect();
    f.details(&lines[lines.len().saturating_sub(60)..].join("\n"))
}

/// The client stand-in in `pod`'s app container.
fn client(node: &Node, pod: &str, target: &str, bytes: usize) -> Result<String, Failure> {
    node.client(pod, "app", APP_UID, target, bytes)
        .map_err(Failure::new)
}

/// The sidecars' log lengths now.
fn log_lengths() -> (usize, usize) {
    (sidecar_log("a").len(), sidecar_log("b").len())
}

/// The agent programs both meshed pods and puts sk_lookup in every pod namespace; then
/// the sidecars start (so their listeners are seen binding) and are registered.
fn agent_attaches(
    node: &Node,
    agent: &mut Agent,
    sidecars: &mut BTreeMap<&'static str, Child>,
) -> Result<String, Failure> {
    let started = Instant::now();
    agent
        .wait_metric(PROGRAMMED, 2.0, Duration::from_secs(90))
        .map_err(|e| agent_failure(agent, format!("{e:#}")))?;
    let programmed = started.elapsed();
    let (summary, total) = bpf::attached_summary(&node.cgroup_root)?;
    if total == 0 {
        return Err(Failure::new(format!(
            "nothing attached at {CGROUP_ROOT}: {summary}"
        )));
    }
    let pods = node.pods.len() as f64;
    agent
        .wait_metric(NETNS_ATTACHED, pods, PATIENCE)
        .map_err(|e| agent_failure(agent, format!("{e:#}")))?;
    let mut lookups = vec![];
    for p in &node.pods {
        lookups.push((p.name.as_str(), bpf::sk_lookup_count(&p.netns_file)?));
    }
    if lookups.iter().any(|&(_, n)| n != 1) {
        return Err(Failure::new(format!(
            "sk_lookup programs per pod namespace: {lookups:?}, want 1 each"
        )));
    }
    for pod in MESHED {
        sidecars.insert(pod, start_sidecar(node, pod)?);
    }
    let listeners = agent
        .wait_metric(LISTENERS, MESHED.len() as f64, PATIENCE)
        .map_err(|e| agent_failure(agent, format!("sidecars listening on 15006: {e:#}")))?;
    Ok(format!(
        "2 pods programmed in {:.1} s; attached: {summary}; sk_lookup in {} pod namespaces; \
         sidecars started after: {listeners} inbound listeners registered",
        programmed.as_secs_f64(),
        lookups.len()
    ))
}

/// a → b:8080 goes through sidecar a's outbound listener with SO_ORIGINAL_DST b:8080.
fn outbound_redirect(node: &Node) -> Result<String, Failure> {
    let b = node.pod("b").ip;
    let out = client(node, "a", &format!("{b}:8080"), 1024)?;
    let la = new_sidecar_lines("a", 0, 1);
    let want = format!("orig={b}:8080");
    if who(&out) != "b-app"
        || la.len() != 1
        || !la[0].contains("listener=outbound")
        || !la[0].contains(&want)
    {
        return Err(Failure::new(format!(
            "a → {b}:8080: expected b-app through sidecar a's outbound listener with {want}"
        ))
        .details(&out)
        .details(&format!("sidecar a: {la:?}")));
    }
    Ok(format!(
        "a → b:8080 via sidecar a, SO_ORIGINAL_DST {b}:8080"
    ))
}

/// Sidecar a's connection of the previous check kept b:8080 and was captured at b by
/// sidecar b's inbound listener, which forwarded it to b-app.
fn inbound_redirect(node: &Node) -> Result<String, Failure> {
    let (a, b) = (node.pod("a").ip, node.pod("b").ip);
    let orig = format!("{b}:8080");
    let lb = new_sidecar_lines("b", 0, 1);
    if lb.len() != 1 || !inbound_from(&lb[0], a, &orig) {
        return Err(Failure::new(format!(
            "sidecar b should have seen one inbound connection from sidecar a ({a}) with orig={orig}"
        ))
        .details(&format!("sidecar b: {lb:?}")));
    }
    Ok(format!(
        "sidecar a → b:8080 captured at b by sidecar b's inbound listener, SO_ORIGINAL_DST {orig}"
    ))
}

/// a → b:9003 (a's excludeOutboundPorts) skips sidecar a; b did not exclude it
/// inbound, so sidecar b captures it.
fn exclusion(node: &Node) -> Result<String, Failure> {
    let (a, b) = (node.pod("a").ip, node.pod("b").ip);
    let orig = format!("{b}:{EXCLUDED_OUTBOUND}");
    let (na, nb) = log_lengths();
    let out = client(node, "a", &orig, 1024)?;
    let lb = new_sidecar_lines("b", nb, 1);
    let la = sidecar_log("a");
    if who(&out) != "b-app"
        || !via_passthrough(&out)
        || la.len() != na
        || lb.len() != 1
        || !inbound_from(&lb[0], a, &orig)
    {
        return Err(Failure::new(format!(
            "a → b:{EXCLUDED_OUTBOUND} (a's excludeOutboundPorts) should skip sidecar a and \
             be captured by sidecar b from {a} with orig={orig}"
        ))
        .details(&out)
        .details(&format!(
            "sidecar a: {:?}\nsidecar b: {lb:?}",
            &la[na.min(la.len())..]
        )));
    }
    Ok(format!(
        "a → b:{EXCLUDED_OUTBOUND} (a's excluded outbound) skips sidecar a, captured by \
         sidecar b with orig {orig}"
    ))
}

/// c → b:9002 (b's excludeInboundPorts) reaches b-app directly, from c's address:
/// neither sidecar sees it, and it is no bypass (b's ledger stays 0); b:8080 next to
/// it is still captured.
fn excluded_inbound_port(node: &Node, agent: &mut Agent) -> Result<String, Failure> {
    let (b, c) = (node.pod("b").ip, node.pod("c").ip);
    let excluded = format!("{b}:{EXCLUDED_INBOUND}");
    let captured = format!("{b}:8080");
    let (na, nb) = log_lengths();
    let out = client(node, "c", &excluded, 1024)?;
    // Give a wrongly captured connection time to show in a sidecar's log.
    std::thread::sleep(Duration::from_millis(300));
    let (na1, nb1) = log_lengths();
    if who(&out) != "b-app"
        || !app_peer(&out).starts_with(&format!("{c}:"))
        || (na1, nb1) != (na, nb)
    {
        let (la, lb) = (sidecar_log("a"), sidecar_log("b"));
        return Err(Failure::new(format!(
            "c → b:{EXCLUDED_INBOUND} (b's excludeInboundPorts) should reach b-app directly \
             from {c}, neither sidecar logging it"
        ))
        .details(&out)
        .details(&format!(
            "sidecar a: {:?}\nsidecar b: {:?}",
            &la[na.min(la.len())..],
            &lb[nb.min(lb.len())..]
        )));
    }
    // The port next to it is still captured; once the agent has counted that one, the
    // same stats pass holds the excluded connection too.
    let out8080 = client(node, "c", &captured, 1024)?;
    let lb = new_sidecar_lines("b", nb, 1);
    if who(&out8080) != "b-app" || lb.len() != 1 || !inbound_from(&lb[0], c, &captured) {
        return Err(Failure::new(format!(
            "c → b:8080 next to the excluded port should still be captured with orig={captured}"
        ))
        .details(&out8080)
        .details(&format!("sidecar b: {lb:?}")));
    }
    let inbound = sidecar_log("b")
        .iter()
        .filter(|l| l.contains("listener=inbound"))
        .count();
    agent
        .wait_metric(REDIRECT_INBOUND, inbound as f64, PATIENCE)
        .map_err(|e| agent_failure(agent, format!("{e:#}")))?;
    let body = agent::metrics()?;
    let ledger = agent::metric(&body, &ledger_sample("b"));
    if ledger != Some(0.0) {
        return Err(Failure::new(format!(
            "bypass ledger of b after c → b:{EXCLUDED_INBOUND}: {ledger:?}, want 0 \
             (excluded ports are no bypass)"
        ))
        .details(&body));
    }
    Ok(format!(
        "c → b:{EXCLUDED_INBOUND} (b's excluded inbound) reaches b-app directly from {c}, \
         neither sidecar sees it, bypass ledger of b 0; b:8080 still captured"
    ))
}

/// Plain pod c and a host process are not redirected outbound, but their connections
/// to b:8080 are captured by sidecar b with orig b:8080; loopback in a is untouched.
fn inbound_capture(node: &Node) -> Result<String, Failure> {
    let (b, c) = (node.pod("b").ip, node.pod("c").ip);
    let orig = format!("{b}:8080");
    let (na, nb) = log_lengths();
    let out_c = client(node, "c", &orig, 1024)?;
    let out_host = node.host_client(&orig, 1024).map_err(Failure::new)?;
    let out_lo = client(node, "a", "127.0.0.1:8080", 1024)?;
    let lb = new_sidecar_lines("b", nb, 2);
    let la = sidecar_log("a");
    let ok = who(&out_c) == "b-app"
        && who(&out_host) == "b-app"
        && via_passthrough(&out_c)
        && via_passthrough(&out_host)
        && who(&out_lo) == "a-app"
        && app_peer(&out_lo).starts_with("127.0.0.1:")
        && la.len() == na
        && lb.len() == 2
        && inbound_from(&lb[0], c, &orig)
        && inbound_from(&lb[1], GATEWAY, &orig);
    if !ok {
        return Err(Failure::new(format!(
            "c ({c}) and a host process ({GATEWAY}) → b:8080 should skip sidecar a and be \
             captured by sidecar b with orig={orig}; a → 127.0.0.1:8080 should reach a-app directly"
        ))
        .details(&out_c)
        .details(&out_host)
        .details(&out_lo)
        .details(&format!(
            "sidecar a: {:?}\nsidecar b: {lb:?}",
            &la[na.min(la.len())..]
        )));
    }
    Ok(format!(
        "plain c ({c}) and host ({GATEWAY}, root netns and cgroup) → b:8080 not redirected, \
         captured by sidecar b with orig {orig}; a → 127.0.0.1:8080 direct"
    ))
}

/// Another node (its own namespace and cgroup, outside the agent's cgroup root, in no
/// pods file) → b:8080 lands on sidecar b's inbound listener with orig b:8080, b-app
/// answers via the passthrough, sidecar a sees nothing; then 20 connections at once,
/// every one on sidecar b.
fn inbound_from_another_node(node: &Node) -> Result<String, Failure> {
    let b = node.pod("b").ip;
    let remote = node
        .remote
        .as_ref()
        .ok_or_else(|| Failure::new("the other node was not set up"))?
        .ip;
    let orig = format!("{b}:8080");
    let (na, nb) = log_lengths();
    let out = node.remote_client(&orig, 1024, 1).map_err(Failure::new)?;
    let lb = new_sidecar_lines("b", nb, 1);
    let la = sidecar_log("a");
    if who(&out) != "b-app"
        || !via_passthrough(&out)
        || !out.contains("ok conns=1")
        || la.len() != na
        || lb.len() != 1
        || !inbound_from(&lb[0], remote, &orig)
    {
        return Err(Failure::new(format!(
            "another node ({remote}) → b:8080 should be captured by sidecar b with \
             orig={orig}, sidecar a seeing nothing"
        ))
        .details(&out)
        .details(&format!(
            "sidecar a: {:?}\nsidecar b: {lb:?}",
            &la[na.min(la.len())..]
        )));
    }
    let nb = nb + 1;
    let out = node
        .remote_client(&orig, 1024, REMOTE_CONNS)
        .map_err(Failure::new)?;
    let lb = new_sidecar_lines("b", nb, REMOTE_CONNS);
    let la = sidecar_log("a");
    let greetings: Vec<&str> = out.lines().filter(|l| l.starts_with("hello ")).collect();
    let ok = out.contains(&format!("ok conns={REMOTE_CONNS}"))
        && greetings.len() == REMOTE_CONNS
        && greetings
            .iter()
            .all(|g| who(g) == "b-app" && via_passthrough(g))
        && la.len() == na
        && lb.len() == REMOTE_CONNS
        && lb.iter().all(|l| inbound_from(l, remote, &orig));
    if !ok {
        return Err(Failure::new(format!(
            "{REMOTE_CONNS} connections at once from another node ({remote}) → b:8080 \
             should all be captured by sidecar b with orig={orig}"
        ))
        .details(&out)
        .details(&format!(
            "sidecar a: {:?}\nsidecar b: {lb:?}",
            &la[na.min(la.len())..]
        )));
    }
    Ok(format!(
        "another node ({remote}, own netns, cgroup {REMOTE_CGROUP}) → b:8080 captured by \
         sidecar b with orig {orig}, b-app answered via passthrough, sidecar a saw nothing; \
         {REMOTE_CONNS} at once: all on sidecar b"
    ))
}

/// 1 MiB a → b echoed byte for byte, with sk_msg moving the bytes of the local legs.
fn sk_msg_intact(node: &Node, agent: &mut Agent) -> Result<String, Failure> {
    let b = node.pod("b").ip;
    let before = agent::metrics()
        .ok()
        .and_then(|m| agent::metric(&m, SK_MSG))
        .unwrap_or(0.0);
    let mib = 1 << 20;
    let out = client(node, "a", &format!("{b}:8080"), mib)?;
    if !out.contains(&format!("ok bytes={mib}")) || who(&out) != "b-app" {
        return Err(Failure::new("1 MiB a → b did not come back intact").details(&out));
    }
    // 1 MiB each way over at least two accelerated legs: app a ↔ sidecar a and
    // sidecar a ↔ sidecar b (sidecar b ↔ app b, its own pod, is a third).
    let want = before + (4 * mib) as f64;
    agent
        .wait_metric(SK_MSG, want, PATIENCE)
        .map_err(|e| Failure::new(format!("{e:#}")))?;
    // A moment for a third leg's bytes to be counted too.
    std::thread::sleep(Duration::from_millis(500));
    let after = agent::metrics()
        .ok()
        .and_then(|m| agent::metric(&m, SK_MSG))
        .unwrap_or(want);
    Ok(format!(
        "1 MiB echoed intact; sk_msg moved {} bytes ({:.1} MiB)",
        after - before,
        (after - before) / mib as f64
    ))
}

/// Sidecar b killed: c → b:8080 is refused at once (never the app); sidecar b
/// restarted: captured again.
fn inbound_refused(
    node: &Node,
    agent: &mut Agent,
    sidecars: &mut BTreeMap<&'static str, Child>,
) -> Result<String, Failure> {
    let (b, c) = (node.pod("b").ip, node.pod("c").ip);
    let orig = format!("{b}:8080");
    let refused_before = agent::metrics()
        .ok()
        .and_then(|m| agent::metric(&m, INBOUND_REFUSED))
        .unwrap_or(0.0);
    let mut sidecar = sidecars
        .remove("b")
        .ok_or_else(|| Failure::new("sidecar b is not running"))?;
    sidecar
        .kill()
        .and_then(|_| sidecar.wait())
        .map_err(|e| Failure::new(format!("killing sidecar b: {e}")))?;
    let t = Instant::now();
    let err = match client(node, "c", &orig, 1024) {
        Ok(out) => {
            return Err(Failure::new(format!(
                "with sidecar b down, c → b:8080 reached {}",
                who(&out)
            ))
            .details(&out));
        }
        Err(f) => f.summary,
    };
    let took = t.elapsed();
    if !err.contains("refused") || took > REFUSED_WITHIN {
        return Err(Failure::new(format!(
            "with sidecar b down, c → b:8080 should be refused within {REFUSED_WITHIN:?}; \
             failed after {took:.2?}"
        ))
        .details(&err));
    }
    let refused = agent
        .wait_metric(INBOUND_REFUSED, refused_before + 1.0, PATIENCE)
        .map_err(|e| agent_failure(agent, format!("{e:#}")))?;
    let nb = sidecar_log("b").len();
    sidecars.insert("b", start_sidecar(node, "b")?);
    let out = client(node, "c", &orig, 1024)?;
    let lb = new_sidecar_lines("b", nb, 1);
    if who(&out) != "b-app" || lb.len() != 1 || !inbound_from(&lb[0], c, &orig) {
        return Err(Failure::new(format!(
            "sidecar b restarted: c → b:8080 should be captured again with orig={orig}"
        ))
        .details(&out)
        .details(&format!("sidecar b: {lb:?}")));
    }
    Ok(format!(
        "sidecar b killed: c → b:8080 refused in {:.2} s (inbound_refused {}); restarted: \
         captured again with orig {orig}",
        took.as_secs_f64(),
        refused - refused_before
    ))
}

/// No inbound connection reached a meshed pod's app without its sidecar.
fn bypass_ledger(agent: &mut Agent) -> Result<String, Failure> {
    // Every connection sidecar b accepted inbound was counted by sk_lookup: once the
    // published counter has them all, the ledger of the same pass is complete too.
    let captured = sidecar_log("b")
        .iter()
        .filter(|l| l.contains("listener=inbound"))
        .count();
    let counted = agent
        .wait_metric(REDIRECT_INBOUND, captured as f64, PATIENCE)
        .map_err(|e| agent_failure(agent, format!("{e:#}")))?;
    let body = agent::metrics()?;
    let ledger = |pod: &str| agent::metric(&body, &ledger_sample(pod));
    let (a, b) = (ledger("a"), ledger("b"));
    if a != Some(0.0) || b != Some(0.0) {
        return Err(
            Failure::new(format!("bypass ledger: a {a:?}, b {b:?}, want 0 each")).details(&body),
        );
    }
    Ok(format!(
        "merbridge_edge_inbound_bypassed_total 0 for a and b; {counted} connections captured inbound"
    ))
}

/// The bypass ledger's sample of `pod`.
fn ledger_sample(pod: &str) -> String {
    format!("merbridge_edge_inbound_bypassed_total{{pod=\"default/{pod}\"}}")
}

/// SIGTERM: exit 0, no mb_* program left, nothing attached to the cgroup or the pod
/// namespaces; a → b goes direct again.
fn agent_stops_clean(node: &Node, agent: &mut Agent) -> Result<String, Failure> {
    let (a, b) = (node.pod("a").ip, node.pod("b").ip);
    let status = agent.terminate(PATIENCE)?;
    if !status.success() {
        return Err(agent_failure(
            agent,
            format!("the agent exited with {status} on SIGTERM"),
        ));
    }
    // Links are released as the agent's files close; allow the kernel a moment.
    let end = Instant::now() + PATIENCE;
    let names = loop {
        let names = bpf::loaded_program_names()?;
        let ours: Vec<&String> = names.iter().filter(|n| n.starts_with("mb_")).collect();
        let (summary, total) = bpf::attached_summary(&node.cgroup_root)?;
        let mut lookups = vec![];
        for p in &node.pods {
            lookups.push((p.name.as_str(), bpf::sk_lookup_count(&p.netns_file)?));
        }
        let lookup_total: u32 = lookups.iter().map(|&(_, n)| n).sum();
        if ours.is_empty() && total == 0 && lookup_total == 0 {
            break names;
        }
        if Instant::now() > end {
            return Err(Failure::new(format!(
                "left behind: programs {ours:?}; attached {summary}; sk_lookup {lookups:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (na, nb) = log_lengths();
    let out = client(node, "a", &format!("{b}:8080"), 1024)?;
    std::thread::sleep(Duration::from_millis(300));
    if who(&out) != "b-app"
        || !app_peer(&out).starts_with(&format!("{a}:"))
        || log_lengths() != (na, nb)
    {
        return Err(
            Failure::new("after the agent stopped, a → b should go direct (no sidecar)")
                .details(&out),
        );
    }
    Ok(format!(
        "exit 0; no mb_* program loaded ({} others), nothing attached to the cgroup or the \
         pod namespaces; a → b direct again",
        names.len()
    ))
}

/// Runs every check, printing one line each.
pub fn run(r: &mut Reporter) {
    let (node, _apps) = match setup() {
        Ok(x) => x,
        Err(e) => {
            r.record("setup", Err(Failure::from(e)));
            return;
        }
    };
    r.record(
        "setup",
        Ok(format!(
            "3 pods (2 meshed), namespaces pinned in {NETNS_DIR}, apps listening, \
             another node at {REMOTE_IP}"
        )),
    );
    r.record("verifier", verifier());

    let mut agent = match Agent::start(
        Path::new(PODS_FILE),
        &node.cgroup_root,
        Path::new(NETNS_DIR),
        Path::new(AGENT_LOG),
    ) {
        Ok(x) => x,
        Err(e) => {
            r.record("agent-attaches", Err(e.into()));
            return;
        }
    };
    let mut sidecars = BTreeMap::new();
    if !r.record(
        "agent-attaches",
        agent_attaches(&node, &mut agent, &mut sidecars),
    ) {
        return;
    }
    r.record("outbound-redirect", outbound_redirect(&node));
    r.record("inbound-redirect", inbound_redirect(&node));
    r.record("exclusion", exclusion(&node));
    r.record(
        "excluded-inbound-port",
        excluded_inbound_port(&node, &mut agent),
    );
    r.record("inbound-capture", inbound_capture(&node));
    r.record(
        "inbound-from-another-node",
        inbound_from_another_node(&node),
    );
    r.record("sk-msg-intact", sk_msg_intact(&node, &mut agent));
    r.record(
        "inbound-refused-when-sidecar-down",
        inbound_refused(&node, &mut agent, &mut sidecars),
    );
    r.record("inbound-bypass-ledger", bypass_ledger(&mut agent));
    r.record("agent-stops-clean", agent_stops_clean(&node, &mut agent));
}
