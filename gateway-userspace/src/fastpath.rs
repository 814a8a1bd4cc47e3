//! The bridge from the data plane to the kernel fast path: which TCP flow belongs to which API
//! key, what each key's kernel bucket is, and which keys and sources the kernel sheds.
//!
//! The proxy stays the source of truth for every answer; the kernel is a backstop sized at
//! `headroom` times the key's plan throttle, so it only drops what the proxy would refuse
//! anyway. This module owns the policy; [`KernelMaps`] is the narrow interface to the maps.
//!
//! - **Flow binding.** After a request whose decision names a key, the connection's 4-tuple is
//!   bound to the key's slot; a later request with another key rebinds it, one without a key
//!   (or with an unknown one) unbinds it, and closing the connection unbinds it. The binding
//!   is written only when it changes, so a keep-alive connection costs one map update.
//! - **Kernel buckets** are synced from the engine by [`FastPath::sync`] (call it every second
//!   and after configuration changes): a diff of the desired per-slot state against what was
//!   last written, so only changed slots cost a map update.
//! - **Shedding.** A disabled key is blocked at once. A key whose quota is gone and that keeps
//!   sending (more than `shed_after` refused requests within `shed_window`) is blocked until its
//!   quota period resets, at most `shed_ttl`. A source that fails key checks more than
//!   `scan_after` times within `scan_window` (key guessing) is put on the kernel's block list for
//!   `scan_ttl`. Thresholds default high enough that a normal client never trips them.
//!
//! Failures of the kernel maps are logged and never fail a request (fail open).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use gateway_common::gcra::GcraParams;

use crate::engine::{Decision, ForbiddenReason, KeySlot};

/// `blocked_until_ns` meaning "until the gateway clears the mark".
pub const BLOCKED_FOREVER: u64 = u64::MAX;

/// What the fast path needs from the kernel maps (implemented by the XDP loader).
pub trait KernelMaps: Send + Sync {
    /// Binds the TCP flow (`peer` -> `local`) to key `slot`.
    fn bind_flow(&self, local: SocketAddr, peer: SocketAddr, slot: u32) -> Result<(), String>;
    /// Removes the flow's binding (no error when it was not bound).
    fn unbind_flow(&self, local: SocketAddr, peer: SocketAddr) -> Result<(), String>;
    /// Sets a key slot's kernel bucket (`None`: no kernel limit) and block mark (0: none).
    fn set_key(
        &self,
        slot: u32,
        params: Option<GcraParams>,
        blocked_until_ns: u64,
    ) -> Result<(), String>;
    /// Puts `source` on the block list until `until_ns` (kernel clock).
    fn block_source(&self, source: IpAddr, until_ns: u64) -> Result<(), String>;
    /// The kernel clock the maps' deadlines are on, nanoseconds.
    fn now_ns(&self) -> u64;
}

/// Fast-path policy knobs (flags of `gateway serve`).
#[derive(Clone, Debug, PartialEq)]
pub struct FastPathConfig {
    /// Kernel bucket = plan throttle times this (rate and burst); 1.0 enforces the plan exactly.
    pub headroom: f64,
    /// Refused requests (quota exhausted) that make a key shed in the kernel.
    pub shed_after: u32,
    /// Window in which `shed_after` refusals must happen.
    pub shed_window: Duration,
    /// Longest a shed mark lasts before the gateway looks again.
    pub shed_ttl: Duration,
    /// Failed key checks from one source that put it on the block list.
    pub scan_after: u32,
    /// Window in which `scan_after` failures must happen.
    pub scan_window: Duration,
    /// How long a source stays on the block list.
    pub scan_ttl: Duration,
}

impl Default for FastPathConfig {
    fn default() -> Self {
        FastPathConfig {
            headroom: 2.0,
            shed_after: 100,
            shed_window: Duration::from_secs(10),
            shed_ttl: Duration::from_secs(300),
            scan_after: 100,
            scan_window: Duration::from_secs(60),
            scan_ttl: Duration::from_secs(300),
        }
    }
}

/// One data-plane connection as the fast path sees it.
#[derive(Debug)]
pub struct Connection {
    /// The gateway's address of the connection.
    pub local: SocketAddr,
    /// The client's address.
    pub peer: SocketAddr,
    /// Bound slot + 1; 0 when unbound.
    bound: AtomicU64,
}

impl Connection {
    /// A connection with no binding yet.
    pub fn new(local: SocketAddr, peer: SocketAddr) -> Connection {
        Connection {
            local,
            peer,
            bound: AtomicU64::new(0),
        }
    }

    /// The slot the flow is bound to.
    pub fn bound_slot(&self) -> Option<u32> {
        match self.bound.load(Ordering::Relaxed) {
            0 => None,
            n => u32::try_from(n - 1).ok(),
        }
    }
}

/// A counter of events in a sliding-ish window: reset when the window has passed.
#[derive(Clone, Copy, Debug)]
struct Window {
    started_ns: u64,
    count: u32,
}

impl Window {
    /// Counts one event at `now`; returns the count within the current window.
    fn hit(&mut self, now: u64, window: Duration) -> u32 {
        let len = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
        if now.saturating_sub(self.started_ns) > len {
            *self = Window {
                started_ns: now,
                count: 0,
            };
        }
        self.count = self.count.saturating_add(1);
        self.count
    }
}

/// Desired kernel state of one key slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SlotState {
    params: Option<GcraParams>,
    blocked_until_ns: u64,
}

#[derive(Default)]
struct Marks {
    /// Refusals per slot while over quota.
    refusals: HashMap<u32, Window>,
    /// Shed deadline per slot (kernel clock).
    shed_until: HashMap<u32, u64>,
    /// Failed key checks per source.
    failures: HashMap<IpAddr, Window>,
    /// What was last written per slot.
    written: HashMap<u32, SlotState>,
}

/// Most sources tracked for key-guessing at once; older entries are dropped past it.
const MAX_TRACKED_SOURCES: usize = 100_000;

/// The fast-path policy over a set of kernel maps.
pub struct FastPath {
    maps: Box<dyn KernelMaps>,
    config: FastPathConfig,
    marks: Mutex<Marks>,
    bound_flows: AtomicU64,
}

impl std::fmt::Debug for FastPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastPath")
            .field("config", &self.config)
            .field("bound_flows", &self.bound_flows())
            .finish()
    }
}

impl FastPath {
    /// A fast path writing to `maps`.
    pub fn new(maps: Box<dyn KernelMaps>, config: FastPathConfig) -> FastPath {
        FastPath {
            maps,
            config,
            marks: Mutex::new(Marks::default()),
            bound_flows: AtomicU64::new(0),
        }
    }

    /// Whether a shed mark is waiting to expire (the next [`FastPath::sync`] clears it).
    pub fn has_shed_marks(&self) -> bool {
        !self.marks().shed_until.is_empty()
    }

    /// Flows bound right now.
    pub fn bound_flows(&self) -> u64 {
        self.bound_flows.load(Ordering::Relaxed)
    }

    fn marks(&self) -> std::sync::MutexGuard<'_, Marks> {
        self.marks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records what the proxy decided for one request on `conn`.
    pub fn observed(&self, conn: &Connection, decision: &Decision) {
        match decision.key() {
            Some(key) => self.bind(conn, key.slot),
            None => self.unbind(conn),
        }
        match decision {
            Decision::QuotaExceeded {
                key, reset_at_ns, ..
            } => self.refused_over_quota(key.slot, *reset_at_ns),
            Decision::Forbidden {
                reason: ForbiddenReason::InvalidKey | ForbiddenReason::MissingKey,
                ..
            } => self.failed_key_check(conn.peer.ip()),
            _ => {}
        }
    }

    /// The connection closed: drops its binding.
    pub fn closed(&self, conn: &Connection) {
        self.unbind(conn);
    }

    fn bind(&self, conn: &Connection, slot: u32) {
        let want = u64::from(slot) + 1;
        let before = conn.bound.swap(want, Ordering::Relaxed);
        if before == want {
            return;
        }
        if before == 0 {
            self.bound_flows.fetch_add(1, Ordering::Relaxed);
        }
        if let Err(error) = self.maps.bind_flow(conn.local, conn.peer, slot) {
            tracing::warn!(%error, peer = %conn.peer, slot, "binding a flow in the kernel failed");
        }
    }

    fn unbind(&self, conn: &Connection) {
        if conn.bound.swap(0, Ordering::Relaxed) == 0 {
            return;
        }
        self.bound_flows.fetch_sub(1, Ordering::Relaxed);
        if let Err(error) = self.maps.unbind_flow(conn.local, conn.peer) {
            tracing::warn!(%error, peer = %conn.peer, "unbinding a flow in the kernel failed");
        }
    }

    fn refused_over_quota(&self, slot: u32, reset_at_ns: u64) {
        let now = self.maps.now_ns();
        let mut marks = self.marks();
        let count = marks
            .refusals
            .entry(slot)
            .or_insert(Window {
                started_ns: now,
                count: 0,
            })
            .hit(now, self.config.shed_window);
        if count <= self.config.shed_after || marks.shed_until.contains_key(&slot) {
            return;
        }
        // The quota resets at `reset_at_ns` on the wall clock; translate to the kernel clock.
        let wall_now = wall_clock_ns();
        let until_reset = reset_at_ns.saturating_sub(wall_now);
        let ttl = u64::try_from(self.config.shed_ttl.as_nanos()).unwrap_or(u64::MAX);
        let until = now.saturating_add(until_reset.min(ttl));
        marks.shed_until.insert(slot, until);
        marks.refusals.remove(&slot);
        tracing::info!(
            slot,
            "key over quota keeps sending: shedding its request starts in the kernel"
        );
        drop(marks);
        // Applied at once; the next sync keeps it.
        let params = self.marks().written.get(&slot).and_then(|s| s.params);
        self.write_slot(
            slot,
            SlotState {
                params,
                blocked_until_ns: until,
            },
        );
    }

    fn failed_key_check(&self, source: IpAddr) {
        let now = self.maps.now_ns();
        let mut marks = self.marks();
        if marks.failures.len() >= MAX_TRACKED_SOURCES {
            let window = u64::try_from(self.config.scan_window.as_nanos()).unwrap_or(u64::MAX);
            marks
                .failures
                .retain(|_, w| now.saturating_sub(w.started_ns) <= window);
            if marks.failures.len() >= MAX_TRACKED_SOURCES {
                marks.failures.clear();
            }
        }
        let count = marks
            .failures
            .entry(source)
            .or_insert(Window {
                started_ns: now,
                count: 0,
            })
            .hit(now, self.config.scan_window);
        if count != self.config.scan_after.saturating_add(1) {
            return;
        }
        drop(marks);
        let ttl = u64::try_from(self.config.scan_ttl.as_nanos()).unwrap_or(u64::MAX);
        tracing::warn!(%source, "repeated failed key checks: blocking the source in the kernel");
        if let Err(error) = self.maps.block_source(source, now.saturating_add(ttl)) {
            tracing::warn!(%error, %source, "blocking a source in the kernel failed");
        }
    }

    fn write_slot(&self, slot: u32, state: SlotState) {
        match self
            .maps
            .set_key(slot, state.params, state.blocked_until_ns)
        {
            Ok(()) => {
                self.marks().written.insert(slot, state);
            }
            Err(error) => tracing::warn!(%error, slot, "writing a kernel key bucket failed"),
        }
    }

    /// The kernel bucket of a key: its most permissive plan throttle times the headroom
    /// (the kernel must never refuse what some plan of the key admits); `None` without one.
    pub fn kernel_params(&self, slot: &KeySlot) -> Option<GcraParams> {
        let mut best: Option<(f64, u64)> = None;
        for p in &slot.plans {
            let (rate, burst) = p.throttle?;
            best = Some(match best {
                Some((r, b)) => (r.max(rate), b.max(burst)),
                None => (rate, burst),
            });
        }
        let (rate, burst) = best?;
        let h = self.config.headroom;
        let burst = ((burst as f64) * h).ceil() as u64;
        Some(crate::limit::params(rate * h, burst.max(1)))
    }

    /// Brings the kernel's key slots in line with `slots` (from [`crate::engine::Engine::key_slots`]):
    /// writes only what changed, clears slots of deleted keys, expires shed marks.
    /// Returns the number of slots written.
    pub fn sync(&self, slots: &[KeySlot]) -> usize {
        let now = self.maps.now_ns();
        let mut desired: HashMap<u32, SlotState> = HashMap::with_capacity(slots.len());
        {
            let mut marks = self.marks();
            marks.shed_until.retain(|_, until| *until > now);
            for s in slots {
                let blocked = if !s.enabled {
                    BLOCKED_FOREVER
                } else {
                    marks.shed_until.get(&s.slot).copied().unwrap_or(0)
                };
                desired.insert(
                    s.slot,
                    SlotState {
                        params: self.kernel_params(s),
                        blocked_until_ns: blocked,
                    },
                );
            }
        }
        let (changed, gone): (Vec<(u32, SlotState)>, Vec<u32>) = {
            let marks = self.marks();
            let changed = desired
                .iter()
                .filter(|(slot, want)| marks.written.get(slot) != Some(want))
                .map(|(slot, want)| (*slot, *want))
                .collect();
            let gone = marks
                .written
                .keys()
                .filter(|slot| !desired.contains_key(slot))
                .copied()
                .collect();
            (changed, gone)
        };
        let mut written = 0;
        for (slot, state) in changed {
            self.write_slot(slot, state);
            written += 1;
        }
        for slot in gone {
            // A deleted key: its flows get nothing until the proxy sees their next request
            // (403, unbind); the slot is not reused before the next configuration swap.
            let state = SlotState {
                params: None,
                blocked_until_ns: BLOCKED_FOREVER,
            };
            match self
                .maps
                .set_key(slot, state.params, state.blocked_until_ns)
            {
                Ok(()) => {
                    let mut marks = self.marks();
                    marks.written.remove(&slot);
                    marks.refusals.remove(&slot);
                    marks.shed_until.remove(&slot);
                }
                Err(error) => tracing::warn!(%error, slot, "clearing a kernel key bucket failed"),
            }
            written += 1;
        }
        written
    }
}

fn wall_clock_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, atomic::AtomicU64};

    use super::*;
    use crate::engine::{Id, KeyRef, Limits, SlotPlan};

    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<String>>,
        now: AtomicU64,
    }

    impl Recorder {
        fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.calls.lock().unwrap())
        }
    }

    impl KernelMaps for Arc<Recorder> {
        fn bind_flow(&self, _: SocketAddr, peer: SocketAddr, slot: u32) -> Result<(), String> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("bind {peer} {slot}"));
            Ok(())
        }
        fn unbind_flow(&self, _: SocketAddr, peer: SocketAddr) -> Result<(), String> {
            self.calls.lock().unwrap().push(format!("unbind {peer}"));
            Ok(())
        }
        fn set_key(&self, slot: u32, p: Option<GcraParams>, blocked: u64) -> Result<(), String> {
            let p = p.map_or("none".to_string(), |p| p.interval_ns.to_string());
            let blocked = if blocked == BLOCKED_FOREVER {
                "forever".to_string()
            } else {
                blocked.to_string()
            };
            self.calls
                .lock()
                .unwrap()
                .push(format!("key {slot} {p} {blocked}"));
            Ok(())
        }
        fn block_source(&self, source: IpAddr, until: u64) -> Result<(), String> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("block {source} {until}"));
            Ok(())
        }
        fn now_ns(&self) -> u64 {
            self.now.load(Ordering::Relaxed)
        }
    }

    fn fast_path(config: FastPathConfig) -> (FastPath, Arc<Recorder>) {
        let rec = Arc::new(Recorder::default());
        (FastPath::new(Box::new(rec.clone()), config), rec)
    }

    fn conn() -> Connection {
        Connection::new(
            "10.0.0.1:8080".parse().unwrap(),
            "10.0.0.2:40000".parse().unwrap(),
        )
    }

    fn key(slot: u32) -> KeyRef {
        KeyRef {
            id: Id::new("k"),
            slot,
        }
    }

    fn allow(slot: u32) -> Decision {
        Decision::Allow {
            key: Some(key(slot)),
            plan_id: Some(Id::new("p")),
            limits: Limits::default(),
        }
    }

    fn forbidden(reason: ForbiddenReason) -> Decision {
        Decision::Forbidden { reason, key: None }
    }

    fn slot(slot: u32, enabled: bool, throttle: Option<(f64, u64)>) -> KeySlot {
        KeySlot {
            key_id: format!("k{slot}"),
            slot,
            enabled,
            plans: vec![SlotPlan {
                plan_id: "p".into(),
                throttle,
                params: None,
            }],
        }
    }

    #[test]
    fn a_flow_is_bound_once_rebound_on_key_change_and_unbound() {
        let (fp, rec) = fast_path(FastPathConfig::default());
        let c = conn();
        fp.observed(&c, &allow(3));
        fp.observed(&c, &allow(3));
        assert_eq!(
            rec.take(),
            ["bind 10.0.0.2:40000 3"],
            "one map write per binding"
        );
        assert_eq!(fp.bound_flows(), 1);
        fp.observed(&c, &allow(4));
        assert_eq!(rec.take(), ["bind 10.0.0.2:40000 4"]);
        fp.observed(&c, &forbidden(ForbiddenReason::MissingKey));
        assert_eq!(rec.take(), ["unbind 10.0.0.2:40000"]);
        assert_eq!(fp.bound_flows(), 0);
        fp.observed(&c, &allow(4));
        fp.closed(&c);
        fp.closed(&c);
        assert_eq!(
            rec.take(),
            ["bind 10.0.0.2:40000 4", "unbind 10.0.0.2:40000"]
        );
        assert_eq!((fp.bound_flows(), c.bound_slot()), (0, None));
    }

    #[test]
    fn sync_writes_only_differences_blocks_disabled_and_clears_deleted() {
        let (fp, rec) = fast_path(FastPathConfig::default());
        let slots = [
            slot(0, true, Some((50.0, 100))),
            slot(1, false, Some((5.0, 5))),
        ];
        assert_eq!(fp.sync(&slots), 2);
        let mut calls = rec.take();
        calls.sort();
        // Headroom 2.0: 100 rps -> 10 ms per token.
        assert_eq!(calls, ["key 0 10000000 0", "key 1 100000000 forever"]);
        assert_eq!(fp.sync(&slots), 0, "nothing changed, nothing written");
        assert!(rec.take().is_empty());
        let slots = [slot(0, true, Some((25.0, 100)))];
        assert_eq!(fp.sync(&slots), 2);
        let mut calls = rec.take();
        calls.sort();
        assert_eq!(calls, ["key 0 20000000 0", "key 1 none forever"]);
    }

    #[test]
    fn the_kernel_bucket_is_the_most_permissive_plan_times_headroom() {
        let (fp, _) = fast_path(FastPathConfig {
            headroom: 1.0,
            ..FastPathConfig::default()
        });
        let mut s = slot(0, true, Some((10.0, 5)));
        s.plans.push(SlotPlan {
            plan_id: "q".into(),
            throttle: Some((20.0, 2)),
            params: None,
        });
        let p = fp.kernel_params(&s).expect("both plans throttle");
        assert_eq!(p, crate::limit::params(20.0, 5));
        s.plans.push(SlotPlan {
            plan_id: "open".into(),
            throttle: None,
            params: None,
        });
        assert_eq!(
            fp.kernel_params(&s),
            None,
            "a plan without throttle: no kernel limit"
        );
    }

    #[test]
    fn a_key_over_quota_that_keeps_sending_is_shed_until_reset_or_ttl() {
        let (fp, rec) = fast_path(FastPathConfig {
            shed_after: 3,
            ..FastPathConfig::default()
        });
        rec.now.store(1_000, Ordering::Relaxed);
        fp.sync(&[slot(7, true, Some((1.0, 1)))]);
        rec.take();
        let over = Decision::QuotaExceeded {
            reset_at_ns: wall_clock_ns() + 60 * 1_000_000_000,
            key: key(7),
            plan_id: Id::new("p"),
            limits: Limits::default(),
        };
        let c = conn();
        for _ in 0..3 {
            fp.observed(&c, &over);
        }
        assert_eq!(
            rec.take(),
            ["bind 10.0.0.2:40000 7"],
            "not yet over the threshold"
        );
        fp.observed(&c, &over);
        let calls = rec.take();
        assert_eq!(calls.len(), 1, "{calls:?}");
        let until: u64 = calls[0].rsplit(' ').next().unwrap().parse().unwrap();
        assert!(
            (1_000 + 59_000_000_000..=1_000 + 60_000_000_000).contains(&until),
            "blocked until the quota resets: {until}"
        );
        // The mark survives syncs while it lasts and is dropped once it passed.
        assert_eq!(fp.sync(&[slot(7, true, Some((1.0, 1)))]), 0);
        rec.now.store(until + 1, Ordering::Relaxed);
        assert_eq!(fp.sync(&[slot(7, true, Some((1.0, 1)))]), 1);
        assert!(rec.take()[0].ends_with(" 0"), "unblocked");
    }

    #[test]
    fn a_source_guessing_keys_is_blocked_once() {
        let (fp, rec) = fast_path(FastPathConfig {
            scan_after: 2,
            ..FastPathConfig::default()
        });
        rec.now.store(5, Ordering::Relaxed);
        let c = conn();
        for _ in 0..5 {
            fp.observed(&c, &forbidden(ForbiddenReason::InvalidKey));
        }
        let blocks: Vec<String> = rec
            .take()
            .into_iter()
            .filter(|c| c.starts_with("block"))
            .collect();
        assert_eq!(
            blocks,
            [format!("block 10.0.0.2 {}", 5 + 300_000_000_000u64)]
        );
        // Disabled keys or throttling are not key guessing.
        let (fp, rec) = fast_path(FastPathConfig {
            scan_after: 0,
            ..FastPathConfig::default()
        });
        fp.observed(&c, &forbidden(ForbiddenReason::DisabledKey));
        assert!(rec.take().iter().all(|c| !c.starts_with("block")));
    }
}
