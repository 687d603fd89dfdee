//! Pods known to the kernel by their pod-level cgroup, sidecars by their container: a
//! container restarted under a new id while the kubelet still lists the old one (its
//! status is stale while the control plane is away) stays meshed, and a proxy whose
//! uid on the node is not the mesh's (a user namespace) is still the proxy.
//!
//! Needs root, cgroup v2 and iproute2, and the agent built in release mode
//! (`scripts/test` does all of that). Without root every test says so and passes,
//! unless MBE_REQUIRE_KERNEL_TESTS=1 (set by CI).
use merbridge_edge_testbed::fixture::{
    Fixture, assert_no_bypass, counters, istio_abc, kernel_test, wait_sidecar_lines, who,
};

const HELPER: &str = env!("CARGO_BIN_EXE_mbe-testbed");

/// What a user namespace (`hostUsers: false`) could map the proxy's uid 1337 to.
const MAPPED_PROXY_UID: u32 = 1_001_337;

/// Exactly `n` sidecar lines, each an outbound connection with `target` as its original
/// destination.
fn assert_outbound(lines: &[String], n: usize, target: &str, what: &str) {
    assert!(
        lines.len() == n
            && lines
                .iter()
                .all(|l| l.contains("listener=outbound") && l.contains(&format!("orig={target}"))),
        "{what}: {lines:?}"
    );
}

#[test]
fn containers_restarted_under_a_stale_status_stay_meshed() {
    let Some(_serial) = kernel_test("stale_status") else {
        return;
    };
    let mut f = Fixture::new(HELPER.as_ref(), istio_abc());
    // The pods file never changes below: the PodList keeps the old container ids.
    let mut agent = f.start_agent(&[]);
    let (b, c) = (f.pod("b").clone(), f.pod("c").clone());
    let target = format!("{}:8080", b.ip4);

    // a's app restarts: its new container is redirected at once, with no new status.
    let a = f.restart_container_unreported("a", "app", None);
    let before = (f.sidecar_log("a").len(), f.sidecar_log("b").len());
    let out = f.client_in(&a, &target, &["--conns", "3"]);
    assert!(
        out.contains("who=b-app") && out.contains("ok conns=3"),
        "{out}"
    );
    let la = wait_sidecar_lines(&f, "a", before.0, 3);
    assert_outbound(
        &la,
        3,
        &target,
        "the restarted app's connections go through its sidecar",
    );
    let lb = wait_sidecar_lines(&f, "b", before.1, 3);
    assert!(
        lb.len() == 3 && lb.iter().all(|l| l.contains("listener=inbound")),
        "and are captured by b's sidecar: {lb:?}"
    );

    // b's sidecar restarts in a new container, as another uid on the node: its inbound
    // listener is found under the pod, so a plain pod's connection is captured.
    let b_now = f.restart_container_unreported("b", "istio-proxy", Some(MAPPED_PROXY_UID));
    let before_b = f.sidecar_log("b").len();
    assert_eq!(who(&f.client("c", &target, &[])), "b-app");
    let lb = wait_sidecar_lines(&f, "b", before_b, 1);
    assert!(
        lb.len() == 1
            && lb[0].contains("listener=inbound")
            && lb[0].contains(&format!("peer=[::ffff:{}]", c.ip4))
            && lb[0].contains(&format!("orig={target}")),
        "b's restarted sidecar captures inbound with the original destination: {lb:?}"
    );

    // a's sidecar restarts the same way: its own upstream connections (uid unknown
    // to the agent, container not in the status) are not sent back into it, because
    // it was seen binding the outbound port. b's app replies through b's new sidecar.
    f.restart_container_unreported("a", "istio-proxy", Some(MAPPED_PROXY_UID));
    let before = (f.sidecar_log("a").len(), f.sidecar_log("b").len());
    let out = f.client_in(&a, &target, &["--conns", "5"]);
    assert!(
        out.contains("who=b-app") && out.contains("ok conns=5"),
        "{out}"
    );
    let la = wait_sidecar_lines(&f, "a", before.0, 5);
    assert_outbound(
        &la,
        5,
        &target,
        "a's restarted sidecar, once per connection (no loop)",
    );
    assert_eq!(
        wait_sidecar_lines(&f, "b", before.1, 5).len(),
        5,
        "each captured once by b's restarted sidecar"
    );
    assert_eq!(b_now.container("app").cgroup, b.container("app").cgroup);
    let n = counters(&mut agent);
    assert_eq!(n["inbound_refused"], 0, "{n:?}");
    assert_no_bypass(&mut agent);
}
