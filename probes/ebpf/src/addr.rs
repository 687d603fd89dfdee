//! Reading and writing addresses in program contexts. The kernel accepts only 4-byte
//! accesses to the IPv6 address words, so each word is read and written on its own.
use merbridge_edge_probes_common::{as_v4, v4_mapped};

/// AF_INET.
pub const AF_INET: u32 = 2;
/// AF_INET6.
pub const AF_INET6: u32 = 10;
/// 127.0.0.1 in network byte order.
pub const LOCALHOST4: u32 = u32::from_be(0x7f00_0001);
/// ::1 in network byte order.
pub const LOCALHOST6: [u32; 4] = [0, 0, 0, u32::from_be(1)];

/// Reads four u32 words one by one.
#[inline(always)]
pub unsafe fn read_words(p: *const [u32; 4]) -> [u32; 4] {
    let w = p as *const u32;
    unsafe {
        [
            core::ptr::read_volatile(w),
            core::ptr::read_volatile(w.add(1)),
            core::ptr::read_volatile(w.add(2)),
            core::ptr::read_volatile(w.add(3)),
        ]
    }
}

/// Writes four u32 words one by one.
#[inline(always)]
pub unsafe fn write_words(p: *mut [u32; 4], v: &[u32; 4]) {
    let w = p as *mut u32;
    unsafe {
        core::ptr::write_volatile(w, v[0]);
        core::ptr::write_volatile(w.add(1), v[1]);
        core::ptr::write_volatile(w.add(2), v[2]);
        core::ptr::write_volatile(w.add(3), v[3]);
    }
}

/// Normalises a socket address of either family to the v4-mapped/v6 form.
#[inline(always)]
pub fn normalise(family: u32, ip4: u32, ip6: [u32; 4]) -> [u32; 4] {
    if family == AF_INET {
        v4_mapped(ip4)
    } else {
        ip6
    }
}

/// Whether an address (v4-mapped or v6) is a loopback address.
#[inline(always)]
pub fn is_loopback(addr: &[u32; 4]) -> bool {
    match as_v4(addr) {
        Some(ip4) => ip4 & 0xff == 127,
        None => *addr == LOCALHOST6,
    }
}

/// Whether an address is a per-pod loopback source (127.128.0.0/10 + pod id, bound by
/// the connect hooks for meshes whose outbound listener is loopback-only).
#[inline(always)]
pub fn is_pod_loopback_source(addr: &[u32; 4]) -> bool {
    as_v4(addr).is_some_and(|ip4| u32::from_be(ip4) & 0xffc0_0000 == 0x7f80_0000)
}

/// Whether both ends of a connection are loopback addresses shared by every pod. Every
/// pod has its own loopback, so such tuples may repeat across pods and never go into
/// tuple-keyed maps; a per-pod loopback source names its pod, so its tuples are unique.
#[inline(always)]
pub fn both_loopback(a: &[u32; 4], b: &[u32; 4]) -> bool {
    is_loopback(a) && is_loopback(b) && !is_pod_loopback_source(a) && !is_pod_loopback_source(b)
}
