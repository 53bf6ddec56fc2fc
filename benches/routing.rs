//! Measures the route matcher: `find_route` over the shipped config.yaml's routes (first match
//! wins) for the paths the Genesys SDKs send, from the first route to the catch-all.
//!
//! Run: `cargo bench --bench routing` (`-- --quick` for a short run).

use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http::Method;
use shiftgate::config::Config;
use shiftgate::route::find_route;

/// (name, method, path, the route expected to match).
const REQUESTS: [(&str, Method, &str, &str); 7] = [
    (
        "sdk-login-token",
        Method::POST,
        "/login/oauth/token",
        "sdk-gateway-login",
    ),
    ("oauth-token", Method::POST, "/oauth/token", "oauth"),
    (
        "presence-patch",
        Method::PATCH,
        "/api/v2/users/6a7c2e4b-90f1-4d3e-a5b8-1c2d3e4f5a6b/presences/purecloud",
        "presence",
    ),
    (
        "presence-bulk",
        Method::PUT,
        "/api/v2/users/presences/bulk",
        "presence-bulk",
    ),
    (
        "routingstatus-put",
        Method::PUT,
        "/api/v2/users/6a7c2e4b-90f1-4d3e-a5b8-1c2d3e4f5a6b/routingstatus",
        "routing-status",
    ),
    (
        "presence-get",
        Method::GET,
        "/api/v2/users/6a7c2e4b-90f1-4d3e-a5b8-1c2d3e4f5a6b/presences/purecloud",
        "default",
    ),
    (
        "analytics-query",
        Method::POST,
        "/api/v2/analytics/conversations/details/query",
        "default",
    ),
];

fn routing(c: &mut Criterion) {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config.yaml"))
        .expect("the shipped config.yaml");
    // Its admin_token_env must name a set variable; the routes do not depend on its value.
    let config = Config::parse_with_env(&text, &|_: &str| Some("bench".to_string()))
        .expect("the shipped config.yaml is valid");
    let routes = &config.routes;
    for (_, method, path, expected) in &REQUESTS {
        let found = find_route(routes, method, path).map(|i| routes[i].name.as_str());
        assert_eq!(found, Some(*expected), "{method} {path}");
    }
    let mut group = c.benchmark_group("find_route");
    group.throughput(Throughput::Elements(1));
    for (name, method, path, _) in &REQUESTS {
        group.bench_function(*name, |b| {
            b.iter(|| find_route(routes, black_box(method), black_box(path)))
        });
    }
    group.throughput(Throughput::Elements(REQUESTS.len() as u64));
    group.bench_function("mix-of-all", |b| {
        b.iter(|| {
            for (_, method, path, _) in &REQUESTS {
                black_box(find_route(routes, black_box(method), black_box(path)));
            }
        })
    });
    group.finish();
}

criterion_group!(benches, routing);
criterion_main!(benches);
