//! The hidden stand-in roles, as in testbed's `mbe-testbed`: `echo` (an app that
//! greets with who it is and echoes, IPv4 and IPv6), `sidecar` (a proxy that asks
//! SO_ORIGINAL_DST, logs one line per connection and forwards, inbound from 127.0.0.6
//! like Envoy; its listeners on the addresses its mesh uses), `client` (connects,
//! checks the echo byte for byte; optionally many connections at once, or paced so
//! that a stream stays in flight for seconds), and for DNS
//! `udp-echo` (answers each datagram with `who=<name>`) and `udp-query` (sends one
//! datagram, connected or not, and prints the reply and whom it came from).
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{Arc, Barrier},
    time::Duration,
};

use merbridge_edge_standins::{echo, sidecar_on, udp_echo, udp_query};

/// Runs role `role` with `args`.
pub fn run(role: &str, args: &[String]) -> Result<(), String> {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match (role, a.as_slice()) {
        ("echo", [name, ports @ ..]) => {
            let addrs: Vec<String> = ports.iter().map(|p| format!("[::]:{p}")).collect();
            echo(name, &addrs.iter().map(String::as_str).collect::<Vec<_>>())
        }
        ("sidecar", [name, out_addr, in_addr, log]) => sidecar_on(name, out_addr, in_addr, log),
        ("client", [addr, bytes]) => client(addr, count(bytes)?),
        ("client", [addr, bytes, conns]) => clients(addr, count(bytes)?, count(conns)?),
        ("client-paced", [addr, bytes, chunk, pause_ms]) => client_paced(
            addr,
            count(bytes)?,
            count(chunk)?,
            Duration::from_millis(count(pause_ms)? as u64),
        ),
        ("udp-echo", [name, addr]) => udp_echo(name, addr),
        ("udp-query", [addr]) => query(addr, false),
        ("udp-query", [addr, "connected"]) => query(addr, true),
        _ => Err(format!("unknown stand-in {role} {a:?}")),
    }
}

/// `udp-query`: one datagram, the reply printed.
fn query(addr: &str, connected: bool) -> Result<(), String> {
    println!("{}", udp_query(addr, connected, Duration::from_secs(5))?);
    Ok(())
}

fn count(s: &str) -> Result<usize, String> {
    s.parse().map_err(|_| format!("bad count {s}"))
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

/// Connects, prints the greeting, sends `bytes` and checks they come back unchanged.
fn client(addr: &str, bytes: usize) -> Result<(), String> {
    let addr: SocketAddr = addr.parse().map_err(|_| format!("bad address {addr}"))?;
    let (s, reader, hello) = connect(addr)?;
    print!("{hello}");
    echo_check(s, reader, bytes)?;
    println!("ok bytes={bytes}");
    Ok(())
}

/// Like [`client`], but sends `bytes` in `chunk`-byte writes with `pause` between
/// them, so the stream stays open for `bytes / chunk × pause`.
fn client_paced(addr: &str, bytes: usize, chunk: usize, pause: Duration) -> Result<(), String> {
    let addr: SocketAddr = addr.parse().map_err(|_| format!("bad address {addr}"))?;
    let (s, reader, hello) = connect(addr)?;
    print!("{hello}");
    let data = pattern(bytes);
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let sent = data.clone();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        for part in sent.chunks(chunk.max(1)) {
            w.write_all(part)?;
            std::thread::sleep(pause);
        }
        Ok(())
    });
    let got = read_echo(reader, bytes);
    let wrote = writer.join().unwrap();
    let got = got?;
    wrote.map_err(|e| format!("writing: {e}"))?;
    let _ = s.shutdown(Shutdown::Both);
    compare(&got, &data)?;
    println!("ok bytes={bytes}");
    Ok(())
}

/// `conns` clients at once: every connection is made and greeted before any sends,
/// so all are open together. Prints each greeting, then `ok conns=N`.
fn clients(addr: &str, bytes: usize, conns: usize) -> Result<(), String> {
    let addr: SocketAddr = addr.parse().map_err(|_| format!("bad address {addr}"))?;
    let all_open = Arc::new(Barrier::new(conns));
    let threads: Vec<_> = (0..conns)
        .map(|i| {
            let all_open = all_open.clone();
            std::thread::spawn(move || {
                // Every thread reaches the barrier, whether its connection worked or not.
                let conn = connect(addr);
                all_open.wait();
                let (s, reader, hello) = conn.map_err(|e| format!("connection {i}: {e}"))?;
                echo_check(s, reader, bytes).map_err(|e| format!("connection {i}: {e}"))?;
                Ok::<String, String>(hello)
            })
        })
        .collect();
    let mut errors = vec![];
    for t in threads {
        match t.join() {
            Ok(Ok(hello)) => print!("{hello}"),
            Ok(Err(e)) => errors.push(e),
            Err(_) => errors.push("a client thread panicked".into()),
        }
    }
    if !errors.is_empty() {
        return Err(errors.join("; "));
    }
    println!("ok conns={conns}");
    Ok(())
}

/// Connects and reads the greeting.
fn connect(addr: SocketAddr) -> Result<(TcpStream, BufReader<TcpStream>, String), String> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok();
    let mut reader = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
    let mut hello = String::new();
    reader
        .read_line(&mut hello)
        .map_err(|e| format!("reading the greeting: {e}"))?;
    Ok((s, reader, hello))
}

/// Sends `bytes` and checks they come back unchanged.
fn echo_check(s: TcpStream, reader: BufReader<TcpStream>, bytes: usize) -> Result<(), String> {
    let data = pattern(bytes);
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let sent = data.clone();
    let writer = std::thread::spawn(move || w.write_all(&sent));
    let got = read_echo(reader, bytes)?;
    writer
        .join()
        .unwrap()
        .map_err(|e| format!("writing: {e}"))?;
    let _ = s.shutdown(Shutdown::Both);
    compare(&got, &data)
}

/// Reads `bytes` of echo, saying how many came before an early end or error.
fn read_echo(mut reader: BufReader<TcpStream>, bytes: usize) -> Result<Vec<u8>, String> {
    let mut got = vec![0u8; bytes];
    let mut filled = 0;
    while filled < bytes {
        match reader.read(&mut got[filled..]) {
            Ok(0) => {
                return Err(format!(
                    "the echo ended after {filled} of {bytes} bytes (end of stream)"
                ));
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(format!(
                    "reading the echo after {filled} of {bytes} bytes: {e}"
                ));
            }
        }
    }
    Ok(got)
}

/// Whether the echo is what was sent; else where it first differs.
fn compare(got: &[u8], data: &[u8]) -> Result<(), String> {
    if got != data {
        let first = got.iter().zip(data).position(|(a, b)| a != b).unwrap_or(0);
        return Err(format!(
            "echo differs from what was sent, first at byte {first}"
        ));
    }
    Ok(())
}
