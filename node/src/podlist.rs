//! The kubelet's PodList: how a body is parsed (item by item, a bad item skipped and
//! named), how large it may be, and how a failed poll is described.
use std::hash::Hasher;

use anyhow::{Result, bail};
use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;
use serde_json::value::RawValue;

/// What kind of failure a poll hit; the label of the `poll_errors_total` metric.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// A credential file (token, CA, client certificate) is missing or unusable.
    Credentials,
    /// No TCP connection: refused, unreachable, unresolvable.
    Connect,
    /// Connect or request timeout.
    Timeout,
    /// TLS handshake failed (certificate not trusted, wrong name, protocol).
    Tls,
    /// 401: the credentials were rejected.
    Unauthorized,
    /// 403: authenticated, but RBAC does not allow reading pods.
    Forbidden,
    /// Any other non-2xx status.
    Status,
    /// The body is over [`MAX_PODLIST_BYTES`].
    TooLarge,
    /// The body is not a JSON v1 PodList.
    Body,
}

impl ErrorKind {
    /// Every kind, for metrics that list zeros too.
    pub const ALL: [ErrorKind; 9] = [
        ErrorKind::Credentials,
        ErrorKind::Connect,
        ErrorKind::Timeout,
        ErrorKind::Tls,
        ErrorKind::Unauthorized,
        ErrorKind::Forbidden,
        ErrorKind::Status,
        ErrorKind::TooLarge,
        ErrorKind::Body,
    ];

    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::Credentials => "credentials",
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Tls => "tls",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::Status => "status",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::Body => "body",
        }
    }
}

/// A failed poll: its kind and a message that says what to do about it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PollError {
    /// What went wrong.
    pub kind: ErrorKind,
    /// The whole story, naming the URL or file involved.
    pub message: String,
}

impl PollError {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// Largest PodList accepted (bytes). A node's 110 pods as injected by a mesh take about
/// 0.6 MiB (5.6 KiB each); 8 MiB leaves room for heavily annotated pods while the body
/// and its parse stay inside the manifest's 64 MiB limit (at 32 MiB the agent was
/// OOM-killed there: `scripts/measure-memory`).
pub const MAX_PODLIST_BYTES: u64 = 8 << 20;

/// A parsed PodList: the pods that parsed, and a note for each item that did not.
#[derive(Debug, Default)]
pub struct ParsedPods {
    /// Pods that are valid v1 Pods.
    pub pods: Vec<Pod>,
    /// One line per item skipped, naming it and what was wrong.
    pub skipped: Vec<String>,
}

/// The outline of a PodList: its kind and each item unparsed.
#[derive(Deserialize)]
struct Outline<'a> {
    #[serde(default)]
    kind: Option<String>,
    #[serde(borrow, default)]
    items: Option<Vec<&'a RawValue>>,
}

/// Enough of an item to name it when it is not a valid Pod.
#[derive(Deserialize, Default)]
#[serde(default)]
struct ItemName {
    metadata: ItemMeta,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ItemMeta {
    name: Option<String>,
    namespace: Option<String>,
}

/// Parses a kubelet `/pods` response body (a v1 PodList). A malformed item is skipped
/// (and named), not allowed to take the whole list down with it; a body that is not a
/// PodList at all is an error. Items are parsed straight from the body, with no
/// intermediate JSON tree.
pub fn parse_pod_list(origin: &str, body: &[u8]) -> Result<ParsedPods> {
    Ok(PodListItems::read(origin, body)?.parse(origin))
}

/// A PodList read as far as its items, each left unparsed.
pub struct PodListItems<'a> {
    items: Vec<&'a RawValue>,
}

impl<'a> PodListItems<'a> {
    /// Reads the outline of a PodList body; an error names `origin` when the body is
    /// not JSON or not a v1 PodList.
    pub fn read(origin: &str, body: &'a [u8]) -> Result<Self> {
        let outline: Outline = serde_json::from_slice(body).map_err(|e| {
            if e.is_data() {
                anyhow::anyhow!("{origin}: not a v1 PodList: {e}")
            } else {
                anyhow::anyhow!("{origin}: body is not JSON: {e}")
            }
        })?;
        let kind = outline.kind.as_deref().unwrap_or("");
        if kind != "PodList" {
            bail!("{origin}: expected a v1 PodList, got kind {kind:?}");
        }
        Ok(Self {
            items: outline.items.unwrap_or_default(),
        })
    }

    /// A digest of the items that does not depend on their order (the kubelet lists
    /// its pods in a new order on every call): equal digests, same pods.
    pub fn digest(&self) -> u64 {
        let mut each: Vec<u64> = self
            .items
            .iter()
            .map(|item| {
                let mut h = std::hash::DefaultHasher::new();
                h.write(item.get().as_bytes());
                h.finish()
            })
            .collect();
        each.sort_unstable();
        let mut h = std::hash::DefaultHasher::new();
        for d in each {
            h.write_u64(d);
        }
        h.finish()
    }

    /// Parses every item; one that is not a valid Pod is skipped and named.
    pub fn parse(self, origin: &str) -> ParsedPods {
        let mut out = ParsedPods::default();
        for (i, item) in self.items.into_iter().enumerate() {
            match serde_json::from_str::<Pod>(item.get()) {
                Ok(pod) => out.pods.push(pod),
                Err(e) => {
                    let meta = serde_json::from_str::<ItemName>(item.get())
                        .unwrap_or_default()
                        .metadata;
                    let name = match (meta.namespace, meta.name) {
                        (Some(ns), Some(n)) => format!("pod {ns}/{n}"),
                        (None, Some(n)) => format!("pod {n}"),
                        _ => format!("item {i}"),
                    };
                    out.skipped
                        .push(format!("{origin}: {name} skipped: not a valid v1 Pod: {e}"));
                }
            }
        }
        out.skipped.sort();
        out
    }
}
