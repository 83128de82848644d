//! Delivery policy: retries, backoff, timeout and the dead-letter sink, as Knative's
//! `DeliverySpec` describes them, plus the outcome classes Knative retries.

use std::time::Duration;

use wasmesh_core::duration::LONGEST;
use wasmesh_core::resources::{BackoffPolicy, DeliveryFormat, DeliverySpec, Ordering};

use crate::sink::Sink;

/// The cluster default of Knative: retry 10, exponential, PT0.2S.
pub const DEFAULT_RETRY: u32 = 10;
pub const DEFAULT_BACKOFF_DELAY: Duration = Duration::from_millis(200);

/// A trigger's resolved delivery settings.
#[derive(Debug, Clone)]
pub struct DeliveryPolicy {
    /// Retries after the first attempt.
    pub retry: u32,
    pub backoff: BackoffPolicy,
    pub delay: Duration,
    /// Per-request timeout (HTTP subscribers).
    pub timeout: Option<Duration>,
    pub dead_letter: Option<Sink>,
    /// The longest wait between retries.
    pub backoff_max: Option<Duration>,
    /// Deliveries in flight at once (the mesh's default when unset).
    pub concurrency: Option<usize>,
    /// When set, delivery is ordered per the value of this attribute.
    pub ordered_by: Option<String>,
    /// The longest wait a subscriber's `Retry-After` may ask for (zero: ignore it).
    pub retry_after_max: Option<Duration>,
    /// Structured mode (`format: json`) to HTTP subscribers instead of binary.
    pub structured: bool,
}

impl Default for DeliveryPolicy {
    fn default() -> Self {
        Self {
            retry: DEFAULT_RETRY,
            backoff: BackoffPolicy::Exponential,
            delay: DEFAULT_BACKOFF_DELAY,
            timeout: None,
            dead_letter: None,
            backoff_max: None,
            concurrency: None,
            ordered_by: None,
            retry_after_max: None,
            structured: false,
        }
    }
}

impl DeliveryPolicy {
    /// Builds the policy from a spec; fields the spec leaves unset keep Knative's defaults.
    pub fn from_spec(spec: &DeliverySpec, dead_letter: Option<Sink>) -> Self {
        let d = Self::default();
        Self {
            retry: spec.retry.unwrap_or(d.retry),
            backoff: spec.backoff_policy.unwrap_or(d.backoff),
            delay: spec.backoff_delay.as_ref().map_or(d.delay, |x| x.get()),
            timeout: spec.timeout.as_ref().map(|x| x.get()),
            dead_letter,
            backoff_max: spec.backoff_max.as_ref().map(|x| x.get()),
            concurrency: spec.concurrency.map(|c| c.get() as usize),
            ordered_by: match spec.ordering.unwrap_or_default() {
                Ordering::Ordered => Some(
                    spec.partition_key
                        .as_ref()
                        .map_or("subject", |k| k.as_str())
                        .to_string(),
                ),
                Ordering::Unordered => None,
            },
            retry_after_max: spec.retry_after_max.as_ref().map(|x| x.get()),
            structured: spec.format == Some(DeliveryFormat::Json),
        }
    }

    /// The wait before retry number `n` after a failure whose subscriber asked for a delay: a
    /// `Retry-After` (capped by `retryAfterMax`, which at zero ignores it) lengthens the backoff,
    /// never shortens it, as Knative's dispatcher waits the larger of the two; a Function's
    /// `retry(after)` (capped the same way) replaces it, as the plugin contract says.
    pub fn wait(&self, asked: Option<AskedDelay>, n: u32) -> Duration {
        let backoff = self.backoff(n);
        let capped = |d: Duration| match self.retry_after_max {
            Some(max) if max.is_zero() => None,
            Some(max) => Some(d.min(max)),
            None => Some(d),
        };
        let wait = match asked {
            None => backoff,
            Some(AskedDelay::RetryAfter(d)) => capped(d).map_or(backoff, |d| d.max(backoff)),
            Some(AskedDelay::Exact(d)) => capped(d).unwrap_or(backoff),
        };
        // A subscriber's `Retry-After` may say anything; NATS takes no longer delay.
        wait.min(LONGEST)
    }

    /// The wait before retry number `n` (1-based): linear `delay × n`, exponential
    /// `delay × 2^n`.
    pub fn backoff(&self, n: u32) -> Duration {
        let wait = match self.backoff {
            BackoffPolicy::Linear => self.delay.saturating_mul(n),
            BackoffPolicy::Exponential => self
                .delay
                .saturating_mul(1u32.checked_shl(n).unwrap_or(u32::MAX)),
        };
        self.backoff_max
            .map_or(wait, |max| wait.min(max))
            .min(LONGEST)
    }
}

/// A delay a subscriber asked for before its next attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AskedDelay {
    /// An HTTP `Retry-After` on a 429 or 503: the wait is at least this and at least the backoff.
    RetryAfter(Duration),
    /// A Function's `retry(after)`: this delay instead of the backoff.
    Exact(Duration),
}

/// The delay an HTTP response asks for: its `Retry-After` (delay-seconds or an HTTP-date, RFC
/// 9110), read on a 429 or 503 only, as Knative reads it; `None` when absent or unreadable.
pub fn retry_after(code: u16, value: Option<&str>) -> Option<AskedDelay> {
    if code != 429 && code != 503 {
        return None;
    }
    let value = value?.trim();
    let delay = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(value)
            .ok()?
            .duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    };
    Some(AskedDelay::RetryAfter(delay))
}

/// Whether an HTTP status is one Knative retries: 404, 408, 409, 429 and every 5xx.
pub fn is_retryable_status(code: u16) -> bool {
    matches!(code, 404 | 408 | 409 | 429) || (500..600).contains(&code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_policies() {
        let mut p = DeliveryPolicy {
            delay: Duration::from_millis(100),
            backoff: BackoffPolicy::Linear,
            ..Default::default()
        };
        assert_eq!(p.backoff(1), Duration::from_millis(100));
        assert_eq!(p.backoff(3), Duration::from_millis(300));
        p.backoff = BackoffPolicy::Exponential;
        assert_eq!(p.backoff(1), Duration::from_millis(200));
        assert_eq!(p.backoff(3), Duration::from_millis(800));
        assert!(p.backoff(200) >= Duration::from_secs(3600), "no overflow");
        p.backoff_max = Some(Duration::from_millis(500));
        assert_eq!(
            p.backoff(3),
            Duration::from_millis(500),
            "backoffMax caps the wait"
        );
        assert_eq!(p.backoff(1), Duration::from_millis(200));
    }

    #[test]
    fn retry_after_is_capped_by_retry_after_max_and_ignored_at_zero() {
        let mut p = DeliveryPolicy {
            delay: Duration::from_millis(100),
            backoff: BackoffPolicy::Linear,
            ..Default::default()
        };
        let asked = Some(AskedDelay::RetryAfter(Duration::from_secs(30)));
        assert_eq!(p.wait(asked, 2), Duration::from_secs(30));
        assert_eq!(p.wait(None, 2), Duration::from_millis(200));
        p.retry_after_max = Some(Duration::from_secs(5));
        assert_eq!(p.wait(asked, 2), Duration::from_secs(5));
        assert_eq!(
            p.wait(Some(AskedDelay::RetryAfter(Duration::from_secs(1))), 2),
            Duration::from_secs(1)
        );
        p.retry_after_max = Some(Duration::ZERO);
        assert_eq!(p.wait(asked, 2), Duration::from_millis(200));
    }

    /// Knative waits the larger of `Retry-After` and the backoff; a Function's `retry(after)`
    /// is its delay, shorter than the backoff or not.
    #[test]
    fn retry_after_never_shortens_the_backoff_but_a_functions_delay_does() {
        let p = DeliveryPolicy {
            delay: Duration::from_millis(100),
            backoff: BackoffPolicy::Linear,
            ..Default::default()
        };
        let short = Duration::from_millis(10);
        assert_eq!(
            p.wait(Some(AskedDelay::RetryAfter(short)), 3),
            Duration::from_millis(300)
        );
        assert_eq!(p.wait(Some(AskedDelay::Exact(short)), 3), short);
    }

    #[test]
    fn retry_after_is_read_on_429_and_503_in_both_forms() {
        let secs = |d: Option<AskedDelay>| match d {
            Some(AskedDelay::RetryAfter(d)) => Some(d.as_secs()),
            _ => None,
        };
        assert_eq!(secs(retry_after(429, Some(" 7 "))), Some(7));
        assert_eq!(secs(retry_after(503, Some("7"))), Some(7));
        assert_eq!(retry_after(500, Some("7")), None, "only 429 and 503");
        assert_eq!(retry_after(429, Some("soon")), None);
        assert_eq!(retry_after(429, None), None);
        let in_a_minute =
            httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(60));
        let d = secs(retry_after(429, Some(&in_a_minute))).expect("an HTTP-date");
        assert!((55..=60).contains(&d), "{d}");
        let past = "Wed, 21 Oct 2015 07:28:00 GMT";
        assert_eq!(secs(retry_after(503, Some(past))), Some(0));
    }

    /// The longest waits stay within what a deadline and a NATS redelivery delay can hold: the
    /// reply path adds the backoff to `Instant::now()`, which panics past it.
    #[test]
    fn waits_never_pass_the_longest_duration() {
        let p = DeliveryPolicy {
            delay: LONGEST,
            backoff: BackoffPolicy::Exponential,
            ..Default::default()
        };
        for n in [1, 2, 31, 200] {
            assert_eq!(p.backoff(n), LONGEST, "{n}");
            let _deadline = tokio::time::Instant::now() + p.backoff(n);
        }
        let forever = Duration::from_secs(u64::MAX);
        assert_eq!(p.wait(Some(AskedDelay::RetryAfter(forever)), 1), LONGEST);
        assert_eq!(p.wait(Some(AskedDelay::Exact(forever)), 1), LONGEST);
        assert_eq!(crate::nats::ack_wait(Some(LONGEST)), LONGEST);
    }

    #[test]
    fn retried_statuses() {
        for c in [404, 408, 409, 429, 500, 502, 503, 599] {
            assert!(is_retryable_status(c), "{c}");
        }
        for c in [200, 202, 400, 401, 403, 410, 413, 422] {
            assert!(!is_retryable_status(c), "{c}");
        }
    }
}
