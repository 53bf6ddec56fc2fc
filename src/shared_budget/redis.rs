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
local ahead = tonumber(ARGV[5])
-- A stored time that is not a number, not finite, negative or further ahead than any real
-- schedule goes (garbage, another program's key, a bug) counts as absent: the bucket starts
-- afresh (at most one burst early) rather than pausing for ever.
local function time(v)
  local x = tonumber(v)
  if x == nil or x ~= x or x < 0 or x > now + ahead then return nil end
  return x
end
local h = redis.call('HMGET', KEYS[1], 'tat', 'paused_until', 'lowered', 'ceiling', 'dec_at')
local tat = time(h[1]) or 0
local paused = time(h[2]) or 0
local interval = tonumber(ARGV[1])
local tol = tonumber(ARGV[2])
local slots = {}
for i = 1, tonumber(ARGV[3]) do
  local s = math.max(now, tat - tol, paused)
  tat = math.max(tat, s) + interval
  slots[i] = s - now
end
redis.call('HSET', KEYS[1], 'tat', string.format('%.0f', tat), 'paused_until', string.format('%.0f', paused))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
local ago = -1
local dec = time(h[5])
if dec and dec <= now then ago = now - dec end
return {slots, math.max(0, paused - now), h[3] or '', h[4] or '', ago}
"#;

/// Pauses the bucket (no slot before the pause ends, then one probe) and, when the caller
/// lowered it, records the rate in force with Redis's time of the decrease.
const THROTTLE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ahead = tonumber(ARGV[6])
local function time(v)
  local x = tonumber(v)
  if x == nil or x ~= x or x < 0 or x > now + ahead then return nil end
  return x
end
local pu = now + tonumber(ARGV[1])
local paused = time(redis.call('HGET', KEYS[1], 'paused_until')) or 0
if pu > paused then
  local tat = time(redis.call('HGET', KEYS[1], 'tat')) or 0
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

/// The furthest ahead of Redis's clock a stored time may be: the longest pause (durations are
/// bounded to 24 h) plus a long backlog of slots. A time further ahead is garbage (see the
/// scripts), as is a returned slot or pause past it (see [`checked_lease`]).
fn max_ahead(interval: Duration) -> Duration {
    Duration::from_secs(25 * 3600).saturating_add(interval.saturating_mul(1000))
}

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

/// A lease as Redis answered it, checked: slot delays and the pause must be whole, not
/// negative and within `max_ahead`, else the answer is an error (the caller falls back to its
/// local share, as for an outage: never a pause for ever, never unbounded slots). A shared rate
/// that is not a finite positive number at most its ceiling is ignored (the bucket keeps its
/// own).
/// Above any rate the config accepts (1,000,000/s).
const MAX_RATE: f64 = 1e7;

fn checked_lease(
    slots: &[i64],
    paused: i64,
    lowered: &str,
    ceiling: &str,
    ago: i64,
    max_ahead: Duration,
) -> Result<Lease, StoreError> {
    let limit = us(max_ahead) as i64;
    let delay = |what: &str, v: i64| {
        if (0..=limit).contains(&v) {
            Ok(Duration::from_micros(v as u64))
        } else {
            Err(StoreError::Unavailable(format!(
                "Redis answered an implausible {what}: {v} µs"
            )))
        }
    };
    let slots = slots
        .iter()
        .map(|&s| delay("slot start", s))
        .collect::<Result<Vec<_>, _>>()?;
    let paused_for = delay("pause", paused)?;
    let adaptive = match (lowered.parse::<f64>(), ceiling.parse::<f64>()) {
        (Ok(lowered), Ok(ceiling))
            if lowered.is_finite()
                && ceiling.is_finite()
                && lowered > 0.0
                && lowered <= ceiling
                && ceiling <= MAX_RATE
                && (0..=limit).contains(&ago) =>
        {
            Some(SharedAdaptive {
                lowered,
                ceiling,
                ago: Duration::from_micros(ago as u64),
            })
        }
        _ => None,
    };
    Ok(Lease {
        slots,
        paused_for,
        adaptive,
    })
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
            .arg(us(max_ahead(req.interval)))
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        checked_lease(
            &slots,
            paused,
            &lowered,
            &ceiling,
            ago,
            max_ahead(req.interval),
        )
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
            .arg(us(max_ahead(Duration::from_secs(86_400))))
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

#[cfg(test)]
mod tests {
    use super::*;

    const AHEAD: Duration = Duration::from_secs(100);

    #[test]
    fn a_sane_answer_is_taken_as_it_is() {
        let l = checked_lease(&[0, 10_000], 5, "2.5", "10", 7, AHEAD).unwrap();
        assert_eq!(
            l.slots,
            vec![Duration::ZERO, Duration::from_millis(10)],
            "microseconds"
        );
        assert_eq!(l.paused_for, Duration::from_micros(5));
        assert_eq!(
            l.adaptive.map(|a| (a.lowered, a.ceiling)),
            Some((2.5, 10.0))
        );
    }

    #[test]
    fn implausible_slots_or_pauses_are_an_error_and_bad_rates_are_ignored() {
        // Negative or past the furthest plausible time: the store is not trusted.
        assert!(checked_lease(&[-1], 0, "", "", -1, AHEAD).is_err());
        assert!(checked_lease(&[0, i64::MAX], 0, "", "", -1, AHEAD).is_err());
        assert!(checked_lease(&[0], 200_000_000, "", "", -1, AHEAD).is_err());
        assert!(checked_lease(&[0], -5, "", "", -1, AHEAD).is_err());
        // A shared rate that is no rate: the bucket keeps its own.
        for (lowered, ceiling) in [
            ("NaN", "10"),
            ("inf", "inf"),
            ("-3", "10"),
            ("0", "10"),
            ("20", "10"),
            ("1e400", "1e400"),
            ("1e300", "1e300"),
            ("abc", "10"),
        ] {
            let l = checked_lease(&[0], 0, lowered, ceiling, 1, AHEAD).unwrap();
            assert_eq!(l.adaptive, None, "{lowered}/{ceiling}");
        }
        let l = checked_lease(&[0], 0, "1", "10", i64::MAX, AHEAD).unwrap();
        assert_eq!(l.adaptive, None, "a decrease in the future");
    }
}
