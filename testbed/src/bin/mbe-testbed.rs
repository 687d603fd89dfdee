//! Stand-ins for what runs in a meshed pod, for the real-kernel tests:
//! `echo` (an app), `sidecar` (a proxy honouring SO_ORIGINAL_DST), `client`,
//! `sockopts` (getsockopt pass-through checks), `udp-echo` and `udp-query` (DNS),
//! `latency` (connection set-up and request/response times, for the demo and benches),
//! `forge` (a hostile pod's sockets claiming another pod's address) and `connect-many`
//! (connections held open until the pod's ports run out).
use std::{
    io::{BufRead, BufReader, Read, Write},
    mem::size_of,
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::Duration,
};

use merbridge_edge_standins::{echo, listen, pipe, sidecar_on, udp_echo, udp_query};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match a.as_slice() {
        ["echo", name, addrs @ ..] => echo(name, addrs),
        ["sidecar", name, out, inb, log] => {
            // A bare port listens on every address; `addr:port` on that one.
            let at = |p: &str| {
                if p.contains(':') {
                    p.to_string()
                } else {
                    format!("[::]:{p}")
                }
            };
            sidecar_on(name, &at(out), &at(inb), log)
        }
        ["client", addr, rest @ ..] => client(addr, rest),
        ["forward", listen_addr, target] => forward(listen_addr, target),
        ["load", kind, addr, size, conc, ms] => load(kind, addr, size, conc, ms),
        ["latency", addr, conns, rr, size] => latency(
            addr,
            conns
                .parse()
                .map_err(|_| "bad connection count".to_string()),
            rr.parse().map_err(|_| "bad round-trip count".to_string()),
            size.parse().map_err(|_| "bad size".to_string()),
        ),
        ["sockopts"] => sockopts(),
        ["forge", victim, listen_port, ms, ports @ ..] => forge(victim, listen_port, ms, ports),
        ["connect-many", target, count] => connect_many(target, count),
        ["flood", addr, max_bytes] => flood(addr, max_bytes),
        ["udp-echo", name, addr] => udp_echo(name, addr),
        ["udp-query", addr, rest @ ..] => {
            udp_query(addr, rest.contains(&"--connected"), Duration::from_secs(3))
                .map(|reply| println!("{reply}"))
        }
        _ => Err(format!(
            "usage: mbe-testbed echo|sidecar|client|sockopts|forge|connect-many|flood|udp-echo|udp-query …; got {a:?}"
        )),
    };
    if let Err(e) = result {
        eprintln!("mbe-testbed: {e}");
        std::process::exit(1);
    }
}

/// A plain TCP forwarder (an explicitly configured proxy): every connection to
/// `listen_addr` is piped to `target`.
fn forward(listen_addr: &str, target: &str) -> Result<(), String> {
    let l = listen(listen_addr)?;
    let target: SocketAddr = target.parse().map_err(|_| format!("bad target {target}"))?;
    for s in l.incoming().flatten() {
        std::thread::spawn(move || {
            if let Ok(up) = TcpStream::connect_timeout(&target, Duration::from_secs(3)) {
                up.set_nodelay(true).ok();
                s.set_nodelay(true).ok();
                pipe(s, up);
            }
        });
    }
    Ok(())
}

/// What one load connection measured: latency samples (µs), bytes echoed, errors.
type ConnectionFigures = (Vec<u32>, u64, u64);

/// Bounded load against an echo app, `conc` connections for `ms` milliseconds:
/// `rr` (persistent connections, `size`-byte request/response), `conns` (a connection
/// per 64-byte request) or `stream` (64 KiB writes, echo read back). Every reply is
/// checked byte for byte. Prints `key=value` figures.
fn load(kind: &str, addr: &str, size: &str, conc: &str, ms: &str) -> Result<(), String> {
    let addr: SocketAddr = addr.parse().map_err(|_| format!("bad address {addr}"))?;
    let size: usize = size.parse().map_err(|_| "bad size")?;
    let conc: usize = conc.parse().map_err(|_| "bad concurrency")?;
    let ms: u64 = ms.parse().map_err(|_| "bad duration")?;
    let deadline = std::time::Instant::now() + Duration::from_millis(ms);
    let started = std::time::Instant::now();
    let connect = |addr: SocketAddr| -> Result<(TcpStream, BufReader<TcpStream>), String> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_nodelay(true).ok();
        // A safety net against a hung run, not a measure.
        let patience = 5;
        s.set_read_timeout(Some(Duration::from_secs(patience))).ok();
        let mut r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
        let mut hello = String::new();
        r.read_line(&mut hello)
            .map_err(|e| format!("greeting: {e}"))?;
        Ok((s, r))
    };
    let round_trip =
        |w: &mut TcpStream, r: &mut BufReader<TcpStream>, data: &[u8], back: &mut [u8]| {
            w.write_all(data).map_err(|e| format!("write: {e}"))?;
            r.read_exact(back).map_err(|e| format!("read echo: {e}"))?;
            if back != data {
                return Err("echo differs from what was sent".to_string());
            }
            Ok::<(), String>(())
        };
    let results: Vec<Result<ConnectionFigures, String>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..conc)
            .map(|c| {
                sc.spawn(move || -> Result<ConnectionFigures, String> {
                    let data = pattern(c, size.max(1));
                    let mut back = vec![0u8; data.len()];
                    let mut samples = Vec::new();
                    let mut bytes = 0u64;
                    let mut errors = 0u64;
                    match kind {
                        "rr" => {
                            let (mut w, mut r) = connect(addr)?;
                            while std::time::Instant::now() < deadline {
                                let t = std::time::Instant::now();
                                round_trip(&mut w, &mut r, &data, &mut back)?;
                                samples.push(t.elapsed().as_micros() as u32);
                            }
                        }
                        "conns" => {
                            // A failed connection is counted, not fatal: with a full
                            // conntrack table the kernel drops SYNs, and that is the
                            // figure of interest.
                            while std::time::Instant::now() < deadline {
                                let t = std::time::Instant::now();
                                let ok = connect(addr).and_then(|(mut w, mut r)| {
                                    round_trip(&mut w, &mut r, &data, &mut back)?;
                                    let _ = w.shutdown(Shutdown::Both);
                                    Ok(())
                                });
                                match ok {
                                    Ok(()) => samples.push(t.elapsed().as_micros() as u32),
                                    Err(e) if e.contains("differs") => return Err(e),
                                    Err(_) => errors += 1,
                                }
                            }
                        }
                        "stream" => {
                            let (w, mut r) = connect(addr)?;
                            let chunk = pattern(c, 64 * 1024);
                            let expect = chunk.clone();
                            let writer = std::thread::spawn(move || {
                                let mut w = w;
                                let mut sent = 0u64;
                                while std::time::Instant::now() < deadline {
                                    if w.write_all(&chunk).is_err() {
                                        break;
                                    }
                                    sent += chunk.len() as u64;
                                }
                                (w, sent)
                            });
                            // Plain reads with a short timeout: the reader cannot know the
                            // total until the writer is done, so it must never block for
                            // bytes that will not come.
                            r.get_ref()
                                .set_read_timeout(Some(Duration::from_millis(100)))
                                .ok();
                            let mut buf = vec![0u8; 64 * 1024];
                            let give_up = deadline + Duration::from_secs(30);
                            let mut writer = Some(writer);
                            let mut done: Option<(TcpStream, u64)> = None;
                            loop {
                                if done.is_none()
                                    && writer.as_ref().is_some_and(|h| h.is_finished())
                                {
                                    let h = writer.take().expect("present");
                                    done = Some(h.join().map_err(|_| "writer panicked")?);
                                }
                                if let Some((_, sent)) = &done
                                    && bytes >= *sent
                                {
                                    break;
                                }
                                if std::time::Instant::now() > give_up {
                                    return Err(format!("stream: {bytes} bytes echoed, stalled"));
                                }
                                match r.read(&mut buf) {
                                    Ok(0) => return Err("stream: closed early".into()),
                                    Ok(n) => {
                                        // The echo continues the pattern at this offset.
                                        let off = bytes as usize % expect.len();
                                        let first = n.min(expect.len() - off);
                                        if buf[..first] != expect[off..off + first]
                                            || buf[first..n] != expect[..n - first]
                                        {
                                            return Err("stream bytes differ".into());
                                        }
                                        bytes += n as u64;
                                    }
                                    Err(e)
                                        if matches!(
                                            e.kind(),
                                            std::io::ErrorKind::WouldBlock
                                                | std::io::ErrorKind::TimedOut
                                        ) => {}
                                    Err(e) => return Err(format!("read: {e}")),
                                }
                            }
                            let (w, _) = done.expect("finished");
                            let _ = w.shutdown(Shutdown::Both);
                        }
                        other => return Err(format!("unknown load {other}")),
                    }
                    Ok((samples, bytes, errors))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into())))
            .collect()
    });
    let secs = started.elapsed().as_secs_f64();
    let mut samples = Vec::new();
    let (mut bytes, mut errors) = (0, 0);
    for r in results {
        let (s, b, e) = r?;
        samples.extend(s);
        bytes += b;
        errors += e;
    }
    samples.sort_unstable();
    let pct = |p: f64| {
        samples
            .get(((samples.len().max(1) - 1) as f64 * p).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    println!(
        "count={} errors={errors} per_s={:.1} p50_us={} p99_us={} p999_us={} mb_per_s={:.1}",
        samples.len(),
        samples.len() as f64 / secs,
        pct(0.5),
        pct(0.99),
        pct(0.999),
        bytes as f64 / secs / 1e6
    );
    Ok(())
}

/// `conns` connections one after another to an echo app; on each, `rr` round trips of
/// `size` bytes. Prints `connect_us=…` (connect until the greeting arrived) and
/// `rr_us=…` (one write and its whole echo), comma-separated microseconds.
fn latency(
    addr: &str,
    conns: Result<usize, String>,
    rr: Result<usize, String>,
    size: Result<usize, String>,
) -> Result<(), String> {
    let (conns, rr, size) = (conns?, rr?, size?);
    let addr: SocketAddr = addr.parse().map_err(|_| format!("bad address {addr}"))?;
    let mut connect_us = Vec::with_capacity(conns);
    let mut rr_us = Vec::with_capacity(conns * rr);
    let data = pattern(0, size);
    let mut back = vec![0u8; size];
    for c in 0..conns {
        let started = std::time::Instant::now();
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_nodelay(true).ok();
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        let mut reader = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
        let mut hello = String::new();
        reader
            .read_line(&mut hello)
            .map_err(|e| format!("conn {c}: reading hello: {e}"))?;
        connect_us.push(started.elapsed().as_micros().to_string());
        let mut w = s.try_clone().map_err(|e| e.to_string())?;
        for _ in 0..rr {
            let t = std::time::Instant::now();
            w.write_all(&data)
                .map_err(|e| format!("conn {c}: write: {e}"))?;
            reader
                .read_exact(&mut back)
                .map_err(|e| format!("conn {c}: echo: {e}"))?;
            rr_us.push(t.elapsed().as_micros().to_string());
        }
        let _ = s.shutdown(Shutdown::Both);
    }
    println!("connect_us={}", connect_us.join(","));
    println!("rr_us={}", rr_us.join(","));
    Ok(())
}

fn pattern(conn: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + conn * 7) % 251) as u8)
        .collect()
}

/// Connects (optionally many times at once), reads the greeting, sends bytes and
/// checks the echo. Prints `hello …` lines (deduplicated) and `ok conns=… bytes=…`.
fn client(addr: &str, rest: &[&str]) -> Result<(), String> {
    let mut bytes = 1024usize;
    let mut conns = 1usize;
    let mut it = rest.iter();
    while let Some(flag) = it.next() {
        let v = it.next().ok_or(format!("{flag} needs a value"))?;
        match *flag {
            "--bytes" => bytes = v.parse().map_err(|_| "bad --bytes")?,
            "--conns" => conns = v.parse().map_err(|_| "bad --conns")?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    let addr: SocketAddr = addr.parse().map_err(|_| format!("bad address {addr}"))?;
    let results: Vec<Result<String, String>> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..conns)
            .map(|c| sc.spawn(move || one_client(addr, c, bytes)))
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into())))
            .collect()
    });
    let mut hellos = std::collections::BTreeSet::new();
    for r in results {
        let hello = r?;
        // Ports differ per connection; keep who and the addresses without ports.
        hellos.insert(hello);
    }
    for h in &hellos {
        println!("{h}");
    }
    println!("ok conns={conns} bytes={bytes}");
    Ok(())
}

fn one_client(addr: SocketAddr, conn: usize, bytes: usize) -> Result<String, String> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(20))).ok();
    let mut reader = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
    let mut hello = String::new();
    reader
        .read_line(&mut hello)
        .map_err(|e| format!("conn {conn}: reading hello: {e}"))?;
    let data = pattern(conn, bytes);
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    // Half-closing before the echo is back is opt-in: see README, "Known limits".
    let half_close = std::env::var("MBE_HALF_CLOSE").is_ok();
    let writer = std::thread::spawn(move || {
        let r = w.write_all(&data);
        if half_close {
            let _ = w.shutdown(Shutdown::Write);
        }
        r
    });
    let mut got = vec![0u8; bytes];
    let mut filled = 0;
    while filled < bytes {
        match reader.read(&mut got[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) => {
                return Err(format!(
                    "conn {conn}: reading echo after {filled} bytes: {e}"
                ));
            }
        }
    }
    got.truncate(filled);
    let _ = s.shutdown(Shutdown::Both);
    writer
        .join()
        .unwrap()
        .map_err(|e| format!("conn {conn}: writing: {e}"))?;
    if got != pattern(conn, bytes) {
        return Err(format!(
            "conn {conn}: echo differs: sent {bytes} bytes, got {} back",
            got.len()
        ));
    }
    // Keep who= and the local address IP only (ports vary per connection).
    let who = hello
        .trim()
        .split(' ')
        .filter(|p| p.starts_with("who="))
        .collect::<Vec<_>>()
        .join(" ");
    let local = hello
        .trim()
        .split(' ')
        .find_map(|p| p.strip_prefix("local="))
        .unwrap_or("");
    Ok(format!("hello {who} local={local}"))
}

fn getsockopt_raw(fd: i32, level: i32, name: i32, buf: &mut [u8]) -> Result<usize, i32> {
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: buffer and length describe valid memory.
    let r = unsafe { libc::getsockopt(fd, level, name, buf.as_mut_ptr().cast(), &mut len) };
    if r != 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(len as usize)
    }
}

/// Checks that options the datapath does not own come back exactly as the kernel gives them.
fn sockopts() -> Result<(), String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let c = TcpStream::connect(l.local_addr().unwrap()).map_err(|e| e.to_string())?;
    let (s, _) = l.accept().map_err(|e| e.to_string())?;
    let fd = s.as_raw_fd();
    // SO_RCVBUF: the kernel doubles what was set.
    let want: i32 = 65536;
    // SAFETY: setsockopt with an int.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &want as *const i32 as *const _,
            4,
        )
    };
    let mut buf = [0u8; 4];
    let n = getsockopt_raw(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &mut buf)
        .map_err(|e| format!("SO_RCVBUF errno {e}"))?;
    let rcvbuf = i32::from_ne_bytes(buf);
    if n != 4 || rcvbuf != 2 * want {
        return Err(format!(
            "SO_RCVBUF: got {rcvbuf} ({n} bytes), want {}",
            2 * want
        ));
    }
    // The same with a buffer far over a page: the length must still be 4.
    let mut big = vec![0u8; 70000];
    let n = getsockopt_raw(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &mut big)
        .map_err(|e| format!("SO_RCVBUF (70000-byte buffer) errno {e}"))?;
    if n != 4 || i32::from_ne_bytes(big[..4].try_into().unwrap()) != 2 * want {
        return Err(format!("SO_RCVBUF with a 70000-byte buffer: {n} bytes"));
    }
    // TCP_INFO: established, full struct.
    let mut info = vec![0u8; size_of::<libc::tcp_info>()];
    let n = getsockopt_raw(fd, libc::IPPROTO_TCP, libc::TCP_INFO, &mut info)
        .map_err(|e| format!("TCP_INFO errno {e}"))?;
    if n < 104 || info[0] != 1 {
        return Err(format!("TCP_INFO: {n} bytes, state {}", info[0]));
    }
    // SO_ORIGINAL_DST on a connection nobody redirected: an error, as without us.
    let mut sa = [0u8; 16];
    match getsockopt_raw(fd, libc::SOL_IP, 80, &mut sa) {
        Ok(n) => {
            return Err(format!(
                "SO_ORIGINAL_DST on an unredirected socket answered {n} bytes"
            ));
        }
        Err(e) if e == libc::EFAULT => {
            return Err("SO_ORIGINAL_DST on an unredirected socket: EFAULT".into());
        }
        Err(_) => {}
    }
    // An option value longer than a page: SO_PEERGROUPS with 3000 supplementary groups.
    let groups: Vec<libc::gid_t> = (100_000..103_000).collect();
    // SAFETY: setgroups with a valid list (we are root).
    if unsafe { libc::setgroups(groups.len(), groups.as_ptr()) } != 0 {
        return Err(format!("setgroups: {}", std::io::Error::last_os_error()));
    }
    let (u1, _u2) = std::os::unix::net::UnixStream::pair().map_err(|e| e.to_string())?;
    let mut gbuf = vec![0u8; 64 * 1024];
    let n = getsockopt_raw(
        u1.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_PEERGROUPS,
        &mut gbuf,
    )
    .map_err(|e| format!("SO_PEERGROUPS (12000-byte value) errno {e}"))?;
    let got: Vec<u32> = gbuf[..n]
        .chunks(4)
        .map(|c| u32::from_ne_bytes(c.try_into().unwrap()))
        .collect();
    let mut want_groups = groups.clone();
    want_groups.sort();
    let mut got_sorted = got.clone();
    got_sorted.sort();
    if got_sorted != want_groups {
        return Err(format!(
            "SO_PEERGROUPS: {n} bytes, {} groups, want {}",
            got.len(),
            groups.len()
        ));
    }
    drop(c);
    println!(
        "ok rcvbuf={rcvbuf} tcp_info={} peergroups_bytes={n}",
        info.len()
    );
    Ok(())
}

/// A TCP socket bound to `source` before anything else is done with it.
fn bound_socket(source: SocketAddr) -> Result<std::os::fd::OwnedFd, String> {
    use std::os::fd::FromRawFd;
    let family = if source.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with an int value of its size.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            &one as *const _ as *const libc::c_void,
            size_of::<libc::c_int>() as u32,
        )
    };
    let (storage, len) = sockaddr_of(source);
    // SAFETY: a sockaddr of the socket's family and its length.
    if unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &storage as *const _ as *const libc::sockaddr,
            len,
        )
    } != 0
    {
        return Err(format!(
            "bind {source}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(fd)
}

fn sockaddr_of(a: SocketAddr) -> (libc::sockaddr_storage, u32) {
    // SAFETY: sockaddr_storage is plain data; zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match a {
        SocketAddr::V4(v4) => {
            // SAFETY: sockaddr_storage is large enough and aligned for sockaddr_in.
            let sin = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as u16;
            sin.sin_port = v4.port().to_be();
            sin.sin_addr.s_addr = u32::from(*v4.ip()).to_be();
            (storage, size_of::<libc::sockaddr_in>() as u32)
        }
        SocketAddr::V6(v6) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as u16;
            sin6.sin6_port = v6.port().to_be();
            sin6.sin6_addr.s6_addr = v6.ip().octets();
            (storage, size_of::<libc::sockaddr_in6>() as u32)
        }
    }
}

/// Connects the bound socket `fd` to `target`; the stream, or the error.
fn connect_bound(fd: std::os::fd::OwnedFd, target: SocketAddr) -> std::io::Result<TcpStream> {
    let (storage, len) = sockaddr_of(target);
    // SAFETY: a sockaddr of the socket's family and its length.
    if unsafe {
        libc::connect(
            fd.as_raw_fd(),
            &storage as *const _ as *const libc::sockaddr,
            len,
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(TcpStream::from(fd))
}

/// A hostile pod's attempt on another pod's accelerated connections (run in its own
/// network namespace, with the victim's address on its loopback): listens on
/// `victim:listen_port`, connects to it from `victim:<port>` for each port given (a
/// tuple the victim's own connections may have), then for `ms` milliseconds reads
/// whatever arrives on any of these sockets. Prints `forged=<sockets> received=<bytes>`.
fn forge(victim: &str, listen_port: &str, ms: &str, ports: &[&str]) -> Result<(), String> {
    let victim: std::net::IpAddr = victim
        .parse()
        .map_err(|_| format!("bad address {victim}"))?;
    let listen_port: u16 = listen_port.parse().map_err(|_| "bad port")?;
    let ms: u64 = ms.parse().map_err(|_| "bad duration")?;
    let at = SocketAddr::new(victim, listen_port);
    let listener = TcpListener::bind(at).map_err(|e| format!("listen {at}: {e}"))?;
    let mut sockets = Vec::new();
    for p in ports {
        let port: u16 = p.parse().map_err(|_| format!("bad port {p}"))?;
        let Ok(fd) = bound_socket(SocketAddr::new(victim, port)) else {
            continue;
        };
        if let Ok(s) = connect_bound(fd, at) {
            sockets.push(s);
            if let Ok((a, _)) = listener.accept() {
                sockets.push(a);
            }
        }
    }
    for s in &sockets {
        s.set_nonblocking(true).ok();
    }
    let deadline = std::time::Instant::now() + Duration::from_millis(ms);
    let mut received = 0u64;
    let mut buf = [0u8; 65536];
    while std::time::Instant::now() < deadline {
        for mut s in &sockets {
            if let Ok(n) = s.read(&mut buf) {
                received += n as u64;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    println!("forged={} received={received}", sockets.len());
    Ok(())
}

/// Opens `count` connections to `target` one after another, holding them open (the
/// kernel picks each source port; with a narrow port range the later ones fail), then
/// closes them all. Prints `ok=<connected> failed=<failed> first_error=<…>`.
/// Writes up to `max_bytes` to an echo app at `addr` and never reads the echo: how much
/// the path takes before the writer is held back. A write that makes no progress for
/// 2 s ends it. Prints `written=<bytes> held_back=<true|false>`.
fn flood(addr: &str, max_bytes: &str) -> Result<(), String> {
    let addr: SocketAddr = addr.parse().map_err(|_| format!("bad address {addr}"))?;
    let max: usize = max_bytes.parse().map_err(|_| "bad byte count")?;
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut hello = String::new();
    BufReader::new(s.try_clone().map_err(|e| e.to_string())?)
        .read_line(&mut hello)
        .map_err(|e| format!("reading hello: {e}"))?;
    s.set_write_timeout(Some(Duration::from_secs(2))).ok();
    let chunk = pattern(0, 64 << 10);
    let (mut w, mut written, mut held_back) = (&s, 0usize, false);
    while written < max {
        match w.write(&chunk[..chunk.len().min(max - written)]) {
            Ok(n) => written += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                held_back = true;
                break;
            }
            Err(e) => return Err(format!("writing after {written} bytes: {e}")),
        }
    }
    println!("written={written} held_back={held_back}");
    Ok(())
}

fn connect_many(target: &str, count: &str) -> Result<(), String> {
    let target: SocketAddr = target
        .parse()
        .map_err(|_| format!("bad address {target}"))?;
    let count: usize = count.parse().map_err(|_| "bad count")?;
    let mut open = Vec::new();
    let (mut failed, mut first_error) = (0usize, String::new());
    for _ in 0..count {
        match TcpStream::connect_timeout(&target, Duration::from_secs(5)) {
            Ok(s) => open.push(s),
            Err(e) => {
                failed += 1;
                if first_error.is_empty() {
                    first_error = e.to_string();
                }
            }
        }
    }
    println!(
        "ok={} failed={failed} first_error={first_error:?}",
        open.len()
    );
    drop(open);
    Ok(())
}
