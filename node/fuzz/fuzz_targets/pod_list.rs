//! Fuzz target `pod_list`: the input is a kubelet `/pods` response body. It goes through
//! `parse_pod_list`, then `desired_state` for every mesh selection (auto and each mesh
//! alone), with and without a node name, then `PodEntries::build` and the LPM keys of
//! every meshed pod: the whole path from the kubelet's bytes to the kernel map entries.
//!
//! Besides not panicking, it checks what the rest of the agent relies on: no more meshed
//! pods than pods seen, no IP programmed for two pods, only the selected mesh's pods,
//! every meshed pod with a uid and an address, and valid port ranges.
#![no_main]

use std::{collections::BTreeSet, net::IpAddr};

use libfuzzer_sys::fuzz_target;
use merbridge_edge::{
    datapath::{cidr_rule_key, port_rule_key},
    mesh::MESHES,
    podlist::parse_pod_list,
    policy::{MeshSelection, desired_state},
    sync::{PodCgroups, PodEntries},
};

fuzz_target!(|body: &[u8]| {
    let Ok(parsed) = parse_pod_list("fuzz input", body) else {
        return;
    };
    let node = parsed
        .pods
        .iter()
        .find_map(|p| p.spec.as_ref()?.node_name.clone());
    let selections = std::iter::once(MeshSelection::Auto)
        .chain(MESHES.iter().map(|m| MeshSelection::Only(m.mesh)));
    for meshes in selections {
        for node in [None, node.as_deref()] {
            let d = desired_state(&parsed.pods, node, meshes);
            assert!(
                d.pods.len() <= d.pods_seen,
                "more meshed pods than pods seen"
            );
            assert!(
                d.pods_seen <= parsed.pods.len(),
                "more pods seen than listed"
            );
            let mut ips = BTreeSet::new();
            for (i, p) in d.pods.iter().enumerate() {
                if let MeshSelection::Only(m) = meshes {
                    assert_eq!(p.mesh, m, "pod {} of an unselected mesh", p.name);
                }
                assert!(!p.uid.is_empty(), "pod {} without a uid", p.name);
                assert!(
                    p.ip4.is_some() || p.ip6.is_some(),
                    "pod {} without an IP",
                    p.name
                );
                for ip in p
                    .ip4
                    .map(IpAddr::V4)
                    .into_iter()
                    .chain(p.ip6.map(IpAddr::V6))
                {
                    assert!(ips.insert(ip), "IP {ip} programmed for two pods");
                }
                for (_, r) in &p.port_rules {
                    assert!(1 <= r.first && r.first <= r.last, "port range {r:?}");
                }
                let pod_id = i as u32 + 1;
                let entries = PodEntries::build(
                    p,
                    pod_id,
                    Some(PodCgroups {
                        pod: 1,
                        proxy: 2,
                        armed: false,
                    }),
                );
                for &(kind, port, len) in &entries.ports {
                    assert!(len <= 16, "port prefix length {len}");
                    let _ = port_rule_key(pod_id, kind, port, len);
                }
                for (kind, cidr) in &entries.cidrs {
                    let _ = cidr_rule_key(pod_id, *kind, cidr);
                }
            }
        }
    }
});
