//! The config as written: serde structs, strings where a value needs its own parsing, so that a
//! bad rate or duration becomes one collected error instead of stopping the parse.
//!
//! Strict without `deny_unknown_fields`: that attribute stops at the first unknown key, whereas
//! `serde_ignored` hands over every key serde skipped, so all of them are reported at once.

use indexmap::IndexMap;
use serde::Deserialize;

use super::lines::{LineIndex, YamlPath};
use super::ConfigError;

/// Deserializes `text`. `Ok` carries the raw config and one error per unknown key (the
/// validation adds its own to them); `Err` every error, when the YAML or a type is wrong.
pub(super) fn parse(
    text: &str,
    lines: &LineIndex,
) -> Result<(RawConfig, Vec<ConfigError>), Vec<ConfigError>> {
    let mut errors = Vec::new();
    let mut ignored = Vec::new();
    let de = serde_yaml::Deserializer::from_str(text);
    let raw: Result<RawConfig, _> =
        serde_ignored::deserialize(de, |path| ignored.push(format_path(&path).to_string()));
    for path in ignored {
        let (parent, key) = match path.rsplit_once('.') {
            Some((p, k)) => (p.to_string(), k.to_string()),
            None => (String::new(), path.clone()),
        };
        errors.push(ConfigError {
            line: lines.key_line(&path),
            message: format!("unknown key \"{key}\""),
            path: parent,
        });
    }
    match raw {
        Ok(raw) => Ok((raw, errors)),
        Err(e) => {
            errors.push(yaml_error(&e));
            Err(errors)
        }
    }
}

/// A YAML or type error as one [`ConfigError`]. serde_yaml's message already starts with the path
/// ("routes[0].match: invalid type ...") and ends with " at line L column C": those " at line"
/// parts are dropped from the text, the line is reported as ours.
fn yaml_error(e: &serde_yaml::Error) -> ConfigError {
    let mut msg = e.to_string();
    while let Some(i) = msg.find(" at line ") {
        let rest = &msg[i + " at line ".len()..];
        let end = rest
            .find(|c: char| {
                !(c.is_ascii_digit() || c == ' ' || c.is_ascii_alphabetic() && "column".contains(c))
            })
            .unwrap_or(rest.len());
        msg = format!("{}{}", &msg[..i], &rest[end..]);
    }
    let (path, message) = match msg.split_once(": ") {
        Some((p, m)) if !p.contains(' ') => (p.to_string(), m.to_string()),
        _ => (String::new(), format!("invalid YAML: {msg}")),
    };
    ConfigError {
        path,
        line: e.location().map(|l| l.line()),
        message,
    }
}

fn format_path(path: &serde_ignored::Path) -> YamlPath {
    use serde_ignored::Path as P;
    match path {
        P::Root => YamlPath::root(),
        P::Seq { parent, index } => format_path(parent).index(*index),
        P::Map { parent, key } => format_path(parent).key(key),
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
            format_path(parent)
        }
    }
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(super) struct RawConfig {
    pub listen: String,
    #[serde(default)]
    pub admin_listen: Option<String>,
    #[serde(default)]
    pub admin_token_env: Option<String>,
    #[serde(default)]
    pub tls: Option<RawTls>,
    pub upstreams: IndexMap<String, RawUpstream>,
    #[serde(default)]
    pub budgets: IndexMap<String, RawBudget>,
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub queue: RawQueue,
    #[serde(default)]
    pub retry: RawRetry,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub workers: Option<usize>,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub shutdown: RawShutdown,
    #[serde(default)]
    pub cluster: Option<RawCluster>,
    #[serde(default)]
    pub reload: RawReload,
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
}

#[derive(Deserialize, Default)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(super) struct RawReload {
    pub watch_file: Option<bool>,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(super) struct RawTls {
    pub listen: String,
    pub cert: String,
    pub key: String,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(super) struct RawUpstream {
    pub url: String,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(super) struct RawBudget {
    pub rate: String,
    #[serde(default)]
    pub burst: Option<i64>,
    #[serde(default)]
    pub per: Option<String>,
    #[serde(default)]
    pub min_rate: Option<String>,
    #[serde(default)]
    pub max_keys: Option<i64>,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(super) struct RawRoute {
    pub name: String,
    #[serde(rename = "match")]
    pub matcher: RawMatch,
    #[serde(default)]
    pub strip_prefix: Option<String>,
    #[serde(default)]
    pub upstream: Option<String>,
    #[serde(default)]
    pub budgets: Vec<String>,
    #[serde(default)]
    pub max_wait: Option<String>,
    #[serde(default)]
    pub priority: Option<String>,
    #[serde(default)]
    pub coalesce: Option<RawCoalesce>,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(super) struct RawCoalesce {
    pub into: String,
    #[serde(default)]
    pub window: Option<String>,
    #[serde(default)]
    pub max_batch: Option<i64>,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(super) struct RawMatch {
    #[serde(default)]
    pub method: Option<String>,
    pub path: String,
}

#[derive(Deserialize, Default)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(super) struct RawQueue {
    pub max_wait: Option<String>,
    pub max_depth: Option<i64>,
    pub aging: Option<String>,
}

#[derive(Deserialize, Default)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(super) struct RawRetry {
    pub max_attempts: Option<i64>,
    pub max_elapsed: Option<String>,
    pub on_5xx: Option<String>,
    pub max_retry_after: Option<String>,
    pub backoff_base: Option<String>,
}

#[derive(Deserialize, Default)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(super) struct RawLimits {
    pub max_body_bytes: Option<i64>,
    pub connect_timeout: Option<String>,
    pub upstream_timeout: Option<String>,
    pub client_header_timeout: Option<String>,
    pub client_idle_timeout: Option<String>,
    pub max_connections: Option<i64>,
}

#[derive(Deserialize, Default)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(super) struct RawLog {
    pub format: Option<String>,
}

#[derive(Deserialize, Default)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(super) struct RawShutdown {
    pub drain_timeout: Option<String>,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(super) struct RawCluster {
    pub redis_url: String,
    #[serde(default)]
    pub key_prefix: Option<String>,
    #[serde(default)]
    pub fallback_replicas: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key the raw types accept, filled in so that each appears once: optional sections
    /// present, one entry in each map (named `<name>`) and list (`[]` in the path).
    const EVERY_SECTION: &str = r#"
listen: "0.0.0.0:8080"
tls: { listen: "0.0.0.0:8443", cert: c.pem, key: k.pem }
upstreams: { "<name>": { url: "https://api.mypurecloud.com" } }
budgets: { "<name>": { rate: "1/s" } }
routes: [{ name: r, match: { path: "/**" }, coalesce: { into: b } }]
cluster: { redis_url: "redis://127.0.0.1/0" }
"#;

    /// The dotted path of every leaf under `value` (`budgets.<name>.rate`, `routes[].match.path`).
    fn leaves(prefix: &str, value: &serde_yaml::Value, out: &mut Vec<String>) {
        match value {
            serde_yaml::Value::Mapping(m) => {
                for (k, v) in m {
                    let k = k.as_str().expect("string keys");
                    let path = if prefix.is_empty() {
                        k.to_string()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    leaves(&path, v, out);
                }
            }
            serde_yaml::Value::Sequence(s) if s.iter().any(|v| v.is_mapping()) => {
                for v in s {
                    leaves(&format!("{prefix}[]"), v, out);
                }
            }
            _ => out.push(prefix.to_string()),
        }
    }

    /// The keys come from the types (serializing a parsed config writes every field, `None`
    /// as null), not from a list kept by hand: a key added to a raw struct fails this test until
    /// docs/reference.md documents it.
    #[test]
    fn every_accepted_config_key_is_in_the_reference() {
        let (raw, unknown) = parse(EVERY_SECTION, &LineIndex::build(EVERY_SECTION))
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert!(unknown.is_empty(), "{unknown:?}");
        let mut keys = Vec::new();
        leaves("", &serde_yaml::to_value(&raw).unwrap(), &mut keys);
        assert!(keys.len() > 40, "too few keys found: {keys:?}");
        let reference =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/reference.md"))
                .unwrap();
        let missing: Vec<&String> = keys
            .iter()
            .filter(|k| !reference.contains(&format!("| `{k}` |")))
            .collect();
        assert!(
            missing.is_empty(),
            "config keys not documented in docs/reference.md (a table row \"| `key` |\"): {missing:?}"
        );
    }
}
