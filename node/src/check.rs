//! `merbridge-edge check`: can this kernel and this process run the agent? Every answer
//! comes from trying: loading tiny programs, creating tiny maps, loading the real
//! probes through the verifier. Version numbers are only quoted as advice.
use std::{fmt::Write as _, fs, path::Path};

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
};
use serde::Serialize;

use crate::{cgroups, datapath, sockhash_pin};

/// How much of the agent a missing item takes away.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Impact {
    /// Only informational.
    None,
    /// Pinning in bpffs fails: what should outlive an agent restart does not (its
    /// sk_msg-accelerated connections, with `--pin-inbound-listeners` the sidecars'
    /// inbound listeners); everything else works.
    Restarts,
    /// Inbound capture (sk_lookup) must be off; inbound reaches apps directly unless
    /// the mesh's own iptables rules capture it.
    InboundCapture,
    /// sk_msg acceleration must be off; redirection works.
    Acceleration,
    /// The agent cannot run.
    Fatal,
}

/// One line of the report.
#[derive(Clone, Debug, Serialize)]
pub struct Item {
    /// What was checked.
    pub what: String,
    /// Whether it is there.
    pub ok: bool,
    /// What it found (a path, a version) or what failed.
    pub detail: String,
    /// Which part of the agent needs it.
    pub needed_by: String,
    /// What a missing item costs.
    pub impact: Impact,
    /// What to do when it is missing.
    pub advice: String,
}

/// What the agent can do here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Everything works.
    Full,
    /// Everything but inbound capture at the receiving pod.
    WithoutInboundCapture,
    /// Redirection works; sk_msg acceleration must be off.
    WithoutAcceleration,
    /// The agent cannot run.
    Cannot,
}

impl Verdict {
    /// Exit status of `check`: 0 full, 4 without inbound capture, 3 without
    /// acceleration (inbound capture may be missing too: see the items), 1 cannot run.
    pub fn exit_code(self) -> i32 {
        match self {
            Verdict::Full => 0,
            Verdict::WithoutInboundCapture => 4,
            Verdict::WithoutAcceleration => 3,
            Verdict::Cannot => 1,
        }
    }
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Kernel release and machine, from uname.
    pub kernel: String,
    /// Every item checked.
    pub items: Vec<Item>,
    /// The outcome.
    pub verdict: Verdict,
}

fn item(
    what: &str,
    ok: bool,
    detail: String,
    needed_by: &str,
    impact: Impact,
    advice: &str,
) -> Item {
    Item {
        what: what.into(),
        ok,
        detail,
        needed_by: needed_by.into(),
        impact: if ok { Impact::None } else { impact },
        advice: if ok { String::new() } else { advice.into() },
    }
}

fn uname() -> (String, String) {
    // SAFETY: uname fills a zeroed struct of fixed-size NUL-terminated arrays.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return ("unknown".into(), "unknown".into());
    }
    let text = |f: &[libc::c_char]| {
        let bytes: Vec<u8> = f
            .iter()
            .take_while(|c| **c != 0)
            .map(|c| *c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    (text(&u.release), text(&u.machine))
}

/// `(major, minor)` of a kernel release like `6.18.0-1-amd64`.
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Effective capabilities of this process, from /proc/self/status.
pub fn effective_capabilities() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// A capability the agent needs; CAP_SYS_ADMIN stands in for each of them.
struct Capability {
    name: &'static str,
    bit: u32,
    needed_by: &'static str,
    advice: &'static str,
}

/// Every capability the agent needs, in the order the report lists them.
const CAPABILITIES: [Capability; 3] = [
    Capability {
        name: "CAP_BPF",
        bit: CAP_BPF,
        needed_by: "loading programs and creating maps",
        advice: "grant CAP_BPF (kernels before 5.8: CAP_SYS_ADMIN)",
    },
    Capability {
        name: "CAP_NET_ADMIN",
        bit: CAP_NET_ADMIN,
        needed_by: "attaching to cgroups, sockops and sk_msg",
        advice: "grant CAP_NET_ADMIN",
    },
    Capability {
        name: "CAP_PERFMON",
        bit: CAP_PERFMON,
        needed_by: "the getsockopt probe (the verifier wants it for reading the option buffer)",
        advice: "grant CAP_PERFMON (kernels before 5.8: CAP_SYS_ADMIN)",
    },
];

/// An error with its causes, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
}

fn answer(r: Result<bool, impl std::error::Error>, yes: &str, no: &str) -> (bool, String) {
    match r {
        Ok(true) => (true, yes.into()),
        Ok(false) => (false, no.into()),
        Err(e) => (false, format!("probe failed: {}", chain(&e))),
    }
}

/// What the checks look at: this kernel and this process.
struct Host<'a> {
    release: String,
    machine: String,
    version: Option<(u32, u32)>,
    /// Effective capabilities, one bit each.
    capabilities: u64,
    netns_dir: &'a Path,
    bpffs: Option<&'a Path>,
}

impl Host<'_> {
    /// Whether the kernel is known to be older than `min`.
    fn older_than(&self, min: (u32, u32)) -> bool {
        self.version.is_some_and(|v| v < min)
    }

    fn holds(&self, capability: u32) -> bool {
        self.capabilities & (1 << capability) != 0
    }

    /// Whether the process may load programs and create maps.
    fn may_bpf(&self) -> bool {
        self.holds(CAP_BPF) || self.holds(CAP_SYS_ADMIN)
    }
}

/// One check: looks at the host and appends its lines to the report's items (earlier
/// items are there to read).
type Check = fn(&Host, &mut Vec<Item>);

/// The checks that load nothing into the kernel, in report order. Privileges come
/// first: without them every load after fails for the same reason.
const HOST_CHECKS: [Check; 6] = [
    check_kernel,
    check_capabilities,
    check_cgroup2,
    check_btf,
    check_memlock,
    check_bpffs_pinning,
];

/// The checks that load tiny programs or create tiny maps, in report order; they run
/// only when the process may (see [`Host::may_bpf`]).
const BPF_CHECKS: [Check; 5] = [
    check_program_types,
    check_map_types,
    check_helpers,
    check_probes_pass_the_verifier,
    check_netns_files,
];

/// Runs every check; `netns_dir` is where the pod network namespace files are, `bpffs`
/// the mount to pin in (found as `run` finds it when None).
pub fn run_checks(netns_dir: &Path, bpffs: Option<&Path>) -> Report {
    let (release, machine) = uname();
    let host = Host {
        version: kernel_version(&release),
        release,
        machine,
        capabilities: effective_capabilities(),
        netns_dir,
        bpffs,
    };
    let mut items = Vec::new();
    for check in HOST_CHECKS {
        check(&host, &mut items);
    }
    if host.may_bpf() {
        for check in BPF_CHECKS {
            check(&host, &mut items);
        }
    } else {
        // Every load would fail for want of the capability, not of the kernel.
        items.push(item(
            "kernel BPF features",
            true,
            "not checked: loading test programs needs CAP_BPF or CAP_SYS_ADMIN".into(),
            "",
            Impact::None,
            "",
        ));
    }
    Report {
        kernel: format!("{} {}", host.release, host.machine),
        verdict: verdict_of(&items),
        items,
    }
}

fn check_kernel(host: &Host, items: &mut Vec<Item>) {
    items.push(item(
        "kernel",
        !host.older_than((5, 7)),
        format!("{} {}", host.release, host.machine),
        "bpf_link attachments, cgroup/getsockopt, sockhash",
        Impact::Fatal,
        "use kernel 5.7 or newer",
    ));
}

fn check_capabilities(host: &Host, items: &mut Vec<Item>) {
    for c in &CAPABILITIES {
        let held = host.holds(c.bit);
        let stand_in = host.holds(CAP_SYS_ADMIN);
        items.push(item(
            &format!("capability {}", c.name),
            held || stand_in,
            if held {
                "held".into()
            } else if stand_in {
                "not held; CAP_SYS_ADMIN stands in for it".into()
            } else {
                "not held (nor CAP_SYS_ADMIN)".into()
            },
            c.needed_by,
            Impact::Fatal,
            c.advice,
        ));
    }
}

fn check_cgroup2(_: &Host, items: &mut Vec<Item>) {
    let cg = cgroups::detect_cgroup2_mount();
    items.push(item(
        "cgroup v2",
        cg.is_ok(),
        match &cg {
            Ok(p) => format!("mounted at {}", p.display()),
            Err(e) => format!("{e:#}"),
        },
        "every hook (programs attach to the cgroup2 root)",
        Impact::Fatal,
        "mount cgroup2 (systemd.unified_cgroup_hierarchy=1, or mount -t cgroup2 none /sys/fs/cgroup/unified)",
    ));
}

fn check_btf(_: &Host, items: &mut Vec<Item>) {
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    items.push(item(
        "kernel BTF",
        true,
        if btf {
            "/sys/kernel/btf/vmlinux present".into()
        } else {
            "absent (not needed: the probes use no CO-RE relocations)".into()
        },
        "nothing",
        Impact::None,
        "",
    ));
}

fn check_memlock(host: &Host, items: &mut Vec<Item>) {
    if !host.older_than((5, 11)) {
        return;
    }
    // Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK: lift it while we can
    // (raising the hard limit needs CAP_SYS_RESOURCE; without it this is a no-op).
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct.
    unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
    let enough = lim.rlim_cur == libc::RLIM_INFINITY || lim.rlim_cur >= 64 << 20;
    items.push(item(
        "memlock limit (kernel before 5.11 charges maps to it)",
        enough,
        format!("{} bytes", lim.rlim_cur),
        "map creation",
        Impact::Fatal,
        "grant CAP_SYS_RESOURCE (the agent lifts the limit itself) or raise RLIMIT_MEMLOCK \
         (ulimit -l unlimited, or LimitMEMLOCK=infinity)",
    ));
}

/// After the memlock limit is lifted: the test pin is a (tiny) map.
fn check_bpffs_pinning(host: &Host, items: &mut Vec<Item>) {
    let pinning = sockhash_pin::try_pin(host.bpffs);
    items.push(item(
        "bpffs pinning",
        pinning.is_ok(),
        match &pinning {
            Ok(dir) => format!("a test map pinned and removed in {}", dir.display()),
            Err(e) => format!("{e:#}"),
        },
        "keeping sk_msg-accelerated connections whole across agent restarts (the sockhash pin), \
         and with --pin-inbound-listeners the sidecars' inbound listeners",
        Impact::Restarts,
        "give the agent a bpffs it may write; EACCES with CAP_BPF held is usually AppArmor \
         (containerd's default profile denies writes to /sys/fs/[^c]*/**): mount the host's \
         /sys/fs/bpf elsewhere, like /host/sys/fs/bpf as the k3s manifest does, and pass --bpffs",
    ));
}

/// Program types: what, the type, which part needs it (since which kernel), the cost.
const PROGRAM_TYPES: [(&str, ProgramType, &str, Impact); 6] = [
    (
        "program type cgroup sock_addr",
        ProgramType::CgroupSockAddr,
        "connect4/6, sendmsg/recvmsg4/6 (4.17+; UDP hooks 4.18+)",
        Impact::Fatal,
    ),
    (
        "program type cgroup sockopt",
        ProgramType::CgroupSockopt,
        "getsockopt: SO_ORIGINAL_DST (5.3+)",
        Impact::Fatal,
    ),
    (
        "program type sock_ops",
        ProgramType::SockOps,
        "sockops: pairing local sockets (4.13+)",
        Impact::Fatal,
    ),
    (
        "program type sk_msg",
        ProgramType::SkMsg,
        "sk_msg acceleration (4.17+)",
        Impact::Acceleration,
    ),
    (
        "program type sk_lookup",
        ProgramType::SkLookup,
        "inbound capture at the receiving pod (5.9+)",
        Impact::InboundCapture,
    ),
    (
        "program type cgroup sock",
        ProgramType::CgroupSock,
        "post_bind4/6: finding the sidecars' inbound listeners (4.17+)",
        Impact::InboundCapture,
    ),
];

fn check_program_types(_: &Host, items: &mut Vec<Item>) {
    for (what, ty, needed_by, impact) in PROGRAM_TYPES {
        let (ok, detail) = answer(
            is_program_supported(ty),
            "loads",
            "not supported by this kernel",
        );
        items.push(item(what, ok, detail, needed_by, impact, "use a kernel built with CONFIG_BPF_SYSCALL, CONFIG_CGROUP_BPF and CONFIG_BPF_STREAM_PARSER"));
    }
}

/// Map types: what, the type, which part needs it (since which kernel), the cost.
const MAP_TYPES: [(&str, MapType, &str, Impact); 5] = [
    (
        "map type hash",
        MapType::Hash,
        "pods by cgroup and by IP",
        Impact::Fatal,
    ),
    (
        "map type LRU hash",
        MapType::LruHash,
        "original destinations (4.10+)",
        Impact::Fatal,
    ),
    (
        "map type LPM trie",
        MapType::LpmTrie,
        "port and address exclusions (4.11+)",
        Impact::Fatal,
    ),
    (
        "map type per-CPU array",
        MapType::PerCpuArray,
        "counters",
        Impact::Fatal,
    ),
    (
        "map type sockhash",
        MapType::SockHash,
        "sk_msg acceleration (4.18+)",
        Impact::Acceleration,
    ),
];

fn check_map_types(_: &Host, items: &mut Vec<Item>) {
    for (what, ty, needed_by, impact) in MAP_TYPES {
        let (ok, detail) = answer(
            is_map_supported(ty),
            "created",
            "not supported by this kernel",
        );
        items.push(item(
            what,
            ok,
            detail,
            needed_by,
            impact,
            "use a kernel with this map type (see the version beside it)",
        ));
    }
}

type H = BpfHelper;

/// Helpers the probes call: the helper, its name, the program type that calls it,
/// which part needs it (since which kernel), the cost.
const HELPERS: [(BpfHelper, &str, ProgramType, &str, Impact); 12] = [
    (
        H::BPF_FUNC_get_current_cgroup_id,
        "bpf_get_current_cgroup_id",
        ProgramType::CgroupSockAddr,
        "connect: which pod is connecting (5.7+ in sock_addr)",
        Impact::Fatal,
    ),
    (
        H::BPF_FUNC_get_current_uid_gid,
        "bpf_get_current_uid_gid",
        ProgramType::CgroupSockAddr,
        "connect: is it the sidecar (uid)",
        Impact::Fatal,
    ),
    (
        H::BPF_FUNC_get_socket_cookie,
        "bpf_get_socket_cookie",
        ProgramType::CgroupSockAddr,
        "connect: remembering the original destination (4.12+)",
        Impact::Fatal,
    ),
    (
        H::BPF_FUNC_bind,
        "bpf_bind",
        ProgramType::CgroupSockAddr,
        "connect: Linkerd's loopback source (4.17+)",
        Impact::Fatal,
    ),
    (
        H::BPF_FUNC_get_socket_cookie,
        "bpf_get_socket_cookie",
        ProgramType::SockOps,
        "sockops: pairing a socket with its destination",
        Impact::Fatal,
    ),
    (
        H::BPF_FUNC_get_netns_cookie,
        "bpf_get_netns_cookie",
        ProgramType::CgroupSockAddr,
        "connect: learning each pod's network namespace (5.7+)",
        Impact::Fatal,
    ),
    (
        H::BPF_FUNC_get_netns_cookie,
        "bpf_get_netns_cookie",
        ProgramType::SockOps,
        "sockops: a socket's network namespace, so no pod takes over another's accelerated connection (5.15+)",
        Impact::Acceleration,
    ),
    (
        H::BPF_FUNC_sock_hash_update,
        "bpf_sock_hash_update",
        ProgramType::SockOps,
        "sockops: recording local sockets (4.18+)",
        Impact::Acceleration,
    ),
    (
        H::BPF_FUNC_msg_redirect_hash,
        "bpf_msg_redirect_hash",
        ProgramType::SkMsg,
        "sk_msg: moving data to the peer socket (4.18+)",
        Impact::Acceleration,
    ),
    (
        H::BPF_FUNC_sk_assign,
        "bpf_sk_assign",
        ProgramType::SkLookup,
        "sk_lookup: handing a connection to the sidecar (5.9+)",
        Impact::InboundCapture,
    ),
    (
        H::BPF_FUNC_get_current_cgroup_id,
        "bpf_get_current_cgroup_id",
        ProgramType::CgroupSock,
        "post_bind: which container binds a sidecar port",
        Impact::InboundCapture,
    ),
    (
        H::BPF_FUNC_get_socket_cookie,
        "bpf_get_socket_cookie",
        ProgramType::CgroupSock,
        "post_bind: remembering a sidecar's listener until it listens",
        Impact::InboundCapture,
    ),
];

fn check_helpers(_: &Host, items: &mut Vec<Item>) {
    for (helper, name, ty, needed_by, impact) in HELPERS {
        let (ok, detail) = answer(
            is_helper_supported(ty, helper),
            "available",
            "not available in this program type",
        );
        items.push(item(
            &format!("helper {name} ({ty:?})"),
            ok,
            detail,
            needed_by,
            impact,
            "use a newer kernel (see the version beside it)",
        ));
    }
}

/// The real thing: every probe through the verifier (loaded, not attached).
fn check_probes_pass_the_verifier(_: &Host, items: &mut Vec<Item>) {
    let accelerate_possible = items
        .iter()
        .all(|i| i.ok || i.impact != Impact::Acceleration);
    for (name, result) in datapath::verify_probes(accelerate_possible) {
        use merbridge_edge_probes_common::program_names as p;
        let (needed_by, impact) = match name {
            p::SK_MSG | p::SOCKOPS => ("sk_msg acceleration", Impact::Acceleration),
            p::SOCK_RELEASE => (
                "giving back a failed connect's map room (else kept until a restart)",
                Impact::None,
            ),
            p::SK_LOOKUP | p::POST_BIND4 | p::POST_BIND6 => {
                ("inbound capture", Impact::InboundCapture)
            }
            _ => ("redirection", Impact::Fatal),
        };
        items.push(item(
            &format!("probe {name} passes the verifier"),
            result.is_ok(),
            result.err().unwrap_or_else(|| "loaded".into()),
            needed_by,
            impact,
            "run with --log-level debug and report the verifier message",
        ));
    }
}

fn check_netns_files(host: &Host, items: &mut Vec<Item>) {
    let (ok, detail) = match fs::read_dir(host.netns_dir) {
        Ok(entries) => (true, format!("readable, {} namespaces", entries.count())),
        Err(e) => (false, format!("{}: {e}", host.netns_dir.display())),
    };
    items.push(item(
        "pod network namespace files",
        ok,
        detail,
        "inbound capture: sk_lookup is attached to each pod network namespace",
        Impact::InboundCapture,
        "mount the host's /var/run/netns (read-only, HostToContainer propagation), or pass --netns-dir",
    ));
}

impl Report {
    /// Whether inbound capture can run (no item it needs is missing).
    pub fn inbound_capture_possible(&self) -> bool {
        self.items
            .iter()
            .all(|i| i.ok || i.impact != Impact::InboundCapture)
    }
}

/// The verdict: what the worst missing item costs.
fn verdict_of(items: &[Item]) -> Verdict {
    match items.iter().map(|i| i.impact).max().unwrap_or(Impact::None) {
        // The agent runs fully; `render` says what a restart then costs.
        Impact::None | Impact::Restarts => Verdict::Full,
        Impact::InboundCapture => Verdict::WithoutInboundCapture,
        Impact::Acceleration => Verdict::WithoutAcceleration,
        Impact::Fatal => Verdict::Cannot,
    }
}

/// The report as a table for people.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let width = r.items.iter().map(|i| i.what.len()).max().unwrap_or(10);
    for i in &r.items {
        let mark = if i.ok {
            "ok     "
        } else if matches!(
            i.impact,
            Impact::Acceleration | Impact::InboundCapture | Impact::Restarts
        ) {
            "limited"
        } else {
            "MISSING"
        };
        let _ = write!(out, "{mark}  {:width$}  {}", i.what, i.detail);
        if !i.ok {
            let _ = write!(out, " — needed by {}; {}", i.needed_by, i.advice);
        }
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "\n{}",
        match r.verdict {
            Verdict::Full => "verdict: the agent can run here with every feature",
            Verdict::WithoutInboundCapture =>
                "verdict: the agent can run here with inbound capture off (--no-inbound-capture): inbound reaches apps directly unless the mesh's iptables capture it",
            Verdict::WithoutAcceleration =>
                "verdict: the agent can run here with sk_msg acceleration off (--no-accelerate)",
            Verdict::Cannot => "verdict: the agent cannot run here; see the MISSING lines",
        }
    );
    if r.verdict != Verdict::Cannot && r.items.iter().any(|i| i.impact == Impact::Restarts) {
        let _ = writeln!(
            out,
            "but pinning in bpffs fails: {}",
            sockhash_pin::UNPINNED_SOCKHASH_COST
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions() {
        assert_eq!(kernel_version("6.18.0-1-amd64"), Some((6, 18)));
        assert_eq!(kernel_version("5.4.0"), Some((5, 4)));
        assert_eq!(kernel_version("garbage"), None);
    }

    #[test]
    fn verdict_is_the_worst_missing_impact() {
        let mk = |ok, impact| item("x", ok, String::new(), "", impact, "do it");
        let verdict = |items: Vec<Item>| verdict_of(&items);
        assert_eq!(verdict(vec![mk(true, Impact::Fatal)]), Verdict::Full);
        assert_eq!(
            verdict(vec![
                mk(true, Impact::Fatal),
                mk(false, Impact::Acceleration)
            ]),
            Verdict::WithoutAcceleration
        );
        assert_eq!(
            verdict(vec![
                mk(false, Impact::Acceleration),
                mk(false, Impact::Fatal)
            ]),
            Verdict::Cannot
        );
        assert_eq!(Verdict::WithoutAcceleration.exit_code(), 3);
        // Pins failing cost restarts only: the agent still runs with every feature.
        assert_eq!(
            verdict(vec![mk(true, Impact::Fatal), mk(false, Impact::Restarts)]),
            Verdict::Full
        );
    }

    #[test]
    fn a_failing_pin_is_shown_limited_with_what_it_costs() {
        let report = Report {
            kernel: "x".into(),
            items: vec![item(
                "bpffs pinning",
                false,
                "creating /x/merbridge-edge: EACCES: Permission denied (os error 13)".into(),
                "restarts",
                Impact::Restarts,
                "mount it elsewhere",
            )],
            verdict: Verdict::Full,
        };
        let text = render(&report);
        assert!(
            text.starts_with("limited  bpffs pinning  creating /x/merbridge-edge: EACCES"),
            "{text}"
        );
        assert!(
            text.contains("but pinning in bpffs fails: sk_msg-accelerated connections"),
            "{text}"
        );
    }
}
