//! cgroup/connect4 and cgroup/connect6: send a meshed app's connections to its sidecar.
//! Inbound is captured at the receiving pod (`sk_lookup`), so a sidecar's connection
//! keeps its destination; one to a local meshed pod is remembered for acceleration.
//! Everything not positively known to be meshed is left alone (fail open).
use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock_addr,
    helpers::generated::{bpf_bind, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use merbridge_edge_probes_common::{
    Counter, ORIGINAL_PAIR_ONLY, ORIGINAL_REDIRECTED, OriginalDst, PodInfo, v4_mapped,
};

use crate::{
    addr::{AF_INET, read_words},
    maps::{accelerate, count, release_tuple_slots, remember, remember_dns, reserve_tuple_slots},
    netns,
    pods::current_pod,
    redirect::{Action, Decision, decide, set_destination, user_port},
};

/// The per-pod loopback source address (127.128.0.0/10 + pod id), network byte order,
/// that keeps loopback-listener redirects unique across pods.
#[inline(always)]
fn pod_loopback_source(pod_id: u32) -> u32 {
    u32::from_be(0x7f80_0000 | (pod_id & 0x003f_ffff))
}

#[repr(C)]
struct SockaddrIn {
    family: u16,
    port: u16,
    addr: u32,
    zero: [u8; 8],
}

/// Applies a decision to the context and records what sockops and getsockopt need.
#[inline(always)]
fn apply(
    ctx: &SockAddrContext,
    pod: &PodInfo,
    decision: Decision,
    dst: [u32; 4],
    port: u16,
    v4_ctx: bool,
) {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the helper takes the program context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    match decision.action {
        Action::Pass => count(Counter::PassPolicy, 1),
        Action::PairOnly => {
            count(Counter::PassPolicy, 1);
            // Accelerated only if both ends' entries fit (else just not accelerated).
            if accelerate() && reserve_tuple_slots(2) {
                let original = OriginalDst {
                    addr: dst,
                    port,
                    flags: ORIGINAL_PAIR_ONLY,
                    pod_id: pod.pod_id,
                };
                if !remember(&cookie, &original) {
                    release_tuple_slots(2);
                }
            }
        }
        Action::Rewrite => {
            let (addr, new_port, flags, bind_loopback) = (
                decision.addr,
                decision.port,
                decision.flags,
                decision.bind_loopback,
            );
            // A TCP redirect to a proxy needs two tuple entries (this socket and its
            // peer) for the proxy's SO_ORIGINAL_DST: promised now, or no redirect.
            let tcp = flags & ORIGINAL_REDIRECTED != 0;
            if tcp && !reserve_tuple_slots(2) {
                count(Counter::MapFull, 1);
                return;
            }
            if bind_loopback {
                let source = SockaddrIn {
                    family: AF_INET as u16,
                    port: 0,
                    addr: pod_loopback_source(pod.pod_id),
                    zero: [0; 8],
                };
                // SAFETY: a sockaddr_in on the stack, its exact size.
                let ret = unsafe {
                    bpf_bind(
                        sa,
                        &source as *const SockaddrIn as *mut _,
                        size_of::<SockaddrIn>() as i32,
                    )
                };
                if ret != 0 {
                    if tcp {
                        release_tuple_slots(2);
                    }
                    count(Counter::PassPolicy, 1);
                    return;
                }
            }
            let original = OriginalDst {
                addr: dst,
                port,
                flags,
                pod_id: pod.pod_id,
            };
            // Nowhere to remember it: no redirect (fail open).
            let remembered = if tcp {
                remember(&cookie, &original)
            } else {
                remember_dns(&cookie, &original)
            };
            if !remembered {
                if tcp {
                    release_tuple_slots(2);
                }
                return;
            }
            // SAFETY: sa is this program's context.
            unsafe { set_destination(sa, &addr, new_port, v4_ctx) };
            let counter = if flags & ORIGINAL_REDIRECTED == 0 {
                Counter::DnsRedirected
            } else {
                Counter::RedirectOutbound
            };
            count(counter, 1);
        }
    }
}

/// cgroup/connect4.
#[cgroup_sock_addr(connect4)]
pub fn mb_connect4(ctx: SockAddrContext) -> i32 {
    let Some((_, pod)) = current_pod() else { return 1 };
    netns::learn(pod.pod_id, ctx.as_ptr());
    let sa = ctx.sock_addr;
    // SAFETY: reads of readable fields of the connect context.
    let (dst, port, protocol) = unsafe {
        (
            v4_mapped(core::ptr::read_volatile(&raw const (*sa).user_ip4)),
            user_port(sa),
            core::ptr::read_volatile(&raw const (*sa).protocol),
        )
    };
    let decision = decide(&pod, protocol, &dst, port);
    apply(&ctx, &pod, decision, dst, port, true);
    1
}

/// cgroup/connect6 (IPv6 and v4-mapped destinations of dual-stack sockets).
#[cgroup_sock_addr(connect6)]
pub fn mb_connect6(ctx: SockAddrContext) -> i32 {
    let Some((_, pod)) = current_pod() else { return 1 };
    netns::learn(pod.pod_id, ctx.as_ptr());
    let sa = ctx.sock_addr;
    // SAFETY: reads of readable fields of the connect context.
    let (dst, port, protocol) = unsafe {
        (
            read_words(&raw const (*sa).user_ip6),
            user_port(sa),
            core::ptr::read_volatile(&raw const (*sa).protocol),
        )
    };
    let mut decision = decide(&pod, protocol, &dst, port);
    if decision.action == Action::Rewrite && decision.bind_loopback {
        // bpf_bind with an IPv4 source does not fit a dual-stack socket: fail open.
        decision = Decision::PASS;
    }
    apply(&ctx, &pod, decision, dst, port, false);
    1
}
