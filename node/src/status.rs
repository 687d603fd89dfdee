//! `merbridge-edge status`: what a running agent has programmed, read from its metrics
//! listener's `/status`.
use std::{fmt::Write as _, net::SocketAddr, time::Duration};

use anyhow::{Context, Result};

use crate::metrics::Snapshot;

/// Fetches the running agent's snapshot from `addr`.
pub fn fetch(addr: SocketAddr) -> Result<Snapshot> {
    let url = format!("http://{addr}/status");
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(5)))
            .build(),
    );
    let body = agent
        .get(&url)
        .call()
        .with_context(|| format!("{url}: is the agent running with --metrics-addr {addr}?"))?
        .body_mut()
        .read_to_string()
        .with_context(|| format!("{url}: reading the answer"))?;
    serde_json::from_str(&body).with_context(|| format!("{url}: not an agent status"))
}

/// The snapshot as tables for people.
pub fn render(s: &Snapshot) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "probes: {}",
        if s.attached {
            format!("attached to {}", s.attached_to)
        } else {
            "not attached".into()
        }
    );
    let errors: Vec<String> = s
        .poll_errors
        .iter()
        .map(|(k, v)| format!("{} {v}", k.label()))
        .collect();
    let _ = writeln!(
        o,
        "source: {}: {} good polls{}",
        s.source,
        s.polls_ok,
        if errors.is_empty() {
            String::new()
        } else {
            format!(", failed: {}", errors.join(", "))
        }
    );
    let _ = writeln!(
        o,
        "pods:   {} seen, {} meshed, {} programmed, {} waiting for a cgroup, {} left out by a full map",
        s.pods_seen, s.pods_meshed, s.pods_programmed, s.pods_waiting_for_cgroups, s.pods_map_full
    );
    let _ = writeln!(
        o,
        "inbound: {}; {} network namespaces attached, {} sidecar listeners registered",
        s.inbound_capture, s.netns_attached, s.inbound_listeners
    );
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let _ = writeln!(
        o,
        "memory: {:.1} MiB resident (peak {:.1}), {:.1} MiB in kernel maps, {:.1} MiB in all",
        mib(s.resident_bytes),
        mib(s.peak_resident_bytes),
        mib(s.map_kernel_bytes),
        mib(s.resident_bytes + s.map_kernel_bytes)
    );
    let _ = writeln!(
        o,
        "\n{:<44} {:<8} {:<34} {:>10} {:>8}  SIDECAR / RULES",
        "POD", "MESH", "IPS", "CONTAINERS", "BYPASSED"
    );
    for p in &s.pods {
        let containers = if p.programmed {
            p.containers.to_string()
        } else {
            "-".into()
        };
        let _ = writeln!(
            o,
            "{:<44} {:<8} {:<34} {:>10} {:>8}  {}{}",
            p.name,
            p.mesh,
            p.ips.join(","),
            containers,
            p.bypassed,
            p.proxy,
            if p.rules.is_empty() {
                String::new()
            } else {
                format!("; {}", p.rules.join(", "))
            }
        );
    }
    let _ = writeln!(o, "\n{:<24} {:>10} {:>10}", "MAP", "ENTRIES", "CAPACITY");
    for m in &s.maps {
        let _ = writeln!(o, "{:<24} {:>10} {:>10}", m.name, m.entries, m.capacity);
    }
    let _ = writeln!(o, "\n{:<24} {:>14}", "COUNTER", "VALUE");
    for (name, v) in &s.counters {
        let _ = writeln!(o, "{name:<24} {v:>14}");
    }
    o
}
