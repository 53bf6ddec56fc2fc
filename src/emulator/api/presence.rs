//! Presence: PATCH and GET `/api/v2/users/{userId}/presences/{sourceId}`, the bulk PUT.
//!
//! `PUT /api/v2/users/presences/bulk` takes 1 to [`BULK_MAX`] entries and checks them all
//! before it stores any.

use std::time::SystemTime;

use serde_json::{json, Map, Value};

use super::json::{optional_bool, optional_str, rfc3339};
use super::ApiState;
use crate::emulator::catalog;

/// Genesys's batch limit for the bulk presence PUT.
pub(crate) const BULK_MAX: usize = 50;

impl ApiState {
    /// What the last PATCH or bulk PUT stored; a user never set is Offline since the start.
    pub(super) fn presence(&self, user: &str, source_id: &str) -> Value {
        let source = catalog::presence_source(source_id);
        let key = (user.to_string(), source.to_ascii_lowercase());
        if let Some(stored) = self.presences.lock().get(&key) {
            return stored.clone();
        }
        let started = SystemTime::now() - self.clock.since(self.started);
        presence_json(
            user,
            &source,
            definition_json(catalog::OFFLINE_ID, None),
            true,
            None,
            started,
        )
    }

    /// Applies one PATCH body (`presenceDefinition`, `primary`, `message`, all optional).
    pub(super) fn set_presence(
        &self,
        user: &str,
        source_id: &str,
        body: &Value,
    ) -> Result<Value, String> {
        let obj = body
            .as_object()
            .ok_or("The presence body must be a JSON object.")?;
        let definition = match obj.get("presenceDefinition") {
            None | Some(Value::Null) => None,
            Some(def) => Some(checked_definition(def)?),
        };
        let primary = optional_bool(obj, "primary")?;
        let message = optional_str(obj, "message")?;
        Ok(self.store_presence(user, source_id, definition, primary, message))
    }

    fn store_presence(
        &self,
        user: &str,
        source_id: &str,
        definition: Option<Value>,
        primary: Option<bool>,
        message: Option<String>,
    ) -> Value {
        let source = catalog::presence_source(source_id);
        let key = (user.to_string(), source.to_ascii_lowercase());
        let mut presences = self.presences.lock();
        let previous = presences.get(&key);
        // A PATCH changes only what it names, as the real endpoint does.
        let definition = definition.unwrap_or_else(|| {
            previous
                .map(|p| p["presenceDefinition"].clone())
                .unwrap_or_else(|| definition_json(catalog::OFFLINE_ID, None))
        });
        let primary = primary
            .or_else(|| previous.and_then(|p| p["primary"].as_bool()))
            .unwrap_or(true);
        let message =
            message.or_else(|| previous.and_then(|p| p["message"].as_str().map(str::to_string)));
        let presence = presence_json(
            user,
            &source,
            definition,
            primary,
            message,
            SystemTime::now(),
        );
        presences.insert(key, presence.clone());
        presence
    }

    /// Validates the whole batch before applying any of it, so a 400 changes nothing.
    pub(super) fn set_bulk(&self, body: &Value) -> Result<Value, String> {
        let entries = body
            .as_array()
            .ok_or("The bulk presence body must be a JSON array.")?;
        if entries.is_empty() || entries.len() > BULK_MAX {
            return Err(format!(
                "From 1 to {BULK_MAX} presences can be set in one request, got {}.",
                entries.len()
            ));
        }
        let mut updates = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            let obj = entry
                .as_object()
                .ok_or_else(|| format!("Entry {i} must be a JSON object."))?;
            let user = obj
                .get("id")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| format!("Entry {i} needs a user \"id\"."))?;
            let source = optional_str(obj, "sourceId")?.unwrap_or_else(|| "PURECLOUD".into());
            let definition = match obj.get("presenceDefinition") {
                None | Some(Value::Null) => None,
                Some(def) => Some(checked_definition(def).map_err(|e| format!("Entry {i}: {e}"))?),
            };
            let primary = optional_bool(obj, "primary")?;
            let message = optional_str(obj, "message")?;
            updates.push((user, source, definition, primary, message));
        }
        let presences: Vec<Value> = updates
            .into_iter()
            .map(|(user, source, definition, primary, message)| {
                let mut p = self.store_presence(user, &source, definition, primary, message);
                p["id"] = Value::from(user);
                p
            })
            .collect();
        Ok(Value::Array(presences))
    }
}

/// The definition as sent, completed with what Genesys adds for a known id.
fn checked_definition(def: &Value) -> Result<Value, String> {
    let id = def
        .get("id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or("\"presenceDefinition\" must be an object with a string \"id\".")?;
    Ok(definition_json(id, def.as_object()))
}

fn definition_json(id: &str, sent: Option<&Map<String, Value>>) -> Value {
    let mut def = sent.cloned().unwrap_or_default();
    def.insert("id".into(), Value::from(id));
    if let Some(name) = catalog::system_presence(id) {
        def.entry("systemPresence").or_insert(Value::from(name));
    }
    def.entry("selfUri")
        .or_insert_with(|| Value::from(format!("/api/v2/presence/definitions/{id}")));
    Value::Object(def)
}

fn presence_json(
    user: &str,
    source: &str,
    definition: Value,
    primary: bool,
    message: Option<String>,
    modified: SystemTime,
) -> Value {
    let mut presence = json!({
        "source": source,
        "primary": primary,
        "presenceDefinition": definition,
        "modifiedDate": rfc3339(modified),
        "selfUri": format!("/api/v2/users/{user}/presences/{}", source.to_ascii_lowercase()),
    });
    if let Some(message) = message {
        presence["message"] = Value::from(message);
    }
    presence
}
