//! Reads a mesh's init container the way the tool in it does (spf13/pflag): its
//! environment first, then its command line, which wins; the last of a repeated flag
//! wins, except list flags, which add up. The flags are data in `mesh::init_flags`.
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, PodSpec};

use crate::mesh::{InitContainer, InitFlag, InitSetting};

/// One setting as the init container has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Given {
    /// The value as written.
    pub value: String,
    /// Where it was written, for messages: `istio-init -x`, `istio-init --redirect-dns`,
    /// `istio-init env ISTIO_META_DNS_CAPTURE`, `istio-init (no -i)`.
    pub origin: String,
    /// Given on the command line (a list flag given again adds to it).
    on_command_line: bool,
}

/// What a mesh's init container was told.
#[derive(Debug, Default)]
pub(super) struct InitArgs {
    settings: BTreeMap<InitSetting, Given>,
}

impl InitArgs {
    /// The setting, if the container has it (or the tool's default for it differs from
    /// the agent's).
    pub fn get(&self, setting: InitSetting) -> Option<&Given> {
        self.settings.get(&setting)
    }

    /// Every setting it has, in `InitSetting` order.
    pub fn iter(&self) -> impl Iterator<Item = (InitSetting, &Given)> {
        self.settings.iter().map(|(s, g)| (*s, g))
    }
}

/// The pod's init container of this kind, read; `None` when the pod has none (no
/// init container at all, Istio's CNI plugin without validation, Linkerd's CNI plugin).
pub(super) fn read(spec: &PodSpec, init: &InitContainer) -> Option<InitArgs> {
    let container = spec
        .init_containers
        .iter()
        .flatten()
        .find(|c| init.names.contains(&c.name.as_str()))?;
    Some(read_container(container, init))
}

fn read_container(c: &Container, init: &InitContainer) -> InitArgs {
    let mut out = InitArgs::default();
    // pflag sets flags from the environment before it parses the command line.
    for f in init.flags {
        let Some(setting) = f.setting else {
            continue;
        };
        for var in f.env {
            if let Some(value) = env_value(c, var) {
                out.settings.insert(
                    setting,
                    Given {
                        value: value.to_string(),
                        origin: format!("{} env {var}", c.name),
                        on_command_line: false,
                    },
                );
            }
        }
    }
    let mut words = c
        .command
        .iter()
        .flatten()
        .chain(c.args.iter().flatten())
        .map(String::as_str);
    while let Some(word) = words.next() {
        if word == "--" {
            break;
        }
        if let Some(long) = word.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (long, None),
            };
            // An unknown flag is read as a switch: the tool would have refused it, so a
            // running pod has none unless the tool grew a flag since this table.
            let Some(f) = init.flags.iter().find(|f| f.long == name) else {
                continue;
            };
            let value = match (f.takes_value, inline) {
                (_, Some(v)) => v,
                (false, None) => "true",
                (true, None) => match words.next() {
                    Some(v) => v,
                    None => break,
                },
            };
            out.set(f, value, format!("{} --{name}", c.name));
        } else if let Some(shorts) = word.strip_prefix('-').filter(|s| !s.is_empty()) {
            // One-letter flags may share a word: switches, then at most one that takes
            // the rest of the word (after an optional `=`) or the next word.
            for (i, letter) in shorts.char_indices() {
                let Some(f) = init.flags.iter().find(|f| f.short == Some(letter)) else {
                    break;
                };
                let rest = &shorts[i + letter.len_utf8()..];
                let origin = format!("{} -{letter}", c.name);
                if !f.takes_value {
                    match rest.strip_prefix('=') {
                        Some(v) => {
                            out.set(f, v, origin);
                            break;
                        }
                        None => {
                            out.set(f, "true", origin);
                            continue;
                        }
                    }
                }
                let value = if rest.is_empty() {
                    words.next()
                } else {
                    Some(rest.strip_prefix('=').unwrap_or(rest))
                };
                if let Some(v) = value {
                    out.set(f, v, origin);
                }
                break;
            }
        }
        // Anything else is a positional argument (`istio-iptables`, the subcommand).
    }
    for (setting, value) in init.unset {
        let flag = init
            .flags
            .iter()
            .find(|f| f.setting == Some(*setting))
            .map_or(String::new(), |f| match f.short {
                Some(s) => format!("-{s}"),
                None => format!("--{}", f.long),
            });
        out.settings.entry(*setting).or_insert_with(|| Given {
            value: value.to_string(),
            origin: format!("{} (no {flag})", c.name),
            on_command_line: false,
        });
    }
    out
}

impl InitArgs {
    fn set(&mut self, flag: &InitFlag, value: &str, origin: String) {
        let Some(setting) = flag.setting else {
            return;
        };
        match self.settings.get_mut(&setting) {
            Some(given) if flag.appends && given.on_command_line => {
                given.value.push(',');
                given.value.push_str(value);
            }
            _ => {
                self.settings.insert(
                    setting,
                    Given {
                        value: value.to_string(),
                        origin,
                        on_command_line: true,
                    },
                );
            }
        }
    }
}

/// The literal value of the container's variable `name` (the last entry of that name,
/// as Kubernetes takes it); `None` when it is unset or comes from `valueFrom`.
pub(super) fn env_value<'c>(c: &'c Container, name: &str) -> Option<&'c str> {
    c.env
        .iter()
        .flatten()
        .rev()
        .find(|e| e.name == name)
        .and_then(|e| e.value.as_deref())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::mesh::{AnnotationRole::*, Mesh};

    fn read_as(mesh: Mesh, container: serde_json::Value) -> InitArgs {
        let c: Container = serde_json::from_value(container).unwrap();
        read_container(&c, mesh.spec().init.as_ref().unwrap())
    }

    fn value(a: &InitArgs, s: InitSetting) -> Option<(&str, &str)> {
        a.get(s).map(|g| (g.value.as_str(), g.origin.as_str()))
    }

    #[test]
    fn istio_iptables_short_long_inline_empty_and_clustered() {
        let a = read_as(
            Mesh::Istio,
            json!({"name": "istio-init", "args": [
                "istio-iptables", "-p", "15001", "-z15006", "-u=1337", "-m", "REDIRECT",
                "-i", "*", "-x", "", "--istio-inbound-ports=*", "-d", "15090,15021,15020",
                "--log_output_level=default:info", "-nq", "8443", "--run-validation",
                "--skip-rule-apply"
            ]}),
        );
        use InitSetting::*;
        assert_eq!(value(&a, OutboundPort), Some(("15001", "istio-init -p")));
        assert_eq!(value(&a, InboundPort), Some(("15006", "istio-init -z")));
        assert_eq!(value(&a, ProxyUid), Some(("1337", "istio-init -u")));
        assert_eq!(
            value(&a, Rule(ExcludeOutboundRanges)),
            Some(("", "istio-init -x"))
        );
        assert_eq!(
            value(&a, Rule(IncludeInboundPorts)),
            Some(("*", "istio-init --istio-inbound-ports"))
        );
        assert_eq!(
            value(&a, Rule(IncludeOutboundPorts)),
            Some(("8443", "istio-init -q")),
            "-n is a switch, so -nq takes the next word"
        );
        assert_eq!(value(&a, RedirectDns), None);
        assert_eq!(value(&a, Rule(ExcludeOutboundPorts)), None);
    }

    #[test]
    fn istio_iptables_environment_then_command_line_and_unset_defaults() {
        let a = read_as(
            Mesh::Istio,
            json!({"name": "istio-validation", "args": ["istio-iptables", "-o", "25"],
            "env": [
                {"name": "REDIRECT_DNS", "value": "false"},
                {"name": "ISTIO_META_DNS_CAPTURE", "value": "true"},
                {"name": "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE", "value": "9999"},
                {"name": "PROXY_UID", "valueFrom": {"fieldRef": {"fieldPath": "x"}}}
            ]}),
        );
        use InitSetting::*;
        assert_eq!(
            value(&a, RedirectDns),
            Some(("true", "istio-validation env ISTIO_META_DNS_CAPTURE")),
            "ISTIO_META_DNS_CAPTURE is applied after REDIRECT_DNS"
        );
        assert_eq!(
            value(&a, Rule(ExcludeOutboundPorts)),
            Some(("25", "istio-validation -o")),
            "the command line wins over the environment"
        );
        assert_eq!(value(&a, ProxyUid), None, "valueFrom is unknown here");
        // Without -i and -b istio-iptables captures nothing.
        assert_eq!(
            value(&a, Rule(IncludeOutboundRanges)),
            Some(("", "istio-validation (no -i)"))
        );
        assert_eq!(
            value(&a, Rule(IncludeInboundPorts)),
            Some(("", "istio-validation (no -b)"))
        );
        let dns = read_as(
            Mesh::Istio,
            json!({"name": "istio-init", "args": ["--redirect-dns", "-x", "10.0.0.0/8", "-x", "10.1.0.0/16"]}),
        );
        assert_eq!(
            value(&dns, RedirectDns),
            Some(("true", "istio-init --redirect-dns"))
        );
        assert_eq!(
            value(&dns, Rule(ExcludeOutboundRanges)),
            Some(("10.1.0.0/16", "istio-init -x")),
            "a repeated string flag: the last wins"
        );
    }

    #[test]
    fn linkerd_proxy_init_lists_add_up_and_values_are_never_flags() {
        let a = read_as(
            Mesh::Linkerd,
            json!({"name": "linkerd-init",
            "command": ["/usr/lib/linkerd/linkerd2-proxy-init"],
            "args": [
                "--firewall-bin-path", "iptables-nft", "--ipv6=false",
                "--incoming-proxy-port", "4143", "--outgoing-proxy-port", "4140",
                "--proxy-uid", "2103", "--proxy-gid", "-1",
                "--inbound-ports-to-ignore", "4190,4191",
                "--inbound-ports-to-ignore=9000-9010",
                "--subnets-to-ignore", "172.17.0.0/16", "-w",
                "--some-future-flag"
            ]}),
        );
        use InitSetting::*;
        assert_eq!(
            value(&a, InboundPort),
            Some(("4143", "linkerd-init --incoming-proxy-port"))
        );
        assert_eq!(value(&a, OutboundPort).unwrap().0, "4140");
        assert_eq!(value(&a, ProxyUid).unwrap().0, "2103");
        assert_eq!(
            value(&a, Rule(ExcludeInboundPorts)).unwrap().0,
            "4190,4191,9000-9010"
        );
        assert_eq!(
            value(&a, Rule(ExcludeInboundSources)).unwrap().0,
            "172.17.0.0/16"
        );
        assert_eq!(value(&a, Rule(ExcludeOutboundPorts)), None);
        assert_eq!(
            a.iter().count(),
            5,
            "nothing else: -1 was --proxy-gid's value"
        );
    }

    #[test]
    fn missing_values_and_stray_words_are_harmless() {
        let a = read_as(
            Mesh::Istio,
            json!({"name": "istio-init", "args": ["-", "x", "-?", "-u"]}),
        );
        assert_eq!(a.get(InitSetting::ProxyUid), None);
        let b = read_as(
            Mesh::Linkerd,
            json!({"name": "linkerd-init", "args": ["--", "--proxy-uid", "1"]}),
        );
        assert_eq!(b.iter().count(), 0, "nothing after --");
    }

    #[test]
    fn env_value_takes_the_last_entry() {
        let c: Container = serde_json::from_value(json!({"name": "c", "env": [
            {"name": "A", "value": "1"}, {"name": "A", "value": "2"}, {"name": "B"}
        ]}))
        .unwrap();
        assert_eq!(env_value(&c, "A"), Some("2"));
        assert_eq!(env_value(&c, "B"), None);
        assert_eq!(env_value(&c, "C"), None);
    }
}
