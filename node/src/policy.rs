//! The pure step: a kubelet PodList in, the desired datapath state of each meshed pod
//! out. No kernel, no network, no clock: everything here is unit-tested.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};

use crate::{
    annotations::{Cidr, Listed, PortRange, parse_cidrs, parse_ports},
    mesh::{
        AnnotationRole, DnsSwitch, InitSetting, MESHES, Marker, Mesh, MeshSpec, OutboundListener,
    },
};

mod init_args;
mod istio;

use init_args::InitArgs;

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
            CidrRuleKind::InSourceExclude => "in-source-exclude",
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
    /// Inbound connections from this source range go straight to the app.
    InSourceExclude,
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

impl PodPolicy {
    /// The pod's addresses.
    pub fn ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.ip4
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.ip6.map(IpAddr::V6))
    }
}

/// Something wrong with the input that was skipped; logged once by the caller.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Warning(pub String);

/// What the agent should program, and what it ignored.
#[derive(Debug, Default)]
pub struct Desired {
    /// Meshed pods, by name and uid (whatever the PodList's order).
    pub pods: Vec<PodPolicy>,
    /// Pods seen on this node (any state).
    pub pods_seen: usize,
    /// Problems found in the input.
    pub warnings: Vec<Warning>,
}

/// Builds the desired state from a PodList.
pub fn desired_state(pods: &[Pod], node_name: Option<&str>, meshes: MeshSelection) -> Desired {
    let mut out = Desired::default();
    let mut policies = Vec::new();
    for pod in pods {
        let spec = pod.spec.as_ref();
        if let (Some(want), Some(node)) = (node_name, spec.and_then(|s| s.node_name.as_deref()))
            && want != node
        {
            continue;
        }
        out.pods_seen += 1;
        policies.extend(pod_policy(pod, meshes, &mut out.warnings));
    }
    // The kubelet lists pods in a different order on every call: nothing below may
    // depend on it.
    policies.sort_by(|a, b| (&a.name, &a.uid).cmp(&(&b.name, &b.uid)));
    let mut claims: BTreeMap<IpAddr, Vec<&str>> = BTreeMap::new();
    for p in &policies {
        for ip in p.ips() {
            claims.entry(ip).or_default().push(&p.name);
        }
    }
    // Two meshed pods listing one IP (a reused address in a stale status): which one
    // owns it is not known, so neither is redirected until the status settles.
    let shared: BTreeMap<IpAddr, Vec<String>> = claims
        .into_iter()
        .filter(|(_, names)| names.len() > 1)
        .map(|(ip, names)| (ip, names.into_iter().map(str::to_string).collect()))
        .collect();
    for p in policies {
        if let Some((ip, names)) = p.ips().find_map(|ip| shared.get_key_value(&ip)) {
            let others: Vec<&str> = names
                .iter()
                .map(String::as_str)
                .filter(|n| *n != p.name)
                .collect();
            out.warnings.push(Warning(format!(
                "pod {}: IP {ip} is also listed for meshed pod(s) {} on this node; pod skipped until only one has it",
                p.name,
                others.join(", ")
            )));
            continue;
        }
        out.pods.push(p);
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
        if let MeshSelection::Only(only) = meshes
            && only != m.mesh
        {
            return false;
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
        if let Some(key) = m.required_annotation
            && !annotations.is_some_and(|a| a.contains_key(key))
        {
            return false;
        }
        true
    })
}

/// The sidecar container: a container, or a native sidecar (an init container).
fn sidecar_container<'s>(spec: &'s PodSpec, name: &str) -> Option<&'s Container> {
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == name)
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
    let sidecar_name = mesh.marker.sidecar_container();
    let sidecar = sidecar_container(spec, sidecar_name);
    let init = mesh.init.as_ref().and_then(|i| init_args::read(spec, i));
    if let Some(sources) = &mesh.interception_mode {
        let mode = istio::interception_mode(
            sources,
            init.as_ref(),
            sidecar.map(|c| (sidecar_name, c)),
            pod.metadata.annotations.as_ref(),
        );
        let why = match mode.mode.as_str() {
            "REDIRECT" => None,
            "TPROXY" => Some(
                "TPROXY interception is not supported; the pod keeps the mesh's own rules"
                    .to_string(),
            ),
            "NONE" => Some(format!(
                "interception mode NONE ({}): the mesh captures none of its traffic; pod not programmed",
                mode.origin
            )),
            other => Some(format!(
                "interception mode {other:?} ({}) is not REDIRECT, TPROXY or NONE; pod not programmed",
                mode.origin
            )),
        };
        if let Some(why) = why {
            warnings.push(Warning(format!("pod {name}: {why}")));
            return None;
        }
    }

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
    // The annotations are checked even where the init container's arguments apply, so
    // a value edited after injection (which changes nothing) is still reported.
    let mut scratch = p.clone();
    for (key, role) in mesh.annotations {
        let Some(value) = annotations.get(*key) else {
            continue;
        };
        let what = format!("annotation {key}={value:?}");
        if init.is_none() {
            apply_rule(
                &mut p,
                *role,
                value,
                &what,
                "annotation ignored",
                &name,
                warnings,
            );
        } else if let Err(e) = apply_annotation(&mut scratch, *role, value) {
            warnings.push(Warning(format!(
                "pod {name}: {what}: {e}; annotation ignored"
            )));
        }
    }
    if let Some(init) = &init {
        apply_init(&mut p, init, &name, warnings);
    }
    // The mesh's own ports, and the sidecar's listeners wherever they are, are never
    // captured inbound.
    let own_ports: Vec<u16> = (mesh.own_ports.iter().copied())
        .chain([p.outbound_port, p.inbound_port])
        .collect();
    for port in own_ports {
        p.port_rules.insert((
            PortRuleKind::InExclude,
            PortRange {
                first: port,
                last: port,
            },
        ));
    }
    p.proxy_uid = proxy_uid(pod, spec, mesh, sidecar, init.as_ref(), &name, warnings);
    if let Some(port) = mesh.dns_port
        && dns_capture(mesh, &annotations, sidecar, init.as_ref(), &name, warnings)
    {
        p.dns_port = Some(port);
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
            if cs.name == sidecar_name {
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

/// The init container's settings replace the mesh's defaults and the annotations: the
/// injector rendered the annotations, or the mesh-wide values when a pod has none
/// (Istio's `global.proxy.excludeIPRanges`, Linkerd's `proxyInit.ignoreOutboundPorts`),
/// into its arguments, and they are what the mesh's own rules were built from.
fn apply_init(p: &mut PodPolicy, init: &InitArgs, name: &str, warnings: &mut Vec<Warning>) {
    for (setting, given) in init.iter() {
        let what = format!("{} {:?}", given.origin, given.value);
        match setting {
            InitSetting::Rule(role) => {
                apply_rule(p, role, &given.value, &what, "ignored", name, warnings)
            }
            InitSetting::OutboundPort | InitSetting::InboundPort => {
                match given.value.trim().parse::<u16>() {
                    Ok(port) if port != 0 => {
                        if setting == InitSetting::OutboundPort {
                            p.outbound_port = port;
                        } else {
                            p.inbound_port = port;
                        }
                    }
                    _ => warnings.push(Warning(format!(
                        "pod {name}: {what} is not a port (1-65535); the mesh's default port is used"
                    ))),
                }
            }
            // Read by `proxy_uid`, `interception_mode` and `dns_capture`.
            InitSetting::ProxyUid | InitSetting::InterceptionMode | InitSetting::RedirectDns => {}
        }
    }
}

/// Applies one rule, or warns naming the pod, `what` and what became of it.
fn apply_rule(
    p: &mut PodPolicy,
    role: AnnotationRole,
    value: &str,
    what: &str,
    outcome: &str,
    name: &str,
    warnings: &mut Vec<Warning>,
) {
    if let Err(e) = apply_annotation(p, role, value) {
        warnings.push(Warning(format!("pod {name}: {what}: {e}; {outcome}")))
    }
}

/// The uid the sidecar runs as, whose connections are never redirected (they would
/// come back to the sidecar). The first valid one of:
/// 1. the sidecar container's `securityContext.runAsUser`: the uid the kernel runs the
///    proxy as (Istio's CNI plugin reads this field too);
/// 2. the pod's `securityContext.runAsUser`, which Kubernetes applies to containers
///    that set none;
/// 3. the uid the mesh's init container exempts from its rules (istio-init `-u`,
///    linkerd-init `--proxy-uid`), for a spec that leaves the uid to the image;
/// 4. the mesh's uid annotation (Linkerd `config.linkerd.io/proxy-uid`, Kuma
///    `kuma.io/sidecar-uid`), which the injectors render into 1 and 3, so it decides
///    only for pods set up some other way;
/// 5. the mesh's default (Istio 1337, Linkerd 2102, Kuma 5678, OSM 1500).
///
/// The spec comes before the init container's flag because the two differ exactly
/// where trusting the flag loops: Istio runs Envoy as root with gid 1337 for TPROXY
/// and `capNetBindService` while istio-init keeps `-u 1337` (its rules also match the
/// gid, which the agent does not). A uid inside a user namespace (`hostUsers: false`)
/// is not the one the kernel reports; none of these sources give that one.
fn proxy_uid(
    pod: &Pod,
    spec: &PodSpec,
    mesh: &MeshSpec,
    sidecar: Option<&Container>,
    init: Option<&InitArgs>,
    name: &str,
    warnings: &mut Vec<Warning>,
) -> u32 {
    let sidecar_name = mesh.marker.sidecar_container();
    let mut candidates: Vec<(String, String)> = Vec::new();
    if let Some(u) = sidecar
        .and_then(|c| c.security_context.as_ref())
        .and_then(|s| s.run_as_user)
    {
        candidates.push((
            u.to_string(),
            format!("container {sidecar_name} securityContext.runAsUser"),
        ));
    }
    if let Some(u) = spec.security_context.as_ref().and_then(|s| s.run_as_user) {
        candidates.push((u.to_string(), "pod securityContext.runAsUser".into()));
    }
    if let Some(g) = init.and_then(|i| i.get(InitSetting::ProxyUid)) {
        candidates.push((g.value.clone(), g.origin.clone()));
    }
    if let Some(key) = mesh.proxy_uid_annotation
        && let Some(v) = pod.metadata.annotations.as_ref().and_then(|a| a.get(key))
    {
        candidates.push((v.clone(), format!("annotation {key}")));
    }
    for (value, origin) in candidates {
        match value.trim().parse::<u32>() {
            Ok(0) => {
                warnings.push(Warning(format!(
                    "pod {name}: the sidecar runs as uid 0 ({origin}): every process of the pod \
                     running as root is taken for the proxy and not redirected"
                )));
                return 0;
            }
            Ok(uid) => return uid,
            Err(_) => warnings.push(Warning(format!(
                "pod {name}: {origin} {value:?} is not a uid; ignored"
            ))),
        }
    }
    mesh.proxy_uid
}

/// Whether the pod's DNS goes to the sidecar's DNS proxy.
///
/// Istio (the `ISTIO_META_DNS_CAPTURE` proxy metadata, a Go boolean): the first of
/// 1. the sidecar's environment: what starts the agent's DNS proxy on 15053
///    (`pilot/cmd/pilot-agent/options/options.go`), so it decides;
/// 2. the init container's (`ISTIO_META_DNS_CAPTURE`, `REDIRECT_DNS`,
///    `--redirect-dns`): what istio-iptables redirected;
/// 3. `proxyMetadata` in the `proxy.istio.io/config` annotation, for pods the injector
///    did not write (it copies the merged metadata into 1 and 2);
/// 4. off.
///
/// A value that is not a boolean, or an annotation that is not a ProxyConfig, leaves
/// DNS capture off with a warning, as Istio's agent does.
fn dns_capture(
    mesh: &MeshSpec,
    annotations: &BTreeMap<String, String>,
    sidecar: Option<&Container>,
    init: Option<&InitArgs>,
    name: &str,
    warnings: &mut Vec<Warning>,
) -> bool {
    match mesh.dns {
        DnsSwitch::None => false,
        DnsSwitch::Annotation(key) => {
            match annotations.get(key).map(|v| v.trim().to_ascii_lowercase()) {
                None => mesh.dns_default,
                Some(v) if v == "true" || v == "enabled" => true,
                Some(v) if v == "false" || v == "disabled" => false,
                Some(v) => {
                    warnings.push(Warning(format!(
                        "pod {name}: annotation {key}={v:?}: expected true or false; DNS capture left off"
                    )));
                    false
                }
            }
        }
        DnsSwitch::ProxyMetadata {
            variable,
            config_annotation,
        } => {
            let sidecar_name = mesh.marker.sidecar_container();
            let given = if let Some(v) = sidecar.and_then(|c| init_args::env_value(c, variable)) {
                Some((v.to_string(), format!("{sidecar_name} env {variable}")))
            } else if let Some(g) = init.and_then(|i| i.get(InitSetting::RedirectDns)) {
                Some((g.value.clone(), g.origin.clone()))
            } else if let Some(config) = annotations.get(config_annotation) {
                match istio::proxy_metadata(config, variable) {
                    Ok(v) => v.map(|v| {
                        (
                            v,
                            format!("annotation {config_annotation} proxyMetadata.{variable}"),
                        )
                    }),
                    Err(e) => {
                        warnings.push(Warning(format!(
                            "pod {name}: annotation {config_annotation} is not a ProxyConfig in YAML or JSON ({e}); DNS capture left off"
                        )));
                        return false;
                    }
                }
            } else {
                None
            };
            match given {
                None => mesh.dns_default,
                Some((v, origin)) => istio::go_bool(&v).unwrap_or_else(|| {
                    warnings.push(Warning(format!(
                        "pod {name}: {origin}={v:?}: expected true or false; DNS capture left off"
                    )));
                    false
                }),
            }
        }
    }
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
    if role == ExcludeInboundSources {
        let all = ["0.0.0.0/0", "::/0"].join(",");
        let list = match parse_cidrs(value)? {
            Listed::All => parse_cidrs(&all)?,
            list => list,
        };
        if let Listed::Some(list) = list {
            p.cidr_rules
                .extend(list.into_iter().map(|c| (CidrRuleKind::InSourceExclude, c)));
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
mod injected_tests;
#[cfg(test)]
mod tests;
