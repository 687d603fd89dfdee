//! Meshes other than Istio end to end on the real kernel, with their proxies as the
//! meshes run them (uid, listener addresses, ports).
//!
//! Needs root, cgroup v2 and iproute2, and the agent built in release mode
//! (`scripts/test` does all of that). Without root every test says so and passes,
//! unless MBE_REQUIRE_KERNEL_TESTS=1 (set by CI).
use std::time::Duration;

use merbridge_edge_testbed::{
    PodSpec,
    fixture::{
        Fixture, assert_no_bypass, assert_start_stop_restart_fail_no_connection, kernel_test,
        wait_sidecar_lines, who,
    },
    iptables::install_linkerd_iptables,
};

const HELPER: &str = env!("CARGO_BIN_EXE_mbe-testbed");

#[test]
fn linkerd_pods_go_through_their_proxies_with_the_original_destination() {
    let Some(_serial) = kernel_test("linkerd") else {
        return;
    };
    // linkerd-proxy as uid 2102, outbound listener on 127.0.0.1:4140 only, inbound on
    // 4143 (charts/partials/templates/_proxy.tpl's defaults).
    let f = Fixture::new(
        HELPER.as_ref(),
        vec![
            PodSpec::linkerd("a"),
            PodSpec::linkerd("b"),
            PodSpec::plain("c"),
        ],
    );
    let mut agent = f.start_agent(&[]);
    let (a, b, c) = (f.pod("a").clone(), f.pod("b").clone(), f.pod("c").clone());
    let target = format!("{}:8080", b.ip4);

    let out = f.client("a", &target, &[]);
    assert_eq!(who(&out), "b-app", "{out}");
    let la = wait_sidecar_lines(&f, "a", 0, 1);
    assert!(
        la.len() == 1
            && la[0].contains("listener=outbound")
            && la[0].contains("local=127.0.0.1:4140")
            && la[0].contains("peer=127.128.")
            && la[0].contains(&format!("orig={target}")),
        "a's proxy: outbound from its per-pod loopback source, with the original destination: {la:?}"
    );
    let lb = wait_sidecar_lines(&f, "b", 0, 1);
    assert!(
        lb.len() == 1
            && lb[0].contains("listener=inbound")
            && lb[0].contains(&format!("local=[::ffff:{}]:8080", b.ip4))
            && lb[0].contains(&format!("orig={target}")),
        "b's proxy: inbound on 4143 with the original destination: {lb:?}"
    );

    // Many at once: every one answered, none left without its original destination.
    let out = f.client("a", &target, &["--conns", "20"]);
    assert!(out.contains("ok conns=20"), "{out}");
    let la = wait_sidecar_lines(&f, "a", 1, 20);
    assert_eq!(la.len(), 20);
    assert!(
        la.iter().all(|l| l.contains(&format!("orig={target}"))),
        "{la:?}"
    );

    // A plain pod into b: captured by b's proxy; a to the plain pod: a's proxy only.
    assert_eq!(who(&f.client("c", &target, &[])), "b-app");
    let lb = wait_sidecar_lines(&f, "b", 21, 1);
    assert!(
        lb.len() == 1 && lb[0].contains(&format!("peer=[::ffff:{}]", c.ip4)),
        "{lb:?}"
    );
    let before_b = f.sidecar_log("b").len();
    assert_eq!(
        who(&f.client("a", &format!("{}:8080", c.ip4), &[])),
        "c-app"
    );
    let la = wait_sidecar_lines(&f, "a", 21, 1);
    assert!(
        la.len() == 1 && la[0].contains(&format!("orig={}:8080", c.ip4)),
        "{la:?}"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(f.sidecar_log("b").len(), before_b);

    // IPv6: a loopback-only listener has no per-pod address in IPv6, so a's outbound
    // fails open (straight to b), and b's proxy still captures it inbound.
    let target6 = format!("[{}]:8080", b.ip6);
    assert_eq!(who(&f.client("a", &target6, &[])), "b-app");
    let lb = wait_sidecar_lines(&f, "b", before_b, 1);
    assert!(
        lb.len() == 1
            && lb[0].contains(&format!("peer=[{}]", a.ip6))
            && lb[0].contains(&format!("orig={target6}")),
        "{lb:?}"
    );
    assert_no_bypass(&mut agent);
}

/// `from` → `to`:8080 goes through both proxies with the original destination, and a
/// plain pod into `to` is captured by its proxy.
fn assert_through_both_proxies(f: &Fixture, from: &str, to: &str, plain: &str) {
    let target = format!("{}:8080", f.pod(to).ip4);
    let (before_from, before_to) = (f.sidecar_log(from).len(), f.sidecar_log(to).len());
    let out = f.client(from, &target, &["--conns", "5"]);
    assert!(
        out.contains(&format!("who={to}-app")) && out.contains("ok conns=5"),
        "{out}"
    );
    let lf = wait_sidecar_lines(f, from, before_from, 5);
    let lt = wait_sidecar_lines(f, to, before_to, 5);
    assert!(
        lf.len() == 5
            && lf
                .iter()
                .all(|l| l.contains("listener=outbound") && l.contains(&format!("orig={target}"))),
        "{from}'s proxy: {lf:?}"
    );
    assert!(
        lt.len() == 5
            && lt
                .iter()
                .all(|l| l.contains("listener=inbound") && l.contains(&format!("orig={target}"))),
        "{to}'s proxy: {lt:?}"
    );
    assert_eq!(who(&f.client(plain, &target, &[])), format!("{to}-app"));
    let lt = wait_sidecar_lines(f, to, before_to + 5, 1);
    assert!(
        lt.len() == 1 && lt[0].contains(&format!("peer=[::ffff:{}]", f.pod(plain).ip4)),
        "{lt:?}"
    );
}

#[test]
fn kuma_and_osm_pods_go_through_their_proxies_with_the_original_destination() {
    let Some(_serial) = kernel_test("kuma_osm") else {
        return;
    };
    // kuma-sidecar as uid 5678 on 15001/15006; OSM's envoy as uid 1500 on 15001/15003.
    let f = Fixture::new(
        HELPER.as_ref(),
        vec![
            PodSpec::kuma("k1"),
            PodSpec::kuma("k2"),
            PodSpec::osm("o1"),
            PodSpec::osm("o2"),
            PodSpec::plain("c"),
        ],
    );
    let mut agent = f.start_agent(&[]);
    assert_through_both_proxies(&f, "k1", "k2", "c");
    assert_through_both_proxies(&f, "o1", "o2", "c");
    assert_no_bypass(&mut agent);
}

#[test]
fn next_to_linkerd_init_rules_agent_start_stop_and_restart_fail_no_connection() {
    let Some(_serial) = kernel_test("linkerd_coexistence") else {
        return;
    };
    let f = Fixture::new(
        HELPER.as_ref(),
        vec![
            PodSpec::linkerd("a"),
            PodSpec::linkerd("b"),
            PodSpec::plain("c"),
        ],
    );
    // Pods as linkerd-init leaves them.
    for p in ["a", "b"] {
        install_linkerd_iptables(&f.pod(p).netns).unwrap();
    }
    let target = format!("{}:8080", f.pod("b").ip4);
    assert_start_stop_restart_fail_no_connection(&f, &target);
    // With the agent and the rules both there: a → b through both proxies with the
    // original destination, a plain pod into b through b's proxy.
    let mut agent = f.start_agent(&[]);
    let (before_a, before_b) = (f.sidecar_log("a").len(), f.sidecar_log("b").len());
    assert_eq!(who(&f.client("a", &target, &[])), "b-app");
    assert_eq!(who(&f.client("c", &target, &[])), "b-app");
    let la = wait_sidecar_lines(&f, "a", before_a, 1);
    let lb = wait_sidecar_lines(&f, "b", before_b, 2);
    assert!(
        la.len() == 1 && la[0].contains(&format!("orig={target}")),
        "{la:?}"
    );
    assert!(
        lb.len() == 2 && lb.iter().all(|l| l.contains(&format!("orig={target}"))),
        "{lb:?}"
    );
    assert_no_bypass(&mut agent);
}

/// What real installs keep in the init container and the annotations, on the wire:
/// istio-init's `-z` (the sidecar's inbound listener on a port of its own) and
/// Linkerd's `skip-subnets` (linkerd-init's `--subnets-to-ignore`: inbound connections
/// from those sources go straight to the app).
#[test]
fn a_custom_inbound_port_and_skipped_source_subnets_are_honoured() {
    let Some(_serial) = kernel_test("init_settings") else {
        return;
    };
    let (f, remote) = Fixture::with_other_node(
        HELPER.as_ref(),
        vec![
            PodSpec::istio("a")
                .init_container(
                    "istio-init",
                    &[
                        "istio-iptables",
                        "-p",
                        "15001",
                        "-z",
                        "15016",
                        "-u",
                        "1337",
                        "-m",
                        "REDIRECT",
                        "-i",
                        "*",
                        "-x",
                        "",
                        "-b",
                        "*",
                        "-d",
                        "15090,15021,15020",
                    ],
                )
                .sidecar_inbound_port(15016),
            // Other nodes (10.232.0.0/16 here) skip b's proxy inbound.
            PodSpec::linkerd("b").annotate("config.linkerd.io/skip-subnets", "10.232.0.0/16"),
            PodSpec::plain("c"),
        ],
    );
    let mut agent = f.start_agent(&[]);
    let (a, b, c) = (f.pod("a").clone(), f.pod("b").clone(), f.pod("c").clone());

    // a's sidecar receives its pod's inbound on 15016.
    let target_a = format!("{}:8080", a.ip4);
    let before = f.sidecar_log("a").len();
    assert_eq!(who(&f.client("c", &target_a, &[])), "a-app");
    let la = wait_sidecar_lines(&f, "a", before, 1);
    assert!(
        la.len() == 1
            && la[0].contains("listener=inbound")
            && la[0].contains(&format!("peer=[::ffff:{}]", c.ip4))
            && la[0].contains(&format!("orig={target_a}")),
        "a's sidecar on its own inbound port: {la:?}"
    );

    // From another node, b's app directly; from a plain pod here, b's proxy.
    let target_b = format!("{}:8080", b.ip4);
    let before = f.sidecar_log("b").len();
    let out = f.client_from(&remote, &target_b, &[]).unwrap();
    assert_eq!(who(&out), "b-app", "{out}");
    assert_eq!(who(&f.client("c", &target_b, &[])), "b-app");
    let lb = wait_sidecar_lines(&f, "b", before, 1);
    std::thread::sleep(Duration::from_millis(200));
    let lb_all = f.sidecar_log("b")[before..].to_vec();
    assert!(
        lb.len() == 1 && lb_all.len() == 1 && lb[0].contains(&format!("peer=[::ffff:{}]", c.ip4)),
        "only c's connection went through b's proxy: {lb_all:?}"
    );
    // A skipped source is the mesh's choice, not a bypass.
    assert_no_bypass(&mut agent);
}
