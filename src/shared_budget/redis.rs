//! The Redis side of shared budgets: one hash per bucket holding the shared GCRA schedule
//! (`tat`), the pause and the rate in force, updated only by atomic Lua scripts that use Redis's
//! own clock. Replicas lease slots in batches, so Redis is not on each request's path.
//!
//! Client: `redis` (redis-rs), the maintained Rust client; its `ConnectionManager` multiplexes
//! one connection and reconnects by itself, and `Script` runs EVALSHA with an EVAL fallback.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use tokio::sync::OnceCell;

use super::{Lease, LeaseRequest, SharedAdaptive, SlotStore, StoreError, ThrottleRequest};

/// Each slot starts at max(now, tat − τ, paused_until); tat moves to max(tat, start) + T.
/// Times are microseconds of Redis's clock; slot starts are returned relative to its now.
const LEASE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local h = redis.call('HMGET', KEYS[1], 'tat', 'paused_until', 'lowered', 'ceiling', 'dec_at')
local tat = tonumber(h[1]) or 0
local paused = tonumber(h[2]) or 0
local interval = tonumber(ARGV[1])
local tol = tonumber(ARGV[2])
local slots = {}
for i = 1, tonumber(ARGV[3]) do
  local s = math.max(now, tat - tol, paused)
  tat = math.max(tat, s) + interval
  slots[i] = s - now
end
redis.call('HSET', KEYS[1], 'tat', string.format('%.0f', tat))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
local ago = -1
if h[5] then ago = now - tonumber(h[5]) end
return {slots, math.max(0, paused - now), h[3] or '', h[4] or '', ago}
"#;

/// Pauses the bucket (no slot before the pause ends, then one probe) and, when the caller
/// lowered it, records the rate in force with Redis's time of the decrease.
const THROTTLE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local pu = now + tonumber(ARGV[1])
local paused = tonumber(redis.call('HGET', KEYS[1], 'paused_until')) or 0
if pu > paused then
  local tat = tonumber(redis.call('HGET', KEYS[1], 'tat')) or 0
  redis.call('HSET', KEYS[1], 'paused_until', string.format('%.0f', pu),
    'tat', string.format('%.0f', math.max(tat, pu + tonumber(ARGV[2]))))
end
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'lowered', ARGV[3], 'ceiling', ARGV[4], 'dec_at', string.format('%.0f', now))
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"#;

/// Keys outlive their last use by this much (a learned rate is remembered for a minute).
/// A Redis command that takes longer than this counts as Redis being unreachable.
pub const REDIS_TIMEOUT: Duration = Duration::from_millis(200);

const KEY_TTL: Duration = Duration::from_secs(120);

pub struct RedisStore {
    client: redis::Client,
    conn: OnceCell<ConnectionManager>,
    lease: Script,
    throttle: Script,
    timeout: Duration,
}

impl RedisStore {
    /// No connection is made here: the first lease makes it, on the proxy's runtime.
    pub fn new(url: &str, timeout: Duration) -> Result<RedisStore, StoreError> {
        let client =
            redis::Client::open(url).map_err(|e| StoreError::Unavailable(e.to_string()))?;
        Ok(RedisStore {
            client,
            conn: OnceCell::new(),
            lease: Script::new(LEASE),
            throttle: Script::new(THROTTLE),
            timeout,
        })
    }

    async fn conn(&self) -> Result<ConnectionManager, StoreError> {
        self.conn
            .get_or_try_init(|| async {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                ConnectionManager::new_with_config(self.client.clone(), config).await
            })
            .await
            .cloned()
            .map_err(|e| StoreError::Unavailable(e.to_string()))
    }
}

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

#[async_trait]
impl SlotStore for RedisStore {
    async fn lease(&self, req: LeaseRequest) -> Result<Lease, StoreError> {
        let mut conn = self.conn().await?;
        let (slots, paused, lowered, ceiling, ago): (Vec<i64>, i64, String, String, i64) = self
            .lease
            .key(&req.key)
            .arg(us(req.interval).max(1))
            .arg(us(req.tolerance))
            .arg(req.count)
            .arg(KEY_TTL.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let adaptive = match (lowered.parse::<f64>(), ceiling.parse::<f64>(), ago >= 0) {
            (Ok(lowered), Ok(ceiling), true) => Some(SharedAdaptive {
                lowered,
                ceiling,
                ago: Duration::from_micros(ago as u64),
            }),
            _ => None,
        };
        Ok(Lease {
            slots: slots
                .into_iter()
                .map(|s| Duration::from_micros(s.max(0) as u64))
                .collect(),
            paused_for: Duration::from_micros(paused.max(0) as u64),
            adaptive,
        })
    }

    async fn throttle(&self, req: ThrottleRequest) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let (lowered, ceiling) = req
            .lowered
            .map_or((String::new(), String::new()), |(l, c)| {
                (l.to_string(), c.to_string())
            });
        let _: i64 = self
            .throttle
            .key(&req.key)
            .arg(us(req.pause))
            .arg(us(req.tolerance))
            .arg(lowered)
            .arg(ceiling)
            .arg(KEY_TTL.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}
