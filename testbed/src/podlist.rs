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
    let init: Vec<Value> = pod
        .spec
        .init
        .iter()
        .map(|(name, args)| json!({"name": name, "image": format!("example/{name}:1"), "args": args}))
        .collect();
    json!({
        "metadata": {
            "name": pod.spec.name, "namespace": "default", "uid": pod.uid,
            "annotations": annotations, "labels": labels
        },
        "spec": {"nodeName": node_name, "containers": containers, "initContainers": init},
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

/// A kubelet `/pods` answer as real clusters give it: Istio (init container, status
/// annotation), Linkerd (native sidecar), Kuma, OSM, a plain pod, a hostNetwork pod and
/// a terminating one, all on node `edge-1`.
pub const KUBELET_FIXTURE: &str = include_str!("../fixtures/kubelet-pods.json");

/// The fixture as JSON.
pub fn kubelet_fixture() -> Value {
    serde_json::from_str(KUBELET_FIXTURE).expect("fixture is JSON")
}

/// `n` Istio pods shaped like the fixture's first, on edge-1, named `load-<i>`, uid
/// `00000000-0000-4000-8000-<i>`, at 10.43.x.y and fd00:43::<i+1>; container ids
/// `<i>a…` and `<i>b…` (64 hex digits).
pub fn istio_pods(n: usize) -> Vec<Value> {
    let template = kubelet_fixture()["items"][0].clone();
    (0..n)
        .map(|i| {
            let mut p = template.clone();
            let ip4 = format!("10.43.{}.{}", i / 250, i % 250 + 1);
            p["metadata"]["name"] = json!(format!("load-{i}"));
            p["metadata"]["uid"] = json!(format!("00000000-0000-4000-8000-{i:012}"));
            p["status"]["podIP"] = json!(ip4);
            p["status"]["podIPs"] = json!([{"ip": ip4}, {"ip": format!("fd00:43::{:x}", i + 1)}]);
            for (k, c) in p["status"]["containerStatuses"]
                .as_array_mut()
                .expect("statuses")
                .iter_mut()
                .enumerate()
            {
                c["containerID"] = json!(format!("containerd://{i:060x}{k:04x}"));
            }
            p
        })
        .collect()
}

/// `list` with `extra` items appended.
pub fn with_items(mut list: Value, extra: Vec<Value>) -> Value {
    if let Some(items) = list["items"].as_array_mut() {
        items.extend(extra);
    }
    list
}
