//! Per-principal limits from the auth file: requests and mutations per
//! second (token buckets holding one second's worth) and open Subscribe
//! streams. Buckets are kept by principal name, so a reload of the file
//! changes the rates without resetting what was spent.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

/// A principal's limits; `None`: unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Calls per second.
    pub requests_per_second: Option<u64>,
    /// Mutations per second, over all its pushes.
    pub mutations_per_second: Option<u64>,
    /// Open Subscribe streams at once.
    pub max_subscriptions: Option<u64>,
}

/// What a bucket meters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Meter {
    /// Calls.
    Requests,
    /// Mutations.
    Mutations,
}

/// A token bucket: `rate` tokens a second, at most `rate` held.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The state of every principal's limits; a cheap `Clone` handle.
#[derive(Debug, Clone, Default)]
pub struct Limiter {
    /// Buckets by principal and meter.
    buckets: Arc<Mutex<HashMap<(String, Meter), Bucket>>>,
    /// Open Subscribe streams by principal.
    streams: Arc<Mutex<HashMap<String, u64>>>,
}

impl Limiter {
    /// Takes `cost` from `principal`'s `meter` bucket filling at `rate` a
    /// second; if it does not hold that much, how long until it will.
    pub fn take(
        &self,
        principal: &str,
        meter: Meter,
        cost: u64,
        rate: u64,
    ) -> Result<(), Duration> {
        let now = Instant::now();
        let rate_f = rate.max(1) as f64;
        // A cost above one second's worth could never be paid at once: it
        // is let through when the bucket is full, and leaves it in debt.
        let cost = cost as f64;
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let bucket = buckets
            .entry((principal.to_owned(), meter))
            .or_insert(Bucket {
                tokens: rate_f,
                at: now,
            });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate_f).min(rate_f);
        bucket.at = now;
        if bucket.tokens >= cost.min(rate_f) {
            bucket.tokens -= cost;
            return Ok(());
        }
        let missing = cost.min(rate_f) - bucket.tokens;
        Err(Duration::from_secs_f64(missing / rate_f))
    }

    /// Opens a Subscribe stream for `principal` if it has fewer than `max`;
    /// the guard closes it.
    pub fn open_stream(&self, principal: &str, max: u64) -> Option<StreamGuard> {
        let mut streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        let open = streams.entry(principal.to_owned()).or_insert(0);
        if *open >= max {
            return None;
        }
        *open += 1;
        Some(StreamGuard {
            limiter: self.clone(),
            principal: principal.to_owned(),
        })
    }
}

/// One open Subscribe stream of a principal; dropping it closes it.
#[derive(Debug)]
pub struct StreamGuard {
    limiter: Limiter,
    principal: String,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut streams = self
            .limiter
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(open) = streams.get_mut(&self.principal) {
            *open = open.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rule: a bucket lets one second's worth through, then says how long
    /// to wait; principals and meters do not share buckets.
    #[test]
    fn buckets_hold_one_second() {
        let l = Limiter::default();
        for _ in 0..10 {
            assert!(l.take("a", Meter::Requests, 1, 10).is_ok());
        }
        let wait = l.take("a", Meter::Requests, 1, 10).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        assert!(l.take("b", Meter::Requests, 1, 10).is_ok());
        assert!(l.take("a", Meter::Mutations, 5, 10).is_ok());
        let guard = l.open_stream("a", 1).unwrap();
        assert!(l.open_stream("a", 1).is_none());
        drop(guard);
        assert!(l.open_stream("a", 1).is_some());
    }
}
