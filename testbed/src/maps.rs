//! Reading the agent's kernel maps with bpftool, to check what it really programmed.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// One map entry: key and value bytes.
pub type Entry = (Vec<u8>, Vec<u8>);

fn bytes(v: &Value) -> Vec<u8> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| u8::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok())
        .collect()
}

/// The id of the one loaded map called `name` (kernel names are cut at 15 bytes).
/// More than one such map means another agent is running: an error.
pub fn map_id(name: &str) -> Result<u64> {
    map_id_keyed(name, None)
}

/// Every entry of the loaded map called `name` whose keys are `key_size` bytes (for
/// maps whose names are the same once cut at 15 bytes, such as the two
/// `ORIGINAL_DST_BY_*`).
pub fn dump_keyed(name: &str, key_size: u64) -> Result<Vec<Entry>> {
    dump_id(map_id_keyed(name, Some(key_size))?)
}

fn map_id_keyed(name: &str, key_size: Option<u64>) -> Result<u64> {
    let kernel_name = &name[..name.len().min(15)];
    // The maps of an agent that just exited (an earlier test's) are freed by the kernel
    // a moment later: a second map of the name gets a little time to go.
    let end = Instant::now() + Duration::from_secs(3);
    loop {
        let out = Command::new("bpftool")
            .args(["-j", "map", "show"])
            .output()
            .context("running bpftool")?;
        let maps: Value = serde_json::from_slice(&out.stdout).context("bpftool map show output")?;
        let ids: Vec<u64> = maps
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["name"].as_str() == Some(kernel_name))
            .filter(|m| key_size.is_none() || m["bytes_key"].as_u64() == key_size)
            .filter_map(|m| m["id"].as_u64())
            .collect();
        match ids[..] {
            [id] => return Ok(id),
            _ if Instant::now() < end => std::thread::sleep(Duration::from_millis(50)),
            _ => bail!("expected one map {kernel_name}, found {}", ids.len()),
        }
    }
}

/// Every entry of the map with kernel id `id`.
pub fn dump_id(id: u64) -> Result<Vec<Entry>> {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "id", &id.to_string()])
        .output()
        .context("running bpftool")?;
    if !out.status.success() {
        bail!(
            "bpftool map dump id {id}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let entries: Value = serde_json::from_slice(&out.stdout).context("bpftool map dump output")?;
    Ok(entries
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| (bytes(&e["key"]), bytes(&e["value"])))
        .collect())
}

/// Every entry of the one loaded map called `name` (see [`map_id`]).
pub fn dump(name: &str) -> Result<Vec<Entry>> {
    dump_id(map_id(name)?)
}

/// A 16-byte key as the probes store addresses (IPv4 v4-mapped).
pub fn addr_of(key: &[u8]) -> Option<IpAddr> {
    let octets: [u8; 16] = key.get(..16)?.try_into().ok()?;
    let v6 = Ipv6Addr::from(octets);
    Some(match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    })
}

/// The pod IPs in POD_BY_IP.
pub fn pod_ips() -> Result<BTreeSet<IpAddr>> {
    Ok(dump("POD_BY_IP")?
        .iter()
        .filter_map(|(k, _)| addr_of(k))
        .collect())
}

/// The cgroup ids in POD_BY_CGROUP with each one's outbound port.
pub fn pod_cgroups() -> Result<Vec<(u64, u16)>> {
    use merbridge_edge_probes_common::PodInfo;
    let port_at = std::mem::offset_of!(PodInfo, outbound_port);
    dump("POD_BY_CGROUP")?
        .iter()
        .map(|(k, v)| {
            let id = u64::from_ne_bytes(k.get(..8).context("short key")?.try_into()?);
            let port = u16::from_ne_bytes(
                v.get(port_at..port_at + 2)
                    .context("short value")?
                    .try_into()?,
            );
            Ok((id, port))
        })
        .collect()
}

/// An IPv4 address, for comparing with [`pod_ips`].
pub fn v4(s: &str) -> IpAddr {
    IpAddr::V4(s.parse::<Ipv4Addr>().expect("IPv4 literal"))
}
