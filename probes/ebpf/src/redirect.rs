//! What the sock_addr hooks share: the decision for a connect() or sendmsg() from a
//! pod (`decide`, pure apart from map lookups) and the reads and rewrites of a
//! sock_addr context's destination. The connect hooks (`connect`) and the DNS hooks
//! (`dns`) both use it; neither imports the other.
use aya_ebpf::bindings::bpf_sock_addr;
use merbridge_edge_probes_common::{
    ORIGINAL_DNS, ORIGINAL_REDIRECTED, POD_DNS_CAPTURE, POD_HAS_IP4, POD_HAS_IP6,
    POD_OUT_VIA_LOOPBACK, PodInfo, as_v4, v4_mapped,
};

use crate::{
    addr::{LOCALHOST4, LOCALHOST6, is_loopback, write_words},
    maps::{POD_BY_IP, REDIRECTING_PODS},
    pods::is_proxy,
    rules::outbound_redirected,
};

/// IP protocol number of TCP (`protocol` of a sock_addr context).
pub const IPPROTO_TCP: u32 = 6;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u32 = 17;
const DNS_PORT: u16 = 53;

/// The kind of a [`Decision`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Leave the connection alone.
    Pass,
    /// Leave it alone, but remember it so sockops can accelerate the local pair.
    PairOnly,
    /// Rewrite the destination; remember the original with `flags`.
    Rewrite,
}

/// What to do with one connect(). A struct whose fields are always set, not an enum
/// with fields per variant: those leave registers undefined on some paths, and the
/// verifier refuses a program that spills one ("R4 !read_ok"), depending on how the
/// compiler happened to lay the code out.
#[derive(Clone, Copy)]
pub struct Decision {
    /// What to do.
    pub action: Action,
    /// New destination address (Rewrite).
    pub addr: [u32; 4],
    /// New destination port (Rewrite).
    pub port: u16,
    /// `ORIGINAL_*` flags to remember (Rewrite).
    pub flags: u16,
    /// Bind the per-pod loopback source first (Rewrite to a loopback-only listener).
    pub bind_loopback: bool,
}

impl Decision {
    /// Leave the connection alone.
    pub const PASS: Self = Self::of(Action::Pass, [0; 4], 0, 0, false);
    /// Remember the connection for pairing only.
    pub const PAIR_ONLY: Self = Self::of(Action::PairOnly, [0; 4], 0, 0, false);

    /// Rewrite to `addr:port`, remembering the original with `flags`.
    pub const fn rewrite(addr: [u32; 4], port: u16, flags: u16, bind_loopback: bool) -> Self {
        Self::of(Action::Rewrite, addr, port, flags, bind_loopback)
    }

    const fn of(
        action: Action,
        addr: [u32; 4],
        port: u16,
        flags: u16,
        bind_loopback: bool,
    ) -> Self {
        Self {
            action,
            addr,
            port,
            flags,
            bind_loopback,
        }
    }
}

/// The pod's own address in the family of `dst` (v4-mapped for IPv4), and whether it
/// has one. Both always set (no `Option` of an array: its payload is undefined when
/// empty, and a spilled undefined register fails the verifier).
#[inline(always)]
fn own_addr(pod: &PodInfo, dst_is_v4: bool) -> ([u32; 4], bool) {
    if dst_is_v4 {
        (pod.ip4, pod.flags & POD_HAS_IP4 != 0)
    } else {
        (pod.ip6, pod.flags & POD_HAS_IP6 != 0)
    }
}

/// Decides what happens to a connect() to `dst:port` from the current process.
#[inline(always)]
pub fn decide(pod: &PodInfo, protocol: u32, dst: &[u32; 4], port: u16) -> Decision {
    let dst_is_v4 = as_v4(dst).is_some();
    let is_proxy = is_proxy(pod);

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
        return Decision::rewrite(to, pod.dns_port, flags, false);
    }
    if protocol != IPPROTO_TCP {
        return Decision::PASS;
    }
    if is_loopback(dst) {
        return Decision::PASS;
    }
    let (own, has_own) = own_addr(pod, dst_is_v4);
    if has_own && own == *dst {
        // Own pod: the sidecar reaching its app, or an app reaching itself. Never
        // redirected (that would loop), but the pair is local and can be accelerated,
        // unless the pod's own iptables are there (its connections are tracked).
        // SAFETY: only presence is checked.
        if unsafe { REDIRECTING_PODS.get(dst) }.is_some() {
            return Decision::PASS;
        }
        return Decision::PAIR_ONLY;
    }
    if is_proxy {
        // A proxy's connection keeps its destination: a local meshed pod's sidecar
        // receives it through sk_lookup there. The pair is local and can be accelerated,
        // unless that pod's own iptables redirect it to another port.
        // SAFETY: only presence is checked.
        if unsafe { POD_BY_IP.get(dst).is_some() && REDIRECTING_PODS.get(dst).is_none() } {
            return Decision::PAIR_ONLY;
        }
        return Decision::PASS;
    }
    if !outbound_redirected(pod, dst, port) {
        return Decision::PASS;
    }
    if pod.flags & POD_OUT_VIA_LOOPBACK != 0 {
        if !dst_is_v4 {
            // A loopback-only listener offers no per-pod address in IPv6: fail open.
            return Decision::PASS;
        }
        return Decision::rewrite(
            v4_mapped(LOCALHOST4),
            pod.outbound_port,
            ORIGINAL_REDIRECTED,
            true,
        );
    }
    if has_own {
        Decision::rewrite(own, pod.outbound_port, ORIGINAL_REDIRECTED, false)
    } else {
        Decision::PASS
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
