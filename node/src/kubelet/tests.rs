//! The kubelet client against an HTTPS kubelet stand-in on loopback: every fault gives
//! its own kind and a message that names what to fix. No root needed.
use std::{path::PathBuf, time::Duration};

use merbridge_edge_testbed::kubelet_standin::{KubeletStandIn, Pki, Reply};

use super::*;

use merbridge_edge_testbed::podlist::KUBELET_FIXTURE as FIXTURE;

struct Setup {
    dir: PathBuf,
    pki: Pki,
    kubelet: KubeletStandIn,
    token_file: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn setup(name: &str) -> Setup {
    let dir = std::env::temp_dir().join(format!("mbe-kubelet-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let pki = Pki::new(&dir, "mbe-test-ca").unwrap();
    let kubelet =
        KubeletStandIn::start(&pki, None, "token-1", Reply::Body(FIXTURE.into())).unwrap();
    let token_file = dir.join("token");
    fs::write(&token_file, "token-1\n").unwrap();
    Setup {
        dir,
        pki,
        kubelet,
        token_file,
    }
}

impl Setup {
    fn config(&self) -> KubeletConfig {
        KubeletConfig {
            url: self.kubelet.url(),
            token_file: Some(self.token_file.clone()),
            ca_file: self.pki.ca_file.clone(),
            insecure_skip_tls_verify: false,
            client_cert: None,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(2),
        }
    }

    fn fetch(&self, config: KubeletConfig) -> Result<ParsedPods, PollError> {
        KubeletClient::new(config)
            .fetch()
            .map(|p| p.expect("a first answer is never unchanged"))
    }
}

fn names(p: &ParsedPods) -> Vec<String> {
    p.pods
        .iter()
        .map(|p| p.metadata.name.clone().unwrap_or_default())
        .collect()
}

#[test]
fn reads_a_real_shaped_pod_list_with_a_bearer_token() {
    let s = setup("ok");
    let got = s.fetch(s.config()).unwrap();
    assert_eq!(got.pods.len(), 7, "{:?}", names(&got));
    assert!(got.skipped.is_empty());
    assert!(names(&got).contains(&"reviews-v1-7d9f8c6b5-x2k4p".to_string()));
}

#[test]
fn token_is_read_again_on_every_poll() {
    let s = setup("rotate");
    let mut client = KubeletClient::new(s.config());
    assert!(client.fetch().unwrap().is_some());
    // The same body again: nothing to parse.
    assert!(client.fetch().unwrap().is_none());
    // The kubelet now wants a new token; the file still holds the old one.
    s.kubelet.set_token(Some("token-2"));
    let e = client.fetch().unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unauthorized, "{e}");
    assert!(
        e.message.contains(&s.token_file.display().to_string()),
        "{e}"
    );
    // Rotation lands in the file: the same client picks it up.
    fs::write(&s.token_file, "token-2").unwrap();
    assert!(client.fetch().is_ok());
}

#[test]
fn a_certificate_from_another_ca_is_refused_and_named() {
    let s = setup("ca");
    let other = Pki::new(&s.dir.join("other"), "some-other-ca").unwrap();
    let mut config = s.config();
    config.ca_file = other.ca_file.clone();
    let e = s.fetch(config.clone()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Tls, "{e}");
    for needle in [
        "CN=mbe-test-kubelet",
        "CN=mbe-test-ca",
        &other.ca_file.display().to_string(),
    ] {
        assert!(e.message.contains(needle), "{needle:?} not in: {e}");
    }
    // Skipping verification gets through (and is never the default).
    config.insecure_skip_tls_verify = true;
    assert_eq!(s.fetch(config).unwrap().pods.len(), 7);
}

#[test]
fn a_replaced_ca_file_is_picked_up_without_a_restart() {
    let s = setup("ca-rotate");
    let other = Pki::new(&s.dir.join("other"), "some-other-ca").unwrap();
    let ca = s.dir.join("rotating-ca.crt");
    fs::copy(&other.ca_file, &ca).unwrap();
    let mut config = s.config();
    config.ca_file = ca.clone();
    let mut client = KubeletClient::new(config);
    assert_eq!(client.fetch().unwrap_err().kind, ErrorKind::Tls);
    fs::copy(&s.pki.ca_file, &ca).unwrap();
    assert_eq!(client.fetch().unwrap().unwrap().pods.len(), 7);
}

#[test]
fn a_client_certificate_authenticates_without_a_token() {
    let s = setup("client-cert");
    let mut config = s.config();
    config.token_file = None;
    assert_eq!(
        s.fetch(config.clone()).unwrap_err().kind,
        ErrorKind::Unauthorized
    );
    config.client_cert = Some((s.pki.client.cert.clone(), s.pki.client.key.clone()));
    assert_eq!(s.fetch(config).unwrap().pods.len(), 7);
}

#[test]
fn forbidden_names_the_rbac_rule_to_grant() {
    let s = setup("403");
    s.kubelet.set_reply(Reply::Status(
        403,
        "Forbidden (user=system:serviceaccount:merbridge-edge:agent, verb=get, resource=nodes, subresource(s)=[pods])".into(),
    ));
    let e = s.fetch(s.config()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Forbidden);
    for needle in ["nodes/pods", "nodes/proxy", "subresource(s)=[pods]"] {
        assert!(e.message.contains(needle), "{needle:?} not in: {e}");
    }
}

#[test]
fn server_errors_carry_the_status_and_what_the_kubelet_said() {
    let s = setup("500");
    s.kubelet
        .set_reply(Reply::Status(503, "kubelet is shutting down\nmore".into()));
    let e = s.fetch(s.config()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Status);
    assert!(e.message.contains("HTTP 503"), "{e}");
    assert!(e.message.contains("kubelet is shutting down"), "{e}");
    assert!(!e.message.contains("more"), "only the first line: {e}");
}

#[test]
fn bodies_that_are_not_pod_lists_are_refused() {
    let s = setup("body");
    for (body, needle) in [
        (&b"<html>proxy error</html>"[..], "not JSON"),
        (
            br#"{"kind":"Status","apiVersion":"v1"}"#,
            "got kind \"Status\"",
        ),
        (br#"{"kind":"PodList","items":{}}"#, "not a v1 PodList"),
        (br#"{"kind":"PodList","items":[{"#, "not JSON"),
    ] {
        s.kubelet.set_reply(Reply::Body(body.to_vec()));
        let e = s.fetch(s.config()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Body, "{e}");
        assert!(e.message.contains(needle), "{needle:?} not in: {e}");
        assert!(e.message.contains(s.kubelet.url().as_str()), "{e}");
    }
}

#[test]
fn a_malformed_pod_is_skipped_by_name_and_the_rest_kept() {
    let s = setup("item");
    let mut list: serde_json::Value = serde_json::from_str(FIXTURE).unwrap();
    list["items"][1]["spec"]["containers"] = serde_json::json!("not a list");
    list["items"][2]["metadata"]["name"] = serde_json::json!(42);
    s.kubelet
        .set_reply(Reply::Body(serde_json::to_vec(&list).unwrap()));
    let got = s.fetch(s.config()).unwrap();
    assert_eq!(got.pods.len(), 5, "{:?}", names(&got));
    assert_eq!(got.skipped.len(), 2, "{:?}", got.skipped);
    assert!(
        got.skipped
            .iter()
            .any(|s| s.contains("pod emojivoto/web-5d7f9b8c4-q8zrt")),
        "{:?}",
        got.skipped
    );
    assert!(
        got.skipped.iter().any(|s| s.contains("item 2")),
        "{:?}",
        got.skipped
    );
}

#[test]
fn a_pod_list_over_the_limit_is_refused() {
    let s = setup("big");
    let mut body = br#"{"kind":"PodList","items":[],"pad":""#.to_vec();
    body.resize(MAX_PODLIST_BYTES as usize + 1024, b'x');
    body.extend_from_slice(b"\"}");
    // Announced by Content-Length: refused before reading a byte of it.
    s.kubelet.set_reply(Reply::Body(body.clone()));
    let e = s.fetch(s.config()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::TooLarge, "{e}");
    assert!(
        e.to_string().contains("announces") && e.to_string().contains("not read"),
        "{e}"
    );
    // Sent chunked, with no size said: reading stops at the limit.
    s.kubelet.set_reply(Reply::Chunked(body));
    let e = s.fetch(s.config()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::TooLarge, "{e}");
    assert!(e.to_string().contains("byte limit"), "{e}");
    // A chunked list within the limit is read as any other.
    let list = br#"{"kind":"PodList","apiVersion":"v1","items":[]}"#.to_vec();
    s.kubelet.set_reply(Reply::Chunked(list));
    assert_eq!(s.fetch(s.config()).unwrap().pods.len(), 0);
}

#[test]
fn a_silent_kubelet_times_out() {
    let s = setup("slow");
    s.kubelet.set_reply(Reply::Stall(Duration::from_secs(3)));
    let mut config = s.config();
    config.request_timeout = Duration::from_millis(400);
    let started = std::time::Instant::now();
    let e = s.fetch(config).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Timeout, "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn refused_and_dropped_connections_are_connect_errors() {
    let s = setup("refused");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = s.config();
    config.url = format!("https://127.0.0.1:{port}");
    let e = s.fetch(config).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Connect, "{e}");
    assert!(e.message.contains(&port.to_string()), "{e}");

    s.kubelet.set_reply(Reply::Hangup);
    let e = s.fetch(s.config()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Connect, "{e}");
}

#[test]
fn missing_or_bad_credential_files_are_named() {
    let s = setup("creds");
    let mut config = s.config();
    config.token_file = Some(s.dir.join("no-such-token"));
    let e = s.fetch(config).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Credentials);
    assert!(e.message.contains("no-such-token"), "{e}");

    fs::write(&s.token_file, "  \n").unwrap();
    let e = s.fetch(s.config()).unwrap_err();
    assert!(e.message.contains("is empty"), "{e}");
    fs::write(&s.token_file, "token-1").unwrap();

    let garbage = s.dir.join("garbage.crt");
    fs::write(&garbage, "not a certificate").unwrap();
    let mut config = s.config();
    config.ca_file = garbage;
    let e = s.fetch(config).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Credentials);
    assert!(
        e.message.contains("garbage.crt") && e.message.contains("no PEM certificate"),
        "{e}"
    );

    let mut config = s.config();
    config.ca_file = s.dir.join("absent.crt");
    assert!(s.fetch(config).unwrap_err().message.contains("absent.crt"));
}

#[test]
fn default_url_follows_host_ip() {
    assert_eq!(default_url(Some("10.0.0.5")), "https://10.0.0.5:10250");
    assert_eq!(default_url(Some("fd00::5")), "https://[fd00::5]:10250");
    assert_eq!(default_url(Some(" ")), "https://127.0.0.1:10250");
    assert_eq!(default_url(None), "https://127.0.0.1:10250");
}

#[test]
fn credential_files_linking_out_of_their_directory_are_refused() {
    let s = setup("links");
    // The service-account layout (token -> ..data/token) is followed.
    let mounted = s.dir.join("sa");
    fs::create_dir_all(mounted.join("..v1")).unwrap();
    fs::write(mounted.join("..v1/token"), "token-1").unwrap();
    std::os::unix::fs::symlink("..v1", mounted.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/token", mounted.join("token")).unwrap();
    let mut config = s.config();
    config.token_file = Some(mounted.join("token"));
    assert_eq!(s.fetch(config.clone()).unwrap().pods.len(), 7);

    // A link out of the directory to another file of the host is not read.
    std::os::unix::fs::symlink(&s.token_file, mounted.join("elsewhere")).unwrap();
    config.token_file = Some(mounted.join("elsewhere"));
    let e = s.fetch(config.clone()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Credentials, "{e}");
    assert!(
        e.to_string().contains("leading out of its directory"),
        "{e}"
    );

    std::os::unix::fs::symlink(&s.pki.ca_file, mounted.join("ca.crt")).unwrap();
    config.token_file = Some(mounted.join("token"));
    config.ca_file = mounted.join("ca.crt");
    let e = s.fetch(config).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Credentials, "{e}");
    assert!(e.to_string().contains("CA file"), "{e}");
}
