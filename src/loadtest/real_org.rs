//! A load test against a real org: tokens by client credentials, real users and presence
//! definitions, each user's state read before the run and put back after it.

use std::path::Path;
use std::time::Duration;

use http::{Method, StatusCode};

use super::org::{Org, OrgError, Secret, Token};
use super::spec::RealOrg;
use super::user_state::{Found, StateEndpoint};
use super::Target;

/// The system presences a shift-change test cycles through (never Offline: that logs nobody
/// out, but it is not a state an agent changes to at a shift start).
const CYCLED_PRESENCES: [&str; 4] = ["Available", "Busy", "Away", "Break"];

/// Why the real org could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum RealOrgError {
    #[error("usage: {0}")]
    Usage(String),
    #[error("{0}")]
    Org(#[from] OrgError),
    #[error("no users: {0}")]
    NoUsers(String),
}

/// Where the users come from.
pub enum Users<'a> {
    File(&'a Path),
    Api(usize),
}

/// The org, what the agents use, and the users' states as found.
pub struct Prepared {
    org: Org,
    pub real: RealOrg,
    endpoint: Option<StateEndpoint>,
    found: Vec<(String, Found)>,
}

/// Mints `tokens` tokens, finds the users and definitions, reads each user's state.
pub async fn prepare(
    target: &str,
    login: &str,
    client_id: &str,
    secret_env: &str,
    tokens: usize,
    users: Users<'_>,
    endpoint: Option<StateEndpoint>,
) -> Result<Prepared, RealOrgError> {
    let target = Target::parse(target).map_err(|e| RealOrgError::Usage(e.to_string()))?;
    let login = Target::parse(login).map_err(|e| RealOrgError::Usage(format!("--login: {e}")))?;
    let secret = match std::env::var(secret_env) {
        Ok(s) if !s.is_empty() => Secret::new(s),
        _ => {
            return Err(RealOrgError::Usage(format!(
                "--client-secret-env: the variable {secret_env} is unset or empty"
            )))
        }
    };
    let org = Org::new(target, login, client_id.to_string(), secret);
    let mut issued = Vec::with_capacity(tokens);
    for _ in 0..tokens.max(1) {
        issued.push(org.mint().await?);
    }
    let reader = issued[0].clone();
    let user_ids = match users {
        Users::File(path) => std::fs::read_to_string(path)
            .map_err(|e| RealOrgError::NoUsers(format!("cannot read {}: {e}", path.display())))?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_string)
            .collect(),
        Users::Api(n) => list_users(&org, &reader, n).await?,
    };
    if user_ids.is_empty() {
        return Err(RealOrgError::NoUsers("none listed".into()));
    }
    let mut definitions = Vec::new();
    if endpoint == Some(StateEndpoint::Presence) {
        let reply = org
            .call(
                &reader,
                Method::GET,
                "/api/v2/presence/definitions?pageSize=100",
                None,
            )
            .await?;
        for d in reply.body["entities"].as_array().into_iter().flatten() {
            let usable = d["deactivated"].as_bool() != Some(true)
                && d["systemPresence"]
                    .as_str()
                    .is_some_and(|p| CYCLED_PRESENCES.contains(&p));
            if let (true, Some(id)) = (usable, d["id"].as_str()) {
                definitions.push(id.to_string());
            }
        }
    }
    let mut found = Vec::new();
    if let Some(endpoint) = endpoint {
        for (i, user) in user_ids.iter().enumerate() {
            let token = &issued[i % issued.len()];
            let reply =
                call_patiently(&org, token, Method::GET, &endpoint.path(user), None).await?;
            match endpoint.found(&reply.body) {
                Some(state) if reply.status == StatusCode::OK => found.push((user.clone(), state)),
                _ => {
                    tracing::warn!(%user, status = reply.status.as_u16(), "cannot read this user's state: it will not be restored")
                }
            }
        }
    }
    Ok(Prepared {
        org,
        real: RealOrg {
            user_ids,
            presence_definition_ids: definitions,
            tokens: issued,
        },
        endpoint,
        found,
    })
}

impl Prepared {
    /// Puts every user back as found; returns (restored, of).
    pub async fn restore(&self) -> (usize, usize) {
        let Some(endpoint) = self.endpoint else {
            return (0, 0);
        };
        let mut restored = 0;
        for (i, (user, state)) in self.found.iter().enumerate() {
            let token = &self.real.tokens[i % self.real.tokens.len()];
            let body = state.body(user);
            match call_patiently(
                &self.org,
                token,
                endpoint.method(),
                &endpoint.path(user),
                Some(&body),
            )
            .await
            {
                Ok(reply) if reply.status.is_success() => restored += 1,
                Ok(reply) => {
                    tracing::warn!(%user, status = reply.status.as_u16(), "restore refused")
                }
                Err(e) => tracing::warn!(%user, error = %e, "restore failed"),
            }
        }
        (restored, self.found.len())
    }
}

/// A call that waits out a 429's `Retry-After` (at most five times).
async fn call_patiently(
    org: &Org,
    token: &Token,
    method: Method,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<super::org::Reply, OrgError> {
    let mut reply = org.call(token, method.clone(), path, body).await?;
    for _ in 0..5 {
        if reply.status != StatusCode::TOO_MANY_REQUESTS {
            break;
        }
        let wait = reply.retry_after.unwrap_or(3);
        tokio::time::sleep(Duration::from_secs(wait)).await;
        reply = org.call(token, method.clone(), path, body).await?;
    }
    Ok(reply)
}

async fn list_users(org: &Org, token: &Token, n: usize) -> Result<Vec<String>, RealOrgError> {
    let page_size = n.clamp(1, 100);
    let mut ids = Vec::new();
    for page in 1.. {
        let path = format!("/api/v2/users?pageSize={page_size}&pageNumber={page}");
        let reply = call_patiently(org, token, Method::GET, &path, None).await?;
        if reply.status != StatusCode::OK {
            return Err(RealOrgError::NoUsers(format!(
                "GET /api/v2/users answered {}",
                reply.status.as_u16()
            )));
        }
        let entities = reply.body["entities"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        ids.extend(
            entities
                .iter()
                .filter_map(|u| u["id"].as_str().map(str::to_string)),
        );
        let last = reply.body["pageCount"].as_u64().is_none_or(|c| page >= c);
        if entities.is_empty() || ids.len() >= n || last {
            break;
        }
    }
    ids.truncate(n);
    Ok(ids)
}
