//! `merbridge-edge`: eBPF traffic interception and acceleration for service meshes.
//! The command line over the library (`src/lib.rs`), which holds everything else.

use std::path::PathBuf;

use argh::FromArgs;

use merbridge_edge::{
    check, cleanup,
    datapath::MapSizes,
    kubelet::{self, KubeletConfig},
    mesh::Mesh,
    policy::MeshSelection,
    run::{self, SourceConfig},
    status,
};

/// Merbridge Edge: redirects meshed pods' traffic to their sidecars with eBPF.
#[derive(FromArgs)]
struct Cli {
    /// print the version and exit
    #[argh(switch)]
    version: bool,
    #[argh(subcommand)]
    command: Option<Command>,
}

#[derive(FromArgs)]
#[argh(subcommand)]
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once at start; argh subcommands cannot be boxed"
)]
enum Command {
    Run(RunArgs),
    Check(CheckArgs),
    Status(StatusArgs),
    Cleanup(CleanupArgs),
}

/// Remove anything an agent could have left in the kernel (pins, links of mb_* programs); safe to repeat.
#[derive(FromArgs)]
#[argh(subcommand, name = "cleanup")]
struct CleanupArgs {
    /// go ahead even while an agent runs (it loses its attachments)
    #[argh(switch)]
    force: bool,
}

/// Show what a running agent has attached and programmed (read from its metrics address).
#[derive(FromArgs)]
#[argh(subcommand, name = "status")]
struct StatusArgs {
    /// the running agent's --metrics-addr (default 127.0.0.1:15890)
    #[argh(option, default = "([127, 0, 0, 1], 15890).into()")]
    metrics_addr: std::net::SocketAddr,
    /// print the status as JSON
    #[argh(switch)]
    json: bool,
}

/// Check that this kernel and process can run the agent (exit 0: fully; 3: without sk_msg acceleration; 1: not at all).
#[derive(FromArgs)]
#[argh(subcommand, name = "check")]
struct CheckArgs {
    /// print the report as JSON
    #[argh(switch)]
    json: bool,
    /// directory of pod network namespace files to check (default /var/run/netns)
    #[argh(
        option,
        default = "PathBuf::from(merbridge_edge::pod_netns::DEFAULT_NETNS_DIR)"
    )]
    netns_dir: PathBuf,
    /// bpffs mount whose pinning to try, as `run --bpffs` takes it (default /sys/fs/bpf,
    /// else the first bpffs mount)
    #[argh(option)]
    bpffs: Option<PathBuf>,
}

/// Attach the probes and keep their maps in step with the node's pods.
#[derive(FromArgs)]
#[argh(subcommand, name = "run")]
struct RunArgs {
    /// kubelet base URL (default https://$HOST_IP:10250, else https://127.0.0.1:10250)
    #[argh(option)]
    kubelet_url: Option<String>,
    /// bearer token file, re-read every poll (default: the service-account token, unless --client-cert is given)
    #[argh(option)]
    token_file: Option<PathBuf>,
    /// CA bundle that signed the kubelet's serving certificate (default: the service-account ca.crt)
    #[argh(option, default = "PathBuf::from(kubelet::SERVICE_ACCOUNT_CA)")]
    ca_file: PathBuf,
    /// do not verify the kubelet's certificate (insecure; logs a warning)
    #[argh(switch)]
    insecure_skip_tls_verify: bool,
    /// client certificate (PEM) signed by the kubelet's client CA, for use without a token
    #[argh(option)]
    client_cert: Option<PathBuf>,
    /// private key (PEM) of --client-cert
    #[argh(option)]
    client_key: Option<PathBuf>,
    /// limit on one kubelet request, body included, like 10s (default 10s; connecting: at most 3s)
    #[argh(
        option,
        default = "std::time::Duration::from_secs(10)",
        from_str_fn(run::parse_duration)
    )]
    kubelet_timeout: std::time::Duration,
    /// read pods from this v1 PodList JSON file instead of the kubelet (re-read when it changes)
    #[argh(option)]
    pods_file: Option<PathBuf>,
    /// cgroup v2 directory to attach to, or a hybrid /sys/fs/cgroup whose unified/ is one
    /// (default: the cgroup2 mount found in /proc/self/mountinfo)
    #[argh(option)]
    cgroup_root: Option<PathBuf>,
    /// bpffs mount where the sockhash and the sidecars' inbound listeners are pinned, so
    /// accelerated connections and inbound capture outlive an agent restart (default
    /// /sys/fs/bpf, else the first bpffs mount; in a container under containerd's
    /// AppArmor profile, which denies writes below /sys/fs/bpf, mount it elsewhere)
    #[argh(option)]
    bpffs: Option<PathBuf>,
    /// time between polls, like 2s or 500ms (default 2s)
    #[argh(
        option,
        default = "std::time::Duration::from_secs(2)",
        from_str_fn(run::parse_duration)
    )]
    interval: std::time::Duration,
    /// only program pods bound to this node (default: $NODE_NAME, else every pod listed)
    #[argh(option)]
    node_name: Option<String>,
    /// mesh to look for: auto, istio, linkerd, kuma or osm (default auto: decided per pod)
    #[argh(option, default = "MeshSelection::Auto", from_str_fn(parse_mesh))]
    mesh: MeshSelection,
    /// turn off sk_msg acceleration between local sockets (on by default)
    #[argh(switch)]
    no_accelerate: bool,
    /// directory of pod network namespace files, where inbound capture (sk_lookup) is
    /// attached (default /var/run/netns, where containerd's CRI plugin puts them)
    #[argh(
        option,
        default = "PathBuf::from(merbridge_edge::pod_netns::DEFAULT_NETNS_DIR)"
    )]
    netns_dir: PathBuf,
    /// leave inbound to the meshes' own iptables (no sk_lookup): inbound from anything
    /// but a local sidecar then reaches apps directly where those rules are absent
    #[argh(switch)]
    no_inbound_capture: bool,
    /// pin the sidecars' inbound listeners in bpffs so a restarted agent captures inbound
    /// at once (experimental: restarts under sk_msg streams then cut some streams)
    #[argh(switch)]
    pin_inbound_listeners: bool,
    /// size of the per-connection maps: meshed connections open at once (default 16384;
    /// each costs about 400 bytes of kernel memory)
    #[argh(option, default = "16384")]
    max_connections: u32,
    /// entries of each rule map (port rules, address rules), shared by all pods; one pod
    /// may take a 16th (default 65536)
    #[argh(option, default = "65536")]
    max_rules: u32,
    /// meshed pods the maps hold (default 128; a kubelet runs at most 110 by default)
    #[argh(option, default = "128")]
    max_pods: u32,
    /// address for /metrics, /healthz and /readyz, or "off" (default 127.0.0.1:15890);
    /// /healthz answers 503 when the main loop has completed no pass for max(3 x
    /// --interval, 10s), plus --kubelet-timeout when reading the kubelet (20s by default)
    #[argh(
        option,
        default = "Some(([127, 0, 0, 1], 15890).into())",
        from_str_fn(parse_listen)
    )]
    metrics_addr: Option<std::net::SocketAddr>,
    /// log level: error, warn, info, debug or trace (default info)
    #[argh(option, default = "log::LevelFilter::Info", from_str_fn(parse_level))]
    log_level: log::LevelFilter,
}

fn parse_mesh(s: &str) -> Result<MeshSelection, String> {
    if s == "auto" {
        return Ok(MeshSelection::Auto);
    }
    Mesh::from_name(s)
        .map(MeshSelection::Only)
        .ok_or_else(|| format!("unknown mesh {s:?}: use auto, istio, linkerd, kuma or osm"))
}

fn parse_listen(s: &str) -> Result<Option<std::net::SocketAddr>, String> {
    if s == "off" {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|_| format!("{s:?} is not an address like 127.0.0.1:15890 (or off)"))
}

/// The pod source the flags ask for.
fn source_config(args: &RunArgs) -> Result<SourceConfig, String> {
    if let Some(file) = &args.pods_file {
        if args.kubelet_url.is_some() {
            return Err("--pods-file and --kubelet-url exclude each other".into());
        }
        return Ok(SourceConfig::File(file.clone()));
    }
    let client_cert = match (&args.client_cert, &args.client_key) {
        (Some(c), Some(k)) => Some((c.clone(), k.clone())),
        (None, None) => None,
        _ => return Err("--client-cert and --client-key go together".into()),
    };
    let token_file = match (&args.token_file, &client_cert) {
        (Some(t), _) => Some(t.clone()),
        (None, None) => Some(PathBuf::from(kubelet::SERVICE_ACCOUNT_TOKEN)),
        (None, Some(_)) => None,
    };
    let url = args
        .kubelet_url
        .clone()
        .unwrap_or_else(|| kubelet::default_url(std::env::var("HOST_IP").ok().as_deref()));
    if !url.starts_with("https://") {
        return Err(format!(
            "--kubelet-url {url:?}: the kubelet is reached over https:// only"
        ));
    }
    Ok(SourceConfig::Kubelet(KubeletConfig {
        url,
        token_file,
        ca_file: args.ca_file.clone(),
        insecure_skip_tls_verify: args.insecure_skip_tls_verify,
        client_cert,
        connect_timeout: std::time::Duration::from_secs(3).min(args.kubelet_timeout),
        request_timeout: args.kubelet_timeout,
    }))
}

fn parse_level(s: &str) -> Result<log::LevelFilter, String> {
    s.parse()
        .map_err(|_| format!("unknown log level {s:?}: use error, warn, info, debug or trace"))
}

fn main() {
    let cli: Cli = argh::from_env();
    if cli.version {
        println!("merbridge-edge {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    let args = match cli.command {
        Some(Command::Run(args)) => args,
        Some(Command::Check(c)) => {
            let report = check::run_checks(&c.netns_dir, c.bpffs.as_deref());
            if c.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("report serialises")
                );
            } else {
                println!("kernel {}\n", report.kernel);
                print!("{}", check::render(&report));
            }
            std::process::exit(report.verdict.exit_code());
        }
        Some(Command::Cleanup(a)) => match cleanup::cleanup(a.force) {
            Ok(done) if done.is_empty() => {
                println!("nothing to clean up");
                return;
            }
            Ok(done) => {
                for line in done {
                    println!("{line}");
                }
                return;
            }
            Err(e) => {
                eprintln!("merbridge-edge cleanup: {e:#}");
                std::process::exit(1);
            }
        },
        Some(Command::Status(a)) => match status::fetch(a.metrics_addr) {
            Ok(snapshot) if a.json => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&snapshot).expect("snapshot serialises")
                );
                return;
            }
            Ok(snapshot) => {
                print!("{}", status::render(&snapshot));
                return;
            }
            Err(e) => {
                eprintln!("merbridge-edge status: {e:#}");
                std::process::exit(1);
            }
        },
        None => {
            eprintln!("merbridge-edge: no command given; see merbridge-edge --help");
            std::process::exit(2);
        }
    };
    // The HTTP and TLS crates log every request at debug: only their warnings are ours.
    let quiet = args.log_level.min(log::LevelFilter::Warn);
    simple_logger::SimpleLogger::new()
        .with_level(args.log_level)
        .with_module_level("ureq", quiet)
        .with_module_level("ureq_proto", quiet)
        .with_module_level("rustls", quiet)
        .init()
        .expect("logger set once");
    let source = match source_config(&args) {
        Ok(s) => s,
        Err(e) => {
            log::error!("{e}");
            std::process::exit(2);
        }
    };
    if args.insecure_skip_tls_verify {
        log::warn!(
            "--insecure-skip-tls-verify: the kubelet's certificate is not verified; anyone on the path can feed this agent pods"
        );
    }
    let opts = run::RunOptions {
        source,
        metrics_addr: args.metrics_addr,
        cgroup_root: args.cgroup_root,
        bpffs: args.bpffs,
        interval: args.interval,
        node_name: args
            .node_name
            .or_else(|| std::env::var("NODE_NAME").ok().filter(|s| !s.is_empty())),
        meshes: args.mesh,
        accelerate: !args.no_accelerate,
        netns_dir: (!args.no_inbound_capture).then_some(args.netns_dir),
        pin_listeners: args.pin_inbound_listeners,
        sizes: MapSizes {
            connections: args.max_connections,
            rules: args.max_rules,
            ..MapSizes::for_pods(args.max_pods)
        },
    };
    if let Err(e) = run::run(opts) {
        log::error!("{e:#}");
        std::process::exit(1);
    }
}
