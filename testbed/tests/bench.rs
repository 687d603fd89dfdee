//! The benchmark's quick mode on the real kernel: correctness only, never speed. The
//! bench itself fails when a reply differs from what was sent, when nothing was
//! answered, or when a variant did not take its path (sidecars saw the original
//! destination only where traffic is intercepted; sk_msg moved messages only in
//! ebpf-sockmap). Needs root, iptables and bpftool.
use std::process::Command;

use merbridge_edge_testbed::fixture::kernel_test;

#[test]
fn quick_bench_checks_every_variant_and_writes_the_cells() {
    let Some(_serial) = kernel_test("bench_quick") else {
        return;
    };
    let json = std::env::temp_dir().join(format!("mbe-bench-{}.json", std::process::id()));
    let max_file = "/proc/sys/net/netfilter/nf_conntrack_max";
    let max_before = std::fs::read_to_string(max_file).unwrap_or_default();
    let out = Command::new(env!("CARGO_BIN_EXE_mbe-bench"))
        .args([
            "--quick",
            "--rounds",
            "2",
            "--seconds",
            "0.2",
            "--conntrack-max",
            "64",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    assert_eq!(
        std::fs::read_to_string(max_file).unwrap_or_default(),
        max_before,
        "the host's conntrack limit is put back"
    );
    let (limited, cells): (Vec<_>, Vec<_>) = doc["cells"]
        .as_array()
        .unwrap()
        .iter()
        .partition(|c| c.get("conntrack_max").is_some());
    assert_eq!(cells.len(), 6 * 11, "6 variants × 11 workloads");
    // With a 64-entry table, iptables loses connections; paths without conntrack do not;
    // the agent next to the mesh's rules is still in conntrack's hands.
    for c in &limited {
        let errors = c["errors"].as_f64().unwrap();
        match c["variant"].as_str().unwrap() {
            "iptables" => assert!(errors > 0.0, "{c}"),
            "ebpf+iptables" => assert!(
                errors > 0.0 || c["conntrack_added"].as_f64().unwrap() > 0.0,
                "{c}"
            ),
            _ => assert!(
                errors == 0.0 && c["conn_per_s"].as_f64().unwrap() > 0.0,
                "{c}"
            ),
        }
    }
    assert_eq!(
        limited.len(),
        6 * 2,
        "every variant, from a pod and from another node"
    );
    for c in cells {
        let variant = c["variant"].as_str().unwrap();
        match c["workload"].as_str().unwrap() {
            "rr" => assert!(c["rps"].as_f64().unwrap() > 0.0, "{c}"),
            "conns" => {
                assert!(c["conn_per_s"].as_f64().unwrap() > 0.0, "{c}");
                // Only the variants with the mesh's rules go through conntrack.
                let added = c["conntrack_added"].as_f64().unwrap();
                let with_rules = matches!(variant, "iptables" | "ebpf+iptables");
                assert_eq!(added > 0.0, with_rules, "{c}");
            }
            "stream" => assert!(c["mb_per_s"].as_f64().unwrap() > 0.0, "{c}"),
            other => panic!("unknown workload {other}"),
        }
    }
    assert!(
        doc["machine"]["kernel"]
            .as_str()
            .unwrap()
            .starts_with("Linux")
    );
}
