//! sockops: when a connection the connect hooks remembered is established, key its
//! original destination by each socket's own view of the connection (for getsockopt)
//! and put both local sockets into the sockhash (for sk_msg).
use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_EXIST, BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_TCP_LISTEN_CB, BPF_TCP_CLOSE, bpf_sock_ops,
    },
    helpers::generated::{bpf_get_socket_cookie, bpf_map_delete_elem},
    macros::sock_ops,
    programs::SockOpsContext,
};
use merbridge_edge_probes_common::{Counter, ORIGINAL_PAIR_ONLY, OriginalDst, SocketTuple};

use crate::{
    addr::{AF_INET, AF_INET6, both_loopback, is_loopback, normalise, read_words},
    inbound::{capturing_pod, is_inbound_port, listener_key},
    netns::{self, Ownership},
    maps::{
        CAPTURED_BY_TUPLE, INBOUND_BINDS, INBOUND_LISTENERS, ORIGINAL_DST_BY_COOKIE,
        ORIGINAL_DST_BY_TUPLE, PAIR_PENDING, POD_BY_IP, REDIRECTING_PODS, SOCK_BY_TUPLE,
        accelerate, count, count_bypass, release_tuple_slots,
    },
};

/// A socket bound to a mesh inbound port now listens: it becomes the inbound listener
/// of the container that bound it; sk_lookup finds it through the pod's sidecar cgroup.
#[inline(always)]
fn register_listener(ctx: &SockOpsContext) {
    // SAFETY: the helper takes the sock_ops context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut _) };
    // SAFETY: copied out at once.
    let Some(cgroup) = (unsafe { INBOUND_BINDS.get(&cookie).copied() }) else {
        return;
    };
    let _ = INBOUND_BINDS.remove(&cookie);
    // SAFETY: the sock_ops context is what the helper expects.
    let ops = unsafe { &mut *ctx.ops };
    let key = listener_key(cgroup, ctx.family());
    if INBOUND_LISTENERS.update(key, ops, BPF_ANY as u64).is_err() {
        count(Counter::MapFull, 1);
    }
}

/// A tuple without its remote port: the key of [`PAIR_PENDING`].
#[inline(always)]
fn without_remote_port(t: &SocketTuple) -> SocketTuple {
    SocketTuple::new(t.local_addr, t.remote_addr, t.local_port, 0)
}

/// An accepted connection on a sidecar inbound port from outside the pod: the pod's
/// own iptables redirected it (see [`REDIRECTING_PODS`]).
#[inline(always)]
fn note_redirecting_pod(tuple: &SocketTuple) {
    if !is_inbound_port(tuple.local_port as u16)
        || tuple.remote_addr == tuple.local_addr
        || is_loopback(&tuple.remote_addr)
    {
        return;
    }
    // SAFETY: only presence is checked.
    if unsafe { POD_BY_IP.get(&tuple.local_addr) }.is_some() {
        let _ = REDIRECTING_PODS.insert(&tuple.local_addr, &1, 0);
    }
}

/// The bypass ledger: an established inbound connection to a meshed pod's captured
/// port that sk_lookup did not hand to the sidecar reached someone else (the app).
#[inline(always)]
fn audit_inbound(tuple: &SocketTuple) {
    if capturing_pod(
        &tuple.local_addr,
        &tuple.remote_addr,
        tuple.local_port as u16,
    )
    .is_none()
    {
        return;
    }
    if CAPTURED_BY_TUPLE.remove(tuple).is_err() {
        count_bypass(&tuple.local_addr);
    }
}

/// This socket's own view of its connection, or None for non-IP sockets.
#[inline(always)]
fn own_tuple(ops: *const bpf_sock_ops) -> Option<SocketTuple> {
    // SAFETY: reads of readable sock_ops fields, IPv6 words one at a time.
    unsafe {
        let family = (*ops).family;
        if family != AF_INET && family != AF_INET6 {
            return None;
        }
        let local = normalise(
            family,
            (*ops).local_ip4,
            read_words(&raw const (*ops).local_ip6),
        );
        let remote = normalise(
            family,
            (*ops).remote_ip4,
            read_words(&raw const (*ops).remote_ip6),
        );
        // remote_port holds the network-order port in its upper half on little endian.
        let remote_port = u16::from_be(((*ops).remote_port >> 16) as u16) as u32;
        Some(SocketTuple::new(
            local,
            remote,
            (*ops).local_port,
            remote_port,
        ))
    }
}

#[inline(always)]
fn record(ctx: &SockOpsContext, tuple: &SocketTuple, original: &OriginalDst) {
    // A new entry takes the slot promised at connect; replacing one (the same tuple
    // still listed) gives the promise back.
    if ORIGINAL_DST_BY_TUPLE
        .insert(tuple, original, BPF_NOEXIST as u64)
        .is_err()
    {
        release_tuple_slots(1);
        if ORIGINAL_DST_BY_TUPLE
            .insert(tuple, original, BPF_EXIST as u64)
            .is_err()
        {
            count(Counter::MapFull, 1);
            return;
        }
    }
    // Ask for state callbacks so the entry goes when the socket closes.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    if accelerate() {
        // SAFETY: the sock_ops context is what the helper expects.
        let ops = unsafe { &mut *ctx.ops };
        if SOCK_BY_TUPLE.update(*tuple, ops, BPF_ANY as u64).is_ok() {
            count(Counter::SockhashAdded, 1);
        } else {
            count(Counter::MapFull, 1);
        }
    }
}

/// sockops, with each socket's network namespace checked against its pod's (5.15+).
#[sock_ops]
pub fn mb_sockops(ctx: SockOpsContext) -> u32 {
    on_sockops::<true>(&ctx)
}

/// sockops for kernels that cannot tell a sockops socket's network namespace; the
/// agent runs it with acceleration off.
#[sock_ops]
pub fn mb_sockops_compat(ctx: SockOpsContext) -> u32 {
    on_sockops::<false>(&ctx)
}

/// Whose socket this is; with `CHECK_NETNS` off, every socket counts as its pod's own.
#[inline(always)]
fn ownership<const CHECK_NETNS: bool>(ctx: &SockOpsContext, tuple: &SocketTuple) -> Ownership {
    if CHECK_NETNS {
        netns::ownership(ctx.ops as *mut _, tuple)
    } else {
        Ownership::Own
    }
}

#[inline(always)]
fn on_sockops<const CHECK_NETNS: bool>(ctx: &SockOpsContext) -> u32 {
    let Some(tuple) = own_tuple(ctx.ops) else {
        return 1;
    };
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            // SAFETY: the helper takes the sock_ops context.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut _) };
            // SAFETY: copied out at once.
            let Some(original) = (unsafe { ORIGINAL_DST_BY_COOKIE.get(&cookie).copied() }) else {
                return 1;
            };
            // Whoever takes the entry out (this, or the socket's release) owns the
            // two tuple entries promised at connect.
            if ORIGINAL_DST_BY_COOKIE.remove(&cookie).is_err() {
                return 1;
            }
            if both_loopback(&tuple.local_addr, &tuple.remote_addr)
                || ownership::<CHECK_NETNS>(ctx, &tuple) != Ownership::Own
            {
                release_tuple_slots(2);
                return 1;
            }
            record(ctx, &tuple, &original);
            if original.flags & ORIGINAL_PAIR_ONLY != 0 && accelerate() {
                let _ = PAIR_PENDING.insert(&without_remote_port(&tuple), &tuple.remote_port, 0);
            }
        }
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            // SAFETY: the helper takes the sock_ops context.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut _) };
            // A remembered connect: if it never gets established, its close gives
            // the promised tuple entries back.
            // SAFETY: only presence is checked.
            if unsafe { ORIGINAL_DST_BY_COOKIE.get(&cookie) }.is_some() {
                let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            }
        }
        BPF_SOCK_OPS_TCP_LISTEN_CB => register_listener(ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            let owned = ownership::<CHECK_NETNS>(ctx, &tuple);
            if owned == Ownership::Foreign {
                // Another pod claiming this pod's addresses: not its connection to
                // audit, pair, or record.
                return 1;
            }
            audit_inbound(&tuple);
            note_redirecting_pod(&tuple);
            if owned != Ownership::Own {
                return 1;
            }
            let peer = tuple.reversed();
            // SAFETY: copied out at once.
            let pending = unsafe { PAIR_PENDING.get(&without_remote_port(&peer)).copied() };
            if pending.is_some() {
                let _ = PAIR_PENDING.remove(&without_remote_port(&peer));
            }
            // SAFETY: copied out at once.
            let Some(original) = (unsafe { ORIGINAL_DST_BY_TUPLE.get(&peer).copied() }) else {
                if let Some(port) = pending {
                    // The connecting side dialled another port (the mesh's REDIRECT
                    // changed it): it has no peer to pair with, and a socket left in the
                    // sockhash with its data passing over NAT was seen reset under load.
                    let dialled =
                        SocketTuple::new(peer.local_addr, peer.remote_addr, peer.local_port, port);
                    // SAFETY: the map is this program's sockhash, the key its key type.
                    let _ = unsafe {
                        bpf_map_delete_elem(
                            &raw const SOCK_BY_TUPLE as *mut core::ffi::c_void,
                            &raw const dialled as *const core::ffi::c_void,
                        )
                    };
                    // This side's entry, promised at connect, will never be made.
                    release_tuple_slots(1);
                }
                return 1;
            };
            record(ctx, &tuple, &original);
        }
        BPF_SOCK_OPS_STATE_CB => {
            if ctx.arg(1) == BPF_TCP_CLOSE {
                // Only the pod's own socket takes its connection's entry with it.
                if ownership::<CHECK_NETNS>(ctx, &tuple) == Ownership::Own
                    && ORIGINAL_DST_BY_TUPLE.remove(&tuple).is_ok()
                {
                    release_tuple_slots(1);
                }
                // SAFETY: the helper takes the sock_ops context.
                let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut _) };
                if ORIGINAL_DST_BY_COOKIE.remove(&cookie).is_ok() {
                    // Closed before it was established: both promised entries return.
                    release_tuple_slots(2);
                }
            }
        }
        _ => {}
    }
    1
}
