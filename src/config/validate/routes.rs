//! The sections that name each other: upstreams, budgets, and the routes that use them by name.

use std::collections::HashSet;
use std::time::Duration;

use indexmap::IndexMap;

use super::Validator;
use crate::config::lines::YamlPath;
use crate::config::raw::{RawBudget, RawRoute, RawUpstream};
use crate::config::{
    BudgetSpec, Coalesce, Per, Rate, RouteSpec, Upstream, DEFAULT_COALESCE_WINDOW,
    DEFAULT_MAX_KEYS, MAX_BATCH, MAX_KEYS_CAP,
};
use crate::route::{PathTemplate, Priority};

/// What a route may name: the upstreams and budgets that validated, and every name declared (a
/// name declared but invalid has its own error already, so a route naming it gets none).
pub(super) struct Names<'a> {
    pub(super) upstreams: &'a [Upstream],
    pub(super) declared_upstreams: &'a IndexMap<String, RawUpstream>,
    pub(super) budgets: &'a [BudgetSpec],
    pub(super) declared_budgets: &'a IndexMap<String, RawBudget>,
}

impl Validator<'_> {
    pub(super) fn upstreams(&mut self, raw: &IndexMap<String, RawUpstream>) -> Vec<Upstream> {
        let at = YamlPath::top("upstreams");
        if raw.is_empty() {
            self.err(&at, "at least one upstream is required");
        }
        let mut upstreams = Vec::new();
        for (name, u) in raw {
            match parse_upstream_url(&u.url) {
                Ok((tls, host, port, base_path)) => upstreams.push(Upstream::new(
                    name.clone(),
                    u.url.clone(),
                    tls,
                    host,
                    port,
                    base_path,
                )),
                Err(m) => self.err(&at.key(name).key("url"), m),
            }
        }
        upstreams
    }

    /// The budgets that validated; one with an error is left out (and its error reported).
    pub(super) fn budgets(&mut self, raw: &IndexMap<String, RawBudget>) -> Vec<BudgetSpec> {
        let at = YamlPath::top("budgets");
        raw.iter()
            .filter_map(|(name, b)| self.budget(&at.key(name), name, b))
            .collect()
    }

    fn budget(&mut self, at: &YamlPath, name: &str, raw: &RawBudget) -> Option<BudgetSpec> {
        let rate = match Rate::parse(&raw.rate) {
            Ok(r) => Some(r),
            Err(m) => {
                self.err(&at.key("rate"), m);
                None
            }
        };
        let burst = self.whole(&at.key("burst"), raw.burst, 1, 1);
        let per = self.per(&at.key("per"), raw.per.as_deref());
        let max_keys = self.max_keys(&at.key("max_keys"), raw.max_keys, &per);
        // Without a valid rate, min_rate has nothing to be checked against.
        let rate = rate?;
        let budget = BudgetSpec {
            max_keys,
            ..BudgetSpec::new(name, rate, burst as u32, per)
        };
        let Some(min_rate) = &raw.min_rate else {
            return Some(budget);
        };
        match Rate::parse(min_rate) {
            Ok(min_rate) if min_rate.per_second <= rate.per_second => {
                Some(BudgetSpec { min_rate, ..budget })
            }
            Ok(_) => {
                self.err(&at.key("min_rate"), "must not exceed rate");
                None
            }
            Err(m) => {
                self.err(&at.key("min_rate"), m);
                None
            }
        }
    }

    /// `max_keys`: 1 ..= [`MAX_KEYS_CAP`], and only where there are keys.
    fn max_keys(&mut self, at: &YamlPath, raw: Option<i64>, per: &Per) -> usize {
        let default = DEFAULT_MAX_KEYS as i64;
        match raw {
            Some(_) if *per == Per::Global => {
                self.err(
                    at,
                    "only a keyed budget (per: token, client_ip or header:<Name>) has keys",
                );
                DEFAULT_MAX_KEYS
            }
            Some(n) if n > MAX_KEYS_CAP => {
                self.err(at, format!("must be at most {MAX_KEYS_CAP}, not {n}"));
                DEFAULT_MAX_KEYS
            }
            _ => self.whole(at, raw, 1, default) as usize,
        }
    }

    fn per(&mut self, at: &YamlPath, raw: Option<&str>) -> Per {
        match raw {
            None | Some("global") => Per::Global,
            Some("token") => Per::Token,
            Some("client_ip") => Per::ClientIp,
            Some(p) => match p.strip_prefix("header:") {
                Some(h) if http::HeaderName::from_bytes(h.trim().as_bytes()).is_ok() => {
                    Per::Header(h.trim().to_ascii_lowercase())
                }
                _ => {
                    self.err(
                        at,
                        format!(
                            "invalid per \"{p}\": use global, token, client_ip or header:<Name>"
                        ),
                    );
                    Per::Global
                }
            },
        }
    }

    /// The routes that validated, in order; `max_wait` is the default of each route's own.
    pub(super) fn routes(
        &mut self,
        raw: &[RawRoute],
        names: &Names,
        max_wait: Duration,
    ) -> Vec<RouteSpec> {
        let at = YamlPath::top("routes");
        if raw.is_empty() {
            self.err(&at, "at least one route is required");
        }
        let mut seen = HashSet::new();
        let mut routes = Vec::new();
        for (i, r) in raw.iter().enumerate() {
            let at = at.index(i);
            let name_at = at.key("name");
            if r.name.is_empty() {
                self.err(&name_at, "must not be empty");
            } else if !seen.insert(r.name.clone()) {
                self.err(&name_at, format!("duplicate route name \"{}\"", r.name));
            }
            routes.extend(self.route(&at, r, names, max_wait));
        }
        self.coalesce_targets(raw, &mut routes);
        routes
    }

    /// Resolves each `coalesce.into` once every route is known: it must name a route of
    /// `PUT` (the bulk call), not itself, and not one that coalesces in turn.
    fn coalesce_targets(&mut self, raw: &[RawRoute], routes: &mut [RouteSpec]) {
        let at = YamlPath::top("routes");
        let put_routes: Vec<(String, bool)> = routes
            .iter()
            .map(|r| (r.name.clone(), r.method == Some(http::Method::PUT)))
            .collect();
        for (i, r) in raw.iter().enumerate() {
            let Some(c) = &r.coalesce else { continue };
            let at = at.index(i).key("coalesce");
            let window = self.duration(
                &at.key("window"),
                c.window.as_deref(),
                DEFAULT_COALESCE_WINDOW,
            );
            let max_batch = match c.max_batch {
                Some(n) if !(1..=MAX_BATCH as i64).contains(&n) => {
                    self.err(
                        &at.key("max_batch"),
                        format!("must be from 1 to {MAX_BATCH}, not {n}"),
                    );
                    MAX_BATCH
                }
                n => n.map_or(MAX_BATCH, |n| n as usize),
            };
            let into_at = at.key("into");
            let into = put_routes.iter().position(|(name, _)| *name == c.into);
            let into = match into {
                _ if c.into == r.name => {
                    self.err(&into_at, "a route cannot coalesce into itself");
                    None
                }
                Some(k) if !put_routes[k].1 => {
                    self.err(
                        &into_at,
                        format!("route \"{}\" must match method PUT (the bulk call)", c.into),
                    );
                    None
                }
                Some(_) if raw.iter().any(|o| o.name == c.into && o.coalesce.is_some()) => {
                    self.err(&into_at, format!("route \"{}\" coalesces itself", c.into));
                    None
                }
                Some(k) => Some(k),
                None if raw.iter().any(|o| o.name == c.into) => None,
                None => {
                    self.err(&into_at, format!("unknown route \"{}\"", c.into));
                    None
                }
            };
            let (Some(into), Some(route)) = (into, routes.iter_mut().find(|x| x.name == r.name))
            else {
                continue;
            };
            route.coalesce = Some(Coalesce {
                into,
                window,
                max_batch,
            });
        }
    }

    /// One route, its name aside (its uniqueness is a matter of the whole list).
    fn route(
        &mut self,
        at: &YamlPath,
        r: &RawRoute,
        names: &Names,
        default_max_wait: Duration,
    ) -> Option<RouteSpec> {
        let match_at = at.key("match");
        let method = r.matcher.method.as_deref().and_then(|m| {
            let upper = m.to_ascii_uppercase();
            match http::Method::from_bytes(upper.as_bytes()) {
                Ok(m) => Some(m),
                Err(_) => {
                    self.err(&match_at.key("method"), format!("invalid method \"{m}\""));
                    None
                }
            }
        });
        let path = match PathTemplate::parse(&r.matcher.path) {
            Ok(p) => Some(p),
            Err(m) => {
                self.err(&match_at.key("path"), m);
                None
            }
        };
        if let Some(prefix) = &r.strip_prefix {
            if !prefix.starts_with('/') || prefix.len() < 2 || prefix.ends_with('/') {
                self.err(
                    &at.key("strip_prefix"),
                    format!("invalid prefix \"{prefix}\": must start with / and not end with /"),
                );
            }
        }
        let upstream = self.route_upstream(at, r.upstream.as_deref(), names);
        let budgets = self.route_budgets(&at.key("budgets"), &r.budgets, names);
        let max_wait = self.duration(&at.key("max_wait"), r.max_wait.as_deref(), default_max_wait);
        let priority = match r.priority.as_deref() {
            None | Some("normal") => Priority::Normal,
            Some("high") => Priority::High,
            Some("low") => Priority::Low,
            Some(p) => {
                self.err(
                    &at.key("priority"),
                    format!("invalid priority \"{p}\": use high, normal or low"),
                );
                Priority::Normal
            }
        };
        Some(RouteSpec {
            name: r.name.clone(),
            method,
            path: path?,
            strip_prefix: r.strip_prefix.clone(),
            upstream: upstream?,
            budgets,
            max_wait,
            priority,
            coalesce: None,
        })
    }

    /// The index of the route's upstream; it may be left out only when one upstream is declared.
    fn route_upstream(
        &mut self,
        at: &YamlPath,
        name: Option<&str>,
        names: &Names,
    ) -> Option<usize> {
        match name {
            Some(name) => {
                let found = names.upstreams.iter().position(|u| u.name == name);
                if found.is_none() && !names.declared_upstreams.contains_key(name) {
                    self.err(&at.key("upstream"), format!("unknown upstream \"{name}\""));
                }
                found
            }
            None if names.declared_upstreams.len() == 1 => {
                // The one declared upstream, unless its own URL is invalid.
                (names.upstreams.len() == 1).then_some(0)
            }
            None => {
                self.err(
                    at,
                    "upstream is required when more than one upstream is declared",
                );
                None
            }
        }
    }

    /// The indexes of the budgets a route names, each once.
    fn route_budgets(&mut self, at: &YamlPath, raw: &[String], names: &Names) -> Vec<usize> {
        let mut budgets = Vec::new();
        for (j, name) in raw.iter().enumerate() {
            let at = at.index(j);
            match names.budgets.iter().position(|b| &b.name == name) {
                Some(k) if budgets.contains(&k) => {
                    self.err(&at, format!("budget \"{name}\" named twice"))
                }
                Some(k) => budgets.push(k),
                None if names.declared_budgets.contains_key(name) => {}
                None => self.err(&at, format!("unknown budget \"{name}\"")),
            }
        }
        budgets
    }
}

/// Splits an upstream base URL into (tls, host, port, base path).
fn parse_upstream_url(url: &str) -> Result<(bool, String, u16, String), String> {
    let uri: http::Uri = url.parse().map_err(|_| format!("invalid URL \"{url}\""))?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => {
            return Err(format!(
                "invalid URL \"{url}\": the scheme must be http or https"
            ))
        }
    };
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("invalid URL \"{url}\": no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if uri.query().is_some() {
        return Err(format!("invalid URL \"{url}\": a query is not allowed"));
    }
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let base_path = uri.path().trim_end_matches('/').to_string();
    Ok((tls, host, port, base_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls_split_into_parts() {
        assert_eq!(
            parse_upstream_url("https://api.mypurecloud.com").unwrap(),
            (true, "api.mypurecloud.com".into(), 443, "".into())
        );
        assert_eq!(
            parse_upstream_url("http://127.0.0.1:81/base/").unwrap(),
            (false, "127.0.0.1".into(), 81, "/base".into())
        );
        assert!(parse_upstream_url("ftp://x").is_err());
    }
}
