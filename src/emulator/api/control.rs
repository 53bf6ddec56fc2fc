//! The emulator's own endpoints, `/_emulator/*` (stats, faults): never counted, delayed or faulted.

use http::{Method, StatusCode};

use super::answer::{not_found, ApiAnswer};
use super::{ApiRequest, ApiState, RequestBody};
use crate::emulator::catalog;
use crate::emulator::config::Fault;

impl ApiState {
    /// `/_emulator/*`: not Genesys, never counted, never delayed or faulted.
    pub(super) fn emulator_endpoint(&self, req: &ApiRequest, context_id: &str) -> ApiAnswer {
        let body = match &req.body {
            RequestBody::Complete(body) => body,
            RequestBody::TooLarge { .. } => {
                return ApiAnswer::error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    catalog::CODE_TOO_LARGE,
                    "The request body is over the limit.",
                    context_id,
                )
            }
            RequestBody::Unreadable => {
                return ApiAnswer::bad_request("The request body could not be read.", context_id)
            }
        };
        match (&req.method, req.path.as_str()) {
            (&Method::GET, "/_emulator/stats") => ApiAnswer::json(StatusCode::OK, &self.snapshot()),
            (&Method::POST, "/_emulator/stats/reset") => {
                self.reset_stats();
                ApiAnswer::no_content()
            }
            (&Method::POST, "/_emulator/faults") => match serde_json::from_slice::<Fault>(body) {
                Ok(fault) => {
                    tracing::info!(kind = fault.kind.name(), "emulator: fault added");
                    let answer = ApiAnswer::json(StatusCode::OK, &fault);
                    self.add_fault(fault);
                    answer
                }
                Err(e) => ApiAnswer::bad_request(&e.to_string(), context_id),
            },
            (&Method::DELETE, "/_emulator/faults") => {
                self.faults.clear();
                ApiAnswer::no_content()
            }
            _ => not_found(context_id),
        }
    }
}
