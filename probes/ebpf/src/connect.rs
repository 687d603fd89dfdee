//! cgroup/connect4 and cgroup/connect6: send a meshed app's connections to its sidecar.
//! Inbound is captured at the receiving pod (`sk_lookup`), so a sidecar's connection
//! keeps its destination; one to a local meshed pod is remembered for acceleration.
//! Everything not positively known to be meshed is left alone (fail open).
use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock_addr,
    helpers::{
        bpf_get_current_uid_gid,
        generated::{bpf_bind, bpf_get_current_cgroup_id, bpf_get_socket_cookie},
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use merbridge_edge_probes_common::{
    Counter, ORIGINAL_DNS, ORIGINAL_PAIR_ONLY, ORIGINAL_REDIRECTED, OriginalDst, POD_DNS_CAPTURE,
    POD_HAS_IP4, POD_HAS_IP6, POD_OUT_VIA_LOOPBACK, PodInfo, as_v4, v4_mapped,
};

use crate::{
    addr::{AF_INET, LOCALHOST4, LOCALHOST6, is_loopback, read_words, write_words},
    maps::{
        POD_BY_CGROUP, POD_BY_IP, accelerate, count, release_tuple_slots, remember, remember_dns,
        reserve_tuple_slots,
    },
    rules::outbound_redirected,
};

const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const DNS_PORT: u16 = 53;

/// What to do with one connect().
pub enum Decision {
    /// Leave the connection alone.
    Pass,
    /// Leave it alone, but remember it so sockops can accelerate the local pair.
    PairOnly,
    /// Rewrite the destination; remember the original with these flags.
    Rewrite {
        addr: [u32; 4],
        port: u16,
        flags: u16,
        bind_loopback: bool,
    },
}

/// The meshed pod the current process belongs to, if any.
#[inline(always)]
pub fn current_pod() -> Option<PodInfo> {
    // SAFETY: helper without arguments.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: the value is copied out before the map can change.
    unsafe { POD_BY_CGROUP.get(&cgroup).copied() }
}

/// The uid of the current process.
#[inline(always)]
pub fn current_uid() -> u32 {
    bpf_get_current_uid_gid() as u32
}

/// The pod's own address in the family of `dst` (v4-mapped for IPv4).
#[inline(always)]
fn own_addr(pod: &PodInfo, dst_is_v4: bool) -> Option<[u32; 4]> {
    if dst_is_v4 {
        (pod.flags & POD_HAS_IP4 != 0).then_some(pod.ip4)
    } else {
        (pod.flags & POD_HAS_IP6 != 0).then_some(pod.ip6)
    }
}

/// Decides what happens to a connect() to `dst:port` from the current process.
#[inline(always)]
pub fn decide(pod: &PodInfo, protocol: u32, dst: &[u32; 4], port: u16) -> Decision {
    let dst_is_v4 = as_v4(dst).is_some();
    let is_proxy = current_uid() == pod.proxy_uid;

    if port == DNS_PORT && pod.flags & POD_DNS_CAPTURE != 0 && !is_proxy && !is_loopback(dst) {
        let to = if dst_is_v4 {
            v4_mapped(LOCALHOST4)
        } else {
            LOCALHOST6
        };
        let flags = if protocol == IPPROTO_UDP {
            ORIGINAL_DNS
        } else {
            0
        };
        return Decision::Rewrite {
            addr: to,
            port: pod.dns_port,
            flags,
            bind_loopback: false,
        };
    }
    if protocol != IPPROTO_TCP {
        return Decision::Pass;
    }
    if is_loopback(dst) {
        return Decision::Pass;
    }
    let own = own_addr(pod, dst_is_v4);
    if own == Some(*dst) {
        // Own pod: the sidecar reaching its app, or an app reaching itself. Never
        // redirected (that would loop), but the pair is local and can be accelerated.
        return Decision::PairOnly;
    }
    if is_proxy {
        // A proxy's connection keeps its destination: a local meshed pod's sidecar
        // receives it through sk_lookup there. The pair is local and can be accelerated.
        // SAFETY: only presence is checked.
        if unsafe { POD_BY_IP.get(dst) }.is_some() {
            return Decision::PairOnly;
        }
        return Decision::Pass;
    }
    if !outbound_redirected(pod, dst, port) {
        return Decision::Pass;
    }
    if pod.flags & POD_OUT_VIA_LOOPBACK != 0 {
        if !dst_is_v4 {
            // A loopback-only listener offers no per-pod address in IPv6: fail open.
            return Decision::Pass;
        }
        return Decision::Rewrite {
            addr: v4_mapped(LOCALHOST4),
            port: pod.outbound_port,
            flags: ORIGINAL_REDIRECTED,
            bind_loopback: true,
        };
    }
    match own {
        Some(addr) => Decision::Rewrite {
            addr,
            port: pod.outbound_port,
            flags: ORIGINAL_REDIRECTED,
            bind_loopback: false,
        },
        None => Decision::Pass,
    }
}

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
    match decision {
        Decision::Pass => count(Counter::PassPolicy, 1),
        Decision::PairOnly => {
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
        Decision::Rewrite {
            addr,
            port: new_port,
            flags,
            bind_loopback,
        } => {
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

/// Rewrites the destination of a sock_addr context (connect or sendmsg).
#[inline(always)]
pub unsafe fn set_destination(sa: *mut bpf_sock_addr, addr: &[u32; 4], port: u16, v4_ctx: bool) {
    // SAFETY: 4-byte stores to the writable user_ip4/user_ip6/user_port fields.
    unsafe {
        if v4_ctx {
            core::ptr::write_volatile(&raw mut (*sa).user_ip4, addr[3]);
        } else {
            write_words(&raw mut (*sa).user_ip6, addr);
        }
        core::ptr::write_volatile(&raw mut (*sa).user_port, u32::from(port.to_be()));
    }
}

/// Reads the destination port (host order) of a sock_addr context.
#[inline(always)]
pub unsafe fn user_port(sa: *const bpf_sock_addr) -> u16 {
    // SAFETY: the caller passes the program context.
    u16::from_be(unsafe { core::ptr::read_volatile(&raw const (*sa).user_port) } as u16)
}

/// cgroup/connect4.
#[cgroup_sock_addr(connect4)]
pub fn mb_connect4(ctx: SockAddrContext) -> i32 {
    let Some(pod) = current_pod() else { return 1 };
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
    let Some(pod) = current_pod() else { return 1 };
    let sa = ctx.sock_addr;
    // SAFETY: reads of readable fields of the connect context.
    let (dst, port, protocol) = unsafe {
        (
            read_words(&raw const (*sa).user_ip6),
            user_port(sa),
            core::ptr::read_volatile(&raw const (*sa).protocol),
        )
    };
    let decision = match decide(&pod, protocol, &dst, port) {
        // bpf_bind with an IPv4 source does not fit a dual-stack socket: fail open.
        Decision::Rewrite {
            bind_loopback: true,
            ..
        } => Decision::Pass,
        d => d,
    };
    apply(&ctx, &pod, decision, dst, port, false);
    1
}
