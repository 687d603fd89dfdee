//! The k3s manifest: valid Kubernetes objects (typed and against the published OpenAPI
//! schemas, by an independent validator), and granting the agent only what it needs.
//! No root needed; the schema check needs `kubernetes-validate` (scripts/bootstrap).
use std::{collections::BTreeSet, path::PathBuf, process::Command};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::ServiceAccount,
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use merbridge_edge_testbed::{
    agent::agent_binary,
    manifest::{Manifest, manifest_path},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Value, json};

/// `doc` read as `T` and written back: equal only if every field is one `T` knows.
fn round_trip<T: DeserializeOwned + Serialize>(doc: &Value) -> Value {
    let typed: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{} does not parse: {e}", doc["kind"]));
    serde_json::to_value(typed).unwrap()
}

#[test]
fn every_object_parses_into_the_kubernetes_types_with_no_unknown_field() {
    let m = Manifest::load();
    let kinds: Vec<&str> = m
        .documents
        .iter()
        .map(|d| d["kind"].as_str().unwrap())
        .collect();
    // Creation order: the account and its rights exist before the pods that use them.
    assert_eq!(
        kinds,
        [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet"
        ]
    );
    for doc in &m.documents {
        let back = match doc["kind"].as_str().unwrap() {
            "ServiceAccount" => round_trip::<ServiceAccount>(doc),
            "ClusterRole" => round_trip::<ClusterRole>(doc),
            "ClusterRoleBinding" => round_trip::<ClusterRoleBinding>(doc),
            "DaemonSet" => round_trip::<DaemonSet>(doc),
            other => panic!("unexpected kind {other}"),
        };
        assert_eq!(&back, doc, "{} lost or changed fields", doc["kind"]);
    }
    // The check above does catch a misspelt field:
    let mut bad = m.document("DaemonSet").clone();
    bad["spec"]["template"]["spec"]["hostNetwrok"] = json!(true);
    assert_ne!(round_trip::<DaemonSet>(&bad), bad);
}

/// The schema validator from PyPI that scripts/bootstrap installs.
fn kubernetes_validate() -> PathBuf {
    let installed = PathBuf::from("/opt/merbridge-edge-dev/venv/bin/kubernetes-validate");
    if installed.exists() {
        return installed;
    }
    PathBuf::from("kubernetes-validate")
}

fn validate(path: &std::path::Path, version: Option<&str>) -> (bool, String) {
    let mut cmd = Command::new(kubernetes_validate());
    cmd.arg("--strict");
    if let Some(v) = version {
        cmd.args(["--kubernetes-version", v]);
    }
    let out = cmd.arg(path).output().unwrap_or_else(|e| {
        panic!("running kubernetes-validate: {e}; scripts/bootstrap installs it")
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_kubernetes_openapi_schemas_accept_it_strictly() {
    // 1.33: the first release whose kubelet authorizes /pods by nodes/pods by default;
    // and the newest schemas the validator ships.
    for version in [Some("1.33.0"), None] {
        let (ok, said) = validate(&manifest_path(), version);
        assert!(ok, "{version:?}:\n{said}");
        for object in [
            "serviceaccount",
            "clusterrole/",
            "clusterrolebinding",
            "daemonset",
        ] {
            assert!(said.contains(object), "{object} not validated:\n{said}");
        }
    }
    // The validator really rejects a field the schema lacks.
    let text = Manifest::load().text.replace(
        "readOnlyRootFilesystem: true",
        "readOnlyRootFilesystem: true\n            privilegd: false",
    );
    let bad = std::env::temp_dir().join(format!("mbe-manifest-{}.yaml", std::process::id()));
    std::fs::write(&bad, text).unwrap();
    let (ok, said) = validate(&bad, None);
    std::fs::remove_file(&bad).unwrap();
    assert!(!ok && said.contains("privilegd"), "{said}");
}

#[test]
fn the_agent_holds_three_capabilities_and_nothing_privileged() {
    let m = Manifest::load();
    let ds = m.daemonset();
    assert_eq!(ds.metadata.namespace.as_deref(), Some("kube-system"));
    let pod = ds.spec.template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    for (what, shared) in [("hostPID", pod.host_pid), ("hostIPC", pod.host_ipc)] {
        assert_ne!(shared, Some(true), "{what}");
    }
    assert_eq!(pod.service_account_name.as_deref(), Some("merbridge-edge"));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tolerations = pod.tolerations.unwrap();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "tolerates every taint"
    );
    assert_eq!(
        pod.node_selector
            .unwrap()
            .get("kubernetes.io/os")
            .map(String::as_str),
        Some("linux")
    );
    let arches = &pod
        .affinity
        .unwrap()
        .node_affinity
        .unwrap()
        .required_during_scheduling_ignored_during_execution
        .unwrap()
        .node_selector_terms[0]
        .match_expressions
        .clone()
        .unwrap()[0];
    assert_eq!(arches.key, "kubernetes.io/arch");
    assert_eq!(
        arches.values.as_deref(),
        Some(&["amd64".to_string(), "arm64".to_string()][..])
    );

    let agent = m.agent_container();
    let sc = agent.security_context.clone().unwrap();
    assert_eq!(sc.privileged, Some(false));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    let caps = sc.capabilities.unwrap();
    assert_eq!(caps.drop.unwrap(), ["ALL"]);
    assert_eq!(
        caps.add.unwrap().into_iter().collect::<BTreeSet<_>>(),
        BTreeSet::from(["BPF".to_string(), "NET_ADMIN".into(), "PERFMON".into()])
    );
    assert_eq!(m.setpriv_capabilities(), "-all,+bpf,+net_admin,+perfmon");
    assert_eq!(sc.seccomp_profile.unwrap().type_, "RuntimeDefault");

    // Host access: the cgroup2 hierarchy (read-only), bpffs and the pod network
    // namespace files (read-only, new ones propagated), nothing else.
    let host_paths: BTreeSet<String> = pod
        .volumes
        .unwrap()
        .into_iter()
        .filter_map(|v| v.host_path.map(|h| h.path))
        .collect();
    assert_eq!(
        host_paths,
        BTreeSet::from([
            "/sys/fs/cgroup".to_string(),
            "/sys/fs/bpf".into(),
            "/var/run/netns".into()
        ])
    );
    let mounts = agent.volume_mounts.clone().unwrap();
    let cgroup = mounts.iter().find(|m| m.name == "host-cgroup").unwrap();
    assert_eq!(cgroup.read_only, Some(true));
    let netns = mounts.iter().find(|m| m.name == "pod-netns").unwrap();
    assert_eq!(netns.mount_path, "/var/run/netns");
    assert_eq!(netns.read_only, Some(true));
    assert_eq!(netns.mount_propagation.as_deref(), Some("HostToContainer"));
    // The host's bpffs, mounted where containerd's default AppArmor profile lets the
    // agent pin, and handed to the agent there.
    let bpffs = mounts.iter().find(|m| m.name == "bpffs").unwrap();
    assert_ne!(bpffs.read_only, Some(true));
    let pin = format!("{}/merbridge-edge/sockhash-7", bpffs.mount_path);
    assert!(
        !apparmor_default_denies_write(&pin),
        "{pin}: containerd's default AppArmor profile denies writing there"
    );
    let args = agent.args.clone().unwrap();
    assert!(
        args.windows(2)
            .any(|w| w[0] == "--bpffs" && w[1] == bpffs.mount_path),
        "--bpffs {} not in {args:?}",
        bpffs.mount_path
    );

    // Node name and address from the downward API.
    let env = agent.env.clone().unwrap();
    for (name, field) in [("NODE_NAME", "spec.nodeName"), ("HOST_IP", "status.hostIP")] {
        let var = env
            .iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("{name}"));
        let from = var
            .value_from
            .clone()
            .unwrap()
            .field_ref
            .unwrap()
            .field_path;
        assert_eq!(from, field, "{name}");
    }

    // Memory bounded for 512 MB nodes; requests within the limits.
    let res = agent.resources.clone().unwrap();
    let limit = &res.limits.unwrap()["memory"].0;
    let request = &res.requests.unwrap()["memory"].0;
    let mib = |q: &str| q.trim_end_matches("Mi").parse::<u32>().unwrap();
    assert!(
        mib(request) <= mib(limit) && mib(limit) <= 64,
        "{request} / {limit}"
    );
}

/// Whether containerd's default AppArmor profile (`cri-containerd.apparmor.d`, from
/// containerd's contrib/apparmor/template.go) denies writing `path`: its file rules are
/// `file,` and these denies (`*` stays within one path component, `**` does not):
/// `deny /sys/[^f]*/** wklx`, `/sys/f[^s]*/**`, `/sys/fs/[^c]*/**`, `/sys/fs/c[^g]*/**`,
/// `/sys/fs/cg[^r]*/**`, `/sys/firmware/**`, `/sys/devices/virtual/powercap/**`,
/// `/sys/kernel/security/**`, and writes in /proc outside /proc/<pid> and
/// /proc/sys/kernel/shm* (taken here as all of /proc).
fn apparmor_default_denies_write(path: &str) -> bool {
    if path.starts_with("/proc/") {
        return true;
    }
    let Some(rest) = path.strip_prefix("/sys/") else {
        return false;
    };
    let parts: Vec<&str> = rest.split('/').collect();
    // Every rule needs a component and a slash after it.
    if parts.len() < 2 {
        return false;
    }
    let differs = |part: &str, at: usize, c: u8| part.as_bytes().get(at).is_some_and(|b| *b != c);
    let (first, second) = (parts[0], parts[1]);
    differs(first, 0, b'f')
        || (first.starts_with('f') && differs(first, 1, b's'))
        || (first == "fs"
            && parts.len() >= 3
            && (differs(second, 0, b'c')
                || (second.starts_with('c') && differs(second, 1, b'g'))
                || (second.starts_with("cg") && differs(second, 2, b'r'))))
        || [
            "/sys/firmware/",
            "/sys/devices/virtual/powercap/",
            "/sys/kernel/security/",
        ]
        .iter()
        .any(|p| path.starts_with(p))
}

#[test]
fn the_apparmor_model_denies_what_the_profile_denies() {
    // The pin the manifest made before, which failed with EACCES on Debian/Ubuntu hosts.
    assert!(apparmor_default_denies_write(
        "/sys/fs/bpf/merbridge-edge/sockhash-7"
    ));
    assert!(apparmor_default_denies_write("/sys/kernel/debug/x"));
    assert!(apparmor_default_denies_write("/sys/fs/fuse/connections/1"));
    assert!(!apparmor_default_denies_write(
        "/sys/fs/cgroup/pod/cgroup.procs"
    ));
    assert!(!apparmor_default_denies_write(
        "/host/sys/fs/bpf/merbridge-edge/x"
    ));
    assert!(!apparmor_default_denies_write("/run/merbridge-edge/bpf/x"));
}

#[test]
fn rbac_is_get_on_nodes_pods_with_nodes_proxy_only_as_a_commented_opt_in() {
    let m = Manifest::load();
    let role: ClusterRole = serde_json::from_value(m.document("ClusterRole").clone()).unwrap();
    let rules = role.rules.unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].api_groups.as_deref(), Some(&[String::new()][..]));
    assert_eq!(
        rules[0].resources.as_deref(),
        Some(&["nodes/pods".to_string()][..])
    );
    assert_eq!(rules[0].verbs, ["get"]);
    assert!(rules[0].resource_names.is_none() && rules[0].non_resource_urls.is_none());
    assert!(
        m.text.contains("  #   resources: [\"nodes/proxy\"]"),
        "the opt-in is documented"
    );

    let binding: ClusterRoleBinding =
        serde_json::from_value(m.document("ClusterRoleBinding").clone()).unwrap();
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(binding.role_ref.name, "merbridge-edge");
    let subjects = binding.subjects.unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(subjects[0].name, "merbridge-edge");
    assert_eq!(subjects[0].namespace.as_deref(), Some("kube-system"));
}

#[test]
fn probes_arguments_and_image_match_the_agent() {
    let m = Manifest::load();
    let agent = m.agent_container();
    assert_eq!(
        agent.image.as_deref(),
        Some(concat!(
            "ghcr.io/merbridge-edge/merbridge-edge:",
            env!("CARGO_PKG_VERSION")
        ))
    );
    // The file name k3s applies must be RFC 1123.
    let name = manifest_path()
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        name.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    );

    // The agent accepts the manifest's arguments (an unknown flag fails before --help).
    let mut args = agent.args.clone().unwrap();
    assert_eq!(args[0], "run");
    args.push("--help".into());
    let out = Command::new(agent_binary())
        .args(&args)
        .output()
        .expect("agent runs");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bad = Command::new(agent_binary())
        .args(["run", "--cgroup-rot", "/x", "--help"])
        .output()
        .unwrap();
    assert!(!bad.status.success(), "a wrong flag is refused");

    // Probes reach the metrics listener where the agent binds it by default: loopback.
    assert!(help.contains("127.0.0.1:15890"), "{help}");
    for (probe, path) in [
        (agent.liveness_probe.clone(), "/healthz"),
        (agent.readiness_probe.clone(), "/readyz"),
    ] {
        let get = probe.unwrap().http_get.unwrap();
        assert_eq!(get.host.as_deref(), Some("127.0.0.1"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(15890)
        );
    }
}
