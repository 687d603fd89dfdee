//! The meshes' own iptables interception, as their init containers install it in a
//! pod's network namespace (the nat chains for TCP): for comparing against the eBPF
//! datapath and for running it side by side with the agent.
use anyhow::{Context, Result};

use crate::proc::run;

/// istio-iptables' nat rules in REDIRECT mode with the injection template's defaults
/// (`-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x "" -b '*' -d 15090,15021,15020`),
/// in order, as the golden files under istio/istio
/// `tools/istio-iptables/pkg/capture/testdata/` show them: inbound TCP to 15006 but the
/// mesh's own ports, outbound TCP to 15001 but the proxy's own (uid and gid 1337) and
/// loopback traffic, the proxy's inbound passthrough from 127.0.0.6 let through.
pub const ISTIO_NAT_RULES: &[&str] = &[
    "-N ISTIO_INBOUND",
    "-N ISTIO_REDIRECT",
    "-N ISTIO_IN_REDIRECT",
    "-N ISTIO_OUTPUT",
    "-A PREROUTING -p tcp -j ISTIO_INBOUND",
    "-A OUTPUT -p tcp -j ISTIO_OUTPUT",
    "-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN",
    "-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN",
    "-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN",
    "-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN",
    "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
    "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
    "-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN",
    "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT",
    "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
    "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
    "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT",
    "-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN",
    "-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN",
    "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
    "-A ISTIO_OUTPUT -j ISTIO_REDIRECT",
    "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
];

/// linkerd-init's nat rules with its defaults (linkerd2-proxy-init
/// `proxy-init/cmd/root.go` and `iptables/iptables.go`: proxy uid 2102, inbound to 4143
/// but the proxy's own 4190 and 4191, outbound to 4140 but the proxy's own and
/// loopback traffic).
pub const LINKERD_NAT_RULES: &[&str] = &[
    "-N PROXY_INIT_REDIRECT",
    "-A PROXY_INIT_REDIRECT -p tcp -m multiport --dports 4190,4191 -j RETURN",
    "-A PROXY_INIT_REDIRECT -p tcp -j REDIRECT --to-port 4143",
    "-A PREROUTING -j PROXY_INIT_REDIRECT",
    "-N PROXY_INIT_OUTPUT",
    "-A PROXY_INIT_OUTPUT -m owner --uid-owner 2102 -j RETURN",
    "-A PROXY_INIT_OUTPUT -o lo -j RETURN",
    "-A PROXY_INIT_OUTPUT -p tcp -j REDIRECT --to-port 4140",
    "-A OUTPUT -j PROXY_INIT_OUTPUT",
];

/// Installs nat `rules` in network namespace `netns` (they go with it).
pub fn install_nat_rules(netns: &str, rules: &[&str]) -> Result<()> {
    for rule in rules {
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", netns, "iptables", "-w", "-t", "nat"])
            .args(rule.split_whitespace());
        run(&mut cmd).with_context(|| format!("iptables -t nat {rule} in netns {netns}"))?;
    }
    Ok(())
}

/// Installs [`ISTIO_NAT_RULES`] in network namespace `netns` (they go with it).
pub fn install_istio_iptables(netns: &str) -> Result<()> {
    install_nat_rules(netns, ISTIO_NAT_RULES)
}

/// Installs [`LINKERD_NAT_RULES`] in network namespace `netns` (they go with it).
pub fn install_linkerd_iptables(netns: &str) -> Result<()> {
    install_nat_rules(netns, LINKERD_NAT_RULES)
}
