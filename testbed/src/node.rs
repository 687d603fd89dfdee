//! The test node: a bridge in its own network namespace, pods around it.
use std::{
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::proc::{Guarded, Placement, ip, place};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// What a pod should look like.
#[derive(Clone, Debug, Default)]
pub struct PodSpec {
    /// Pod name (namespace is `default`).
    pub name: String,
    /// Container names; a container named like a mesh's sidecar makes it meshed.
    pub containers: Vec<String>,
    /// Pod annotations.
    pub annotations: Vec<(String, String)>,
    /// Pod labels.
    pub labels: Vec<(String, String)>,
    /// The mesh's init container, as its injector writes it: name and arguments.
    pub init: Option<(String, Vec<String>)>,
    /// The port the sidecar stand-in's inbound listener uses, when not its mesh's.
    pub sidecar_inbound_port: Option<u16>,
}

impl PodSpec {
    /// A pod of `app` and the mesh's `sidecar` container.
    fn injected(name: &str, sidecar: &str) -> Self {
        Self {
            name: name.into(),
            containers: vec!["app".into(), sidecar.into()],
            ..Default::default()
        }
    }

    /// An Istio-injected pod: `app` plus `istio-proxy`.
    pub fn istio(name: &str) -> Self {
        Self::injected(name, "istio-proxy").annotate(
            "sidecar.istio.io/status",
            "{\"containers\":[\"istio-proxy\"]}",
        )
    }

    /// A Linkerd-injected pod: `app` plus `linkerd-proxy`.
    pub fn linkerd(name: &str) -> Self {
        Self::injected(name, "linkerd-proxy")
    }

    /// A Kuma-injected pod: `app` plus `kuma-sidecar`.
    pub fn kuma(name: &str) -> Self {
        Self::injected(name, "kuma-sidecar")
    }

    /// An OSM-injected pod: `app` plus `envoy`, labelled with its proxy's uuid.
    pub fn osm(name: &str) -> Self {
        Self {
            labels: vec![(
                "osm-proxy-uuid".into(),
                "8fd6b6c9-5a80-4d5b-8a3c-1e0f3c7a9b21".into(),
            )],
            ..Self::injected(name, "envoy")
        }
    }

    /// The sidecar container's name, when the pod has one of the meshes'.
    pub fn sidecar(&self) -> Option<&str> {
        self.containers.iter().map(String::as_str).find(|c| {
            matches!(
                *c,
                "istio-proxy" | "linkerd-proxy" | "kuma-sidecar" | "envoy"
            )
        })
    }

    /// A pod without a sidecar.
    pub fn plain(name: &str) -> Self {
        Self {
            name: name.into(),
            containers: vec!["app".into()],
            ..Default::default()
        }
    }

    /// Adds an annotation.
    pub fn annotate(mut self, key: &str, value: &str) -> Self {
        self.annotations.push((key.into(), value.into()));
        self
    }

    /// Gives the pod the mesh's init container `name` with `args`.
    pub fn init_container(mut self, name: &str, args: &[&str]) -> Self {
        self.init = Some((name.into(), args.iter().map(|a| a.to_string()).collect()));
        self
    }

    /// Has the sidecar stand-in listen for inbound connections on `port`.
    pub fn sidecar_inbound_port(mut self, port: u16) -> Self {
        self.sidecar_inbound_port = Some(port);
        self
    }
}

/// A container: its runtime id and cgroup.
#[derive(Clone, Debug)]
pub struct Container {
    /// Container name.
    pub name: String,
    /// Runtime id (64 hex digits, as containerd makes them).
    pub id: String,
    /// Its cgroup directory.
    pub cgroup: PathBuf,
}

/// A pod on the test node.
#[derive(Clone, Debug)]
pub struct Pod {
    /// What it was made from.
    pub spec: PodSpec,
    /// Kubernetes uid.
    pub uid: String,
    /// Network namespace name.
    pub netns: String,
    /// IPv4 address.
    pub ip4: Ipv4Addr,
    /// IPv6 address.
    pub ip6: Ipv6Addr,
    /// Containers.
    pub containers: Vec<Container>,
}

impl Pod {
    /// Where a process runs in this pod: its network namespace, the cgroup of
    /// `container` (none: the namespace only), as `uid` (none: as the caller).
    pub fn placement(&self, container: Option<&str>, uid: Option<u32>) -> Placement {
        Placement {
            netns: Some(self.netns.clone()),
            cgroup: container.map(|c| self.container(c).cgroup.clone()),
            uid,
        }
    }

    /// The container called `name`.
    pub fn container(&self, name: &str) -> &Container {
        self.containers
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("pod {} has no container {name}", self.spec.name))
    }

    /// The pod-level cgroup directory, parent of every container cgroup of the pod.
    pub fn cgroup(&self) -> &Path {
        self.containers[0]
            .cgroup
            .parent()
            .expect("a container cgroup has a parent")
    }
}

/// Another node, as [`Node::other_node`] makes it.
#[derive(Clone, Debug)]
pub struct RemoteNode {
    /// Where its processes run.
    pub placement: Placement,
    /// Its IPv4 address.
    pub ip4: Ipv4Addr,
    /// Its IPv6 address.
    pub ip6: Ipv6Addr,
}

/// The test node. Dropping it kills its processes and removes its namespaces and cgroups.
pub struct Node {
    /// Unique short tag in every name this node makes.
    pub tag: String,
    /// The cgroup the agent attaches to; pods' cgroups are below it in kubelet layout.
    pub cgroup_root: PathBuf,
    /// Third octet of 10.231.x.0/24 and fourth group of fd00:231:0:x::/64.
    pub subnet: u8,
    /// The stand-in helper binary.
    pub helper: PathBuf,
    /// Pods made so far.
    pub pods: Vec<Pod>,
    /// A bpffs of the node's own, for the agent's pins (`--bpffs`); unmounted with it.
    pub bpffs: PathBuf,
    node_ns: String,
    netns: Vec<String>,
    cgroups: Vec<PathBuf>,
    procs: std::sync::Mutex<Vec<Guarded>>,
    scratch: PathBuf,
}

/// The cgroup2 mount point of this machine.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo")?;
    for line in text.lines() {
        if let Some((left, right)) = line.split_once(" - ")
            && right.split_whitespace().next() == Some("cgroup2")
            && let Some(mp) = left.split_whitespace().nth(4)
        {
            return Ok(PathBuf::from(mp));
        }
    }
    bail!("no cgroup2 mount")
}

/// Why the real-kernel tests cannot run here, if they cannot.
pub fn missing_prerequisite() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (creates network namespaces, cgroups and BPF programs)".into());
    }
    if cgroup2_mount().is_err() {
        return Some("needs a cgroup v2 mount".into());
    }
    if Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        return Some("needs iproute2 (`ip`)".into());
    }
    None
}

impl Node {
    /// Makes an empty node: a bridge in its own namespace and a cgroup for the agent.
    pub fn new(helper: &Path) -> Result<Self> {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{:x}{n}", std::process::id() % 0xfff);
        let subnet = ((std::process::id() * 7 + n) % 200 + 20) as u8;
        let cgroup_root = cgroup2_mount()?.join(format!("mbe-test-{tag}"));
        let scratch = std::env::temp_dir().join(format!("mbe-test-{tag}"));
        fs::create_dir_all(&scratch)?;
        let bpffs = scratch.join("bpffs");
        fs::create_dir_all(&bpffs)?;
        crate::proc::run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&bpffs))
            .context("mounting a bpffs for the node")?;
        let mut node = Self {
            tag: tag.clone(),
            cgroup_root: cgroup_root.clone(),
            subnet,
            helper: helper.to_path_buf(),
            pods: vec![],
            bpffs,
            node_ns: format!("mbe-{tag}-node"),
            netns: vec![],
            cgroups: vec![],
            procs: std::sync::Mutex::new(vec![]),
            scratch,
        };
        fs::create_dir(&cgroup_root)
            .with_context(|| format!("creating cgroup {}", cgroup_root.display()))?;
        node.cgroups.push(cgroup_root);
        let ns = node.node_ns.clone();
        ip(&["netns", "add", &ns])?;
        node.netns.push(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&["-n", &ns, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &ns, "link", "set", "br0", "up"])?;
        // The node's host side: the bridge is the pods' gateway, and it routes.
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/24", node.gateway4()),
            "dev",
            "br0",
        ])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/64", node.gateway6()),
            "dev",
            "br0",
            "nodad",
        ])?;
        for key in ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"] {
            crate::proc::run(Command::new("ip").args([
                "netns",
                "exec",
                &ns,
                "sysctl",
                "-qw",
                &format!("{key}=1"),
            ]))?;
        }
        Ok(node)
    }

    /// The pods' IPv4 gateway: the node's bridge.
    pub fn gateway4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 231, self.subnet, 1)
    }

    /// The pods' IPv6 gateway: the node's bridge.
    pub fn gateway6(&self) -> Ipv6Addr {
        format!("fd00:231:0:{:x}::1", self.subnet)
            .parse()
            .expect("an IPv6 address")
    }

    /// The node's own network namespace (its host side: bridge, routes, FORWARD).
    pub fn host_netns(&self) -> &str {
        &self.node_ns
    }

    /// A process on the node itself: its network namespace and its cgroup root (in no
    /// pod's cgroup): a host process, the kubelet, an ingress on host network.
    pub fn host_process(&self) -> Placement {
        Placement {
            netns: Some(self.node_ns.clone()),
            cgroup: Some(self.cgroup_root.clone()),
            uid: None,
        }
    }

    /// Another node: a network namespace routed to this node's pods through the host
    /// (10.232.x.2, fd00:232:0:x::2), with its own cgroup outside this node's cgroup
    /// root, so nothing of this node's agent runs for its processes. Made once.
    pub fn other_node(&mut self) -> Result<RemoteNode> {
        let netns = format!("mbe-{}-remote", self.tag);
        let ip4 = Ipv4Addr::new(10, 232, self.subnet, 2);
        let ip6: Ipv6Addr = format!("fd00:232:0:{:x}::2", self.subnet).parse()?;
        let cgroup = self
            .cgroup_root
            .with_file_name(format!("mbe-test-{}-remote", self.tag));
        if !self.netns.contains(&netns) {
            ip(&["netns", "add", &netns])?;
            self.netns.push(netns.clone());
            let (near, far) = (format!("mb{}r0", self.tag), format!("mb{}r1", self.tag));
            ip(&["link", "add", &near, "type", "veth", "peer", "name", &far])?;
            ip(&["link", "set", &near, "netns", &self.node_ns])?;
            ip(&["link", "set", &far, "netns", &netns])?;
            let sub = self.subnet;
            let ns = self.node_ns.clone();
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.232.{sub}.1/24"),
                "dev",
                &near,
            ])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("fd00:232:0:{sub:x}::1/64"),
                "dev",
                &near,
                "nodad",
            ])?;
            ip(&["-n", &ns, "link", "set", &near, "up"])?;
            ip(&["-n", &netns, "link", "set", &far, "name", "eth0"])?;
            let gateway6: Ipv6Addr = format!("fd00:232:0:{sub:x}::1").parse()?;
            configure_eth0(&netns, ip4, ip6, Ipv4Addr::new(10, 232, sub, 1), gateway6)?;
            self.mkdir_cgroup(&cgroup)?;
        }
        Ok(RemoteNode {
            placement: Placement {
                netns: Some(netns),
                cgroup: Some(cgroup),
                uid: None,
            },
            ip4,
            ip6,
        })
    }

    /// A scratch directory removed with the node.
    pub fn scratch(&self) -> &Path {
        &self.scratch
    }

    /// Creates the cgroup `path` and any missing parents; all are removed with the node.
    pub fn mkdir_cgroup(&mut self, path: &Path) -> Result<()> {
        let mut missing = vec![];
        let mut p = path.to_path_buf();
        while !p.exists() {
            missing.push(p.clone());
            p = p
                .parent()
                .context("cgroup path has no parent")?
                .to_path_buf();
        }
        for dir in missing.into_iter().rev() {
            fs::create_dir(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
            self.cgroups.push(dir);
        }
        Ok(())
    }

    /// Adds a pod: its namespace on the bridge with the next addresses, and a cgroup
    /// per container in the kubelet's cgroupfs layout (burstable QoS).
    pub fn add_pod(&mut self, spec: PodSpec) -> Result<Pod> {
        let index = self.pods.len() as u8 + 2;
        let netns = format!("mbe-{}-{}", self.tag, spec.name);
        ip(&["netns", "add", &netns])?;
        self.netns.push(netns.clone());
        let host_end = format!("mb{}p{index}", self.tag);
        let pod_end = format!("mb{}q{index}", self.tag);
        ip(&[
            "link", "add", &host_end, "type", "veth", "peer", "name", &pod_end,
        ])?;
        ip(&["link", "set", &host_end, "netns", &self.node_ns])?;
        ip(&["link", "set", &pod_end, "netns", &netns])?;
        ip(&[
            "-n",
            &self.node_ns,
            "link",
            "set",
            &host_end,
            "master",
            "br0",
            "up",
        ])?;
        ip(&["-n", &netns, "link", "set", &pod_end, "name", "eth0"])?;
        let ip4 = Ipv4Addr::new(10, 231, self.subnet, index);
        let ip6: Ipv6Addr = format!("fd00:231:0:{:x}::{:x}", self.subnet, index).parse()?;
        configure_eth0(&netns, ip4, ip6, self.gateway4(), self.gateway6())?;
        let uid = format!(
            "{:08x}-{:04x}-4000-8000-{:012x}",
            std::process::id(),
            index,
            u64::from(self.subnet)
        );
        let pod_dir = self
            .cgroup_root
            .join(format!("kubepods/burstable/pod{uid}"));
        let mut containers = vec![];
        for (i, name) in spec.containers.iter().enumerate() {
            let id = format!("{:0>56}{:02x}{:06x}", self.tag, index, i);
            let cgroup = pod_dir.join(&id);
            self.mkdir_cgroup(&cgroup)?;
            containers.push(Container {
                name: name.clone(),
                id,
                cgroup,
            });
        }
        let pod = Pod {
            spec,
            uid,
            netns,
            ip4,
            ip6,
            containers,
        };
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// Adds a container cgroup to a pod (a restart under a new id).
    pub fn restart_container(&mut self, pod: &str, container: &str) -> Result<Pod> {
        let i = self
            .pods
            .iter()
            .position(|p| p.spec.name == pod)
            .context("no such pod")?;
        let c = self.pods[i]
            .containers
            .iter()
            .position(|c| c.name == container)
            .context("no such container")?;
        let old = self.pods[i].containers[c].cgroup.clone();
        let id = format!("{:0>56}{:08x}", "r", rand_u32());
        let new = old.with_file_name(&id);
        self.mkdir_cgroup(&new)?;
        self.pods[i].containers[c] = Container {
            name: container.into(),
            id,
            cgroup: new,
        };
        Ok(self.pods[i].clone())
    }

    /// Starts the stand-in helper with `args`, placed in a pod's container (or just in
    /// the pod's network namespace when `container` is None), as `uid`.
    pub fn spawn(
        &self,
        pod: &Pod,
        container: Option<&str>,
        uid: Option<u32>,
        args: &[&str],
    ) -> Result<usize> {
        self.spawn_placed(&pod.placement(container, uid), args)
    }

    /// Starts the helper at an explicit placement; returns a handle index.
    pub fn spawn_placed(&self, placement: &Placement, args: &[&str]) -> Result<usize> {
        let mut cmd = self.helper_at(placement, args)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting helper {args:?}"))?;
        let mut procs = self.procs.lock().unwrap_or_else(|e| e.into_inner());
        procs.push(Guarded::new(child, format!("{args:?}")));
        Ok(procs.len() - 1)
    }

    /// Runs the helper to completion at a placement and returns its stdout.
    pub fn run_in(
        &self,
        pod: &Pod,
        container: Option<&str>,
        uid: Option<u32>,
        args: &[&str],
    ) -> Result<String> {
        self.run_placed(&pod.placement(container, uid), args)
    }

    /// Runs the helper to completion at an explicit placement.
    pub fn run_placed(&self, placement: &Placement, args: &[&str]) -> Result<String> {
        crate::proc::run(&mut self.helper_at(placement, args)?)
    }

    /// The helper with `args`, to run at `placement`.
    fn helper_at(&self, placement: &Placement, args: &[&str]) -> Result<Command> {
        let mut cmd = Command::new(&self.helper);
        cmd.args(args);
        place(&mut cmd, placement)?;
        Ok(cmd)
    }

    /// A placement in the node's cgroup root (not a pod's) inside a pod's namespace:
    /// a host process as far as the datapath can tell.
    pub fn host_placement(&self, pod: &Pod) -> Placement {
        Placement {
            netns: Some(pod.netns.clone()),
            cgroup: Some(self.cgroup_root.clone()),
            uid: None,
        }
    }

    /// Stops a spawned helper.
    pub fn stop(&self, handle: usize) {
        let mut procs = self.procs.lock().unwrap_or_else(|e| e.into_inner());
        let p = &mut procs[handle];
        let _ = p.child.kill();
        let _ = p.child.wait();
    }

    /// Waits until something listens on `port` (TCP) inside the pod.
    pub fn wait_listening(&self, pod: &Pod, port: u16) -> Result<()> {
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            let out = crate::proc::run(Command::new("ip").args([
                "netns",
                "exec",
                &pod.netns,
                "ss",
                "-Hltn",
                &format!("sport = :{port}"),
            ]))?;
            if !out.trim().is_empty() {
                return Ok(());
            }
            if Instant::now() > end {
                bail!("nothing listens on port {port} in pod {}", pod.spec.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Removes a container's cgroup (a container exit); its processes must be gone.
    pub fn remove_cgroup(&mut self, path: &Path) -> Result<()> {
        remove_cgroup(path)?;
        self.cgroups.retain(|c| c != path);
        Ok(())
    }
}

/// Gives `eth0` of namespace `netns` its addresses and default routes, and brings it
/// and `lo` up.
fn configure_eth0(
    netns: &str,
    ip4: Ipv4Addr,
    ip6: Ipv6Addr,
    gateway4: Ipv4Addr,
    gateway6: Ipv6Addr,
) -> Result<()> {
    let (ip4, ip6) = (format!("{ip4}/24"), format!("{ip6}/64"));
    ip(&["-n", netns, "addr", "add", &ip4, "dev", "eth0"])?;
    ip(&["-n", netns, "addr", "add", &ip6, "dev", "eth0", "nodad"])?;
    ip(&["-n", netns, "link", "set", "eth0", "up"])?;
    ip(&["-n", netns, "link", "set", "lo", "up"])?;
    let (gateway4, gateway6) = (gateway4.to_string(), gateway6.to_string());
    ip(&["-n", netns, "route", "add", "default", "via", &gateway4])?;
    ip(&[
        "-n", netns, "-6", "route", "add", "default", "via", &gateway6,
    ])?;
    Ok(())
}

fn rand_u32() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    t.subsec_nanos() ^ std::process::id()
}

fn remove_cgroup(path: &Path) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                if Instant::now() > end {
                    bail!("removing cgroup {}: {e}", path.display());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Node {
    /// Leaves everything in place (for poking at) and says how to remove it by hand.
    pub fn keep(self) -> String {
        let mut how = String::new();
        let pids: Vec<String> = self
            .procs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|p| p.child.id().to_string())
            .collect();
        how.push_str(&format!("kill {}\n", pids.join(" ")));
        for ns in self.netns.iter().rev() {
            how.push_str(&format!("ip netns del {ns}\n"));
        }
        for cg in self.cgroups.iter().rev() {
            how.push_str(&format!("rmdir {}\n", cg.display()));
        }
        how.push_str(&format!("umount {}\n", self.bpffs.display()));
        how.push_str(&format!("rm -r {}\n", self.scratch.display()));
        std::mem::forget(self);
        how
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let procs = self.procs.get_mut().unwrap_or_else(|e| e.into_inner());
        for p in procs.iter_mut() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        procs.clear();
        for ns in self.netns.drain(..).rev() {
            let _ = ip(&["netns", "del", &ns]);
        }
        for cg in self.cgroups.drain(..).rev() {
            if let Err(e) = remove_cgroup(&cg) {
                eprintln!("testbed cleanup: {e:#}");
            }
        }
        // Pins in it are released with the mount.
        let _ = Command::new("umount").arg("-l").arg(&self.bpffs).status();
        let _ = fs::remove_dir_all(&self.scratch);
    }
}
