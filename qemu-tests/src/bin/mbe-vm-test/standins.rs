//! The hidden stand-in roles, as in testbed's `mbe-testbed`: `echo` (an app that
//! greets with who it is and echoes), `sidecar` (a proxy that asks SO_ORIGINAL_DST,
//! logs one line per connection and forwards, inbound from 127.0.0.6 like Envoy) and
//! `client` (connects, checks the echo byte for byte).
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
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
