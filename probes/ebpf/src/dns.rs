//! DNS capture for meshes with a DNS proxy (Istio, Kuma): UDP datagrams to port 53 go
//! to the sidecar's DNS port on loopback, and replies come back looking as if the
//! original server sent them. TCP DNS is handled by the connect hooks.
use aya_ebpf::{
    EbpfContext, bindings::bpf_sock_addr, helpers::generated::bpf_get_socket_cookie,
    macros::cgroup_sock_addr, programs::SockAddrContext,
};
use merbridge_edge_probes_common::{Counter, ORIGINAL_DNS, OriginalDst, as_v4, v4_mapped};

use crate::{
    addr::{LOCALHOST4, LOCALHOST6, read_words, write_words},
    maps::{DNS_ORIGINAL_BY_COOKIE, count, remember_dns},
    pods::current_pod,
    redirect::{Action, IPPROTO_UDP, decide, set_destination, user_port},
};

#[inline(always)]
fn on_sendmsg(ctx: &SockAddrContext, v4_ctx: bool) {
    let Some((_, pod)) = current_pod() else { return };
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: reads of readable fields of the sendmsg context.
    let (dst, port) = unsafe {
        let dst = if v4_ctx {
            v4_mapped(core::ptr::read_volatile(&raw const (*sa).user_ip4))
        } else {
            read_words(&raw const (*sa).user_ip6)
        };
        (dst, user_port(sa))
    };
    let decision = decide(&pod, IPPROTO_UDP, &dst, port);
    if decision.action != Action::Rewrite {
        return;
    }
    let (addr, to_port, flags) = (decision.addr, decision.port, decision.flags);
    if flags & ORIGINAL_DNS == 0 {
        return;
    }
    // SAFETY: the helper takes the program context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let original = OriginalDst {
        addr: dst,
        port,
        flags,
        pod_id: pod.pod_id,
    };
    if !remember_dns(&cookie, &original) {
        return;
    }
    // SAFETY: sa is this program's context.
    unsafe { set_destination(sa, &addr, to_port, v4_ctx) };
    count(Counter::DnsRedirected, 1);
}

#[inline(always)]
fn on_recvmsg(ctx: &SockAddrContext, v4_ctx: bool) {
    let Some((_, pod)) = current_pod() else { return };
    // SAFETY: the helper takes the program context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    let Some(original) = (unsafe { DNS_ORIGINAL_BY_COOKIE.get(&cookie).copied() }) else {
        return;
    };
    if original.flags & ORIGINAL_DNS == 0 {
        return;
    }
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: reads and 4-byte stores of the recvmsg context's source address.
    unsafe {
        if user_port(sa) != pod.dns_port {
            return;
        }
        if v4_ctx {
            let Some(ip4) = as_v4(&original.addr) else {
                return;
            };
            if core::ptr::read_volatile(&raw const (*sa).user_ip4) != LOCALHOST4 {
                return;
            }
            core::ptr::write_volatile(&raw mut (*sa).user_ip4, ip4);
        } else {
            let from = read_words(&raw const (*sa).user_ip6);
            if from != LOCALHOST6 && from != v4_mapped(LOCALHOST4) {
                return;
            }
            write_words(&raw mut (*sa).user_ip6, &original.addr);
        }
        core::ptr::write_volatile(&raw mut (*sa).user_port, u32::from(original.port.to_be()));
    }
    count(Counter::DnsRepliesRestored, 1);
}

/// cgroup/sendmsg4.
#[cgroup_sock_addr(sendmsg4)]
pub fn mb_sendmsg4(ctx: SockAddrContext) -> i32 {
    on_sendmsg(&ctx, true);
    1
}

/// cgroup/sendmsg6.
#[cgroup_sock_addr(sendmsg6)]
pub fn mb_sendmsg6(ctx: SockAddrContext) -> i32 {
    on_sendmsg(&ctx, false);
    1
}

/// cgroup/recvmsg4.
#[cgroup_sock_addr(recvmsg4)]
pub fn mb_recvmsg4(ctx: SockAddrContext) -> i32 {
    on_recvmsg(&ctx, true);
    1
}

/// cgroup/recvmsg6.
#[cgroup_sock_addr(recvmsg6)]
pub fn mb_recvmsg6(ctx: SockAddrContext) -> i32 {
    on_recvmsg(&ctx, false);
    1
}
