//! Which endpoint a request is for: its method and path as an [`ApiCall`], and its stats label.

use http::Method;

use crate::emulator::stats::RouteLabel;

/// Which endpoint a request is for, with its path parameters.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ApiCall<'a> {
    OauthToken,
    PresencePatch {
        user: &'a str,
        source: &'a str,
    },
    PresenceGet {
        user: &'a str,
        source: &'a str,
    },
    PresenceBulk,
    RoutingStatusPut {
        user: &'a str,
    },
    RoutingStatusGet {
        user: &'a str,
    },
    Definitions,
    Limits,
    LimitsNamespace {
        name: &'a str,
    },
    Users,
    /// `api`: under `/api/v2`, so authentication and limits still apply.
    NotFound {
        api: bool,
    },
}

impl<'a> ApiCall<'a> {
    pub(super) fn classify(method: &Method, path: &'a str) -> Self {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let api = matches!(segments.as_slice(), ["api", "v2", ..]);
        let m = method;
        match segments.as_slice() {
            ["oauth", "token"] if m == Method::POST => ApiCall::OauthToken,
            ["api", "v2", "users", "presences", "bulk"] if m == Method::PUT => {
                ApiCall::PresenceBulk
            }
            ["api", "v2", "users", user, "presences", source]
                if !user.is_empty() && !source.is_empty() =>
            {
                match *m {
                    Method::PATCH => ApiCall::PresencePatch { user, source },
                    Method::GET => ApiCall::PresenceGet { user, source },
                    _ => ApiCall::NotFound { api },
                }
            }
            ["api", "v2", "users", user, "routingstatus"] if !user.is_empty() => match *m {
                Method::PUT => ApiCall::RoutingStatusPut { user },
                Method::GET => ApiCall::RoutingStatusGet { user },
                _ => ApiCall::NotFound { api },
            },
            ["api", "v2", "presence", "definitions"] if m == Method::GET => ApiCall::Definitions,
            ["api", "v2", "organizations", "limits", "namespaces"] if m == Method::GET => {
                ApiCall::Limits
            }
            ["api", "v2", "organizations", "limits", "namespaces", name]
                if m == Method::GET && !name.is_empty() =>
            {
                ApiCall::LimitsNamespace { name }
            }
            ["api", "v2", "users"] if m == Method::GET => ApiCall::Users,
            _ => ApiCall::NotFound { api },
        }
    }

    pub(super) fn label(&self) -> RouteLabel {
        match self {
            ApiCall::OauthToken => RouteLabel::OauthToken,
            ApiCall::PresencePatch { .. } => RouteLabel::PresencePatch,
            ApiCall::PresenceGet { .. } => RouteLabel::PresenceGet,
            ApiCall::PresenceBulk => RouteLabel::PresenceBulk,
            ApiCall::RoutingStatusPut { .. } => RouteLabel::RoutingstatusPut,
            ApiCall::RoutingStatusGet { .. } => RouteLabel::RoutingstatusGet,
            ApiCall::Definitions => RouteLabel::Definitions,
            ApiCall::Limits | ApiCall::LimitsNamespace { .. } => RouteLabel::Limits,
            ApiCall::Users => RouteLabel::Users,
            ApiCall::NotFound { .. } => RouteLabel::NotFound,
        }
    }

    pub(super) fn is_api(&self) -> bool {
        !matches!(self, ApiCall::OauthToken | ApiCall::NotFound { api: false })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_their_endpoint_and_label() {
        let cases = [
            (Method::POST, "/oauth/token", RouteLabel::OauthToken),
            (Method::GET, "/oauth/token", RouteLabel::NotFound),
            (
                Method::PATCH,
                "/api/v2/users/u1/presences/purecloud",
                RouteLabel::PresencePatch,
            ),
            (
                Method::GET,
                "/api/v2/users/u1/presences/purecloud",
                RouteLabel::PresenceGet,
            ),
            (
                Method::DELETE,
                "/api/v2/users/u1/presences/purecloud",
                RouteLabel::NotFound,
            ),
            (
                Method::PUT,
                "/api/v2/users/presences/bulk",
                RouteLabel::PresenceBulk,
            ),
            (
                Method::PUT,
                "/api/v2/users/u1/routingstatus",
                RouteLabel::RoutingstatusPut,
            ),
            (
                Method::GET,
                "/api/v2/users/u1/routingstatus",
                RouteLabel::RoutingstatusGet,
            ),
            (
                Method::GET,
                "/api/v2/presence/definitions",
                RouteLabel::Definitions,
            ),
            (
                Method::GET,
                "/api/v2/organizations/limits/namespaces",
                RouteLabel::Limits,
            ),
            (
                Method::GET,
                "/api/v2/organizations/limits/namespaces/platform.api",
                RouteLabel::Limits,
            ),
            (Method::GET, "/api/v2/users", RouteLabel::Users),
            (
                Method::PUT,
                "/api/v2/wfm/schedules/agents/a1",
                RouteLabel::NotFound,
            ),
            (Method::GET, "/", RouteLabel::NotFound),
        ];
        for (method, path, label) in cases {
            assert_eq!(
                ApiCall::classify(&method, path).label(),
                label,
                "{method} {path}"
            );
        }
        assert_eq!(
            ApiCall::classify(&Method::PATCH, "/api/v2/users/u1/presences/purecloud"),
            ApiCall::PresencePatch {
                user: "u1",
                source: "purecloud"
            }
        );
        assert!(ApiCall::classify(&Method::GET, "/api/v2/nothing").is_api());
        assert!(!ApiCall::classify(&Method::GET, "/nothing").is_api());
    }
}
