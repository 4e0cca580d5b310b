//! The rate limit on a terminal's output: a token bucket.

use std::time::Duration;

use tokio::time::Instant;

/// A rate limit: `rate` bytes per second, with a burst of one second's worth.
pub(super) struct TokenBucket {
    rate: u64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    pub(super) fn new(rate: u64) -> TokenBucket {
        TokenBucket { rate: rate.max(1), tokens: rate as f64, at: Instant::now() }
    }

    /// Takes `n` tokens; when that overdraws the bucket, how long to wait before the next take.
    pub(super) fn take(&mut self, n: u64, now: Instant) -> Option<Duration> {
        let rate = self.rate as f64;
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * rate).min(rate);
        self.at = now;
        self.tokens -= n as f64;
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_allows_its_rate_and_asks_to_wait_beyond() {
        let start = Instant::now();
        let mut bucket = TokenBucket { rate: 1000, tokens: 1000.0, at: start };
        assert_eq!(bucket.take(1000, start), None);
        let wait = bucket.take(500, start).expect("overdrawn");
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        assert_eq!(bucket.take(100, start + Duration::from_secs(1)), None);
    }
}
