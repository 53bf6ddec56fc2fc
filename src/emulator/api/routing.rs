//! Routing status: `PUT` and `GET /api/v2/users/{userId}/routingstatus`.

use std::time::SystemTime;

use serde_json::{json, Value};

use super::json::{optional_str, rfc3339};
use super::ApiState;
use crate::emulator::catalog;

impl ApiState {
    pub(super) fn set_routing_status(&self, user: &str, body: &Value) -> Result<Value, String> {
        let obj = body
            .as_object()
            .ok_or("The routing status body must be a JSON object.")?;
        let status = obj
            .get("status")
            .and_then(Value::as_str)
            .filter(|s| catalog::ROUTING_STATUSES.contains(s))
            .ok_or_else(|| {
                format!(
                    "\"status\" must be one of {}.",
                    catalog::ROUTING_STATUSES.join(", ")
                )
            })?;
        let start_time =
            optional_str(obj, "startTime")?.unwrap_or_else(|| rfc3339(SystemTime::now()));
        let value = json!({ "userId": user, "status": status, "startTime": start_time });
        self.routing.lock().insert(user.to_string(), value.clone());
        Ok(value)
    }

    /// What the last PUT stored; a user never set reads as `OFF_QUEUE`.
    pub(super) fn routing_status(&self, user: &str) -> Value {
        let stored = self.routing.lock().get(user).cloned();
        stored.unwrap_or_else(|| json!({ "userId": user, "status": "OFF_QUEUE" }))
    }
}
