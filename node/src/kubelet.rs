//! The kubelet's `/pods` over HTTPS: the agent's source of truth on a real node.
//!
//! Synchronous (ureq + rustls with ring). The token, CA and client certificate files
//! are re-read when they change, so rotated credentials just work, and a missing file
//! is a poll error like any other: the agent keeps its last good state and retries.
use std::{
    fs,
    io::{Read, Write},
    net::{TcpStream, ToSocketAddrs},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime},
};
use ureq::tls::{Certificate, ClientCert, PemItem, PrivateKey, RootCerts, TlsConfig};

use crate::podlist::{ErrorKind, MAX_PODLIST_BYTES, ParsedPods, PodListItems, PollError};

/// The service-account token mounted into every pod.
pub const SERVICE_ACCOUNT_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// The service-account CA bundle; it verifies k3s kubelets' serving certificates.
pub const SERVICE_ACCOUNT_CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

/// The kubelet URL to use when none is given: `https://$HOST_IP:10250`, else loopback.
pub fn default_url(host_ip: Option<&str>) -> String {
    match host_ip.map(str::trim).filter(|s| !s.is_empty()) {
        Some(ip) if ip.contains(':') && !ip.starts_with('[') => format!("https://[{ip}]:10250"),
        Some(ip) => format!("https://{ip}:10250"),
        None => "https://127.0.0.1:10250".into(),
    }
}

/// How to reach and authenticate to the kubelet.
#[derive(Clone, Debug)]
pub struct KubeletConfig {
    /// Base URL, like `https://10.0.0.5:10250`.
    pub url: String,
    /// Bearer token file, read on every poll; None sends no token.
    pub token_file: Option<PathBuf>,
    /// CA bundle (PEM) that must have signed the kubelet's serving certificate.
    pub ca_file: PathBuf,
    /// Skip server certificate verification (never the default).
    pub insecure_skip_tls_verify: bool,
    /// Client certificate and key (PEM) the kubelet's client CA signed.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Limit on establishing the connection, TLS included.
    pub connect_timeout: Duration,
    /// Limit on the whole request, body included.
    pub request_timeout: Duration,
}

/// Modification stamp of the files an HTTP agent was built from.
type Stamp = Vec<Option<(SystemTime, u64)>>;

fn stamp(paths: &[&Path]) -> Stamp {
    paths
        .iter()
        .map(|p| {
            fs::metadata(p)
                .ok()
                .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
        })
        .collect()
}

/// Polls one kubelet's `/pods`.
pub struct KubeletClient {
    config: KubeletConfig,
    pods_url: String,
    agent: Option<(Stamp, ureq::Agent)>,
    /// Hash of the last body that parsed.
    last_good_body: Option<u64>,
}

impl KubeletClient {
    /// A client for `config`; nothing is read or connected until [`Self::fetch`].
    pub fn new(config: KubeletConfig) -> Self {
        let pods_url = format!("{}/pods", config.url.trim_end_matches('/'));
        Self {
            config,
            pods_url,
            agent: None,
            last_good_body: None,
        }
    }

    /// The URL polled.
    pub fn pods_url(&self) -> &str {
        &self.pods_url
    }

    fn credential_files(&self) -> Vec<&Path> {
        let mut files = Vec::new();
        if !self.config.insecure_skip_tls_verify {
            files.push(self.config.ca_file.as_path());
        }
        if let Some((cert, key)) = &self.config.client_cert {
            files.push(cert.as_path());
            files.push(key.as_path());
        }
        files
    }

    /// The HTTP agent, rebuilt when a CA or client certificate file changed.
    fn agent(&mut self) -> Result<ureq::Agent, PollError> {
        let now = stamp(&self.credential_files());
        if let Some((old, agent)) = &self.agent
            && *old == now
        {
            return Ok(agent.clone());
        }
        let agent = build_agent(&self.config)?;
        self.agent = Some((now, agent.clone()));
        Ok(agent)
    }

    /// One `GET /pods`: the pods, `None` when the body is the same as the last good
    /// one (nothing to parse: the steady state of a node), or what went wrong.
    pub fn fetch(&mut self) -> Result<Option<ParsedPods>, PollError> {
        let agent = self.agent()?;
        let mut request = agent
            .get(&self.pods_url)
            .header("Accept", "application/json");
        if let Some(file) = &self.config.token_file {
            request = request.header("Authorization", format!("Bearer {}", read_token(file)?));
        }
        let mut response = match request.call() {
            Ok(r) => r,
            Err(e) => return Err(self.describe_transport_error(e)),
        };
        let status = response.status().as_u16();
        if status != 200 {
            // Only the start of an error body is shown; no need to read more.
            let said = response
                .body_mut()
                .with_config()
                .limit(64 << 10)
                .read_to_vec()
                .map(|b| snippet(&b))
                .unwrap_or_default();
            return Err(self.describe_status(status, &said));
        }
        if let Some(announced) = response.body().content_length()
            && announced > MAX_PODLIST_BYTES
        {
            return Err(PollError::new(
                ErrorKind::TooLarge,
                format!(
                    "kubelet {}: the PodList announces {announced} bytes, over the \
                     {MAX_PODLIST_BYTES} byte limit; not read",
                    self.pods_url
                ),
            ));
        }
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_PODLIST_BYTES)
            .read_to_vec();
        let body = body.map_err(|e| match e {
            ureq::Error::BodyExceedsLimit(_) => PollError::new(
                ErrorKind::TooLarge,
                format!(
                    "kubelet {}: the PodList is over the {MAX_PODLIST_BYTES} byte limit",
                    self.pods_url
                ),
            ),
            other => self.describe_transport_error(other),
        })?;
        let origin = format!("kubelet {}", self.pods_url);
        let items = PodListItems::read(&origin, &body)
            .map_err(|e| PollError::new(ErrorKind::Body, format!("{e:#}")))?;
        // The same pods in another order are unchanged.
        let digest = items.digest();
        if self.last_good_body == Some(digest) {
            return Ok(None);
        }
        let parsed = items.parse(&origin);
        self.last_good_body = Some(digest);
        Ok(Some(parsed))
    }

    fn who(&self) -> String {
        match (&self.config.token_file, &self.config.client_cert) {
            (Some(t), None) => format!("the bearer token in {}", t.display()),
            (None, Some((c, _))) => format!("the client certificate {}", c.display()),
            (Some(t), Some((c, _))) => format!(
                "the client certificate {} and the bearer token in {}",
                c.display(),
                t.display()
            ),
            (None, None) => "no credentials (no token file, no client certificate)".into(),
        }
    }

    fn describe_status(&self, status: u16, said: &str) -> PollError {
        let url = &self.pods_url;
        let said = if said.is_empty() {
            String::new()
        } else {
            format!("; kubelet said: {said}")
        };
        match status {
            401 => PollError::new(
                ErrorKind::Unauthorized,
                format!(
                    "kubelet {url}: 401 Unauthorized: it rejected {} (expired, revoked, or not from this cluster){said}",
                    self.who()
                ),
            ),
            403 => PollError::new(
                ErrorKind::Forbidden,
                format!(
                    "kubelet {url}: 403 Forbidden: the agent's identity may not read pods from the kubelet; \
                     grant RBAC verb get on nodes/pods (Kubernetes 1.33+), or on nodes/proxy on older clusters{said}"
                ),
            ),
            _ => PollError::new(
                ErrorKind::Status,
                format!("kubelet {url}: HTTP {status}{said}"),
            ),
        }
    }

    fn describe_transport_error(&self, e: ureq::Error) -> PollError {
        let url = &self.pods_url;
        if let Some(tls) = rustls_error(&e) {
            let mut message = format!("kubelet {url}: TLS handshake failed: {tls}");
            if matches!(tls, rustls::Error::InvalidCertificate(_)) {
                let who = peer_certificate(&self.config)
                    .map(|c| format!("the kubelet's certificate ({c})"))
                    .unwrap_or_else(|| "the kubelet's certificate".into());
                message.push_str(&format!(
                    "; {who} does not verify against the CA file {}",
                    self.config.ca_file.display()
                ));
            }
            return PollError::new(ErrorKind::Tls, message);
        }
        let timeout = |which: String| {
            PollError::new(
                ErrorKind::Timeout,
                format!(
                    "kubelet {url}: no answer within {:?} ({which}; see --kubelet-timeout)",
                    self.config.request_timeout
                ),
            )
        };
        match e {
            ureq::Error::Timeout(which) => timeout(which.to_string()),
            ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => {
                timeout(io.to_string())
            }
            ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
                PollError::new(
                    ErrorKind::Connect,
                    format!("kubelet {url}: the kubelet closed the connection without answering"),
                )
            }
            other => PollError::new(
                ErrorKind::Connect,
                format!("kubelet {url}: cannot connect: {other}"),
            ),
        }
    }
}

/// The rustls error inside `e`, if the failure was TLS.
fn rustls_error(e: &ureq::Error) -> Option<&rustls::Error> {
    match e {
        ureq::Error::Rustls(r) => Some(r),
        ureq::Error::Io(io) => io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
        _ => None,
    }
}

/// First line of a response body, trimmed to a readable length.
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(512)]);
    let line = text.lines().next().unwrap_or("").trim();
    let mut out: String = line.chars().take(200).collect();
    if line.chars().count() > 200 {
        out.push('…');
    }
    out
}

/// Token, certificate and key files are small; anything larger is not one.
const MAX_CREDENTIAL_BYTES: u64 = 1 << 20;

fn read_token(file: &Path) -> Result<String, PollError> {
    let token = crate::files::read_beneath(file, MAX_CREDENTIAL_BYTES).map_err(|e| {
        PollError::new(
            ErrorKind::Credentials,
            format!("token file {}: {e}", file.display()),
        )
    })?;
    let token = String::from_utf8_lossy(&token);
    let token = token.trim();
    if token.is_empty() {
        return Err(PollError::new(
            ErrorKind::Credentials,
            format!("token file {} is empty", file.display()),
        ));
    }
    if token.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
        return Err(PollError::new(
            ErrorKind::Credentials,
            format!(
                "token file {}: the token holds characters a bearer token cannot have",
                file.display()
            ),
        ));
    }
    Ok(token.to_string())
}

fn credential_error(file: &Path, what: &str) -> PollError {
    PollError::new(
        ErrorKind::Credentials,
        format!("{}: {what}", file.display()),
    )
}

fn read_pem(file: &Path, role: &str) -> Result<Vec<u8>, PollError> {
    crate::files::read_beneath(file, MAX_CREDENTIAL_BYTES)
        .map_err(|e| credential_error(file, &format!("{role}: {e}")))
}

fn build_agent(config: &KubeletConfig) -> Result<ureq::Agent, PollError> {
    let mut tls = TlsConfig::builder();
    if config.insecure_skip_tls_verify {
        tls = tls.disable_verification(true);
    } else {
        let pem = read_pem(&config.ca_file, "CA file")?;
        let mut certs = Vec::new();
        for item in ureq::tls::parse_pem(&pem) {
            match item {
                Ok(PemItem::Certificate(c)) => certs.push(c),
                Ok(_) => {}
                Err(e) => {
                    return Err(credential_error(
                        &config.ca_file,
                        &format!("CA file is not valid PEM: {e}"),
                    ));
                }
            }
        }
        if certs.is_empty() {
            return Err(credential_error(
                &config.ca_file,
                "CA file holds no PEM certificate",
            ));
        }
        tls = tls.root_certs(RootCerts::new_with_certs(&certs));
    }
    if let Some((cert_file, key_file)) = &config.client_cert {
        let pem = read_pem(cert_file, "client certificate")?;
        let chain: Vec<Certificate<'static>> = ureq::tls::parse_pem(&pem)
            .filter_map(|i| match i {
                Ok(PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        if chain.is_empty() {
            return Err(credential_error(
                cert_file,
                "client certificate file holds no PEM certificate",
            ));
        }
        let key = PrivateKey::from_pem(&read_pem(key_file, "client key")?).map_err(|e| {
            credential_error(
                key_file,
                &format!("client key is not a PEM private key: {e}"),
            )
        })?;
        tls = tls.client_cert(Some(ClientCert::new_with_certs(&chain, key)));
    }
    let config = ureq::Agent::config_builder()
        .tls_config(tls.build())
        .http_status_as_error(false)
        .timeout_connect(Some(config.connect_timeout))
        .timeout_global(Some(config.request_timeout))
        .user_agent(concat!("merbridge-edge/", env!("CARGO_PKG_VERSION")))
        .max_idle_connections(1)
        .build();
    Ok(ureq::Agent::new_with_config(config))
}

/// Connects once more without verifying, to name the certificate the kubelet presents.
/// Only used to explain a failed handshake; nothing is sent.
fn peer_certificate(config: &KubeletConfig) -> Option<String> {
    let uri: ureq::http::Uri = config.url.parse().ok()?;
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    let addr = (host, uri.port_u16().unwrap_or(443))
        .to_socket_addrs()
        .ok()?
        .next()?;
    let captured = Arc::new(CaptureCertificate::default());
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .ok()?
    .dangerous()
    .with_custom_certificate_verifier(captured.clone())
    .with_no_client_auth();
    let name = ServerName::try_from(host.to_string()).ok()?;
    let mut conn = rustls::ClientConnection::new(Arc::new(tls), name).ok()?;
    let mut sock = TcpStream::connect_timeout(&addr, config.connect_timeout).ok()?;
    sock.set_read_timeout(Some(config.connect_timeout)).ok()?;
    sock.set_write_timeout(Some(config.connect_timeout)).ok()?;
    while conn.is_handshaking() && captured.certificate().is_none() {
        if conn.complete_io(&mut sock).is_err() {
            break;
        }
    }
    let _ = sock.flush();
    let mut sink = [0u8; 1];
    let _ = conn.reader().read(&mut sink);
    captured.certificate().map(|der| describe_certificate(&der))
}

/// `subject …, issuer …` of a DER certificate.
pub fn describe_certificate(der: &[u8]) -> String {
    use x509_cert::der::Decode;
    match x509_cert::Certificate::from_der(der) {
        Ok(c) => format!(
            "subject {}, issuer {}",
            c.tbs_certificate.subject, c.tbs_certificate.issuer
        ),
        Err(e) => format!("unparseable certificate: {e}"),
    }
}

/// A verifier that accepts anything and keeps the end-entity certificate.
#[derive(Debug, Default)]
struct CaptureCertificate(std::sync::Mutex<Option<Vec<u8>>>);

impl CaptureCertificate {
    fn certificate(&self) -> Option<Vec<u8>> {
        self.0.lock().ok()?.clone()
    }
}

impl ServerCertVerifier for CaptureCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(end_entity.to_vec());
        }
        // Refuse, so the diagnostic connection ends here.
        Err(rustls::Error::General("certificate captured".into()))
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify_tls13_signature(m, c, d)
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Never reached: the certificate is refused first.
        Err(rustls::Error::General("not verified".into()))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests;
