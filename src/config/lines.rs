//! Where each YAML path is in the text. serde_yaml gives no line for a value that parses fine but
//! is wrong, so the text is walked once more with a marked event parser to map each path to its
//! line. [`YamlPath`] is the one spelling of a path, shared by this index and every error.

use std::collections::HashMap;
use std::fmt;

/// A path into the document as errors name it: `listen`, `retry.max_attempts`,
/// `routes[2].budgets[0]`. Built only by appending keys and indexes, so a path looked up in the
/// [`LineIndex`] is spelled as the index spelled it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct YamlPath(String);

impl YamlPath {
    /// The document itself (an empty path).
    pub(super) fn root() -> YamlPath {
        YamlPath(String::new())
    }

    /// A key of the document: `listen`, or a section such as `retry`.
    pub(super) fn top(key: &str) -> YamlPath {
        YamlPath::root().key(key)
    }

    /// A key of the map at this path: `retry` + `max_attempts` is `retry.max_attempts`.
    pub(super) fn key(&self, key: &str) -> YamlPath {
        if self.0.is_empty() {
            YamlPath(key.to_string())
        } else {
            YamlPath(format!("{}.{key}", self.0))
        }
    }

    /// An item of the sequence at this path: `routes` + 2 is `routes[2]`.
    pub(super) fn index(&self, index: usize) -> YamlPath {
        YamlPath(format!("{}[{index}]", self.0))
    }

    pub(super) fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for YamlPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The line of every path in one document.
pub(super) struct LineIndex {
    /// path -> (line of the key, line of the value)
    lines: HashMap<String, (usize, usize)>,
}

impl LineIndex {
    pub(super) fn build(text: &str) -> LineIndex {
        let mut rx = LineCollector::default();
        let mut parser = yaml_rust2::parser::Parser::new_from_str(text);
        // A broken document yields a partial index; serde_yaml reports the syntax error.
        let _ = parser.load(&mut rx, false);
        LineIndex { lines: rx.lines }
    }

    /// Line of the value at `path` (or of its key for a map entry).
    pub(super) fn line(&self, path: &str) -> Option<usize> {
        self.lines.get(path).map(|&(_, v)| v)
    }

    pub(super) fn key_line(&self, path: &str) -> Option<usize> {
        self.lines.get(path).map(|&(k, _)| k)
    }
}

enum Frame {
    Map {
        path: YamlPath,
        pending_key: Option<(String, usize)>,
    },
    Seq {
        path: YamlPath,
        next: usize,
    },
}

/// The yaml_rust2 event receiver that fills a [`LineIndex`].
#[derive(Default)]
struct LineCollector {
    stack: Vec<Frame>,
    lines: HashMap<String, (usize, usize)>,
}

impl LineCollector {
    /// Called for a node starting at `line`: returns the node's path, or None when it is a map key.
    fn node_path(&mut self, scalar: Option<&str>, line: usize) -> Option<YamlPath> {
        match self.stack.last_mut() {
            None => Some(YamlPath::root()),
            Some(Frame::Seq { path, next }) => {
                let p = path.index(*next);
                *next += 1;
                self.lines.insert(p.to_string(), (line, line));
                Some(p)
            }
            Some(Frame::Map { path, pending_key }) => match pending_key.take() {
                None => {
                    *pending_key = Some((scalar.unwrap_or("").to_string(), line));
                    None
                }
                Some((key, key_line)) => {
                    let p = path.key(&key);
                    self.lines.insert(p.to_string(), (key_line, line));
                    Some(p)
                }
            },
        }
    }
}

impl yaml_rust2::parser::MarkedEventReceiver for LineCollector {
    fn on_event(&mut self, ev: yaml_rust2::parser::Event, mark: yaml_rust2::scanner::Marker) {
        use yaml_rust2::parser::Event;
        let line = mark.line();
        match ev {
            Event::Scalar(value, ..) => {
                self.node_path(Some(&value), line);
            }
            Event::Alias(_) => {
                self.node_path(None, line);
            }
            Event::MappingStart(..) => {
                let path = self.node_path(None, line).unwrap_or_default();
                self.stack.push(Frame::Map {
                    path,
                    pending_key: None,
                });
            }
            Event::SequenceStart(..) => {
                let path = self.node_path(None, line).unwrap_or_default();
                self.stack.push(Frame::Seq { path, next: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::MINIMAL;

    #[test]
    fn line_index_maps_paths_to_lines() {
        let idx = LineIndex::build(MINIMAL);
        assert_eq!(idx.line("listen"), Some(1));
        assert_eq!(idx.line("upstreams.api.url"), Some(3));
        assert_eq!(idx.line("routes[0]"), Some(5));
        assert_eq!(idx.line("routes[0].match.path"), Some(6));
    }
}
