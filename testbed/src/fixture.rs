//! The datapath test topology shared by the real-kernel tests: a node with meshed and
//! plain pods running app and sidecar stand-ins, and the agent started on it.
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::{
    Node, Pod, PodSpec,
    agent::Agent,
    node::{RemoteNode, missing_prerequisite},
    podlist::{pod_list, write_pod_list},
};

/// uid of the app stand-ins.
pub const APP_UID: u32 = 1000;
/// uid of the sidecar stand-ins (Istio's).
pub const PROXY_UID: u32 = 1337;
/// uid of Linkerd's proxy stand-ins.
pub const LINKERD_PROXY_UID: u32 = 2102;
/// uid of Kuma's sidecar stand-ins.
pub const KUMA_PROXY_UID: u32 = 5678;
/// uid of OSM's Envoy stand-ins.
pub const OSM_PROXY_UID: u32 = 1500;
/// One topology at a time: the tests share the machine's two cores.
static SERIAL: Mutex<()> = Mutex::new(());

/// Checks the prerequisites and takes the one-topology-at-a-time lock; None = skip.
pub fn kernel_test(test: &str) -> Option<std::sync::MutexGuard<'static, ()>> {
    if let Some(why) = missing_prerequisite() {
        if std::env::var("MBE_REQUIRE_KERNEL_TESTS").as_deref() == Ok("1") {
            panic!("{test}: {why}");
        }
        eprintln!("SKIPPED {test}: {why}");
        return None;
    }
    Some(SERIAL.lock().unwrap_or_else(|e| e.into_inner()))
}

/// A node with meshed pods a, b (Istio) and a plain pod c, each running an echo app on
/// 8080 (and 8081, 9002); meshed pods run a sidecar stand-in as uid 1337.
pub struct Fixture {
    /// The node.
    pub node: Node,
    /// Its pods by name.
    pub pods: BTreeMap<String, Pod>,
    /// The PodList of the pods, as a file for `--pods-file`.
    pub pods_file: PathBuf,
    /// Whether the sidecar stand-ins have been started.
    sidecars_started: std::sync::atomic::AtomicBool,
    /// The running sidecar stand-in of each meshed pod (node process handles).
    sidecars: std::sync::Mutex<BTreeMap<String, usize>>,
}

/// Where the app stand-ins of the fixture's pods listen.
const APP_ADDRS: [&str; 3] = ["[::]:8080", "[::]:8081", "[::]:9002"];

impl Fixture {
    /// Builds the node; `helper` is the `mbe-testbed` binary.
    pub fn new(helper: &Path, specs: Vec<PodSpec>) -> Self {
        let mut node = Node::new(helper).expect("test node");
        let mut pods = BTreeMap::new();
        for spec in specs {
            let name = spec.name.clone();
            let pod = node.add_pod(spec).expect("pod");
            // Apps now; sidecars once the agent is attached (see `start_agent_with`),
            // as on a node where pods start after the agent.
            start_stand_ins(&mut node, &pod, &APP_ADDRS, false).expect("app stand-in");
            pods.insert(name, pod);
        }
        let pods_file = node.scratch().join("pods.json");
        write_pod_list(&pods_file, &pod_list(pods.values(), "edge-1")).unwrap();
        Self {
            node,
            pods,
            pods_file,
            sidecars_started: false.into(),
            sidecars: Default::default(),
        }
    }

    /// A fixture of `specs` with another node beside it (see [`Node::other_node`]),
    /// for connections that come from outside this node.
    pub fn with_other_node(helper: &Path, specs: Vec<PodSpec>) -> (Self, RemoteNode) {
        let mut f = Self::new(helper, specs);
        let remote = f.node.other_node().expect("another node");
        (f, remote)
    }

    /// Runs the client on the other node `remote` to `target`, with `extra`
    /// arguments: its output, or why it failed.
    pub fn client_from(
        &self,
        remote: &RemoteNode,
        target: &str,
        extra: &[&str],
    ) -> anyhow::Result<String> {
        let mut args = vec!["client", target];
        args.extend(extra);
        self.node.run_placed(&remote.placement, &args)
    }

    /// The pod called `name`.
    pub fn pod(&self, name: &str) -> &Pod {
        &self.pods[name]
    }

    /// The PodList of the pods, as the kubelet would list them.
    pub fn pod_list(&self) -> serde_json::Value {
        pod_list(self.pods.values(), "edge-1")
    }

    /// Starts the agent on the pods file and waits until every meshed pod is added.
    pub fn start_agent(&self, extra: &[&str]) -> Agent {
        let file = self.pods_file.to_str().unwrap().to_string();
        self.start_agent_with(&["--pods-file", &file], extra)
    }

    /// Starts the agent with `source` flags and waits until every meshed pod is added.
    pub fn start_agent_with(&self, source: &[&str], extra: &[&str]) -> Agent {
        let log = self
            .node
            .scratch()
            .join(format!("agent-{}.log", self.node.tag));
        let root = self.node.cgroup_root.to_str().unwrap().to_string();
        let bpffs = self.node.bpffs.to_str().unwrap().to_string();
        let mut args = vec!["run", "--cgroup-root", &root, "--bpffs", &bpffs];
        args.extend(source);
        args.extend([
            "--interval",
            "200ms",
            "--log-level",
            "debug",
            "--node-name",
            "edge-1",
        ]);
        args.extend(extra);
        let mut agent = Agent::start(&args, &log).expect("agent starts");
        let meshed = self
            .pods
            .values()
            .filter(|p| p.spec.sidecar().is_some())
            .count();
        agent
            .wait_log_count("added: mesh ", meshed, Duration::from_secs(10))
            .unwrap();
        self.start_sidecars();
        // Least privilege: the running agent holds what the k3s manifest grants, no more.
        assert_eq!(
            agent.effective_capabilities(),
            crate::manifest::Manifest::load().capability_mask(),
            "the agent's effective capabilities"
        );
        agent
    }

    /// Starts the sidecar stand-ins of the meshed pods, once (the first agent start
    /// does it, so that their inbound listeners are registered as they listen).
    pub fn start_sidecars(&self) {
        if self
            .sidecars_started
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        for pod in self.pods.values() {
            if pod.spec.sidecar().is_some() {
                let handle = start_sidecar(&self.node, pod, None).expect("sidecar stand-in");
                self.sidecars
                    .lock()
                    .unwrap()
                    .insert(pod.spec.name.clone(), handle);
            }
        }
    }

    /// Restarts `pod`'s `container` under a new id and cgroup, as the runtime does after
    /// a crash, while the PodList keeps naming the old one (the kubelet's status is
    /// stale while the control plane is away). The sidecar container's stand-in is
    /// stopped and started again in the new cgroup, as `uid` when given (a user
    /// namespace maps the proxy's uid to another on the node). Returns the pod as it
    /// now is (`self.pods` keeps the old one, for the PodList).
    pub fn restart_container_unreported(
        &mut self,
        pod: &str,
        container: &str,
        uid: Option<u32>,
    ) -> Pod {
        let is_sidecar = self.pod(pod).spec.sidecar() == Some(container);
        let old = is_sidecar
            .then(|| self.sidecars.lock().unwrap().remove(pod))
            .flatten();
        if let Some(handle) = old {
            self.node.stop(handle);
        }
        let now = self
            .node
            .restart_container(pod, container)
            .expect("container restarted");
        if is_sidecar {
            let handle = start_sidecar(&self.node, &now, uid).expect("sidecar stand-in");
            self.sidecars
                .lock()
                .unwrap()
                .insert(pod.to_string(), handle);
        }
        now
    }

    /// Lines the sidecar stand-in of `pod` logged (one per connection).
    pub fn sidecar_log(&self, pod: &str) -> Vec<String> {
        let path = self.node.scratch().join(format!("sidecar-{pod}.log"));
        fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    /// Runs the client in `pod`'s app container as the app uid.
    /// The client stand-in's output.
    pub fn client(&self, pod: &str, target: &str, extra: &[&str]) -> String {
        self.client_in(self.pod(pod), target, extra)
    }

    /// Runs the client in the app container of `pod` as given (for a container
    /// restarted since the PodList was written) as the app uid.
    pub fn client_in(&self, pod: &Pod, target: &str, extra: &[&str]) -> String {
        let mut args = vec!["client", target];
        args.extend(extra);
        self.node
            .run_in(pod, Some("app"), Some(APP_UID), &args)
            .unwrap_or_else(|e| panic!("client {} → {target}: {e:#}", pod.spec.name))
    }

    /// Runs the helper with `args` in `pod`'s app container as the app uid; its output.
    pub fn app_run(&self, pod: &str, args: &[&str]) -> anyhow::Result<String> {
        self.node
            .run_in(self.pod(pod), Some("app"), Some(APP_UID), args)
    }
}

/// Starts `pod`'s app stand-in (echo on `app_addrs`, as uid 1000, greeting as
/// `<pod>-app`) and, when `sidecar`, its sidecar stand-in (uid 1337, ports 15001 and
/// 15006, one line per connection in `sidecar-<pod>.log` in the scratch directory);
/// returns once they listen.
pub fn start_stand_ins(
    node: &mut Node,
    pod: &Pod,
    app_addrs: &[&str],
    sidecar: bool,
) -> anyhow::Result<()> {
    let name = pod.spec.name.clone();
    let app = format!("{name}-app");
    let mut args = vec!["echo", app.as_str()];
    args.extend(app_addrs);
    node.spawn(pod, Some("app"), Some(APP_UID), &args)?;
    if sidecar {
        start_sidecar(node, pod, None)?;
    }
    node.wait_listening(pod, 8080)
}

/// Starts `pod`'s sidecar stand-in, as its mesh runs it: Istio's as uid 1337 on 15001
/// and 15006, Linkerd's as uid 2102 on 127.0.0.1:4140 and 4143, Kuma's as uid 5678 on
/// 15001 and 15006, OSM's as uid 1500 on 15001 and 15003; one line per connection
/// in `sidecar-<pod>.log` in the scratch directory; as `uid` instead when given.
/// Returns once it listens. Started after the agent, its inbound listener is
/// registered for inbound capture.
pub fn start_sidecar(node: &Node, pod: &Pod, uid_override: Option<u32>) -> anyhow::Result<usize> {
    let name = &pod.spec.name;
    let log = node.scratch().join(format!("sidecar-{name}.log"));
    if !log.exists() {
        fs::write(&log, "")?;
    }
    // The sidecar runs as the proxy uid and appends to it.
    fs::set_permissions(&log, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
    let log = log.display().to_string();
    let (container, uid, outbound, inbound, port) = match pod.spec.sidecar() {
        Some("linkerd-proxy") => (
            "linkerd-proxy",
            LINKERD_PROXY_UID,
            "127.0.0.1:4140",
            "4143",
            4143,
        ),
        Some("kuma-sidecar") => ("kuma-sidecar", KUMA_PROXY_UID, "15001", "15006", 15006),
        Some("envoy") => ("envoy", OSM_PROXY_UID, "15001", "15003", 15003),
        _ => ("istio-proxy", PROXY_UID, "15001", "15006", 15006),
    };
    let custom = pod.spec.sidecar_inbound_port.map(|p| p.to_string());
    let (inbound, port) = match (&custom, pod.spec.sidecar_inbound_port) {
        (Some(s), Some(p)) => (s.as_str(), p),
        _ => (inbound, port),
    };
    let handle = node.spawn(
        pod,
        Some(container),
        Some(uid_override.unwrap_or(uid)),
        &["sidecar", name, outbound, inbound, &log],
    )?;
    node.wait_listening(pod, port)?;
    Ok(handle)
}

/// Istio pods a and b, plain pod c.
pub fn istio_abc() -> Vec<PodSpec> {
    vec![
        PodSpec::istio("a"),
        PodSpec::istio("b"),
        PodSpec::plain("c"),
    ]
}

/// The `who=` an echo app answered with.
pub fn who(out: &str) -> String {
    out.lines()
        .find_map(|l| l.split(' ').find_map(|p| p.strip_prefix("who=")))
        .unwrap_or("")
        .to_string()
}

/// Waits for the sidecar log of `pod` to grow past `before` lines.
pub fn wait_sidecar_lines(f: &Fixture, pod: &str, before: usize, want: usize) -> Vec<String> {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let lines = f.sidecar_log(pod);
        if lines.len() >= before + want || Instant::now() > end {
            return lines[before.min(lines.len())..].to_vec();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The kernel counters from the agent's latest debug line.
pub fn counters(agent: &mut Agent) -> BTreeMap<String, u64> {
    std::thread::sleep(Duration::from_millis(500));
    let log = agent.log();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("counters: "))
        .unwrap_or("");
    line.split("counters: ")
        .nth(1)
        .unwrap_or("")
        .split(' ')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.parse().unwrap_or(0)))
        .collect()
}

/// `load conns` from a's app to `target` for `ms`, 16 at a time: (connections, errors).
pub fn short_connection_load(f: &Fixture, target: &str, ms: u64) -> (u64, u64) {
    let out = f
        .app_run("a", &["load", "conns", target, "64", "16", &ms.to_string()])
        .unwrap();
    let field = |k: &str| -> u64 {
        out.split_whitespace()
            .find_map(|kv| kv.strip_prefix(k)?.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {out}"))
    };
    (field("count="), field("errors="))
}

/// With the mesh's iptables already in pods a and b (tcp_tw_reuse is turned on there):
/// their sidecars start, 1.5 s of short connections a → `target` through the rules
/// alone must all succeed (asserted), then the agent starts, stops and starts again
/// under 6 s of the same load, which must make connections and fail none (asserted);
/// the agent is stopped again at the end.
pub fn assert_start_stop_restart_fail_no_connection(f: &Fixture, target: &str) {
    let (n, errors) = start_stop_restart_under_load(f, target);
    assert!(n > 0, "connections made");
    assert_eq!(
        errors, 0,
        "failed connections across agent start/stop/restart ({n} made)"
    );
}

/// [`assert_start_stop_restart_fail_no_connection`]'s load: (connections, errors).
fn start_stop_restart_under_load(f: &Fixture, target: &str) -> (u64, u64) {
    for p in ["a", "b"] {
        crate::proc::run(std::process::Command::new("ip").args([
            "netns",
            "exec",
            &f.pod(p).netns,
            "sysctl",
            "-qw",
            "net.ipv4.tcp_tw_reuse=1",
        ]))
        .unwrap();
    }
    f.start_sidecars();
    // The rules alone first: the conntrack entries REDIRECT leaves are what a starting
    // agent meets.
    let (n, errors) = short_connection_load(f, target, 1500);
    assert!(
        n > 0 && errors == 0,
        "the mesh's rules alone: {n} connections, {errors} errors"
    );
    std::thread::scope(|s| {
        let load = s.spawn(|| short_connection_load(f, target, 6000));
        let started = Instant::now();
        let at = |secs: f64| {
            let until = Duration::from_secs_f64(secs);
            if let Some(wait) = until.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        };
        at(1.0);
        let agent = f.start_agent(&[]);
        at(2.5);
        drop(agent);
        at(3.5);
        let agent = f.start_agent(&[]);
        let result = load.join().unwrap();
        drop(agent);
        result
    })
}

/// Asserts that the bypass ledger reads 0 for every pod: no inbound connection reached
/// a meshed app without its sidecar.
pub fn assert_no_bypass(agent: &mut Agent) {
    // The ledger is published once per interval.
    std::thread::sleep(Duration::from_millis(500));
    let (_, body) = agent.http_get("/metrics").expect("/metrics");
    let samples: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with("merbridge_edge_inbound_bypassed_total{"))
        .collect();
    assert!(!samples.is_empty(), "no bypass ledger in /metrics:\n{body}");
    for s in samples {
        assert!(s.ends_with(" 0"), "the bypass ledger: {s}");
    }
}

/// Our programs attached at or below `path` (bpftool cgroup tree).
pub fn programs_attached_below(path: &std::path::Path) -> String {
    let out = Command::new("bpftool")
        .args(["cgroup", "tree", path.to_str().unwrap()])
        .output()
        .expect("bpftool");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("mb_"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// a → b:8080 goes app → sidecar a (outbound, original b:8080) → sidecar b (inbound,
/// original b:8080) → b's app; a → plain c goes through sidecar a only; loopback in a
/// is untouched.
pub fn assert_outbound_ipv4_through_both_sidecars(f: &Fixture) {
    let (a, b, c) = (f.pod("a").clone(), f.pod("b").clone(), f.pod("c").clone());

    let out = f.client("a", &format!("{}:8080", b.ip4), &[]);
    assert_eq!(who(&out), "b-app", "{out}");
    let la = wait_sidecar_lines(f, "a", 0, 1);
    assert_eq!(la.len(), 1, "sidecar a saw one connection: {la:?}");
    assert!(la[0].contains("listener=outbound"), "{la:?}");
    assert!(
        la[0].contains(&format!("orig={}:8080", b.ip4)),
        "original destination: {la:?}"
    );
    // The redirect target is the pod's own IP, so the tuple names the pod.
    assert!(
        la[0].contains(&format!("peer={}:", a.ip4))
            || la[0].contains(&format!("peer=[::ffff:{}]:", a.ip4)),
        "{la:?}"
    );
    let lb = wait_sidecar_lines(f, "b", 0, 1);
    assert_eq!(lb.len(), 1, "sidecar b saw one connection: {lb:?}");
    assert!(lb[0].contains("listener=inbound"), "{lb:?}");
    assert!(lb[0].contains(&format!("orig={}:8080", b.ip4)), "{lb:?}");

    // A plain pod as the destination: outbound through sidecar a, no inbound sidecar.
    let out = f.client("a", &format!("{}:8080", c.ip4), &[]);
    assert_eq!(who(&out), "c-app");
    let la = wait_sidecar_lines(f, "a", 1, 1);
    assert!(
        la.len() == 1 && la[0].contains(&format!("orig={}:8080", c.ip4)),
        "{la:?}"
    );
    assert_eq!(f.sidecar_log("b").len(), 1, "sidecar b is not involved");
    // Loopback inside the pod is never redirected.
    let out = f.client("a", "127.0.0.1:8080", &[]);
    assert_eq!(who(&out), "a-app");
    assert_eq!(f.sidecar_log("a").len(), 2);
}

/// Nothing of the agent is attached below the node's cgroup root (waiting up to 3 s:
/// link release after a kill is asynchronous), and a → b:8080 reaches b's app directly,
/// past sidecar a.
pub fn assert_detached_and_direct(f: &Fixture) {
    let end = Instant::now() + Duration::from_secs(3);
    while !programs_attached_below(&f.node.cgroup_root).is_empty() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    let b = f.pod("b").clone();
    assert_eq!(
        programs_attached_below(&f.node.cgroup_root),
        "",
        "nothing of the agent stays attached"
    );
    let before = f.sidecar_log("a").len();
    assert_eq!(
        who(&f.client("a", &format!("{}:8080", b.ip4), &[])),
        "b-app"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        f.sidecar_log("a").len(),
        before,
        "traffic flows directly again"
    );
}
