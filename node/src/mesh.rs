//! The meshes Merbridge Edge knows, as data: how a pod of each is recognised, its
//! sidecar's ports and uid, and the annotations its users already write.

/// A service mesh whose sidecars we redirect to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mesh {
    /// Istio (Envoy sidecar `istio-proxy`).
    Istio,
    /// Linkerd (`linkerd-proxy`).
    Linkerd,
    /// Kuma (`kuma-sidecar`).
    Kuma,
    /// Open Service Mesh (Envoy, label `osm-proxy-uuid`).
    Osm,
}

/// How a pod of a mesh is recognised.
#[derive(Clone, Copy, Debug)]
pub enum Marker {
    /// A container (or native sidecar init container) with this name.
    Container(&'static str),
    /// A label with this key, plus a container with this name.
    LabelAndContainer(&'static str, &'static str),
}

impl Marker {
    /// The sidecar container's name.
    pub fn sidecar_container(self) -> &'static str {
        match self {
            Marker::Container(c) | Marker::LabelAndContainer(_, c) => c,
        }
    }
}

/// Which annotation fills which rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnnotationRole {
    /// Outbound ports never redirected.
    ExcludeOutboundPorts,
    /// Outbound ports redirected whatever the address.
    IncludeOutboundPorts,
    /// Inbound ports that go straight to the app.
    ExcludeInboundPorts,
    /// Inbound ports redirected (`*` = all, the default).
    IncludeInboundPorts,
    /// Outbound address ranges never redirected.
    ExcludeOutboundRanges,
    /// Outbound address ranges redirected (`*` = all, the default).
    IncludeOutboundRanges,
}

/// Where the sidecar's outbound listener accepts connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutboundListener {
    /// On every address (0.0.0.0 / ::): the app is sent to its own pod IP.
    AnyAddress,
    /// On 127.0.0.1 only: the app is sent to loopback from a per-pod source address.
    Loopback,
}

/// Everything the agent needs to know about one mesh.
#[derive(Debug)]
pub struct MeshSpec {
    /// The mesh.
    pub mesh: Mesh,
    /// Name used in flags and logs.
    pub name: &'static str,
    /// How its pods are recognised.
    pub marker: Marker,
    /// Sidecar outbound listener port.
    pub outbound_port: u16,
    /// Sidecar inbound listener port.
    pub inbound_port: u16,
    /// Where the outbound listener is bound.
    pub outbound_listener: OutboundListener,
    /// uid the proxy runs as.
    pub proxy_uid: u32,
    /// The sidecar's DNS proxy port, if the mesh captures DNS.
    pub dns_port: Option<u16>,
    /// The mesh's own ports, never redirected inbound.
    pub own_ports: &'static [u16],
    /// Annotation (`true`/`false`) that turns DNS capture on or off per pod, if any.
    pub dns_annotation: Option<&'static str>,
    /// Whether DNS capture is on when the pod says nothing.
    pub dns_default: bool,
    /// Annotation whose value `"false"` opts a pod out of the mesh.
    pub opt_out: Option<&'static str>,
    /// Annotation that must be present for the pod to count as injected.
    pub required_annotation: Option<&'static str>,
    /// Annotations the users of this mesh write, and the rule each fills.
    pub annotations: &'static [(&'static str, AnnotationRole)],
}

use AnnotationRole::*;

/// The mesh table. Order matters only for pods carrying two meshes' sidecars.
pub static MESHES: [MeshSpec; 4] = [
    MeshSpec {
        mesh: Mesh::Istio,
        name: "istio",
        marker: Marker::Container("istio-proxy"),
        outbound_port: 15001,
        inbound_port: 15006,
        outbound_listener: OutboundListener::AnyAddress,
        proxy_uid: 1337,
        dns_port: Some(15053),
        own_ports: &[15000, 15001, 15006, 15008, 15020, 15021, 15090],
        dns_annotation: Some("proxy.istio.io/dns-capture"),
        dns_default: false,
        opt_out: Some("sidecar.istio.io/inject"),
        required_annotation: Some("sidecar.istio.io/status"),
        annotations: &[
            (
                "traffic.sidecar.istio.io/excludeOutboundPorts",
                ExcludeOutboundPorts,
            ),
            (
                "traffic.sidecar.istio.io/includeOutboundPorts",
                IncludeOutboundPorts,
            ),
            (
                "traffic.sidecar.istio.io/excludeInboundPorts",
                ExcludeInboundPorts,
            ),
            (
                "traffic.sidecar.istio.io/includeInboundPorts",
                IncludeInboundPorts,
            ),
            (
                "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                ExcludeOutboundRanges,
            ),
            (
                "traffic.sidecar.istio.io/includeOutboundIPRanges",
                IncludeOutboundRanges,
            ),
        ],
    },
    MeshSpec {
        mesh: Mesh::Linkerd,
        name: "linkerd",
        marker: Marker::Container("linkerd-proxy"),
        outbound_port: 4140,
        inbound_port: 4143,
        outbound_listener: OutboundListener::Loopback,
        proxy_uid: 2102,
        dns_port: None,
        own_ports: &[4140, 4143, 4190, 4191],
        dns_annotation: None,
        dns_default: false,
        opt_out: Some("linkerd.io/inject"),
        required_annotation: None,
        annotations: &[
            (
                "config.linkerd.io/skip-outbound-ports",
                ExcludeOutboundPorts,
            ),
            ("config.linkerd.io/skip-inbound-ports", ExcludeInboundPorts),
            ("config.linkerd.io/skip-subnets", ExcludeOutboundRanges),
        ],
    },
    MeshSpec {
        mesh: Mesh::Kuma,
        name: "kuma",
        marker: Marker::Container("kuma-sidecar"),
        outbound_port: 15001,
        inbound_port: 15006,
        outbound_listener: OutboundListener::AnyAddress,
        proxy_uid: 5678,
        dns_port: Some(15053),
        own_ports: &[15001, 15006, 9901],
        dns_annotation: Some("kuma.io/builtin-dns"),
        dns_default: false,
        opt_out: Some("kuma.io/sidecar-injection"),
        required_annotation: None,
        annotations: &[
            (
                "traffic.kuma.io/exclude-outbound-ports",
                ExcludeOutboundPorts,
            ),
            ("traffic.kuma.io/exclude-inbound-ports", ExcludeInboundPorts),
        ],
    },
    MeshSpec {
        mesh: Mesh::Osm,
        name: "osm",
        marker: Marker::LabelAndContainer("osm-proxy-uuid", "envoy"),
        outbound_port: 15001,
        inbound_port: 15003,
        outbound_listener: OutboundListener::AnyAddress,
        proxy_uid: 1500,
        dns_port: None,
        own_ports: &[15000, 15001, 15003, 15010, 15901, 15902, 15903, 15904],
        dns_annotation: None,
        dns_default: false,
        opt_out: Some("openservicemesh.io/sidecar-injection"),
        required_annotation: None,
        annotations: &[
            (
                "openservicemesh.io/outbound-port-exclusion-list",
                ExcludeOutboundPorts,
            ),
            (
                "openservicemesh.io/inbound-port-exclusion-list",
                ExcludeInboundPorts,
            ),
            (
                "openservicemesh.io/outbound-ip-range-exclusion-list",
                ExcludeOutboundRanges,
            ),
            (
                "openservicemesh.io/outbound-ip-range-inclusion-list",
                IncludeOutboundRanges,
            ),
        ],
    },
];

impl Mesh {
    /// The table entry of this mesh.
    pub fn spec(self) -> &'static MeshSpec {
        MESHES
            .iter()
            .find(|s| s.mesh == self)
            .expect("every mesh has a table entry")
    }

    /// The mesh called `name` (as in `--mesh`).
    pub fn from_name(name: &str) -> Option<Mesh> {
        MESHES.iter().find(|s| s.name == name).map(|s| s.mesh)
    }

    /// The name of the mesh.
    pub fn name(self) -> &'static str {
        self.spec().name
    }
}
