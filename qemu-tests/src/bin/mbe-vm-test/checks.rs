//! The checks, in order, mirroring testbed/tests/datapath.rs, inbound.rs, meshes.rs and
//! faults.rs: the probes pass the verifier, the agent attaches and programs the pods,
//! outbound redirect and inbound capture at the receiving pod with SO_ORIGINAL_DST,
//! exclusions (outbound at the client's sidecar, inbound at the server's), a plain pod,
//! a host process and another node captured inbound only, the same over IPv6, sk_msg
//! moves data intact, refused while a sidecar is down, Linkerd, Kuma and OSM pods end to
//! end, an empty bypass ledger, a stream in flight intact across SIGKILL of the agent
//! (and a new agent taking over), and after SIGTERM nothing stays attached.
use std::{
    collections::BTreeMap,
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use merbridge_edge_qemu_tests::protocol;

use crate::{
    agent::{self, Agent},
    bpf,
    pods::{self, GATEWAY, NETNS_DIR, Node, REMOTE_IP, Ready, Sidecar, simple_template},
    probe_log, sys,
};

/// uid of the app stand-ins.
const APP_UID: u32 = 1000;
/// Istio's sidecar, as its injector and Envoy run it (uid 1337, listeners on every
/// address).
const ISTIO: Sidecar = Sidecar {
    mesh: "istio",
    container: "istio-proxy",
    uid: 1337,
    outbound: "[::]:15001",
    inbound: "[::]:15006",
};
/// Linkerd's proxy (charts/partials/templates/_proxy.tpl's defaults): uid 2102,
/// outbound on 127.0.0.1:4140 only, inbound on 4143.
const LINKERD: Sidecar = Sidecar {
    mesh: "linkerd",
    container: "linkerd-proxy",
    uid: 2102,
    outbound: "127.0.0.1:4140",
    inbound: "[::]:4143",
};
/// Kuma's sidecar: uid 5678, 15001 and 15006.
const KUMA: Sidecar = Sidecar {
    mesh: "kuma",
    container: "kuma-sidecar",
    uid: 5678,
    outbound: "0.0.0.0:15001",
    inbound: "0.0.0.0:15006",
};
/// OSM's Envoy: uid 1500, 15001 and 15003.
const OSM: Sidecar = Sidecar {
    mesh: "osm",
    container: "envoy",
    uid: 1500,
    outbound: "0.0.0.0:15001",
    inbound: "0.0.0.0:15003",
};
/// The pods of the other meshes, two of each (client, server).
const MESH_PODS: [(&str, &str, Sidecar); 3] =
    [("l1", "l2", LINKERD), ("k1", "k2", KUMA), ("o1", "o2", OSM)];
/// A Linkerd pod as Linkerd's injector writes it (linkerd2 edge-26.8.3, linkerd-proxy a
/// native sidecar, linkerd-init's arguments), from the injected-pod fixtures.
const LINKERD_POD: &str = "web-2e3f4a5b6-s5t6u";
const INJECTED_PODS: &str = include_str!("../../../../testbed/fixtures/injected-pods.json");
/// The stream in flight when the agent is killed: 8 MiB in 64 KiB writes 25 ms apart
/// (about 3 s open).
const SIGKILL_STREAM: usize = 8 << 20;
const SIGKILL_CHUNK: usize = 64 << 10;
const SIGKILL_PAUSE_MS: u64 = 25;
/// A bulk stream through both sidecars, written as fast as it goes. 8 MiB: larger
/// ones are cut in these small VMs (sk_msg's redirect ignores the receiver's buffer;
/// README "Known limits").
const BULK_STREAM: usize = 8 << 20;
/// Where a restarted agent logs.
const AGENT2_LOG: &str = "/tmp/agent-2.log";
/// The agents' sockhash pins.
const PIN_DIR: &str = "/sys/fs/bpf/merbridge-edge";
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
/// The Istio pods.
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
/// `merbridge-edge check`'s verdict on this kernel, once the verifier check ran.
static VERDICT: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Whether check's verdict has sk_msg acceleration on (the agent turns it off by
/// itself where check says it must be off).
fn accelerated() -> bool {
    matches!(
        VERDICT.get().map(String::as_str),
        Some("full" | "without_inbound_capture")
    )
}

const DNS_REDIRECTED: &str = "merbridge_edge_datapath_events_total{event=\"dns_redirected\"}";
/// Pod e's switch for Istio DNS capture (the proxy metadata in its ProxyConfig
/// annotation, as the testbed's DNS test writes it).
const DNS_CAPTURE_CONFIG: &str = "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n";

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

/// Whom the app saw connecting (`peer=` of its greeting), IPv4-mapped addresses
/// written as IPv4.
fn app_peer(out: &str) -> String {
    unmapped(field(out, "peer="))
}

/// `[::ffff:a.b.c.d]:p` as `a.b.c.d:p`; anything else unchanged.
fn unmapped(addr: &str) -> String {
    match addr.parse::<std::net::SocketAddr>() {
        Ok(a) => merbridge_edge_standins::canonical(a).to_string(),
        Err(_) => addr.to_string(),
    }
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
/// destination `orig`, accepted on `orig` itself (captured without NAT).
fn inbound_from(line: &str, peer: impl Into<IpAddr>, orig: &str) -> bool {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let peer = peer.into();
    let peer_ok = unmapped(field(line, "peer="))
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|a| a.ip() == peer);
    fields.contains(&"listener=inbound")
        && fields.contains(&format!("orig={orig}").as_str())
        && unmapped(field(line, "local=")) == orig
        && peer_ok
}

/// Whether a sidecar log line is an outbound connection with the original destination
/// `orig`, accepted at `local` from a peer starting with `peer`.
fn outbound_at(line: &str, local: &str, peer: &str, orig: &str) -> bool {
    let fields: Vec<&str> = line.split_whitespace().collect();
    fields.contains(&"listener=outbound")
        && fields.contains(&format!("orig={orig}").as_str())
        && unmapped(field(line, "local=")) == local
        && unmapped(field(line, "peer=")).starts_with(peer)
}

/// The pods, the node and the apps: a, b meshed (Istio), c plain, l1 and l2 (Linkerd,
/// as its injector writes them), k1 and k2 (Kuma), o1 and o2 (OSM), e (Istio with DNS
/// capture on; a DNS server stand-in in c, e's DNS proxy stand-ins), each namespace
/// pinned under /var/run/netns; each app echoes on 8080, 9002 and 9003 (IPv4 and IPv6);
/// a excludes outbound port 9003, b inbound port 9002. Another node (not a pod: no pods
/// file entry, no namespace file) at 10.232.0.2. The sidecars start later, after the
/// agent (see [`start_sidecar`]).
fn setup() -> anyhow::Result<(Node, Vec<Child>)> {
    let modules = sys::load_modules(Path::new("/modules"))?;
    let mut node = Node::new(Path::new(CGROUP_ROOT))?;
    let istio = (
        "sidecar.istio.io/status",
        "{\"containers\":[\"istio-proxy\"]}",
    );
    let excluded_out = EXCLUDED_OUTBOUND.to_string();
    let a = simple_template(
        &["app", "istio-proxy"],
        &[
            istio,
            (
                "traffic.sidecar.istio.io/excludeOutboundPorts",
                &excluded_out,
            ),
        ],
    );
    node.add_pod("a", a, Some(ISTIO))?;
    let excluded_in = EXCLUDED_INBOUND.to_string();
    let b = simple_template(
        &["app", "istio-proxy"],
        &[
            istio,
            ("traffic.sidecar.istio.io/excludeInboundPorts", &excluded_in),
        ],
    );
    node.add_pod("b", b, Some(ISTIO))?;
    node.add_pod("c", simple_template(&["app"], &[]), None)?;
    let linkerd = linkerd_template()?;
    for (from, to, sidecar) in MESH_PODS {
        for pod in [from, to] {
            let template = match sidecar.mesh {
                "linkerd" => linkerd.clone(),
                "kuma" => kuma_template(),
                _ => osm_template(pod),
            };
            node.add_pod(pod, template, Some(sidecar))?;
        }
    }
    let e = simple_template(
        &["app", "istio-proxy"],
        &[istio, ("proxy.istio.io/config", DNS_CAPTURE_CONFIG)],
    );
    node.add_pod("e", e, Some(ISTIO))?;
    node.add_remote(Path::new(REMOTE_CGROUP))?;
    let mut apps = vec![];
    // DNS: a server in c (as root: port 53), e's proxy on 15053 (IPv4 and IPv6
    // loopback, as Istio's agent listens).
    apps.push(node.start(
        "c",
        "app",
        0,
        "udp-echo",
        &["c-dns", "[::]:53"],
        Ready::Bound(53),
    )?);
    for (name, addr) in [
        ("e-dns-proxy", "127.0.0.1:15053"),
        ("e-dns-proxy6", "[::1]:15053"),
    ] {
        apps.push(node.start(
            "e",
            ISTIO.container,
            ISTIO.uid,
            "udp-echo",
            &[name, addr],
            Ready::Bound(15053),
        )?);
    }
    let names: Vec<String> = node.pods.iter().map(|p| p.name.clone()).collect();
    for pod in &names {
        let name = format!("{pod}-app");
        let mut args = vec![name.as_str()];
        args.extend(APP_PORTS);
        let container = app_container(&node, pod);
        apps.push(node.start(
            pod,
            &container,
            APP_UID,
            "echo",
            &args,
            Ready::Listening(8080),
        )?);
        if node.pod(pod).sidecar.is_some() {
            pods::shared_log(&sidecar_log_path(pod))?;
        }
    }
    fs::write(PODS_FILE, serde_json::to_vec_pretty(&node.pod_list())?)?;
    println!(
        "mbe-vm-test: modules {modules:?}, pods {} up, namespaces in {NETNS_DIR}, \
         another node at {REMOTE_IP}",
        names.join(" ")
    );
    Ok((node, apps))
}

/// The Linkerd pod of the injected-pod fixtures: its annotations, labels, init
/// containers (linkerd-init, linkerd-proxy as a native sidecar) and containers.
fn linkerd_template() -> anyhow::Result<serde_json::Value> {
    let list: serde_json::Value = serde_json::from_str(INJECTED_PODS)?;
    let pod = list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["metadata"]["name"] == LINKERD_POD)
        .ok_or_else(|| anyhow::anyhow!("no pod {LINKERD_POD} in the injected-pod fixtures"))?;
    Ok(serde_json::json!({"metadata": pod["metadata"], "spec": pod["spec"]}))
}

/// A Kuma pod as Kuma's injector marks it: the `kuma-sidecar` container as uid 5678
/// and the injector's annotations (sidecar uid, transparent-proxying ports).
fn kuma_template() -> serde_json::Value {
    serde_json::json!({
        "metadata": {
            "annotations": {
                "kuma.io/mesh": "default",
                "kuma.io/sidecar-injected": "true",
                "kuma.io/sidecar-uid": "5678",
                "kuma.io/transparent-proxying": "enabled",
                "kuma.io/transparent-proxying-inbound-port": "15006",
                "kuma.io/transparent-proxying-outbound-port": "15001"
            },
            "labels": {"app": "kuma-demo"}
        },
        "spec": {"containers": [
            {"name": "app", "image": "example/app:1"},
            {"name": "kuma-sidecar", "image": "kumahq/kuma-dp:2.9.0",
             "securityContext": {"runAsUser": 5678, "runAsGroup": 5678}}
        ]}
    })
}

/// An OSM pod as OSM's injector marks it: the `osm-proxy-uuid` label and the `envoy`
/// container as uid 1500.
fn osm_template(pod: &str) -> serde_json::Value {
    serde_json::json!({
        "metadata": {
            "labels": {
                "app": "osm-demo",
                "osm-proxy-uuid": format!("8fd6b6c9-5a80-4d5b-8a3c-1e0f3c7a9b2{}", &pod[1..])
            }
        },
        "spec": {"containers": [
            {"name": "app", "image": "example/app:1"},
            {"name": "envoy", "image": "envoyproxy/envoy:v1.27.0",
             "securityContext": {"runAsUser": 1500}}
        ]}
    })
}

/// The app container of `pod`: its first container that is not its sidecar.
fn app_container(node: &Node, pod: &str) -> String {
    let p = node.pod(pod);
    p.template["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .find(|c| p.sidecar.as_ref().is_none_or(|s| s.container != *c))
        .unwrap_or("app")
        .to_string()
}

/// Starts the sidecar stand-in of `pod` (its mesh's container, uid and listener
/// addresses) and waits until it listens inbound.
fn start_sidecar(node: &Node, pod: &str) -> anyhow::Result<Child> {
    let log = sidecar_log_path(pod);
    let s = node
        .pod(pod)
        .sidecar
        .ok_or_else(|| anyhow::anyhow!("pod {pod} has no sidecar"))?;
    node.start(
        pod,
        s.container,
        s.uid,
        "sidecar",
        &[pod, s.outbound, s.inbound, &log],
        Ready::Listening(Sidecar::port(s.inbound)),
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
    // A probe the kernel cannot run is fine when check says why and what it costs: it
    // is not needed for redirection, and a missing helper of the same impact names the
    // cause (on 5.10 the namespace-checking sockops, without bpf_get_netns_cookie there,
    // while the agent runs the compatible one with acceleration off).
    let explained = |i: &serde_json::Value| {
        i["impact"] != "fatal"
            && items.iter().any(|h| {
                h["ok"] == serde_json::Value::Bool(false)
                    && h["what"].as_str().is_some_and(|w| w.starts_with("helper "))
                    && h["impact"] == i["impact"]
            })
    };
    let rejected: Vec<String> = probes
        .iter()
        .filter(|i| i["ok"] != serde_json::Value::Bool(true) && !explained(i))
        .map(|i| {
            format!(
                "{}: {}",
                i["what"].as_str().unwrap_or("?"),
                i["detail"].as_str().unwrap_or("")
            )
        })
        .collect();
    if probes.is_empty() || !rejected.is_empty() {
        let others: Vec<&str> = items
            .iter()
            .filter(|i| {
                i["ok"] != serde_json::Value::Bool(true)
                    && !i["what"]
                        .as_str()
                        .is_some_and(|w| w.contains("passes the verifier"))
            })
            .filter_map(|i| i["what"].as_str())
            .collect();
        let mut f = Failure::new(format!(
            "{} of {} probes rejected; check's verdict {} (exit {}){}",
            rejected.len(),
            probes.len(),
            report["verdict"].as_str().unwrap_or("?"),
            out.status.code().unwrap_or(-1),
            if others.is_empty() {
                String::new()
            } else {
                format!("; also failing: {}", others.join(", "))
            }
        ));
        f.verifier = rejected.clone();
        // The agent gives one line per rejection; the whole verifier log of each.
        for item in probes
            .iter()
            .filter(|i| i["ok"] != serde_json::Value::Bool(true))
        {
            let what = item["what"].as_str().unwrap_or("");
            let Some(name) = what.split_whitespace().nth(1) else {
                continue;
            };
            match probe_log::verifier_log(Path::new(agent::BINARY), name) {
                Ok(lines) => f.verifier.extend(lines),
                Err(e) => f
                    .verifier
                    .push(format!("{name}: no full verifier log: {e:#}")),
            }
        }
        return Err(f
            .details(&rejected.join("\n"))
            .details(&String::from_utf8_lossy(&out.stderr)));
    }
    let missing: Vec<String> = items
        .iter()
        .filter(|i| i["ok"] != serde_json::Value::Bool(true))
        .map(|i| i["what"].as_str().unwrap_or("?").to_string())
        .collect();
    let verdict = report["verdict"].as_str().unwrap_or("?").to_string();
    let code = out.status.code().unwrap_or(-1);
    // check's exit status says the same as its verdict.
    let want_code = match verdict.as_str() {
        "full" => 0,
        "without_inbound_capture" => 4,
        "without_acceleration" => 3,
        _ => 1,
    };
    if code != want_code {
        return Err(Failure::new(format!(
            "check's verdict {verdict} but exit {code} (want {want_code})"
        ))
        .details(&text));
    }
    let _ = VERDICT.set(verdict);
    Ok(format!(
        "{} probes loaded; verdict {} (exit {code}){}",
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
    node.client(pod, &app_container(node, pod), APP_UID, target, bytes)
        .map_err(Failure::new)
}

/// The pods with a sidecar.
fn meshed_pods(node: &Node) -> Vec<&str> {
    node.pods
        .iter()
        .filter(|p| p.sidecar.is_some())
        .map(|p| p.name.as_str())
        .collect()
}

/// The sidecars' log lengths now.
fn log_lengths() -> (usize, usize) {
    (sidecar_log("a").len(), sidecar_log("b").len())
}

/// The agent programs every meshed pod and puts sk_lookup in every pod namespace; then
/// the Istio sidecars start (so their listeners are seen binding) and are registered
/// (the other meshes' sidecars start in their own checks).
fn agent_attaches(
    node: &Node,
    agent: &mut Agent,
    sidecars: &mut BTreeMap<&'static str, Child>,
) -> Result<String, Failure> {
    let started = Instant::now();
    let meshed = meshed_pods(node).len();
    agent
        .wait_metric(PROGRAMMED, meshed as f64, Duration::from_secs(90))
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
        "{meshed} pods programmed in {:.1} s; attached: {summary}; sk_lookup in {} pod \
         namespaces; Istio sidecars started after: {listeners} inbound listeners registered",
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
    if !accelerated() {
        // check said acceleration must be off: the agent runs without it.
        std::thread::sleep(Duration::from_millis(500));
        let after = agent::metrics()
            .ok()
            .and_then(|m| agent::metric(&m, SK_MSG))
            .unwrap_or(0.0);
        if after != before {
            return Err(Failure::new(format!(
                "check's verdict is {:?} (sk_msg acceleration off), yet sk_msg moved {} bytes",
                VERDICT.get(),
                after - before
            )));
        }
        if !agent.log().contains("sk_msg acceleration off") {
            return Err(agent_failure(
                agent,
                "check's verdict has acceleration off; the agent did not say it runs without it"
                    .into(),
            ));
        }
        return Ok(format!(
            "1 MiB echoed intact; check's verdict {:?}: the agent runs with sk_msg \
             acceleration off (says so) and sk_msg moved 0 bytes",
            VERDICT.get()
        ));
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

/// 8 MiB a → b written as fast as it goes, through both sidecars (sk_msg on the local
/// legs), echoed byte for byte.
fn sk_msg_bulk_stream(node: &Node) -> Result<String, Failure> {
    let b = node.pod("b").ip;
    let before = agent::metrics()
        .ok()
        .and_then(|m| agent::metric(&m, SK_MSG))
        .unwrap_or(0.0);
    let t = Instant::now();
    let out = client(node, "a", &format!("{b}:8080"), BULK_STREAM)?;
    let secs = t.elapsed().as_secs_f64();
    if !out.contains(&format!("ok bytes={BULK_STREAM}")) || who(&out) != "b-app" {
        return Err(Failure::new(format!(
            "{} MiB a → b did not come back intact",
            BULK_STREAM >> 20
        ))
        .details(&out));
    }
    let after = agent::metrics()
        .ok()
        .and_then(|m| agent::metric(&m, SK_MSG))
        .unwrap_or(before);
    Ok(format!(
        "{} MiB echoed intact in {secs:.1} s; sk_msg moved {:.1} MiB",
        BULK_STREAM >> 20,
        (after - before) / (1 << 20) as f64
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

/// IPv6: a → [b]:8080 through sidecar a's outbound listener with SO_ORIGINAL_DST
/// [b]:8080, captured at b by sidecar b's inbound listener on [b]:8080 itself; plain c
/// → [b]:8080 captured by sidecar b only.
fn ipv6(node: &Node) -> Result<String, Failure> {
    let (a, b, c) = (node.pod("a"), node.pod("b"), node.pod("c"));
    let orig = format!("[{}]:8080", b.ip6);
    let (na, nb) = log_lengths();
    let out = client(node, "a", &orig, 64 << 10)?;
    let la = new_sidecar_lines("a", na, 1);
    let lb = new_sidecar_lines("b", nb, 1);
    let want_local = format!("[{}]:15001", a.ip6);
    let ok = who(&out) == "b-app"
        && out.contains(&format!("ok bytes={}", 64 << 10))
        && la.len() == 1
        && outbound_at(&la[0], &want_local, &format!("[{}]:", a.ip6), &orig)
        && lb.len() == 1
        && inbound_from(&lb[0], a.ip6, &orig);
    if !ok {
        return Err(Failure::new(format!(
            "a → {orig}: expected b-app through sidecar a's outbound listener ({want_local}) \
             and sidecar b's inbound listener, orig={orig} on both"
        ))
        .details(&out)
        .details(&format!("sidecar a: {la:?}\nsidecar b: {lb:?}")));
    }
    let (na, nb) = log_lengths();
    let out_c = client(node, "c", &orig, 1024)?;
    let lb = new_sidecar_lines("b", nb, 1);
    std::thread::sleep(Duration::from_millis(300));
    let la = sidecar_log("a");
    if who(&out_c) != "b-app"
        || la.len() != na
        || lb.len() != 1
        || !inbound_from(&lb[0], c.ip6, &orig)
    {
        return Err(Failure::new(format!(
            "plain c ({}) → {orig} should be captured by sidecar b only",
            c.ip6
        ))
        .details(&out_c)
        .details(&format!("sidecar b: {lb:?}")));
    }
    Ok(format!(
        "a → {orig} via sidecar a ({want_local}, SO_ORIGINAL_DST {orig}) and captured by \
         sidecar b on {orig}; plain c ({}) → {orig} captured by sidecar b only",
        c.ip6
    ))
}

/// DNS capture: pod e (Istio, ISTIO_META_DNS_CAPTURE on) asking c's DNS server (IPv4
/// and IPv6, connected and unconnected UDP) gets e's DNS proxy's answer, from the
/// address it asked (the original destination restored on the reply); a (capture
/// off) gets c's server; e's proxy itself (uid 1337) gets c's server (no loop).
fn dns_capture(node: &Node, agent: &mut Agent) -> Result<String, Failure> {
    let c = node.pod("c");
    let before = agent::metrics()
        .ok()
        .and_then(|m| agent::metric(&m, DNS_REDIRECTED))
        .unwrap_or(0.0);
    let query = |pod: &str, container: &str, uid: u32, target: &str, connected: bool| {
        let mut args = vec![target];
        if connected {
            args.push("connected");
        }
        node.run(pod, container, uid, "udp-query", &args)
            .map(|o| o.trim().to_string())
            .unwrap_or_else(|e| e)
    };
    let (c4, c6) = (format!("{}:53", c.ip), format!("[{}]:53", c.ip6));
    let mut wrong = vec![];
    let mut asked = 0;
    for connected in [false, true] {
        for (pod, target, want) in [
            ("e", &c4, format!("reply=who=e-dns-proxy from={c4}")),
            ("e", &c6, format!("reply=who=e-dns-proxy6 from={c6}")),
            ("a", &c4, format!("reply=who=c-dns from={c4}")),
        ] {
            let got = query(pod, "app", APP_UID, target, connected);
            if got != want {
                wrong.push(format!(
                    "{pod} → {target} (connected={connected}): {got:?}, want {want:?}"
                ));
            }
            asked += usize::from(pod == "e");
        }
    }
    let own = query("e", ISTIO.container, ISTIO.uid, &c4, false);
    let want_own = format!("reply=who=c-dns from={c4}");
    if own != want_own {
        wrong.push(format!("e's proxy → {c4}: {own:?}, want {want_own:?}"));
    }
    if !wrong.is_empty() {
        return Err(Failure::new(wrong.join("; ")));
    }
    let redirected = agent
        .wait_metric(DNS_REDIRECTED, before + asked as f64, PATIENCE)
        .map_err(|e| agent_failure(agent, format!("{e:#}")))?;
    Ok(format!(
        "e → c:53 (IPv4 and IPv6, connected and not) answered by e's DNS proxy from the \
         address asked; a → c:53 and e's proxy → c:53 answered by c's server; \
         dns_redirected +{}",
        redirected - before
    ))
}

/// A mesh's pods end to end: both sidecars start (their listeners registered), `from`'s
/// app → `to`:8080 goes through `from`'s outbound listener (Linkerd: 127.0.0.1:4140
/// from a per-pod 127.128.0.0/10 source) with SO_ORIGINAL_DST `to`:8080, is captured at
/// `to` by its inbound listener on `to`:8080 itself, and reaches `to`'s app through the
/// passthrough with no further hop (each sidecar logs exactly one connection: no loop);
/// plain c → `to`:8080 is captured by `to`'s sidecar only.
fn mesh(
    node: &Node,
    agent: &mut Agent,
    sidecars: &mut BTreeMap<&'static str, Child>,
    (from, to, sidecar): (&'static str, &'static str, Sidecar),
) -> Result<String, Failure> {
    for pod in [from, to] {
        sidecars.insert(pod, start_sidecar(node, pod)?);
    }
    // Every running sidecar's inbound listener, these two included.
    let listeners = agent
        .wait_metric(LISTENERS, sidecars.len() as f64, PATIENCE)
        .map_err(|e| {
            agent_failure(
                agent,
                format!(
                    "{} sidecars listening on {}: {e:#}",
                    sidecar.mesh, sidecar.inbound
                ),
            )
        })?;
    let (pf, pt, c) = (node.pod(from), node.pod(to), node.pod("c").ip);
    let orig = format!("{}:8080", pt.ip);
    let (local, peer) = if sidecar.outbound.starts_with("127.0.0.1:") {
        (sidecar.outbound.to_string(), "127.128.".to_string())
    } else {
        (
            format!("{}:{}", pf.ip, Sidecar::port(sidecar.outbound)),
            format!("{}:", pf.ip),
        )
    };
    let (nf, nt) = (sidecar_log(from).len(), sidecar_log(to).len());
    let out = client(node, from, &orig, 64 << 10)?;
    let lf = new_sidecar_lines(from, nf, 1);
    let lt = new_sidecar_lines(to, nt, 1);
    // Give a looping connection time to show.
    std::thread::sleep(Duration::from_millis(300));
    let (lf_all, lt_all) = (sidecar_log(from), sidecar_log(to));
    let ok = who(&out) == format!("{to}-app")
        && via_passthrough(&out)
        && out.contains(&format!("ok bytes={}", 64 << 10))
        && lf.len() == 1
        && lf_all.len() == nf + 1
        && outbound_at(&lf[0], &local, &peer, &orig)
        && lt.len() == 1
        && lt_all.len() == nt + 1
        && inbound_from(&lt[0], pf.ip, &orig);
    if !ok {
        return Err(Failure::new(format!(
            "{} {from} → {orig}: expected {to}-app via {from}'s outbound listener ({local}, \
             peer {peer}…) and {to}'s inbound listener, orig={orig} on both, one line each",
            sidecar.mesh
        ))
        .details(&out)
        .details(&format!(
            "sidecar {from}: {:?}\nsidecar {to}: {:?}",
            &lf_all[nf.min(lf_all.len())..],
            &lt_all[nt.min(lt_all.len())..]
        )));
    }
    let nf = lf_all.len();
    let nt = lt_all.len();
    let out_c = client(node, "c", &orig, 1024)?;
    let lt = new_sidecar_lines(to, nt, 1);
    std::thread::sleep(Duration::from_millis(300));
    let lf_all = sidecar_log(from);
    if who(&out_c) != format!("{to}-app")
        || !via_passthrough(&out_c)
        || lf_all.len() != nf
        || lt.len() != 1
        || !inbound_from(&lt[0], c, &orig)
    {
        return Err(Failure::new(format!(
            "plain c ({c}) → {orig} should be captured by {to}'s {} sidecar only",
            sidecar.mesh
        ))
        .details(&out_c)
        .details(&format!("sidecar {to}: {lt:?}")));
    }
    Ok(format!(
        "uid {}, {listeners} listeners registered; {from} → {to}:8080 via {from}'s outbound \
         listener ({local}, peer {peer}…) with SO_ORIGINAL_DST {orig}, captured by {to}'s \
         inbound listener ({}) on {orig}, {to}-app via passthrough, one hop each (no loop); \
         plain c captured by {to}'s sidecar only",
        sidecar.uid, sidecar.inbound
    ))
}

/// The sockhash pins of the agents.
fn sockhash_pins() -> Vec<PathBuf> {
    let mut pins: Vec<PathBuf> = fs::read_dir(PIN_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains("/sockhash-"))
        .collect();
    pins.sort();
    pins
}

/// Waits until nothing of the agent is attached to the node cgroup or a pod namespace.
fn wait_detached(node: &Node) -> Result<(), Failure> {
    let end = Instant::now() + PATIENCE;
    loop {
        let (summary, total) = bpf::attached_summary(&node.cgroup_root)?;
        let mut lookups = vec![];
        for p in &node.pods {
            lookups.push((p.name.as_str(), bpf::sk_lookup_count(&p.netns_file)?));
        }
        if total == 0 && lookups.iter().all(|&(_, n)| n == 0) {
            return Ok(());
        }
        if Instant::now() > end {
            return Err(Failure::new(format!(
                "left attached: {summary}; sk_lookup {lookups:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGKILL of the agent with an 8 MiB a → b stream in flight (paced to stay open about
/// 3 s, through both sidecars, its local legs moved by sk_msg): the stream completes
/// byte for byte, the kernel
/// detached every program at once (new a → b connections go direct), the killed
/// agent's sockhash stays pinned; a new agent removes that pin, programs the pods
/// again and, once the Istio sidecars listen again (restarted, as a pod restart), a →
/// b goes through both with the original destination.
fn agent_sigkill(
    node: &Node,
    agent: &mut Agent,
    sidecars: &mut BTreeMap<&'static str, Child>,
) -> Result<String, Failure> {
    let (a, b) = (node.pod("a").ip, node.pod("b").ip);
    let target = format!("{b}:8080");
    let sk_before = agent::metrics()
        .ok()
        .and_then(|m| agent::metric(&m, SK_MSG))
        .unwrap_or(0.0);
    let mut stream = node
        .stand_in(
            "a",
            &app_container(node, "a"),
            APP_UID,
            "client-paced",
            &[
                &target,
                &SIGKILL_STREAM.to_string(),
                &SIGKILL_CHUNK.to_string(),
                &SIGKILL_PAUSE_MS.to_string(),
            ],
        )?
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Failure::new(format!("starting the stream: {e}")))?;
    // In flight: sk_msg has moved a first MiB of it (without acceleration: sidecar b
    // has its connection, and half a second of it has gone by).
    let nb_before = sidecar_log("b").len();
    let moving = if accelerated() {
        agent.wait_metric(SK_MSG, sk_before + (1 << 20) as f64, PATIENCE)
    } else {
        let got = new_sidecar_lines("b", nb_before, 1);
        std::thread::sleep(Duration::from_millis(500));
        if got.is_empty() {
            Err(anyhow::anyhow!("sidecar b never saw the stream"))
        } else {
            Ok(0.0)
        }
    };
    let in_flight = stream.try_wait().ok().flatten().is_none();
    let killed = agent.kill(PATIENCE)?;
    let killed_at = Instant::now();
    let out = stream
        .wait_with_output()
        .map_err(|e| Failure::new(format!("waiting for the stream: {e}")))?;
    let stream_secs = killed_at.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    // Every verdict on the killed agent, then a new agent in any case (the checks after
    // this one need a running agent).
    let mut problems: Vec<String> = vec![];
    if let Err(e) = moving {
        problems.push(format!("the stream did not get going: {e:#}"));
    } else if !in_flight {
        problems.push(format!(
            "the {SIGKILL_STREAM}-byte stream ended before the kill; nothing was proved"
        ));
    } else if !out.status.success() || !text.contains(&format!("ok bytes={SIGKILL_STREAM}")) {
        problems.push(format!(
            "the {} MiB stream in flight at SIGKILL did not complete intact ({}; {:.1} s \
             after the kill): {}",
            SIGKILL_STREAM >> 20,
            out.status,
            stream_secs,
            stderr.trim()
        ));
    }
    if let Err(f) = wait_detached(node) {
        problems.push(format!("after SIGKILL: {}", f.summary));
    }
    let pins = sockhash_pins();
    let want_pins = usize::from(accelerated());
    if pins.len() != want_pins {
        problems.push(format!(
            "the killed agent's sockhash pins: {pins:?}, want {want_pins} (pinned only \
             when it accelerated)"
        ));
    }
    let (na, nb) = log_lengths();
    let direct = client(node, "a", &target, 1024)?;
    std::thread::sleep(Duration::from_millis(300));
    if who(&direct) != "b-app"
        || !app_peer(&direct).starts_with(&format!("{a}:"))
        || log_lengths() != (na, nb)
    {
        problems.push(format!(
            "after SIGKILL, a → b should go direct (neither sidecar): {}",
            direct.trim()
        ));
    }
    // A new agent takes over.
    *agent = Agent::start(
        Path::new(PODS_FILE),
        &node.cgroup_root,
        Path::new(NETNS_DIR),
        Path::new(AGENT2_LOG),
    )?;
    agent
        .wait_metric(
            PROGRAMMED,
            meshed_pods(node).len() as f64,
            Duration::from_secs(90),
        )
        .map_err(|e| agent_failure(agent, format!("new agent: {e:#}")))?;
    let end = Instant::now() + PATIENCE;
    while pins.len() == 1 && sockhash_pins().contains(&pins[0]) {
        if Instant::now() > end {
            problems.push(format!(
                "the new agent left the killed agent's pin {}",
                pins[0].display()
            ));
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for pod in MESHED {
        if let Some(mut old) = sidecars.remove(pod) {
            let _ = old.kill();
            let _ = old.wait();
        }
        sidecars.insert(pod, start_sidecar(node, pod)?);
    }
    agent
        .wait_metric(LISTENERS, MESHED.len() as f64, PATIENCE)
        .map_err(|e| agent_failure(agent, format!("restarted sidecars: {e:#}")))?;
    let (na, nb) = log_lengths();
    let out = client(node, "a", &target, 1024)?;
    let la = new_sidecar_lines("a", na, 1);
    let lb = new_sidecar_lines("b", nb, 1);
    if who(&out) != "b-app"
        || la.len() != 1
        || !outbound_at(&la[0], &format!("{a}:15001"), &format!("{a}:"), &target)
        || lb.len() != 1
        || !inbound_from(&lb[0], a, &target)
    {
        problems.push(format!(
            "with the new agent and the sidecars restarted, a → b should go through both: \
             {} sidecar a: {la:?} sidecar b: {lb:?}",
            out.trim()
        ));
    }
    if !problems.is_empty() {
        return Err(Failure::new(problems.join("; "))
            .details(&text)
            .details(&stderr));
    }
    Ok(format!(
        "{} MiB a → b in flight at SIGKILL ({killed}) completed intact {stream_secs:.1} s \
         later; detached at once, a → b direct; {}; new agent: a → b through both sidecars \
         again (orig {target})",
        SIGKILL_STREAM >> 20,
        if accelerated() {
            "killed agent's sockhash pinned, removed by the new agent"
        } else {
            "no sockhash pinned (acceleration off, as check said)"
        }
    ))
}

/// No inbound connection reached a meshed pod's app without its sidecar, in any mesh.
fn bypass_ledger(node: &Node, agent: &mut Agent) -> Result<String, Failure> {
    // Every connection a sidecar accepted inbound was counted by sk_lookup: once the
    // published counter has them all, the ledger of the same pass is complete too.
    let meshed = meshed_pods(node);
    let captured: usize = meshed
        .iter()
        .map(|p| {
            sidecar_log(p)
                .iter()
                .filter(|l| l.contains("listener=inbound"))
                .count()
        })
        .sum();
    let counted = agent
        .wait_metric(REDIRECT_INBOUND, captured as f64, PATIENCE)
        .map_err(|e| agent_failure(agent, format!("{e:#}")))?;
    let body = agent::metrics()?;
    let ledgers: Vec<(&str, Option<f64>)> = meshed
        .iter()
        .map(|p| (*p, agent::metric(&body, &ledger_sample(p))))
        .collect();
    if ledgers.iter().any(|(_, v)| *v != Some(0.0)) {
        return Err(
            Failure::new(format!("bypass ledger: {ledgers:?}, want 0 each")).details(&body),
        );
    }
    Ok(format!(
        "merbridge_edge_inbound_bypassed_total 0 for {}; {counted} connections captured inbound",
        meshed.join(" ")
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
            "{} pods ({} meshed: Istio, Linkerd, Kuma, OSM), IPv4 and IPv6, namespaces \
             pinned in {NETNS_DIR}, apps and DNS stand-ins up, another node at {REMOTE_IP}",
            node.pods.len(),
            meshed_pods(&node).len()
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
    r.record("ipv6", ipv6(&node));
    r.record("dns-capture", dns_capture(&node, &mut agent));
    r.record("sk-msg-intact", sk_msg_intact(&node, &mut agent));
    r.record("sk-msg-bulk-stream", sk_msg_bulk_stream(&node));
    r.record(
        "inbound-refused-when-sidecar-down",
        inbound_refused(&node, &mut agent, &mut sidecars),
    );
    for m in MESH_PODS {
        r.record(
            &format!("mesh-{}", m.2.mesh),
            mesh(&node, &mut agent, &mut sidecars, m),
        );
    }
    r.record("inbound-bypass-ledger", bypass_ledger(&node, &mut agent));
    r.record(
        "agent-sigkill-stream",
        agent_sigkill(&node, &mut agent, &mut sidecars),
    );
    r.record("agent-stops-clean", agent_stops_clean(&node, &mut agent));
}
