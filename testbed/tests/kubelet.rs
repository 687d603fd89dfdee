//! The agent fed by an HTTPS kubelet stand-in, on the real kernel: what the kubelet lists
//! is what lands in the maps, every fault keeps the last good state and is said once,
//! and pods come, go, restart and change mesh.
//!
//! Needs root, cgroup v2, iproute2 and bpftool (`scripts/test` provides them); skipped
//! with a note otherwise, a failure when MBE_REQUIRE_KERNEL_TESTS=1.
use std::{
    collections::BTreeSet, fs, net::IpAddr, os::unix::fs::MetadataExt, path::PathBuf,
    time::Duration,
};

use merbridge_edge_testbed::{
    Node,
    agent::Agent,
    fixture::{Fixture, assert_outbound_ipv4_through_both_sidecars, istio_abc, kernel_test},
    kubelet_standin::{KubeletStandIn, Pki, Reply},
    maps::{pod_cgroups, pod_ips},
    podlist::{KUBELET_FIXTURE, istio_pods, with_items},
};
use serde_json::{Value, json};

const HELPER: &str = env!("CARGO_BIN_EXE_mbe-testbed");
const WAIT: Duration = Duration::from_secs(10);
/// Service-account tokens of the test: distinctive, so a leak into logs or metrics shows.
const TOKEN_1: &str = "mbe-sa-token-7Qx2vLp9fKd3";
const TOKEN_2: &str = "mbe-sa-token-Zk4mW8r3nTb6";

/// A kubelet stand-in with its PKI and a token file.
struct Kubelet {
    dir: PathBuf,
    pki: Pki,
    server: Option<KubeletStandIn>,
    token_file: PathBuf,
}

impl Kubelet {
    fn start(dir: PathBuf, body: Vec<u8>) -> Self {
        let pki = Pki::new(&dir, "mbe-test-ca").unwrap();
        let server = KubeletStandIn::start(&pki, None, TOKEN_1, Reply::Body(body)).unwrap();
        let token_file = dir.join("token");
        fs::write(&token_file, TOKEN_1).unwrap();
        Self {
            dir,
            pki,
            server: Some(server),
            token_file,
        }
    }

    fn server(&self) -> &KubeletStandIn {
        self.server.as_ref().expect("stand-in running")
    }

    /// The agent's source flags.
    fn flags(&self) -> Vec<String> {
        let mut flags = self
            .server()
            .agent_flags(&self.token_file, &self.pki.ca_file);
        flags.extend(["--kubelet-timeout".into(), "1s".into()]);
        flags
    }

    fn serve(&self, list: &Value) {
        self.server()
            .set_reply(Reply::Body(serde_json::to_vec(list).unwrap()));
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.server = None;
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn start_agent(node: &Node, kubelet: &Kubelet, extra: &[&str]) -> Agent {
    start_agent_every(node, kubelet, "300ms", extra)
}

fn start_agent_every(node: &Node, kubelet: &Kubelet, interval: &str, extra: &[&str]) -> Agent {
    let flags = kubelet.flags();
    let root = node.cgroup_root.display().to_string();
    let mut args = vec!["run", "--cgroup-root", &root, "--interval", interval];
    args.extend(flags.iter().map(String::as_str));
    args.extend(["--node-name", "edge-1"]);
    args.extend(extra);
    Agent::start(&args, &node.scratch().join("agent.log")).expect("agent starts")
}

fn fixture_ips() -> BTreeSet<IpAddr> {
    [
        "10.42.0.17",
        "fd00:42::11",
        "10.42.0.23",
        "fd00:42::17",
        "10.42.0.31",
        "10.42.0.40",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect()
}

#[test]
fn the_kubelets_pod_list_is_what_lands_in_the_maps() {
    let Some(_serial) = kernel_test("kubelet_pod_list") else {
        return;
    };
    let node = Node::new(HELPER.as_ref()).unwrap();
    let fixture: Value = serde_json::from_str(KUBELET_FIXTURE).unwrap();
    // A pod bound to another node is not this agent's business.
    let mut elsewhere = istio_pods(1).remove(0);
    elsewhere["spec"]["nodeName"] = json!("edge-2");
    let kubelet = Kubelet::start(
        node.scratch().join("kubelet"),
        serde_json::to_vec(&with_items(fixture.clone(), vec![elsewhere])).unwrap(),
    );
    let mut agent = start_agent(&node, &kubelet, &[]);
    agent
        .wait_metric("merbridge_edge_pods{state=\"meshed\"}", |v| v == 4.0, WAIT)
        .unwrap();
    assert_eq!(
        agent.metric("merbridge_edge_pods{state=\"seen\"}").unwrap(),
        7.0
    );
    assert_eq!(pod_ips().unwrap(), fixture_ips());
    let log = agent.log();
    for (pod, mesh) in [
        ("shop/reviews-v1-7d9f8c6b5-x2k4p", "istio"),
        ("emojivoto/web-5d7f9b8c4-q8zrt", "linkerd"),
        ("kuma-demo/demo-app-6c8d7f5b9-mm4vn", "kuma"),
        ("bookstore/bookstore-v1-7b8c9d6f5-tt2lw", "osm"),
    ] {
        assert!(
            log.contains(&format!("pod {pod} added: mesh {mesh}")),
            "{pod}:\n{log}"
        );
    }
    // hostNetwork, terminating, plain and other-node pods are not programmed.
    for absent in ["svclb-traefik", "ratings-v1", "nginx-6f8b9c7d5", "load-0"] {
        assert!(
            !log.lines()
                .any(|l| l.contains(absent) && l.contains("added")),
            "{absent} was programmed:\n{log}"
        );
    }
    assert_eq!(agent.http_get("/readyz").unwrap().0, 200);
    // `status` shows what was programmed, for people and as JSON.
    let addr = agent.metrics_addr().unwrap();
    let out = std::process::Command::new(merbridge_edge_testbed::agent::agent_binary())
        .args(["status", "--metrics-addr", &addr])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    for needle in [
        "shop/reviews-v1-7d9f8c6b5-x2k4p",
        "emojivoto/web-5d7f9b8c4-q8zrt",
        "out-exclude port 5432",
        "out-exclude 169.254.169.254/32",
        "out 4140 in 4143 uid 2102",
        "POD_BY_IP",
        "7 seen, 4 meshed",
    ] {
        assert!(table.contains(needle), "{needle:?} not in\n{table}");
    }
    let out = std::process::Command::new(merbridge_edge_testbed::agent::agent_binary())
        .args(["status", "--metrics-addr", &addr, "--json"])
        .output()
        .unwrap();
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut names: Vec<&str> = json["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "bookstore/bookstore-v1-7b8c9d6f5-tt2lw",
            "emojivoto/web-5d7f9b8c4-q8zrt",
            "kuma-demo/demo-app-6c8d7f5b9-mm4vn",
            "shop/reviews-v1-7d9f8c6b5-x2k4p"
        ]
    );
    assert_eq!(
        agent
            .metric("merbridge_edge_map_entries{map=\"POD_BY_IP\"}")
            .unwrap(),
        6.0
    );

    // A full node: 110 pods, then back to the fixture (110 removals).
    kubelet.serve(&with_items(fixture.clone(), istio_pods(110)));
    agent
        .wait_metric(
            "merbridge_edge_pods{state=\"meshed\"}",
            |v| v == 114.0,
            WAIT,
        )
        .unwrap();
    assert_eq!(pod_ips().unwrap().len(), 6 + 220);
    kubelet.serve(&fixture);
    agent
        .wait_metric("merbridge_edge_pods{state=\"meshed\"}", |v| v == 4.0, WAIT)
        .unwrap();
    assert_eq!(pod_ips().unwrap(), fixture_ips());
}

/// Serves `reply`, waits for the failure to be counted under `kind` and logged with
/// every needle, checks the maps kept the last good state, then recovers.
fn fault(agent: &mut Agent, kubelet: &Kubelet, reply: Reply, kind: &str, needles: &[&str]) {
    let sample = format!("merbridge_edge_poll_errors_total{{kind=\"{kind}\"}}");
    let before = agent.metric(&sample).unwrap();
    let recovered = agent.log().matches("answers again").count();
    kubelet.server().set_reply(reply);
    agent.wait_metric(&sample, |v| v > before, WAIT).unwrap();
    let log = agent.log();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("ERROR") && l.contains("keeping the last good state"))
        .unwrap_or_else(|| panic!("{kind}: no error line:\n{log}"));
    for needle in needles {
        assert!(line.contains(needle), "{kind}: {needle:?} not in {line}");
    }
    assert_eq!(pod_ips().unwrap(), fixture_ips(), "{kind}: maps changed");
    assert_eq!(
        agent
            .metric("merbridge_edge_pods{state=\"meshed\"}")
            .unwrap(),
        4.0
    );
    kubelet
        .server()
        .set_reply(Reply::Body(KUBELET_FIXTURE.as_bytes().to_vec()));
    agent
        .wait_log_count("answers again", recovered + 1, WAIT)
        .unwrap();
}

#[test]
fn kubelet_faults_keep_the_last_good_state_and_recover() {
    let Some(_serial) = kernel_test("kubelet_faults") else {
        return;
    };
    let node = Node::new(HELPER.as_ref()).unwrap();
    let mut kubelet = Kubelet::start(node.scratch().join("kubelet"), KUBELET_FIXTURE.into());
    let mut agent = start_agent(&node, &kubelet, &["--log-level", "debug"]);
    agent
        .wait_metric("merbridge_edge_pods{state=\"meshed\"}", |v| v == 4.0, WAIT)
        .unwrap();
    let url = kubelet.server().url();

    fault(
        &mut agent,
        &kubelet,
        Reply::Status(500, "etcd is sad".into()),
        "status",
        &["HTTP 500", "etcd is sad", &url],
    );
    fault(&mut agent, &kubelet, Reply::Status(403, "Forbidden (user=system:serviceaccount:x:y, verb=get, resource=nodes, subresource(s)=[pods])".into()), "forbidden", &["nodes/pods", "nodes/proxy"]);
    fault(
        &mut agent,
        &kubelet,
        Reply::Body(b"<html>bad gateway</html>".to_vec()),
        "body",
        &["not JSON"],
    );
    fault(
        &mut agent,
        &kubelet,
        Reply::Body(br#"{"kind":"Status","status":"Failure"}"#.to_vec()),
        "body",
        &["got kind \"Status\""],
    );
    fault(
        &mut agent,
        &kubelet,
        Reply::Stall(Duration::from_secs(3)),
        "timeout",
        &["no answer within 1s"],
    );
    fault(
        &mut agent,
        &kubelet,
        Reply::Hangup,
        "connect",
        &[&url, "closed the connection"],
    );
    let mut huge = br#"{"kind":"PodList","items":[],"x":""#.to_vec();
    huge.resize(33 << 20, b' ');
    huge.extend_from_slice(b"\"}");
    fault(
        &mut agent,
        &kubelet,
        Reply::Body(huge),
        "too_large",
        &["byte limit"],
    );

    // Token rotated by the cluster before the file: 401 naming the file, then recovery
    // as soon as the new token lands in it (read on every poll).
    let before = agent
        .metric("merbridge_edge_poll_errors_total{kind=\"unauthorized\"}")
        .unwrap();
    kubelet.server().set_token(Some(TOKEN_2));
    agent
        .wait_metric(
            "merbridge_edge_poll_errors_total{kind=\"unauthorized\"}",
            |v| v > before,
            WAIT,
        )
        .unwrap();
    agent
        .wait_log(
            &format!(
                "401 Unauthorized: it rejected the bearer token in {}",
                kubelet.token_file.display()
            ),
            WAIT,
        )
        .unwrap();
    let recovered = agent.log().matches("answers again").count();
    fs::write(&kubelet.token_file, TOKEN_2).unwrap();
    agent
        .wait_log_count("answers again", recovered + 1, WAIT)
        .unwrap();
    assert_eq!(pod_ips().unwrap(), fixture_ips());

    // The kubelet goes away (refused), comes back with a certificate from another CA
    // (TLS error naming it and our CA file), then with the right one.
    let addr = kubelet.server().addr;
    let connect = "merbridge_edge_poll_errors_total{kind=\"connect\"}";
    let before = agent.metric(connect).unwrap();
    kubelet.server = None;
    agent
        .wait_metric(connect, |v| v >= before + 3.0, WAIT)
        .unwrap();
    // Logged once however many polls it lasts, and the polls back off.
    let refused = agent
        .log()
        .lines()
        .filter(|l| l.contains("ERROR") && l.contains("refused"))
        .count();
    assert_eq!(refused, 1, "{}", agent.log());
    for step in [
        "2 failed polls in a row (connect); retrying in 0.6s",
        "3 failed polls in a row (connect); retrying in 1.2s",
    ] {
        assert!(
            agent.log().contains(step),
            "backoff doubles: {step:?} not in\n{}",
            agent.log()
        );
    }
    let stranger = Pki::new(&kubelet.dir.join("stranger"), "stranger-ca").unwrap();
    let wrong = KubeletStandIn::start(
        &stranger,
        Some(addr),
        TOKEN_2,
        Reply::Body(KUBELET_FIXTURE.into()),
    )
    .unwrap();
    agent
        .wait_metric(
            "merbridge_edge_poll_errors_total{kind=\"tls\"}",
            |v| v >= 1.0,
            Duration::from_secs(40),
        )
        .unwrap();
    agent
        .wait_log(
            &format!(
                "does not verify against the CA file {}",
                kubelet.pki.ca_file.display()
            ),
            WAIT,
        )
        .unwrap();
    assert!(
        agent.log().contains("issuer CN=stranger-ca"),
        "{}",
        agent.log()
    );
    assert_eq!(pod_ips().unwrap(), fixture_ips());
    drop(wrong);
    let recovered = agent.log().matches("answers again").count();
    kubelet.server = Some(
        KubeletStandIn::start(
            &kubelet.pki,
            Some(addr),
            TOKEN_2,
            Reply::Body(KUBELET_FIXTURE.into()),
        )
        .unwrap(),
    );
    agent
        .wait_log_count("answers again", recovered + 1, Duration::from_secs(40))
        .unwrap();

    // Through every fault above (debug logging on), neither token was ever shown.
    let (_, metrics) = agent.http_get("/metrics").unwrap();
    let log = agent.log();
    for secret in [TOKEN_1, TOKEN_2] {
        assert!(
            !log.contains(secret),
            "the token leaked into the log:\n{log}"
        );
        assert!(!metrics.contains(secret), "the token leaked into /metrics");
    }
}

#[test]
fn bad_pods_are_named_and_skipped_while_the_rest_apply() {
    let Some(_serial) = kernel_test("kubelet_bad_pods") else {
        return;
    };
    let node = Node::new(HELPER.as_ref()).unwrap();
    let fixture: Value = serde_json::from_str(KUBELET_FIXTURE).unwrap();
    let mut bad = istio_pods(5);
    bad[0]["metadata"]["name"] = json!("bad-ip");
    bad[0]["status"]["podIPs"] = json!([{"ip": "10.42.0.999"}, {"ip": "fd00:43::1"}]);
    bad[0]["status"]["podIP"] = json!("10.42.0.999");
    bad[1]["metadata"]["name"] = json!("dup-ip");
    bad[1]["status"]["podIPs"] = json!([{"ip": "10.42.0.17"}]);
    bad[1]["status"]["podIP"] = json!("10.42.0.17");
    bad[2]["metadata"]["name"] = json!("bad-annotation");
    bad[2]["metadata"]["annotations"]["traffic.sidecar.istio.io/excludeOutboundPorts"] =
        json!("80,http");
    bad[3]["metadata"]["name"] = json!("no-status");
    bad[3].as_object_mut().unwrap().remove("status");
    bad[4]["metadata"]["name"] = json!("wrong-type");
    bad[4]["spec"]["containers"] = json!(7);
    let kubelet = Kubelet::start(
        node.scratch().join("kubelet"),
        serde_json::to_vec(&with_items(fixture, bad)).unwrap(),
    );
    let mut agent = start_agent(&node, &kubelet, &[]);
    // The fixture's 4 meshed pods less reviews (dup-ip lists its IP too: neither is
    // redirected), plus bad-ip (by its IPv6) and bad-annotation.
    agent
        .wait_metric("merbridge_edge_pods{state=\"meshed\"}", |v| v == 5.0, WAIT)
        .unwrap();
    let log = agent.log();
    for needle in [
        "pod shop/bad-ip: pod IP \"10.42.0.999\" is not an IP address; ignored",
        "pod shop/dup-ip: IP 10.42.0.17 is also listed for meshed pod(s) shop/reviews-v1-7d9f8c6b5-x2k4p on this node; pod skipped until only one has it",
        "pod shop/bad-annotation: annotation traffic.sidecar.istio.io/excludeOutboundPorts=\"80,http\"",
        "pod shop/wrong-type skipped: not a valid v1 Pod",
    ] {
        assert_eq!(log.matches(needle).count(), 1, "{needle:?} once:\n{log}");
    }
    assert_eq!(
        agent
            .metric("merbridge_edge_pods{state=\"skipped\"}")
            .unwrap(),
        1.0
    );
    let ips = pod_ips().unwrap();
    // reviews (10.42.0.17, fd00:42::11) shares its IPv4 with dup-ip: neither is in.
    let mut others = fixture_ips();
    for reviews in ["10.42.0.17", "fd00:42::11"] {
        let ip: IpAddr = reviews.parse().unwrap();
        others.remove(&ip);
        assert!(!ips.contains(&ip), "{ip} is in the maps: {ips:?}");
    }
    assert!(ips.is_superset(&others));
    assert!(
        ips.contains(&"fd00:43::1".parse().unwrap()),
        "bad-ip keeps its good IPv6"
    );
    assert_eq!(ips.len(), 4 + 1 + 2, "{ips:?}");
    // Still logged once after more polls.
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(agent.log().matches("pod shop/dup-ip").count(), 1);
}

#[test]
fn a_full_pod_map_is_said_once_and_the_rest_are_kept() {
    let Some(_serial) = kernel_test("kubelet_map_full") else {
        return;
    };
    let node = Node::new(HELPER.as_ref()).unwrap();
    let list = with_items(
        serde_json::from_str(KUBELET_FIXTURE).unwrap(),
        istio_pods(20),
    );
    let kubelet = Kubelet::start(
        node.scratch().join("kubelet"),
        serde_json::to_vec(&list).unwrap(),
    );
    // Room for 10 pods' IPs (20 entries): the fixture's 6 IPs and 7 more dual-stack pods.
    let mut agent = start_agent(&node, &kubelet, &["--max-pods", "10"]);
    agent
        .wait_metric("merbridge_edge_pods{state=\"map_full\"}", |v| v > 0.0, WAIT)
        .unwrap();
    let programmed = agent
        .metric("merbridge_edge_pods{state=\"programmed\"}")
        .unwrap();
    let full = agent
        .metric("merbridge_edge_pods{state=\"map_full\"}")
        .unwrap();
    assert_eq!(programmed + full, 24.0);
    assert_eq!(programmed, 4.0 + 7.0, "as many pods as fit, whole");
    assert_eq!(
        pod_ips().unwrap().len(),
        6 + 14,
        "no half-programmed pod left behind"
    );
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        agent.log().matches("map POD_BY_IP is full").count(),
        1,
        "{}",
        agent.log()
    );
    // Room again: pods removed from the list free the map; the warning clears.
    kubelet.serve(&with_items(
        serde_json::from_str(KUBELET_FIXTURE).unwrap(),
        istio_pods(5),
    ));
    agent
        .wait_log("map POD_BY_IP has room again", WAIT)
        .unwrap();
    assert_eq!(pod_ips().unwrap().len(), 6 + 10);
}

/// One pod whose annotations need about 65,000 rule entries, next to ordinary pods, with
/// the kubelet listing them in a new order on every poll: it alone is left out (named
/// once), and the others stay programmed on every poll.
#[test]
fn a_pod_over_its_rule_share_is_left_out_whatever_the_order() {
    let Some(_serial) = kernel_test("kubelet_rule_share") else {
        return;
    };
    let node = Node::new(HELPER.as_ref()).unwrap();
    let mut pods = istio_pods(4);
    // Every odd port excluded both ways: 2 × 32,768 single-port entries, as annotations
    // (no istio-init: its arguments would be the pod's configuration instead).
    let odd: Vec<String> = (1..=65535u32).step_by(2).map(|p| p.to_string()).collect();
    let odd = odd.join(",");
    pods[0]["spec"]
        .as_object_mut()
        .unwrap()
        .remove("initContainers");
    pods[0]["status"]
        .as_object_mut()
        .unwrap()
        .remove("initContainerStatuses");
    for key in [
        "traffic.sidecar.istio.io/excludeOutboundPorts",
        "traffic.sidecar.istio.io/excludeInboundPorts",
    ] {
        pods[0]["metadata"]["annotations"][key] = json!(odd);
    }
    let ordinary: Vec<IpAddr> = pods[1..]
        .iter()
        .map(|p| p["status"]["podIP"].as_str().unwrap().parse().unwrap())
        .collect();
    let big: IpAddr = pods[0]["status"]["podIP"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let list = with_items(serde_json::from_str(KUBELET_FIXTURE).unwrap(), pods);
    let kubelet = Kubelet::start(
        node.scratch().join("kubelet"),
        serde_json::to_vec(&list).unwrap(),
    );
    let mut agent = start_agent(&node, &kubelet, &["--max-rules", "65536"]);
    agent
        .wait_log("pod shop/load-0: its rules need 655", WAIT)
        .unwrap();
    for poll in 0..20 {
        let since = kubelet.server().requests();
        kubelet.server().wait_requests(since, 1, WAIT).unwrap();
        let ips = pod_ips().unwrap();
        assert!(
            ordinary.iter().all(|ip| ips.contains(ip)) && !ips.contains(&big),
            "poll {poll}: {ips:?}"
        );
    }
    assert_eq!(
        agent
            .log()
            .matches("pod shop/load-0: its rules need")
            .count(),
        1,
        "said once"
    );
    let rules = agent
        .metric("merbridge_edge_map_entries{map=\"PORT_RULES\"}")
        .unwrap();
    assert!(
        rules < 4096.0,
        "the big pod's 65,536 entries never went in: {rules}"
    );
}

#[test]
fn pods_come_go_restart_and_change_mesh() {
    let Some(_serial) = kernel_test("kubelet_lifecycle") else {
        return;
    };
    let mut f = Fixture::new(HELPER.as_ref(), istio_abc());
    let kubelet = Kubelet::start(
        f.node.scratch().join("kubelet"),
        serde_json::to_vec(&f.pod_list()).unwrap(),
    );
    let flags = kubelet.flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut agent = f.start_agent_with(&flags, &[]);
    let ino = |p: &std::path::Path| fs::metadata(p).unwrap().ino();
    // The kernel knows a pod by its pod-level cgroup.
    let cgroups_of =
        |f: &Fixture, pod: &str| -> BTreeSet<u64> { [ino(f.pod(pod).cgroup())].into() };
    let in_maps = || -> BTreeSet<u64> {
        pod_cgroups()
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    };
    let b = f.pod("b").clone();
    assert_eq!(in_maps(), &cgroups_of(&f, "a") | &cgroups_of(&f, "b"));

    // b goes away, then comes back.
    let without_b = {
        let mut l = f.pod_list();
        l["items"]
            .as_array_mut()
            .unwrap()
            .retain(|p| p["metadata"]["name"] != "b");
        l
    };
    kubelet.serve(&without_b);
    agent.wait_log("pod default/b removed", WAIT).unwrap();
    assert!(!pod_ips().unwrap().contains(&IpAddr::V4(b.ip4)));
    assert_eq!(in_maps(), cgroups_of(&f, "a"));
    kubelet.serve(&f.pod_list());
    agent
        .wait_log_count("pod default/b added", 2, WAIT)
        .unwrap();
    assert!(pod_ips().unwrap().contains(&IpAddr::V4(b.ip4)));

    // a's app container restarts under a new id, and the kubelet keeps listing the old
    // one (status not updated): the pod's entry covers the new container unchanged.
    f.node.restart_container("a", "app").unwrap();
    let before = agent.log().len();
    kubelet.serve(&f.pod_list());
    let since = kubelet.server().requests();
    kubelet.server().wait_requests(since, 2, WAIT).unwrap();
    assert_eq!(in_maps(), &cgroups_of(&f, "a") | &cgroups_of(&f, "b"));
    assert!(
        !agent.log()[before..].contains("pod default/a changed"),
        "a container restart changes nothing in the maps"
    );

    // a moves from Istio to Linkerd: same cgroups, now with Linkerd's ports.
    let mut list = f.pod_list();
    for pod in list["items"].as_array_mut().unwrap() {
        if pod["metadata"]["name"] != "a" {
            continue;
        }
        pod["metadata"]["annotations"] = json!({"linkerd.io/proxy-version": "edge-24.11.8"});
        for (part, field) in [("spec", "containers"), ("status", "containerStatuses")] {
            for c in pod[part][field].as_array_mut().unwrap() {
                if c["name"] == "istio-proxy" {
                    c["name"] = json!("linkerd-proxy");
                }
            }
        }
    }
    kubelet.serve(&list);
    agent
        .wait_log("pod default/a changed: mesh linkerd", WAIT)
        .unwrap();
    let a_ids = cgroups_of(&f, "a");
    for (id, port) in pod_cgroups().unwrap() {
        let want = if a_ids.contains(&id) { 4140 } else { 15001 };
        assert_eq!(port, want, "cgroup {id}");
    }
}

#[test]
fn traffic_is_redirected_for_pods_the_kubelet_lists() {
    let Some(_serial) = kernel_test("kubelet_end_to_end") else {
        return;
    };
    let f = Fixture::new(HELPER.as_ref(), istio_abc());
    let kubelet = Kubelet::start(
        f.node.scratch().join("kubelet"),
        serde_json::to_vec(&f.pod_list()).unwrap(),
    );
    let flags = kubelet.flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let _agent = f.start_agent_with(&flags, &[]);
    assert_outbound_ipv4_through_both_sidecars(&f);
}

/// Directories made by a test below a node's cgroup root, removed (deepest first) on drop.
struct MadeDirs(Vec<PathBuf>);

impl Drop for MadeDirs {
    fn drop(&mut self) {
        for d in self.0.iter().rev() {
            let _ = fs::remove_dir(d);
        }
    }
}

#[test]
fn a_new_container_cgroup_is_programmed_at_once_not_at_the_next_interval() {
    let Some(_serial) = kernel_test("kubelet_cgroup_trigger") else {
        return;
    };
    let node = Node::new(HELPER.as_ref()).unwrap();
    let late = istio_pods(1).remove(0);
    let uid = late["metadata"]["uid"].as_str().unwrap().to_string();
    let container = late["status"]["containerStatuses"][0]["containerID"]
        .as_str()
        .unwrap()
        .trim_start_matches("containerd://")
        .to_string();
    let kubelet = Kubelet::start(
        node.scratch().join("kubelet"),
        serde_json::to_vec(&with_items(
            serde_json::from_str(KUBELET_FIXTURE).unwrap(),
            vec![late],
        ))
        .unwrap(),
    );
    // An interval far longer than the test: only the cgroup trigger can be in time.
    let mut agent = start_agent_every(&node, &kubelet, "60s", &[]);
    agent.wait_log("pod shop/load-0 added", WAIT).unwrap();
    assert!(agent.log().contains("pod shop/load-0: no cgroup found yet"));
    std::thread::sleep(Duration::from_millis(300));
    let mut made = MadeDirs(vec![]);
    let mut dir = node.cgroup_root.clone();
    for part in [
        "kubepods".to_string(),
        "burstable".into(),
        format!("pod{uid}"),
        container,
    ] {
        dir = dir.join(part);
        if !dir.exists() {
            fs::create_dir(&dir).unwrap();
            made.0.push(dir.clone());
        }
    }
    let created = std::time::Instant::now();
    agent
        .wait_log("pod shop/load-0 changed", Duration::from_secs(5))
        .unwrap();
    let took = created.elapsed();
    let ids: BTreeSet<u64> = pod_cgroups()
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    // The kernel knows the pod by its pod cgroup, the container's parent.
    let pod_dir = dir.parent().unwrap();
    assert!(ids.contains(&fs::metadata(pod_dir).unwrap().ino()));
    eprintln!("cgroup created → pod programmed: {took:?} (interval 60s)");
    drop(agent);
}
