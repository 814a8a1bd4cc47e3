//! The usage-plan engine: routing, key checks, layered throttles and quotas for one request,
//! hot swap of the configuration, and the bridge to the usage store.
//!
//! The engine owns a compiled, immutable snapshot of the [`Model`] (lookup tables built once per
//! [`Engine::apply`]) behind an [`ArcSwap`], plus the mutable per-key state that must survive
//! swaps: GCRA buckets and quota counters in a chunked slab of 32-byte cells that never moves.
//! [`Engine::decide`] does no I/O and takes no lock: it reads the snapshot, the injected clock and
//! atomics only.
//!
//! Routing: each stage routes on the resources of the deployment it points to (the snapshot
//! CreateDeployment took), so method, resource and integration changes reach a stage when it is
//! redeployed. A stage without a `deploymentId`, naming a deployment that does not exist, or
//! naming one without a snapshot (configurations written by hand, `--config`, `--demo`,
//! `--upstream`) routes on the API's live resources. Stages of one API that serve the same
//! resource list share one compiled tree; per-stage tables (throttle buckets, integrations with
//! stage variables substituted) are indexed by the method index of the stage's tree.
//!
//! Invariants:
//! - Every API key has a dense `slot: u32`, stable across swaps while the key exists; every
//!   (key, plan) membership has a cell, stable across swaps while the membership exists. Freed
//!   slots and cells are quarantined for one apply before reuse, so a decision still running on
//!   the previous snapshot cannot touch a new owner's state.
//! - Stage buckets are shared by all clients and keyed by (api, stage, resource, method); they
//!   survive swaps and redeployments while the stage still serves that resource and method. The
//!   account bucket lives as long as the engine.
//! - Keys are looked up by a 128-bit keyed digest (SipHash-1-3-128 with a random per-engine key)
//!   of the value; the value itself is not kept in the lookup tables and timing does not depend on
//!   how much of a value matches.
//!
//! Order of checks for a method with `apiKeyRequired` (AWS's order): key present, known, enabled,
//! in a plan for this stage (else 403); throttles plan per-method → plan → stage per-method (or
//! `*/*`) → account (else 429 `Throttled`); quota (else 429 `QuotaExceeded`). Layers are checked
//! before anything is taken, so a request rejected by any check takes no token and no quota (see
//! [`crate::limit`]). Only admitted requests count toward quota and usage. Without
//! `apiKeyRequired` the plan throttle and quota are bypassed; stage and account throttles apply.
//!
//! Choices for unconfirmed points: throttles are checked before the quota (a throttled request
//! never consumes quota); when the stage behind a route disappears in a swap the request is
//! `Forbidden` with [`ForbiddenReason::RouteGone`]; a store that fails at start-up leaves counters
//! at zero (fail open, as AWS does when its usage-plan check fails) and is logged. A wall clock
//! stepped backwards by more than a second does not hold traffic back for the length of the step:
//! the buckets it left in the future restart empty (see [`crate::limit`]). Quota counters keep
//! one period each and follow the clock's calendar: a step back over the start of a period counts
//! the earlier period again from zero, and the later one from zero once the clock returns, so such
//! a step can grant a key up to one more period's limit.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use gateway_common::gcra::{GcraParams, NANOS_PER_SEC};
use serde::Serialize;

use crate::clock::Clock;
use crate::limit::{self, Bucket, Layer, Layers};
use crate::plan::{
    ApiKeySource, Integration, IntegrationType, Model, ModelError, QuotaPeriod, Resource, Segment,
    parse_method_setting_key, parse_plan_method_key, parse_resource_path,
};
use crate::quota::{self, PeriodBounds, QuotaCounter};
use crate::store::{StoreError, UsageDelta, UsageStore};

// ---------------------------------------------------------------------------------------------
// Public result types
// ---------------------------------------------------------------------------------------------

/// An id copied inline (no allocation, no shared refcount on the request path).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Id {
    len: u8,
    buf: [u8; crate::plan::MAX_ID_LEN],
}

impl Id {
    /// Copies `s`, truncated to [`crate::plan::MAX_ID_LEN`] bytes on a char boundary (validated
    /// ids always fit).
    pub fn new(s: &str) -> Id {
        let mut end = s.len().min(crate::plan::MAX_ID_LEN);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        let mut buf = [0u8; crate::plan::MAX_ID_LEN];
        buf[..end].copy_from_slice(&s.as_bytes()[..end]);
        Id {
            len: end as u8,
            buf,
        }
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..usize::from(self.len)]).unwrap_or("")
    }
}

impl std::ops::Deref for Id {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The API key a decision was about (never its value).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyRef {
    /// API key id.
    pub id: Id,
    /// Dense slot of the key (see [`Engine::key_slots`]).
    pub slot: u32,
}

/// Quota status of the key's plan for the current period.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuotaStatus {
    /// Requests the period allows (plan limit or UpdateUsage override).
    pub limit: u64,
    /// Requests left in the period (after this request when admitted).
    pub remaining: u64,
    /// Requests counted in the period.
    pub used: u64,
    /// Period.
    pub period: QuotaPeriod,
    /// Start of the next period, nanoseconds since the epoch (UTC).
    pub reset_at_ns: u64,
    /// Seconds from the decision until the reset, rounded up.
    pub reset_secs: u64,
    /// Length of the period in seconds.
    pub window_secs: u64,
}

/// Status of the plan throttle (per key) at decision time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ThrottleStatus {
    /// Refill rate, requests per second.
    pub rate: f64,
    /// Bucket size, requests.
    pub burst: u64,
    /// Whole tokens left (after this request when admitted).
    pub remaining: u64,
    /// Seconds until the bucket is full again, rounded up.
    pub reset_secs: u64,
}

/// One policy for the IETF `RateLimit` / `RateLimit-Policy` headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// `"quota"` or `"throttle"`.
    pub name: &'static str,
    /// Quota units of the policy (`q`): the quota limit or the burst.
    pub limit: u64,
    /// Units left (`r`).
    pub remaining: u64,
    /// Seconds until the units are restored (`t`).
    pub reset_secs: u64,
    /// Window of the policy in seconds (`w`): the period, or `ceil(burst / rate)` (at least 1).
    pub window_secs: u64,
}

/// The plan limits that applied to a request.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Limits {
    /// The plan's quota, if it has one.
    pub quota: Option<QuotaStatus>,
    /// The plan's throttle, if it has one.
    pub throttle: Option<ThrottleStatus>,
}

impl Limits {
    /// The quota as a header policy.
    pub fn quota_policy(&self) -> Option<Policy> {
        self.quota.map(|q| Policy {
            name: "quota",
            limit: q.limit,
            remaining: q.remaining,
            reset_secs: q.reset_secs,
            window_secs: q.window_secs,
        })
    }

    /// The plan throttle as a header policy.
    pub fn throttle_policy(&self) -> Option<Policy> {
        self.throttle.map(|t| Policy {
            name: "throttle",
            limit: t.burst,
            remaining: t.remaining,
            reset_secs: t.reset_secs,
            window_secs: if t.rate > 0.0 {
                ((t.burst as f64 / t.rate).ceil() as u64).max(1)
            } else {
                1
            },
        })
    }

    /// The policy closest to exhaustion (fewest remaining; the quota on ties).
    pub fn binding(&self) -> Option<Policy> {
        match (self.quota_policy(), self.throttle_policy()) {
            (Some(q), Some(t)) => Some(if t.remaining < q.remaining { t } else { q }),
            (q, t) => q.or(t),
        }
    }
}

/// Why a request was refused with 403.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForbiddenReason {
    /// No key sent for a method that requires one.
    MissingKey,
    /// The value matches no key.
    InvalidKey,
    /// The key is disabled.
    DisabledKey,
    /// The key is in no usage plan for this API stage.
    NoPlanForStage,
    /// The route's API, stage or method no longer exists (configuration swapped).
    RouteGone,
}

/// Whether a decision lets quotas refuse requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quotas {
    /// A key over its quota is refused (429 `LimitExceededException`).
    Enforce,
    /// Quotas refuse nothing (the shared store that keeps them is unreachable and the
    /// operator chose `--store-failure open`); throttles still apply.
    Waive,
}

/// The outcome for one request. Being throttled is a decision, not an error.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Decision {
    /// Forward the request.
    Allow {
        /// The key, when the method required one.
        key: Option<KeyRef>,
        /// The key's plan, when the method required a key.
        plan_id: Option<Id>,
        /// Plan limits after this request (empty without a key).
        limits: Limits,
    },
    /// 403 `ForbiddenException` `{"message":"Forbidden"}`.
    Forbidden {
        /// Why.
        reason: ForbiddenReason,
        /// The key, when it was identified.
        key: Option<KeyRef>,
    },
    /// 429 `TooManyRequestsException` `{"message":"Too Many Requests"}`.
    Throttled {
        /// First rejecting layer in AWS's order.
        layer: Layer,
        /// Nanoseconds until every rejecting layer would admit (`u64::MAX`: never).
        retry_after_ns: u64,
        /// The key, when the method required one.
        key: Option<KeyRef>,
        /// The key's plan.
        plan_id: Option<Id>,
        /// Plan limits (nothing was taken).
        limits: Limits,
    },
    /// 429 `LimitExceededException` `{"message":"Limit Exceeded"}`.
    QuotaExceeded {
        /// Start of the next period, nanoseconds since the epoch.
        reset_at_ns: u64,
        /// The key.
        key: KeyRef,
        /// The key's plan.
        plan_id: Id,
        /// Plan limits (quota remaining is 0).
        limits: Limits,
    },
}

impl Decision {
    /// Whether the request may go upstream.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }

    /// HTTP status AWS answers with (200 meaning "forward").
    pub fn status(&self) -> u16 {
        match self {
            Decision::Allow { .. } => 200,
            Decision::Forbidden { .. } => 403,
            Decision::Throttled { .. } | Decision::QuotaExceeded { .. } => 429,
        }
    }

    /// AWS `x-amzn-ErrorType` for a refusal.
    pub fn error_type(&self) -> Option<&'static str> {
        match self {
            Decision::Allow { .. } => None,
            Decision::Forbidden { .. } => Some("ForbiddenException"),
            Decision::Throttled { .. } => Some("TooManyRequestsException"),
            Decision::QuotaExceeded { .. } => Some("LimitExceededException"),
        }
    }

    /// AWS body message for a refusal.
    pub fn message(&self) -> Option<&'static str> {
        match self {
            Decision::Allow { .. } => None,
            Decision::Forbidden { .. } => Some("Forbidden"),
            Decision::Throttled { .. } => Some("Too Many Requests"),
            Decision::QuotaExceeded { .. } => Some("Limit Exceeded"),
        }
    }

    /// The key the decision was about.
    pub fn key(&self) -> Option<KeyRef> {
        match self {
            Decision::Allow { key, .. }
            | Decision::Forbidden { key, .. }
            | Decision::Throttled { key, .. } => *key,
            Decision::QuotaExceeded { key, .. } => Some(*key),
        }
    }

    /// The plan the decision was about.
    pub fn plan_id(&self) -> Option<Id> {
        match self {
            Decision::Allow { plan_id, .. } | Decision::Throttled { plan_id, .. } => *plan_id,
            Decision::QuotaExceeded { plan_id, .. } => Some(*plan_id),
            Decision::Forbidden { .. } => None,
        }
    }

    /// The plan limits, for RateLimit headers.
    pub fn limits(&self) -> Option<&Limits> {
        match self {
            Decision::Allow { limits, .. }
            | Decision::Throttled { limits, .. }
            | Decision::QuotaExceeded { limits, .. } => Some(limits),
            Decision::Forbidden { .. } => None,
        }
    }

    /// Seconds to suggest in `Retry-After` (rounded up; `None` when admitted or forbidden).
    pub fn retry_after_secs(&self, now_ns: u64) -> Option<u64> {
        match self {
            Decision::Throttled { retry_after_ns, .. } => {
                Some(retry_after_ns.div_ceil(NANOS_PER_SEC))
            }
            Decision::QuotaExceeded { reset_at_ns, .. } => {
                Some(reset_at_ns.saturating_sub(now_ns).div_ceil(NANOS_PER_SEC))
            }
            _ => None,
        }
    }
}

/// The integration of a resolved route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteIntegration {
    /// Integration type.
    pub integration_type: IntegrationType,
    /// URI with stage variables substituted; path parameters (`{proxy}`) still in braces.
    pub uri: String,
    /// Upstream timeout, milliseconds.
    pub timeout_ms: u32,
    /// Method of the upstream request (`httpMethod` of the integration); `None` (unset or
    /// `ANY`) sends the client's method.
    pub http_method: Option<http::Method>,
}

/// A request matched to a REST API, stage, resource and method.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// REST API id.
    pub rest_api_id: String,
    /// Stage name.
    pub stage: String,
    /// Matched resource path template, e.g. `/pets/{id}`.
    pub resource_path: String,
    /// The request's HTTP method (upper case).
    pub http_method: String,
    /// The declared method that matched (`ANY` or equal to `http_method`).
    pub declared_method: String,
    /// Whether the match went through an `ANY` method.
    pub matched_any: bool,
    /// Whether the method requires an API key.
    pub api_key_required: bool,
    /// Where to read the key from.
    pub api_key_source: ApiKeySource,
    /// Path parameters by name (`proxy` holds the rest of the path for `{proxy+}`).
    pub path_params: Vec<(String, String)>,
    /// Backend, when the method has one.
    pub integration: Option<RouteIntegration>,
    generation: u64,
    stage_idx: u32,
    method_idx: u32,
}

impl Route {
    /// The integration URI with `{name}` and `{name+}` replaced by the path parameters.
    pub fn upstream_url(&self) -> Option<String> {
        let i = self.integration.as_ref()?;
        let mut uri = i.uri.clone();
        for (name, value) in &self.path_params {
            uri = uri
                .replace(&format!("{{{name}+}}"), value)
                .replace(&format!("{{{name}}}"), value);
        }
        Some(uri)
    }
}

/// Slot information for the kernel maps.
#[derive(Clone, Debug, PartialEq)]
pub struct KeySlot {
    /// API key id.
    pub key_id: String,
    /// Dense slot, stable across swaps.
    pub slot: u32,
    /// Whether the key is enabled.
    pub enabled: bool,
    /// The key's plans and their throttles.
    pub plans: Vec<SlotPlan>,
}

/// A plan of a [`KeySlot`].
#[derive(Clone, Debug, PartialEq)]
pub struct SlotPlan {
    /// Plan id.
    pub plan_id: String,
    /// `(rate rps, burst)` of the plan throttle, if any.
    pub throttle: Option<(f64, u64)>,
    /// The same as GCRA parameters.
    pub params: Option<GcraParams>,
}

/// GetUsage result; serialises to AWS's `Usage` shape (`values` on the wire).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    /// Plan id.
    pub usage_plan_id: String,
    /// `yyyy-MM-dd`.
    pub start_date: String,
    /// `yyyy-MM-dd`.
    pub end_date: String,
    /// Per key id, one `[used, remaining]` per day from start to end inclusive.
    #[serde(rename = "values")]
    pub items: BTreeMap<String, Vec<[u64; 2]>>,
}

/// Errors of the admin-facing engine operations.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A client error with AWS's kind and text.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The usage store failed (a 5xx at the edge).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Result of a flush.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlushStats {
    /// Deltas written.
    pub deltas: usize,
    /// Requests those deltas carried.
    pub requests: u64,
}

/// Longest GetUsage range, in days (the AWS limit is unconfirmed).
pub const MAX_USAGE_DAYS: i64 = 366;

// ---------------------------------------------------------------------------------------------
// Compiled snapshot
// ---------------------------------------------------------------------------------------------

/// Per (key, plan) hot state: plan bucket + quota counter (32 bytes).
#[derive(Debug, Default)]
struct Cell {
    bucket: Bucket,
    quota: QuotaCounter,
}

const CHUNK: usize = 1024;
type Chunk = Arc<[Cell]>;

fn new_chunk() -> Chunk {
    (0..CHUNK).map(|_| Cell::default()).collect()
}

/// Longest key id stored inline in its [`KeyRec`]; longer ids go to the arena.
const INLINE_ID: usize = 16;

/// One API key in a snapshot (56 bytes). The first membership is inline so that the common
/// one-plan key is decided from this record, its table entry and its cell alone.
#[derive(Debug, Clone, Copy, Default)]
struct KeyRec {
    digest: [u64; 2],
    id_inline: [u8; INLINE_ID],
    id_off: u32,
    members_off: u32,
    first_plan: u32,
    first_cell: u32,
    id_len: u8,
    members_len: u8,
    enabled: bool,
    live: bool,
}

#[derive(Debug, Clone)]
struct Member {
    plan: u32,
    cell: u32,
    /// Per-method plan buckets, indexed like the plan's `pm` list.
    pm: Option<Arc<[Bucket]>>,
}

#[derive(Debug, Clone, Copy)]
struct CQuota {
    limit: u64,
    period: QuotaPeriod,
    offset: u32,
}

#[derive(Debug)]
struct PmEntry {
    stage: u32,
    method: u32,
    verb: String,
    params: GcraParams,
    /// `apiId:stage/path/VERB`, the identity used to keep buckets across swaps.
    name: String,
}

#[derive(Debug)]
struct CPlan {
    id: String,
    throttle: Option<(GcraParams, f64, u64)>,
    quota: Option<CQuota>,
    stages: Vec<u32>,
    pm: Vec<PmEntry>,
    /// The quota period around the last day asked for: `(day + 1) << 32 | (day - start) << 16
    /// | (end - day)` (a period is at most 62 days long), so the calendar is worked out once a
    /// day per plan rather than per request.
    bounds: AtomicU64,
}

impl CPlan {
    /// The quota period holding `day`, if the plan has a quota.
    fn period(&self, day: u32) -> Option<(CQuota, PeriodBounds)> {
        let q = self.quota?;
        let word = self.bounds.load(Ordering::Relaxed);
        let tag = u64::from(day) + 1;
        if word >> 32 == tag {
            let back = i64::from((word >> 16) as u16);
            let ahead = i64::from(word as u16);
            let day = i64::from(day);
            return Some((
                q,
                PeriodBounds {
                    start_day: day - back,
                    end_day: day + ahead,
                },
            ));
        }
        let b = quota::period_bounds(i64::from(day), q.period, q.offset);
        let (back, ahead) = (i64::from(day) - b.start_day, b.end_day - i64::from(day));
        if let (Ok(back), Ok(ahead)) = (u16::try_from(back), u16::try_from(ahead)) {
            self.bounds.store(
                tag << 32 | u64::from(back) << 16 | u64::from(ahead),
                Ordering::Relaxed,
            );
        }
        Some((q, b))
    }
}

#[derive(Debug, Default)]
struct Node {
    literal: HashMap<String, Node>,
    param: Option<(String, Box<Node>)>,
    greedy: Option<(String, Box<Node>)>,
    /// Declared verb -> method index, present when a resource exists at this node.
    methods: Option<HashMap<String, u32>>,
}

#[derive(Debug)]
struct CMethod {
    resource_path: String,
    verb: String,
    api_key_required: bool,
}

/// The routes of one resource list (an API's live resources or one deployment's snapshot),
/// shared by every stage of the API that serves that list.
#[derive(Debug, Default)]
struct CTree {
    root: Node,
    methods: Vec<CMethod>,
}

#[derive(Debug)]
struct CStage {
    api: u32,
    /// The tree the stage routes on (index into [`Compiled::trees`]).
    tree: u32,
    name: String,
    /// Per method of the stage's tree: stage throttle, if any.
    buckets: Vec<Option<(GcraParams, Arc<Bucket>)>>,
    /// Per method of the stage's tree: integration with stage variables substituted.
    integrations: Vec<Option<RouteIntegration>>,
}

#[derive(Debug)]
struct CApi {
    id: String,
    key_source: ApiKeySource,
    stages: HashMap<String, u32>,
}

/// Open-addressing table from a 64-bit hash to a slot, with a 32-bit hint stored beside it.
/// An entry is `0` when empty, else `(hint << 32) | (slot + 1)`.
///
/// The value table keeps the key's first cell as the hint, so a decision can start loading the
/// cell while it verifies the key record: on a large table both are cache misses, and issued
/// together they cost about one miss instead of two in a row.
#[derive(Debug, Default)]
struct SlotTable {
    mask: usize,
    entries: Box<[u64]>,
}

impl SlotTable {
    fn build(items: impl Iterator<Item = (u64, u32, u32)>, n: usize) -> SlotTable {
        let cap = (n * 2).max(16).next_power_of_two();
        let mut entries = vec![0u64; cap].into_boxed_slice();
        let mask = cap - 1;
        for (h, slot, hint) in items {
            let mut i = (h as usize) & mask;
            while entries[i] != 0 {
                i = (i + 1) & mask;
            }
            entries[i] = (u64::from(hint) << 32) | u64::from(slot + 1);
        }
        SlotTable { mask, entries }
    }

    /// The first slot on `h`'s probe sequence that `is(slot, hint)` accepts.
    #[inline]
    fn find(&self, h: u64, mut is: impl FnMut(u32, u32) -> bool) -> Option<u32> {
        if self.entries.is_empty() {
            return None;
        }
        let mut i = (h as usize) & self.mask;
        loop {
            let e = self.entries[i];
            if e == 0 {
                return None;
            }
            let slot = (e as u32).wrapping_sub(1);
            if is(slot, (e >> 32) as u32) {
                return Some(slot);
            }
            i = (i + 1) & self.mask;
        }
    }
}

/// Asks the CPU to start loading `value`'s cache line; a no-op where not supported.
#[inline(always)]
fn prefetch<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it never faults and changes no state, and SSE (which
    // provides it) is part of the x86_64 baseline.
    unsafe {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        _mm_prefetch::<_MM_HINT_T0>(std::ptr::from_ref(value).cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

#[derive(Debug)]
struct Compiled {
    generation: u64,
    model: Arc<Model>,
    apis: Vec<CApi>,
    api_index: HashMap<String, u32>,
    trees: Vec<CTree>,
    stages: Vec<CStage>,
    plans: Vec<CPlan>,
    plan_index: HashMap<String, u32>,
    keys: Vec<KeyRec>,
    key_ids: String,
    members: Vec<Member>,
    by_value: SlotTable,
    by_id: SlotTable,
    cells: Vec<Chunk>,
    account: GcraParams,
}

impl Compiled {
    fn key_id<'a>(&'a self, k: &'a KeyRec) -> &'a str {
        let len = usize::from(k.id_len);
        if len <= INLINE_ID {
            return std::str::from_utf8(&k.id_inline[..len]).unwrap_or("");
        }
        let start = k.id_off as usize;
        self.key_ids.get(start..start + len).unwrap_or("")
    }

    fn members(&self, k: &KeyRec) -> &[Member] {
        let start = k.members_off as usize;
        self.members
            .get(start..start + usize::from(k.members_len))
            .unwrap_or(&[])
    }

    fn cell(&self, idx: u32) -> &Cell {
        let i = idx as usize;
        &self.cells[i / CHUNK][i % CHUNK]
    }

    /// The cell at `idx` if it exists (a hint may name no cell: a key without a plan).
    fn cell_hint(&self, idx: u32) -> Option<&Cell> {
        let i = idx as usize;
        self.cells.get(i / CHUNK)?.get(i % CHUNK)
    }

    fn slot_of_id(&self, hashers: &Hashers, id: &str) -> Option<u32> {
        let h = hashers.id.hash_one(id);
        self.by_id.find(h, |s, _| {
            let k = &self.keys[s as usize];
            k.live && self.key_id(k) == id
        })
    }

    /// (stage index, method index) of a route, re-resolving by name after a swap.
    fn locate(&self, r: &Route) -> Option<(u32, u32)> {
        if r.generation == self.generation {
            return Some((r.stage_idx, r.method_idx));
        }
        let api = &self.apis[*self.api_index.get(&r.rest_api_id)? as usize];
        let stage = *api.stages.get(&r.stage)?;
        let tree = &self.trees[self.stages[stage as usize].tree as usize];
        let method = tree
            .methods
            .iter()
            .position(|m| m.resource_path == r.resource_path && m.verb == r.declared_method)?;
        Some((stage, method as u32))
    }

    fn plan_covers(&self, plan: &CPlan, stage: u32) -> bool {
        plan.stages.contains(&stage)
    }
}

/// The keyed hashes of the engine, with keys drawn at random per engine.
struct Hashers {
    /// SipHash-1-3 with 128-bit output over an API key value: the digest stands in for the
    /// secret, so it is a keyed cryptographic hash.
    value: (u64, u64),
    /// Key ids (not secret, chosen by the gateway or its operator): a fast seeded hash.
    id: foldhash::fast::RandomState,
}

impl std::fmt::Debug for Hashers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hashers").finish_non_exhaustive()
    }
}

impl Hashers {
    fn new() -> Hashers {
        Hashers {
            value: (rand::random(), rand::random()),
            id: foldhash::fast::RandomState::default(),
        }
    }

    /// The 128-bit keyed digest of an API key value (one pass over the value).
    fn digest(&self, value: &str) -> [u64; 2] {
        use siphasher::sip128::{Hasher128, SipHasher13};
        use std::hash::Hasher;
        let mut h = SipHasher13::new_with_keys(self.value.0, self.value.1);
        h.write(value.as_bytes());
        let d = h.finish128();
        [d.h1, d.h2]
    }
}

/// State only the writer side (apply / flush / admin) touches.
#[derive(Debug, Default)]
struct Admin {
    cells: Vec<Chunk>,
    next_cell: u32,
    free_cells: Vec<u32>,
    quarantined_cells: Vec<u32>,
    next_slot: u32,
    free_slots: Vec<u32>,
    quarantined_slots: Vec<u32>,
}

impl Admin {
    fn alloc_cell(&mut self) -> u32 {
        if let Some(c) = self.free_cells.pop() {
            let cell = &self.cells[c as usize / CHUNK][c as usize % CHUNK];
            cell.bucket.set_tat(0);
            cell.quota.reset();
            return c;
        }
        let c = self.next_cell;
        self.next_cell += 1;
        if c as usize / CHUNK >= self.cells.len() {
            self.cells.push(new_chunk());
        }
        c
    }

    fn alloc_slot(&mut self) -> u32 {
        if let Some(s) = self.free_slots.pop() {
            return s;
        }
        let s = self.next_slot;
        self.next_slot += 1;
        s
    }
}

// ---------------------------------------------------------------------------------------------
// Engine
// ---------------------------------------------------------------------------------------------

/// The usage-plan engine. Share it with `Arc`; every method takes `&self`.
pub struct Engine {
    current: ArcSwap<Compiled>,
    store: Arc<dyn UsageStore>,
    clock: Arc<dyn Clock>,
    hashers: Hashers,
    account: Bucket,
    admin: Mutex<Admin>,
    spill: Mutex<Vec<UsageDelta>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("generation", &self.current.load().generation)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave the data half-updated in a way that matters
    // more than stopping the gateway would, so keep going with the inner value.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn ceil_secs(ns: u64) -> u64 {
    ns.div_ceil(NANOS_PER_SEC)
}

impl Engine {
    /// Validates and compiles `model`, then loads the current period counters from `store`.
    pub fn new(
        model: Model,
        store: Arc<dyn UsageStore>,
        clock: Arc<dyn Clock>,
    ) -> Result<Engine, ModelError> {
        model.validate()?;
        Engine::new_validated(model, store, clock)
    }

    /// [`Engine::new`] for a model the caller has just checked with [`Model::validate`].
    pub(crate) fn new_validated(
        model: Model,
        store: Arc<dyn UsageStore>,
        clock: Arc<dyn Clock>,
    ) -> Result<Engine, ModelError> {
        let hashers = Hashers::new();
        let mut admin = Admin::default();
        let mut spill = Vec::new();
        let model = Arc::new(model);
        let compiled = compile(
            &model,
            model.clone(),
            None,
            &mut admin,
            &hashers,
            &mut spill,
            1,
        )?;
        let engine = Engine {
            current: ArcSwap::from_pointee(compiled),
            store,
            clock,
            hashers,
            account: Bucket::new(),
            admin: Mutex::new(admin),
            spill: Mutex::new(spill),
        };
        engine.load_counters();
        Ok(engine)
    }

    fn load_counters(&self) {
        let counters = match self.store.load_periods() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "usage store unavailable at start-up; quota counters start at zero");
                return;
            }
        };
        let c = self.current.load();
        let today = i64::from(quota::day_of(self.clock.now()));
        for pc in counters {
            let Some(slot) = c.slot_of_id(&self.hashers, &pc.key_id) else {
                continue;
            };
            let Some(&plan_idx) = c.plan_index.get(&pc.plan_id) else {
                continue;
            };
            let plan = &c.plans[plan_idx as usize];
            let Some(q) = plan.quota else { continue };
            let bounds = quota::period_bounds(today, q.period, q.offset);
            if i64::from(pc.period_start) != bounds.start_day {
                continue;
            }
            let k = &c.keys[slot as usize];
            if let Some(m) = c.members(k).iter().find(|m| m.plan == plan_idx) {
                c.cell(m.cell)
                    .quota
                    .restore(pc.period_start, pc.used, pc.allowance);
            }
        }
    }

    /// Hot swap: validates and compiles `model` and publishes it atomically. Buckets and quota
    /// counters of keys, memberships and stage methods that still exist are kept.
    pub fn apply(&self, model: impl Into<Arc<Model>>) -> Result<(), ModelError> {
        self.apply_shared(model.into(), 1)
    }

    /// [`Engine::apply`] with every throttle divided over `nodes` gateways (see
    /// [`crate::control::scale`]). The engine keeps `model` itself, shared with the caller, so
    /// the configuration is held once however many keys it has.
    pub fn apply_shared(&self, model: Arc<Model>, nodes: u32) -> Result<(), ModelError> {
        model.validate()?;
        self.apply_validated(model, nodes)
    }

    /// [`Engine::apply_shared`] for a model the caller has just checked with
    /// [`Model::validate`]: the check is a pass over every key, not repeated here. With more
    /// than one node the throttles are divided in a temporary copy that is compiled and dropped.
    pub(crate) fn apply_validated(&self, model: Arc<Model>, nodes: u32) -> Result<(), ModelError> {
        let scaled = (nodes > 1).then(|| crate::control::scale(&model, nodes));
        let mut admin = lock(&self.admin);
        let old = self.current.load_full();
        let mut spill = Vec::new();
        let compiled = compile(
            scaled.as_ref().unwrap_or(&model),
            model.clone(),
            Some(&old),
            &mut admin,
            &self.hashers,
            &mut spill,
            old.generation + 1,
        )?;
        self.current.store(Arc::new(compiled));
        if !spill.is_empty() {
            lock(&self.spill).extend(spill);
        }
        Ok(())
    }

    /// The configuration last applied, as given (throttles not divided over nodes).
    pub fn snapshot(&self) -> Arc<Model> {
        Arc::clone(&self.current.load().model)
    }

    /// Generation of the current snapshot (1 at start, +1 per apply).
    pub fn generation(&self) -> u64 {
        self.current.load().generation
    }

    /// The clock the engine decides with.
    pub fn now(&self) -> u64 {
        self.clock.now()
    }

    /// Matches a request to a route. `api_id` `None` means "the only REST API"; `resource_path`
    /// is the path after the stage (`/pets/42`, `/` for the root). Literal segments win over
    /// `{param}` over `{proxy+}`, and on one resource the exact method over `ANY`; a resource
    /// without a matching method falls through to a less specific one (so `POST /pets/1` reaches
    /// `/{proxy+}` ANY when `/pets/{id}` only has GET). Query strings are ignored.
    pub fn resolve(
        &self,
        api_id: Option<&str>,
        stage: &str,
        http_method: &str,
        resource_path: &str,
    ) -> Option<Route> {
        let c = self.current.load();
        let api_idx = match api_id {
            Some(id) => *c.api_index.get(id)?,
            None if c.apis.len() == 1 => 0,
            None => return None,
        };
        let api = &c.apis[api_idx as usize];
        let stage_idx = *api.stages.get(stage)?;
        let st = &c.stages[stage_idx as usize];
        let tree = &c.trees[st.tree as usize];
        let path = resource_path.split('?').next().unwrap_or("");
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let mut params = Vec::new();
        let verb = http_method.to_ascii_uppercase();
        let (method_idx, matched_any) = match_node(&tree.root, &segs, &verb, &mut params)?;
        let m = &tree.methods[method_idx as usize];
        Some(Route {
            rest_api_id: api.id.clone(),
            stage: st.name.clone(),
            resource_path: m.resource_path.clone(),
            http_method: verb,
            declared_method: m.verb.clone(),
            matched_any,
            api_key_required: m.api_key_required,
            api_key_source: api.key_source,
            path_params: params,
            integration: st.integrations.get(method_idx as usize).cloned().flatten(),
            generation: c.generation,
            stage_idx,
            method_idx,
        })
    }

    /// Decides one request on `route` carrying `api_key` (the value, if any). Lock-free, no I/O.
    pub fn decide(&self, route: &Route, api_key: Option<&str>) -> Decision {
        self.decide_with(route, api_key, Quotas::Enforce)
    }

    /// [`Engine::decide`], with quotas enforced or waived (`--store-failure open` while the
    /// shared store that keeps them is unreachable). A waived quota refuses nothing, but every
    /// throttle still applies.
    pub fn decide_with(&self, route: &Route, api_key: Option<&str>, quotas: Quotas) -> Decision {
        let c = self.current.load();
        let now = self.clock.now();
        let Some((stage_idx, method_idx)) = c.locate(route) else {
            return Decision::Forbidden {
                reason: ForbiddenReason::RouteGone,
                key: None,
            };
        };
        let stage = &c.stages[stage_idx as usize];
        let method = &c.trees[stage.tree as usize].methods[method_idx as usize];
        let stage_layer = stage
            .buckets
            .get(method_idx as usize)
            .and_then(Option::as_ref);

        if !method.api_key_required {
            let mut layers = Layers::new();
            if let Some((p, b)) = stage_layer {
                layers.push(Layer::StageMethod, *p, b);
            }
            layers.push(Layer::Account, c.account, &self.account);
            return match layers.acquire(now) {
                Ok(()) => Decision::Allow {
                    key: None,
                    plan_id: None,
                    limits: Limits::default(),
                },
                Err(r) if self.rewound(&layers, &r) => self.decide_with(route, api_key, quotas),
                Err(r) => Decision::Throttled {
                    layer: r.layer,
                    retry_after_ns: r.retry_after_ns,
                    key: None,
                    plan_id: None,
                    limits: Limits::default(),
                },
            };
        }

        // With `apiKeySource` AUTHORIZER the key can only come from a custom authorizer's
        // `usageIdentifierKey`; this gateway runs no authorizers, so such a method refuses
        // every request (fail closed) rather than take the header AWS would ignore.
        let api_key = api_key.filter(|_| route.api_key_source == ApiKeySource::Header);
        let Some(value) = api_key else {
            return Decision::Forbidden {
                reason: ForbiddenReason::MissingKey,
                key: None,
            };
        };
        let digest = self.hashers.digest(value);
        let Some(slot) = c.by_value.find(digest[0], |s, first_cell| {
            if let Some(cell) = c.cell_hint(first_cell) {
                prefetch(cell);
            }
            let k = &c.keys[s as usize];
            k.live && k.digest == digest
        }) else {
            return Decision::Forbidden {
                reason: ForbiddenReason::InvalidKey,
                key: None,
            };
        };
        let k = &c.keys[slot as usize];
        let key = KeyRef {
            id: Id::new(c.key_id(k)),
            slot,
        };
        if !k.enabled {
            return Decision::Forbidden {
                reason: ForbiddenReason::DisabledKey,
                key: Some(key),
            };
        }
        // The first membership is inline in the key record; others need the members list.
        let (plan_idx, cell_idx, member_no) =
            if k.members_len > 0 && c.plan_covers(&c.plans[k.first_plan as usize], stage_idx) {
                (k.first_plan, k.first_cell, 0)
            } else {
                match c
                    .members(k)
                    .iter()
                    .enumerate()
                    .find(|(_, m)| c.plan_covers(&c.plans[m.plan as usize], stage_idx))
                {
                    Some((i, m)) => (m.plan, m.cell, i),
                    None => {
                        return Decision::Forbidden {
                            reason: ForbiddenReason::NoPlanForStage,
                            key: Some(key),
                        };
                    }
                }
            };
        let plan = &c.plans[plan_idx as usize];
        let plan_id = Id::new(&plan.id);
        let cell = c.cell(cell_idx);

        let mut layers = Layers::new();
        if !plan.pm.is_empty()
            && let Some(member) = c.members(k).get(member_no)
            && let Some(pm) = &member.pm
            && let Some(i) = plan.pm.iter().position(|e| {
                e.stage == stage_idx
                    && e.method == method_idx
                    && (e.verb == method.verb || e.verb == route.http_method)
            })
            && let Some(b) = pm.get(i)
        {
            layers.push(Layer::PlanMethod, plan.pm[i].params, b);
        }
        if let Some((p, _, _)) = plan.throttle {
            layers.push(Layer::Plan, p, &cell.bucket);
        }
        if let Some((p, b)) = stage_layer {
            layers.push(Layer::StageMethod, *p, b);
        }
        layers.push(Layer::Account, c.account, &self.account);

        let day = quota::day_of(now);
        let bounds = plan.period(day).map(|(_, b)| b);
        let quota_status = |state: quota::QuotaState, q: CQuota, b: PeriodBounds| QuotaStatus {
            limit: state.limit,
            remaining: state.remaining,
            used: state.used,
            period: q.period,
            reset_at_ns: b.end_ns(),
            reset_secs: ceil_secs(b.end_ns().saturating_sub(now)),
            window_secs: b.len_secs(),
        };
        let throttle_status = |now: u64| {
            plan.throttle.map(|(p, rate, burst)| {
                let (tokens, until_full) = cell.bucket.status(&p, now);
                ThrottleStatus {
                    rate,
                    burst,
                    remaining: tokens.min(burst),
                    reset_secs: ceil_secs(until_full),
                }
            })
        };
        let current_quota = || match (plan.quota, bounds) {
            (Some(q), Some(b)) => Some(quota_status(
                cell.quota.state(b.start_day as u32, q.limit),
                q,
                b,
            )),
            _ => None,
        };

        let throttled = |r: limit::Rejected| Decision::Throttled {
            layer: r.layer,
            retry_after_ns: r.retry_after_ns,
            key: Some(key),
            plan_id: Some(plan_id),
            limits: Limits {
                quota: current_quota(),
                throttle: throttle_status(now),
            },
        };
        if let Err(r) = layers.peek(now) {
            if self.rewound(&layers, &r) {
                return self.decide_with(route, api_key, quotas);
            }
            return throttled(r);
        }
        let mut quota_after = None;
        let mut quota_taken = false;
        if let (Some(q), Some(b)) = (plan.quota, bounds) {
            match cell.quota.try_acquire(b.start_day as u32, q.limit) {
                Ok(state) => {
                    quota_taken = true;
                    quota_after = Some(quota_status(state, q, b));
                }
                Err(state) if quotas == Quotas::Waive => {
                    quota_after = Some(quota_status(state, q, b));
                }
                Err(state) => {
                    return Decision::QuotaExceeded {
                        reset_at_ns: b.end_ns(),
                        key,
                        plan_id,
                        limits: Limits {
                            quota: Some(quota_status(state, q, b)),
                            throttle: throttle_status(now),
                        },
                    };
                }
            }
        }
        if let Err(r) = layers.commit(now) {
            if quota_taken && let Some(b) = bounds {
                cell.quota.refund(b.start_day as u32);
            }
            return throttled(r);
        }
        if let Some((old_day, count)) = cell.quota.record(day) {
            self.spill_old_day(&c, plan, key.id.as_str(), old_day, count);
        }
        Decision::Allow {
            key: Some(key),
            plan_id: Some(plan_id),
            limits: Limits {
                quota: quota_after,
                throttle: throttle_status(now),
            },
        }
    }

    /// After a throttle rejection: whether it came from buckets the clock has since been
    /// stepped back behind, now restarted (see [`Layers::rewind`]). The request is then decided
    /// again; nothing was taken by the rejected attempt.
    #[cold]
    fn rewound(&self, layers: &Layers<'_>, r: &limit::Rejected) -> bool {
        r.retry_after_ns > limit::CLOCK_STEP_NS && layers.rewind(self.clock.now())
    }

    #[cold]
    fn spill_old_day(&self, _c: &Compiled, plan: &CPlan, key_id: &str, day: u32, count: u64) {
        let period_start = period_start_of(plan, day);
        lock(&self.spill).push(UsageDelta {
            plan_id: plan.id.clone(),
            key_id: key_id.to_string(),
            day,
            period_start,
            count,
        });
    }

    /// Writes the admitted requests counted since the last flush to the store, in one batch.
    /// Call it every second and at shutdown. On a store error the deltas are kept for the next
    /// flush. In fleet mode the period totals the store returns raise the local counters.
    pub fn flush(&self) -> Result<FlushStats, StoreError> {
        let _admin = lock(&self.admin);
        let c = self.current.load_full();
        let now = self.clock.now();
        let today = quota::day_of(now);
        let mut batch = std::mem::take(&mut *lock(&self.spill));
        // Index into `batch` -> cell to merge the returned total into (current period only).
        let mut merges: Vec<(usize, u32, u32)> = Vec::new();
        for k in c.keys.iter().filter(|k| k.live) {
            for m in c.members(k) {
                let cell = c.cell(m.cell);
                let Some((day, count)) = cell.quota.take_pending() else {
                    continue;
                };
                let plan = &c.plans[m.plan as usize];
                let period_start = period_start_of(plan, day);
                if plan.quota.is_some() && day == today {
                    merges.push((batch.len(), m.cell, period_start));
                }
                batch.push(UsageDelta {
                    plan_id: plan.id.clone(),
                    key_id: c.key_id(k).to_string(),
                    day,
                    period_start,
                    count,
                });
            }
        }
        if batch.is_empty() {
            return Ok(FlushStats::default());
        }
        match self.store.add(&batch) {
            Ok(totals) => {
                for (i, cell, start) in merges {
                    if let Some(&t) = totals.get(i) {
                        c.cell(cell).quota.merge_total(start, t);
                    }
                }
                Ok(FlushStats {
                    deltas: batch.len(),
                    requests: batch.iter().map(|d| d.count).sum(),
                })
            }
            Err(e) => {
                lock(&self.spill).extend(batch);
                Err(e)
            }
        }
    }

    /// Slots of all keys, for the kernel maps.
    pub fn key_slots(&self) -> Vec<KeySlot> {
        let c = self.current.load();
        c.keys
            .iter()
            .enumerate()
            .filter(|(_, k)| k.live)
            .map(|(slot, k)| KeySlot {
                key_id: c.key_id(k).to_string(),
                slot: slot as u32,
                enabled: k.enabled,
                plans: c
                    .members(k)
                    .iter()
                    .map(|m| {
                        let p = &c.plans[m.plan as usize];
                        SlotPlan {
                            plan_id: p.id.clone(),
                            throttle: p.throttle.map(|(_, r, b)| (r, b)),
                            params: p.throttle.map(|(g, _, _)| g),
                        }
                    })
                    .collect(),
            })
            .collect()
    }

    /// The slot of a key id.
    pub fn key_slot(&self, key_id: &str) -> Option<u32> {
        self.current.load().slot_of_id(&self.hashers, key_id)
    }

    fn member_cell(
        &self,
        c: &Compiled,
        plan_id: &str,
        key_id: &str,
    ) -> Result<(u32, u32), ModelError> {
        let &plan_idx = c
            .plan_index
            .get(plan_id)
            .ok_or_else(ModelError::unknown_usage_plan)?;
        let slot = c
            .slot_of_id(&self.hashers, key_id)
            .ok_or_else(ModelError::unknown_api_key)?;
        let k = &c.keys[slot as usize];
        let m = c
            .members(k)
            .iter()
            .find(|m| m.plan == plan_idx)
            .ok_or_else(ModelError::unknown_api_key)?;
        Ok((plan_idx, m.cell))
    }

    /// Quota status of a key in a plan right now (`None` when the plan has no quota).
    pub fn quota_status(
        &self,
        plan_id: &str,
        key_id: &str,
    ) -> Result<Option<QuotaStatus>, ModelError> {
        let c = self.current.load();
        let (plan_idx, cell) = self.member_cell(&c, plan_id, key_id)?;
        let now = self.clock.now();
        let Some(q) = c.plans[plan_idx as usize].quota else {
            return Ok(None);
        };
        let b = quota::period_bounds(i64::from(quota::day_of(now)), q.period, q.offset);
        let s = c.cell(cell).quota.state(b.start_day as u32, q.limit);
        Ok(Some(QuotaStatus {
            limit: s.limit,
            remaining: s.remaining,
            used: s.used,
            period: q.period,
            reset_at_ns: b.end_ns(),
            reset_secs: ceil_secs(b.end_ns().saturating_sub(now)),
            window_secs: b.len_secs(),
        }))
    }

    /// UpdateUsage (`replace /remaining`): the key has `remaining` requests left in the current
    /// period; the next period starts from the plan's limit again. A plan without a quota is 400.
    pub fn set_remaining(
        &self,
        plan_id: &str,
        key_id: &str,
        remaining: u64,
    ) -> Result<(), EngineError> {
        let _admin = lock(&self.admin);
        let c = self.current.load_full();
        let (plan_idx, cell) = self.member_cell(&c, plan_id, key_id)?;
        let Some(q) = c.plans[plan_idx as usize].quota else {
            return Err(ModelError::bad_request(format!(
                "Usage Plan {plan_id} does not have a quota"
            ))
            .into());
        };
        let now = self.clock.now();
        let today = quota::day_of(now);
        let b = quota::period_bounds(i64::from(today), q.period, q.offset);
        let start = b.start_day as u32;
        // Stored first: an override the store refused is not in force either.
        let quota = &c.cell(cell).quota;
        let allowance = quota.allowance_for(start, remaining);
        self.store
            .set_allowance(plan_id, key_id, start, allowance, today)?;
        quota.set_allowance(start, allowance);
        Ok(())
    }

    /// GetUsage: per key of the plan (or just `key_id`), one `[used, remaining]` per day from
    /// `start` to `end` inclusive. Flushes first so the answer includes the last requests.
    /// `remaining` is the quota left at the end of that day: the allowance in force (the latest
    /// UpdateUsage of the period up to that day, else the plan limit) minus the period's usage up
    /// to that day; 0 for a plan without a quota.
    pub fn usage(
        &self,
        plan_id: &str,
        key_id: Option<&str>,
        start: time::Date,
        end: time::Date,
    ) -> Result<Usage, EngineError> {
        let first = date_to_day(start)?;
        let last = date_to_day(end)?;
        if last < first {
            return Err(
                ModelError::bad_request("The end date must not be before the start date").into(),
            );
        }
        if last - first >= MAX_USAGE_DAYS {
            return Err(ModelError::bad_request(format!(
                "The date range must not exceed {MAX_USAGE_DAYS} days"
            ))
            .into());
        }
        self.flush()?;
        let c = self.current.load_full();
        let &plan_idx = c
            .plan_index
            .get(plan_id)
            .ok_or_else(ModelError::unknown_usage_plan)?;
        let plan = &c.plans[plan_idx as usize];
        let keys: Vec<String> = match key_id {
            Some(k) => {
                c.slot_of_id(&self.hashers, k)
                    .ok_or_else(ModelError::unknown_api_key)?;
                c.model
                    .usage_plan_keys
                    .iter()
                    .filter(|u| u.usage_plan_id == plan_id && u.key_id == k)
                    .map(|u| u.key_id.clone())
                    .collect()
            }
            None => c
                .model
                .usage_plan_keys
                .iter()
                .filter(|u| u.usage_plan_id == plan_id)
                .map(|u| u.key_id.clone())
                .collect(),
        };
        // Read from the start of the first day's period so remaining can be carried forward.
        let read_from = match plan.quota {
            Some(q) => quota::period_bounds(first, q.period, q.offset).start_day,
            None => first,
        };
        let records = self.store.history(
            plan_id,
            key_id,
            u32::try_from(read_from).unwrap_or(0),
            u32::try_from(last).unwrap_or(u32::MAX),
        )?;
        let mut by_key: HashMap<&str, BTreeMap<u32, (u64, Option<u64>)>> = HashMap::new();
        for r in &records {
            by_key
                .entry(r.key_id.as_str())
                .or_default()
                .insert(r.day, (r.used, r.allowance));
        }
        let mut items = BTreeMap::new();
        for key in keys {
            let days = by_key.get(key.as_str());
            let mut out = Vec::new();
            // (period start, usage so far in the period, allowance in force)
            let mut period: Option<(i64, u64, u64)> = None;
            for d in read_from..=last {
                let (used, allowance) = days
                    .and_then(|m| m.get(&(d as u32)))
                    .copied()
                    .unwrap_or((0, None));
                let remaining = match plan.quota {
                    None => 0,
                    Some(q) => {
                        let ps = quota::period_bounds(d, q.period, q.offset).start_day;
                        let (_, so_far, allowed) = match period {
                            Some(p) if p.0 == ps => p,
                            _ => (ps, 0, q.limit),
                        };
                        let so_far = so_far.saturating_add(used);
                        let allowed = allowance.unwrap_or(allowed);
                        period = Some((ps, so_far, allowed));
                        allowed.saturating_sub(so_far)
                    }
                };
                if d >= first {
                    out.push([used, remaining]);
                }
            }
            items.insert(key, out);
        }
        Ok(Usage {
            usage_plan_id: plan_id.to_string(),
            start_date: format_day(first),
            end_date: format_day(last),
            items,
        })
    }
}

fn period_start_of(plan: &CPlan, day: u32) -> u32 {
    match plan.quota {
        Some(q) => quota::period_bounds(i64::from(day), q.period, q.offset).start_day as u32,
        None => day,
    }
}

/// Days since the epoch of a date (400 for dates before 1970).
fn date_to_day(d: time::Date) -> Result<i64, ModelError> {
    let day = i64::from(d.to_julian_day()) - 2_440_588;
    if day < 0 {
        return Err(ModelError::bad_request("Invalid date specified"));
    }
    Ok(day)
}

fn format_day(day: i64) -> String {
    let (y, m, d) = quota::civil_from_days(day);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Parses a GetUsage date (`yyyy-MM-dd`), 400 `Invalid date specified` otherwise.
pub fn parse_usage_date(s: &str) -> Result<time::Date, ModelError> {
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    time::Date::parse(s, &fmt).map_err(|_| ModelError::bad_request("Invalid date specified"))
}

/// Picks the method for `verb` among a resource's methods: the exact verb, else `ANY`.
fn pick(methods: Option<&HashMap<String, u32>>, verb: &str) -> Option<(u32, bool)> {
    let m = methods?;
    match m.get(verb) {
        Some(&i) => Some((i, false)),
        None => m.get("ANY").map(|&i| (i, true)),
    }
}

/// Depth-first match: literal children before `{param}` before `{proxy+}`; a more specific
/// resource that lacks the method falls through to a less specific one that has it.
fn match_node(
    node: &Node,
    segs: &[&str],
    verb: &str,
    params: &mut Vec<(String, String)>,
) -> Option<(u32, bool)> {
    let Some((first, rest)) = segs.split_first() else {
        return pick(node.methods.as_ref(), verb);
    };
    if let Some(child) = node.literal.get(*first)
        && let Some(m) = match_node(child, rest, verb, params)
    {
        return Some(m);
    }
    if let Some((name, child)) = &node.param {
        let mark = params.len();
        params.push((name.clone(), (*first).to_string()));
        if let Some(m) = match_node(child, rest, verb, params) {
            return Some(m);
        }
        params.truncate(mark);
    }
    if let Some((name, child)) = &node.greedy
        && let Some(m) = pick(child.methods.as_ref(), verb)
    {
        params.push((name.clone(), segs.join("/")));
        return Some(m);
    }
    None
}

fn substitute_stage_vars(uri: &str, vars: &BTreeMap<String, String>) -> String {
    if !uri.contains("${stageVariables.") {
        return uri.to_string();
    }
    let mut out = uri.to_string();
    for (k, v) in vars {
        out = out.replace(&format!("${{stageVariables.{k}}}"), v);
    }
    out
}

/// Builds the route tree of one resource list, with each method's integration (indexed like
/// [`CTree::methods`]).
fn compile_tree(resources: &[Resource]) -> Result<(CTree, Vec<Option<&Integration>>), ModelError> {
    let mut tree = CTree::default();
    let mut integrations = Vec::new();
    for r in resources {
        let segs = parse_resource_path(&r.path)?;
        let mut node = &mut tree.root;
        for s in &segs {
            node = match s {
                Segment::Literal(l) => node.literal.entry(l.clone()).or_default(),
                Segment::Param(p) => {
                    &mut node
                        .param
                        .get_or_insert_with(|| (p.clone(), Box::default()))
                        .1
                }
                Segment::Greedy(p) => {
                    &mut node
                        .greedy
                        .get_or_insert_with(|| (p.clone(), Box::default()))
                        .1
                }
            };
        }
        let at = node.methods.get_or_insert_with(HashMap::new);
        for (verb, m) in &r.resource_methods {
            at.insert(verb.clone(), tree.methods.len() as u32);
            tree.methods.push(CMethod {
                resource_path: r.path.clone(),
                verb: verb.clone(),
                api_key_required: m.api_key_required,
            });
            integrations.push(m.method_integration.as_ref());
        }
    }
    Ok((tree, integrations))
}

/// Compiles `model` (validated, throttles already divided over the nodes) into a snapshot,
/// reusing the state of `old` for everything that still exists. The snapshot keeps `given`,
/// the configuration as the control plane holds it, without copying it.
fn compile(
    model: &Model,
    given: Arc<Model>,
    old: Option<&Compiled>,
    admin: &mut Admin,
    hashers: &Hashers,
    spill: &mut Vec<UsageDelta>,
    generation: u64,
) -> Result<Compiled, ModelError> {
    // Stage buckets of the old snapshot by (api, stage, path, verb).
    let mut old_stage_buckets: HashMap<(&str, &str, &str, &str), &Arc<Bucket>> = HashMap::new();
    if let Some(o) = old {
        for st in &o.stages {
            let api = &o.apis[st.api as usize];
            let tree = &o.trees[st.tree as usize];
            for (i, b) in st.buckets.iter().enumerate() {
                if let (Some((_, b)), Some(m)) = (b, tree.methods.get(i)) {
                    old_stage_buckets.insert((&api.id, &st.name, &m.resource_path, &m.verb), b);
                }
            }
        }
    }

    let mut apis = Vec::with_capacity(model.rest_apis.len());
    let mut api_index = HashMap::new();
    let mut trees = Vec::new();
    let mut stages = Vec::new();
    for (ai, api) in model.rest_apis.iter().enumerate() {
        // One tree per resource list the API's stages serve: `None` is the live resources,
        // `Some(i)` the snapshot of deployment `i`. Kept with each method's integration.
        let mut tree_of: HashMap<Option<usize>, (u32, Vec<Option<&Integration>>)> = HashMap::new();
        let mut stage_map = HashMap::new();
        for s in &api.stages {
            let source = api.served_deployment(s);
            let (tree_idx, templates) = match tree_of.entry(source) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => {
                    let (tree, templates) = compile_tree(api.served_resources(s))?;
                    trees.push(tree);
                    e.insert(((trees.len() - 1) as u32, templates))
                }
            };
            let methods = &trees[*tree_idx as usize].methods;
            let mut settings: HashMap<(String, String), (f64, i64)> = HashMap::new();
            for (k, v) in &s.method_settings {
                settings.insert(
                    parse_method_setting_key(k)?,
                    (v.throttling_rate_limit, v.throttling_burst_limit),
                );
            }
            let default = settings.get(&("*".to_string(), "*".to_string())).copied();
            let mut buckets = Vec::with_capacity(methods.len());
            let mut integrations = Vec::with_capacity(methods.len());
            for (m, template) in methods.iter().zip(templates.iter()) {
                let setting = settings
                    .get(&(m.resource_path.clone(), m.verb.clone()))
                    .copied()
                    .or(default);
                let b = match setting {
                    Some((rate, burst)) if rate >= 0.0 && burst >= 0 => {
                        let p = limit::params(rate, burst as u64);
                        let bucket = old_stage_buckets
                            .get(&(
                                api.id.as_str(),
                                s.stage_name.as_str(),
                                m.resource_path.as_str(),
                                m.verb.as_str(),
                            ))
                            .map(|b| Arc::clone(b))
                            .unwrap_or_default();
                        Some((p, bucket))
                    }
                    _ => None,
                };
                buckets.push(b);
                integrations.push(template.map(|i| {
                    RouteIntegration {
                        integration_type: i.integration_type,
                        uri: substitute_stage_vars(&i.uri, &s.variables),
                        timeout_ms: i.timeout_in_millis,
                        http_method: i
                            .http_method
                            .as_deref()
                            .filter(|m| !m.eq_ignore_ascii_case("ANY"))
                            .and_then(|m| http::Method::from_bytes(m.as_bytes()).ok()),
                    }
                }));
            }
            stage_map.insert(s.stage_name.clone(), stages.len() as u32);
            stages.push(CStage {
                api: ai as u32,
                tree: *tree_idx,
                name: s.stage_name.clone(),
                buckets,
                integrations,
            });
        }
        api_index.insert(api.id.clone(), ai as u32);
        apis.push(CApi {
            id: api.id.clone(),
            key_source: api.api_key_source,
            stages: stage_map,
        });
    }

    let mut plans = Vec::with_capacity(model.usage_plans.len());
    let mut plan_index = HashMap::new();
    for (pi, p) in model.usage_plans.iter().enumerate() {
        let mut cstages = Vec::new();
        let mut pm = Vec::new();
        for s in &p.api_stages {
            let Some(&ai) = api_index.get(&s.api_id) else {
                continue;
            };
            let api = &apis[ai as usize];
            let Some(&si) = api.stages.get(&s.stage) else {
                continue;
            };
            cstages.push(si);
            let tree = &trees[stages[si as usize].tree as usize];
            for (k, t) in &s.throttle {
                let (path, verb) = parse_plan_method_key(k)?;
                let Some((rate, burst)) = t.effective() else {
                    continue;
                };
                // A throttle for GET also applies to GET requests served by an ANY method.
                for (mi, m) in tree.methods.iter().enumerate() {
                    if m.resource_path == path && (m.verb == verb || m.verb == "ANY") {
                        pm.push(PmEntry {
                            stage: si,
                            method: mi as u32,
                            verb: verb.clone(),
                            params: limit::params(rate, burst),
                            name: format!("{}:{}{}", s.api_id, s.stage, k),
                        });
                    }
                }
            }
        }
        plan_index.insert(p.id.clone(), pi as u32);
        plans.push(CPlan {
            id: p.id.clone(),
            throttle: p
                .throttle
                .and_then(|t| t.effective())
                .map(|(r, b)| (limit::params(r, b), r, b)),
            quota: p.quota.map(|q| CQuota {
                limit: u64::try_from(q.limit).unwrap_or(0),
                period: q.period,
                offset: u32::try_from(q.offset).unwrap_or(0),
            }),
            stages: cstages,
            pm,
            bounds: AtomicU64::new(0),
        });
    }

    // Memberships by key id.
    let mut plans_of_key: foldhash::HashMap<&str, Vec<u32>> =
        foldhash::HashMapExt::with_capacity(model.usage_plan_keys.len());
    for upk in &model.usage_plan_keys {
        if let Some(&pi) = plan_index.get(&upk.usage_plan_id) {
            plans_of_key
                .entry(upk.key_id.as_str())
                .or_default()
                .push(pi);
        }
    }

    // Slots: quarantined ones from the previous apply become free now.
    let q_slots = std::mem::take(&mut admin.quarantined_slots);
    admin.free_slots.extend(q_slots);
    let q_cells = std::mem::take(&mut admin.quarantined_cells);
    admin.free_cells.extend(q_cells);

    let n = model.api_keys.len();
    let mut assigned: Vec<(u32, usize)> = Vec::with_capacity(n); // (slot, key index)
    let mut used_old_slots = vec![false; old.map_or(0, |o| o.keys.len())];
    let mut fresh = Vec::new();
    for (i, key) in model.api_keys.iter().enumerate() {
        match old.and_then(|o| o.slot_of_id(hashers, &key.id)) {
            Some(s) => {
                used_old_slots[s as usize] = true;
                assigned.push((s, i));
            }
            None => fresh.push(i),
        }
    }
    if let Some(o) = old {
        for (s, k) in o.keys.iter().enumerate() {
            if k.live && !used_old_slots[s] {
                admin.quarantined_slots.push(s as u32);
            }
        }
    }
    for i in fresh {
        let s = admin.alloc_slot();
        assigned.push((s, i));
    }
    let max_slot = assigned
        .iter()
        .map(|(s, _)| *s as usize + 1)
        .max()
        .unwrap_or(0);
    let mut keys = vec![KeyRec::default(); max_slot];
    let mut key_ids = String::new();
    let mut members = Vec::with_capacity(n);
    // Cells of the old snapshot that carry over, by cell index.
    let mut kept_cells = vec![false; admin.next_cell as usize];
    for &(slot, i) in &assigned {
        let key = &model.api_keys[i];
        let old_members: &[Member] = match old {
            Some(o) if (slot as usize) < o.keys.len() && o.keys[slot as usize].live => {
                o.members(&o.keys[slot as usize])
            }
            _ => &[],
        };
        let members_off = members.len() as u32;
        let mut count = 0u8;
        for &pi in plans_of_key
            .get(key.id.as_str())
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            if count == u8::MAX {
                break;
            }
            let plan = &plans[pi as usize];
            let prev = old.and_then(|o| {
                old_members
                    .iter()
                    .find(|m| o.plans[m.plan as usize].id == plan.id)
                    .map(|m| (o, m))
            });
            let cell = match prev {
                Some((_, m)) => {
                    debug_assert!(
                        (m.cell as usize) < kept_cells.len(),
                        "old cell beyond next_cell"
                    );
                    if let Some(kept) = kept_cells.get_mut(m.cell as usize) {
                        *kept = true;
                    }
                    m.cell
                }
                None => admin.alloc_cell(),
            };
            let pm = if plan.pm.is_empty() {
                None
            } else {
                match prev {
                    Some((o, m)) => {
                        let old_plan = &o.plans[m.plan as usize];
                        let same = old_plan.pm.len() == plan.pm.len()
                            && old_plan
                                .pm
                                .iter()
                                .zip(&plan.pm)
                                .all(|(a, b)| a.name == b.name);
                        match (&m.pm, same) {
                            (Some(arc), true) => Some(Arc::clone(arc)),
                            (old_pm, _) => {
                                let fresh: Arc<[Bucket]> = plan
                                    .pm
                                    .iter()
                                    .map(|e| {
                                        let b = Bucket::new();
                                        if let Some(op) = old_pm
                                            && let Some(j) =
                                                old_plan.pm.iter().position(|x| x.name == e.name)
                                            && let Some(ob) = op.get(j)
                                        {
                                            b.set_tat(ob.tat());
                                        }
                                        b
                                    })
                                    .collect();
                                Some(fresh)
                            }
                        }
                    }
                    None => Some(plan.pm.iter().map(|_| Bucket::new()).collect()),
                }
            };
            members.push(Member { plan: pi, cell, pm });
            count += 1;
        }
        let mut id_inline = [0u8; INLINE_ID];
        let id_off = if key.id.len() <= INLINE_ID {
            id_inline[..key.id.len()].copy_from_slice(key.id.as_bytes());
            0
        } else {
            let off = key_ids.len() as u32;
            key_ids.push_str(&key.id);
            off
        };
        let (first_plan, first_cell) = members
            .get(members_off as usize)
            .filter(|_| count > 0)
            .map_or((0, 0), |m| (m.plan, m.cell));
        keys[slot as usize] = KeyRec {
            digest: hashers.digest(&key.value),
            id_inline,
            id_off,
            members_off,
            first_plan,
            first_cell,
            id_len: key.id.len() as u8,
            members_len: count,
            enabled: key.enabled,
            live: true,
        };
    }
    // Cells of memberships that are gone: queue their unflushed usage, then quarantine them.
    if let Some(o) = old {
        for k in o.keys.iter().filter(|k| k.live) {
            for m in o.members(k) {
                if kept_cells.get(m.cell as usize).copied().unwrap_or(false) {
                    continue;
                }
                let plan = &o.plans[m.plan as usize];
                if let Some((day, count)) = o.cell(m.cell).quota.take_pending() {
                    spill.push(UsageDelta {
                        plan_id: plan.id.clone(),
                        key_id: o.key_id(k).to_string(),
                        day,
                        period_start: period_start_of(plan, day),
                        count,
                    });
                }
                admin.quarantined_cells.push(m.cell);
            }
        }
    }

    let by_value = SlotTable::build(
        keys.iter()
            .enumerate()
            .filter(|(_, k)| k.live)
            .map(|(s, k)| (k.digest[0], s as u32, k.first_cell)),
        n,
    );
    let by_id = SlotTable::build(
        assigned
            .iter()
            .map(|&(s, i)| (hashers.id.hash_one(model.api_keys[i].id.as_str()), s, 0)),
        n,
    );
    let account = model
        .account
        .throttle_settings
        .effective()
        .map_or(GcraParams::UNLIMITED, |(r, b)| limit::params(r, b));
    let cells = admin.cells.clone();
    Ok(Compiled {
        generation,
        model: given,
        apis,
        api_index,
        trees,
        stages,
        plans,
        plan_index,
        keys,
        key_ids,
        members,
        by_value,
        by_id,
        cells,
        account,
    })
}
