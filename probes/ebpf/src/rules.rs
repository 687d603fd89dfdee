//! Per-pod include/exclude decisions, looked up in the LPM tries the agent fills.
use aya_ebpf::maps::lpm_trie::Key;
use merbridge_edge_probes_common::{
    CidrRuleKey, LocalPod, POD_IN_ALL_PORTS, POD_OUT_ALL_ADDRS, PodInfo, PortRuleKey, cidr_rule,
    port_rule,
};

use crate::maps::{CIDR_RULES, PORT_RULES};

#[inline(always)]
fn has_port_rule(pod_id: u32, kind: u8, port: u16) -> bool {
    let (prefix_len, data) = PortRuleKey::lpm(pod_id, kind, port, 16);
    PORT_RULES.get(&Key::new(prefix_len, data)).is_some()
}

#[inline(always)]
fn has_cidr_rule(pod_id: u32, kind: u8, addr: &[u32; 4]) -> bool {
    let (prefix_len, data) = CidrRuleKey::lpm_of_address(pod_id, kind, addr);
    CIDR_RULES.get(&Key::new(prefix_len, data)).is_some()
}

/// Whether an app's connection to `addr:port` goes to its sidecar. Precedence follows
/// Istio's rule order: excluded port, included port, excluded range, included range.
#[inline(always)]
pub fn outbound_redirected(pod: &PodInfo, addr: &[u32; 4], port: u16) -> bool {
    if has_port_rule(pod.pod_id, port_rule::OUT_EXCLUDE, port) {
        return false;
    }
    if has_port_rule(pod.pod_id, port_rule::OUT_INCLUDE, port) {
        return true;
    }
    if has_cidr_rule(pod.pod_id, cidr_rule::OUT_EXCLUDE, addr) {
        return false;
    }
    if pod.flags & POD_OUT_ALL_ADDRS != 0 {
        return true;
    }
    has_cidr_rule(pod.pod_id, cidr_rule::OUT_INCLUDE, addr)
}

/// Whether inbound connections to `peer` from `source` skip its sidecar.
#[inline(always)]
pub fn inbound_source_excluded(peer: &LocalPod, source: &[u32; 4]) -> bool {
    has_cidr_rule(peer.pod_id, cidr_rule::IN_SOURCE_EXCLUDE, source)
}

/// Whether a connection to a local meshed pod's `port` goes to that pod's sidecar.
#[inline(always)]
pub fn inbound_redirected(peer: &LocalPod, port: u16) -> bool {
    if has_port_rule(peer.pod_id, port_rule::IN_EXCLUDE, port) {
        return false;
    }
    if peer.flags & POD_IN_ALL_PORTS != 0 {
        return true;
    }
    has_port_rule(peer.pod_id, port_rule::IN_INCLUDE, port)
}
