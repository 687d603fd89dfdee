//! Every map the programs share with each other and with the agent. Sizes here are
//! defaults; the agent sets the real ones at load time.
use aya_ebpf::{
    macros::map,
    maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash},
};
use merbridge_edge_probes_common::{
    COUNTER_COUNT, CidrRuleKey, Counter, LocalPod, OriginalDst, PodInfo, PortRuleKey, SocketTuple,
};

/// Pod identity of each container cgroup of a meshed pod.
#[map]
pub static POD_BY_CGROUP: HashMap<u64, PodInfo> = HashMap::with_max_entries(1024, 0);

/// Local meshed pods by IP (v4-mapped or v6).
#[map]
pub static POD_BY_IP: HashMap<[u32; 4], LocalPod> = HashMap::with_max_entries(1024, 0);

/// Per-pod port include/exclude rules.
#[map]
pub static PORT_RULES: LpmTrie<PortRuleKey, u8> = LpmTrie::with_max_entries(16384, 0);

/// Per-pod address include/exclude rules.
#[map]
pub static CIDR_RULES: LpmTrie<CidrRuleKey, u8> = LpmTrie::with_max_entries(16384, 0);

/// Original destination of a connection between the connect hook and establishment.
#[map]
pub static ORIGINAL_DST_BY_COOKIE: LruHashMap<u64, OriginalDst> =
    LruHashMap::with_max_entries(65536, 0);

/// Original destination by each established socket's own view of its connection.
#[map]
pub static ORIGINAL_DST_BY_TUPLE: LruHashMap<SocketTuple, OriginalDst> =
    LruHashMap::with_max_entries(65536, 0);

/// Established local sockets, for sk_msg to find a socket's peer.
#[map]
pub static SOCK_BY_TUPLE: SockHash<SocketTuple> = SockHash::with_max_entries(65536, 0);

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

/// Inserts into a hash map, counting a failure (full map) instead of failing the caller.
#[inline(always)]
pub fn remember(key: &u64, value: &OriginalDst) {
    if ORIGINAL_DST_BY_COOKIE.insert(key, value, 0).is_err() {
        count(Counter::MapFull, 1);
    }
}
