//! Route matching: the request path normalised (one spelling per resource, never above the
//! root), then method plus path template, first match wins; and the path rewrite
//! (`strip_prefix`, upstream base path) applied before forwarding.

use std::borrow::Cow;
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

/// Why a request path cannot be normalised; the proxy answers `400 shiftgate.bad.request`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadPath {
    #[error("it does not start with /")]
    NotAbsolute,
    #[error("its .. segments climb above the root")]
    AboveRoot,
    #[error("{0:?} is not % followed by two hex digits")]
    BadEscape(String),
}

/// The one spelling of a request path that routes are matched on and that is forwarded, so that
/// `//api/v2/users/u/presences/purecloud` cannot skip the presence budget. Path only: the caller
/// keeps the query string as it came.
///
/// - Empty segments collapse: `//a` and `/a/` are `/a` (a trailing `/` is an empty segment too;
///   no Genesys API path ends in one, and keeping it would leave `.../purecloud/` off its route).
/// - `%XX` of an unreserved character (`A-Z a-z 0-9 - . _ ~`, hex in either case) is decoded;
///   every other escape (`%2F`, `%20`, `%25`...) stays as written, so an encoded `/` never opens
///   a segment.
/// - Then `.` and `..` resolve. Decoding comes first, so `%2e%2e` is `..` too: a server behind
///   the proxy that decodes it cannot be walked to a path other than the one matched.
/// - `..` above the root, a `%` without two hex digits after it (servers disagree about what
///   that is; IIS reads `%u002e` as `.`) and a path not starting with `/` (`*`, an empty
///   authority-form path) are refused.
///
/// An already normal path is returned as it is, without allocating.
///
/// ```
/// use shiftgate::route::{normalize_path, BadPath};
/// assert_eq!(normalize_path("//api/v2/./users/%75/x/../presences/purecloud/").unwrap(),
///            "/api/v2/users/u/presences/purecloud");
/// assert_eq!(normalize_path("/a%2Fb/%7e%7E").unwrap(), "/a%2Fb/~~");
/// assert_eq!(normalize_path("/api/%2e%2e/%2E%2E/x"), Err(BadPath::AboveRoot));
/// assert_eq!(normalize_path("/a/%zz"), Err(BadPath::BadEscape("%zz".into())));
/// assert_eq!(normalize_path("/.."), Err(BadPath::AboveRoot));
/// assert_eq!(normalize_path("/a/..").unwrap(), "/");
/// ```
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, BadPath> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err(BadPath::NotAbsolute);
    };
    if is_normal(rest.as_bytes()) {
        return Ok(Cow::Borrowed(path));
    }
    let mut out = String::with_capacity(path.len());
    // Where each segment kept so far starts in `out` (at its `/`): `..` truncates to the last.
    let mut starts = Vec::new();
    for raw in rest.split('/') {
        match &*decode_unreserved(raw)? {
            "" | "." => {}
            ".." => out.truncate(starts.pop().ok_or(BadPath::AboveRoot)?),
            segment => {
                starts.push(out.len());
                out.push('/');
                out.push_str(segment);
            }
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

/// True when a path (after its leading `/`) is already as [`normalize_path`] writes it: no
/// escape, and no empty, `.` or `..` segment. One pass over the bytes: nearly every request's
/// path is, and this runs for each.
fn is_normal(rest: &[u8]) -> bool {
    if rest.is_empty() {
        return true;
    }
    let mut segment_start = 0;
    for (i, &b) in rest.iter().enumerate() {
        match b {
            b'%' => return false,
            b'/' => {
                if matches!(&rest[segment_start..i], b"" | b"." | b"..") {
                    return false;
                }
                segment_start = i + 1;
            }
            _ => {}
        }
    }
    !matches!(&rest[segment_start..], b"" | b"." | b"..")
}

/// One segment with `%XX` of unreserved characters decoded and every other escape kept.
fn decode_unreserved(segment: &str) -> Result<Cow<'_, str>, BadPath> {
    if !segment.contains('%') {
        return Ok(Cow::Borrowed(segment));
    }
    let bad = |at: &str| BadPath::BadEscape(at.chars().take(3).collect());
    let mut out = String::with_capacity(segment.len());
    let mut rest = segment;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let escape = rest.get(i..i + 3).ok_or_else(|| bad(&rest[i..]))?;
        let b = escape.as_bytes();
        let (Some(hi), Some(lo)) = (hex_digit(b[1]), hex_digit(b[2])) else {
            return Err(bad(escape));
        };
        let c = char::from(hi << 4 | lo);
        if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~') {
            out.push(c);
        } else {
            out.push_str(escape);
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Ok(Cow::Owned(out))
}

/// The value of one hex digit, either case. (`u8::from_str_radix` would also take a `+`.)
fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
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
pub const HOP_BY_HOP: &[&str] = &[
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

/// The request headers that `Connection` (its `values`) names besides [`HOP_BY_HOP`]'s, which are
/// not forwarded either; never the body's framing. Nothing is allocated when it names none (an
/// SDK's `Connection: keep-alive`).
///
/// ```
/// let h = shiftgate::route::connection_named_headers(["close, X-Trace, Content-Length, keep-alive"]);
/// assert_eq!(h, vec!["x-trace".to_string()]);
/// assert!(shiftgate::route::connection_named_headers(["Keep-Alive"]).is_empty());
/// ```
pub fn connection_named_headers<'a>(connection: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let known = |s: &str| {
        s.eq_ignore_ascii_case("close")
            || HOP_BY_HOP
                .iter()
                .chain(FRAMING)
                .any(|h| s.eq_ignore_ascii_case(h))
    };
    connection
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty() && !known(s))
        .map(str::to_ascii_lowercase)
        .collect()
}

/// The path and query sent upstream: `strip_prefix` removed from the path, the upstream's base
/// path put in front. `path_and_query` is the client's origin-form target.
pub fn upstream_path<'a>(
    path_and_query: &'a str,
    strip_prefix: Option<&str>,
    base_path: &str,
) -> Cow<'a, str> {
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
    if base_path.is_empty() && path.len() + query.len() == path_and_query.len() {
        return Cow::Borrowed(path_and_query);
    }
    Cow::Owned(format!("{base_path}{path}{query}"))
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
    fn paths_are_normalised_before_matching() {
        let ok = |p: &str| normalize_path(p).unwrap().into_owned();
        // The spellings that used to skip the presence route.
        for p in [
            "//api/v2/users/u/presences/purecloud",
            "/api//v2/users/u/presences/purecloud/",
            "/api/v2/./users/u/presences/purecloud",
            "/api/v2/x/../users/u/presences/purecloud",
            "/api/v2/users/u/presences/%70ure%63loud",
            "/api/v2/users/%2e/u/presences/purecloud/%2E",
        ] {
            assert_eq!(ok(p), "/api/v2/users/u/presences/purecloud", "{p}");
        }
        // Decoding keeps the case of the character (only the hex digits' case is free).
        assert_eq!(ok("/%70ure%43loud"), "/pureCloud");
        assert_eq!(ok("/"), "/");
        assert_eq!(ok("//"), "/");
        assert_eq!(ok("/."), "/");
        assert_eq!(ok("/a/b/.."), "/a");
        assert_eq!(ok("/a/%2e%2E/b"), "/b");
        assert_eq!(ok("/a/.%2e/b"), "/b");
        // Only unreserved characters are decoded; other escapes stay as written.
        assert_eq!(ok("/%41%7a%30%2D%2e%5F%7E"), "/Az0-._~");
        assert_eq!(ok("/a%2Fb/c%2fd/%20/%25/%3F"), "/a%2Fb/c%2fd/%20/%25/%3F");
        assert_eq!(ok("/%252e%252e"), "/%252e%252e");
        // Segments that only look like dots stay.
        assert_eq!(ok("/.../..a/%2e%2e%2e"), "/.../..a/...");
        assert_eq!(ok("/caf\u{e9}/%C3%A9"), "/caf\u{e9}/%C3%A9");
    }

    #[test]
    fn paths_that_cannot_be_normalised_are_refused() {
        assert_eq!(normalize_path("/api/../../x"), Err(BadPath::AboveRoot));
        assert_eq!(normalize_path("/%2e%2e/etc"), Err(BadPath::AboveRoot));
        assert_eq!(normalize_path("/a/b/../../.."), Err(BadPath::AboveRoot));
        assert_eq!(normalize_path("*"), Err(BadPath::NotAbsolute));
        assert_eq!(normalize_path(""), Err(BadPath::NotAbsolute));
        assert_eq!(normalize_path("api/v2"), Err(BadPath::NotAbsolute));
        for (p, escape) in [
            ("/a%", "%"),
            ("/a%4", "%4"),
            ("/a%4g", "%4g"),
            ("/a%+1", "%+1"),
            ("/%u002e%u002e/x", "%u0"),
            ("/%\u{e9}", "%\u{e9}"),
            ("/%a\u{e9}", "%a\u{e9}"),
        ] {
            assert_eq!(
                normalize_path(p),
                Err(BadPath::BadEscape(escape.into())),
                "{p}"
            );
        }
        assert_eq!(
            BadPath::BadEscape("%zz".into()).to_string(),
            "\"%zz\" is not % followed by two hex digits"
        );
    }

    #[test]
    fn a_normal_path_is_borrowed_not_copied() {
        for p in ["/", "/api/v2/users/u/presences/purecloud", "/a.b/..c/~"] {
            assert!(matches!(normalize_path(p), Ok(Cow::Borrowed(q)) if q == p));
        }
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

    mod normalising {
        //! Properties of `normalize_path`. 256 cases each (proptest's default, which, unlike
        //! `ProptestConfig::with_cases`, `PROPTEST_CASES` overrides). A long run:
        //! `PROPTEST_CASES=100000 cargo test --lib route::tests::normalising`.

        use super::*;
        use proptest::prelude::*;

        /// The shipped config.yaml's routes.
        struct R(Option<http::Method>, PathTemplate);
        impl Matches for R {
            fn method(&self) -> Option<&http::Method> {
                self.0.as_ref()
            }
            fn path(&self) -> &PathTemplate {
                &self.1
            }
        }
        fn shipped_routes() -> Vec<R> {
            [
                (None, "/login/**"),
                (None, "/oauth/**"),
                (
                    Some(http::Method::PATCH),
                    "/api/v2/users/{userId}/presences/{sourceId}",
                ),
                (Some(http::Method::PUT), "/api/v2/users/presences/bulk"),
                (
                    Some(http::Method::PUT),
                    "/api/v2/users/{userId}/routingstatus",
                ),
                (None, "/**"),
            ]
            .into_iter()
            .map(|(m, p)| R(m, PathTemplate::parse(p).unwrap()))
            .collect()
        }

        /// One character of a normal segment, or an escape that normalising keeps.
        fn atom() -> impl Strategy<Value = String> {
            prop_oneof![
                8 => "[A-Za-z0-9._~-]",
                1 => prop::sample::select(vec!["%2F", "%2f", "%20", "%25", "%3F", "%C3%A9"])
                    .prop_map(String::from),
            ]
        }

        fn segment() -> impl Strategy<Value = String> {
            prop::collection::vec(atom(), 1..6)
                .prop_map(|a| a.concat())
                .prop_filter("a dot segment is not normal", |s| s != "." && s != "..")
        }

        /// Paths the routes care about (the API prefix, users, presences) and others.
        fn normal_path() -> impl Strategy<Value = String> {
            let word = prop::sample::select(vec![
                "api",
                "v2",
                "users",
                "u",
                "presences",
                "purecloud",
                "bulk",
                "routingstatus",
                "login",
                "oauth",
                "token",
            ])
            .prop_map(String::from);
            prop::collection::vec(prop_oneof![3 => word, 1 => segment()], 0..8)
                .prop_map(|segs| format!("/{}", segs.join("/")))
        }

        /// Another spelling of the normal path `p`: empty and `.` segments, detours through
        /// `..`, unreserved characters percent-encoded in either case, a trailing `/`; the
        /// choices are read from `noise`.
        fn respell(p: &str, noise: &[u8]) -> String {
            let mut noise = noise.iter().copied().cycle();
            let mut next = move || noise.next().unwrap_or(0);
            let mut out = String::new();
            for seg in p.split('/').skip(1).filter(|s| !s.is_empty()) {
                match next() % 6 {
                    0 => out.push('/'),
                    1 => out.push_str("/."),
                    2 => out.push_str("/%2E"),
                    3 => out.push_str("/x/.."),
                    4 => out.push_str("/y%2e/%2e%2E"),
                    _ => {}
                }
                out.push('/');
                let mut rest = seg;
                while let Some(c) = rest.chars().next() {
                    if c == '%' {
                        // An escape the normal path keeps: copy it as it is.
                        out.push_str(&rest[..3]);
                        rest = &rest[3..];
                        continue;
                    }
                    match next() % 3 {
                        0 => out.push_str(&format!("%{:02X}", c as u32)),
                        1 => out.push_str(&format!("%{:02x}", c as u32)),
                        _ => out.push(c),
                    }
                    rest = &rest[c.len_utf8()..];
                }
            }
            match next() % 3 {
                0 => out.push('/'),
                1 => out.push_str("/."),
                _ => {}
            }
            if out.is_empty() {
                out.push('/');
            }
            out
        }

        /// A reference model over a small alphabet of segments: a stack of the decoded names.
        const TOKENS: &[(&str, Option<&str>)] = &[
            ("", None),
            (".", None),
            ("%2e", None),
            ("..", Some("..")),
            ("%2E%2e", Some("..")),
            (".%2e", Some("..")),
            ("a", Some("a")),
            ("%41", Some("A")),
            ("%2F", Some("%2F")),
            ("~", Some("~")),
        ];

        proptest! {
            #[test]
            fn normalising_is_idempotent_and_leaves_no_dot_or_empty_segment(
                p in prop_oneof![
                    "/[a-zA-Z0-9./%~_-]{0,40}",
                    "/\\PC{0,30}",
                    "\\PC{0,10}",
                    // Pieces that come close to a dot segment or an escape once decoded.
                    prop::collection::vec(
                        prop::sample::select(vec![
                            "/", "/", ".", "%2e", "%2E", "%25", "%252e", "%2F", "%41", "%7e",
                            "a", "%", "4", "e",
                        ]),
                        0..16,
                    )
                    .prop_map(|pieces| format!("/{}", pieces.concat())),
                ]
            ) {
                if let Ok(n) = normalize_path(&p) {
                    prop_assert_eq!(normalize_path(&n), Ok(Cow::Borrowed(&*n)));
                    prop_assert!(n.starts_with('/'));
                    for bad in ["//", "/./", "/../"] {
                        prop_assert!(!n.contains(bad), "{} in {}", bad, n);
                    }
                    prop_assert!(n == "/" || !n.ends_with('/'));
                    prop_assert!(!n.ends_with("/.") && !n.ends_with("/.."));
                }
            }

            #[test]
            fn the_one_pass_check_agrees_with_a_check_by_segments(
                rest in "[a-z./%]{0,12}"
            ) {
                let by_segments = rest.is_empty()
                    || rest
                        .split('/')
                        .all(|s| !matches!(s, "" | "." | "..") && !s.contains('%'));
                prop_assert_eq!(is_normal(rest.as_bytes()), by_segments);
            }

            #[test]
            fn a_normal_path_is_unchanged(p in normal_path()) {
                prop_assert_eq!(normalize_path(&p), Ok(Cow::Borrowed(p.as_str())));
            }

            #[test]
            fn every_spelling_normalises_to_one_path_and_one_route(
                p in normal_path(),
                noise in prop::collection::vec(any::<u8>(), 0..64),
                method in prop::sample::select(vec![
                    http::Method::GET, http::Method::PATCH, http::Method::PUT, http::Method::POST,
                ]),
            ) {
                let spelled = respell(&p, &noise);
                let n = normalize_path(&spelled);
                prop_assert_eq!(n.as_deref(), Ok(p.as_str()), "from {}", spelled);
                let routes = shipped_routes();
                prop_assert_eq!(
                    find_route(&routes, &method, &n.unwrap()),
                    find_route(&routes, &method, &p)
                );
            }

            #[test]
            fn dot_dot_never_climbs_above_the_root(
                picks in prop::collection::vec(0..TOKENS.len(), 0..12)
            ) {
                let path = format!(
                    "/{}",
                    picks.iter().map(|&i| TOKENS[i].0).collect::<Vec<_>>().join("/")
                );
                let mut stack = Vec::new();
                let mut climbed = false;
                for &i in &picks {
                    match TOKENS[i].1 {
                        None => {}
                        Some("..") => climbed |= stack.pop().is_none(),
                        Some(name) => stack.push(name),
                    }
                }
                let want = if climbed {
                    Err(BadPath::AboveRoot)
                } else {
                    Ok(format!("/{}", stack.join("/")))
                };
                prop_assert_eq!(normalize_path(&path).map(Cow::into_owned), want, "{}", path);
            }
        }
    }
}
