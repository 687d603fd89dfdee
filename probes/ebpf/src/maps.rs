//! Every map the programs share with each other and with the agent. Sizes here are
//! defaults; the agent sets the real ones at load time.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash},
};
use core::intrinsics::{AtomicOrdering, atomic_xadd};
use merbridge_edge_probes_common::{
    COUNTER_COUNT, CidrRuleKey, Counter, ListenerKey, LocalPod, OriginalDst, PodInfo, PortRuleKey,
    SocketTuple,
};

/// Pod identity of each meshed pod, by its pod-level cgroup.
#[map]
pub static POD_BY_CGROUP: HashMap<u64, PodInfo> = HashMap::with_max_entries(1024, 0);

/// Sidecar container cgroups, learnt when they bind their pod's sidecar ports: pod
/// cgroup id by container cgroup id. LRU: cgroup ids are never reused, and an entry of
/// a container that is gone just ages out.
#[map]
pub static PROXY_CGROUPS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(2048, 0);

/// The network namespace (cookie) of each meshed pod, by pod id, learnt from the pod's
/// own processes. A hash, not LRU: one entry per pod, and an entry that went would let
/// no socket of its pod be trusted.
#[map]
pub static NETNS_BY_POD: HashMap<u32, u64> = HashMap::with_max_entries(1024, 0);

/// Local meshed pods by IP (v4-mapped or v6).
#[map]
pub static POD_BY_IP: HashMap<[u32; 4], LocalPod> = HashMap::with_max_entries(1024, 0);

/// Per-pod port include/exclude rules.
#[map]
pub static PORT_RULES: LpmTrie<PortRuleKey, u8> = LpmTrie::with_max_entries(16384, 0);

/// Per-pod address include/exclude rules.
#[map]
pub static CIDR_RULES: LpmTrie<CidrRuleKey, u8> = LpmTrie::with_max_entries(16384, 0);

/// Original destination of a TCP connection between the connect hook and
/// establishment. A plain hash map: when full, the redirect is refused (fail open)
/// instead of evicting the entry of another connection in flight.
#[map]
pub static ORIGINAL_DST_BY_COOKIE: HashMap<u64, OriginalDst> = HashMap::with_max_entries(65536, 0);

/// Original destination of DNS sent over UDP, for the reply's source. LRU: UDP sockets
/// give no close callback to remove it, and an evicted entry costs one retried query.
#[map]
pub static DNS_ORIGINAL_BY_COOKIE: LruHashMap<u64, OriginalDst> =
    LruHashMap::with_max_entries(65536, 0);

/// Original destination by each established socket's own view of its connection.
/// A plain hash map, never evicting: its room is promised at connect time
/// ([`reserve_tuple_slots`]) and entries go when their socket closes.
#[map]
pub static ORIGINAL_DST_BY_TUPLE: HashMap<SocketTuple, OriginalDst> =
    HashMap::with_max_entries(65536, 0);

/// Slot 0: entries of ORIGINAL_DST_BY_TUPLE promised to connections (two per local
/// leg at connect, given back as the entries go).
#[map]
pub static TUPLE_SLOTS: Array<u64> = Array::with_max_entries(1, 0);

/// The size of ORIGINAL_DST_BY_TUPLE, set by the agent.
#[unsafe(no_mangle)]
static TUPLE_CAPACITY: u64 = 65536;

/// Promises `n` entries of ORIGINAL_DST_BY_TUPLE; false (nothing promised) when they
/// would not fit.
#[inline(always)]
pub fn reserve_tuple_slots(n: u64) -> bool {
    let Some(slot) = TUPLE_SLOTS.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a plain read of a global the loader may have rewritten; the slot is an
    // aligned u64 in a map value, updated only atomically.
    // (The BPF target has no core::sync::atomic read-modify-write; the intrinsic with
    // its result unused is the kernel's atomic add, on every kernel.)
    unsafe {
        let capacity = core::ptr::read_volatile(&TUPLE_CAPACITY);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, n);
        if core::ptr::read_volatile(slot) > capacity {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, n.wrapping_neg());
            return false;
        }
    }
    true
}

/// Gives back `n` promised entries.
#[inline(always)]
pub fn release_tuple_slots(n: u64) {
    if let Some(slot) = TUPLE_SLOTS.get_ptr_mut(0) {
        // SAFETY: as in reserve_tuple_slots.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, n.wrapping_neg()) };
    }
}

/// Established local sockets, for sk_msg to find a socket's peer.
#[map]
pub static SOCK_BY_TUPLE: SockHash<SocketTuple> = SockHash::with_max_entries(65536, 0);

/// Inbound listening sockets by the pod (or container) cgroup that bound them. Pinned by the
/// agent and adopted by the next one, so a restart keeps them.
#[map]
pub static INBOUND_LISTENERS: SockHash<ListenerKey> = SockHash::with_max_entries(2048, 0);

/// Sockets bound to a mesh inbound port: the cgroup id of their listener key by
/// cookie, until they listen.
#[map]
pub static INBOUND_BINDS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(1024, 0);

/// The mesh inbound ports (Istio 15006, Linkerd 4143, OSM 15003, and any a pod sets).
#[map]
pub static INBOUND_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(64, 0);

/// Connections sk_lookup handed to a sidecar, by the accepted socket's own view, until
/// sockops sees them established (LRU: a SYN that never completes ages out).
#[map]
pub static CAPTURED_BY_TUPLE: LruHashMap<SocketTuple, u8> = LruHashMap::with_max_entries(16384, 0);

/// Local pairs whose connecting side is in the sockhash, by that side's tuple without
/// the destination port, until the accepting side is established: when the mesh's
/// iptables REDIRECT changed the port on the way, the accepting side cannot be paired
/// and the connecting side is taken out of the sockhash (see sockops).
#[map]
pub static PAIR_PENDING: LruHashMap<SocketTuple, u32> = LruHashMap::with_max_entries(4096, 0);

/// Pod addresses whose own iptables REDIRECT inbound connections to the sidecar (the
/// mesh's init container ran there): seen from an accepted connection on a sidecar
/// inbound port from outside the pod. Proxy connections to them are not paired for
/// sk_msg (the accepting side's port differs, so there is no peer to pair with).
#[map]
pub static REDIRECTING_PODS: LruHashMap<[u32; 4], u8> = LruHashMap::with_max_entries(2048, 0);

/// Per pod address: inbound connections that reached a meshed app without its sidecar.
#[map]
pub static BYPASS_BY_POD: HashMap<[u32; 4], u64> = HashMap::with_max_entries(2048, 0);

/// Counts one inbound connection to `pod_addr` that bypassed its sidecar.
#[inline(always)]
pub fn count_bypass(pod_addr: &[u32; 4]) {
    count(Counter::InboundBypassed, 1);
    if BYPASS_BY_POD.get_ptr_mut(pod_addr).is_none() {
        let _ = BYPASS_BY_POD.insert(pod_addr, &0, 1 /* BPF_NOEXIST */);
    }
    if let Some(slot) = BYPASS_BY_POD.get_ptr_mut(pod_addr) {
        // SAFETY: an aligned u64 map value, updated only atomically.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, 1) };
    }
}

/// Event counters, one slot per [`Counter`].
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

/// 1 when the agent wants local socket pairs accelerated by sk_msg.
#[unsafe(no_mangle)]
static ACCELERATE: u32 = 1;

/// Whether sockops should fill the sockhash.
#[inline(always)]
pub fn accelerate() -> bool {
    // SAFETY: a plain read of a global the loader may have rewritten.
    unsafe { core::ptr::read_volatile(&ACCELERATE) != 0 }
}

/// Adds `n` to a counter.
#[inline(always)]
pub fn count(counter: Counter, n: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *slot += n }
    }
}

/// Remembers a TCP connection's original destination by socket cookie; false (and
/// counted) when the map is full.
#[inline(always)]
pub fn remember(key: &u64, value: &OriginalDst) -> bool {
    if ORIGINAL_DST_BY_COOKIE.insert(key, value, 0).is_err() {
        count(Counter::MapFull, 1);
        return false;
    }
    true
}

/// Remembers the original destination of DNS by socket cookie (LRU: always room).
#[inline(always)]
pub fn remember_dns(key: &u64, value: &OriginalDst) -> bool {
    if DNS_ORIGINAL_BY_COOKIE.insert(key, value, 0).is_err() {
        count(Counter::MapFull, 1);
        return false;
    }
    true
}
