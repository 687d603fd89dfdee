//! The shipped static binaries (`scripts/build-static`): fully static, stripped, the
//! right machine, within the size goal; the amd64 one runs `check` on this kernel, the
//! arm64 one runs under qemu-user. Skipped with a note when dist/ was not built, a
//! failure when MBE_REQUIRE_DIST=1; `check` needs root (MBE_REQUIRE_KERNEL_TESTS).
use std::{path::Path, process::Command};

use merbridge_edge_testbed::{dist::static_binary, fixture::kernel_test};

/// Size goal per binary, probes embedded.
const MAX_BYTES: u64 = 4_000_000;

fn readelf(args: &[&str], file: &Path) -> String {
    let out = Command::new("readelf")
        .args(args)
        .arg(file)
        .output()
        .expect("readelf (binutils) runs");
    assert!(out.status.success(), "readelf {args:?} {}", file.display());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn both_binaries_are_fully_static_stripped_and_within_4_mb() {
    for (arch, machine) in [("amd64", "X86-64"), ("arm64", "AArch64")] {
        let Some(bin) = static_binary(arch, "static binaries") else {
            return;
        };
        let header = readelf(&["-hW"], &bin);
        assert!(header.contains(machine), "{arch}: {header}");
        assert!(
            header.contains("EXEC"),
            "{arch}: a plain static executable\n{header}"
        );
        let segments = readelf(&["-lW"], &bin);
        assert!(
            !segments.contains("INTERP"),
            "{arch}: has an interpreter\n{segments}"
        );
        assert!(
            !segments.contains("DYNAMIC"),
            "{arch}: has a dynamic segment\n{segments}"
        );
        let sections = readelf(&["-SW"], &bin);
        assert!(!sections.contains(".symtab"), "{arch}: not stripped");
        let size = std::fs::metadata(&bin).unwrap().len();
        println!("{arch}: {} bytes", size);
        assert!(
            size <= MAX_BYTES,
            "{arch}: {size} bytes, over the {MAX_BYTES} goal"
        );
    }
}

#[test]
fn amd64_binary_passes_check_on_this_kernel() {
    let Some(bin) = static_binary("amd64", "amd64 check") else {
        return;
    };
    let Some(_serial) = kernel_test("amd64 check") else {
        return;
    };
    let out = Command::new(&bin).arg("--version").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        concat!("merbridge-edge ", env!("CARGO_PKG_VERSION"))
    );
    // The pod network namespace directory, as a node running pods has it.
    std::fs::create_dir_all("/var/run/netns").unwrap();
    let out = Command::new(&bin).arg("check").output().unwrap();
    let said = text(&out);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(
        said.contains("probe mb_getsockopt passes the verifier"),
        "{said}"
    );
    assert!(
        said.contains("verdict: the agent can run here with every feature"),
        "{said}"
    );
}

#[test]
fn arm64_binary_runs_under_qemu_user() {
    let Some(bin) = static_binary("arm64", "arm64 under qemu-user") else {
        return;
    };
    let run = |args: &[&str]| {
        Command::new("qemu-aarch64-static")
            .arg(&bin)
            .args(args)
            .output()
            .expect("qemu-aarch64-static (qemu-user-static) runs")
    };
    let out = run(&["--version"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        concat!("merbridge-edge ", env!("CARGO_PKG_VERSION"))
    );
    // qemu-user does not pass bpf(2) through: the arm64 binary must say so in its own
    // words (the real ARM64 kernel runs are in qemu-tests/).
    let out = run(&["check", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("check --json under qemu-user: {e}\n{}", text(&out)));
    assert!(
        report["kernel"].as_str().unwrap().contains("aarch64"),
        "{report}"
    );
    assert!(report["items"].as_array().unwrap().len() > 5, "{report}");
}
