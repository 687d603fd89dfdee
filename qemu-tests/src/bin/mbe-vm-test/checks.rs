//! The checks, in order, mirroring testbed/tests/datapath.rs: the probes pass the
//! verifier, the agent attaches and programs the pods, outbound and inbound redirect
//! with SO_ORIGINAL_DST, exclusions, a plain pod untouched, sk_msg moves data intact,
//! and after SIGTERM nothing stays attached.
use std::{
    fs,
    path::Path,
    process::Child,
    time::{Duration, Instant},
};

use merbridge_edge_qemu_tests::protocol;

use crate::{
    agent::{self, Agent},
    bpf,
    pods::{self, Node},
    sys,
};

/// uid of the app stand-ins.
const APP_UID: u32 = 1000;
/// uid of the sidecar stand-ins (Istio's proxy uid).
const PROXY_UID: u32 = 1337;
const CGROUP_ROOT: &str = "/sys/fs/cgroup/mbe-node";
const PODS_FILE: &str = "/tmp/pods.json";
const AGENT_LOG: &str = "/tmp/agent.log";
/// Under TCG everything is 10–50x slower than on hardware.
const PATIENCE: Duration = Duration::from_secs(20);

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
    fs::read_to_string(format!("/tmp/sidecar-{pod}.log"))
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
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

fn who(out: &str) -> &str {
    out.split_whitespace()
        .find_map(|p| p.strip_prefix("who="))
        .unwrap_or("")
}

/// The pods, the node and the stand-ins: a, b meshed (Istio), c plain; each app echoes
/// on 8080 and 9002; a excludes outbound port 9002.
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
            ("traffic.sidecar.istio.io/excludeOutboundPorts", "9002"),
        ],
    )?;
    node.add_pod("b", &["app", "istio-proxy"], &[istio])?;
    node.add_pod("c", &["app"], &[])?;
    let mut procs = vec![];
    for pod in ["a", "b", "c"] {
        let name = format!("{pod}-app");
        procs.push(node.start(pod, "app", APP_UID, "echo", &[&name, "8080", "9002"], 8080)?);
        if pod != "c" {
            let log = format!("/tmp/sidecar-{pod}.log");
            pods::shared_log(&log)?;
            procs.push(node.start(
                pod,
                "istio-proxy",
                PROXY_UID,
                "sidecar",
                &[pod, "15001", "15006", &log],
                15006,
            )?);
        }
    }
    fs::write(PODS_FILE, serde_json::to_vec_pretty(&node.pod_list())?)?;
    println!("mbe-vm-test: modules {modules:?}, pods a b c up");
    Ok((node, procs))
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

/// Runs every check, printing one line each.
pub fn run(r: &mut Reporter) {
    let (node, _procs) = match setup() {
        Ok(x) => x,
        Err(e) => {
            r.record("setup", Err(Failure::from(e)));
            return;
        }
    };
    r.record("setup", Ok("3 pods (2 meshed), stand-ins listening".into()));
    r.record("verifier", verifier());
    let (a, b, c) = (node.pod("a").ip, node.pod("b").ip, node.pod("c").ip);

    let mut agent = match Agent::start(
        Path::new(PODS_FILE),
        &node.cgroup_root,
        Path::new(AGENT_LOG),
    ) {
        Ok(x) => x,
        Err(e) => {
            r.record("agent-attaches", Err(e.into()));
            return;
        }
    };
    let started = Instant::now();
    let attached = agent
        .wait_metric(
            "merbridge_edge_pods{state=\"programmed\"}",
            2.0,
            Duration::from_secs(90),
        )
        .map_err(|e| agent_failure(&agent, format!("{e:#}")))
        .and_then(|_| {
            let (summary, total) = bpf::attached_summary(&node.cgroup_root)?;
            if total == 0 {
                return Err(Failure::new(format!(
                    "nothing attached at {CGROUP_ROOT}: {summary}"
                )));
            }
            Ok(format!(
                "2 pods programmed in {:.1} s; attached: {summary}",
                started.elapsed().as_secs_f64()
            ))
        });
    if !r.record("agent-attaches", attached) {
        return;
    }

    let client =
        |pod: &str, target: String, bytes: usize| node.client(pod, "app", APP_UID, &target, bytes);
    let outbound = client("a", format!("{b}:8080"), 1024)
        .map_err(Failure::new)
        .and_then(|out| {
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
        });
    r.record("outbound-redirect", outbound);

    let lb = new_sidecar_lines("b", 0, 1);
    let want = format!("orig={b}:8080");
    let inbound = if lb.len() == 1 && lb[0].contains("listener=inbound") && lb[0].contains(&want) {
        Ok(format!(
            "into b via sidecar b's inbound listener, SO_ORIGINAL_DST {b}:8080"
        ))
    } else {
        Err(Failure::new(format!(
            "sidecar b should have seen one inbound connection with {want}"
        ))
        .details(&format!("sidecar b: {lb:?}")))
    };
    r.record("inbound-redirect", inbound);

    let (na, nb) = (sidecar_log("a").len(), sidecar_log("b").len());
    let excluded = client("a", format!("{b}:9002"), 1024)
        .map_err(Failure::new)
        .and_then(|out| {
            std::thread::sleep(Duration::from_millis(500));
            let (la, lb) = (sidecar_log("a"), sidecar_log("b"));
            if who(&out) != "b-app" || la.len() != na || lb.len() != nb {
                return Err(Failure::new(
                    "a → b:9002 (excludeOutboundPorts) should bypass both sidecars",
                )
                .details(&out)
                .details(&format!(
                    "sidecar a: {:?}\nsidecar b: {:?}",
                    &la[na.min(la.len())..],
                    &lb[nb.min(lb.len())..]
                )));
            }
            Ok("a → b:9002 (excluded port) straight to b-app".into())
        });
    r.record("exclusion", excluded);

    let untouched = client("c", format!("{b}:8080"), 1024)
        .and_then(|out_c| client("a", "127.0.0.1:8080".into(), 1024).map(|out_lo| (out_c, out_lo)))
        .map_err(Failure::new)
        .and_then(|(out_c, out_lo)| {
            std::thread::sleep(Duration::from_millis(500));
            let (la, lb) = (sidecar_log("a"), sidecar_log("b"));
            if who(&out_c) != "b-app" || who(&out_lo) != "a-app" || la.len() != na || lb.len() != nb
            {
                return Err(Failure::new(
                    "plain pod c → b and loopback in a should reach the apps directly",
                )
                .details(&out_c)
                .details(&out_lo)
                .details(&format!("sidecar a: {la:?}\nsidecar b: {lb:?}")));
            }
            Ok(format!(
                "plain c ({c}) → b:8080 and a → 127.0.0.1:8080 direct; a is {a}"
            ))
        });
    r.record("non-meshed-untouched", untouched);

    const SK_MSG: &str = "merbridge_edge_datapath_bytes_total{event=\"sk_msg\"}";
    let before = agent::metrics()
        .ok()
        .and_then(|m| agent::metric(&m, SK_MSG))
        .unwrap_or(0.0);
    let mib = 1 << 20;
    let sk_msg = client("a", format!("{b}:8080"), mib)
        .map_err(Failure::new)
        .and_then(|out| {
            if !out.contains(&format!("ok bytes={mib}")) || who(&out) != "b-app" {
                return Err(Failure::new("1 MiB a → b did not come back intact").details(&out));
            }
            // 1 MiB each way over the two accelerated legs (app a ↔ sidecar a, sidecar b ↔ app b).
            let want = before + (4 * mib) as f64;
            let after = agent
                .wait_metric(SK_MSG, want, PATIENCE)
                .map_err(|e| Failure::new(format!("{e:#}")))?;
            Ok(format!(
                "1 MiB echoed intact; sk_msg moved {} bytes",
                after - before
            ))
        });
    r.record("sk-msg-intact", sk_msg);

    let stop = agent
        .terminate(PATIENCE)
        .map_err(Failure::from)
        .and_then(|status| {
            if !status.success() {
                return Err(agent_failure(&agent, format!("the agent exited with {status} on SIGTERM")));
            }
            let names = bpf::loaded_program_names()?;
            let ours: Vec<&String> = names.iter().filter(|n| n.starts_with("mb_")).collect();
            let (summary, total) = bpf::attached_summary(&node.cgroup_root)?;
            if !ours.is_empty() || total != 0 {
                return Err(Failure::new(format!("left behind: programs {ours:?}; attached {summary}")));
            }
            let before = sidecar_log("a").len();
            let out = client("a", format!("{b}:8080"), 1024).map_err(Failure::new)?;
            std::thread::sleep(Duration::from_millis(300));
            if who(&out) != "b-app" || sidecar_log("a").len() != before {
                return Err(Failure::new("after the agent stopped, a → b should go direct").details(&out));
            }
            Ok(format!("exit 0; no mb_* program loaded ({} others), nothing attached; traffic direct again", names.len()))
        });
    r.record("agent-stops-clean", stop);
}
