//! What a request is charged to, read from its head: its route and the buckets of that route's
//! budgets. Two callers: the proxy's first hook, and the client edge, which admits a paced
//! request from the raw head before Pingora builds its (much larger) per-request state, so a
//! request waiting for its slot holds little more than its connection (see [`crate::edge`]).

use std::net::IpAddr;
use std::time::Instant;

use crate::config::{Config, Per, RouteSpec};
use crate::digest::{key_hash, token_key};
use crate::hygiene::MAX_HEAD_BYTES;
use crate::pacer::{BucketKey, Closed, Grant, Pacer};
use crate::route::{find_route, normalize_path};

/// Most header lines the edge reads in a head it admits; a head with more goes to Pingora,
/// which judges it.
const MAX_HEADERS: usize = 64;

/// The buckets a request of `route` is charged to, one per budget of the route. `header` gives
/// a request header's first value (empty when absent), `client_ip` the client's address.
pub fn bucket_keys<'h>(
    pacer: &Pacer,
    cfg: &Config,
    route: &RouteSpec,
    header: impl Fn(&str) -> &'h [u8],
    client_ip: impl Fn() -> Option<IpAddr>,
) -> Vec<BucketKey> {
    route
        .budgets
        .iter()
        .map(|&i| {
            let b = &cfg.budgets[i];
            let key = match &b.per {
                Per::Global => None,
                Per::Token => Some(token_key(header("authorization"))),
                Per::ClientIp => Some(key_hash(
                    client_ip()
                        .map(|ip| ip.to_string())
                        .unwrap_or_default()
                        .as_bytes(),
                )),
                Per::Header(h) => Some(key_hash(header(h))),
            };
            pacer.bucket_key(&b.name, key)
        })
        .collect()
}

/// A paced request the edge may queue before Pingora reads it: what it needs to wait and to
/// be told apart from the request the proxy then routes.
#[derive(Debug)]
pub struct EdgeRequest {
    pub route: usize,
    pub buckets: Vec<BucketKey>,
    /// For its access line, should the client leave while it waits.
    pub method: String,
    pub path: String,
}

/// Reads a complete request head (`head`, as received) and returns the request when the edge
/// should queue it (never with replicas: `cluster`): a well-formed head of a paced route, with
/// no body to negotiate
/// (`Expect`), no chunked body, a declared length within `limits.max_body_bytes`, not a
/// coalescing route. Everything else is for the proxy's own hooks, which answer it.
/// `peer`: the socket's address (budgets `per: client_ip`).
pub fn at_edge(
    cfg: &Config,
    pacer: &Pacer,
    head: &[u8],
    peer: Option<IpAddr>,
) -> Option<EdgeRequest> {
    if head.len() > MAX_HEAD_BYTES || !cfg.queues_at_edge() {
        return None;
    }
    // The request line alone first: most requests of an unpaced route stop here, and Pingora
    // parses every head anyway.
    let line = head
        .split(|&b| b == b'\n')
        .find(|l| !l.trim_ascii().is_empty())?;
    let mut parts = line.trim_ascii().split(|&b| b == b' ');
    let (method, target) = (parts.next()?, parts.next()?);
    let method = http::Method::from_bytes(method).ok()?;
    let target = std::str::from_utf8(target).ok()?;
    let raw_path = target.split_once('?').map_or(target, |(p, _)| p);
    let path = normalize_path(raw_path).ok()?;
    let route_index = find_route(&cfg.routes, &method, &path)?;
    let route = &cfg.routes[route_index];
    if route.budgets.is_empty() || route.coalesce.is_some() {
        return None;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) if req.path == Some(target) => {}
        _ => return None,
    }
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map_or(&[][..], |h| h.value)
    };
    let mut lengths = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-length"));
    let declared = match (lengths.next(), lengths.next()) {
        (None, _) => 0,
        (Some(h), None) => std::str::from_utf8(h.value).ok()?.trim().parse().ok()?,
        (Some(_), Some(_)) => return None,
    };
    if declared > cfg.limits.max_body_bytes
        || !header("expect").is_empty()
        || !header("transfer-encoding").is_empty()
    {
        return None;
    }
    let client_ip = || {
        let peer = peer?;
        if cfg.trusted_proxies.is_empty() {
            return Some(peer);
        }
        let xff = req
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("x-forwarded-for"))
            .filter_map(|h| std::str::from_utf8(h.value).ok());
        Some(crate::forwarded::client_ip(peer, xff, &cfg.trusted_proxies))
    };
    let buckets = bucket_keys(pacer, cfg, route, header, client_ip);
    Some(EdgeRequest {
        route: route_index,
        buckets,
        method: method.to_string(),
        path: path.into_owned(),
    })
}

/// A request the edge queued, handed to the proxy with its connection: the proxy takes it as
/// its own admission when it routes the request to the same buckets under the same config
/// (a reload in between: the slot is given back and the request admitted afresh).
#[derive(Debug)]
pub struct Admitted {
    pub config: std::sync::Arc<Config>,
    pub route: usize,
    pub buckets: Vec<BucketKey>,
    /// When its head was complete: its arrival, for `max_elapsed` and its duration.
    pub arrived: Instant,
    /// Its slots, or why it left the queue without them (see [`crate::pacer::Ticket`]).
    pub outcome: Result<Grant, Closed>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let yaml = format!(
            r#"
listen: "127.0.0.1:1"
upstreams:
  api: {{ url: "http://127.0.0.1:2" }}
budgets:
  per_token: {{ rate: "5/s", per: token }}
  org: {{ rate: "50/s" }}
routes:
  - name: presence
    match: {{ method: PATCH, path: "/api/v2/users/{{userId}}/presences/{{sourceId}}" }}
    budgets: [per_token, org]
  - name: other
    match: {{ path: "/**" }}
{extra}"#
        );
        Config::parse(&yaml).expect("valid config")
    }

    fn pacer(cfg: &Config) -> Pacer {
        Pacer::new(&cfg.budgets, 100, std::time::Duration::from_secs(1))
    }

    const PATCH: &[u8] = b"PATCH /api/v2/users/u1/presences/PURECLOUD?x=1 HTTP/1.1\r\nHost: a\r\n\
        Authorization: Bearer t1\r\nContent-Length: 2\r\n\r\n";

    #[test]
    fn a_paced_head_is_routed_and_charged_as_the_proxy_would() {
        let cfg = config("");
        let pacer = pacer(&cfg);
        let r = at_edge(&cfg, &pacer, PATCH, None).expect("queued at the edge");
        assert_eq!((r.route, r.method.as_str()), (0, "PATCH"));
        assert_eq!(r.path, "/api/v2/users/u1/presences/PURECLOUD");
        let token = pacer.bucket_key("per_token", Some(token_key(b"Bearer t1")));
        assert_eq!(r.buckets, vec![token, pacer.bucket_key("org", None)]);
    }

    #[test]
    fn anything_the_hooks_must_judge_is_left_to_them() {
        let cfg = config("limits: { max_body_bytes: 10 }");
        let pacer = pacer(&cfg);
        let with = |from: &str, to: &str| {
            let head = String::from_utf8(PATCH.to_vec()).unwrap().replace(from, to);
            at_edge(&cfg, &pacer, head.as_bytes(), None).map(|r| r.route)
        };
        assert_eq!(with("", ""), Some(0));
        // unpaced route, incomplete head, body too large, two lengths, Expect, chunked, bad path
        assert_eq!(with("PATCH /api/v2/users/u1/presences", "GET /x"), None);
        assert_eq!(with("\r\n\r\n", "\r\n"), None);
        assert_eq!(with("Content-Length: 2", "Content-Length: 11"), None);
        assert_eq!(with("Host: a", "Content-Length: 2"), None);
        assert_eq!(with("Host: a", "Expect: 100-continue"), None);
        assert_eq!(
            with("Content-Length: 2", "Transfer-Encoding: chunked"),
            None
        );
        assert_eq!(with("/api/v2/users/u1", "api/v2/users/u1"), None);
    }
}
