//! Istio's own switches: the interception mode and DNS capture through the proxy
//! metadata, read where Istio's injector writes them (istio/istio
//! `manifests/charts/istio-control/istio-discovery/files/injection-template.yaml`,
//! 1.30.3) and as Istio's own tools read them.
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Container;
use serde::Deserialize;

use super::init_args::{InitArgs, env_value};
use crate::mesh::{InitSetting, InterceptionModeSources};

/// How Istio intercepts a pod's traffic, and where that was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Interception {
    /// `REDIRECT` (the default), `TPROXY`, `NONE`, or whatever else was written.
    pub mode: String,
    /// Where it was read: `istio-init -m`, `istio-proxy env ISTIO_META_INTERCEPTION_MODE`,
    /// `annotation sidecar.istio.io/interceptionMode`, or `default`.
    pub origin: String,
}

/// The pod's interception mode. The first non-empty of:
/// 1. the init container's `-m` (or its variable): what istio-iptables applied;
/// 2. the sidecar's `ISTIO_META_INTERCEPTION_MODE`, which the injector always sets from
///    the annotation or the mesh-wide `defaultConfig.interceptionMode` (the only
///    record of a mesh-wide mode when there is no init container, as with `NONE`);
/// 3. the `sidecar.istio.io/interceptionMode` annotation;
/// 4. `REDIRECT`.
///
/// The injector derives all three from the same setting, so the order only matters
/// for pods set up some other way or annotations edited after injection.
pub(super) fn interception_mode(
    sources: &InterceptionModeSources,
    init: Option<&InitArgs>,
    sidecar: Option<(&str, &Container)>,
    annotations: Option<&BTreeMap<String, String>>,
) -> Interception {
    let from_init = init
        .and_then(|i| i.get(InitSetting::InterceptionMode))
        .map(|g| (g.value.as_str(), g.origin.clone()));
    let from_env = sidecar.and_then(|(name, c)| {
        env_value(c, sources.sidecar_env)
            .map(|v| (v, format!("{name} env {}", sources.sidecar_env)))
    });
    let from_annotation = annotations
        .and_then(|a| a.get(sources.annotation))
        .map(|v| (v.as_str(), format!("annotation {}", sources.annotation)));
    [from_init, from_env, from_annotation]
        .into_iter()
        .flatten()
        .find(|(v, _)| !v.trim().is_empty())
        .map_or_else(
            || Interception {
                mode: "REDIRECT".into(),
                origin: "default".into(),
            },
            |(v, origin)| Interception {
                mode: v.trim().to_string(),
                origin,
            },
        )
}

/// Go's `strconv.ParseBool`, which Istio's agent, CNI plugin and istio-iptables use
/// for `ISTIO_META_DNS_CAPTURE`.
pub(super) fn go_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// The part of Istio's ProxyConfig (`proxy.istio.io/config`) the agent reads; every
/// other field is skipped unread.
#[derive(Deserialize)]
struct ProxyConfigMetadata {
    #[serde(rename = "proxyMetadata", alias = "proxy_metadata", default)]
    proxy_metadata: Option<BTreeMap<String, String>>,
}

/// `variable` in the `proxyMetadata` of a ProxyConfig written as YAML or JSON (Istio
/// reads it with `protomarshal.ApplyYAML`; JSON is YAML). `Ok(None)`: not set.
pub(super) fn proxy_metadata(config: &str, variable: &str) -> Result<Option<String>, String> {
    if config.trim().is_empty() {
        return Ok(None);
    }
    let parsed: Option<ProxyConfigMetadata> =
        serde_yaml_ng::from_str(config).map_err(|e| e.to_string())?;
    Ok(parsed
        .and_then(|c| c.proxy_metadata)
        .and_then(|mut m| m.remove(variable)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_bool_is_strconv_parse_bool() {
        for t in ["1", "t", "T", "TRUE", "true", "True"] {
            assert_eq!(go_bool(t), Some(true), "{t}");
        }
        for f in ["0", "f", "F", "FALSE", "false", "False"] {
            assert_eq!(go_bool(f), Some(false), "{f}");
        }
        for bad in ["", "yes", "on", " true", "tRUE", "enabled"] {
            assert_eq!(go_bool(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn proxy_metadata_from_yaml_json_and_nothing() {
        let v = "ISTIO_META_DNS_CAPTURE";
        let yaml = "holdApplicationUntilProxyStarts: true\nproxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n  ISTIO_META_DNS_AUTO_ALLOCATE: \"true\"\n";
        assert_eq!(proxy_metadata(yaml, v), Ok(Some("true".into())));
        let json =
            r#"{"proxyMetadata":{"ISTIO_META_DNS_CAPTURE":"false"},"tracing":{"sampling":10}}"#;
        assert_eq!(proxy_metadata(json, v), Ok(Some("false".into())));
        let flow = "proxyMetadata: {ISTIO_META_DNS_CAPTURE: \"true\"}";
        assert_eq!(proxy_metadata(flow, v), Ok(Some("true".into())));
        assert_eq!(
            proxy_metadata("proxy_metadata:\n  ISTIO_META_DNS_CAPTURE: \"1\"", v),
            Ok(Some("1".into())),
            "protojson also takes the proto field name"
        );
        assert_eq!(proxy_metadata("concurrency: 2", v), Ok(None));
        assert_eq!(proxy_metadata("proxyMetadata: {}", v), Ok(None));
        assert_eq!(proxy_metadata("  \n", v), Ok(None));
        assert_eq!(proxy_metadata("~", v), Ok(None));
    }

    #[test]
    fn malformed_proxy_config_is_an_error() {
        let v = "ISTIO_META_DNS_CAPTURE";
        for bad in [
            "proxyMetadata: [unclosed",
            "proxyMetadata: [\"a\", \"b\"]",
            "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE:\n    nested: true",
            "just a string",
            "{\"proxyMetadata\": ",
        ] {
            assert!(proxy_metadata(bad, v).is_err(), "{bad:?}");
        }
    }
}
