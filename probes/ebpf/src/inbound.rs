//! Inbound capture, shared by the hooks that take part in it: which connections into a
//! meshed pod belong to its sidecar, and the keys of the sidecar's listening sockets.
use merbridge_edge_probes_common::{ListenerKey, LocalPod};

use crate::{
    addr::{AF_INET6, is_loopback},
    maps::{INBOUND_PORTS, POD_BY_IP},
    rules::{inbound_redirected, inbound_source_excluded},
};

/// The meshed pod whose address is `local`, when a connection from `remote` to
/// `local:port` is one its sidecar must receive: the pod is meshed, the port is
/// captured, and the connection comes from outside the pod (not from its own address
/// or loopback: the sidecar's own passthrough to its app, or the app reaching itself,
/// are never captured, as with the meshes' PREROUTING-only inbound rules), and not
/// from a source range the pod's mesh leaves to the app.
#[inline(always)]
pub fn capturing_pod(local: &[u32; 4], remote: &[u32; 4], port: u16) -> Option<LocalPod> {
    if remote == local || is_loopback(remote) {
        return None;
    }
    // SAFETY: copied out at once.
    let pod = unsafe { POD_BY_IP.get(local).copied() }?;
    (inbound_redirected(&pod, port) && !inbound_source_excluded(&pod, remote)).then_some(pod)
}

/// The key of a listener registered under pod or container cgroup `cgroup`, of `family`.
#[inline(always)]
pub const fn listener_key(cgroup: u64, family: u32) -> ListenerKey {
    ListenerKey {
        cgroup,
        family,
        _pad: 0,
    }
}

/// Whether `port` is a sidecar inbound port of some mesh or pod on this node.
#[inline(always)]
pub fn is_inbound_port(port: u16) -> bool {
    // SAFETY: only presence is checked.
    port != 0 && unsafe { INBOUND_PORTS.get(&port) }.is_some()
}

/// AF_INET6, for the dual-stack fallback of IPv4 lookups.
pub const DUAL_STACK_FAMILY: u32 = AF_INET6;
