//! 8 threads hammer one key for 2 s on the real clock; the plan bucket must admit within one
//! request of `burst + rate * T`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gateway::clock::{Clock, SystemClock};
use gateway::engine::{Decision, Engine};
use gateway::limit::Layer;
use gateway::plan::{ApiKey, Model, RestApi, Stage, UsagePlan};
use gateway::store::MemoryStore;

/// The system clock, remembering the first and last reading.
#[derive(Default)]
struct Recording {
    first: AtomicU64,
    last: AtomicU64,
}

impl Clock for Recording {
    fn now(&self) -> u64 {
        let t = SystemClock.now();
        let _ = self
            .first
            .compare_exchange(0, t, Ordering::SeqCst, Ordering::SeqCst);
        self.last.fetch_max(t, Ordering::SeqCst);
        t
    }
}

#[test]
fn eight_threads_on_one_key_admit_burst_plus_rate_times_t() {
    let rate = 500.0;
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
    let expected = burst as f64 + rate * t;
    let got = admitted.load(Ordering::SeqCst) as f64;
    assert!(
        rejected.load(Ordering::SeqCst) > 1000,
        "the key was really hammered"
    );
    assert!(
        (got - expected).abs() <= 1.0,
        "admitted {got}, expected {expected:.2} (T = {t:.4}s)"
    );
}
