//! Property tests of the GCRA token bucket: the `burst + rate*T` bound over every window, no
//! throttling of senders at or below the rate, and equality with a plain token-bucket model.

use gateway::limit::{self, Bucket};
use gateway_common::gcra::{GcraParams, NANOS_PER_SEC, Verdict};
use proptest::prelude::*;

/// Rates in requests per second, including fractional ones.
fn rate() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(0.5),
        Just(1.0),
        Just(3.0),
        Just(7.5),
        Just(1000.0),
        (1u32..5000).prop_map(|r| f64::from(r) / 100.0),
        (1u32..100_000).prop_map(f64::from),
    ]
}

/// Admission times of `gaps` (ns between requests) against a fresh bucket starting at `start`.
fn run(p: &GcraParams, start: u64, gaps: &[u64]) -> Vec<(u64, bool)> {
    let b = Bucket::new();
    let mut t = start;
    gaps.iter()
        .map(|g| {
            t += g;
            (t, matches!(b.acquire(p, t), Verdict::Allow(_)))
        })
        .collect()
}

/// A straightforward token bucket in integer "credit nanoseconds": capacity `burst * interval`,
/// one nanosecond of credit per nanosecond, one token costs `interval`; starts full.
struct Reference {
    interval: u64,
    cap: u64,
    level: u64,
    last: Option<u64>,
}

impl Reference {
    fn new(p: &GcraParams) -> Self {
        Reference {
            interval: p.interval_ns,
            cap: p.tolerance_ns,
            level: p.tolerance_ns,
            last: None,
        }
    }

    fn request(&mut self, t: u64) -> bool {
        if let Some(last) = self.last {
            self.level = self.cap.min(self.level.saturating_add(t - last));
        }
        self.last = Some(t);
        if self.level >= self.interval {
            self.level -= self.interval;
            true
        } else {
            false
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn never_more_than_burst_plus_rate_times_window(
        rate in rate(),
        burst in 1u64..40,
        start in 0u64..1_000_000_000_000_000_000,
        gap_fracs in prop::collection::vec(0u64..3000, 1..300),
    ) {
        let p = limit::params(rate, burst);
        let interval = p.interval_ns;
        // Gaps between 0 and 3x the emission interval, in thousandths of it.
        let gaps: Vec<u64> = gap_fracs.iter().map(|f| interval / 1000 * f).collect();
        let admitted: Vec<u64> = run(&p, start, &gaps)
            .into_iter()
            .filter_map(|(t, ok)| ok.then_some(t))
            .collect();
        for i in 0..admitted.len() {
            for j in i..admitted.len() {
                let n = (j - i + 1) as f64;
                let window = (admitted[j] - admitted[i]) as f64 / NANOS_PER_SEC as f64;
                prop_assert!(
                    n <= burst as f64 + rate * window + 1e-9,
                    "{n} admitted in {window}s at rate {rate} burst {burst}"
                );
            }
        }
    }

    #[test]
    fn steady_sender_at_or_below_rate_is_never_throttled(
        rate in rate(),
        burst in 1u64..40,
        start in 0u64..1_000_000_000_000_000_000,
        extra in prop::collection::vec(0u64..2_000_000, 1..300),
        initial_burst in 0u64..40,
    ) {
        let p = limit::params(rate, burst);
        // Gaps at least 1/rate seconds (in integer ns: at least ceil(1e9/rate)).
        let min_gap = (NANOS_PER_SEC as f64 / rate).ceil() as u64;
        // Optionally spend part of the full bucket first, all at once.
        let spend = initial_burst.min(burst - 1);
        let mut gaps = vec![0u64; spend as usize];
        gaps.extend(extra.iter().map(|e| min_gap + e));
        for (t, ok) in run(&p, start, &gaps) {
            prop_assert!(ok, "throttled at {t} with gaps >= {min_gap}ns");
        }
    }

    #[test]
    fn matches_reference_token_bucket(
        rate in rate(),
        burst in 1u64..40,
        start in 0u64..1_000_000_000_000_000_000,
        gap_fracs in prop::collection::vec(0u64..3000, 1..400),
    ) {
        let p = limit::params(rate, burst);
        let mut model = Reference::new(&p);
        let gaps: Vec<u64> = gap_fracs.iter().map(|f| p.interval_ns / 1000 * f).collect();
        for (t, ok) in run(&p, start, &gaps) {
            prop_assert_eq!(ok, model.request(t), "at {}", t);
        }
    }

    #[test]
    fn retry_after_is_exact(
        rate in rate(),
        burst in 1u64..10,
        start in 0u64..1_000_000_000_000_000,
    ) {
        let p = limit::params(rate, burst);
        let b = Bucket::new();
        for _ in 0..burst {
            prop_assert!(matches!(b.acquire(&p, start), Verdict::Allow(_)));
        }
        let Verdict::Deny(wait) = b.acquire(&p, start) else {
            return Err(TestCaseError::fail("bucket should be empty"));
        };
        prop_assert!(matches!(b.peek(&p, start + wait - 1), Verdict::Deny(_)));
        prop_assert!(matches!(b.peek(&p, start + wait), Verdict::Allow(_)));
    }
}
