//! Per-tool rate limits: GCRA (governor), keyed by caller or shared by the tool.
//! The decision is a pure function of the limiter state and the clock, and the
//! clock is injectable so tests are exact.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use crate::api::{RateLimit, RateLimitScope};

/// The runner's clock: real time, or a manual one that only moves when told
/// (tests and simulations of bursts).
#[derive(Clone, Debug)]
pub enum LimiterClock {
    Real(Instant),
    Manual(Arc<AtomicU64>),
}

impl LimiterClock {
    pub fn real() -> LimiterClock {
        LimiterClock::Real(Instant::now())
    }

    /// A clock frozen at zero; see [`LimiterClock::advance`].
    pub fn manual() -> LimiterClock {
        LimiterClock::Manual(Arc::default())
    }

    /// Moves a manual clock forward (no effect on the real one).
    pub fn advance(&self, by: Duration) {
        if let LimiterClock::Manual(nanos) = self {
            nanos.fetch_add(by.as_nanos() as u64, Ordering::SeqCst);
        }
    }
}

impl Clock for LimiterClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        match self {
            LimiterClock::Real(start) => start.elapsed(),
            LimiterClock::Manual(nanos) => Duration::from_nanos(nanos.load(Ordering::SeqCst)),
        }
    }
}

/// One tool's limiter.
pub struct ToolLimiter {
    scope: RateLimitScope,
    limiter:
        RateLimiter<String, DefaultKeyedStateStore<String>, LimiterClock, NoOpMiddleware<Duration>>,
    clock: LimiterClock,
}

/// A rejected call: when the next one may succeed.
#[derive(Debug, PartialEq, Eq)]
pub struct Limited {
    pub retry_after: Duration,
}

impl ToolLimiter {
    /// `requestsPerMinute` spaced evenly, with `burst` (default: the per-minute
    /// rate) calls allowed at once.
    pub fn new(spec: &RateLimit, clock: LimiterClock) -> ToolLimiter {
        let rpm = spec.requests_per_minute.max(1);
        let burst = NonZeroU32::new(spec.burst.unwrap_or(rpm).max(1)).unwrap_or(NonZeroU32::MIN);
        let period = Duration::from_secs(60) / rpm;
        // `with_period` is None only for a zero period, impossible for rpm <= 1e6.
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
            .allow_burst(burst);
        ToolLimiter {
            scope: spec.per,
            limiter: RateLimiter::new(quota, DefaultKeyedStateStore::default(), clock.clone()),
            clock,
        }
    }

    pub fn check(&self, caller: &str) -> Result<(), Limited> {
        let key = match self.scope {
            RateLimitScope::Caller => caller,
            RateLimitScope::Tool => "",
        };
        self.limiter
            .check_key(&key.to_string())
            .map_err(|not_until| Limited {
                retry_after: not_until.wait_time_from(self.clock.now()),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(rpm: u32, burst: Option<u32>, per: RateLimitScope) -> RateLimit {
        RateLimit {
            requests_per_minute: rpm,
            burst,
            per,
        }
    }

    #[test]
    fn seventy_rapid_calls_against_sixty_per_minute_reject_exactly_ten() {
        let limiter = ToolLimiter::new(
            &limit(60, None, RateLimitScope::Caller),
            LimiterClock::manual(),
        );
        let rejected = (0..70).filter(|_| limiter.check("alice").is_err()).count();
        assert_eq!(rejected, 10);
    }

    #[test]
    fn retry_after_is_one_token_interval_and_tokens_come_back() {
        let clock = LimiterClock::manual();
        let limiter = ToolLimiter::new(&limit(60, Some(2), RateLimitScope::Caller), clock.clone());
        assert!(limiter.check("a").is_ok());
        assert!(limiter.check("a").is_ok());
        assert_eq!(
            limiter.check("a"),
            Err(Limited {
                retry_after: Duration::from_secs(1)
            })
        );
        clock.advance(Duration::from_millis(999));
        assert!(limiter.check("a").is_err());
        clock.advance(Duration::from_millis(1));
        assert!(limiter.check("a").is_ok());
    }

    #[test]
    fn per_caller_budgets_are_separate_and_per_tool_is_shared() {
        let per_caller = ToolLimiter::new(
            &limit(60, Some(1), RateLimitScope::Caller),
            LimiterClock::manual(),
        );
        assert!(per_caller.check("a").is_ok());
        assert!(per_caller.check("b").is_ok());
        assert!(per_caller.check("a").is_err());
        let per_tool = ToolLimiter::new(
            &limit(60, Some(1), RateLimitScope::Tool),
            LimiterClock::manual(),
        );
        assert!(per_tool.check("a").is_ok());
        assert!(per_tool.check("b").is_err());
    }
}
