//! Kubelet `/pods` responses (v1 PodList JSON) describing the test node's pods.
use serde_json::{Value, json};

use crate::node::Pod;

/// The PodList entry of one pod, as the kubelet reports a running pod.
pub fn pod_json(pod: &Pod, node_name: &str) -> Value {
    let annotations: serde_json::Map<String, Value> = pod
        .spec
        .annotations
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let labels: serde_json::Map<String, Value> = pod
        .spec
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let containers: Vec<Value> = pod
        .containers
        .iter()
        .map(|c| json!({"name": c.name, "image": format!("example/{}:1", c.name)}))
        .collect();
    let statuses: Vec<Value> = pod
        .containers
        .iter()
        .map(|c| {
            json!({
                "name": c.name, "ready": true, "restartCount": 0, "image": format!("example/{}:1", c.name),
                "imageID": "", "containerID": format!("containerd://{}", c.id),
                "state": {"running": {"startedAt": "2026-11-25T10:00:00Z"}}
            })
        })
        .collect();
    json!({
        "metadata": {
            "name": pod.spec.name, "namespace": "default", "uid": pod.uid,
            "annotations": annotations, "labels": labels
        },
        "spec": {"nodeName": node_name, "containers": containers},
        "status": {
            "phase": "Running", "qosClass": "Burstable", "hostIP": "10.0.0.1",
            "podIP": pod.ip4.to_string(),
            "podIPs": [{"ip": pod.ip4.to_string()}, {"ip": pod.ip6.to_string()}],
            "containerStatuses": statuses
        }
    })
}

/// A PodList of `pods`, all bound to `node_name`.
pub fn pod_list<'a>(pods: impl IntoIterator<Item = &'a Pod>, node_name: &str) -> Value {
    let items: Vec<Value> = pods.into_iter().map(|p| pod_json(p, node_name)).collect();
    json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
}

/// Writes a PodList atomically (write then rename) so a reader never sees half a file.
pub fn write_pod_list(path: &std::path::Path, list: &Value) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(list)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
