//! Inbound capture at the receiving pod, on the real kernel: connections into a meshed
//! pod from another node, a plain pod and a host process land on its sidecar's inbound
//! listener with the address the client dialled, excluded ports reach the app, a
//! NetworkPolicy on the app port still passes, a sidecar that is not listening means
//! refused (never the app), the bypass ledger counts what reached an app without its
//! sidecar, and the agent coexists with istio-iptables' rules under load.
//!
//! Needs root, cgroup v2, iproute2, iptables (and br_netfilter for the policy test),
//! and the agent built in release mode (`scripts/test` does all of that). Without root
//! every test says so and passes, unless MBE_REQUIRE_KERNEL_TESTS=1 (set by CI).
use std::{
    process::Command,
    time::{Duration, Instant},
};

use merbridge_edge_testbed::{
    Pod, PodSpec,
    agent::Agent,
    fixture::{
        APP_UID, Fixture, assert_start_stop_restart_fail_no_connection, istio_abc, kernel_test,
        start_sidecar, wait_sidecar_lines, who,
    },
    iptables::install_istio_iptables,
    proc::run,
};

const HELPER: &str = env!("CARGO_BIN_EXE_mbe-testbed");

/// The bypass ledger's count for a pod, from /metrics.
fn bypassed(agent: &mut Agent, pod: &str) -> f64 {
    agent
        .metric(&format!(
            "merbridge_edge_inbound_bypassed_total{{pod=\"default/{pod}\"}}"
        ))
        .unwrap()
}

/// A kernel counter, from /metrics.
fn event(agent: &mut Agent, name: &str) -> f64 {
    agent
        .metric(&format!(
            "merbridge_edge_datapath_events_total{{event=\"{name}\"}}"
        ))
        .unwrap()
}

/// Waits one stats pass of the agent (its metrics are published every interval).
fn settle() {
    std::thread::sleep(Duration::from_millis(500));
}

/// Kills the processes of a pod's sidecar container (a sidecar crash).
fn kill_sidecar(pod: &Pod) {
    let procs = pod.container("istio-proxy").cgroup.join("cgroup.procs");
    for pid in std::fs::read_to_string(&procs).unwrap().split_whitespace() {
        let _ = Command::new("kill").args(["-9", pid]).status();
    }
    let end = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(&procs).unwrap().trim().is_empty() {
        assert!(
            Instant::now() < end,
            "sidecar of {} did not exit",
            pod.spec.name
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts that the last `n` lines of `pod`'s sidecar log are inbound connections from
/// `peers` (in order) with the original destination `orig`.
fn assert_inbound(f: &Fixture, pod: &str, before: usize, peers: &[String], orig: &str) {
    let lines = wait_sidecar_lines(f, pod, before, peers.len());
    assert_eq!(lines.len(), peers.len(), "{lines:?}");
    for (line, peer) in lines.iter().zip(peers) {
        assert!(
            line.contains("listener=inbound")
                && line.contains(&format!("peer={peer}:"))
                && line.contains(&format!("orig={orig}")),
            "want inbound from {peer} with orig={orig}: {line}"
        );
    }
}

#[test]
fn from_another_node_a_plain_pod_and_a_host_process_inbound_lands_on_the_sidecar() {
    let Some(_serial) = kernel_test("inbound_sources") else {
        return;
    };
    let (f, remote) = Fixture::with_other_node(HELPER.as_ref(), istio_abc());
    let mut agent = f.start_agent(&[]);
    let b = f.pod("b").clone();
    let target4 = format!("{}:8080", b.ip4);
    let target6 = format!("[{}]:8080", b.ip6);

    let out = f.client_from(&remote, &target4, &[]).unwrap();
    assert_eq!(who(&out), "b-app", "{out}");
    assert_inbound(&f, "b", 0, &[format!("[::ffff:{}]", remote.ip4)], &target4);
    let out = f.client_from(&remote, &target6, &[]).unwrap();
    assert_eq!(who(&out), "b-app", "{out}");
    assert_inbound(&f, "b", 1, &[format!("[{}]", remote.ip6)], &target6);
    // The app sees the sidecar's passthrough, never the remote client.
    assert!(!out.contains(&remote.ip6.to_string()), "{out}");

    let out = f.client("c", &target4, &[]);
    assert_eq!(who(&out), "b-app", "{out}");
    assert_inbound(
        &f,
        "b",
        2,
        &[format!("[::ffff:{}]", f.pod("c").ip4)],
        &target4,
    );

    let gateway = f.node.gateway4();
    let out = f
        .node
        .run_placed(&f.node.host_process(), &["client", &target4])
        .unwrap();
    assert_eq!(who(&out), "b-app", "{out}");
    assert_inbound(&f, "b", 3, &[format!("[::ffff:{gateway}]")], &target4);

    // Many at once, every one through the sidecar.
    let out = f
        .client_from(&remote, &target4, &["--conns", "50"])
        .unwrap();
    assert!(out.contains("ok conns=50"), "{out}");
    assert_eq!(wait_sidecar_lines(&f, "b", 4, 50).len(), 50);
    assert!(f.sidecar_log("a").is_empty(), "{:?}", f.sidecar_log("a"));
    settle();
    assert!(event(&mut agent, "redirect_inbound") >= 54.0);
    assert_eq!(bypassed(&mut agent, "b"), 0.0, "the bypass ledger");
    assert_eq!(bypassed(&mut agent, "a"), 0.0, "the bypass ledger");
    // No NAT anywhere: b's network namespace tracks no connection.
    let tracked = run(Command::new("ip").args([
        "netns",
        "exec",
        &b.netns,
        "sh",
        "-c",
        "cat /proc/sys/net/netfilter/nf_conntrack_count 2>/dev/null || echo 0",
    ]))
    .unwrap();
    assert_eq!(tracked.trim(), "0", "conntrack entries in pod b");
}

#[test]
fn excluded_inbound_ports_go_straight_to_the_app_and_are_no_bypass() {
    let Some(_serial) = kernel_test("inbound_excluded") else {
        return;
    };
    let mut specs = istio_abc();
    specs[1] = PodSpec::istio("b").annotate("traffic.sidecar.istio.io/excludeInboundPorts", "8081");
    let (f, remote) = Fixture::with_other_node(HELPER.as_ref(), specs);
    let mut agent = f.start_agent(&[]);
    let b = f.pod("b").clone();
    let out = f
        .client_from(&remote, &format!("{}:8081", b.ip4), &[])
        .unwrap();
    assert_eq!(who(&out), "b-app");
    let out = f.client("c", &format!("{}:8081", b.ip4), &[]);
    assert_eq!(who(&out), "b-app");
    // A captured port next to it still goes through the sidecar.
    let out = f.client("c", &format!("{}:9002", b.ip4), &[]);
    assert_eq!(who(&out), "b-app");
    let lines = wait_sidecar_lines(&f, "b", 0, 2);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains(&format!("orig={}:9002", b.ip4)),
        "{lines:?}"
    );
    settle();
    assert_eq!(
        bypassed(&mut agent, "b"),
        0.0,
        "excluded ports are no bypass"
    );
}

#[test]
fn a_network_policy_allowing_only_the_app_port_still_passes() {
    let Some(_serial) = kernel_test("inbound_policy") else {
        return;
    };
    let (f, remote) = Fixture::with_other_node(HELPER.as_ref(), istio_abc());
    let b = f.pod("b").clone();
    let ns = f.node.host_netns().to_string();
    // As k3s's kube-router enforces policies: the host's FORWARD chain, bridged pod
    // traffic included (br_netfilter). Only the app port reaches b.
    let in_node = |args: &[&str]| {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns]).args(args);
        run(&mut cmd).unwrap();
    };
    in_node(&["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"]);
    in_node(&[
        "iptables",
        "-w",
        "-A",
        "FORWARD",
        "-d",
        &format!("{}/32", b.ip4),
        "-p",
        "tcp",
        "!",
        "--dport",
        "8080",
        "-j",
        "DROP",
    ]);
    let mut agent = f.start_agent(&[]);
    let target = format!("{}:8080", b.ip4);
    let out = f.client_from(&remote, &target, &[]).unwrap();
    assert_eq!(who(&out), "b-app", "{out}");
    let out = f.client("a", &target, &[]);
    assert_eq!(who(&out), "b-app", "{out}");
    let out = f.client("c", &target, &[]);
    assert_eq!(who(&out), "b-app", "{out}");
    assert_inbound(
        &f,
        "b",
        0,
        &[
            format!("[::ffff:{}]", remote.ip4),
            format!("[::ffff:{}]", f.pod("a").ip4),
            format!("[::ffff:{}]", f.pod("c").ip4),
        ],
        &target,
    );
    // The rule is live: another port of b is dropped on the way.
    let blocked = f.client_from(&remote, &format!("{}:9002", b.ip4), &[]);
    assert!(blocked.is_err(), "port 9002 should be dropped: {blocked:?}");
    settle();
    assert_eq!(bypassed(&mut agent, "b"), 0.0, "the bypass ledger");
}

#[test]
fn a_sidecar_that_is_not_listening_means_refused_never_the_app() {
    let Some(_serial) = kernel_test("inbound_not_listening") else {
        return;
    };
    let (f, remote) = Fixture::with_other_node(HELPER.as_ref(), istio_abc());
    let mut agent = f.start_agent(&[]);
    let b = f.pod("b").clone();
    let target = format!("{}:8080", b.ip4);
    assert_eq!(who(&f.client("c", &target, &[])), "b-app");
    // Seen listening: from now on the pod is armed (its cgroups predate the agent here,
    // so until then a missing listener could be one the agent never saw bind).
    agent
        .wait_metric(
            "merbridge_edge_inbound_listeners",
            |v| v >= 2.0,
            Duration::from_secs(5),
        )
        .unwrap();
    settle();
    kill_sidecar(&b);
    for from in [&remote.placement, &f.node.host_process()] {
        let t = Instant::now();
        let err = f.node.run_placed(from, &["client", &target]).unwrap_err();
        assert!(
            format!("{err:#}").contains("refused") && t.elapsed() < Duration::from_secs(3),
            "refused at once, as with iptables: {err:#}"
        );
    }
    settle();
    assert!(event(&mut agent, "inbound_refused") >= 2.0);
    assert_eq!(bypassed(&mut agent, "b"), 0.0, "nothing reached the app");
    // The sidecar comes back (a container restart in place): captured again.
    let before = f.sidecar_log("b").len();
    start_sidecar(&f.node, &b, None).unwrap();
    let out = f.client_from(&remote, &target, &[]).unwrap();
    assert_eq!(who(&out), "b-app", "{out}");
    assert_inbound(
        &f,
        "b",
        before,
        &[format!("[::ffff:{}]", remote.ip4)],
        &target,
    );
}

#[test]
fn the_bypass_ledger_counts_what_reached_an_app_without_its_sidecar() {
    let Some(_serial) = kernel_test("inbound_ledger") else {
        return;
    };
    // Sidecars already listening when the agent starts (no pinned listeners to adopt):
    // they are not known, so inbound reaches the app and the ledger says so, until the
    // sidecar is seen listening again.
    let f = Fixture::new(HELPER.as_ref(), istio_abc());
    f.start_sidecars();
    let mut agent = f.start_agent(&[]);
    let b = f.pod("b").clone();
    let target = format!("{}:8080", b.ip4);
    let out = f.client("c", &target, &["--conns", "3"]);
    assert!(out.contains("who=b-app"), "{out}");
    agent
        .wait_metric(
            "merbridge_edge_inbound_bypassed_total{pod=\"default/b\"}",
            |v| v == 3.0,
            Duration::from_secs(5),
        )
        .unwrap();
    assert!(f.sidecar_log("b").is_empty(), "{:?}", f.sidecar_log("b"));
    let (_, status) = agent.http_get("/status").unwrap();
    assert!(status.contains("\"bypassed\":3"), "{status}");
    // The sidecar restarts: its listener is registered, inbound is captured from then on.
    kill_sidecar(&b);
    start_sidecar(&f.node, &b, None).unwrap();
    agent
        .wait_metric(
            "merbridge_edge_inbound_listeners",
            |v| v >= 1.0,
            Duration::from_secs(5),
        )
        .unwrap();
    assert_eq!(who(&f.client("c", &target, &[])), "b-app");
    assert_inbound(
        &f,
        "b",
        0,
        &[format!("[::ffff:{}]", f.pod("c").ip4)],
        &target,
    );
    settle();
    assert_eq!(bypassed(&mut agent, "b"), 3.0, "no new bypass");
    drop(agent);

    // With capture off, every such connection is a bypass: the ledger is not a constant.
    let mut agent = f.start_agent(&["--no-inbound-capture"]);
    let out = f.client("c", &target, &["--conns", "2"]);
    assert!(out.contains("who=b-app"), "{out}");
    agent
        .wait_metric(
            "merbridge_edge_inbound_bypassed_total{pod=\"default/b\"}",
            |v| v == 2.0,
            Duration::from_secs(5),
        )
        .unwrap();
}

#[test]
fn a_restarted_agent_adopts_the_pinned_listeners() {
    let Some(_serial) = kernel_test("inbound_restart") else {
        return;
    };
    let f = Fixture::new(HELPER.as_ref(), istio_abc());
    let agent = f.start_agent(&["--pin-inbound-listeners"]);
    let b = f.pod("b").clone();
    let target = format!("{}:8080", b.ip4);
    assert_eq!(who(&f.client("c", &target, &[])), "b-app");
    drop(agent);
    let pin = f.node.bpffs.join("merbridge-edge/inbound-listeners-v1");
    assert!(
        pin.exists(),
        "the listener sockhash stays pinned across agents"
    );
    let mut agent = f.start_agent(&["--pin-inbound-listeners"]);
    assert_eq!(who(&f.client("c", &target, &[])), "b-app");
    let from_c = format!("[::ffff:{}]", f.pod("c").ip4);
    assert_inbound(&f, "b", 0, &[from_c.clone(), from_c], &target);
    settle();
    assert_eq!(bypassed(&mut agent, "b"), 0.0, "the bypass ledger");
    assert!(agent.metric("merbridge_edge_inbound_listeners").unwrap() >= 2.0);
}

#[test]
fn next_to_istio_iptables_agent_start_stop_and_restart_fail_no_connection() {
    let Some(_serial) = kernel_test("inbound_coexistence") else {
        return;
    };
    let (f, remote) = Fixture::with_other_node(HELPER.as_ref(), istio_abc());
    // Pods as Istio injects them by default: istio-init's rules in a and b.
    for p in ["a", "b"] {
        install_istio_iptables(&f.pod(p).netns).unwrap();
    }
    let target = format!("{}:8080", f.pod("b").ip4);
    assert_start_stop_restart_fail_no_connection(&f, &target);
    // With the agent and the rules both present, every path still works: a → b through
    // both sidecars, another node → b through b's sidecar (REDIRECT got there first).
    let _agent = f.start_agent(&[]);
    let before_a = f.sidecar_log("a").len();
    let before_b = f.sidecar_log("b").len();
    assert_eq!(who(&f.client("a", &target, &[])), "b-app");
    let la = wait_sidecar_lines(&f, "a", before_a, 1);
    assert!(
        la.iter().any(|l| l.contains(&format!("orig={target}"))),
        "{la:?}"
    );
    let out = f.client_from(&remote, &target, &[]).unwrap();
    assert_eq!(who(&out), "b-app", "{out}");
    let lb = wait_sidecar_lines(&f, "b", before_b, 2);
    assert_eq!(lb.len(), 2, "{lb:?}");
    assert!(
        lb.iter().all(|l| l.contains(&format!("orig={target}"))),
        "{lb:?}"
    );
    // Streams through sk_msg arrive whole next to the rules: the sidecar-to-sidecar leg
    // that REDIRECT diverts is not paired (a socket left in the sockhash with no peer,
    // its data passing over NAT, was seen reset under load).
    for _ in 0..3 {
        let out = f
            .node
            .run_in(
                f.pod("a"),
                Some("app"),
                Some(APP_UID),
                &["load", "stream", &target, "65536", "4", "1000"],
            )
            .unwrap();
        assert!(out.contains("mb_per_s="), "{out}");
    }
}

/// Conntrack entries in the pods' and the node's network namespaces.
fn conntrack_entries(f: &Fixture) -> u64 {
    let namespaces = [
        f.pod("a").netns.clone(),
        f.pod("b").netns.clone(),
        f.node.host_netns().to_string(),
    ];
    namespaces
        .iter()
        .map(|ns| {
            run(Command::new("ip").args([
                "netns",
                "exec",
                ns,
                "sh",
                "-c",
                "cat /proc/sys/net/netfilter/nf_conntrack_count 2>/dev/null || echo 0",
            ]))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0)
        })
        .sum()
}

#[test]
fn conntrack_entries_per_meshed_connection_in_each_mode() {
    let Some(_serial) = kernel_test("inbound_conntrack") else {
        return;
    };
    const N: u64 = 20;
    let (f, remote) = Fixture::with_other_node(HELPER.as_ref(), istio_abc());
    let target = format!("{}:8080", f.pod("b").ip4);
    // 20 connections a → b and 20 from another node → b; the entries they add.
    let count = |f: &Fixture| {
        let before = conntrack_entries(f);
        let out = f.client("a", &target, &["--conns", &N.to_string()]);
        assert!(out.contains(&format!("ok conns={N}")), "{out}");
        let out = f
            .node
            .run_placed(
                &remote.placement,
                &["client", &target, "--conns", &N.to_string()],
            )
            .unwrap();
        assert!(out.contains(&format!("ok conns={N}")), "{out}");
        conntrack_entries(f).saturating_sub(before)
    };
    let agent = f.start_agent(&[]);
    let agent_only = count(&f);
    for p in ["a", "b"] {
        install_istio_iptables(&f.pod(p).netns).unwrap();
    }
    let both = count(&f);
    drop(agent);
    let iptables_only = count(&f);
    eprintln!(
        "conntrack entries for {N} connections a → b plus {N} from another node → b: agent {agent_only}, agent with istio-iptables' rules {both}, istio-iptables alone {iptables_only}"
    );
    assert_eq!(agent_only, 0, "the agent alone tracks nothing");
    // Any nat rule turns conntrack on in its namespace, whatever path a packet takes:
    // the saving needs the pods without the mesh's init container.
    assert!(
        both >= 2 * N && iptables_only >= 2 * N,
        "the mesh's rules keep conntrack on: {both}, {iptables_only}"
    );
}
