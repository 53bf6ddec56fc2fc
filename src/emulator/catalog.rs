//! The Genesys data the emulator serves: error codes and messages, presence definitions, the
//! limits listing, routing statuses. The error body's shape is [`crate::genesys`]'s.

use bytes::Bytes;
use serde_json::{json, Value};

/// The Genesys error body (shared with the proxy's own answers), as bytes for a response.
pub(crate) fn error_body(status: u16, code: &str, message: &str, context_id: &str) -> Bytes {
    Bytes::from(crate::genesys::genesys_error_body(
        status, code, message, context_id,
    ))
}

/// The message of the 429 Genesys has sent since November 2021.
pub(crate) fn rate_limit_message(retry_after: u64) -> String {
    format!("Rate limit exceeded the maximum. Retry the request in [{retry_after}] seconds")
}

pub(crate) const CODE_TOO_MANY_REQUESTS: &str = "too.many.requests.retry.after";
pub(crate) const CODE_BAD_CREDENTIALS: &str = "bad.credentials";
pub(crate) const CODE_BAD_REQUEST: &str = "bad.request";
pub(crate) const CODE_NOT_FOUND: &str = "not.found";
pub(crate) const CODE_TOO_LARGE: &str = "request.entity.too.large";

pub(crate) const MSG_BAD_CREDENTIALS: &str = "Invalid login credentials.";
pub(crate) const MSG_NOT_FOUND: &str = "The requested resource was not found.";

/// The system presence definitions, with the ids seen in real org listings, so clients that
/// hard-code the well-known ids (Available, Busy, ...) work against the emulator too.
pub(crate) const PRESENCE_DEFINITIONS: [(&str, &str); 9] = [
    ("6a3af858-942f-489d-9700-5f9bcdcdae9b", "Available"),
    ("5e5c5c66-ea97-4e7f-ac41-6424784829f2", "Away"),
    ("31fe3bac-dea6-44b7-bed7-47f91660a1a0", "Busy"),
    ("227b37e2-f1d0-4dd0-8f50-badd7cf6d158", "Break"),
    ("3fd96123-badb-4f69-bc03-1b1ccc6d8014", "Meal"),
    ("bbdff279-7ae1-48ea-bade-7831d7234c64", "Meeting"),
    ("d2390a99-8546-bad9-8f0a-219548e8aeb0", "Training"),
    ("e08eaf1b-ee47-4fa9-a231-1200e284798f", "On Queue"),
    ("ccf3c10a-aa2c-4845-8e8d-f59fa48c58e5", "Offline"),
];

pub(crate) const OFFLINE_ID: &str = "ccf3c10a-aa2c-4845-8e8d-f59fa48c58e5";

pub(crate) fn system_presence(id: &str) -> Option<&'static str> {
    PRESENCE_DEFINITIONS
        .iter()
        .find(|(known, _)| *known == id)
        .map(|(_, name)| *name)
}

/// `GET /api/v2/presence/definitions`: one page with every system definition.
pub(crate) fn definitions_listing() -> Value {
    let entities: Vec<Value> = PRESENCE_DEFINITIONS
        .iter()
        .map(|(id, name)| {
            json!({
                "id": id,
                "type": "System",
                "languageLabels": { "en_US": name },
                "systemPresence": name,
                "deactivated": false,
                "selfUri": format!("/api/v2/presence/definitions/{id}"),
            })
        })
        .collect();
    json!({
        "entities": entities,
        "pageSize": 25,
        "pageNumber": 1,
        "total": PRESENCE_DEFINITIONS.len(),
        "pageCount": 1,
    })
}

/// `GET /api/v2/organizations/limits/namespaces`: a page of namespaces, the API one carrying
/// the values this emulator enforces.
/// A token limit that is off (0) is not listed.
pub(crate) fn limits_namespaces(token_rate_per_minute: u32, max_body_bytes: usize) -> Value {
    let mut api_limits = Vec::new();
    if token_rate_per_minute > 0 {
        api_limits.push(json!({ "key": "token.rate.per.minute", "value": token_rate_per_minute }));
        api_limits.push(json!({ "key": "client.credentials.token.rate.per.minute", "value": token_rate_per_minute }));
    }
    api_limits.push(json!({ "key": "org.user.rate.per.minute", "value": 3000 }));
    api_limits.push(json!({ "key": "request.bytes.max", "value": max_body_bytes }));
    json!({
        "entities": [
            {
                "name": API_NAMESPACE,
                "limits": api_limits,
            },
            { "name": "authorization" },
            { "name": "presence" },
            { "name": "routing" },
        ],
        "pageSize": 25,
        "pageNumber": 1,
        "total": 4,
        "pageCount": 1,
    })
}

/// The namespace of the API-wide limits.
pub(crate) const API_NAMESPACE: &str = "platform.api";

/// `GET /api/v2/organizations/limits/namespaces/{name}`: that namespace's limits as a page of
/// `{key, namespace, value}`, taken from the listing; `None` for a namespace it does not name.
pub(crate) fn namespace_limits(name: &str, listing: &[u8]) -> Option<Value> {
    let listing: Value = serde_json::from_slice(listing).ok()?;
    let namespace = listing["entities"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)?;
    let entities: Vec<Value> = namespace["limits"]
        .as_array()
        .map(|limits| {
            limits
                .iter()
                .map(|l| json!({ "key": l["key"], "namespace": name, "value": l["value"] }))
                .collect()
        })
        .unwrap_or_default();
    let total = entities.len();
    Some(json!({
        "entities": entities,
        "pageSize": 25,
        "pageNumber": 1,
        "total": total,
        "pageCount": 1,
    }))
}

/// The routing statuses Genesys knows.
pub(crate) const ROUTING_STATUSES: [&str; 5] = [
    "OFF_QUEUE",
    "IDLE",
    "INTERACTING",
    "NOT_RESPONDING",
    "COMMUNICATING",
];

/// Genesys spells the built-in presence source `PURECLOUD`; paths use `purecloud`.
pub(crate) fn presence_source(source_id: &str) -> String {
    if source_id.eq_ignore_ascii_case("purecloud") {
        "PURECLOUD".to_string()
    } else {
        source_id.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_body_has_genesys_field_order_and_empty_lists() {
        let body = error_body(429, CODE_TOO_MANY_REQUESTS, &rate_limit_message(42), "c-1");
        assert_eq!(
            &body[..],
            br#"{"message":"Rate limit exceeded the maximum. Retry the request in [42] seconds","code":"too.many.requests.retry.after","status":429,"contextId":"c-1","details":[],"errors":[]}"#
        );
    }

    #[test]
    fn definitions_cover_the_system_presences_with_unique_ids() {
        let listing = definitions_listing();
        let names: Vec<&str> = listing["entities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["systemPresence"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "Available",
                "Away",
                "Busy",
                "Break",
                "Meal",
                "Meeting",
                "Training",
                "On Queue",
                "Offline"
            ]
        );
        let mut ids: Vec<&str> = PRESENCE_DEFINITIONS.iter().map(|(id, _)| *id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), PRESENCE_DEFINITIONS.len());
        assert_eq!(system_presence(OFFLINE_ID), Some("Offline"));
    }
}
