//! Which meshed pod the current process belongs to, and whether it is that pod's
//! sidecar. Pods are known by their pod-level cgroup, an ancestor of every container
//! cgroup of the pod: a container restarted under a new id is covered at once, before
//! the kubelet reports the new id (it may not while the control plane is away).
use aya_ebpf::helpers::{
    bpf_get_current_uid_gid,
    generated::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id},
};
use merbridge_edge_probes_common::{MAX_POD_CGROUP_LEVEL, PodInfo};

use crate::maps::{POD_BY_CGROUP, PROXY_CGROUPS};

/// The meshed pod of the current process: its pod cgroup id and what the agent wrote
/// for it. Walks the process's cgroup ancestors from the root down to
/// [`MAX_POD_CGROUP_LEVEL`]; None when none of them is a meshed pod.
#[inline(always)]
pub fn current_pod() -> Option<(u64, PodInfo)> {
    let mut level = 1;
    while level <= MAX_POD_CGROUP_LEVEL {
        // SAFETY: helper taking a plain integer.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            // Deeper than the process's own cgroup.
            return None;
        }
        // SAFETY: the value is copied out before the map can change.
        if let Some(info) = unsafe { POD_BY_CGROUP.get(&id) } {
            return Some((id, *info));
        }
        level += 1;
    }
    None
}

/// The cgroup id of the current process's own (container) cgroup.
#[inline(always)]
pub fn current_cgroup() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_get_current_cgroup_id() }
}

/// Whether the current process is the sidecar proxy of `pod`: its container is the one
/// the pod's status names as the sidecar, or was seen binding the sidecar's ports, or
/// it runs as the proxy's uid (the mesh's own criterion, kept as a cross-check).
#[inline(always)]
pub fn is_proxy(pod: &PodInfo) -> bool {
    if bpf_get_current_uid_gid() as u32 == pod.proxy_uid {
        return true;
    }
    let cgroup = current_cgroup();
    // SAFETY: only presence is checked.
    cgroup == pod.proxy_cgroup || unsafe { PROXY_CGROUPS.get(&cgroup) }.is_some()
}
