//! A small live demonstration on this machine (root, no Kubernetes): two Istio pods and
//! a plain pod in network namespaces, sidecar stand-ins, the agent fed a pods file,
//! and real traffic. Prints each step and what the sidecars saw; removes everything.
use std::{fs, os::unix::fs::PermissionsExt, time::Duration};

use anyhow::{Context, Result, bail};
use merbridge_edge_testbed::{
    Node, PodSpec,
    agent::Agent,
    node::missing_prerequisite,
    podlist::{pod_list, write_pod_list},
};

fn main() {
    if let Err(e) = demo() {
        eprintln!("demo failed: {e:#}");
        std::process::exit(1);
    }
}

fn step(msg: &str) {
    println!("==> {msg}");
}

fn demo() -> Result<()> {
    if let Some(why) = missing_prerequisite() {
        bail!("the demo {why}");
    }
    let helper = std::env::current_exe()?.with_file_name("mbe-testbed");
    let mut node = Node::new(&helper)?;
    step(&format!(
        "node: bridge in netns mbe-{}-node, agent cgroup {}",
        node.tag,
        node.cgroup_root.display()
    ));
    let mut pods = vec![];
    for spec in [
        PodSpec::istio("web"),
        PodSpec::istio("api"),
        PodSpec::plain("db"),
    ] {
        let meshed = spec.containers.iter().any(|c| c == "istio-proxy");
        let pod = node.add_pod(spec)?;
        let name = pod.spec.name.clone();
        node.spawn(
            &pod,
            Some("app"),
            Some(1000),
            &["echo", &format!("{name}-app"), "[::]:8080"],
        )?;
        if meshed {
            let log = node.scratch().join(format!("sidecar-{name}.log"));
            fs::write(&log, "")?;
            fs::set_permissions(&log, fs::Permissions::from_mode(0o666))?;
            node.spawn(
                &pod,
                Some("istio-proxy"),
                Some(1337),
                &["sidecar", &name, "15001", "15006", log.to_str().unwrap()],
            )?;
            node.wait_listening(&pod, 15006)?;
        }
        node.wait_listening(&pod, 8080)?;
        step(&format!(
            "pod {name}: {} / {}{}",
            pod.ip4,
            pod.ip6,
            if meshed {
                ", app (uid 1000) + sidecar stand-in (uid 1337)"
            } else {
                ", app only (not meshed)"
            }
        ));
        pods.push(pod);
    }
    let pods_file = node.scratch().join("pods.json");
    write_pod_list(&pods_file, &pod_list(pods.iter(), "edge-1"))?;
    step(&format!(
        "kubelet-style PodList written to {}",
        pods_file.display()
    ));
    let root = node
        .cgroup_root
        .to_str()
        .context("cgroup path")?
        .to_string();
    let mut agent = Agent::start(
        &[
            "run",
            "--pods-file",
            pods_file.to_str().unwrap(),
            "--cgroup-root",
            &root,
            "--interval",
            "200ms",
            "--log-level",
            "debug",
        ],
        &node.scratch().join("agent.log"),
    )?;
    agent.wait_log_count("added: mesh istio", 2, Duration::from_secs(10))?;
    for line in agent
        .log()
        .lines()
        .filter(|l| l.contains("probes attached") || l.contains("] pod "))
    {
        println!("    agent: {}", line.split("] ").nth(1).unwrap_or(line));
    }
    let (web, api, db) = (&pods[0], &pods[1], &pods[2]);
    for (from, to, what) in [
        (web, format!("{}:8080", api.ip4), "web app → api (IPv4)"),
        (web, format!("[{}]:8080", api.ip6), "web app → api (IPv6)"),
        (web, format!("{}:8080", db.ip4), "web app → db (not meshed)"),
        (
            db,
            format!("{}:8080", api.ip4),
            "db app → api (from a plain pod: untouched)",
        ),
    ] {
        step(what);
        let out = node.run_in(
            from,
            Some("app"),
            Some(1000),
            &["client", &to, "--bytes", "65536", "--conns", "8"],
        )?;
        for l in out.lines() {
            println!("    client: {l}");
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    for name in ["web", "api"] {
        let log = fs::read_to_string(node.scratch().join(format!("sidecar-{name}.log")))?;
        step(&format!(
            "sidecar {name} saw {} connections; first ones:",
            log.lines().count()
        ));
        for l in log.lines().take(3) {
            println!("    {l}");
        }
    }
    if let Some(c) = agent.log().lines().rev().find(|l| l.contains("counters: ")) {
        step("kernel counters");
        println!("    {}", c.split("counters: ").nth(1).unwrap_or(""));
    }
    agent.proc.signal(libc::SIGTERM);
    agent
        .proc
        .wait_for(Duration::from_secs(2))
        .context("agent did not stop within 2 s")?;
    step("agent stopped: programs detached; removing namespaces and cgroups");
    drop(node);
    step("done");
    Ok(())
}
