//! Finding the cgroup v2 hierarchy and the cgroups of a pod's containers.
use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

use crate::mountinfo;

/// Finds where cgroup2 is mounted by reading `/proc/self/mountinfo`. On hybrid systems
/// that is `/sys/fs/cgroup/unified`; on unified ones `/sys/fs/cgroup`.
pub fn detect_cgroup2_mount() -> Result<PathBuf> {
    let mounts = mountinfo::read_mount_points("cgroup2")
        .with_context(|| format!("reading {}", mountinfo::MOUNTINFO_PATH))?;
    mounts.into_iter().next().context(
        "no cgroup2 filesystem is mounted (see /proc/self/mountinfo); \
         mount one or pass --cgroup-root",
    )
}

/// The cgroup2 directory the programs attach to: `given` (from `--cgroup-root`) when it
/// is one, or its `unified/` child when `given` is a hybrid-layout `/sys/fs/cgroup` (a
/// container mounting the host's /sys/fs/cgroup need not know the host's layout); with
/// nothing given, the cgroup2 mount found in /proc/self/mountinfo.
pub fn resolve_cgroup_root(given: Option<&Path>) -> Result<PathBuf> {
    let Some(given) = given else {
        let found = detect_cgroup2_mount()?;
        check_cgroup2(&found)?;
        return Ok(found);
    };
    match check_cgroup2(given) {
        Ok(()) => Ok(given.to_path_buf()),
        Err(e) => {
            let unified = given.join("unified");
            if check_cgroup2(&unified).is_ok() {
                Ok(unified)
            } else {
                Err(e.context(format!(
                    "--cgroup-root {}: neither it nor its unified/ is a cgroup v2 filesystem",
                    given.display()
                )))
            }
        }
    }
}

/// Checks that `path` is a cgroup2 directory.
pub fn check_cgroup2(path: &Path) -> Result<()> {
    // SAFETY: statfs on a NUL-terminated path with a zeroed out-buffer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        bail!(
            "cgroup root {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    // f_type is signed in glibc and unsigned in musl.
    #[allow(clippy::unnecessary_cast)]
    if st.f_type as u64 != libc::CGROUP2_SUPER_MAGIC as u64 {
        bail!(
            "cgroup root {} is not a cgroup v2 filesystem",
            path.display()
        );
    }
    Ok(())
}

/// The id the kernel reports for a cgroup (`bpf_get_current_cgroup_id`): its inode number.
pub fn cgroup_id(path: &Path) -> Result<u64> {
    Ok(fs::metadata(path)
        .with_context(|| format!("cgroup {}", path.display()))?
        .ino())
}

/// The ids of every cgroup at or below `root` now (a walk of the directory tree;
/// unreadable directories are skipped).
pub fn cgroup_ids_below(root: &Path) -> std::collections::HashSet<u64> {
    let mut out = std::collections::HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if let Ok(id) = cgroup_id(&dir) {
            out.insert(id);
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
    }
    out
}

/// Where the kubelet puts pods, relative to the cgroup2 root, for both cgroup drivers
/// and every QoS class.
fn pod_dir_candidates(pod_uid: &str, qos: &str) -> Vec<PathBuf> {
    let qos = qos.to_ascii_lowercase();
    let under = pod_uid.replace('-', "_");
    let mut out = Vec::new();
    for prefix in ["", "k3s/", "kubelet/"] {
        // cgroupfs driver
        let cgfs = if qos == "guaranteed" {
            format!("{prefix}kubepods")
        } else {
            format!("{prefix}kubepods/{qos}")
        };
        out.push(PathBuf::from(format!("{cgfs}/pod{pod_uid}")));
        // systemd driver
        let sd = if qos == "guaranteed" {
            format!("{prefix}kubepods.slice/kubepods-pod{under}.slice")
        } else {
            format!("{prefix}kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{under}.slice")
        };
        out.push(PathBuf::from(sd));
    }
    out
}

/// QoS classes, for finding a pod whose status names none (or a stale one).
const QOS_CLASSES: [&str; 3] = ["Burstable", "BestEffort", "Guaranteed"];

/// The pod-level cgroup directory of a pod, if it exists now: the parent of every
/// container cgroup of the pod, made by the kubelet before the pod's first container.
/// Looked for under `qos` first, then under the other QoS classes.
pub fn pod_cgroup(root: &Path, pod_uid: &str, qos: &str) -> Option<PathBuf> {
    std::iter::once(qos)
        .chain(
            QOS_CLASSES
                .into_iter()
                .filter(|q| !q.eq_ignore_ascii_case(qos)),
        )
        .flat_map(|q| pod_dir_candidates(pod_uid, q))
        .map(|p| root.join(p))
        .find(|p| p.is_dir())
}

/// The cgroup directory of each of `container_ids` found in the pod cgroup `pod_dir`
/// now (cgroupfs names it by the container id, systemd `<runtime>-<id>.scope`).
/// Containers whose cgroup is not there (yet, or any more) are left out.
pub fn container_cgroups(pod_dir: &Path, container_ids: &[&str]) -> Vec<(String, PathBuf)> {
    let Ok(entries) = fs::read_dir(pod_dir) else {
        return Vec::new();
    };
    let children: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    let mut out = Vec::new();
    for id in container_ids {
        let found = children.iter().find(|name| {
            name.as_str() == *id
                || name
                    .strip_suffix(".scope")
                    .and_then(|n| n.rsplit_once('-'))
                    .is_some_and(|(_, tail)| tail == *id)
        });
        if let Some(name) = found {
            out.push((id.to_string(), pod_dir.join(name)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_root_takes_the_mount_or_a_hybrid_parent_and_names_a_wrong_one() {
        let mount = detect_cgroup2_mount().expect("this machine mounts cgroup2");
        assert_eq!(resolve_cgroup_root(None).unwrap(), mount);
        assert_eq!(resolve_cgroup_root(Some(&mount)).unwrap(), mount);
        if mount.ends_with("unified") {
            let parent = mount.parent().unwrap();
            assert_eq!(resolve_cgroup_root(Some(parent)).unwrap(), mount);
        }
        let wrong = std::env::temp_dir();
        let err = format!("{:#}", resolve_cgroup_root(Some(&wrong)).unwrap_err());
        assert!(
            err.contains("--cgroup-root") && err.contains(&*wrong.to_string_lossy()),
            "{err}"
        );
    }

    #[test]
    fn finds_pods_and_containers_for_both_drivers() {
        let root = std::env::temp_dir().join(format!("mbe-cg-test-{}", std::process::id()));
        let uid = "1234-abcd";
        let a = root.join("kubepods/burstable/pod1234-abcd/aaa111");
        let b = root.join("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod5678_ef.slice/cri-containerd-bbb222.scope");
        let g = root.join("kubepods/pod9/ccc333");
        for d in [&a, &b, &g] {
            fs::create_dir_all(d).unwrap();
        }
        let pod_a = pod_cgroup(&root, uid, "Burstable").unwrap();
        assert_eq!(&pod_a, a.parent().unwrap());
        // A stale or missing QoS class still finds the pod.
        assert_eq!(pod_cgroup(&root, uid, "").as_ref(), Some(&pod_a));
        assert_eq!(pod_cgroup(&root, uid, "Guaranteed").as_ref(), Some(&pod_a));
        let got = container_cgroups(&pod_a, &["aaa111", "missing"]);
        assert_eq!(got, vec![("aaa111".to_string(), a.clone())]);
        let pod_b = pod_cgroup(&root, "5678-ef", "BestEffort").unwrap();
        assert_eq!(&pod_b, b.parent().unwrap());
        let got = container_cgroups(&pod_b, &["bbb222"]);
        assert_eq!(got, vec![("bbb222".to_string(), b.clone())]);
        let pod_g = pod_cgroup(&root, "9", "Guaranteed").unwrap();
        assert_eq!(
            container_cgroups(&pod_g, &["ccc333"]),
            vec![("ccc333".to_string(), g.clone())]
        );
        assert!(pod_cgroup(&root, "nope", "Burstable").is_none());
        fs::remove_dir_all(&root).unwrap();
    }
}
