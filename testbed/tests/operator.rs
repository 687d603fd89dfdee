//! The operator commands on the real kernel: `check`, `cleanup`, and `run` refusing
//! with `check`'s words. (`status` is tested against a programmed node in kubelet.rs.)
//!
//! Needs root, bpftool and setpriv (util-linux); skipped with a note otherwise, a
//! failure when MBE_REQUIRE_KERNEL_TESTS=1.
use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use merbridge_edge_testbed::{
    Node,
    agent::{Agent, agent_binary},
    fixture::kernel_test,
    manifest::Manifest,
};

const HELPER: &str = env!("CARGO_BIN_EXE_mbe-testbed");

fn agent_cmd(args: &[&str]) -> Output {
    Command::new(agent_binary())
        .args(args)
        .output()
        .expect("agent binary runs")
}

/// `merbridge-edge args…` with the capabilities `caps` (setpriv syntax) only.
fn with_caps(caps: &str, args: &[&str]) -> Command {
    let mut c = Command::new("setpriv");
    c.arg(format!("--inh-caps={caps}"))
        .arg(format!("--bounding-set={caps}"))
        .arg("--")
        .arg(agent_binary())
        .args(args);
    c
}

/// `merbridge-edge args…` with CAP_BPF and CAP_SYS_ADMIN out of reach.
fn without_bpf_caps(args: &[&str]) -> Command {
    with_caps("-bpf,-sys_admin", args)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn check_passes_here_and_names_a_missing_capability() {
    let Some(_serial) = kernel_test("check") else {
        return;
    };
    // The pod network namespace directory, as a node running pods has it (the kubelet
    // makes the manifest's hostPath when it is missing).
    std::fs::create_dir_all(merbridge_edge::pod_netns::DEFAULT_NETNS_DIR).unwrap();
    // A bpffs to pin in, as the manifest hands the host's to the agent.
    let scratch =
        |name: &str| std::env::temp_dir().join(format!("mbe-check-{name}-{}", std::process::id()));
    let fs = Bpffs::mount(&scratch("bpffs"), &[]);
    let bpffs = fs.0.to_str().unwrap();
    let out = agent_cmd(&["check", "--bpffs", bpffs]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(
        !said.contains("MISSING") && !said.contains("limited"),
        "{said}"
    );
    let pinned = format!("a test map pinned and removed in {bpffs}/merbridge-edge");
    assert!(
        said.lines()
            .any(|l| l.starts_with("ok       bpffs pinning ") && l.ends_with(&pinned)),
        "{pinned:?} not in\n{said}"
    );
    for needle in [
        "ok       capability CAP_BPF",
        "program type cgroup sockopt",
        "map type sockhash",
        "helper bpf_msg_redirect_hash",
        "probe mb_getsockopt passes the verifier",
        "verdict: the agent can run here with every feature",
    ] {
        assert!(said.contains(needle), "{needle:?} not in\n{said}");
    }
    let json: serde_json::Value =
        serde_json::from_slice(&agent_cmd(&["check", "--json"]).stdout).expect("JSON");
    assert_eq!(json["verdict"], "full");
    assert!(json["items"].as_array().unwrap().len() > 20);

    // Least privilege: the capabilities the k3s manifest grants are enough, and each
    // one taken away is named.
    let manifest = Manifest::load();
    let granted = manifest.setpriv_capabilities();
    let out = with_caps(&granted, &["check", "--bpffs", bpffs])
        .output()
        .expect("setpriv");
    assert_eq!(out.status.code(), Some(0), "{granted}: {}", text(&out));
    assert!(
        text(&out).contains("ok       bpffs pinning"),
        "{}",
        text(&out)
    );
    // The test pin and the directory it made are gone again.
    assert!(!fs.0.join("merbridge-edge").exists());

    // A bpffs the agent may not write (read-only here; AppArmor's EACCES on a node): the
    // exact error and what it costs, while the agent can still run with every feature.
    let ro = Bpffs::mount(&scratch("bpffs-ro"), &["-o", "ro"]);
    let out = agent_cmd(&["check", "--bpffs", ro.0.to_str().unwrap()]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(0), "{said}");
    let refused = format!(
        "creating {}/merbridge-edge: EROFS: Read-only file system (os error 30) — needed by keeping sk_msg-accelerated connections whole across agent restarts",
        ro.0.display()
    );
    assert!(
        said.lines()
            .any(|l| l.starts_with("limited  bpffs pinning ") && l.contains(&refused)),
        "{refused:?} not in\n{said}"
    );
    assert!(
        said.contains("verdict: the agent can run here with every feature\nbut pinning in bpffs fails: sk_msg-accelerated connections still open when the agent stops, restarts or crashes can be cut"),
        "{said}"
    );
    let json: serde_json::Value = serde_json::from_slice(
        &agent_cmd(&["check", "--json", "--bpffs", ro.0.to_str().unwrap()]).stdout,
    )
    .expect("JSON");
    assert_eq!(json["verdict"], "full");
    let item = json["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["what"] == "bpffs pinning")
        .unwrap();
    assert_eq!(item["ok"], false);
    assert_eq!(item["impact"], "restarts");
    for cap in manifest.agent_capabilities() {
        let fewer = granted.replace(&format!(",+{}", cap.to_lowercase()), "");
        let out = with_caps(&fewer, &["check"]).output().expect("setpriv");
        let said = text(&out);
        assert_eq!(out.status.code(), Some(1), "{fewer}: {said}");
        assert!(
            said.contains(&format!("MISSING  capability CAP_{cap}")),
            "{fewer}: {said}"
        );
    }

    let out = without_bpf_caps(&["check"]).output().expect("setpriv");
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("MISSING  capability CAP_BPF") && said.contains("grant CAP_BPF"),
        "{said}"
    );
}

#[test]
fn run_refuses_without_the_capability_in_checks_words() {
    let Some(_serial) = kernel_test("run_refuses") else {
        return;
    };
    let node = Node::new(HELPER.as_ref()).unwrap();
    let pods = node.scratch().join("pods.json");
    std::fs::write(&pods, r#"{"kind":"PodList","apiVersion":"v1","items":[]}"#).unwrap();
    let root = node.cgroup_root.display().to_string();
    let out = without_bpf_caps(&[
        "run",
        "--pods-file",
        pods.to_str().unwrap(),
        "--cgroup-root",
        &root,
        "--metrics-addr",
        "off",
    ])
    .output()
    .expect("setpriv");
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("capability CAP_BPF: not held"), "{said}");
    assert!(said.contains("cannot run the agent"), "{said}");
}

/// An empty PodList.
const NO_PODS: &str = r#"{"kind":"PodList","apiVersion":"v1","items":[]}"#;

/// A ready agent on `node` reading an empty pods file (`pods.json` in its scratch
/// directory, returned too), with `extra` flags.
fn agent_on_empty_pods_file(node: &Node, extra: &[&str]) -> (Agent, PathBuf) {
    let pods = node.scratch().join("pods.json");
    std::fs::write(&pods, NO_PODS).unwrap();
    let root = node.cgroup_root.display().to_string();
    let mut args = vec![
        "run",
        "--pods-file",
        pods.to_str().unwrap(),
        "--cgroup-root",
        &root,
    ];
    args.extend_from_slice(extra);
    let mut agent = Agent::start(&args, &node.scratch().join("agent.log")).unwrap();
    agent
        .wait_metric(
            "merbridge_edge_ready",
            |v| v == 1.0,
            Duration::from_secs(10),
        )
        .unwrap();
    (agent, pods)
}

#[test]
fn run_says_what_a_restart_costs_when_pinning_fails() {
    let Some(_serial) = kernel_test("run_unpinned") else {
        return;
    };
    let node = Node::new(HELPER.as_ref()).unwrap();
    let ro = Bpffs::mount(&node.scratch().join("bpffs-ro"), &["-o", "ro"]);
    let (mut agent, _) = agent_on_empty_pods_file(
        &node,
        &["--bpffs", ro.0.to_str().unwrap(), "--pin-inbound-listeners"],
    );
    agent
        .wait_log("reading pods from", Duration::from_secs(10))
        .unwrap();
    let log = agent.log();
    // Said once at start, before the pins are tried: both costs, and the error.
    let said: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("bpffs pinning fails, so an agent restart costs this: "))
        .collect();
    assert_eq!(said.len(), 1, "{log}");
    for needle in [
        "sk_msg-accelerated connections still open when the agent stops, restarts or crashes can be cut",
        "--pin-inbound-listeners has no effect: a restarted agent does not adopt the sidecars' inbound listeners",
        "mount the host's /sys/fs/bpf elsewhere",
    ] {
        assert!(said[0].contains(needle), "{needle:?} not in {}", said[0]);
    }
    assert!(
        log.contains(&format!(
            "bpffs pinning: creating {}/merbridge-edge: EROFS",
            ro.0.display()
        )),
        "{log}"
    );
    // The agent runs on, unpinned (and became ready).
    assert_eq!(agent.http_get("/healthz").unwrap().0, 200);
}

#[test]
fn healthz_fails_while_the_main_loop_is_stuck_and_recovers_after() {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let Some(_serial) = kernel_test("healthz_stuck") else {
        return;
    };
    let node = Node::new(HELPER.as_ref()).unwrap();
    let bpffs = node.bpffs.display().to_string();
    let (mut agent, pods) =
        agent_on_empty_pods_file(&node, &["--bpffs", &bpffs, "--interval", "1s"]);
    // A pods file: max(3 × 1 s, 10 s), no kubelet timeout.
    agent
        .wait_log(
            "/healthz fails when the main loop completes no pass for 10.0s",
            Duration::from_secs(10),
        )
        .unwrap();
    assert_eq!(agent.http_get("/healthz").unwrap(), (200, "ok\n".into()));

    // The main loop blocks on something the test holds: the pods file becomes a FIFO
    // nobody writes, so re-reading it waits in open(2) (as on a hung network
    // filesystem). The HTTP thread answers on.
    let fifo = node.scratch().join("pods.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    std::fs::rename(&fifo, &pods).unwrap();
    let stuck = std::time::Instant::now();
    let body = loop {
        let (status, body) = agent.http_get("/healthz").unwrap();
        if status == 503 {
            break body;
        }
        assert_eq!(status, 200, "{body}");
        assert!(
            stuck.elapsed() < Duration::from_secs(13),
            "/healthz still {status} {:?} after the loop stopped; log:\n{}",
            stuck.elapsed(),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let took = stuck.elapsed();
    assert!(
        took > Duration::from_millis(9500),
        "503 after only {took:?}: {body}"
    );
    assert!(
        body.starts_with("not healthy: the main loop has not completed a pass for 1")
            && body.ends_with("s (bound 10.0s)\n")
            && body.lines().count() == 1,
        "{body:?}"
    );
    // Readiness is unchanged by a stuck loop; the metrics still answer.
    assert_eq!(agent.http_get("/readyz").unwrap().0, 200);
    assert_eq!(agent.metric("merbridge_edge_ready").unwrap(), 1.0);

    // Unblock it: a writer appears (non-blocking: ENXIO unless the agent is the reader
    // waiting there), a regular file takes the name back, the FIFO ends after a list.
    let mut writer = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&pods)
        .expect("the agent is waiting to read the FIFO");
    let file = node.scratch().join("pods.json.new");
    std::fs::write(&file, NO_PODS).unwrap();
    std::fs::rename(&file, &pods).unwrap();
    writer.write_all(NO_PODS.as_bytes()).unwrap();
    drop(writer);
    let freed = std::time::Instant::now();
    loop {
        let (status, body) = agent.http_get("/healthz").unwrap();
        if status == 200 {
            break;
        }
        assert!(
            freed.elapsed() < Duration::from_secs(3),
            "/healthz still {status} {body:?} after the loop was freed; log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(agent.http_get("/readyz").unwrap().0, 200);
}

/// A bpffs mounted for the test, unmounted and removed on drop.
struct Bpffs(PathBuf);

impl Bpffs {
    /// Mounts a bpffs at `at` with mount(8) `options` (like `-o ro`).
    fn mount(at: &Path, options: &[&str]) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .args(options)
            .arg(at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting bpffs at {}", at.display());
        Self(at.to_path_buf())
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn cleanup_removes_leftover_pins_is_idempotent_and_waits_for_a_running_agent() {
    let Some(_serial) = kernel_test("cleanup") else {
        return;
    };
    let node = Node::new(HELPER.as_ref()).unwrap();
    let fs = Bpffs::mount(&node.scratch().join("bpffs"), &[]);
    let ours = fs.0.join("merbridge-edge");
    std::fs::create_dir_all(ours.join("old")).unwrap();
    for (path, name) in [
        (ours.join("old_map"), "mb_old"),
        (ours.join("old/map2"), "mb_old2"),
    ] {
        let ok = Command::new("bpftool")
            .args(["map", "create"])
            .arg(&path)
            .args([
                "type", "hash", "key", "4", "value", "4", "entries", "4", "name", name,
            ])
            .status()
            .unwrap()
            .success();
        assert!(ok, "bpftool map create");
    }
    // Somebody else's pin is not ours to remove.
    let theirs = fs.0.join("other-tool");
    std::fs::create_dir_all(&theirs).unwrap();

    // While an agent runs, cleanup refuses (it would take the agent's attachments).
    let pods = node.scratch().join("pods.json");
    std::fs::write(&pods, r#"{"kind":"PodList","apiVersion":"v1","items":[]}"#).unwrap();
    let root = node.cgroup_root.display().to_string();
    let mut agent = Agent::start(
        &[
            "run",
            "--pods-file",
            pods.to_str().unwrap(),
            "--cgroup-root",
            &root,
        ],
        &node.scratch().join("agent.log"),
    )
    .unwrap();
    agent
        .wait_log("reading pods from", Duration::from_secs(10))
        .unwrap();
    let out = agent_cmd(&["cleanup"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("an agent is running"), "{}", text(&out));
    assert!(
        ours.join("old_map").exists(),
        "nothing removed while refusing"
    );

    agent.proc.signal(libc::SIGKILL);
    agent.proc.wait_for(Duration::from_secs(2)).expect("killed");
    let out = agent_cmd(&["cleanup"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(
        said.contains(&format!("removed pin {}", ours.join("old_map").display())),
        "{said}"
    );
    assert!(
        said.contains(&format!("removed pin {}", ours.join("old/map2").display())),
        "{said}"
    );
    assert!(!ours.exists() && theirs.exists());
    let maps = Command::new("bpftool")
        .args(["map", "show"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&maps.stdout).contains("mb_old"),
        "pinned maps freed"
    );
    // Twice in a row: nothing left, still a success.
    for _ in 0..2 {
        let out = agent_cmd(&["cleanup"]);
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "nothing to clean up"
        );
    }
}

/// What a finished or interrupted demo must not leave: namespaces, test cgroups,
/// attached programs.
fn assert_nothing_left(said: &str) {
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let netns = String::from_utf8_lossy(&netns.stdout);
    assert!(
        !netns.lines().any(|l| l.starts_with("mbe-")),
        "netns left: {netns}\n{said}"
    );
    let cg2 = merbridge_edge_testbed::node::cgroup2_mount().unwrap();
    let left: Vec<_> = std::fs::read_dir(&cg2)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("mbe-test-"))
        .collect();
    assert!(left.is_empty(), "cgroups left: {left:?}\n{said}");
    let progs = Command::new("bpftool")
        .args(["cgroup", "tree"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&progs.stdout).contains("mb_"),
        "programs still attached\n{said}"
    );
}

#[test]
fn demo_runs_end_to_end_and_leaves_nothing() {
    let Some(_serial) = kernel_test("demo") else {
        return;
    };
    let started = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_mbe-demo"))
        .output()
        .unwrap();
    let said = text(&out);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(started.elapsed() < Duration::from_secs(60), "{said}");
    for needle in [
        "web app → sidecar web (outbound, original dst",
        "→ sidecar api (inbound, original dst",
        "→ db app",
        // A plain pod is not redirected, but its connection is captured at the pod it
        // reaches.
        "db app → sidecar api (inbound, original dst",
        "connect + greeting p50 (µs)",
        "64 B request/response p99 (µs)",
        "conntrack entries added                       0",
    ] {
        assert!(said.contains(needle), "{needle:?} not in\n{said}");
    }
    assert_nothing_left(&said);
}

#[test]
fn an_interrupted_demo_removes_what_it_made() {
    let Some(_serial) = kernel_test("demo_interrupted") else {
        return;
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_mbe-demo"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt while the eBPF timing runs (agent up, sidecars and namespaces in place).
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        if std::io::BufRead::read_line(&mut stdout, &mut line).unwrap() == 0 {
            break;
        }
        seen.push_str(&line);
        if line.contains("[5/7]") {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            break;
        }
    }
    let status = child.wait().unwrap();
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut stdout, &mut rest);
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err);
    let said = format!("{seen}{rest}{err}");
    assert_eq!(status.code(), Some(1), "{said}");
    assert!(
        said.contains("interrupted") && said.contains("removed"),
        "{said}"
    );
    assert_nothing_left(&said);
}
