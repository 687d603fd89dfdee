//! cgroup/post_bind4 and post_bind6, for the sidecar's TCP listeners.
//! - A socket bound to a mesh inbound port is remembered by cookie with the cgroup its
//!   listener is registered under once it listens (sockops): the pod's cgroup when the
//!   pod is programmed, so a sidecar restarted in a new container is found at once;
//!   otherwise the container's (a sidecar may listen before the kubelet reports its
//!   pod), which the agent then learns from the pod's status.
//! - A container of a programmed pod binding the pod's sidecar outbound or inbound
//!   port is that pod's sidecar: its connections are never redirected, whatever its
//!   uid (user namespaces, a proxy run as another uid).
use aya_ebpf::{
    EbpfContext, helpers::generated::bpf_get_socket_cookie, macros::cgroup_sock,
    programs::SockContext,
};

use crate::{
    inbound::is_inbound_port,
    maps::{INBOUND_BINDS, PROXY_CGROUPS},
    netns,
    pods::{current_cgroup, current_pod},
};

const IPPROTO_TCP: u32 = 6;

#[inline(always)]
fn on_bind(ctx: &SockContext) {
    let sk = ctx.sock;
    // SAFETY: reads of readable bpf_sock fields.
    let (protocol, port) = unsafe { ((*sk).protocol, (*sk).src_port as u16) };
    if protocol != IPPROTO_TCP || port == 0 {
        return;
    }
    let container = current_cgroup();
    let pod = current_pod();
    let mut key = container;
    if let Some((pod_cgroup, info)) = pod {
        netns::learn(info.pod_id, ctx.as_ptr());
        if port == info.outbound_port || port == info.inbound_port {
            // LRU: entries of containers that are gone age out.
            let _ = PROXY_CGROUPS.insert(&container, &pod_cgroup, 0);
        }
        key = pod_cgroup;
    }
    if !is_inbound_port(port) {
        return;
    }
    // SAFETY: helper taking the program context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // LRU: a bound socket that never listens just ages out.
    let _ = INBOUND_BINDS.insert(&cookie, &key, 0);
}

/// cgroup/post_bind4.
#[cgroup_sock(post_bind4)]
pub fn mb_post_bind4(ctx: SockContext) -> i32 {
    on_bind(&ctx);
    1
}

/// cgroup/post_bind6.
#[cgroup_sock(post_bind6)]
pub fn mb_post_bind6(ctx: SockContext) -> i32 {
    on_bind(&ctx);
    1
}
