//! Path templates (`/api/v2/users/{userId}/presences/**`) as the proxy's config spells them.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Literal segments, `{name}` for exactly one segment, `**` (last only) for zero or more.
/// Matching ignores the query string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PathTemplate {
    text: String,
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param,
    Rest,
}

/// Why a template was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path template {0:?} must start with '/'")]
    NoLeadingSlash(String),
    #[error("path template {0:?}: `**` may only be the last segment")]
    RestNotLast(String),
    #[error("path template {0:?}: a segment is either literal, `{{name}}` or `**`")]
    BadSegment(String),
}

impl PathTemplate {
    pub fn parse(text: &str) -> Result<Self, PathError> {
        let rest = text
            .strip_prefix('/')
            .ok_or_else(|| PathError::NoLeadingSlash(text.to_string()))?;
        let parts: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('/').collect()
        };
        let mut segments = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let segment = if *part == "**" {
                if i + 1 != parts.len() {
                    return Err(PathError::RestNotLast(text.to_string()));
                }
                Segment::Rest
            } else if part.starts_with('{') && part.ends_with('}') && part.len() > 2 {
                Segment::Param
            } else if part.contains(['{', '}', '*']) {
                return Err(PathError::BadSegment(text.to_string()));
            } else {
                Segment::Literal(part.to_string())
            };
            segments.push(segment);
        }
        Ok(PathTemplate {
            text: text.to_string(),
            segments,
        })
    }

    /// Whether `path` (query string allowed) matches.
    pub fn matches(&self, path: &str) -> bool {
        let path = path.split('?').next().unwrap_or_default();
        let Some(rest) = path.strip_prefix('/') else {
            return false;
        };
        let mut parts = rest.split('/');
        if rest.is_empty() {
            // "/" has no segments, not one empty one.
            parts.next();
        }
        for segment in &self.segments {
            match segment {
                Segment::Rest => return true,
                Segment::Param => match parts.next() {
                    Some(p) if !p.is_empty() => {}
                    _ => return false,
                },
                Segment::Literal(lit) => {
                    if parts.next() != Some(lit.as_str()) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for PathTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl TryFrom<String> for PathTemplate {
    type Error = PathError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        PathTemplate::parse(&s)
    }
}

impl From<PathTemplate> for String {
    fn from(t: PathTemplate) -> String {
        t.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> PathTemplate {
        PathTemplate::parse(s).unwrap()
    }

    #[test]
    fn params_match_exactly_one_non_empty_segment() {
        let presence = t("/api/v2/users/{userId}/presences/{sourceId}");
        assert!(presence.matches("/api/v2/users/u1/presences/purecloud"));
        assert!(presence.matches("/api/v2/users/u1/presences/purecloud?x=1"));
        assert!(!presence.matches("/api/v2/users//presences/purecloud"));
        assert!(!presence.matches("/api/v2/users/u1/presences"));
        assert!(!presence.matches("/api/v2/users/u1/presences/purecloud/extra"));
    }

    #[test]
    fn rest_matches_zero_or_more_segments() {
        let api = t("/api/v2/**");
        assert!(api.matches("/api/v2"));
        assert!(api.matches("/api/v2/users/presences/bulk"));
        assert!(!api.matches("/api/v1/users"));
        assert!(t("/**").matches("/"));
        assert!(t("/**").matches("/oauth/token"));
    }

    #[test]
    fn malformed_templates_are_refused() {
        assert_eq!(
            PathTemplate::parse("api/**"),
            Err(PathError::NoLeadingSlash("api/**".into()))
        );
        assert!(matches!(
            PathTemplate::parse("/a/**/b"),
            Err(PathError::RestNotLast(_))
        ));
        assert!(matches!(
            PathTemplate::parse("/a/{x"),
            Err(PathError::BadSegment(_))
        ));
    }
}
