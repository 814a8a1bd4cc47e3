//! Fleet mode: several gateways share one Redis (or Redis Cluster) for their configuration and
//! their quota counters, so a key's quota holds across every gateway behind a load balancer.
//!
//! [`FleetStore`] implements [`UsageStore`] (the contract of [`crate::store`], with
//! [`crate::store::MemoryStore`] as the oracle of the tests) and [`ConfigStore`]. [`Watcher`]
//! keeps every node's engine on the latest configuration and on the live node count.
//!
//! # Layout in Redis
//!
//! | key | type | content |
//! |---|---|---|
//! | `gateway:{cfg}:version` | string | configuration version, +1 per save (missing = empty store) |
//! | `gateway:{cfg}:epoch` | string | random id set when the store is seeded; versions count within it |
//! | `gateway:{cfg}:seed` | string | `<version> <origin epoch> <origin version>` of the last seed |
//! | `gateway:{cfg}:saved` | string | `<save id> <version>` of the last save, to answer a resent save |
//! | `gateway:{cfg}:meta` | string | JSON of the model with its four collections empty |
//! | `gateway:{cfg}:<collection>` | hash | id → JSON of the entry (`usage_plan_keys`: `plan␟key`) |
//! | `gateway:{cfg}:<collection>:seq` | hash | id → order of the entry in the model |
//! | `gateway:{cfg}:changes` | channel | the new version, published by every save |
//! | `gateway:u:{plan␟key}:p` | hash | period counter: `s` start day, `u` used, `a` allowance |
//! | `gateway:u:{plan␟key}:d` | hash | day records: `u<day>` used, `a<day>` allowance set that day; `c` first day kept |
//! | `gateway:u:{plan␟key}:b<day>` | hash | `<period start>:<node>` → last batch id applied that day |
//! | `gateway:u:plans` | set | plan ids with usage |
//! | `gateway:u:{plan}:keys` | set | key ids with usage in the plan |
//! | `gateway:nodes` | sorted set | node id → Unix ms of its last heartbeat (Redis's clock) |
//!
//! The `{…}` parts are Redis Cluster hash tags: the configuration lives in one slot (a save is
//! one atomic script), and each (plan, key) has its counters in one slot (an increment is one
//! atomic script), so keys spread over the cluster. `␟` is U+001F. No script or command touches
//! keys of two slots (no `CROSSSLOT`); on a cluster the calls of a batch go one by one instead
//! of pipelined, and the change channel is subscribed on the URL's first node (a cluster
//! delivers a `PUBLISH` to every node; the version poll covers that node being down).
//!
//! Lifetimes: a period counter expires 32 days after its period's first day (the longest
//! period, a month, plus a day) plus one day of grace — or one day after its last write when
//! that is later; day records expire [`HISTORY_DAYS`] days after their key's last write, and
//! each write drops the records of days more than [`HISTORY_DAYS`] before the day it writes,
//! so GetUsage answers for at least the last year of an active key and a days hash holds at
//! most about 400 days. A day's batch marks expire [`MARKS_TTL`] after that day's last write.
//! An index entry goes when its key leaves the plan (or the plan is deleted) through this
//! module's save; entries of keys idle past their records' expiry stay (a read of an empty
//! hash each, bounded by the memberships ever made).
//!
//! # Configuration
//!
//! A save is one Lua script: it checks that the stored version is the one this node last loaded
//! or saved, writes only the rows that changed, bumps the version and publishes it. A node that
//! saw an older version gets a 409 `ConflictException` and the admin client retries (by then
//! [`ConfigStore::changed`] has brought the node up to date: every change first catches up).
//! Reads are consistent without a transaction: one pipeline reads the version, every row, and
//! the version again, and is retried when the two differ (saves are atomic, so an unchanged
//! version means no save ran in between). Order of entries: rows added at the end get
//! increasing sequence numbers; any other reordering rewrites the collection.
//!
//! Data loss (a Redis restarted without persistence, a flush): version numbers would restart
//! from 1 and could equal or undercut the ones nodes remember, so every node also remembers
//! the store's epoch, a random id set by the script that seeds an empty store. A node that
//! finds the version key missing seeds the store with the configuration it serves (one seed
//! wins: the script writes only into an empty store); a node that finds another epoch loads
//! the store's configuration, and only replaces a seed made from an older version of its own
//! origin while nothing was saved after that seed. So the newest configuration among the nodes
//! that notice first wins, and no change acknowledged after the seed is ever reverted. A
//! change acknowledged in the last instant before the loss, by a node that is not among the
//! first to notice, is lost with the store.
//!
//! # Usage
//!
//! [`UsageStore::add`] first merges the batch into an outbox keyed by (plan, key, day, period)
//! and then sends the whole outbox, one script call per entry, pipelined (one round trip on a
//! single Redis). When Redis cannot be reached the outbox is kept and `add` still succeeds:
//! the engine has already counted the requests locally, and the outbox is replayed when Redis
//! answers again. The outbox holds at most [`FleetOptions::max_pending`] distinct entries
//! (about 100 bytes each); increments of new entries beyond that are dropped and counted in
//! `gateway_store_dropped_requests_total`. Each send is a numbered batch; a batch whose answer
//! was lost (a timeout, a cut connection) stays in flight and is resent unchanged under the same
//! number before anything else, and Redis recognises a resend (the day's marks hash remembers
//! the last batch applied per period and node), so an outage neither loses nor double-counts
//! usage. At most one batch is in flight besides the outbox. A process remembers which pairs
//! it has put in the usage index; when an increment finds a pair's day records gone (the store
//! lost its data) it indexes the pair again at once. Usage still unconfirmed when the gateway
//! stops (the store was down at the last flush) is logged as an error with its request count.
//!
//! # Throttles
//!
//! Token buckets stay local (the request path never waits for Redis); each node takes its share
//! of every throttle instead. Every node heartbeats into `gateway:nodes` once a second; nodes
//! heard from in the last [`LIVE_WINDOW`] are live, the others are pruned, and a node leaving
//! cleanly removes itself. The live count `N` is handed to [`Control::set_nodes`], which runs
//! the engine on the configuration with every throttle divided by `N`. A higher count applies at
//! once; a lower one only when two heartbeats in a row saw it, so one heartbeat that finds the
//! others pruned (right after Redis comes back, say) does not raise every node's share. While
//! Redis is unreachable the last count stays.
//!
//! Every Redis call is bounded by [`FleetOptions::timeout`] (connect, read and write), so no
//! flush, admin call or start-up waits longer on a dead or hung Redis. A call on a kept
//! connection that the server has closed (its idle `timeout`, a restart) runs once more on a
//! new connection; a timeout is not retried. Whether the store is up (what `closed` and
//! `open` act on) is decided by the heartbeat alone, once a second; failures of other calls
//! are counted in `gateway_store_failures_total` but do not flip it. The reason is logged at
//! warn when the store goes down and again when the reason changes (a refused password after
//! a dropped connection), not once per call.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};
use redis::{Cmd, ConnectionLike, RedisError, RedisResult, Script, Value};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::control::{ConfigStore, Control, ControlError};
use crate::plan::{ApiKey, Model, ModelError, RestApi, UsagePlan, UsagePlanKey};
use crate::state::StateError;
use crate::store::{DayRecord, PeriodCounter, StoreError, UsageDelta, UsageStore};

/// Days a key's day records are kept after its last write.
pub const HISTORY_DAYS: u64 = 400;

const DAY_SECS: u64 = 86_400;
/// A day's batch marks outlive the day's last write by this long: a batch is resent within
/// this time of its first send, or counted again.
pub const MARKS_TTL: Duration = Duration::from_secs(2 * DAY_SECS);
/// A period counter outlives its first day by this many days (the longest period plus one).
const PERIOD_LIFE_DAYS: u64 = 32;
/// Separator inside composite ids (U+001F, never part of an id the admin API issues).
const SEP: char = '\u{1f}';

const VERSION: &str = "gateway:{cfg}:version";
const EPOCH: &str = "gateway:{cfg}:epoch";
const SEED: &str = "gateway:{cfg}:seed";
const SAVED: &str = "gateway:{cfg}:saved";
const META: &str = "gateway:{cfg}:meta";
const CHANNEL: &str = "gateway:{cfg}:changes";
const PLANS: &str = "gateway:u:plans";
const NODES: &str = "gateway:nodes";

/// How often a node announces itself in `gateway:nodes`.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A node whose last heartbeat is older than this no longer counts as live.
pub const LIVE_WINDOW: Duration = Duration::from_secs(3);

/// What a node does about keyed requests while the shared store is unreachable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FailureMode {
    /// Keep enforcing every limit from the last configuration and the local counters; the
    /// counts are reconciled when the store answers again. A key may then use up to its
    /// remaining quota on every node.
    #[default]
    Local,
    /// As `local`, but quota refusals are waived while the store is down (throttles still
    /// apply); requests admitted that way are not counted.
    Open,
    /// Answer keyed requests `503 {"message":"Service Unavailable"}` while the store is down.
    Closed,
}

impl FromStr for FailureMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "local" => Ok(FailureMode::Local),
            "open" => Ok(FailureMode::Open),
            "closed" => Ok(FailureMode::Closed),
            other => Err(format!("`{other}`: expected local, open or closed")),
        }
    }
}

impl std::fmt::Display for FailureMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FailureMode::Local => "local",
            FailureMode::Open => "open",
            FailureMode::Closed => "closed",
        })
    }
}

/// How to reach the shared store and how to behave when it is gone.
#[derive(Clone, Debug)]
pub struct FleetOptions {
    /// `redis://[:PASSWORD@]HOST:PORT[/DB]`, `rediss://…` (TLS), or
    /// `redis+cluster://HOST:PORT[,HOST:PORT…]` / `rediss+cluster://…` for Redis Cluster.
    pub url: String,
    /// Longest wait for one Redis call: connect, send and answer.
    pub timeout: Duration,
    /// Behaviour while Redis is unreachable.
    pub failure: FailureMode,
    /// Most distinct (plan, key, day) increments held while Redis is unreachable.
    pub max_pending: usize,
}

impl FleetOptions {
    /// Options with the defaults: 500 ms timeout, `local`, 100,000 pending entries.
    pub fn new(url: impl Into<String>) -> FleetOptions {
        FleetOptions {
            url: url.into(),
            timeout: Duration::from_millis(500),
            failure: FailureMode::Local,
            max_pending: 100_000,
        }
    }
}

/// Why the fleet store could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The URL is not one the store understands.
    #[error("--store `{url}`: {reason}")]
    Url {
        /// The URL, password removed.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Redis did not answer at start-up.
    #[error("cannot reach the store {store}: {reason}")]
    Unreachable {
        /// The store, password removed.
        store: String,
        /// What the client said.
        reason: String,
    },
    /// The stored configuration cannot be read.
    #[error("the configuration in the store {store} cannot be read: {reason}")]
    Corrupt {
        /// The store, password removed.
        store: String,
        /// What is wrong.
        reason: String,
    },
}

// ---------------------------------------------------------------------------------------------
// Health
// ---------------------------------------------------------------------------------------------

/// Whether the shared store answers, shared with the data plane and the metrics.
#[derive(Debug)]
pub struct Health {
    mode: FailureMode,
    up: AtomicBool,
    failures: AtomicU64,
    pending: AtomicU64,
    dropped: AtomicU64,
    version: AtomicU64,
    reloads: AtomicU64,
    nodes: AtomicU64,
    /// Set while the heartbeat runs: then it alone decides whether the store is up, and a call
    /// that fails elsewhere (a flush, an admin call) is counted but does not mark it down.
    heartbeat: AtomicBool,
    /// Kind of the failure last logged while down (see [`failure_kind`]; 0 while up), so that
    /// a change of reason (the connection dropped, then the password is refused) is logged.
    reason: AtomicU8,
}

impl Health {
    /// A store in `mode`, assumed reachable.
    pub fn new(mode: FailureMode) -> Health {
        Health {
            mode,
            up: AtomicBool::new(true),
            failures: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            version: AtomicU64::new(0),
            reloads: AtomicU64::new(0),
            nodes: AtomicU64::new(1),
            heartbeat: AtomicBool::new(false),
            reason: AtomicU8::new(0),
        }
    }

    /// The configured failure mode.
    pub fn mode(&self) -> FailureMode {
        self.mode
    }

    /// Whether the store answers: the last heartbeat succeeded (before the heartbeat starts:
    /// the last call).
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Whether a keyed request must be answered 503 now (`closed` and the store is down).
    pub fn refuse_keyed(&self) -> bool {
        self.mode == FailureMode::Closed && !self.is_up()
    }

    /// Whether a quota refusal must be waived now (`open` and the store is down).
    pub fn waive_quota(&self) -> bool {
        self.mode == FailureMode::Open && !self.is_up()
    }

    /// Configuration version this node serves.
    pub fn config_version(&self) -> u64 {
        self.version.load(Ordering::Relaxed)
    }

    /// Distinct increments waiting for the store.
    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }

    /// Live gateways this node divides its throttles by (1 until the first heartbeat).
    pub fn nodes(&self) -> u64 {
        self.nodes.load(Ordering::Relaxed)
    }

    fn succeeded(&self, store: &str) {
        self.reason.store(0, Ordering::Relaxed);
        if !self.up.swap(true, Ordering::AcqRel) {
            tracing::info!(
                store,
                "store reachable again; reconciling counts and configuration"
            );
        }
    }

    /// Counts a failed call; `decides` marks the store down, logging the reason once per state
    /// change (and again when the reason changes while down), never once per call.
    fn failed(&self, store: &str, error: &RedisError, decides: bool) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        if !decides {
            tracing::debug!(store, %error, "store call failed");
            return;
        }
        let (kind, reason) = failure_kind(error);
        let was_up = self.up.swap(false, Ordering::AcqRel);
        let before = self.reason.swap(kind, Ordering::Relaxed);
        if was_up {
            tracing::warn!(
                store,
                %error,
                reason,
                mode = %self.mode,
                "store unreachable; serving the last configuration and local counters"
            );
        } else if before != kind {
            tracing::warn!(store, %error, reason, "store still unreachable, for another reason");
        } else {
            tracing::debug!(store, %error, "store still unreachable");
        }
    }
}

/// A failure's kind (never 0) and its name for the logs.
fn failure_kind(e: &RedisError) -> (u8, &'static str) {
    if is_auth_failure(e) {
        (1, "authentication refused (check the password in --store)")
    } else if e.is_timeout() {
        (2, "no answer within --store-timeout-ms")
    } else if e.is_connection_refusal() {
        (3, "connection refused")
    } else if e.is_connection_dropped() {
        (4, "connection closed")
    } else if e.is_io_error() {
        (5, "I/O error")
    } else {
        (6, "the store refused the call")
    }
}

/// NOAUTH (a password is needed), WRONGPASS and NOPERM: no call can succeed until the
/// configuration is fixed.
fn is_auth_failure(e: &RedisError) -> bool {
    e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"))
}

/// The store's metrics for the Prometheus exposition (`gateway_store_*`, `gateway_config_*`).
#[derive(Debug, Clone)]
pub struct HealthMetrics(pub Arc<Health>);

impl Collector for HealthMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let h = &self.0;
        let gauges: [(&str, &str, i64); 4] = [
            (
                "store_up",
                "1 while the shared store answers",
                i64::from(h.is_up()),
            ),
            (
                "store_pending_deltas",
                "Distinct usage increments waiting for the shared store",
                i64::try_from(h.pending()).unwrap_or(i64::MAX),
            ),
            (
                "config_version",
                "Configuration version this node serves",
                i64::try_from(h.config_version()).unwrap_or(i64::MAX),
            ),
            (
                "fleet_nodes",
                "Live gateways sharing the store; this node's throttles are divided by it",
                i64::try_from(h.nodes()).unwrap_or(i64::MAX),
            ),
        ];
        for (name, help, value) in gauges {
            let g = ConstGauge::new(value);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        let counters = [
            (
                "store_failures",
                "Calls to the shared store that failed",
                h.failures.load(Ordering::Relaxed),
            ),
            (
                "store_dropped_requests",
                "Admitted requests not counted because the outbox was full",
                h.dropped.load(Ordering::Relaxed),
            ),
            (
                "config_reloads",
                "Configurations loaded after another node changed them",
                h.reloads.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in counters {
            let c = ConstCounter::new(value);
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------------------------

enum Target {
    Single(redis::Client),
    Cluster(redis::cluster::ClusterClient),
}

enum Conn {
    Single(redis::Connection),
    Cluster(Box<redis::cluster::ClusterConnection>),
}

impl Conn {
    fn like(&mut self) -> &mut dyn ConnectionLike {
        match self {
            Conn::Single(c) => c,
            Conn::Cluster(c) => c.as_mut(),
        }
    }

    fn pipelined(&self) -> bool {
        matches!(self, Conn::Single(_))
    }
}

/// Parsed `--store` URL: the clients and the name to log (no password).
struct Endpoint {
    target: Target,
    /// First node as a plain client, for the pub/sub listener.
    first: redis::Client,
    shown: String,
}

fn parse_url(url: &str, timeout: Duration) -> Result<Endpoint, FleetError> {
    let bad = |reason: String| FleetError::Url {
        url: redact(url),
        reason,
    };
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| bad("expected redis://HOST:PORT[/DB]".into()))?;
    let (plain, cluster) = match scheme {
        "redis" => ("redis", false),
        "rediss" => ("rediss", false),
        "redis+cluster" => ("redis", true),
        "rediss+cluster" => ("rediss", true),
        other => {
            return Err(bad(format!(
                "scheme `{other}` is not supported; use redis, rediss, redis+cluster or rediss+cluster"
            )));
        }
    };
    if plain == "rediss" {
        // rustls needs a process-wide crypto provider; a second install is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let (auth, hosts_path) = match rest.rsplit_once('@') {
        Some((auth, hosts)) => (Some(auth), hosts),
        None => (None, rest),
    };
    let (hosts, path) = match hosts_path.split_once('/') {
        Some((h, p)) => (h, Some(p)),
        None => (hosts_path, None),
    };
    if hosts.is_empty() {
        return Err(bad("needs a host".into()));
    }
    let node_url = |host: &str| {
        let mut u = format!("{plain}://");
        if let Some(a) = auth {
            u.push_str(a);
            u.push('@');
        }
        u.push_str(host);
        if let Some(p) = path.filter(|p| !p.is_empty()) {
            u.push('/');
            u.push_str(p);
        }
        u
    };
    let nodes: Vec<String> = hosts.split(',').map(node_url).collect();
    if !cluster && nodes.len() > 1 {
        return Err(bad(
            "several hosts need redis+cluster:// (Redis Cluster)".into()
        ));
    }
    let first = redis::Client::open(nodes[0].as_str()).map_err(|e| bad(e.to_string()))?;
    let target = if cluster {
        let c = redis::cluster::ClusterClientBuilder::new(nodes.clone())
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .build()
            .map_err(|e| bad(e.to_string()))?;
        Target::Cluster(c)
    } else {
        Target::Single(first.clone())
    };
    Ok(Endpoint {
        target,
        first,
        shown: redact(url),
    })
}

/// The URL without its password.
fn redact(url: &str) -> String {
    match (url.split_once("://"), url.rsplit_once('@')) {
        (Some((scheme, _)), Some((_, hosts))) => format!("{scheme}://***@{hosts}"),
        _ => url.to_string(),
    }
}

fn single_connection(client: &redis::Client, timeout: Duration) -> RedisResult<redis::Connection> {
    let c = client.get_connection_with_timeout(timeout)?;
    c.set_read_timeout(Some(timeout))?;
    c.set_write_timeout(Some(timeout))?;
    Ok(c)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded data are caches and queues that stay consistent between statements.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One lazily (re)connected connection, used by one kind of caller so that a slow flush never
/// queues an admin call behind it.
struct Link {
    endpoint: Arc<Endpoint>,
    timeout: Duration,
    health: Arc<Health>,
    conn: Mutex<Option<Conn>>,
    /// The heartbeat's link: its calls decide whether the store is up.
    sentinel: bool,
}

impl Link {
    fn new(endpoint: Arc<Endpoint>, timeout: Duration, health: Arc<Health>) -> Link {
        Link {
            endpoint,
            timeout,
            health,
            conn: Mutex::new(None),
            sentinel: false,
        }
    }

    fn sentinel(mut self) -> Link {
        self.sentinel = true;
        self
    }

    fn connect(&self) -> RedisResult<Conn> {
        Ok(match &self.endpoint.target {
            Target::Single(c) => Conn::Single(single_connection(c, self.timeout)?),
            Target::Cluster(c) => Conn::Cluster(Box::new(c.get_connection()?)),
        })
    }

    /// Runs `f` on the connection, connecting first when needed. Any error drops the connection
    /// (after a timeout its replies are out of step). When a connection kept from an earlier
    /// call turns out closed (Redis's idle `timeout`, a restart), `f` runs once more on a new
    /// one: the server closed it between calls, so the call did not run (and every call of
    /// this module may run twice anyway: reads, idempotent writes, batches and saves that
    /// recognise their own resend). A timeout is not retried: the call may still be running.
    ///
    /// Every failure is counted; it marks the store down only on the heartbeat's link, or,
    /// before the heartbeat runs, when it is an outage (a dead or unreachable Redis).
    fn run<T>(&self, mut f: impl FnMut(&mut Conn) -> RedisResult<T>) -> RedisResult<T> {
        let mut slot = lock(&self.conn);
        let reused = slot.is_some();
        let mut result = self.attempt(&mut slot, &mut f);
        if let Err(e) = &result
            && reused
            && is_closed(e)
        {
            tracing::debug!(
                store = %self.endpoint.shown,
                error = %e,
                "connection closed by the store; calling again on a new one"
            );
            result = self.attempt(&mut slot, &mut f);
        }
        let decides = self.sentinel || !self.health.heartbeat.load(Ordering::Relaxed);
        match &result {
            Ok(_) if decides => self.health.succeeded(&self.endpoint.shown),
            Ok(_) => {}
            Err(e) => self.health.failed(
                &self.endpoint.shown,
                e,
                decides && (self.sentinel || is_outage(e)),
            ),
        }
        result
    }

    fn attempt<T>(
        &self,
        slot: &mut Option<Conn>,
        f: &mut impl FnMut(&mut Conn) -> RedisResult<T>,
    ) -> RedisResult<T> {
        let result = match slot {
            Some(conn) => f(conn),
            None => match self.connect() {
                Ok(conn) => f(slot.insert(conn)),
                Err(e) => Err(e),
            },
        };
        if result.is_err() {
            *slot = None;
        }
        result
    }
}

fn is_outage(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
        || is_auth_failure(e)
}

/// The connection was closed by the other end (not: it timed out, or was never made).
fn is_closed(e: &RedisError) -> bool {
    e.is_connection_dropped() && !e.is_timeout() && !e.is_connection_refusal()
}

/// One script call or plain command of a batch.
enum Call<'a> {
    Script {
        script: &'a Script,
        keys: Vec<String>,
        args: Vec<String>,
    },
    Plain(Cmd),
}

impl Call<'_> {
    fn run_alone(&self, con: &mut dyn ConnectionLike) -> RedisResult<Value> {
        match self {
            Call::Script { script, keys, args } => {
                let mut inv = script.prepare_invoke();
                for k in keys {
                    inv.key(k);
                }
                for a in args {
                    inv.arg(a);
                }
                inv.invoke(con)
            }
            Call::Plain(cmd) => cmd.query(con),
        }
    }
}

/// Runs `calls` in one pipeline on a single Redis (scripts by digest, re-sent in full where the
/// server lost its script cache), one by one on a cluster. Server errors fail the batch.
fn run_calls(conn: &mut Conn, calls: &[Call<'_>]) -> RedisResult<Vec<Value>> {
    if calls.is_empty() {
        return Ok(Vec::new());
    }
    if !conn.pipelined() {
        return calls.iter().map(|c| c.run_alone(conn.like())).collect();
    }
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for call in calls {
        match call {
            Call::Script { script, keys, args } => {
                pipe.cmd("EVALSHA")
                    .arg(script.get_hash())
                    .arg(keys.len())
                    .arg(keys)
                    .arg(args);
            }
            Call::Plain(cmd) => {
                pipe.add_command(cmd.clone());
            }
        }
    }
    let mut out: Vec<Value> = pipe.query(conn.like())?;
    for (value, call) in out.iter_mut().zip(calls) {
        if let Value::ServerError(e) = value {
            if e.code() == "NOSCRIPT" {
                *value = call.run_alone(conn.like())?;
            } else {
                return Err(e.clone().into());
            }
        }
    }
    Ok(out)
}

fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Int(n) => u64::try_from(*n).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn as_map(v: &Value) -> Vec<(String, String)> {
    let pairs: Vec<(&Value, &Value)> = match v {
        Value::Map(m) => m.iter().map(|(a, b)| (a, b)).collect(),
        Value::Array(a) => a
            .chunks(2)
            .filter_map(|c| Some((c.first()?, c.get(1)?)))
            .collect(),
        _ => Vec::new(),
    };
    pairs
        .into_iter()
        .filter_map(|(k, v)| Some((as_string(k)?, as_string(v)?)))
        .collect()
}

fn as_list(v: &Value) -> Vec<String> {
    match v {
        Value::Array(a) | Value::Set(a) => a.iter().filter_map(as_string).collect(),
        _ => Vec::new(),
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

// ---------------------------------------------------------------------------------------------
// Scripts
// ---------------------------------------------------------------------------------------------

/// Lua shared by the usage scripts: `trim(days, keep)` drops the `u<day>` and `a<day>` fields
/// of days before `keep` from a days hash. The hash's `c` field is the first day kept so far,
/// so a write usually deletes nothing or one day's fields; a hash without it (new, or written
/// by an older gateway, which kept batch marks in it) and a jump of more than 64 days are
/// trimmed by one pass over its fields instead (at most the history's 800 or so).
const TRIM_LUA: &str = r"
local function sweep(days, keep)
  for _, f in ipairs(redis.call('HKEYS', days)) do
    local kind, day = string.sub(f, 1, 1), tonumber(string.sub(f, 2))
    if kind == 'b' or ((kind == 'u' or kind == 'a') and day and day < keep) then
      redis.call('HDEL', days, f)
    end
  end
end
local function trim(days, keep)
  local c = redis.call('HGET', days, 'c')
  if not c then
    if redis.call('EXISTS', days) == 1 then sweep(days, keep) end
  else
    c = tonumber(c)
    if c >= keep then return end
    if keep - c > 64 then
      sweep(days, keep)
    else
      for d = c, keep - 1 do redis.call('HDEL', days, 'u' .. d, 'a' .. d) end
    end
  end
  redis.call('HSET', days, 'c', keep)
end
";

/// KEYS: period hash, days hash, batch marks of the day. ARGV: day, period start, count, period
/// expiry (Unix s), day records' TTL (s), node id, batch id, marks' TTL (s), first day of
/// history kept. Returns {period total after the increment (the count alone for a delta of an
/// older period, as the reference store does), 1 if the days hash was created by this call}.
///
/// Exactly once: the day's marks hash remembers, per (period, node), the last batch id applied.
/// A batch whose answer was lost (a timeout) is resent unchanged under the same id, and the
/// resend is recognised and not counted again. Batch ids of a node only grow. The marks expire
/// [`MARKS_TTL`] after their day's last write, so they are bounded by one or two days of nodes.
const ADD_LUA: &str = r"
local ps = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local mark = ARGV[2] .. ':' .. ARGV[6]
local seen = tonumber(redis.call('HGET', KEYS[3], mark) or '0')
if seen >= tonumber(ARGV[7]) then
  local start = tonumber(redis.call('HGET', KEYS[1], 's') or '0')
  if start == ps then
    return {tonumber(redis.call('HGET', KEYS[1], 'u') or '0'), 0}
  end
  return {n, 0}
end
redis.call('HSET', KEYS[3], mark, ARGV[7])
redis.call('EXPIRE', KEYS[3], ARGV[8])
local created = 0
if redis.call('EXISTS', KEYS[2]) == 0 then created = 1 end
trim(KEYS[2], tonumber(ARGV[9]))
redis.call('HINCRBY', KEYS[2], 'u' .. ARGV[1], n)
redis.call('EXPIRE', KEYS[2], ARGV[5])
local start = tonumber(redis.call('HGET', KEYS[1], 's') or '0')
if start == ps then
  local t = redis.call('HINCRBY', KEYS[1], 'u', n)
  redis.call('EXPIREAT', KEYS[1], ARGV[4])
  return {t, created}
elseif start < ps then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 's', ARGV[2], 'u', ARGV[3])
  redis.call('EXPIREAT', KEYS[1], ARGV[4])
end
return {n, created}
";

/// KEYS: period hash, days hash. ARGV: period start, allowance, day, period expiry, days TTL,
/// first day of history kept.
const ALLOWANCE_LUA: &str = r"
local start = tonumber(redis.call('HGET', KEYS[1], 's') or '0')
if start ~= tonumber(ARGV[1]) then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 's', ARGV[1], 'u', '0')
end
redis.call('HSET', KEYS[1], 'a', ARGV[2])
redis.call('EXPIREAT', KEYS[1], ARGV[4])
trim(KEYS[2], tonumber(ARGV[6]))
redis.call('HSET', KEYS[2], 'a' .. ARGV[3], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[5])
return 1
";

/// Lua shared by the configuration scripts. Their KEYS: version, epoch, seed, saved, meta, then
/// rows and seq hash of each of the four collections. `write_rows(i)` applies the rows part
/// of ARGV from index `i` (per collection: clear flag, delete count, ids, put count, (id,
/// JSON, seq or empty) triples) and returns the index after it; `own(e)` answers a call whose
/// save id (ARGV[3]) is the last save's: a save resent after its answer was lost.
const CONFIG_LUA: &str = r"
local function write_rows(i)
  for c = 0, 3 do
    local rows, seqs = KEYS[6 + 2 * c], KEYS[7 + 2 * c]
    if ARGV[i] == '1' then redis.call('DEL', rows, seqs) end
    i = i + 1
    local nd = tonumber(ARGV[i]); i = i + 1
    for _ = 1, nd do
      redis.call('HDEL', rows, ARGV[i]); redis.call('HDEL', seqs, ARGV[i]); i = i + 1
    end
    local np = tonumber(ARGV[i]); i = i + 1
    for _ = 1, np do
      redis.call('HSET', rows, ARGV[i], ARGV[i + 1])
      if ARGV[i + 2] ~= '' then redis.call('HSET', seqs, ARGV[i], ARGV[i + 2]) end
      i = i + 3
    end
  end
  return i
end
local function own(e)
  local id, sv = string.match(redis.call('GET', KEYS[4]) or '', '^(%S+) (%d+)$')
  if id == ARGV[3] then return {1, tonumber(sv), e} end
  return nil
end
local function commit(i, e)
  local nv = redis.call('INCR', KEYS[1])
  redis.call('SET', KEYS[4], ARGV[3] .. ' ' .. nv)
  redis.call('PUBLISH', ARGV[i], nv)
  return {1, nv, e}
end
";

/// A save. ARGV: expected version, expected epoch (empty: none), save id, epoch to set if the
/// store has none, meta JSON (empty: unchanged), the rows, last the channel. Returns {1, new
/// version, epoch}, or {0, stored version, stored epoch} when the store is not at the expected
/// version of the expected epoch (another node saved, or the store was seeded again).
const SAVE_LUA: &str = r"
local v = tonumber(redis.call('GET', KEYS[1]) or '0')
local e = redis.call('GET', KEYS[2]) or ''
if v ~= tonumber(ARGV[1]) or e ~= ARGV[2] then
  return own(e) or {0, v, e}
end
if e == '' then e = ARGV[4]; redis.call('SET', KEYS[2], e) end
if ARGV[5] ~= '' then redis.call('SET', KEYS[5], ARGV[5]) end
return commit(write_rows(6), e)
";

/// A seed: the whole configuration, written into an empty store under a new epoch. ARGV: origin
/// version and epoch (the configuration's version and epoch before the store lost it; 0 and
/// empty for none), save id, new epoch, meta JSON, the rows (each collection cleared), the
/// channel. A store already seeded is replaced only while no save followed its seed and the
/// seed came from an older version of this one's origin epoch: so of the nodes that find the
/// store empty at once, the one with the newest configuration wins, and nothing saved after a
/// seed is ever overwritten. The `seed` key holds `<version> <origin epoch> <origin version>`.
/// Returns as [`SAVE_LUA`].
const SEED_LUA: &str = r"
local v = redis.call('GET', KEYS[1])
local e = redis.call('GET', KEYS[2]) or ''
if v then
  local at, from, fromv = string.match(redis.call('GET', KEYS[3]) or '', '^(%d+) (%S*) (%d+)$')
  local newer = at and tonumber(at) == tonumber(v) and ARGV[2] ~= '' and from == ARGV[2]
    and tonumber(fromv) < tonumber(ARGV[1])
  if not newer then return own(e) or {0, tonumber(v), e} end
else
  e = ARGV[4]
  redis.call('SET', KEYS[2], e)
end
redis.call('SET', KEYS[5], ARGV[5])
local i = write_rows(6)
redis.call('SET', KEYS[3], (tonumber(v or '0') + 1) .. ' ' .. ARGV[2] .. ' ' .. ARGV[1])
return commit(i, e)
";

/// KEYS: the node set. ARGV: node id, live window (ms). Records the node's heartbeat at
/// Redis's time (so the nodes' clocks do not matter), prunes nodes silent for longer than the
/// window and returns how many are left. The set expires when every node is gone.
const HEARTBEAT_LUA: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - window))
redis.call('PEXPIRE', KEYS[1], window * 2)
return redis.call('ZCARD', KEYS[1])
";

struct Scripts {
    add: Script,
    allowance: Script,
    save: Script,
    seed: Script,
    heartbeat: Script,
}

impl Scripts {
    fn new() -> Scripts {
        Scripts {
            add: Script::new(&format!("{TRIM_LUA}{ADD_LUA}")),
            allowance: Script::new(&format!("{TRIM_LUA}{ALLOWANCE_LUA}")),
            save: Script::new(&format!("{CONFIG_LUA}{SAVE_LUA}")),
            seed: Script::new(&format!("{CONFIG_LUA}{SEED_LUA}")),
            heartbeat: Script::new(HEARTBEAT_LUA),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------

fn pair_tag(plan: &str, key: &str) -> String {
    format!("{plan}{SEP}{key}")
}

fn period_key(plan: &str, key: &str) -> String {
    format!("gateway:u:{{{}}}:p", pair_tag(plan, key))
}

fn days_key(plan: &str, key: &str) -> String {
    format!("gateway:u:{{{}}}:d", pair_tag(plan, key))
}

/// Batch marks of a (plan, key) for one day.
fn marks_key(plan: &str, key: &str, day: u32) -> String {
    format!("gateway:u:{{{}}}:b{day}", pair_tag(plan, key))
}

/// First day of history a write on `day` keeps (may be negative in tests near day 0).
fn history_keep(day: u32) -> i64 {
    i64::from(day) - HISTORY_DAYS as i64
}

fn plan_keys_key(plan: &str) -> String {
    format!("gateway:u:{{{plan}}}:keys")
}

fn period_expiry(period_start: u32) -> u64 {
    let end = (u64::from(period_start) + PERIOD_LIFE_DAYS) * DAY_SECS;
    end.max(now_secs()) + DAY_SECS
}

// ---------------------------------------------------------------------------------------------
// The store
// ---------------------------------------------------------------------------------------------

type OutboxKey = (String, String, u32, u32);
/// A numbered batch of increments: (batch id, entries).
type Batch = (u64, Vec<(OutboxKey, u64)>);

/// The Redis-backed usage and configuration store of a fleet. Cheap to share with `Arc`.
pub struct FleetStore {
    endpoint: Arc<Endpoint>,
    options: FleetOptions,
    health: Arc<Health>,
    usage: Link,
    config: Link,
    /// Heartbeats, on their own connection so that they never wait behind a save or a flush.
    presence: Link,
    /// This process's member of `gateway:nodes`.
    node_id: String,
    scripts: Scripts,
    /// Increments not yet sent to Redis, coalesced.
    outbox: Mutex<HashMap<OutboxKey, u64>>,
    /// A batch sent whose outcome is unknown (the call failed or timed out): resent unchanged,
    /// under the same id, before anything else, so that Redis counts it exactly once.
    in_flight: Mutex<Option<Batch>>,
    /// Id of the next batch (grows for the life of the process; the node id is per process).
    next_batch: AtomicU64,
    /// (plan, key) pairs this process has put in the usage index.
    indexed: Mutex<HashSet<(String, String)>>,
    /// Epoch and version of the configuration the engine runs (version 0: nothing stored).
    known: Mutex<Known>,
}

/// Which stored configuration a node runs: the store's epoch (a random id set when the store
/// is seeded, so that numbering restarting after a data loss is not mistaken for the old
/// one) and the version within it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Known {
    epoch: Option<String>,
    version: u64,
}

/// The outcome of a configuration script: written (the new epoch and version), or refused
/// (what the store holds).
enum Outcome {
    Written(Known),
    Refused(Known),
}

impl std::fmt::Debug for FleetStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetStore")
            .field("store", &self.endpoint.shown)
            .field("up", &self.health.is_up())
            .finish_non_exhaustive()
    }
}

impl FleetStore {
    /// Connects to the store named by `options.url` and checks that it answers.
    pub fn open(options: FleetOptions) -> Result<Arc<FleetStore>, FleetError> {
        let endpoint = Arc::new(parse_url(&options.url, options.timeout)?);
        let health = Arc::new(Health::new(options.failure));
        let store = FleetStore {
            usage: Link::new(endpoint.clone(), options.timeout, health.clone()),
            config: Link::new(endpoint.clone(), options.timeout, health.clone()),
            presence: Link::new(endpoint.clone(), options.timeout, health.clone()).sentinel(),
            node_id: format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()),
            endpoint,
            options,
            health,
            scripts: Scripts::new(),
            outbox: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(None),
            next_batch: AtomicU64::new(1),
            indexed: Mutex::new(HashSet::new()),
            known: Mutex::new(Known::default()),
        };
        store
            .config
            .run(|c| redis::cmd("PING").query::<String>(c.like()))
            .map_err(|e| FleetError::Unreachable {
                store: store.endpoint.shown.clone(),
                reason: e.to_string(),
            })?;
        Ok(Arc::new(store))
    }

    /// The store's health, for the data plane and the metrics.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// The store's name for logs (no password).
    pub fn name(&self) -> &str {
        &self.endpoint.shown
    }

    fn remote(&self, e: impl std::fmt::Display) -> StateError {
        StateError::Remote {
            store: self.endpoint.shown.clone(),
            reason: e.to_string(),
        }
    }

    /// The stored configuration and its version (`None`: never saved). The version becomes the
    /// one this node's next save expects.
    pub fn load_model(&self) -> Result<Option<Model>, FleetError> {
        let (known, model) = self.read_config().map_err(|e| match e {
            ReadError::Redis(e) => FleetError::Unreachable {
                store: self.endpoint.shown.clone(),
                reason: e.to_string(),
            },
            ReadError::Corrupt(reason) => FleetError::Corrupt {
                store: self.endpoint.shown.clone(),
                reason,
            },
        })?;
        self.set_known(known);
        Ok(model)
    }

    fn set_known(&self, known: Known) {
        self.health.version.store(known.version, Ordering::Relaxed);
        *lock(&self.known) = known;
    }

    fn known(&self) -> Known {
        lock(&self.known).clone()
    }

    /// The stored version (`None`: the key is missing, the store is empty) and epoch.
    fn stored_head(&self) -> RedisResult<(Option<u64>, Option<String>)> {
        let v = self.config.run(|c| head_cmd().query::<Value>(c.like()))?;
        Ok(head_of(&v))
    }

    fn read_config(&self) -> Result<(Known, Option<Model>), ReadError> {
        for _ in 0..10 {
            let values = self
                .config
                .run(|c| {
                    let mut calls = vec![
                        Call::Plain(head_cmd()),
                        Call::Plain(redis::cmd("GET").arg(META).clone()),
                    ];
                    for name in COLLECTIONS {
                        calls.push(Call::Plain(
                            redis::cmd("HGETALL").arg(rows_key(name)).clone(),
                        ));
                        calls.push(Call::Plain(
                            redis::cmd("HGETALL").arg(seqs_key(name)).clone(),
                        ));
                    }
                    calls.push(Call::Plain(head_cmd()));
                    run_calls(c, &calls)
                })
                .map_err(ReadError::Redis)?;
            // Saves and seeds are atomic and each moves the version; the epoch tells a seed
            // after a data loss from the save it may number like.
            let before = values.first().map(head_of).unwrap_or_default();
            let after = values.last().map(head_of).unwrap_or_default();
            if before != after {
                continue;
            }
            let known = Known {
                version: before.0.unwrap_or(0),
                epoch: before.1,
            };
            let Some(meta) = values.get(1).and_then(as_string) else {
                return Ok((known, None));
            };
            let mut model: Model = serde_json::from_str(&meta)
                .map_err(|e| ReadError::Corrupt(format!("{META}: {e}")))?;
            let part = |i: usize| {
                (
                    values.get(2 + 2 * i).map(as_map).unwrap_or_default(),
                    values.get(3 + 2 * i).map(as_map).unwrap_or_default(),
                )
            };
            model.rest_apis = decode_rows(COLLECTIONS[0], part(0))?;
            model.api_keys = decode_rows(COLLECTIONS[1], part(1))?;
            model.usage_plans = decode_rows(COLLECTIONS[2], part(2))?;
            model.usage_plan_keys = decode_rows(COLLECTIONS[3], part(3))?;
            return Ok((known, Some(model)));
        }
        Err(ReadError::Corrupt(
            "the configuration kept changing while it was read; try again".into(),
        ))
    }

    fn config_keys() -> Vec<String> {
        let mut keys = vec![
            VERSION.to_string(),
            EPOCH.to_string(),
            SEED.to_string(),
            SAVED.to_string(),
            META.to_string(),
        ];
        for name in COLLECTIONS {
            keys.push(rows_key(name));
            keys.push(seqs_key(name));
        }
        keys
    }

    /// Runs a configuration script (retried once on a closed connection: the save id makes a
    /// resent save answer as the first one did).
    fn run_config_script(
        &self,
        script: &Script,
        args: Vec<String>,
    ) -> Result<Outcome, ControlError> {
        let call = Call::Script {
            script,
            keys: Self::config_keys(),
            args,
        };
        let reply = self
            .config
            .run(|c| call.run_alone(c.like()))
            .map_err(|e| self.remote(e))?;
        let parts = match &reply {
            Value::Array(a) if a.len() == 3 => {
                Some((as_u64(&a[0]), as_u64(&a[1]), as_string(&a[2])))
            }
            _ => None,
        };
        let Some((Some(ok), Some(version), Some(epoch))) = parts else {
            return Err(self
                .remote(format!("unexpected answer to a save: {reply:?}"))
                .into());
        };
        let known = Known {
            epoch: Some(epoch).filter(|e| !e.is_empty()),
            version,
        };
        Ok(if ok == 1 {
            Outcome::Written(known)
        } else {
            Outcome::Refused(known)
        })
    }

    /// Writes `model` whole into an empty store under a new epoch, recording `origin` (the
    /// configuration it was running before the store lost it), or over a seed that came from an
    /// older version of the same origin while nothing was saved after it. See [`SEED_LUA`].
    fn seed(&self, model: &Model, origin: Option<&Known>) -> Result<Outcome, ControlError> {
        let (origin_epoch, origin_version) = match origin {
            Some(k) => (k.epoch.clone().unwrap_or_default(), k.version),
            None => (String::new(), 0),
        };
        let mut args = vec![
            origin_version.to_string(),
            origin_epoch,
            new_id(),
            new_id(),
            crate::state::meta_json(model).map_err(|e| self.remote(e))?,
        ];
        full_rows(model, &mut args).map_err(|e| self.remote(e))?;
        args.push(CHANNEL.to_string());
        self.run_config_script(&self.scripts.seed, args)
    }

    /// Persists `new` (diffed against `old`, everything when `old` is `None`) if the stored
    /// version and epoch are still the ones this node knows. A node that knows no stored
    /// configuration (an empty store at start-up) seeds the store instead, unless another node
    /// seeded it first (then a 409, as for any conflict). Start-up sources use it with `old`
    /// `None`.
    pub fn save_model(&self, old: Option<&Model>, new: &Model) -> Result<(), ControlError> {
        let known = self.known();
        if known.version == 0 {
            return match self.seed(new, None)? {
                Outcome::Written(k) => {
                    self.set_known(k);
                    Ok(())
                }
                Outcome::Refused(stored) => Err(self.conflict(&known, &stored)),
            };
        }
        let base = (known.version + 1) << 32;
        let empty = Model::default();
        let old_model = old.unwrap_or(&empty);
        let meta_new = crate::state::meta_json(new).map_err(|e| self.remote(e))?;
        let meta_changed = old.is_none()
            || crate::state::meta_json(old_model).map_err(|e| self.remote(e))? != meta_new;
        let mut args: Vec<String> = vec![
            known.version.to_string(),
            known.epoch.clone().unwrap_or_default(),
            new_id(),
            new_id(),
            if meta_changed {
                meta_new
            } else {
                String::new()
            },
        ];
        let force = old.is_none();
        diff_rows(&old_model.rest_apis, &new.rest_apis, base, force, &mut args)
            .map_err(|e| self.remote(e))?;
        diff_rows(&old_model.api_keys, &new.api_keys, base, force, &mut args)
            .map_err(|e| self.remote(e))?;
        diff_rows(
            &old_model.usage_plans,
            &new.usage_plans,
            base,
            force,
            &mut args,
        )
        .map_err(|e| self.remote(e))?;
        diff_rows(
            &old_model.usage_plan_keys,
            &new.usage_plan_keys,
            base,
            force,
            &mut args,
        )
        .map_err(|e| self.remote(e))?;
        args.push(CHANNEL.to_string());
        match self.run_config_script(&self.scripts.save, args)? {
            Outcome::Written(k) => {
                self.set_known(k);
                if let Some(old) = old {
                    self.unindex(old, new);
                }
                Ok(())
            }
            Outcome::Refused(stored) => Err(self.conflict(&known, &stored)),
        }
    }

    fn conflict(&self, known: &Known, stored: &Known) -> ControlError {
        tracing::info!(
            expected = known.version,
            stored = stored.version,
            same_epoch = known.epoch == stored.epoch,
            "configuration changed by another node"
        );
        ModelError::conflict(
            "The configuration was changed through another gateway at the same time; \
             retry the request",
        )
        .into()
    }

    /// Takes (plan, key) pairs that `old` has and `new` no longer has out of the usage index
    /// (and plans `new` no longer has, with their key sets). Best effort: the configuration is
    /// saved already, and a stale index entry only costs a read.
    fn unindex(&self, old: &Model, new: &Model) {
        let (pairs, plans) = removed_memberships(old, new);
        if pairs.is_empty() && plans.is_empty() {
            return;
        }
        self.forget_indexed(&pairs);
        let mut calls = Vec::new();
        for (plan, key) in &pairs {
            calls.push(Call::Plain(
                redis::cmd("SREM").arg(plan_keys_key(plan)).arg(key).clone(),
            ));
        }
        for plan in &plans {
            calls.push(Call::Plain(
                redis::cmd("DEL").arg(plan_keys_key(plan)).clone(),
            ));
            calls.push(Call::Plain(redis::cmd("SREM").arg(PLANS).arg(plan).clone()));
        }
        if let Err(error) = self.config.run(|c| run_calls(c, &calls)) {
            tracing::warn!(%error, "removed keys stay in the usage index (GetUsage is unaffected)");
        }
    }

    fn forget_indexed(&self, pairs: &[(String, String)]) {
        let mut known = lock(&self.indexed);
        for pair in pairs {
            known.remove(pair);
        }
    }

    /// Usage this process has counted but the store has not confirmed: (requests, entries).
    /// Non-zero at shutdown only when the store was unreachable at the last flush.
    pub fn unsent(&self) -> (u64, usize) {
        let (mut requests, mut entries) = {
            let outbox = lock(&self.outbox);
            (outbox.values().sum::<u64>(), outbox.len())
        };
        if let Some((_, batch)) = &*lock(&self.in_flight) {
            requests += batch.iter().map(|(_, n)| n).sum::<u64>();
            entries += batch.len();
        }
        (requests, entries)
    }

    /// Indexes (plan, key) pairs this process has not indexed yet (every pair with `force`);
    /// returns the commands and the pairs they index.
    fn index_calls(
        &self,
        pairs: &[(&str, &str)],
        force: bool,
    ) -> (Vec<Call<'_>>, HashSet<(String, String)>) {
        let known = lock(&self.indexed);
        let mut calls = Vec::new();
        let mut fresh = HashSet::new();
        for &(plan, key) in pairs {
            let pair = (plan.to_string(), key.to_string());
            if (!force && known.contains(&pair)) || fresh.contains(&pair) {
                continue;
            }
            calls.push(Call::Plain(redis::cmd("SADD").arg(PLANS).arg(plan).clone()));
            calls.push(Call::Plain(
                redis::cmd("SADD").arg(plan_keys_key(plan)).arg(key).clone(),
            ));
            fresh.insert(pair);
        }
        (calls, fresh)
    }

    fn remember_indexed(&self, fresh: HashSet<(String, String)>) {
        let mut known = lock(&self.indexed);
        // Bounded by the keys and plans of the configuration; cleared if it grows past that.
        if known.len() > 4 * self.options.max_pending {
            known.clear();
        }
        known.extend(fresh);
    }

    /// Sends the batch left in flight by a failed send (unchanged, same id), then the outbox as
    /// a new batch; returns each sent entry's period total. Entries of `batch` go first and in
    /// its order, so each total is the running total the reference store returns. On an error
    /// the unsent batch stays in flight for the next call.
    fn send_outbox(&self, batch: &[UsageDelta]) -> RedisResult<HashMap<OutboxKey, u64>> {
        let mut totals = HashMap::new();
        let pending = lock(&self.in_flight).clone();
        if let Some((id, entries)) = pending {
            totals.extend(self.send_batch(id, &entries)?);
            *lock(&self.in_flight) = None;
        }
        let entries: Vec<(OutboxKey, u64)> = {
            let mut outbox = lock(&self.outbox);
            let mut entries = Vec::with_capacity(outbox.len());
            for d in batch {
                let k = (d.plan_id.clone(), d.key_id.clone(), d.day, d.period_start);
                if let Some(n) = outbox.remove(&k) {
                    entries.push((k, n));
                }
            }
            entries.extend(outbox.drain());
            self.health.pending.store(0, Ordering::Relaxed);
            entries
        };
        if entries.is_empty() {
            return Ok(totals);
        }
        let id = self.next_batch.fetch_add(1, Ordering::Relaxed);
        let count = entries.len() as u64;
        *lock(&self.in_flight) = Some((id, entries.clone()));
        match self.send_batch(id, &entries) {
            Ok(sent) => {
                totals.extend(sent);
                *lock(&self.in_flight) = None;
                Ok(totals)
            }
            Err(e) => {
                self.health.pending.store(count, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// One pipelined batch of increments under batch id `id`.
    fn send_batch(
        &self,
        id: u64,
        entries: &[(OutboxKey, u64)],
    ) -> RedisResult<HashMap<OutboxKey, u64>> {
        let pairs: Vec<(&str, &str)> = entries
            .iter()
            .map(|((p, k, _, _), _)| (p.as_str(), k.as_str()))
            .collect();
        let (mut calls, fresh) = self.index_calls(&pairs, false);
        let first = calls.len();
        let days_ttl = (HISTORY_DAYS * DAY_SECS).to_string();
        let marks_ttl = MARKS_TTL.as_secs().to_string();
        let batch_id = id.to_string();
        for ((plan, key, day, start), count) in entries {
            calls.push(Call::Script {
                script: &self.scripts.add,
                keys: vec![
                    period_key(plan, key),
                    days_key(plan, key),
                    marks_key(plan, key, *day),
                ],
                args: vec![
                    day.to_string(),
                    start.to_string(),
                    count.to_string(),
                    period_expiry(*start).to_string(),
                    days_ttl.clone(),
                    self.node_id.clone(),
                    batch_id.clone(),
                    marks_ttl.clone(),
                    history_keep(*day).to_string(),
                ],
            });
        }
        let values = self.usage.run(|c| run_calls(c, &calls))?;
        let mut totals = HashMap::with_capacity(entries.len());
        let mut unindexed: Vec<(&str, &str)> = Vec::new();
        for (((plan, key, day, start), sent), v) in entries.iter().zip(&values[first..]) {
            let (total, created) = add_reply(v);
            totals.insert(
                (plan.clone(), key.clone(), *day, *start),
                total.unwrap_or(*sent),
            );
            // Records created afresh for a pair indexed before: the store lost its data (or
            // the records expired), and the index entry with them.
            if created && !fresh.contains(&(plan.clone(), key.clone())) {
                unindexed.push((plan, key));
            }
        }
        self.remember_indexed(fresh);
        if !unindexed.is_empty() {
            let (calls, again) = self.index_calls(&unindexed, true);
            if let Err(error) = self.usage.run(|c| run_calls(c, &calls)) {
                tracing::debug!(%error, "usage index not rebuilt; retried at the next flush");
                let again: Vec<(String, String)> = again.into_iter().collect();
                self.forget_indexed(&again);
            }
        }
        Ok(totals)
    }
}

#[derive(Debug)]
enum ReadError {
    Redis(RedisError),
    Corrupt(String),
}

impl From<StoreError> for ReadError {
    fn from(e: StoreError) -> Self {
        ReadError::Corrupt(e.to_string())
    }
}

/// Field/value pairs of a hash.
type Fields = Vec<(String, String)>;

const COLLECTIONS: [&str; 4] = ["rest_apis", "api_keys", "usage_plans", "usage_plan_keys"];

fn rows_key(name: &str) -> String {
    format!("gateway:{{cfg}}:{name}")
}

fn seqs_key(name: &str) -> String {
    format!("gateway:{{cfg}}:{name}:seq")
}

/// An entry of a keyed model collection, stored as one hash field.
trait Row: Serialize + DeserializeOwned + PartialEq {
    fn field(&self) -> String;
}

impl Row for RestApi {
    fn field(&self) -> String {
        self.id.clone()
    }
}

impl Row for ApiKey {
    fn field(&self) -> String {
        self.id.clone()
    }
}

impl Row for UsagePlan {
    fn field(&self) -> String {
        self.id.clone()
    }
}

impl Row for UsagePlanKey {
    fn field(&self) -> String {
        pair_tag(&self.usage_plan_id, &self.key_id)
    }
}

fn decode_rows<T: Row>(name: &str, (rows, seqs): (Fields, Fields)) -> Result<Vec<T>, ReadError> {
    let seqs: HashMap<String, u64> = seqs
        .into_iter()
        .filter_map(|(id, s)| Some((id, s.parse().ok()?)))
        .collect();
    let mut out = Vec::with_capacity(rows.len());
    for (id, json) in rows {
        let row: T = serde_json::from_str(&json)
            .map_err(|e| ReadError::Corrupt(format!("{name} {}: {e}", id.replace(SEP, "/"))))?;
        if row.field() != id {
            return Err(ReadError::Corrupt(format!(
                "{name} {}: the row holds another id",
                id.replace(SEP, "/")
            )));
        }
        let seq = seqs.get(&id).copied().unwrap_or(u64::MAX);
        out.push((seq, id, row));
    }
    out.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    Ok(out.into_iter().map(|(_, _, row)| row).collect())
}

/// Appends one collection's part of the save script's arguments: rows deleted, changed and
/// added. Added rows get sequence numbers from `base` when they all come after the kept ones
/// and the kept ones keep their order; otherwise (or with `force`) the collection is rewritten.
fn diff_rows<T: Row>(
    old: &[T],
    new: &[T],
    base: u64,
    force: bool,
    args: &mut Vec<String>,
) -> Result<(), serde_json::Error> {
    let old_by_id: HashMap<String, &T> = old.iter().map(|r| (r.field(), r)).collect();
    let new_ids: HashSet<String> = new.iter().map(Row::field).collect();
    let kept_old: Vec<String> = old
        .iter()
        .map(Row::field)
        .filter(|id| new_ids.contains(id))
        .collect();
    let kept_new: Vec<String> = new
        .iter()
        .map(Row::field)
        .filter(|id| old_by_id.contains_key(id))
        .collect();
    let last_kept = new.iter().rposition(|r| old_by_id.contains_key(&r.field()));
    let appends_only = new
        .iter()
        .enumerate()
        .all(|(i, r)| old_by_id.contains_key(&r.field()) || last_kept.is_none_or(|k| i > k));
    let rewrite = force || kept_old != kept_new || !appends_only;
    if rewrite {
        args.push("1".into());
        args.push("0".into());
        args.push(new.len().to_string());
        for (i, row) in new.iter().enumerate() {
            args.push(row.field());
            args.push(serde_json::to_string(row)?);
            args.push((base + i as u64).to_string());
        }
        return Ok(());
    }
    args.push("0".into());
    let deletes: Vec<String> = old
        .iter()
        .map(Row::field)
        .filter(|id| !new_ids.contains(id))
        .collect();
    args.push(deletes.len().to_string());
    args.extend(deletes);
    let mut puts = Vec::new();
    for (i, row) in new.iter().enumerate() {
        match old_by_id.get(&row.field()) {
            Some(prev) if *prev == row => {}
            Some(_) => puts.push((row, String::new())),
            None => puts.push((row, (base + i as u64).to_string())),
        }
    }
    args.push(puts.len().to_string());
    for (row, seq) in puts {
        args.push(row.field());
        args.push(serde_json::to_string(row)?);
        args.push(seq);
    }
    Ok(())
}

impl UsageStore for FleetStore {
    fn add(&self, batch: &[UsageDelta]) -> Result<Vec<u64>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        {
            let mut outbox = lock(&self.outbox);
            let mut dropped = 0u64;
            for d in batch {
                let k = (d.plan_id.clone(), d.key_id.clone(), d.day, d.period_start);
                let full = outbox.len() >= self.options.max_pending;
                match outbox.get_mut(&k) {
                    Some(n) => *n = n.saturating_add(d.count),
                    None if full => dropped = dropped.saturating_add(d.count),
                    None => {
                        outbox.insert(k, d.count);
                    }
                }
            }
            if dropped > 0 {
                self.health.dropped.fetch_add(dropped, Ordering::Relaxed);
                tracing::warn!(
                    dropped,
                    max_pending = self.options.max_pending,
                    "usage outbox full while the store is unreachable; requests left uncounted"
                );
            }
            self.health
                .pending
                .store(outbox.len() as u64, Ordering::Relaxed);
        }
        match self.send_outbox(batch) {
            Ok(totals) => Ok(batch
                .iter()
                .map(|d| {
                    let k = (d.plan_id.clone(), d.key_id.clone(), d.day, d.period_start);
                    totals.get(&k).copied().unwrap_or(d.count)
                })
                .collect()),
            Err(e) => {
                if is_outage(&e) {
                    tracing::debug!(error = %e, "usage kept for the next flush");
                } else {
                    tracing::warn!(error = %e, "usage store refused a batch; it is kept for the next flush");
                }
                // The engine counted these requests already; the outbox (or the batch in
                // flight) owns them now, so the engine must not hand them over again.
                Ok(batch.iter().map(|d| d.count).collect())
            }
        }
    }

    fn set_allowance(
        &self,
        plan_id: &str,
        key_id: &str,
        period_start: u32,
        allowance: u64,
        day: u32,
    ) -> Result<(), StoreError> {
        // Always indexed: an admin call, rare, and the index may have been lost with the data.
        let (mut calls, fresh) = self.index_calls(&[(plan_id, key_id)], true);
        calls.push(Call::Script {
            script: &self.scripts.allowance,
            keys: vec![period_key(plan_id, key_id), days_key(plan_id, key_id)],
            args: vec![
                period_start.to_string(),
                allowance.to_string(),
                day.to_string(),
                period_expiry(period_start).to_string(),
                (HISTORY_DAYS * DAY_SECS).to_string(),
                history_keep(day).to_string(),
            ],
        });
        self.usage
            .run(|c| run_calls(c, &calls))
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", self.name())))?;
        self.remember_indexed(fresh);
        Ok(())
    }

    fn load_periods(&self) -> Result<Vec<PeriodCounter>, StoreError> {
        let unavailable = |e: RedisError| StoreError::Unavailable(format!("{}: {e}", self.name()));
        let plans: Vec<String> = self
            .usage
            .run(|c| run_calls(c, &[Call::Plain(redis::cmd("SMEMBERS").arg(PLANS).clone())]))
            .map_err(unavailable)?
            .first()
            .map(as_list)
            .unwrap_or_default();
        let key_calls: Vec<Call<'_>> = plans
            .iter()
            .map(|p| Call::Plain(redis::cmd("SMEMBERS").arg(plan_keys_key(p)).clone()))
            .collect();
        let keys = self
            .usage
            .run(|c| run_calls(c, &key_calls))
            .map_err(unavailable)?;
        let pairs: Vec<(String, String)> = plans
            .iter()
            .zip(&keys)
            .flat_map(|(p, ks)| as_list(ks).into_iter().map(move |k| (p.clone(), k)))
            .collect();
        let calls: Vec<Call<'_>> = pairs
            .iter()
            .map(|(p, k)| Call::Plain(redis::cmd("HGETALL").arg(period_key(p, k)).clone()))
            .collect();
        let values = self
            .usage
            .run(|c| run_calls(c, &calls))
            .map_err(unavailable)?;
        let mut out = Vec::new();
        for ((plan_id, key_id), v) in pairs.into_iter().zip(&values) {
            let fields: HashMap<String, String> = as_map(v).into_iter().collect();
            if fields.is_empty() {
                continue;
            }
            let num = |f: &str| fields.get(f).and_then(|s| s.parse::<u64>().ok());
            out.push(PeriodCounter {
                plan_id,
                key_id,
                period_start: num("s").and_then(|s| u32::try_from(s).ok()).unwrap_or(0),
                used: num("u").unwrap_or(0),
                allowance: num("a"),
            });
        }
        out.sort_by(|a, b| (&a.plan_id, &a.key_id).cmp(&(&b.plan_id, &b.key_id)));
        Ok(out)
    }

    fn history(
        &self,
        plan_id: &str,
        key_id: Option<&str>,
        first_day: u32,
        last_day: u32,
    ) -> Result<Vec<DayRecord>, StoreError> {
        let unavailable = |e: RedisError| StoreError::Unavailable(format!("{}: {e}", self.name()));
        if first_day > last_day {
            return Ok(Vec::new());
        }
        let mut keys: Vec<String> = match key_id {
            Some(k) => vec![k.to_string()],
            None => self
                .usage
                .run(|c| {
                    run_calls(
                        c,
                        &[Call::Plain(
                            redis::cmd("SMEMBERS").arg(plan_keys_key(plan_id)).clone(),
                        )],
                    )
                })
                .map_err(unavailable)?
                .first()
                .map(as_list)
                .unwrap_or_default(),
        };
        keys.sort();
        let calls: Vec<Call<'_>> = keys
            .iter()
            .map(|k| Call::Plain(redis::cmd("HGETALL").arg(days_key(plan_id, k)).clone()))
            .collect();
        let values = self
            .usage
            .run(|c| run_calls(c, &calls))
            .map_err(unavailable)?;
        let mut out = Vec::new();
        for (key, v) in keys.iter().zip(&values) {
            let mut days: std::collections::BTreeMap<u32, (u64, Option<u64>)> =
                std::collections::BTreeMap::new();
            for (field, value) in as_map(v) {
                let (kind, day) = field.split_at(1.min(field.len()));
                let (Ok(day), Ok(n)) = (day.parse::<u32>(), value.parse::<u64>()) else {
                    continue;
                };
                if !(first_day..=last_day).contains(&day) {
                    continue;
                }
                let e = days.entry(day).or_insert((0, None));
                match kind {
                    "u" => e.0 = n,
                    "a" => e.1 = Some(n),
                    _ => {}
                }
            }
            out.extend(days.into_iter().map(|(day, (used, allowance))| DayRecord {
                key_id: key.clone(),
                day,
                used,
                allowance,
            }));
        }
        Ok(out)
    }
}

impl ConfigStore for FleetStore {
    fn save(&self, old: &Model, new: &Model) -> Result<(), ControlError> {
        self.save_model(Some(old), new)
    }

    /// Compares the store's version and epoch with the ones this node runs:
    ///
    /// - the version key is missing: the store lost its data (a restart without persistence, a
    ///   flush). The node seeds it with the configuration it serves, unless another node did
    ///   first (then it loads theirs); a node that never had a stored configuration has nothing
    ///   to write back.
    /// - another epoch: the store was seeded again by another node. The node replaces that seed
    ///   only if it runs a newer version of the same origin and nothing was saved since the
    ///   seed (see [`SEED_LUA`]); otherwise it loads it. It never writes back over saves made
    ///   after the seed, whatever their version numbers.
    /// - the same epoch, another version: it loads the stored configuration.
    fn changed(&self, current: &Model) -> Result<Option<Model>, ControlError> {
        let (stored, epoch) = self.stored_head().map_err(|e| self.remote(e))?;
        let known = self.known();
        match stored {
            None if known.version == 0 => return Ok(None),
            None => {
                tracing::warn!(
                    store = self.name(),
                    version = known.version,
                    "the store lost the configuration; seeding it with this node's"
                );
                self.forget_all_indexed();
                if let Outcome::Written(k) = self.seed(current, Some(&known))? {
                    self.set_known(k);
                    return Ok(None);
                }
            }
            Some(v) if epoch == known.epoch => {
                if v == known.version {
                    return Ok(None);
                }
            }
            Some(v) => {
                if known.epoch.is_some() {
                    tracing::warn!(
                        store = self.name(),
                        version = v,
                        known = known.version,
                        "the store was seeded again (it lost its data); taking the fleet's \
                         configuration"
                    );
                    self.forget_all_indexed();
                    if let Outcome::Written(k) = self.seed(current, Some(&known))? {
                        tracing::info!(
                            version = k.version,
                            "this node's configuration was newer than the seed; it replaced it"
                        );
                        self.set_known(k);
                        return Ok(None);
                    }
                }
            }
        }
        let (k, model) = self.read_config().map_err(|e| match e {
            ReadError::Redis(e) => self.remote(e),
            ReadError::Corrupt(reason) => self.remote(reason),
        })?;
        self.set_known(k);
        let model = model.unwrap_or_default();
        // Memberships removed elsewhere: index them again if they come back.
        let (pairs, _) = removed_memberships(current, &model);
        self.forget_indexed(&pairs);
        self.health.reloads.fetch_add(1, Ordering::Relaxed);
        Ok(Some(model))
    }
}

impl FleetStore {
    fn forget_all_indexed(&self) {
        lock(&self.indexed).clear();
    }
}

/// `MGET version epoch`: one command, one slot.
fn head_cmd() -> Cmd {
    redis::cmd("MGET").arg(VERSION).arg(EPOCH).clone()
}

fn head_of(v: &Value) -> (Option<u64>, Option<String>) {
    match v {
        Value::Array(a) => (
            a.first().and_then(as_u64),
            a.get(1).and_then(as_string).filter(|e| !e.is_empty()),
        ),
        _ => (None, None),
    }
}

/// A random id (epochs, save ids): 32 hex digits.
fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// The rows part of a seed's arguments: every collection cleared and written whole, in order.
fn full_rows(model: &Model, args: &mut Vec<String>) -> Result<(), serde_json::Error> {
    diff_rows::<RestApi>(&[], &model.rest_apis, 0, true, args)?;
    diff_rows::<ApiKey>(&[], &model.api_keys, 0, true, args)?;
    diff_rows::<UsagePlan>(&[], &model.usage_plans, 0, true, args)?;
    diff_rows::<UsagePlanKey>(&[], &model.usage_plan_keys, 0, true, args)
}

/// (plan, key) memberships of `old` that `new` no longer has, and plans it no longer has.
fn removed_memberships(old: &Model, new: &Model) -> (Vec<(String, String)>, Vec<String>) {
    let kept: HashSet<(&str, &str)> = new
        .usage_plan_keys
        .iter()
        .map(|u| (u.usage_plan_id.as_str(), u.key_id.as_str()))
        .collect();
    let pairs = old
        .usage_plan_keys
        .iter()
        .filter(|u| !kept.contains(&(u.usage_plan_id.as_str(), u.key_id.as_str())))
        .map(|u| (u.usage_plan_id.clone(), u.key_id.clone()))
        .collect();
    let plans: HashSet<&str> = new.usage_plans.iter().map(|p| p.id.as_str()).collect();
    let gone = old
        .usage_plans
        .iter()
        .filter(|p| !plans.contains(p.id.as_str()))
        .map(|p| p.id.clone())
        .collect();
    (pairs, gone)
}

/// The add script's answer: the period total and whether the days hash was created.
fn add_reply(v: &Value) -> (Option<u64>, bool) {
    match v {
        Value::Array(a) => (
            a.first().and_then(as_u64),
            a.get(1).and_then(as_u64) == Some(1),
        ),
        other => (as_u64(other), false),
    }
}

// ---------------------------------------------------------------------------------------------
// Watcher
// ---------------------------------------------------------------------------------------------

/// Keeps a node's configuration current: listens for the change notifications and checks the
/// version every second (and after every reconnect), reloading when it moved; and heartbeats
/// every [`HEARTBEAT`], keeping the engine's throttles divided by the live node count. Stops
/// when dropped (within a second), taking the node out of the live count (one Redis call,
/// bounded by the store timeout).
#[derive(Debug)]
pub struct Watcher {
    stop: Arc<AtomicBool>,
    store: Arc<FleetStore>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // Set before the removal: a heartbeat that has not started by then will not re-add us.
        self.stop.store(true, Ordering::SeqCst);
        self.store.leave();
        // The gateway drops its watcher after its last flush: what is left now is lost.
        let (requests, entries) = self.store.unsent();
        if requests > 0 {
            tracing::error!(
                store = self.store.name(),
                requests,
                entries,
                "stopping with usage the store has not confirmed (it was unreachable at the \
                 last flush); these requests may be missing from the fleet's counts"
            );
        }
    }
}

/// Longest time between two version checks.
const POLL: Duration = Duration::from_secs(1);

impl FleetStore {
    /// Starts the watcher threads: one applies other nodes' changes to `control`'s engine, one
    /// heartbeats and keeps `control`'s node count current.
    pub fn watch(self: &Arc<Self>, control: Arc<Control>) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let (store, flag, ctl) = (Arc::clone(self), Arc::clone(&stop), Arc::clone(&control));
        let spawned = std::thread::Builder::new()
            .name("config-watch".into())
            .spawn(move || store.listen(&ctl, &flag));
        if let Err(error) = spawned {
            tracing::error!(%error, "cannot start the configuration watcher");
        }
        let (store, flag) = (Arc::clone(self), Arc::clone(&stop));
        let spawned = std::thread::Builder::new()
            .name("fleet-presence".into())
            .spawn(move || store.announce(&control, &flag));
        if let Err(error) = spawned {
            tracing::error!(%error, "cannot start the heartbeat; throttles stay per node");
        }
        Watcher {
            stop,
            store: Arc::clone(self),
        }
    }

    /// Records this node's heartbeat; returns the live node count, or `None` when Redis did
    /// not answer or the watcher is stopping.
    fn heartbeat(&self, stop: &AtomicBool) -> Option<u32> {
        let call = Call::Script {
            script: &self.scripts.heartbeat,
            keys: vec![NODES.to_string()],
            args: vec![self.node_id.clone(), LIVE_WINDOW.as_millis().to_string()],
        };
        // Checked under the connection's lock, which `leave` takes too: no heartbeat lands
        // after the removal.
        let reply = self.presence.run(|c| {
            if stop.load(Ordering::SeqCst) {
                return Ok(None);
            }
            call.run_alone(c.like()).map(Some)
        });
        match reply {
            Ok(Some(v)) => as_u64(&v).map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
            Ok(None) => None,
            Err(error) => {
                tracing::debug!(%error, "heartbeat failed; keeping the last node count");
                None
            }
        }
    }

    /// Takes this node out of the live count.
    fn leave(&self) {
        let removed = self.presence.run(|c| {
            redis::cmd("ZREM")
                .arg(NODES)
                .arg(&self.node_id)
                .query::<i64>(c.like())
        });
        if let Err(error) = removed {
            tracing::debug!(%error, "could not leave the live node count; it expires in 3 s");
        }
    }

    fn announce(&self, control: &Control, stop: &AtomicBool) {
        // From now on the heartbeat alone decides whether the store is up.
        self.health.heartbeat.store(true, Ordering::Relaxed);
        // The count of the previous heartbeat: a lower count applies only once seen twice.
        let mut previous = 0u32;
        while !stop.load(Ordering::SeqCst) {
            let started = std::time::Instant::now();
            if let Some(seen) = self.heartbeat(stop) {
                let nodes = next_node_count(previous, seen);
                previous = seen;
                self.health.nodes.store(u64::from(nodes), Ordering::Relaxed);
                match control.set_nodes(nodes) {
                    Ok(true) => tracing::info!(
                        nodes,
                        "live gateways changed; throttles are divided by the new count"
                    ),
                    Ok(false) => {}
                    Err(error) => tracing::warn!(%error, nodes, "cannot apply the node count"),
                }
            }
            std::thread::sleep(HEARTBEAT.saturating_sub(started.elapsed()));
        }
        self.health.heartbeat.store(false, Ordering::Relaxed);
    }

    fn listen(&self, control: &Control, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            if let Ok(mut conn) = single_connection(&self.endpoint.first, self.options.timeout) {
                let mut sub = conn.as_pubsub();
                if sub.subscribe(CHANNEL).is_ok() && sub.set_read_timeout(Some(POLL)).is_ok() {
                    // Messages missed while disconnected: catch up by version first.
                    catch_up(control);
                    while !stop.load(Ordering::Relaxed) {
                        let message = sub.get_message();
                        catch_up(control);
                        match message {
                            Ok(_) => {}
                            Err(e) if e.is_timeout() => {}
                            Err(_) => break,
                        }
                    }
                }
            }
            if stop.load(Ordering::Relaxed) {
                break;
            }
            catch_up(control);
            std::thread::sleep(POLL);
        }
    }
}

/// The node count to divide throttles by after a heartbeat that saw `seen` live nodes, when
/// the one before saw `previous` (0: none before): the higher of the two, so a rise applies at
/// once and a fall only when two heartbeats in a row agree. At least 1.
fn next_node_count(previous: u32, seen: u32) -> u32 {
    previous.max(seen).max(1)
}

fn catch_up(control: &Control) {
    match control.refresh() {
        Ok(true) => tracing::info!(
            generation = control.engine().generation(),
            "configuration reloaded after a change on another node"
        ),
        Ok(false) => {}
        Err(error) => tracing::debug!(%error, "configuration check failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{QuotaPeriod, Stage};
    use crate::store::MemoryStore;
    use proptest::prelude::*;

    /// A throwaway `redis-server` on a free loopback port, killed on drop; `None` (and a note on
    /// stderr) when the binary is missing, unless `GATEWAY_REQUIRE_TOOLS=1`.
    struct TestRedis {
        child: std::process::Child,
        port: u16,
    }

    impl TestRedis {
        fn start() -> Option<TestRedis> {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
            Self::on(port)
        }

        fn on(port: u16) -> Option<TestRedis> {
            let spawned = std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(std::process::Stdio::null())
                .spawn();
            let child = match spawned {
                Ok(c) => c,
                Err(e) => {
                    assert!(
                        std::env::var_os("GATEWAY_REQUIRE_TOOLS").is_none_or(|v| v != "1"),
                        "redis-server: {e} (GATEWAY_REQUIRE_TOOLS=1)"
                    );
                    eprintln!("skipped: redis-server cannot be started ({e})");
                    return None;
                }
            };
            let r = TestRedis { child, port };
            let client = redis::Client::open(r.url()).expect("url");
            for _ in 0..200 {
                if let Ok(mut c) = client.get_connection_with_timeout(Duration::from_millis(100))
                    && redis::cmd("PING").query::<String>(&mut c).is_ok()
                {
                    return Some(r);
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            panic!("redis-server on port {port} did not answer");
        }

        fn url(&self) -> String {
            format!("redis://127.0.0.1:{}", self.port)
        }

        fn flush_all(&self) {
            let client = redis::Client::open(self.url()).expect("url");
            let mut c = client.get_connection().expect("connect");
            redis::cmd("FLUSHALL").exec(&mut c).expect("flushall");
        }
    }

    impl Drop for TestRedis {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn open(r: &TestRedis) -> Arc<FleetStore> {
        let mut o = FleetOptions::new(r.url());
        o.timeout = Duration::from_millis(300);
        FleetStore::open(o).expect("open")
    }

    #[derive(Clone, Debug)]
    enum Op {
        Add(Vec<UsageDelta>),
        SetAllowance(String, String, u32, u64, u32),
        History(String, Option<String>, u32, u32),
        LoadPeriods,
    }

    fn op() -> impl Strategy<Value = Op> {
        let plan = prop::sample::select(vec!["p", "q"]).prop_map(String::from);
        let key = prop::sample::select(vec!["k", "kk", "z"]).prop_map(String::from);
        let delta = (plan.clone(), key.clone(), 0u32..30, 0u32..5, 0u64..50).prop_map(
            |(plan_id, key_id, day, back, count)| UsageDelta {
                plan_id,
                key_id,
                day,
                period_start: day.saturating_sub(back),
                count,
            },
        );
        prop_oneof![
            4 => prop::collection::vec(delta, 0..6).prop_map(Op::Add),
            1 => (plan.clone(), key.clone(), 0u32..30, 0u64..500, 0u32..30)
                .prop_map(|(p, k, s, a, d)| Op::SetAllowance(p, k, s, a, d)),
            1 => (plan, prop::option::of(key), 0u32..30, 0u32..30)
                .prop_map(|(p, k, f, l)| Op::History(p, k, f, l)),
            1 => Just(Op::LoadPeriods),
        ]
    }

    #[test]
    fn usage_matches_memory_store() {
        let Some(redis) = TestRedis::start() else {
            return;
        };
        let store = open(&redis);
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(24));
        runner
            .run(&prop::collection::vec(op(), 1..30), |ops| {
                redis.flush_all();
                lock(&store.indexed).clear();
                let oracle = MemoryStore::new();
                for op in ops {
                    match op {
                        Op::Add(b) => {
                            // The engine sends one delta per (plan, key, day) in a batch.
                            let mut b = b;
                            let mut seen = HashSet::new();
                            b.retain(|d| seen.insert((d.plan_id.clone(), d.key_id.clone(), d.day)));
                            prop_assert_eq!(store.add(&b), oracle.add(&b))
                        }
                        Op::SetAllowance(p, k, s, a, d) => prop_assert_eq!(
                            store.set_allowance(&p, &k, s, a, d),
                            oracle.set_allowance(&p, &k, s, a, d)
                        ),
                        Op::History(p, k, f, l) => prop_assert_eq!(
                            store.history(&p, k.as_deref(), f, l),
                            oracle.history(&p, k.as_deref(), f, l)
                        ),
                        Op::LoadPeriods => {
                            prop_assert_eq!(store.load_periods(), oracle.load_periods())
                        }
                    }
                }
                Ok(())
            })
            .expect("the fleet store answers as the reference store");
    }

    fn model() -> Model {
        Model::demo(
            "http://127.0.0.1:9000",
            "demo-key-0123456789abcdef",
            10.0,
            20,
            1000,
        )
        .api(RestApi::proxy("shop", "http://127.0.0.1:9001").stage(Stage::new("prod")))
        .plan(
            UsagePlan::new("gold", "Gold")
                .stage("shop", "prod")
                .quota(100, QuotaPeriod::Day),
        )
        .key(ApiKey::new("k1", "value-of-k1-0123456789"))
        .key(ApiKey::new("k2", "value-of-k2-0123456789"))
        .plan_key("gold", "k1")
        .account_throttle(500.0, 250)
    }

    #[test]
    fn config_round_trips_and_conflicts_are_refused() {
        let Some(redis) = TestRedis::start() else {
            return;
        };
        let a = open(&redis);
        let b = open(&redis);
        assert_eq!(a.load_model().expect("load"), None);
        let m1 = model();
        a.save_model(None, &m1).expect("save");
        assert_eq!(b.load_model().expect("load"), Some(m1.clone()));
        assert_eq!(a.changed(&Model::default()).expect("changed"), None);

        // B appends a key and changes another: A sees it as a change, in order.
        let mut m2 = m1.clone();
        m2.api_keys[0].enabled = false;
        m2.api_keys
            .push(ApiKey::new("k3", "value-of-k3-0123456789"));
        m2.delete_api_key("k2").expect("delete");
        b.save(&m1, &m2).expect("save");
        assert_eq!(
            a.changed(&Model::default()).expect("changed"),
            Some(m2.clone())
        );
        assert_eq!(b.health().config_version(), a.health().config_version());

        // Both start from m2; the second save is a conflict until it catches up.
        let m3 = m2.clone().key(ApiKey::new("k4", "value-of-k4-0123456789"));
        let m3b = m2.clone().account_throttle(1.0, 1);
        a.save(&m2, &m3).expect("save");
        let err = b.save(&m2, &m3b).expect_err("conflict");
        assert!(
            matches!(&err, ControlError::Model(m) if m.message.contains("retry")),
            "{err}"
        );
        let latest = b
            .changed(&Model::default())
            .expect("changed")
            .expect("moved");
        assert_eq!(latest, m3);
        let m4 = latest.clone().account_throttle(1.0, 1);
        b.save(&latest, &m4).expect("save after catching up");

        // A reorder rewrites the collection and keeps the new order.
        let mut m5 = m4.clone();
        m5.api_keys.reverse();
        a.changed(&Model::default()).expect("changed");
        a.save(&m4, &m5).expect("save");
        assert_eq!(b.changed(&Model::default()).expect("changed"), Some(m5));
    }

    #[test]
    fn a_store_that_lost_its_data_is_seeded_once_and_never_reverted() {
        let Some(redis) = TestRedis::start() else {
            return;
        };
        let (a, b, c) = (open(&redis), open(&redis), open(&redis));
        let m1 = model();
        a.save_model(None, &m1).expect("seed an empty store");
        assert_eq!(b.load_model().expect("load"), Some(m1.clone()));
        assert_eq!(c.load_model().expect("load"), Some(m1.clone()));
        // A moves on twice; B follows the first step; C sees neither; D the last.
        let m2 = m1.clone().key(ApiKey::new("k3", "value-of-k3-0123456789"));
        a.save(&m1, &m2).expect("save");
        assert_eq!(b.changed(&m1).expect("changed"), Some(m2.clone()));
        let m3 = m2.clone().key(ApiKey::new("k4", "value-of-k4-0123456789"));
        a.save(&m2, &m3).expect("save");
        let d = open(&redis);
        assert_eq!(d.load_model().expect("load"), Some(m3.clone()));

        // Redis loses everything. B notices first and seeds its m2; A, which runs a newer
        // version of the same epoch, replaces that seed (nothing was saved on it); C loads it.
        redis.flush_all();
        assert_eq!(b.changed(&m2).expect("seed"), None);
        assert_eq!(a.changed(&m3).expect("replace the older seed"), None);
        assert_eq!(b.changed(&m2).expect("changed"), Some(m3.clone()));
        assert_eq!(c.changed(&m1).expect("changed"), Some(m3.clone()));
        // A change after the seed: no node writes an older configuration over it, whether
        // its version number is lower (C) or the same (D: 3 before the loss, 3 now).
        let mut m4 = m3.clone();
        m4.api_keys[0].enabled = false;
        b.save(&m3, &m4).expect("save");
        assert_eq!(d.health().config_version(), b.health().config_version());
        assert_eq!(d.changed(&m3).expect("changed"), Some(m4.clone()));
        assert_eq!(c.changed(&m3).expect("changed"), Some(m4.clone()));
        assert_eq!(a.changed(&m3).expect("changed"), Some(m4.clone()));
        // Two nodes with the same configuration find the store empty: one seeds, the other
        // loads the seed.
        redis.flush_all();
        assert_eq!(a.changed(&m4).expect("seed"), None);
        assert_eq!(b.changed(&m4).expect("changed"), Some(m4.clone()));
        assert_eq!(b.load_model().expect("load"), Some(m4));

        // A save resent because its answer was lost (same save id) answers as the first did;
        // another save from the same version is a conflict.
        let known = b.known();
        let args = |id: &str| {
            let mut args = vec![
                known.version.to_string(),
                known.epoch.clone().unwrap_or_default(),
                id.to_string(),
                new_id(),
                String::new(),
            ];
            for _ in COLLECTIONS {
                args.extend(["0".to_string(), "0".to_string(), "0".to_string()]);
            }
            args.push(CHANNEL.to_string());
            args
        };
        let save = |id: &str| match b.run_config_script(&b.scripts.save, args(id)) {
            Ok(Outcome::Written(k)) => Some(k.version),
            Ok(Outcome::Refused(_)) => None,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(save("first"), Some(known.version + 1));
        assert_eq!(save("first"), Some(known.version + 1));
        assert_eq!(save("second"), None);
    }

    #[test]
    fn connections_the_store_closed_are_retried_once() {
        let Some(redis) = TestRedis::start() else {
            return;
        };
        let store = open(&redis);
        assert_eq!(store.stored_head().expect("head"), (None, None));
        let client = redis::Client::open(redis.url()).expect("url");
        let mut c = client.get_connection().expect("connect");
        // As Redis's idle `timeout` or a restart does: every other connection is closed.
        redis::cmd("CLIENT")
            .arg(&["KILL", "TYPE", "normal"])
            .exec(&mut c)
            .expect("client kill");
        assert_eq!(store.stored_head().expect("retried"), (None, None));
        assert!(store.health().is_up());
        assert_eq!(store.health().failures.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn resent_batches_count_once_and_history_stays_bounded() {
        let Some(redis) = TestRedis::start() else {
            return;
        };
        let store = open(&redis);
        let entry = |day: u32, n: u64| (("p".to_string(), "k".to_string(), day, day), n);
        let total = |id: u64, day: u32, n: u64| {
            store.send_batch(id, &[entry(day, n)]).expect("send")[&entry(day, n).0]
        };
        assert_eq!(total(7, 1000, 5), 5);
        // The same batch again (its answer was lost): recognised, not counted twice.
        assert_eq!(total(7, 1000, 5), 5);
        assert_eq!(total(8, 1000, 2), 7);
        let client = redis::Client::open(redis.url()).expect("url");
        let mut c = client.get_connection().expect("connect");
        let days = days_key("p", "k");
        let fields: Vec<String> = redis::cmd("HKEYS").arg(&days).query(&mut c).expect("hkeys");
        assert!(!fields.iter().any(|f| f.starts_with('b')), "{fields:?}");
        let ttl: i64 = redis::cmd("TTL")
            .arg(marks_key("p", "k", 1000))
            .query(&mut c)
            .expect("ttl");
        assert!((1..=2 * 86_400).contains(&ttl), "{ttl}");
        // Records of days leaving the 400-day window are dropped as later days are written.
        redis::cmd("HSET")
            .arg(&days)
            .arg(&["u605", "3", "a605", "9", "u700", "4"])
            .exec(&mut c)
            .expect("hset");
        assert_eq!(total(9, 1010, 1), 1);
        let kept: Vec<u32> = store
            .history("p", Some("k"), 0, 5000)
            .expect("history")
            .iter()
            .map(|r| r.day)
            .collect();
        assert_eq!(kept, [700, 1000, 1010]);
    }

    #[test]
    fn outage_keeps_counts_and_reconciles() {
        let Some(mut redis) = TestRedis::start() else {
            return;
        };
        let store = open(&redis);
        let d = |count| UsageDelta {
            plan_id: "p".into(),
            key_id: "k".into(),
            day: 20_000,
            period_start: 20_000,
            count,
        };
        assert_eq!(store.add(&[d(5)]).expect("add"), vec![5]);
        let port = redis.port;
        let _ = redis.child.kill();
        let _ = redis.child.wait();
        let started = std::time::Instant::now();
        assert_eq!(store.add(&[d(3)]).expect("kept"), vec![3]);
        assert_eq!(store.add(&[d(4)]).expect("kept"), vec![4]);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert!(!store.health().is_up());
        assert_eq!(store.health().pending(), 1);
        assert!(store.load_periods().is_err());

        // A fresh, empty Redis on the same port: the outbox is replayed into it.
        let _redis = TestRedis::on(port).expect("restart");
        assert_eq!(store.add(&[d(1)]).expect("add"), vec![8]);
        assert!(store.health().is_up());
        assert_eq!(store.health().pending(), 0);

        // A full outbox drops new entries (and counts them) instead of growing.
        let mut small = FleetOptions::new("redis://127.0.0.1:1");
        small.max_pending = 1;
        small.timeout = Duration::from_millis(100);
        assert!(FleetStore::open(small).is_err());
    }

    #[test]
    fn urls_are_parsed_and_redacted() {
        let t = Duration::from_millis(100);
        let e = parse_url("redis://:secret@127.0.0.1:6379/2", t).expect("url");
        assert_eq!(e.shown, "redis://***@127.0.0.1:6379/2");
        assert!(matches!(e.target, Target::Single(_)));
        let e = parse_url("redis+cluster://10.0.0.1:7000,10.0.0.2:7000", t).expect("cluster");
        assert!(matches!(e.target, Target::Cluster(_)));
        for bad in [
            "http://x:1",
            "redis://a:1,b:2",
            "127.0.0.1:6379",
            "redis://",
        ] {
            let err = parse_url(bad, t).err().expect(bad);
            assert!(err.to_string().contains("--store"), "{err}");
        }
        assert_eq!("closed".parse(), Ok(FailureMode::Closed));
        assert!("sometimes".parse::<FailureMode>().is_err());
    }

    #[test]
    fn appends_keep_rows_and_reorders_rewrite() {
        let k = |id: &str| ApiKey::new(id, format!("value-of-{id}-0123456789"));
        let old = vec![k("a"), k("b")];
        let mut args = Vec::new();
        diff_rows(&old, &[k("a"), k("b"), k("c")], 5 << 32, false, &mut args).expect("diff");
        assert_eq!(&args[..4], ["0", "0", "1", "c"]);
        assert_eq!(args[5], ((5u64 << 32) + 2).to_string());
        let mut args = Vec::new();
        diff_rows(&old, &[k("c"), k("a")], 5 << 32, false, &mut args).expect("diff");
        assert_eq!(&args[..3], ["1", "0", "2"]);
        let mut args = Vec::new();
        diff_rows(&old, &[k("b")], 5 << 32, false, &mut args).expect("diff");
        assert_eq!(args, ["0", "1", "a", "0"]);
    }

    #[test]
    fn heartbeats_count_live_nodes_and_leaving_uncounts() {
        let Some(redis) = TestRedis::start() else {
            return;
        };
        let (a, b) = (open(&redis), open(&redis));
        let running = AtomicBool::new(false);
        assert_eq!(a.heartbeat(&running), Some(1));
        assert_eq!(b.heartbeat(&running), Some(2));
        assert_eq!(a.heartbeat(&running), Some(2));
        b.leave();
        assert_eq!(a.heartbeat(&running), Some(1));
        // A stopped watcher no longer announces the node.
        assert_eq!(b.heartbeat(&AtomicBool::new(true)), None);
        assert_eq!(a.heartbeat(&running), Some(1));
        // A node silent for longer than the window is pruned.
        let client = redis::Client::open(redis.url()).expect("url");
        let mut c = client.get_connection().expect("connect");
        redis::cmd("ZADD")
            .arg(NODES)
            .arg(1)
            .arg("long-gone")
            .exec(&mut c)
            .expect("zadd");
        assert_eq!(a.heartbeat(&running), Some(1));
    }

    #[test]
    fn node_count_rises_at_once_and_falls_when_seen_twice() {
        assert_eq!(next_node_count(0, 0), 1);
        assert_eq!(next_node_count(0, 3), 3);
        assert_eq!(next_node_count(1, 3), 3);
        // One heartbeat that finds the others pruned (Redis just came back) changes nothing.
        assert_eq!(next_node_count(3, 1), 3);
        assert_eq!(next_node_count(1, 1), 1);
        assert_eq!(next_node_count(3, 2), 3);
        assert_eq!(next_node_count(2, 2), 2);
    }

    #[test]
    fn health_follows_the_failure_mode() {
        let h = Health::new(FailureMode::Closed);
        assert!(!h.refuse_keyed());
        h.up.store(false, Ordering::Relaxed);
        assert!(h.refuse_keyed() && !h.waive_quota());
        let h = Health::new(FailureMode::Open);
        h.up.store(false, Ordering::Relaxed);
        assert!(h.waive_quota() && !h.refuse_keyed());
    }
}
