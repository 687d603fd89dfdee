//! Loading the embedded probes, attaching them, and typed access to their maps.
use std::fs::File;

use anyhow::{Context, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, SockHash, lpm_trie::Key},
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, CgroupSockopt, SkLookup, SkMsg, SockOps,
    },
};
use log::{info, warn};

use crate::{
    metrics::MapUsage,
    pod_netns::{NetnsReport, PodNetns},
    sockhash_pin::{SockhashPins, pin_dir},
};
use merbridge_edge_probes_common::{
    COUNTER_COUNT, CidrRuleKey, ListenerKey, LocalPod, OriginalDst, PodInfo, PortRuleKey,
    SocketTuple, global_names, map_names as maps, program_names as progs,
};

/// File name of the pinned inbound-listener sockhash in the pin directory (the key
/// layout's version in the name: a pin of another layout is never adopted).
pub const LISTENERS_PIN: &str = "inbound-listeners-v1";

/// The cgroup sock programs (post_bind), attached the same way.
const SOCK_PROGRAMS: [&str; 2] = [progs::POST_BIND4, progs::POST_BIND6];

/// The compiled probe object, embedded at build time (empty when built with
/// MERBRIDGE_EDGE_SKIP_PROBES set: use [`probes`]).
static PROBES: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/merbridge-edge-probes.o"));

/// What an agent built without its probes says when asked to load them.
const PROBES_SKIPPED: &str = "this agent was built with MERBRIDGE_EDGE_SKIP_PROBES set and holds no eBPF probes; build it again without that variable";

/// The embedded probe object, or an error naming the variable that left it out.
fn probes() -> Result<&'static [u8]> {
    if PROBES.is_empty() {
        return Err(anyhow!(PROBES_SKIPPED));
    }
    Ok(PROBES)
}

/// The cgroup sock_addr programs, attached the same way.
const SOCK_ADDR_PROGRAMS: [&str; 6] = [
    progs::CONNECT4,
    progs::CONNECT6,
    progs::SENDMSG4,
    progs::SENDMSG6,
    progs::RECVMSG4,
    progs::RECVMSG6,
];

/// Map sizes, chosen by the agent at load time.
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    /// Container cgroups of meshed pods.
    pub cgroups: u32,
    /// Pod IPs.
    pub pod_ips: u32,
    /// Port and address rules (each).
    pub rules: u32,
    /// Tracked connections (each per-connection map and the sockhash).
    pub connections: u32,
}

impl MapSizes {
    /// Sizes for `pods` meshed pods: two IPs each, room for a pod cgroup each (twice:
    /// a pod going and its successor), and for their rules and connections.
    pub fn for_pods(pods: u32) -> Self {
        let pods = pods.clamp(1, 65536);
        Self {
            cgroups: pods * 2,
            pod_ips: pods * 2,
            rules: 65536,
            connections: 16384,
        }
    }
}

impl Default for MapSizes {
    fn default() -> Self {
        Self::for_pods(128)
    }
}

/// How to load the datapath.
#[derive(Clone, Debug)]
pub struct DatapathOptions {
    /// cgroup2 directory the programs attach to (every process below it is covered).
    pub cgroup_root: std::path::PathBuf,
    /// bpffs mount for the sockhash pin; found when None.
    pub bpffs: Option<std::path::PathBuf>,
    /// Whether sk_msg moves data between local sockets directly.
    pub accelerate: bool,
    /// Map sizes.
    pub sizes: MapSizes,
    /// Directory of pod network namespace files for inbound capture; None = no
    /// inbound capture.
    pub netns_dir: Option<std::path::PathBuf>,
    /// The sidecar inbound ports whose listeners receive captured connections.
    pub inbound_ports: Vec<u16>,
    /// Pin the inbound-listener sockhash so the next agent adopts it.
    pub pin_listeners: bool,
}

/// The loaded and attached programs and their maps. Dropping it (or the process
/// ending in any way) detaches everything: all attachments are bpf_links or belong to
/// maps owned by this process. Only the sockhash may stay, pinned, while connections
/// it accelerated are open (see [`crate::sockhash_pin`]).
pub struct Datapath {
    /// Programs and their links; None once dropped.
    ebpf: Option<Ebpf>,
    pins: Option<SockhashPins>,
    /// Pod identity by pod cgroup id.
    pub pod_by_cgroup: HashMap<MapData, u64, PodInfo>,
    /// Local meshed pods by IP.
    pub pod_by_ip: HashMap<MapData, [u32; 4], LocalPod>,
    /// Port rules.
    pub port_rules: LpmTrie<MapData, PortRuleKey, u8>,
    /// Address rules.
    pub cidr_rules: LpmTrie<MapData, CidrRuleKey, u8>,
    counters: PerCpuArray<MapData, u64>,
    tuple_slots: Array<MapData, u64>,
    original_dst_by_cookie: HashMap<MapData, u64, OriginalDst>,
    original_dst_by_tuple: HashMap<MapData, SocketTuple, OriginalDst>,
    sock_by_tuple: SockHash<MapData, SocketTuple>,
    inbound_listeners: SockHash<MapData, ListenerKey>,
    /// The sidecar inbound ports whose listeners are registered (post_bind's filter).
    pub inbound_ports: HashMap<MapData, u16, u8>,
    bypass_by_pod: HashMap<MapData, [u32; 4], u64>,
    /// Where the inbound-listener sockhash is pinned (adopted from an earlier agent or
    /// pinned by this one); None when unpinned.
    listeners_pin: Option<std::path::PathBuf>,
    netns: Option<PodNetns>,
    /// The links of the redirecting hooks, detached first when the agent stops.
    rewrite_links: Vec<(
        &'static str,
        aya::programs::cgroup_sock_addr::CgroupSockAddrLinkId,
    )>,
    sizes: MapSizes,
}

/// How long the answering hooks (getsockopt, sockops) outlive the redirecting ones when
/// the agent stops: connections redirected just before get their original destination.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_millis(300);

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &str,
) -> Result<T> {
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("probe object has no map {name}"))?;
    T::try_from(map).with_context(|| format!("map {name}"))
}

impl Datapath {
    /// Loads the probes, sizes their maps and attaches them under `cgroup_root`.
    pub fn load(opts: &DatapathOptions) -> Result<Self> {
        let probes = probes()?;
        // Without a sockops socket's network namespace, a pod with NET_ADMIN could
        // take over another pod's accelerated connection: no acceleration then.
        let knows_netns = sockops_knows_netns();
        if opts.accelerate && !knows_netns {
            warn!(
                "this kernel cannot tell sockops which network namespace a socket is in \
                 (bpf_get_netns_cookie in sockops, 5.15+): sk_msg acceleration is off"
            );
        }
        let accelerate: u32 = (opts.accelerate && knows_netns).into();
        let (mut ebpf, listeners_pin) = load_adopting_listeners(opts, probes, accelerate)?;

        let cgroup = File::open(&opts.cgroup_root)
            .with_context(|| format!("opening cgroup root {}", opts.cgroup_root.display()))?;
        // bpf_link attachments (5.7+) always coexist with other programs; the link API
        // takes no attach flags, which is what `Single` maps to.
        let mode = CgroupAttachMode::Single;
        // Order matters under load: everything that records or answers a redirected
        // connection is attached before the hooks that redirect (connect, sendmsg), so
        // no connection is ever rewritten without its original destination kept.
        let inbound_ports = attach_answering_hooks(&mut ebpf, opts, &cgroup, knows_netns)?;

        let map = ebpf
            .take_map(maps::SOCK_BY_TUPLE)
            .ok_or_else(|| anyhow!("probe object has no map {}", maps::SOCK_BY_TUPLE))?;
        // Pinned before sk_msg is attached, so that no accelerated socket is ever in a
        // sockhash that dies with the agent.
        let pins = opts
            .accelerate
            .then(|| SockhashPins::pin(&map, opts.bpffs.as_deref()));
        let attached = (|| -> Result<SockHash<MapData, SocketTuple>> {
            let sockhash: SockHash<MapData, SocketTuple> =
                SockHash::try_from(map).with_context(|| format!("map {}", maps::SOCK_BY_TUPLE))?;
            let p: &mut SkMsg = program(&mut ebpf, progs::SK_MSG)?;
            p.load().context("verifier rejected the sk_msg program")?;
            if opts.accelerate {
                p.attach(sockhash.fd())
                    .context("attaching sk_msg to the sockhash")?;
            }
            Ok(sockhash)
        })();
        let rewriting = attached.and_then(|sockhash| {
            let mut links = Vec::new();
            for name in SOCK_ADDR_PROGRAMS {
                let p: &mut CgroupSockAddr = program(&mut ebpf, name)?;
                p.load()
                    .with_context(|| format!("verifier rejected {name}"))?;
                let link = p.attach(&cgroup, mode).with_context(|| {
                    format!("attaching {name} to {}", opts.cgroup_root.display())
                })?;
                links.push((name, link));
            }
            Ok((sockhash, links))
        });
        let (sockhash, rewrite_links) = match rewriting {
            Ok(s) => s,
            Err(e) => {
                drop(ebpf);
                if let Some(p) = pins {
                    p.release();
                }
                return Err(e);
            }
        };
        info!(
            "probes attached to {}{}",
            describe_attachments(&opts.cgroup_root, opts.accelerate),
            match &opts.netns_dir {
                Some(d) => format!(
                    "; sk_lookup in each network namespace under {}",
                    d.display()
                ),
                None => "; inbound capture off".to_string(),
            }
        );
        Ok(Self {
            pod_by_cgroup: take(&mut ebpf, maps::POD_BY_CGROUP)?,
            pod_by_ip: take(&mut ebpf, maps::POD_BY_IP)?,
            port_rules: take(&mut ebpf, maps::PORT_RULES)?,
            cidr_rules: take(&mut ebpf, maps::CIDR_RULES)?,
            counters: take(&mut ebpf, maps::COUNTERS)?,
            tuple_slots: take(&mut ebpf, maps::TUPLE_SLOTS)?,
            original_dst_by_cookie: take(&mut ebpf, maps::ORIGINAL_DST_BY_COOKIE)?,
            original_dst_by_tuple: take(&mut ebpf, maps::ORIGINAL_DST_BY_TUPLE)?,
            sock_by_tuple: sockhash,
            inbound_listeners: take(&mut ebpf, maps::INBOUND_LISTENERS)?,
            inbound_ports,
            bypass_by_pod: take(&mut ebpf, maps::BYPASS_BY_POD)?,
            listeners_pin,
            rewrite_links,
            netns: opts.netns_dir.as_deref().map(PodNetns::new),
            sizes: opts.sizes,
            ebpf: Some(ebpf),
            pins,
        })
    }

    /// Original-destination tuple entries the connect hooks have promised (in use, or
    /// reserved for connections being set up), out of `--max-connections`.
    pub fn promised_tuple_entries(&self) -> Result<u64> {
        self.tuple_slots
            .get(&0, 0)
            .context("reading the promised tuple entries")
    }

    /// Attaches sk_lookup to pod network namespaces that appeared since the last call
    /// and releases the links of those gone; None when inbound capture is off.
    pub fn refresh_netns(&mut self) -> Option<NetnsReport> {
        let netns = self.netns.as_mut()?;
        let ebpf = self.ebpf.as_mut()?;
        let p: &mut SkLookup = program(ebpf, progs::SK_LOOKUP).ok()?;
        Some(netns.refresh(p))
    }

    /// Network namespaces with sk_lookup attached, and their directory.
    pub fn netns_attached(&self) -> Option<(usize, &std::path::Path)> {
        self.netns.as_ref().map(|n| (n.attached(), n.dir()))
    }

    /// Where the inbound-listener sockhash is pinned, if it is.
    pub fn listeners_pin(&self) -> Option<&std::path::Path> {
        self.listeners_pin.as_deref()
    }

    /// The cgroups with a registered inbound listener (keys of the listener sockhash).
    pub fn listener_cgroups(&self) -> std::collections::BTreeSet<u64> {
        self.inbound_listeners
            .keys()
            .filter_map(Result::ok)
            .map(|k| k.cgroup)
            .collect()
    }

    /// The bypass ledger: per pod address, inbound connections that reached a meshed
    /// app without its sidecar.
    pub fn bypass_by_pod(&self) -> Vec<([u32; 4], u64)> {
        self.bypass_by_pod.iter().filter_map(Result::ok).collect()
    }

    /// Removes the empty sockhash pins of earlier agents; returns the sockets their
    /// other pins still carry.
    pub fn sweep_pins(&self) -> usize {
        self.pins.as_ref().map_or(0, SockhashPins::sweep)
    }

    /// Where this agent's sockhash is pinned, if it is.
    pub fn sockhash_pin(&self) -> Option<&std::path::Path> {
        self.pins.as_ref().and_then(SockhashPins::own)
    }

    /// The kernel counters summed over CPUs, indexed by `Counter`.
    pub fn counters(&self) -> Result<[u64; COUNTER_COUNT as usize]> {
        let mut out = [0u64; COUNTER_COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let values = self
                .counters
                .get(&(i as u32), 0)
                .context("reading counters")?;
            *slot = values.iter().sum();
        }
        Ok(out)
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        // New connections stop being redirected first; the ones redirected just before
        // still find their original destination (a proxy asks as soon as it accepts).
        if let Some(ebpf) = self.ebpf.as_mut() {
            let links = std::mem::take(&mut self.rewrite_links);
            let detached = !links.is_empty();
            for (name, link) in links {
                if let Ok(p) = program::<CgroupSockAddr>(ebpf, name) {
                    let _ = p.detach(link);
                }
            }
            if detached {
                std::thread::sleep(STOP_GRACE);
            }
        }
        // Programs first (their links go with them): once sockops is gone nothing adds
        // sockets, and the pin can be judged by what the sockhash still holds.
        drop(self.ebpf.take());
        if let Some(pins) = self.pins.take() {
            pins.release();
        }
    }
}

impl Datapath {
    /// Usage of the pod maps, given their entry counts (the agent wrote every entry,
    /// so it knows them without asking the kernel): POD_BY_CGROUP, POD_BY_IP,
    /// PORT_RULES, CIDR_RULES.
    pub fn pod_map_usage(&self, entries: [usize; 4]) -> Vec<MapUsage> {
        let s = self.sizes;
        [
            (maps::POD_BY_CGROUP, s.cgroups),
            (maps::POD_BY_IP, s.pod_ips),
            (maps::PORT_RULES, s.rules),
            (maps::CIDR_RULES, s.rules),
        ]
        .into_iter()
        .zip(entries)
        .map(|((name, capacity), n)| MapUsage {
            name: name.into(),
            entries: n as u64,
            capacity: capacity.into(),
        })
        .collect()
    }

    /// Usage of the per-connection maps, which only the probes write: counted by
    /// walking their keys, one syscall per entry, so call it sparingly.
    pub fn connection_map_usage(&self) -> Vec<MapUsage> {
        let cap = u64::from(self.sizes.connections);
        let usage = |name: &str, entries: usize| MapUsage {
            name: name.into(),
            entries: entries as u64,
            capacity: cap,
        };
        vec![
            usage(
                maps::ORIGINAL_DST_BY_COOKIE,
                self.original_dst_by_cookie.keys().count(),
            ),
            usage(
                maps::ORIGINAL_DST_BY_TUPLE,
                self.original_dst_by_tuple.keys().count(),
            ),
            usage(maps::SOCK_BY_TUPLE, self.sock_by_tuple.keys().count()),
        ]
    }
}

/// Whether sockops programs can read a socket's network namespace cookie (5.15+),
/// which keeps one pod's sockets out of another's connection state.
pub fn sockops_knows_netns() -> bool {
    aya::sys::is_helper_supported(
        aya::programs::ProgramType::SockOps,
        aya::sys::BpfHelper::BPF_FUNC_get_netns_cookie,
    )
    .unwrap_or(false)
}

/// Loads the probe object with its maps sized, adopting the pinned inbound-listener map
/// when `opts` asks for the pin (unpinned, with a warning, when that fails). Returns the
/// object and the pin in use.
fn load_adopting_listeners(
    opts: &DatapathOptions,
    probes: &[u8],
    accelerate: u32,
) -> Result<(Ebpf, Option<std::path::PathBuf>)> {
    let s = opts.sizes;
    let tuple_capacity = u64::from(s.connections);
    let load = |listeners_pin: Option<&std::path::Path>| {
        // The probes read only context fields and their own maps: no CO-RE
        // relocations, so the kernel's BTF (megabytes to parse) is not even read.
        let mut loader = EbpfLoader::without_btf();
        loader
            .map_max_entries(maps::POD_BY_CGROUP, s.cgroups)
            .map_max_entries(maps::POD_BY_IP, s.pod_ips)
            .map_max_entries(maps::PORT_RULES, s.rules)
            .map_max_entries(maps::CIDR_RULES, s.rules)
            .map_max_entries(maps::ORIGINAL_DST_BY_COOKIE, s.connections)
            .map_max_entries(maps::ORIGINAL_DST_BY_TUPLE, s.connections)
            .map_max_entries(maps::DNS_ORIGINAL_BY_COOKIE, s.connections)
            .map_max_entries(maps::SOCK_BY_TUPLE, s.connections)
            .map_max_entries(maps::INBOUND_LISTENERS, s.cgroups)
            .map_max_entries(maps::CAPTURED_BY_TUPLE, (s.connections / 4).max(1024))
            .map_max_entries(maps::BYPASS_BY_POD, s.pod_ips)
            .override_global(global_names::ACCELERATE, &accelerate, true)
            .override_global(global_names::TUPLE_CAPACITY, &tuple_capacity, true);
        if let Some(pin) = listeners_pin {
            // Adopted when an earlier agent pinned it: its sidecars' listeners
            // stay known across a restart.
            loader.map_pin_path(maps::INBOUND_LISTENERS, pin);
        }
        loader.load(probes).context(
            "loading the eBPF probes (is this kernel 5.7+ with BPF, cgroup-bpf and sockmap?)",
        )
    };
    let wanted_pin = match pin_dir(opts.bpffs.as_deref()).map(|d| d.filter(|_| opts.pin_listeners))
    {
        Ok(Some(dir)) => match std::fs::create_dir_all(&dir) {
            Ok(()) => Some(dir.join(LISTENERS_PIN)),
            Err(e) => {
                warn!(
                    "cannot create the pin directory {}: {e}; the inbound listeners are not pinned, so after an agent restart meshed pods refuse inbound connections until their sidecars listen again",
                    dir.display()
                );
                None
            }
        },
        _ => None,
    };
    let (ebpf, listeners_pin) = match wanted_pin {
        Some(pin) => match load(Some(&pin)) {
            Ok(e) => (e, Some(pin)),
            Err(e) => {
                warn!(
                    "pinning the inbound-listener map at {} failed ({e:#}); running unpinned: after an agent restart meshed pods refuse inbound connections until their sidecars listen again",
                    pin.display()
                );
                (load(None)?, None)
            }
        },
        None => (load(None)?, None),
    };
    Ok((ebpf, listeners_pin))
}

/// Loads and attaches, under `cgroup`, every program that records or answers a
/// connection (getsockopt, sockops, sock_release, post_bind) and loads sk_lookup (attached
/// per network namespace later); writes the meshes' inbound ports. Returns that map.
fn attach_answering_hooks(
    ebpf: &mut Ebpf,
    opts: &DatapathOptions,
    cgroup: &File,
    knows_netns: bool,
) -> Result<HashMap<MapData, u16, u8>> {
    let mode = CgroupAttachMode::Single;
    let p: &mut CgroupSockopt = program(ebpf, progs::GETSOCKOPT)?;
    p.load()
        .context("verifier rejected the getsockopt program")?;
    p.attach(cgroup, mode)
        .context("attaching cgroup/getsockopt")?;
    let sockops = if knows_netns {
        progs::SOCKOPS
    } else {
        progs::SOCKOPS_COMPAT
    };
    let p: &mut SockOps = program(ebpf, sockops)?;
    p.load().context("verifier rejected the sockops program")?;
    p.attach(cgroup, mode).context("attaching sockops")?;
    // Optional (5.9+): without it a connect the kernel fails before TCP starts
    // keeps the two tuple entries it was promised until the agent restarts.
    let p: &mut CgroupSock = program(ebpf, progs::SOCK_RELEASE)?;
    if let Err(e) = p
        .load()
        .map_err(anyhow::Error::from)
        .and_then(|()| Ok(p.attach(cgroup, mode)?))
    {
        warn!(
            "cgroup/sock_release not available ({e:#}): connects the kernel fails before \
             TCP starts keep their promised map room until the agent restarts"
        );
    }
    let mut inbound_ports: HashMap<MapData, u16, u8> = take(ebpf, maps::INBOUND_PORTS)?;
    for port in &opts.inbound_ports {
        inbound_ports
            .insert(port, 1, 0)
            .with_context(|| format!("writing inbound port {port}"))?;
    }
    for name in SOCK_PROGRAMS {
        let p: &mut CgroupSock = program(ebpf, name)?;
        p.load()
            .with_context(|| format!("verifier rejected {name}"))?;
        p.attach(cgroup, mode)
            .with_context(|| format!("attaching {name} to {}", opts.cgroup_root.display()))?;
    }
    let p: &mut SkLookup = program(ebpf, progs::SK_LOOKUP)?;
    p.load()
        .context("verifier rejected the sk_lookup program")?;
    Ok(inbound_ports)
}

/// Where the cgroup programs are attached and which they are, as the log and `status`
/// say it.
pub fn describe_attachments(cgroup_root: &std::path::Path, accelerate: bool) -> String {
    format!(
        "{} (connect4/6, sendmsg/recvmsg4/6, post_bind4/6, getsockopt, sockops{})",
        cgroup_root.display(),
        if accelerate {
            ", sk_msg"
        } else {
            "; sk_msg acceleration off"
        }
    )
}

/// Loads every probe through the verifier without attaching anything (for `check`):
/// each program's name with what happened. Maps are created small.
pub fn verify_probes(accelerate: bool) -> Vec<(&'static str, Result<(), String>)> {
    let Ok(probes) = probes() else {
        return vec![("maps", Err(PROBES_SKIPPED.to_string()))];
    };
    let accelerate: u32 = accelerate.into();
    let mut loader = EbpfLoader::without_btf();
    loader.override_global(global_names::ACCELERATE, &accelerate, true);
    for name in [
        maps::POD_BY_CGROUP,
        maps::POD_BY_IP,
        maps::PORT_RULES,
        maps::CIDR_RULES,
        maps::ORIGINAL_DST_BY_COOKIE,
        maps::ORIGINAL_DST_BY_TUPLE,
        maps::DNS_ORIGINAL_BY_COOKIE,
        maps::SOCK_BY_TUPLE,
        maps::INBOUND_LISTENERS,
        maps::CAPTURED_BY_TUPLE,
        maps::BYPASS_BY_POD,
    ] {
        loader.map_max_entries(name, 16);
    }
    let mut ebpf = match loader.load(probes) {
        Ok(e) => e,
        Err(e) => return vec![("maps", Err(format!("creating the maps: {e:#}")))],
    };
    SOCK_ADDR_PROGRAMS
        .into_iter()
        .chain(SOCK_PROGRAMS)
        .chain([
            progs::GETSOCKOPT,
            progs::SOCKOPS,
            progs::SOCKOPS_COMPAT,
            progs::SOCK_RELEASE,
            progs::SK_MSG,
            progs::SK_LOOKUP,
        ])
        .map(|name| {
            let result = match ebpf.program_mut(name) {
                None => Err("missing from the probe object".to_string()),
                Some(aya::programs::Program::CgroupSockAddr(p)) => p.load().map_err(short),
                Some(aya::programs::Program::CgroupSockopt(p)) => p.load().map_err(short),
                Some(aya::programs::Program::SockOps(p)) => p.load().map_err(short),
                Some(aya::programs::Program::SkMsg(p)) => p.load().map_err(short),
                Some(aya::programs::Program::CgroupSock(p)) => p.load().map_err(short),
                Some(aya::programs::Program::SkLookup(p)) => p.load().map_err(short),
                Some(_) => Err("unexpected program type".to_string()),
            };
            (name, result)
        })
        .collect()
}

/// A load error in one line: the error and the verifier's last words.
fn short(e: aya::programs::ProgramError) -> String {
    let text = format!("{e:#}");
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let first = lines.next().unwrap_or("").to_string();
    match lines.next_back() {
        Some(last) => format!("{first} … {last}"),
        None => first,
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("probe object has no program {name}"))?;
    p.try_into()
        .with_context(|| format!("program {name} has an unexpected type"))
}

/// An LPM key for a port rule.
pub fn port_rule_key(pod_id: u32, kind: u8, port: u16, port_prefix: u8) -> Key<PortRuleKey> {
    let (prefix_len, data) = PortRuleKey::lpm(pod_id, kind, port, u32::from(port_prefix));
    Key::new(prefix_len, data)
}

/// An LPM key for an address rule; IPv4 ranges become v4-mapped IPv6 ranges.
pub fn cidr_rule_key(pod_id: u32, kind: u8, cidr: &crate::annotations::Cidr) -> Key<CidrRuleKey> {
    let (prefix_len, data) = CidrRuleKey::lpm_of_range(pod_id, kind, cidr.addr, cidr.len);
    Key::new(prefix_len, data)
}

/// An address as the probes store it: IPv6 words in network order, IPv4 v4-mapped.
pub fn kernel_addr(ip: std::net::IpAddr) -> [u32; 4] {
    let octets = match ip {
        std::net::IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(a) => a.octets(),
    };
    let mut out = [0u32; 4];
    for (i, w) in out.iter_mut().enumerate() {
        *w = u32::from_ne_bytes(octets[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
    }
    out
}
