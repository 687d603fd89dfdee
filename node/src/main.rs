//! `merbridge-edge`: eBPF traffic interception and acceleration for service meshes.
mod annotations;
mod cgroups;
mod datapath;
mod mesh;
mod policy;
mod run;
mod source;
mod sync;

use std::path::PathBuf;

use argh::FromArgs;

use crate::{datapath::MapSizes, mesh::Mesh, policy::MeshSelection};

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
enum Command {
    Run(RunArgs),
}

/// Attach the probes and keep their maps in step with the node's pods.
#[derive(FromArgs)]
#[argh(subcommand, name = "run")]
struct RunArgs {
    /// kubelet-style v1 PodList JSON file to read (re-read when it changes)
    #[argh(option)]
    pods_file: PathBuf,
    /// cgroup v2 directory to attach to (default: the cgroup2 mount found in /proc/self/mountinfo)
    #[argh(option)]
    cgroup_root: Option<PathBuf>,
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
    /// size of the per-connection maps (default 65536)
    #[argh(option, default = "65536")]
    max_connections: u32,
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
    let Some(Command::Run(args)) = cli.command else {
        eprintln!("merbridge-edge: no command given; see merbridge-edge --help");
        std::process::exit(2);
    };
    simple_logger::SimpleLogger::new()
        .with_level(args.log_level)
        .init()
        .expect("logger set once");
    let opts = run::RunOptions {
        pods_file: args.pods_file,
        cgroup_root: args.cgroup_root,
        interval: args.interval,
        node_name: args
            .node_name
            .or_else(|| std::env::var("NODE_NAME").ok().filter(|s| !s.is_empty())),
        meshes: args.mesh,
        accelerate: !args.no_accelerate,
        sizes: MapSizes {
            connections: args.max_connections,
            ..MapSizes::default()
        },
    };
    if let Err(e) = run::run(opts) {
        log::error!("{e:#}");
        std::process::exit(1);
    }
}
