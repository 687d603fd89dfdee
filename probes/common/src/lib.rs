//! Map keys, values and constants shared by the eBPF probes and the node agent.
//!
//! Every type is `#[repr(C)]` with explicit padding so that the kernel side and the
//! agent agree on the byte layout. Addresses are kept as IPv6 in network byte order;
//! IPv4 addresses are stored in their v4-mapped form (`::ffff:a.b.c.d`) so that an
//! IPv4 socket and a dual-stack socket talking to the same peer produce the same key.
//! Ports are kept in host byte order.
#![no_std]

/// Names of the maps in the probe object, as the agent looks them up.
pub mod map_names {
    /// [`super::PodInfo`] keyed by the cgroup id of a meshed pod (the pod-level cgroup,
    /// an ancestor of each of its containers' cgroups).
    pub const POD_BY_CGROUP: &str = "POD_BY_CGROUP";
    /// Container cgroups seen binding their pod's sidecar ports: the sidecar's own
    /// (pod cgroup id by container cgroup id, LRU).
    pub const PROXY_CGROUPS: &str = "PROXY_CGROUPS";
    /// [`super::LocalPod`] keyed by every IP (v4-mapped or v6, `[u32; 4]`) of a local meshed pod.
    pub const POD_BY_IP: &str = "POD_BY_IP";
    /// Port rules: LPM trie of [`super::PortRuleKey`].
    pub const PORT_RULES: &str = "PORT_RULES";
    /// Address rules: LPM trie of [`super::CidrRuleKey`].
    pub const CIDR_RULES: &str = "CIDR_RULES";
    /// [`super::OriginalDst`] keyed by the socket cookie of a redirected socket (LRU).
    pub const ORIGINAL_DST_BY_COOKIE: &str = "ORIGINAL_DST_BY_COOKIE";
    /// [`super::OriginalDst`] keyed by a socket's own [`super::SocketTuple`] (LRU).
    pub const ORIGINAL_DST_BY_TUPLE: &str = "ORIGINAL_DST_BY_TUPLE";
    /// Established local sockets keyed by their own [`super::SocketTuple`] (sockhash).
    pub const SOCK_BY_TUPLE: &str = "SOCK_BY_TUPLE";
    /// Socket cookie → original destination of DNS sent over UDP (LRU).
    pub const DNS_ORIGINAL_BY_COOKIE: &str = "DNS_ORIGINAL_BY_COOKIE";
    /// One `u64`: entries of ORIGINAL_DST_BY_TUPLE promised to connections.
    pub const TUPLE_SLOTS: &str = "TUPLE_SLOTS";
    /// Per-CPU `u64` counters indexed by [`super::Counter`].
    pub const COUNTERS: &str = "COUNTERS";
    /// Each meshed pod's inbound listening socket (sockhash by [`super::ListenerKey`]).
    pub const INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
    /// Sockets bound to a mesh inbound port, by cookie, until they listen.
    pub const INBOUND_BINDS: &str = "INBOUND_BINDS";
    /// The mesh inbound ports whose listeners are registered.
    pub const INBOUND_PORTS: &str = "INBOUND_PORTS";
    /// Connections sk_lookup handed to a sidecar, until they are established.
    pub const CAPTURED_BY_TUPLE: &str = "CAPTURED_BY_TUPLE";
    /// Per pod: inbound connections that reached a meshed app without its sidecar.
    pub const BYPASS_BY_POD: &str = "BYPASS_BY_POD";
    /// Network namespace cookie of each meshed pod, by pod id (learnt by the probes).
    pub const NETNS_BY_POD: &str = "NETNS_BY_POD";
}

/// Names of the programs in the probe object (function names, as aya finds them).
pub mod program_names {
    /// cgroup/connect4.
    pub const CONNECT4: &str = "mb_connect4";
    /// cgroup/connect6.
    pub const CONNECT6: &str = "mb_connect6";
    /// cgroup/getsockopt.
    pub const GETSOCKOPT: &str = "mb_getsockopt";
    /// sockops, checking each socket's network namespace (5.15+).
    pub const SOCKOPS: &str = "mb_sockops";
    /// sockops for kernels without the network namespace of a sockops socket (before
    /// 5.15): the agent then turns acceleration off.
    pub const SOCKOPS_COMPAT: &str = "mb_sockops_compat";
    /// cgroup/sock_release: a socket that never connected gives back what its
    /// connect promised.
    pub const SOCK_RELEASE: &str = "mb_sock_release";
    /// sk_msg.
    pub const SK_MSG: &str = "mb_sk_msg";
    /// cgroup/sendmsg4 (DNS capture).
    pub const SENDMSG4: &str = "mb_sendmsg4";
    /// sk_lookup, attached to each pod network namespace.
    pub const SK_LOOKUP: &str = "mb_sk_lookup";
    /// cgroup/post_bind4.
    pub const POST_BIND4: &str = "mb_post_bind4";
    /// cgroup/post_bind6.
    pub const POST_BIND6: &str = "mb_post_bind6";
    /// cgroup/sendmsg6 (DNS capture).
    pub const SENDMSG6: &str = "mb_sendmsg6";
    /// cgroup/recvmsg4 (DNS capture).
    pub const RECVMSG4: &str = "mb_recvmsg4";
    /// cgroup/recvmsg6 (DNS capture).
    pub const RECVMSG6: &str = "mb_recvmsg6";
}

/// Names of the global variables the agent sets at load time.
pub mod global_names {
    /// `u32`: 1 = record local socket pairs and let sk_msg redirect between them.
    pub const ACCELERATE: &str = "ACCELERATE";
    /// `u64`: the size of ORIGINAL_DST_BY_TUPLE; connect hooks redirect only while
    /// the promised entries fit in it.
    pub const TUPLE_CAPACITY: &str = "TUPLE_CAPACITY";
}

/// The pod redirects DNS (UDP and TCP port 53) to its sidecar's DNS port.
pub const POD_DNS_CAPTURE: u32 = 1 << 0;
/// Outbound: every destination address is redirected unless excluded
/// (otherwise only addresses in the pod's include CIDRs are).
pub const POD_OUT_ALL_ADDRS: u32 = 1 << 1;
/// Inbound: every port is redirected unless excluded
/// (otherwise only ports in the pod's inbound include rules are).
pub const POD_IN_ALL_PORTS: u32 = 1 << 2;
/// The sidecar's outbound listener is bound to loopback only (Linkerd): redirect to
/// 127.0.0.1 and bind the app's socket to a per-pod loopback source address.
pub const POD_OUT_VIA_LOOPBACK: u32 = 1 << 3;
/// The pod has an IPv4 address ([`PodInfo::ip4`] is valid).
pub const POD_HAS_IP4: u32 = 1 << 4;
/// The pod has an IPv6 address ([`PodInfo::ip6`] is valid).
pub const POD_HAS_IP6: u32 = 1 << 5;
/// Inbound capture is armed: a captured connection that finds no sidecar listener is
/// refused (the sidecar is starting or restarting). Unarmed (a sidecar that was
/// listening before the agent attached, and has not been seen listening since), such
/// a connection passes to the app and is counted in the bypass ledger.
pub const POD_INBOUND_ARMED: u32 = 1 << 6;

/// How many cgroup levels below the root the probes look for a pod's cgroup (the
/// kubelet's pods sit at level 2 to 4; the extra levels leave room for a node agent's
/// own parent such as `k3s/` or a test's).
pub const MAX_POD_CGROUP_LEVEL: i32 = 8;

/// What the agent tells the kernel about a meshed pod, keyed by its pod-level cgroup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    /// The pod's IPv4 address, v4-mapped, network byte order (valid with [`POD_HAS_IP4`]).
    pub ip4: [u32; 4],
    /// The pod's IPv6 address, network byte order (valid with [`POD_HAS_IP6`]).
    pub ip6: [u32; 4],
    /// Node-unique pod number: the first part of every rule key of this pod.
    pub pod_id: u32,
    /// `POD_*` flags.
    pub flags: u32,
    /// uid the sidecar proxy runs as; its connections are never redirected outbound
    /// (a cross-check of [`PodInfo::proxy_cgroup`] and [`map_names::PROXY_CGROUPS`]).
    pub proxy_uid: u32,
    /// The sidecar's outbound listener port (Istio 15001).
    pub outbound_port: u16,
    /// The sidecar's inbound listener port (Istio 15006).
    pub inbound_port: u16,
    /// The sidecar's DNS port (Istio 15053), used with [`POD_DNS_CAPTURE`].
    pub dns_port: u16,
    /// Padding; always zero.
    pub _pad: [u16; 3],
    /// cgroup id of the sidecar container as the pod's status names it (0 unknown):
    /// its processes are the proxy whatever their uid.
    pub proxy_cgroup: u64,
}

/// What the datapath needs to know about a local meshed pod by its address: for
/// proxies connecting to it, and for capturing its inbound connections.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalPod {
    /// Node-unique pod number (see [`PodInfo::pod_id`]).
    pub pod_id: u32,
    /// `POD_*` flags of that pod.
    pub flags: u32,
    /// That pod's sidecar inbound port (Istio 15006).
    pub inbound_port: u16,
    /// Padding; always zero.
    pub _pad: [u16; 3],
    /// cgroup id of the pod's sidecar container as its status names it; a listener
    /// bound before the pod was programmed is registered under it. 0 while unknown.
    pub proxy_cgroup: u64,
    /// cgroup id of the pod (see [`map_names::POD_BY_CGROUP`]); a listener bound while
    /// the pod is programmed is registered under it, so a sidecar restarted in a new
    /// container is found even while the kubelet still reports the old one.
    pub pod_cgroup: u64,
}

/// Kinds of port rules; part of [`PortRuleKey`].
pub mod port_rule {
    /// Outbound traffic to this port is never redirected.
    pub const OUT_EXCLUDE: u8 = 0;
    /// Outbound traffic to this port is redirected whatever its address.
    pub const OUT_INCLUDE: u8 = 1;
    /// Inbound traffic to this port goes straight to the app.
    pub const IN_EXCLUDE: u8 = 2;
    /// Inbound traffic to this port is redirected (when the pod lacks `POD_IN_ALL_PORTS`).
    pub const IN_INCLUDE: u8 = 3;
}

/// Kinds of address rules; part of [`CidrRuleKey`].
pub mod cidr_rule {
    /// Outbound traffic to this range is never redirected.
    pub const OUT_EXCLUDE: u8 = 0;
    /// Outbound traffic to this range is redirected (when the pod lacks `POD_OUT_ALL_ADDRS`).
    pub const OUT_INCLUDE: u8 = 1;
    /// Inbound connections from this source range go straight to the app (Linkerd's
    /// `--subnets-to-ignore`).
    pub const IN_SOURCE_EXCLUDE: u8 = 2;
}

/// Bits of an LPM key that come before the port or address: pod id (32) + kind (8).
pub const RULE_KEY_HEADER_BITS: u32 = 40;

/// Data of a port-rule LPM key: pod id and kind are always matched in full, then the
/// first `prefix_len - 40` bits of the port. A port range becomes a few prefixes.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRuleKey {
    /// Pod id, big endian (LPM tries match bytes from the first one).
    pub pod_id: [u8; 4],
    /// One of [`port_rule`].
    pub kind: u8,
    /// Port, big endian.
    pub port: [u8; 2],
}

/// Data of an address-rule LPM key: pod id and kind in full, then the first
/// `prefix_len - 40` bits of the IPv6 (or v4-mapped) address.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CidrRuleKey {
    /// Pod id, big endian.
    pub pod_id: [u8; 4],
    /// One of [`cidr_rule`].
    pub kind: u8,
    /// Address, network byte order; IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u8; 16],
}

impl PortRuleKey {
    /// The LPM key of pod `pod_id`'s rule of `kind` for the first `port_bits` bits of
    /// `port` (16: the port alone), as (prefix length, data). The agent writes and the
    /// probes look up keys built here only.
    #[inline(always)]
    pub const fn lpm(pod_id: u32, kind: u8, port: u16, port_bits: u32) -> (u32, Self) {
        (
            RULE_KEY_HEADER_BITS + port_bits,
            Self {
                pod_id: pod_id.to_be_bytes(),
                kind,
                port: port.to_be_bytes(),
            },
        )
    }
}

impl CidrRuleKey {
    /// The LPM key of pod `pod_id`'s rule of `kind` for the first `addr_bits` bits of
    /// the IPv6 (or v4-mapped) address `addr`, as (prefix length, data).
    #[inline(always)]
    pub const fn lpm(pod_id: u32, kind: u8, addr: [u8; 16], addr_bits: u32) -> (u32, Self) {
        (
            RULE_KEY_HEADER_BITS + addr_bits,
            Self {
                pod_id: pod_id.to_be_bytes(),
                kind,
                addr,
            },
        )
    }

    /// The key of one address as the probes hold it (network-order words, IPv4
    /// v4-mapped: see [`v4_mapped`]), matched in full.
    #[inline(always)]
    pub const fn lpm_of_address(pod_id: u32, kind: u8, addr: &[u32; 4]) -> (u32, Self) {
        let mut bytes = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let w = addr[i].to_ne_bytes();
            bytes[i * 4] = w[0];
            bytes[i * 4 + 1] = w[1];
            bytes[i * 4 + 2] = w[2];
            bytes[i * 4 + 3] = w[3];
            i += 1;
        }
        Self::lpm(pod_id, kind, bytes, 128)
    }

    /// The key of an address range `addr/len`; an IPv4 range becomes its v4-mapped
    /// IPv6 range, which is how the probes look IPv4 addresses up.
    pub const fn lpm_of_range(
        pod_id: u32,
        kind: u8,
        addr: core::net::IpAddr,
        len: u8,
    ) -> (u32, Self) {
        match addr {
            core::net::IpAddr::V4(a) => {
                Self::lpm(pod_id, kind, a.to_ipv6_mapped().octets(), len as u32 + 96)
            }
            core::net::IpAddr::V6(a) => Self::lpm(pod_id, kind, a.octets(), len as u32),
        }
    }
}

/// Key of an inbound listener in the listener sockhash: the cgroup of the pod whose
/// sidecar bound it ([`LocalPod::pod_cgroup`]), or of the container that bound it when
/// its pod was not programmed yet ([`LocalPod::proxy_cgroup`]), and the listening
/// socket's address family. Kernel cgroup ids, not agent-chosen pod ids, so
/// a restarted agent that adopts the pinned sockhash finds the same sockets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    /// cgroup id of the pod, or of the container, that bound the socket.
    pub cgroup: u64,
    /// AF_INET (2) or AF_INET6 (10) of the listening socket.
    pub family: u32,
    /// Zero.
    pub _pad: u32,
}

/// A destination the app asked for before the connect hook rewrote it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OriginalDst {
    /// Address, network byte order; IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u32; 4],
    /// Port, host byte order.
    pub port: u16,
    /// `ORIGINAL_*` flags.
    pub flags: u16,
    /// Pod id of the pod whose process made the connection.
    pub pod_id: u32,
}

/// The connection was rewritten by a connect hook; `addr`/`port` are meaningful.
pub const ORIGINAL_REDIRECTED: u16 = 1 << 0;
/// The connection was not rewritten but is between local pod sockets and may be
/// accelerated (a sidecar talking to its own app through the pod IP).
pub const ORIGINAL_PAIR_ONLY: u16 = 1 << 1;
/// DNS capture rewrote this UDP socket's destination (restore replies' source).
pub const ORIGINAL_DNS: u16 = 1 << 2;

/// A TCP connection as seen from one of its sockets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SocketTuple {
    /// Local address, network byte order; IPv4 v4-mapped.
    pub local_addr: [u32; 4],
    /// Remote address, network byte order; IPv4 v4-mapped.
    pub remote_addr: [u32; 4],
    /// Local port, host byte order.
    pub local_port: u32,
    /// Remote port, host byte order.
    pub remote_port: u32,
}

impl SocketTuple {
    /// A tuple from its parts.
    pub const fn new(
        local_addr: [u32; 4],
        remote_addr: [u32; 4],
        local_port: u32,
        remote_port: u32,
    ) -> Self {
        Self {
            local_addr,
            remote_addr,
            local_port,
            remote_port,
        }
    }

    /// The same connection as its peer socket sees it.
    pub const fn reversed(&self) -> Self {
        Self {
            local_addr: self.remote_addr,
            remote_addr: self.local_addr,
            local_port: self.remote_port,
            remote_port: self.local_port,
        }
    }
}

/// Indexes of the per-CPU counters array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// App connections rewritten to their sidecar's outbound port.
    RedirectOutbound = 0,
    /// New inbound connections handed to a meshed pod's sidecar by sk_lookup.
    RedirectInbound = 1,
    /// Connections from meshed pods left untouched by policy (excluded, loopback, own pod).
    PassPolicy = 2,
    /// `SO_ORIGINAL_DST` answered from our maps.
    GetsockoptAnswered = 3,
    /// Sockets added to the sockhash.
    SockhashAdded = 4,
    /// Messages moved straight to the peer socket by sk_msg.
    SkMsgRedirected = 5,
    /// Bytes moved straight to the peer socket by sk_msg.
    SkMsgBytes = 6,
    /// Map updates that failed (map full or no memory); the connection fell back.
    MapFull = 7,
    /// DNS packets or connections rewritten to the sidecar's DNS port.
    DnsRedirected = 8,
    /// DNS replies whose source was restored to the original server.
    DnsRepliesRestored = 9,
    /// New inbound connections refused because the pod's sidecar was not listening.
    InboundRefused = 10,
    /// Inbound connections that reached a meshed app without its sidecar.
    InboundBypassed = 11,
    /// Sockets naming a meshed pod's addresses from another network namespace, kept out
    /// of the pod's connection state.
    ForeignSocket = 12,
}

/// Number of counters (size of the counters array).
pub const COUNTER_COUNT: u32 = 13;

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; COUNTER_COUNT as usize] = [
        Counter::RedirectOutbound,
        Counter::RedirectInbound,
        Counter::PassPolicy,
        Counter::GetsockoptAnswered,
        Counter::SockhashAdded,
        Counter::SkMsgRedirected,
        Counter::SkMsgBytes,
        Counter::MapFull,
        Counter::DnsRedirected,
        Counter::DnsRepliesRestored,
        Counter::InboundRefused,
        Counter::InboundBypassed,
        Counter::ForeignSocket,
    ];

    /// Metric-style name of the counter.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::RedirectOutbound => "redirect_outbound",
            Counter::RedirectInbound => "redirect_inbound",
            Counter::PassPolicy => "pass_policy",
            Counter::GetsockoptAnswered => "getsockopt_answered",
            Counter::SockhashAdded => "sockhash_added",
            Counter::SkMsgRedirected => "sk_msg_redirected",
            Counter::SkMsgBytes => "sk_msg_bytes",
            Counter::MapFull => "map_full",
            Counter::DnsRedirected => "dns_redirected",
            Counter::DnsRepliesRestored => "dns_replies_restored",
            Counter::InboundRefused => "inbound_refused",
            Counter::InboundBypassed => "inbound_bypassed",
            Counter::ForeignSocket => "foreign_sockets",
        }
    }
}

/// Returns the v4-mapped IPv6 form (`::ffff:a.b.c.d`) of a network-order IPv4 address.
pub const fn v4_mapped(ip4_be: u32) -> [u32; 4] {
    [0, 0, u32::from_be(0x0000_ffff), ip4_be]
}

/// Returns the network-order IPv4 address if `addr` is v4-mapped.
pub const fn as_v4(addr: &[u32; 4]) -> Option<u32> {
    if addr[0] == 0 && addr[1] == 0 && addr[2] == u32::from_be(0x0000_ffff) {
        Some(addr[3])
    } else {
        None
    }
}

// The layouts the agent and the probes share, checked when either is compiled.
const _: () = {
    assert!(core::mem::size_of::<PodInfo>() == 64);
    assert!(core::mem::size_of::<LocalPod>() == 32);
    assert!(core::mem::size_of::<PortRuleKey>() == 7);
    assert!(core::mem::size_of::<CidrRuleKey>() == 21);
    assert!(core::mem::size_of::<ListenerKey>() == 16);
    assert!(core::mem::size_of::<OriginalDst>() == 24);
    assert!(core::mem::size_of::<SocketTuple>() == 40);
};

#[cfg(feature = "user")]
mod user {
    // SAFETY: all types are repr(C) plain data with explicit padding and no pointers.
    unsafe impl aya::Pod for super::PodInfo {}
    unsafe impl aya::Pod for super::LocalPod {}
    unsafe impl aya::Pod for super::PortRuleKey {}
    unsafe impl aya::Pod for super::CidrRuleKey {}
    unsafe impl aya::Pod for super::OriginalDst {}
    unsafe impl aya::Pod for super::SocketTuple {}
    unsafe impl aya::Pod for super::ListenerKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv4_range_key_matches_the_key_the_probes_look_up() {
        let a = core::net::Ipv4Addr::new(10, 1, 2, 3);
        let written = CidrRuleKey::lpm_of_range(7, cidr_rule::OUT_EXCLUDE, a.into(), 32);
        let looked_up = CidrRuleKey::lpm_of_address(
            7,
            cidr_rule::OUT_EXCLUDE,
            &v4_mapped(u32::from_ne_bytes(a.octets())),
        );
        assert_eq!(written, looked_up);
        assert_eq!(written.0, RULE_KEY_HEADER_BITS + 128);
        let (len, key) = PortRuleKey::lpm(7, port_rule::IN_INCLUDE, 8080, 12);
        assert_eq!(len, RULE_KEY_HEADER_BITS + 12);
        assert_eq!(key.pod_id, [0, 0, 0, 7]);
        assert_eq!(key.port, 8080u16.to_be_bytes());
    }
}
