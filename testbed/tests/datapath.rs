//! The datapath on the real kernel: pods as network namespaces, containers as cgroups,
//! the agent attached below a test cgroup and fed a pods file.
//!
//! Needs root, cgroup v2, iproute2 and bpftool, and the agent built in release mode
//! (`scripts/test` does all of that). Without root every test says so and passes,
//! unless MBE_REQUIRE_KERNEL_TESTS=1 (set by CI), where that is a failure.
use std::{
    fs,
    time::{Duration, Instant},
};

use merbridge_edge_testbed::{
    Node, Pod, PodSpec,
    agent::Agent,
    fixture::{
        APP_UID, Fixture, PROXY_UID, assert_detached_and_direct, assert_no_bypass,
        assert_outbound_ipv4_through_both_sidecars, counters, istio_abc, kernel_test,
        programs_attached_below, wait_sidecar_lines, who,
    },
    podlist::{pod_list, write_pod_list},
};

const HELPER: &str = env!("CARGO_BIN_EXE_mbe-testbed");

#[test]
fn outbound_ipv4_goes_through_both_sidecars_with_the_original_destination() {
    let Some(_serial) = kernel_test("outbound_ipv4") else {
        return;
    };
    let f = Fixture::new(HELPER.as_ref(), istio_abc());
    let mut agent = f.start_agent(&[]);
    assert_outbound_ipv4_through_both_sidecars(&f);
    assert_no_bypass(&mut agent);
}

#[test]
fn outbound_ipv6_goes_through_both_sidecars_with_the_original_destination() {
    let Some(_serial) = kernel_test("outbound_ipv6") else {
        return;
    };
    let f = Fixture::new(HELPER.as_ref(), istio_abc());
    let mut agent = f.start_agent(&[]);
    let b = f.pod("b").clone();
    let out = f.client("a", &format!("[{}]:8080", b.ip6), &[]);
    assert_eq!(who(&out), "b-app", "{out}");
    let la = wait_sidecar_lines(&f, "a", 0, 1);
    assert!(
        la.len() == 1
            && la[0].contains("listener=outbound")
            && la[0].contains(&format!("orig=[{}]:8080", b.ip6)),
        "{la:?}"
    );
    let lb = wait_sidecar_lines(&f, "b", 0, 1);
    assert!(
        lb.len() == 1
            && lb[0].contains("listener=inbound")
            && lb[0].contains(&format!("orig=[{}]:8080", b.ip6)),
        "{lb:?}"
    );
    assert_no_bypass(&mut agent);
}

#[test]
fn proxy_to_its_own_pod_is_untouched_and_never_fails() {
    let Some(_serial) = kernel_test("proxy_own_pod") else {
        return;
    };
    let f = Fixture::new(HELPER.as_ref(), istio_abc());
    let mut agent = f.start_agent(&[]);
    let b = f.pod("b").clone();
    for target in [
        format!("{}:8080", b.ip4),
        format!("[{}]:8080", b.ip6),
        "127.0.0.1:8080".to_string(),
    ] {
        let out = f
            .node
            .run_in(
                &b,
                Some("istio-proxy"),
                Some(PROXY_UID),
                &["client", &target, "--conns", "20"],
            )
            .unwrap();
        assert_eq!(who(&out), "b-app", "{target}: {out}");
        assert!(out.contains("ok conns=20"), "{out}");
    }
    assert!(
        f.sidecar_log("b").is_empty(),
        "no connection looped into sidecar b: {:?}",
        f.sidecar_log("b")
    );
    // Through the full path, every inbound connection reached the app at the first try.
    let out = f.client("a", &format!("{}:8080", b.ip4), &["--conns", "30"]);
    assert!(out.contains("ok conns=30"), "{out}");
    let lb = wait_sidecar_lines(&f, "b", 0, 30);
    assert_eq!(lb.len(), 30);
    assert!(lb.iter().all(|l| !l.contains("orig=error")), "{lb:?}");
    assert_no_bypass(&mut agent);
}

#[test]
fn exclusions_and_inclusions_of_ports_and_ranges() {
    let Some(_serial) = kernel_test("exclusions") else {
        return;
    };
    // Addresses are known only once the node exists: add annotated pods in two steps.
    let mut node_specs = istio_abc();
    node_specs.push(PodSpec::istio("d"));
    let mut f = Fixture::new(HELPER.as_ref(), node_specs);
    let (b, c) = (f.pod("b").clone(), f.pod("c").clone());
    let annotate = |f: &mut Fixture, pod: &str, kv: &[(&str, String)]| {
        let p = f.pods.get_mut(pod).unwrap();
        for (k, v) in kv {
            p.spec.annotations.push((k.to_string(), v.clone()));
        }
    };
    annotate(
        &mut f,
        "a",
        &[
            (
                "traffic.sidecar.istio.io/excludeOutboundPorts",
                "9001-9003".into(),
            ),
            (
                "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                format!("{}/32", c.ip4),
            ),
        ],
    );
    annotate(
        &mut f,
        "b",
        &[
            (
                "traffic.sidecar.istio.io/excludeInboundPorts",
                "8081".into(),
            ),
            (
                "traffic.sidecar.istio.io/excludeOutboundPorts",
                "80,bogus".into(),
            ),
        ],
    );
    annotate(
        &mut f,
        "d",
        &[
            (
                "traffic.sidecar.istio.io/includeOutboundIPRanges",
                format!("{}/32", b.ip4),
            ),
            (
                "traffic.sidecar.istio.io/includeOutboundPorts",
                "8081".into(),
            ),
        ],
    );
    write_pod_list(&f.pods_file, &pod_list(f.pods.values(), "edge-1")).unwrap();
    let mut agent = f.start_agent(&[]);

    // a: excluded outbound port → not through sidecar a; b still captures it inbound
    // (its own rules decide, as with the mesh's PREROUTING rules).
    assert_eq!(
        who(&f.client("a", &format!("{}:9002", b.ip4), &[])),
        "b-app"
    );
    let lb = wait_sidecar_lines(&f, "b", 0, 1);
    assert!(
        lb.len() == 1
            && lb[0].contains("listener=inbound")
            && lb[0].contains(&format!("orig={}:9002", b.ip4)),
        "{lb:?}"
    );
    // a: excluded range → straight to c.
    assert_eq!(
        who(&f.client("a", &format!("{}:8080", c.ip4), &[])),
        "c-app"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(f.sidecar_log("a").is_empty(), "{:?}", f.sidecar_log("a"));
    // b: inbound 8081 excluded → sidecar a forwards, sidecar b is skipped. b's invalid
    // annotation is reported by name and ignored; the rest of the pod still applies.
    assert_eq!(
        who(&f.client("a", &format!("{}:8081", b.ip4), &[])),
        "b-app"
    );
    let la = wait_sidecar_lines(&f, "a", 0, 1);
    assert!(
        la.len() == 1 && la[0].contains(&format!("orig={}:8081", b.ip4)),
        "{la:?}"
    );
    assert_eq!(f.sidecar_log("b").len(), 1, "{:?}", f.sidecar_log("b"));
    let log = agent.log();
    let warning: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("excludeOutboundPorts=\"80,bogus\""))
        .collect();
    assert_eq!(warning.len(), 1, "invalid annotation logged once:\n{log}");
    assert!(
        warning[0].contains("pod default/b") && warning[0].contains("\"bogus\" is not a port"),
        "{warning:?}"
    );
    // d: only b's address is included → to b via sidecar d, to c directly; port 8081
    // is included whatever the address.
    assert_eq!(
        who(&f.client("d", &format!("{}:8080", b.ip4), &[])),
        "b-app"
    );
    assert_eq!(
        who(&f.client("d", &format!("{}:8080", c.ip4), &[])),
        "c-app"
    );
    assert_eq!(
        who(&f.client("d", &format!("{}:8081", c.ip4), &[])),
        "c-app"
    );
    let ld = wait_sidecar_lines(&f, "d", 0, 2);
    assert_eq!(ld.len(), 2, "{ld:?}");
    assert!(ld[0].contains(&format!("orig={}:8080", b.ip4)), "{ld:?}");
    assert!(ld[1].contains(&format!("orig={}:8081", c.ip4)), "{ld:?}");
    assert_no_bypass(&mut agent);
}

#[test]
fn plain_pods_and_host_processes_are_not_redirected_but_captured_inbound() {
    let Some(_serial) = kernel_test("untouched") else {
        return;
    };
    let f = Fixture::new(HELPER.as_ref(), istio_abc());
    let mut agent = f.start_agent(&[]);
    let (a, b, c) = (f.pod("a").clone(), f.pod("b").clone(), f.pod("c").clone());
    assert_eq!(
        who(&f.client("c", &format!("{}:8080", b.ip4), &[])),
        "b-app"
    );
    // A process of a meshed pod's netns but in no known cgroup: not redirected
    // outbound either.
    let host = f.node.host_placement(&a);
    let out = f
        .node
        .run_placed(&host, &["client", &format!("{}:8080", b.ip4)])
        .unwrap();
    assert_eq!(who(&out), "b-app");
    // Neither went through sidecar a; both were captured by b's sidecar inbound.
    let lb = wait_sidecar_lines(&f, "b", 0, 2);
    std::thread::sleep(Duration::from_millis(200));
    assert!(f.sidecar_log("a").is_empty(), "{:?}", f.sidecar_log("a"));
    assert_eq!(lb.len(), 2, "{lb:?}");
    for (line, from) in lb.iter().zip([c.ip4, a.ip4]) {
        assert!(
            line.contains("listener=inbound")
                && line.contains(&format!("peer=[::ffff:{from}]"))
                && line.contains(&format!("orig={}:8080", b.ip4)),
            "{line}"
        );
    }
    assert_no_bypass(&mut agent);
}

#[test]
fn dns_capture_on_and_off() {
    let Some(_serial) = kernel_test("dns") else {
        return;
    };
    let mut specs = istio_abc();
    // Istio's real switch: ISTIO_META_DNS_CAPTURE in the proxy metadata.
    specs.push(PodSpec::istio("e").annotate(
        "proxy.istio.io/config",
        "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n",
    ));
    let f = Fixture::new(HELPER.as_ref(), specs);
    let (c, e) = (f.pod("c").clone(), f.pod("e").clone());
    f.node
        .spawn(&c, Some("app"), None, &["udp-echo", "c-dns", "[::]:53"])
        .unwrap();
    f.node
        .spawn(
            &e,
            Some("istio-proxy"),
            Some(PROXY_UID),
            &["udp-echo", "e-dns-proxy", "127.0.0.1:15053"],
        )
        .unwrap();
    f.node
        .spawn(
            &e,
            Some("istio-proxy"),
            Some(PROXY_UID),
            &["udp-echo", "e-dns-proxy6", "[::1]:15053"],
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let _agent = f.start_agent(&[]);
    let query = |pod: &Pod, target: String, connected: bool| {
        let mut args = vec!["udp-query".to_string(), target];
        if connected {
            args.push("--connected".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        f.node
            .run_in(pod, Some("app"), Some(APP_UID), &args)
            .unwrap()
    };
    for connected in [false, true] {
        let out = query(&e, format!("{}:53", c.ip4), connected);
        assert_eq!(
            out.trim(),
            format!("reply=who=e-dns-proxy from={}:53", c.ip4),
            "capture on (connected={connected})"
        );
        let out = query(&e, format!("[{}]:53", c.ip6), connected);
        assert_eq!(
            out.trim(),
            format!("reply=who=e-dns-proxy6 from=[{}]:53", c.ip6),
            "capture on, IPv6 (connected={connected})"
        );
        let out = query(f.pod("a"), format!("{}:53", c.ip4), connected);
        assert_eq!(
            out.trim(),
            format!("reply=who=c-dns from={}:53", c.ip4),
            "capture off (connected={connected})"
        );
    }
    // The proxy's own DNS queries go to the real server.
    let out = f
        .node
        .run_in(
            &e,
            Some("istio-proxy"),
            Some(PROXY_UID),
            &["udp-query", &format!("{}:53", c.ip4)],
        )
        .unwrap();
    assert_eq!(out.trim(), format!("reply=who=c-dns from={}:53", c.ip4));
}

#[test]
fn sk_msg_moves_large_and_concurrent_streams_intact() {
    let Some(_serial) = kernel_test("sk_msg") else {
        return;
    };
    let f = Fixture::new(HELPER.as_ref(), istio_abc());
    let mut agent = f.start_agent(&[]);
    let b = f.pod("b").clone();
    let out = f.client("a", &format!("{}:8080", b.ip4), &["--bytes", "1048576"]);
    assert!(out.contains("ok conns=1 bytes=1048576"), "{out}");
    let out = f.client(
        "a",
        &format!("[{}]:8080", b.ip6),
        &["--conns", "64", "--bytes", "65536"],
    );
    assert!(out.contains("ok conns=64 bytes=65536"), "{out}");
    let k = counters(&mut agent);
    assert!(
        k["sockhash_added"] >= 65 * 4,
        "both ends of both redirected legs of each connection: {k:?}"
    );
    assert!(
        k["sk_msg_bytes"] >= 2 * 2 * 1048576,
        "1 MiB each way over two accelerated legs: {k:?}"
    );
    assert!(k["sk_msg_redirected"] > 0, "{k:?}");
}

#[test]
fn acceleration_off_keeps_redirects_and_moves_nothing_through_sk_msg() {
    let Some(_serial) = kernel_test("no_accelerate") else {
        return;
    };
    let f = Fixture::new(HELPER.as_ref(), istio_abc());
    let mut agent = f.start_agent(&["--no-accelerate"]);
    let b = f.pod("b").clone();
    let out = f.client(
        "a",
        &format!("{}:8080", b.ip4),
        &["--bytes", "1048576", "--conns", "4"],
    );
    assert!(out.contains("ok conns=4"), "{out}");
    assert_eq!(wait_sidecar_lines(&f, "b", 0, 4).len(), 4);
    let k = counters(&mut agent);
    assert_eq!(k["sk_msg_bytes"], 0, "{k:?}");
    assert_eq!(k["sockhash_added"], 0, "{k:?}");
    assert!(
        k["redirect_outbound"] >= 4 && k["redirect_inbound"] >= 4,
        "{k:?}"
    );
    assert!(k["getsockopt_answered"] >= 8, "{k:?}");
}

#[test]
fn unrelated_socket_options_pass_through_unchanged() {
    let Some(_serial) = kernel_test("sockopts") else {
        return;
    };
    let f = Fixture::new(HELPER.as_ref(), istio_abc());
    let a = f.pod("a").clone();
    let before = f
        .node
        .run_in(&a, Some("app"), None, &["sockopts"])
        .expect("sockopts without the agent");
    let _agent = f.start_agent(&[]);
    let after = f
        .node
        .run_in(&a, Some("app"), None, &["sockopts"])
        .expect("sockopts with the agent");
    assert_eq!(before, after);
    assert!(after.starts_with("ok rcvbuf=131072"), "{after}");
    assert!(after.contains("peergroups_bytes=12000"), "{after}");
}

#[test]
fn after_sigterm_nothing_stays_attached() {
    let Some(_serial) = kernel_test("sigterm") else {
        return;
    };
    let f = Fixture::new(HELPER.as_ref(), istio_abc());
    let mut agent = f.start_agent(&[]);
    assert_ne!(programs_attached_below(&f.node.cgroup_root), "");
    assert_eq!(
        who(&f.client("a", &format!("{}:8080", f.pod("b").ip4), &[])),
        "b-app"
    );
    assert_eq!(wait_sidecar_lines(&f, "a", 0, 1).len(), 1);
    let t = Instant::now();
    agent.proc.signal(libc::SIGTERM);
    let status = agent
        .proc
        .wait_for(Duration::from_secs(2))
        .expect("agent exits within 2 s of SIGTERM");
    assert!(status.success(), "{status}");
    eprintln!("SIGTERM → exit in {:?}", t.elapsed());
    assert_detached_and_direct(&f);
}

#[test]
fn after_sigkill_nothing_stays_attached() {
    let Some(_serial) = kernel_test("sigkill") else {
        return;
    };
    let f = Fixture::new(HELPER.as_ref(), istio_abc());
    let mut agent = f.start_agent(&[]);
    assert_eq!(
        who(&f.client("a", &format!("{}:8080", f.pod("b").ip4), &[])),
        "b-app"
    );
    agent.proc.signal(libc::SIGKILL);
    agent.proc.wait_for(Duration::from_secs(2)).expect("killed");
    assert_detached_and_direct(&f);
}

#[test]
fn agent_finds_the_cgroup2_mount_by_itself() {
    let Some(_serial) = kernel_test("cgroup2_detection") else {
        return;
    };
    let node = Node::new(HELPER.as_ref()).unwrap();
    let empty = node.scratch().join("empty.json");
    fs::write(&empty, r#"{"kind":"PodList","apiVersion":"v1","items":[]}"#).unwrap();
    let mount = merbridge_edge_testbed::node::cgroup2_mount().unwrap();
    let mut agent = Agent::start(
        &["run", "--pods-file", empty.to_str().unwrap()],
        &node.scratch().join("agent.log"),
    )
    .unwrap();
    // Under containerd the agent finds the host's cgroup2 mount at the manifest's
    // mount of /sys/fs/cgroup.
    let seen = agent.path_seen(&mount);
    agent
        .wait_log(
            &format!("probes attached to {} ", seen.display()),
            Duration::from_secs(10),
        )
        .unwrap();
    agent.proc.signal(libc::SIGTERM);
    assert!(agent.proc.wait_for(Duration::from_secs(2)).is_some());
}
