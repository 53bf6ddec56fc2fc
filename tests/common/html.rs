//! A scanner for the HTML a browser serialises (`chromium --dump-dom`): the elements of one tag,
//! their attributes and text. Enough for the status page's tables; not a general HTML parser.

/// One element of a serialised DOM: its attributes and its inner HTML.
#[derive(Debug)]
pub struct Element<'a> {
    pub attrs: Vec<(String, String)>,
    pub inner: &'a str,
}

impl Element<'_> {
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn has_class(&self, class: &str) -> bool {
        self.attr("class")
            .is_some_and(|c| c.split_whitespace().any(|x| x == class))
    }

    /// The text content: inner HTML without tags, entities left as they are.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let mut in_tag = false;
        for c in self.inner.chars() {
            match c {
                '<' => in_tag = true,
                '>' => in_tag = false,
                c if !in_tag => out.push(c),
                _ => {}
            }
        }
        out.trim().to_string()
    }
}

/// Every `<tag ...>...</tag>` of `html` (not nested in one another: rows, cells).
pub fn elements<'a>(html: &'a str, tag: &str) -> Vec<Element<'a>> {
    let open = format!("<{tag}");
    let close = format!("</{tag}>");
    let mut out = Vec::new();
    let mut rest = html;
    while let Some(start) = rest.find(&open) {
        let after = &rest[start + open.len()..];
        if !after.starts_with([' ', '>']) {
            rest = after;
            continue;
        }
        let tag_end = after.find('>').expect("start tag closed");
        let attrs = parse_attributes(&after[..tag_end]);
        let body = &after[tag_end + 1..];
        let end = body.find(&close).expect("element closed");
        out.push(Element {
            attrs,
            inner: &body[..end],
        });
        rest = &body[end + close.len()..];
    }
    out
}

fn parse_attributes(s: &str) -> Vec<(String, String)> {
    let mut attrs = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let name_end = rest.find(['=', ' ']).unwrap_or(rest.len());
        let name = rest[..name_end].to_string();
        rest = rest[name_end..].trim_start();
        if let Some(v) = rest.strip_prefix("=\"") {
            let end = v.find('"').expect("attribute value closed");
            attrs.push((name, v[..end].to_string()));
            rest = v[end + 1..].trim_start();
        } else {
            attrs.push((name, String::new()));
        }
    }
    attrs
}
