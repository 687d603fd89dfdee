//! Stand-ins for what runs in a meshed pod, shared by the host tests (`mbe-testbed`)
//! and the in-VM driver of the kernel matrix (`mbe-vm-test`): an echo app, and a
//! sidecar that asks SO_ORIGINAL_DST the way Envoy does and forwards with plain
//! read/write, and a DNS server and client over UDP.
use std::{
    fs::File,
    io::{Read, Write},
    mem::{size_of, zeroed},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd},
    sync::{Arc, Mutex},
    time::Duration,
};

/// Binds a TCP listener on `addr`, with an error naming it.
pub fn listen(addr: &str) -> Result<TcpListener, String> {
    TcpListener::bind(addr).map_err(|e| format!("listen {addr}: {e}"))
}

/// Calls `serve` on a thread per connection accepted on every listener; returns when
/// all listeners have stopped (never, in practice).
fn serve_all(listeners: Vec<TcpListener>, serve: impl Fn(TcpStream) + Clone + Send + 'static) {
    let handles: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            let serve = serve.clone();
            std::thread::spawn(move || {
                for s in l.incoming().flatten() {
                    let serve = serve.clone();
                    std::thread::spawn(move || serve(s));
                }
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
}

/// An app on each of `addrs`: greets every connection with
/// `hello who=<name> local=<addr> peer=<addr>`, then echoes until the peer is done.
pub fn echo(name: &str, addrs: &[&str]) -> Result<(), String> {
    let listeners = addrs
        .iter()
        .map(|a| listen(a))
        .collect::<Result<Vec<_>, _>>()?;
    let name = name.to_string();
    serve_all(listeners, move |s| {
        let _ = serve_echo(&name, s);
    });
    Ok(())
}

/// Serves one echo connection.
pub fn serve_echo(name: &str, mut s: TcpStream) -> std::io::Result<()> {
    let hello = format!(
        "hello who={name} local={} peer={}\n",
        s.local_addr()?,
        s.peer_addr()?
    );
    s.write_all(hello.as_bytes())?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return s.shutdown(Shutdown::Write);
        }
        s.write_all(&buf[..n])?;
    }
}

/// SO_ORIGINAL_DST of an accepted socket, asked the way Envoy asks it (SOL_IP or
/// SOL_IPV6, option 80).
pub fn original_dst(s: &TcpStream) -> std::io::Result<SocketAddr> {
    let v4 = match s.local_addr()?.ip() {
        IpAddr::V4(_) => true,
        IpAddr::V6(a) => a.to_ipv4_mapped().is_some(),
    };
    let fd = s.as_raw_fd();
    // SAFETY: getsockopt into zeroed sockaddr buffers of the sizes passed.
    unsafe {
        if v4 {
            let mut sa: libc::sockaddr_in = zeroed();
            let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            if libc::getsockopt(
                fd,
                libc::SOL_IP,
                80,
                (&mut sa as *mut libc::sockaddr_in).cast(),
                &mut len,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr))),
                u16::from_be(sa.sin_port),
            ))
        } else {
            let mut sa: libc::sockaddr_in6 = zeroed();
            let mut len = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            if libc::getsockopt(
                fd,
                libc::SOL_IPV6,
                80,
                (&mut sa as *mut libc::sockaddr_in6).cast(),
                &mut len,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(sa.sin6_addr.s6_addr)),
                u16::from_be(sa.sin6_port),
            ))
        }
    }
}

/// `a` with an IPv4-mapped IPv6 address written as IPv4.
pub fn canonical(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        _ => a,
    }
}

/// A sidecar listening on `host` (`[::]` or `0.0.0.0`) at its outbound and inbound
/// ports: for each connection it asks SO_ORIGINAL_DST, appends
/// `accept sidecar=<name> listener=outbound|inbound peer=… local=… orig=<addr>|error:<errno>`
/// to `log`, then forwards to the original destination; inbound upstream connections
/// leave from 127.0.0.6 like Envoy's passthrough, which Istio's iptables rules let by.
pub fn sidecar(
    name: &str,
    host: &str,
    out_port: u16,
    in_port: u16,
    log: &str,
) -> Result<(), String> {
    sidecar_on(
        name,
        &format!("{host}:{out_port}"),
        &format!("{host}:{in_port}"),
        log,
    )
}

/// A sidecar with its outbound and inbound listeners on the addresses given (Linkerd's
/// outbound listener is loopback-only: `127.0.0.1:4140`, inbound `[::]:4143`); else as
/// [`sidecar`].
pub fn sidecar_on(name: &str, out_addr: &str, in_addr: &str, log: &str) -> Result<(), String> {
    let log = Arc::new(Mutex::new(
        File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("log {log}: {e}"))?,
    ));
    let mut handles = vec![];
    for (addr, which) in [(out_addr, "outbound"), (in_addr, "inbound")] {
        let l = listen(addr)?;
        let (name, log) = (name.to_string(), log.clone());
        handles.push(std::thread::spawn(move || {
            serve_all(vec![l], move |s| proxy(&name, which, s, &log));
        }));
    }
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

/// One sidecar connection: log it, then forward it to its original destination.
fn proxy(name: &str, which: &str, s: TcpStream, log: &Mutex<File>) {
    let orig = original_dst(&s);
    let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let orig_text = match &orig {
        Ok(a) => canonical(*a).to_string(),
        Err(e) => format!("error:{}", e.raw_os_error().unwrap_or(0)),
    };
    let line = format!(
        "accept sidecar={name} listener={which} peer={peer} local={local} orig={orig_text}\n"
    );
    let _ = log.lock().unwrap().write_all(line.as_bytes());
    if let Ok(dst) = orig {
        let dst = canonical(dst);
        let up = if which == "inbound" && dst.is_ipv4() {
            connect_from(Ipv4Addr::new(127, 0, 0, 6), dst)
        } else {
            TcpStream::connect_timeout(&dst, Duration::from_secs(3))
        };
        if let Ok(up) = up {
            pipe(s, up);
        }
    }
}

/// A TCP connection to `dst` (IPv4) from `src` (any port).
pub fn connect_from(src: Ipv4Addr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let SocketAddr::V4(dst) = dst else {
        return Err(std::io::Error::other("IPv4 only"));
    };
    let sin = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a fresh socket, owned by the TcpStream from the start (closed on failure).
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let local = sin(src, 0);
        if libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let remote = sin(*dst.ip(), dst.port());
        if libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}

/// Copies both ways with plain read/write until both sides are done.
pub fn pipe(a: TcpStream, b: TcpStream) {
    let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    let t = std::thread::spawn(move || copy_then_shutdown(a2, b2));
    copy_then_shutdown(b, a);
    let _ = t.join();
}

/// Copies `from` into `to` until `from` ends or fails, then shuts `to`'s sending side.
pub fn copy_then_shutdown(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Becomes user and group `uid`, with no supplementary groups: for a child between
/// fork and exec (`pre_exec`), so it makes only async-signal-safe calls.
pub fn become_uid(uid: u32) -> std::io::Result<()> {
    // SAFETY: setgroups with no groups, setgid and setuid take plain values.
    if unsafe {
        libc::setgroups(0, std::ptr::null()) != 0
            || libc::setgid(uid) != 0
            || libc::setuid(uid) != 0
    } {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A DNS server stand-in: answers each datagram on `addr` with `who=<name>`.
pub fn udp_echo(name: &str, addr: &str) -> Result<(), String> {
    let s = UdpSocket::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    let mut buf = [0u8; 1500];
    loop {
        let (_, from) = s.recv_from(&mut buf).map_err(|e| e.to_string())?;
        let _ = s.send_to(format!("who={name}").as_bytes(), from);
    }
}

/// Sends one datagram to `addr` (after connect(2) when `connected`), waits up to
/// `reply_timeout` for the answer and says it as `reply=<text> from=<addr>`.
pub fn udp_query(addr: &str, connected: bool, reply_timeout: Duration) -> Result<String, String> {
    let target: SocketAddr = addr.parse().map_err(|_| format!("bad address {addr}"))?;
    let bind = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let s = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(reply_timeout)).ok();
    if connected {
        s.connect(target)
            .map_err(|e| format!("connect {target}: {e}"))?;
        s.send(b"q").map_err(|e| e.to_string())?;
    } else {
        s.send_to(b"q", target).map_err(|e| e.to_string())?;
    }
    let mut buf = [0u8; 1500];
    let (n, from) = s
        .recv_from(&mut buf)
        .map_err(|e| format!("no reply from {target}: {e}"))?;
    Ok(format!(
        "reply={} from={}",
        String::from_utf8_lossy(&buf[..n]),
        canonical(from)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_greets_and_echoes_and_a_plain_connection_has_no_original_destination() {
        let l = listen("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            // Not redirected by anything: the kernel has no original destination.
            assert!(original_dst(&s).is_err());
            serve_echo("t", s).unwrap();
        });
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"ping").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut got = String::new();
        c.read_to_string(&mut got).unwrap();
        assert!(
            got.starts_with(&format!("hello who=t local={addr} peer=")),
            "{got}"
        );
        assert!(got.ends_with("\nping"), "{got}");
    }

    #[test]
    fn canonical_unmaps_v4_mapped_addresses_only() {
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:80".parse().unwrap();
        assert_eq!(canonical(mapped), "10.0.0.1:80".parse().unwrap());
        let v6: SocketAddr = "[fd00::1]:80".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }
}
