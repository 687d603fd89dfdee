//! The k3s manifest (`k3s/merbridge-edge.yaml`) read as Kubernetes objects, so tests can
//! check it and run the agent with exactly what it grants.
use std::path::PathBuf;

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{Container, PodSpec},
};
use serde::Deserialize;
use serde_json::Value;

/// Path of the manifest in this workspace.
pub fn manifest_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../k3s/merbridge-edge.yaml")
}

/// The manifest: its text and each YAML document as JSON.
pub struct Manifest {
    /// The file as written (comments included).
    pub text: String,
    /// Each document, in order.
    pub documents: Vec<Value>,
}

impl Manifest {
    /// Reads and parses the manifest; panics naming the file when it is not valid YAML.
    pub fn load() -> Self {
        let path = manifest_path();
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let documents = serde_yaml_ng::Deserializer::from_str(&text)
            .map(|doc| {
                Value::deserialize(doc)
                    .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()))
            })
            .collect();
        Self { text, documents }
    }

    /// The document of `kind`; panics when there is not exactly one.
    pub fn document(&self, kind: &str) -> &Value {
        let found: Vec<&Value> = self
            .documents
            .iter()
            .filter(|d| d["kind"] == kind)
            .collect();
        assert_eq!(found.len(), 1, "the manifest holds {} {kind}", found.len());
        found[0]
    }

    /// The DaemonSet, typed.
    pub fn daemonset(&self) -> DaemonSet {
        serde_json::from_value(self.document("DaemonSet").clone()).expect("a DaemonSet")
    }

    /// The DaemonSet's only container: the agent.
    pub fn agent_container(&self) -> Container {
        let pod = self.daemonset().spec.template.spec.unwrap();
        assert_eq!(pod.containers.len(), 1, "one container");
        assert!(
            pod.init_containers.unwrap_or_default().is_empty(),
            "no init containers"
        );
        pod.containers.into_iter().next().unwrap()
    }

    /// The capabilities the agent's container adds, as written (`BPF`, `NET_ADMIN`, …).
    pub fn agent_capabilities(&self) -> Vec<String> {
        self.agent_container()
            .security_context
            .and_then(|s| s.capabilities)
            .and_then(|c| c.add)
            .unwrap_or_default()
    }

    /// Those capabilities as a bit mask (CapEff in /proc/PID/status).
    pub fn capability_mask(&self) -> u64 {
        self.agent_capabilities()
            .iter()
            .map(|cap| match cap.as_str() {
                "NET_ADMIN" => 1u64 << 12,
                "SYS_RESOURCE" => 1 << 24,
                "PERFMON" => 1 << 38,
                "BPF" => 1 << 39,
                other => panic!("capability {other} has no bit here"),
            })
            .fold(0, |a, b| a | b)
    }

    /// Those capabilities in setpriv's syntax, every other one removed:
    /// `-all,+bpf,+net_admin,+perfmon`.
    pub fn setpriv_capabilities(&self) -> String {
        let mut s = String::from("-all");
        for cap in self.agent_capabilities() {
            s.push_str(",+");
            s.push_str(&cap.to_lowercase());
        }
        s
    }

    /// The DaemonSet's pod spec.
    pub fn pod_spec(&self) -> PodSpec {
        self.daemonset().spec.template.spec.expect("a pod spec")
    }

    /// The host paths the agent's container mounts, each joined with its volume.
    pub fn host_mounts(&self) -> Vec<HostMount> {
        let volumes = self.pod_spec().volumes.unwrap_or_default();
        self.agent_container()
            .volume_mounts
            .unwrap_or_default()
            .into_iter()
            .map(|m| {
                let volume = volumes
                    .iter()
                    .find(|v| v.name == m.name)
                    .unwrap_or_else(|| panic!("volume {} is not declared", m.name));
                let host = volume
                    .host_path
                    .as_ref()
                    .unwrap_or_else(|| panic!("volume {} is not a hostPath", m.name));
                HostMount {
                    name: m.name.clone(),
                    host_path: PathBuf::from(&host.path),
                    mount_path: PathBuf::from(&m.mount_path),
                    read_only: m.read_only.unwrap_or(false),
                    host_to_container: matches!(
                        m.mount_propagation.as_deref(),
                        Some("HostToContainer" | "Bidirectional")
                    ),
                }
            })
            .collect()
    }

    /// The agent container's memory limit in bytes (`resources.limits.memory`).
    pub fn memory_limit_bytes(&self) -> Option<u64> {
        let limits = self.agent_container().resources?.limits?;
        let q = &limits.get("memory")?.0;
        let (digits, unit) = q.split_at(q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len()));
        let scale: u64 = match unit {
            "" => 1,
            "Ki" => 1 << 10,
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            other => panic!("memory unit {other:?} is not read here"),
        };
        Some(digits.parse::<u64>().expect("a memory quantity") * scale)
    }
}

/// One host path mounted into the agent's container, as the manifest declares it.
#[derive(Clone, Debug, PartialEq)]
pub struct HostMount {
    /// The volume's name.
    pub name: String,
    /// The host path (`hostPath.path`).
    pub host_path: PathBuf,
    /// Where the container sees it (`mountPath`).
    pub mount_path: PathBuf,
    /// Mounted read-only.
    pub read_only: bool,
    /// Mounts made on the host later appear in the container (HostToContainer).
    pub host_to_container: bool,
}
