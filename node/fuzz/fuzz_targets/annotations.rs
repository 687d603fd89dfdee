//! Fuzz target `annotations`: every parser of an annotation value. The first input byte
//! picks the parser (modulo their number), the rest is the value (UTF-8, lossily, as
//! Kubernetes stores strings):
//!
//! - 0: `parse_ports`, then `port_prefixes` of each range;
//! - 1: `parse_cidrs`;
//! - 2 and up: one annotation key the agent reads, in the order of the mesh table (each
//!   mesh's rule annotations, then its DNS, proxy uid, interception mode, opt-out and
//!   required annotations): a running pod of that mesh carrying the value goes through
//!   `desired_state`, under auto and under that mesh alone, then `PodEntries::build`.
//!
//! Besides not panicking it checks: parsed port ranges are valid and their LPM prefixes
//! cover them exactly; parsed address ranges have their host bits clear; what a parser
//! returns, written back out, parses to the same; and no annotation value makes a
//! meshed pod disappear, except the mesh's opt-out annotation set to false/disabled and
//! an interception mode other than REDIRECT (TPROXY, NONE, unknown: left alone).
#![no_main]

use std::{collections::BTreeMap, net::IpAddr, sync::LazyLock};

use k8s_openapi::{
    api::core::v1::{Container, Pod, PodIP, PodSpec, PodStatus},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use libfuzzer_sys::fuzz_target;
use merbridge_edge::{
    annotations::{Listed, parse_cidrs, parse_ports, port_prefixes},
    mesh::{MESHES, Marker, MeshSpec},
    policy::{MeshSelection, desired_state},
    sync::{PodCgroups, PodEntries},
};

/// Every annotation key the agent reads, with its mesh.
static KEYS: LazyLock<Vec<(&'static MeshSpec, &'static str)>> = LazyLock::new(|| {
    MESHES
        .iter()
        .flat_map(|m| {
            m.annotations
                .iter()
                .map(|(k, _)| *k)
                .chain(m.dns.annotation())
                .chain(m.proxy_uid_annotation)
                .chain(m.interception_mode.map(|i| i.annotation))
                .chain(m.opt_out)
                .chain(m.required_annotation)
                .map(move |k| (m, k))
        })
        .collect()
});

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let value = String::from_utf8_lossy(rest);
    match usize::from(selector) % (2 + KEYS.len()) {
        0 => check_ports(&value),
        1 => check_cidrs(&value),
        n => check_on_pod(KEYS[n - 2].0, KEYS[n - 2].1, &value),
    }
});

fn check_ports(value: &str) {
    let Ok(Listed::Some(ranges)) = parse_ports(value) else {
        return;
    };
    let mut written = Vec::new();
    for r in &ranges {
        assert!(1 <= r.first && r.first <= r.last, "range {r:?}");
        let prefixes = port_prefixes(*r);
        assert!(
            prefixes.len() <= 32,
            "{} prefixes for {r:?}",
            prefixes.len()
        );
        let mut next = u32::from(r.first);
        for (v, len) in prefixes {
            assert!(len <= 16, "prefix length {len}");
            let size = 1u32 << (16 - u32::from(len));
            assert_eq!(u32::from(v), next, "prefixes of {r:?} not contiguous");
            assert_eq!(u32::from(v) % size, 0, "prefix {v}/{len} not aligned");
            next += size;
        }
        assert_eq!(
            next,
            u32::from(r.last) + 1,
            "prefixes of {r:?} end elsewhere"
        );
        written.push(format!("{}-{}", r.first, r.last));
    }
    assert_eq!(
        parse_ports(&written.join(",")),
        Ok(Listed::Some(ranges)),
        "written back: {written:?}"
    );
}

fn check_cidrs(value: &str) {
    let Ok(Listed::Some(cidrs)) = parse_cidrs(value) else {
        return;
    };
    let mut written = Vec::new();
    for c in &cidrs {
        let host_bits = match c.addr {
            IpAddr::V4(a) => {
                assert!(c.len <= 32, "{c:?}");
                u128::from(u32::from(a) & u32::MAX.checked_shr(c.len.into()).unwrap_or(0))
            }
            IpAddr::V6(a) => {
                assert!(c.len <= 128, "{c:?}");
                u128::from(a) & u128::MAX.checked_shr(c.len.into()).unwrap_or(0)
            }
        };
        assert_eq!(host_bits, 0, "host bits set in {c:?}");
        written.push(format!("{}/{}", c.addr, c.len));
    }
    assert_eq!(
        parse_cidrs(&written.join(",")),
        Ok(Listed::Some(cidrs)),
        "written back: {written:?}"
    );
}

/// A running pod of `mesh` (app and sidecar containers, its label and required
/// annotation if it has them) carrying `key: value`.
fn meshed_pod(mesh: &MeshSpec, key: &str, value: &str) -> Pod {
    let (label, sidecar) = match mesh.marker {
        Marker::Container(c) => (None, c),
        Marker::LabelAndContainer(l, c) => (Some(l), c),
    };
    let labels: BTreeMap<String, String> = label
        .map(|l| (l.to_string(), "x".to_string()))
        .into_iter()
        .collect();
    let mut annotations: BTreeMap<String, String> = mesh
        .required_annotation
        .map(|r| (r.to_string(), "{}".to_string()))
        .into_iter()
        .collect();
    annotations.insert(key.to_string(), value.to_string());
    let container = |name: &str| Container {
        name: name.to_string(),
        ..Default::default()
    };
    Pod {
        metadata: ObjectMeta {
            name: Some("p".into()),
            namespace: Some("ns".into()),
            uid: Some("uid-p".into()),
            labels: Some(labels),
            annotations: Some(annotations),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some("n1".into()),
            containers: vec![container("app"), container(sidecar)],
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some("10.0.0.1".into()),
            pod_ips: Some(vec![
                PodIP {
                    ip: "10.0.0.1".into(),
                },
                PodIP {
                    ip: "fd00::1".into(),
                },
            ]),
            ..Default::default()
        }),
    }
}

fn check_on_pod(mesh: &MeshSpec, key: &str, value: &str) {
    let pod = meshed_pod(mesh, key, value);
    let opted_out = (mesh.opt_out == Some(key)
        && matches!(
            value.trim().to_ascii_lowercase().as_str(),
            "false" | "disabled"
        ))
        || (mesh.interception_mode.map(|i| i.annotation) == Some(key)
            && !matches!(value.trim(), "" | "REDIRECT"));
    for meshes in [MeshSelection::Auto, MeshSelection::Only(mesh.mesh)] {
        let d = desired_state(std::slice::from_ref(&pod), Some("n1"), meshes);
        assert_eq!(
            d.pods.len(),
            usize::from(!opted_out),
            "{key}={value:?} under {meshes:?}: {:?}",
            d.warnings
        );
        for p in &d.pods {
            assert_eq!(p.mesh, mesh.mesh);
            for (_, r) in &p.port_rules {
                assert!(1 <= r.first && r.first <= r.last, "port range {r:?}");
            }
            let _ = PodEntries::build(
                p,
                1,
                Some(PodCgroups {
                    pod: 1,
                    proxy: 1,
                    armed: true,
                }),
            );
        }
    }
}
