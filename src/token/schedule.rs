//! Pure timing rules of the token lifecycle: when to refresh, until when a token may be injected,
//! and the backoff after failures. No I/O, so unit tests cover them without clocks.

use std::time::Duration;

/// Tokens are not injected during the last `margin` of their life, so a request never reaches the
/// upstream with a token that expires in flight: 30 s, or a tenth of very short lifetimes.
pub fn expiry_margin(lifetime: Duration) -> Duration {
    (lifetime / 10).min(Duration::from_secs(30))
}

/// How long after issue a token is refreshed: the earlier of half its lifetime and five minutes
/// before expiry, less up to 10% jitter (`jitter` in 0..=1) so that many proxies started together
/// do not refresh together. A 24 h token is refreshed after 10.8 h to 12 h.
pub fn refresh_after(lifetime: Duration, jitter: f64) -> Duration {
    let half = lifetime / 2;
    let base = match lifetime.checked_sub(Duration::from_secs(300)) {
        Some(before_expiry) if lifetime > Duration::from_secs(600) => half.min(before_expiry),
        _ => half,
    };
    base.mul_f64(1.0 - 0.1 * jitter.clamp(0.0, 1.0))
}

/// Exponential backoff with full jitter: attempt 0 waits about `initial`, doubling up to `max`.
/// `jitter` in 0..=1 picks a point between half and all of the nominal delay.
pub fn backoff(attempt: u32, initial: Duration, max: Duration, jitter: f64) -> Duration {
    let nominal = initial
        .checked_mul(1u32.checked_shl(attempt.min(30)).unwrap_or(u32::MAX))
        .unwrap_or(max)
        .min(max);
    nominal.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = 3600;

    #[test]
    fn day_token_refreshes_at_half_life() {
        let d = Duration::from_secs(24 * H);
        assert_eq!(refresh_after(d, 0.0), Duration::from_secs(12 * H));
        assert_eq!(
            refresh_after(d, 1.0),
            Duration::from_secs(12 * H).mul_f64(0.9)
        );
    }

    #[test]
    fn short_token_refreshes_five_minutes_before_expiry() {
        // 8 minutes: half (4 min) is earlier than expiry - 5 min (3 min)? No: 3 min is earlier.
        let d = Duration::from_secs(12 * 60);
        assert_eq!(refresh_after(d, 0.0), Duration::from_secs(6 * 60));
        let d = Duration::from_secs(11 * 60);
        assert_eq!(refresh_after(d, 0.0), Duration::from_secs(330));
    }

    #[test]
    fn tiny_lifetimes_use_half() {
        let d = Duration::from_secs(2);
        assert_eq!(refresh_after(d, 0.0), Duration::from_secs(1));
        assert!(refresh_after(d, 1.0) < expiry_deadline(d));
    }

    fn expiry_deadline(d: Duration) -> Duration {
        d - expiry_margin(d)
    }

    #[test]
    fn refresh_always_precedes_the_margin() {
        for secs in [1u64, 2, 10, 60, 599, 600, 601, 3600, 86400, 7 * 86400] {
            let d = Duration::from_secs(secs);
            for j in [0.0, 0.5, 1.0] {
                assert!(refresh_after(d, j) < expiry_deadline(d), "{secs}s {j}");
            }
        }
    }

    #[test]
    fn margin_is_bounded() {
        assert_eq!(
            expiry_margin(Duration::from_secs(86400)),
            Duration::from_secs(30)
        );
        assert_eq!(
            expiry_margin(Duration::from_secs(10)),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn backoff_doubles_to_the_cap() {
        let i = Duration::from_secs(1);
        let m = Duration::from_secs(300);
        assert_eq!(backoff(0, i, m, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(3, i, m, 1.0), Duration::from_secs(8));
        assert_eq!(backoff(20, i, m, 1.0), m);
        assert_eq!(backoff(u32::MAX, i, m, 1.0), m);
        assert_eq!(backoff(3, i, m, 0.0), Duration::from_secs(4));
    }
}
