//! Generic cell rate algorithm (GCRA) in integer nanoseconds, shared by the engine and the XDP program.
//!
//! A token bucket of capacity `burst` refilled at `rate` tokens per second is stored as a single
//! number, the *theoretical arrival time* (TAT, nanoseconds on the caller's clock): the instant at
//! which the bucket would be full again. A TAT at or before `now` means a full bucket, so the zero
//! state (`tat = 0`) is a full bucket and a fresh key starts with `burst` tokens.
//!
//! With `interval` = nanoseconds per token (`1e9 / rate`) and `tolerance` = `burst * interval`, a
//! request at `now` is admitted when `max(tat, now) + interval - now <= tolerance`, and then the
//! TAT becomes `max(tat, now) + interval`. This is exactly a token bucket holding
//! `(now + tolerance - max(tat, now)) / interval` tokens.
//!
//! Invariants the rest of the gateway relies on:
//! - The per-request functions ([`check`], [`refund`], [`tokens_scaled`]) never divide, never
//!   use floats and never overflow (all arithmetic saturates), so the XDP program can call them.
//! - `interval` is rounded **up** when converting a rate, so the effective rate never exceeds the
//!   configured one: over any window of length `T` at most `burst + T / interval <= burst + rate*T`
//!   requests are admitted. A sender whose gaps are all at least `1e9 / rate` ns (hence, in
//!   integer nanoseconds, at least `interval`) is never rejected once the bucket has one token.
//! - `interval == 0` means "unlimited" (every request passes and the TAT never moves past `now`).
//! - [`GcraParams::BLOCK_ALL`] (`interval = u64::MAX`, `tolerance = 0`) rejects every request; it
//!   is what a zero rate or a zero burst converts to.
//!
//! Precision: `interval` is an integer number of nanoseconds, so the effective rate is
//! `1e9 / ceil(1e9 / rate)`. The relative error is below `rate / 1e9` (under 1e-5 for rates up to
//! 10,000 rps) and always errs on the strict side.

/// Nanoseconds per second.
pub const NANOS_PER_SEC: u64 = 1_000_000_000;

/// Precomputed parameters of one bucket. Plain integers so the struct can live in a BPF map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GcraParams {
    /// Nanoseconds per token (emission interval, `ceil(1e9 / rate)`). `0` means unlimited.
    pub interval_ns: u64,
    /// Nanoseconds of credit a full bucket holds: `burst * interval_ns` (saturating).
    pub tolerance_ns: u64,
}

const _: () = assert!(core::mem::size_of::<GcraParams>() == 16);

#[cfg(feature = "user")]
// SAFETY: `GcraParams` is `#[repr(C)]`, `Copy`, made of two `u64` (no padding) and every bit
// pattern is valid.
unsafe impl aya::Pod for GcraParams {}

impl GcraParams {
    /// Parameters that admit every request.
    pub const UNLIMITED: GcraParams = GcraParams {
        interval_ns: 0,
        tolerance_ns: 0,
    };

    /// Parameters that reject every request.
    pub const BLOCK_ALL: GcraParams = GcraParams {
        interval_ns: u64::MAX,
        tolerance_ns: 0,
    };

    /// Builds parameters from an exact emission interval (ns per token) and a burst (tokens).
    ///
    /// `burst == 0` or `interval_ns == u64::MAX` give [`GcraParams::BLOCK_ALL`]; `interval_ns == 0`
    /// gives [`GcraParams::UNLIMITED`].
    pub const fn from_interval(interval_ns: u64, burst: u64) -> GcraParams {
        if interval_ns == 0 {
            return GcraParams::UNLIMITED;
        }
        if burst == 0 || interval_ns == u64::MAX {
            return GcraParams::BLOCK_ALL;
        }
        GcraParams {
            interval_ns,
            tolerance_ns: interval_ns.saturating_mul(burst),
        }
    }

    /// Builds parameters from a rate given as the fraction `tokens / per_ns` (tokens per
    /// nanosecond) and a burst. The interval is `ceil(per_ns / tokens)`.
    ///
    /// `tokens == 0` (a zero rate) blocks everything, as does `burst == 0`. This function divides,
    /// so call it when loading configuration, never per request.
    pub const fn from_ratio(tokens: u64, per_ns: u64, burst: u64) -> GcraParams {
        if tokens == 0 || burst == 0 {
            return GcraParams::BLOCK_ALL;
        }
        let interval = per_ns.div_ceil(tokens);
        // A rate above one token per nanosecond is indistinguishable from unlimited here; keep
        // it limited at the finest granularity instead of silently switching the bucket off.
        let interval = if interval == 0 { 1 } else { interval };
        GcraParams::from_interval(interval, burst)
    }

    /// Whether these parameters admit every request.
    pub const fn is_unlimited(&self) -> bool {
        self.interval_ns == 0
    }

    /// Whether these parameters reject every request.
    pub const fn is_block_all(&self) -> bool {
        self.interval_ns != 0 && self.tolerance_ns < self.interval_ns
    }
}

/// Outcome of [`check`]: the TAT to store on admission, or how long to wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Admitted; store this TAT (nanoseconds).
    Allow(u64),
    /// Rejected; the same request would be admitted `retry_after_ns` nanoseconds from `now`
    /// (`u64::MAX` when it never would, e.g. [`GcraParams::BLOCK_ALL`]).
    Deny(u64),
}

/// Decides one request of one token at `now_ns` against a bucket whose TAT is `tat_ns`.
///
/// Pure, division-free, saturating. The caller stores the returned TAT (e.g. with a
/// compare-and-swap on the old value) only when the request is admitted.
#[inline]
pub const fn check(params: &GcraParams, tat_ns: u64, now_ns: u64) -> Verdict {
    let base = if tat_ns > now_ns { tat_ns } else { now_ns };
    let new_tat = match base.checked_add(params.interval_ns) {
        Some(t) => t,
        // Only reachable for BLOCK_ALL or a clock at the end of time: never admit.
        None => return Verdict::Deny(u64::MAX),
    };
    let needed = new_tat - now_ns; // new_tat >= base >= now_ns
    if needed <= params.tolerance_ns {
        Verdict::Allow(new_tat)
    } else if params.interval_ns == u64::MAX {
        Verdict::Deny(u64::MAX)
    } else {
        Verdict::Deny(needed - params.tolerance_ns)
    }
}

/// Gives back the token taken by an admission that turned out not to count (a later check
/// rejected the request). Returns the TAT to store.
///
/// Exact when the bucket has not become full in between (`tat_ns > now_ns`); otherwise the
/// token had already been refilled and nothing changes. The result is never moved below `now_ns`,
/// which keeps "full" represented canonically.
#[inline]
pub const fn refund(params: &GcraParams, tat_ns: u64, now_ns: u64) -> u64 {
    if tat_ns <= now_ns {
        return tat_ns;
    }
    let back = tat_ns.saturating_sub(params.interval_ns);
    if back > now_ns { back } else { now_ns }
}

/// Tokens currently in the bucket, scaled by `interval_ns` (i.e. nanoseconds of credit):
/// `tolerance - (max(tat, now) - now)`, saturating at zero. Divide by `interval_ns` in user space
/// to get whole tokens.
#[inline]
pub const fn tokens_scaled(params: &GcraParams, tat_ns: u64, now_ns: u64) -> u64 {
    let debt = tat_ns.saturating_sub(now_ns);
    params.tolerance_ns.saturating_sub(debt)
}

/// Nanoseconds from `now_ns` until the bucket is full again (`0` when it is full).
#[inline]
pub const fn until_full(tat_ns: u64, now_ns: u64) -> u64 {
    tat_ns.saturating_sub(now_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_full_and_admits_burst_then_denies() {
        let p = GcraParams::from_ratio(1, NANOS_PER_SEC, 3); // 1 rps, burst 3
        let now = 10 * NANOS_PER_SEC;
        let mut tat = 0;
        for _ in 0..3 {
            match check(&p, tat, now) {
                Verdict::Allow(t) => tat = t,
                Verdict::Deny(_) => panic!("full bucket must admit burst"),
            }
        }
        assert_eq!(check(&p, tat, now), Verdict::Deny(NANOS_PER_SEC));
        assert!(matches!(
            check(&p, tat, now + NANOS_PER_SEC),
            Verdict::Allow(_)
        ));
    }

    #[test]
    fn fractional_rate_half_per_second() {
        let p = GcraParams::from_ratio(1, 2 * NANOS_PER_SEC, 1); // 0.5 rps
        assert_eq!(p.interval_ns, 2 * NANOS_PER_SEC);
        let Verdict::Allow(tat) = check(&p, 0, 100) else {
            panic!("first request admitted")
        };
        assert_eq!(
            check(&p, tat, 100 + NANOS_PER_SEC),
            Verdict::Deny(NANOS_PER_SEC)
        );
        assert!(matches!(
            check(&p, tat, 100 + 2 * NANOS_PER_SEC),
            Verdict::Allow(_)
        ));
    }

    #[test]
    fn interval_rounds_up() {
        let p = GcraParams::from_ratio(3, NANOS_PER_SEC, 1);
        assert_eq!(p.interval_ns, 333_333_334);
    }

    #[test]
    fn unlimited_and_block_all() {
        let u = GcraParams::UNLIMITED;
        let mut tat = 0;
        for i in 0..1000 {
            match check(&u, tat, 5 + i / 100) {
                Verdict::Allow(t) => tat = t,
                Verdict::Deny(_) => panic!("unlimited denied"),
            }
        }
        assert!(tat <= 15);
        assert_eq!(check(&GcraParams::BLOCK_ALL, 0, 7), Verdict::Deny(u64::MAX));
        assert!(GcraParams::from_ratio(0, NANOS_PER_SEC, 5).is_block_all());
        assert!(GcraParams::from_ratio(10, NANOS_PER_SEC, 0).is_block_all());
        assert!(!GcraParams::from_ratio(10, NANOS_PER_SEC, 1).is_block_all());
    }

    #[test]
    fn refund_restores_previous_state() {
        let p = GcraParams::from_ratio(10, NANOS_PER_SEC, 2);
        let now = 1_000;
        let Verdict::Allow(t1) = check(&p, 0, now) else {
            panic!("admit")
        };
        let back = refund(&p, t1, now);
        assert_eq!(back, now);
        assert_eq!(tokens_scaled(&p, back, now), p.tolerance_ns);
        assert_eq!(refund(&p, 5, 10), 5);
    }

    #[test]
    fn saturates_near_u64_max() {
        let p = GcraParams::from_interval(u64::MAX - 1, 3);
        assert_eq!(p.tolerance_ns, u64::MAX);
        assert!(matches!(check(&p, 0, 1), Verdict::Allow(u64::MAX)));
        assert_eq!(check(&p, 0, u64::MAX - 10), Verdict::Deny(u64::MAX));
        assert_eq!(check(&p, u64::MAX, 5), Verdict::Deny(u64::MAX));
    }
}
