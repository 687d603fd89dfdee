//! The datapath benchmark: one node, two Istio pods (app + sidecar stand-in each), and
//! six ways from app A to app B, measured in interleaved rounds in one run:
//! `direct` (no sidecars), `explicit-proxy` (app A dials sidecar A, which dials sidecar
//! B: no interception), `iptables` (istio-iptables' nat rules), `ebpf` (the agent with
//! sk_msg acceleration off), `ebpf-sockmap` (on) and `ebpf+iptables` (the agent as
//! shipped with istio-iptables' rules still in the pods). Workloads: request/response
//! on persistent connections (64 B, 16 KiB; concurrency 1, 16), a connection per
//! request (concurrency 16, with conntrack entries counted), and 64 KiB streams (1, 4);
//! and the same kinds inbound from another node (a network namespace routed through
//! the host, outside the node's cgroups) to app B, through B's sidecar only.
//!
//! Every reply is checked byte for byte and every variant is checked to have taken its
//! path before it is timed. Needs root. `--quick` (one short round, for CI) or full;
//! `--json FILE` writes the cells; `--rounds N`, `--seconds S` per cell;
//! `--conntrack-max N` adds a short-connection run with the host's conntrack table cut
//! to N entries (the old size is put back afterwards, also on failure).
use std::{collections::BTreeMap, fmt::Write as _, fs, process::Command, time::Duration};

use anyhow::{Context, Result, bail};
use merbridge_edge_testbed::node::missing_prerequisite;
use merbridge_edge_testbed::{
    Node, Pod, PodSpec,
    agent::Agent,
    fixture::{start_sidecar, start_stand_ins},
    iptables::install_istio_iptables,
    node::RemoteNode,
    podlist::{pod_list, write_pod_list},
    proc::run,
};
use serde_json::{Value, json};

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Ends the run (its guards put the node and the conntrack limit back) after Ctrl-C.
fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

const VARIANTS: [&str; 6] = [
    "direct",
    "explicit-proxy",
    "iptables",
    "ebpf",
    "ebpf-sockmap",
    "ebpf+iptables",
];

/// Where the load comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum From {
    /// App A on the same node (A's sidecar, then B's).
    PodA,
    /// Another node (B's sidecar only).
    OtherNode,
}

/// One workload setting.
#[derive(Clone, Copy)]
struct Cell {
    workload: &'static str,
    size: usize,
    concurrency: usize,
    from: From,
}

const fn cell(workload: &'static str, size: usize, concurrency: usize, from: From) -> Cell {
    Cell {
        workload,
        size,
        concurrency,
        from,
    }
}

/// The cells; `CONNS` and `REMOTE_CONNS` index the connection-per-request ones.
const CELLS: [Cell; 11] = [
    cell("rr", 64, 1, From::PodA),
    cell("rr", 64, 16, From::PodA),
    cell("rr", 16384, 1, From::PodA),
    cell("rr", 16384, 16, From::PodA),
    cell("conns", 64, 16, From::PodA),
    cell("stream", 65536, 1, From::PodA),
    cell("stream", 65536, 4, From::PodA),
    cell("rr", 64, 1, From::OtherNode),
    cell("rr", 64, 16, From::OtherNode),
    cell("conns", 64, 16, From::OtherNode),
    cell("stream", 65536, 1, From::OtherNode),
];
const CONNS: usize = 4;
const REMOTE_CONNS: usize = 9;

/// Figures of one cell in one round.
#[derive(Clone, Default)]
struct Figures {
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    per_s: f64,
    mb_per_s: f64,
    conntrack_added: f64,
    errors: f64,
}

/// The host's conntrack table size, restored on drop (also when the run fails).
struct ConntrackMax {
    old: String,
}

const CONNTRACK_MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";

impl ConntrackMax {
    fn set(max: u64) -> Result<Self> {
        let old = fs::read_to_string(CONNTRACK_MAX)
            .with_context(|| format!("{CONNTRACK_MAX} (is nf_conntrack loaded?)"))?;
        fs::write(CONNTRACK_MAX, max.to_string())
            .with_context(|| format!("writing {CONNTRACK_MAX}"))?;
        Ok(Self { old })
    }
}

impl Drop for ConntrackMax {
    fn drop(&mut self) {
        if let Err(e) = fs::write(CONNTRACK_MAX, self.old.trim()) {
            eprintln!(
                "mbe-bench: restoring {CONNTRACK_MAX} to {}: {e}",
                self.old.trim()
            );
        }
    }
}

fn in_netns(netns: &str, args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(["netns", "exec", netns]).args(args))
}

fn conntrack_count(netns: &str) -> f64 {
    in_netns(
        netns,
        &["cat", "/proc/sys/net/netfilter/nf_conntrack_count"],
    )
    .ok()
    .and_then(|s| s.trim().parse().ok())
    .unwrap_or(0.0)
}

struct Bench {
    node: Node,
    a: Pod,
    b: Pod,
    remote: RemoteNode,
    pods_file: std::path::PathBuf,
}

impl Bench {
    fn sidecar_lines(&self, pod: &str) -> Vec<String> {
        fs::read_to_string(self.node.scratch().join(format!("sidecar-{pod}.log")))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    fn target(&self, variant: &str, from: From) -> String {
        match (variant, from) {
            ("explicit-proxy", From::PodA) => "127.0.0.1:15101".into(),
            ("explicit-proxy", From::OtherNode) => format!("{}:15106", self.b.ip4),
            _ => format!("{}:8080", self.b.ip4),
        }
    }

    /// Runs the stand-in helper where `from` says.
    fn run_from(&self, from: From, args: &[&str]) -> Result<String> {
        match from {
            From::PodA => self.node.run_in(&self.a, Some("app"), Some(1000), args),
            From::OtherNode => self.node.run_placed(&self.remote.placement, args),
        }
    }

    /// Conntrack entries in the pods and on the node.
    fn conntrack(&self) -> f64 {
        conntrack_count(&self.a.netns)
            + conntrack_count(&self.b.netns)
            + conntrack_count(self.node.host_netns())
    }

    /// Turns interception on for `variant`; the agent when it is an eBPF one.
    fn enable(&self, variant: &str) -> Result<Option<Agent>> {
        if matches!(variant, "iptables" | "ebpf+iptables") {
            install_istio_iptables(&self.a.netns)?;
            install_istio_iptables(&self.b.netns)?;
        }
        match variant {
            "ebpf" | "ebpf-sockmap" | "ebpf+iptables" => {
                let root = self.node.cgroup_root.display().to_string();
                let bpffs = self.node.bpffs.display().to_string();
                let mut args = vec![
                    "run",
                    "--pods-file",
                    self.pods_file.to_str().context("path")?,
                    "--cgroup-root",
                    &root,
                    "--bpffs",
                    &bpffs,
                    // The sidecars started under the first agent; later ones adopt
                    // their listeners (no stream runs across an agent restart here).
                    "--pin-inbound-listeners",
                    "--interval",
                    "200ms",
                ];
                if variant == "ebpf" {
                    args.push("--no-accelerate");
                }
                let mut agent = Agent::start(
                    &args,
                    &self.node.scratch().join(format!("agent-{variant}.log")),
                )?;
                agent.wait_log_count("added: mesh istio", 2, Duration::from_secs(15))?;
                Ok(Some(agent))
            }
            _ => Ok(None),
        }
    }

    fn disable(&self, variant: &str, agent: Option<Agent>) -> Result<()> {
        if let Some(mut agent) = agent {
            agent.proc.signal(libc::SIGTERM);
            agent
                .proc
                .wait_for(Duration::from_secs(3))
                .context("agent did not stop")?;
        }
        if matches!(variant, "iptables" | "ebpf+iptables") {
            for pod in [&self.a, &self.b] {
                in_netns(&pod.netns, &["iptables", "-w", "-t", "nat", "-F"])?;
                in_netns(&pod.netns, &["iptables", "-w", "-t", "nat", "-X"])?;
                // An empty nat table still keeps conntrack on in the namespace, which
                // would tax the variants that follow: remove the table itself.
                in_netns(&pod.netns, &["nft", "delete", "table", "ip", "nat"])
                    .context("removing the nat table (nft, from Debian's nftables)")?;
            }
        }
        Ok(())
    }

    /// One connection from A and one from the other node, then: did each take
    /// `variant`'s path?
    fn check_path(&self, variant: &str, agent: Option<&mut Agent>) -> Result<()> {
        let (before_a, before_b) = (self.sidecar_lines("a").len(), self.sidecar_lines("b").len());
        let out = self.run_from(
            From::OtherNode,
            &["client", &self.target(variant, From::OtherNode)],
        )?;
        if !out.contains("who=b-app") {
            bail!("{variant}: from the other node, the reply did not come from app B: {out}");
        }
        std::thread::sleep(Duration::from_millis(100));
        let intercepted = matches!(
            variant,
            "iptables" | "ebpf" | "ebpf-sockmap" | "ebpf+iptables"
        );
        let lb = self.sidecar_lines("b");
        let orig = format!("orig={}:8080", self.b.ip4);
        let through_b = lb.len() == before_b + 1 && lb[before_b].contains(&orig);
        if intercepted != through_b || self.sidecar_lines("a").len() != before_a {
            bail!(
                "{variant}: from the other node, expected the connection {} sidecar B only; it logged {:?}",
                if intercepted {
                    "through"
                } else {
                    "not through"
                },
                &lb[before_b..]
            );
        }
        let (before_a, before_b) = (self.sidecar_lines("a").len(), self.sidecar_lines("b").len());
        let out = self.run_from(From::PodA, &["client", &self.target(variant, From::PodA)])?;
        if !out.contains("who=b-app") {
            bail!("{variant}: the reply did not come from app B: {out}");
        }
        std::thread::sleep(Duration::from_millis(100));
        let (la, lb) = (self.sidecar_lines("a"), self.sidecar_lines("b"));
        let through_sidecars = la.len() == before_a + 1
            && lb.len() == before_b + 1
            && la[before_a].contains(&orig)
            && lb[before_b].contains(&orig);
        if intercepted != through_sidecars {
            bail!(
                "{variant}: expected the connection {} the intercepting sidecars; they logged {:?} {:?}",
                if intercepted {
                    "through"
                } else {
                    "not through"
                },
                &la[before_a..],
                &lb[before_b..]
            );
        }
        if let Some(agent) = agent {
            let sample = "merbridge_edge_datapath_events_total{event=\"sk_msg_redirected\"}";
            let moved = agent.wait_metric(sample, |v| v > 0.0, Duration::from_secs(2));
            match (variant, moved) {
                ("ebpf-sockmap" | "ebpf+iptables", Err(e)) => {
                    bail!("{variant}: sk_msg moved nothing: {e:#}")
                }
                ("ebpf", Ok(v)) => bail!("ebpf: sk_msg moved {v} messages with acceleration off"),
                _ => {}
            }
        }
        Ok(())
    }

    /// Runs one cell; `strict`: nothing answered is an error (off where dropped
    /// connections are the point).
    fn measure(&self, variant: &str, cell: Cell, ms: u64, strict: bool) -> Result<Figures> {
        check_interrupt()?;
        let before = self.conntrack();
        let out = self
            .run_from(
                cell.from,
                &[
                    "load",
                    cell.workload,
                    &self.target(variant, cell.from),
                    &cell.size.to_string(),
                    &cell.concurrency.to_string(),
                    &ms.to_string(),
                ],
            )
            .with_context(|| {
                format!(
                    "{variant}, {} {} B × {}{}",
                    cell.workload,
                    cell.size,
                    cell.concurrency,
                    if cell.from == From::OtherNode {
                        " from the other node"
                    } else {
                        ""
                    }
                )
            })?;
        let after = self.conntrack();
        let kv: BTreeMap<&str, f64> = out
            .split_whitespace()
            .filter_map(|p| p.split_once('='))
            .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
            .collect();
        let get = |k: &str| kv.get(k).copied().unwrap_or(0.0);
        if strict && get("count") == 0.0 && cell.workload != "stream" {
            bail!("{variant} {}: nothing answered: {out}", cell.workload);
        }
        Ok(Figures {
            p50_us: get("p50_us"),
            p99_us: get("p99_us"),
            p999_us: get("p999_us"),
            per_s: get("per_s"),
            mb_per_s: get("mb_per_s"),
            conntrack_added: (after - before).max(0.0),
            errors: get("errors"),
        })
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

fn setup() -> Result<Bench> {
    let helper = std::env::current_exe()?.with_file_name("mbe-testbed");
    let mut node = Node::new(&helper)?;
    let remote = node.other_node()?;
    let mut pods = vec![];
    for name in ["a", "b"] {
        let pod = node.add_pod(PodSpec::istio(name))?;
        // Apps now, sidecars once the agent is attached (below).
        start_stand_ins(&mut node, &pod, &["[::]:8080"], false)?;
        for sysctl in [
            "net.ipv4.tcp_tw_reuse=1",
            "net.ipv4.ip_local_port_range=1024 65000",
        ] {
            in_netns(&pod.netns, &["sysctl", "-qw", sysctl])?;
        }
        pods.push(pod);
    }
    let (a, b) = (pods[0].clone(), pods[1].clone());
    // The explicit proxy chain: A's app → 127.0.0.1:15101 → B:15106 → B's app.
    node.spawn(
        &a,
        Some("istio-proxy"),
        Some(1337),
        &["forward", "[::]:15101", &format!("{}:15106", b.ip4)],
    )?;
    node.spawn(
        &b,
        Some("istio-proxy"),
        Some(1337),
        &["forward", "[::]:15106", "127.0.0.1:8080"],
    )?;
    for (pod, port) in [(&a, 15101), (&b, 15106)] {
        node.wait_listening(pod, port)?;
    }
    let pods_file = node.scratch().join("pods.json");
    write_pod_list(&pods_file, &pod_list([&a, &b], "edge-1"))?;
    let bench = Bench {
        node,
        a,
        b,
        remote,
        pods_file,
    };
    // The sidecars start under an agent, as pods do on a node that runs it: their
    // inbound listeners are registered in the pinned listener map every later agent
    // adopts.
    let agent = bench.enable("ebpf-sockmap")?;
    for pod in [&bench.a, &bench.b] {
        start_sidecar(&bench.node, pod, None)?;
    }
    bench.disable("ebpf-sockmap", agent)?;
    Ok(bench)
}

fn main() -> Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let quick = args.iter().any(|a| a == "--quick");
    let rounds: usize = flag("--rounds")
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(if quick { 1 } else { 5 });
    let ms: u64 = flag("--seconds")
        .map(|v| v.parse::<f64>().map(|s| (s * 1000.0) as u64))
        .transpose()?
        .unwrap_or(if quick { 300 } else { 2000 });
    if let Some(why) = missing_prerequisite() {
        bail!("the benchmark {why}");
    }
    let bench = setup()?;
    println!("mbe-bench: {rounds} round(s), {ms} ms per cell, variants interleaved");
    let mut samples: BTreeMap<(usize, usize), Vec<Figures>> = BTreeMap::new();
    for round in 1..=rounds {
        for (v, variant) in VARIANTS.iter().enumerate() {
            let mut agent = bench.enable(variant)?;
            let result = (|| -> Result<()> {
                bench.check_path(variant, agent.as_mut())?;
                // Warm-up, not recorded: threads, caches and the sidecars' pools settle.
                bench.measure(variant, CELLS[1], (ms / 4).max(100), true)?;
                for (c, cell) in CELLS.iter().enumerate() {
                    let f = bench.measure(variant, *cell, ms, true)?;
                    samples.entry((v, c)).or_default().push(f);
                }
                Ok(())
            })();
            bench.disable(variant, agent)?;
            result?;
            println!("  round {round}/{rounds}: {variant} done");
        }
    }
    // Medians over rounds.
    let mut medians: BTreeMap<(usize, usize), (Figures, f64, f64)> = BTreeMap::new();
    for ((v, c), runs) in &samples {
        let pick = |f: fn(&Figures) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
        // The spread of the headline figure over rounds.
        let key = |f: &Figures| match CELLS[*c].workload {
            "stream" => f.mb_per_s,
            "conns" => f.per_s,
            _ => f.p50_us,
        };
        let (lo, hi) = runs
            .iter()
            .map(key)
            .fold((f64::MAX, f64::MIN), |(l, h), x| (l.min(x), h.max(x)));
        medians.insert(
            (*v, *c),
            (
                Figures {
                    p50_us: pick(|f| f.p50_us),
                    p99_us: pick(|f| f.p99_us),
                    p999_us: pick(|f| f.p999_us),
                    per_s: pick(|f| f.per_s),
                    mb_per_s: pick(|f| f.mb_per_s),
                    conntrack_added: pick(|f| f.conntrack_added),
                    errors: pick(|f| f.errors),
                },
                lo,
                hi,
            ),
        );
    }
    let mut table = String::new();
    let mut cells_json = vec![];
    for (c, cell) in CELLS.iter().enumerate() {
        let (mut what, unit): (String, &str) = match cell.workload {
            "rr" => (
                format!(
                    "request/response {} B, concurrency {}",
                    cell.size, cell.concurrency
                ),
                "p50 µs",
            ),
            "conns" => (
                format!("connection per request, concurrency {}", cell.concurrency),
                "conn/s",
            ),
            _ => (format!("64 KiB stream × {}", cell.concurrency), "MB/s"),
        };
        if cell.from == From::OtherNode {
            what.push_str(", inbound from another node");
        }
        let _ = writeln!(table, "\n{what}");
        let _ = writeln!(
            table,
            "  {:<15} {:>10} {:>10} {:>10} {:>12} {:>10} {:>10} {:>9} {:>9}  spread",
            "variant",
            "p50 µs",
            "p99 µs",
            "p999 µs",
            "per s",
            "MB/s",
            "conntrack",
            "vs ipt",
            "vs expl"
        );
        let headline = |v: usize| {
            let f = &medians[&(v, c)].0;
            match cell.workload {
                "rr" => f.p50_us,
                "conns" => f.per_s,
                _ => f.mb_per_s,
            }
        };
        for (v, variant) in VARIANTS.iter().enumerate() {
            let (f, lo, hi) = &medians[&(v, c)];
            let ratio = |base: usize| {
                let b = headline(base);
                if b > 0.0 {
                    format!("{:.2}x", headline(v) / b)
                } else {
                    "-".into()
                }
            };
            let shown = |applies: bool, v: f64, digits: usize| {
                if applies {
                    format!("{v:.digits$}")
                } else {
                    "-".into()
                }
            };
            let (latency, stream) = (cell.workload != "stream", cell.workload == "stream");
            let _ = writeln!(
                table,
                "  {variant:<15} {:>10} {:>10} {:>10} {:>12} {:>10} {:>10} {:>9} {:>9}  {:.0}–{:.0}",
                shown(latency, f.p50_us, 0),
                shown(latency, f.p99_us, 0),
                shown(latency, f.p999_us, 0),
                shown(latency, f.per_s, 0),
                shown(stream, f.mb_per_s, 1),
                f.conntrack_added,
                ratio(2),
                ratio(1),
                lo,
                hi
            );
            let rr = cell.workload == "rr";
            cells_json.push(json!({
                "variant": variant, "workload": cell.workload, "size": cell.size,
                "concurrency": cell.concurrency,
                "from": if cell.from == From::OtherNode { "other-node" } else { "pod" },
                "p50_us": if cell.workload == "stream" { Value::Null } else { json!(f.p50_us) },
                "p99_us": if cell.workload == "stream" { Value::Null } else { json!(f.p99_us) },
                "p999_us": if cell.workload == "stream" { Value::Null } else { json!(f.p999_us) },
                "rps": if rr { json!(f.per_s) } else { Value::Null },
                "conn_per_s": if cell.workload == "conns" { json!(f.per_s) } else { Value::Null },
                "conntrack_added": if cell.workload == "conns" { json!(f.conntrack_added) } else { Value::Null },
                "mb_per_s": if cell.workload == "stream" { json!(f.mb_per_s) } else { Value::Null },
                "spread": {"unit": unit, "min": lo, "max": hi, "rounds": rounds},
            }));
        }
    }
    println!("{table}");
    println!(
        "ratios: the headline figure (p50 latency, connections/s or MB/s) against iptables and explicit-proxy"
    );
    if let Some(max) = flag("--conntrack-max") {
        let max: u64 = max.parse().context("--conntrack-max")?;
        println!(
            "\nconnection per request, concurrency 16, host conntrack table limited to {max} entries"
        );
        println!(
            "  {:<15} {:<12} {:>12} {:>10} {:>10}",
            "variant", "from", "conn/s", "errors", "conntrack"
        );
        let limit = ConntrackMax::set(max)?;
        for variant in VARIANTS {
            let agent = bench.enable(variant)?;
            // Paths were checked in the rounds; here a full table may drop the check's
            // own connection, which is what this run is about.
            let figures: Result<Vec<(Cell, Figures)>> = [CELLS[CONNS], CELLS[REMOTE_CONNS]]
                .into_iter()
                .map(|cell| Ok((cell, bench.measure(variant, cell, ms, false)?)))
                .collect();
            bench.disable(variant, agent)?;
            for (cell, f) in figures? {
                let from = if cell.from == From::OtherNode {
                    "other-node"
                } else {
                    "pod"
                };
                println!(
                    "  {variant:<15} {from:<12} {:>12.0} {:>10.0} {:>10.0}",
                    f.per_s, f.errors, f.conntrack_added
                );
                cells_json.push(json!({
                    "variant": variant, "workload": "conns", "size": cell.size,
                    "concurrency": cell.concurrency, "conntrack_max": max, "from": from,
                    "conn_per_s": f.per_s, "errors": f.errors, "conntrack_added": f.conntrack_added,
                    "p50_us": null, "p99_us": null, "p999_us": null, "rps": null, "mb_per_s": null,
                }));
            }
        }
        drop(limit);
    }
    if let Some(path) = flag("--json") {
        let mut uname = String::new();
        if let Ok(o) = Command::new("uname").arg("-srm").output() {
            uname = String::from_utf8_lossy(&o.stdout).trim().to_string();
        }
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0);
        let doc = json!({
            "cells": cells_json,
            "machine": {"kernel": uname, "cpus": cpus, "rounds": rounds, "ms_per_cell": ms},
        });
        fs::write(&path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {path}"))?;
        println!("wrote {path}");
    }
    drop(bench);
    Ok(())
}
