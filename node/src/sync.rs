//! Keeping the kernel maps equal to the desired state: each poll computes every map
//! entry each pod needs, compares with what was written before, and writes only the
//! differences. New entries go in rules-first and cgroups-last, removals the other way
//! round, so a half-applied pod is never redirected without its exclusions.
use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::IpAddr,
    path::PathBuf,
};

use aya::maps::MapError;
use log::{info, warn};
use merbridge_edge_probes_common::{
    LocalPod, POD_DNS_CAPTURE, POD_HAS_IP4, POD_HAS_IP6, POD_IN_ALL_PORTS, POD_INBOUND_ARMED,
    POD_OUT_ALL_ADDRS, POD_OUT_VIA_LOOPBACK, PodInfo, cidr_rule, map_names as maps, port_rule,
};

use crate::{
    annotations::{Cidr, port_prefixes},
    cgroups,
    datapath::{Datapath, cidr_rule_key, kernel_addr, port_rule_key},
    policy::{CidrRuleKind, PodPolicy, PortRuleKind},
    warnings::WarnOnce,
};

/// A port-rule entry: kind, port prefix value, prefix length.
type PortEntry = (u8, u16, u8);
/// An address-rule entry: kind and range.
type CidrEntry = (u8, Cidr);

/// Every map entry one pod needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodEntries {
    /// Pod cgroup id → pod identity (one entry once the pod's cgroup exists).
    pub cgroups: BTreeMap<u64, PodInfo>,
    /// Pod IP → what proxies need to know.
    pub ips: BTreeMap<[u32; 4], LocalPod>,
    /// Port rules.
    pub ports: BTreeSet<PortEntry>,
    /// Address rules.
    pub cidrs: BTreeSet<CidrEntry>,
}

impl PodEntries {
    /// The entries for `policy`, given its pod id and its cgroups (None while the
    /// pod's cgroup does not exist: then no POD_BY_CGROUP entry).
    pub fn build(policy: &PodPolicy, pod_id: u32, cgroups: Option<PodCgroups>) -> Self {
        let mut flags = 0;
        if policy.dns_port.is_some() {
            flags |= POD_DNS_CAPTURE;
        }
        if policy.out_all_addrs {
            flags |= POD_OUT_ALL_ADDRS;
        }
        if policy.in_all_ports {
            flags |= POD_IN_ALL_PORTS;
        }
        if policy.out_via_loopback {
            flags |= POD_OUT_VIA_LOOPBACK;
        }
        if policy.ip4.is_some() {
            flags |= POD_HAS_IP4;
        }
        if policy.ip6.is_some() {
            flags |= POD_HAS_IP6;
        }
        if cgroups.is_some_and(|c| c.armed) {
            flags |= POD_INBOUND_ARMED;
        }
        let info = PodInfo {
            ip4: policy
                .ip4
                .map(|a| kernel_addr(IpAddr::V4(a)))
                .unwrap_or_default(),
            ip6: policy
                .ip6
                .map(|a| kernel_addr(IpAddr::V6(a)))
                .unwrap_or_default(),
            pod_id,
            flags,
            proxy_uid: policy.proxy_uid,
            outbound_port: policy.outbound_port,
            inbound_port: policy.inbound_port,
            dns_port: policy.dns_port.unwrap_or(0),
            _pad: [0; 3],
            proxy_cgroup: cgroups.map_or(0, |c| c.proxy),
        };
        let local = LocalPod {
            pod_id,
            flags,
            inbound_port: policy.inbound_port,
            _pad: [0; 3],
            proxy_cgroup: cgroups.map_or(0, |c| c.proxy),
            pod_cgroup: cgroups.map_or(0, |c| c.pod),
        };
        let ips = policy
            .ip4
            .map(IpAddr::V4)
            .into_iter()
            .chain(policy.ip6.map(IpAddr::V6))
            .map(|ip| (kernel_addr(ip), local))
            .collect();
        let mut ports = BTreeSet::new();
        for (kind, range) in &policy.port_rules {
            let kind = match kind {
                PortRuleKind::OutExclude => port_rule::OUT_EXCLUDE,
                PortRuleKind::OutInclude => port_rule::OUT_INCLUDE,
                PortRuleKind::InExclude => port_rule::IN_EXCLUDE,
                PortRuleKind::InInclude => port_rule::IN_INCLUDE,
            };
            ports.extend(
                port_prefixes(*range)
                    .into_iter()
                    .map(|(v, len)| (kind, v, len)),
            );
        }
        let cidrs = policy
            .cidr_rules
            .iter()
            .map(|(kind, c)| {
                let k = match kind {
                    CidrRuleKind::OutExclude => cidr_rule::OUT_EXCLUDE,
                    CidrRuleKind::OutInclude => cidr_rule::OUT_INCLUDE,
                    CidrRuleKind::InSourceExclude => cidr_rule::IN_SOURCE_EXCLUDE,
                };
                (k, *c)
            })
            .collect();
        Self {
            cgroups: cgroups.map(|c| (c.pod, info)).into_iter().collect(),
            ips,
            ports,
            cidrs,
        }
    }

    fn describe(&self, policy: &PodPolicy) -> String {
        let ips: Vec<String> = policy
            .ip4
            .map(|a| a.to_string())
            .into_iter()
            .chain(policy.ip6.map(|a| a.to_string()))
            .collect();
        format!(
            "mesh {}, IPs [{}], {} pod cgroup, {} port rule(s), {} address rule(s), out {}/{}, in {}{}",
            policy.mesh.name(),
            ips.join(", "),
            self.cgroups.len(),
            self.ports.len(),
            self.cidrs.len(),
            policy.outbound_port,
            if policy.out_all_addrs {
                "all addresses"
            } else {
                "listed ranges"
            },
            policy.inbound_port,
            policy
                .dns_port
                .map(|p| format!(", DNS → {p}"))
                .unwrap_or_default(),
        )
    }
}

/// A pod's cgroups, under which its sidecar's inbound listener is registered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodCgroups {
    /// The pod-level cgroup id: the kernel's key for the pod.
    pub pod: u64,
    /// The sidecar container's cgroup id as the pod's status names it; 0 unknown.
    pub proxy: u64,
    /// Captured connections are refused while no listener is registered (else they
    /// pass to the app): see [`POD_INBOUND_ARMED`].
    pub armed: bool,
}

/// What a pass of [`Programmer::sync`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncReport {
    /// Pods whose entries are all in the maps.
    pub programmed: usize,
    /// Pods added, changed, removed this pass.
    pub added: usize,
    /// Pods whose entries changed.
    pub changed: usize,
    /// Pods removed.
    pub removed: usize,
    /// Map writes that failed (full map, or the kernel refused).
    pub write_errors: usize,
    /// Meshed pods whose pod cgroup does not exist (yet, or any more).
    pub waiting_for_cgroups: usize,
    /// Pods left out because a map is full.
    pub map_full: usize,
    /// Pods left out because they need more rule entries than one pod's share.
    pub over_share: usize,
}

struct Programmed {
    pod_id: u32,
    name: String,
    entries: PodEntries,
    /// The pod's cgroup was found once: when it is gone, the pod is going (no
    /// warning), rather than not having started yet.
    had_cgroups: bool,
}

/// Owns the datapath's pod maps and keeps them in step with the desired state.
pub struct Programmer {
    cgroup_root: PathBuf,
    /// cgroups that existed when the programmer was made (after the probes attached):
    /// a sidecar there may have bound its listener unseen.
    preexisting: HashSet<u64>,
    /// cgroups seen with a registered inbound listener (from the listener sockhash);
    /// a pod stays armed when its sidecar stops listening. Pruned to the sidecar
    /// cgroups of the pods synced.
    listening: BTreeSet<u64>,
    pods: BTreeMap<String, Programmed>,
    full_maps: BTreeSet<&'static str>,
    /// Inbound ports some pod's sidecar uses beyond the meshes' own, written to
    /// INBOUND_PORTS (the meshes' own are written at load).
    extra_inbound_ports: BTreeSet<u16>,
    /// Most port-rule (and most address-rule) entries one pod may take.
    rule_share: usize,
}

impl Programmer {
    /// A programmer for pods whose cgroups live below `cgroup_root`.
    /// Call it after the probes are attached: every cgroup that exists now is taken
    /// as possibly holding a sidecar that bound its listener before they were.
    pub fn new(cgroup_root: PathBuf) -> Self {
        Self {
            preexisting: cgroups::cgroup_ids_below(&cgroup_root),
            listening: BTreeSet::new(),
            cgroup_root,
            pods: BTreeMap::new(),
            full_maps: BTreeSet::new(),
            extra_inbound_ports: BTreeSet::new(),
            rule_share: usize::MAX,
        }
    }

    /// Limits each pod to `share` port-rule and `share` address-rule entries, so that
    /// one pod's annotations cannot fill the rule maps for every other pod. A pod that
    /// needs more is not redirected (fail open) and is named in a warning.
    pub fn with_rule_share(mut self, share: usize) -> Self {
        self.rule_share = share;
        self
    }

    /// Records the cgroups that have a registered inbound listener now; true when one
    /// was not seen before (a sync then arms the pods concerned).
    pub fn saw_listening(&mut self, cgroups: BTreeSet<u64>) -> bool {
        let before = self.listening.len();
        self.listening.extend(cgroups);
        self.listening.len() != before
    }

    /// Whether a sidecar in (pod or container) cgroup `id` is known to register its
    /// inbound listener: it did, or the cgroup is newer than the probes.
    fn armed(&self, id: u64) -> bool {
        !self.preexisting.contains(&id) || self.listening.contains(&id)
    }

    /// The number of cgroups (0 or 1: the pod's) programmed for the pod `uid`, if it is
    /// programmed.
    pub fn programmed_cgroups(&self, uid: &str) -> Option<usize> {
        self.pods.get(uid).map(|p| p.entries.cgroups.len())
    }

    /// Entries written to POD_BY_CGROUP, POD_BY_IP, PORT_RULES and CIDR_RULES.
    pub fn entry_counts(&self) -> [usize; 4] {
        self.pods.values().fold([0; 4], |[c, i, p, r], pod| {
            let e = &pod.entries;
            [
                c + e.cgroups.len(),
                i + e.ips.len(),
                p + e.ports.len(),
                r + e.cidrs.len(),
            ]
        })
    }

    fn allocate_pod_id(&self) -> u32 {
        let used: BTreeSet<u32> = self.pods.values().map(|p| p.pod_id).collect();
        (1..)
            .find(|id| !used.contains(id))
            .expect("fewer than 2^32 pods")
    }

    /// Brings the maps in step with `desired`; what goes wrong is said once through
    /// `warnings`.
    pub fn sync(
        &mut self,
        dp: &mut Datapath,
        desired: &[PodPolicy],
        warnings: &mut WarnOnce,
    ) -> SyncReport {
        let mut report = SyncReport::default();
        let wanted: BTreeSet<&str> = desired.iter().map(|p| p.uid.as_str()).collect();
        let gone: Vec<String> = self
            .pods
            .keys()
            .filter(|uid| !wanted.contains(uid.as_str()))
            .cloned()
            .collect();
        for uid in gone {
            let old = self.pods.remove(&uid).expect("listed above");
            let errors = apply(dp, &old.entries, &PodEntries::default(), old.pod_id);
            if errors.is_empty() {
                info!("pod {} removed: entries deleted", old.name);
            } else {
                for e in &errors {
                    warnings.warn(&format!("pod {}: removing: {e}", old.name));
                }
                report.write_errors += errors.len();
            }
            report.removed += 1;
        }
        let mut full: BTreeMap<&'static str, usize> = BTreeMap::new();
        for policy in desired {
            let pod_id = match self.pods.get(&policy.uid) {
                Some(p) => p.pod_id,
                None => self.allocate_pod_id(),
            };
            let cgroups = self.pod_cgroups(policy, warnings);
            let had_cgroups = self.pods.get(&policy.uid).is_some_and(|p| p.had_cgroups);
            if cgroups.is_none() && had_cgroups {
                // The pod is being deleted and the kubelet has not listed that yet: its
                // cgroup entry goes below.
                report.waiting_for_cgroups += 1;
                log::debug!(
                    "pod {}: its cgroup is gone; cgroup entry removed until it is back",
                    policy.name
                );
            } else if cgroups.is_none() {
                report.waiting_for_cgroups += 1;
                warnings.warn(&format!(
                    "pod {}: no cgroup found yet for the pod (uid {}) under {}; it is not redirected until one appears",
                    policy.name,
                    policy.uid,
                    self.cgroup_root.display()
                ));
            }
            let new = PodEntries::build(policy, pod_id, cgroups);
            let needs = new.ports.len().max(new.cidrs.len());
            if needs > self.rule_share {
                report.over_share += 1;
                warnings.warn(&format!(
                    "pod {}: its rules need {} port-rule and {} address-rule entries, over one \
                     pod's share of {} (a 16th of --max-rules); the pod is not redirected",
                    policy.name,
                    new.ports.len(),
                    new.cidrs.len(),
                    self.rule_share
                ));
                if let Some(old) = self.pods.remove(&policy.uid) {
                    let _ = apply(dp, &old.entries, &PodEntries::default(), old.pod_id);
                }
                continue;
            }
            let old = self.pods.get(&policy.uid).map(|p| p.entries.clone());
            if old.as_ref() == Some(&new) {
                report.programmed += 1;
                continue;
            }
            let errors = apply(
                dp,
                old.as_ref().unwrap_or(&PodEntries::default()),
                &new,
                pod_id,
            );
            let verb = if old.is_some() { "changed" } else { "added" };
            if errors.is_empty() {
                info!("pod {} {verb}: {}", policy.name, new.describe(policy));
                if old.is_some() {
                    report.changed += 1;
                } else {
                    report.added += 1;
                }
                report.programmed += 1;
                self.pods.insert(
                    policy.uid.clone(),
                    Programmed {
                        pod_id,
                        name: policy.name.clone(),
                        had_cgroups: had_cgroups || !new.cgroups.is_empty(),
                        entries: new,
                    },
                );
            } else {
                report.write_errors += errors.len();
                let full_maps: BTreeSet<&str> = errors.iter().filter_map(|e| e.full_map).collect();
                for map in &full_maps {
                    *full.entry(map).or_default() += 1;
                }
                if !full_maps.is_empty() {
                    report.map_full += 1;
                }
                for e in &errors {
                    match e.full_map {
                        // Said once per map below, not once per pod.
                        Some(_) => log::debug!("pod {}: {e}", policy.name),
                        None => warnings.warn(&format!(
                            "pod {}: {e}; the pod is left unredirected and retried next poll",
                            policy.name
                        )),
                    }
                }
                // Fail open: take out whatever of the pod made it in, retry next poll.
                let _ = apply(dp, &new, &PodEntries::default(), pod_id);
                if let Some(old) = self.pods.remove(&policy.uid) {
                    let _ = apply(dp, &old.entries, &PodEntries::default(), pod_id);
                }
            }
        }
        for (map, pods) in &full {
            if self.full_maps.insert(map) {
                warn!(
                    "map {map} is full: {pods} meshed pod(s) left unredirected (fail open); raise --max-pods"
                );
            }
        }
        let recovered: Vec<&str> = self
            .full_maps
            .iter()
            .filter(|m| !full.contains_key(*m))
            .copied()
            .collect();
        for map in recovered {
            self.full_maps.remove(map);
            info!("map {map} has room again: every meshed pod is programmed");
        }
        self.sync_inbound_ports(dp, desired, warnings);
        // Only the cgroups of pods still here need to be remembered as listening.
        let keys: BTreeSet<u64> = self
            .pods
            .values()
            .flat_map(|p| p.entries.ips.values())
            .flat_map(|l| [l.pod_cgroup, l.proxy_cgroup])
            .collect();
        self.listening.retain(|id| keys.contains(id));
        report
    }

    /// Writes the inbound ports of pods whose sidecar listens on one the meshes do not
    /// use by default (istio-init `-z`, linkerd-init `--incoming-proxy-port`) to
    /// INBOUND_PORTS, and takes out those no pod uses any more.
    fn sync_inbound_ports(
        &mut self,
        dp: &mut Datapath,
        desired: &[PodPolicy],
        warnings: &mut WarnOnce,
    ) {
        let wanted: BTreeSet<u16> = desired
            .iter()
            .map(|p| p.inbound_port)
            .filter(|port| !is_mesh_inbound_port(*port))
            .collect();
        for port in self.extra_inbound_ports.difference(&wanted) {
            let _ = dp.inbound_ports.remove(port);
        }
        self.extra_inbound_ports.retain(|p| wanted.contains(p));
        for port in wanted {
            if self.extra_inbound_ports.contains(&port) {
                continue;
            }
            match dp.inbound_ports.insert(port, 1, 0) {
                Ok(()) => {
                    self.extra_inbound_ports.insert(port);
                }
                Err(e) => warnings.warn(&format!(
                    "map {} full or refused ({e}): sidecars listening on inbound port {port} \
                     are not registered; their pods' inbound connections reach the app",
                    maps::INBOUND_PORTS
                )),
            }
        }
    }

    /// The pod's cgroup and its sidecar container's, if the pod's cgroup exists.
    fn pod_cgroups(&self, policy: &PodPolicy, warnings: &mut WarnOnce) -> Option<PodCgroups> {
        let dir = cgroups::pod_cgroup(&self.cgroup_root, &policy.uid, &policy.qos_class)?;
        let pod = match cgroups::cgroup_id(&dir) {
            Ok(id) => id,
            Err(e) => {
                // Removed between the lookup and the stat: next poll.
                warnings.warn(&format!("pod {}: {e:#}", policy.name));
                return None;
            }
        };
        let proxy = policy
            .proxy_container_id
            .as_deref()
            .and_then(|id| cgroups::container_cgroups(&dir, &[id]).pop())
            .and_then(|(_, path)| cgroups::cgroup_id(&path).ok())
            .unwrap_or(0);
        // Armed only where the listener can be found: under the pod (seen there), or
        // under a sidecar container the status names. A sidecar on a port of its own
        // may have bound it before the port was known: armed only once seen listening.
        let seen = self.listening.contains(&pod) || self.listening.contains(&proxy);
        let new = proxy != 0
            && is_mesh_inbound_port(policy.inbound_port)
            && (self.armed(pod) || self.armed(proxy));
        let armed = seen || new;
        Some(PodCgroups { pod, proxy, armed })
    }
}

/// Whether `port` is a mesh's default sidecar inbound port (written at load).
fn is_mesh_inbound_port(port: u16) -> bool {
    crate::mesh::MESHES.iter().any(|m| m.inbound_port == port)
}

/// A failed map write, naming the map and the entry.
#[derive(Debug, thiserror::Error)]
#[error("{text}")]
pub struct WriteError {
    text: String,
    /// The map, when the write failed because it is full.
    full_map: Option<&'static str>,
}

fn is_map_full(e: &MapError) -> bool {
    matches!(e, MapError::SyscallError(s) if matches!(s.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC)))
}

/// Writes the difference between `old` and `new`; returns the writes that failed.
fn apply(dp: &mut Datapath, old: &PodEntries, new: &PodEntries, pod_id: u32) -> Vec<WriteError> {
    let mut errors = Vec::new();
    let mut check = |map: &'static str, what: String, r: Result<(), MapError>| match r {
        Err(e) if is_map_full(&e) => errors.push(WriteError {
            text: format!("{map} {what}: map full"),
            full_map: Some(map),
        }),
        Err(MapError::KeyNotFound) | Ok(()) => {}
        Err(e) => errors.push(WriteError {
            text: format!("{map} {what}: {e}"),
            full_map: None,
        }),
    };
    // Removals, cgroups first: the pod stops being redirected before its rules go.
    for id in old.cgroups.keys().filter(|k| !new.cgroups.contains_key(*k)) {
        check(
            maps::POD_BY_CGROUP,
            format!("delete {id}"),
            dp.pod_by_cgroup.remove(id),
        );
    }
    for ip in old.ips.keys().filter(|k| !new.ips.contains_key(*k)) {
        check(
            maps::POD_BY_IP,
            format!("delete {ip:?}"),
            dp.pod_by_ip.remove(ip),
        );
    }
    for &(kind, port, len) in old.ports.difference(&new.ports) {
        check(
            maps::PORT_RULES,
            format!("delete {port}/{len}"),
            dp.port_rules
                .remove(&port_rule_key(pod_id, kind, port, len)),
        );
    }
    for (kind, cidr) in old.cidrs.difference(&new.cidrs) {
        check(
            maps::CIDR_RULES,
            format!("delete {}/{}", cidr.addr, cidr.len),
            dp.cidr_rules.remove(&cidr_rule_key(pod_id, *kind, cidr)),
        );
    }
    // Additions, rules first.
    for &(kind, port, len) in new.ports.difference(&old.ports) {
        check(
            maps::PORT_RULES,
            format!("insert {port}/{len}"),
            dp.port_rules
                .insert(&port_rule_key(pod_id, kind, port, len), 1, 0),
        );
    }
    for (kind, cidr) in new.cidrs.difference(&old.cidrs) {
        check(
            maps::CIDR_RULES,
            format!("insert {}/{}", cidr.addr, cidr.len),
            dp.cidr_rules
                .insert(&cidr_rule_key(pod_id, *kind, cidr), 1, 0),
        );
    }
    for (ip, local) in new.ips.iter().filter(|(k, v)| old.ips.get(*k) != Some(*v)) {
        check(
            maps::POD_BY_IP,
            format!("insert {ip:?}"),
            dp.pod_by_ip.insert(ip, local, 0),
        );
    }
    for (id, info) in new
        .cgroups
        .iter()
        .filter(|(k, v)| old.cgroups.get(*k) != Some(*v))
    {
        check(
            maps::POD_BY_CGROUP,
            format!("insert {id}"),
            dp.pod_by_cgroup.insert(id, info, 0),
        );
    }
    errors
}
