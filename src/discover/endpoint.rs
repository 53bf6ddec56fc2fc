//! The endpoints discovery can measure: how each is called, read back and put back as found.

use serde_json::{json, Value};

/// `--endpoint`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Endpoint {
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

impl Endpoint {
    /// The endpoint as the contract's `endpoint` field spells it.
    pub fn describe(self) -> &'static str {
        match self {
            Endpoint::Presence => "PATCH /api/v2/users/{userId}/presences/purecloud",
            Endpoint::RoutingStatus => "PUT /api/v2/users/{userId}/routingstatus",
        }
    }

    pub fn method(self) -> http::Method {
        match self {
            Endpoint::Presence => http::Method::PATCH,
            Endpoint::RoutingStatus => http::Method::PUT,
        }
    }

    /// The user's path; GET reads it, the endpoint's method writes it.
    pub fn path(self, user: &str) -> String {
        match self {
            Endpoint::Presence => format!("/api/v2/users/{user}/presences/purecloud"),
            Endpoint::RoutingStatus => format!("/api/v2/users/{user}/routingstatus"),
        }
    }

    /// The config's names for it: route and budget.
    pub fn route_name(self) -> &'static str {
        match self {
            Endpoint::Presence => "presence",
            Endpoint::RoutingStatus => "routing-status",
        }
    }

    /// The proxy route's match for it.
    pub fn route_match(self) -> &'static str {
        match self {
            Endpoint::Presence => {
                "{ method: PATCH, path: \"/api/v2/users/{userId}/presences/{sourceId}\" }"
            }
            Endpoint::RoutingStatus => {
                "{ method: PUT, path: \"/api/v2/users/{userId}/routingstatus\" }"
            }
        }
    }

    /// What a GET of the user's path answered, as found; `None` when it says too little to be
    /// put back exactly (such a user is not touched).
    pub fn found(self, answer: &Value) -> Option<Found> {
        match self {
            Endpoint::Presence => Some(Found::Presence {
                definition_id: answer["presenceDefinition"]["id"].as_str()?.to_string(),
                message: answer["message"].as_str().map(str::to_string),
            }),
            Endpoint::RoutingStatus => Some(Found::RoutingStatus {
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
        let found = Endpoint::Presence.found(&answer).unwrap();
        assert_eq!(
            found.body("u"),
            json!({"presenceDefinition": {"id": "d1"}, "message": "lunch"})
        );
        assert_eq!(Endpoint::Presence.found(&json!({"message": "x"})), None);
        let status = Endpoint::RoutingStatus
            .found(&json!({"userId": "u", "status": "IDLE"}))
            .unwrap();
        assert_eq!(status.body("u"), json!({"userId": "u", "status": "IDLE"}));
    }
}
