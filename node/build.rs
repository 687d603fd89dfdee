//! Builds the eBPF probes (probes/ebpf) for bpfel-unknown-none with Debian's rustc,
//! which ships `core` for that target, and bpf-linker; the object is embedded in the
//! agent. `scripts/bootstrap` installs both. Override the tools with
//! MERBRIDGE_EDGE_BPF_CARGO / MERBRIDGE_EDGE_BPF_RUSTC. With MERBRIDGE_EDGE_SKIP_PROBES=1
//! nothing is built and an empty object is embedded, so `cargo check`, clippy and editors
//! work without the BPF toolchain; such an agent refuses to load, naming the variable.
use std::{env, path::PathBuf, process::Command};

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let probes = manifest_dir
        .join("../probes/ebpf")
        .canonicalize()
        .expect("probes/ebpf exists");
    let common = manifest_dir.join("../probes/common");
    for dir in [probes.join("src"), common.join("src")] {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
    for f in ["Cargo.toml", "Cargo.lock", ".cargo/config.toml"] {
        println!("cargo:rerun-if-changed={}", probes.join(f).display());
    }
    println!("cargo:rerun-if-env-changed=MERBRIDGE_EDGE_BPF_CARGO");
    println!("cargo:rerun-if-env-changed=MERBRIDGE_EDGE_BPF_RUSTC");
    println!("cargo:rerun-if-env-changed=MERBRIDGE_EDGE_SKIP_PROBES");
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let embedded = out_dir.join("merbridge-edge-probes.o");
    if matches!(env::var("MERBRIDGE_EDGE_SKIP_PROBES").as_deref(), Ok(v) if !v.is_empty() && v != "0")
    {
        println!(
            "cargo:warning=MERBRIDGE_EDGE_SKIP_PROBES is set: the eBPF probes are not built and this agent cannot load them"
        );
        std::fs::write(&embedded, [])
            .unwrap_or_else(|e| panic!("writing {}: {e}", embedded.display()));
        return;
    }
    let cargo = env::var("MERBRIDGE_EDGE_BPF_CARGO").unwrap_or_else(|_| "/usr/bin/cargo".into());
    let rustc = env::var("MERBRIDGE_EDGE_BPF_RUSTC").unwrap_or_else(|_| "/usr/bin/rustc".into());
    let target_dir = out_dir.join("probes-target");

    let mut cmd = Command::new(&cargo);
    // The outer cargo's settings (target, flags, wrappers, jobserver) must not leak in.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if key.starts_with("CARGO") || key.starts_with("RUST") {
            cmd.env_remove(&key);
        }
    }
    cmd.current_dir(&probes)
        .env("RUSTC", &rustc)
        .env("RUSTC_BOOTSTRAP", "1")
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("running {cargo} to build the eBPF probes: {e}; run scripts/bootstrap to install the toolchain")
    });
    assert!(
        status.success(),
        "building the eBPF probes failed; see the output above (scripts/bootstrap installs the toolchain)"
    );
    let object = target_dir.join("bpfel-unknown-none/release/merbridge-edge-probes");
    std::fs::copy(&object, &embedded)
        .unwrap_or_else(|e| panic!("copying {}: {e}", object.display()));
}
