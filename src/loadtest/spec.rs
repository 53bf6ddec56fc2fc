//! What a load test sends: the endpoint, the agents and their tokens, and the requests built from them.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{HeaderName, AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use http::{HeaderMap, HeaderValue, Method};

use crate::digest::sha256_hex;

use super::client::{OutgoingRequest, Target, TargetError};

/// Presence definition ids the presence PATCH cycles through, so that consecutive requests of an
/// agent change its presence as a shift change would. They are placeholders shaped like the ids of
/// `GET /api/v2/presence/definitions`; against a real org, use `--endpoint custom` with its own ids.
pub const PRESENCE_DEFINITION_IDS: [&str; 4] = [
    "10ad7e57-def1-4000-8000-000000000001",
    "10ad7e57-def1-4000-8000-000000000002",
    "10ad7e57-def1-4000-8000-000000000003",
    "10ad7e57-def1-4000-8000-000000000004",
];

/// The Genesys call every agent makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `PATCH /api/v2/users/{userId}/presences/purecloud`
    PresencePatch,
    /// `PUT /api/v2/users/{userId}/routingstatus`
    RoutingStatusPut,
    /// Any call; `path` and `body` may hold `{userId}`, `{agent}` (the agent's index) and `{n}`
    /// (the request's index within its agent, from 0).
    Custom {
        method: Method,
        path: String,
        body: Option<String>,
    },
}

impl Endpoint {
    /// A short name for tables and reports.
    pub fn label(&self) -> String {
        match self {
            Endpoint::PresencePatch => {
                "presence (PATCH /api/v2/users/{userId}/presences/purecloud)".into()
            }
            Endpoint::RoutingStatusPut => {
                "routing-status (PUT /api/v2/users/{userId}/routingstatus)".into()
            }
            Endpoint::Custom { method, path, .. } => format!("custom ({method} {path})"),
        }
    }
}

/// A whole load test. `LoadSpec::default()` is the CLI's defaults against `http://127.0.0.1:8080`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadSpec {
    /// `http://host:port[/base]`
    pub target: String,
    /// Concurrent agents, one connection each.
    pub agents: usize,
    /// Requests per agent.
    pub loops: usize,
    /// Agent `i` starts at `ramp * i / agents`; zero starts them all at once.
    pub ramp: Duration,
    /// Distinct bearer tokens: agent `i` sends `Bearer loadtest-token-<i % tokens>`.
    pub tokens: usize,
    pub endpoint: Endpoint,
    /// Per attempt, connecting included.
    pub timeout: Duration,
    /// Pause between two requests of one agent.
    pub think_time: Duration,
    /// Emulates an official SDK with retry on: on a 429, wait `Retry-After` seconds (3 when it is
    /// absent or not an integer, give up when it is over 180) and retry, at most this many times.
    pub sdk_retry: u32,
    /// Sent with every request, after (and so replacing) the generator's own headers of that name.
    pub extra_headers: Vec<(String, String)>,
    /// A real org's users, definitions and tokens, in place of the invented ones.
    pub real_org: RealOrg,
}

/// What a load test against a real org uses instead of invented values; each list, when not
/// empty, is shared round-robin by the agents (agent `i` takes entry `i % len`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RealOrg {
    /// User ids (`--users FILE`, `--users-from-api N`).
    pub user_ids: Vec<String>,
    /// Presence definition ids from `GET /api/v2/presence/definitions`, cycled through.
    pub presence_definition_ids: Vec<String>,
    /// Tokens issued by the org's login host (client credentials). Never shown by `Debug`.
    pub tokens: Vec<super::org::Token>,
}

impl Default for LoadSpec {
    fn default() -> Self {
        Self {
            target: "http://127.0.0.1:8080".into(),
            agents: 100,
            loops: 10,
            ramp: Duration::ZERO,
            tokens: 1,
            endpoint: Endpoint::PresencePatch,
            timeout: Duration::from_secs(30),
            think_time: Duration::ZERO,
            sdk_retry: 0,
            extra_headers: Vec::new(),
            real_org: RealOrg::default(),
        }
    }
}

/// A load spec that cannot run; each message names the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("agents must be at least 1")]
    NoAgents,
    #[error("loops must be at least 1")]
    NoLoops,
    #[error("tokens must be at least 1")]
    NoTokens,
    #[error("timeout must be longer than zero")]
    ZeroTimeout,
    #[error("header {name:?} cannot be sent: {reason}")]
    Header { name: String, reason: String },
    #[error("path {path:?} is not a valid request path: {reason}")]
    Path { path: String, reason: String },
}

/// The stable user id of agent `i`: UUID-shaped (version 4 layout), the same in every run so that a
/// target keeping per-user state sees the same users again. `10ad7e57` reads "loadtest".
pub fn user_id(agent: usize) -> String {
    format!(
        "10ad7e57-0000-4000-8000-{:012x}",
        agent as u64 & 0xffff_ffff_ffff
    )
}

/// The `Authorization` value of agent `i` when `tokens` distinct tokens are in use.
pub fn bearer_token(agent: usize, tokens: usize) -> String {
    format!("Bearer loadtest-token-{}", agent % tokens.max(1))
}

/// A validated spec: the target parsed and the fixed headers built once, not per request.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub target: Target,
    pub spec: LoadSpec,
    extra_headers: HeaderMap,
}

impl LoadSpec {
    pub fn total_requests(&self) -> usize {
        self.agents.saturating_mul(self.loops)
    }

    /// Checks everything that would otherwise fail on every request.
    pub fn validate(&self) -> Result<(), SpecError> {
        self.plan().map(|_| ())
    }

    pub(crate) fn plan(&self) -> Result<Plan, SpecError> {
        let target = Target::parse(&self.target)?;
        if self.agents == 0 {
            return Err(SpecError::NoAgents);
        }
        if self.loops == 0 {
            return Err(SpecError::NoLoops);
        }
        if self.tokens == 0 {
            return Err(SpecError::NoTokens);
        }
        if self.timeout.is_zero() {
            return Err(SpecError::ZeroTimeout);
        }
        let mut extra_headers = HeaderMap::new();
        for (name, value) in &self.extra_headers {
            let header_error = |reason: String| SpecError::Header {
                name: name.clone(),
                reason,
            };
            let parsed_name = HeaderName::from_bytes(name.trim().as_bytes())
                .map_err(|e| header_error(e.to_string()))?;
            let parsed_value =
                HeaderValue::from_str(value.trim()).map_err(|e| header_error(e.to_string()))?;
            extra_headers.append(parsed_name, parsed_value);
        }
        let plan = Plan {
            target,
            spec: self.clone(),
            extra_headers,
        };
        // A custom path is a template: try it once with real values so that a bad one fails here,
        // not on each of the thousands of requests.
        if let Endpoint::Custom { path, .. } = &self.endpoint {
            if !path.starts_with('/') {
                return Err(SpecError::Path {
                    path: path.clone(),
                    reason: "it must start with '/'".into(),
                });
            }
            let probe = plan.request(0, 0, SystemTime::UNIX_EPOCH).request;
            if let Err(e) = probe.path_and_query.parse::<http::uri::PathAndQuery>() {
                return Err(SpecError::Path {
                    path: path.clone(),
                    reason: e.to_string(),
                });
            }
        }
        Ok(plan)
    }
}

/// A request as built for one agent and loop, with the digest of the body it carries.
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    pub request: OutgoingRequest,
    pub body_sha256: Option<String>,
}

impl Plan {
    /// The `n`-th request of `agent`; `now` is the routing status' `startTime`.
    pub fn request(&self, agent: usize, n: usize, now: SystemTime) -> Prepared {
        let real = &self.spec.real_org;
        let user = if real.user_ids.is_empty() {
            user_id(agent)
        } else {
            real.user_ids[agent % real.user_ids.len()].clone()
        };
        let (method, path, body) = match &self.spec.endpoint {
            Endpoint::PresencePatch => {
                let definition = if real.presence_definition_ids.is_empty() {
                    PRESENCE_DEFINITION_IDS[(agent + n) % PRESENCE_DEFINITION_IDS.len()]
                } else {
                    let ids = &real.presence_definition_ids;
                    ids[(agent + n) % ids.len()].as_str()
                };
                let body = serde_json::json!({
                    "presenceDefinition": { "id": definition },
                    "primary": true,
                    "message": "shift change",
                });
                (
                    Method::PATCH,
                    format!("/api/v2/users/{user}/presences/purecloud"),
                    Some(body.to_string()),
                )
            }
            Endpoint::RoutingStatusPut => {
                let body = serde_json::json!({
                    "userId": user,
                    "status": "IDLE",
                    "startTime": humantime::format_rfc3339_millis(now).to_string(),
                });
                (
                    Method::PUT,
                    format!("/api/v2/users/{user}/routingstatus"),
                    Some(body.to_string()),
                )
            }
            Endpoint::Custom { method, path, body } => {
                let fill = |template: &str| {
                    template
                        .replace("{userId}", &user)
                        .replace("{agent}", &agent.to_string())
                        .replace("{n}", &n.to_string())
                };
                (method.clone(), fill(path), body.as_deref().map(fill))
            }
        };

        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let authorization = if real.tokens.is_empty() {
            HeaderValue::from_str(&bearer_token(agent, self.spec.tokens))
                .expect("the token is plain ASCII")
        } else {
            real.tokens[agent % real.tokens.len()].bearer()
        };
        headers.insert(AUTHORIZATION, authorization);
        headers.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("shiftgate-loadtest/", env!("CARGO_PKG_VERSION"))),
        );
        let mut replaced = std::collections::HashSet::new();
        for (name, value) in &self.extra_headers {
            // The first extra header of a name replaces ours; later ones of the same name add to it.
            if replaced.insert(name.clone()) {
                headers.insert(name.clone(), value.clone());
            } else {
                headers.append(name.clone(), value.clone());
            }
        }

        let body_sha256 = body.as_ref().map(|b| sha256_hex(b.as_bytes()));
        Prepared {
            request: OutgoingRequest {
                method,
                path_and_query: format!("{}{}", self.target.base_path(), path),
                headers,
                body: body.map(Bytes::from).unwrap_or_default(),
            },
            body_sha256,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(endpoint: Endpoint) -> Plan {
        LoadSpec {
            target: "http://127.0.0.1:8080/base".into(),
            tokens: 3,
            endpoint,
            ..LoadSpec::default()
        }
        .plan()
        .expect("a valid spec")
    }

    fn body_json(prepared: &Prepared) -> serde_json::Value {
        serde_json::from_slice(&prepared.request.body).expect("the body is JSON")
    }

    #[test]
    fn user_ids_are_uuid_shaped_stable_and_distinct_per_agent() {
        let first = user_id(7);
        assert_eq!(
            first,
            user_id(7),
            "the same agent gets the same id every time"
        );
        assert_ne!(first, user_id(8));
        let parsed = uuid::Uuid::parse_str(&first).expect("UUID-shaped");
        assert_eq!(parsed.get_version_num(), 4);
    }

    #[test]
    fn agents_share_tokens_round_robin() {
        let tokens: Vec<String> = (0..4).map(|agent| bearer_token(agent, 3)).collect();
        assert_eq!(
            tokens,
            [
                "Bearer loadtest-token-0",
                "Bearer loadtest-token-1",
                "Bearer loadtest-token-2",
                "Bearer loadtest-token-0"
            ]
        );
    }

    #[test]
    fn a_presence_patch_targets_the_agents_user_with_a_genesys_shaped_body() {
        let prepared = plan(Endpoint::PresencePatch).request(4, 1, SystemTime::now());
        let request = &prepared.request;
        assert_eq!(request.method, Method::PATCH);
        assert_eq!(
            request.path_and_query,
            format!("/base/api/v2/users/{}/presences/purecloud", user_id(4))
        );
        assert_eq!(request.headers[CONTENT_TYPE], "application/json");
        assert_eq!(request.headers[AUTHORIZATION], "Bearer loadtest-token-1");
        let body = body_json(&prepared);
        assert_eq!(body["primary"], true);
        assert_eq!(body["message"], "shift change");
        let definition = body["presenceDefinition"]["id"].as_str().unwrap();
        assert!(
            PRESENCE_DEFINITION_IDS.contains(&definition),
            "{definition}"
        );
        assert_eq!(prepared.body_sha256, Some(sha256_hex(&request.body)));
    }

    #[test]
    fn consecutive_presence_patches_of_an_agent_change_the_presence() {
        let plan = plan(Endpoint::PresencePatch);
        let first = body_json(&plan.request(0, 0, SystemTime::now()));
        let second = body_json(&plan.request(0, 1, SystemTime::now()));
        assert_ne!(first["presenceDefinition"], second["presenceDefinition"]);
    }

    #[test]
    fn a_routing_status_put_carries_user_idle_and_an_rfc3339_start_time() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let prepared = plan(Endpoint::RoutingStatusPut).request(2, 0, at);
        assert_eq!(prepared.request.method, Method::PUT);
        assert_eq!(
            prepared.request.path_and_query,
            format!("/base/api/v2/users/{}/routingstatus", user_id(2))
        );
        let body = body_json(&prepared);
        assert_eq!(body["userId"], user_id(2));
        assert_eq!(body["status"], "IDLE");
        let start = body["startTime"].as_str().unwrap();
        assert_eq!(start, "2023-11-14T22:13:20.123Z");
        assert_eq!(humantime::parse_rfc3339(start).unwrap(), at);
    }

    #[test]
    fn a_custom_endpoint_fills_every_placeholder_in_path_and_body() {
        let prepared = plan(Endpoint::Custom {
            method: Method::POST,
            path: "/api/v2/things/{userId}?agent={agent}&n={n}".into(),
            body: Some(r#"{"who":"{userId}","agent":{agent},"n":{n}}"#.into()),
        })
        .request(5, 9, SystemTime::now());
        let user = user_id(5);
        assert_eq!(prepared.request.method, Method::POST);
        assert_eq!(
            prepared.request.path_and_query,
            format!("/base/api/v2/things/{user}?agent=5&n=9")
        );
        assert_eq!(
            body_json(&prepared),
            serde_json::json!({"who": user, "agent": 5, "n": 9})
        );
    }

    #[test]
    fn a_custom_endpoint_without_a_body_sends_none_and_has_no_digest() {
        let prepared = plan(Endpoint::Custom {
            method: Method::GET,
            path: "/api/v2/users/me".into(),
            body: None,
        })
        .request(0, 0, SystemTime::now());
        assert!(prepared.request.body.is_empty());
        assert_eq!(prepared.body_sha256, None);
        assert_eq!(prepared.request.headers[CONTENT_TYPE], "application/json");
    }

    #[test]
    fn extra_headers_replace_the_generators_own_and_repeat_when_named_twice() {
        let plan = LoadSpec {
            extra_headers: vec![
                ("Authorization".into(), "Bearer real".into()),
                ("X-Tag".into(), "a".into()),
                ("x-tag".into(), "b".into()),
            ],
            ..LoadSpec::default()
        }
        .plan()
        .unwrap();
        let headers = plan.request(0, 0, SystemTime::now()).request.headers;
        let auth: Vec<_> = headers.get_all(AUTHORIZATION).iter().collect();
        assert_eq!(auth, ["Bearer real"]);
        let tags: Vec<_> = headers.get_all("x-tag").iter().collect();
        assert_eq!(tags, ["a", "b"]);
    }

    #[test]
    fn invalid_specs_are_refused_with_the_offending_value() {
        let cases = [
            (
                LoadSpec {
                    agents: 0,
                    ..LoadSpec::default()
                },
                SpecError::NoAgents,
            ),
            (
                LoadSpec {
                    loops: 0,
                    ..LoadSpec::default()
                },
                SpecError::NoLoops,
            ),
            (
                LoadSpec {
                    tokens: 0,
                    ..LoadSpec::default()
                },
                SpecError::NoTokens,
            ),
            (
                LoadSpec {
                    timeout: Duration::ZERO,
                    ..LoadSpec::default()
                },
                SpecError::ZeroTimeout,
            ),
            (
                LoadSpec {
                    target: "ftp://127.0.0.1:8443".into(),
                    ..LoadSpec::default()
                },
                SpecError::Target(TargetError::Invalid {
                    target: "ftp://127.0.0.1:8443".into(),
                    reason: "scheme \"ftp\" is not http or https".into(),
                }),
            ),
        ];
        for (spec, expected) in cases {
            assert_eq!(spec.validate(), Err(expected));
        }

        let bad_header = LoadSpec {
            extra_headers: vec![("Bad Name".into(), "x".into())],
            ..LoadSpec::default()
        };
        match bad_header.validate() {
            Err(SpecError::Header { name, .. }) => assert_eq!(name, "Bad Name"),
            other => panic!("expected a header error, got {other:?}"),
        }

        let bad_path = LoadSpec {
            endpoint: Endpoint::Custom {
                method: Method::GET,
                path: "api/v2/users".into(),
                body: None,
            },
            ..LoadSpec::default()
        };
        match bad_path.validate() {
            Err(SpecError::Path { path, reason }) => {
                assert_eq!(path, "api/v2/users");
                assert!(reason.contains("'/'"), "{reason}");
            }
            other => panic!("expected a path error, got {other:?}"),
        }
    }
}
