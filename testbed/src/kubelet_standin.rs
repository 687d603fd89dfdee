//! A kubelet stand-in: `GET /pods` over HTTPS on loopback, with a CA and certificates
//! made for the test, a bearer token (or client certificate) check, and switchable
//! answers for every fault the agent must survive. Like the kubelet, which lists its
//! pods by walking a map, it serves a PodList's items in a new order on every call.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::{
    ServerConfig, ServerConnection, StreamOwned,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    server::WebPkiClientVerifier,
};

/// A certificate and its key, in PEM files.
#[derive(Clone, Debug)]
pub struct CertFiles {
    /// Certificate (PEM).
    pub cert: PathBuf,
    /// Private key (PEM, PKCS#8).
    pub key: PathBuf,
}

/// A CA, a kubelet serving certificate it signed (SANs localhost, 127.0.0.1, ::1),
/// and a client certificate it signed, all written under one directory.
pub struct Pki {
    /// The CA certificate (PEM): what the agent's --ca-file points at.
    pub ca_file: PathBuf,
    /// The kubelet's serving certificate.
    pub server: CertFiles,
    /// A client certificate (CN system:node:mbe-test) the stand-in accepts.
    pub client: CertFiles,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: Vec<u8>,
    ca_der: CertificateDer<'static>,
}

fn write(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

impl Pki {
    /// Makes a fresh CA named `ca_name` and its certificates in `dir`.
    pub fn new(dir: &Path, ca_name: &str) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.distinguished_name.push(DnType::CommonName, ca_name);
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key)?;

        let server_key = KeyPair::generate()?;
        let mut server = CertificateParams::new(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ])?;
        server
            .distinguished_name
            .push(DnType::CommonName, "mbe-test-kubelet");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server.signed_by(&server_key, &ca_cert, &ca_key)?;

        let client_key = KeyPair::generate()?;
        let mut client = CertificateParams::new(Vec::<String>::new())?;
        client
            .distinguished_name
            .push(DnType::CommonName, "system:node:mbe-test");
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client.signed_by(&client_key, &ca_cert, &ca_key)?;

        Ok(Self {
            ca_file: write(dir, "ca.crt", &ca_cert.pem())?,
            server: CertFiles {
                cert: write(dir, "kubelet.crt", &server_cert.pem())?,
                key: write(dir, "kubelet.key", &server_key.serialize_pem())?,
            },
            client: CertFiles {
                cert: write(dir, "client.crt", &client_cert.pem())?,
                key: write(dir, "client.key", &client_key.serialize_pem())?,
            },
            server_chain: vec![server_cert.der().clone()],
            server_key: server_key.serialize_der(),
            ca_der: ca_cert.der().clone(),
        })
    }
}

/// What the stand-in answers to `GET /pods`.
#[derive(Clone, Debug)]
pub enum Reply {
    /// 200 with this body.
    Body(Vec<u8>),
    /// This status and body.
    Status(u16, String),
    /// Read the request, then say nothing for this long and close.
    Stall(Duration),
    /// Close the connection as soon as the request is read.
    Hangup,
    /// 200 with this body sent chunked: no Content-Length announces its size.
    Chunked(Vec<u8>),
}

struct Shared {
    reply: Mutex<Reply>,
    token: Mutex<Option<String>>,
    requests: AtomicU64,
    stop: AtomicBool,
}

/// The running stand-in; stops when dropped.
pub struct KubeletStandIn {
    /// Where it listens.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl KubeletStandIn {
    /// Serves on `127.0.0.1:0` (or `addr`), requiring `Bearer <token>` unless a valid
    /// client certificate is shown; answers `reply`.
    pub fn start(pki: &Pki, addr: Option<SocketAddr>, token: &str, reply: Reply) -> Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca_der.clone())?;
        let clients =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                .build()?;
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(clients)
            .with_single_cert(
                pki.server_chain.clone(),
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.server_key.clone())),
            )?;
        let config = Arc::new(config);
        let listener = TcpListener::bind(addr.unwrap_or_else(|| ([127, 0, 0, 1], 0).into()))
            .context("binding the kubelet stand-in")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            reply: Mutex::new(reply),
            token: Mutex::new(Some(token.to_string())),
            requests: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let accept = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let (s, config) = (s.clone(), config.clone());
                std::thread::spawn(move || {
                    let _ = serve_one(stream, config, &s);
                });
            }
        });
        Ok(Self {
            addr,
            shared,
            accept: Some(accept),
        })
    }

    /// The URL to give the agent's `--kubelet-url`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The agent's flags for reading this stand-in with `token` and `ca` files.
    pub fn agent_flags(&self, token: &Path, ca: &Path) -> Vec<String> {
        vec![
            "--kubelet-url".into(),
            self.url(),
            "--token-file".into(),
            token.display().to_string(),
            "--ca-file".into(),
            ca.display().to_string(),
        ]
    }

    /// Changes the answer.
    pub fn set_reply(&self, reply: Reply) {
        *self.shared.reply.lock().unwrap() = reply;
    }

    /// Changes the token accepted (`None`: any request is let in).
    pub fn set_token(&self, token: Option<&str>) {
        *self.shared.token.lock().unwrap() = token.map(str::to_string);
    }

    /// Requests answered or refused so far.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Waits until `n` more requests than `since` have arrived.
    pub fn wait_requests(&self, since: u64, n: u64, limit: Duration) -> Result<()> {
        let end = std::time::Instant::now() + limit;
        while self.requests() < since + n {
            if std::time::Instant::now() > end {
                anyhow::bail!(
                    "the kubelet stand-in saw {} request(s), waited for {n} within {limit:?}",
                    self.requests() - since
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for KubeletStandIn {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag and closes the listener.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        // The listener is closed when this returns: the port can be taken again.
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn serve_one(tcp: TcpStream, config: Arc<ServerConfig>, shared: &Shared) -> Result<()> {
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(5)))?;
    let conn = ServerConnection::new(config)?;
    let mut tls = StreamOwned::new(conn, tcp);
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tls.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > 64 << 10 {
            return Ok(());
        }
    }
    if shared.stop.load(Ordering::SeqCst) {
        return Ok(());
    }
    shared.requests.fetch_add(1, Ordering::SeqCst);
    let head = String::from_utf8_lossy(&head).to_string();
    let path = head.split_whitespace().nth(1).unwrap_or("");
    let bearer = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("authorization")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    let has_client_cert = tls.conn.peer_certificates().is_some_and(|c| !c.is_empty());
    let token_ok = match &*shared.token.lock().unwrap() {
        None => true,
        Some(t) => bearer == format!("Bearer {t}"),
    };
    let reply = if path != "/pods" {
        Reply::Status(404, "404 page not found".into())
    } else if !token_ok && !has_client_cert {
        Reply::Status(401, "Unauthorized".into())
    } else {
        shared.reply.lock().unwrap().clone()
    };
    let (status, body) = match reply {
        Reply::Chunked(body) => {
            write!(
                tls,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            )?;
            for chunk in body.chunks(64 << 10) {
                write!(tls, "{:x}\r\n", chunk.len())?;
                tls.write_all(chunk)?;
                tls.write_all(b"\r\n")?;
            }
            tls.write_all(b"0\r\n\r\n")?;
            tls.conn.send_close_notify();
            tls.flush()?;
            return Ok(());
        }
        Reply::Body(b) => (
            200,
            shuffle_items(b, shared.requests.load(Ordering::SeqCst)),
        ),
        Reply::Status(s, b) => (s, b.into_bytes()),
        Reply::Stall(d) => {
            std::thread::sleep(d);
            return Ok(());
        }
        Reply::Hangup => return Ok(()),
    };
    let ctype = if status == 200 {
        "application/json"
    } else {
        "text/plain; charset=utf-8"
    };
    write!(
        tls,
        "HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    tls.write_all(&body)?;
    tls.conn.send_close_notify();
    tls.flush()?;
    Ok(())
}

/// `body` with its PodList items in an order drawn from `seed`, as the kubelet (which
/// walks a Go map) lists them; a body that is not a PodList is served as it is.
fn shuffle_items(body: Vec<u8>, seed: u64) -> Vec<u8> {
    let Ok(mut list) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return body;
    };
    let Some(items) = list.get_mut("items").and_then(|i| i.as_array_mut()) else {
        return body;
    };
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for i in (1..items.len()).rev() {
        // xorshift64
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        items.swap(i, (state % (i as u64 + 1)) as usize);
    }
    serde_json::to_vec(&list).unwrap_or(body)
}
