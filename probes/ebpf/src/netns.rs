//! Which network namespace a pod's sockets live in, so that a socket in another pod's
//! namespace that claims the pod's addresses (a pod with NET_ADMIN can put any address
//! on its own loopback) never enters or changes the tuple-keyed state of that pod.
//!
//! The namespace of each pod is learnt from its own processes (connect, bind: process
//! context, the pod known by its cgroup, which a pod cannot leave). A socket is the
//! pod's own when its namespace is the one learnt; an unknown namespace is not trusted.
use aya_ebpf::helpers::generated::bpf_get_netns_cookie;
use merbridge_edge_probes_common::{Counter, SocketTuple, as_v4};

use crate::{
    addr::is_pod_loopback_source,
    maps::{NETNS_BY_POD, POD_BY_IP, count},
};

/// Records that pod `pod_id`'s processes live in the network namespace of the socket
/// behind `ctx` (a sock_addr or sock context).
#[inline(always)]
pub fn learn(pod_id: u32, ctx: *mut core::ffi::c_void) {
    // SAFETY: the helper takes the program context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx) };
    // SAFETY: copied out at once.
    if unsafe { NETNS_BY_POD.get(&pod_id).copied() } != Some(cookie) {
        let _ = NETNS_BY_POD.insert(&pod_id, &cookie, 0);
    }
}

/// The pod whose sockets may hold `tuple`: the pod a per-pod loopback source names,
/// else the meshed pod whose address is the local one.
#[inline(always)]
fn owner(tuple: &SocketTuple) -> Option<u32> {
    for addr in [&tuple.local_addr, &tuple.remote_addr] {
        if is_pod_loopback_source(addr) {
            let ip4 = u32::from_be(as_v4(addr).unwrap_or(0));
            return Some(ip4 & 0x003f_ffff);
        }
    }
    // SAFETY: copied out at once.
    unsafe { POD_BY_IP.get(&tuple.local_addr) }.map(|p| p.pod_id)
}

/// Whether a socket is in the network namespace of the pod its addresses name.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Ownership {
    /// It is: the pod's own socket.
    Own,
    /// It is in another namespace: a socket claiming the pod's addresses.
    Foreign,
    /// No meshed pod is named, or the pod's namespace is not learnt yet.
    Unknown,
}

/// Whose the socket behind the sockops context `ctx` is, whose view of its
/// connection is `tuple`. Foreign sockets are counted.
#[inline(always)]
pub fn ownership(ctx: *mut core::ffi::c_void, tuple: &SocketTuple) -> Ownership {
    let Some(pod_id) = owner(tuple) else {
        return Ownership::Unknown;
    };
    // SAFETY: copied out at once.
    let Some(expected) = (unsafe { NETNS_BY_POD.get(&pod_id).copied() }) else {
        return Ownership::Unknown;
    };
    // SAFETY: the helper takes the program context.
    if unsafe { bpf_get_netns_cookie(ctx) } == expected {
        return Ownership::Own;
    }
    count(Counter::ForeignSocket, 1);
    Ownership::Foreign
}
