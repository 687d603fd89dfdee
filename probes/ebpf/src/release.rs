//! cgroup/sock_release: a socket whose connect was remembered but that never reached
//! TCP's connect (the kernel failed it first, say with EADDRNOTAVAIL when the pod's
//! ports ran out) has no sockops callback left: its release gives back what the
//! connect hook promised and remembered.
use aya_ebpf::{
    EbpfContext, helpers::generated::bpf_get_socket_cookie, macros::cgroup_sock,
    programs::SockContext,
};

use crate::maps::{DNS_ORIGINAL_BY_COOKIE, ORIGINAL_DST_BY_COOKIE, release_tuple_slots};

/// cgroup/sock_release.
#[cgroup_sock(sock_release)]
pub fn mb_sock_release(ctx: SockContext) -> i32 {
    // SAFETY: the helper takes the program context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if ORIGINAL_DST_BY_COOKIE.remove(&cookie).is_ok() {
        // Never established (that takes the entry out): both promised entries return.
        release_tuple_slots(2);
    }
    let _ = DNS_ORIGINAL_BY_COOKIE.remove(&cookie);
    1
}
