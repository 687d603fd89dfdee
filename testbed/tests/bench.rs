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
    let out = Command::new(env!("CARGO_BIN_EXE_mbe-bench"))
        .args(["--quick", "--rounds", "2", "--seconds", "0.2", "--json"])
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
    let cells = doc["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 5 * 7, "5 variants × 7 workloads");
    for c in cells {
        let variant = c["variant"].as_str().unwrap();
        match c["workload"].as_str().unwrap() {
            "rr" => assert!(c["rps"].as_f64().unwrap() > 0.0, "{c}"),
            "conns" => {
                assert!(c["conn_per_s"].as_f64().unwrap() > 0.0, "{c}");
                // Only iptables goes through conntrack, also in the round after it ran.
                let added = c["conntrack_added"].as_f64().unwrap();
                assert_eq!(added > 0.0, variant == "iptables", "{c}");
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
