//! Quotas: UTC calendar periods and the lock-free per (key, plan) counter.
//!
//! This module owns (1) the period arithmetic — which DAY / WEEK / MONTH period contains an
//! instant, given the plan's `offset` — done with plain integer civil-date math (days since
//! 1970-01-01, proleptic Gregorian, UTC), and (2) [`QuotaCounter`], three `AtomicU64`s per
//! (key, plan) membership holding the period usage, an UpdateUsage override and the requests not
//! yet flushed to the store.
//!
//! Period semantics (the spec marks them unconfirmed; this is the gateway's documented choice):
//! - `DAY`: 00:00 UTC to the next 00:00 UTC. `offset` must be 0.
//! - `WEEK`: ISO weeks (Monday 00:00 UTC) shifted by `offset` days (0..=6): offset 2 makes weeks
//!   run Wednesday 00:00 to Wednesday 00:00.
//! - `MONTH`: calendar months shifted by `offset` days (0..=27): offset 3 makes periods run from
//!   the 4th 00:00 UTC to the 4th of the next month. Since `offset <= 27` every month has the
//!   shifted day, including February of common years.
//! - Only admitted requests count. `UpdateUsage` (set remaining) changes the allowance of the
//!   current period only; the next period starts again from the plan's `limit`.
//!
//! Periods are day-aligned, so a day never spans two periods; the daily usage history is keyed
//! by day and a period's usage is the sum of its days.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::plan::QuotaPeriod;

/// Nanoseconds per day.
pub const NANOS_PER_DAY: u64 = 86_400 * 1_000_000_000;
/// Seconds per day.
pub const SECS_PER_DAY: u64 = 86_400;

/// Day number (days since 1970-01-01 UTC) of an instant in nanoseconds since the epoch.
pub fn day_of(now_ns: u64) -> u32 {
    // u64 ns covers dates up to 2554, i.e. at most ~213,000 days: fits in u32.
    (now_ns / NANOS_PER_DAY) as u32
}

/// Days since 1970-01-01 of a proleptic Gregorian date (`month` 1..=12, `day` 1..=31).
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400; // [0, 399]
    let m = i64::from(month);
    let mp = if m > 2 { m - 3 } else { m + 9 }; // March = 0
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1; // [0, 365]
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy; // [0, 146096]
    era * 146_097 + doe - 719_468
}

/// The date `(year, month 1..=12, day 1..=31)` of a day number.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097; // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11]
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32; // [1, 31]
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32; // [1, 12]
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// ISO weekday of a day number, Monday = 0 … Sunday = 6 (1970-01-01 was a Thursday).
pub fn weekday(days: i64) -> u32 {
    (days + 3).rem_euclid(7) as u32
}

/// A quota period as the half-open day range `[start_day, end_day)`, UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeriodBounds {
    /// First day of the period (days since the epoch).
    pub start_day: i64,
    /// First day of the next period.
    pub end_day: i64,
}

impl PeriodBounds {
    /// Start instant, nanoseconds since the epoch (0 for days before the epoch).
    pub fn start_ns(&self) -> u64 {
        u64::try_from(self.start_day)
            .unwrap_or(0)
            .saturating_mul(NANOS_PER_DAY)
    }

    /// Reset instant (start of the next period), nanoseconds since the epoch.
    pub fn end_ns(&self) -> u64 {
        u64::try_from(self.end_day)
            .unwrap_or(0)
            .saturating_mul(NANOS_PER_DAY)
    }

    /// Length in seconds.
    pub fn len_secs(&self) -> u64 {
        u64::try_from(self.end_day - self.start_day).unwrap_or(0) * SECS_PER_DAY
    }
}

/// The period of kind `period` with day offset `offset` that contains day `day`.
///
/// `offset` is clamped to the valid range of the period (0, 0..=6, 0..=27), so the function is
/// total; validation rejects other offsets before they get here.
pub fn period_bounds(day: i64, period: QuotaPeriod, offset: u32) -> PeriodBounds {
    match period {
        QuotaPeriod::Day => PeriodBounds {
            start_day: day,
            end_day: day + 1,
        },
        QuotaPeriod::Week => {
            let o = i64::from(offset.min(6));
            let start = day - (day + 3 - o).rem_euclid(7);
            PeriodBounds {
                start_day: start,
                end_day: start + 7,
            }
        }
        QuotaPeriod::Month => {
            let o = i64::from(offset.min(27));
            let (y, m, _) = civil_from_days(day);
            let this = days_from_civil(y, m, 1) + o;
            let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            let (py, pm) = if m == 1 { (y - 1, 12) } else { (y, m - 1) };
            if day >= this {
                PeriodBounds {
                    start_day: this,
                    end_day: days_from_civil(ny, nm, 1) + o,
                }
            } else {
                PeriodBounds {
                    start_day: days_from_civil(py, pm, 1) + o,
                    end_day: this,
                }
            }
        }
    }
}

/// Packs a 32-bit tag and a 32-bit value into one atomic word.
fn pack(tag: u32, value: u32) -> u64 {
    (u64::from(tag) << 32) | u64::from(value)
}

fn unpack(word: u64) -> (u32, u32) {
    ((word >> 32) as u32, word as u32)
}

/// Tag for a period start day: `day + 1`, so that tag 0 means "nothing recorded".
fn tag(start_day: u32) -> u32 {
    start_day.saturating_add(1)
}

/// Lock-free quota state of one (key, plan) membership (24 bytes).
///
/// - `used`: `(period tag, requests admitted in that period)`; a different tag reads as 0.
/// - `allowance`: `(period tag, limit override)` set by UpdateUsage for that period only.
/// - `pending`: `(day + 1, admitted requests not yet flushed)` for the usage history.
#[derive(Debug, Default)]
pub struct QuotaCounter {
    used: AtomicU64,
    allowance: AtomicU64,
    pending: AtomicU64,
}

/// Snapshot of a quota for one period.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuotaState {
    /// Requests admitted in the period.
    pub used: u64,
    /// Requests the period allows (the plan's limit, or the UpdateUsage override).
    pub limit: u64,
    /// `limit - used`, saturating.
    pub remaining: u64,
}

impl QuotaCounter {
    /// A counter with nothing recorded.
    pub const fn new() -> Self {
        QuotaCounter {
            used: AtomicU64::new(0),
            allowance: AtomicU64::new(0),
            pending: AtomicU64::new(0),
        }
    }

    fn effective_limit(&self, t: u32, limit: u64) -> u64 {
        let (at, av) = unpack(self.allowance.load(Ordering::Acquire));
        if at == t { u64::from(av) } else { limit }
    }

    /// Current state in the period starting on `start_day`, for a plan limit of `limit`.
    pub fn state(&self, start_day: u32, limit: u64) -> QuotaState {
        let t = tag(start_day);
        let (ut, uv) = unpack(self.used.load(Ordering::Acquire));
        let used = if ut == t { u64::from(uv) } else { 0 };
        let limit = self.effective_limit(t, limit);
        QuotaState {
            used,
            limit,
            remaining: limit.saturating_sub(used),
        }
    }

    /// Counts one request if the period still has quota. `Ok(state after)` or `Err(state)`.
    pub fn try_acquire(&self, start_day: u32, limit: u64) -> Result<QuotaState, QuotaState> {
        let t = tag(start_day);
        let limit = self.effective_limit(t, limit);
        let mut cur = self.used.load(Ordering::Acquire);
        loop {
            let (ut, uv) = unpack(cur);
            let used = if ut == t { uv } else { 0 };
            if u64::from(used) >= limit || used == u32::MAX {
                return Err(QuotaState {
                    used: u64::from(used),
                    limit,
                    remaining: 0,
                });
            }
            let next = pack(t, used + 1);
            match self
                .used
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    let used = u64::from(used) + 1;
                    return Ok(QuotaState {
                        used,
                        limit,
                        remaining: limit - used,
                    });
                }
                Err(actual) => cur = actual,
            }
        }
    }

    /// Undoes one [`QuotaCounter::try_acquire`] of the same period (no-op after a rollover).
    pub fn refund(&self, start_day: u32) {
        let t = tag(start_day);
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                let (ut, uv) = unpack(cur);
                (ut == t && uv > 0).then(|| pack(t, uv - 1))
            });
    }

    /// UpdateUsage, step one: the allowance that leaves `remaining` requests in the period starting on `start_day`
    /// (`used + remaining`, saturating at `u32::MAX`), without setting it.
    pub fn allowance_for(&self, start_day: u32, remaining: u64) -> u64 {
        let (ut, uv) = unpack(self.used.load(Ordering::Acquire));
        let used = if ut == tag(start_day) {
            u64::from(uv)
        } else {
            0
        };
        used.saturating_add(remaining).min(u64::from(u32::MAX))
    }

    /// UpdateUsage, step two (once the store has it): sets the period's allowance, the limit
    /// UpdateUsage put in force for it.
    pub fn set_allowance(&self, start_day: u32, allowance: u64) {
        let allowance = allowance.min(u64::from(u32::MAX)) as u32;
        self.allowance
            .store(pack(tag(start_day), allowance), Ordering::Release);
    }

    /// Restores state loaded from the store (start-up) for the period starting on `start_day`.
    pub fn restore(&self, start_day: u32, used: u64, allowance: Option<u64>) {
        let t = tag(start_day);
        let used = used.min(u64::from(u32::MAX)) as u32;
        self.used.store(pack(t, used), Ordering::Release);
        if let Some(a) = allowance {
            let a = a.min(u64::from(u32::MAX)) as u32;
            self.allowance.store(pack(t, a), Ordering::Release);
        }
    }

    /// Raises the period usage to at least `total` (store-wide usage learnt at flush, fleet mode).
    pub fn merge_total(&self, start_day: u32, total: u64) {
        let t = tag(start_day);
        let total = total.min(u64::from(u32::MAX)) as u32;
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                let (ut, uv) = unpack(cur);
                let used = if ut == t { uv } else { 0 };
                (total > used).then(|| pack(t, total))
            });
    }

    /// Records one admitted request on `day` for the history. When the pending count belongs to
    /// an earlier day it is returned as `(day, count)` so the caller can queue it for the store.
    pub fn record(&self, day: u32) -> Option<(u32, u64)> {
        let t = tag(day);
        let mut cur = self.pending.load(Ordering::Acquire);
        loop {
            let (pt, pv) = unpack(cur);
            let (next, spill) = if pt == t {
                (pack(t, pv.saturating_add(1)), None)
            } else if pt == 0 || pv == 0 {
                (pack(t, 1), None)
            } else {
                (pack(t, 1), Some((pt - 1, u64::from(pv))))
            };
            match self
                .pending
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return spill,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Takes the unflushed `(day, count)`, leaving zero.
    pub fn take_pending(&self) -> Option<(u32, u64)> {
        if self.pending.load(Ordering::Acquire) == 0 {
            return None;
        }
        let (pt, pv) = unpack(self.pending.swap(0, Ordering::AcqRel));
        (pt != 0 && pv != 0).then(|| (pt - 1, u64::from(pv)))
    }

    /// Clears everything (slot reuse).
    pub fn reset(&self) {
        self.used.store(0, Ordering::Release);
        self.allowance.store(0, Ordering::Release);
        self.pending.store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_round_trip_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(weekday(0), 3); // Thursday
        assert_eq!(weekday(days_from_civil(2024, 1, 1)), 0); // Monday
    }

    #[test]
    fn week_with_offset_starts_on_shifted_day() {
        let wed = days_from_civil(2024, 5, 15); // a Wednesday
        let b = period_bounds(wed, QuotaPeriod::Week, 0);
        assert_eq!(civil_from_days(b.start_day), (2024, 5, 13));
        let b = period_bounds(wed, QuotaPeriod::Week, 2); // weeks start Wednesday
        assert_eq!(civil_from_days(b.start_day), (2024, 5, 15));
        let b = period_bounds(wed - 1, QuotaPeriod::Week, 2);
        assert_eq!(civil_from_days(b.start_day), (2024, 5, 8));
        assert_eq!(b.end_day - b.start_day, 7);
    }

    #[test]
    fn month_with_offset_in_february() {
        let d = days_from_civil(2023, 3, 10);
        let b = period_bounds(d, QuotaPeriod::Month, 27);
        assert_eq!(civil_from_days(b.start_day), (2023, 2, 28));
        assert_eq!(civil_from_days(b.end_day), (2023, 3, 28));
    }

    #[test]
    fn counter_rolls_over_and_respects_override() {
        let q = QuotaCounter::new();
        assert!(q.try_acquire(10, 2).is_ok());
        assert_eq!(q.try_acquire(10, 2).map(|s| s.remaining), Ok(0));
        assert!(q.try_acquire(10, 2).is_err());
        let allowance = q.allowance_for(10, 3);
        q.set_allowance(10, allowance);
        assert_eq!(allowance, 5);
        assert_eq!(q.state(10, 2).remaining, 3);
        for _ in 0..3 {
            assert!(q.try_acquire(10, 2).is_ok());
        }
        assert!(q.try_acquire(10, 2).is_err());
        // Next period: override gone, counter reset.
        assert_eq!(
            q.state(11, 2),
            QuotaState {
                used: 0,
                limit: 2,
                remaining: 2
            }
        );
        assert!(q.try_acquire(11, 2).is_ok());
        q.refund(11);
        assert_eq!(q.state(11, 2).used, 0);
    }

    #[test]
    fn pending_spills_previous_day() {
        let q = QuotaCounter::new();
        assert_eq!(q.record(5), None);
        assert_eq!(q.record(5), None);
        assert_eq!(q.record(6), Some((5, 2)));
        assert_eq!(q.take_pending(), Some((6, 1)));
        assert_eq!(q.take_pending(), None);
    }
}
