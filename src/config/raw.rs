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
}

#[derive(Deserialize, Default)]
pub(super) struct RawReload {
    pub watch_file: Option<bool>,
}

#[derive(Deserialize)]
pub(super) struct RawTls {
    pub listen: String,
    pub cert: String,
    pub key: String,
}

#[derive(Deserialize)]
pub(super) struct RawUpstream {
    pub url: String,
}

#[derive(Deserialize)]
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
pub(super) struct RawCoalesce {
    pub into: String,
    #[serde(default)]
    pub window: Option<String>,
    #[serde(default)]
    pub max_batch: Option<i64>,
}

#[derive(Deserialize)]
pub(super) struct RawMatch {
    #[serde(default)]
    pub method: Option<String>,
    pub path: String,
}

#[derive(Deserialize, Default)]
pub(super) struct RawQueue {
    pub max_wait: Option<String>,
    pub max_depth: Option<i64>,
    pub aging: Option<String>,
}

#[derive(Deserialize, Default)]
pub(super) struct RawRetry {
    pub max_attempts: Option<i64>,
    pub max_elapsed: Option<String>,
    pub on_5xx: Option<String>,
    pub max_retry_after: Option<String>,
    pub backoff_base: Option<String>,
}

#[derive(Deserialize, Default)]
pub(super) struct RawLimits {
    pub max_body_bytes: Option<i64>,
    pub connect_timeout: Option<String>,
    pub upstream_timeout: Option<String>,
    pub client_header_timeout: Option<String>,
    pub client_idle_timeout: Option<String>,
    pub max_connections: Option<i64>,
}

#[derive(Deserialize, Default)]
pub(super) struct RawLog {
    pub format: Option<String>,
}

#[derive(Deserialize, Default)]
pub(super) struct RawShutdown {
    pub drain_timeout: Option<String>,
}

#[derive(Deserialize)]
pub(super) struct RawCluster {
    pub redis_url: String,
    #[serde(default)]
    pub key_prefix: Option<String>,
    #[serde(default)]
    pub fallback_replicas: Option<i64>,
}
