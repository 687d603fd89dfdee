//! The pure step: a kubelet PodList in, the desired datapath state of each meshed pod
//! out. No kernel, no network, no clock: everything here is unit-tested.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use k8s_openapi::api::core::v1::Pod;

use crate::{
    annotations::{Cidr, Listed, PortRange, parse_cidrs, parse_ports},
    mesh::{AnnotationRole, MESHES, Marker, Mesh, MeshSpec, OutboundListener},
};

/// Which meshes the agent looks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MeshSelection {
    /// Each pod is matched against every mesh.
    Auto,
    /// Only this mesh's pods are programmed.
    Only(Mesh),
}

/// Kinds of port rules (mirrors the probes' `port_rule`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortRuleKind {
    /// Outbound port never redirected.
    OutExclude,
    /// Outbound port redirected whatever the address.
    OutInclude,
    /// Inbound port goes straight to the app.
    InExclude,
    /// Inbound port redirected (only meaningful when not all ports are).
    InInclude,
}

impl PortRuleKind {
    /// Short name for status output.
    pub fn label(self) -> &'static str {
        match self {
            PortRuleKind::OutExclude => "out-exclude",
            PortRuleKind::OutInclude => "out-include",
            PortRuleKind::InExclude => "in-exclude",
            PortRuleKind::InInclude => "in-include",
        }
    }
}

impl CidrRuleKind {
    /// Short name for status output.
    pub fn label(self) -> &'static str {
        match self {
            CidrRuleKind::OutExclude => "out-exclude",
            CidrRuleKind::OutInclude => "out-include",
        }
    }
}

/// Kinds of address rules (mirrors the probes' `cidr_rule`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CidrRuleKind {
    /// Outbound range never redirected.
    OutExclude,
    /// Outbound range redirected (only meaningful when not all addresses are).
    OutInclude,
}

/// The desired datapath state of one meshed pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPolicy {
    /// Kubernetes uid of the pod (stable identity across polls).
    pub uid: String,
    /// `namespace/name`, for logs.
    pub name: String,
    /// The mesh whose sidecar the pod carries.
    pub mesh: Mesh,
    /// The pod's IPv4 address.
    pub ip4: Option<Ipv4Addr>,
    /// The pod's IPv6 address.
    pub ip6: Option<Ipv6Addr>,
    /// Sidecar outbound port.
    pub outbound_port: u16,
    /// Sidecar inbound port.
    pub inbound_port: u16,
    /// Proxy uid.
    pub proxy_uid: u32,
    /// DNS proxy port when DNS capture is on.
    pub dns_port: Option<u16>,
    /// Redirect outbound to every address not excluded.
    pub out_all_addrs: bool,
    /// Redirect inbound on every port not excluded.
    pub in_all_ports: bool,
    /// The sidecar's outbound listener is loopback-only.
    pub out_via_loopback: bool,
    /// Port rules.
    pub port_rules: BTreeSet<(PortRuleKind, PortRange)>,
    /// Address rules.
    pub cidr_rules: BTreeSet<(CidrRuleKind, Cidr)>,
    /// Runtime ids of the pod's containers (scheme stripped), sidecar included.
    pub container_ids: BTreeSet<String>,
    /// Runtime id of the sidecar container (its inbound listener receives the pod's
    /// captured connections), when the status names it.
    pub proxy_container_id: Option<String>,
    /// The pod's QoS class (`Guaranteed`, `Burstable`, `BestEffort`), for cgroup paths.
    pub qos_class: String,
}

/// Something wrong with the input that was skipped; logged once by the caller.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Warning(pub String);

/// What the agent should program, and what it ignored.
#[derive(Debug, Default)]
pub struct Desired {
    /// Meshed pods, in the order of the PodList.
    pub pods: Vec<PodPolicy>,
    /// Pods seen on this node (any state).
    pub pods_seen: usize,
    /// Problems found in the input.
    pub warnings: Vec<Warning>,
}

/// Builds the desired state from a PodList.
pub fn desired_state(pods: &[Pod], node_name: Option<&str>, meshes: MeshSelection) -> Desired {
    let mut out = Desired::default();
    let mut seen_ips: BTreeSet<IpAddr> = BTreeSet::new();
    for pod in pods {
        let spec = pod.spec.as_ref();
        if let (Some(want), Some(node)) = (node_name, spec.and_then(|s| s.node_name.as_deref())) {
            if want != node {
                continue;
            }
        }
        out.pods_seen += 1;
        match pod_policy(pod, meshes, &mut out.warnings) {
            Some(p) => {
                let ips: Vec<IpAddr> = p
                    .ip4
                    .map(IpAddr::V4)
                    .into_iter()
                    .chain(p.ip6.map(IpAddr::V6))
                    .collect();
                if let Some(dup) = ips.iter().find(|ip| seen_ips.contains(ip)) {
                    out.warnings.push(Warning(format!(
                        "pod {}: IP {dup} is already used by another meshed pod on this node; pod skipped",
                        p.name
                    )));
                    continue;
                }
                seen_ips.extend(ips);
                out.pods.push(p);
            }
            None => continue,
        }
    }
    out
}

fn pod_name(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or("<unnamed>")
    )
}

/// Which mesh's sidecar the pod carries, if it is meshed.
fn detect_mesh(pod: &Pod, meshes: MeshSelection) -> Option<&'static MeshSpec> {
    let spec = pod.spec.as_ref()?;
    let annotations = pod.metadata.annotations.as_ref();
    let labels = pod.metadata.labels.as_ref();
    let has_container = |name: &str| {
        spec.containers.iter().any(|c| c.name == name)
            || spec.init_containers.iter().flatten().any(|c| {
                // Native sidecars: init containers that keep running.
                c.name == name && c.restart_policy.as_deref() == Some("Always")
            })
    };
    MESHES.iter().find(|m| {
        if let MeshSelection::Only(only) = meshes {
            if only != m.mesh {
                return false;
            }
        }
        let (present, sidecar) = match m.marker {
            Marker::Container(c) => (has_container(c), c),
            Marker::LabelAndContainer(l, c) => (
                labels.is_some_and(|ls| ls.contains_key(l)) && has_container(c),
                c,
            ),
        };
        if !present {
            return false;
        }
        // At least one app container besides the sidecar.
        if !spec.containers.iter().any(|c| c.name != sidecar) {
            return false;
        }
        if let Some(key) = m.opt_out {
            let v = annotations
                .and_then(|a| a.get(key))
                .map(|s| s.trim().to_ascii_lowercase());
            if matches!(v.as_deref(), Some("false" | "disabled")) {
                return false;
            }
        }
        if let Some(key) = m.required_annotation {
            if !annotations.is_some_and(|a| a.contains_key(key)) {
                return false;
            }
        }
        true
    })
}

fn pod_policy(pod: &Pod, meshes: MeshSelection, warnings: &mut Vec<Warning>) -> Option<PodPolicy> {
    let name = pod_name(pod);
    let spec = pod.spec.as_ref()?;
    let status = pod.status.as_ref()?;
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    if spec.host_network == Some(true) {
        return None;
    }
    if status.phase.as_deref() != Some("Running") {
        return None;
    }
    let mesh = detect_mesh(pod, meshes)?;
    let uid = pod.metadata.uid.clone().filter(|u| !u.is_empty());
    let Some(uid) = uid else {
        warnings.push(Warning(format!("pod {name}: no metadata.uid; pod skipped")));
        return None;
    };

    let mut ip4 = None;
    let mut ip6 = None;
    let listed = status
        .pod_ips
        .iter()
        .flatten()
        .map(|p| p.ip.as_str())
        .chain(status.pod_ip.as_deref());
    for raw in listed {
        match raw.trim().parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => {
                ip4.get_or_insert(a);
            }
            Ok(IpAddr::V6(a)) => {
                ip6.get_or_insert(a);
            }
            Err(_) => warnings.push(Warning(format!(
                "pod {name}: pod IP {raw:?} is not an IP address; ignored"
            ))),
        }
    }
    if ip4.is_none() && ip6.is_none() {
        // Not yet scheduled onto the network: nothing to redirect to.
        return None;
    }

    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let mut p = PodPolicy {
        uid,
        name: name.clone(),
        mesh: mesh.mesh,
        ip4,
        ip6,
        outbound_port: mesh.outbound_port,
        inbound_port: mesh.inbound_port,
        proxy_uid: mesh.proxy_uid,
        dns_port: None,
        out_all_addrs: true,
        in_all_ports: true,
        out_via_loopback: mesh.outbound_listener == OutboundListener::Loopback,
        port_rules: BTreeSet::new(),
        cidr_rules: BTreeSet::new(),
        container_ids: BTreeSet::new(),
        proxy_container_id: None,
        qos_class: status
            .qos_class
            .clone()
            .unwrap_or_else(|| "BestEffort".into()),
    };
    for &port in mesh.own_ports {
        p.port_rules.insert((
            PortRuleKind::InExclude,
            PortRange {
                first: port,
                last: port,
            },
        ));
    }
    for (key, role) in mesh.annotations {
        let Some(value) = annotations.get(*key) else {
            continue;
        };
        if let Err(e) = apply_annotation(&mut p, *role, value) {
            warnings.push(Warning(format!(
                "pod {name}: annotation {key}={value:?}: {e}; annotation ignored"
            )));
        }
    }
    if let (Some(port), Some(key)) = (mesh.dns_port, mesh.dns_annotation) {
        let on = match annotations.get(key).map(|v| v.trim().to_ascii_lowercase()) {
            None => mesh.dns_default,
            Some(v) if v == "true" || v == "enabled" => true,
            Some(v) if v == "false" || v == "disabled" => false,
            Some(v) => {
                warnings.push(Warning(format!(
                    "pod {name}: annotation {key}={v:?}: expected true or false; DNS capture left off"
                )));
                false
            }
        };
        if on {
            p.dns_port = Some(port);
        }
    }
    let statuses = status
        .container_statuses
        .iter()
        .flatten()
        .chain(status.init_container_statuses.iter().flatten());
    for cs in statuses {
        let Some(id) = cs.container_id.as_deref() else {
            continue;
        };
        let id = id.split_once("://").map_or(id, |(_, rest)| rest);
        if !id.is_empty()
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            p.container_ids.insert(id.to_string());
            if cs.name == mesh.marker.sidecar_container() {
                p.proxy_container_id = Some(id.to_string());
            }
        } else {
            warnings.push(Warning(format!(
                "pod {name}: container id {id:?} is malformed; ignored"
            )));
        }
    }
    Some(p)
}

fn apply_annotation(p: &mut PodPolicy, role: AnnotationRole, value: &str) -> Result<(), String> {
    use AnnotationRole::*;
    let port_kind = match role {
        ExcludeOutboundPorts => Some(PortRuleKind::OutExclude),
        IncludeOutboundPorts => Some(PortRuleKind::OutInclude),
        ExcludeInboundPorts => Some(PortRuleKind::InExclude),
        IncludeInboundPorts => Some(PortRuleKind::InInclude),
        _ => None,
    };
    if let Some(kind) = port_kind {
        match (parse_ports(value)?, kind) {
            (Listed::All, PortRuleKind::InInclude) => p.in_all_ports = true,
            (Listed::Some(list), PortRuleKind::InInclude) => {
                p.in_all_ports = false;
                p.port_rules.extend(list.into_iter().map(|r| (kind, r)));
            }
            (Listed::All, kind) => {
                p.port_rules.insert((
                    kind,
                    PortRange {
                        first: 1,
                        last: 65535,
                    },
                ));
            }
            (Listed::Some(list), kind) => p.port_rules.extend(list.into_iter().map(|r| (kind, r))),
        }
        return Ok(());
    }
    let kind = if role == ExcludeOutboundRanges {
        CidrRuleKind::OutExclude
    } else {
        CidrRuleKind::OutInclude
    };
    match (parse_cidrs(value)?, kind) {
        (Listed::All, CidrRuleKind::OutInclude) => p.out_all_addrs = true,
        (Listed::Some(list), CidrRuleKind::OutInclude) => {
            p.out_all_addrs = false;
            p.cidr_rules.extend(list.into_iter().map(|c| (kind, c)));
        }
        (Listed::All, kind) => {
            for all in ["0.0.0.0/0", "::/0"] {
                if let Listed::Some(c) = parse_cidrs(all)? {
                    p.cidr_rules.extend(c.into_iter().map(|c| (kind, c)));
                }
            }
        }
        (Listed::Some(list), kind) => p.cidr_rules.extend(list.into_iter().map(|c| (kind, c))),
    }
    Ok(())
}

#[cfg(test)]
mod tests;
