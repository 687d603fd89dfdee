//! `mbe-standin`: the app and sidecar stand-ins as one program for the test pods'
//! container image (written by `mbe-image`; libc only, so it builds fully static):
//!
//!     mbe-standin [--uid N] echo NAME ADDR...
//!     mbe-standin [--uid N] sidecar NAME OUTBOUND_ADDR INBOUND_ADDR LOG
//!
//! `--uid` switches to that uid and gid first, as a pod's `runAsUser` has the runtime
//! do (`ctr run` of containerd 1.6 has no user flag).
use merbridge_edge_standins::{echo, sidecar_on};

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--uid") && args.len() > 1 {
        let uid: u32 = args[1]
            .parse()
            .unwrap_or_else(|_| fail("--uid takes a number"));
        // SAFETY: plain system calls on this single-threaded process before any work.
        let ok = unsafe {
            libc::setgroups(0, std::ptr::null()) == 0
                && libc::setgid(uid) == 0
                && libc::setuid(uid) == 0
        };
        if !ok {
            fail(&format!(
                "switching to uid {uid}: {}",
                std::io::Error::last_os_error()
            ));
        }
        args.drain(..2);
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match a.as_slice() {
        ["echo", name, addrs @ ..] => echo(name, addrs),
        ["sidecar", name, out, inb, log] => sidecar_on(name, out, inb, log),
        _ => Err(format!(
            "usage: mbe-standin [--uid N] echo|sidecar …, not {a:?}"
        )),
    };
    if let Err(e) = result {
        fail(&e);
    }
}

fn fail(why: &str) -> ! {
    eprintln!("mbe-standin: {why}");
    std::process::exit(1);
}
