//! The node's TCP memory limit, against which sk_msg acceleration is weighed: sk_msg
//! has no flow control, so data for a reader that lags waits in kernel memory charged
//! to TCP until `net.ipv4.tcp_mem` runs out, and then every send on the node fails with
//! ENOMEM (README, Known limits).
use std::path::Path;

/// Where the kernel publishes its TCP memory thresholds (in pages: low, pressure, max).
pub const TCP_MEM: &str = "/proc/sys/net/ipv4/tcp_mem";

/// Below this many bytes of TCP memory, one bulk local transfer to a slow reader can
/// take all of it (256 MiB: a node with about 2.5 GB of RAM or less).
pub const SMALL_TCP_MEMORY: u64 = 256 << 20;

/// The most memory TCP may use on this node, in bytes, from `tcp_mem`'s contents.
pub fn parse_max(tcp_mem: &str, page_size: u64) -> Result<u64, String> {
    let max = tcp_mem
        .split_whitespace()
        .nth(2)
        .ok_or_else(|| format!("{TCP_MEM}: expected three numbers, got {tcp_mem:?}"))?;
    let pages: u64 = max
        .parse()
        .map_err(|_| format!("{TCP_MEM}: {max:?} is not a page count"))?;
    Ok(pages.saturating_mul(page_size))
}

/// What to tell the user when acceleration is on and the node's TCP memory is small;
/// None when it is large enough or cannot be read (nothing to say then).
pub fn acceleration_warning(tcp_mem: &Path) -> Option<String> {
    // SAFETY: sysconf has no preconditions.
    let page_size = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok()?;
    let text = std::fs::read_to_string(tcp_mem).ok()?;
    let max = parse_max(&text, page_size).ok()?;
    (max < SMALL_TCP_MEMORY).then(|| {
        format!(
            "this node's TCP memory is at most {} MiB (net.ipv4.tcp_mem): sk_msg \
             acceleration has no flow control, so one bulk local transfer to a slower \
             reader can take all of it, and then sends fail with ENOMEM on every \
             connection of the node; where pods move bulk data locally, run with \
             --no-accelerate",
            max >> 20
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_third_number_is_the_limit_in_pages() {
        // A 512 MB node's values (4 KiB pages): 47 MiB at most.
        assert_eq!(parse_max("9096\t12130\t18192\n", 4096), Ok(18192 * 4096));
        assert!(
            parse_max("9096 12130", 4096)
                .unwrap_err()
                .contains("three numbers")
        );
        assert!(
            parse_max("1 2 lots", 4096)
                .unwrap_err()
                .contains("\"lots\"")
        );
    }

    #[test]
    fn a_small_limit_is_told_a_large_one_is_not() {
        let dir = std::env::temp_dir().join(format!("mbe-tcp-mem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("tcp_mem");
        std::fs::write(&file, "9096 12130 18192\n").unwrap();
        let small = acceleration_warning(&file);
        std::fs::write(&file, "287898 383867 575796\n").unwrap();
        let large = acceleration_warning(&file);
        std::fs::remove_dir_all(&dir).unwrap();
        let small = small.expect("a 512 MB node's limit is small");
        assert!(small.contains("--no-accelerate"), "{small}");
        assert_eq!(large, None);
        assert_eq!(acceleration_warning(&dir.join("missing")), None);
    }
}
