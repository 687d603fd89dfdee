//! The test node inside the VM, as testbed's `Node` builds it on a host: each pod a
//! network namespace (pinned under /var/run/netns, as containerd pins them) with a veth
//! pair to the node (routed: Debian builds the bridge as a module, veth alone is
//! enough) and a cgroup per container in the kubelet's cgroupfs layout; processes
//! placed in a pod by setns, cgroup.procs and setuid, or left on the host. Pods have an
//! IPv4 and an IPv6 address; their spec (containers, init containers, annotations,
//! labels) is a pod template, as an injector writes it. Another node is one more
//! namespace routed the same way (IPv4 only), with a cgroup outside the node's.
use std::{
    fs,
    io::Write,
    net::{Ipv4Addr, Ipv6Addr},
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::{fs::PermissionsExt, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use merbridge_edge_standins::become_uid;
use serde_json::{Value, json};

use crate::{netlink::Netlink, sys};

/// The node's own address (on lo), the pods' gateway.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 1);
/// The link-local address of the node's end of every pod's veth: the pods' IPv6
/// default gateway.
pub const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// Where the pods' network namespaces are pinned as files (the agent's default).
pub const NETNS_DIR: &str = "/var/run/netns";
/// Another node's address (10.232.0.0/16 is another node's pod range).
pub const REMOTE_IP: Ipv4Addr = Ipv4Addr::new(10, 232, 0, 2);
/// The environment variable that selects a stand-in role in a child.
pub const ROLE_ENV: &str = "MBE_VM_TEST_ROLE";

/// A container: name, runtime id, cgroup.
pub struct Container {
    /// Name, like `app` or `istio-proxy`.
    pub name: String,
    /// Runtime id (64 hex digits).
    pub id: String,
    /// Its cgroup directory.
    pub cgroup: PathBuf,
}

/// How a meshed pod's sidecar stand-in runs, as its mesh runs the proxy: container,
/// uid and listener addresses.
#[derive(Clone, Copy, Debug)]
pub struct Sidecar {
    /// The mesh (`istio`, `linkerd`, `kuma`, `osm`).
    pub mesh: &'static str,
    /// The sidecar container's name.
    pub container: &'static str,
    /// The proxy's uid.
    pub uid: u32,
    /// Where its outbound listener binds (`[::]:15001`, Linkerd's `127.0.0.1:4140`).
    pub outbound: &'static str,
    /// Where its inbound listener binds.
    pub inbound: &'static str,
}

impl Sidecar {
    /// The port of an address of this sidecar.
    pub fn port(addr: &str) -> u16 {
        addr.rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0)
    }
}

/// A pod on the node.
pub struct Pod {
    /// Name (namespace `default`).
    pub name: String,
    /// Kubernetes uid.
    pub uid: String,
    /// IPv4 address.
    pub ip: Ipv4Addr,
    /// IPv6 address.
    pub ip6: Ipv6Addr,
    /// Its network namespace.
    pub netns: OwnedFd,
    /// The same namespace as a file under [`NETNS_DIR`].
    pub netns_file: PathBuf,
    /// Containers.
    pub containers: Vec<Container>,
    /// `metadata` (annotations, labels) and `spec` (containers, init containers) as an
    /// injector wrote them.
    pub template: Value,
    /// Its sidecar, if meshed.
    pub sidecar: Option<Sidecar>,
}

/// A pod template with `containers` and `annotations` and nothing else.
pub fn simple_template(containers: &[&str], annotations: &[(&str, &str)]) -> Value {
    let annotations: serde_json::Map<String, Value> = annotations
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    let containers: Vec<Value> = containers
        .iter()
        .map(|c| json!({"name": c, "image": format!("example/{c}:1")}))
        .collect();
    json!({"metadata": {"annotations": annotations}, "spec": {"containers": containers}})
}

/// Whether init container `c` of a pod spec is a native sidecar (runs beside the app).
fn native_sidecar(c: &Value) -> bool {
    c["restartPolicy"] == "Always"
}

/// The containers of a pod template that run (init containers only if native sidecars).
fn running_containers(template: &Value) -> Vec<String> {
    let spec = &template["spec"];
    let init = spec["initContainers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let main = spec["containers"].as_array().cloned().unwrap_or_default();
    init.iter()
        .filter(|c| native_sidecar(c))
        .chain(main.iter())
        .filter_map(|c| c["name"].as_str().map(String::from))
        .collect()
}

impl Pod {
    /// The cgroup of container `name`.
    pub fn cgroup(&self, name: &str) -> Result<&Path> {
        self.containers
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.cgroup.as_path())
            .with_context(|| format!("pod {} has no container {name}", self.name))
    }
}

/// Another node, as seen from this one: a network namespace routed through the node
/// like a pod's (but not a pod: in no pods file, not pinned under [`NETNS_DIR`]), its
/// processes in a cgroup outside the node's cgroup root, so none of the agent's
/// cgroup hooks run for them.
pub struct Remote {
    /// Its address.
    pub ip: Ipv4Addr,
    /// Its network namespace.
    pub netns: OwnedFd,
    /// The cgroup its processes run in.
    pub cgroup: PathBuf,
}

/// The node: its cgroup root (the agent attaches there), its pods and another node.
pub struct Node {
    /// The cgroup the agent attaches to.
    pub cgroup_root: PathBuf,
    /// The pods.
    pub pods: Vec<Pod>,
    /// Another node, once added ([`Node::add_remote`]).
    pub remote: Option<Remote>,
    root_nl: Netlink,
}

impl Node {
    /// Sets up the node's namespace: lo up, the gateway address, forwarding on (IPv4
    /// and IPv6).
    pub fn new(cgroup_root: &Path) -> Result<Self> {
        fs::create_dir_all(cgroup_root)
            .with_context(|| format!("creating cgroup {}", cgroup_root.display()))?;
        let mut root_nl = Netlink::open()?;
        root_nl.link_up("lo")?;
        root_nl.add_addr("lo", GATEWAY.into(), 32)?;
        sys::write("/proc/sys/net/ipv4/ip_forward", "1")?;
        sys::write("/proc/sys/net/ipv6/conf/all/forwarding", "1")?;
        Ok(Self {
            cgroup_root: cgroup_root.to_path_buf(),
            pods: vec![],
            remote: None,
            root_nl,
        })
    }

    /// Adds pod `name` made from `template` (see [`Pod::template`]) at the next
    /// addresses (10.231.0.2 and fd00:231::2, .3 and ::3, …), a cgroup for each
    /// container that runs.
    pub fn add_pod(
        &mut self,
        name: &str,
        template: Value,
        sidecar: Option<Sidecar>,
    ) -> Result<&Pod> {
        let index = self.pods.len() + 2;
        let ip = Ipv4Addr::new(10, 231, 0, index as u8);
        let ip6 = Ipv6Addr::new(0xfd00, 0x231, 0, 0, 0, 0, 0, index as u16);
        let netns = self
            .routed_netns(name, ip, Some(ip6))
            .with_context(|| format!("network of pod {name}"))?;
        let containers = running_containers(&template);
        if let Some(s) = &sidecar
            && !containers.iter().any(|c| c == s.container)
        {
            bail!("pod {name} has no running container {}", s.container);
        }
        let netns_file = Path::new(NETNS_DIR).join(name);
        sys::pin_netns(&netns, &netns_file)?;
        let uid = format!("00000000-0000-4000-8000-{index:012x}");
        let pod_dir = self
            .cgroup_root
            .join(format!("kubepods/burstable/pod{uid}"));
        let mut list = vec![];
        for (i, c) in containers.iter().enumerate() {
            let id = format!("{:056x}{index:04x}{i:04x}", 0xabcu32);
            let cgroup = pod_dir.join(&id);
            fs::create_dir_all(&cgroup)
                .with_context(|| format!("creating cgroup {}", cgroup.display()))?;
            list.push(Container {
                name: c.to_string(),
                id,
                cgroup,
            });
        }
        self.pods.push(Pod {
            name: name.into(),
            uid,
            ip,
            ip6,
            netns,
            netns_file,
            containers: list,
            template,
            sidecar,
        });
        Ok(self.pods.last().unwrap())
    }

    /// A new network namespace at `ip`/32 (and `ip6`/128) with a veth pair to the node
    /// (`veth-NAME` on the node, `eth0` inside) and routes both ways through the node
    /// (IPv6 through [`GATEWAY6`] on the node's end).
    fn routed_netns(&mut self, name: &str, ip: Ipv4Addr, ip6: Option<Ipv6Addr>) -> Result<OwnedFd> {
        let netns = sys::new_netns()?;
        let host_end = format!("veth-{name}");
        self.root_nl.add_veth(&host_end, "eth0", &netns)?;
        self.root_nl.link_up(&host_end)?;
        self.root_nl.add_route(ip.into(), 32, None, &host_end)?;
        if let Some(ip6) = ip6 {
            self.root_nl.add_addr(&host_end, GATEWAY6.into(), 64)?;
            self.root_nl.add_route(ip6.into(), 128, None, &host_end)?;
        }
        sys::in_netns(&netns, || {
            let mut nl = Netlink::open()?;
            nl.link_up("lo")?;
            nl.link_up("eth0")?;
            nl.add_addr("eth0", ip.into(), 32)?;
            nl.add_route(
                Ipv4Addr::UNSPECIFIED.into(),
                0,
                Some(GATEWAY.into()),
                "eth0",
            )?;
            if let Some(ip6) = ip6 {
                nl.add_addr("eth0", ip6.into(), 128)?;
                nl.add_route(
                    Ipv6Addr::UNSPECIFIED.into(),
                    0,
                    Some(GATEWAY6.into()),
                    "eth0",
                )?;
            }
            Ok(())
        })?;
        Ok(netns)
    }

    /// Adds another node ([`Remote`]) at [`REMOTE_IP`], its processes in `cgroup`
    /// (which must lie outside the node's cgroup root).
    pub fn add_remote(&mut self, cgroup: &Path) -> Result<()> {
        if cgroup.starts_with(&self.cgroup_root) {
            bail!(
                "the other node's cgroup {} is inside the node's {}",
                cgroup.display(),
                self.cgroup_root.display()
            );
        }
        let netns = self
            .routed_netns("remote", REMOTE_IP, None)
            .context("network of the other node")?;
        fs::create_dir_all(cgroup)
            .with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        self.remote = Some(Remote {
            ip: REMOTE_IP,
            netns,
            cgroup: cgroup.to_path_buf(),
        });
        Ok(())
    }

    /// The pod called `name`.
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .expect("pod exists")
    }

    /// A command re-executing this driver in stand-in `role`, placed in `pod`'s
    /// namespace and container cgroup, as `uid`.
    pub fn stand_in(
        &self,
        pod: &str,
        container: &str,
        uid: u32,
        role: &str,
        args: &[&str],
    ) -> Result<Command> {
        let pod = self.pod(pod);
        placed(pod.cgroup(container)?, &pod.netns, Some(uid), role, args)
            .with_context(|| format!("placing {role} in {}/{container}", pod.name))
    }

    /// Starts a long-running stand-in and waits until its socket is `ready`.
    pub fn start(
        &self,
        pod: &str,
        container: &str,
        uid: u32,
        role: &str,
        args: &[&str],
        ready: Ready,
    ) -> Result<Child> {
        let child = self.spawn(pod, container, uid, role, args)?;
        wait_until_ready(child, &format!("{role} in pod {pod}"), ready)
    }

    /// Starts stand-in `role` in `pod`'s `container` as `uid`, its output discarded.
    fn spawn(
        &self,
        pod: &str,
        container: &str,
        uid: u32,
        role: &str,
        args: &[&str],
    ) -> Result<Child> {
        self.stand_in(pod, container, uid, role, args)?
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {role} in pod {pod}"))
    }

    /// Runs stand-in `role` with `args` in `pod`'s `container` as `uid` until it
    /// exits: its output, or its error output.
    pub fn run(
        &self,
        pod: &str,
        container: &str,
        uid: u32,
        role: &str,
        args: &[&str],
    ) -> Result<String, String> {
        let cmd = self
            .stand_in(pod, container, uid, role, args)
            .map_err(|e| format!("{e:#}"))?;
        run_client(cmd, pod, &args.join(" "))
    }

    /// Runs the client stand-in in `pod`'s app container as `uid`: its output, or
    /// its error output.
    pub fn client(
        &self,
        pod: &str,
        container: &str,
        uid: u32,
        target: &str,
        bytes: usize,
    ) -> Result<String, String> {
        let cmd = self
            .stand_in(pod, container, uid, "client", &[target, &bytes.to_string()])
            .map_err(|e| format!("{e:#}"))?;
        run_client(cmd, pod, target)
    }

    /// Runs the client stand-in as a host process: the VM's root network namespace
    /// and root cgroup (no pod's), as root.
    pub fn host_client(&self, target: &str, bytes: usize) -> Result<String, String> {
        let mut cmd = Command::new("/proc/self/exe");
        cmd.args([target, &bytes.to_string()])
            .env(ROLE_ENV, "client")
            .stdin(Stdio::null());
        run_client(cmd, "host", target)
    }

    /// Runs the client stand-in on the other node ([`Node::add_remote`]), as root,
    /// with `conns` connections at once.
    pub fn remote_client(
        &self,
        target: &str,
        bytes: usize,
        conns: usize,
    ) -> Result<String, String> {
        let remote = self.remote.as_ref().ok_or("the other node was not added")?;
        let cmd = placed(
            &remote.cgroup,
            &remote.netns,
            None,
            "client",
            &[target, &bytes.to_string(), &conns.to_string()],
        )
        .map_err(|e| format!("{e:#}"))?;
        run_client(cmd, "the other node", target)
    }

    /// The pods as the kubelet's `/pods` lists them (v1 PodList), on node edge-1: each
    /// template with a name, uid, node and a running status (init containers
    /// completed, native sidecars running), both pod IPs.
    pub fn pod_list(&self) -> Value {
        let items: Vec<Value> = self.pods.iter().map(pod_json).collect();
        json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
    }
}

/// One pod of [`Node::pod_list`].
fn pod_json(p: &Pod) -> Value {
    let meta = &p.template["metadata"];
    let mut spec = p.template["spec"].clone();
    spec["nodeName"] = json!("edge-1");
    let id = |name: &str| {
        p.containers
            .iter()
            .find(|c| c.name == name)
            .map(|c| format!("containerd://{}", c.id))
    };
    let running = |c: &Value| {
        let name = c["name"].as_str().unwrap_or("");
        json!({
            "name": name, "ready": true, "restartCount": 0, "started": true,
            "image": c["image"].as_str().unwrap_or("example/x:1"), "imageID": "",
            "containerID": id(name).unwrap_or_default(),
            "state": {"running": {"startedAt": "2026-11-25T10:00:00Z"}}
        })
    };
    let completed = |(i, c): (usize, &Value)| {
        json!({
            "name": c["name"], "ready": true, "restartCount": 0,
            "image": c["image"].as_str().unwrap_or("example/x:1"), "imageID": "",
            "containerID": format!("containerd://{:056x}{:04x}{i:04x}", 0xdeadu32, p.ip.octets()[3]),
            "state": {"terminated": {"exitCode": 0, "reason": "Completed",
                "startedAt": "2026-11-25T09:59:58Z", "finishedAt": "2026-11-25T09:59:59Z"}}
        })
    };
    let statuses: Vec<Value> = spec["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(running)
        .collect();
    let init_statuses: Vec<Value> = spec["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, c)| {
            if native_sidecar(c) {
                running(c)
            } else {
                completed((i, c))
            }
        })
        .collect();
    let mut status = json!({
        "phase": "Running", "qosClass": "Burstable", "hostIP": GATEWAY.to_string(),
        "podIP": p.ip.to_string(),
        "podIPs": [{"ip": p.ip.to_string()}, {"ip": p.ip6.to_string()}],
        "containerStatuses": statuses
    });
    if !init_statuses.is_empty() {
        status["initContainerStatuses"] = json!(init_statuses);
    }
    json!({
        "metadata": {
            "name": p.name, "namespace": "default", "uid": p.uid,
            "annotations": meta.get("annotations").cloned().unwrap_or(json!({})),
            "labels": meta.get("labels").cloned().unwrap_or(json!({}))
        },
        "spec": spec,
        "status": status
    })
}

/// A command re-executing this driver in stand-in `role`, placed in `cgroup` and
/// network namespace `netns`, as `uid` (or as root).
fn placed(
    cgroup: &Path,
    netns: &OwnedFd,
    uid: Option<u32>,
    role: &str,
    args: &[&str],
) -> Result<Command> {
    let procs = fs::OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .with_context(|| format!("opening {}/cgroup.procs", cgroup.display()))?;
    let ns = netns.as_raw_fd();
    let mut cmd = Command::new("/proc/self/exe");
    cmd.args(args).env(ROLE_ENV, role).stdin(Stdio::null());
    // SAFETY: only async-signal-safe calls (write, setns, and setgroups, setgid, setuid in become_uid).
    unsafe {
        cmd.pre_exec(move || {
            (&procs).write_all(b"0")?;
            if libc::setns(ns, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            match uid {
                Some(uid) => become_uid(uid),
                None => Ok(()),
            }
        });
    }
    Ok(cmd)
}

/// Runs a client command: its output, or its error output.
fn run_client(mut cmd: Command, from: &str, target: &str) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("running the client: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!(
            "client {from} → {target} failed ({}): {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The socket a long-running stand-in is waited for.
#[derive(Clone, Copy, Debug)]
pub enum Ready {
    /// A TCP socket listening on this port.
    Listening(u16),
    /// A UDP socket bound to this port.
    Bound(u16),
}

/// Waits (30 s at most) until `child` (`who`, for errors) has its socket `ready`.
fn wait_until_ready(mut child: Child, who: &str, ready: Ready) -> Result<Child> {
    let (port, tables, state, state_name) = match ready {
        Ready::Listening(port) => (port, ["tcp", "tcp6"], "0A", "listening"),
        Ready::Bound(port) => (port, ["udp", "udp6"], "07", "bound"),
    };
    let end = Instant::now() + Duration::from_secs(30);
    while !bound(child.id(), port, &tables, state) {
        if let Ok(Some(s)) = child.try_wait() {
            bail!("{who} exited ({s}) before its socket on {port} was {state_name}");
        }
        if Instant::now() > end {
            bail!("{who} has no {state_name} socket on {port} after 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child)
}

/// Whether process `pid` sees a socket on local `port` in state `state` (hex, as in
/// /proc/net: `0A` listening TCP, `07` unconnected UDP) in one of `tables`.
fn bound(pid: u32, port: u16, tables: &[&str], state: &str) -> bool {
    let want = format!(":{port:04X}");
    tables.iter().any(|t| {
        let text = fs::read_to_string(format!("/proc/{pid}/net/{t}")).unwrap_or_default();
        text.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&want) && f[3] == state
        })
    })
}

/// Creates an empty log file any uid may append to (the sidecar runs as the proxy uid).
pub fn shared_log(path: &str) -> Result<()> {
    fs::write(path, "").with_context(|| format!("creating {path}"))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o666))
        .with_context(|| format!("chmod {path}"))
}
