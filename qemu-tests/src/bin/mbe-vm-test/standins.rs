//! The hidden stand-in roles, as in testbed's `mbe-testbed`: `echo` (an app that
//! greets with who it is and echoes), `sidecar` (a proxy that asks SO_ORIGINAL_DST,
//! logs one line per connection and forwards, inbound from 127.0.0.6 like Envoy) and
//! `client` (connects, checks the echo byte for byte; optionally many connections at
//! once).
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{Arc, Barrier},
    time::Duration,
};

use merbridge_edge_standins::{echo, sidecar};

/// Runs role `role` with `args`.
pub fn run(role: &str, args: &[String]) -> Result<(), String> {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match (role, a.as_slice()) {
        ("echo", [name, ports @ ..]) => {
            let addrs: Vec<String> = ports.iter().map(|p| format!("0.0.0.0:{p}")).collect();
            echo(name, &addrs.iter().map(String::as_str).collect::<Vec<_>>())
        }
        ("sidecar", [name, out_port, in_port, log]) => {
            sidecar(name, "0.0.0.0", port(out_port)?, port(in_port)?, log)
        }
        ("client", [addr, bytes]) => client(addr, count(bytes)?),
        ("client", [addr, bytes, conns]) => clients(addr, count(bytes)?, count(conns)?),
        _ => Err(format!("unknown stand-in {role} {a:?}")),
    }
}

fn port(s: &str) -> Result<u16, String> {
    s.parse().map_err(|_| format!("bad port {s}"))
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
fn echo_check(s: TcpStream, mut reader: BufReader<TcpStream>, bytes: usize) -> Result<(), String> {
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
    Ok(())
}
