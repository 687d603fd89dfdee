//! cgroup/getsockopt: answers the proxy's `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`
//! for redirected connections and for inbound connections sk_lookup captured; every other option passes through untouched.
use aya_ebpf::{bindings::bpf_sockopt, macros::cgroup_sockopt, programs::SockoptContext};
use merbridge_edge_probes_common::{Counter, ORIGINAL_REDIRECTED, OriginalDst, SocketTuple, as_v4};

use crate::{
    addr::{AF_INET, AF_INET6, normalise, read_words},
    inbound::capturing_pod,
    maps::{ORIGINAL_DST_BY_TUPLE, count},
};

const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
const SO_ORIGINAL_DST: i32 = 80;
const SOCKADDR_IN_LEN: usize = 16;
const SOCKADDR_IN6_LEN: usize = 28;

/// cgroup/getsockopt.
#[cgroup_sockopt(getsockopt)]
pub fn mb_getsockopt(ctx: SockoptContext) -> i32 {
    let so = ctx.sockopt;
    // SAFETY: ctx fields the kernel lets getsockopt programs read.
    let (level, optname, optlen, start, end) = unsafe {
        (
            (*so).level,
            (*so).optname,
            (*so).optlen,
            (*so).__bindgen_anon_2.optval as usize,
            (*so).__bindgen_anon_3.optval_end as usize,
        )
    };
    if optname == SO_ORIGINAL_DST && (level == SOL_IP || level == SOL_IPV6) {
        // SAFETY: bounds are checked against optval_end before every store.
        if unsafe { answer_original_dst(so, level, start, end) } {
            count(Counter::GetsockoptAnswered, 1);
            return 1;
        }
    }
    // The kernel hands programs at most one page of the value. When the real value is
    // longer, optlen = 0 tells it to keep the kernel's own answer untouched.
    // Pages are at most 64 KiB; a bounded length keeps the pointer sum verifiable.
    let too_long = optlen > 0xfff0 || (optlen > 0 && start + optlen as usize > end);
    if too_long {
        // SAFETY: optlen is writable in getsockopt programs.
        unsafe { (*so).optlen = 0 };
    }
    1
}

/// A socket sk_lookup handed to this pod's sidecar keeps the address the client
/// dialled as its own local address: that is its original destination, for sockets on
/// a meshed pod's address and a captured port. (The answer is the socket's own local
/// address, nothing its holder does not know; so no check of who asks, which the
/// getsockopt hook could not make on 5.10: no cgroup ancestor helper there.)
#[inline(always)]
fn captured_inbound(tuple: &SocketTuple) -> Option<OriginalDst> {
    let port = tuple.local_port as u16;
    let pod = capturing_pod(&tuple.local_addr, &tuple.remote_addr, port)?;
    Some(OriginalDst {
        addr: tuple.local_addr,
        port,
        flags: ORIGINAL_REDIRECTED,
        pod_id: pod.pod_id,
    })
}

/// Writes the remembered destination as sockaddr_in/sockaddr_in6; false if unknown.
#[inline(always)]
unsafe fn answer_original_dst(so: *mut bpf_sockopt, level: i32, start: usize, end: usize) -> bool {
    // SAFETY: the caller passes the program context; sk is checked for null.
    unsafe {
        let sk = (*so).__bindgen_anon_1.sk;
        if sk.is_null() {
            return false;
        }
        let family = (*sk).family;
        if family != AF_INET && family != AF_INET6 {
            return false;
        }
        let local = normalise(family, (*sk).src_ip4, read_words(&raw const (*sk).src_ip6));
        let remote = normalise(family, (*sk).dst_ip4, read_words(&raw const (*sk).dst_ip6));
        let local_port = (*sk).src_port;
        // A 4-byte load of dst_port works on every kernel; the port is its low half.
        let remote_port =
            u16::from_be(core::ptr::read_volatile(&raw const (*sk).dst_port as *const u32) as u16);
        let tuple = SocketTuple::new(local, remote, local_port, remote_port as u32);
        let original = match ORIGINAL_DST_BY_TUPLE.get(&tuple).copied() {
            Some(o) if o.flags & ORIGINAL_REDIRECTED != 0 => o,
            _ => match captured_inbound(&tuple) {
                Some(o) => o,
                None => return false,
            },
        };
        let port_be = original.port.to_be();
        if level == SOL_IP {
            let Some(ip4) = as_v4(&original.addr) else {
                return false;
            };
            if start + SOCKADDR_IN_LEN > end {
                return false;
            }
            let p = start as *mut u8;
            core::ptr::write_volatile(p as *mut u16, AF_INET as u16);
            core::ptr::write_volatile(p.add(2) as *mut u16, port_be);
            core::ptr::write_volatile(p.add(4) as *mut u32, ip4);
            core::ptr::write_volatile(p.add(8) as *mut u64, 0);
            (*so).optlen = SOCKADDR_IN_LEN as i32;
        } else {
            if start + SOCKADDR_IN6_LEN > end {
                return false;
            }
            let p = start as *mut u8;
            core::ptr::write_volatile(p as *mut u16, AF_INET6 as u16);
            core::ptr::write_volatile(p.add(2) as *mut u16, port_be);
            core::ptr::write_volatile(p.add(4) as *mut u32, 0);
            core::ptr::write_volatile(p.add(8) as *mut u32, original.addr[0]);
            core::ptr::write_volatile(p.add(12) as *mut u32, original.addr[1]);
            core::ptr::write_volatile(p.add(16) as *mut u32, original.addr[2]);
            core::ptr::write_volatile(p.add(20) as *mut u32, original.addr[3]);
            core::ptr::write_volatile(p.add(24) as *mut u32, 0);
            (*so).optlen = SOCKADDR_IN6_LEN as i32;
        }
        (*so).retval = 0;
        true
    }
}
