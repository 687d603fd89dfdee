//! Flow control on the real kernel, with and without sk_msg acceleration: the known
//! limit behind README "Known limits" (streams cut under load). sk_msg moves a sender's
//! data straight into its peer's receive queue, which no receive buffer bounds, so a
//! writer whose reader stops is never held back: the data waits in kernel memory until
//! the node's TCP memory (`net.ipv4.tcp_mem`, about 48 MiB on a 512 MB node) or the
//! pod's memory cgroup runs out, and sends fail with ENOMEM. Over TCP the same writer is
//! held back by the buffers of the path. This test measures both and holds the README
//! to it: if a kernel ever bounds sk_msg queues, it fails and the limit can go.
//!
//! Needs root (see datapath.rs); skipped with a note otherwise, a failure when
//! MBE_REQUIRE_KERNEL_TESTS=1.
use merbridge_edge_testbed::fixture::{Fixture, istio_abc, kernel_test};

const HELPER: &str = env!("CARGO_BIN_EXE_mbe-testbed");

/// What a's app can write to b's echo app without ever reading the echo, with the
/// agent started with `agent_args`: (bytes written, held back).
fn flood(agent_args: &[&str], max_bytes: usize) -> (usize, bool) {
    let f = Fixture::new(HELPER.as_ref(), istio_abc());
    let _agent = f.start_agent(agent_args);
    let target = format!("{}:8080", f.pod("b").ip4);
    let out = f
        .app_run("a", &["flood", &target, &max_bytes.to_string()])
        .unwrap_or_else(|e| panic!("flood: {e:#}"));
    let field = |k: &str| {
        out.split_whitespace()
            .find_map(|kv| kv.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in {out:?}"))
            .to_string()
    };
    (
        field("written=").parse().unwrap(),
        field("held_back=") == "true",
    )
}

#[test]
fn a_reader_that_stops_holds_back_a_tcp_writer_but_not_an_accelerated_one() {
    let Some(_serial) = kernel_test("flow_control") else {
        return;
    };
    const OFFERED: usize = 256 << 20;
    let tcp = flood(&["--no-accelerate"], OFFERED);
    let accelerated = flood(&[], OFFERED);
    eprintln!(
        "a writer whose reader never reads, {} MiB offered: {} MiB taken over TCP (held \
         back: {}), {} MiB taken with sk_msg acceleration (held back: {})",
        OFFERED >> 20,
        tcp.0 >> 20,
        tcp.1,
        accelerated.0 >> 20,
        accelerated.1
    );
    assert!(
        tcp.1 && tcp.0 < OFFERED / 2,
        "TCP's flow control holds the writer back: {tcp:?}"
    );
    assert!(
        !accelerated.1 && accelerated.0 == OFFERED,
        "sk_msg took {} MiB and held the writer back: the known limit changed, update \
         README Known limits",
        accelerated.0 >> 20
    );
}
