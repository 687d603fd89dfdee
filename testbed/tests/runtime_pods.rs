//! The datapath with pods made by a real runtime: network namespaces pinned under
//! /var/run/netns and wired by the CNI bridge plugin as containerd's CRI plugin calls
//! it, stand-in containers run by containerd and runc from an image `mbe-image` wrote,
//! their cgroups in the kubelet's layout, and the PodList the agent reads built from
//! what containerd reports (container ids, the tasks' cgroups, CNI's addresses).
//! Tear-down must leave no container, task, image, snapshot, netns file, CNI
//! allocation or cgroup behind.
//!
//! Needs root, containerd and the CNI plugins (scripts/bootstrap), the stand-in program
//! and the image writer (scripts/build-standin-image); skipped with a note otherwise, a
//! failure when MBE_REQUIRE_KERNEL_TESTS=1 (root, tools) or MBE_REQUIRE_DIST=1 (the
//! builds). The agent is the bare process, or the image under containerd with
//! `MERBRIDGE_EDGE_RUNTIME=containerd`.
use std::{fs, path::Path, sync::MutexGuard, time::Duration};

use merbridge_edge_testbed::{
    Node, PodSpec,
    agent::Agent,
    containerd::missing_tool,
    fixture::{APP_UID, PROXY_UID, kernel_test, who},
    podlist::{pod_list, write_pod_list},
    runtime_pods::{CNI_BIN_DIR, RuntimePods, image_writer, standin_binary},
};

const HELPER: &str = env!("CARGO_BIN_EXE_mbe-testbed");

fn skip_or_fail(test: &str, why: &str, var: &str) -> Option<MutexGuard<'static, ()>> {
    if std::env::var(var).as_deref() == Ok("1") {
        panic!("{test}: {why}");
    }
    eprintln!("SKIPPED {test}: {why}");
    None
}

/// Root, a cgroup2 mount, containerd, the CNI plugins and the stand-in builds, or a
/// skip (a failure when required).
fn runtime_pods_test(test: &str) -> Option<MutexGuard<'static, ()>> {
    let serial = kernel_test(test)?;
    if let Some(why) = missing_tool() {
        return skip_or_fail(test, &why, "MBE_REQUIRE_KERNEL_TESTS");
    }
    if !Path::new(CNI_BIN_DIR).join("bridge").exists() {
        let why = "needs the CNI plugins (scripts/bootstrap installs containernetworking-plugins)";
        return skip_or_fail(test, why, "MBE_REQUIRE_KERNEL_TESTS");
    }
    for built in [standin_binary(), image_writer()] {
        if !built.exists() {
            let why = format!(
                "{} not built (scripts/build-standin-image)",
                built.display()
            );
            return skip_or_fail(test, &why, "MBE_REQUIRE_DIST");
        }
    }
    Some(serial)
}

/// Lines of a sidecar stand-in's log.
fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

/// Waits until the log at `path` has `want` lines.
fn wait_lines(path: &Path, want: usize) -> Vec<String> {
    let end = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let l = lines(path);
        if l.len() >= want || std::time::Instant::now() > end {
            return l;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn pods_made_by_containerd_and_cni_go_through_both_sidecars_outbound_and_inbound() {
    let Some(_serial) = runtime_pods_test("pods under containerd") else {
        return;
    };
    let node = Node::new(HELPER.as_ref()).unwrap();
    let mut pods = RuntimePods::new(&node).unwrap();
    let mut a = pods.add_pod(&node, PodSpec::istio("a"), APP_UID).unwrap();
    let mut b = pods.add_pod(&node, PodSpec::istio("b"), APP_UID).unwrap();
    let c = pods.add_pod(&node, PodSpec::plain("c"), APP_UID).unwrap();
    for pod in [&a, &b, &c] {
        // What the runtime made, where the kubelet and the agent expect it.
        assert!(pod.netns.starts_with("cni-"), "{}", pod.netns);
        assert!(Path::new("/var/run/netns").join(&pod.netns).exists());
        let app = pod.container("app");
        assert_eq!(app.id.len(), 64);
        assert_eq!(
            app.cgroup,
            node.cgroup_root
                .join(format!("kubepods/burstable/pod{}/{}", pod.uid, app.id)),
            "the task's cgroup (from /proc) in the kubelet's cgroupfs layout"
        );
        assert!(app.cgroup.join("cgroup.procs").exists());
    }
    // The containers as the PodList names them (app only: the sidecars start below).
    let pods_file = node.scratch().join("pods.json");
    let spec_of = |p: &merbridge_edge_testbed::Pod| {
        let mut p = p.clone();
        p.spec.containers = p.containers.iter().map(|c| c.name.clone()).collect();
        p
    };
    write_pod_list(
        &pods_file,
        &pod_list([&spec_of(&a), &spec_of(&b), &spec_of(&c)], "edge-1"),
    )
    .unwrap();
    let root = node.cgroup_root.to_str().unwrap().to_string();
    let bpffs = node.bpffs.to_str().unwrap().to_string();
    let file = pods_file.to_str().unwrap().to_string();
    let mut agent = Agent::start(
        &[
            "run",
            "--cgroup-root",
            &root,
            "--bpffs",
            &bpffs,
            "--pods-file",
            &file,
            "--interval",
            "200ms",
            "--log-level",
            "debug",
            "--node-name",
            "edge-1",
        ],
        &node.scratch().join("agent.log"),
    )
    .unwrap();
    agent
        .wait_log("probes attached to ", Duration::from_secs(10))
        .unwrap();

    // The sidecars start as containers of their pods after the agent (their inbound
    // listeners are seen binding), then the kubelet lists them.
    let log_of = |pod: &str| node.scratch().join(format!("sidecar-{pod}.log"));
    for pod in [&mut a, &mut b] {
        let log = log_of(&pod.spec.name);
        fs::write(&log, "").unwrap();
        fs::set_permissions(&log, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
        let name = pod.spec.name.clone();
        pods.start_container(
            pod,
            "istio-proxy",
            &[
                "--uid",
                &PROXY_UID.to_string(),
                "sidecar",
                &name,
                "[::]:15001",
                "[::]:15006",
                log.to_str().unwrap(),
            ],
        )
        .unwrap();
        node.wait_listening(pod, 15006).unwrap();
    }
    write_pod_list(&pods_file, &pod_list([&a, &b, &c], "edge-1")).unwrap();
    eprintln!(
        "PodList: {}",
        fs::read_to_string(&pods_file).unwrap_or_default()
    );
    agent
        .wait_log_count("added: mesh ", 2, Duration::from_secs(10))
        .unwrap();
    agent
        .wait_metric(
            "merbridge_edge_inbound_listeners",
            |v| v >= 2.0,
            Duration::from_secs(5),
        )
        .unwrap();

    // a → b:8080 from a's app container: through a's sidecar (outbound, the original
    // destination) and b's (inbound), answered by b's app.
    let target = format!("{}:8080", b.ip4);
    let out = node
        .run_in(&a, Some("app"), Some(APP_UID), &["client", &target])
        .unwrap();
    assert_eq!(who(&out), "b-app", "{out}");
    let la = wait_lines(&log_of("a"), 1);
    assert!(
        la.iter()
            .any(|l| l.contains("listener=outbound") && l.contains(&format!("orig={target}"))),
        "a's sidecar: {la:?}"
    );
    let lb = wait_lines(&log_of("b"), 1);
    eprintln!("a's sidecar: {la:?}\nb's sidecar: {lb:?}");
    assert!(
        lb.iter()
            .any(|l| l.contains("listener=inbound") && l.contains(&format!("orig={target}"))),
        "b's sidecar: {lb:?}"
    );
    // c (plain) → b: captured inbound by b's sidecar.
    let before = lines(&log_of("b")).len();
    let out = node
        .run_in(&c, Some("app"), Some(APP_UID), &["client", &target])
        .unwrap();
    assert_eq!(who(&out), "b-app", "{out}");
    let lb = wait_lines(&log_of("b"), before + 1);
    assert!(
        lb[before..]
            .iter()
            .any(|l| l.contains("listener=inbound")
                && l.contains(&format!("peer=[::ffff:{}]", c.ip4))),
        "b's sidecar after c: {lb:?}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        agent
            .metric("merbridge_edge_inbound_bypassed_total{pod=\"default/b\"}")
            .unwrap(),
        0.0,
        "the bypass ledger"
    );

    drop(agent);
    let netns: Vec<String> = [&a, &b, &c].iter().map(|p| p.netns.clone()).collect();
    pods.shutdown().expect("tear-down leaves nothing");
    for n in netns {
        assert!(!Path::new("/var/run/netns").join(n).exists());
    }
}
