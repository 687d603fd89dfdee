//! The shipped image under a real container runtime: a private containerd (its own
//! configuration, root, state and sockets, started and stopped here) imports the
//! per-architecture archive of `scripts/build-image` as k3s's air-gap directory does,
//! and runs the agent with what the k3s manifest grants and nothing more (capabilities,
//! read-only root, containerd's default seccomp profile, host network, the manifest's
//! host mounts, its memory limit). Tear-down must leave nothing behind.
//!
//! Needs root, containerd (scripts/bootstrap) and the image archive
//! (scripts/build-image); skipped with a note otherwise, a failure when
//! MBE_REQUIRE_KERNEL_TESTS=1 (containerd, root) or MBE_REQUIRE_DIST=1 (the archive).
//! The datapath and inbound-capture suites run with this agent under
//! `MERBRIDGE_EDGE_RUNTIME=containerd` (scripts/test).
use std::{
    fs,
    path::{Path, PathBuf},
    sync::MutexGuard,
    time::Duration,
};

use merbridge_edge_testbed::{
    Node,
    agent::Agent,
    agent_container::{Plan, image_archive},
    containerd::{Containerd, cgroup_hierarchies, missing_tool},
    fixture::kernel_test,
    manifest::Manifest,
};

const HELPER: &str = env!("CARGO_BIN_EXE_mbe-testbed");

/// Root, a cgroup2 mount, containerd and the image archive, or a skip (a failure when
/// required).
fn runtime_test(test: &str) -> Option<(MutexGuard<'static, ()>, PathBuf)> {
    let serial = kernel_test(test)?;
    if let Some(why) = missing_tool() {
        if std::env::var("MBE_REQUIRE_KERNEL_TESTS").as_deref() == Ok("1") {
            panic!("{test}: {why}");
        }
        eprintln!("SKIPPED {test}: {why}");
        return None;
    }
    let archive = image_archive();
    if !archive.exists() {
        let why = format!("{} not built (scripts/build-image)", archive.display());
        if std::env::var("MBE_REQUIRE_DIST").as_deref() == Ok("1") {
            panic!("{test}: {why}");
        }
        eprintln!("SKIPPED {test}: {why}");
        return None;
    }
    Some((serial, archive))
}

/// Runs `merbridge-edge check` from the image with the plan for `args`; returns its
/// exit code and output.
fn check_in_container(
    containerd: &Containerd,
    image: &str,
    plan: &Plan,
    id: &str,
) -> (Option<i32>, String) {
    let out = plan
        .ctr_run(containerd, image, id, &[])
        .output()
        .expect("ctr runs");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), said)
}

#[test]
fn check_in_the_imported_image_gives_the_full_verdict_with_the_manifests_grants() {
    let Some((_serial, archive)) = runtime_test("check under containerd") else {
        return;
    };
    let manifest = Manifest::load();
    // The node's own bpffs stands in for the host's /sys/fs/bpf (a fresh machine may
    // have none mounted); the other mounts are the host's, as the manifest declares.
    let node = Node::new(HELPER.as_ref()).unwrap();
    let bpffs = node.bpffs.to_str().unwrap();
    let containerd = Containerd::start().unwrap();
    let image = containerd.import(&archive).unwrap();
    let wanted = manifest.agent_container().image.unwrap();
    assert_eq!(
        image, wanted,
        "the archive imports under the manifest's image name"
    );

    let plan = Plan::new(&manifest, &["check", "--bpffs", bpffs]);
    assert_eq!(plan.args, ["check", "--bpffs", "/host/sys/fs/bpf"]);
    let (code, said) = check_in_container(&containerd, &image, &plan, "check-full");
    assert_eq!(code, Some(0), "check under containerd:\n{said}");
    assert!(
        said.contains("verdict: the agent can run here with every feature"),
        "{said}"
    );
    let items: Vec<&str> = said
        .lines()
        .filter(|l| l.starts_with("ok ") || l.starts_with("limited") || l.starts_with("MISSING"))
        .collect();
    assert!(items.len() >= 40, "one line per item:\n{said}");
    assert!(items.iter().all(|l| l.starts_with("ok ")), "{said}");
    for needle in [
        "capability CAP_BPF",
        "capability CAP_NET_ADMIN",
        "capability CAP_PERFMON",
        "mounted at /host/sys/fs/cgroup/unified",
        "a test map pinned and removed in /host/sys/fs/bpf/merbridge-edge",
        "probe mb_getsockopt passes the verifier",
        "probe mb_sk_lookup passes the verifier",
        "pod network namespace files",
    ] {
        assert!(said.contains(needle), "{needle:?} in:\n{said}");
    }
    // The same container less one capability: check names it and refuses, so the
    // grants above are what made the difference.
    let mut fewer = plan.clone();
    let at = fewer
        .flags
        .iter()
        .position(|f| f == "CAP_BPF")
        .expect("CAP_BPF added");
    fewer.flags[at - 1] = "--cap-drop".into();
    let (code, said) = check_in_container(&containerd, &image, &fewer, "check-nobpf");
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("MISSING  capability CAP_BPF"), "{said}");

    let dir = containerd.dir.clone();
    let pid = containerd.pid().unwrap();
    containerd.shutdown().expect("tear-down leaves nothing");
    assert!(!dir.exists());
    assert!(!Path::new(&format!("/proc/{pid}")).exists() || is_zombie_or_gone(pid));
}

/// Whether `pid` is gone (a reaped child's pid may be reused, but not so soon).
fn is_zombie_or_gone(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.contains(") Z "))
        .unwrap_or(true)
}

#[test]
fn the_agent_under_containerd_holds_only_the_manifests_grants_and_dies_with_sigkill() {
    let Some(_serial) = runtime_test("run under containerd") else {
        return;
    };
    let node = Node::new(HELPER.as_ref()).unwrap();
    let empty = node.scratch().join("pods.json");
    fs::write(&empty, r#"{"kind":"PodList","apiVersion":"v1","items":[]}"#).unwrap();
    let root = node.cgroup_root.to_str().unwrap();
    let bpffs = node.bpffs.to_str().unwrap();
    let mut agent = Agent::start_in_containerd(
        &[
            "run",
            "--cgroup-root",
            root,
            "--bpffs",
            bpffs,
            "--pods-file",
            empty.to_str().unwrap(),
            "--interval",
            "200ms",
        ],
        &node.scratch().join("agent.log"),
    )
    .unwrap();
    let seen = agent.path_seen(&node.cgroup_root);
    agent
        .wait_log(
            &format!("probes attached to {} ", seen.display()),
            Duration::from_secs(10),
        )
        .unwrap();
    // Ready once the first pass after attaching is done (a moment after the log line).
    let ready_by = std::time::Instant::now() + Duration::from_secs(5);
    while agent.http_get("/readyz").map(|r| r.0).ok() != Some(200)
        && std::time::Instant::now() < ready_by
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(agent.http_get("/readyz").unwrap().0, 200, "{}", agent.log());
    let pid = agent.proc.pid();
    assert_ne!(pid, agent.proc.child.id(), "the task, not ctr");
    assert_eq!(
        agent.effective_capabilities(),
        Manifest::load().capability_mask(),
        "the task's effective capabilities"
    );
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    assert_eq!(
        field("Seccomp:"),
        "2",
        "a seccomp filter (the default profile)"
    );
    assert_eq!(field("NoNewPrivs:"), "1", "allowPrivilegeEscalation: false");
    assert_eq!(field("CapBnd:"), field("CapEff:"), "nothing more in reach");
    // Read-only root, in its own mount namespace.
    let mounts = fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let root_opts = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .and_then(|l| l.split_whitespace().nth(5))
        .unwrap_or_default()
        .to_string();
    assert!(root_opts.split(',').any(|o| o == "ro"), "{root_opts}");
    // The manifest's read-only cgroup mount: read-only at its top; the hierarchies
    // mounted below it on a hybrid host stay writable (runc binds them read-only
    // non-recursively), which the README notes.
    let below: Vec<(String, String)> = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let point = f.nth(4)?;
            let opts = f.next()?;
            point
                .starts_with("/host/sys/fs/cgroup")
                .then(|| (point.to_string(), opts.to_string()))
        })
        .collect();
    assert!(
        below
            .iter()
            .any(|(p, o)| p == "/host/sys/fs/cgroup" && o.split(',').any(|o| o == "ro")),
        "{below:?}"
    );
    let writable: Vec<&String> = below
        .iter()
        .filter(|(_, o)| o.split(',').any(|o| o == "rw"))
        .map(|(p, _)| p)
        .collect();
    eprintln!("writable below the read-only cgroup mount: {writable:?}");
    // Its cgroup: below the private containerd's parent, in the cgroup2 hierarchy too.
    let containerd = &agent.container.as_ref().unwrap().containerd;
    let parent = containerd.cgroup_parent.clone();
    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        cgroups
            .lines()
            .any(|l| l.starts_with("0::") && l.contains(&parent)),
        "{cgroups}"
    );
    let dir = containerd.dir.clone();

    agent.proc.signal(libc::SIGKILL);
    let status = agent
        .proc
        .wait_for(Duration::from_secs(5))
        .expect("ctr run ends when its task is killed");
    assert_eq!(status.code(), Some(137), "128 + SIGKILL");
    assert!(is_zombie_or_gone(pid));
    let InContainerParts { containerd } = take(agent);
    assert!(
        containerd.list("containers").unwrap().is_empty(),
        "ctr run --rm"
    );
    containerd.shutdown().expect("tear-down leaves nothing");
    assert!(!dir.exists());
    for h in cgroup_hierarchies() {
        assert!(!h.join(parent.trim_start_matches('/')).exists());
    }
}

/// The private containerd of an agent that has exited, taken out to be shut down here
/// (so the test sees its tear-down's result rather than a panic in drop).
struct InContainerParts {
    containerd: Containerd,
}

fn take(mut agent: Agent) -> InContainerParts {
    let c = agent.container.take().expect("under containerd");
    InContainerParts {
        containerd: c.containerd,
    }
}

#[test]
fn nothing_of_any_private_containerd_is_left_on_the_machine() {
    // Run last in scripts/test, after the suites that ran their agents under
    // containerd; alone it checks what earlier runs left.
    let tmp = std::env::temp_dir();
    let dirs = private_containerd_entries(&tmp);
    let me = std::process::id();
    let procs: Vec<String> = fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter_map(|pid| {
            let c = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            c.contains(&format!("{}/mbe-containerd-", tmp.display()))
                .then(|| format!("{pid}: {c}"))
        })
        .collect();
    let cgroups: Vec<PathBuf> = cgroup_hierarchies()
        .iter()
        .flat_map(|h| private_containerd_entries(h))
        .collect();
    assert!(dirs.is_empty(), "directories left: {dirs:?}");
    assert!(procs.is_empty(), "processes left: {procs:?}");
    assert!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
}

/// The entries of `dir` a private containerd of these tests made (`mbe-containerd-*`);
/// none when `dir` cannot be read.
fn private_containerd_entries(dir: &std::path::Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("mbe-containerd-"))
        })
        .collect()
}
