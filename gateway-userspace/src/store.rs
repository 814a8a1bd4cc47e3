//! Persistence of quota counters and daily usage history behind one narrow trait.
//!
//! The engine keeps the hot counters in memory (atomics, see [`crate::quota::QuotaCounter`]) and
//! calls the store only from [`crate::engine::Engine::flush`] (batched), at start-up
//! ([`UsageStore::load_periods`]) and from the admin operations (GetUsage / UpdateUsage). Nothing
//! on the request path touches the store.
//!
//! Contract every implementation keeps (the [`MemoryStore`] is the reference and the test oracle
//! for the embedded and Redis stores of later issues):
//! - [`UsageStore::add`] applies a batch of increments. For each delta it adds `count` to the day
//!   record `(plan, key, day)` and adds `count` to the period counter `(plan, key)` if `period_start` is the stored period
//!   (a newer period replaces the stored one and drops its allowance; an older one leaves it
//!   alone). It returns, per delta, the period total after the batch: the usage of all
//!   gateways sharing the store. Increments commute, so a fleet can apply them in any order.
//! - [`UsageStore::set_allowance`] records an UpdateUsage override for one period, both on the
//!   period counter and on the day it was made, so the history can replay it: the remaining quota
//!   at the end of a day is the allowance in force (latest override in the period up to that day,
//!   else the plan limit) minus the period's usage up to and including that day.
//!
//! Overshoot bound. Single node: the in-memory counter is authoritative and the store is only
//! its persistence, so quota enforcement is exact; a crash loses at most the increments since the
//! last flush (≤ one flush interval of admitted requests per key), which the key may then spend
//! again. Fleet (shared store): each gateway learns the others' usage only at flush, so a key can
//! exceed its quota by at most the requests the *other* gateways admit for it during one flush
//! interval (bounded by `(gateways - 1) * min(plan rate, stage rate) * interval + burst` per
//! period). A later fleet mode leases quota in batches to tighten this.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// A store operation failed; the engine keeps the deltas and retries at the next flush.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The backend could not be reached or refused the operation.
    #[error("usage store unavailable: {0}")]
    Unavailable(String),
    /// The backend returned data the gateway cannot read.
    #[error("usage store corrupt: {0}")]
    Corrupt(String),
}

/// Admitted requests of one (plan, key) on one day, to be added to the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageDelta {
    /// Usage plan id.
    pub plan_id: String,
    /// API key id.
    pub key_id: String,
    /// Day of the requests (days since 1970-01-01 UTC).
    pub day: u32,
    /// First day of the quota period containing `day`.
    pub period_start: u32,
    /// Requests to add.
    pub count: u64,
}

/// Period counter of one (plan, key), as loaded at start-up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeriodCounter {
    /// Usage plan id.
    pub plan_id: String,
    /// API key id.
    pub key_id: String,
    /// First day of the period.
    pub period_start: u32,
    /// Requests counted in the period.
    pub used: u64,
    /// UpdateUsage override of the period's limit.
    pub allowance: Option<u64>,
}

/// One day of usage history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DayRecord {
    /// API key id.
    pub key_id: String,
    /// Day (days since 1970-01-01 UTC).
    pub day: u32,
    /// Requests admitted that day.
    pub used: u64,
    /// The period allowance set by UpdateUsage on that day, if any.
    pub allowance: Option<u64>,
}

/// Storage of quota counters and usage history. Implementations must be cheap to share
/// (`Send + Sync`) and keep the contract in the module docs.
pub trait UsageStore: Send + Sync {
    /// Adds a batch of deltas; returns the period total after the batch for each delta, in order.
    fn add(&self, batch: &[UsageDelta]) -> Result<Vec<u64>, StoreError>;

    /// Records an UpdateUsage override made on `day`: the period starting `period_start` allows
    /// `allowance` requests in total.
    fn set_allowance(
        &self,
        plan_id: &str,
        key_id: &str,
        period_start: u32,
        allowance: u64,
        day: u32,
    ) -> Result<(), StoreError>;

    /// All period counters (start-up).
    fn load_periods(&self) -> Result<Vec<PeriodCounter>, StoreError>;

    /// Day records of a plan (optionally one key) with `first_day <= day <= last_day`, ordered by
    /// key id then day.
    fn history(
        &self,
        plan_id: &str,
        key_id: Option<&str>,
        first_day: u32,
        last_day: u32,
    ) -> Result<Vec<DayRecord>, StoreError>;
}

#[derive(Debug, Default)]
struct Period {
    start: u32,
    used: u64,
    allowance: Option<u64>,
}

#[derive(Debug, Default)]
struct Inner {
    periods: BTreeMap<(String, String), Period>,
    /// (plan, key, day) -> (used, allowance set that day)
    days: BTreeMap<(String, String, u32), (u64, Option<u64>)>,
}

/// In-memory store: the reference implementation (and what a single node without persistence
/// uses). A `Mutex` is fine: only flushes and admin calls reach it.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryStore::default()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>, StoreError> {
        self.inner
            .lock()
            .map_err(|_| StoreError::Unavailable("memory store lock poisoned".to_string()))
    }
}

impl UsageStore for MemoryStore {
    fn add(&self, batch: &[UsageDelta]) -> Result<Vec<u64>, StoreError> {
        let mut g = self.lock()?;
        let mut totals = Vec::with_capacity(batch.len());
        for d in batch {
            let day = g
                .days
                .entry((d.plan_id.clone(), d.key_id.clone(), d.day))
                .or_insert((0, None));
            day.0 = day.0.saturating_add(d.count);
            let p = g
                .periods
                .entry((d.plan_id.clone(), d.key_id.clone()))
                .or_default();
            if p.start == d.period_start {
                p.used = p.used.saturating_add(d.count);
                totals.push(p.used);
            } else if p.start < d.period_start {
                *p = Period {
                    start: d.period_start,
                    used: d.count,
                    allowance: None,
                };
                totals.push(p.used);
            } else {
                totals.push(d.count);
            }
        }
        Ok(totals)
    }

    fn set_allowance(
        &self,
        plan_id: &str,
        key_id: &str,
        period_start: u32,
        allowance: u64,
        day: u32,
    ) -> Result<(), StoreError> {
        let mut g = self.lock()?;
        let p = g
            .periods
            .entry((plan_id.to_string(), key_id.to_string()))
            .or_default();
        if p.start != period_start {
            *p = Period {
                start: period_start,
                used: 0,
                allowance: None,
            };
        }
        p.allowance = Some(allowance);
        let d = g
            .days
            .entry((plan_id.to_string(), key_id.to_string(), day))
            .or_insert((0, None));
        d.1 = Some(allowance);
        Ok(())
    }

    fn load_periods(&self) -> Result<Vec<PeriodCounter>, StoreError> {
        let g = self.lock()?;
        Ok(g.periods
            .iter()
            .map(|((plan, key), p)| PeriodCounter {
                plan_id: plan.clone(),
                key_id: key.clone(),
                period_start: p.start,
                used: p.used,
                allowance: p.allowance,
            })
            .collect())
    }

    fn history(
        &self,
        plan_id: &str,
        key_id: Option<&str>,
        first_day: u32,
        last_day: u32,
    ) -> Result<Vec<DayRecord>, StoreError> {
        let g = self.lock()?;
        let mut out: Vec<DayRecord> = g
            .days
            .iter()
            .filter(|((p, k, d), _)| {
                p == plan_id
                    && key_id.is_none_or(|want| want == k)
                    && (first_day..=last_day).contains(d)
            })
            .map(|((_, k, d), (used, allowance))| DayRecord {
                key_id: k.clone(),
                day: *d,
                used: *used,
                allowance: *allowance,
            })
            .collect();
        out.sort_by(|a, b| (a.key_id.as_str(), a.day).cmp(&(b.key_id.as_str(), b.day)));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(day: u32, start: u32, count: u64) -> UsageDelta {
        UsageDelta {
            plan_id: "p".into(),
            key_id: "k".into(),
            day,
            period_start: start,
            count,
        }
    }

    #[test]
    fn add_sums_days_and_periods() {
        let s = MemoryStore::new();
        assert_eq!(
            s.add(&[delta(10, 10, 3), delta(11, 10, 4)]).expect("add"),
            vec![3, 7]
        );
        assert_eq!(s.add(&[delta(17, 17, 2)]).expect("add"), vec![2]);
        // A late delta of an older period leaves the current period alone.
        assert_eq!(s.add(&[delta(12, 10, 1)]).expect("add"), vec![1]);
        let p = s.load_periods().expect("load");
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].period_start, p[0].used), (17, 2));
        let h = s.history("p", None, 10, 12).expect("history");
        let days: Vec<(u32, u64)> = h.iter().map(|r| (r.day, r.used)).collect();
        assert_eq!(days, vec![(10, 3), (11, 4), (12, 1)]);
    }

    #[test]
    fn allowance_is_per_period() {
        let s = MemoryStore::new();
        s.set_allowance("p", "k", 20, 50, 21).expect("set");
        let h = s.history("p", Some("k"), 21, 21).expect("history");
        assert_eq!(h[0].allowance, Some(50));
        let p = s.load_periods().expect("load");
        assert_eq!(p[0].allowance, Some(50));
        s.add(&[delta(27, 27, 1)]).expect("add");
        assert_eq!(s.load_periods().expect("load")[0].allowance, None);
    }
}
