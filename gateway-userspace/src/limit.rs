//! Throttling: lock-free GCRA buckets and the layered check of AWS's throttle order.
//!
//! This module owns the conversion of AWS throttle settings (`rateLimit` rps as a double,
//! `burstLimit` requests) into integer [`GcraParams`], the per-bucket atomic state ([`Bucket`],
//! one `AtomicU64` TAT, 8 bytes) and [`Layers`], the ordered set of buckets one request must pass:
//! plan per-method, plan, stage per-method (or `*/*`), account ([`Layer`]).
//!
//! Semantics (AWS's token bucket): capacity `burstLimit`, refill `rateLimit` tokens/s, starts full,
//! one request takes one token. Over any window of length `T` a bucket admits at most
//! `burst + rate*T` requests; a sender whose gaps are all `>= 1/rate` seconds is never throttled.
//! The arithmetic is [`gateway_common::gcra`], integer nanoseconds, division-free per request.
//!
//! Layer atomicity — a request rejected by a later layer must not use up tokens of the layers that
//! admitted it. [`Layers::peek`] first checks every layer without changing anything; only if all
//! would admit does [`Layers::commit`] take the tokens, one compare-and-swap per bucket, in order.
//! If a bucket changed between peek and commit so that it now rejects (a race with another thread),
//! the tokens already taken in this commit are given back with [`gcra::refund`]. Single-threaded
//! the result is exact; under contention a refund can at most restore a token that had already
//! been refilled meanwhile, i.e. at most one extra admission per lost race, and only when a bucket
//! was within one token of full at that moment.
//!
//! Clock steps: buckets keep TATs on the engine's wall clock. When that clock is stepped backwards
//! (an NTP correction, a virtual machine resumed from a snapshot) every TAT written before the
//! step lies in the future by the size of the step, and read naively every bucket, the account
//! bucket included, would reject everything until the clock caught up again. A TAT can never lie
//! more than `tolerance` ahead of the clock that wrote it, so one that lies more than
//! [`CLOCK_STEP_NS`] beyond that is taken as a step: [`Layers::rewind`] restarts such a bucket
//! empty at the current time, and its next token comes one emission interval later. Restarting it
//! empty (not full) keeps the bound `burst + rate*T` on the real timeline. Steps shorter than
//! [`CLOCK_STEP_NS`] are absorbed as a pause of at most that length.

use std::sync::atomic::{AtomicU64, Ordering};

use gateway_common::gcra::{self, GcraParams, NANOS_PER_SEC, Verdict};

/// Converts an AWS rate (requests per second, fractions allowed) and burst (requests) into GCRA
/// parameters. Negative or non-finite rates and zero bursts block everything; the emission
/// interval is rounded up so the effective rate never exceeds `rate`.
pub fn params(rate: f64, burst: u64) -> GcraParams {
    if !rate.is_finite() || rate <= 0.0 || burst == 0 {
        return GcraParams::BLOCK_ALL;
    }
    let exact = NANOS_PER_SEC as f64 / rate;
    if exact >= u64::MAX as f64 {
        return GcraParams::BLOCK_ALL;
    }
    let mut interval = exact.ceil() as u64;
    // Guard against the float division landing one ulp above an exact integer.
    if interval > 1 && ((interval - 1) as f64) * rate >= NANOS_PER_SEC as f64 {
        interval -= 1;
    }
    GcraParams::from_interval(interval.max(1), burst)
}

/// How far beyond `now + tolerance` a TAT may lie before [`Bucket::rewind`] takes it for a clock
/// that went backwards. Threads read the clock at slightly different instants, so a TAT a little
/// past `now + tolerance` is normal under contention; one a whole second past it is not.
pub const CLOCK_STEP_NS: u64 = NANOS_PER_SEC;

/// A throttle layer, in AWS's order of application.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Layer {
    /// `apiStages[].throttle["/path/METHOD"]` of the key's usage plan (per key).
    PlanMethod,
    /// `throttle` of the key's usage plan (per key, across all stages of the plan).
    Plan,
    /// Stage `methodSettings` for the method, or `*/*` (shared by all clients).
    StageMethod,
    /// Account throttle (shared by every request).
    Account,
}

impl Layer {
    /// Short name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Layer::PlanMethod => "plan_method",
            Layer::Plan => "plan",
            Layer::StageMethod => "stage_method",
            Layer::Account => "account",
        }
    }
}

/// One bucket's state: the theoretical arrival time in nanoseconds. `0` is a full bucket.
#[derive(Debug, Default)]
pub struct Bucket {
    tat: AtomicU64,
}

impl Bucket {
    /// A full bucket.
    pub const fn new() -> Self {
        Bucket {
            tat: AtomicU64::new(0),
        }
    }

    /// The stored TAT (ns).
    pub fn tat(&self) -> u64 {
        self.tat.load(Ordering::Acquire)
    }

    /// Overwrites the TAT (ns); used when restoring state.
    pub fn set_tat(&self, tat: u64) {
        self.tat.store(tat, Ordering::Release);
    }

    /// What a request at `now` would get, without taking a token.
    pub fn peek(&self, p: &GcraParams, now: u64) -> Verdict {
        gcra::check(p, self.tat(), now)
    }

    /// Takes one token if available (lock-free CAS loop). Returns the verdict.
    pub fn acquire(&self, p: &GcraParams, now: u64) -> Verdict {
        if p.is_unlimited() {
            return Verdict::Allow(now);
        }
        let mut cur = self.tat.load(Ordering::Acquire);
        loop {
            match gcra::check(p, cur, now) {
                Verdict::Allow(next) => {
                    match self.tat.compare_exchange_weak(
                        cur,
                        next,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    ) {
                        Ok(_) => return Verdict::Allow(next),
                        Err(actual) => cur = actual,
                    }
                }
                deny => return deny,
            }
        }
    }

    /// Gives back one token taken at about `now` (see [`gcra::refund`]).
    pub fn refund(&self, p: &GcraParams, now: u64) {
        if p.is_unlimited() {
            return;
        }
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                Some(gcra::refund(p, cur, now))
            });
    }

    /// Restarts the bucket empty at `now` if its TAT lies more than [`CLOCK_STEP_NS`] beyond
    /// `now + tolerance`, which no admission can leave behind: the clock went backwards since
    /// it was written. Returns whether it did. Pass a freshly read `now`; a stale one could
    /// take another thread's newer admission for a step.
    pub fn rewind(&self, p: &GcraParams, now: u64) -> bool {
        if p.is_unlimited() {
            return false;
        }
        let empty = now.saturating_add(p.tolerance_ns);
        let latest = empty.saturating_add(CLOCK_STEP_NS);
        self.tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                (cur > latest).then_some(empty)
            })
            .is_ok()
    }

    /// Whole tokens left at `now` and nanoseconds until the bucket is full again.
    pub fn status(&self, p: &GcraParams, now: u64) -> (u64, u64) {
        let tat = self.tat();
        let tokens = match p.interval_ns {
            0 => u64::MAX,
            i => gcra::tokens_scaled(p, tat, now) / i,
        };
        (tokens, gcra::until_full(tat, now))
    }
}

/// A throttle layer rejected the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// The first rejecting layer in AWS's order.
    pub layer: Layer,
    /// Nanoseconds until every rejecting layer would admit (max over them); `u64::MAX` = never.
    pub retry_after_ns: u64,
}

/// Up to four (layer, params, bucket) checks for one request, in AWS's order.
#[derive(Debug, Default)]
pub struct Layers<'a> {
    items: [Option<(Layer, GcraParams, &'a Bucket)>; 4],
    len: usize,
}

impl<'a> Layers<'a> {
    /// No layers.
    pub fn new() -> Self {
        Layers {
            items: [None; 4],
            len: 0,
        }
    }

    /// Appends a layer; unlimited layers are skipped, more than four are ignored.
    pub fn push(&mut self, layer: Layer, params: GcraParams, bucket: &'a Bucket) {
        if params.is_unlimited() || self.len == self.items.len() {
            return;
        }
        self.items[self.len] = Some((layer, params, bucket));
        self.len += 1;
    }

    /// Number of active layers.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no layer applies.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn iter(&self) -> impl Iterator<Item = &(Layer, GcraParams, &'a Bucket)> {
        self.items[..self.len].iter().flatten()
    }

    /// Checks every layer without taking tokens.
    pub fn peek(&self, now: u64) -> Result<(), Rejected> {
        let mut rejected: Option<Rejected> = None;
        for (layer, p, b) in self.iter() {
            if let Verdict::Deny(wait) = b.peek(p, now) {
                match rejected.as_mut() {
                    None => {
                        rejected = Some(Rejected {
                            layer: *layer,
                            retry_after_ns: wait,
                        })
                    }
                    Some(r) => r.retry_after_ns = r.retry_after_ns.max(wait),
                }
            }
        }
        rejected.map_or(Ok(()), Err)
    }

    /// Takes one token from every layer, in order; on a (racy) rejection gives back the tokens
    /// taken so far and reports that layer.
    pub fn commit(&self, now: u64) -> Result<(), Rejected> {
        for (i, (layer, p, b)) in self.iter().enumerate() {
            if let Verdict::Deny(wait) = b.acquire(p, now) {
                for (_, p2, b2) in self.iter().take(i) {
                    b2.refund(p2, now);
                }
                return Err(Rejected {
                    layer: *layer,
                    retry_after_ns: wait,
                });
            }
        }
        Ok(())
    }

    /// Gives back the token of every layer (after a successful commit that must be undone).
    pub fn refund(&self, now: u64) {
        for (_, p, b) in self.iter() {
            b.refund(p, now);
        }
    }

    /// [`Bucket::rewind`] on every layer; whether any bucket was restarted.
    pub fn rewind(&self, now: u64) -> bool {
        self.iter()
            .fold(false, |any, (_, p, b)| b.rewind(p, now) | any)
    }

    /// `peek` then `commit`: the whole layered decision for one request.
    pub fn acquire(&self, now: u64) -> Result<(), Rejected> {
        self.peek(now)?;
        self.commit(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = NANOS_PER_SEC;

    #[test]
    fn params_round_up_and_block() {
        assert_eq!(params(0.5, 1).interval_ns, 2 * S);
        assert_eq!(params(10_000.0, 5_000).interval_ns, 100_000);
        assert_eq!(params(3.0, 1).interval_ns, 333_333_334);
        assert!(params(0.0, 10).is_block_all());
        assert!(params(-1.0, 10).is_block_all());
        assert!(params(f64::NAN, 10).is_block_all());
        assert!(params(5.0, 0).is_block_all());
        assert!(params(1e-30, 1).is_block_all());
    }

    #[test]
    fn later_rejection_keeps_earlier_tokens() {
        let plan = Bucket::new();
        let account = Bucket::new();
        let pp = params(1.0, 2);
        let pa = params(1.0, 1);
        let mut l = Layers::new();
        l.push(Layer::Plan, pp, &plan);
        l.push(Layer::Account, pa, &account);
        let now = 100 * S;
        assert!(l.acquire(now).is_ok());
        let r = l.acquire(now).expect_err("account empty");
        assert_eq!(r.layer, Layer::Account);
        assert_eq!(r.retry_after_ns, S);
        // The plan bucket still holds its second token.
        assert_eq!(plan.status(&pp, now).0, 1);
    }

    #[test]
    fn commit_race_refunds_earlier_layers() {
        let a = Bucket::new();
        let b = Bucket::new();
        let p = params(1.0, 1);
        let mut l = Layers::new();
        l.push(Layer::Plan, p, &a);
        l.push(Layer::StageMethod, p, &b);
        let now = 10 * S;
        assert!(l.peek(now).is_ok());
        // Another thread drains `b` between peek and commit.
        assert!(matches!(b.acquire(&p, now), Verdict::Allow(_)));
        let r = l.commit(now).expect_err("b is empty now");
        assert_eq!(r.layer, Layer::StageMethod);
        assert_eq!(a.status(&p, now).0, 1, "token of layer a given back");
    }

    #[test]
    fn clock_step_back_restarts_bucket_empty() {
        let b = Bucket::new();
        let p = params(10.0, 5);
        let t = 10_000 * S;
        for _ in 0..5 {
            assert!(matches!(b.acquire(&p, t), Verdict::Allow(_)));
        }
        // The clock is stepped back an hour: the TAT now lies an hour ahead of it.
        let back = t - 3_600 * S;
        assert!(matches!(b.peek(&p, back), Verdict::Deny(w) if w > 3_600 * S));
        assert!(b.rewind(&p, back));
        assert!(!b.rewind(&p, back), "a rewound bucket is left alone");
        // Empty, not full: the next token comes one interval (100 ms) later.
        assert_eq!(b.status(&p, back).0, 0);
        assert_eq!(b.peek(&p, back), Verdict::Deny(p.interval_ns));
        assert!(matches!(
            b.acquire(&p, back + p.interval_ns),
            Verdict::Allow(_)
        ));
        assert!(matches!(
            b.acquire(&p, back + p.interval_ns),
            Verdict::Deny(_)
        ));
    }

    #[test]
    fn newer_admission_of_another_thread_is_not_a_clock_step() {
        let b = Bucket::new();
        let p = params(10.0, 5);
        let t = 1_000 * S;
        for _ in 0..5 {
            b.acquire(&p, t);
        }
        // A thread whose reading is 900 ms older than the one that emptied the bucket.
        let stale = t - 900 * 1_000_000;
        assert!(!b.rewind(&p, stale));
        assert_eq!(b.tat(), t + p.tolerance_ns);
        // Layers rewind only the layers that were stepped over.
        let fresh = Bucket::new();
        let mut l = Layers::new();
        l.push(Layer::Plan, p, &b);
        l.push(Layer::Account, p, &fresh);
        assert!(!l.rewind(stale));
        assert!(l.rewind(t - 3 * S));
        assert_eq!(fresh.tat(), 0);
        assert_eq!(b.tat(), t - 3 * S + p.tolerance_ns);
    }

    #[test]
    fn first_rejecting_layer_reported_with_longest_wait() {
        let a = Bucket::new();
        let b = Bucket::new();
        let pa = params(1.0, 1);
        let pb = params(0.5, 1);
        let now = 10 * S;
        a.acquire(&pa, now);
        b.acquire(&pb, now);
        let mut l = Layers::new();
        l.push(Layer::PlanMethod, pa, &a);
        l.push(Layer::Account, pb, &b);
        let r = l.acquire(now).expect_err("both empty");
        assert_eq!(r.layer, Layer::PlanMethod);
        assert_eq!(r.retry_after_ns, 2 * S);
    }
}
