//! Pod churn for the soak test: a population of synthetic pods (Istio, Linkerd, Kuma,
//! OSM and plain; IPv4, IPv6 or both; three QoS classes; cgroupfs and systemd cgroup
//! layouts) added, started, restarted, re-annotated, terminated and removed at random,
//! each running container with a real cgroup below the node's cgroup root, served as
//! the kubelet's PodList. Deterministic for a given seed.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::unix::fs::MetadataExt,
    path::PathBuf,
};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::{Node, podlist::kubelet_fixture};

/// The node the churned pods are bound to (a few go to another node, which the agent
/// must ignore).
pub const NODE_NAME: &str = "edge-1";

/// Addresses pods draw from: small, so that an address comes back to another pod soon
/// after its pod went (the agent must remove before it adds).
const ADDRESS_POOL: u16 = 96;

/// What the churn did so far.
#[derive(Clone, Copy, Debug, Default)]
pub struct ChurnStats {
    /// Pods added to the PodList.
    pub added: u64,
    /// Pods removed from it (each one added before: one add/remove cycle).
    pub removed: u64,
    /// Pending pods that got their IPs and containers.
    pub started: u64,
    /// Containers restarted under a new id (new cgroup, old one removed).
    pub restarted: u64,
    /// Annotations set, changed or cleared.
    pub reannotated: u64,
    /// Pods marked for deletion (terminating) before their removal.
    pub terminated: u64,
}

/// One running container: its runtime id and cgroup directory.
#[derive(Clone, Debug)]
struct RunningContainer {
    id: String,
    cgroup: PathBuf,
}

#[derive(Clone, Debug)]
struct ChurnPod {
    json: Value,
    /// Template index (mesh).
    kind: usize,
    /// The pod's cgroup directory (created with its first container).
    pod_dir: PathBuf,
    systemd: bool,
    running: Vec<RunningContainer>,
    addresses: Vec<IpAddr>,
}

/// The churned population and the random source driving it.
pub struct Churn {
    state: u64,
    seq: u64,
    pods: Vec<ChurnPod>,
    templates: Vec<Value>,
    /// Population the churn hovers around.
    target: usize,
    /// What was done so far.
    pub stats: ChurnStats,
}

/// Per mesh template: annotation keys that take port lists, and ones that take ranges.
const PORT_KEYS: [&[&str]; 5] = [
    &[
        "traffic.sidecar.istio.io/excludeOutboundPorts",
        "traffic.sidecar.istio.io/excludeInboundPorts",
        "traffic.sidecar.istio.io/includeInboundPorts",
    ],
    &[
        "config.linkerd.io/skip-outbound-ports",
        "config.linkerd.io/skip-inbound-ports",
    ],
    &[
        "traffic.kuma.io/exclude-outbound-ports",
        "traffic.kuma.io/exclude-inbound-ports",
    ],
    &[
        "openservicemesh.io/outbound-port-exclusion-list",
        "openservicemesh.io/inbound-port-exclusion-list",
    ],
    &[],
];
const RANGE_KEYS: [&[&str]; 5] = [
    &[
        "traffic.sidecar.istio.io/excludeOutboundIPRanges",
        "traffic.sidecar.istio.io/includeOutboundIPRanges",
    ],
    &["config.linkerd.io/skip-subnets"],
    &[],
    &[
        "openservicemesh.io/outbound-ip-range-exclusion-list",
        "openservicemesh.io/outbound-ip-range-inclusion-list",
    ],
    &[],
];

impl Churn {
    /// A churn of about `target` pods driven by `seed`.
    pub fn new(seed: u64, target: usize) -> Self {
        let fixture = kubelet_fixture();
        // Istio, Linkerd (native sidecar), Kuma, OSM, plain.
        let templates = (0..5).map(|i| fixture["items"][i].clone()).collect();
        Self {
            state: seed | 1,
            seq: 0,
            pods: Vec::new(),
            templates,
            target,
            stats: ChurnStats::default(),
        }
    }

    fn next(&mut self) -> u64 {
        // xorshift64*
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    /// Pods in the PodList now.
    pub fn len(&self) -> usize {
        self.pods.len()
    }

    /// Whether the PodList is empty.
    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// The kubelet's `/pods` answer for the current population.
    pub fn pod_list(&self) -> Value {
        let items: Vec<Value> = self.pods.iter().map(|p| p.json.clone()).collect();
        json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
    }

    /// Directories below `root` the agent may watch: the root, the kubelet's QoS
    /// directories and the pod directories that exist now.
    pub fn watchable_dirs(&self, root: &std::path::Path) -> usize {
        let fixed = [
            "",
            "kubepods",
            "kubepods/burstable",
            "kubepods/besteffort",
            "kubepods.slice",
            "kubepods.slice/kubepods-burstable.slice",
            "kubepods.slice/kubepods-besteffort.slice",
        ];
        let pods = self.pods.iter().filter(|p| p.pod_dir.is_dir()).count();
        fixed.iter().filter(|d| root.join(d).is_dir()).count() + pods
    }

    /// The id of the pod cgroup of the pod with Kubernetes uid `pod_uid`, if it exists.
    pub fn pod_cgroup_id(&self, pod_uid: &str) -> Option<u64> {
        self.pods
            .iter()
            .find(|p| p.json["metadata"]["uid"] == pod_uid)
            .and_then(|p| std::fs::metadata(&p.pod_dir).ok())
            .map(|m| m.ino())
    }

    /// The cgroup id of the running container `id`, if there is one.
    pub fn cgroup_id(&self, container_id: &str) -> Option<u64> {
        self.pods
            .iter()
            .flat_map(|p| &p.running)
            .find(|c| c.id == container_id)
            .and_then(|c| std::fs::metadata(&c.cgroup).ok())
            .map(|m| m.ino())
    }

    /// Applies `ops` random changes: adds, starts, restarts, re-annotations,
    /// terminations and removals, keeping the population near its target.
    pub fn step(&mut self, node: &mut Node, ops: usize) -> Result<()> {
        for _ in 0..ops {
            let roll = self.below(100);
            let crowded = self.pods.len() >= self.target;
            let sparse = self.pods.len() < self.target / 2;
            match roll {
                _ if self.pods.is_empty() => self.add(node)?,
                0..30 if !crowded || sparse => self.add(node)?,
                0..30 => self.remove(node)?,
                30..55 if !sparse => self.remove(node)?,
                30..55 => self.add(node)?,
                55..70 => self.restart(node)?,
                70..85 => self.reannotate(),
                85..93 => self.start(node)?,
                _ => self.terminate(),
            }
        }
        Ok(())
    }

    fn free_address(&mut self, v6: bool) -> IpAddr {
        let used: BTreeSet<IpAddr> = self
            .pods
            .iter()
            .flat_map(|p| p.addresses.iter().copied())
            .collect();
        // Now and then two live pods share an address (a stale PodList, a CNI bug):
        // the agent must program only the first of them.
        let shared = self.chance(1);
        for _ in 0..1000 {
            let n = self.below(usize::from(ADDRESS_POOL)) as u16 + 1;
            let ip = if v6 {
                IpAddr::V6(Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, n))
            } else {
                IpAddr::V4(Ipv4Addr::new(10, 99, 0, n as u8))
            };
            if shared == used.contains(&ip) {
                return ip;
            }
        }
        IpAddr::V4(Ipv4Addr::new(10, 98, 0, 1))
    }

    fn container_id(&mut self) -> String {
        self.seq += 1;
        format!("{:016x}{:048x}", self.next(), self.seq)
    }

    fn cgroup_dir(pod: &ChurnPod, id: &str) -> PathBuf {
        if pod.systemd {
            pod.pod_dir.join(format!("cri-containerd-{id}.scope"))
        } else {
            pod.pod_dir.join(id)
        }
    }

    fn add(&mut self, node: &mut Node) -> Result<()> {
        let kind = self.below(self.templates.len());
        let mut json = self.templates[kind].clone();
        self.seq += 1;
        let n = self.seq;
        let uid = format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            self.next() as u32,
            n & 0xffff,
            self.next() & 0xfff,
            self.next() & 0xfff,
            n
        );
        let qos = ["Burstable", "Burstable", "BestEffort", "Guaranteed"][self.below(4)];
        let systemd = self.chance(50);
        let base = &node.cgroup_root;
        let lower = qos.to_ascii_lowercase();
        let pod_dir = match (systemd, qos) {
            (false, "Guaranteed") => base.join(format!("kubepods/pod{uid}")),
            (false, _) => base.join(format!("kubepods/{lower}/pod{uid}")),
            (true, "Guaranteed") => base.join(format!(
                "kubepods.slice/kubepods-pod{}.slice",
                uid.replace('-', "_")
            )),
            (true, _) => base.join(format!(
                "kubepods.slice/kubepods-{lower}.slice/kubepods-{lower}-pod{}.slice",
                uid.replace('-', "_")
            )),
        };
        let namespace = ["default", "shop", "edge"][self.below(3)];
        json["metadata"]["name"] = json!(format!("churn-{kind}-{n}"));
        json["metadata"]["namespace"] = json!(namespace);
        json["metadata"]["uid"] = json!(uid);
        if let Some(m) = json["metadata"].as_object_mut() {
            m.remove("deletionTimestamp");
        }
        json["status"]["qosClass"] = json!(qos);
        // A few pods belong to another node: the kubelet never lists them, but a
        // misconfigured source could, and the agent must leave them alone.
        let here = !self.chance(4);
        json["spec"]["nodeName"] = json!(if here { NODE_NAME } else { "edge-2" });
        let mut pod = ChurnPod {
            json,
            kind,
            pod_dir,
            systemd,
            running: Vec::new(),
            addresses: Vec::new(),
        };
        set_pending(&mut pod.json);
        self.stats.added += 1;
        // Most pods come up at once; some stay Pending until a later step.
        if !self.chance(20) {
            self.bring_up(node, &mut pod, here)?;
        }
        if self.chance(30) {
            self.set_random_annotation(&mut pod);
        }
        self.pods.push(pod);
        Ok(())
    }

    /// Gives a pending pod its IPs and running containers (with cgroups when on this node).
    fn bring_up(&mut self, node: &mut Node, pod: &mut ChurnPod, here: bool) -> Result<()> {
        let family = self.below(5);
        let mut addresses = Vec::new();
        if family < 4 {
            addresses.push(self.free_address(false));
        }
        if family >= 2 {
            addresses.push(self.free_address(true));
        }
        pod.addresses = addresses.clone();
        let ips: Vec<Value> = addresses
            .iter()
            .map(|a| json!({"ip": a.to_string()}))
            .collect();
        pod.json["status"]["phase"] = json!("Running");
        pod.json["status"]["podIP"] = json!(addresses[0].to_string());
        pod.json["status"]["podIPs"] = json!(ips);
        for list in ["initContainerStatuses", "containerStatuses"] {
            let n = pod.json["status"][list].as_array().map_or(0, Vec::len);
            for i in 0..n {
                let id = self.container_id();
                let status = &mut pod.json["status"][list][i];
                status["containerID"] = json!(format!("containerd://{id}"));
                let running = status["state"].get("running").is_some();
                status["ready"] = json!(running);
                if running && here {
                    let cgroup = Self::cgroup_dir(pod, &id);
                    node.mkdir_cgroup(&cgroup)?;
                    pod.running.push(RunningContainer { id, cgroup });
                }
            }
        }
        Ok(())
    }

    fn start(&mut self, node: &mut Node) -> Result<()> {
        let pending: Vec<usize> = (0..self.pods.len())
            .filter(|&i| self.pods[i].json["status"]["phase"] == "Pending")
            .collect();
        if pending.is_empty() {
            return self.add(node);
        }
        let i = pending[self.below(pending.len())];
        let mut pod = self.pods[i].clone();
        let here = pod.json["spec"]["nodeName"] == NODE_NAME;
        self.bring_up(node, &mut pod, here)?;
        self.pods[i] = pod;
        self.stats.started += 1;
        Ok(())
    }

    fn restart(&mut self, node: &mut Node) -> Result<()> {
        let with: Vec<usize> = (0..self.pods.len())
            .filter(|&i| !self.pods[i].running.is_empty())
            .collect();
        if with.is_empty() {
            return self.add(node);
        }
        let i = with[self.below(with.len())];
        let c = self.below(self.pods[i].running.len());
        let old = self.pods[i].running[c].clone();
        let id = self.container_id();
        let cgroup = Self::cgroup_dir(&self.pods[i], &id);
        // The runtime starts the new container before the old cgroup is gone, or after:
        // both orders happen.
        let new_first = self.chance(50);
        if new_first {
            node.mkdir_cgroup(&cgroup)?;
        }
        node.remove_cgroup(&old.cgroup)?;
        if !new_first {
            node.mkdir_cgroup(&cgroup)?;
        }
        let pod = &mut self.pods[i];
        pod.running[c] = RunningContainer {
            id: id.clone(),
            cgroup,
        };
        for list in ["initContainerStatuses", "containerStatuses"] {
            for status in pod.json["status"][list]
                .as_array_mut()
                .into_iter()
                .flatten()
            {
                if status["containerID"] == format!("containerd://{}", old.id) {
                    status["containerID"] = json!(format!("containerd://{id}"));
                    let restarts = status["restartCount"].as_u64().unwrap_or(0);
                    status["restartCount"] = json!(restarts + 1);
                }
            }
        }
        self.stats.restarted += 1;
        Ok(())
    }

    fn random_ports(&mut self) -> String {
        if self.chance(5) {
            return "not-a-port".into();
        }
        let n = self.below(3) + 1;
        (0..n)
            .map(|_| {
                let first = 1000 + self.below(60000) as u32;
                if self.chance(30) {
                    format!("{first}-{}", first + self.below(50) as u32)
                } else {
                    first.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    fn random_ranges(&mut self) -> String {
        if self.chance(5) {
            return "10.0.0.0/33".into();
        }
        let n = self.below(2) + 1;
        (0..n)
            .map(|_| match self.below(3) {
                0 => format!("10.{}.0.0/16", self.below(256)),
                1 => format!("192.168.{}.0/24", self.below(256)),
                _ => format!("fd00:{:x}::/32", self.below(0xffff)),
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    fn set_random_annotation(&mut self, pod: &mut ChurnPod) {
        let (ports, ranges) = (PORT_KEYS[pod.kind], RANGE_KEYS[pod.kind]);
        let keys: Vec<&str> = ports.iter().chain(ranges.iter()).copied().collect();
        if keys.is_empty() {
            return;
        }
        let key = keys[self.below(keys.len())];
        let annotations = &mut pod.json["metadata"]["annotations"];
        if !annotations.is_object() {
            *annotations = json!({});
        }
        if self.chance(25) {
            if let Some(a) = pod.json["metadata"]["annotations"].as_object_mut() {
                a.remove(key);
            }
        } else {
            let value = if ports.contains(&key) {
                self.random_ports()
            } else {
                self.random_ranges()
            };
            pod.json["metadata"]["annotations"][key] = json!(value);
        }
    }

    fn reannotate(&mut self) {
        if self.pods.is_empty() {
            return;
        }
        let i = self.below(self.pods.len());
        let mut pod = self.pods[i].clone();
        self.set_random_annotation(&mut pod);
        self.pods[i] = pod;
        self.stats.reannotated += 1;
    }

    fn terminate(&mut self) {
        let live: Vec<usize> = (0..self.pods.len())
            .filter(|&i| {
                self.pods[i].json["metadata"]
                    .get("deletionTimestamp")
                    .is_none()
            })
            .collect();
        if live.is_empty() {
            return;
        }
        let i = live[self.below(live.len())];
        self.pods[i].json["metadata"]["deletionTimestamp"] = json!("2026-11-25T12:00:00Z");
        self.stats.terminated += 1;
    }

    fn remove(&mut self, node: &mut Node) -> Result<()> {
        if self.pods.is_empty() {
            return Ok(());
        }
        // Terminating pods go first, as they do on a node.
        let i = (0..self.pods.len())
            .find(|&i| {
                self.pods[i].json["metadata"]
                    .get("deletionTimestamp")
                    .is_some()
            })
            .unwrap_or_else(|| self.below(self.pods.len()));
        let pod = self.pods.swap_remove(i);
        for c in &pod.running {
            node.remove_cgroup(&c.cgroup)
                .with_context(|| format!("removing container {}", c.id))?;
        }
        if pod.pod_dir.exists() {
            node.remove_cgroup(&pod.pod_dir)?;
        }
        self.stats.removed += 1;
        Ok(())
    }
}

/// A pod as the kubelet lists it before the network and containers are up.
fn set_pending(json: &mut Value) {
    json["status"]["phase"] = json!("Pending");
    if let Some(s) = json["status"].as_object_mut() {
        s.remove("podIP");
        s.remove("podIPs");
    }
    for list in ["initContainerStatuses", "containerStatuses"] {
        for status in json["status"][list].as_array_mut().into_iter().flatten() {
            if let Some(s) = status.as_object_mut() {
                s.remove("containerID");
            }
            status["ready"] = json!(false);
            status["restartCount"] = json!(0);
        }
    }
}
