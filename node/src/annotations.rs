//! Parsers for the values of the meshes' traffic annotations: port lists with ranges,
//! address ranges, and `*`. Errors name the offending part.
use std::net::IpAddr;

/// An inclusive range of ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    /// First port.
    pub first: u16,
    /// Last port (>= first).
    pub last: u16,
}

/// An address range (IPv4 or IPv6) with its prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    /// Network address (host bits cleared).
    pub addr: IpAddr,
    /// Prefix length (0..=32 for IPv4, 0..=128 for IPv6).
    pub len: u8,
}

/// A parsed list: every value, or the ones listed (possibly none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listed<T> {
    /// `*`.
    All,
    /// The values listed.
    Some(Vec<T>),
}

fn items(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("{s:?} is not a port (1-65535)")),
        Ok(p) => Ok(p),
    }
}

/// Parses `"80, 8080-8090, *"`: ports and inclusive ranges, or `*` for all.
pub fn parse_ports(value: &str) -> Result<Listed<PortRange>, String> {
    let mut out = Vec::new();
    for item in items(value) {
        if item == "*" {
            return Ok(Listed::All);
        }
        let range = match item.split_once('-') {
            Some((a, b)) => {
                let (first, last) = (parse_port(a.trim())?, parse_port(b.trim())?);
                if first > last {
                    return Err(format!("{item:?} is a range whose start is after its end"));
                }
                PortRange { first, last }
            }
            None => {
                let p = parse_port(item)?;
                PortRange { first: p, last: p }
            }
        };
        out.push(range);
    }
    Ok(Listed::Some(out))
}

/// Parses `"10.0.0.0/8, fd00::/8, 192.168.1.1"`: address ranges (a bare address is a
/// single host), or `*` for all.
pub fn parse_cidrs(value: &str) -> Result<Listed<Cidr>, String> {
    let mut out = Vec::new();
    for item in items(value) {
        if item == "*" {
            return Ok(Listed::All);
        }
        let (addr, len) = match item.split_once('/') {
            Some((a, l)) => (a.trim(), Some(l.trim())),
            None => (item, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{item:?} is not an IP address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) => match l.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("{item:?} has a prefix length outside 0-{max}")),
            },
        };
        out.push(Cidr {
            addr: mask(addr, len),
            len,
        });
    }
    Ok(Listed::Some(out))
}

/// Clears the host bits of `addr` beyond `len`.
fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            IpAddr::V4((bits & m).into())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len))
            };
            IpAddr::V6((bits & m).into())
        }
    }
}

/// Splits an inclusive port range into the fewest (value, prefix length) pairs that
/// cover it exactly, for LPM tries keyed by the 16 port bits.
pub fn port_prefixes(range: PortRange) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let mut start = u32::from(range.first);
    let end = u32::from(range.last);
    while start <= end {
        // Largest aligned block starting at `start` that does not pass `end`.
        let mut size = if start == 0 {
            1 << 16
        } else {
            1u32 << start.trailing_zeros()
        };
        while start + size - 1 > end {
            size >>= 1;
        }
        out.push((start as u16, (16 - size.trailing_zeros()) as u8));
        start += size;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(first: u16, last: u16) -> PortRange {
        PortRange { first, last }
    }

    #[test]
    fn ports_lists_ranges_and_star() {
        assert_eq!(
            parse_ports("80, 443,8080-8090").unwrap(),
            Listed::Some(vec![r(80, 80), r(443, 443), r(8080, 8090)])
        );
        assert_eq!(parse_ports("80,*").unwrap(), Listed::All);
        assert_eq!(parse_ports("").unwrap(), Listed::Some(vec![]));
        assert_eq!(parse_ports(" , ").unwrap(), Listed::Some(vec![]));
    }

    #[test]
    fn ports_errors_name_the_item() {
        assert_eq!(
            parse_ports("80,x").unwrap_err(),
            "\"x\" is not a port (1-65535)"
        );
        assert!(parse_ports("0").unwrap_err().contains("\"0\""));
        assert!(parse_ports("70000").unwrap_err().contains("70000"));
        assert!(
            parse_ports("90-80")
                .unwrap_err()
                .contains("start is after its end")
        );
        assert!(parse_ports("80-").is_err());
    }

    #[test]
    fn cidrs_v4_v6_hosts_and_masking() {
        let got = parse_cidrs("10.1.2.3/8, fd00::1/64, 192.168.1.7").unwrap();
        let Listed::Some(v) = got else { panic!() };
        assert_eq!(
            v[0],
            Cidr {
                addr: "10.0.0.0".parse().unwrap(),
                len: 8
            }
        );
        assert_eq!(
            v[1],
            Cidr {
                addr: "fd00::".parse().unwrap(),
                len: 64
            }
        );
        assert_eq!(
            v[2],
            Cidr {
                addr: "192.168.1.7".parse().unwrap(),
                len: 32
            }
        );
        assert_eq!(parse_cidrs("*").unwrap(), Listed::All);
        assert_eq!(
            parse_cidrs("0.0.0.0/0").unwrap(),
            Listed::Some(vec![Cidr {
                addr: "0.0.0.0".parse().unwrap(),
                len: 0
            }])
        );
    }

    #[test]
    fn cidr_errors() {
        assert!(parse_cidrs("10.0.0.0/33").unwrap_err().contains("0-32"));
        assert!(parse_cidrs("fd00::/129").unwrap_err().contains("0-128"));
        assert!(parse_cidrs("bogus").unwrap_err().contains("\"bogus\""));
    }

    #[test]
    fn port_prefixes_cover_exactly() {
        for (first, last) in [
            (1, 1),
            (80, 80),
            (4567, 4569),
            (1, 65535),
            (1000, 2000),
            (65535, 65535),
            (0, 65535),
        ] {
            let ps = port_prefixes(r(first, last));
            let mut covered = Vec::new();
            for (v, len) in &ps {
                let size = 1u32 << (16 - u32::from(*len));
                assert_eq!(u32::from(*v) % size, 0, "aligned");
                covered.extend(u32::from(*v)..u32::from(*v) + size);
            }
            covered.sort();
            let want: Vec<u32> = (u32::from(first)..=u32::from(last)).collect();
            assert_eq!(covered, want, "{first}-{last}");
            assert!(ps.len() <= 32);
        }
        assert_eq!(port_prefixes(r(0, 65535)), vec![(0, 0)]);
        assert_eq!(port_prefixes(r(4567, 4569)), vec![(4567, 16), (4568, 15)]);
    }
}
