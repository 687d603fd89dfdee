//! sk_lookup, attached to each pod network namespace: a new TCP connection to a meshed
//! pod's captured port is handed to its sidecar's inbound listener. The packet is not
//! touched: the accepted socket's local address is what the client dialled, so a
//! NetworkPolicy on the node sees the app port, and no conntrack entry is made.
use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    macros::sk_lookup,
    programs::SkLookupContext,
};
use merbridge_edge_probes_common::{Counter, POD_INBOUND_ARMED, SocketTuple};

use crate::{
    addr::{AF_INET, normalise, read_words},
    inbound::{DUAL_STACK_FAMILY, capturing_pod, listener_key},
    maps::{CAPTURED_BY_TUPLE, INBOUND_LISTENERS, count},
};

const IPPROTO_TCP: u32 = 6;

/// sk_lookup.
#[sk_lookup]
pub fn mb_sk_lookup(ctx: SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // SAFETY: reads of readable sk_lookup fields, IPv6 words one at a time.
    let (family, protocol, local, remote, port) = unsafe {
        let family = (*l).family;
        (
            family,
            (*l).protocol,
            normalise(
                family,
                (*l).local_ip4,
                read_words(&raw const (*l).local_ip6),
            ),
            normalise(
                family,
                (*l).remote_ip4,
                read_words(&raw const (*l).remote_ip6),
            ),
            (*l).local_port,
        )
    };
    if protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    let Some(pod) = capturing_pod(&local, &remote, port as u16) else {
        return SK_PASS;
    };
    // The listener registered under the pod (bound while the pod was programmed),
    // else under the sidecar container the pod's status names (bound before).
    let assigned = assign_listener(&ctx, pod.pod_cgroup, family)
        || assign_listener(&ctx, pod.proxy_cgroup, family);
    if !assigned {
        if pod.flags & POD_INBOUND_ARMED == 0 {
            // A sidecar listening since before the agent attached is not known yet:
            // the app gets the connection and the bypass ledger counts it.
            return SK_PASS;
        }
        // The sidecar is not listening (starting, restarting): refused, as the mesh's
        // iptables REDIRECT to a closed port would be; never handed to the app.
        count(Counter::InboundRefused, 1);
        return SK_DROP;
    }
    // For the bypass ledger: sockops finds it when the sidecar's socket is established.
    // SAFETY: a 4-byte load of remote_port works on every kernel (a u32 before 5.19, a
    // be16 and padding since); the port is its low half, in network order.
    let remote_port =
        u16::from_be(
            unsafe { core::ptr::read_volatile(&raw const (*l).remote_port as *const u32) } as u16,
        );
    let captured = SocketTuple::new(local, remote, port, u32::from(remote_port));
    let _ = CAPTURED_BY_TUPLE.insert(&captured, &1, 0);
    count(Counter::RedirectInbound, 1);
    SK_PASS
}

/// Hands the connection to the listener registered under `cgroup` for `family` (or, for
/// IPv4, a dual-stack `[::]` listener there); false when there is none.
#[inline(always)]
fn assign_listener(ctx: &SkLookupContext, cgroup: u64, family: u32) -> bool {
    if cgroup == 0 {
        return false;
    }
    if INBOUND_LISTENERS
        .redirect_sk_lookup(ctx, listener_key(cgroup, family), 0)
        .is_ok()
    {
        return true;
    }
    // A dual-stack [::] listener serves IPv4 too (refused by the kernel if v6only).
    family == AF_INET
        && INBOUND_LISTENERS
            .redirect_sk_lookup(ctx, listener_key(cgroup, DUAL_STACK_FAMILY), 0)
            .is_ok()
}
