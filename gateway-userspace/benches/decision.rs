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

/// One key's state alone in a cache line.
#[derive(Default)]
#[repr(align(64))]
struct Line {
    word: AtomicU64,
}

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

/// Every key's value, rendered once into one buffer in a random order (a fixed-width record
/// each), so a decision reads its value from memory that streams in order, as a proxy has the
/// value hot in the request it just parsed, while the key's tables are read at random.
struct Values {
    buf: Vec<u8>,
    width: usize,
    next: usize,
}

impl Values {
    fn shuffled() -> Self {
        let width = value(0).len();
        let mut order: Vec<usize> = (0..KEYS).collect();
        // xorshift64*: a fixed seed so runs compare.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for i in (1..KEYS).rev() {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let j = (x.wrapping_mul(0x2545_F491_4F6C_DD1D) % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        let mut buf = Vec::with_capacity(KEYS * width);
        for i in order {
            buf.extend_from_slice(value(i).as_bytes());
        }
        Values {
            buf,
            width,
            next: 0,
        }
    }

    /// The next value in the shuffled order (wrapping around).
    fn next(&mut self) -> &str {
        let at = self.next * self.width;
        self.next += 1;
        if self.next == KEYS {
            self.next = 0;
        }
        std::str::from_utf8(&self.buf[at..at + self.width]).unwrap_or("")
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

    let mut values = Values::shuffled();
    let seven = value(7);
    let route = engine
        .resolve(None, "prod", "GET", "/pets/1")
        .expect("route");
    let allocs_before = ALLOCS.load(Ordering::SeqCst);
    for _ in 0..100_000 {
        assert!(engine.decide(&route, Some(values.next())).is_allowed());
    }
    let per = (ALLOCS.load(Ordering::SeqCst) - allocs_before) as f64 / 100_000.0;
    println!("heap allocations per decision: {per}");

    let mut c = Criterion::default().configure_from_args();
    let mut g = c.benchmark_group("decision");
    g.throughput(Throughput::Elements(1));
    g.bench_function("random_key_of_1M", |b| {
        b.iter(|| black_box(engine.decide(&route, Some(values.next()))))
    });
    // The floor under any design: hash the value with a keyed hash, then update one atomic word
    // in that key's own cache line of a 1M-line table (no index, no configuration).
    let lines: Vec<Line> = (0..KEYS).map(|_| Line::default()).collect();
    let (k0, k1): (u64, u64) = (rand::random(), rand::random());
    g.bench_function("floor_hash_and_one_atomic_update", |b| {
        b.iter(|| {
            use siphasher::sip128::{Hasher128, SipHasher13};
            use std::hash::Hasher;
            let mut h = SipHasher13::new_with_keys(k0, k1);
            h.write(values.next().as_bytes());
            let d = h.finish128();
            let line = &lines[(d.h1 % KEYS as u64) as usize];
            black_box(line.word.fetch_add(1, Ordering::AcqRel))
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
