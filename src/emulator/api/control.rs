//! The emulator's own endpoints, `/_emulator/*` (stats, faults): never counted, delayed or faulted.

use http::{Method, StatusCode};

use super::answer::{not_found, Answer};
use super::{ApiRequest, RequestBody, State};
use crate::emulator::config::Fault;
use crate::emulator::genesys;

impl State {
    /// `/_emulator/*`: not Genesys, never counted, never delayed or faulted.
    pub(super) fn emulator_endpoint(&self, req: &ApiRequest, context_id: &str) -> Answer {
        let body = match &req.body {
            RequestBody::Complete(body) => body,
            RequestBody::TooLarge { .. } => {
                return Answer::error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    genesys::CODE_TOO_LARGE,
                    "The request body is over the limit.",
                    context_id,
                )
            }
            RequestBody::Unreadable => {
                return Answer::bad_request("The request body could not be read.", context_id)
            }
        };
        match (&req.method, req.path.as_str()) {
            (&Method::GET, "/_emulator/stats") => Answer::json(StatusCode::OK, &self.snapshot()),
            (&Method::POST, "/_emulator/stats/reset") => {
                self.reset_stats();
                Answer::no_content()
            }
            (&Method::POST, "/_emulator/faults") => match serde_json::from_slice::<Fault>(body) {
                Ok(fault) => {
                    tracing::info!(kind = fault.kind.name(), "emulator: fault added");
                    let answer = Answer::json(StatusCode::OK, &fault);
                    self.add_fault(fault);
                    answer
                }
                Err(e) => Answer::bad_request(&e.to_string(), context_id),
            },
            (&Method::DELETE, "/_emulator/faults") => {
                self.faults.clear();
                Answer::no_content()
            }
            _ => not_found(context_id),
        }
    }
}
