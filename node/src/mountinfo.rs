//! The kernel's mount table (`/proc/self/mountinfo`), read in one place for the whole
//! agent: where cgroup2 is mounted, where each bpffs is.
use std::{fs, io, path::PathBuf};

/// Where the kernel lists this process's mounts.
pub const MOUNTINFO_PATH: &str = "/proc/self/mountinfo";

/// The mount points of every filesystem of type `fstype` in `/proc/self/mountinfo`,
/// in the order listed.
pub fn read_mount_points(fstype: &str) -> io::Result<Vec<PathBuf>> {
    Ok(mount_points_in(
        &fs::read_to_string(MOUNTINFO_PATH)?,
        fstype,
    ))
}

/// The mount points of every filesystem of type `fstype` in a mountinfo text, in the
/// order listed, with the kernel's octal escapes (`\040` for a space) decoded.
pub fn mount_points_in(mountinfo: &str, fstype: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // "<id> <parent> <maj:min> <root> <mount point> <opts> [optional...] - <fstype> <source> <super opts>"
            let (left, right) = line.split_once(" - ")?;
            if right.split_whitespace().next()? != fstype {
                return None;
            }
            left.split_whitespace().nth(4).map(unescape)
        })
        .collect()
}

/// Decodes the `\ooo` octal escapes the kernel writes for space, tab, newline and
/// backslash in mount paths.
fn unescape(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u32, |n, c| n * 8 + u32::from(c - b'0')));
        match octal {
            Some(value) if value <= 0xff => {
                out.push(value as u8);
                i += 4;
            }
            _ => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_the_mounts_of_one_type_with_escapes_decoded() {
        let text = "\
25 30 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid,nodev - cgroup2 cgroup2 rw,nsdelegate
40 25 0:30 / /sys/fs/bpf rw shared:12 - bpf bpf rw,mode=700
41 25 0:31 / /host/my\\040bpf\\134x rw - bpf none rw";
        assert_eq!(
            mount_points_in(text, "cgroup2"),
            vec![PathBuf::from("/sys/fs/cgroup/unified")]
        );
        assert_eq!(
            mount_points_in(text, "bpf"),
            vec![
                PathBuf::from("/sys/fs/bpf"),
                PathBuf::from("/host/my bpf\\x")
            ]
        );
        assert!(mount_points_in(text, "ext4").is_empty());
    }
}
