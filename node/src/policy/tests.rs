//! Unit tests of the pure PodList → policy step.
use serde_json::{Value, json};

use super::*;

fn pod(name: &str, containers: &[&str], annotations: Value) -> Value {
    let cs: Vec<Value> = containers.iter().map(|c| json!({"name": c})).collect();
    let st: Vec<Value> =
        containers.iter().enumerate().map(|(i, c)| json!({"name": c, "ready": true, "restartCount": 0, "image": "", "imageID": "", "containerID": format!("containerd://{name}{i}")})).collect();
    let host = name.bytes().map(u32::from).sum::<u32>() % 250 + 1;
    let (ip4, ip6) = (format!("10.0.0.{host}"), format!("fd00::{host:x}"));
    json!({
        "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}"), "annotations": annotations},
        "spec": {"nodeName": "n1", "containers": cs},
        "status": {"phase": "Running", "qosClass": "Burstable", "podIP": ip4,
                   "podIPs": [{"ip": ip4}, {"ip": ip6}], "containerStatuses": st}
    })
}

fn istio(name: &str, extra: Value) -> Value {
    let mut a = json!({"sidecar.istio.io/status": "{}"});
    if let (Some(a), Some(e)) = (a.as_object_mut(), extra.as_object()) {
        a.extend(e.clone());
    }
    pod(name, &["app", "istio-proxy"], a)
}

fn parse(pods: Vec<Value>) -> Vec<Pod> {
    pods.into_iter()
        .map(|p| serde_json::from_value(p).unwrap())
        .collect()
}

fn one(p: Value) -> (Option<PodPolicy>, Vec<Warning>) {
    let d = desired_state(&parse(vec![p]), Some("n1"), MeshSelection::Auto);
    (d.pods.into_iter().next(), d.warnings)
}

fn range(first: u16, last: u16) -> PortRange {
    PortRange { first, last }
}

#[test]
fn istio_pod_gets_istio_ports_uid_ips_and_containers() {
    let mut web = istio("web", json!({}));
    web["status"]["podIPs"] = json!([{"ip": "10.0.0.5"}, {"ip": "fd00::5"}]);
    let (p, w) = one(web);
    let p = p.expect("meshed");
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(p.mesh, Mesh::Istio);
    assert_eq!(
        (p.outbound_port, p.inbound_port, p.proxy_uid),
        (15001, 15006, 1337)
    );
    assert_eq!(p.ip4, Some("10.0.0.5".parse().unwrap()));
    assert_eq!(p.ip6, Some("fd00::5".parse().unwrap()));
    assert_eq!(
        p.container_ids.iter().cloned().collect::<Vec<_>>(),
        vec!["web0", "web1"]
    );
    assert!(p.out_all_addrs && p.in_all_ports && !p.out_via_loopback);
    assert_eq!(p.dns_port, None);
    // Istio's own ports are never redirected inbound.
    for port in [15000, 15001, 15006, 15008, 15020, 15021, 15090] {
        assert!(
            p.port_rules
                .contains(&(PortRuleKind::InExclude, range(port, port))),
            "{port}"
        );
    }
}

#[test]
fn each_mesh_is_recognised_by_its_marker() {
    let linkerd = pod("l", &["app", "linkerd-proxy"], json!({}));
    let kuma = pod("k", &["app", "kuma-sidecar"], json!({}));
    let mut osm = pod("o", &["app", "envoy"], json!({}));
    osm["metadata"]["labels"] = json!({"osm-proxy-uuid": "x"});
    let d = desired_state(&parse(vec![linkerd, kuma, osm]), None, MeshSelection::Auto);
    let got: Vec<(Mesh, u16, u16, u32, bool)> = d
        .pods
        .iter()
        .map(|p| {
            (
                p.mesh,
                p.outbound_port,
                p.inbound_port,
                p.proxy_uid,
                p.out_via_loopback,
            )
        })
        .collect();
    assert_eq!(
        got,
        // By name, whatever the PodList's order.
        vec![
            (Mesh::Kuma, 15001, 15006, 5678, false),
            (Mesh::Linkerd, 4140, 4143, 2102, true),
            (Mesh::Osm, 15001, 15003, 1500, false)
        ]
    );
}

#[test]
fn not_meshed_pods() {
    // Sidecar alone, no app container.
    assert!(
        one(pod(
            "s",
            &["istio-proxy"],
            json!({"sidecar.istio.io/status": "{}"})
        ))
        .0
        .is_none()
    );
    // Istio container without the injection status annotation.
    assert!(
        one(pod("n", &["app", "istio-proxy"], json!({})))
            .0
            .is_none()
    );
    // Opted out.
    assert!(
        one(istio("o", json!({"sidecar.istio.io/inject": "false"})))
            .0
            .is_none()
    );
    // No sidecar.
    assert!(one(pod("p", &["app"], json!({}))).0.is_none());
    // OSM's envoy without the label.
    assert!(one(pod("e", &["app", "envoy"], json!({}))).0.is_none());
}

#[test]
fn host_network_terminating_pending_and_other_nodes_are_skipped() {
    let mut host = istio("h", json!({}));
    host["spec"]["hostNetwork"] = json!(true);
    let mut term = istio("t", json!({}));
    term["metadata"]["deletionTimestamp"] = json!("2026-11-25T10:00:00Z");
    let mut pending = istio("p", json!({}));
    pending["status"]["phase"] = json!("Pending");
    let mut elsewhere = istio("x", json!({}));
    elsewhere["spec"]["nodeName"] = json!("n2");
    let d = desired_state(
        &parse(vec![host, term, pending, elsewhere, istio("ok", json!({}))]),
        Some("n1"),
        MeshSelection::Auto,
    );
    assert_eq!(
        d.pods.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
        vec!["ns/ok"]
    );
    assert_eq!(d.pods_seen, 4, "the pod bound to n2 is not counted");
}

#[test]
fn native_sidecar_init_container_counts() {
    let mut p = pod("n", &["app"], json!({"sidecar.istio.io/status": "{}"}));
    p["spec"]["initContainers"] = json!([{"name": "istio-proxy", "restartPolicy": "Always"}]);
    assert_eq!(one(p).0.unwrap().mesh, Mesh::Istio);
}

#[test]
fn mesh_selection_only_programs_that_mesh() {
    let pods = parse(vec![
        istio("i", json!({})),
        pod("l", &["app", "linkerd-proxy"], json!({})),
    ]);
    let d = desired_state(&pods, None, MeshSelection::Only(Mesh::Linkerd));
    assert_eq!(d.pods.len(), 1);
    assert_eq!(d.pods[0].mesh, Mesh::Linkerd);
}

#[test]
fn istio_annotations_lists_ranges_star_and_v6() {
    let (p, w) = one(istio(
        "a",
        json!({
            "traffic.sidecar.istio.io/excludeOutboundPorts": "9000-9010, 22",
            "traffic.sidecar.istio.io/includeOutboundPorts": "8443",
            "traffic.sidecar.istio.io/excludeInboundPorts": "*",
            "traffic.sidecar.istio.io/excludeOutboundIPRanges": "169.254.169.254/32, fd00:1::/64",
            "traffic.sidecar.istio.io/includeOutboundIPRanges": "10.0.0.0/8,fd00::/16",
            "traffic.sidecar.istio.io/includeInboundPorts": "8080,9090"
        }),
    ));
    assert!(w.is_empty(), "{w:?}");
    let p = p.unwrap();
    assert!(
        p.port_rules
            .contains(&(PortRuleKind::OutExclude, range(9000, 9010)))
    );
    assert!(
        p.port_rules
            .contains(&(PortRuleKind::OutExclude, range(22, 22)))
    );
    assert!(
        p.port_rules
            .contains(&(PortRuleKind::OutInclude, range(8443, 8443)))
    );
    assert!(
        p.port_rules
            .contains(&(PortRuleKind::InExclude, range(1, 65535))),
        "* = every port"
    );
    assert!(
        p.port_rules
            .contains(&(PortRuleKind::InInclude, range(8080, 8080)))
    );
    assert!(!p.in_all_ports, "an include list replaces the default *");
    assert!(!p.out_all_addrs);
    let cidrs: Vec<String> = p
        .cidr_rules
        .iter()
        .map(|(k, c)| format!("{k:?} {}/{}", c.addr, c.len))
        .collect();
    assert_eq!(
        cidrs,
        vec![
            "OutExclude 169.254.169.254/32",
            "OutExclude fd00:1::/64",
            "OutInclude 10.0.0.0/8",
            "OutInclude fd00::/16"
        ]
    );
}

#[test]
fn include_star_keeps_all_and_empty_include_means_none() {
    let p = one(istio(
        "a",
        json!({"traffic.sidecar.istio.io/includeOutboundIPRanges": "*"}),
    ))
    .0
    .unwrap();
    assert!(p.out_all_addrs);
    let p = one(istio(
        "b",
        json!({"traffic.sidecar.istio.io/includeOutboundIPRanges": ""}),
    ))
    .0
    .unwrap();
    assert!(
        !p.out_all_addrs && p.cidr_rules.is_empty(),
        "empty include list: nothing is redirected outbound"
    );
}

#[test]
fn invalid_annotation_is_reported_by_name_and_the_rest_applies() {
    let (p, w) = one(istio(
        "bad",
        json!({
            "traffic.sidecar.istio.io/excludeOutboundPorts": "80,x",
            "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.0.0.0/40",
            "traffic.sidecar.istio.io/excludeInboundPorts": "8081",
            "proxy.istio.io/config": "proxyMetadata: [unclosed"
        }),
    ));
    let p = p.expect("the pod is still meshed");
    assert!(
        p.port_rules
            .contains(&(PortRuleKind::InExclude, range(8081, 8081)))
    );
    assert!(
        !p.port_rules
            .iter()
            .any(|(k, _)| *k == PortRuleKind::OutExclude),
        "the whole bad annotation is ignored"
    );
    assert!(p.cidr_rules.is_empty());
    assert_eq!(p.dns_port, None);
    let w: Vec<String> = w.into_iter().map(|w| w.0).collect();
    assert_eq!(w.len(), 3, "{w:?}");
    assert!(
        w[0].contains("pod ns/bad")
            && w[0].contains("excludeOutboundPorts")
            && w[0].contains("\"x\" is not a port"),
        "{w:?}"
    );
    assert!(w.iter().any(|m| m.contains("0-32")), "{w:?}");
    assert!(
        w.iter().any(|m| m.starts_with(
            "pod ns/bad: annotation proxy.istio.io/config is not a ProxyConfig in YAML or JSON"
        ) && m.ends_with("DNS capture left off")),
        "{w:?}"
    );
}

/// Istio's switch is `ISTIO_META_DNS_CAPTURE` in the proxy metadata: the sidecar's
/// environment first, then the init container's, then the `proxy.istio.io/config`
/// annotation. There is no `proxy.istio.io/dns-capture` annotation.
#[test]
fn dns_capture_follows_istio_proxy_metadata() {
    let config = |yaml: &str| json!({"proxy.istio.io/config": yaml});
    let on = "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n";
    let p = one(istio("d", config(on))).0.unwrap();
    assert_eq!(p.dns_port, Some(15053));
    let json_on = r#"{"proxyMetadata": {"ISTIO_META_DNS_CAPTURE": "True"}}"#;
    assert_eq!(
        one(istio("j", config(json_on))).0.unwrap().dns_port,
        Some(15053)
    );
    let off = "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"false\"\n";
    assert_eq!(one(istio("f", config(off))).0.unwrap().dns_port, None);
    let (p, w) = one(istio("n", config("concurrency: 2")));
    assert_eq!((p.unwrap().dns_port, w.len()), (None, 0));
    // The invented annotation does nothing.
    let (p, w) = one(istio("x", json!({"proxy.istio.io/dns-capture": "true"})));
    assert_eq!((p.unwrap().dns_port, w.len()), (None, 0));

    // The sidecar's environment decides over the annotation: it is what starts the
    // agent's DNS proxy.
    let mut env = istio("e", config(on));
    env["spec"]["containers"][1]["env"] =
        json!([{"name": "ISTIO_META_DNS_CAPTURE", "value": "false"}]);
    assert_eq!(one(env).0.unwrap().dns_port, None);
    let mut env = istio("e2", json!({}));
    env["spec"]["containers"][1]["env"] = json!([{"name": "ISTIO_META_DNS_CAPTURE", "value": "1"}]);
    assert_eq!(one(env).0.unwrap().dns_port, Some(15053));
    // Then istio-init's.
    let mut init = istio("i", json!({}));
    init["spec"]["initContainers"] = json!([{"name": "istio-init",
        "args": ["istio-iptables", "-i", "*", "-b", "*"],
        "env": [{"name": "ISTIO_META_DNS_CAPTURE", "value": "true"}]}]);
    assert_eq!(one(init).0.unwrap().dns_port, Some(15053));
    // Not a boolean: off, with a warning naming where it was read.
    let mut bad = istio("b", json!({}));
    bad["spec"]["containers"][1]["env"] =
        json!([{"name": "ISTIO_META_DNS_CAPTURE", "value": "yes"}]);
    let (p, w) = one(bad);
    assert_eq!(p.unwrap().dns_port, None);
    assert_eq!(
        w[0].0,
        "pod ns/b: istio-proxy env ISTIO_META_DNS_CAPTURE=\"yes\": expected true or false; DNS capture left off"
    );

    let l = one(pod("l", &["app", "linkerd-proxy"], config(on)))
        .0
        .unwrap();
    assert_eq!(l.dns_port, None, "Linkerd has no DNS proxy");
    let k = one(pod(
        "k",
        &["app", "kuma-sidecar"],
        json!({"kuma.io/builtin-dns": "enabled"}),
    ))
    .0
    .unwrap();
    assert_eq!(k.dns_port, Some(15053), "Kuma's annotation is real");
}

#[test]
fn linkerd_kuma_osm_annotations() {
    let l = one(pod(
        "l",
        &["app", "linkerd-proxy"],
        json!({
            "config.linkerd.io/skip-outbound-ports": "4567-4569,25",
            "config.linkerd.io/skip-inbound-ports": "9999",
            "config.linkerd.io/skip-subnets": "10.96.0.0/12"
        }),
    ))
    .0
    .unwrap();
    assert!(
        l.port_rules
            .contains(&(PortRuleKind::OutExclude, range(4567, 4569)))
    );
    assert!(
        l.port_rules
            .contains(&(PortRuleKind::InExclude, range(9999, 9999)))
    );
    // skip-subnets is about inbound sources (proxy-init's PREROUTING `-s`), not
    // outbound destinations.
    assert_eq!(
        l.cidr_rules
            .iter()
            .map(|(k, c)| format!("{} {}/{}", k.label(), c.addr, c.len))
            .collect::<Vec<_>>(),
        vec!["in-source-exclude 10.96.0.0/12"]
    );
    let k = one(pod(
        "k",
        &["app", "kuma-sidecar"],
        json!({"traffic.kuma.io/exclude-outbound-ports": "5432"}),
    ))
    .0
    .unwrap();
    assert!(
        k.port_rules
            .contains(&(PortRuleKind::OutExclude, range(5432, 5432)))
    );
    let mut o = pod(
        "o",
        &["app", "envoy"],
        json!({"openservicemesh.io/outbound-ip-range-inclusion-list": "10.0.0.0/16"}),
    );
    o["metadata"]["labels"] = json!({"osm-proxy-uuid": "x"});
    let o = one(o).0.unwrap();
    assert!(!o.out_all_addrs && o.cidr_rules.len() == 1);
}

#[test]
fn bad_ips_missing_fields_and_duplicates() {
    let mut bad_ip = istio("ip", json!({}));
    bad_ip["status"]["podIP"] = json!("10.0.0.300");
    bad_ip["status"]["podIPs"] = json!([{"ip": "10.0.0.300"}]);
    let (p, w) = one(bad_ip);
    assert!(p.is_none(), "no usable IP: not programmed");
    assert!(
        w[0].0.contains("\"10.0.0.300\" is not an IP address"),
        "{w:?}"
    );
    let mut no_uid = istio("nouid", json!({}));
    no_uid["metadata"].as_object_mut().unwrap().remove("uid");
    let (p, w) = one(no_uid);
    assert!(p.is_none() && w[0].0.contains("no metadata.uid"));
    let mut no_status = istio("nostatus", json!({}));
    no_status.as_object_mut().unwrap().remove("status");
    assert!(one(no_status).0.is_none());
    let (mut first, mut second) = (istio("one", json!({})), istio("two", json!({})));
    first["status"]["podIPs"] = json!([{"ip": "10.9.9.9"}]);
    second["status"]["podIPs"] = json!([{"ip": "10.9.9.9"}]);
    let third = istio("three", json!({}));
    let pods = vec![first, second, third];
    let d = desired_state(&parse(pods.clone()), None, MeshSelection::Auto);
    let names: Vec<&str> = d.pods.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["ns/three"], "no pod of a shared IP is programmed");
    assert_eq!(d.warnings.len(), 2, "{:?}", d.warnings);
    assert!(
        d.warnings[0]
            .0
            .contains("pod ns/one: IP 10.9.9.9 is also listed for meshed pod(s) ns/two"),
        "{:?}",
        d.warnings
    );
    // Whatever the PodList's order, the same pods in the same order, the same warnings.
    let reversed: Vec<_> = pods.into_iter().rev().collect();
    let r = desired_state(&parse(reversed), None, MeshSelection::Auto);
    assert_eq!(r.pods, d.pods);
    assert_eq!(r.warnings, d.warnings);
}

#[test]
fn malformed_container_ids_are_skipped() {
    let mut p = istio("c", json!({}));
    p["status"]["containerStatuses"][0]["containerID"] = json!("containerd://../../etc");
    let (p, w) = one(p);
    assert_eq!(p.unwrap().container_ids.len(), 1);
    assert!(w[0].0.contains("malformed"));
}
