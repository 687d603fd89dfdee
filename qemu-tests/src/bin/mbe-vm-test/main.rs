//! `mbe-vm-test`: the /init of the qemu test VMs (see qemu-tests/). It mounts what the
//! agent needs, builds a node with two meshed pods and a plain one (and another node
//! routed through it), runs the agent and prints one result line per check on the
//! console, then powers the VM off.
//!
//! Not a user-facing tool: it refuses to run unless it is PID 1, and its stand-in roles
//! (app, sidecar, client) are only taken by its own children.
mod agent;
mod bpf;
mod checks;
mod netlink;
mod pods;
mod probe_log;
mod standins;
mod sys;

use merbridge_edge_qemu_tests::protocol;

fn main() {
    let pid = std::process::id();
    if let Ok(role) = std::env::var(pods::ROLE_ENV) {
        // SAFETY: getppid has no preconditions.
        if unsafe { libc::getppid() } != 1 {
            eprintln!("mbe-vm-test: stand-in roles are only for the test VM's init");
            std::process::exit(2);
        }
        let args: Vec<String> = std::env::args().skip(1).collect();
        if let Err(e) = standins::run(&role, &args) {
            eprintln!("mbe-vm-test {role}: {e}");
            std::process::exit(1);
        }
        return;
    }
    if pid != 1 {
        eprintln!(
            "mbe-vm-test is the /init of the qemu test VMs (qemu-tests/run boots it); \
             it refuses to run as pid {pid}"
        );
        std::process::exit(2);
    }
    // Whatever happens, say so on the console and power off: an init that exits panics
    // the kernel.
    std::panic::set_hook(Box::new(|info| {
        println!(
            "{}",
            protocol::result_line(
                "driver",
                false,
                &format!("the test driver panicked: {info}")
            )
        );
        println!("{}", protocol::summary_line(0, 1));
        sys::poweroff();
    }));
    if let Err(e) = sys::mount_all() {
        println!(
            "{}",
            protocol::begin_line("unknown", std::env::consts::ARCH)
        );
        println!(
            "{}",
            protocol::result_line("setup", false, &format!("{e:#}"))
        );
        println!("{}", protocol::summary_line(0, 1));
        sys::poweroff();
    }
    let (release, machine) = sys::uname();
    println!("{}", protocol::begin_line(&release, &machine));
    let mut reporter = checks::Reporter::default();
    checks::run(&mut reporter);
    reporter.finish();
    sys::poweroff();
}
