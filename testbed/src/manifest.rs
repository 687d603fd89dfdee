//! The k3s manifest (`k3s/merbridge-edge.yaml`) read as Kubernetes objects, so tests can
//! check it and run the agent with exactly what it grants.
use std::path::PathBuf;

use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::Container};
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
}
