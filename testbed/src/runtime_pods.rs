//! Test pods as real containers, made the way containerd's CRI plugin makes a pod: a
//! network namespace pinned at `/var/run/netns/cni-<uuid>`, the CNI bridge and
//! loopback plugins called on it with the CRI plugin's environment (the bridge in the
//! test node's own namespace, its host side), and each container run by containerd and
//! runc from a stand-in image written by the project's image writer (`mbe-image`), its
//! cgroup at `kubepods/burstable/pod<uid>/<container id>` below the node's cgroup root.
//! The [`Pod`]s handed out are read back from the runtime (each task's cgroup from
//! /proc, the addresses from the CNI result), so the PodList built from them names what
//! containerd really made. Tear-down removes it all and says what it found left.
use std::{
    fs,
    io::Write,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::{
    containerd::{Containerd, cgroup_hierarchies},
    node::{Container, Node, Pod, PodSpec, cgroup2_mount},
};

/// Where Debian's containernetworking-plugins keeps the plugins.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";

/// The static stand-in program (`mbe-standin`, built by `scripts/build-standin-image`
/// into the musl target directory) for this machine's architecture.
pub fn standin_binary() -> PathBuf {
    let triple = match std::env::consts::ARCH {
        "x86_64" => "x86_64-unknown-linux-musl",
        "aarch64" => "aarch64-unknown-linux-musl",
        other => panic!("no stand-in is built for {other}"),
    };
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../target/{triple}/dist/mbe-standin"))
}

/// The image writer (`target/release/mbe-image`, built by `scripts/build-image`).
pub fn image_writer() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/mbe-image")
}

/// Pods made by containerd on a test node.
pub struct RuntimePods {
    /// The private containerd running the containers (None once shut down).
    containerd: Option<Containerd>,
    /// The stand-in image's name, as imported.
    pub image: String,
    node_ns: String,
    cgroup_root: PathBuf,
    scratch: PathBuf,
    tag: String,
    subnet: u8,
    sandboxes: Vec<Sandbox>,
    containers: Vec<String>,
}

/// A pod sandbox: its network namespace and the CNI attachment made on it.
struct Sandbox {
    id: String,
    netns: String,
    name: String,
    uid: String,
}

impl RuntimePods {
    /// Starts a private containerd for `node`, writes the stand-in image with
    /// `mbe-image` and imports it.
    pub fn new(node: &Node) -> Result<Self> {
        let containerd = Containerd::start()?;
        let out = containerd.dir.join("standin-image");
        let tag = containerd.tag.clone();
        let arch = match std::env::consts::ARCH {
            "aarch64" => "arm64",
            _ => "amd64",
        };
        crate::proc::run(
            Command::new(image_writer())
                .arg("--binary")
                .arg(format!("{arch}={}", standin_binary().display()))
                .args(["--name", "docker.io/merbridge-edge-test/standin"])
                .args(["--tag", &tag, "--created", "0", "--out"])
                .arg(&out),
        )?;
        let image = containerd.import(&out.join(format!("merbridge-edge-{tag}-{arch}.tar")))?;
        fs::remove_dir_all(&out)?;
        Ok(Self {
            containerd: Some(containerd),
            image,
            node_ns: node.host_netns().to_string(),
            cgroup_root: node.cgroup_root.clone(),
            scratch: node.scratch().to_path_buf(),
            tag,
            subnet: node.subnet,
            sandboxes: vec![],
            containers: vec![],
        })
    }

    /// The private containerd running the containers.
    pub fn containerd(&self) -> &Containerd {
        self.containerd.as_ref().expect("not shut down")
    }

    /// The CNI network configuration, as the CRI plugin hands the bridge plugin its
    /// conflist entry: a bridge in the node's namespace, host-local addresses.
    fn network_config(&self) -> Value {
        let s = self.subnet;
        json!({
            "cniVersion": "1.0.0",
            "name": format!("mbe-{}", self.tag),
            "type": "bridge",
            "bridge": format!("cni{}", self.tag),
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [
                    [{"subnet": format!("10.233.{s}.0/24")}],
                    [{"subnet": format!("fd00:233:0:{s:x}::/64")}]
                ],
                "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
                "dataDir": self.ipam_dir().display().to_string()
            }
        })
    }

    /// The host-local plugin's allocations.
    pub fn ipam_dir(&self) -> PathBuf {
        self.containerd().dir.join("cni-ipam")
    }

    /// Calls a CNI plugin in the node's namespace, as the CRI plugin calls it.
    fn cni(&self, command: &str, sandbox: &Sandbox, ifname: &str, config: &Value) -> Result<Value> {
        let plugin = config["type"].as_str().unwrap_or_default();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.node_ns])
            .arg(Path::new(CNI_BIN_DIR).join(plugin))
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &sandbox.id)
            .env("CNI_NETNS", format!("/var/run/netns/{}", sandbox.netns))
            .env("CNI_IFNAME", ifname)
            .env("CNI_PATH", CNI_BIN_DIR)
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
                    sandbox.name, sandbox.id, sandbox.uid
                ),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running CNI plugin {plugin}"))?;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(config.to_string().as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "CNI {command} {plugin} on {}: {}{}",
                sandbox.netns,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if out.stdout.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&out.stdout).context("CNI result")
    }

    /// Makes a pod as the kubelet and the CRI plugin do: its sandbox (network namespace,
    /// loopback, bridge attachment, addresses) and its pod cgroup, then the app
    /// stand-in (`echo <pod>-app` on 8080, 8081 and 9002 as uid `app_uid`) in the
    /// container named `app`. Other containers (the sidecar) start with
    /// [`RuntimePods::start_container`].
    pub fn add_pod(&mut self, node: &Node, spec: PodSpec, app_uid: u32) -> Result<Pod> {
        let n = self.sandboxes.len();
        let uid = format!(
            "{:08x}-{:04x}-4000-8000-{:012x}",
            std::process::id(),
            n + 0x100,
            u64::from(self.subnet)
        );
        let sandbox = Sandbox {
            id: random_id(),
            netns: format!("cni-{}", uuid4()),
            name: spec.name.clone(),
            uid: uid.clone(),
        };
        crate::proc::ip(&["netns", "add", &sandbox.netns])?;
        self.sandboxes.push(sandbox);
        let sandbox = self.sandboxes.last().unwrap();
        let loopback = json!({"cniVersion": "1.0.0", "name": "cni-loopback", "type": "loopback"});
        self.cni("ADD", sandbox, "lo", &loopback)?;
        let result = self.cni("ADD", sandbox, "eth0", &self.network_config())?;
        let addrs: Vec<String> = result["ips"]
            .as_array()
            .context("no ips in the CNI result")?
            .iter()
            .filter_map(|ip| Some(ip["address"].as_str()?.split('/').next()?.to_string()))
            .collect();
        let ip4: Ipv4Addr = addrs
            .iter()
            .find_map(|a| a.parse().ok())
            .context("no IPv4 address from CNI")?;
        let ip6: Ipv6Addr = addrs
            .iter()
            .find_map(|a| a.parse().ok())
            .context("no IPv6 address from CNI")?;
        // The kubelet makes the pod cgroup; the runtime makes each container's below it.
        let pod_dir = self
            .cgroup_root
            .join(format!("kubepods/burstable/pod{uid}"));
        fs::create_dir_all(&pod_dir)?;
        let mut pod = Pod {
            spec,
            uid,
            netns: sandbox.netns.clone(),
            ip4,
            ip6,
            containers: vec![],
        };
        let app_name = format!("{}-app", pod.spec.name);
        self.start_container(
            &mut pod,
            "app",
            &[
                "--uid",
                &app_uid.to_string(),
                "echo",
                &app_name,
                "[::]:8080",
                "[::]:8081",
                "[::]:9002",
            ],
        )?;
        node.wait_listening(&pod, 8080)?;
        Ok(pod)
    }

    /// Runs container `name` of `pod` from the stand-in image with `args`, joined to
    /// the pod's network namespace, its cgroup below the pod's; the node's scratch
    /// directory is bound at its own path (the sidecar stand-in's log). Adds the
    /// container to `pod` as the runtime reports it: its id and the cgroup its task
    /// is in (/proc/<pid>/cgroup).
    pub fn start_container(&mut self, pod: &mut Pod, name: &str, args: &[&str]) -> Result<()> {
        let id = random_id();
        let mount = cgroup2_mount()?;
        let rel = self
            .cgroup_root
            .strip_prefix(&mount)
            .context("the node's cgroup root is below the cgroup2 mount")?;
        let cgroups_path = format!("/{}/kubepods/burstable/pod{}/{id}", rel.display(), pod.uid);
        let scratch = self.scratch.display().to_string();
        let containerd = self.containerd();
        let pid_file = containerd.dir.join(format!("{id}.pid"));
        let log = self.scratch.join(format!("{}-{name}.out", pod.spec.name));
        crate::proc::run(
            containerd
                .ctr()
                .args(["run", "-d", "--seccomp"])
                .args(containerd.ctr_run_private_flags())
                .arg("--with-ns")
                .arg(format!("network:/var/run/netns/{}", pod.netns))
                .args(["--cgroup", &cgroups_path])
                .arg("--mount")
                .arg(format!(
                    "type=bind,src={scratch},dst={scratch},options=bind:rw"
                ))
                .arg("--log-uri")
                .arg(format!("file://{}", log.display()))
                .arg("--pid-file")
                .arg(&pid_file)
                .args([&self.image, &id, "/merbridge-edge"])
                .args(args),
        )?;
        let listed = containerd.list("containers")?;
        self.containers.push(id.clone());
        if !listed.contains(&id) {
            bail!("containerd does not list container {id}: {listed:?}");
        }
        let pid: u32 = fs::read_to_string(&pid_file)?.trim().parse()?;
        let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
        let path = cgroup
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("the task is in no cgroup2 cgroup")?;
        let cgroup = mount.join(path.trim_start_matches('/'));
        pod.containers.push(Container {
            name: name.to_string(),
            id,
            cgroup,
        });
        Ok(())
    }

    /// Stops and removes every container, the CNI attachments, the network namespaces
    /// and the cgroups, then the private containerd; fails naming anything left.
    pub fn shutdown(mut self) -> Result<()> {
        let mut left = self.teardown();
        if let Some(containerd) = self.containerd.take()
            && let Err(e) = containerd.shutdown()
        {
            left.push(format!("{e:#}"));
        }
        if left.is_empty() {
            Ok(())
        } else {
            bail!("left behind: {}", left.join("; "))
        }
    }

    /// Removes the pods (containers first); returns what could not be removed.
    fn teardown(&mut self) -> Vec<String> {
        let mut left = vec![];
        let Some(containerd) = self.containerd.as_ref() else {
            return left;
        };
        for id in self.containers.drain(..) {
            let _ = containerd
                .ctr()
                .args(["tasks", "kill", "-s", "SIGKILL", &id])
                .output();
            let end = Instant::now() + Duration::from_secs(5);
            loop {
                let out = containerd.ctr().args(["tasks", "delete", &id]).output();
                if out.is_ok_and(|o| o.status.success()) || Instant::now() > end {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let out = containerd
                .ctr()
                .args(["containers", "delete", &id])
                .output();
            if !out.is_ok_and(|o| o.status.success()) {
                left.push(format!("container {id} not deleted"));
            }
        }
        let sandboxes: Vec<Sandbox> = self.sandboxes.drain(..).collect();
        for sandbox in sandboxes.iter().rev() {
            let loopback =
                json!({"cniVersion": "1.0.0", "name": "cni-loopback", "type": "loopback"});
            if let Err(e) = self.cni("DEL", sandbox, "eth0", &self.network_config()) {
                left.push(format!("{e:#}"));
            }
            let _ = self.cni("DEL", sandbox, "lo", &loopback);
            if crate::proc::ip(&["netns", "del", &sandbox.netns]).is_err() {
                left.push(format!("netns {} not removed", sandbox.netns));
            }
            if Path::new("/var/run/netns").join(&sandbox.netns).exists() {
                left.push(format!("/var/run/netns/{} still there", sandbox.netns));
            }
        }
        // The allocations the host-local plugin keeps: one file per address in use.
        let network = self.ipam_dir().join(format!("mbe-{}", self.tag));
        if let Ok(entries) = fs::read_dir(&network) {
            let held: Vec<String> = entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != "lock" && !n.starts_with("last_reserved_ip"))
                .collect();
            if !held.is_empty() {
                left.push(format!("CNI addresses still allocated: {held:?}"));
            }
        }
        left.extend(self.remove_cgroups());
        left
    }

    /// Removes the kubelet-layout cgroups the pods used, in every hierarchy (runc made
    /// the container cgroups in the cgroup v1 hierarchies too, parents included).
    fn remove_cgroups(&self) -> Vec<String> {
        let mut left = vec![];
        let Ok(mount) = cgroup2_mount() else {
            return left;
        };
        let Ok(rel) = self.cgroup_root.strip_prefix(&mount) else {
            return left;
        };
        for h in cgroup_hierarchies() {
            let kubepods = h.join(rel).join("kubepods");
            for dir in walk_dirs(&kubepods).into_iter().rev() {
                if let Err(e) = fs::remove_dir(&dir) {
                    left.push(format!("removing cgroup {}: {e}", dir.display()));
                }
            }
            if h != mount {
                // The node's cgroup root itself, which runc made in this hierarchy.
                let _ = fs::remove_dir(h.join(rel));
            }
        }
        left
    }
}

impl Drop for RuntimePods {
    fn drop(&mut self) {
        let left = self.teardown();
        if !left.is_empty() {
            let said = format!("runtime pods: left behind: {}", left.join("; "));
            if std::thread::panicking() {
                eprintln!("{said}");
            } else {
                panic!("{said}");
            }
        }
    }
}

/// `dir` and every directory below it, parents before children.
fn walk_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    if !dir.is_dir() {
        return out;
    }
    out.push(dir.to_path_buf());
    let mut i = 0;
    while i < out.len() {
        if let Ok(entries) = fs::read_dir(&out[i]) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    out.push(e.path());
                }
            }
        }
        i += 1;
    }
    out
}

/// 32 random bytes in hex: a container id as containerd's CRI plugin makes them.
fn random_id() -> String {
    let mut bytes = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .expect("/dev/urandom");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A random version-4 UUID, as the CRI plugin names network namespaces (`cni-<uuid>`).
fn uuid4() -> String {
    let h = random_id();
    format!(
        "{}-{}-4{}-8{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}
