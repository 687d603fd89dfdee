//! cgroup/post_bind4 and post_bind6: a TCP socket bound to a mesh inbound port is
//! remembered by cookie with its container's cgroup, so that sockops can register it as
//! that container's inbound listener once it listens. The pod need not be known yet
//! (a sidecar may listen before the kubelet reports its container).
use aya_ebpf::{
    EbpfContext,
    helpers::generated::{bpf_get_current_cgroup_id, bpf_get_socket_cookie},
    macros::cgroup_sock,
    programs::SockContext,
};

use crate::{inbound::is_inbound_port, maps::INBOUND_BINDS};

const IPPROTO_TCP: u32 = 6;

#[inline(always)]
fn on_bind(ctx: &SockContext) {
    let sk = ctx.sock;
    // SAFETY: reads of readable bpf_sock fields.
    let (protocol, port) = unsafe { ((*sk).protocol, (*sk).src_port as u16) };
    if protocol != IPPROTO_TCP || !is_inbound_port(port) {
        return;
    }
    // SAFETY: helpers taking the program context or nothing.
    let (cookie, cgroup) = unsafe {
        (
            bpf_get_socket_cookie(ctx.as_ptr()),
            bpf_get_current_cgroup_id(),
        )
    };
    // LRU: a bound socket that never listens just ages out.
    let _ = INBOUND_BINDS.insert(&cookie, &cgroup, 0);
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
