//! Upstream host names resolved off the request path: Pingora's own lookup blocks and panics on
//! failure, so names are looked up here, cached for a while, and the last good answer is kept
//! when a refresh fails.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::Config;

/// (host, port) -> (addresses, when they were looked up)
type AddressCache = HashMap<(String, u16), (Vec<SocketAddr>, Instant)>;

#[derive(Default)]
pub struct Resolver {
    cache: Mutex<AddressCache>,
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("cannot resolve {host}: {source}")]
    Lookup {
        host: String,
        source: std::io::Error,
    },
    #[error("{0} resolves to no address")]
    Empty(String),
    #[error("resolving {0} timed out")]
    Timeout(String),
}

impl Resolver {
    const TTL: Duration = Duration::from_secs(30);
    const TIMEOUT: Duration = Duration::from_secs(5);

    /// The addresses of `host`: from the cache when it has any (the background refresh keeps
    /// them current), else looked up now (the first request to a name never resolved).
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, ResolveError> {
        if let Ok(ip) = host.parse::<std::net::IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(host.to_string(), port))
            .map(|(a, _)| a.clone());
        match cached {
            Some(addrs) => Ok(addrs),
            None => self.refresh(host, port).await,
        }
    }

    /// Looks `host` up again when its answer is older than the TTL (or absent). A failed
    /// lookup keeps the last good addresses.
    pub async fn refresh(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, ResolveError> {
        if let Ok(ip) = host.parse::<std::net::IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let key = (host.to_string(), port);
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned();
        if let Some((addrs, at)) = &cached {
            if at.elapsed() < Self::TTL {
                return Ok(addrs.clone());
            }
        }
        let looked_up = tokio::time::timeout(Self::TIMEOUT, tokio::net::lookup_host((host, port)))
            .await
            .map_err(|_| ResolveError::Timeout(host.to_string()))
            .and_then(|r| {
                r.map_err(|source| ResolveError::Lookup {
                    host: host.to_string(),
                    source,
                })
            })
            .map(|it| it.collect::<Vec<_>>());
        match looked_up {
            Ok(addrs) if !addrs.is_empty() => {
                self.cache
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key, (addrs.clone(), Instant::now()));
                Ok(addrs)
            }
            Ok(_) => cached
                .map(|(a, _)| a)
                .ok_or_else(|| ResolveError::Empty(host.to_string())),
            Err(e) => match cached {
                Some((a, _)) => {
                    tracing::warn!(error = %e, "keeping the last addresses of {host}");
                    Ok(a)
                }
                None => Err(e),
            },
        }
    }

    /// Refreshes every upstream of `config` (the config watcher calls this off the request
    /// path); failures are logged, never fatal.
    pub async fn refresh_all(&self, config: &Config) {
        for u in &config.upstreams {
            if let Err(e) = self.refresh(&u.host, u.port).await {
                tracing::warn!(upstream = %u.name, error = %e, "upstream address unknown");
            }
        }
    }
}
