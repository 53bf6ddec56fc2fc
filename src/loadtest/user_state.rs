//! A user's state that discovery and the load test change and put back: presence or routing
//! status, how each is read, written, and sent back as found.

use serde_json::{json, Value};

/// The state endpoint: discover's `--endpoint`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StateEndpoint {
    /// PATCH /api/v2/users/{userId}/presences/purecloud
    Presence,
    /// PUT /api/v2/users/{userId}/routingstatus
    RoutingStatus,
}

/// What a user was found as, enough to send it back unchanged.
#[derive(Debug, Clone, PartialEq)]
pub enum Found {
    Presence {
        definition_id: String,
        message: Option<String>,
    },
    RoutingStatus {
        status: String,
    },
}

impl StateEndpoint {
    /// The endpoint as the contract's `endpoint` field spells it.
    pub fn describe(self) -> &'static str {
        match self {
            StateEndpoint::Presence => "PATCH /api/v2/users/{userId}/presences/purecloud",
            StateEndpoint::RoutingStatus => "PUT /api/v2/users/{userId}/routingstatus",
        }
    }

    pub fn method(self) -> http::Method {
        match self {
            StateEndpoint::Presence => http::Method::PATCH,
            StateEndpoint::RoutingStatus => http::Method::PUT,
        }
    }

    /// The user's path; GET reads it, the endpoint's method writes it.
    pub fn path(self, user: &str) -> String {
        match self {
            StateEndpoint::Presence => format!("/api/v2/users/{user}/presences/purecloud"),
            StateEndpoint::RoutingStatus => format!("/api/v2/users/{user}/routingstatus"),
        }
    }

    /// The config's names for it: route and budget.
    pub fn route_name(self) -> &'static str {
        match self {
            StateEndpoint::Presence => "presence",
            StateEndpoint::RoutingStatus => "routing-status",
        }
    }

    /// The proxy route's match for it.
    pub fn route_match(self) -> &'static str {
        match self {
            StateEndpoint::Presence => {
                "{ method: PATCH, path: \"/api/v2/users/{userId}/presences/{sourceId}\" }"
            }
            StateEndpoint::RoutingStatus => {
                "{ method: PUT, path: \"/api/v2/users/{userId}/routingstatus\" }"
            }
        }
    }

    /// What a GET of the user's path answered, as found; `None` when it says too little to be
    /// put back exactly (such a user is not touched).
    pub fn found(self, answer: &Value) -> Option<Found> {
        match self {
            StateEndpoint::Presence => Some(Found::Presence {
                definition_id: answer["presenceDefinition"]["id"].as_str()?.to_string(),
                message: answer["message"].as_str().map(str::to_string),
            }),
            StateEndpoint::RoutingStatus => Some(Found::RoutingStatus {
                status: answer["status"].as_str()?.to_string(),
            }),
        }
    }
}

impl Found {
    /// The body that sets the user to this state: sent during the experiment (so a user is never
    /// moved: nobody is put on queue by a measurement) and again to restore.
    pub fn body(&self, user: &str) -> Value {
        match self {
            Found::Presence {
                definition_id,
                message,
            } => {
                let mut body = json!({ "presenceDefinition": { "id": definition_id } });
                // The message is restored as found, an empty one included.
                body["message"] = Value::from(message.clone().unwrap_or_default());
                body
            }
            Found::RoutingStatus { status } => json!({ "userId": user, "status": status }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_found_presence_is_sent_back_with_its_definition_and_message() {
        let answer = json!({"presenceDefinition": {"id": "d1", "systemPresence": "Busy"}, "message": "lunch"});
        let found = StateEndpoint::Presence.found(&answer).unwrap();
        assert_eq!(
            found.body("u"),
            json!({"presenceDefinition": {"id": "d1"}, "message": "lunch"})
        );
        assert_eq!(
            StateEndpoint::Presence.found(&json!({"message": "x"})),
            None
        );
        let status = StateEndpoint::RoutingStatus
            .found(&json!({"userId": "u", "status": "IDLE"}))
            .unwrap();
        assert_eq!(status.body("u"), json!({"userId": "u", "status": "IDLE"}));
    }
}
