//! At most one WARN line a second for each place that logs a per-request upstream failure. During
//! an outage every request fails the same way: hundreds of identical lines a second would bury
//! everything else and fill the disk of a sidecar left alone for months. The first line of a burst
//! is written at once; the next one, a second later at the earliest, says how many were left out
//! (`suppressed`). The metrics count every event.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// The gap between two lines of one call site.
const GAP_MS: u64 = 1000;

pub struct Throttle {
    /// Milliseconds since [`start`] before which no line is written.
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

fn start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

impl Throttle {
    pub const fn new() -> Throttle {
        Throttle {
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines left out since the last one)` when a line may be written now.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(start().elapsed().as_millis() as u64)
    }

    fn allow_at(&self, now_ms: u64) -> Option<u64> {
        let next = self.next_ms.load(Ordering::Relaxed);
        if now_ms >= next
            && self
                .next_ms
                .compare_exchange(next, now_ms + GAP_MS, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new()
    }
}

/// `tracing::warn!` at most once a second for this call site, with a `suppressed` field.
macro_rules! warn_throttled {
    ($($arg:tt)+) => {{
        static THROTTLE: $crate::telemetry::throttle::Throttle =
            $crate::telemetry::throttle::Throttle::new();
        if let Some(suppressed) = THROTTLE.allow() {
            tracing::warn!(suppressed, $($arg)+);
        }
    }};
}
pub(crate) use warn_throttled;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_second_and_the_count_of_the_rest() {
        let t = Throttle::new();
        assert_eq!(
            t.allow_at(5_000),
            Some(0),
            "the first line goes out at once"
        );
        for ms in [5_001, 5_500, 5_999] {
            assert_eq!(t.allow_at(ms), None);
        }
        assert_eq!(
            t.allow_at(6_000),
            Some(3),
            "a second later, with the lines left out"
        );
        assert_eq!(t.allow_at(6_001), None);
        assert_eq!(t.allow_at(60_000), Some(1));
        assert_eq!(t.allow_at(60_000), None);
    }
}
