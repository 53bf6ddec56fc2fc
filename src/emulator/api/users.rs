//! `GET /api/v2/users`: the org's users, paged as Genesys pages them (`pageSize`, `pageNumber`).

use serde_json::{json, Value};

use crate::loadtest::user_id;

/// Genesys's default and largest page sizes for the users listing.
const DEFAULT_PAGE_SIZE: u32 = 25;
const MAX_PAGE_SIZE: u32 = 500;

/// Page `pageNumber` (from 1) of `users` users, `pageSize` a page. User `i` has the load test's
/// id `user_id(i)`, so a load test and a discovery see the same users.
pub(super) fn page(query: &str, users: u32) -> Result<Value, String> {
    let page_size = query_u32(query, "pageSize")?.unwrap_or(DEFAULT_PAGE_SIZE);
    let page_number = query_u32(query, "pageNumber")?.unwrap_or(1);
    if !(1..=MAX_PAGE_SIZE).contains(&page_size) {
        return Err(format!("pageSize must be between 1 and {MAX_PAGE_SIZE}."));
    }
    if page_number == 0 {
        return Err("pageNumber must be at least 1.".to_string());
    }
    let first = u64::from(page_number - 1) * u64::from(page_size);
    let last = (first + u64::from(page_size)).min(u64::from(users));
    let entities: Vec<Value> = (first..last.max(first))
        .map(|i| {
            let id = user_id(i as usize);
            json!({
                "id": id,
                "name": format!("Agent {}", i + 1),
                "state": "active",
                "selfUri": format!("/api/v2/users/{id}"),
            })
        })
        .collect();
    Ok(json!({
        "entities": entities,
        "pageSize": page_size,
        "pageNumber": page_number,
        "total": users,
        "pageCount": users.div_ceil(page_size),
    }))
}

fn query_u32(query: &str, key: &str) -> Result<Option<u32>, String> {
    for pair in query.split('&') {
        if let Some((k, v)) = pair.split_once('=') {
            if k == key {
                return v
                    .parse()
                    .map(Some)
                    .map_err(|_| format!("{key} must be a whole number, got {v:?}."));
            }
        }
    }
    Ok(None)
}
