//! sk_msg: moves each message of a recorded local socket straight into its peer's
//! receive queue, skipping the TCP/IP stack. Unknown peers pass normally.
use aya_ebpf::{
    bindings::{BPF_F_INGRESS, BPF_TCP_ESTABLISHED, sk_action::SK_PASS},
    macros::sk_msg,
    programs::SkMsgContext,
};
use merbridge_edge_probes_common::{Counter, SocketTuple};

use crate::{
    addr::{normalise, read_words},
    maps::{SOCK_BY_TUPLE, count},
};

/// sk_msg.
#[sk_msg]
pub fn mb_sk_msg(ctx: SkMsgContext) -> u32 {
    let msg = ctx.msg;
    // When the peer has already shut down its sending side (we are in CLOSE_WAIT), its
    // socket closes as soon as our FIN reaches it, and the kernel drops whatever still
    // waits in its sockmap queue. Such data must take the TCP path, which keeps it.
    // SAFETY: sk is a readable pointer field of sk_msg_md; checked for null.
    unsafe {
        let sk = (*msg).__bindgen_anon_3.sk;
        if !sk.is_null() && (*sk).state != BPF_TCP_ESTABLISHED {
            return SK_PASS;
        }
    }
    // SAFETY: reads of readable sk_msg_md fields, IPv6 words one at a time.
    let peer = unsafe {
        let family = (*msg).family;
        let local = normalise(
            family,
            (*msg).local_ip4,
            read_words(&raw const (*msg).local_ip6),
        );
        let remote = normalise(
            family,
            (*msg).remote_ip4,
            read_words(&raw const (*msg).remote_ip6),
        );
        let remote_port = u16::from_be(((*msg).remote_port >> 16) as u16) as u32;
        // The peer socket's own view: our remote is its local.
        SocketTuple::new(remote, local, remote_port, (*msg).local_port)
    };
    let size = ctx.size();
    if SOCK_BY_TUPLE.redirect_msg(&ctx, peer, BPF_F_INGRESS as u64) == SK_PASS as i64 {
        count(Counter::SkMsgRedirected, 1);
        count(Counter::SkMsgBytes, u64::from(size));
    }
    SK_PASS
}
