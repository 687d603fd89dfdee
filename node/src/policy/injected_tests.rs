//! The policy of pods as the meshes' injectors write them:
//! `testbed/fixtures/injected-pods.json`, whose sources `injected-pods.md` names pod by
//! pod. The Istio pods are the pod templates of istio/istio 1.30.3
//! `pkg/kube/inject/testdata/inject/*.injected` (the injector's own golden files,
//! rendered from `manifests/charts/istio-control/istio-discovery/files/
//! injection-template.yaml`); the Linkerd pods come from linkerd/linkerd2 edge-26.8.3
//! `cli/cmd/testdata/inject_emojivoto_deployment*.golden.yml` (rendered from
//! `charts/partials/templates/_proxy-init.tpl` and `_proxy.tpl`). Each pod got a node,
//! a uid and a running status.
use std::collections::BTreeSet;

use k8s_openapi::List;
use serde_json::{Value, json};

use super::*;

const FIXTURE: &str = include_str!("../../../testbed/fixtures/injected-pods.json");

fn fixture() -> Value {
    serde_json::from_str(FIXTURE).expect("the fixture is JSON")
}

/// The fixture's pod whose name starts with `prefix`.
fn item(prefix: &str) -> Value {
    fixture()["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["metadata"]["name"].as_str().unwrap().starts_with(prefix))
        .unwrap_or_else(|| panic!("no pod {prefix}* in the fixture"))
        .clone()
}

fn desired_of(pods: Vec<Value>) -> Desired {
    let pods: Vec<Pod> = pods
        .into_iter()
        .map(|p| serde_json::from_value(p).expect("a valid v1 Pod"))
        .collect();
    desired_state(&pods, Some("edge-1"), MeshSelection::Auto)
}

/// The policy of one pod (which must be programmed) and the warnings about it.
fn policy(pod: Value) -> (PodPolicy, Vec<String>) {
    let d = desired_of(vec![pod]);
    let w = d.warnings.into_iter().map(|w| w.0).collect();
    (d.pods.into_iter().next().expect("programmed"), w)
}

fn ports(p: &PodPolicy, kind: PortRuleKind) -> Vec<(u16, u16)> {
    p.port_rules
        .iter()
        .filter(|(k, _)| *k == kind)
        .map(|(_, r)| (r.first, r.last))
        .collect()
}

fn singles(list: &[u16]) -> Vec<(u16, u16)> {
    let set: BTreeSet<u16> = list.iter().copied().collect();
    set.into_iter().map(|p| (p, p)).collect()
}

fn cidrs(p: &PodPolicy) -> Vec<String> {
    p.cidr_rules
        .iter()
        .map(|(k, c)| format!("{} {}/{}", k.label(), c.addr, c.len))
        .collect()
}

/// Istio's own inbound ports, always left to the sidecar.
const ISTIO_OWN: [u16; 7] = [15000, 15001, 15006, 15008, 15020, 15021, 15090];

/// The runtime id the fixture gives a container (sha256 of `pod/container`).
fn container_id(pod: &Value, container: &str) -> String {
    let st = &pod["status"];
    st["containerStatuses"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(st["initContainerStatuses"].as_array().into_iter().flatten())
        .find(|s| s["name"] == container)
        .and_then(|s| s["containerID"].as_str())
        .and_then(|id| id.strip_prefix("containerd://"))
        .unwrap()
        .to_string()
}

#[test]
fn the_whole_fixture_parses_and_only_tproxy_and_none_are_left_alone() {
    let d = desired_of(fixture()["items"].as_array().unwrap().clone());
    assert_eq!(d.pods_seen, 10);
    let names: Vec<&str> = d.pods.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        // By name, whatever the PodList's order.
        [
            "default/hello-cni-1d2e3f4a5-p3q4r",
            "default/hello-default-7c9d8b6f4-a1b2c",
            "default/hello-dns-8a9b0c1d2-g7h8i",
            "default/traffic-annotations-6e7f8a9b0-e5f6g",
            "default/traffic-params-5d6f7a8b9-c3d4e",
            "emojivoto/web-2e3f4a5b6-s5t6u",
            "emojivoto/web-subnets-3f4a5b6c7-v7w8x",
            "emojivoto/web-uid-4a5b6c7d8-y9z0a",
        ]
    );
    let warnings: Vec<&str> = d.warnings.iter().map(|w| w.0.as_str()).collect();
    assert_eq!(
        warnings,
        [
            "pod default/hello-tproxy-9b0c1d2e3-j9k0l: TPROXY interception is not supported; \
             the pod keeps the mesh's own rules",
            "pod default/hello-none-0c1d2e3f4-m1n2o: interception mode NONE (istio-proxy env \
             ISTIO_META_INTERCEPTION_MODE): the mesh captures none of its traffic; pod not programmed",
        ]
    );
}

/// istio/istio 1.30.3 `hello.yaml.injected`: chart defaults, native sidecar.
/// istio-init: `-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x "" -b '*' -d
/// 15090,15021,15020`.
#[test]
fn istio_default() {
    let pod = item("hello-default");
    let (p, w) = policy(pod.clone());
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(p.mesh, Mesh::Istio);
    assert_eq!(
        (p.outbound_port, p.inbound_port, p.proxy_uid),
        (15001, 15006, 1337)
    );
    assert!(p.out_all_addrs && p.in_all_ports && !p.out_via_loopback);
    assert_eq!(p.dns_port, None);
    assert!(p.cidr_rules.is_empty(), "-x \"\" excludes nothing");
    assert_eq!(ports(&p, PortRuleKind::InExclude), singles(&ISTIO_OWN));
    assert_eq!(p.port_rules.len(), ISTIO_OWN.len(), "nothing else");
    // The native sidecar's status is among the init containers'.
    assert_eq!(
        p.proxy_container_id.as_deref(),
        Some(container_id(&pod, "istio-proxy").as_str())
    );
    assert_eq!(p.container_ids.len(), 3, "istio-init, istio-proxy, hello");
}

/// istio/istio 1.30.3 `traffic-params.yaml.injected`: mesh-wide
/// `global.proxy.includeIPRanges=127.0.0.1/24,10.96.0.1/24`,
/// `excludeIPRanges=10.96.0.2/24,10.96.0.3/24`, `excludeInboundPorts=4,5,6`,
/// `statusPort=0`. The pod carries no traffic annotation: the values exist only as
/// istio-init's `-i`, `-x` and `-d`.
#[test]
fn istio_mesh_wide_values_arrive_only_in_istio_init_args() {
    let pod = item("traffic-params");
    let annotations = pod["metadata"]["annotations"].as_object().unwrap();
    assert!(!annotations.keys().any(|k| k.starts_with("traffic.")));
    let (p, w) = policy(pod);
    assert!(w.is_empty(), "{w:?}");
    assert!(!p.out_all_addrs, "-i lists ranges");
    assert!(p.in_all_ports, "-b '*'");
    assert_eq!(
        cidrs(&p),
        [
            "out-exclude 10.96.0.0/24",
            "out-include 10.96.0.0/24",
            "out-include 127.0.0.0/24"
        ]
    );
    let mut in_excluded = ISTIO_OWN.to_vec();
    in_excluded.extend([4, 5, 6]);
    assert_eq!(ports(&p, PortRuleKind::InExclude), singles(&in_excluded));
    assert!(ports(&p, PortRuleKind::OutExclude).is_empty());
}

/// istio/istio 1.30.3 `traffic-annotations.yaml.injected`: the pod's
/// `traffic.sidecar.istio.io/*` annotations rendered into `-i -x -b -d -o`, and a
/// `proxy.istio.io/config` with proxy metadata but no DNS capture.
#[test]
fn istio_annotations_as_the_injector_rendered_them() {
    let pod = item("traffic-annotations");
    let (p, w) = policy(pod.clone());
    assert!(w.is_empty(), "{w:?}");
    assert!(!p.in_all_ports && !p.out_all_addrs);
    assert_eq!(ports(&p, PortRuleKind::InInclude), singles(&[1, 2, 3]));
    assert_eq!(ports(&p, PortRuleKind::OutExclude), singles(&[7, 8, 9]));
    let mut in_excluded = ISTIO_OWN.to_vec();
    in_excluded.extend([4, 5, 6]);
    assert_eq!(ports(&p, PortRuleKind::InExclude), singles(&in_excluded));
    assert_eq!(cidrs(&p).len(), 3);
    assert_eq!(
        p.dns_port, None,
        "proxyMetadata without ISTIO_META_DNS_CAPTURE"
    );

    // An annotation edited after injection changes no iptables rule, nor the policy.
    let mut edited = pod;
    edited["metadata"]["annotations"]["traffic.sidecar.istio.io/excludeOutboundPorts"] =
        json!("7,8,9,10");
    let (p, w) = policy(edited.clone());
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(ports(&p, PortRuleKind::OutExclude), singles(&[7, 8, 9]));
    // A broken one is reported, and still changes nothing.
    edited["metadata"]["annotations"]["traffic.sidecar.istio.io/excludeOutboundPorts"] =
        json!("7,x");
    let (p, w) = policy(edited);
    assert_eq!(ports(&p, PortRuleKind::OutExclude), singles(&[7, 8, 9]));
    assert_eq!(
        w,
        [
            "pod default/traffic-annotations-6e7f8a9b0-e5f6g: annotation \
             traffic.sidecar.istio.io/excludeOutboundPorts=\"7,x\": \"x\" is not a port \
             (1-65535); annotation ignored"
        ]
    );
}

/// Without the init container (Istio's CNI plugin without validation, or the
/// agent's init-less mode) the annotations apply, as before.
#[test]
fn istio_without_init_container_reads_the_annotations() {
    let mut pod = item("traffic-annotations");
    let init = pod["spec"]["initContainers"].as_array_mut().unwrap();
    init.retain(|c| c["name"] != "istio-init");
    let (p, w) = policy(pod);
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(ports(&p, PortRuleKind::InInclude), singles(&[1, 2, 3]));
    assert_eq!(ports(&p, PortRuleKind::OutExclude), singles(&[7, 8, 9]));
    // The status port (15020) is in istio-init's -d, not in the annotation; Istio's
    // own ports are excluded anyway.
    let mut in_excluded = ISTIO_OWN.to_vec();
    in_excluded.extend([4, 5, 6]);
    assert_eq!(ports(&p, PortRuleKind::InExclude), singles(&in_excluded));
}

/// `hello.yaml.injected` with `proxy.istio.io/config: {proxyMetadata:
/// {ISTIO_META_DNS_CAPTURE: "true"}}` rendered as the template does: the variable in
/// istio-proxy's and istio-init's environment.
#[test]
fn istio_dns_capture_from_proxy_metadata() {
    let pod = item("hello-dns");
    let (p, w) = policy(pod.clone());
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(p.dns_port, Some(15053));

    let proxy = |pod: &Value| -> usize {
        let init = pod["spec"]["initContainers"].as_array().unwrap();
        init.iter()
            .position(|c| c["name"] == "istio-proxy")
            .unwrap()
    };
    // istio-init's environment alone.
    let mut init_only = pod.clone();
    let i = proxy(&init_only);
    init_only["spec"]["initContainers"][i]["env"]
        .as_array_mut()
        .unwrap()
        .retain(|e| e["name"] != "ISTIO_META_DNS_CAPTURE");
    assert_eq!(policy(init_only.clone()).0.dns_port, Some(15053));
    // The annotation alone.
    let mut annotation_only = init_only;
    annotation_only["spec"]["initContainers"][0]
        .as_object_mut()
        .unwrap()
        .remove("env");
    assert_eq!(policy(annotation_only.clone()).0.dns_port, Some(15053));
    annotation_only["metadata"]["annotations"]["proxy.istio.io/config"] =
        json!("proxyMetadata: {ISTIO_META_DNS_CAPTURE: \"true\"");
    let (p, w) = policy(annotation_only);
    assert_eq!(p.dns_port, None);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].starts_with(
            "pod default/hello-dns-8a9b0c1d2-g7h8i: annotation proxy.istio.io/config is not a \
             ProxyConfig in YAML or JSON ("
        ) && w[0].ends_with("); DNS capture left off"),
        "{w:?}"
    );
    // The sidecar's own variable decides: it starts the agent's DNS proxy.
    let mut off = pod;
    let i = proxy(&off);
    for e in off["spec"]["initContainers"][i]["env"]
        .as_array_mut()
        .unwrap()
    {
        if e["name"] == "ISTIO_META_DNS_CAPTURE" {
            e["value"] = json!("false");
        }
    }
    assert_eq!(policy(off).0.dns_port, None);
}

/// istio/istio 1.30.3 `hello-tproxy.yaml.injected`: mesh-wide TPROXY, so no
/// annotation; istio-init `-m TPROXY -u 1337`, Envoy as uid 0 / gid 1337.
#[test]
fn istio_tproxy_is_left_alone_with_one_clear_line() {
    let pod = item("hello-tproxy");
    assert!(
        pod["metadata"]["annotations"]
            .get("sidecar.istio.io/interceptionMode")
            .is_none()
    );
    let d = desired_of(vec![pod.clone()]);
    assert!(d.pods.is_empty());
    assert_eq!(
        d.warnings,
        [Warning(
            "pod default/hello-tproxy-9b0c1d2e3-j9k0l: TPROXY interception is not supported; \
             the pod keeps the mesh's own rules"
                .into()
        )]
    );
    // What istio-init applied decides over a later annotation.
    let mut annotated = pod;
    annotated["metadata"]["annotations"]["sidecar.istio.io/interceptionMode"] = json!("REDIRECT");
    assert!(desired_of(vec![annotated]).pods.is_empty());
}

/// istio/istio 1.30.3 `init-no-intercept-no-native-sidecar.yaml.injected`:
/// `sidecar.istio.io/interceptionMode: NONE`, no istio-init (the pod's own init
/// container stays).
#[test]
fn istio_interception_none_is_not_programmed() {
    let pod = item("hello-none");
    let d = desired_of(vec![pod.clone()]);
    assert!(d.pods.is_empty());
    assert_eq!(d.pods_seen, 1);
    assert_eq!(d.warnings.len(), 1);
    assert!(d.warnings[0].0.contains("interception mode NONE"));
    // The annotation alone says the same.
    let mut annotation_only = pod.clone();
    let init = annotation_only["spec"]["initContainers"]
        .as_array_mut()
        .unwrap();
    init.iter_mut()
        .filter(|c| c["name"] == "istio-proxy")
        .for_each(|c| {
            c.as_object_mut().unwrap().remove("env");
        });
    let d = desired_of(vec![annotation_only.clone()]);
    assert!(d.pods.is_empty());
    assert!(
        d.warnings[0]
            .0
            .contains("interception mode NONE (annotation sidecar.istio.io/interceptionMode)"),
        "{:?}",
        d.warnings
    );
    // An unknown mode: not programmed (fail open), with its value.
    annotation_only["metadata"]["annotations"]["sidecar.istio.io/interceptionMode"] = json!("EBPF");
    let d = desired_of(vec![annotation_only.clone()]);
    assert!(d.pods.is_empty());
    assert_eq!(
        d.warnings[0].0,
        "pod default/hello-none-0c1d2e3f4-m1n2o: interception mode \"EBPF\" (annotation \
         sidecar.istio.io/interceptionMode) is not REDIRECT, TPROXY or NONE; pod not programmed"
    );
    // REDIRECT, or no word at all: programmed.
    annotation_only["metadata"]["annotations"]["sidecar.istio.io/interceptionMode"] =
        json!("REDIRECT");
    assert_eq!(desired_of(vec![annotation_only.clone()]).pods.len(), 1);
    annotation_only["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .remove("sidecar.istio.io/interceptionMode");
    assert_eq!(desired_of(vec![annotation_only]).pods.len(), 1);
}

/// istio/istio 1.30.3 `hello.yaml.cni.injected`: with the CNI plugin, istio-validation
/// carries the same args (+ `--run-validation --skip-rule-apply`).
#[test]
fn istio_cni_validation_container_args_apply() {
    let (cni, w) = policy(item("hello-cni"));
    assert!(w.is_empty(), "{w:?}");
    let (default, _) = policy(item("hello-default"));
    assert_eq!(
        (
            &cni.port_rules,
            &cni.cidr_rules,
            cni.in_all_ports,
            cni.out_all_addrs,
            cni.proxy_uid
        ),
        (
            &default.port_rules,
            &default.cidr_rules,
            default.in_all_ports,
            default.out_all_addrs,
            default.proxy_uid
        )
    );
    // Its args are read: without -i nothing would be captured outbound.
    let mut no_i = item("hello-cni");
    let args = no_i["spec"]["initContainers"][0]["args"]
        .as_array_mut()
        .unwrap();
    let at = args.iter().position(|a| a == "-i").unwrap();
    args.drain(at..at + 2);
    let (p, _) = policy(no_i);
    assert!(!p.out_all_addrs && p.cidr_rules.is_empty());
}

/// linkerd/linkerd2 edge-26.8.3 `inject_emojivoto_deployment_config_overrides.golden.yml`:
/// `config.linkerd.io/skip-inbound-ports: 7777,8888`, `skip-outbound-ports: "9999"`,
/// `admin-port: "9998"`; linkerd-init `--inbound-ports-to-ignore 4190,9998,7777,8888
/// --outbound-ports-to-ignore 9999`, the proxy a native sidecar as uid 2102.
#[test]
fn linkerd_skip_ports() {
    let pod = item("web-2e3f4a5b6");
    let (p, w) = policy(pod.clone());
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(p.mesh, Mesh::Linkerd);
    assert_eq!(
        (
            p.outbound_port,
            p.inbound_port,
            p.proxy_uid,
            p.out_via_loopback
        ),
        (4140, 4143, 2102, true)
    );
    assert_eq!(
        ports(&p, PortRuleKind::InExclude),
        singles(&[4140, 4143, 4190, 4191, 7777, 8888, 9998])
    );
    assert_eq!(
        ports(&p, PortRuleKind::OutExclude),
        singles(&[9999]),
        "the annotation replaced the chart's 4567,4568"
    );
    assert!(p.cidr_rules.is_empty());
    assert_eq!(
        p.proxy_container_id.as_deref(),
        Some(container_id(&pod, "linkerd-proxy").as_str())
    );
}

/// The chart's defaults (`proxyInit.ignoreInboundPorts`/`ignoreOutboundPorts`
/// `4567,4568`) plus `config.linkerd.io/skip-subnets`, which linkerd-init gets as
/// `--subnets-to-ignore`: inbound connections from those sources skip the proxy.
#[test]
fn linkerd_skip_subnets_are_inbound_sources() {
    let (p, w) = policy(item("web-subnets"));
    assert!(w.is_empty(), "{w:?}");
    let sources: Vec<String> = p
        .cidr_rules
        .iter()
        .map(|(k, c)| format!("{} {}/{}", k.label(), c.addr, c.len))
        .collect();
    assert_eq!(
        sources,
        [
            "in-source-exclude 172.17.0.0/16",
            "in-source-exclude fd00:17::/64"
        ],
        "inbound sources, not outbound destinations"
    );
    assert_eq!(ports(&p, PortRuleKind::OutExclude), singles(&[4567, 4568]));
    assert_eq!(
        ports(&p, PortRuleKind::InExclude),
        singles(&[4140, 4143, 4190, 4191, 4567, 4568])
    );
}

/// `config.linkerd.io/proxy-uid: "2103"`: the injector sets the proxy's runAsUser and
/// linkerd-init's `--proxy-uid`. Each source alone gives the same uid.
#[test]
fn linkerd_custom_proxy_uid_and_its_precedence() {
    let pod = item("web-uid");
    let (p, w) = policy(pod.clone());
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(p.proxy_uid, 2103);

    let without = |pod: &Value, container: &str, field: &str| -> Value {
        let mut pod = pod.clone();
        for c in pod["spec"]["initContainers"].as_array_mut().unwrap() {
            if c["name"] == container {
                c[field].as_object_mut().map(|o| o.remove("runAsUser"));
                if field == "args" {
                    let args = c["args"].as_array_mut().unwrap();
                    let at = args.iter().position(|a| a == "--proxy-uid").unwrap();
                    args.drain(at..at + 2);
                }
            }
        }
        pod
    };
    // linkerd-init's flag when the spec leaves the uid to the image.
    let no_run_as = without(&pod, "linkerd-proxy", "securityContext");
    assert_eq!(policy(no_run_as.clone()).0.proxy_uid, 2103);
    // The annotation when neither is there (Linkerd's CNI mode has no linkerd-init).
    let annotation_only = without(&no_run_as, "linkerd-init", "args");
    assert_eq!(policy(annotation_only.clone()).0.proxy_uid, 2103);
    let mut nothing = annotation_only;
    nothing["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .remove("config.linkerd.io/proxy-uid");
    assert_eq!(policy(nothing.clone()).0.proxy_uid, 2102, "the default");
    // The pod's runAsUser applies to a container that sets none.
    nothing["spec"]["securityContext"] = json!({"runAsUser": 3000});
    assert_eq!(policy(nothing).0.proxy_uid, 3000);
    // The container's runAsUser is what the kernel sees: it wins over everything.
    let mut differs = pod;
    differs["spec"]["securityContext"] = json!({"runAsUser": 3000});
    differs["metadata"]["annotations"]["config.linkerd.io/proxy-uid"] = json!("4000");
    assert_eq!(policy(differs.clone()).0.proxy_uid, 2103);
    // A bad value is reported and skipped.
    for c in differs["spec"]["initContainers"].as_array_mut().unwrap() {
        if c["name"] == "linkerd-proxy" {
            c["securityContext"]["runAsUser"] = json!(-5);
        }
    }
    let (p, w) = policy(differs);
    assert_eq!(p.proxy_uid, 3000);
    assert_eq!(
        w,
        [
            "pod emojivoto/web-uid-4a5b6c7d8-y9z0a: container linkerd-proxy \
             securityContext.runAsUser \"-5\" is not a uid; ignored"
        ]
    );
}

/// Istio with `capNetBindService` runs Envoy as root (gid 1337) in REDIRECT mode while
/// istio-init keeps `-u 1337`: the agent takes uid 0, never 1337, and says what that
/// costs.
#[test]
fn istio_proxy_as_root_is_taken_as_root_with_a_warning() {
    let mut pod = item("hello-default");
    for c in pod["spec"]["initContainers"].as_array_mut().unwrap() {
        if c["name"] == "istio-proxy" {
            c["securityContext"]["runAsUser"] = json!(0);
        }
    }
    let (p, w) = policy(pod);
    assert_eq!(p.proxy_uid, 0);
    assert_eq!(
        w,
        [
            "pod default/hello-default-7c9d8b6f4-a1b2c: the sidecar runs as uid 0 (container \
             istio-proxy securityContext.runAsUser): every process of the pod running as root \
             is taken for the proxy and not redirected"
        ]
    );
}

#[test]
fn custom_ports_from_init_args_are_used_and_never_captured_inbound() {
    let mut pod = item("hello-default");
    let args = pod["spec"]["initContainers"][0]["args"]
        .as_array_mut()
        .unwrap();
    let at = args.iter().position(|a| a == "15001").unwrap();
    args[at] = json!("15101");
    let at = args.iter().position(|a| a == "15006").unwrap();
    args[at] = json!("0");
    let (p, w) = policy(pod);
    assert_eq!((p.outbound_port, p.inbound_port), (15101, 15006));
    assert!(p.port_rules.contains(&(
        PortRuleKind::InExclude,
        PortRange {
            first: 15101,
            last: 15101
        }
    )));
    assert_eq!(
        w,
        [
            "pod default/hello-default-7c9d8b6f4-a1b2c: istio-init -z \"0\" is not a port \
             (1-65535); the mesh's default port is used"
        ]
    );
}

#[test]
fn the_fixture_is_a_kubelet_pod_list() {
    let list: List<Pod> = serde_json::from_str(FIXTURE).unwrap();
    assert_eq!(list.items.len(), 10);
    assert!(
        list.items
            .iter()
            .all(|p| p.spec.as_ref().unwrap().node_name.as_deref() == Some("edge-1"))
    );
}
