//! Hostile and heavy pods: a pod with NET_ADMIN in its own namespace that claims
//! another pod's address gets none of that pod's traffic, and connects the kernel
//! fails give back the map room they were promised.
//!
//! Needs root, cgroup v2, iproute2 (`ip`, `ss`) and a 5.15+ kernel (a sockops socket's
//! network namespace), and the agent built in release mode (`scripts/test` does all of
//! that). Without root every test says so and passes, unless MBE_REQUIRE_KERNEL_TESTS=1
//! (set by CI).
use std::{
    net::IpAddr,
    process::Command,
    time::{Duration, Instant},
};

use merbridge_edge_probes_common::SocketTuple;
use merbridge_edge_testbed::{
    PodSpec,
    fixture::{APP_UID, Fixture, counters, istio_abc, kernel_test},
    maps::dump_keyed,
};

const HELPER: &str = env!("CARGO_BIN_EXE_mbe-testbed");

/// Runs `ip` or `ss` inside the network namespace `netns`; its output.
fn in_netns(netns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", netns])
        .args(args)
        .output()
        .expect("ip netns exec");
    assert!(
        out.status.success(),
        "{args:?} in {netns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Local ports of the established TCP sockets in `netns` from `addr` to `addr:port`.
fn ports_to(netns: &str, addr: IpAddr, port: u16) -> Vec<u16> {
    let out = in_netns(netns, &["ss", "-Htn", "state", "established"]);
    let to = format!("{addr}:{port}");
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (local, peer) = (f.get(2)?, f.get(3)?);
            let (ip, p) = local.rsplit_once(':')?;
            (*peer == to && ip == addr.to_string()).then(|| p.parse().ok())?
        })
        .collect()
}

/// Waits until the agent's promised tuple entries and the two original-destination
/// maps are back to empty; the last values seen.
fn wait_all_given_back(agent: &mut merbridge_edge_testbed::agent::Agent) -> (f64, usize, usize) {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let promised = agent
            .metric("merbridge_edge_promised_tuple_entries")
            .unwrap_or(-1.0);
        // Keys: a u64 socket cookie; a SocketTuple.
        let by_cookie = dump_keyed("ORIGINAL_DST_BY_COOKIE", 8).map_or(usize::MAX, |d| d.len());
        let by_tuple = dump_keyed(
            "ORIGINAL_DST_BY_TUPLE",
            std::mem::size_of::<SocketTuple>() as u64,
        )
        .map_or(usize::MAX, |d| d.len());
        let now = (promised, by_cookie, by_tuple);
        if now == (0.0, 0, 0) || Instant::now() > end {
            return now;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_pod_claiming_another_pods_address_gets_none_of_its_traffic() {
    let Some(_serial) = kernel_test("hostile_forge") else {
        return;
    };
    let f = Fixture::new(HELPER.as_ref(), istio_abc());
    let mut agent = f.start_agent(&[]);
    let (a, b, p) = (f.pod("a").clone(), f.pod("b").clone(), f.pod("c").clone());
    let victim = IpAddr::V4(a.ip4);

    // a streams to b through both sidecars, sk_msg moving the bytes, for 3 s.
    let target = format!("{}:8080", b.ip4);
    let stream = std::thread::scope(|s| {
        let load = s.spawn(|| {
            f.node.run_in(
                &a,
                Some("app"),
                Some(APP_UID),
                &["load", "stream", &target, "65536", "4", "3000"],
            )
        });
        // The app's legs to its sidecar (a:X → a:15001), once the streams run.
        let end = Instant::now() + Duration::from_secs(2);
        let mut legs = Vec::new();
        while legs.len() < 4 && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(100));
            legs = ports_to(&a.netns, victim, 15001);
        }
        assert_eq!(legs.len(), 4, "a's four streaming legs to its sidecar");
        // p (NET_ADMIN in its own namespace) puts a's address on its loopback and
        // sweeps the ports around those legs: its sockets have the tuples of a's.
        // It does not answer ARP for it: taking a's address on the bridge is an attack
        // on the network (the CNI's anti-spoofing stops it, with or without us), not
        // on the datapath's state, which is what this test is about.
        for sysctl in [
            "net.ipv4.conf.all.arp_ignore=1",
            "net.ipv4.conf.all.arp_announce=2",
        ] {
            in_netns(&p.netns, &["sysctl", "-qw", sysctl]);
        }
        in_netns(
            &p.netns,
            &["ip", "addr", "add", &format!("{victim}/32"), "dev", "lo"],
        );
        let sweep: Vec<String> = legs
            .iter()
            .flat_map(|&x| x.saturating_sub(16)..=x.saturating_add(16))
            .map(|x| x.to_string())
            .collect();
        let victim_s = victim.to_string();
        let mut args = vec!["forge", victim_s.as_str(), "15001", "1500"];
        args.extend(sweep.iter().map(String::as_str));
        let forged = f
            .node
            .run_placed(&p.placement(Some("app"), None), &args)
            .expect("forge runs");
        (load.join().expect("load thread"), forged)
    });
    let (load, forged) = stream;
    // What a's streams got back is a's own bytes (the stand-in checks every byte of the
    // echo). Known limit: while p holds sockets on a's address *and ports*, a's
    // accelerated streams may be cut short (seen: "closed early" or "stalled" in most
    // runs; never with p on other ports, never without acceleration); not explained yet.
    match &load {
        Ok(out) => assert!(out.contains("errors=0"), "{out}"),
        Err(e) => {
            let e = format!("{e:#}");
            assert!(!e.contains("differ"), "a's echo carried foreign bytes: {e}");
            eprintln!("known limit: a's stream was cut while p held its ports: {e}");
        }
    }
    assert!(
        forged.contains("received=0") && !forged.contains("forged=0"),
        "p's sockets with a's tuples received nothing of a's: {forged}"
    );
    let k = counters(&mut agent);
    assert!(
        k["foreign_sockets"] > 0,
        "p's sockets were seen and kept out: {k:?}"
    );
    assert!(k["sk_msg_bytes"] > 0, "a's streams were accelerated: {k:?}");
    assert_eq!(
        wait_all_given_back(&mut agent),
        (0.0, 0, 0),
        "promised entries and original-destination maps back to empty"
    );
}

#[test]
fn failed_connects_give_back_what_they_promised() {
    let Some(_serial) = kernel_test("hostile_exhaust") else {
        return;
    };
    let f = Fixture::new(
        HELPER.as_ref(),
        vec![PodSpec::istio("a"), PodSpec::istio("b")],
    );
    let mut agent = f.start_agent(&[]);
    let (a, b) = (f.pod("a").clone(), f.pod("b").clone());
    // 100 source ports in a; every redirected connection goes to a's ip:15001, so
    // the 101st needs a port that is not there (EADDRNOTAVAIL after the connect hook).
    in_netns(
        &a.netns,
        &["sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40099"],
    );
    let out = f
        .node
        .run_in(
            &a,
            Some("app"),
            Some(APP_UID),
            &["connect-many", &format!("{}:8080", b.ip4), "150"],
        )
        .unwrap();
    let field = |name: &str| -> usize {
        out.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {out}"))
    };
    assert!(
        field("failed") >= 50 && field("ok") <= 100,
        "connects past the port range fail: {out}"
    );
    assert!(out.contains("Cannot assign requested address"), "{out}");
    let k = counters(&mut agent);
    assert!(
        k["redirect_outbound"] >= 150,
        "each was redirected first: {k:?}"
    );
    assert_eq!(
        wait_all_given_back(&mut agent),
        (0.0, 0, 0),
        "promised entries and original-destination maps back to empty"
    );
}
