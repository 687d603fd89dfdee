//! The live demo (root, any Linux with cgroup v2; no Kubernetes): a small node in
//! network namespaces with two Istio pods (app + sidecar stand-in, uid 1337) and a plain
//! pod, an HTTPS kubelet stand-in listing them, and the agent reading it. Real traffic
//! shows each connection's path and the original destination the sidecars saw; then the
//! same traffic goes through Istio-style iptables rules in the same namespaces and the
//! two are compared (latency p50/p99, conntrack entries). Everything it made is removed
//! at the end, on failure and on Ctrl-C; `--keep` leaves it up for poking.
use std::{
    fs,
    io::Write,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use merbridge_edge_testbed::{
    Node, Pod, PodSpec,
    agent::Agent,
    fixture::{start_sidecar, start_stand_ins},
    iptables::install_istio_iptables,
    kubelet_standin::{KubeletStandIn, Pki, Reply},
    node::missing_prerequisite,
    podlist::pod_list,
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Stops the demo (and so cleans up) once Ctrl-C was pressed.
fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

const CHUNKS: usize = 10;
const CONNS_PER_CHUNK: &str = "30";
const RR_PER_CONN: &str = "10";

fn main() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    let keep = std::env::args().any(|a| a == "--keep");
    let started = Instant::now();
    match demo(keep) {
        Ok(()) => println!("\ndone in {:.0} s", started.elapsed().as_secs_f64()),
        Err(e) => {
            eprintln!("\ndemo stopped: {e:#}\neverything it made has been removed");
            std::process::exit(1);
        }
    }
}

fn step(n: u32, msg: &str) {
    println!("\n[{n}/7] {msg}");
}

fn progress(label: &str, done: usize, total: usize) {
    // SAFETY: isatty has no preconditions.
    let tty = unsafe { libc::isatty(1) } == 1;
    if !tty && done < total {
        return;
    }
    let filled = done * 30 / total;
    print!(
        "{}      {label:<28} [{}{}] {:>3}%",
        if tty { "\r" } else { "" },
        "#".repeat(filled),
        ".".repeat(30 - filled),
        done * 100 / total
    );
    let _ = std::io::stdout().flush();
    if done == total {
        println!();
    }
}

/// Latency samples (µs) and conntrack entries added, for one way of redirecting.
struct Measured {
    connect: Vec<u64>,
    rr: Vec<u64>,
    conntrack_added: u64,
}

fn conntrack_count(pod: &Pod) -> u64 {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            &pod.netns,
            "cat",
            "/proc/sys/net/netfilter/nf_conntrack_count",
        ])
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(0)
}

fn measure(node: &Node, from: &Pod, to: &Pod, label: &str) -> Result<Measured> {
    let before: u64 = conntrack_count(from) + conntrack_count(to);
    let (mut connect, mut rr) = (vec![], vec![]);
    let target = format!("{}:8080", to.ip4);
    progress(label, 0, CHUNKS);
    for chunk in 1..=CHUNKS {
        check_interrupt()?;
        let out = node.run_in(
            from,
            Some("app"),
            Some(1000),
            &["latency", &target, CONNS_PER_CHUNK, RR_PER_CONN, "64"],
        )?;
        for line in out.lines() {
            let (key, values) = line.split_once('=').unwrap_or(("", ""));
            let samples = values.split(',').filter_map(|v| v.parse::<u64>().ok());
            match key {
                "connect_us" => connect.extend(samples),
                "rr_us" => rr.extend(samples),
                _ => {}
            }
        }
        progress(label, chunk, CHUNKS);
    }
    connect.sort_unstable();
    rr.sort_unstable();
    let after = conntrack_count(from) + conntrack_count(to);
    Ok(Measured {
        connect,
        rr,
        conntrack_added: after.saturating_sub(before),
    })
}

fn pct(v: &[u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn sidecar_lines(node: &Node, pod: &str) -> Vec<String> {
    fs::read_to_string(node.scratch().join(format!("sidecar-{pod}.log")))
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split(' ')
        .find_map(|p| p.strip_prefix(key))
        .unwrap_or("?")
}

/// Sends one connection and prints the path it took, from the sidecars' logs.
fn show_path(node: &Node, from: &Pod, target: &str, meshed: &[&str]) -> Result<()> {
    let before: Vec<usize> = meshed
        .iter()
        .map(|p| sidecar_lines(node, p).len())
        .collect();
    let out = node.run_in(from, Some("app"), Some(1000), &["client", target])?;
    std::thread::sleep(Duration::from_millis(150));
    let mut path = vec![format!("{} app", from.spec.name)];
    for (p, n) in meshed.iter().zip(before) {
        for l in sidecar_lines(node, p).iter().skip(n) {
            path.push(format!(
                "sidecar {p} ({}, original dst {})",
                field(l, "listener="),
                field(l, "orig=")
            ));
        }
    }
    path.push(field(&out, "who=").replace("-app", " app"));
    println!("      {target:<28} {}", path.join(" → "));
    Ok(())
}

fn demo(keep: bool) -> Result<()> {
    if let Some(why) = missing_prerequisite() {
        bail!("the demo {why}");
    }
    let helper = std::env::current_exe()?.with_file_name("mbe-testbed");
    let mut node = Node::new(&helper)?;

    step(
        1,
        "a node in network namespaces: pods web and api (Istio), db (plain)",
    );
    let mut pods = vec![];
    for spec in [
        PodSpec::istio("web"),
        PodSpec::istio("api"),
        PodSpec::plain("db"),
    ] {
        check_interrupt()?;
        let meshed = spec.containers.iter().any(|c| c == "istio-proxy");
        let pod = node.add_pod(spec)?;
        let name = pod.spec.name.clone();
        // Apps now; sidecars once the agent runs (step 3), as on a node with the agent.
        start_stand_ins(&mut node, &pod, &["[::]:8080"], false)?;
        println!(
            "      pod {name:<4} {:<15} {:<22} {}",
            pod.ip4,
            pod.ip6,
            if meshed {
                "app (uid 1000) + sidecar (uid 1337, ports 15001/15006)"
            } else {
                "app only"
            }
        );
        pods.push(pod);
    }
    let (web, api, db) = (pods[0].clone(), pods[1].clone(), pods[2].clone());

    step(
        2,
        "an HTTPS kubelet stand-in lists them (test CA, bearer token)",
    );
    let pki = Pki::new(&node.scratch().join("pki"), "merbridge-edge-demo-ca")?;
    let kubelet = KubeletStandIn::start(
        &pki,
        None,
        "demo-token",
        Reply::Body(serde_json::to_vec(&pod_list(pods.iter(), "edge-1"))?),
    )?;
    let token = node.scratch().join("token");
    fs::write(&token, "demo-token")?;
    println!("      GET {}/pods", kubelet.url());

    step(3, "the agent reads the kubelet and programs the maps");
    let root = node.cgroup_root.display().to_string();
    let mut args = vec!["run".to_string(), "--cgroup-root".into(), root];
    args.extend(kubelet.agent_flags(&token, &pki.ca_file));
    args.extend(["--node-name", "edge-1", "--interval", "1s"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = Agent::start(&args, &node.scratch().join("agent.log"))?;
    agent.wait_log_count("added: mesh istio", 2, Duration::from_secs(15))?;
    for pod in [&web, &api] {
        start_sidecar(&node, pod, None)?;
    }
    println!("      sidecars of web and api started: their inbound listeners are registered");
    for line in agent
        .log()
        .lines()
        .filter(|l| l.contains("probes attached") || l.contains(" added: "))
    {
        println!("      agent: {}", line.split("] ").nth(1).unwrap_or(line));
    }

    step(4, "real traffic, and the path each connection took");
    let meshed = ["web", "api"];
    show_path(&node, &web, &format!("{}:8080", api.ip4), &meshed)?;
    show_path(&node, &web, &format!("[{}]:8080", api.ip6), &meshed)?;
    show_path(&node, &web, &format!("{}:8080", db.ip4), &meshed)?;
    show_path(&node, &db, &format!("{}:8080", api.ip4), &meshed)?;
    // The agent publishes its counters once per interval.
    let sample = |e: &str| format!("merbridge_edge_datapath_events_total{{event=\"{e}\"}}");
    agent.wait_metric(
        &sample("getsockopt_answered"),
        |v| v >= 5.0,
        Duration::from_secs(5),
    )?;
    for event in [
        "redirect_outbound",
        "redirect_inbound",
        "getsockopt_answered",
        "sk_msg_redirected",
    ] {
        let v = agent.metric(&sample(event))?;
        println!("      counter {event:<22} {v}");
    }

    step(5, "timing web → api with eBPF (agent running)");
    let ebpf = measure(&node, &web, &api, "eBPF")?;
    // Counters are published once per interval.
    std::thread::sleep(Duration::from_millis(1100));
    let ebpf_bytes = agent.metric("merbridge_edge_datapath_bytes_total{event=\"sk_msg\"}")?;
    println!("      sk_msg moved {ebpf_bytes} bytes socket to socket");

    step(
        6,
        "the same with Istio-style iptables REDIRECT rules (agent stopped)",
    );
    agent.proc.signal(libc::SIGTERM);
    agent
        .proc
        .wait_for(Duration::from_secs(3))
        .context("agent did not stop")?;
    println!("      agent stopped: its programs are detached");
    install_istio_iptables(&web.netns)?;
    install_istio_iptables(&api.netns)?;
    println!("      iptables nat rules installed in pods web and api (istio-iptables' chains)");
    if let Err(e) = show_path(&node, &web, &format!("{}:8080", api.ip4), &meshed) {
        for p in meshed {
            for l in sidecar_lines(&node, p).iter().rev().take(3) {
                eprintln!("      sidecar {p}: {l}");
            }
        }
        return Err(e);
    }
    let iptables = measure(&node, &web, &api, "iptables")?;

    step(7, "side by side (web app → api app through both sidecars)");
    println!(
        "      {:<34} {:>12} {:>12} {:>8}",
        "", "eBPF", "iptables", "ratio"
    );
    let mut rows: Vec<(String, u64, u64)> = vec![];
    for (what, e, i) in [
        ("connect + greeting", &ebpf.connect, &iptables.connect),
        ("64 B request/response", &ebpf.rr, &iptables.rr),
    ] {
        for (p, name) in [(0.5, "p50"), (0.99, "p99")] {
            rows.push((format!("{what} {name} (µs)"), pct(e, p), pct(i, p)));
        }
    }
    rows.push((
        "conntrack entries added".into(),
        ebpf.conntrack_added,
        iptables.conntrack_added,
    ));
    for (what, e, i) in rows {
        let ratio = if e > 0 {
            format!("{:.2}x", i as f64 / e as f64)
        } else {
            "-".into()
        };
        println!("      {what:<34} {e:>12} {i:>12} {ratio:>8}");
    }
    println!(
        "      ({} connections, {} round trips each way of redirecting)",
        ebpf.connect.len(),
        ebpf.rr.len()
    );
    if keep {
        println!(
            "\n--keep: the sandbox stays up. Remove it with:\n{}",
            node.keep()
        );
    }
    Ok(())
}
