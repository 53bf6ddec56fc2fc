//! Which endpoint a request is for: its method and path as an [`Endpoint`], and its stats label.

use http::Method;

use crate::emulator::stats::RouteLabel;

/// Which endpoint a request is for, with its path parameters.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Endpoint<'a> {
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
    /// `api`: under `/api/v2`, so authentication and limits still apply.
    NotFound {
        api: bool,
    },
}

impl<'a> Endpoint<'a> {
    pub(super) fn classify(method: &Method, path: &'a str) -> Self {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let api = matches!(segments.as_slice(), ["api", "v2", ..]);
        let m = method;
        match segments.as_slice() {
            ["oauth", "token"] if m == Method::POST => Endpoint::OauthToken,
            ["api", "v2", "users", "presences", "bulk"] if m == Method::PUT => {
                Endpoint::PresenceBulk
            }
            ["api", "v2", "users", user, "presences", source]
                if !user.is_empty() && !source.is_empty() =>
            {
                match *m {
                    Method::PATCH => Endpoint::PresencePatch { user, source },
                    Method::GET => Endpoint::PresenceGet { user, source },
                    _ => Endpoint::NotFound { api },
                }
            }
            ["api", "v2", "users", user, "routingstatus"] if !user.is_empty() => match *m {
                Method::PUT => Endpoint::RoutingStatusPut { user },
                Method::GET => Endpoint::RoutingStatusGet { user },
                _ => Endpoint::NotFound { api },
            },
            ["api", "v2", "presence", "definitions"] if m == Method::GET => Endpoint::Definitions,
            ["api", "v2", "organizations", "limits", "namespaces"] if m == Method::GET => {
                Endpoint::Limits
            }
            _ => Endpoint::NotFound { api },
        }
    }

    pub(super) fn label(&self) -> RouteLabel {
        match self {
            Endpoint::OauthToken => RouteLabel::OauthToken,
            Endpoint::PresencePatch { .. } => RouteLabel::PresencePatch,
            Endpoint::PresenceGet { .. } => RouteLabel::PresenceGet,
            Endpoint::PresenceBulk => RouteLabel::PresenceBulk,
            Endpoint::RoutingStatusPut { .. } => RouteLabel::RoutingstatusPut,
            Endpoint::RoutingStatusGet { .. } => RouteLabel::RoutingstatusGet,
            Endpoint::Definitions => RouteLabel::Definitions,
            Endpoint::Limits => RouteLabel::Limits,
            Endpoint::NotFound { .. } => RouteLabel::NotFound,
        }
    }

    pub(super) fn is_api(&self) -> bool {
        !matches!(
            self,
            Endpoint::OauthToken | Endpoint::NotFound { api: false }
        )
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
                Method::PUT,
                "/api/v2/wfm/schedules/agents/a1",
                RouteLabel::NotFound,
            ),
            (Method::GET, "/", RouteLabel::NotFound),
        ];
        for (method, path, label) in cases {
            assert_eq!(
                Endpoint::classify(&method, path).label(),
                label,
                "{method} {path}"
            );
        }
        assert_eq!(
            Endpoint::classify(&Method::PATCH, "/api/v2/users/u1/presences/purecloud"),
            Endpoint::PresencePatch {
                user: "u1",
                source: "purecloud"
            }
        );
        assert!(Endpoint::classify(&Method::GET, "/api/v2/nothing").is_api());
        assert!(!Endpoint::classify(&Method::GET, "/nothing").is_api());
    }
}
