//! What the agent costs in memory: its resident set, and the kernel memory of its eBPF
//! maps (which a resident-set figure does not show).
use std::fs;

/// The kernel memory of every eBPF map this process holds open, in bytes: the
/// `memlock` figure the kernel gives for each in `/proc/self/fdinfo`. 0 when unreadable.
pub fn map_kernel_bytes() -> u64 {
    let Ok(fds) = fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    fds.flatten()
        .filter(|fd| {
            fs::read_link(fd.path())
                .is_ok_and(|target| target.to_string_lossy() == "anon_inode:bpf-map")
        })
        .filter_map(|fd| {
            fs::read_to_string(format!(
                "/proc/self/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .ok()
        })
        .filter_map(|info| field(&info, "memlock:"))
        .sum()
}

/// This process's resident memory now and at its peak (VmRSS, VmHWM), in bytes.
pub fn resident_bytes() -> (u64, u64) {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |name| field(&status, name).unwrap_or(0) * 1024;
    (kib("VmRSS:"), kib("VmHWM:"))
}

/// The number after `name` on its line of a `/proc` text.
fn field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_fields_and_this_process() {
        assert_eq!(field("pos:\t0\nmemlock:\t4096\n", "memlock:"), Some(4096));
        assert_eq!(field("VmHWM:\t  2048 kB\n", "VmHWM:"), Some(2048));
        assert_eq!(field("x: 1\n", "memlock:"), None);
        let (now, peak) = resident_bytes();
        assert!(now > 0 && peak >= now, "{now} {peak}");
    }
}
