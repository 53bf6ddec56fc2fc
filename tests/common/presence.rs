//! Genesys's presence API as the tests use it: the paths, the bodies, the definition id, and an
//! emulator that limits presence updates.

/// The presence update's path template (`PATCH`), as configs and the emulator name it.
pub const PATH_TEMPLATE: &str = "/api/v2/users/{userId}/presences/{sourceId}";

/// The bulk presence update (`PUT`).
pub const BULK_PATH: &str = "/api/v2/users/presences/bulk";

/// The org's presence definitions (`GET`): on no presence budget, for warming up.
pub const DEFINITIONS_PATH: &str = "/api/v2/presence/definitions";

/// "Available" among the emulator's fixed presence definitions.
pub const DEFINITION_ID: &str = "6a3af858-942f-489d-9700-5f9bcdcdae9b";

/// A presence update to "Available" ([`DEFINITION_ID`]), as an agent's client sends it.
pub const BODY: &str =
    r#"{"presenceDefinition":{"id":"6a3af858-942f-489d-9700-5f9bcdcdae9b"},"primary":true}"#;

/// The smallest presence update the proxy passes on.
pub const PRIMARY_ONLY: &str = r#"{"primary":true}"#;

/// The presence update path of `user` (source `purecloud`).
pub fn path(user: &str) -> String {
    format!("/api/v2/users/{user}/presences/purecloud")
}

/// [`BODY`] with a status message.
pub fn body_with_message(message: &str) -> String {
    format!(
        r#"{{"presenceDefinition":{{"id":"{DEFINITION_ID}"}},"primary":true,"message":"{message}"}}"#
    )
}

/// A bulk update body: `users` entries `user-0`, `user-1` ..., each "Available" with the message
/// `message(i)`.
pub fn bulk_body(users: usize, message: impl Fn(usize) -> String) -> String {
    let entries: Vec<String> = (0..users)
        .map(|i| {
            format!(
                r#"{{"id":"user-{i}","sourceId":"purecloud","primary":true,"presenceDefinition":{{"id":"{DEFINITION_ID}"}},"message":"{}"}}"#,
                message(i)
            )
        })
        .collect();
    format!("[{}]", entries.join(","))
}

/// Emulator config: presence updates limited to `limit` (e.g. "100/s") for the whole org, in
/// windows that open at the first request; answers take `min`..`max`; no per-token limit.
pub fn limited_emulator(limit: &str, min: &str, max: &str) -> String {
    format!(
        "token_rate_per_minute: 0\nlatency: {{ min: \"{min}\", max: \"{max}\" }}\nroute_limits:\n  - {{ name: presence, method: PATCH, path: \"{PATH_TEMPLATE}\", limit: \"{limit}\" }}\n"
    )
}
