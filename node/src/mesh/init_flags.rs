//! The command lines of the meshes' init containers, as data: every flag the tool
//! takes (so a value is never mistaken for a flag), what the ones we need set, and
//! the environment variables that set them too.

use super::{AnnotationRole::*, InitFlag, InitSetting, InitSetting::*};

const fn flag(
    long: &'static str,
    short: Option<char>,
    env: &'static [&'static str],
    setting: Option<InitSetting>,
) -> InitFlag {
    InitFlag {
        long,
        short,
        takes_value: true,
        appends: false,
        env,
        setting,
    }
}

const fn list(long: &'static str, short: Option<char>, setting: Option<InitSetting>) -> InitFlag {
    InitFlag {
        appends: true,
        ..flag(long, short, &[], setting)
    }
}

const fn switch(
    long: &'static str,
    short: Option<char>,
    env: &'static [&'static str],
    setting: Option<InitSetting>,
) -> InitFlag {
    InitFlag {
        takes_value: false,
        ..flag(long, short, env, setting)
    }
}

/// `istio-iptables` (istio/istio `tools/istio-iptables/pkg/cmd/root.go` and
/// `pkg/constants/constants.go`, 1.30.3), as istio-init and istio-validation run it.
/// Every flag but `-p` is also read from the variable named after its long form
/// (`flag.BindEnv`: `istio-service-cidr` → `ISTIO_SERVICE_CIDR`); `redirect-dns` also
/// from `ISTIO_META_DNS_CAPTURE` (`flag.AdditionalEnv`, applied last), which is how the
/// injector turns DNS capture on: it passes the proxy metadata as the container's
/// environment and never `--redirect-dns`. The log flags come from `pkg/log`.
pub static ISTIO_IPTABLES: [InitFlag; 38] = [
    flag("envoy-port", Some('p'), &[], Some(OutboundPort)),
    flag(
        "inbound-capture-port",
        Some('z'),
        &["INBOUND_CAPTURE_PORT"],
        Some(InboundPort),
    ),
    flag(
        "inbound-tunnel-port",
        Some('e'),
        &["INBOUND_TUNNEL_PORT"],
        None,
    ),
    flag("proxy-uid", Some('u'), &["PROXY_UID"], Some(ProxyUid)),
    flag("proxy-gid", Some('g'), &["PROXY_GID"], None),
    flag(
        "istio-inbound-interception-mode",
        Some('m'),
        &["ISTIO_INBOUND_INTERCEPTION_MODE"],
        Some(InterceptionMode),
    ),
    flag(
        "istio-inbound-ports",
        Some('b'),
        &["ISTIO_INBOUND_PORTS"],
        Some(Rule(IncludeInboundPorts)),
    ),
    flag(
        "istio-local-exclude-ports",
        Some('d'),
        &["ISTIO_LOCAL_EXCLUDE_PORTS"],
        Some(Rule(ExcludeInboundPorts)),
    ),
    flag(
        "istio-exclude-interfaces",
        Some('c'),
        &["ISTIO_EXCLUDE_INTERFACES"],
        None,
    ),
    flag(
        "istio-service-cidr",
        Some('i'),
        &["ISTIO_SERVICE_CIDR"],
        Some(Rule(IncludeOutboundRanges)),
    ),
    flag(
        "istio-service-exclude-cidr",
        Some('x'),
        &["ISTIO_SERVICE_EXCLUDE_CIDR"],
        Some(Rule(ExcludeOutboundRanges)),
    ),
    flag(
        "istio-outbound-ports",
        Some('q'),
        &["ISTIO_OUTBOUND_PORTS"],
        Some(Rule(IncludeOutboundPorts)),
    ),
    flag(
        "istio-local-outbound-ports-exclude",
        Some('o'),
        &["ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE"],
        Some(Rule(ExcludeOutboundPorts)),
    ),
    flag(
        "kube-virt-interfaces",
        Some('k'),
        &["KUBE_VIRT_INTERFACES"],
        None,
    ),
    flag(
        "istio-inbound-tproxy-mark",
        Some('t'),
        &["ISTIO_INBOUND_TPROXY_MARK"],
        None,
    ),
    flag(
        "istio-inbound-tproxy-route-table",
        Some('r'),
        &["ISTIO_INBOUND_TPROXY_ROUTE_TABLE"],
        None,
    ),
    switch("dry-run", Some('n'), &["DRY_RUN"], None),
    flag("iptables-probe-port", None, &["IPTABLES_PROBE_PORT"], None),
    flag("probe-timeout", None, &["PROBE_TIMEOUT"], None),
    switch("skip-rule-apply", None, &["SKIP_RULE_APPLY"], None),
    switch("run-validation", None, &["RUN_VALIDATION"], None),
    switch(
        "redirect-dns",
        None,
        &["REDIRECT_DNS", "ISTIO_META_DNS_CAPTURE"],
        Some(RedirectDns),
    ),
    switch(
        "drop-invalid",
        None,
        &["DROP_INVALID", "INVALID_DROP"],
        None,
    ),
    switch(
        "dual-stack",
        None,
        &["DUAL_STACK", "ISTIO_DUAL_STACK"],
        None,
    ),
    switch("capture-all-dns", None, &["CAPTURE_ALL_DNS"], None),
    flag("network-namespace", None, &["NETWORK_NAMESPACE"], None),
    switch("cni-mode", None, &["CNI_MODE"], None),
    switch("reconcile", None, &["RECONCILE"], None),
    switch("cleanup-only", None, &["CLEANUP_ONLY"], None),
    switch("force-apply", None, &["FORCE_APPLY"], None),
    switch("native-nftables", None, &["NATIVE_NFTABLES"], None),
    flag(
        "force-iptables-binary",
        None,
        &["FORCE_IPTABLES_BINARY"],
        None,
    ),
    flag("log_output_level", None, &[], None),
    flag("log_stacktrace_level", None, &[], None),
    flag("log_caller", None, &[], None),
    list("log_target", None, None),
    switch("log_as_json", None, &[], None),
    // Not in root.go, but cobra adds it to every command.
    switch("help", Some('h'), &[], None),
];

/// linkerd2-proxy-init (linkerd/linkerd2-proxy-init `proxy-init/cmd/root.go`,
/// proxy-init/v2.4.9), as linkerd-init runs it. No environment variables; the port and
/// subnet lists are pflag slices (comma-separated, a repeated flag adds to the list).
/// Linkerd's injector (linkerd/linkerd2 `charts/partials/templates/_proxy-init.tpl`,
/// edge-26.8.3) renders the `config.linkerd.io/skip-*` and `proxy-uid` annotations, or
/// the chart's defaults, into these flags.
pub static LINKERD_PROXY_INIT: [InitFlag; 19] = [
    flag("incoming-proxy-port", Some('p'), &[], Some(InboundPort)),
    flag("outgoing-proxy-port", Some('o'), &[], Some(OutboundPort)),
    flag("proxy-uid", Some('u'), &[], Some(ProxyUid)),
    flag("proxy-gid", Some('g'), &[], None),
    // Only these inbound ports go to the proxy (proxy-init's RedirectListedMode).
    list(
        "ports-to-redirect",
        Some('r'),
        Some(Rule(IncludeInboundPorts)),
    ),
    list(
        "inbound-ports-to-ignore",
        None,
        Some(Rule(ExcludeInboundPorts)),
    ),
    list(
        "outbound-ports-to-ignore",
        None,
        Some(Rule(ExcludeOutboundPorts)),
    ),
    // `-s <subnet> -j RETURN` in the inbound (PREROUTING) chain only.
    list("subnets-to-ignore", None, Some(Rule(ExcludeInboundSources))),
    switch("simulate", None, &[], None),
    flag("netns", None, &[], None),
    switch("use-wait-flag", Some('w'), &[], None),
    flag("timeout-close-wait-secs", None, &[], None),
    flag("log-format", None, &[], None),
    flag("log-level", None, &[], None),
    flag("iptables-mode", None, &[], None),
    switch("ipv6", None, &[], None),
    flag("firewall-bin-path", None, &[], None),
    flag("firewall-save-bin-path", None, &[], None),
    // Not in root.go, but cobra adds it to every command.
    switch("help", Some('h'), &[], None),
];
