//! The hidden stand-in roles, as in testbed's `mbe-testbed`: `echo` (an app that
//! greets with who it is and echoes), `sidecar` (a proxy that asks SO_ORIGINAL_DST,
//! logs one line per connection and forwards, inbound from 127.0.0.6 like Envoy) and
//! `client` (connects, checks the echo byte for byte).
use std::{
    io::{BufRead, BufReader, Read, Write},
    mem::{size_of, zeroed},
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd},
    sync::{Arc, Mutex},
    time::Duration,
};

/// Runs role `role` with `args`.
pub fn run(role: &str, args: &[String]) -> Result<(), String> {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match (role, a.as_slice()) {
        ("echo", [name, ports @ ..]) => echo(name, ports),
        ("sidecar", [name, out_port, in_port, log]) => {
            sidecar(name, port(out_port)?, port(in_port)?, log)
        }
        ("client", [addr, bytes]) => client(
            addr,
            bytes
                .parse()
                .map_err(|_| format!("bad byte count {bytes}"))?,
        ),
        _ => Err(format!("unknown stand-in {role} {a:?}")),
    }
}

fn port(s: &str) -> Result<u16, String> {
    s.parse().map_err(|_| format!("bad port {s}"))
}

fn listen(port: u16) -> Result<TcpListener, String> {
    TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("listen on {port}: {e}"))
}

fn echo(name: &str, ports: &[&str]) -> Result<(), String> {
    let mut threads = vec![];
    for p in ports {
        let l = listen(port(p)?)?;
        let name = name.to_string();
        threads.push(std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let name = name.clone();
                std::thread::spawn(move || serve_echo(&name, s));
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn serve_echo(name: &str, mut s: TcpStream) -> std::io::Result<()> {
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

/// SO_ORIGINAL_DST (IPv4), asked the way Envoy asks it.
fn original_dst(s: &TcpStream) -> std::io::Result<SocketAddr> {
    // SAFETY: getsockopt into a zeroed sockaddr_in of the size passed.
    unsafe {
        let mut sa: libc::sockaddr_in = zeroed();
        let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        if libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_IP,
            80,
            (&mut sa as *mut libc::sockaddr_in).cast(),
            &mut len,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
            u16::from_be(sa.sin_port),
        )))
    }
}

fn sidecar(name: &str, out_port: u16, in_port: u16, log: &str) -> Result<(), String> {
    let log = Arc::new(Mutex::new(
        std::fs::OpenOptions::new()
            .append(true)
            .open(log)
            .map_err(|e| format!("log {log}: {e}"))?,
    ));
    let mut threads = vec![];
    for (p, which) in [(out_port, "outbound"), (in_port, "inbound")] {
        let l = listen(p)?;
        let (name, log) = (name.to_string(), log.clone());
        threads.push(std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let (name, log) = (name.clone(), log.clone());
                std::thread::spawn(move || {
                    let orig = original_dst(&s);
                    let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                    let orig_text = match &orig {
                        Ok(a) => a.to_string(),
                        Err(e) => format!("error:{}", e.raw_os_error().unwrap_or(0)),
                    };
                    let line = format!(
                        "accept sidecar={name} listener={which} peer={peer} orig={orig_text}\n"
                    );
                    let _ = log.lock().unwrap().write_all(line.as_bytes());
                    if let Ok(dst) = orig {
                        let up = if which == "inbound" {
                            connect_from(Ipv4Addr::new(127, 0, 0, 6), dst)
                        } else {
                            TcpStream::connect_timeout(&dst, Duration::from_secs(10))
                        };
                        if let Ok(up) = up {
                            pipe(s, up);
                        }
                    }
                });
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// A TCP connection to `dst` from `src` (any port).
fn connect_from(src: Ipv4Addr, dst: SocketAddr) -> std::io::Result<TcpStream> {
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
    // SAFETY: a fresh socket owned by the TcpStream from the start.
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

fn pipe(a: TcpStream, b: TcpStream) {
    let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    let t = std::thread::spawn(move || copy_then_shutdown(a2, b2));
    copy_then_shutdown(b, a);
    let _ = t.join();
}

fn copy_then_shutdown(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

/// Connects, prints the greeting, sends `bytes` and checks they come back unchanged.
fn client(addr: &str, bytes: usize) -> Result<(), String> {
    let addr: SocketAddr = addr.parse().map_err(|_| format!("bad address {addr}"))?;
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok();
    let mut reader = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
    let mut hello = String::new();
    reader
        .read_line(&mut hello)
        .map_err(|e| format!("reading the greeting: {e}"))?;
    print!("{hello}");
    let data = pattern(bytes);
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let sent = data.clone();
    let writer = std::thread::spawn(move || w.write_all(&sent));
    let mut got = vec![0u8; bytes];
    reader
        .read_exact(&mut got)
        .map_err(|e| format!("reading the echo of {bytes} bytes: {e}"))?;
    writer
        .join()
        .unwrap()
        .map_err(|e| format!("writing: {e}"))?;
    let _ = s.shutdown(Shutdown::Both);
    if got != data {
        let first = got.iter().zip(&data).position(|(a, b)| a != b).unwrap_or(0);
        return Err(format!(
            "echo differs from what was sent, first at byte {first}"
        ));
    }
    println!("ok bytes={bytes}");
    Ok(())
}
