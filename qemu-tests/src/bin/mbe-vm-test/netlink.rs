//! Just enough rtnetlink, by hand, to build the pods' network (no iproute2 in the VM):
//! veth pairs with the peer in another namespace, links up, IPv4 and IPv6 addresses and
//! routes.
use std::{
    io,
    net::IpAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{Context, Result, bail};

const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const IFF_UP: u32 = 1;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;
const RTNH_F_ONLINK: u32 = 4;
/// ifa_flags: no duplicate address detection (the address is usable at once).
const IFA_F_NODAD: u8 = 0x02;

/// A NETLINK_ROUTE socket, bound to the network namespace it was opened in.
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

/// A netlink attribute: header, payload, padding to 4.
fn attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(buf.len().div_ceil(4) * 4, 0);
}

fn name_attr(buf: &mut Vec<u8>, ty: u16, name: &str) {
    let mut z = name.as_bytes().to_vec();
    z.push(0);
    attr(buf, ty, &z);
}

/// struct ifinfomsg.
fn ifinfomsg(index: i32, flags: u32, change: u32) -> Vec<u8> {
    let mut b = vec![libc::AF_UNSPEC as u8, 0, 0, 0];
    b.extend_from_slice(&index.to_ne_bytes());
    b.extend_from_slice(&flags.to_ne_bytes());
    b.extend_from_slice(&change.to_ne_bytes());
    b
}

impl Netlink {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> Result<Self> {
        // SAFETY: plain socket call; the fd is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            bail!("netlink socket: {}", io::Error::last_os_error());
        }
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            seq: 1,
        })
    }

    /// Sends one request and waits for its acknowledgement.
    fn request(&mut self, ty: u16, flags: u16, body: &[u8], what: &str) -> Result<()> {
        self.seq += 1;
        let mut msg = Vec::with_capacity(16 + body.len());
        msg.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&ty.to_ne_bytes());
        msg.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(body);
        // SAFETY: sending a buffer we own to the kernel (nl_pid 0 via an unbound send).
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&sa as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent < 0 {
            bail!("{what}: netlink send: {}", io::Error::last_os_error());
        }
        let mut buf = vec![0u8; 8192];
        loop {
            // SAFETY: receiving into a buffer we own.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                bail!("{what}: netlink recv: {}", io::Error::last_os_error());
            }
            let mut at = 0usize;
            while at + 16 <= n as usize {
                let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
                let mty = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().unwrap());
                let seq = u32::from_ne_bytes(buf[at + 8..at + 12].try_into().unwrap());
                if mty == NLMSG_ERROR && seq == self.seq {
                    let err = i32::from_ne_bytes(buf[at + 16..at + 20].try_into().unwrap());
                    if err == 0 {
                        return Ok(());
                    }
                    bail!("{what}: {}", io::Error::from_raw_os_error(-err));
                }
                if len < 16 {
                    break;
                }
                at += len.div_ceil(4) * 4;
            }
        }
    }

    /// `ip link add NAME type veth peer name PEER netns PEER_NS`.
    pub fn add_veth(&mut self, name: &str, peer: &str, peer_ns: &OwnedFd) -> Result<()> {
        let mut peer_body = ifinfomsg(0, 0, 0);
        name_attr(&mut peer_body, IFLA_IFNAME, peer);
        attr(
            &mut peer_body,
            IFLA_NET_NS_FD,
            &(peer_ns.as_raw_fd() as u32).to_ne_bytes(),
        );
        let mut data = vec![];
        attr(&mut data, VETH_INFO_PEER, &peer_body);
        let mut info = vec![];
        name_attr(&mut info, IFLA_INFO_KIND, "veth");
        attr(&mut info, IFLA_INFO_DATA, &data);
        let mut body = ifinfomsg(0, 0, 0);
        name_attr(&mut body, IFLA_IFNAME, name);
        attr(&mut body, IFLA_LINKINFO, &info);
        self.request(
            RTM_NEWLINK,
            NLM_F_CREATE | NLM_F_EXCL,
            &body,
            &format!("creating veth {name}/{peer}"),
        )
    }

    /// `ip link set NAME up`.
    pub fn link_up(&mut self, name: &str) -> Result<()> {
        let index = index_of(name)?;
        let body = ifinfomsg(index, IFF_UP, IFF_UP);
        self.request(RTM_NEWLINK, 0, &body, &format!("setting {name} up"))
    }

    /// `ip addr add ADDR/PREFIX dev NAME` for IPv4, `ip -6 addr add ADDR/PREFIX dev NAME
    /// nodad` for IPv6 (link scope for fe80::/10).
    pub fn add_addr(&mut self, name: &str, addr: IpAddr, prefix: u8) -> Result<()> {
        let index = index_of(name)? as u32;
        let (family, flags, scope) = match addr {
            IpAddr::V4(_) => (libc::AF_INET, 0, RT_SCOPE_UNIVERSE),
            IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80 => {
                (libc::AF_INET6, IFA_F_NODAD, RT_SCOPE_LINK)
            }
            IpAddr::V6(_) => (libc::AF_INET6, IFA_F_NODAD, RT_SCOPE_UNIVERSE),
        };
        let mut body = vec![family as u8, prefix, flags, scope];
        body.extend_from_slice(&index.to_ne_bytes());
        attr(&mut body, IFA_LOCAL, &octets(addr));
        attr(&mut body, IFA_ADDRESS, &octets(addr));
        self.request(
            RTM_NEWADDR,
            NLM_F_CREATE | NLM_F_EXCL,
            &body,
            &format!("adding {addr}/{prefix} to {name}"),
        )
    }

    /// `ip route add DST/PREFIX [via GW onlink] dev NAME` for IPv4, `ip -6 route add
    /// DST/PREFIX [via GW] dev NAME` for IPv6 (`gateway` of the same family as `dst`).
    pub fn add_route(
        &mut self,
        dst: IpAddr,
        prefix: u8,
        gateway: Option<IpAddr>,
        name: &str,
    ) -> Result<()> {
        let (family, flags) = match dst {
            IpAddr::V4(_) if gateway.is_some() => (libc::AF_INET, RTNH_F_ONLINK),
            IpAddr::V4(_) => (libc::AF_INET, 0),
            IpAddr::V6(_) => (libc::AF_INET6, 0),
        };
        let index = index_of(name)? as u32;
        let scope = if gateway.is_some() {
            RT_SCOPE_UNIVERSE
        } else {
            RT_SCOPE_LINK
        };
        let mut body = vec![
            family as u8,
            prefix,
            0,
            0,
            RT_TABLE_MAIN,
            RTPROT_BOOT,
            scope,
            RTN_UNICAST,
        ];
        body.extend_from_slice(&flags.to_ne_bytes());
        if prefix > 0 {
            attr(&mut body, RTA_DST, &octets(dst));
        }
        if let Some(gw) = gateway {
            attr(&mut body, RTA_GATEWAY, &octets(gw));
        }
        attr(&mut body, RTA_OIF, &index.to_ne_bytes());
        let via = gateway.map(|g| format!(" via {g}")).unwrap_or_default();
        self.request(
            RTM_NEWROUTE,
            NLM_F_CREATE | NLM_F_EXCL,
            &body,
            &format!("adding route {dst}/{prefix}{via} dev {name}"),
        )
    }
}

/// An address's octets, in network order.
fn octets(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The ifindex of `name` in the calling thread's network namespace.
pub fn index_of(name: &str) -> Result<i32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("no interface {name}"));
    }
    Ok(i as i32)
}
