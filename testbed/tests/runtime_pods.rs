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
use std::{
    fs,
    path::{Path, PathBuf},
    sync::MutexGuard,
    time::Duration,
};

use merbridge_edge_testbed::{
    Node, Pod, PodSpec,
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

/// Istio pods a and b and plain pod c made by containerd and CNI, their apps running,
/// the agent started on the PodList of what the runtime made, then the sidecars
/// started as containers and listed. Dropped in field order: agent, pods, node.
struct Scene {
    agent: Option<Agent>,
    pods: RuntimePods,
    a: Pod,
    b: Pod,
    c: Pod,
    pods_file: PathBuf,
    node: Node,
}

impl Scene {
    fn new(agent_extra: &[&str]) -> Self {
        let node = Node::new(HELPER.as_ref()).unwrap();
        let mut pods = RuntimePods::new(&node).unwrap();
        let a = pods.add_pod(&node, PodSpec::istio("a"), APP_UID).unwrap();
        let b = pods.add_pod(&node, PodSpec::istio("b"), APP_UID).unwrap();
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
        let pods_file = node.scratch().join("pods.json");
        let mut scene = Self {
            agent: None,
            pods,
            a,
            b,
            c,
            pods_file,
            node,
        };
        // The containers as the PodList names them (app only: the sidecars start below).
        scene.write_pod_list(true);
        scene.agent = Some(scene.start_agent(agent_extra, 0));
        // The sidecars start as containers of their pods after the agent (their inbound
        // listeners are seen binding), then the kubelet lists them.
        for name in ["a", "b"] {
            let log = scene.sidecar_log(name);
            fs::write(&log, "").unwrap();
            fs::set_permissions(&log, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
            let pod = if name == "a" {
                &mut scene.a
            } else {
                &mut scene.b
            };
            scene
                .pods
                .start_container(
                    pod,
                    "istio-proxy",
                    &[
                        "--uid",
                        &PROXY_UID.to_string(),
                        "sidecar",
                        name,
                        "[::]:15001",
                        "[::]:15006",
                        log.to_str().unwrap(),
                    ],
                )
                .unwrap();
            scene.node.wait_listening(pod, 15006).unwrap();
        }
        scene.write_pod_list(false);
        let agent = scene.agent.as_mut().unwrap();
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
        scene
    }

    /// Writes the PodList of the pods as the runtime made them (without the sidecar
    /// containers when `apps_only`).
    fn write_pod_list(&self, apps_only: bool) {
        let listed = |p: &Pod| {
            let mut p = p.clone();
            if apps_only {
                p.containers.retain(|c| c.name == "app");
            }
            p.spec.containers = p.containers.iter().map(|c| c.name.clone()).collect();
            p
        };
        let list = pod_list(
            [&listed(&self.a), &listed(&self.b), &listed(&self.c)],
            "edge-1",
        );
        write_pod_list(&self.pods_file, &list).unwrap();
        eprintln!("PodList: {list}");
    }

    /// Starts an agent on the pods file (log `agent-<n>.log`); waits until it attached.
    fn start_agent(&self, extra: &[&str], n: usize) -> Agent {
        let root = self.node.cgroup_root.to_str().unwrap().to_string();
        let bpffs = self.node.bpffs.to_str().unwrap().to_string();
        let file = self.pods_file.to_str().unwrap().to_string();
        let mut args = vec![
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
        ];
        args.extend(extra);
        let mut agent =
            Agent::start(&args, &self.node.scratch().join(format!("agent-{n}.log"))).unwrap();
        agent
            .wait_log("probes attached to ", Duration::from_secs(10))
            .unwrap();
        agent
    }

    fn sidecar_log(&self, pod: &str) -> PathBuf {
        self.node.scratch().join(format!("sidecar-{pod}.log"))
    }

    /// The client in `from`'s app container to b:8080; answered by b's app.
    fn client_to_b(&self, from: &Pod) -> String {
        let target = format!("{}:8080", self.b.ip4);
        let out = self
            .node
            .run_in(from, Some("app"), Some(APP_UID), &["client", &target])
            .unwrap();
        assert_eq!(who(&out), "b-app", "{out}");
        target
    }

    /// Asserts that b's sidecar logged a captured inbound connection from `from` since
    /// line `before`.
    fn assert_inbound_at_b(&self, from: &Pod, before: usize) {
        let target = format!("{}:8080", self.b.ip4);
        let lb = wait_lines(&self.sidecar_log("b"), before + 1);
        assert!(
            lb[before.min(lb.len())..]
                .iter()
                .any(|l| l.contains("listener=inbound")
                    && l.contains(&format!("peer=[::ffff:{}]", from.ip4))
                    && l.contains(&format!("orig={target}"))),
            "b's sidecar since line {before}: {lb:?}"
        );
    }

    /// The bypass ledger of b after one stats pass.
    fn bypassed_b(&mut self) -> f64 {
        std::thread::sleep(Duration::from_millis(500));
        self.agent
            .as_mut()
            .unwrap()
            .metric("merbridge_edge_inbound_bypassed_total{pod=\"default/b\"}")
            .unwrap()
    }

    /// Stops the agent, then removes the pods; asserts nothing was left.
    fn finish(mut self) {
        drop(self.agent.take());
        let netns: Vec<String> = [&self.a, &self.b, &self.c]
            .iter()
            .map(|p| p.netns.clone())
            .collect();
        let Self { pods, node, .. } = self;
        pods.shutdown().expect("tear-down leaves nothing");
        for n in netns {
            assert!(!Path::new("/var/run/netns").join(n).exists());
        }
        drop(node);
    }
}

#[test]
fn pods_made_by_containerd_and_cni_go_through_both_sidecars_outbound_and_inbound() {
    let Some(_serial) = runtime_pods_test("pods under containerd") else {
        return;
    };
    let mut s = Scene::new(&[]);
    // a → b:8080 from a's app container: through a's sidecar (outbound, the original
    // destination) and b's (inbound), answered by b's app.
    let target = s.client_to_b(&s.a);
    let la = wait_lines(&s.sidecar_log("a"), 1);
    eprintln!("a's sidecar: {la:?}");
    assert!(
        la.iter()
            .any(|l| l.contains("listener=outbound") && l.contains(&format!("orig={target}"))),
        "a's sidecar: {la:?}"
    );
    s.assert_inbound_at_b(&s.a, 0);
    // c (plain) → b: captured inbound by b's sidecar.
    let before = lines(&s.sidecar_log("b")).len();
    s.client_to_b(&s.c);
    s.assert_inbound_at_b(&s.c, before);
    assert_eq!(s.bypassed_b(), 0.0, "the bypass ledger");
    s.finish();
}

#[test]
fn after_sigkill_a_new_agent_adopts_the_pinned_listeners_of_containerd_pods() {
    let Some(_serial) = runtime_pods_test("agent restart, pods under containerd") else {
        return;
    };
    let mut s = Scene::new(&["--pin-inbound-listeners"]);
    let before = lines(&s.sidecar_log("b")).len();
    s.client_to_b(&s.c);
    s.assert_inbound_at_b(&s.c, before);
    let mut old = s.agent.take().unwrap();
    old.proc.signal(libc::SIGKILL);
    old.proc.wait_for(Duration::from_secs(5)).expect("killed");
    drop(old);
    assert!(
        s.node
            .bpffs
            .join("merbridge-edge/inbound-listeners-v1")
            .exists(),
        "the listener sockhash stays pinned across agents"
    );
    // The sidecars keep running in their containers; the new agent captures for them
    // at once, both inbound and outbound.
    let mut agent = s.start_agent(&["--pin-inbound-listeners"], 1);
    agent
        .wait_log_count("added: mesh ", 2, Duration::from_secs(10))
        .unwrap();
    s.agent = Some(agent);
    let before = lines(&s.sidecar_log("b")).len();
    s.client_to_b(&s.c);
    s.assert_inbound_at_b(&s.c, before);
    let before_a = lines(&s.sidecar_log("a")).len();
    let target = s.client_to_b(&s.a);
    let la = wait_lines(&s.sidecar_log("a"), before_a + 1);
    assert!(
        la[before_a..]
            .iter()
            .any(|l| l.contains("listener=outbound") && l.contains(&format!("orig={target}"))),
        "a's sidecar: {la:?}"
    );
    assert_eq!(s.bypassed_b(), 0.0, "the bypass ledger");
    s.finish();
}
