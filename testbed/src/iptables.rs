//! Istio's iptables interception, as `istio-iptables` installs it in a pod's network
//! namespace (the nat chains for TCP), for comparing against the eBPF datapath.
use anyhow::{Context, Result};

use crate::proc::run;

/// The nat-table rules, in order: outbound TCP to 15001 except the proxy's own (uid
/// 1337) and loopback traffic, inbound TCP to 15006, and the proxy's inbound
/// passthrough from 127.0.0.6 let through.
pub const ISTIO_NAT_RULES: &[&str] = &[
    "-N ISTIO_REDIRECT",
    "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
    "-N ISTIO_IN_REDIRECT",
    "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
    "-N ISTIO_INBOUND",
    "-A PREROUTING -p tcp -j ISTIO_INBOUND",
    "-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN",
    "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
    "-N ISTIO_OUTPUT",
    "-A OUTPUT -p tcp -j ISTIO_OUTPUT",
    "-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN",
    "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT",
    "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
    "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
    "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
    "-A ISTIO_OUTPUT -j ISTIO_REDIRECT",
];

/// Installs [`ISTIO_NAT_RULES`] in network namespace `netns` (they go with it).
pub fn install_istio_iptables(netns: &str) -> Result<()> {
    for rule in ISTIO_NAT_RULES {
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", netns, "iptables", "-w", "-t", "nat"])
            .args(rule.split_whitespace());
        run(&mut cmd).with_context(|| format!("iptables -t nat {rule} in netns {netns}"))?;
    }
    Ok(())
}
