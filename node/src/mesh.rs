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

/// Which annotation (or init container flag) fills which rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
    /// Source address ranges whose inbound connections go straight to the app
    /// (Linkerd's `skip-subnets`).
    ExcludeInboundSources,
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
    /// Where the pod says whether its DNS is captured.
    pub dns: DnsSwitch,
    /// Whether DNS capture is on when the pod says nothing.
    pub dns_default: bool,
    /// Annotation whose value `"false"` opts a pod out of the mesh.
    pub opt_out: Option<&'static str>,
    /// Annotation that must be present for the pod to count as injected.
    pub required_annotation: Option<&'static str>,
    /// Annotations the users of this mesh write, and the rule each fills. When the
    /// mesh's init container is in the pod, its arguments apply instead (the injector
    /// rendered these annotations, and the mesh-wide defaults, into them).
    pub annotations: &'static [(&'static str, AnnotationRole)],
    /// The init container that sets up the mesh's own rules, and how to read its
    /// command line.
    pub init: Option<InitContainer>,
    /// Annotation naming the proxy's uid, if the mesh has one.
    pub proxy_uid_annotation: Option<&'static str>,
    /// Where the pod's interception mode is written, if the mesh has modes.
    pub interception_mode: Option<InterceptionModeSources>,
}

/// Where a mesh's per-pod DNS capture switch lives.
#[derive(Clone, Copy, Debug)]
pub enum DnsSwitch {
    /// Nowhere: the pod's DNS is not captured.
    None,
    /// An annotation: `true`/`enabled` or `false`/`disabled`.
    Annotation(&'static str),
    /// Istio's proxy metadata: a variable that is a Go boolean (`strconv.ParseBool`),
    /// set in the sidecar's and the init container's environment by the injector (which
    /// merges the mesh-wide `defaultConfig.proxyMetadata` with the pod's ProxyConfig
    /// annotation), or in the `proxyMetadata` map of that annotation's YAML or JSON.
    ProxyMetadata {
        /// The variable (`ISTIO_META_DNS_CAPTURE`).
        variable: &'static str,
        /// The per-pod ProxyConfig annotation (`proxy.istio.io/config`).
        config_annotation: &'static str,
    },
}

impl DnsSwitch {
    /// The annotation that switches DNS capture, if any.
    pub fn annotation(self) -> Option<&'static str> {
        match self {
            DnsSwitch::None => None,
            DnsSwitch::Annotation(a) => Some(a),
            DnsSwitch::ProxyMetadata {
                config_annotation, ..
            } => Some(config_annotation),
        }
    }
}

/// Where Istio writes how a pod's traffic is intercepted (`REDIRECT`, `TPROXY`, `NONE`).
#[derive(Clone, Copy, Debug)]
pub struct InterceptionModeSources {
    /// The sidecar's environment variable the injector always sets (from the
    /// annotation or the mesh-wide `defaultConfig.interceptionMode`).
    pub sidecar_env: &'static str,
    /// The per-pod annotation.
    pub annotation: &'static str,
}

/// A mesh's init container, which runs the mesh's iptables setup with the pod's
/// traffic settings on its command line.
#[derive(Debug)]
pub struct InitContainer {
    /// Its names (the first one found in the pod's init containers is read).
    pub names: &'static [&'static str],
    /// The flags it takes.
    pub flags: &'static [InitFlag],
    /// What a setting is when neither a flag nor the environment gives it, where the
    /// tool's default differs from the agent's.
    pub unset: &'static [(InitSetting, &'static str)],
}

/// What an init container flag sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InitSetting {
    /// A traffic rule, read as the annotation with this role is.
    Rule(AnnotationRole),
    /// The sidecar's outbound port.
    OutboundPort,
    /// The sidecar's inbound port.
    InboundPort,
    /// The uid whose connections are never redirected.
    ProxyUid,
    /// How inbound traffic is intercepted (Istio: `REDIRECT` or `TPROXY`).
    InterceptionMode,
    /// Whether DNS is redirected to the sidecar (a Go boolean).
    RedirectDns,
}

/// One flag of an init container's command line (spf13/pflag syntax: `--long value`,
/// `--long=value`, `-s value`, `-svalue`, `-s=value`; a switch takes no value).
#[derive(Debug)]
pub struct InitFlag {
    /// Long name, without `--`.
    pub long: &'static str,
    /// One-letter name, without `-`.
    pub short: Option<char>,
    /// Whether it takes a value (a switch is `true` when given bare).
    pub takes_value: bool,
    /// Whether giving it again adds to the list (pflag slices) instead of replacing it.
    pub appends: bool,
    /// Environment variables of the container that set it too, later ones winning; the
    /// command line wins over all of them.
    pub env: &'static [&'static str],
    /// What it sets; `None`: read (so its value is not taken for a flag) and unused.
    pub setting: Option<InitSetting>,
}

mod init_flags;
pub use init_flags::{ISTIO_IPTABLES, LINKERD_PROXY_INIT};

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
        dns: DnsSwitch::ProxyMetadata {
            variable: "ISTIO_META_DNS_CAPTURE",
            config_annotation: "proxy.istio.io/config",
        },
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
        // istio-validation replaces istio-init with the Istio CNI plugin: same args,
        // plus --run-validation --skip-rule-apply.
        init: Some(InitContainer {
            names: &["istio-init", "istio-validation"],
            flags: &ISTIO_IPTABLES,
            // istio-iptables captures nothing without -i or -b ("An empty list will
            // disable"); the injection template always passes both.
            unset: &[
                (InitSetting::Rule(IncludeOutboundRanges), ""),
                (InitSetting::Rule(IncludeInboundPorts), ""),
            ],
        }),
        proxy_uid_annotation: None,
        interception_mode: Some(InterceptionModeSources {
            sidecar_env: "ISTIO_META_INTERCEPTION_MODE",
            annotation: "sidecar.istio.io/interceptionMode",
        }),
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
        dns: DnsSwitch::None,
        dns_default: false,
        opt_out: Some("linkerd.io/inject"),
        required_annotation: None,
        annotations: &[
            (
                "config.linkerd.io/skip-outbound-ports",
                ExcludeOutboundPorts,
            ),
            ("config.linkerd.io/skip-inbound-ports", ExcludeInboundPorts),
            // proxy-init's --subnets-to-ignore: inbound connections from these
            // sources skip the proxy (a `-s <subnet> -j RETURN` in its PREROUTING chain).
            ("config.linkerd.io/skip-subnets", ExcludeInboundSources),
        ],
        init: Some(InitContainer {
            names: &["linkerd-init"],
            flags: &LINKERD_PROXY_INIT,
            unset: &[],
        }),
        proxy_uid_annotation: Some("config.linkerd.io/proxy-uid"),
        interception_mode: None,
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
        dns: DnsSwitch::Annotation("kuma.io/builtin-dns"),
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
        init: None,
        // Set by Kuma's injector; its CNI plugin exempts this uid
        // (kumahq/kuma app/cni/pkg/cni/annotations.go, `noRedirectUID`).
        proxy_uid_annotation: Some("kuma.io/sidecar-uid"),
        interception_mode: None,
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
        dns: DnsSwitch::None,
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
        init: None,
        proxy_uid_annotation: None,
        interception_mode: None,
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
