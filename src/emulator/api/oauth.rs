//! `POST /oauth/token` (client credentials only) and which bearer tokens the API accepts.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use serde_json::json;

use super::answer::ApiAnswer;
use super::{ApiRequest, ApiState};
use crate::emulator::auth;
use crate::emulator::catalog;

/// Genesys's `expires_in` for client-credentials tokens.
pub(crate) const TOKEN_LIFETIME_SECS: u64 = 86_399;

impl ApiState {
    pub(super) fn token_accepted(&self, token: &str, now: Instant) -> bool {
        if !self.config.auth.require_issued_tokens {
            return true;
        }
        self.tokens
            .lock()
            .get(token)
            .is_some_and(|&expires| now < expires)
    }

    pub(super) fn oauth_token(
        &self,
        req: &ApiRequest,
        body: &Bytes,
        now: Instant,
        context_id: &str,
    ) -> ApiAnswer {
        let known = |(id, secret): &(String, String)| {
            self.config.clients.is_empty()
                || self
                    .config
                    .clients
                    .iter()
                    .any(|c| &c.id == id && &c.secret == secret)
        };
        if !auth::basic(&req.headers).is_some_and(|c| known(&c)) {
            return ApiAnswer::error(
                StatusCode::UNAUTHORIZED,
                catalog::CODE_BAD_CREDENTIALS,
                catalog::MSG_BAD_CREDENTIALS,
                context_id,
            );
        }
        match auth::form_value(body, "grant_type").as_deref() {
            Some("client_credentials") => {}
            other => {
                return ApiAnswer::bad_request(
                    &format!(
                        "Unsupported grant_type {:?}: only client_credentials is supported.",
                        other.unwrap_or_default()
                    ),
                    context_id,
                )
            }
        }
        let token = auth::new_token();
        self.tokens.lock().insert(
            token.clone(),
            now + Duration::from_secs(TOKEN_LIFETIME_SECS),
        );
        ApiAnswer::json(
            StatusCode::OK,
            &json!({
                "access_token": token,
                "token_type": "bearer",
                "expires_in": TOKEN_LIFETIME_SECS,
            }),
        )
    }
}
