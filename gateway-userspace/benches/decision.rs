//! One `Engine::decide` for a random key among 1,000,000 keys, and the memory per key.
//!
//! Run: `cargo bench -p gateway-userspace --bench decision`. Before the timing it prints the live
//! heap bytes per key, measured with a counting global allocator: the model snapshot (what the
//! admin API holds) and the engine's runtime tables and counters on top of it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use criterion::{Criterion, Throughput};
use gateway::clock::{Clock, SystemClock};
use gateway::engine::Engine;
use gateway::plan::{ApiKey, Model, QuotaPeriod, RestApi, Stage, UsagePlan, UsagePlanKey};
use gateway::store::MemoryStore;

/// Counts live heap bytes and allocation calls.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments unchanged and only adds
// bookkeeping on atomics, so `System`'s guarantees carry over.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const KEYS: usize = 1_000_000;

fn value(i: usize) -> String {
    format!("bench-api-key-value-{i:020}")
}

fn model() -> Model {
    let mut m = Model::new()
        .api(
            RestApi::proxy("a1", "http://127.0.0.1:9000").stage(Stage::new("prod").throttle(
                "*/*",
                1e9,
                1_000_000_000,
            )),
        )
        .plan(
            UsagePlan::new("p1", "bench")
                .stage("a1", "prod")
                .throttle(1e6, 1_000_000)
                .quota(2_000_000_000, QuotaPeriod::Month),
        )
        .account_throttle(1e9, 1_000_000_000);
    m.api_keys.reserve_exact(KEYS);
    m.usage_plan_keys.reserve_exact(KEYS);
    for i in 0..KEYS {
        let id = format!("{i:010}");
        m.usage_plan_keys.push(UsagePlanKey {
            usage_plan_id: "p1".into(),
            key_id: id.clone(),
        });
        m.api_keys.push(ApiKey::new(id, value(i)));
    }
    m
}

/// `value(i)` rendered in place.
struct ValueBuf {
    buf: Vec<u8>,
}

impl ValueBuf {
    fn new() -> Self {
        ValueBuf {
            buf: value(0).into_bytes(),
        }
    }

    fn get(&mut self, mut i: usize) -> &str {
        let digits = self.buf.len() - 20;
        for b in self.buf[digits..].iter_mut().rev() {
            *b = b'0' + (i % 10) as u8;
            i /= 10;
        }
        std::str::from_utf8(&self.buf).unwrap_or("")
    }
}

fn main() {
    let before = LIVE.load(Ordering::SeqCst);
    let m = model();
    let with_model = LIVE.load(Ordering::SeqCst);
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let engine = Engine::new(m, Arc::new(MemoryStore::new()), clock).expect("valid model");
    let with_engine = LIVE.load(Ordering::SeqCst);
    let model_b = (with_model - before) as f64 / KEYS as f64;
    let engine_b = (with_engine - with_model) as f64 / KEYS as f64;
    println!("keys: {KEYS}");
    println!(
        "bytes per key, engine runtime (lookup tables + buckets + quota counters): {engine_b:.1}"
    );
    println!(
        "bytes per key, model snapshot (ApiKey + UsagePlanKey structs and strings): {model_b:.1}"
    );
    println!("bytes per key, total: {:.1}", engine_b + model_b);

    // The value is written into a reused buffer per decision, as a proxy has it hot in the
    // request header; a Vec of 1M Strings would add two cold loads that production doesn't have.
    let mut values = ValueBuf::new();
    let seven = value(7);
    let route = engine
        .resolve(None, "prod", "GET", "/pets/1")
        .expect("route");
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        // xorshift64*: a random key per decision so the tables are read cold, as in production.
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) % KEYS as u64) as usize
    };
    let allocs_before = ALLOCS.load(Ordering::SeqCst);
    for _ in 0..100_000 {
        let i = next();
        assert!(engine.decide(&route, Some(values.get(i))).is_allowed());
    }
    let per = (ALLOCS.load(Ordering::SeqCst) - allocs_before) as f64 / 100_000.0;
    println!("heap allocations per decision: {per}");

    let mut c = Criterion::default().configure_from_args();
    let mut g = c.benchmark_group("decision");
    g.throughput(Throughput::Elements(1));
    g.bench_function("random_key_of_1M", |b| {
        b.iter(|| {
            let i = next();
            black_box(engine.decide(&route, Some(values.get(i))))
        })
    });
    g.bench_function("same_key", |b| {
        b.iter(|| black_box(engine.decide(&route, Some(&seven))))
    });
    g.bench_function("unknown_key", |b| {
        b.iter(|| black_box(engine.decide(&route, Some("no-such-key-value-000000000000000000"))))
    });
    g.finish();
    c.final_summary();
}
