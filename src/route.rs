//! Route matching: method plus path template, first match wins; and the path rewrite
//! (`strip_prefix`, upstream base path) applied before forwarding.

use std::fmt;

/// Scheduling class of a route's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Priority {
    High,
    Normal,
    Low,
}

impl Priority {
    /// Levels below `High`: the head start a request of this class gives away.
    pub fn level(self) -> u32 {
        match self {
            Priority::High => 0,
            Priority::Normal => 1,
            Priority::Low => 2,
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param,
    Rest,
}

/// A path template: literal segments, `{name}` for exactly one segment, `**` (last) for the rest.
///
/// ```
/// use shiftgate::route::PathTemplate;
/// let t = PathTemplate::parse("/api/v2/users/{userId}/presences/{sourceId}").unwrap();
/// assert!(t.matches("/api/v2/users/42/presences/purecloud"));
/// assert!(!t.matches("/api/v2/users/42/presences"));
/// let all = PathTemplate::parse("/login/**").unwrap();
/// assert!(all.matches("/login") && all.matches("/login/oauth/token"));
/// assert!(!all.matches("/loginx"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PathTemplate {
    text: String,
    segments: Vec<Segment>,
}

impl TryFrom<String> for PathTemplate {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        PathTemplate::parse(&s)
    }
}

impl From<PathTemplate> for String {
    fn from(t: PathTemplate) -> String {
        t.text
    }
}

impl PathTemplate {
    pub fn parse(text: &str) -> Result<PathTemplate, String> {
        if !text.starts_with('/') {
            return Err(format!("invalid path \"{text}\": must start with /"));
        }
        let parts: Vec<&str> = text[1..].split('/').collect();
        let mut segments = Vec::new();
        let mut names = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            if *part == "**" {
                if !last {
                    return Err(format!(
                        "invalid path \"{text}\": ** is only allowed as the last segment"
                    ));
                }
                segments.push(Segment::Rest);
            } else if let Some(name) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                if name.is_empty() || !name.chars().all(|c| c.is_alphanumeric() || c == '_') {
                    return Err(format!(
                        "invalid path \"{text}\": bad parameter name \"{{{name}}}\""
                    ));
                }
                if names.contains(&name) {
                    return Err(format!(
                        "invalid path \"{text}\": parameter {{{name}}} appears twice"
                    ));
                }
                names.push(name);
                segments.push(Segment::Param);
            } else if part.contains(['{', '}', '*']) {
                return Err(format!(
                    "invalid path \"{text}\": segment \"{part}\" mixes a pattern with text"
                ));
            } else if part.is_empty() && !last {
                return Err(format!("invalid path \"{text}\": empty segment"));
            } else {
                segments.push(Segment::Literal(part.to_string()));
            }
        }
        // "/" alone is the root path: one empty literal segment.
        Ok(PathTemplate {
            text: text.to_string(),
            segments,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `path` matches (a query string is ignored). Segments compare byte for byte,
    /// percent-encoding untouched, so an encoded `/` can never open another segment.
    pub fn matches(&self, path: &str) -> bool {
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        let Some(rest) = path.strip_prefix('/') else {
            return false;
        };
        let mut parts = rest.split('/');
        for seg in &self.segments {
            match seg {
                Segment::Rest => return true,
                Segment::Param => match parts.next() {
                    Some(p) if !p.is_empty() => {}
                    _ => return false,
                },
                Segment::Literal(l) => match parts.next() {
                    Some(p) if p == l => {}
                    // "/login/**" also matches "/login" itself
                    None if l.is_empty() => {}
                    _ => return false,
                },
            }
        }
        parts.next().is_none()
    }
}

impl fmt::Display for PathTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// What a route matches on: a method (any, when `None`) and a path template.
pub trait Matches {
    fn method(&self) -> Option<&http::Method>;
    fn path(&self) -> &PathTemplate;
}

/// Index of the first route (in config order) that matches.
pub fn find_route<R: Matches>(routes: &[R], method: &http::Method, path: &str) -> Option<usize> {
    routes
        .iter()
        .position(|r| r.method().is_none_or(|m| m == method) && r.path().matches(path))
}

/// Request headers that belong to one connection, never forwarded.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

/// Headers that frame the body: never removed on a `Connection` header's say-so, or the body
/// would be forwarded without its length.
const FRAMING: &[&str] = &["content-length", "transfer-encoding", "host"];

/// The request headers not to forward: the hop-by-hop ones, and those named in `Connection`
/// (its `values`), lower-case; never the body's framing.
///
/// ```
/// let h = shiftgate::route::hop_by_hop_headers(["close, X-Trace, Content-Length"]);
/// assert!(h.contains(&"x-trace".to_string()) && h.contains(&"keep-alive".to_string()));
/// assert!(!h.contains(&"content-length".to_string()));
/// ```
pub fn hop_by_hop_headers<'a>(connection: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let named = connection
        .into_iter()
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .filter(|s| !s.is_empty() && !FRAMING.contains(&s.as_str()));
    HOP_BY_HOP
        .iter()
        .map(|h| h.to_string())
        .chain(named)
        .collect()
}

/// The path and query sent upstream: `strip_prefix` removed from the path, the upstream's base
/// path put in front. `path_and_query` is the client's origin-form target.
pub fn upstream_path(path_and_query: &str, strip_prefix: Option<&str>, base_path: &str) -> String {
    let (path, query) = match path_and_query.find('?') {
        Some(i) => path_and_query.split_at(i),
        None => (path_and_query, ""),
    };
    let mut path = path;
    if let Some(prefix) = strip_prefix {
        if let Some(rest) = path.strip_prefix(prefix) {
            if rest.is_empty() || rest.starts_with('/') {
                path = rest;
            }
        }
    }
    let path = if path.is_empty() { "/" } else { path };
    format!("{base_path}{path}{query}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_match_segments_exactly() {
        let t = PathTemplate::parse("/api/v2/users/{userId}/routingstatus").unwrap();
        assert!(t.matches("/api/v2/users/abc/routingstatus"));
        assert!(!t.matches("/api/v2/users//routingstatus"));
        assert!(!t.matches("/api/v2/users/abc/routingstatus/x"));
        assert!(!t.matches("/api/v2/users/a/b/routingstatus"));
        let root = PathTemplate::parse("/**").unwrap();
        assert!(root.matches("/") && root.matches("/anything/at/all"));
        let exact = PathTemplate::parse("/").unwrap();
        assert!(exact.matches("/") && !exact.matches("/x"));
        // An encoded slash stays inside its segment.
        assert!(t.matches("/api/v2/users/a%2Fb/routingstatus"));
    }

    #[test]
    fn templates_read_from_yaml_and_ignore_the_query() {
        let t: PathTemplate = serde_yaml::from_str("\"/api/v2/**\"").unwrap();
        assert!(t.matches("/api/v2/users?page=2"));
        assert!(serde_yaml::from_str::<PathTemplate>("\"api\"").is_err());
    }

    #[test]
    fn bad_templates_are_refused_with_the_reason() {
        assert!(PathTemplate::parse("api/x")
            .unwrap_err()
            .contains("must start with /"));
        assert!(PathTemplate::parse("/a/**/b")
            .unwrap_err()
            .contains("last segment"));
        assert!(PathTemplate::parse("/a/{}")
            .unwrap_err()
            .contains("bad parameter"));
        assert!(PathTemplate::parse("/a/{x}/{x}")
            .unwrap_err()
            .contains("twice"));
        assert!(PathTemplate::parse("/a/x{y}")
            .unwrap_err()
            .contains("mixes"));
        assert!(PathTemplate::parse("/a//b")
            .unwrap_err()
            .contains("empty segment"));
    }

    #[test]
    fn upstream_path_strips_the_prefix_on_a_segment_boundary_only() {
        assert_eq!(
            upstream_path("/login/oauth/token", Some("/login"), ""),
            "/oauth/token"
        );
        assert_eq!(upstream_path("/login", Some("/login"), ""), "/");
        assert_eq!(upstream_path("/loginx/a", Some("/login"), ""), "/loginx/a");
        assert_eq!(
            upstream_path("/api/v2/x?a=1&b=2", None, "/base"),
            "/base/api/v2/x?a=1&b=2"
        );
    }
}
