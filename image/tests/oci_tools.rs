//! The image as independent tools see it: built twice with the same digests, read by
//! skopeo (layout and per-arch archives), unpacked by umoci, and the amd64 image's
//! binary run by runc inside its own root filesystem, holding only the capabilities of
//! the k3s manifest. Needs dist/ (scripts/build-static; skipped with a note otherwise,
//! a failure when MBE_REQUIRE_DIST=1); the runc part needs root.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use merbridge_edge_testbed::{dist::static_binary, fixture::kernel_test, manifest::Manifest};
use serde_json::{Value, json};

const MBE_IMAGE: &str = env!("CARGO_BIN_EXE_mbe-image");
const TAG: &str = env!("CARGO_PKG_VERSION");
const NAME: &str = "ghcr.io/merbridge-edge/merbridge-edge";

/// A scratch folder removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("mbe-{what}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (scripts/bootstrap installs it)"));
    assert!(out.status.success(), "{cmd:?} failed:\n{}", text(&out));
    out
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn build_image(out: &Path, amd64: &Path, arm64: &Path) -> String {
    let o = run(Command::new(MBE_IMAGE)
        .arg("--binary")
        .arg(format!("amd64={}", amd64.display()))
        .arg("--binary")
        .arg(format!("arm64={}", arm64.display()))
        .args(["--created", "1764000000", "--revision", "test"])
        .arg("--out")
        .arg(out));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Every file under `dir` with its bytes, by relative path.
fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                files.push((rel, fs::read(&p).unwrap()));
            }
        }
    }
    files.sort();
    files
}

fn binaries(test: &str) -> Option<(PathBuf, PathBuf)> {
    Some((static_binary("amd64", test)?, static_binary("arm64", test)?))
}

#[test]
fn two_builds_give_the_same_bytes_and_skopeo_reads_every_platform() {
    let Some((amd64, arm64)) = binaries("image layout") else {
        return;
    };
    let (a, b) = (Scratch::new("image-a"), Scratch::new("image-b"));
    let said = build_image(&a.0, &amd64, &arm64);
    build_image(&b.0, &amd64, &arm64);
    let tree_a = tree(&a.0);
    assert_eq!(
        tree_a.len(),
        2 + 7 + 2,
        "layout files + 7 blobs + 2 archives: {said}"
    );
    assert!(
        tree_a == tree(&b.0),
        "the second build differs from the first"
    );
    println!("{said}");

    let layout = format!("oci:{}:{TAG}", a.0.join("oci").display());
    let raw: Value = serde_json::from_slice(
        &run(Command::new("skopeo").args(["inspect", "--raw", &layout])).stdout,
    )
    .unwrap();
    assert_eq!(raw["mediaType"], "application/vnd.oci.image.index.v1+json");
    let platforms: Vec<&Value> = raw["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["platform"])
        .collect();
    assert_eq!(
        platforms,
        [
            &json!({"architecture": "amd64", "os": "linux"}),
            &json!({"architecture": "arm64", "os": "linux", "variant": "v8"})
        ]
    );
    for (arch, binary) in [("amd64", &amd64), ("arm64", &arm64)] {
        let info: Value = serde_json::from_slice(
            &run(Command::new("skopeo").args(["inspect", "--override-arch", arch, &layout])).stdout,
        )
        .unwrap();
        assert_eq!(info["Architecture"], arch, "{info}");
        assert_eq!(info["Os"], "linux");
        assert_eq!(info["Layers"].as_array().unwrap().len(), 1);
        assert_eq!(info["Labels"]["org.opencontainers.image.version"], TAG);
        let config: Value = serde_json::from_slice(
            &run(Command::new("skopeo").args([
                "inspect",
                "--config",
                "--override-arch",
                arch,
                &layout,
            ]))
            .stdout,
        )
        .unwrap();
        assert_eq!(config["config"]["Entrypoint"], json!(["/merbridge-edge"]));
        assert_eq!(config["config"]["Cmd"], json!(["run"]));

        // The per-arch archive k3s imports: readable by skopeo, named for containerd.
        let archive = a.0.join(format!("merbridge-edge-{TAG}-{arch}.tar"));
        let info: Value = serde_json::from_slice(
            &run(Command::new("skopeo")
                .arg("inspect")
                .arg(format!("oci-archive:{}:{TAG}", archive.display())))
            .stdout,
        )
        .unwrap();
        assert_eq!(info["Architecture"], arch, "{info}");
        let index = tar_member(&archive, "index.json");
        let index: Value = serde_json::from_slice(&index).unwrap();
        assert_eq!(
            index["manifests"][0]["annotations"]["io.containerd.image.name"],
            format!("{NAME}:{TAG}")
        );
        assert_eq!(
            tar_member(&archive, "oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#
        );
        let size = fs::metadata(&archive).unwrap().len();
        println!(
            "{arch}: archive {size} bytes (binary {})",
            fs::metadata(binary).unwrap().len()
        );
        assert!(
            size <= 4_000_000,
            "{arch}: image {size} bytes, over the 4 MB goal"
        );
    }
}

fn tar_member(archive: &Path, name: &str) -> Vec<u8> {
    let out = run(Command::new("tar").arg("-xOf").arg(archive).arg(name));
    out.stdout
}

#[test]
fn umoci_unpacks_the_amd64_image_and_runc_runs_check_in_it() {
    let Some((amd64, arm64)) = binaries("image under runc") else {
        return;
    };
    let Some(_serial) = kernel_test("image under runc") else {
        return;
    };
    let work = Scratch::new("image-runc");
    build_image(&work.0.join("dist"), &amd64, &arm64);
    // What k3s gets: the amd64 archive, unpacked as an image layout.
    let layout = work.0.join("layout");
    fs::create_dir(&layout).unwrap();
    run(Command::new("tar")
        .arg("-xf")
        .arg(work.0.join(format!("dist/merbridge-edge-{TAG}-amd64.tar")))
        .arg("-C")
        .arg(&layout));
    let bundle = work.0.join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:{TAG}", layout.display()))
        .arg(&bundle));
    let rootfs = bundle.join("rootfs");
    let names: Vec<String> = fs::read_dir(&rootfs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        ["merbridge-edge"],
        "scratch: the binary and nothing else"
    );
    assert!(fs::read(rootfs.join("merbridge-edge")).unwrap() == fs::read(&amd64).unwrap());

    let config_path = bundle.join("config.json");
    let config: Value = serde_json::from_slice(&fs::read(&config_path).unwrap()).unwrap();
    assert_eq!(config["process"]["args"], json!(["/merbridge-edge", "run"]));

    let manifest = Manifest::load();
    let caps: Vec<String> = manifest
        .agent_capabilities()
        .iter()
        .map(|c| format!("CAP_{c}"))
        .collect();
    let (code, said) = runc_check(&bundle, config.clone(), &caps, "full");
    assert_eq!(
        code,
        Some(0),
        "check in the container with {caps:?}:\n{said}"
    );
    assert!(
        said.contains("verdict: the agent can run here with every feature"),
        "{said}"
    );

    let fewer: Vec<String> = caps.iter().filter(|c| *c != "CAP_BPF").cloned().collect();
    let (code, said) = runc_check(&bundle, config, &fewer, "nobpf");
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("MISSING  capability CAP_BPF"), "{said}");
}

/// Runs `/merbridge-edge check` in the bundle with `caps` and the manifest's host
/// mounts (the host's /sys/fs/cgroup read-only, bpffs); returns its exit code and output.
fn runc_check(
    bundle: &Path,
    mut config: Value,
    caps: &[String],
    id: &str,
) -> (Option<i32>, String) {
    config["process"]["args"] = json!(["/merbridge-edge", "check"]);
    config["process"]["terminal"] = json!(false);
    config["process"]["user"] = json!({"uid": 0, "gid": 0});
    config["process"]["noNewPrivileges"] = json!(true);
    config["process"]["capabilities"] = json!({
        "bounding": caps, "effective": caps, "permitted": caps,
    });
    config["root"]["readonly"] = json!(true);
    let mounts = config["mounts"].as_array_mut().unwrap();
    mounts.push(json!({"destination": "/host/sys/fs/cgroup", "type": "bind",
        "source": "/sys/fs/cgroup", "options": ["rbind", "ro"]}));
    mounts.push(json!({"destination": "/sys/fs/bpf", "type": "bind",
        "source": "/sys/fs/bpf", "options": ["rbind"]}));
    // The pod network namespace files, as the manifest mounts them (the kubelet's
    // hostPath DirectoryOrCreate makes the directory when it is missing).
    fs::create_dir_all("/var/run/netns").unwrap();
    mounts.push(json!({"destination": "/var/run/netns", "type": "bind",
        "source": "/var/run/netns", "options": ["rbind", "ro", "rslave"]}));
    fs::write(
        bundle.join("config.json"),
        serde_json::to_vec_pretty(&config).unwrap(),
    )
    .unwrap();
    let id = format!("mbe-image-test-{id}-{}", std::process::id());
    let out = Command::new("runc")
        .args(["run", "--bundle"])
        .arg(bundle)
        .arg(&id)
        .output()
        .expect("runc runs (scripts/bootstrap installs it)");
    let _ = Command::new("runc")
        .args(["delete", "--force", &id])
        .output();
    (out.status.code(), text(&out))
}
