//! `mbe-qemu`: boots the newest Debian 5.10, 6.1 and 6.12 kernels of each architecture given
//! under qemu (TCG) with an initramfs holding the static agent and the in-VM driver,
//! and prints one row per kernel. Exits non-zero if any kernel fails, after printing
//! the failing checks' output and any verifier log. `qemu-tests/run` drives it.
use std::{
    fs,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use argh::FromArgs;
use merbridge_edge_qemu_tests::{
    initramfs,
    kernels::{self, Apt, Arch, Kernel},
    qemu::{self, Boot},
    report::{self, Row},
};

/// Boot Debian kernels under qemu with the static agent and prove the datapath there.
#[derive(FromArgs)]
struct Args {
    /// static merbridge-edge for arm64
    #[argh(option)]
    agent_arm64: Option<PathBuf>,
    /// static mbe-vm-test for arm64
    #[argh(option)]
    driver_arm64: Option<PathBuf>,
    /// static merbridge-edge for amd64
    #[argh(option)]
    agent_amd64: Option<PathBuf>,
    /// static mbe-vm-test for amd64
    #[argh(option)]
    driver_amd64: Option<PathBuf>,
    /// kernel series, comma-separated (default 5.10,6.1,6.12; 5.10 comes from Debian
    /// bullseye through a private apt configuration under --cache)
    #[argh(option, default = "String::from(\"5.10,6.1,6.12\")")]
    series: String,
    /// where kernel packages are cached (default /var/cache/merbridge-edge/kernels)
    #[argh(
        option,
        default = "PathBuf::from(\"/var/cache/merbridge-edge/kernels\")"
    )]
    cache: PathBuf,
    /// where initramfs images and console logs go (default target/qemu-tests)
    #[argh(option, default = "PathBuf::from(\"target/qemu-tests\")")]
    work: PathBuf,
    /// hard limit on one VM, seconds (default 120; a VM needs about 10)
    #[argh(option, default = "120")]
    timeout: u64,
    /// VMs booted at once (default 2)
    #[argh(option, default = "2")]
    jobs: usize,
    /// memory of each VM in MiB (default 512, a small edge node)
    #[argh(option, default = "512")]
    memory: u32,
}

/// One kernel to boot with its initramfs.
struct Job {
    kernel: Kernel,
    initrd: PathBuf,
    log: PathBuf,
}

fn main() {
    let args: Args = argh::from_env();
    match run(&args) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("mbe-qemu: {e:#}");
            std::process::exit(2);
        }
    }
}

fn binaries(args: &Args, arch: Arch) -> Result<Option<(&Path, &Path)>> {
    let (agent, driver) = match arch {
        Arch::Arm64 => (&args.agent_arm64, &args.driver_arm64),
        Arch::Amd64 => (&args.agent_amd64, &args.driver_amd64),
    };
    match (agent, driver) {
        (Some(a), Some(d)) => {
            for p in [a, d] {
                if !p.is_file() {
                    bail!("{} does not exist", p.display());
                }
            }
            Ok(Some((a.as_path(), d.as_path())))
        }
        (None, None) => Ok(None),
        _ => bail!("--agent-{arch} and --driver-{arch} go together"),
    }
}

fn prepare(args: &Args) -> Result<Vec<Job>> {
    fs::create_dir_all(&args.work).with_context(|| format!("creating {}", args.work.display()))?;
    let mut jobs = vec![];
    let series: Vec<&str> = args
        .series
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let mut apts = std::collections::BTreeMap::new();
    for arch in Arch::ALL {
        let Some((agent, driver)) = binaries(args, arch)? else {
            continue;
        };
        for &series in &series {
            if !apts.contains_key(series) {
                apts.insert(series, Apt::for_series(series, &args.cache)?);
            }
            let apt = &apts[series];
            let kernel = newest_fetchable(apt, &args.cache, arch, series)?;
            let package = kernel.package.clone();
            let initrd = args.work.join(format!("{package}.initrd.gz"));
            let modules: Vec<&Path> = kernel.modules.iter().map(PathBuf::as_path).collect();
            initramfs::write(
                &initramfs::Contents {
                    driver,
                    agent,
                    modules: &modules,
                },
                &initrd,
            )?;
            let log = args.work.join(format!("{package}.console.log"));
            jobs.push(Job {
                kernel,
                initrd,
                log,
            });
        }
    }
    if jobs.is_empty() {
        bail!("nothing to boot: give --agent-<arch> and --driver-<arch> for arm64 and/or amd64");
    }
    Ok(jobs)
}

/// Attempts at most this many packages of a series, newest first.
const FETCH_ATTEMPTS: usize = 8;

/// The newest kernel of `series` for `arch` that can be fetched (or is cached): an
/// archive index may name packages its mirror does not serve (a 404), and then the
/// next older one is tried, which the run says.
fn newest_fetchable(apt: &Apt, cache: &Path, arch: Arch, series: &str) -> Result<Kernel> {
    let mut errors = vec![];
    for package in kernels::available(apt, arch, series)?
        .iter()
        .take(FETCH_ATTEMPTS)
    {
        let fetched = kernels::candidate_version(apt, package, arch)
            .and_then(|version| kernels::fetch(apt, cache, package, &version, arch));
        match fetched {
            Ok(k) => {
                if !errors.is_empty() {
                    eprintln!(
                        "mbe-qemu: {series} ({arch}): booting {package}, the newest of {} \
                         the mirror serves",
                        errors.len() + 1
                    );
                }
                return Ok(k);
            }
            Err(e) => {
                let line = format!("{e:#}");
                let short = line
                    .lines()
                    .find(|l| l.contains("404") || l.starts_with("E:"))
                    .unwrap_or(&line)
                    .trim()
                    .to_string();
                eprintln!("mbe-qemu: {package} ({arch}) cannot be fetched: {short}");
                errors.push(format!("{package}: {line}"));
            }
        }
    }
    bail!(
        "no {series} kernel for {arch} could be fetched:\n{}",
        errors.join("\n")
    )
}

fn run(args: &Args) -> Result<bool> {
    let started = Instant::now();
    let jobs = prepare(args)?;
    let prepared = started.elapsed();
    // A shared queue: `jobs` VMs at once, results in matrix order.
    let next = Mutex::new(0usize);
    let results: Vec<Mutex<Option<Result<Boot>>>> = jobs.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..args.jobs.max(1) {
            s.spawn(|| {
                loop {
                    let i = {
                        let mut n = next.lock().unwrap();
                        *n += 1;
                        *n - 1
                    };
                    let Some(job) = jobs.get(i) else { break };
                    let k = &job.kernel;
                    eprintln!("mbe-qemu: booting {} {} ({})", k.package, k.version, k.arch);
                    let cmd = qemu::command(k.arch, &k.vmlinuz, &job.initrd, args.memory);
                    let boot = qemu::boot(cmd, Duration::from_secs(args.timeout));
                    if let Ok(b) = &boot {
                        let _ = fs::write(&job.log, &b.transcript);
                        eprintln!(
                            "mbe-qemu: {} done in {:.1} s: {} passed, {} failed{}",
                            k.package,
                            b.total_secs,
                            b.output.passed(),
                            b.output.failed(),
                            if b.timed_out { " (timed out)" } else { "" }
                        );
                    }
                    *results[i].lock().unwrap() = Some(boot);
                }
            });
        }
    });
    let mut boots = vec![];
    for (job, r) in jobs.iter().zip(results) {
        let boot = r
            .into_inner()
            .unwrap()
            .context("a VM was not run")?
            .with_context(|| format!("booting {}", job.kernel.package))?;
        boots.push(boot);
    }
    let rows: Vec<Row> = jobs
        .iter()
        .zip(&boots)
        .map(|(j, b)| Row {
            kernel: format!("{} {}", j.kernel.package, j.kernel.version),
            arch: j.kernel.arch,
            boot: b,
        })
        .collect();
    println!("{}", report::table(&rows));
    let failures = report::failures(&rows);
    if !failures.is_empty() {
        println!("{failures}");
    }
    println!(
        "mbe-qemu: {} kernels in {:.1} s (fetch and initramfs {:.1} s); console logs in {}",
        rows.len(),
        started.elapsed().as_secs_f64(),
        prepared.as_secs_f64(),
        args.work.display()
    );
    Ok(rows.iter().all(Row::ok))
}
