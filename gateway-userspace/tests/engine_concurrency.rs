//! 8 threads hammer one key for 2 s on the real clock; the plan bucket must admit within one
//! request of `burst + rate * T`.
//!
//! The bound assumes demand never pauses. When the machine starves every thread at once for
//! longer than one emission interval, a full bucket caps its refill and fewer requests are
//! admitted: such a run did not test the bound, and is repeated (at most three times). Admitting
//! more than the bound always fails.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gateway::clock::{Clock, SystemClock};
use gateway::engine::{Decision, Engine};
use gateway::limit::Layer;
use gateway::plan::{ApiKey, Model, RestApi, Stage, UsagePlan};
use gateway::store::MemoryStore;

/// The system clock, remembering the first and last reading and the longest time between two
/// readings (a pause in demand).
#[derive(Default)]
struct Recording {
    first: AtomicU64,
    last: AtomicU64,
    previous: AtomicU64,
    longest_pause: AtomicU64,
}

impl Clock for Recording {
    fn now(&self) -> u64 {
        let t = SystemClock.now();
        let _ = self
            .first
            .compare_exchange(0, t, Ordering::SeqCst, Ordering::SeqCst);
        self.last.fetch_max(t, Ordering::SeqCst);
        let previous = self.previous.swap(t, Ordering::SeqCst);
        if previous != 0 && t > previous {
            self.longest_pause.fetch_max(t - previous, Ordering::SeqCst);
        }
        t
    }
}

/// What one run admitted, what the bound says, and the longest pause in demand (ns).
struct Run {
    got: f64,
    expected: f64,
    t: f64,
    rejected: u64,
    longest_pause: u64,
}

#[test]
fn eight_threads_on_one_key_admit_burst_plus_rate_times_t() {
    let rate = 500.0;
    let interval_ns = (1e9 / rate) as u64;
    for attempt in 1..=3 {
        let r = run(rate);
        assert!(r.rejected > 1000, "the key was really hammered");
        assert!(
            r.got <= r.expected + 1.0,
            "admitted {}, more than {:.2} + 1 (T = {:.4}s)",
            r.got,
            r.expected,
            r.t
        );
        if r.got >= r.expected - 1.0 {
            return;
        }
        assert!(
            r.longest_pause > interval_ns && attempt < 3,
            "admitted {}, expected {:.2} (T = {:.4}s, longest pause in demand {} us)",
            r.got,
            r.expected,
            r.t,
            r.longest_pause / 1000
        );
        eprintln!(
            "attempt {attempt}: every thread paused for {} us (machine busy); admitted {} of {:.2}, running again",
            r.longest_pause / 1000,
            r.got,
            r.expected
        );
    }
}

fn run(rate: f64) -> Run {
    let burst = 50;
    let value = "concurrency-test-key-value";
    let model = Model::new()
        .api(RestApi::proxy("a1", "http://up").stage(Stage::new("prod")))
        .plan(
            UsagePlan::new("p1", "p")
                .stage("a1", "prod")
                .throttle(rate, burst),
        )
        .key(ApiKey::new("k1", value))
        .plan_key("p1", "k1")
        .account_throttle(1_000_000.0, 1_000_000);
    let clock = Arc::new(Recording::default());
    let engine =
        Arc::new(Engine::new(model, Arc::new(MemoryStore::new()), clock.clone()).expect("engine"));
    let route = engine.resolve(None, "prod", "GET", "/x").expect("route");
    let admitted = Arc::new(AtomicU64::new(0));
    let rejected = Arc::new(AtomicU64::new(0));
    // T starts at the first decision, not at engine construction: the bucket is full
    // either way, and thread start-up must not count as time the key could have used.
    clock.first.store(0, Ordering::SeqCst);
    clock.previous.store(0, Ordering::SeqCst);
    clock.longest_pause.store(0, Ordering::SeqCst);
    let stop_at = Instant::now() + Duration::from_secs(2);
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (engine, route, admitted, rejected) = (
                engine.clone(),
                route.clone(),
                admitted.clone(),
                rejected.clone(),
            );
            std::thread::spawn(move || {
                while Instant::now() < stop_at {
                    match engine.decide(&route, Some(value)) {
                        Decision::Allow { .. } => admitted.fetch_add(1, Ordering::Relaxed),
                        Decision::Throttled {
                            layer: Layer::Plan, ..
                        } => rejected.fetch_add(1, Ordering::Relaxed),
                        d => panic!("unexpected {d:?}"),
                    };
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    let t = (clock.last.load(Ordering::SeqCst) - clock.first.load(Ordering::SeqCst)) as f64 / 1e9;
    Run {
        got: admitted.load(Ordering::SeqCst) as f64,
        expected: burst as f64 + rate * t,
        t,
        rejected: rejected.load(Ordering::SeqCst),
        longest_pause: clock.longest_pause.load(Ordering::SeqCst),
    }
}
